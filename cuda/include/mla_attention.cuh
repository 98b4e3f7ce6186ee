// The per-warp pieces of the MLA attention tile shared by its mma.sync kernel (mla_attention_*, cuda/mla_attention.cu)
// and its wgmma kernel (mla_attention_wgmma_*, cuda/mla_attention_wgmma.cu): both hold a warp's 16 rows x 32 tokens
// of S as four mma.sync m16n8 C fragments and its 16 rows x 256 latent columns of O as 32 (wgmma's m64n32 and m64n256
// accumulators of a warp are the same fragments repeated over N / 8), so the causal masking, the online softmax, the
// packing of P into A fragments and the final store are one piece of code, and the two kernels agree bit for bit
// wherever their products do.
// Semantics: log2-domain online softmax with the score scale folded in; masked keys are -inf; a row that has seen no
// key keeps max -inf and takes 0 as its exponent base (no NaN); the normaliser sums the f32 weights (P is rounded to
// bf16 only as the P V operand); one rounding of the output (or f32 partials when split).
#pragma once
#include "params.h"
#include "common.cuh"
#include "mma.cuh"
#include "mla_cache.cuh"

namespace mla_tile {

constexpr int kTileN = 32;  // cache tokens per key tile (one block-table entry per lane of a loader warp)
constexpr float kLog2e = 1.4426950408889634f;
static_assert(kWidth % 16 == 0 && kLatent % 16 == 0, "k-steps of 16");

// The online softmax state of this thread's two rows (g and g + 8 of its warp's 16): running max (log2 domain), sum
// of weights, and the position each may attend up to (-1: a padding row, sees nothing).
struct RowState {
    float max[2], sum[2];
    int pos[2];
};

// One key tile (tokens tile_start ..): masks (key < kv_end and key <= the row's position) and scales s in place,
// moves the state to the new maxima, replaces s by the f32 weights, writes P (bf16) as the A fragments of O += P V
// (token k-step k covers the S blocks 2k, tokens 0-7, and 2k + 1, tokens 8-15) and the factor by which each row's O
// must be rescaled (rescale_rows) before this tile's P V is added. `score_scale` includes log2(e); quad is lane % 4.
__device__ __forceinline__ void softmax_tile(float (&s)[kTileN / 8][4], uint32_t (&pa)[kTileN / 16][4], float (&correction)[2], RowState &state,
                                             int tile_start, int kv_end, int quad, float score_scale) {
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kTileN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int key = tile_start + n * 8 + quad * 2 + (e & 1), h = e >> 1;
            const bool visible = key < kv_end && key <= state.pos[h];
            s[n][e] = visible ? s[n][e] * score_scale : -INFINITY;
            tile_max[h] = fmaxf(tile_max[h], s[n][e]);
        }
    }
    float base[2];
    online_softmax_new_max(tile_max, state.max, state.sum, base, correction);
#pragma unroll
    for (int n = 0; n < kTileN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            s[n][e] = exp2f(s[n][e] - base[e >> 1]);
            state.sum[e >> 1] += s[n][e];
        }
    }
#pragma unroll
    for (int k = 0; k < kTileN / 16; ++k) {
        pa[k][0] = pack_bf16x2(s[2 * k][0], s[2 * k][1]);
        pa[k][1] = pack_bf16x2(s[2 * k][2], s[2 * k][3]);
        pa[k][2] = pack_bf16x2(s[2 * k + 1][0], s[2 * k + 1][1]);
        pa[k][3] = pack_bf16x2(s[2 * k + 1][2], s[2 * k + 1][3]);
    }
}

__device__ __forceinline__ void rescale_rows(float (&o)[kLatent / 8][4], const float (&correction)[2]) {
#pragma unroll
    for (int n = 0; n < kLatent / 8; ++n) {
        o[n][0] *= correction[0];
        o[n][1] *= correction[0];
        o[n][2] *= correction[1];
        o[n][3] *= correction[1];
    }
}

