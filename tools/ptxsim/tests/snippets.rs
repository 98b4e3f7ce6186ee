//! nvcc-compiled CUDA snippets (tests/fixtures/snippets.cu -> snippets.ptx) against answers computed here.

mod common;

use common::*;
use half::{bf16, f16};
use ptxsim::{Machine, TensorArith};

#[test]
fn atomics_global_and_shared() {
    let module = snippets();
    let mut m = Machine::new();
    let n = 100usize;
    // Quarter-integers: every partial sum is exact in f32, so the atomic order cannot change the result.
    let input: Vec<f32> = (0..n).map(|i| (i as f32 - 40.0) * 0.25).collect();
    let in_dev = upload(&mut m, &input);
    let fsum = upload(&mut m, &[0.5f32]);
    let imax = upload(&mut m, &[i32::MIN]);
    let cas = upload(&mut m, &[0u32]);
    let exch = upload(&mut m, &[0i32]);
    let bsum = upload(&mut m, &[0u32]);
    let u64sum = upload(&mut m, &[0u64]);
    let hist = upload(&mut m, &[0i32; 8]);
    let p = Params::new().ptr(fsum).ptr(imax).ptr(cas).ptr(exch).ptr(bsum).ptr(u64sum).ptr(hist).ptr(in_dev).i32(n as i32);
    let c = m.launch(&module, "atomics", [2, 1, 1], [64, 1, 1], 0, &p.0).unwrap();
    assert_eq!(download::<f32>(&m, fsum, 1)[0], 0.5 + input.iter().sum::<f32>());
    assert_eq!(download::<i32>(&m, imax, 1)[0], input.iter().map(|&x| (x * 100.0) as i32).max().unwrap());
    assert_eq!(download::<u32>(&m, cas, 1)[0], n as u32);
    assert_eq!(download::<i32>(&m, exch, 1)[0], 7);
    let b = download::<u32>(&m, bsum, 1)[0];
    assert_eq!((bf16::from_bits(b as u16).to_f32(), bf16::from_bits((b >> 16) as u16).to_f32()), (100.0, 200.0));
    assert_eq!(download::<u64>(&m, u64sum, 1)[0], (0..n as u64).map(|i| i << 33).sum::<u64>());
    let want_hist: Vec<i32> = (0..8).map(|b| (0..n).filter(|i| i % 8 == b).count() as i32).collect();
    assert_eq!(download::<i32>(&m, hist, 8), want_hist);
    assert!(c.by_class_named().iter().any(|(n, v)| *n == "atomic" && *v > 0));
}

#[test]
fn warp_collectives() {
    let module = snippets();
    let mut m = Machine::new();
    let out = poisoned(&mut m, 64 * 12 * 4);
    m.launch(&module, "collectives", [1, 1, 1], [64, 1, 1], 0, &Params::new().ptr(out).0).unwrap();
    let got = download::<i32>(&m, out, 64 * 12);
    for t in 0..64i32 {
        let lane = t & 31;
        let wb = t - lane;
        let v = |l: i32| (wb + l) * 7 + 3;
        let warp: Vec<i32> = (0..32).map(v).collect();
        let ballot = warp.iter().enumerate().filter(|(_, x)| *x % 3 == 0).fold(0u32, |a, (i, _)| a | 1 << i) as i32;
        let want = [
            v((lane * 5) & 31),
            if lane >= 3 { v(lane - 3) } else { v(lane) },
            if lane + 5 <= 31 { v(lane + 5) } else { v(lane) },
            v(lane ^ 9),
            v((lane & !7) + 2),
            if lane % 16 < 15 { v(lane + 1) } else { v(lane) },
            ballot,
            1 + 2 * warp.contains(&10) as i32 + 4 * warp.iter().all(|&x| x > 100) as i32,
            warp.iter().sum(),
            warp.iter().map(|x| x % 50).max().unwrap() + 1000 * warp.iter().map(|x| x - 40).min().unwrap(),
            warp.iter().enumerate().filter(|(_, x)| *x % 4 == v(lane) % 4).fold(0u32, |a, (i, _)| a | 1 << i) as i32,
            if lane & 1 == 1 { v((lane + 2) & 31) } else { 0 },
        ];
        assert_eq!(&got[t as usize * 12..t as usize * 12 + 12], &want, "thread {t}");
    }
}

