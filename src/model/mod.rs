//! The model: configuration, checkpoints, KV cache, engine.
