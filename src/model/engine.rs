//! The forward pass on a device: [`DeviceModel`] (a checkpoint uploaded in the kernels' layouts) and [`Engine`]
//! (prefill and decode of a batch of sequences over the paged latent cache, continuous batching, greedy or seeded
//! sampling, EOS). Written in the llm.c manner: `Network::run` is the whole network as a plain list of kernel calls,
//! one line per step of the architecture (SPEC-model.md), on any `Backend` (GPU or interpreter).
//!
//! One job a file: this one schedules (the [`Engine`], its options, the decode graphs); `device_model.rs` loads a
//! model onto the device ([`DeviceModel`], [`Shard`]); `forward.rs` is the forward pass (`Network::run`, its
//! activation workspace and output head); `request.rs` holds the request types ([`Request`], [`Sampling`],
//! [`StepToken`], ...). Their public items are re-exported here: `small4::model::engine::*` stays the one path.
//!
//! Precision follows `reference::model` with `RoundingMode::Bf16Activations` and absorbed attention: every tensor
//! the reference rounds to bf16 is a bf16 buffer here; the router and logits are f32. Two places round more than the
//! reference: the routed and shared experts' SwiGLU activations are stored in bf16 between the up and down GEMMs
//! (the reference keeps them f32), and the GEMMs accumulate in a different order. The engine tests bound the
//! resulting logit differences and require identical greedy tokens.
//!
//! Weights: the attention linears, the output head and the shared expert run through the dense path of the
//! grouped GEMM (`kernels::dense::linear`) in the checkpoint's own format (bf16, or FP8 with the GEMM's FP8 path), so
//! the device sees exactly the values the reference dequantises; routed experts are repacked per format by
//! `quant::repack`, one layer at a time while streaming (host memory holds one layer's experts at most).
//!
//! MLA's absorbed products are per head: `q_lat_h = q_nope_h . W_UK_h` and `out_h = W_UV_h . o_lat_h`, each one
//! batched launch for all heads (`kernels::dense::linear_per_head`: the heads' matrices stacked, grid z = head); W_UK_h
//! is stored transposed ([kv_lora_rank, qk_nope]) so both are `y = x W^T`. The attention kernel reads the rope half
//! of each query head in place (a strided `q_rope`), where the RoPE kernel rotated it.
//!
//! Expert parallelism: a rank owns a contiguous share of the experts ([`Shard`]); the router's expert map
//! drops the other pairs, the per-pair f32 outputs of non-local pairs are zero, and one f32 all-reduce of the
//! per-pair outputs gives every rank all pairs before the deterministic combine, so any number of ranks computes
//! bit-identical results to one rank. (The all-reduce is stream-ordered with NCCL; the thread test double copies
//! through host memory and so synchronises.)
//!
//! Tensor parallelism of attention ([`AttentionSplit::TensorParallel`], as vLLM splits MLA): a rank also owns a
//! contiguous share of the query heads, i.e. its heads' rows of `wq_b`, their W_UK / W_UV (from `wkv_b`) and their
//! input columns of `wo`. The latent path (`wq_a`, `wkv_a_with_mqa`, the norms, the rope'd k_pe) and the paged latent
//! cache stay whole on every rank: MLA's latent is shared by all heads, so it cannot be split by head. Each rank runs
//! the attention on its heads and its `wo` slice into an f32 partial sum, one f32 all-reduce adds the partials, and
//! the sum is rounded to bf16 once (where one rank rounds its whole `wo` output). The partials are added in another
//! order than one GEMM adds them, so results may differ from one rank in the last bits of the attention output.
//!
//! A tour on the interpreter with the tiny checkpoint: load with progress, the layer-level logits of a sequence, then
//! requests through the batch (text to completion; one with an image, cancelled).
//!
//! ```
//! use small4::model::checkpoint::{Checkpoint, Layout};
//! use small4::model::engine::{DeviceModel, Engine, EngineOptions, FinishReason, LoadProgress, Request, RequestId, Sampling, Shard, StepToken, DEFAULT_EOS};
//! use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
//! use small4::model::PixelImage;
//! use small4::quant::WeightFormat;
//!
//! let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?)?;
//! let device = small4::device::simulator();
//! let mut progress = Vec::new();
//! let model = DeviceModel::load_with_progress(&device, &checkpoint, Shard::SINGLE, |p| progress.push(p))?;
//! let (layers, vocab) = (model.config().n_layers, model.config().vocab);
//! // One report per decoder layer, then one for the embeddings and the head.
//! assert_eq!(progress.len(), layers + 1);
//! assert_eq!(progress.last(), Some(&LoadProgress { done: layers + 1, total: layers + 1 }));
//! let v = model.vision().expect("the tiny preset has a vision tower").config().clone();
//!
//! // The default stops at </s>; no stop token here, so every request runs to max_tokens.
//! assert_eq!(EngineOptions::default().eos, Some(DEFAULT_EOS));
//! let mut engine = Engine::new(model, EngineOptions { eos: None, ..EngineOptions::default() }, None)?;
//!
//! // Layer-level view: the logits of every token of a sequence, [tokens, vocab].
//! let seq = engine.new_sequence();
//! let logits = engine.forward_logits(&[(seq, vec![1, 300, 301])])?;
//! assert_eq!(logits.len(), 3 * vocab);
//! let last = &logits[2 * vocab..];
//! let greedy = (0..vocab).fold(0, |best, i| if last[i] > last[best] { i } else { best }) as u32;
//!
//! // The same prompt as a request: its first greedy token is the argmax of those last logits.
//! let text = engine.add(Request { prompt: vec![1, 300, 301], max_tokens: 2, sampling: Sampling::Greedy })?;
//! let first: Vec<StepToken> = engine.step()?;
//! assert_eq!((first.len(), first[0].id, first[0].token, first[0].finished), (1, text, greedy, None));
//!
//! // A 28x28 image is one merged feature: the prompt holds one [IMG] for it (its features replace that embedding at
//! // the request's prefill; `generator::Generator` runs one through).
//! let image = PixelImage { width: 28, height: 28, channels: 3, data: vec![0.25; 3 * 28 * 28] };
//! let prompt = vec![1, v.image_token_id, v.image_end_token_id, 300];
//! let pictured = engine.add_with_images(Request { prompt, max_tokens: 1, sampling: Sampling::Greedy }, vec![image.clone()])?;
//! assert_eq!((text, pictured, engine.active()), (RequestId(0), RequestId(1), 2)); // handles in increasing order
//! // An image with no [IMG] slot in the prompt is a typed error, and the request is not added:
//! let no_slot = Request { prompt: vec![1, 300], max_tokens: 1, sampling: Sampling::Greedy };
//! assert!(matches!(engine.add_with_images(no_slot, vec![image]), Err(small4::Error::Shape { .. })));
//! // A cancelled request leaves at once (its pages freed); cancelling it again is an error.
//! engine.cancel(pictured)?;
//! assert!(engine.cancel(pictured).is_err());
//! assert_eq!(engine.active(), 1);
//!
//! // The text request's second token is its last.
//! let second = engine.step()?;
//! assert_eq!((second.len(), second[0].id, second[0].finished), (1, text, Some(FinishReason::MaxTokens)));
//! assert!((second[0].token as usize) < vocab && second[0].logits.is_none()); // keep_logits is off
//! assert_eq!(engine.active(), 0);
//! # Ok::<(), small4::Error>(())
//! ```