fn pipeline_input(m: &mut Machine, stages: usize) -> (u64, Vec<i32>) {
    let data: Vec<i32> = (0..stages * 64 * 4).map(|i| i as i32 * 3 - 1000).collect();
    (upload(m, &data), data)
}

#[test]
fn cp_async_pipeline_delivers_at_the_wait() {
    let module = snippets();
    let mut m = Machine::new();
    let stages = 3;
    let (input, data) = pipeline_input(&mut m, stages);
    let out = poisoned(&mut m, stages * 64 * 16);
    let c = m.launch(&module, "async_pipeline", [1, 1, 1], [64, 1, 1], 0, &Params::new().ptr(input).ptr(out).i32(stages as i32).i32(0).0).unwrap();
    let got = download::<i32>(&m, out, stages * 64 * 4);
    for s in 0..stages {
        for t in 0..64 {
            let src = s * 64 + (t + 1) % 64;
            assert_eq!(&got[(s * 64 + t) * 4..(s * 64 + t) * 4 + 4], &data[src * 4..src * 4 + 4], "stage {s} thread {t}");
        }
    }
    // 64 threads x 16 bytes, contiguous: 32 sectors per stage in 2 warp requests.
    assert_eq!(c.global_bytes_read, (stages * 64 * 16) as u64);
}

#[test]
fn cp_async_missing_wait_is_reported() {
    let module = snippets();
    let mut m = Machine::new();
    let (input, _) = pipeline_input(&mut m, 2);
    let out = poisoned(&mut m, 2 * 64 * 16);
    let e = m.launch(&module, "async_pipeline", [1, 1, 1], [64, 1, 1], 0, &Params::new().ptr(input).ptr(out).i32(2).i32(1).0).unwrap_err();
    assert!(e.message.contains("in-flight cp.async"), "{e}");
    let site = e.site.expect("fault names its site");
    assert_eq!(site.kernel, "async_pipeline");
    assert!(site.line > 0);
}

#[test]
fn cp_async_zero_fills_past_the_source_size() {
    let module = snippets();
    let mut m = Machine::new();
    let data: Vec<u32> = (0..32 * 4).map(|i| 0x1000_0000 + i).collect();
    let input = upload(&mut m, &data);
    let out = poisoned(&mut m, 32 * 16);
    m.launch(&module, "async_zfill", [1, 1, 1], [32, 1, 1], 0, &Params::new().ptr(input).ptr(out).i32(8).0).unwrap();
    let got = download::<u32>(&m, out, 32 * 4);
    for t in 0..32 {
        assert_eq!(&got[t * 4..t * 4 + 4], &[data[t * 4], data[t * 4 + 1], 0, 0]);
    }
}

fn bf16_matrix(rng: &mut Rng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.f32(2.0))).collect()
}

