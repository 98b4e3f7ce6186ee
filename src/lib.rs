//! small4: hand-written CUDA kernels and the compute core that runs Mistral Small 4 (119B MoE) on Hopper GPUs.
//!
//! Layers: `device` (one `Backend` trait: the CUDA driver or the PTX interpreter), `kernels` (one safe wrapper
//! module per `cuda/*.cu` family, taking typed tensor views), `quant` (the weight formats the kernels read), `model`
//! (configuration, checkpoints, KV cache, engine, generator, plans), `tokenizer` (tekken and the v15 chat prompt).
//! The CPU reference the kernels are tested against is private (public to this repository's tests through the
//! `internals` feature).

#[warn(missing_docs)]
pub mod calibrate;
#[warn(missing_docs)]
pub mod device;
#[warn(missing_docs)]
pub mod error;
#[warn(missing_docs)]
pub mod kernels;
#[warn(missing_docs)]
pub mod model;
#[warn(missing_docs)]
pub mod quant;
#[warn(missing_docs)]
pub mod tokenizer;

/// The CPU oracle in f32: every kernel's and the whole model's reference. Outside the versioned API: private, public
/// only with the `internals` feature (this repository's tests, benches and tools).
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod reference;
#[cfg(not(feature = "internals"))]
#[allow(dead_code, unreachable_pub)]
mod reference;

pub use device::{Backend, Device, DeviceBuffer};
pub use error::{Error, Result};
