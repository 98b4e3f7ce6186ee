//! `small4 calibrate`: the timing model (`ptxsim::timing`, [`crate::device::LaunchCounters::predict`]) against the
//! H200 measurements stored in `data/calibration/h200.tsv`.
//!
//! Every row with a runnable configuration (`run`) is replayed on the PTX interpreter at its measured shape: the same
//! kernels, grids and pipelines as the GPU ran, with the launches' counters recorded and each launch predicted on
//! the H200. A row's prediction is the sum over its call's launches (back-to-back benches include each launch's
//! overhead; `with-sync` rows add one host synchronisation; `ncu` rows are kernel durations, without the launch
//! overhead, of the launches named by `kernel=`).
//!
//! Launches too large to interpret whole are sampled: at most `sample_blocks` blocks of a launch run, evenly spaced
//! over the grid, and the model scales their counts to the grid (`SimBackend::set_block_sample`). The router is never
//! sampled (its last block of a token group does the top-k and alignment, which a sample would miss). To fit the
//! interpreter's memory, MoE weights are one expert's tiles aliased by all 128 experts (expert stride 0; scales
//! replicated) and a 64-sequence MLA batch at 32k context shares one sequence's cache pages: both only in sampled
//! launches, whose DRAM estimate counts each sampled block's own sectors, so the aliasing does not hide traffic. The
//! MoE layer in the engine's form (`form=norm`: the combine and the next norm in the down projection's row finisher,
//! which the last block to write a token's row runs) is replayed whole, on distinct copies of the touched experts'
//! weights (batch 1: 4 experts, and the shared expert with `shared=1`). A dense case taller than 8192 rows (the output
//! head) is sampled, its weights one random part repeated (not aliased). A `window=W` case (the persistent wgmma
//! GEMMs) runs every block of the persistent grid over its first W tiles and scales the window to the walk
//! (`moe_wgmma::with_walk_window`, `TimingProfile::walked`): its DRAM estimate is the window's distinct sectors, so
//! the experts the window reaches (the first ones in walk order) have distinct copies (the first 16 x W experts);
//! the later experts' weights lie past the buffers, which the interpreter's bounds check would report if read.
//!
//! The summary line: `calibration: median abs error P%, worst ratio R, N rows, D/M before-after pairs in the right
//! direction` (abs error = |predicted - measured| / measured; worst ratio = the largest of predicted / measured and
//! its inverse; a pair is in the right direction when the prediction orders its two rows as the GPU did).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use half::bf16;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

use crate::device::sim::SimBackend;
use crate::device::{Device, DeviceBuffer, LaunchCounters, TargetGpu, TimingModel};
use crate::error::{Error, Result};
use crate::kernels::attention::{self, AttentionPlan, AttentionScratch, BlockTables, PagedCache, Queries, QueryLayout, SplitCombine};
use crate::kernels::dense;
use crate::kernels::gemm::{self, DeviceWeights};
use crate::kernels::moe::{self, Grouping, MoeLayerWeights, MoeWorkspace, RoutingBuffers};
use crate::kernels::moe_wgmma::{self, PrefillGemm, WalkWindow};
use crate::kernels::norm::ResidualNorm;
use crate::kernels::router::{self, ExpertMap, RouterConfig};
use crate::kernels::vision::{vision_attention, TokenSegments, VisionAttentionKernel};
use crate::model::kv_cache::{BatchTables, CacheDescriptor, CacheDtype};
use crate::quant::matrix::QuantizedMatrix;
use crate::quant::repack::{self, PackedWeights};
use crate::quant::WeightFormat;

/// The stored H200 measurements (`data/calibration/h200.tsv`), as measured, with their sources.
pub const H200_DATA: &str = include_str!("../data/calibration/h200.tsv");

/// The alternatives behind the decode kernels' tile choices (`data/calibration/decode-choices.tsv`), for
/// [`predict_cases`]: MoE narrow vs small tile, router experts per block, MLA decode split counts.
pub const DECODE_CHOICES: &str = include_str!("../data/calibration/decode-choices.tsv");

/// The GPU script's benches at their current configurations (`data/calibration/bench-cases.tsv`), for
/// [`predict_cases`]: predictions written down before a GPU measures them.
pub const BENCH_CASES: &str = include_str!("../data/calibration/bench-cases.tsv");

/// The prefill kernels of issue 17 on both tensor-core paths (`data/calibration/prefill-cases.tsv`), for
/// [`predict_cases`]: the grouped expert GEMM at 16k routed rows (bf16, int4, nvfp4), the MoE layer at 2048 tokens,
/// the vision attention and the MLA prefill attention, each on mma.sync and on wgmma (`gemm=` / `attention=` pick the
/// kernel).
pub const PREFILL_CASES: &str = include_str!("../data/calibration/prefill-cases.tsv");

/// How a row's figure was timed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Launches back to back, one synchronisation per batch: each launch's overhead is in the figure.
    BackToBack,
    /// One host synchronisation after every call.
    WithSync,
    /// Nsight Compute kernel duration: no launch overhead.
    Ncu,
}

/// One stored measurement.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// Unique name, e.g. `moe-bf16-t1-bm64`.
    pub id: String,
    /// What ran, in words.
    pub what: String,
    /// The H200's figure, microseconds.
    pub measured_us: f64,
    /// How it was timed.
    pub method: Method,
    /// Which code state the figure belongs to (current, before a change, superseded).
    pub code_state: String,
    /// The configuration the interpreter replays (`router tokens=32`, `moe format=bf16 tokens=1 tile=narrow`, ...);
    /// None when the measured code is no longer in the tree.
    pub run: Option<String>,
    /// `(pair name, true for the "after" row)` when the row is one side of a before/after pair.
    pub pair: Option<(String, bool)>,
    /// Command and document the figure comes from.
    pub source: String,
}

/// Parses the TSV (header line `id\twhat\t...`, `#` comments).
///
/// ```
/// use small4::calibrate::{parse_rows, H200_DATA, Method};
///
/// let rows = parse_rows(H200_DATA)?;
/// assert!(rows.len() >= 40);
/// let router = rows.iter().find(|r| r.id == "router-t1").expect("stored");
/// assert_eq!((router.measured_us, router.method), (12.1, Method::BackToBack));
/// assert!(parse_rows("id\twhat\nx\ty\n").is_err()); // a short row is a typed error
/// # Ok::<(), small4::Error>(())
/// ```
pub fn parse_rows(text: &str) -> Result<Vec<Row>> {
    let bad = |line: usize, why: String| Error::InvalidArgument(format!("calibration data line {}: {why}", line + 1));
    let mut rows = Vec::new();
    let mut header_seen = false;
    for (n, line) in text.lines().enumerate() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if !header_seen {
            header_seen = true;
            continue;
        }
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 8 {
            return Err(bad(n, format!("{} fields, expected 8", f.len())));
        }
        let measured_us = f[2].parse::<f64>().map_err(|e| bad(n, format!("measured_us {:?}: {e}", f[2])))?;
        let method = match f[3] {
            "back-to-back" => Method::BackToBack,
            "with-sync" => Method::WithSync,
            "ncu" => Method::Ncu,
            other => return Err(bad(n, format!("unknown method {other:?}"))),
        };
        let pair = match f[6] {
            "" => None,
            p => match p.rsplit_once(':') {
                Some((name, "before")) => Some((name.to_string(), false)),
                Some((name, "after")) => Some((name.to_string(), true)),
                _ => return Err(bad(n, format!("pair {p:?} is not NAME:before or NAME:after"))),
            },
        };
        rows.push(Row {
            id: f[0].to_string(),
            what: f[1].to_string(),
            measured_us,
            method,
            code_state: f[4].to_string(),
            run: (f[5] != "-").then(|| f[5].to_string()),
            pair,
            source: f[7].to_string(),
        });
    }
    if !header_seen {
        return Err(Error::InvalidArgument("calibration data: no header line".into()));
    }
    Ok(rows)
}

/// What `small4 calibrate` runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Most blocks interpreted per launch (sampled launches scale to their grid).
    pub sample_blocks: u64,
    /// Only rows whose id contains one of these (empty: every row).
    pub only: Vec<String>,
    /// Also search the model's free parameters for the best fit and report them.
    pub fit: bool,
    /// Print each launch's model terms under its row.
    pub terms: bool,
    /// Instead of the stored measurements, predict a case list on the H200 and the H100 SXM ([`predict_cases`]):
    /// `decode-choices` ([`DECODE_CHOICES`]), `bench-cases` ([`BENCH_CASES`]) or `prefill-cases` ([`PREFILL_CASES`]).
    pub predict: Option<String>,
    /// A file of recorded launch profiles: read when it exists (no interpreter run for the calls it holds), written
    /// otherwise. For iterating on the model; delete it after changing a kernel.
    pub profiles: Option<std::path::PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options { sample_blocks: 16, only: Vec::new(), fit: false, terms: false, predict: None, profiles: None }
    }
}

