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
// At one token (the decode step) the launcher runs router_topk_decode instead (below): the same outputs, the same
// logits bit for bit, with the serial tail (stage 2 and the alignment: barriers, loops over the experts and the pairs)
// replaced by one warp working in registers. It is a programmatic launch (common.cuh): each thread's gate rows
// (static weights, 4 x 16 bytes) are in flight before it waits for the kernel that wrote the hidden vector.
#include "params.h"
#include "common.cuh"
#include "l2_prefetch.cuh"

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

// The alignment's layout (contract: reference::moe::Alignment), in one place for both alignments: moe_align_block
// (one block, the counts in shared memory) and decode_route_and_align (one warp, the <= 8 pairs in registers). Local
// expert e owns the slots from offsets[e] (the tile-rounded counts of the experts below it, summed) for its padded
// count; its pairs take the first of them in pair order (slot = offset + rank), the rest are padding (-1), and each
// of its tiles of tile_m slots names it. Past num_padded (the last offset) every slot and tile is -1.

// The local expert of an expert map entry: one outside [0, local_experts) means "not here" (-1), never an
// out-of-bounds index.
__device__ __forceinline__ int align_local_expert(int mapped, int local_experts) {
    return (mapped >= 0 && mapped < local_experts) ? mapped : -1;
}

// Slots an expert of `count` pairs owns: the count rounded up to whole tiles (tile_m a power of two).
__device__ __forceinline__ int align_padded_count(int count, int tile_m) { return (count + tile_m - 1) & ~(tile_m - 1); }

// The slot of the pair of rank `rank` (pairs of the same expert before it) of the expert whose slots start at `offset`.
__device__ __forceinline__ int align_slot(int offset, int rank) { return offset + rank; }

// Local expert `expert`'s padding slots (after its `count` pairs from `offset`, up to `end`, the next expert's offset)
// and its tiles, by `threads` threads of which this is `thread`.
// The loops are short (an expert's padding is under one tile: a round or two of the threads), so they stay rolled: an
// unrolled loop's remainder arithmetic would cost more than the rounds.
__device__ __forceinline__ void align_fill_expert(const MoeAlignParams &p, int expert, int offset, int count, int end, int thread, int threads) {
#pragma unroll 1
    for (int r = offset + count + thread; r < end; r += threads) p.sorted_pairs[r] = -1;
#pragma unroll 1
    for (int t = offset / p.tile_m + thread; t < end / p.tile_m; t += threads) p.tile_experts[t] = expert;
}

// Every slot and tile past `num_padded` (up to the buffers' max_padded), by `threads` threads of which this is `thread`.
__device__ __forceinline__ void align_fill_past_end(const MoeAlignParams &p, int num_padded, int thread, int threads) {
#pragma unroll 1
    for (int r = num_padded + thread; r < p.max_padded; r += threads) p.sorted_pairs[r] = -1;
#pragma unroll 1
    for (int t = num_padded / p.tile_m + thread; t < p.max_padded / p.tile_m; t += threads) p.tile_experts[t] = -1;
}

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
        s.local_of[e] = align_local_expert(e < p.experts ? __ldcg(p.expert_map + e) : -1, p.local_experts);
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
    const int padded = align_padded_count(count, tile_m);
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

    // Padding rows of each expert (a warp each), tile owners, and everything past num_padded.
    for (int e = warp; e < p.local_experts; e += kWarps) align_fill_expert(p, e, s.offsets[e], s.counts[e], s.offsets[e + 1], lane, 32);
    align_fill_past_end(p, num_padded, tid, kThreads);

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
            // cursor[local] is the expert's offset plus its pairs in earlier chunks: the rank counts this chunk's.
            int rank = __popc(lower);
            for (int w = 0; w < warp; ++w) rank += s.warp_counts[w][local];
            p.sorted_pairs[align_slot(s.cursor[local], rank)] = pair;
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

// One step of transpose_reduce: lanes with bit `kDistance` set keep the upper kHalf of their 2 * kHalf values, the
// others the lower ones, and add the partner's copy of what they keep.
template <int kDistance, int kHalf>
__device__ __forceinline__ void transpose_step(float *v, int lane) {
    const bool upper = (lane & kDistance) != 0;
#pragma unroll
    for (int i = 0; i < kHalf; ++i) {
        const float send = upper ? v[i] : v[i + kHalf];
        const float keep = upper ? v[i + kHalf] : v[i];
        v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kDistance);
    }
}

