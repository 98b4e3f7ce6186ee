//! FP4 e2m1 (OCP MX / NVFP4 element type): sign, 2 exponent bits (bias 1), 1 mantissa bit; no infinities, no NaN.
//! The 8 magnitudes are 0, 0.5, 1, 1.5, 2, 3, 4, 6. Codes are nibbles (0..=15); packed two per byte with the LOW
//! nibble holding the even column, as in the NVFP4 checkpoint's `weight_packed`.
//!
//! ```
//! use small4::quant::fp4::{e2m1_to_f32, f32_to_e2m1, pack_e2m1_pair, E2M1_MAX};
//!
//! // All 8 magnitudes round-trip; the sign is bit 3.
//! for x in [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0] {
//!     assert_eq!(e2m1_to_f32(f32_to_e2m1(x)), x);
//!     assert_eq!(f32_to_e2m1(-x), f32_to_e2m1(x) | 8);
//! }
//! // Ties go to the even code (5 is halfway between 4 = code 6 and 6 = code 7), larger values saturate.
//! assert_eq!(e2m1_to_f32(f32_to_e2m1(5.0)), 4.0);
//! assert_eq!(e2m1_to_f32(f32_to_e2m1(100.0)), E2M1_MAX);
//! // No NaN in e2m1: NaN becomes +0.
//! assert_eq!(f32_to_e2m1(f32::NAN), 0);
//!
//! // Two codes a byte, the even column in the low nibble.
//! let byte = pack_e2m1_pair(f32_to_e2m1(1.5), f32_to_e2m1(-4.0));
//! assert_eq!(byte, 0xe3);
//! assert_eq!((e2m1_to_f32(byte & 0xf), e2m1_to_f32(byte >> 4)), (1.5, -4.0));
//! ```

use super::minifloat::Minifloat;

const E2M1: Minifloat = Minifloat { exp_bits: 2, man_bits: 1, bias: 1 };
/// Largest e2m1 magnitude, the divisor of NVFP4 block scales (see the module example).
pub const E2M1_MAX: f32 = 6.0;
const E2M1_MAX_CODE: u32 = 7;

/// The value of the low nibble of `code` (the high bits are ignored).
///
/// ```
/// use small4::quant::e2m1_to_f32;
///
/// assert_eq!(e2m1_to_f32(0x5), 3.0);
/// assert_eq!(e2m1_to_f32(0xd), -3.0);
/// assert_eq!(e2m1_to_f32(0xa5), 3.0); // only the low nibble counts
/// ```
pub fn e2m1_to_f32(code: u8) -> f32 {
    let value = E2M1.decode_magnitude(code as u32 & 7) as f32;
    if code & 8 != 0 {
        -value
    } else {
        value
    }
}

/// Round to nearest even, saturating to ±6 (infinities included). e2m1 has no NaN: NaN encodes as +0 (code 0), the
/// choice that keeps a corrupted weight from contributing anything rather than a full-scale ±6.
///
/// ```
/// use small4::quant::f32_to_e2m1;
///
/// assert_eq!(f32_to_e2m1(0.75), 2); // tie between 0.5 (code 1) and 1 (code 2): the even code
/// assert_eq!(f32_to_e2m1(-f32::INFINITY), 15); // -6
/// assert_eq!(f32_to_e2m1(-0.1), 8); // -0
/// ```
pub fn f32_to_e2m1(x: f32) -> u8 {
    if x.is_nan() {
        return 0;
    }
    let magnitude = if x.is_infinite() { E2M1_MAX_CODE } else { E2M1.encode_magnitude(x.abs() as f64).min(E2M1_MAX_CODE) };
    let sign = if x.is_sign_negative() { E2M1.sign_bit() } else { 0 };
    (sign | magnitude) as u8
}

/// Two e2m1 codes in one byte: `even` in the low nibble, `odd` in the high one.
///
/// ```
/// use small4::quant::pack_e2m1_pair;
///
/// assert_eq!(pack_e2m1_pair(0x3, 0xe), 0xe3);
/// ```
pub fn pack_e2m1_pair(even: u8, odd: u8) -> u8 {
    (even & 0xf) | (odd << 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAGNITUDES: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

    #[test]
    fn decodes_all_sixteen_codes() {
        for code in 0..16u8 {
            let want = if code & 8 != 0 { -MAGNITUDES[code as usize & 7] } else { MAGNITUDES[code as usize & 7] };
            assert_eq!(e2m1_to_f32(code).to_bits(), want.to_bits(), "{code}");
            // High bits are ignored: the nibble is what counts.
            assert_eq!(e2m1_to_f32(code | 0xa0).to_bits(), want.to_bits());
        }
    }

    #[test]
    fn every_code_round_trips() {
        for code in 0..16u8 {
            assert_eq!(f32_to_e2m1(e2m1_to_f32(code)), code, "{code}");
        }
    }

    #[test]
    fn midpoints_round_to_even_and_neighbours_to_nearest() {
        for sign in [0u8, 8] {
            for low in 0..7u8 {
                let (a, b) = (e2m1_to_f32(sign | low), e2m1_to_f32(sign | (low + 1)));
                let mid = (a + b) / 2.0;
                let even = if low % 2 == 0 { low } else { low + 1 };
                assert_eq!(f32_to_e2m1(mid), sign | even, "midpoint {mid}");
                assert_eq!(f32_to_e2m1(f32::from_bits(mid.to_bits() - 1)), sign | low, "below {mid}");
                assert_eq!(f32_to_e2m1(f32::from_bits(mid.to_bits() + 1)), sign | (low + 1), "above {mid}");
            }
        }
        // The named ties: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4.
        let ties = [(0.25, 0.0), (0.75, 1.0), (1.25, 1.0), (1.75, 2.0), (2.5, 2.0), (3.5, 4.0), (5.0, 4.0)];
        for (x, want) in ties {
            assert_eq!(e2m1_to_f32(f32_to_e2m1(x)), want, "{x}");
            assert_eq!(e2m1_to_f32(f32_to_e2m1(-x)), -want, "-{x}");
        }
    }

    #[test]
    fn saturates_and_maps_nan() {
        for x in [6.0f32, 6.5, 7.0, 100.0, f32::MAX, f32::INFINITY] {
            assert_eq!(f32_to_e2m1(x), 7, "{x}");
            assert_eq!(f32_to_e2m1(-x), 15, "{x}");
        }
        assert_eq!(f32_to_e2m1(f32::NAN), 0);
        assert_eq!(f32_to_e2m1(-0.0), 8);
        assert_eq!(f32_to_e2m1(-0.1), 8);
    }

    #[test]
    fn packing_puts_even_column_in_low_nibble() {
        let byte = pack_e2m1_pair(f32_to_e2m1(1.5), f32_to_e2m1(-4.0));
        assert_eq!(byte, 0xe3);
        assert_eq!(e2m1_to_f32(byte & 0xf), 1.5);
        assert_eq!(e2m1_to_f32(byte >> 4), -4.0);
    }
}
