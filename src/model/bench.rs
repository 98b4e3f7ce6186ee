//! End-to-end benchmark of the engine (what `small4 bench` runs): a batch of same-length random prompts prefilled
//! together, then decode steps in which every sequence adds one token, timed step by step on the host.
//!
//! The numbers are wall-clock times of [`Engine::step`], which ends with the step's one synchronisation (the host reads
//! the sampled tokens), so each is the device time of the step plus its launch overhead. They are what a server would
//! see; the per-kernel figures against the GPU's ceilings come from the criterion benches (`cargo bench`).

use std::fmt;
use std::time::{Duration, Instant};

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::device::Device;
use crate::model::checkpoint::Checkpoint;
use crate::model::engine::{DeviceModel, Engine, EngineOptions, Shard, Request, Sampling};
use crate::model::kv_cache::DEFAULT_PAGE_SIZE;
use crate::{Error, Result};

/// The shape of a benchmark run. The default: batch 1, 128 prompt tokens, 32 timed decode steps after 2 warm-up
/// ones, graphs on, bf16 activations, seed 0.
#[derive(Clone, Copy, Debug)]
pub struct BenchOptions {
    /// Sequences decoded together.
    pub batch: usize,
    /// Prompt tokens of each sequence (random ids, seeded, drawn below the vocabulary size).
    pub prompt_len: usize,
    /// Timed decode steps after the prefill (each adds one token to every sequence).
    pub decode_steps: usize,
    /// Untimed decode steps run first (graph capture, allocator and clock warm-up).
    pub warmup_steps: usize,
    /// Replay decode steps as captured graphs (`EngineOptions::graphs`).
    pub graphs: bool,
    /// Routed experts in W8A8 (`EngineOptions::fp8_activations`).
    pub fp8_activations: bool,
    /// Seed of the random prompts.
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions { batch: 1, prompt_len: 128, decode_steps: 32, warmup_steps: 2, graphs: true, fp8_activations: false, seed: 0 }
    }
}

/// What one run measured.
///
/// The figures derive from the recorded times; a report built by hand (as a test of a report consumer would):
///
/// ```
/// use std::time::Duration;
/// use small4::model::bench::{BenchOptions, BenchReport};
///
/// let ms = Duration::from_millis;
/// let report = BenchReport {
///     device: "sim".into(),
///     options: BenchOptions { batch: 4, prompt_len: 100, ..BenchOptions::default() },
///     load: Duration::from_secs(1),
///     prefill: ms(200),
///     decode_steps: vec![ms(30), ms(10), ms(20), ms(40)],
///     captured_graphs: 1,
/// };
/// assert_eq!(report.prefill_tokens_per_s(), 4.0 * 100.0 / 0.2); // batch * prompt_len / prefill
/// assert_eq!(report.decode_step_mean(), ms(25));
/// assert_eq!(report.decode_step_quantile(0.5), ms(20)); // nearest rank: the 2nd of 4 sorted steps
/// assert_eq!(report.decode_step_quantile(0.0), ms(10)); // the fastest step
/// assert_eq!(report.decode_step_quantile(1.0), ms(40)); // the slowest
/// assert_eq!(report.decode_tokens_per_s(), 4.0 / 0.025); // one token per sequence per step
/// assert!(report.to_string().contains("replays 1 captured graph(s)"));
/// ```
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// The device's name ([`crate::device::Backend::device_name`]).
    pub device: String,
    /// The options it ran with.
    pub options: BenchOptions,
    /// Loading and repacking the checkpoint onto the device.
    pub load: Duration,
    /// The prefill step of the whole batch (`batch * prompt_len` tokens, one sampled token per sequence).
    pub prefill: Duration,
    /// Each timed decode step, in order.
    pub decode_steps: Vec<Duration>,
    /// Decode graphs the engine holds at the end (0: every step ran eagerly).
    pub captured_graphs: usize,
}

impl BenchReport {
    /// Prompt tokens prefilled per second: `batch * prompt_len` over the prefill step's time.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        (self.options.batch * self.options.prompt_len) as f64 / self.prefill.as_secs_f64()
    }

    /// The mean decode step.
    pub fn decode_step_mean(&self) -> Duration {
        self.decode_steps.iter().sum::<Duration>() / self.decode_steps.len().max(1) as u32
    }

    /// The `q`-quantile (0..=1) of the decode steps, nearest rank.
    pub fn decode_step_quantile(&self, q: f64) -> Duration {
        let mut sorted = self.decode_steps.clone();
        sorted.sort();
        let rank = ((q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len().max(1));
        sorted.get(rank - 1).copied().unwrap_or_default()
    }

    /// Generated tokens per second over the timed decode steps (all sequences together).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.options.batch as f64 / self.decode_step_mean().as_secs_f64()
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(f, "device: {}", self.device)?;
        writeln!(
            f,
            "batch {} x prompt {} tokens, {} decode steps timed after {} warm-up; decode {}{}",
            o.batch,
            o.prompt_len,
            o.decode_steps,
            o.warmup_steps,
            if self.captured_graphs > 0 { format!("replays {} captured graph(s)", self.captured_graphs) } else { "eager".into() },
            if o.fp8_activations { ", experts in W8A8" } else { "" },
        )?;
        writeln!(f, "load: {:.2} s", self.load.as_secs_f64())?;
        writeln!(f, "prefill: {:.3} ms ({:.1} tokens/s)", ms(self.prefill), self.prefill_tokens_per_s())?;
        write!(
            f,
            "decode step: mean {:.3} ms, p50 {:.3} ms, p90 {:.3} ms, min {:.3} ms ({:.1} tokens/s, {:.1} tokens/s per sequence)",
            ms(self.decode_step_mean()),
            ms(self.decode_step_quantile(0.5)),
            ms(self.decode_step_quantile(0.9)),
            ms(self.decode_step_quantile(0.0)),
            self.decode_tokens_per_s(),
            self.decode_tokens_per_s() / o.batch as f64,
        )
    }
}

