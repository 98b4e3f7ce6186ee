//! Counter-based synthetic weights: every weight of a synthetic model is a pure function of (seed, tensor name,
//! element index), so the CPU ([`SyntheticModel::matrix`]) and the device generator (`cuda/synth.cu`,
//! `kernels::synth`) produce the same bits independently, for a model of any size, without a file and without a
//! host copy. The values are generated directly in each format's stored form (codes and scales), never by
//! quantising floats.
//!
//! # The contract (the CUDA kernels implement exactly this)
//!
//! Hashing, all arithmetic wrapping on u64:
//! - `fnv1a64(name)`: FNV-1a 64 of the tensor's NATIVE checkpoint name: the base name of a quantisable linear as
//!   `Checkpoint::matrix` takes it (`layers.3.attention.wq_a`, `layers.3.experts.17.w1`,
//!   `layers.3.shared_experts.w2`), the full name of a plain tensor (`tok_embeddings.weight`, `output.weight`,
//!   `norm.weight`, `layers.3.attention_norm.weight`, `layers.3.gate.weight`, ...). A tied head uses the embedding's.
//! - `mix64(z)`: the SplitMix64 finaliser (`z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27;
//!   z *= 0x94d049bb133111eb; z ^= z >> 31`).
//! - `key = mix64(seed ^ fnv1a64(name))`; `scale_key = mix64(key ^ SCALE_SALT)`, `zero_key = mix64(key ^ ZERO_SALT)`.
//! - `stream(k, j) = mix64(k + j * GOLDEN)` with `GOLDEN = 0x9e3779b97f4a7c15`.
//!
//! Element `i` (row-major index `r * cols + c` in the checkpoint's `[rows, cols]`):
//! - byte formats (bf16, fp8, norms): `byte(i) = stream(key, i / 8) >> (8 * (i % 8)) & 0xff`;
//! - 4-bit formats (int4, nvfp4): `nibble(i) = stream(key, i / 16) >> (4 * (i % 16)) & 0xf` (the stored code itself).
//!
//! Values (`unit` is a per-tensor power of two, [`unit_for`], so every product below is exact and no rounding mode,
//! FMA contraction or evaluation order can change a bit):
//! - bf16 linears and tables: `(2 * (byte as i8) + 1) * unit`: odd integers in -255..=255 (exact in bf16).
//! - norm weights (bf16): `1 + ((byte & 15) - 8) / 128`, in 0.9375..=1.0547.
//! - fp8 e4m3 codes: `(byte & 0x80) | (6 + ((byte >> 5) & 3)) << 3 | (byte & 7)`: exponents 2^-1..2^2, never NaN.
//!   Per-tensor fp8: the scale (`qscale_weight`) is `unit`.
//! - fp8 block-128 scale of block `b` (row-major over `[ceil(rows/128), ceil(cols/128)]`):
//!   `unit * ((16 + (stream(scale_key, b) & 15)) / 16)`.
//! - int4 group scale of group `g` (row-major over `[rows, cols/group]`): the same formula as the block-128 scale,
//!   as bf16 (exact); zero point (zero-point layout only) `6 + (stream(zero_key, g) & 3)`; `W = (q - z) * s`, z = 8
//!   when symmetric.
//! - nvfp4 block scale of block `b` (row-major over `[rows, cols/16]`): the e4m3 code
//!   `(6 + (h & 3)) << 3 | ((h >> 2) & 7)` with `h = stream(scale_key, b)`; `weight_global_scale = 1 / unit`.
//!
//! Amplitudes: a linear `[out, in]` has a standard deviation of about `1/sqrt(in)` (within a factor sqrt(2), the
//! power-of-two `unit`), the embedding about 1, the head `1/sqrt(dim)`, like `ReferenceWeights::random`, so the
//! activations stay O(1) through the layers.
//!
//! Which tensor takes which format follows the synthetic checkpoints (`model::synthetic`): routed and shared experts
//! in the model's format, the attention linears in `attention_format(format)`, embedding, norms, router and head
//! bf16. Text only: a synthetic model has no vision tower.
//!
//! ```
//! use small4::model::synth::SyntheticModel;
//! use small4::model::ModelConfig;
//! use small4::quant::{QuantizedMatrix, WeightFormat};
//!
//! let model = SyntheticModel::new(ModelConfig::tiny(), WeightFormat::Nvfp4, 7)?;
//! let c = &model.config;
//! // A routed expert in the checkpoint form of its format, attention bf16 (nvfp4 releases keep it bf16).
//! let w1 = model.matrix("layers.1.experts.5.w1", c.expert_hidden, c.dim)?;
//! assert!(matches!(w1, QuantizedMatrix::Nvfp4(_)));
//! assert!(matches!(model.matrix("layers.0.attention.wo", c.dim, c.heads * c.v_head)?, QuantizedMatrix::Bf16 { .. }));
//! // The same name gives the same bits; another seed other bits.
//! assert_eq!(w1, model.matrix("layers.1.experts.5.w1", c.expert_hidden, c.dim)?);
//! let other = SyntheticModel::new(ModelConfig::tiny(), WeightFormat::Nvfp4, 8)?;
//! assert_ne!(w1, other.matrix("layers.1.experts.5.w1", c.expert_hidden, c.dim)?);
//! // Wrong shapes and unknown names are typed errors.
//! assert!(matches!(model.matrix("layers.1.experts.5.w1", c.dim, c.dim), Err(small4::Error::Shape { .. })));
//! assert!(model.matrix("layers.99.experts.0.w1", c.expert_hidden, c.dim).is_err());
//! // Norm weights near 1.
//! assert!(model.vector("norm.weight", c.dim)?.iter().all(|w| (w.to_f32() - 1.0).abs() < 0.07));
//! # Ok::<(), small4::Error>(())
//! ```

