//! The Hopper kernels of the GEMMs' prefill tile (`cuda/moe_gemm_wgmma.cu`: wgmma with the weights in registers,
//! mbarrier pipeline, one producer warp and two consumer warpgroups) for bf16, int4 and nvfp4 weights, and the switch
//! that picks them over the mma.sync kernels (`moe_gemm_{bf16,int4,nvfp4}_tiled` in `cuda/moe_gemm.cu`). Each takes
//! the same parameters and computes the same rows as its mma.sync kernel, so [`super::gemm`]'s launcher hands its
//! launch over with only the block and the shared memory changed; decode tiles, the fp8 formats and the W8A8 kernels
//! keep mma.sync (the fp8 formats' prefill tile runs on the fp8 tensor cores with [`PrefillGemm::WgmmaFp8Act`]:
//! [`super::moe_wgmma_fp8`]). Grouped launches gather their activation rows (`moe_gemm_{bf16,int4,nvfp4}_wgmma`); dense ones load
//! them with TMA (`moe_gemm_{bf16,int4,nvfp4}_wgmma_dense`) through a tensor map made here by the device's
//! [`Backend::encode_tensor_map_tiled`](crate::device::Backend::encode_tensor_map_tiled), once per activation buffer
//! and shape: later launches on the same rows reuse it. Where the matrices hold more than 48 rows on average (routed
//! rows per local expert, or a dense launch's rows), the wide kernels (`moe_gemm_*_wide_wgmma`, `..._wide_wgmma_dense`)
//! run instead: 192 slots a block (an expert's first 192 slots, then the next 192), so each weight tile is loaded
//! and dequantised once per 192 slots instead of once per 64 ([`WIDE_MIN_ROWS`]); above 192 rows on average, the
//! 256-slot kernels (`moe_gemm_*_wide256_wgmma`, `..._wide256_wgmma_dense`: a producer warpgroup that gives its
//! registers to the consumers with setmaxnreg), once per 256 ([`WIDE256_MIN_ROWS`]). All are persistent over tiles
//! (a block per resident slot walks the launch's work tiles; [`with_persistent_blocks`] caps the grid for tests;
//! [`with_walk_window`] runs only a window of the walk, for the timing model).

use std::cell::{Cell, RefCell};
use std::num::NonZeroU32;

use super::modules::MOE_GEMM_WGMMA;
use super::params::{MoeGemmParams, MoeGemmTmaParams, Small4TensorMap, SMALL4_GEMM_FINISH_NONE};
use crate::device::tensor_map::{encode_cached, DataType, Interleave, L2Promotion, OobFill, Swizzle, TiledTensorMap};
use crate::device::{launch_with, Device, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};
use crate::quant::repack::tile_bytes;
use crate::quant::WeightFormat;

/// The environment variable that sets the process default of [`PrefillGemm`]: `wgmma` (or unset), `wgmma_gather`,
/// `mma_sync` or `wgmma_fp8_act`.
pub const PREFILL_GEMM_ENV: &str = "SMALL4_PREFILL_GEMM";

