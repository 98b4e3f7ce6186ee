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
//! does not); shared-memory races between barriers (per byte: two threads, at least one writing, not ordered by a
//! block barrier or, within a warp, a `bar.warp.sync`; atomics are exempt); reads of shared bytes an unfinished
//! `cp.async` will write (copies land at `cp.async.wait_group`/`wait_all`); warp collectives whose member mask is
//! not the set of converged lanes; barrier deadlocks; device-side asserts (with their message).
//!
//! Known limits: no wgmma / TMA / mbarrier / clusters yet (see `memory` for where they fit); no recursion, indirect
//! calls or printf (clear errors where they would run); mma.sync sums products exactly and rounds once, which can
//! differ from a GPU's accumulation in the last bit; `.approx` functions are computed to full precision (inside the
//! ISA's error bounds); registers are not checked for initialisation.

pub mod counters;
pub mod decode;
mod exec;
pub mod float;
pub mod ir;
pub mod memory;
pub mod parser;
pub mod timing;

use std::sync::atomic::{AtomicU64, Ordering};

pub use counters::{BlockSample, Counters};
pub use timing::{Gpu, Model, Prediction, Profile};
use memory::GlobalMemory;

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
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    pub fn new() -> Machine {
        Machine { global: GlobalMemory::default(), race_check: true, block_sample: None }
    }

    /// Uninitialised device memory: a kernel reading it before anything wrote it is an error.
    pub fn alloc(&mut self, bytes: usize) -> u64 {
        self.global.alloc(bytes)
    }

    pub fn free(&mut self, addr: u64) -> Result<(), SimError> {
        if self.global.free(addr) {
            Ok(())
        } else {
            Err(SimError::host(format!("free of {addr:#x}, which is not the start of a live allocation")))
        }
    }

    pub fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), SimError> {
        if self.global.write(addr, data) {
            Ok(())
        } else {
            Err(SimError::host(format!("host write of {} bytes at {addr:#x} is outside any allocation ({})", data.len(), self.global.describe(addr))))
        }
    }

    /// Reading bytes no one wrote is allowed from the host (they read as 0); only kernel reads are checked.
    pub fn read(&self, addr: u64, out: &mut [u8]) -> Result<(), SimError> {
        if self.global.read(addr, out) {
            Ok(())
        } else {
            Err(SimError::host(format!("host read of {} bytes at {addr:#x} is outside any allocation ({})", out.len(), self.global.describe(addr))))
        }
    }

    pub fn memset(&mut self, addr: u64, byte: u8, bytes: usize) -> Result<(), SimError> {
        if self.global.fill(addr, byte, bytes) {
            Ok(())
        } else {
            Err(SimError::host(format!("memset of {bytes} bytes at {addr:#x} is outside any allocation ({})", self.global.describe(addr))))
        }
    }

    /// Runs `entry` to completion over the grid. `params` are the bytes of the kernel's parameters laid out as its
    /// `.entry` declares them (for our kernels: the one by-value struct).
    pub fn launch(
        &mut self,
        module: &Module,
        entry: &str,
        grid: [u32; 3],
        block: [u32; 3],
        dynamic_shared_bytes: u32,
        params: &[u8],
    ) -> Result<Counters, SimError> {
        exec::launch(&mut self.global, module, entry, grid, block, dynamic_shared_bytes, params, self.race_check, self.block_sample)
    }
}
