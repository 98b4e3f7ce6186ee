//! Quantised weight matrices in the exact layouts of the checkpoints, with quantisers and the reference dequantiser.
//!
//! Dequantisation is defined by these f32 formulas (the CUDA kernels in `cuda/dequant.cu` compute the same f32
//! operations in the same order, then round to bf16):
//! - `Fp8PerTensor`: `e4m3(q) * scale`
//! - `Fp8Block128`:  `e4m3(q) * scales[r / 128][c / 128]`
//! - `Int4Grouped`:  `(q - z) * f32(scale)` with z = 8 (symmetric) or the group's zero point (exact in f32)
//! - `Nvfp4`:        `e2m1(q) * (e4m3(block_scale) / global_scale)`: the block's effective scale is one f32 division,
//!   then one f32 multiplication per element (what a kernel does once per 16 elements, then per element).
//!
//! Each type can be made two ways: `quantize` from f32 weights (what the synthetic checkpoints and the tests do) or
//! `from_parts` from the arrays a checkpoint stores, with every length and scale checked. A checkpoint's arrays
//! give back exactly the matrix they came from:
//!
//! ```
//! use small4::quant::{Int4Grouped, QuantizedMatrix, WeightFormat};
//!
//! let (rows, cols) = (2, 64);
//! let weights: Vec<f32> = (0..rows * cols).map(|i| (i as f32 - 64.0) / 32.0).collect();
//! let q = Int4Grouped::quantize_with(&weights, rows, cols, 32, true)?;
//!
//! // What a checkpoint stores: packed nibbles, one bf16 scale and one zero point per group of 32.
//! assert_eq!((q.packed.len(), q.scales.len()), (rows * cols / 2, rows * cols / 32));
//! let stored = Int4Grouped::from_parts(q.packed.clone(), rows, cols, 32, q.scales.clone(), q.zeros.clone())?;
//! assert_eq!(stored, q);
//!
//! // The enum wraps any format for code that does not care which.
//! let any = QuantizedMatrix::Int4(stored);
//! assert_eq!(any.format(), WeightFormat::Int4 { group: 32, zero_point: true });
//! assert_eq!(any.dequantize(), q.dequantize());
//! # Ok::<(), small4::Error>(())
//! ```

use half::bf16;
use rayon::prelude::*;

use super::fp4::{e2m1_to_f32, f32_to_e2m1, pack_e2m1_pair, E2M1_MAX};
use super::fp8::{e4m3_to_f32, f32_to_e4m3, E4M3_MAX};
use super::{WeightFormat, FP8_BLOCK, INT4_DEFAULT_GROUP, NVFP4_BLOCK};
use crate::error::{Error, Result};

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(Error::shape(what, expected, len));
    }
    Ok(())
}

/// Shape and content checks shared by every quantiser: the matrix fits the format and holds only finite values.
fn check_input(format: WeightFormat, weights: &[f32], rows: usize, cols: usize) -> Result<()> {
    format.check_shape(rows, cols)?;
    check_len(&format!("{format} quantize input of [{rows}, {cols}]"), weights.len(), rows * cols)?;
    if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
        return Err(Error::InvalidArgument(format!("{format} quantize: weight {i} is {}", weights[i])));
    }
    Ok(())
}

fn amax(values: impl Iterator<Item = f32>) -> f32 {
    values.fold(0.0f32, |m, v| m.max(v.abs()))
}

/// `amax / max_code_value`, or 1 for an all-zero range (any positive scale reproduces zeros).
fn scale_for(amax: f32, max_code_value: f32) -> f32 {
    if amax > 0.0 {
        amax / max_code_value
    } else {
        1.0
    }
}

fn check_scale(what: &str, scale: f32) -> Result<()> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidArgument(format!("{what} must be finite and positive, got {scale}")));
    }
    Ok(())
}

/// FP8 e4m3 with one f32 scale: `W = e4m3(data) * scale` (the published checkpoint's `qscale_weight`).
///
/// ```
/// use small4::quant::{f32_to_e4m3, Fp8PerTensor};
///
/// // From f32 weights: scale = amax / 448, so the largest weight lands on the largest code.
/// let m = Fp8PerTensor::quantize(&[4.48, -1.12, 0.0, 2.24], 2, 2)?;
/// assert_eq!(m.data[0], f32_to_e4m3(448.0));
/// let back = m.dequantize();
/// assert!((back[0] - 4.48).abs() < 1e-6 && (back[1] + 1.12).abs() < 1e-6 && back[2] == 0.0);
///
/// // From a checkpoint's arrays: codes and the `qscale_weight` scalar.
/// let stored = Fp8PerTensor::from_parts(vec![f32_to_e4m3(1.0), f32_to_e4m3(-0.5)], 1, 2, 0.25)?;
/// assert_eq!(stored.dequantize(), [0.25, -0.125]);
/// // A scale must be finite and positive, and the data must fill the shape.
/// assert!(Fp8PerTensor::from_parts(vec![0; 2], 1, 2, 0.0).is_err());
/// assert!(Fp8PerTensor::from_parts(vec![0; 3], 1, 2, 1.0).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8PerTensor {
    /// e4m3 codes, row-major `[rows, cols]`, one byte per weight.
    pub data: Vec<u8>,
    /// Rows: output features N.
    pub rows: usize,
    /// Columns: input features K.
    pub cols: usize,
    /// The f32 multiplier of every code (finite, positive): `W = e4m3(data) * scale`.
    pub scale: f32,
}

