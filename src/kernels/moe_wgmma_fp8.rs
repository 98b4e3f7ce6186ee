//! The fp8 tensor-core kernels of the GEMMs' prefill tile (`cuda/moe_gemm_wgmma_fp8.cu`): wgmma m64n64k32 e4m3 with
//! the fp8 weights (per-tensor or 128x128-block scales) in registers and the activations quantised to e4m3 on the fly
//! with one scale per row and 128 k ([`quantize_act_e4m3_block128`]), each 128-k partial promoted into an f32
//! accumulator, as DeepGEMM's sm90 fp8 GEMM does. [`PrefillGemm::WgmmaFp8Act`] selects them for the fp8 formats'
//! prefill-tile launches (grouped up- and down-projections, dense GEMMs of one matrix); [`super::gemm`]'s launcher
//! hands such a launch over with its parameters, and this module quantises the launch's input rows into a scratch
//! buffer first ([`Fp8ActScratch`]: the one the caller passes, as the engine does with the one it sizes when it plans
//! a batch, else one for the launch). The CPU twin
//! of both steps is `reference::fp8_gemm`.

use std::sync::{Mutex, MutexGuard};

use half::bf16;

use super::modules::MOE_GEMM_WGMMA_FP8;
use super::moe::Grouping;
use super::moe_wgmma::PrefillGemm;
use super::params::{MoeGemmParams, MoeQuantizeActBlockParams};
use super::{to_i32, Matrix};
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};
use crate::quant::WeightFormat;

/// Columns per activation scale: one f32 scale per row and 128 columns (the fp8-block weights' k block).
pub const ACT_SCALE_BLOCK: usize = 128;

/// Threads per GEMM block: two consumer warpgroups and the producer warp.
const THREADS: u32 = 9 * 32;
/// Dynamic shared memory of the GEMM kernels (`Ring::kSharedBytes` in moe_gemm_wgmma_fp8.cu): 4 stages of the 8 warps'
/// 16 x 128 e4m3 weights (2 KiB each), 64 activation rows of 128 e4m3, their 64 f32 scales and the 8 warps' pairs of
/// f32 weight scales (fp8-block); two mbarriers a stage; the persistent walk's two tile buffers and group walker (one
/// 64-slot tile a block).
fn shared_bytes() -> u32 {
    4 * (8 * 2048 + 64 * 128 + 64 * 4 + 8 * 8) + 2 * 4 * 8 + super::moe_wgmma::persistent_tables_bytes(1)
}
/// Blocks resident per SM: two (99 KiB of shared memory each; ptxas caps the kernels at 96 registers a thread).
const BLOCKS_PER_SM: u32 = 2;

/// Activations bf16 -> e4m3 with one f32 scale per row and 128 columns (DeepGEMM's 1x128 rule): for each row r and
/// block b of 128 columns, `amax = max(max |x[r, 128 b ..]|, 2^-64)`, `scales[r, b] = amax / 448` and
/// `out[r, c] = e4m3(x[r, c] * (448 / amax))` (round to nearest even, saturating; both quotients rounded once in f32),
/// so x ≈ e4m3 × scale, the block's largest magnitude landing on ±448. An all-zero block quantises to zeros (its
/// scale is 2^-64 / 448). The bytes of every 32 columns are in the permuted order of
/// [`quantize_act_e4m3`](super::moe::quantize_act_e4m3) (the k order in which the fp8 weight fragments reach the
/// tensor cores); the CPU twin is `reference::fp8_gemm::quantize_act_block128`.
///
/// `x` `[rows, cols]` may have strided rows (an even stride from a 4-byte boundary: the kernel loads bf16 pairs);
/// `out` `[rows, cols]` and `scales` `[rows, cols / 128]` are packed. `Error::InvalidArgument` for `cols` not a
/// positive multiple of 128 or a misaligned view; `Error::Shape` for outputs of other shapes.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::moe_wgmma_fp8::quantize_act_e4m3_block128;
///
/// let device = simulator();
/// // Row 0: block 0 all 0.5 but one 2.0, block 1 all zero.
/// let mut x = vec![bf16::from_f32(0.5); 256];
/// x[3] = bf16::from_f32(2.0);
/// x[128..].fill(bf16::ZERO);
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let (out, scales) = (DeviceBuffer::<u8>::alloc(&device, 256)?, DeviceBuffer::<f32>::alloc(&device, 2)?);
/// quantize_act_e4m3_block128(x.view([1, 256])?, out.view([1, 256])?, scales.view([1, 2])?)?;
/// let (codes, scales) = (out.to_vec()?, scales.to_vec()?);
/// assert_eq!(scales[0], 2.0 / 448.0);
/// // 2.0 becomes 448 (0x7e), 0.5 becomes 112 (0x6e); column 3 sits at byte 5 of its 32 (the permuted order).
/// assert_eq!((codes[5], codes[0]), (0x7e, 0x6e));
/// assert!(codes[128..].iter().all(|&c| c == 0));
/// // Rows of 64 columns do not hold a whole scale block:
/// let (x64, out64, one) = (DeviceBuffer::<bf16>::alloc(&device, 64)?, DeviceBuffer::<u8>::alloc(&device, 64)?, DeviceBuffer::<f32>::alloc(&device, 1)?);
/// let err = quantize_act_e4m3_block128(x64.view([1, 64])?, out64.view([1, 64])?, one.view([1, 1])?);
/// assert!(matches!(err, Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn quantize_act_e4m3_block128(x: Matrix<bf16>, out: Matrix<u8>, scales: Matrix<f32>) -> Result<()> {
    launch_quantize(x, out, scales, None)
}

