//! The PTX-interpreter backend: runs the exact PTX that build.rs produced on the CPU through `tools/ptxsim`.
//! Implemented with the ptxsim issue; until then every call reports that the interpreter is not available.

use super::{Backend, Kernel, LaunchConfig};
use crate::error::{Error, Result};

pub struct SimBackend {}

impl SimBackend {
    pub fn new() -> Self {
        SimBackend {}
    }
}

impl Default for SimBackend {
    fn default() -> Self {
        Self::new()
    }
}

fn unavailable<T>() -> Result<T> {
    Err(Error::Simulator("the PTX interpreter backend is not implemented yet (issue 3)".into()))
}

impl Backend for SimBackend {
    fn name(&self) -> &'static str {
        "sim"
    }
    fn alloc(&self, _bytes: usize) -> Result<u64> {
        unavailable()
    }
    fn free(&self, _addr: u64) -> Result<()> {
        unavailable()
    }
    fn write(&self, _addr: u64, _data: &[u8]) -> Result<()> {
        unavailable()
    }
    fn read(&self, _addr: u64, _out: &mut [u8]) -> Result<()> {
        unavailable()
    }
    fn memset(&self, _addr: u64, _byte: u8, _bytes: usize) -> Result<()> {
        unavailable()
    }
    fn launch(&self, _kernel: &Kernel, _config: &LaunchConfig, _params: &[u8]) -> Result<()> {
        unavailable()
    }
    fn synchronize(&self) -> Result<()> {
        unavailable()
    }
}