/// Which kernel runs the prefill tile (128 output features x 64 rows) of the grouped expert GEMMs and of the dense
/// GEMM (more than 32 rows) with bf16, int4 or nvfp4 weights (the 4-bit kernels dequantise to bf16 in registers, as
/// the mma.sync ones do, and issue the same bf16 wgmmas).
///
/// The default is [`PrefillGemm::Wgmma`]; the environment's `SMALL4_PREFILL_GEMM=mma_sync` ([`PREFILL_GEMM_ENV`])
/// selects the mma.sync kernel for the process (`wgmma_gather`: [`PrefillGemm::WgmmaGather`]), and
/// [`PrefillGemm::run`] for one closure on the calling thread.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dense;
/// use small4::kernels::gemm::DeviceWeights;
/// use small4::kernels::moe_wgmma::PrefillGemm;
/// use small4::quant::{repack::repack_linear, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// // W [2, 64] with y0 = x0 and y1 = 2 x1; 40 rows take the prefill tile.
/// let mut w = vec![0.0f32; 2 * 64];
/// (w[0], w[64 + 1]) = (1.0, 2.0);
/// let w = DeviceWeights::upload(&device, &repack_linear(&[(&QuantizedMatrix::quantize(WeightFormat::Bf16, &w, 2, 64)?).into()])?)?;
/// let x: Vec<bf16> = (0..40 * 64).map(|i| bf16::from_f32(if i % 64 < 2 { (i / 64) as f32 } else { 0.0 })).collect();
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let run = |kernel: PrefillGemm| -> small4::Result<Vec<bf16>> {
///     let y = DeviceBuffer::<bf16>::alloc(&device, 40 * 2)?;
///     kernel.run(|| dense::linear(&w, x.view([40, 64])?, y.view([40, 2])?))?;
///     y.to_vec()
/// };
/// // A dense launch: wgmma loads the rows with TMA, or gathers them (WgmmaGather); the same sums either way.
/// let wgmma = run(PrefillGemm::Wgmma)?;
/// assert_eq!(device.last_launch_counters().unwrap().kernel, "moe_gemm_bf16_wgmma_dense");
/// assert_eq!(run(PrefillGemm::WgmmaGather)?, wgmma);
/// let mma_sync = run(PrefillGemm::MmaSync)?;
/// assert_eq!(wgmma, mma_sync);
/// assert_eq!((wgmma[2 * 39].to_f32(), wgmma[2 * 39 + 1].to_f32()), (39.0, 78.0));
/// assert_eq!(device.last_launch_counters().unwrap().kernel, "moe_gemm_bf16_tiled");
/// // The choice holds inside `run` only, on this thread:
/// assert_eq!(PrefillGemm::MmaSync.run(PrefillGemm::current)?, PrefillGemm::MmaSync);
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PrefillGemm {
    /// wgmma m64n64k16 with the weights as the register operand, warp-specialised:
    /// `moe_gemm_{bf16,int4,nvfp4}_wgmma_dense` (activations by TMA) for dense launches,
    /// `moe_gemm_{bf16,int4,nvfp4}_wgmma` (activation rows gathered) for grouped ones.
    Wgmma,
    /// `moe_gemm_{bf16,int4,nvfp4}_wgmma` for every launch, dense ones included: the activations gathered with
    /// cp.async instead of loaded by TMA (the dense kernels' predecessor, kept for comparisons).
    WgmmaGather,
    /// `moe_gemm_{bf16,int4,nvfp4}_tiled`: mma.sync m16n8k16 with a cp.async ring.
    MmaSync,
    /// [`PrefillGemm::Wgmma`], and the fp8 formats' prefill tile too, on the fp8 tensor cores:
    /// `moe_gemm_{fp8,fp8_block}_wgmma_a8` with the activations quantised to e4m3 on the fly, one scale per row and
    /// 128 k ([`super::moe_wgmma_fp8`]; not for batched per-head launches, nor a k not a multiple of 128, which keep
    /// mma.sync). Opt-in (`SMALL4_PREFILL_GEMM=wgmma_fp8_act`): it changes the fp8 GEMMs' numerics from bf16
    /// activations to e4m3 ones.
    WgmmaFp8Act,
}

thread_local! {
    /// [`PrefillGemm::run`]'s choice for the calling thread, over the environment's.
    static OVERRIDE: Cell<Option<PrefillGemm>> = const { Cell::new(None) };
    /// [`with_persistent_blocks`]'s cap of the persistent grid on the calling thread.
    static PERSISTENT_BLOCKS: Cell<Option<NonZeroU32>> = const { Cell::new(None) };
    /// [`with_walk_window`]'s tiles a block, and the windows of the launches made under it.
    static WALK_WINDOW: Cell<Option<NonZeroU32>> = const { Cell::new(None) };
    static WALK_WINDOWS: RefCell<Vec<WalkWindow>> = const { RefCell::new(Vec::new()) };
}

/// The window of a persistent launch's walk that [`with_walk_window`] ran: the first `tiles` work tiles of each
/// matrix (walk order: feature tile fastest, block b taking tiles b, b + `blocks`, ...), or fewer where the launch
/// has fewer. What the caller needs to scale the window's counters to the whole walk: the launch's work tiles are
/// `feature_tiles` x its row blocks of `slots_per_tile` rows (dense) or x each expert's groups of that many slots
/// (grouped; the walk reads the grouping on the device, so the caller counts them from the grouping it made).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WalkWindow {
    /// The kernel launched.
    pub kernel: &'static str,
    /// The persistent grid's blocks per matrix.
    pub blocks: u32,
    /// The work tiles the window holds per matrix (`blocks` x the tiles a block asked for).
    pub tiles: u32,
    /// The launch's feature tiles (128 features each).
    pub feature_tiles: u32,
    /// The slots (rows) of a work tile: 64, 192 or 256.
    pub slots_per_tile: u32,
}

