//! The vision tower (Pixtral style) and its projector into the text model on the CPU, in f32 over bf16 weights:
//! the oracle the GPU tower will be compared against (SPEC-model.md, "Vision tower").
//!
//! Per image, an RGB tensor normalised with the Pixtral mean/std (CHW, sides multiples of `patch * merge`):
//! 1. `patch_conv`: a `patch x patch` convolution of stride `patch`, no bias, as one matmul over the unfolded patches
//!    (`[c, ky, kx]` order, the conv weight's layout); patches in row-major order of the grid.
//! 2. `ln_pre` RMSNorm; then `n_layers` pre-norm blocks: `x += wo(attn(rope2d(wq h), rope2d(wk h), wv h))` with
//!    `h = attention_norm(x)`, then `x += w2(silu(w1 h) * w3 h)` with `h = ffn_norm(x)`. Attention is bidirectional
//!    and block-diagonal: a patch sees the patches of its own image only. Softmax scale `1/sqrt(head_dim)`.
//! 3. 2D RoPE on interleaved pairs `(2i, 2i+1)`: with `f_j = theta^(-2j/head_dim)`, pair `k < head_dim/4` turns by
//!    `row * f_{2k}`, pair `head_dim/4 + k` by `col * f_{2k+1}` (mistral-inference `precompute_freqs_cis_2d`).
//! 4. Projector: `pre_mm_projector_norm` RMSNorm, the patch merger (each `merge x merge` block of the grid unfolded
//!    into one vector of `hidden * merge^2` values in `[c, di, dj]` order, as `torch.nn.functional.unfold` lays it out,
//!    blocks in row-major order) through `merging_layer` back to `hidden`, then the adapter
//!    `w_out(gelu(w_in x + b_in)) + b_out` (exact erf GELU; biases only with `adapter_bias`) into the text width.
//!
//! The features of an image come out in row-major order of its merged grid: the order of its `[IMG]` tokens.
//! With `round_bf16` the outputs of every norm, linear, attention and residual addition are rounded to bf16 (where a
//! bf16 GPU path stores them), as the text model's [`RoundingMode::Bf16Activations`](super::model::RoundingMode).

use rayon::prelude::*;

use super::linear::{dot, matmul_nt, round_bf16};
use super::moe::{softmax, swiglu_expert_with};
use super::norm::rms_norm;
use super::rope::apply_interleaved;
use crate::model::VisionConfig;
use crate::{Error, Result};

/// One transformer block of the tower, f32, stored `[out, in]` in the NATIVE row order (interleaved RoPE pairs).
#[derive(Clone, Debug)]
pub struct VisionLayerWeights {
    /// `[hidden]`
    pub attention_norm: Vec<f32>,
    /// `[hidden, hidden]` each.
    pub wq: Vec<f32>,
    pub wk: Vec<f32>,
    pub wv: Vec<f32>,
    pub wo: Vec<f32>,
    /// `[hidden]`
    pub ffn_norm: Vec<f32>,
    /// `[intermediate, hidden]` (gate), `[intermediate, hidden]` (up), `[hidden, intermediate]` (down).
    pub w1: Vec<f32>,
    pub w3: Vec<f32>,
    pub w2: Vec<f32>,
}

/// The tower and the projector.
#[derive(Clone, Debug)]
pub struct VisionWeights {
    /// `[hidden, channels * patch * patch]`: the conv weight `[hidden, channels, patch, patch]` flattened.
    pub patch_conv: Vec<f32>,
    /// `[hidden]`
    pub ln_pre: Vec<f32>,
    pub layers: Vec<VisionLayerWeights>,
    /// `[hidden]`
    pub pre_mm_projector_norm: Vec<f32>,
    /// [hidden, hidden * merge^2], input in `[c, di, dj]` order.
    pub merging_layer: Vec<f32>,
    /// `[text_dim, hidden]`
    pub w_in: Vec<f32>,
    /// `[text_dim]` with `adapter_bias`.
    pub w_in_bias: Option<Vec<f32>>,
    /// `[text_dim, text_dim]`
    pub w_out: Vec<f32>,
    pub w_out_bias: Option<Vec<f32>>,
}

/// An image ready for the tower: `channels` planes of `height x width` normalised values (CHW).
#[derive(Clone, Debug, PartialEq)]
pub struct PixelImage {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<f32>,
}