use std::collections::BTreeMap;

use half::bf16;

use crate::device::collective::Collective;
use crate::device::{DeviceBuffer, Graph};
use crate::kernels::attention::{AttentionScratch, BlockTables, PagedCache, QueryLayout, TokenSlots};
use crate::kernels::ops::{self, GatherStatus, SamplingInputs};
use crate::kernels::vision::RowTargets;
use crate::model::forward::{Head, HeadRows, ImageRows, Network, Workspace};
use crate::model::kv_cache::{CacheDescriptor, CacheDtype, KvCache, SeqId};
use crate::reference::vision::{check_image_slots, PixelImage};
use crate::{Error, Result};

pub use crate::model::device_model::{AttentionSplit, DeviceModel, LoadProgress, Shard};
pub use crate::model::request::{FinishReason, Request, RequestId, Sampling, StepRouting, StepToken};

/// End of sequence of the Mistral tokenizers (tekken `</s>`).
pub const DEFAULT_EOS: u32 = 2;

/// How an [`Engine`] sizes its cache and runs its steps. The default: pages of `DEFAULT_PAGE_SIZE` tokens, 64 pages,
/// a bf16 cache, [`DEFAULT_EOS`] as the stop token, graphs on, no logits read back, bf16 activations.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    /// Tokens per cache page and pages in the pool (shared by all sequences; every layer has its own pages).
    pub page_size: usize,
    /// Pages in the pool: the cache holds at most `num_pages * page_size` tokens over all sequences.
    pub num_pages: usize,
    /// Element type of the latent KV cache.
    pub cache_dtype: CacheDtype,
    /// Stop token; None generates to `max_tokens`.
    pub eos: Option<u32>,
    /// Read back each generated token's logits (tests).
    pub keep_logits: bool,
    /// Forced KV split count of the attention (None: the kernel's heuristic).
    pub attention_splits: Option<usize>,
    /// Replay decode steps (every request adding one token) as captured graphs: a CUDA graph on a GPU (one launch
    /// for the whole network instead of 14 per layer), the recorded launch list on the interpreter. One graph per
    /// (batch size, block-table capacity in pages, a power of two); the first step of a shape runs eagerly, the next
    /// one captures. Off, or on a backend without graphs, or with a collective, every step runs eagerly.
    pub graphs: bool,
    /// Routed experts in W8A8: e4m3 activations with the checkpoint's static scales (`qscale_act`) on the e4m3
    /// tensor cores. Needs per-tensor FP8 experts with activation scales; the shared expert stays bf16.
    pub fp8_activations: bool,
    /// Token budget of a step (chunked prefill): decode tokens first, then prompt chunks fill what is left, so a
    /// long prompt is prefilled over several steps beside the other sequences' decode tokens and the activation
    /// workspace is sized by this budget, never by a prompt. A prompt with images is prefilled in one step.
    pub prefill_chunk: usize,
    /// Decode graphs kept (one per batch size and table capacity); the least recently used is dropped past this.
    pub max_decode_graphs: usize,
    /// Keep every layer's expert choice of each step for [`Engine::last_routing`] (tests, diagnostics): one device
    /// copy of the router's ids per layer, and every step runs eagerly (a captured graph holds launches only). Off,
    /// nothing is copied and the steps are as without it.
    pub record_routing: bool,
    /// Decode steps (up to 8 tokens) prefetch weights into L2: the latency-bound launches pull the next DRAM-bound
    /// GEMM's weights ([`crate::model::decode_prefetch`]: wo's during the absorption and attention launches; the
    /// router's share is none at present), and the dense decode GEMMs (and the shared expert) ask for the rest of
    /// their own k range before their programmatic wait (`DeviceWeights::set_decode_own_prefetch`, set on the
    /// model's weights by [`Engine::new`]). Off: neither. A hint: the same tokens and logits either way.
    pub l2_prefetch: bool,
}

/// The default step token budget: 2048 tokens keep a prefill step's GEMMs on the tensor cores' efficient side on
/// an H100 while its activations stay small (a 2048-token step's MoE pair outputs are 128 MiB).
pub const DEFAULT_PREFILL_CHUNK: usize = 2048;

