//! Weight formats on the CPU: bf16, FP8 e4m3 (per-tensor and 128x128 block scales), INT4 group-wise, NVFP4.
//!
//! Every matrix is row-major `[rows = out features N, cols = in features K]`, the checkpoint's `[out, in]`.
//! Each quantised matrix type (`matrix.rs`) holds exactly the arrays a checkpoint (or the kernels) store, and its
//! `dequantize()` is THE definition of the format's value: the CUDA dequantisation kernels are tested bit-exact
//! against it (after rounding to bf16).
//!
//! # A tour
//!
//! Quantise one small matrix into every format the kernels run, check that the arrays take exactly the bytes the
//! memory planner reserves for the format, and that dequantising gives the weights back within the format's
//! precision:
//!
//! ```
//! use small4::quant::{QuantizedMatrix, WeightFormat};
//!
//! // [rows = 2, cols = 128]: 128 columns is one INT4 group and eight NVFP4 blocks.
//! let (rows, cols) = (2, 128);
//! let weights: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0).collect();
//!
//! for format in WeightFormat::ALL {
//!     let matrix = QuantizedMatrix::quantize(format, &weights, rows, cols)?;
//!     assert_eq!(matrix.format(), format);
//!     assert_eq!(matrix.shape(), (rows, cols));
//!     assert_eq!(matrix.bytes(), format.matrix_bytes(rows, cols)?);
//!
//!     // The worst error is half a step of the format at the largest weight (amax = 50/64): 3 mantissa bits
//!     // (e4m3) give amax/16; e2m1's top step (4 to 6, in units of amax/6) gives amax/6, INT4's amax/14.
//!     let back = matrix.dequantize();
//!     let worst = weights.iter().zip(&back).map(|(w, b)| (w - b).abs()).fold(0.0f32, f32::max);
//!     let amax = 50.0 / 64.0;
//!     let bound = if format.bits_per_weight() < 8.0 { amax / 6.0 } else { amax / 16.0 };
//!     assert!(worst < bound, "{format}: error {worst}");
//!
//!     // Every format has a canonical name that parses back.
//!     assert_eq!(format.to_string().parse::<WeightFormat>()?, format);
//! }
//! # Ok::<(), small4::Error>(())
//! ```

mod minifloat;

pub mod fp4;
pub mod fp8;
pub mod matrix;
pub mod repack;

use std::fmt;
use std::str::FromStr;

use half::bf16;

use crate::error::{Error, Result};

pub use fp4::{e2m1_to_f32, f32_to_e2m1, pack_e2m1_pair, E2M1_MAX};
pub use fp8::{e4m3_to_f32, e5m2_to_f32, f32_to_e4m3, f32_to_e5m2, f32_to_e5m2_satfinite, E4M3_MAX, E5M2_MAX};
pub use matrix::{Fp8Block128, Fp8PerTensor, Int4Grouped, Nvfp4, QuantizedMatrix};

/// Edge of the square FP8 scale blocks (DeepSeek / DeepGEMM layout).
///
/// ```
/// use small4::quant::{Fp8Block128, FP8_BLOCK};
///
/// // One scale per FP8_BLOCK x FP8_BLOCK block: a 300-column matrix has 3 block columns (the last one ragged).
/// assert_eq!(Fp8Block128::scale_cols(300), 300usize.div_ceil(FP8_BLOCK));
/// assert_eq!(Fp8Block128::scale_cols(FP8_BLOCK), 1);
/// ```
pub const FP8_BLOCK: usize = 128;
/// Default INT4 group along K (GPTQ / AWQ).
///
/// ```
/// use small4::quant::{WeightFormat, INT4_DEFAULT_GROUP};
///
/// // Plain "int4" means this group, symmetric.
/// assert_eq!("int4".parse::<WeightFormat>()?, WeightFormat::Int4 { group: INT4_DEFAULT_GROUP, zero_point: false });
/// # Ok::<(), small4::Error>(())
/// ```
pub const INT4_DEFAULT_GROUP: usize = 128;
/// NVFP4 elements per e4m3 block scale, along K.
///
/// ```
/// use small4::quant::{Nvfp4, NVFP4_BLOCK};
///
/// let weights = vec![0.5f32; 4 * 32];
/// let m = Nvfp4::quantize(&weights, 4, 32)?;
/// // Two nibbles a byte, one e4m3 scale byte per block of NVFP4_BLOCK.
/// assert_eq!(m.packed.len(), 4 * 32 / 2);
/// assert_eq!(m.scales.len(), 4 * 32 / NVFP4_BLOCK);
/// # Ok::<(), small4::Error>(())
/// ```
pub const NVFP4_BLOCK: usize = 16;

