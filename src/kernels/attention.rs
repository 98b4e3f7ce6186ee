//! Paged MLA attention (`cuda/mla_attention.cu`): the cache writer (kv_a_norm + YaRN RoPE fused) and causal latent
//! attention over a paged cache for decode (one query token per sequence) and chunked prefill (several), split-KV with
//! a deterministic combine.
//!
//! Every index the kernels dereference is validated on the host first: block tables when they are uploaded
//! (`BlockTables::upload`), query layouts and token positions at each call. A kernel never reads a page slot past
//! its sequence's length.

use half::bf16;

use super::check_len;
use super::dense;
use super::gemm::{DeviceWeights, RowCounters, RowFinish};
use super::modules::{MLA_ATTENTION, MLA_ATTENTION_WGMMA};
use super::moe_wgmma_fp8::Fp8ActScratch;
use super::norm;
use super::params::{MlaAttentionParams, MlaCacheWriteParams, MlaCopyPagesParams};
use super::prefetch::L2Prefetch;
use super::{Matrix, TensorView, Vector};
// The SM count the split heuristic fills (an H100 SXM's or an H200's).
use super::TARGET_SMS as SMS;
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};
use crate::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype, PageCopy};

/// The geometry the kernels are compiled for (`kLatent`, `kRope` in the .cu file): latent width of a cache row.
pub const KV_LORA_RANK: usize = 256;
/// Rotary (positional) width of a cache row and of each head's `q_rope`; a row holds `KV_LORA_RANK + QK_ROPE` values.
pub const QK_ROPE: usize = 64;
const WIDTH: usize = KV_LORA_RANK + QK_ROPE;

// Tiling constants of `mla_attention_*`, mirrored from the .cu file to size its dynamic shared memory.
const TILE_N: usize = 32;
const ROW_STRIDE: usize = WIDTH + 8;
const ROWS_PER_WARP: usize = 16;
const MAX_WARPS: usize = 4;
/// Warps per block of the cache writer and the combine kernel (one token / one row per warp).
const WRITE_WARPS: usize = 4;
const COMBINE_WARPS: usize = 8;
/// Warps of an attention block whose split combine is fused, when the grid has at most one block per SM: the warps
/// past the plan's row warps share the tile loads and then the combine (4 rows a warp at once), so the last split
/// block's combine of a 32-head tile runs on 8 warps instead of 2 (`kMaxBlockWarps` in the .cu file).
const FUSED_BLOCK_WARPS: usize = 8;

/// Blocks of the warp ring (no helper warps) that shared memory allows per SM (~83 KiB each: 3 bf16 stages, or 2 raw
/// fp8 stages and 2 widened tiles) on all SMs: from 9 (sequence, row tile) units up the split heuristic makes at most
/// this many blocks, one wave; the fused combine's tail then runs on the 2 row warps of each tile's last block.
/// Predicted on an H100 SXM (docs/perf.md "MLA decode at large grids: the warp ring"): batch 64 at 32k context, 4
/// splits (256 blocks, one wave) against 5 (320 blocks, two waves: more exposed latency and partials).
const TARGET_BLOCKS: usize = SMS * 2;
/// Up to this many (sequence, row tile) units (decode at batch <= 8 with 32 heads), the heuristic aims for one
/// block per SM instead (and below it, tiles of one row warp: `AttentionPlan::new`): blocks of `FUSED_BLOCK_WARPS` warps whose helper warps spread the fused combine. Predicted
/// on an H100 SXM at batch 1 (`small4 calibrate --predict decode-choices --only mla-b1 --sample-blocks 1024`,
/// docs/perf.md "MLA split combine in the attention launch"): 4k context 23.0 µs with 32 splits against 24.4 (64),
/// 26.8 (16) and 30.9 (128), and 26.0 before the fusion (two launches, 64 splits); 32k context 39.9 µs with 128 splits
/// against 42.3 (64), and 42.2 before. After the per-tile chain work (docs/perf.md "MLA decode: the per-tile chain and
/// the combine form by grid") the heuristic's plans are predicted at 18.2 µs (4k) and 27.0 µs (32k); with half-warp
/// tiles and one barrier a tile (section "MLA decode at batch 1: half-warp tiles") 16.7 µs and 26.1 µs, 8.0 µs at 4k
/// with the calls back to back.
const ONE_BLOCK_PER_SM_UNITS: usize = 8;
/// Most splits a tile's fused combine reads when the grid holds more than one block per SM (no helper warps: the 2 row
/// warps of the tile's last block combine after its split); above, `SplitCombine::for_plan` takes the second launch.
/// The two grids the timing model has predicted both ways sit on either side: batch 64 at 4k context, 4 splits
/// (fused ahead on both GPUs), and batch 8 at 32k, 32 splits (fused ahead on an H100 SXM, behind on an H200, about
/// even on the sum: docs/perf.md "MLA decode at large grids: the warp ring"); any bound from 4 to 31 fits them, 16 is
/// near the middle in ratio, to be placed by a GPU.
const FUSED_MAX_SPLITS_WITHOUT_HELPERS: usize = 16;
/// Longest KV split (tokens) of the one-block-per-SM plan: past it the heuristic aims for `TARGET_BLOCKS` instead
/// (batch 1 at 32k context, 2 row tiles of 32,768 tokens over 132 SMs, stays one block per SM; batch 8 at 32k does
/// not).
const ONE_BLOCK_PER_SM_MAX_SPLIT_TOKENS: usize = 512;
/// Rows of a row tile of one row warp at the smallest grids: when the sequences' rows in tiles of 8, times the
/// splits of `MIN_SPLIT_TOKENS`, still fit one block per SM (batch 1 at up to 4,224 tokens with 32 heads), the
/// heuristic cuts tiles of 8 rows instead of 16 (rows 8-15 of the warp's mma tiles are padding; the per-tile chain is
/// the same). Each tile's fused combine then reads half the partials (8 rows x splits KiB), through twice the SMs' L2
/// ports, one row a warp instead of two; each split's cache rows are read by four blocks instead of two (L2 hits).
const HALF_WARP_TILE_ROWS: usize = 8;
/// Shortest KV split the heuristic makes (four 32-token tiles). Each split block walks its tiles one after another,
/// so at batch 1-8 the split length is the kernel's latency; shorter splits cost 1 KiB of f32 partials per row and
/// split (32 KiB for 32 heads, written by the split blocks and read by the combine, in L2 at these sizes) and a longer
/// combine. With the combine as its own launch, 64 tokens was the model's best at batch 1, 4k context (26.0 µs; 23.1
/// measured on an H200); with the combine fused, 128 tokens (23.0 µs predicted, above).
const MIN_SPLIT_TOKENS: usize = 128;
/// Most KV splits the heuristic makes: the combine reads every split's partials of a row in one warp, so its time
/// grows with the split count. On an H200, batch 1 at 32k context ran 52.5 us with 128 splits and 79.9 us with 396
/// (the combine alone 24.5 us, as its own launch).
const MAX_SPLITS: usize = 128;

const CACHE_WRITE_BF16: Kernel = Kernel { module: MLA_ATTENTION, entry: "mla_cache_write_bf16" };
const CACHE_WRITE_FP8: Kernel = Kernel { module: MLA_ATTENTION, entry: "mla_cache_write_fp8" };
const ATTENTION_BF16: Kernel = Kernel { module: MLA_ATTENTION, entry: "mla_attention_bf16" };
const ATTENTION_FP8: Kernel = Kernel { module: MLA_ATTENTION, entry: "mla_attention_fp8" };
const COMBINE: Kernel = Kernel { module: MLA_ATTENTION, entry: "mla_attention_combine" };
const COPY_PAGES: Kernel = Kernel { module: MLA_ATTENTION, entry: "mla_copy_pages" };
const ATTENTION_WGMMA_BF16: Kernel = Kernel { module: MLA_ATTENTION_WGMMA, entry: "mla_attention_wgmma_bf16" };
const ATTENTION_WGMMA_FP8: Kernel = Kernel { module: MLA_ATTENTION_WGMMA, entry: "mla_attention_wgmma_fp8" };
/// Row warps per block of `mla_attention_wgmma_*`: 128 rows, two consumer warpgroups of one wgmma M (64) each.
const WGMMA_ROW_WARPS: usize = 8;
/// Threads per block of `mla_attention_wgmma_*`: the two consumer warpgroups and the producer warpgroup.
const WGMMA_THREADS: u32 = (WGMMA_ROW_WARPS as u32 + 4) * 32;
/// Dynamic shared memory of `mla_attention_wgmma_*` (`kSharedBytes` in cuda/mla_attention_wgmma.cu): Q [128 x 320]
/// bf16, 3 stages of 32 cache tokens x 320 bf16, a full and an empty mbarrier per stage, and the fused combine's
/// 8-byte "last arrival" slot.
const WGMMA_SHARED_BYTES: u32 = (WGMMA_ROW_WARPS * ROWS_PER_WARP * WIDTH * 2 + 3 * TILE_N * WIDTH * 2 + 2 * 3 * 8 + 8) as u32;