/// One row's outcome.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The stored measurement.
    pub row: Row,
    /// Its call's launches on the interpreter (those the row's `kernel=` selects).
    pub launches: Vec<LaunchCounters>,
    /// The prediction, microseconds.
    pub predicted_us: f64,
}

/// The figures of the summary line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Median of |predicted - measured| / measured, percent.
    pub median_abs_error_pct: f64,
    /// Largest max(predicted / measured, measured / predicted).
    pub worst_ratio: f64,
    /// Rows predicted.
    pub rows: usize,
    /// Before/after pairs the prediction orders as the GPU did, and pairs with both rows predicted.
    pub pairs_right: usize,
    /// Pairs with both rows predicted.
    pub pairs: usize,
}

impl std::fmt::Display for Summary {
    /// The exact summary line.
    ///
    /// ```
    /// use small4::calibrate::Summary;
    ///
    /// let s = Summary { median_abs_error_pct: 12.34, worst_ratio: 1.9, rows: 40, pairs_right: 9, pairs: 10 };
    /// assert_eq!(s.to_string(), "calibration: median abs error 12.3%, worst ratio 1.90, 40 rows, 9/10 before-after pairs in the right direction");
    /// ```
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "calibration: median abs error {:.1}%, worst ratio {:.2}, {} rows, {}/{} before-after pairs in the right direction",
            self.median_abs_error_pct, self.worst_ratio, self.rows, self.pairs_right, self.pairs
        )
    }
}

/// Whether a row's launches find their data in L2 of `gpu`: a bench that repeats its call back to back (with or
/// without a host synchronisation) whose DRAM footprint, summed over the call's launches, fits L2. Nsight Compute
/// flushes the caches before each kernel it times (`--cache-control all`, its default): ncu rows are cold.
///
/// ```
/// use small4::calibrate::{l2_resident, parse_rows, H200_DATA};
/// use small4::device::{LaunchCounters, TargetGpu};
///
/// let rows = parse_rows(H200_DATA)?;
/// let row = |id: &str| rows.iter().find(|r| r.id == id).expect("stored");
/// let mut launch = LaunchCounters::default();
/// (launch.timing.blocks, launch.timing.blocks_run, launch.timing.distinct_sectors) = (64, 64, 1 << 15); // 1 MiB
/// assert!(l2_resident(row("router-t1"), std::slice::from_ref(&launch), &TargetGpu::H200));
/// assert!(!l2_resident(row("router-t1-ncu"), std::slice::from_ref(&launch), &TargetGpu::H200)); // ncu flushes L2
/// # Ok::<(), small4::Error>(())
/// ```
pub fn l2_resident(row: &Row, launches: &[LaunchCounters], gpu: &TargetGpu) -> bool {
    let footprint: f64 = launches.iter().map(|l| l.timing.dram_bytes()).sum();
    row.method != Method::Ncu && footprint <= gpu.l2_bytes
}

/// Each launch of a row predicted on `gpu` under `model`, L2-resident when [`l2_resident`] says so.
fn launch_predictions(row: &Row, launches: &[LaunchCounters], model: &TimingModel, gpu: &TargetGpu) -> Vec<crate::device::TimingPrediction> {
    let warm = l2_resident(row, launches, gpu);
    launches
        .iter()
        .map(|l| {
            let mut l = l.clone();
            l.timing.l2_resident = warm;
            l.predict(gpu, model)
        })
        .collect()
}

/// A row's prediction on the H200 under `model` from its launches (L2-resident ones as [`l2_resident`] says).
pub fn predict_row(row: &Row, launches: &[LaunchCounters], model: &TimingModel) -> f64 {
    predict_row_on(row, launches, model, &TargetGpu::H200)
}

/// [`predict_row`] on another GPU.
pub fn predict_row_on(row: &Row, launches: &[LaunchCounters], model: &TimingModel, gpu: &TargetGpu) -> f64 {
    let sum: f64 = launch_predictions(row, launches, model, gpu).iter().map(|p| p.seconds).sum();
    let seconds = match row.method {
        Method::BackToBack => sum,
        Method::WithSync => sum + model.host_sync_s,
        Method::Ncu => sum - model.launch_s * launches.len() as f64,
    };
    seconds * 1e6
}

/// The summary of predictions `(row, predicted_us)`.
pub fn summarize(outcomes: &[(&Row, f64)]) -> Summary {
    let mut errors: Vec<f64> = outcomes.iter().map(|(r, p)| (p - r.measured_us).abs() / r.measured_us * 100.0).collect();
    errors.sort_by(f64::total_cmp);
    let median = match errors.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => errors[n / 2],
        n => (errors[n / 2 - 1] + errors[n / 2]) / 2.0,
    };
    let worst = outcomes.iter().map(|(r, p)| (p / r.measured_us).max(r.measured_us / p)).fold(1.0, f64::max);
    let mut sides: HashMap<&str, [Option<(f64, f64)>; 2]> = HashMap::new();
    for (r, p) in outcomes {
        if let Some((name, after)) = &r.pair {
            sides.entry(name.as_str()).or_default()[*after as usize] = Some((r.measured_us, *p));
        }
    }
    let complete: Vec<_> = sides.values().filter_map(|s| Some((s[0]?, s[1]?))).collect();
    let right = complete.iter().filter(|((mb, pb), (ma, pa))| (ma - mb).signum() == (pa - pb).signum()).count();
    Summary { median_abs_error_pct: median, worst_ratio: worst, rows: outcomes.len(), pairs_right: right, pairs: complete.len() }
}

/// Recorded launch counters by call (`Options::profiles`).
type Profiles = HashMap<String, Vec<LaunchCounters>>;

/// The interpreter the replays and predictions run on (predicting for the H200, whose measurements are stored), and
/// the recorded launch profiles of `options.profiles` when the file exists.
fn interpreter_session(options: &Options) -> Result<(Arc<SimBackend>, Device, Profiles)> {
    let sim = Arc::new(SimBackend::new());
    sim.set_target_gpu(Some(TargetGpu::H200));
    // Each row is one call timed in a loop: whether its data are in L2 is the row's (`l2_resident`), not what the
    // replays before it left there.
    sim.set_l2_residency(false);
    let device: Device = sim.clone();
    let calls = match &options.profiles {
        Some(path) if path.exists() => load_profiles(path)?,
        _ => HashMap::new(),
    };
    Ok((sim, device, calls))
}

/// Runs the calibration: replays the selected rows on the interpreter, prints predicted against measured per row
/// and ends with the summary line (see the module documentation). Returns the outcomes and the summary.
///
/// `Error::InvalidArgument` for a malformed `run` configuration; interpreter faults as `Error::Simulator`.
pub fn run(options: &Options, out: &mut dyn Write) -> Result<(Vec<Outcome>, Summary)> {
    let rows = parse_rows(H200_DATA)?;
    let selected: Vec<&Row> = rows.iter().filter(|r| options.only.is_empty() || options.only.iter().any(|o| r.id.contains(o.as_str()))).collect();
    let (sim, device, mut calls) = interpreter_session(options)?;
    let mut moe_weights: Option<(MoeWeightsKey, MoeLayerWeights)> = None;
    let io = |e: std::io::Error| Error::Io { path: "stdout".into(), source: e };
    writeln!(out, "| row | measured (H200) | predicted | ratio | bound | what |").map_err(io)?;
    writeln!(out, "|---|---|---|---|---|---|").map_err(io)?;
    let mut outcomes = Vec::new();
    for row in selected {
        let Some(run) = &row.run else {
            writeln!(out, "| {} | {} µs | not predicted | | | {} ({}) |", row.id, row.measured_us, row.what, row.code_state).map_err(io)?;
            continue;
        };
        let spec = Spec::parse(run)?;
        let key = spec.call_key();
        if !calls.contains_key(&key) {
            let launches = replay(&sim, &device, &spec, options.sample_blocks, &mut moe_weights)?;
            calls.insert(key.clone(), launches);
        }
        let launches = spec.select(&calls[&key])?;
        let predicted_us = predict_row(row, &launches, &TimingModel::FITTED);
        let predictions = launch_predictions(row, &launches, &TimingModel::FITTED, &TargetGpu::H200);
        let bound = predictions.iter().max_by(|a, b| a.seconds.total_cmp(&b.seconds)).map_or("-", |p| p.bound());
        writeln!(
            out,
            "| {} | {:.1} µs | {:.1} µs | {:.2} | {} | {} |",
            row.id,
            row.measured_us,
            predicted_us,
            predicted_us / row.measured_us,
            bound,
            launch_summary(&launches)
        )
        .map_err(io)?;
        if options.terms {
            write_terms(out, &launches, &predictions)?;
        }
        outcomes.push(Outcome { row: row.clone(), launches, predicted_us });
    }
    if let Some(path) = &options.profiles {
        if !path.exists() {
            save_profiles(path, &calls)?;
        }
    }
    let pairs: Vec<(&Row, f64)> = outcomes.iter().map(|o| (&o.row, o.predicted_us)).collect();
    let summary = summarize(&pairs);
    if options.fit {
        let (model, fitted) = fit(&outcomes);
        writeln!(out, "fit: {model:?}").map_err(io)?;
        writeln!(out, "fit: {fitted}").map_err(io)?;
        for o in &outcomes {
            let ratio = predict_row(&o.row, &o.launches, &model) / o.row.measured_us;
            if !(0.6..=1.0 / 0.6).contains(&ratio) {
                writeln!(out, "fit: {} predicted / measured {ratio:.2}", o.row.id).map_err(io)?;
            }
        }
    }
    writeln!(out, "{summary}").map_err(io)?;
    Ok((outcomes, summary))
}

