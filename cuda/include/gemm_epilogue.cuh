// What the GEMM kernels (cuda/moe_gemm.cu's mma.sync tiles and cuda/moe_gemm_wgmma.cu's wgmma tile) share besides
// their k loops: which slots a block computes, and the optional epilogue steps run by every thread of the block after
// its output stores: the query RoPE on the block's output tile (MoeGemmParams.rope) and the row finisher
// (MoeGemmParams.finish, params.h GemmRowFinish).
#pragma once
#include "params.h"
#include "common.cuh"
#include "mla_cache.cuh"
#include "rms_norm_row.cuh"

namespace {

// The slots (rows) and the matrix of a block of BN slots, as params.h MoeGemmParams lays them out: `tail` = one of the
// dense tail's blocks (after the grouped tiles: the shared expert, matrix 0 of its own arrays); grouped mode = an
// expert's BN-slot group, worked by its first tile only (the group shares one pass over the weights); dense mode = BN
// rows of matrix blockIdx.z (a batched launch runs matrix z on head z's columns; a split-K launch, whose z is the k
// split, has one matrix). False: nothing for this block. (The wgmma kernels are persistent and map their own tiles:
// moe_gemm_wgmma.cu.)
template <int BN>
__device__ __forceinline__ bool block_slots(const MoeGemmParams &p, bool tail, int &expert, int &slot_begin, int &slot_end) {
    if (tail) {
        expert = 0;
        slot_begin = (blockIdx.y - p.capacity_tiles) * BN;
        if (slot_begin >= p.tail.rows) return false;
        slot_end = min(slot_begin + BN, p.tail.rows);
    } else if (p.sorted_pairs != nullptr) {
        const int tile = blockIdx.y;
        if (tile >= p.capacity_tiles) return false;
        // Each pair of loads is issued before either is tested: two round trips before the block knows its work, not
        // four (a decode launch's blocks wait for them before their first weight load). Tiles past num_padded hold
        // expert -1 (the aligner fills every tile), so reading one is harmless.
        const int padded = *p.num_padded;
        expert = p.tile_experts[tile];
        if (tile * p.tile_m >= padded || expert < 0) return false;
        const int first_slot = p.expert_offsets[expert], group_end = p.expert_offsets[expert + 1];
        slot_begin = tile * p.tile_m;
        if ((slot_begin - first_slot) % BN != 0) return false;
        slot_end = min(slot_begin + BN, group_end);
    } else {
        // A split-K launch (mma.sync decode tiles only) has one matrix: its grid z is the k split.
        expert = p.k_splits > 1 ? 0 : blockIdx.z;
        slot_begin = blockIdx.y * BN;
        if (slot_begin >= p.dense_rows) return false;
        slot_end = min(slot_begin + BN, p.dense_rows);
    }
    return true;
}

// One slot's two accumulator values of a warp's 16-row weight tile, after the row scales: v_g of output feature
// tile * 16 + g and v_g8 of the feature 8 rows on. SwiGLU: the repack interleaves 8 gate rows and the 8 matching up
// rows in every 16-row tile, so the pair is (gate, up) of hidden column tile * 8 + g. Otherwise a plain store into
// the output row (the pair's, or the slot's), times the pair's routing weight; a dense tail's rows are its own and
// unweighted (the shared expert has no routing weight). out_bf16 / out_f32: the block's output (one of them null).
__device__ __forceinline__ void store_slot(const MoeGemmParams &p, bool tail, bf16 *out_bf16, float *out_f32, int out_stride, int tile, int g, long slot_row,
                                           int pair, float v_g, float v_g8) {
    if (p.swiglu) {
        const int h = tile * 8 + g;
        if (h < p.out_cols) {
            const float act = v_g / (1.f + __expf(-v_g)) * v_g8;
            out_bf16[slot_row * out_stride + h] = __float2bfloat16(act);
        }
        return;
    }
    const int feature = tile * 16 + g;
    const long out_row = p.out_by_pair && !tail ? pair : slot_row;
    const float weight = p.pair_weights != nullptr && !tail ? p.pair_weights[pair] : 1.f;
    if (out_f32 != nullptr) {
        float *o = out_f32 + out_row * out_stride;
        if (feature < p.out_cols) o[feature] = v_g * weight;
        if (feature + 8 < p.out_cols) o[feature + 8] = v_g8 * weight;
    } else {
        bf16 *o = out_bf16 + out_row * out_stride;
        if (feature < p.out_cols) o[feature] = __float2bfloat16(v_g * weight);
        if (feature + 8 < p.out_cols) o[feature + 8] = __float2bfloat16(v_g8 * weight);
    }
}

// One 16-feature weight tile's accumulators over NF 8-slot fragments (mma.sync C layout: acc[f][r] is feature g
// (r = 0, 1) or g + 8 (r = 2, 3), slot 8 f + 2 t + (r % 2); g = lane / 4, t = lane % 4) times the features' row
// scales: store_slot for every real slot of the block's first `slots`.
template <int NF>
__device__ __forceinline__ void store_tile_slots(const MoeGemmParams &p, bool tail, bf16 *out_bf16, float *out_f32, int out_stride, const float (&acc)[NF][4],
                                                 const int *slot_pair, int tile, int g, int t, int slot_begin, int slots, float scale_g, float scale_g8) {
#pragma unroll
    for (int f = 0; f < NF; ++f) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int slot = f * 8 + 2 * t + half;
            if (slot >= slots) continue;
            const int pair = slot_pair[slot];
            if (pair < 0) continue;
            const float v_g = acc[f][half] * scale_g, v_g8 = acc[f][2 + half] * scale_g8;
            store_slot(p, tail, out_bf16, out_f32, out_stride, tile, g, slot_begin + slot, pair, v_g, v_g8);
        }
    }
}