impl WalkWindow {
    /// How many such windows the walk of `work_tiles` tiles (per matrix) is: at least 1 (a window that holds the
    /// whole walk ran it all).
    pub fn windows_in(&self, work_tiles: u64) -> f64 {
        (work_tiles as f64 / self.tiles.max(1) as f64).max(1.0)
    }
}

/// Runs `f` with every persistent wgmma launch on the calling thread (here and [`super::moe_wgmma_fp8`]; not those
/// with a finishing step, which run one tile per block) cut to the first `tiles_per_block` tiles of each block's walk:
/// the whole persistent grid runs at once, as on the GPU, over a window of consecutive work tiles
/// (`MoeGemmParams::walk_tiles`). Returns `f`'s result and the windows of the launches it made, in launch order.
/// The outputs of the tiles past the window are not written. The timing model's use: the interpreter runs every block
/// of such a window, so the tiles that share data (the feature tiles of a slot group, which start together) are
/// counted together, which a sample of a few blocks, each walking its own tiles far apart, cannot do.
pub fn with_walk_window<R>(tiles_per_block: NonZeroU32, f: impl FnOnce() -> R) -> (R, Vec<WalkWindow>) {
    let outer = WALK_WINDOWS.with(|w| std::mem::take(&mut *w.borrow_mut()));
    let result = super::with_choice(&WALK_WINDOW, tiles_per_block, f);
    let windows = WALK_WINDOWS.with(|w| std::mem::replace(&mut *w.borrow_mut(), outer));
    (result, windows)
}

/// `params` of a persistent launch of `kernel` on `grid` with tiles of 128 features by `slots_per_tile` slots, cut to
/// [`with_walk_window`]'s window where one is in force (and recorded), else unchanged.
pub(crate) fn walk_window_params(kernel: &'static str, params: &MoeGemmParams, grid: &Dim3, slots_per_tile: u32) -> Result<MoeGemmParams> {
    let Some(tiles_per_block) = WALK_WINDOW.get() else { return Ok(*params) };
    if !params.rope.positions.is_null() || params.finish.kind != SMALL4_GEMM_FINISH_NONE as i32 {
        return Ok(*params); // one tile per block: no walk to cut
    }
    let tiles = grid.x.checked_mul(tiles_per_block.get()).filter(|&t| i32::try_from(t).is_ok());
    let tiles = tiles.ok_or_else(|| Error::InvalidArgument(format!("walk window: {} blocks x {tiles_per_block} tiles", grid.x)))?;
    let feature_tiles = u32::try_from(params.rows_padded / 128).map_err(|_| Error::InvalidArgument(format!("walk window: {} rows", params.rows_padded)))?;
    WALK_WINDOWS.with(|w| w.borrow_mut().push(WalkWindow { kernel, blocks: grid.x, tiles, feature_tiles, slots_per_tile }));
    Ok(MoeGemmParams { walk_tiles: tiles as i32, ..*params })
}

