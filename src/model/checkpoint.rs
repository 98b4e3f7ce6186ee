//! Checkpoint files: the native Mistral layout (`params.json`, `consolidated-*.safetensors`, index) and the Hugging
//! Face layout (`config.json`, `model*.safetensors`, stacked experts), memory-mapped shard by shard.
//!
//! Tensors are addressed by their NATIVE name (`layers.3.attention.wq_a`); the HF layout is translated here, so the
//! rest of the crate sees one naming. Weight matrices come back as `MatrixData`, zero-copy views into the mapped
//! files in their checkpoint format (bf16, FP8 per-tensor, FP8 block-128, INT4 grouped, NVFP4): the loader repacks
//! them into the kernels' layouts while streaming to the device, so host memory never holds the whole model.
//!
//! A tour of an HF checkpoint (the tiny preset with FP8 experts): native names in, stored names and format-typed
//! views out.
//!
//! ```
//! use safetensors::Dtype;
//! use small4::model::checkpoint::{hf_name, vision_layer_prefix, Checkpoint, ExpertMatrix, Layout, MatrixData, StoredTensor};
//! use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED, HF_MISTRAL3_PREFIX, SYNTHETIC_ACT_SCALE};
//! use small4::model::ModelConfig;
//! use small4::quant::WeightFormat;
//!
//! let hf = Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.into() };
//! let ck = Checkpoint::open(tiny_checkpoint(WeightFormat::Fp8PerTensor, &hf, DEFAULT_TINY_SEED)?)?;
//! let c = ModelConfig::tiny();
//! assert_eq!(ck.layout, hf);
//! assert!(!ck.shard_paths().is_empty());
//!
//! // Native names are translated to the layout's stored names.
//! let stored = ck.stored_name("layers.0.attention.wq_a.weight");
//! assert_eq!(stored, "model.language_model.layers.0.self_attn.q_a_proj.weight");
//! assert_eq!(stored, hf_name("layers.0.attention.wq_a.weight", HF_MISTRAL3_PREFIX));
//! assert_eq!(hf_name("output.weight", HF_MISTRAL3_PREFIX), "lm_head.weight");
//! let wq = format!("{}.attention.wq.weight", vision_layer_prefix(1));
//! assert_eq!(wq, "vision_encoder.transformer.layers.1.attention.wq.weight");
//! assert_eq!(hf_name(&wq, HF_MISTRAL3_PREFIX), "model.vision_tower.transformer.layers.1.attention.q_proj.weight");
//!
//! // A plain tensor, checked against the dtype and shape the caller expects.
//! let norm: StoredTensor = ck.plain("norm.weight", Dtype::BF16, &[c.dim])?;
//! assert_eq!((norm.name, norm.shape, norm.data.len()), ("model.language_model.norm.weight", &[c.dim][..], 2 * c.dim));
//! assert_eq!(ck.stored("model.language_model.norm.weight")?.data, norm.data);
//! assert!(matches!(ck.plain("norm.weight", Dtype::BF16, &[c.dim + 1]), Err(small4::Error::Shape { .. })));
//! assert!(ck.stored("no.such.tensor").is_err());
//!
//! // Matrices come back in their stored format: FP8 attention (and experts, stacked in the HF layout).
//! let wq_a = ck.matrix("layers.0.attention.wq_a", c.q_lora_rank, c.dim)?;
//! assert_eq!(wq_a.format_name(), "fp8");
//! let w2 = ck.expert_matrix(0, 3, ExpertMatrix::W2, c.dim, c.expert_hidden)?; // [dim, hidden]
//! let MatrixData::Fp8PerTensor { data, .. } = &w2 else { panic!("FP8 experts, got {}", w2.format_name()) };
//! assert_eq!(data.len(), c.dim * c.expert_hidden);
//! // Attention keeps the writer's static activation scale, and so do the stacked HF experts (one f32 per expert in
//! // `experts.gate_up_proj_activation_scale` / `experts.down_proj_activation_scale`): W8A8 runs on them.
//! assert!(matches!(wq_a, MatrixData::Fp8PerTensor { activation_scale: Some(s), .. } if s == SYNTHETIC_ACT_SCALE));
//! assert!(matches!(w2, MatrixData::Fp8PerTensor { activation_scale: Some(s), .. } if s == SYNTHETIC_ACT_SCALE));
//! assert_eq!(ck.expert_activation_scales(0, c.experts, c.dim, c.expert_hidden)?, Some((SYNTHETIC_ACT_SCALE, SYNTHETIC_ACT_SCALE)));
//!
//! // The vision tower, in f32 and in the native (interleaved RoPE) row order.
//! let tower = c.vision.as_ref().unwrap();
//! let vision = ck.vision_weights(tower, c.dim)?;
//! assert_eq!(vision.layers.len(), tower.n_layers);
//! assert_eq!(vision.patch_conv.len(), tower.hidden * tower.num_channels * tower.patch_size * tower.patch_size);
//! # Ok::<(), small4::Error>(())
//! ```
//!
//! Writing: [`write_shards`] splits named tensors into shards and writes the index; a config file beside them makes
//! a directory [`Checkpoint::open`] reads.
//!
//! ```
//! use std::collections::BTreeMap;
//! use safetensors::Dtype;
//! use small4::model::checkpoint::{write_shards, Checkpoint, Layout, OwnedTensor};
//! use small4::model::{synthetic, ModelConfig};
//! use small4::Error;
//!
//! let dir = std::env::temp_dir().join(format!("small4-shards-doc-{}", std::process::id()));
//! let tensor = |values: &[f32]| OwnedTensor {
//!     dtype: Dtype::F32,
//!     shape: vec![values.len()],
//!     data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
//! };
//! let tensors = BTreeMap::from([("a.weight".to_string(), tensor(&[1.0, 2.0])), ("b.weight".to_string(), tensor(&[3.0; 4]))]);
//! let shards = write_shards(&dir, &Layout::Native, &tensors, 8)?; // 8 bytes a shard: "a" fills one, "b" gets its own
//! assert_eq!(shards.len(), 2);
//! let params = dir.join("params.json");
//! std::fs::write(&params, synthetic::params_json(&ModelConfig::tiny()).to_string()).map_err(|e| Error::io(&params, e))?;
//!
//! let ck = Checkpoint::open(&dir)?;
//! assert_eq!(ck.shard_paths(), shards.iter().map(|p| p.as_path()).collect::<Vec<_>>());
//! assert_eq!(ck.stored_names(), vec!["a.weight", "b.weight"]);
//! let b = ck.plain("b.weight", Dtype::F32, &[4])?;
//! assert_eq!(b.data, tensors["b.weight"].data.as_slice());
//! std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
//! # Ok::<(), small4::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::tensor::{Metadata, TensorInfo};
/// The element type of a stored tensor, as the safetensors header names it (re-exported: [`StoredTensor::dtype`] and
/// [`OwnedTensor`] carry it, so a dependent needs no `safetensors` dependency of its own).
pub use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::model::ModelConfig;

