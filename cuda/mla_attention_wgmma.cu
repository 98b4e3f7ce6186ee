// Paged MLA attention (absorbed form) on Hopper's wgmma, warp-specialised and pipelined FlashAttention-3-style, for
// chunked prefill: the same parameters, rows, key ranges, KV splits and semantics as mla_attention_*
// (cuda/mla_attention.cu); the causal mask, the online softmax, the packing of P, the store (bf16, or a split's f32
// partials and (max, sum)) and the fused split combine are cuda/include/mla_attention.cuh, shared with that kernel.
// Only the products and the pipeline differ.
//
// Computes, per (query token, head) row r of position pos(r), over the cache tokens j <= pos(r) of its sequence:
//   o_lat[r] = value_scale * sum_j softmax_j(score_scale * q[r] . c_j) c_j[0:256],  q = [q_lat | q_rope] (320 values).
// Split-KV (p.num_splits > 1, grid y = split, as the mma.sync kernel): block (tile, split) takes the keys [split *
// tokens_per_split, + tokens_per_split) and writes each row's f32 partial o and (max, sum) for the split; the last
// split block of the tile to arrive combines them (p.split_counters set: combine_if_last_split, run by the consumer
// warps behind a named barrier of their own, the producer warps having exited), else mla_attention_combine does as a
// second launch. Same split ranges and 32-token tiles from the split's start: the same partials bit for bit.
//
// Thread mapping: 12 warps. Warps 0-7 are two consumer warpgroups, each owning 64 of the block's 128 rows, row =
// (query token, head) flattened token-major as in the mma.sync kernel (warpgroup g: rows 64 g .. 64 g + 63; its warp
// w: rows 64 g + 16 w .. + 15, as wgmma's M = 64 splits them). Why two: every (token, head) row of a prefill chunk
// reads the same cache rows, so a block's key tiles serve all its rows; two warpgroups per block walk them side by side
// (each its own dependence chain), so a block does twice the rows of one in the same time and the cache is streamed
// by half as many blocks. (Two blocks of one warpgroup would do the same, but O's 128 registers per thread allow one
// block of 5 warps per SM, see Tiling.) Both warpgroups walk the block's key tiles [split_begin, kv_end); keys past a
// row's position are masked, so the first warpgroup's extra keys (at most one tile) add exact zeros.
// Warps 8-11 are the producer warpgroup (a whole warpgroup so that setmaxnreg can take its registers, see Tiling);
// warp 8 alone works, the other three exit. It streams the cache tokens [split_begin, kv_end) of the block (kv_end:
// one past the last position its rows see, or the split's end) in tiles of 32 tokens into a ring of stages: lane i
// looks up token i's page slot in the block table (one tile ahead, so no copy waits for a table load), and the lanes
// copy the tile's 16-byte chunks (bf16: cp.async; fp8: 8 bytes loaded, widened to bf16 and stored), zeros
// for tokens past kv_end (never read from the cache). Then fence.proxy.async and one arrival on the stage's "full"
// mbarrier (bf16: once the stage's cp.async group has landed, STAGES - 1 groups in flight, as in
// cuda/vision_attention_wgmma.cu). Consumers wait on "full" and release "empty" (one arrival per warp of both
// warpgroups, 8) after the stage's last wgmma has retired.
//
// Shared layout: every operand as [320 / 64 column atoms][rows][128 bytes] under the 128-byte swizzle, atoms 1024-byte
// aligned: Q [5][128 rows] (80 KiB, loaded once by all 384 threads; warpgroup g's A operand starts 64 g lines, 8 KiB,
// into each atom), each stage [5][32 tokens] (20 KiB). Per key tile and warpgroup: S = Q K^T is twenty m64n32k16 SS
// wgmmas (A = Q and B = the tile, both K-major descriptors, k-step ks at atom ks / 4, byte 32 (ks % 4) of the line),
// in the mma.sync kernel's k order; O += P V is two m64n256k16 RS wgmmas, P from the softmax's registers, V = the
// tile's first 256 columns through an N-major descriptor (imm-trans-b = 1; the 4 atoms
// along N 4 KiB apart as LBO, 8-token groups 1 KiB apart as SBO), so the cache rows are read as they lie. Each k16 step
// sums exactly and rounds once on the interpreter, as mma.sync m16n8k16 does, so both kernels agree bit for bit there.
// O [64 x 256] f32 lives in each consumer warpgroup's registers (128 per thread). S runs one tile ahead
// (attention_tiles_s_ahead, cuda/include/hopper.cuh): S's twenty dependent k-steps are the longest chain of a tile,
// so the wgmmas of S_{j+1} (S double-buffered in registers) are in flight while the softmax of S_j, the rescale of O
// and O += P_j V_j run; wait_group 0 retires both and stage j is released. O's arithmetic stays the serial order's.
//
// Tiling: 128 rows (2 x 64) x 32 tokens per step; 3 stages: 80 + 60 KiB + barriers of dynamic shared memory. One
// block per SM. Registers: the consumers need about 200 (O alone 128; S twice 16, P 8), more than the 168 a block of
// 12 warps (3 on each SM sub-partition of 16 Ki registers) starts with, so the roles set their own with setmaxnreg
// as FA3 does: the producer warpgroup drops to 40, the consumers rise to 232 ((4 x 40 + 8 x 232) x 32 = 63 Ki of the
// SM's 64 Ki). ptxas allocates each role's code within its setmaxnreg count (no spills: build.rs makes spills
// errors; at 168 for all, two consumer warpgroups and one producer warp spill 1 KiB a thread).
// Grid (row tiles of 128, splits, sequences). Bytes: cache 320 x (2 | 1) per token of [split_begin, kv_end) per block,
// q 640 B per row and block with keys, o 512 B per row (+ 2 x 1 KiB f32 partials per row and split when split: written
// by the split blocks, read by the combine). FLOPs: 2 x 128 x tokens x (320 + 256) per block (masked pairs included).
#include "params.h"
#include "common.cuh"
#include "hopper.cuh"
#include "mma.cuh"
#include "mla_cache.cuh"
#include "mla_attention.cuh"
#include "quant.cuh"

