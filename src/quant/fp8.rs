//! FP8 scalars: e4m3fn (OCP "E4M3FN", NVIDIA `__nv_fp8_e4m3`) and e5m2.
//!
//! e4m3fn: bias 7, no infinities, 0x7f / 0xff are NaN, largest finite 448 (0x7e). Encoding rounds to nearest even and
//! saturates like PTX `cvt.rn.satfinite.e4m3x2.f32`: anything beyond ±448 (infinities included) becomes ±448, NaN
//! becomes 0x7f. e5m2: bias 15, IEEE-like: 0x7c is infinity, 0x7d..0x7f NaN, largest finite 57344 (0x7b).
//!
//! ```
//! use small4::quant::fp8::{e4m3_to_f32, e5m2_to_f32, f32_to_e4m3, f32_to_e5m2, f32_to_e5m2_satfinite};
//! use small4::quant::fp8::{E4M3_MAX, E4M3_NAN, E5M2_MAX, E5M2_NAN};
//!
//! // Representable values round-trip exactly; 1.0 is exponent 7 (the bias), mantissa 0.
//! assert_eq!(f32_to_e4m3(1.0), 0x38);
//! assert_eq!(e4m3_to_f32(f32_to_e4m3(-2.75)), -2.75);
//! // e4m3 has 3 mantissa bits: 1.0625 is a tie between 1 and 1.125 and goes to the even code, 1.
//! assert_eq!(e4m3_to_f32(f32_to_e4m3(1.0625)), 1.0);
//! // e4m3 saturates; NaN has its own code.
//! assert_eq!(e4m3_to_f32(f32_to_e4m3(1e6)), E4M3_MAX);
//! assert_eq!(f32_to_e4m3(f32::NAN), E4M3_NAN);
//! assert!(e4m3_to_f32(E4M3_NAN).is_nan());
//!
//! // e5m2 follows IEEE: overflow is infinity, unless asked to saturate as the PTX `satfinite` conversion does.
//! assert_eq!(e5m2_to_f32(f32_to_e5m2(1e6)), f32::INFINITY);
//! assert_eq!(e5m2_to_f32(f32_to_e5m2_satfinite(1e6)), E5M2_MAX);
//! assert_eq!(e5m2_to_f32(f32_to_e5m2(-0.375)), -0.375);
//! assert!(e5m2_to_f32(f32_to_e5m2(f32::NAN)).is_nan());
//! assert_eq!(f32_to_e5m2(f32::NAN), E5M2_NAN);
//! ```

use super::minifloat::Minifloat;

const E4M3: Minifloat = Minifloat { exp_bits: 4, man_bits: 3, bias: 7 };
const E5M2: Minifloat = Minifloat { exp_bits: 5, man_bits: 2, bias: 15 };

/// Largest finite e4m3 value, the divisor of per-tensor and per-block FP8 scales.
///
/// ```
/// use small4::quant::{Fp8PerTensor, E4M3_MAX};
///
/// // The per-tensor scale maps the largest |weight| onto E4M3_MAX.
/// let m = Fp8PerTensor::quantize(&[0.5, -2.0, 1.0, 0.0], 2, 2)?;
/// assert_eq!(m.scale, 2.0 / E4M3_MAX);
/// # Ok::<(), small4::Error>(())
/// ```
pub const E4M3_MAX: f32 = 448.0;
/// Largest finite e5m2 value (code 0x7b); see the module example.
pub const E5M2_MAX: f32 = 57344.0;
/// The canonical NaN codes the encoders produce (positive sign).
pub const E4M3_NAN: u8 = 0x7f;
/// The canonical e5m2 NaN code (see [`E4M3_NAN`]).
pub const E5M2_NAN: u8 = 0x7f;
const E4M3_MAX_CODE: u32 = 0x7e;
const E5M2_MAX_CODE: u32 = 0x7b;
const E5M2_INF_CODE: u32 = 0x7c;

