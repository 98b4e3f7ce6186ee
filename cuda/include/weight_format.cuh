// The weight formats of the grouped / dense GEMMs as the kernels see them: bytes per 16x64 weight tile, the scales a
// stage needs, and the dequantisation of a lane's mma A fragment to bf16 in registers. Shared by the mma.sync kernels
// (cuda/moe_gemm.cu) and the wgmma kernels (cuda/moe_gemm_wgmma.cu), so both read the repacked layout of
// src/quant/repack.rs with the same code.
#pragma once
#include "params.h"
#include "common.cuh"
#include "mma.cuh"
#include "quant.cuh"

namespace {

constexpr int kBK = 64;  // k per pipeline stage (one 64-k block of the repacked layout)

enum class Format { Bf16, Fp8, Fp8Block, Int4, Nvfp4 };

// The grouped GEMM's field or its dense tail's, chosen by value: `tail ? p.tail.f : p.f` on the fields themselves
// may become a select of their addresses, which copies the kernel parameters to local memory (a "spill").
template <typename T>
__device__ __forceinline__ T pick(bool tail, T tail_value, T value) { return tail ? tail_value : value; }

// The weight operand a block multiplies: its launch's dense tail's (tail) or the launch's own, by value (field by field
// through pick, for the reason above; the fields a kernel does not read cost nothing). A tail is one matrix: its
// blocks use expert 0.
__device__ __forceinline__ GemmWeights block_weights(const MoeGemmParams &p, bool tail) {
    const GemmWeights &tail_weights = p.tail.weights, &own = p.weights;
    return {pick(tail, tail_weights.data, own.data),
            pick(tail, tail_weights.row_scales, own.row_scales),
            pick(tail, tail_weights.block_scales, own.block_scales),
            pick(tail, tail_weights.group_scales, own.group_scales),
            pick(tail, tail_weights.group_zeros, own.group_zeros),
            pick(tail, tail_weights.fp4_scales, own.fp4_scales)};
}

// The repacked weights of a block's expert: a tail's one matrix, or expert `expert`'s of the launch. Chosen apart
// from block_weights, as a pick between the tail's pointer and the expert's (offset included): selecting first and
// offsetting after changes the code around the k loop (up to 17 more registers on the narrow tiles, 0.8 more warp
// instructions per fragment on fp8's).
__device__ __forceinline__ const unsigned char *expert_weights(const MoeGemmParams &p, bool tail, int expert) {
    return pick(tail, p.tail.weights.data, p.weights.data + (long long)expert * p.expert_stride);
}

// ---- weight formats: bytes per 16x64 tile, per-stage scales, fragment dequantisation --------------------------------
//
// Each WeightFormat<F> has, for the weight operand `weights` (block_weights, or p.weights in kernels without a dense
// tail) in the shapes of launch p (rows_padded, k_dim, group):
// - kTileBytes: bytes of one 16-row x 64-k weight tile;
// - Scales: what a lane needs to dequantise its fragments of one tile and stage;
// - load_scales(p, weights, expert, tile, kb, g): those scales read from global memory;
// - ScaleWords, ScaleCursor, scale_cursor(p, weights, expert, tile, g), load_scale_words(cursor, kb),
//   scales_of(words): the same in two steps, the global loads alone and then what is computed from them, so
//   a kernel that prefetches scales into registers (the decode kernel of cuda/moe_gemm.cu) holds raw words and waits
//   for no load until it uses them; the cursor holds a lane's addresses of one tile, computed once, so a k block's
//   loads cost no address arithmetic beyond kb;
// - kScaleBytes, stage_scales<kTiles, kThreads>(p, weights, expert, first_tile, kb, dst, tid), staged_scales(weights,
//   tile_scales, g): the same scales staged with the weights: stage_scales cp.asyncs the scales of kTiles consecutive
//   tiles of one stage into shared memory (kScaleBytes per tile, in the caller's cp.async group, so they land with the
//   stage's weights; one 16-byte chunk per thread of the first few, kThreads being the block's), staged_scales reads a
//   lane's from there. The pipelined kernels use these, so no global load waits in the k loop;
// - kScalePieces, scale_piece(p, weights, expert, tile, kb, piece, offset, bytes): the same staged bytes of one tile as
//   whole contiguous pieces (multiples of 16 bytes, 16-byte aligned) for one bulk copy each (the wgmma producer's,
//   counted in the stage's transaction bytes): piece `piece` (0 .. kScalePieces - 1) comes from the returned global
//   address (null when the format has no such piece here, as int4's symmetric zero points), `bytes` long, to `offset`
//   within the tile's kScaleBytes (all but fp8-block128, whose 8 bytes a tile are under a bulk copy's 16);
// - fragment(raw, ks, scales, a): the lane's mma A fragment of k-step ks in bf16.
//
// Fragment layout (src/quant/repack.rs writes it): for each 16-row tile and each 64-k block, lane l owns 16-byte
// chunks at (chunk * 32 + l) * 16. Within a k-step of 16, lane (g = l / 4, t = l % 4) holds the mma A elements in the
// order (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1) (g, 2t+8) (g, 2t+9) (g+8, 2t+8) (g+8, 2t+9). bf16: one chunk per
// k-step; fp8: one chunk per two k-steps (8 bytes each); 4-bit: one chunk per stage (4 bytes = 8 nibbles per k-step,
// low nibble first).

template <Format F> struct WeightFormat;

// e4m3 activations (the W8A8 kernels of cuda/moe_gemm.cu, the fp8-activation wgmma kernels of
// cuda/moe_gemm_wgmma_fp8.cu): the e4m3 weights go to mma m16n8k32 / wgmma m64nNk32 (whose register-A fragment is
// m16n8k32's, per warp) as they are. The fragment layout is the fp8 one above, in which
// lane (g, t) holds, per k-step of 16, the words (g: 2t, 2t+1; g+8: 2t, 2t+1) and (g: 2t+8, 2t+9; g+8: 2t+8, 2t+9);
// byte permutes regroup two k-steps into the m16n8k32 A registers (row g, row g+8, row g + 16 k, row g+8 + 16 k), so
// mma column 4t + j of a 32-k step carries weight column pi(4t + j) = 2t + (j % 2) + 8 (j / 2) (+ 16 for the upper
// 16 columns). The k order of a dot product is free: moe_quantize_act_e4m3 stores the activations in that same
// permuted order, so the B operand (ldmatrix rows, or a wgmma descriptor) reads the permuted bytes as they are.
__device__ __forceinline__ void fp8_weights_to_e4m3_a(const uint32_t w[4], uint32_t a[4]) {
    a[0] = __byte_perm(w[0], w[1], 0x5410);  // row g:   k 2t, 2t+1, 2t+8, 2t+9
    a[1] = __byte_perm(w[0], w[1], 0x7632);  // row g+8: the same k
    a[2] = __byte_perm(w[2], w[3], 0x5410);  // row g:   k + 16
    a[3] = __byte_perm(w[2], w[3], 0x7632);  // row g+8: k + 16
}

// The formats without per-stage scales.
struct NoStagedScales {
    static constexpr int kScaleBytes = 0;
    struct Scales {};
    struct ScaleWords {};
    struct ScaleCursor {};
    __device__ static ScaleCursor scale_cursor(const MoeGemmParams &, const GemmWeights &, int, int, int) { return {}; }
    __device__ static ScaleWords load_scale_words(const ScaleCursor &, int) { return {}; }
    __device__ static Scales scales_of(const ScaleWords &) { return {}; }
    __device__ static Scales load_scales(const MoeGemmParams &, const GemmWeights &, int, int, int, int) { return {}; }
    template <int kTiles, int kThreads>
    __device__ static void stage_scales(const MoeGemmParams &, const GemmWeights &, int, int, int, unsigned char *, int) {}
    __device__ static Scales staged_scales(const GemmWeights &, const unsigned char *, int) { return {}; }
    static constexpr int kScalePieces = 0;
    __device__ static const void *scale_piece(const MoeGemmParams &, const GemmWeights &, int, int, int, int, int &, int &) { return nullptr; }
};

template <> struct WeightFormat<Format::Bf16> : NoStagedScales {
    static constexpr int kTileBytes = 16 * kBK * 2;
    __device__ static void fragment(const uint32_t *raw, int ks, const Scales &, uint32_t a[4]) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = raw[ks * 4 + i];
    }
};

