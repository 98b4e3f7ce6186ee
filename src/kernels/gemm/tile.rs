//! The tile and split choice of a GEMM launch: the tile shapes `cuda/moe_gemm.cu` compiles (decode kernel, narrow,
//! small, prefill), their shared memory and kernel entries, which of them a dense or grouped launch of so many rows
//! runs ([`override_decode_tile`] to force one), and the k splits of a dense matrix's decode launches.

use super::DeviceWeights;
use crate::device::Kernel;
use crate::error::{Error, Result};
use crate::kernels::modules::MOE_GEMM;
use crate::quant::repack::tile_bytes;
use crate::quant::WeightFormat;

/// Warps of every tile's block (128 threads).
pub(super) const WARPS: usize = 4;
/// Bytes of one gathered activation row of a 64-k stage.
const X_ROW_BYTES: usize = 128;
/// The same for e4m3 activations (the W8A8 kernels).
const X_ROW_BYTES_E4M3: usize = 64;

/// The tile shapes compiled for every format (see `cuda/moe_gemm.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::kernels) enum TileShape {
    /// Grouped decode launches of at most [`DECODE_MAX_ROWS`] tokens on a grid the narrow tile would run: 64 features x
    /// 8 pair slots, weights straight from global memory into registers, activations staged once per block
    /// (`decode_gemm` in moe_gemm.cu); the narrow tile's outputs bit for bit.
    Decode,
    /// Decode on a grid too small to fill the GPU: 64 features x 32 pair slots.
    Narrow,
    /// Decode: 128 features x 32 pair slots.
    Small,
    /// Prefill: 128 features x 64 pair slots.
    Tiled,
}

/// Blocks that give every SM of an H100 or H200 (132) two blocks. A decode grid of BM-128 blocks smaller than this
/// (batch 1: 4 experts x 32 column blocks) runs the narrow tile instead, which doubles the blocks. The timing model
/// agrees (`small4 calibrate --predict decode-choices`, docs/perf.md "Decode tile choices"): on the H200 narrow is
/// faster at batch 1 in all five formats (bf16 79.5 vs 96.8 µs) and slower at batch 32 (bf16 1269 vs 1120 µs).
const FULL_GRID_BLOCKS: usize = 2 * crate::kernels::TARGET_SMS;

/// Fewest 64-k blocks one split of a split-K launch reduces: 512 of k, 64 KiB of bf16 weights a block of 64 rows.
/// Its f32 partials, stored and read back once (through L2), are 512 bytes of that at batch 1 and 16 KiB at 32 rows
/// (the narrow tile's most). The decode kernel, which runs the splits of up to 8 rows, pays a fixed cost per block
/// (the activation staging before its k loop, the partials and the last block's sum after it) that shorter splits
/// no longer hide: the timing model puts the latent projection [1344, 4096] at 5.9 µs with 8 splits of 8 k blocks
/// and 6.8 with 12 of 5-6 on an H100 SXM (cold L2, `small4 calibrate --predict decode-choices --only=-cold`,
/// docs/perf.md "Dense decode GEMMs on the decode kernel"; 4 k blocks a split was the narrow tile's minimum).
const MIN_SPLIT_K_BLOCKS: usize = 8;

/// The k splits a dense decode launch of one matrix (`rows_padded` x `k_dim`, 64-feature column blocks: the decode
/// kernel up to 8 rows, the narrow tile up to 32) runs with: as many as keep the column blocks times the splits at
/// most two blocks per SM of an H100 / H200 ([`FULL_GRID_BLOCKS`]: all resident at once), never under
/// [`MIN_SPLIT_K_BLOCKS`] a split, so the latent projection's 22 column blocks get 8 splits (176 blocks), wo's 64
/// get 4 (256), wq_b's 64 (K 1024) 2 (128); 1 when the column blocks alone come to more than one block per SM.
/// The timing model's optimum on the decode kernel at 1 token (H100 SXM, cold L2: `small4 calibrate --predict
/// decode-choices --only=-cold`, docs/perf.md "Dense decode GEMMs on the decode kernel"): latent 5.9 µs at 4 or 8
/// splits, 6.8 at 12; wo 12.2 at 2, 12.3 at 4, 12.4 at 8; wq_b 3.9 at 2, 3.8 at 4. (On the narrow tile, before,
/// it put the optimum at two blocks per SM: section "Split-K for the dense decode GEMMs".)
pub(super) fn decode_k_splits(rows_padded: usize, k_dim: usize) -> usize {
    let column_blocks = (rows_padded / TileShape::Narrow.features()).max(1);
    (FULL_GRID_BLOCKS / column_blocks).min(k_dim / 64 / MIN_SPLIT_K_BLOCKS).max(1)
}

