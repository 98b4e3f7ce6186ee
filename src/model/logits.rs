//! Logits as files: the f32 logits `[positions, vocab]` of a prompt (and optionally of greedily continued tokens)
//! from the CPU reference or the engine, written in NumPy's `.npy` format, and the comparison of two such files
//! (maximum and mean absolute difference, argmax agreement and KL divergence per position) with tolerances. What
//! `small4 logits` and `small4 compare` run, so that any runtime (vLLM, llama.cpp, ...) can be checked against this
//! crate's reference by its own CI.
//!
//! ```
//! use small4::model::checkpoint::{Checkpoint, Layout};
//! use small4::model::logits::{compare, run_logits, Logits, LogitsBackend, LogitsSource, Tolerances};
//! use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
//! use small4::model::ForwardOptions;
//! use small4::quant::WeightFormat;
//!
//! let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?)?;
//! let backend = LogitsBackend::Reference(ForwardOptions::default());
//! // Three prompt positions and two greedy tokens: five rows.
//! let run = run_logits(&LogitsSource::Checkpoint(&checkpoint), &backend, &[1, 300, 301], 2)?;
//! assert_eq!((run.logits.positions(), run.tokens.len()), (5, 5));
//!
//! let path = std::env::temp_dir().join(format!("small4-logits-doc-{}.npy", std::process::id()));
//! run.logits.write_npy(&path)?;
//! let back = Logits::read_npy(&path)?;
//! assert_eq!(back, run.logits);
//! let same = compare(&run.logits, &back)?;
//! assert_eq!((same.max_abs(), same.argmax_agreement()), (0.0, 1.0));
//! assert!(same.violations(&Tolerances { max_abs: Some(0.0), min_argmax_agree: Some(1.0) }).is_empty());
//!
//! // One position moved: the difference shows, and a tolerance below it is violated.
//! let mut moved = back.values.clone();
//! moved[3 * back.vocab] += 0.5;
//! let diff = compare(&run.logits, &Logits::new(moved, back.vocab)?)?;
//! assert!((diff.max_abs() - 0.5).abs() < 1e-6); // up to the rounding of the moved logit
//! assert!(diff.positions[3].kl > 0.0 && diff.positions[0].kl == 0.0);
//! assert_eq!(diff.violations(&Tolerances { max_abs: Some(0.1), min_argmax_agree: None }).len(), 1);
//! std::fs::remove_file(&path).map_err(|e| small4::Error::io(&path, e))?;
//! # Ok::<(), small4::Error>(())
//! ```

use std::fmt;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use npyz::WriterBuilder;

use super::checkpoint::Checkpoint;
use super::engine::{DeviceModel, Engine, EngineOptions, Shard};
use super::synth::SyntheticModel;
use super::ModelConfig;
use crate::device::Device;
use crate::reference::model::{argmax, ForwardOptions, ReferenceModel};
use crate::reference::weights::{CheckpointWeights, WeightSource};
use crate::{Error, Result};

/// Logits `[positions, vocab]`, row-major f32.
#[derive(Clone, Debug, PartialEq)]
pub struct Logits {
    /// Entries per position (the vocabulary size).
    pub vocab: usize,
    /// `positions * vocab` values, position by position.
    pub values: Vec<f32>,
}

impl Logits {
    /// `Error::Shape` unless `values` is whole rows of `vocab` (> 0) values.
    pub fn new(values: Vec<f32>, vocab: usize) -> Result<Self> {
        if vocab == 0 || values.len() % vocab != 0 {
            return Err(Error::shape("logits", format!("rows of vocab {vocab}"), format!("{} values", values.len())));
        }
        Ok(Logits { vocab, values })
    }

    /// Rows.
    pub fn positions(&self) -> usize {
        self.values.len() / self.vocab
    }

    /// The logits of position `p` (panics past the last position, as slice indexing does).
    pub fn row(&self, p: usize) -> &[f32] {
        &self.values[p * self.vocab..(p + 1) * self.vocab]
    }

    /// Writes a NumPy `.npy` file: dtype `<f4`, C order, shape `[positions, vocab]`. `Error::Io` when it cannot
    /// be written.
    pub fn write_npy(&self, path: &Path) -> Result<()> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        let shape = [self.positions() as u64, self.vocab as u64];
        let write = || -> std::io::Result<()> {
            let mut writer = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(BufWriter::new(file)).begin_nd()?;
            writer.extend(self.values.iter().copied())?;
            writer.finish()
        };
        write().map_err(|e| Error::io(path, e))
    }

    /// Reads a `.npy` file of f32 logits `[positions, vocab]` in C order (either byte order). `Error::Io` when it is
    /// missing or not a readable `.npy` file; `Error::Shape` when it is not 2-D with a non-zero vocabulary;
    /// `Error::InvalidArgument` for another dtype or Fortran order.
    pub fn read_npy(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let npy = npyz::NpyFile::new(BufReader::new(file)).map_err(|e| Error::io(path, e))?;
        let shape = npy.shape().to_vec();
        let [positions, vocab] = shape[..] else {
            return Err(Error::shape(format!("logits file {}", path.display()), "2 dimensions [positions, vocab]", format!("{shape:?}")));
        };
        if npy.order() != npyz::Order::C {
            return Err(Error::InvalidArgument(format!("logits file {}: Fortran order, C order expected", path.display())));
        }
        let dtype = npy.dtype();
        let reader = npy.data::<f32>().map_err(|e| Error::InvalidArgument(format!("logits file {}: dtype {dtype:?}, f32 expected: {e}", path.display())))?;
        let values = reader.collect::<std::io::Result<Vec<f32>>>().map_err(|e| Error::io(path, e))?;
        if values.len() as u64 != positions * vocab {
            return Err(Error::shape(format!("logits file {}", path.display()), positions * vocab, values.len()));
        }
        Logits::new(values, vocab as usize).map_err(|_| Error::shape(format!("logits file {}", path.display()), "a vocabulary > 0", format!("{shape:?}")))
    }
}

