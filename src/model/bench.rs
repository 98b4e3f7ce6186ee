//! End-to-end benchmark of the engine (what `small4 bench` runs): a batch of same-length random prompts prefilled
//! together, then decode steps in which every sequence adds one token, timed step by step on the host.
//!
//! The numbers are wall-clock times of [`Engine::step`], which ends with the step's one synchronisation (the host reads
//! the sampled tokens), so each is the device time of the step plus its launch overhead. They are what a server would
//! see; the per-kernel figures against the GPU's ceilings come from the criterion benches (`cargo bench`).
//!
//! The device is wrapped in [`Instrumented`], which counts the kernel launches (those of a replayed graph included)
//! and the blocking host round trips of the last timed decode step. After the timed steps one more decode step of the
//! batch runs eagerly (through `Engine::forward_logits` on fresh sequences prefilled with the same prompts) with every
//! launch recorded: each launch is attributed to a kernel family, by its name (MLA, routing, sampling) or by the
//! weights it is passed ([`DeviceModel::weight_families`]), else to the norms and small ops; on a GPU each launch of
//! that step is timed with events (`kernel_us_per_decode_step`; absent on the interpreter). The profiling step reads
//! its logits back, which the engine's own decode step does not; its per-family times are the kernels' alone.
//!
//! [`bench_synthetic`] runs the same on a synthetic model generated on the device (`small4 bench --synthetic`): the
//! full-size model without a checkpoint.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, Instant};

use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::device::{Backend, Device, Instrumented, LaunchRecord};
use crate::model::checkpoint::{Checkpoint, ExpertMatrix};
use crate::model::engine::{DeviceModel, Engine, EngineOptions, Request, Sampling, Shard};
use crate::model::kv_cache::DEFAULT_PAGE_SIZE;
use crate::model::synth::SyntheticModel;
use crate::{Error, Result};

/// The kernel families of a decode step, in the order reports list them (the JSON keys of
/// `kernel_us_per_decode_step` and `launches_per_family`).
pub const FAMILIES: [&str; 9] =
    ["attention_projections", "absorption", "mla", "routing", "routed_experts", "shared_expert", "norms_and_small_ops", "head", "sampling"];