/// Which file layout a checkpoint directory uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Layout {
    /// `params.json` + `consolidated*.safetensors`.
    Native,
    /// `config.json` + `model*.safetensors`; `prefix` is `model.language_model.` (mistral3) or `model.` (text-only).
    HuggingFace {
        /// What precedes a text tensor's HF name, chosen when opening by whether any stored name starts with
        /// `model.language_model.`.
        prefix: String,
    },
}

/// One mapped `.safetensors` file with its parsed header.
struct Shard {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

/// A tensor as stored: dtype, shape and its bytes inside the mapped file.
#[derive(Clone, Copy, Debug)]
pub struct StoredTensor<'a> {
    /// The stored name (HF names in an HF checkpoint).
    pub name: &'a str,
    /// The safetensors dtype as stored.
    pub dtype: Dtype,
    /// Dimensions as stored, outermost first.
    pub shape: &'a [usize],
    /// The raw little-endian bytes, borrowed from the mapped shard.
    pub data: &'a [u8],
}

impl StoredTensor<'_> {
    fn expect(&self, dtypes: &[Dtype], shape: &[usize]) -> Result<()> {
        if !dtypes.contains(&self.dtype) {
            return Err(Error::Checkpoint(format!("tensor {} has dtype {:?}, expected one of {dtypes:?}", self.name, self.dtype)));
        }
        if self.shape != shape {
            return Err(Error::shape(format!("checkpoint tensor {}", self.name), format!("{shape:?}"), format!("{:?}", self.shape)));
        }
        Ok(())
    }

    /// An F32 scalar stored with shape `[]` or `[1]` (both occur in the published checkpoints).
    fn scalar_f32(&self) -> Result<f32> {
        if self.dtype != Dtype::F32 || self.shape.iter().product::<usize>() != 1 || self.shape.len() > 1 {
            return Err(Error::Checkpoint(format!("tensor {} should be an F32 scalar ([] or [1]), found {:?} {:?}", self.name, self.dtype, self.shape)));
        }
        Ok(f32::from_le_bytes(self.data[..4].try_into().unwrap()))
    }
}

/// A weight matrix `[rows = out, cols = in]` in its checkpoint format, borrowing the mapped bytes.
#[derive(Clone, Debug)]
pub enum MatrixData<'a> {
    /// Plain bf16, row-major.
    Bf16 {
        /// `[rows, cols]` bf16, little-endian.
        data: &'a [u8],
    },
    /// W = e4m3 * scale (`qscale_weight`); `activation_scale` is the static input scale when present.
    Fp8PerTensor {
        /// `[rows, cols]` e4m3 bytes.
        data: &'a [u8],
        /// The matrix's dequantisation scale (`qscale_weight`).
        scale: f32,
        /// The static activation scale (`qscale_act`) for W8A8, when the checkpoint has one.
        activation_scale: Option<f32>,
    },
    /// DeepSeek style: `scales` `[ceil(rows/128), ceil(cols/128)]` F32, W = e4m3 * scale of the block.
    Fp8Block128 {
        /// `[rows, cols]` e4m3 bytes.
        data: &'a [u8],
        /// One f32 per 128x128 block, little-endian.
        scales: &'a [u8],
    },
    /// `packed` `[rows, cols/2]` (low nibble = even column), `scales` BF16 `[rows, cols/group]`, optional zero points
    /// U8 `[rows, cols/group]` (0..=15); W = (q - 8) * s, or (q - z) * s.
    Int4 {
        /// Two 4-bit values per byte.
        packed: &'a [u8],
        /// One bf16 scale per group of a row.
        scales: &'a [u8],
        /// One u8 zero point per group of a row; `None`: symmetric (zero point 8).
        zeros: Option<&'a [u8]>,
        /// Columns per scale group.
        group: usize,
    },
    /// `packed` `[rows, cols/2]`, `scales` e4m3 `[rows, cols/16]`, W = e2m1 * scale / global_scale.
    Nvfp4 {
        /// Two e2m1 values per byte (low nibble = even column).
        packed: &'a [u8],
        /// One e4m3 scale per 16 columns of a row.
        scales: &'a [u8],
        /// The divisor of every block scale (`weight_global_scale`).
        global_scale: f32,
        /// The activations' global scale (`input_global_scale`), when the checkpoint has one.
        input_global_scale: Option<f32>,
    },
}

impl MatrixData<'_> {
    /// The format's short name, as error messages and reports give it: "bf16", "fp8", "fp8-block128", "int4",
    /// "nvfp4".
    pub fn format_name(&self) -> &'static str {
        match self {
            MatrixData::Bf16 { .. } => "bf16",
            MatrixData::Fp8PerTensor { .. } => "fp8",
            MatrixData::Fp8Block128 { .. } => "fp8-block128",
            MatrixData::Int4 { .. } => "int4",
            MatrixData::Nvfp4 { .. } => "nvfp4",
        }
    }
}