use half::bf16;
use rayon::prelude::*;

use super::config::ModelConfig;
use super::synthetic::attention_format;
use crate::error::{Error, Result};
use crate::quant::{Fp8Block128, Fp8PerTensor, Int4Grouped, Nvfp4, QuantizedMatrix, WeightFormat, FP8_BLOCK, NVFP4_BLOCK};
use crate::reference::model::{AttentionWeights, FeedForward, LayerWeights, MoeWeights, ReferenceWeights};
use crate::reference::moe::ExpertWeights;

/// The SplitMix64 increment: consecutive counters of a stream are `GOLDEN` apart.
pub const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;
/// Separates a tensor's scale stream from its code stream: `scale_key = mix64(key ^ SCALE_SALT)`.
pub const SCALE_SALT: u64 = 0x5343_414c_4553; // "SCALES"
/// Separates a tensor's zero-point stream: `zero_key = mix64(key ^ ZERO_SALT)`.
pub const ZERO_SALT: u64 = 0x5a45_524f_5321; // "ZEROS!"

/// FNV-1a 64 of a name's UTF-8 bytes.
///
/// ```
/// assert_eq!(small4::model::synth::fnv1a64(""), 0xcbf29ce484222325);
/// assert_eq!(small4::model::synth::fnv1a64("a"), 0xaf63dc4c8601ec8c);
/// ```
pub fn fnv1a64(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3))
}

/// The SplitMix64 finaliser, a bijection of u64 with full avalanche.
///
/// ```
/// use small4::model::synth::{mix64, GOLDEN};
///
/// // SplitMix64's first output for seed 0.
/// assert_eq!(mix64(GOLDEN), 0xe220a8397b1dcdaf);
/// ```
pub fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of a tensor: `mix64(seed ^ fnv1a64(name))`.
///
/// ```
/// use small4::model::synth::tensor_key;
///
/// assert_ne!(tensor_key(1, "norm.weight"), tensor_key(2, "norm.weight"));
/// assert_ne!(tensor_key(1, "norm.weight"), tensor_key(1, "layers.0.ffn_norm.weight"));
/// ```
pub fn tensor_key(seed: u64, name: &str) -> u64 {
    mix64(seed ^ fnv1a64(name))
}

fn stream(key: u64, counter: u64) -> u64 {
    mix64(key.wrapping_add(counter.wrapping_mul(GOLDEN)))
}

/// The random byte of element `i` of the tensor with `key` (bf16, fp8 and norm values derive from it).
///
/// ```
/// use small4::model::synth::{element_byte, element_nibble};
///
/// // Eight bytes of one counter: element 8 starts the next one.
/// let bytes: Vec<u8> = (0..16).map(|i| element_byte(42, i)).collect();
/// assert_ne!(bytes[..8], bytes[8..]);
/// assert!((0..32).all(|i| element_nibble(42, i) < 16));
/// ```
pub fn element_byte(key: u64, i: u64) -> u8 {
    (stream(key, i / 8) >> (8 * (i % 8))) as u8
}