// Per-tensor fp8: e4m3 is a subset of bf16, so the fragment is exact and the scale is applied per row in the epilogue.
template <> struct WeightFormat<Format::Fp8> : NoStagedScales {
    static constexpr int kTileBytes = 16 * kBK;
    __device__ static void fragment(const uint32_t *raw, int ks, const Scales &, uint32_t a[4]) {
#pragma unroll
        for (int w = 0; w < 2; ++w) {
            a[2 * w] = e4m3x2_to_bf16x2(raw[ks * 2 + w] & 0xffffu);
            a[2 * w + 1] = e4m3x2_to_bf16x2(raw[ks * 2 + w] >> 16);
        }
    }
};

// fp8 with a scale per 128x128 block: the lane's rows g and g+8 lie in 8-row groups 2*tile and 2*tile+1 (the SwiGLU
// interleave may draw them from different matrices), one f32 each per 128 k. Consecutive tiles' scales are
// consecutive f32 pairs (8 bytes a tile), so a stage stages kTiles * 8 contiguous bytes. The product v * scale is
// rounded to bf16 once in f32: a bf16 multiply by the f32 scale would round the scale first.
template <> struct WeightFormat<Format::Fp8Block> {
    static constexpr int kTileBytes = 16 * kBK;
    static constexpr int kScaleBytes = 8;
    struct Scales { float row_g, row_g8; };
    __device__ static const float *scale_pair(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int kb) {
        const int groups = p.rows_padded / 8;
        return weights.block_scales + ((long)expert * (p.k_dim / 128) + (kb * kBK) / 128) * groups + 2 * tile;
    }
    __device__ static Scales load_scales(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int kb, int) {
        const float *s = scale_pair(p, weights, expert, tile, kb);
        return {s[0], s[1]};
    }
    using ScaleWords = Scales;  // the two f32 scales are used as loaded
    struct ScaleCursor { const float *pair; int stride; };  // the tile's pair of k block 0; floats per 128 k
    __device__ static ScaleCursor scale_cursor(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int) {
        return {scale_pair(p, weights, expert, tile, 0), p.rows_padded / 8};
    }
    __device__ static ScaleWords load_scale_words(const ScaleCursor &c, int kb) {
        const float2 s = *reinterpret_cast<const float2 *>(c.pair + (kb * kBK / 128) * c.stride);  // 8-byte aligned: 2 * tile
        return {s.x, s.y};
    }
    __device__ static Scales scales_of(const ScaleWords &words) { return words; }
    // 16-byte aligned: first_tile is a multiple of 4 and groups of 16 (rows padded to 128).
    template <int kTiles, int kThreads>
    __device__ static void stage_scales(const MoeGemmParams &p, const GemmWeights &weights, int expert, int first_tile, int kb, unsigned char *dst, int tid) {
        static_assert(kTiles * kScaleBytes % 16 == 0 && kTiles * kScaleBytes / 16 <= kThreads, "whole 16-byte chunks, one a thread");
        if (tid < kTiles * kScaleBytes / 16) cp_async16(dst + tid * 16, scale_pair(p, weights, expert, first_tile, kb) + tid * 4);
    }
    __device__ static Scales staged_scales(const GemmWeights &, const unsigned char *tile_scales, int) {
        const float2 s = *reinterpret_cast<const float2 *>(tile_scales);
        return {s.x, s.y};
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
// Staged per tile and stage: the 16 rows' bf16 scales (32 bytes) then their zero points (16 bytes, absent when
// symmetric) of the stage's group (groups are multiples of 64 k, so a stage lies in one).
template <> struct WeightFormat<Format::Int4> {
    static constexpr int kTileBytes = 16 * kBK / 2;
    static constexpr int kScaleBytes = 48;
    struct Scales { uint32_t bias_g, bias_g8, scale_g, scale_g8; };  // bf16 pairs: 128 + zero, scale
    // Layout [expert, tile, group, 16 rows]: the tile's 16 rows of a group are 32 contiguous bytes of scales and 16 of zeros.
    __device__ static long group_row0(const MoeGemmParams &p, int expert, int tile, int kb) {
        return (((long)expert * (p.rows_padded / 16) + tile) * (p.k_dim / p.group) + (kb * kBK) / p.group) * 16;
    }
    __device__ static Scales make(float zero_g, float zero_g8, bf16 scale_g, bf16 scale_g8) {
        const float s_g = __bfloat162float(scale_g), s_g8 = __bfloat162float(scale_g8);
        return {pack_bf16x2(128.f + zero_g, 128.f + zero_g), pack_bf16x2(128.f + zero_g8, 128.f + zero_g8), pack_bf16x2(s_g, s_g),
                pack_bf16x2(s_g8, s_g8)};
    }
    // Rows g and g + 8's scales and zero points (8 when symmetric) as loaded.
    struct ScaleWords { bf16 scale_g, scale_g8; uint32_t zero_g, zero_g8; };
    __device__ static ScaleWords load_scale_words(const bf16 *scales, const unsigned char *zeros, long at) {
        return {scales[at], scales[at + 8], zeros ? zeros[at] : 8u, zeros ? zeros[at + 8] : 8u};
    }
    // Row g of the tile's group 0 (scales and zero points; zeros null when symmetric) and the k blocks per group.
    struct ScaleCursor { const bf16 *scales; const unsigned char *zeros; int blocks_per_group; };
    __device__ static ScaleCursor scale_cursor(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int g) {
        const long at = group_row0(p, expert, tile, 0) + g;
        const unsigned char *zeros = weights.group_zeros;
        return {weights.group_scales + at, zeros ? zeros + at : nullptr, p.group / kBK};
    }
    __device__ static ScaleWords load_scale_words(const ScaleCursor &c, int kb) {
        return load_scale_words(c.scales, c.zeros, (long)((unsigned)kb / (unsigned)c.blocks_per_group) * 16);
    }
    __device__ static Scales scales_of(const ScaleWords &w) {
        return make((float)w.zero_g, (float)w.zero_g8, w.scale_g, w.scale_g8);
    }
    __device__ static Scales load_scales(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int kb, int g) {
        return scales_of(load_scale_words(weights.group_scales, weights.group_zeros,
                                                   group_row0(p, expert, tile, kb) + g));
    }
    template <int kTiles, int kThreads>
    __device__ static void stage_scales(const MoeGemmParams &p, const GemmWeights &weights, int expert, int first_tile, int kb, unsigned char *dst, int tid) {
        static_assert(kTiles * 3 <= kThreads, "one 16-byte chunk a thread");
        if (tid >= kTiles * 3) return;
        const int tile = tid / 3, chunk = tid % 3;  // chunks 0, 1: scales; 2: zeros
        const long row0 = group_row0(p, expert, first_tile + tile, kb);
        const unsigned char *zeros = weights.group_zeros;
        if (chunk < 2) {
            cp_async16(dst + tile * kScaleBytes + chunk * 16, weights.group_scales + row0 + chunk * 8);
        } else if (zeros != nullptr) {
            cp_async16(dst + tile * kScaleBytes + 32, zeros + row0);
        }
    }
    __device__ static Scales staged_scales(const GemmWeights &weights, const unsigned char *tile_scales, int g) {
        const bf16 *scales = reinterpret_cast<const bf16 *>(tile_scales);
        const unsigned char *zeros = tile_scales + 32;
        const bool asymmetric = weights.group_zeros != nullptr;
        return make(asymmetric ? (float)zeros[g] : 8.f, asymmetric ? (float)zeros[g + 8] : 8.f, scales[g], scales[g + 8]);
    }
    // Piece 0: the 32 bytes of scales; piece 1: the 16 bytes of zero points (none when symmetric).
    static constexpr int kScalePieces = 2;
    __device__ static const void *scale_piece(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int kb, int piece, int &offset,
                                              int &bytes) {
        const long row0 = group_row0(p, expert, tile, kb);
        if (piece == 0) {
            offset = 0, bytes = 32;
            return weights.group_scales + row0;
        }
        offset = 32, bytes = 16;
        const unsigned char *zeros = weights.group_zeros;
        return zeros != nullptr ? zeros + row0 : nullptr;
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

// NVFP4: w = e2m1 * e4m3 scale per 16 k (exact in bf16: 2 + 4 mantissa bits, 2^-10 to 2688); the global divisor is
// a per-row scale in the epilogue. Dequantised in bf16x2 arithmetic: the e2m1 codes become bf16 pairs by byte lookups
// (e2m1x8_to_bf16x2), the k-step's two block scales one bf16 pair each, and one exact multiply per pair of weights
// gives the bits of the f32 product rounded to bf16 (itself exact) in half the instructions of the f32 route.
template <> struct WeightFormat<Format::Nvfp4> {
    static constexpr int kTileBytes = 16 * kBK / 2;
    static constexpr int kScaleBytes = 64;
    struct Scales { uint32_t row_g, row_g8; };  // four e4m3 bytes each: one per k-step of the stage
    // Layout [expert, tile, k block, 16 rows, 4 k-steps]: the tile's scales of a stage are 64 contiguous bytes.
    __device__ static const unsigned char *tile_stage(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int kb) {
        return weights.fp4_scales + (((long)expert * (p.rows_padded / 16) + tile) * (p.k_dim / kBK) + kb) * 64;
    }
    __device__ static Scales load_scales(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int kb, int g) {
        return staged_scales(weights, tile_stage(p, weights, expert, tile, kb), g);  // the same layout, read from global memory
    }
    using ScaleWords = Scales;  // the scale words are used as loaded
    struct ScaleCursor { const unsigned char *tile_g; };  // row g's word of the tile's k block 0
    __device__ static ScaleCursor scale_cursor(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int g) {
        return {tile_stage(p, weights, expert, tile, 0) + g * 4};
    }
    __device__ static ScaleWords load_scale_words(const ScaleCursor &c, int kb) {
        const unsigned char *words = c.tile_g + kb * kScaleBytes;
        return {*reinterpret_cast<const uint32_t *>(words), *reinterpret_cast<const uint32_t *>(words + 32)};
    }
    __device__ static Scales scales_of(const ScaleWords &words) { return words; }
    template <int kTiles, int kThreads>
    __device__ static void stage_scales(const MoeGemmParams &p, const GemmWeights &weights, int expert, int first_tile, int kb, unsigned char *dst, int tid) {
        static_assert(kTiles * 4 <= kThreads, "one 16-byte chunk a thread");
        if (tid < kTiles * 4) cp_async16(dst + tid * 16, tile_stage(p, weights, expert, first_tile + tid / 4, kb) + (tid % 4) * 16);
    }
    __device__ static Scales staged_scales(const GemmWeights &, const unsigned char *tile_scales, int g) {
        return {*reinterpret_cast<const uint32_t *>(tile_scales + g * 4), *reinterpret_cast<const uint32_t *>(tile_scales + 32 + g * 4)};
    }
    // One piece: the tile's 64 contiguous bytes of the stage.
    static constexpr int kScalePieces = 1;
    __device__ static const void *scale_piece(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, int kb, int, int &offset, int &bytes) {
        offset = 0, bytes = kScaleBytes;
        return tile_stage(p, weights, expert, tile, kb);
    }
    __device__ static void fragment(const uint32_t *raw, int ks, const Scales &s, uint32_t a[4]) {
        // Byte ks of each row's scale word, row g's in the low half of the pair.
        const float2 scales = __half22float2(e4m3x2_to_half2(__byte_perm(s.row_g, s.row_g8, 0x40 + 0x11 * ks)));
        const uint32_t scale_g = pack_bf16x2(scales.x, scales.x), scale_g8 = pack_bf16x2(scales.y, scales.y);
        uint32_t w[4];
        e2m1x8_to_bf16x2(raw[ks], w);
#pragma unroll
        for (int j = 0; j < 4; ++j) {  // pairs j = 0, 2 are row g and j = 1, 3 row g+8
            asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(a[j]) : "r"(w[j]), "r"((j & 1) ? scale_g8 : scale_g));
        }
    }
};

}  // namespace
