// The weight formats of the grouped / dense GEMMs as the kernels see them: bytes per 16x64 weight tile, the scales a
// stage needs, and the dequantisation of a lane's mma A fragment to bf16 in registers. Shared by the mma.sync kernels
// (cuda/moe_gemm.cu) and the wgmma kernels (cuda/moe_gemm_wgmma.cu), so both read the repacked layout of
// src/quant/repack.rs with the same code.
#pragma once
#include "params.h"
#include "common.cuh"
#include "quant.cuh"

namespace {

constexpr int kBK = 64;  // k per pipeline stage (one 64-k block of the repacked layout)

enum class Format { Bf16, Fp8, Fp8Block, Int4, Nvfp4 };

// The grouped GEMM's field or its dense tail's, chosen by value: `tail ? p.tail.f : p.f` on the fields themselves
// may become a select of their addresses, which copies the kernel parameters to local memory (a "spill").
template <typename T>
__device__ __forceinline__ T pick(bool tail, T tail_value, T value) { return tail ? tail_value : value; }

// ---- weight formats: bytes per 16x64 tile, per-stage scales, fragment dequantisation --------------------------------
//
// Fragment layout (src/quant/repack.rs writes it): for each 16-row tile and each 64-k block, lane l owns 16-byte
// chunks at (chunk * 32 + l) * 16. Within a k-step of 16, lane (g = l / 4, t = l % 4) holds the mma A elements in the
// order (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1) (g, 2t+8) (g, 2t+9) (g+8, 2t+8) (g+8, 2t+9). bf16: one chunk per
// k-step; fp8: one chunk per two k-steps (8 bytes each); 4-bit: one chunk per stage (4 bytes = 8 nibbles per k-step,
// low nibble first).

template <Format F> struct WeightFormat;

template <> struct WeightFormat<Format::Bf16> {
    static constexpr int kTileBytes = 16 * kBK * 2;
    struct Scales {};
    __device__ static Scales load_scales(const MoeGemmParams &, bool, int, int, int, int) { return {}; }
    __device__ static void fragment(const uint32_t *raw, int ks, const Scales &, uint32_t a[4]) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = raw[ks * 4 + i];
    }
};

// Per-tensor fp8: e4m3 is a subset of bf16, so the fragment is exact and the scale is applied per row in the epilogue.
template <> struct WeightFormat<Format::Fp8> {
    static constexpr int kTileBytes = 16 * kBK;
    struct Scales {};
    __device__ static Scales load_scales(const MoeGemmParams &, bool, int, int, int, int) { return {}; }
    __device__ static void fragment(const uint32_t *raw, int ks, const Scales &, uint32_t a[4]) {
#pragma unroll
        for (int w = 0; w < 2; ++w) {
            float v[4];
            e4m3x4_to_f32(raw[ks * 2 + w], v);
            a[2 * w] = pack_bf16x2(v[0], v[1]);
            a[2 * w + 1] = pack_bf16x2(v[2], v[3]);
        }
    }
};

// fp8 with a scale per 128x128 block: the lane's rows g and g+8 lie in 8-row groups 2*tile and 2*tile+1 (the SwiGLU
// interleave may draw them from different matrices), one f32 each per 128 k.
template <> struct WeightFormat<Format::Fp8Block> {
    static constexpr int kTileBytes = 16 * kBK;
    struct Scales { float row_g, row_g8; };
    __device__ static Scales load_scales(const MoeGemmParams &p, bool tail, int expert, int tile, int kb, int) {
        const int groups = p.rows_padded / 8;
        const float *s = pick(tail, p.tail.block_scales, p.block_scales) + ((long)expert * (p.k_dim / 128) + (kb * kBK) / 128) * groups + 2 * tile;
        return {s[0], s[1]};
    }
    __device__ static void fragment(const uint32_t *raw, int ks, const Scales &s, uint32_t a[4]) {
#pragma unroll
        for (int w = 0; w < 2; ++w) {
            float v[4];
            e4m3x4_to_f32(raw[ks * 2 + w], v);
            a[2 * w] = pack_bf16x2(v[0] * s.row_g, v[1] * s.row_g);
            a[2 * w + 1] = pack_bf16x2(v[2] * s.row_g8, v[3] * s.row_g8);
        }
    }
};