/// The random nibble of element `i` (the stored int4 / e2m1 code itself).
pub fn element_nibble(key: u64, i: u64) -> u8 {
    ((stream(key, i / 16) >> (4 * (i % 16))) & 15) as u8
}

/// A bf16 linear or table value: `(2 * (byte as i8) + 1) * unit`, exact.
///
/// ```
/// use small4::model::synth::bf16_value;
///
/// assert_eq!(bf16_value(0x7f, 0.5).to_f32(), 127.5);
/// assert_eq!(bf16_value(0x80, 1.0).to_f32(), -255.0);
/// ```
pub fn bf16_value(byte: u8, unit: f32) -> bf16 {
    bf16::from_f32((2 * (byte as i8) as i32 + 1) as f32 * unit)
}

/// A norm weight: `1 + ((byte & 15) - 8) / 128`.
///
/// ```
/// assert_eq!(small4::model::synth::norm_value(8).to_f32(), 1.0);
/// assert_eq!(small4::model::synth::norm_value(0).to_f32(), 0.9375);
/// ```
pub fn norm_value(byte: u8) -> bf16 {
    bf16::from_f32(1.0 + ((byte & 15) as i32 - 8) as f32 / 128.0)
}

/// An e4m3 code with exponents 2^-1..=2^2 (never NaN, never subnormal).
///
/// ```
/// use small4::model::synth::fp8_code;
/// use small4::quant::e4m3_to_f32;
///
/// assert!((0..=255u8).all(|b| (0.5..8.0).contains(&e4m3_to_f32(fp8_code(b)).abs())));
/// ```
pub fn fp8_code(byte: u8) -> u8 {
    (byte & 0x80) | ((6 + ((byte >> 5) & 3)) << 3) | (byte & 7)
}

/// Scale `b` of a block-scaled tensor (fp8 block-128 blocks, int4 groups): `unit * (16 + (h & 15)) / 16`.
///
/// ```
/// use small4::model::synth::block_scale;
///
/// assert!((0..64).all(|b| (0.25..0.5).contains(&block_scale(9, b, 0.25))));
/// ```
pub fn block_scale(key: u64, b: u64, unit: f32) -> f32 {
    unit * ((16 + (stream(mix64(key ^ SCALE_SALT), b) & 15)) as f32 * 0.0625)
}

/// The e4m3 code of nvfp4 block `b`'s scale: exponents 2^-1..=2^2, positive.
///
/// ```
/// use small4::model::synth::fp4_block_scale;
/// use small4::quant::e4m3_to_f32;
///
/// assert!((0..64).all(|b| (0.5..8.0).contains(&e4m3_to_f32(fp4_block_scale(3, b)))));
/// ```
pub fn fp4_block_scale(key: u64, b: u64) -> u8 {
    let h = stream(mix64(key ^ SCALE_SALT), b);
    (((6 + (h & 3)) << 3) | ((h >> 2) & 7)) as u8
}

/// The zero point of int4 group `g` (zero-point layout): 6..=9.
///
/// ```
/// assert!((0..64).all(|g| (6..=9).contains(&small4::model::synth::group_zero(5, g))));
/// ```
pub fn group_zero(key: u64, g: u64) -> u8 {
    6 + (stream(mix64(key ^ ZERO_SALT), g) & 3) as u8
}

/// The root mean square of a format's weights at `unit` 1 (codes times scale factors), to pick `unit`.
fn code_rms(format: WeightFormat) -> f64 {
    // Mean square of (16 + x) / 16 for x uniform in 0..16: 573.5 / 256.
    let block_factor = (573.5f64 / 256.0).sqrt();
    // e4m3 codes of fp8_code: exponents -1..=2 uniform, mantissa 1 + m/8 uniform: (21.25 / 4) * (1100 / 512).
    let fp8 = (21.25f64 / 4.0 * 1100.0 / 512.0).sqrt();
    match format {
        WeightFormat::Bf16 => (21845.0f64).sqrt(),
        WeightFormat::Fp8PerTensor => fp8,
        WeightFormat::Fp8Block128 => fp8 * block_factor,
        // (q - 8) for q uniform in 0..16: mean square 344 / 16.
        WeightFormat::Int4 { .. } => (344.0f64 / 16.0).sqrt() * block_factor,
        // e2m1 codes uniform: mean square 68.5 / 8, times the e4m3 block scale's.
        WeightFormat::Nvfp4 => (68.5f64 / 8.0).sqrt() * fp8,
    }
}