/// f32 values each narrow block of a split-K launch stores as its partial sums (`sum_k_splits` in moe_gemm.cu: a
/// float4 per thread per pair fragment).
pub(super) const SPLIT_PARTIAL_FLOATS: usize = WARPS * 32 * 4 * (32 / 8);

thread_local! {
    /// [`override_decode_tile`]'s choice for this thread. None: `for_decode` / `grouped_tile_shape` decide.
    static DECODE_TILE_OVERRIDE: std::cell::Cell<Option<TileShape>> = const { std::cell::Cell::new(None) };
}

/// Forces the decode tile of this thread's GEMM launches: `"decode"` (the decode kernel where it applies, else the
/// narrow tile), `"narrow"` (BM 64 x 32 slots) or `"small"` (BM 128); `None` gives the choice back to the launcher.
/// For `small4 calibrate` (its cases' `tile=`: the configurations the H200 measured before the current choice, and
/// the alternatives the timing model compares) and for tests that compare the tiles' outputs.
/// `Error::InvalidArgument` for another name.
///
/// ```
/// use small4::kernels::gemm::override_decode_tile;
///
/// override_decode_tile(Some("narrow"))?;
/// override_decode_tile(None)?;
/// assert!(override_decode_tile(Some("wide")).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn override_decode_tile(tile: Option<&str>) -> Result<()> {
    let shape = match tile {
        None => None,
        Some("decode") => Some(TileShape::Decode),
        Some("narrow") => Some(TileShape::Narrow),
        Some("small") => Some(TileShape::Small),
        Some(other) => return Err(Error::InvalidArgument(format!("decode tile {other}: decode, narrow or small"))),
    };
    DECODE_TILE_OVERRIDE.set(shape);
    Ok(())
}

/// Most rows of a launch on the decode kernel: a dense launch's rows, or a grouped launch's tokens (an expert then has
/// at most this many pairs), one mma pair fragment (`kDecodeSlots` in moe_gemm.cu). Decode steps of at most this many
/// tokens are the latency-bound ones (the engine's L2 prefetch plan, `model::decode_prefetch`, applies to them).
pub const DECODE_MAX_ROWS: usize = 8;

/// Dynamic shared memory the decode kernel may take for its activation rows (8 rows x K x 2 bytes): two blocks per
/// SM up to K 7168; the real shapes take 64 KiB (K 4096) and 32 KiB (K 2048).
const DECODE_SHARED_MAX: usize = 112 * 1024;

/// Warps of the decode kernel's `_decode_w2` blocks (`kDecodeWarps` in moe_gemm.cu).
pub(super) const DECODE_W2_WARPS: usize = 2;

/// Most activation-row bytes of a `_decode_w2` block: six of them (the entries' `__launch_bounds__` minimum, 12 warps
/// an SM as three 4-warp blocks) with the driver's 1 KiB a block and the kernel's static shared memory (under 1 KiB)
/// within an SM's 228 KiB. 4 rows at K 4096 (one to three tokens and the zero row), 8 at K 2048.
const DECODE_W2_SHARED_MAX: usize = 36 * 1024;

/// Shared memory the k pipeline may use (`kStageBudget` in moe_gemm.cu).
const STAGE_BUDGET: usize = 96 * 1024;

/// Scale bytes a pipeline stage holds per 16-row weight tile next to its weights (`kScaleBytes` of
/// cuda/include/weight_format.cuh): an fp8-block128 f32 pair (rows g and g + 8's 8-row groups), int4's 16 bf16
/// scales and 16 zero points (reserved when symmetric), nvfp4's 16 rows x 4 k-steps of e4m3.
pub(in crate::kernels) fn staged_scale_bytes(format: WeightFormat) -> usize {
    match format {
        WeightFormat::Bf16 | WeightFormat::Fp8PerTensor => 0,
        WeightFormat::Fp8Block128 => 8,
        WeightFormat::Int4 { .. } => 48,
        WeightFormat::Nvfp4 => 64,
    }
}

