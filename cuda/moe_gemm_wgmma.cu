// Grouped expert GEMM (and the dense GEMM) on Hopper's wgmma, warp-specialised, with bf16, int4 or nvfp4 weights: the
// prefill tile of cuda/moe_gemm.cu ("tiled": 128 output features x 64 pair slots) with the same parameters, semantics
// and epilogues (SwiGLU act for the up-projection, f32 rows by pair times the routing weight for the down-projection,
// plain bf16 or f32 rows in dense mode, batched dense mode over grid z, per-row output scales such as nvfp4's global
// divisor; then the query RoPE and the row finisher of cuda/include/gemm_epilogue.cuh, with every thread, producer
// warps included). Only the k loop differs. One body for the three formats, the two activation producers and the three
// block widths (template on Format, kTmaX and kSlotTiles), eighteen entries: moe_gemm_{bf16,int4,nvfp4}_wgmma
// (grouped mode, and dense mode when src/kernels/moe_wgmma.rs is told to gather) gather the activation rows;
// moe_gemm_{bf16,int4,nvfp4}_wgmma_dense (dense mode only) load them with TMA through the map of MoeGemmTmaParams;
// the same six with _wide_ (moe_gemm_bf16_wide_wgmma, ..._wide_wgmma_dense) work 192 slots a block instead of 64,
// and with _wide256_ 256 slots, with a producer warpgroup (below).
//
// Computes, for each row (a (token, expert) pair in grouped mode, a token in dense mode) and each output feature n of
// the row's expert e:  y[row, n] = sum_k x[src(row), k] * W_e[n, k], W dequantised to bf16 in registers (W4A16 for
// int4 and nvfp4: w = (q - zero) * group scale, resp. e2m1 * e4m3 scale per 16 k, as weight_format.cuh does for the
// mma.sync kernels; the same bits).
//
// Operands ("swap A/B" as in moe_gemm.cu): wgmma's A (M = 64 rows per warpgroup) is the WEIGHTS, from registers: each
// warp holds its 16 rows in the repacked fragment order of src/quant/repack.rs, which is the mma.sync m16n8k16 A
// fragment and therefore wgmma's register-A fragment of that warp's rows (no new weight layout, no second copy); 4-bit
// weights are that fragment's elements packed 8 to a word, dequantised by WeightFormat<F>::fragment into the bf16
// registers. B is the activation rows of one 64-slot tile of the block (N = 64), K-major in shared memory with the
// 128-byte swizzle, read through a matrix descriptor. Each 64-k stage is four m64n64k16 bf16 wgmmas per consumer
// warpgroup and slot tile holding real slots, whatever the weight format: the wide kernels feed one A fragment (one
// load and dequantisation of the weights) to up to three (BN 192) or four (BN 256) slot tiles.
//
// Schedule: persistent over tiles (DeepGEMM's and fast.cu's). A work tile is 128 features by BN slots of one matrix;
// the launch's tile space holds work tiles only, feature tile fastest: dense, (feature tile, row block) per matrix
// (grid z); grouped, (feature tile, expert group), expert e's slots from expert_offsets (the router's device data)
// making ceil(slots_e / BN) groups, so empty experts and the tiles of a group after its first take no block. The 32
// feature tiles of a group run side by side on the SMs and read its activation rows from L2. The grid is the blocks
// resident at once (moe_wgmma.rs: 132 SMs x blocks per SM, per matrix), block b walking tiles b, b + gridDim.x, ...
// The first producer warp maps each index to its tile (grouped: a GroupWalker, wgmma_gemm.cuh, scans the experts'
// group counts once into shared memory and binary-searches them) and fills the tile's slot tables (slot_pair,
// slot_src) and TileWork in one of two buffers, arriving on the buffer's "tile full" mbarrier; consumers (and the
// other gathering producer warps) wait on it and release the buffer on its "tile empty" mbarrier once done with the
// tables (consumers: after the epilogue), which the producer waits for before refilling it two tiles later. So the
// producer runs ahead into the next tile's loads while the consumers finish the previous tile's stages and epilogue,
// with no block barrier between tiles. The stage ring is carried across tiles: use u of the ring (the block's running
// k-block count) is stage u % STAGES, phase u / STAGES, its barriers initialised once. The gather producers drain
// their cp.async groups at each tile's end (a tile may have fewer k blocks than the groups in flight, and the
// consumers' release of a table can wait on those stages). Launches with a finishing step (the query RoPE, the row
// finisher) get one tile per block and finish it after the walk with every thread, as before.
//
// Thread mapping: 9 warps (BN 64, 192) or 12 (BN 256). Warps 0-7 are two consumer warpgroups; warp w owns weight
// tile first_tile + w (16 features) of the current tile, warpgroup g the features 64 g .. 64 g + 63 of it, all its
// slots. Warp 8 is the producer (BN 256: the first of the producer warpgroup, warps 8-11, see "Registers"): lanes 0-7
// each copy one weight tile's bytes of a stage (2 KiB bf16, 512 B 4-bit) with cp.async.bulk (contiguous in the
// repacked layout), and for 4-bit weights the next lanes each copy one piece of a tile's scales of the stage
// (weight_format.cuh scale_piece: nvfp4 64 bytes, lanes 8-15; int4 32 bytes of scales, lanes 8-15, and 16 of zero
// points, lanes 16-23), all completing as transaction bytes on the stage's "full" mbarrier, where the stage's one
// expect_tx counts them. Its single-lane work (expect_tx, arrivals, the TMA issue) is done by the lane
// elect_one_sync picks. The activations:
// - gather (grouped entries): all 32 lanes of every producer warp gather the stage's activation rows (picked through
//   sorted_pairs / top_k, so TMA tile loads do not apply) with 16-byte cp.async into the swizzled layout (BN 256: the
//   four warps take every fourth pass of 4 lines each), and once a warp's cp.async group of a stage has landed (each
//   keeps STAGES - 1 stages in flight) it fences it for the async proxy and arrives on "full" (1 + producer warps
//   arrivals complete a phase: the expect_tx one and one per gathering warp). A padding slot's copies read nothing
//   and zero-fill its line (src-size 0), so the copy loop has no branch.
// - TMA (_dense entries): the elected lane of warp 8 (the other producer warps idle) issues one
//   cp.async.bulk.tensor.3d per stage and slot tile holding real slots, the box {64 k, 64 rows,
//   1 matrix} at (k block, first row, grid z) of the 3-d map {k_dim, dense_rows, heads}; the TMA unit writes it in the same
//   128-byte swizzled layout, zero-fills the rows past dense_rows (the tail block) and completes its 8 KiB as
//   transaction bytes on "full" beside the weights' (one arrival, expect_tx of the whole stage: the format's weight
//   and scale bytes plus 8 KiB, completes a phase).
// Consumers wait on "full", read their tile's scales of the stage from the ring (staged_scales, 4-bit: the bytes the
// mma.sync kernel stages, so no global load is left on the k loop's chain), load their weight words (one 16-byte
// ld.shared per lane per k-step for bf16, per stage for 4-bit), turn them into A fragments, issue the stage's wgmmas,
// and after the next stage's wgmmas are issued retire this one (wait_group 1: A registers double-buffered) and release
// its "empty" mbarrier (one arrival per consumer warp), on which the producer waits before refilling the stage.
//
// Registers (BN 256): the 4 x 32 f32 accumulators a thread, the two A fragments and the stage's weight words do not
// fit the 168 registers a block of 288 or 384 threads alone on an SM starts with (ptxas spilled 240 bytes a thread
// at 288, docs/perf.md "Grouped wgmma GEMM: tile and schedule"). So the
// producer is a whole warpgroup, which setmaxnreg can shrink: it drops to 48 registers (40 until the persistent walk,
// whose per-tile state spilled there), the consumers rise to 232 ((4 x 48 + 8 x 232) x 32 = 65,536), ptxas allocating
// each role's code within its count; the walk keeps its state in shared memory and the gather unrolls four copies
// instead of eight to fit. Before the block's finish (every thread) the consumers give back down to 168 and the
// producers take back up to it (their inc waits until the consumers' registers are free).
//
// Tiling: BM 128 features x BN 64 slots per block (wide: 192 or 256, three or four 64-slot tiles), BK 64 per stage
// (weight_format.cuh's kBK). Stages as fit in 96 KiB, at most 8: bf16 4 stages of 24 KiB (16 KiB weights, 8 KiB
// activations), 4-bit 8 stages of 12 KiB (4 KiB weights, 8 KiB activations); plus the staged scales (4-bit: 384 or
// 512 bytes a stage, on top of the budget as in the mma.sync kernel) and barriers: two blocks per SM. Wide: one block
// per SM (192: 96 accumulators a thread, within the 168 registers ptxas gives a block of 288 threads; 256: 128, see
// "Registers"), stages as fit in 192 KiB: 192 slots bf16 4 of 40 KiB, 4-bit 6 of 28 KiB; 256 slots bf16 4 of 48 KiB,
// 4-bit 5 of 36 KiB; plus the two tile buffers and the group walker's 1 KiB. Tiles as the tiled mma.sync kernel's
// blocks (grouped: an expert's BN-slot group; dense: BN rows), walked persistently (above). The slot tiles past a
// tile's last real slot are neither loaded nor multiplied.
//
// Bytes (per tile): 128 weight rows x K x 2 bf16 / 0.5 4-bit (each weight once per BN slots; plus the 4-bit scales:
// int4 2 bytes (+1 zero) per row and k-group, nvfp4 1 byte per row and 16 k), up to BN activation rows x K x 2, the
// outputs once (SwiGLU: BN x 64 bf16; down: BN x 128 f32). FLOPs: 2 x 128 x 64 x K per slot tile with real slots on
// the tensor cores (padding slots included), plus for 4-bit the dequantisation on the CUDA cores: 128 x K weights per
// tile, about one bf16x2 instruction pair (int4) or two f32 multiplies and a convert (nvfp4) per two weights.
#include "params.h"
#include "common.cuh"
#include "gemm_epilogue.cuh"
#include "hopper.cuh"
#include "mma.cuh"
#include "weight_format.cuh"
#include "wgmma_gemm.cuh"