// The epilogue of one warp's 16-feature weight tile over a block's 64 slots, from the wgmma accumulator fragment
// (../shared/HOPPER-ASYNC.md §1.5: acc[4 f + r] is feature g (r = 0, 1) or g + 8 (r = 2, 3) of the tile, slot
// 8 f + 2 t + (r % 2); g = lane / 4, t = lane % 4): the per-row scales (row_scales, when given), then store_slot for
// every real slot. Grouped or dense mode, no tail; a batched launch writes head z's columns.
__device__ __forceinline__ void store_wgmma_warp_tile(const MoeGemmParams &p, const float (&acc)[32], const int *slot_pair, int expert, int tile,
                                                      int slot_begin, int slots) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int feature = tile * 16 + g;
    float scale_g = 1.f, scale_g8 = 1.f;
    if (p.weights.row_scales != nullptr) {
        const float *rs = p.weights.row_scales + (long)expert * p.rows_padded;
        scale_g = rs[feature], scale_g8 = rs[feature + 8];
    }
    bf16 *const out_bf16 = p.out_bf16 ? p.out_bf16 + (long)blockIdx.z * p.out_batch_stride : nullptr;
    float *const out_f32 = p.out_f32 ? p.out_f32 + (long)blockIdx.z * p.out_batch_stride : nullptr;
    store_tile_slots(p, false, out_bf16, out_f32, p.out_stride, reinterpret_cast<const float(&)[8][4]>(acc), slot_pair, tile, g, t, slot_begin, slots, scale_g,
                     scale_g8);
}