// Sum over the warp of kCount values per lane (a power of two, at most 32); lane l returns the total of value
// l * kCount / 32 (kCount - 1 shuffles in halving steps at distances 16, 8, ..., then a plain butterfly over the
// distances left). Every total is the same xor-16, 8, 4, 2, 1 tree of additions whatever kCount, so the 4-value form
// of the decode kernel sums bit-identically to the 32-value form of router_topk.
template <int kCount, int kDistance = 16>
__device__ __forceinline__ float transpose_reduce(float *v, int lane) {
    if constexpr (kDistance == 0) {
        return v[0];
    } else {
        if constexpr (kCount > 1) {
            transpose_step<kDistance, kCount / 2>(v, lane);
        } else {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], kDistance);
        }
        return transpose_reduce<(kCount > 1 ? kCount / 2 : 1), kDistance / 2>(v, lane);
    }
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
            const float total = transpose_reduce<kWarpExperts * kChunkTokens>(acc, lane);
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

// ------------------------------------------------------------------------------------------------------------------
// router_topk_decode: the same routing for ONE token (the decode step), shaped for a short dependence chain. The
// launcher picks it at T = 1 with at most 128 experts and dim <= 4096; router_topk does every other call.
//
// Stage 1 (every block; grid = dim slices x expert groups of 32, 256 threads): the split-K partial logits exactly as
// router_topk computes them at T = 1 (each lane one 16-byte vector of 4 gate rows, 8 fma, the same xor tree over the
// warp, so the logits are bit-identical), except that the gate rows are loaded before the hidden slice is staged (both
// round trips overlap) and the transpose-reduce runs on the 4 live values only (6 shuffles instead of 31).
// Stage 2 (warp 0 of the last block to arrive, one atomic per block after a fence): everything else in that one warp,
// in registers, with no block barrier and no loop over the experts:
// - logits: each lane sums its 4 experts' <= 16 slice partials in slice order (16 float4 loads in flight at once),
//   the expert map with them;
// - top-k: each lane sorts its 4 keys (logit order-preserved in the high word, ~expert in the low word: larger =
//   better, ties to the lower index); k rounds of two redux.sync.max (the best logit, then the lowest expert among the
//   lanes holding it), the winner's lane pops its head;
// - weights: exp(logit - max) of the chosen, renormalised over the chosen, times routed_scale (the softmax's
//   denominator cancels in the renormalisation, so the full sum over the experts is not needed);
// - alignment: lane j holds pair j: match.any gives its expert's count and its rank among equal pairs, shuffles give
//   every lane the pairs' counts and padded counts; counts, offsets and num_padded are sums or selects over the <= 8
//   pairs, and the slots and tiles are written with moe_align_block's layout functions (align_*: the pair at
//   offset + rank, then each chosen expert's padding and tiles, then everything past num_padded).
// Stage 1's loads are unconditional (clamped addresses, masked after): a guarded load would end a basic block and
// put one memory latency per gate row on the chain. The k rounds and the alignment are unrolled for k <= 4 (the
// model's 4) or k <= 8.
// Bytes: the gate once, the hidden vector once per expert group (4 x 8 KiB), partials written and read (16 x 128 x 4
// B), logits and outputs written once (~1.05 x ideal). FLOPs: 2 * experts * dim.
constexpr int kDecodeMaxSlices = 16;                   // dim <= 4096
constexpr int kDecodeExpertsPerLane = 4;               // experts <= 128
constexpr int kDecodeExperts = kWarps * kWarpExperts;  // experts per block: 32

// Order-preserving key of (logit, expert): larger = ranked first. -0 counts as +0 (a tie, as the reference compares
// them), NaN below every number; the low word ~expert breaks ties to the lower index. 0 is below every valid key.
// An invalid expert (past the experts) gets key 0. Selects only: no branch.
__device__ __forceinline__ unsigned long long rank_key(float logit, int expert, bool valid) {
    const float x = logit + 0.0f;  // -0 + +0 = +0
    const unsigned bits = __float_as_uint(x);
    unsigned ordered = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
    ordered = (x != x || !valid) ? 0u : ordered;
    const unsigned low = valid ? 0xffffffffu - static_cast<unsigned>(expert) : 0u;
    return (static_cast<unsigned long long>(ordered) << 32) | low;
}

