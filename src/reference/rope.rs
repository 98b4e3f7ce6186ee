//! Rotary position embedding as Mistral Small 4 uses it: YaRN-blended inverse frequencies over the 64 rope dims
//! (DeepSeek / vLLM correction range with floor/ceil and a linear ramp over the pair index), applied to
//! INTERLEAVED pairs (2i, 2i+1), with no mscale on cos/sin; plus the llama-4 style query scaling by position.

/// YaRN parameters (params.json `yarn`: `beta` is beta_fast, `alpha` is beta_slow).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct YarnParams {
    pub theta: f32,
    pub factor: f32,
    pub original_max_position: usize,
    pub beta_fast: f32,
    pub beta_slow: f32,
}

/// Inverse frequency of each of the `rope_dim / 2` pairs.
pub fn yarn_inv_freq(rope_dim: usize, p: &YarnParams) -> Vec<f32> {
    let half = rope_dim / 2;
    let base = p.theta as f64;
    // The dimension index at which a wavelength makes `rotations` turns over the original context.
    let correction_dim =
        |rotations: f64| -> f64 { rope_dim as f64 * (p.original_max_position as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * base.ln()) };
    let low = correction_dim(p.beta_fast as f64).floor().max(0.0);
    let high = correction_dim(p.beta_slow as f64).ceil().min(rope_dim as f64 - 1.0);
    let high = if low == high { high + 0.001 } else { high };
    (0..half)
        .map(|i| {
            let pos_freq = base.powf((2 * i) as f64 / rope_dim as f64);
            let extrapolation = 1.0 / pos_freq;
            let interpolation = 1.0 / (p.factor as f64 * pos_freq);
            let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
            let extrapolation_weight = 1.0 - ramp;
            (interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight) as f32
        })
        .collect()
}

/// Rotates interleaved pairs of `x` (length 2 * inv_freq.len()) to position `pos`, in f32 with f64 angles.
pub fn apply_interleaved(x: &mut [f32], inv_freq: &[f32], pos: usize) {
    assert_eq!(x.len(), 2 * inv_freq.len(), "rope: {} values for {} pairs", x.len(), inv_freq.len());
    for (pair, &f) in x.chunks_exact_mut(2).zip(inv_freq) {
        let angle = pos as f64 * f as f64;
        let (sin, cos) = (angle.sin() as f32, angle.cos() as f32);
        let (a, b) = (pair[0], pair[1]);
        pair[0] = a * cos - b * sin;
        pair[1] = a * sin + b * cos;
    }
}

/// llama-4 style query scaling: `1 + beta * ln(1 + floor(pos / original_max))` (1.0 below `original_max`).
pub fn llama4_query_scale(pos: usize, beta: f32, original_max_position: usize) -> f32 {
    1.0 + beta * (1.0 + (pos / original_max_position) as f32).ln()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL4: YarnParams = YarnParams { theta: 1e4, factor: 128.0, original_max_position: 8192, beta_fast: 32.0, beta_slow: 1.0 };

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let f = yarn_inv_freq(64, &SMALL4);
        assert_eq!(f.len(), 32);
        // Pair 0 is pure extrapolation (the plain RoPE frequency 1.0); the last pairs are divided by the factor.
        assert_eq!(f[0], 1.0);
        let plain_last = 1.0 / 1e4f64.powf(62.0 / 64.0);
        assert!(((f[31] as f64) - plain_last / 128.0).abs() < 1e-12);
        assert!(f.windows(2).all(|w| w[1] < w[0]), "frequencies decrease");
    }

    #[test]
    fn rotation_preserves_pair_norms_and_position_zero_is_identity() {
        let f = yarn_inv_freq(64, &SMALL4);
        let x: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin() + 0.1).collect();
        let mut y = x.clone();
        apply_interleaved(&mut y, &f, 0);
        assert_eq!(x, y);
        apply_interleaved(&mut y, &f, 12345);
        for (a, b) in x.chunks(2).zip(y.chunks(2)) {
            assert!(((a[0].hypot(a[1])) - b[0].hypot(b[1])).abs() < 1e-5);
        }
    }

    #[test]
    fn query_scale_steps_at_the_original_context() {
        assert_eq!(llama4_query_scale(8191, 0.1, 8192), 1.0);
        assert!((llama4_query_scale(8192, 0.1, 8192) - (1.0 + 0.1 * 2f32.ln())).abs() < 1e-7);
    }
}