impl Fp8PerTensor {
    /// scale = amax / 448, codes = e4m3(w / scale) rounded to nearest even.
    pub fn quantize(weights: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_input(WeightFormat::Fp8PerTensor, weights, rows, cols)?;
        let scale = scale_for(amax(weights.iter().copied()), E4M3_MAX);
        let data = weights.par_iter().map(|&w| f32_to_e4m3(w / scale)).collect();
        Ok(Fp8PerTensor { data, rows, cols, scale })
    }

    /// From a checkpoint's arrays: e4m3 codes `[rows, cols]` and the scale (finite, positive).
    pub fn from_parts(data: Vec<u8>, rows: usize, cols: usize, scale: f32) -> Result<Self> {
        WeightFormat::Fp8PerTensor.check_shape(rows, cols)?;
        check_len("fp8 data", data.len(), rows * cols)?;
        check_scale("fp8 per-tensor scale", scale)?;
        Ok(Fp8PerTensor { data, rows, cols, scale })
    }

    /// The f32 weights, row-major `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.data.par_iter().map(|&q| e4m3_to_f32(q) * self.scale).collect()
    }
}

/// FP8 e4m3 with an f32 scale per 128x128 block (DeepSeek style): `W[r, c] = e4m3(data[r, c]) * scales[r/128, c/128]`,
/// `scales` row-major `[ceil(rows/128), ceil(cols/128)]`.
///
/// ```
/// use small4::quant::{Fp8Block128, E4M3_MAX};
///
/// // [2, 130]: two block columns, the second only 2 wide; its weights are 100 times smaller.
/// let (rows, cols) = (2, 130);
/// let weights: Vec<f32> = (0..rows * cols).map(|i| if i % cols < 128 { 1.0 } else { 0.01 }).collect();
/// let m = Fp8Block128::quantize(&weights, rows, cols)?;
/// assert_eq!(Fp8Block128::scale_cols(cols), 2);
/// assert_eq!(m.scales, [1.0 / E4M3_MAX, 0.01 / E4M3_MAX]);
/// // The scale of any element is its block's.
/// assert_eq!(m.scale(1, 129), 0.01 / E4M3_MAX);
/// // Each block is scaled on its own, so the small weights keep their precision.
/// let back = m.dequantize();
/// assert!((back[129] - 0.01).abs() < 1e-6);
///
/// // From a checkpoint: codes and one scale per block (here one block).
/// let stored = Fp8Block128::from_parts(m.data[..128].to_vec(), 1, 128, vec![0.5])?;
/// assert_eq!(stored.dequantize()[0], E4M3_MAX * 0.5);
/// assert!(Fp8Block128::from_parts(vec![0; 128], 1, 128, vec![0.5, 0.5]).is_err()); // too many scales
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Block128 {
    /// e4m3 codes, row-major `[rows, cols]`, one byte per weight.
    pub data: Vec<u8>,
    /// Rows: output features N (any count; the last block row may be ragged).
    pub rows: usize,
    /// Columns: input features K (any count; the last block column may be ragged).
    pub cols: usize,
    /// `[ceil(rows / 128), ceil(cols / 128)]` row-major f32 scales (finite, positive), one per 128x128 block.
    pub scales: Vec<f32>,
}

impl Fp8Block128 {
    /// Block columns of the scale array for `cols` columns (the last block may be ragged).
    pub fn scale_cols(cols: usize) -> usize {
        cols.div_ceil(FP8_BLOCK)
    }

    /// Each block's scale = its amax / 448.
    pub fn quantize(weights: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_input(WeightFormat::Fp8Block128, weights, rows, cols)?;
        let scale_cols = Self::scale_cols(cols);
        let scales: Vec<f32> = (0..rows.div_ceil(FP8_BLOCK) * scale_cols)
            .into_par_iter()
            .map(|block| {
                let (block_row, block_col) = (block / scale_cols, block % scale_cols);
                let row_range = block_row * FP8_BLOCK..((block_row + 1) * FP8_BLOCK).min(rows);
                let col_range = block_col * FP8_BLOCK..((block_col + 1) * FP8_BLOCK).min(cols);
                let block_amax = amax(row_range.flat_map(|r| weights[r * cols..][col_range.clone()].iter().copied()));
                scale_for(block_amax, E4M3_MAX)
            })
            .collect();
        let data = weights
            .par_chunks(cols)
            .enumerate()
            .flat_map_iter(|(r, row)| {
                let row_scales = &scales[(r / FP8_BLOCK) * scale_cols..];
                row.iter().enumerate().map(move |(c, &w)| f32_to_e4m3(w / row_scales[c / FP8_BLOCK]))
            })
            .collect();
        Ok(Fp8Block128 { data, rows, cols, scales })
    }

    /// From a checkpoint's arrays: e4m3 codes `[rows, cols]` and the block scales (finite, positive).
    pub fn from_parts(data: Vec<u8>, rows: usize, cols: usize, scales: Vec<f32>) -> Result<Self> {
        WeightFormat::Fp8Block128.check_shape(rows, cols)?;
        check_len("fp8 block data", data.len(), rows * cols)?;
        check_len("fp8 block scales", scales.len(), rows.div_ceil(FP8_BLOCK) * Self::scale_cols(cols))?;
        scales.iter().try_for_each(|&s| check_scale("fp8 block scale", s))?;
        Ok(Fp8Block128 { data, rows, cols, scales })
    }

