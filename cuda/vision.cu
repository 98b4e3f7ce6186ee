// The vision tower's own kernels (Pixtral style, SPEC-model.md "Vision tower"): the patch embedding's unfold, 2D
// RoPE, block-diagonal bidirectional attention, bias + exact GELU, the patch merger's 2x2 unfold and the scatter of
// image features into the [IMG] rows of the text embeddings. The tower's linears run on the dense GEMM of
// moe_gemm.cu, its norms on norm.cu and its SwiGLU on ops.cu's silu_mul.
#include "params.h"
#include "common.cuh"

// ---- patch_im2col ------------------------------------------------------------------------------------------------
// One block per patch of one image, threads over the k_padded columns of its row (the conv weight's [c, ky, kx]
// order, zeros past channels * patch^2 so the GEMM's k can be a multiple of 64). Pixels are rounded to bf16 once.
// Bytes: 4 * channels * patch^2 read + 2 * k_padded written per patch.
extern "C" __global__ void __launch_bounds__(256) patch_im2col(const PatchIm2colParams p) {
    const int patch_index = blockIdx.x;
    const int grid_cols = p.width / p.patch;
    const int gy = patch_index / grid_cols, gx = patch_index % grid_cols;
    const int per_channel = p.patch * p.patch;
    bf16 *row = p.out + (long)patch_index * p.k_padded;
    for (int k = threadIdx.x; k < p.k_padded; k += blockDim.x) {
        float value = 0.f;
        if (k < p.channels * per_channel) {
            const int c = k / per_channel, ky = (k / p.patch) % p.patch, kx = k % p.patch;
            value = p.pixels[((long)c * p.height + gy * p.patch + ky) * p.width + gx * p.patch + kx];
        }
        row[k] = __float2bfloat16(value);
    }
}

// ---- rope_2d -----------------------------------------------------------------------------------------------------
// One block per token, threads over the interleaved pairs of all heads of q (then k). The first head_dim/4 pairs of a
// head turn by the token's grid row, the rest by its grid column (mistral-inference precompute_freqs_cis_2d). The
// angle uses rope_sincos (exact product, Cody-Waite reduction). Bytes: 2 * 2 * 2 * tokens * heads * head_dim.
extern "C" __global__ void __launch_bounds__(256) rope_2d(const Rope2dParams p) {
    const int t = blockIdx.x;
    const int row = p.grid_rows[t], col = p.grid_cols[t];
    const int half_pairs = p.head_dim / 2, quarter = p.head_dim / 4;
    const int pairs = p.heads * half_pairs;
    for (int i = threadIdx.x; i < 2 * pairs; i += blockDim.x) {
        bf16 *base = i < pairs ? p.q : p.k;
        if (base == nullptr) continue;
        const int pair = i % pairs;
        const int j = pair % half_pairs;
        float s, c;
        if (j < quarter) {
            rope_sincos(row, p.inv_freq_rows[j], &s, &c);
        } else {
            rope_sincos(col, p.inv_freq_cols[j - quarter], &s, &c);
        }
        __nv_bfloat162 *ptr = reinterpret_cast<__nv_bfloat162 *>(base + (long)t * p.heads * p.head_dim) + pair;
        const float2 v = __bfloat1622float2(*ptr);
        *ptr = __floats2bfloat162_rn(v.x * c - v.y * s, v.x * s + v.y * c);
    }
}

// ---- vision_attention --------------------------------------------------------------------------------------------
// Block-diagonal bidirectional attention for head_dim 64. Grid (query tiles of 32 tokens, heads); 128 threads, four
// per query, each owning 16 of the 64 dims (partial dot products summed by two shuffles). Keys stream through shared
// memory in tiles of 32 over the union of the tile's segments; a query skips keys outside its own segment. Online
// softmax in f32 (base 2, scale folded into q), output normalised and rounded to bf16 once.
// Bytes: q and out once; k and v once per query tile. FLOPs: 4 * 64 per (query, key) pair of a segment.
namespace {
constexpr int kHeadDim = 64;
constexpr int kQueries = 32;
constexpr int kKeys = 32;
constexpr int kThreadsPerQuery = 4;
constexpr int kDimsPerThread = kHeadDim / kThreadsPerQuery;
constexpr float kLog2E = 1.4426950408889634f;
}  // namespace