impl PixelImage {
    /// The patch grid (rows, cols) of this image.
    pub fn patch_grid(&self, patch: usize) -> (usize, usize) {
        (self.height / patch, self.width / patch)
    }

    /// `[IMG]` tokens (and feature rows) of this image: its merged grid.
    pub fn feature_count(&self, v: &VisionConfig) -> usize {
        let block = v.patch_size * v.spatial_merge_size;
        (self.height / block) * (self.width / block)
    }
}

impl VisionWeights {
    /// Checks every tensor's length against the configuration.
    pub fn check_shapes(&self, v: &VisionConfig, text_dim: usize) -> Result<()> {
        let check = |name: String, tensor: &[f32], rows: usize, cols: usize| -> Result<()> {
            if tensor.len() == rows * cols {
                Ok(())
            } else {
                Err(Error::shape(name, format!("[{rows}, {cols}] = {} values", rows * cols), format!("{} values", tensor.len())))
            }
        };
        let (h, m2) = (v.hidden, v.spatial_merge_size * v.spatial_merge_size);
        check("vision patch_conv".into(), &self.patch_conv, h, v.num_channels * v.patch_size * v.patch_size)?;
        check("vision ln_pre".into(), &self.ln_pre, 1, h)?;
        if self.layers.len() != v.n_layers {
            return Err(Error::shape("vision layers", v.n_layers, self.layers.len()));
        }
        for (l, w) in self.layers.iter().enumerate() {
            let at = |name: &str| format!("vision layers.{l}.{name}");
            check(at("attention_norm"), &w.attention_norm, 1, h)?;
            check(at("ffn_norm"), &w.ffn_norm, 1, h)?;
            for (name, t) in [("wq", &w.wq), ("wk", &w.wk), ("wv", &w.wv), ("wo", &w.wo)] {
                check(at(name), t, h, h)?;
            }
            check(at("w1"), &w.w1, v.intermediate, h)?;
            check(at("w3"), &w.w3, v.intermediate, h)?;
            check(at("w2"), &w.w2, h, v.intermediate)?;
        }
        check("pre_mm_projector_norm".into(), &self.pre_mm_projector_norm, 1, h)?;
        check("patch_merger.merging_layer".into(), &self.merging_layer, h, h * m2)?;
        check("vision_language_adapter.w_in".into(), &self.w_in, text_dim, h)?;
        check("vision_language_adapter.w_out".into(), &self.w_out, text_dim, text_dim)?;
        for (name, bias) in [("w_in.bias", &self.w_in_bias), ("w_out.bias", &self.w_out_bias)] {
            match (bias, v.adapter_bias) {
                (Some(b), true) => check(format!("vision_language_adapter.{name}"), b, 1, text_dim)?,
                (None, false) => {}
                (b, want) => {
                    return Err(Error::shape(format!("vision_language_adapter.{name}"), format!("present = {want}"), format!("present = {}", b.is_some())))
                }
            }
        }
        Ok(())
    }
}

/// The inverse frequencies of 2D RoPE: `(rows, cols)`, `head_dim / 4` each; pair `k` of the first half of a head
/// turns by `row * rows[k]`, pair `k` of the second half by `col * cols[k]`.
pub fn rope_2d_inv_freq(head_dim: usize, theta: f32) -> (Vec<f32>, Vec<f32>) {
    let f = |j: usize| (1.0 / (theta as f64).powf((2 * j) as f64 / head_dim as f64)) as f32;
    let quarter = head_dim / 4;
    ((0..quarter).map(|k| f(2 * k)).collect(), (0..quarter).map(|k| f(2 * k + 1)).collect())
}

/// Rotates one head (`head_dim` values, interleaved pairs) to grid position (row, col).
pub fn apply_rope_2d(head: &mut [f32], inv_freq: &(Vec<f32>, Vec<f32>), row: usize, col: usize) {
    let (first, second) = head.split_at_mut(head.len() / 2);
    apply_interleaved(first, &inv_freq.0, row);
    apply_interleaved(second, &inv_freq.1, col);
}