/// [`quantize_act_e4m3_block128`] of the rows `slots` names: with a grouping, only its real slots (`slot <
/// num_padded`, pair >= 0) are read and written, as the GEMM reads no others.
fn launch_quantize(x: Matrix<bf16>, out: Matrix<u8>, scales: Matrix<f32>, slots: Option<&Grouping>) -> Result<()> {
    const WHAT: &str = "quantize_act_e4m3_block128";
    let [rows, cols] = x.dims();
    if cols == 0 || cols % ACT_SCALE_BLOCK != 0 {
        return Err(Error::InvalidArgument(format!("{WHAT}: cols {cols} must be a positive multiple of {ACT_SCALE_BLOCK}")));
    }
    super::gemm::check_quantize_rows(WHAT, x, out)?;
    scales.expect_dims(&format!("{WHAT} scales"), [rows, cols / ACT_SCALE_BLOCK])?;
    scales.expect_packed(&format!("{WHAT} scales"))?;
    let warps = rows * (cols / ACT_SCALE_BLOCK);
    if warps == 0 {
        return Ok(());
    }
    let opt = |b: Option<&DeviceBuffer<i32>>| b.map_or(std::ptr::null(), |b| b.ptr());
    let params = MoeQuantizeActBlockParams {
        x: x.ptr(),
        out: out.mut_ptr(),
        scales: scales.mut_ptr(),
        sorted_pairs: opt(slots.map(|g| g.sorted_pairs)),
        num_padded: opt(slots.map(|g| g.num_padded)),
        rows: to_i32("quantize_act_e4m3_block128 rows", rows)?,
        cols: to_i32("quantize_act_e4m3_block128 cols", cols)?,
        x_stride: to_i32("quantize_act_e4m3_block128 stride", x.row_stride())?,
    };
    // One warp per (row, block), 8 warps a block, grid-stride: enough blocks to fill a GPU, no more than needed.
    let config = LaunchConfig { grid: Dim3::x(super::blocks_for(warps, 8).min(1024)), block: Dim3::x(256), shared_bytes: 0 };
    launch_with(out.device(), &Kernel { module: MOE_GEMM_WGMMA_FP8, entry: "moe_quantize_act_e4m3_block128" }, &config, &params)
}

/// The GEMM kernel of `format` weights; None for the formats without one.
fn kernel(format: WeightFormat) -> Option<Kernel> {
    let entry = match format {
        WeightFormat::Fp8PerTensor => "moe_gemm_fp8_wgmma_a8",
        WeightFormat::Fp8Block128 => "moe_gemm_fp8_block_wgmma_a8",
        _ => return None,
    };
    Some(Kernel { module: MOE_GEMM_WGMMA_FP8, entry })
}

