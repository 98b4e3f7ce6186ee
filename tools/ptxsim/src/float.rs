//! Small float formats (f16, bf16, fp8 e4m3/e5m2, fp4 e2m1, and f32 itself) with exact rounding: every conversion
//! goes through one generic encoder that rounds a real value (held exactly in f64) in any IEEE-like format.

use crate::ir::Rnd;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Format {
    pub exp_bits: u32,
    pub man_bits: u32,
    pub bias: i32,
    /// Largest finite magnitude, as bits without the sign.
    pub max_finite: u32,
    /// Infinity bits without the sign, if the format has one.
    pub inf: Option<u32>,
    /// The NaN that conversions produce (sign bit clear), if the format has one.
    pub nan: Option<u32>,
}

impl Format {
    pub fn sign_bit(&self) -> u32 {
        1 << (self.exp_bits + self.man_bits)
    }
}

pub const F32: Format = Format { exp_bits: 8, man_bits: 23, bias: 127, max_finite: 0x7f7f_ffff, inf: Some(0x7f80_0000), nan: Some(0x7fff_ffff) };
pub const F16: Format = Format { exp_bits: 5, man_bits: 10, bias: 15, max_finite: 0x7bff, inf: Some(0x7c00), nan: Some(0x7fff) };
pub const BF16: Format = Format { exp_bits: 8, man_bits: 7, bias: 127, max_finite: 0x7f7f, inf: Some(0x7f80), nan: Some(0x7fff) };
/// OCP fp8 E4M3 ("FN"): no infinities, S.1111.111 is NaN, max 448.
pub const E4M3: Format = Format { exp_bits: 4, man_bits: 3, bias: 7, max_finite: 0x7e, inf: None, nan: Some(0x7f) };
pub const E5M2: Format = Format { exp_bits: 5, man_bits: 2, bias: 15, max_finite: 0x7b, inf: Some(0x7c), nan: Some(0x7f) };
/// fp4 E2M1: no infinities or NaN, max 6.
pub const E2M1: Format = Format { exp_bits: 2, man_bits: 1, bias: 1, max_finite: 0x7, inf: None, nan: None };
/// f32 with 13 fraction bits (MMA-Sim's "f32_e8m13": what Hopper's fp8 tensor-core sums keep); its bits shifted
/// left by 10 are the f32 bits.
pub const F32_E8M13: Format =
    Format { exp_bits: 8, man_bits: 13, bias: 127, max_finite: 0x7f7f_ffff >> 10, inf: Some(0x7f80_0000 >> 10), nan: Some(0x7fff_ffff >> 10) };
/// tf32 values live in f32 bit positions with the low 13 mantissa bits zero.
pub const TF32: Format =
    Format { exp_bits: 8, man_bits: 10, bias: 127, max_finite: 0x7f7f_e000 >> 13, inf: Some(0x7f80_0000 >> 13), nan: Some(0x7fff_ffff >> 13) };

/// 2^e exactly, for the normal f64 range (every exponent these formats need).
#[inline(always)]
pub fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// Exact value of an encoded number (bit manipulation only: this runs for every element of every conversion).
#[inline]
pub fn decode(bits: u32, f: Format) -> f64 {
    if f == BF16 {
        return f32::from_bits(bits << 16) as f64;
    }
    let negative = bits & f.sign_bit() != 0;
    let mag = bits & (f.sign_bit() - 1);
    if f.inf.is_none() && f.nan == Some(mag) {
        return f64::NAN;
    }
    let e = (mag >> f.man_bits) as i32;
    let man = (mag & ((1 << f.man_bits) - 1)) as u64;
    let v = if f.inf.is_some() && e == (1 << f.exp_bits) - 1 {
        if man == 0 {
            f64::INFINITY
        } else {
            f64::NAN
        }
    } else if e == 0 {
        man as f64 * pow2(1 - f.bias - f.man_bits as i32)
    } else {
        f64::from_bits((((e - f.bias + 1023) as u64) << 52) | (man << (52 - f.man_bits)))
    };
    if negative {
        -v
    } else {
        v
    }
}

fn round_int(q: f64, mode: Rnd, negative: bool) -> f64 {
    match mode {
        Rnd::Rz | Rnd::Rzi => q.trunc(),
        Rnd::Rm | Rnd::Rmi => {
            if negative {
                q.ceil()
            } else {
                q.floor()
            }
        }
        Rnd::Rp | Rnd::Rpi => {
            if negative {
                q.floor()
            } else {
                q.ceil()
            }
        }
        Rnd::Rna => q.round(),
        _ => q.round_ties_even(),
    }
}