/// The environment variable that sets the process default of [`MlaPrefillKernel`]: `wgmma` (or unset) or
/// `mma_sync`.
pub const MLA_PREFILL_ENV: &str = "SMALL4_MLA_PREFILL";

/// Which kernel runs the prefill launches of [`mla_attention`] (more than one query token in some sequence): both
/// compute the same outputs at the same KV splits (the same key tiles of 32 tokens from each split's start, k order,
/// masking, softmax, rounding, f32 partials and split combine; cuda/include/mla_attention.cuh is their common code),
/// only the tensor-core instructions, the pipeline and the row tiles (128 rows on wgmma) differ. Decode launches always
/// run the mma.sync kernel.
///
/// The default is [`MlaPrefillKernel::Wgmma`]; the environment's `SMALL4_MLA_PREFILL=mma_sync` ([`MLA_PREFILL_ENV`])
/// selects the mma.sync kernel for the process, and [`MlaPrefillKernel::run`] for one closure on the calling thread.
///
/// ```
/// use small4::kernels::attention::MlaPrefillKernel;
///
/// // The choice holds inside `run` only, on this thread:
/// assert_eq!(MlaPrefillKernel::MmaSync.run(MlaPrefillKernel::current)?, MlaPrefillKernel::MmaSync);
/// assert_eq!(MlaPrefillKernel::Wgmma.run(MlaPrefillKernel::current)?, MlaPrefillKernel::Wgmma);
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MlaPrefillKernel {
    /// `mla_attention_wgmma_*`: wgmma m64n32k16 (S) and m64n256k16 (P V), a producer warp and an mbarrier ring.
    Wgmma,
    /// `mla_attention_*`: mma.sync m16n8k16, all warps load and compute.
    MmaSync,
}

thread_local! {
    /// [`MlaPrefillKernel::run`]'s choice for the calling thread, over the environment's.
    static PREFILL_OVERRIDE: std::cell::Cell<Option<MlaPrefillKernel>> = const { std::cell::Cell::new(None) };
}

impl MlaPrefillKernel {
    /// The choice in force on this thread: [`MlaPrefillKernel::run`]'s, else the environment's
    /// (`SMALL4_MLA_PREFILL`), else [`MlaPrefillKernel::Wgmma`]. `Error::InvalidArgument` for an environment value
    /// other than `wgmma` and `mma_sync`.
    pub fn current() -> Result<Self> {
        super::current_choice(&PREFILL_OVERRIDE, MLA_PREFILL_ENV, &[("wgmma", Self::Wgmma), ("mma_sync", Self::MmaSync)], Self::Wgmma)
    }

    /// Runs `f` with this choice on the calling thread (launches are issued on the thread that calls the wrapper),
    /// restoring the previous choice afterwards, also when `f` panics.
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        super::with_choice(&PREFILL_OVERRIDE, self, f)
    }
}

fn check_geometry(desc: &CacheDescriptor) -> Result<()> {
    desc.validate()?;
    if (desc.kv_lora_rank, desc.qk_rope) != (KV_LORA_RANK, QK_ROPE) {
        return Err(Error::InvalidArgument(format!(
            "MLA kernels are compiled for latent {KV_LORA_RANK} + rope {QK_ROPE}, cache has {} + {}",
            desc.kv_lora_rank, desc.qk_rope
        )));
    }
    Ok(())
}

fn out_of_range(what: &str, index: i64, limit: usize) -> Error {
    Error::OutOfRange { what: what.into(), index, limit: limit as i64 }
}

/// One layer's paged latent cache on the device: `[num_pages, page_size, 320]` elements of the descriptor's dtype.
///
/// Every constructor returns `Error::InvalidArgument` for a descriptor that fails `CacheDescriptor::validate` or
/// another geometry than [`KV_LORA_RANK`] + [`QK_ROPE`].
///
/// ```
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::attention::{PagedCache, KV_LORA_RANK, QK_ROPE};
/// use small4::model::kv_cache::{CacheDescriptor, CacheDtype, PageCopy};
///
/// let device = simulator();
/// // Two pages of 16 tokens; a bf16 row holds the latent and the rope part.
/// let desc = CacheDescriptor::mla(2, 16, CacheDtype::Bf16)?;
/// assert_eq!(desc.page_bytes(), 16 * (KV_LORA_RANK + QK_ROPE) * 2);
/// // Pages the caller already holds: page 0 all 7s, page 1 zeros.
/// let mut bytes = vec![0u8; desc.total_bytes()];
/// bytes[..desc.page_bytes()].fill(7);
/// let cache = PagedCache::from_buffer(desc, DeviceBuffer::from_slice(&device, &bytes)?)?;
/// // Copy-on-write: page 1 becomes a copy of page 0.
/// cache.copy_pages(&[PageCopy { src: 0, dst: 1 }])?;
/// assert!(cache.to_bytes()?.iter().all(|&b| b == 7));
/// // A copy to a page the cache does not have, and a buffer of the wrong size, are typed errors:
/// assert!(matches!(cache.copy_pages(&[PageCopy { src: 0, dst: 2 }]), Err(small4::Error::OutOfRange { .. })));
/// let short = DeviceBuffer::<u8>::alloc(&device, desc.page_bytes())?;
/// assert!(matches!(PagedCache::from_buffer(desc, short), Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub struct PagedCache {
    desc: CacheDescriptor,
    data: DeviceBuffer<u8>,
}

impl PagedCache {
    /// Uninitialised pages.
    pub fn new(device: &Device, desc: CacheDescriptor) -> Result<Self> {
        check_geometry(&desc)?;
        Ok(PagedCache { desc, data: DeviceBuffer::alloc(device, desc.total_bytes())? })
    }

    /// Every byte set to `byte` (0xff: NaN in both bf16 and e4m3, to prove unused slots are never read).
    pub fn filled_with_byte(device: &Device, desc: CacheDescriptor, byte: u8) -> Result<Self> {
        check_geometry(&desc)?;
        Ok(PagedCache { desc, data: DeviceBuffer::filled_with_byte(device, desc.total_bytes(), byte)? })
    }

    /// Pages copied from host `bytes` (e.g. a cache saved with [`PagedCache::to_bytes`]): `Error::Shape` unless
    /// `bytes` is exactly `desc.total_bytes()` long.
    pub fn from_bytes(device: &Device, desc: CacheDescriptor, bytes: &[u8]) -> Result<Self> {
        check_geometry(&desc)?;
        check_len("paged cache bytes", bytes.len(), desc.total_bytes())?;
        Ok(PagedCache { desc, data: DeviceBuffer::from_slice(device, bytes)? })
    }

    /// Pages in memory the caller already holds (e.g. a runtime's own cache through the C ABI): `data` must be
    /// exactly `desc.total_bytes()` long.
    pub fn from_buffer(desc: CacheDescriptor, data: DeviceBuffer<u8>) -> Result<Self> {
        check_geometry(&desc)?;
        check_len("paged cache bytes", data.len(), desc.total_bytes())?;
        Ok(PagedCache { desc, data })
    }

    /// The geometry and dtype the cache was made with.
    pub fn descriptor(&self) -> &CacheDescriptor {
        &self.desc
    }
    /// The raw pages, `desc.total_bytes()` bytes.
    pub fn data(&self) -> &DeviceBuffer<u8> {
        &self.data
    }
    /// Copies every page to the host (synchronises).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.data.to_vec()
    }

    /// Applies the copy-on-write copies `KvCache::append` asked for (`dst` page = `src` page), in one launch.
    /// Refuses pages outside the cache, a destination written twice and a destination that is another copy's source
    /// (the copies run in parallel): `Error::OutOfRange` and `Error::InvalidArgument` respectively.
    pub fn copy_pages(&self, copies: &[PageCopy]) -> Result<()> {
        let num_pages = self.desc.num_pages;
        let mut role = vec![0u8; num_pages]; // 1: source, 2: destination
        for (i, c) in copies.iter().enumerate() {
            for page in [c.src, c.dst] {
                if page as usize >= num_pages {
                    return Err(out_of_range(&format!("page of copy {i}"), page as i64, num_pages));
                }
            }
            let (src, dst) = (c.src as usize, c.dst as usize);
            if role[dst] != 0 || role[src] == 2 || src == dst {
                return Err(Error::InvalidArgument(format!("page copy {i} ({src} -> {dst}) overlaps another copy")));
            }
            role[src] = 1;
            role[dst] = 2;
        }
        if copies.is_empty() {
            return Ok(());
        }
        let device = self.data.device();
        let pairs: Vec<i32> = copies.iter().flat_map(|c| [c.src as i32, c.dst as i32]).collect();
        let pairs_dev = DeviceBuffer::from_slice(device, &pairs)?;
        let params =
            MlaCopyPagesParams { cache: self.data.mut_ptr(), pairs: pairs_dev.ptr(), copies: copies.len() as i32, page_bytes: self.desc.page_bytes() as i32 };
        let config = LaunchConfig { grid: Dim3::x(copies.len() as u32), block: Dim3::x(256), shared_bytes: 0 };
        launch_with(device, &COPY_PAGES, &config, &params)
    }
}