/// `small4 calibrate`: [`run`], or [`predict_cases`] on the list `options.predict` names (or the case file it is the
/// path of: the columns of [`DECODE_CHOICES`]).
///
/// `Error::InvalidArgument` for an unknown list name that is no file; `Error::Io` for an unreadable file; otherwise
/// as those two.
pub fn run_command(options: &Options, out: &mut dyn Write) -> Result<()> {
    match options.predict.as_deref() {
        None => run(options, out).map(|_| ()),
        Some("decode-choices") => predict_cases(DECODE_CHOICES, options, out).map(|_| ()),
        Some("bench-cases") => predict_cases(BENCH_CASES, options, out).map(|_| ()),
        Some("prefill-cases") => predict_cases(PREFILL_CASES, options, out).map(|_| ()),
        // A case list of one's own (same columns), for trying alternatives without editing the stored lists.
        Some(path) if std::path::Path::new(path).is_file() => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            predict_cases(&text, options, out).map(|_| ())
        }
        Some(other) => Err(Error::InvalidArgument(format!("calibrate --predict {other}: decode-choices, bench-cases, prefill-cases or a case file"))),
    }
}

/// One case of a [`predict_cases`] list.
#[derive(Clone, Debug, PartialEq)]
pub struct Case {
    /// Unique name.
    pub id: String,
    /// The configuration replayed (as a stored row's `run`).
    pub run: String,
    /// How the bench times it (what the prediction includes: launch overheads, a host synchronisation).
    pub method: Method,
    /// What it is, in words.
    pub what: String,
}

/// Parses a case list (header `id\trun\tmethod\twhat`, `#` comments).
///
/// ```
/// use small4::calibrate::{parse_cases, Method, DECODE_CHOICES};
///
/// let cases = parse_cases(DECODE_CHOICES)?;
/// assert!(cases.iter().any(|c| c.run == "moe format=bf16 tokens=1 tile=narrow" && c.method == Method::BackToBack));
/// assert!(parse_cases("id\trun\tmethod\twhat\nx\trouter tokens=1\tstopwatch\ty\n").is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn parse_cases(text: &str) -> Result<Vec<Case>> {
    let bad = |line: usize, why: String| Error::InvalidArgument(format!("case list line {}: {why}", line + 1));
    let mut cases = Vec::new();
    for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.starts_with('#') && !l.trim().is_empty()).skip(1) {
        let f: Vec<&str> = line.split('\t').collect();
        if f.len() != 4 {
            return Err(bad(n, format!("{} fields, expected 4", f.len())));
        }
        let method = match f[2] {
            "back-to-back" => Method::BackToBack,
            "with-sync" => Method::WithSync,
            "ncu" => Method::Ncu,
            other => return Err(bad(n, format!("unknown method {other:?}"))),
        };
        Spec::parse(f[1])?;
        cases.push(Case { id: f[0].to_string(), run: f[1].to_string(), method, what: f[3].to_string() });
    }
    Ok(cases)
}

/// One table line per launch with its model terms (`--terms`).
fn write_terms(out: &mut dyn Write, launches: &[LaunchCounters], predictions: &[crate::device::TimingPrediction]) -> Result<()> {
    let io = |e: std::io::Error| Error::Io { path: "stdout".into(), source: e };
    for (l, p) in launches.iter().zip(predictions) {
        writeln!(
            out,
            "|  | {} | {:.1} µs | bps {} waves {} | dram {:.1} ({:.0} GB/s) l2 {:.1} issue {:.1} tensor {:.1} shared {:.1} chain {:.1} exposed {:.1} µs | chain cycles {} + {} loads (longest block, warp {}), barriers {} |",
            l.kernel,
            p.micros(),
            p.blocks_per_sm,
            p.waves,
            p.dram_s * 1e6,
            p.dram_bytes_per_s / 1e9,
            p.l2_s * 1e6,
            p.issue_s * 1e6,
            p.tensor_s * 1e6,
            p.shared_s * 1e6,
            p.chain_s * 1e6,
            p.exposed_s * 1e6,
            l.timing.chain_cycles_max,
            l.timing.chain_globals_max,
            l.chain_longest_warp,
            l.timing.block_barriers,
        )
        .map_err(io)?;
    }
    Ok(())
}

/// Predicts every case of a list on the interpreter (as [`run`] replays a stored row: same sampling, same L2
/// residency rule) on the H200 and the H100 SXM, printing one table row per case: the two times, the H100 SXM's
/// bounding term, then on the H100 SXM the tensor rate (the launches' counted tensor FLOPs, padding included,
/// scaled to the grid, over the predicted time) and the DRAM rate (the model's DRAM bytes over the predicted time,
/// as a share of the datasheet bandwidth); with `options.terms`, each launch's H100 SXM terms under it. Returns
/// `(case, H200 µs, H100 SXM µs)`.
///
/// `Error::InvalidArgument` for a malformed list or configuration; interpreter faults as `Error::Simulator`.
pub fn predict_cases(text: &str, options: &Options, out: &mut dyn Write) -> Result<Vec<(Case, f64, f64)>> {
    let cases = parse_cases(text)?;
    let (sim, device, mut calls) = interpreter_session(options)?;
    let mut moe_weights: Option<(MoeWeightsKey, MoeLayerWeights)> = None;
    let io = |e: std::io::Error| Error::Io { path: "stdout".into(), source: e };
    writeln!(out, "| case | predicted H200 | predicted H100 SXM | bound (H100 SXM) | what | launches | tensor TFLOP/s (H100 SXM) | DRAM (H100 SXM) |")
        .map_err(io)?;
    writeln!(out, "|---|---|---|---|---|---|---|---|").map_err(io)?;
    let mut results = Vec::new();
    for case in cases.into_iter().filter(|c| options.only.is_empty() || options.only.iter().any(|o| c.id.contains(o.as_str()))) {
        let spec = Spec::parse(&case.run)?;
        let key = spec.call_key();
        if !calls.contains_key(&key) {
            let launches = replay(&sim, &device, &spec, options.sample_blocks, &mut moe_weights)?;
            calls.insert(key.clone(), launches);
        }
        let launches = spec.select(&calls[&key])?;
        let row = Row {
            id: case.id.clone(),
            what: case.what.clone(),
            measured_us: f64::NAN,
            method: case.method,
            code_state: String::new(),
            run: Some(case.run.clone()),
            pair: None,
            source: String::new(),
        };
        let h200 = predict_row_on(&row, &launches, &TimingModel::FITTED, &TargetGpu::H200);
        let h100 = predict_row_on(&row, &launches, &TimingModel::FITTED, &TargetGpu::H100_SXM);
        let h100_launches = launch_predictions(&row, &launches, &TimingModel::FITTED, &TargetGpu::H100_SXM);
        let bound = h100_launches.iter().max_by(|a, b| a.seconds.total_cmp(&b.seconds)).map_or("-", |p| p.bound());
        let rates = rates(&launches, &h100_launches, h100, &TargetGpu::H100_SXM);
        writeln!(out, "| {} | {h200:.1} µs | {h100:.1} µs | {bound} | {} | {} | {rates} |", case.id, case.what, launch_summary(&launches)).map_err(io)?;
        if options.terms {
            write_terms(out, &launches, &h100_launches)?;
        }
        results.push((case, h200, h100));
    }
    if let Some(path) = &options.profiles {
        if !path.exists() {
            save_profiles(path, &calls)?;
        }
    }
    Ok(results)
}

