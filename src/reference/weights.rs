//! Where the reference forward pass reads its weights: one [`WeightSource`] trait that the one forward pass
//! (`super::model::ReferenceModel`) reads, with three sources:
//! - [`ReferenceWeights`] in memory (f32 vectors; the tiny model and the tests);
//! - [`CheckpointWeights`]: a checkpoint's memory-mapped shards in every format and layout the engine reads;
//!   matrices are views into the mapped files, dequantised 128 rows at a time as a product needs them;
//! - [`SyntheticModel`], the counter-based synthetic model (`crate::model::synth`): quantised matrices are generated
//!   whole per use (one expert at most 48 MB in bf16 for the real preset), bf16 ones row block by row block, so the
//!   full-size model (119B parameters) runs without being stored.
//!
//! Matrices come as [`WeightMatrix`]: [`WeightMatrix::matmul`] computes `x W^T` over blocks of [`ROW_BLOCK`] rows
//! in parallel (rayon), each block dequantised into a buffer of its own and dropped after its dot products. Every
//! output value is the same `dot` of the same f32 row as `linear::matmul_nt` over the fully dequantised matrix,
//! so all sources give bit-identical results.
//!
//! Memory of a streaming pass (checkpoint source), beyond the mapped pages the kernel may evict at will: one
//! layer's `wkv_b` in f32 (the absorbed attention reads it by head; 6.3 MB for Mistral Small 4), one block of
//! `ROW_BLOCK` rows in f32 and its quantised copy per rayon thread (2 MB + 1 MB at dim 4096), the activations of the
//! tokens in flight (the per-pair expert outputs, `tokens * k * dim` f32), the latent cache (`tokens * 320` f32 per
//! layer) and the logits (`tokens * vocab` f32).

use std::borrow::Cow;
use std::ops::Range;

use rayon::prelude::*;

use super::linear::dot;
use super::model::{FeedForward, ReferenceWeights};
use super::moe::ExpertWeights;
use super::vision::VisionWeights;
use crate::model::checkpoint::{Checkpoint, Dtype, ExpertMatrix, MatrixData};
use crate::model::synth::{bf16_value, element_byte, SyntheticModel, TensorKind, TensorSpec};
use crate::model::ModelConfig;
use crate::quant::{QuantizedMatrix, WeightFormat};
use crate::{Error, Result};

/// Rows dequantised together by [`WeightMatrix::matmul`]: a multiple of 128, so FP8 block-128 slices start on a
/// block row.
pub const ROW_BLOCK: usize = 128;

/// One tensor of the text model, by its role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weight {
    /// The embedding `[vocab, dim]`.
    TokEmbeddings,
    /// The output head `[vocab, dim]`.
    Output,
    /// The final norm `[dim]`.
    Norm,
    /// Layer `l`'s `attention_norm` `[dim]`.
    AttentionNorm(usize),
    /// Layer `l`'s `ffn_norm` `[dim]`.
    FfnNorm(usize),
    /// `wq_a` `[q_lora_rank, dim]`.
    WqA(usize),
    /// `q_a_norm` `[q_lora_rank]`.
    QaNorm(usize),
    /// `wq_b` `[heads * (qk_nope + qk_rope), q_lora_rank]`.
    WqB(usize),
    /// `wkv_a_with_mqa` `[kv_lora_rank + qk_rope, dim]`.
    WkvA(usize),
    /// `kv_a_norm` `[kv_lora_rank]`.
    KvaNorm(usize),
    /// `wkv_b` `[heads * (qk_nope + v_head), kv_lora_rank]`.
    WkvB(usize),
    /// `wo` `[dim, heads * v_head]`.
    Wo(usize),
    /// The router `gate` `[experts, dim]`.
    Router(usize),
    /// A matrix of the dense FFN of a layer before `first_k_dense_replace`.
    DenseFfn(usize, ExpertMatrix),
    /// A matrix of the shared experts (one SwiGLU of `shared_hidden`).
    SharedExperts(usize, ExpertMatrix),
    /// A matrix of routed expert `expert` of layer `layer`.
    Expert {
        /// The decoder layer.
        layer: usize,
        /// The routed expert.
        expert: usize,
        /// Which of its three matrices.
        which: ExpertMatrix,
    },
}