/// The weights a logits run reads.
#[derive(Clone, Copy)]
pub enum LogitsSource<'a> {
    /// A checkpoint directory (any layout and format the engine reads).
    Checkpoint(&'a Checkpoint),
    /// The counter-based synthetic model (`model::synth`), generated on use: any size without a file.
    Synthetic(&'a SyntheticModel),
}

/// Where a logits run computes.
#[derive(Clone)]
pub enum LogitsBackend {
    /// The streaming CPU reference (`reference::model`, weights read in place), with these options.
    Reference(ForwardOptions),
    /// The engine on a device (GPU or the PTX interpreter), loading or generating the model there.
    Engine(Device),
}

/// What [`run_logits`] returns.
#[derive(Clone, Debug, PartialEq)]
pub struct LogitsRun {
    /// `[prompt + greedy tokens, vocab]`.
    pub logits: Logits,
    /// The tokens whose logits they are: the prompt, then the greedy tokens fed after it.
    pub tokens: Vec<u32>,
}

/// The logits of every prompt position, then `greedy` times: the argmax of the last row (ties to the lower id) is fed
/// as the next token and its logits appended. `Error::InvalidArgument` for an empty prompt; the backends' errors
/// (a token outside the vocabulary, no GPU, a bad checkpoint).
pub fn run_logits(source: &LogitsSource, backend: &LogitsBackend, prompt: &[u32], greedy: usize) -> Result<LogitsRun> {
    if prompt.is_empty() {
        return Err(Error::InvalidArgument("logits of an empty prompt".into()));
    }
    match (backend, source) {
        (LogitsBackend::Reference(options), LogitsSource::Checkpoint(checkpoint)) => {
            reference_logits(ReferenceModel::new(CheckpointWeights::new(checkpoint)?, *options)?, prompt, greedy)
        }
        (LogitsBackend::Reference(options), LogitsSource::Synthetic(model)) => {
            reference_logits(ReferenceModel::new((*model).clone(), *options)?, prompt, greedy)
        }
        (LogitsBackend::Engine(device), source) => {
            let model = match source {
                LogitsSource::Checkpoint(checkpoint) => DeviceModel::load(device, checkpoint, Shard::SINGLE)?,
                LogitsSource::Synthetic(model) => DeviceModel::synthetic(device, model)?,
            };
            let vocab = model.config().vocab;
            const PAGE_SIZE: usize = 16;
            // One page more than the tokens need: the last page may start mid-way.
            let num_pages = (prompt.len() + greedy).div_ceil(PAGE_SIZE) + 1;
            let mut engine = Engine::new(model, EngineOptions { eos: None, page_size: PAGE_SIZE, num_pages, graphs: false, ..EngineOptions::default() }, None)?;
            let seq = engine.new_sequence();
            greedy_logits(prompt, greedy, vocab, |tokens| engine.forward_logits(&[(seq, tokens.to_vec())]))
        }
    }
}

fn reference_logits<W: WeightSource>(model: ReferenceModel<W>, prompt: &[u32], greedy: usize) -> Result<LogitsRun> {
    let mut cache = model.new_cache();
    greedy_logits(prompt, greedy, model.config().vocab, |tokens| model.forward(tokens, &mut cache))
}

/// `forward(tokens)` returns the logits of `tokens` appended to what it ran before.
fn greedy_logits(prompt: &[u32], greedy: usize, vocab: usize, mut forward: impl FnMut(&[u32]) -> Result<Vec<f32>>) -> Result<LogitsRun> {
    let mut values = forward(prompt)?;
    let mut tokens = prompt.to_vec();
    for _ in 0..greedy {
        let next = argmax(&values[values.len() - vocab..]);
        tokens.push(next);
        values.extend(forward(&[next])?);
    }
    Ok(LogitsRun { logits: Logits::new(values, vocab)?, tokens })
}

/// The configuration of a source (what `small4 logits` reports).
pub fn source_config(source: &LogitsSource) -> Result<ModelConfig> {
    match source {
        LogitsSource::Checkpoint(checkpoint) => ModelConfig::from_json_str(&checkpoint.config_json.to_string()),
        LogitsSource::Synthetic(model) => Ok(model.config.clone()),
    }
}

/// How two logits files differ at one position.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PositionDiff {
    /// The largest `|a - b|` (NaN when either side has a NaN or the infinities differ).
    pub max_abs: f32,
    /// The mean `|a - b|`.
    pub mean_abs: f64,
    /// The argmax of `a` (ties to the lower id).
    pub argmax_a: u32,
    /// The argmax of `b`.
    pub argmax_b: u32,
    /// `KL(softmax(a) || softmax(b))` in nats, computed in f64.
    pub kl: f64,
}

