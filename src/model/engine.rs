//! The forward pass on a device: [`DeviceModel`] (a checkpoint uploaded in the kernels' layouts) and [`Engine`]
//! (prefill and decode of a batch of sequences over the paged latent cache, continuous batching, greedy or seeded
//! sampling, EOS). Written in the llm.c manner: `Engine::forward_device` is the whole network as a plain list of
//! kernel calls, one line per step of the architecture (SPEC-model.md), on any `Backend` (GPU or interpreter).
//!
//! Precision follows `reference::model` with `RoundingMode::Bf16Activations` and absorbed attention: every tensor
//! the reference rounds to bf16 is a bf16 buffer here; the router and logits are f32. Two places round more than the
//! reference: the routed and shared experts' SwiGLU activations are stored in bf16 between the up and down GEMMs
//! (the reference keeps them f32), and the GEMMs accumulate in a different order. The engine tests bound the
//! resulting logit differences and require identical greedy tokens.
//!
//! Weights: the attention linears, the output head and the shared expert run through the dense path of the
//! grouped GEMM (`kernels::dense::linear`) in the checkpoint's own format (bf16, or FP8 with the GEMM's FP8 path), so
//! the device sees exactly the values the reference dequantises; routed experts are repacked per format by
//! `quant::repack`, one layer at a time while streaming (host memory holds one layer's experts at most).
//!
//! MLA's absorbed products are per head: `q_lat_h = q_nope_h . W_UK_h` and `out_h = W_UV_h . o_lat_h`, each one
//! batched launch for all heads (`kernels::dense::linear_per_head`: the heads' matrices stacked, grid z = head); W_UK_h
//! is stored transposed ([kv_lora_rank, qk_nope]) so both are `y = x W^T`. The attention kernel reads the rope half
//! of each query head in place (a strided `q_rope`), where the RoPE kernel rotated it.
//!
//! Expert parallelism: a rank owns a contiguous share of the experts ([`Shard`]); the router's expert map
//! drops the other pairs, the per-pair f32 outputs of non-local pairs are zero, and one f32 all-reduce of the
//! per-pair outputs gives every rank all pairs before the deterministic combine, so any number of ranks computes
//! bit-identical results to one rank. (The all-reduce is stream-ordered with NCCL; the thread test double copies
//! through host memory and so synchronises.)
//!
//! Tensor parallelism of attention ([`AttentionSplit::TensorParallel`], as vLLM splits MLA): a rank also owns a
//! contiguous share of the query heads, i.e. its heads' rows of `wq_b`, their W_UK / W_UV (from `wkv_b`) and their
//! input columns of `wo`. The latent path (`wq_a`, `wkv_a_with_mqa`, the norms, the rope'd k_pe) and the paged latent
//! cache stay whole on every rank: MLA's latent is shared by all heads, so it cannot be split by head. Each rank runs
//! the attention on its heads and its `wo` slice into an f32 partial sum, one f32 all-reduce adds the partials, and
//! the sum is rounded to bf16 once (where one rank rounds its whole `wo` output). The partials are added in another
//! order than one GEMM adds them, so results may differ from one rank in the last bits of the attention output.
//!
//! A tour on the interpreter with the tiny checkpoint: load with progress, the layer-level logits of a sequence, then
//! requests through the batch (text to completion; one with an image, cancelled).
//!
//! ```
//! use small4::model::checkpoint::{Checkpoint, Layout};
//! use small4::model::engine::{DeviceModel, Engine, EngineOptions, FinishReason, LoadProgress, Request, RequestId, Sampling, Shard, StepToken, DEFAULT_EOS};
//! use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
//! use small4::model::PixelImage;
//! use small4::quant::WeightFormat;
//!
//! let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?)?;
//! let device = small4::device::simulator();
//! let mut progress = Vec::new();
//! let model = DeviceModel::load_with_progress(&device, &checkpoint, Shard::SINGLE, |p| progress.push(p))?;
//! let (layers, vocab) = (model.config().n_layers, model.config().vocab);
//! // One report per decoder layer, then one for the embeddings and the head.
//! assert_eq!(progress.len(), layers + 1);
//! assert_eq!(progress.last(), Some(&LoadProgress { done: layers + 1, total: layers + 1 }));
//! let v = model.vision().expect("the tiny preset has a vision tower").config().clone();
//!
//! // The default stops at </s>; no stop token here, so every request runs to max_tokens.
//! assert_eq!(EngineOptions::default().eos, Some(DEFAULT_EOS));
//! let mut engine = Engine::new(model, EngineOptions { eos: None, ..EngineOptions::default() }, None)?;
//!
//! // Layer-level view: the logits of every token of a sequence, [tokens, vocab].
//! let seq = engine.new_sequence();
//! let logits = engine.forward_logits(&[(seq, vec![1, 300, 301])])?;
//! assert_eq!(logits.len(), 3 * vocab);
//! let last = &logits[2 * vocab..];
//! let greedy = (0..vocab).fold(0, |best, i| if last[i] > last[best] { i } else { best }) as u32;
//!
//! // The same prompt as a request: its first greedy token is the argmax of those last logits.
//! let text = engine.add(Request { prompt: vec![1, 300, 301], max_tokens: 2, sampling: Sampling::Greedy })?;
//! let first: Vec<StepToken> = engine.step()?;
//! assert_eq!((first.len(), first[0].id, first[0].token, first[0].finished), (1, text, greedy, None));
//!
//! // A 28x28 image is one merged feature: the prompt holds one [IMG] for it (its features replace that embedding at
//! // the request's prefill; `generator::Generator` runs one through).
//! let image = PixelImage { width: 28, height: 28, channels: 3, data: vec![0.25; 3 * 28 * 28] };
//! let prompt = vec![1, v.image_token_id, v.image_end_token_id, 300];
//! let pictured = engine.add_with_images(Request { prompt, max_tokens: 1, sampling: Sampling::Greedy }, vec![image.clone()])?;
//! assert_eq!((text, pictured, engine.active()), (RequestId(0), RequestId(1), 2)); // handles in increasing order
//! // An image with no [IMG] slot in the prompt is a typed error, and the request is not added:
//! let no_slot = Request { prompt: vec![1, 300], max_tokens: 1, sampling: Sampling::Greedy };
//! assert!(matches!(engine.add_with_images(no_slot, vec![image]), Err(small4::Error::Shape { .. })));
//! // A cancelled request leaves at once (its pages freed); cancelling it again is an error.
//! engine.cancel(pictured)?;
//! assert!(engine.cancel(pictured).is_err());
//! assert_eq!(engine.active(), 1);
//!
//! // The text request's second token is its last.
//! let second = engine.step()?;
//! assert_eq!((second.len(), second[0].id, second[0].finished), (1, text, Some(FinishReason::MaxTokens)));
//! assert!((second[0].token as usize) < vocab && second[0].logits.is_none()); // keep_logits is off
//! assert_eq!(engine.active(), 0);
//! # Ok::<(), small4::Error>(())
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use half::bf16;
use safetensors::Dtype;

use crate::device::collective::Collective;
use crate::device::{Device, DeviceBuffer, Graph};
use crate::kernels::attention::{self, AttentionScratch, BlockTables, CacheWriteWeights, PagedCache, Queries, QueryLatentNorm, QueryLayout, TokenSlots};
use crate::kernels::dense;
use crate::kernels::gemm::{self, DeviceWeights, RowCounters};
use crate::kernels::moe::{self, Fp8ActScales, Grouping, MoeLayerWeights, MoeWorkspace, RoutingBuffers};
use crate::kernels::moe_wgmma::PrefillGemm;
use crate::kernels::moe_wgmma_fp8::{self, Fp8ActScratch};
use crate::kernels::norm::{self, ResidualNorm};
use crate::kernels::ops::{self, GatherStatus, QueryScale, SamplingInputs};
use crate::kernels::router::{self, ExpertMap, RouterConfig, RouterWorkspace, Routing};
use crate::kernels::synth;
use crate::kernels::vision::{self as vision_kernels, RowTargets};
use crate::model::checkpoint::{Checkpoint, ExpertMatrix};
use crate::model::decode_prefetch::LayerPrefetch;
use crate::model::kv_cache::{CacheDescriptor, CacheDtype, KvCache, SeqId};
use crate::model::synth::{SyntheticModel, TensorKind, TensorSpec};
use crate::model::vision::DeviceVisionTower;
use crate::model::ModelConfig;
use crate::quant::repack::{repack_gate_up, repack_linear, repack_row_concat, MatrixRef};
use crate::quant::{Fp8Block128, Fp8PerTensor, QuantizedMatrix, WeightFormat};
use crate::reference::rope::yarn_inv_freq;
use crate::reference::vision::{check_image_slots, PixelImage};
use crate::{Error, Result};

/// End of sequence of the Mistral tokenizers (tekken `</s>`).
pub const DEFAULT_EOS: u32 = 2;

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
    fn partial_attention_output(&self) -> bool {
        self.attention == AttentionSplit::TensorParallel && self.world > 1
    }
}