impl TileShape {
    /// The tile of a grouping whose tiles are of `tile_m` slots: a divisor of 32 picks the decode tiles (the small
    /// one's 32 slots a block cover whole aligner tiles), else (64) the prefill tile.
    fn for_grouping(tile_m: usize) -> Self {
        if 32 % tile_m == 0 {
            Self::Small
        } else {
            Self::Tiled
        }
    }
    /// Whether a dense tail (a grouped launch's extra blocks) can ride in this tile: the narrow tile and the decode
    /// kernel only (the wider tiles have no registers for it).
    pub(in crate::kernels) fn carries_tail(self) -> bool {
        matches!(self, Self::Narrow | Self::Decode)
    }
    /// Pair slots per block (BN).
    pub(in crate::kernels) fn slots(self) -> usize {
        match self {
            Self::Decode => DECODE_MAX_ROWS,
            Self::Narrow | Self::Small => 32,
            Self::Tiled => 64,
        }
    }
    /// Weight tiles of 16 rows per warp (MF in moe_gemm.cu).
    fn tiles_per_warp(self) -> usize {
        match self {
            Self::Decode | Self::Narrow => 1,
            Self::Small | Self::Tiled => 2,
        }
    }
    /// The small tile, or the narrow one when at most `busy_row_groups` block rows (experts with pairs, or dense row
    /// groups) of BM-128 blocks over `rows_padded` features would not fill the GPU.
    fn for_decode(busy_row_groups: usize, rows_padded: usize) -> Self {
        if let Some(shape) = DECODE_TILE_OVERRIDE.get() {
            return if shape == Self::Small { Self::Small } else { Self::Narrow };
        }
        if busy_row_groups * (rows_padded / Self::Small.features()).max(1) < FULL_GRID_BLOCKS {
            Self::Narrow
        } else {
            Self::Small
        }
    }
    /// Output features per block of [`WARPS`] warps (BM).
    pub(super) fn features(self) -> usize {
        self.block_features(WARPS)
    }
    /// Whether the decode kernel can run a grouped launch of `tokens` tokens over `w` where the narrow tile would:
    /// bf16 activations, at most [`DECODE_MAX_ROWS`] tokens (so at most that many pairs an expert), aligner tiles of at
    /// most [`DECODE_MAX_ROWS`] slots (a block computes the first 8 slots of an expert's group and nothing of the
    /// tiles after it), its activation rows within [`DECODE_SHARED_MAX`].
    fn decode_applies(w: &DeviceWeights, tokens: usize, tile_m: usize, e4m3_input: bool) -> bool {
        !e4m3_input && tokens <= DECODE_MAX_ROWS && tile_m <= DECODE_MAX_ROWS && Self::decode_shared_bytes(DECODE_MAX_ROWS, w.k_dim) <= DECODE_SHARED_MAX
    }
    /// The decode kernel's activation rows for a grouped launch of `tokens` tokens (and a dense tail of `tail_rows`
    /// rows) over `w`: an expert has at most one pair a token, so a block stages at most that many slots and the
    /// zero row its missing slots' lanes read, over the whole k (`decode_gemm` computes at most the slots this holds).
    pub(super) fn grouped_decode_shared_bytes(w: &DeviceWeights, tokens: usize, tail_rows: usize) -> usize {
        Self::decode_shared_bytes((tokens.max(tail_rows) + 1).min(DECODE_MAX_ROWS), w.k_dim)
    }
    /// Warps of a block of this shape's launch: the decode kernel's unsplit launches without a row finisher whose
    /// `blocks` of 4 warps would run in one round (all resident at once) run 2-warp blocks ([`DECODE_W2_WARPS`], the
    /// `_decode_w2` entries) where that gives the busiest SM fewer warp tiles and six of them fit an SM's shared
    /// memory with their `shared_bytes` of activation rows ([`DECODE_W2_SHARED_MAX`]): batch 1's MoE up projection
    /// with the shared expert, 1,280 warp tiles over 132 SMs, puts 12 of them on the busiest SM in 4-warp blocks and
    /// 10 in 2-warp ones (moe_gemm.cu says why that counts); a grid of under one block an SM spreads over twice the
    /// SMs. Every other launch runs [`WARPS`], because there the timing model and the interpreter found 2-warp blocks
    /// cost more than they gain (H100 SXM; docs/perf.md "The decode kernel in 2-warp blocks"):
    /// - where the busiest SM gains nothing (256 blocks of 4 warps, 2 an SM, and 512 of 2, 4 an SM, are 8 warp tiles
    ///   each), they only re-read each block's activation rows twice as often (L2 traffic: the 4-expert nvfp4 layer's
    ///   up projection 1.059 -> 1.115 x its ideal bytes, tests/moe.rs `decode_traffic_nvfp4`);
    /// - a launch of several rounds spreads its blocks as they finish, and 2-warp blocks only add per-block work: the
    ///   output head ([131072, 4096] bf16, 2,048 blocks) 373.6 -> 379.2 µs (`small4 calibrate --predict
    ///   decode-choices --only dense-head`);
    /// - a row finisher (`finishes_rows`) runs on the block that completes a row, and with half the threads its pass
    ///   over the row's columns is twice as long: the batch-1 nvfp4 down projection with the combine + add + norm
    ///   finisher 13.9 -> 16.9 µs, its longest block's chain 17 -> 25 global round trips (`small4 calibrate --predict
    ///   decode-choices --only moe-nvfp4-t1-decode-norm --terms`).
    pub(super) fn block_warps(self, split: bool, finishes_rows: bool, shared_bytes: usize, blocks: usize) -> usize {
        let sms = crate::kernels::TARGET_SMS;
        let one_round = blocks <= Self::decode_one_round_blocks(false, WARPS);
        // Warp tiles of the busiest SM, the blocks dealt out evenly.
        let busiest = |warps: usize| (blocks * WARPS / warps).div_ceil(sms) * warps;
        let balances = busiest(DECODE_W2_WARPS) < busiest(WARPS);
        if self == Self::Decode && !split && !finishes_rows && one_round && balances && shared_bytes <= DECODE_W2_SHARED_MAX {
            DECODE_W2_WARPS
        } else {
            WARPS
        }
    }
    /// Output features of a block of `warps` warps (BM).
    pub(super) fn block_features(self, warps: usize) -> usize {
        warps * self.tiles_per_warp() * 16
    }
    /// Blocks of `warps` warps of a decode-kernel launch (split-K entries when `split`) that are all resident at once
    /// on an H100 / H200: the SMs times the blocks per SM the entries' `__launch_bounds__` guarantee (`_decode` 3,
    /// `_decode_w2` 6, `_decode_split` 2).
    pub(super) fn decode_one_round_blocks(split: bool, warps: usize) -> usize {
        let per_sm = match (split, warps) {
            (true, _) => 2,
            (false, DECODE_W2_WARPS) => 6,
            (false, _) => 3,
        };
        crate::kernels::TARGET_SMS * per_sm
    }
    /// The same for a dense launch of `rows` rows over `w` (one block row of 8 slots, its activations over the
    /// longest k split).
    fn decode_applies_dense(w: &DeviceWeights, rows: usize, e4m3_input: bool) -> bool {
        !e4m3_input && rows <= DECODE_MAX_ROWS && Self::dense_decode_shared_bytes(w, rows) <= DECODE_SHARED_MAX
    }
    /// The decode kernel's dynamic shared memory: `rows` activation rows over `k` (a grouped launch: 8 rows over the
    /// whole k, whatever its tiles hold).
    fn decode_shared_bytes(rows: usize, k: usize) -> usize {
        rows * k * 2
    }
    /// A dense decode launch's: its rows and the zero row the missing slots' lanes read (at most 8 in all, as
    /// `decode_gemm` stages them) over the longest of `w`'s k splits (`k_blocks * (split + 1) / splits` less
    /// `k_blocks * split / splits`: at most the ceiling of k_blocks / splits).
    pub(super) fn dense_decode_shared_bytes(w: &DeviceWeights, rows: usize) -> usize {
        let longest_split = (w.k_dim / 64).div_ceil(w.decode_k_splits()) * 64;
        Self::decode_shared_bytes((rows + 1).min(DECODE_MAX_ROWS), longest_split)
    }
    /// Deepest k pipeline (the `max_stages` of `stages_for` in moe_gemm.cu, which says why).
    fn max_stages(self) -> usize {
        match self {
            Self::Decode | Self::Narrow => 16,
            Self::Small | Self::Tiled => 8,
        }
    }
    /// Pipeline stages: as many as fit the budget, 2 to `max_stages` (`stages_for` in moe_gemm.cu); the decode
    /// kernel's activation rows.
    pub(super) fn shared_bytes(self, format: WeightFormat, e4m3_input: bool, k_dim: usize) -> usize {
        if self == Self::Decode {
            return Self::decode_shared_bytes(DECODE_MAX_ROWS, k_dim);
        }
        let x_row = if e4m3_input { X_ROW_BYTES_E4M3 } else { X_ROW_BYTES };
        let stage = WARPS * self.tiles_per_warp() * tile_bytes(format) + self.slots() * x_row;
        let stages = (STAGE_BUDGET / stage).clamp(2, self.max_stages());
        // The staged weight scales come on top of the budget (moe_gemm.cu says why).
        stages * (stage + WARPS * self.tiles_per_warp() * staged_scale_bytes(format)) + self.slots() * 4
    }
    /// The narrow tile's or the decode kernel's split-K kernel for `format` weights (bf16 inputs): the only kernels
    /// that read `MoeGemmParams.k_splits`; the others compile no split path. None for the other shapes.
    pub(super) fn split_k_kernel(self, format: WeightFormat) -> Option<Kernel> {
        let entry = match (format, self) {
            (WeightFormat::Bf16, Self::Narrow) => "moe_gemm_bf16_narrow_split",
            (WeightFormat::Fp8PerTensor, Self::Narrow) => "moe_gemm_fp8_narrow_split",
            (WeightFormat::Fp8Block128, Self::Narrow) => "moe_gemm_fp8_block_narrow_split",
            (WeightFormat::Int4 { .. }, Self::Narrow) => "moe_gemm_int4_narrow_split",
            (WeightFormat::Nvfp4, Self::Narrow) => "moe_gemm_nvfp4_narrow_split",
            (WeightFormat::Bf16, Self::Decode) => "moe_gemm_bf16_decode_split",
            (WeightFormat::Fp8PerTensor, Self::Decode) => "moe_gemm_fp8_decode_split",
            (WeightFormat::Fp8Block128, Self::Decode) => "moe_gemm_fp8_block_decode_split",
            (WeightFormat::Int4 { .. }, Self::Decode) => "moe_gemm_int4_decode_split",
            (WeightFormat::Nvfp4, Self::Decode) => "moe_gemm_nvfp4_decode_split",
            (_, Self::Small | Self::Tiled) => return None,
        };
        Some(Kernel { module: MOE_GEMM, entry })
    }
    /// The decode kernel's 2-warp entry for `format` weights (bf16 inputs): [`TileShape::block_warps`] says when.
    pub(super) fn decode_w2_kernel(format: WeightFormat) -> Kernel {
        let entry = match format {
            WeightFormat::Bf16 => "moe_gemm_bf16_decode_w2",
            WeightFormat::Fp8PerTensor => "moe_gemm_fp8_decode_w2",
            WeightFormat::Fp8Block128 => "moe_gemm_fp8_block_decode_w2",
            WeightFormat::Int4 { .. } => "moe_gemm_int4_decode_w2",
            WeightFormat::Nvfp4 => "moe_gemm_nvfp4_decode_w2",
        };
        Kernel { module: MOE_GEMM, entry }
    }
    /// The kernel for `format` weights with bf16 inputs, or the W8A8 kernel with e4m3 inputs (per-tensor fp8 weights
    /// only; the launcher checks).
    pub(super) fn kernel(self, format: WeightFormat, e4m3_input: bool) -> Kernel {
        if e4m3_input {
            let entry = match self {
                Self::Decode | Self::Narrow => "moe_gemm_fp8_act_narrow",
                Self::Small => "moe_gemm_fp8_act_small",
                Self::Tiled => "moe_gemm_fp8_act_tiled",
            };
            return Kernel { module: MOE_GEMM, entry };
        }
        let entry = match (format, self) {
            (WeightFormat::Bf16, Self::Decode) => "moe_gemm_bf16_decode",
            (WeightFormat::Bf16, Self::Narrow) => "moe_gemm_bf16_narrow",
            (WeightFormat::Bf16, Self::Small) => "moe_gemm_bf16_small",
            (WeightFormat::Bf16, Self::Tiled) => "moe_gemm_bf16_tiled",
            (WeightFormat::Fp8PerTensor, Self::Decode) => "moe_gemm_fp8_decode",
            (WeightFormat::Fp8PerTensor, Self::Narrow) => "moe_gemm_fp8_narrow",
            (WeightFormat::Fp8PerTensor, Self::Small) => "moe_gemm_fp8_small",
            (WeightFormat::Fp8PerTensor, Self::Tiled) => "moe_gemm_fp8_tiled",
            (WeightFormat::Fp8Block128, Self::Decode) => "moe_gemm_fp8_block_decode",
            (WeightFormat::Fp8Block128, Self::Narrow) => "moe_gemm_fp8_block_narrow",
            (WeightFormat::Fp8Block128, Self::Small) => "moe_gemm_fp8_block_small",
            (WeightFormat::Fp8Block128, Self::Tiled) => "moe_gemm_fp8_block_tiled",
            (WeightFormat::Int4 { .. }, Self::Decode) => "moe_gemm_int4_decode",
            (WeightFormat::Int4 { .. }, Self::Narrow) => "moe_gemm_int4_narrow",
            (WeightFormat::Int4 { .. }, Self::Small) => "moe_gemm_int4_small",
            (WeightFormat::Int4 { .. }, Self::Tiled) => "moe_gemm_int4_tiled",
            (WeightFormat::Nvfp4, Self::Decode) => "moe_gemm_nvfp4_decode",
            (WeightFormat::Nvfp4, Self::Narrow) => "moe_gemm_nvfp4_narrow",
            (WeightFormat::Nvfp4, Self::Small) => "moe_gemm_nvfp4_small",
            (WeightFormat::Nvfp4, Self::Tiled) => "moe_gemm_nvfp4_tiled",
        };
        Kernel { module: MOE_GEMM, entry }
    }
}