/// The shape of a benchmark run. The default: batch 1, 128 prompt tokens, 32 timed decode steps after 2 warm-up
/// ones, graphs, programmatic launches and L2 prefetch on, bf16 activations, seed 0.
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
    /// Launch the kernels that wait for prior grids as programmatic dependent launches
    /// ([`crate::device::Backend::set_programmatic_launches`]; on by default): each may start while the kernel before
    /// it finishes. The run sets the device's switch to this and puts it back after.
    pub programmatic_launches: bool,
    /// Decode steps pull the next DRAM-bound GEMM's weights into L2 during the latency-bound launches before it, and
    /// the dense decode GEMMs their own k range before their wait (`EngineOptions::l2_prefetch`; on by default).
    pub l2_prefetch: bool,
    /// Routed experts in W8A8 (`EngineOptions::fp8_activations`).
    pub fp8_activations: bool,
    /// The step token budget of chunked prefill (`EngineOptions::prefill_chunk`); None: the whole batch's prompts in
    /// one prefill step.
    pub prefill_chunk: Option<usize>,
    /// Seed of the random prompts.
    pub seed: u64,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            batch: 1,
            prompt_len: 128,
            decode_steps: 32,
            warmup_steps: 2,
            graphs: true,
            programmatic_launches: true,
            l2_prefetch: true,
            fp8_activations: false,
            prefill_chunk: None,
            seed: 0,
        }
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
///     backend: "sim".into(),
///     layers: 4,
///     experts: 16,
///     format: "bf16".into(),
///     options: BenchOptions { batch: 4, prompt_len: 100, ..BenchOptions::default() },
///     load: Duration::from_secs(1),
///     prefill: ms(200),
///     decode_steps: vec![ms(30), ms(10), ms(20), ms(40)],
///     captured_graphs: 1,
///     programmatic_launches: true,
///     launches_per_decode_step: 300,
///     host_syncs_per_decode_step: 5,
///     launches_per_family: Default::default(),
///     kernel_us_per_decode_step: None,
///     predicted_us_per_family: None,
///     predicted_graph_us_per_family: None,
///     predicted_l2_hit_mb_per_decode_step: None,
///     predicted_pdl_overlap_us_per_decode_step: None,
/// };
/// assert_eq!(report.prefill_tokens_per_s(), 4.0 * 100.0 / 0.2); // batch * prompt_len / prefill
/// assert_eq!(report.decode_step_mean(), ms(25));
/// assert_eq!(report.decode_step_quantile(0.5), ms(20)); // nearest rank: the 2nd of 4 sorted steps
/// assert_eq!(report.decode_step_quantile(0.0), ms(10)); // the fastest step
/// assert_eq!(report.decode_step_quantile(1.0), ms(40)); // the slowest
/// assert_eq!(report.decode_tokens_per_s(), 4.0 / 0.025); // one token per sequence per step
/// assert!(report.to_string().contains("replays 1 captured graph(s)"));
/// assert_eq!(report.to_json()["decode_ms_per_step"], 25.0);
/// assert!(report.to_json()["kernel_us_per_decode_step"].is_null()); // not timed on the interpreter
/// ```
#[derive(Clone, Debug)]
pub struct BenchReport {
    /// The device's name ([`crate::device::Backend::device_name`]).
    pub device: String,
    /// The backend: "cuda" or "sim" ([`crate::device::Backend::name`]).
    pub backend: String,
    /// Decoder layers of the model.
    pub layers: usize,
    /// Routed experts per layer.
    pub experts: usize,
    /// The experts' weight format ("bf16", "fp8", "fp8-block128", "int4", "nvfp4").
    pub format: String,
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
    /// Kernels that wait for prior grids ran as programmatic dependent launches (the option, where the backend has
    /// them: [`crate::device::Backend::programmatic_launches`]).
    pub programmatic_launches: bool,
    /// Kernel launches of the last timed decode step (a replayed graph's count as its launches).
    pub launches_per_decode_step: u64,
    /// Blocking host round trips of the last timed decode step ([`crate::device::Counts::host_syncs`]).
    pub host_syncs_per_decode_step: u64,
    /// Launches of the eager profiling decode step by family ([`FAMILIES`]).
    pub launches_per_family: BTreeMap<String, u64>,
    /// Device time of the eager profiling decode step by family, microseconds; `None` where the backend cannot time
    /// kernels (the interpreter).
    pub kernel_us_per_decode_step: Option<BTreeMap<String, f64>>,
    /// The interpreter's timing-model prediction of the eager profiling decode step on its target GPU
    /// (`LaunchCounters::predicted_us`, H100 SXM unless `SMALL4_PREDICT_GPU` says otherwise) by family, microseconds;
    /// `None` on hardware.
    pub predicted_us_per_family: Option<BTreeMap<String, f64>>,
    /// The same launches predicted as the nodes of a replayed CUDA graph, by family, microseconds: each launch's host
    /// overhead replaced by a graph node's cost, a programmatic node's where it launched programmatically
    /// (`LaunchCounters::predicted_graph_us`; node costs are the timing model's priors, not fitted). The step adds one
    /// replay ([`BenchReport::predicted_graph_us_per_decode_step`]). `None` on hardware.
    pub predicted_graph_us_per_family: Option<BTreeMap<String, f64>>,
    /// MB (10^6 bytes) the eager profiling step's launches read from L2 instead of DRAM in the timing model: what
    /// earlier launches (and host copies) left in L2 of the sectors each launch touches, by the interpreter's
    /// cross-launch L2 residency (`LaunchCounters::predicted_l2_hit_bytes`). `None` on hardware.
    pub predicted_l2_hit_mb_per_decode_step: Option<f64>,
    /// Microseconds of the graph figures (`predicted_graph_us_per_family`) the step's programmatic launches overlap
    /// with the launch before each, by what their threads load before `griddepcontrol.wait`
    /// (`LaunchCounters::predicted_pdl_overlap_us`; already taken off the graph figures). `None` on hardware.
    pub predicted_pdl_overlap_us_per_decode_step: Option<f64>,
}