/// Rounds `x` into format `f`. `satfinite` clamps out-of-range values to the largest finite value (NaN stays NaN;
/// for formats without NaN it becomes the positive maximum). Formats without infinity saturate on overflow too.
pub fn encode(x: f64, f: Format, mode: Rnd, satfinite: bool) -> u32 {
    let sign = if x.is_sign_negative() { f.sign_bit() } else { 0 };
    if x.is_nan() {
        return f.nan.unwrap_or(f.max_finite);
    }
    let a = x.abs();
    let overflow = || -> u32 {
        // Directed roundings toward zero keep the largest finite value (IEEE 754 7.4).
        let to_max = satfinite || mode == Rnd::Rz || (mode == Rnd::Rm && sign == 0) || (mode == Rnd::Rp && sign != 0);
        match f.inf {
            Some(inf) if !to_max => sign | inf,
            _ => sign | f.max_finite,
        }
    };
    if a.is_infinite() {
        return match f.inf {
            Some(inf) if !satfinite => sign | inf,
            _ => sign | f.max_finite,
        };
    }
    if a == 0.0 {
        return sign;
    }
    // floor(log2 a) from the f64 exponent field, clamped to the format's smallest normal exponent (below it the
    // quantum is the subnormal step).
    let m = f.man_bits as i32;
    let emin = 1 - f.bias;
    let raw_e = ((a.to_bits() >> 52) & 0x7ff) as i32;
    let e = if raw_e == 0 { -1023 } else { raw_e - 1023 }.max(emin);
    // a / quantum is exact (a power-of-two scaling), so the only rounding is round_int's.
    let q = round_int(a * pow2(m - e), mode, sign != 0);
    if q == 0.0 {
        return sign;
    }
    let full = pow2(m + 1);
    let (e, q) = if q >= full { (e + 1, q * 0.5) } else { (e, q) };
    let implicit = pow2(m);
    let mag = if q < implicit {
        q as u32 // subnormal (only at e == emin)
    } else {
        (((e + f.bias) as u32) << f.man_bits) | (q - implicit) as u32
    };
    // Encodings are monotonic in magnitude, so anything above the largest finite encoding overflowed (this also
    // catches e4m3's S.1111.111 NaN pattern and the infinities).
    if mag > f.max_finite {
        return overflow();
    }
    sign | mag
}

/// f32 -> format, rounding exactly (f32 values are exact in f64).
pub fn from_f32(v: f32, f: Format, mode: Rnd, satfinite: bool) -> u32 {
    if f == BF16 && matches!(mode, Rnd::Rn | Rnd::None) && !satfinite {
        // Fast path for the most common conversion: round-to-nearest-even on the bit pattern.
        let b = v.to_bits();
        if v.is_nan() {
            return 0x7fff;
        }
        return (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) & 0xffff;
    }
    encode(v as f64, f, mode, satfinite)
}

pub fn to_f32(bits: u32, f: Format) -> f32 {
    if f == BF16 {
        return f32::from_bits(bits << 16);
    }
    decode(bits, f) as f32
}

/// f64 -> f32 with a rounding mode.
pub fn f64_to_f32(v: f64, mode: Rnd) -> f32 {
    if matches!(mode, Rnd::Rn | Rnd::None) {
        return v as f32;
    }
    f32::from_bits(encode(v, F32, mode, false))
}

/// Integer (as i128 for all 64-bit signed and unsigned values) -> f64 exactly enough to be rounded once more:
/// values beyond 53 bits are rounded to odd, which makes the later rounding to <= 51 bits exact.
pub fn int_to_f64_for_rounding(v: i128) -> f64 {
    let neg = v < 0;
    let mut m = v.unsigned_abs();
    let bits = 128 - m.leading_zeros();
    if bits > 53 {
        let shift = bits - 53;
        let sticky = (m & ((1u128 << shift) - 1)) != 0;
        m >>= shift;
        m |= sticky as u128;
        let r = m as f64 * pow2(shift as i32);
        return if neg { -r } else { r };
    }
    if neg {
        -(m as f64)
    } else {
        m as f64
    }
}

