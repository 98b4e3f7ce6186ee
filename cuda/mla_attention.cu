// Paged MLA attention in the absorbed (latent) form: the cache writer, one tensor-core attention tile kernel that
// serves both decode and chunked prefill (with split-KV), and the deterministic split combine.
//
// Why one tile kernel for decode and prefill: in MLA every head reads the SAME cache row (320 values), so the heads of
// a query token are the M dimension of a matrix product against the cache, exactly like the query tokens of a prefill
// chunk. A block takes up to 64 query rows, row = (query token, head) flattened token-major, and streams the cache
// through shared memory once for all of them (FlashMLA does the same with 64 heads per block). Decode with 32 heads:
// one block of 2 warps holds all 32 heads of a sequence, so each cache byte is read once per KV split (a model with
// more than 64 heads would need several row tiles, each re-reading the cache).
//
// Why W_UK (q_nope -> q_lat) and W_UV (o_lat -> v) stay outside: they are per-head dense products whose weights
// (W_UK 32 x 64 x 256 + W_UV 32 x 256 x 128 bf16 = 3 MiB per layer) would be re-read by every (sequence, split)
// block if fused here, while as batched GEMMs they are read once per step; the kernel then moves only cache + q + o
// bytes. The llama-4 query scale is already in q_lat and q_rope.
//
// Tiling of mla_attention_*: block = 32 * W threads (W = 1..4 warps, 16 query rows per warp; with the split combine
// fused into a grid of at most one block per SM, helper warps up to 8 in all that issue the tile loads and share the combine),
// grid = (row tiles, splits, sequences); a row tile is p.tile_rows rows: 16W, or 8 with W = 1 at the smallest grids
// (decode of one sequence: the fused combine's partials spread over twice the blocks; rows 8-15 are padding). Q [16W x
// 320] sits in shared memory (padded rows, conflict-free ldmatrix); the cache streams in tiles of 32 tokens x 320
// with cp.async (fp8: raw bytes staged, then widened to bf16 in shared memory) through one of two pipelines
// (SplitLayout): with helper warps loading, 2 stages and one block barrier a tile; without (every warp loads and
// computes: the grids of more than one block per SM and unsplit launches), the warp ring: 3 stages (fp8: 2 raw and 2
// widened) handed over by a "full" mbarrier a stage, no block barrier in the tile loop. Per tile and warp: S = Q K^T with mma.sync m16n8k16 (20 k-steps x 4 n-tiles, B fragments by ldmatrix),
// online softmax in f32 (exp2, scale folded), O += P V with P re-packed from the S accumulators (no shared memory
// round trip) and V fragments by ldmatrix.trans; O [16 x 256] f32 lives in registers (128 per thread). The masking,
// softmax, P packing and store are cuda/include/mla_attention.cuh, shared with the prefill's wgmma kernel
// (cuda/mla_attention_wgmma.cu), which computes the same outputs bit for bit on the interpreter.
// Bytes: cache 320 x (2 | 1) per token per split block, q 640 B and o 512 B per row (+ 2 x 1 KiB partials per row and
// split when split: written by the split blocks, read by the combine). FLOPs: 2 x rows x tokens x (320 + 256).
// Split combine: fused (p.split_counters set), the last split block of each (sequence, row tile) combines the tile's
// rows at the end of the launch (attention_tile); else mla_attention_combine as a second launch.
// Both are programmatic launches (common.cuh) that wait for the kernel before them first: everything they read
// (lengths, tables, q, the cache row just written, the partials) is an earlier kernel's output.
#include "params.h"
#include "common.cuh"
#include "l2_prefetch.cuh"
#include "mma.cuh"
#include "hopper.cuh"
#include "mla_cache.cuh"
#include "quant.cuh"
#include "mla_attention.cuh"
#include <cuda_fp8.h>

