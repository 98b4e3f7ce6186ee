//! The model: configuration, checkpoints, KV cache, engine.

pub mod checkpoint;
pub mod config;
pub mod engine;
pub mod kv_cache;
pub mod plan;
pub mod synthetic;
pub mod vision;

pub use config::{ModelConfig, VisionConfig};
