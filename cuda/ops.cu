// The small kernels of a decoder layer: YaRN RoPE with the llama-4 query scale, embedding gather, SiLU-and-multiply,
// greedy argmax and seeded temperature + top-p sampling. (The dense GEMMs of this family live in their own section.)
// The decode step's ops (embedding_gather, argmax_rows, sample_rows, decode_advance) are programmatic launches
// (common.cuh) that wait for the kernel before them first: each reads its output straight away.
#include <climits>

#include "params.h"
#include "common.cuh"

namespace {

constexpr int kVector = 8;  // bf16 per 16-byte load

__device__ __forceinline__ bool aligned16(const void *p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

// ---- rope_q_k ----------------------------------------------------------------------------------------------------
// In place: q[t, h, :] *= s(pos) with the last rope_dim of each head rotated by interleaved pairs, k_rope[t, :] rotated.
// Thread mapping: one block per token; the first rope_dim/2 threads compute cos/sin of the token's angles into shared
// memory, then every thread takes 16-byte chunks (8 dims = 4 pairs) of the heads * head_dim q values and the rope_dim
// k values. Angles: pos * inv_freq as an exact f32 pair, reduced to about [-pi, pi] by Cody-Waite (|error| ~3e-7 rad
// up to position 2^20, where a plain f32 product would be off by 0.06 rad), then sin/cos of the reduced angle with the
// fast hardware approximations (|error| < 1e-6 on [-pi, pi]; no slow range-reduction path, no local memory). Requires head_dim, rope_dim and both row strides to be
// multiples of 8 (the wrapper checks). Bytes: 2 * 2 * tokens * (heads * head_dim + rope_dim). FLOPs: ~6 per element.
// The query projection's GEMM can do the q half in its epilogue instead (cuda/moe_gemm.cu, MoeGemmParams.rope), with
// the same common.cuh functions, bit for bit.
extern "C" __global__ void __launch_bounds__(256) rope_q_k(const RopeParams p) {
    __shared__ float cos_of[128], sin_of[128];
    const int t = blockIdx.x;
    const int pos = p.positions[t];
    const int pairs = p.rope_dim / 2;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        float s, c;
        rope_sincos(pos, p.inv_freq[i], &s, &c);
        sin_of[i] = s;
        cos_of[i] = c;
    }
    __syncthreads();
    const float q_scale = llama4_query_scale(pos, p.scale_beta, p.scale_original_max);

    const int head_chunks = p.head_dim / kVector;
    const int q_chunks = p.heads * head_chunks;
    const int k_chunks = p.k_rope != nullptr ? p.rope_dim / kVector : 0;
    const int nope = p.head_dim - p.rope_dim;
    for (int c = threadIdx.x; c < q_chunks + k_chunks; c += blockDim.x) {
        bf16 *ptr;
        int rope_col;  // column of the chunk inside the rope part, < 0 when the chunk is all nope
        float scale;
        if (c < q_chunks) {
            const int col = (c % head_chunks) * kVector;
            ptr = p.q + (long)t * p.q_row_stride + (c / head_chunks) * p.head_dim + col;
            rope_col = col - nope;
            scale = q_scale;
        } else {
            rope_col = (c - q_chunks) * kVector;
            ptr = p.k_rope + (long)t * p.k_row_stride + rope_col;
            scale = 1.f;
        }
        float v[kVector];
        bf16x8_to_f32(*reinterpret_cast<const uint4 *>(ptr), v);
        if (rope_col >= 0) {
#pragma unroll
            for (int m = 0; m < kVector / 2; ++m) rope_rotate(v[2 * m], v[2 * m + 1], cos_of[rope_col / 2 + m], sin_of[rope_col / 2 + m]);
        }
#pragma unroll
        for (int i = 0; i < kVector; ++i) v[i] *= scale;
        *reinterpret_cast<uint4 *>(ptr) = f32x8_to_bf16(v);
    }
}

// ---- embedding_gather --------------------------------------------------------------------------------------------
// out[t, :] = table[ids[t], :]. One block per token, threads over 16-byte chunks of the row (single elements when the
// row is not 16-byte aligned). An out-of-range id never reads the table: the row is written as zeros and status
// records it (status[0] += 1, status[1] = min token index). Bytes: 2 * 2 * tokens * dim (+4 per token).
extern "C" __global__ void __launch_bounds__(256) embedding_gather(const EmbeddingParams p) {
    // Programmatic launch (common.cuh): the ids are the previous step's decode_advance output; the table is static
    // but which row to read is known only from them.
    wait_then_allow_dependents();
    const int t = blockIdx.x;
    const int id = p.ids[t];
    const bool valid = id >= 0 && id < p.vocab;
    if (!valid && threadIdx.x == 0) {
        atomicAdd(p.status, 1);
        atomicMin(p.status + 1, t);
    }
    const bf16 *src = p.table + (long)(valid ? id : 0) * p.dim;
    bf16 *dst = p.out + (long)t * p.dim;
    if (p.dim % kVector == 0 && aligned16(p.table) && aligned16(p.out)) {
        for (int c = threadIdx.x * kVector; c < p.dim; c += blockDim.x * kVector) {
            const uint4 v = valid ? __ldg(reinterpret_cast<const uint4 *>(src + c)) : make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4 *>(dst + c) = v;
        }
    } else {
        for (int c = threadIdx.x; c < p.dim; c += blockDim.x) dst[c] = valid ? src[c] : __float2bfloat16(0.f);
    }
}

// ---- silu_mul ----------------------------------------------------------------------------------------------------
// out[t, i] = silu(gate[t, i]) * up[t, i], silu(x) = x / (1 + e^-x), in f32, one bf16 rounding. Grid: (column blocks,
// tokens); each thread one 16-byte chunk (or one element when rows are not 16-byte aligned).
// Bytes: 2 * 3 * tokens * hidden. FLOPs: ~5 per element.
extern "C" __global__ void __launch_bounds__(256) silu_mul(const SiluMulParams p) {
    const int t = blockIdx.y;
    const bf16 *gate = p.gate + (long)t * p.in_row_stride;
    const bf16 *up = p.up + (long)t * p.in_row_stride;
    bf16 *out = p.out + (long)t * p.out_row_stride;
    const bool vectorised = p.hidden % kVector == 0 && p.in_row_stride % kVector == 0 && p.out_row_stride % kVector == 0 &&
                            aligned16(p.gate) && aligned16(p.up) && aligned16(p.out);
    if (vectorised) {
        const int c = (blockIdx.x * blockDim.x + threadIdx.x) * kVector;
        if (c >= p.hidden) return;
        float g[kVector], u[kVector];
        bf16x8_to_f32(*reinterpret_cast<const uint4 *>(gate + c), g);
        bf16x8_to_f32(*reinterpret_cast<const uint4 *>(up + c), u);
#pragma unroll
        for (int i = 0; i < kVector; ++i) g[i] = g[i] / (1.f + __expf(-g[i])) * u[i];
        *reinterpret_cast<uint4 *>(out + c) = f32x8_to_bf16(g);
    } else {
        for (int c = (blockIdx.x * blockDim.x + threadIdx.x) * kVector, end = min(c + kVector, p.hidden); c < end; ++c) {
            const float g = __bfloat162float(gate[c]);
            out[c] = __float2bfloat16(g / (1.f + __expf(-g)) * __bfloat162float(up[c]));
        }
    }
}

// ---- argmax and sampling -----------------------------------------------------------------------------------------
namespace {

constexpr float kLog2E = 1.4426950408889634f;
// Token weights are fixed point: w = floor(2^24 * 2^x), x = (logit - max) * log2(e) / temperature, and 0 below x = -25.
constexpr int kWeightBits = 24;

struct Best {
    float value;
    int index;  // INT_MAX: none yet
};

// a before b: larger value, then lower index; NaN never wins (it is never stored).
__device__ __forceinline__ Best better(Best a, Best b) {
    if (b.index == INT_MAX) return a;
    if (a.index == INT_MAX) return b;
    return (b.value > a.value || (b.value == a.value && b.index < a.index)) ? b : a;
}

__device__ __forceinline__ Best warp_best(Best b) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        Best other{__shfl_xor_sync(0xffffffffu, b.value, offset), __shfl_xor_sync(0xffffffffu, b.index, offset)};
        b = better(b, other);
    }
    return b;
}

