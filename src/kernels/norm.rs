//! RMSNorm (`cuda/norm.cu`): bf16 rows in and out, f32 accumulation, optionally fused with the residual add.

use half::bf16;

use super::modules::NORM;
use super::params::RmsNormParams;
use super::{Matrix, Vector};
use crate::device::{launch_with, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};

const RMS_NORM: Kernel = Kernel { module: NORM, entry: "rms_norm_bf16" };
const MOE_COMBINE_ADD_RMS_NORM: Kernel = Kernel { module: NORM, entry: "moe_combine_add_rms_norm" };

/// Threads per row: one 16-byte vector per thread covers 4096 columns in two steps.
fn threads_for(cols: usize) -> u32 {
    ((cols / 8).next_power_of_two()).clamp(32, 256) as u32
}

/// `out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight` for every row of `x [rows, cols]`, `weight [cols]`.
///
/// `x` and `out` may have strided rows. `Error::Shape` when `weight` is not `[cols]` or `out` not `[rows, cols]`;
/// `Error::InvalidArgument` for `cols` 0, sizes beyond `i32` or an `eps` that is negative or not finite.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator(); // the PTX interpreter; `small4::device::gpu()?` on a GPU
/// let x: Vec<bf16> = [3.0f32, 4.0].iter().map(|&v| bf16::from_f32(v)).collect();
/// let weight = DeviceBuffer::from_slice(&device, &[bf16::ONE; 2])?;
/// let (x, out) = (DeviceBuffer::from_slice(&device, &x)?, DeviceBuffer::<bf16>::alloc(&device, 2)?);
/// small4::kernels::norm::rms_norm(x.view([1, 2])?, weight.as_vector(), out.view([1, 2])?, 0.0)?;
/// // A weight of the wrong length is a typed error, not a wrong launch:
/// let err = small4::kernels::norm::rms_norm(x.view([2, 1])?, weight.as_vector(), out.view([2, 1])?, 0.0);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// let out: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert!((out[0] - 3.0 / 12.5f32.sqrt()).abs() < 1e-2);
/// # Ok::<(), small4::Error>(())
/// ```
pub fn rms_norm(x: Matrix<bf16>, weight: Vector<bf16>, out: Matrix<bf16>, eps: f32) -> Result<()> {
    launch(&RMS_NORM, x, rms_norm_params(x, weight, out, eps)?)
}

/// The decoder's fused step: `h = x + residual` (written to `residual_out`, rounded to bf16), then `out = rms_norm(h)`.
///
/// All four row tensors are `[rows, cols]` (`Error::Shape` otherwise); errors as [`rms_norm`].
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::norm::add_rms_norm;
///
/// let device = simulator();
/// let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
/// // One row of 2: x + residual = [3, 4], weight [1, 2].
/// let (x, residual) = (DeviceBuffer::from_slice(&device, &to_bf16(&[1.0, 1.0]))?, DeviceBuffer::from_slice(&device, &to_bf16(&[2.0, 3.0]))?);
/// let weight = DeviceBuffer::from_slice(&device, &to_bf16(&[1.0, 2.0]))?;
/// let (h, out) = (DeviceBuffer::<bf16>::alloc(&device, 2)?, DeviceBuffer::<bf16>::alloc(&device, 2)?);
/// add_rms_norm(x.view([1, 2])?, residual.view([1, 2])?, weight.as_vector(), h.view([1, 2])?, out.view([1, 2])?, 1e-6)?;
/// assert_eq!(h.to_vec()?, to_bf16(&[3.0, 4.0])); // the sum, the next layer's residual
/// let rms = (12.5f32 + 1e-6).sqrt(); // sqrt(mean(3^2, 4^2))
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert!((got[0] - 3.0 / rms).abs() < 1e-2 && (got[1] - 2.0 * 4.0 / rms).abs() < 2e-2, "{got:?}");
/// // A residual of another shape is a typed error:
/// let err = add_rms_norm(x.view([1, 2])?, residual.view([2, 1])?, weight.as_vector(), h.view([1, 2])?, out.view([1, 2])?, 1e-6);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn add_rms_norm(x: Matrix<bf16>, residual: Matrix<bf16>, weight: Vector<bf16>, residual_out: Matrix<bf16>, out: Matrix<bf16>, eps: f32) -> Result<()> {
    launch(&RMS_NORM, x, add_rms_norm_params(x, &ResidualNorm { residual, weight, residual_out, out, eps })?)
}