namespace {

// The stage ring of weight format F and kSlotTiles 64-slot tiles per block (wgmma_gemm.cuh's layout): as many stages
// as fit in 192 KiB shared by the SM's blocks (BN 64: two blocks per SM, 96 KiB each; BN 192 and 256: one block,
// whose 96 or 128 accumulator registers a thread leave no room for a second), at most 8 (BN 64: bf16 4 stages of
// 24 KiB, 4-bit 8 of 12 KiB, the weights being a quarter of the bf16 bytes; BN 192: bf16 4 of 40 KiB, 4-bit 6 of
// 28 KiB; BN 256: bf16 4 of 48 KiB, 4-bit 5 of 36 KiB), plus the 8
// warps' staged scales of a stage (none for bf16) on top. moe_wgmma.rs computes the same sizes.
template <Format F, int kSlotTiles> struct RingShape {
    static constexpr int kBlocksPerSm = kSlotTiles == 1 ? 2 : 1;
    static constexpr int kWStage = kConsumerWarps * WeightFormat<F>::kTileBytes;  // the 8 warps' weight tiles of a stage
    static constexpr int kStageBytes = kWStage + kSlotTiles * kXStage;
    static constexpr int kFit = 192 * 1024 / kBlocksPerSm / kStageBytes;
    static constexpr int kStages = kFit > 8 ? 8 : kFit;
};
template <Format F, int kSlotTiles>
struct Ring : GemmRing<RingShape<F, kSlotTiles>::kStages, RingShape<F, kSlotTiles>::kWStage, kConsumerWarps * WeightFormat<F>::kScaleBytes, kSlotTiles,
                       RingShape<F, kSlotTiles>::kBlocksPerSm, 2> {
    static_assert(kXRowBytes == kBK * 2, "a stage's activation line is 64 bf16 of k");
    static_assert(WeightFormat<F>::kTileBytes % 512 == 0, "a lane's share of a tile is whole 16-byte chunks");
    static_assert(WeightFormat<F>::kScaleBytes % 16 == 0, "bulk copies land on 16-byte boundaries");
    static_assert(kConsumerWarps * (1 + WeightFormat<F>::kScalePieces) <= 32, "one producer lane per tile and scale piece");
};

// The block's warp roles for kSlotTiles slot tiles: 8 consumer warps and a producer warp (BN 64 and 192), or, for
// BN 256, a producer WARPGROUP: the four warps share the gather, and being a whole warpgroup they can give registers
// away with setmaxnreg. A block of 384 threads alone on an SM starts with 168 registers a thread (64 Ki / 384, in
// steps of 8); the producers drop to 48 and the consumers rise to 232, which hold the 4 x 32 accumulators, the two
// A fragments and the stage's weight words ((4 x 48 + 8 x 232) x 32 = 65,536). With one producer warp the
// block of 288 threads is capped at 168 registers too, at which four slot tiles spilled.
template <int kSlotTiles> struct BlockRoles {
    static constexpr int kProducerWarps = kSlotTiles == 4 ? 4 : 1;
    static constexpr int kThreads = (kConsumerWarps + kProducerWarps) * 32;
    static constexpr bool kMovesRegisters = kProducerWarps == 4;
    static constexpr int kEntryRegisters = 65536 / kThreads / 8 * 8;  // one block per SM
    static constexpr int kProducerRegisters = 48;
    static constexpr int kConsumerRegisters = 232;
    // The gather's copies per unrolled pass (wgmma_gemm.cuh gather_stage_rows): four at 48 registers, where the
    // persistent walk's state and the 4-bit weights' scale pieces leave no room for eight.
    static constexpr int kGatherUnroll = kMovesRegisters ? 4 : 8;
    static_assert(!kMovesRegisters || (kProducerWarps * kProducerRegisters + kConsumerWarps * kConsumerRegisters) * 32 <= 65536, "the SM's registers");
    static_assert(!kMovesRegisters || kEntryRegisters * kThreads <= 65536, "every warp back at the entry count for the block's finish");
};

// The block's shared memory as the persistent walk uses it (wgmma_gemm.cuh PersistentSmem in Ring's layout).
template <Format F, int kSlotTiles> using BlockSmem = PersistentSmem<Ring<F, kSlotTiles>>;

template <Format F, int kSlotTiles>
__device__ __forceinline__ void consume_tiles(const MoeGemmParams &p, const BlockSmem<F, kSlotTiles> &sm, int k_blocks);

// kTmaX: the _dense entries (activations by TMA through x_map); else the gather (x_map unused). kSlotTiles: 64-slot
// tiles per block (1; 3 for the _wide entries, 4 for the _wide256 ones).
template <Format F, bool kTmaX, int kSlotTiles>
__device__ __forceinline__ void grouped_gemm_wgmma(const MoeGemmParams &p, const void *x_map) {
    using R = Ring<F, kSlotTiles>;
    using W = WeightFormat<F>;
    using Roles = BlockRoles<kSlotTiles>;
    constexpr int kStages = R::kStages, kWStage = R::kWStage, kSStage = R::kSStage, kInFlight = R::kInFlight;
    constexpr int kSlots = R::kSlots, kXBlockStage = R::kXBlockStage;
    constexpr int kTileBytes = W::kTileBytes;
    extern __shared__ __align__(1024) unsigned char smem[];
    const BlockSmem<F, kSlotTiles> sm(smem);
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    // The _dense entries serve dense launches only (TMA loads the matrix's rows in order; moe_wgmma.rs launches them
    // for nothing else), so they compile no grouped branch.
    const bool grouped = !kTmaX && p.sorted_pairs != nullptr;
    // Tables read per tile: "tile empty" waits for the consumer warps and the gathering producer warps other than the
    // first (which writes them, in program order after its own reads).
    constexpr int kTableReaders = kConsumerWarps + (kTmaX ? 0 : Roles::kProducerWarps - 1);
    // "full": the producer's expect_tx arrival (+ one "activations landed" arrival per gathering producer warp).
    if (tid == 0) init_persistent_block(sm, kTmaX ? 1 : 1 + Roles::kProducerWarps, kTableReaders);
    __syncthreads();

    const int feature_tiles = p.rows_padded / kBM;
    const int k_blocks = p.k_dim / kBK;

    // (With one producer warp the test and `producer` are written so that the compiler sees warp 8 alone and producer 0.)
    if (Roles::kProducerWarps == 1 ? warp == kProducerWarp : warp >= kProducerWarp) {
        if constexpr (Roles::kMovesRegisters) setmaxnreg_dec<Roles::kProducerRegisters>();
        // Producer warp `producer` of the block's Roles::kProducerWarps: the first maps the block's tiles and fills
        // their tables, and issues each stage's expect_tx, its weight copies and (TMA) its boxes; all of them share
        // the gather. With TMA the others have nothing to do.
        const int producer = Roles::kProducerWarps == 1 ? 0 : warp - kProducerWarp;
        if (!kTmaX || producer == 0) {
            GroupWalker<kSlots> walker(sm.prefix);
            const unsigned char *x = reinterpret_cast<const unsigned char *>(p.x + (long)blockIdx.z * p.x_batch_stride);
#pragma unroll 1
            for (int j = 0;; ++j) {
                // The block's j-th tile (wgmma_gemm.cuh publish_tile); the k blocks of its earlier tiles are the
                // ring's uses so far (derived from j: the BN 256 producers run at 48 registers).
                const int kb_done = j * k_blocks;
                const int buf = j & 1;
                const int *slot_src = sm.slot_src + buf * kSlots;
                const TileWork work = producer == 0 ? publish_tile<!kTmaX>(p, sm, walker, j, feature_tiles, grouped) : wait_tile(sm, j);
                if (work.expert < 0) break;

                // From here the tile's work is read back from its buffer where needed (after each wait, so the compiler
                // keeps none of it in registers through the k loop: the BN 256 producers run at 48).
                const TileWork *tile_work = sm.tiles + buf;
                // The first producer warp's lanes 0-7: the 8 warps' weight tiles of k block kb into `stage`; the next
                // lanes: one piece of a tile's scales each (4-bit); all completing on the stage's "full".
                auto load_weights = [&](int kb, int stage) {
                    const int expert = tile_work->expert, first_tile = tile_work->feature_tile * (kBM / 16);
                    if (lane < kConsumerWarps) {
                        const unsigned char *src = p.weights.data + (long long)expert * p.expert_stride + ((long long)(first_tile + lane) * k_blocks + kb) * kTileBytes;
                        bulk_load(sm.w + stage * kWStage + lane * kTileBytes, src, kTileBytes, &sm.full[stage]);
                    } else if (lane < kConsumerWarps * (1 + W::kScalePieces)) {
                        const int tile = lane % kConsumerWarps, piece = lane / kConsumerWarps - 1;
                        int offset, bytes;
                        const void *src = W::scale_piece(p, p.weights, expert, first_tile + tile, kb, piece, offset, bytes);
                        if (src != nullptr) bulk_load(sm.s + stage * kSStage + tile * W::kScaleBytes + offset, src, bytes, &sm.full[stage]);
                    }
                };
                // The bytes those copies bring per stage (the same every stage: whether a piece exists does not depend
                // on k).
                auto weight_stage_bytes = [&]() {
                    int bytes = kWStage;
                    for (int piece = 0; piece < W::kScalePieces; ++piece) {
                        int offset, piece_bytes;
                        if (W::scale_piece(p, p.weights, tile_work->expert, tile_work->feature_tile * (kBM / 16), 0, piece, offset, piece_bytes) != nullptr) {
                            bytes += kConsumerWarps * piece_bytes;
                        }
                    }
                    return bytes;
                };
                // The slot tiles holding the tile's slots: the others are neither loaded nor multiplied.
                auto slot_tiles = [&]() { return (tile_work->slots + kBN - 1) / kBN; };
                if constexpr (kTmaX) {
                    for (int kb = 0; kb < k_blocks; ++kb) {
                        const int use = kb_done + kb, stage = use % kStages;
                        ring_wait_empty<kStages>(sm.empty, use);
                        if (elect_one_sync()) {
                            const int boxes = slot_tiles();
                            mbar_arrive_expect_tx(&sm.full[stage], weight_stage_bytes() + boxes * kXStage);
                            for (int t = 0; t < boxes; ++t) {
                                tma_load_3d(sm.x + stage * kXBlockStage + t * kXStage, x_map, kb * kBK, tile_work->slot_begin + t * kBN, blockIdx.z, &sm.full[stage]);
                            }
                        }
                        __syncwarp();
                        load_weights(kb, stage);
                    }
                } else {
                    for (int kb = 0; kb < k_blocks; ++kb) {
                        const int use = kb_done + kb, stage = use % kStages;
                        cp_async_ring_arrive_landed<kStages, kInFlight>(sm.full, use, kb_done);
                        ring_wait_empty<kStages>(sm.empty, use);
                        if (producer == 0) {
                            if (elect_one_sync()) mbar_arrive_expect_tx(&sm.full[stage], weight_stage_bytes());
                            __syncwarp();
                            load_weights(kb, stage);
                        }
                        gather_stage_rows<Roles::kGatherUnroll>(slot_src, smem_addr(sm.x + stage * kXBlockStage), x + kb * kBK * 2, (long)p.x_stride * 2, slot_tiles() * kBN, producer,
                                          Roles::kProducerWarps);
                        cp_async_commit();
                    }
                    // The tile's copies all land before the next tile's table is written: the consumers' release of a
                    // table two tiles back may wait on these stages (a tile of fewer k blocks than kInFlight).
                    cp_async_ring_arrive_rest<kStages, kInFlight>(sm.full, kb_done + k_blocks, kb_done);
                    mbar_arrive_if(&sm.tile_empty[buf], producer != 0 && lane == 0);
                }
            }
        }
        // Back to the entry count for the block's finish below (waits until the consumers have given theirs back).
        if constexpr (Roles::kMovesRegisters) setmaxnreg_inc<Roles::kEntryRegisters>();
    } else {
        if constexpr (Roles::kMovesRegisters) setmaxnreg_inc<Roles::kConsumerRegisters>();
        consume_tiles<F, kSlotTiles>(p, sm, k_blocks);
        if constexpr (Roles::kMovesRegisters) setmaxnreg_dec<Roles::kEntryRegisters>();
    }
    // Launches with a finishing step (dense query RoPE, row finisher): every thread, producers included, finishes the
    // block's one tile.
    finish_block_tile<true>(p, sm);
}

// The consumer warps' walk: per tile, the k loop and the epilogue (see the file comment).
template <Format F, int kSlotTiles>
__device__ __forceinline__ void consume_tiles(const MoeGemmParams &p, const BlockSmem<F, kSlotTiles> &sm, int k_blocks) {
    using W = WeightFormat<F>;
    using R = Ring<F, kSlotTiles>;
    constexpr int kStages = R::kStages, kWStage = R::kWStage, kSStage = R::kSStage, kXBlockStage = R::kXBlockStage, kSlots = R::kSlots;
    constexpr int kRawWords = W::kTileBytes / 32 / 4;  // the lane's words of its warp's tile of a stage
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int kb_done = 0;  // the ring's uses by the block's earlier tiles
#pragma unroll 1
    for (int j = 0;; ++j) {
        const int buf = j & 1;
        const TileWork work = wait_tile(sm, j);
        if (work.expert < 0) return;
        const int tile = work.feature_tile * (kBM / 16) + warp;
        // The slot tiles holding real slots (uniform over the block): the wgmmas of the others are not issued.
        const int slot_tiles = (work.slots + kBN - 1) / kBN;
        // acc[t][4 f + r] is the mma.sync C fragment r of slot fragment f (slots 64 t + 8 f .. + 7) of this warp's 16
        // features: r = 0, 1 feature g, slots 2t, 2t + 1; r = 2, 3 feature g + 8.
        float acc[kSlotTiles][32];
#pragma unroll
        for (int t = 0; t < kSlotTiles; ++t) {
#pragma unroll
            for (int i = 0; i < 32; ++i) acc[t][i] = 0.f;
#pragma unroll
            for (int i = 0; i < 32; ++i) wgmma_fence_operand(acc[t][i]);
        }

        // One stage (k block kb, the ring's use kb_done + kb): wait for it, load the warp's weights of the stage and
        // turn them into A fragments in `a` (the buffer the wgmmas of two stages ago used, retired by the previous
        // stage's wait_group 1) with the weight format's own dequantisation (weight_format.cuh, as the mma.sync
        // kernels do; bf16 copies), issue the four wgmmas per slot tile (one A fragment feeds the block's slot tiles:
        // the weights are loaded and dequantised once per BN slots), retire the previous stage of the tile and release
        // it. The stage's scales (none for bf16) landed in the ring with its weights, read after the wait like them
        // (the 4-bit kernels sit at ptxas's 96-register cap for 2 blocks of 288 threads).
        auto consume = [&](int kb, uint32_t (&a)[4][4]) {
            const int use = kb_done + kb, stage = use % kStages;
            ring_wait_full<kStages>(sm.full, use);
            const typename W::Scales scales = W::staged_scales(p.weights, sm.s + stage * kSStage + warp * W::kScaleBytes, lane >> 2);
            const unsigned char *w_tile = sm.w + stage * kWStage + warp * W::kTileBytes;
            uint32_t raw[kRawWords];
#pragma unroll
            for (int c = 0; c < kRawWords / 4; ++c) {
                const uint4 v = *reinterpret_cast<const uint4 *>(w_tile + (c * 32 + lane) * 16);
                raw[4 * c] = v.x, raw[4 * c + 1] = v.y, raw[4 * c + 2] = v.z, raw[4 * c + 3] = v.w;
            }
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) W::fragment(raw, ks, scales, a[ks]);
            const unsigned char *x_stage = sm.x + stage * kXBlockStage;
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < 4; ++ks) {
#pragma unroll
                for (int t = 0; t < kSlotTiles; ++t) {
                    if (t < slot_tiles) wgmma_m64n64k16_bf16_rs(acc[t], a[ks], wgmma_desc_k_sw128(x_stage + t * kXStage + ks * 32));
                }
            }
            wgmma_commit();
            wgmma_wait<1>();
            if (kb > 0) {
                __syncwarp();
                if (lane == 0) mbar_arrive(&sm.empty[(use - 1) % kStages]);
            }
        };
        uint32_t a0[4][4], a1[4][4];
        int kb = 0;
#pragma unroll 1
        for (; kb + 1 < k_blocks; kb += 2) {
            consume(kb, a0);
            consume(kb + 1, a1);
        }
        if (kb < k_blocks) consume(kb, a0);
        wgmma_wait<0>();
        // The tile's last stage is retired too: release it for the next tile's loads (none when K is 0).
        kb_done += k_blocks;
        __syncwarp();
        mbar_arrive_if(&sm.empty[(kb_done + kStages - 1) % kStages], lane == 0 && k_blocks > 0);
#pragma unroll
        for (int t = 0; t < kSlotTiles; ++t) {
#pragma unroll
            for (int i = 0; i < 32; ++i) wgmma_fence_operand(acc[t][i]);
        }

