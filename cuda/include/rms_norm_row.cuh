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

// Whether pair j of row r contributes to the MoE combine (moe_combine's rule).
__device__ __forceinline__ bool pair_counts(const RmsNormParams &p, int pair) {
    const int id = p.topk_ids[pair];
    return id >= 0 && id < p.experts && (p.expert_map == nullptr || p.expert_map[id] >= 0);
}

// The MoE combine of 8 columns of row r as bf16-rounded f32: shared + the counting pairs, j increasing.
__device__ __forceinline__ void combine_chunk(const RmsNormParams &p, int row, int col, float v[kVector]) {
    float4 lo = make_float4(0.f, 0.f, 0.f, 0.f), hi = lo;
    if (p.shared_out != nullptr) {
        lo = __ldcg(reinterpret_cast<const float4 *>(p.shared_out + (long)row * p.cols + col));
        hi = __ldcg(reinterpret_cast<const float4 *>(p.shared_out + (long)row * p.cols + col + 4));
    }
    for (int j = 0; j < p.top_k; ++j) {
        const int pair = row * p.top_k + j;
        if (!pair_counts(p, pair)) continue;
        const float4 a = __ldcg(reinterpret_cast<const float4 *>(p.pair_out + (long)pair * p.cols + col));
        const float4 b = __ldcg(reinterpret_cast<const float4 *>(p.pair_out + (long)pair * p.cols + col + 4));
        lo.x += a.x, lo.y += a.y, lo.z += a.z, lo.w += a.w;
        hi.x += b.x, hi.y += b.y, hi.z += b.z, hi.w += b.w;
    }
    const float sum[kVector] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
    bf16x8_to_f32(f32x8_to_bf16(sum), v);
}

__device__ __forceinline__ float combine_element(const RmsNormParams &p, int row, int col) {
    float sum = p.shared_out != nullptr ? __ldcg(p.shared_out + (long)row * p.cols + col) : 0.f;
    for (int j = 0; j < p.top_k; ++j) {
        const int pair = row * p.top_k + j;
        if (pair_counts(p, pair)) sum += __ldcg(p.pair_out + (long)pair * p.cols + col);
    }
    return __bfloat162float(__float2bfloat16(sum));
}

// Loads 8 consecutive elements of h = x (+ residual) as f32, writing h back to residual_out when fusing.
template <bool Combine>
__device__ __forceinline__ void load_row_chunk(const RmsNormParams &p, int row, long x_off, long out_off, int col, float v[kVector]) {
    if constexpr (Combine) {
        combine_chunk(p, row, col, v);
    } else {
        uint4 raw = __ldcg(reinterpret_cast<const uint4 *>(p.x + x_off + col));
        bf16x8_to_f32(raw, v);
    }
    if (p.residual != nullptr) {
        float r[kVector];
        bf16x8_to_f32(__ldcg(reinterpret_cast<const uint4 *>(p.residual + x_off + col)), r);
#pragma unroll
        for (int i = 0; i < kVector; ++i) v[i] += r[i];
        // The sum is rounded to bf16 as the residual stream is bf16; the norm reads the rounded value.
        uint4 packed = f32x8_to_bf16(v);
        bf16x8_to_f32(packed, v);
        *reinterpret_cast<uint4 *>(p.residual_out + out_off + col) = packed;
    }
}

template <bool Combine>
__device__ __forceinline__ float load_element(const RmsNormParams &p, int row, long x_off, long out_off, int col) {
    float v = Combine ? combine_element(p, row, col) : __bfloat162float(__ldcg(p.x + x_off + col));
    if (p.residual != nullptr) {
        bf16 h = __float2bfloat16(v + __bfloat162float(__ldcg(p.residual + x_off + col)));
        p.residual_out[out_off + col] = h;
        v = __bfloat162float(h);
    }
    return v;
}

template <bool Combine>
__device__ __forceinline__ void rms_norm_row(const RmsNormParams &p, int row) {
    if (row >= p.rows) return;
    const long x_off = (long)row * p.x_row_stride;
    const long out_off = (long)row * p.out_row_stride;
    const bool vectorised = (p.cols % kVector == 0) && (p.x_row_stride % kVector == 0) && (p.out_row_stride % kVector == 0);

    // Pass 1: sum of squares (and the fused residual add, written once).
    float sum_sq = 0.f;
    if (vectorised) {
        for (int col = threadIdx.x * kVector; col < p.cols; col += blockDim.x * kVector) {
            float v[kVector];
            load_row_chunk<Combine>(p, row, x_off, out_off, col, v);
#pragma unroll
            for (int i = 0; i < kVector; ++i) sum_sq += v[i] * v[i];
        }
    } else {
        for (int col = threadIdx.x; col < p.cols; col += blockDim.x) {
            float v = load_element<Combine>(p, row, x_off, out_off, col);
            sum_sq += v * v;
        }
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / (float)p.cols + p.eps);

    // Pass 2: scale. When fused, re-read the rounded sum this same thread wrote (no barrier needed).
    const bf16 *h = p.residual != nullptr ? p.residual_out + out_off : p.x + x_off;
    if (vectorised) {
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
