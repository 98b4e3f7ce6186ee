// Device-side decoding of the quantised weight formats (src/quant/ is the CPU definition of each format).
// Shared by cuda/dequant.cu and the grouped GEMMs; every function is exact (no rounding) and runs in registers.
//
// Element order everywhere: the LOWEST-addressed element is in the least significant bits (byte 0 of a 32-bit
// word, low nibble of a byte = even column), and output index i / .x holds it.
#pragma once
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

// Eight 4-bit integers of a 32-bit word -> out[i] = nibble_i - zero, exact for any integer `zero` in [0, 2^23)
// (8 for symmetric INT4, the group's zero point otherwise). 0x4b000000 | n is the f32 2^23 + n, so one subtraction
// of (2^23 + zero) gives n - zero with no conversion instruction.
__device__ __forceinline__ void int4x8_to_f32(uint32_t word, float zero, float out[8]) {
    const float bias = 8388608.0f + zero;
#pragma unroll
    for (int i = 0; i < 8; ++i) out[i] = __uint_as_float(0x4b000000u | ((word >> (4 * i)) & 0xfu)) - bias;
}
