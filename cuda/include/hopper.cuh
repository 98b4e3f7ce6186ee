// PTX wrappers for the sm_90a kernels: mbarriers, bulk copies (cp.async.bulk) and TMA tile loads
// (cp.async.bulk.tensor), proxy fences and wgmma.
// One definition each (../shared/HOPPER-ASYNC.md has the semantics; tools/ptxsim runs and checks all of them).
#pragma once
#include <stdint.h>
#include "mma.cuh"

// ---- mbarrier ------------------------------------------------------------------------------------------------------

// Initialises a barrier whose phase completes after `count` arrivals (plus any expected transaction bytes).
__device__ __forceinline__ void mbar_init(uint64_t *bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
// Makes this thread's barrier initialisations visible to the async proxy (the bulk copies' complete_tx).
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }

__device__ __forceinline__ void mbar_arrive(uint64_t *bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(smem_addr(bar)) : "memory");
}
// mbar_arrive by the lanes where `arrive` holds, predicated inside the instruction: no branch, so a warp whose lanes
// differ in `arrive` does not diverge (a divergent arrival at the end of a loop body lets the other lanes run ahead
// into the next iteration's warp collectives).
__device__ __forceinline__ void mbar_arrive_if(uint64_t *bar, bool arrive) {
    asm volatile("{\n.reg .pred P_ARRIVE;\nsetp.ne.b32 P_ARRIVE, %1, 0;\n@P_ARRIVE mbarrier.arrive.shared::cta.b64 _, [%0];\n}" ::"r"(smem_addr(bar)),
                 "r"((int)arrive)
                 : "memory");
}
// Named barrier kId (1-15; 0 is __syncthreads') for kThreads threads (a multiple of 32): a rendezvous of some of the
// block's warps, such as the consumer warpgroups of a warp-specialised kernel.
template <int kId, int kThreads> __device__ __forceinline__ void named_barrier_sync() {
    static_assert(kId > 0 && kId < 16 && kThreads % 32 == 0, "bar.sync's id and thread count");
    asm volatile("bar.sync %0, %1;" ::"n"(kId), "n"(kThreads) : "memory");
}
// Arrives and announces `bytes` more transaction bytes for the current phase (one arrival).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t *bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)), "r"(bytes) : "memory");
}
// Waits until the phase of parity `parity` has completed (CUTLASS / DeepGEMM's spin loop on try_wait).
__device__ __forceinline__ void mbar_wait(uint64_t *bar, unsigned parity) {
    asm volatile(
        "{\n"
        ".reg .pred P1;\n"
        "LAB_WAIT:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 P1, [%0], %1;\n"
        "@P1 bra DONE;\n"
        "bra LAB_WAIT;\n"
        "DONE:\n"
        "}\n" ::"r"(smem_addr(bar)),
        "r"(parity)
        : "memory");
}

// ---- warp leader ---------------------------------------------------------------------------------------------------

// True in one lane of the calling warp (all 32 lanes must call it together), false in the others: elect.sync's
// leader, the lane Hopper code gives a warp's single-thread work (mbarrier arrivals, expect_tx, TMA issues). PTX
// promises only a deterministic choice, not lane 0, so code never assumes which lane it is.
__device__ __forceinline__ bool elect_one_sync() {
    uint32_t leader;
    asm volatile(
        "{\n"
        ".reg .pred P_ELECTED;\n"
        "elect.sync _|P_ELECTED, 0xffffffff;\n"
        "selp.u32 %0, 1, 0, P_ELECTED;\n"
        "}\n"
        : "=r"(leader));
    return leader != 0;
}

// ---- register reallocation -----------------------------------------------------------------------------------------

