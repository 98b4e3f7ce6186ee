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
// with the scale of the chunk's own position (all 8 outputs of a chunk share one scale, and the scales of a
// whole tile are fetched with one load instruction and shuffled to the chunks). The tail (fewer elements than
// one vector at the very end of the matrix) goes element-guarded through the same decoder, one chunk per thread.
// Per element, bytes: fp8 1 read + 2 written; 4-bit 0.5 read + 2 written; scales 4 B / 16384 elements (fp8 block),
// 2-3 B / group (int4, group % 32 == 0), 1 B / 16 (nvfp4). FLOPs: one multiply per element (plus one divide per chunk for nvfp4):
// purely bandwidth-bound.
#include "params.h"
#include "common.cuh"
#include "quant.cuh"

namespace {

constexpr int kWarp = 32;
constexpr int kChunk = 8;  // outputs per 16-byte bf16 store
constexpr unsigned kFullMask = 0xffffffffu;

// Each format provides, besides kBits and its packed input:
// - tile_scales(tile_first, lane): the scale entries this lane fetches for the whole warp tile that starts at flat
//   element tile_first (one coalesced load per tile instead of one per store pass); 0 where a format has none.
// - chunk_scale(held, tile_first, first): called by ALL lanes of the warp (it shuffles), the scale word of the chunk
//   that starts at `first`, taken from the lane that holds it; lanes whose chunk lies past the end get junk, unused.
// - direct_scale(first): the same scale word read straight from memory (the tail path).
// - decode(words, first, scale, out): the 8 outputs of the chunk from its raw words (kChunk * kBits / 32 of them,
//   lowest element in the lowest bits) and its scale word.

struct Fp8PerTensor {
    static constexpr int kBits = 8;
    DequantFp8Params p;
    __device__ const uint8_t *input() const { return reinterpret_cast<const uint8_t *>(p.data); }
    __device__ uint32_t tile_scales(long, int) const { return 0u; }
    __device__ uint32_t chunk_scale(uint32_t, long, long) const { return 0u; }
    __device__ uint32_t direct_scale(long) const { return 0u; }
    __device__ void decode(const uint32_t *words, long, uint32_t, float out[kChunk]) const {
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
    // Scale word: the f32 bits of the block scale. cols % 16 == 0: each lane's own 16-element vector lies in one row
    // and one 128-column block, so lane l fetches the scale of its own vector and chunk c reads lane c / 2.
    __device__ uint32_t direct_scale(long first) const {
        const long row = first / p.cols;
        const int col = (int)(first - row * p.cols);
        const int scale_cols = (p.cols + 127) / 128;
        return __float_as_uint(p.block_scales[(row / 128) * scale_cols + col / 128]);
    }
    __device__ uint32_t tile_scales(long tile_first, int lane) const {
        const long first = tile_first + 16 * lane;
        return first < (long)p.rows * p.cols ? direct_scale(first) : 0u;
    }
    __device__ uint32_t chunk_scale(uint32_t held, long tile_first, long first) const {
        return __shfl_sync(kFullMask, held, (int)((first - tile_first) / 16) & (kWarp - 1));
    }
    __device__ void decode(const uint32_t *words, long, uint32_t scale_word, float out[kChunk]) const {
        const float scale = __uint_as_float(scale_word);
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
    // Scale word: bf16 scale bits | zero point << 16. cols % group == 0 makes groups contiguous in the flat order;
    // group % 32 == 0 means a tile (1024 elements) touches at most 32 groups: lane l fetches group tile_first/group + l.
    __device__ uint32_t direct_scale(long first) const {
        const long g = first / p.group;
        const uint32_t zero = p.zeros != nullptr ? (uint32_t)p.zeros[g] : 8u;
        return (uint32_t)__bfloat16_as_ushort(p.scales[g]) | zero << 16;
    }
    __device__ uint32_t tile_scales(long tile_first, int lane) const {
        const long g = tile_first / p.group + lane;
        const long last_of_tile = (tile_first + kWarp * 128 / kBits - 1) / p.group;
        return g <= last_of_tile && g < (long)p.rows * (p.cols / p.group) ? direct_scale(g * p.group) : 0u;
    }
    __device__ uint32_t chunk_scale(uint32_t held, long tile_first, long first) const {
        // 32-bit division per chunk; the 64-bit remainder is the same for the whole tile (hoisted by the compiler).
        const int tile_offset = (int)(tile_first % p.group);
        return __shfl_sync(kFullMask, held, ((tile_offset + (int)(first - tile_first)) / p.group) & (kWarp - 1));
    }
    __device__ void decode(const uint32_t *words, long, uint32_t scale_word, float out[kChunk]) const {
        const float scale = __uint_as_float(scale_word << 16);  // the bf16 bits widened to f32
        int4x8_to_f32(words[0], (float)(scale_word >> 16), out);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) out[i] *= scale;  // exact: (q - z) has 4 bits, the scale 8
    }
};

struct Nvfp4 {
    static constexpr int kBits = 4;
    DequantNvfp4Params p;
    __device__ const uint8_t *input() const { return p.packed; }
    __device__ const uint8_t *scales() const { return reinterpret_cast<const uint8_t *>(p.scales); }
    // Scale word: the e4m3 byte of the chunk's 16-element block. A tile covers 64 blocks: lane l fetches the two
    // scale bytes of blocks tile_first/16 + 2l and + 2l + 1 (one 2-byte load; bytewise at the very end).
    __device__ uint32_t direct_scale(long first) const { return scales()[first / 16]; }
    __device__ uint32_t tile_scales(long tile_first, int lane) const {
        const long block = tile_first / 16 + 2 * lane, blocks = (long)p.rows * p.cols / 16;
        if (block + 1 < blocks) return *reinterpret_cast<const uint16_t *>(scales() + block);
        return block < blocks ? scales()[block] : 0u;
    }
    __device__ uint32_t chunk_scale(uint32_t held, long tile_first, long first) const {
        const int block = (int)(first / 16 - tile_first / 16);  // 0..63
        return (__shfl_sync(kFullMask, held, (block >> 1) & (kWarp - 1)) >> (8 * (block & 1))) & 0xffu;
    }
    __device__ void decode(const uint32_t *words, long, uint32_t scale_word, float out[kChunk]) const {
        // The checkpoint's global scale divides (IEEE division, as on the CPU), once per chunk.
        const float scale = __fdiv_rn(e4m3_to_f32(scale_word), p.global_scale);
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
        const long tile_first = tile * kWarp * kElemsPerVector;
        uint4 raw = make_uint4(0u, 0u, 0u, 0u);
        if (vector < vectors) raw = __ldg(reinterpret_cast<const uint4 *>(input) + vector);
        const uint32_t held_scales = format.tile_scales(tile_first, lane);
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
            const long first = tile_first + (pass * kWarp + lane) * kChunk;
            const uint32_t scale = format.chunk_scale(held_scales, tile_first, first);
            if (first < vectors * kElemsPerVector) {
                float values[kChunk];
                format.decode(words, first, scale, values);
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
        format.decode(words, first, format.direct_scale(first), values);
#pragma unroll
        for (int i = 0; i < kChunk; ++i) {
            if (first + i < total) out[first + i] = __float2bfloat16_rn(values[i]);
        }
    }
}

}  // namespace

// Per element: 1 B read, 2 B written, 1 multiply (the scale is a parameter).
extern "C" __global__ void dequant_fp8_per_tensor(const DequantFp8Params p) {
    dequantize(Fp8PerTensor{p}, p.out, (long)p.rows * p.cols);
}

// Per element: 1 B read (+ 4 B per 128x128 block), 2 B written, 1 multiply.
extern "C" __global__ void dequant_fp8_block128(const DequantFp8Params p) {
    dequantize(Fp8Block128{p}, p.out, (long)p.rows * p.cols);
}

// Per element: 0.5 B read (+ 2 B scale, + 1 B zero point, per group), 2 B written, 1 subtract + 1 multiply.
extern "C" __global__ void dequant_int4(const DequantInt4Params p) {
    dequantize(Int4Grouped{p}, p.out, (long)p.rows * p.cols);
}

// Per element: 0.5 B read (+ 1 B e4m3 scale per 16), 2 B written, 1 multiply (+ 1 divide per 8).
extern "C" __global__ void dequant_nvfp4(const DequantNvfp4Params p) {
    dequantize(Nvfp4{p}, p.out, (long)p.rows * p.cols);
}