/// Whether a dense GEMM launch over `rows` rows takes the prefill tile (more rows than the decode tiles' 32):
/// the launches [`crate::kernels::moe_wgmma::PrefillGemm`] chooses a kernel for.
///
/// ```
/// use small4::kernels::gemm::dense_takes_prefill_tile;
///
/// assert!(!dense_takes_prefill_tile(32) && dense_takes_prefill_tile(33));
/// ```
pub fn dense_takes_prefill_tile(rows: usize) -> bool {
    rows > TileShape::Small.slots()
}

/// The tile a grouped launch of `tokens` tokens over `w` runs, the grouping's tiles being of `tile_m` slots: the
/// aligner's prefill tile ([`TileShape::for_grouping`]), or the decode tile for
/// `busy` busy experts (plus a dense tail) over `w.rows_padded` features, where the narrow tile becomes the decode
/// kernel when that applies ([`TileShape::decode_applies`]: up to 8 tokens). The timing model predicts the decode
/// kernel faster than the narrow tile at batch 1 in every format (`small4 calibrate --predict decode-choices --only
/// moe-`, docs/perf.md "The decode kernel").
pub(in crate::kernels) fn grouped_tile_shape(tile_m: usize, busy: usize, w: &DeviceWeights, tokens: usize, e4m3_input: bool) -> TileShape {
    if TileShape::for_grouping(tile_m) == TileShape::Tiled {
        return TileShape::Tiled;
    }
    decode_tile_shape(busy, w.rows_padded, TileShape::decode_applies(w, tokens, tile_m, e4m3_input))
}

