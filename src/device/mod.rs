//! The device layer: one `Backend` trait that every kernel wrapper launches through, with two implementations,
//! the CUDA driver (`cuda::CudaBackend`, the real GPU) and the PTX interpreter (`sim::SimBackend`, runs the same
//! compiled PTX on the CPU). Buffers are typed, own their device memory and free it on drop.
//!
//! A tour: a hand-written PTX kernel (adds 1 to `n` floats) launched through the public launch path, the interpreter's
//! counters of that launch, and a recorded graph replayed. The crate's own kernels are launched the same way by the
//! `kernels` wrappers, with their PTX from build.rs.
//!
//! ```
//! use small4::device::{launch_with, simulator, DType, DeviceBuffer, DeviceElement, Dim3, Graph, Kernel, KernelModule,
//!     LaunchConfig, LaunchCounters};
//!
//! const PTX: &str = r#"
//! .version 8.0
//! .target sm_90a
//! .address_size 64
//! .visible .entry add_one(.param .align 8 .b8 add_one_param_0[16])
//! {
//!     .reg .pred %p<2>;
//!     .reg .b32 %r<6>;
//!     .reg .f32 %f<3>;
//!     .reg .b64 %rd<5>;
//!     ld.param.u64 %rd1, [add_one_param_0];
//!     ld.param.u32 %r1, [add_one_param_0+8];
//!     mov.u32 %r2, %ctaid.x;
//!     mov.u32 %r3, %ntid.x;
//!     mov.u32 %r4, %tid.x;
//!     mad.lo.s32 %r5, %r2, %r3, %r4;
//!     setp.ge.u32 %p1, %r5, %r1;
//!     @%p1 bra DONE;
//!     cvta.to.global.u64 %rd2, %rd1;
//!     mul.wide.u32 %rd3, %r5, 4;
//!     add.s64 %rd4, %rd2, %rd3;
//!     ld.global.f32 %f1, [%rd4];
//!     add.f32 %f2, %f1, 0f3F800000;
//!     st.global.f32 [%rd4], %f2;
//! DONE:
//!     ret;
//! }
//! "#;
//! // The interpreter runs the PTX; a GPU would load the cubin first (none here, so this module is interpreter-only).
//! const MODULE: KernelModule = KernelModule { name: "doc_add_one", ptx: PTX, cubin: &[] };
//! const ADD_ONE: Kernel = Kernel { module: MODULE, entry: "add_one" };
//!
//! /// The kernel's by-value parameter struct, laid out as its 16-byte `.param` (explicit padding: every byte is set).
//! #[repr(C)]
//! #[derive(Clone, Copy)]
//! struct Params {
//!     data: *mut f32,
//!     n: u32,
//!     _pad: u32,
//! }
//!
//! let device = simulator();
//! assert_eq!(<f32 as DeviceElement>::DTYPE, DType::F32);
//! let data = DeviceBuffer::from_slice(&device, &[0.5f32; 64])?;
//! assert_eq!((data.len(), data.bytes(), data.is_empty()), (64, 256, false));
//! assert_eq!(data.ptr::<f32>() as u64, data.addr());
//!
//! // 64 threads as 2 blocks of 32 (one warp each).
//! let config = LaunchConfig { grid: Dim3::x(2), block: Dim3::x(32), shared_bytes: 0 };
//! assert_eq!((config.grid.count(), Dim3::xy(4, 8).count(), Dim3::xyz(2, 3, 4).count()), (2, 32, 24));
//! let params = Params { data: data.mut_ptr(), n: 64, _pad: 0 };
//! launch_with(&device, &ADD_ONE, &config, &params)?;
//! assert_eq!(data.to_vec()?, vec![1.5; 64]);
//!
//! // What the interpreter measured: each warp loads and stores 128 contiguous bytes (4 sectors of 32 bytes).
//! let counters: LaunchCounters = device.last_launch_counters().expect("the interpreter counts every launch");
//! assert_eq!((counters.kernel.as_str(), counters.blocks), ("add_one", 2));
//! assert_eq!((counters.global_bytes_read, counters.global_bytes_written), (256, 256));
//! assert_eq!(counters.sector_bytes(), 512); // loads and stores, 2 warps x 2 requests x 4 sectors
//! assert_eq!(counters.traffic_efficiency(512), 1.0); // no sector carried bytes nobody asked for
//! assert_eq!(counters.dram_bytes(), 256); // the 8 distinct sectors, read and written back once
//!
//! // Record the launch once, replay it twice: the same kernel on the same buffer, no host work in between.
//! device.begin_capture()?;
//! launch_with(&device, &ADD_ONE, &config, &params)?;
//! assert!(device.alloc(4).is_err()); // host operations are refused while capturing
//! let graph: Graph = device.end_capture()?;
//! assert_eq!(graph.launches(), 1);
//! assert_eq!(data.to_vec()?, vec![1.5; 64]); // capturing ran nothing
//! device.replay(&graph)?;
//! device.replay(&graph)?;
//! assert_eq!(data.to_vec()?, vec![3.5; 64]);
//!
//! // A launch that would fault on a GPU is a typed error here: 65 threads over 64 floats reads past the buffer.
//! let poisoned = DeviceBuffer::<f32>::filled_with_byte(&device, 64, 0xff)?; // 0xffffffff: NaN
//! assert!(poisoned.to_vec()?.iter().all(|v| v.is_nan()));
//! let past_end = Params { data: poisoned.mut_ptr(), n: 65, _pad: 0 };
//! let wide = LaunchConfig { grid: Dim3::x(3), ..config };
//! assert!(matches!(launch_with(&device, &ADD_ONE, &wide, &past_end), Err(small4::Error::Simulator(_))));
//! # Ok::<(), small4::Error>(())
//! ```
//!
//! Hardware: [`gpu`] is `Error::NoGpu` on a machine without a driver or GPU (never a panic), and [`Ceilings`] are
//! the datasheet figures benchmarks report against.
//!
//! ```
//! use small4::device::{gpu, gpu_or_skip, Backend, Ceilings, Device};
//!
//! match gpu() {
//!     Ok(device) => assert_eq!(device.name(), "cuda"),
//!     Err(small4::Error::NoGpu(why)) => assert!(!why.is_empty()), // this machine: says why, e.g. no libcuda.so
//!     Err(other) => panic!("gpu() fails only with NoGpu, got {other}"),
//! }
//! // A hardware-only tool says it skipped (on stdout) and gets None, rather than failing.
//! let device: Option<Device> = gpu_or_skip("the doc example's benchmark");
//! assert_eq!(device.is_some(), gpu().is_ok());
//!
//! let h100 = Ceilings::h100_sxm();
//! assert_eq!(h100.hbm_bytes_per_s, 3.35e12);
//! let h200 = Ceilings::for_device_name("NVIDIA H200");
//! assert_eq!((h200.hbm_bytes_per_s, h200.dense_bf16_flops), (4.8e12, h100.dense_bf16_flops));
//! assert_eq!(h200.describe(), "4.80 TB/s and 989 bf16 TFLOP/s of the H200");
//! // An unknown device is measured against the H100 SXM, and the label says it was assumed.
//! let other = Ceilings::for_device_name("sim");
//! assert_eq!(other.hbm_bytes_per_s, h100.hbm_bytes_per_s);
//! assert!(other.label.contains("assumed"));
//! ```

