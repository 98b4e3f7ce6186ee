//! The nvcc-compiled sm_90a kernels of fixtures/hopper.cu (CUTLASS-style inline PTX: repeated wait-loop labels,
//! `__grid_constant__` tensor maps in `.param .align 128` parameters, TMA, mbarrier, wgmma) run on the interpreter
//! with maps from our encoder, and give bit for bit what an H100 gave with the driver's maps
//! (fixtures/hopper_gpu_*.bin, written by the program in hopper.cu). Kernels added since the last GPU run (the
//! warp-specialised pipeline, the fp8 wgmma probes) are checked against the exact CPU product until their dumps exist.

mod common;

use common::*;
use half::bf16;
use ptxsim::float;
use ptxsim::ir::Rnd;
use ptxsim::tensor_map::{encode_tiled, DataType, Interleave, L2Promotion, OobFill};
use ptxsim::{Machine, Module};

fn module() -> Module {
    Module::parse(include_str!("fixtures/hopper.ptx")).expect("hopper.ptx parses")
}

/// Little-endian u32 words of a dump (include_bytes! gives no alignment to cast in place).
fn words(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Every (swizzle, coordinates) case of the GPU program, in its order, with the box's u32 words.
fn tma_cases() -> Vec<(u32, [i32; 2], u32)> {
    let mut cases = Vec::new();
    for sw in 0..4u32 {
        let box0 = if sw == 0 { 32 } else { 8 << (sw - 1) };
        for c in [[0, 0], [24, 6], [-4, -3], [36, 9]] {
            cases.push((sw, c, box0 * 8));
        }
    }
    cases
}

#[test]
fn nvcc_tma_probe_matches_the_h100() {
    let module = module();
    let golden = words(include_bytes!("fixtures/hopper_gpu_tma.bin"));
    let mut at = 0;
    for (sw, c, words) in tma_cases() {
        let mut m = Machine::new();
        let t = upload(&mut m, &(1..=400u32).collect::<Vec<_>>());
        let out = poisoned(&mut m, 4096);
        let box0 = words / 8;
        let map = encode_tiled(
            DataType::Uint32 as u32,
            2,
            t,
            &[40, 10],
            &[160],
            &[box0, 8],
            &[1, 1],
            Interleave::None as u32,
            sw,
            L2Promotion::None as u32,
            OobFill::None as u32,
        )
        .unwrap();
        let mut params = map.to_vec();
        params.extend_from_slice(&out.to_le_bytes());
        params.extend_from_slice(&c[0].to_le_bytes());
        params.extend_from_slice(&c[1].to_le_bytes());
        params.extend_from_slice(&(words * 4).to_le_bytes());
        m.launch(&module, "tma_probe", [1, 1, 1], [256, 1, 1], 0, &params).unwrap_or_else(|e| panic!("swizzle {sw} at {c:?}: {e}"));
        let got: Vec<u32> = download(&m, out, words as usize);
        assert_eq!(got, golden[at..at + words as usize], "swizzle {sw} at {c:?}");
        at += words as usize;
    }
    assert_eq!(at, golden.len());
}

#[test]
fn nvcc_wgmma_probe_matches_the_h100() {
    let module = module();
    let golden: Vec<f32> = words(include_bytes!("fixtures/hopper_gpu_wgmma.bin")).into_iter().map(f32::from_bits).collect();
    let mut m = Machine::new();
    let a: Vec<bf16> = (0..64 * 64).map(|i| bf16::from_f32(((i / 64 * 7 + i % 64 * 3) % 9) as f32 - 4.0)).collect();
    let b: Vec<bf16> = (0..64 * 64).map(|i| bf16::from_f32(((i % 64 * 5 + i / 64 * 11) % 7) as f32 - 3.0)).collect();
    let (ga, gb) = (upload(&mut m, &a), upload(&mut m, &b));
    let out = poisoned(&mut m, 128 * 32 * 4);
    let map = |g| encode_tiled(DataType::Bfloat16 as u32, 2, g, &[64, 64], &[128], &[64, 64], &[1, 1], 0, 3, 0, 0).unwrap();
    let mut params = map(ga).to_vec();
    params.extend_from_slice(&map(gb));
    params.extend_from_slice(&out.to_le_bytes());
    m.launch(&module, "wgmma_probe", [1, 1, 1], [128, 1, 1], 0, &params).unwrap();
    let got: Vec<f32> = download(&m, out, 128 * 32);
    assert_eq!(got, golden);
    // And the hardware agrees with the accumulator fragment formula and the product (small integers: exact).
    for t in 0..128usize {
        let (w, l) = (t / 32, t % 32);
        let (g, q) = (l / 4, l % 4);
        for i in 0..32usize {
            let (row, col) = (16 * w + g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * q + (i & 1));
            let want: f32 = (0..64).map(|k| (((row * 7 + k * 3) % 9) as f32 - 4.0) * (((k * 5 + col * 11) % 7) as f32 - 3.0)).sum();
            assert_eq!(golden[t * 32 + i], want, "thread {t} element {i}");
        }
    }
}

fn a_val(m: usize, k: usize) -> f32 {
    ((m * 7 + k * 3) % 9) as f32 - 4.0
}
fn b_val(k: usize, n: usize) -> f32 {
    ((k * 5 + n * 11) % 7) as f32 - 3.0
}

/// Runs a wgmma probe with `params` built by `setup`, compares with the H100 dump, and checks the dump is A * B.
fn wgmma_variant(kernel: &str, golden: &[u8], k: usize, setup: impl Fn(&mut Machine, u64) -> Vec<u8>) {
    let module = module();
    let golden: Vec<f32> = words(golden).into_iter().map(f32::from_bits).collect();
    let mut m = Machine::new();
    let out = poisoned(&mut m, 128 * 32 * 4);
    let params = setup(&mut m, out);
    m.launch(&module, kernel, [1, 1, 1], [128, 1, 1], 0, &params).unwrap_or_else(|e| panic!("{kernel}: {e}"));
    assert_eq!(download::<f32>(&m, out, 128 * 32), golden, "{kernel}");
    assert_is_product(&golden, k, kernel);
}

/// Checks that `got` (thread t's 32 accumulator registers at 32t) is the 64 x 64 product of a_val and b_val over K.
fn assert_is_product(got: &[f32], k: usize, kernel: &str) {
    for t in 0..128usize {
        let (w, l) = (t / 32, t % 32);
        let (g, q) = (l / 4, l % 4);
        for i in 0..32usize {
            let (row, col) = (16 * w + g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * q + (i & 1));
            let want: f32 = (0..k).map(|kk| a_val(row, kk) * b_val(kk, col)).sum();
            assert_eq!(got[t * 32 + i], want, "{kernel}: thread {t} element {i}");
        }
    }
}

/// A row-major matrix of e4m3 codes (the values are small integers, exact in e4m3).
fn e4m3_matrix(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Vec<u8> {
    (0..rows * cols).map(|i| float::encode(f(i / cols, i % cols) as f64, float::E4M3, Rnd::Rn, false) as u8).collect()
}

#[test]
fn nvcc_fp8_wgmma_probes_compute_the_product() {
    // No H100 dump yet (hopper.cu's program writes hopper_gpu_wgmma_fp8*.bin): the check is the exact product.
    let module = module();
    let k = 128;
    let map = |g| encode_tiled(DataType::Uint8 as u32, 2, g, &[128, 64], &[128], &[128, 64], &[1, 1], 0, 3, 0, 0).unwrap();
    // A and B from shared memory: 4 m64n64k32 steps per warp.
    let mut m = Machine::new();
    let a = upload(&mut m, &e4m3_matrix(64, k, a_val));
    let b = upload(&mut m, &e4m3_matrix(64, k, |n, kk| b_val(kk, n)));
    let out = poisoned(&mut m, 128 * 32 * 4);
    let mut params = map(a).to_vec();
    params.extend_from_slice(&map(b));
    params.extend_from_slice(&out.to_le_bytes());
    let counters = m.launch(&module, "wgmma_fp8_probe", [1, 1, 1], [128, 1, 1], 0, &params).unwrap_or_else(|e| panic!("{e}"));
    assert_is_product(&download::<f32>(&m, out, 128 * 32), k, "wgmma_fp8_probe");
    assert_eq!((counters.tensor_ops, counters.tensor_flops), (16, 16 * 2 * 16 * 64 * 32));
    // A from registers, B from shared memory.
    let mut m = Machine::new();
    let a = upload(&mut m, &e4m3_matrix(64, k, a_val));
    let b = upload(&mut m, &e4m3_matrix(64, k, |n, kk| b_val(kk, n)));
    let out = poisoned(&mut m, 128 * 32 * 4);
    let mut params = a.to_le_bytes().to_vec();
    params.resize(128, 0);
    params.extend_from_slice(&map(b));
    params.extend_from_slice(&out.to_le_bytes());
    m.launch(&module, "wgmma_fp8_rs_probe", [1, 1, 1], [128, 1, 1], 0, &params).unwrap_or_else(|e| panic!("{e}"));
    assert_is_product(&download::<f32>(&m, out, 128 * 32), k, "wgmma_fp8_rs_probe");
}

fn bf16_matrix(rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Vec<bf16> {
    (0..rows * cols).map(|i| bf16::from_f32(f(i / cols, i % cols))).collect()
}

#[test]
fn nvcc_wgmma_transposed_b_matches_the_h100() {
    wgmma_variant("wgmma_trans_b_probe", include_bytes!("fixtures/hopper_gpu_wgmma_trans_b.bin"), 64, |m, out| {
        let a = upload(m, &bf16_matrix(64, 64, a_val));
        let bt = upload(m, &bf16_matrix(64, 64, b_val)); // row k holds B[k][0..64]: N-major
        let map = |g| encode_tiled(DataType::Bfloat16 as u32, 2, g, &[64, 64], &[128], &[64, 64], &[1, 1], 0, 3, 0, 0).unwrap();
        let mut params = map(a).to_vec();
        params.extend_from_slice(&map(bt));
        params.extend_from_slice(&out.to_le_bytes());
        params
    });
}

#[test]
fn nvcc_wgmma_a_in_registers_with_32b_swizzled_b_matches_the_h100() {
    wgmma_variant("wgmma_rs_probe", include_bytes!("fixtures/hopper_gpu_wgmma_rs.bin"), 16, |m, out| {
        let a = upload(m, &bf16_matrix(64, 16, a_val));
        let b = upload(m, &bf16_matrix(64, 16, |n, k| b_val(k, n))); // row n holds B[0..16][n]: K-major
        let map = encode_tiled(DataType::Bfloat16 as u32, 2, b, &[16, 64], &[32], &[16, 64], &[1, 1], 0, 1, 0, 0).unwrap();
        let mut params = a.to_le_bytes().to_vec();
        params.resize(128, 0);
        params.extend_from_slice(&map);
        params.extend_from_slice(&out.to_le_bytes());
        params
    });
}

#[test]
fn nvcc_elect_picks_the_lane_the_h100_picks() {
    let module = module();
    let mut m = Machine::new();
    let out = poisoned(&mut m, 64 * 4);
    m.launch(&module, "elect_probe", [1, 1, 1], [32, 1, 1], 0, &out.to_le_bytes()).unwrap();
    assert_eq!(download::<u32>(&m, out, 64), words(include_bytes!("fixtures/hopper_gpu_elect.bin")));
}

#[test]
fn nvcc_warp_specialised_tma_wgmma_pipeline() {
    // Producer warpgroup + consumer warpgroup over a 2-stage ring of 4 k-tiles: every stage is reused, so the TMA
    // overwrite is ordered after the consumer's wait_group and empty-barrier arrive only through the barriers.
    let counters = ws_gemm(false).unwrap_or_else(|e| panic!("{e}"));
    // 4 k-tiles x 4 k-steps x 4 warps.
    assert_eq!(counters.tensor_ops, 64);
    // Every tensor FLOP is a 16-bit wgmma's (2 x 64 x 64 x K), counted apart for the timing model's wgmma rate.
    assert_eq!((counters.tensor_flops, counters.wgmma_flops, counters.wgmma_8bit_flops), (2 * 64 * 64 * 256, 2 * 64 * 64 * 256, 0));
    // A and B (64 x 256 bf16 each, 32 KiB) came by TMA: 2 x 1024 sectors of the copy engines, none of them warp
    // requests; with C's 16 KiB of stores (512 sectors), the launch's distinct sectors.
    assert_eq!(counters.async_copy_sectors, 2 * 1024);
    assert_eq!(counters.distinct_sectors.len(), 2 * 1024 + 512);
    // The planted bug: the stage is released before the wait_group. The other three consumer warps' wgmma reads are
    // then not ordered before the producer's next TMA into that stage, in whatever order the warps run.
    let e = ws_gemm(true).unwrap_err();
    assert!(e.message.contains("the async copy issued at PTX line") && e.message.contains("read without being ordered before the copy's issue"), "{e}");
}

/// Runs ws_gemm (K = 256) and checks C when it succeeds.
fn ws_gemm(early_release: bool) -> Result<ptxsim::Counters, ptxsim::SimError> {
    let module = module();
    let k = 256usize;
    let mut m = Machine::new();
    let a = upload(&mut m, &bf16_matrix(64, k, a_val));
    let b = upload(&mut m, &bf16_matrix(64, k, |n, kk| b_val(kk, n)));
    let out = poisoned(&mut m, 128 * 32 * 4);
    let map = |g| encode_tiled(DataType::Bfloat16 as u32, 2, g, &[k as u64, 64], &[2 * k as u64], &[64, 64], &[1, 1], 0, 3, 0, 0).unwrap();
    let mut params = map(a).to_vec();
    params.extend_from_slice(&map(b));
    params.extend_from_slice(&out.to_le_bytes());
    params.extend_from_slice(&((k / 64) as i32).to_le_bytes());
    params.extend_from_slice(&(early_release as i32).to_le_bytes());
    let counters = m.launch(&module, "ws_gemm", [1, 1, 1], [256, 1, 1], 32768, &params)?;
    let got: Vec<f32> = download(&m, out, 128 * 32);
    for t in 0..128usize {
        let (w, l) = (t / 32, t % 32);
        let (g, q) = (l / 4, l % 4);
        for i in 0..32usize {
            let (row, col) = (16 * w + g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * q + (i & 1));
            let want: f32 = (0..k).map(|kk| a_val(row, kk) * b_val(kk, col)).sum();
            assert_eq!(got[t * 32 + i], want, "thread {t} element {i}");
        }
    }
    Ok(counters)
}
