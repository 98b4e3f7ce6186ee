//! RMSNorm (`cuda/norm.cu`): bf16 rows in and out, f32 accumulation, optionally fused with the residual add.

use half::bf16;

use super::modules::NORM;
use super::params::RmsNormParams;
use crate::device::{launch_with, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};

const RMS_NORM: Kernel = Kernel { module: NORM, entry: "rms_norm_bf16" };

/// Threads per row: one 16-byte vector per thread covers 4096 columns in two steps.
fn threads_for(cols: usize) -> u32 {
    ((cols / 8).next_power_of_two()).clamp(32, 256) as u32
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(Error::shape(what, expected, len));
    }
    Ok(())
}

/// `out[r] = x[r] * rsqrt(mean(x[r]^2) + eps) * weight` for `rows` rows of `weight.len()` columns.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator(); // the PTX interpreter; `small4::device::gpu()?` on a GPU
/// let x: Vec<bf16> = [3.0f32, 4.0].iter().map(|&v| bf16::from_f32(v)).collect();
/// let weight = DeviceBuffer::from_slice(&device, &[bf16::ONE; 2])?;
/// let (x, out) = (DeviceBuffer::from_slice(&device, &x)?, DeviceBuffer::<bf16>::alloc(&device, 2)?);
/// small4::kernels::norm::rms_norm(&x, &weight, &out, 1, 0.0)?;
/// let out: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert!((out[0] - 3.0 / 12.5f32.sqrt()).abs() < 1e-2);
/// # Ok::<(), small4::Error>(())
/// ```
pub fn rms_norm(x: &DeviceBuffer<bf16>, weight: &DeviceBuffer<bf16>, out: &DeviceBuffer<bf16>, rows: usize, eps: f32) -> Result<()> {
    launch(x, weight, out, None, rows, eps)
}

/// The decoder's fused step: `h = x + residual` (written to `residual_out`, rounded to bf16), then `out = rms_norm(h)`.
pub fn add_rms_norm(
    x: &DeviceBuffer<bf16>,
    residual: &DeviceBuffer<bf16>,
    weight: &DeviceBuffer<bf16>,
    residual_out: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    rows: usize,
    eps: f32,
) -> Result<()> {
    launch(x, weight, out, Some((residual, residual_out)), rows, eps)
}

fn launch(
    x: &DeviceBuffer<bf16>,
    weight: &DeviceBuffer<bf16>,
    out: &DeviceBuffer<bf16>,
    residual: Option<(&DeviceBuffer<bf16>, &DeviceBuffer<bf16>)>,
    rows: usize,
    eps: f32,
) -> Result<()> {
    let cols = weight.len();
    if cols == 0 || cols > i32::MAX as usize || rows > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("rms_norm: {rows} rows of {cols} columns")));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidArgument(format!("rms_norm: eps {eps} must be finite and >= 0")));
    }
    check_len("rms_norm x", x.len(), rows * cols)?;
    check_len("rms_norm out", out.len(), rows * cols)?;
    if let Some((r, r_out)) = residual {
        check_len("rms_norm residual", r.len(), rows * cols)?;
        check_len("rms_norm residual_out", r_out.len(), rows * cols)?;
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
        x_row_stride: cols as i32,
        out_row_stride: cols as i32,
        eps,
    };
    let config = LaunchConfig { grid: Dim3::x(rows as u32), block: Dim3::x(threads_for(cols)), shared_bytes: 0 };
    launch_with(x.device(), &RMS_NORM, &config, &params)
}