/// Block tables and sequence lengths of a batch, checked against a cache geometry and uploaded.
///
/// ```
/// use small4::device::simulator;
/// use small4::kernels::attention::BlockTables;
/// use small4::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype};
///
/// let device = simulator();
/// let desc = CacheDescriptor::mla(4, 16, CacheDtype::Bf16)?; // four pages of 16 tokens
/// // Two sequences of up to two pages: 17 tokens on pages 0 and 1, 3 tokens on page 2 (its second entry unused).
/// let batch = BatchTables { block_tables: vec![0, 1, 2, -1], seq_lens: vec![17, 3], max_pages: 2 };
/// // For a captured decode step: planned for full rows, then updated in place every step.
/// let mut tables = BlockTables::upload_for_capacity(&device, &batch, &desc)?;
/// assert_eq!((tables.num_seqs(), tables.seq_lens()), (2, &[17, 3][..]));
/// tables.update(&BatchTables { seq_lens: vec![18, 4], ..batch.clone() })?;
/// assert_eq!(tables.seq_lens(), &[18, 4]);
/// // 33 tokens need a third page, more than a row holds; one sequence instead of two changes the shape:
/// let long = BatchTables { seq_lens: vec![33, 4], ..batch.clone() };
/// assert!(matches!(tables.update(&long), Err(small4::Error::OutOfRange { .. })));
/// let one = BatchTables { block_tables: vec![0, 1], seq_lens: vec![5], max_pages: 2 };
/// assert!(matches!(tables.update(&one), Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub struct BlockTables {
    host: BatchTables,
    num_pages: usize,
    page_size: usize,
    tables: DeviceBuffer<i32>,
    lens: DeviceBuffer<i32>,
    /// Attention plans its KV splits for `max_pages` full pages instead of the longest sequence, so one plan (one
    /// captured graph) serves every length up to that capacity; splits past a sequence's end exit at once.
    plan_for_capacity: bool,
}

impl BlockTables {
    /// Checks that every page a sequence's length covers is a page of the cache (entries past the length may be
    /// anything: the kernels never read them) and uploads the arrays.
    ///
    /// `Error::OutOfRange` for a negative length, a sequence longer than its row's `max_pages` pages, or a page
    /// outside the cache; `Error::InvalidArgument` for `max_pages` of 0 (or above `i32`) or a bad descriptor;
    /// `Error::Shape` when `block_tables` is not `[sequences, max_pages]`.
    pub fn upload(device: &Device, batch: &BatchTables, desc: &CacheDescriptor) -> Result<Self> {
        Self::check(batch, desc)?;
        Ok(BlockTables {
            host: batch.clone(),
            num_pages: desc.num_pages,
            page_size: desc.page_size,
            tables: DeviceBuffer::from_slice(device, &batch.block_tables)?,
            lens: DeviceBuffer::from_slice(device, &batch.seq_lens)?,
            plan_for_capacity: false,
        })
    }

    /// [`BlockTables::upload`] for a captured decode step: attention is planned for `batch.max_pages` full pages
    /// (not the current lengths), and [`BlockTables::update`] later rewrites the same device arrays.
    pub fn upload_for_capacity(device: &Device, batch: &BatchTables, desc: &CacheDescriptor) -> Result<Self> {
        Ok(BlockTables { plan_for_capacity: true, ..Self::upload(device, batch, desc)? })
    }

    /// Checks `batch` and writes it into the existing device arrays (same sequences and pages per row), so launches
    /// recorded with these tables read the new values. `Error::Shape` for another sequence count or `max_pages`,
    /// and the errors of [`BlockTables::upload`].
    pub fn update(&mut self, batch: &BatchTables) -> Result<()> {
        if (batch.seq_lens.len(), batch.max_pages) != (self.host.seq_lens.len(), self.host.max_pages) {
            return Err(Error::shape(
                "block tables update [sequences, pages per row]",
                format!("[{}, {}]", self.host.seq_lens.len(), self.host.max_pages),
                format!("[{}, {}]", batch.seq_lens.len(), batch.max_pages),
            ));
        }
        // The checks read the geometry only; the dtype is irrelevant to them.
        let desc = CacheDescriptor::mla(self.num_pages, self.page_size, CacheDtype::Bf16)?;
        Self::check(batch, &desc)?;
        self.tables.copy_from(&batch.block_tables)?;
        self.lens.copy_from(&batch.seq_lens)?;
        self.host = batch.clone();
        Ok(())
    }

    /// The tables and lengths the device arrays hold.
    pub(crate) fn host(&self) -> &BatchTables {
        &self.host
    }

    /// The device's sequence lengths, for a kernel that advances them (`ops::decode_advance`).
    pub(crate) fn device_lens(&self) -> Result<Vector<'_, i32>> {
        self.lens.view([self.host.seq_lens.len()])
    }

    /// Whether every sequence's row has a page for one more token (what `lengths_advanced` needs).
    pub(crate) fn lengths_can_advance(&self) -> bool {
        let row_tokens = (self.host.max_pages * self.page_size) as i64;
        self.host.seq_lens.iter().zip(self.host.block_tables.chunks_exact(self.host.max_pages)).all(|(&len, row)| {
            let len = len as i64;
            len < row_tokens && len < i32::MAX as i64 && row[len as usize / self.page_size] >= 0
        })
    }

    /// Records that a kernel added one token to every sequence's device length (`ops::decode_advance`), which the
    /// caller checked with `lengths_can_advance`: the host copy follows.
    pub(crate) fn lengths_advanced(&mut self) {
        self.host.seq_lens.iter_mut().for_each(|len| *len += 1);
    }

    fn check(batch: &BatchTables, desc: &CacheDescriptor) -> Result<()> {
        check_geometry(desc)?;
        let num_seqs = batch.seq_lens.len();
        if batch.max_pages == 0 || batch.max_pages > i32::MAX as usize {
            return Err(Error::InvalidArgument(format!("block tables with {} pages per row", batch.max_pages)));
        }
        check_len("block tables", batch.block_tables.len(), num_seqs * batch.max_pages)?;
        for (seq, (&len, row)) in batch.seq_lens.iter().zip(batch.block_tables.chunks_exact(batch.max_pages)).enumerate() {
            let used = desc.pages_for(usize::try_from(len).map_err(|_| out_of_range("sequence length", len as i64, i32::MAX as usize))?);
            if used > batch.max_pages {
                return Err(out_of_range(&format!("pages of sequence {seq}"), used as i64, batch.max_pages));
            }
            for (slot, &page) in row[..used].iter().enumerate() {
                if page < 0 || page as usize >= desc.num_pages {
                    return Err(out_of_range(&format!("block table [{seq}][{slot}]"), page as i64, desc.num_pages));
                }
            }
        }
        Ok(())
    }

    /// Sequences in the batch (rows of the block table).
    pub fn num_seqs(&self) -> usize {
        self.host.seq_lens.len()
    }
    /// Tokens in each sequence's cache, new tokens included (the host copy of what the kernels read).
    pub fn seq_lens(&self) -> &[i32] {
        &self.host.seq_lens
    }

    fn check_cache(&self, cache: &PagedCache) -> Result<()> {
        if (self.num_pages, self.page_size) != (cache.desc.num_pages, cache.desc.page_size) {
            return Err(Error::InvalidArgument(format!(
                "block tables checked for {} pages of {} tokens, cache has {} of {}",
                self.num_pages, self.page_size, cache.desc.num_pages, cache.desc.page_size
            )));
        }
        Ok(())
    }
}

