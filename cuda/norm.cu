// RMSNorm, optionally fused with the residual add of the pre-norm decoder, and with the MoE combine before it.
//
// Computes, for each row r:  h = x[r] (+ residual[r]);  residual_out[r] = h;  out[r] = h * rsqrt(mean(h^2) + eps) * w.
// moe_combine_add_rms_norm: x[r] is the MoE block's output, combined here from its per-pair f32 rows exactly as
// moe_combine does (params.h), so a MoE layer ends in one launch instead of a combine and an add + norm.
// Thread mapping: one block per row, blockDim.x threads (a multiple of 32, at most 1024) stride over the columns in
// chunks of 8 bf16 (one 16-byte vector) when the row is 16-byte aligned, else one element at a time.
// Reduction: warp shuffle (xor butterfly), then one f32 per warp in shared memory, then warp 0 combines.
// Bytes: reads 2*cols (x) + 2*cols (weight, L2-resident across rows) [+ 2*cols residual], writes 2*cols [+ 2*cols].
// FLOPs: ~4 per element. Bandwidth-bound; the second pass re-reads the row from L2, not HBM.
// The row itself is cuda/include/rms_norm_row.cuh, which the GEMM row finishers (cuda/moe_gemm.cu) run too.
#include "params.h"
#include "rms_norm_row.cuh"

// Both entries wait for the kernel before them first (programmatic launch, common.cuh): the rows are its output, and
// the norm weight (static) is too small to be worth fetching before the wait.
extern "C" __global__ void rms_norm_bf16(const RmsNormParams p) {
    wait_then_allow_dependents();
    rms_norm_row<false>(p, blockIdx.x);
}

// The MoE layer's end: combine (params.h) + residual add + RMSNorm of the next block, one block per token. Bytes:
// reads (k + 1) * 4 * cols (pairs, shared) + 2 * cols (residual), writes 4 * cols (residual_out, out).
extern "C" __global__ void moe_combine_add_rms_norm(const RmsNormParams p) {
    wait_then_allow_dependents();
    rms_norm_row<true>(p, blockIdx.x);
}
