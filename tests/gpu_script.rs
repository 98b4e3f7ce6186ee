//! tools/gpu/run.sh, the one command for a lent GPU (issue 16 item 6), rehearsed in its cheapest form: a dry run
//! that prints every command the GPU run uses, and a real run of a minimal subset on the interpreter (this file's own
//! `sim::` twin, the whole Hopper probe step of issue 17 item 4 on the probe's PTX, and the tiny synthetic model where
//! `small4 bench` has `--synthetic`), each writing the section for docs/perf.md. The binaries are this build's own
//! (`--bin` over a folder of links; the probe's PTX is the checked-in nvcc output of its source), so nothing is built
//! here.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use small4::device::{Device, DeviceBuffer};
use small4::kernels::ops;

// The script's test step runs these twins of this file too: on a GPU, the first thing it checks.
backend_tests!(device_names_itself_and_runs_a_kernel);

/// The device reports a name (the GPU's marketing name, which the benches' ceilings are chosen by) and one launch
/// round-trips: argmax over rows with a planted maximum, uploaded and read back.
fn device_names_itself_and_runs_a_kernel(device: &Device) {
    let name = device.device_name();
    assert!(!name.trim().is_empty(), "the device has no name");
    if name != device.name() {
        let ceilings = small4::device::Ceilings::for_device_name(&name);
        assert!(!ceilings.label.contains("assumed"), "{name}: no ceilings known for this GPU, so every bench percentage would be against an assumed H100");
    }
    let (rows, vocab) = (3, 1000);
    let mut logits: Vec<f32> = (0..rows * vocab).map(|i| ((i * 7919) % 997) as f32 * 0.01).collect();
    let planted = [5, 999, 0];
    for (row, &id) in planted.iter().enumerate() {
        logits[row * vocab + id] = 100.0 + row as f32;
    }
    let logits = DeviceBuffer::from_slice(device, &logits).unwrap();
    let ids = DeviceBuffer::<i32>::filled_with_byte(device, rows, 0x7f).unwrap();
    ops::argmax(logits.view([rows, vocab]).unwrap(), ids.as_vector()).unwrap();
    assert_eq!(ids.to_vec().unwrap(), planted.map(|id| id as i32).to_vec(), "argmax on {name}");
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A folder laid out as the script's staged binaries: `small4`, `tests/gpu_script` (this very test binary) and the
/// probe's PTX (`hopper-probe.ptx`: nvcc's output for tools/ptxsim/tests/fixtures/hopper.cu, checked in beside it).
fn stage_this_build() -> tempfile::TempDir {
    let stage = tempfile::tempdir().unwrap();
    std::fs::create_dir(stage.path().join("tests")).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_small4"), stage.path().join("small4")).unwrap();
    std::os::unix::fs::symlink(std::env::current_exe().unwrap(), stage.path().join("tests/gpu_script")).unwrap();
    std::os::unix::fs::symlink(repo().join("tools/ptxsim/tests/fixtures/hopper.ptx"), stage.path().join("hopper-probe.ptx")).unwrap();
    stage
}

fn run_script(args: &[&str]) -> (Output, String) {
    let out = Command::new("bash")
        .arg(repo().join("tools/gpu/run.sh"))
        .args(args)
        .current_dir(repo())
        .env_remove("OUT")
        .output()
        .expect("bash runs tools/gpu/run.sh");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out, text)
}

