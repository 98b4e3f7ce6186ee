//! Standalone dequantisation (`cuda/dequant.cu`): one weight matrix in FP8 (per-tensor or 128x128 block scales),
//! INT4 grouped (symmetric or zero point) or NVFP4 -> bf16 `[rows, cols]`. The device buffers hold exactly the arrays
//! of the matching `crate::quant` type, and the kernel's output equals that type's `dequantize()` rounded to bf16.

use half::bf16;

use super::modules::DEQUANT;
use super::params::{DequantFp8Params, DequantInt4Params, DequantNvfp4Params};
use super::Matrix;
use crate::device::{launch_with, Device, DeviceBuffer, DeviceElement, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};
use crate::quant::{QuantizedMatrix, WeightFormat, FP8_BLOCK, NVFP4_BLOCK};

const FP8_PER_TENSOR: Kernel = Kernel { module: DEQUANT, entry: "dequant_fp8_per_tensor" };
const FP8_BLOCK128: Kernel = Kernel { module: DEQUANT, entry: "dequant_fp8_block128" };
const INT4: Kernel = Kernel { module: DEQUANT, entry: "dequant_int4" };
const NVFP4: Kernel = Kernel { module: DEQUANT, entry: "dequant_nvfp4" };

const THREADS: u32 = 256;
/// Grid cap of the grid-stride loop: 4 blocks of 256 threads on each of an H100's 132 SMs (`TARGET_SMS`; at the
/// kernels' at most 53 registers, 4 x 256 x 53 = 54k of an SM's 64k registers); more blocks would only queue behind
/// these.
const MAX_BLOCKS: u32 = super::TARGET_SMS as u32 * 4;
/// Outputs per warp tile: 32 lanes x one 16-byte vector of 8-bit (16 elements) or 4-bit (32 elements) codes.
const fn elements_per_tile(bits: usize) -> usize {
    32 * 128 / bits
}

fn check_scalar(what: &str, value: f32) -> Result<()> {
    if !(value.is_finite() && value > 0.0) {
        return Err(Error::InvalidArgument(format!("{what} must be finite and positive, got {value}")));
    }
    Ok(())
}

/// Common checks of `out [rows, cols]`: the dimensions fit the kernels' `int`s, and the kernels' flat 16-byte stores
/// need it packed and on 16 bytes. Returns `[rows, cols, elements]`.
fn check_out(what: &str, out: Matrix<bf16>) -> Result<[usize; 3]> {
    let [rows, cols] = out.dims();
    if rows > i32::MAX as usize || cols > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("{what}: {rows} x {cols} exceeds the kernels' 32-bit dimensions")));
    }
    out.expect_packed(&format!("{what} out"))?;
    out.expect_aligned(&format!("{what} out"), 16)?;
    Ok([rows, cols, out.len()])
}

/// An array of codes the kernels read flat with 16-byte loads: `Error::Shape` unless of `dims`, `InvalidArgument`
/// unless packed and on 16 bytes.
fn check_codes(what: &str, codes: Matrix<u8>, dims: [usize; 2]) -> Result<()> {
    codes.expect_dims(what, dims)?;
    codes.expect_packed(what)?;
    codes.expect_aligned(what, 16)
}

