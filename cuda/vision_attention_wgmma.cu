// The vision tower's block-diagonal bidirectional attention (head_dim 64) on Hopper's wgmma, warp-specialised and
// pipelined as FlashAttention-3 does; same parameters, grid, key ranges and semantics as `vision_attention` in
// cuda/vision.cu (masking, -inf rows, P rounded to bf16 with the normaliser summing the rounded P, one bf16 rounding of
// the output: cuda/include/vision_attention.cuh holds that code for both kernels). Only the products and the pipeline
// differ.
//
// Computes, per head and per query q with segment [start(q), end(q)):
//   out[q] = sum_k softmax_k(scale * q . k) v[k] over the keys k of q's segment.
//
// Thread mapping: 5 warps. Warps 0-3 are one consumer warpgroup owning the block's 64 queries (warp w: queries
// 16 w .. 16 w + 15, the wgmma M = 64 rows split as wgmma's fragments split them). Warp 4 is the producer: it streams
// the key tiles of the query tile's key range (first query's segment start to last query's segment end, in tiles of
// 64 keys, the last one partial) into a ring of stages, each a K tile and a V tile of [64 keys][64 dims] bf16 with
// 128-byte rows under the 128-byte swizzle: 16-byte cp.async per chunk (zeros stored for keys past the range, so
// masked keys meet finite values), then fence.proxy.async and one arrival on the stage's "full" mbarrier once the
// stage's cp.async group has landed (STAGES - 1 groups in flight, as in cuda/moe_gemm_wgmma.cu). Consumers wait on
// "full" and release "empty" (one arrival per warp) when the stage's last wgmma has retired.
//
// Per key tile j (FA3's intra-warpgroup overlap): S_j = Q K_j^T is four m64n64k16 wgmmas, Q the register A operand
// (loaded once from global memory as mma.sync A fragments), K_j the K-major descriptor operand (no transpose); they
// are issued together with the four wgmmas of O += P_{j-1} V_{j-1} (P from registers, double-buffered; V through an
// N-major descriptor, imm-trans-b = 1, so the row-major V tile is read as it lies). wait_group 1 retires S_j; the
// online softmax of tile j (masking, maxima, P_j) runs while P_{j-1} V_{j-1} is still in flight; wait_group 0 then
// retires it, the stage j - 1 is released and O is rescaled to tile j's maxima. Each k-step of 16 sums exactly and
// rounds once on the interpreter, in the mma.sync kernel's k order, so the two kernels agree bit for bit there.
//
// Tiling: 64 queries x 64 keys per step; STAGES 3 of 16 KiB (8 KiB K + 8 KiB V) = 48 KiB of dynamic shared memory
// plus the barriers, 1024-byte aligned for the swizzle; two blocks per SM (registers). Grid (query tiles of 64, heads).
// Bytes: q and out once; k and v once per query tile over its key range (2 x 2 x 64 per key). FLOPs: 4 x 64 per
// (query, key) pair of the tile's key range (2 x 64 for S, 2 x 64 for P V; masked pairs included).
#include "params.h"
#include "common.cuh"
#include "hopper.cuh"
#include "mma.cuh"
#include "vision_attention.cuh"

namespace {
using namespace block_diagonal_attention;

constexpr int kConsumerWarps = 4;
constexpr int kProducerWarp = kConsumerWarps;
constexpr int kThreads = (kConsumerWarps + 1) * 32;
constexpr int kStages = 3;
constexpr int kRowBytes = kHeadDim * 2;         // one key's 64 dims: one 128-byte swizzle line
constexpr int kTileBytes = kKeys * kRowBytes;   // a K or a V tile
constexpr int kStageBytes = 2 * kTileBytes;     // K tile, then V tile
constexpr int kInFlight = kStages - 1;          // cp.async groups the producer keeps in flight (see moe_gemm_wgmma.cu)
constexpr int kBarOffset = kStages * kStageBytes;
constexpr int kSharedBytes = kBarOffset + 2 * kStages * 8;  // src/kernels/vision.rs computes the same total
static_assert(kSharedBytes <= 227 * 1024 / 2 - 1024, "two blocks per SM (1 KiB reserved per block)");
static_assert(kTileBytes % 1024 == 0, "tiles must start on the swizzle period");
static_assert(kQueries == 16 * kConsumerWarps && kKeys == 64 && kHeadDim == 64, "one m64n64 wgmma per k-step");

// The producer warp: key tiles first_key, first_key + 64, .. below key_end into the stages.
__device__ __forceinline__ void produce(const VisionAttentionParams &p, unsigned char *stages, uint64_t *full, uint64_t *empty, int first_key, int key_end,
                                        int tiles) {
    const int lane = threadIdx.x & 31;
    const long row_stride = (long)p.heads * kHeadDim;
    const long head_offset = (long)blockIdx.y * kHeadDim;
    for (int j = 0; j < tiles; ++j) {
        const int stage = j % kStages;
        cp_async_ring_arrive_landed<kStages, kInFlight>(full, j);
        ring_wait_empty<kStages>(empty, j);
        const int tile = first_key + j * kKeys;
        const int count = min(kKeys, key_end - tile);
        const uint32_t stage_addr = smem_addr(stages + stage * kStageBytes);
        // 8 lanes per 128-byte row, 4 rows per pass; K rows then V rows.
#pragma unroll 4
        for (int i = lane; i < 2 * kKeys * 8; i += 32) {
            const int row = (i >> 3) % kKeys, chunk = i & 7, is_v = i >= kKeys * 8;
            const uint32_t dst = swizzle128(stage_addr + is_v * kTileBytes + row * kRowBytes + chunk * 16);
            if (row < count) {
                const bf16 *src = (is_v ? p.v : p.k) + (tile + row) * row_stride + head_offset + chunk * 8;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
            } else {
                asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0) : "memory");
            }
        }
        cp_async_commit();
    }
    cp_async_ring_arrive_rest<kStages, kInFlight>(full, tiles);
}