/// The power-of-two `unit` that gives a tensor of `format` a standard deviation of about `std` (within sqrt(2)).
///
/// ```
/// use small4::model::synth::unit_for;
/// use small4::quant::WeightFormat;
///
/// let unit = unit_for(WeightFormat::Bf16, 1.0 / 64.0);
/// assert_eq!(unit, 2f32.powi(-13)); // 147.8 * 2^-13 = 0.018
/// assert!(WeightFormat::ALL.iter().all(|&f| unit_for(f, 0.01).log2().fract() == 0.0));
/// ```
pub fn unit_for(format: WeightFormat, std: f64) -> f32 {
    2f32.powi((std / code_rms(format)).log2().round() as i32)
}

/// What a synthetic tensor is: its key, checkpoint shape and how its values are made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorSpec {
    /// `tensor_key(seed, name)`.
    pub key: u64,
    /// Rows of the checkpoint tensor (its length for a vector).
    pub rows: usize,
    /// Columns (1 for a vector).
    pub cols: usize,
    /// The kind of values.
    pub kind: TensorKind,
}

/// How a synthetic tensor's values are made (the module doc's formulas).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TensorKind {
    /// A matrix in `format` (bf16 tables included) with the power-of-two `unit` of [`unit_for`].
    Matrix {
        /// The stored format.
        format: WeightFormat,
        /// The per-tensor power of two of the module doc.
        unit: f32,
    },
    /// A bf16 norm weight vector near 1.
    Norm,
}

impl TensorSpec {
    /// A matrix spec of `format` with standard deviation about `std` (see [`unit_for`]).
    ///
    /// ```
    /// use small4::model::synth::TensorSpec;
    /// use small4::quant::{QuantizedMatrix, WeightFormat};
    ///
    /// let spec = TensorSpec::matrix(11, 4, 256, WeightFormat::Fp8Block128, 1.0 / 16.0);
    /// let m = spec.generate()?;
    /// assert_eq!(m.shape(), (4, 256));
    /// let QuantizedMatrix::Fp8Block128(f) = m else { unreachable!() };
    /// assert_eq!(f.scales.len(), 2);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn matrix(key: u64, rows: usize, cols: usize, format: WeightFormat, std: f64) -> Self {
        TensorSpec { key, rows, cols, kind: TensorKind::Matrix { format, unit: unit_for(format, std) } }
    }

    /// The matrix in its checkpoint form. `Error::InvalidArgument` for a norm spec, shape errors from the format.
    pub fn generate(&self) -> Result<QuantizedMatrix> {
        let TensorKind::Matrix { format, unit } = self.kind else {
            return Err(Error::InvalidArgument("a norm weight is a vector, not a matrix".into()));
        };
        let (rows, cols, key) = (self.rows, self.cols, self.key);
        format.check_shape(rows, cols)?;
        let n = (rows * cols) as u64;
        let bytes = || (0..n).into_par_iter().map(move |i| element_byte(key, i));
        let nibbles = || (0..n / 2).into_par_iter().map(move |j| element_nibble(key, 2 * j) | (element_nibble(key, 2 * j + 1) << 4));
        Ok(match format {
            WeightFormat::Bf16 => QuantizedMatrix::Bf16 { data: bytes().map(|b| bf16_value(b, unit)).collect(), rows, cols },
            WeightFormat::Fp8PerTensor => QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::from_parts(bytes().map(fp8_code).collect(), rows, cols, unit)?),
            WeightFormat::Fp8Block128 => {
                let blocks = (rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK)) as u64;
                let scales = (0..blocks).map(|b| block_scale(key, b, unit)).collect();
                QuantizedMatrix::Fp8Block128(Fp8Block128::from_parts(bytes().map(fp8_code).collect(), rows, cols, scales)?)
            }
            WeightFormat::Int4 { group, zero_point } => {
                let groups = (rows * cols / group) as u64;
                let scales = (0..groups).into_par_iter().map(|g| bf16::from_f32(block_scale(key, g, unit))).collect();
                let zeros = zero_point.then(|| (0..groups).into_par_iter().map(|g| group_zero(key, g)).collect());
                QuantizedMatrix::Int4(Int4Grouped::from_parts(nibbles().collect(), rows, cols, group, scales, zeros)?)
            }
            WeightFormat::Nvfp4 => {
                let scales = (0..n / NVFP4_BLOCK as u64).into_par_iter().map(|b| fp4_block_scale(key, b)).collect();
                QuantizedMatrix::Nvfp4(Nvfp4::from_parts(nibbles().collect(), rows, cols, scales, 1.0 / unit)?)
            }
        })
    }

    /// A bf16 tensor's values flat (a norm vector, or a bf16 matrix row-major); `Error::InvalidArgument` for a
    /// quantised matrix.
    ///
    /// ```
    /// use small4::model::synth::{TensorKind, TensorSpec};
    ///
    /// let norm = TensorSpec { key: 1, rows: 64, cols: 1, kind: TensorKind::Norm };
    /// assert_eq!(norm.bf16_values()?.len(), 64);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn bf16_values(&self) -> Result<Vec<bf16>> {
        let key = self.key;
        let n = (self.rows * self.cols) as u64;
        match self.kind {
            TensorKind::Norm => Ok((0..n).into_par_iter().map(|i| norm_value(element_byte(key, i))).collect()),
            TensorKind::Matrix { format: WeightFormat::Bf16, unit } => Ok((0..n).into_par_iter().map(|i| bf16_value(element_byte(key, i), unit)).collect()),
            TensorKind::Matrix { format, .. } => Err(Error::InvalidArgument(format!("a {format} tensor has no bf16 values"))),
        }
    }
}

