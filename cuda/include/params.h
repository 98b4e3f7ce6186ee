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

/* ---- shared by several families ------------------------------------------------------------------------------ */

/* Cross-kernel L2 prefetch (cuda/include/l2_prefetch.cuh, src/kernels/prefetch.rs): bytes a LATER kernel of the step
 * reads (its weights) that this launch asks L2 to fetch while it runs, so a latency-bound kernel's idle DRAM time
 * streams the next DRAM-bound kernel's weights. A range is `segments` runs of `segment_bytes` bytes, `stride` bytes
 * apart (one k-block range of every 16-row weight tile); base and stride on 16 bytes, segment_bytes a multiple of 16;
 * segment_bytes 0 = no range. A hint: it changes no result. */
typedef struct L2PrefetchRange {
    const unsigned char *base;
    unsigned long long stride;
    unsigned int segment_bytes;
    unsigned int segments;
} L2PrefetchRange;
/* The weights' bytes and their scales' (4-bit and fp8-block formats). */
typedef struct L2Prefetch {
    L2PrefetchRange range[2];
} L2Prefetch;

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
    /* moe_combine_add_rms_norm only: x is not read; row r's block output is instead the MoE combine
     * bf16(shared_out[r] + sum_j pair_out[r * top_k + j]) over the pairs whose expert topk_ids[r * top_k + j] is in
     * [0, experts) and local (expert_map[id] >= 0, or no map), j increasing: moe_combine's sum, bit for bit. pair_out
     * and shared_out are packed f32 rows of cols (shared_out may be null). */
    const float *pair_out;
    const float *shared_out;
    const int *topk_ids;
    const int *expert_map;
    int top_k;
    int experts;
} RmsNormParams;

/* ---- router.cu: fused router softmax + top-k and the per-expert token alignment ------------------------------------ */

/* Groups the tokens*k (token, slot) pairs of `topk_ids` by LOCAL expert for the grouped GEMM (the contract of
 * src/kernels/router.rs): expert_counts [local_experts]; expert_offsets [local_experts + 1] = exclusive prefix sums of
 * the counts rounded up to tile_m; sorted_pairs [max_padded] = pair index p = t*k + j grouped by local expert, increasing
 * p inside an expert, padding rows -1; tile_experts [max_padded / tile_m] = local expert of each tile, -1 past the end;
 * num_padded [1] = expert_offsets[local_experts]. expert_map [experts]: local index or -1 (owned by another GPU). */
typedef struct MoeAlignParams {
    const int *topk_ids;
    const int *expert_map;
    int *expert_counts;
    int *expert_offsets;
    int *sorted_pairs;
    int *tile_experts;
    int *num_padded;
    int pairs;         /* tokens * k */
    int experts;       /* global expert count, <= 256 */
    int local_experts; /* 1 ..= experts */
    int tile_m;        /* power of two, 1 ..= 128 */
    int max_padded;    /* round_up(pairs + local_experts * (tile_m - 1), tile_m) */
} MoeAlignParams;

/* logits = hidden . gate^T (f32 accumulation), softmax over all experts in f32, top-k (ties to the lower index),
 * topk_weights = p / (sum of the k p + 1e-20) * routed_scale; then (same launch) the alignment of `align`.
 * Grid (dim slices of 256, expert groups of experts_per_block, token groups of 64). Workspace: `partials`
 * [slices, tokens, experts] f32, `logits` [tokens, experts] f32, `counters` [token_groups + 1] i32 (zero on entry,
 * left zero on exit, so one workspace serves every replay of a CUDA graph, one launch at a time). */
typedef struct RouterParams {
    const bf16 *hidden; /* [tokens, dim] */
    const bf16 *gate;   /* [experts, dim] */
    float *partials;
    float *logits;
    int *counters;
    int experts_per_block; /* a multiple of 32 */
    int *topk_ids;       /* [tokens, k] */
    float *topk_weights; /* [tokens, k] */
    int tokens;
    int dim; /* multiple of 8 */
    int experts;
    int k; /* 1 ..= min(8, experts) */
    float routed_scale;
    MoeAlignParams align; /* align.topk_ids == topk_ids */
    L2Prefetch l2_prefetch; /* router_topk_decode only: a later kernel's weights to pull into L2, issued first */
} RouterParams;

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

