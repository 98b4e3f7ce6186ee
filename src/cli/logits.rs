//! `small4 logits` (the logits of a prompt as a NumPy .npy file, from the reference or the engine) and
//! `small4 compare` (two such files side by side, non-zero exit beyond tolerances): `small4::model::logits`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;

use small4::model::checkpoint::Checkpoint;
use small4::model::logits::{compare, run_logits, source_config, Logits, LogitsBackend, LogitsSource, Tolerances};
use small4::model::synth::SyntheticModel;
use small4::model::ForwardOptions;
use small4::quant::WeightFormat;

use crate::{checkpoint_dir, Backend, ModelArgs, PresetArg};

#[derive(Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    checkpoint: ModelArgs,
    /// The counter-based synthetic model of the real preset (Mistral Small 4's dimensions, experts in --format,
    /// weights from --seed), generated as it is read: nothing is stored. Instead of a checkpoint.
    #[arg(long, conflicts_with = "model")]
    synthetic: bool,
    /// Decoder layers of the synthetic model (default: the preset's 36).
    #[arg(long, requires = "synthetic")]
    layers: Option<usize>,
    /// Routed experts of the synthetic model (default: the preset's 128; at least 4).
    #[arg(long, requires = "synthetic")]
    experts: Option<usize>,
    /// Synthetic model: the preset whose dimensions it has (tiny: the interpreter's rehearsal size).
    #[arg(long, value_enum, default_value = "real", requires = "synthetic")]
    preset: PresetArg,
    /// Prompt token ids, comma separated.
    #[arg(long, value_delimiter = ',', required = true)]
    prompt_ids: Vec<u32>,
    #[arg(long, value_enum, default_value = "reference")]
    backend: Backend,
    /// The .npy file to write: f32 [tokens, vocab].
    #[arg(long)]
    out: PathBuf,
    /// Greedy tokens fed after the prompt, their logits appended (the argmax of each last row).
    #[arg(long, default_value_t = 0)]
    greedy: usize,
}

#[derive(Args)]
pub struct CompareArgs {
    /// A logits .npy file, f32 [positions, vocab].
    a: PathBuf,
    /// Another of the same shape.
    b: PathBuf,
    /// Fail when the largest absolute difference exceeds this.
    #[arg(long)]
    max_abs: Option<f32>,
    /// Fail when fewer positions than this fraction (0..=1) have the same argmax.
    #[arg(long)]
    min_argmax_agree: Option<f64>,
}

/// `small4 logits`.
pub fn logits_command(args: &LogitsArgs) -> anyhow::Result<()> {
    let format: WeightFormat = args.checkpoint.format.parse()?;
    let synthetic = args
        .synthetic
        .then(|| SyntheticModel::new(small4::model::synth::shrink(args.preset.config(), args.layers, args.experts)?, format, args.checkpoint.seed))
        .transpose()?;
    let checkpoint = if synthetic.is_none() { Some(Checkpoint::open(checkpoint_dir(&args.checkpoint)?)?) } else { None };
    let (source, name) = match (&synthetic, &checkpoint) {
        (Some(model), _) => (
            LogitsSource::Synthetic(model),
            format!("the synthetic model ({} layers, {} experts, {format}, seed {})", model.config.n_layers, model.config.experts, model.seed),
        ),
        (None, Some(checkpoint)) => (LogitsSource::Checkpoint(checkpoint), checkpoint.dir.display().to_string()),
        (None, None) => unreachable!("one of the two is made above"),
    };
    let config = source_config(&source)?;
    let backend = match args.backend {
        Backend::Reference => LogitsBackend::Reference(ForwardOptions::default()),
        Backend::Sim => LogitsBackend::Engine(small4::device::simulator()),
        Backend::Gpu => {
            LogitsBackend::Engine(small4::device::gpu().context("small4 logits --backend gpu (--backend sim runs the engine on the PTX interpreter)")?)
        }
    };
    let start = Instant::now();
    let run = run_logits(&source, &backend, &args.prompt_ids, args.greedy)?;
    let seconds = start.elapsed().as_secs_f64();
    run.logits.write_npy(&args.out)?;
    println!("{name}: {} layers, {} experts, vocab {}", config.n_layers, config.experts, config.vocab);
    println!("tokens: {:?}", run.tokens);
    println!(
        "wrote [{}, {}] f32 logits to {} ({:?} backend, {:.2} s, {:.3} tokens/s)",
        run.logits.positions(),
        run.logits.vocab,
        args.out.display(),
        args.backend,
        seconds,
        run.tokens.len() as f64 / seconds.max(f64::MIN_POSITIVE)
    );
    Ok(())
}

/// `small4 compare`: exits non-zero when a tolerance is exceeded.
pub fn compare_command(args: &CompareArgs) -> anyhow::Result<()> {
    let (a, b) = (Logits::read_npy(&args.a)?, Logits::read_npy(&args.b)?);
    let comparison = compare(&a, &b)?;
    println!("{comparison}");
    let violations = comparison.violations(&Tolerances { max_abs: args.max_abs, min_argmax_agree: args.min_argmax_agree });
    if !violations.is_empty() {
        bail!("{} and {} differ beyond the tolerances: {}", args.a.display(), args.b.display(), violations.join("; "));
    }
    Ok(())
}