#[test]
fn ldmatrix_and_mma_bf16_match_a_cpu_product() {
    let module = snippets();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for b_kn in [0, 1] {
        let mut m = Machine::new();
        let a = bf16_matrix(&mut rng, 16 * 16);
        let b = bf16_matrix(&mut rng, 16 * 8); // logical B[k][n]
        let c: Vec<f32> = (0..16 * 8).map(|_| rng.f32(4.0)).collect();
        // Stored k-major [16][8] for the .trans path, n-major [8][16] otherwise.
        let stored: Vec<bf16> = if b_kn == 1 { b.clone() } else { (0..8).flat_map(|n| (0..16).map(move |k| (k, n))).map(|(k, n)| b[k * 8 + n]).collect() };
        let (ad, bd, cd) = (upload(&mut m, &a), upload(&mut m, &stored), upload(&mut m, &c));
        let dd = poisoned(&mut m, 16 * 8 * 4);
        let counters = m.launch(&module, "mma_bf16", [1, 1, 1], [32, 1, 1], 0, &Params::new().ptr(ad).ptr(bd).ptr(cd).ptr(dd).i32(b_kn).0).unwrap();
        assert_eq!(counters.tensor_ops, 1);
        let d = download::<f32>(&m, dd, 16 * 8);
        for i in 0..16 {
            for j in 0..8 {
                let want: f64 = c[i * 8 + j] as f64 + (0..16).map(|k| a[i * 16 + k].to_f64() * b[k * 8 + j].to_f64()).sum::<f64>();
                assert!((d[i * 8 + j] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "b_kn {b_kn} D[{i}][{j}] = {} want {want}", d[i * 8 + j]);
            }
        }
    }
}

/// e4m3 (OCP FN) decoding, written independently of the interpreter's generic one.
fn e4m3_value(b: u8) -> f64 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((b >> 3) & 0xf) as i32;
    let man = (b & 7) as f64;
    sign * if e == 0 { man / 8.0 * 2f64.powi(-6) } else { (1.0 + man / 8.0) * 2f64.powi(e - 7) }
}

