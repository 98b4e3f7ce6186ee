// The block shape and stage ring the warp-specialised wgmma GEMMs share (cuda/moe_gemm_wgmma.cu's bf16 / 4-bit tiles
// and cuda/moe_gemm_wgmma_fp8.cu's fp8 tile): 8 consumer warps (two warpgroups, one 16-feature weight tile each) and
// one producer warp (moe_gemm_wgmma.cu's BN 256 kernels: a producer warpgroup of 4 warps); 128 features x 64 slots
// per slot tile, one or more slot tiles per block (moe_gemm_wgmma.cu's wide kernels take three or four); a ring of stages laid out as weights, activations (one 128-byte swizzled line per slot, the
// block's slot tiles one after the other), per-stage extras (staged weight scales, activation scales), the "full" and
// "empty" barriers, the slots' pairs; the activation gather both producers run; and the persistent walk over work
// tiles they share (PersistentSmem, init_persistent_block, publish_tile / wait_tile, finish_block_tile).
#pragma once
#include "params.h"
#include "common.cuh"
#include "gemm_epilogue.cuh"
#include "hopper.cuh"
#include "mma.cuh"

namespace {

constexpr int kConsumerWarps = 8;
constexpr int kThreads = (kConsumerWarps + 1) * 32;  // a block with one producer warp
constexpr int kProducerWarp = kConsumerWarps;        // the (first) producer warp
constexpr int kBM = kConsumerWarps * 16;  // features per block
constexpr int kBN = 64;                   // slots per slot tile (the wgmma N)
constexpr int kXRowBytes = 128;           // one slot's activations of a stage: one 128-byte swizzle line
constexpr int kXStage = kBN * kXRowBytes; // one slot tile's activations of a stage

// One work tile of a persistent kernel: 128 features (weight tiles 8 feature_tile .. + 7) by the slots
// [slot_begin, slot_begin + slots) of matrix `expert` (grouped: a local expert; dense: blockIdx.z). expert < 0: the
// block's walk is over.
struct TileWork {
    int expert, slot_begin, slots, feature_tile;
};
// Experts whose group counts a GroupWalker holds at once (32 lanes x 8): every expert map the router makes
// (router.rs MAX_EXPERTS); a launch with more local experts walks them in chunks of this many.
constexpr int kWalkerExperts = 256;
// A GroupWalker's shared memory: the chunk's prefix (kWalkerExperts + 1) and its five words of state, rounded to 8.
constexpr int kWalkerInts = kWalkerExperts + 8;

// Dynamic shared memory of a ring of kStages stages of kWStage weight bytes, kSlotTiles x kXStage activation bytes
// (1024-byte aligned for the swizzle) and kSStage further bytes each, then the barriers (kStages "full", kStages
// "empty"), the slots' pairs and their source rows; kBlocksPerSm blocks share an SM's 228 KiB. A persistent kernel
// (kTileBuffers 2) keeps two tiles' slot tables, each with its TileWork, a "tile full" and a "tile empty" mbarrier
// (the producer fills one while the consumers finish the other), and the group prefix of its GroupWalker.
template <int kStages_, int kWStage_, int kSStage_, int kSlotTiles_ = 1, int kBlocksPerSm = 2, int kTileBuffers = 1>
struct GemmRing {
    static constexpr int kStages = kStages_, kWStage = kWStage_, kSStage = kSStage_, kSlotTiles = kSlotTiles_;
    static constexpr int kSlots = kSlotTiles * kBN;             // slots per block
    static constexpr int kXBlockStage = kSlotTiles * kXStage;   // the block's activations of a stage
    // cp.async groups the producer keeps in flight: with one stage being read and one held by the consumers' lagging
    // release, STAGES - 1 is the most that cannot deadlock (hopper.cuh cp_async_ring_arrive_landed).
    static constexpr int kInFlight = kStages - 1;
    static constexpr int kXOffset = kStages * kWStage;
    static constexpr int kSOffset = kXOffset + kStages * kXBlockStage;
    static constexpr int kBarOffset = kSOffset + kStages * kSStage;
    static constexpr int kSlotOffset = kBarOffset + 2 * kStages * 8;
    static constexpr int kSrcOffset = kSlotOffset + kTileBuffers * kSlots * 4;
    static constexpr int kPersistent = kTileBuffers > 1;
    static constexpr int kTileOffset = kSrcOffset + kTileBuffers * kSlots * 4;  // TileWork per buffer
    static constexpr int kTileBarOffset = kTileOffset + kPersistent * kTileBuffers * (int)sizeof(TileWork);  // "tile full", then "tile empty"
    static constexpr int kPrefixOffset = kTileBarOffset + kPersistent * 2 * kTileBuffers * 8;
    static constexpr int kSharedBytes = kPrefixOffset + kPersistent * kWalkerInts * 4;
    static_assert(kStages >= 3, "the producer keeps STAGES - 1 >= 2 stages in flight");
    static_assert(kSharedBytes <= (228 / kBlocksPerSm - 1) * 1024, "kBlocksPerSm blocks per SM (228 KiB, 1 KiB reserved per block)");
    static_assert(kXOffset % 1024 == 0 && kXStage % 1024 == 0, "activation stages must start on the swizzle period");
};

// `count` threads (the `index`-th of them this one): the slots' pairs and the input rows the gathers read for them, of
// the kSlots slots from slot_begin, `slots` of them real. slot_pair[s]: the sorted pair of slot s when kSortedPairs
// and the launch gives sorted_pairs, else its row; -1 past `slots`. slot_src[s]: the pair's token when the input is
// by token, else the slot's row; -1 for a padding slot.
template <bool kSortedPairs, int kSlots>
__device__ __forceinline__ void fill_slot_table(const MoeGemmParams &p, int *slot_pair, int *slot_src, int slot_begin, int slots, int index, int count) {
    for (int s = index; s < kSlots; s += count) {
        int pair = -1;
        if (s < slots) pair = kSortedPairs && p.sorted_pairs != nullptr ? p.sorted_pairs[slot_begin + s] : slot_begin + s;
        slot_pair[s] = pair;
        slot_src[s] = pair < 0 ? -1 : p.in_by_token ? pair / p.top_k : slot_begin + s;
    }
}

// A producer warp: one stage's activation lines by 16-byte cp.async into the swizzled stage at x_stage_addr, the
// 128 bytes at x_k + slot_src[r] * row_bytes for each of the first `rows` slots r; 8 lanes per line, 4 lines per pass.
// `producers` warps share a stage (a producer warpgroup): warp `producer` of them takes every producers-th pass, so
// each commits and waits for its own cp.async groups.
// A padding slot's copy reads no byte (src-size 0) and zero-fills its line, so the loop has no branch per line: a
// branch ended the producer's basic block on every line, which made its dependence chain (a shared load, the
// address and the copy, one line after the other) the block's longest. A block's slot tiles lie one after the
// other, so slot r's line is at r * 128 in any of them. kUnroll: the copies in flight per warp before the loop
// branches (fewer for warps short of registers).
template <int kUnroll = 8>
__device__ __forceinline__ void gather_stage_rows(const int *slot_src, uint32_t x_stage_addr, const unsigned char *x_k, long row_bytes, int rows = kBN,
                                                  int producer = 0, int producers = 1) {
    const int lane = threadIdx.x & 31;
#pragma unroll kUnroll
    for (int i = producer * 32 + lane; i < rows * 8; i += producers * 32) {
        const int row = i >> 3, chunk = i & 7;
        const int src_row = slot_src[row];
        const unsigned char *src = x_k + (long)max(src_row, 0) * row_bytes + chunk * 16;
        cp_async16_zfill(swizzle128(x_stage_addr + row * kXRowBytes + chunk * 16), src, src_row >= 0);
    }
}

// A persistent grouped kernel's map from work-group index to (expert, group): expert e's slots
// [expert_offsets[e], expert_offsets[e + 1]) (padded to the aligner's tile) form ceil(slots / kSlots) groups of
// kSlots slots, the last one partial, and the launch's groups are numbered expert by expert. One warp (the first
// producer warp) owns it: on the first lookup it reads the experts' offsets (read after any PDL wait: the router writes
// them), counts each expert's groups (8 experts a lane) and scans the counts across the warp into `prefix` (shared
// memory: prefix[i] = the groups of the chunk's first i experts); a lookup is a binary search there, so no block spends
// time on empty experts or on the tiles of a group after its first. Lookups come in increasing order (a block walks
// its tile indices upwards), so past the chunk's last group the warp scans the next kWalkerExperts experts.
// The experts worth scanning end at the last non-empty one: the expert of the last tile in use (tile_experts follows
// the experts' order), so the count of local experts is not needed.
template <int kSlots> struct GroupWalker {
    // In shared memory (so that the warp keeps none of it in registers through the k loops of its tiles: the BN 256
    // producer warps run at 48 registers): prefix[0 .. kWalkerExperts], then the state below.
    int *prefix;
    enum { kExperts, kChunkFirst, kChunkEnd, kGroupsBefore, kGroupsEnd, kStateInts };
    // kExperts: experts up to the last non-empty one (-1: not read yet); kChunkFirst, kChunkEnd: the chunk's experts
    // in `prefix`; kGroupsBefore: the groups of the experts before it; kGroupsEnd: kGroupsBefore + the chunk's groups.
    __device__ __forceinline__ int *state() const { return prefix + kWalkerExperts + 1; }

    __device__ __forceinline__ explicit GroupWalker(int *walker_smem) : prefix(walker_smem) {}
    // One thread, before the block barrier that precedes the first lookup: no chunk read yet.
    __device__ __forceinline__ void reset() const {
        for (int i = 0; i < kStateInts; ++i) state()[i] = i == kExperts ? -1 : 0;
    }

    // The whole warp: the chunk of experts from `first` (at most `experts` in all), whose groups start at
    // `groups_before`, into `prefix` and the state.
    __device__ __forceinline__ void scan_chunk(const MoeGemmParams &p, int experts, int first, int groups_before) {
        constexpr int kPerLane = kWalkerExperts / 32;
        const int lane = threadIdx.x & 31;
        int counts[kPerLane], sum = 0;
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            const int e = first + lane * kPerLane + i;
            counts[i] = e < experts ? (p.expert_offsets[e + 1] - p.expert_offsets[e] + kSlots - 1) / kSlots : 0;
            sum += counts[i];
        }
        int inclusive = sum;
#pragma unroll
        for (int d = 1; d < 32; d *= 2) {
            const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
            if (lane >= d) inclusive += v;
        }
        const int total = __shfl_sync(0xffffffffu, inclusive, 31);
        __syncwarp();  // no lane still reads the previous chunk
        int before = inclusive - sum;
        if (lane == 0) {
            prefix[0] = 0;
            int *st = state();
            st[kChunkFirst] = first, st[kChunkEnd] = min(first + kWalkerExperts, experts);
            st[kGroupsBefore] = groups_before, st[kGroupsEnd] = groups_before + total;
        }
#pragma unroll
        for (int i = 0; i < kPerLane; ++i) {
            before += counts[i];
            prefix[lane * kPerLane + i + 1] = before;
        }
        __syncwarp();
    }