    /// The scale of element `(row, col)`: its block's.
    pub fn scale(&self, row: usize, col: usize) -> f32 {
        self.scales[(row / FP8_BLOCK) * Self::scale_cols(self.cols) + col / FP8_BLOCK]
    }

    /// The f32 weights, row-major `[rows, cols]` (the formula of the module doc).
    pub fn dequantize(&self) -> Vec<f32> {
        if self.cols == 0 {
            return Vec::new();
        }
        self.data
            .par_chunks(self.cols)
            .enumerate()
            .flat_map_iter(|(r, row)| row.iter().enumerate().map(move |(c, &q)| e4m3_to_f32(q) * self.scale(r, c)))
            .collect()
    }
}

/// INT4 group-wise along K (GPTQ / AWQ style). `packed` is `[rows, cols/2]` with the LOW nibble holding the even
/// column; `scales` is `[rows, cols/group]`; `zeros` (when present) one unpacked u8 in 0..=15 per group, same shape.
/// Symmetric: `W = (q - 8) * scale`; with zero points: `W = (q - z) * scale`.
///
/// ```
/// use half::bf16;
/// use small4::quant::matrix::INT4_SYMMETRIC_ZERO;
/// use small4::quant::{Int4Grouped, WeightFormat};
///
/// // Symmetric, group 128: the scale is amax / 7, so -7..=7 times the scale are exact.
/// let weights: Vec<f32> = (0..128).map(|i| (i % 15) as f32 - 7.0).collect();
/// let m = Int4Grouped::quantize(&weights, 1, 128)?;
/// assert_eq!(m.format(), WeightFormat::INT4_G128);
/// assert_eq!(m.scales, [bf16::from_f32(1.0)]);
/// assert_eq!(m.code(0), INT4_SYMMETRIC_ZERO - 7); // -7
/// assert_eq!(m.code(7), INT4_SYMMETRIC_ZERO); // 0
/// assert_eq!(m.dequantize(), weights);
///
/// // With zero points the range need not be centred: 0..=15 in steps of 1 is exact with zero point 0.
/// let ramp: Vec<f32> = (0..16).map(|i| i as f32).collect();
/// let m = Int4Grouped::quantize_with(&ramp, 1, 16, 16, true)?;
/// assert_eq!(m.zeros.as_deref(), Some(&[0u8][..]));
/// assert_eq!(m.dequantize(), ramp);
///
/// // From a checkpoint's arrays: codes 9 and 6 (low nibble first) around the zero 8, scale 0.5.
/// let stored = Int4Grouped::from_parts(vec![0x69], 1, 2, 2, vec![bf16::from_f32(0.5)], None)?;
/// assert_eq!(stored.dequantize(), [0.5, -1.0]);
/// // Zero points are nibbles.
/// assert!(Int4Grouped::from_parts(vec![0x69], 1, 2, 2, vec![bf16::ONE], Some(vec![16])).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Int4Grouped {
    /// `[rows, cols / 2]` bytes, two 4-bit codes (0..=15) each: the low nibble holds the even column.
    pub packed: Vec<u8>,
    /// Rows: output features N.
    pub rows: usize,
    /// Columns: input features K, a multiple of `group`.
    pub cols: usize,
    /// Weights per group along a row (even, at least 2; usually [`INT4_DEFAULT_GROUP`]).
    pub group: usize,
    /// `[rows, cols / group]` bf16 scales, one per group of a row.
    pub scales: Vec<bf16>,
    /// `[rows, cols / group]` zero points (one unpacked u8 in 0..=15 per group) for the asymmetric layout; `None`
    /// for symmetric, where the zero is [`INT4_SYMMETRIC_ZERO`].
    pub zeros: Option<Vec<u8>>,
}

/// The implicit zero of symmetric INT4: codes 0..=15 stand for -8..=7 (see [`Int4Grouped`]'s example).
pub const INT4_SYMMETRIC_ZERO: u8 = 8;

impl Int4Grouped {
    /// Group 128, symmetric.
    pub fn quantize(weights: &[f32], rows: usize, cols: usize) -> Result<Self> {
        Self::quantize_with(weights, rows, cols, INT4_DEFAULT_GROUP, false)
    }

    /// Symmetric: scale = bf16(amax / 7), q = clamp(round(w / scale) + 8, 0, 15).
    /// Zero point: the range [min(min, 0), max(max, 0)] (zero always representable) over 15 steps, scale rounded to
    /// bf16, z = clamp(round(-lo / scale), 0, 15), q = clamp(round(w / scale) + z, 0, 15).
    /// Quantisation uses the bf16-rounded scale, the one dequantisation will see.
    pub fn quantize_with(weights: &[f32], rows: usize, cols: usize, group: usize, zero_point: bool) -> Result<Self> {
        check_input(WeightFormat::Int4 { group, zero_point }, weights, rows, cols)?;
        let groups: Vec<(bf16, u8)> = weights
            .par_chunks(group.max(1))
            .map(|values| {
                if zero_point {
                    let lo = values.iter().fold(0.0f32, |m, &v| m.min(v));
                    let hi = values.iter().fold(0.0f32, |m, &v| m.max(v));
                    let scale = bf16::from_f32(scale_for(hi - lo, 15.0));
                    let zero = (-lo / scale.to_f32()).round_ties_even().clamp(0.0, 15.0) as u8;
                    (scale, zero)
                } else {
                    (bf16::from_f32(scale_for(amax(values.iter().copied()), 7.0)), INT4_SYMMETRIC_ZERO)
                }
            })
            .collect();
        let codes = weights.par_chunks(group.max(1)).zip(&groups).flat_map_iter(|(values, &(scale, zero))| {
            values.iter().map(move |&w| ((w / scale.to_f32()).round_ties_even() + zero as f32).clamp(0.0, 15.0) as u8)
        });
        let codes: Vec<u8> = codes.collect();
        let packed = codes.chunks_exact(2).map(|pair| pair[0] | (pair[1] << 4)).collect();
        let scales = groups.iter().map(|&(s, _)| s).collect();
        let zeros = zero_point.then(|| groups.iter().map(|&(_, z)| z).collect());
        Ok(Int4Grouped { packed, rows, cols, group, scales, zeros })
    }

