// The MLA latent cache: its row layout, where a token's row lives in the paged cache, and the writer of one token's
// row (kv_a RMSNorm of the latent, RoPE of k_rope). cuda/mla_attention.cu's mla_cache_write runs the writer one warp
// per token; the latent projection GEMM's row finisher (cuda/moe_gemm.cu) runs it on each row it finishes.
#pragma once
#include "params.h"
#include "common.cuh"
#include <cuda_fp8.h>

namespace {

constexpr int kLatent = 256;             // kv_lora_rank
constexpr int kRope = 64;                // qk_rope_head_dim
constexpr int kWidth = kLatent + kRope;  // cache values per token

template <bool kFp8>
struct CacheElem;
template <>
struct CacheElem<false> {
    using T = bf16;
    static constexpr int kBytes = 2;
};
template <>
struct CacheElem<true> {
    using T = fp8e4m3;
    static constexpr int kBytes = 1;
};

// Byte offset of token `pos` of block-table row `seq` (the caller has checked pos < kv_len and the table entries).
__device__ __forceinline__ long cache_token_offset(const int *block_tables, int max_pages, int page_size, int seq, int pos, int elem_bytes) {
    const int page = block_tables[(long)seq * max_pages + pos / page_size];
    return ((long)page * page_size + pos % page_size) * kWidth * elem_bytes;
}

// Normalise token `token`'s latent, rotate its k_rope, store its 320 values into its page slot. Called by one whole
// warp: lane l owns latent values 8l..8l+7 (one 16-byte load) and rope pair l (values 256+2l, 256+2l+1). RMS by warp
// butterfly. RoPE angles by common.cuh's rope_sincos (exact at long context without f64). The kv row is read with
// ld.global.cg: in the GEMM finisher other blocks of the launch wrote it (see rms_norm_row.cuh).
// Bytes: 640 in (+512 weight, cached) and 640 (bf16) / 320 (fp8) out per token. FLOPs: ~1.2k per token.
template <bool kFp8>
__device__ __forceinline__ void cache_write(const MlaCacheWriteParams &p, int token) {
    const int lane = threadIdx.x & 31;
    const bf16 *row = p.kv + (long)token * p.kv_row_stride;
    const int seq = p.token_seq[token], pos = p.positions[token];

    float c[8], w[8];
    bf16x8_to_f32(__ldcg(reinterpret_cast<const uint4 *>(row + lane * 8)), c);
    bf16x8_to_f32(*reinterpret_cast<const uint4 *>(p.norm_weight + lane * 8), w);
    float sum_sq = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) sum_sq += c[i] * c[i];
    const float inv_rms = rsqrtf(warp_sum(sum_sq) / (float)kLatent + p.eps);
#pragma unroll
    for (int i = 0; i < 8; ++i) c[i] = c[i] * inv_rms * w[i];

    const uint32_t pair_bits = __ldcg(reinterpret_cast<const unsigned int *>(row + kLatent + 2 * lane));
    const float a = __uint_as_float(pair_bits << 16), b = __uint_as_float(pair_bits & 0xffff0000u);
    float s, co, ra = a, rb = b;
    rope_sincos(pos, p.inv_freq[lane], &s, &co);
    rope_rotate(ra, rb, co, s);

    using Elem = CacheElem<kFp8>;
    char *dst = reinterpret_cast<char *>(p.cache) + cache_token_offset(p.block_tables, p.max_pages, p.page_size, seq, pos, Elem::kBytes);
    if constexpr (kFp8) {
        uint32_t words[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const __nv_fp8x4_e4m3 q(
                make_float4(c[4 * i] * p.fp8_inv_scale, c[4 * i + 1] * p.fp8_inv_scale, c[4 * i + 2] * p.fp8_inv_scale, c[4 * i + 3] * p.fp8_inv_scale));
            words[i] = *reinterpret_cast<const uint32_t *>(&q);
        }
        *reinterpret_cast<uint2 *>(dst + lane * 8) = make_uint2(words[0], words[1]);
        const __nv_fp8x2_e4m3 r(make_float2(ra * p.fp8_inv_scale, rb * p.fp8_inv_scale));
        *reinterpret_cast<__nv_fp8x2_e4m3 *>(dst + kLatent + 2 * lane) = r;
    } else {
        bf16 *out = reinterpret_cast<bf16 *>(dst);
        *reinterpret_cast<uint4 *>(out + lane * 8) = f32x8_to_bf16(c);
        *reinterpret_cast<__nv_bfloat162 *>(out + kLatent + 2 * lane) = __floats2bfloat162_rn(ra, rb);
    }
}

}  // namespace