/// A synthetic model: the configuration, the experts' format and the seed; every tensor is generated on demand
/// (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct SyntheticModel {
    /// The text model's configuration (no vision tower).
    pub config: ModelConfig,
    /// The routed and shared experts' format (the attention's is `attention_format(format)`).
    pub format: WeightFormat,
    /// The seed of every tensor's key.
    pub seed: u64,
}

/// The real preset (Mistral Small 4) shrunk to `layers` decoder layers and `experts` routed experts, every per-layer
/// dimension kept (experts_per_token stays 4, so `experts >= 4`); `None` keeps the preset's 36 layers / 128 experts.
/// Text only (no vision tower). `Error::Config` for 0 layers or fewer than 4 experts.
///
/// ```
/// use small4::model::synth::shrunk_real_preset;
///
/// let c = shrunk_real_preset(Some(2), Some(8))?;
/// assert_eq!((c.n_layers, c.experts, c.experts_per_token, c.dim, c.expert_hidden), (2, 8, 4, 4096, 2048));
/// assert!(c.vision.is_none());
/// assert!(shrunk_real_preset(None, Some(3)).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn shrunk_real_preset(layers: Option<usize>, experts: Option<usize>) -> Result<ModelConfig> {
    shrink(ModelConfig::mistral_small_4(), layers, experts)
}

/// Any configuration with its layer and routed-expert counts overridden (each when `Some`) and its vision tower
/// dropped; errors as [`shrunk_real_preset`].
///
/// ```
/// use small4::model::synth::shrink;
/// use small4::model::ModelConfig;
///
/// let c = shrink(ModelConfig::tiny(), Some(1), None)?;
/// assert_eq!((c.n_layers, c.experts, c.dim), (1, 16, 256));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn shrink(mut c: ModelConfig, layers: Option<usize>, experts: Option<usize>) -> Result<ModelConfig> {
    c.vision = None;
    if let Some(l) = layers {
        c.n_layers = l;
    }
    if let Some(e) = experts {
        if e < c.experts_per_token {
            return Err(Error::Config(format!("{e} experts: at least experts_per_token = {} are needed", c.experts_per_token)));
        }
        c.experts = e;
    }
    c.validate()?;
    Ok(c)
}

/// Which expert matrix a native name ends with.
fn expert_shape(c: &ModelConfig, which: &str, hidden: usize) -> Option<(usize, usize)> {
    match which {
        "w1" | "w3" => Some((hidden, c.dim)),
        "w2" => Some((c.dim, hidden)),
        _ => None,
    }
}