    /// From a checkpoint's arrays: packed nibbles, per-group scales and, for the asymmetric layout, zero points
    /// (each at most 15).
    pub fn from_parts(packed: Vec<u8>, rows: usize, cols: usize, group: usize, scales: Vec<bf16>, zeros: Option<Vec<u8>>) -> Result<Self> {
        WeightFormat::Int4 { group, zero_point: zeros.is_some() }.check_shape(rows, cols)?;
        let groups = rows * cols / group;
        check_len("int4 packed", packed.len(), rows * cols / 2)?;
        check_len("int4 scales", scales.len(), groups)?;
        if let Some(zeros) = &zeros {
            check_len("int4 zeros", zeros.len(), groups)?;
            if let Some(&z) = zeros.iter().find(|&&z| z > 15) {
                return Err(Error::OutOfRange { what: "int4 zero point".into(), index: z as i64, limit: 15 });
            }
        }
        Ok(Int4Grouped { packed, rows, cols, group, scales, zeros })
    }

    /// `Int4 { group, zero_point }` of this matrix.
    pub fn format(&self) -> WeightFormat {
        WeightFormat::Int4 { group: self.group, zero_point: self.zeros.is_some() }
    }

    /// The 4-bit code of element `index` (row-major).
    pub fn code(&self, index: usize) -> u8 {
        (self.packed[index / 2] >> (4 * (index % 2))) & 0xf
    }

    /// The f32 weights, row-major `[rows, cols]` (the formula of the module doc).
    pub fn dequantize(&self) -> Vec<f32> {
        (0..self.rows * self.cols)
            .into_par_iter()
            .map(|i| {
                let g = i / self.group;
                let zero = self.zeros.as_ref().map_or(INT4_SYMMETRIC_ZERO, |z| z[g]);
                (self.code(i) as f32 - zero as f32) * self.scales[g].to_f32()
            })
            .collect()
    }
}

/// NVFP4 exactly as the checkpoint stores it: `packed` e2m1 `[rows, cols/2]` (low nibble = even column), `scales`
/// e4m3 bytes `[rows, cols/16]` (`weight_scale`), `global_scale` f32 (`weight_global_scale`) used as a DIVISOR:
/// `W = e2m1 * (e4m3(scale) / global_scale)`.
///
/// ```
/// use small4::quant::{f32_to_e4m3, Nvfp4};
///
/// // 6 is the largest e2m1 value: a block of 6s gets the effective scale 1 and dequantises exactly.
/// let weights = vec![6.0f32; 32];
/// let m = Nvfp4::quantize(&weights, 1, 32)?;
/// assert_eq!(m.global_scale, 448.0); // 448 * 6 / amax
/// assert_eq!(m.effective_scale(0), 1.0);
/// assert_eq!(m.dequantize(), weights);
///
/// // From a checkpoint's arrays: e2m1 codes 2 (= 1.0) and 5 (= 3.0), block scale e4m3(8), global scale 4.
/// let stored = Nvfp4::from_parts(vec![0x52; 8], 1, 16, vec![f32_to_e4m3(8.0)], 4.0)?;
/// assert_eq!(stored.effective_scale(0), 2.0);
/// assert_eq!(&stored.dequantize()[..2], &[2.0, 6.0]);
/// assert!(Nvfp4::from_parts(vec![0x52; 8], 1, 16, vec![0x38], 0.0).is_err()); // the divisor must be > 0
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Nvfp4 {
    /// `[rows, cols / 2]` bytes, two e2m1 codes each (`weight_packed`): the low nibble holds the even column.
    pub packed: Vec<u8>,
    /// Rows: output features N.
    pub rows: usize,
    /// Columns: input features K, a multiple of [`NVFP4_BLOCK`].
    pub cols: usize,
    /// `[rows, cols / 16]` e4m3 bytes (`weight_scale`), one per block of 16 consecutive weights of a row.
    pub scales: Vec<u8>,
    /// The tensor's f32 divisor of every block scale (`weight_global_scale`, finite, positive).
    pub global_scale: f32,
}

impl Nvfp4 {
    /// As NVIDIA's modelopt does: global = 448 * 6 / amax; each 16-block's scale = e4m3(block_amax / 6 * global)
    /// (saturating); codes = e2m1(w / (e4m3(scale) / global)), 0 where the block scale rounded to zero.
    pub fn quantize(weights: &[f32], rows: usize, cols: usize) -> Result<Self> {
        check_input(WeightFormat::Nvfp4, weights, rows, cols)?;
        let tensor_amax = amax(weights.iter().copied());
        let global_scale = if tensor_amax > 0.0 { E4M3_MAX * E2M1_MAX / tensor_amax } else { 1.0 };
        let blocks: Vec<(u8, [u8; NVFP4_BLOCK / 2])> = weights
            .par_chunks(NVFP4_BLOCK)
            .map(|block| {
                let scale = f32_to_e4m3(amax(block.iter().copied()) / E2M1_MAX * global_scale);
                let effective = e4m3_to_f32(scale) / global_scale;
                let code = |w: f32| if effective > 0.0 { f32_to_e2m1(w / effective) } else { 0 };
                let mut packed = [0u8; NVFP4_BLOCK / 2];
                for (byte, pair) in packed.iter_mut().zip(block.chunks_exact(2)) {
                    *byte = pack_e2m1_pair(code(pair[0]), code(pair[1]));
                }
                (scale, packed)
            })
            .collect();
        let scales = blocks.iter().map(|&(s, _)| s).collect();
        let packed = blocks.iter().flat_map(|(_, p)| p.iter().copied()).collect();
        Ok(Nvfp4 { packed, rows, cols, scales, global_scale })
    }