/// kv_a_norm weight, eps and the YaRN inverse frequencies the cache writer applies.
pub struct CacheWriteWeights<'a> {
    /// `[256]` bf16: the `kv_a_norm` RMSNorm weight of the layer.
    pub norm_weight: Vector<'a, bf16>,
    /// The RMSNorm epsilon (finite, >= 0).
    pub eps: f32,
    /// `[32]` f32: the YaRN inverse frequencies of the 32 rotated pairs (`reference::rope::yarn_inv_freq`).
    pub inv_freq: Vector<'a, f32>,
}

/// Where each new token goes: block-table row and position, uploaded once per step (checked against the block
/// tables at every write).
pub struct TokenSlots {
    token_seq: Vec<i32>,
    positions: Vec<i32>,
    token_seq_dev: DeviceBuffer<i32>,
    positions_dev: DeviceBuffer<i32>,
}

impl TokenSlots {
    /// Token t goes to position `positions[t]` of the sequence in block-table row `token_seq[t]`. `Error::Shape`
    /// when the two slices differ in length (their values are checked at each [`mla_cache_write`]).
    pub fn upload(device: &Device, token_seq: &[i32], positions: &[i32]) -> Result<Self> {
        check_len("cache write positions", positions.len(), token_seq.len())?;
        Ok(TokenSlots {
            token_seq: token_seq.to_vec(),
            positions: positions.to_vec(),
            token_seq_dev: DeviceBuffer::from_slice(device, token_seq)?,
            positions_dev: DeviceBuffer::from_slice(device, positions)?,
        })
    }

    /// New tokens per write.
    pub fn tokens(&self) -> usize {
        self.token_seq.len()
    }

    /// The host copies of the sequence rows and positions the device arrays hold.
    pub(crate) fn host(&self) -> (&[i32], &[i32]) {
        (&self.token_seq, &self.positions)
    }

    /// The device's positions, for a kernel that advances them (`ops::decode_advance`).
    pub(crate) fn device_positions(&self) -> Result<Vector<'_, i32>> {
        self.positions_dev.view([self.positions.len()])
    }

    /// Records that a kernel added 1 to every device position (`ops::decode_advance`).
    pub(crate) fn positions_advanced(&mut self) {
        self.positions.iter_mut().for_each(|p| *p += 1);
    }

    /// Writes new slots into the existing device arrays (same token count, else `Error::Shape`), for a replayed step.
    ///
    /// ```
    /// use small4::kernels::attention::TokenSlots;
    ///
    /// let device = small4::device::simulator();
    /// // Two decode tokens: sequence 0 at position 17, sequence 1 at position 3; one step later, 18 and 4.
    /// let mut slots = TokenSlots::upload(&device, &[0, 1], &[17, 3])?;
    /// slots.update(&[0, 1], &[18, 4])?;
    /// assert_eq!(slots.tokens(), 2);
    /// assert!(matches!(slots.update(&[0], &[18]), Err(small4::Error::Shape { .. }))); // another token count
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn update(&mut self, token_seq: &[i32], positions: &[i32]) -> Result<()> {
        check_len("cache write sequences", token_seq.len(), self.token_seq.len())?;
        check_len("cache write positions", positions.len(), self.positions.len())?;
        self.token_seq_dev.copy_from(token_seq)?;
        self.positions_dev.copy_from(positions)?;
        self.token_seq = token_seq.to_vec();
        self.positions = positions.to_vec();
        Ok(())
    }
}

/// Writes the `slots.tokens()` new tokens into their page slots: token t is row t of `kv [tokens, 320]` (columns
/// `[c 256 | k_rope 64]`; the rows may be strided, e.g. the first 320 columns of the wkv_a_with_mqa output), at
/// position `positions[t]` of the sequence in block-table row `token_seq[t]`; stores `[rms_norm(c) * norm_weight |
/// rope(k_rope, position)]` in the cache dtype.
///
/// `Error::InvalidArgument` when the tables were checked for another cache geometry, `kv`'s row stride is not a
/// multiple of 8 or a view is not on 16 bytes (the kernel loads rows of 8), or `eps` is negative or not finite;
/// `Error::Shape` for weights of the wrong length or a `kv` that is not `[slots.tokens(), 320]`;
/// `Error::OutOfRange` for a token whose sequence row or position is outside the tables' lengths.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::attention::{mla_cache_write, BlockTables, CacheWriteWeights, PagedCache, TokenSlots};
/// use small4::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype};
///
/// let device = simulator();
/// let desc = CacheDescriptor::mla(1, 16, CacheDtype::Bf16)?; // one page of 16 tokens
/// let cache = PagedCache::filled_with_byte(&device, desc, 0)?;
/// let tables = BlockTables::upload(&device, &BatchTables { block_tables: vec![0], seq_lens: vec![1], max_pages: 1 }, &desc)?;
/// // One token: c all ones (normalised to ones), k_rope zero (rotated to zero); rows of 384 of which 320 are kv.
/// let mut row = vec![bf16::ONE; 256];
/// row.resize(384, bf16::ZERO);
/// let kv = DeviceBuffer::from_slice(&device, &row)?;
/// let (norm_weight, inv_freq) = (DeviceBuffer::from_slice(&device, &[bf16::ONE; 256])?, DeviceBuffer::from_slice(&device, &[1.0f32; 32])?);
/// let weights = CacheWriteWeights { norm_weight: norm_weight.as_vector(), eps: 0.0, inv_freq: inv_freq.as_vector() };
/// let slots = TokenSlots::upload(&device, &[0], &[0])?; // sequence 0, position 0
/// mla_cache_write(&cache, &tables, kv.view([1, 384])?.columns(0..320)?, &weights, &slots)?;
/// let first: Vec<bf16> = cache.to_bytes()?[..2 * 320].chunks(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect();
/// assert_eq!(first, row[..320]);
/// // A kv of 256 columns (the rope part missing) is a typed error:
/// let err = mla_cache_write(&cache, &tables, kv.view([1, 384])?.columns(0..256)?, &weights, &slots);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn mla_cache_write(cache: &PagedCache, tables: &BlockTables, kv: Matrix<bf16>, weights: &CacheWriteWeights, slots: &TokenSlots) -> Result<()> {
    let (params, fp8) = cache_write_params(cache, tables, kv, weights, slots)?;
    if params.tokens == 0 {
        return Ok(());
    }
    let kernel = if fp8 { CACHE_WRITE_FP8 } else { CACHE_WRITE_BF16 };
    let config = LaunchConfig { grid: Dim3::x(super::blocks_for(slots.tokens(), WRITE_WARPS)), block: Dim3::x(32 * WRITE_WARPS as u32), shared_bytes: 0 };
    launch_with(kv.device(), &kernel, &config, &params)
}

/// The cache writer's kernel parameters, checked as [`mla_cache_write`] checks them, and whether the cache is fp8:
/// for its own launch, or for the latent projection's row finisher ([`latent_projection`]).
fn cache_write_params(
    cache: &PagedCache,
    tables: &BlockTables,
    kv: Matrix<bf16>,
    weights: &CacheWriteWeights,
    slots: &TokenSlots,
) -> Result<(MlaCacheWriteParams, bool)> {
    tables.check_cache(cache)?;
    let tokens = slots.tokens();
    weights.norm_weight.expect_dims("kv_a_norm weight", [KV_LORA_RANK])?;
    weights.inv_freq.expect_dims("rope inv_freq", [QK_ROPE / 2])?;
    kv.expect_dims("cache write kv", [tokens, WIDTH])?;
    let kv_row_stride = kv.row_stride();
    if kv_row_stride > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("kv row stride {kv_row_stride} exceeds i32")));
    }
    // 16-byte loads of every row.
    kv.expect_rows_aligned("cache write kv", 16)?;
    weights.norm_weight.expect_aligned("kv_a_norm weight", 16)?;
    if !(weights.eps.is_finite() && weights.eps >= 0.0) {
        return Err(Error::InvalidArgument(format!("kv_a_norm eps {}", weights.eps)));
    }
    for (t, (&seq, &pos)) in slots.token_seq.iter().zip(&slots.positions).enumerate() {
        let len = *tables
            .seq_lens()
            .get(seq as usize)
            .filter(|_| seq >= 0)
            .ok_or_else(|| out_of_range(&format!("sequence of token {t}"), seq as i64, tables.num_seqs()))?;
        if pos < 0 || pos >= len {
            return Err(out_of_range(&format!("position of token {t} (sequence {seq})"), pos as i64, len as usize));
        }
    }
    let (fp8, inv_scale) = match cache.desc.dtype {
        CacheDtype::Bf16 => (false, 1.0),
        CacheDtype::Fp8E4m3 { scale } => (true, 1.0 / scale),
    };
    let params = MlaCacheWriteParams {
        kv: kv.ptr(),
        norm_weight: weights.norm_weight.ptr(),
        inv_freq: weights.inv_freq.ptr(),
        token_seq: slots.token_seq_dev.ptr(),
        positions: slots.positions_dev.ptr(),
        block_tables: tables.tables.ptr(),
        cache: cache.data.mut_ptr(),
        tokens: tokens as i32,
        kv_row_stride: kv_row_stride as i32,
        max_pages: tables.host.max_pages as i32,
        page_size: cache.desc.page_size as i32,
        eps: weights.eps,
        fp8_inv_scale: inv_scale,
    };
    Ok((params, fp8))
}

