//! `model::generator::Generator`, the one generation interface of the CLI, the C ABI and the examples: typed errors
//! for bad requests, the stop token, and the engine backends giving the reference's greedy tokens and reproducible
//! seeded samples.

mod common;

use small4::device::Device;
use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::engine::Sampling;
use small4::model::generator::{GenerationBackend, Generator, GeneratorOptions};
use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
use small4::quant::WeightFormat;
use small4::Error;

const PROMPT: [u32; 4] = [5, 17, 300, 41];

fn tiny() -> Checkpoint {
    Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED).unwrap()).unwrap()
}

fn reference(eos: Option<u32>) -> Generator {
    let options = GeneratorOptions { backend: GenerationBackend::Reference, eos, max_context: 16, ..GeneratorOptions::default() };
    Generator::open(&tiny(), &options).unwrap()
}

#[test]
fn bad_requests_are_typed_errors_and_leave_the_generator_usable() {
    let mut generator = reference(None);
    let vocab = generator.config().vocab as u32;
    let err = generator.generate(&[], 2, Sampling::Greedy, |_| {}).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = generator.generate(&[5, vocab], 2, Sampling::Greedy, |_| {}).unwrap_err();
    assert!(matches!(err, Error::OutOfRange { index, limit, .. } if index == vocab as i64 && limit == vocab as i64), "{err}");
    let err = generator.generate(&PROMPT, 13, Sampling::Greedy, |_| {}).unwrap_err();
    assert!(err.to_string().contains("max_context of 16"), "{err}");
    let err = generator.generate(&PROMPT, 2, Sampling::Seeded { temperature: 0.7, top_p: 0.9, seed: 1 }, |_| {}).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(generator.generate(&PROMPT, 2, Sampling::Greedy, |_| {}).unwrap().len(), 2);
}

/// Sampling settings, lengths and `[IMG]` tokens are checked before anything runs, with the same typed errors on every
/// backend (`Request::validate`, `check_image_slots`); the reference backend's own refusal of seeded sampling comes
/// after them.
#[test]
fn settings_lengths_and_image_tokens_are_checked_first() {
    let mut generator = reference(None);
    let seeded = |temperature, top_p| Sampling::Seeded { temperature, top_p, seed: 1 };
    for (sampling, what) in
        [(seeded(f32::NAN, 0.9), "temperature"), (seeded(-1.0, 0.9), "temperature"), (seeded(0.7, 5.0), "top_p"), (seeded(0.7, 0.0), "top_p")]
    {
        let err = generator.generate(&PROMPT, 2, sampling, |_| {}).unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument(msg) if msg.contains(what)), "{sampling:?}: {err}");
    }
    let err = generator.generate(&PROMPT, 0, Sampling::Greedy, |_| {}).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(msg) if msg.contains("max_tokens")), "{err}");
    let err = generator.generate(&PROMPT, usize::MAX, Sampling::Greedy, |_| {}).unwrap_err();
    assert!(matches!(err, Error::OutOfRange { .. }), "{err}");
    let image_token = generator.config().vision.as_ref().expect("the tiny preset has a tower").image_token_id;
    let err = generator.generate(&[1, image_token, 300], 2, Sampling::Greedy, |_| {}).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(msg) if msg.contains("[IMG]")), "{err}");
    assert_eq!(generator.generate(&PROMPT, 2, Sampling::Greedy, |_| {}).unwrap().len(), 2);
}

/// The CLI refuses bad settings with the library's typed errors before it loads anything, and prints a rate only when
/// it means something: one generated token is the prefill's, so there is no decode rate.
#[test]
fn the_cli_refuses_bad_settings_and_prints_only_meaningful_rates() {
    let run = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_small4")).args(args).output().unwrap();
    let ids = ["--prompt-ids", "1,300,41"];
    for (args, what) in [
        (&["--top-p", "5"][..], "top_p 5"),
        (&["--top-p", "0"][..], "top_p 0"),
        (&["--temperature", "NaN"][..], "temperature NaN"),
        (&["--temperature=-1"][..], "temperature -1"),
        (&["--max-tokens", "0"][..], "max_tokens is 0"),
        (&["--max-tokens", "18446744073709551615"][..], "position of the last generated token"),
    ] {
        let out = run(&[&["generate"][..], &ids, args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(what), "{args:?}: {stderr}");
    }
    let out = run(&[&["generate", "--max-tokens", "1"][..], &ids].concat());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    let rates = stdout.lines().last().unwrap();
    assert!(rates.starts_with("prefill: 3 tokens in ") && rates.contains("tokens/s); decode: 0 tokens in ") && rates.ends_with("(no rate)"), "{rates}");
}

#[test]
fn generation_stops_after_the_eos_token_and_keeps_it() {
    let all = reference(None).generate(&PROMPT, 6, Sampling::Greedy, |_| {}).unwrap();
    // A later token that does not occur before it stands in for the stop token: generation ends mid-way.
    let stop = (1..all.len()).find(|&i| !all[..i].contains(&all[i])).expect("a new token after the first");
    let mut reported = Vec::new();
    let got = reference(Some(all[stop])).generate(&PROMPT, 6, Sampling::Greedy, |t| reported.push(t)).unwrap();
    assert_eq!(got, all[..=stop]);
    assert_eq!(reported, got);
}

fn the_engine_gives_the_reference_tokens_and_reproducible_samples(device: &Device) {
    let want = reference(None).generate(&PROMPT, 3, Sampling::Greedy, |_| {}).unwrap();
    let options = GeneratorOptions { eos: None, max_context: 8, ..GeneratorOptions::default() };
    let mut engine = Generator::engine_on(device, &tiny(), &options).unwrap();
    assert!(engine.device().is_some());
    assert_eq!(engine.generate(&PROMPT, 3, Sampling::Greedy, |_| {}).unwrap(), want);
    // Too long for the cache: refused before anything runs; the engine still serves the next request.
    assert!(engine.generate(&PROMPT, 5, Sampling::Greedy, |_| {}).is_err());
    let seeded = Sampling::Seeded { temperature: 1.5, top_p: 0.95, seed: 11 };
    let first = engine.generate(&PROMPT, 3, seeded, |_| {}).unwrap();
    assert_eq!(first.len(), 3);
    assert_eq!(engine.generate(&PROMPT, 3, seeded, |_| {}).unwrap(), first, "same seed, same samples");
}

backend_tests!(the_engine_gives_the_reference_tokens_and_reproducible_samples);