/* ---- moe_gemm.cu: grouped expert GEMMs (bf16, FP8, INT4, NVFP4 weights) -------------------------------------------- */

/* In place, per token t at position pos = positions[t]: rotates the interleaved pairs of the rope dims (the last
 * rope_dim of each q head, and k_rope) by pos * inv_freq[i], and multiplies ALL head_dim dims of q by the llama-4 scale
 * 1 + beta * ln(1 + floor(pos / original_max)). */
typedef struct RopeParams {
    bf16 *q;      /* [tokens, heads, head_dim], row stride q_row_stride elements */
    bf16 *k_rope; /* [tokens, rope_dim], row stride k_row_stride elements (may be null) */
    const int *positions;
    const float *inv_freq; /* [rope_dim / 2] */
    int tokens;
    int heads;
    int head_dim;
    int rope_dim; /* even, <= head_dim; the rope part is the last rope_dim of a head */
    int q_row_stride;
    int k_row_stride;
    float scale_beta;
    int scale_original_max;
} RopeParams;

/* A GEMM's row finisher: the step that follows the GEMM on each of its output rows, run in the same launch by the
 * last block that writes into the row. Each working block, after storing its part, fences and adds one arrival to
 * counters[row] per row it wrote; the block that brings a row to column_blocks x writes (the blocks along x each
 * write a part of every row they compute; writes = 1, or for kind 2 the token's counting pairs + 1 when a dense tail
 * rides in the launch) resets the counter to 0 and runs, with the whole block:
 *  kind 1 (SMALL4_GEMM_FINISH_NORM): rms_norm_row over `norm` (x = the GEMM's bf16 output; with residual: add + RMSNorm);
 *  kind 2 (SMALL4_GEMM_FINISH_MOE_NORM): rms_norm_row with the MoE combine over `norm` (pair_out / shared_out = the f32
 *          rows the launch wrote, by pair and by tail row); the finisher's row is pair / top_k (the token);
 *  kinds 3 / 4 (SMALL4_GEMM_FINISH_MLA_LATENTS_BF16 / _FP8): rms_norm_row over `norm` (the q latent, the output's first
 *          columns) and cache_write over `cache` (the kv latent, the columns after it) into a bf16 / fp8 cache.
 * Rows = tokens: the finisher's row indexes norm and cache. A row nothing writes is not finished (kind 2: a token
 * with no counting pair and no shared expert). */
#define SMALL4_GEMM_FINISH_NONE 0
#define SMALL4_GEMM_FINISH_NORM 1
#define SMALL4_GEMM_FINISH_MOE_NORM 2
#define SMALL4_GEMM_FINISH_MLA_LATENTS_BF16 3
#define SMALL4_GEMM_FINISH_MLA_LATENTS_FP8 4
typedef struct GemmRowFinish {
    int kind;
    int column_blocks;             /* gridDim.x of the launch */
    int *counters;                 /* [rows] i32, zero at rest (each launch leaves them zero) */
    RmsNormParams norm;
    MlaCacheWriteParams cache;
} GemmRowFinish;

/* The weight operand of a grouped or dense GEMM (MoeGemmParams.weights, MoeDenseTail.weights): the repacked weights
 * and their format's scale arrays (null where the format has none), filled from one DeviceWeights
 * (DeviceWeights::kernel_operand, src/kernels/gemm/weights.rs). Shapes use the launch's rows_padded, k_dim and group;
 * `experts` is 1 for a dense tail. */
typedef struct GemmWeights {
    const unsigned char *data;     /* repacked weights; expert e starts at data + e * MoeGemmParams.expert_stride */
    const float *row_scales;       /* [experts, rows_padded] multiplier per output row (fp8 per-tensor scale, 1/nvfp4 global), or null */
    const float *block_scales;     /* fp8 block-128: [experts, k_dim / 128, rows_padded / 8] */
    const bf16 *group_scales;      /* int4: [experts, rows_padded / 16, k_dim / group, 16] */
    const unsigned char *group_zeros; /* int4 zero points (same shape), or null for symmetric (zero point 8) */
    const unsigned char *fp4_scales;  /* nvfp4: e4m3 [experts, rows_padded / 16, k_dim / 64, 16, 4] */
} GemmWeights;