/// How a weight matrix is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    /// Unquantised bf16, 2 bytes a weight.
    Bf16,
    /// e4m3 with one f32 scale for the whole tensor (the published FP8 checkpoint's `qscale_weight`).
    Fp8PerTensor,
    /// e4m3 with one f32 scale per 128x128 block.
    Fp8Block128,
    /// 4-bit integers in groups of `group` along K with a bf16 scale each; `zero_point` adds a u8 zero per group
    /// (asymmetric), otherwise the zero is 8 (symmetric).
    Int4 {
        /// Weights per group along K (even, at least 2; [`INT4_DEFAULT_GROUP`] by default).
        group: usize,
        /// Whether each group stores its own u8 zero point (asymmetric) instead of the fixed zero 8.
        zero_point: bool,
    },
    /// e2m1 with an e4m3 scale per 16 along K and an f32 global divisor.
    Nvfp4,
}

impl WeightFormat {
    /// The common INT4 layout: group 128, symmetric.
    ///
    /// ```
    /// use small4::quant::WeightFormat;
    ///
    /// assert_eq!(WeightFormat::INT4_G128.to_string(), "int4-g128");
    /// assert_eq!(WeightFormat::INT4_G128.bits_per_weight(), 4.0 + 16.0 / 128.0);
    /// ```
    pub const INT4_G128: WeightFormat = WeightFormat::Int4 { group: INT4_DEFAULT_GROUP, zero_point: false };

    /// Every format the kernels run, INT4 as group 128 symmetric and with zero points.
    ///
    /// ```
    /// use small4::quant::WeightFormat;
    ///
    /// let names: Vec<String> = WeightFormat::ALL.iter().map(|f| f.to_string()).collect();
    /// assert_eq!(names, ["bf16", "fp8", "fp8-block128", "int4-g128", "int4-g128-zp", "nvfp4"]);
    /// ```
    pub const ALL: [WeightFormat; 6] = [
        WeightFormat::Bf16,
        WeightFormat::Fp8PerTensor,
        WeightFormat::Fp8Block128,
        WeightFormat::INT4_G128,
        WeightFormat::Int4 { group: INT4_DEFAULT_GROUP, zero_point: true },
        WeightFormat::Nvfp4,
    ];

    /// Checks that a `[rows, cols]` matrix can be stored in this format.
    ///
    /// ```
    /// use small4::quant::WeightFormat;
    /// use small4::Error;
    ///
    /// assert!(WeightFormat::INT4_G128.check_shape(4, 256).is_ok());
    /// // INT4 columns come in whole groups, NVFP4 columns in whole 16-blocks.
    /// assert!(matches!(WeightFormat::INT4_G128.check_shape(4, 100), Err(Error::Shape { .. })));
    /// assert!(matches!(WeightFormat::Nvfp4.check_shape(4, 24), Err(Error::Shape { .. })));
    /// // bf16 and FP8 take any shape, ragged FP8 blocks included.
    /// assert!(WeightFormat::Fp8Block128.check_shape(129, 130).is_ok());
    /// ```
    pub fn check_shape(&self, rows: usize, cols: usize) -> Result<()> {
        match *self {
            WeightFormat::Int4 { group, .. } => {
                check_int4_group(group)?;
                if cols % group != 0 {
                    return Err(Error::shape(format!("{self} matrix columns"), format!("a multiple of the group {group}"), cols));
                }
            }
            WeightFormat::Nvfp4 if cols % NVFP4_BLOCK != 0 => {
                return Err(Error::shape("nvfp4 matrix columns", format!("a multiple of {NVFP4_BLOCK}"), cols));
            }
            _ => {}
        }
        rows.checked_mul(cols).ok_or_else(|| Error::InvalidArgument(format!("{rows} x {cols} matrix overflows")))?;
        Ok(())
    }