    /// From a checkpoint's arrays: `weight_packed`, `weight_scale` (e4m3 bytes) and `weight_global_scale` (finite,
    /// positive).
    pub fn from_parts(packed: Vec<u8>, rows: usize, cols: usize, scales: Vec<u8>, global_scale: f32) -> Result<Self> {
        WeightFormat::Nvfp4.check_shape(rows, cols)?;
        check_len("nvfp4 packed", packed.len(), rows * cols / 2)?;
        check_len("nvfp4 scales", scales.len(), rows * cols / NVFP4_BLOCK)?;
        check_scale("nvfp4 global scale", global_scale)?;
        Ok(Nvfp4 { packed, rows, cols, scales, global_scale })
    }

    /// The f32 multiplier of block `block` (row-major over `[rows, cols/16]`).
    pub fn effective_scale(&self, block: usize) -> f32 {
        e4m3_to_f32(self.scales[block]) / self.global_scale
    }

    /// The f32 weights, row-major `[rows, cols]` (the formula of the module doc).
    pub fn dequantize(&self) -> Vec<f32> {
        self.packed
            .par_chunks(NVFP4_BLOCK / 2)
            .enumerate()
            .flat_map_iter(|(block, bytes)| {
                let scale = self.effective_scale(block);
                bytes.iter().flat_map(move |&b| [e2m1_to_f32(b & 0xf) * scale, e2m1_to_f32(b >> 4) * scale])
            })
            .collect()
    }
}

/// A weight matrix in any of the formats.
///
/// ```
/// use small4::quant::{QuantizedMatrix, WeightFormat};
///
/// // 0.875 / 448 = 2^-9 is exact, so these weights come back exactly.
/// let weights = vec![0.875f32; 4 * 64];
/// let m = QuantizedMatrix::quantize(WeightFormat::Fp8Block128, &weights, 4, 64)?;
/// assert!(matches!(m, QuantizedMatrix::Fp8Block128(_)));
/// assert_eq!((m.format(), m.shape()), (WeightFormat::Fp8Block128, (4, 64)));
/// assert_eq!(m.bytes(), 4 * 64 + 4); // e4m3 codes and one f32 block scale
/// assert_eq!(m.dequantize(), weights);
/// // Non-finite weights cannot be quantised.
/// assert!(QuantizedMatrix::quantize(WeightFormat::Bf16, &[f32::NAN], 1, 1).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub enum QuantizedMatrix {
    /// Unquantised bf16 weights.
    Bf16 {
        /// The weights, row-major `[rows, cols]`.
        data: Vec<bf16>,
        /// Rows: output features N.
        rows: usize,
        /// Columns: input features K.
        cols: usize,
    },
    /// FP8 e4m3 with one per-tensor f32 scale.
    Fp8PerTensor(Fp8PerTensor),
    /// FP8 e4m3 with one f32 scale per 128x128 block.
    Fp8Block128(Fp8Block128),
    /// INT4 with a bf16 scale (and optionally a zero point) per group along K.
    Int4(Int4Grouped),
    /// NVFP4: e2m1 with an e4m3 scale per 16 along K and an f32 global divisor.
    Nvfp4(Nvfp4),
}

