// Standalone dequantisation of one weight matrix to bf16 [rows, cols]: FP8 e4m3 (per-tensor scale, 128x128 block
// scales), INT4 grouped (symmetric or zero point), NVFP4. Layouts and f32 formulas: src/quant/matrix.rs; the decoders
// are the shared register ones of include/quant.cuh.
//
// Thread mapping (all four kernels): a grid-stride loop over WARP TILES of 32 consecutive 16-byte vectors of the
// packed input (one 512-byte span: 16 fp8 or 32 4-bit elements per lane), read with one coalesced 16-byte load per
// lane. One lane's vector becomes 32 or 64 contiguous bytes of bf16, so storing it directly would make each 16-byte
// store instruction of the warp touch 32 sectors half-used. Instead the raw words are exchanged with warp shuffles so
// that in each of the 2 (fp8) or 4 (4-bit) store passes lane l owns the l-th 8-element chunk of a contiguous 512-byte
// output span: every load and store of the warp is fully coalesced. Each lane decodes its chunk after the exchange
// with the scale of the chunk's own position (all 8 outputs of a chunk share one scale). The tail (fewer elements than
// one vector at the very end of the matrix) goes element-guarded through the same decoder, one chunk per thread.
// Per element, bytes: fp8 1 read + 2 written; 4-bit 0.5 read + 2 written; scales 4 B / 16384 elements (fp8 block),
// 2-3 B / group (int4), 1 B / 16 (nvfp4). FLOPs: one multiply per element (plus one divide per chunk for nvfp4):
// purely bandwidth-bound.
#include "params.h"
#include "common.cuh"
#include "quant.cuh"

namespace {

constexpr int kWarp = 32;
constexpr int kChunk = 8;  // outputs per 16-byte bf16 store
constexpr unsigned kFullMask = 0xffffffffu;

// Each format: kBits per stored element, its packed input, and decode(): the 8 outputs of the chunk that starts at
// flat element `first` from its raw words (kChunk * kBits / 32 of them, lowest element in the lowest bits).

struct Fp8PerTensor {
    static constexpr int kBits = 8;
    DequantFp8Params p;
    __device__ const uint8_t *input() const { return reinterpret_cast<const uint8_t *>(p.data); }
    __device__ void decode(const uint32_t *words, long, float out[kChunk]) const {
        e4m3x4_to_f32(words[0], out);
        e4m3x4_to_f32(words[1], out + 4);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) out[i] *= p.tensor_scale;
    }
};

struct Fp8Block128 {
    static constexpr int kBits = 8;
    DequantFp8Params p;
    __device__ const uint8_t *input() const { return reinterpret_cast<const uint8_t *>(p.data); }
    __device__ void decode(const uint32_t *words, long first, float out[kChunk]) const {
        // cols % 8 == 0: the chunk lies in one row and one 128-column block.
        const long row = first / p.cols;
        const int col = (int)(first - row * p.cols);
        const int scale_cols = (p.cols + 127) / 128;
        const float scale = p.block_scales[(row / 128) * scale_cols + col / 128];
        e4m3x4_to_f32(words[0], out);
        e4m3x4_to_f32(words[1], out + 4);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) out[i] *= scale;
    }
};

struct Int4Grouped {
    static constexpr int kBits = 4;
    DequantInt4Params p;
    __device__ const uint8_t *input() const { return p.packed; }
    __device__ void decode(const uint32_t *words, long first, float out[kChunk]) const {
        // cols % group == 0 makes groups contiguous in the flat order; group % 8 == 0 keeps a chunk in one group.
        const long g = first / p.group;
        const float zero = p.zeros != nullptr ? (float)p.zeros[g] : 8.0f;
        const float scale = __bfloat162float(p.scales[g]);
        int4x8_to_f32(words[0], zero, out);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) out[i] *= scale;  // exact: (q - z) has 4 bits, the scale 8
    }
};

struct Nvfp4 {
    static constexpr int kBits = 4;
    DequantNvfp4Params p;
    __device__ const uint8_t *input() const { return p.packed; }
    __device__ void decode(const uint32_t *words, long first, float out[kChunk]) const {
        // One e4m3 block scale per 16 elements; the checkpoint's global scale divides (IEEE division, as on the CPU).
        const float scale = __fdiv_rn(e4m3_to_f32(reinterpret_cast<const uint8_t *>(p.scales)[first / 16]), p.global_scale);
        e2m1x8_to_f32(words[0], out);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) out[i] *= scale;
    }
};