impl<'a> MatrixData<'a> {
    /// Rows `rows` of a `[_, cols]` matrix as a view of the same format, borrowing the same bytes: what the CPU
    /// reference dequantises one block of rows at a time. FP8 block-128 scales change every 128 rows, so such a
    /// slice must start on a multiple of 128 (`Error::InvalidArgument` otherwise); `Error::OutOfRange` when the rows
    /// run past the data.
    ///
    /// ```
    /// use small4::model::checkpoint::MatrixData;
    /// use small4::quant::{QuantizedMatrix, WeightFormat};
    ///
    /// let weights: Vec<f32> = (0..4 * 32).map(|i| (i / 32) as f32).collect(); // row r holds r
    /// let q = QuantizedMatrix::quantize(WeightFormat::Nvfp4, &weights, 4, 32)?;
    /// let view = MatrixData::from(&q);
    /// let rows = view.slice_rows(1..3, 32)?.to_quantized(2, 32)?.dequantize();
    /// assert_eq!(rows, q.dequantize()[32..3 * 32]);
    /// assert!(view.slice_rows(3..5, 32).is_err()); // past the end
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn slice_rows(&self, rows: std::ops::Range<usize>, cols: usize) -> Result<MatrixData<'a>> {
        let (first, end) = (rows.start, rows.end.max(rows.start));
        // The bytes of `per_row` bytes a row for these rows, checked against the stored length.
        let part = |data: &'a [u8], per_row: usize| -> Result<&'a [u8]> {
            data.get(first * per_row..end * per_row).ok_or_else(|| Error::OutOfRange {
                what: "matrix row".into(),
                index: end as i64 - 1,
                limit: (data.len() / per_row.max(1)) as i64,
            })
        };
        Ok(match *self {
            MatrixData::Bf16 { data } => MatrixData::Bf16 { data: part(data, 2 * cols)? },
            MatrixData::Fp8PerTensor { data, scale, activation_scale } => MatrixData::Fp8PerTensor { data: part(data, cols)?, scale, activation_scale },
            MatrixData::Fp8Block128 { data, scales } => {
                if first % 128 != 0 {
                    return Err(Error::InvalidArgument(format!("fp8 block-128 rows from {first}: a slice starts on a 128-row block")));
                }
                let block_bytes = 4 * cols.div_ceil(128);
                let blocks = scales.get(first / 128 * block_bytes..end.div_ceil(128) * block_bytes).ok_or_else(|| Error::OutOfRange {
                    what: "fp8 block-128 scale row".into(),
                    index: end.div_ceil(128) as i64 - 1,
                    limit: (scales.len() / block_bytes.max(1)) as i64,
                })?;
                MatrixData::Fp8Block128 { data: part(data, cols)?, scales: blocks }
            }
            MatrixData::Int4 { packed, scales, zeros, group } => {
                let groups = cols / group.max(1);
                MatrixData::Int4 {
                    packed: part(packed, cols / 2)?,
                    scales: part(scales, 2 * groups)?,
                    zeros: zeros.map(|z| part(z, groups)).transpose()?,
                    group,
                }
            }
            MatrixData::Nvfp4 { packed, scales, global_scale, input_global_scale } => {
                MatrixData::Nvfp4 { packed: part(packed, cols / 2)?, scales: part(scales, cols / 16)?, global_scale, input_global_scale }
            }
        })
    }
}

/// A quantised matrix seen as checkpoint data (no activation scales): the CPU reference reads generated matrices
/// through the same views as mapped ones.
impl<'a> From<&'a crate::quant::QuantizedMatrix> for MatrixData<'a> {
    fn from(m: &'a crate::quant::QuantizedMatrix) -> Self {
        use crate::quant::QuantizedMatrix;
        match m {
            QuantizedMatrix::Bf16 { data, .. } => MatrixData::Bf16 { data: bytemuck::cast_slice(data) },
            QuantizedMatrix::Fp8PerTensor(q) => MatrixData::Fp8PerTensor { data: &q.data, scale: q.scale, activation_scale: None },
            QuantizedMatrix::Fp8Block128(q) => MatrixData::Fp8Block128 { data: &q.data, scales: bytemuck::cast_slice(&q.scales) },
            QuantizedMatrix::Int4(q) => {
                MatrixData::Int4 { packed: &q.packed, scales: bytemuck::cast_slice(&q.scales), zeros: q.zeros.as_deref(), group: q.group }
            }
            QuantizedMatrix::Nvfp4(q) => MatrixData::Nvfp4 { packed: &q.packed, scales: &q.scales, global_scale: q.global_scale, input_global_scale: None },
        }
    }
}

/// Which matrix of a SwiGLU expert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpertMatrix {
    /// gate projection `[hidden, dim]`
    W1,
    /// down projection `[dim, hidden]`
    W2,
    /// up projection `[hidden, dim]`
    W3,
}

/// An open checkpoint directory: its configuration and every shard memory-mapped, tensors read on demand by name
/// (see [`Checkpoint::open`]).
pub struct Checkpoint {
    /// The directory it was opened from.
    pub dir: PathBuf,
    /// The file layout detected when opening.
    pub layout: Layout,
    /// The raw `params.json` or `config.json`; `ModelConfig` parses it.
    pub config_json: serde_json::Value,
    shards: Vec<Shard>,
    /// Stored tensor name -> shard index.
    index: HashMap<String, usize>,
}

const NATIVE_CONFIG: &str = "params.json";
const HF_CONFIG: &str = "config.json";

impl Checkpoint {
    /// Opens a checkpoint directory: detects the layout, maps every shard and reads their headers (not the data).
    /// `Error::Checkpoint` when the directory has neither `params.json` nor `config.json`, or a tensor appears in two
    /// shards or a shard is malformed; `Error::Io` / `Error::Json` when the config cannot be read or parsed.
    ///
    /// ```
    /// use small4::model::checkpoint::{Checkpoint, Layout};
    /// use small4::model::{synthetic, Config};
    ///
    /// let dir = synthetic::tiny_checkpoint(small4::quant::WeightFormat::Bf16, &Layout::Native, synthetic::DEFAULT_TINY_SEED)?;
    /// let checkpoint = Checkpoint::open(&dir)?;
    /// assert_eq!(checkpoint.layout, Layout::Native);
    /// let config = Config::from_json_str(&checkpoint.config_json.to_string())?;
    /// assert!(checkpoint.stored_names().len() > 10 * config.n_layers);
    /// assert!(Checkpoint::open(dir.join("missing")).is_err()); // a typed error, not a panic
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn open(dir: impl AsRef<Path>) -> Result<Checkpoint> {
        let (checkpoint, problems) = Self::open_listing_problems(dir)?;
        match problems.into_iter().next() {
            Some(first) => Err(first),
            None => Ok(checkpoint),
        }
    }