// Completes this thread's two rows (row g's global (token, head) row `grow0`, row g + 8's grow0 + 8): full sums over
// the quad, then o_lat (one split) or the split's f32 partials. Rows that are padding, or whose position precedes
// split_begin, have no key in this split: nothing is written.
__device__ __forceinline__ void store_rows(const MlaAttentionParams &p, const float (&o)[kLatent / 8][4], RowState &state, int split, int split_begin,
                                           long grow0, int quad) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        state.sum[h] += __shfl_xor_sync(0xffffffffu, state.sum[h], 1);
        state.sum[h] += __shfl_xor_sync(0xffffffffu, state.sum[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        if (state.pos[h] < split_begin) continue;
        const long grow = grow0 + 8 * h;
        const float factor = p.value_scale / state.sum[h];
        if (p.num_splits == 1) {
            bf16 *dst = p.o_lat + grow * kLatent + quad * 2;
#pragma unroll
            for (int n = 0; n < kLatent / 8; ++n)
                *reinterpret_cast<__nv_bfloat162 *>(dst + n * 8) = __floats2bfloat162_rn(o[n][2 * h] * factor, o[n][2 * h + 1] * factor);
        } else {
            const long prow = (long)split * p.total_rows + grow;
            float *dst = p.partial_o + prow * kLatent + quad * 2;
#pragma unroll
            for (int n = 0; n < kLatent / 8; ++n)
                *reinterpret_cast<float2 *>(dst + n * 8) = make_float2(o[n][2 * h] * factor, o[n][2 * h + 1] * factor);
            if (quad == 0) *reinterpret_cast<float2 *>(p.partial_ml + prow * 2) = make_float2(state.max[h], state.sum[h]);
        }
    }
}

constexpr int kMaxCombineRows = 4;         // most rows a warp of the fused combine works on at once
constexpr int kCombineLoadsInFlight = 16;  // (row, split) partials a combining warp loads at once: R rows x 16 / R splits

// The split combine of up to R (token, head) rows of one sequence, by one warp: o_lat[row] = sum_i w_i o_i / sum_i w_i
// with w_i = l_i 2^(m_i - max_j m_j), over the splits i that hold a key of the row (i * tokens_per_split <=
// position), in split order: deterministic, and the same arithmetic for every R and wherever it runs (the fused tail
// of mla_attention_* and mla_attention_wgmma_*, R = 1, 2 or kMaxCombineRows; the standalone mla_attention_combine, R = 1): each row's operations are those
// of R = 1, only interleaved, its R rows' loads of kCombineLoadsInFlight / R splits are in flight together (16 x 1 KiB). Lane l owns
// latent values 4l..4l+3 and 128+4l..128+4l+3 (each warp load is 512 contiguous bytes); lane i reads the (max, sum)
// of split i (of each group of 32) and passes its weight around by shuffle. Partials are read with ld.cg: other
// blocks wrote them in this launch (fused), so never from L1. rows[r] < 0: no row in that slot (rows[0] >= 0).
// Bytes per row and split: 1 KiB + 8 read; 512 written per row. FLOPs: ~3 per value and split.
template <int R>
__device__ __forceinline__ void combine_rows(const MlaAttentionParams &p, int q_begin, int first_pos, const int (&rows)[R]) {
    const int lane = threadIdx.x & 31;
    const float2 *ml = reinterpret_cast<const float2 *>(p.partial_ml);
    // An empty slot loads rows[0]'s split 0 (always written: every row has a key in split 0) with weight 0.
    int splits[R], last_split[R], max_splits = 0;
    long grow[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        splits[r] = rows[r] < 0 ? 0 : min(p.num_splits, (first_pos + rows[r] / p.heads) / p.tokens_per_split + 1);
        last_split[r] = max(splits[r] - 1, 0);
        grow[r] = (long)q_begin * p.heads + (rows[r] < 0 ? rows[0] : rows[r]);
        max_splits = max(max_splits, splits[r]);
    }

    // The (max, sum) of the first 32 splits are loaded once, for the global max and then for the weights: one round
    // trip, not two, before the partials' loads (the common case: at most 32 splits).
    float2 first_ml[R];
    float global_max[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        first_ml[r] = lane < splits[r] ? __ldcg(ml + (long)lane * p.total_rows + grow[r]) : make_float2(-INFINITY, 0.f);
        global_max[r] = fmaxf(-INFINITY, first_ml[r].x);  // as the loop below would start (fmaxf drops a NaN)
    }
    for (int i = lane + 32; i < max_splits; i += 32) {
#pragma unroll
        for (int r = 0; r < R; ++r)
            if (i < splits[r]) global_max[r] = fmaxf(global_max[r], __ldcg(ml + (long)i * p.total_rows + grow[r]).x);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) global_max[r] = warp_max(global_max[r]);
    float acc[R][8], total[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        total[r] = 0.f;
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[r][k] = 0.f;
    }
    for (int base = 0; base < max_splits; base += 32) {
        float my_weight[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            my_weight[r] = 0.f;
            if (base + lane < splits[r]) {
                const float2 split_ml = base == 0 ? first_ml[r] : __ldcg(ml + (long)(base + lane) * p.total_rows + grow[r]);
                my_weight[r] = split_ml.y * exp2f(split_ml.x - global_max[r]);
            }
            total[r] += my_weight[r];
        }
        // Branch-free, so the loads of several splits and rows overlap: a row with fewer splits (prefill tiles only)
        // re-reads its last split's partial with weight 0, which leaves its sums exactly as they are.
#pragma unroll(kCombineLoadsInFlight / R)
        for (int j = 0; j < min(32, max_splits - base); ++j) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float weight = __shfl_sync(0xffffffffu, my_weight[r], j);
                const int split = min(base + j, last_split[r]);
                const float4 *src = reinterpret_cast<const float4 *>(p.partial_o + ((long)split * p.total_rows + grow[r]) * kLatent);
                const float4 lo = __ldcg(src + lane), hi = __ldcg(src + 32 + lane);
                float *a = acc[r];
                a[0] += weight * lo.x, a[1] += weight * lo.y, a[2] += weight * lo.z, a[3] += weight * lo.w;
                a[4] += weight * hi.x, a[5] += weight * hi.y, a[6] += weight * hi.z, a[7] += weight * hi.w;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (rows[r] < 0) continue;  // warp-uniform
        const float inv_total = 1.f / warp_sum(total[r]);
        const float *a = acc[r];
        bf16 *dst = p.o_lat + grow[r] * kLatent;
        *reinterpret_cast<uint2 *>(dst + 4 * lane) =
            make_uint2(pack_bf16x2(a[0] * inv_total, a[1] * inv_total), pack_bf16x2(a[2] * inv_total, a[3] * inv_total));
        *reinterpret_cast<uint2 *>(dst + 128 + 4 * lane) =
            make_uint2(pack_bf16x2(a[4] * inv_total, a[5] * inv_total), pack_bf16x2(a[6] * inv_total, a[7] * inv_total));
    }
}