impl Weight {
    /// The native checkpoint name: the full tensor name of a vector (`layers.0.attention_norm.weight`), the base
    /// name of a matrix (`layers.0.attention.wq_a`, its stored tensors being `.weight`, `.qscale_weight`, ...).
    pub fn native_name(&self) -> String {
        let which = |w: &ExpertMatrix| match w {
            ExpertMatrix::W1 => "w1",
            ExpertMatrix::W2 => "w2",
            ExpertMatrix::W3 => "w3",
        };
        match self {
            Weight::TokEmbeddings => "tok_embeddings".into(),
            Weight::Output => "output".into(),
            Weight::Norm => "norm.weight".into(),
            Weight::AttentionNorm(l) => format!("layers.{l}.attention_norm.weight"),
            Weight::FfnNorm(l) => format!("layers.{l}.ffn_norm.weight"),
            Weight::WqA(l) => format!("layers.{l}.attention.wq_a"),
            Weight::QaNorm(l) => format!("layers.{l}.attention.q_a_norm.weight"),
            Weight::WqB(l) => format!("layers.{l}.attention.wq_b"),
            Weight::WkvA(l) => format!("layers.{l}.attention.wkv_a_with_mqa"),
            Weight::KvaNorm(l) => format!("layers.{l}.attention.kv_a_norm.weight"),
            Weight::WkvB(l) => format!("layers.{l}.attention.wkv_b"),
            Weight::Wo(l) => format!("layers.{l}.attention.wo"),
            Weight::Router(l) => format!("layers.{l}.gate"),
            Weight::DenseFfn(l, w) => format!("layers.{l}.feed_forward.{}", which(w)),
            Weight::SharedExperts(l, w) => format!("layers.{l}.shared_experts.{}", which(w)),
            Weight::Expert { layer, expert, which: w } => format!("layers.{layer}.experts.{expert}.{}", which(w)),
        }
    }

    /// `(rows, cols)` under `config`; a vector is one row.
    pub fn shape(&self, c: &ModelConfig) -> (usize, usize) {
        let swiglu = |w: &ExpertMatrix, hidden: usize| if *w == ExpertMatrix::W2 { (c.dim, hidden) } else { (hidden, c.dim) };
        match self {
            Weight::TokEmbeddings | Weight::Output => (c.vocab, c.dim),
            Weight::Norm | Weight::AttentionNorm(_) | Weight::FfnNorm(_) => (1, c.dim),
            Weight::WqA(_) => (c.q_lora_rank, c.dim),
            Weight::QaNorm(_) => (1, c.q_lora_rank),
            Weight::WqB(_) => (c.heads * c.qk_head_dim(), c.q_lora_rank),
            Weight::WkvA(_) => (c.kv_lora_rank + c.qk_rope, c.dim),
            Weight::KvaNorm(_) => (1, c.kv_lora_rank),
            Weight::WkvB(_) => (c.heads * (c.qk_nope + c.v_head), c.kv_lora_rank),
            Weight::Wo(_) => (c.dim, c.heads * c.v_head),
            Weight::Router(_) => (c.experts, c.dim),
            Weight::DenseFfn(_, w) => swiglu(w, c.dense_hidden),
            Weight::SharedExperts(_, w) => swiglu(w, c.shared_hidden()),
            Weight::Expert { which, .. } => swiglu(which, c.expert_hidden),
        }
    }
}