/// The tile a dense launch of `rows` rows over `w` runs: the prefill tile above [`TileShape::Small`]'s slots, else
/// the decode kernel when it applies ([`TileShape::decode_applies_dense`]: up to 8 rows, split-K included), else the
/// decode tile for one row group. The decode kernel also for outputs wide enough for the BM-128 tile: the timing
/// model predicts it faster on the output head, [131072, 4096] bf16 at 1 token, 404.0 -> 373.6 µs on an H100 SXM
/// (`small4 calibrate --predict decode-choices --only dense-head`, docs/perf.md "Dense decode GEMMs on the decode
/// kernel"); the narrow tile and split-K below it, as [`decode_k_splits`] says.
pub(super) fn dense_tile_shape(w: &DeviceWeights, rows: usize, e4m3_input: bool) -> TileShape {
    if dense_takes_prefill_tile(rows) {
        return TileShape::Tiled;
    }
    let decode = TileShape::decode_applies_dense(w, rows, e4m3_input);
    match DECODE_TILE_OVERRIDE.get() {
        None if decode => TileShape::Decode,
        _ => decode_tile_shape(1, w.rows_padded, decode),
    }
}

/// The decode tile for `busy` block rows over `rows_padded` features ([`TileShape::for_decode`]), the narrow tile
/// replaced by the decode kernel when `decode` (it applies); [`override_decode_tile`]'s choice first.
fn decode_tile_shape(busy: usize, rows_padded: usize, decode: bool) -> TileShape {
    match DECODE_TILE_OVERRIDE.get() {
        Some(TileShape::Decode) if decode => TileShape::Decode,
        Some(TileShape::Small) => TileShape::Small,
        Some(_) => TileShape::Narrow,
        None => match TileShape::for_decode(busy, rows_padded) {
            TileShape::Narrow if decode => TileShape::Decode,
            shape => shape,
        },
    }
}