    /// Exact bytes of a `[rows, cols]` matrix in this format, scales and zero points included (what the memory
    /// planner reserves). Activation scales (`qscale_act`, `input_global_scale`) are not part of the weight.
    ///
    /// ```
    /// use small4::quant::WeightFormat;
    ///
    /// // One expert's w1 of Small 4: [2048, 4096].
    /// let (n, k) = (2048, 4096);
    /// assert_eq!(WeightFormat::Bf16.matrix_bytes(n, k)?, 2 * n * k);
    /// assert_eq!(WeightFormat::Fp8PerTensor.matrix_bytes(n, k)?, n * k + 4); // + one f32 scale
    /// assert_eq!(WeightFormat::Fp8Block128.matrix_bytes(n, k)?, n * k + 4 * (n / 128) * (k / 128));
    /// assert_eq!(WeightFormat::INT4_G128.matrix_bytes(n, k)?, n * k / 2 + 2 * n * (k / 128)); // + bf16 scales
    /// assert_eq!(WeightFormat::Nvfp4.matrix_bytes(n, k)?, n * k / 2 + n * k / 16 + 4);
    /// // A shape the format cannot hold is an error, not a guess.
    /// assert!(WeightFormat::Nvfp4.matrix_bytes(n, 24).is_err());
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn matrix_bytes(&self, rows: usize, cols: usize) -> Result<usize> {
        self.check_shape(rows, cols)?;
        let elements = rows * cols;
        Ok(match *self {
            WeightFormat::Bf16 => 2 * elements,
            WeightFormat::Fp8PerTensor => elements + 4,
            WeightFormat::Fp8Block128 => elements + 4 * rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK),
            WeightFormat::Int4 { group, zero_point } => {
                let groups = rows * (cols / group);
                elements / 2 + 2 * groups + if zero_point { groups } else { 0 }
            }
            WeightFormat::Nvfp4 => elements / 2 + elements / NVFP4_BLOCK + 4,
        })
    }

    /// Average storage per weight in bits for a large matrix (scales amortised; per-tensor scalars ignored).
    ///
    /// ```
    /// use small4::quant::WeightFormat;
    ///
    /// assert_eq!(WeightFormat::Bf16.bits_per_weight(), 16.0);
    /// assert_eq!(WeightFormat::Nvfp4.bits_per_weight(), 4.5); // an 8-bit scale per 16 elements
    /// let zp = WeightFormat::Int4 { group: 128, zero_point: true };
    /// assert_eq!(zp.bits_per_weight(), 4.0 + 24.0 / 128.0); // bf16 scale + u8 zero per group
    /// ```
    pub fn bits_per_weight(&self) -> f64 {
        match *self {
            WeightFormat::Bf16 => 16.0,
            WeightFormat::Fp8PerTensor => 8.0,
            WeightFormat::Fp8Block128 => 8.0 + 32.0 / (FP8_BLOCK * FP8_BLOCK) as f64,
            WeightFormat::Int4 { group, zero_point } => 4.0 + (if zero_point { 24.0 } else { 16.0 }) / group as f64,
            WeightFormat::Nvfp4 => 4.0 + 8.0 / NVFP4_BLOCK as f64,
        }
    }
}

fn check_int4_group(group: usize) -> Result<()> {
    if group < 2 || group % 2 != 0 {
        return Err(Error::InvalidArgument(format!("int4 group {group} must be even and at least 2 (two nibbles per byte)")));
    }
    Ok(())
}

/// Canonical names: `bf16`, `fp8`, `fp8-block128`, `int4-g128`, `int4-g128-zp`, `nvfp4` (`FromStr` reads them back).
impl fmt::Display for WeightFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WeightFormat::Bf16 => write!(f, "bf16"),
            WeightFormat::Fp8PerTensor => write!(f, "fp8"),
            WeightFormat::Fp8Block128 => write!(f, "fp8-block128"),
            WeightFormat::Int4 { group, zero_point: false } => write!(f, "int4-g{group}"),
            WeightFormat::Int4 { group, zero_point: true } => write!(f, "int4-g{group}-zp"),
            WeightFormat::Nvfp4 => write!(f, "nvfp4"),
        }
    }
}

/// Case-insensitive; `_` and `-` are interchangeable. Besides the canonical names: `bfloat16`, `fp8-e4m3`,
/// `fp8-per-tensor`, `f8_e4m3`, `fp8-block`, `int4` (= `int4-g128`), `int4-zp`, `int4-g<N>-asym`. Anything else is
/// `Error::UnknownDtype`.
impl FromStr for WeightFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().to_ascii_lowercase().replace('_', "-");
        let format = match name.as_str() {
            "bf16" | "bfloat16" => WeightFormat::Bf16,
            "fp8" | "fp8-e4m3" | "f8-e4m3" | "fp8-per-tensor" | "e4m3" => WeightFormat::Fp8PerTensor,
            "fp8-block128" | "fp8-block" | "fp8-e4m3-block128" => WeightFormat::Fp8Block128,
            "nvfp4" | "fp4" => WeightFormat::Nvfp4,
            "int4" => WeightFormat::INT4_G128,
            "int4-zp" | "int4-asym" => WeightFormat::Int4 { group: INT4_DEFAULT_GROUP, zero_point: true },
            other => parse_int4(other).ok_or_else(|| Error::UnknownDtype(s.to_string()))?,
        };
        Ok(format)
    }
}