/// How a [`WeightMatrix`] holds its values.
#[derive(Clone, Debug)]
pub enum MatrixStorage<'a> {
    /// f32 values, row-major (the in-memory reference).
    F32(&'a [f32]),
    /// Checkpoint data in its stored format, borrowed (from mapped shards, or from a matrix the source owns).
    Stored(MatrixData<'a>),
    /// A quantised matrix made for this use (the synthetic model's generator).
    Owned(QuantizedMatrix),
    /// A synthetic bf16 matrix, generated row by row as it is read (the embedding and head of the real preset are
    /// 1 GB each in bf16: only the rows in use exist at a time).
    Generated(TensorSpec),
}

/// A weight matrix `[rows, cols]` (`[out, in]`) as the forward pass reads it: rows dequantised on demand.
#[derive(Clone, Debug)]
pub struct WeightMatrix<'a> {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// The values.
    pub storage: MatrixStorage<'a>,
}

impl WeightMatrix<'_> {
    /// The f32 values of rows `range` (a view for f32 storage, dequantised otherwise as the GEMM kernels see them:
    /// `QuantizedMatrix::dequantize_for_gemm`, the same values as dequantising the whole matrix).
    pub fn rows_f32(&self, range: Range<usize>) -> Result<Cow<'_, [f32]>> {
        if range.start > range.end || range.end > self.rows {
            return Err(Error::OutOfRange { what: "weight matrix row".into(), index: range.end as i64 - 1, limit: self.rows as i64 });
        }
        let dequantize = |data: &MatrixData| -> Result<Vec<f32>> {
            Ok(data.slice_rows(range.clone(), self.cols)?.to_quantized(range.len(), self.cols)?.dequantize_for_gemm())
        };
        Ok(match &self.storage {
            MatrixStorage::F32(values) => Cow::Borrowed(&values[range.start * self.cols..range.end * self.cols]),
            MatrixStorage::Stored(data) => Cow::Owned(dequantize(data)?),
            MatrixStorage::Owned(m) => Cow::Owned(dequantize(&MatrixData::from(m))?),
            MatrixStorage::Generated(spec) => {
                let TensorKind::Matrix { format: WeightFormat::Bf16, unit } = spec.kind else {
                    return Err(Error::InvalidArgument(format!("only bf16 synthetic matrices are generated by rows, not {:?}", spec.kind)));
                };
                let elements = (range.start * self.cols) as u64..(range.end * self.cols) as u64;
                Cow::Owned(elements.map(|i| bf16_value(element_byte(spec.key, i), unit).to_f32()).collect())
            }
        })
    }

    /// All values in f32, `[rows, cols]`.
    pub fn to_f32(&self) -> Result<Cow<'_, [f32]>> {
        self.rows_f32(0..self.rows)
    }

    /// `x [tokens, cols] . W^T -> [tokens, rows]`, each output `dot(x row, W row)` as `linear::matmul_nt` computes it;
    /// blocks of [`ROW_BLOCK`] rows are dequantised and used in parallel.
    pub fn matmul(&self, x: &[f32]) -> Result<Vec<f32>> {
        let (rows, cols) = (self.rows, self.cols);
        if cols == 0 || x.len() % cols != 0 {
            return Err(Error::shape("matmul input", format!("rows of {cols} values"), format!("{} values", x.len())));
        }
        let tokens = x.len() / cols;
        if tokens == 0 {
            return Ok(Vec::new());
        }
        let blocks: Vec<Vec<f32>> = (0..rows.div_ceil(ROW_BLOCK))
            .into_par_iter()
            .map(|b| {
                let range = b * ROW_BLOCK..((b + 1) * ROW_BLOCK).min(rows);
                let w = self.rows_f32(range.clone())?;
                let mut y = Vec::with_capacity(tokens * range.len());
                for x_row in x.chunks_exact(cols) {
                    y.extend(w.chunks_exact(cols).map(|w_row| dot(x_row, w_row)));
                }
                Ok(y)
            })
            .collect::<Result<_>>()?;
        let mut out = vec![0.0f32; tokens * rows];
        for (b, block) in blocks.iter().enumerate() {
            let width = block.len() / tokens;
            for (t, y_row) in block.chunks_exact(width).enumerate() {
                out[t * rows + b * ROW_BLOCK..][..width].copy_from_slice(y_row);
            }
        }
        Ok(out)
    }
}

