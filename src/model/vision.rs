//! The vision tower and projector on a device ([`DeviceVisionTower`]): the steps of `reference::vision` as kernel
//! calls, with the same bf16 rounding points as the reference's `round_bf16` mode (the fused SwiGLU keeps gate and
//! up in f32 as the reference does; the GEMMs sum in their own order).
//!
//! All images of one call run as one sequence of patches: the linears, norms and RoPE are per token, the attention is
//! block-diagonal over the images, and the patch merger gathers each image's 2x2 blocks. The result is one
//! `[features, text_dim]` bf16 buffer, the images' features one after the other (the order of their `[IMG]` tokens).

use half::bf16;

use crate::device::{Device, DeviceBuffer};
use crate::kernels::dense;
use crate::kernels::gemm::DeviceWeights;
use crate::kernels::norm;
use crate::kernels::vision::{self, Activation, GridPositions, MergeSources, TokenSegments, ATTENTION_HEAD_DIM};
use crate::model::checkpoint::Checkpoint;
use crate::model::{ModelConfig, VisionConfig};
use crate::quant::repack::{repack_gate_up, repack_linear, MatrixRef, K_ALIGN};
use crate::reference::vision::{check_image, rope_2d_inv_freq, PixelImage, VisionWeights};
use crate::{Error, Result};

fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// `y = x W^T` weights for the dense GEMM from an f32 [rows, cols] matrix (cols a multiple of 64).
fn upload_matrix(device: &Device, values: &[f32], rows: usize, cols: usize) -> Result<DeviceWeights> {
    let data = to_bf16(values);
    DeviceWeights::upload(device, &repack_linear(&[MatrixRef { rows, cols, data: crate::quant::repack::QuantData::Bf16(&data) }])?)
}

fn upload_vector(device: &Device, values: &[f32]) -> Result<DeviceBuffer<bf16>> {
    DeviceBuffer::from_slice(device, &to_bf16(values))
}

struct DeviceVisionLayer {
    attention_norm: DeviceBuffer<bf16>,
    wq: DeviceWeights,
    wk: DeviceWeights,
    wv: DeviceWeights,
    wo: DeviceWeights,
    ffn_norm: DeviceBuffer<bf16>,
    /// w1 and w3 interleaved for the GEMM's SwiGLU epilogue.
    w13: DeviceWeights,
    w2: DeviceWeights,
}

/// The tower and projector uploaded in the kernels' layouts.
///
/// ```
/// use small4::model::checkpoint::{Checkpoint, Layout};
/// use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
/// use small4::model::vision::DeviceVisionTower;
/// use small4::model::{ModelConfig, PixelImage};
/// use small4::quant::WeightFormat;
///
/// let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?)?;
/// let config = ModelConfig::from_json_str(&checkpoint.config_json.to_string())?;
/// let tower = DeviceVisionTower::load(&small4::device::simulator(), &checkpoint, &config)?;
/// // Patches of 14 merged 2x2: a 28x28 image is one feature row, a 28-wide, 56-high one two.
/// let square = PixelImage { width: 28, height: 28, channels: 3, data: vec![0.25; 3 * 28 * 28] };
/// let tall = PixelImage { width: 28, height: 56, channels: 3, data: (0..3 * 56 * 28).map(|i| (i % 7) as f32 / 7.0).collect() };
/// let images = [square.clone(), tall];
/// assert_eq!(tower.feature_rows(&images), 3);
/// // Per image: [feature rows, text dim] f32, the split of `encode`'s one bf16 buffer.
/// let per_image = tower.encode_to_host(&images)?;
/// assert_eq!(per_image.iter().map(Vec::len).collect::<Vec<_>>(), [config.dim, 2 * config.dim]);
/// let all: Vec<f32> = tower.encode(&images)?.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(all, per_image.concat());
/// assert!(all.iter().all(|v| v.is_finite()));
/// // No image at all is a typed error:
/// assert!(matches!(tower.encode_to_host(&[]), Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub struct DeviceVisionTower {
    config: VisionConfig,
    text_dim: usize,
    device: Device,
    /// The conv weight [hidden, channels * patch^2] with zero columns up to `conv_k` (a multiple of 64).
    patch_conv: DeviceWeights,
    conv_k: usize,
    ln_pre: DeviceBuffer<bf16>,
    layers: Vec<DeviceVisionLayer>,
    pre_mm_projector_norm: DeviceBuffer<bf16>,
    merging_layer: DeviceWeights,
    w_in: DeviceWeights,
    w_in_bias: Option<DeviceBuffer<bf16>>,
    w_out: DeviceWeights,
    w_out_bias: Option<DeviceBuffer<bf16>>,
    inv_freq_rows: DeviceBuffer<f32>,
    inv_freq_cols: DeviceBuffer<f32>,
}