    /// [`Checkpoint::open`] that goes on past what is wrong with the shards, for `small4 inspect`: returns the
    /// checkpoint of every shard that could be read, and every problem found on the way (a missing, truncated or
    /// malformed shard, an unreadable index, a tensor in two shards: the second copy is dropped). Only a directory
    /// without a readable config file is an error.
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// use small4::model::checkpoint::{write_shards, Checkpoint, Dtype, Layout, OwnedTensor};
    ///
    /// let dir = std::env::temp_dir().join(format!("small4-listing-doc-{}", std::process::id()));
    /// let tensor = |v: f32| OwnedTensor { dtype: Dtype::F32, shape: vec![1], data: v.to_le_bytes().to_vec() };
    /// let tensors = BTreeMap::from([("a".to_string(), tensor(1.0)), ("b".to_string(), tensor(2.0)), ("c".to_string(), tensor(3.0))]);
    /// let shards = write_shards(&dir, &Layout::Native, &tensors, 4)?; // one tensor a shard
    /// std::fs::write(dir.join("params.json"), "{}").unwrap();
    /// // Two shards cut short: `open` stops at the first, the listing names both and keeps the third.
    /// for shard in &shards[..2] {
    ///     let bytes = std::fs::read(shard).unwrap();
    ///     std::fs::write(shard, &bytes[..bytes.len() - 1]).unwrap();
    /// }
    /// assert!(matches!(Checkpoint::open(&dir), Err(small4::Error::Checkpoint(_))));
    /// let (partial, problems) = Checkpoint::open_listing_problems(&dir)?;
    /// assert_eq!(problems.len(), 2);
    /// assert!(problems.iter().all(|p| p.to_string().contains("truncated")), "{problems:?}");
    /// assert_eq!(partial.stored_names(), vec!["c"]);
    /// std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn open_listing_problems(dir: impl AsRef<Path>) -> Result<(Checkpoint, Vec<Error>)> {
        let dir = dir.as_ref().to_path_buf();
        let (config_name, native) = if dir.join(NATIVE_CONFIG).exists() {
            (NATIVE_CONFIG, true)
        } else if dir.join(HF_CONFIG).exists() {
            (HF_CONFIG, false)
        } else {
            return Err(Error::Checkpoint(format!("{} has neither {NATIVE_CONFIG} nor {HF_CONFIG}", dir.display())));
        };
        let config_path = dir.join(config_name);
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config_json: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { what: config_path.display().to_string(), source })?;

        let mut problems = Vec::new();
        let shard_paths = shard_files(&dir, native).unwrap_or_else(|e| {
            problems.push(e);
            Vec::new()
        });
        let mut shards: Vec<Shard> = Vec::with_capacity(shard_paths.len());
        let mut index = HashMap::new();
        for path in shard_paths {
            let mut shard = match map_shard(&path) {
                Ok(shard) => shard,
                Err(e) => {
                    problems.push(e);
                    continue;
                }
            };
            shard.tensors.retain(|name, _| match index.get(name) {
                Some(&previous) => {
                    let first: &Shard = &shards[previous];
                    problems.push(Error::Checkpoint(format!("tensor {name} appears in both {} and {}", first.path.display(), path.display())));
                    false
                }
                None => true,
            });
            for name in shard.tensors.keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(shard);
        }
        let layout = if native {
            Layout::Native
        } else {
            let prefix = if index.keys().any(|k| k.starts_with("model.language_model.")) { "model.language_model." } else { "model." };
            Layout::HuggingFace { prefix: prefix.to_string() }
        };
        Ok((Checkpoint { dir, layout, config_json, shards, index }, problems))
    }

    /// The model configuration of the config file ([`ModelConfig::from_json_str`]) as the loaders use it: a vision
    /// section whose weights the shards do not hold at all is dropped, so the model loads text-only
    /// ([`Checkpoint::text_only_notice`] says so). Some vision weights but not all is a malformed checkpoint: the
    /// vision section stays and loading it names the missing tensor.
    ///
    /// A text-only copy of the tiny HF checkpoint (every tensor but the tower's and the projector's, the same
    /// config.json):
    ///
    /// ```
    /// use std::collections::BTreeMap;
    /// use small4::model::checkpoint::{write_shards, Checkpoint, Layout, OwnedTensor};
    /// use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED, HF_MISTRAL3_PREFIX};
    /// use small4::model::ModelConfig;
    /// use small4::quant::WeightFormat;
    ///
    /// let hf = Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.into() };
    /// let full = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &hf, DEFAULT_TINY_SEED)?)?;
    /// let text: BTreeMap<String, OwnedTensor> = full
    ///     .stored_names()
    ///     .into_iter()
    ///     .filter(|name| !name.starts_with("model.vision_tower.") && !name.starts_with("model.multi_modal_projector."))
    ///     .map(|name| {
    ///         let t = full.stored(name).unwrap();
    ///         (name.to_string(), OwnedTensor { dtype: t.dtype, shape: t.shape.to_vec(), data: t.data.to_vec() })
    ///     })
    ///     .collect();
    /// let dir = std::env::temp_dir().join(format!("small4-text-only-doc-{}", std::process::id()));
    /// write_shards(&dir, &hf, &text, 1 << 20)?;
    /// std::fs::copy(full.dir.join("config.json"), dir.join("config.json")).unwrap();
    ///
    /// let ck = Checkpoint::open(&dir)?;
    /// assert!(ModelConfig::from_json_str(&ck.config_json.to_string())?.vision.is_some()); // the file describes a tower
    /// assert!(ck.model_config()?.vision.is_none()); // that the shards do not hold: text-only
    /// assert!(ck.text_only_notice().unwrap().contains("text-only"));
    /// assert!(full.model_config()?.vision.is_some() && full.text_only_notice().is_none());
    /// std::fs::remove_dir_all(&dir).unwrap();
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn model_config(&self) -> Result<ModelConfig> {
        let mut config = ModelConfig::from_json_str(&self.config_json.to_string())?;
        if config.vision.is_some() && !self.has_vision_weights() {
            config.vision = None;
        }
        Ok(config)
    }

    /// A line for the user when the config file describes a vision tower but the shards hold none of its weights
    /// (a text-only export of a multimodal model): the model loads text-only and images are refused. `small4 generate`
    /// and `small4 inspect` print it. None for a checkpoint that holds its tower, or has none
    /// ([`Checkpoint::model_config`] has an example of both).
    pub fn text_only_notice(&self) -> Option<String> {
        let config = ModelConfig::from_json_str(&self.config_json.to_string()).ok()?;
        (config.vision.is_some() && !self.has_vision_weights())
            .then(|| format!("notice: {} describes a vision tower but holds none of its weights: loaded as text-only (images are refused)", self.dir.display()))
    }

    /// Whether any stored tensor belongs to the vision tower or its projector (either layout's names).
    fn has_vision_weights(&self) -> bool {
        const VISION_ROOTS: &[&str] =
            &["vision_encoder.", "pre_mm_projector_norm.", "patch_merger.", "vision_language_adapter.", "vision_tower.", "multi_modal_projector."];
        self.index.keys().any(|name| {
            let name = name.strip_prefix("model.").unwrap_or(name);
            VISION_ROOTS.iter().any(|root| name.starts_with(root))
        })
    }

    /// Every stored tensor name, sorted.
    pub fn stored_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.index.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The mapped `.safetensors` files, in the order they were opened.
    pub fn shard_paths(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// A tensor by its STORED name; `Error::Checkpoint` when no shard has it.
    pub fn stored(&self, name: &str) -> Result<StoredTensor<'_>> {
        self.stored_opt(name)?.ok_or_else(|| Error::Checkpoint(format!("missing tensor {name} in {}", self.dir.display())))
    }

    fn stored_opt(&self, name: &str) -> Result<Option<StoredTensor<'_>>> {
        let Some(&i) = self.index.get(name) else { return Ok(None) };
        let shard = &self.shards[i];
        let (key, info) = shard.tensors.get_key_value(name).unwrap();
        let (start, end) = info.data_offsets;
        Ok(Some(StoredTensor { name: key, dtype: info.dtype, shape: &info.shape, data: &shard.map[shard.data_start + start..shard.data_start + end] }))
    }

    /// The stored name of a native tensor name (without the `.weight`-style suffix handling).
    pub fn stored_name(&self, native: &str) -> String {
        match &self.layout {
            Layout::Native => native.to_string(),
            Layout::HuggingFace { prefix } => hf_name(native, prefix),
        }
    }

    /// A plain (bf16 or f32) tensor by native name, e.g. `norm.weight`, checked against `shape`: `Error::Checkpoint`
    /// when missing or of another dtype, `Error::Shape` when of another shape.
    pub fn plain(&self, native: &str, dtype: Dtype, shape: &[usize]) -> Result<StoredTensor<'_>> {
        let t = self.stored(&self.stored_name(native))?;
        t.expect(&[dtype], shape)?;
        Ok(t)
    }

    /// A weight matrix by native base name (`layers.0.attention.wq_a`), in whatever format the checkpoint stores it.
    pub fn matrix(&self, native_base: &str, rows: usize, cols: usize) -> Result<MatrixData<'_>> {
        let base = self.stored_name(&format!("{native_base}.weight"));
        let base = base.strip_suffix(".weight").unwrap_or(&base).to_string();
        self.matrix_at(&base, rows, cols, None)
    }

    /// One expert's matrix. Native checkpoints store each expert alone; HF checkpoints stack all experts
    /// (`mlp.experts.gate_up_proj` `[E, 2*hidden, dim]` gate rows first, `mlp.experts.down_proj` `[E, dim, hidden]`;
    /// FP8 stacks carry `{stack}_scale_inv` `[E, 1, 1]` and optionally the static activation scales
    /// `{stack}_activation_scale` `[E]`).
    pub fn expert_matrix(&self, layer: usize, expert: usize, which: ExpertMatrix, dim: usize, hidden: usize) -> Result<MatrixData<'_>> {
        let (rows, cols) = match which {
            ExpertMatrix::W1 | ExpertMatrix::W3 => (hidden, dim),
            ExpertMatrix::W2 => (dim, hidden),
        };
        match &self.layout {
            Layout::Native => {
                let name = match which {
                    ExpertMatrix::W1 => "w1",
                    ExpertMatrix::W2 => "w2",
                    ExpertMatrix::W3 => "w3",
                };
                self.matrix_at(&format!("layers.{layer}.experts.{expert}.{name}"), rows, cols, None)
            }
            Layout::HuggingFace { prefix } => {
                // Per-expert tensors (compressed-tensors exports, 4-bit formats) first, then transformers' stacks.
                let per_expert = match which {
                    ExpertMatrix::W1 => "gate_proj",
                    ExpertMatrix::W2 => "down_proj",
                    ExpertMatrix::W3 => "up_proj",
                };
                let base = format!("{prefix}layers.{layer}.mlp.experts.{expert}.{per_expert}");
                if ["weight", "weight_packed"].iter().any(|s| self.index.contains_key(&format!("{base}.{s}"))) {
                    return self.matrix_at(&base, rows, cols, None);
                }
                let (stacked, row_offset, stacked_rows) = match which {
                    ExpertMatrix::W1 => ("gate_up_proj", 0, 2 * hidden),
                    ExpertMatrix::W3 => ("gate_up_proj", hidden, 2 * hidden),
                    ExpertMatrix::W2 => ("down_proj", 0, dim),
                };
                let base = format!("{prefix}layers.{layer}.mlp.experts.{stacked}");
                self.matrix_at(&base, rows, cols, Some(StackedSlice { expert, row_offset, stacked_rows }))
            }
        }
    }

    /// The static activation scales (`qscale_act`) of layer `layer`'s routed experts, for W8A8: (the largest over the
    /// experts' w1 and w3, the largest over their w2). One quantised copy of a token's row feeds all of its experts,
    /// so one scale per projection (the largest: nothing saturates that would not for some expert). None unless every
    /// expert matrix is per-tensor FP8 with an activation scale.
    pub fn expert_activation_scales(&self, layer: usize, experts: usize, dim: usize, hidden: usize) -> Result<Option<(f32, f32)>> {
        let (mut up, mut down) = (0f32, 0f32);
        for e in 0..experts {
            for which in [ExpertMatrix::W1, ExpertMatrix::W3, ExpertMatrix::W2] {
                let MatrixData::Fp8PerTensor { activation_scale: Some(scale), .. } = self.expert_matrix(layer, e, which, dim, hidden)? else {
                    return Ok(None);
                };
                let max = if which == ExpertMatrix::W2 { &mut down } else { &mut up };
                *max = max.max(scale);
            }
        }
        Ok(Some((up, down)))
    }

    /// Reads a matrix stored under `base` (`base` itself, or `base.weight`, `base.weight_packed`, ...).
    fn matrix_at(&self, base: &str, rows: usize, cols: usize, stacked: Option<StackedSlice>) -> Result<MatrixData<'_>> {
        // HF stores the stacked experts without a `.weight` suffix; everything else has one.
        let weight = self.stored_opt(&format!("{base}.weight"))?.or(self.stored_opt(base)?);
        let suffix = |s: &str| self.stored_opt(&format!("{base}.{s}"));
        let stacked_scale = |s: &str| self.stored_opt(&format!("{base}_{s}"));
        if let Some(w) = weight {
            return match w.dtype {
                Dtype::BF16 => Ok(MatrixData::Bf16 { data: matrix_bytes(&w, 16, rows, cols, stacked)? }),
                Dtype::F8_E4M3 => {
                    let data = matrix_bytes(&w, 8, rows, cols, stacked)?;
                    if let Some(scale) = suffix("qscale_weight")? {
                        let activation_scale = suffix("qscale_act")?.map(|t| t.scalar_f32()).transpose()?;
                        Ok(MatrixData::Fp8PerTensor { data, scale: scale.scalar_f32()?, activation_scale })
                    } else if let Some(scales) = suffix("weight_scale_inv")?.filter(|t| t.shape.len() == 2 && stacked.is_none()) {
                        scales.expect(&[Dtype::F32], &[rows.div_ceil(128), cols.div_ceil(128)])?;
                        Ok(MatrixData::Fp8Block128 { data, scales: scales.data })
                    } else if let Some(scale) = suffix("weight_scale_inv")?.or(stacked_scale("scale_inv")?) {
                        // HF per-tensor FP8: scalar, or [E,1,1] for stacked experts (gate and up share one).
                        let value = match stacked {
                            Some(st) if scale.shape.len() == 3 => per_expert_scalar(&scale, st.expert)?,
                            _ => scale.scalar_f32()?,
                        };
                        // Static activation scales: a scalar beside a matrix, one f32 per expert beside a stack
                        // (`experts.gate_up_proj_activation_scale`, transformers' fine-grained FP8 layout).
                        let act = match stacked {
                            Some(st) => stacked_scale("activation_scale")?.map(|t| per_expert_vector(&t, st.expert)).transpose()?,
                            None => suffix("activation_scale")?.map(|t| t.scalar_f32()).transpose()?,
                        };
                        Ok(MatrixData::Fp8PerTensor { data, scale: value, activation_scale: act })
                    } else {
                        Err(Error::Checkpoint(format!("FP8 tensor {} has no scale (qscale_weight / weight_scale_inv)", w.name)))
                    }
                }
                other => Err(Error::UnknownDtype(format!("{other:?} for weight {}", w.name))),
            };
        }
        let packed =
            suffix("weight_packed")?.ok_or_else(|| Error::Checkpoint(format!("missing tensor {base}.weight (or .weight_packed) in {}", self.dir.display())))?;
        if packed.dtype != Dtype::U8 {
            return Err(Error::UnknownDtype(format!("{:?} for packed weight {}", packed.dtype, packed.name)));
        }
        if stacked.is_some() {
            return Err(Error::Checkpoint(format!("packed 4-bit weights must be stored per expert, found stacked {base}")));
        }
        if cols % 2 != 0 {
            return Err(Error::shape(format!("{base}: 4-bit columns"), "an even count", cols));
        }
        packed.expect(&[Dtype::U8], &[rows, cols / 2])?;
        let scale = suffix("weight_scale")?.ok_or_else(|| Error::Checkpoint(format!("missing tensor {base}.weight_scale")))?;
        match scale.dtype {
            Dtype::F8_E4M3 => {
                if cols % 16 != 0 {
                    return Err(Error::shape(format!("{base}: NVFP4 columns"), "a multiple of 16", cols));
                }
                scale.expect(&[Dtype::F8_E4M3], &[rows, cols / 16])?;
                let global =
                    suffix("weight_global_scale")?.ok_or_else(|| Error::Checkpoint(format!("missing tensor {base}.weight_global_scale")))?.scalar_f32()?;
                if !(global.is_finite() && global > 0.0) {
                    return Err(Error::Checkpoint(format!("{base}.weight_global_scale is {global}, must be finite and > 0")));
                }
                let input_global_scale = suffix("input_global_scale")?.map(|t| t.scalar_f32()).transpose()?;
                Ok(MatrixData::Nvfp4 { packed: packed.data, scales: scale.data, global_scale: global, input_global_scale })
            }
            Dtype::BF16 => {
                let groups = *scale.shape.get(1).unwrap_or(&0);
                if scale.shape.len() != 2 || groups == 0 || cols % groups != 0 {
                    return Err(Error::shape(scale.name.to_string(), format!("[{rows}, {cols}/group]"), format!("{:?}", scale.shape)));
                }
                scale.expect(&[Dtype::BF16], &[rows, groups])?;
                let zeros = suffix("weight_zero_point")?;
                if let Some(z) = &zeros {
                    z.expect(&[Dtype::U8], &[rows, groups])?;
                }
                Ok(MatrixData::Int4 { packed: packed.data, scales: scale.data, zeros: zeros.map(|z| z.data), group: cols / groups })
            }
            other => Err(Error::UnknownDtype(format!("{other:?} for 4-bit scale {}", scale.name))),
        }
    }
}

