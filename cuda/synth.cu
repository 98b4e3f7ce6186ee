// Counter-based synthetic weights generated on the device, bit for bit the values of src/model/synth.rs (its module
// doc is the contract: FNV/SplitMix64 keys, one 64-bit hash per 8 byte-sized or 16 nibble-sized elements, every value
// an exact product of small integers and powers of two, so no rounding mode or FMA contraction can change a bit).
//
// synth_plain: a grid-stride loop, one bf16 element per thread step (a table, a norm weight): 1 hash, 2 B written.
// synth_packed_codes: a grid-stride loop over the 16-byte lane chunks of the packed layout (src/quant/repack.rs):
//   a thread builds one chunk (8 bf16, 16 fp8 or 32 4-bit codes of one lane's mma fragments) in registers and stores
//   it with one 16-byte store; consecutive threads write consecutive chunks (coalesced). Per element one SplitMix64
//   hash (about 10 integer instructions), no loads: compute-bound at about 0.1 s for the full model on an H100.
// synth_packed_scales: a grid-stride loop over one scale array (row, block-128, int4 group (+ zero), nvfp4 block),
//   one element per thread step, one hash each.
#include "params.h"
#include "common.cuh"

namespace {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ull;
constexpr uint64_t kScaleSalt = 0x5343414c4553ull;
constexpr uint64_t kZeroSalt = 0x5a45524f5321ull;

__device__ __forceinline__ uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ uint64_t stream(uint64_t key, uint64_t counter) { return mix64(key + counter * kGolden); }

__device__ __forceinline__ uint32_t element_byte(uint64_t key, uint64_t i) { return (uint32_t)(stream(key, i >> 3) >> (8 * (i & 7))) & 0xffu; }

__device__ __forceinline__ uint32_t element_nibble(uint64_t key, uint64_t i) { return (uint32_t)(stream(key, i >> 4) >> (4 * (i & 15))) & 15u; }

// (2 * (int8)byte + 1) * unit: an odd integer of at most 8 bits times a power of two, exact in f32 and bf16.
__device__ __forceinline__ uint32_t bf16_value_bits(uint32_t byte, float unit) {
    const int v = 2 * (int)(signed char)byte + 1;
    return __bfloat16_as_ushort(__float2bfloat16_rn(__fmul_rn((float)v, unit)));
}

__device__ __forceinline__ uint32_t norm_value_bits(uint32_t byte) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(__fadd_rn(1.0f, __fmul_rn((float)((int)(byte & 15u) - 8), 0.0078125f))));
}

__device__ __forceinline__ uint32_t fp8_code(uint32_t byte) { return (byte & 0x80u) | ((6u + ((byte >> 5) & 3u)) << 3) | (byte & 7u); }

__device__ __forceinline__ float block_scale(uint64_t key, uint64_t b, float unit) {
    const uint32_t x = (uint32_t)(stream(mix64(key ^ kScaleSalt), b) & 15u);
    return __fmul_rn(unit, __fmul_rn((float)(16u + x), 0.0625f));
}

__device__ __forceinline__ uint32_t fp4_block_scale(uint64_t key, uint64_t b) {
    const uint64_t h = stream(mix64(key ^ kScaleSalt), b);
    return (uint32_t)(((6u + (h & 3u)) << 3) | ((h >> 2) & 7u));
}

__device__ __forceinline__ uint32_t group_zero(uint64_t key, uint64_t g) { return 6u + (uint32_t)(stream(mix64(key ^ kZeroSalt), g) & 3u); }

// Packed row r -> (matrix, source row), or false for padding (repack.rs: repack_linear / repack_gate_up).
__device__ __forceinline__ bool row_source(const SynthPackedParams &p, int r, int &m, int &row) {
    if (p.mats == 1) {
        m = 0;
        row = r;
    } else {
        const int within = r & 15;
        m = within >> 3;
        row = (r >> 4) * 8 + (within & 7);
    }
    return row < p.rows;
}