/// The per-position differences of two logits files ([`compare`]); `Display` prints one line per position and a
/// summary.
#[derive(Clone, Debug, PartialEq)]
pub struct Comparison {
    /// One entry per position.
    pub positions: Vec<PositionDiff>,
}

/// Limits for [`Comparison::violations`]; `None` checks nothing for that figure.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tolerances {
    /// The largest absolute difference allowed at any position.
    pub max_abs: Option<f32>,
    /// The smallest fraction of positions (0..=1) whose argmaxes must agree.
    pub min_argmax_agree: Option<f64>,
}

/// Compares two logits arrays position by position. `Error::Shape` when their shapes differ.
pub fn compare(a: &Logits, b: &Logits) -> Result<Comparison> {
    if (a.positions(), a.vocab) != (b.positions(), b.vocab) {
        return Err(Error::shape("compared logits", format!("[{}, {}]", a.positions(), a.vocab), format!("[{}, {}]", b.positions(), b.vocab)));
    }
    let positions = (0..a.positions())
        .map(|p| {
            let (x, y) = (a.row(p), b.row(p));
            let diffs = x.iter().zip(y).map(|(u, v)| (u - v).abs());
            let max_abs = diffs.clone().fold(0.0f32, |m, d| if d.is_nan() || m.is_nan() { f32::NAN } else { m.max(d) });
            let mean_abs = diffs.map(f64::from).sum::<f64>() / a.vocab as f64;
            let (la, lb) = (log_softmax(x), log_softmax(y));
            let kl = la.iter().zip(&lb).map(|(&p, &q)| p.exp() * (p - q)).sum();
            PositionDiff { max_abs, mean_abs, argmax_a: argmax(x), argmax_b: argmax(y), kl }
        })
        .collect();
    Ok(Comparison { positions })
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
    let log_sum = row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    row.iter().map(|&v| v as f64 - log_sum).collect()
}

impl Comparison {
    /// The largest absolute difference over all positions (NaN if any position's is).
    pub fn max_abs(&self) -> f32 {
        self.positions.iter().fold(0.0f32, |m, p| if p.max_abs.is_nan() || m.is_nan() { f32::NAN } else { m.max(p.max_abs) })
    }

    /// The mean absolute difference over all values.
    pub fn mean_abs(&self) -> f64 {
        self.positions.iter().map(|p| p.mean_abs).sum::<f64>() / self.positions.len().max(1) as f64
    }

    /// The fraction of positions whose argmaxes agree (1 for no positions).
    pub fn argmax_agreement(&self) -> f64 {
        if self.positions.is_empty() {
            return 1.0;
        }
        self.positions.iter().filter(|p| p.argmax_a == p.argmax_b).count() as f64 / self.positions.len() as f64
    }

    /// The largest KL divergence of a position.
    pub fn max_kl(&self) -> f64 {
        self.positions.iter().fold(0.0f64, |m, p| if p.kl.is_nan() || m.is_nan() { f64::NAN } else { m.max(p.kl) })
    }

    /// Every figure beyond `tolerances`, described with its limit (a NaN difference is beyond any); empty when the
    /// comparison passes.
    pub fn violations(&self, tolerances: &Tolerances) -> Vec<String> {
        let mut violations = Vec::new();
        if let Some(limit) = tolerances.max_abs {
            let got = self.max_abs();
            if got.is_nan() || got > limit {
                violations.push(format!("max |a-b| {got:e} > {limit:e}"));
            }
        }
        if let Some(limit) = tolerances.min_argmax_agree {
            let got = self.argmax_agreement();
            if got < limit {
                violations.push(format!("argmax agreement {got:.4} < {limit}"));
            }
        }
        violations
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.positions.iter().enumerate() {
            let agree = if p.argmax_a == p.argmax_b { "agree" } else { "DIFFER" };
            writeln!(
                f,
                "position {i}: max |a-b| {:.6e}, mean |a-b| {:.6e}, argmax {} / {} ({agree}), KL {:.6e}",
                p.max_abs, p.mean_abs, p.argmax_a, p.argmax_b, p.kl
            )?;
        }
        write!(
            f,
            "{} positions: max |a-b| {:.6e}, mean |a-b| {:.6e}, argmax agreement {:.4}, max KL {:.6e}",
            self.positions.len(),
            self.max_abs(),
            self.mean_abs(),
            self.argmax_agreement(),
            self.max_kl()
        )
    }
}
