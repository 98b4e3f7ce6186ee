//! Greedy and seeded temperature + top-p sampling on the CPU: the same algorithm and the same random stream as
//! `sample_rows` / `argmax_rows` in cuda/ops.cu, so a test can require the very same token.
//!
//! 1. m = max logit (NaN ignored); integer weights `w_i = floor(2^24 * 2^x)`, `x = (l_i - m) * (log2(e) / T)`, 0 below
//!    x = -25, from IEEE-exact f32 operations only (sub, mul, floor, a fixed Horner chain of fma), bit-identical on
//!    both sides;
//! 2. S = sum w_i (exact integers), target = ceil(S * P / 2^24) with P = floor(top_p * 2^24), at least 1
//!    (top_p >= 1 or NaN: S), all in integers;
//! 3. the nucleus is {i : w_i >= tau} with tau the largest weight whose "mass at or above" reaches the target (ties
//!    at tau all kept). The kernel finds tau by a 16-way search over integers; here, by sorting;
//! 4. R = floor(u * M / 2^64), u = 64 bits of Philox4x32-10(key = seed, counter = {step, 'SML4', 0, 0}), M the nucleus
//!    mass; the token is the first, in token order, whose running sum of nucleus weights exceeds R.
//!
//! Tokens whose weight is below 2^-24 of the most likely one are never sampled.

const LOG2_E: f32 = std::f32::consts::LOG2_E;
const WEIGHT_BITS: i32 = 24;

/// Index of the largest value, ties to the lower index, NaN ignored; -1 when there is no number.
pub fn argmax(row: &[f32]) -> i32 {
    let mut best: Option<(usize, f32)> = None;
    for (i, &v) in row.iter().enumerate() {
        if !v.is_nan() && best.is_none_or(|(_, b)| v > b) {
            best = Some((i, v));
        }
    }
    best.map_or(-1, |(i, _)| i as i32)
}

/// The fixed-point weight of a logit (see the module documentation); must match `fixed_point_weight` in cuda/ops.cu.
pub fn fixed_point_weight(logit: f32, max: f32, scale: f32) -> u32 {
    let x = (logit - max) * scale;
    // Also catches NaN (a NaN logit, or -inf - -inf).
    if x.is_nan() || x < -25.0 {
        return 0;
    }
    let n = x.floor();
    let f = x - n;
    // (ln 2)^k / k! for k = 7 down to 0, the same f32 values as in cuda/ops.cu.
    let mut poly: f32 = 1.525_273_4e-5;
    for c in [1.540_353e-4, 1.333_355_8e-3, 9.618_129e-3, 5.550_411e-2, 2.402_265e-1, 6.931_472e-1, 1.0f32] {
        poly = poly.mul_add(f, c);
    }
    let power = f32::from_bits((((n as i32) + WEIGHT_BITS + 127) << 23) as u32);
    (poly * power) as u32
}

/// Philox4x32-10 with counter {step, 'SML4', 0, 0} and the 64-bit seed as key: 64 uniform bits.
pub fn philox_u64(seed: u64, step: u32) -> u64 {
    let (mut c0, mut c1, mut c2, mut c3) = (step, 0x534d_4c34u32, 0u32, 0u32);
    let (mut k0, mut k1) = (seed as u32, (seed >> 32) as u32);
    for _ in 0..10 {
        let p0 = 0xD251_1F53u64 * c0 as u64;
        let p1 = 0xCD9E_8D57u64 * c2 as u64;
        let (hi0, lo0) = ((p0 >> 32) as u32, p0 as u32);
        let (hi1, lo1) = ((p1 >> 32) as u32, p1 as u32);
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 = k0.wrapping_add(0x9E37_79B9);
        k1 = k1.wrapping_add(0xBB67_AE85);
    }
    (c0 as u64) << 32 | c1 as u64
}

/// The token `sample_rows` picks for one row.
pub fn sample(row: &[f32], temperature: f32, top_p: f32, seed: u64, step: i32) -> i32 {
    let greedy = argmax(row);
    if temperature.is_nan() || temperature <= 0.0 || greedy < 0 {
        return greedy;
    }
    let max = row[greedy as usize];
    let scale = LOG2_E / temperature;
    let weights: Vec<u32> = row.iter().map(|&l| fixed_point_weight(l, max, scale)).collect();
    let total: u64 = weights.iter().map(|&w| w as u64).sum();
    if total == 0 {
        return greedy;
    }
    let target = if top_p < 1.0 {
        let quantised = (top_p * 16_777_216.0) as u32 as u128; // floor(top_p * 2^24), 0 for top_p <= 0
        (((total as u128 * quantised) + (1 << 24) - 1) >> 24).max(1) as u64
    } else {
        total
    };

    let mut sorted = weights.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    let (mut tau, mut mass) = (0u32, 0u64);
    for &w in &sorted {
        mass += w as u64;
        if mass >= target {
            tau = w;
            break;
        }
    }
    // Everything equal to tau is kept, also the equal weights after the one that reached the target.
    let kept: u64 = weights.iter().filter(|&&w| w >= tau).map(|&w| w as u64).sum();
    let r = ((philox_u64(seed, step as u32) as u128 * kept as u128) >> 64) as u64;
    let mut running = 0u64;
    for (i, &w) in weights.iter().enumerate() {
        if w >= tau {
            running += w as u64;
            if running > r {
                return i as i32;
            }
        }
    }
    unreachable!("r < kept mass")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_fixed_point_powers_of_two() {
        assert_eq!(fixed_point_weight(3.0, 3.0, 1.0), 1 << 24);
        assert_eq!(fixed_point_weight(2.0, 3.0, 1.0), 1 << 23);
        assert_eq!(fixed_point_weight(-30.0, 0.0, 1.0), 0);
        assert_eq!(fixed_point_weight(f32::NAN, 0.0, 1.0), 0);
        // 2^-0.5 * 2^24 within a few units.
        let w = fixed_point_weight(-0.5, 0.0, 1.0) as f64;
        assert!((w - 2f64.powf(23.5)).abs() < 40.0, "{w}");
    }

    #[test]
    fn tiny_top_p_is_greedy_and_zero_temperature_is_argmax() {
        let row = [0.5, 2.0, 1.0, 2.0];
        assert_eq!(argmax(&row), 1);
        assert_eq!(sample(&row, 0.0, 0.9, 1, 0), 1);
        // The two equal maxima are both in the smallest nucleus; every step picks one of them.
        for step in 0..20 {
            let id = sample(&row, 1.0, 1e-6, 7, step);
            assert!(id == 1 || id == 3, "{id}");
        }
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), -1);
    }
}