/// The tensor and DRAM rates of a call predicted at `micros` on `gpu`: `TFLOP/s | GB/s (P% of HBM)`. FLOPs are the
/// launches' counted tensor FLOPs scaled to their grids; DRAM bytes the model's (none for L2-resident launches).
fn rates(launches: &[LaunchCounters], predictions: &[crate::device::TimingPrediction], micros: f64, gpu: &TargetGpu) -> String {
    let flops: f64 = launches.iter().map(|l| l.timing.tensor_flops as f64 * l.timing.blocks as f64 / l.timing.blocks_run.max(1) as f64).sum();
    let warm = |p: &crate::device::TimingPrediction| p.dram_s == 0.0;
    // A fold from +0: an empty f64 sum is -0.0, which printed "-0 GB/s" for L2-resident cases.
    let bytes: f64 = launches.iter().zip(predictions).filter(|(_, p)| !warm(p)).map(|(l, _)| l.timing.dram_bytes()).fold(0.0, |a, b| a + b);
    let (tflops, bytes_per_s) = (flops / micros / 1e6, bytes / micros * 1e6);
    format!("{tflops:.0} | {:.0} GB/s ({:.0}% of HBM)", bytes_per_s / 1e9, bytes_per_s / gpu.dram_bytes_per_s * 100.0)
}

/// The fields of a saved launch profile, in order.
fn profile_fields(p: &crate::device::TimingProfile) -> Vec<u64> {
    let mut v = vec![p.blocks, p.blocks_run, p.block_threads as u64, p.registers as u64, p.shared_bytes as u64, p.warp_instructions];
    v.extend_from_slice(&p.by_class);
    v.extend_from_slice(&[
        p.global_sectors,
        p.distinct_sectors,
        p.block_distinct_sectors,
        p.shared_requests,
        p.shared_bank_conflicts,
        p.tensor_flops,
        p.wgmma_flops,
        p.wgmma_8bit_flops,
        p.async_copy_sectors,
        p.block_barriers,
        p.async_waits,
        p.async_groups_left_in_flight,
        p.chain_cycles_max,
        p.chain_globals_max,
        p.chain_cycles_sum,
        p.chain_globals_sum,
    ]);
    v
}

fn save_profiles(path: &std::path::Path, calls: &HashMap<String, Vec<LaunchCounters>>) -> Result<()> {
    let mut text = String::new();
    for (key, launches) in calls {
        for l in launches {
            let nums: Vec<String> = profile_fields(&l.timing).iter().map(u64::to_string).collect();
            text += &format!("{key}\t{}\t{}\t{}\n", l.kernel, l.family, nums.join("\t"));
        }
    }
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

fn load_profiles(path: &std::path::Path) -> Result<HashMap<String, Vec<LaunchCounters>>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let bad = |n: usize| Error::InvalidArgument(format!("{}: line {} is not a saved launch profile", path.display(), n + 1));
    let mut calls: HashMap<String, Vec<LaunchCounters>> = HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split('\t').collect();
        let nums: Vec<u64> = f.get(3..).ok_or_else(|| bad(n))?.iter().map(|x| x.parse().map_err(|_| bad(n))).collect::<Result<_>>()?;
        let classes = crate::device::TimingProfile::default().by_class.len();
        if nums.len() != 6 + classes + 16 {
            return Err(bad(n));
        }
        let c = &nums[6 + classes..];
        let mut by_class = [0u64; ptxsim::ir::Class::ALL.len()];
        by_class.copy_from_slice(&nums[6..6 + classes]);
        let timing = crate::device::TimingProfile {
            blocks: nums[0],
            blocks_run: nums[1],
            block_threads: nums[2] as u32,
            registers: nums[3] as u32,
            shared_bytes: nums[4] as u32,
            warp_instructions: nums[5],
            by_class,
            global_sectors: c[0],
            distinct_sectors: c[1],
            block_distinct_sectors: c[2],
            shared_requests: c[3],
            shared_bank_conflicts: c[4],
            tensor_flops: c[5],
            wgmma_flops: c[6],
            wgmma_8bit_flops: c[7],
            async_copy_sectors: c[8],
            block_barriers: c[9],
            async_waits: c[10],
            async_groups_left_in_flight: c[11],
            chain_cycles_max: c[12],
            chain_globals_max: c[13],
            chain_cycles_sum: c[14],
            chain_globals_sum: c[15],
            l2_resident: false,
            // Not saved: the profiles are of rows' single calls, priced without the cross-launch L2 state, and none of
            // their kernels prefetches.
            l2_hit_sectors: 0,
            prefetch_sectors: 0,
            prefetch_l2_hit_sectors: 0,
            // Not saved either: a row's single call is not a programmatic launch after another (no overlap to price).
            pre_wait_sectors: 0,
            pre_wait_blocks: 0,
            prefetched_load_sectors: 0,
        };
        let launch = LaunchCounters {
            kernel: f[1].to_string(),
            family: f[2].to_string(),
            blocks: timing.blocks,
            blocks_run: timing.blocks_run,
            timing,
            ..LaunchCounters::default()
        };
        calls.entry(f[0].to_string()).or_default().push(launch);
    }
    Ok(calls)
}