impl Checkpoint {
    /// The vision tower and projector in f32, by native name in either layout. HF stores the tower's `wq`/`wk` rows
    /// permuted for rotate-half RoPE; they come back in the native interleaved order.
    pub fn vision_weights(&self, v: &crate::model::VisionConfig, text_dim: usize) -> Result<crate::reference::vision::VisionWeights> {
        use crate::reference::vision::{permute_rows_from_hf, VisionLayerWeights, VisionWeights};
        let plain = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
            let t = self.plain(name, Dtype::BF16, shape)?;
            Ok(t.data.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
        };
        let matrix =
            |base: &str, rows: usize, cols: usize| -> Result<Vec<f32>> { Ok(self.matrix(base, rows, cols)?.to_quantized(rows, cols)?.dequantize_for_gemm()) };
        let rope_rows = |w: Vec<f32>| match self.layout {
            Layout::Native => w,
            Layout::HuggingFace { .. } => permute_rows_from_hf(&w, v.head_dim, v.hidden),
        };
        let (h, p, m) = (v.hidden, v.patch_size, v.spatial_merge_size);
        let layers = (0..v.n_layers)
            .map(|l| {
                let at = vision_layer_prefix(l);
                Ok(VisionLayerWeights {
                    attention_norm: plain(&format!("{at}.attention_norm.weight"), &[h])?,
                    wq: rope_rows(matrix(&format!("{at}.attention.wq"), h, h)?),
                    wk: rope_rows(matrix(&format!("{at}.attention.wk"), h, h)?),
                    wv: matrix(&format!("{at}.attention.wv"), h, h)?,
                    wo: matrix(&format!("{at}.attention.wo"), h, h)?,
                    ffn_norm: plain(&format!("{at}.ffn_norm.weight"), &[h])?,
                    w1: matrix(&format!("{at}.feed_forward.w1"), v.intermediate, h)?,
                    w3: matrix(&format!("{at}.feed_forward.w3"), v.intermediate, h)?,
                    w2: matrix(&format!("{at}.feed_forward.w2"), h, v.intermediate)?,
                })
            })
            .collect::<Result<_>>()?;
        let bias = |name: &str| v.adapter_bias.then(|| plain(name, &[text_dim])).transpose();
        let weights = VisionWeights {
            patch_conv: plain("vision_encoder.patch_conv.weight", &[h, v.num_channels, p, p])?,
            ln_pre: plain("vision_encoder.ln_pre.weight", &[h])?,
            layers,
            pre_mm_projector_norm: plain("pre_mm_projector_norm.weight", &[h])?,
            merging_layer: matrix("patch_merger.merging_layer", h, h * m * m)?,
            w_in: matrix("vision_language_adapter.w_in", text_dim, h)?,
            w_in_bias: bias("vision_language_adapter.w_in.bias")?,
            w_out: matrix("vision_language_adapter.w_out", text_dim, text_dim)?,
            w_out_bias: bias("vision_language_adapter.w_out.bias")?,
        };
        weights.check_shapes(v, text_dim)?;
        Ok(weights)
    }
}

