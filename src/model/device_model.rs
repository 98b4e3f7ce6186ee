//! Loading a model onto a device: a checkpoint (or a synthetic model) uploaded in the kernels' layouts
//! ([`DeviceModel`]), one decoder layer at a time, and the share of the experts and heads a rank of a multi-GPU run
//! holds ([`Shard`]). The weight layouts and the parallel splits are described in [`crate::model::engine`]'s module
//! documentation; the public items are re-exported there.

use half::bf16;
use safetensors::Dtype;

use crate::device::{Device, DeviceBuffer};
use crate::kernels::attention;
use crate::kernels::gemm::DeviceWeights;
use crate::kernels::moe::{Fp8ActScales, MoeLayerWeights};
use crate::kernels::router::ExpertMap;
use crate::kernels::synth;
use crate::model::checkpoint::{Checkpoint, ExpertMatrix};
use crate::model::synth::{SyntheticModel, TensorKind, TensorSpec};
use crate::model::vision::DeviceVisionTower;
use crate::model::ModelConfig;
use crate::quant::repack::{repack_gate_up, repack_linear, repack_row_concat, MatrixRef};
use crate::quant::{Fp8Block128, Fp8PerTensor, QuantizedMatrix, WeightFormat};
use crate::reference::rope::yarn_inv_freq;
use crate::{Error, Result};

/// How the ranks of a multi-GPU run divide the attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionSplit {
    /// Every rank holds every head and computes the whole attention (expert parallelism only).
    Replicated,
    /// Each rank holds `heads / world` query heads (contiguous) and the matching input columns of `wo`; the `wo`
    /// partial sums are all-reduced. The latent projections and the latent KV cache are replicated.
    TensorParallel,
}

/// What one rank of `world` holds: a contiguous share of the routed experts (expert `e` belongs to rank
/// `e * world / experts`), and either every query head or a contiguous share of them (`attention`).
///
/// ```
/// use small4::model::engine::{AttentionSplit, Shard};
///
/// // Rank 1 of 2 with the heads split: experts 4..8 of 8 and heads 16..32 of 32.
/// let rank1 = Shard::tensor_parallel(1, 2);
/// assert_eq!(rank1.attention, AttentionSplit::TensorParallel);
/// assert!(!rank1.owns_expert(3, 8) && rank1.owns_expert(4, 8) && rank1.owns_expert(7, 8));
/// assert_eq!(rank1.expert_map(8), vec![-1, -1, -1, -1, 0, 1, 2, 3]);
/// assert_eq!(rank1.heads(32)?, 16..32);
/// assert!(matches!(rank1.heads(3), Err(small4::Error::InvalidArgument(_)))); // 3 heads do not split over 2 ranks
/// // Expert parallelism only: the same experts, every head.
/// let ep = Shard::expert_parallel(1, 2);
/// assert_eq!((ep.attention, ep.heads(32)?), (AttentionSplit::Replicated, 0..32));
/// assert!((0..8).all(|e| Shard::SINGLE.owns_expert(e, 8)));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    /// This rank's index, `0..world`.
    pub rank: usize,
    /// Ranks (GPUs) in the run; 1 for a single device.
    pub world: usize,
    /// Whether the attention heads are replicated on every rank or split over them.
    pub attention: AttentionSplit,
}

impl Shard {
    /// One rank owning every expert and every head.
    pub const SINGLE: Shard = Shard { rank: 0, world: 1, attention: AttentionSplit::Replicated };

    /// Expert parallelism only: a share of the experts, the whole attention on every rank.
    pub const fn expert_parallel(rank: usize, world: usize) -> Shard {
        Shard { rank, world, attention: AttentionSplit::Replicated }
    }

    /// Expert parallelism of the experts and tensor parallelism of the attention heads over the same ranks.
    pub const fn tensor_parallel(rank: usize, world: usize) -> Shard {
        Shard { rank, world, attention: AttentionSplit::TensorParallel }
    }