/* One grouped GEMM launch: for every row of a group (a (token, expert) pair, or a plain row in dense mode),
 * y[row, n] = sum_k x[src(row), k] * W_e[n, k] for the n of this block, with W_e the row's expert's weights in the
 * repacked fragment layout (src/quant/repack.rs). Epilogue: optional per-row scale, then either SwiGLU
 * (act[row, h] = silu(y[gate h]) * y[up h], rows interleaved by the repack) or a plain store, optionally times the
 * pair's routing weight.
 *
 * Grouped mode (sorted_pairs != null): rows are the aligner's padded slots; slot r holds pair sorted_pairs[r]
 * (-1 = padding), tile r / tile_m belongs to expert tile_experts[...]; *num_padded slots are in use.
 * Dense mode (sorted_pairs == null): dense_rows rows, slot r = pair r = token r, expert 0. */
/* A dense GEMM run by the same launch as a grouped one: the shared expert beside the routed experts. One matrix in
 * the grouped weights' format and packed shape (its own arrays), its own input and output rows; the blocks past the
 * grouped tiles (blockIdx.y >= capacity_tiles) compute it. rows = 0: none. */
typedef struct MoeDenseTail {
    GemmWeights weights;           /* one matrix (expert 0) */
    const bf16 *x;                 /* [rows, x_stride] */
    bf16 *out_bf16;                /* SwiGLU: act [rows, out_stride]; or null */
    float *out_f32;                /* plain: [rows, out_stride] f32, unweighted; or null */
    int rows;
    int x_stride;
    int out_stride;
} MoeDenseTail;

typedef struct MoeGemmParams {
    GemmWeights weights;           /* the experts' (grouped) or the matrices' (dense) weights */
    const bf16 *x;                 /* input rows, x_stride elements apart */
    bf16 *out_bf16;                /* bf16 output (SwiGLU act or dense y), out_stride elements per row; or null */
    float *out_f32;                /* f32 output (per-pair expert output), out_stride elements per row; or null */
    const int *sorted_pairs;       /* grouped mode: [capacity] pair per slot, -1 = padding; null = dense mode */
    const int *tile_experts;       /* [capacity / tile_m] local expert per tile, -1 past the end */
    const int *expert_offsets;     /* [experts + 1] first slot of each expert (multiples of tile_m) */
    const int *num_padded;         /* [1] slots in use */
    const float *pair_weights;     /* [pairs] routing weight multiplied into the output, or null */
    long long expert_stride;       /* bytes of repacked weights per expert */
    int x_stride;
    int out_stride;
    int k_dim;                     /* reduction length (multiple of 64) */
    int rows_padded;               /* weight rows in the repacked layout (multiple of 128) */
    int out_cols;                  /* real output columns (SwiGLU: the hidden size) */
    int dense_rows;                /* dense mode: number of rows */
    int x_batch_stride;            /* batched dense mode (grid z > 1): elements from head z's input to head z+1's */
    int out_batch_stride;          /* the same for the output; 0 when not batched */
    int capacity_tiles;            /* grouped mode: tiles in tile_experts */
    int top_k;                     /* pair p = token * top_k + j */
    int tile_m;                    /* the aligner's tile (divides the kernel's pair tile) */
    int group;                     /* int4 group size along k (multiple of 64) */
    int swiglu;                    /* 1: SwiGLU epilogue */
    int in_by_token;               /* 1: input row = pair / top_k (x is [tokens, k_dim]); 0: input row = slot */
    int out_by_pair;               /* 1: output row = pair; 0: output row = slot */
    MoeDenseTail tail;             /* grouped mode only: a dense GEMM in the same launch (the shared expert) */
    float act_scale;               /* moe_gemm_fp8_act_* only: x = e4m3 * act_scale (multiplied into the epilogue) */
    GemmRowFinish finish;          /* kind SMALL4_GEMM_FINISH_NONE: none */
    RopeParams rope;               /* dense mode: rope_q_k's q half on the bf16 output tile (q = out_bf16, q_row_stride =
                                      out_stride) before the finisher; positions null: none */
    const unsigned char *x_e4m3;   /* moe_gemm_fp8_act_* only: e4m3 input rows in the moe_quantize_act_e4m3 layout
                                      (x_stride bytes apart) instead of x; last, so the other
                                      kernels see the fields above where they were */
    /* Split-K (cuda/moe_gemm.cu's mma.sync tiles, dense mode with one matrix only): grid z = k_splits blocks per
     * output tile, split z reducing k blocks [k_blocks * z / k_splits, k_blocks * (z + 1) / k_splits); the tile's last
     * arriving block sums the splits' f32 partials in split order and runs the epilogue. 1 (or 0): no split. */
    int k_splits;
    float *split_partials;         /* [tiles (gridDim.x * gridDim.y), k_splits, kernel-private per-thread layout] f32 */
    int *split_counters;           /* [tiles] i32, zero at rest (each launch leaves them zero) */
    /* moe_gemm_{fp8,fp8_block}_wgmma_a8 only (cuda/moe_gemm_wgmma_fp8.cu): x_e4m3's scales, one f32 per input row and
     * 128 k ([input rows, k_dim / 128], from moe_quantize_act_e4m3_block128): x = e4m3 * scale. */
    const float *x_block_scales;
    /* The decode kernel (moe_gemm_*_decode[_split]) only: a later kernel's weights to pull into L2, issued first. */
    L2Prefetch l2_prefetch;
    /* The decode kernel only, its dense launches and the dense tail's blocks: k blocks of its own weight tile (and
     * their scales) each warp asks L2 for before its griddepcontrol.wait, those after the register ring's first turn
     * (clipped to its k range); 0: none. Chosen by the host (src/kernels/gemm.rs `own_prefetch_k_blocks`). */
    int own_prefetch_k_blocks;
    /* The persistent wgmma kernels only: > 0 ends the walk after the launch's first walk_tiles work tiles (in walk
     * order: block b takes tiles b, b + gridDim.x, ...); 0 walks them all. A window of the walk run alone: the timing
     * model interprets every block of a persistent grid over its first tiles (src/kernels/moe_wgmma.rs
     * `with_walk_window`) instead of a few blocks over all of theirs. */
    int walk_tiles;
} MoeGemmParams;

