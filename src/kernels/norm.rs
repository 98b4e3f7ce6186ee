//! RMSNorm (`cuda/norm.cu`): bf16 rows in and out, f32 accumulation, optionally fused with the residual add.

use half::bf16;

use super::modules::NORM;
use super::params::RmsNormParams;
use super::{Matrix, Vector};
use crate::device::{launch_with, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};

const RMS_NORM: Kernel = Kernel { module: NORM, entry: "rms_norm_bf16" };

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
    launch(x, weight, out, None, eps)
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
    launch(x, weight, out, Some((residual, residual_out)), eps)
}

fn launch(x: Matrix<bf16>, weight: Vector<bf16>, out: Matrix<bf16>, residual: Option<(Matrix<bf16>, Matrix<bf16>)>, eps: f32) -> Result<()> {
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
    if rows == 0 {
        return Ok(());
    }
    let null = std::ptr::null_mut();
    let params = RmsNormParams {
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
    };
    let config = LaunchConfig { grid: Dim3::x(rows as u32), block: Dim3::x(threads_for(cols)), shared_bytes: 0 };
    launch_with(x.device(), &RMS_NORM, &config, &params)
}