// int4 group-wise: w = (q - zero) * scale, scale bf16 and zero 0..15 per (row, group); symmetric uses zero 8.
// Dequantised in bf16x2 arithmetic, two weights per instruction: a byte's nibbles OR'd into 0x4300 give the bf16
// pair (128 + lo, 128 + hi) exactly; subtracting (128 + zero) is exact too (integers below 256), and one multiply by
// the bf16 scale rounds once: the same bits as (q - zero) * scale in f32 rounded to bf16 (that product is exact in
// f32), in about half the instructions of the f32 route (the H200 run found the 4-bit GEMMs instruction-bound).
template <> struct WeightFormat<Format::Int4> {
    static constexpr int kTileBytes = 16 * kBK / 2;
    struct Scales { uint32_t bias_g, bias_g8, scale_g, scale_g8; };  // bf16 pairs: 128 + zero, scale
    __device__ static Scales load_scales(const MoeGemmParams &p, bool tail, int expert, int tile, int kb, int g) {
        // Layout [expert, tile, group, 16 rows]: the warp's 16 rows of a group are 32 contiguous bytes.
        const long at = (((long)expert * (p.rows_padded / 16) + tile) * (p.k_dim / p.group) + (kb * kBK) / p.group) * 16 + g;
        const long at8 = at + 8;
        const unsigned char *zeros = pick(tail, p.tail.group_zeros, p.group_zeros);
        const bf16 *scales = pick(tail, p.tail.group_scales, p.group_scales);
        const float zero_g = zeros ? (float)zeros[at] : 8.f;
        const float zero_g8 = zeros ? (float)zeros[at8] : 8.f;
        const float scale_g = __bfloat162float(scales[at]), scale_g8 = __bfloat162float(scales[at8]);
        return {pack_bf16x2(128.f + zero_g, 128.f + zero_g), pack_bf16x2(128.f + zero_g8, 128.f + zero_g8),
                pack_bf16x2(scale_g, scale_g), pack_bf16x2(scale_g8, scale_g8)};
    }
    __device__ static void fragment(const uint32_t *raw, int ks, const Scales &s, uint32_t a[4]) {
        const uint32_t word = raw[ks];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            // byte j = elements 2j (low nibble), 2j+1; j = 0, 2 are row g and j = 1, 3 row g+8.
            const uint32_t byte = word >> (8 * j);
            const uint32_t biased = (byte & 0xfu) | ((byte & 0xf0u) << 12) | 0x43004300u;
            const uint32_t bias = (j & 1) ? s.bias_g8 : s.bias_g, scale = (j & 1) ? s.scale_g8 : s.scale_g;
            uint32_t centred;
            asm("sub.rn.bf16x2 %0, %1, %2;" : "=r"(centred) : "r"(biased), "r"(bias));
            asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(a[j]) : "r"(centred), "r"(scale));
        }
    }
};

// NVFP4: w = e2m1 * e4m3 scale per 16 k (exact in bf16); the global divisor is a per-row scale in the epilogue.
template <> struct WeightFormat<Format::Nvfp4> {
    static constexpr int kTileBytes = 16 * kBK / 2;
    struct Scales { uint32_t row_g, row_g8; };  // four e4m3 bytes each: one per k-step of the stage
    __device__ static Scales load_scales(const MoeGemmParams &p, bool tail, int expert, int tile, int kb, int g) {
        // Layout [expert, tile, k block, 16 rows, 4 k-steps]: the tile's scales of a stage are 64 contiguous bytes.
        const unsigned char *s =
            pick(tail, p.tail.fp4_scales, p.fp4_scales) + (((long)expert * (p.rows_padded / 16) + tile) * (p.k_dim / kBK) + kb) * 64 + g * 4;
        return {*reinterpret_cast<const uint32_t *>(s), *reinterpret_cast<const uint32_t *>(s + 32)};
    }
    __device__ static void fragment(const uint32_t *raw, int ks, const Scales &s, uint32_t a[4]) {
        const float scale_g = e4m3_to_f32(s.row_g >> (8 * ks)), scale_g8 = e4m3_to_f32(s.row_g8 >> (8 * ks));
        float v[8];
        e2m1x8_to_f32(raw[ks], v);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float scale = (j & 1) ? scale_g8 : scale_g;
            a[j] = pack_bf16x2(v[2 * j] * scale, v[2 * j + 1] * scale);
        }
    }
};

}  // namespace
