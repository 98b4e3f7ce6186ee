// Fused MoE router: gate GEMV/GEMM -> softmax over all experts -> top-k -> per-expert alignment, in ONE launch.
//
// Stage 1 (every block): logits for a tile of kTileTokens tokens x TILE_E experts. The 8 warps of the block split the
// hidden dimension (a step of the block covers 256 x 8 = 2048 contiguous columns with 16-byte loads), each thread keeps
// TILE_E x kTileTokens f32 partial dot products, then a warp butterfly and a fixed-order sum over the 8 warps
// (deterministic). The gate is read once per token tile: at decode (tokens <= 8) the 1 MiB gate of the real model is
// spread over experts / TILE_E blocks, each streaming its own TILE_E rows.
// Stage 2 (the last block to finish a token tile, found with a per-tile counter): softmax + top-k of those tokens,
// one warp per token, each lane holding experts lane, lane+32, ... (<= 8 per lane for <= 256 experts).
// Stage 3 (the last token tile's stage-2 block, found with a second counter): moe_align over all tokens*k pairs.
// No host synchronisation anywhere; the counters are reset by the blocks that consume them.
// Bytes (decode, T tokens): experts*dim*2 (gate) + T*dim*2*ceil(experts/TILE_E) (hidden, from L2 after the first
// block) + T*experts*4*2 (logits round trip) + small outputs. FLOPs: 2*T*experts*dim.
#include "params.h"
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileTokens = 8;  // tokens per block; also one stage-2 warp per token
constexpr int kMaxExperts = 256;
constexpr int kExpertsPerLane = kMaxExperts / 32;
constexpr int kMaxK = 8;

// ------------------------------------------------------------------------------------------------------------------
// Alignment (stage 3 of router_topk, and the standalone moe_align kernel). One block of kThreads threads.
//
// counts (shared atomics: order-free, so deterministic) -> block scan of the tile-rounded counts -> padding rows and
// tile_experts -> a STABLE scatter in chunks of kThreads pairs: a pair's slot is cursor[e] + (pairs of the same expert
// in earlier warps of the chunk) + (earlier lanes of its warp with the same expert). Lanes find their peers with 32
// shuffles (match.any would do, but plain shfl keeps the instruction set small).
struct AlignShared {
    int local_of[kMaxExperts];
    int counts[kMaxExperts];
    int offsets[kMaxExperts + 1];
    int cursor[kMaxExperts];
    int warp_counts[kWarps][kMaxExperts];
    int warp_totals[kWarps];
};

__device__ __forceinline__ int lane_id() { return threadIdx.x & 31; }

// Inclusive scan over the block (kThreads values, one per thread); returns each thread's inclusive prefix.
__device__ int block_inclusive_scan(int v, int *warp_totals) {
    const int lane = lane_id(), warp = threadIdx.x >> 5;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        int up = __shfl_up_sync(0xffffffffu, v, d);
        if (lane >= d) v += up;
    }
    if (lane == 31) warp_totals[warp] = v;
    __syncthreads();
    int before = 0;
    for (int w = 0; w < warp; ++w) before += warp_totals[w];
    return v + before;
}