/// Where the reference forward pass reads the weights of a text model (see the module documentation).
pub trait WeightSource: Sync {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// A vector (a norm's weight) in f32; `weight.shape(config)` is `(1, len)`.
    fn vector(&self, weight: Weight) -> Result<Cow<'_, [f32]>>;

    /// A matrix of the shape `weight.shape(config)`.
    fn matrix(&self, weight: Weight) -> Result<WeightMatrix<'_>>;

    /// Whether routed expert `expert` of `layer` is present (the in-memory weights may leave experts out, as a rank
    /// of expert parallelism does; their contributions are skipped).
    fn has_expert(&self, _layer: usize, _expert: usize) -> bool {
        true
    }

    /// The static activation scales (up input, down input) of `layer`'s routed experts for W8A8, when the weights
    /// have them (per-tensor FP8 with `qscale_act`).
    fn expert_activation_scales(&self, layer: usize) -> Result<Option<(f32, f32)>>;

    /// The vision tower and projector, `None` without one.
    fn vision(&self) -> Result<Option<Cow<'_, VisionWeights>>>;

    /// Checks what can be checked before a forward pass (the configuration; the in-memory source checks every
    /// tensor's shape, the others check each tensor when it is read).
    fn check(&self) -> Result<()> {
        self.config().validate()
    }
}

fn expert_part(e: &ExpertWeights, which: ExpertMatrix) -> &[f32] {
    match which {
        ExpertMatrix::W1 => &e.w1,
        ExpertMatrix::W2 => &e.w2,
        ExpertMatrix::W3 => &e.w3,
    }
}

fn missing(weight: Weight, why: &str) -> Error {
    Error::Config(format!("no weight {} ({why})", weight.native_name()))
}

impl WeightSource for ReferenceWeights {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn vector(&self, weight: Weight) -> Result<Cow<'_, [f32]>> {
        let layer = |l: usize| self.layers.get(l).ok_or_else(|| missing(weight, "no such layer"));
        Ok(Cow::Borrowed(match weight {
            Weight::Norm => &self.norm,
            Weight::AttentionNorm(l) => &layer(l)?.attention_norm,
            Weight::FfnNorm(l) => &layer(l)?.ffn_norm,
            Weight::QaNorm(l) => &layer(l)?.attention.q_a_norm,
            Weight::KvaNorm(l) => &layer(l)?.attention.kv_a_norm,
            _ => return Err(missing(weight, "a matrix, not a vector")),
        }))
    }

    fn matrix(&self, weight: Weight) -> Result<WeightMatrix<'_>> {
        let layer = |l: usize| self.layers.get(l).ok_or_else(|| missing(weight, "no such layer"));
        let values: &[f32] = match weight {
            Weight::TokEmbeddings => &self.tok_embeddings,
            Weight::Output => &self.output,
            Weight::WqA(l) => &layer(l)?.attention.wq_a,
            Weight::WqB(l) => &layer(l)?.attention.wq_b,
            Weight::WkvA(l) => &layer(l)?.attention.wkv_a_with_mqa,
            Weight::WkvB(l) => &layer(l)?.attention.wkv_b,
            Weight::Wo(l) => &layer(l)?.attention.wo,
            Weight::Router(l) | Weight::SharedExperts(l, _) | Weight::Expert { layer: l, .. } => {
                let FeedForward::Moe(moe) = &layer(l)?.ffn else { return Err(missing(weight, "a dense layer")) };
                match weight {
                    Weight::Router(_) => &moe.gate,
                    Weight::SharedExperts(_, which) => expert_part(moe.shared_experts.as_ref().ok_or_else(|| missing(weight, "no shared experts"))?, which),
                    Weight::Expert { expert, which, .. } => {
                        expert_part(moe.experts.get(expert).and_then(Option::as_ref).ok_or_else(|| missing(weight, "expert absent"))?, which)
                    }
                    _ => unreachable!("matched above"),
                }
            }
            Weight::DenseFfn(l, which) => match &layer(l)?.ffn {
                FeedForward::Dense(e) => expert_part(e, which),
                FeedForward::Moe(_) => return Err(missing(weight, "an MoE layer")),
            },
            _ => return Err(missing(weight, "a vector, not a matrix")),
        };
        let (rows, cols) = weight.shape(&self.config);
        Ok(WeightMatrix { rows, cols, storage: MatrixStorage::F32(values) })
    }

    fn has_expert(&self, layer: usize, expert: usize) -> bool {
        matches!(self.layers.get(layer).map(|l| &l.ffn), Some(FeedForward::Moe(m)) if matches!(m.experts.get(expert), Some(Some(_))))
    }

    fn expert_activation_scales(&self, layer: usize) -> Result<Option<(f32, f32)>> {
        Ok(match self.layers.get(layer).map(|l| &l.ffn) {
            Some(FeedForward::Moe(m)) => m.fp8_act_scales,
            _ => None,
        })
    }

    fn vision(&self) -> Result<Option<Cow<'_, VisionWeights>>> {
        Ok(self.vision.as_ref().map(Cow::Borrowed))
    }

    fn check(&self) -> Result<()> {
        self.check_shapes()
    }
}

