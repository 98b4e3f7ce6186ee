// The block shape and stage ring the warp-specialised wgmma GEMMs share (cuda/moe_gemm_wgmma.cu's bf16 / 4-bit tiles
// and cuda/moe_gemm_wgmma_fp8.cu's fp8 tile): 8 consumer warps (two warpgroups, one 16-feature weight tile each) and
// one producer warp (moe_gemm_wgmma.cu's BN 256 kernels: a producer warpgroup of 4 warps); 128 features x 64 slots
// per slot tile, one or more slot tiles per block (moe_gemm_wgmma.cu's wide kernels take three or four); a ring of stages laid out as weights, activations (one 128-byte swizzled line per slot, the
// block's slot tiles one after the other), per-stage extras (staged weight scales, activation scales), the "full" and
// "empty" barriers, the slots' pairs; and the block setup and activation gather both producers run.
#pragma once
#include "params.h"
#include "common.cuh"
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

// Dynamic shared memory of a ring of kStages stages of kWStage weight bytes, kSlotTiles x kXStage activation bytes
// (1024-byte aligned for the swizzle) and kSStage further bytes each, then the barriers (kStages "full", kStages
// "empty"), the slots' pairs and their source rows; kBlocksPerSm blocks share an SM's 228 KiB.
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
    static constexpr int kSrcOffset = kSlotOffset + kSlots * 4;
    static constexpr int kSharedBytes = kSrcOffset + kSlots * 4;
    static_assert(kStages >= 3, "the producer keeps STAGES - 1 >= 2 stages in flight");
    static_assert(kSharedBytes <= (228 / kBlocksPerSm - 1) * 1024, "kBlocksPerSm blocks per SM (228 KiB, 1 KiB reserved per block)");
    static_assert(kXOffset % 1024 == 0 && kXStage % 1024 == 0, "activation stages must start on the swizzle period");
};

// Every thread of the block: the slots' pairs (slot_pair[s]: the sorted pair of slot s when kSortedPairs and the
// launch gives sorted_pairs, else its row; -1 past the block's `slots`) and the input rows the gathers read for them
// (slot_src[s]: the pair's token when the input is by token, else the slot's row; -1 for a padding slot), and the
// ring's barriers ("full": `full_arrivals` arrivals a phase besides the transaction bytes; "empty": one release per
// consumer warp); then a block barrier. kSlots: the block's slots (GemmRing::kSlots); kBlockThreads: the block's
// threads.
template <int kStages, bool kSortedPairs, int kSlots = kBN, int kBlockThreads = kThreads>
__device__ __forceinline__ void init_slots_and_ring(const MoeGemmParams &p, int *slot_pair, int *slot_src, uint64_t *full, uint64_t *empty, int slot_begin,
                                                    int slots, unsigned full_arrivals) {
    const int tid = threadIdx.x;
    for (int s = tid; s < kSlots; s += kBlockThreads) {
        int pair = -1;
        if (s < slots) pair = kSortedPairs && p.sorted_pairs != nullptr ? p.sorted_pairs[slot_begin + s] : slot_begin + s;
        slot_pair[s] = pair;
        slot_src[s] = pair < 0 ? -1 : p.in_by_token ? pair / p.top_k : slot_begin + s;
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

// A producer warp: one stage's activation lines by 16-byte cp.async into the swizzled stage at x_stage_addr, the
// 128 bytes at x_k + slot_src[r] * row_bytes for each of the first `rows` slots r; 8 lanes per line, 4 lines per pass.
// `producers` warps share a stage (a producer warpgroup): warp `producer` of them takes every producers-th pass, so
// each commits and waits for its own cp.async groups.
// A padding slot's copy reads no byte (src-size 0) and zero-fills its line, so the loop has no branch per line: a
// branch ended the producer's basic block on every line, which made its dependence chain (a shared load, the
// address and the copy, one line after the other) the block's longest. A block's slot tiles lie one after the
// other, so slot r's line is at r * 128 in any of them.
__device__ __forceinline__ void gather_stage_rows(const int *slot_src, uint32_t x_stage_addr, const unsigned char *x_k, long row_bytes, int rows = kBN,
                                                  int producer = 0, int producers = 1) {
    const int lane = threadIdx.x & 31;
#pragma unroll 8
    for (int i = producer * 32 + lane; i < rows * 8; i += producers * 32) {
        const int row = i >> 3, chunk = i & 7;
        const int src_row = slot_src[row];
        const unsigned char *src = x_k + (long)max(src_row, 0) * row_bytes + chunk * 16;
        cp_async16_zfill(swizzle128(x_stage_addr + row * kXRowBytes + chunk * 16), src, src_row >= 0);
    }
}

}  // namespace
