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
// Schedule: persistent over tiles, as moe_gemm_wgmma.cu's entries (its "Schedule" comment; the pieces are
// wgmma_gemm.cuh's). A work tile is 128 features by 64 slots of one matrix; the launch's tile space holds work tiles
// only, feature tile fastest: dense, (feature tile, 64-row block); grouped, (feature tile, expert group), expert e's
// slots from expert_offsets making ceil(slots_e / 64) groups, so empty experts and the tiles of a group after its
// first take no block. The grid is the blocks resident at once (moe_wgmma_fp8.rs: 132 SMs x 2, at most the work
// tiles), block b walking tiles b, b + gridDim.x, ... The producer warp maps each index to its tile (publish_tile; a
// GroupWalker when grouped) and fills the tile's slot tables and TileWork into one of two buffers ("tile full"); the
// consumer warps release a buffer ("tile empty") after the tile's epilogue, and the producer refills it two tiles
// later, so it runs ahead into the next tile's loads while the consumers finish. The stage ring is carried across
// tiles: use u (the block's running k-block count) is stage u % 4, phase u / 4, its barriers initialised once; the
// producer drains its cp.async groups at each tile's end. The activation scales are copied per stage for every slot
// of the tile's table, a padding slot's zero-filled like its row, so they follow the table across tiles. Launches
// with a finishing step (the query RoPE, the row finisher) get one tile per block and finish it after the walk with
// every thread (wgmma_gemm.cuh finish_block_tile).
//
// Thread mapping: 9 warps, as moe_gemm_wgmma.cu. Warps 0-7 are two consumer warpgroups; warp w owns weight tile
// 8 feature_tile + w (16 features) of the current work tile, all 64 slots. Warp 8 is the producer: per work tile it
// publishes the tile's tables (above), then per stage lanes 0-7 each copy one weight tile's 2 KiB (two consecutive
// repacked 64-k tiles: contiguous) with cp.async.bulk onto the stage's "full" mbarrier; all 32 lanes gather the
// stage's activation rows (16-byte cp.async into the swizzled layout) and the slots' activation scales of the stage
// (4-byte cp.async), and for fp8-block lanes 0-3 the 8 weight tiles' scale pairs of the stage (64 contiguous bytes,
// 16-byte cp.async), and once a stage's cp.async group has landed (STAGES - 1 stages in flight) fence it for the
// async proxy and arrive on "full" (two arrivals a phase: expect_tx and this). Padding slots read zero rows and zero
// scales (the copies' zero-filling src-size 0 form). Consumers wait for the tile's table, then per stage wait on
// "full", load their 16 weight words (four 16-byte ld.shared), issue the stage's four wgmmas into a fresh partial, wait for them
// (wait_group 0: the promotion needs the partial), read their weight-scale pair (fp8-block, one 8-byte ld.shared) and
// the stage's 16 activation scales of their slots (eight 8-byte ld.shared), release the stage ("empty", one arrival per consumer warp) and promote: 32 fma per lane; after the
// tile's last stage, the epilogue and the table's release. The producer's single-lane work (expect_tx, arrivals) is
// done by the lane elect_one_sync picks, as in moe_gemm_wgmma.cu; the ring, the gather and the walk are
// cuda/include/wgmma_gemm.cuh's.
//
// Tiling: BM 128 features x BN 64 slots per work tile, BK 128 per stage (the scale block). 4 stages of 24.3 KiB
// (16 KiB weights, 8 KiB activations, 256 B activation scales, 64 B weight scales): 99.4 KiB with the barriers, the
// two tile buffers and the group walker's 1 KiB, two blocks per SM. Work tiles as the tiled mma.sync kernel's blocks (grouped: an
// expert's 64-slot group; dense: 64 rows), walked persistently (above).
//
// Bytes (per work tile): 128 weight rows x K x 1 (each weight once per 64 slots; fp8-block: 8 bytes of scales per
// tile and stage), 64 activation rows x K x 1 plus 64 x K / 128 x 4 of scales, the outputs once. FLOPs: 2 x 128 x 64
// x K per work tile on the tensor cores (padding slots included), plus 2 x 128 x 64 x K / 128 promotion FLOPs on the
// CUDA cores.
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
using BlockFormat = WeightFormat<Format::Fp8Block>;
// A stage's extras: the slots' activation scales, then (fp8-block) the 8 warps' weight-scale pairs.
constexpr int kWScaleOffset = kBN * 4;
// wgmma_gemm.cuh's ring: 4 stages of the 8 warps' weight tiles, the activations and the stage's scales, one 64-slot
// tile, two blocks per SM, two tile buffers (the persistent walk) (Ring::kSharedBytes: src/kernels/moe_wgmma_fp8.rs
// shared_bytes).
using Ring = GemmRing<4, kConsumerWarps * kWTileBytes, kWScaleOffset + kConsumerWarps * BlockFormat::kScaleBytes, 1, 2, 2>;
using Smem = PersistentSmem<Ring>;
constexpr int kStages = Ring::kStages, kWStage = Ring::kWStage, kSStage = Ring::kSStage, kInFlight = Ring::kInFlight;
static_assert(kXRowBytes == kBK8, "a stage's activation line is 128 e4m3 of k");
static_assert(kWTileBytes == 2 * WeightFormat<Format::Fp8>::kTileBytes, "a stage is two repacked 64-k fp8 tiles");

