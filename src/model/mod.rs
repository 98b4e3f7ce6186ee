//! The model: configuration, checkpoints, KV cache, engine.
pub mod checkpoint;