    /// Whether routed expert `expert` (of `experts`) belongs to this rank: `expert * world / experts == rank`.
    pub fn owns_expert(&self, expert: usize, experts: usize) -> bool {
        expert * self.world / experts == self.rank
    }

    /// `map[global] = local index` or -1 (the router's expert map).
    pub fn expert_map(&self, experts: usize) -> Vec<i32> {
        let mut next = 0;
        (0..experts)
            .map(|e| {
                if self.owns_expert(e, experts) {
                    next += 1;
                    next - 1
                } else {
                    -1
                }
            })
            .collect()
    }

    /// The query heads this rank computes, of the model's `heads`: all of them when the attention is replicated, the
    /// rank's contiguous `heads / world` under tensor parallelism (an error unless `world` divides `heads`: uneven
    /// shares would give the ranks different GEMM shapes and the plans assume even ones).
    pub fn heads(&self, heads: usize) -> Result<std::ops::Range<usize>> {
        match self.attention {
            AttentionSplit::Replicated => Ok(0..heads),
            AttentionSplit::TensorParallel => {
                if self.world == 0 || heads % self.world != 0 {
                    return Err(Error::InvalidArgument(format!("tensor-parallel attention: {heads} heads do not split evenly over {} ranks", self.world)));
                }
                let per_rank = heads / self.world;
                Ok(self.rank * per_rank..(self.rank + 1) * per_rank)
            }
        }
    }

    /// Whether this rank's `wo` output is a partial sum that the ranks must add (tensor parallelism over 2+ ranks).
    pub(super) fn partial_attention_output(&self) -> bool {
        self.attention == AttentionSplit::TensorParallel && self.world > 1
    }
}

/// The weights of one decoder layer on the device.
pub(super) struct DeviceLayer {
    pub(super) attention_norm: DeviceBuffer<bf16>,
    /// `wq_a` and `wkv_a_with_mqa` stacked ([q_lora_rank + kv_lora_rank + rope, dim]): both read the normed input,
    /// so one GEMM computes `[q_a | kv]`.
    pub(super) wqkv_a: DeviceWeights,
    pub(super) q_a_norm: DeviceBuffer<bf16>,
    /// The rank's heads' rows, [local heads * (nope + rope), q_lora_rank].
    pub(super) wq_b: DeviceWeights,
    pub(super) kv_a_norm: DeviceBuffer<bf16>,
    /// The local heads' W_UK_h transposed, [kv_lora_rank, qk_nope] each, one matrix per head (`linear_per_head`).
    pub(super) w_uk: DeviceWeights,
    /// The local heads' W_UV_h [v_head, kv_lora_rank], one matrix per head.
    pub(super) w_uv: DeviceWeights,
    /// The local heads' input columns, [dim, local heads * v_head].
    pub(super) wo: DeviceWeights,
    pub(super) ffn_norm: DeviceBuffer<bf16>,
    /// Router [experts, dim].
    pub(super) gate: DeviceBuffer<bf16>,
    /// This rank's routed experts and the (replicated) shared expert.
    pub(super) moe: MoeLayerWeights,
    /// The routed experts' static activation scales (per-tensor FP8 checkpoints with `qscale_act`), for
    /// `EngineOptions::fp8_activations`.
    pub(super) fp8_act_scales: Option<Fp8ActScales>,
}

/// A checkpoint uploaded to a device in the kernels' layouts.
pub struct DeviceModel {
    pub(super) config: ModelConfig,
    pub(super) device: Device,
    pub(super) shard: Shard,
    /// The query heads this rank computes (`Shard::heads`).
    pub(super) heads: std::ops::Range<usize>,
    pub(super) tok_embeddings: DeviceBuffer<bf16>,
    pub(super) layers: Vec<DeviceLayer>,
    pub(super) norm: DeviceBuffer<bf16>,
    pub(super) output: DeviceWeights,
    pub(super) inv_freq: DeviceBuffer<f32>,
    pub(super) expert_map: ExpertMap,
    /// The vision tower and projector, when the configuration has one.
    pub(super) vision: Option<DeviceVisionTower>,
}

fn bf16_values(data: &[u8]) -> Vec<bf16> {
    bytemuck::pod_collect_to_vec(data)
}