#[derive(Clone, Copy)]
struct StackedSlice {
    expert: usize,
    row_offset: usize,
    stacked_rows: usize,
}

/// The bytes of a [rows, cols] matrix of `elem_bits`-bit elements: the whole tensor, or one expert's rows of a
/// stacked [E, stacked_rows, cols] tensor.
fn matrix_bytes<'a>(t: &StoredTensor<'a>, elem_bits: usize, rows: usize, cols: usize, stacked: Option<StackedSlice>) -> Result<&'a [u8]> {
    let row_bytes = cols * elem_bits / 8;
    match stacked {
        None => {
            t.expect(&[t.dtype], &[rows, cols])?;
            Ok(t.data)
        }
        Some(st) => {
            if t.shape.len() != 3 || t.shape[1] != st.stacked_rows || t.shape[2] != cols || st.expert >= t.shape[0] {
                return Err(Error::shape(
                    format!("stacked checkpoint tensor {} (expert {})", t.name, st.expert),
                    format!("[E > {}, {}, {cols}]", st.expert, st.stacked_rows),
                    format!("{:?}", t.shape),
                ));
            }
            let start = (st.expert * st.stacked_rows + st.row_offset) * row_bytes;
            Ok(&t.data[start..start + rows * row_bytes])
        }
    }
}

