// Grouped expert GEMM (and the dense GEMM, which is one group) with tensor cores, plus the deterministic MoE combine.
//
// Computes, for each row (a (token, expert) pair in grouped mode, a token in dense mode) and each output column n of
// the row's expert e:  y[row, n] = sum_k x[src(row), k] * W_e[n, k]  with the weights dequantised to bf16 in registers.
//
// Operand roles ("swap A/B"): the WEIGHTS are the mma A operand (16 output features fill the M dimension of
// mma.m16n8k16) and the pairs are the B operand (8 pairs per N fragment). A decode step with 1-8 tokens per expert
// therefore still issues full-width tensor-core work per weight fragment and the weights stream once; a prefill tile
// reuses each weight fragment across its NF pair fragments. The same code serves both, with two tile shapes.
//
// Tiling: a block of 4 warps owns BM = 4 * MF * 16 output features and BN = NF * 8 pair slots; each warp owns MF
// 16-row weight tiles and all BN slots. K advances in steps of 64 through a STAGES-deep cp.async ring in shared memory:
// weights (already in fragment order, copied verbatim: no ldmatrix needed, each lane reads its own 16-byte chunk), their
// scales (weight_format.cuh stage_scales: in the same cp.async group, so the k loop waits on no global load) and
// the gathered activations (rows picked by the grouping, XOR-swizzled 16-byte chunks, read with ldmatrix.x4).
// Dequantisation (fp8 / int4 / nvfp4 -> bf16) happens on the fragment in registers right before mma.sync.
// W8A8 (moe_gemm_fp8_act_*): per-tensor e4m3 weights and e4m3 activations (quantised beforehand with a static
// per-tensor scale by moe_quantize_act_e4m3) go straight to mma.sync m16n8k32 e4m3; the epilogue multiplies the weight
// scale by the activation scale.
//
// Batched dense mode (grid z = heads): matrix z of the weights times head z's slice of every input row, written to
// head z's slice of every output row (the per-head W_UK / W_UV products of MLA in one launch instead of one per head).
//
// Grouping: block y is a tile of tile_m slots; a block whose tile is not the first of a BN-slot group of its expert
// exits at once, so an expert with up to BN pairs streams its weights exactly once (decode: tile_m 8, BN 32).
//
// Query RoPE (params.h MoeGemmParams.rope, optional, dense mode): rope_q_k's q half (RoPE of each head's rope dims and
// the llama-4 query scale) applied to the block's output tile after its stores, so the query projection needs no
// separate RoPE launch.
// Row finisher (params.h GemmRowFinish, optional): the step after the GEMM on each output row (the residual add +
// RMSNorm after wo, the MoE combine + add + RMSNorm after the experts' down projection, the latent norms + cache
// write after the latent projection) runs in the same launch, in the last block that writes into the row: counted
// per row with an atomic after a fence, as the router counts its blocks. A decode step saves a launch per finisher.
// Split-K (params.h MoeGemmParams.k_splits, dense decode launches of one matrix whose column blocks alone would leave
// SMs idle: src/kernels/moe.rs `decode_k_splits`): grid z = the k split; each block reduces its k range into f32
// partials and the tile's last arriving block sums them in a fixed split order and runs the epilogue
// (sum_k_splits below), so a split launch is still one launch with the same stores and finishers. Only the narrow
// tile's and the decode kernel's _split entries compile it.
//
// Bytes (per expert touched): its weights once per BN pairs (bf16 2, fp8 1, 4-bit 0.5 byte per element, plus scales),
// the pairs' activation rows once per block column, the outputs once. FLOPs: 2 * pairs * K * N.
#include "params.h"
#include "common.cuh"
#include "gemm_epilogue.cuh"
#include "l2_prefetch.cuh"
#include "mma.cuh"
#include "quant.cuh"
#include "weight_format.cuh"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kStepsPerStage = kBK / 16; // mma k-steps per stage

// ---- the kernel body -------------------------------------------------------------------------------------------------

// Pipeline depth from a shared-memory budget: as many 64-k stages as fit in 96 KiB (2 blocks per SM), 2 to max_stages.
// Narrow formats get deeper pipelines, so every format keeps about the same bytes in flight. The narrow tile (BM 64,
// run when the grid is small, so blocks per SM are few anyway) may go to 16 stages; the others stop at 8, because on an
// H200 4-bit small tiles with 12 stages (96 KiB, 2 blocks per SM) ran batch 32 slower than with 8 (64 KiB, 3 blocks per
// SM): their dequantisation wants warps more than bytes in flight. src/kernels/moe.rs mirrors this. The timing model
// has no figure for other depths (only built kernels replay on the interpreter): docs/perf.md "Decode tile choices".
// The weight scales staged with each stage (at most 512 bytes a stage, 4 KiB a block) come on top of the budget: they
// change no depth, and the blocks per SM stay (two of at most 100 KiB, three 4-bit small tiles of 68 KiB, in 228 KiB).
constexpr int kStageBudget = 96 * 1024;
__host__ __device__ constexpr int stages_for(int stage_bytes, int max_stages) {
    return kStageBudget / stage_bytes < 2 ? 2 : (kStageBudget / stage_bytes > max_stages ? max_stages : kStageBudget / stage_bytes);
}

// The activations' shared-memory swizzle, one rule for every mma.sync tile: 16-byte chunk `chunk` of a row's
// 128-byte bank line sits at byte (chunk ^ row_key) * 16 of it, the row's key chosen so that the 8 rows one ldmatrix
// matrix reads hit 8 different bank groups.
__device__ __forceinline__ int swizzled_chunk(int chunk, int row_key) { return (chunk ^ row_key) << 4; }