impl DeviceVisionTower {
    /// Uploads the tower of `checkpoint` (either layout) for a model of configuration `c`; `Error::Config` when the
    /// configuration has no vision tower.
    pub fn load(device: &Device, checkpoint: &Checkpoint, c: &ModelConfig) -> Result<Self> {
        let v = c.vision.as_ref().ok_or_else(|| Error::Config("the model configuration has no vision tower".into()))?;
        Self::upload(device, &checkpoint.vision_weights(v, c.dim)?, v, c.dim)
    }

    /// Uploads f32 weights (bf16 values, as a checkpoint stores them) for the tower of `v` projecting into `text_dim`.
    pub fn upload(device: &Device, w: &VisionWeights, v: &VisionConfig, text_dim: usize) -> Result<Self> {
        w.check_shapes(v, text_dim)?;
        if v.head_dim != ATTENTION_HEAD_DIM || v.heads * v.head_dim != v.hidden {
            return Err(Error::Config(format!(
                "the vision attention kernel runs heads of {ATTENTION_HEAD_DIM} covering the hidden size (got {} x {} for {})",
                v.heads, v.head_dim, v.hidden
            )));
        }
        let (h, m2) = (v.hidden, v.spatial_merge_size * v.spatial_merge_size);
        let conv_in = v.num_channels * v.patch_size * v.patch_size;
        let conv_k = conv_in.next_multiple_of(K_ALIGN);
        let padded_conv: Vec<f32> =
            w.patch_conv.chunks_exact(conv_in).flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0.0, conv_k - conv_in))).collect();
        let layers = w
            .layers
            .iter()
            .map(|l| {
                let (w1, w3) = (to_bf16(&l.w1), to_bf16(&l.w3));
                let gate = MatrixRef { rows: v.intermediate, cols: h, data: crate::quant::repack::QuantData::Bf16(&w1) };
                let up = MatrixRef { rows: v.intermediate, cols: h, data: crate::quant::repack::QuantData::Bf16(&w3) };
                Ok(DeviceVisionLayer {
                    attention_norm: upload_vector(device, &l.attention_norm)?,
                    wq: upload_matrix(device, &l.wq, h, h)?,
                    wk: upload_matrix(device, &l.wk, h, h)?,
                    wv: upload_matrix(device, &l.wv, h, h)?,
                    wo: upload_matrix(device, &l.wo, h, h)?,
                    ffn_norm: upload_vector(device, &l.ffn_norm)?,
                    w13: DeviceWeights::upload(device, &repack_gate_up(&[(gate, up)])?)?,
                    w2: upload_matrix(device, &l.w2, h, v.intermediate)?,
                })
            })
            .collect::<Result<_>>()?;
        let (rows_freq, cols_freq) = rope_2d_inv_freq(v.head_dim, v.rope_theta);
        Ok(DeviceVisionTower {
            patch_conv: upload_matrix(device, &padded_conv, h, conv_k)?,
            conv_k,
            ln_pre: upload_vector(device, &w.ln_pre)?,
            layers,
            pre_mm_projector_norm: upload_vector(device, &w.pre_mm_projector_norm)?,
            merging_layer: upload_matrix(device, &w.merging_layer, h, h * m2)?,
            w_in: upload_matrix(device, &w.w_in, text_dim, h)?,
            w_in_bias: w.w_in_bias.as_deref().map(|b| upload_vector(device, b)).transpose()?,
            w_out: upload_matrix(device, &w.w_out, text_dim, text_dim)?,
            w_out_bias: w.w_out_bias.as_deref().map(|b| upload_vector(device, b)).transpose()?,
            inv_freq_rows: DeviceBuffer::from_slice(device, &rows_freq)?,
            inv_freq_cols: DeviceBuffer::from_slice(device, &cols_freq)?,
            config: v.clone(),
            text_dim,
            device: device.clone(),
        })
    }

    /// The tower's configuration.
    pub fn config(&self) -> &VisionConfig {
        &self.config
    }

    /// Feature rows (`[IMG]` tokens) of `images` together.
    pub fn feature_rows(&self, images: &[PixelImage]) -> usize {
        images.iter().map(|image| image.feature_count(&self.config)).sum()
    }

    /// The text-width features of `images`, [`Self::feature_rows`] x `text_dim` bf16, image after image.
    pub fn encode(&self, images: &[PixelImage]) -> Result<DeviceBuffer<bf16>> {
        let (v, d) = (&self.config, &self.device);
        if images.is_empty() {
            return Err(Error::InvalidArgument("vision tower: no images to encode".into()));
        }
        for (i, image) in images.iter().enumerate() {
            check_image(v, i, image)?;
        }
        let (hidden, p, eps) = (v.hidden, v.patch_size, v.norm_eps);
        let grids: Vec<(usize, usize)> = images.iter().map(|image| image.patch_grid(p)).collect();
        let t: usize = grids.iter().map(|(r, c)| r * c).sum();
        let bf = |len: usize| DeviceBuffer::<bf16>::alloc(d, len);

        // Host tables: each token's image range and grid position; the merger's sources.
        let mut segments = Vec::with_capacity(images.len());
        let (mut grid_rows, mut grid_cols) = (Vec::with_capacity(t), Vec::with_capacity(t));
        for &(rows, cols) in &grids {
            let start = grid_rows.len();
            for r in 0..rows {
                for c in 0..cols {
                    grid_rows.push(r as i32);
                    grid_cols.push(c as i32);
                }
            }
            segments.push(start..grid_rows.len());
        }
        let segments = TokenSegments::upload(d, &segments)?;
        let (grid_rows, grid_cols) = (DeviceBuffer::from_slice(d, &grid_rows)?, DeviceBuffer::from_slice(d, &grid_cols)?);
        let positions = GridPositions { rows: &grid_rows, cols: &grid_cols, inv_freq_rows: &self.inv_freq_rows, inv_freq_cols: &self.inv_freq_cols };
        let merge_sources = MergeSources::upload(d, &grids, v.spatial_merge_size)?;

        // Patch embedding: unfold every image's patches, one GEMM over all of them, ln_pre.
        let patches = bf(t * self.conv_k)?;
        let mut first_row = 0;
        for (image, &(rows, cols)) in images.iter().zip(&grids) {
            let pixels = DeviceBuffer::from_slice(d, &image.data)?;
            let rows_of_image = patches.view([t, self.conv_k])?.rows(first_row..first_row + rows * cols)?;
            vision::patch_im2col(pixels.view([image.channels, image.height, image.width])?, p, rows_of_image)?;
            first_row += rows * cols;
        }
        let embedded = bf(t * hidden)?;
        dense::linear(&self.patch_conv, patches.view([t, self.conv_k])?, embedded.view([t, hidden])?)?;
        drop(patches);

        let (x, x_mid, h) = (bf(t * hidden)?, bf(t * hidden)?, bf(t * hidden)?);
        let (q, k, vv, attn, block_out) = (bf(t * hidden)?, bf(t * hidden)?, bf(t * hidden)?, bf(t * hidden)?, bf(t * hidden)?);
        let act = bf(t * v.intermediate)?;
        norm::rms_norm(embedded.view([t, hidden])?, self.ln_pre.as_vector(), x.view([t, hidden])?, eps)?;
        let first_norm = self.layers.first().map_or(&self.pre_mm_projector_norm, |l| &l.attention_norm);
        norm::rms_norm(x.view([t, hidden])?, first_norm.as_vector(), h.view([t, hidden])?, eps)?;
        for (l, layer) in self.layers.iter().enumerate() {
            // x += wo(attention(rope2d(wq h), rope2d(wk h), wv h)); h = ffn_norm(x)
            let normed = h.view([t, hidden])?;
            dense::linear(&layer.wq, normed, q.view([t, hidden])?)?;
            dense::linear(&layer.wk, normed, k.view([t, hidden])?)?;
            dense::linear(&layer.wv, normed, vv.view([t, hidden])?)?;
            let heads_shape = [t, v.heads, v.head_dim];
            vision::rope_2d(q.view(heads_shape)?, Some(k.view(heads_shape)?), &positions)?;
            vision::vision_attention(
                q.view(heads_shape)?,
                k.view(heads_shape)?,
                vv.view(heads_shape)?,
                attn.view(heads_shape)?,
                &segments,
                1.0 / (v.head_dim as f32).sqrt(),
            )?;
            dense::linear(&layer.wo, attn.view([t, hidden])?, block_out.view([t, hidden])?)?;
            norm::add_rms_norm(
                block_out.view([t, hidden])?,
                x.view([t, hidden])?,
                layer.ffn_norm.as_vector(),
                x_mid.view([t, hidden])?,
                h.view([t, hidden])?,
                eps,
            )?;
            // x += w2(silu(w1 h) * w3 h); h = the next layer's attention_norm(x), or the projector's norm.
            dense::linear_swiglu(&layer.w13, h.view([t, hidden])?, act.view([t, v.intermediate])?, None)?;
            dense::linear(&layer.w2, act.view([t, v.intermediate])?, block_out.view([t, hidden])?)?;
            let next_norm = self.layers.get(l + 1).map_or(&self.pre_mm_projector_norm, |next| &next.attention_norm);
            norm::add_rms_norm(block_out.view([t, hidden])?, x_mid.view([t, hidden])?, next_norm.as_vector(), x.view([t, hidden])?, h.view([t, hidden])?, eps)?;
        }

        // Projector: 2x2 patch merger, then w_out(gelu(w_in x + b_in)) + b_out.
        let rows = merge_sources.rows();
        let m2 = v.spatial_merge_size * v.spatial_merge_size;
        let merged_in = bf(rows * hidden * m2)?;
        vision::patch_merge(h.view([t, hidden])?, &merge_sources, merged_in.view([rows, hidden * m2])?)?;
        let merged = bf(rows * hidden)?;
        dense::linear(&self.merging_layer, merged_in.view([rows, hidden * m2])?, merged.view([rows, hidden])?)?;
        let adapted = bf(rows * self.text_dim)?;
        dense::linear(&self.w_in, merged.view([rows, hidden])?, adapted.view([rows, self.text_dim])?)?;
        vision::bias_act(adapted.view([rows, self.text_dim])?, self.w_in_bias.as_ref().map(|b| b.as_vector()), Activation::Gelu)?;
        let features = bf(rows * self.text_dim)?;
        dense::linear(&self.w_out, adapted.view([rows, self.text_dim])?, features.view([rows, self.text_dim])?)?;
        if let Some(b) = &self.w_out_bias {
            vision::bias_act(features.view([rows, self.text_dim])?, Some(b.as_vector()), Activation::Identity)?;
        }
        Ok(features)
    }

    /// [`Self::encode`] read back as f32, one `[feature_count, text_dim]` block per image (the reference's shape).
    pub fn encode_to_host(&self, images: &[PixelImage]) -> Result<Vec<Vec<f32>>> {
        let all: Vec<f32> = self.encode(images)?.to_vec()?.iter().map(|x| x.to_f32()).collect();
        let mut rest = all.as_slice();
        Ok(images
            .iter()
            .map(|image| {
                let (mine, tail) = rest.split_at(image.feature_count(&self.config) * self.text_dim);
                rest = tail;
                mine.to_vec()
            })
            .collect())
    }
}