/* CUtensorMap (cuda.h): the 128 opaque bytes of a TMA tensor map, made on the host by
 * Backend::encode_tensor_map_tiled (src/device/tensor_map.rs; the driver's encoding on a GPU, the interpreter's on the
 * CPU). 64-byte aligned, as the driver requires of a map in a kernel parameter. */
typedef struct __attribute__((aligned(64))) Small4TensorMap {
    unsigned long long opaque[16];
} Small4TensorMap;

/* moe_gemm_{bf16,int4,nvfp4}_wgmma_dense (cuda/moe_gemm_wgmma.cu): dense mode with the activations loaded by TMA.
 * x_map is the 3-d bf16 map of gemm.x made by src/kernels/moe_wgmma.rs: dims {k_dim, dense_rows, grid z}, byte
 * strides {x_stride * 2, x_batch_stride * 2}, box {64, 64, 1}, 128-byte swizzle, out-of-bounds rows zero-filled. The
 * kernels take the struct as `const __grid_constant__`, so the map stays in the parameter space, where TMA may read
 * it. */
typedef struct MoeGemmTmaParams {
    MoeGemmParams gemm;
    Small4TensorMap x_map;
} MoeGemmTmaParams;

/* moe_quantize_act_e4m3: out = e4m3(x * inv_scale) (round to nearest even, saturating to +-448, as
 * cvt.rn.satfinite.e4m3x2.f32), for rows x cols (cols a multiple of 64), in the B-operand order of the fp8-activation
 * GEMMs: within every 32 columns, byte c holds column pi(c) = 16 (c / 16) + 2 ((c % 16) / 4) + (c % 2) + 8 ((c / 2) % 2)
 * (the k order in which the repacked fp8 weight fragments reach mma m16n8k32; see cuda/moe_gemm.cu). */