/// A per-block or per-group array the kernels index flat: `Error::Shape` unless of `dims`, `InvalidArgument` unless
/// packed.
fn check_scales<T: DeviceElement>(what: &str, scales: Matrix<T>, dims: [usize; 2]) -> Result<()> {
    scales.expect_dims(what, dims)?;
    scales.expect_packed(what)
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

/// `out = e4m3(data) * scale` (the FP8 checkpoint's `qscale_weight`): `data [rows, cols]` e4m3 codes, `out [rows,
/// cols]` bf16, both packed.
///
/// `Error::Shape` when `data` is not of `out`'s dims; `Error::InvalidArgument` when `scale` is not finite and
/// positive, a dimension exceeds `i32`, or a view is strided or does not start on 16 bytes.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dequant::dequant_fp8_per_tensor;
///
/// let device = simulator();
/// // e4m3 codes 0x38 = 1.0, 0x40 = 2.0, 0xb8 = -1.0, then zeros: one row of 16.
/// let mut codes = vec![0u8; 16];
/// codes[..3].copy_from_slice(&[0x38, 0x40, 0xb8]);
/// let data = DeviceBuffer::from_slice(&device, &codes)?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 16)?;
/// dequant_fp8_per_tensor(data.view([1, 16])?, 0.5, out.view([1, 16])?)?;
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(&got[..4], &[0.5, 1.0, -0.5, 0.0]);
/// // Codes for 2 rows of 8 into an output of 1 row of 16: a typed error.
/// let err = dequant_fp8_per_tensor(data.view([2, 8])?, 0.5, out.view([1, 16])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn dequant_fp8_per_tensor(data: Matrix<u8>, scale: f32, out: Matrix<bf16>) -> Result<()> {
    fp8_per_tensor(data, scale, out, MAX_BLOCKS)
}

fn fp8_per_tensor(data: Matrix<u8>, scale: f32, out: Matrix<bf16>, max_blocks: u32) -> Result<()> {
    let [rows, cols, elements] = check_out("dequant_fp8_per_tensor", out)?;
    check_codes("dequant_fp8_per_tensor data", data, [rows, cols])?;
    check_scalar("dequant_fp8_per_tensor scale", scale)?;
    let params =
        DequantFp8Params { data: data.ptr(), block_scales: std::ptr::null(), out: out.mut_ptr(), rows: rows as i32, cols: cols as i32, tensor_scale: scale };
    launch(data.device(), &FP8_PER_TENSOR, elements, 8, max_blocks, &params)
}

/// `out[r, c] = e4m3(data[r, c]) * block_scales[r / 128, c / 128]`. The kernel needs `cols % 16 == 0` (every 16-code
/// vector in one row and one block); the checkpoints that use block scales have multiples of 128.
///
/// `data [rows, cols]` e4m3 codes, `block_scales [ceil(rows / 128), ceil(cols / 128)]` f32, `out [rows, cols]` bf16,
/// all packed. `Error::Shape` for `cols % 16 != 0` or an input of other dims; `Error::InvalidArgument` when a
/// dimension exceeds `i32` or a view is strided or misaligned (`data`, `out`: 16 bytes).
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dequant::dequant_fp8_block128;
///
/// let device = simulator();
/// // 2 rows of 16 codes 0x38 (1.0), one 128x128 block whose scale is 3.
/// let data = DeviceBuffer::from_slice(&device, &[0x38u8; 32])?;
/// let scales = DeviceBuffer::from_slice(&device, &[3.0f32, 5.0])?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 32)?;
/// dequant_fp8_block128(data.view([2, 16])?, scales.view([1, 1])?, out.view([2, 16])?)?;
/// assert!(out.to_vec()?.iter().all(|v| v.to_f32() == 3.0));
/// // Two scales for a single block: a typed error.
/// let err = dequant_fp8_block128(data.view([2, 16])?, scales.view([1, 2])?, out.view([2, 16])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn dequant_fp8_block128(data: Matrix<u8>, block_scales: Matrix<f32>, out: Matrix<bf16>) -> Result<()> {
    fp8_block128(data, block_scales, out, MAX_BLOCKS)
}