fn read_section(out_dir: &Path) -> String {
    let path: PathBuf = out_dir.join("perf-section.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `## GPU run YYYY-MM-DD HH:MM UTC (device)` as the first line (any device name when `device` is `None`).
fn assert_dated_heading(section: &str, device: Option<&str>) {
    let first = section.lines().next().unwrap_or_default();
    let rest = first.strip_prefix("## GPU run ").unwrap_or_else(|| panic!("heading: {first}"));
    let (date, time) = (&rest[..10], &rest[11..16]);
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-' && date.replace('-', "").bytes().all(|b| b.is_ascii_digit()),
        "date in {first}"
    );
    assert!(time.as_bytes()[2] == b':' && time.replace(':', "").bytes().all(|b| b.is_ascii_digit()), "time in {first}");
    let named = rest[16..].strip_prefix(" UTC (").and_then(|r| r.strip_suffix(')')).unwrap_or_else(|| panic!("device in {first}"));
    assert!(!named.is_empty() && device.is_none_or(|d| d == named), "device in {first}");
}

fn has_synthetic_flag() -> bool {
    let help = Command::new(env!("CARGO_BIN_EXE_small4")).args(["bench", "--help"]).output().unwrap();
    String::from_utf8_lossy(&help.stdout).contains("--synthetic")
}

#[test]
fn dry_run_prints_every_gpu_command_and_writes_the_section() {
    let out = tempfile::tempdir().unwrap();
    let (status, text) = run_script(&["--backend", "gpu", "--dry-run", "--out", out.path().to_str().unwrap()]);
    assert!(status.status.success(), "dry run failed:\n{text}");
    // One command line per test file, synthetic run and bench, as the GPU run will issue them.
    for file in std::fs::read_dir(repo().join("tests")).unwrap() {
        let path = file.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") && std::fs::read_to_string(&path).unwrap().contains("backend_tests!") {
            let name = path.file_stem().unwrap().to_str().unwrap();
            assert!(text.contains(&format!("/tests/{name} gpu:: --show-output")), "no gpu:: command for tests/{name}:\n{text}");
        }
    }
    for synthetic in [
        "--synthetic --format nvfp4 --prompt-len",
        "--synthetic --format int4 --prompt-len",
        "--format bf16 --experts 32",
        "--format fp8 --experts 64",
        "--synthetic --format nvfp4 --no-pdl --prompt-len",
        "--synthetic --format nvfp4 --no-l2-prefetch --prompt-len",
    ] {
        assert!(text.contains(&format!("small4 bench --backend gpu {synthetic}")) || text.contains(synthetic), "no '{synthetic}' run:\n{text}");
    }
    // The probe: built with the binaries (nvcc: the program and its PTX), run, then settled against the interpreter.
    for probe in [
        "-O3 -DPROBE_MAIN -gencode=arch=compute_90a,code=sm_90a tools/ptxsim/tests/fixtures/hopper.cu -o ",
        "-O3 -DPROBE_MAIN -gencode=arch=compute_90a,code=sm_90a -ptx tools/ptxsim/tests/fixtures/hopper.cu -o ",
        "/hopper-probe.ptx --dumps ",
    ] {
        assert!(text.contains(probe), "no '{probe}' command:\n{text}");
    }
    assert!(text.contains("small4 hopper-probe settle --ptx "), "{text}");
    for bench in ["attention", "dense", "moe", "router", "tokenizer", "vision"] {
        assert!(text.contains(&format!("/benches/{bench} --bench --warm-up-time 0.5 --measurement-time 1 --sample-size 10")), "no {bench} bench:\n{text}");
    }
    let section = read_section(out.path());
    assert_dated_heading(&section, None);
    for heading in ["### Tests (the `gpu::` twins)", "### Hopper probe", "### Synthetic model", "### Criterion benches", "### Commands"] {
        assert!(section.contains(heading), "no '{heading}' in the section:\n{section}");
    }
    assert!(section.contains("| tests | dry run |") && section.contains("| probe | dry run |"), "{section}");
}