/// Launch kernels with their grids and sampled blocks, e.g. `moe_gemm_bf16_narrow 256 (16 run)`.
fn launch_summary(launches: &[LaunchCounters]) -> String {
    launches
        .iter()
        .map(|l| if l.blocks_run < l.blocks { format!("{} {} ({} run)", l.kernel, l.blocks, l.blocks_run) } else { format!("{} {}", l.kernel, l.blocks) })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Searches the free parameters (launch overhead, DRAM latency, mma.sync efficiency, barrier exposure, bytes in
/// flight per SM) on a grid for the least mean |log(predicted / measured)| over the rows plus the worst
/// row's; the measured and datasheet parameters stay fixed.
fn fit(outcomes: &[Outcome]) -> (TimingModel, Summary) {
    let mut best = (f64::INFINITY, TimingModel::FITTED);
    // Mean |log ratio| plus the worst one: the goal bounds both the typical and the worst row.
    let cost = |model: &TimingModel| {
        let logs: Vec<f64> = outcomes.iter().map(|o| (predict_row(&o.row, &o.launches, model) / o.row.measured_us).ln().abs()).collect();
        logs.iter().sum::<f64>() / logs.len().max(1) as f64 + logs.iter().copied().fold(0.0, f64::max)
    };
    // Each parameter over its physically plausible range only (see `ptxsim::timing::Model` for the priors).
    for launch_us in [2.0, 2.5, 3.0, 3.5, 4.0] {
        for latency in [500.0, 600.0, 700.0, 800.0, 1000.0] {
            for mma in [0.5, 0.6, 0.7, 0.8] {
                for barrier in [0.0, 0.1, 0.2, 0.4] {
                    for in_flight_kib in [8.0, 16.0, 32.0, 64.0] {
                        let model = TimingModel {
                            launch_s: launch_us * 1e-6,
                            dram_latency_cycles: latency,
                            mma_sync_efficiency: mma,
                            barrier_exposure: barrier,
                            max_bytes_in_flight_per_sm: in_flight_kib * 1024.0,
                            ..TimingModel::FITTED
                        };
                        let c = cost(&model);
                        if c < best.0 {
                            best = (c, model);
                        }
                    }
                }
            }
        }
    }
    let rows: Vec<(&Row, f64)> = outcomes.iter().map(|o| (&o.row, predict_row(&o.row, &o.launches, &best.1))).collect();
    (best.1, summarize(&rows))
}

/// A parsed `run` configuration.
#[derive(Clone, Debug, PartialEq)]
struct Spec {
    family: String,
    args: Vec<(String, String)>,
}

impl Spec {
    fn parse(run: &str) -> Result<Spec> {
        let mut words = run.split_whitespace();
        let family = words.next().ok_or_else(|| Error::InvalidArgument("calibration run: empty".into()))?.to_string();
        let args = words
            .map(|w| {
                w.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| Error::InvalidArgument(format!("calibration run {run:?}: {w:?} is not key=value")))
            })
            .collect::<Result<_>>()?;
        Ok(Spec { family, args })
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.args.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }

    fn usize(&self, key: &str) -> Result<usize> {
        let v = self.get(key).ok_or_else(|| Error::InvalidArgument(format!("calibration run {}: no {key}=", self.family)))?;
        v.parse().map_err(|e| Error::InvalidArgument(format!("calibration run {}: {key}={v}: {e}", self.family)))
    }

    /// The call the row times (its configuration without the `kernel=` selection).
    fn call_key(&self) -> String {
        let mut key = self.family.clone();
        for (k, v) in self.args.iter().filter(|(k, _)| k != "kernel") {
            key += &format!(" {k}={v}");
        }
        key
    }

    /// The launches the row counts: all, or `kernel=NAME` (every launch of it) / `kernel=NAME#i` (its i-th, from 1).
    fn select(&self, launches: &[LaunchCounters]) -> Result<Vec<LaunchCounters>> {
        let Some(sel) = self.get("kernel") else { return Ok(launches.to_vec()) };
        let (name, index) = match sel.split_once('#') {
            Some((n, i)) => (n, Some(i.parse::<usize>().map_err(|e| Error::InvalidArgument(format!("kernel={sel}: {e}")))?)),
            None => (sel, None),
        };
        let of_kernel: Vec<&LaunchCounters> = launches.iter().filter(|l| l.kernel == name).collect();
        let picked: Vec<LaunchCounters> = match index {
            Some(i) => of_kernel.get(i.wrapping_sub(1)).map(|l| vec![(*l).clone()]).unwrap_or_default(),
            None => of_kernel.into_iter().cloned().collect(),
        };
        if picked.is_empty() {
            let ran: Vec<&str> = launches.iter().map(|l| l.kernel.as_str()).collect();
            return Err(Error::InvalidArgument(format!("calibration run {}: no launch {sel} (the call ran {ran:?})", self.call_key())));
        }
        Ok(picked)
    }
}

/// Runs one configuration on the interpreter and returns its launches.
fn replay(
    sim: &SimBackend,
    device: &Device,
    spec: &Spec,
    sample_blocks: u64,
    moe_weights: &mut Option<(MoeWeightsKey, MoeLayerWeights)>,
) -> Result<Vec<LaunchCounters>> {
    // Never sampled: the launches whose last-arriving blocks do work a sample would miss: the router (its last block
    // of a token group does the top-k and alignment), the dense GEMM (a split-K launch's last block of each tile sums
    // the splits and runs the epilogue; `replay_dense` samples only the output head, which does not split), MLA launches
    // with the split combine fused (the last split block of each row tile combines) and the MoE layer in the engine's
    // form (the last block to write a token's row combines and norms).
    let fused_combine = matches!(spec.family.as_str(), "mla" | "mla_prefill") && mla_combine(spec)? == SplitCombine::Fused && mla_plan(spec)?.1.num_splits > 1;
    let moe_finisher = spec.family == "moe" && MoeForm::of(spec)? == MoeForm::Norm;
    // Nor a walk window (`window=`): every block of the persistent grid runs, over its first tiles. Only the MoE
    // layer's persistent wgmma GEMMs walk (a window elsewhere would only switch the sampling off).
    let walk_window = spec.get("window").is_some();
    if walk_window && !(spec.family == "moe" && spec.get("gemm").is_some_and(|g| g.starts_with("wgmma"))) {
        return Err(Error::InvalidArgument(format!("calibration run {}: window= needs a moe run on a persistent wgmma GEMM (gemm=wgmma...)", spec.family)));
    }
    let sampled = !(matches!(spec.family.as_str(), "router" | "dense") || fused_combine || moe_finisher || walk_window);
    sim.set_block_sample(sampled.then_some(sample_blocks));
    // Every stored measurement ran the mma.sync prefill GEMM (the wgmma one, the default now, came later): mma.sync
    // unless the configuration names one (`gemm=mma_sync|wgmma|wgmma_gather|wgmma_fp8_act`; the last runs the fp8
    // formats' prefill tiles on the fp8 tensor cores, each GEMM launch after its activation quantiser's).
    let gemm = match spec.get("gemm") {
        None | Some("mma_sync") => PrefillGemm::MmaSync,
        Some("wgmma") => PrefillGemm::Wgmma,
        Some("wgmma_gather") => PrefillGemm::WgmmaGather,
        Some("wgmma_fp8_act") => PrefillGemm::WgmmaFp8Act,
        Some(other) => {
            return Err(Error::InvalidArgument(format!("calibration run {}: gemm={other} (mma_sync, wgmma, wgmma_gather or wgmma_fp8_act)", spec.family)))
        }
    };
    let result = gemm.run(|| match spec.family.as_str() {
        "router" => replay_router(sim, device, spec),
        "moe" => replay_moe(sim, device, spec, moe_weights),
        "dense" => replay_dense(sim, device, spec, sample_blocks),
        "mla" | "mla_prefill" => replay_mla(sim, device, spec),
        "vision_attention" => replay_vision(sim, device, spec),
        other => Err(Error::InvalidArgument(format!("calibration run: unknown family {other:?}"))),
    });
    sim.set_block_sample(None);
    sim.record_launches(false);
    gemm::override_decode_tile(None)?;
    router::EXPERTS_PER_BLOCK_OVERRIDE.set(None);
    result
}

fn random_bf16(rng: &mut StdRng, len: usize, scale: f32) -> Vec<bf16> {
    (0..len).map(|_| bf16::from_f32(rng.random_range(-scale..scale))).collect()
}

/// `benches/router.rs`: E = 128, dim 4096, k = 4, tile_m 16.
fn replay_router(sim: &SimBackend, device: &Device, spec: &Spec) -> Result<Vec<LaunchCounters>> {
    const EXPERTS: usize = 128;
    const DIM: usize = 4096;
    let config = RouterConfig { k: 4, routed_scale: 1.0, tile_m: 16 };
    let tokens = spec.usize("tokens")?;
    if spec.get("experts_per_block").is_some() {
        router::EXPERTS_PER_BLOCK_OVERRIDE.set(Some(spec.usize("experts_per_block")?));
    }
    let mut rng = StdRng::seed_from_u64(1);
    let gate = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, EXPERTS * DIM, 0.05))?;
    let map = ExpertMap::identity(device, EXPERTS)?;
    let hidden = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, tokens * DIM, 2.0))?;
    let workspace = router::RouterWorkspace::new(device, tokens, EXPERTS, DIM)?;
    let routing = router::Routing::alloc(device, tokens, config.k, EXPERTS, config.tile_m)?;
    sim.record_launches(true);
    router::route_and_align_into(hidden.view([tokens, DIM])?, gate.view([EXPERTS, DIM])?, &map, &config, &workspace, &routing)?;
    Ok(sim.take_recorded())
}

const MOE_DIM: usize = 4096;
const MOE_HIDDEN: usize = 2048;
const MOE_EXPERTS: usize = 128;
const MOE_TOP_K: usize = 4;

/// One expert's packed weights standing for `experts` experts: scales replicated (the kernels index them by expert),
/// tiles copied `experts` times when `copy_tiles`, else one copy that the caller aliases (expert stride 0; only
/// sampled launches read it, see the module documentation).
fn replicated(p: &PackedWeights, experts: usize, copy_tiles: bool) -> PackedWeights {
    let rep = |v: &Option<Vec<f32>>| v.as_ref().map(|v| v.repeat(experts));
    PackedWeights {
        experts,
        data: if copy_tiles { p.data.repeat(experts) } else { p.data.clone() },
        row_scales: rep(&p.row_scales),
        block_scales: rep(&p.block_scales),
        group_scales: p.group_scales.as_ref().map(|v| v.repeat(experts)),
        group_zeros: p.group_zeros.as_ref().map(|v| v.repeat(experts)),
        fp4_scales: p.fp4_scales.as_ref().map(|v| v.repeat(experts)),
        ..p.clone()
    }
}

/// Which MoE layer weights a `moe` case runs on: `experts` routed experts (one expert's weights replicated), the first
/// `distinct` of them with tiles of their own (0: all alias one copy, expert stride 0; fewer than `experts`: the rest
/// lie past the buffers), and a shared expert packed like them or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct MoeWeightsKey {
    format: WeightFormat,
    experts: usize,
    distinct: usize,
    shared: bool,
}