// setmaxnreg: the calling warpgroup's registers per thread become kRegisters (a multiple of 8 in [24, 256]; all 4
// warps of the warpgroup run the same sequence, converged). A warp-specialised kernel's producer warpgroup gives
// registers back (dec) so that its consumer warpgroups can take them (inc, which waits until the SM's pool has them);
// ptxas then allocates each role's code within its count, and needs the count at entry (__launch_bounds__).
template <int kRegisters> __device__ __forceinline__ void setmaxnreg_inc() {
    static_assert(kRegisters >= 24 && kRegisters <= 256 && kRegisters % 8 == 0, "setmaxnreg's range");
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters> __device__ __forceinline__ void setmaxnreg_dec() {
    static_assert(kRegisters >= 24 && kRegisters <= 256 && kRegisters % 8 == 0, "setmaxnreg's range");
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// ---- bulk copies and proxy fences --------------------------------------------------------------------------------

// `bytes` (a multiple of 16, both addresses 16-byte aligned) global -> shared through the async proxy; completes as
// transaction bytes on `bar`.
__device__ __forceinline__ void bulk_load(void *dst_smem, const void *src_global, unsigned bytes, uint64_t *bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(smem_addr(dst_smem)),
                 "l"(src_global), "r"(bytes), "r"(smem_addr(bar))
                 : "memory");
}
// TMA tile load: the box of the 3-d tensor map `map` at element coordinates (c0 innermost, c1, c2) global -> shared
// at `dst_smem` (128-byte aligned; laid out and swizzled as the map says, out-of-bounds elements filled per the map),
// completing as the box's transaction bytes (out-of-bounds elements included) on `bar`. `map` must be a generic
// address of the param, const or global space: a field of a `const __grid_constant__` kernel parameter.
__device__ __forceinline__ void tma_load_3d(void *dst_smem, const void *map, int c0, int c1, int c2, uint64_t *bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];" ::"r"(smem_addr(dst_smem)),
        "l"(map), "r"(c0), "r"(c1), "r"(c2), "r"(smem_addr(bar))
        : "memory");
}
// Orders this thread's generic-proxy shared-memory writes (st.shared, cp.async) before later async-proxy reads
// (wgmma operands) of the same bytes.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// 4 bytes global -> shared at a shared-memory address when `valid`, else 4 zero bytes with nothing read (the src-size
// form: a padding slot's activation scale, without a branch). Lands at the matching cp_async_wait, like cp_async16.
__device__ __forceinline__ void cp_async4_zfill(uint32_t dst_addr, const void *src_global, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst_addr), "l"(src_global), "r"(valid ? 4 : 0) : "memory");
}

// ---- stage ring (producer warp -> consumer warps) -------------------------------------------------------------------

// The warp-specialised kernels' ring of kStages shared-memory stages: use j of the ring (k block or key tile j) fills
// stage j % kStages, whose "full" barrier completes phase j / kStages once the data landed and whose "empty" barrier
// completes it once every consumer released the stage.

// The producer's wait before refilling use j's stage: the consumers released use j - kStages (the first pass through
// the ring waits on the barriers' initial phase, which counts as completed).
template <int kStages>
__device__ __forceinline__ void ring_wait_empty(uint64_t *empty, int j) {
    mbar_wait(&empty[j % kStages], ((j / kStages) & 1) ^ 1);
}
// The consumers' wait for use j's data.
template <int kStages>
__device__ __forceinline__ void ring_wait_full(uint64_t *full, int j) {
    mbar_wait(&full[j % kStages], (j / kStages) & 1);
}

// cp.async cannot complete transactions on an mbarrier, so a producer warp that fills stages with it commits one
// group per use, keeps kInFlight groups in flight and, once the group of use j - kInFlight has landed, fences it for
// the async proxy (wgmma reads it) and arrives on that stage's "full" from the elected lane. Call with the whole warp
// before issuing use j; kInFlight = kStages - 1 is the most that cannot deadlock (one stage being read, one held by
// the consumers' lagging release). `first`: the first use since the warp last drained its groups with
// cp_async_ring_arrive_rest (a persistent kernel drains at the end of each tile and goes on counting uses).
template <int kStages, int kInFlight>
__device__ __forceinline__ void cp_async_ring_arrive_landed(uint64_t *full, int j, int first = 0) {
    if (j - first >= kInFlight) {
        cp_async_wait<kInFlight - 1>();  // use j - kInFlight has landed
        fence_proxy_async();
        __syncwarp();
        if (elect_one_sync()) mbar_arrive(&full[(j - kInFlight) % kStages]);
    }
}
// After the last of `uses` uses: every group has landed; arrives for the uses since `first` that
// cp_async_ring_arrive_landed did not, lane i for the i-th of them (at most kInFlight < 32), without a branch.
template <int kStages, int kInFlight>
__device__ __forceinline__ void cp_async_ring_arrive_rest(uint64_t *full, int uses, int first = 0) {
    static_assert(kInFlight <= 32, "a lane per use in flight");
    cp_async_wait<0>();
    fence_proxy_async();
    __syncwarp();
    const int j = max(first, uses - kInFlight) + (int)(threadIdx.x & 31);
    mbar_arrive_if(&full[(j < uses ? j : 0) % kStages], j < uses);
}

// ---- wgmma ---------------------------------------------------------------------------------------------------------