__device__ __forceinline__ int64_t source_index(const SynthPackedParams &p, int row, int64_t k) { return p.base + row * p.row_stride + k * p.col_stride; }

// The stored code of packed element (r, k) of expert e: bf16 bits, an e4m3 byte or a nibble; 0 for padding.
__device__ __forceinline__ uint32_t packed_code(const SynthPackedParams &p, int e, int r, int k) {
    int m, row;
    if (!row_source(p, r, m, row) || k >= p.k_valid) return 0u;
    const uint64_t key = p.keys[e * p.mats + m];
    const uint64_t i = (uint64_t)source_index(p, row, k);
    switch (p.format) {
    case 0: return bf16_value_bits(element_byte(key, i), p.unit);
    case 1:
    case 2: return fp8_code(element_byte(key, i));
    default: return element_nibble(key, i);
    }
}

// Fragment element j (0..8) of lane (g, t) at a k-step: (row, column) inside the 16 x 16 step (repack.rs).
__device__ __forceinline__ void fragment_element(int lane, int j, int &r, int &c) {
    const int g = lane >> 2, t = lane & 3;
    r = g + ((j & 2) ? 8 : 0);
    c = 2 * t + (j & 1) + ((j & 4) ? 8 : 0);
}

}  // namespace

extern "C" __global__ void synth_plain(const SynthPlainParams p) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += stride) {
        const uint32_t byte = element_byte(p.key, (uint64_t)i);
        const uint32_t bits = p.kind == 0 ? bf16_value_bits(byte, p.unit) : norm_value_bits(byte);
        reinterpret_cast<uint16_t *>(p.out)[i] = (uint16_t)bits;
    }
}

extern "C" __global__ void synth_packed_codes(const SynthPackedParams p) {
    const int bits = p.format == 0 ? 16 : (p.format <= 2 ? 8 : 4);
    const int chunks_per_block = 16 * 64 * bits / 8 / 16;  // 16-byte chunks of one 16-row x 64-k tile
    const int tiles = p.rows_padded / 16, k_blocks = p.k_dim / 64;
    const int64_t total = (int64_t)p.experts * tiles * k_blocks * chunks_per_block;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t q = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; q < total; q += stride) {
        const int chunk = (int)(q % chunks_per_block);
        const int64_t tile_block = q / chunks_per_block;  // (e * tiles + tile) * k_blocks + kb
        const int kb = (int)(tile_block % k_blocks);
        const int tile = (int)((tile_block / k_blocks) % tiles);
        const int e = (int)(tile_block / k_blocks / tiles);
        const int lane = chunk & 31;
        uint32_t words[4] = {0u, 0u, 0u, 0u};
        if (bits == 16) {
            // Chunk (ks * 32 + lane): the 8 bf16 of k-step ks.
            const int ks = chunk >> 5;
            for (int j = 0; j < 8; ++j) {
                int r, c;
                fragment_element(lane, j, r, c);
                words[j >> 1] |= packed_code(p, e, tile * 16 + r, kb * 64 + ks * 16 + c) << (16 * (j & 1));
            }
        } else if (bits == 8) {
            // Chunk ((ks / 2) * 32 + lane): 8 bytes of k-step 2 * (chunk / 32), then 8 of the next.
            for (int half = 0; half < 2; ++half) {
                const int ks = 2 * (chunk >> 5) + half;
                for (int j = 0; j < 8; ++j) {
                    int r, c;
                    fragment_element(lane, j, r, c);
                    const int at = half * 8 + j;
                    words[at >> 2] |= packed_code(p, e, tile * 16 + r, kb * 64 + ks * 16 + c) << (8 * (at & 3));
                }
            }
        } else {
            // Chunk lane: 4 bytes per k-step, two nibbles a byte (low = the earlier element).
            for (int ks = 0; ks < 4; ++ks) {
                for (int j = 0; j < 8; ++j) {
                    int r, c;
                    fragment_element(lane, j, r, c);
                    const int at = ks * 8 + j;  // nibble index in the chunk
                    words[at >> 3] |= packed_code(p, e, tile * 16 + r, kb * 64 + ks * 16 + c) << (4 * (at & 7));
                }
            }
        }
        const int tile_bytes = 16 * 64 * bits / 8;
        uint4 *out = reinterpret_cast<uint4 *>(p.data + tile_block * tile_bytes + chunk * 16);
        *out = make_uint4(words[0], words[1], words[2], words[3]);
    }
}