impl BenchReport {
    /// The timing model's decode step as a replayed graph, microseconds: the profiled launches as graph nodes plus one
    /// replay's fixed cost (`TimingModel::graph_replay_s`: the graph launch and the sync that reads the tokens). The
    /// profiling step runs no sampling kernel, so the graph's argmax and `decode_advance` nodes are not in it.
    pub fn predicted_graph_us_per_decode_step(&self) -> Option<f64> {
        let replay_us = crate::device::TimingModel::FITTED.graph_replay_s * 1e6;
        self.predicted_graph_us_per_family.as_ref().map(|p| replay_us + p.values().sum::<f64>())
    }
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

    /// The report as the JSON object of `small4 bench --json` (keys fixed by the decode issue: `layers`,
    /// `experts`, `format`, `backend`, `launches_per_decode_step`, `host_syncs_per_decode_step`,
    /// `decode_ms_per_step`, `decode_tokens_per_s`, `prefill_tokens_per_s`, `kernel_us_per_decode_step` (null
    /// when not timed), and more; the timing issue's `predicted_us_per_decode_step` and `predicted_us_per_family`,
    /// their `..._graph` forms, `predicted_l2_hit_mb_per_decode_step` and `predicted_pdl_overlap_us_per_decode_step`,
    /// null on hardware).
    pub fn to_json(&self) -> serde_json::Value {
        let o = &self.options;
        serde_json::json!({
            "layers": self.layers,
            "experts": self.experts,
            "format": self.format,
            "backend": self.backend,
            "device": self.device,
            "batch": o.batch,
            "prompt_len": o.prompt_len,
            "decode_steps": o.decode_steps,
            "graphs": o.graphs,
            "programmatic_launches": self.programmatic_launches,
            "l2_prefetch": o.l2_prefetch,
            "captured_graphs": self.captured_graphs,
            "load_s": self.load.as_secs_f64(),
            "launches_per_decode_step": self.launches_per_decode_step,
            "host_syncs_per_decode_step": self.host_syncs_per_decode_step,
            "decode_ms_per_step": self.decode_step_mean().as_secs_f64() * 1e3,
            "decode_ms_p50": self.decode_step_quantile(0.5).as_secs_f64() * 1e3,
            "decode_tokens_per_s": self.decode_tokens_per_s(),
            "prefill_tokens_per_s": self.prefill_tokens_per_s(),
            "launches_per_family": self.launches_per_family,
            "kernel_us_per_decode_step": self.kernel_us_per_decode_step,
            "predicted_us_per_decode_step": self.predicted_us_per_family.as_ref().map(|p| p.values().sum::<f64>()),
            "predicted_us_per_family": self.predicted_us_per_family,
            "predicted_us_per_decode_step_graph": self.predicted_graph_us_per_decode_step(),
            "predicted_us_per_family_graph": self.predicted_graph_us_per_family,
            "predicted_l2_hit_mb_per_decode_step": self.predicted_l2_hit_mb_per_decode_step,
            "predicted_pdl_overlap_us_per_decode_step": self.predicted_pdl_overlap_us_per_decode_step,
        })
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        writeln!(f, "device: {} ({} backend)", self.device, self.backend)?;
        writeln!(f, "model: {} layers, {} experts, {} experts", self.layers, self.experts, self.format)?;
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
        if !self.programmatic_launches {
            writeln!(f, "programmatic dependent launches: off")?;
        }
        if !o.l2_prefetch {
            writeln!(f, "L2 prefetch of weights (later kernels' and each dense GEMM's own k range): off")?;
        }
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
        )?;
        write!(f, "\nper decode step: {} kernel launches, {} host round trips", self.launches_per_decode_step, self.host_syncs_per_decode_step)?;
        for family in FAMILIES {
            let launches = self.launches_per_family.get(family).copied().unwrap_or(0);
            match self.kernel_us_per_decode_step.as_ref().and_then(|t| t.get(family)) {
                Some(us) => write!(f, "\n  {family:<22} {launches:>5} launches {us:>10.1} us")?,
                None => write!(f, "\n  {family:<22} {launches:>5} launches")?,
            }
        }
        if let Some(times) = &self.kernel_us_per_decode_step {
            write!(
                f,
                "\n  {:<22} {:>5} launches {:>10.1} us (eager profiling step)",
                "total",
                self.launches_per_family.values().sum::<u64>(),
                times.values().sum::<f64>()
            )?;
        }
        if let Some(predicted) = &self.predicted_us_per_family {
            write!(f, "\npredicted by the timing model (eager profiling step): {:.1} us", predicted.values().sum::<f64>())?;
            for family in FAMILIES {
                if let Some(us) = predicted.get(family) {
                    write!(f, "\n  {family:<22} {us:>10.1} us")?;
                }
            }
        }
        if let (Some(graph), Some(step)) = (&self.predicted_graph_us_per_family, self.predicted_graph_us_per_decode_step()) {
            write!(
                f,
                "\npredicted as a replayed graph ({} node costs, one replay; priors, not fitted): {step:.1} us",
                if self.programmatic_launches { "programmatic" } else { "graph" }
            )?;
            for family in FAMILIES {
                if let Some(us) = graph.get(family) {
                    write!(f, "\n  {family:<22} {us:>10.1} us")?;
                }
            }
        }
        if let Some(mb) = self.predicted_l2_hit_mb_per_decode_step {
            write!(f, "\npredicted L2 hits (what earlier launches left in L2, read instead of DRAM): {mb:.3} MB per decode step")?;
        }
        if let Some(us) = self.predicted_pdl_overlap_us_per_decode_step {
            write!(f, "\npredicted overlap of programmatic launches with the launch before (in the graph figures): {us:.1} us per decode step")?;
        }
        Ok(())
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
    check_options(&options)?;
    let counted = Instrumented::wrap(device.clone());
    let on: Device = counted.clone();
    let load_start = Instant::now();
    let model = DeviceModel::load(&on, checkpoint, Shard::SINGLE)?;
    let load = load_start.elapsed();
    let c = model.config();
    let format = checkpoint.expert_matrix(0, 0, ExpertMatrix::W1, c.dim, c.expert_hidden)?.format_name().to_string();
    run(&counted, model, load, format, options)
}