pub mod collective;
pub mod cuda;
pub mod sim;
pub mod tensor_map;

use std::marker::PhantomData;
use std::sync::Arc;

use crate::error::{Error, Result};

/// A compiled `cuda/*.cu` file: its PTX (for the interpreter and for JIT on newer drivers) and its sm_90a cubin.
#[derive(Clone, Copy, Debug)]
pub struct KernelModule {
    /// The module's name (the `.cu` file's stem); backends cache loaded modules under it.
    pub name: &'static str,
    /// The PTX text build.rs produced: what the interpreter runs and what a driver JIT-compiles when the cubin does
    /// not load.
    pub ptx: &'static str,
    /// The sm_90a cubin the CUDA backend loads first.
    pub cubin: &'static [u8],
}

/// One `__global__` entry point of a module.
#[derive(Clone, Copy, Debug)]
pub struct Kernel {
    /// The module that defines it.
    pub module: KernelModule,
    /// The entry point's (unmangled, `extern "C"`) name in the module.
    pub entry: &'static str,
}

impl Kernel {
    /// Whether the entry executes `griddepcontrol.wait` (cuda/include/common.cuh `wait_for_prior_grids`): such a
    /// kernel orders its reads of earlier kernels' outputs itself, so it can be launched as a programmatic dependent
    /// launch ([`Backend::set_programmatic_launches`]). Read once per kernel from its module's PTX, then cached.
    ///
    /// ```
    /// use small4::device::{Kernel, KernelModule};
    ///
    /// const PTX: &str = ".visible .entry waits(\n)\n{\n\tgriddepcontrol.wait;\n\tret;\n}\n.visible .entry plain(\n)\n{\n\tret;\n}\n";
    /// let module = KernelModule { name: "doc_pdl", ptx: PTX, cubin: &[] };
    /// assert!(Kernel { module, entry: "waits" }.waits_for_prior_grids());
    /// assert!(!Kernel { module, entry: "plain" }.waits_for_prior_grids());
    /// ```
    pub fn waits_for_prior_grids(&self) -> bool {
        type Cache = std::sync::Mutex<std::collections::HashMap<(usize, &'static str), bool>>;
        static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
        let key = (self.module.ptx.as_ptr() as usize, self.entry);
        let cache = CACHE.get_or_init(Default::default);
        if let Some(&waits) = cache.lock().unwrap().get(&key) {
            return waits;
        }
        let waits = entry_body(self.module.ptx, self.entry).is_some_and(|body| body.contains("griddepcontrol.wait"));
        cache.lock().unwrap().insert(key, waits);
        waits
    }
}

/// The body of `.entry name` in a PTX module: from its parameter list to the `}` that closes it at the line start.
fn entry_body<'a>(ptx: &'a str, name: &str) -> Option<&'a str> {
    let head = format!(".entry {name}(");
    let start = ptx.find(&head)? + head.len();
    let rest = &ptx[start..];
    let end = rest.find("\n}").map_or(rest.len(), |i| i + 2);
    Some(&rest[..end])
}

/// Whether backends launch kernels that wait for prior grids as programmatic dependent launches when created: yes,
/// unless the environment sets `SMALL4_PDL=0`.
pub fn programmatic_launches_by_default() -> bool {
    std::env::var("SMALL4_PDL").map_or(true, |v| v != "0")
}

/// A backend's programmatic-launch switch ([`Backend::set_programmatic_launches`]), one for the CUDA backend and
/// the interpreter: starts at [`programmatic_launches_by_default`].
pub(crate) struct ProgrammaticSwitch(std::sync::atomic::AtomicBool);

impl ProgrammaticSwitch {
    pub(crate) fn new() -> Self {
        ProgrammaticSwitch(std::sync::atomic::AtomicBool::new(programmatic_launches_by_default()))
    }
    pub(crate) fn set(&self, on: bool) {
        self.0.store(on, std::sync::atomic::Ordering::Relaxed)
    }
    pub(crate) fn is_on(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
    /// Whether `kernel` launches programmatically now: the switch is on and it waits for prior grids.
    pub(crate) fn applies_to(&self, kernel: &Kernel) -> bool {
        self.is_on() && kernel.waits_for_prior_grids()
    }
}

/// A grid size in blocks or a block size in threads, as CUDA's `dim3`; unused dimensions are 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3 {
    /// Extent along x (`blockIdx.x` / `threadIdx.x`).
    pub x: u32,
    /// Extent along y.
    pub y: u32,
    /// Extent along z.
    pub z: u32,
}