extern "C" __global__ void synth_packed_scales(const SynthPackedParams p) {
    const int tiles = p.rows_padded / 16;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t start = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int64_t block_cols = (p.src_cols + 127) / 128;
    if (p.scale_array == 0) {
        // row_scales [experts, rows_padded]: the tensor's unit, 0 for padding.
        for (int64_t i = start; i < (int64_t)p.experts * p.rows_padded; i += stride) {
            int m, row;
            p.row_scales[i] = row_source(p, (int)(i % p.rows_padded), m, row) ? p.unit : 0.0f;
        }
    } else if (p.scale_array == 1) {
        // block_scales [experts, k_dim / 128, rows_padded / 8]: the block of each 8-row group's first element.
        const int groups = p.rows_padded / 8, k128 = p.k_dim / 128;
        for (int64_t i = start; i < (int64_t)p.experts * k128 * groups; i += stride) {
            const int gi = (int)(i % groups), kb = (int)((i / groups) % k128), e = (int)(i / groups / k128);
            int m, row;
            float s = 0.0f;
            if (row_source(p, gi * 8, m, row)) {
                const int64_t src = source_index(p, row, (int64_t)kb * 128);
                const int64_t sr = src / p.src_cols, sc = src % p.src_cols;
                s = block_scale(p.keys[e * p.mats + m], (uint64_t)((sr / 128) * block_cols + sc / 128), p.unit);
            }
            p.block_scales[i] = s;
        }
    } else if (p.scale_array == 2) {
        // group_scales / group_zeros [experts, tiles, k_dim / group, 16].
        const int per = p.k_dim / p.group;
        const int64_t src_groups = p.src_cols / p.group;
        for (int64_t i = start; i < (int64_t)p.experts * tiles * per * 16; i += stride) {
            const int r16 = (int)(i % 16), gi = (int)((i / 16) % per);
            const int64_t et = i / 16 / per;
            const int tile = (int)(et % tiles), e = (int)(et / tiles);
            int m, row;
            float s = 0.0f;
            uint32_t z = 8u;
            if (row_source(p, tile * 16 + r16, m, row)) {
                const uint64_t key = p.keys[e * p.mats + m];
                const int64_t src = source_index(p, row, (int64_t)gi * p.group);
                const uint64_t g = (uint64_t)((src / p.src_cols) * src_groups + (src % p.src_cols) / p.group);
                s = block_scale(key, g, p.unit);
                z = group_zero(key, g);
            }
            p.group_scales[i] = __float2bfloat16_rn(s);
            if (p.group_zeros) p.group_zeros[i] = (uint8_t)z;
        }
    } else {
        // fp4_scales [experts, tiles, k_dim / 64, 16, 4]: the e4m3 scale of 16 consecutive elements of a row.
        const int k_blocks = p.k_dim / 64;
        const int64_t src_blocks = p.src_cols / 16;
        for (int64_t i = start; i < (int64_t)p.experts * tiles * k_blocks * 64; i += stride) {
            const int j = (int)(i % 4), r16 = (int)((i / 4) % 16), kb = (int)((i / 64) % k_blocks);
            const int64_t et = i / 64 / k_blocks;
            const int tile = (int)(et % tiles), e = (int)(et / tiles);
            int m, row;
            uint32_t code = 0u;
            if (row_source(p, tile * 16 + r16, m, row)) {
                const int64_t src = source_index(p, row, (int64_t)kb * 64 + j * 16);
                code = fp4_block_scale(p.keys[e * p.mats + m], (uint64_t)((src / p.src_cols) * src_blocks + (src % p.src_cols) / 16));
            }
            p.fp4_scales[i] = (uint8_t)code;
        }
    }
}
