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

/// `out = e4m3(data) * scale` (the FP8 checkpoint's `qscale_weight`): `data [rows, cols]` e4m3 codes, `out` bf16.
///
/// `Error::Shape` when `data` or `out` does not hold `rows * cols` elements; `Error::InvalidArgument` when `scale` is
/// not finite and positive or a dimension exceeds `i32`.
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
///
/// `block_scales` f32 row-major `[ceil(rows / 128), ceil(cols / 128)]`. `Error::Shape` for `cols % 16 != 0` or a
/// buffer of the wrong length; `Error::InvalidArgument` when a dimension exceeds `i32`.
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
///
/// `packed [rows, cols / 2]` u8 (low nibble = even column), `scales [rows, cols / group]` bf16, `zeros` (same shape,
/// one u8 in `0..=15` per group) as in `quant::Int4Grouped`. `Error::InvalidArgument` for a bad `group` or a dimension
/// above `i32`; `Error::Shape` for `cols % group != 0` or a buffer of the wrong length.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator();
/// // One row of 32 columns, one group, symmetric (zero point 8), scale 0.25. Byte 0 holds column 0 (low nibble,
/// // code 15) and column 1 (high nibble, code 0); every other code is 8, i.e. zero.
/// let mut packed = vec![0x88u8; 16];
/// packed[0] = 0x0f;
/// let packed = DeviceBuffer::from_slice(&device, &packed)?;
/// let scales = DeviceBuffer::from_slice(&device, &[bf16::from_f32(0.25)])?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 32)?;
/// small4::kernels::dequant::dequant_int4(&packed, &scales, None, &out, 1, 32, 32)?;
/// let out: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(&out[..3], &[1.75, -2.0, 0.0]); // (15 - 8) * 0.25, (0 - 8) * 0.25, (8 - 8) * 0.25
/// assert!(out[2..].iter().all(|&v| v == 0.0));
/// # Ok::<(), small4::Error>(())
/// ```
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
///
/// `packed [rows, cols / 2]` u8 (low nibble = even column), `scales [rows, cols / 16]` e4m3 bytes, `out` bf16.
/// `Error::Shape` for `cols % 16 != 0` or a buffer of the wrong length; `Error::InvalidArgument` when `global_scale` is
/// not finite and positive or a dimension exceeds `i32`.
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
    /// Rows of the matrix (output features).
    pub rows: usize,
    /// Columns of the matrix (the reduction dimension).
    pub cols: usize,
    /// The format's arrays.
    pub arrays: DeviceArrays,
}

/// The device copies of the arrays of each format (same names and layouts as in `crate::quant`).
pub enum DeviceArrays {
    /// `quant::Fp8PerTensor`: read by [`dequant_fp8_per_tensor`].
    Fp8PerTensor {
        /// `[rows, cols]` e4m3 codes.
        data: DeviceBuffer<u8>,
        /// The f32 multiplier of every code.
        scale: f32,
    },
    /// `quant::Fp8Block128`: read by [`dequant_fp8_block128`].
    Fp8Block128 {
        /// `[rows, cols]` e4m3 codes.
        data: DeviceBuffer<u8>,
        /// `[ceil(rows / 128), ceil(cols / 128)]` f32, one per 128x128 block.
        block_scales: DeviceBuffer<f32>,
    },
    /// `quant::Int4Grouped`: read by [`dequant_int4`].
    Int4 {
        /// `[rows, cols / 2]`, two 4-bit codes a byte, the low nibble the even column.
        packed: DeviceBuffer<u8>,
        /// `[rows, cols / group]` bf16.
        scales: DeviceBuffer<bf16>,
        /// `[rows, cols / group]` zero points in `0..=15`, or None for symmetric (zero point 8).
        zeros: Option<DeviceBuffer<u8>>,
        /// Columns per scale: a multiple of 32 dividing `cols`.
        group: usize,
    },
    /// `quant::Nvfp4`: read by [`dequant_nvfp4`].
    Nvfp4 {
        /// `[rows, cols / 2]` e2m1 codes, the low nibble the even column.
        packed: DeviceBuffer<u8>,
        /// `[rows, cols / 16]` e4m3 block scales (`weight_scale`).
        scales: DeviceBuffer<u8>,
        /// The f32 divisor of every block scale (`weight_global_scale`).
        global_scale: f32,
    },
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

    /// Launches the matching kernel: `out` (`rows * cols` bf16) = the matrix dequantised. Errors as the matching
    /// `dequant_*` function.
    pub fn dequantize_into(&self, out: &DeviceBuffer<bf16>) -> Result<()> {
        self.dequantize_into_with_max_blocks(out, MAX_BLOCKS)
    }

    /// The same with a grid of at most `max_blocks` blocks of 256 threads (each then loops over more tiles): leaves
    /// SMs to kernels running alongside on other streams. The result does not depend on the grid.
    /// `Error::InvalidArgument` for `max_blocks == 0` (on a non-empty matrix).
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
