//! Load a checkpoint and generate token ids through the public Rust API.
//!
//! ```sh
//! cargo run --example generate                                  # the tiny model `small4 generate` runs, CPU reference
//! cargo run --example generate -- --backend sim --max-tokens 4  # the CUDA kernels on the PTX interpreter
//! cargo run --example generate -- --model DIR --prompt-ids 1,2,3
//! ```
//!
//! With the same prompt ids it prints the tokens `small4 generate --prompt-ids ...` prints (tests/examples.rs checks
//! it).

use std::path::PathBuf;

use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::engine::Sampling;
use small4::model::generator::{GenerationBackend, Generator, GeneratorOptions};
use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
use small4::quant::WeightFormat;
use small4::{Error, Result};

/// The prompt when none is given: what the README's example and the tests use.
pub const DEFAULT_PROMPT: [u32; 4] = [5, 17, 300, 41];

/// Opens `model` (default: the tiny bf16 checkpoint of `small4 generate`) on `backend` and generates greedily to
/// `max_tokens` (no stop token, like `small4 generate --prompt-ids` on the reference).
pub fn generate_tokens(backend: GenerationBackend, model: Option<PathBuf>, prompt: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
    let dir = match model {
        Some(dir) => dir,
        None => tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?,
    };
    let checkpoint = Checkpoint::open(&dir)?;
    let options = GeneratorOptions { backend, eos: None, max_context: prompt.len() + max_tokens, ..GeneratorOptions::default() };
    let mut generator = Generator::open(&checkpoint, &options)?;
    generator.generate(prompt, max_tokens, Sampling::Greedy, |_| {})
}

fn parse_args() -> Result<(GenerationBackend, Option<PathBuf>, Vec<u32>, usize)> {
    let (mut backend, mut model, mut prompt, mut max_tokens) = (GenerationBackend::Reference, None, DEFAULT_PROMPT.to_vec(), 8);
    let mut args = std::env::args().skip(1);
    let usage = || Error::InvalidArgument("usage: generate [--backend reference|sim|gpu] [--model DIR] [--prompt-ids 1,2,3] [--max-tokens N]".into());
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(usage)?;
        match flag.as_str() {
            "--backend" => {
                backend = match value.as_str() {
                    "reference" => GenerationBackend::Reference,
                    "sim" => GenerationBackend::Sim,
                    "gpu" => GenerationBackend::Gpu,
                    _ => return Err(usage()),
                }
            }
            "--model" => model = Some(PathBuf::from(value)),
            "--prompt-ids" => prompt = value.split(',').map(|id| id.trim().parse().map_err(|_| usage())).collect::<Result<_>>()?,
            "--max-tokens" => max_tokens = value.parse().map_err(|_| usage())?,
            _ => return Err(usage()),
        }
    }
    Ok((backend, model, prompt, max_tokens))
}

fn main() -> Result<()> {
    let (backend, model, prompt, max_tokens) = parse_args()?;
    let tokens = generate_tokens(backend, model, &prompt, max_tokens)?;
    let shown: Vec<String> = tokens.iter().map(u32::to_string).collect();
    println!("generated: {}", shown.join(" "));
    Ok(())
}
