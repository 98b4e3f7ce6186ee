//! Dense linear layers on the CPU: `y = x W^T` with W stored [out, in] as in the checkpoints.

use rayon::prelude::*;

/// `x` [rows, in_dim], `w` [out_dim, in_dim] -> [rows, out_dim], f32 with f64-free dot products
/// (callers compare kernels against this with tolerances that cover summation order).
pub fn matmul_nt(x: &[f32], w: &[f32], rows: usize, in_dim: usize, out_dim: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * in_dim, "matmul_nt: x is not [{rows}, {in_dim}]");
    assert_eq!(w.len(), out_dim * in_dim, "matmul_nt: w is not [{out_dim}, {in_dim}]");
    let mut y = vec![0.0f32; rows * out_dim];
    y.par_chunks_mut(out_dim).zip(x.par_chunks(in_dim.max(1))).for_each(|(y_row, x_row)| {
        for (o, w_row) in y_row.iter_mut().zip(w.chunks_exact(in_dim.max(1))) {
            *o = dot(x_row, w_row);
        }
    });
    y
}

/// Dot product with four independent accumulators (vectorises; order fixed, so deterministic).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 4];
    let chunks = a.len() / 4 * 4;
    for (ca, cb) in a[..chunks].chunks_exact(4).zip(b[..chunks].chunks_exact(4)) {
        for i in 0..4 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let tail: f32 = a[chunks..].iter().zip(&b[chunks..]).map(|(x, y)| x * y).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// Rounds every value to bf16 and back: the reference then sees exactly what a bf16 kernel stores.
pub fn round_bf16(values: &mut [f32]) {
    for v in values {
        *v = half::bf16::from_f32(*v).to_f32();
    }
}
