//! The PTX-interpreter backend: runs the exact PTX that build.rs produced on the CPU through `tools/ptxsim`, with
//! its memory checks (out-of-bounds, uninitialised reads, shared-memory races, missing cp.async waits) and counters.
//! Launches are synchronous: a kernel fault is returned by `launch` itself. A kernel that waits for prior grids runs
//! as a programmatic launch (`ptxsim::Machine::programmatic`) while programmatic launches are on, so what it
//! touches before its `griddepcontrol.wait` is checked against the launch before it.
//!
//! L2 residency across launches (for the timing model, on while a target GPU is set): the backend keeps one
//! `ptxsim::l2::L2Residency` of the target's L2 capacity and feeds it, in issue order, every launch's distinct loaded,
//! stored and prefetched sectors, so a launch reading what an earlier one wrote or prefetched is predicted with those
//! sectors as L2 hits (`TimingProfile::l2_hit_sectors`). Host copies (`write`, `read`, `memset`, `copy`) touch their
//! bytes too: a GPU's copy engines move data through L2 (on NVIDIA GPUs L2 sits in front of all of DRAM), so an upload
//! leaves its last bytes resident. A host synchronisation changes nothing (a GPU does not flush L2 there), nor does a
//! free. Sampled launches feed what their run blocks touched and count the rest of their grid as unseen lines
//! (`L2Residency::launch`). `SimBackend::set_l2_residency(false)` prices every launch cold, as before.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::tensor_map::{TensorMap, TiledTensorMap};
use super::{Backend, Graph, Kernel, LaunchConfig, LaunchCounters, TargetGpu, TimingModel, TimingPrediction, TimingProfile};
use crate::error::{Error, Result};

/// The PTX interpreter as a [`Backend`]: one simulated device memory, modules parsed on first use, and the counters of
/// the last launch ([`Backend::last_launch_counters`]). Graph capture records launches and replays them in order.
///
/// [`crate::device::simulator`] is the usual way to get one, already shared as a [`super::Device`]:
///
/// ```
/// use std::sync::Arc;
/// use small4::device::sim::SimBackend;
/// use small4::device::{Backend, Device, DeviceBuffer};
///
/// let device: Device = Arc::new(SimBackend::new());
/// assert_eq!((device.name(), device.device_name()), ("sim", "sim".to_string()));
/// assert!(device.last_launch_counters().is_none()); // nothing launched yet
///
/// // Each backend is its own device memory: a buffer of one is unknown to another.
/// let buffer = DeviceBuffer::from_slice(&device, &[1u32, 2, 3])?;
/// let other = SimBackend::default();
/// let mut bytes = [0u8; 12];
/// assert!(other.read(buffer.addr(), &mut bytes).is_err());
/// device.read(buffer.addr(), &mut bytes)?;
/// assert_eq!(bytes[4..8], 2u32.to_ne_bytes());
/// # Ok::<(), small4::Error>(())
/// ```
pub struct SimBackend {
    machine: Mutex<ptxsim::Machine>,
    /// The launches recorded since `begin_capture`, while a capture is open.
    capture: Mutex<Option<Vec<RecordedLaunch>>>,
    /// Parsed modules by `KernelModule::name` (parsing a module happens once per backend).
    modules: Mutex<HashMap<&'static str, Arc<ptxsim::Module>>>,
    last: Mutex<Option<LaunchCounters>>,
    /// The GPU whose time `LaunchCounters::predicted_us` predicts (None: no prediction).
    target: Mutex<Option<TargetGpu>>,
    /// Every launch's counters since `record_launches(true)`, while recording.
    recorded: Mutex<Option<Vec<LaunchCounters>>>,
    /// Kernels that wait for prior grids launch programmatically (`Backend::set_programmatic_launches`).
    programmatic: super::ProgrammaticSwitch,
    /// The cross-launch L2 state (module docs): whether it is kept, and the state (None while off or with no target).
    l2_residency: Mutex<(bool, Option<ptxsim::l2::L2Residency>)>,
    /// The last launch's prediction and its time as a graph node, seconds: what the next launch, if programmatic and
    /// directly after it, overlaps (`ptxsim::timing::pdl_overlap_seconds`).
    previous_node: Mutex<Option<(TimingPrediction, f64)>>,
}