/// The weights of a checkpoint, read where they live: every matrix is a view into the memory-mapped shards
/// (any format and layout the engine reads), dequantised block by block when a product needs it; norms are read
/// when used. Nothing is loaded up front.
///
/// ```
/// use small4::model::checkpoint::{Checkpoint, Layout};
/// use small4::model::synthetic::{load_reference_weights, tiny_checkpoint, DEFAULT_TINY_SEED};
/// use small4::quant::WeightFormat;
/// use small4::reference::model::{ForwardOptions, ReferenceModel};
/// use small4::reference::weights::CheckpointWeights;
///
/// let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Nvfp4, &Layout::Native, DEFAULT_TINY_SEED)?)?;
/// let streaming = ReferenceModel::new(CheckpointWeights::new(&checkpoint)?, ForwardOptions::default())?;
/// let in_memory = ReferenceModel::new(load_reference_weights(&checkpoint)?, ForwardOptions::default())?;
/// let prompt = [1, 300, 301];
/// let logits = streaming.forward(&prompt, &mut streaming.new_cache())?;
/// assert_eq!(logits, in_memory.forward(&prompt, &mut in_memory.new_cache())?); // bit for bit
/// # Ok::<(), small4::Error>(())
/// ```
pub struct CheckpointWeights<'a> {
    checkpoint: &'a Checkpoint,
    config: ModelConfig,
}

impl<'a> CheckpointWeights<'a> {
    /// Parses the checkpoint's configuration; `Error::Config` / `Error::Json` when it does not parse or validate.
    pub fn new(checkpoint: &'a Checkpoint) -> Result<Self> {
        let config = ModelConfig::from_json_str(&checkpoint.config_json.to_string())?;
        config.validate()?;
        Ok(CheckpointWeights { checkpoint, config })
    }

    /// The checkpoint read.
    pub fn checkpoint(&self) -> &'a Checkpoint {
        self.checkpoint
    }
}