/// [`bench_engine`] on a synthetic model generated on `device` (`DeviceModel::synthetic`, no checkpoint): the
/// load time is the generation's.
///
/// ```
/// use small4::model::bench::{bench_synthetic, BenchOptions, FAMILIES};
/// use small4::model::synth::SyntheticModel;
/// use small4::model::ModelConfig;
/// use small4::quant::WeightFormat;
///
/// let model = SyntheticModel::new(ModelConfig { n_layers: 1, ..ModelConfig::tiny() }, WeightFormat::Nvfp4, 1)?;
/// let options = BenchOptions { batch: 1, prompt_len: 2, decode_steps: 1, warmup_steps: 0, ..BenchOptions::default() };
/// let report = bench_synthetic(&small4::device::simulator(), &model, options)?;
/// assert_eq!((report.layers, report.experts, report.format.as_str(), report.backend.as_str()), (1, 16, "nvfp4", "sim"));
/// assert!(report.launches_per_decode_step > 0 && report.host_syncs_per_decode_step > 0);
/// assert!(report.launches_per_family.keys().all(|k| FAMILIES.contains(&k.as_str())));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn bench_synthetic(device: &Device, model: &SyntheticModel, options: BenchOptions) -> Result<BenchReport> {
    check_options(&options)?;
    let counted = Instrumented::wrap(device.clone());
    let on: Device = counted.clone();
    let load_start = Instant::now();
    let device_model = DeviceModel::synthetic(&on, model)?;
    on.synchronize()?;
    let load = load_start.elapsed();
    run(&counted, device_model, load, model.format.to_string(), options)
}

