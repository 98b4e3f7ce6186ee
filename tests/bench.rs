//! The engine benchmark (`small4 bench`) on the interpreter: the steps it times, graphs or not, and its errors.

use std::sync::Arc;

use small4::device::sim::SimBackend;
use small4::device::{simulator, Device};
use small4::model::bench::{bench_engine, BenchOptions};
use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
use small4::quant::WeightFormat;
use small4::Error;

fn tiny() -> Checkpoint {
    Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED).unwrap()).unwrap()
}

#[test]
fn the_benchmark_times_the_prefill_and_each_decode_step() {
    let options = BenchOptions { batch: 2, prompt_len: 3, decode_steps: 3, warmup_steps: 1, graphs: true, ..BenchOptions::default() };
    let report = bench_engine(&simulator(), &tiny(), options).unwrap();
    assert_eq!(report.device, "sim");
    assert_eq!(report.decode_steps.len(), 3);
    // The warm-up step runs eagerly, the first timed one captures, the rest replay: one graph for batch 2.
    assert_eq!(report.captured_graphs, 1);
    assert!(report.prefill.as_nanos() > 0 && report.decode_steps.iter().all(|d| d.as_nanos() > 0));
    let min = report.decode_step_quantile(0.0);
    let max = report.decode_step_quantile(1.0);
    assert!(min <= report.decode_step_mean() && report.decode_step_mean() <= max);
    assert_eq!(min, *report.decode_steps.iter().min().unwrap());
    assert_eq!(max, *report.decode_steps.iter().max().unwrap());
    let expected_rate = 2.0 / report.decode_step_mean().as_secs_f64();
    assert!((report.decode_tokens_per_s() - expected_rate).abs() < 1e-9 * expected_rate);
    assert!((report.prefill_tokens_per_s() - 6.0 / report.prefill.as_secs_f64()).abs() < 1e-6);
    let shown = report.to_string();
    assert!(shown.contains("batch 2 x prompt 3 tokens, 3 decode steps timed after 1 warm-up; decode replays 1 captured graph(s)"), "{shown}");
}

#[test]
fn an_eager_benchmark_captures_no_graph() {
    let options = BenchOptions { batch: 1, prompt_len: 2, decode_steps: 2, warmup_steps: 0, graphs: false, ..BenchOptions::default() };
    let report = bench_engine(&simulator(), &tiny(), options).unwrap();
    assert_eq!(report.captured_graphs, 0);
    assert!(report.to_string().contains("decode eager"));
}

/// `BenchOptions::programmatic_launches` (`small4 bench --no-pdl`): the report says which ran, the launch count is the
/// same, and the device's switch is put back after the run.
#[test]
fn programmatic_launches_can_be_turned_off() {
    // L2 cold at every launch: the weights a decode GEMM loads before its wait then come from DRAM, which the
    // timing model lets a programmatic launch overlap with the launch before.
    let sim = Arc::new(SimBackend::new());
    sim.set_l2_residency(false);
    let device: Device = sim;
    device.set_programmatic_launches(true);
    let base = BenchOptions { batch: 1, prompt_len: 2, decode_steps: 2, warmup_steps: 0, ..BenchOptions::default() };
    let on = bench_engine(&device, &tiny(), base).unwrap();
    let off = bench_engine(&device, &tiny(), BenchOptions { programmatic_launches: false, ..base }).unwrap();
    assert!(on.programmatic_launches && !off.programmatic_launches);
    assert_eq!((on.to_json()["programmatic_launches"].as_bool(), off.to_json()["programmatic_launches"].as_bool()), (Some(true), Some(false)));
    assert!(off.to_string().contains("programmatic dependent launches: off") && !on.to_string().contains("programmatic dependent"));
    assert_eq!(on.launches_per_decode_step, off.launches_per_decode_step);
    // The timing model's graph form: the programmatic nodes cost less than the plain ones, by the two node costs'
    // difference per launch of the profiled step, and by what they overlap with the launch before each (none
    // without programmatic launches).
    let model = small4::device::TimingModel::FITTED;
    let (graph_on, graph_off) = (on.predicted_graph_us_per_decode_step().unwrap(), off.predicted_graph_us_per_decode_step().unwrap());
    let launches = on.launches_per_family.values().sum::<u64>() as f64;
    let (overlap_on, overlap_off) = (on.predicted_pdl_overlap_us_per_decode_step.unwrap(), off.predicted_pdl_overlap_us_per_decode_step.unwrap());
    assert!(overlap_on > 0.0 && overlap_off == 0.0, "overlap on {overlap_on} off {overlap_off}");
    let expected = launches * (model.graph_node_s - model.pdl_node_s) * 1e6 + overlap_on;
    assert!(((graph_off - graph_on) - expected).abs() < 1e-6 * graph_off, "off {graph_off} on {graph_on}: {expected} expected");
    assert!(on.to_string().contains("predicted as a replayed graph (programmatic node costs"), "{on}");
    assert!(device.programmatic_launches(), "the run put the device's switch back");
}