fn fp8_block128(data: Matrix<u8>, block_scales: Matrix<f32>, out: Matrix<bf16>, max_blocks: u32) -> Result<()> {
    let [rows, cols, elements] = check_out("dequant_fp8_block128", out)?;
    if cols % 16 != 0 {
        return Err(Error::shape("dequant_fp8_block128 columns", "a multiple of 16", cols));
    }
    check_codes("dequant_fp8_block128 data", data, [rows, cols])?;
    check_scales("dequant_fp8_block128 block_scales", block_scales, [rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK)])?;
    let params =
        DequantFp8Params { data: data.ptr(), block_scales: block_scales.ptr(), out: out.mut_ptr(), rows: rows as i32, cols: cols as i32, tensor_scale: 0.0 };
    launch(data.device(), &FP8_BLOCK128, elements, 8, max_blocks, &params)
}

/// `out[r, c] = (q - z) * scales[r, c / group]` with z = `zeros[r, c / group]` or 8 without zero points. The kernel
/// needs `group % 32 == 0` (GPTQ / AWQ groups are 32, 64, 128 or a whole row; a warp tile then spans at most 32
/// groups) and `cols % group == 0`.
///
/// `packed [rows, cols / 2]` u8 (low nibble = even column), `scales [rows, cols / group]` bf16, `zeros` (same dims,
/// one u8 in `0..=15` per group) as in `quant::Int4Grouped`, `out [rows, cols]` bf16, all packed.
/// `Error::InvalidArgument` for a bad `group`, a dimension above `i32`, or a strided or misaligned view (`packed`,
/// `out`: 16 bytes); `Error::Shape` for `cols % group != 0` or an input of other dims.
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
/// small4::kernels::dequant::dequant_int4(packed.view([1, 16])?, scales.view([1, 1])?, None, out.view([1, 32])?, 32)?;
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(&got[..3], &[1.75, -2.0, 0.0]); // (15 - 8) * 0.25, (0 - 8) * 0.25, (8 - 8) * 0.25
/// assert!(got[2..].iter().all(|&v| v == 0.0));
/// // The 16 bytes viewed as 2 rows for an output of 1: a typed error.
/// let err = small4::kernels::dequant::dequant_int4(packed.view([2, 8])?, scales.view([1, 1])?, None, out.view([1, 32])?, 32);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn dequant_int4(packed: Matrix<u8>, scales: Matrix<bf16>, zeros: Option<Matrix<u8>>, out: Matrix<bf16>, group: usize) -> Result<()> {
    int4(packed, scales, zeros, out, group, MAX_BLOCKS)
}

fn int4(packed: Matrix<u8>, scales: Matrix<bf16>, zeros: Option<Matrix<u8>>, out: Matrix<bf16>, group: usize, max_blocks: u32) -> Result<()> {
    let [rows, cols, elements] = check_out("dequant_int4", out)?;
    if group == 0 || group % 32 != 0 || group > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("dequant_int4: group {group} must be a positive multiple of 32")));
    }
    if cols % group != 0 {
        return Err(Error::shape("dequant_int4 columns", format!("a multiple of the group {group}"), cols));
    }
    check_codes("dequant_int4 packed", packed, [rows, cols / 2])?;
    check_scales("dequant_int4 scales", scales, [rows, cols / group])?;
    if let Some(zeros) = zeros {
        check_scales("dequant_int4 zeros", zeros, [rows, cols / group])?;
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
/// `packed [rows, cols / 2]` u8 (low nibble = even column), `scales [rows, cols / 16]` e4m3 bytes, `out [rows, cols]`
/// bf16, all packed. `Error::Shape` for `cols % 16 != 0` or an input of other dims; `Error::InvalidArgument` when
/// `global_scale` is not finite and positive, a dimension exceeds `i32`, or a view is strided or misaligned
/// (`packed`, `out`: 16 bytes; `scales`: 2, the kernel reads them in pairs).
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dequant::dequant_nvfp4;
///
/// let device = simulator();
/// // One row of 16: byte 0 holds column 0 (low nibble, e2m1 code 2 = 1.0) and column 1 (high nibble, code 7 = 6.0);
/// // the other codes are 0. Block scale e4m3 0x38 = 1.0, divided by the global scale 2.
/// let mut codes = vec![0u8; 8];
/// codes[0] = 0x72;
/// let packed = DeviceBuffer::from_slice(&device, &codes)?;
/// let scales = DeviceBuffer::from_slice(&device, &[0x38u8, 0x38])?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 16)?;
/// dequant_nvfp4(packed.view([1, 8])?, scales.view([1, 1])?, 2.0, out.view([1, 16])?)?;
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(&got[..3], &[0.5, 3.0, 0.0]);
/// // Two block scales for one block of 16: a typed error.
/// let err = dequant_nvfp4(packed.view([1, 8])?, scales.view([1, 2])?, 2.0, out.view([1, 16])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn dequant_nvfp4(packed: Matrix<u8>, scales: Matrix<u8>, global_scale: f32, out: Matrix<bf16>) -> Result<()> {
    nvfp4(packed, scales, global_scale, out, MAX_BLOCKS)
}