fn per_expert_scalar(t: &StoredTensor<'_>, expert: usize) -> Result<f32> {
    if t.dtype != Dtype::F32 || t.shape.len() != 3 || t.shape[1] != 1 || t.shape[2] != 1 || expert >= t.shape[0] {
        return Err(Error::Checkpoint(format!("{} should be F32 [E,1,1] covering expert {expert}, found {:?} {:?}", t.name, t.dtype, t.shape)));
    }
    Ok(f32::from_le_bytes(t.data[expert * 4..expert * 4 + 4].try_into().unwrap()))
}

/// Expert `expert`'s value of a per-expert f32 vector: `[E]`, or `[E, 1]` / `[E, 1, 1]` as some exporters keep it.
fn per_expert_vector(t: &StoredTensor<'_>, expert: usize) -> Result<f32> {
    let experts = t.shape.first().copied().unwrap_or(0);
    if t.dtype != Dtype::F32 || t.shape.is_empty() || t.shape[1..].iter().any(|&d| d != 1) || expert >= experts {
        return Err(Error::Checkpoint(format!(
            "{} should be F32 [E] (one value per expert) covering expert {expert}, found {:?} {:?}",
            t.name, t.dtype, t.shape
        )));
    }
    Ok(f32::from_le_bytes(t.data[expert * 4..expert * 4 + 4].try_into().unwrap()))
}

/// The HF name of a native tensor name (non-expert tensors; experts are stacked, see `expert_matrix`).
pub fn hf_name(native: &str, prefix: &str) -> String {
    if let Some(name) = hf_vision_name(native, prefix) {
        return name;
    }
    const TOP: &[(&str, &str)] = &[("tok_embeddings.weight", "embed_tokens.weight"), ("norm.weight", "norm.weight")];
    if native.starts_with("output.") {
        return native.replacen("output.", "lm_head.", 1);
    }
    if let Some((_, hf)) = TOP.iter().find(|(n, _)| *n == native) {
        return format!("{prefix}{hf}");
    }
    const LAYER: &[(&str, &str)] = &[
        ("attention_norm.", "input_layernorm."),
        ("ffn_norm.", "post_attention_layernorm."),
        ("attention.wq_a.", "self_attn.q_a_proj."),
        ("attention.q_a_norm.", "self_attn.q_a_layernorm."),
        ("attention.wq_b.", "self_attn.q_b_proj."),
        ("attention.wkv_a_with_mqa.", "self_attn.kv_a_proj_with_mqa."),
        ("attention.kv_a_norm.", "self_attn.kv_a_layernorm."),
        ("attention.wkv_b.", "self_attn.kv_b_proj."),
        ("attention.wo.", "self_attn.o_proj."),
        ("gate.", "mlp.gate."),
        ("shared_experts.w1.", "mlp.shared_experts.gate_proj."),
        ("shared_experts.w2.", "mlp.shared_experts.down_proj."),
        ("shared_experts.w3.", "mlp.shared_experts.up_proj."),
    ];
    if let Some(rest) = native.strip_prefix("layers.") {
        if let Some((layer, tail)) = rest.split_once('.') {
            for (n, hf) in LAYER {
                if let Some(suffix) = tail.strip_prefix(n) {
                    return format!("{prefix}layers.{layer}.{hf}{}", hf_suffix(suffix));
                }
            }
        }
    }
    format!("{prefix}{native}")
}