/// Runs `f` with the wgmma kernels' persistent grid capped at `blocks` blocks per matrix on the calling thread
/// (instead of the blocks that fit on an H100's 132 SMs), restoring the previous cap afterwards, also when `f`
/// panics. A small grid makes each block walk many tiles: the tests use it to run the ring's phases and the tile
/// tables' hand-over across tiles. Launches with a finishing step (query RoPE, row finisher) keep one tile per block.
pub fn with_persistent_blocks<R>(blocks: NonZeroU32, f: impl FnOnce() -> R) -> R {
    super::with_choice(&PERSISTENT_BLOCKS, blocks, f)
}

impl PrefillGemm {
    /// The choice in force on this thread: [`PrefillGemm::run`]'s, else the environment's (`SMALL4_PREFILL_GEMM`),
    /// else [`PrefillGemm::Wgmma`]. `Error::InvalidArgument` for an environment value other than `wgmma`,
    /// `wgmma_gather`, `mma_sync` and `wgmma_fp8_act`.
    pub fn current() -> Result<Self> {
        let names = [("wgmma", Self::Wgmma), ("wgmma_gather", Self::WgmmaGather), ("mma_sync", Self::MmaSync), ("wgmma_fp8_act", Self::WgmmaFp8Act)];
        super::current_choice(&OVERRIDE, PREFILL_GEMM_ENV, &names, Self::Wgmma)
    }

    /// Runs `f` with this choice on the calling thread (launches are issued on the thread that calls the wrapper),
    /// restoring the previous choice afterwards, also when `f` panics.
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        super::with_choice(&OVERRIDE, self, f)
    }
}

/// Threads per block: two consumer warpgroups and the producer warp (64 and 192 slots), or a producer warpgroup (256
/// slots: `BlockRoles` in moe_gemm_wgmma.cu).
fn threads(slot_tiles: u32) -> u32 {
    let producer_warps = if slot_tiles == WIDE256_SLOT_TILES { 4 } else { 1 };
    (8 + producer_warps) * 32
}
/// One stage's activation rows of a 64-slot tile: 64 slots of 64 bf16 (one 128-byte swizzle line each).
const X_STAGE_BYTES: u32 = 64 * 64 * 2;
/// The wide kernels' 64-slot tiles per block (`kSlotTiles` of their entries in moe_gemm_wgmma.cu): BN 192. Three
/// tiles' accumulators (96 registers a thread) fit the 168 registers ptxas gives a block of 288 threads alone on an
/// SM without spilling; four need the 256-slot kernels' producer warpgroup ([`WIDE256_SLOT_TILES`]). At 16,384 routed rows over 128 experts (128 +- 11 rows each, padded to 128 or
/// 192 slots), one block covers an expert's slots: its weights cross DRAM once (docs/perf.md "Grouped wgmma GEMM:
/// tile and schedule").
const WIDE_SLOT_TILES: u32 = 3;
/// The average rows per matrix above which a launch takes the wide kernels: three quarters of a 64-slot tile. Above
/// it many matrices span a second tile, each of which would read the weights again (at 2048 tokens x top-4 over 128
/// experts, 64 +- 8 rows per expert: about half do; the timing model predicts the layer's up-projection 2.8 -> 2.2 ms
/// wide, docs/perf.md "Grouped wgmma GEMM: tile and schedule"). At or below it most fit one tile, and the 64-slot
/// kernels keep two blocks per SM.
pub const WIDE_MIN_ROWS: usize = 48;
/// The 256-slot kernels' 64-slot tiles per block (`kSlotTiles` of the `_wide256` entries): four tiles' accumulators
/// (128 registers a thread) fit because the block's producer warpgroup drops to 48 registers and its consumers rise to
/// 232 (setmaxnreg).
const WIDE256_SLOT_TILES: u32 = 4;
/// The average rows per matrix above which a launch takes the 256-slot kernels: one 192-slot block. Above it a
/// typical matrix spans a second 192-slot block, and its weights cross DRAM ceil(rows / 256) times instead of
/// ceil(rows / 192) (at 65,536 routed rows over 128 experts, 512 each: 2 passes instead of 3); at or below it one
/// 192-slot block covers most matrices, with the deeper 4-bit ring (6 stages instead of 5) and no setmaxnreg.
pub const WIDE256_MIN_ROWS: usize = 192;
/// The activation box of one stage: 64 k (one 128-byte swizzle line of bf16) x 64 rows, of one matrix.
const X_BOX: [u32; 3] = [64, 64, 1];