/// The exact sum of exactly representable terms, rounded once into `f` with `mode` (the tensor-core "exact sum, round
/// once" model): a NaN term, or infinities of both signs, give the format's NaN; an infinity gives itself. The sum is
/// taken in f64 when no addition rounds (checked with TwoSum), otherwise in a fixed-point integer spanning the whole
/// f64 range.
pub fn sum_round_once(terms: &[f64], f: Format, mode: Rnd) -> u32 {
    let Some((&first, rest)) = terms.split_first() else { return 0 };
    let mut sum = first;
    let mut exact = true;
    for &t in rest {
        // TwoSum (Knuth): `err` is the rounding error of `sum + t`.
        let s = sum + t;
        let tt = s - sum;
        let err = (sum - (s - tt)) + (t - tt);
        exact &= err == 0.0;
        sum = s;
    }
    if !sum.is_finite() {
        if terms.iter().any(|t| t.is_nan()) || (terms.contains(&f64::INFINITY) && terms.contains(&f64::NEG_INFINITY)) {
            return encode(f64::NAN, f, mode, false);
        }
        match terms.iter().find(|t| t.is_infinite()) {
            Some(&inf) => return encode(inf, f, mode, false),
            None => sum = exact_sum_to_odd(terms), // finite terms whose f64 partial sums overflowed
        }
    } else if !exact {
        sum = exact_sum_to_odd(terms);
    }
    if f == F32 && matches!(mode, Rnd::Rn | Rnd::None) {
        return (sum as f32).to_bits();
    }
    encode(sum, f, mode, false)
}

/// How tensor-core instructions (`mma.sync`, `wgmma.mma_async`) round `D = C + sum_k A[k] B[k]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TensorArith {
    /// C and the products summed exactly, rounded once to nearest-even into the accumulator type.
    #[default]
    ExactRoundOnce,
    /// The MMA-Sim model of Hopper's tensor cores (microsoft/MMA-Sim `nv_fused_dot_add`, ../shared/HOPPER-ASYNC.md
    /// §1.6): each term (C and every product) is truncated toward zero to 25 fraction bits (13 with e4m3/e5m2
    /// inputs) relative to the largest term exponent, the integer sum is truncated (RZ) to f32 (with fp8 inputs to
    /// 13 fraction bits: "f32_e8m13", UNVERIFIED on an H100) or rounded to nearest-even into f16; NaN anywhere (or
    /// opposite infinities) gives the canonical NaN, an infinity itself, and an f32 sum beyond the range infinity;
    /// an all-zero sum is +0. Zero terms take no part in the largest exponent (MMA-Sim's current
    /// `simulator/functions.py` gives them exponent -999; the older `arithmetic.py` that HOPPER-ASYNC.md §1.6 quotes
    /// gave -126, which can truncate a tiny C against a zero product's exponent).
    HopperTruncated,
}

/// `D = C + sign * sum_k a[k] b[k]` as the accumulator format `d` under `model`. `a`, `b` and `c` hold exact values of
/// the formats `fa`, `fb` and `fc` (products are exact in f64); returns D's bits.
#[allow(clippy::too_many_arguments)]
pub fn dot_add(model: TensorArith, c: f64, fc: Format, a: &[f64], b: &[f64], sign: f64, (fa, fb): (Format, Format), d: Format) -> u32 {
    let mut terms = [0f64; 65];
    let k = a.len();
    terms[0] = c;
    for i in 0..k {
        terms[1 + i] = sign * a[i] * b[i];
    }
    let terms = &terms[..1 + k];
    match model {
        TensorArith::ExactRoundOnce => sum_round_once(terms, d, Rnd::Rn),
        TensorArith::HopperTruncated => {
            let f64_sum: f64 = terms.iter().sum();
            if !f64_sum.is_finite() {
                // Only non-finite inputs get here (finite products and C stay far below the f64 range).
                return encode(f64_sum, d, Rnd::Rn, false);
            }
            let fp8 = [E4M3, E5M2].contains(&fa);
            let frac_bits = if fp8 { 13 } else { 25 };
            // Terms as (negative, integer significand M, exponent e, fraction bits of M): value = ±M 2^(e - frac).
            let product = |i: usize| {
                let (ma, ea) = split(a[i], fa)?;
                let (mb, eb) = split(b[i], fb)?;
                Some((terms[1 + i] < 0.0, ma * mb, ea + eb, (fa.man_bits + fb.man_bits) as i32))
            };
            let c_term = split(c, fc).map(|(m, e)| (c < 0.0, m, e, fc.man_bits as i32));
            let all = || c_term.into_iter().chain((0..k).filter_map(product));
            // Zero terms take no part in the largest exponent (MMA-Sim gives them exponent -999).
            let Some(max_e) = all().map(|t| t.2).max() else { return 0 };
            let sum: i64 = all()
                .map(|(neg, m, e, frac)| {
                    let shift = frac_bits + e - max_e - frac;
                    let aligned = if shift >= 0 {
                        (m << shift) as i64
                    } else if shift > -64 {
                        (m >> -shift) as i64
                    } else {
                        0
                    };
                    if neg {
                        -aligned
                    } else {
                        aligned
                    }
                })
                .sum();
            if sum == 0 {
                return 0;
            }
            let v = sum as f64 * pow2(max_e - frac_bits); // |sum| < 2^33: exact
            if d == F16 {
                encode(v, F16, Rnd::Rn, false)
            } else if v.abs() >= pow2(128) {
                encode(v, F32, Rnd::Rn, false) // infinity
            } else if fp8 {
                encode(v, F32_E8M13, Rnd::Rz, false) << 10
            } else {
                encode(v, F32, Rnd::Rz, false)
            }
        }
    }
}