impl Dim3 {
    /// One-dimensional: `(x, 1, 1)`.
    pub const fn x(x: u32) -> Self {
        Dim3 { x, y: 1, z: 1 }
    }
    /// Two-dimensional: `(x, y, 1)`.
    pub const fn xy(x: u32, y: u32) -> Self {
        Dim3 { x, y, z: 1 }
    }
    /// Three-dimensional: `(x, y, z)`.
    pub const fn xyz(x: u32, y: u32, z: u32) -> Self {
        Dim3 { x, y, z }
    }
    /// The total count, `x * y * z` (blocks of a grid or threads of a block), without overflow.
    pub fn count(&self) -> u64 {
        self.x as u64 * self.y as u64 * self.z as u64
    }
}

/// The launch geometry of one kernel launch.
#[derive(Clone, Copy, Debug)]
pub struct LaunchConfig {
    /// Blocks in the grid.
    pub grid: Dim3,
    /// Threads per block.
    pub block: Dim3,
    /// Dynamic shared memory in bytes (`extern __shared__`).
    pub shared_bytes: u32,
}

/// What the interpreter measured during one launch (a real GPU reports none).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LaunchCounters {
    /// The kernel's entry name.
    pub kernel: String,
    /// Blocks the launch ran (the grid's count).
    pub blocks: u64,
    /// Warp-level instructions issued, in total and by class.
    pub instructions: u64,
    /// `instructions` split by the interpreter's instruction classes (name, count).
    pub instructions_by_class: Vec<(String, u64)>,
    /// Instructions counted once per active thread.
    pub thread_instructions: u64,
    /// Bytes the lanes' global loads asked for (not what the bus moved: see `global_sectors`).
    pub global_bytes_read: u64,
    /// Bytes the lanes' global stores wrote.
    pub global_bytes_written: u64,
    /// Warp-wide global memory requests and the 32-byte sectors they touched.
    pub global_requests: u64,
    /// The distinct 32-byte sectors each global request touched, summed over requests (L2 traffic).
    pub global_sectors: u64,
    /// The distinct 32-byte sectors of the launch: its DRAM traffic when L2 keeps what it touched (re-reads of data
    /// already touched hit L2; `global_sectors` counts them again, as L2 traffic).
    pub distinct_sectors: u64,
    /// Warp-wide shared-memory requests, and the extra wavefronts bank conflicts cost them.
    pub shared_requests: u64,
    /// Extra shared-memory wavefronts bank conflicts cost (0 = conflict-free).
    pub shared_bank_conflicts: u64,
    /// mma.sync instructions (per warp) and their floating-point operations.
    pub tensor_core_ops: u64,
    /// Floating-point operations of those mma.sync instructions (`2 * m * n * k` each).
    pub tensor_flops: u64,
    /// The kernel family: the module's name (the `cuda/*.cu` file stem, e.g. `"moe_gemm"`).
    pub family: String,
    /// The warp (index in its block) with the longest dependence chain of the launch's longest block (sim only; 0
    /// elsewhere): in a warp-specialised kernel, the role that bounds its critical path.
    pub chain_longest_warp: u32,
    /// Blocks actually interpreted: `blocks` unless the backend samples blocks (`SimBackend::set_block_sample`), in
    /// which case every other count covers only these.
    pub blocks_run: u64,
    /// What the timing model reads of this launch ([`TimingProfile`]: counts, launch shape, ptxas registers).
    pub timing: TimingProfile,
    /// The launch was programmatic (a kernel that waits for prior grids, with programmatic launches on): on a GPU it
    /// may start while the launch before it finishes.
    pub programmatic: bool,
    /// Predicted time of this launch on the backend's target GPU, in microseconds, with that GPU's name
    /// (`SimBackend::set_target_gpu`; default H100 SXM). See [`LaunchCounters::predict`] for another GPU.
    pub predicted_us: Option<f64>,
    /// The GPU `predicted_us` is for.
    pub predicted_gpu: Option<&'static str>,
    /// The same prediction for the launch as a node of a replayed CUDA graph, microseconds: the host launch overhead
    /// replaced by a graph node's cost, a programmatic node's when `programmatic` (`TimingPrediction::in_graph_seconds`;
    /// the node costs are priors, not fitted), less `predicted_pdl_overlap_us`.
    pub predicted_graph_us: Option<f64>,
    /// Of the graph node's time, microseconds, what a programmatic launch right after another overlaps with it: the
    /// loads its threads issue before their `griddepcontrol.wait` (`ptxsim::timing::pdl_overlap_seconds`; 0 when
    /// not programmatic or after a host operation).
    pub predicted_pdl_overlap_us: Option<f64>,
    /// Bytes the prediction reads from L2 instead of DRAM: what earlier launches and host copies left in L2 of the
    /// sectors this launch touches (`TimingPrediction::l2_hit_bytes`; the interpreter's cross-launch residency,
    /// `SimBackend::set_l2_residency`).
    pub predicted_l2_hit_bytes: Option<f64>,
}

/// A GPU the timing model knows (H100 SXM, H100 PCIe, H200), re-exported from `ptxsim::timing::Gpu`.
pub use ptxsim::timing::Gpu as TargetGpu;
/// The timing model's fitted parameters (`ptxsim::timing::Model`; `TimingModel::FITTED` is the calibrated set).
pub use ptxsim::timing::Model as TimingModel;
/// A predicted launch time and its terms (`ptxsim::timing::Prediction`).
pub use ptxsim::timing::Prediction as TimingPrediction;
/// The timing model's inputs for one launch (re-exported from the interpreter: `ptxsim::timing::Profile`).
pub use ptxsim::timing::Profile as TimingProfile;