/// Shortest time a rate is computed over: below it the clock's resolution dominates and the figure means nothing.
pub const MIN_RATE_TIME: Duration = Duration::from_micros(1);

/// `tokens` per second over `elapsed`, or `None` when the figure would mean nothing: no tokens, or less time than
/// [`MIN_RATE_TIME`]. What `small4 generate` and the bench report print their rates with.
///
/// ```
/// use std::time::Duration;
/// use small4::model::bench::tokens_per_s;
///
/// assert_eq!(tokens_per_s(50, Duration::from_millis(100)), Some(500.0));
/// assert_eq!(tokens_per_s(0, Duration::from_millis(100)), None); // nothing was generated
/// assert_eq!(tokens_per_s(3, Duration::ZERO), None); // not a rate of 3 / 1e-308
/// ```
pub fn tokens_per_s(tokens: usize, elapsed: Duration) -> Option<f64> {
    (tokens > 0 && elapsed >= MIN_RATE_TIME).then(|| tokens as f64 / elapsed.as_secs_f64())
}

/// Loads `checkpoint` on `device` and runs the benchmark: one prefill of the batch, `warmup_steps` untimed decode
/// steps, then `decode_steps` timed ones. The stop token is off, so every sequence runs the whole way. The KV cache
/// is sized to the run exactly (pages of `DEFAULT_PAGE_SIZE` tokens for prompt and generated tokens, per sequence).
///
/// `Error::InvalidArgument` when `batch`, `prompt_len` or `decode_steps` is 0; the load's and the engine's errors
/// otherwise.
///
/// On the interpreter with the tiny model (a smoke test: the times are the interpreter's, not a GPU's):
///
/// ```
/// use small4::model::bench::{bench_engine, BenchOptions};
/// use small4::model::checkpoint::{Checkpoint, Layout};
/// use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
/// use small4::quant::WeightFormat;
///
/// let device = small4::device::simulator();
/// let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?)?;
/// let options = BenchOptions { batch: 1, prompt_len: 2, decode_steps: 1, warmup_steps: 0, ..BenchOptions::default() };
/// let report = bench_engine(&device, &checkpoint, options)?;
/// assert_eq!(report.device, "sim");
/// assert_eq!(report.decode_steps.len(), 1);
/// assert_eq!(report.captured_graphs, 0); // a shape's first decode step runs eagerly
/// assert!(bench_engine(&device, &checkpoint, BenchOptions { decode_steps: 0, ..options }).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn bench_engine(device: &Device, checkpoint: &Checkpoint, options: BenchOptions) -> Result<BenchReport> {
    if options.batch == 0 || options.prompt_len == 0 || options.decode_steps == 0 {
        return Err(Error::InvalidArgument(format!(
            "a benchmark needs at least one sequence, one prompt token and one decode step (batch {}, prompt {}, steps {})",
            options.batch, options.prompt_len, options.decode_steps
        )));
    }
    let load_start = Instant::now();
    let model = DeviceModel::load(device, checkpoint, Shard::SINGLE)?;
    let load = load_start.elapsed();
    let vocab = model.config().vocab;
    // Text tokens only: an [IMG] token takes an image (the engine refuses one without).
    let image_token = model.config().vision.as_ref().map(|v| v.image_token_id);
    // The prefill samples one token, then warm-up and timed steps one each.
    let max_tokens = 1 + options.warmup_steps + options.decode_steps;
    let pages_per_sequence = (options.prompt_len + max_tokens).div_ceil(DEFAULT_PAGE_SIZE);
    let engine_options = EngineOptions {
        page_size: DEFAULT_PAGE_SIZE,
        num_pages: options.batch * pages_per_sequence,
        eos: None,
        graphs: options.graphs,
        fp8_activations: options.fp8_activations,
        ..EngineOptions::default()
    };
    let mut engine = Engine::new(model, engine_options, None)?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    for _ in 0..options.batch {
        let prompt = std::iter::repeat_with(|| rng.random_range(0..vocab as u32)).filter(|&t| Some(t) != image_token).take(options.prompt_len).collect();
        engine.add(Request { prompt, max_tokens, sampling: Sampling::Greedy })?;
    }
    let timed_step = |engine: &mut Engine| -> Result<Duration> {
        let start = Instant::now();
        let tokens = engine.step()?;
        let elapsed = start.elapsed();
        if tokens.len() != options.batch {
            return Err(Error::InvalidArgument(format!("a step of the benchmark produced {} tokens for {} sequences", tokens.len(), options.batch)));
        }
        Ok(elapsed)
    };
    let prefill = timed_step(&mut engine)?;
    for _ in 0..options.warmup_steps {
        timed_step(&mut engine)?;
    }
    let decode_steps = (0..options.decode_steps).map(|_| timed_step(&mut engine)).collect::<Result<Vec<_>>>()?;
    let captured_graphs = engine.captured_graphs();
    Ok(BenchReport { device: device.device_name(), options, load, prefill, decode_steps, captured_graphs })
}
