//! The cross-kernel L2 prefetch (`kernels::prefetch`, cuda/include/l2_prefetch.cuh) on the interpreter: each kernel
//! that takes one (the decode GEMM through `dense::linear_per_head_prefetching`, `mla_attention_{bf16,fp8}` through
//! `attention::mla_attention_prefetching`, `router_topk_decode` through `router::route_and_align_prefetching`) asks
//! L2 for exactly the prefetch's bytes, and they are the later GEMM's weights: with the interpreter's L2 residency
//! (`SimBackend::set_l2_residency`, an empty L2 before each pair) the GEMM over those weights finds exactly that many
//! more bytes in L2 than after the same launch without the prefetch. The outputs are the same bit for bit either way.
//!
//! And a decode GEMM's prefetch of its own k range (`DeviceWeights::decode_own_prefetch`): each warp of a dense
//! decode launch asks L2, before its wait, for exactly the rest of its tile's k range beyond the register ring's first
//! turn (weights and scales), and its k loop then reads exactly those sectors after the prefetch; bit for bit the
//! same outputs and the same DRAM sectors without it.

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
use small4::quant::repack::{repack_linear, tile_bytes};
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
    assert_eq!(with.timing.prefetched_load_sectors, 0, "{}: loads nothing a prefetch of its own asked for", with.kernel);
    assert_eq!(with.timing.pre_wait_sectors - without.timing.pre_wait_sectors, with.timing.prefetch_sectors, "{}: prefetched before its wait", with.kernel);
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

/// Sectors of a warp's own-k-range prefetches over the dense decode launch of `w` (one matrix): per 16-row tile and
/// k split, k blocks [split start + ring depth, split end) of the tile's weights and, for nvfp4 and int4, the
/// matching scales (nvfp4 64 bytes a tile and k block; int4 32 bytes of scales and 16 of zero points a tile and
/// group), each range issued in pieces of 16 KiB, summed over requests as the interpreter counts them.
fn own_prefetch_sectors(w: &DeviceWeights) -> u64 {
    let spanned = |start: u64, bytes: u64| -> u64 {
        (0..bytes)
            .step_by(16 << 10)
            .map(|o| {
                let (a, n) = (start + o, (bytes - o).min(16 << 10));
                (a + n - 1) / 32 - a / 32 + 1
            })
            .sum()
    };
    let (k_blocks, tiles, splits) = (w.k_dim / 64, w.rows_padded / 16, w.decode_k_splits());
    let tb = tile_bytes(w.format) as u64;
    let depth = (4096 / tb).max(2) as usize;
    let mut sectors = 0;
    for tile in 0..tiles {
        for split in 0..splits {
            let (first, end) = (k_blocks * split / splits + depth, k_blocks * (split + 1) / splits);
            if first >= end {
                continue;
            }
            let blocks = (end - first) as u64;
            sectors += spanned(w.data.addr() + (tile * k_blocks + first) as u64 * tb, blocks * tb);
            if let Some(s) = &w.fp4_scales {
                sectors += spanned(s.addr() + (tile * k_blocks + first) as u64 * 64, blocks * 64);
            }
            if let Some(s) = &w.group_scales {
                let (groups, g0, g1) = (w.k_dim / w.group, first * 64 / w.group, (end - 1) * 64 / w.group);
                let g = (g1 - g0 + 1) as u64;
                sectors += spanned(s.addr() + (tile * groups + g0) as u64 * 32, g * 32);
                if let Some(z) = &w.group_zeros {
                    sectors += spanned(z.addr() + (tile * groups + g0) as u64 * 16, g * 16);
                }
            }
        }
    }
    sectors
}

#[test]
fn sim_dense_decode_launches_prefetch_their_own_k_range_before_the_wait() {
    let (sim, device) = sim();
    let formats = [WeightFormat::Bf16, WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128, WeightFormat::Nvfp4, WeightFormat::INT4_G128];
    for format in formats {
        // The real k (4096, 2048; every ring wraps) at the default split count, and in one split (a 4-bit split of 8 k
        // blocks is the ring's first turn alone: nothing left to prefetch).
        for (k, splits) in [(4096, None), (2048, None), (4096, Some(1)), (2048, Some(2))] {
            let mut w = matrix(&device, format, 1, 256, k, 21);
            if let Some(s) = splits {
                w.set_decode_k_splits(s).unwrap();
            }
            let (x, y) = (bf16s(&device, k, 23), DeviceBuffer::<bf16>::alloc(&device, 256).unwrap());
            let mut runs = Vec::new();
            for own in [true, false] {
                w.set_decode_own_prefetch(own);
                dense::linear(&w, x.view([1, k]).unwrap(), y.view([1, 256]).unwrap()).unwrap();
                runs.push((sim.last_launch_counters().unwrap(), y.to_vec().unwrap()));
            }
            let [(with, with_y), (without, without_y)] = <[_; 2]>::try_from(runs).ok().unwrap();
            let what = format!("{format} K {k}, {} splits", w.decode_k_splits());
            assert!(with.kernel.contains("_decode"), "{what}: {}", with.kernel);
            let expected = own_prefetch_sectors(&w);
            assert_eq!(with.timing.pre_wait_sectors - without.timing.pre_wait_sectors, expected, "{what}: prefetched before the wait");
            assert_eq!((with.timing.prefetched_load_sectors, without.timing.prefetched_load_sectors), (expected, 0), "{what}: read from L2 later");
            assert_eq!(with.timing.distinct_sectors, without.timing.distinct_sectors, "{what}: the same DRAM sectors");
            assert_eq!(with.timing.prefetch_sectors, 0, "{what}: only its own sectors");
            assert_eq!(with_y, without_y, "{what}: the prefetch changed an output");
            let bf16_splits = format == WeightFormat::Bf16 && k == 4096 && splits.is_none();
            assert!(expected > 0 || !bf16_splits, "{what}: nothing prefetched");
        }
    }
}