fn upload_linear(device: &Device, m: &QuantizedMatrix) -> Result<DeviceWeights> {
    DeviceWeights::upload(device, &repack_linear(&[MatrixRef::from(m)])?)
}

/// Rows [first, first + count) of a matrix as an owned matrix (FP8 block scales: the rows must start a block row
/// or lie in one block row, so that the slice's block grid is a part of the source's).
fn slice_rows(m: &QuantizedMatrix, first: usize, count: usize) -> Result<QuantizedMatrix> {
    let (_, cols) = m.shape();
    Ok(match m {
        QuantizedMatrix::Bf16 { data, .. } => QuantizedMatrix::Bf16 { data: data[first * cols..(first + count) * cols].to_vec(), rows: count, cols },
        QuantizedMatrix::Fp8PerTensor(f) => {
            QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::from_parts(f.data[first * cols..(first + count) * cols].to_vec(), count, cols, f.scale)?)
        }
        QuantizedMatrix::Fp8Block128(f) => {
            let blocks = scale_blocks(first, count, "rows")?;
            let per = cols.div_ceil(128);
            QuantizedMatrix::Fp8Block128(Fp8Block128::from_parts(
                f.data[first * cols..(first + count) * cols].to_vec(),
                count,
                cols,
                f.scales[blocks.start * per..blocks.end * per].to_vec(),
            )?)
        }
        other => return Err(Error::InvalidArgument(format!("attention weights in {:?}: bf16 or FP8 expected", other.format()))),
    })
}

/// Rows [first, first + count) of a matrix, transposed ([cols, count]; FP8 block-128: count padded to 128 with zeros).
fn transposed_rows(m: &QuantizedMatrix, first: usize, count: usize) -> Result<QuantizedMatrix> {
    let (_, cols) = m.shape();
    fn transpose<T: Copy>(data: &[T], first: usize, count: usize, cols: usize) -> Vec<T> {
        (0..cols).flat_map(|j| (0..count).map(move |d| (first + d) * cols + j)).map(|i| data[i]).collect()
    }
    Ok(match m {
        QuantizedMatrix::Bf16 { data, .. } => QuantizedMatrix::Bf16 { data: transpose(data, first, count, cols), rows: cols, cols: count },
        QuantizedMatrix::Fp8PerTensor(f) => {
            QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::from_parts(transpose(&f.data, first, count, cols), cols, count, f.scale)?)
        }
        QuantizedMatrix::Fp8Block128(f) => {
            // The transposed slice has one block column; its block rows are the source's block columns.
            let block = one_block_row(first, count)?;
            let per = cols.div_ceil(128);
            let scales = f.scales[block * per..(block + 1) * per].to_vec();
            // The block-128 GEMM reduces over whole 128-column blocks: zero columns pad the slice (the GEMM then
            // reads the next `padded - count` input columns too, and multiplies them by zero).
            let padded = count.next_multiple_of(128);
            let data: Vec<u8> = transpose(&f.data, first, count, cols)
                .chunks_exact(count)
                .flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(0, padded - count)))
                .collect();
            QuantizedMatrix::Fp8Block128(Fp8Block128::from_parts(data, cols, padded, scales)?)
        }
        other => return Err(Error::InvalidArgument(format!("attention weights in {:?}: bf16 or FP8 expected", other.format()))),
    })
}