/// Dynamic shared memory (`Ring<F, kSlotTiles>::kSharedBytes` in moe_gemm_wgmma.cu) for `format` weights and
/// `slot_tiles` 64-slot tiles a block: as many stages of the 8 warps' weight tiles (16 x 64 weights each: 2 KiB bf16,
/// 512 bytes 4-bit) and the activation rows as fit in 192 KiB shared by the SM's blocks (two of 64 slots, one wide),
/// at most 8 (64 slots: bf16 4, 4-bit 8; 192 slots: bf16 4, 4-bit 6; 256 slots: bf16 4, 4-bit 5), the tiles' staged
/// scales of each stage on top, two mbarriers per stage; then the persistent walk's tables
/// ([`persistent_tables_bytes`]).
fn shared_bytes(format: WeightFormat, slot_tiles: u32) -> u32 {
    let stage = 8 * tile_bytes(format) as u32 + slot_tiles * X_STAGE_BYTES;
    let stages = (192 * 1024 / blocks_per_sm(slot_tiles) / stage).min(8);
    let ring = stages * (stage + 8 * super::gemm::staged_scale_bytes(format) as u32) + 2 * stages * 8;
    ring + persistent_tables_bytes(slot_tiles)
}

/// The persistent walk's shared memory after a ring of `slot_tiles` 64-slot tiles a block (`GemmRing` in
/// cuda/include/wgmma_gemm.cuh with two tile buffers, here and in [`super::moe_wgmma_fp8`]): two tiles' slot tables
/// (pairs and source rows), their `TileWork` (16 bytes) and "tile full" / "tile empty" barriers, and the group
/// walker's prefix and state (`kWalkerInts` = 264 words).
pub(crate) fn persistent_tables_bytes(slot_tiles: u32) -> u32 {
    2 * (2 * slot_tiles * 64 * 4) + 2 * 16 + 4 * 8 + WALKER_INTS * 4
}

/// `kWalkerInts` of cuda/include/wgmma_gemm.cuh: the group walker's 256 experts' prefix and its state.
const WALKER_INTS: u32 = 256 + 8;

/// Blocks of `slot_tiles` 64-slot tiles resident per SM: two of 64 slots (96 KiB of stages each), one wide block.
fn blocks_per_sm(slot_tiles: u32) -> u32 {
    if slot_tiles == 1 {
        2
    } else {
        1
    }
}

/// The wgmma kernels of `format` weights and `slot_tiles` 64-slot tiles a block (1, 3 or 4): the gather kernel
/// (grouped mode) and the TMA kernel (dense mode). None for the formats that keep mma.sync.
fn kernels(format: WeightFormat, slot_tiles: u32) -> Option<(Kernel, Kernel)> {
    let (gather, tma) = match (format, slot_tiles) {
        (WeightFormat::Bf16, 1) => ("moe_gemm_bf16_wgmma", "moe_gemm_bf16_wgmma_dense"),
        (WeightFormat::Int4 { .. }, 1) => ("moe_gemm_int4_wgmma", "moe_gemm_int4_wgmma_dense"),
        (WeightFormat::Nvfp4, 1) => ("moe_gemm_nvfp4_wgmma", "moe_gemm_nvfp4_wgmma_dense"),
        (WeightFormat::Bf16, WIDE_SLOT_TILES) => ("moe_gemm_bf16_wide_wgmma", "moe_gemm_bf16_wide_wgmma_dense"),
        (WeightFormat::Int4 { .. }, WIDE_SLOT_TILES) => ("moe_gemm_int4_wide_wgmma", "moe_gemm_int4_wide_wgmma_dense"),
        (WeightFormat::Nvfp4, WIDE_SLOT_TILES) => ("moe_gemm_nvfp4_wide_wgmma", "moe_gemm_nvfp4_wide_wgmma_dense"),
        (WeightFormat::Bf16, WIDE256_SLOT_TILES) => ("moe_gemm_bf16_wide256_wgmma", "moe_gemm_bf16_wide256_wgmma_dense"),
        (WeightFormat::Int4 { .. }, WIDE256_SLOT_TILES) => ("moe_gemm_int4_wide256_wgmma", "moe_gemm_int4_wide256_wgmma_dense"),
        (WeightFormat::Nvfp4, WIDE256_SLOT_TILES) => ("moe_gemm_nvfp4_wide256_wgmma", "moe_gemm_nvfp4_wide256_wgmma_dense"),
        _ => return None,
    };
    Some((Kernel { module: MOE_GEMM_WGMMA, entry: gather }, Kernel { module: MOE_GEMM_WGMMA, entry: tma }))
}