/// The patches of an image unfolded for the conv: `[rows * cols, channels * patch * patch]`, `[c, ky, kx]` order.
pub fn unfold_patches(image: &PixelImage, patch: usize) -> Vec<f32> {
    let (rows, cols) = image.patch_grid(patch);
    let (w, c) = (image.width, image.channels);
    let mut out = Vec::with_capacity(rows * cols * c * patch * patch);
    for gy in 0..rows {
        for gx in 0..cols {
            for ch in 0..c {
                for ky in 0..patch {
                    let start = (ch * image.height + gy * patch + ky) * w + gx * patch;
                    out.extend_from_slice(&image.data[start..start + patch]);
                }
            }
        }
    }
    out
}

/// The patch merger's input: each `merge x merge` block of a `[rows, cols, hidden]` grid as one row of
/// `hidden * merge^2` values in `[c, di, dj]` order; blocks row-major. [rows/merge * cols/merge, hidden * merge^2].
pub fn merge_patches(x: &[f32], rows: usize, cols: usize, hidden: usize, merge: usize) -> Vec<f32> {
    let width = hidden * merge * merge;
    let mut out = vec![0.0f32; (rows / merge) * (cols / merge) * width];
    for (block, dst) in out.chunks_exact_mut(width).enumerate() {
        let (by, bx) = (block / (cols / merge), block % (cols / merge));
        for di in 0..merge {
            for dj in 0..merge {
                let src = &x[((by * merge + di) * cols + bx * merge + dj) * hidden..][..hidden];
                for (ch, &value) in src.iter().enumerate() {
                    dst[ch * merge * merge + di * merge + dj] = value;
                }
            }
        }
    }
    out
}

/// Exact GELU: `x * (1 + erf(x / sqrt 2)) / 2` (torch's `nn.GELU()` default).
pub fn gelu(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2))) as f32
}

/// Bidirectional attention within each segment (block-diagonal across images).
/// `q`, `k`, `v` `[tokens, heads * head_dim]`; `segments` the token ranges of the images, covering all tokens.
pub fn block_diagonal_attention(q: &[f32], k: &[f32], v: &[f32], segments: &[std::ops::Range<usize>], heads: usize, head_dim: usize) -> Vec<f32> {
    let width = heads * head_dim;
    let scale = 1.0 / (head_dim as f32).sqrt();
    let segment_of: Vec<std::ops::Range<usize>> = segments.iter().flat_map(|s| std::iter::repeat_n(s.clone(), s.len())).collect();
    let mut out = vec![0.0f32; q.len()];
    out.par_chunks_mut(head_dim).enumerate().for_each(|(index, o)| {
        let (i, head) = (index / heads, index % heads);
        let qi = &q[i * width + head * head_dim..][..head_dim];
        let keys = segment_of[i].clone();
        let scores: Vec<f32> = keys.clone().map(|j| dot(qi, &k[j * width + head * head_dim..][..head_dim]) * scale).collect();
        for (j, p) in keys.zip(softmax(&scores)) {
            for (acc, &value) in o.iter_mut().zip(&v[j * width + head * head_dim..][..head_dim]) {
                *acc += p * value;
            }
        }
    });
    out
}

/// Checks one image (`index` for the message) against the tower's configuration: channels, sides positive multiples
/// of `patch * merge` and at most `image_size`, pixel count.
pub fn check_image(v: &VisionConfig, index: usize, image: &PixelImage) -> Result<()> {
    let block = v.patch_size * v.spatial_merge_size;
    if image.channels != v.num_channels {
        return Err(Error::shape(format!("image {index} channels"), v.num_channels, image.channels));
    }
    if image.width == 0 || image.height == 0 || image.width % block != 0 || image.height % block != 0 {
        return Err(Error::shape(format!("image {index} size"), format!("sides positive multiples of {block}"), format!("{}x{}", image.width, image.height)));
    }
    if image.width.max(image.height) > v.image_size.next_multiple_of(block) {
        return Err(Error::shape(format!("image {index} size"), format!("sides at most {}", v.image_size), format!("{}x{}", image.width, image.height)));
    }
    if image.data.len() != image.channels * image.width * image.height {
        return Err(Error::shape(format!("image {index} pixels"), image.channels * image.width * image.height, image.data.len()));
    }
    Ok(())
}

