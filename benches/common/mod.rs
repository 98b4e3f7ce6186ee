//! What the GPU benches share (each bench declares `mod common;`).

use std::time::Duration;

use criterion::Criterion;
use small4::device::Device;

/// Registers the benchmark `name` and returns the mean time of one `call` in its last measurement: criterion picks
/// the iteration count; each timed batch runs the calls back to back between two device synchronisations (the
/// kernels' time as a decode step sees it: one CUDA graph, no host round trip per call).
pub fn time_calls(c: &mut Criterion, device: &Device, name: &str, mut call: impl FnMut()) -> Duration {
    let mut mean = Duration::ZERO;
    c.bench_function(name, |b| {
        b.iter_custom(|iters| {
            device.synchronize().unwrap();
            let start = std::time::Instant::now();
            for _ in 0..iters {
                call();
            }
            device.synchronize().unwrap();
            let elapsed = start.elapsed();
            mean = elapsed / iters.max(1) as u32;
            elapsed
        })
    });
    mean
}