// The 128-byte swizzle every swizzled shared operand uses (TMA, wgmma): chunk bits 4-6 of the ABSOLUTE shared address
// XOR its 128-byte line bits 7-9. Code that writes a wgmma operand with ordinary stores or cp.async applies it to the
// address it writes, so the layout agrees with wgmma wherever the buffer starts.
__device__ __forceinline__ uint32_t swizzle128(uint32_t smem_address) { return smem_address ^ (((smem_address >> 7) & 7) << 4); }

// K-major operand with the 128-byte swizzle: rows of 128 bytes (64 bf16 of k), 8-row groups 1024 bytes apart (SBO),
// LBO unused (16 by convention), base offset 0 (the buffer starts on 1024 bytes). A K-advance of 16 bf16 adds 32
// bytes to the start.
__device__ __forceinline__ uint64_t wgmma_desc_k_sw128(const void *p) {
    const uint64_t a = smem_addr(p);
    return ((a & 0x3FFFF) >> 4) | (uint64_t(16 >> 4) << 16) | (uint64_t(1024 >> 4) << 32) | (1ull << 62);
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Waits until at most N committed wgmma groups of the warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(N) : "memory"); }

// CUTLASS's warpgroup_fence_operand: pins a register's value here, so the compiler neither sinks an accumulator's
// initialisation below wgmma.fence nor moves a read of it above the wait_group (ptxas would serialise the wgmmas,
// warning C7515, and the interpreter reports either).
__device__ __forceinline__ void wgmma_fence_operand(float &r) { asm volatile("" : "+f"(r)::"memory"); }

// d (64 x 64 f32, the warpgroup's accumulator fragment) += a (64 x 16 bf16 in registers: the mma.sync m16n8k16 A
// fragment of each warp's 16 rows) * b (16 x 64 bf16 from the descriptor, K-major).
__device__ __forceinline__ void wgmma_m64n64k16_bf16_rs(float d[32], const uint32_t a[4], uint64_t b_desc) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
        "{%32,%33,%34,%35}, %36, 1, 1, 1, 0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
          "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc));
}

// wgmma_fence_operand over a whole fragment set (N fragments of 4 registers): the attention kernels' accumulators,
// and their A operands written by ordinary code.
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&x)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_fence_operand(x[i][j]);
    }
}

// ---- wgmma with a run-time scale-d and a transposed B (the vision attention's) -------------------------------------

// N-major (MN-major) operand with the 128-byte swizzle, for a B of N = 64 16-bit elements per k: a row-major [k][64]
// tile of 128-byte rows, 8-row groups (8 k) 1024 bytes apart (SBO), LBO unused (one 64-element swizzle atom along N;
// 16 by convention), base offset 0 (the buffer starts on 1024 bytes). The bits are wgmma_desc_k_sw128's: the
// major-ness is the instruction's imm-trans-b, not a descriptor field. A K-advance of 16 rows adds 2048 bytes.
__device__ __forceinline__ uint64_t wgmma_desc_mn_sw128_n64(const void *p) { return wgmma_desc_k_sw128(p); }

// Pins an A-fragment register here (wgmma_fence_operand's u32 form): its last ordinary write stays before the next
// wgmma.fence.
__device__ __forceinline__ void wgmma_fence_operand(uint32_t &r) { asm volatile("" : "+r"(r)::"memory"); }
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(uint32_t (&x)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_fence_operand(x[i][j]);
    }
}