// The logit of a key's high word (the inverse of rank_key's order map).
__device__ __forceinline__ float key_logit(unsigned ordered) {
    return __uint_as_float((ordered & 0x80000000u) ? (ordered ^ 0x80000000u) : ~ordered);
}

__device__ __forceinline__ void compare_swap(unsigned long long &high, unsigned long long &low) {
    const unsigned long long a = high, b = low;
    high = a > b ? a : b;
    low = a > b ? b : a;
}

// Stage 2 of router_topk_decode, by one warp (see above), for k <= kPairs; kFull: all kDecodeMaxSlices slices are
// there (dim 4096), so no slice is masked. `slices` partial rows of `experts` logits (row stride `stride`, a multiple
// of 4) are in L2. Lane l owns experts 4l .. 4l + 3. Stores come after the arithmetic they need and the rounds are
// branch-free: a branch issues after everything before it, so a guarded store between two sums would serialise them.
template <int kPairs, bool kFull>
__device__ void decode_route_and_align(const RouterParams &p, int slices, int stride) {
    const int lane = lane_id();
    const MoeAlignParams &a = p.align;
    const int first = kDecodeExpertsPerLane * lane;
    // Every load is unconditional (clamped rows, masked after) so that all of them are in flight together.
    float4 partial[kDecodeMaxSlices];
#pragma unroll
    for (int s = 0; s < kDecodeMaxSlices; ++s) {
        const int row = kFull ? s : min(s, slices - 1), column = min(first, stride - kDecodeExpertsPerLane);  // lanes past the experts: masked
        partial[s] = __ldcg(reinterpret_cast<const float4 *>(p.partials + (long)row * stride + column));
    }
    int local_of[kDecodeExpertsPerLane];
#pragma unroll
    for (int i = 0; i < kDecodeExpertsPerLane; ++i) {
        local_of[i] = align_local_expert(__ldcg(a.expert_map + min(first + i, p.experts - 1)), a.local_experts);
    }
    float logit[kDecodeExpertsPerLane];
    unsigned long long keys[kDecodeExpertsPerLane];
#pragma unroll
    for (int i = 0; i < kDecodeExpertsPerLane; ++i) {
        // router_topk's order; a slice past the last adds nothing (the sum starts at +0, so it is never -0).
        logit[i] = 0.f;
#pragma unroll
        for (int s = 0; s < kDecodeMaxSlices; ++s) logit[i] += kFull || s < slices ? (&partial[s].x)[i] : 0.f;
    }
#pragma unroll
    for (int i = 0; i < kDecodeExpertsPerLane; ++i) keys[i] = rank_key(logit[i], first + i, first + i < p.experts);
    // Sorting network of 4, best first.
    static_assert(kDecodeExpertsPerLane == 4, "the sorting network below sorts 4 keys");
    compare_swap(keys[0], keys[1]);
    compare_swap(keys[2], keys[3]);
    compare_swap(keys[0], keys[2]);
    compare_swap(keys[1], keys[3]);
    compare_swap(keys[1], keys[2]);
    unsigned high[kDecodeExpertsPerLane], low[kDecodeExpertsPerLane];
#pragma unroll
    for (int i = 0; i < kDecodeExpertsPerLane; ++i) {
        high[i] = static_cast<unsigned>(keys[i] >> 32);
        low[i] = static_cast<unsigned>(keys[i]);
    }

    // kPairs rounds (those past k are computed and dropped): the best head over the warp, ties to the lower expert;
    // its lane pops it.
    int chosen_id[kPairs], chosen_local[kPairs];
    float chosen_logit[kPairs];
    int my_local = -1;  // lane j < k: the local expert of pair j (-1: not local)
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
        const unsigned best = __reduce_max_sync(0xffffffffu, high[0]);
        const unsigned winner = __reduce_max_sync(0xffffffffu, high[0] == best ? low[0] : 0u);
        const bool popped = high[0] == best && low[0] == winner;
#pragma unroll
        for (int i = 0; i + 1 < kDecodeExpertsPerLane; ++i) {
            high[i] = popped ? high[i + 1] : high[i];
            low[i] = popped ? low[i + 1] : low[i];
        }
        high[kDecodeExpertsPerLane - 1] = popped ? 0u : high[kDecodeExpertsPerLane - 1];
        low[kDecodeExpertsPerLane - 1] = popped ? 0u : low[kDecodeExpertsPerLane - 1];
        const int id = static_cast<int>(0xffffffffu - winner);
        const int slot = id & 3;
        int held = local_of[0];
#pragma unroll
        for (int i = 1; i < kDecodeExpertsPerLane; ++i) held = slot == i ? local_of[i] : held;
        const int looked_up = __shfl_sync(0xffffffffu, held, (id >> 2) & 31);
        chosen_id[j] = id;
        chosen_logit[j] = key_logit(best);
        chosen_local[j] = j < p.k ? looked_up : -1;
        my_local = lane == j ? chosen_local[j] : my_local;
    }

    // Weights: the softmax's denominator and the max cancel in the renormalisation over the chosen.
    float chosen_exp[kPairs], chosen_sum = 0.f;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
        chosen_exp[j] = __expf(chosen_logit[j] - chosen_logit[0]);
        chosen_sum += j < p.k ? chosen_exp[j] : 0.f;
    }
    const float norm = p.routed_scale / chosen_sum;

    // Alignment. Pair j (= lane j) among the pairs of its expert: count and rank; the first of them carries the
    // expert's count and tile-rounded count (`padded`), which every lane then sees for every pair.
    const unsigned peers = __match_any_sync(0xffffffffu, my_local);
    const int rank = __popc(peers & ((1u << lane) - 1u));
    const bool first_of_expert = my_local >= 0 && rank == 0;
    const int padded = first_of_expert ? align_padded_count(__popc(peers), a.tile_m) : 0;
    int pair_padded[kPairs];
    int num_padded = 0;
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
        pair_padded[j] = __shfl_sync(0xffffffffu, padded, j);
        num_padded += pair_padded[j];
    }
    // The first slot of an expert: the padded counts of the chosen experts below it.
    auto offset_of = [&](int local) {
        int offset = 0;
#pragma unroll
        for (int j = 0; j < kPairs; ++j) offset += chosen_local[j] < local ? pair_padded[j] : 0;
        return offset;
    };
    const int start = offset_of(my_local);
    // This lane's experts are consecutive: each offset is the previous one plus its padded count.
    int count[kDecodeExpertsPerLane], offset[kDecodeExpertsPerLane];