#[test]
fn mma_e4m3_m16n8k32_matches_a_cpu_product() {
    let module = snippets();
    let mut m = Machine::new();
    let mut rng = Rng(42);
    // Random finite e4m3 bytes (0x7f / 0xff are NaN).
    let mut byte = || loop {
        let b = rng.next_u32() as u8;
        if b & 0x7f != 0x7f {
            break b;
        }
    };
    let a: Vec<u8> = (0..16 * 32).map(|_| byte()).collect();
    let bt: Vec<u8> = (0..8 * 32).map(|_| byte()).collect(); // [n][k]
    let c: Vec<f32> = (0..16 * 8).map(|i| i as f32 * 0.5 - 30.0).collect();
    let (ad, bd, cd) = (upload(&mut m, &a), upload(&mut m, &bt), upload(&mut m, &c));
    let dd = poisoned(&mut m, 16 * 8 * 4);
    m.launch(&module, "mma_e4m3", [1, 1, 1], [32, 1, 1], 0, &Params::new().ptr(ad).ptr(bd).ptr(cd).ptr(dd).0).unwrap();
    let d = download::<f32>(&m, dd, 16 * 8);
    for i in 0..16 {
        for j in 0..8 {
            let want: f64 = c[i * 8 + j] as f64 + (0..32).map(|k| e4m3_value(a[i * 32 + k]) * e4m3_value(bt[j * 32 + k])).sum::<f64>();
            assert!((d[i * 8 + j] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "D[{i}][{j}] = {} want {want}", d[i * 8 + j]);
        }
    }
}

#[test]
fn mma_sync_under_the_hopper_model_matches_mma_sim() {
    // Machine::tensor_arith = HopperTruncated: mma.sync rounds as MMA-Sim's Hopper model (one fused dot-add per
    // instruction, no split K), checked bit for bit against the f64 transliteration in tests/common; on random data
    // it differs from the default exact model.
    let module = snippets();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let a = bf16_matrix(&mut rng, 16 * 16);
    let bt = bf16_matrix(&mut rng, 8 * 16); // [n][k]
    let c: Vec<f32> = (0..16 * 8).map(|_| rng.f32(4.0)).collect();
    let run = |arith: TensorArith| {
        let mut m = Machine::new();
        m.tensor_arith = arith;
        let (ad, bd, cd) = (upload(&mut m, &a), upload(&mut m, &bt), upload(&mut m, &c));
        let dd = poisoned(&mut m, 16 * 8 * 4);
        m.launch(&module, "mma_bf16", [1, 1, 1], [32, 1, 1], 0, &Params::new().ptr(ad).ptr(bd).ptr(cd).ptr(dd).i32(0).0).unwrap();
        download::<f32>(&m, dd, 16 * 8)
    };
    let (truncated, exact) = (run(TensorArith::HopperTruncated), run(TensorArith::ExactRoundOnce));
    for i in 0..16 {
        for j in 0..8 {
            let (ar, br): (Vec<f64>, Vec<f64>) = (0..16).map(|k| (a[i * 16 + k].to_f64(), bt[j * 16 + k].to_f64())).unzip();
            let want = mma_sim_hopper(c[i * 8 + j] as f64, &ar, &br, false, false, -126, -126) as f32;
            assert_eq!(truncated[i * 8 + j].to_bits(), want.to_bits(), "D[{i}][{j}]");
        }
    }
    assert!(truncated.iter().zip(&exact).any(|(x, y)| x != y), "the models should differ on random data");
}

#[test]
fn local_dynamic_shared_const_and_2d_blocks() {
    let module = snippets();
    let mut m = Machine::new();
    let (bx, by) = (8u32, 4u32);
    let n = (bx * by) as usize;
    let input: Vec<i32> = (0..n as i32).map(|i| i * 5 + 3).collect();
    let ind = upload(&mut m, &input);
    let out = poisoned(&mut m, n * 4);
    m.launch(&module, "spaces", [3, 1, 1], [bx, by, 1], (n * 4) as u32, &Params::new().ptr(ind).ptr(out).i32(n as i32).0).unwrap();
    let got = download::<i32>(&m, out, n);
    let offsets = [11, 22, 33, 44];
    let dyn_val = |t: usize| {
        let i = (input[t] & 15) as usize;
        input[(t + i) % n] * (i as i32 + 1) + offsets[t & 3]
    };
    // The last block wrote last.
    let want: Vec<i32> = (0..n).map(|t| dyn_val(n - 1 - t) + 2000).collect();
    assert_eq!(got, want);
}

#[test]
fn conversion_intrinsics_round_like_the_isa() {
    let module = snippets();
    let mut m = Machine::new();
    let specials = [1.0f32 + 1.0 / 256.0, -3.75, 1.0e-3, 500.0, -70000.0, 65520.0, 0.0013, 2.5, f32::MIN_POSITIVE, -1.0e-8, 448.0, 464.0];
    let mut rng = Rng(7);
    let input: Vec<f32> = specials.iter().copied().chain((0..52).map(|_| rng.f32(600.0))).collect();
    let n = input.len() / 2;
    let ind = upload(&mut m, &input);
    let out = poisoned(&mut m, n * 8 * 4);
    m.launch(&module, "conversions", [1, 1, 1], [n as u32, 1, 1], 0, &Params::new().ptr(ind).ptr(out).0).unwrap();
    let got = download::<u32>(&m, out, n * 8);
    for t in 0..n {
        let (x, y) = (input[2 * t], input[2 * t + 1]);
        let o = &got[t * 8..t * 8 + 8];
        assert_eq!(o[0], bf16::from_f32(x).to_bits() as u32 | (bf16::from_f32(y).to_bits() as u32) << 16, "bf16x2 of {x} {y}");
        assert_eq!(o[1], f16::from_f32(x).to_bits() as u32 | (f16::from_f32(y).to_bits() as u32) << 16, "f16x2 of {x} {y}");
        // e4m3: the nearest finite value (saturating), checked against the independent decoder.
        for (k, v) in [x, y].iter().enumerate() {
            let b = (o[2] >> (8 * k)) as u8;
            let best =
                (0u8..=255)
                    .filter(|b| b & 0x7f != 0x7f)
                    .map(|b| (b, (e4m3_value(b) - *v as f64).abs()))
                    .fold((0u8, f64::MAX), |a, c| if c.1 < a.1 { c } else { a });
            assert!((e4m3_value(b) - *v as f64).abs() <= best.1, "e4m3 of {v}: got {b:#x}, nearest is {:#x}", best.0);
        }
        let back = f16::from_bits(o[4] as u16).to_f64();
        assert_eq!(back, e4m3_value(o[2] as u8), "e4m3 -> f16 of {:#x}", o[2] & 0xff);
        assert_eq!(o[5], ((x * 3.0).round_ties_even() as i32) as u32 ^ ((y.abs() as u32) << 16));
        let e = (x * 0.1).exp();
        assert!((f32::from_bits(o[6]) - e).abs() <= e * 1e-3, "exp of {x}");
    }
}

#[test]
fn planted_out_of_bounds_write_is_caught() {
    let module = snippets();
    let mut m = Machine::new();
    let out = m.alloc(32 * 4);
    let e = m.launch(&module, "oob_write", [1, 1, 1], [32, 1, 1], 0, &Params::new().ptr(out).i32(32).0).unwrap_err();
    let site = e.site.clone().unwrap();
    assert_eq!((site.kernel.as_str(), site.block, site.thread), ("oob_write", [0, 0, 0], [3, 0, 0]), "{e}");
    assert!(e.message.contains("out-of-bounds global write") && e.message.contains("0 bytes past the end"), "{e}");
}

#[test]
fn missing_barrier_is_a_race() {
    let module = snippets();
    let mut m = Machine::new();
    let input: Vec<i32> = (0..64).map(|i| i * 3 + 1).collect();
    let ind = upload(&mut m, &input);
    let out = poisoned(&mut m, 64 * 4);
    let e = m.launch(&module, "missing_barrier", [1, 1, 1], [64, 1, 1], 0, &Params::new().ptr(ind).ptr(out).0).unwrap_err();
    assert!(e.message.contains("race"), "{e}");
    // The same code with the barrier runs clean and right.
    m.launch(&module, "with_barrier", [1, 1, 1], [64, 1, 1], 0, &Params::new().ptr(ind).ptr(out).0).unwrap();
    let want: Vec<i32> = (0..64).map(|t| input[(t + 1) % 64]).collect();
    assert_eq!(download::<i32>(&m, out, 64), want);
}

#[test]
fn uninitialised_read_is_caught_and_host_writes_initialise() {
    let module = snippets();
    let mut m = Machine::new();
    let input = m.alloc(32 * 4);
    let out = m.alloc(32 * 4);
    let e = m.launch(&module, "read_input", [1, 1, 1], [32, 1, 1], 0, &Params::new().ptr(input).ptr(out).0).unwrap_err();
    assert!(e.message.contains("uninitialised global"), "{e}");
    m.write(input, &[7u8; 128]).unwrap();
    m.launch(&module, "read_input", [1, 1, 1], [32, 1, 1], 0, &Params::new().ptr(input).ptr(out).0).unwrap();
    assert_eq!(download::<i32>(&m, out, 32), vec![0x0707_0707 + 1; 32]);
}

#[test]
fn host_api_errors() {
    let mut m = Machine::new();
    let a = m.alloc(16);
    assert!(m.free(a + 4).is_err());
    assert!(m.write(a + 8, &[0; 16]).is_err());
    m.free(a).unwrap();
    assert!(m.free(a).is_err());
    let mut buf = [0u8; 4];
    assert!(m.read(a, &mut buf).is_err());
    let module = snippets();
    assert!(module.entries().contains(&"mma_bf16".to_string()));
    assert!(m.launch(&module, "nope", [1, 1, 1], [1, 1, 1], 0, &[]).is_err());
}

/// Runs gemm_bf16 on random data and checks it against a CPU product; returns the launch counters.
pub fn run_gemm(m_: usize, n_: usize, k_: usize, seed: u64) -> ptxsim::Counters {
    let module = snippets();
    let mut m = Machine::new();
    let mut rng = Rng(seed);
    let a = bf16_matrix(&mut rng, m_ * k_);
    let b = bf16_matrix(&mut rng, n_ * k_);
    let (ad, bd) = (upload(&mut m, &a), upload(&mut m, &b));
    let cd = poisoned(&mut m, m_ * n_ * 4);
    let p = Params::new().ptr(ad).ptr(bd).ptr(cd).i32(m_ as i32).i32(n_ as i32).i32(k_ as i32);
    let counters = m.launch(&module, "gemm_bf16", [(n_ / 64) as u32, (m_ / 64) as u32, 1], [128, 1, 1], 0, &p.0).unwrap();
    let c = download::<f32>(&m, cd, m_ * n_);
    for i in 0..m_ {
        for j in 0..n_ {
            let want: f64 = (0..k_).map(|kk| a[i * k_ + kk].to_f64() * b[j * k_ + kk].to_f64()).sum();
            let got = c[i * n_ + j] as f64;
            assert!((got - want).abs() <= 1e-4 * (k_ as f64).sqrt() * 4.0, "C[{i}][{j}] = {got}, want {want}");
        }
    }
    counters
}

#[test]
fn tiled_gemm_with_cp_async_ldmatrix_mma_matches_cpu() {
    let c = run_gemm(128, 64, 96, 3);
    // 2 blocks x 4 warps x 3 k-tiles x 2 k-steps x 8 mma.
    assert_eq!(c.tensor_ops, 2 * 4 * 3 * 2 * 8);
    // Each block reads its A rows (64 x 96) and B rows (64 x 96) once: 2 blocks x 2 x 64 x 96 bf16.
    assert_eq!(c.global_bytes_read, 2 * 2 * 64 * 96 * 2);
    assert_eq!(c.global_bytes_written, 128 * 64 * 4);
    // Both blocks read the same B rows: counted twice in requests, once in the distinct sectors (A + B + C once).
    assert_eq!(c.distinct_sectors.len() * 32, (128 * 96 * 2 + 64 * 96 * 2 + 128 * 64 * 4) as u64);
    assert!(c.global_sectors > c.distinct_sectors.len());
    // Padded shared rows (80 bytes) keep ldmatrix conflict-free.
    assert_eq!(c.shared_bank_conflicts, 0, "{c}");
}

#[test]
fn sectors_per_request_measure_coalescing() {
    let module = snippets();
    for (stride, sectors) in [(1, 4u64), (2, 8), (8, 32), (64, 32)] {
        let mut m = Machine::new();
        let input: Vec<f32> = (0..32 * stride).map(|i| i as f32).collect();
        let ind = upload(&mut m, &input);
        let out = poisoned(&mut m, 32 * 4);
        let c = m.launch(&module, "strided_read", [1, 1, 1], [32, 1, 1], 0, &Params::new().ptr(ind).ptr(out).i32(stride).0).unwrap();
        // One load request and one store request; the store is always 4 sectors.
        assert_eq!((c.global_requests, c.global_sectors), (2, sectors + 4), "stride {stride}");
        assert_eq!((c.global_bytes_read, c.global_bytes_written), (128, 128));
    }
}

/// CPU time of this thread (the machine is shared, so wall time overstates the interpreter's cost).
fn thread_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|ns| ns.parse::<f64>().ok()).unwrap_or(f64::NAN) / 1e9
}

