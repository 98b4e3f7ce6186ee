//! small4: hand-written CUDA kernels and the compute core that runs Mistral Small 4 (119B MoE) on Hopper GPUs.
//!
//! Layers: `device` (one `Backend` trait: the CUDA driver or the PTX interpreter), `kernels` (one safe wrapper
//! module per `cuda/*.cu` family), `reference` (the CPU oracle in f32), `quant` (weight formats), `model`
//! (configuration, checkpoints, KV cache, engine), `tokenizer` (tekken and the v15 chat prompt).

#[warn(missing_docs)]
pub mod device;
#[warn(missing_docs)]
pub mod error;
#[warn(missing_docs)]
pub mod kernels;
#[warn(missing_docs)]
pub mod model;
pub mod quant;
pub mod reference;
pub mod tokenizer;

pub use device::{Backend, Device, DeviceBuffer};
pub use error::{Error, Result};