impl SyntheticModel {
    /// A synthetic model of `config` (its vision tower dropped) with experts in `format`. `Error::Config` for a
    /// configuration that does not validate or has dense layers (the synthetic checkpoints are all-MoE); shape
    /// errors when a tensor does not fit `format` (e.g. an INT4 group not dividing a width).
    pub fn new(mut config: ModelConfig, format: WeightFormat, seed: u64) -> Result<Self> {
        config.vision = None;
        config.validate()?;
        if config.first_k_dense_replace != 0 {
            return Err(Error::Config("synthetic models are all-MoE (first_k_dense_replace = 0)".into()));
        }
        let model = SyntheticModel { config, format, seed };
        for name in model.tensor_names() {
            let spec = model.spec(&name)?;
            if let TensorKind::Matrix { format, .. } = spec.kind {
                format.check_shape(spec.rows, spec.cols)?;
            }
        }
        Ok(model)
    }

    /// Every tensor's native name, in checkpoint order (per layer: norms, attention, router, shared expert, experts;
    /// then the embedding, final norm and head).
    ///
    /// ```
    /// use small4::model::synth::SyntheticModel;
    /// use small4::model::ModelConfig;
    ///
    /// let m = SyntheticModel::new(ModelConfig::tiny(), small4::quant::WeightFormat::Bf16, 1)?;
    /// let names = m.tensor_names();
    /// assert!(names.contains(&"layers.3.experts.15.w2".to_string()));
    /// assert!(names.iter().all(|n| m.spec(n).is_ok()));
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn tensor_names(&self) -> Vec<String> {
        let c = &self.config;
        let mut names = Vec::new();
        for l in 0..c.n_layers {
            let p = format!("layers.{l}");
            for n in ["attention_norm.weight", "ffn_norm.weight", "attention.q_a_norm.weight", "attention.kv_a_norm.weight"] {
                names.push(format!("{p}.{n}"));
            }
            for n in ["wq_a", "wq_b", "wkv_a_with_mqa", "wkv_b", "wo"] {
                names.push(format!("{p}.attention.{n}"));
            }
            names.push(format!("{p}.gate.weight"));
            if c.shared_experts > 0 {
                names.extend(["w1", "w3", "w2"].map(|w| format!("{p}.shared_experts.{w}")));
            }
            for e in 0..c.experts {
                names.extend(["w1", "w3", "w2"].map(|w| format!("{p}.experts.{e}.{w}")));
            }
        }
        names.push("tok_embeddings.weight".into());
        names.push("norm.weight".into());
        if !c.tied_embeddings {
            names.push("output.weight".into());
        }
        names
    }

    /// The spec of a tensor by native name (see the module doc for the naming); `Error::InvalidArgument` for a
    /// name the model does not have.
    pub fn spec(&self, name: &str) -> Result<TensorSpec> {
        let c = &self.config;
        let unknown = || Error::InvalidArgument(format!("the synthetic model has no tensor {name}"));
        let std = |fan_in: usize| 1.0 / (fan_in as f64).sqrt();
        let matrix = |rows: usize, cols: usize, format: WeightFormat, std: f64| TensorSpec::matrix(tensor_key(self.seed, name), rows, cols, format, std);
        let norm = |len: usize| TensorSpec { key: tensor_key(self.seed, name), rows: len, cols: 1, kind: TensorKind::Norm };
        match name {
            "tok_embeddings.weight" => return Ok(matrix(c.vocab, c.dim, WeightFormat::Bf16, 1.0)),
            "output.weight" if c.tied_embeddings => return self.spec("tok_embeddings.weight"),
            "output.weight" => return Ok(matrix(c.vocab, c.dim, WeightFormat::Bf16, std(c.dim))),
            "norm.weight" => return Ok(norm(c.dim)),
            _ => {}
        }
        let rest = name.strip_prefix("layers.").ok_or_else(unknown)?;
        let (layer, tail) = rest.split_once('.').ok_or_else(unknown)?;
        if layer.parse::<usize>().map_err(|_| unknown())? >= c.n_layers || layer.starts_with('0') && layer.len() > 1 {
            return Err(unknown());
        }
        let attn = attention_format(self.format);
        let qk = c.qk_nope + c.qk_rope;
        Ok(match tail {
            "attention_norm.weight" | "ffn_norm.weight" => norm(c.dim),
            "attention.q_a_norm.weight" => norm(c.q_lora_rank),
            "attention.kv_a_norm.weight" => norm(c.kv_lora_rank),
            "attention.wq_a" => matrix(c.q_lora_rank, c.dim, attn, std(c.dim)),
            "attention.wq_b" => matrix(c.heads * qk, c.q_lora_rank, attn, std(c.q_lora_rank)),
            "attention.wkv_a_with_mqa" => matrix(c.kv_lora_rank + c.qk_rope, c.dim, attn, std(c.dim)),
            "attention.wkv_b" => matrix(c.heads * (c.qk_nope + c.v_head), c.kv_lora_rank, attn, std(c.kv_lora_rank)),
            "attention.wo" => matrix(c.dim, c.heads * c.v_head, attn, std(c.heads * c.v_head)),
            "gate.weight" => matrix(c.experts, c.dim, WeightFormat::Bf16, std(c.dim)),
            _ => {
                let (hidden, which) = if let Some(w) = tail.strip_prefix("shared_experts.") {
                    if c.shared_experts == 0 {
                        return Err(unknown());
                    }
                    (c.shared_hidden(), w)
                } else {
                    let e_w = tail.strip_prefix("experts.").ok_or_else(unknown)?;
                    let (e, w) = e_w.split_once('.').ok_or_else(unknown)?;
                    if e.parse::<usize>().map_err(|_| unknown())? >= c.experts || e.starts_with('0') && e.len() > 1 {
                        return Err(unknown());
                    }
                    (c.expert_hidden, w)
                };
                let (rows, cols) = expert_shape(c, which, hidden).ok_or_else(unknown)?;
                matrix(rows, cols, self.format, std(cols))
            }
        })
    }

