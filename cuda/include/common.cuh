// Device helpers shared by every kernel family: bf16 vector packing and warp / block reductions.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

// Programmatic dependent launch (PTX griddepcontrol, sm_90). A kernel whose entry executes wait_for_prior_grids is
// launched with the programmatic-stream-serialization attribute (src/device `Kernel::waits_for_prior_grids`), so it
// may start while the kernel before it finishes. Each thread calls wait_for_prior_grids before (a) any global load of
// memory an earlier kernel of the step may write, (b) any global store or atomic, (c) allow_dependent_grids; before
// it, only memory no kernel writes (weights, constant tables) may be read. The wait returns once every prerequisite
// grid completed and its memory is visible; allow_dependent_grids lets the next kernel start once every block of this
// grid called it or exited. Both are no-ops in a launch without the attribute. Triggering only after the wait keeps
// the chain transitive: a kernel's dependents start after everything it depends on completed.
__device__ __forceinline__ void wait_for_prior_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void allow_dependent_grids() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// The usual pair at the point a kernel starts touching what earlier kernels wrote.
__device__ __forceinline__ void wait_then_allow_dependents() {
    wait_for_prior_grids();
    allow_dependent_grids();
}

// The dynamic shared memory this launch was given, in bytes (PTX special register %dynamic_smem_size, sm_20+): a
// kernel whose staging depends on it never writes past what the host sized.
__device__ __forceinline__ unsigned int dynamic_smem_bytes() {
    unsigned int bytes;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(bytes));
    return bytes;
}

// 8 bf16 packed in a 16-byte vector -> 8 f32 (exact).
__device__ __forceinline__ void bf16x8_to_f32(const uint4 raw, float out[8]) {
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        out[2 * i] = __uint_as_float(words[i] << 16);
        out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
}

// 8 f32 -> 8 bf16 (round to nearest even) packed in a 16-byte vector.
__device__ __forceinline__ uint4 f32x8_to_bf16(const float in[8]) {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        __nv_bfloat162 pair = __floats2bfloat162_rn(in[2 * i], in[2 * i + 1]);
        words[i] = *reinterpret_cast<uint32_t *>(&pair);
    }
    return make_uint4(words[0], words[1], words[2], words[3]);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// Deterministic: a fixed butterfly inside each warp, then warps combined in index order.
__device__ __forceinline__ float block_sum(float v) {
    __shared__ float partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    float total = lane < warps ? partial[lane] : 0.f;
    return warp_sum(total);
}

// sin and cos of the RoPE angle pos * inv_freq, accurate at long context without f64 or sincosf's slow path:
// pos * f as an exact f32 pair hi + lo (pos < 2^24 is exact in f32; fma gives the product's rounding error), hi
// reduced by 2 pi with Cody-Waite (2 pi = C1 + C2 to ~2^-48, two fma steps), lo added back, then the hardware
// approximations on [-pi, pi] (|error| < 1e-6). |angle error| ~3e-7 rad up to position 2^20, where one rounded f32
// product would be off by ~0.06 rad.
__device__ __forceinline__ void rope_sincos(int pos, float inv_freq, float *sin_out, float *cos_out) {
    const float pos_f = (float)pos;
    const float hi = __fmul_rn(pos_f, inv_freq);
    const float lo = fmaf(pos_f, inv_freq, -hi);
    const float turns = rintf(hi * 0.159154943091895336f);  // 1 / (2 pi)
    float reduced = fmaf(-turns, 6.28318548202514648f, hi);
    reduced = fmaf(-turns, -1.74845553146951715e-7f, reduced);
    __sincosf(reduced + lo, sin_out, cos_out);
}

// The interleaved RoPE rotation of one pair (a, b) = (x[2i], x[2i+1]) by the angle of cos_v and sin_v.
__device__ __forceinline__ void rope_rotate(float &a, float &b, float cos_v, float sin_v) {
    const float ra = a * cos_v - b * sin_v, rb = a * sin_v + b * cos_v;
    a = ra;
    b = rb;
}

// The llama-4 query scale 1 + beta * ln(1 + floor(pos / original_max)) (1 when beta is 0).
__device__ __forceinline__ float llama4_query_scale(int pos, float beta, int original_max) {
    return 1.f + beta * logf(1.f + (float)(pos / original_max));
}

// The online-softmax update of a thread's two rows (g and g + 8 of an m16 fragment) after one tile of scores: folds
// the quad's row maxima into `tile_max` (a quad's four lanes hold a row's columns), moves `running_max` (log2 domain)
// to the new maxima and shrinks `sum` by `correction`, the factor by which the row's output must be rescaled too;
// `base` is what the tile's scores subtract before exp2 (0 for a row with no key yet: its weights are all 0).
__device__ __forceinline__ void online_softmax_new_max(float (&tile_max)[2], float (&running_max)[2], float (&sum)[2], float (&base)[2],
                                                       float (&correction)[2]) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 1));
        tile_max[h] = fmaxf(tile_max[h], __shfl_xor_sync(0xffffffffu, tile_max[h], 2));
        const float new_max = fmaxf(running_max[h], tile_max[h]);
        base[h] = new_max == -INFINITY ? 0.f : new_max;
        correction[h] = exp2f(running_max[h] - base[h]);
        running_max[h] = new_max;
        sum[h] *= correction[h];
    }
}