typedef struct MoeQuantizeActParams {
    const bf16 *x;                 /* [rows, x_stride] */
    unsigned char *out;            /* [rows, cols] */
    const int *sorted_pairs;       /* rows are a grouping's slots: only slots r < *num_padded with sorted_pairs[r] >= 0
                                      are read and written (padding slots hold nothing); null = every row */
    const int *num_padded;
    int rows;
    int cols;
    int x_stride;                  /* elements between input rows */
    float inv_scale;               /* 1 / activation scale */
} MoeQuantizeActParams;

/* moe_quantize_act_e4m3_block128 (cuda/moe_gemm_wgmma_fp8.cu): activations -> e4m3 with one scale per row and 128
 * columns, as DeepGEMM quantises them: amax = max(max |x| over the 128, 2^-64) (so an all-zero block has a finite,
 * non-zero scale and quantises to zeros), scales[r, b] = amax / 448, out = e4m3(x * (448 / amax)) (round to nearest
 * even, saturating to +-448), both quotients rounded once in f32. Bytes in moe_quantize_act_e4m3's permuted order
 * (within every 32 columns, byte c holds column pi(c)); cols a multiple of 128. */
typedef struct MoeQuantizeActBlockParams {
    const bf16 *x;                 /* [rows, x_stride] */
    unsigned char *out;            /* [rows, cols] */
    float *scales;                 /* [rows, cols / 128] */
    const int *sorted_pairs;       /* as MoeQuantizeActParams: only a grouping's real slots are read and written */
    const int *num_padded;
    int rows;
    int cols;
    int x_stride;                  /* elements between input rows */
} MoeQuantizeActBlockParams;

/* out[t, :] = bf16(shared_out[t, :] + sum_j pair_out[t * top_k + j, :]) over the j whose expert is computed on this
 * GPU (topk_ids >= 0 and expert_map[id] >= 0), in increasing j: deterministic, no atomics. */
typedef struct MoeCombineParams {
    const float *pair_out;         /* [tokens * top_k, dim] f32, routing weight already applied */
    const float *shared_out;       /* [tokens, dim] f32 or null */
    const int *topk_ids;           /* [tokens * top_k] global expert ids */
    const int *expert_map;         /* [experts] global -> local expert, -1 = another GPU; null = all local */
    bf16 *out;                     /* [tokens, dim] */
    int tokens;
    int top_k;
    int dim;
    int experts;
} MoeCombineParams;

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

/* mla_cache_write_{bf16,fp8}: MlaCacheWriteParams, above the GEMMs (their latent finisher runs the writer). */

/* The paged latent cache: `num_pages` pages of `page_size` tokens, each token 320 values [kv_a_norm(c) 256 | rope(k) 64],
 * bf16 (2 bytes) or fp8 e4m3 (1 byte, value = e4m3 * fp8 scale). Token `pos` of the sequence in block-table row `s`
 * lives at page `block_tables[s * max_pages + pos / page_size]`, slot `pos % page_size`. */


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
    const bf16 *q_rope;        /* [tokens * heads, 64], rows q_rope_stride elements apart (already rotated and scaled) */
    const void *cache;         /* [num_pages, page_size, 320] bf16 or fp8 e4m3 */
    const int *block_tables;   /* [num_seqs, max_pages] */
    const int *q_start;        /* [num_seqs + 1], non-decreasing, q_start[0] = 0 */
    const int *kv_len;         /* [num_seqs], >= q_count of the sequence */
    bf16 *o_lat;               /* [tokens, heads, 256] */
    float *partial_o;          /* [num_splits, tokens * heads, 256], normalised per split (num_splits > 1 only) */
    float *partial_ml;         /* [num_splits, tokens * heads, 2]: running max (log2 domain) and sum per split */
    int *split_counters;       /* [num_seqs, row tiles], zero between launches: split blocks arriving per row tile, the
                                * last one combines the tile's rows (fused combine); NULL: mla_attention_combine runs after */
    int num_seqs;
    int heads;
    int max_pages;
    int page_size;
    int num_splits;            /* KV splits per sequence; 1 = no combine, o_lat written directly */
    int tokens_per_split;      /* multiple of the kernel's KV tile (32) */
    int row_warps;             /* warps of a block that own query rows (16 each); the block may have more (helpers
                                * that share the loads and the fused combine) */
    int tile_rows;             /* (token, head) rows of a row tile (grid x): 16 x row_warps, or 8 with one row warp
                                * (rows 8-15 of its mma tiles are padding; mla_attention_* only) */
    int total_rows;            /* tokens * heads */
    int q_rope_stride;         /* elements between q_rope rows (64 when packed; a query head's width when read in place) */
    float score_scale;         /* softmax scale * fp8 scale (1 for bf16) */
    float value_scale;         /* fp8 scale (1 for bf16) */
    L2Prefetch l2_prefetch;    /* mla_attention_{bf16,fp8} only: a later kernel's weights to pull into L2, issued first */
} MlaAttentionParams;