/// The q latent's RMSNorm that [`latent_projection`] applies: `out = rms_norm(q_a) * weight`.
#[derive(Clone, Copy)]
pub struct QueryLatentNorm<'a> {
    /// `[q_lora_rank]` bf16: the layer's `q_a_norm` weight.
    pub weight: Vector<'a, bf16>,
    /// `[tokens, q_lora_rank]` bf16: the normed q latent (wq_b's input).
    pub out: Matrix<'a, bf16>,
    /// The RMSNorm epsilon (finite, >= 0).
    pub eps: f32,
}

/// MLA's latent projection in one launch: `qkv_a = h W^T` for the stacked `[wq_a; wkv_a_with_mqa]` weights `w`
/// (`qkv_a` `[tokens, q_lora_rank + 320]`: `[q_a | c | k_rope]`), and, as each token's row is finished (the GEMM's row
/// finisher), `q_norm.out = rms_norm(q_a)` and the cache write of `[c | k_rope]` ([`mla_cache_write`]). Bit for bit
/// `dense::linear`, `norm::rms_norm` and `mla_cache_write` one after the other, in one launch instead of three.
/// `counters` has a zero counter per token (any stream's, left zero by every launch); `fp8_act` as for
/// [`dense::linear_f32`].
///
/// Errors as the three it replaces; `Error::Shape` when `qkv_a` is not `[tokens, q_lora_rank + 320]` or `counters` is
/// shorter than the tokens.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::attention::{latent_projection, BlockTables, CacheWriteWeights, PagedCache, QueryLatentNorm, TokenSlots};
/// use small4::kernels::gemm::{DeviceWeights, RowCounters};
/// use small4::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype};
/// use small4::quant::{repack::repack_linear, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// // q_lora_rank 64: W [64 + 320, 64] maps h to [q_a | c | k_rope] = [h | h h h h | 0]: every row of W a one-hot.
/// let (q_rank, dim) = (64, 64);
/// let mut w = vec![0.0f32; (q_rank + 320) * dim];
/// (0..q_rank + 256).for_each(|r| w[r * dim + r % dim] = 1.0);
/// let w = DeviceWeights::upload(&device, &repack_linear(&[(&QuantizedMatrix::quantize(WeightFormat::Bf16, &w, q_rank + 320, dim)?).into()])?)?;
/// let h = DeviceBuffer::from_slice(&device, &[bf16::from_f32(2.0); 64])?; // one token, h = 2 everywhere
/// let qkv_a = DeviceBuffer::<bf16>::alloc(&device, q_rank + 320)?;
/// let (q_weight, q_out) = (DeviceBuffer::from_slice(&device, &[bf16::ONE; 64])?, DeviceBuffer::<bf16>::alloc(&device, 64)?);
/// let desc = CacheDescriptor::mla(1, 16, CacheDtype::Bf16)?;
/// let cache = PagedCache::filled_with_byte(&device, desc, 0)?;
/// let tables = BlockTables::upload(&device, &BatchTables { block_tables: vec![0], seq_lens: vec![1], max_pages: 1 }, &desc)?;
/// let (kv_weight, inv_freq) = (DeviceBuffer::from_slice(&device, &[bf16::ONE; 256])?, DeviceBuffer::from_slice(&device, &[1.0f32; 32])?);
/// let write = CacheWriteWeights { norm_weight: kv_weight.as_vector(), eps: 0.0, inv_freq: inv_freq.as_vector() };
/// let slots = TokenSlots::upload(&device, &[0], &[0])?;
/// let counters = RowCounters::new(&device, 1)?;
/// let q_norm = QueryLatentNorm { weight: q_weight.as_vector(), out: q_out.view([1, 64])?, eps: 0.0 };
/// latent_projection(&w, h.view([1, 64])?, qkv_a.view([1, q_rank + 320])?, &q_norm, &cache, &tables, &write, &slots, &counters, None)?;
/// // rms_norm of a constant row is 1: the q latent and the cached latent are ones; the cached k_rope stays 0.
/// assert!(q_out.to_vec()?.iter().all(|v| *v == bf16::ONE));
/// let row: Vec<bf16> = cache.to_bytes()?[..2 * 320].chunks(2).map(|b| bf16::from_le_bytes([b[0], b[1]])).collect();
/// assert!(row[..256].iter().all(|v| *v == bf16::ONE) && row[256..].iter().all(|v| *v == bf16::ZERO));
/// # Ok::<(), small4::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn latent_projection(
    w: &DeviceWeights,
    h: Matrix<bf16>,
    qkv_a: Matrix<bf16>,
    q_norm: &QueryLatentNorm,
    cache: &PagedCache,
    tables: &BlockTables,
    write: &CacheWriteWeights,
    slots: &TokenSlots,
    counters: &RowCounters,
    fp8_act: Option<&Fp8ActScratch>,
) -> Result<()> {
    let [tokens, cols] = qkv_a.dims();
    let [_, q_rank] = q_norm.out.dims();
    qkv_a.expect_dims("latent projection output", [tokens, q_rank + WIDTH])?;
    let norm = norm::rms_norm_params(qkv_a.columns(0..q_rank)?, q_norm.weight, q_norm.out, q_norm.eps)?;
    let (cache_params, fp8) = cache_write_params(cache, tables, qkv_a.columns(q_rank..cols)?, write, slots)?;
    let finish = RowFinish::mla_latents(counters, norm, cache_params, fp8);
    dense::linear_finishing_rows(w, h, qkv_a, &finish, fp8_act)
}

/// How the attention work is cut: warps per block (16 query rows each), row tiles per sequence, KV splits.
///
/// ```
/// use small4::kernels::attention::AttentionPlan;
/// use small4::model::kv_cache::CacheDtype;
///
/// // One sequence of 32 (token, head) rows over 100 cache tokens, forced into 2 KV splits: two warps of 16 rows,
/// // each split 50 tokens rounded up to the 32-token tile.
/// let plan = AttentionPlan::new(1, 32, 100, Some(2))?;
/// assert_eq!(plan, AttentionPlan { warps: 2, tile_rows: 32, row_tiles: 1, num_splits: 2, tokens_per_split: 64 });
/// // Decode of one sequence, 32 heads, 4k context: tiles of 8 heads (one row warp, half its mma rows padding), 32
/// // splits of 128 tokens: 128 blocks, at most one an SM.
/// let decode = AttentionPlan::new(1, 32, 4096, None)?;
/// assert_eq!(decode, AttentionPlan { warps: 1, tile_rows: 8, row_tiles: 4, num_splits: 32, tokens_per_split: 128 });
/// // Shared memory: the queries (2 warps x 16 rows) and, with helper warps loading, two 32-token bf16 tiles (rows of
/// // 320 padded to 328); without them a ring of three tiles and their three 8-byte mbarriers.
/// assert_eq!(plan.shared_bytes(CacheDtype::Bf16, true), (2 * 16 + 2 * 32) * 328 * 2);
/// assert_eq!(plan.shared_bytes(CacheDtype::Bf16, false), (2 * 16 + 3 * 32) * 328 * 2 + 3 * 8);
/// assert!(matches!(AttentionPlan::new(1, 32, 100, Some(0)), Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Warps per block that own rows, 1 to 4; each covers 16 (query token, head) rows. (A fused split launch of at
    /// most one block per SM adds helper warps, up to 8 in all.)
    pub warps: usize,
    /// (Query token, head) rows of a row tile: `16 * warps`, or 8 for `HALF_WARP_TILE_ROWS` tiles.
    pub tile_rows: usize,
    /// Blocks along the query rows of one sequence (grid x).
    pub row_tiles: usize,
    /// KV splits per sequence (grid y); above 1 the f32 partials are combined (`SplitCombine`).
    pub num_splits: usize,
    /// Cache tokens per split, a multiple of the 32-token tile.
    pub tokens_per_split: usize,
}