        // Epilogue: moe_gemm.cu's, for one 16-feature tile per warp and slot tile (gemm_epilogue.cuh); then the
        // warps are done with the tile's table. The consumer warps meet at a named barrier first: the epilogue's
        // per-slot tests split each warp's lanes, and the barrier is where they reconverge before the next tile's
        // wgmmas, wherever the compiler places the loop's end.
        const int *slot_pair = sm.slot_pair + buf * kSlots;
#pragma unroll
        for (int t = 0; t < kSlotTiles; ++t) {
            if (t < slot_tiles) store_wgmma_warp_tile(p, acc[t], slot_pair + t * kBN, work.expert, tile, work.slot_begin + t * kBN, min(kBN, work.slots - t * kBN));
        }
        named_barrier_sync<1, kConsumerWarps * 32>();
        mbar_arrive_if(&sm.tile_empty[buf], lane == 0);
    }
}

}  // namespace

// BN 64: two blocks per SM (96 KiB of stages each): ptxas gets at most 96 registers a thread, which the 4-bit kernels
// use (docs/perf.md's ptxas table). BN 192 (_wide): one block of 288 threads per SM, 168 registers a thread. BN 256
// (_wide256): one block of 384 threads per SM, 168 at entry, then 48 (producers) and 232 (consumers) by setmaxnreg,
// which needs the entry count from __launch_bounds__. One kernel per weight format, activation producer and BN, one
// body. The _dense entries take the
// struct as __grid_constant__, which keeps it (and so the map) in the parameter space, where TMA may read it.
#define MOE_GEMM_WGMMA_KERNELS(NAME, FORMAT, WIDTH, SLOT_TILES)                                                            \
    extern "C" __global__ void __launch_bounds__(BlockRoles<SLOT_TILES>::kThreads, SLOT_TILES == 1 ? 2 : 1)                 \
        moe_gemm_##NAME##WIDTH##_wgmma(const MoeGemmParams p) {                                                            \
        grouped_gemm_wgmma<FORMAT, false, SLOT_TILES>(p, nullptr);                                                         \
    }                                                                                                                      \
    extern "C" __global__ void __launch_bounds__(BlockRoles<SLOT_TILES>::kThreads, SLOT_TILES == 1 ? 2 : 1)                 \
        moe_gemm_##NAME##WIDTH##_wgmma_dense(const __grid_constant__ MoeGemmTmaParams p) {                                 \
        grouped_gemm_wgmma<FORMAT, true, SLOT_TILES>(p.gemm, &p.x_map);                                                    \
    }

MOE_GEMM_WGMMA_KERNELS(bf16, Format::Bf16, , 1)
MOE_GEMM_WGMMA_KERNELS(int4, Format::Int4, , 1)
MOE_GEMM_WGMMA_KERNELS(nvfp4, Format::Nvfp4, , 1)
MOE_GEMM_WGMMA_KERNELS(bf16, Format::Bf16, _wide, 3)
MOE_GEMM_WGMMA_KERNELS(int4, Format::Int4, _wide, 3)
MOE_GEMM_WGMMA_KERNELS(nvfp4, Format::Nvfp4, _wide, 3)
MOE_GEMM_WGMMA_KERNELS(bf16, Format::Bf16, _wide256, 4)
MOE_GEMM_WGMMA_KERNELS(int4, Format::Int4, _wide256, 4)
MOE_GEMM_WGMMA_KERNELS(nvfp4, Format::Nvfp4, _wide256, 4)
