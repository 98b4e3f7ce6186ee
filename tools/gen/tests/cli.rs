//! The generator writes exactly what the library's writer writes for the same arguments, the result loads, and
//! impossible requests are clear errors.

use std::process::Command;

use small4::model::checkpoint::Layout;
use small4::model::config::ModelConfig;
use small4::model::synthetic::{write_checkpoint, HF_MISTRAL3_PREFIX};
use small4::quant::WeightFormat;
use small4::reference::model::ReferenceWeights;

fn gen(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_small4-gen")).args(args).output().unwrap()
}

fn files(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect();
    out.sort();
    out
}

#[test]
fn writes_what_the_library_writes_and_it_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("tiny-hf-nvfp4");
    let run = gen(&["--preset", "tiny", "--layout", "hf", "--format", "nvfp4", "--seed", "7", "--shard-bytes", "1048576", "--out", out.to_str().unwrap()]);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stdout).contains("tensors in"), "{}", String::from_utf8_lossy(&run.stdout));
    let direct = tmp.path().join("direct");
    let weights = ReferenceWeights::random(&ModelConfig::tiny(), 7).unwrap();
    write_checkpoint(&direct, &weights, &Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.to_string() }, WeightFormat::Nvfp4, 1 << 20).unwrap();
    let (got, want) = (files(&out), files(&direct));
    assert_eq!(got.iter().map(|f| &f.0).collect::<Vec<_>>(), want.iter().map(|f| &f.0).collect::<Vec<_>>());
    assert!(got == want, "the generator's files differ from the library writer's");
}

#[test]
fn refuses_the_full_model_an_existing_directory_and_unknown_formats() {
    let tmp = tempfile::tempdir().unwrap();
    let full = gen(&["--preset", "mistral-small4", "--out", tmp.path().join("full").to_str().unwrap()]);
    assert!(!full.status.success());
    assert!(String::from_utf8_lossy(&full.stderr).contains("parameters"), "{}", String::from_utf8_lossy(&full.stderr));
    let existing = gen(&["--out", tmp.path().to_str().unwrap()]);
    assert!(!existing.status.success());
    assert!(String::from_utf8_lossy(&existing.stderr).contains("exists"), "{}", String::from_utf8_lossy(&existing.stderr));
    let format = gen(&["--format", "int3", "--out", tmp.path().join("x").to_str().unwrap()]);
    assert!(!format.status.success());
}
