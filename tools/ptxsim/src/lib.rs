//! ptxsim: an interpreter for the PTX that nvcc emits (sm_80 / sm_90a), to run CUDA kernels on the CPU with checks
//! a GPU run does not give: out-of-bounds and uninitialised reads, shared-memory races, missing `cp.async` waits,
//! and traffic counters (bytes, 32-byte sectors per warp request, bank conflicts, tensor-core operations).
//!
//! Pipeline: `parser` (text -> syntax tree) -> `decode` (each instruction decoded once into `ir::Inst` with resolved
//! register indices) -> `exec` (warps of 32 lanes, per-lane register arrays, one instruction for all active lanes in
//! a tight loop). `Machine` owns global memory and launches kernels synchronously, one block at a time.
//!
//! Checks (each an error naming kernel, block, thread and PTX line): out-of-bounds and misaligned accesses in every
//! state space; kernel reads of bytes nothing wrote (tracked per byte; host writes and memsets initialise, `alloc`
//! does not); shared-memory races (per byte: two threads, at least one writing, not ordered by a block barrier,
//! within a warp a `bar.warp.sync`, or between warps an mbarrier arrive -> wait edge; atomics are exempt); reads of
//! shared bytes an unfinished `cp.async`, TMA or bulk copy will write; warp collectives whose member mask is not the
//! set of converged lanes; barrier and mbarrier deadlocks; device-side asserts (with their message).
//!
//! sm_90a asynchronous PTX (../shared/HOPPER-ASYNC.md has the semantics and sources):
//! - Labels are scoped to their `{ }` block (inline asm repeats `LAB_WAIT:`/`DONE:` in every expansion).
//! - mbarriers: `init`, `inval`, `arrive` (with a count, `.expect_tx`, `.noComplete`, `arrive_drop`), `expect_tx`,
//!   `complete_tx`, `test_wait`/`try_wait` with a parity or a state, `pending_count`, in the `.shared`,
//!   `.shared::cta`, `.shared::cluster` and generic spellings. Waits block their lanes until the phase completes, so
//!   spin loops let other warps run; when no warp can run, every blocked wait returns false once before a deadlock
//!   is reported with each waited-on barrier's phase, missing arrivals and outstanding transaction bytes. Checks:
//!   init twice, use before init (or not ordered after it), plain accesses to a barrier's bytes, over-arrival,
//!   `.noComplete` completing, an arrive on the next phase before any wait saw the previous one complete, states
//!   from a wrong phase, transaction counts beyond 2^20 - 1. Race detection between warps uses warp vector clocks:
//!   an arrive (or an async copy's issue) releases, the phase completion publishes, a successful wait acquires;
//!   within a warp a successful wait orders the lanes like a `__syncwarp`.
//! - TMA (module `tensor_map` for the host side): `cp.async.bulk.tensor` 1-5d tile loads (element strides,
//!   out-of-bounds zero fill, 32/64/128-byte swizzle, `.multicast::cluster` with mask 1) completing on an mbarrier,
//!   tile stores (clipped at the tensor's end; negative coordinates are an error), non-tensor `cp.async.bulk` in both
//!   directions, `cp.async.bulk.commit_group` / `wait_group{.read}`, `prefetch.tensormap` (a no-op), and the L2
//!   prefetches `cp.async.bulk.prefetch.L2.global` and `prefetch{.global}.L2`: no architectural effect, their sectors
//!   counted (`Counters::prefetch_sectors`, unmapped bytes ignored) for the timing model and its cross-launch L2
//!   state (`l2::L2Residency`).
//!   Loads read their source at issue and land when a thread waits on their barrier's incomplete phase (or when no
//!   warp can run); stores read their source at issue and write global memory at the `wait_group` that retires them.
//! - wgmma: `wgmma.mma_async` m64nNk16 (N = 8..256) with f16/bf16 inputs and f32 (or f16) accumulators, and
//!   m64nNk32 with e4m3/e5m2 inputs (any mix of A and B types; no transposes) and f32 or f16 accumulators, and
//!   m64nNk8 with tf32 inputs (the low 13 bits of each element ignored) and f32 accumulators; A from a
//!   shared-memory descriptor or registers, B from a descriptor, K-major or (16-bit) transposed, without swizzle or
//!   with the 32/64/128-byte swizzle (the absolute-address XOR TMA uses, so descriptor K-advances inside a swizzle
//!   row work), scale-d (predicate or immediate), negated inputs; `wgmma.fence`, `commit_group`, `wait_group`
//!   (completing for the whole warpgroup: a wait blocks until the other three warps have committed as many groups).
//!   Each warp computes its 16 rows at issue; its D/A registers and the shared bytes it read stay in flight until the
//!   retiring wait: touching such a register, or overwriting such a byte (store, atomic, TMA), is an error. A wgmma before any `wgmma.fence`, or using a
//!   register another instruction wrote after the last fence, is an error too (`Machine::wgmma_fence_check`).
//! - Checked against an H100 (tests/hopper_nvcc.rs, dumps from fixtures/hopper.cu): TMA tile loads in all four
//!   swizzle modes with out-of-bounds boxes (whose complete_tx counts the whole box, out-of-bounds bytes included),
//!   wgmma with 128-byte-swizzled K-major operands and K-advance, a transposed B, A in registers with a 32-byte-
//!   swizzled B (the accumulator and A fragment layouts), and the lane `elect.sync` picks: all bit for bit.
//! - Proxy fences: an async-proxy read (wgmma operand, TMA or bulk store source) of shared bytes last written by a
//!   generic-proxy store (st, atom, cp.async) is an error unless the writer, or the issuing thread, executed
//!   `fence.proxy.async` after the write. Bytes a TMA / bulk copy wrote need no fence.
//! - Clusters of one CTA: `mapa` / `getctarank` (rank 0), `.shared::cluster` addresses, `barrier.cluster.arrive` /
//!   `wait`, `%cluster_*` / `%clusterid` / `%is_explicit_cluster`; `fence.proxy.async`, `fence.proxy.tensormap`,
//!   `fence.mbarrier_init` (ordering no-ops here), `elect.sync` (lowest lane), `setmaxnreg` (checked: 24..=256, a
//!   multiple of 8, whole warp).
//! - Programmatic dependent launch (`Machine::programmatic`): `griddepcontrol.wait` / `.launch_dependents`
//!   run as instructions (launches stay sequential, a valid schedule); every kernel launch marks, per byte, what it
//!   read and wrote (`memory::Allocation::mark`, kept for two launches), and a programmatic launch's accesses before
//!   a thread's wait are checked against its predecessor's marks: loads of bytes it wrote, stores/atomics to bytes
//!   it read or wrote, a `launch_dependents` before the wait, and a grid in which no thread waits are errors.
//!
//! Known limits: wgmma with int8 inputs and sparse wgmma are not supported yet (they decode as
//! unsupported); mma.sync and wgmma sum exactly and round once by default, where the hardware truncates to 25
//! fraction bits (HOPPER-ASYNC.md §1.6), so results can differ in the last bits (small-integer data agrees exactly);
//! `Machine::tensor_arith = TensorArith::HopperTruncated` switches to MMA-Sim's truncating Hopper model instead
//! (with fp8 inputs 13 fraction bits and f32 results of 13 fraction bits: UNVERIFIED until compared on an H100, which
//! tools/gpu/run.sh's probe step does with [`hopper_probe`];
//! mma.sync with fp8 inputs follows the same fp8 rule, not covered by MMA-Sim's Hopper data either); registers
//! the `.aligned` rule (all four warps issue the same wgmma with the same descriptors) is not checked; a non-zero descriptor base offset is an error; no clusters of
//! more than one CTA (multicast, distributed shared memory); no
//! `cp.async.mbarrier.arrive`, `tensormap.replace` / `tensormap.cp_fenceproxy`, im2col TMA modes, TMA reductions,
//! interleaved or TFLOAT32 / NaN-filled tensor maps; overwrites of a bulk store's source before its
//! `wait_group.read` are not detected (stores read their sources at issue); the proxy-fence check orders a
//! generic write and a `fence.proxy.async` by execution order, not happens-before (the race detector orders the
//! threads); `barrier.cluster` arrival phases are tracked per warp (the `.aligned` form);
//! no recursion, indirect calls or printf (clear errors where they would run); mma.sync sums products exactly and
//! rounds once, which can differ from a GPU's accumulation in the last bit; `.approx` functions are computed to full
//! precision (inside the ISA's error bounds); registers are not checked for initialisation.

