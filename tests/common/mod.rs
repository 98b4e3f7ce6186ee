//! Shared test helpers: one test body instantiated per backend, bf16 data generation, tolerance checks.
#![allow(dead_code)]

use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Instantiates each `fn name(device: &Device)` twice: `sim::name` on the PTX interpreter (always runs) and
/// `gpu::name` on CUDA device 0. Without a GPU the gpu twin skips and says so ([`gpu_skipped`]); with
/// `SMALL4_REQUIRE_GPU` set (the GPU machine's run) a missing GPU fails it instead.
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
                    Err(e) => $crate::common::gpu_skipped(concat!(module_path!(), "::", stringify!($name)), &e),
                }
            } )*
        }
    };
}

/// A gpu:: twin without a GPU: fails when `SMALL4_REQUIRE_GPU` is set, otherwise writes one `SKIPPED` line with the
/// reason and a running count of this test binary's skips. The line goes to the process's stderr directly, not
/// through `eprintln!`, which libtest captures and hides for passing tests: a skipped twin would otherwise read as
/// a plain `ok`.
pub fn gpu_skipped(test: &str, reason: &small4::Error) {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static SKIPPED: AtomicUsize = AtomicUsize::new(0);
    if std::env::var_os("SMALL4_REQUIRE_GPU").is_some() {
        panic!("{test}: SMALL4_REQUIRE_GPU is set but there is no usable GPU ({reason})");
    }
    let count = SKIPPED.fetch_add(1, Ordering::Relaxed) + 1;
    let line = format!("SKIPPED {test} (gpu twin {count} skipped in this binary): needs a real GPU ({reason}); the sim:: twin ran the same PTX\n");
    // One write of the whole line, so parallel tests do not interleave within it; a closed stderr only loses it.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
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
