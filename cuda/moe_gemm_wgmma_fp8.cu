// Grouped expert GEMM (and the dense GEMM) on Hopper's fp8 tensor cores (wgmma m64n64k32 e4m3, QGMMA), for the
// per-tensor and the 128x128-block fp8 weight formats, with the activations quantised to e4m3 beforehand by
// moe_quantize_act_e4m3_block128 (below) with one scale per row and 128 k, as DeepGEMM's sm90 fp8 GEMM does. The
// prefill tile of cuda/moe_gemm_wgmma.cu (128 output features x 64 slots, warp-specialised, weights as wgmma's
// register operand) with the same parameters, semantics and epilogues (SwiGLU act for the up-projection, f32 rows by
// pair times the routing weight for the down-projection, plain bf16 / f32 rows in dense mode, per-row output scales;
// then the query RoPE and the row finisher of cuda/include/gemm_epilogue.cuh). Two entries: moe_gemm_fp8_wgmma_a8
// and moe_gemm_fp8_block_wgmma_a8 (grouped and dense mode; the activation rows are gathered, as the grouped bf16
// entries of moe_gemm_wgmma.cu gather theirs); batched dense launches (grid z > 1) are not served.
//
// Computes, for each row (a (token, expert) pair in grouped mode, a token in dense mode), each output feature n of the
// row's expert e, with b over the 128-k blocks:
//   P_b = sum_{k in block b} xq[src(row), k] * wq_e[n, k]          (e4m3 x e4m3 on the tensor cores, per block)
//   acc = fma(P_b, a_scale[src(row), b] * w_scale_e[n, b], acc)    (f32, b = 0, 1, ..; "promotion")
//   y[row, n] = acc * row_scale_e[n]
// w_scale: the 128x128 block scale of row n's block (fp8-block, 1 for per-tensor); row_scale: the per-tensor scale
// (1 for fp8-block). The tensor core's sum of fp8 products keeps fewer bits than f32 (../shared/HOPPER-ASYNC.md §1.6,
// DeepSeek-V3 §3.3.2), so each 128-k partial is started afresh (scale-d 0) and promoted into the f32 accumulator:
// src/reference/fp8_gemm.rs models exactly this.
//
// Operands: wgmma's A (M = 64 rows per warpgroup) is the WEIGHTS from registers, in the repacked fp8 fragment order of
// src/quant/repack.rs (no new layout): per 32 k, fp8_weights_to_e4m3_a (weight_format.cuh) regroups a lane's four
// words with byte permutes into the m16n8k32 A fragment, which is wgmma's 8-bit register-A fragment of the warp's 16
// rows (HOPPER-ASYNC.md §1.5: reg i / 4, byte i % 4 holds row g + 8 ((i / 4) % 2), col 4 q + i % 4 + 16 (i / 8)).
// After that regrouping, fragment column 4 q + j carries weight column pi(4 q + j) = 2 q + j % 2 + 8 (j / 2) (+16),
// a permutation of each 16 k; a dot product does not depend on the order of its k, so the quantiser writes the
// activation bytes in that same order (byte c of every 32 holds column pi(c): moe_quantize_act_e4m3's layout) and B is
// read as it lies. tests/moe_wgmma_fp8.rs brute-forces both sides of this against the formulas.
// B is the 64 activation rows of the block's slots (N = 64), K-major in shared memory, one 128-byte swizzled line of
// 128 e4m3 per slot and stage, read through a matrix descriptor (+32 bytes per k32 step).
//
// Thread mapping: 9 warps, as moe_gemm_wgmma.cu. Warps 0-7 are two consumer warpgroups; warp w owns weight tile
// first_tile + w (16 features), all 64 slots. Warp 8 is the producer: lanes 0-7 each copy one tile's 2 KiB of a stage
// (two consecutive repacked 64-k tiles: contiguous) with cp.async.bulk onto the stage's "full" mbarrier; all 32 lanes
// gather the stage's activation rows (16-byte cp.async into the swizzled layout) and the slots' activation scales of
// the stage (4-byte cp.async), and once a stage's cp.async group has landed (STAGES - 1 stages in flight) fence it
// for the async proxy and arrive on "full" (two arrivals a phase: expect_tx and this). Padding slots read zero rows
// (the gather's zero-filling copies) and zero scales (written once into every stage). Consumers wait on "full", read their block scales (fp8-block; two
// f32 per lane and stage from global memory, L1/L2-resident), load their 16 weight words (four 16-byte ld.shared),
// issue the stage's four wgmmas into a fresh partial, wait for them (wait_group 0: the promotion needs the partial),
// read the stage's 16 activation scales of their slots (eight 8-byte ld.shared), release the stage ("empty", one
// arrival per consumer warp) and promote: 32 fma per lane. The producer's single-lane work (expect_tx, arrivals) is done
// by the lane elect_one_sync picks, as in moe_gemm_wgmma.cu; the ring and the gather are cuda/include/wgmma_gemm.cuh's.
//
// Tiling: BM 128 features x BN 64 slots per block, BK 128 per stage (the scale block). 4 stages of 24.25 KiB (16 KiB
// weights, 8 KiB activations, 256 B activation scales): 97.3 KiB with the barriers and slots, two blocks per SM.
// Grid and grouping as the tiled mma.sync kernel.
//
// Bytes (per block): 128 weight rows x K x 1 (each weight once per 64 slots; fp8-block: 8 bytes of scales per tile
// and stage), 64 activation rows x K x 1 plus 64 x K / 128 x 4 of scales, the outputs once. FLOPs: 2 x 128 x 64 x K
// per block on the tensor cores (padding slots included), plus 2 x 128 x 64 x K / 128 promotion FLOPs on the CUDA
// cores.
#include "params.h"
#include "common.cuh"
#include "gemm_epilogue.cuh"
#include "hopper.cuh"
#include "mma.cuh"
#include "quant.cuh"
#include "weight_format.cuh"
#include "wgmma_gemm.cuh"