/// The weights of one decoder layer on the device.
struct DeviceLayer {
    attention_norm: DeviceBuffer<bf16>,
    /// `wq_a` and `wkv_a_with_mqa` stacked ([q_lora_rank + kv_lora_rank + rope, dim]): both read the normed input,
    /// so one GEMM computes `[q_a | kv]`.
    wqkv_a: DeviceWeights,
    q_a_norm: DeviceBuffer<bf16>,
    /// The rank's heads' rows, [local heads * (nope + rope), q_lora_rank].
    wq_b: DeviceWeights,
    kv_a_norm: DeviceBuffer<bf16>,
    /// The local heads' W_UK_h transposed, [kv_lora_rank, qk_nope] each, one matrix per head (`linear_per_head`).
    w_uk: DeviceWeights,
    /// The local heads' W_UV_h [v_head, kv_lora_rank], one matrix per head.
    w_uv: DeviceWeights,
    /// The local heads' input columns, [dim, local heads * v_head].
    wo: DeviceWeights,
    ffn_norm: DeviceBuffer<bf16>,
    /// Router [experts, dim].
    gate: DeviceBuffer<bf16>,
    /// This rank's routed experts and the (replicated) shared expert.
    moe: MoeLayerWeights,
    /// The routed experts' static activation scales (per-tensor FP8 checkpoints with `qscale_act`), for
    /// `EngineOptions::fp8_activations`.
    fp8_act_scales: Option<Fp8ActScales>,
}

/// A checkpoint uploaded to a device in the kernels' layouts.
pub struct DeviceModel {
    config: ModelConfig,
    device: Device,
    shard: Shard,
    /// The query heads this rank computes (`Shard::heads`).
    heads: std::ops::Range<usize>,
    tok_embeddings: DeviceBuffer<bf16>,
    layers: Vec<DeviceLayer>,
    norm: DeviceBuffer<bf16>,
    output: DeviceWeights,
    inv_freq: DeviceBuffer<f32>,
    expert_map: ExpertMap,
    /// The vision tower and projector, when the configuration has one.
    vision: Option<DeviceVisionTower>,
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

/// How a request picks its tokens.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sampling {
    /// The highest logit (the lowest id among ties).
    Greedy,
    /// Temperature + top-p with a seed: the samples depend on (seed, step) only, not on the batch.
    Seeded {
        /// Divides the logits before the softmax; finite and at least 0 (0 picks greedily).
        temperature: f32,
        /// Probability mass of the most likely tokens kept (nucleus), in (0, 1]; 1 keeps every token.
        top_p: f32,
        /// The request's seed.
        seed: u64,
    },
}

impl Sampling {
    /// Checks the settings: `Error::InvalidArgument` for a temperature that is not finite or is below 0, or a top-p
    /// outside (0, 1] (NaN included). [`Engine::add`] and `small4 generate` refuse such settings with this error.
    ///
    /// ```
    /// use small4::model::engine::Sampling;
    ///
    /// let seeded = |temperature, top_p| Sampling::Seeded { temperature, top_p, seed: 7 };
    /// assert!(Sampling::Greedy.validate().is_ok());
    /// assert!(seeded(0.7, 0.9).validate().is_ok() && seeded(0.0, 1.0).validate().is_ok());
    /// for bad in [seeded(f32::NAN, 1.0), seeded(f32::INFINITY, 1.0), seeded(-0.5, 1.0), seeded(1.0, 0.0), seeded(1.0, 5.0), seeded(1.0, f32::NAN)] {
    ///     assert!(matches!(bad.validate(), Err(small4::Error::InvalidArgument(_))), "{bad:?}");
    /// }
    /// ```
    pub fn validate(&self) -> Result<()> {
        let Sampling::Seeded { temperature, top_p, .. } = *self else { return Ok(()) };
        if !(temperature.is_finite() && temperature >= 0.0) {
            return Err(Error::InvalidArgument(format!("sampling temperature {temperature}: must be finite and at least 0")));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::InvalidArgument(format!("sampling top_p {top_p}: must be in (0, 1]")));
        }
        Ok(())
    }
}

/// A generation request.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt token ids, non-empty and below the vocabulary size.
    pub prompt: Vec<u32>,
    /// Tokens to generate at most: at least 1, and the prompt plus these must fit the model's positions
    /// (`ModelConfig::max_position`).
    pub max_tokens: usize,
    /// How each token is picked.
    pub sampling: Sampling,
}

impl Request {
    /// Checks the request against a model before anything runs: `Error::InvalidArgument` for an empty prompt,
    /// `max_tokens` 0 or invalid sampling settings ([`Sampling::validate`]); `Error::OutOfRange` for a token id at or
    /// above the vocabulary size, or a last generated token whose position would reach `config.max_position` (the
    /// prompt's tokens take positions `0..prompt.len()`, the generated ones the next `max_tokens`).
    ///
    /// ```
    /// use small4::model::engine::{Request, Sampling};
    /// use small4::model::ModelConfig;
    /// use small4::Error;
    ///
    /// let config = ModelConfig::tiny();
    /// let request = |prompt: Vec<u32>, max_tokens| Request { prompt, max_tokens, sampling: Sampling::Greedy };
    /// request(vec![1, 300], 16).validate(&config)?;
    /// assert!(matches!(request(vec![], 16).validate(&config), Err(Error::InvalidArgument(_))));
    /// assert!(matches!(request(vec![1, 300], 0).validate(&config), Err(Error::InvalidArgument(_))));
    /// assert!(matches!(request(vec![1, config.vocab as u32], 1).validate(&config), Err(Error::OutOfRange { .. })));
    /// // The last position the request may reach is max_position - 1.
    /// request(vec![1, 300], config.max_position - 2).validate(&config)?;
    /// match request(vec![1, 300], config.max_position - 1).validate(&config) {
    ///     Err(Error::OutOfRange { index, limit, .. }) => assert_eq!((index, limit), (config.max_position as i64, config.max_position as i64)),
    ///     other => panic!("expected OutOfRange, got {other:?}"),
    /// }
    /// assert!(request(vec![1, 300], usize::MAX).validate(&config).is_err()); // no overflow
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn validate(&self, config: &ModelConfig) -> Result<()> {
        if self.prompt.is_empty() {
            return Err(Error::InvalidArgument("empty prompt".into()));
        }
        if self.max_tokens == 0 {
            return Err(Error::InvalidArgument("max_tokens is 0: a request generates at least one token".into()));
        }
        if let Some(&bad) = self.prompt.iter().find(|&&t| t as usize >= config.vocab) {
            return Err(Error::OutOfRange { what: "prompt token id".into(), index: bad as i64, limit: config.vocab as i64 });
        }
        let last_position = (self.prompt.len() - 1).saturating_add(self.max_tokens);
        if last_position >= config.max_position {
            return Err(Error::OutOfRange {
                what: format!("position of the last generated token ({} prompt + {} generated tokens)", self.prompt.len(), self.max_tokens),
                index: i64::try_from(last_position).unwrap_or(i64::MAX),
                limit: config.max_position as i64,
            });
        }
        self.sampling.validate()
    }
}

/// An engine's handle on a request, assigned by [`Engine::add`] in increasing order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub u64);

/// Why a request left the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It generated the stop token (`EngineOptions::eos`), which is its last token.
    Eos,
    /// It generated `Request::max_tokens` tokens.
    MaxTokens,
}

/// One generated token of one request.
#[derive(Clone, Debug)]
pub struct StepToken {
    /// The request it belongs to.
    pub id: RequestId,
    /// The token id.
    pub token: u32,
    /// Set on the request's last token (the request has left the batch).
    pub finished: Option<FinishReason>,
    /// The f32 logits the token was chosen from, when `EngineOptions::keep_logits`.
    pub logits: Option<Vec<f32>>,
}

/// The experts every layer routed each token of a step to ([`Engine::last_routing`], with
/// `EngineOptions::record_routing`): what a teacher-forced comparison gives the CPU reference
/// (`ReferenceModel::forward_routed`), so that a router near-tie cannot make the two run different experts.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRouting {
    /// Experts per token.
    pub k: usize,
    /// The step's sequences in batch order and the rows of their tokens: the request of each (None in a batch of
    /// [`Engine::forward_logits`], whose order is the caller's).
    pub sequences: Vec<(Option<RequestId>, std::ops::Range<usize>)>,
    /// Per layer, `[tokens, k]` global expert ids of the step's tokens, best first (the router's `topk_ids`).
    pub ids: Vec<Vec<i32>>,
}

impl StepRouting {
    /// Per layer, the ids of the tokens `rows` (`[rows.len(), k]`), the form `ReferenceModel::forward_routed` takes;
    /// `Error::OutOfRange` past the step's tokens.
    ///
    /// ```
    /// use small4::model::engine::{RequestId, StepRouting};
    ///
    /// // Two layers, k = 2, a step of two requests: request 7 fed 1 token, request 3 fed 2.
    /// let routing = StepRouting {
    ///     k: 2,
    ///     sequences: vec![(Some(RequestId(7)), 0..1), (Some(RequestId(3)), 1..3)],
    ///     ids: vec![vec![0, 1, 2, 3, 4, 5], vec![10, 11, 12, 13, 14, 15]],
    /// };
    /// assert_eq!(routing.rows(1..3)?, [vec![2, 3, 4, 5], vec![12, 13, 14, 15]]);
    /// assert_eq!(routing.of_request(RequestId(7)), Some(vec![vec![0, 1], vec![10, 11]]));
    /// assert_eq!(routing.of_request(RequestId(1)), None);
    /// assert!(routing.rows(2..4).is_err());
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn rows(&self, rows: std::ops::Range<usize>) -> Result<Vec<Vec<i32>>> {
        let tokens = self.ids.first().map_or(0, |ids| ids.len() / self.k.max(1));
        if rows.start > rows.end || rows.end > tokens {
            return Err(Error::OutOfRange { what: "routing rows".into(), index: rows.end as i64, limit: tokens as i64 });
        }
        Ok(self.ids.iter().map(|ids| ids[rows.start * self.k..rows.end * self.k].to_vec()).collect())
    }

