//! The fp8-activation GEMM of the fp8 tensor-core prefill kernels (`cuda/moe_gemm_wgmma_fp8.cu`,
//! [`crate::kernels::moe_wgmma_fp8`]), modelled exactly: activations quantised to e4m3 with one scale per row and 128
//! columns ([`quantize_act_block128`], bit for bit the device quantiser), e4m3 weights with their per-tensor or
//! 128x128-block scales, one partial sum per 128-k block, promoted into an f32 accumulator
//! ([`gemm_a8`]).
//!
//! # Agreement with the kernel
//!
//! Everything but the tensor core's partial sums is computed as the kernel computes it: the scales' product
//! `s_b = a_scale * w_scale` in f32, the promotion `acc = fma(P_b, s_b, acc)` for b = 0, 1, .., the per-tensor scale
//! multiplied last. The partial `P_b` (128 products of e4m3 values) is summed exactly here (in f64: every product is a
//! multiple of 2^-18 below 2^18, so 128 of them need at most 43 bits) and rounded once to f32. The tensor core sums
//! them in an unspecified order with fewer than f32's bits (../shared/HOPPER-ASYNC.md §1.6: in the model reported
//! bit-accurate for Hopper, each k32 instruction aligns its 33 terms (32 products and the running partial C) to the
//! largest one's exponent E, truncating each to 13 fraction bits below 2^E, and truncates the sum to 13 fraction
//! bits). So per instruction i of the four in a block, with A_i = sum of |a b| over its 32 products and
//! 2^E <= max(|C_i|, max |a b|) <= |C_i| + A_i:
//!   error_i < 33 * 2^-13 * 2^E + 2^-13 * |v| <= 34 * 2^-13 * (|C_i| + A_i) (1 + 2^-8),
//! and |C_i| <= S_b (1 + 2^-6), S_b = sum over the block of |a b|, C_0 = 0; summed over i:
//!   |P_kernel - P_exact| < 34 * 2^-13 * (3 + 1) * S_b * (1 + 2^-6)^2 < 140 * 2^-13 * S_b.
//! (An exact sum rounded once per instruction, or any f32 order, errs far less: 128 * 2^-24 * S_b.) Each side's
//! fma rounds once more (2^-24 of |acc| <= T, T = sum_b |s_b| S_b) and the reference's P_b once (2^-24 S_b), so
//!   |y_kernel - y_reference| <= ((140 * 2^-13 + 2^-24) * T + 2 (blocks + 1) * 2^-24 * T) * |row_scale|,
//! which [`Fp8GemmOutput::bounds`] holds per element (rounded up: 144 * 2^-13). With data whose partial sums are
//! exact in any order (small integers; tests/moe_wgmma_fp8.rs) the two agree bit for bit.
//!
//! ```
//! use small4::quant::{f32_to_e4m3, Fp8Block128, QuantizedMatrix};
//! use small4::reference::fp8_gemm::{gemm_a8, quantize_act_block128};
//!
//! // One row of 256 activations: 1.75 in block 0, 0.875 in block 1 (amax = 448 * 2^-8 and 448 * 2^-9: exact
//! // scales); W [1, 256] of 2.0 codes, block scales 1.
//! let x: Vec<f32> = (0..256).map(|c| if c < 128 { 1.75 } else { 0.875 }).collect();
//! let acts = quantize_act_block128(&x, 1, 256)?;
//! assert_eq!(acts.scales, [2f32.powi(-8), 2f32.powi(-9)]);
//! assert_eq!(acts.code(0, 0), f32_to_e4m3(448.0));
//! let w = QuantizedMatrix::Fp8Block128(Fp8Block128::from_parts(vec![f32_to_e4m3(2.0); 256], 1, 256, vec![1.0, 1.0])?);
//! let y = gemm_a8(&acts, &w)?;
//! // 128 * 1.75 * 2 + 128 * 0.875 * 2, exact here.
//! assert_eq!(y.values, [672.0]);
//! assert!(y.bounds[0] > 0.0 && y.bounds[0] < 0.02 * y.values[0]);
//! # Ok::<(), small4::Error>(())
//! ```

use crate::error::{Error, Result};
use crate::quant::{e4m3_to_f32, f32_to_e4m3, QuantizedMatrix, E4M3_MAX};

/// Columns per activation scale (and k per promoted partial): the fp8-block weights' 128.
pub const BLOCK: usize = 128;

/// The floor of a block's largest magnitude: an all-zero (or all-tiny) block gets a finite, non-zero scale
/// (2^-64 / 448) and quantises to zeros.
pub const MIN_AMAX: f32 = f32::from_bits(0x1f80_0000); // 2^-64