// Argmax of one row over the block (blockDim a multiple of 32); every thread gets the result.
__device__ Best block_argmax(const float *row, int vocab) {
    __shared__ float values[32];
    __shared__ int indices[32];
    Best best{-INFINITY, INT_MAX};
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        // Each thread visits increasing indices, so a strict > keeps its lowest index among equals.
        if (!isnan(v) && (best.index == INT_MAX || v > best.value)) best = Best{v, i};
    }
    best = warp_best(best);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        values[warp] = best.value;
        indices[warp] = best.index;
    }
    __syncthreads();
    best = lane < (int)(blockDim.x >> 5) ? Best{values[lane], indices[lane]} : Best{-INFINITY, INT_MAX};
    return warp_best(best);
}

__device__ __forceinline__ unsigned long long warp_sum_u64(unsigned long long v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sums of kCount u64 values over the block (integers: exact, so the order does not matter).
template <int kCount>
__device__ void block_sum_u64(unsigned long long (&v)[kCount]) {
    __shared__ unsigned long long partial[kCount][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int j = 0; j < kCount; ++j) v[j] = warp_sum_u64(v[j]);
    __syncthreads();
    if (lane == 0) {
#pragma unroll
        for (int j = 0; j < kCount; ++j) partial[j][warp] = v[j];
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < kCount; ++j) v[j] = warp_sum_u64(lane < warps ? partial[j][lane] : 0ull);
}

// 2^x for x in [-25, 0] times 2^24, truncated: only IEEE-exact f32 operations (sub, mul, floor, fma) in a fixed
// order, so src/reference/sampling.rs reproduces every bit on the CPU. Degree-7 Taylor polynomial of 2^f on [0, 1)
// (coefficients (ln 2)^k / k!, written as the shortest decimals of their f32 values, identical in both files).
__device__ __forceinline__ unsigned fixed_point_weight(float logit, float max, float scale) {
    const float x = __fmul_rn(__fsub_rn(logit, max), scale);
    if (!(x >= -25.f)) return 0;  // also NaN logits
    const float n = floorf(x);
    const float f = __fsub_rn(x, n);
    float poly = 1.5252734e-5f;
    poly = fmaf(poly, f, 1.540353e-4f);
    poly = fmaf(poly, f, 1.3333558e-3f);
    poly = fmaf(poly, f, 9.618129e-3f);
    poly = fmaf(poly, f, 5.550411e-2f);
    poly = fmaf(poly, f, 2.402265e-1f);
    poly = fmaf(poly, f, 6.931472e-1f);
    poly = fmaf(poly, f, 1.f);
    const float power = __int_as_float(((int)n + kWeightBits + 127) << 23);  // 2^(n + 24), n + 24 >= -1
    return (unsigned)__fmul_rn(poly, power);
}

// Philox4x32-10 (Salmon et al., Random123): counter {step, 'SML4', 0, 0}, key = the row's 64-bit seed.
__device__ __forceinline__ unsigned long long philox_u64(unsigned long long seed, unsigned step) {
    unsigned c0 = step, c1 = 0x534d4c34u, c2 = 0, c3 = 0;
    unsigned k0 = (unsigned)seed, k1 = (unsigned)(seed >> 32);
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
        const unsigned hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    return (unsigned long long)c0 << 32 | c1;
}

}  // namespace