    /// [`StepRouting::rows`] of `request`'s tokens in the step; None when it was not in the step.
    pub fn of_request(&self, request: RequestId) -> Option<Vec<Vec<i32>>> {
        let (_, rows) = self.sequences.iter().find(|(id, _)| *id == Some(request))?;
        self.rows(rows.clone()).ok()
    }
}

/// How an [`Engine`] sizes its cache and runs its steps. The default: pages of `DEFAULT_PAGE_SIZE` tokens, 64 pages,
/// a bf16 cache, [`DEFAULT_EOS`] as the stop token, graphs on, no logits read back, bf16 activations.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Tokens per cache page and pages in the pool (shared by all sequences; every layer has its own pages).
    pub page_size: usize,
    /// Pages in the pool: the cache holds at most `num_pages * page_size` tokens over all sequences.
    pub num_pages: usize,
    /// Element type of the latent KV cache.
    pub cache_dtype: CacheDtype,
    /// Stop token; None generates to `max_tokens`.
    pub eos: Option<u32>,
    /// Read back each generated token's logits (tests).
    pub keep_logits: bool,
    /// Forced KV split count of the attention (None: the kernel's heuristic).
    pub attention_splits: Option<usize>,
    /// Replay decode steps (every request adding one token) as captured graphs: a CUDA graph on a GPU (one launch
    /// for the whole network instead of 14 per layer), the recorded launch list on the interpreter. One graph per
    /// (batch size, block-table capacity in pages, a power of two); the first step of a shape runs eagerly, the next
    /// one captures. Off, or on a backend without graphs, or with a collective, every step runs eagerly.
    pub graphs: bool,
    /// Routed experts in W8A8: e4m3 activations with the checkpoint's static scales (`qscale_act`) on the e4m3
    /// tensor cores. Needs per-tensor FP8 experts with activation scales; the shared expert stays bf16.
    pub fp8_activations: bool,
    /// Token budget of a step (chunked prefill): decode tokens first, then prompt chunks fill what is left, so a
    /// long prompt is prefilled over several steps beside the other sequences' decode tokens and the activation
    /// workspace is sized by this budget, never by a prompt. A prompt with images is prefilled in one step.
    pub prefill_chunk: usize,
    /// Decode graphs kept (one per batch size and table capacity); the least recently used is dropped past this.
    pub max_decode_graphs: usize,
    /// Keep every layer's expert choice of each step for [`Engine::last_routing`] (tests, diagnostics): one device
    /// copy of the router's ids per layer, and every step runs eagerly (a captured graph holds launches only). Off,
    /// nothing is copied and the steps are as without it.
    pub record_routing: bool,
    /// Decode steps (up to 8 tokens) prefetch weights into L2: the latency-bound launches pull the next DRAM-bound
    /// GEMM's weights ([`crate::model::decode_prefetch`]: wo's during the absorption and attention launches; the
    /// router's share is none at present), and the dense decode GEMMs (and the shared expert) ask for the rest of
    /// their own k range before their programmatic wait (`DeviceWeights::set_decode_own_prefetch`, set on the
    /// model's weights by [`Engine::new`]). Off: neither. A hint: the same tokens and logits either way.
    pub l2_prefetch: bool,
}

/// The default step token budget: 2048 tokens keep a prefill step's GEMMs on the tensor cores' efficient side on
/// an H100 while its activations stay small (a 2048-token step's MoE pair outputs are 128 MiB).
pub const DEFAULT_PREFILL_CHUNK: usize = 2048;

impl EngineOptions {
    /// The options that give the engine the KV-cache pool a memory plan leaves on its GPU (`small4 plan`): as many
    /// pages of `page_size` tokens as `gpu.kv_capacity_tokens` holds, the plan's step budget and cache element size.
    /// `Error::InvalidArgument` for a page size of 0 or a plan whose cache element is neither 2 (bf16) nor 1 (fp8)
    /// bytes (an fp8 cache takes scale 1; set `cache_dtype` for another).
    ///
    /// ```
    /// use small4::model::engine::EngineOptions;
    /// use small4::model::plan::{plan, FormatChoice, GpuSpec, Workload};
    /// use small4::model::ModelConfig;
    ///
    /// let workload = Workload::default();
    /// let p = plan(&ModelConfig::mistral_small_4(), "nvfp4", GpuSpec::H100_80GB, 1, FormatChoice::NVFP4_EXPERTS, workload)?;
    /// let options = EngineOptions::from_plan(&p.gpus[0], &workload, 64)?;
    /// assert!(options.max_context_tokens() >= 256 * 1024); // the model's full context fits one H100
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn from_plan(gpu: &crate::model::plan::GpuPlan, workload: &crate::model::plan::Workload, page_size: usize) -> Result<Self> {
        if page_size == 0 {
            return Err(Error::InvalidArgument("from_plan: page size 0".into()));
        }
        let cache_dtype = match workload.kv_bytes_per_value {
            2 => CacheDtype::Bf16,
            1 => CacheDtype::Fp8E4m3 { scale: 1.0 },
            other => return Err(Error::InvalidArgument(format!("from_plan: {other}-byte cache elements"))),
        };
        let num_pages = usize::try_from(gpu.kv_capacity_tokens / page_size as u64).map_err(|_| Error::InvalidArgument("from_plan: too many pages".into()))?;
        Ok(EngineOptions { page_size, num_pages, cache_dtype, prefill_chunk: workload.prefill_chunk_tokens, ..EngineOptions::default() })
    }

    /// Tokens the page pool holds (over all sequences): the longest context one sequence can reach.
    pub fn max_context_tokens(&self) -> usize {
        self.num_pages * self.page_size
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            page_size: crate::model::kv_cache::DEFAULT_PAGE_SIZE,
            num_pages: 64,
            cache_dtype: CacheDtype::Bf16,
            eos: Some(DEFAULT_EOS),
            keep_logits: false,
            attention_splits: None,
            graphs: true,
            fp8_activations: false,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            max_decode_graphs: 8,
            record_routing: false,
            l2_prefetch: true,
        }
    }
}

/// Tokens of pages a decoding sequence takes ahead when its pages are full (fewer when its request ends sooner).
const DECODE_RESERVE_TOKENS: usize = 1024;

/// Activations of one forward pass over `tokens` tokens, allocated once per batch size and reused (a CUDA graph
/// replays over fixed buffers).
struct Workspace {
    tokens: usize,
    ids: DeviceBuffer<i32>,
    positions: DeviceBuffer<i32>,
    /// Residual stream, ping-ponged by the fused add + norm: x[0] holds it at the start of every layer.
    x: [DeviceBuffer<bf16>; 2],
    /// Normed input of the current block.
    h: DeviceBuffer<bf16>,
    /// `[tokens, q_lora_rank + kv_lora_rank + rope]`: `[q_a | kv]`, the stacked GEMM's output; the cache writer
    /// reads the kv columns (the wkv_a_with_mqa output).
    qkv_a: DeviceBuffer<bf16>,
    q_a_normed: DeviceBuffer<bf16>,
    /// `[tokens, local heads, nope + rope]`
    q: DeviceBuffer<bf16>,
    q_lat: DeviceBuffer<bf16>,
    o_lat: DeviceBuffer<bf16>,
    /// `[tokens, local heads * v_head]`
    attn: DeviceBuffer<bf16>,
    /// `[tokens, dim]`: wo's output, then the MoE block's.
    block_out: DeviceBuffer<bf16>,
    /// Tensor-parallel attention over 2+ ranks: where the partial `wo` outputs are summed.
    attention_sum: Option<AttentionSum>,
    router: RouterWorkspace,
    routing: Routing,
    moe: MoeWorkspace,
    /// One zero counter per token for the GEMMs that finish their rows in the same launch (the latent projection, wo,
    /// the experts' down projection: one GPU).
    row_counters: RowCounters,
    /// Where the fp8-activation prefill GEMMs (`PrefillGemm::WgmmaFp8Act`) quantise their inputs: sized here for the
    /// largest of the batch's fp8 GEMMs when that choice is in force, grown by a launch that needs more otherwise.
    /// `Network::run` passes it to each dense GEMM launch; `moe.fp8_act` holds it for the MoE launches.
    fp8_act: Arc<Fp8ActScratch>,
}

/// The f32 buffer a tensor-parallel rank's `wo` writes its partial sum into, all-reduced across the ranks, and the
/// ids that let the MoE combine kernel round it to bf16: with one "pair" per token and expert 0 valid, the combine
/// computes `out[t] = bf16(sum[t])`, the single rounding one rank applies to its whole `wo` output.
struct AttentionSum {
    /// `[tokens, dim]`
    sum: DeviceBuffer<f32>,
    /// `[tokens]` zeros.
    one_pair_ids: DeviceBuffer<i32>,
}

/// Which rows the output head runs over.
#[derive(Clone, Copy, PartialEq, Eq)]
enum HeadRows {
    /// Each sequence's last token (a step: only those rows are sampled).
    Last,
    /// Every token (`Engine::forward_logits`, for the tests' comparison with the reference).
    All,
}

/// The output head's rows and results: `rows` rows of the final norm's output gathered in batch order, their f32
/// logits and the chosen ids. Sized by the rows (sequences in a step), not by the tokens: a 2048-token prefill of one
/// sequence computes one row of logits (131072 x 4 bytes), not 2048 of them (1 GiB at the model's vocabulary).
struct Head {
    rows: usize,
    /// Row of the final norm's output each head row reads.
    source_rows: DeviceBuffer<i32>,
    h: DeviceBuffer<bf16>,
    logits: DeviceBuffer<f32>,
    next: DeviceBuffer<i32>,
}