/* ---- ops.cu: RoPE, embedding, SwiGLU, dense GEMM, sampling and the other small kernels of a layer ------------------ */


/* out[t, :] = table[ids[t], :]. An id outside [0, vocab) writes a zero row and records the error in status:
 * status[0] += 1, status[1] = min(status[1], t) (the caller initialises status to {0, INT_MAX}). */
typedef struct EmbeddingParams {
    const int *ids;
    const bf16 *table; /* [vocab, dim] */
    bf16 *out;         /* [tokens, dim] */
    int *status;
    int tokens;
    int vocab;
    int dim;
} EmbeddingParams;

/* out[t, i] = silu(gate[t, i]) * up[t, i] in f32, rounded to bf16. gate and up may be the two halves of one
 * [tokens, 2*hidden] row (up = gate + hidden, stride 2*hidden). */
typedef struct SiluMulParams {
    const bf16 *gate;
    const bf16 *up;
    bf16 *out;
    int tokens;
    int hidden;
    int in_row_stride;  /* elements between rows of gate and of up */
    int out_row_stride; /* elements between rows of out */
} SiluMulParams;

/* ids[r] = argmax over logits[r, :vocab] (ties to the lower id; NaN never wins). */
typedef struct ArgmaxParams {
    const float *logits; /* [rows, vocab], row stride `row_stride` */
    int *ids;
    int rows;
    int vocab;
    int row_stride;
} ArgmaxParams;

/* After a decode step, for each row r: ids[r] = next[r]; positions[r], cache_positions[r] and seq_lens[r] += 1 (the
 * last two may be null). Rows are sequences; each array is packed [rows]. */
typedef struct DecodeAdvanceParams {
    const int *next;      /* the sampled tokens */
    int *ids;             /* the next step's input ids */
    int *positions;       /* the next step's token positions (RoPE) */
    int *cache_positions; /* the cache writer's positions (TokenSlots), or null */
    int *seq_lens;        /* the block tables' sequence lengths (BlockTables), or null */
    int rows;
} DecodeAdvanceParams;

/* Seeded temperature + top-p sampling, one row per block; the algorithm is in cuda/ops.cu and its CPU twin in
 * src/reference/sampling.rs. temperature[r] <= 0 means greedy (argmax). */
typedef struct SampleParams {
    const float *logits;
    int *ids;
    const float *temperature;
    const float *top_p;
    const unsigned long long *seeds;
    const int *steps;
    int rows;
    int vocab;
    int row_stride;
} SampleParams;

/* ---- vision.cu: patch embedding and the vision tower's own kernels ------------------------------------------------- */

/* out[patch, k] = pixels[c, gy * patch + ky, gx * patch + kx] of one image (f32, CHW) for k = (c * patch + ky) * patch
 * + kx < channels * patch^2, zero up to k_padded: the unfolded patches of the patch conv, rows in row-major grid order. */
typedef struct PatchIm2colParams {
    const float *pixels;
    bf16 *out;
    int channels;
    int height;
    int width;
    int patch;
    int k_padded;
} PatchIm2colParams;

/* In place 2D RoPE on interleaved pairs of each head of q and k [tokens, heads * head_dim]: pair j < head_dim / 4 turns
 * by grid_rows[t] * inv_freq_rows[j], pair head_dim / 4 + j by grid_cols[t] * inv_freq_cols[j]. k may be null. */
typedef struct Rope2dParams {
    bf16 *q;
    bf16 *k;
    const int *grid_rows;
    const int *grid_cols;
    const float *inv_freq_rows;
    const float *inv_freq_cols;
    int tokens;
    int heads;
    int head_dim;
} Rope2dParams;