/// Columns [first, first + count) of a matrix as an owned matrix (FP8 block scales: the columns must start a block
/// column or lie in one): a tensor-parallel rank's input columns of `wo`.
fn slice_cols(m: &QuantizedMatrix, first: usize, count: usize) -> Result<QuantizedMatrix> {
    let (rows, cols) = m.shape();
    fn columns<T: Copy>(data: &[T], rows: usize, cols: usize, first: usize, count: usize) -> Vec<T> {
        (0..rows).flat_map(|r| data[r * cols + first..r * cols + first + count].iter().copied()).collect()
    }
    Ok(match m {
        QuantizedMatrix::Bf16 { data, .. } => QuantizedMatrix::Bf16 { data: columns(data, rows, cols, first, count), rows, cols: count },
        QuantizedMatrix::Fp8PerTensor(f) => {
            QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::from_parts(columns(&f.data, rows, cols, first, count), rows, count, f.scale)?)
        }
        QuantizedMatrix::Fp8Block128(f) => {
            let blocks = scale_blocks(first, count, "columns")?;
            let scales = columns(&f.scales, rows.div_ceil(128), cols.div_ceil(128), blocks.start, blocks.len());
            QuantizedMatrix::Fp8Block128(Fp8Block128::from_parts(columns(&f.data, rows, cols, first, count), rows, count, scales)?)
        }
        other => return Err(Error::InvalidArgument(format!("attention weights in {:?}: bf16 or FP8 expected", other.format()))),
    })
}

/// The 128-wide FP8 scale blocks that rows (or columns) [first, first + count) use, when the slice's own blocks are
/// those: it starts at a block boundary, or it lies inside one block.
fn scale_blocks(first: usize, count: usize, what: &str) -> Result<std::ops::Range<usize>> {
    if first % 128 == 0 {
        return Ok(first / 128..(first + count).div_ceil(128));
    }
    let block = first / 128;
    if (first + count - 1) / 128 != block {
        return Err(Error::InvalidArgument(format!(
            "{what} {first}..{} of an FP8 block-128 matrix straddle a scale block without starting one",
            first + count
        )));
    }
    Ok(block..block + 1)
}

fn one_block_row(first: usize, count: usize) -> Result<usize> {
    let block = first / 128;
    if (first + count - 1) / 128 != block {
        return Err(Error::InvalidArgument(format!("rows {first}..{} cross a 128-row FP8 scale block", first + count)));
    }
    Ok(block)
}

/// `Error::Config` for a configuration the kernels do not run (a latent other than 256, a rope width other than 64,
/// dense layers).
fn check_engine_config(c: &ModelConfig) -> Result<()> {
    if (c.kv_lora_rank, c.qk_rope) != (attention::KV_LORA_RANK, attention::QK_ROPE) || c.first_k_dense_replace != 0 {
        return Err(Error::Config(format!(
            "the engine runs MoE layers with latent {} + rope {} (got {} + {}, {} dense layers)",
            attention::KV_LORA_RANK,
            attention::QK_ROPE,
            c.kv_lora_rank,
            c.qk_rope,
            c.first_k_dense_replace
        )));
    }
    Ok(())
}

/// Loading progress in steps: one per decoder layer, then one for the embeddings and the output head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadProgress {
    /// Steps finished so far, `1..=total`.
    pub done: usize,
    /// Steps of the whole load: decoder layers + 1.
    pub total: usize,
}

impl DeviceModel {
    /// Uploads `checkpoint` to `device`: every layer's weights are read from the mapped files, repacked and uploaded
    /// before the next layer is touched. `shard` selects the routed experts this rank holds.
    ///
    /// Errors: `Error::InvalidArgument` for a shard outside `0..world` or with more ranks than experts, or heads that
    /// do not split evenly; `Error::Config` for a configuration the kernels do not run (a latent other than 256, a
    /// rope width other than 64, dense layers); `Error::Checkpoint` / `Error::UnknownDtype` for missing or
    /// unloadable tensors.
    pub fn load(device: &Device, checkpoint: &Checkpoint, shard: Shard) -> Result<Self> {
        Self::load_with_progress(device, checkpoint, shard, |_| {})
    }