#pragma unroll
    for (int i = 0; i < kDecodeExpertsPerLane; ++i) {
        count[i] = 0;
#pragma unroll
        for (int j = 0; j < kPairs; ++j) count[i] += chosen_local[j] == first + i ? 1 : 0;
        offset[i] = i == 0 ? offset_of(first) : offset[i - 1] + align_padded_count(count[i - 1], a.tile_m);
    }
    // The slots and tiles of pair j's expert are written by lanes j * kGroup .. (j + 1) * kGroup - 1 (its group).
    static_assert(32 % kPairs == 0, "lane groups of equal size, one a pair");
    constexpr int kGroup = 32 / kPairs;
    const int group_pair = lane / kGroup;
    const int group_padded = __shfl_sync(0xffffffffu, padded, group_pair);  // 0 unless group_pair is its expert's first
    const int group_start = __shfl_sync(0xffffffffu, start, group_pair);
    const int group_count = __shfl_sync(0xffffffffu, __popc(peers), group_pair);
    const int group_local = __shfl_sync(0xffffffffu, my_local, group_pair);

    // The stores, last.
#pragma unroll
    for (int i = 0; i < kDecodeExpertsPerLane; ++i) {
        if (first + i < p.experts) p.logits[first + i] = logit[i];
        if (first + i < a.local_experts) {
            a.expert_counts[first + i] = count[i];
            a.expert_offsets[first + i] = offset[i];
        }
    }
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < kPairs; ++j) {
            if (j < p.k) {
                p.topk_ids[j] = chosen_id[j];
                p.topk_weights[j] = chosen_exp[j] * norm;
            }
        }
        a.expert_offsets[a.local_experts] = num_padded;
        a.num_padded[0] = num_padded;
    }
    // Pair j (lane j) at its slot; the padding and tiles of pair j's expert (when j is its first pair) by its lane
    // group, all experts at once; the slots past num_padded.
    if (my_local >= 0) a.sorted_pairs[align_slot(start, rank)] = lane;
    if (group_padded > 0) align_fill_expert(a, group_local, group_start, group_count, group_start + group_padded, lane % kGroup, kGroup);
    align_fill_past_end(a, num_padded, lane, 32);
}

