//! The model: configuration, checkpoints, KV cache, engine.

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod decode_prefetch;
mod device_model;
pub mod engine;
mod forward;
pub mod generator;
pub mod kv_cache;
pub mod logits;
pub mod plan;
mod request;
pub mod synth;
pub mod synthetic;
pub mod vision;

/// The reference forward pass's settings, as [`generator::GeneratorOptions::reference`] takes them.
pub use crate::reference::model::{AttentionForm, ForwardOptions, RoundingMode};
/// An image as the engine and the generator take it: RGB pixels normalised for the vision encoder (made by
/// [`crate::tokenizer::image::load_pixels`]).
pub use crate::reference::vision::PixelImage;
pub use checkpoint::Checkpoint;
/// The model configuration under the name the public API gives it (`small4::model::Config`).
pub use config::ModelConfig as Config;
pub use config::{ModelConfig, VisionConfig};
pub use engine::Engine;
pub use generator::Generator;
pub use kv_cache::KvCache;