impl Head {
    fn new(model: &DeviceModel, rows: usize) -> Result<Self> {
        let (c, d) = (&model.config, &model.device);
        Ok(Head {
            rows,
            source_rows: DeviceBuffer::alloc(d, rows)?,
            h: DeviceBuffer::alloc(d, rows * c.dim)?,
            logits: DeviceBuffer::alloc(d, rows * c.vocab)?,
            next: DeviceBuffer::alloc(d, rows)?,
        })
    }
}

impl Workspace {
    fn new(model: &DeviceModel, tokens: usize) -> Result<Self> {
        let (c, d) = (&model.config, &model.device);
        let bf = |len: usize| DeviceBuffer::<bf16>::alloc(d, len);
        let local = model.expert_map.local_experts();
        let tile_m = moe::moe_tile_m(tokens, c.experts_per_token, local);
        let routing = Routing::alloc(d, tokens, c.experts_per_token, local, tile_m)?;
        let fp8_act = fp8_act_scratch(model, tokens, routing.alignment.max_padded)?;
        // The MoE launches quantise into the same scratch as the dense ones.
        let moe = MoeWorkspace {
            fp8_act: Some(fp8_act.clone()),
            ..MoeWorkspace::new(d, &model.layers[0].moe, tokens, c.experts_per_token, routing.alignment.max_padded)?
        };
        let heads = model.heads.len();
        let latent_rows = tokens * heads;
        let attention_sum = if model.shard.partial_attention_output() {
            Some(AttentionSum { sum: DeviceBuffer::alloc(d, tokens * c.dim)?, one_pair_ids: DeviceBuffer::from_slice(d, &vec![0i32; tokens])? })
        } else {
            None
        };
        Ok(Workspace {
            tokens,
            ids: DeviceBuffer::alloc(d, tokens)?,
            positions: DeviceBuffer::alloc(d, tokens)?,
            x: [bf(tokens * c.dim)?, bf(tokens * c.dim)?],
            h: bf(tokens * c.dim)?,
            qkv_a: bf(tokens * (c.q_lora_rank + c.kv_lora_rank + c.qk_rope))?,
            q_a_normed: bf(tokens * c.q_lora_rank)?,
            q: bf(latent_rows * c.qk_head_dim())?,
            q_lat: bf(latent_rows * c.kv_lora_rank)?,
            o_lat: bf(latent_rows * c.kv_lora_rank)?,
            attn: bf(tokens * heads * c.v_head)?,
            block_out: bf(tokens * c.dim)?,
            attention_sum,
            router: RouterWorkspace::new(d, tokens, c.experts, c.dim)?,
            routing,
            moe,
            row_counters: RowCounters::new(d, tokens)?,
            fp8_act,
        })
    }
}

/// The scratch of the fp8-activation GEMMs for a batch of `tokens` tokens whose grouping holds `slots` slots:
/// reserved for the largest input among the GEMMs that kernel serves (the fp8 attention projections and shared
/// expert over the tokens, the routed experts' up over the tokens and down over the slots) when
/// `PrefillGemm::WgmmaFp8Act` is chosen, empty otherwise.
fn fp8_act_scratch(model: &DeviceModel, tokens: usize, slots: usize) -> Result<Arc<Fp8ActScratch>> {
    let scratch = Arc::new(Fp8ActScratch::new(&model.device));
    if PrefillGemm::current()? != PrefillGemm::WgmmaFp8Act {
        return Ok(scratch);
    }
    // (rows, k) of each launch: the dense ones of one matrix, and the grouped ones (one launch over all experts).
    let mut inputs: Vec<(usize, usize)> = Vec::new();
    for layer in &model.layers {
        let shared = layer.moe.shared.iter().flat_map(|(up, down)| [up, down]);
        for w in [&layer.wqkv_a, &layer.wq_b, &layer.wo].into_iter().chain(shared) {
            if moe_wgmma_fp8::serves(w.format, w.experts, w.k_dim) {
                inputs.push((tokens, w.k_dim));
            }
        }
        for (w, rows) in [(&layer.moe.gate_up, tokens), (&layer.moe.down, slots)] {
            if moe_wgmma_fp8::serves(w.format, 1, w.k_dim) {
                inputs.push((rows, w.k_dim));
            }
        }
    }
    if let Some(&(rows, k_dim)) = inputs.iter().max_by_key(|(rows, k_dim)| rows * k_dim) {
        scratch.reserve(rows, k_dim)?;
    }
    Ok(scratch)
}

/// The buffers of a decode step of one shape, fixed so that a captured graph can replay over them: the step's
/// inputs are written into them before every run, and nothing in the network allocates or reads back.
struct DecodeGraph {
    workspace: Workspace,
    head: Head,
    tables: BlockTables,
    layout: QueryLayout,
    slots: TokenSlots,
    scratch: AttentionScratch,
    /// Eager runs so far; the graph is recorded at the shape's second step (the first sizes everything).
    eager_runs: usize,
    graph: Option<Graph>,
    /// The ids the workspace holds for the next step when a `decode_advance` wrote them there (the tokens sampled
    /// last step, in batch order): a step whose ids are these uploads nothing.
    ids_on_device: Option<Vec<i32>>,
    /// The engine's step count when the graph last ran (the least recently used graph is dropped first).
    last_used: u64,
}

/// One request's part of a step: the tokens fed, and whether the step samples its next token (a decode token, or
/// the chunk that ends its prompt).
struct Scheduled {
    id: RequestId,
    tokens: Vec<u32>,
    samples: bool,
}

/// A step's tokens laid out by the host: ids, positions, each token's batch row, and the first token of each
/// sequence (`q_start`, one entry more than sequences).
struct StepLayout {
    ids: Vec<i32>,
    positions: Vec<i32>,
    token_seq: Vec<i32>,
    q_start: Vec<i32>,
}

/// What the network reads besides a step's buffers: the weights, the caches and the options. Its `run` only
/// launches kernels (no allocation, no copy), so a decode step's run can be captured as a graph.
struct Network<'a> {
    model: &'a DeviceModel,
    caches: &'a [PagedCache],
    options: &'a EngineOptions,
    collective: Option<&'a dyn Collective>,
    gather_status: &'a GatherStatus,
    /// `EngineOptions::record_routing`: where each layer's router ids are copied (`[layers, tokens, k]`).
    routing_record: Option<&'a DeviceBuffer<i32>>,
}

/// A prefill's image features and the `[IMG]` rows of the step they replace after the embedding gather.
struct ImageRows<'a> {
    features: &'a DeviceBuffer<bf16>,
    rows: &'a RowTargets,
}

/// The shape a decode graph serves: sequences in the batch, pages per block-table row (a power of two).
type DecodeShape = (usize, usize);

/// Where the last step's outputs are.
#[derive(Clone, Copy)]
enum LastStep {
    Eager,
    Decode(DecodeShape),
}

/// A request in the batch.
struct Active {
    seq: SeqId,
    request: Request,
    /// The images whose features replace the prompt's `[IMG]` embeddings at the prefill.
    images: Vec<PixelImage>,
    /// Tokens to feed at the next step: the prompt before the prefill, then the last generated token.
    pending: Vec<u32>,
    generated: usize,
}

/// Prefill and decode over the paged cache for a changing batch of requests.
///
/// ```no_run
/// use small4::model::checkpoint::Checkpoint;
/// use small4::model::engine::{DeviceModel, Engine, EngineOptions, Shard, Request, Sampling};
///
/// let device = small4::device::gpu()?;
/// let model = DeviceModel::load(&device, &Checkpoint::open("/models/Mistral-Small-4")?, Shard::SINGLE)?;
/// let mut engine = Engine::new(model, EngineOptions::default(), None)?;
/// let tokens = engine.generate(vec![Request { prompt: vec![1, 22177], max_tokens: 16, sampling: Sampling::Greedy }], |_| {})?;
/// println!("{:?}", tokens[0]);
/// # Ok::<(), small4::Error>(())
/// ```
/// It runs on the interpreter as well (`small4::device::simulator()`): [`crate::model::generator::Generator`] shows it
/// with the tiny model.
pub struct Engine {
    model: DeviceModel,
    options: EngineOptions,
    kv: KvCache,
    /// One paged cache per layer; all layers share the block tables.
    caches: Vec<PagedCache>,
    collective: Option<Box<dyn Collective>>,
    scratch: AttentionScratch,
    workspace: Option<Workspace>,
    head: Option<Head>,
    decode_graphs: BTreeMap<DecodeShape, DecodeGraph>,
    /// Whether the backend captured a graph when first asked (false after a refusal: eager from then on).
    graphs_supported: bool,
    last_step: LastStep,
    gather_status: GatherStatus,
    active: BTreeMap<RequestId, Active>,
    next_id: u64,
    /// Steps run so far.
    steps: u64,
    /// With `EngineOptions::record_routing`: every layer's router ids of the last forward pass (`[layers, tokens,
    /// k]`), and its sequences (`StepRouting::sequences`) once the pass succeeded.
    routing_record: Option<DeviceBuffer<i32>>,
    recorded_sequences: Option<Vec<(Option<RequestId>, std::ops::Range<usize>)>>,
}

