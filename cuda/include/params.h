/* Kernel parameter structs, shared by the CUDA kernels and the Rust host code.
 *
 * Plain C on purpose: build.rs runs bindgen over this file, so host and device can never disagree on a layout.
 * Every kernel takes exactly one of these structs by value (`__global__ void k(const XParams p)`).
 * Element types: on the device they are the CUDA types; on the host (bindgen) they are same-sized integers, and Rust
 * fills pointer fields with device addresses.
 */
#ifndef SMALL4_PARAMS_H
#define SMALL4_PARAMS_H

#include <stdint.h>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp8.h>
typedef __nv_bfloat16 bf16;
typedef __nv_fp8_e4m3 fp8e4m3;
#else
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
/* Each kernel writes out[rows, cols] bf16 (row-major) from one weight matrix stored exactly as src/quant/matrix.rs
 * holds it; the f32 formula of each format is the one in that file, rounded once to bf16 at the end. */

/* dequant_fp8_per_tensor: out = e4m3(data) * tensor_scale.
 * dequant_fp8_block128:   out[r, c] = e4m3(data[r, c]) * block_scales[r / 128, c / 128]
 *                         (block_scales row-major [ceil(rows/128), ceil(cols/128)]; needs cols % 16 == 0). */
typedef struct DequantFp8Params {
    const fp8e4m3 *data;        /* [rows, cols] */
    const float *block_scales;  /* block kernel only (null for per-tensor) */
    bf16 *out;                  /* [rows, cols] */
    int rows;
    int cols;
    float tensor_scale;         /* per-tensor kernel only */
} DequantFp8Params;

/* dequant_int4: out[r, c] = (q[r, c] - z) * scales[r, c / group], q the nibble of packed[r, c / 2] (low nibble =
 * even column), z = zeros[r, c / group] when zeros is not null, else 8. cols % group == 0, group % 32 == 0. */
typedef struct DequantInt4Params {
    const uint8_t *packed;      /* [rows, cols / 2] */
    const bf16 *scales;         /* [rows, cols / group] */
    const uint8_t *zeros;       /* [rows, cols / group], one unpacked u8 in 0..15 each; null = symmetric */
    bf16 *out;                  /* [rows, cols] */
    int rows;
    int cols;
    int group;
} DequantInt4Params;

/* dequant_nvfp4: out[r, c] = e2m1(q[r, c]) * (e4m3(scales[r, c / 16]) / global_scale), q the nibble of
 * packed[r, c / 2] (low nibble = even column). cols % 16 == 0. */
typedef struct DequantNvfp4Params {
    const uint8_t *packed;      /* [rows, cols / 2] */
    const fp8e4m3 *scales;      /* [rows, cols / 16] */
    bf16 *out;                  /* [rows, cols] */
    int rows;
    int cols;
    float global_scale;         /* the checkpoint's weight_global_scale: a divisor */
} DequantNvfp4Params;

/* ---- mla_attention.cu: paged MLA attention (decode, prefill) and the cache writer ---------------------------------- */
/* (structs of this family go here) */

/* ---- ops.cu: RoPE, embedding, SwiGLU, dense GEMM, sampling and the other small kernels of a layer ------------------ */
/* (structs of this family go here) */

/* ---- vision.cu: patch embedding and the vision tower's own kernels ------------------------------------------------- */
/* (structs of this family go here) */

#endif /* SMALL4_PARAMS_H */