impl EngineOptions {
    /// The options that give the engine the KV-cache pool a memory plan leaves on its GPU (`small4 plan`): as many
    /// pages of `page_size` tokens as `gpu.kv_capacity_tokens` holds, the plan's step budget and cache element size.
    /// `Error::InvalidArgument` for a page size of 0 or a plan whose cache element is neither 2 (bf16) nor 1 (fp8)
    /// bytes (an fp8 cache takes scale 1; set `cache_dtype` for another).
    ///
    /// ```
    /// use small4::model::engine::EngineOptions;
    /// use small4::model::plan::{plan, FormatChoice, GpuSpec, Workload};
    /// use small4::model::ModelConfig;
    ///
    /// let workload = Workload::default();
    /// let p = plan(&ModelConfig::mistral_small_4(), "nvfp4", GpuSpec::H100_80GB, 1, FormatChoice::NVFP4_EXPERTS, workload)?;
    /// let options = EngineOptions::from_plan(&p.gpus[0], &workload, 64)?;
    /// assert!(options.max_context_tokens() >= 256 * 1024); // the model's full context fits one H100
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn from_plan(gpu: &crate::model::plan::GpuPlan, workload: &crate::model::plan::Workload, page_size: usize) -> Result<Self> {
        if page_size == 0 {
            return Err(Error::InvalidArgument("from_plan: page size 0".into()));
        }
        let cache_dtype = match workload.kv_bytes_per_value {
            2 => CacheDtype::Bf16,
            1 => CacheDtype::Fp8E4m3 { scale: 1.0 },
            other => return Err(Error::InvalidArgument(format!("from_plan: {other}-byte cache elements"))),
        };
        let num_pages = usize::try_from(gpu.kv_capacity_tokens / page_size as u64).map_err(|_| Error::InvalidArgument("from_plan: too many pages".into()))?;
        Ok(EngineOptions { page_size, num_pages, cache_dtype, prefill_chunk: workload.prefill_chunk_tokens, ..EngineOptions::default() })
    }

    /// Tokens the page pool holds (over all sequences): the longest context one sequence can reach.
    pub fn max_context_tokens(&self) -> usize {
        self.num_pages * self.page_size
    }
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            page_size: crate::model::kv_cache::DEFAULT_PAGE_SIZE,
            num_pages: 64,
            cache_dtype: CacheDtype::Bf16,
            eos: Some(DEFAULT_EOS),
            keep_logits: false,
            attention_splits: None,
            graphs: true,
            fp8_activations: false,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
            max_decode_graphs: 8,
            record_routing: false,
            l2_prefetch: true,
        }
    }
}

/// Tokens of pages a decoding sequence takes ahead when its pages are full (fewer when its request ends sooner).
const DECODE_RESERVE_TOKENS: usize = 1024;

/// The buffers of a decode step of one shape, fixed so that a captured graph can replay over them: the step's
/// inputs are written into them before every run, and nothing in the network allocates or reads back.
struct DecodeGraph {
    workspace: Workspace,
    head: Head,
    tables: BlockTables,
    layout: QueryLayout,
    slots: TokenSlots,
    scratch: AttentionScratch,
    /// Eager runs so far; the graph is recorded at the shape's second step (the first sizes everything).
    eager_runs: usize,
    graph: Option<Graph>,
    /// The ids the workspace holds for the next step when a `decode_advance` wrote them there (the tokens sampled
    /// last step, in batch order): a step whose ids are these uploads nothing.
    ids_on_device: Option<Vec<i32>>,
    /// The engine's step count when the graph last ran (the least recently used graph is dropped first).
    last_used: u64,
}

/// One request's part of a step: the tokens fed, and whether the step samples its next token (a decode token, or
/// the chunk that ends its prompt).
struct Scheduled {
    id: RequestId,
    tokens: Vec<u32>,
    samples: bool,
}

/// A step's tokens laid out by the host: ids, positions, each token's batch row, and the first token of each
/// sequence (`q_start`, one entry more than sequences).
struct StepLayout {
    ids: Vec<i32>,
    positions: Vec<i32>,
    token_seq: Vec<i32>,
    q_start: Vec<i32>,
}

/// The shape a decode graph serves: sequences in the batch, pages per block-table row (a power of two).
type DecodeShape = (usize, usize);

/// Where the last step's outputs are.
#[derive(Clone, Copy)]
enum LastStep {
    Eager,
    Decode(DecodeShape),
}

/// A request in the batch.
struct Active {
    seq: SeqId,
    request: Request,
    /// The images whose features replace the prompt's `[IMG]` embeddings at the prefill.
    images: Vec<PixelImage>,
    /// Tokens to feed at the next step: the prompt before the prefill, then the last generated token.
    pending: Vec<u32>,
    generated: usize,
}

/// Prefill and decode over the paged cache for a changing batch of requests.
///
/// ```no_run
/// use small4::model::checkpoint::Checkpoint;
/// use small4::model::engine::{DeviceModel, Engine, EngineOptions, Shard, Request, Sampling};
///
/// let device = small4::device::gpu()?;
/// let model = DeviceModel::load(&device, &Checkpoint::open("/models/Mistral-Small-4")?, Shard::SINGLE)?;
/// let mut engine = Engine::new(model, EngineOptions::default(), None)?;
/// let tokens = engine.generate(vec![Request { prompt: vec![1, 22177], max_tokens: 16, sampling: Sampling::Greedy }], |_| {})?;
/// println!("{:?}", tokens[0]);
/// # Ok::<(), small4::Error>(())
/// ```
/// It runs on the interpreter as well (`small4::device::simulator()`): [`crate::model::generator::Generator`] shows it
/// with the tiny model.
pub struct Engine {
    model: DeviceModel,
    options: EngineOptions,
    kv: KvCache,
    /// One paged cache per layer; all layers share the block tables.
    caches: Vec<PagedCache>,
    collective: Option<Box<dyn Collective>>,
    scratch: AttentionScratch,
    workspace: Option<Workspace>,
    head: Option<Head>,
    decode_graphs: BTreeMap<DecodeShape, DecodeGraph>,
    /// Whether the backend captured a graph when first asked (false after a refusal: eager from then on).
    graphs_supported: bool,
    last_step: LastStep,
    gather_status: GatherStatus,
    active: BTreeMap<RequestId, Active>,
    next_id: u64,
    /// Steps run so far.
    steps: u64,
    /// With `EngineOptions::record_routing`: every layer's router ids of the last forward pass (`[layers, tokens,
    /// k]`), and its sequences (`StepRouting::sequences`) once the pass succeeded.
    routing_record: Option<DeviceBuffer<i32>>,
    recorded_sequences: Option<Vec<(Option<RequestId>, std::ops::Range<usize>)>>,
}