impl Engine {
    /// An engine over `model`; `collective` joins the ranks of expert (and tensor) parallelism (every rank runs the
    /// same requests in the same order). `Error::InvalidArgument` when the collective's rank and world differ from
    /// the model's shard (or a multi-rank shard has none), or `fp8_activations` is asked of experts without static
    /// FP8 activation scales; errors of the cache descriptor for a bad page size or count.
    pub fn new(mut model: DeviceModel, options: EngineOptions, collective: Option<Box<dyn Collective>>) -> Result<Self> {
        if let Some(col) = &collective {
            let shard = model.shard;
            if (col.rank(), col.world_size()) != (shard.rank, shard.world) {
                return Err(Error::InvalidArgument(format!("collective rank {} of {} but model shard {shard:?}", col.rank(), col.world_size())));
            }
        } else if model.shard.world != 1 {
            return Err(Error::InvalidArgument(format!("model shard {:?} needs a collective", model.shard)));
        }
        for (l, layer) in model.layers.iter_mut().enumerate() {
            let scales = match (options.fp8_activations, layer.fp8_act_scales) {
                (false, _) => None,
                (true, Some(scales)) => Some(scales),
                (true, None) => {
                    return Err(Error::InvalidArgument(format!(
                        "fp8 activations: layer {l}'s routed experts are not per-tensor FP8 with activation scales (qscale_act)"
                    )))
                }
            };
            layer.moe.set_fp8_activations(scales)?;
            // The dense decode GEMMs' own-range L2 prefetch follows the decode step's prefetch switch.
            for w in [&mut layer.wqkv_a, &mut layer.wq_b, &mut layer.w_uk, &mut layer.w_uv, &mut layer.wo] {
                w.set_decode_own_prefetch(options.l2_prefetch);
            }
            if let Some((gate_up, down)) = &mut layer.moe.shared {
                gate_up.set_decode_own_prefetch(options.l2_prefetch);
                down.set_decode_own_prefetch(options.l2_prefetch);
            }
        }
        model.output.set_decode_own_prefetch(options.l2_prefetch);
        if options.prefill_chunk == 0 || options.max_decode_graphs == 0 {
            return Err(Error::InvalidArgument(format!(
                "engine options: prefill_chunk {} and max_decode_graphs {} must be at least 1",
                options.prefill_chunk, options.max_decode_graphs
            )));
        }
        let desc = CacheDescriptor::mla(options.num_pages, options.page_size, options.cache_dtype)?;
        let caches = (0..model.config.n_layers).map(|_| PagedCache::new(&model.device, desc)).collect::<Result<_>>()?;
        Ok(Engine {
            kv: KvCache::new(desc)?,
            caches,
            collective,
            scratch: AttentionScratch::new(&model.device),
            workspace: None,
            head: None,
            decode_graphs: BTreeMap::new(),
            graphs_supported: true,
            last_step: LastStep::Eager,
            gather_status: GatherStatus::new(&model.device)?,
            active: BTreeMap::new(),
            next_id: 0,
            steps: 0,
            routing_record: None,
            recorded_sequences: None,
            options,
            model,
        })
    }

    /// The model the engine runs.
    pub fn model(&self) -> &DeviceModel {
        &self.model
    }

    /// Decode graphs captured so far (one per batch size and block-table capacity; see `EngineOptions::graphs`).
    pub fn captured_graphs(&self) -> usize {
        self.decode_graphs.values().filter(|g| g.graph.is_some()).count()
    }

    /// The most tokens any allocated activation workspace holds (the eager step's, and each decode graph's batch):
    /// with chunked prefill at most `EngineOptions::prefill_chunk` (or the decode batch, if larger), whatever the
    /// prompts' lengths.
    pub fn workspace_tokens(&self) -> usize {
        let eager = self.workspace.as_ref().map_or(0, |w| w.tokens);
        self.decode_graphs.values().map(|g| g.workspace.tokens).chain([eager]).max().unwrap_or(0)
    }

    /// Requests still in the batch.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Adds a request; it joins the batch at the next [`Engine::step`] (its prompt is prefilled there).
    /// The request is checked first ([`Request::validate`]: `Error::InvalidArgument` for an empty prompt, `max_tokens`
    /// 0 or invalid sampling settings, `Error::OutOfRange` for a token id at or above the vocabulary size or a
    /// request that would pass the model's last position), and so are its `[IMG]` tokens: a prompt holding any is
    /// `Error::InvalidArgument` here (they take images: [`Engine::add_with_images`]).
    pub fn add(&mut self, request: Request) -> Result<RequestId> {
        self.add_with_images(request, Vec::new())
    }