fn moe_layer_weights(device: &Device, key: MoeWeightsKey) -> Result<MoeLayerWeights> {
    let mut rng = StdRng::seed_from_u64(1);
    let mut matrix = |rows: usize, cols: usize| {
        let a = 1.0 / (cols as f32).sqrt();
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-a..a)).collect();
        QuantizedMatrix::quantize(key.format, &w, rows, cols)
    };
    let (w1, w3, w2) = (matrix(MOE_HIDDEN, MOE_DIM)?, matrix(MOE_HIDDEN, MOE_DIM)?, matrix(MOE_DIM, MOE_HIDDEN)?);
    let gate_up = repack::repack_gate_up(&[((&w1).into(), (&w3).into())])?;
    let down = repack::repack_linear(&[(&w2).into()])?;
    let copies = if key.distinct == 0 { key.experts } else { key.distinct.min(key.experts) };
    let (routed_up, routed_down) = (replicated(&gate_up, copies, key.distinct > 0), replicated(&down, copies, key.distinct > 0));
    let mut weights = MoeLayerWeights::upload(device, &routed_up, &routed_down, key.shared.then_some((&gate_up, &down)))?;
    for w in [&mut weights.gate_up, &mut weights.down] {
        if key.distinct == 0 {
            w.expert_stride = 0;
        }
        w.experts = key.experts;
    }
    Ok(weights)
}

/// How a `moe` case runs its layer (`form=`): `layer` (the default, what the stored measurements timed):
/// `moe::moe_layer`, up, down and the `moe_combine` launch; `norm`: `moe::moe_layer_add_rms_norm`, the engine's
/// decode form on one GPU, the combine + residual add + next RMSNorm in the down projection's row finisher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MoeForm {
    Layer,
    Norm,
}

impl MoeForm {
    fn of(spec: &Spec) -> Result<Self> {
        match spec.get("form") {
            None | Some("layer") => Ok(MoeForm::Layer),
            Some("norm") => Ok(MoeForm::Norm),
            Some(other) => Err(Error::InvalidArgument(format!("calibration moe run: form={other} (layer or norm)"))),
        }
    }
}

/// `benches/moe.rs`: dim 4096, hidden 2048, 128 experts, top-4 of random distinct experts per token; `moe format=
/// tokens= [tile=] [form=layer|norm] [shared=0|1] [window=W]` (`shared=1`: with the shared expert, form norm only, as
/// the bench's `moe_layer_norm_shared`). A `norm` case's row finisher runs in the last block to write a token's row,
/// so it is replayed whole (unsampled): its weights are then distinct copies for the touched experts only (the
/// tokens' expert ids renumbered in order onto them, so the grouping's tiles and grid are the bench's), not 128
/// aliased ones. `window=W` (layer form, wgmma GEMMs): the persistent launches walk W tiles a block, scaled to the
/// walk ([`scale_walk_windows`]); the layer's workspace starts zeroed, since the next launch reads the rows of the
/// tiles past a window.
fn replay_moe(sim: &SimBackend, device: &Device, spec: &Spec, cache: &mut Option<(MoeWeightsKey, MoeLayerWeights)>) -> Result<Vec<LaunchCounters>> {
    let format: WeightFormat = spec.get("format").ok_or_else(|| Error::InvalidArgument("calibration moe run: no format=".into()))?.parse()?;
    let tokens = spec.usize("tokens")?;
    let form = MoeForm::of(spec)?;
    let shared = spec.get("shared").is_some() && spec.usize("shared")? != 0;
    if shared && form != MoeForm::Norm {
        return Err(Error::InvalidArgument("calibration moe run: shared=1 needs form=norm (as the bench)".into()));
    }
    let window = walk_window_tiles(spec)?;
    if window.is_some() && form != MoeForm::Layer {
        return Err(Error::InvalidArgument("calibration moe run: window= needs the layer form (a persistent wgmma launch has no finisher)".into()));
    }
    // The window's weights hold only the experts it reaches: every launch must walk (the prefill tile), since a
    // decode-tile launch reads every expert's.
    if window.is_some() && !moe::grouped_takes_prefill_tile(tokens, MOE_TOP_K, MOE_EXPERTS) {
        return Err(Error::InvalidArgument(format!("calibration moe run: window= needs the prefill tile, which {tokens} tokens do not take")));
    }
    if let Some(tile) = spec.get("tile") {
        gemm::override_decode_tile(Some(tile)).map_err(|e| Error::InvalidArgument(format!("calibration moe run: tile={tile}: {e}")))?;
    }
    let mut rng = StdRng::seed_from_u64(1);
    let mut ids = Vec::with_capacity(tokens * MOE_TOP_K);
    for _ in 0..tokens {
        let mut all: Vec<i32> = (0..MOE_EXPERTS as i32).collect();
        all.shuffle(&mut rng);
        ids.extend_from_slice(&all[..MOE_TOP_K]);
    }
    let experts = match form {
        MoeForm::Layer => MOE_EXPERTS,
        MoeForm::Norm => {
            let mut touched = ids.clone();
            touched.sort_unstable();
            touched.dedup();
            for id in &mut ids {
                *id = touched.binary_search(id).expect("a touched expert") as i32;
            }
            touched.len()
        }
    };
    let distinct = match (form, window) {
        (MoeForm::Norm, _) => experts,
        (MoeForm::Layer, Some(tiles_per_block)) => 16 * tiles_per_block.get() as usize,
        (MoeForm::Layer, None) => 0,
    };
    let key = MoeWeightsKey { format, experts, distinct, shared };
    if cache.as_ref().map(|(k, _)| *k) != Some(key) {
        *cache = None; // free the previous case's weights first
        *cache = Some((key, moe_layer_weights(device, key)?));
    }
    let weights = &cache.as_ref().expect("just filled").1;
    // The aligner's tile for the bench's 128 experts (renumbering keeps the tiles: each touched expert's pairs stay in
    // one group, in the same order).
    let tile_m = moe::moe_tile_m(tokens, MOE_TOP_K, MOE_EXPERTS);
    let identity: Vec<i32> = (0..experts as i32).collect();
    let alignment = crate::reference::moe::align_pairs(&ids, Some(&identity), experts, tile_m);
    let up = |v: &[i32]| DeviceBuffer::from_slice(device, v);
    let (sorted_pairs, tile_experts, expert_offsets) = (up(&alignment.sorted_pairs)?, up(&alignment.tile_experts)?, up(&alignment.expert_offsets)?);
    let num_padded = up(&[alignment.num_padded])?;
    let grouping = Grouping { sorted_pairs: &sorted_pairs, tile_experts: &tile_experts, expert_offsets: &expert_offsets, num_padded: &num_padded, tile_m };
    let topk_ids = up(&ids)?;
    let topk_w = DeviceBuffer::from_slice(device, &vec![0.25f32; tokens * MOE_TOP_K])?;
    let routing = RoutingBuffers { topk_ids: topk_ids.view([tokens, MOE_TOP_K])?, topk_weights: topk_w.view([tokens, MOE_TOP_K])?, expert_map: None, experts };
    let x = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, tokens * MOE_DIM, 1.0))?;
    let mut workspace = MoeWorkspace::new(device, weights, tokens, MOE_TOP_K, alignment.sorted_pairs.len())?;
    let out = DeviceBuffer::<bf16>::alloc(device, tokens * MOE_DIM)?;
    if form == MoeForm::Layer {
        if window.is_some() {
            // The window leaves the rows of the tiles past it unwritten, which the next launch reads: zeros there.
            workspace.act = DeviceBuffer::filled_with_byte(device, workspace.act.len(), 0)?;
            workspace.pair_out = DeviceBuffer::filled_with_byte(device, workspace.pair_out.len(), 0)?;
        }
        let layer = || moe::moe_layer(weights, x.view([tokens, MOE_DIM])?, &routing, &grouping, &workspace, out.view([tokens, MOE_DIM])?);
        sim.record_launches(true);
        let Some(tiles_per_block) = window else {
            layer()?;
            return Ok(sim.take_recorded());
        };
        let (result, windows) = moe_wgmma::with_walk_window(tiles_per_block, layer);
        let mut launches = sim.take_recorded();
        result?;
        scale_walk_windows(&mut launches, &windows, &alignment.expert_offsets)?;
        return Ok(launches);
    }
    let residual = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, tokens * MOE_DIM, 1.0))?;
    let norm_weight = DeviceBuffer::from_slice(device, &vec![bf16::ONE; MOE_DIM])?;
    let residual_out = DeviceBuffer::<bf16>::alloc(device, tokens * MOE_DIM)?;
    let counters = gemm::RowCounters::new(device, tokens)?;
    let norm = ResidualNorm {
        residual: residual.view([tokens, MOE_DIM])?,
        weight: norm_weight.as_vector(),
        residual_out: residual_out.view([tokens, MOE_DIM])?,
        out: out.view([tokens, MOE_DIM])?,
        eps: 1e-5,
    };
    sim.record_launches(true);
    moe::moe_layer_add_rms_norm(weights, x.view([tokens, MOE_DIM])?, &routing, &grouping, &workspace, &norm, &counters)?;
    Ok(sim.take_recorded())
}