/// A MoE block's output as its per-pair rows, combined as [`crate::kernels::moe::combine`] combines them.
#[derive(Clone, Copy)]
pub struct MoePairs<'a> {
    /// `[tokens * k, cols]` f32: each (token, expert) pair's weighted expert output (`MoeWorkspace::pair_out`).
    pub pair_out: Matrix<'a, f32>,
    /// `[tokens, cols]` f32: the shared expert's output, or None.
    pub shared_out: Option<Matrix<'a, f32>>,
    /// `[tokens, k]`: each pair's global expert id; pairs outside `0..experts` or not local are skipped.
    pub topk_ids: Matrix<'a, i32>,
    /// `[experts]` global -> local expert (-1: another GPU's), or None when every expert is local.
    pub expert_map: Option<Vector<'a, i32>>,
    /// Global expert count.
    pub experts: usize,
}

/// The end of a MoE layer in one launch: `h = combine(pairs) + residual` (the combine rounded to bf16 as
/// [`crate::kernels::moe::combine`] writes it, the sum rounded to bf16 into `residual_out`), then
/// `out = rms_norm(h) * weight`: bit for bit what `moe::combine` followed by [`add_rms_norm`] computes.
///
/// Errors as [`add_rms_norm`], and `Error::Shape` when the pairs are not `[rows * k, cols]` / `[rows, cols]` /
/// `[rows, k]`; `Error::InvalidArgument` when they are strided, `cols` is not a multiple of 8 or k is over 32.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::norm::{moe_combine_add_rms_norm, MoePairs};
///
/// let device = simulator();
/// // One token, k = 2, 8 columns: the pairs hold 1 and 2 everywhere, no shared expert; the residual is 1.
/// let pair_out = DeviceBuffer::from_slice(&device, &[[1.0f32; 8], [2.0; 8]].concat())?;
/// let ids = DeviceBuffer::from_slice(&device, &[0i32, 1])?;
/// let residual = DeviceBuffer::from_slice(&device, &[bf16::ONE; 8])?;
/// let (h, out) = (DeviceBuffer::<bf16>::alloc(&device, 8)?, DeviceBuffer::<bf16>::alloc(&device, 8)?);
/// let weight = DeviceBuffer::from_slice(&device, &[bf16::from_f32(0.5); 8])?;
/// let pairs = MoePairs { pair_out: pair_out.view([2, 8])?, shared_out: None, topk_ids: ids.view([1, 2])?, expert_map: None, experts: 2 };
/// moe_combine_add_rms_norm(&pairs, residual.view([1, 8])?, weight.as_vector(), h.view([1, 8])?, out.view([1, 8])?, 0.0)?;
/// // h = 1 + 2 + 1 = 4 in every column; rms_norm(h) = 1, times the weight 0.5.
/// assert!(h.to_vec()?.iter().all(|v| v.to_f32() == 4.0) && out.to_vec()?.iter().all(|v| v.to_f32() == 0.5));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn moe_combine_add_rms_norm(
    pairs: &MoePairs,
    residual: Matrix<bf16>,
    weight: Vector<bf16>,
    residual_out: Matrix<bf16>,
    out: Matrix<bf16>,
    eps: f32,
) -> Result<()> {
    let norm = ResidualNorm { residual, weight, residual_out, out, eps };
    launch(&MOE_COMBINE_ADD_RMS_NORM, residual, moe_combine_add_rms_norm_params(pairs, &norm)?)
}

