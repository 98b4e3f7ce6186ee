//! The fused router (logits + softmax + top-k + alignment, one launch) on a real GPU at the model's shapes
//! (E = 128, dim = 4096, k = 4) for T = 1, 16, 32 and 256 tokens. Throughput is the ideal bytes (gate + hidden read once,
//! outputs written once) over the time of one launch among back-to-back launches, as GB/s (criterion's throughput);
//! `gpu_or_skip` names the device and its ceilings.
//! Without a GPU it prints that it skips, and why: the interpreter's traffic figures are in docs/perf.md instead.
//!
//! `cargo bench --bench router`

use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use rand::{Rng, SeedableRng};
use small4::device::{Device, DeviceBuffer};
use small4::kernels::router::{self, ExpertMap, RouterConfig};

const EXPERTS: usize = 128;
const DIM: usize = 4096;
const CONFIG: RouterConfig = RouterConfig { k: 4, routed_scale: 1.0, tile_m: 16 };

fn random_bf16(rng: &mut rand::rngs::StdRng, len: usize, scale: f32) -> Vec<bf16> {
    (0..len).map(|_| bf16::from_f32(rng.random_range(-scale..scale))).collect()
}

fn bench_router(c: &mut Criterion, device: &Device) {
    let mut group = c.benchmark_group("router_topk");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let gate = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, EXPERTS * DIM, 0.05)).unwrap();
    let map = ExpertMap::identity(device, EXPERTS).unwrap();
    for tokens in [1usize, 16, 32, 256] {
        let hidden = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, tokens * DIM, 2.0)).unwrap();
        let workspace = router::RouterWorkspace::new(device, tokens, EXPERTS, DIM).unwrap();
        let routing = router::Routing::alloc(device, tokens, CONFIG.k, EXPERTS, CONFIG.tile_m).unwrap();
        let a = &routing.alignment;
        let ideal_bytes = (EXPERTS * DIM + tokens * DIM) * 2
            + tokens * CONFIG.k * 8
            + (a.expert_counts.len() + a.expert_offsets.len() + a.sorted_pairs.len() + a.tile_experts.len() + 1) * 4;
        group.throughput(Throughput::Bytes(ideal_bytes as u64));
        // Launches back to back, one synchronisation per batch of iterations: the kernel's time as a decode step
        // (one CUDA graph, no host round trip) sees it, not a launch plus a host synchronisation each.
        let (hidden, gate) = (hidden.view([tokens, DIM]).unwrap(), gate.view([EXPERTS, DIM]).unwrap());
        group.bench_with_input(BenchmarkId::from_parameter(format!("T={tokens}")), &tokens, |b, _| {
            b.iter_custom(|iters| {
                device.synchronize().unwrap();
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    router::route_and_align_into(hidden, gate, &map, &CONFIG, &workspace, &routing).unwrap();
                }
                device.synchronize().unwrap();
                start.elapsed()
            })
        });
    }
    group.finish();
}

fn main() {
    let Some(device) = small4::device::gpu_or_skip("router bench") else { return };
    let mut criterion = Criterion::default().configure_from_args();
    bench_router(&mut criterion, &device);
    criterion.final_summary();
}