// The producer warp's walk (see the file comment): per work tile, its tables published (wgmma_gemm.cuh
// publish_tile), then per stage the weights by cp.async.bulk, the activation rows and the slots' activation scales by
// cp.async (a padding slot's row and scale zero-filled, so both follow the tile's table), drained at the tile's end.
template <bool kBlockScales>
__device__ __forceinline__ void produce_tiles(const MoeGemmParams &p, const Smem &sm, int feature_tiles, int k_blocks) {
    const int lane = threadIdx.x & 31;
    const int w_blocks64 = p.k_dim / kBK;  // the repacked layout's 64-k blocks per tile
    const bool grouped = p.sorted_pairs != nullptr;
    GroupWalker<kBN> walker(sm.prefix);
#pragma unroll 1
    for (int j = 0;; ++j) {
        const TileWork work = publish_tile<true>(p, sm, walker, j, feature_tiles, grouped);
        if (work.expert < 0) break;
        const int kb_done = j * k_blocks;  // the ring's uses by the block's earlier tiles
        const int *slot_src = sm.slot_src + (j & 1) * kBN;
        const unsigned char *w_tiles = p.weights.data + (long long)work.expert * p.expert_stride +
                                       (long long)(work.feature_tile * (kBM / 16) + lane) * w_blocks64 * WeightFormat<Format::Fp8>::kTileBytes;
        for (int kb = 0; kb < k_blocks; ++kb) {
            const int use = kb_done + kb, stage = use % kStages;
            cp_async_ring_arrive_landed<kStages, kInFlight>(sm.full, use, kb_done);
            ring_wait_empty<kStages>(sm.empty, use);
            if (elect_one_sync()) mbar_arrive_expect_tx(&sm.full[stage], kWStage);
            __syncwarp();
            if (lane < kConsumerWarps) bulk_load(sm.w + stage * kWStage + lane * kWTileBytes, w_tiles + 2 * kb * WeightFormat<Format::Fp8>::kTileBytes, kWTileBytes, &sm.full[stage]);
            gather_stage_rows(slot_src, smem_addr(sm.x + stage * kXStage), p.x_e4m3 + kb * kBK8, p.x_stride);
            unsigned char *s_stage = sm.s + stage * kSStage;
#pragma unroll
            for (int row = lane; row < kBN; row += 32) {
                const int src_row = slot_src[row];
                cp_async4_zfill(smem_addr(s_stage + row * 4), p.x_block_scales + (long)max(src_row, 0) * k_blocks + kb, src_row >= 0);
            }
            // fp8-block: the 8 weight tiles' scale pairs of the stage's 128 k (64 contiguous bytes, lanes 0-3), so the
            // consumers' k loop reads them from the ring as the 4-bit kernels do (no global load on its chain, and
            // no tile state kept through it: the kernel is at its 96-register cap).
            if constexpr (kBlockScales) {
                BlockFormat::stage_scales<kConsumerWarps, 32>(p, p.weights, work.expert, work.feature_tile * (kBM / 16), 2 * kb, s_stage + kWScaleOffset, lane);
            }
            cp_async_commit();
        }
        // The tile's copies all land before the next tile's table is written: the consumers' release of a table two
        // tiles back may wait on these stages (a tile of fewer k blocks than kInFlight).
        cp_async_ring_arrive_rest<kStages, kInFlight>(sm.full, kb_done + k_blocks, kb_done);
    }
}

// A consumer warp's walk (see the file comment): per work tile, the k loop and the tile's epilogue.
template <bool kBlockScales>
__device__ __forceinline__ void consume_tiles(const MoeGemmParams &p, const Smem &sm, int k_blocks) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = lane & 3;
    // One matrix a launch (moe_wgmma_fp8.rs refuses a grid z other than 1): said to the compiler, the epilogue's
    // batched-output offsets fold away instead of being hoisted out of the tile loop into registers the k loop needs.
    __builtin_assume(blockIdx.z == 0);
