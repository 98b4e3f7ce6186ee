// The block shape and stage ring the warp-specialised wgmma GEMMs share (cuda/moe_gemm_wgmma.cu's bf16 / 4-bit tiles
// and cuda/moe_gemm_wgmma_fp8.cu's fp8 tile): 8 consumer warps (two warpgroups, one 16-feature weight tile each) and
// one producer warp; 128 features x 64 slots per slot tile, one or more slot tiles per block (moe_gemm_wgmma.cu's wide
// kernels take four); a ring of stages laid out as weights, activations (one 128-byte swizzled line per slot, the
// block's slot tiles one after the other), per-stage extras (staged weight scales, activation scales), the "full" and
// "empty" barriers, the slots' pairs; and the block setup and activation gather both producers run.
#pragma once
#include "params.h"
#include "common.cuh"
#include "hopper.cuh"
#include "mma.cuh"

namespace {

constexpr int kConsumerWarps = 8;
constexpr int kThreads = (kConsumerWarps + 1) * 32;
constexpr int kProducerWarp = kConsumerWarps;
constexpr int kBM = kConsumerWarps * 16;  // features per block
constexpr int kBN = 64;                   // slots per slot tile (the wgmma N)
constexpr int kXRowBytes = 128;           // one slot's activations of a stage: one 128-byte swizzle line
constexpr int kXStage = kBN * kXRowBytes; // one slot tile's activations of a stage

// Dynamic shared memory of a ring of kStages stages of kWStage weight bytes, kSlotTiles x kXStage activation bytes
// (1024-byte aligned for the swizzle) and kSStage further bytes each, then the barriers (kStages "full", kStages
// "empty") and the slots' pairs; kBlocksPerSm blocks share an SM's 228 KiB.
template <int kStages_, int kWStage_, int kSStage_, int kSlotTiles_ = 1, int kBlocksPerSm = 2>
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
    static constexpr int kSharedBytes = kSlotOffset + kSlots * 4;
    static_assert(kStages >= 3, "the producer keeps STAGES - 1 >= 2 stages in flight");
    static_assert(kSharedBytes <= (228 / kBlocksPerSm - 1) * 1024, "kBlocksPerSm blocks per SM (228 KiB, 1 KiB reserved per block)");
    static_assert(kXOffset % 1024 == 0 && kXStage % 1024 == 0, "activation stages must start on the swizzle period");
};

// Every thread of the block: the slots' pairs (slot_pair[s]: the sorted pair of slot s when kSortedPairs and the
// launch gives sorted_pairs, else its row; -1 past the block's `slots`), and the ring's barriers ("full": `full_arrivals`
// arrivals a phase besides the transaction bytes; "empty": one release per consumer warp); then a block barrier.
// kSlots: the block's slots (GemmRing::kSlots).
template <int kStages, bool kSortedPairs, int kSlots = kBN>
__device__ __forceinline__ void init_slots_and_ring(const MoeGemmParams &p, int *slot_pair, uint64_t *full, uint64_t *empty, int slot_begin, int slots,
                                                    unsigned full_arrivals) {
    const int tid = threadIdx.x;
    for (int s = tid; s < kSlots; s += kThreads) {
        int pair = -1;
        if (s < slots) pair = kSortedPairs && p.sorted_pairs != nullptr ? p.sorted_pairs[slot_begin + s] : slot_begin + s;
        slot_pair[s] = pair;
    }
    if (tid == 0) {
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&full[s], full_arrivals);
            mbar_init(&empty[s], kConsumerWarps);
        }
        mbar_init_fence();
    }
    __syncthreads();
}

// Every thread: zeros the padding slots' activation lines among the first `rows` slots in every stage of kSlots
// slots (generic stores, written once and never copied over; the caller fences them for wgmma). Slot tiles past
// `rows` are neither loaded nor read.
template <int kStages, int kSlots = kBN>
__device__ __forceinline__ void zero_padding_rows(unsigned char *x_smem, const int *slot_pair, int rows = kSlots) {
    constexpr int kChunks = kXRowBytes / 16;
    for (int i = threadIdx.x; i < kStages * rows * kChunks; i += kThreads) {
        const int stage = i / (rows * kChunks), line = i % (rows * kChunks);
        if (slot_pair[line / kChunks] < 0) reinterpret_cast<uint4 *>(x_smem + stage * kSlots * kXRowBytes)[line] = make_uint4(0, 0, 0, 0);
    }
}

// The producer warp: one stage's activation lines by 16-byte cp.async into the swizzled stage at x_stage_addr, the
// 128 bytes at x_k + src_row * row_bytes for each real slot of the first `rows` (src_row: the pair's token when the
// input is by token, else the slot's row); 8 lanes per line, 4 lines per pass. Padding slots are skipped
// (zero_padding_rows). A block's slot tiles lie one after the other, so slot r's line is at r * 128 in any of them.
__device__ __forceinline__ void gather_stage_rows(const MoeGemmParams &p, const int *slot_pair, int slot_begin, uint32_t x_stage_addr,
                                                  const unsigned char *x_k, long row_bytes, int rows = kBN) {
    const int lane = threadIdx.x & 31;
#pragma unroll 4
    for (int i = lane; i < rows * 8; i += 32) {
        const int row = i >> 3, chunk = i & 7;
        const int pair = slot_pair[row];
        if (pair < 0) continue;
        const long src_row = p.in_by_token ? pair / p.top_k : slot_begin + row;
        const unsigned char *src = x_k + src_row * row_bytes + chunk * 16;
        const uint32_t dst = swizzle128(x_stage_addr + row * kXRowBytes + chunk * 16);
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
    }
}

}  // namespace
