//! Standalone dequantisation (`cuda/dequant.cu`): one weight matrix in FP8 (per-tensor or 128x128 block scales),
//! INT4 grouped (symmetric or zero point) or NVFP4 -> bf16 `[rows, cols]`. The device buffers hold exactly the arrays
//! of the matching `crate::quant` type, and the kernel's output equals that type's `dequantize()` rounded to bf16.

use half::bf16;

use super::modules::DEQUANT;
use super::params::{DequantFp8Params, DequantInt4Params, DequantNvfp4Params};
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};
use crate::quant::{QuantizedMatrix, WeightFormat, FP8_BLOCK, NVFP4_BLOCK};

const FP8_PER_TENSOR: Kernel = Kernel { module: DEQUANT, entry: "dequant_fp8_per_tensor" };
const FP8_BLOCK128: Kernel = Kernel { module: DEQUANT, entry: "dequant_fp8_block128" };
const INT4: Kernel = Kernel { module: DEQUANT, entry: "dequant_int4" };
const NVFP4: Kernel = Kernel { module: DEQUANT, entry: "dequant_nvfp4" };

const THREADS: u32 = 256;
/// Grid cap of the grid-stride loop: 4 blocks of 256 threads on each of an H100's 132 SMs (at the kernels' at most 53
/// registers, 4 x 256 x 53 = 54k of an SM's 64k registers); more blocks would only queue behind these.
const MAX_BLOCKS: u32 = 132 * 4;
/// Outputs per warp tile: 32 lanes x one 16-byte vector of 8-bit (16 elements) or 4-bit (32 elements) codes.
const fn elements_per_tile(bits: usize) -> usize {
    32 * 128 / bits
}

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(Error::shape(what, expected, len));
    }
    Ok(())
}

fn check_scalar(what: &str, value: f32) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(Error::InvalidArgument(format!("{what} must be finite and positive, got {value}")));
    }
    Ok(())
}

/// Common checks: dimensions fit the kernels' `int`s and `out` has `rows * cols` elements. Returns the element count.
fn check_matrix(what: &str, out: &DeviceBuffer<bf16>, rows: usize, cols: usize) -> Result<usize> {
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("{what}: {rows} x {cols} exceeds the kernels' 32-bit dimensions")));
    }
    let elements = rows.checked_mul(cols).ok_or_else(|| Error::InvalidArgument(format!("{what}: {rows} x {cols} overflows")))?;
    check_len(&format!("{what} out"), out.len(), elements)?;
    Ok(elements)
}

/// Launches with one warp per tile, at most `max_blocks` blocks (the kernels loop over the rest).
fn launch<P: Copy>(device: &Device, kernel: &Kernel, elements: usize, bits: usize, max_blocks: u32, params: &P) -> Result<()> {
    if elements == 0 {
        return Ok(());
    }
    if max_blocks == 0 {
        return Err(Error::InvalidArgument(format!("{}: max_blocks must be at least 1", kernel.entry)));
    }
    let tiles = elements.div_ceil(elements_per_tile(bits));
    let blocks = super::blocks_for(tiles, (THREADS / 32) as usize).clamp(1, max_blocks);
    let config = LaunchConfig { grid: Dim3::x(blocks), block: Dim3::x(THREADS), shared_bytes: 0 };
    launch_with(device, kernel, &config, params)
}

/// `out = e4m3(data) * scale` (the FP8 checkpoint's `qscale_weight`).
pub fn dequant_fp8_per_tensor(data: &DeviceBuffer<u8>, scale: f32, out: &DeviceBuffer<bf16>, rows: usize, cols: usize) -> Result<()> {
    fp8_per_tensor(data, scale, out, rows, cols, MAX_BLOCKS)
}

fn fp8_per_tensor(data: &DeviceBuffer<u8>, scale: f32, out: &DeviceBuffer<bf16>, rows: usize, cols: usize, max_blocks: u32) -> Result<()> {
    let elements = check_matrix("dequant_fp8_per_tensor", out, rows, cols)?;
    check_len("dequant_fp8_per_tensor data", data.len(), elements)?;
    check_scalar("dequant_fp8_per_tensor scale", scale)?;
    let params = DequantFp8Params {
        data: data.ptr(),
        block_scales: std::ptr::null(),
        out: out.mut_ptr(),
        rows: rows as i32,
        cols: cols as i32,
        tensor_scale: scale,
    };
    launch(data.device(), &FP8_PER_TENSOR, elements, 8, max_blocks, &params)
}