/// `window=W` of a run: the persistent wgmma launches walk only their first W tiles a block
/// ([`moe_wgmma::with_walk_window`]), with every block of the grid interpreted; None without it.
fn walk_window_tiles(spec: &Spec) -> Result<Option<std::num::NonZeroU32>> {
    if spec.get("window").is_none() {
        return Ok(None);
    }
    let tiles = spec.usize("window")?;
    let tiles = u32::try_from(tiles).ok().and_then(std::num::NonZeroU32::new);
    tiles.map(Some).ok_or_else(|| Error::InvalidArgument(format!("calibration run {}: window= takes 1 or more tiles a block", spec.family)))
}

/// Scales each windowed launch of `launches` (the persistent wgmma launches, in the order of `windows`) to its whole
/// walk ([`crate::device::TimingProfile::walked`]): the launch's work tiles are its feature tiles x each expert's
/// groups of a tile's slots in the grouping (`expert_offsets`, as the kernels' GroupWalker counts them on the device).
fn scale_walk_windows(launches: &mut [LaunchCounters], windows: &[WalkWindow], expert_offsets: &[i32]) -> Result<()> {
    let mut windowed = launches.iter_mut().filter(|l| windows.iter().any(|w| w.kernel == l.kernel));
    for window in windows {
        let launch = windowed.next().filter(|l| l.kernel == window.kernel);
        let launch = launch.ok_or_else(|| Error::InvalidArgument(format!("walk window: no recorded launch of {} for its window", window.kernel)))?;
        let slots = window.slots_per_tile as i64;
        let groups: i64 = expert_offsets.windows(2).map(|e| (e[1] as i64 - e[0] as i64 + slots - 1) / slots).sum();
        let work_tiles = groups as u64 * window.feature_tiles as u64;
        launch.timing = launch.timing.walked(window.windows_in(work_tiles));
        (launch.blocks, launch.blocks_run) = (launch.timing.blocks, launch.timing.blocks_run);
    }
    Ok(())
}

/// A dense decode GEMM (`dense::linear`: the attention projections): `dense format= rows= k= tokens= [splits=]`, rows
/// = output features, random weights in [-1/sqrt(k), 1/sqrt(k)]; no `splits=`: the upload's k splits
/// (`DeviceWeights::decode_k_splits`).
fn replay_dense(sim: &SimBackend, device: &Device, spec: &Spec, sample_blocks: u64) -> Result<Vec<LaunchCounters>> {
    let format: WeightFormat = spec.get("format").ok_or_else(|| Error::InvalidArgument("calibration dense run: no format=".into()))?.parse()?;
    let (rows, k, tokens) = (spec.usize("rows")?, spec.usize("k")?, spec.usize("tokens")?);
    if let Some(tile) = spec.get("tile") {
        gemm::override_decode_tile(Some(tile))?;
    }
    let mut rng = StdRng::seed_from_u64(1);
    let a = 1.0 / (k as f32).sqrt();
    // A matrix of more than DENSE_PART_ROWS rows (the output head) is one random part of that many rows repeated:
    // only sampled launches read it (it never splits), and each sampled block streams its own rows.
    let part_rows = rows.min(DENSE_PART_ROWS);
    if rows % part_rows != 0 {
        return Err(Error::InvalidArgument(format!("calibration dense run: rows={rows} over {DENSE_PART_ROWS} must be a multiple of it")));
    }
    let w: Vec<f32> = (0..part_rows * k).map(|_| rng.random_range(-a..a)).collect();
    let w = QuantizedMatrix::quantize(format, &w, part_rows, k)?;
    let part = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()])?)?;
    let mut weights = if part_rows == rows { part } else { DeviceWeights::concat_rows(&vec![&part; rows / part_rows])? };
    if spec.get("splits").is_some() {
        weights.set_decode_k_splits(spec.usize("splits")?)?;
    }
    if part_rows < rows {
        if weights.decode_k_splits() > 1 {
            return Err(Error::InvalidArgument(format!("calibration dense run: rows={rows} is sampled, so it cannot split k")));
        }
        sim.set_block_sample(Some(sample_blocks));
    }
    let x = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, tokens * k, 1.0))?;
    let y = DeviceBuffer::<bf16>::alloc(device, tokens * rows)?;
    sim.record_launches(true);
    dense::linear(&weights, x.view([tokens, k])?, y.view([tokens, rows])?)?;
    Ok(sim.take_recorded())
}

/// Rows of a `dense` case's random weights; a taller matrix repeats them ([`replay_dense`]).
const DENSE_PART_ROWS: usize = 8192;

const MLA_HEADS: usize = 32;
const MLA_LATENT: usize = 256;
const MLA_ROPE: usize = 64;
const MLA_PAGE: usize = 64;
/// Above this many cache bytes the sequences of a batch share one sequence's pages (sampled launches only).
const MLA_ALIAS_BYTES: usize = 256 << 20;

/// The split combine of an `mla` or `mla_prefill` case: `combine=launch` (the default: its own launch, as every stored
/// measurement ran it; the fusion came later), `combine=fused` (inside the attention launch), or `combine=auto` (what
/// the code does now: the form `SplitCombine::for_plan` picks for the case's grid).
fn mla_combine(spec: &Spec) -> Result<SplitCombine> {
    match spec.get("combine") {
        Some("launch") | None => Ok(SplitCombine::Launch),
        Some("fused") => Ok(SplitCombine::Fused),
        Some("auto") => {
            let (seqs, plan) = mla_plan(spec)?;
            Ok(SplitCombine::for_plan(&plan, seqs))
        }
        Some(other) => Err(Error::InvalidArgument(format!("calibration mla run: combine={other} (fused, launch or auto)"))),
    }
}

/// The sequences and the plan the wrapper launches for an `mla` case (`batch` sequences of one query token over `ctx`)
/// or an `mla_prefill` case (one sequence of `new` query tokens over `prefix + new`) on its `attention=` kernel.
fn mla_plan(spec: &Spec) -> Result<(usize, AttentionPlan)> {
    let (seqs, rows, kv) = if spec.family == "mla_prefill" {
        let new = spec.usize("new")?;
        (1, new * MLA_HEADS, spec.usize("prefix")? + new)
    } else {
        (spec.usize("batch")?, MLA_HEADS, spec.usize("ctx")?)
    };
    let splits = mla_splits(spec)?;
    let plan =
        if spec.get("attention") == Some("wgmma") { attention::wgmma_plan(seqs, rows, kv, splits)? } else { AttentionPlan::new(seqs, rows, kv, splits)? };
    Ok((seqs, plan))
}

/// An `mla` or `mla_prefill` case's forced split count (`splits=`), or `None` for the split heuristic's.
fn mla_splits(spec: &Spec) -> Result<Option<usize>> {
    spec.get("splits").map(|_| spec.usize("splits")).transpose()
}