/// Registers per thread assumed for a kernel the ptxas table does not list (a module built outside build.rs, such
/// as a doc example's): a small kernel's typical count, which leaves occupancy limited by threads, not registers.
const UNLISTED_KERNEL_REGISTERS: u32 = 32;

impl SimBackend {
    /// The shared-memory race detector is on unless the environment sets `PTXSIM_RACE_CHECK=0` (it costs ~10-15%
    /// on shared-memory-heavy kernels; every other check stays on). The L2 state across launches is kept unless it
    /// sets `SMALL4_L2_RESIDENCY=0` ([`SimBackend::set_l2_residency`]; e.g. `small4 bench` priced cold, as before).
    pub fn new() -> Self {
        let mut machine = ptxsim::Machine::new();
        machine.race_check = std::env::var("PTXSIM_RACE_CHECK").map_or(true, |v| v != "0");
        let target = match std::env::var("SMALL4_PREDICT_GPU") {
            Ok(name) => TargetGpu::by_name(&name),
            Err(_) => Some(TargetGpu::H100_SXM),
        };
        let l2_residency = std::env::var("SMALL4_L2_RESIDENCY").map_or(true, |v| v != "0");
        SimBackend {
            machine: Mutex::new(machine),
            capture: Mutex::new(None),
            modules: Mutex::new(HashMap::new()),
            last: Mutex::new(None),
            target: Mutex::new(target),
            recorded: Mutex::new(None),
            programmatic: super::ProgrammaticSwitch::new(),
            l2_residency: Mutex::new((l2_residency, target.filter(|_| l2_residency).map(|gpu| ptxsim::l2::L2Residency::new(gpu.l2_bytes)))),
            previous_node: Mutex::new(None),
        }
    }

    /// Sets the GPU whose time each launch's `LaunchCounters::predicted_us` predicts (None: no prediction). The
    /// default is H100 SXM, or the GPU named by the environment's `SMALL4_PREDICT_GPU` (`h100-sxm`, `h100-pcie`,
    /// `h200`; an unknown name turns prediction off).
    ///
    /// ```
    /// use small4::device::sim::SimBackend;
    /// use small4::device::TargetGpu;
    ///
    /// let sim = SimBackend::new();
    /// sim.set_target_gpu(TargetGpu::by_name("h200"));
    /// assert_eq!(sim.target_gpu().map(|g| g.name), Some("h200"));
    /// ```
    pub fn set_target_gpu(&self, gpu: Option<TargetGpu>) {
        *self.target.lock().unwrap() = gpu;
        self.reset_l2_residency();
    }

    /// Keeps (true, the default) or drops (false) the L2 state across launches that the predictions read (module
    /// docs). Either way the state starts empty: a cold L2 of the target GPU's capacity. Off, every launch is priced
    /// as if L2 held nothing when it started (what `small4 calibrate` wants: its rows decide residency per row).
    ///
    /// ```
    /// use small4::device::sim::SimBackend;
    ///
    /// let sim = SimBackend::new();
    /// assert!(sim.l2_residency());
    /// sim.set_l2_residency(false);
    /// assert!(!sim.l2_residency());
    /// ```
    pub fn set_l2_residency(&self, on: bool) {
        self.l2_residency.lock().unwrap().0 = on;
        self.reset_l2_residency();
    }

    /// Whether the L2 state across launches is kept ([`SimBackend::set_l2_residency`]).
    pub fn l2_residency(&self) -> bool {
        self.l2_residency.lock().unwrap().0
    }

    /// An empty L2 of the target's capacity when the model is on and a target is set.
    fn reset_l2_residency(&self) {
        let target = self.target_gpu();
        let mut l2 = self.l2_residency.lock().unwrap();
        l2.1 = if l2.0 { target.map(|gpu| ptxsim::l2::L2Residency::new(gpu.l2_bytes)) } else { None };
    }

    /// A host copy's bytes pass through L2 (module docs).
    fn host_touches(&self, addr: u64, bytes: usize) {
        if let Some(l2) = self.l2_residency.lock().unwrap().1.as_mut() {
            l2.touch_range(addr, bytes as u64);
        }
    }

