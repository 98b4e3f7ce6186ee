//! The cross-kernel L2 prefetch (`kernels::prefetch`, cuda/include/l2_prefetch.cuh) on the interpreter: each kernel
//! that takes one (the decode GEMM through `dense::linear_per_head_prefetching`, `mla_attention_{bf16,fp8}` through
//! `attention::mla_attention_prefetching`, `router_topk_decode` through `router::route_and_align_prefetching`) asks
//! L2 for exactly the prefetch's bytes, and they are the later GEMM's weights: with the interpreter's L2 residency
//! (`SimBackend::set_l2_residency`, an empty L2 before each pair) the GEMM over those weights finds exactly that many
//! more bytes in L2 than after the same launch without the prefetch. The outputs are the same bit for bit either way.

use std::sync::Arc;

use half::bf16;
use small4::device::sim::SimBackend;
use small4::device::{Backend, Device, DeviceBuffer, LaunchCounters};
use small4::kernels::attention::{self, AttentionScratch, BlockTables, PagedCache, Queries, QueryLayout};
use small4::kernels::gemm::DeviceWeights;
use small4::kernels::prefetch::L2Prefetch;
use small4::kernels::router::{self, ExpertMap, RouterConfig, RouterWorkspace, Routing};
use small4::kernels::{dense, TensorView};
use small4::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype};
use small4::quant::repack::repack_linear;
use small4::quant::{QuantizedMatrix, WeightFormat};

fn matrix(device: &Device, format: WeightFormat, matrices: usize, rows: usize, k: usize, seed: u32) -> DeviceWeights {
    let parts: Vec<QuantizedMatrix> = (0..matrices)
        .map(|m| {
            let w: Vec<f32> = (0..rows * k).map(|i| (((i as u32).wrapping_mul(2654435761) ^ seed ^ m as u32) % 17) as f32 / 16.0 - 0.5).collect();
            QuantizedMatrix::quantize(format, &w, rows, k).unwrap()
        })
        .collect();
    let refs: Vec<_> = parts.iter().map(|p| p.into()).collect();
    DeviceWeights::upload(device, &repack_linear(&refs).unwrap()).unwrap()
}

fn bf16s(device: &Device, n: usize, seed: u32) -> DeviceBuffer<bf16> {
    let v: Vec<bf16> = (0..n).map(|i| bf16::from_f32((((i as u32).wrapping_mul(40503) ^ seed) % 13) as f32 / 8.0 - 0.75)).collect();
    DeviceBuffer::from_slice(device, &v).unwrap()
}

/// The later GEMM: one token through `next` (the decode kernel, as wo runs in a decode step).
struct Next {
    w: DeviceWeights,
    x: DeviceBuffer<bf16>,
    y: DeviceBuffer<bf16>,
}

impl Next {
    fn new(device: &Device, format: WeightFormat) -> Next {
        // [1024, 1024]: 64 tiles x 16 k blocks.
        let w = matrix(device, format, 1, 1024, 1024, 7);
        Next { x: bf16s(device, 1024, 3), y: DeviceBuffer::alloc(device, 1024).unwrap(), w }
    }
    fn run(&self, sim: &SimBackend) -> LaunchCounters {
        dense::linear(&self.w, self.x.view([1, 1024]).unwrap(), self.y.view([1, 1024]).unwrap()).unwrap();
        sim.last_launch_counters().unwrap()
    }
}

/// Runs `issue` (one launch taking the prefetch) then `next`, from an empty L2, with `prefetch` and without; checks
/// the issuer's prefetched bytes, the later GEMM's extra L2 hits, and that `outputs` read the same both times.
fn check<T: PartialEq + std::fmt::Debug>(
    sim: &SimBackend,
    next: &Next,
    prefetch: &L2Prefetch,
    kernel: &str,
    issue: impl Fn(&L2Prefetch),
    outputs: impl Fn() -> T,
) {
    assert!(prefetch.bytes() > 0);
    let mut runs = Vec::new();
    for p in [prefetch, &L2Prefetch::NONE] {
        sim.set_l2_residency(true); // empty
        sim.record_launches(true);
        issue(p);
        let issuer = sim.take_recorded().into_iter().next().expect("a launch");
        sim.record_launches(false);
        assert!(issuer.kernel.starts_with(kernel), "{} is not {kernel}", issuer.kernel);
        let later = next.run(sim);
        runs.push((issuer, later, outputs()));
    }
    let [(with, with_next, with_out), (without, without_next, without_out)] = <[_; 2]>::try_from(runs).ok().unwrap();
    assert_eq!(with.timing.prefetch_sectors * 32, prefetch.bytes(), "{}: prefetched bytes", with.kernel);
    assert_eq!(without.timing.prefetch_sectors, 0, "{}", without.kernel);
    let hits = |c: &LaunchCounters| c.predicted_l2_hit_bytes.unwrap();
    assert_eq!(hits(&with_next) - hits(&without_next), prefetch.bytes() as f64, "{}: the later GEMM's extra L2 hits", with.kernel);
    assert_eq!(with_out, without_out, "{}: the prefetch changed an output", with.kernel);
}