impl LaunchCounters {
    /// Bytes that crossed the memory bus, counted in 32-byte sectors as DRAM/L2 sees them.
    pub fn sector_bytes(&self) -> u64 {
        self.global_sectors * 32
    }
    /// ideal bytes / bytes moved (1.0 = every sector fetched carried only needed data).
    pub fn traffic_efficiency(&self, ideal_bytes: u64) -> f64 {
        ideal_bytes as f64 / self.sector_bytes().max(1) as f64
    }
    /// Bytes DRAM moves when L2 keeps every sector the launch touched once (each distinct sector once).
    pub fn dram_bytes(&self) -> u64 {
        self.distinct_sectors * 32
    }
    /// The timing model's prediction of this launch on `gpu` with `model` (the analytical model of
    /// `ptxsim::timing`, calibrated by `small4 calibrate`).
    ///
    /// ```
    /// use small4::device::{LaunchCounters, TargetGpu, TimingModel};
    ///
    /// let mut counters = LaunchCounters::default();
    /// (counters.timing.blocks, counters.timing.blocks_run, counters.timing.block_threads) = (1, 1, 32);
    /// let p = counters.predict(&TargetGpu::H100_SXM, &TimingModel::FITTED);
    /// assert!(p.micros() >= TimingModel::FITTED.launch_s * 1e6); // an empty launch costs its overhead
    /// ```
    pub fn predict(&self, gpu: &TargetGpu, model: &TimingModel) -> TimingPrediction {
        ptxsim::timing::predict(&self.timing, gpu, model)
    }
}

impl std::fmt::Display for LaunchCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} blocks, {} warp instructions (", self.kernel, self.blocks, self.instructions)?;
        for (i, (class, n)) in self.instructions_by_class.iter().enumerate() {
            write!(f, "{}{class} {n}", if i > 0 { ", " } else { "" })?;
        }
        write!(
            f,
            "); global {} B read + {} B written in {} requests / {} sectors ({:.2} sectors per request, {} distinct); shared {} requests, {} bank-conflict wavefronts; {} mma ({} flops)",
            self.global_bytes_read,
            self.global_bytes_written,
            self.global_requests,
            self.global_sectors,
            self.global_sectors as f64 / self.global_requests.max(1) as f64,
            self.distinct_sectors,
            self.shared_requests,
            self.shared_bank_conflicts,
            self.tensor_core_ops,
            self.tensor_flops
        )?;
        if self.blocks_run < self.blocks {
            write!(f, "; {} of {} blocks interpreted (sampled)", self.blocks_run, self.blocks)?;
        }
        if let (Some(us), Some(gpu)) = (self.predicted_us, self.predicted_gpu) {
            write!(f, "; predicted {us:.1} us on {gpu}")?;
        }
        match self.predicted_l2_hit_bytes {
            Some(bytes) if bytes > 0.0 => write!(f, " ({:.1} KB of it from L2 left by earlier work)", bytes / 1e3),
            _ => Ok(()),
        }
    }
}

/// A device: memory, kernel launches, synchronisation. Object safe; used as `Device = Arc<dyn Backend>`.
///
/// Addresses are plain `u64` device addresses (what a kernel's pointer holds). Memory returned by `alloc` is
/// uninitialised: the interpreter reports any kernel read of it before a write.
///
/// ```
/// let device = small4::device::simulator(); // or small4::device::gpu()?
/// let addr = device.alloc(8)?;
/// let mut back = [0u8; 8];
/// device.write(addr, b"small4!!")?;
/// device.read(addr, &mut back)?;
/// assert_eq!(&back, b"small4!!");
/// device.free(addr)?;
/// assert!(device.free(addr).is_err()); // a double free is an error, not UB
/// # Ok::<(), small4::Error>(())
/// ```
pub trait Backend: Send + Sync {
    /// "cuda" or "sim".
    fn name(&self) -> &'static str;
    /// Allocates `bytes` of uninitialised device memory and returns its address. Refused inside a graph capture.
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// Frees memory from `alloc`. Freeing an address twice or one not from `alloc` is an error, not UB.
    fn free(&self, addr: u64) -> Result<()>;
    /// Copies `data` from the host to device memory at `addr`, after all launched work has finished.
    fn write(&self, addr: u64, data: &[u8]) -> Result<()>;
    /// Copies `out.len()` bytes of device memory at `addr` to the host, after all launched work has finished.
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<()>;
    /// Sets `bytes` bytes of device memory at `addr` to `byte`.
    fn memset(&self, addr: u64, byte: u8, bytes: usize) -> Result<()>;
    /// Copies `bytes` bytes of device memory from `src` to `dst` (the ranges must not overlap), on the device.
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// Launches `kernel` with its single by-value parameter struct given as raw bytes.
    fn launch(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8]) -> Result<()>;
    /// Waits for all launched work. Errors raised asynchronously by kernels surface here.
    fn synchronize(&self) -> Result<()>;
    /// Encodes a tiled tensor map for TMA tile loads: `cuTensorMapEncodeTiled` on the driver, the interpreter's own
    /// encoding on the interpreter (see [`tensor_map`]). What the driver refuses is `Error::InvalidArgument` on both.
    /// A host-side computation: allowed inside a graph capture (the map is a launch parameter, captured by value).
    fn encode_tensor_map_tiled(&self, map: &tensor_map::TiledTensorMap) -> Result<tensor_map::TensorMap>;
    /// Starts recording: until [`Backend::end_capture`], `launch` records the launch into a graph instead of running
    /// it, and every host operation (alloc, free, read, write, memset, synchronize) is an error, so a captured step
    /// provably reads only fixed device buffers.
    /// A backend without graphs keeps this default, and callers run their steps eagerly.
    fn begin_capture(&self) -> Result<()> {
        Err(Error::InvalidArgument(format!("the {} backend cannot capture graphs", self.name())))
    }
    /// Ends the recording begun by `begin_capture` and returns it, ready to replay.
    fn end_capture(&self) -> Result<Graph> {
        Err(Error::InvalidArgument(format!("the {} backend cannot capture graphs", self.name())))
    }
    /// Runs a recorded graph again: the same kernels, grids and parameters (so the same buffers), in order.
    fn replay(&self, _graph: &Graph) -> Result<()> {
        Err(Error::InvalidArgument(format!("the {} backend cannot replay graphs", self.name())))
    }
    /// What the device is, for reports: the GPU's marketing name on hardware ("NVIDIA H200"), else the backend's name.
    fn device_name(&self) -> String {
        self.name().to_string()
    }
    /// The interpreter's counters of the most recent launch; `None` on hardware.
    fn last_launch_counters(&self) -> Option<LaunchCounters> {
        None
    }
    /// Whether kernels that execute `griddepcontrol.wait` ([`Kernel::waits_for_prior_grids`]) are launched as
    /// programmatic dependent launches: each may start while the kernel before it finishes (CUDA's programmatic
    /// stream serialization attribute; a captured graph keeps it), running its prologue (weight loads) until its
    /// wait. On by default unless the environment sets `SMALL4_PDL=0`; a backend without it keeps these defaults
    /// (never programmatic). The interpreter checks what such a kernel touches before its wait.
    fn set_programmatic_launches(&self, _on: bool) {}
    /// See [`Backend::set_programmatic_launches`].
    fn programmatic_launches(&self) -> bool {
        false
    }
    /// Launches like [`Backend::launch`], waits for the kernel and returns its device time in microseconds, measured
    /// with events recorded around it on the stream; `None` (after an ordinary launch) where the backend cannot time
    /// kernels (the interpreter). For profiling eager steps only: it synchronises, so it is refused inside a capture.
    fn launch_timed(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8]) -> Result<Option<f64>> {
        self.launch(kernel, config, params)?;
        Ok(None)
    }
}