/// `out[r, c] = e4m3(data[r, c]) * block_scales[r / 128, c / 128]`. The kernel needs `cols % 16 == 0` (every 16-code
/// vector in one row and one block); the checkpoints that use block scales have multiples of 128.
pub fn dequant_fp8_block128(
    data: &DeviceBuffer<u8>,
    block_scales: &DeviceBuffer<f32>,
    out: &DeviceBuffer<bf16>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    fp8_block128(data, block_scales, out, rows, cols, MAX_BLOCKS)
}

fn fp8_block128(data: &DeviceBuffer<u8>, block_scales: &DeviceBuffer<f32>, out: &DeviceBuffer<bf16>, rows: usize, cols: usize, max_blocks: u32) -> Result<()> {
    let elements = check_matrix("dequant_fp8_block128", out, rows, cols)?;
    if cols % 16 != 0 {
        return Err(Error::shape("dequant_fp8_block128 columns", "a multiple of 16", cols));
    }
    check_len("dequant_fp8_block128 data", data.len(), elements)?;
    check_len("dequant_fp8_block128 block_scales", block_scales.len(), rows.div_ceil(FP8_BLOCK) * cols.div_ceil(FP8_BLOCK))?;
    let params = DequantFp8Params {
        data: data.ptr(),
        block_scales: block_scales.ptr(),
        out: out.mut_ptr(),
        rows: rows as i32,
        cols: cols as i32,
        tensor_scale: 0.0,
    };
    launch(data.device(), &FP8_BLOCK128, elements, 8, max_blocks, &params)
}

/// `out[r, c] = (q - z) * scales[r, c / group]` with z = `zeros[r, c / group]` or 8 without zero points. The kernel
/// needs `group % 32 == 0` (GPTQ / AWQ groups are 32, 64, 128 or a whole row; a warp tile then spans at most 32
/// groups) and `cols % group == 0`.
pub fn dequant_int4(
    packed: &DeviceBuffer<u8>,
    scales: &DeviceBuffer<bf16>,
    zeros: Option<&DeviceBuffer<u8>>,
    out: &DeviceBuffer<bf16>,
    rows: usize,
    cols: usize,
    group: usize,
) -> Result<()> {
    int4(packed, scales, zeros, out, [rows, cols, group], MAX_BLOCKS)
}

fn int4(
    packed: &DeviceBuffer<u8>,
    scales: &DeviceBuffer<bf16>,
    zeros: Option<&DeviceBuffer<u8>>,
    out: &DeviceBuffer<bf16>,
    [rows, cols, group]: [usize; 3],
    max_blocks: u32,
) -> Result<()> {
    let elements = check_matrix("dequant_int4", out, rows, cols)?;
    if group == 0 || group % 32 != 0 || group > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("dequant_int4: group {group} must be a positive multiple of 32")));
    }
    if cols % group != 0 {
        return Err(Error::shape("dequant_int4 columns", format!("a multiple of the group {group}"), cols));
    }
    check_len("dequant_int4 packed", packed.len(), elements / 2)?;
    check_len("dequant_int4 scales", scales.len(), elements / group)?;
    if let Some(zeros) = zeros {
        check_len("dequant_int4 zeros", zeros.len(), elements / group)?;
    }
    let params = DequantInt4Params {
        packed: packed.ptr(),
        scales: scales.ptr(),
        zeros: zeros.map_or(std::ptr::null(), |z| z.ptr()),
        out: out.mut_ptr(),
        rows: rows as i32,
        cols: cols as i32,
        group: group as i32,
    };
    launch(packed.device(), &INT4, elements, 4, max_blocks, &params)
}

/// `out[r, c] = e2m1(q) * (e4m3(scales[r, c / 16]) / global_scale)`, the NVFP4 checkpoint's arrays as stored.
pub fn dequant_nvfp4(
    packed: &DeviceBuffer<u8>,
    scales: &DeviceBuffer<u8>,
    global_scale: f32,
    out: &DeviceBuffer<bf16>,
    rows: usize,
    cols: usize,
) -> Result<()> {
    nvfp4(packed, scales, global_scale, out, rows, cols, MAX_BLOCKS)
}

fn nvfp4(packed: &DeviceBuffer<u8>, scales: &DeviceBuffer<u8>, global_scale: f32, out: &DeviceBuffer<bf16>, rows: usize, cols: usize, max_blocks: u32) -> Result<()> {
    let elements = check_matrix("dequant_nvfp4", out, rows, cols)?;
    if cols % NVFP4_BLOCK != 0 {
        return Err(Error::shape("dequant_nvfp4 columns", format!("a multiple of {NVFP4_BLOCK}"), cols));
    }
    check_len("dequant_nvfp4 packed", packed.len(), elements / 2)?;
    check_len("dequant_nvfp4 scales", scales.len(), elements / NVFP4_BLOCK)?;
    check_scalar("dequant_nvfp4 global_scale", global_scale)?;
    let params = DequantNvfp4Params {
        packed: packed.ptr(),
        scales: scales.ptr(),
        out: out.mut_ptr(),
        rows: rows as i32,
        cols: cols as i32,
        global_scale,
    };
    launch(packed.device(), &NVFP4, elements, 4, max_blocks, &params)
}

