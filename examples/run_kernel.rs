//! Run one kernel on your own buffers: RMSNorm over bf16 rows, on the PTX interpreter (or `--gpu`), compared with
//! the same formula computed here on the CPU.
//!
//! ```sh
//! cargo run --example run_kernel
//! ```
//!
//! A runtime that owns its device memory wraps it with the unsafe `DeviceBuffer::from_raw_borrowed` instead of
//! `DeviceBuffer::from_slice`; the C ABI (`small4_rms_norm` in include/small4.h) does exactly that.

use half::bf16;
use small4::device::{Device, DeviceBuffer};
use small4::Result;

/// RMSNorm of `rows` rows of `weight.len()` columns on `device`; returns the kernel's output and the largest
/// difference from the formula in f32.
pub fn rms_norm_on(device: &Device, x: &[f32], weight: &[f32], eps: f32) -> Result<(Vec<f32>, f32)> {
    let cols = weight.len();
    let rows = x.len() / cols;
    let to_bf16 = |v: &[f32]| v.iter().map(|&f| bf16::from_f32(f)).collect::<Vec<_>>();
    let x_bf16 = to_bf16(x);
    let weight_bf16 = to_bf16(weight);
    let x_dev = DeviceBuffer::from_slice(device, &x_bf16)?;
    let weight_dev = DeviceBuffer::from_slice(device, &weight_bf16)?;
    let out_dev = DeviceBuffer::<bf16>::alloc(device, x.len())?;
    small4::kernels::norm::rms_norm(x_dev.view([rows, cols])?, weight_dev.as_vector(), out_dev.view([rows, cols])?, eps)?;
    let out: Vec<f32> = out_dev.to_vec()?.iter().map(|v| v.to_f32()).collect();
    // The formula in f32 on the same bf16 inputs: x * rsqrt(mean(x^2) + eps) * weight.
    let x_in: Vec<f32> = x_bf16.iter().map(|v| v.to_f32()).collect();
    let w_in: Vec<f32> = weight_bf16.iter().map(|v| v.to_f32()).collect();
    let mut max_diff = 0f32;
    for (row, out_row) in x_in.chunks(cols).zip(out.chunks(cols)) {
        let inv_rms = 1.0 / (row.iter().map(|v| v * v).sum::<f32>() / cols as f32 + eps).sqrt();
        for ((v, w), got) in row.iter().zip(&w_in).zip(out_row) {
            max_diff = max_diff.max((v * inv_rms * w - got).abs());
        }
    }
    Ok((out, max_diff))
}

fn main() -> Result<()> {
    let device = if std::env::args().any(|a| a == "--gpu") { small4::device::gpu()? } else { small4::device::simulator() };
    let (rows, cols) = (4, 512);
    let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
    let weight: Vec<f32> = (0..cols).map(|i| 0.5 + (i % 7) as f32 / 8.0).collect();
    let (out, max_diff) = rms_norm_on(&device, &x, &weight, 1e-6)?;
    println!("rms_norm of {rows}x{cols} bf16 on {}: out[0..4] = {:?}, max |kernel - reference| = {max_diff:.2e}", device.name(), &out[..4]);
    Ok(())
}
