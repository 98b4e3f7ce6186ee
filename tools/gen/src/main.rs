//! `small4-gen`: a seeded random-weight checkpoint of a preset (or of any params.json / config.json) in the native
//! or the HF layout and any expert weight format, written through the same writer the tests and `small4 generate`
//! use, so whatever it writes is read back by the real loading code.
//!
//! `cargo run -p small4-gen -- --preset tiny --layout hf --format nvfp4 --seed 7 --out /tmp/tiny-hf-nvfp4`

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::config::ModelConfig;
use small4::model::synthetic::{load_reference_weights, write_checkpoint, HF_MISTRAL3_PREFIX};
use small4::quant::WeightFormat;
use small4::reference::model::ReferenceWeights;

/// The generator builds every tensor in memory (f32) before writing: above this many parameters it refuses.
const MAX_PARAMS_IN_MEMORY: u64 = 2_000_000_000;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Preset {
    /// The tiny model of the tests and `small4 generate` (same architecture, small sizes, a vision tower).
    Tiny,
    /// The real Mistral Small 4 geometry (119B parameters: refused, see --help).
    MistralSmall4,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LayoutArg {
    Native,
    Hf,
}

/// Writes a seeded random-weight checkpoint.
#[derive(Parser)]
#[command(name = "small4-gen", version)]
struct Args {
    /// A preset geometry (ignored when --config is given).
    #[arg(long, value_enum, default_value = "tiny")]
    preset: Preset,
    /// A params.json (native) or config.json (HF) whose geometry to use instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value = "native")]
    layout: LayoutArg,
    /// Expert weight format: bf16, fp8, fp8-block, int4, int4-zp, nvfp4 (attention follows the checkpoint's rules).
    #[arg(long, default_value = "bf16")]
    format: String,
    #[arg(long, default_value_t = 4)]
    seed: u64,
    /// Largest safetensors shard in bytes.
    #[arg(long, default_value_t = 64 << 20)]
    shard_bytes: usize,
    /// The directory to create (must not exist).
    #[arg(long)]
    out: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = match (&args.config, args.preset) {
        (Some(path), _) => ModelConfig::from_file(path)?,
        (None, Preset::Tiny) => ModelConfig::tiny(),
        (None, Preset::MistralSmall4) => ModelConfig::mistral_small_4(),
    };
    let params = config.param_counts().total();
    if params > MAX_PARAMS_IN_MEMORY {
        bail!(
            "{params} parameters: the generator builds the weights in memory as f32 ({} GB here), so it stops at {MAX_PARAMS_IN_MEMORY}; \
             give a smaller geometry with --config (fewer layers or experts keep every layout and format path the same)",
            params * 4 / 1_000_000_000
        );
    }
    let format: WeightFormat = args.format.parse()?;
    let layout = match args.layout {
        LayoutArg::Native => Layout::Native,
        LayoutArg::Hf => Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.to_string() },
    };
    if args.out.exists() {
        bail!("{} exists: the generator writes a new directory only", args.out.display());
    }
    let weights = ReferenceWeights::random(&config, args.seed).context("building the random weights")?;
    write_checkpoint(&args.out, &weights, &layout, format, args.shard_bytes)?;
    // Read it back through the loader, so a written checkpoint is known to load.
    let checkpoint = Checkpoint::open(&args.out)?;
    load_reference_weights(&checkpoint).context("reading the written checkpoint back")?;
    println!(
        "wrote {} ({params} parameters, {format} experts, {:?} layout, seed {}): {} tensors in {} files",
        args.out.display(),
        args.layout,
        args.seed,
        checkpoint.stored_names().len(),
        checkpoint.shard_paths().len()
    );
    Ok(())
}