__device__ void moe_align_block(const MoeAlignParams &p, AlignShared &s) {
    const int tid = threadIdx.x, lane = lane_id(), warp = tid >> 5;
    const int tile_m = p.tile_m;
    for (int e = tid; e < kMaxExperts; e += kThreads) {
        int local = e < p.experts ? __ldcg(p.expert_map + e) : -1;
        // A map entry outside [0, local_experts) means "not here": never an out-of-bounds index.
        s.local_of[e] = (local >= 0 && local < p.local_experts) ? local : -1;
        s.counts[e] = 0;
    }
    __syncthreads();

    for (int pair = tid; pair < p.pairs; pair += kThreads) {
        const int e = __ldcg(p.topk_ids + pair);
        const int local = (e >= 0 && e < p.experts) ? s.local_of[e] : -1;
        if (local >= 0) atomicAdd(&s.counts[local], 1);
    }
    __syncthreads();

    // Offsets: exclusive scan of counts rounded up to tile_m (local_experts <= kThreads).
    const int count = tid < p.local_experts ? s.counts[tid] : 0;
    const int padded = (count + tile_m - 1) & ~(tile_m - 1);
    const int inclusive = block_inclusive_scan(padded, s.warp_totals);
    if (tid < p.local_experts) {
        s.offsets[tid + 1] = inclusive;
        s.cursor[tid] = inclusive - padded;
        p.expert_counts[tid] = count;
        p.expert_offsets[tid + 1] = inclusive;
    }
    if (tid == 0) {
        s.offsets[0] = 0;
        p.expert_offsets[0] = 0;
    }
    __syncthreads();
    const int num_padded = s.offsets[p.local_experts];
    if (tid == 0) p.num_padded[0] = num_padded;

    // Padding rows of each expert, tile owners, and everything past num_padded.
    for (int e = warp; e < p.local_experts; e += kWarps) {
        for (int r = s.offsets[e] + s.counts[e] + lane; r < s.offsets[e + 1]; r += 32) p.sorted_pairs[r] = -1;
        for (int t = s.offsets[e] / tile_m + lane; t < s.offsets[e + 1] / tile_m; t += 32) p.tile_experts[t] = e;
    }
    for (int r = num_padded + tid; r < p.max_padded; r += kThreads) p.sorted_pairs[r] = -1;
    for (int t = num_padded / tile_m + tid; t < p.max_padded / tile_m; t += kThreads) p.tile_experts[t] = -1;

    // Stable scatter.
    for (int base = 0; base < p.pairs; base += kThreads) {
        const int pair = base + tid;
        int local = -1;
        if (pair < p.pairs) {
            const int e = __ldcg(p.topk_ids + pair);
            local = (e >= 0 && e < p.experts) ? s.local_of[e] : -1;
        }
        unsigned peers = 0;
#pragma unroll
        for (int i = 0; i < 32; ++i) {
            if (__shfl_sync(0xffffffffu, local, i) == local) peers |= 1u << i;
        }
        for (int i = tid; i < kWarps * kMaxExperts; i += kThreads) (&s.warp_counts[0][0])[i] = 0;
        __syncthreads();
        const unsigned lower = peers & ((1u << lane) - 1u);
        if (local >= 0 && lower == 0) s.warp_counts[warp][local] = __popc(peers);
        __syncthreads();
        if (local >= 0) {
            int slot = s.cursor[local] + __popc(lower);
            for (int w = 0; w < warp; ++w) slot += s.warp_counts[w][local];
            p.sorted_pairs[slot] = pair;
        }
        __syncthreads();
        if (tid < p.local_experts) {
            int added = 0;
            for (int w = 0; w < kWarps; ++w) added += s.warp_counts[w][tid];
            s.cursor[tid] += added;
        }
        __syncthreads();  // the next chunk zeroes warp_counts and moves cursors: wait for these reads
    }
}

// ------------------------------------------------------------------------------------------------------------------
// Stage 2: softmax over all experts and top-k of one token, by one warp. Ranks by logit (the softmax is monotone, and
// logits never collapse into ties the way rounded probabilities can), ties to the lower expert index.
__device__ void softmax_topk_warp(const RouterParams &p, int token) {
    const int lane = lane_id();
    float v[kExpertsPerLane];
    float max = -INFINITY;
#pragma unroll
    for (int i = 0; i < kExpertsPerLane; ++i) {
        const int e = lane + 32 * i;
        v[i] = e < p.experts ? __ldcg(p.logits + (long)token * p.experts + e) : -INFINITY;
        max = fmaxf(max, v[i]);
    }
    max = warp_max(max);
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < kExpertsPerLane; ++i) {
        if (lane + 32 * i < p.experts) sum += __expf(v[i] - max);
    }
    sum = warp_sum(sum);

    unsigned taken = 0;  // bit i: this lane's expert lane + 32*i is already chosen
    float chosen_prob[kMaxK];
    int chosen_id[kMaxK];
    float chosen_sum = 0.f;
#pragma unroll
    for (int j = 0; j < kMaxK; ++j) {
        if (j < p.k) {
            float best = -INFINITY;
            int best_id = 0x7fffffff;
#pragma unroll
            for (int i = 0; i < kExpertsPerLane; ++i) {
                const int e = lane + 32 * i;
                // Strictly greater: among this lane's equal logits the lower index (smaller i) stays.
                if (e < p.experts && !(taken >> i & 1u) && (v[i] > best || best_id == 0x7fffffff)) {
                    best = v[i];
                    best_id = e;
                }
            }
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) {
                const float other = __shfl_xor_sync(0xffffffffu, best, offset);
                const int other_id = __shfl_xor_sync(0xffffffffu, best_id, offset);
                if (other > best || (other == best && other_id < best_id)) {
                    best = other;
                    best_id = other_id;
                }
            }
            if ((best_id & 31) == lane) taken |= 1u << (best_id >> 5);
            chosen_id[j] = best_id;
            chosen_prob[j] = __expf(best - max) / sum;
            chosen_sum += chosen_prob[j];
        }
    }
    if (lane == 0) {
        const float norm = p.routed_scale / (chosen_sum + 1e-20f);
#pragma unroll
        for (int j = 0; j < kMaxK; ++j) {
            if (j < p.k) {
                p.topk_ids[(long)token * p.k + j] = chosen_id[j];
                p.topk_weights[(long)token * p.k + j] = chosen_prob[j] * norm;
            }
        }
    }
}