pub mod counters;
pub mod decode;
mod exec;
pub mod float;
pub mod hopper_probe;
pub mod ir;
pub mod l2;
pub mod memory;
pub mod parser;
pub mod tensor_map;
pub mod timing;

use std::sync::atomic::{AtomicU64, Ordering};

pub use counters::{BlockSample, Counters};
pub use float::TensorArith;
use memory::GlobalMemory;
pub use timing::{Gpu, Model, Prediction, Profile};

/// A PTX syntax or decoding error, naming the source line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("PTX line {line}: {message}")]
pub struct ParseError {
    pub line: u32,
    pub message: String,
}

/// Where in a kernel run an error happened.
#[derive(Debug, Clone, PartialEq)]
pub struct Site {
    pub kernel: String,
    pub block: [u32; 3],
    pub thread: [u32; 3],
    pub line: u32,
}

/// A run-time error: a fault inside a kernel (with its site) or a bad host call.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct SimError {
    pub site: Option<Site>,
    pub message: String,
}

impl SimError {
    pub(crate) fn host(message: impl Into<String>) -> Self {
        SimError { site: None, message: message.into() }
    }
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.site {
            Some(s) => write!(
                f,
                "kernel {}, block ({}, {}, {}), thread ({}, {}, {}), PTX line {}: {}",
                s.kernel, s.block[0], s.block[1], s.block[2], s.thread[0], s.thread[1], s.thread[2], s.line, self.message
            ),
            None => write!(f, "{}", self.message),
        }
    }
}