namespace {
using namespace mla_tile;

constexpr int kRowStride = kWidth + 8;           // padded shared-memory row (bf16): 656 B, rows 16 B apart in banks
constexpr int kRowsPerWarp = 16;
constexpr int kMaxWarps = 4;                     // warps that own query rows
constexpr int kMaxBlockWarps = 8;                // with the fused combine's helper warps
static_assert(kMaxWarps <= kMaxBlockWarps, "row warps fit the launch bounds");

}  // namespace

// ================================================================================================================
// mla_cache_write: cuda/include/mla_cache.cuh's cache_write, one warp per token (blocks of 4 warps). The GEMM row
// finisher of the latent projection (cuda/moe_gemm.cu) runs the same function on the rows it finishes.
// ================================================================================================================
template <bool kFp8>
__device__ __forceinline__ void cache_write_warp(const MlaCacheWriteParams &p) {
    const int token = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (token < p.tokens) cache_write<kFp8>(p, token);
}
extern "C" __global__ void mla_cache_write_bf16(const MlaCacheWriteParams p) { cache_write_warp<false>(p); }
extern "C" __global__ void mla_cache_write_fp8(const MlaCacheWriteParams p) { cache_write_warp<true>(p); }

// ================================================================================================================
// mla_copy_pages: one block per page copy, 16-byte vectors strided over the page. Bytes: 2 x page_bytes per copy.
// ================================================================================================================
extern "C" __global__ void mla_copy_pages(const MlaCopyPagesParams p) {
    const int src = p.pairs[2 * blockIdx.x], dst = p.pairs[2 * blockIdx.x + 1];
    const uint4 *from = reinterpret_cast<const uint4 *>(reinterpret_cast<const char *>(p.cache) + (long)src * p.page_bytes);
    uint4 *to = reinterpret_cast<uint4 *>(reinterpret_cast<char *>(p.cache) + (long)dst * p.page_bytes);
    for (int i = threadIdx.x; i < p.page_bytes / 16; i += blockDim.x) to[i] = from[i];
}