/// The residual add + RMSNorm that ends a block, as [`add_rms_norm`] takes it besides the block's output `x`:
/// `h = x + residual` (rounded to bf16) into `residual_out`, `out = rms_norm(h) * weight`. The GEMMs that finish their
/// rows with it (`dense::linear_add_rms_norm`, `moe::moe_layer_add_rms_norm`) take it in this form.
#[derive(Clone, Copy)]
pub struct ResidualNorm<'a> {
    /// `[rows, cols]`: the residual stream before the block.
    pub residual: Matrix<'a, bf16>,
    /// `[cols]`: the next RMSNorm's weight.
    pub weight: Vector<'a, bf16>,
    /// `[rows, cols]`: the residual stream after the block (`x + residual`).
    pub residual_out: Matrix<'a, bf16>,
    /// `[rows, cols]`: the normed rows (the next block's input).
    pub out: Matrix<'a, bf16>,
    /// The RMSNorm epsilon (finite, >= 0).
    pub eps: f32,
}

/// The kernel parameters of `rms_norm(x)` (checked as [`rms_norm`]): for a launch, or for a GEMM row finisher.
pub(crate) fn rms_norm_params(x: Matrix<bf16>, weight: Vector<bf16>, out: Matrix<bf16>, eps: f32) -> Result<RmsNormParams> {
    checked_params(x, weight, out, None, None, eps)
}

/// The kernel parameters of `add_rms_norm(x, norm)` (checked as [`add_rms_norm`]).
pub(crate) fn add_rms_norm_params(x: Matrix<bf16>, norm: &ResidualNorm) -> Result<RmsNormParams> {
    checked_params(x, norm.weight, norm.out, Some((norm.residual, norm.residual_out)), None, norm.eps)
}

/// Most pairs a token's combine reads (`kMaxCombinePairs` in cuda/include/rms_norm_row.cuh: a bit each in the row's
/// mask of counting pairs).
const MAX_COMBINE_PAIRS: usize = 32;

/// The kernel parameters of [`moe_combine_add_rms_norm`] (checked as it checks them).
pub(crate) fn moe_combine_add_rms_norm_params(pairs: &MoePairs, norm: &ResidualNorm) -> Result<RmsNormParams> {
    let residual = norm.residual;
    let [rows, cols] = residual.dims();
    let [_, top_k] = pairs.topk_ids.dims();
    if cols % 8 != 0 {
        return Err(Error::InvalidArgument(format!("moe_combine_add_rms_norm: {cols} columns (a multiple of 8)")));
    }
    if top_k > MAX_COMBINE_PAIRS {
        return Err(Error::InvalidArgument(format!("moe_combine_add_rms_norm: top_k {top_k} (at most {MAX_COMBINE_PAIRS})")));
    }
    pairs.pair_out.expect_dims("moe_combine_add_rms_norm pair_out", [rows * top_k, cols])?;
    pairs.topk_ids.expect_dims("moe_combine_add_rms_norm topk_ids", [rows, top_k])?;
    pairs.pair_out.expect_packed("moe_combine_add_rms_norm pair_out")?;
    pairs.topk_ids.expect_packed("moe_combine_add_rms_norm topk_ids")?;
    pairs.pair_out.expect_aligned("moe_combine_add_rms_norm pair_out", 16)?;
    if let Some(s) = pairs.shared_out {
        s.expect_dims("moe_combine_add_rms_norm shared_out", [rows, cols])?;
        s.expect_packed("moe_combine_add_rms_norm shared_out")?;
        s.expect_aligned("moe_combine_add_rms_norm shared_out", 16)?;
    }
    if let Some(m) = pairs.expert_map {
        m.expect_dims("moe_combine_add_rms_norm expert_map", [pairs.experts])?;
        m.expect_packed("moe_combine_add_rms_norm expert_map")?;
    }
    super::to_i32("moe_combine_add_rms_norm top_k", top_k)?;
    super::to_i32("moe_combine_add_rms_norm experts", pairs.experts)?;
    super::to_i32("moe_combine_add_rms_norm pairs", pairs.pair_out.len())?;
    checked_params(residual, norm.weight, norm.out, Some((residual, norm.residual_out)), Some(pairs), norm.eps)
}