    // The whole warp, uniformly: group `group` of the launch as expert and slots; false past the last group.
    __device__ __forceinline__ bool find(const MoeGemmParams &p, int group, int &expert, int &slot_begin, int &slot_end) {
        int *st = state();
        if (st[kExperts] < 0) {
            const int padded = *p.num_padded;
            const int experts = padded > 0 ? p.tile_experts[padded / p.tile_m - 1] + 1 : 0;
            __syncwarp();
            if ((threadIdx.x & 31) == 0) st[kExperts] = experts;
            __syncwarp();
        }
        while (group >= st[kGroupsEnd] && st[kChunkEnd] < st[kExperts]) scan_chunk(p, st[kExperts], st[kChunkEnd], st[kGroupsEnd]);
        const int chunk_first = st[kChunkFirst], groups_before = st[kGroupsBefore];
        if (group < groups_before || group >= st[kGroupsEnd]) return false;
        // The last expert of the chunk whose groups start at or before `group` (empty experts share the next one's
        // start, so the search passes over them).
        const int local = group - groups_before;
        int lo = 0, hi = st[kChunkEnd] - chunk_first - 1;
        while (lo < hi) {
            const int mid = (lo + hi + 1) / 2;
            if (prefix[mid] <= local) lo = mid;
            else hi = mid - 1;
        }
        expert = chunk_first + lo;
        slot_begin = p.expert_offsets[expert] + (local - prefix[lo]) * kSlots;
        slot_end = min(slot_begin + kSlots, p.expert_offsets[expert + 1]);
        return true;
    }
};

