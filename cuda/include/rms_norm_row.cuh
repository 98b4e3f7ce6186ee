// One row of RMSNorm, optionally fused with the residual add and with the MoE combine before it: the body of
// cuda/norm.cu's kernels (one block per row) and of the GEMM row finishers in cuda/moe_gemm.cu (the last block that
// writes into a row normalises it in the same launch). Any block of a multiple of 32 threads (at most 1024) runs a row;
// every thread of the block must call it (block_sum synchronises).
//
// The row data (x, the MoE pairs, the residual) is read with ld.global.cg: in a GEMM finisher other blocks of the same
// launch wrote it, and L1 is not coherent between blocks (the writers fenced, the finisher fenced after seeing their
// arrivals). In a standalone launch ld.cg costs nothing extra: every byte is read once.
#pragma once
#include "params.h"
#include "common.cuh"

namespace {

constexpr int kVector = 8;  // bf16 per 16-byte load

// Most pairs a token's MoE combine may read (src/kernels/norm.rs checks top_k against it): one bit each of a row's
// mask of counting pairs.
constexpr int kMaxCombinePairs = 32;

// Bit j set: pair j of row `row` contributes to the MoE combine (moe_combine's rule: its expert id is in [0, experts)
// and local). The ids are loaded four at a time before any is tested: one round trip at top-4 (two with an expert
// map) instead of one per pair.
__device__ __forceinline__ unsigned counting_pairs(const RmsNormParams &p, int row) {
    unsigned mask = 0;
    for (int j0 = 0; j0 < p.top_k; j0 += 4) {
        int id[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) id[i] = p.topk_ids[row * p.top_k + min(j0 + i, p.top_k - 1)];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            bool counts = j0 + i < p.top_k && id[i] >= 0 && id[i] < p.experts;
            if (counts && p.expert_map != nullptr) counts = p.expert_map[id[i]] >= 0;
            mask |= (unsigned)counts << (j0 + i);
        }
    }
    return mask;
}

// How a row's loads are issued. kOverlapLoads (the default): the row's mask of counting pairs once, each group of four
// pairs' loads and the residual's issued before any sum, pass 2 unrolled by four: a finisher's row (4096 columns at
// 128 threads, top-4) waits about 9 memory round trips instead of about 45. Without it, one pair at a time, the
// residual after the combine, pass 2 rolled: fewer registers live, for the GEMMs at their register cap (the W8A8
// wgmma kernel's 96 spilled with the overlapped form inlined).
template <bool kOverlapLoads>
struct RowLoads {
    static constexpr int kPairsInFlight = kOverlapLoads ? 4 : 1;
};

// The MoE combine of 8 columns of row r as bf16-rounded f32: shared + the counting pairs, j increasing (`pairs`: the
// row's counting_pairs mask when hoisted, else computed here).
template <bool kOverlapLoads>
__device__ __forceinline__ void combine_chunk(const RmsNormParams &p, int row, unsigned hoisted_pairs, int col, float v[kVector]) {
    constexpr int kInFlight = RowLoads<kOverlapLoads>::kPairsInFlight;
    const unsigned pairs = kOverlapLoads ? hoisted_pairs : counting_pairs(p, row);
    float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
    if (p.shared_out != nullptr) {
        lo = __ldcg(reinterpret_cast<const float4 *>(p.shared_out + (long)row * p.cols + col));
        hi = __ldcg(reinterpret_cast<const float4 *>(p.shared_out + (long)row * p.cols + col + 4));
    }
    for (int j0 = 0; j0 < p.top_k; j0 += kInFlight) {
        float4 a[kInFlight], b[kInFlight];
#pragma unroll
        for (int i = 0; i < kInFlight; ++i) {
            a[i] = b[i] = make_float4(0.f, 0.f, 0.f, 0.f);
            if ((pairs >> (j0 + i)) & 1u) {
                const float *src = p.pair_out + (long)(row * p.top_k + j0 + i) * p.cols + col;
                a[i] = __ldcg(reinterpret_cast<const float4 *>(src));
                b[i] = __ldcg(reinterpret_cast<const float4 *>(src + 4));
            }
        }
#pragma unroll
        for (int i = 0; i < kInFlight; ++i) {
            if ((pairs >> (j0 + i)) & 1u) {
                lo.x += a[i].x, lo.y += a[i].y, lo.z += a[i].z, lo.w += a[i].w;
                hi.x += b[i].x, hi.y += b[i].y, hi.z += b[i].z, hi.w += b[i].w;
            }
        }
    }
    const float sum[kVector] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    bf16x8_to_f32(f32x8_to_bf16(sum), v);
}

__device__ __forceinline__ float combine_element(const RmsNormParams &p, int row, unsigned pairs, int col) {
    float sum = p.shared_out != nullptr ? __ldcg(p.shared_out + (long)row * p.cols + col) : 0.f;
    for (int j = 0; j < p.top_k; ++j) {
        if ((pairs >> j) & 1u) sum += __ldcg(p.pair_out + (long)(row * p.top_k + j) * p.cols + col);
    }
    return __bfloat162float(__float2bfloat16(sum));
}

