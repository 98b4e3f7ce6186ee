//! The model: configuration, checkpoints, KV cache, engine.
pub mod kv_cache;
