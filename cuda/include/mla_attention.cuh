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

}  // namespace mla_tile