// ids[r] = argmax(logits[r, :]), ties to the lower id, NaN ignored, -1 when the row has no number at all.
// One block per row, threads strided over the vocabulary (coalesced). Bytes: 4 * vocab per row.
extern "C" __global__ void __launch_bounds__(1024) argmax_rows(const ArgmaxParams p) {
    wait_then_allow_dependents();  // programmatic launch: the logits are the head's output
    const Best best = block_argmax(p.logits + (long)blockIdx.x * p.row_stride, p.vocab);
    if (threadIdx.x == 0) p.ids[blockIdx.x] = best.index == INT_MAX ? -1 : best.index;
}

// Seeded temperature + top-p sampling, one block per row r (greedy argmax when temperature[r] <= 0):
//  1. m = max logit; token weights w_i = fixed_point_weight(l_i, m, log2(e) / T) (integers, w = 2^24 for the max);
//  2. S = sum w_i; target = ceil(S * P / 2^24) with P = floor(top_p * 2^24) (top_p < 1; else S), at least 1;
//  3. tau = the largest integer with mass(tau) = sum of the w_i >= tau at least target: the nucleus {i: w_i >= tau}
//     (ties at tau all kept). Found without sorting by a 16-way search over [1, 2^25): each pass evaluates 15
//     thresholds in one sweep over the row (7 passes);
//  4. u = Philox4x32-10(seed[r], step[r]) as 64 bits; R = floor(u * M / 2^64) with M = mass(tau);
//  5. the sample is the token where the running sum of kept weights, in token order, first exceeds R (per-thread
//     contiguous chunks, an exclusive scan of the chunk sums, then one thread walks its chunk).
// Every sum is an integer, so the result is bit-reproducible and src/reference/sampling.rs computes the same token.
// Bytes: 4 * vocab per pass (about 10 passes, from L2 after the first). Weights below 2^-24 of the max are never sampled.
extern "C" __global__ void __launch_bounds__(512) sample_rows(const SampleParams p) {
    wait_then_allow_dependents();  // programmatic launch: the logits are the head's output
    __shared__ unsigned long long scan[32];
    __shared__ int chosen;
    const float *row = p.logits + (long)blockIdx.x * p.row_stride;
    const Best best = block_argmax(row, p.vocab);
    const float temperature = p.temperature[blockIdx.x];
    if (!(temperature > 0.f) || best.index == INT_MAX) {
        if (threadIdx.x == 0) p.ids[blockIdx.x] = best.index == INT_MAX ? -1 : best.index;
        return;
    }
    const float max = best.value;
    const float scale = __fdiv_rn(kLog2E, temperature);

    unsigned long long total[1] = {0};
    for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) total[0] += fixed_point_weight(row[i], max, scale);
    block_sum_u64(total);
    if (total[0] == 0) {  // a temperature so small that log2(e) / T overflowed: greedy
        if (threadIdx.x == 0) p.ids[blockIdx.x] = best.index;
        return;
    }
    // target = ceil(S * P / 2^24) with P = floor(top_p * 2^24): integers only (S * P < 2^66, as a 128-bit product).
    const float top_p = p.top_p[blockIdx.x];
    unsigned long long target = total[0];
    if (top_p < 1.f) {
        const unsigned long long quantised = top_p > 0.f ? (unsigned)(top_p * 16777216.f) : 0u;
        const unsigned long long lo = total[0] * quantised, hi = __umul64hi(total[0], quantised);
        target = (hi << 40 | lo >> 24) + ((lo & 0xffffffull) != 0);
        if (target == 0) target = 1;
    }

    // Invariant: mass(lo) >= target > mass(hi).
    unsigned lo = 1, hi = 1u << (kWeightBits + 1);
    unsigned long long kept = total[0];
    while (hi - lo > 1) {
        const unsigned step = (hi - lo + 15) / 16;
        unsigned long long mass[15];
#pragma unroll
        for (int j = 0; j < 15; ++j) mass[j] = 0;
        for (int i = threadIdx.x; i < p.vocab; i += blockDim.x) {
            const unsigned w = fixed_point_weight(row[i], max, scale);
#pragma unroll
            for (int j = 0; j < 15; ++j) mass[j] += w >= lo + (j + 1) * step ? w : 0u;
        }
        block_sum_u64(mass);
        unsigned new_lo = lo, new_hi = hi;
        unsigned long long new_kept = kept;
#pragma unroll
        for (int j = 0; j < 15; ++j) {
            const unsigned candidate = lo + (j + 1) * step;
            if (candidate < hi) {
                if (mass[j] >= target) {
                    new_lo = candidate;
                    new_kept = mass[j];
                } else if (new_hi == hi) {
                    new_hi = candidate;
                }
            }
        }
        lo = new_lo;
        hi = new_hi;
        kept = new_kept;
    }
    const unsigned tau = lo;
    const unsigned long long r = __umul64hi(philox_u64(p.seeds[blockIdx.x], (unsigned)p.steps[blockIdx.x]), kept);

    // Token order: thread t owns [t * chunk, (t + 1) * chunk).
    const int chunk = (p.vocab + blockDim.x - 1) / blockDim.x;
    const int begin = min(p.vocab, (int)threadIdx.x * chunk), end = min(p.vocab, begin + chunk);
    unsigned long long mine = 0;
    for (int i = begin; i < end; ++i) {
        const unsigned w = fixed_point_weight(row[i], max, scale);
        mine += w >= tau ? w : 0u;
    }
    // Exclusive scan of the chunk sums over the block.
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    unsigned long long inclusive = mine;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
        const unsigned long long up = __shfl_up_sync(0xffffffffu, inclusive, d);
        if (lane >= d) inclusive += up;
    }
    if (lane == 31) scan[warp] = inclusive;
    if (threadIdx.x == 0) chosen = -1;
    __syncthreads();
    unsigned long long before = inclusive - mine;
    for (int w = 0; w < warp; ++w) before += scan[w];
    if (mine > 0 && before <= r && r < before + mine) {
        unsigned long long running = before;
        for (int i = begin; i < end; ++i) {
            const unsigned w = fixed_point_weight(row[i], max, scale);
            if (w >= tau) {
                running += w;
                if (running > r) {
                    chosen = i;
                    break;
                }
            }
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) p.ids[blockIdx.x] = chosen;
}

// A decode step's inputs for the next step, advanced on the device so that a replayed graph needs no upload: for each
// sequence row r, ids[r] = next[r] (the token just sampled), and positions[r], cache_positions[r], seq_lens[r] each
// + 1 (the new token's position, the cache writer's copy of it, the attention's kv length). One thread per row.
// Bytes: 4 read + 4 written for ids, 8 per counter, per row.
extern "C" __global__ void decode_advance(const DecodeAdvanceParams p) {
    wait_then_allow_dependents();  // programmatic launch: next[] is the sampler's output, and this kernel writes
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.rows) return;
    p.ids[r] = p.next[r];
    p.positions[r] += 1;
    if (p.cache_positions != nullptr) p.cache_positions[r] += 1;
    if (p.seq_lens != nullptr) p.seq_lens[r] += 1;
}
