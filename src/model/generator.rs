//! One generation interface over every backend: the CPU reference or the engine on the PTX interpreter or a GPU,
//! opened from a checkpoint directory. What the C ABI's generator and the examples run; `small4 generate` computes
//! the same tokens.
//!
//! The same tiny checkpoint on the CPU reference and on the interpreter, with an image in the prompt:
//!
//! ```
//! use small4::model::checkpoint::{Checkpoint, Layout};
//! use small4::model::engine::Sampling;
//! use small4::model::generator::{GenerationBackend, Generator, GeneratorOptions};
//! use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
//! use small4::model::PixelImage;
//! use small4::quant::WeightFormat;
//!
//! let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?)?;
//! let options = GeneratorOptions { eos: None, max_context: 32, ..GeneratorOptions::default() };
//!
//! // The reference backend uploads nothing, so it reports no progress and has no device.
//! let mut reference = Generator::open_with_progress(&checkpoint, &options, |_| unreachable!())?;
//! assert!(reference.device().is_none());
//! let vision = reference.config().vision.clone().expect("the tiny preset has a tower");
//!
//! // A 28x28 image is 2x2 patches of 14, merged 2x2 into one feature: one [IMG], then [IMG_END].
//! let image = PixelImage { width: 28, height: 28, channels: 3, data: vec![0.25; 3 * 28 * 28] };
//! let prompt = [1, vision.image_token_id, vision.image_end_token_id, 300];
//! let tokens = reference.generate_with_images(&prompt, &[image.clone()], 2, Sampling::Greedy, |_| {})?;
//! assert_eq!(tokens.len(), 2);
//!
//! // The engine on a device the caller chose (here the interpreter), streaming the tokens as they come.
//! let device = small4::device::simulator();
//! let mut engine = Generator::engine_on(&device, &checkpoint, &options)?;
//! assert_eq!(engine.device().map(|d| d.name()), Some("sim"));
//! let mut streamed = Vec::new();
//! let tokens = engine.generate_with_images(&prompt, &[image], 1, Sampling::Greedy, |t| streamed.push(t))?;
//! assert_eq!((tokens.len(), tokens), (1, streamed));
//! assert!(engine.generate(&[1; 32], 1, Sampling::Greedy, |_| {}).is_err()); // 33 tokens > max_context
//! assert_eq!(engine.options().backend, GenerationBackend::Reference); // engine_on does not consult it
//! # Ok::<(), small4::Error>(())
//! ```
//!
//! An engine backend opened with [`Generator::open_with_progress`] reports the upload step by step (a closure such
//! as `|p: LoadProgress| eprintln!("{}/{}", p.done, p.total)`), one step per layer and a last one for the embeddings
//! and the head; `GenerationBackend::Gpu` opens CUDA device 0 and is `Error::NoGpu` without one:
//!
//! ```
//! # use small4::model::checkpoint::{Checkpoint, Layout};
//! # use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
//! # use small4::quant::WeightFormat;
//! use small4::model::engine::LoadProgress;
//! use small4::model::generator::{GenerationBackend, Generator, GeneratorOptions};
//!
//! let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?)?;
//! let options = GeneratorOptions { backend: GenerationBackend::Gpu, ..GeneratorOptions::default() };
//! let mut steps: Vec<LoadProgress> = Vec::new();
//! match Generator::open_with_progress(&checkpoint, &options, |p| steps.push(p)) {
//!     Ok(on_gpu) => {
//!         let total = on_gpu.config().n_layers + 1;
//!         assert_eq!(steps.last(), Some(&LoadProgress { done: total, total }));
//!     }
//!     Err(small4::Error::NoGpu(_)) => assert!(steps.is_empty()), // nothing was uploaded
//!     Err(other) => return Err(other),
//! }
//! # Ok::<(), small4::Error>(())
//! ```

use super::checkpoint::Checkpoint;
use super::config::ModelConfig;
use super::engine::{DeviceModel, Engine, EngineOptions, LoadProgress, Request, Sampling, Shard, DEFAULT_EOS};
use super::synthetic::load_reference_weights;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::reference::model::{ForwardOptions, ReferenceModel};
use crate::reference::vision::{check_image_slots, PixelImage};

