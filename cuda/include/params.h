/* Kernel parameter structs, shared by the CUDA kernels and the Rust host code.
 *
 * Plain C on purpose: build.rs runs bindgen over this file, so host and device can never disagree on a layout.
 * Every kernel takes exactly one of these structs by value (`__global__ void k(const XParams p)`).
 * Element types: on the device they are the CUDA types; on the host (bindgen) they are same-sized integers, and Rust
 * fills pointer fields with device addresses.
 */
#ifndef SMALL4_PARAMS_H
#define SMALL4_PARAMS_H

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp8.h>
typedef __nv_bfloat16 bf16;
typedef __nv_fp8_e4m3 fp8e4m3;
#else
#include <stdint.h>
typedef uint16_t bf16;
typedef uint8_t fp8e4m3;
#endif

/* ---- norm.cu ---------------------------------------------------------------------------------------------------- */

/* out[r, :] = x[r, :] / sqrt(mean(x[r, :]^2) + eps) * weight[:]   (bf16 in and out, f32 accumulation).
 * When `residual` is not null the kernel first does x = x + residual and writes that sum to `residual_out`
 * (the pre-norm decoder's `h += f(h)` fused with the next norm). */
typedef struct RmsNormParams {
    const bf16 *x;
    const bf16 *weight;
    bf16 *out;
    const bf16 *residual;
    bf16 *residual_out;
    int rows;
    int cols;
    /* Elements between the starts of consecutive rows: x_row_stride for x and residual, out_row_stride for out and
     * residual_out (each >= cols). */
    int x_row_stride;
    int out_row_stride;
    float eps;
} RmsNormParams;

/* ---- router.cu: fused router softmax + top-k and the per-expert token alignment ------------------------------------ */
/* (structs of this family go here) */

/* ---- moe_gemm.cu: grouped expert GEMMs (bf16, FP8, INT4, NVFP4 weights) -------------------------------------------- */
/* (structs of this family go here) */

/* ---- dequant.cu: standalone FP8 / INT4 / NVFP4 -> bf16 ------------------------------------------------------------- */
/* (structs of this family go here) */

/* ---- mla_attention.cu: paged MLA attention (decode, prefill) and the cache writer ---------------------------------- */

/* The paged latent cache: `num_pages` pages of `page_size` tokens, each token 320 values [kv_a_norm(c) 256 | rope(k) 64],
 * bf16 (2 bytes) or fp8 e4m3 (1 byte, value = e4m3 * fp8 scale). Token `pos` of the sequence in block-table row `s`
 * lives at page `block_tables[s * max_pages + pos / page_size]`, slot `pos % page_size`. */

/* mla_cache_write_{bf16,fp8}: one token per warp.
 * cache[slot] = [bf16|fp8]( rms_norm(kv[t, 0:256]) * norm_weight , rope_interleaved(kv[t, 256:320], positions[t]) ). */
typedef struct MlaCacheWriteParams {
    const bf16 *kv;            /* [tokens, kv_row_stride], the first 320 columns are [c | k_rope] (wkv_a_with_mqa output) */
    const bf16 *norm_weight;   /* kv_a_norm weight [256] */
    const float *inv_freq;     /* YaRN inverse frequencies [32] */
    const int *token_seq;      /* [tokens]: block-table row of each token */
    const int *positions;      /* [tokens]: position of each token in its sequence */
    const int *block_tables;   /* [num_seqs, max_pages] */
    void *cache;               /* [num_pages, page_size, 320] of bf16 or fp8 e4m3 */
    int tokens;
    int kv_row_stride;
    int max_pages;
    int page_size;
    float eps;
    float fp8_inv_scale;       /* 1 / fp8 scale (fp8 cache only) */
} MlaCacheWriteParams;

/* mla_copy_pages: cache page pairs[i].dst = page pairs[i].src (copy-on-write of shared prefix pages). The host
 * guarantees distinct destinations that are no copy's source. */
typedef struct MlaCopyPagesParams {
    void *cache;
    const int *pairs;          /* [copies, 2]: (src, dst) page indices */
    int copies;
    int page_bytes;            /* a multiple of 16 */
} MlaCopyPagesParams;

/* mla_attention_{bf16,fp8} and mla_attention_combine: causal latent attention of the query tokens of `num_seqs`
 * sequences over their paged caches (decode = one query token per sequence; chunked prefill = several).
 * Query token t of sequence s (global token index q_start[s] + t, t < q_count = q_start[s+1] - q_start[s]) sits at
 * position kv_len[s] - q_count + t and attends to cache positions 0..=that position (its own row is already written).
 * o_lat[token, head] = softmax_j((q_lat . c_j + q_rope . k_rope_j) * softmax_scale) . c_j. */
typedef struct MlaAttentionParams {
    const bf16 *q_lat;         /* [tokens, heads, 256] (W_UK already absorbed) */
    const bf16 *q_rope;        /* [tokens, heads, 64] (already rotated and scaled) */
    const void *cache;         /* [num_pages, page_size, 320] bf16 or fp8 e4m3 */
    const int *block_tables;   /* [num_seqs, max_pages] */
    const int *q_start;        /* [num_seqs + 1], non-decreasing, q_start[0] = 0 */
    const int *kv_len;         /* [num_seqs], >= q_count of the sequence */
    bf16 *o_lat;               /* [tokens, heads, 256] */
    float *partial_o;          /* [num_splits, tokens * heads, 256], normalised per split (num_splits > 1 only) */
    float *partial_ml;         /* [num_splits, tokens * heads, 2]: running max (log2 domain) and sum per split */
    int num_seqs;
    int heads;
    int max_pages;
    int page_size;
    int num_splits;            /* KV splits per sequence; 1 = no combine step, o_lat written directly */
    int tokens_per_split;      /* multiple of the kernel's KV tile (32) */
    int total_rows;            /* tokens * heads */
    float score_scale;         /* softmax scale * fp8 scale (1 for bf16) */
    float value_scale;         /* fp8 scale (1 for bf16) */
} MlaAttentionParams;

/* ---- ops.cu: RoPE, embedding, SwiGLU, dense GEMM, sampling and the other small kernels of a layer ------------------ */
/* (structs of this family go here) */

/* ---- vision.cu: patch embedding and the vision tower's own kernels ------------------------------------------------- */
/* (structs of this family go here) */

#endif /* SMALL4_PARAMS_H */