// The FA3-style consumer loop of the wgmma attention kernels (FA3's intra-warpgroup overlap) over `tiles` key tiles,
// S (NS fragments) and O (NO fragments) in registers, P double-buffered in pa0 / pa1:
//   tile 0:       S_0 issued and retired, softmax(0, pa0), rescale();
//   tile j >= 1:  with P_{j-1} in `previous`, S_j and P_{j-1} V_{j-1} in flight together (wait_group 1 retires S_j),
//                 the softmax of S_j into `next` while P_{j-1} V_{j-1} runs, then wait_group 0, release(j - 1) and
//                 rescale() of O to tile j's maxima: O's arithmetic is the serial order's,
//                 (O c_{j-1} + P_{j-1} V_{j-1}) c_j + P_j V_j;
//   last:         P V of the buffer the last softmax filled, release(tiles - 1).
// The two P buffers alternate so that each is a fixed set of registers (two tiles per trip). The kernel's parts:
// prepare_s() sets S before a tile's wgmmas (before the fence: an ordinary write of an accumulator after it would
// serialise the wgmmas), issue_s(j) / issue_pv(j, pa) issue and commit one wgmma group each, softmax(j, pa) turns S
// into P (and the rows' corrections), release(j) frees tile j's stage, rescale() applies the corrections to O.
template <int NS, int NO, int NP, class PrepareS, class IssueS, class IssuePv, class Softmax, class Release, class Rescale>
__device__ __forceinline__ void attention_tiles_overlapped(int tiles, float (&s)[NS][4], float (&o)[NO][4], uint32_t (&pa0)[NP][4], uint32_t (&pa1)[NP][4],
                                                           PrepareS &&prepare_s, IssueS &&issue_s, IssuePv &&issue_pv, Softmax &&softmax, Release &&release,
                                                           Rescale &&rescale) {
    prepare_s();
    wgmma_fence_operands(s);
    wgmma_fence();
    issue_s(0);
    wgmma_wait<0>();
    wgmma_fence_operands(s);
    softmax(0, pa0);
    rescale();
    auto step = [&](int j, uint32_t (&previous)[NP][4], uint32_t (&next)[NP][4]) {
        prepare_s();
        wgmma_fence_operands(s);
        wgmma_fence_operands(o);
        wgmma_fence_operands(previous);
        wgmma_fence();
        issue_s(j);
        issue_pv(j - 1, previous);
        wgmma_wait<1>();
        wgmma_fence_operands(s);
        softmax(j, next);
        wgmma_wait<0>();
        wgmma_fence_operands(o);
        release(j - 1);
        rescale();
    };
    auto finish = [&](uint32_t (&last)[NP][4]) {
        wgmma_fence_operands(o);
        wgmma_fence_operands(last);
        wgmma_fence();
        issue_pv(tiles - 1, last);
        wgmma_wait<0>();
        wgmma_fence_operands(o);
        release(tiles - 1);
    };
#pragma unroll 1
    for (int j = 1;; j += 2) {
        if (j >= tiles) {
            finish(pa0);
            break;
        }
        step(j, pa0, pa1);
        if (j + 1 >= tiles) {
            finish(pa1);
            break;
        }
        step(j + 1, pa1, pa0);
    }
}

// The consumer loop of the MLA prefill's wgmma kernel (cuda/mla_attention_wgmma.cu) over `tiles` key tiles: S runs
// one tile ahead. There S = Q K^T is twenty dependent k-steps (320 columns) and P V two, so S's chain, not the
// softmax's, is the longest part of a tile; with S double-buffered (s0 / s1, each a fixed set of registers: two tiles
// per trip) the wgmmas of S_{j+1} are in flight while the softmax of S_j, the rescale of O and P_j V_j run:
//   tile 0:       S_0 issued and retired;
//   tile j:       S_{j+1} issued (if any), softmax(j, S_j, pa), rescale() of O to tile j's maxima, O += P_j V_j
//                 issued, wait_group 0 (retires both), release(j): O's arithmetic is the serial order's,
//                 O c_j + P_j V_j, tile after tile.
// One P buffer suffices (P_j V_j retires within tile j). The kernel's parts: prepare_s(s) sets S before a tile's
// wgmmas, issue_s(j, s) / issue_pv(j, pa) issue and commit one wgmma group each, softmax(j, s, pa) turns S into P
// (and the rows' corrections), release(j) frees tile j's stage, rescale() applies the corrections to O.
template <int NS, int NO, int NP, class PrepareS, class IssueS, class IssuePv, class Softmax, class Release, class Rescale>
__device__ __forceinline__ void attention_tiles_s_ahead(int tiles, float (&s0)[NS][4], float (&s1)[NS][4], float (&o)[NO][4], uint32_t (&pa)[NP][4],
                                                        PrepareS &&prepare_s, IssueS &&issue_s, IssuePv &&issue_pv, Softmax &&softmax, Release &&release,
                                                        Rescale &&rescale) {
    auto start_s = [&](int j, float (&s)[NS][4]) {
        prepare_s(s);
        wgmma_fence_operands(s);
        wgmma_fence();
        issue_s(j, s);
    };
    // Tile j's softmax, rescale and P V (S_j retired in `current`), then the wait that retires everything in flight.
    auto finish_tile = [&](int j, float (&current)[NS][4], float (&next)[NS][4]) {
        softmax(j, current, pa);
        rescale();
        wgmma_fence_operands(o);
        wgmma_fence_operands(pa);
        wgmma_fence();
        issue_pv(j, pa);
        wgmma_wait<0>();
        wgmma_fence_operands(o);
        wgmma_fence_operands(next);
        release(j);
    };
    start_s(0, s0);
    wgmma_wait<0>();
    wgmma_fence_operands(s0);
#pragma unroll 1
    for (int j = 0;; j += 2) {
        if (j + 1 >= tiles) {
            finish_tile(j, s0, s1);
            break;
        }
        start_s(j + 1, s1);
        finish_tile(j, s0, s1);
        if (j + 2 >= tiles) {
            finish_tile(j + 1, s1, s0);
            break;
        }
        start_s(j + 2, s0);
        finish_tile(j + 1, s1, s0);
    }
}