namespace {

constexpr int kBK8 = 128;               // k per stage: one 128-byte swizzle line of e4m3 per slot, one scale block
constexpr int kWTileBytes = 16 * kBK8;  // a warp's 16 rows x 128 k: two consecutive repacked 64-k tiles
// wgmma_gemm.cuh's ring: 4 stages of the 8 warps' weight tiles, the activations and the slots' activation scales
// (Ring::kSharedBytes: src/kernels/moe_wgmma_fp8.rs SHARED_BYTES).
using Ring = GemmRing<4, kConsumerWarps * kWTileBytes, kBN * 4>;
constexpr int kStages = Ring::kStages, kWStage = Ring::kWStage, kSStage = Ring::kSStage, kInFlight = Ring::kInFlight;
constexpr int kXOffset = Ring::kXOffset, kSOffset = Ring::kSOffset, kBarOffset = Ring::kBarOffset, kSlotOffset = Ring::kSlotOffset,
              kSrcOffset = Ring::kSrcOffset;
static_assert(kXRowBytes == kBK8, "a stage's activation line is 128 e4m3 of k");
static_assert(kWTileBytes == 2 * WeightFormat<Format::Fp8>::kTileBytes, "a stage is two repacked 64-k fp8 tiles");

// The producer warp: weights by cp.async.bulk, activation rows and their scales by cp.async (see the file comment).
__device__ __forceinline__ void produce(const MoeGemmParams &p, unsigned char *smem, const int *slot_src, int expert, int first_tile, int k_blocks) {
    unsigned char *w_smem = smem, *x_smem = smem + kXOffset, *s_smem = smem + kSOffset;
    uint64_t *full = reinterpret_cast<uint64_t *>(smem + kBarOffset), *empty = full + kStages;
    const int lane = threadIdx.x & 31;
    const unsigned char *w_expert = p.weights + (long long)expert * p.expert_stride;
    const int w_blocks64 = p.k_dim / kBK;  // the repacked layout's 64-k blocks per tile
    for (int kb = 0; kb < k_blocks; ++kb) {
        const int stage = kb % kStages;
        cp_async_ring_arrive_landed<kStages, kInFlight>(full, kb);
        ring_wait_empty<kStages>(empty, kb);
        if (elect_one_sync()) mbar_arrive_expect_tx(&full[stage], kWStage);
        __syncwarp();
        if (lane < kConsumerWarps) {
            const unsigned char *src = w_expert + ((long long)(first_tile + lane) * w_blocks64 + 2 * kb) * WeightFormat<Format::Fp8>::kTileBytes;
            bulk_load(w_smem + stage * kWStage + lane * kWTileBytes, src, kWTileBytes, &full[stage]);
        }
        gather_stage_rows(slot_src, smem_addr(x_smem + stage * kXStage), p.x_e4m3 + kb * kBK8, p.x_stride);
        const uint32_t s_stage_addr = smem_addr(s_smem + stage * kSStage);
#pragma unroll
        for (int row = lane; row < kBN; row += 32) {
            const int src_row = slot_src[row];
            if (src_row < 0) continue;
            const float *src = p.x_block_scales + (long)src_row * k_blocks + kb;
            asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s_stage_addr + row * 4), "l"(src) : "memory");
        }
        cp_async_commit();
    }
    cp_async_ring_arrive_rest<kStages, kInFlight>(full, k_blocks);
}