impl AttentionPlan {
    /// `max_rows`: the most (query token, head) rows of one sequence; `max_kv`: the longest sequence.
    /// `num_splits`: forced split count, or `None` to fill the GPU (see `TARGET_BLOCKS`, `ONE_BLOCK_PER_SM_UNITS`,
    /// `MIN_SPLIT_TOKENS`).
    /// `Error::InvalidArgument` for `Some(0)` or a plan of more than 65535 splits.
    pub fn new(num_seqs: usize, max_rows: usize, max_kv: usize, num_splits: Option<usize>) -> Result<Self> {
        let row_warps = max_rows.div_ceil(ROWS_PER_WARP).max(1);
        // A tile's fused combine pulls its rows' partials (rows x splits KiB) through one SM's L2 port (~64 B a
        // cycle): with the heuristic's splits and at most `ONE_BLOCK_PER_SM_UNITS` warps of rows in all (batch <= 4
        // at 32 heads), one row warp a tile spreads the combines over twice the SMs (the tiles of a split re-read its
        // cache rows, from L2).
        let warps = if num_splits.is_none() && num_seqs.max(1) * row_warps <= ONE_BLOCK_PER_SM_UNITS { 1 } else { row_warps.min(MAX_WARPS) };
        let max_kv = max_kv.max(1);
        // Half-warp tiles where they keep the shortest splits and one block per SM (`HALF_WARP_TILE_ROWS`).
        let half_warp_blocks = num_seqs.max(1) * max_rows.div_ceil(HALF_WARP_TILE_ROWS) * max_kv.div_ceil(MIN_SPLIT_TOKENS);
        let tile_rows = if warps == 1 && num_splits.is_none() && half_warp_blocks <= SMS { HALF_WARP_TILE_ROWS } else { warps * ROWS_PER_WARP };
        let row_tiles = max_rows.div_ceil(tile_rows).max(1);
        let wanted = match num_splits {
            Some(0) => return Err(Error::InvalidArgument("num_splits must be >= 1".into())),
            Some(n) => n,
            None => {
                let units = num_seqs.max(1) * row_tiles;
                // One block per SM only while its splits stay short: each split block walks its tokens one tile
                // after another, so at batch 8 and 32k context (17 splits of 1,928 tokens) one block per SM was
                // predicted at 152 µs against 93 µs for `TARGET_BLOCKS` (docs/perf.md "MLA split combine").
                let short_splits = units * max_kv <= SMS * ONE_BLOCK_PER_SM_MAX_SPLIT_TOKENS;
                // One block per SM: at least as many blocks as SMs; else at most one wave of `TARGET_BLOCKS`.
                let splits = if units <= ONE_BLOCK_PER_SM_UNITS && short_splits { SMS.div_ceil(units) } else { (TARGET_BLOCKS / units).max(1) };
                splits.min(max_kv.div_ceil(MIN_SPLIT_TOKENS)).min(MAX_SPLITS)
            }
        };
        let tokens_per_split = max_kv.div_ceil(wanted.max(1)).div_ceil(TILE_N) * TILE_N;
        let num_splits = max_kv.div_ceil(tokens_per_split);
        if num_splits > u16::MAX as usize {
            return Err(Error::InvalidArgument(format!("{num_splits} KV splits")));
        }
        Ok(AttentionPlan { warps, tile_rows, row_tiles, num_splits, tokens_per_split })
    }

    /// Blocks of the attention launch for `num_seqs` sequences: row tiles x splits x sequences.
    pub fn blocks(&self, num_seqs: usize) -> usize {
        self.row_tiles * self.num_splits * num_seqs
    }

    /// Dynamic shared memory of one attention block (`SplitLayout` in mla_attention.cu): the queries, then with
    /// `helper_warps` (a launch whose blocks have warps past the row warps, which issue the tile copies) 2 cache stages
    /// (fp8: raw, plus one widened bf16 tile); without (the warp ring: every warp loads and computes) 3 bf16 cache
    /// stages, or 2 raw fp8 stages and 2 widened tiles, and an 8-byte mbarrier a slot.
    pub fn shared_bytes(&self, dtype: CacheDtype, helper_warps: bool) -> usize {
        let q = self.warps * ROWS_PER_WARP * ROW_STRIDE * 2;
        let (tile_bf16, tile_fp8) = (TILE_N * ROW_STRIDE * 2, TILE_N * WIDTH);
        match (dtype, helper_warps) {
            (CacheDtype::Bf16, true) => q + 2 * tile_bf16,
            (CacheDtype::Fp8E4m3 { .. }, true) => q + 2 * tile_fp8 + tile_bf16,
            (CacheDtype::Bf16, false) => q + 3 * (tile_bf16 + 8),
            (CacheDtype::Fp8E4m3 { .. }, false) => q + 2 * (tile_fp8 + tile_bf16 + 8),
        }
    }
}

/// The plan of `mla_attention_wgmma_*` for `max_rows` (query token, head) rows of a sequence over at most `max_kv`
/// keys: row tiles of 128 (8 row warps: two consumer warpgroups), and `num_splits` KV splits, or with `None` as many as
/// the SMs hold in one wave (the kernel runs one block an SM), at most one per `MIN_SPLIT_TOKENS` keys and
/// `MAX_SPLITS`: 1 from 67 (sequence, row tile) units up. The split ranges are [`AttentionPlan::new`]'s for that count,
/// so the mma.sync kernel at the same count computes the same partials. Errors as [`AttentionPlan::new`]'s.
///
/// Why one wave: PREDICTED on an H100 SXM (`small4 calibrate --predict prefill-cases --terms --only mla-prefill-512-0`,
/// docs/perf.md "Split-KV in the wgmma MLA prefill"), a fresh 512-token prompt at 32 heads (128 row tiles) runs 26.4 µs
/// unsplit, 31.0 with 2 splits (a second wave), 34.3 with 3 and 46.1 with 4 (mma.sync, 2 splits: 35.8).
pub fn wgmma_plan(num_seqs: usize, max_rows: usize, max_kv: usize, num_splits: Option<usize>) -> Result<AttentionPlan> {
    let tile_rows = WGMMA_ROW_WARPS * ROWS_PER_WARP;
    let row_tiles = max_rows.div_ceil(tile_rows).max(1);
    let one_wave = (SMS / (num_seqs.max(1) * row_tiles)).max(1);
    let fill = one_wave.min(max_kv.max(1).div_ceil(MIN_SPLIT_TOKENS)).min(MAX_SPLITS);
    let splits = AttentionPlan::new(num_seqs, max_rows, max_kv, Some(num_splits.unwrap_or(fill)))?;
    Ok(AttentionPlan { warps: WGMMA_ROW_WARPS, tile_rows, row_tiles, ..splits })
}

/// Which query tokens belong to which sequence, checked and uploaded once (a decode step reuses it).
/// `q_start [num_seqs + 1]`: sequence s owns query tokens `q_start[s]..q_start[s+1]`, the last q_count tokens of the
/// sequence (already written into the cache).
pub struct QueryLayout {
    host: Vec<i32>,
    q_start: DeviceBuffer<i32>,
}

impl QueryLayout {
    /// Checks `q_start` and uploads it: `Error::InvalidArgument` unless it starts at 0 and never decreases.
    pub fn upload(device: &Device, q_start: &[i32]) -> Result<Self> {
        if q_start.first() != Some(&0) {
            return Err(Error::InvalidArgument(format!("q_start must start with 0, got {:?}", q_start.first())));
        }
        if let Some(w) = q_start.windows(2).find(|w| w[1] < w[0]) {
            return Err(Error::InvalidArgument(format!("q_start decreases: {} then {}", w[0], w[1])));
        }
        Ok(QueryLayout { host: q_start.to_vec(), q_start: DeviceBuffer::from_slice(device, q_start)? })
    }

    /// Decode: one query token per sequence.
    pub fn decode(device: &Device, num_seqs: usize) -> Result<Self> {
        let q_start: Vec<i32> = (0..=num_seqs).map(|i| i as i32).collect();
        Self::upload(device, &q_start)
    }

    /// Query tokens of the whole batch (`q_start`'s last entry).
    pub fn tokens(&self) -> usize {
        *self.host.last().unwrap() as usize
    }
}

/// The queries of one attention call.
pub struct Queries<'a> {
    /// Which query tokens belong to which sequence.
    pub layout: &'a QueryLayout,
    /// `[tokens, heads, 256]`: q_nope through W_UK (absorbed), times the llama-4 query scale of the token's position.
    /// Its `heads` (all sharing the one latent KV head, `1..=65536`) is the call's head count.
    pub q_lat: TensorView<'a, bf16, 3>,
    /// `[tokens * heads, 64]` (row `t * heads + h`): rotated, times the same llama-4 query scale. Its rows may be
    /// strided (a multiple of 8 elements apart): the rope columns of `[tokens, heads, nope + 64]` query heads are read
    /// where the RoPE kernel left them, with no copy.
    pub q_rope: Matrix<'a, bf16>,
}