#[test]
fn an_empty_benchmark_is_a_typed_error() {
    for options in [
        BenchOptions { batch: 0, ..BenchOptions::default() },
        BenchOptions { prompt_len: 0, ..BenchOptions::default() },
        BenchOptions { decode_steps: 0, ..BenchOptions::default() },
    ] {
        assert!(matches!(bench_engine(&simulator(), &tiny(), options), Err(Error::InvalidArgument(_))));
    }
}

#[test]
fn the_cli_benchmarks_the_tiny_model_on_the_interpreter() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_small4"))
        .args(["bench", "--backend", "sim", "--batch", "1", "--prompt-len", "2", "--decode-steps", "1", "--warmup-steps", "0", "--no-pdl"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("device: sim"), "{stdout}");
    assert!(stdout.contains("programmatic dependent launches: off"), "{stdout}");
    assert!(stdout.contains("prefill: ") && stdout.contains("tokens/s"), "{stdout}");
    assert!(stdout.contains("decode step: mean "), "{stdout}");
}

/// `small4 bench --synthetic` on the interpreter (the tiny preset's dimensions, one layer, 4 experts, nvfp4): the JSON
/// report has every key of the decode issue, with the counts of a decode step and no GPU kernel times.
#[test]
fn the_cli_benchmarks_a_synthetic_model_and_writes_json() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("bench.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_small4"))
        .args(["bench", "--backend", "sim", "--synthetic", "--preset", "tiny", "--layers", "1", "--experts", "4", "--format", "nvfp4"])
        .args(["--prompt-len", "3", "--decode-steps", "2", "--warmup-steps", "2", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("kernel launches") && stdout.contains("routed_experts"), "{stdout}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for key in [
        "layers",
        "experts",
        "format",
        "backend",
        "launches_per_decode_step",
        "host_syncs_per_decode_step",
        "decode_ms_per_step",
        "decode_tokens_per_s",
        "prefill_tokens_per_s",
        "kernel_us_per_decode_step",
        "launches_per_family",
        "programmatic_launches",
    ] {
        assert!(report.get(key).is_some(), "missing {key} in {report}");
    }
    assert_eq!((report["layers"].as_u64(), report["experts"].as_u64()), (Some(1), Some(4)));
    assert_eq!((report["format"].as_str(), report["backend"].as_str()), (Some("nvfp4"), Some("sim")));
    assert!(report["kernel_us_per_decode_step"].is_null());
    assert_eq!(report["programmatic_launches"], true, "programmatic launches are on by default");
    // The interpreter's timing model predicts the step (issue 19): positive, finite, and the sum of its families.
    let predicted = report["predicted_us_per_decode_step"].as_f64().expect("a prediction on the interpreter");
    let by_family: f64 = report["predicted_us_per_family"].as_object().unwrap().values().map(|v| v.as_f64().unwrap()).sum();
    assert!(predicted.is_finite() && predicted > 0.0 && (predicted - by_family).abs() <= 1e-9 * predicted, "{report}");
    // As a replayed graph each launch pays a node's cost instead of a host launch's (programmatic ones less), and the
    // step one replay: a family's graph figure is its eager one less (launch - node) per launch.
    let model = small4::device::TimingModel::FITTED;
    let graph = report["predicted_us_per_decode_step_graph"].as_f64().expect("a graph prediction on the interpreter");
    let graph_families = report["predicted_us_per_family_graph"].as_object().unwrap();
    let graph_by_family: f64 = graph_families.values().map(|v| v.as_f64().unwrap()).sum();
    assert!((graph - (graph_by_family + model.graph_replay_s * 1e6)).abs() <= 1e-9 * graph, "{report}");
    // Every launch of this step runs programmatic (its kernels all wait for prior grids: tests/engine.rs): each
    // saves its host launch less a programmatic node's cost, and some also overlap the launch before with the loads
    // they issue before their wait (`predicted_pdl_overlap_us_per_decode_step`, taken off the graph figures).
    let per_launch = (model.launch_s - model.pdl_node_s) * 1e6;
    let overlap = report["predicted_pdl_overlap_us_per_decode_step"].as_f64().expect("the overlap predicted on the interpreter");
    let (mut saved_total, mut launches_total) = (0.0, 0.0);
    for (family, eager) in report["predicted_us_per_family"].as_object().unwrap() {
        let launches = report["launches_per_family"][family].as_f64().unwrap();
        let saved = eager.as_f64().unwrap() - graph_families[family].as_f64().unwrap();
        assert!(saved >= launches * per_launch - 1e-6 * eager.as_f64().unwrap().max(1.0), "{family}: saved {saved} us over {launches} launches");
        (saved_total, launches_total) = (saved_total + saved, launches_total + launches);
    }
    assert!((saved_total - launches_total * per_launch - overlap).abs() < 1e-6 * saved_total, "saved {saved_total} us, overlap {overlap} us");
    // (The tiny model's weights stay in L2 from step to step, so its pre-wait loads hide no DRAM time: the overlap
    // may be 0 here; `programmatic_launches_can_be_turned_off` prices it with L2 cold.)
    assert!(overlap >= 0.0, "{report}");
    assert!(stdout.contains("predicted overlap of programmatic launches"), "{stdout}");
    // The L2 carried across launches (docs/perf.md "L2 residency across a step's launches"): the tiny model fits L2,
    // so the profiling step finds in L2 what the steps before it left there.
    let l2_hit_mb = report["predicted_l2_hit_mb_per_decode_step"].as_f64().expect("L2 hits predicted on the interpreter");
    assert!(l2_hit_mb.is_finite() && l2_hit_mb > 0.0, "{report}");
    assert!(stdout.contains("predicted L2 hits"), "{stdout}");
    // The timed steps replay the captured graph: its launches are counted, and the step reads its tokens back.
    assert_eq!(report["captured_graphs"].as_u64(), Some(1));
    assert!(report["launches_per_decode_step"].as_u64().unwrap() > 10);
    // A steady decode step reads the sampled tokens back and nothing else (its inputs advance on the device).
    assert_eq!(report["host_syncs_per_decode_step"].as_u64(), Some(1), "{report}");
    let families = report["launches_per_family"].as_object().unwrap();
    for family in ["attention_projections", "absorption", "mla", "routing", "routed_experts", "shared_expert", "norms_and_small_ops", "head", "sampling"] {
        let launches = families.get(family).and_then(|v| v.as_u64()).unwrap_or(0);
        // The eager profiling step runs no sampling kernel (forward_logits returns the logits), and the shared expert
        // rides in the routed experts' launches at decode sizes (counted as theirs).
        assert_eq!(launches > 0, !["sampling", "shared_expert"].contains(&family), "{family}: {launches} launches in {report}");
    }
}
