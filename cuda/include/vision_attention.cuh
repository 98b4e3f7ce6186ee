// The per-warp pieces of the vision attention shared by its mma.sync kernel (cuda/vision.cu) and its wgmma kernel
// (cuda/vision_attention_wgmma.cu): both hold a warp's 16 queries x 64 keys of S, and its 16 queries x 64 dims of O, as
// eight mma.sync m16n8 C fragments (wgmma's m64n64 accumulator of a warp is the same fragment repeated over N / 8),
// so the masking, the online softmax, the packing of P into A fragments and the final store are one piece of code.
// Semantics (the kernels' file comments have the rest): keys outside a query's own segment are -inf, the softmax runs
// in f32 with base 2 and the scale folded in, P is rounded to bf16 and the normaliser sums the rounded P, so each
// output is a convex combination of the values with the weights the product used.
#pragma once
#include "params.h"
#include "common.cuh"

namespace block_diagonal_attention {

constexpr int kHeadDim = 64;
constexpr int kQueries = 64;  // per query tile (one warpgroup's, or the mma.sync kernel's 4 warps)
constexpr int kKeys = 64;     // per key tile
constexpr float kLog2E = 1.4426950408889634f;

// The segments of this thread's two rows (g and g + 8 of its warp's 16, `query` being row g's token); rows past the
// last token attend to nothing.
struct RowSegments {
    int start[2], end[2];
};
__device__ __forceinline__ RowSegments row_segments(const VisionAttentionParams &p, int query) {
    RowSegments rows;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int q = query + 8 * h;
        rows.start[h] = q < p.tokens ? p.segment_start[q] : 0;
        rows.end[h] = q < p.tokens ? p.segment_end[q] : 0;
    }
    return rows;
}

// The online softmax state of this thread's two rows.
struct SoftmaxState {
    float running_max[2], denominator[2];
};
__device__ __forceinline__ SoftmaxState softmax_start() { return SoftmaxState{{-INFINITY, -INFINITY}, {0.f, 0.f}}; }

// One key tile (keys first_key ..): masks and scales s in place, moves the state to the new running maxima, writes P
// (bf16) as the A fragments of O += P V (key k-step kk covers the S blocks 2kk, cols 0-7, and 2kk + 1, cols 8-15) and
// the factor by which each row's O must be rescaled (rescale_rows) before this tile's P V is added. `scale` is the
// softmax scale times log2(e); t is lane % 4.
__device__ __forceinline__ void softmax_tile(float (&s)[8][4], uint32_t (&pa)[4][4], float (&correction)[2], SoftmaxState &state, const RowSegments &rows,
                                             int first_key, int t, float scale) {
    float tile_max[2] = {-INFINITY, -INFINITY};
    // Inside a large image most tiles lie within both rows' segments: no key to mask, the same values without the
    // compares.
    const bool unmasked = first_key >= max(rows.start[0], rows.start[1]) && first_key + kKeys <= min(rows.end[0], rows.end[1]);
    if (unmasked) {
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[nb][e] *= scale;
                tile_max[e / 2] = fmaxf(tile_max[e / 2], s[nb][e]);
            }
        }
    } else {
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int h = e / 2, key = first_key + nb * 8 + 2 * t + (e & 1);
                const float v = key >= rows.start[h] && key < rows.end[h] ? s[nb][e] * scale : -INFINITY;
                s[nb][e] = v;
                tile_max[h] = fmaxf(tile_max[h], v);
            }
        }
    }
    float base[2];
    online_softmax_new_max(tile_max, state.running_max, state.denominator, base, correction);
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const __nv_bfloat162 pair = __floats2bfloat162_rn(exp2f(s[nb][2 * h] - base[h]), exp2f(s[nb][2 * h + 1] - base[h]));
            const float2 rounded = __bfloat1622float2(pair);
            state.denominator[h] += rounded.x + rounded.y;
            pa[nb / 2][(nb % 2) * 2 + h] = *reinterpret_cast<const uint32_t *>(&pair);
        }
    }
}

__device__ __forceinline__ void rescale_rows(float (&o)[8][4], const float (&correction)[2]) {
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nb][e] *= correction[e / 2];
    }
}

// Normalises this thread's two rows of O (row g's token `query`) and stores them as bf16, once; rows past the last
// token are skipped.
__device__ __forceinline__ void store_rows(const VisionAttentionParams &p, const float (&o)[8][4], const SoftmaxState &state, int query, int head, int t) {
    const long row_stride = (long)p.heads * kHeadDim;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float total = state.denominator[h];
        total += __shfl_xor_sync(0xffffffffu, total, 1);
        total += __shfl_xor_sync(0xffffffffu, total, 2);
        const int q = query + 8 * h;
        if (q >= p.tokens) continue;
        const float inverse = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            *reinterpret_cast<__nv_bfloat162 *>(p.out + q * row_stride + head * kHeadDim + nb * 8 + 2 * t) =
                __floats2bfloat162_rn(o[nb][2 * h] * inverse, o[nb][2 * h + 1] * inverse);
        }
    }
}

}  // namespace block_diagonal_attention