// A consumer warp's k loop (see the file comment) and its tile's epilogue.
template <bool kBlockScales>
__device__ __forceinline__ void consume_and_store(const MoeGemmParams &p, unsigned char *smem, const int *slot_pair, int expert, int slot_begin,
                                                  int slots, int first_tile, int k_blocks) {
    const unsigned char *w_smem = smem, *x_smem = smem + kXOffset;
    const float *s_smem = reinterpret_cast<const float *>(smem + kSOffset);
    uint64_t *full = reinterpret_cast<uint64_t *>(smem + kBarOffset), *empty = full + kStages;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
    const int tile = first_tile + warp;
    // acc: the promoted f32 sums; partial: one stage's wgmma sums. Both in the wgmma D layout (acc[4 f + r]: feature
    // g (r < 2) or g + 8, slot 8 f + 2 t + r % 2).
    float acc[32], partial[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.f, partial[i] = 0.f;

#pragma unroll 1
    for (int kb = 0; kb < k_blocks; ++kb) {
        const int stage = kb % kStages;
        float w_scale_g = 1.f, w_scale_g8 = 1.f;
        if constexpr (kBlockScales) {
            // The 64-k block index of the repacked layout: this stage's 128 k are 64-k blocks 2 kb and 2 kb + 1.
            const WeightFormat<Format::Fp8Block>::Scales s = WeightFormat<Format::Fp8Block>::load_scales(p, false, expert, tile, 2 * kb, 0);
            w_scale_g = s.row_g, w_scale_g8 = s.row_g8;
        }
        ring_wait_full<kStages>(full, kb);
        const unsigned char *w_tile = w_smem + stage * kWStage + warp * kWTileBytes;
        uint32_t a[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            // 32-k step j: chunk j % 2 of repacked 64-k tile j / 2, i.e. the lane's 16 bytes at (j * 32 + lane) * 16.
            const uint4 v = *reinterpret_cast<const uint4 *>(w_tile + (j * 32 + lane) * 16);
            const uint32_t words[4] = {v.x, v.y, v.z, v.w};
            fp8_weights_to_e4m3_a(words, a[j]);
        }
        const unsigned char *x_stage = x_smem + stage * kXStage;
#pragma unroll
        for (int i = 0; i < 32; ++i) wgmma_fence_operand(partial[i]);
        wgmma_fence();
        wgmma_m64n64k32_e4m3_rs<0>(partial, a[0], wgmma_desc_k_sw128(x_stage));
#pragma unroll
        for (int j = 1; j < 4; ++j) wgmma_m64n64k32_e4m3_rs<1>(partial, a[j], wgmma_desc_k_sw128(x_stage + 32 * j));
        wgmma_commit();
        wgmma_wait<0>();
#pragma unroll
        for (int i = 0; i < 32; ++i) wgmma_fence_operand(partial[i]);
        // The stage's activation scales of this lane's 16 slots (8 f + 2 t, + 1), then the stage is free.
        const float *a_scales = s_smem + stage * kBN;
        float2 slot_scales[8];
#pragma unroll
        for (int f = 0; f < 8; ++f) slot_scales[f] = *reinterpret_cast<const float2 *>(a_scales + 8 * f + 2 * t);
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[stage]);
        // Promotion: acc += P * (a_scale * w_scale), one rounding for the product of the scales and one for the fma,
        // as src/reference/fp8_gemm.rs does.
#pragma unroll
        for (int f = 0; f < 8; ++f) {
            const float sa[2] = {slot_scales[f].x, slot_scales[f].y};
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const float w_scale = r < 2 ? w_scale_g : w_scale_g8;
                const float scale = kBlockScales ? __fmul_rn(sa[r & 1], w_scale) : sa[r & 1];
                acc[4 * f + r] = __fmaf_rn(partial[4 * f + r], scale, acc[4 * f + r]);
            }
        }
    }
    store_wgmma_warp_tile(p, acc, slot_pair, expert, tile, slot_begin, slots);
}