/// The f32 partial results of split-KV attention and the fused combine's arrival counters; grows on demand and is
/// reused across calls (a captured decode step keeps the buffers its first call sized).
pub struct AttentionScratch {
    device: Device,
    /// `[rows capacity, 256]` and `[rows capacity, 2]`
    buffers: Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
    /// One counter per (sequence, row tile), zero between launches: the fused combine's arrivals (the last split
    /// block of a tile zeroes it again).
    counters: Option<DeviceBuffer<i32>>,
}

impl AttentionScratch {
    /// Empty scratch on `device`; the first split launch allocates it.
    pub fn new(device: &Device) -> Self {
        AttentionScratch { device: device.clone(), buffers: None, counters: None }
    }

    fn ensure(&mut self, rows: usize) -> Result<&(DeviceBuffer<f32>, DeviceBuffer<f32>)> {
        let rows = rows.max(1);
        if self.buffers.as_ref().is_none_or(|(_, ml)| ml.len() < rows * 2) {
            self.buffers = None;
            self.buffers = Some((DeviceBuffer::alloc(&self.device, rows * KV_LORA_RANK)?, DeviceBuffer::alloc(&self.device, rows * 2)?));
        }
        Ok(self.buffers.as_ref().unwrap())
    }

    /// At least `tiles` zeroed arrival counters (a new buffer only when more are needed: the kernel leaves them zero).
    fn ensure_counters(&mut self, tiles: usize) -> Result<&DeviceBuffer<i32>> {
        if self.counters.as_ref().is_none_or(|c| c.len() < tiles) {
            self.counters = None;
            self.counters = Some(DeviceBuffer::from_slice(&self.device, &vec![0i32; tiles.max(1)])?);
        }
        Ok(self.counters.as_ref().unwrap())
    }
}

/// Where split-KV attention combines its splits' partials: in the attention launch itself (the last split block of
/// each (sequence, row tile) combines the tile's rows), or in a second launch (`mla_attention_combine`). Both run the
/// same device code in the same split order, so they agree bit for bit. [`mla_attention`] picks the form by the
/// grid's shape ([`SplitCombine::for_plan`]) unless [`SplitCombine::run`] forces one (the tests comparing the two,
/// and `small4 calibrate` replays of measurements made before the fusion).
///
/// ```
/// use small4::kernels::attention::{AttentionPlan, SplitCombine};
///
/// // No override outside `run`: the wrapper chooses by shape.
/// assert_eq!(SplitCombine::current(), None);
/// // The choice holds inside `run` only, on this thread:
/// assert_eq!(SplitCombine::Launch.run(SplitCombine::current), Some(SplitCombine::Launch));
/// assert_eq!(SplitCombine::current(), None);
/// // Batch 1 at 4k context: 128 split blocks, fused; batch 64 at 4k: 256 blocks of 4 splits, fused; batch 8 at 32k:
/// // 256 blocks of 32 splits, a second launch.
/// let b1 = AttentionPlan::new(1, 32, 4096, None)?;
/// assert_eq!(SplitCombine::for_plan(&b1, 1), SplitCombine::Fused);
/// let b64 = AttentionPlan::new(64, 32, 4096, None)?;
/// assert_eq!((b64.blocks(64), SplitCombine::for_plan(&b64, 64)), (256, SplitCombine::Fused));
/// let b8 = AttentionPlan::new(8, 32, 32768, None)?;
/// assert_eq!((b8.blocks(8), SplitCombine::for_plan(&b8, 8)), (256, SplitCombine::Launch));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitCombine {
    /// The last-arriving split block of each (sequence, row tile) combines: one launch.
    Fused,
    /// `mla_attention_combine` after the attention launch: two launches when split.
    Launch,
}

thread_local! {
    /// [`SplitCombine::run`]'s choice for the calling thread.
    static SPLIT_COMBINE: std::cell::Cell<Option<SplitCombine>> = const { std::cell::Cell::new(None) };
}

impl SplitCombine {
    /// The form forced on this thread by [`SplitCombine::run`], or `None` (the wrapper chooses by shape).
    pub fn current() -> Option<Self> {
        SPLIT_COMBINE.get()
    }

    /// The form [`mla_attention`] takes for a split `plan` over `num_seqs` sequences when none is forced: fused while
    /// the grid holds at most one block per SM (`TARGET_SMS`; its blocks get the helper warps that spread each tile's
    /// combine over 8 warps) or, above, while a tile combines at most `FUSED_MAX_SPLITS_WITHOUT_HELPERS` splits (the
    /// combine then runs on the 2 row warps of each tile's last block, after its split: short enough to hide under
    /// the DRAM-bound tiles); a second launch otherwise. Derived from the timing model's predictions (docs/perf.md
    /// "MLA decode: the per-tile chain and the combine form by grid", `small4 calibrate --predict decode-choices --only
    /// mla-`; with the warp ring, section "MLA decode at large grids: the warp ring", back to back): batch 1 and 8 at 4k
    /// and batch 1 at 32k (128 blocks) fused; batch 64 at 4k (256 blocks, 4 splits) fused, 64.5 against 72.2 µs on an
    /// H100 SXM (46.3 against 53.2 on an H200); batch 8 at 32k (256 blocks, 32 splits) a second launch, 71.9 against
    /// 63.8 µs on an H100 SXM (53.2 against 60.1 on an H200).
    pub fn for_plan(plan: &AttentionPlan, num_seqs: usize) -> Self {
        if plan.blocks(num_seqs) <= SMS || plan.num_splits <= FUSED_MAX_SPLITS_WITHOUT_HELPERS {
            SplitCombine::Fused
        } else {
            SplitCombine::Launch
        }
    }

    /// Runs `f` with this choice on the calling thread (launches are issued on the thread that calls the wrapper),
    /// restoring the previous choice afterwards, also when `f` panics.
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        super::with_choice(&SPLIT_COMBINE, self, f)
    }
}

thread_local! {
    /// Whether [`mla_attention`] runs decode on the wgmma kernel on this thread ([`decode_on_wgmma`]).
    static DECODE_ON_WGMMA: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with [`mla_attention`] taking the wgmma kernel for every launch on the calling thread, decode included,
/// which it never picks otherwise: `small4 calibrate`'s `mla ... attention=wgmma` cases price decode on it (docs/perf.md
/// "Split-KV in the wgmma MLA prefill").
pub(crate) fn decode_on_wgmma<R>(f: impl FnOnce() -> R) -> R {
    super::with_choice(&DECODE_ON_WGMMA, true, f)
}

/// Causal latent attention into `o_lat [tokens, heads, 256]` (bf16), the shape of `queries.q_lat`. `num_splits`: None
/// picks the split count. Returns the plan it launched. Prefill launches (a sequence with more than one query token)
/// run on the kernel [`MlaPrefillKernel`] picks (wgmma by default: its plan, [`wgmma_plan`], has 8 row warps,
/// 128-row tiles, and with `None` as many KV splits as one wave of blocks holds); decode launches run the mma.sync
/// kernel (its plan: [`AttentionPlan::new`]). Split launches combine as [`SplitCombine`] says, on either kernel.
///
/// `Error::InvalidArgument` when the tables were checked for another cache geometry, `heads` is 0 or above 65536,
/// `softmax_scale` is not finite and positive, `SMALL4_MLA_PREFILL` holds an unknown value, a view is not packed or not aligned (the kernels move 16 bytes of a
/// query and 8 of an output at a time), or the batch is too large for one launch; `Error::Shape` when the layout does
/// not cover `tables.num_seqs()` sequences or `q_lat`, `q_rope`, `o_lat` are not `[layout.tokens(), heads, 256 /
/// 64 / 256]`; `Error::OutOfRange` when a sequence has more query tokens than cached tokens.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::attention::{mla_attention, AttentionScratch, BlockTables, PagedCache, Queries, QueryLayout};
/// use small4::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype};
///
/// let device = simulator();
/// // One cached token whose latent is all 0.5: any query attends to it alone, so o_lat is that latent.
/// let desc = CacheDescriptor::mla(1, 16, CacheDtype::Bf16)?;
/// let row: Vec<u8> = (0..320).flat_map(|_| bf16::from_f32(0.5).to_le_bytes()).collect();
/// let mut bytes = vec![0u8; desc.total_bytes()];
/// bytes[..row.len()].copy_from_slice(&row);
/// let cache = PagedCache::from_bytes(&device, desc, &bytes)?;
/// let tables = BlockTables::upload(&device, &BatchTables { block_tables: vec![0], seq_lens: vec![1], max_pages: 1 }, &desc)?;
/// let layout = QueryLayout::decode(&device, 1)?; // one query token, two heads
/// let (q_lat, q_rope) = (DeviceBuffer::from_slice(&device, &[bf16::ONE; 2 * 256])?, DeviceBuffer::from_slice(&device, &[bf16::ONE; 2 * 64])?);
/// let queries = Queries { layout: &layout, q_lat: q_lat.view([1, 2, 256])?, q_rope: q_rope.view([2, 64])? };
/// let o_lat = DeviceBuffer::<bf16>::alloc(&device, 2 * 256)?;
/// let mut scratch = AttentionScratch::new(&device);
/// mla_attention(&cache, &tables, &queries, o_lat.view([1, 2, 256])?, 0.1, None, &mut scratch)?;
/// assert!(o_lat.to_vec()?.iter().all(|&v| v == bf16::from_f32(0.5)));
/// // An output for one head of the two is a typed error:
/// let err = mla_attention(&cache, &tables, &queries, o_lat.view([1, 1, 256])?, 0.1, None, &mut scratch);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn mla_attention(
    cache: &PagedCache,
    tables: &BlockTables,
    queries: &Queries,
    o_lat: TensorView<bf16, 3>,
    softmax_scale: f32,
    num_splits: Option<usize>,
    scratch: &mut AttentionScratch,
) -> Result<AttentionPlan> {
    mla_attention_prefetching(cache, tables, queries, o_lat, softmax_scale, num_splits, scratch, &L2Prefetch::NONE)
}