// ================================================================================================================
// mla_attention: see the file comment. Dynamic shared memory (bytes):
//   Q [16W][kRowStride] bf16, then 2 stages of [kTileN] cache rows (bf16: padded bf16 rows that the mma reads;
//   fp8: raw 320-byte rows), then for fp8 one widened bf16 tile [kTileN][kRowStride].
// ================================================================================================================
namespace {

// The shared memory after Q of a split block (the host's `AttentionPlan::shared_bytes` mirrors it). Two pipelines:
// - helper loads (kRing false; grids of at most one block per SM, whose helper warps issue the copies): 2 cache stages
//   (fp8: raw bytes, then one widened bf16 tile); one block barrier a tile.
// - the warp ring (kRing true; every warp issues copies and computes): a ring of kSlots slots, each with a "full"
//   mbarrier that every warp arrives on once its own copies of the slot's tile have landed (fp8: once it has widened
//   them), and that every warp waits on before reading the tile: one rendezvous a tile, no block barrier. A warp
//   refills a slot only after the wait for the tile after it, which every warp arrived on after reading the slot's
//   last tile; so while tile t is read, t + 1 flies and t + 2 is issued into the slot tile t - 1 left. bf16: 3 cache
//   slots. fp8: 2 raw slots (each thread widens only the bytes its own copies wrote, so a raw slot is private to its
//   threads and is free once they widened it) and 2 widened tiles (the slot read while the other is filled: each thread
//   widens its units of tile t + 1 inside tile t's S product, off the rendezvous; attend_split proves the reuse).
template <bool kFp8, bool kRing>
struct SplitLayout {
    static constexpr int kStageBytes = kFp8 ? kTileN * kWidth : kTileN * kRowStride * 2;
    static constexpr int kStages = kRing && !kFp8 ? 3 : 2;
    static constexpr int kWideBytes = kTileN * kRowStride * 2;
    static constexpr int kWideTiles = kFp8 ? (kRing ? 2 : 1) : 0;
    static constexpr int kFullBarriers = kRing ? kStages : 0;  // a "full" mbarrier a ring slot
    static constexpr int kBytes = kStages * kStageBytes + kWideTiles * kWideBytes + kFullBarriers * 8;
    static_assert((kStages * kStageBytes + kWideTiles * kWideBytes) % 8 == 0, "mbarriers on 8 bytes");
};

// The block-table entry (physical page) of cache token tile_start + lane, or 0 for a token at or past `bound` (its
// entry is never read). Each warp reads a tile's entries once, one per lane; the split loop reads the next tile's while
// the current one computes and turns the page into a slot only when it issues that tile's copies (tile_slot), so no
// instruction waits for the table load on the per-tile chain. The first two tiles' entries are read at the top of the
// block, bounded by the table row alone (`table_tokens`), so they fly with the sequence's q_start and kv_len loads
// instead of after them.
__device__ __forceinline__ int tile_page(const MlaAttentionParams &p, int seq, int tile_start, int bound) {
    static_assert(kTileN == 32, "one block-table entry per lane");
    const int pos = tile_start + (threadIdx.x & 31);
    return pos < bound ? p.block_tables[(long)seq * p.max_pages + pos / p.page_size] : 0;
}
// The physical slot (page * page_size + offset) of cache token tile_start + lane, from its tile_page entry; a token at
// or past `end` takes slot offset 0 of page 0 (its copy reads nothing: load_cache_tile zero-fills it), whatever its
// table entry holds.
__device__ __forceinline__ int tile_slot(const MlaAttentionParams &p, int page, int tile_start, int end) {
    const int pos = tile_start + (threadIdx.x & 31);
    return pos < end ? page * p.page_size + pos % p.page_size : 0;
}

// Issues the cp.async loads of cache tokens [tile_start, tile_start + kTileN) into a stage; tokens at or past `end`
// are zero-filled in shared memory and never read from global memory (their page slots may hold anything).
// `my_slot` is tile_slot's for this tile (lane i: token i). A warp request moves 64 contiguous bytes (4 lanes x 16)
// of each of 8 tokens: 16 full sectors, as many as 512 contiguous bytes. The tile is 4 token groups x kColGroups
// column groups of such requests; loading warp w (of `warps`, the warps issuing this tile) takes units w, w + warps,
// ...; every thread takes its 4 tokens' slots by shuffle once per tile, not once per copy. Branch-free (src-size
// copies zero-fill the tokens past `end`).
constexpr int kTokenGroups = kTileN / 8;

// This thread's 16-byte piece of tile unit `unit`: a unit is 8 tokens (token group `group`) x 64 bytes of their rows.
struct TileUnitPiece {
    int group, tok, byte;  // token group, token within the tile, byte within the row
};
__device__ __forceinline__ TileUnitPiece tile_unit_piece(int unit) {
    const int lane = threadIdx.x & 31;
    const int group = unit % kTokenGroups;
    return {group, (lane >> 2) + 8 * group, unit / kTokenGroups * 64 + (lane & 3) * 16};
}

// This thread's 16-byte pieces of a tile's copies (load_cache_tile): f(token group, token, byte within the row) for
// the units of loading warp `warp` of `warps` (units warp, warp + warps, ...; a later first unit of the warp's skips
// the ones before it), kUnroll units a loop trip (their loads then overlap on the chain).
template <bool kFp8, int kUnroll, class F>
__device__ __forceinline__ void for_each_tile_unit(int warp, int warps, F &&f) {
    constexpr int kRowBytes = kWidth * CacheElem<kFp8>::kBytes;  // a cache row in global memory
    constexpr int kColGroups = kRowBytes / 64;
    static_assert(kRowBytes % 64 == 0 && kTokenGroups == 4, "64-byte column groups, 4 token groups of 8");
#pragma unroll kUnroll
    for (int unit = warp; unit < kTokenGroups * kColGroups; unit += warps) {
        const TileUnitPiece piece = tile_unit_piece(unit);
        f(piece.group, piece.tok, piece.byte);
    }
}

template <bool kFp8>
__device__ __forceinline__ void load_cache_tile(const MlaAttentionParams &p, int my_slot, int tile_start, int end, char *stage, int warp, int warps) {
    constexpr int kRowBytes = kWidth * CacheElem<kFp8>::kBytes;
    constexpr int kDstRowBytes = kFp8 ? kWidth : kRowStride * 2;
    const char *cache = reinterpret_cast<const char *>(p.cache);
    const int tok_lo = (threadIdx.x & 31) >> 2;
    int slot[kTokenGroups];
#pragma unroll
    for (int j = 0; j < kTokenGroups; ++j) slot[j] = __shfl_sync(0xffffffffu, my_slot, tok_lo + 8 * j);
    for_each_tile_unit<kFp8, 1>(warp, warps, [&](int group, int tok, int byte) {
        int s = slot[0];
#pragma unroll
        for (int j = 1; j < kTokenGroups; ++j) s = group == j ? slot[j] : s;
        cp_async16_zfill(stage + tok * kDstRowBytes + byte, cache + (long)s * kRowBytes + byte, tile_start + tok < end);
    });
}

// 8 e4m3 values -> 8 bf16 (the one conversion of both widening forms below).
__device__ __forceinline__ uint4 widen_fp8x8(uint2 raw) {
    return make_uint4(e4m3x2_to_bf16x2(raw.x & 0xffff), e4m3x2_to_bf16x2(raw.x >> 16), e4m3x2_to_bf16x2(raw.y & 0xffff), e4m3x2_to_bf16x2(raw.y >> 16));
}

// fp8 stage (raw [kTileN][320] bytes) -> bf16 tile [kTileN][kRowStride] by the whole block; 8 values per thread step.
__device__ __forceinline__ void widen_fp8_tile(const char *stage, bf16 *wide) {
    for (int idx = threadIdx.x; idx < kTileN * kWidth / 8; idx += blockDim.x) {
        const int tok = idx / (kWidth / 8), col = (idx % (kWidth / 8)) * 8;
        *reinterpret_cast<uint4 *>(wide + tok * kRowStride + col) = widen_fp8x8(*reinterpret_cast<const uint2 *>(stage + tok * kWidth + col));
    }
}

// The warp ring's fp8 widening: the 16-byte pieces this thread's own copies wrote into `stage` (the units of
// load_cache_tile for loading warp `warp` of `warps`) -> bf16 at the same tokens and columns of `wide`. After this
// thread's cp.async.wait_group, without a barrier: no other thread reads or writes those raw bytes.
__device__ __forceinline__ void widen_own_fp8_unit(const char *stage, bf16 *wide, int tok, int byte) {
    const uint4 raw = *reinterpret_cast<const uint4 *>(stage + tok * kWidth + byte);
    uint4 *dst = reinterpret_cast<uint4 *>(wide + tok * kRowStride + byte);
    dst[0] = widen_fp8x8(make_uint2(raw.x, raw.y));
    dst[1] = widen_fp8x8(make_uint2(raw.z, raw.w));
}
// The units of this thread's that widen_own_fp8_units_branch_free (in the S product's straight-line code) covers:
// all of them at 2 or more warps (20 units: 10, 7 or 5 a thread); at 1 warp the other 10 follow in a loop.
constexpr int kBranchFreeWidenUnits = 10;
// Every unit of this thread's from its `first_slot`-th on (slot k: unit warp + k x warps), in a loop (branches).
__device__ __forceinline__ void widen_own_fp8_units(const char *stage, bf16 *wide, int warp, int warps, int first_slot) {
    for_each_tile_unit<true, 4>(warp + first_slot * warps, warps, [&](int, int tok, int byte) { widen_own_fp8_unit(stage, wide, tok, byte); });
}
// This thread's unit slots 0 .. kBranchFreeWidenUnits - 1 without a branch, so that they sit in one basic block with
// the S product's 20 dependent mma.sync and issue while those wait for each other (~600 cycles of latency against
// ~140 instructions): the widening then costs the tile's chain (nearly) nothing. A slot past the thread's last unit
// (3 or fewer warps' remainder: at 3 warps 3 or 4 slots, at 4 warps 5) widens the thread's last real unit again: the
// same bytes to the same place by the same thread, no other thread's data touched.
__device__ __forceinline__ void widen_own_fp8_units_branch_free(const char *stage, bf16 *wide, int warp, int warps) {
    constexpr int kUnits = kTokenGroups * (kWidth / 64);  // for_each_tile_unit's units of an fp8 tile
    static_assert(kUnits == 20, "an fp8 tile is 20 units of 32 lanes x 16 bytes");
    const int last_unit = warp + (kUnits - 1 - warp) / warps * warps;
#pragma unroll
    for (int k = 0; k < kBranchFreeWidenUnits; ++k) {
        const TileUnitPiece piece = tile_unit_piece(min(warp + k * warps, last_unit));
        widen_own_fp8_unit(stage, wide, piece.tok, piece.byte);
    }
}

// The attention of one split block over keys [split_begin, kv_end) (non-empty): rows row0.. of sequence seq; writes
// o_lat (one split) or the split's f32 partials. first_pages: tile_page of the split's first two tiles (bounded by the
// table row). kRing: the pipeline (SplitLayout): the warp ring when every warp owns rows, helper loads otherwise.
template <bool kFp8, bool kRing>
__device__ __forceinline__ void attend_split(const MlaAttentionParams &p, int seq, int split, int q_begin, int q_count, int first_pos, int row0,
                                             int split_begin, int kv_end, const int (&first_pages)[2]) {
    using Layout = SplitLayout<kFp8, kRing>;
    extern __shared__ __align__(16) char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // Q rows in shared memory: 16 a row warp, of which the tile's first p.tile_rows are its rows (the rest zero).
    const int q_rows = p.row_warps * kRowsPerWarp;
    const int rows_here = min(p.tile_rows, q_count * p.heads - row0);  // rows of this tile that exist
    // Warps past p.row_warps own no rows (the fused combine's helpers, never in the warp ring): they share the loads
    // and barriers only.
    const bool owns_rows = warp < p.row_warps;
    const int warps = blockDim.x >> 5;

    bf16 *q_smem = reinterpret_cast<bf16 *>(smem);
    char *stages = smem + q_rows * kRowStride * 2;
    bf16 *wide = reinterpret_cast<bf16 *>(stages + Layout::kStages * Layout::kStageBytes);
    uint64_t *full = reinterpret_cast<uint64_t *>(reinterpret_cast<char *>(wide) + Layout::kWideTiles * Layout::kWideBytes);
    if constexpr (kRing) {
        if (threadIdx.x == 0) {
#pragma unroll
            for (int slot = 0; slot < Layout::kFullBarriers; ++slot) mbar_init(&full[slot], warps);
        }
    }

    // Q rows [q_lat 256 | q_rope 64] into shared memory (rows past the tile's or the sequence's are zero).
    for (int idx = threadIdx.x; idx < q_rows * (kWidth / 8); idx += blockDim.x) {
        const int r = idx / (kWidth / 8), col = (idx % (kWidth / 8)) * 8, row = row0 + r;
        bf16 *dst = q_smem + r * kRowStride + col;
        if (r < rows_here) {
            const long grow = (long)q_begin * p.heads + row;
            const bf16 *src = col < kLatent ? p.q_lat + grow * kLatent + col : p.q_rope + (long)grow * p.q_rope_stride + (col - kLatent);
            cp_async16(dst, src);
        } else {
            *reinterpret_cast<uint4 *>(dst) = make_uint4(0, 0, 0, 0);
        }
    }
    const int tiles = (kv_end - split_begin + kTileN - 1) / kTileN;
    // The warps that issue copies: the helper warps when the block has them (after the tile's barrier, while the row
    // warps compute: the row warps' per-tile chain is then the tile's arithmetic alone); in the warp ring every warp.
    const int first_loader = kRing ? 0 : p.row_warps;
    int next_page = first_pages[1];  // the pages of the tile issue() loads next
    const auto issue = [&](int t) {  // copies of tile t (from the second on) into its stage
        const int start = split_begin + t * kTileN;
        load_cache_tile<kFp8>(p, tile_slot(p, next_page, start, kv_end), start, kv_end, stages + (t % Layout::kStages) * Layout::kStageBytes,
                              warp - first_loader, warps - first_loader);
        cp_async_commit();
        next_page = tile_page(p, seq, start + kTileN, kv_end);
    };
    // Tile 0 (with Q: one copy group) by every warp; in the warp ring tile 1 too, the ring's first two slots.
    load_cache_tile<kFp8>(p, tile_slot(p, first_pages[0], split_begin, kv_end), split_begin, kv_end, stages, warp, warps);
    cp_async_commit();
    if constexpr (kRing) {
        if (tiles > 1) issue(1);
        if constexpr (kFp8) {  // tile 0's own units widened before the loop; the loop widens tile t + 1 during tile t
            if (tiles > 1) {
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            widen_own_fp8_units(stages, wide, warp, warps, 0);
        }
        __syncthreads();  // the mbarriers' initialisation before any arrival
    }

    // This thread's two accumulator rows (g and g + 8 of the warp's 16) and the positions they may attend to.
    const int g = lane >> 2, quad = lane & 3;
    RowState state{{-INFINITY, -INFINITY}, {0.f, 0.f}, {-1, -1}};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int r = warp * kRowsPerWarp + g + 8 * h;
        state.pos[h] = r < rows_here ? first_pos + (row0 + r) / p.heads : -1;  // -1: padding row, sees nothing
    }
    const float score_scale = p.score_scale * kLog2e;
    float o[kLatent / 8][4];
#pragma unroll
    for (int n = 0; n < kLatent / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

    // The warp ring's rendezvous on tile t: this warp arrives on the slot's "full" (one elected lane, after every lane
    // of the warp is done) and waits for every warp's arrival.
    const auto arrive_and_wait_full = [&](int t) {
        __syncwarp();
        if (elect_one_sync()) mbar_arrive(&full[t % Layout::kStages]);
        mbar_wait(&full[t % Layout::kStages], (t / Layout::kStages) & 1);
    };
    // This lane's A-fragment row address of the warp's Q rows (ldmatrix_x4_at adds each k-step's offset).
    const uint32_t q_frag = smem_addr(q_smem + (warp * kRowsPerWarp + (lane & 15)) * kRowStride + (lane >> 4) * 8);
    for (int t = 0; t < tiles; ++t) {
        const int tile_start = split_begin + t * kTileN;
        const int slot = t % Layout::kStages;
        const bf16 *kv;
        if constexpr (kRing && !kFp8) {
            // This thread's copies of tile t landed (tile t + 1's fly on). Its warp then arrives on the slot's "full"
            // and waits for every warp's arrival: the tile is complete, and every warp has finished tile t - 1, so
            // tile t + 2 may go into the slot tile t - 1 left.
            if (t + 1 < tiles) {
                cp_async_wait<1>();
            } else {
                cp_async_wait<0>();
            }
            arrive_and_wait_full(t);
            if (t + 2 < tiles) issue(t + 2);
            kv = reinterpret_cast<const bf16 *>(stages + slot * Layout::kStageBytes);
        } else if constexpr (kRing) {
            // fp8: this thread widened its own units of tile t during tile t - 1 (tile 0: before the loop). Its warp
            // arrives on the slot's "full" and waits for every warp's arrival: wide tile t is complete, and every
            // warp has finished tile t - 1 (it arrived after it). So (1) tile t + 2's copies may go into raw slot t % 2:
            // it held tile t, whose bytes are this thread's own and widened; (2) wide tile (t + 1) % 2, last read as
            // tile t - 1, is free: once tile t + 1's copies landed (wait_group) this thread widens its own units of
            // them into it, below within the S product, while tile t is read from wide tile t % 2. Wide tile
            // (t + 1) % 2 is next read after the wait on "full" for tile t + 1, which needs this warp's arrival at
            // the top of the next trip, after the widening. The last tile widens raw slot t % 2 again (tile t's
            // own landed bytes) into the free wide tile (t + 1) % 2, which nobody reads after: a branch-free S product
            // at the cost of one unused widening a split.
            arrive_and_wait_full(t);
            if (t + 2 < tiles) {
                issue(t + 2);
                cp_async_wait<1>();  // tile t + 1 landed, t + 2 flies
            } else {
                cp_async_wait<0>();
            }
            kv = wide + slot * (Layout::kWideBytes / 2);
        } else {
            // Tile t lands (each thread waits for its own copies; the barrier publishes them to every warp); the
            // helpers then issue tile t + 1's copies into the stage tile t - 1 left, which every warp has finished
            // (it passed this barrier), while the row warps compute tile t: one barrier a tile.
            cp_async_wait<0>();
            __syncthreads();
            if (t + 1 < tiles && warp >= p.row_warps) issue(t + 1);
            if constexpr (kFp8) {
                widen_fp8_tile(stages + slot * Layout::kStageBytes, wide);
                __syncthreads();
                kv = wide;
            } else {
                kv = reinterpret_cast<const bf16 *>(stages + slot * Layout::kStageBytes);
            }
        }

        if (owns_rows) {
            // S = Q K^T for the warp's 16 rows x 32 tokens: the k-steps fully unrolled from two fragment bases, every
            // ldmatrix address the base plus an immediate. One accumulator per n-tile, k in order: the wgmma prefill
            // kernel sums the same k-steps in the same order, bit for bit (tests/mla_wgmma.rs).
            float s[kTileN / 8][4];
    #pragma unroll
            for (int n = 0; n < kTileN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            const uint32_t k_frag = smem_addr(kv + ((lane >> 4) * 8 + (lane & 7)) * kRowStride + ((lane >> 3) & 1) * 8);
            unroll_indexed<kWidth / 16>([&](auto k_step) {
                constexpr int k = decltype(k_step)::value;
                uint32_t a[4];
                ldmatrix_x4_at<k * 16 * 2>(a, q_frag);
                unroll_indexed<kTileN / 16>([&](auto n_pair) {
                    constexpr int n = 2 * decltype(n_pair)::value;
                    uint32_t b[4];
                    ldmatrix_x4_at<(n * 8 * kRowStride + k * 16) * 2>(b, k_frag);
                    mma_bf16(s[n], a, b[0], b[1]);
                    mma_bf16(s[n + 1], a, b[2], b[3]);
                });
            });
            if constexpr (kRing && kFp8) {
                // Tile t + 1's own units (see the ring's wait above; in the ring every warp owns rows), in the S
                // product's basic block: they issue while its mma.sync wait for each other. 1 warp: the other 10
                // units in a loop after it.
                const int next = t + 1 < tiles ? (t + 1) % Layout::kStages : slot;
                const char *next_raw = stages + next * Layout::kStageBytes;
                bf16 *next_wide = wide + (t + 1) % Layout::kStages * (Layout::kWideBytes / 2);
                widen_own_fp8_units_branch_free(next_raw, next_wide, warp, warps);
                widen_own_fp8_units(next_raw, next_wide, warp, warps, kBranchFreeWidenUnits);
            }

            // Online softmax (mla_attention.cuh), then O += P V over the latent columns, P's A fragments straight
            // from the S accumulators.
            uint32_t pa[kTileN / 16][4];
            float correction[2];
            softmax_tile(s, pa, correction, state, tile_start, kv_end, quad, score_scale);
            rescale_rows(o, correction);
            const uint32_t v_frag = smem_addr(kv + (((lane >> 3) & 1) * 8 + (lane & 7)) * kRowStride + (lane >> 4) * 8);
            unroll_indexed<kTileN / 16>([&](auto k_step) {
                constexpr int k = decltype(k_step)::value;
                unroll_indexed<kLatent / 16>([&](auto n_pair) {
                    constexpr int n = 2 * decltype(n_pair)::value;
                    uint32_t b[4];
                    ldmatrix_x4_trans_at<(k * 16 * kRowStride + n * 8) * 2>(b, v_frag);
                    mma_bf16(o[n], pa[k], b[0], b[1]);
                    mma_bf16(o[n + 1], pa[k], b[2], b[3]);
                });
            });
        }
    }

    if (!owns_rows) return;
    store_rows(p, o, state, split, split_begin, (long)q_begin * p.heads + row0 + warp * kRowsPerWarp + g, quad);
}

// One attention block: its split's keys (if any), then, when split and p.split_counters is set, the fused combine
// (combine_if_last_split, cuda/include/mla_attention.cuh) by all the block's warps, helpers included. Without counters
// the standalone mla_attention_combine runs after.
template <bool kFp8>
__device__ __forceinline__ void attention_tile(const MlaAttentionParams &p) {
    // A later kernel's weights into L2 (l2_prefetch.cuh): static bytes, so before the wait.
    prefetch_l2(p.l2_prefetch);
    // Programmatic launch (common.cuh): everything this kernel reads first (sequence lengths, block tables, q, the
    // cache row the latent projection just wrote) is an earlier kernel's output; only the launch parameters are not.
    wait_then_allow_dependents();
    const int seq = blockIdx.z, split = blockIdx.y;
    const int warps = blockDim.x >> 5;
    const int split_begin = split * p.tokens_per_split;
    // The split's first two tiles' table entries, in flight together with the loads of q_start and kv_len.
    const int table_tokens = p.max_pages * p.page_size;
    const int first_pages[2] = {tile_page(p, seq, split_begin, table_tokens), tile_page(p, seq, split_begin + kTileN, table_tokens)};
    const int q_begin = p.q_start[seq], q_count = p.q_start[seq + 1] - q_begin;
    const int first_pos = p.kv_len[seq] - q_count;
    const int block_rows = p.tile_rows;
    const int row0 = blockIdx.x * block_rows;  // first (token, head) row of this block within the sequence
    const int rows = q_count * p.heads;
    if (row0 >= rows) return;  // every split block of this tile returns here: no arrival is awaited

    // Keys of this block: its split's range, cut at the last position any of its rows may see (causality).
    const int last_row = min(row0 + block_rows, rows) - 1;
    const int kv_end = min(split_begin + p.tokens_per_split, first_pos + last_row / p.heads + 1);
    // No row of this block has a key in this split when split_begin >= kv_end: the combine skips the split.
    if (split_begin < kv_end) {
        if (warps > p.row_warps) {
            attend_split<kFp8, false>(p, seq, split, q_begin, q_count, first_pos, row0, split_begin, kv_end, first_pages);
        } else {
            attend_split<kFp8, true>(p, seq, split, q_begin, q_count, first_pos, row0, split_begin, kv_end, first_pages);
        }
    }
    if (p.num_splits == 1 || p.split_counters == nullptr) return;
    __shared__ int last_arrival;
    combine_if_last_split(p, seq, q_begin, first_pos, row0, last_row, threadIdx.x >> 5, warps, &last_arrival, [] { __syncthreads(); });
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kMaxBlockWarps * 32) mla_attention_bf16(const MlaAttentionParams p) {
    attention_tile<false>(p);
}
extern "C" __global__ void __launch_bounds__(kMaxBlockWarps * 32) mla_attention_fp8(const MlaAttentionParams p) {
    attention_tile<true>(p);
}

// ================================================================================================================
// mla_attention_combine: combine_rows<1> over every (token, head) row, one warp a row, grid = (row blocks, sequences):
// the split combine as its own launch, for callers that run mla_attention_* without split counters
// (attention::SplitCombine::Launch: the two-launch form the fused one is checked against, and the calibration
// replays of measurements made before the fusion).
// ================================================================================================================
extern "C" __global__ void mla_attention_combine(const MlaAttentionParams p) {
    wait_then_allow_dependents();  // programmatic launch: the partials are the attention launch's output
    const int seq = blockIdx.y;
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int q_begin = p.q_start[seq], q_count = p.q_start[seq + 1] - q_begin;
    const int rows[1] = {row};
    if (row < q_count * p.heads) combine_rows<1>(p, q_begin, p.kv_len[seq] - q_count, rows);
}