    /// [`Engine::add`] for a multimodal prompt: the `[IMG]` tokens of the prompt take the features of `images`, in
    /// order (one `[IMG]` per merged patch of each image; `[IMG_BREAK]` / `[IMG_END]` stay text tokens). Positions
    /// stay 1-D, as in `ReferenceModel::forward_with_images`. The `[IMG]` count must match the images
    /// (`Error::Shape`), images need a vision tower (`Error::Config`).
    pub fn add_with_images(&mut self, request: Request, images: Vec<PixelImage>) -> Result<RequestId> {
        request.validate(&self.model.config)?;
        check_image_slots(self.model.vision.as_ref().map(|tower| tower.config()), &request.prompt, &images)?;
        // Admission: a prompt the whole page pool cannot hold (with the slot of its first token) never runs.
        let desc = self.kv.descriptor();
        let needed = desc.pages_for(request.prompt.len() + 1);
        if needed > desc.num_pages {
            return Err(Error::OutOfPages { needed, free: desc.num_pages });
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let seq = self.kv.add_sequence();
        self.active.insert(id, Active { seq, pending: request.prompt.clone(), request, images, generated: 0 });
        Ok(id)
    }

    /// Drops a request and frees its pages.
    pub fn cancel(&mut self, id: RequestId) -> Result<()> {
        let a = self.active.remove(&id).ok_or(Error::UnknownSequence(id.0))?;
        self.kv.free(a.seq)
    }

    /// One step of the whole batch: new requests are prefilled and running ones decode one token, in ONE forward
    /// pass (chunked prefill and decode share the attention kernel). Returns one token per active request;
    /// finished requests leave the batch.
    pub fn step(&mut self) -> Result<Vec<StepToken>> {
        if self.active.is_empty() {
            return Ok(Vec::new());
        }
        let plan = self.schedule()?;
        // A step is all or nothing: on any error the cache's tables and lengths go back to what they were (device rows
        // written past them are never read, and are overwritten by the retry), and no request changes.
        let kv_before = self.kv.clone();
        let result = self.run_step(&plan);
        if result.is_err() {
            self.kv = kv_before;
            for g in self.decode_graphs.values_mut() {
                g.ids_on_device = None;
            }
        }
        self.steps += 1;
        result
    }

    /// Which requests run this step and with which tokens, within the token budget (`EngineOptions::prefill_chunk`)
    /// and the free pages: decode tokens first (one each), then prompt chunks in request order. A request whose
    /// tokens would need more pages than are free waits for a later step (admission); when none can run at all,
    /// `Error::OutOfPages` (nothing changed). A prompt with images goes in whole (its image rows are one step's).
    fn schedule(&self) -> Result<Vec<Scheduled>> {
        let budget = self.options.prefill_chunk.max(1);
        let (mut used, mut free) = (0usize, self.kv.free_pages());
        let mut plan = Vec::new();
        let mut short = None;
        let decoding = |a: &Active| a.generated > 0;
        for pass in [true, false] {
            for (&id, a) in self.active.iter().filter(|(_, a)| decoding(a) == pass) {
                let take = if pass || !a.images.is_empty() { a.pending.len() } else { a.pending.len().min(budget.saturating_sub(used)) };
                if take == 0 {
                    continue;
                }
                let needed = self.kv.pages_needed(a.seq, take)?;
                if needed > free {
                    short.get_or_insert(Error::OutOfPages { needed, free });
                    continue;
                }
                free -= needed;
                used += take;
                plan.push(Scheduled { id, tokens: a.pending[..take].to_vec(), samples: take == a.pending.len() });
            }
        }
        match (plan.is_empty(), short) {
            (true, Some(err)) => Err(err),
            _ => Ok(plan),
        }
    }

    /// Runs one scheduled step and applies its results; changes no request when it fails (`step` restores the cache).
    fn run_step(&mut self, plan: &[Scheduled]) -> Result<Vec<StepToken>> {
        let ids: Vec<RequestId> = plan.iter().map(|p| p.id).collect();
        let batch: Vec<(SeqId, Vec<u32>)> = plan.iter().map(|p| (self.active[&p.id].seq, p.tokens.clone())).collect();
        // A request's images enter at its prefill (its first step); they are dropped once that step succeeded.
        let images: Vec<Vec<PixelImage>> =
            ids.iter().map(|id| if self.active[id].generated == 0 { self.active[id].images.clone() } else { Vec::new() }).collect();
        let with_images = images.iter().any(|i| !i.is_empty());
        let decode_only = batch.iter().all(|(_, tokens)| tokens.len() == 1) && plan.iter().all(|p| p.samples);
        let graphs = self.options.graphs && !self.options.record_routing && self.graphs_supported;
        if decode_only && !with_images && graphs && self.collective.is_none() {
            // Tokens each request may still add after this step: the pages taken ahead for them.
            let ahead: Vec<usize> = ids.iter().map(|id| self.active[id].request.max_tokens.saturating_sub(self.active[id].generated + 1)).collect();
            self.decode_with_graph(&batch, &ahead)?;
        } else {
            self.forward_device(&batch, &images, HeadRows::Last)?;
            if let Some(sequences) = &mut self.recorded_sequences {
                sequences.iter_mut().zip(&ids).for_each(|((request, _), &id)| *request = Some(id));
            }
        }
        let (_, head) = self.last_outputs();
        // Head row i is request i's last token.
        let rows = head.rows;
        let vocab = self.model.config.vocab;
        let greedy = ids.iter().all(|id| self.active[id].request.sampling == Sampling::Greedy);
        if greedy {
            ops::argmax(head.logits.view([rows, vocab])?, head.next.as_vector())?;
        } else {
            let mut temperature = vec![0.0f32; rows];
            let mut top_p = vec![1.0f32; rows];
            let mut seeds = vec![0u64; rows];
            let mut steps = vec![0i32; rows];
            for (row, id) in ids.iter().enumerate() {
                let a = &self.active[id];
                if let Sampling::Seeded { temperature: t, top_p: p, seed } = a.request.sampling {
                    (temperature[row], top_p[row], seeds[row], steps[row]) = (t, p, seed, a.generated as i32);
                }
            }
            let d = &self.model.device;
            let (temperature, top_p) = (DeviceBuffer::from_slice(d, &temperature)?, DeviceBuffer::from_slice(d, &top_p)?);
            let (seeds, steps) = (DeviceBuffer::from_slice(d, &seeds)?, DeviceBuffer::from_slice(d, &steps)?);
            let inputs = SamplingInputs { temperature: temperature.as_vector(), top_p: top_p.as_vector(), seeds: seeds.as_vector(), steps: steps.as_vector() };
            ops::sample(head.logits.view([rows, vocab])?, &inputs, head.next.as_vector())?;
        }
        let advanced = self.advance_decode_inputs()?;
        let (ws, head) = self.last_outputs();
        // The step's one synchronisation: the host needs the tokens to stop sequences and feed the next step.
        let next = head.next.to_vec()?;
        if !advanced {
            // A decode step's ids are the tokens sampled before (checked below, as every prompt id was by `add`), so
            // only other steps read the embedding gather's status back.
            self.gather_status.check(ws.ids.as_vector(), vocab)?;
            self.gather_status.reset()?;
        }
        let logits = if self.options.keep_logits { Some(head.logits.to_vec()?) } else { None };
        // Every sampled token is checked before any request changes.
        let mut tokens = Vec::with_capacity(plan.len());
        for (row, p) in plan.iter().enumerate() {
            let token = match p.samples {
                false => None,
                true => Some(
                    u32::try_from(next[row])
                        .ok()
                        .filter(|&t| (t as usize) < vocab)
                        .ok_or_else(|| Error::InvalidArgument(format!("no token for request {} (NaN logits: sampled {})", p.id.0, next[row])))?,
                ),
            };
            tokens.push(token);
        }
        if let (true, LastStep::Decode(shape)) = (advanced, self.last_step) {
            self.decode_graphs.get_mut(&shape).unwrap().ids_on_device = Some(next.clone());
        }
        let mut out = Vec::with_capacity(ids.len());
        for (row, (p, token)) in plan.iter().zip(tokens).enumerate() {
            let a = self.active.get_mut(&p.id).unwrap();
            a.images.clear();
            let Some(token) = token else {
                // A prompt chunk that does not end the prompt: the rest waits for the next steps.
                a.pending.drain(..p.tokens.len());
                continue;
            };
            a.generated += 1;
            a.pending = vec![token];
            let finished = if self.options.eos == Some(token) {
                Some(FinishReason::Eos)
            } else if a.generated >= a.request.max_tokens {
                Some(FinishReason::MaxTokens)
            } else {
                None
            };
            if finished.is_some() {
                let seq = a.seq;
                self.active.remove(&p.id);
                self.kv.free(seq)?;
            }
            out.push(StepToken { id: p.id, token, finished, logits: logits.as_ref().map(|l| l[row * vocab..(row + 1) * vocab].to_vec()) });
        }
        Ok(out)
    }

    /// After a graph-replayed decode step and its sampling: the shape's input buffers advance on the device to the
    /// next step's (ids = the sampled tokens, positions and lengths + 1), so the next step of the same batch uploads
    /// nothing. False (nothing launched) after any other step, or when a sequence has no page for another token (the
    /// next step then uploads its new table row).
    fn advance_decode_inputs(&mut self) -> Result<bool> {
        let LastStep::Decode(shape) = self.last_step else { return Ok(false) };
        let g = self.decode_graphs.get_mut(&shape).unwrap();
        if !g.tables.lengths_can_advance() {
            return Ok(false);
        }
        ops::decode_advance(
            g.head.next.as_vector(),
            g.workspace.ids.as_vector(),
            g.workspace.positions.as_vector(),
            Some(g.slots.device_positions()?),
            Some(g.tables.device_lens()?),
        )?;
        g.tables.lengths_advanced();
        g.slots.positions_advanced();
        Ok(true)
    }

    /// Runs requests to completion, reporting each token as it comes; returns the tokens of each request.
    pub fn generate(&mut self, requests: Vec<Request>, mut on_token: impl FnMut(&StepToken)) -> Result<Vec<Vec<u32>>> {
        let ids: Vec<RequestId> = requests.into_iter().map(|r| self.add(r)).collect::<Result<_>>()?;
        let mut tokens: BTreeMap<RequestId, Vec<u32>> = ids.iter().map(|&id| (id, Vec::new())).collect();
        while self.active() > 0 {
            for t in self.step()? {
                on_token(&t);
                if let Some(list) = tokens.get_mut(&t.id) {
                    list.push(t.token);
                }
            }
        }
        Ok(ids.iter().map(|id| tokens.remove(id).unwrap_or_default()).collect())
    }

    /// Appends `tokens` to each sequence's cache and returns the f32 logits of EVERY token, `[tokens, vocab]`,
    /// in batch order: the layer-level view the tests compare with the reference.
    pub fn forward_logits(&mut self, batch: &[(SeqId, Vec<u32>)]) -> Result<Vec<f32>> {
        self.forward_device(batch, &vec![Vec::new(); batch.len()], HeadRows::All)?;
        self.head.as_ref().expect("forward_device leaves the head's rows").logits.to_vec()
    }

    /// A new empty sequence for [`Engine::forward_logits`].
    pub fn new_sequence(&mut self) -> SeqId {
        self.kv.add_sequence()
    }

    /// The experts each layer chose for every token of the last step (or [`Engine::forward_logits`] pass), read back
    /// from the device (a host round trip, only here). `Error::InvalidArgument` without
    /// `EngineOptions::record_routing`, before any pass, or after a pass that failed.
    ///
    /// ```
    /// use small4::model::engine::{DeviceModel, Engine, EngineOptions, Request, Sampling};
    /// use small4::model::synth::SyntheticModel;
    /// use small4::model::ModelConfig;
    /// use small4::quant::WeightFormat;
    ///
    /// let synthetic = SyntheticModel::new(ModelConfig { n_layers: 1, ..ModelConfig::tiny() }, WeightFormat::Bf16, 1)?;
    /// let model = DeviceModel::synthetic(&small4::device::simulator(), &synthetic)?;
    /// let mut engine = Engine::new(model, EngineOptions { record_routing: true, eos: None, ..EngineOptions::default() }, None)?;
    /// let id = engine.add(Request { prompt: vec![1, 300, 301], max_tokens: 1, sampling: Sampling::Greedy })?;
    /// engine.step()?;
    /// let routing = engine.last_routing()?;
    /// let k = synthetic.config.experts_per_token;
    /// assert_eq!(routing.of_request(id).unwrap()[0].len(), 3 * k); // layer 0: the prompt's 3 tokens
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn last_routing(&self) -> Result<StepRouting> {
        let (Some(record), Some(sequences)) = (&self.routing_record, &self.recorded_sequences) else {
            return Err(Error::InvalidArgument("no routing recorded (EngineOptions::record_routing, after a step that succeeded)".into()));
        };
        let all = record.to_vec()?;
        let per_layer = all.len() / self.model.config.n_layers;
        Ok(StepRouting {
            k: self.model.config.experts_per_token,
            sequences: sequences.clone(),
            ids: all.chunks_exact(per_layer).map(<[i32]>::to_vec).collect(),
        })
    }

    /// The workspace and head rows of the last forward pass.
    fn last_outputs(&self) -> (&Workspace, &Head) {
        match self.last_step {
            LastStep::Eager => (self.workspace.as_ref().expect("a forward pass ran"), self.head.as_ref().expect("a forward pass ran")),
            LastStep::Decode(shape) => {
                let g = &self.decode_graphs[&shape];
                (&g.workspace, &g.head)
            }
        }
    }

    /// Reserves each sequence's cache slots for its new tokens (copying shared pages first) and lays the tokens out:
    /// ids, positions, each token's batch row, and the first token of each sequence (`q_start`, one entry more).
    fn lay_out(&mut self, batch: &[(SeqId, Vec<u32>)]) -> Result<StepLayout> {
        let max_position = self.model.config.max_position;
        let mut out = StepLayout { ids: Vec::new(), positions: Vec::new(), token_seq: Vec::new(), q_start: vec![0] };
        for (s, (seq, tokens)) in batch.iter().enumerate() {
            if tokens.is_empty() {
                return Err(Error::InvalidArgument(format!("sequence {} has no new tokens", seq.0)));
            }
            let plan = self.kv.append(*seq, tokens.len())?;
            if plan.first_position + tokens.len() > max_position {
                return Err(Error::OutOfRange { what: "position".into(), index: (plan.first_position + tokens.len()) as i64, limit: max_position as i64 });
            }
            if !plan.copies.is_empty() {
                for cache in &self.caches {
                    cache.copy_pages(&plan.copies)?;
                }
            }
            out.ids.extend(tokens.iter().map(|&t| t as i32));
            out.positions.extend((0..tokens.len()).map(|j| (plan.first_position + j) as i32));
            out.token_seq.extend(std::iter::repeat_n(s as i32, tokens.len()));
            out.q_start.push(out.ids.len() as i32);
        }
        Ok(out)
    }

    /// A decode step (one new token per sequence) through the graph of its shape: the inputs are written into the
    /// shape's fixed buffers, then the recorded network is replayed (or, the first time, run eagerly; the second
    /// time, captured and replayed).
    ///
    /// `ahead[i]`: tokens sequence i may still add after this one. When its pages are full, pages for up to
    /// `DECODE_RESERVE_TOKENS` of them are taken now (after this step's own slots, so the step never fails for
    /// them), so that its block-table row, and with it the replayed graph's inputs, stays the same for many steps.
    fn decode_with_graph(&mut self, batch: &[(SeqId, Vec<u32>)], ahead: &[usize]) -> Result<()> {
        let layout = self.lay_out(batch)?;
        let seqs: Vec<SeqId> = batch.iter().map(|(s, _)| *s).collect();
        for (&seq, &more) in seqs.iter().zip(ahead) {
            if more > 0 && self.kv.capacity(seq)? <= self.kv.len(seq)? {
                self.kv.reserve(seq, more.min(DECODE_RESERVE_TOKENS))?;
            }
        }
        let mut tables = self.kv.batch_tables(&seqs)?;
        // Rows padded to a power of two of pages: one graph serves every length up to that capacity.
        let pages = tables.max_pages.next_power_of_two();
        tables.block_tables =
            tables.block_tables.chunks_exact(tables.max_pages).flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(-1, pages - row.len()))).collect();
        tables.max_pages = pages;
        let shape = (batch.len(), pages);
        if !self.decode_graphs.contains_key(&shape) {
            let d = &self.model.device;
            let graph = DecodeGraph {
                workspace: Workspace::new(&self.model, batch.len())?,
                head: Head::new(&self.model, batch.len())?,
                tables: BlockTables::upload_for_capacity(d, &tables, self.kv.descriptor())?,
                layout: QueryLayout::decode(d, batch.len())?,
                slots: TokenSlots::upload(d, &layout.token_seq, &layout.positions)?,
                scratch: AttentionScratch::new(d),
                eager_runs: 0,
                graph: None,
                ids_on_device: None,
                last_used: self.steps,
            };
            // A bounded cache: the least recently used shape goes first.
            while self.decode_graphs.len() >= self.options.max_decode_graphs.max(1) {
                let Some(oldest) = self.decode_graphs.iter().min_by_key(|(_, g)| g.last_used).map(|(shape, _)| *shape) else { break };
                self.decode_graphs.remove(&oldest);
            }
            // Decode: head row s is sequence s's only token.
            graph.head.source_rows.copy_from(&(0..batch.len() as i32).collect::<Vec<_>>())?;
            self.decode_graphs.insert(shape, graph);
        }
        let g = self.decode_graphs.get_mut(&shape).unwrap();
        g.last_used = self.steps;
        // In steady decode the device already holds this step's inputs (`decode_advance` after the last step wrote
        // them): nothing is uploaded. Anything else (another batch, a new page in a table row) is written here.
        let on_device = g.ids_on_device.take().is_some_and(|ids| ids == layout.ids);
        if !(on_device && g.tables.host() == &tables && g.slots.host() == (&layout.token_seq[..], &layout.positions[..])) {
            g.tables.update(&tables)?;
            g.slots.update(&layout.token_seq, &layout.positions)?;
            g.workspace.ids.copy_from(&layout.ids)?;
            g.workspace.positions.copy_from(&layout.positions)?;
        }
        self.last_step = LastStep::Decode(shape);
        let device = self.model.device.clone();
        let net = Network {
            model: &self.model,
            caches: &self.caches,
            options: &self.options,
            collective: None,
            gather_status: &self.gather_status,
            routing_record: None,
        };
        if let Some(graph) = &g.graph {
            return device.replay(graph);
        }
        if g.eager_runs == 0 {
            // First step of this shape: sizes the attention scratch and loads every kernel.
            g.eager_runs += 1;
            return net.run(&g.workspace, &g.head, &g.tables, &g.layout, &g.slots, &mut g.scratch, None);
        }
        if device.begin_capture().is_err() {
            // A backend without graphs: this and every later step run eagerly.
            self.graphs_supported = false;
            return net.run(&g.workspace, &g.head, &g.tables, &g.layout, &g.slots, &mut g.scratch, None);
        }
        let ran = net.run(&g.workspace, &g.head, &g.tables, &g.layout, &g.slots, &mut g.scratch, None);
        // The capture is closed whatever happened inside it.
        let graph = device.end_capture();
        ran?;
        let graph = graph?;
        device.replay(&graph)?;
        g.graph = Some(graph);
        Ok(())
    }

    /// The whole network over a batch: each sequence's new tokens follow what its cache holds. Leaves in `self.head`
    /// the logits of each sequence's last token (`HeadRows::Last`, in batch order) or of every token (`All`).
    ///
    /// On a GPU the part after the host bookkeeping (from the uploads of ids/positions/tables to the logits) is what
    /// a CUDA graph captures for a decode step of a given batch size: every launch reads fixed workspace buffers,
    /// sizes come from the workspace's fixed capacity, and variable data (ids, positions, block tables, sequence
    /// lengths, the router's grouping, `num_padded`) lives in device buffers, so nothing inside waits for the host.
    fn forward_device(&mut self, batch: &[(SeqId, Vec<u32>)], images: &[Vec<PixelImage>], head_rows: HeadRows) -> Result<()> {
        let device = self.model.device.clone();
        let layout = self.lay_out(batch)?;
        let t = layout.ids.len();
        if self.workspace.as_ref().is_none_or(|w| w.tokens != t) {
            self.workspace = None;
            self.workspace = Some(Workspace::new(&self.model, t)?);
        }
        let source_rows: Vec<i32> = match head_rows {
            HeadRows::Last => layout.q_start[1..].iter().map(|&end| end - 1).collect(),
            HeadRows::All => (0..t as i32).collect(),
        };
        if self.head.as_ref().is_none_or(|h| h.rows != source_rows.len()) {
            self.head = None;
            self.head = Some(Head::new(&self.model, source_rows.len())?);
        }
        let head = self.head.as_ref().unwrap();
        head.source_rows.copy_from(&source_rows)?;
        let seqs: Vec<SeqId> = batch.iter().map(|(s, _)| *s).collect();
        let tables = BlockTables::upload(&device, &self.kv.batch_tables(&seqs)?, self.kv.descriptor())?;
        let q_layout = QueryLayout::upload(&device, &layout.q_start)?;
        let slots = TokenSlots::upload(&device, &layout.token_seq, &layout.positions)?;
        self.recorded_sequences = None;
        let record_len = self.model.config.n_layers * t * self.model.config.experts_per_token;
        if self.options.record_routing && self.routing_record.as_ref().is_none_or(|r| r.len() != record_len) {
            self.routing_record = None;
            self.routing_record = Some(DeviceBuffer::alloc(&device, record_len)?);
        }
        let ws = self.workspace.as_ref().unwrap();
        ws.ids.copy_from(&layout.ids)?;
        ws.positions.copy_from(&layout.positions)?;
        self.last_step = LastStep::Eager;
        let image_rows = self.encode_images(batch, images, &layout.q_start, t)?;
        let net = Network {
            model: &self.model,
            caches: &self.caches,
            options: &self.options,
            collective: self.collective.as_deref(),
            gather_status: &self.gather_status,
            routing_record: self.routing_record.as_ref().filter(|_| self.options.record_routing),
        };
        net.run(ws, head, &tables, &q_layout, &slots, &mut self.scratch, image_rows.as_ref().map(|(features, rows)| ImageRows { features, rows }).as_ref())?;
        if self.options.record_routing {
            self.recorded_sequences = Some(layout.q_start.windows(2).map(|w| (None, w[0] as usize..w[1] as usize)).collect());
        }
        Ok(())
    }

    /// The vision tower over every image of the batch (`images[s]` belong to sequence `s`, whose tokens start at
    /// `q_start[s]`): the features and the `[IMG]` rows of the step's `tokens` they replace. None without images.
    fn encode_images(
        &self,
        batch: &[(SeqId, Vec<u32>)],
        images: &[Vec<PixelImage>],
        q_start: &[i32],
        tokens: usize,
    ) -> Result<Option<(DeviceBuffer<bf16>, RowTargets)>> {
        if images.iter().all(|i| i.is_empty()) {
            return Ok(None);
        }
        let tower = self.model.vision.as_ref().ok_or_else(|| Error::Config("images given to a model without a vision tower".into()))?;
        let image_token = tower.config().image_token_id;
        let (mut slots, mut all) = (Vec::new(), Vec::new());
        for (s, ((_, seq_tokens), seq_images)) in batch.iter().zip(images).enumerate() {
            if !seq_images.is_empty() {
                let first = q_start[s] as usize;
                slots.extend(seq_tokens.iter().enumerate().filter(|(_, &tok)| tok == image_token).map(|(j, _)| first + j));
                all.extend(seq_images.iter().cloned());
            }
        }
        if slots.len() != tower.feature_rows(&all) {
            return Err(Error::shape("[IMG] tokens of the batch", tower.feature_rows(&all), slots.len()));
        }
        Ok(Some((tower.encode(&all)?, RowTargets::upload(&self.model.device, &slots, tokens)?)))
    }
}