/// A shared handle on a backend: what kernel wrappers, buffers and the engine hold.
pub type Device = Arc<dyn Backend>;

/// What an [`Instrumented`] device counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Kernel launches, those a replayed graph runs included ([`Graph::launches`] each replay).
    pub launches: u64,
    /// Blocking host round trips: each host-to-device write, memset and `synchronize`, and each device-to-host read
    /// that waits (a read right after a synchronize or another read, with no launch between, waits for nothing new
    /// and is part of the same round trip: `DeviceBuffer::to_vec` is one).
    pub host_syncs: u64,
    /// Tensor maps encoded ([`Backend::encode_tensor_map_tiled`] calls; the wgmma launches reuse theirs, so a repeated
    /// launch adds none).
    pub tensor_maps_encoded: u64,
}

/// One launch an [`Instrumented`] device recorded.
#[derive(Clone, Debug)]
pub struct LaunchRecord {
    /// The kernel's entry name.
    pub kernel: &'static str,
    /// The parameter struct's bytes as launched (pointers in it are device addresses).
    pub params: Vec<u8>,
    /// Its device time in microseconds when recorded with timing on a backend that times kernels.
    pub micros: Option<f64>,
    /// The interpreter's predicted device time in microseconds on its target GPU (`LaunchCounters::predicted_us`);
    /// `None` on hardware.
    pub predicted_us: Option<f64>,
    /// Its prediction as a node of a replayed graph (`LaunchCounters::predicted_graph_us`); `None` on hardware.
    pub predicted_graph_us: Option<f64>,
    /// What of that node overlaps the launch before under programmatic launch
    /// (`LaunchCounters::predicted_pdl_overlap_us`); `None` on hardware.
    pub predicted_pdl_overlap_us: Option<f64>,
    /// Bytes its prediction reads from L2 instead of DRAM (`LaunchCounters::predicted_l2_hit_bytes`); `None` on
    /// hardware.
    pub predicted_l2_hit_bytes: Option<f64>,
}

#[derive(Default)]
struct InstrumentState {
    counts: Counts,
    /// The host has waited for every launch so far (no launch since the last synchronising call).
    waited: bool,
    /// Some while recording: the launches, and whether to time them.
    records: Option<(Vec<LaunchRecord>, bool)>,
}

/// A device that counts what runs on it (kernel launches and host round trips) and can record or time each launch,
/// wrapping any backend: what `small4 bench` reports per decode step.
///
/// ```
/// use small4::device::{simulator, Counts, Device, DeviceBuffer, Instrumented};
///
/// let counted = Instrumented::wrap(simulator());
/// let device: Device = counted.clone();
/// let buffer = DeviceBuffer::from_slice(&device, &[1.0f32, 2.0])?; // one write
/// assert_eq!(buffer.to_vec()?, [1.0, 2.0]); // a synchronize and its read: one round trip
/// assert_eq!(counted.counts(), Counts { launches: 0, host_syncs: 2, tensor_maps_encoded: 0 });
/// counted.reset();
/// assert_eq!(counted.counts(), Counts::default());
/// # Ok::<(), small4::Error>(())
/// ```
pub struct Instrumented {
    inner: Device,
    state: std::sync::Mutex<InstrumentState>,
}