// Activation row chunk c of row r of a grouped tile's stage. bf16 rows of a stage are 128 bytes (8 chunks, key
// row % 8); e4m3 rows are 64 bytes (4 chunks, two rows per 128-byte bank line: key (row / 2) % 4). decode_gemm keeps
// whole-K rows instead (one bank line per 64-k block, key = its slot < 8).
template <bool Fp8Act>
__device__ __forceinline__ int x_chunk_offset(int row, int chunk) {
    constexpr int kRowBytes = Fp8Act ? kBK : kBK * 2;
    return row * kRowBytes + swizzled_chunk(chunk, Fp8Act ? (row >> 1) & 3 : row & 7);
}

// Every accumulator of a warp's tiles to zero: before the k loop, and before sum_k_splits adds up the partials.
template <int MF, int NF>
__device__ __forceinline__ void zero_accumulators(float (&acc)[MF][NF][4]) {
#pragma unroll
    for (int m = 0; m < MF; ++m)
#pragma unroll
        for (int f = 0; f < NF; ++f)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[m][f][i] = 0.f;
}

// Split-K (params.h MoeGemmParams.k_splits): the blocks of one output tile (grid z = the split) each hold the partial
// sums of their k range in acc. Each stores them to its slice of split_partials (f32: each thread's four accumulators
// of a fragment as one float4, slices [split][m][f][thread], coalesced; the layout is private to this kernel), fences
// and arrives on the tile's counter. The block whose arrival completes the tile zeroes the counter for the next launch
// and sums the slices in split order 0, 1, .., splits - 1 into acc: the same f32 additions whichever block arrives
// last, so the result does not depend on timing. It then runs the epilogue the unsplit kernel runs (stores, RoPE, row
// finisher). Returns false in the other blocks (they are done). Only the threads whose float4 holds a real slot
// (slot f * 8 + 2t < slots) store and read it; the others' accumulators are padding, never stored by the epilogue.
// Every thread calls it. Bytes: 16 per float4 with a real slot, written and read back: at batch 1 a quarter of the
// threads, 512 bytes a split block (1% of the 40-56 KiB of weights a split block streams at the real shapes).
template <int MF, int NF>
__device__ __forceinline__ bool sum_k_splits(const MoeGemmParams &p, float (&acc)[MF][NF][4], int slots, int split, int splits) {
    __shared__ int last_block;
    const int tile = blockIdx.y * gridDim.x + blockIdx.x;
    float4 *const slices = reinterpret_cast<float4 *>(p.split_partials) + (long)tile * splits * MF * NF * kThreads + threadIdx.x;
    auto slice = [&](int s, int m, int f) { return slices + ((s * MF + m) * NF + f) * kThreads; };
    const int first_slot = 2 * (threadIdx.x & 3);  // this lane's first slot of a fragment (2t)
#pragma unroll
    for (int m = 0; m < MF; ++m)
#pragma unroll
        for (int f = 0; f < NF; ++f)
            if (f * 8 + first_slot < slots) *slice(split, m, f) = make_float4(acc[m][f][0], acc[m][f][1], acc[m][f][2], acc[m][f][3]);
    __threadfence();  // this thread's partials are visible device-wide before its block arrives
    __syncthreads();
    if (threadIdx.x == 0) {
        const bool last = atomicAdd(p.split_counters + tile, 1) == splits - 1;
        if (last) p.split_counters[tile] = 0;  // every split is in: zero for the next launch
        last_block = last;
    }
    __syncthreads();
    if (!last_block) return false;
    __threadfence();  // the other splits fenced their partials before arriving: read them from here on (ld.cg)
    zero_accumulators(acc);
    for (int s = 0; s < splits; ++s) {
#pragma unroll
        for (int m = 0; m < MF; ++m)
#pragma unroll
            for (int f = 0; f < NF; ++f) {
                if (f * 8 + first_slot >= slots) continue;
                const float4 v = __ldcg(slice(s, m, f));
                acc[m][f][0] += v.x, acc[m][f][1] += v.y, acc[m][f][2] += v.z, acc[m][f][3] += v.w;
            }
    }
    return true;
}

// The epilogue of a block (grouped_gemm, decode_gemm): accumulator c0,c1 = (feature g, slots 2t, 2t+1), c2,c3 =
// (feature g+8, same slots) of each of the warp's MF 16-row tiles (the block's tiles first_tile, ..) times the rows'
// scales, stored; then the query RoPE and the row finisher when asked for. One of the two outputs is null; a batched
// launch offsets the other one to head z's columns; a tail writes its own rows. Every thread calls it.
// kBlockWarps: the block's warps (kWarps, or kDecodeWarps in the decode kernel's _decode_w2 entries).
template <int MF, int NF, bool Fp8Act, int kBlockWarps = kWarps>
__device__ __forceinline__ void block_epilogue(const MoeGemmParams &p, bool tail, int expert, const float (&acc)[MF][NF][4], const int *slot_pair,
                                               int first_tile, int slot_begin, int slots) {
    constexpr int BM = kBlockWarps * MF * 16;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int out_stride = pick(tail, p.tail.out_stride, p.out_stride);
    bf16 *const out_bf16 = pick<bf16 *>(tail, p.tail.out_bf16, p.out_bf16 ? p.out_bf16 + (long)blockIdx.z * p.out_batch_stride : nullptr);
    float *const out_f32 = pick<float *>(tail, p.tail.out_f32, p.out_f32 ? p.out_f32 + (long)blockIdx.z * p.out_batch_stride : nullptr);
#pragma unroll
    for (int m = 0; m < MF; ++m) {
        const int tile = first_tile + warp * MF + m;
        const int feature = tile * 16 + g;
        float scale_g = 1.f, scale_g8 = 1.f;
        // The block's operand chosen here again rather than carried out of the k loop: the same code as the rest of
        // the kernel has, where carrying it changed the k loop's (fp8's narrow tile: 0.8-3.3 more warp instructions
        // per fragment).
        const float *row_scales = block_weights(p, tail).row_scales;
        if (row_scales != nullptr) {
            const float *rs = row_scales + (long)expert * p.rows_padded;
            scale_g = rs[feature], scale_g8 = rs[feature + 8];
        }
        if constexpr (Fp8Act) {
            scale_g *= p.act_scale;
            scale_g8 *= p.act_scale;
        }
        store_tile_slots(p, tail, out_bf16, out_f32, out_stride, acc[m], slot_pair, tile, g, t, slot_begin, slots, scale_g, scale_g8);
    }
    if (p.rope.positions != nullptr) rope_output_tile(p, slot_begin, slots, first_tile * 16, BM);
    static_assert(NF * 8 <= 64, "finish_rows tracks at most 64 slots");
    if (p.finish.kind != SMALL4_GEMM_FINISH_NONE) finish_rows(p, slot_pair, slots, slot_begin, tail);
}