/// Interpreter speed on the GEMM (docs/perf.md): `cargo test -p ptxsim --test snippets gemm_speed -- --ignored --nocapture`.
#[test]
#[ignore]
fn gemm_speed() {
    let (m_, n_, k_) = (256, 256, 512);
    let (c, wall, cpu) = run_gemm_unchecked(m_, n_, k_);
    println!(
        "gemm_bf16 {m_}x{n_}x{k_}: {cpu:.3} s CPU ({wall:.3} s wall), {} warp instructions = {:.2} M/s, {} thread instructions = {:.1} M/s (per CPU second)\n{c}",
        c.warp_instructions,
        c.warp_instructions as f64 / cpu / 1e6,
        c.thread_instructions,
        c.thread_instructions as f64 / cpu / 1e6
    );
}

/// The GEMM launch alone: its counters, wall seconds and CPU seconds.
fn run_gemm_unchecked(m_: usize, n_: usize, k_: usize) -> (ptxsim::Counters, f64, f64) {
    let module = snippets();
    let mut m = Machine::new();
    let mut rng = Rng(11);
    let a = bf16_matrix(&mut rng, m_ * k_);
    let b = bf16_matrix(&mut rng, n_ * k_);
    let (ad, bd) = (upload(&mut m, &a), upload(&mut m, &b));
    let cd = poisoned(&mut m, m_ * n_ * 4);
    let p = Params::new().ptr(ad).ptr(bd).ptr(cd).i32(m_ as i32).i32(n_ as i32).i32(k_ as i32);
    let (wall, cpu) = (std::time::Instant::now(), thread_cpu_seconds());
    let c = m.launch(&module, "gemm_bf16", [(n_ / 64) as u32, (m_ / 64) as u32, 1], [128, 1, 1], 0, &p.0).unwrap();
    (c, wall.elapsed().as_secs_f64(), thread_cpu_seconds() - cpu)
}