/// Where a [`Generator`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationBackend {
    /// The CPU reference forward pass (f32 over the bf16 weights; `GeneratorOptions::reference` sets its rounding and
    /// attention form): greedy only.
    Reference,
    /// The engine's CUDA kernels on the PTX interpreter (a few tokens a second for the tiny model).
    Sim,
    /// The engine on CUDA device 0 (`Error::NoGpu` without one).
    Gpu,
}

/// How a [`Generator`] is set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GeneratorOptions {
    /// Where it computes; default the CPU reference.
    pub backend: GenerationBackend,
    /// Stop token (kept as the last generated token); `None` generates to `max_tokens`.
    pub eos: Option<u32>,
    /// The engine's KV cache holds this many tokens of one request (prompt + generated); no request may be longer.
    pub max_context: usize,
    /// Activation rounding and attention form of the reference backend.
    pub reference: ForwardOptions,
    /// Engine backends: replay decode steps as captured graphs (`EngineOptions::graphs`).
    pub graphs: bool,
    /// Routed experts in W8A8 on every backend (`EngineOptions::fp8_activations`, `ForwardOptions::fp8_activations`):
    /// needs per-tensor FP8 experts with activation scales.
    pub fp8_activations: bool,
    /// Engine backends: the step token budget of chunked prefill (`EngineOptions::prefill_chunk`).
    pub prefill_chunk: usize,
}

impl Default for GeneratorOptions {
    fn default() -> Self {
        GeneratorOptions {
            backend: GenerationBackend::Reference,
            eos: Some(DEFAULT_EOS),
            max_context: 1024,
            reference: ForwardOptions::default(),
            graphs: true,
            fp8_activations: false,
            prefill_chunk: crate::model::engine::DEFAULT_PREFILL_CHUNK,
        }
    }
}

/// Tokens per KV-cache page of the engine (what `small4 generate` uses).
const PAGE_SIZE: usize = 16;

enum Model {
    Reference(Box<ReferenceModel>),
    Engine(Box<Engine>),
}

/// A loaded model that turns prompts into generated token ids.
///
/// ```
/// use small4::model::checkpoint::{Checkpoint, Layout};
/// use small4::model::engine::Sampling;
/// use small4::model::generator::{GenerationBackend, Generator, GeneratorOptions};
/// use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
/// use small4::quant::WeightFormat;
///
/// let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?)?;
/// let options = GeneratorOptions { backend: GenerationBackend::Reference, eos: None, ..GeneratorOptions::default() };
/// let mut generator = Generator::open(&checkpoint, &options)?;
/// let tokens = generator.generate(&[5, 17, 300, 41], 3, Sampling::Greedy, |_| {})?;
/// assert_eq!(tokens.len(), 3);
/// # Ok::<(), small4::Error>(())
/// ```
pub struct Generator {
    model: Model,
    options: GeneratorOptions,
}

impl Generator {
    /// Loads `checkpoint` for `options.backend` (the engine backends upload it to the device).
    pub fn open(checkpoint: &Checkpoint, options: &GeneratorOptions) -> Result<Self> {
        Self::open_with_progress(checkpoint, options, |_| {})
    }

    /// [`Generator::open`], reporting the engine backends' upload layer by layer (`DeviceModel::load_with_progress`).
    pub fn open_with_progress(checkpoint: &Checkpoint, options: &GeneratorOptions, on_progress: impl FnMut(LoadProgress)) -> Result<Self> {
        let device = match options.backend {
            GenerationBackend::Reference => {
                let model =
                    ReferenceModel::new(load_reference_weights(checkpoint)?, ForwardOptions { fp8_activations: options.fp8_activations, ..options.reference })?;
                return Ok(Generator { model: Model::Reference(Box::new(model)), options: *options });
            }
            GenerationBackend::Sim => crate::device::simulator(),
            GenerationBackend::Gpu => crate::device::gpu()?,
        };
        Self::engine_with_progress(&device, checkpoint, options, on_progress)
    }

    /// The engine on a device the caller chose (`options.backend` is not consulted).
    pub fn engine_on(device: &Device, checkpoint: &Checkpoint, options: &GeneratorOptions) -> Result<Self> {
        Self::engine_with_progress(device, checkpoint, options, |_| {})
    }