impl Instrumented {
    /// Wraps `inner`; everything is delegated to it.
    pub fn wrap(inner: Device) -> Arc<Instrumented> {
        Arc::new(Instrumented { inner, state: std::sync::Mutex::new(InstrumentState::default()) })
    }

    /// The counts since creation or the last [`Instrumented::reset`].
    pub fn counts(&self) -> Counts {
        self.state.lock().unwrap().counts
    }

    /// Zeroes the counts.
    pub fn reset(&self) {
        self.state.lock().unwrap().counts = Counts::default();
    }

    /// Records every launch from now on (entry and parameters), timing each with [`Backend::launch_timed`] when
    /// `timed` (each timed launch waits for its kernel). Replaces an earlier recording.
    pub fn start_recording(&self, timed: bool) {
        self.state.lock().unwrap().records = Some((Vec::new(), timed));
    }

    /// Stops recording and returns the launches recorded (empty when none was started).
    pub fn take_records(&self) -> Vec<LaunchRecord> {
        self.state.lock().unwrap().records.take().map(|(r, _)| r).unwrap_or_default()
    }

    fn host_sync(&self) {
        let mut s = self.state.lock().unwrap();
        s.counts.host_syncs += 1;
        s.waited = true;
    }
}

impl Backend for Instrumented {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.inner.alloc(bytes)
    }
    fn free(&self, addr: u64) -> Result<()> {
        self.inner.free(addr)
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.host_sync();
        self.inner.write(addr, data)
    }
    fn read(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        {
            let mut s = self.state.lock().unwrap();
            if !s.waited {
                s.counts.host_syncs += 1;
                s.waited = true;
            }
        }
        self.inner.read(addr, out)
    }
    fn memset(&self, addr: u64, byte: u8, bytes: usize) -> Result<()> {
        self.host_sync();
        self.inner.memset(addr, byte, bytes)
    }
    fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        // The CUDA backend's device copy waits for the stream: a round trip like a memset.
        self.host_sync();
        self.inner.copy(dst, src, bytes)
    }
    fn launch(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8]) -> Result<()> {
        let timed = {
            let mut s = self.state.lock().unwrap();
            s.counts.launches += 1;
            s.waited = false;
            s.records.as_ref().map(|(_, timed)| *timed)
        };
        let micros = match timed {
            Some(true) => self.inner.launch_timed(kernel, config, params)?,
            _ => {
                self.inner.launch(kernel, config, params)?;
                None
            }
        };
        if let Some((records, _)) = self.state.lock().unwrap().records.as_mut() {
            let counters = self.inner.last_launch_counters();
            let (predicted_us, predicted_graph_us, predicted_pdl_overlap_us, predicted_l2_hit_bytes) =
                counters.map_or((None, None, None, None), |c| (c.predicted_us, c.predicted_graph_us, c.predicted_pdl_overlap_us, c.predicted_l2_hit_bytes));
            records.push(LaunchRecord {
                kernel: kernel.entry,
                params: params.to_vec(),
                micros,
                predicted_us,
                predicted_graph_us,
                predicted_pdl_overlap_us,
                predicted_l2_hit_bytes,
            });
        }
        Ok(())
    }
    fn encode_tensor_map_tiled(&self, map: &tensor_map::TiledTensorMap) -> Result<tensor_map::TensorMap> {
        self.state.lock().unwrap().counts.tensor_maps_encoded += 1;
        self.inner.encode_tensor_map_tiled(map)
    }
    fn synchronize(&self) -> Result<()> {
        self.host_sync();
        self.inner.synchronize()
    }
    fn begin_capture(&self) -> Result<()> {
        self.inner.begin_capture()
    }
    fn end_capture(&self) -> Result<Graph> {
        self.inner.end_capture()
    }
    fn replay(&self, graph: &Graph) -> Result<()> {
        {
            let mut s = self.state.lock().unwrap();
            s.counts.launches += graph.launches() as u64;
            s.waited = false;
        }
        self.inner.replay(graph)
    }
    fn device_name(&self) -> String {
        self.inner.device_name()
    }
    fn last_launch_counters(&self) -> Option<LaunchCounters> {
        self.inner.last_launch_counters()
    }
    fn launch_timed(&self, kernel: &Kernel, config: &LaunchConfig, params: &[u8]) -> Result<Option<f64>> {
        self.inner.launch_timed(kernel, config, params)
    }
    fn set_programmatic_launches(&self, on: bool) {
        self.inner.set_programmatic_launches(on)
    }
    fn programmatic_launches(&self) -> bool {
        self.inner.programmatic_launches()
    }
}

/// The CUDA device 0 when a driver and a GPU are present, else `Error::NoGpu` (never a panic).
pub fn gpu() -> Result<Device> {
    Ok(Arc::new(cuda::CudaBackend::new(0)?))
}

/// The GPU for a benchmark or another hardware-only tool, or `None` after printing that `what` is skipped and why
/// (a skip is always said, never silent).
pub fn gpu_or_skip(what: &str) -> Option<Device> {
    match gpu() {
        Ok(device) => {
            let name = device.device_name();
            println!("{what} on {name}: figures against the {}", Ceilings::for_device_name(&name).describe());
            Some(device)
        }
        Err(e) => {
            println!("SKIPPED {what}: needs a real GPU ({e}); nothing was measured. The interpreter's traffic figures are in docs/perf.md.");
            None
        }
    }
}

/// A recorded sequence of launches (`Backend::begin_capture` .. `end_capture`): a CUDA graph on a GPU, the list of
/// launches on the interpreter. Replaying it reruns the launches with their recorded parameters, so every buffer
/// they name must outlive it and hold the step's inputs before each replay.
pub struct Graph {
    /// The backend's own handle (an instantiated CUDA graph, or the interpreter's launch list).
    pub(crate) inner: Box<dyn std::any::Any + Send + Sync>,
    launches: usize,
}