#pragma unroll 1
    for (int j = 0;; ++j) {
        // The tile's work is read back from its buffer where needed (after each wait, so the compiler keeps none of
        // it in registers through the k loop: the accumulators, the partial and the A fragments fill the kernel's
        // 96-register cap).
        if (wait_tile(sm, j).expert < 0) return;
        // acc: the promoted f32 sums; partial: one stage's wgmma sums. Both in the wgmma D layout (acc[4 f + r]:
        // feature g (r < 2) or g + 8, slot 8 f + 2 t + r % 2). Each stage's first wgmma overwrites partial (scale-d
        // 0); it is zeroed per tile for the operand fences, so that it is dead through the epilogue.
        float acc[32], partial[32];
#pragma unroll
        for (int i = 0; i < 32; ++i) acc[i] = 0.f, partial[i] = 0.f;

#pragma unroll 1
        for (int kb = 0; kb < k_blocks; ++kb) {
            // The ring's use of k block kb: the block's earlier tiles took j * k_blocks.
            const int use = j * k_blocks + kb, stage = use % kStages;
            ring_wait_full<kStages>(sm.full, use);
            const unsigned char *w_tile = sm.w + stage * kWStage + warp * kWTileBytes;
            uint32_t a[4][4];
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) {
                // 32-k step ks: chunk ks % 2 of repacked 64-k tile ks / 2, i.e. the lane's 16 bytes at (ks * 32 + lane) * 16.
                const uint4 v = *reinterpret_cast<const uint4 *>(w_tile + (ks * 32 + lane) * 16);
                const uint32_t words[4] = {v.x, v.y, v.z, v.w};
                fp8_weights_to_e4m3_a(words, a[ks]);
            }
            const unsigned char *x_stage = sm.x + stage * kXStage;
#pragma unroll
            for (int i = 0; i < 32; ++i) wgmma_fence_operand(partial[i]);
            wgmma_fence();
            wgmma_m64n64k32_e4m3_rs<0>(partial, a[0], wgmma_desc_k_sw128(x_stage));
#pragma unroll
            for (int ks = 1; ks < 4; ++ks) wgmma_m64n64k32_e4m3_rs<1>(partial, a[ks], wgmma_desc_k_sw128(x_stage + 32 * ks));
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (int i = 0; i < 32; ++i) wgmma_fence_operand(partial[i]);
            float w_scale_g = 1.f, w_scale_g8 = 1.f;
            if constexpr (kBlockScales) {
                const BlockFormat::Scales w_scales = BlockFormat::staged_scales(p.weights, sm.s + stage * kSStage + kWScaleOffset + warp * BlockFormat::kScaleBytes, 0);
                w_scale_g = w_scales.row_g, w_scale_g8 = w_scales.row_g8;
            }
            // The stage's activation scales of this lane's 16 slots (8 f + 2 t, + 1), then the stage is free.
            const float *a_scales = reinterpret_cast<const float *>(sm.s + stage * kSStage);
            float2 slot_scales[8];
#pragma unroll
            for (int f = 0; f < 8; ++f) slot_scales[f] = *reinterpret_cast<const float2 *>(a_scales + 8 * f + 2 * t);
            __syncwarp();
            if (lane == 0) mbar_arrive(&sm.empty[stage]);
            // Promotion: acc += P * (a_scale * w_scale), one rounding for the product of the scales and one for the
            // fma, as src/reference/fp8_gemm.rs does.
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
        // Epilogue (gemm_epilogue.cuh), then the warps are done with the tile's table. The consumer warps meet at a
        // named barrier first: the epilogue's per-slot tests split each warp's lanes, and the barrier is where they
        // reconverge before the next tile's wgmmas, wherever the compiler places the loop's end.
        // The tile's buffer, its address computed afresh (an empty asm hides that it equals the one wait_tile read
        // before the k loop: kept from there, it spilled).
        int buf = j & 1;
        asm volatile("" : "+r"(buf));
        const TileWork work = sm.tiles[buf];
        store_wgmma_warp_tile(p, acc, sm.slot_pair + buf * kBN, work.expert, work.feature_tile * (kBM / 16) + warp, work.slot_begin, work.slots);
        named_barrier_sync<1, kConsumerWarps * 32>();
        mbar_arrive_if(&sm.tile_empty[j & 1], lane == 0);
    }
}

template <bool kBlockScales>
__device__ __forceinline__ void grouped_gemm_wgmma_a8(const MoeGemmParams &p) {
    extern __shared__ __align__(1024) unsigned char smem[];
    const Smem sm(smem);
    // "full": the producer's expect_tx arrival and its "activations landed" one; the tables' readers: the consumer
    // warps (the producer writes them, in program order after its own reads).
    if (threadIdx.x == 0) init_persistent_block(sm, 2, kConsumerWarps);
    __syncthreads();

    const int feature_tiles = p.rows_padded / kBM;
    const int k_blocks = p.k_dim / kBK8;
    if ((threadIdx.x >> 5) == kProducerWarp) {
        produce_tiles<kBlockScales>(p, sm, feature_tiles, k_blocks);
    } else {
        consume_tiles<kBlockScales>(p, sm, k_blocks);
    }
    // Launches with a finishing step (dense query RoPE, row finisher) run one tile per block: every thread, producer
    // included, finishes it. The row loads one pair at a time: this kernel is at its 96-register cap (rms_norm_row.cuh
    // RowLoads).
    finish_block_tile<false>(p, sm);
}

}  // namespace

// Two blocks per SM (99.4 KiB of shared memory each): ptxas gets at most 96 registers a thread.
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