/* Bidirectional attention inside segments (block-diagonal): token t attends to the keys [segment_start[t],
 * segment_end[t]). q, k, v, out [tokens, heads * 64] bf16; probabilities exp(scale * q.k) normalised in f32. */
typedef struct VisionAttentionParams {
    const bf16 *q;
    const bf16 *k;
    const bf16 *v;
    bf16 *out;
    const int *segment_start;
    const int *segment_end;
    int tokens;
    int heads;
    float scale;
} VisionAttentionParams;

/* In place x[r, c] = act(x[r, c] + bias[c]) for [rows, cols] bf16; bias may be null; act 0 = identity, 1 = exact erf
 * GELU. */
typedef struct BiasActParams {
    bf16 *x;
    const bf16 *bias;
    int rows;
    int cols;
    int gelu;
} BiasActParams;

/* The patch merger's unfold: out[r, c * group + s] = x[sources[r * group + s], c] for out [rows, hidden * group]. */
typedef struct PatchMergeParams {
    const bf16 *x;
    const int *sources;
    bf16 *out;
    int rows;
    int hidden;
    int group;
} PatchMergeParams;

/* out[rows[i], :] = src[i, :] for i < count (rows of `cols` bf16); out has out_rows rows (indices checked on the host). */
typedef struct ScatterRowsParams {
    const bf16 *src;
    const int *rows;
    bf16 *out;
    int count;
    int cols;
} ScatterRowsParams;

/* ---- synth.cu: counter-based synthetic weights (the contract is the module doc of src/model/synth.rs) ------------ */

/* synth_plain: out[i] = value of element i of the tensor with `key`, i < n, bf16:
 * kind 0 (a bf16 linear or table): (2 * (int8)byte(i) + 1) * unit; kind 1 (a norm weight): 1 + ((byte(i) & 15) - 8) / 128. */
typedef struct SynthPlainParams {
    bf16 *out;
    uint64_t key;
    int64_t n;
    float unit;
    int kind;
} SynthPlainParams;

/* synth_packed_codes / synth_packed_scales: synthetic matrices written straight into the packed layout of
 * src/quant/repack.rs (PackedWeights) for `experts` experts. Packed row r of an expert comes from source matrix m, row
 * `row` (linear: m = 0, row = r; swiglu: tiles of 8 gate rows then 8 up rows, m = 0 gate, 1 up); rows >= `rows` are
 * padding (zero codes, zero scales, zero point 8). Element (row, k) of a source is element
 * src = base + row * row_stride + k * col_stride of the checkpoint tensor [*, src_cols] whose key is
 * keys[expert * mats + m] (a view: the whole tensor, a row slice or a transposed row slice); k >= k_valid is zero.
 * format: 0 bf16, 1 fp8 per tensor, 2 fp8 block-128, 3 int4, 4 nvfp4. */
typedef struct SynthPackedParams {
    uint8_t *data;             /* [experts, tiles, k_dim / 64, tile bytes] */
    float *row_scales;         /* [experts, rows_padded]: fp8 per tensor (unit), nvfp4 (unit = 1 / global) */
    float *block_scales;       /* [experts, k_dim / 128, rows_padded / 8] */
    bf16 *group_scales;        /* [experts, rows_padded / 16, k_dim / group, 16] */
    uint8_t *group_zeros;      /* same layout, null for symmetric int4 */
    uint8_t *fp4_scales;       /* [experts, rows_padded / 16, k_dim / 64, 16, 4] */
    const uint64_t *keys;      /* [experts, mats] */
    int64_t base;
    int64_t row_stride;
    int64_t col_stride;
    int64_t src_cols;
    int experts;
    int mats;                  /* 1 (linear) or 2 (gate/up interleave) */
    int rows;                  /* source rows per matrix */
    int rows_padded;           /* multiple of 128 */
    int k_dim;                 /* multiple of 64 */
    int k_valid;
    int format;
    int group;                 /* int4 group (multiple of 64) */
    int scale_array;           /* synth_packed_scales: 0 row_scales, 1 block_scales, 2 group scales + zeros, 3 fp4_scales */
    float unit;
} SynthPackedParams;

#endif /* SMALL4_PARAMS_H */
