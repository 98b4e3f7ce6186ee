// Cross-kernel L2 prefetch: a launch asks L2 to fetch bytes a LATER kernel of the decode step reads (its weights).
// (prefetch_l2_warp below is the same request for a warp's own later bytes: the decode GEMM's k range.)
//
// Why: at batch 1 a decode step alternates DRAM-bound GEMMs (the attention projections, the experts) with
// latency-bound kernels (the absorption GEMMs, MLA, the router) during which HBM idles. With the next GEMM's weights
// in L2 when it starts, that GEMM reads them at L2 bandwidth, and the idle DRAM time of the small kernels did the
// streaming. The weights are written by no kernel, so the prefetch is issued first thing, before
// griddepcontrol.wait (common.cuh's rule), and overlaps the previous kernel too. A hint: no result depends on it.
//
// Mapping: the ranges (params.h L2PrefetchRange) are cut into pieces of at most kL2PrefetchPiece bytes within a
// segment; piece c goes to block c % blocks, then thread (c / blocks) % blockDim.x of it, so every block of the grid
// issues about the same bytes (each SM's copy engine queues its own requests) and a thread issues at most a few.
// One cp.async.bulk.prefetch.L2 per piece (PTX ISA 8.0, sm_90: base and size on 16 bytes); nothing waits for it,
// nothing lands in shared memory, the launch may finish before the fetch does.
// Bytes: the ranges' bytes from DRAM into L2. FLOPs: none.
#pragma once
#include "params.h"

constexpr unsigned int kL2PrefetchPiece = 16 * 1024;

// One cp.async.bulk.prefetch.L2 of `bytes` at `addr` (both multiples of 16).
__device__ __forceinline__ void prefetch_l2_bulk(const unsigned char *addr, unsigned int bytes) {
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(addr), "r"(bytes) : "memory");
}

// One warp's own contiguous range (start and length multiples of 16) in kL2PrefetchPiece pieces, piece c issued by
// lane c % 32: the decode GEMM's warps ask L2 for the rest of their weight tile's k range before their wait
// (cuda/moe_gemm.cu decode_gemm), a few lanes each issuing one request.
__device__ __forceinline__ void prefetch_l2_warp(const unsigned char *base, unsigned int bytes, int lane) {
    for (unsigned int offset = lane * kL2PrefetchPiece; offset < bytes; offset += 32 * kL2PrefetchPiece) {
        prefetch_l2_bulk(base + offset, min(kL2PrefetchPiece, bytes - offset));
    }
}

__device__ __forceinline__ void prefetch_l2(const L2Prefetch &p) {
    const long long blocks = (long long)gridDim.x * gridDim.y * gridDim.z;
    const long long block = blockIdx.x + (long long)gridDim.x * (blockIdx.y + (long long)gridDim.y * blockIdx.z);
    const long long step = blocks * blockDim.x;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const L2PrefetchRange range = p.range[r];
        if (range.segment_bytes == 0) continue;
        const long long pieces_per_segment = (range.segment_bytes + kL2PrefetchPiece - 1) / kL2PrefetchPiece;
        const long long pieces = pieces_per_segment * range.segments;
        for (long long c = block + threadIdx.x * blocks; c < pieces; c += step) {
            const long long segment = c / pieces_per_segment;
            const unsigned int offset = (unsigned int)(c % pieces_per_segment) * kL2PrefetchPiece;
            const unsigned int bytes = min(kL2PrefetchPiece, range.segment_bytes - offset);
            const unsigned char *addr = range.base + segment * range.stride + offset;
            prefetch_l2_bulk(addr, bytes);
        }
    }
}