namespace {
using namespace mla_tile;

constexpr int kConsumerWarpgroups = 2;
constexpr int kGroupRows = 64;                      // rows per consumer warpgroup: one wgmma M
constexpr int kConsumerWarps = 4 * kConsumerWarpgroups;
constexpr int kProducerWarp = kConsumerWarps;          // the first warp of the producer warpgroup
constexpr int kThreads = (kConsumerWarps + 4) * 32;    // two consumer warpgroups and the producer warpgroup
constexpr int kProducerRegisters = 40;                 // setmaxnreg: the producer warpgroup gives registers away
constexpr int kConsumerRegisters = 232;                // and the consumers take them: (4 x 40 + 8 x 232) x 32 <= 64 Ki
constexpr int kRows = kGroupRows * kConsumerWarpgroups;  // rows per block
constexpr int kStages = 3;
constexpr int kInFlight = kStages - 1;              // cp.async groups the producer keeps in flight
constexpr int kAtomCols = 64;                       // bf16 columns of one 128-byte swizzle line
constexpr int kAtoms = kWidth / kAtomCols;          // 5
constexpr int kChunksPerRow = kWidth / 8;           // 16-byte bf16 chunks of a row (40)
constexpr int kQAtomBytes = kRows * 128;
constexpr int kQBytes = kAtoms * kQAtomBytes;
constexpr int kStageAtomBytes = kTileN * 128;
constexpr int kStageBytes = kAtoms * kStageAtomBytes;
constexpr int kBarOffset = kQBytes + kStages * kStageBytes;
constexpr int kSharedBytes = kBarOffset + 2 * kStages * 8 + 8;  // the barriers, last_arrival; src/kernels/attention.rs computes the same total
static_assert(kWidth % kAtomCols == 0 && kLatent % kAtomCols == 0, "whole swizzle atoms");
static_assert(kQAtomBytes % 1024 == 0 && kStageAtomBytes % 1024 == 0 && kGroupRows * 128 % 1024 == 0, "atoms start on the swizzle period");
static_assert(kTileN == 32 && kLatent == 256, "one m64n32 S and one m64n256 P V per k-step");
static_assert(kSharedBytes <= 227 * 1024 - 1024, "fits an SM (1 KiB reserved per block)");

// Byte offset of (row, 16-byte chunk) in a [kAtoms][rows][128 B] buffer (before the swizzle).
__device__ __forceinline__ uint32_t atom_offset(int rows, int row, int chunk) { return (chunk / 8) * rows * 128 + row * 128 + (chunk % 8) * 16; }

// The producer warp: cache tokens [split_begin, kv_end) of sequence seq, tile j (tokens split_begin + 32 j ..) into
// stage j % kStages.
template <bool kFp8>
__device__ __forceinline__ void produce(const MlaAttentionParams &p, unsigned char *stages, uint64_t *full, uint64_t *empty, int seq, int split_begin,
                                        int kv_end, int tiles) {
    const int lane = threadIdx.x & 31;
    const char *cache = reinterpret_cast<const char *>(p.cache);
    // Block-table entry (physical page) of token tile_start + lane, or 0 past kv_end (never read). Each tile's entries
    // are loaded one tile ahead, so the copies of a tile never wait for a table load.
    auto page_of = [&](int tile_start) {
        const int pos = tile_start + lane;
        return pos < kv_end ? p.block_tables[(long)seq * p.max_pages + pos / p.page_size] : 0;
    };
    int next_page = page_of(split_begin);
    for (int j = 0; j < tiles; ++j) {
        const int stage = j % kStages;
        const int tile_start = split_begin + j * kTileN, pos = tile_start + lane;
        if constexpr (!kFp8) cp_async_ring_arrive_landed<kStages, kInFlight>(full, j);
        ring_wait_empty<kStages>(empty, j);
        const int page = next_page;
        next_page = page_of(tile_start + kTileN);
        const int my_slot = pos < kv_end ? page * p.page_size + pos % p.page_size : 0;  // physical slot of token pos
        const uint32_t stage_addr = smem_addr(stages + stage * kStageBytes);
        // Lane l copies chunks l, l + 32, ... of the tile: a fixed trip count, unrolled, and no branch per chunk (bf16:
        // src-size 0 zero-fills a token past kv_end without reading it; slot 0 is a valid address), so a tile's copies
        // are a few long basic blocks whose shuffles and copies overlap rather than one short block per chunk.
        static_assert(kTileN * kChunksPerRow % 32 == 0, "whole warp-wide steps");
#pragma unroll 8
        for (int step = 0; step < kTileN * kChunksPerRow / 32; ++step) {
            const int i = lane + 32 * step, tok = i / kChunksPerRow, chunk = i % kChunksPerRow;
            const int slot = __shfl_sync(0xffffffffu, my_slot, tok);
            const uint32_t dst = swizzle128(stage_addr + atom_offset(kTileN, tok, chunk));
            const bool in_range = tile_start + tok < kv_end;
            if constexpr (kFp8) {
                if (!in_range) {
                    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0) : "memory");
                } else {
                    const uint2 raw = __ldg(reinterpret_cast<const uint2 *>(cache + (long)slot * kWidth + chunk * 8));
                    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(dst), "r"(e4m3x2_to_bf16x2(raw.x & 0xffff)),
                                 "r"(e4m3x2_to_bf16x2(raw.x >> 16)), "r"(e4m3x2_to_bf16x2(raw.y & 0xffff)), "r"(e4m3x2_to_bf16x2(raw.y >> 16))
                                 : "memory");
                }
            } else {
                const char *src = cache + (long)slot * kWidth * 2 + chunk * 16;
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(in_range ? 16 : 0) : "memory");
            }
        }
        if constexpr (kFp8) {
            fence_proxy_async();
            __syncwarp();
            if (elect_one_sync()) mbar_arrive(&full[stage]);
        } else {
            cp_async_commit();
        }
    }
    if constexpr (!kFp8) cp_async_ring_arrive_rest<kStages, kInFlight>(full, tiles);
}