// Loads 8 consecutive elements of h = x (+ residual) as f32, writing h back to residual_out when fusing. With
// kOverlapLoads the residual's load is issued first, so it overlaps the row's own loads.
template <bool Combine, bool kOverlapLoads>
__device__ __forceinline__ void load_row_chunk(const RmsNormParams &p, int row, unsigned pairs, long x_off, long out_off, int col, float v[kVector]) {
    uint4 residual = make_uint4(0, 0, 0, 0);
    if (kOverlapLoads && p.residual != nullptr) residual = __ldcg(reinterpret_cast<const uint4 *>(p.residual + x_off + col));
    if constexpr (Combine) {
        combine_chunk<kOverlapLoads>(p, row, pairs, col, v);
    } else {
        uint4 raw = __ldcg(reinterpret_cast<const uint4 *>(p.x + x_off + col));
        bf16x8_to_f32(raw, v);
    }
    if (p.residual != nullptr) {
        if (!kOverlapLoads) residual = __ldcg(reinterpret_cast<const uint4 *>(p.residual + x_off + col));
        float r[kVector];
        bf16x8_to_f32(residual, r);
#pragma unroll
        for (int i = 0; i < kVector; ++i) v[i] += r[i];
        // The sum is rounded to bf16 as the residual stream is bf16; the norm reads the rounded value.
        uint4 packed = f32x8_to_bf16(v);
        bf16x8_to_f32(packed, v);
        *reinterpret_cast<uint4 *>(p.residual_out + out_off + col) = packed;
    }
}

template <bool Combine>
__device__ __forceinline__ float load_element(const RmsNormParams &p, int row, unsigned pairs, long x_off, long out_off, int col) {
    float v = Combine ? combine_element(p, row, pairs, col) : __bfloat162float(__ldcg(p.x + x_off + col));
    if (p.residual != nullptr) {
        bf16 h = __float2bfloat16(v + __bfloat162float(__ldcg(p.residual + x_off + col)));
        p.residual_out[out_off + col] = h;
        v = __bfloat162float(h);
    }
    return v;
}

template <bool Combine, bool kOverlapLoads = true>
__device__ __forceinline__ void rms_norm_row(const RmsNormParams &p, int row) {
    if (row >= p.rows) return;
    const long x_off = (long)row * p.x_row_stride;
    const long out_off = (long)row * p.out_row_stride;
    const bool vectorised = (p.cols % kVector == 0) && (p.x_row_stride % kVector == 0) && (p.out_row_stride % kVector == 0);
    const unsigned pairs = Combine && kOverlapLoads ? counting_pairs(p, row) : 0u;

    // Pass 1: sum of squares (and the fused residual add, written once).
    float sum_sq = 0.f;
    if (vectorised) {
        for (int col = threadIdx.x * kVector; col < p.cols; col += blockDim.x * kVector) {
            float v[kVector];
            load_row_chunk<Combine, kOverlapLoads>(p, row, pairs, x_off, out_off, col, v);
#pragma unroll
            for (int i = 0; i < kVector; ++i) sum_sq += v[i] * v[i];
        }
    } else {
        const unsigned row_pairs = kOverlapLoads ? pairs : (Combine ? counting_pairs(p, row) : 0u);  // the mask, once
        for (int col = threadIdx.x; col < p.cols; col += blockDim.x) {
            float v = load_element<Combine>(p, row, row_pairs, x_off, out_off, col);
            sum_sq += v * v;
        }
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / (float)p.cols + p.eps);

    // Pass 2: scale. When fused, re-read the rounded sum this same thread wrote (no barrier needed). With
    // kOverlapLoads unrolled by 4 with no branch in the body: four chunks' loads in flight at once.
    const bf16 *h = p.residual != nullptr ? p.residual_out + out_off : p.x + x_off;
    if (vectorised) {
#pragma unroll(kOverlapLoads ? 4 : 1)
        for (int col = threadIdx.x * kVector; col < p.cols; col += blockDim.x * kVector) {
            float v[kVector], w[kVector];
            bf16x8_to_f32(__ldcg(reinterpret_cast<const uint4 *>(h + col)), v);
            bf16x8_to_f32(*reinterpret_cast<const uint4 *>(p.weight + col), w);
#pragma unroll
            for (int i = 0; i < kVector; ++i) v[i] = v[i] * inv_rms * w[i];
            *reinterpret_cast<uint4 *>(p.out + out_off + col) = f32x8_to_bf16(v);
        }
    } else {
        for (int col = threadIdx.x; col < p.cols; col += blockDim.x) {
            float v = __bfloat162float(__ldcg(h + col)) * inv_rms * __bfloat162float(p.weight[col]);
            p.out[out_off + col] = __float2bfloat16(v);
        }
    }
}

}  // namespace
