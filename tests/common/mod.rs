//! Shared test helpers: one test body instantiated per backend, bf16 data generation, tolerance checks.
#![allow(dead_code)]

use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Instantiates each `fn name(device: &Device)` twice: `sim::name` on the PTX interpreter (always runs) and
/// `gpu::name` on CUDA device 0, which says that it skips, and why, when the machine has no GPU.
#[macro_export]
macro_rules! backend_tests {
    ($($name:ident),* $(,)?) => {
        mod sim {
            $( #[test] fn $name() { super::$name(&small4::device::simulator()); } )*
        }
        mod gpu {
            $( #[test] fn $name() {
                match small4::device::gpu() {
                    Ok(device) => super::$name(&device),
                    Err(e) => eprintln!("SKIPPED gpu::{}: needs a real GPU ({e}); the sim:: twin ran the same PTX", stringify!($name)),
                }
            } )*
        }
    };
}

/// Random bf16 values in [-scale, scale], never exactly zero or one (KERNELS.md: never test on zeros or ones).
pub fn random_bf16(rng: &mut StdRng, len: usize, scale: f32) -> Vec<bf16> {
    (0..len)
        .map(|_| loop {
            let v = bf16::from_f32(rng.random_range(-scale..scale));
            if v.to_f32() != 0.0 && v.to_f32().abs() != 1.0 {
                break v;
            }
        })
        .collect()
}

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn to_f32(v: &[bf16]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// Every output was written (no NaN left from the 0xff poison) and each element is within
/// `abs + rel * |ref|` of the reference. Reports the worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], abs: f32, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(!g.is_nan(), "{what}: element {i} is NaN (never written, or computed NaN); reference {w}");
        let excess = (g - w).abs() - (abs + rel * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    let i = worst.0;
    assert!(worst.1 <= 0.0, "{what}: element {i} = {} but reference {} (tolerance {abs} + {rel}*|ref|)", got[i], want[i]);
}