// A persistent block's shared memory in GemmRing R's layout (kTileBuffers 2): the stage ring and its barriers, and
// the two tile buffers (slot tables, TileWork, "tile full" / "tile empty" barriers) the first producer warp and the
// tables' readers hand over, and the group walker's prefix.
template <class R> struct PersistentSmem {
    static_assert(R::kPersistent, "a ring with two tile buffers");
    unsigned char *w, *x, *s;
    uint64_t *full, *empty, *tile_full, *tile_empty;
    int *slot_pair, *slot_src, *prefix;  // slot tables: buffer b at b * R::kSlots
    TileWork *tiles;
    __device__ __forceinline__ explicit PersistentSmem(unsigned char *smem)
        : w(smem), x(smem + R::kXOffset), s(smem + R::kSOffset), full(reinterpret_cast<uint64_t *>(smem + R::kBarOffset)), empty(full + R::kStages),
          tile_full(reinterpret_cast<uint64_t *>(smem + R::kTileBarOffset)), tile_empty(tile_full + 2),
          slot_pair(reinterpret_cast<int *>(smem + R::kSlotOffset)), slot_src(reinterpret_cast<int *>(smem + R::kSrcOffset)),
          prefix(reinterpret_cast<int *>(smem + R::kPrefixOffset)), tiles(reinterpret_cast<TileWork *>(smem + R::kTileOffset)) {}
};