template <bool kBlockScales>
__device__ __forceinline__ void grouped_gemm_wgmma_a8(const MoeGemmParams &p) {
    extern __shared__ __align__(1024) unsigned char smem[];
    float *s_smem = reinterpret_cast<float *>(smem + kSOffset);
    uint64_t *full = reinterpret_cast<uint64_t *>(smem + kBarOffset), *empty = full + kStages;
    int *slot_pair = reinterpret_cast<int *>(smem + kSlotOffset);
    int *slot_src = reinterpret_cast<int *>(smem + kSrcOffset);
    const int tid = threadIdx.x, warp = tid >> 5;

    int expert, slot_begin, slot_end;
    if (!block_slots<kBN>(p, false, expert, slot_begin, slot_end)) return;
    const int slots = slot_end - slot_begin;
    // "full": the producer's expect_tx arrival and its "activations landed" one.
    init_slots_and_ring<kStages, true>(p, slot_pair, slot_src, full, empty, slot_begin, slots, 2);
    // Padding slots read zero scales: written once into every stage (generic stores, read by the consumers' generic
    // loads after the barrier), never copied over. Their rows are the gather's zero-filling copies.
    for (int i = tid; i < kStages * kBN; i += kThreads) {
        if (slot_pair[i % kBN] < 0) s_smem[i] = 0.f;
    }
    __syncthreads();

    const int first_tile = blockIdx.x * (kBM / 16);
    const int k_blocks = p.k_dim / kBK8;
    if (warp == kProducerWarp) {
        produce(p, smem, slot_src, expert, first_tile, k_blocks);
    } else {
        consume_and_store<kBlockScales>(p, smem, slot_pair, expert, slot_begin, slots, first_tile, k_blocks);
    }
    // Every thread, producer included: the query RoPE and the row finisher on what the consumers stored.
    if (p.rope.positions != nullptr) rope_output_tile(p, slot_begin, slots, first_tile * 16, kBM);
    // The row loads one pair at a time: this kernel is at its 96-register cap (rms_norm_row.cuh RowLoads).
    if (p.finish.kind != SMALL4_GEMM_FINISH_NONE) finish_rows<false>(p, slot_pair, slots, slot_begin, false);
}

}  // namespace

// Two blocks per SM (97 KiB of shared memory each): ptxas gets at most 96 registers a thread.
extern "C" __global__ void __launch_bounds__(kThreads, 2) moe_gemm_fp8_wgmma_a8(const MoeGemmParams p) { grouped_gemm_wgmma_a8<false>(p); }
extern "C" __global__ void __launch_bounds__(kThreads, 2) moe_gemm_fp8_block_wgmma_a8(const MoeGemmParams p) { grouped_gemm_wgmma_a8<true>(p); }

// Activations bf16 -> e4m3 with one f32 scale per row and 128 columns (params.h MoeQuantizeActBlockParams has the
// rule). Thread mapping: one warp per (row, 128-column block), grid-stride over rows x blocks; lane l writes output
// word l of the block (bytes 4 l .. 4 l + 3: q = l % 8 of the 32-column group l / 8, columns 16 (q / 4) + 2 (q % 4) +
// {0, 1, 8, 9}, two bf16x2 loads, as moe_quantize_act_e4m3), the block's amax by a warp max, lane 0 the scale.
// Bytes: reads 2, writes 1 per element, plus 4 per 128. FLOPs: about 3 per element (abs, max, multiply).
extern "C" __global__ void __launch_bounds__(256) moe_quantize_act_e4m3_block128(const MoeQuantizeActBlockParams p) {
    constexpr float kMinAmax = 0x1p-64f;
    const int lane = threadIdx.x & 31;
    const int blocks_per_row = p.cols / 128;
    const long total = (long)p.rows * blocks_per_row;
    const long warps = (long)gridDim.x * (blockDim.x / 32);
    for (long i = blockIdx.x * (long)(blockDim.x / 32) + threadIdx.x / 32; i < total; i += warps) {
        const long row = i / blocks_per_row;
        const int block = (int)(i % blocks_per_row);
        if (p.sorted_pairs != nullptr && (row >= *p.num_padded || p.sorted_pairs[row] < 0)) continue;  // warp-uniform
        const int q = lane & 7;
        const int col = block * 128 + (lane >> 3) * 32 + 16 * (q >> 2) + 2 * (q & 3);
        const bf16 *x = p.x + row * p.x_stride + col;
        const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(x));
        const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(x + 8));
        const float amax = fmaxf(warp_max(fmaxf(fmaxf(fabsf(lo.x), fabsf(lo.y)), fmaxf(fabsf(hi.x), fabsf(hi.y)))), kMinAmax);
        const float inv = __fdiv_rn(448.f, amax);
        const uint32_t packed = f32x2_to_e4m3x2(__fmul_rn(lo.x, inv), __fmul_rn(lo.y, inv)) | (f32x2_to_e4m3x2(__fmul_rn(hi.x, inv), __fmul_rn(hi.y, inv)) << 16);
        reinterpret_cast<uint32_t *>(p.out + row * p.cols)[block * 32 + lane] = packed;
        if (lane == 0) p.scales[row * blocks_per_row + block] = __fdiv_rn(amax, 448.f);
    }
}