// The consumer warpgroup (see the file comment).
__device__ __forceinline__ void consume(const VisionAttentionParams &p, const unsigned char *stages, uint64_t *full, uint64_t *empty, int first_query,
                                       int first_key, int tiles) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int head = blockIdx.y;
    const long row_stride = (long)p.heads * kHeadDim;
    const int query = first_query + warp * 16 + g;  // this thread's rows: query and query + 8

    // Q as A fragments, one per 16-dim k-step: registers r = 0..3 hold (row g + 8 (r & 1), dims 2t + 8 (r >> 1) + 0, 1).
    uint32_t qa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = query + 8 * (r & 1);
            qa[kk][r] = row < p.tokens ? *reinterpret_cast<const uint32_t *>(p.q + row * row_stride + head * kHeadDim + kk * 16 + 8 * (r >> 1) + 2 * t) : 0u;
        }
    }
    const RowSegments rows = row_segments(p, query);
    const float scale = p.scale * kLog2E;

    float s[8][4], o[8][4];
#pragma unroll
    for (int nb = 0; nb < 8; ++nb) o[nb][0] = o[nb][1] = o[nb][2] = o[nb][3] = 0.f;
    SoftmaxState state = softmax_start();
    uint32_t pa0[4][4], pa1[4][4];

    auto issue_s = [&](int j) {
        const int stage = j % kStages;
        ring_wait_full<kStages>(full, j);
        const unsigned char *k_tile = stages + stage * kStageBytes;
#pragma unroll
        for (int ks = 0; ks < 4; ++ks) wgmma_m64n64k16_bf16_rs_scale_d<0>(&s[0][0], qa[ks], wgmma_desc_k_sw128(k_tile + ks * 32), ks > 0);
        wgmma_commit();
    };
    auto issue_pv = [&](int j, uint32_t (&pa)[4][4]) {
        const unsigned char *v_tile = stages + (j % kStages) * kStageBytes + kTileBytes;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) wgmma_m64n64k16_bf16_rs_scale_d<1>(&o[0][0], pa[kk], wgmma_desc_mn_sw128_n64(v_tile + kk * 16 * kRowBytes), true);
        wgmma_commit();
    };
    auto release = [&](int j) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[j % kStages]);
    };
    float correction[2];
    auto softmax = [&](int j, uint32_t (&pa)[4][4]) { softmax_tile(s, pa, correction, state, rows, first_key + j * kKeys, t, scale); };
    auto rescale = [&]() { rescale_rows(o, correction); };
    // S starts from each tile's first wgmma (scale-d 0): nothing to set before the fence.
    wgmma_fence_operands(qa);
    attention_tiles_overlapped(tiles, s, o, pa0, pa1, [] {}, issue_s, issue_pv, softmax, release, rescale);
    store_rows(p, o, state, query, head, t);
}

}  // namespace

// Two blocks per SM (two consumer warpgroups, as FA3 runs): a cap of three (136 registers) makes ptxas serialise the
// wgmmas (C7512, insufficient registers); it uses 138.
extern "C" __global__ void __launch_bounds__(kThreads, 2) vision_attention_wgmma(const VisionAttentionParams p) {
    extern __shared__ __align__(1024) unsigned char smem[];
    uint64_t *full = reinterpret_cast<uint64_t *>(smem + kBarOffset);
    uint64_t *empty = full + kStages;
    const int first_query = blockIdx.x * kQueries;
    const int queries = min(kQueries, p.tokens - first_query);
    // Segments are contiguous and in token order: the tile's keys span from its first query's segment to its last's.
    const int key_begin = p.segment_start[first_query];
    const int key_end = p.segment_end[first_query + queries - 1];
    const int tiles = (key_end - key_begin + kKeys - 1) / kKeys;
    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&full[s], 1);                // the producer's "tile landed" arrival
            mbar_init(&empty[s], kConsumerWarps);  // one release per consumer warp
        }
        mbar_init_fence();
    }
    __syncthreads();
    if (threadIdx.x / 32 == kProducerWarp) {
        produce(p, smem, full, empty, key_begin, key_end, tiles);
    } else {
        consume(p, smem, full, empty, first_query, key_begin, tiles);
    }
}
