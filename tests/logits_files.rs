//! `small4 logits` and `small4 compare` on the tiny model: the reference's and the interpreter engine's logits files
//! agree within the engine tests' tolerance, a perturbed file fails the comparison with a non-zero exit, and bad
//! inputs are typed errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::logits::{compare, run_logits, Logits, LogitsBackend, LogitsSource};
use small4::model::synthetic::{load_reference_weights, tiny_checkpoint, DEFAULT_TINY_SEED};
use small4::model::ForwardOptions;
use small4::quant::WeightFormat;
use small4::reference::model::ReferenceModel;
use small4::Error;

fn small4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_small4")).args(args).output().unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn path(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

#[test]
fn reference_and_sim_logits_files_compare_within_tolerance_and_a_perturbed_file_fails() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, sim) = (path(dir.path(), "reference.npy"), path(dir.path(), "sim.npy"));
    for (backend, out) in [("reference", &reference), ("sim", &sim)] {
        let run = small4(&["logits", "--format", "nvfp4", "--prompt-ids", "1,300,301", "--greedy", "2", "--backend", backend, "--out", out]);
        assert!(run.status.success(), "logits --backend {backend}: {}", text(&run));
    }
    // The file holds exactly the streaming reference's logits of the prompt and the two greedy tokens fed after it.
    let written = Logits::read_npy(Path::new(&reference)).unwrap();
    assert_eq!((written.positions(), written.vocab), (5, small4::model::ModelConfig::tiny().vocab));
    let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Nvfp4, &Layout::Native, DEFAULT_TINY_SEED).unwrap()).unwrap();
    let model = ReferenceModel::new(load_reference_weights(&checkpoint).unwrap(), ForwardOptions::default()).unwrap();
    let greedy = model.generate_greedy(&[1, 300, 301], 2, |_| {}).unwrap().generated;
    let mut cache = model.new_cache();
    let mut want = model.forward(&[1, 300, 301], &mut cache).unwrap();
    for &t in &greedy {
        want.extend(model.forward(&[t], &mut cache).unwrap());
    }
    assert_eq!(written.values, want);

    // Within the engine tests' tolerance (|engine - reference| <= 0.08 + 0.03 |reference|; the logits here are O(1)).
    let ok = small4(&["compare", &reference, &sim, "--max-abs", "0.2", "--min-argmax-agree", "1"]);
    assert!(ok.status.success(), "{}", text(&ok));
    let stdout = String::from_utf8_lossy(&ok.stdout);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("position ")).count(), 5, "{stdout}");
    assert!(stdout.contains("argmax agreement 1.0000"), "{stdout}");

    // One logit moved by 1: max |a-b| fails, and so does the argmax agreement when the argmax moves.
    let mut moved = written.clone();
    let row = 2 * moved.vocab;
    let runner_up = (0..moved.vocab)
        .filter(|&i| i as u32 != small4::reference::model::argmax(written.row(2)))
        .max_by(|&a, &b| written.row(2)[a].total_cmp(&written.row(2)[b]))
        .unwrap();
    moved.values[row + runner_up] += 1000.0;
    let perturbed = path(dir.path(), "perturbed.npy");
    moved.write_npy(Path::new(&perturbed)).unwrap();
    let bad = small4(&["compare", &reference, &perturbed, "--max-abs", "0.2", "--min-argmax-agree", "1"]);
    assert!(!bad.status.success());
    let message = text(&bad);
    assert!(message.contains("differ beyond the tolerances") && message.contains("max |a-b|") && message.contains("argmax agreement 0.8"), "{message}");
    // Without tolerances the comparison only reports.
    assert!(small4(&["compare", &reference, &perturbed]).status.success());
}