// Arrives on counter; true in every thread of the block that arrived last of `expected`. Callers wrote their results
// before; the fence makes them visible to the last block, which reads them with ld.cg (L2, not a stale L1).
__device__ bool last_to_arrive(int *counter, int expected, int *flag) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        const int previous = atomicAdd(counter, 1);
        const bool last = previous == expected - 1;
        if (last) *counter = 0;  // reset for the next launch: nobody else touches it again in this one
        *flag = last;
    }
    __syncthreads();
    const bool last = *flag != 0;
    if (last) __threadfence();
    return last;
}

template <int TILE_E>
__device__ void router_topk_body(const RouterParams &p) {
    __shared__ float partial[kWarps][TILE_E * kTileTokens];
    __shared__ int flag;
    __shared__ AlignShared align_shared;

    const int tid = threadIdx.x, lane = lane_id(), warp = tid >> 5;
    const int expert0 = blockIdx.x * TILE_E;
    const int token0 = blockIdx.y * kTileTokens;
    const int tile_tokens = min(kTileTokens, p.tokens - token0);
    const int chunks = p.dim / 8;

    float acc[TILE_E][kTileTokens];
#pragma unroll
    for (int e = 0; e < TILE_E; ++e)
#pragma unroll
        for (int t = 0; t < kTileTokens; ++t) acc[e][t] = 0.f;

#pragma unroll 2
    for (int c = tid; c < chunks; c += kThreads) {
        float g[TILE_E][8];
#pragma unroll
        for (int e = 0; e < TILE_E; ++e) {
            if (expert0 + e < p.experts) {
                bf16x8_to_f32(__ldg(reinterpret_cast<const uint4 *>(p.gate + (long)(expert0 + e) * p.dim) + c), g[e]);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) g[e][i] = 0.f;
            }
        }
#pragma unroll
        for (int t = 0; t < kTileTokens; ++t) {
            if (t < tile_tokens) {
                float h[8];
                bf16x8_to_f32(__ldg(reinterpret_cast<const uint4 *>(p.hidden + (long)(token0 + t) * p.dim) + c), h);
#pragma unroll
                for (int e = 0; e < TILE_E; ++e)
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[e][t] = fmaf(g[e][i], h[i], acc[e][t]);
            }
        }
    }
#pragma unroll
    for (int e = 0; e < TILE_E; ++e)
#pragma unroll
        for (int t = 0; t < kTileTokens; ++t) {
            const float v = warp_sum(acc[e][t]);
            if (lane == 0) partial[warp][e * kTileTokens + t] = v;
        }
    __syncthreads();
    if (tid < TILE_E * kTileTokens) {
        const int e = tid / kTileTokens, t = tid % kTileTokens;
        if (t < tile_tokens && expert0 + e < p.experts) {
            float v = 0.f;
#pragma unroll
            for (int w = 0; w < kWarps; ++w) v += partial[w][tid];
            p.logits[(long)(token0 + t) * p.experts + expert0 + e] = v;
        }
    }

    if (!last_to_arrive(p.counters + blockIdx.y, gridDim.x, &flag)) return;
    if (warp < tile_tokens) softmax_topk_warp(p, token0 + warp);

    if (!last_to_arrive(p.counters + gridDim.y, gridDim.y, &flag)) return;
    moe_align_block(p.align, align_shared);
}

}  // namespace

// Decode shapes (tokens <= 16): one expert per block, so the gate streams through experts blocks in parallel.
extern "C" __global__ void __launch_bounds__(kThreads) router_topk_e1(const RouterParams p) { router_topk_body<1>(p); }

// Prefill shapes: four experts per block reuse each loaded hidden vector four times (hidden is re-read from L2 once
// per block column, experts / 4 times in all).
extern "C" __global__ void __launch_bounds__(kThreads) router_topk_e4(const RouterParams p) { router_topk_body<4>(p); }

// The alignment alone, from topk_ids produced elsewhere (one block of 256 threads).
extern "C" __global__ void __launch_bounds__(kThreads) moe_align(const MoeAlignParams p) {
    __shared__ AlignShared align_shared;
    moe_align_block(p, align_shared);
}