/// Whether a prefill-tile launch of `format` weights with bf16 inputs over `heads` matrices of reduction length
/// `k_dim` runs here: [`PrefillGemm::WgmmaFp8Act`] is chosen, the format is fp8 (per-tensor or block-128), the launch
/// is not batched over heads and `k_dim` holds whole 128-k scale blocks. False: the launch runs as before.
pub(crate) fn applies(format: WeightFormat, heads: usize, k_dim: usize) -> Result<bool> {
    Ok(serves(format, heads, k_dim) && PrefillGemm::current()? == PrefillGemm::WgmmaFp8Act)
}

/// Whether a prefill-tile launch of `format` weights over `heads` matrices of reduction length `k_dim` runs here
/// when [`PrefillGemm::WgmmaFp8Act`] is chosen ([`applies`] without the choice): what a plan sizes the scratch for.
pub(crate) fn serves(format: WeightFormat, heads: usize, k_dim: usize) -> bool {
    kernel(format).is_some() && heads == 1 && k_dim % ACT_SCALE_BLOCK == 0
}

/// Where the fp8-activation GEMMs quantise their input rows: `[rows, k]` e4m3 codes and `[rows, k / 128]` f32 scales,
/// reused by every launch that fits and grown (the old buffers freed first) only when a launch needs more. The
/// engine sizes one when it plans a batch ([`Fp8ActScratch::reserve`] for its largest fp8 GEMM input) and passes it
/// to each GEMM launch of its steps (the `fp8_act` argument of the dense launches, [`MoeWorkspace::fp8_act`] for the
/// MoE ones), so a prefill allocates (a synchronous `cudaFree`/`cudaMalloc` on CUDA) only when planned; a launch
/// given none allocates its own buffers for that launch.
///
/// ```
/// use small4::device::simulator;
/// use small4::kernels::moe_wgmma_fp8::Fp8ActScratch;
///
/// let device = simulator();
/// let scratch = Fp8ActScratch::new(&device);
/// scratch.reserve(64, 256)?;
/// assert_eq!(scratch.capacity(), (64 * 256, 64 * 2));
/// scratch.reserve(8, 128)?; // fits: nothing changes
/// assert_eq!(scratch.capacity(), (64 * 256, 64 * 2));
/// // A reduction length without whole 128-k scale blocks is refused.
/// assert!(matches!(scratch.reserve(4, 100), Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
///
/// [`MoeWorkspace::fp8_act`]: super::moe::MoeWorkspace::fp8_act
pub struct Fp8ActScratch {
    device: Device,
    buffers: Mutex<ScratchBuffers>,
}

/// The codes and scales of an [`Fp8ActScratch`] (None until the first reservation).
#[derive(Default)]
struct ScratchBuffers {
    codes: Option<DeviceBuffer<u8>>,
    scales: Option<DeviceBuffer<f32>>,
}

/// The element counts of a `[rows, k_dim]` input's codes and scales; `Error::InvalidArgument` for a `k_dim` not a
/// positive multiple of 128 or sizes past the address space.
fn scratch_lens(rows: usize, k_dim: usize) -> Result<(usize, usize)> {
    if k_dim == 0 || k_dim % ACT_SCALE_BLOCK != 0 {
        return Err(Error::InvalidArgument(format!("fp8 activation scratch: k {k_dim} must be a positive multiple of {ACT_SCALE_BLOCK}")));
    }
    let codes = rows.checked_mul(k_dim).ok_or_else(|| Error::InvalidArgument(format!("fp8 activation scratch: {rows} x {k_dim} codes overflow")))?;
    Ok((codes, codes / ACT_SCALE_BLOCK))
}

impl Fp8ActScratch {
    /// Empty scratch on `device` (the first reservation or launch allocates).
    pub fn new(device: &Device) -> Self {
        Fp8ActScratch { device: device.clone(), buffers: Mutex::new(ScratchBuffers::default()) }
    }

    /// Makes room for a launch of `rows` input rows of `k_dim`: each buffer is replaced by a larger one only when it
    /// is too small. `Error::InvalidArgument` for a `k_dim` not a positive multiple of 128 or a size that overflows;
    /// the device's error when it cannot allocate.
    pub fn reserve(&self, rows: usize, k_dim: usize) -> Result<()> {
        self.lock_for(rows, k_dim).map(|_| ())
    }

    /// Elements held: (e4m3 codes, f32 scales).
    pub fn capacity(&self) -> (usize, usize) {
        let buffers = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        (buffers.codes.as_ref().map_or(0, |b| b.len()), buffers.scales.as_ref().map_or(0, |b| b.len()))
    }

