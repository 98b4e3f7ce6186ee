//! The nvcc-compiled sm_90a kernels of fixtures/hopper.cu (CUTLASS-style inline PTX: repeated wait-loop labels,
//! `__grid_constant__` tensor maps in `.param .align 128` parameters, TMA, mbarrier, wgmma) run on the interpreter
//! with maps from our encoder, and give bit for bit what an H100 gave with the driver's maps
//! (fixtures/hopper_gpu_*.bin, written by the program in hopper.cu). The probes and their inputs are
//! `ptxsim::hopper_probe`'s, the same code tools/gpu/run.sh's probe step settles a GPU's dumps with. Probes whose dumps
//! were not recorded yet (the warp-specialised pipeline, the fp8 probes, the random-data and narrow-box probes) are
//! checked against the exact CPU product here, and by `small4 hopper-probe settle` on the next lease.

use std::path::Path;

use ptxsim::hopper_probe::{self, a_val, b_val, settle, words, Outcome, Probe};
use ptxsim::{Machine, Module, TensorArith};

fn module() -> Module {
    Module::parse(include_str!("fixtures/hopper.ptx")).expect("hopper.ptx parses")
}

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures"))
}

/// The probe's result words on the interpreter (the small-integer probes: any tensor model gives the same).
fn run(probe: Probe) -> (Vec<u32>, ptxsim::Counters) {
    let (dump, counters) = probe.run(&module(), TensorArith::HopperTruncated, &probe.inputs()).unwrap_or_else(|e| panic!("{probe:?}: {e}"));
    (words(&dump), counters)
}

#[test]
fn every_recorded_h100_dump_matches_the_interpreter() {
    let verdicts = settle(&module(), fixtures());
    let recorded: Vec<Probe> = verdicts.iter().filter(|v| v.problem.as_deref().is_none_or(|p| !p.starts_with("no dump"))).map(|v| v.probe).collect();
    for probe in [Probe::Tma, Probe::Wgmma, Probe::WgmmaTransB, Probe::WgmmaRs, Probe::Elect] {
        assert!(recorded.contains(&probe), "the H100 dump {} is missing", probe.file());
    }
    for v in verdicts.iter().filter(|v| recorded.contains(&v.probe)) {
        assert_eq!(v.outcome(), Outcome::Matches, "{}", v.line());
        assert!(v.line().ends_with(&format!("bit for bit: matches the interpreter's model ({})", v.probe.model())), "{}", v.line());
    }
}

#[test]
fn the_recorded_wgmma_dumps_are_the_product_in_the_accumulator_fragment() {
    // The hardware agrees with the accumulator fragment formula and the product (small integers: exact).
    for (probe, k) in [(Probe::Wgmma, 64), (Probe::WgmmaTransB, 64), (Probe::WgmmaRs, 16)] {
        let golden = std::fs::read(fixtures().join(probe.file())).unwrap();
        assert_is_product(&words(&golden), k, probe.file());
    }
}

/// Checks that `got` (thread t's 32 accumulator registers at 32t) is the 64 x 64 product of a_val and b_val over K.
fn assert_is_product(got: &[u32], k: usize, what: &str) {
    assert_eq!(got.len(), 128 * 32, "{what}");
    for t in 0..128usize {
        let (w, l) = (t / 32, t % 32);
        let (g, q) = (l / 4, l % 4);
        for i in 0..32usize {
            let (row, col) = (16 * w + g + 8 * ((i >> 1) & 1), 8 * (i >> 2) + 2 * q + (i & 1));
            let want: f32 = (0..k).map(|kk| a_val(row, kk) * b_val(kk, col)).sum();
            assert_eq!(f32::from_bits(got[t * 32 + i]), want, "{what}: thread {t} element {i}");
        }
    }
}

#[test]
fn nvcc_fp8_wgmma_probes_compute_the_product() {
    // A and B from shared memory: 4 m64n64k32 steps per warp.
    let (got, counters) = run(Probe::WgmmaFp8);
    assert_is_product(&got, 128, "wgmma_fp8_probe");
    assert_eq!((counters.tensor_ops, counters.tensor_flops), (16, 16 * 2 * 16 * 64 * 32));
    // A from registers, B from shared memory.
    assert_is_product(&run(Probe::WgmmaFp8Rs).0, 128, "wgmma_fp8_rs_probe");
}