impl Engine {
    /// An engine over `model`; `collective` joins the ranks of expert (and tensor) parallelism (every rank runs the
    /// same requests in the same order). `Error::InvalidArgument` when the collective's rank and world differ from
    /// the model's shard (or a multi-rank shard has none), or `fp8_activations` is asked of experts without static
    /// FP8 activation scales; errors of the cache descriptor for a bad page size or count.
    pub fn new(mut model: DeviceModel, options: EngineOptions, collective: Option<Box<dyn Collective>>) -> Result<Self> {
        if let Some(col) = &collective {
            let shard = model.shard;
            if (col.rank(), col.world_size()) != (shard.rank, shard.world) {
                return Err(Error::InvalidArgument(format!("collective rank {} of {} but model shard {shard:?}", col.rank(), col.world_size())));
            }
        } else if model.shard.world != 1 {
            return Err(Error::InvalidArgument(format!("model shard {:?} needs a collective", model.shard)));
        }
        for (l, layer) in model.layers.iter_mut().enumerate() {
            let scales = match (options.fp8_activations, layer.fp8_act_scales) {
                (false, _) => None,
                (true, Some(scales)) => Some(scales),
                (true, None) => {
                    return Err(Error::InvalidArgument(format!(
                        "fp8 activations: layer {l}'s routed experts are not per-tensor FP8 with activation scales (qscale_act)"
                    )))
                }
            };
            layer.moe.set_fp8_activations(scales)?;
            // The dense decode GEMMs' own-range L2 prefetch follows the decode step's prefetch switch.
            for w in [&mut layer.wqkv_a, &mut layer.wq_b, &mut layer.w_uk, &mut layer.w_uv, &mut layer.wo] {
                w.set_decode_own_prefetch(options.l2_prefetch);
            }
            if let Some((gate_up, down)) = &mut layer.moe.shared {
                gate_up.set_decode_own_prefetch(options.l2_prefetch);
                down.set_decode_own_prefetch(options.l2_prefetch);
            }
        }
        model.output.set_decode_own_prefetch(options.l2_prefetch);
        if options.prefill_chunk == 0 || options.max_decode_graphs == 0 {
            return Err(Error::InvalidArgument(format!(
                "engine options: prefill_chunk {} and max_decode_graphs {} must be at least 1",
                options.prefill_chunk, options.max_decode_graphs
            )));
        }
        let desc = CacheDescriptor::mla(options.num_pages, options.page_size, options.cache_dtype)?;
        let caches = (0..model.config.n_layers).map(|_| PagedCache::new(&model.device, desc)).collect::<Result<_>>()?;
        Ok(Engine {
            kv: KvCache::new(desc)?,
            caches,
            collective,
            scratch: AttentionScratch::new(&model.device),
            workspace: None,
            head: None,
            decode_graphs: BTreeMap::new(),
            graphs_supported: true,
            last_step: LastStep::Eager,
            gather_status: GatherStatus::new(&model.device)?,
            active: BTreeMap::new(),
            next_id: 0,
            steps: 0,
            routing_record: None,
            recorded_sequences: None,
            options,
            model,
        })
    }

    /// The model the engine runs.
    pub fn model(&self) -> &DeviceModel {
        &self.model
    }

    /// Decode graphs captured so far (one per batch size and block-table capacity; see `EngineOptions::graphs`).
    pub fn captured_graphs(&self) -> usize {
        self.decode_graphs.values().filter(|g| g.graph.is_some()).count()
    }

    /// The most tokens any allocated activation workspace holds (the eager step's, and each decode graph's batch):
    /// with chunked prefill at most `EngineOptions::prefill_chunk` (or the decode batch, if larger), whatever the
    /// prompts' lengths.
    pub fn workspace_tokens(&self) -> usize {
        let eager = self.workspace.as_ref().map_or(0, |w| w.tokens);
        self.decode_graphs.values().map(|g| g.workspace.tokens).chain([eager]).max().unwrap_or(0)
    }

    /// Requests still in the batch.
    pub fn active(&self) -> usize {
        self.active.len()
    }

    /// Adds a request; it joins the batch at the next [`Engine::step`] (its prompt is prefilled there).
    /// The request is checked first ([`Request::validate`]: `Error::InvalidArgument` for an empty prompt, `max_tokens`
    /// 0 or invalid sampling settings, `Error::OutOfRange` for a token id at or above the vocabulary size or a
    /// request that would pass the model's last position), and so are its `[IMG]` tokens: a prompt holding any is
    /// `Error::InvalidArgument` here (they take images: [`Engine::add_with_images`]).
    pub fn add(&mut self, request: Request) -> Result<RequestId> {
        self.add_with_images(request, Vec::new())
    }

    /// [`Engine::add`] for a multimodal prompt: the `[IMG]` tokens of the prompt take the features of `images`, in
    /// order (one `[IMG]` per merged patch of each image; `[IMG_BREAK]` / `[IMG_END]` stay text tokens). Positions
    /// stay 1-D, as in `ReferenceModel::forward_with_images`. The `[IMG]` count must match the images
    /// (`Error::Shape`), images need a vision tower (`Error::Config`).
    pub fn add_with_images(&mut self, request: Request, images: Vec<PixelImage>) -> Result<RequestId> {
        request.validate(&self.model.config)?;
        check_image_slots(self.model.vision.as_ref().map(|tower| tower.config()), &request.prompt, &images)?;
        // Admission: a prompt the whole page pool cannot hold (with the slot of its first token) never runs.
        let desc = self.kv.descriptor();
        let needed = desc.pages_for(request.prompt.len() + 1);
        if needed > desc.num_pages {
            return Err(Error::OutOfPages { needed, free: desc.num_pages });
        }
        let id = RequestId(self.next_id);
        self.next_id += 1;
        let seq = self.kv.add_sequence();
        self.active.insert(id, Active { seq, pending: request.prompt.clone(), request, images, generated: 0 });
        Ok(id)
    }