fn checked_params(
    x: Matrix<bf16>,
    weight: Vector<bf16>,
    out: Matrix<bf16>,
    residual: Option<(Matrix<bf16>, Matrix<bf16>)>,
    pairs: Option<&MoePairs>,
    eps: f32,
) -> Result<RmsNormParams> {
    let [rows, cols] = x.dims();
    if cols == 0 || cols > i32::MAX as usize || rows > i32::MAX as usize || x.row_stride() > i32::MAX as usize || out.row_stride() > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("rms_norm: {x:?} (rows and cols within i32, cols > 0)")));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidArgument(format!("rms_norm: eps {eps} must be finite and >= 0")));
    }
    weight.expect_dims("rms_norm weight", [cols])?;
    out.expect_dims("rms_norm out", [rows, cols])?;
    if let Some((r, r_out)) = residual {
        // The kernel reads the residual rows with x's stride and writes residual_out with out's.
        r.expect_dims("rms_norm residual", [rows, cols])?;
        r_out.expect_dims("rms_norm residual_out", [rows, cols])?;
        if r.row_stride() != x.row_stride() || r_out.row_stride() != out.row_stride() {
            return Err(Error::InvalidArgument(format!("rms_norm: residual {r:?} must be strided as x {x:?}, residual_out {r_out:?} as out {out:?}")));
        }
    }
    // The kernel loads 8 bf16 at a time when the columns and strides allow it: then every row starts on 16 bytes
    // provided the first one does.
    if cols % 8 == 0 && x.row_stride() % 8 == 0 && out.row_stride() % 8 == 0 {
        x.expect_aligned("rms_norm x", 16)?;
        out.expect_aligned("rms_norm out", 16)?;
        if let Some((r, r_out)) = residual {
            r.expect_aligned("rms_norm residual", 16)?;
            r_out.expect_aligned("rms_norm residual_out", 16)?;
        }
    }
    let null = std::ptr::null_mut();
    Ok(RmsNormParams {
        x: x.ptr(),
        weight: weight.ptr(),
        out: out.mut_ptr(),
        residual: residual.map_or(null, |(r, _)| r.mut_ptr()),
        residual_out: residual.map_or(null, |(_, r)| r.mut_ptr()),
        rows: rows as i32,
        cols: cols as i32,
        x_row_stride: x.row_stride() as i32,
        out_row_stride: out.row_stride() as i32,
        eps,
        pair_out: pairs.map_or(std::ptr::null(), |m| m.pair_out.ptr()),
        shared_out: pairs.and_then(|m| m.shared_out).map_or(std::ptr::null(), |v| v.ptr()),
        topk_ids: pairs.map_or(std::ptr::null(), |m| m.topk_ids.ptr()),
        expert_map: pairs.and_then(|m| m.expert_map).map_or(std::ptr::null(), |v| v.ptr()),
        top_k: pairs.map_or(0, |m| m.topk_ids.dims()[1] as i32),
        experts: pairs.map_or(0, |m| m.experts as i32),
    })
}

/// One block per row of checked parameters (none for 0 rows); `x` = the rows' view, for its device.
fn launch(kernel: &Kernel, x: Matrix<bf16>, params: RmsNormParams) -> Result<()> {
    if params.rows == 0 {
        return Ok(());
    }
    let config = LaunchConfig { grid: Dim3::x(params.rows as u32), block: Dim3::x(threads_for(params.cols as usize)), shared_bytes: 0 };
    launch_with(x.device(), kernel, &config, &params)
}