    /// The GPU predictions are made for.
    pub fn target_gpu(&self) -> Option<TargetGpu> {
        *self.target.lock().unwrap()
    }

    /// Interprets at most `blocks` blocks of each launch, evenly spaced over its grid (None: every block), for timing
    /// estimates of launches too large to interpret whole. Blocks not run write nothing, so outputs are incomplete:
    /// for timing only (memory allocated while sampling comes zeroed, so a later kernel reading what an unsampled
    /// block would have written reads zeros, not uninitialised bytes). Counters cover the
    /// sampled blocks (`LaunchCounters::blocks_run`); the prediction scales them to the grid.
    ///
    /// ```
    /// use small4::device::sim::SimBackend;
    ///
    /// let sim = SimBackend::new();
    /// sim.set_block_sample(Some(16));
    /// sim.set_block_sample(None); // back to whole launches
    /// ```
    pub fn set_block_sample(&self, blocks: Option<u64>) {
        self.machine.lock().unwrap().block_sample = blocks;
    }

    /// Sums tensor-core products with MMA-Sim's truncating Hopper model (true: `ptxsim::TensorArith::HopperTruncated`,
    /// ../shared/HOPPER-ASYNC.md §1.6: 13 fraction bits with fp8 inputs) instead of the exact sum rounded once (false,
    /// the default): tests whose tolerances must hold under either model run both.
    ///
    /// ```
    /// use small4::device::sim::SimBackend;
    ///
    /// let sim = SimBackend::new();
    /// sim.set_hopper_truncated_tensor_arith(true);
    /// sim.set_hopper_truncated_tensor_arith(false); // back to the exact sum rounded once
    /// ```
    pub fn set_hopper_truncated_tensor_arith(&self, on: bool) {
        self.machine.lock().unwrap().tensor_arith = if on { ptxsim::TensorArith::HopperTruncated } else { ptxsim::TensorArith::ExactRoundOnce };
    }

    /// Starts (true) or stops (false) keeping every launch's counters; [`SimBackend::take_recorded`] hands them over.
    /// A bench sums `predicted_us` over them, by `family` or `kernel`.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use small4::device::sim::SimBackend;
    /// use small4::device::{Device, DeviceBuffer};
    /// use small4::kernels::ops;
    /// use half::bf16;
    ///
    /// let sim = Arc::new(SimBackend::new());
    /// let device: Device = sim.clone();
    /// sim.record_launches(true);
    /// let gate_up = DeviceBuffer::from_slice(&device, &[bf16::ONE; 128])?;
    /// let out = DeviceBuffer::<bf16>::alloc(&device, 64)?;
    /// ops::silu_mul(gate_up.view([1, 128])?, out.view([1, 64])?)?;
    /// let launches = sim.take_recorded();
    /// assert_eq!(launches.len(), 1);
    /// assert_eq!((launches[0].family.as_str(), launches[0].kernel.as_str()), ("ops", "silu_mul"));
    /// assert!(launches[0].predicted_us.is_some_and(|us| us > 0.0 && us.is_finite()));
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn record_launches(&self, on: bool) {
        *self.recorded.lock().unwrap() = on.then(Vec::new);
    }

    /// The launches recorded since `record_launches(true)` or the last call (recording goes on).
    pub fn take_recorded(&self) -> Vec<LaunchCounters> {
        self.recorded.lock().unwrap().as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// A host operation is refused while a capture is open: a CUDA graph could not contain it, and a step that needs
    /// one is not replayable.
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capture.lock().unwrap().is_some() {
            return Err(Error::InvalidArgument(format!("{what} inside a graph capture: a captured step may only launch kernels")));
        }
        Ok(())
    }