impl WeightSource for CheckpointWeights<'_> {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn vector(&self, weight: Weight) -> Result<Cow<'_, [f32]>> {
        let (_, len) = weight.shape(&self.config);
        let t = self.checkpoint.plain(&weight.native_name(), Dtype::BF16, &[len])?;
        Ok(Cow::Owned(t.data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()))
    }

    fn matrix(&self, weight: Weight) -> Result<WeightMatrix<'_>> {
        let c = &self.config;
        let (rows, cols) = weight.shape(c);
        let data = match weight {
            Weight::Output if c.tied_embeddings => self.checkpoint.matrix(&Weight::TokEmbeddings.native_name(), rows, cols)?,
            Weight::Expert { layer, expert, which } => self.checkpoint.expert_matrix(layer, expert, which, c.dim, c.expert_hidden)?,
            _ => self.checkpoint.matrix(&weight.native_name(), rows, cols)?,
        };
        Ok(WeightMatrix { rows, cols, storage: MatrixStorage::Stored(data) })
    }

    fn expert_activation_scales(&self, layer: usize) -> Result<Option<(f32, f32)>> {
        let c = &self.config;
        self.checkpoint.expert_activation_scales(layer, c.experts, c.dim, c.expert_hidden)
    }

    fn vision(&self) -> Result<Option<Cow<'_, VisionWeights>>> {
        self.config.vision.as_ref().map(|v| Ok(Cow::Owned(self.checkpoint.vision_weights(v, self.config.dim)?))).transpose()
    }
}

/// The synthetic model read as it is generated: the names are the native checkpoint's (`Weight::native_name`, with
/// `.weight` for the bf16 tables that are no quantisable linears), the values those of `SyntheticModel::matrix` and
/// `SyntheticModel::vector`. It has no vision tower and no activation scales.
///
/// ```
/// use small4::model::synth::SyntheticModel;
/// use small4::model::ModelConfig;
/// use small4::quant::WeightFormat;
/// use small4::reference::model::{ForwardOptions, ReferenceModel};
///
/// let synthetic = SyntheticModel::new(ModelConfig { n_layers: 2, ..ModelConfig::tiny() }, WeightFormat::Nvfp4, 5)?;
/// let streaming = ReferenceModel::new(synthetic.clone(), ForwardOptions::default())?;
/// let in_memory = ReferenceModel::new(synthetic.reference_weights()?, ForwardOptions::default())?;
/// let logits = streaming.forward(&[1, 2, 3], &mut streaming.new_cache())?;
/// assert_eq!(logits, in_memory.forward(&[1, 2, 3], &mut in_memory.new_cache())?); // bit for bit
/// # Ok::<(), small4::Error>(())
/// ```
impl WeightSource for SyntheticModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn vector(&self, weight: Weight) -> Result<Cow<'_, [f32]>> {
        let (_, len) = weight.shape(&self.config);
        Ok(Cow::Owned(SyntheticModel::vector(self, &weight.native_name(), len)?.iter().map(|v| v.to_f32()).collect()))
    }

    fn matrix(&self, weight: Weight) -> Result<WeightMatrix<'_>> {
        let (rows, cols) = weight.shape(&self.config);
        let name = match weight {
            Weight::TokEmbeddings | Weight::Output | Weight::Router(_) => format!("{}.weight", weight.native_name()),
            _ => weight.native_name(),
        };
        let spec = self.spec(&name)?;
        if (spec.rows, spec.cols) != (rows, cols) {
            return Err(Error::shape(format!("synthetic tensor {name}"), format!("[{rows}, {cols}]"), format!("[{}, {}]", spec.rows, spec.cols)));
        }
        let storage = match spec.kind {
            TensorKind::Matrix { format: WeightFormat::Bf16, .. } => MatrixStorage::Generated(spec),
            _ => MatrixStorage::Owned(spec.generate()?),
        };
        Ok(WeightMatrix { rows, cols, storage })
    }

    fn expert_activation_scales(&self, _layer: usize) -> Result<Option<(f32, f32)>> {
        Ok(None)
    }

    fn vision(&self) -> Result<Option<Cow<'_, VisionWeights>>> {
        Ok(None)
    }
}