// One consumer warpgroup over the keys [split_begin, kv_end) of split `split` (see the file comment); q_smem: its 64
// rows' first line in Q's first atom.
__device__ __forceinline__ void consume(const MlaAttentionParams &p, const unsigned char *q_smem, const unsigned char *stages, uint64_t *full, uint64_t *empty,
                                       RowState &state, int split, int split_begin, int kv_end, int tiles, long grow0) {
    const int lane = threadIdx.x & 31, quad = lane & 3;
    const float score_scale = p.score_scale * kLog2e;
    float s0[kTileN / 8][4], s1[kTileN / 8][4], o[kLatent / 8][4], correction[2];
#pragma unroll
    for (int n = 0; n < kLatent / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    uint32_t pa[kTileN / 16][4];

    // S_j = Q K_j^T into s: 20 k-steps in order, accumulated from zero as the mma.sync kernel does (the caller fences).
    auto issue_s = [&](int j, float (&s)[kTileN / 8][4]) {
        const int stage = j % kStages;
        ring_wait_full<kStages>(full, j);
        const unsigned char *tile = stages + stage * kStageBytes;
#pragma unroll
        for (int ks = 0; ks < kWidth / 16; ++ks) {
            const int at = ks / 4;  // the 64-column atom of k-step ks
            wgmma_m64n32k16_bf16_ss(&s[0][0], wgmma_desc_k_sw128(q_smem + at * kQAtomBytes + (ks % 4) * 32),
                                    wgmma_desc_k_sw128(tile + at * kStageAtomBytes + (ks % 4) * 32));
        }
        wgmma_commit();
    };
    // O += P_j V_j: the tile's tokens 16 k .. 16 k + 15 start 16 lines (2 KiB) further into each atom.
    auto issue_pv = [&](int j, uint32_t (&p_frag)[kTileN / 16][4]) {
        const unsigned char *tile = stages + (j % kStages) * kStageBytes;
#pragma unroll
        for (int k = 0; k < kTileN / 16; ++k) wgmma_m64n256k16_bf16_rs_trans_b(&o[0][0], p_frag[k], wgmma_desc_mn_sw128(tile + k * 16 * 128, kStageAtomBytes));
        wgmma_commit();
    };
    auto release = [&](int j) {
        __syncwarp();
        if (lane == 0) mbar_arrive(&empty[j % kStages]);
    };
    auto zero_s = [&](float (&s)[kTileN / 8][4]) {
#pragma unroll
        for (int n = 0; n < kTileN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
    };
    auto softmax = [&](int j, float (&s)[kTileN / 8][4], uint32_t (&p_frag)[kTileN / 16][4]) {
        softmax_tile(s, p_frag, correction, state, split_begin + j * kTileN, kv_end, quad, score_scale);
    };
    auto rescale = [&]() { rescale_rows(o, correction); };
    attention_tiles_s_ahead(tiles, s0, s1, o, pa, zero_s, issue_s, issue_pv, softmax, release, rescale);
    store_rows(p, o, state, split, split_begin, grow0, quad);
}

// One block: row tile blockIdx.x of sequence blockIdx.z over the keys of split blockIdx.y (if any), then, when split
// and p.split_counters is set, the fused combine by the consumer warps (the producer's have exited).
template <bool kFp8>
__device__ __forceinline__ void attention_tile_wgmma(const MlaAttentionParams &p) {
    extern __shared__ __align__(1024) unsigned char smem[];
    uint64_t *full = reinterpret_cast<uint64_t *>(smem + kBarOffset);
    uint64_t *empty = full + kStages;
    int *last_arrival = reinterpret_cast<int *>(empty + kStages);  // the fused combine's "this block combines"
    const int seq = blockIdx.z, split = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int q_begin = p.q_start[seq], q_count = p.q_start[seq + 1] - q_begin;
    const int first_pos = p.kv_len[seq] - q_count;
    const int row0 = blockIdx.x * kRows;  // first (token, head) row of this block within the sequence
    const int rows = q_count * p.heads;
    if (row0 >= rows) return;  // every split block of this tile returns here: no arrival is awaited
    // Keys of this block: its split's range, cut at the last position any of its rows may see (causality). None when
    // split_begin >= kv_end (every row's position precedes the split): the block only arrives for the fused combine.
    const int split_begin = split * p.tokens_per_split;
    const int last_row = min(row0 + kRows, rows) - 1;
    const int kv_end = min(split_begin + p.tokens_per_split, first_pos + last_row / p.heads + 1);
    const int tiles = split_begin < kv_end ? (kv_end - split_begin + kTileN - 1) / kTileN : 0;

    // Q rows [q_lat 256 | q_rope 64] into the swizzled Q operand by all threads (rows past the sequence's queries
    // are zero), fenced for wgmma before the barrier that also publishes the mbarrier initialisation.
    const uint32_t q_addr = smem_addr(smem);
    for (int idx = threadIdx.x; tiles > 0 && idx < kRows * kChunksPerRow; idx += kThreads) {
        const int r = idx / kChunksPerRow, chunk = idx % kChunksPerRow, row = row0 + r, col = chunk * 8;
        const uint32_t dst = swizzle128(q_addr + atom_offset(kRows, r, chunk));
        if (row < rows) {
            const long grow = (long)q_begin * p.heads + row;
            const bf16 *src = col < kLatent ? p.q_lat + grow * kLatent + col : p.q_rope + grow * p.q_rope_stride + (col - kLatent);
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
        } else {
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(dst), "r"(0) : "memory");
        }
    }
    cp_async_commit();
    if (threadIdx.x == 0) {
        for (int s = 0; s < kStages; ++s) {
            mbar_init(&full[s], 1);                // the producer's "tile landed" arrival
            mbar_init(&empty[s], kConsumerWarps);  // one release per consumer warp, both warpgroups
        }
        mbar_init_fence();
    }
    cp_async_wait<0>();
    fence_proxy_async();
    __syncthreads();

    if (warp >= kProducerWarp) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegisters));
        if (warp == kProducerWarp && tiles > 0) produce<kFp8>(p, smem + kQBytes, full, empty, seq, split_begin, kv_end, tiles);
        return;
    }
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegisters));
    // This thread's two accumulator rows (g and g + 8 of the warp's 16; the warp's rows are 16 warp .. of the block,
    // its warpgroup's 64 of them 64 (warp / 4) ..) and the positions they may attend to.
    const int g = lane >> 2, first_row = warp * 16 + g;
    RowState state{{-INFINITY, -INFINITY}, {0.f, 0.f}, {-1, -1}};
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int row = row0 + first_row + 8 * h;
        state.pos[h] = row < rows ? first_pos + row / p.heads : -1;  // -1: padding row, sees nothing
    }
    const unsigned char *group_q = smem + (warp / 4) * kGroupRows * 128;
    if (tiles > 0) consume(p, group_q, smem + kQBytes, full, empty, state, split, split_begin, kv_end, tiles, (long)q_begin * p.heads + row0 + first_row);
    if (p.num_splits == 1 || p.split_counters == nullptr) return;
    // Named barrier 1 of the consumer warps alone (barrier 0 would wait for the exited producer warpgroup).
    const auto consumers_sync = [] { asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumerWarps * 32) : "memory"); };
    combine_if_last_split(p, seq, q_begin, first_pos, row0, last_row, warp, kConsumerWarps, last_arrival, consumers_sync);
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads, 1) mla_attention_wgmma_bf16(const MlaAttentionParams p) { attention_tile_wgmma<false>(p); }
extern "C" __global__ void __launch_bounds__(kThreads, 1) mla_attention_wgmma_fp8(const MlaAttentionParams p) { attention_tile_wgmma<true>(p); }