fn sign_of(x: f32, format: Minifloat) -> u32 {
    if x.is_sign_negative() {
        format.sign_bit()
    } else {
        0
    }
}

/// The value of an e4m3fn code: 0x7f and 0xff are NaN, everything else finite (±448 at most).
///
/// ```
/// use small4::quant::fp8::e4m3_to_f32;
///
/// assert_eq!(e4m3_to_f32(0x7e), 448.0);
/// assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
/// assert_eq!(e4m3_to_f32(0xb8), -1.0);
/// assert!(e4m3_to_f32(0xff).is_nan());
/// ```
pub fn e4m3_to_f32(code: u8) -> f32 {
    let magnitude = code as u32 & E4M3.magnitude_mask();
    if magnitude == 0x7f {
        return f32::NAN;
    }
    let value = E4M3.decode_magnitude(magnitude) as f32;
    if code & 0x80 != 0 {
        -value
    } else {
        value
    }
}

/// Round to nearest even, saturating to ±448; NaN -> 0x7f; -0.0 and negative values that round to zero -> 0x80.
///
/// ```
/// use small4::quant::fp8::f32_to_e4m3;
///
/// assert_eq!(f32_to_e4m3(448.0), 0x7e);
/// assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xfe); // saturates to -448
/// assert_eq!(f32_to_e4m3(432.0), 0x7e); // midpoint of 416 (0x7d) and 448 (0x7e): the even code
/// assert_eq!(f32_to_e4m3(-1e-9), 0x80); // underflow keeps its sign
/// ```
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return E4M3_NAN;
    }
    let magnitude = if x.is_infinite() { E4M3_MAX_CODE } else { E4M3.encode_magnitude(x.abs() as f64).min(E4M3_MAX_CODE) };
    (sign_of(x, E4M3) | magnitude) as u8
}

/// The value of an e5m2 code: 0x7c / 0xfc are ±infinity, 0x7d..=0x7f (either sign) NaN.
///
/// ```
/// use small4::quant::fp8::e5m2_to_f32;
///
/// assert_eq!(e5m2_to_f32(0x3c), 1.0);
/// assert_eq!(e5m2_to_f32(0x7b), 57344.0);
/// assert_eq!(e5m2_to_f32(0xfc), f32::NEG_INFINITY);
/// assert!(e5m2_to_f32(0x7d).is_nan());
/// ```
pub fn e5m2_to_f32(code: u8) -> f32 {
    let magnitude = code as u32 & E5M2.magnitude_mask();
    let value = match magnitude {
        E5M2_INF_CODE => f32::INFINITY,
        m if m > E5M2_INF_CODE => return f32::NAN,
        m => E5M2.decode_magnitude(m) as f32,
    };
    if code & 0x80 != 0 {
        -value
    } else {
        value
    }
}

/// IEEE behaviour: round to nearest even, overflow (from 61440 up, the midpoint past 57344) and infinities -> ±inf,
/// NaN -> 0x7f.
///
/// ```
/// use small4::quant::fp8::f32_to_e5m2;
///
/// assert_eq!(f32_to_e5m2(61439.0), 0x7b); // below the midpoint past 57344: the largest finite code
/// assert_eq!(f32_to_e5m2(61440.0), 0x7c); // at it: infinity
/// assert_eq!(f32_to_e5m2(-1.0), 0xbc);
/// ```
pub fn f32_to_e5m2(x: f32) -> u8 {
    if x.is_nan() {
        return E5M2_NAN;
    }
    let magnitude = if x.is_infinite() { E5M2_INF_CODE } else { E5M2.encode_magnitude(x.abs() as f64).min(E5M2_INF_CODE) };
    (sign_of(x, E5M2) | magnitude) as u8
}