/// Checks that a prompt's `[IMG]` tokens match its images: one `[IMG]` per merged patch of each image
/// ([`PixelImage::feature_count`]), none without images. `vision` is the model's tower (`None`: a text-only model, for
/// which `[IMG]` has no meaning and any token passes, but images are refused). Checked before anything runs, so a
/// prompt whose `[IMG]` tokens would silently embed as text is a typed error: `InvalidArgument` for `[IMG]` tokens
/// without images, `Shape` for a count that does not match the images, `Config` for images given to a text-only model.
pub fn check_image_slots(vision: Option<&VisionConfig>, prompt: &[u32], images: &[PixelImage]) -> Result<()> {
    let Some(v) = vision else {
        if images.is_empty() {
            return Ok(());
        }
        return Err(Error::Config("images given to a model without a vision tower (its configuration or checkpoint has none)".into()));
    };
    let slots = prompt.iter().filter(|&&t| t == v.image_token_id).count();
    if images.is_empty() {
        if slots > 0 {
            return Err(Error::InvalidArgument(format!(
                "the prompt holds {slots} [IMG] tokens (id {}) but no images were given: they would embed as text",
                v.image_token_id
            )));
        }
        return Ok(());
    }
    for (i, image) in images.iter().enumerate() {
        check_image(v, i, image)?;
    }
    let rows: usize = images.iter().map(|image| image.feature_count(v)).sum();
    if slots != rows {
        return Err(Error::shape(
            format!("[IMG] tokens (id {}) of the prompt for {} images", v.image_token_id, images.len()),
            format!("{rows} (the images' merged patch grids)"),
            slots,
        ));
    }
    Ok(())
}

/// The vision tower and projector with its configuration and the text width it projects into.
pub struct VisionTower<'a> {
    pub weights: &'a VisionWeights,
    pub config: &'a VisionConfig,
    pub text_dim: usize,
    /// Round activations to bf16 where a GPU path stores them.
    pub round_bf16: bool,
}

impl VisionTower<'_> {
    fn store(&self, values: &mut [f32]) {
        if self.round_bf16 {
            round_bf16(values);
        }
    }

    fn norm(&self, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let mut y = rms_norm(x, weight, self.config.norm_eps);
        self.store(&mut y);
        y
    }

    fn linear(&self, x: &[f32], w: &[f32], in_dim: usize, out_dim: usize, bias: Option<&[f32]>) -> Vec<f32> {
        let mut y = matmul_nt(x, w, x.len() / in_dim, in_dim, out_dim);
        if let Some(b) = bias {
            y.chunks_exact_mut(out_dim).for_each(|row| row.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        }
        self.store(&mut y);
        y
    }

    fn residual_add(&self, x: &mut [f32], delta: &[f32]) {
        x.iter_mut().zip(delta).for_each(|(a, d)| *a += d);
        self.store(x);
    }

    /// The text-width features of each image: `[feature_count, text_dim]` per image, in `[IMG]` order.
    pub fn encode(&self, images: &[PixelImage]) -> Result<Vec<Vec<f32>>> {
        let v = self.config;
        self.weights.check_shapes(v, self.text_dim)?;
        for (i, image) in images.iter().enumerate() {
            check_image(v, i, image)?;
        }
        let (hidden, p, m) = (v.hidden, v.patch_size, v.spatial_merge_size);
        let conv_in = v.num_channels * p * p;
        // Every image's patches in one sequence, with their grid positions and the image each belongs to.
        let mut x = Vec::new();
        let mut positions = Vec::new();
        let mut segments = Vec::with_capacity(images.len());
        for image in images {
            let (rows, cols) = image.patch_grid(p);
            let start = positions.len();
            x.extend(self.linear(&unfold_patches(image, p), &self.weights.patch_conv, conv_in, hidden, None));
            positions.extend((0..rows).flat_map(|r| (0..cols).map(move |c| (r, c))));
            segments.push(start..positions.len());
        }
        let inv_freq = rope_2d_inv_freq(v.head_dim, v.rope_theta);
        let mut x = self.norm(&x, &self.weights.ln_pre);
        for w in &self.weights.layers {
            let h = self.norm(&x, &w.attention_norm);
            let mut q = self.linear(&h, &w.wq, hidden, hidden, None);
            let mut k = self.linear(&h, &w.wk, hidden, hidden, None);
            let vv = self.linear(&h, &w.wv, hidden, hidden, None);
            for t in [&mut q, &mut k] {
                t.par_chunks_mut(hidden).zip(&positions).for_each(|(token, &(row, col))| {
                    token.chunks_exact_mut(v.head_dim).for_each(|head| apply_rope_2d(head, &inv_freq, row, col));
                });
                self.store(t);
            }
            let mut attn = block_diagonal_attention(&q, &k, &vv, &segments, v.heads, v.head_dim);
            self.store(&mut attn);
            let o = self.linear(&attn, &w.wo, hidden, hidden, None);
            self.residual_add(&mut x, &o);
            let h = self.norm(&x, &w.ffn_norm);
            let mut ffn = swiglu_expert_with(&h, &w.w1, &w.w3, &w.w2, positions.len(), hidden, v.intermediate, self.round_bf16);
            self.store(&mut ffn);
            self.residual_add(&mut x, &ffn);
        }
        let x = self.norm(&x, &self.weights.pre_mm_projector_norm);
        let w = self.weights;
        images
            .iter()
            .zip(&segments)
            .map(|(image, segment)| {
                let (rows, cols) = image.patch_grid(p);
                let merged = merge_patches(&x[segment.start * hidden..segment.end * hidden], rows, cols, hidden, m);
                let merged = self.linear(&merged, &w.merging_layer, hidden * m * m, hidden, None);
                let mut a = self.linear(&merged, &w.w_in, hidden, self.text_dim, w.w_in_bias.as_deref());
                a.iter_mut().for_each(|value| *value = gelu(*value));
                self.store(&mut a);
                Ok(self.linear(&a, &w.w_out, self.text_dim, self.text_dim, w.w_out_bias.as_deref()))
            })
            .collect()
    }
}