    /// Drops a request and frees its pages.
    pub fn cancel(&mut self, id: RequestId) -> Result<()> {
        let a = self.active.remove(&id).ok_or(Error::UnknownSequence(id.0))?;
        self.kv.free(a.seq)
    }

    /// One step of the whole batch: new requests are prefilled and running ones decode one token, in ONE forward
    /// pass (chunked prefill and decode share the attention kernel). Returns one token per active request;
    /// finished requests leave the batch.
    pub fn step(&mut self) -> Result<Vec<StepToken>> {
        if self.active.is_empty() {
            return Ok(Vec::new());
        }
        let plan = self.schedule()?;
        // A step is all or nothing: on any error the cache's tables and lengths go back to what they were (device rows
        // written past them are never read, and are overwritten by the retry), and no request changes.
        let kv_before = self.kv.clone();
        let result = self.run_step(&plan);
        if result.is_err() {
            self.kv = kv_before;
            for g in self.decode_graphs.values_mut() {
                g.ids_on_device = None;
            }
        }
        self.steps += 1;
        result
    }

    /// Which requests run this step and with which tokens, within the token budget (`EngineOptions::prefill_chunk`)
    /// and the free pages: decode tokens first (one each), then prompt chunks in request order. A request whose
    /// tokens would need more pages than are free waits for a later step (admission); when none can run at all,
    /// `Error::OutOfPages` (nothing changed). A prompt with images goes in whole (its image rows are one step's).
    fn schedule(&self) -> Result<Vec<Scheduled>> {
        let budget = self.options.prefill_chunk.max(1);
        let (mut used, mut free) = (0usize, self.kv.free_pages());
        let mut plan = Vec::new();
        let mut short = None;
        let decoding = |a: &Active| a.generated > 0;
        for pass in [true, false] {
            for (&id, a) in self.active.iter().filter(|(_, a)| decoding(a) == pass) {
                let take = if pass || !a.images.is_empty() { a.pending.len() } else { a.pending.len().min(budget.saturating_sub(used)) };
                if take == 0 {
                    continue;
                }
                let needed = self.kv.pages_needed(a.seq, take)?;
                if needed > free {
                    short.get_or_insert(Error::OutOfPages { needed, free });
                    continue;
                }
                free -= needed;
                used += take;
                plan.push(Scheduled { id, tokens: a.pending[..take].to_vec(), samples: take == a.pending.len() });
            }
        }
        match (plan.is_empty(), short) {
            (true, Some(err)) => Err(err),
            _ => Ok(plan),
        }
    }

    /// Runs one scheduled step and applies its results; changes no request when it fails (`step` restores the cache).
    fn run_step(&mut self, plan: &[Scheduled]) -> Result<Vec<StepToken>> {
        let ids: Vec<RequestId> = plan.iter().map(|p| p.id).collect();
        let batch: Vec<(SeqId, Vec<u32>)> = plan.iter().map(|p| (self.active[&p.id].seq, p.tokens.clone())).collect();
        // A request's images enter at its prefill (its first step); they are dropped once that step succeeded.
        let images: Vec<Vec<PixelImage>> =
            ids.iter().map(|id| if self.active[id].generated == 0 { self.active[id].images.clone() } else { Vec::new() }).collect();
        let with_images = images.iter().any(|i| !i.is_empty());
        let decode_only = batch.iter().all(|(_, tokens)| tokens.len() == 1) && plan.iter().all(|p| p.samples);
        let graphs = self.options.graphs && !self.options.record_routing && self.graphs_supported;
        if decode_only && !with_images && graphs && self.collective.is_none() {
            // Tokens each request may still add after this step: the pages taken ahead for them.
            let ahead: Vec<usize> = ids.iter().map(|id| self.active[id].request.max_tokens.saturating_sub(self.active[id].generated + 1)).collect();
            self.decode_with_graph(&batch, &ahead)?;
        } else {
            self.forward_device(&batch, &images, HeadRows::Last)?;
            if let Some(sequences) = &mut self.recorded_sequences {
                sequences.iter_mut().zip(&ids).for_each(|((request, _), &id)| *request = Some(id));
            }
        }
        let (_, head) = self.last_outputs();
        // Head row i is request i's last token.
        let rows = head.rows;
        let vocab = self.model.config.vocab;
        let greedy = ids.iter().all(|id| self.active[id].request.sampling == Sampling::Greedy);
        if greedy {
            ops::argmax(head.logits.view([rows, vocab])?, head.next.as_vector())?;
        } else {
            let mut temperature = vec![0.0f32; rows];
            let mut top_p = vec![1.0f32; rows];
            let mut seeds = vec![0u64; rows];
            let mut steps = vec![0i32; rows];
            for (row, id) in ids.iter().enumerate() {
                let a = &self.active[id];
                if let Sampling::Seeded { temperature: t, top_p: p, seed } = a.request.sampling {
                    (temperature[row], top_p[row], seeds[row], steps[row]) = (t, p, seed, a.generated as i32);
                }
            }
            let d = &self.model.device;
            let (temperature, top_p) = (DeviceBuffer::from_slice(d, &temperature)?, DeviceBuffer::from_slice(d, &top_p)?);
            let (seeds, steps) = (DeviceBuffer::from_slice(d, &seeds)?, DeviceBuffer::from_slice(d, &steps)?);
            let inputs = SamplingInputs { temperature: temperature.as_vector(), top_p: top_p.as_vector(), seeds: seeds.as_vector(), steps: steps.as_vector() };
            ops::sample(head.logits.view([rows, vocab])?, &inputs, head.next.as_vector())?;
        }
        let advanced = self.advance_decode_inputs()?;
        let (ws, head) = self.last_outputs();
        // The step's one synchronisation: the host needs the tokens to stop sequences and feed the next step.
        let next = head.next.to_vec()?;
        if !advanced {
            // A decode step's ids are the tokens sampled before (checked below, as every prompt id was by `add`), so
            // only other steps read the embedding gather's status back.
            self.gather_status.check(ws.ids.as_vector(), vocab)?;
            self.gather_status.reset()?;
        }
        let logits = if self.options.keep_logits { Some(head.logits.to_vec()?) } else { None };
        // Every sampled token is checked before any request changes.
        let mut tokens = Vec::with_capacity(plan.len());
        for (row, p) in plan.iter().enumerate() {
            let token = match p.samples {
                false => None,
                true => Some(
                    u32::try_from(next[row])
                        .ok()
                        .filter(|&t| (t as usize) < vocab)
                        .ok_or_else(|| Error::InvalidArgument(format!("no token for request {} (NaN logits: sampled {})", p.id.0, next[row])))?,
                ),
            };
            tokens.push(token);
        }
        if let (true, LastStep::Decode(shape)) = (advanced, self.last_step) {
            self.decode_graphs.get_mut(&shape).unwrap().ids_on_device = Some(next.clone());
        }
        let mut out = Vec::with_capacity(ids.len());
        for (row, (p, token)) in plan.iter().zip(tokens).enumerate() {
            let a = self.active.get_mut(&p.id).unwrap();
            a.images.clear();
            let Some(token) = token else {
                // A prompt chunk that does not end the prompt: the rest waits for the next steps.
                a.pending.drain(..p.tokens.len());
                continue;
            };
            a.generated += 1;
            a.pending = vec![token];
            let finished = if self.options.eos == Some(token) {
                Some(FinishReason::Eos)
            } else if a.generated >= a.request.max_tokens {
                Some(FinishReason::MaxTokens)
            } else {
                None
            };
            if finished.is_some() {
                let seq = a.seq;
                self.active.remove(&p.id);
                self.kv.free(seq)?;
            }
            out.push(StepToken { id: p.id, token, finished, logits: logits.as_ref().map(|l| l[row * vocab..(row + 1) * vocab].to_vec()) });
        }
        Ok(out)
    }