impl Network<'_> {
    /// The whole network over the tokens of `ws` (ids and positions already written): embedding, the layers, the
    /// final norm and the output head over `head`'s rows. Launches kernels only (the fp8-activation GEMMs quantise
    /// into the workspace's scratch, `ws.fp8_act`, passed to each GEMM launch).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        ws: &Workspace,
        head: &Head,
        tables: &BlockTables,
        layout: &QueryLayout,
        slots: &TokenSlots,
        scratch: &mut AttentionScratch,
        images: Option<&ImageRows>,
    ) -> Result<()> {
        let c = &self.model.config;
        let device = &self.model.device;
        let t = ws.tokens;
        let m = self.model;
        // This rank's query heads: every tensor that is per head below holds only these.
        let (dim, heads, eps) = (c.dim, m.heads.len(), c.norm_eps);
        let (qk, nope, rank, v_head) = (c.qk_head_dim(), c.qk_nope, c.kv_lora_rank, c.v_head);
        let k = c.experts_per_token;
        let router_config = RouterConfig { k, routed_scale: c.routed_scale, tile_m: ws.routing.alignment.tile_m };
        let query_scale = QueryScale { beta: c.llama4_beta, original_max_position: c.llama4_original_max_position };
        let [x, x_mid] = &ws.x;
        let fp8_act = Some(&*ws.fp8_act);

        ops::embedding_gather(ws.ids.view([t])?, m.tok_embeddings.view([c.vocab, dim])?, x.view([t, dim])?, self.gather_status)?;
        if let Some(images) = images {
            vision_kernels::scatter_rows(images.features.view([images.rows.len(), dim])?, images.rows, x.view([t, dim])?)?;
        }
        norm::rms_norm(x.view([t, dim])?, m.layers[0].attention_norm.as_vector(), ws.h.view([t, dim])?, eps)?;
        // Only the latency-bound steps prefetch (model::decode_prefetch says which).
        let prefetching = self.options.l2_prefetch && t <= gemm::DECODE_MAX_ROWS;
        for (l, layer) in m.layers.iter().enumerate() {
            // What this layer's latency-bound launches pull into L2 for the GEMMs after them.
            let prefetch =
                if prefetching { LayerPrefetch::plan(&layer.wo, layer.moe.shared.as_ref().map(|(gate_up, _)| gate_up))? } else { LayerPrefetch::default() };
            // Attention: q = wq_b(q_a_norm(wq_a h)); cache row = [kv_a_norm(c) | rope(k_rope)].
            let qkv_a = ws.qkv_a.view([t, c.q_lora_rank + rank + c.qk_rope])?;
            // One launch: the stacked GEMM, then each finished row's q_a norm and kv cache write.
            let write = CacheWriteWeights { norm_weight: layer.kv_a_norm.as_vector(), eps, inv_freq: m.inv_freq.as_vector() };
            let q_norm = QueryLatentNorm { weight: layer.q_a_norm.as_vector(), out: ws.q_a_normed.view([t, c.q_lora_rank])?, eps };
            attention::latent_projection(
                &layer.wqkv_a,
                ws.h.view([t, dim])?,
                qkv_a,
                &q_norm,
                &self.caches[l],
                tables,
                &write,
                slots,
                &ws.row_counters,
                fp8_act,
            )?;
            // wq_b with the query's RoPE and llama-4 scale in its epilogue.
            let (positions, inv_freq) = (ws.positions.view([t])?, m.inv_freq.as_vector());
            dense::linear_rope_q(&layer.wq_b, ws.q_a_normed.view([t, c.q_lora_rank])?, ws.q.view([t, heads, qk])?, positions, inv_freq, query_scale, fp8_act)?;
            // Absorb W_UK into the query (all heads in one launch); the attention reads each head's rope half in place.
            dense::linear_per_head_prefetching(&layer.w_uk, ws.q.view([t, heads, qk])?, ws.q_lat.view([t, heads, rank])?, fp8_act, &prefetch.absorb_query)?;
            let queries = Queries { layout, q_lat: ws.q_lat.view([t, heads, rank])?, q_rope: ws.q.view([t * heads, qk])?.columns(nope..qk)? };
            attention::mla_attention_prefetching(
                &self.caches[l],
                tables,
                &queries,
                ws.o_lat.view([t, heads, rank])?,
                c.softmax_scale(),
                self.options.attention_splits,
                scratch,
                &prefetch.attention,
            )?;
            let attn = ws.attn.view([t, heads * v_head])?;
            dense::linear_per_head_prefetching(
                &layer.w_uv,
                ws.o_lat.view([t, heads, rank])?,
                ws.attn.view([t, heads, v_head])?,
                fp8_act,
                &prefetch.absorb_output,
            )?;
            // wo, the residual add and the MoE block's norm: x_mid = wo(attn) + x, h = ffn_norm(x_mid).
            let ffn_norm = ResidualNorm {
                residual: x.view([t, dim])?,
                weight: layer.ffn_norm.as_vector(),
                residual_out: x_mid.view([t, dim])?,
                out: ws.h.view([t, dim])?,
                eps,
            };
            match &ws.attention_sum {
                None => dense::linear_add_rms_norm(&layer.wo, attn, ws.block_out.view([t, dim])?, &ffn_norm, &ws.row_counters, fp8_act)?,
                Some(partial) => {
                    // Tensor parallelism: this rank's heads give a partial sum of wo's output; the ranks add theirs
                    // in f32 and round once, as one rank rounds its whole output.
                    let col = self.collective.ok_or_else(|| Error::InvalidArgument("tensor-parallel attention needs the ranks' collective".into()))?;
                    dense::linear_f32(&layer.wo, attn, partial.sum.view([t, dim])?, fp8_act)?;
                    col.all_reduce_sum_f32(&partial.sum)?;
                    moe::combine(partial.sum.view([t, dim])?, None, partial.one_pair_ids.view([t, 1])?, None, 1, ws.block_out.view([t, dim])?)?;
                    norm::add_rms_norm(ws.block_out.view([t, dim])?, ffn_norm.residual, ffn_norm.weight, ffn_norm.residual_out, ffn_norm.out, eps)?;
                }
            }

            // Mixture of experts: route, grouped up (SwiGLU), grouped down (x routing weight), shared, combine.
            let gate = layer.gate.view([c.experts, dim])?;
            router::route_and_align_prefetching(ws.h.view([t, dim])?, gate, &m.expert_map, &router_config, &ws.router, &ws.routing, &prefetch.router)?;
            if let Some(record) = self.routing_record {
                record.copy_within_device(l * t * k, &ws.routing.topk_ids, 0, t * k)?;
            }
            let a = &ws.routing.alignment;
            let grouping = Grouping {
                sorted_pairs: &a.sorted_pairs,
                tile_experts: &a.tile_experts,
                expert_offsets: &a.expert_offsets,
                num_padded: &a.num_padded,
                tile_m: a.tile_m,
            };
            if self.collective.is_some() {
                // Pairs of other ranks' experts stay zero here and arrive by the all-reduce.
                device.memset(ws.moe.pair_out.addr(), 0, ws.moe.pair_out.bytes())?;
            }
            let (h, topk_weights) = (ws.h.view([t, dim])?, ws.routing.topk_weights.view([t, k])?);
            // The residual add after the MoE block and the next block's norm: x = moe(h) + x_mid, h = norm(x).
            let next_norm = m.layers.get(l + 1).map_or(&m.norm, |next| &next.attention_norm);
            let residual_norm = ResidualNorm {
                residual: x_mid.view([t, dim])?,
                weight: next_norm.as_vector(),
                residual_out: x.view([t, dim])?,
                out: ws.h.view([t, dim])?,
                eps,
            };
            let topk_ids = ws.routing.topk_ids.view([t, k])?;
            match &self.collective {
                // One GPU: the shared expert rides in the routed experts' two launches, and the second one combines
                // each token's pairs, adds the residual and norms as the token's last pair is written.
                None => {
                    let routing = RoutingBuffers { topk_ids, topk_weights, expert_map: None, experts: c.experts };
                    moe::moe_layer_add_rms_norm(&layer.moe, h, &routing, &grouping, &ws.moe, &residual_norm, &ws.row_counters)?;
                }
                // Several: the routed pairs are summed over the ranks, the (replicated) shared expert is not.
                Some(col) => {
                    moe::routed_experts(&layer.moe, h, &grouping, topk_weights, &ws.moe)?;
                    col.all_reduce_sum_f32(&ws.moe.pair_out)?;
                    let shared = match &layer.moe.shared {
                        Some(s) => {
                            moe::shared_expert(s, h, &ws.moe)?;
                            Some(ws.moe.shared_out.view([t, dim])?)
                        }
                        None => None,
                    };
                    let pairs =
                        norm::MoePairs { pair_out: ws.moe.pair_out.view([t * k, dim])?, shared_out: shared, topk_ids, expert_map: None, experts: c.experts };
                    let r = &residual_norm;
                    norm::moe_combine_add_rms_norm(&pairs, r.residual, r.weight, r.residual_out, r.out, eps)?;
                }
            }
        }
        // ws.h is the final norm's output: gather the head's rows (host-computed, always in range), then the head.
        ops::embedding_gather(head.source_rows.as_vector(), ws.h.view([t, dim])?, head.h.view([head.rows, dim])?, self.gather_status)?;
        dense::linear_f32(&m.output, head.h.view([head.rows, dim])?, head.logits.view([head.rows, c.vocab])?, fp8_act)?;
        Ok(())
    }
}