impl Graph {
    pub(crate) fn new(inner: Box<dyn std::any::Any + Send + Sync>, launches: usize) -> Self {
        Graph { inner, launches }
    }
    /// Kernel launches recorded.
    pub fn launches(&self) -> usize {
        self.launches
    }
}

/// A GPU's datasheet ceilings, which benchmarks and the planner report against.
#[derive(Clone, Debug, PartialEq)]
pub struct Ceilings {
    /// The device they belong to, with "(assumed)" when the name was not recognised.
    pub label: String,
    /// Peak HBM bandwidth, bytes per second.
    pub hbm_bytes_per_s: f64,
    /// Peak dense (no sparsity) bf16 tensor-core throughput, floating-point operations per second.
    pub dense_bf16_flops: f64,
}

impl Ceilings {
    /// The H100 SXM: 3.35 TB/s HBM3, 989 dense bf16 TFLOP/s. The project's design target.
    pub fn h100_sxm() -> Self {
        Ceilings { label: "H100 SXM".into(), hbm_bytes_per_s: 3.35e12, dense_bf16_flops: 989e12 }
    }

    /// The ceilings of a device by its reported name (H200: same tensor cores as the H100, 4.8 TB/s HBM3e;
    /// H100 PCIe: 2.0 TB/s, 756 TFLOP/s). An unknown device is measured against the H100 SXM, labelled as assumed.
    pub fn for_device_name(name: &str) -> Self {
        if name.contains("H200") {
            Ceilings { label: "H200".into(), hbm_bytes_per_s: 4.8e12, dense_bf16_flops: 989e12 }
        } else if name.contains("H100") && name.contains("PCIe") {
            Ceilings { label: "H100 PCIe".into(), hbm_bytes_per_s: 2.0e12, dense_bf16_flops: 756e12 }
        } else if name.contains("H100") {
            Ceilings::h100_sxm()
        } else {
            Ceilings { label: format!("H100 SXM (assumed for {name})"), ..Ceilings::h100_sxm() }
        }
    }

    /// "4.80 TB/s and 989 bf16 TFLOP/s of the H200".
    pub fn describe(&self) -> String {
        format!("{:.2} TB/s and {:.0} bf16 TFLOP/s of the {}", self.hbm_bytes_per_s / 1e12, self.dense_bf16_flops / 1e12, self.label)
    }
}

/// A fresh PTX interpreter backend, with its own memory (see [`sim::SimBackend::new`] for its checks). Never fails.
pub fn simulator() -> Device {
    Arc::new(sim::SimBackend::new())
}

/// The element type of a buffer or tensor view, as kernels and error messages name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// bfloat16.
    Bf16,
    /// IEEE half.
    F16,
    /// IEEE single.
    F32,
    /// Signed 32-bit integers (token ids, positions, expert ids, block tables).
    I32,
    /// Unsigned 32-bit integers.
    U32,
    /// Unsigned 64-bit integers (sampling seeds).
    U64,
    /// Bytes: FP8 e4m3 codes, packed 4-bit pairs, e4m3 block scales, a paged cache's raw pages.
    U8,
    /// Unsigned 16-bit integers (raw bf16/f16 bits).
    U16,
}

/// Element types a buffer may hold: plain bytes with no padding, each with its [`DType`].
pub trait DeviceElement: bytemuck::Pod + Send + Sync {
    /// What the element is.
    const DTYPE: DType;
}
macro_rules! device_elements {
    ($($t:ty => $d:ident),*) => { $(impl DeviceElement for $t { const DTYPE: DType = DType::$d; })* };
}
device_elements!(half::bf16 => Bf16, half::f16 => F16, f32 => F32, i32 => I32, u32 => U32, u64 => U64, u8 => U8, u16 => U16);

/// Typed device memory of `len` elements: owned (frees itself on drop) or borrowed from the caller
/// ([`DeviceBuffer::from_raw_borrowed`], never freed here).
pub struct DeviceBuffer<T: DeviceElement> {
    device: Device,
    addr: u64,
    len: usize,
    owned: bool,
    _element: PhantomData<T>,
}

impl<T: DeviceElement> DeviceBuffer<T> {
    /// Uninitialised memory for `len` elements (`len` 0 still gets a distinct address). `Error::InvalidArgument` when
    /// `len * size_of::<T>()` overflows.
    pub fn alloc(device: &Device, len: usize) -> Result<Self> {
        let bytes = len.checked_mul(size_of::<T>()).ok_or_else(|| Error::InvalidArgument(format!("{len} elements overflow")))?;
        // Zero-length buffers still get a distinct address so kernels can be passed a valid pointer.
        let addr = device.alloc(bytes.max(1))?;
        Ok(DeviceBuffer { device: device.clone(), addr, len, owned: true, _element: PhantomData })
    }

    /// Views `len` elements at `addr`, memory the caller allocated on `device` (a runtime's own buffers, the C ABI's
    /// raw pointers), as a buffer the kernel wrappers accept. Dropping it leaves the memory alone.
    ///
    /// # Safety
    /// `addr` must be the start of at least `len * size_of::<T>()` bytes of `device` memory, aligned for `T`, that
    /// stay allocated while the view (or any launch reading it) is in use.
    ///
    /// ```
    /// use small4::device::{simulator, DeviceBuffer};
    ///
    /// let device = simulator();
    /// let addr = device.alloc(4 * size_of::<f32>())?; // memory the caller owns
    /// // SAFETY: `addr` holds 4 f32 on `device` until it is freed below.
    /// let view = unsafe { DeviceBuffer::<f32>::from_raw_borrowed(&device, addr, 4)? };
    /// view.copy_from(&[1.0, 2.0, 3.0, 4.0])?;
    /// drop(view); // leaves the memory alone
    /// let mut bytes = [0u8; 16];
    /// device.read(addr, &mut bytes)?;
    /// assert_eq!(bytes[4..8], 2.0f32.to_ne_bytes());
    /// device.free(addr)?;
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub unsafe fn from_raw_borrowed(device: &Device, addr: u64, len: usize) -> Result<Self> {
        if addr == 0 {
            return Err(Error::InvalidArgument("a null device address".into()));
        }
        if addr % align_of::<T>() as u64 != 0 {
            return Err(Error::InvalidArgument(format!("device address {addr:#x} is not aligned to {} bytes", align_of::<T>())));
        }
        len.checked_mul(size_of::<T>()).ok_or_else(|| Error::InvalidArgument(format!("{len} elements overflow")))?;
        Ok(DeviceBuffer { device: device.clone(), addr, len, owned: false, _element: PhantomData })
    }

