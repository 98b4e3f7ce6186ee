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
