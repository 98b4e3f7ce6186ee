//! RMSNorm on the CPU, in f32 with f64 accumulation of the mean square.

/// `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight` for each row of `weight.len()` columns.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32) -> Vec<f32> {
    let cols = weight.len();
    assert!(cols > 0 && x.len() % cols == 0, "rms_norm: {} values are not rows of {cols}", x.len());
    let mut out = vec![0.0; x.len()];
    for (row, out_row) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols)) {
        let mean_sq = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / cols as f64;
        let inv_rms = 1.0 / (mean_sq + eps as f64).sqrt();
        for ((o, &v), &w) in out_row.iter_mut().zip(row).zip(weight) {
            *o = (v as f64 * inv_rms) as f32 * w;
        }
    }
    out
}