fn nvfp4(packed: Matrix<u8>, scales: Matrix<u8>, global_scale: f32, out: Matrix<bf16>, max_blocks: u32) -> Result<()> {
    let [rows, cols, elements] = check_out("dequant_nvfp4", out)?;
    if cols % NVFP4_BLOCK != 0 {
        return Err(Error::shape("dequant_nvfp4 columns", format!("a multiple of {NVFP4_BLOCK}"), cols));
    }
    check_codes("dequant_nvfp4 packed", packed, [rows, cols / 2])?;
    check_scales("dequant_nvfp4 scales", scales, [rows, cols / NVFP4_BLOCK])?;
    scales.expect_aligned("dequant_nvfp4 scales", 2)?;
    check_scalar("dequant_nvfp4 global_scale", global_scale)?;
    let params = DequantNvfp4Params { packed: packed.ptr(), scales: scales.ptr(), out: out.mut_ptr(), rows: rows as i32, cols: cols as i32, global_scale };
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
            QuantizedMatrix::Bf16 { .. } => return Err(Error::InvalidArgument(format!("{} weights need no dequantisation", WeightFormat::Bf16))),
            QuantizedMatrix::Fp8PerTensor(m) => DeviceArrays::Fp8PerTensor { data: DeviceBuffer::from_slice(device, &m.data)?, scale: m.scale },
            QuantizedMatrix::Fp8Block128(m) => {
                DeviceArrays::Fp8Block128 { data: DeviceBuffer::from_slice(device, &m.data)?, block_scales: DeviceBuffer::from_slice(device, &m.scales)? }
            }
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

    /// Launches the matching kernel: `out [rows, cols]` (packed bf16) = the matrix dequantised. `Error::Shape` when
    /// `out` is not `[rows, cols]`; otherwise errors as the matching `dequant_*` function.
    ///
    /// ```
    /// use half::bf16;
    /// use small4::device::{simulator, DeviceBuffer};
    /// use small4::kernels::dequant::DeviceQuantized;
    /// use small4::quant::{QuantizedMatrix, WeightFormat};
    ///
    /// let device = simulator();
    /// let weights: Vec<f32> = (0..2 * 32).map(|i| (i as f32 - 31.5) / 8.0).collect();
    /// let matrix = QuantizedMatrix::quantize(WeightFormat::Nvfp4, &weights, 2, 32)?;
    /// let on_device = DeviceQuantized::upload(&device, &matrix)?;
    /// let out = DeviceBuffer::<bf16>::alloc(&device, 2 * 32)?;
    /// on_device.dequantize_into(out.view([2, 32])?)?;
    /// let want: Vec<bf16> = matrix.dequantize().iter().map(|&v| bf16::from_f32(v)).collect();
    /// assert_eq!(out.to_vec()?, want); // bit for bit the CPU's values, rounded to bf16
    /// // The transposed shape is a typed error, not a scrambled matrix.
    /// assert!(matches!(on_device.dequantize_into(out.view([32, 2])?), Err(small4::Error::Shape { .. })));
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn dequantize_into(&self, out: Matrix<bf16>) -> Result<()> {
        self.dequantize_into_with_max_blocks(out, MAX_BLOCKS)
    }

    /// The same with a grid of at most `max_blocks` blocks of 256 threads (each then loops over more tiles): leaves
    /// SMs to kernels running alongside on other streams. The result does not depend on the grid.
    /// `Error::InvalidArgument` for `max_blocks == 0` (on a non-empty matrix).
    ///
    /// ```
    /// use half::bf16;
    /// use small4::device::{simulator, DeviceBuffer};
    /// use small4::kernels::dequant::{DeviceArrays, DeviceQuantized};
    /// use small4::quant::{QuantizedMatrix, WeightFormat};
    ///
    /// let device = simulator();
    /// let weights: Vec<f32> = (0..4 * 64).map(|i| ((i % 17) as f32 - 8.0) / 4.0).collect();
    /// let matrix = QuantizedMatrix::quantize(WeightFormat::Fp8PerTensor, &weights, 4, 64)?;
    /// let on_device = DeviceQuantized::upload(&device, &matrix)?;
    /// // Per-tensor FP8 on the device: one byte a weight and one f32 scale.
    /// let DeviceArrays::Fp8PerTensor { data, scale } = &on_device.arrays else { unreachable!() };
    /// assert_eq!((data.len(), on_device.bytes()), (4 * 64, 4 * 64 + 4));
    /// assert!(*scale > 0.0);
    /// // One block looping over every tile gives the same matrix as the full grid.
    /// let (one, full) = (DeviceBuffer::<bf16>::alloc(&device, 4 * 64)?, DeviceBuffer::<bf16>::alloc(&device, 4 * 64)?);
    /// on_device.dequantize_into_with_max_blocks(one.view([4, 64])?, 1)?;
    /// on_device.dequantize_into(full.view([4, 64])?)?;
    /// let want: Vec<bf16> = matrix.dequantize().iter().map(|&v| bf16::from_f32(v)).collect();
    /// assert_eq!((one.to_vec()?, full.to_vec()?), (want.clone(), want));
    /// assert!(matches!(on_device.dequantize_into_with_max_blocks(one.view([4, 64])?, 0), Err(small4::Error::InvalidArgument(_))));
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn dequantize_into_with_max_blocks(&self, out: Matrix<bf16>, max_blocks: u32) -> Result<()> {
        let (rows, cols) = (self.rows, self.cols);
        out.expect_dims("dequantize_into out", [rows, cols])?;
        // The arrays hold exactly the matching `crate::quant` arrays (upload copied them), so these views fit.
        match &self.arrays {
            DeviceArrays::Fp8PerTensor { data, scale } => fp8_per_tensor(data.view([rows, cols])?, *scale, out, max_blocks),
            DeviceArrays::Fp8Block128 { data, block_scales } => {
                let scale_dims = [rows.div_ceil(FP8_BLOCK), cols.div_ceil(FP8_BLOCK)];
                fp8_block128(data.view([rows, cols])?, block_scales.view(scale_dims)?, out, max_blocks)
            }
            DeviceArrays::Int4 { packed, scales, zeros, group } => {
                // A group of 0 never comes from upload; the kernel wrapper reports it (rather than dividing by it here).
                let groups = cols.checked_div(*group).unwrap_or(0);
                let zeros = zeros.as_ref().map(|z| z.view([rows, groups])).transpose()?;
                int4(packed.view([rows, cols / 2])?, scales.view([rows, groups])?, zeros, out, *group, max_blocks)
            }
            DeviceArrays::Nvfp4 { packed, scales, global_scale } => {
                nvfp4(packed.view([rows, cols / 2])?, scales.view([rows, cols / NVFP4_BLOCK])?, *global_scale, out, max_blocks)
            }
        }
    }
}