/// Byte c of every 32 of a quantised row holds column `permuted_column(c)` of the 32: the k order in which the
/// repacked fp8 weight fragments reach mma m16n8k32 / wgmma k32 (params.h `MoeQuantizeActParams`).
///
/// ```
/// use small4::reference::fp8_gemm::permuted_column;
///
/// assert_eq!((0..16).map(permuted_column).collect::<Vec<_>>(), [0, 1, 8, 9, 2, 3, 10, 11, 4, 5, 12, 13, 6, 7, 14, 15]);
/// assert_eq!(permuted_column(16 + 5), 16 + 3);
/// ```
pub fn permuted_column(c: usize) -> usize {
    let (base, c) = (c - c % 16, c % 16);
    base + 2 * (c / 4) + c % 2 + 8 * ((c / 2) % 2)
}

/// The byte of a quantised row that holds column `col`: the inverse of [`permuted_column`].
///
/// ```
/// use small4::reference::fp8_gemm::{byte_of_column, permuted_column};
///
/// assert!((0..64).all(|c| permuted_column(byte_of_column(c)) == c && byte_of_column(permuted_column(c)) == c));
/// ```
pub fn byte_of_column(col: usize) -> usize {
    let (base, c) = (col - col % 16, col % 16);
    let (high, low) = (c / 8, c % 8);
    base + 4 * (low / 2) + low % 2 + 2 * high
}

/// Activations quantised by [`quantize_act_block128`]: what the device quantiser writes.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantizedActs {
    /// Rows.
    pub rows: usize,
    /// Columns (a multiple of [`BLOCK`]).
    pub cols: usize,
    /// `[rows, cols]` e4m3 codes, each 32 columns in the permuted order ([`permuted_column`]).
    pub codes: Vec<u8>,
    /// `[rows, cols / 128]` f32 scales: x ≈ e4m3 × scale.
    pub scales: Vec<f32>,
}

impl QuantizedActs {
    /// The code of element (row, column), columns in their own order.
    pub fn code(&self, row: usize, col: usize) -> u8 {
        self.codes[row * self.cols + byte_of_column(col)]
    }

    /// The value the codes stand for: e4m3 × the block's scale.
    pub fn value(&self, row: usize, col: usize) -> f32 {
        e4m3_to_f32(self.code(row, col)) * self.scales[row * (self.cols / BLOCK) + col / BLOCK]
    }

    /// Every value the codes stand for ([`QuantizedActs::value`]), `[rows, cols]` in their own column order: the
    /// activations a GEMM on these codes multiplies.
    pub fn values(&self) -> Vec<f32> {
        (0..self.rows).flat_map(|r| (0..self.cols).map(move |c| self.value(r, c))).collect()
    }
}

/// `x` `[rows, cols]` (bf16 values in f32) to e4m3 with one scale per row and 128 columns, as
/// `moe_quantize_act_e4m3_block128` does: `amax = max(max |x| over the block, MIN_AMAX)` (NaN ignored),
/// `scale = amax / 448`, code = `f32_to_e4m3(x * (448 / amax))`, each quotient rounded once in f32.
/// `Error::InvalidArgument` for `cols` not a positive multiple of 128, `Error::Shape` for `x` not `rows x cols`.
///
/// ```
/// use small4::reference::fp8_gemm::{quantize_act_block128, MIN_AMAX};
///
/// // A row of 0.25s and one 3.5 (exact: 3.5 = 448 * 2^-7), then an all-zero block.
/// let mut x = vec![0.25f32; 256];
/// x[7] = 3.5;
/// x[128..].fill(0.0);
/// let q = quantize_act_block128(&x, 1, 256)?;
/// assert_eq!(q.scales, [2f32.powi(-7), MIN_AMAX / 448.0]);
/// assert_eq!((q.value(0, 7), q.value(0, 0), q.value(0, 200)), (3.5, 0.25, 0.0));
/// assert!(quantize_act_block128(&x[..64], 1, 64).is_err()); // not a whole block
/// # Ok::<(), small4::Error>(())
/// ```
pub fn quantize_act_block128(x: &[f32], rows: usize, cols: usize) -> Result<QuantizedActs> {
    if cols == 0 || cols % BLOCK != 0 {
        return Err(Error::InvalidArgument(format!("quantize_act_block128: cols {cols} must be a positive multiple of {BLOCK}")));
    }
    if x.len() != rows * cols {
        return Err(Error::shape("quantize_act_block128 x", rows * cols, x.len()));
    }
    let blocks = cols / BLOCK;
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0f32; rows * blocks];
    for r in 0..rows {
        for b in 0..blocks {
            let block = &x[r * cols + b * BLOCK..][..BLOCK];
            let amax = block.iter().fold(0f32, |m, v| m.max(v.abs())).max(MIN_AMAX);
            let inv = E4M3_MAX / amax;
            scales[r * blocks + b] = amax / E4M3_MAX;
            for c in 0..BLOCK {
                // Byte c of the block holds column permuted_column(c).
                codes[r * cols + b * BLOCK + c] = f32_to_e4m3(block[permuted_column(c)] * inv);
            }
        }
    }
    Ok(QuantizedActs { rows, cols, codes, scales })
}