/// `int4-g<N>`, `int4-g<N>-zp`, `int4-g<N>-asym` with a valid group.
fn parse_int4(name: &str) -> Option<WeightFormat> {
    let rest = name.strip_prefix("int4-g")?;
    let (digits, zero_point) = match rest.split_once('-') {
        None => (rest, false),
        Some((digits, "zp" | "asym")) => (digits, true),
        Some(_) => return None,
    };
    let group: usize = digits.parse().ok()?;
    check_int4_group(group).ok()?;
    Some(WeightFormat::Int4 { group, zero_point })
}

/// f32 -> bf16, round to nearest even (what every kernel's output rounding does).
///
/// ```
/// use small4::quant::{bf16_to_f32, to_bf16};
///
/// // bf16 keeps 8 significant bits: 1 + 2^-8 is a tie between 1 and 1 + 2^-7 and goes to the even one, 1.
/// let rounded = to_bf16(&[1.5, 1.0 + 1.0 / 256.0, -3.0]);
/// assert_eq!(bf16_to_f32(&rounded), [1.5, 1.0, -3.0]);
/// ```
pub fn to_bf16(values: &[f32]) -> Vec<bf16> {
    values.iter().map(|&v| bf16::from_f32(v)).collect()
}

/// bf16 -> f32, exact (every bf16 is an f32). See [`to_bf16`] for an example.
pub fn bf16_to_f32(values: &[bf16]) -> Vec<f32> {
    values.iter().map(|v| v.to_f32()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [WeightFormat; 6] = [
        WeightFormat::Bf16,
        WeightFormat::Fp8PerTensor,
        WeightFormat::Fp8Block128,
        WeightFormat::Int4 { group: 128, zero_point: false },
        WeightFormat::Int4 { group: 64, zero_point: true },
        WeightFormat::Nvfp4,
    ];

    #[test]
    fn display_and_from_str_round_trip() {
        for format in ALL {
            assert_eq!(format.to_string().parse::<WeightFormat>().unwrap(), format);
        }
        assert_eq!("INT4".parse::<WeightFormat>().unwrap(), WeightFormat::INT4_G128);
        assert_eq!("fp8_e4m3".parse::<WeightFormat>().unwrap(), WeightFormat::Fp8PerTensor);
        assert_eq!("int4_g32_asym".parse::<WeightFormat>().unwrap(), WeightFormat::Int4 { group: 32, zero_point: true });
        assert_eq!("NVFP4".parse::<WeightFormat>().unwrap(), WeightFormat::Nvfp4);
    }

    #[test]
    fn unknown_names_are_typed_errors() {
        for bad in ["", "fp16", "int4-g", "int4-g0", "int4-g3", "int4-g128-xx", "fp8-block64", "int8"] {
            match bad.parse::<WeightFormat>() {
                Err(Error::UnknownDtype(name)) => assert_eq!(name, bad),
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn matrix_bytes_of_real_expert_shapes() {
        // w1 of one expert: [2048, 4096].
        let (n, k) = (2048, 4096);
        assert_eq!(WeightFormat::Bf16.matrix_bytes(n, k).unwrap(), 16 << 20);
        assert_eq!(WeightFormat::Fp8PerTensor.matrix_bytes(n, k).unwrap(), (8 << 20) + 4);
        assert_eq!(WeightFormat::Fp8Block128.matrix_bytes(n, k).unwrap(), (8 << 20) + 4 * 16 * 32);
        assert_eq!(WeightFormat::INT4_G128.matrix_bytes(n, k).unwrap(), (4 << 20) + 2 * n * 32);
        assert_eq!(WeightFormat::Int4 { group: 128, zero_point: true }.matrix_bytes(n, k).unwrap(), (4 << 20) + 3 * n * 32);
        assert_eq!(WeightFormat::Nvfp4.matrix_bytes(n, k).unwrap(), (4 << 20) + n * k / 16 + 4);
        // Ragged FP8 blocks round up.
        assert_eq!(WeightFormat::Fp8Block128.matrix_bytes(129, 130).unwrap(), 129 * 130 + 4 * 2 * 2);
        assert!((WeightFormat::Nvfp4.bits_per_weight() - 4.5).abs() < 1e-12);
        assert!((WeightFormat::INT4_G128.bits_per_weight() - 4.125).abs() < 1e-12);
    }

    #[test]
    fn matrix_bytes_rejects_impossible_shapes() {
        assert!(matches!(WeightFormat::INT4_G128.matrix_bytes(4, 100), Err(Error::Shape { .. })));
        assert!(matches!(WeightFormat::Nvfp4.matrix_bytes(4, 24), Err(Error::Shape { .. })));
        assert!(matches!(WeightFormat::Int4 { group: 7, zero_point: false }.matrix_bytes(4, 14), Err(Error::InvalidArgument(_))));
        assert!(matches!(WeightFormat::Bf16.matrix_bytes(usize::MAX, 2), Err(Error::InvalidArgument(_))));
    }
}
