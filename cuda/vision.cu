// The vision tower's own kernels (Pixtral style, SPEC-model.md "Vision tower"): the patch embedding's unfold, 2D
// RoPE, block-diagonal bidirectional attention, bias + exact GELU, the patch merger's 2x2 unfold and the scatter of
// image features into the [IMG] rows of the text embeddings. The tower's linears run on the dense GEMM of
// moe_gemm.cu, its norms on norm.cu and its SwiGLU on ops.cu's silu_mul.
#include "params.h"
#include "common.cuh"
#include "mma.cuh"
#include "vision_attention.cuh"

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
// Block-diagonal bidirectional attention for head_dim 64 on the tensor cores (flash-attention style), the mma.sync
// kernel (cuda/vision_attention_wgmma.cu has the Hopper one; src/kernels/vision.rs picks). Grid (query tiles of 64
// tokens, heads); 4 warps, each owning 16 queries. The query tile stays in registers as mma A fragments; keys and
// values stream through shared memory in tiles of 64 over the union of the tile's segments (the keys from the first
// query's segment start to the last query's segment end). S = Q K^T (mma.sync m16n8k16, f32 accumulators), keys
// outside a query's own segment masked to -inf, online softmax in f32 (base 2, scale folded in), P rounded to bf16 as
// the A operand of O += P V (the normaliser sums the rounded P, so each output is a convex combination of the values
// with the weights the product used), output normalised and rounded to bf16 once (cuda/include/vision_attention.cuh).
// Shared rows are padded to 72 elements (144 bytes) so the 8 rows of an ldmatrix fall in distinct banks.
// Bytes: q and out once; k and v once per query tile. FLOPs: 4 * 64 per (query, key) pair of the tile's key range.
namespace {
using namespace block_diagonal_attention;
constexpr int kStride = kHeadDim + 8;

// rows [first, first + valid) of a [tokens, row_stride] tensor (64 columns from `src`) into a 64-row tile; zeros past
// `valid` (masked keys must meet finite values: 0 * NaN would poison the output).
__device__ __forceinline__ void load_tile(bf16 (*tile)[kStride], const bf16 *src, long row_stride, int first, int valid) {
    for (int c = threadIdx.x; c < 64 * (kHeadDim / 8); c += blockDim.x) {
        const int r = c / (kHeadDim / 8), d = (c % (kHeadDim / 8)) * 8;
        const uint4 v = r < valid ? *reinterpret_cast<const uint4 *>(src + (first + r) * row_stride + d) : make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4 *>(&tile[r][d]) = v;
    }
}
}  // namespace

extern "C" __global__ void __launch_bounds__(128) vision_attention(const VisionAttentionParams p) {
    __shared__ __align__(16) bf16 q_tile[kQueries][kStride];
    __shared__ __align__(16) bf16 k_tile[kKeys][kStride];
    __shared__ __align__(16) bf16 v_tile[kKeys][kStride];
    const int head = blockIdx.y;
    const int first_query = blockIdx.x * kQueries;
    const int queries = min(kQueries, p.tokens - first_query);
    const long row_stride = (long)p.heads * kHeadDim;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;

    load_tile(q_tile, p.q + head * kHeadDim, row_stride, first_query, queries);
    __syncthreads();
    uint32_t qa[4][4];  // A fragments of the warp's 16 queries, one per 16-dim k-step
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) ldmatrix_x4(qa[kk], &q_tile[warp * 16 + ((lane / 8) & 1) * 8 + lane % 8][kk * 16 + (lane / 16) * 8]);

    // This thread's rows: g and g + 8 of the warp's 16.
    const RowSegments rows = row_segments(p, first_query + warp * 16 + g);
    // Segments are contiguous and in token order: the tile's keys span from its first query's segment to its last's.
    const int key_begin = p.segment_start[first_query];
    const int key_end = p.segment_end[first_query + queries - 1];
    const float scale = p.scale * kLog2E;

    float o[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
    SoftmaxState state = softmax_start();

    for (int tile = key_begin; tile < key_end; tile += kKeys) {
        __syncthreads();  // the previous tile is no longer read
        const int count = min(kKeys, key_end - tile);
        load_tile(k_tile, p.k + head * kHeadDim, row_stride, tile, count);
        load_tile(v_tile, p.v + head * kHeadDim, row_stride, tile, count);
        __syncthreads();

        // S [16 queries, 64 keys] of this warp: 8 blocks of 8 keys.
        float s[8][4];
#pragma unroll
        for (int nb = 0; nb < 8; ++nb) {
            s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                uint32_t b[4];
                ldmatrix_x4(b, &k_tile[nb * 8 + lane % 8][half * 32 + (lane / 8) * 8]);
                mma_bf16(s[nb], qa[2 * half], b[0], b[1]);
                mma_bf16(s[nb], qa[2 * half + 1], b[2], b[3]);
            }
        }
        uint32_t pa[4][4];
        float correction[2];
        softmax_tile(s, pa, correction, state, rows, tile, t, scale);
        rescale_rows(o, correction);
        // O [16 queries, 64 dims] += P V: 4 key k-steps x 4 pairs of 8-dim blocks.
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
            for (int db = 0; db < 4; ++db) {
                uint32_t b[4];
                ldmatrix_x4_trans(b, &v_tile[kk * 16 + ((lane / 8) & 1) * 8 + lane % 8][db * 16 + (lane / 16) * 8]);
                mma_bf16(o[2 * db], pa[kk], b[0], b[1]);
                mma_bf16(o[2 * db + 1], pa[kk], b[2], b[3]);
            }
        }
    }
    store_rows(p, o, state, first_query + warp * 16 + g, head, t);
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