// The fused combine of rows row0..last_row by `warps` warps (this one: `warp`), R rows a warp at a time (rows row0 +
// warp * R + k, then the next group).
template <int R>
__device__ __forceinline__ void combine_tile_rows(const MlaAttentionParams &p, int q_begin, int first_pos, int row0, int last_row, int warp, int warps) {
    for (int first = row0 + warp * R; first <= last_row; first += warps * R) {
        int rows[R];
#pragma unroll
        for (int k = 0; k < R; ++k) rows[k] = first + k <= last_row ? first + k : -1;
        combine_rows<R>(p, q_begin, first_pos, rows);
    }
}

// The fused split combine of one split block of both kernels (p.split_counters set, more than one split), run by the
// `warps` warps that stored its partials (this one: `warp`; mma.sync: the whole block, wgmma: the consumer warpgroups,
// the producer's warps having exited) after their stores; `sync` is a barrier of exactly those warps and
// `last_arrival` a shared int. It is the GEMM row finishers' "last block" pattern (cuda/include/gemm_epilogue.cuh
// finish_rows), per (sequence, row tile blockIdx.x): every split block of the tile fences its partial stores and
// arrives on the tile's counter (blocks whose split holds no key of the tile arrive too, with nothing written); the
// block whose arrival completes the count (num_splits) zeroes the counter for the next launch (graph replay) and
// combines the tile's rows row0..last_row, each warp R rows at a time (combine_tile_rows, splits in fixed order), R as
// small as the rows over the warps allow (each row's arithmetic is the same for every R: combine_rows).
template <typename Sync>
__device__ __forceinline__ void combine_if_last_split(const MlaAttentionParams &p, int seq, int q_begin, int first_pos, int row0, int last_row, int warp,
                                                      int warps, int *last_arrival, Sync &&sync) {
    __threadfence();  // this thread's partial stores are visible device-wide before the block arrives
    sync();
    if (threadIdx.x == 0) {  // warp 0 combines in both kernels
        int *counter = p.split_counters + (long)seq * gridDim.x + blockIdx.x;
        *last_arrival = atomicAdd(counter, 1) == p.num_splits - 1;
        if (*last_arrival) *counter = 0;  // every arrival of this launch is in: zero for the next launch
    }
    sync();
    if (!*last_arrival) return;
    __threadfence();  // the other blocks fenced their stores before arriving: read them from here on (ld.cg)
    const int rows_per_warp = (last_row - row0) / warps + 1;
    if (rows_per_warp <= 1) {
        combine_tile_rows<1>(p, q_begin, first_pos, row0, last_row, warp, warps);
    } else if (rows_per_warp <= 2) {
        combine_tile_rows<2>(p, q_begin, first_pos, row0, last_row, warp, warps);
    } else {
        combine_tile_rows<kMaxCombineRows>(p, q_begin, first_pos, row0, last_row, warp, warps);
    }
}

}  // namespace mla_tile