    /// The buffers, grown to hold `rows` x `k_dim` if needed, locked for one launch.
    fn lock_for(&self, rows: usize, k_dim: usize) -> Result<MutexGuard<'_, ScratchBuffers>> {
        let (codes, scales) = scratch_lens(rows, k_dim)?;
        let mut buffers = self.buffers.lock().unwrap_or_else(|e| e.into_inner());
        if buffers.codes.as_ref().is_none_or(|b| b.len() < codes) {
            buffers.codes = None;
            buffers.codes = Some(DeviceBuffer::alloc(&self.device, codes.max(1))?);
        }
        if buffers.scales.as_ref().is_none_or(|b| b.len() < scales) {
            buffers.scales = None;
            buffers.scales = Some(DeviceBuffer::alloc(&self.device, scales.max(1))?);
        }
        Ok(buffers)
    }
}

/// Launches the prefill tile of `format` (fp8) weights on the fp8 tensor cores: `x` (the launch's bf16 input rows,
/// `[input rows, k_dim]`) is quantised with [`quantize_act_e4m3_block128`] (only the real slots of `slots` when the
/// input rows are a grouping's slots) into `scratch` (None: buffers allocated for this launch alone), then the GEMM
/// runs with `params`, reading the e4m3 rows and their scales instead of `x`, on the persistent grid the mma.sync
/// launch's grid (`config`) gives ([`super::moe_wgmma::persistent_grid`]: at most the blocks resident at once, or
/// [`with_persistent_blocks`](super::moe_wgmma::with_persistent_blocks)'s cap; one per tile with a finishing step).
/// `Error::InvalidArgument` for a format without a kernel here (see [`applies`]).
pub(crate) fn launch(
    device: &Device,
    format: WeightFormat,
    x: Matrix<bf16>,
    slots: Option<&Grouping>,
    config: &LaunchConfig,
    params: &MoeGemmParams,
    scratch: Option<&Fp8ActScratch>,
) -> Result<()> {
    let kernel = kernel(format).ok_or_else(|| Error::InvalidArgument(format!("no fp8-activation wgmma kernel for {format:?} weights")))?;
    // One matrix, no k split: the kernels tell the compiler grid z is 1 (moe_gemm_wgmma_fp8.cu consume_tiles).
    if config.grid.z != 1 || params.k_splits > 1 {
        return Err(Error::InvalidArgument(format!(
            "fp8-activation wgmma gemm: grid z {} / {} k splits (one matrix, no split)",
            config.grid.z, params.k_splits
        )));
    }
    // Persistent over work tiles of 128 features x 64 slots, as the bf16 / 4-bit wgmma kernels are. Sized before the
    // quantiser runs: a launch without tiles (or with a bad row count) quantises nothing.
    let grid = super::moe_wgmma::persistent_grid(&config.grid, params, 1, BLOCKS_PER_SM)?;
    if grid.x == 0 {
        return Ok(());
    }
    let [rows, k_dim] = x.dims();
    let own_scratch;
    let scratch = match scratch {
        Some(scratch) => scratch,
        None => {
            own_scratch = Fp8ActScratch::new(device);
            &own_scratch
        }
    };
    let buffers = scratch.lock_for(rows, k_dim)?;
    let (codes, scales) = match (&buffers.codes, &buffers.scales) {
        (Some(codes), Some(scales)) => (codes, scales),
        _ => return Err(Error::InvalidArgument("fp8 activation scratch: buffers missing after the reservation".into())),
    };
    let blocks = k_dim / ACT_SCALE_BLOCK;
    launch_quantize(x, codes.view([rows, k_dim])?, scales.view([rows, blocks])?, slots)?;
    let params =
        MoeGemmParams { x: std::ptr::null(), x_e4m3: codes.ptr(), x_stride: to_i32("fp8 gemm x stride", k_dim)?, x_block_scales: scales.ptr(), ..*params };
    let params = super::moe_wgmma::walk_window_params(kernel.entry, &params, &grid, 64)?;
    let config = LaunchConfig { grid, block: Dim3::x(THREADS), shared_bytes: shared_bytes() };
    launch_with(device, &kernel, &config, &params)
}