/// `v` (exact in `f`, non-zero) as (M, e) with `|v| = M 2^(e - f.man_bits)`, e at least the format's smallest normal
/// exponent (MMA-Sim's `extract_significand_exponent`: significand in [1, 2), or below 1 for subnormals).
fn split(v: f64, f: Format) -> Option<(u64, i32)> {
    if v == 0.0 {
        return None;
    }
    let e = (((v.abs().to_bits() >> 52) & 0x7ff) as i32 - 1023).max(1 - f.bias);
    Some(((v.abs() * pow2(f.man_bits as i32 - e)) as u64, e))
}

/// The exact sum of finite terms, rounded to odd at 53 bits: rounding that once more to a format of at most 51
/// significand bits gives the correctly rounded sum.
fn exact_sum_to_odd(terms: &[f64]) -> f64 {
    // Two's-complement fixed point in units of 2^-1074 (the smallest f64): finite values stay below bit 2098, and
    // the carries of a few thousand terms fit in the top word.
    const WORDS: usize = 35;
    let mut acc = [0u64; WORDS];
    for &t in terms {
        if t == 0.0 {
            continue;
        }
        let bits = t.to_bits();
        let raw_e = ((bits >> 52) & 0x7ff) as usize;
        let frac = bits & ((1 << 52) - 1);
        // t = ±m * 2^(pos - 1074)
        let (m, pos) = if raw_e == 0 { (frac, 0) } else { (frac | 1 << 52, raw_e - 1) };
        let wide = (m as u128) << (pos % 64);
        let parts = [wide as u64, (wide >> 64) as u64];
        let mut carry = false;
        for (i, word) in acc.iter_mut().enumerate().skip(pos / 64) {
            let part = parts.get(i - pos / 64).copied().unwrap_or(0);
            if t > 0.0 {
                let (v, c1) = word.overflowing_add(part);
                let (v, c2) = v.overflowing_add(carry as u64);
                *word = v;
                carry = c1 || c2;
            } else {
                let (v, b1) = word.overflowing_sub(part);
                let (v, b2) = v.overflowing_sub(carry as u64);
                *word = v;
                carry = b1 || b2;
            }
            if i > pos / 64 + 1 && !carry {
                break;
            }
        }
    }
    let negative = acc[WORDS - 1] >> 63 == 1;
    if negative {
        let mut carry = true;
        for word in acc.iter_mut() {
            let (v, c) = (!*word).overflowing_add(carry as u64);
            *word = v;
            carry = c;
        }
    }
    let Some(top_word) = acc.iter().rposition(|&w| w != 0) else { return 0.0 };
    let top = top_word * 64 + 63 - acc[top_word].leading_zeros() as usize;
    let bit_window = |lo: usize| -> u64 {
        let (w, s) = (lo / 64, lo % 64);
        let high = if s == 0 { 0 } else { acc.get(w + 1).map_or(0, |&x| x << (64 - s)) };
        (acc[w] >> s) | high
    };
    let (m, lo) = if top < 53 {
        (bit_window(0), 0)
    } else {
        let lo = top - 52;
        let sticky = acc[..lo / 64].iter().any(|&w| w != 0) || acc[lo / 64] & ((1u64 << (lo % 64)) - 1) != 0;
        ((bit_window(lo) & ((1 << 53) - 1)) | sticky as u64, lo)
    };
    // m * 2^(lo - 1074), in two exact scalings so that neither leaves the normal range.
    let e = lo as i32 - 1074;
    let v = m as f64 * pow2(e / 2) * pow2(e - e / 2);
    if negative {
        -v
    } else {
        v
    }
}