#[test]
fn bad_inputs_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED).unwrap()).unwrap();
    let backend = LogitsBackend::Reference(ForwardOptions::default());
    let source = LogitsSource::Checkpoint(&checkpoint);
    let three = run_logits(&source, &backend, &[1, 2, 3], 0).unwrap().logits;
    let four = run_logits(&source, &backend, &[1, 2, 3], 1).unwrap().logits;
    assert!(matches!(compare(&three, &four), Err(Error::Shape { .. })));
    assert!(matches!(run_logits(&source, &backend, &[], 1), Err(Error::InvalidArgument(_))));
    assert!(matches!(run_logits(&source, &backend, &[1, 5000], 0), Err(Error::OutOfRange { .. })));
    assert!(matches!(Logits::new(vec![0.0; 5], 2), Err(Error::Shape { .. })));

    // Files: missing, not .npy, 1-D, f64.
    let missing = dir.path().join("missing.npy");
    assert!(matches!(Logits::read_npy(&missing), Err(Error::Io { .. })));
    let garbage = dir.path().join("garbage.npy");
    std::fs::write(&garbage, b"not a numpy file").unwrap();
    assert!(matches!(Logits::read_npy(&garbage), Err(Error::Io { .. })));
    let one_d = dir.path().join("one_d.npy");
    npyz::to_file_1d(&one_d, vec![1.0f32, 2.0]).unwrap();
    assert!(matches!(Logits::read_npy(&one_d), Err(Error::Shape { .. })));
    let f64_file = dir.path().join("f64.npy");
    write_2d_f64(&f64_file);
    assert!(matches!(Logits::read_npy(&f64_file), Err(Error::InvalidArgument(_))));

    // The commands say what is wrong and exit non-zero.
    let (a, b) = (dir.path().join("three.npy"), dir.path().join("four.npy"));
    three.write_npy(&a).unwrap();
    four.write_npy(&b).unwrap();
    let shape = small4(&["compare", &a.display().to_string(), &b.display().to_string()]);
    assert!(!shape.status.success() && text(&shape).contains("shape mismatch"), "{}", text(&shape));
    let absent = small4(&["compare", &a.display().to_string(), &missing.display().to_string()]);
    assert!(!absent.status.success() && text(&absent).contains("missing.npy"), "{}", text(&absent));
    let out = path(dir.path(), "x.npy");
    let vocab = small4(&["logits", "--prompt-ids", "1,99999", "--out", &out]);
    assert!(!vocab.status.success() && text(&vocab).contains("token id"), "{}", text(&vocab));
    let layers = small4(&["logits", "--layers", "2", "--prompt-ids", "1", "--out", &out]);
    assert!(!layers.status.success() && text(&layers).contains("--synthetic"), "{}", text(&layers));
    let both = small4(&["logits", "--synthetic", "--model", "/nonexistent", "--prompt-ids", "1", "--out", &out]);
    assert!(!both.status.success(), "{}", text(&both));
    assert!(!PathBuf::from(&out).exists());
}

/// A 2-D f64 .npy file (another dtype than the logits' f32).
fn write_2d_f64(path: &Path) {
    use npyz::WriterBuilder;
    let file = std::fs::File::create(path).unwrap();
    let mut writer = npyz::WriteOptions::new().default_dtype().shape(&[1, 2]).writer(file).begin_nd().unwrap();
    writer.extend([1.0f64, 2.0]).unwrap();
    writer.finish().unwrap();
}

#[test]
fn the_synthetic_real_preset_runs_on_the_reference_from_the_command_line() {
    // One layer of four experts at the real dimensions (dim 4096, vocab 131072), generated as it is read.
    let dir = tempfile::tempdir().unwrap();
    let out = path(dir.path(), "synthetic.npy");
    let run = small4(&["logits", "--synthetic", "--layers", "1", "--experts", "4", "--format", "fp8", "--prompt-ids", "1,2", "--out", &out]);
    assert!(run.status.success(), "{}", text(&run));
    let logits = Logits::read_npy(Path::new(&out)).unwrap();
    assert_eq!((logits.positions(), logits.vocab), (2, 131072));
    assert!(logits.values.iter().all(|v| v.is_finite()));
    // The same through the library, bit for bit.
    let model = small4::model::synth::SyntheticModel::new(
        small4::model::synth::shrunk_real_preset(Some(1), Some(4)).unwrap(),
        WeightFormat::Fp8PerTensor,
        DEFAULT_TINY_SEED,
    )
    .unwrap();
    let again = run_logits(&LogitsSource::Synthetic(&model), &LogitsBackend::Reference(ForwardOptions::default()), &[1, 2], 0).unwrap();
    assert_eq!(again.logits, logits);
}