// rope_q_k's q half on this block's output tile (dense mode; params.h MoeGemmParams.rope): features
// [feature_begin, feature_begin + features) of rows [row_begin, row_begin + rows), read back after the block's stores
// (a barrier makes them visible to every thread of the block), rotated and scaled with rope_q_k's functions, rounded.
// Thread mapping: one pair of features of one row per thread, strided. Bytes: the tile again, from L1/L2.
__device__ __forceinline__ void rope_output_tile(const MoeGemmParams &p, int row_begin, int rows, int feature_begin, int features) {
    const RopeParams &r = p.rope;
    const int nope = r.head_dim - r.rope_dim, pairs = features / 2;
    __syncthreads();
    for (int i = threadIdx.x; i < rows * pairs; i += blockDim.x) {
        const int row = row_begin + i / pairs, feature = feature_begin + 2 * (i % pairs);
        if (feature >= p.out_cols) continue;
        const int pos = r.positions[row];
        __nv_bfloat162 *o = reinterpret_cast<__nv_bfloat162 *>(p.out_bf16 + (long)row * p.out_stride + feature);
        const float2 v = __bfloat1622float2(*o);
        float a = v.x, b = v.y;
        const int rope_col = feature % r.head_dim - nope;
        if (rope_col >= 0) {
            float sin_v, cos_v;
            rope_sincos(pos, r.inv_freq[rope_col / 2], &sin_v, &cos_v);
            rope_rotate(a, b, cos_v, sin_v);
        }
        const float scale = llama4_query_scale(pos, r.scale_beta, r.scale_original_max);
        *o = __floats2bfloat162_rn(a * scale, b * scale);
    }
}

// The row finisher (params.h GemmRowFinish): after this block's stores, one arrival per row it wrote; then the
// finishing step, with the whole block, on each row whose arrivals this block completed. Every thread calls it.
// A row's slots never share a block (a token has one pair per expert; dense and tail slots are distinct rows), so the
// threads' rows are distinct.
// kOverlapLoads: how the rows' loads are issued (rms_norm_row.cuh RowLoads; false for kernels at their register cap).
// kMaxSlots: the block's most slots (its BN), at most its threads.
template <bool kOverlapLoads = true, int kMaxSlots = 64>
__device__ __forceinline__ void finish_rows(const MoeGemmParams &p, const int *slot_pair, int slots, int slot_begin, bool tail) {
    __shared__ int done_rows[kMaxSlots];
    __shared__ int done_count;
    const GemmRowFinish &f = p.finish;
    __threadfence();  // this thread's stores are visible device-wide before its block arrives
    if (threadIdx.x == 0) done_count = 0;
    __syncthreads();
    const int s = threadIdx.x;  // one slot per thread: every caller's block has at least kMaxSlots threads
    if (s < slots && slot_pair[s] >= 0) {
        const int row = p.sorted_pairs != nullptr && !tail ? slot_pair[s] / p.top_k : slot_begin + s;
        // Writes into the row: one, or for the MoE combine the token's counting pairs and the shared expert's row
        // when it rides in this launch (a pair without a local expert is never written, so it is not waited for).
        int writes = 1;
        if (f.kind == SMALL4_GEMM_FINISH_MOE_NORM) {
            writes = (p.tail.rows > 0) + __popc(counting_pairs(f.norm, row));
        }
        if (atomicAdd(f.counters + row, 1) == f.column_blocks * writes - 1) {
            f.counters[row] = 0;  // all arrivals of this launch are in: zero for the next launch
            done_rows[atomicAdd(&done_count, 1)] = row;
        }
    }
    __syncthreads();
    const int done = done_count;
    if (done == 0) return;
    __threadfence();  // the other blocks fenced their stores before arriving: read them from here on (ld.cg)
    for (int i = 0; i < done; ++i) {
        const int row = done_rows[i];
        if (f.kind == SMALL4_GEMM_FINISH_MOE_NORM) {
            rms_norm_row<true, kOverlapLoads>(f.norm, row);
        } else {
            rms_norm_row<false, kOverlapLoads>(f.norm, row);
            if (threadIdx.x < 32 && f.kind == SMALL4_GEMM_FINISH_MLA_LATENTS_BF16) cache_write<false>(f.cache, row);
            if (threadIdx.x < 32 && f.kind == SMALL4_GEMM_FINISH_MLA_LATENTS_FP8) cache_write<true>(f.cache, row);
        }
    }
}


}  // namespace