// d (64 x 64 f32) = (accumulate ? d : 0) + a (64 x 16 bf16 in registers, the mma.sync A fragment of each warp's 16
// rows) * b (16 x 64 bf16 from the descriptor): K-major B with kTransB 0, N-major B (wgmma_desc_mn_sw128_n64) with
// kTransB 1. `accumulate` must be the same in every lane (scale-d is a warp-uniform predicate).
template <int kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_bf16_rs_scale_d(float d[32], const uint32_t a[4], uint64_t b_desc, bool accumulate) {
    asm volatile(
        "{\n"
        ".reg .pred scale_d;\n"
        "setp.ne.b32 scale_d, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
        "{%32,%33,%34,%35}, %36, scale_d, 1, 1, %38;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
          "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(int(accumulate)), "n"(kTransB));
}

// ---- wgmma on e4m3 (the fp8-activation GEMMs) ----------------------------------------------------------------------

// d (64 x 64 f32, the warpgroup's accumulator fragment) = (kAccumulate ? d : 0) + a (64 x 32 e4m3 in registers: the
// mma.sync m16n8k32 A fragment of each warp's 16 rows, weight_format.cuh fp8_weights_to_e4m3_a) * b (32 x 64 e4m3
// from the descriptor, K-major: a K-advance of 32 e4m3 adds 32 bytes to the start, as 16 bf16 do). The fp8 forms have
// no transpose operands (../shared/HOPPER-ASYNC.md §1.1). The tensor core's f32 sum of an fp8 product keeps fewer
// fraction bits than f32 (§1.6), which is why the callers promote each 128-k partial into an f32 accumulator.
template <int kAccumulate>
__device__ __forceinline__ void wgmma_m64n64k32_e4m3_rs(float d[32], const uint32_t a[4], uint64_t b_desc) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k32.f32.e4m3.e4m3 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
        "{%32,%33,%34,%35}, %36, %37, 1, 1;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
          "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
          "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]),
          "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "n"(kAccumulate));
}

// ---- wgmma for the MLA attention (cuda/mla_attention_wgmma.cu) -----------------------------------------------------

// N-major (MN-major) operand with the 128-byte swizzle for a B wider than one 64-element swizzle atom: 8-k-row groups
// (1024 bytes of one atom) SBO = 1024 apart, consecutive 64-element atoms along N `atom_stride` bytes apart (LBO),
// base offset 0 (every atom starts on 1024 bytes); used with imm-trans-b = 1. A K-advance of 16 rows adds 2048 bytes.
__device__ __forceinline__ uint64_t wgmma_desc_mn_sw128(const void *p, unsigned atom_stride) {
    const uint64_t a = smem_addr(p);
    return ((a & 0x3FFFF) >> 4) | (uint64_t((atom_stride & 0x3FFFF) >> 4) << 16) | (uint64_t(1024 >> 4) << 32) | (1ull << 62);
}

// d (64 x 32 f32) += a (64 x 16 bf16 from the descriptor, K-major) * b (16 x 32 bf16 from the descriptor, K-major).
__device__ __forceinline__ void wgmma_m64n32k16_bf16_ss(float d[16], uint64_t a_desc, uint64_t b_desc) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, "
        "%16, %17, 1, 1, 1, 0, 0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
          "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "l"(a_desc), "l"(b_desc));
}

// d (64 x 256 f32) += a (64 x 16 bf16 in registers: the mma.sync m16n8k16 A fragment of each warp's 16 rows) * b (16 x
// 256 bf16 from an N-major descriptor, wgmma_desc_mn_sw128; imm-trans-b = 1).
__device__ __forceinline__ void wgmma_m64n256k16_bf16_rs_trans_b(float d[128], const uint32_t a[4], uint64_t b_desc) {
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, "
        "{%128,%129,%130,%131}, %132, 1, 1, 1, 1;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]),
          "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),
          "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]),
          "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]),
          "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]),
          "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]),
          "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),
          "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]),
          "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]),
          "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]),
          "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc));
}