/// The HF name of a vision tensor (transformers' mistral3 converter): the tower under `vision_tower.`, the norm,
/// patch merger and adapter under `multi_modal_projector.`, both beside the `language_model.` of `prefix`.
fn hf_vision_name(native: &str, prefix: &str) -> Option<String> {
    let root = prefix.strip_suffix("language_model.").unwrap_or("");
    const PROJECTOR: &[(&str, &str)] = &[
        ("pre_mm_projector_norm.", "multi_modal_projector.norm."),
        ("patch_merger.", "multi_modal_projector.patch_merger."),
        ("vision_language_adapter.w_in.", "multi_modal_projector.linear_1."),
        ("vision_language_adapter.w_out.", "multi_modal_projector.linear_2."),
    ];
    if let Some((n, hf)) = PROJECTOR.iter().find(|(n, _)| native.starts_with(n)) {
        return Some(format!("{root}{hf}{}", &native[n.len()..]));
    }
    let tail = native.strip_prefix("vision_encoder.")?;
    const LAYER: &[(&str, &str)] = &[
        ("attention.wq.", "attention.q_proj."),
        ("attention.wk.", "attention.k_proj."),
        ("attention.wv.", "attention.v_proj."),
        ("attention.wo.", "attention.o_proj."),
        ("feed_forward.w1.", "feed_forward.gate_proj."),
        ("feed_forward.w2.", "feed_forward.down_proj."),
        ("feed_forward.w3.", "feed_forward.up_proj."),
    ];
    if let Some((layer, rest)) = tail.strip_prefix("transformer.layers.").and_then(|r| r.split_once('.')) {
        if let Some((n, hf)) = LAYER.iter().find(|(n, _)| rest.starts_with(n)) {
            return Some(format!("{root}vision_tower.transformer.layers.{layer}.{hf}{}", &rest[n.len()..]));
        }
    }
    Some(format!("{root}vision_tower.{tail}"))
}

/// The native name prefix of the vision tower's layer `l`.
pub fn vision_layer_prefix(l: usize) -> String {
    format!("vision_encoder.transformer.layers.{l}")
}

/// Native FP8 suffixes have HF twins.
fn hf_suffix(native_suffix: &str) -> &str {
    match native_suffix {
        "qscale_weight" => "weight_scale_inv",
        "qscale_act" => "activation_scale",
        other => other,
    }
}

fn shard_files(dir: &Path, native: bool) -> Result<Vec<PathBuf>> {
    let index_name = if native { "consolidated.safetensors.index.json" } else { "model.safetensors.index.json" };
    let index_path = dir.join(index_name);
    if index_path.exists() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json { what: index_path.display().to_string(), source })?;
        let map = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::Checkpoint(format!("{} has no weight_map object", index_path.display())))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for file in map.values() {
            let file = file.as_str().ok_or_else(|| Error::Checkpoint(format!("{}: non-string file name", index_path.display())))?;
            let path = dir.join(file);
            if !files.contains(&path) {
                files.push(path);
            }
        }
        files.sort();
        return Ok(files);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Checkpoint(format!("no .safetensors files in {}", dir.display())));
    }
    Ok(files)
}

fn map_shard(path: &Path) -> Result<Shard> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only; a checkpoint modified while mapped is outside our contract.
    let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let (header_len, metadata): (usize, Metadata) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| match e {
        safetensors::SafeTensorError::MetadataIncompleteBuffer => {
            Error::Checkpoint(format!("{} is truncated: its header describes more data than the file's {} bytes", path.display(), map.len()))
        }
        other => Error::Checkpoint(format!("{}: bad safetensors header: {other:?}", path.display())),
    })?;
    let data_start = 8 + header_len;
    let expected = data_start + metadata.data_len();
    if map.len() != expected {
        return Err(Error::Checkpoint(format!(
            "{} is {} bytes but its header describes {expected}: {}",
            path.display(),
            map.len(),
            if map.len() < expected { "truncated" } else { "trailing bytes" }
        )));
    }
    let tensors = metadata.tensors().into_iter().map(|(name, info)| (name, info.clone())).collect();
    Ok(Shard { path: path.to_path_buf(), map, data_start, tensors })
}

/// A tensor to write: dtype, shape, little-endian bytes.
#[derive(Clone, Debug)]
pub struct OwnedTensor {
    /// The safetensors dtype to store.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape`'s product times the dtype's size in bytes, little-endian.
    pub data: Vec<u8>,
}

impl safetensors::View for &OwnedTensor {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Writes tensors into shards of at most `shard_bytes` plus the index, in the file naming of `layout`.
/// Tensor names are given as STORED names (use `hf_name` to produce HF ones).
pub fn write_shards(dir: &Path, layout: &Layout, tensors: &BTreeMap<String, OwnedTensor>, shard_bytes: usize) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut groups: Vec<Vec<(&String, &OwnedTensor)>> = vec![Vec::new()];
    let mut current = 0usize;
    for (name, t) in tensors {
        if current > 0 && current + t.data.len() > shard_bytes {
            groups.push(Vec::new());
            current = 0;
        }
        current += t.data.len();
        groups.last_mut().unwrap().push((name, t));
    }
    let count = groups.len();
    let (stem, index_name) = match layout {
        Layout::Native => ("consolidated", "consolidated.safetensors.index.json"),
        Layout::HuggingFace { .. } => ("model", "model.safetensors.index.json"),
    };
    let mut weight_map = serde_json::Map::new();
    let mut paths = Vec::new();
    for (i, group) in groups.into_iter().enumerate() {
        let file = format!("{stem}-{:05}-of-{count:05}.safetensors", i + 1);
        let path = dir.join(&file);
        for (name, _) in &group {
            weight_map.insert((*name).clone(), serde_json::Value::String(file.clone()));
        }
        safetensors::serialize_to_file(group, None, &path).map_err(|e| Error::Checkpoint(format!("writing {}: {e:?}", path.display())))?;
        paths.push(path);
    }
    let total: usize = tensors.values().map(|t| t.data.len()).sum();
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let index_path = dir.join(index_name);
    std::fs::write(&index_path, serde_json::to_string_pretty(&index).unwrap()).map_err(|e| Error::io(&index_path, e))?;
    Ok(paths)
}