static NEXT_MODULE: AtomicU64 = AtomicU64::new(0);

/// A parsed and decoded PTX module.
#[derive(Debug, Clone)]
pub struct Module {
    kernels: Vec<ir::Kernel>,
    vars: Vec<decode::ModuleVar>,
}

impl Module {
    pub fn parse(src: &str) -> Result<Module, ParseError> {
        let ast = parser::parse(src)?;
        // Each module's .global/.const variables get their own fixed window of device addresses.
        let id = NEXT_MODULE.fetch_add(1, Ordering::Relaxed);
        let base = memory::MODULE_DATA_BASE + id * memory::MODULE_DATA_STRIDE;
        let decoded = decode::decode(&ast, base)?;
        Ok(Module { kernels: decoded.kernels, vars: decoded.vars })
    }

    pub fn entries(&self) -> Vec<String> {
        self.kernels.iter().map(|k| k.name.clone()).collect()
    }

    pub fn kernel(&self, name: &str) -> Option<&ir::Kernel> {
        self.kernels.iter().find(|k| k.name == name)
    }

    /// Every instruction the interpreter cannot run, as (kernel, PTX line, opcode): executing one is an error.
    pub fn unsupported(&self) -> Vec<(String, u32, String)> {
        let mut out = Vec::new();
        for k in &self.kernels {
            for i in &k.code {
                if let ir::Op::Unsupported(name) = &i.op {
                    out.push((k.name.clone(), i.line, name.clone()));
                }
            }
        }
        out
    }
}

/// Global memory and kernel launches.
pub struct Machine {
    global: GlobalMemory,
    /// Shared-memory race detection (on by default).
    pub race_check: bool,
    /// Run at most this many blocks of each launch, evenly spaced over the grid (None: every block). For timing
    /// estimates of launches too large to interpret whole: the counters then cover `Counters::blocks_run` blocks, and
    /// blocks not run write nothing (their outputs stay as they were).
    pub block_sample: Option<u64>,
    /// Report a wgmma whose accumulator or A registers another instruction wrote after the last `wgmma.fence` (on by
    /// default; ptxas accepts such code but serialises the wgmmas, warning C7515).
    pub wgmma_fence_check: bool,
    /// How `mma.sync` and `wgmma.mma_async` round their dot products: exactly once (the default), or with the
    /// truncations of MMA-Sim's Hopper model (`TensorArith::HopperTruncated`, HOPPER-ASYNC.md §1.6).
    pub tensor_arith: TensorArith,
    /// Launches are programmatic dependent launches (CUDA's programmatic stream serialization attribute; off by
    /// default): on a GPU such a kernel may start once every block of the grid before it executed
    /// `griddepcontrol.launch_dependents` or exited, and its `griddepcontrol.wait` blocks until that grid completed.
    /// Launches here stay sequential (a valid schedule), and the accesses such an overlap would make unsafe are errors
    /// ("programmatic launch hazard", naming kernel, block, thread, PTX line, address and the previous launch's
    /// kernel). When the launch directly follows another kernel launch with no host operation between them, a thread
    /// that has not executed `griddepcontrol.wait` may not load a global byte the previous launch wrote, nor store to
    /// or atomically update one it read or wrote (byte-exact; asynchronous copies are checked when issued). In any
    /// programmatic launch, a thread may not execute `griddepcontrol.launch_dependents` before its wait (that keeps the
    /// chain transitive: a launch's dependents start only after everything it depends on completed), and some thread
    /// of the grid must execute the wait.
    pub programmatic: bool,
    /// The kernel of the last launch, when it succeeded: a programmatic launch right after it is checked against it.
    last_kernel: Option<String>,
    /// A host operation (copy, memset, free, synchronisation) happened since the last launch: it orders the next
    /// launch after the previous one completely, so a programmatic launch then has no running predecessor.
    host_op_since_launch: std::cell::Cell<bool>,
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    pub fn new() -> Machine {
        Machine {
            global: GlobalMemory::default(),
            race_check: true,
            block_sample: None,
            wgmma_fence_check: true,
            tensor_arith: TensorArith::ExactRoundOnce,
            programmatic: false,
            last_kernel: None,
            host_op_since_launch: std::cell::Cell::new(false),
        }
    }