    /// After a graph-replayed decode step and its sampling: the shape's input buffers advance on the device to the
    /// next step's (ids = the sampled tokens, positions and lengths + 1), so the next step of the same batch uploads
    /// nothing. False (nothing launched) after any other step, or when a sequence has no page for another token (the
    /// next step then uploads its new table row).
    fn advance_decode_inputs(&mut self) -> Result<bool> {
        let LastStep::Decode(shape) = self.last_step else { return Ok(false) };
        let g = self.decode_graphs.get_mut(&shape).unwrap();
        if !g.tables.lengths_can_advance() {
            return Ok(false);
        }
        ops::decode_advance(
            g.head.next.as_vector(),
            g.workspace.ids.as_vector(),
            g.workspace.positions.as_vector(),
            Some(g.slots.device_positions()?),
            Some(g.tables.device_lens()?),
        )?;
        g.tables.lengths_advanced();
        g.slots.positions_advanced();
        Ok(true)
    }

    /// Runs requests to completion, reporting each token as it comes; returns the tokens of each request.
    pub fn generate(&mut self, requests: Vec<Request>, mut on_token: impl FnMut(&StepToken)) -> Result<Vec<Vec<u32>>> {
        let ids: Vec<RequestId> = requests.into_iter().map(|r| self.add(r)).collect::<Result<_>>()?;
        let mut tokens: BTreeMap<RequestId, Vec<u32>> = ids.iter().map(|&id| (id, Vec::new())).collect();
        while self.active() > 0 {
            for t in self.step()? {
                on_token(&t);
                if let Some(list) = tokens.get_mut(&t.id) {
                    list.push(t.token);
                }
            }
        }
        Ok(ids.iter().map(|id| tokens.remove(id).unwrap_or_default()).collect())
    }

    /// Appends `tokens` to each sequence's cache and returns the f32 logits of EVERY token, `[tokens, vocab]`,
    /// in batch order: the layer-level view the tests compare with the reference.
    pub fn forward_logits(&mut self, batch: &[(SeqId, Vec<u32>)]) -> Result<Vec<f32>> {
        self.forward_device(batch, &vec![Vec::new(); batch.len()], HeadRows::All)?;
        self.head.as_ref().expect("forward_device leaves the head's rows").logits.to_vec()
    }

    /// A new empty sequence for [`Engine::forward_logits`].
    pub fn new_sequence(&mut self) -> SeqId {
        self.kv.add_sequence()
    }

    /// The experts each layer chose for every token of the last step (or [`Engine::forward_logits`] pass), read back
    /// from the device (a host round trip, only here). `Error::InvalidArgument` without
    /// `EngineOptions::record_routing`, before any pass, or after a pass that failed.
    ///
    /// ```
    /// use small4::model::engine::{DeviceModel, Engine, EngineOptions, Request, Sampling};
    /// use small4::model::synth::SyntheticModel;
    /// use small4::model::ModelConfig;
    /// use small4::quant::WeightFormat;
    ///
    /// let synthetic = SyntheticModel::new(ModelConfig { n_layers: 1, ..ModelConfig::tiny() }, WeightFormat::Bf16, 1)?;
    /// let model = DeviceModel::synthetic(&small4::device::simulator(), &synthetic)?;
    /// let mut engine = Engine::new(model, EngineOptions { record_routing: true, eos: None, ..EngineOptions::default() }, None)?;
    /// let id = engine.add(Request { prompt: vec![1, 300, 301], max_tokens: 1, sampling: Sampling::Greedy })?;
    /// engine.step()?;
    /// let routing = engine.last_routing()?;
    /// let k = synthetic.config.experts_per_token;
    /// assert_eq!(routing.of_request(id).unwrap()[0].len(), 3 * k); // layer 0: the prompt's 3 tokens
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn last_routing(&self) -> Result<StepRouting> {
        let (Some(record), Some(sequences)) = (&self.routing_record, &self.recorded_sequences) else {
            return Err(Error::InvalidArgument("no routing recorded (EngineOptions::record_routing, after a step that succeeded)".into()));
        };
        let all = record.to_vec()?;
        let per_layer = all.len() / self.model.config.n_layers;
        Ok(StepRouting {
            k: self.model.config.experts_per_token,
            sequences: sequences.clone(),
            ids: all.chunks_exact(per_layer).map(<[i32]>::to_vec).collect(),
        })
    }