    fn checked_spec(&self, name: &str, rows: usize, cols: usize) -> Result<TensorSpec> {
        let spec = self.spec(name)?;
        if (spec.rows, spec.cols) != (rows, cols) {
            return Err(Error::shape(format!("synthetic tensor {name}"), format!("[{}, {}]", spec.rows, spec.cols), format!("[{rows}, {cols}]")));
        }
        Ok(spec)
    }

    /// A matrix in its checkpoint form (any matrix of the model: linears, experts, the embedding, router and head
    /// as bf16). `Error::Shape` when `[rows, cols]` is not the tensor's shape, `Error::InvalidArgument` for an
    /// unknown name or a norm vector.
    pub fn matrix(&self, native_name: &str, rows: usize, cols: usize) -> Result<QuantizedMatrix> {
        self.checked_spec(native_name, rows, cols)?.generate()
    }

    /// A bf16 vector or table (norm weights; also the embedding, router or head flat). `Error::Shape` when `len` is
    /// not the tensor's size, `Error::InvalidArgument` for an unknown name or a quantised matrix.
    pub fn vector(&self, native_name: &str, len: usize) -> Result<Vec<bf16>> {
        let spec = self.spec(native_name)?;
        if spec.rows * spec.cols != len {
            return Err(Error::shape(format!("synthetic tensor {native_name}"), spec.rows * spec.cols, len));
        }
        spec.bf16_values()
    }

