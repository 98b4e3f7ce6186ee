// Fused MoE router: gate GEMV/GEMM -> softmax over all experts -> top-k -> per-expert alignment, in ONE launch.
//
// Stage 1 (every block; grid = dim slices x expert groups x token groups): split-K partial logits. A block stages its
// 256-column slice of up to 64 tokens' hidden states in shared memory (32 KiB, read from global once), then each warp
// takes 4 experts at a time: every lane loads one 16-byte vector of each of the 4 gate rows (the gate is read from
// global exactly once per token group) and multiplies it with 8 tokens at a time from shared memory; the 4 x 8 lane
// partials are summed over the warp by a transpose-reduce (31 shuffles, lane l ends with pair (l / 8, l % 8)) and
// stored to `partials [slice][token][expert]`.
// Stage 2 (the last block of a token group, found with a per-group counter): logits = sum of the slices in slice order
// (deterministic), then softmax + top-k, one warp per token, each lane holding experts lane, lane+32, ...
// Stage 3 (the last token group's stage-2 block, found with a second counter): moe_align over all tokens*k pairs.
// No host synchronisation anywhere; the counters are reset by the blocks that consume them.
// Bytes (T tokens, E experts, S = dim/256 slices, G expert groups, Z token groups): E*dim*2*Z (gate) + T*dim*2*G
// (hidden) + 2*S*T*E*4 (partials) + 2*T*E*4 (logits) + outputs; decode (T=1, E=128, dim=4096): ~1.05 x ideal.
// FLOPs: 2*T*E*dim.
#include "params.h"
#include "common.cuh"

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kSlice = 256;       // columns of dim per block: one 16-byte vector per lane
constexpr int kTokenGroup = 64;   // tokens per block: 64 x 256 bf16 = 32 KiB of shared memory
constexpr int kChunkTokens = 8;   // tokens per transpose-reduce (8 tokens x 4 experts = 32 values, one per lane)
constexpr int kWarpExperts = 4;
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
// One block: its time grows with tokens*k / 256 chunks (a few barriers each). Cheap at decode and moderate batches;
// long prefills (thousands of tokens) would want a multi-block alignment.
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

// One step of transpose_reduce: lanes with bit `kHalf` set keep the upper kHalf values, the others the lower ones,
// and add the partner's copy of what they keep.
template <int kHalf>
__device__ __forceinline__ void transpose_step(float (&v)[32], int lane) {
    const bool upper = (lane & kHalf) != 0;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kHalf);
    }
}

// Sum over the warp of 32 values per lane; lane l returns the total of value l (31 shuffles instead of 32 x 5).
__device__ __forceinline__ float transpose_reduce(float (&v)[32]) {
    const int lane = lane_id();
    transpose_step<16>(v, lane);
    transpose_step<8>(v, lane);
    transpose_step<4>(v, lane);
    transpose_step<2>(v, lane);
    transpose_step<1>(v, lane);
    return v[0];
}

union RouterShared {
    uint4 hidden[kTokenGroup][kSlice / 8];
    AlignShared align;
};

}  // namespace

// Grid: x = ceil(dim / 256) slices, y = ceil(experts / experts_per_block) groups, z = ceil(tokens / 64); 256 threads.
extern "C" __global__ void __launch_bounds__(kThreads) router_topk(const RouterParams p) {
    __shared__ RouterShared shared;
    __shared__ int flag;

    const int tid = threadIdx.x, lane = lane_id(), warp = tid >> 5;
    const int slice = blockIdx.x;
    const int expert_begin = blockIdx.y * p.experts_per_block;
    const int expert_end = min(p.experts, expert_begin + p.experts_per_block);
    const int token0 = blockIdx.z * kTokenGroup;
    const int group_tokens = min(kTokenGroup, p.tokens - token0);
    const int col = slice * kSlice + lane * 8;
    const bool col_valid = col < p.dim;

    for (int i = tid; i < group_tokens * (kSlice / 8); i += kThreads) {
        const int t = i / (kSlice / 8), c = slice * kSlice + (i % (kSlice / 8)) * 8;
        shared.hidden[t][i % (kSlice / 8)] =
            c < p.dim ? __ldg(reinterpret_cast<const uint4 *>(p.hidden + (long)(token0 + t) * p.dim + c)) : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();

    for (int quad = expert_begin + warp * kWarpExperts; quad < expert_end; quad += kWarps * kWarpExperts) {
        float g[kWarpExperts][8];
#pragma unroll
        for (int e = 0; e < kWarpExperts; ++e) {
            if (col_valid && quad + e < expert_end) {
                bf16x8_to_f32(__ldg(reinterpret_cast<const uint4 *>(p.gate + (long)(quad + e) * p.dim + col)), g[e]);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) g[e][i] = 0.f;
            }
        }
        for (int chunk = 0; chunk < group_tokens; chunk += kChunkTokens) {
            float acc[kWarpExperts * kChunkTokens];
#pragma unroll
            for (int i = 0; i < kWarpExperts * kChunkTokens; ++i) acc[i] = 0.f;
#pragma unroll
            for (int t = 0; t < kChunkTokens; ++t) {
                if (chunk + t < group_tokens) {
                    float h[8];
                    bf16x8_to_f32(shared.hidden[chunk + t][lane], h);
#pragma unroll
                    for (int e = 0; e < kWarpExperts; ++e)
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[e * kChunkTokens + t] = fmaf(g[e][i], h[i], acc[e * kChunkTokens + t]);
                }
            }
            const float total = transpose_reduce(acc);
            const int expert = quad + lane / kChunkTokens, token = chunk + lane % kChunkTokens;
            if (expert < expert_end && token < group_tokens) {
                p.partials[((long)slice * p.tokens + token0 + token) * p.experts + expert] = total;
            }
        }
    }

    if (!last_to_arrive(p.counters + blockIdx.z, gridDim.x * gridDim.y, &flag)) return;
    // Stage 2: this block is the last of its token group; every slice's partials are in L2.
    for (int i = tid; i < group_tokens * p.experts; i += kThreads) {
        const long at = (long)token0 * p.experts + i;
        float sum = 0.f;
        for (int s = 0; s < (int)gridDim.x; ++s) sum += __ldcg(p.partials + (long)s * p.tokens * p.experts + at);
        p.logits[at] = sum;
    }
    __syncthreads();
    for (int t = warp; t < group_tokens; t += kWarps) softmax_topk_warp(p, token0 + t);

    if (!last_to_arrive(p.counters + gridDim.z, gridDim.z, &flag)) return;
    moe_align_block(p.align, shared.align);
}

// The alignment alone, from topk_ids produced elsewhere (one block of 256 threads).
extern "C" __global__ void __launch_bounds__(kThreads) moe_align(const MoeAlignParams p) {
    __shared__ AlignShared align_shared;
    moe_align_block(p, align_shared);
}