    /// The workspace and head rows of the last forward pass.
    fn last_outputs(&self) -> (&Workspace, &Head) {
        match self.last_step {
            LastStep::Eager => (self.workspace.as_ref().expect("a forward pass ran"), self.head.as_ref().expect("a forward pass ran")),
            LastStep::Decode(shape) => {
                let g = &self.decode_graphs[&shape];
                (&g.workspace, &g.head)
            }
        }
    }

    /// Reserves each sequence's cache slots for its new tokens (copying shared pages first) and lays the tokens out:
    /// ids, positions, each token's batch row, and the first token of each sequence (`q_start`, one entry more).
    fn lay_out(&mut self, batch: &[(SeqId, Vec<u32>)]) -> Result<StepLayout> {
        let max_position = self.model.config.max_position;
        let mut out = StepLayout { ids: Vec::new(), positions: Vec::new(), token_seq: Vec::new(), q_start: vec![0] };
        for (s, (seq, tokens)) in batch.iter().enumerate() {
            if tokens.is_empty() {
                return Err(Error::InvalidArgument(format!("sequence {} has no new tokens", seq.0)));
            }
            let plan = self.kv.append(*seq, tokens.len())?;
            if plan.first_position + tokens.len() > max_position {
                return Err(Error::OutOfRange { what: "position".into(), index: (plan.first_position + tokens.len()) as i64, limit: max_position as i64 });
            }
            if !plan.copies.is_empty() {
                for cache in &self.caches {
                    cache.copy_pages(&plan.copies)?;
                }
            }
            out.ids.extend(tokens.iter().map(|&t| t as i32));
            out.positions.extend((0..tokens.len()).map(|j| (plan.first_position + j) as i32));
            out.token_seq.extend(std::iter::repeat_n(s as i32, tokens.len()));
            out.q_start.push(out.ids.len() as i32);
        }
        Ok(out)
    }

    /// A decode step (one new token per sequence) through the graph of its shape: the inputs are written into the
    /// shape's fixed buffers, then the recorded network is replayed (or, the first time, run eagerly; the second
    /// time, captured and replayed).
    ///
    /// `ahead[i]`: tokens sequence i may still add after this one. When its pages are full, pages for up to
    /// `DECODE_RESERVE_TOKENS` of them are taken now (after this step's own slots, so the step never fails for
    /// them), so that its block-table row, and with it the replayed graph's inputs, stays the same for many steps.
    fn decode_with_graph(&mut self, batch: &[(SeqId, Vec<u32>)], ahead: &[usize]) -> Result<()> {
        let layout = self.lay_out(batch)?;
        let seqs: Vec<SeqId> = batch.iter().map(|(s, _)| *s).collect();
        for (&seq, &more) in seqs.iter().zip(ahead) {
            if more > 0 && self.kv.capacity(seq)? <= self.kv.len(seq)? {
                self.kv.reserve(seq, more.min(DECODE_RESERVE_TOKENS))?;
            }
        }
        let mut tables = self.kv.batch_tables(&seqs)?;
        // Rows padded to a power of two of pages: one graph serves every length up to that capacity.
        let pages = tables.max_pages.next_power_of_two();
        tables.block_tables =
            tables.block_tables.chunks_exact(tables.max_pages).flat_map(|row| row.iter().copied().chain(std::iter::repeat_n(-1, pages - row.len()))).collect();
        tables.max_pages = pages;
        let shape = (batch.len(), pages);
        if !self.decode_graphs.contains_key(&shape) {
            let d = &self.model.device;
            let graph = DecodeGraph {
                workspace: Workspace::new(&self.model, batch.len())?,
                head: Head::new(&self.model, batch.len())?,
                tables: BlockTables::upload_for_capacity(d, &tables, self.kv.descriptor())?,
                layout: QueryLayout::decode(d, batch.len())?,
                slots: TokenSlots::upload(d, &layout.token_seq, &layout.positions)?,
                scratch: AttentionScratch::new(d),
                eager_runs: 0,
                graph: None,
                ids_on_device: None,
                last_used: self.steps,
            };
            // A bounded cache: the least recently used shape goes first.
            while self.decode_graphs.len() >= self.options.max_decode_graphs.max(1) {
                let Some(oldest) = self.decode_graphs.iter().min_by_key(|(_, g)| g.last_used).map(|(shape, _)| *shape) else { break };
                self.decode_graphs.remove(&oldest);
            }
            // Decode: head row s is sequence s's only token.
            graph.head.source_rows.copy_from(&(0..batch.len() as i32).collect::<Vec<_>>())?;
            self.decode_graphs.insert(shape, graph);
        }
        let g = self.decode_graphs.get_mut(&shape).unwrap();
        g.last_used = self.steps;
        // In steady decode the device already holds this step's inputs (`decode_advance` after the last step wrote
        // them): nothing is uploaded. Anything else (another batch, a new page in a table row) is written here.
        let on_device = g.ids_on_device.take().is_some_and(|ids| ids == layout.ids);
        if !(on_device && g.tables.host() == &tables && g.slots.host() == (&layout.token_seq[..], &layout.positions[..])) {
            g.tables.update(&tables)?;
            g.slots.update(&layout.token_seq, &layout.positions)?;
            g.workspace.ids.copy_from(&layout.ids)?;
            g.workspace.positions.copy_from(&layout.positions)?;
        }
        self.last_step = LastStep::Decode(shape);
        let device = self.model.device.clone();
        let net = Network {
            model: &self.model,
            caches: &self.caches,
            options: &self.options,
            collective: None,
            gather_status: &self.gather_status,
            routing_record: None,
        };
        if let Some(graph) = &g.graph {
            return device.replay(graph);
        }
        if g.eager_runs == 0 {
            // First step of this shape: sizes the attention scratch and loads every kernel.
            g.eager_runs += 1;
            return net.run(&g.workspace, &g.head, &g.tables, &g.layout, &g.slots, &mut g.scratch, None);
        }
        if device.begin_capture().is_err() {
            // A backend without graphs: this and every later step run eagerly.
            self.graphs_supported = false;
            return net.run(&g.workspace, &g.head, &g.tables, &g.layout, &g.slots, &mut g.scratch, None);
        }
        let ran = net.run(&g.workspace, &g.head, &g.tables, &g.layout, &g.slots, &mut g.scratch, None);
        // The capture is closed whatever happened inside it.
        let graph = device.end_capture();
        ran?;
        let graph = graph?;
        device.replay(&graph)?;
        g.graph = Some(graph);
        Ok(())
    }