fn sim() -> (Arc<SimBackend>, Device) {
    let sim = Arc::new(SimBackend::new());
    let device: Device = sim.clone();
    (sim, device)
}

#[test]
fn sim_absorption_prefetches_the_next_gemms_k_blocks() {
    let (sim, device) = sim();
    for format in [WeightFormat::Bf16, WeightFormat::Nvfp4, WeightFormat::INT4_G128] {
        let next = Next::new(&device, format);
        // Four heads of [256, 64] (W_UK's shape), one token.
        let w_uk = matrix(&device, WeightFormat::Bf16, 4, 256, 64, 1);
        let (x, y) = (bf16s(&device, 4 * 64, 5), DeviceBuffer::<bf16>::alloc(&device, 4 * 256).unwrap());
        let issue = |p: &L2Prefetch| {
            let (x, y): (TensorView<bf16, 3>, _) = (x.view([1, 4, 64]).unwrap(), y.view([1, 4, 256]).unwrap());
            dense::linear_per_head_prefetching(&w_uk, x, y, None, p).unwrap();
        };
        check(&sim, &next, &L2Prefetch::k_blocks(&next.w, 4..12).unwrap(), "moe_gemm_bf16_decode", issue, || y.to_vec().unwrap());
    }
}

#[test]
fn sim_attention_prefetches_the_next_gemms_k_blocks() {
    let (sim, device) = sim();
    let next = Next::new(&device, WeightFormat::Bf16);
    for dtype in [CacheDtype::Bf16, CacheDtype::Fp8E4m3 { scale: 0.5 }] {
        // 40 cached tokens of one sequence, 8 heads, one query token.
        let desc = CacheDescriptor::mla(1, 64, dtype).unwrap();
        let bytes: Vec<u8> = (0..desc.total_bytes())
            .map(|i| match dtype {
                CacheDtype::Bf16 => [0x00, 0x3f, 0x80, 0xbe][i % 4],
                CacheDtype::Fp8E4m3 { .. } => [0x30, 0xb8, 0x28, 0x34][i % 4],
            })
            .collect();
        let cache = PagedCache::from_bytes(&device, desc, &bytes).unwrap();
        let tables = BlockTables::upload(&device, &BatchTables { block_tables: vec![0], seq_lens: vec![40], max_pages: 1 }, &desc).unwrap();
        let layout = QueryLayout::decode(&device, 1).unwrap();
        let (q_lat, q_rope) = (bf16s(&device, 8 * 256, 9), bf16s(&device, 8 * 64, 11));
        let o_lat = DeviceBuffer::<bf16>::alloc(&device, 8 * 256).unwrap();
        let issue = |p: &L2Prefetch| {
            let queries = Queries { layout: &layout, q_lat: q_lat.view([1, 8, 256]).unwrap(), q_rope: q_rope.view([8, 64]).unwrap() };
            let mut scratch = AttentionScratch::new(&device);
            attention::mla_attention_prefetching(&cache, &tables, &queries, o_lat.view([1, 8, 256]).unwrap(), 0.1, None, &mut scratch, p).unwrap();
        };
        // Two of the matrix's 128 KiB k blocks: within one block's share (`prefetch::MAX_BYTES_PER_BLOCK`), as the
        // attention's grid is one or two blocks here.
        check(&sim, &next, &L2Prefetch::k_blocks(&next.w, 6..8).unwrap(), "mla_attention_", issue, || o_lat.to_vec().unwrap());
    }
}

#[test]
fn sim_router_prefetches_the_next_gemms_k_blocks() {
    let (sim, device) = sim();
    let next = Next::new(&device, WeightFormat::Nvfp4);
    // One token, dim 512, 64 experts, top 4: router_topk_decode.
    let (dim, experts) = (512, 64);
    let (hidden, gate) = (bf16s(&device, dim, 13), bf16s(&device, experts * dim, 17));
    let map = ExpertMap::identity(&device, experts).unwrap();
    let config = RouterConfig { k: 4, routed_scale: 1.0, tile_m: 8 };
    let workspace = RouterWorkspace::new(&device, 1, experts, dim).unwrap();
    let routing = Routing::alloc(&device, 1, config.k, experts, config.tile_m).unwrap();
    let issue = |p: &L2Prefetch| {
        router::route_and_align_prefetching(hidden.view([1, dim]).unwrap(), gate.view([experts, dim]).unwrap(), &map, &config, &workspace, &routing, p)
            .unwrap();
    };
    let outputs = || (routing.topk_ids.to_vec().unwrap(), routing.topk_weights.to_vec().unwrap());
    // The whole matrix, codes and e4m3 scales (576 KiB): within the 4-block grid's share.
    check(&sim, &next, &L2Prefetch::k_blocks(&next.w, 0..16).unwrap(), "router_topk_decode", issue, outputs);
}