// One thread, before a block barrier: the ring's barriers ("full": `full_arrivals` arrivals a phase besides the
// transaction bytes; "empty": one release per consumer warp), the tile buffers' ("tile full": the first producer
// warp's one arrival; "tile empty": one per warp that reads the tables, `table_readers`) and the walker's state.
template <class R>
__device__ __forceinline__ void init_persistent_block(const PersistentSmem<R> &sm, unsigned full_arrivals, unsigned table_readers) {
    for (int s = 0; s < R::kStages; ++s) {
        mbar_init(&sm.full[s], full_arrivals);
        mbar_init(&sm.empty[s], kConsumerWarps);
    }
    for (int b = 0; b < 2; ++b) {
        mbar_init(&sm.tile_full[b], 1);
        mbar_init(&sm.tile_empty[b], table_readers);
    }
    mbar_init_fence();
    GroupWalker<R::kSlots>(sm.prefix).reset();
}

// The first producer warp, uniformly: the block's j-th work tile (index blockIdx.x + j gridDim.x of the launch's tile
// space, feature tile fastest, so the 128-feature tiles of one slot group run side by side on the SMs and read its
// activation rows from L2; grouped: the walker's expert group, dense: the row block of matrix blockIdx.z), its slot
// tables filled (fill_slot_table, kSortedPairs) into buffer j % 2 once that buffer's readers of two tiles ago
// released it, published with its TileWork on the buffer's "tile full". Past the last tile: expert -1, no table.
template <bool kSortedPairs, class R>
__device__ __forceinline__ TileWork publish_tile(const MoeGemmParams &p, const PersistentSmem<R> &sm, GroupWalker<R::kSlots> &walker, int j, int feature_tiles,
                                                 bool grouped) {
    constexpr int kSlots = R::kSlots;
    const int index = blockIdx.x + j * gridDim.x, buf = j & 1;
    TileWork work;
    work.feature_tile = index % feature_tiles;
    int slot_end = 0;
    bool found;
    if (p.walk_tiles > 0 && index >= p.walk_tiles) {
        work.expert = -1, work.slot_begin = 0;  // past the window the launch walks (MoeGemmParams::walk_tiles)
        found = false;
    } else if (grouped) {
        found = walker.find(p, index / feature_tiles, work.expert, work.slot_begin, slot_end);
    } else {
        work.expert = blockIdx.z;
        work.slot_begin = index / feature_tiles * kSlots;
        slot_end = min(work.slot_begin + kSlots, p.dense_rows);
        found = work.slot_begin < p.dense_rows;
    }
    work.slots = slot_end - work.slot_begin;
    if (!found) work.expert = -1;
    ring_wait_empty<2>(sm.tile_empty, j);
    if (found) fill_slot_table<kSortedPairs, kSlots>(p, sm.slot_pair + buf * kSlots, sm.slot_src + buf * kSlots, work.slot_begin, work.slots, threadIdx.x & 31, 32);
    if ((threadIdx.x & 31) == 0) sm.tiles[buf] = work;
    __syncwarp();
    if (elect_one_sync()) mbar_arrive(&sm.tile_full[buf]);
    return work;
}

// A reader of the tables (a consumer warp, a gathering producer warp other than the first): the block's j-th work
// tile once published (expert < 0: the walk is over). It releases buffer j % 2 on "tile empty" when done with it.
template <class R>
__device__ __forceinline__ TileWork wait_tile(const PersistentSmem<R> &sm, int j) {
    ring_wait_full<2>(sm.tile_full, j);
    return sm.tiles[j & 1];
}

// Every thread of the block, after the walk: launches with a finishing step (dense query RoPE, row finisher) run one
// tile per block (the launchers size the grid so), which the block finishes here from what the consumers stored:
// the first buffer's tile. kOverlapLoads: finish_rows' row loads (false for kernels at their register cap).
template <bool kOverlapLoads, class R>
__device__ __forceinline__ void finish_block_tile(const MoeGemmParams &p, const PersistentSmem<R> &sm) {
    if (p.rope.positions == nullptr && p.finish.kind == SMALL4_GEMM_FINISH_NONE) return;
    __syncthreads();
    const TileWork work = sm.tiles[0];
    if (work.expert < 0) return;
    static_assert(R::kSlots <= kThreads, "finish_rows: one slot per thread (every block has at least kThreads)");
    if (p.rope.positions != nullptr) rope_output_tile(p, work.slot_begin, work.slots, work.feature_tile * kBM, kBM);
    if (p.finish.kind != SMALL4_GEMM_FINISH_NONE) finish_rows<kOverlapLoads, R::kSlots>(p, sm.slot_pair, work.slots, work.slot_begin, false);
}

}  // namespace