/// Whether the wgmma kernels run a prefill-tile launch of `format` weights (with bf16 inputs unless `e4m3_input`):
/// they apply and are chosen. False: the mma.sync kernel runs.
pub(crate) fn applies(format: WeightFormat, e4m3_input: bool) -> Result<bool> {
    Ok(kernels(format, 1).is_some() && !e4m3_input && PrefillGemm::current()? != PrefillGemm::MmaSync)
}

/// Launches the prefill tile of `format` weights on wgmma: `params` and the grid of the mma.sync launch (`config`'s
/// block and shared memory are replaced by the wgmma kernel's). `rows_per_matrix`: the launch's average rows per
/// matrix (routed pairs over local experts, or a dense launch's rows), which picks the wide kernels above
/// [`WIDE_MIN_ROWS`] and the 256-slot ones above [`WIDE256_MIN_ROWS`]. The kernels are persistent: the grid is the
/// blocks resident at once on [`super::TARGET_SMS`] SMs (or [`with_persistent_blocks`]'s cap) per matrix, at most the
/// work tiles, each block walking tiles of 128 features by 64, 192 or 256 rows (dense: a row block; grouped: an expert's
/// group of that many slots, read from the grouping on the device); launches with a finishing step (query RoPE, row
/// finisher) get one block per tile. Dense launches whose input row of slot
/// r is row r (every dense launch the crate makes) get the TMA kernel and the activations' tensor map, unless
/// [`PrefillGemm::WgmmaGather`] is chosen; the others gather. `Error::InvalidArgument` for a format without wgmma
/// kernels (see [`applies`]).
pub(crate) fn launch(device: &Device, format: WeightFormat, rows_per_matrix: usize, config: &LaunchConfig, params: &MoeGemmParams) -> Result<()> {
    let slot_tiles = match rows_per_matrix {
        r if r > WIDE256_MIN_ROWS => WIDE256_SLOT_TILES,
        r if r > WIDE_MIN_ROWS => WIDE_SLOT_TILES,
        _ => 1,
    };
    let (gather, tma) = kernels(format, slot_tiles).ok_or_else(|| Error::InvalidArgument(format!("no wgmma prefill kernel for {format:?} weights")))?;
    let grid = persistent_grid(&config.grid, params, slot_tiles, blocks_per_sm(slot_tiles))?;
    if grid.x == 0 {
        return Ok(());
    }
    let config = LaunchConfig { grid, block: Dim3::x(threads(slot_tiles)), shared_bytes: shared_bytes(format, slot_tiles) };
    let dense_rows_in_order = params.sorted_pairs.is_null() && (params.in_by_token == 0 || params.top_k == 1) && params.dense_rows > 0;
    let use_gather = !dense_rows_in_order || PrefillGemm::current()? == PrefillGemm::WgmmaGather;
    let kernel = if use_gather { &gather } else { &tma };
    let params = &walk_window_params(kernel.entry, params, &grid, 64 * slot_tiles)?;
    if use_gather {
        return launch_with(device, &gather, &config, params);
    }
    // The map depends on the activations' address and shape only: encoded once per buffer and shape, reused after.
    let x_map = encode_cached(device, &activation_map(params, config.grid.z)?)?;
    // Field by field: whether bindgen adds a padding field (the map's 64-byte alignment) depends on the GEMM params' size.
    let mut tma_params = MoeGemmTmaParams::default();
    (tma_params.gemm, tma_params.x_map) = (*params, Small4TensorMap { opaque: x_map.opaque });
    launch_with(device, &tma, &config, &tma_params)
}