// Grid: x = ceil(dim / 256) slices (<= 16), y = ceil(experts / 32) groups (<= 4); 256 threads; tokens == 1.
extern "C" __global__ void __launch_bounds__(kThreads) router_topk_decode(const RouterParams p) {
    __shared__ uint4 hidden_slice[kSlice / 8];
    // A later kernel's weights into L2 (l2_prefetch.cuh): static bytes, so before the wait, with the gate rows.
    prefetch_l2(p.l2_prefetch);
    const int tid = threadIdx.x, lane = lane_id(), warp = tid >> 5;
    const int col = blockIdx.x * kSlice + lane * 8;
    const bool col_valid = col < p.dim;
    const int quad = blockIdx.y * kDecodeExperts + warp * kWarpExperts;
    // Unconditional loads (clamped addresses; out-of-range rows and columns are masked after the barrier): all 4 rows
    // and the hidden vector in flight at once.
    const int safe_col = min(col, p.dim - 8);
    uint4 rows[kWarpExperts];
#pragma unroll
    for (int e = 0; e < kWarpExperts; ++e) {
        rows[e] = __ldg(reinterpret_cast<const uint4 *>(p.gate + (long)min(quad + e, p.experts - 1) * p.dim + safe_col));
    }
    // Programmatic launch (common.cuh): the gate rows are weights, in flight while the kernel before finishes; the
    // hidden vector is its output.
    wait_then_allow_dependents();
    if (warp == 0) {
        const uint4 hidden = __ldg(reinterpret_cast<const uint4 *>(p.hidden + safe_col));
        hidden_slice[lane] = col_valid ? hidden : make_uint4(0, 0, 0, 0);
    }
    __syncthreads();
    float h[8];
    bf16x8_to_f32(hidden_slice[lane], h);
    float acc[kWarpExperts];
#pragma unroll
    for (int e = 0; e < kWarpExperts; ++e) {
        // A row past the experts is never stored; a column past dim adds router_topk's fma(0, 0, +0) = +0.
        float g[8];
        bf16x8_to_f32(rows[e], g);
        acc[e] = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[e] = fmaf(g[i], h[i], acc[e]);
        acc[e] = col_valid ? acc[e] : 0.f;
    }
    const float total = transpose_reduce<kWarpExperts>(acc, lane);
    const int expert = quad + lane / 8;
    const int stride = (p.experts + 3) & ~3;  // 16-byte rows for the last warp's vector loads
    if (lane % 8 == 0 && expert < p.experts) p.partials[(long)blockIdx.x * stride + expert] = total;

    // Arrival: one atomic per block, by warp 0 once every warp's partials are fenced; warp 0 of the last block goes on.
    __threadfence();
    __syncthreads();
    if (warp != 0) return;
    int previous = 0;
    if (lane == 0) previous = atomicAdd(p.counters, 1);
    const int blocks = gridDim.x * gridDim.y;
    if (__shfl_sync(0xffffffffu, previous, 0) != blocks - 1) return;
    if (lane == 0) *p.counters = 0;  // reset for the next launch: nobody else touches it again in this one
    __threadfence();
    const int slices = gridDim.x;
    if (p.k <= 4) {
        slices == kDecodeMaxSlices ? decode_route_and_align<4, true>(p, slices, stride) : decode_route_and_align<4, false>(p, slices, stride);
    } else {
        slices == kDecodeMaxSlices ? decode_route_and_align<kMaxK, true>(p, slices, stride)
                                   : decode_route_and_align<kMaxK, false>(p, slices, stride);
    }
}

// The alignment alone, from topk_ids produced elsewhere (one block of 256 threads).
extern "C" __global__ void __launch_bounds__(kThreads) moe_align(const MoeAlignParams p) {
    __shared__ AlignShared align_shared;
    moe_align_block(p, align_shared);
}
