// Device-side decoding of the quantised weight formats (src/quant/ is the CPU definition of each format).
// Shared by cuda/dequant.cu and the grouped GEMMs; every function is exact (no rounding) and runs in registers.
//
// Element order everywhere: the LOWEST-addressed element is in the least significant bits (byte 0 of a 32-bit
// word, low nibble of a byte = even column), and output index i / .x holds it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

// e4m3fn pair -> half2, exact. `pair` holds two e4m3 codes in its low 16 bits; .x = bits 0-7, .y = bits 8-15.
// Every e4m3 value is a normal or subnormal f16; the NaN codes 0x7f / 0xff give NaN. One cvt.rn.f16x2.e4m3x2
// (sm_89 and later).
__device__ __forceinline__ __half2 e4m3x2_to_half2(uint32_t pair) {
    uint32_t h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"((unsigned short)pair));
    return *reinterpret_cast<__half2 *>(&h2);
}

// Four e4m3 codes of a 32-bit word -> out[i] = value of byte i, exact.
__device__ __forceinline__ void e4m3x4_to_f32(uint32_t word, float out[4]) {
    const float2 lo = __half22float2(e4m3x2_to_half2(word & 0xffffu));
    const float2 hi = __half22float2(e4m3x2_to_half2(word >> 16));
    out[0] = lo.x;
    out[1] = lo.y;
    out[2] = hi.x;
    out[3] = hi.y;
}

// e4m3fn pair -> bf16x2, exact (e4m3's 3 mantissa bits and its exponent range, subnormals included, fit bf16); .x = bits
// 0-7 of `pair` in the low half; the NaN codes give NaN. f16x2 by the one cvt above, then f32 and one pack that rounds
// nothing (no cvt goes from f16x2 to bf16x2): 4 instructions a pair. Shifting the code into bf16 bits and multiplying
// by 2^120 in bf16 would take as many and turn the NaN codes into 480.
__device__ __forceinline__ uint32_t e4m3x2_to_bf16x2(uint32_t pair) {
    const float2 v = __half22float2(e4m3x2_to_half2(pair));
    const __nv_bfloat162 b = __floats2bfloat162_rn(v.x, v.y);
    return *reinterpret_cast<const uint32_t *>(&b);
}

// Two f32 -> two e4m3 codes in the low 16 bits (lo = bits 0-7), round to nearest even, saturating to +-448 (NaN ->
// 0x7f), like src/quant/fp8.rs `f32_to_e4m3`. One cvt.rn.satfinite.e4m3x2.f32 (its first source is the upper byte).
__device__ __forceinline__ uint32_t f32x2_to_e4m3x2(float lo, float hi) {
    unsigned short pair;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pair) : "f"(hi), "f"(lo));
    return pair;
}

// One e4m3 code (bits 0-7 of `code`) -> f32, exact.
__device__ __forceinline__ float e4m3_to_f32(uint32_t code) {
    return __low2float(e4m3x2_to_half2(code & 0xffu));
}

// e2m1 pair -> half2, exact. `byte` holds two e2m1 codes in bits 0-7: .x = low nibble, .y = high nibble.
// No FP4 cvt before sm_100, so bit arithmetic: the 3 magnitude bits (2 exponent, 1 mantissa) go to f16 bits 9-11,
// the sign to bit 15, which reads as the e2m1 value times 2^-14 (exponent bias 15 instead of 1); one f16x2 multiply
// by 2^14 fixes the bias. Code 1 (0.5) lands on an f16 subnormal, which f16 arithmetic never flushes.
__device__ __forceinline__ __half2 e2m1x2_to_half2(uint32_t byte) {
    const uint32_t nibbles = (byte & 0xfu) | ((byte & 0xf0u) << 12);  // nibble 0 -> bits 0-3, nibble 1 -> 16-19
    const uint32_t bits = ((nibbles & 0x00070007u) << 9) | ((nibbles & 0x00080008u) << 12);
    const __half2 biased = *reinterpret_cast<const __half2 *>(&bits);
    return __hmul2(biased, __half2half2(__ushort_as_half(0x7400u)));  // 0x7400 = 2^14
}

// Eight e2m1 codes of a 32-bit word -> out[i] = value of nibble i (nibble 0 = low nibble of byte 0), exact.
__device__ __forceinline__ void e2m1x8_to_f32(uint32_t word, float out[8]) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        const float2 pair = __half22float2(e2m1x2_to_half2((word >> (8 * k)) & 0xffu));
        out[2 * k] = pair.x;
        out[2 * k + 1] = pair.y;
    }
}

// Eight e2m1 codes of a 32-bit word -> four bf16 pairs, out[j] = (nibble 2j, nibble 2j+1) with nibble 2j in the low
// half, exact (every e2m1 value is a normal bf16 or zero). Byte lookups with prmt instead of arithmetic: a prmt
// selector nibble picks one of 8 bytes, so the 3 magnitude bits of four codes select, from two 8-byte tables, the low
// and the high bytes of their bf16 values; the sign bits go to bit 7 of the high bytes, and two more byte permutes per
// pair of codes interleave low and high bytes. 17 PTX instructions for 8 values and no subnormal anywhere, where
// e2m1x2_to_half2 and two conversions to f32 per pair (e2m1x8_to_f32) take 40.
__device__ __forceinline__ void e2m1x8_to_bf16x2(uint32_t word, uint32_t out[4]) {
    // bf16 of the magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0-7): 0x0000 3f00 3f80 3fc0 4000 4040 4080 40c0.
    constexpr uint32_t kLow03 = 0xc0800000u, kLow47 = 0xc0804000u, kHigh03 = 0x3f3f3f00u, kHigh47 = 0x40404040u;
    // Selector nibbles with bit 3 clear: prmt reads a set bit 3 as "replicate the selected byte's sign".
    const uint32_t codes = word & 0x77777777u, codes47 = codes >> 16;
    const uint32_t low03 = __byte_perm(kLow03, kLow47, codes), low47 = __byte_perm(kLow03, kLow47, codes47);
    uint32_t high03 = __byte_perm(kHigh03, kHigh47, codes), high47 = __byte_perm(kHigh03, kHigh47, codes47);
    // Nibble i's sign is bit 4i + 3: bit 7 of byte i / 2 of (word << 4) for even i, of word for odd i.
    const uint32_t shifted = word << 4;
    high03 |= __byte_perm(shifted, word, 0x5140) & 0x80808080u;
    high47 |= __byte_perm(shifted, word, 0x7362) & 0x80808080u;
    out[0] = __byte_perm(low03, high03, 0x5140);  // bytes: low 0, high 0, low 1, high 1
    out[1] = __byte_perm(low03, high03, 0x7362);
    out[2] = __byte_perm(low47, high47, 0x5140);
    out[3] = __byte_perm(low47, high47, 0x7362);
}

// Eight 4-bit integers of a 32-bit word -> out[i] = nibble_i - zero, exact for any integer `zero` in [0, 2^23)
// (8 for symmetric INT4, the group's zero point otherwise). 0x4b000000 | n is the f32 2^23 + n, so one subtraction
// of (2^23 + zero) gives n - zero with no conversion instruction.
__device__ __forceinline__ void int4x8_to_f32(uint32_t word, float zero, float out[8]) {
    const float bias = 8388608.0f + zero;
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = __uint_as_float(0x4b000000u | ((word >> (4 * i)) & 0xfu)) - bias;
}