/// [`mla_attention`] that also pulls `l2_prefetch` (a later kernel's weights, [`super::prefetch`]) into L2 while it
/// runs: at batch 1 the attention is latency-bound and the decode step hands it part of wo's weights. The decode
/// kernels (`mla_attention_{bf16,fp8}`) issue it; the wgmma prefill kernel and the combine ignore it. The same
/// results either way.
#[allow(clippy::too_many_arguments)]
pub fn mla_attention_prefetching(
    cache: &PagedCache,
    tables: &BlockTables,
    queries: &Queries,
    o_lat: TensorView<bf16, 3>,
    softmax_scale: f32,
    num_splits: Option<usize>,
    scratch: &mut AttentionScratch,
    l2_prefetch: &L2Prefetch,
) -> Result<AttentionPlan> {
    tables.check_cache(cache)?;
    let num_seqs = tables.num_seqs();
    let (q_start, heads) = (&queries.layout.host, queries.q_lat.dims()[1]);
    check_len("q_start", q_start.len(), num_seqs + 1)?;
    if heads == 0 || heads > 1 << 16 {
        return Err(Error::InvalidArgument(format!("{heads} heads")));
    }
    if !(softmax_scale.is_finite() && softmax_scale > 0.0) {
        return Err(Error::InvalidArgument(format!("softmax scale {softmax_scale}")));
    }
    let mut max_q = 0usize;
    for (s, (w, &kv_len)) in q_start.windows(2).zip(tables.seq_lens()).enumerate() {
        let q_count = w[1] - w[0];
        if q_count > kv_len {
            return Err(out_of_range(&format!("query tokens of sequence {s}"), q_count as i64, kv_len as usize));
        }
        max_q = max_q.max(q_count as usize);
    }
    let tokens = queries.layout.tokens();
    let rows =
        tokens.checked_mul(heads).filter(|&r| r <= i32::MAX as usize).ok_or_else(|| Error::InvalidArgument(format!("{tokens} tokens x {heads} heads")))?;
    // The kernels index every tensor as packed [rows, width] rows; q goes through 16-byte async copies, o_lat out in
    // 8-byte stores.
    for (what, view, width, align) in [("q_lat", queries.q_lat, KV_LORA_RANK, 16), ("o_lat", o_lat, KV_LORA_RANK, 8)] {
        view.expect_dims(what, [tokens, heads, width])?;
        view.expect_packed(what)?;
        view.expect_aligned(what, align)?;
    }
    queries.q_rope.expect_dims("q_rope", [rows, QK_ROPE])?;
    queries.q_rope.expect_rows_aligned("q_rope", 16)?;
    let q_rope_stride = super::to_i32("q_rope row stride", queries.q_rope.row_stride())?;
    let max_kv =
        if tables.plan_for_capacity { tables.host.max_pages * tables.page_size } else { tables.seq_lens().iter().copied().max().unwrap_or(0) as usize };
    // Prefill on the wgmma kernel when it is chosen (`MlaPrefillKernel`), with its own split count when none is asked
    // for (`wgmma_plan`); decode on the mma.sync kernel (outside `decode_on_wgmma`).
    let wgmma = DECODE_ON_WGMMA.get() == Some(true) || (MlaPrefillKernel::current()? == MlaPrefillKernel::Wgmma && max_q > 1);
    let plan = if wgmma { wgmma_plan(num_seqs, max_q * heads, max_kv, num_splits)? } else { AttentionPlan::new(num_seqs, max_q * heads, max_kv, num_splits)? };
    if tokens == 0 {
        return Ok(plan);
    }
    if num_seqs > u16::MAX as usize {
        return Err(Error::InvalidArgument(format!("{num_seqs} sequences in one launch")));
    }

    let device = o_lat.device();
    let (kernel, score_scale, value_scale) = match (cache.desc.dtype, wgmma) {
        (CacheDtype::Bf16, false) => (ATTENTION_BF16, softmax_scale, 1.0),
        (CacheDtype::Bf16, true) => (ATTENTION_WGMMA_BF16, softmax_scale, 1.0),
        (CacheDtype::Fp8E4m3 { scale }, false) => (ATTENTION_FP8, softmax_scale * scale, scale),
        (CacheDtype::Fp8E4m3 { scale }, true) => (ATTENTION_WGMMA_FP8, softmax_scale * scale, scale),
    };
    // Partials exist only when split (a one-row buffer keeps the pointers valid otherwise).
    let blocks = plan.blocks(num_seqs);
    let form = SplitCombine::current().unwrap_or_else(|| SplitCombine::for_plan(&plan, num_seqs));
    let fused = plan.num_splits > 1 && form == SplitCombine::Fused;
    let split_counters = if fused { scratch.ensure_counters(num_seqs * plan.row_tiles)?.mut_ptr() } else { std::ptr::null_mut() };
    let (partial_o, partial_ml) = scratch.ensure(if plan.num_splits > 1 { plan.num_splits * rows } else { 1 })?;
    let params = MlaAttentionParams {
        q_lat: queries.q_lat.ptr(),
        q_rope: queries.q_rope.ptr(),
        q_rope_stride,
        cache: cache.data.ptr(),
        block_tables: tables.tables.ptr(),
        q_start: queries.layout.q_start.ptr(),
        kv_len: tables.lens.ptr(),
        o_lat: o_lat.mut_ptr(),
        partial_o: partial_o.mut_ptr(),
        partial_ml: partial_ml.mut_ptr(),
        split_counters,
        num_seqs: num_seqs as i32,
        heads: heads as i32,
        max_pages: tables.host.max_pages as i32,
        page_size: cache.desc.page_size as i32,
        num_splits: plan.num_splits as i32,
        tokens_per_split: plan.tokens_per_split as i32,
        row_warps: plan.warps as i32,
        tile_rows: plan.tile_rows as i32,
        total_rows: rows as i32,
        score_scale,
        value_scale,
        l2_prefetch: l2_prefetch.for_grid(blocks as u64),
    };
    let block_warps = if fused && blocks <= SMS { FUSED_BLOCK_WARPS } else { plan.warps };
    let (block, shared_bytes) = if wgmma {
        (WGMMA_THREADS, WGMMA_SHARED_BYTES)
    } else {
        (32 * block_warps as u32, plan.shared_bytes(cache.desc.dtype, block_warps > plan.warps) as u32)
    };
    let config = LaunchConfig { grid: Dim3::xyz(plan.row_tiles as u32, plan.num_splits as u32, num_seqs as u32), block: Dim3::x(block), shared_bytes };
    launch_with(device, &kernel, &config, &params)?;
    if plan.num_splits > 1 && !fused {
        let config = LaunchConfig {
            grid: Dim3::xy(super::blocks_for(max_q * heads, COMBINE_WARPS), num_seqs as u32),
            block: Dim3::x(32 * COMBINE_WARPS as u32),
            shared_bytes: 0,
        };
        launch_with(device, &COMBINE, &config, &params)?;
    }
    Ok(plan)
}