#[test]
fn mma_m16n8k8_f16_with_ldmatrix_x1_and_activemask() {
    let module = snippets();
    let mut m = Machine::new();
    let mut rng = Rng(77);
    let a: Vec<f16> = (0..16 * 8).map(|_| f16::from_f32(rng.f32(3.0))).collect();
    let bt: Vec<f16> = (0..8 * 8).map(|_| f16::from_f32(rng.f32(3.0))).collect(); // [n][k]
    let c: Vec<f32> = (0..16 * 8).map(|_| rng.f32(10.0)).collect();
    let (ad, bd, cd) = (upload(&mut m, &a), upload(&mut m, &bt), upload(&mut m, &c));
    let dd = poisoned(&mut m, 16 * 8 * 4);
    let masks = poisoned(&mut m, 32 * 4);
    m.launch(&module, "mma_f16_k8", [1, 1, 1], [32, 1, 1], 0, &Params::new().ptr(ad).ptr(bd).ptr(cd).ptr(dd).ptr(masks).0).unwrap();
    let d = download::<f32>(&m, dd, 16 * 8);
    for i in 0..16 {
        for j in 0..8 {
            let want: f64 = c[i * 8 + j] as f64 + (0..8).map(|k| a[i * 8 + k].to_f64() * bt[j * 8 + k].to_f64()).sum::<f64>();
            assert!((d[i * 8 + j] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0), "D[{i}][{j}] = {} want {want}", d[i * 8 + j]);
        }
    }
    let got = download::<u32>(&m, masks, 32);
    assert_eq!(got, (0..32).map(|l| if l % 4 == 0 { 0x1111_1111 } else { 0 }).collect::<Vec<u32>>());
}

#[test]
fn device_function_calls_and_asserts() {
    let module = snippets();
    let mut m = Machine::new();
    let out = poisoned(&mut m, 64 * 4);
    m.launch(&module, "calls", [1, 1, 1], [64, 1, 1], 0, &Params::new().ptr(out).i32(5).0).unwrap();
    assert_eq!(download::<i32>(&m, out, 64), (0..64).map(|t| if t & 1 == 1 { t * 3 + 5 } else { t }).collect::<Vec<_>>());
    let e = m.launch(&module, "calls", [1, 1, 1], [64, 1, 1], 0, &Params::new().ptr(out).i32(0).0).unwrap_err();
    assert!(e.message.contains("device-side assertion failed: n > 0") && e.message.contains("snippets.cu"), "{e}");
    // printf is reported by name where it would run, not at load.
    assert!(module.unsupported().iter().any(|(k, _, op)| k == "calls" && op.contains("vprintf")));
}
