//! The `small4` command line.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use small4::model::bench::{bench_engine, tokens_per_s, BenchOptions};
use small4::model::checkpoint::{Checkpoint, ExpertMatrix, Layout};
use small4::model::engine::{Request, Sampling, DEFAULT_EOS};
use small4::model::generator::{GenerationBackend, Generator, GeneratorOptions};
use small4::model::synthetic::HF_MISTRAL3_PREFIX;
use small4::model::ModelConfig;
use small4::model::{AttentionForm, ForwardOptions, PixelImage, RoundingMode};
use small4::quant::WeightFormat;
use small4::tokenizer::image::load_pixels_from_url;
use small4::tokenizer::{ChatRequest, EncodedPrompt, OutputPrinter, OutputStream, SpecialTokenPolicy, StreamingDecoder, Tokenizer};

mod cli;

#[derive(Parser)]
#[command(name = "small4", version, about = "Mistral Small 4 on Hopper GPUs: kernels, reference and engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print what ptxas reported for every kernel (registers, shared memory, spills) for sm_90a.
    Resources,
    /// The timing model against the stored H200 measurements: replays every stored shape on the PTX interpreter
    /// (sampling blocks of large launches), prints predicted against measured per row, ends with the summary line.
    Calibrate {
        /// Most blocks interpreted per launch; larger launches are sampled and scaled.
        #[arg(long, default_value_t = 16)]
        sample_blocks: u64,
        /// Only rows whose id contains this (repeatable).
        #[arg(long)]
        only: Vec<String>,
        /// Also grid-search the model's free parameters and print the best fit.
        #[arg(long)]
        fit: bool,
        /// Print each launch's model terms (DRAM, L2, issue, tensor, shared, chain, exposed latency).
        #[arg(long)]
        terms: bool,
        /// Launch profiles file: read if present (skips the interpreter), else written (for model iteration).
        #[arg(long)]
        profiles: Option<PathBuf>,
        /// Predict a list of cases on the H200 and H100 SXM instead: `decode-choices` (the decode tile
        /// alternatives), `bench-cases` (the GPU script's benches), `prefill-cases` (issue 17's prefill kernels) or
        /// the path of a case file with their columns.
        #[arg(long)]
        predict: Option<String>,
    },
    /// End-to-end engine benchmark: a batch of random prompts prefilled together, then timed decode steps
    /// (prefill and decode tokens/s, decode step mean/p50/p90). Per-kernel figures: `cargo bench`.
    Bench(BenchArgs),
    /// Generation with the embedded tiny preset (a seeded random checkpoint, generated into a cache directory and
    /// loaded through the checkpoint reader) or a checkpoint directory.
    Generate(GenerateArgs),
    /// Writes the f32 logits [tokens, vocab] of a prompt (and of --greedy continued tokens) as a NumPy .npy file,
    /// from the streaming CPU reference or the engine, for a checkpoint or the full-size synthetic model.
    Logits(cli::logits::LogitsArgs),
    /// Compares two logits .npy files per position (max and mean |a-b|, argmax agreement, KL divergence); exits
    /// non-zero beyond --max-abs / --min-argmax-agree.
    Compare(cli::logits::CompareArgs),
    /// The Hopper probe program's dumps (tools/ptxsim/tests/fixtures/hopper.cu) against the interpreter's models: the
    /// probe step of tools/gpu/run.sh, which settles what HOPPER-ASYNC.md marks UNVERIFIED.
    #[command(subcommand)]
    HopperProbe(cli::hopper_probe::HopperProbeCommand),
    /// Lists a checkpoint's tensors grouped by layer (format, dtype, shape) and the problems found.
    Inspect { dir: PathBuf },
    /// Memory plans of the full model (default: Mistral Small 4) on one and several GPUs: weights by format,
    /// activation workspace and KV-cache capacity per GPU.
    Plan {
        /// A checkpoint directory or a params.json / config.json file; the real Mistral Small 4 when absent.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Print the token ids of the text on stdin (or of a chat request) as one JSON array. Stdin is taken exactly as
    /// given, without BOS: `printf 'Hello, world!' | small4 tokenize` prints [22177,1044,4304,1033].
    Tokenize {
        /// A tekken.json; default: the embedded v15 stand-in (SPEC-tokenizer.md section 7).
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Encode this chat request (OpenAI/Mistral JSON) as a v15 prompt instead of reading stdin.
        #[arg(long)]
        chat: Option<PathBuf>,
    },
    /// Print the text of a JSON array of token ids read from stdin.
    Detokenize {
        /// A tekken.json; default: the embedded v15 stand-in.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Write special tokens as their strings instead of dropping them.
        #[arg(long)]
        keep_special: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Backend {
    /// The CPU reference forward pass (f32 over bf16 weights).
    Reference,
    /// The CUDA engine on a GPU.
    Gpu,
    /// The CUDA engine on the PTX interpreter.
    Sim,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Attention {
    Naive,
    Absorbed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Rounding {
    F32,
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LayoutArg {
    Native,
    Hf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EngineBackend {
    /// The CUDA engine on a GPU.
    Gpu,
    /// The CUDA engine on the PTX interpreter (slow: for checking the command, not for numbers).
    Sim,
}

/// Which checkpoint a command runs: a directory, or the embedded tiny preset generated in a format and layout.
#[derive(Args)]
struct ModelArgs {
    /// A checkpoint directory (native or HF layout); the embedded tiny preset when absent.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Expert weight format of the generated tiny checkpoint: bf16, fp8, fp8-block, int4, nvfp4.
    #[arg(long, default_value = "bf16")]
    format: String,
    /// File layout of the generated tiny checkpoint.
    #[arg(long, value_enum, default_value = "native")]
    layout: LayoutArg,
    /// Seed of the tiny preset's random weights.
    #[arg(long, default_value_t = small4::model::synthetic::DEFAULT_TINY_SEED)]
    seed: u64,
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, value_enum, default_value = "gpu")]
    backend: EngineBackend,
    #[command(flatten)]
    checkpoint: ModelArgs,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt tokens of each sequence (seeded random ids).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Timed decode steps.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Untimed decode steps before them (graph capture, warm-up).
    #[arg(long, default_value_t = 2)]
    warmup_steps: usize,
    /// Run every decode step eagerly instead of replaying captured graphs.
    #[arg(long)]
    eager: bool,
    /// Launch every kernel in stream order, without programmatic dependent launch (by default a kernel that waits for
    /// prior grids may start while the one before it finishes; the environment's SMALL4_PDL=0 turns it off too).
    #[arg(long)]
    no_pdl: bool,
    /// Decode steps without L2 prefetch (by default the latency-bound launches of a layer pull the next GEMM's
    /// weights into L2, wo's during absorption and attention, and the dense decode GEMMs prefetch their own k range
    /// before their programmatic wait).
    #[arg(long)]
    no_l2_prefetch: bool,
    /// Routed experts in W8A8 (needs per-tensor FP8 experts with activation scales: --format fp8 for the preset).
    #[arg(long)]
    fp8_activations: bool,
    /// Step token budget of chunked prefill (default: the whole batch's prompts in one step).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Benchmark a synthetic model generated on the device (no checkpoint; experts in --format, --seed): the real
    /// preset's per-layer dimensions unless --preset tiny.
    #[arg(long)]
    synthetic: bool,
    /// Synthetic model: decoder layers (default: the preset's).
    #[arg(long, requires = "synthetic")]
    layers: Option<usize>,
    /// Synthetic model: routed experts per layer, at least 4 (default: the preset's).
    #[arg(long, requires = "synthetic")]
    experts: Option<usize>,
    /// Synthetic model: the preset whose dimensions it has.
    #[arg(long, value_enum, default_value = "real")]
    preset: PresetArg,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A built-in configuration.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum PresetArg {
    /// Mistral Small 4 (dim 4096, 36 layers, 128 experts, vocabulary 131072).
    Real,
    /// The tiny test model (dim 256, 4 layers, 16 experts, vocabulary 2048).
    Tiny,
}

impl PresetArg {
    /// The preset's configuration.
    pub(crate) fn config(self) -> ModelConfig {
        match self {
            PresetArg::Real => ModelConfig::mistral_small_4(),
            PresetArg::Tiny => ModelConfig::tiny(),
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[arg(long, value_enum, default_value = "reference")]
    backend: Backend,
    #[command(flatten)]
    checkpoint: ModelArgs,
    /// Sampling temperature (engine backends), finite and at least 0; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling: the probability mass of the most likely tokens kept, in (0, 1] (1 keeps every token).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampling (engine backends).
    #[arg(long, default_value_t = 0)]
    sample_seed: u64,
    /// Engine backends: run every decode step eagerly instead of replaying captured graphs.
    #[arg(long)]
    eager: bool,
    /// Stop token of the engine backends (the reference runs to --max-tokens).
    #[arg(long, default_value_t = DEFAULT_EOS)]
    eos: u32,
    /// The user message, encoded as a v15 chat prompt by the tokenizer; generated ids are printed as text.
    /// Default (with no --chat or --prompt-ids): a fixed greeting.
    #[arg(long)]
    prompt: Option<String>,
    /// A chat request (OpenAI/Mistral JSON: messages, tools, reasoning_effort) instead of --prompt.
    #[arg(long)]
    chat: Option<PathBuf>,
    /// A system prompt for --prompt.
    #[arg(long)]
    system: Option<String>,
    /// Reasoning effort written into the prompt's [MODEL_SETTINGS] (the tokenizer's allowed values: none, high).
    #[arg(long)]
    reasoning_effort: Option<String>,
    /// PNG or JPEG images for --prompt (repeatable), placed before the text.
    #[arg(long)]
    image: Vec<PathBuf>,
    /// A tekken.json; default: the model directory's own, else the embedded v15 stand-in cut to the model's vocabulary.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Raw prompt token ids, comma separated, instead of text; generated ids are printed as numbers.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Tokens to generate: at least 1, and the prompt plus these within the model's positions (max_position).
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Attention form of the reference forward pass.
    #[arg(long, value_enum, default_value = "absorbed")]
    attention: Attention,
    /// Activation rounding of the reference forward pass (bf16: where the GPU path stores bf16).
    #[arg(long, value_enum, default_value = "bf16")]
    rounding: Rounding,
    /// Routed experts in W8A8 (e4m3 activations with the checkpoint's static scales, `qscale_act`): needs
    /// per-tensor FP8 experts with activation scales (the generated tiny checkpoint has them with --format fp8).
    #[arg(long)]
    fp8_activations: bool,
    /// Engine backends: the step token budget of chunked prefill (a longer prompt is prefilled over several steps).
    #[arg(long, default_value_t = small4::model::engine::DEFAULT_PREFILL_CHUNK)]
    prefill_chunk: usize,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Resources => print!("{}", small4::kernels::KERNEL_RESOURCES_MARKDOWN),
        Command::Calibrate { sample_blocks, only, fit, terms, profiles, predict } => {
            let options = small4::calibrate::Options { sample_blocks, only, fit, terms, predict, profiles };
            small4::calibrate::run_command(&options, &mut std::io::stdout())?;
        }
        Command::Bench(args) => bench(&args)?,
        Command::Generate(args) => generate(&args)?,
        Command::Logits(args) => cli::logits::logits_command(&args)?,
        Command::Compare(args) => cli::logits::compare_command(&args)?,
        Command::HopperProbe(command) => {
            let status = cli::hopper_probe::hopper_probe_command(&command)?;
            if status != 0 {
                std::process::exit(status.into());
            }
        }
        Command::Inspect { dir } => inspect(&dir)?,
        Command::Plan { config } => plan(config.as_deref())?,
        Command::Tokenize { tokenizer, chat } => tokenize_command(tokenizer.as_deref(), chat.as_deref())?,
        Command::Detokenize { tokenizer, keep_special } => detokenize_command(tokenizer.as_deref(), keep_special)?,
    }
    Ok(())
}

fn plan(config: Option<&std::path::Path>) -> anyhow::Result<()> {
    let config = match config {
        None => ModelConfig::mistral_small_4(),
        Some(path) if path.is_dir() => {
            let native = path.join("params.json");
            ModelConfig::from_file(if native.exists() { native } else { path.join("config.json") })?
        }
        Some(path) => ModelConfig::from_file(path)?,
    };
    for plan in small4::model::plan::standard_plans(&config)? {
        println!("{plan}");
    }
    Ok(())
}

/// The checkpoint directory asked for: `--model`, else the embedded tiny preset in the format and layout asked for.
fn checkpoint_dir(args: &ModelArgs) -> anyhow::Result<PathBuf> {
    if let Some(dir) = &args.model {
        return Ok(dir.clone());
    }
    let format: WeightFormat = args.format.parse()?;
    let layout = match args.layout {
        LayoutArg::Native => Layout::Native,
        LayoutArg::Hf => Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.to_string() },
    };
    Ok(small4::model::synthetic::tiny_checkpoint(format, &layout, args.seed)?)
}

fn bench(args: &BenchArgs) -> anyhow::Result<()> {
    let device = match args.backend {
        EngineBackend::Gpu => small4::device::gpu().context("small4 bench --backend gpu (--backend sim runs it on the PTX interpreter)")?,
        EngineBackend::Sim => small4::device::simulator(),
    };
    let options = BenchOptions {
        batch: args.batch,
        prompt_len: args.prompt_len,
        decode_steps: args.decode_steps,
        warmup_steps: args.warmup_steps,
        graphs: !args.eager,
        programmatic_launches: !args.no_pdl,
        l2_prefetch: !args.no_l2_prefetch,
        fp8_activations: args.fp8_activations,
        prefill_chunk: args.prefill_chunk,
        seed: 0,
    };
    let report = if args.synthetic {
        let config = small4::model::synth::shrink(args.preset.config(), args.layers, args.experts)?;
        let model = small4::model::synth::SyntheticModel::new(config, args.checkpoint.format.parse()?, args.checkpoint.seed)?;
        println!("synthetic model (seed {})", model.seed);
        small4::model::bench::bench_synthetic(&device, &model, options)?
    } else {
        let dir = checkpoint_dir(&args.checkpoint)?;
        let checkpoint = Checkpoint::open(&dir)?;
        println!("{}", dir.display());
        bench_engine(&device, &checkpoint, options)?
    };
    println!("{report}");
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.to_json())?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let dir = checkpoint_dir(&args.checkpoint)?;
    let checkpoint = Checkpoint::open(&dir)?;
    if let Some(notice) = checkpoint.text_only_notice() {
        eprintln!("{notice}");
    }
    let vocab = checkpoint.model_config()?.vocab;
    let (prompt_ids, tokenizer, images) = match &args.prompt_ids {
        Some(_) if !args.image.is_empty() => bail!("--image goes with a text prompt (--prompt or --chat), not --prompt-ids"),
        Some(ids) if ids.is_empty() => bail!("--prompt-ids needs at least one token id"),
        Some(ids) => (ids.clone(), None, Vec::new()),
        None => {
            let tokenizer = generation_tokenizer(args, &dir, vocab)?;
            let prompt = encode_prompt(args, &tokenizer)?;
            let images = match (prompt.images.is_empty(), tokenizer.image_encoder()) {
                (true, _) => Vec::new(),
                (false, Some(encoder)) => {
                    prompt.images.iter().map(|image| load_pixels_from_url(&image.url, &encoder.config)).collect::<small4::Result<Vec<_>>>()?
                }
                (false, None) => bail!("the tokenizer has no image configuration"),
            };
            (prompt.ids, Some(tokenizer), images)
        }
    };
    let mut sink = TokenSink::new(tokenizer.as_ref())?;
    let shown: Vec<String> = prompt_ids.iter().map(u32::to_string).collect();
    let prompt = format!("[{}]", shown.join(","));
    generate_tokens(args, &checkpoint, &prompt_ids, &images, &prompt, &mut sink)
}

/// The tokenizer for text prompts: `--tokenizer`, the model directory's `tekken.json`, or the embedded v15 stand-in
/// cut to the model's vocabulary (its 1000 special ids first, then as many BPE ranks as fit).
fn generation_tokenizer(args: &GenerateArgs, model_dir: &Path, vocab: usize) -> anyhow::Result<Tokenizer> {
    if let Some(path) = &args.tokenizer {
        return Ok(Tokenizer::from_file(path)?);
    }
    let own = model_dir.join("tekken.json");
    if own.exists() {
        return Ok(Tokenizer::from_file(&own)?);
    }
    const STAND_IN_SPECIALS: usize = 1000;
    if vocab <= STAND_IN_SPECIALS + 256 {
        bail!(
            "a vocabulary of {vocab} leaves no room for the stand-in's {STAND_IN_SPECIALS} special ids and 256 byte tokens: pass --tokenizer or --prompt-ids"
        );
    }
    Ok(Tokenizer::stand_in_truncated(vocab, STAND_IN_SPECIALS)?)
}

/// The v15 chat prompt of `--chat` or `--prompt` (default: a fixed greeting), `--image`s before the text.
fn encode_prompt(args: &GenerateArgs, tokenizer: &Tokenizer) -> anyhow::Result<EncodedPrompt> {
    let request = match &args.chat {
        Some(_) if !args.image.is_empty() => bail!("--image goes with --prompt; a --chat request names its images itself (image_url chunks)"),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| small4::Error::io(path, e))?;
            ChatRequest::from_json(&text)?
        }
        None => {
            let prompt = args.prompt.as_deref().unwrap_or(DEFAULT_PROMPT);
            let images: Vec<String> = args.image.iter().map(|p| p.display().to_string()).collect();
            ChatRequest::single_turn(args.system.as_deref(), prompt, &images, args.reasoning_effort.as_deref())
        }
    };
    Ok(tokenizer.encode_chat(&request)?)
}

const DEFAULT_PROMPT: &str = "Hello! Which model are you?";

/// Where generated ids go: printed as numbers, or decoded and streamed as text with reasoning, answer and tool calls
/// apart. A random-weight model may emit ids whose structure is not a valid answer ([/THINK] without [THINK], ...):
/// then the rest is printed as plain text, with a note, instead of stopping the generation.
enum TokenSink<'t> {
    Ids,
    Structured { stream: OutputStream<'t>, printer: OutputPrinter<std::io::Stdout>, tokenizer: &'t Tokenizer },
    Plain(StreamingDecoder<'t>),
}

impl<'t> TokenSink<'t> {
    fn new(tokenizer: Option<&'t Tokenizer>) -> anyhow::Result<Self> {
        Ok(match tokenizer {
            None => TokenSink::Ids,
            Some(tokenizer) => TokenSink::Structured { stream: OutputStream::new(tokenizer)?, printer: OutputPrinter::new(std::io::stdout()), tokenizer },
        })
    }

    fn start(&self) {
        if matches!(self, TokenSink::Ids) {
            print!("generated:");
        }
    }

    fn push(&mut self, id: u32) -> anyhow::Result<()> {
        match self {
            TokenSink::Ids => print!(" {id}"),
            TokenSink::Structured { stream, printer, tokenizer } => match stream.push(id) {
                Ok(events) => {
                    for event in &events {
                        printer.print(event)?;
                    }
                }
                Err(e) => {
                    let tokenizer: &'t Tokenizer = tokenizer;
                    println!("\n(the output is not a well-formed answer: {e}; the rest as plain text)");
                    *self = TokenSink::Plain(StreamingDecoder::new(tokenizer, SpecialTokenPolicy::Ignore));
                }
            },
            TokenSink::Plain(decoder) => print!("{}", decoder.push(id)?),
        }
        // Show each token as it comes; a closed stdout only loses the display.
        let _ = std::io::stdout().flush();
        Ok(())
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        match self {
            TokenSink::Ids => println!(),
            TokenSink::Structured { stream, printer, .. } => {
                for event in stream.finish() {
                    printer.print(&event)?;
                }
                printer.finish()?;
            }
            TokenSink::Plain(decoder) => println!("{}", decoder.finish()),
        }
        Ok(())
    }
}

/// Generation through the library's `Generator` (what the C ABI and the examples run), printed as it comes, with the
/// prefill and decode rates.
fn generate_tokens(
    args: &GenerateArgs,
    checkpoint: &Checkpoint,
    prompt_ids: &[u32],
    images: &[PixelImage],
    prompt: &str,
    sink: &mut TokenSink,
) -> anyhow::Result<()> {
    let backend = match args.backend {
        Backend::Reference => GenerationBackend::Reference,
        Backend::Sim => GenerationBackend::Sim,
        Backend::Gpu => GenerationBackend::Gpu,
    };
    let reference = ForwardOptions {
        rounding: match args.rounding {
            Rounding::F32 => RoundingMode::F32,
            Rounding::Bf16 => RoundingMode::Bf16Activations,
        },
        attention: match args.attention {
            Attention::Naive => AttentionForm::Naive,
            Attention::Absorbed => AttentionForm::Absorbed,
        },
        fp8_activations: false,
        prefill_fp8_act: false,
    };
    // Every setting is checked before the model loads, --top-p even when greedy: `--top-p 5` is a mistake whatever
    // the temperature.
    let seeded = Sampling::Seeded { temperature: args.temperature, top_p: args.top_p, seed: args.sample_seed };
    seeded.validate()?;
    let sampling = if args.temperature > 0.0 { seeded } else { Sampling::Greedy };
    Request { prompt: prompt_ids.to_vec(), max_tokens: args.max_tokens, sampling }.validate(&checkpoint.model_config()?)?;
    if backend == GenerationBackend::Reference && sampling != Sampling::Greedy {
        bail!("--temperature needs an engine backend (--backend sim or gpu): the reference samples greedily only");
    }
    // The reference runs to --max-tokens; the engine stops at --eos.
    let eos = (backend != GenerationBackend::Reference).then_some(args.eos);
    let options = GeneratorOptions {
        backend,
        eos,
        max_context: prompt_ids.len() + args.max_tokens,
        reference,
        graphs: !args.eager,
        fp8_activations: args.fp8_activations,
        prefill_chunk: args.prefill_chunk,
    };
    let load = Instant::now();
    let bar = indicatif::ProgressBar::new(0)
        .with_style(indicatif::ProgressStyle::with_template("loading {bar:30} {pos}/{len} layers {elapsed}").expect("a valid progress template"));
    let mut generator = Generator::open_with_progress(checkpoint, &options, |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
    })?;
    bar.finish_and_clear();
    match generator.device() {
        None => println!("{} on the CPU reference, {reference:?}, prompt: {prompt}", checkpoint.dir.display()),
        Some(device) => println!("{} on {} (loaded in {:.2} s), prompt: {prompt}", checkpoint.dir.display(), device.name(), load.elapsed().as_secs_f64()),
    }
    sink.start();
    let start = Instant::now();
    let (mut first, mut last, mut count, mut failure) = (None, start, 0usize, None);
    generator.generate_with_images(prompt_ids, images, args.max_tokens, sampling, |token| {
        let now = Instant::now();
        first.get_or_insert(now);
        last = now;
        count += 1;
        if failure.is_none() {
            failure = sink.push(token).err();
        }
    })?;
    if let Some(e) = failure {
        return Err(e);
    }
    sink.finish()?;
    // The first token comes from the prefill's logits; every later one is a decode step. A rate is printed only
    // when it means something (tokens over a measurable time).
    let prefill = first.map_or(Duration::ZERO, |t| t - start);
    let decode = first.map_or(Duration::ZERO, |t| last - t);
    let decoded = count.saturating_sub(1);
    let rate = |tokens: usize, time: Duration| tokens_per_s(tokens, time).map_or_else(|| "no rate".to_string(), |r| format!("{r:.1} tokens/s"));
    println!(
        "prefill: {} tokens in {:.2} ms ({}); decode: {decoded} tokens in {:.2} ms ({})",
        prompt_ids.len(),
        prefill.as_secs_f64() * 1e3,
        rate(prompt_ids.len(), prefill),
        decode.as_secs_f64() * 1e3,
        rate(decoded, decode),
    );
    Ok(())
}

fn load_tokenizer(path: Option<&Path>) -> anyhow::Result<Tokenizer> {
    Ok(match path {
        Some(path) => Tokenizer::from_file(path)?,
        None => Tokenizer::stand_in()?,
    })
}

/// `small4 tokenize`: stdin text (no BOS) or a chat request's prompt -> `[id, ...]`.
fn tokenize_command(tokenizer: Option<&Path>, chat: Option<&Path>) -> anyhow::Result<()> {
    let tokenizer = load_tokenizer(tokenizer)?;
    let ids = match chat {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| small4::Error::io(path, e))?;
            tokenizer.encode_chat(&ChatRequest::from_json(&text)?)?.ids
        }
        None => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text)?;
            tokenizer.encode(&text, false, false)
        }
    };
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