    /// The whole model in memory as f32 reference weights (for the tiny preset and tests): exactly the values the
    /// device generator writes, dequantised. Holds every tensor as f32: use it only for models that fit in memory.
    ///
    /// ```
    /// use small4::model::synth::SyntheticModel;
    /// use small4::model::ModelConfig;
    /// use small4::quant::WeightFormat;
    ///
    /// let m = SyntheticModel::new(ModelConfig { n_layers: 1, ..ModelConfig::tiny() }, WeightFormat::INT4_G128, 3)?;
    /// let w = m.reference_weights()?;
    /// w.check_shapes()?;
    /// assert!(w.vision.is_none());
    /// let wq_a = m.matrix("layers.0.attention.wq_a", m.config.q_lora_rank, m.config.dim)?.dequantize();
    /// assert_eq!(w.layers[0].attention.wq_a, wq_a);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn reference_weights(&self) -> Result<ReferenceWeights> {
        let c = &self.config;
        let f32s = |v: Vec<bf16>| v.iter().map(|x| x.to_f32()).collect::<Vec<f32>>();
        let vector = |name: &str, len: usize| -> Result<Vec<f32>> { Ok(f32s(self.vector(name, len)?)) };
        let matrix = |name: &str, rows: usize, cols: usize| -> Result<Vec<f32>> { Ok(self.matrix(name, rows, cols)?.dequantize_for_gemm()) };
        let swiglu = |base: &str, hidden: usize| -> Result<ExpertWeights> {
            Ok(ExpertWeights {
                w1: matrix(&format!("{base}.w1"), hidden, c.dim)?,
                w3: matrix(&format!("{base}.w3"), hidden, c.dim)?,
                w2: matrix(&format!("{base}.w2"), c.dim, hidden)?,
            })
        };
        let qk = c.qk_nope + c.qk_rope;
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let p = format!("layers.{l}");
            let attention = AttentionWeights {
                wq_a: matrix(&format!("{p}.attention.wq_a"), c.q_lora_rank, c.dim)?,
                q_a_norm: vector(&format!("{p}.attention.q_a_norm.weight"), c.q_lora_rank)?,
                wq_b: matrix(&format!("{p}.attention.wq_b"), c.heads * qk, c.q_lora_rank)?,
                wkv_a_with_mqa: matrix(&format!("{p}.attention.wkv_a_with_mqa"), c.kv_lora_rank + c.qk_rope, c.dim)?,
                kv_a_norm: vector(&format!("{p}.attention.kv_a_norm.weight"), c.kv_lora_rank)?,
                wkv_b: matrix(&format!("{p}.attention.wkv_b"), c.heads * (c.qk_nope + c.v_head), c.kv_lora_rank)?,
                wo: matrix(&format!("{p}.attention.wo"), c.dim, c.heads * c.v_head)?,
            };
            let moe = MoeWeights {
                gate: vector(&format!("{p}.gate.weight"), c.experts * c.dim)?,
                experts: (0..c.experts).map(|e| swiglu(&format!("{p}.experts.{e}"), c.expert_hidden).map(Some)).collect::<Result<_>>()?,
                shared_experts: (c.shared_experts > 0).then(|| swiglu(&format!("{p}.shared_experts"), c.shared_hidden())).transpose()?,
                fp8_act_scales: None,
            };
            layers.push(LayerWeights {
                attention_norm: vector(&format!("{p}.attention_norm.weight"), c.dim)?,
                attention,
                ffn_norm: vector(&format!("{p}.ffn_norm.weight"), c.dim)?,
                ffn: FeedForward::Moe(moe),
            });
        }
        let tok_embeddings = vector("tok_embeddings.weight", c.vocab * c.dim)?;
        let output = if c.tied_embeddings { tok_embeddings.clone() } else { vector("output.weight", c.vocab * c.dim)? };
        Ok(ReferenceWeights { config: c.clone(), tok_embeddings, layers, norm: vector("norm.weight", c.dim)?, output, vision: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::model::{ForwardOptions, ReferenceModel};

    /// Each format's weights have about the standard deviation asked for (within the power-of-two rounding).
    #[test]
    fn amplitudes_follow_the_fan_in() {
        for format in WeightFormat::ALL {
            let std = 1.0 / 64.0;
            let m = TensorSpec::matrix(77, 128, 1024, format, std).generate().unwrap().dequantize();
            let rms = (m.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / m.len() as f64).sqrt();
            assert!(rms > std / 1.5 && rms < std * 1.5, "{format}: rms {rms} for std {std}");
        }
    }

    /// 36 layers (the real depth) of the tiny geometry, bf16 and nvfp4: the logits stay finite with an O(1) spread,
    /// so the residual stream neither vanishes nor overflows on the way.
    #[test]
    fn logits_stay_o1_through_36_layers() {
        for format in [WeightFormat::Bf16, WeightFormat::Nvfp4] {
            let config = ModelConfig { n_layers: 36, experts: 4, vocab: 256, ..ModelConfig::tiny() };
            let model = ReferenceModel::new(SyntheticModel::new(config, format, 5).unwrap().reference_weights().unwrap(), ForwardOptions::default()).unwrap();
            let mut cache = model.new_cache();
            let logits = model.forward(&[1, 17, 99, 200], &mut cache).unwrap();
            let rms = (logits.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / logits.len() as f64).sqrt();
            assert!(logits.iter().all(|v| v.is_finite()) && rms > 0.05 && rms < 20.0, "{format}: logit rms {rms}");
        }
    }
}