/// The grid of a persistent wgmma launch (here and [`super::moe_wgmma_fp8`]) whose mma.sync launch has grid
/// `mma_grid`, with blocks of `slot_tiles` 64-slot tiles, `blocks_per_sm` of them resident on an SM. The tile space:
/// feature tiles (the mma.sync grid's x) x row blocks of 64 `slot_tiles` rows (dense) or x the expert groups
/// (grouped: at most one per aligner tile, the mma.sync grid's y), per matrix (grid z). As many blocks as are resident
/// at once on [`super::TARGET_SMS`] SMs (or [`with_persistent_blocks`]'s cap), spread over the matrices, each walking
/// tiles blockIdx.x, + gridDim.x, ... (at most the tiles); a launch with a finishing step (query RoPE, row finisher)
/// runs it per block on the block's tile, so one tile per block. x is 0 when there are no tiles.
/// `Error::InvalidArgument` for a negative row count or a tile count past u32.
pub(crate) fn persistent_grid(mma_grid: &Dim3, params: &MoeGemmParams, slot_tiles: u32, blocks_per_sm: u32) -> Result<Dim3> {
    let row_blocks = if params.sorted_pairs.is_null() {
        let rows = u32::try_from(params.dense_rows).map_err(|_| Error::InvalidArgument(format!("wgmma dense gemm: {} rows", params.dense_rows)))?;
        rows.div_ceil(64 * slot_tiles)
    } else {
        mma_grid.y
    };
    let tiles = mma_grid.x.checked_mul(row_blocks).ok_or_else(|| Error::InvalidArgument(format!("wgmma gemm: {} x {row_blocks} tiles", mma_grid.x)))?;
    let finishes = !params.rope.positions.is_null() || params.finish.kind != SMALL4_GEMM_FINISH_NONE as i32;
    let resident = PERSISTENT_BLOCKS.get().map_or((super::TARGET_SMS as u32 * blocks_per_sm).div_ceil(mma_grid.z.max(1)), NonZeroU32::get);
    Ok(Dim3::xyz(if finishes { tiles } else { tiles.min(resident) }, 1, mma_grid.z))
}

/// The 3-d map {k_dim, dense_rows, heads} of a dense launch's bf16 input rows (params.h, `MoeGemmTmaParams`).
fn activation_map(params: &MoeGemmParams, heads: u32) -> Result<TiledTensorMap> {
    let non_negative = |what: &str, v: i32| u64::try_from(v).map_err(|_| Error::InvalidArgument(format!("wgmma dense gemm: {what} = {v} is negative")));
    let (k_dim, rows) = (non_negative("k_dim", params.k_dim)?, non_negative("dense_rows", params.dense_rows)?);
    let row_bytes = non_negative("x_stride", params.x_stride)? * 2;
    // A single matrix's z stride is never stepped; the matrix's size keeps it a valid (16-byte multiple) stride.
    let matrix_bytes = if heads > 1 { non_negative("x_batch_stride", params.x_batch_stride)? * 2 } else { row_bytes * rows };
    Ok(TiledTensorMap {
        data_type: DataType::Bfloat16,
        rank: 3,
        global_address: params.x as u64,
        global_dim: vec![k_dim, rows, heads as u64],
        global_strides: vec![row_bytes, matrix_bytes],
        box_dim: X_BOX.to_vec(),
        element_strides: vec![1; 3],
        interleave: Interleave::None,
        // The layout the consumers' wgmma descriptors read (hopper.cuh, wgmma_desc_k_sw128).
        swizzle: Swizzle::B128,
        l2_promotion: L2Promotion::L2_128B,
        // Rows past dense_rows read zeros: the padding slots of the tail block.
        oob_fill: OobFill::None,
    })
}