/// [`gemm_a8`]'s result: `[rows, n]` values and, per element, the bound on how far the kernel may lie from them (the
/// module doc derives it).
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8GemmOutput {
    /// `y[r, n]` as the kernel computes it before its epilogue's routing weight or SwiGLU.
    pub values: Vec<f32>,
    /// The largest |kernel - value| the tensor core's partial sums allow.
    pub bounds: Vec<f32>,
}

/// `y = x W^T` with `x` the quantised activations `[rows, k]` and `W` `[n, k]` fp8 (per-tensor or block-128): per
/// element, `acc = fma(P_b, a_scale[r, b] * w_scale[n, b], acc)` over the 128-k blocks b, P_b the block's exact sum
/// of code products rounded to f32, then `y = acc * scale` for per-tensor weights (w_scale 1), as the kernel does.
/// `Error::InvalidArgument` for another weight format, `Error::Shape` when the k differ.
///
/// ```
/// use small4::quant::{f32_to_e4m3, Fp8PerTensor, QuantizedMatrix, WeightFormat};
/// use small4::reference::fp8_gemm::{gemm_a8, quantize_act_block128};
///
/// // x = 448 * 2^-8 = 1.75 everywhere (scale 2^-8, codes 448); W [2, 128]: codes 1 and -2, per-tensor scale 0.5.
/// let acts = quantize_act_block128(&[1.75; 128], 1, 128)?;
/// let codes: Vec<u8> = (0..256).map(|i| f32_to_e4m3(if i < 128 { 1.0 } else { -2.0 })).collect();
/// let w = QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::from_parts(codes, 2, 128, 0.5)?);
/// assert_eq!(gemm_a8(&acts, &w)?.values, [128.0 * 1.75 * 0.5, -128.0 * 1.75]);
/// // bf16 weights have no fp8 GEMM:
/// let bf16 = QuantizedMatrix::quantize(WeightFormat::Bf16, &[0.0; 128], 1, 128)?;
/// assert!(gemm_a8(&acts, &bf16).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn gemm_a8(acts: &QuantizedActs, w: &QuantizedMatrix) -> Result<Fp8GemmOutput> {
    let (n, k) = w.shape();
    if k != acts.cols {
        return Err(Error::shape("gemm_a8 k", k, acts.cols));
    }
    let (codes, row_scale, block_scales): (&[u8], f32, Option<&[f32]>) = match w {
        QuantizedMatrix::Fp8PerTensor(m) => (&m.data, m.scale, None),
        QuantizedMatrix::Fp8Block128(m) => (&m.data, 1.0, Some(&m.scales)),
        other => return Err(Error::InvalidArgument(format!("gemm_a8: fp8 weights, not {}", other.format()))),
    };
    let block_scale = |row: usize, b: usize| block_scales.map_or(1.0, |s| s[(row / BLOCK) * k.div_ceil(BLOCK) + b]);
    let blocks = k / BLOCK;
    let eps13 = 144.0 * (-13f64).exp2();
    let eps24 = (-24f64).exp2();
    let mut values = vec![0f32; acts.rows * n];
    let mut bounds = vec![0f32; acts.rows * n];
    for r in 0..acts.rows {
        let x: Vec<f64> = (0..k).map(|c| e4m3_to_f32(acts.code(r, c)) as f64).collect();
        for o in 0..n {
            let w_row = &codes[o * k..][..k];
            let (mut acc, mut total) = (0f32, 0f64);
            for b in 0..blocks {
                let (mut sum, mut abs) = (0f64, 0f64);
                for c in b * BLOCK..(b + 1) * BLOCK {
                    let product = x[c] * e4m3_to_f32(w_row[c]) as f64;
                    sum += product;
                    abs += product.abs();
                }
                let scale = acts.scales[r * blocks + b] * block_scale(o, b);
                acc = (sum as f32).mul_add(scale, acc);
                total += scale.abs() as f64 * abs;
            }
            values[r * n + o] = acc * row_scale;
            let bound = ((eps13 + eps24) * total + 2.0 * (blocks as f64 + 1.0) * eps24 * total) * row_scale.abs() as f64;
            bounds[r * n + o] = (bound * (1.0 + 1e-6)) as f32;
        }
    }
    Ok(Fp8GemmOutput { values, bounds })
}