// kSplitK: the _split entries, the only ones that read p.k_splits (dense decode launches that split, see the file
// comment); the others compile no split path, so the k range and sum_k_splits cost nothing on their k loop.
template <Format F, int MF, int NF, bool Fp8Act = false, bool kSplitK = false>
__device__ __forceinline__ void grouped_gemm(const MoeGemmParams &p) {
    using W = WeightFormat<F>;
    static_assert(!Fp8Act || F == Format::Fp8, "e4m3 activations pair with per-tensor e4m3 weights only");
    constexpr int BM = kWarps * MF * 16;
    constexpr int BN = NF * 8;
    constexpr int kXRowBytes = Fp8Act ? kBK : kBK * 2;  // one gathered activation row of a stage
    constexpr int kXChunks = kXRowBytes / 16;
    constexpr int kWStage = kWarps * MF * W::kTileBytes;
    constexpr int kXStage = BN * kXRowBytes;
    constexpr int kSStage = kWarps * MF * W::kScaleBytes;  // the stage's weight scales (on top of the budget)
    constexpr int STAGES = stages_for(kWStage + kXStage, MF == 1 ? 16 : 8);
    constexpr int kRawWords = W::kTileBytes / 32 / 4;  // per lane per tile per stage
    static_assert(NF % 2 == 0, "ldmatrix.x4 loads two pair fragments at a time");

    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char *w_smem = smem;
    unsigned char *x_smem = smem + STAGES * kWStage;
    unsigned char *s_smem = x_smem + STAGES * kXStage;
    int *slot_pair = reinterpret_cast<int *>(s_smem + STAGES * kSStage);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2;

    // Which rows (slots) and expert this block computes. Grouped launches may carry a dense tail (the shared expert):
    // its blocks come after the grouped tiles and compute rows of its own matrix, input and output.
    // Only the narrow decode tile carries a tail (batch-1 decode, where launches matter most); the wider tiles have no
    // registers to spare for it (they spill), and the W8A8 kernels run the shared expert apart with bf16 activations:
    // for those the host launches the shared expert on its own.
    constexpr bool kTail = !Fp8Act && MF == 1;
    const bool tail = kTail && p.sorted_pairs != nullptr && (int)blockIdx.y >= p.capacity_tiles;
    int expert, slot_begin, slot_end;
    if (!block_slots<BN>(p, tail, expert, slot_begin, slot_end)) return;
    const int slots = slot_end - slot_begin;
    const int active_nf = (slots + 7) / 8;  // pair fragments with at least one slot (uniform over the block)

    for (int s = tid; s < BN; s += kThreads) {
        int pair = -1;
        if (s < slots) pair = p.sorted_pairs != nullptr && !tail ? p.sorted_pairs[slot_begin + s] : slot_begin + s;
        slot_pair[s] = pair;
    }
    __syncthreads();

    // Padding slots read zeros: written once into every stage, never touched by cp.async.
    for (int i = tid; i < STAGES * BN * kXChunks; i += kThreads) {
        const int row = (i / kXChunks) % BN;
        if (slot_pair[row] < 0) reinterpret_cast<uint4 *>(x_smem)[i] = make_uint4(0, 0, 0, 0);
    }

    const int first_tile = blockIdx.x * (BM / 16);
    const int k_blocks = p.k_dim / kBK;
    // Split-K (kSplitK and p.k_splits > 1): this block reduces k blocks [kb_begin, kb_end) of the k_blocks, split
    // blockIdx.z.
    const int splits = kSplitK && p.k_splits > 1 ? p.k_splits : 1, split = splits > 1 ? (int)blockIdx.z : 0;
    const int kb_begin = k_blocks * split / splits, kb_end = k_blocks * (split + 1) / splits;
    const GemmWeights weights = block_weights(p, tail);
    const unsigned char *w_expert = expert_weights(p, tail, expert);

    auto load_stage = [&](int stage, int kb) {
        unsigned char *w_dst = w_smem + stage * kWStage;
        constexpr int kChunksPerTile = W::kTileBytes / 16;
        for (int i = tid; i < kWarps * MF * kChunksPerTile; i += kThreads) {
            const int tile = i / kChunksPerTile, chunk = i % kChunksPerTile;
            const unsigned char *src = w_expert + ((long long)(first_tile + tile) * k_blocks + kb) * W::kTileBytes + chunk * 16;
            cp_async16(w_dst + tile * W::kTileBytes + chunk * 16, src);
        }
        W::template stage_scales<kWarps * MF, kThreads>(p, weights, expert, first_tile, kb, s_smem + stage * kSStage, tid);
        unsigned char *x_dst = x_smem + stage * kXStage;
        for (int i = tid; i < BN * kXChunks; i += kThreads) {
            const int row = i >> (kXChunks == 8 ? 3 : 2), chunk = i & (kXChunks - 1);
            const int pair = slot_pair[row];
            if (pair < 0) continue;
            const long src_row = p.in_by_token && !tail ? pair / p.top_k : slot_begin + row;
            const void *src;
            if constexpr (Fp8Act) {
                src = p.x_e4m3 + src_row * p.x_stride + kb * kBK + chunk * 16;
            } else if (tail) {
                src = p.tail.x + src_row * p.tail.x_stride + kb * kBK + chunk * 8;
            } else {
                // A batched launch reads head z's columns.
                src = p.x + (long)blockIdx.z * p.x_batch_stride + src_row * p.x_stride + kb * kBK + chunk * 8;
            }
            cp_async16(x_dst + x_chunk_offset<Fp8Act>(row, chunk), src);
        }
    };

    float acc[MF][NF][4];
    zero_accumulators(acc);

#pragma unroll 1
    for (int s = 0; s < STAGES - 1; ++s) {
        if (kb_begin + s < kb_end) load_stage(s, kb_begin + s);
        cp_async_commit();
    }

    for (int kb = kb_begin; kb < kb_end; ++kb) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage kb visible to all; stage (kb - 1) % STAGES no longer read by anyone
        if (kb + STAGES - 1 < kb_end) load_stage((kb - kb_begin + STAGES - 1) % STAGES, kb + STAGES - 1);
        cp_async_commit();

        const int stage = (kb - kb_begin) % STAGES;
        const unsigned char *x_stage = x_smem + stage * kXStage;
#pragma unroll
        for (int m = 0; m < MF; ++m) {
            const int tile = warp * MF + m;
            const typename W::Scales scales = W::staged_scales(weights, s_smem + stage * kSStage + tile * W::kScaleBytes, g);
            uint32_t raw[kRawWords];
            const unsigned char *w_tile = w_smem + stage * kWStage + tile * W::kTileBytes;
#pragma unroll
            for (int c = 0; c < kRawWords / 4; ++c) {
                const uint4 v = *reinterpret_cast<const uint4 *>(w_tile + (c * 32 + lane) * 16);
                raw[4 * c] = v.x, raw[4 * c + 1] = v.y, raw[4 * c + 2] = v.z, raw[4 * c + 3] = v.w;
            }
            // A k-step: 16 k of bf16 (m16n8k16) or 32 k of e4m3 (m16n8k32); either way 32 bytes of an activation row,
            // two 16-byte chunks.
            constexpr int kSteps = Fp8Act ? kBK / 32 : kStepsPerStage;
#pragma unroll
            for (int ks = 0; ks < kSteps; ++ks) {
                uint32_t a[4];
                if constexpr (Fp8Act) {
                    fp8_weights_to_e4m3_a(raw + 4 * ks, a);
                } else {
                    W::fragment(raw, ks, scales, a);
                }
#pragma unroll
                for (int f = 0; f < NF; f += 2) {
                    if (f >= active_nf) break;
                    // Matrices: (frag f, k lo) (f, k hi) (f+1, k lo) (f+1, k hi); lane l addresses row l % 8 of matrix l / 8.
                    const int row = (f + (lane >> 4)) * 8 + (lane & 7);
                    const int chunk = 2 * ks + ((lane >> 3) & 1);
                    uint32_t b[4];
                    ldmatrix_x4(b, x_stage + x_chunk_offset<Fp8Act>(row, chunk));
                    if constexpr (Fp8Act) {
                        mma_e4m3(acc[m][f], a, b[0], b[1]);
                        if (f + 1 < active_nf) mma_e4m3(acc[m][f + 1], a, b[2], b[3]);
                    } else {
                        mma_bf16(acc[m][f], a, b[0], b[1]);
                        if (f + 1 < active_nf) mma_bf16(acc[m][f + 1], a, b[2], b[3]);
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
    if (kSplitK && splits > 1 && !sum_k_splits(p, acc, slots, split, splits)) return;

    block_epilogue<MF, NF, Fp8Act>(p, tail, expert, acc, slot_pair, first_tile, slot_begin, slots);
}

// ---- the decode kernel: at most 8 tokens ---------------------------------------------------------------------------
//
// moe_gemm_*_decode: the grouped launches of at most kDecodeSlots tokens (src/kernels/moe.rs `TileShape::Decode`: an
// expert then has at most 8 pairs, one mma pair fragment) and the dense launches of at most 8 rows (one matrix, or one
// per head in grid z; split-K in grid z for one matrix, as the narrow tile's _split entries). Each warp owns one
// 16-row weight tile; a block is the narrow tile's 4 warps (BM 64, grid x = rows / 64), or kDecodeWarps (BM 32) in
// the _decode_w2 entries, which the host runs on unsplit one-round launches without a row finisher where they lower
// the busiest SM's warp tiles and six such blocks' activation rows fit an SM (src/kernels/gemm/tile.rs
// `TileShape::block_warps`); grid y = the grouping's 8-slot tiles, then the dense tail's row blocks (dense: one row
// block). The same mma.sync m16n8k16 per k-step in the same k order, the same split ranges and partial sums
// (sum_k_splits) and the same epilogue (block_epilogue) as the narrow tile, so its outputs are the narrow tile's bit
// for bit at the same split count. What differs is how the operands arrive:
// - weights and their scales straight from global memory into registers: each lane loads its 16-byte fragment
//   chunks of a 64-k block (the repacked layout is fragment order) with ld.global.nc and the scales' raw words
//   (WeightFormat load_scale_words), kDepth k blocks ahead of their use in a register ring: 4 KiB a warp in flight
//   (bf16 2, fp8 4, 4-bit 8 k blocks; 32-64 KiB an SM at 2-4 blocks), no shared-memory ring, no barrier and no
//   copy wait in the k loop;
// - activations: the block's (at most 8) rows over its k range, copied into shared memory once before the loop
//   (16-byte chunks XOR-swizzled per 64-k block), one ldmatrix.x4 per two k-steps; the lanes of slots the block
//   does not have read a zeroed row, as do padding pairs;
// - programmatic launch (common.cuh): a dense launch's blocks and the shared expert's tail blocks issue the ring's
//   first kDepth k blocks of weights (static), ask L2 for the rest of each warp's tile over its k range (up to
//   p.own_prefetch_k_blocks k blocks and their scales, cp.async.bulk.prefetch.L2: prefetch_own_k_blocks; the host
//   asks for it where the grid is one wave, src/kernels/gemm.rs own_prefetch_k_blocks) and then wait for the kernel
//   before, so the whole weight stream starts while it finishes and the ring's refills read L2; a routed block waits
//   first (its expert comes from the router's grouping). Every block triggers the next kernel right after its wait.
// One pair fragment instead of the narrow tile's four: at batch 1 the narrow tile's ring copies, ldmatrix and address
// arithmetic for 32 slots cost more warp instructions than the dequantisation (docs/perf.md "moe_gemm decode").
// Shared memory: the launch's rows and a zero row (at most 8) x the k range x 2 bytes: a grouped launch of T tokens
// min(T + 1, 8) rows over K (16 KiB at one token and K 4096, 64 KiB at 8 tokens), a dense launch its rows and the
// zero row over the longest split's k range (1 row at K 4096 in 8 splits: 2 rows x 8 k blocks x 128 bytes).
// The ring's slots are registers, so the k loop runs whole rounds of kDepth k blocks without a branch between them,
// then the last blocks one by one.
// Bytes: each expert's weights and scales once per launch (its up to 8 pairs share them; the own-range prefetch
// moves the same bytes earlier, not more), slots x K x 2 of activations per block (from L2), the outputs once.
// FLOPs: 2 x 8 x K per weight row and block (the mma's 8 columns).
// Occupancy: 12 warps an SM at most 168 registers (__launch_bounds__ below; nvfp4 171 -> 163 without spills, 164 with
// the programmatic-launch wait, 168 with the own-range prefetch and the GemmWeights operand, at the cap, no spills):
// 3 blocks of 4 warps (_decode; K 4096: 3 x 64 KiB of 8 activation rows fit the 228 KiB) or 6 of 2 (_decode_w2, up
// to 4 rows at K 4096); the _split entries guarantee 2 of 4.
// Why 2-warp blocks: batch 1 with the shared expert's tail is 5 experts x 4096 rows = 1,280 warp tiles. As 320
// blocks of 4 warps on 132 SMs (one round; at 2 an SM the last 56 ran a second, doubling the launch's chain) 56 SMs
// ran 3 blocks and 76 ran 2, so the busiest SM issued 12 warp tiles' dequantisation against an average of 9.7 (the
// 4-bit launches are issue-bound there in the timing model: docs/perf.md "The decode kernel in 2-warp blocks"). As
// 640 blocks of 2 warps (6 resident an SM, still one round) the busiest SM runs 10. A block's slot table, activation
// staging and epilogue are per block: at one token a few percent of its k loop, but a row finisher's pass over a
// row's columns takes twice as long with half the threads, so launches with one keep 4-warp blocks.
constexpr int kDecodeSlots = 8;
constexpr int kDecodeWarps = 2;

// 64-k blocks a warp has in flight: 4 KiB of weights, at least 2 blocks (bf16 2, fp8 4, 4-bit 8).
__host__ __device__ constexpr int decode_depth(int tile_bytes) { return 4096 / tile_bytes < 2 ? 2 : 4096 / tile_bytes; }

// A warp's own k blocks [kb_first, kb_end) of weight tile `tile` (at w_tile) and their scales as L2 prefetches
// (l2_prefetch.cuh prefetch_l2_warp): the tile's weights are contiguous over k in the repacked layout, and so are
// its int4 group scales and zero points ([tile, group, 16]) and nvfp4 block scales ([tile, k block, 64]), each
// range running from the first k block's piece (WeightFormat scale_piece) to the end of the last's. fp8-block128's
// scales are 8 bytes a tile per 128 k, strided over the tiles (0.4% of the weight bytes): left to the ring's loads.
template <Format F>
__device__ __forceinline__ void prefetch_own_k_blocks(const MoeGemmParams &p, const GemmWeights &weights, int expert, int tile, const unsigned char *w_tile, int kb_first,
                                                      int kb_end, int lane) {
    using W = WeightFormat<F>;
    if (kb_first >= kb_end) return;
    prefetch_l2_warp(w_tile + (long long)kb_first * W::kTileBytes, (unsigned int)(kb_end - kb_first) * W::kTileBytes, lane);
    if constexpr (F == Format::Int4 || F == Format::Nvfp4) {
#pragma unroll
        for (int piece = 0; piece < W::kScalePieces; ++piece) {
            int offset, bytes;
            const auto *first = static_cast<const unsigned char *>(W::scale_piece(p, weights, expert, tile, kb_first, piece, offset, bytes));
            if (first == nullptr) continue;
            const auto *last = static_cast<const unsigned char *>(W::scale_piece(p, weights, expert, tile, kb_end - 1, piece, offset, bytes));
            prefetch_l2_warp(first, (unsigned int)(last + bytes - first), lane);
        }
    }
}

// kSplitK: the _decode_split entries (dense launches that split k); the grouped and unsplit dense launches run the
// entries without it, whose k range is the whole k at compile time (the split bookkeeping cost the grouped 4-bit and
// fp8 launches 0.5-1.8 warp instructions per weight fragment when it was read at run time).
// kBlockWarps: the block's warps, one 16-row weight tile each (kWarps, or kDecodeWarps in the _decode_w2 entries).
template <Format F, bool kSplitK = false, int kBlockWarps = kWarps>
__device__ __forceinline__ void decode_gemm(const MoeGemmParams &p) {
    using W = WeightFormat<F>;
    constexpr int kBlockThreads = kBlockWarps * 32;
    constexpr int kChunks = W::kTileBytes / (32 * 16);  // 16-byte chunks per lane per tile and k block
    constexpr int kDepth = decode_depth(W::kTileBytes);
    extern __shared__ __align__(128) unsigned char smem[];
    __shared__ int slot_pair[kDecodeSlots];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2;

    // A later kernel's weights into L2 (l2_prefetch.cuh): static bytes, so before any wait.
    prefetch_l2(p.l2_prefetch);
    const bool tail = p.sorted_pairs != nullptr && (int)blockIdx.y >= p.capacity_tiles;
    // Programmatic launch (common.cuh): a routed block's expert and slots come from the router's grouping, an earlier
    // kernel's output, so it waits before reading them; a dense launch's and the shared expert's tail blocks read only
    // launch parameters and static weights until their activations, so they issue the ring's first turn of weights
    // before waiting and it streams while the previous kernel finishes.
    const bool routed = p.sorted_pairs != nullptr && !tail;
    if (routed) wait_then_allow_dependents();
    int expert, slot_begin, slot_end;
    if (!block_slots<kDecodeSlots>(p, tail, expert, slot_begin, slot_end)) return;

    // Split-K (a dense launch of one matrix with p.k_splits > 1; grouped launches have one split): this block reduces
    // k blocks [kb_begin, kb_end), split blockIdx.z, the narrow tile's split ranges, and stages only their activations.
    const int k_blocks = p.k_dim / kBK;
    const int splits = kSplitK && p.k_splits > 1 ? p.k_splits : 1, split = splits > 1 ? (int)blockIdx.z : 0;
    const int kb_begin = k_blocks * split / splits, kb_end = k_blocks * (split + 1) / splits;
    // The activation rows staged in shared memory, each over the k range: the block's slots and a zero row for the
    // lanes of missing slots. The host sizes the shared memory to the launch's rows and that zero row
    // (src/kernels/gemm/tile.rs `grouped_decode_shared_bytes`, `dense_decode_shared_bytes`: 2 rows at one token, so
    // 6 blocks of 16 KiB fit an SM at K 4096), and a block computes at most the slots it holds, whatever its grouping
    // says (a router's grouping gives an expert at most one pair a token, so its slots always fit).
    const int row_bytes = (kb_end - kb_begin) * kBK * 2, row_chunks = (kb_end - kb_begin) * (kBK / 8);
    const int rows_staged = min((int)(dynamic_smem_bytes() / row_bytes), kDecodeSlots);
    const int slots = min(slot_end - slot_begin, rows_staged < kDecodeSlots ? rows_staged - 1 : kDecodeSlots);
    // The ring's first kDepth k blocks, issued first: their latency overlaps the activation copy.
    const int first_tile = blockIdx.x * kBlockWarps, tile = first_tile + warp;
    const GemmWeights weights = block_weights(p, tail);
    const unsigned char *w_tile = expert_weights(p, tail, expert) + (long long)tile * k_blocks * W::kTileBytes;
    const unsigned char *w_lane = w_tile + lane * 16;
    const typename W::ScaleCursor scale_cursor = W::scale_cursor(p, weights, expert, tile, g);
    uint4 ring[kDepth][kChunks];
    typename W::ScaleWords ring_scales[kDepth];
    auto fetch = [&](uint4 (&chunks)[kChunks], typename W::ScaleWords &scales, int kb) {
#pragma unroll
        for (int c = 0; c < kChunks; ++c) chunks[c] = __ldg(reinterpret_cast<const uint4 *>(w_lane + kb * W::kTileBytes + c * 32 * 16));
        scales = W::load_scale_words(scale_cursor, kb);
    };
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
        if (kb_begin + i < kb_end) fetch(ring[i], ring_scales[i], kb_begin + i);
    }
    if (!routed) {
        // The rest of the warp's k range (up to p.own_prefetch_k_blocks k blocks after the ring's first turn) into L2,
        // also before the wait: the whole weight stream starts while the kernel before finishes, and the ring's
        // refills in the k loop find their blocks in L2.
        const int prefetch_first = kb_begin + kDepth, prefetch_end = min(kb_end, prefetch_first + p.own_prefetch_k_blocks);
        prefetch_own_k_blocks<F>(p, weights, expert, tile, w_tile, prefetch_first, prefetch_end, lane);
        wait_then_allow_dependents();
    }

    if (tid < kDecodeSlots) {
        int pair = -1;
        if (tid < slots) pair = p.sorted_pairs != nullptr && !tail ? p.sorted_pairs[slot_begin + tid] : slot_begin + tid;
        slot_pair[tid] = pair;
    }
    __syncthreads();

    // Row s of the slots (its k range) at s * row_bytes; its 16-byte chunk c (8 per 64-k block) at (c / 8) * 128 +
    // ((c % 8) ^ s) * 16 (swizzled_chunk, the grouped tiles' rule), so the 8 rows one ldmatrix matrix reads hit 8 bank
    // groups. Rows of padding pairs, and row `slots` when the block has fewer than 8 (the missing slots' lanes read
    // it), are zeros. Only the swizzle is shared with grouped_gemm's load_stage: that one refills a ring of 64-k stages
    // every k block (rows of 128 bytes, padding rows zeroed once per stage), this copies each row once over its k range.
    const int rows_used = min(slots + 1, kDecodeSlots);
    for (int s = 0; s < rows_used; ++s) {
        const int pair = s < slots ? slot_pair[s] : -1;
        const long src_row = p.in_by_token && !tail ? pair / p.top_k : slot_begin + s;
        const bf16 *src = (tail ? p.tail.x + src_row * p.tail.x_stride : p.x + (long)blockIdx.z * p.x_batch_stride + src_row * p.x_stride) + kb_begin * kBK;
        unsigned char *dst = smem + s * row_bytes;
        for (int c = tid; c < row_chunks; c += kBlockThreads) {
            unsigned char *chunk = dst + (c >> 3) * 128 + swizzled_chunk(c & 7, s);
            if (pair >= 0) {
                cp_async16(chunk, src + c * 8);
            } else {
                *reinterpret_cast<uint4 *>(chunk) = make_uint4(0, 0, 0, 0);
            }
        }
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    // ldmatrix.x4 lane addresses: lane l gives row l % 8 (its slot's row, or the zero row) of matrix l / 8 = (k-step
    // 2q + l / 16, k half (l / 8) % 2), i.e. chunk 4q + l / 8 of each 64-k block; q = 0 at x_lo, q = 1 at x_hi. Both
    // less kb_begin's 64-k blocks (modulo 2^32), so that the k loop adds kb * 128 for its absolute k block kb.
    const int x_row = (lane & 7) < slots ? (lane & 7) : slots;
    const uint32_t x_lo = smem_addr(smem + x_row * row_bytes + swizzled_chunk(lane >> 3, x_row)) - kb_begin * kBK * 2;
    const uint32_t x_hi = smem_addr(smem + x_row * row_bytes + swizzled_chunk(4 + (lane >> 3), x_row)) - kb_begin * kBK * 2;

    float acc[1][1][4];
    zero_accumulators(acc);
    // k block kb from a ring slot; with `refill` the slot then fetches block kb + kDepth (which must exist).
    auto step = [&](uint4 (&chunks)[kChunks], typename W::ScaleWords &scale_words, int kb, bool refill) {
        uint32_t raw[kChunks * 4];
#pragma unroll
        for (int c = 0; c < kChunks; ++c) raw[4 * c] = chunks[c].x, raw[4 * c + 1] = chunks[c].y, raw[4 * c + 2] = chunks[c].z, raw[4 * c + 3] = chunks[c].w;
        const typename W::Scales scales = W::scales_of(scale_words);
        if (refill) fetch(chunks, scale_words, kb + kDepth);
        uint32_t b[2][4];  // b[q]: k-steps 2q (registers 0, 1) and 2q + 1 (registers 2, 3)
        ldmatrix_x4_at(b[0], x_lo + kb * kBK * 2);
        ldmatrix_x4_at(b[1], x_hi + kb * kBK * 2);
#pragma unroll
        for (int ks = 0; ks < kStepsPerStage; ++ks) {
            uint32_t a[4];
            W::fragment(raw, ks, scales, a);
            mma_bf16(acc[0][0], a, b[ks >> 1][2 * (ks & 1)], b[ks >> 1][2 * (ks & 1) + 1]);
        }
    };
    // Whole rounds of the ring whose refills all exist (no branch between their k blocks); then the last kDepth to
    // 2 kDepth - 1 blocks (all of them when k_blocks < kDepth), a slot refilling while its next block exists, so no
    // byte is fetched twice.
    int kb = kb_begin;
#pragma unroll 1
    for (; kb + 2 * kDepth <= kb_end; kb += kDepth) {
#pragma unroll
        for (int i = 0; i < kDepth; ++i) step(ring[i], ring_scales[i], kb + i, true);
    }
#pragma unroll
    for (int i = 0; i < kDepth; ++i) {
        if (kb + i < kb_end) step(ring[i], ring_scales[i], kb + i, kb + i + kDepth < kb_end);
    }
#pragma unroll
    for (int i = 0; i + 1 < kDepth; ++i) {
        if (kb + kDepth + i < kb_end) step(ring[i], ring_scales[i], kb + kDepth + i, false);
    }
    if (kSplitK && splits > 1 && !sum_k_splits(p, acc, slots, split, splits)) return;
    block_epilogue<1, 1, false, kBlockWarps>(p, tail, expert, acc, slot_pair, first_tile, slot_begin, slots);
}

}  // namespace

// Three tile shapes. "small" for decode (BM 128 features x BN 32 slots: 1-32 pairs of an expert share one pass over
// its weights) and "tiled" for prefill (BM 128 x BN 64): BM 128 keeps the activation rows each block re-reads (L2 hits
// on a GPU) at pairs * 2 / (128 * bytes per weight) of the weight bytes. "narrow" (BM 64 x BN 32) is the small tile
// for grids that BM 128 would leave under two blocks per SM (batch-1 decode touches 4 experts: 128 blocks of BM 128);
// on an H200 it took a batch-1 bf16 layer from 121 to 86 us, while at batch 32 (thousands of blocks) it was slower
// than BM 128 (1496 against 1246 us): the host picks it by grid size (src/kernels/moe.rs).
// "decode" is decode_gemm above: the grouped launches of at most 8 tokens, where the host would run the narrow tile,
// and the dense launches of at most 8 rows. "narrow_split" and "decode_split" are the narrow tile and the decode
// kernel with split-K (the dense decode launches that split, on 9-32 and on up to 8 rows); the others never read
// k_splits, so their k loop carries no split code (the per-tensor fp8 narrow fragment took 4 more instructions with
// it, the grouped decode kernel's 0.5-1.8).
// __launch_bounds__(kThreads, 2): at least two blocks per SM, which the 64-96 KiB pipelines allow anyway (up to 255
// registers a thread). Without the minimum, ptxas's own register target spilled the kernels once the row finisher was
// added (narrow at 56-64 registers, tiled at 128).
#define MOE_GEMM_KERNELS(NAME, FORMAT)                                                                                     \
    extern "C" __global__ void __launch_bounds__(kThreads, 2) moe_gemm_##NAME##_narrow(const MoeGemmParams p) {             \
        grouped_gemm<FORMAT, 1, 4>(p);                                                                                     \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(kThreads, 2) moe_gemm_##NAME##_narrow_split(const MoeGemmParams p) {       \
        grouped_gemm<FORMAT, 1, 4, false, true>(p);                                                                        \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(kThreads, 2) moe_gemm_##NAME##_small(const MoeGemmParams p) {              \
        grouped_gemm<FORMAT, 2, 4>(p);                                                                                     \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(kThreads, 2) moe_gemm_##NAME##_tiled(const MoeGemmParams p) {              \
        grouped_gemm<FORMAT, 2, 8>(p);                                                                                     \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(kThreads, 3) moe_gemm_##NAME##_decode(const MoeGemmParams p) {             \
        decode_gemm<FORMAT>(p);                                                                                            \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(kDecodeWarps * 32, 6) moe_gemm_##NAME##_decode_w2(const MoeGemmParams p) { \
        decode_gemm<FORMAT, false, kDecodeWarps>(p);                                                                       \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(kThreads, 2) moe_gemm_##NAME##_decode_split(const MoeGemmParams p) {       \
        decode_gemm<FORMAT, true>(p);                                                                                      \
    }

MOE_GEMM_KERNELS(bf16, Format::Bf16)
MOE_GEMM_KERNELS(fp8, Format::Fp8)
MOE_GEMM_KERNELS(fp8_block, Format::Fp8Block)
MOE_GEMM_KERNELS(int4, Format::Int4)
MOE_GEMM_KERNELS(nvfp4, Format::Nvfp4)

// W8A8: per-tensor e4m3 weights times e4m3 activations (moe_quantize_act_e4m3's layout) on mma m16n8k32, the same
// three tile shapes. Half the activation bytes of the bf16-activation kernels and no dequantisation in the main loop.
#define MOE_GEMM_FP8_ACT_KERNEL(SHAPE, MF, NF)                                                                             \
    extern "C" __global__ void __launch_bounds__(kThreads, 2) moe_gemm_fp8_act_##SHAPE(const MoeGemmParams p) {            \
        grouped_gemm<Format::Fp8, MF, NF, true>(p);                                                                        \
    }
MOE_GEMM_FP8_ACT_KERNEL(narrow, 1, 4)
MOE_GEMM_FP8_ACT_KERNEL(small, 2, 4)
MOE_GEMM_FP8_ACT_KERNEL(tiled, 2, 8)

// Activations bf16 -> e4m3 for the W8A8 GEMMs (params.h has the formula and the permuted order). One thread per 4
// output bytes (q = 0..7 of a 32-column group: columns 16 (q / 4) + 2 (q % 4) + {0, 1, 8, 9}, two bf16x2 loads).
// Grid-stride over rows * cols / 4 words. Bytes: reads 2, writes 1 per element.
extern "C" __global__ void moe_quantize_act_e4m3(const MoeQuantizeActParams p) {
    const int words_per_row = p.cols / 4;
    const long total = (long)p.rows * words_per_row;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total; i += (long)gridDim.x * blockDim.x) {
        const long row = i / words_per_row;
        if (p.sorted_pairs != nullptr && (row >= *p.num_padded || p.sorted_pairs[row] < 0)) continue;
        const int word = (int)(i % words_per_row);
        const int q = word & 7;
        const int col = (word >> 3) * 32 + 16 * (q >> 2) + 2 * (q & 3);
        const bf16 *x = p.x + row * p.x_stride + col;
        const float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(x));
        const float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162 *>(x + 8));
        const uint32_t packed = f32x2_to_e4m3x2(lo.x * p.inv_scale, lo.y * p.inv_scale) |
                                (f32x2_to_e4m3x2(hi.x * p.inv_scale, hi.y * p.inv_scale) << 16);
        reinterpret_cast<uint32_t *>(p.out)[i] = packed;
    }
}