extern "C" __global__ void __launch_bounds__(kQueries * kThreadsPerQuery) vision_attention(const VisionAttentionParams p) {
    __shared__ float keys[kKeys][kHeadDim];
    __shared__ float values[kKeys][kHeadDim];
    const int head = blockIdx.y;
    const int first_query = blockIdx.x * kQueries;
    const int last_query = min(first_query + kQueries, p.tokens) - 1;
    const int query = first_query + threadIdx.x / kThreadsPerQuery;
    const int part = threadIdx.x % kThreadsPerQuery;
    const bool active = query < p.tokens;
    const long row_stride = (long)p.heads * kHeadDim;
    const int dim0 = part * kDimsPerThread;

    float q[kDimsPerThread], acc[kDimsPerThread];
    const float q_scale = p.scale * kLog2E;
#pragma unroll
    for (int d = 0; d < kDimsPerThread; d += 8) {
        float chunk[8];
        if (active) {
            bf16x8_to_f32(*reinterpret_cast<const uint4 *>(p.q + query * row_stride + head * kHeadDim + dim0 + d), chunk);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) chunk[i] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            q[d + i] = chunk[i] * q_scale;
            acc[d + i] = 0.f;
        }
    }
    const int my_start = active ? p.segment_start[query] : 0;
    const int my_end = active ? p.segment_end[query] : 0;
    // Segments are contiguous and in token order: the tile's keys span from its first query's segment to its last's.
    const int key_begin = p.segment_start[first_query];
    const int key_end = p.segment_end[last_query];

    float running_max = -INFINITY, denominator = 0.f;
    for (int tile = key_begin; tile < key_end; tile += kKeys) {
        __syncthreads();  // the previous tile's keys are no longer read
        for (int chunk = threadIdx.x; chunk < kKeys * kHeadDim / 8; chunk += blockDim.x) {
            const int j = chunk / (kHeadDim / 8), d = (chunk % (kHeadDim / 8)) * 8;
            float kv[8], vv[8];
            if (tile + j < key_end) {
                const long offset = (tile + j) * row_stride + head * kHeadDim + d;
                bf16x8_to_f32(*reinterpret_cast<const uint4 *>(p.k + offset), kv);
                bf16x8_to_f32(*reinterpret_cast<const uint4 *>(p.v + offset), vv);
            } else {
#pragma unroll
                for (int i = 0; i < 8; ++i) kv[i] = vv[i] = 0.f;
            }
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                keys[j][d + i] = kv[i];
                values[j][d + i] = vv[i];
            }
        }
        __syncthreads();
        const int count = min(kKeys, key_end - tile);
        for (int j = 0; j < count; ++j) {
            float score = 0.f;
#pragma unroll
            for (int d = 0; d < kDimsPerThread; ++d) score = fmaf(q[d], keys[j][dim0 + d], score);
            score += __shfl_xor_sync(0xffffffffu, score, 1);
            score += __shfl_xor_sync(0xffffffffu, score, 2);
            const int key = tile + j;
            if (key < my_start || key >= my_end) continue;  // another image (the same for a query's four threads)
            const float new_max = fmaxf(running_max, score);
            const float correction = exp2f(running_max - new_max);
            const float weight = exp2f(score - new_max);
            denominator = denominator * correction + weight;
#pragma unroll
            for (int d = 0; d < kDimsPerThread; ++d) acc[d] = fmaf(weight, values[j][dim0 + d], acc[d] * correction);
            running_max = new_max;
        }
    }
    if (!active) return;
    const float inverse = denominator > 0.f ? 1.f / denominator : 0.f;
#pragma unroll
    for (int d = 0; d < kDimsPerThread; d += 8) {
        float chunk[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) chunk[i] = acc[d + i] * inverse;
        *reinterpret_cast<uint4 *>(p.out + query * row_stride + head * kHeadDim + dim0 + d) = f32x8_to_bf16(chunk);
    }
}

// ---- bias_act ----------------------------------------------------------------------------------------------------
// In place x = act(x + bias), one element per thread (grid over rows * cols); GELU is the exact erf form of
// torch's nn.GELU(). Bytes: 2 * 2 per element. FLOPs: ~20 per element with GELU.
extern "C" __global__ void __launch_bounds__(256) bias_act(const BiasActParams p) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long)p.rows * p.cols) return;
    float v = __bfloat162float(p.x[i]);
    if (p.bias != nullptr) v += __bfloat162float(p.bias[i % p.cols]);
    if (p.gelu) v = 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
    p.x[i] = __float2bfloat16(v);
}

// ---- patch_merge -------------------------------------------------------------------------------------------------
// out[r, c * group + s] = x[sources[r * group + s], c]: each merged row gathers its group of patches channel-major
// (torch.nn.functional.unfold's order). One thread per output element, consecutive threads along the output row.
// Bytes: 2 * 2 per element.
extern "C" __global__ void __launch_bounds__(256) patch_merge(const PatchMergeParams p) {
    const long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const int width = p.hidden * p.group;
    if (i >= (long)p.rows * width) return;
    const int r = (int)(i / width), within = (int)(i % width);
    const int c = within / p.group, s = within % p.group;
    p.out[i] = p.x[(long)p.sources[r * p.group + s] * p.hidden + c];
}

// ---- scatter_rows ------------------------------------------------------------------------------------------------
// out[rows[i], :] = src[i, :]: one block per source row, threads over its columns. Bytes: 2 * 2 * count * cols.
extern "C" __global__ void __launch_bounds__(256) scatter_rows(const ScatterRowsParams p) {
    const int i = blockIdx.x;
    const bf16 *from = p.src + (long)i * p.cols;
    bf16 *to = p.out + (long)p.rows[i] * p.cols;
    for (int c = threadIdx.x; c < p.cols; c += blockDim.x) to[c] = from[c];
}
