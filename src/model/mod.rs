//! The model: configuration, checkpoints, KV cache, engine.

pub mod checkpoint;
pub mod config;

pub use config::{ModelConfig, VisionConfig};
