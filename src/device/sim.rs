//! The PTX-interpreter backend: runs the exact PTX that build.rs produced on the CPU through `tools/ptxsim`, with
//! its memory checks (out-of-bounds, uninitialised reads, shared-memory races, missing cp.async waits) and counters.
//! Launches are synchronous: a kernel fault is returned by `launch` itself.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Backend, Graph, Kernel, LaunchConfig, LaunchCounters};
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
}

impl SimBackend {
    /// The shared-memory race detector is on unless the environment sets `PTXSIM_RACE_CHECK=0` (it costs ~10-15%
    /// on shared-memory-heavy kernels; every other check stays on).
    pub fn new() -> Self {
        let mut machine = ptxsim::Machine::new();
        machine.race_check = std::env::var("PTXSIM_RACE_CHECK").map_or(true, |v| v != "0");
        SimBackend { machine: Mutex::new(machine), capture: Mutex::new(None), modules: Mutex::new(HashMap::new()), last: Mutex::new(None) }
    }

    /// A host operation is refused while a capture is open: a CUDA graph could not contain it, and a step that needs
    /// one is not replayable.
    fn not_capturing(&self, what: &str) -> Result<()> {
        if self.capture.lock().unwrap().is_some() {
            return Err(Error::InvalidArgument(format!("{what} inside a graph capture: a captured step may only launch kernels")));
        }
        Ok(())
    }

    fn run(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8]) -> Result<()> {
        let module = self.module(kernel)?;
        let (g, b) = (config.grid, config.block);
        let counters = self
            .machine
            .lock()
            .unwrap()
            .launch(&module, kernel.entry, [g.x, g.y, g.z], [b.x, b.y, b.z], config.shared_bytes, params)
            .map_err(sim_error)?;
        *self.last.lock().unwrap() = Some(launch_counters(&counters));
        Ok(())
    }

    fn module(&self, kernel: &Kernel) -> Result<Arc<ptxsim::Module>> {
        let mut cache = self.modules.lock().unwrap();
        if let Some(m) = cache.get(kernel.module.name) {
            return Ok(m.clone());
        }
        let module = Arc::new(
            ptxsim::Module::parse(kernel.module.ptx).map_err(|e| Error::Simulator(format!("parsing module {}: {e}", kernel.module.name)))?,
        );
        cache.insert(kernel.module.name, module.clone());
        Ok(module)
    }
}

/// One launch of a recorded graph: what `Backend::launch` was given.
struct RecordedLaunch {
    kernel: Kernel,
    config: LaunchConfig,
    params: Vec<u8>,
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
fn launch_counters(c: &ptxsim::Counters) -> LaunchCounters {
    LaunchCounters {
        kernel: c.kernel.clone(),
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
        Ok(self.machine.lock().unwrap().alloc(bytes))
    }
    fn free(&self, addr: u64) -> Result<()> {
        self.not_capturing("free")?;
        self.machine.lock().unwrap().free(addr).map_err(sim_error)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.not_capturing("a copy to the device")?;
        self.machine.lock().unwrap().write(addr, data).map_err(sim_error)
    }
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        self.not_capturing("a copy to the host")?;
        self.machine.lock().unwrap().read(addr, out).map_err(sim_error)
    }
    fn memset(&self, addr: u64, byte: u8, bytes: usize) -> Result<()> {
        self.not_capturing("memset")?;
        self.machine.lock().unwrap().memset(addr, byte, bytes).map_err(sim_error)
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.not_capturing("a device copy")?;
        let mut machine = self.machine.lock().unwrap();
        let mut staging = vec![0u8; bytes];
        machine.read(src, &mut staging).map_err(sim_error)?;
        machine.write(dst, &staging).map_err(sim_error)
    }
    fn launch(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8]) -> Result<()> {
        if let Some(recorded) = self.capture.lock().unwrap().as_mut() {
            // Parse now, as the first real launch would: a bad module fails the capture, not a later replay.
            self.module(kernel)?;
            recorded.push(RecordedLaunch { kernel: *kernel, config: *config, params: params.to_vec() });
            return Ok(());
        }
        self.run(kernel, config, params)
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
        let recorded = graph.inner.downcast_ref::<Vec<RecordedLaunch>>().ok_or_else(|| Error::InvalidArgument("replay: a graph recorded by another backend".into()))?;
        for launch in recorded {
            self.run(&launch.kernel, &launch.config, &launch.params)?;
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        self.not_capturing("synchronize")?;
        Ok(())
    }
    fn last_launch_counters(&self) -> Option<LaunchCounters> {
        self.last.lock().unwrap().clone()
    }
}