    /// Uninitialised device memory: a kernel reading it before anything wrote it is an error.
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        self.global.alloc(bytes)
    }

    pub fn free(&mut self, addr: u64) -> Result<(), SimError> {
        self.host_op_since_launch.set(true);
        if self.global.free(addr) {
            Ok(())
        } else {
            Err(SimError::host(format!("free of {addr:#x}, which is not the start of a live allocation")))
        }
    }

    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), SimError> {
        self.host_op_since_launch.set(true);
        if self.global.write(addr, data) {
            Ok(())
        } else {
            Err(SimError::host(format!("host write of {} bytes at {addr:#x} is outside any allocation ({})", data.len(), self.global.describe(addr))))
        }
    }

    /// Reading bytes no one wrote is allowed from the host (they read as 0); only kernel reads are checked.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), SimError> {
        self.host_op_since_launch.set(true);
        if self.global.read(addr, out) {
            Ok(())
        } else {
            Err(SimError::host(format!("host read of {} bytes at {addr:#x} is outside any allocation ({})", out.len(), self.global.describe(addr))))
        }
    }

    pub fn memset(&mut self, addr: u64, byte: u8, bytes: usize) -> Result<(), SimError> {
        self.host_op_since_launch.set(true);
        if self.global.fill(addr, byte, bytes) {
            Ok(())
        } else {
            Err(SimError::host(format!("memset of {bytes} bytes at {addr:#x} is outside any allocation ({})", self.global.describe(addr))))
        }
    }

    /// Runs `entry` to completion over the grid. `params` are the bytes of the kernel's parameters laid out as its
    /// `.entry` declares them (for our kernels: the one by-value struct). A programmatic dependent launch while
    /// [`Machine::programmatic`] is set.
    pub fn launch(
        &mut self,
        module: &Module,
        entry: &str,
        grid: [u32; 3],
        block: [u32; 3],
        dynamic_shared_bytes: u32,
        params: &[u8],
    ) -> Result<Counters, SimError> {
        let checks = exec::Checks { race: self.race_check, wgmma_fence: self.wgmma_fence_check, tensor_arith: self.tensor_arith };
        let follows_a_launch = !self.host_op_since_launch.replace(false);
        let previous_kernel = self.last_kernel.take().filter(|_| self.programmatic && follows_a_launch);
        let mut pdl = exec::Pdl {
            programmatic: self.programmatic,
            previous: previous_kernel.map(|k| (self.global.launch_seq, k)),
            waited: Vec::new(),
            any_waited: false,
            kernel_waits: false,
        };
        self.global.launch_seq += 1;
        let counters = exec::launch(&mut self.global, module, entry, grid, block, dynamic_shared_bytes, params, checks, self.block_sample, &mut pdl)?;
        self.last_kernel = Some(entry.to_string());
        Ok(counters)
    }

    /// Orders the next launch after everything before it, as a host synchronisation does.
    pub fn synchronize(&mut self) {
        self.host_op_since_launch.set(true);
    }
}