    /// Runs one launch; a programmatic one through `ptxsim::Machine::programmatic`, whose hazard checks make a
    /// read of the previous kernel's output before `griddepcontrol.wait` (and the like) an error.
    fn run(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8], programmatic: bool) -> Result<()> {
        let module = self.module(kernel)?;
        let (g, b) = (config.grid, config.block);
        let (grid, block) = ([g.x, g.y, g.z], [b.x, b.y, b.z]);
        let mut machine = self.machine.lock().unwrap();
        machine.programmatic = programmatic;
        let counters = machine.launch(&module, kernel.entry, grid, block, config.shared_bytes, params).map_err(sim_error)?;
        drop(machine);
        let mut launch = launch_counters(&counters, kernel.module.name);
        if let Some(l2) = self.l2_residency.lock().unwrap().1.as_mut() {
            let residency = l2.launch(&counters);
            launch.timing.l2_hit_sectors = residency.l2_hit_sectors;
            launch.timing.prefetch_sectors = residency.prefetch_sectors;
            launch.timing.prefetch_l2_hit_sectors = residency.prefetch_l2_hit_sectors;
        }
        let mut previous_node = self.previous_node.lock().unwrap();
        match self.target_gpu() {
            Some(gpu) => {
                let model = TimingModel::FITTED;
                let prediction = launch.predict(&gpu, &model);
                let node_s = prediction.in_graph_seconds(&model, launch.programmatic);
                // Programmatic right after another launch: its blocks run up to their wait while that one runs.
                let overlap_s = match previous_node.as_ref() {
                    Some((previous, previous_s)) if counters.follows_launch => {
                        ptxsim::timing::pdl_overlap_seconds(&gpu, &model, previous, *previous_s, &prediction, node_s)
                    }
                    _ => 0.0,
                };
                launch.predicted_us = Some(prediction.micros());
                launch.predicted_graph_us = Some((node_s - overlap_s) * 1e6);
                launch.predicted_pdl_overlap_us = Some(overlap_s * 1e6);
                launch.predicted_l2_hit_bytes = Some(prediction.l2_hit_bytes);
                launch.predicted_gpu = Some(gpu.name);
                *previous_node = Some((prediction, node_s - overlap_s));
            }
            None => *previous_node = None,
        }
        drop(previous_node);
        if let Some(log) = self.recorded.lock().unwrap().as_mut() {
            log.push(launch.clone());
        }
        *self.last.lock().unwrap() = Some(launch);
        Ok(())
    }

    fn module(&self, kernel: &Kernel) -> Result<Arc<ptxsim::Module>> {
        let mut cache = self.modules.lock().unwrap();
        if let Some(m) = cache.get(kernel.module.name) {
            return Ok(m.clone());
        }
        let module = Arc::new(ptxsim::Module::parse(kernel.module.ptx).map_err(|e| Error::Simulator(format!("parsing module {}: {e}", kernel.module.name)))?);
        cache.insert(kernel.module.name, module.clone());
        Ok(module)
    }
}

/// One launch of a recorded graph: what `Backend::launch` was given, and whether it was programmatic then (a CUDA
/// graph keeps the attribute its launch had at capture).
struct RecordedLaunch {
    kernel: Kernel,
    config: LaunchConfig,
    params: Vec<u8>,
    programmatic: bool,
}

impl Default for SimBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn sim_error(e: ptxsim::SimError) -> Error {
    Error::Simulator(e.to_string())
}

/// The interpreter's counters in the device layer's backend-neutral form.
fn launch_counters(c: &ptxsim::Counters, family: &str) -> LaunchCounters {
    let registers = crate::kernels::KERNEL_RESOURCES.iter().find(|k| k.kernel == c.kernel).map_or(UNLISTED_KERNEL_REGISTERS, |k| k.registers);
    LaunchCounters {
        family: family.to_string(),
        blocks_run: c.blocks_run,
        chain_longest_warp: c.chain_longest_warp,
        timing: TimingProfile::new(c, registers),
        predicted_us: None,
        predicted_gpu: None,
        predicted_graph_us: None,
        predicted_pdl_overlap_us: None,
        predicted_l2_hit_bytes: None,
        kernel: c.kernel.clone(),
        programmatic: c.programmatic,
        blocks: c.blocks,
        instructions: c.warp_instructions,
        instructions_by_class: c.by_class_named().into_iter().map(|(n, v)| (n.to_string(), v)).collect(),
        thread_instructions: c.thread_instructions,
        global_bytes_read: c.global_bytes_read,
        global_bytes_written: c.global_bytes_written,
        global_requests: c.global_requests,
        global_sectors: c.global_sectors,
        distinct_sectors: c.distinct_sectors.len(),
        shared_requests: c.shared_requests,
        shared_bank_conflicts: c.shared_bank_conflicts,
        tensor_core_ops: c.tensor_ops,
        tensor_flops: c.tensor_flops,
    }
}

impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.not_capturing("alloc")?;
        let mut machine = self.machine.lock().unwrap();
        let addr = machine.alloc(bytes);
        if machine.block_sample.is_some() {
            // Blocks not run write nothing: a later kernel reading their outputs would hit uninitialised bytes. While
            // sampling (timing only), memory comes zeroed, i.e. initialised.
            machine.memset(addr, 0, bytes).map_err(sim_error)?;
        }
        Ok(addr)
    }
    fn free(&self, addr: u64) -> Result<()> {
        self.not_capturing("free")?;
        self.machine.lock().unwrap().free(addr).map_err(sim_error)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.not_capturing("a copy to the device")?;
        self.machine.lock().unwrap().write(addr, data).map_err(sim_error)?;
        self.host_touches(addr, data.len());
        Ok(())
    }
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        self.not_capturing("a copy to the host")?;
        self.machine.lock().unwrap().read(addr, out).map_err(sim_error)?;
        self.host_touches(addr, out.len());
        Ok(())
    }
    fn memset(&self, addr: u64, byte: u8, bytes: usize) -> Result<()> {
        self.not_capturing("memset")?;
        self.machine.lock().unwrap().memset(addr, byte, bytes).map_err(sim_error)?;
        self.host_touches(addr, bytes);
        Ok(())
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.not_capturing("a device copy")?;
        let mut machine = self.machine.lock().unwrap();
        let mut staging = vec![0u8; bytes];
        machine.read(src, &mut staging).map_err(sim_error)?;
        machine.write(dst, &staging).map_err(sim_error)?;
        drop(machine);
        self.host_touches(src, bytes);
        self.host_touches(dst, bytes);
        Ok(())
    }
    fn encode_tensor_map_tiled(&self, map: &TiledTensorMap) -> Result<TensorMap> {
        map.encode_for_interpreter()
    }
    fn launch(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8]) -> Result<()> {
        if let Some(recorded) = self.capture.lock().unwrap().as_mut() {
            // Parse now, as the first real launch would: a bad module fails the capture, not a later replay.
            self.module(kernel)?;
            recorded.push(RecordedLaunch { kernel: *kernel, config: *config, params: params.to_vec(), programmatic: self.programmatic.applies_to(kernel) });
            return Ok(());
        }
        self.run(kernel, config, params, self.programmatic.applies_to(kernel))
    }
    fn begin_capture(&self) -> Result<()> {
        let mut capture = self.capture.lock().unwrap();
        if capture.is_some() {
            return Err(Error::InvalidArgument("begin_capture: a capture is already open".into()));
        }
        *capture = Some(Vec::new());
        Ok(())
    }
    fn end_capture(&self) -> Result<Graph> {
        let recorded = self.capture.lock().unwrap().take().ok_or_else(|| Error::InvalidArgument("end_capture without begin_capture".into()))?;
        let launches = recorded.len();
        Ok(Graph::new(Box::new(recorded), launches))
    }
    fn replay(&self, graph: &Graph) -> Result<()> {
        self.not_capturing("a graph replay")?;
        let recorded =
            graph.inner.downcast_ref::<Vec<RecordedLaunch>>().ok_or_else(|| Error::InvalidArgument("replay: a graph recorded by another backend".into()))?;
        for launch in recorded {
            self.run(&launch.kernel, &launch.config, &launch.params, launch.programmatic)?;
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        self.not_capturing("synchronize")?;
        self.machine.lock().unwrap().synchronize();
        Ok(())
    }
    fn set_programmatic_launches(&self, on: bool) {
        self.programmatic.set(on);
    }
    fn programmatic_launches(&self) -> bool {
        self.programmatic.is_on()
    }
    fn last_launch_counters(&self) -> Option<LaunchCounters> {
        self.last.lock().unwrap().clone()
    }
}