    /// A new buffer on `device` holding a copy of `data`.
    pub fn from_slice(device: &Device, data: &[T]) -> Result<Self> {
        let buffer = Self::alloc(device, data.len())?;
        buffer.copy_from(data)?;
        Ok(buffer)
    }

    /// Filled with one repeated byte (tests poison outputs with 0xff = NaN for every float type).
    pub fn filled_with_byte(device: &Device, len: usize, byte: u8) -> Result<Self> {
        let buffer = Self::alloc(device, len)?;
        device.memset(buffer.addr, byte, buffer.bytes())?;
        Ok(buffer)
    }

    /// Overwrites the whole buffer with `data`; `Error::Shape` unless `data.len()` equals [`DeviceBuffer::len`].
    pub fn copy_from(&self, data: &[T]) -> Result<()> {
        if data.len() != self.len {
            return Err(Error::shape("DeviceBuffer::copy_from", self.len, data.len()));
        }
        self.device.write(self.addr, bytemuck::cast_slice(data))
    }

    /// Copies `len` elements of `src` starting at element `src_offset` into this buffer at element `dst_offset`, on
    /// the device (no host round trip). `Error::Shape` when either range passes its buffer's end;
    /// `Error::InvalidArgument` when the buffers live on different devices or the ranges overlap.
    ///
    /// ```
    /// use small4::device::{simulator, DeviceBuffer};
    ///
    /// let device = simulator();
    /// let (src, dst) = (DeviceBuffer::from_slice(&device, &[1u16, 2, 3, 4])?, DeviceBuffer::from_slice(&device, &[0u16; 6])?);
    /// dst.copy_within_device(1, &src, 2, 2)?;
    /// assert_eq!(dst.to_vec()?, vec![0, 3, 4, 0, 0, 0]);
    /// assert!(dst.copy_within_device(5, &src, 0, 2).is_err()); // past dst's end
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn copy_within_device(&self, dst_offset: usize, src: &DeviceBuffer<T>, src_offset: usize, len: usize) -> Result<()> {
        if !Arc::ptr_eq(&self.device, &src.device) {
            return Err(Error::InvalidArgument("copy_within_device: the buffers are on different devices".into()));
        }
        for (what, offset, buffer_len) in [("destination", dst_offset, self.len), ("source", src_offset, src.len)] {
            if offset.checked_add(len).is_none_or(|end| end > buffer_len) {
                return Err(Error::shape(
                    format!("copy_within_device {what} [{offset}, {offset} + {len})"),
                    format!("<= {buffer_len}"),
                    offset.saturating_add(len),
                ));
            }
        }
        if len == 0 {
            return Ok(());
        }
        let size = std::mem::size_of::<T>() as u64;
        let (dst, src_addr) = (self.addr + dst_offset as u64 * size, src.addr + src_offset as u64 * size);
        let bytes = len as u64 * size;
        if dst < src_addr + bytes && src_addr < dst + bytes {
            return Err(Error::InvalidArgument("copy_within_device: overlapping ranges".into()));
        }
        self.device.copy(dst, src_addr, bytes as usize)
    }

    /// The buffer's contents on the host, after synchronising the device (so kernel errors surface here).
    pub fn to_vec(&self) -> Result<Vec<T>> {
        let mut out = vec![T::zeroed(); self.len];
        self.device.synchronize()?;
        self.device.read(self.addr, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    /// Elements, not bytes.
    pub fn len(&self) -> usize {
        self.len
    }
    /// Whether the buffer holds no elements (it still has a distinct, valid address).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Size in bytes: `len * size_of::<T>()`.
    pub fn bytes(&self) -> usize {
        self.len * size_of::<T>()
    }
    /// The device address, for a kernel parameter struct.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// The device address as the pointer type bindgen gave a parameter field.
    pub fn ptr<P>(&self) -> *const P {
        self.addr as *const P
    }
    /// The device address as a mutable pointer, for an output field of a parameter struct.
    pub fn mut_ptr<P>(&self) -> *mut P {
        self.addr as *mut P
    }
    /// The device the memory lives on.
    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl<T: DeviceElement> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // A failed free cannot be reported from drop; the backends log nothing and leak at worst.
        if self.owned {
            let _ = self.device.free(self.addr);
        }
    }
}

/// Launches `kernel` with a bindgen parameter struct, passed by value as its raw bytes.
pub fn launch_with<P: Copy>(device: &Device, kernel: &Kernel, config: &LaunchConfig, params: &P) -> Result<()> {
    // SAFETY: P is a `#[repr(C)]` bindgen struct of plain fields (pointers, integers, floats); its bytes are what
    // the kernel's `.param` space receives. Padding bytes are never read by the kernel.
    let bytes = unsafe { std::slice::from_raw_parts((params as *const P).cast::<u8>(), size_of::<P>()) };
    device.launch(kernel, config, bytes)
}