// out[t] = bf16(shared_out[t] + sum_j pair_out[t*k + j]) for the locally computed j, in increasing j.
// Thread mapping: one block per token, threads stride over the columns 4 at a time (float4).
// Bytes: reads (k + 1) * dim * 4, writes dim * 2 per token. No atomics: bit-identical across runs.
extern "C" __global__ void moe_combine(const MoeCombineParams p) {
    const int token = blockIdx.x;
    if (token >= p.tokens) return;
    for (int col = threadIdx.x * 4; col < p.dim; col += blockDim.x * 4) {
        float4 sum = make_float4(0.f, 0.f, 0.f, 0.f);
        if (p.shared_out != nullptr) sum = *reinterpret_cast<const float4 *>(p.shared_out + (long)token * p.dim + col);
        for (int j = 0; j < p.top_k; ++j) {
            const int pair = token * p.top_k + j;
            const int id = p.topk_ids[pair];
            if (id < 0 || id >= p.experts || (p.expert_map != nullptr && p.expert_map[id] < 0)) continue;
            const float4 v = *reinterpret_cast<const float4 *>(p.pair_out + (long)pair * p.dim + col);
            sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
        }
        __nv_bfloat162 lo = __floats2bfloat162_rn(sum.x, sum.y), hi = __floats2bfloat162_rn(sum.z, sum.w);
        uint2 packed = make_uint2(*reinterpret_cast<uint32_t *>(&lo), *reinterpret_cast<uint32_t *>(&hi));
        *reinterpret_cast<uint2 *>(p.out + (long)token * p.dim + col) = packed;
    }
}