#[test]
fn the_random_data_probes_tell_the_tensor_models_apart() {
    // The dump the GPU will write, simulated under each model, settled against the interpreter: the Hopper model's
    // dump matches, the exact model's differs in most words (so a GPU dump can only match one of them).
    let module = module();
    for probe in [Probe::WgmmaFp8Random, Probe::WgmmaBf16Random] {
        let dir = tempdir(probe.file());
        for (arith, outcome) in [(TensorArith::HopperTruncated, Outcome::Matches), (TensorArith::ExactRoundOnce, Outcome::Differs)] {
            let (dump, _) = probe.run(&module, arith, &probe.inputs()).unwrap();
            std::fs::write(dir.join(probe.file()), &dump).unwrap();
            let v = settle(&module, &dir).into_iter().find(|v| v.probe == probe).unwrap();
            assert_eq!(v.outcome(), outcome, "{}", v.line());
            let [hopper, exact] = v.models[..] else { panic!("{}", v.line()) };
            assert_eq!((hopper.model, exact.model), (TensorArith::HopperTruncated, TensorArith::ExactRoundOnce));
            let (hopper, exact) = (hopper.equal, exact.equal);
            if arith == TensorArith::ExactRoundOnce {
                assert_eq!(exact, 4096, "{}", v.line());
                assert!(hopper < 4096 / 2, "the models agree on too many words: {}", v.line());
                assert!(v.line().contains("DIFFERS from the interpreter's model") && v.line().contains("matches TensorArith::ExactRoundOnce"), "{}", v.line());
            }
        }
        // A flipped bit in one result word: neither model.
        let (mut dump, _) = probe.run(&module, TensorArith::HopperTruncated, &probe.inputs()).unwrap();
        let last = dump.len() - 1;
        dump[last] ^= 1;
        std::fs::write(dir.join(probe.file()), &dump).unwrap();
        let v = settle(&module, &dir).into_iter().find(|v| v.probe == probe).unwrap();
        assert!(v.line().contains("4095/4096") && v.line().contains("and from every other model (first difference at word 4095"), "{}", v.line());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ptxsim-hopper-probe-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn narrow_tma_boxes_are_the_dense_box_under_the_xor() {
    // Box rows narrower than the swizzle span (HOPPER-ASYNC.md §8.4 item 2): the interpreter lays the box out
    // densely and XORs absolute addresses, so chunks move across box rows. Checked here against that model written
    // out independently: byte a of the dense box lands at a ^ (((a >> 7) & M) << 4).
    let got = run(Probe::TmaNarrow).0;
    let mut at = 0;
    for case in hopper_probe::tma_cases(Probe::TmaNarrow) {
        let words = (case.bytes() / 4) as usize;
        let mask = (1u32 << case.swizzle) - 1;
        for r in 0..case.rows as i64 {
            for c in 0..case.box0 as i64 {
                let (x, y) = (case.coords[0] as i64 + c, case.coords[1] as i64 + r);
                let value = if (0..40).contains(&x) && (0..case.height as i64).contains(&y) { (y * 40 + x + 1) as u32 } else { 0 };
                let dense = (4 * (r * case.box0 as i64 + c)) as u32;
                let placed = dense ^ (((dense >> 7) & mask) << 4);
                assert_eq!(got[at + placed as usize / 4], value, "{case:?} row {r} column {c}");
            }
        }
        at += words;
    }
    assert_eq!(at, got.len());
}

#[test]
fn nvcc_warp_specialised_tma_wgmma_pipeline() {
    // Producer warpgroup + consumer warpgroup over a 2-stage ring of 4 k-tiles: every stage is reused, so the TMA
    // overwrite is ordered after the consumer's wait_group and empty-barrier arrive only through the barriers.
    let (got, counters) = hopper_probe::ws_gemm(&mut Machine::new(), &module(), false).unwrap_or_else(|e| panic!("{e}"));
    assert_is_product(&got, 256, "ws_gemm");
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
    let e = hopper_probe::ws_gemm(&mut Machine::new(), &module(), true).unwrap_err();
    assert!(e.message.contains("the async copy issued at PTX line") && e.message.contains("read without being ordered before the copy's issue"), "{e}");
}

#[test]
fn shared_memory_placement_probe() {
    // The interpreter's placement (HOPPER-ASYNC.md §1.4): static shared from 0, the dynamic segment after the kernel's
    // 600 static bytes at the largest alignment of the module's `.extern .shared` declarations (ws_gemm's 1024, not
    // this kernel's 128), and both read back what was stored.
    let (got, _) = run(Probe::DynSmem);
    let [fixed, dynamic, last_static, dynamic_byte] = got[..] else { panic!("{got:?}") };
    println!("dyn_smem_probe on the interpreter: static array at {fixed}, dynamic segment at {dynamic}");
    assert_eq!(fixed, 0);
    assert_eq!(dynamic, 1024);
    assert_eq!((last_static, dynamic_byte), (150, 9));
}