impl QuantizedMatrix {
    /// Quantises `[rows, cols]` f32 weights into `format` with that format's quantiser (INT4 with its group and
    /// zero-point choice).
    pub fn quantize(format: WeightFormat, weights: &[f32], rows: usize, cols: usize) -> Result<Self> {
        Ok(match format {
            WeightFormat::Bf16 => {
                check_input(format, weights, rows, cols)?;
                QuantizedMatrix::Bf16 { data: super::to_bf16(weights), rows, cols }
            }
            WeightFormat::Fp8PerTensor => QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::quantize(weights, rows, cols)?),
            WeightFormat::Fp8Block128 => QuantizedMatrix::Fp8Block128(Fp8Block128::quantize(weights, rows, cols)?),
            WeightFormat::Int4 { group, zero_point } => QuantizedMatrix::Int4(Int4Grouped::quantize_with(weights, rows, cols, group, zero_point)?),
            WeightFormat::Nvfp4 => QuantizedMatrix::Nvfp4(Nvfp4::quantize(weights, rows, cols)?),
        })
    }

    /// The format this matrix is stored in.
    pub fn format(&self) -> WeightFormat {
        match self {
            QuantizedMatrix::Bf16 { .. } => WeightFormat::Bf16,
            QuantizedMatrix::Fp8PerTensor(_) => WeightFormat::Fp8PerTensor,
            QuantizedMatrix::Fp8Block128(_) => WeightFormat::Fp8Block128,
            QuantizedMatrix::Int4(m) => m.format(),
            QuantizedMatrix::Nvfp4(_) => WeightFormat::Nvfp4,
        }
    }

    /// `(rows, cols)`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            QuantizedMatrix::Bf16 { rows, cols, .. } => (*rows, *cols),
            QuantizedMatrix::Fp8PerTensor(m) => (m.rows, m.cols),
            QuantizedMatrix::Fp8Block128(m) => (m.rows, m.cols),
            QuantizedMatrix::Int4(m) => (m.rows, m.cols),
            QuantizedMatrix::Nvfp4(m) => (m.rows, m.cols),
        }
    }

    /// Bytes actually held, arrays and scalars included (equals `format().matrix_bytes(rows, cols)`).
    pub fn bytes(&self) -> usize {
        match self {
            QuantizedMatrix::Bf16 { data, .. } => 2 * data.len(),
            QuantizedMatrix::Fp8PerTensor(m) => m.data.len() + 4,
            QuantizedMatrix::Fp8Block128(m) => m.data.len() + 4 * m.scales.len(),
            QuantizedMatrix::Int4(m) => m.packed.len() + 2 * m.scales.len() + m.zeros.as_ref().map_or(0, Vec::len),
            QuantizedMatrix::Nvfp4(m) => m.packed.len() + m.scales.len() + 4,
        }
    }

    /// The weights as the grouped GEMM (`cuda/moe_gemm.cu`, every dense and expert linear) multiplies them, row-major
    /// `[rows, cols]`: what a CPU reference must use so that only the kernel's own error is measured (KERNELS.md: the
    /// same rounded inputs). FP8 block-128 and INT4 are dequantised to bf16 in registers before the bf16 MMA
    /// (`bf16(e4m3 * block_scale)`, `bf16((q - z) * scale)`), so their values are [`Self::dequantize`] rounded to
    /// bf16. bf16 weights are exact; per-tensor FP8 and NVFP4 feed the exact codes (e4m3; e2m1 x e4m3 block scale,
    /// exact in bf16) and apply the per-tensor scale / global divisor to the f32 sums in the epilogue, so they are
    /// [`Self::dequantize`] unrounded.
    ///
    /// ```
    /// use half::bf16;
    /// use small4::quant::{Int4Grouped, QuantizedMatrix};
    ///
    /// // Codes 15 and 0 (q - 8 = 7 and -8) with the scale 1 + 2^-7: 7 * 1.0078125 = 7.0546875 needs 10 significant
    /// // bits, so the kernel's bf16 product is 7.0625; -8.0625 is exact either way.
    /// let m = QuantizedMatrix::Int4(Int4Grouped::from_parts(vec![0x0f], 1, 2, 2, vec![bf16::from_f32(1.0078125)], None)?);
    /// assert_eq!(m.dequantize(), [7.0546875, -8.0625]);
    /// assert_eq!(m.dequantize_for_gemm(), [7.0625, -8.0625]);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn dequantize_for_gemm(&self) -> Vec<f32> {
        let mut values = self.dequantize();
        if matches!(self, QuantizedMatrix::Fp8Block128(_) | QuantizedMatrix::Int4(_)) {
            values.par_iter_mut().for_each(|v| *v = bf16::from_f32(*v).to_f32());
        }
        values
    }

    /// The f32 weights, row-major `[rows, cols]` (the formula of the module doc).
    pub fn dequantize(&self) -> Vec<f32> {
        match self {
            QuantizedMatrix::Bf16 { data, .. } => super::bf16_to_f32(data),
            QuantizedMatrix::Fp8PerTensor(m) => m.dequantize(),
            QuantizedMatrix::Fp8Block128(m) => m.dequantize(),
            QuantizedMatrix::Int4(m) => m.dequantize(),
            QuantizedMatrix::Nvfp4(m) => m.dequantize(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// Uniform values whose magnitude changes by powers of two from row to row and every 128 columns, so blocks and
    /// groups get different scales (each INT4 group stays uniform); never exactly 0 or ±1.
    fn random_matrix(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..rows * cols)
            .map(|i| {
                let magnitude = 2f32.powi((i / cols % 5) as i32 - 2 + (i % cols / 128 % 3) as i32);
                loop {
                    let v = rng.random_range(-1.0f32..1.0) * magnitude;
                    if v != 0.0 && v.abs() != 1.0 {
                        break v;
                    }
                }
            })
            .collect()
    }

    fn relative_frobenius(got: &[f32], want: &[f32]) -> f64 {
        let err: f64 = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w as f64).powi(2)).sum();
        let norm: f64 = want.iter().map(|&w| (w as f64).powi(2)).sum();
        (err / norm).sqrt()
    }

    /// Half the distance between the e4m3 neighbours around `v` (scaled domain): 2^(e-4) for a normal binade
    /// [2^e, 2^(e+1)), 2^-10 among the subnormals.
    fn e4m3_half_step(v: f32) -> f32 {
        let v = v.abs();
        if v < 2f32.powi(-6) {
            2f32.powi(-10)
        } else {
            2f32.powi(v.log2().floor() as i32 - 4)
        }
    }

    /// Half the distance between the e2m1 neighbours around `v`, or the saturation error above 6.
    fn e2m1_half_step(v: f32) -> f32 {
        match v.abs() {
            v if v < 2.0 => 0.25,
            v if v < 4.0 => 0.5,
            v if v <= 6.0 => 1.0,
            v => v - 6.0,
        }
    }

    /// f32 slack for the scaling divisions and multiplications (a few ulps of the value).
    fn slack(v: f32) -> f32 {
        v.abs() * 4.0 * f32::EPSILON
    }

    /// The largest error quantisation may make on element `i` of value `x`: half a step of the element's own grid
    /// (its format's code spacing at |x| times its scale), plus f32 slack.
    fn element_bound(matrix: &QuantizedMatrix, i: usize, x: f32) -> f32 {
        let bound = match matrix {
            QuantizedMatrix::Bf16 { .. } => x.abs() / 256.0,
            QuantizedMatrix::Fp8PerTensor(q) => e4m3_half_step(x / q.scale) * q.scale,
            QuantizedMatrix::Fp8Block128(q) => {
                let scale = q.scale(i / q.cols, i % q.cols);
                e4m3_half_step(x / scale) * scale
            }
            QuantizedMatrix::Int4(q) => {
                // Half a step, plus (zero point) the shift of the grid's far end by the bf16 rounding of the scale
                // (relative 2^-8): at most 15 steps * 2^-8.
                let scale = q.scales[i / q.group].to_f32();
                scale * (0.5 + if q.zeros.is_some() { 15.0 / 256.0 } else { 0.0 })
            }
            QuantizedMatrix::Nvfp4(q) => {
                let scale = q.effective_scale(i / NVFP4_BLOCK);
                e2m1_half_step(x / scale) * scale
            }
        };
        bound + slack(x)
    }

    /// Quantises a random matrix, checks every element against its bound and returns the relative Frobenius error.
    fn round_trip(format: WeightFormat, rows: usize, cols: usize, seed: u64) -> f64 {
        let w = random_matrix(rows, cols, seed);
        let q = QuantizedMatrix::quantize(format, &w, rows, cols).unwrap();
        let d = q.dequantize();
        for (i, (&x, &y)) in w.iter().zip(&d).enumerate() {
            let bound = element_bound(&q, i, x);
            assert!((x - y).abs() <= bound, "{format} [{rows}, {cols}] element {i}: {x} -> {y}, bound {bound}");
        }
        relative_frobenius(&d, &w)
    }

    const SHAPES: [(usize, usize); 5] = [(1, 128), (17, 256), (130, 384), (3, 4096), (256, 640)];

    #[test]
    fn fp8_per_tensor_error_is_half_a_step() {
        for (seed, &(rows, cols)) in SHAPES.iter().enumerate() {
            let err = round_trip(WeightFormat::Fp8PerTensor, rows, cols, seed as u64);
            // Relative error of e4m3 is at most 2^-4 in the normal range; uniform data sits far below it.
            assert!(err < 0.035, "{err}");
        }
        let w = random_matrix(4, 128, 1);
        assert_eq!(Fp8PerTensor::quantize(&w, 4, 128).unwrap().scale, amax(w.iter().copied()) / 448.0);
    }

    #[test]
    fn fp8_block128_error_is_half_a_step_of_each_block() {
        for (seed, &(rows, cols)) in SHAPES.iter().enumerate() {
            let err = round_trip(WeightFormat::Fp8Block128, rows, cols, 10 + seed as u64);
            assert!(err < 0.035, "{err}");
            // Every block's amax maps to 448 (up to the f32 division): the largest code is used.
            let w = random_matrix(rows, cols, seed as u64);
            assert!(Fp8Block128::quantize(&w, rows, cols).unwrap().data.iter().any(|&c| c & 0x7f == 0x7e));
        }
    }

    #[test]
    fn int4_error_is_half_a_step_symmetric_and_zero_point() {
        for zero_point in [false, true] {
            for (seed, &(rows, cols)) in SHAPES.iter().enumerate() {
                for group in [32, 128] {
                    let err = round_trip(WeightFormat::Int4 { group, zero_point }, rows, cols, 20 + seed as u64);
                    // Uniform data over ±amax with steps amax/7: RMS error step/sqrt(12), RMS value amax/sqrt(3) ->
                    // ~1/14 relative; zero points have 15 steps over the same range (~1/15).
                    assert!(err < 0.08, "zp {zero_point} g {group}: {err}");
                }
            }
        }
    }

    #[test]
    fn nvfp4_error_is_half_a_step_of_each_block() {
        for (seed, &(rows, cols)) in SHAPES.iter().enumerate() {
            let err = round_trip(WeightFormat::Nvfp4, rows, cols, 30 + seed as u64);
            // e2m1 on uniform data: steps of 1/12 to 1/3 of the block amax; measured ~0.09 relative.
            assert!(err < 0.12, "{err}");
            let w = random_matrix(rows, cols, 30 + seed as u64);
            let q = Nvfp4::quantize(&w, rows, cols).unwrap();
            assert_eq!(q.global_scale, 448.0 * 6.0 / amax(w.iter().copied()));
            assert_eq!((q.packed.len(), q.scales.len()), (rows * cols / 2, rows * cols / 16));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 48, ..Default::default() })]
        /// Any format, any legal shape: every element within its bound.
        #[test]
        fn every_format_round_trips_within_bounds(
            format_index in 0usize..7,
            rows in 1usize..40,
            units in 1usize..12,
            seed in proptest::prelude::any::<u64>(),
        ) {
            let formats = [
                (WeightFormat::Bf16, 1),
                (WeightFormat::Fp8PerTensor, 1),
                (WeightFormat::Fp8Block128, 1),
                (WeightFormat::Int4 { group: 32, zero_point: false }, 32),
                (WeightFormat::Int4 { group: 64, zero_point: true }, 64),
                (WeightFormat::Int4 { group: 2, zero_point: true }, 2),
                (WeightFormat::Nvfp4, 16),
            ];
            let (format, unit) = formats[format_index];
            let cols = units * if unit == 1 { 23 } else { unit };
            round_trip(format, rows, cols, seed);
        }
    }

    #[test]
    fn nvfp4_layout_matches_the_checkpoint() {
        // One row: block amax 3 everywhere except the second block, so the scales differ.
        let mut w: Vec<f32> = (0..32).map(|i| if i % 2 == 0 { 1.5 } else { -3.0 }).collect();
        w[16..].iter_mut().for_each(|v| *v *= 0.5);
        let q = Nvfp4::quantize(&w, 1, 32).unwrap();
        assert_eq!(q.global_scale, 448.0 * 6.0 / 3.0);
        // Block 0: scale 3/6 * 896 = 448 -> e4m3 0x7e; codes 1.5 / 0.5 = 3 (0x5), -3 / 0.5 = -6 (0xf).
        assert_eq!(q.scales[0], 0x7e);
        assert_eq!(q.packed[0], 0xf5);
        assert_eq!(q.dequantize(), w);
    }

    #[test]
    fn int4_layout_low_nibble_is_even_column() {
        let q = Int4Grouped::from_parts(vec![0x1f, 0x80], 1, 4, 2, vec![bf16::from_f32(0.5), bf16::from_f32(2.0)], None).unwrap();
        assert_eq!(q.dequantize(), vec![3.5, -3.5, -16.0, 0.0]);
        let q = Int4Grouped::from_parts(vec![0x1f, 0x80], 1, 4, 2, vec![bf16::from_f32(0.5), bf16::from_f32(2.0)], Some(vec![3, 0])).unwrap();
        assert_eq!(q.dequantize(), vec![6.0, -1.0, 0.0, 16.0]);
    }

    #[test]
    fn fp8_block_scales_follow_blocks() {
        let (rows, cols) = (130, 260);
        let w = random_matrix(rows, cols, 5);
        let q = Fp8Block128::quantize(&w, rows, cols).unwrap();
        assert_eq!(q.scales.len(), 2 * 3);
        for br in 0..2 {
            for bc in 0..3 {
                let block_amax = (br * 128..((br + 1) * 128).min(rows))
                    .flat_map(|r| (bc * 128..((bc + 1) * 128).min(cols)).map(move |c| (r, c)))
                    .fold(0.0f32, |m, (r, c)| m.max(w[r * cols + c].abs()));
                assert_eq!(q.scales[br * 3 + bc], block_amax / 448.0);
            }
        }
    }

    #[test]
    fn shape_and_value_errors_are_typed() {
        let w = random_matrix(2, 128, 1);
        assert!(matches!(Fp8PerTensor::quantize(&w, 3, 128), Err(Error::Shape { .. })));
        assert!(matches!(Fp8Block128::quantize(&w, 2, 100), Err(Error::Shape { .. })));
        assert!(matches!(Int4Grouped::quantize_with(&w, 4, 64, 128, false), Err(Error::Shape { .. })));
        assert!(matches!(Int4Grouped::quantize_with(&w, 2, 128, 5, false), Err(Error::InvalidArgument(_))));
        assert!(matches!(Nvfp4::quantize(&w[..24], 1, 24), Err(Error::Shape { .. })));
        let mut bad = w.clone();
        bad[7] = f32::NAN;
        assert!(matches!(Nvfp4::quantize(&bad, 2, 128), Err(Error::InvalidArgument(_))));
        assert!(matches!(Fp8PerTensor::from_parts(vec![0; 4], 2, 2, 0.0), Err(Error::InvalidArgument(_))));
        assert!(matches!(Nvfp4::from_parts(vec![0; 8], 1, 16, vec![0; 2], 1.0), Err(Error::Shape { .. })));
        let zeros = Some(vec![16u8]);
        assert!(matches!(Int4Grouped::from_parts(vec![0; 1], 1, 2, 2, vec![bf16::ONE], zeros), Err(Error::OutOfRange { .. })));
    }

    #[test]
    fn all_zero_matrices_quantize_to_zero() {
        let w = vec![0.0f32; 2 * 128];
        for format in [WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128, WeightFormat::INT4_G128, WeightFormat::Nvfp4] {
            let q = QuantizedMatrix::quantize(format, &w, 2, 128).unwrap();
            assert!(q.dequantize().iter().all(|&v| v == 0.0), "{format}");
        }
        let zp = QuantizedMatrix::quantize(WeightFormat::Int4 { group: 128, zero_point: true }, &w, 2, 128).unwrap();
        assert!(zp.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn held_bytes_equal_the_planner_size() {
        let (rows, cols) = (130, 384);
        let w = random_matrix(rows, cols, 9);
        let formats = [
            WeightFormat::Bf16,
            WeightFormat::Fp8PerTensor,
            WeightFormat::Fp8Block128,
            WeightFormat::INT4_G128,
            WeightFormat::Int4 { group: 64, zero_point: true },
            WeightFormat::Nvfp4,
        ];
        for format in formats {
            let q = QuantizedMatrix::quantize(format, &w, rows, cols).unwrap();
            assert_eq!(q.format(), format);
            assert_eq!(q.shape(), (rows, cols));
            assert_eq!(q.bytes(), format.matrix_bytes(rows, cols).unwrap(), "{format}");
            assert_eq!(q.dequantize().len(), rows * cols);
        }
    }
}