/// `benches/attention.rs`: 32 heads, page 64, shuffled page pool; `mla batch= ctx= dtype= [splits=] [combine=]`
/// (decode; no `splits=`: the split heuristic's count; `combine=` as [`mla_combine`] reads it; `attention=wgmma`: the
/// wgmma kernel, which the wrapper never picks at decode) or `mla_prefill new= prefix= [attention=] [splits=]
/// [combine=]` (`attention=mma_sync`, the default: the stored measurement ran it, or `attention=wgmma`; no `splits=`:
/// the kernel's own plan). A fused launch's combine runs in the last split block of each row tile, so only a whole
/// launch counts it: fused split cases are replayed unsampled.
fn replay_mla(sim: &SimBackend, device: &Device, spec: &Spec) -> Result<Vec<LaunchCounters>> {
    let mut rng = StdRng::seed_from_u64(1);
    let (batch, lens, rows, q_start, splits, dtype) = if spec.family == "mla_prefill" {
        let (new, prefix) = (spec.usize("new")?, spec.usize("prefix")?);
        (1, vec![prefix + new], new, vec![0, new as i32], mla_splits(spec)?, CacheDtype::Bf16)
    } else {
        let (batch, ctx) = (spec.usize("batch")?, spec.usize("ctx")?);
        let dtype = match spec.get("dtype") {
            Some("bf16") | None => CacheDtype::Bf16,
            Some("fp8") => CacheDtype::Fp8E4m3 { scale: 0.5 },
            Some(other) => return Err(Error::InvalidArgument(format!("calibration mla run: dtype={other}"))),
        };
        (batch, vec![ctx; batch], batch, (0..=batch as i32).collect(), mla_splits(spec)?, dtype)
    };
    let pages_of = |len: usize| len.div_ceil(MLA_PAGE);
    let max_pages = lens.iter().map(|&l| pages_of(l)).max().unwrap_or(0);
    let probe = CacheDescriptor::mla(1, MLA_PAGE, dtype)?;
    let all_pages: usize = lens.iter().map(|&l| pages_of(l)).sum();
    let alias = all_pages * MLA_PAGE * probe.token_bytes() > MLA_ALIAS_BYTES;
    let pool_pages = if alias { max_pages } else { all_pages };
    let desc = CacheDescriptor::mla(pool_pages, MLA_PAGE, dtype)?;
    let mut pool: Vec<i32> = (0..pool_pages as i32).collect();
    pool.shuffle(&mut rng);
    let mut block_tables = vec![-1; lens.len() * max_pages];
    let mut next = 0usize;
    for (row, &len) in block_tables.chunks_exact_mut(max_pages).zip(&lens) {
        if alias {
            next = 0;
        }
        for e in &mut row[..pages_of(len)] {
            *e = pool[next];
            next += 1;
        }
    }
    let tables = BatchTables { block_tables, seq_lens: lens.iter().map(|&l| l as i32).collect(), max_pages };
    let cache = PagedCache::filled_with_byte(device, desc, 0x3c)?;
    let tables = BlockTables::upload(device, &tables, &desc)?;
    let q_lat = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, rows * MLA_HEADS * MLA_LATENT, 1.0))?;
    let q_rope = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, rows * MLA_HEADS * MLA_ROPE, 1.0))?;
    let o_lat = DeviceBuffer::<bf16>::alloc(device, rows * MLA_HEADS * MLA_LATENT)?;
    let layout = if spec.family == "mla_prefill" { QueryLayout::upload(device, &q_start)? } else { QueryLayout::decode(device, batch)? };
    let queries = Queries { layout: &layout, q_lat: q_lat.view([rows, MLA_HEADS, MLA_LATENT])?, q_rope: q_rope.view([rows * MLA_HEADS, MLA_ROPE])? };
    let combine = mla_combine(spec)?;
    let mut scratch = AttentionScratch::new(device);
    let kernel = match spec.get("attention") {
        None | Some("mma_sync") => attention::MlaPrefillKernel::MmaSync,
        Some("wgmma") => attention::MlaPrefillKernel::Wgmma,
        Some(other) => return Err(Error::InvalidArgument(format!("calibration {} run: attention={other} (mma_sync or wgmma)", spec.family))),
    };
    sim.record_launches(true);
    let call =
        || combine.run(|| attention::mla_attention(&cache, &tables, &queries, o_lat.view([rows, MLA_HEADS, MLA_LATENT])?, 0.088_388_35, splits, &mut scratch));
    // attention=wgmma on a decode case: the wgmma kernel at decode, which the wrapper never picks.
    match kernel {
        attention::MlaPrefillKernel::Wgmma if spec.family == "mla" => attention::decode_on_wgmma(call),
        _ => kernel.run(call),
    }?;
    Ok(sim.take_recorded())
}

/// `benches/vision.rs`: one image of `tokens` patches, 16 heads of 64; `attention=mma_sync` (the default: every
/// stored measurement ran it) or `attention=wgmma`.
fn replay_vision(sim: &SimBackend, device: &Device, spec: &Spec) -> Result<Vec<LaunchCounters>> {
    const HEADS: usize = 16;
    let tokens = spec.usize("tokens")?;
    let kernel = match spec.get("attention") {
        None | Some("mma_sync") => VisionAttentionKernel::MmaSync,
        Some("wgmma") => VisionAttentionKernel::Wgmma,
        Some(other) => return Err(Error::InvalidArgument(format!("calibration vision_attention run: attention={other} (mma_sync or wgmma)"))),
    };
    let mut rng = StdRng::seed_from_u64(1);
    let len = tokens * HEADS * 64;
    let q = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, len, 1.0))?;
    let k = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, len, 1.0))?;
    let v = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, len, 1.0))?;
    let out = DeviceBuffer::<bf16>::alloc(device, len)?;
    let segments = TokenSegments::upload(device, std::slice::from_ref(&(0..tokens)))?;
    sim.record_launches(true);
    kernel.run(|| {
        vision_attention(
            q.view([tokens, HEADS, 64])?,
            k.view([tokens, HEADS, 64])?,
            v.view([tokens, HEADS, 64])?,
            out.view([tokens, HEADS, 64])?,
            &segments,
            0.125,
        )
    })?;
    Ok(sim.take_recorded())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each windowed launch (matched to its window by kernel, in order; others left alone) is scaled to its walk:
    /// work tiles = feature tiles x the experts' groups (here 3 experts of 130, 0 and 64 slots: 1 + 0 + 1 groups of
    /// 192 slots, 3 + 0 + 1 of 64).
    #[test]
    fn walk_windows_scale_their_launches_by_the_groupings_tiles() {
        let launch = |kernel: &str| {
            let timing = crate::device::TimingProfile { blocks: 4, blocks_run: 4, distinct_sectors: 100, block_distinct_sectors: 160, ..Default::default() };
            LaunchCounters { kernel: kernel.into(), blocks: 4, blocks_run: 4, timing, ..LaunchCounters::default() }
        };
        let mut launches = vec![launch("wide"), launch("combine"), launch("narrow")];
        let window = |kernel: &'static str, slots_per_tile: u32| WalkWindow { kernel, blocks: 4, tiles: 4, feature_tiles: 8, slots_per_tile };
        let offsets = [0, 130, 130, 194];
        scale_walk_windows(&mut launches, &[window("wide", 192), window("narrow", 64)], &offsets).unwrap();
        // 2 groups x 8 = 16 tiles: 4 windows of 4; 4 groups x 8 = 32: 8 windows.
        assert_eq!([launches[0].blocks, launches[1].blocks, launches[2].blocks], [16, 4, 32]);
        assert_eq!(launches[0].blocks_run, 4);
        assert_eq!(launches[0].timing.dram_bytes(), 4.0 * 100.0 * 32.0);
        assert_eq!(launches[2].timing.dram_bytes(), 8.0 * 100.0 * 32.0);
        assert_eq!(launches[1].timing, launch("combine").timing);
        let err = scale_walk_windows(&mut [launch("other")], &[window("wide", 192)], &offsets).unwrap_err();
        assert!(err.to_string().contains("no recorded launch of wide"), "{err}");
    }

    /// `window=` is refused before anything runs where no persistent walk would take it: another family, the MoE
    /// layer on the mma.sync GEMMs (it would only switch the sampling off), on the decode tile or in the norm form.
    #[test]
    fn a_walk_window_needs_a_persistent_wgmma_run() {
        let (sim, device, _) = interpreter_session(&Options::default()).unwrap();
        for run in ["mla_prefill new=128 prefix=0 window=1", "moe format=bf16 tokens=4096 gemm=mma_sync window=1", "moe format=bf16 tokens=4096 window=1"] {
            let spec = Spec::parse(run).unwrap();
            let err = replay(&sim, &device, &spec, 16, &mut None).unwrap_err();
            assert!(err.to_string().contains("window= needs a moe run on a persistent wgmma GEMM"), "{run}: {err}");
        }
        // Nor where the layer runs the decode tile (a few tokens) or the row finisher.
        for (run, why) in [
            ("moe format=bf16 tokens=64 gemm=wgmma window=1", "needs the prefill tile"),
            ("moe format=bf16 tokens=1 gemm=wgmma form=norm window=1", "needs the layer form"),
        ] {
            let err = replay(&sim, &device, &Spec::parse(run).unwrap(), 16, &mut None).unwrap_err();
            assert!(err.to_string().contains(why), "{run}: {err}");
        }
    }
}
