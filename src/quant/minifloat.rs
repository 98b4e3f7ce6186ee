//! The one encoder/decoder behind every small float format here (e4m3, e5m2, e2m1): sign, `exp_bits` exponent bits
//! with `bias`, `man_bits` mantissa bits, subnormals at exponent field 0. Special codes (NaN, infinity) and the
//! overflow rule differ per format and are handled by the callers in `fp8.rs` / `fp4.rs`.

#[derive(Clone, Copy, Debug)]
pub(crate) struct Minifloat {
    pub exp_bits: u32,
    pub man_bits: u32,
    pub bias: i32,
}

impl Minifloat {
    /// Mask of the magnitude bits (everything below the sign).
    pub const fn magnitude_mask(self) -> u32 {
        (1 << (self.exp_bits + self.man_bits)) - 1
    }

    pub const fn sign_bit(self) -> u32 {
        1 << (self.exp_bits + self.man_bits)
    }

    /// The value of a magnitude code read as an ordinary (finite) number, ignoring any special meaning the format
    /// gives the top codes.
    pub fn decode_magnitude(self, code: u32) -> f64 {
        let exponent = (code >> self.man_bits) as i32;
        let mantissa = (code & ((1 << self.man_bits) - 1)) as f64;
        let unit = (1u32 << self.man_bits) as f64;
        if exponent == 0 {
            mantissa / unit * 2f64.powi(1 - self.bias)
        } else {
            (1.0 + mantissa / unit) * 2f64.powi(exponent - self.bias)
        }
    }

    /// The magnitude code nearest to `magnitude` (finite, >= 0), ties to the even code, with no upper limit: a value
    /// past the largest exponent returns a code above the format's range, which the caller saturates or maps to
    /// infinity. Rounding up out of the subnormals or out of a binade carries into the exponent field by itself,
    /// because the code of `(e, 2^m)` equals the code of `(e + 1, 0)`.
    pub fn encode_magnitude(self, magnitude: f64) -> u32 {
        debug_assert!(magnitude.is_finite() && magnitude >= 0.0);
        let min_normal_exp = 1 - self.bias;
        if magnitude < 2f64.powi(min_normal_exp) {
            // Subnormal quantum 2^(min_normal_exp - m); the scaling by a power of two is exact.
            return (magnitude * 2f64.powi(self.man_bits as i32 - min_normal_exp)).round_ties_even() as u32;
        }
        let exponent = magnitude.log2().floor() as i32;
        // log2 of a value just below a power of two can round up to that power: correct the binade exactly.
        let exponent = if 2f64.powi(exponent) > magnitude { exponent - 1 } else { exponent };
        let steps = (magnitude * 2f64.powi(self.man_bits as i32 - exponent)).round_ties_even();
        let steps = steps.min(u32::MAX as f64 / 2.0) as u64;
        let code = (((exponent + self.bias) as i64) << self.man_bits) + steps as i64 - (1i64 << self.man_bits);
        code.clamp(0, u32::MAX as i64) as u32
    }
}