#[test]
fn sim_rehearsal_runs_the_twins_and_writes_the_results() {
    let stage = stage_this_build();
    let out = tempfile::tempdir().unwrap();
    let synthetic = has_synthetic_flag();
    if !synthetic {
        println!("small4 bench has no --synthetic flag in this build: the rehearsal runs the tests step only");
    }
    let steps = if synthetic { "tests,probe,synthetic" } else { "tests,probe" };
    let args = ["--backend", "sim", "--bin", stage.path().to_str().unwrap(), "--tests", "gpu_script", "--steps", steps, "--formats", "nvfp4"];
    let (status, text) = run_script(&[&args[..], &["--out", out.path().to_str().unwrap()]].concat());
    assert!(status.status.success(), "rehearsal failed:\n{text}");
    assert!(text.contains("/tests/gpu_script sim:: --show-output"), "{text}");
    assert!(text.contains("tests/gpu_script: 1 passed, 0 failed, 0 ignored, 0 skipped"), "{text}");
    let section = read_section(out.path());
    assert_dated_heading(&section, Some("PTX interpreter rehearsal"));
    assert!(section.contains("| gpu_script | 1 | 0 | 0 | 0 |"), "{section}");
    if synthetic {
        assert!(section.contains("| nvfp4 | sim | 1 | 8 |"), "{section}");
        assert!(section.contains("| nvfp4, PDL off | sim | 1 | 8 |"), "the --no-pdl comparison run: {section}");
        assert!(section.contains("| nvfp4, L2 prefetch off | sim | 1 | 8 |"), "the --no-l2-prefetch comparison run: {section}");
        let reports: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.path().join("synthetic.json")).unwrap()).unwrap();
        assert_eq!(reports[0]["format"], "nvfp4");
    }
    for log in ["run.log", "tests.log"] {
        assert!(out.path().join(log).exists(), "no {log}");
    }
    // The probe step, whole: the probe's kernels on the interpreter in place of the GPU, then the comparison, one
    // verdict per probe, each matching the interpreter's model (the one the verdict names).
    assert!(
        text.contains("small4 hopper-probe simulate --ptx ") && text.contains("probe settle: ") && text.contains("every dump matches the interpreter's model"),
        "{text}"
    );
    assert!(section.contains("### Hopper probe") && section.contains("| probe | ok |"), "{section}");
    for probe in ptxsim::hopper_probe::Probe::ALL {
        let verdict = format!("- `{}`: matches the interpreter's model ({})", probe.file(), probe.model());
        assert!(section.contains(&verdict), "no '{verdict}' in the section:\n{section}");
        assert!(text.contains(&format!("VERDICT {}: ", probe.file())), "{text}");
    }
    assert!(section.contains("HopperTruncated 4096/4096, ExactRoundOnce "), "{section}");
    // The dumps come back in one file (the device tool returns at most eight).
    let listing = Command::new("tar").arg("-tf").arg(out.path().join("hopper-probe.tar")).output().unwrap();
    let listing = String::from_utf8_lossy(&listing.stdout);
    for file in ["hopper-probe/hopper_gpu_wgmma_fp8_random.bin", "probe.log", "probe-verdicts.tsv"] {
        assert!(listing.lines().any(|l| l.trim_start_matches("./") == file), "no {file} in hopper-probe.tar: {listing}");
    }
}

/// On a machine without a GPU the `gpu::` twin prints its skip line and passes: the script must fail the run.
#[test]
fn gpu_run_fails_when_a_twin_skips() {
    let stage = stage_this_build();
    let out = tempfile::tempdir().unwrap();
    let args = ["--backend", "gpu", "--bin", stage.path().to_str().unwrap(), "--tests", "gpu_script", "--steps", "tests"];
    let (status, text) = run_script(&[&args[..], &["--out", out.path().to_str().unwrap()]].concat());
    let section = read_section(out.path());
    if small4::device::gpu().is_ok() {
        assert!(status.status.success(), "on a GPU the twin runs:\n{text}");
        assert!(section.contains("| gpu_script | 1 | 0 | 0 | 0 |"), "{section}");
    } else {
        assert!(!status.status.success(), "a skipped gpu:: twin must fail the run:\n{text}");
        assert!(text.contains("tests/gpu_script: 1 passed, 0 failed, 0 ignored, 1 skipped"), "{text}");
        assert!(text.contains("FAILED: 1 gpu:: test(s) skipped"), "{text}");
        assert!(section.contains("| gpu_script | 1 | 0 | 0 | 1 |"), "{section}");
    }
}