fn check_options(options: &BenchOptions) -> Result<()> {
    if options.batch == 0 || options.prompt_len == 0 || options.decode_steps == 0 {
        return Err(Error::InvalidArgument(format!(
            "a benchmark needs at least one sequence, one prompt token and one decode step (batch {}, prompt {}, steps {})",
            options.batch, options.prompt_len, options.decode_steps
        )));
    }
    Ok(())
}

/// The family of one recorded launch: by kernel name, else by the weights among its parameters, else small ops.
fn family_of(record: &LaunchRecord, weights: &BTreeMap<u64, &'static str>) -> &'static str {
    let name = record.kernel;
    if name.starts_with("mla_") {
        return "mla";
    }
    if name.starts_with("router") || name == "moe_align" {
        return "routing";
    }
    if name.starts_with("sample") || name.starts_with("argmax") {
        return "sampling";
    }
    // Pointers in a #[repr(C)] parameter struct are 8-byte aligned.
    record.params.chunks_exact(8).find_map(|word| weights.get(&u64::from_le_bytes(word.try_into().unwrap())).copied()).unwrap_or("norms_and_small_ops")
}

/// Sets a device's programmatic-launch switch for a run and puts the previous setting back when dropped (on an error
/// too).
struct ProgrammaticLaunches<'a> {
    device: &'a Instrumented,
    previous: bool,
}

impl<'a> ProgrammaticLaunches<'a> {
    fn set(device: &'a Instrumented, on: bool) -> Self {
        let previous = device.programmatic_launches();
        device.set_programmatic_launches(on);
        ProgrammaticLaunches { device, previous }
    }
}

impl Drop for ProgrammaticLaunches<'_> {
    fn drop(&mut self) {
        self.device.set_programmatic_launches(self.previous);
    }
}