/// `small4 detokenize`: `[id, ...]` on stdin -> text.
fn detokenize_command(tokenizer: Option<&Path>, keep_special: bool) -> anyhow::Result<()> {
    let tokenizer = load_tokenizer(tokenizer)?;
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let ids: Vec<u32> = serde_json::from_str(&input).map_err(|e| small4::Error::Json { what: "token id array on stdin".into(), source: e })?;
    let policy = if keep_special { SpecialTokenPolicy::Keep } else { SpecialTokenPolicy::Ignore };
    let text = tokenizer.decode(&ids, policy)?;
    let mut stdout = std::io::stdout();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()?;
    Ok(())
}

/// The text layer of a stored tensor name (`layers.N.` in either layout), or None for the global and vision tensors.
fn layer_of(name: &str) -> Option<usize> {
    if name.contains("vision") {
        return None;
    }
    let rest = &name[name.find("layers.")? + "layers.".len()..];
    rest.split('.').next()?.parse().ok()
}

/// `small4 inspect`: the tensors by layer, then every problem found (malformed shards, a config the engine cannot
/// run, tensors missing or of the wrong dtype or shape), all of them rather than the first.
fn inspect(dir: &Path) -> anyhow::Result<()> {
    let (ck, shard_problems) = Checkpoint::open_listing_problems(dir)?;
    let mut problems: Vec<String> = shard_problems.iter().map(ToString::to_string).collect();
    let config = ck.model_config();
    match &config {
        Ok(c) => println!(
            "{} ({:?} layout, {} shards): {} layers, dim {}, {} experts",
            dir.display(),
            ck.layout,
            ck.shard_paths().len(),
            c.n_layers,
            c.dim,
            c.experts
        ),
        Err(e) => {
            println!("{} ({:?} layout, {} shards)", dir.display(), ck.layout, ck.shard_paths().len());
            problems.push(format!("config: {e}"));
        }
    }
    if let Some(notice) = ck.text_only_notice() {
        println!("{notice}");
    }
    let mut groups: BTreeMap<Option<usize>, Vec<String>> = BTreeMap::new();
    for name in ck.stored_names() {
        let t = ck.stored(name)?;
        groups.entry(layer_of(name)).or_default().push(format!("  {name}  {:?} {:?}", t.dtype, t.shape));
    }
    for (layer, lines) in &groups {
        match layer {
            Some(l) => println!("layer {l}: {} tensors", lines.len()),
            None => println!("global: {} tensors", lines.len()),
        }
        for line in lines {
            println!("{line}");
        }
    }
    // Every tensor the engine reads, through the same accessors (shape, dtype and scale checks included).
    let mut formats: BTreeMap<String, usize> = BTreeMap::new();
    let mut check = |what: String, r: small4::Result<&'static str>| match r {
        Ok(format) => *formats.entry(format.to_string()).or_default() += 1,
        Err(e) => problems.push(format!("{what}: {e}")),
    };
    if let Ok(c) = &config {
        use safetensors::Dtype;
        let plain = |name: &str, shape: &[usize]| ck.plain(name, Dtype::BF16, shape).map(|_| "bf16");
        check("tok_embeddings".into(), plain("tok_embeddings.weight", &[c.vocab, c.dim]));
        check("norm".into(), plain("norm.weight", &[c.dim]));
        if !c.tied_embeddings {
            check("output".into(), plain("output.weight", &[c.vocab, c.dim]));
        }
        let qk = c.qk_head_dim();
        for l in 0..c.n_layers {
            let p = format!("layers.{l}");
            for (name, len) in [("attention_norm", c.dim), ("ffn_norm", c.dim), ("attention.q_a_norm", c.q_lora_rank), ("attention.kv_a_norm", c.kv_lora_rank)]
            {
                check(format!("{p}.{name}"), plain(&format!("{p}.{name}.weight"), &[len]));
            }
            check(format!("{p}.gate"), plain(&format!("{p}.gate.weight"), &[c.experts, c.dim]));
            for (name, rows, cols) in [
                ("wq_a", c.q_lora_rank, c.dim),
                ("wq_b", c.heads * qk, c.q_lora_rank),
                ("wkv_a_with_mqa", c.kv_lora_rank + c.qk_rope, c.dim),
                ("wkv_b", c.heads * (c.qk_nope + c.v_head), c.kv_lora_rank),
                ("wo", c.dim, c.heads * c.v_head),
            ] {
                check(format!("{p}.attention.{name}"), ck.matrix(&format!("{p}.attention.{name}"), rows, cols).map(|m| m.format_name()));
            }
            if c.shared_experts > 0 {
                let h = c.shared_hidden();
                for (name, rows, cols) in [("w1", h, c.dim), ("w3", h, c.dim), ("w2", c.dim, h)] {
                    check(format!("{p}.shared_experts.{name}"), ck.matrix(&format!("{p}.shared_experts.{name}"), rows, cols).map(|m| m.format_name()));
                }
            }
            for e in 0..c.experts {
                for which in [ExpertMatrix::W1, ExpertMatrix::W3, ExpertMatrix::W2] {
                    check(format!("{p}.experts.{e}.{which:?}"), ck.expert_matrix(l, e, which, c.dim, c.expert_hidden).map(|m| m.format_name()));
                }
            }
        }
        if let Some(v) = &c.vision {
            check("vision tower and projector".into(), ck.vision_weights(v, c.dim).map(|_| "vision tower"));
        }
    }
    let summary: Vec<String> = formats.iter().map(|(f, n)| format!("{n} {f}")).collect();
    println!("weights read by the engine: {}", summary.join(", "));
    if problems.is_empty() {
        println!("problems: none");
    } else {
        println!("problems ({}):", problems.len());
        for p in &problems {
            println!("  {p}");
        }
        bail!("{} problems in {}", problems.len(), dir.display());
    }
    Ok(())
}