/// Like PTX `cvt.rn.satfinite.e5m2x2.f32`: overflow and infinities saturate to ±57344, NaN -> 0x7f.
///
/// ```
/// use small4::quant::fp8::f32_to_e5m2_satfinite;
///
/// assert_eq!(f32_to_e5m2_satfinite(f32::INFINITY), 0x7b);
/// assert_eq!(f32_to_e5m2_satfinite(-1e9), 0xfb);
/// assert_eq!(f32_to_e5m2_satfinite(1.0), 0x3c); // in range it agrees with f32_to_e5m2
/// ```
pub fn f32_to_e5m2_satfinite(x: f32) -> u8 {
    if x.is_nan() {
        return E5M2_NAN;
    }
    let magnitude = if x.is_infinite() { E5M2_MAX_CODE } else { E5M2.encode_magnitude(x.abs() as f64).min(E5M2_MAX_CODE) };
    (sign_of(x, E5M2) | magnitude) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent decoding by the textbook formula, to check the shared decoder.
    fn e4m3_by_formula(code: u8) -> f32 {
        let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
        let e = ((code >> 3) & 0xf) as i32;
        let m = (code & 7) as f32;
        if e == 0 {
            sign * m / 8.0 * 2f32.powi(-6)
        } else {
            sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
        }
    }

    fn finite_codes(decode: fn(u8) -> f32) -> Vec<u8> {
        (0..=255u8).filter(|&c| decode(c).is_finite()).collect()
    }

    #[test]
    fn e4m3_decodes_every_code() {
        let mut nans = 0;
        for code in 0..=255u8 {
            let v = e4m3_to_f32(code);
            if code & 0x7f == 0x7f {
                assert!(v.is_nan(), "{code:#04x}");
                nans += 1;
            } else {
                assert_eq!(v.to_bits(), e4m3_by_formula(code).to_bits(), "{code:#04x}");
            }
        }
        assert_eq!(nans, 2);
        assert_eq!(e4m3_to_f32(0x7e), 448.0);
        assert_eq!(e4m3_to_f32(0xfe), -448.0);
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9));
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6));
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0x80).to_bits(), (-0.0f32).to_bits());
    }

    #[test]
    fn e5m2_decodes_every_code() {
        for code in 0..=255u8 {
            let v = e5m2_to_f32(code);
            let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
            let e = ((code >> 2) & 0x1f) as i32;
            let m = (code & 3) as f32;
            match e {
                31 if m == 0.0 => assert_eq!(v, sign * f32::INFINITY),
                31 => assert!(v.is_nan(), "{code:#04x}"),
                0 => assert_eq!(v, sign * m / 4.0 * 2f32.powi(-14), "{code:#04x}"),
                _ => assert_eq!(v, sign * (1.0 + m / 4.0) * 2f32.powi(e - 15), "{code:#04x}"),
            }
        }
        assert_eq!(e5m2_to_f32(0x7b), E5M2_MAX);
        assert_eq!(e5m2_to_f32(0x01), 2f32.powi(-16));
    }

    /// Every finite code re-encodes to itself (both signs of zero included).
    #[test]
    fn round_trip_every_finite_code() {
        for code in finite_codes(e4m3_to_f32) {
            assert_eq!(f32_to_e4m3(e4m3_to_f32(code)), code, "e4m3 {code:#04x}");
        }
        for code in finite_codes(e5m2_to_f32) {
            assert_eq!(f32_to_e5m2(e5m2_to_f32(code)), code, "e5m2 {code:#04x}");
            assert_eq!(f32_to_e5m2_satfinite(e5m2_to_f32(code)), code, "e5m2 satfinite {code:#04x}");
        }
        assert_eq!(f32_to_e5m2(f32::NEG_INFINITY), 0xfc);
    }

    /// Positive codes 0..max are strictly increasing in value, negative codes mirror them.
    #[test]
    fn codes_are_ordered() {
        for (decode, max_code) in [(e4m3_to_f32 as fn(u8) -> f32, 0x7eu8), (e5m2_to_f32, 0x7c)] {
            for code in 1..=max_code {
                assert!(decode(code) > decode(code - 1), "{code:#04x}");
                assert_eq!(decode(code | 0x80), -decode(code));
            }
        }
    }

    /// At the midpoint between each pair of neighbours the encoder picks the even code; just off the midpoint it
    /// picks the nearer one.
    fn check_midpoints(decode: fn(u8) -> f32, encode: fn(f32) -> u8, max_code: u8) {
        for sign in [0u8, 0x80] {
            for low in 0..max_code {
                let (a, b) = (decode(sign | low), decode(sign | (low + 1)));
                let mid = (a + b) / 2.0; // exact in f32: fp8 values have 4 significant bits
                assert_eq!((mid as f64), (a as f64 + b as f64) / 2.0);
                let even = if low % 2 == 0 { low } else { low + 1 };
                assert_eq!(encode(mid), sign | even, "midpoint of {low:#04x} and {:#04x}", low + 1);
                // |a| < |mid| < |b|: one f32 ulp of magnitude either side.
                let (toward_a, toward_b) = (f32::from_bits(mid.to_bits() - 1), f32::from_bits(mid.to_bits() + 1));
                assert_eq!(encode(toward_a), sign | low, "just below midpoint {mid}");
                assert_eq!(encode(toward_b), sign | (low + 1), "just above midpoint {mid}");
            }
        }
    }

    #[test]
    fn e4m3_ties_to_even_at_every_midpoint() {
        check_midpoints(e4m3_to_f32, f32_to_e4m3, 0x7e);
    }

    #[test]
    fn e5m2_ties_to_even_at_every_midpoint() {
        check_midpoints(e5m2_to_f32, f32_to_e5m2, 0x7b);
    }

    #[test]
    fn e4m3_saturates_and_maps_nan() {
        for x in [448.0f32, 449.0, 464.0, 480.0, 1e6, f32::MAX, f32::INFINITY] {
            assert_eq!(f32_to_e4m3(x), 0x7e, "{x}");
            assert_eq!(f32_to_e4m3(-x), 0xfe, "{x}");
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7f);
        assert_eq!(f32_to_e4m3(-f32::NAN), 0x7f);
        assert_eq!(f32_to_e4m3(416.0), 0x7d);
        assert_eq!(f32_to_e4m3(432.0), 0x7e); // midpoint of 416 (0x7d) and 448: the even code
    }

    #[test]
    fn e5m2_overflows_to_infinity_or_saturates() {
        assert_eq!(f32_to_e5m2(61439.0), 0x7b);
        assert_eq!(f32_to_e5m2(61440.0), 0x7c); // midpoint to the "next" code, which is infinity (even)
        assert_eq!(f32_to_e5m2(-1e9), 0xfc);
        assert_eq!(f32_to_e5m2_satfinite(1e9), 0x7b);
        assert_eq!(f32_to_e5m2_satfinite(f32::NEG_INFINITY), 0xfb);
        assert_eq!(f32_to_e5m2(f32::NAN), 0x7f);
        assert_eq!(f32_to_e5m2_satfinite(f32::NAN), 0x7f);
    }

    #[test]
    fn subnormals_and_underflow() {
        let min = 2f32.powi(-9);
        assert_eq!(f32_to_e4m3(min), 0x01);
        assert_eq!(f32_to_e4m3(min / 2.0), 0x00); // tie between 0 and the smallest subnormal: even is zero
        assert_eq!(f32_to_e4m3(min / 2.0 * 1.0001), 0x01);
        assert_eq!(f32_to_e4m3(-min / 4.0), 0x80); // negative underflow keeps its sign
        assert_eq!(f32_to_e4m3(f32::from_bits(1)), 0x00); // f32 subnormal input
        assert_eq!(f32_to_e4m3(7.5 * min), 0x08); // rounds up out of the subnormals into 2^-6 (even)
        assert_eq!(f32_to_e5m2(2f32.powi(-16)), 0x01);
        assert_eq!(f32_to_e5m2(2f32.powi(-17)), 0x00);
    }
}