fn run(counted: &Instrumented, model: DeviceModel, load: Duration, format: String, options: BenchOptions) -> Result<BenchReport> {
    let _switch = ProgrammaticLaunches::set(counted, options.programmatic_launches);
    let (vocab, layers, experts) = (model.config().vocab, model.config().n_layers, model.config().experts);
    let model_image_token = model.config().vision.as_ref().map(|v| v.image_token_id);
    let weights: BTreeMap<u64, &'static str> = model.weight_families().into_iter().collect();
    let device = model.device().clone();
    // The prefill samples one token, then warm-up and timed steps one each.
    let max_tokens = 1 + options.warmup_steps + options.decode_steps;
    let pages_per_sequence = (options.prompt_len + max_tokens).div_ceil(DEFAULT_PAGE_SIZE);
    let engine_options = EngineOptions {
        page_size: DEFAULT_PAGE_SIZE,
        // The requests, then the profiling step's sequences (prompt + one token each).
        num_pages: options.batch * (pages_per_sequence + (options.prompt_len + 1).div_ceil(DEFAULT_PAGE_SIZE)),
        eos: None,
        graphs: options.graphs,
        fp8_activations: options.fp8_activations,
        l2_prefetch: options.l2_prefetch,
        prefill_chunk: options.prefill_chunk.unwrap_or(options.batch * options.prompt_len),
        ..EngineOptions::default()
    };
    let mut engine = Engine::new(model, engine_options, None)?;
    let mut rng = StdRng::seed_from_u64(options.seed);
    // Text tokens only: an [IMG] token takes an image (the engine refuses one without).
    let image_token = model_image_token;
    let prompts: Vec<Vec<u32>> = (0..options.batch)
        .map(|_| std::iter::repeat_with(|| rng.random_range(0..vocab as u32)).filter(|&t| Some(t) != image_token).take(options.prompt_len).collect())
        .collect();
    for prompt in &prompts {
        engine.add(Request { prompt: prompt.clone(), max_tokens, sampling: Sampling::Greedy })?;
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
    // The prefill: the steps until every sequence has its first token (one step unless the prompts are chunked).
    let start = Instant::now();
    let mut first_tokens = 0;
    while first_tokens < options.batch {
        let tokens = engine.step()?;
        if tokens.is_empty() && engine.active() == 0 {
            return Err(Error::InvalidArgument("the benchmark's sequences ended during the prefill".into()));
        }
        first_tokens += tokens.len();
    }
    let prefill = start.elapsed();
    for _ in 0..options.warmup_steps {
        timed_step(&mut engine)?;
    }
    let mut decode_steps = Vec::with_capacity(options.decode_steps);
    for _ in 0..options.decode_steps {
        counted.reset();
        decode_steps.push(timed_step(&mut engine)?);
    }
    let step_counts = counted.counts();
    let captured_graphs = engine.captured_graphs();
    let programmatic_launches = device.programmatic_launches();

    // The eager profiling step: fresh sequences with the same prompts, then one token each, every launch recorded.
    let seqs: Vec<_> = prompts.iter().map(|p| (engine.new_sequence(), p.clone())).collect();
    engine.forward_logits(&seqs)?;
    let next: Vec<_> = seqs.iter().map(|(s, p)| (*s, vec![p[0]])).collect();
    device.synchronize()?;
    counted.start_recording(true);
    let profiled = engine.forward_logits(&next);
    let records = counted.take_records();
    profiled?;
    let mut launches_per_family = BTreeMap::new();
    let mut times: BTreeMap<String, f64> = BTreeMap::new();
    let mut predicted: BTreeMap<String, f64> = BTreeMap::new();
    let mut predicted_graph: BTreeMap<String, f64> = BTreeMap::new();
    let mut timed = !records.is_empty();
    let mut all_predicted = !records.is_empty();
    let mut l2_hit_bytes = 0.0;
    let mut pdl_overlap_us = 0.0;
    for record in &records {
        pdl_overlap_us += record.predicted_pdl_overlap_us.unwrap_or(0.0);
        match record.predicted_l2_hit_bytes {
            Some(bytes) => l2_hit_bytes += bytes,
            None => all_predicted = false,
        }
        let family = family_of(record, &weights).to_string();
        *launches_per_family.entry(family.clone()).or_insert(0u64) += 1;
        match (record.predicted_us, record.predicted_graph_us) {
            (Some(us), Some(graph_us)) => {
                *predicted.entry(family.clone()).or_insert(0.0) += us;
                *predicted_graph.entry(family.clone()).or_insert(0.0) += graph_us;
            }
            _ => all_predicted = false,
        }
        match record.micros {
            Some(us) => *times.entry(family).or_insert(0.0) += us,
            None => timed = false,
        }
    }
    Ok(BenchReport {
        device: device.device_name(),
        backend: device.name().to_string(),
        layers,
        experts,
        format,
        options,
        load,
        prefill,
        decode_steps,
        captured_graphs,
        programmatic_launches,
        launches_per_decode_step: step_counts.launches,
        host_syncs_per_decode_step: step_counts.host_syncs,
        launches_per_family,
        kernel_us_per_decode_step: timed.then_some(times),
        predicted_us_per_family: all_predicted.then_some(predicted),
        predicted_graph_us_per_family: all_predicted.then_some(predicted_graph),
        predicted_l2_hit_mb_per_decode_step: all_predicted.then_some(l2_hit_bytes / 1e6),
        predicted_pdl_overlap_us_per_decode_step: all_predicted.then_some(pdl_overlap_us),
    })
}