    fn engine_with_progress(device: &Device, checkpoint: &Checkpoint, options: &GeneratorOptions, on_progress: impl FnMut(LoadProgress)) -> Result<Self> {
        if options.max_context == 0 {
            return Err(Error::InvalidArgument("a generator needs max_context >= 1".into()));
        }
        let model = DeviceModel::load_with_progress(device, checkpoint, Shard::SINGLE, on_progress)?;
        // One page more than the context needs: a sequence's last page may start mid-way.
        let engine_options = EngineOptions {
            eos: options.eos,
            page_size: PAGE_SIZE,
            num_pages: options.max_context.div_ceil(PAGE_SIZE) + 1,
            graphs: options.graphs,
            fp8_activations: options.fp8_activations,
            prefill_chunk: options.prefill_chunk,
            ..EngineOptions::default()
        };
        let engine = Engine::new(model, engine_options, None)?;
        Ok(Generator { model: Model::Engine(Box::new(engine)), options: *options })
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        match &self.model {
            Model::Reference(m) => m.config(),
            Model::Engine(e) => e.model().config(),
        }
    }

    /// The device of the engine backends (`None` on the reference).
    pub fn device(&self) -> Option<&Device> {
        match &self.model {
            Model::Reference(_) => None,
            Model::Engine(e) => Some(e.model().device()),
        }
    }

    /// The options it was opened with.
    pub fn options(&self) -> &GeneratorOptions {
        &self.options
    }

    /// Prefills `prompt` and generates up to `max_tokens` tokens (fewer after the eos token), reporting each to
    /// `on_token` as it comes; returns them all. The reference backend samples greedily only.
    ///
    /// Errors, before anything runs: those of `Request::validate` (`Error::InvalidArgument` for an empty prompt,
    /// `max_tokens` 0, a temperature not finite or below 0, a top-p outside (0, 1]; `Error::OutOfRange` for a token id
    /// at or above the vocabulary size or a request past the model's last position), `Error::InvalidArgument` for a
    /// prompt plus `max_tokens` beyond `GeneratorOptions::max_context`, `[IMG]` tokens without images (see
    /// [`Generator::generate_with_images`]) or seeded sampling on the reference.
    pub fn generate(&mut self, prompt: &[u32], max_tokens: usize, sampling: Sampling, on_token: impl FnMut(u32)) -> Result<Vec<u32>> {
        self.generate_with_images(prompt, &[], max_tokens, sampling, on_token)
    }

    /// [`Generator::generate`] with the prompt's `[IMG]` tokens taking the features of `images` (the vision tower runs
    /// on the CPU on the reference backend, on the kernels on the engine backends). The prompt holds one `[IMG]` per
    /// merged patch of each image and none without images (`Error::Shape` / `Error::InvalidArgument` otherwise).
    pub fn generate_with_images(
        &mut self,
        prompt: &[u32],
        images: &[PixelImage],
        max_tokens: usize,
        sampling: Sampling,
        mut on_token: impl FnMut(u32),
    ) -> Result<Vec<u32>> {
        let request = Request { prompt: prompt.to_vec(), max_tokens, sampling };
        request.validate(self.config())?;
        check_image_slots(self.config().vision.as_ref(), prompt, images)?;
        if prompt.len() + max_tokens > self.options.max_context {
            return Err(Error::InvalidArgument(format!(
                "{} prompt + {max_tokens} generated tokens exceed the generator's max_context of {}",
                prompt.len(),
                self.options.max_context
            )));
        }
        match &mut self.model {
            Model::Reference(model) => {
                if sampling != Sampling::Greedy {
                    return Err(Error::InvalidArgument("the reference backend samples greedily only".into()));
                }
                Ok(model.generate_greedy_images_until(prompt, images, max_tokens, self.options.eos, on_token)?.generated)
            }
            Model::Engine(engine) => {
                let id = engine.add_with_images(request, images.to_vec())?;
                let mut tokens = Vec::with_capacity(max_tokens);
                while engine.active() > 0 {
                    let step = match engine.step() {
                        Ok(step) => step,
                        Err(e) => {
                            // Leave the engine empty for the next call.
                            let _ = engine.cancel(id);
                            return Err(e);
                        }
                    };
                    for t in step.into_iter().filter(|t| t.id == id) {
                        on_token(t.token);
                        tokens.push(t.token);
                    }
                }
                Ok(tokens)
            }
        }
    }
}