/// A quantised matrix uploaded to a device: its shape and its arrays as device buffers.
pub struct DeviceQuantized {
    pub rows: usize,
    pub cols: usize,
    pub arrays: DeviceArrays,
}

/// The device copies of the arrays of each format (same names and layouts as in `crate::quant`).
pub enum DeviceArrays {
    Fp8PerTensor { data: DeviceBuffer<u8>, scale: f32 },
    Fp8Block128 { data: DeviceBuffer<u8>, block_scales: DeviceBuffer<f32> },
    Int4 { packed: DeviceBuffer<u8>, scales: DeviceBuffer<bf16>, zeros: Option<DeviceBuffer<u8>>, group: usize },
    Nvfp4 { packed: DeviceBuffer<u8>, scales: DeviceBuffer<u8>, global_scale: f32 },
}

impl DeviceQuantized {
    /// Copies the arrays of `matrix` to `device`. bf16 matrices need no dequantisation: `InvalidArgument`.
    pub fn upload(device: &Device, matrix: &QuantizedMatrix) -> Result<Self> {
        let (rows, cols) = matrix.shape();
        let arrays = match matrix {
            QuantizedMatrix::Bf16 { .. } => {
                return Err(Error::InvalidArgument(format!("{} weights need no dequantisation", WeightFormat::Bf16)))
            }
            QuantizedMatrix::Fp8PerTensor(m) => DeviceArrays::Fp8PerTensor { data: DeviceBuffer::from_slice(device, &m.data)?, scale: m.scale },
            QuantizedMatrix::Fp8Block128(m) => DeviceArrays::Fp8Block128 {
                data: DeviceBuffer::from_slice(device, &m.data)?,
                block_scales: DeviceBuffer::from_slice(device, &m.scales)?,
            },
            QuantizedMatrix::Int4(m) => DeviceArrays::Int4 {
                packed: DeviceBuffer::from_slice(device, &m.packed)?,
                scales: DeviceBuffer::from_slice(device, &m.scales)?,
                zeros: m.zeros.as_ref().map(|z| DeviceBuffer::from_slice(device, z)).transpose()?,
                group: m.group,
            },
            QuantizedMatrix::Nvfp4(m) => DeviceArrays::Nvfp4 {
                packed: DeviceBuffer::from_slice(device, &m.packed)?,
                scales: DeviceBuffer::from_slice(device, &m.scales)?,
                global_scale: m.global_scale,
            },
        };
        Ok(DeviceQuantized { rows, cols, arrays })
    }

    /// Device bytes of the stored arrays and scalars: what the kernel must read at the least.
    pub fn bytes(&self) -> usize {
        match &self.arrays {
            DeviceArrays::Fp8PerTensor { data, .. } => data.bytes() + 4,
            DeviceArrays::Fp8Block128 { data, block_scales } => data.bytes() + block_scales.bytes(),
            DeviceArrays::Int4 { packed, scales, zeros, .. } => packed.bytes() + scales.bytes() + zeros.as_ref().map_or(0, |z| z.bytes()),
            DeviceArrays::Nvfp4 { packed, scales, .. } => packed.bytes() + scales.bytes() + 4,
        }
    }

    /// Launches the matching kernel: `out` (`rows * cols` bf16) = the matrix dequantised.
    pub fn dequantize_into(&self, out: &DeviceBuffer<bf16>) -> Result<()> {
        self.dequantize_into_with_max_blocks(out, MAX_BLOCKS)
    }

    /// The same with a grid of at most `max_blocks` blocks of 256 threads (each then loops over more tiles): leaves
    /// SMs to kernels running alongside on other streams. The result does not depend on the grid.
    pub fn dequantize_into_with_max_blocks(&self, out: &DeviceBuffer<bf16>, max_blocks: u32) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        match &self.arrays {
            DeviceArrays::Fp8PerTensor { data, scale } => fp8_per_tensor(data, *scale, out, rows, cols, max_blocks),
            DeviceArrays::Fp8Block128 { data, block_scales } => fp8_block128(data, block_scales, out, rows, cols, max_blocks),
            DeviceArrays::Int4 { packed, scales, zeros, group } => int4(packed, scales, zeros.as_ref(), out, [rows, cols, *group], max_blocks),
            DeviceArrays::Nvfp4 { packed, scales, global_scale } => nvfp4(packed, scales, *global_scale, out, rows, cols, max_blocks),
        }
    }
}
