//! The `small4` command line.

use std::io::Write;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};

use small4::model::ModelConfig;
use small4::reference::model::{AttentionForm, ForwardOptions, ReferenceModel, ReferenceWeights, RoundingMode};

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
    /// Greedy generation with the embedded tiny preset (random weights from a fixed seed).
    Generate(GenerateArgs),
    /// Memory plans of the full model (default: Mistral Small 4) on one and several GPUs: weights by format,
    /// activation workspace and KV-cache capacity per GPU.
    Plan {
        /// A checkpoint directory or a params.json / config.json file; the real Mistral Small 4 when absent.
        #[arg(long)]
        config: Option<std::path::PathBuf>,
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

#[derive(Args)]
struct GenerateArgs {
    #[arg(long, value_enum, default_value = "reference")]
    backend: Backend,
    /// Prompt token ids, comma separated (the tiny preset's vocabulary is 2048).
    #[arg(long, value_delimiter = ',', default_value = "1,1010,73,1932,500,17,1221,4")]
    prompt_ids: Vec<u32>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 16)]
    max_tokens: usize,
    /// Seed of the tiny preset's random weights.
    #[arg(long, default_value_t = 4)]
    seed: u64,
    /// Attention form of the reference forward pass.
    #[arg(long, value_enum, default_value = "absorbed")]
    attention: Attention,
    /// Activation rounding of the reference forward pass (bf16: where the GPU path stores bf16).
    #[arg(long, value_enum, default_value = "bf16")]
    rounding: Rounding,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Resources => print!("{}", small4::kernels::KERNEL_RESOURCES_MARKDOWN),
        Command::Generate(args) => generate(&args)?,
        Command::Plan { config } => plan(config.as_deref())?,
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

fn generate(args: &GenerateArgs) -> anyhow::Result<()> {
    if args.backend != Backend::Reference {
        bail!("backend {:?} is not implemented yet: only `--backend reference` runs for now", args.backend);
    }
    if args.prompt_ids.is_empty() {
        bail!("--prompt-ids needs at least one token id");
    }
    let config = ModelConfig::tiny();
    let weights = ReferenceWeights::random(&config, args.seed).context("building the tiny preset's weights")?;
    let options = ForwardOptions {
        rounding: match args.rounding {
            Rounding::F32 => RoundingMode::F32,
            Rounding::Bf16 => RoundingMode::Bf16Activations,
        },
        attention: match args.attention {
            Attention::Naive => AttentionForm::Naive,
            Attention::Absorbed => AttentionForm::Absorbed,
        },
    };
    let model = ReferenceModel::new(weights, options)?;
    let prompt: Vec<String> = args.prompt_ids.iter().map(u32::to_string).collect();
    println!("tiny preset (seed {}), {:?}, prompt: {}", args.seed, options, prompt.join(","));
    print!("generated:");
    let stats = model.generate_greedy(&args.prompt_ids, args.max_tokens, |token| {
        print!(" {token}");
        // Show each token as it comes; a closed stdout only loses the display.
        let _ = std::io::stdout().flush();
    })?;
    println!();
    println!(
        "prefill: {} tokens in {:.2} ms ({:.1} tokens/s); decode: {} tokens in {:.2} ms ({:.1} tokens/s)",
        stats.prompt_tokens,
        stats.prefill_time.as_secs_f64() * 1e3,
        stats.prefill_tokens_per_s(),
        stats.decode_steps(),
        stats.decode_time.as_secs_f64() * 1e3,
        stats.decode_tokens_per_s(),
    );
    Ok(())
}