template <class Format>
__device__ __forceinline__ void dequantize(const Format &format, bf16 *out, long total) {
    constexpr int kElemsPerVector = 128 / Format::kBits;              // 16 (fp8) or 32 (4-bit)
    constexpr int kPasses = kElemsPerVector / kChunk;                 // store passes per tile: 2 or 4
    constexpr int kWordsPerChunk = 4 / kPasses;                       // 2 or 1
    const uint8_t *input = format.input();
    const long vectors = total / kElemsPerVector;
    const long tiles = (vectors + kWarp - 1) / kWarp;
    const int lane = threadIdx.x % kWarp;
    const long thread = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const long warps = (long)gridDim.x * blockDim.x / kWarp;

    // Warp-uniform loop: every lane takes part in every shuffle, lanes past the end load nothing.
    for (long tile = thread / kWarp; tile < tiles; tile += warps) {
        const long vector = tile * kWarp + lane;
        uint4 raw = make_uint4(0u, 0u, 0u, 0u);
        if (vector < vectors) raw = __ldg(reinterpret_cast<const uint4 *>(input) + vector);
#pragma unroll
        for (int pass = 0; pass < kPasses; ++pass) {
            // Chunk c = pass * 32 + lane of the tile is word (c % kPasses) * kWordsPerChunk of lane c / kPasses.
            const int source = pass * (kWarp / kPasses) + lane / kPasses;
            const int part = lane % kPasses;
            const uint32_t t0 = __shfl_sync(kFullMask, raw.x, source);
            const uint32_t t1 = __shfl_sync(kFullMask, raw.y, source);
            const uint32_t t2 = __shfl_sync(kFullMask, raw.z, source);
            const uint32_t t3 = __shfl_sync(kFullMask, raw.w, source);
            uint32_t words[kWordsPerChunk];
            if constexpr (kWordsPerChunk == 2) {
                words[0] = part == 0 ? t0 : t2;
                words[1] = part == 0 ? t1 : t3;
            } else {
                words[0] = part == 0 ? t0 : part == 1 ? t1 : part == 2 ? t2 : t3;
            }
            const long first = ((tile * kPasses + pass) * kWarp + lane) * kChunk;
            if (first < vectors * kElemsPerVector) {
                float values[kChunk];
                format.decode(words, first, values);
                *reinterpret_cast<uint4 *>(out + first) = f32x8_to_bf16(values);
            }
        }
    }

    // Tail: the last total % kElemsPerVector elements, one chunk per thread, byte loads and element stores guarded.
    const long tail_first = vectors * kElemsPerVector;
    if (thread < (total - tail_first + kChunk - 1) / kChunk) {
        const long first = tail_first + thread * kChunk;
        const long first_byte = first * Format::kBits / 8;
        const long end_byte = (min(first + kChunk, total) * Format::kBits + 7) / 8;
        uint32_t words[kWordsPerChunk] = {};
#pragma unroll
        for (int i = 0; i < 4 * kWordsPerChunk; ++i) {
            if (first_byte + i < end_byte) words[i / 4] |= (uint32_t)input[first_byte + i] << (8 * (i % 4));
        }
        float values[kChunk];
        format.decode(words, first, values);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
            if (first + i < total) out[first + i] = __float2bfloat16_rn(values[i]);
        }
    }
}

}  // namespace

extern "C" __global__ void dequant_fp8_per_tensor(const DequantFp8Params p) {
    dequantize(Fp8PerTensor{p}, p.out, (long)p.rows * p.cols);
}

extern "C" __global__ void dequant_fp8_block128(const DequantFp8Params p) {
    dequantize(Fp8Block128{p}, p.out, (long)p.rows * p.cols);
}

extern "C" __global__ void dequant_int4(const DequantInt4Params p) {
    dequantize(Int4Grouped{p}, p.out, (long)p.rows * p.cols);
}

extern "C" __global__ void dequant_nvfp4(const DequantNvfp4Params p) {
    dequantize(Nvfp4{p}, p.out, (long)p.rows * p.cols);
}