    /// The whole network over a batch: each sequence's new tokens follow what its cache holds. Leaves in `self.head`
    /// the logits of each sequence's last token (`HeadRows::Last`, in batch order) or of every token (`All`).
    ///
    /// On a GPU the part after the host bookkeeping (from the uploads of ids/positions/tables to the logits) is what
    /// a CUDA graph captures for a decode step of a given batch size: every launch reads fixed workspace buffers,
    /// sizes come from the workspace's fixed capacity, and variable data (ids, positions, block tables, sequence
    /// lengths, the router's grouping, `num_padded`) lives in device buffers, so nothing inside waits for the host.
    fn forward_device(&mut self, batch: &[(SeqId, Vec<u32>)], images: &[Vec<PixelImage>], head_rows: HeadRows) -> Result<()> {
        let device = self.model.device.clone();
        let layout = self.lay_out(batch)?;
        let t = layout.ids.len();
        if self.workspace.as_ref().is_none_or(|w| w.tokens != t) {
            self.workspace = None;
            self.workspace = Some(Workspace::new(&self.model, t)?);
        }
        let source_rows: Vec<i32> = match head_rows {
            HeadRows::Last => layout.q_start[1..].iter().map(|&end| end - 1).collect(),
            HeadRows::All => (0..t as i32).collect(),
        };
        if self.head.as_ref().is_none_or(|h| h.rows != source_rows.len()) {
            self.head = None;
            self.head = Some(Head::new(&self.model, source_rows.len())?);
        }
        let head = self.head.as_ref().unwrap();
        head.source_rows.copy_from(&source_rows)?;
        let seqs: Vec<SeqId> = batch.iter().map(|(s, _)| *s).collect();
        let tables = BlockTables::upload(&device, &self.kv.batch_tables(&seqs)?, self.kv.descriptor())?;
        let q_layout = QueryLayout::upload(&device, &layout.q_start)?;
        let slots = TokenSlots::upload(&device, &layout.token_seq, &layout.positions)?;
        self.recorded_sequences = None;
        let record_len = self.model.config.n_layers * t * self.model.config.experts_per_token;
        if self.options.record_routing && self.routing_record.as_ref().is_none_or(|r| r.len() != record_len) {
            self.routing_record = None;
            self.routing_record = Some(DeviceBuffer::alloc(&device, record_len)?);
        }
        let ws = self.workspace.as_ref().unwrap();
        ws.ids.copy_from(&layout.ids)?;
        ws.positions.copy_from(&layout.positions)?;
        self.last_step = LastStep::Eager;
        let image_rows = self.encode_images(batch, images, &layout.q_start, t)?;
        let net = Network {
            model: &self.model,
            caches: &self.caches,
            options: &self.options,
            collective: self.collective.as_deref(),
            gather_status: &self.gather_status,
            routing_record: self.routing_record.as_ref().filter(|_| self.options.record_routing),
        };
        net.run(ws, head, &tables, &q_layout, &slots, &mut self.scratch, image_rows.as_ref().map(|(features, rows)| ImageRows { features, rows }).as_ref())?;
        if self.options.record_routing {
            self.recorded_sequences = Some(layout.q_start.windows(2).map(|w| (None, w[0] as usize..w[1] as usize)).collect());
        }
        Ok(())
    }

    /// The vision tower over every image of the batch (`images[s]` belong to sequence `s`, whose tokens start at
    /// `q_start[s]`): the features and the `[IMG]` rows of the step's `tokens` they replace. None without images.
    fn encode_images(
        &self,
        batch: &[(SeqId, Vec<u32>)],
        images: &[Vec<PixelImage>],
        q_start: &[i32],
        tokens: usize,
    ) -> Result<Option<(DeviceBuffer<bf16>, RowTargets)>> {
        if images.iter().all(|i| i.is_empty()) {
            return Ok(None);
        }
        let tower = self.model.vision.as_ref().ok_or_else(|| Error::Config("images given to a model without a vision tower".into()))?;
        let image_token = tower.config().image_token_id;
        let (mut slots, mut all) = (Vec::new(), Vec::new());
        for (s, ((_, seq_tokens), seq_images)) in batch.iter().zip(images).enumerate() {
            if !seq_images.is_empty() {
                let first = q_start[s] as usize;
                slots.extend(seq_tokens.iter().enumerate().filter(|(_, &tok)| tok == image_token).map(|(j, _)| first + j));
                all.extend(seq_images.iter().cloned());
            }
        }
        if slots.len() != tower.feature_rows(&all) {
            return Err(Error::shape("[IMG] tokens of the batch", tower.feature_rows(&all), slots.len()));
        }
        Ok(Some((tower.encode(&all)?, RowTargets::upload(&self.model.device, &slots, tokens)?)))
    }
}
