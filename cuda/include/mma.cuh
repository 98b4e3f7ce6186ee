// PTX wrappers for the tensor-core kernels (grouped GEMM, MLA attention): async global->shared copies, ldmatrix and
// mma.sync m16n8k16 bf16 with f32 accumulation. One definition each, so the fragment conventions cannot drift.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ uint32_t smem_addr(const void *p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

// 16 bytes global -> shared, bypassing L1 (.cg). Lands only at the matching cp_async_wait.
__device__ __forceinline__ void cp_async16(void *dst_smem, const void *src_global) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst_smem)), "l"(src_global));
}
// cp_async16 when `valid`, else 16 zero bytes into dst_smem with nothing read from global memory (the src-size form:
// a tile's rows past the data, without a branch). `src_global` must still be 16-byte aligned.
__device__ __forceinline__ void cp_async16_zfill(void *dst_smem, const void *src_global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst_smem)), "l"(src_global), "r"(valid ? 16 : 0));
}
// cp_async16_zfill at a shared-memory address (a swizzled one), ordered against the caller's other memory accesses.
__device__ __forceinline__ void cp_async16_zfill(uint32_t dst_addr, const void *src_global, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst_addr), "l"(src_global), "r"(valid ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 b16 matrices from shared memory; lane i supplies the row address of row i % 8 of matrix i / 8.
// ldmatrix_x4 from a shared-memory address already converted (smem_addr): a loop that steps one address saves the
// conversion per load.
__device__ __forceinline__ void ldmatrix_x4_at(uint32_t r[4], uint32_t smem_address) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_address));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *p) { ldmatrix_x4_at(r, smem_addr(p)); }
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

// ldmatrix_x4 / ldmatrix_x4_trans at shared address `base` + kOffset bytes, the offset as the instruction's immediate:
// a fully unrolled walk over a tile (unroll_indexed) adds no address arithmetic per load in the PTX (ptxas folds
// constant adds into the SASS immediate either way; the interpreter's timing model counts PTX instructions).
template <int kOffset>
__device__ __forceinline__ void ldmatrix_x4_at(uint32_t r[4], uint32_t base) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4+%5];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(base), "n"(kOffset));
}
template <int kOffset>
__device__ __forceinline__ void ldmatrix_x4_trans_at(uint32_t r[4], uint32_t base) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4+%5];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(base), "n"(kOffset));
}

// A loop index as a constant expression: unroll_indexed<N>(f) calls f(Index<0>{}), ..., f(Index<N - 1>{}) in order,
// so the body can use decltype(i)::value where a constant is required (an asm immediate such as ldmatrix_x4_at's).
template <int I>
struct Index {
    static constexpr int value = I;
};
template <int N, int I = 0, typename F>
__device__ __forceinline__ void unroll_indexed(F &&f) {
    if constexpr (I < N) {
        f(Index<I>{});
        unroll_indexed<N, I + 1>(f);
    }
}

// c += a (16x16 bf16, row) * b (16x8 bf16, col), f32 accumulators.
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// c += a (16x32 e4m3, row) * b (32x8 e4m3, col), f32 accumulators (sm_89 and later). Lane (g, t) holds in a[r] the
// four bytes of row g + 8 * (r % 2), columns 4t .. 4t+3 (+ 16 for r >= 2); in b[r] rows (k) 4t .. 4t+3 (+ 16 for
// r = 1) of column g. Products are exact in f32.
__device__ __forceinline__ void mma_e4m3(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two f32 -> a bf16x2 register (round to nearest even), lo in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}