    /// [`DeviceModel::load`], reporting after each uploaded layer (and once more after the embeddings and head), so a
    /// caller can draw a progress bar over the minutes a full checkpoint takes.
    pub fn load_with_progress(device: &Device, checkpoint: &Checkpoint, shard: Shard, mut on_progress: impl FnMut(LoadProgress)) -> Result<Self> {
        let c = checkpoint.model_config()?;
        if shard.world == 0 || shard.rank >= shard.world || shard.world > c.experts {
            return Err(Error::InvalidArgument(format!("shard {shard:?} of {} experts", c.experts)));
        }
        let heads = shard.heads(c.heads)?;
        check_engine_config(&c)?;
        let plain = |name: &str, len: usize| -> Result<DeviceBuffer<bf16>> {
            DeviceBuffer::from_slice(device, &bf16_values(checkpoint.plain(name, Dtype::BF16, &[len])?.data))
        };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<QuantizedMatrix> { checkpoint.matrix(name, rows, cols)?.to_quantized(rows, cols) };
        let (qk, kv_per_head) = (c.qk_head_dim(), c.qk_nope + c.v_head);
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let p = format!("layers.{l}");
            let wkv_b = matrix(&format!("{p}.attention.wkv_b"), c.heads * kv_per_head, c.kv_lora_rank)?;
            // One matrix per local head, stacked as the "experts" of a batched GEMM: W_UK_h transposed, and W_UV_h
            // (FP8 block scales change every 128 rows and W_UV_h may straddle two blocks: 64-row pieces then, each
            // with its own scales, packed back into one matrix).
            let uk: Vec<QuantizedMatrix> = heads.clone().map(|h| transposed_rows(&wkv_b, h * kv_per_head, c.qk_nope)).collect::<Result<_>>()?;
            let w_uk = DeviceWeights::upload(device, &repack_linear(&uk.iter().map(MatrixRef::from).collect::<Vec<_>>())?)?;
            drop(uk);
            let piece = if matches!(wkv_b, QuantizedMatrix::Fp8Block128(_)) { 64 } else { c.v_head };
            let uv: Vec<Vec<QuantizedMatrix>> = heads
                .clone()
                .map(|h| (0..c.v_head).step_by(piece).map(|o| slice_rows(&wkv_b, h * kv_per_head + c.qk_nope + o, piece.min(c.v_head - o))).collect())
                .collect::<Result<_>>()?;
            let uv_parts: Vec<Vec<MatrixRef>> = uv.iter().map(|pieces| pieces.iter().map(MatrixRef::from).collect()).collect();
            let w_uv = DeviceWeights::upload(device, &repack_row_concat(&uv_parts)?)?;
            drop(wkv_b);
            // The local heads' rows of wq_b and input columns of wo; a rank with every head uploads them whole.
            let all_heads = heads.len() == c.heads;
            let wq_b = matrix(&format!("{p}.attention.wq_b"), c.heads * qk, c.q_lora_rank)?;
            let wq_b = upload_linear(device, &if all_heads { wq_b } else { slice_rows(&wq_b, heads.start * qk, heads.len() * qk)? })?;
            let wo = matrix(&format!("{p}.attention.wo"), c.dim, c.heads * c.v_head)?;
            let wo = upload_linear(device, &if all_heads { wo } else { slice_cols(&wo, heads.start * c.v_head, heads.len() * c.v_head)? })?;
            let owned: Vec<usize> = (0..c.experts).filter(|&e| shard.owns_expert(e, c.experts)).collect();
            let expert = |e: usize, which| -> Result<QuantizedMatrix> {
                let (rows, cols) = if which == ExpertMatrix::W2 { (c.dim, c.expert_hidden) } else { (c.expert_hidden, c.dim) };
                checkpoint.expert_matrix(l, e, which, c.dim, c.expert_hidden)?.to_quantized(rows, cols)
            };
            let w13: Vec<(QuantizedMatrix, QuantizedMatrix)> =
                owned.iter().map(|&e| Ok((expert(e, ExpertMatrix::W1)?, expert(e, ExpertMatrix::W3)?))).collect::<Result<_>>()?;
            let gate_up = repack_gate_up(&w13.iter().map(|(a, b)| (MatrixRef::from(a), MatrixRef::from(b))).collect::<Vec<_>>())?;
            drop(w13);
            let w2: Vec<QuantizedMatrix> = owned.iter().map(|&e| expert(e, ExpertMatrix::W2)).collect::<Result<_>>()?;
            let down = repack_linear(&w2.iter().map(MatrixRef::from).collect::<Vec<_>>())?;
            drop(w2);
            let shared = if c.shared_experts > 0 {
                let sh = c.shared_hidden();
                let (s1, s3) = (matrix(&format!("{p}.shared_experts.w1"), sh, c.dim)?, matrix(&format!("{p}.shared_experts.w3"), sh, c.dim)?);
                let s2 = matrix(&format!("{p}.shared_experts.w2"), c.dim, sh)?;
                Some((repack_gate_up(&[(MatrixRef::from(&s1), MatrixRef::from(&s3))])?, repack_linear(&[MatrixRef::from(&s2)])?))
            } else {
                None
            };
            let moe = MoeLayerWeights::upload(device, &gate_up, &down, shared.as_ref().map(|(a, b)| (a, b)))?;
            layers.push(DeviceLayer {
                attention_norm: plain(&format!("{p}.attention_norm.weight"), c.dim)?,
                wqkv_a: {
                    let wq_a = matrix(&format!("{p}.attention.wq_a"), c.q_lora_rank, c.dim)?;
                    let wkv_a = matrix(&format!("{p}.attention.wkv_a_with_mqa"), c.kv_lora_rank + c.qk_rope, c.dim)?;
                    DeviceWeights::upload(device, &repack_row_concat(&[vec![MatrixRef::from(&wq_a), MatrixRef::from(&wkv_a)]])?)?
                },
                q_a_norm: plain(&format!("{p}.attention.q_a_norm.weight"), c.q_lora_rank)?,
                wq_b,
                kv_a_norm: plain(&format!("{p}.attention.kv_a_norm.weight"), c.kv_lora_rank)?,
                w_uk,
                w_uv,
                wo,
                ffn_norm: plain(&format!("{p}.ffn_norm.weight"), c.dim)?,
                gate: DeviceBuffer::from_slice(device, &bf16_values(checkpoint.plain(&format!("{p}.gate.weight"), Dtype::BF16, &[c.experts, c.dim])?.data))?,
                moe,
                fp8_act_scales: checkpoint.expert_activation_scales(l, c.experts, c.dim, c.expert_hidden)?.map(|(up, down)| Fp8ActScales { up, down }),
            });
            on_progress(LoadProgress { done: l + 1, total: c.n_layers + 1 });
        }
        let table = |name: &str| -> Result<Vec<bf16>> { Ok(bf16_values(checkpoint.plain(name, Dtype::BF16, &[c.vocab, c.dim])?.data)) };
        let embeddings = table("tok_embeddings.weight")?;
        let output = if c.tied_embeddings { embeddings.clone() } else { table("output.weight")? };
        let output = upload_linear(device, &QuantizedMatrix::Bf16 { data: output, rows: c.vocab, cols: c.dim })?;
        let tok_embeddings = DeviceBuffer::from_slice(device, &embeddings)?;
        let vision = if c.vision.is_some() { Some(DeviceVisionTower::load(device, checkpoint, &c)?) } else { None };
        on_progress(LoadProgress { done: c.n_layers + 1, total: c.n_layers + 1 });
        Ok(DeviceModel {
            tok_embeddings,
            norm: plain("norm.weight", c.dim)?,
            output,
            inv_freq: DeviceBuffer::from_slice(device, &yarn_inv_freq(c.qk_rope, &c.yarn()))?,
            expert_map: ExpertMap::new(device, &shard.expert_map(c.experts))?,
            vision,
            layers,
            device: device.clone(),
            shard,
            heads,
            config: c,
        })
    }

    /// Builds the model of a [`SyntheticModel`] on `device` (one rank, every expert and head) with the device
    /// generator of `kernels::synth`: every weight is written by a kernel straight into the layout [`DeviceModel::load`]
    /// gives it (the same W_UK / W_UV views of `wkv_b`, the same packing), no weight crosses from the host, and the
    /// values are exactly those of `SyntheticModel::reference_weights`. So the full-size model needs no checkpoint and
    /// no host memory for its weights.
    ///
    /// Errors: `Error::Config` as [`DeviceModel::load`]; the device's allocation errors when the model does not fit.
    ///
    /// ```
    /// use small4::model::engine::{DeviceModel, Engine, EngineOptions};
    /// use small4::model::synth::SyntheticModel;
    /// use small4::model::ModelConfig;
    /// use small4::quant::WeightFormat;
    ///
    /// let synthetic = SyntheticModel::new(ModelConfig { n_layers: 1, ..ModelConfig::tiny() }, WeightFormat::Nvfp4, 1)?;
    /// let model = DeviceModel::synthetic(&small4::device::simulator(), &synthetic)?;
    /// assert_eq!(model.config(), &synthetic.config);
    /// let mut engine = Engine::new(model, EngineOptions::default(), None)?;
    /// let seq = engine.new_sequence();
    /// assert_eq!(engine.forward_logits(&[(seq, vec![1, 2])])?.len(), 2 * synthetic.config.vocab);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn synthetic(device: &Device, model: &SyntheticModel) -> Result<Self> {
        let c = model.config.clone();
        check_engine_config(&c)?;
        let shard = Shard::SINGLE;
        let plain = |name: &str| synth::plain(device, &model.spec(name)?);
        let linear = |name: &str| synth::packed(device, &[model.spec(name)?], synth::View::Whole);
        let swiglu = |base: &str| -> Result<(TensorSpec, TensorSpec)> { Ok((model.spec(&format!("{base}.w1"))?, model.spec(&format!("{base}.w3"))?)) };
        let kv_per_head = c.qk_nope + c.v_head;
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let p = format!("layers.{l}");
            // W_UK_h (transposed) and W_UV_h (in 64-row pieces for FP8 block scales) as views of wkv_b, as `load` cuts them.
            let wkv_b = [model.spec(&format!("{p}.attention.wkv_b"))?];
            let block_scaled = matches!(wkv_b[0].kind, TensorKind::Matrix { format: WeightFormat::Fp8Block128, .. });
            let piece = if block_scaled { 64 } else { c.v_head };
            // Generated head by head (W_UV piece by piece) on the device, then stacked there as `load` packs them.
            let mut w_uk = Vec::with_capacity(c.heads);
            let mut w_uv = Vec::with_capacity(c.heads);
            for h in 0..c.heads {
                w_uk.push(synth::packed(device, &wkv_b, synth::View::TransposedRows { first: h * kv_per_head, count: c.qk_nope })?);
                let first = h * kv_per_head + c.qk_nope;
                let pieces: Vec<DeviceWeights> = (0..c.v_head)
                    .step_by(piece)
                    .map(|o| synth::packed(device, &wkv_b, synth::View::Rows { first: first + o, count: piece.min(c.v_head - o) }))
                    .collect::<Result<_>>()?;
                w_uv.push(DeviceWeights::concat_rows(&pieces.iter().collect::<Vec<_>>())?);
            }
            let w_uk = DeviceWeights::stack(&w_uk.iter().collect::<Vec<_>>())?;
            let w_uv = DeviceWeights::stack(&w_uv.iter().collect::<Vec<_>>())?;
            let pairs: Vec<(TensorSpec, TensorSpec)> = (0..c.experts).map(|e| swiglu(&format!("{p}.experts.{e}"))).collect::<Result<_>>()?;
            let w2: Vec<TensorSpec> = (0..c.experts).map(|e| model.spec(&format!("{p}.experts.{e}.w2"))).collect::<Result<_>>()?;
            let shared = if c.shared_experts > 0 {
                Some((synth::packed_gate_up(device, &[swiglu(&format!("{p}.shared_experts"))?])?, linear(&format!("{p}.shared_experts.w2"))?))
            } else {
                None
            };
            let moe = MoeLayerWeights {
                gate_up: synth::packed_gate_up(device, &pairs)?,
                down: synth::packed(device, &w2, synth::View::Whole)?,
                shared,
                fp8_activations: None,
            };
            layers.push(DeviceLayer {
                attention_norm: plain(&format!("{p}.attention_norm.weight"))?,
                wqkv_a: DeviceWeights::concat_rows(&[&linear(&format!("{p}.attention.wq_a"))?, &linear(&format!("{p}.attention.wkv_a_with_mqa"))?])?,
                q_a_norm: plain(&format!("{p}.attention.q_a_norm.weight"))?,
                wq_b: linear(&format!("{p}.attention.wq_b"))?,
                kv_a_norm: plain(&format!("{p}.attention.kv_a_norm.weight"))?,
                w_uk,
                w_uv,
                wo: linear(&format!("{p}.attention.wo"))?,
                ffn_norm: plain(&format!("{p}.ffn_norm.weight"))?,
                gate: plain(&format!("{p}.gate.weight"))?,
                moe,
                fp8_act_scales: None,
            });
        }
        Ok(DeviceModel {
            tok_embeddings: plain("tok_embeddings.weight")?,
            norm: plain("norm.weight")?,
            // A tied head is the embedding's spec (SyntheticModel::spec), so the same values.
            output: linear("output.weight")?,
            inv_freq: DeviceBuffer::from_slice(device, &yarn_inv_freq(c.qk_rope, &c.yarn()))?,
            expert_map: ExpertMap::new(device, &shard.expert_map(c.experts))?,
            vision: None,
            layers,
            device: device.clone(),
            shard,
            heads: 0..c.heads,
            config: c,
        })
    }

    /// The configuration parsed from the checkpoint.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The share of the experts and heads this rank loaded.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The query heads this rank computes (all of them unless the attention is tensor-parallel).
    pub fn heads(&self) -> std::ops::Range<usize> {
        self.heads.clone()
    }

    /// The vision tower, when the model has one.
    pub fn vision(&self) -> Option<&DeviceVisionTower> {
        self.vision.as_ref()
    }

    /// The device address of every weight buffer of the text model with the kernel family that reads it, for
    /// profilers that attribute a launch to a family by the weights it is passed (`model::bench`). Families:
    /// `attention_projections` (wq_a + wkv_a stacked, wq_b, wo), `absorption` (W_UK, W_UV), `routing` (the router),
    /// `routed_experts`, `shared_expert` (a launch that carries the shared expert beside the routed experts counts as
    /// `routed_experts`: the routed weights come first in its parameters), `head`; norm weights are
    /// `norms_and_small_ops`.
    ///
    /// ```
    /// use small4::model::engine::DeviceModel;
    /// use small4::model::synth::SyntheticModel;
    /// use small4::model::ModelConfig;
    ///
    /// let synthetic = SyntheticModel::new(ModelConfig { n_layers: 1, ..ModelConfig::tiny() }, small4::quant::WeightFormat::Bf16, 1)?;
    /// let model = DeviceModel::synthetic(&small4::device::simulator(), &synthetic)?;
    /// let families = model.weight_families();
    /// assert_eq!(families.iter().filter(|(_, f)| *f == "head").count(), 1);
    /// assert_eq!(families.iter().filter(|(_, f)| *f == "attention_projections").count(), 3);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn weight_families(&self) -> Vec<(u64, &'static str)> {
        let mut out = vec![(self.output.data.addr(), "head"), (self.norm.addr(), "norms_and_small_ops")];
        for layer in &self.layers {
            for w in [&layer.wqkv_a, &layer.wq_b, &layer.wo] {
                out.push((w.data.addr(), "attention_projections"));
            }
            out.push((layer.w_uk.data.addr(), "absorption"));
            out.push((layer.w_uv.data.addr(), "absorption"));
            out.push((layer.gate.addr(), "routing"));
            out.push((layer.moe.gate_up.data.addr(), "routed_experts"));
            out.push((layer.moe.down.data.addr(), "routed_experts"));
            if let Some((up, down)) = &layer.moe.shared {
                out.push((up.data.addr(), "shared_expert"));
                out.push((down.data.addr(), "shared_expert"));
            }
            for n in [&layer.attention_norm, &layer.q_a_norm, &layer.kv_a_norm, &layer.ffn_norm] {
                out.push((n.addr(), "norms_and_small_ops"));
            }
        }
        out
    }
}
