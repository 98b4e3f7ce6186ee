// RMSNorm, optionally fused with the residual add of the pre-norm decoder.
//
// Computes, for each row r:  h = x[r] (+ residual[r]);  residual_out[r] = h;  out[r] = h * rsqrt(mean(h^2) + eps) * w.
// Thread mapping: one block per row, blockDim.x threads (a multiple of 32, at most 1024) stride over the columns in
// chunks of 8 bf16 (one 16-byte vector) when the row is 16-byte aligned, else one element at a time.
// Reduction: warp shuffle (xor butterfly), then one f32 per warp in shared memory, then warp 0 combines.
// Bytes: reads 2*cols (x) + 2*cols (weight, L2-resident across rows) [+ 2*cols residual], writes 2*cols [+ 2*cols].
// FLOPs: ~4 per element. Bandwidth-bound; the second pass re-reads the row from L1/L2, not HBM.
#include "params.h"
#include "common.cuh"

namespace {

constexpr int kVector = 8;  // bf16 per 16-byte load

// Loads 8 consecutive elements of h = x (+ residual) as f32, writing h back to residual_out when fusing.
__device__ __forceinline__ void load_row_chunk(const RmsNormParams &p, long x_off, long out_off, int col, float v[kVector]) {
    uint4 raw = *reinterpret_cast<const uint4 *>(p.x + x_off + col);
    bf16x8_to_f32(raw, v);
    if (p.residual != nullptr) {
        float r[kVector];
        bf16x8_to_f32(*reinterpret_cast<const uint4 *>(p.residual + x_off + col), r);
#pragma unroll
        for (int i = 0; i < kVector; ++i) v[i] += r[i];
        // The sum is rounded to bf16 as the residual stream is bf16; the norm reads the rounded value.
        uint4 packed = f32x8_to_bf16(v);
        bf16x8_to_f32(packed, v);
        *reinterpret_cast<uint4 *>(p.residual_out + out_off + col) = packed;
    }
}

__device__ __forceinline__ float load_element(const RmsNormParams &p, long x_off, long out_off, int col) {
    float v = __bfloat162float(p.x[x_off + col]);
    if (p.residual != nullptr) {
        bf16 h = __float2bfloat16(v + __bfloat162float(p.residual[x_off + col]));
        p.residual_out[out_off + col] = h;
        v = __bfloat162float(h);
    }
    return v;
}

}  // namespace

extern "C" __global__ void rms_norm_bf16(const RmsNormParams p) {
    const int row = blockIdx.x;
    if (row >= p.rows) return;
    const long x_off = (long)row * p.x_row_stride;
    const long out_off = (long)row * p.out_row_stride;
    const bool vectorised = (p.cols % kVector == 0) && (p.x_row_stride % kVector == 0) && (p.out_row_stride % kVector == 0);

    // Pass 1: sum of squares (and the fused residual add, written once).
    float sum_sq = 0.f;
    if (vectorised) {
        for (int col = threadIdx.x * kVector; col < p.cols; col += blockDim.x * kVector) {
            float v[kVector];
            load_row_chunk(p, x_off, out_off, col, v);
#pragma unroll
            for (int i = 0; i < kVector; ++i) sum_sq += v[i] * v[i];
        }
    } else {
        for (int col = threadIdx.x; col < p.cols; col += blockDim.x) {
            float v = load_element(p, x_off, out_off, col);
            sum_sq += v * v;
        }
    }
    const float inv_rms = rsqrtf(block_sum(sum_sq) / (float)p.cols + p.eps);

    // Pass 2: scale. When fused, re-read the rounded sum this same thread wrote (no barrier needed).
    const bf16 *h = p.residual != nullptr ? p.residual_out + out_off : p.x + x_off;
    if (vectorised) {
        for (int col = threadIdx.x * kVector; col < p.cols; col += blockDim.x * kVector) {
            float v[kVector], w[kVector];
            bf16x8_to_f32(*reinterpret_cast<const uint4 *>(h + col), v);
            bf16x8_to_f32(*reinterpret_cast<const uint4 *>(p.weight + col), w);
#pragma unroll
            for (int i = 0; i < kVector; ++i) v[i] = v[i] * inv_rms * w[i];
            *reinterpret_cast<uint4 *>(p.out + out_off + col) = f32x8_to_bf16(v);
        }
    } else {
        for (int col = threadIdx.x; col < p.cols; col += blockDim.x) {
            float v = __bfloat162float(h[col]) * inv_rms * __bfloat162float(p.weight[col]);
            p.out[out_off + col] = __float2bfloat16(v);
        }
    }
}