/// HF's converter permutes the rows of each head of the tower's `wq` and `wk` from interleaved pairs
/// `(2i, 2i+1)` to halves `(i, head_dim/2 + i)` (transformers' Pixtral uses rotate-half RoPE):
/// `hf[h, t * head_dim/2 + i] = native[h, 2i + t]`. This is that permutation of a `[heads * head_dim, cols]` matrix.
pub fn permute_rows_to_hf(w: &[f32], head_dim: usize, cols: usize) -> Vec<f32> {
    permute_rows(w, head_dim, cols, false)
}

/// The inverse of [`permute_rows_to_hf`]: HF rows back to the native interleaved pairs.
pub fn permute_rows_from_hf(w: &[f32], head_dim: usize, cols: usize) -> Vec<f32> {
    permute_rows(w, head_dim, cols, true)
}

fn permute_rows(w: &[f32], head_dim: usize, cols: usize, from_hf: bool) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0.0f32; w.len()];
    for (head_out, head_in) in out.chunks_exact_mut(head_dim * cols).zip(w.chunks_exact(head_dim * cols)) {
        for i in 0..half {
            for t in 0..2 {
                let (native, hf) = (2 * i + t, t * half + i);
                let (dst, src) = if from_hf { (native, hf) } else { (hf, native) };
                head_out[dst * cols..][..cols].copy_from_slice(&head_in[src * cols..][..cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_permutation_round_trips_and_moves_pairs_to_halves() {
        let (head_dim, cols) = (8, 3);
        let w: Vec<f32> = (0..2 * head_dim * cols).map(|i| i as f32).collect();
        let hf = permute_rows_to_hf(&w, head_dim, cols);
        assert_ne!(hf, w);
        assert_eq!(permute_rows_from_hf(&hf, head_dim, cols), w);
        // Head 1, native row 2*1 + 1 = 3 (odd member of pair 1) is HF row head_dim/2 + 1 = 5.
        assert_eq!(&hf[(head_dim + 5) * cols..][..cols], &w[(head_dim + 3) * cols..][..cols]);
    }

    #[test]
    fn gelu_matches_known_values() {
        assert_eq!(gelu(0.0), 0.0);
        // Phi(1) = 0.841344746..., Phi(-2) = 0.022750131...
        assert!((gelu(1.0) - 0.841_344_7).abs() < 1e-6);
        assert!((gelu(-2.0) - (-2.0 * 0.022_750_132)).abs() < 1e-6);
    }
}