/// Flushes an f32 subnormal to a signed zero (`.ftz`).
#[inline(always)]
pub fn ftz32(v: f32) -> f32 {
    if v.is_subnormal() {
        f32::from_bits(v.to_bits() & 0x8000_0000)
    } else {
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_round_to_nearest_even() {
        assert_eq!(from_f32(1.0, BF16, Rnd::Rn, false), 0x3f80);
        // 1 + 2^-8 is a tie between 1.0 and 1+2^-7: even is 1.0.
        assert_eq!(from_f32(1.0 + 2f32.powi(-8), BF16, Rnd::Rn, false), 0x3f80);
        assert_eq!(encode(1.0 + pow2(-8), BF16, Rnd::Rn, false), 0x3f80);
        assert_eq!(encode(1.0 + 3.0 * pow2(-8), BF16, Rnd::Rn, false), 0x3f82);
        assert_eq!(encode(1.0 + pow2(-8), BF16, Rnd::Rp, false), 0x3f81);
        assert_eq!(encode(-(1.0 + pow2(-8)), BF16, Rnd::Rm, false), 0xbf81);
        assert_eq!(encode(f32::MAX as f64, BF16, Rnd::Rn, false), 0x7f80);
        assert_eq!(encode(f32::MAX as f64, BF16, Rnd::Rz, false), 0x7f7f);
    }

    #[test]
    fn f16_matches_ieee() {
        assert_eq!(encode(65504.0, F16, Rnd::Rn, false), 0x7bff);
        assert_eq!(encode(65520.0, F16, Rnd::Rn, false), 0x7c00); // the tie rounds to infinity
        assert_eq!(encode(65519.0, F16, Rnd::Rn, false), 0x7bff);
        assert_eq!(encode(pow2(-24), F16, Rnd::Rn, false), 0x0001);
        assert_eq!(encode(pow2(-25), F16, Rnd::Rn, false), 0x0000); // tie to even zero
        assert_eq!(encode(3.0 * pow2(-26), F16, Rnd::Rn, false), 0x0001);
        assert_eq!(decode(0x3c00, F16), 1.0);
        assert_eq!(decode(0x0001, F16), pow2(-24));
    }

    #[test]
    fn fp8_and_fp4() {
        assert_eq!(encode(448.0, E4M3, Rnd::Rn, true), 0x7e);
        assert_eq!(encode(1000.0, E4M3, Rnd::Rn, true), 0x7e);
        assert_eq!(encode(-1000.0, E4M3, Rnd::Rn, true), 0xfe);
        assert_eq!(encode(f64::NAN, E4M3, Rnd::Rn, true), 0x7f);
        assert!(decode(0x7f, E4M3).is_nan());
        assert_eq!(decode(0x01, E4M3), pow2(-9));
        assert_eq!(encode(1.0, E5M2, Rnd::Rn, false), 0x3c);
        assert_eq!(encode(100000.0, E5M2, Rnd::Rn, false), 0x7c);
        assert_eq!(encode(100000.0, E5M2, Rnd::Rn, true), 0x7b);
        assert_eq!(decode(0x7b, E5M2), 57344.0);
        for (v, b) in [(0.5, 1u32), (1.0, 2), (1.5, 3), (2.0, 4), (3.0, 5), (4.0, 6), (6.0, 7), (-6.0, 0xf), (5.0, 6), (0.25, 0), (0.75, 2), (2.5, 4), (3.5, 6)]
        {
            assert_eq!(encode(v, E2M1, Rnd::Rn, true), b, "{v}");
        }
        assert_eq!(encode(7.0, E2M1, Rnd::Rn, true), 7);
    }

    #[test]
    fn every_bf16_and_e4m3_round_trips() {
        for b in 0..0x10000u32 {
            let v = decode(b, BF16);
            if !v.is_nan() {
                assert_eq!(encode(v, BF16, Rnd::Rn, false), b);
            }
        }
        for b in 0..0x100u32 {
            let v = decode(b, E4M3);
            if !v.is_nan() {
                assert_eq!(encode(v, E4M3, Rnd::Rn, true), b);
            }
        }
    }

    #[test]
    fn sums_round_once() {
        // 1 + 2^-60 - 2^-61: the f64 sum rounds twice (to 1), the exact sum is just above 1.
        let terms = [1.0, pow2(-60), -pow2(-61)];
        assert_eq!(sum_round_once(&terms, F32, Rnd::Rn), 0x3f80_0000);
        assert_eq!(sum_round_once(&[1.0, pow2(-24), pow2(-70)], F32, Rnd::Rn), 0x3f80_0001, "the tie is broken by the tiny term");
        assert_eq!(sum_round_once(&[1.0, pow2(-24)], F32, Rnd::Rn), 0x3f80_0000, "an exact tie goes to even");
        assert_eq!(sum_round_once(&[-1.0, -pow2(-24), -pow2(-70)], F32, Rnd::Rn), 0xbf80_0001);
        assert_eq!(sum_round_once(&[1.0, -pow2(-70)], F32, Rnd::Rz), 0x3f7f_ffff);
        assert_eq!(sum_round_once(&[pow2(100), pow2(-100), -pow2(100)], F32, Rnd::Rn), (pow2(-100) as f32).to_bits());
        assert_eq!(sum_round_once(&[pow2(-149), pow2(-200)], F32, Rnd::Rn), 1);
        assert_eq!(sum_round_once(&[-0.0, -0.0], F32, Rnd::Rn), 0x8000_0000);
        assert_eq!(sum_round_once(&[1.0, f64::INFINITY], F16, Rnd::Rn), 0x7c00);
        assert_eq!(sum_round_once(&[f64::NEG_INFINITY, f64::INFINITY], F32, Rnd::Rn), 0x7fff_ffff);
        assert_eq!(sum_round_once(&[65504.0, 16.0, pow2(-40)], F16, Rnd::Rn), 0x7c00);
        assert_eq!(sum_round_once(&[f64::NAN, 1.0], F16, Rnd::Rn), 0x7fff);
        let big = f64::MAX;
        assert_eq!(sum_round_once(&[big, big, -big], F32, Rnd::Rn), 0x7f80_0000, "partial sums overflow, the exact sum rounds to inf");
        assert_eq!(sum_round_once(&[big, big, -big, -big, 1.0], F32, Rnd::Rn), 0x3f80_0000);
        assert_eq!(exact_sum_to_odd(&[pow2(1000), -f64::from_bits(1)]), pow2(1000) - pow2(947), "truncated to 53 ones, already odd");
    }

    /// `dot_add` under both models: (exact, Hopper) bits.
    fn both(c: f64, fc: Format, a: &[f64], b: &[f64], f: (Format, Format), d: Format) -> (u32, u32) {
        (dot_add(TensorArith::ExactRoundOnce, c, fc, a, b, 1.0, f, d), dot_add(TensorArith::HopperTruncated, c, fc, a, b, 1.0, f, d))
    }

    #[test]
    fn hopper_model_truncates_where_the_exact_sum_rounds() {
        let bf = (BF16, BF16);
        // 1 + 16 products of 3 * 2^-27: each is below the 25-bit grid of the largest exponent (2^0), so truncated to 0;
        // the exact sum is 1 + 3 * 2^-23.
        assert_eq!(both(1.0, F32, &[3.0 * pow2(-27); 16], &[1.0; 16], bf, F32), (0x3f80_0003, 0x3f80_0000));
        // 1 + 3 * 2^-25 (kept by the 25-bit alignment): RN rounds up to 1 + 2^-23, RZ keeps 1.
        assert_eq!(both(1.0, F32, &[3.0 * pow2(-25)], &[1.0], bf, F32), (0x3f80_0001, 0x3f80_0000));
        // C = 1 + 2^-23 and a product 2: E = 1, the grid 2^-24 keeps C whole; 3 + 2^-23 is an RN tie (to even: 3)
        // and truncates to 3: both give 3.
        assert_eq!(both(1.0 + pow2(-23), F32, &[2.0], &[1.0], bf, F32), (0x4040_0000, 0x4040_0000));
        // f16 D: 1 + 2^-11 is a tie (to even: 1), the exact sum's 2^-30 breaks it upward; Hopper's alignment drops it.
        let h = (F16, F16);
        assert_eq!(both(1.0, F16, &[pow2(-11), pow2(-15)], &[1.0, pow2(-15)], h, F16), (0x3c01, 0x3c00));
        // Overflow: f32::MAX + 2^103 is an RN tie that goes to infinity; Hopper truncates it back to MAX.
        assert_eq!(both(f32::MAX as f64, F32, &[pow2(52)], &[pow2(51)], bf, F32), (0x7f80_0000, 0x7f7f_ffff));
        // ... and a sum at 2^128 after truncation is infinity in both.
        assert_eq!(both(f32::MAX as f64, F32, &[pow2(52)], &[pow2(52)], bf, F32), (0x7f80_0000, 0x7f80_0000));
        // -0 plus -0 products: the exact sum keeps the sign, Hopper's integer sum gives +0.
        assert_eq!(both(-0.0, F32, &[-0.0, 0.0], &[1.0, -1.0], bf, F32), (0x8000_0000, 0));
        // NaN and infinities.
        assert_eq!(both(1.0, F32, &[f64::NAN], &[1.0], bf, F32), (0x7fff_ffff, 0x7fff_ffff));
        assert_eq!(both(1.0, F16, &[f64::INFINITY, f64::NEG_INFINITY], &[1.0, 1.0], h, F16), (0x7fff, 0x7fff));
        assert_eq!(both(1.0, F32, &[f64::NEG_INFINITY], &[2.0], (E5M2, E5M2), F32), (0xff80_0000, 0xff80_0000));
    }

    #[test]
    fn hopper_model_keeps_13_fraction_bits_with_fp8_inputs() {
        let fp8 = (E4M3, E4M3);
        // 256 + 2^-6: the product 2^-6 is below the 13-bit grid of E = 8 (2^-5).
        assert_eq!(both(0.0, F32, &[256.0, pow2(-6)], &[1.0, 1.0], fp8, F32), ((256.0 + pow2(-6) as f32).to_bits(), 256f32.to_bits()));
        // 16 * 1.875^2 + 2^-13: the alignment keeps 2^-13 (grid 2^-13 at E = 0: 2^-9 is an e4m3 subnormal, exponent
        // -6, times 2^-4), but the f32_e8m13 result has 13 fraction bits at 2^5: 56.25.
        let mut a = vec![1.875; 16];
        let mut b = vec![1.875; 16];
        a.push(pow2(-9));
        b.push(pow2(-4));
        assert_eq!(both(0.0, F32, &a, &b, fp8, F32), (((56.25 + pow2(-13)) as f32).to_bits(), 56.25f32.to_bits()));
        // With e5m2 A: the same rule; f16 D rounds to nearest as in the exact model.
        assert_eq!(both(0.0, F16, &[3.0, pow2(-11)], &[1.0, 1.0], (E5M2, E4M3), F16), (0x4200, 0x4200));
    }

    #[test]
    fn both_models_agree_on_small_integers() {
        for (fa, fb, d) in [(BF16, BF16, F32), (F16, F16, F16), (E4M3, E5M2, F32), (E5M2, E5M2, F16), (TF32, TF32, F32)] {
            let k = if fa.man_bits <= 3 { 32 } else { 16 };
            let a: Vec<f64> = (0..k).map(|i| ((i * 7) % 9) as f64 - 4.0).collect();
            let b: Vec<f64> = (0..k).map(|i| ((i * 5) % 7) as f64 - 3.0).collect();
            for c in [0.0, -37.0, 1024.0] {
                let (exact, hopper) = both(c, d, &a, &b, (fa, fb), d);
                assert_eq!(exact, hopper, "{fa:?} {d:?} C = {c}");
                let want = c + a.iter().zip(&b).map(|(x, y)| x * y).sum::<f64>();
                assert_eq!(exact, encode(want, d, Rnd::Rn, false));
            }
        }
    }

    #[test]
    fn wide_integers_round_once() {
        // 2^60 + 2^36 + 1 sits just above the f32 tie point 2^60 + 2^36: must round up, not down to even.
        let v: i128 = (1 << 60) + (1 << 36) + 1;
        let r = f64_to_f32(int_to_f64_for_rounding(v), Rnd::Rn);
        assert_eq!(r.to_bits(), ((1u64 << 60) as f32).to_bits() + 1);
    }
}
