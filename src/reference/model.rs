//! The complete forward pass of the TEXT model on the CPU, in f32 over bf16-rounded weights: the oracle the GPU
//! engine is compared against.
//!
//! Per layer: `x += attn(attention_norm(x))`, `x += ffn(ffn_norm(x))`; then the final `norm` and the `output` head.
//! Attention is MLA (SPEC-model.md): `q = wq_b(q_a_norm(wq_a x))` -> per head [nope | rope];
//! `wkv_a_with_mqa x` -> [c | k_rope]; the cache row of a token is `[kv_a_norm(c) | rope(k_rope)]` (320 values);
//! q's rope part is rotated with the same interleaved YaRN RoPE at the token's position, then all of q (nope and
//! rope) is multiplied by the llama-4 query scale of that position; softmax scale `1/sqrt(qk_nope + qk_rope)`, no
//! mscale; causal. Two forms of the same attention:
//! - [`AttentionForm::Naive`]: expand `k_nope` and `v` of every cached token per head with `wkv_b` and attend
//!   (what a prefill kernel may do);
//! - [`AttentionForm::Absorbed`]: fold `W_UK` into the query (`q_lat = q_nope . W_UK`, 64 -> 256), attend over the
//!   latent cache with [`latent_attention`], then apply `W_UV` (256 -> 128) (what the paged decode kernel does).
//!
//! [`RoundingMode::Bf16Activations`] rounds to bf16 exactly where the GPU path stores a bf16 tensor:
//! the output of every RMSNorm (attention_norm, q_a_norm, kv_a_norm, ffn_norm, final norm); the outputs of
//! wq_a, wq_b (q), wkv_a_with_mqa and wo; q after RoPE and query scaling; the cache rows; the absorbed query `q_lat`
//! and `o_lat` (absorbed form) or the expanded `k_nope`/`v` (naive form); the attention output of each head
//! (before wo); the MoE (or dense FFN) block output; the residual stream after each addition. The router logits and
//! softmax stay f32 (the spec routes in fp32), the logits are f32. Each expert's SwiGLU activation
//! `silu(w1 x) * w3 x` is rounded to bf16 (the grouped GEMM stores it in bf16 between its up and down launches);
//! the expert outputs are summed in f32.
//! [`RoundingMode::F32`] rounds nothing but the weights.

use std::time::{Duration, Instant};

use std::borrow::Cow;
use std::collections::BTreeMap;

use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;

use super::attention::latent_attention;
use super::fp8_gemm;
use super::linear::{dot, round_bf16};
use super::moe::{forcing_gap, route, route_forced, routing_margin, softmax, swiglu_by, ExpertWeights, Routing};
use super::norm::rms_norm;
use super::rope::{apply_interleaved, llama4_query_scale, yarn_inv_freq};
use super::vision::{check_image_slots, PixelImage, VisionLayerWeights, VisionTower, VisionWeights};
use super::weights::{Weight, WeightMatrix, WeightSource};
use crate::kernels::gemm::dense_takes_prefill_tile;
use crate::kernels::moe::grouped_takes_prefill_tile;
use crate::model::checkpoint::ExpertMatrix;
use crate::model::{ModelConfig, VisionConfig};
use crate::{Error, Result};

/// Where activations are rounded to bf16 (see the module documentation for the exact points).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoundingMode {
    /// Only the weights are bf16; every activation stays f32.
    F32,
    /// Activations are rounded to bf16 wherever the GPU path stores them in bf16.
    Bf16Activations,
}

/// Which of the two equivalent attention computations runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionForm {
    Naive,
    Absorbed,
}

/// The MLA weights of one layer, f32, stored [out, in] as in the native checkpoint.
#[derive(Clone, Debug)]
pub struct AttentionWeights {
    /// [q_lora_rank, dim]
    pub wq_a: Vec<f32>,
    /// `[q_lora_rank]`
    pub q_a_norm: Vec<f32>,
    /// [heads * (qk_nope + qk_rope), q_lora_rank]
    pub wq_b: Vec<f32>,
    /// [kv_lora_rank + qk_rope, dim]
    pub wkv_a_with_mqa: Vec<f32>,
    /// `[kv_lora_rank]`
    pub kv_a_norm: Vec<f32>,
    /// [heads * (qk_nope + v_head), kv_lora_rank]: per head qk_nope rows of W_UK then v_head rows of W_UV.
    pub wkv_b: Vec<f32>,
    /// [dim, heads * v_head]
    pub wo: Vec<f32>,
}

/// The mixture of experts of one layer.
#[derive(Clone, Debug)]
pub struct MoeWeights {
    /// Router [experts, dim].
    pub gate: Vec<f32>,
    /// Routed experts (all present in the reference; `None` is `moe_block`'s "not on this rank").
    pub experts: Vec<Option<ExpertWeights>>,
    /// The shared experts as one SwiGLU of `expert_hidden * shared_experts`; `None` without shared experts.
    pub shared_experts: Option<ExpertWeights>,
    /// Static activation scales of the routed experts (up input, down input) from a per-tensor FP8 checkpoint
    /// (`Checkpoint::expert_activation_scales`); used when `ForwardOptions::fp8_activations`.
    pub fp8_act_scales: Option<(f32, f32)>,
}

/// The feed-forward block of one layer.
#[derive(Clone, Debug)]
pub enum FeedForward {
    /// The first `first_k_dense_replace` layers: one SwiGLU of `dense_hidden`.
    Dense(ExpertWeights),
    Moe(MoeWeights),
}

#[derive(Clone, Debug)]
pub struct LayerWeights {
    pub attention_norm: Vec<f32>,
    pub attention: AttentionWeights,
    pub ffn_norm: Vec<f32>,
    pub ffn: FeedForward,
}

/// All weights of the text model, f32 holding bf16-representable values (checkpoints are bf16).
#[derive(Clone, Debug)]
pub struct ReferenceWeights {
    pub config: ModelConfig,
    /// [vocab, dim]
    pub tok_embeddings: Vec<f32>,
    pub layers: Vec<LayerWeights>,
    /// Final norm `[dim]`.
    pub norm: Vec<f32>,
    /// Output head [vocab, dim] (a copy of the embedding when tied).
    pub output: Vec<f32>,
    /// The vision tower and projector; `None` for a text-only model or when the tower was not loaded.
    pub vision: Option<VisionWeights>,
}

/// Seeded normal values rounded to bf16.
struct WeightInit {
    rng: StdRng,
}

impl WeightInit {
    fn normal(&mut self, len: usize, std: f32) -> Vec<f32> {
        let mut values: Vec<f32> = (0..len)
            .map(|_| {
                // Box-Muller: u1 in (0, 1] so the logarithm is finite.
                let u1 = 1.0 - self.rng.random::<f64>();
                let u2 = self.rng.random::<f64>();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32 * std
            })
            .collect();
        round_bf16(&mut values);
        values
    }

    /// A linear layer [out, in] with std 1/sqrt(in): unit-variance inputs give unit-variance outputs.
    fn linear(&mut self, out_dim: usize, in_dim: usize) -> Vec<f32> {
        self.normal(out_dim * in_dim, 1.0 / (in_dim as f32).sqrt())
    }

    /// Norm weights near 1 (not exactly 1, so a kernel that ignores them fails).
    fn norm(&mut self, len: usize) -> Vec<f32> {
        let mut values: Vec<f32> = self.normal(len, 0.1).iter().map(|v| 1.0 + v).collect();
        round_bf16(&mut values);
        values
    }

    fn swiglu(&mut self, dim: usize, hidden: usize) -> ExpertWeights {
        ExpertWeights { w1: self.linear(hidden, dim), w3: self.linear(hidden, dim), w2: self.linear(dim, hidden) }
    }

    /// A tower and projector of the same scales. The adapter's biases, when configured, are small normals.
    fn vision(&mut self, v: &VisionConfig, text_dim: usize) -> VisionWeights {
        let (h, merged) = (v.hidden, v.hidden * v.spatial_merge_size * v.spatial_merge_size);
        let patch_conv = self.linear(h, v.num_channels * v.patch_size * v.patch_size);
        let ln_pre = self.norm(h);
        let layers = (0..v.n_layers)
            .map(|_| {
                let attention_norm = self.norm(h);
                let (wq, wk, wv, wo) = (self.linear(h, h), self.linear(h, h), self.linear(h, h), self.linear(h, h));
                let ffn_norm = self.norm(h);
                let ffn = self.swiglu(h, v.intermediate);
                VisionLayerWeights { attention_norm, wq, wk, wv, wo, ffn_norm, w1: ffn.w1, w3: ffn.w3, w2: ffn.w2 }
            })
            .collect();
        let pre_mm_projector_norm = self.norm(h);
        let merging_layer = self.linear(h, merged);
        let w_in = self.linear(text_dim, h);
        let w_in_bias = v.adapter_bias.then(|| self.normal(text_dim, 0.1));
        let w_out = self.linear(text_dim, text_dim);
        let w_out_bias = v.adapter_bias.then(|| self.normal(text_dim, 0.1));
        VisionWeights { patch_conv, ln_pre, layers, pre_mm_projector_norm, merging_layer, w_in, w_in_bias, w_out, w_out_bias }
    }
}

impl ReferenceWeights {
    /// Random weights for `config`, deterministic in `seed`. Scales keep activations O(1) through the layers
    /// (linear layers normal with std 1/sqrt(fan_in), norms 1 +- 0.1, unit-variance embeddings) and give logits
    /// of O(1) spread, so greedy decoding is not decided by rounding noise.
    pub fn random(config: &ModelConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        let c = config;
        let mut init = WeightInit { rng: StdRng::seed_from_u64(seed) };
        let (dim, qk, kv_rank) = (c.dim, c.qk_head_dim(), c.kv_lora_rank);
        let layers = (0..c.n_layers)
            .map(|layer| {
                let attention = AttentionWeights {
                    wq_a: init.linear(c.q_lora_rank, dim),
                    q_a_norm: init.norm(c.q_lora_rank),
                    wq_b: init.linear(c.heads * qk, c.q_lora_rank),
                    wkv_a_with_mqa: init.linear(kv_rank + c.qk_rope, dim),
                    kv_a_norm: init.norm(kv_rank),
                    wkv_b: init.linear(c.heads * (c.qk_nope + c.v_head), kv_rank),
                    wo: init.linear(dim, c.heads * c.v_head),
                };
                let ffn = if c.is_moe_layer(layer) {
                    FeedForward::Moe(MoeWeights {
                        gate: init.linear(c.experts, dim),
                        experts: (0..c.experts).map(|_| Some(init.swiglu(dim, c.expert_hidden))).collect(),
                        shared_experts: (c.shared_experts > 0).then(|| init.swiglu(dim, c.shared_hidden())),
                        fp8_act_scales: None,
                    })
                } else {
                    FeedForward::Dense(init.swiglu(dim, c.dense_hidden))
                };
                LayerWeights { attention_norm: init.norm(dim), attention, ffn_norm: init.norm(dim), ffn }
            })
            .collect();
        let tok_embeddings = init.normal(c.vocab * dim, 1.0);
        let norm = init.norm(dim);
        let output = if c.tied_embeddings { tok_embeddings.clone() } else { init.linear(c.vocab, dim) };
        // Drawn after the text weights, so a tower does not change them.
        let vision = c.vision.as_ref().map(|v| init.vision(v, dim));
        Ok(ReferenceWeights { config: c.clone(), tok_embeddings, layers, norm, output, vision })
    }
}

impl ReferenceWeights {
    /// Checks every tensor's length against the configuration (weights built elsewhere, e.g. from a checkpoint).
    pub fn check_shapes(&self) -> Result<()> {
        let c = &self.config;
        c.validate()?;
        let check = |name: String, tensor: &[f32], rows: usize, cols: usize| -> Result<()> {
            if tensor.len() == rows * cols {
                Ok(())
            } else {
                Err(Error::shape(name, format!("[{rows}, {cols}] = {} values", rows * cols), format!("{} values", tensor.len())))
            }
        };
        let swiglu = |name: &str, e: &ExpertWeights, hidden: usize| -> Result<()> {
            check(format!("{name}.w1"), &e.w1, hidden, c.dim)?;
            check(format!("{name}.w3"), &e.w3, hidden, c.dim)?;
            check(format!("{name}.w2"), &e.w2, c.dim, hidden)
        };
        check("tok_embeddings".into(), &self.tok_embeddings, c.vocab, c.dim)?;
        check("norm".into(), &self.norm, 1, c.dim)?;
        check("output".into(), &self.output, c.vocab, c.dim)?;
        match (&self.vision, &c.vision) {
            (Some(w), Some(v)) => w.check_shapes(v, c.dim)?,
            (Some(_), None) => return Err(Error::Config("vision weights given to a configuration without a vision tower".into())),
            (None, _) => {}
        }
        if self.layers.len() != c.n_layers {
            return Err(Error::shape("layers", c.n_layers, self.layers.len()));
        }
        for (l, layer) in self.layers.iter().enumerate() {
            let a = &layer.attention;
            let at = |name: &str| format!("layers.{l}.attention.{name}");
            check(format!("layers.{l}.attention_norm"), &layer.attention_norm, 1, c.dim)?;
            check(format!("layers.{l}.ffn_norm"), &layer.ffn_norm, 1, c.dim)?;
            check(at("wq_a"), &a.wq_a, c.q_lora_rank, c.dim)?;
            check(at("q_a_norm"), &a.q_a_norm, 1, c.q_lora_rank)?;
            check(at("wq_b"), &a.wq_b, c.heads * c.qk_head_dim(), c.q_lora_rank)?;
            check(at("wkv_a_with_mqa"), &a.wkv_a_with_mqa, c.kv_lora_rank + c.qk_rope, c.dim)?;
            check(at("kv_a_norm"), &a.kv_a_norm, 1, c.kv_lora_rank)?;
            check(at("wkv_b"), &a.wkv_b, c.heads * (c.qk_nope + c.v_head), c.kv_lora_rank)?;
            check(at("wo"), &a.wo, c.dim, c.heads * c.v_head)?;
            match (&layer.ffn, c.is_moe_layer(l)) {
                (FeedForward::Dense(e), false) => swiglu(&format!("layers.{l}.feed_forward"), e, c.dense_hidden)?,
                (FeedForward::Moe(moe), true) => {
                    check(format!("layers.{l}.gate"), &moe.gate, c.experts, c.dim)?;
                    if moe.experts.len() != c.experts {
                        return Err(Error::shape(format!("layers.{l}.experts"), c.experts, moe.experts.len()));
                    }
                    for (e, expert) in moe.experts.iter().enumerate() {
                        if let Some(expert) = expert {
                            swiglu(&format!("layers.{l}.experts.{e}"), expert, c.expert_hidden)?;
                        }
                    }
                    match (&moe.shared_experts, c.shared_experts) {
                        (None, 0) => {}
                        (Some(s), n) if n > 0 => swiglu(&format!("layers.{l}.shared_experts"), s, c.shared_hidden())?,
                        (s, n) => return Err(Error::shape(format!("layers.{l}.shared_experts"), n, usize::from(s.is_some()))),
                    }
                }
                (_, moe) => {
                    let want = if moe { "an MoE" } else { "a dense FFN" };
                    return Err(Error::shape(format!("layers.{l} feed-forward"), want, "the other kind"));
                }
            }
        }
        Ok(())
    }
}

/// The latent KV cache of ONE sequence: per layer, `kv_lora_rank + qk_rope` values per token
/// ([kv_a_norm(c) | rope(k_rope)]), contiguous in token order.
#[derive(Clone, Debug)]
pub struct ReferenceKvCache {
    width: usize,
    start_position: usize,
    tokens: usize,
    layers: Vec<Vec<f32>>,
    /// Per cached token, the smallest `routing_margin` over the MoE layers.
    router_margins: Vec<f32>,
    /// Per cached token, the largest `forcing_gap` over the MoE layers (0 for tokens the router routed itself).
    forced_gaps: Vec<f32>,
}

impl ReferenceKvCache {
    /// An empty cache whose first token will be at position 0.
    pub fn new(config: &ModelConfig) -> Self {
        Self::starting_at(config, 0)
    }

    /// An empty cache whose first token will be at `start_position`: the positions (RoPE angles, llama-4 query
    /// scale) of a long context without computing thousands of tokens before it.
    pub fn starting_at(config: &ModelConfig, start_position: usize) -> Self {
        ReferenceKvCache {
            width: config.mla_dims().cache_width(),
            start_position,
            tokens: 0,
            layers: vec![Vec::new(); config.n_layers],
            router_margins: Vec::new(),
            forced_gaps: Vec::new(),
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// The position the next token will get.
    pub fn next_position(&self) -> usize {
        self.start_position + self.tokens
    }

    /// Per cached token, in order: the smallest gap over the MoE layers between its k-th and (k+1)-th router logits
    /// (`moe::routing_margin`; infinite without MoE layers). Where it is within a computation's noise, that
    /// computation may route the token to other experts.
    pub fn router_margins(&self) -> &[f32] {
        &self.router_margins
    }

    /// Per cached token, in order: how far the experts forced on it ([`ReferenceModel::forward_routed`]) were from
    /// this model's own choice, the largest `moe::forcing_gap` over the MoE layers in router-logit units (0 where
    /// they were its own choice, and for tokens run by [`ReferenceModel::forward`]). A teacher-forced comparison
    /// bounds it by the router logits' noise: a larger gap is a wrong routing, not a near-tie.
    pub fn forced_gaps(&self) -> &[f32] {
        &self.forced_gaps
    }

    /// The rows of layer `layer`: [len, width].
    pub fn layer(&self, layer: usize) -> &[f32] {
        &self.layers[layer]
    }

    pub fn width(&self) -> usize {
        self.width
    }
}

/// Options of the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardOptions {
    pub rounding: RoundingMode,
    pub attention: AttentionForm,
    /// Routed experts in W8A8 (`moe_block_w8a8`) with each layer's `MoeWeights::fp8_act_scales`, as the engine's
    /// `EngineOptions::fp8_activations` runs them.
    pub fp8_activations: bool,
    /// The inputs of the per-token linears (wq_a, wkv_a_with_mqa, wq_b, wo, the routed, shared and dense SwiGLU
    /// matrices; not the per-head absorption, the router or the head) quantised to e4m3 with one scale per row and
    /// 128 columns (`fp8_gemm::quantize_act_block128`, the kernel's quantiser) wherever the engine's
    /// `PrefillGemm::WgmmaFp8Act` runs them on the fp8 tensor cores: K a multiple of 128 and a pass of enough tokens
    /// for the prefill tile (`kernels::gemm::dense_takes_prefill_tile`, `kernels::moe::grouped_takes_prefill_tile`). Only for fp8 checkpoints (the
    /// weights here are dequantised: the caller knows their format).
    pub prefill_fp8_act: bool,
}

impl Default for ForwardOptions {
    /// What the GPU decode path computes: bf16 activations, absorbed attention.
    fn default() -> Self {
        ForwardOptions { rounding: RoundingMode::Bf16Activations, attention: AttentionForm::Absorbed, fp8_activations: false, prefill_fp8_act: false }
    }
}

/// Timings of a greedy generation.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

impl GenerationStats {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_time.as_secs_f64()
    }

    /// Decode steps are all generated tokens but the first (which the prefill's logits produce); 0 without any.
    pub fn decode_steps(&self) -> usize {
        self.generated.len().saturating_sub(1)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        match self.decode_steps() {
            0 => 0.0,
            steps => steps as f64 / self.decode_time.as_secs_f64(),
        }
    }
}

/// The reference model: a weight source (in memory, a checkpoint read in place, or a generated model; see
/// [`super::weights`]), precomputed RoPE frequencies, and the forward options. One forward pass for every source:
/// it reads one layer's weights at a time, and of the routed experts only those some token routes to.
pub struct ReferenceModel<W: WeightSource = ReferenceWeights> {
    weights: W,
    options: ForwardOptions,
    inv_freq: Vec<f32>,
    /// Per layer, the W8A8 activation scales of the routed experts (filled when `options.fp8_activations`).
    fp8_act_scales: Vec<Option<(f32, f32)>>,
}

impl<W: WeightSource> ReferenceModel<W> {
    /// Fails with a typed error when the source's checks fail (the in-memory weights: a weight's shape does not
    /// match the configuration) or, with `fp8_activations`, when an MoE layer has no activation scales.
    pub fn new(weights: W, options: ForwardOptions) -> Result<Self> {
        weights.check()?;
        let c = weights.config();
        let mut fp8_act_scales = vec![None; c.n_layers];
        if options.fp8_activations {
            for (layer, scales) in fp8_act_scales.iter_mut().enumerate().filter(|(l, _)| c.is_moe_layer(*l)) {
                *scales = weights.expert_activation_scales(layer)?;
                if scales.is_none() {
                    return Err(Error::InvalidArgument(format!("fp8 activations: MoE layer {layer} has no activation scales")));
                }
            }
        }
        let inv_freq = yarn_inv_freq(c.qk_rope, &c.yarn());
        Ok(ReferenceModel { weights, options, inv_freq, fp8_act_scales })
    }

    pub fn config(&self) -> &ModelConfig {
        self.weights.config()
    }

    pub fn weights(&self) -> &W {
        &self.weights
    }

    pub fn options(&self) -> ForwardOptions {
        self.options
    }

    pub fn new_cache(&self) -> ReferenceKvCache {
        ReferenceKvCache::new(self.config())
    }

    /// Runs `tokens` after what `cache` holds, appends their cache rows, and returns their logits [tokens, vocab].
    pub fn forward(&self, tokens: &[u32], cache: &mut ReferenceKvCache) -> Result<Vec<f32>> {
        self.forward_with_images(tokens, &[], cache)
    }

    /// The features of `images` in the text width, one `[IMG]`-count x dim block per image (the vision tower and
    /// projector of [`super::vision`]).
    pub fn encode_images(&self, images: &[PixelImage]) -> Result<Vec<Vec<f32>>> {
        let c = self.config();
        let (Some(config), Some(weights)) = (&c.vision, self.weights.vision()?) else {
            return Err(no_vision_tower());
        };
        let tower = VisionTower { weights: &weights, config, text_dim: c.dim, round_bf16: self.options.rounding == RoundingMode::Bf16Activations };
        tower.encode(images)
    }

    /// [`Self::forward`] where the `[IMG]` tokens take the features of `images`, in order: image `i`'s features
    /// replace the embeddings of its `feature_count` `[IMG]` tokens (`[IMG_BREAK]` / `[IMG_END]` stay text
    /// tokens). Positions stay 1-D: every token, image or text, takes the next position. Without images the
    /// `[IMG]` tokens embed as any token (a decode step feeding back a generated `[IMG]`); the generation entry points
    /// refuse a prompt with `[IMG]` tokens and no images (`check_image_slots`). A weight that cannot be read fails
    /// the pass and leaves `cache` as it was.
    pub fn forward_with_images(&self, tokens: &[u32], images: &[PixelImage], cache: &mut ReferenceKvCache) -> Result<Vec<f32>> {
        self.forward_checked(tokens, images, None, cache)
    }

    /// [`Self::forward`] with the routed experts of every MoE layer given instead of chosen: `routing[layer]` holds
    /// `[tokens, k]` expert ids (an entry of a dense layer is ignored). Teacher forcing with another computation's
    /// routing (the engine's `StepRouting`): where its router logits and these part at a near-tie of the k-th and
    /// (k+1)-th expert, both then run the same experts, and their logits stay comparable. The experts' weights are
    /// this model's (`moe::route_forced`: its softmax over all experts, the given experts' probabilities
    /// renormalised), and the cache records how far the given experts were from its own choice
    /// ([`ReferenceKvCache::forced_gaps`]). `Error::Shape` when `routing` does not hold `n_layers` entries of
    /// `tokens.len() * k` ids (MoE layers), errors of `route_forced` for bad ids; the cache is then unchanged.
    ///
    /// ```
    /// use small4::model::ModelConfig;
    /// use small4::reference::model::{ForwardOptions, ReferenceModel, ReferenceWeights};
    ///
    /// let config = ModelConfig { n_layers: 1, ..ModelConfig::tiny() };
    /// let model = ReferenceModel::new(ReferenceWeights::random(&config, 1)?, ForwardOptions::default())?;
    /// let (mut own, mut forced) = (model.new_cache(), model.new_cache());
    /// let logits = model.forward(&[1, 2], &mut own)?;
    /// // Forced to expert 0..k for both tokens: other logits, and a gap unless that was the router's choice.
    /// let ids: Vec<i32> = (0..2).flat_map(|_| 0..config.experts_per_token as i32).collect();
    /// let forced_logits = model.forward_routed(&[1, 2], &[ids], &mut forced)?;
    /// assert_eq!(forced_logits.len(), logits.len());
    /// assert_eq!(forced.forced_gaps().len(), 2);
    /// assert!(model.forward_routed(&[3], &[vec![0]], &mut forced).is_err()); // one id, k expected
    /// assert_eq!(forced.len(), 2);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn forward_routed(&self, tokens: &[u32], routing: &[Vec<i32>], cache: &mut ReferenceKvCache) -> Result<Vec<f32>> {
        let c = self.config();
        if routing.len() != c.n_layers {
            return Err(Error::shape("forced routing layers", c.n_layers, routing.len()));
        }
        for (layer, ids) in routing.iter().enumerate().filter(|(l, _)| c.is_moe_layer(*l)) {
            if ids.len() != tokens.len() * c.experts_per_token {
                return Err(Error::shape(format!("forced routing of layer {layer} [tokens, k]"), tokens.len() * c.experts_per_token, ids.len()));
            }
        }
        self.forward_checked(tokens, &[], Some(routing), cache)
    }

    /// The checks of [`Self::forward_with_images`], then the layers (the MoE layers routed by `forced` when given);
    /// the cache is unchanged when the pass fails.
    fn forward_checked(&self, tokens: &[u32], images: &[PixelImage], forced: Option<&[Vec<i32>]>, cache: &mut ReferenceKvCache) -> Result<Vec<f32>> {
        let c = self.config();
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("forward: no tokens".into()));
        }
        if cache.layers.len() != c.n_layers || cache.width != c.mla_dims().cache_width() {
            return Err(Error::shape(
                "KV cache",
                format!("{} layers of width {}", c.n_layers, c.mla_dims().cache_width()),
                format!("{} layers of width {}", cache.layers.len(), cache.width),
            ));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.vocab) {
            return Err(Error::OutOfRange { what: "token id".into(), index: bad as i64, limit: c.vocab as i64 });
        }
        let last_position = cache.next_position() + tokens.len() - 1;
        if last_position >= c.max_position {
            return Err(Error::OutOfRange { what: "position".into(), index: last_position as i64, limit: c.max_position as i64 });
        }
        let cached_rows: Vec<usize> = cache.layers.iter().map(Vec::len).collect();
        let logits = self.run_layers(tokens, images, forced, cache);
        match logits {
            Ok(_) => cache.tokens += tokens.len(),
            Err(_) => cache.layers.iter_mut().zip(cached_rows).for_each(|(rows, len)| rows.truncate(len)),
        }
        logits
    }

    /// The body of [`Self::forward_with_images`] after its checks: embeddings, the layers, the head.
    fn run_layers(&self, tokens: &[u32], images: &[PixelImage], forced: Option<&[Vec<i32>]>, cache: &mut ReferenceKvCache) -> Result<Vec<f32>> {
        let c = self.config();
        let dim = c.dim;
        let embeddings = self.weights.matrix(Weight::TokEmbeddings)?;
        let mut x = Vec::with_capacity(tokens.len() * dim);
        for &t in tokens {
            x.extend_from_slice(&embeddings.rows_f32(t as usize..t as usize + 1)?);
        }
        drop(embeddings);
        if !images.is_empty() {
            // Checked before the tower runs: each image fills one [IMG] per merged patch.
            check_image_slots(c.vision.as_ref(), tokens, images)?;
            let image_token = c.vision.as_ref().ok_or_else(no_vision_tower)?.image_token_id;
            let slots: Vec<usize> = tokens.iter().enumerate().filter(|(_, &t)| t == image_token).map(|(i, _)| i).collect();
            let features = self.encode_images(images)?;
            for (&slot, row) in slots.iter().zip(features.iter().flat_map(|f| f.chunks_exact(dim))) {
                x[slot * dim..][..dim].copy_from_slice(row);
            }
        }
        let mut margins = vec![f32::INFINITY; tokens.len()];
        let mut gaps = vec![0f32; tokens.len()];
        for layer in 0..c.n_layers {
            let h = self.norm(&x, &self.weights.vector(Weight::AttentionNorm(layer))?);
            let attn = self.attention(&h, layer, &mut cache.layers[layer], cache.tokens, cache.start_position)?;
            self.residual_add(&mut x, &attn);
            let h = self.norm(&x, &self.weights.vector(Weight::FfnNorm(layer))?);
            let routing = RouterNotes { forced: forced.map(|f| &f[layer][..]), margins: &mut margins, gaps: &mut gaps };
            let ffn = self.feed_forward(&h, layer, tokens.len(), routing)?;
            self.residual_add(&mut x, &ffn);
        }
        let h = self.norm(&x, &self.weights.vector(Weight::Norm)?);
        let logits = self.weights.matrix(Weight::Output)?.matmul(&h)?;
        cache.router_margins.extend(margins);
        cache.forced_gaps.extend(gaps);
        Ok(logits)
    }

    /// The prompt in one pass; returns the logits of every prompt position.
    pub fn prefill(&self, prompt: &[u32], cache: &mut ReferenceKvCache) -> Result<Vec<f32>> {
        self.forward(prompt, cache)
    }

    /// One decode step; returns the logits `[vocab]` of the next token.
    pub fn decode(&self, token: u32, cache: &mut ReferenceKvCache) -> Result<Vec<f32>> {
        self.forward(&[token], cache)
    }

    /// Greedy decoding: prefill `prompt`, then `max_tokens` tokens, each reported to `on_token` as it comes.
    pub fn generate_greedy(&self, prompt: &[u32], max_tokens: usize, on_token: impl FnMut(u32)) -> Result<GenerationStats> {
        self.generate_greedy_images_until(prompt, &[], max_tokens, None, on_token)
    }

    /// [`Self::generate_greedy`] with the prompt's `[IMG]` tokens taking the features of `images` (see
    /// [`Self::forward_with_images`]).
    pub fn generate_greedy_with_images(&self, prompt: &[u32], images: &[PixelImage], max_tokens: usize, on_token: impl FnMut(u32)) -> Result<GenerationStats> {
        self.generate_greedy_images_until(prompt, images, max_tokens, None, on_token)
    }

    /// [`ReferenceModel::generate_greedy`] that also stops after `eos` (which is reported and kept) when given.
    pub fn generate_greedy_until(&self, prompt: &[u32], max_tokens: usize, eos: Option<u32>, on_token: impl FnMut(u32)) -> Result<GenerationStats> {
        self.generate_greedy_images_until(prompt, &[], max_tokens, eos, on_token)
    }

    /// Greedy generation with images (may be none) that stops after `max_tokens` or after `eos` when given.
    pub fn generate_greedy_images_until(
        &self,
        prompt: &[u32],
        images: &[PixelImage],
        max_tokens: usize,
        eos: Option<u32>,
        mut on_token: impl FnMut(u32),
    ) -> Result<GenerationStats> {
        let vocab = self.config().vocab;
        // The prompt's [IMG] tokens must match the images (none without images): a decode step may feed a generated
        // [IMG] back as text, a prompt may not.
        check_image_slots(self.config().vision.as_ref(), prompt, images)?;
        let mut cache = self.new_cache();
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            generated: Vec::with_capacity(max_tokens),
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        };
        if max_tokens == 0 {
            return Ok(stats);
        }
        let start = Instant::now();
        let logits = self.forward_with_images(prompt, images, &mut cache)?;
        stats.prefill_time = start.elapsed();
        let mut next = argmax(&logits[logits.len() - vocab..]);
        stats.generated.push(next);
        on_token(next);
        let start = Instant::now();
        while stats.generated.len() < max_tokens && Some(next) != eos {
            next = argmax(&self.decode(next, &mut cache)?);
            stats.generated.push(next);
            on_token(next);
        }
        stats.decode_time = start.elapsed();
        Ok(stats)
    }

    fn store_bf16(&self, values: &mut [f32]) {
        if self.options.rounding == RoundingMode::Bf16Activations {
            round_bf16(values);
        }
    }

    fn norm(&self, x: &[f32], weight: &[f32]) -> Vec<f32> {
        let mut y = rms_norm(x, weight, self.config().norm_eps);
        self.store_bf16(&mut y);
        y
    }

    /// `x W^T` stored as the GPU path stores a linear layer's output.
    fn linear(&self, x: &[f32], w: &WeightMatrix) -> Result<Vec<f32>> {
        let mut y = w.matmul(x)?;
        self.store_bf16(&mut y);
        Ok(y)
    }

    /// `x` [rows, `k`] as the GEMM reading it sees it: quantised 1x128 to e4m3 and back
    /// ([`ForwardOptions::prefill_fp8_act`]) when that option is on, `prefill_tile` (the launch takes the prefill
    /// tile) and `k` holds whole 128-column blocks; `x` itself otherwise.
    fn gemm_input<'a>(&self, x: &'a [f32], k: usize, prefill_tile: bool) -> Result<Cow<'a, [f32]>> {
        if !(self.options.prefill_fp8_act && prefill_tile && k % fp8_gemm::BLOCK == 0) {
            return Ok(Cow::Borrowed(x));
        }
        Ok(Cow::Owned(fp8_gemm::quantize_act_block128(x, x.len() / k, k)?.values()))
    }

    /// [`Self::linear`] of a per-token linear, its input as [`Self::gemm_input`] gives it for a dense launch.
    fn token_linear(&self, x: &[f32], w: &WeightMatrix) -> Result<Vec<f32>> {
        let rows = x.len() / w.cols.max(1);
        self.linear(&self.gemm_input(x, w.cols, dense_takes_prefill_tile(rows))?, w)
    }

    fn residual_add(&self, x: &mut [f32], delta: &[f32]) {
        for (a, d) in x.iter_mut().zip(delta) {
            *a += d;
        }
        self.store_bf16(x);
    }

    /// MLA attention of the new tokens `h` [T, dim] in `layer`; appends their rows to `cache_rows` (which holds
    /// `cached` tokens, the first at `start_position`). Returns wo's output [T, dim].
    fn attention(&self, h: &[f32], layer: usize, cache_rows: &mut Vec<f32>, cached: usize, start_position: usize) -> Result<Vec<f32>> {
        let c = self.config();
        let w = &self.weights;
        let dims = c.mla_dims();
        let (heads, nope, rope, rank, width) = (c.heads, c.qk_nope, c.qk_rope, c.kv_lora_rank, dims.cache_width());
        let qk = nope + rope;
        let t = h.len() / c.dim;
        let positions: Vec<usize> = (0..t).map(|i| start_position + cached + i).collect();

        // Query: wq_b(q_a_norm(wq_a h)), then RoPE on the rope part and the llama-4 scale on all of it.
        let q_a = self.token_linear(h, &w.matrix(Weight::WqA(layer))?)?;
        let q_a = self.norm(&q_a, &w.vector(Weight::QaNorm(layer))?);
        let mut q = self.token_linear(&q_a, &w.matrix(Weight::WqB(layer))?)?;
        q.par_chunks_mut(heads * qk).zip(&positions).for_each(|(q_token, &pos)| {
            let scale = llama4_query_scale(pos, c.llama4_beta, c.llama4_original_max_position);
            for q_head in q_token.chunks_exact_mut(qk) {
                apply_interleaved(&mut q_head[nope..], &self.inv_freq, pos);
                q_head.iter_mut().for_each(|v| *v *= scale);
            }
        });
        self.store_bf16(&mut q);

        // Cache rows: [kv_a_norm(c) | rope(k_rope)].
        let kv = self.token_linear(h, &w.matrix(Weight::WkvA(layer))?)?;
        let kv_a_norm = w.vector(Weight::KvaNorm(layer))?;
        for (row, &pos) in kv.chunks_exact(width).zip(&positions) {
            let mut latent = self.norm(&row[..rank], &kv_a_norm);
            let mut k_rope = row[rank..].to_vec();
            apply_interleaved(&mut k_rope, &self.inv_freq, pos);
            latent.extend_from_slice(&k_rope);
            self.store_bf16(&mut latent);
            cache_rows.extend_from_slice(&latent);
        }
        let query_rows: Vec<usize> = (cached..cached + t).collect();

        let wkv_b = w.matrix(Weight::WkvB(layer))?;
        let mut out = match self.options.attention {
            AttentionForm::Naive => self.naive_attention(&q, &wkv_b, cache_rows, &query_rows)?,
            AttentionForm::Absorbed => self.absorbed_attention(&q, &wkv_b.to_f32()?, cache_rows, &query_rows),
        };
        drop(wkv_b);
        self.store_bf16(&mut out);
        self.token_linear(&out, &w.matrix(Weight::Wo(layer))?)
    }

    /// Expands `k_nope` and `v` of every cached token per head with wkv_b, then standard causal attention.
    /// `q` [T, heads, nope + rope] (roped and scaled); returns [T, heads * v_head].
    fn naive_attention(&self, q: &[f32], wkv_b: &WeightMatrix, cache_rows: &[f32], query_rows: &[usize]) -> Result<Vec<f32>> {
        let c = self.config();
        let (heads, nope, rope, rank, v_head) = (c.heads, c.qk_nope, c.qk_rope, c.kv_lora_rank, c.v_head);
        let (qk, kv_per_head, width) = (nope + rope, nope + v_head, rank + rope);
        let latents: Vec<f32> = cache_rows.chunks_exact(width).flat_map(|row| &row[..rank]).copied().collect();
        // [kv_tokens, heads, nope + v_head]
        let kv = self.linear(&latents, wkv_b)?;
        let scale = c.softmax_scale();
        let mut out = vec![0.0f32; query_rows.len() * heads * v_head];
        out.par_chunks_mut(v_head).enumerate().for_each(|(index, o)| {
            let (i, head) = (index / heads, index % heads);
            let q_head = &q[(i * heads + head) * qk..][..qk];
            let scores: Vec<f32> = (0..=query_rows[i])
                .map(|j| {
                    let k_nope = &kv[(j * heads + head) * kv_per_head..][..nope];
                    let k_rope = &cache_rows[j * width + rank..][..rope];
                    (dot(&q_head[..nope], k_nope) + dot(&q_head[nope..], k_rope)) * scale
                })
                .collect();
            for (j, p) in softmax(&scores).into_iter().enumerate() {
                let v = &kv[(j * heads + head) * kv_per_head + nope..][..v_head];
                for (acc, &value) in o.iter_mut().zip(v) {
                    *acc += p * value;
                }
            }
        });
        Ok(out)
    }

    /// Absorbed form: `q_lat = q_nope . W_UK` per head, latent attention over the cache, `out = W_UV . o_lat`.
    fn absorbed_attention(&self, q: &[f32], wkv_b: &[f32], cache_rows: &[f32], query_rows: &[usize]) -> Vec<f32> {
        let c = self.config();
        let (heads, nope, rope, rank, v_head) = (c.heads, c.qk_nope, c.qk_rope, c.kv_lora_rank, c.v_head);
        let (qk, kv_per_head) = (nope + rope, nope + v_head);
        let t = query_rows.len();
        let mut q_lat = vec![0.0f32; t * heads * rank];
        q_lat.par_chunks_mut(rank).enumerate().for_each(|(index, lat)| {
            let head = index % heads;
            let q_nope = &q[index * qk..][..nope];
            // W_UK_h is [nope, rank]: q_lat = sum_d q_nope[d] * W_UK_h[d, :].
            for (d, &qd) in q_nope.iter().enumerate() {
                let w_row = &wkv_b[(head * kv_per_head + d) * rank..][..rank];
                for (acc, &wv) in lat.iter_mut().zip(w_row) {
                    *acc += qd * wv;
                }
            }
        });
        self.store_bf16(&mut q_lat);
        let q_rope: Vec<f32> = q.chunks_exact(qk).flat_map(|q_head| &q_head[nope..]).copied().collect();
        let mut o_lat = latent_attention(&q_lat, &q_rope, cache_rows, query_rows, &c.mla_dims(), c.softmax_scale());
        self.store_bf16(&mut o_lat);
        let mut out = vec![0.0f32; t * heads * v_head];
        out.par_chunks_mut(v_head).enumerate().for_each(|(index, o)| {
            let head = index % heads;
            let lat = &o_lat[index * rank..][..rank];
            // W_UV_h is [v_head, rank]: out[d] = W_UV_h[d, :] . o_lat.
            for (d, od) in o.iter_mut().enumerate() {
                *od = dot(&wkv_b[(head * kv_per_head + nope + d) * rank..][..rank], lat);
            }
        });
        out
    }

    /// The feed-forward block of `layer` on `h` [tokens, dim]: the dense SwiGLU, or the router (or the experts
    /// `notes.forced`), the routed experts and the shared experts; lowers each token's entry of `notes.margins` to its
    /// routing margin in this layer and raises its `notes.gaps` to its forcing gap.
    fn feed_forward(&self, h: &[f32], layer: usize, tokens: usize, notes: RouterNotes) -> Result<Vec<f32>> {
        let c = self.config();
        let act_bf16 = self.options.rounding == RoundingMode::Bf16Activations;
        let mut y = if c.is_moe_layer(layer) {
            let (experts, k) = (c.experts, c.experts_per_token);
            let logits = self.weights.matrix(Weight::Router(layer))?.matmul(h)?;
            let routing = match notes.forced {
                None => route(&logits, experts, k, c.routed_scale),
                Some(ids) => {
                    for ((gap, row), forced) in notes.gaps.iter_mut().zip(logits.chunks_exact(experts)).zip(ids.chunks_exact(k)) {
                        *gap = gap.max(forcing_gap(row, forced));
                    }
                    route_forced(&logits, experts, ids, k, c.routed_scale)?
                }
            };
            for (margin, row) in notes.margins.iter_mut().zip(logits.chunks_exact(experts)) {
                *margin = margin.min(routing_margin(row, k));
            }
            let scales = self.fp8_act_scales[layer].filter(|_| self.options.fp8_activations);
            let mut y = self.routed_experts(h, layer, &routing, tokens, act_bf16, scales)?;
            // The shared block's width is expert_hidden * shared_experts, so it runs beside the routed experts.
            if c.shared_experts > 0 {
                // The engine runs the shared expert apart, as dense launches over the tokens, when the routed experts take
                // the prefill tile; with fewer pairs it usually rides in their narrow decode launches (a pass of 33 to
                // 32 * experts / k tokens whose shared expert is packed apart is not modelled here).
                let prefill_tile = dense_takes_prefill_tile(tokens) && grouped_takes_prefill_tile(tokens, k, experts);
                let shared = self.swiglu(h, act_bf16, None, prefill_tile, |which| Weight::SharedExperts(layer, which))?;
                y.iter_mut().zip(&shared).for_each(|(a, b)| *a += b);
            }
            y
        } else {
            self.swiglu(h, act_bf16, None, dense_takes_prefill_tile(tokens), |which| Weight::DenseFfn(layer, which))?
        };
        self.store_bf16(&mut y);
        Ok(y)
    }

    /// The SwiGLU of `x` over the three matrices `weight(W1 | W3 | W2)` of the source ([`swiglu_by`]); each
    /// projection's bf16 input as [`Self::gemm_input`] gives it when its launch takes the prefill tile (W8A8's e4m3
    /// inputs stay as they are).
    fn swiglu(
        &self,
        x: &[f32],
        act_bf16: bool,
        act_scales: Option<(f32, f32)>,
        prefill_tile: bool,
        weight: impl Fn(ExpertMatrix) -> Weight,
    ) -> Result<Vec<f32>> {
        swiglu_by(x, act_bf16, act_scales, |which, input| {
            let w = self.weights.matrix(weight(which))?;
            w.matmul(&self.gemm_input(input, w.cols, prefill_tile && act_scales.is_none())?)
        })
    }

    /// `sum_k w_k * expert_k(x)` per token, each expert's weights read once for all the tokens routed to it (experts
    /// in parallel) and the contributions added per token in routing order, as `moe::moe_block_with` adds them.
    /// Experts no token routes to are not touched; absent experts (`WeightSource::has_expert`) are skipped.
    fn routed_experts(&self, h: &[f32], layer: usize, routing: &Routing, tokens: usize, act_bf16: bool, act_scales: Option<(f32, f32)>) -> Result<Vec<f32>> {
        let (dim, k) = (self.config().dim, routing.k);
        let prefill_tile = grouped_takes_prefill_tile(tokens, k, self.config().experts);
        // Pair p = t * k + j, grouped by expert in increasing p.
        let mut pairs_of: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (p, &id) in routing.ids.iter().enumerate() {
            if let Ok(expert) = usize::try_from(id) {
                if self.weights.has_expert(layer, expert) {
                    pairs_of.entry(expert).or_default().push(p);
                }
            }
        }
        let outputs: Vec<(Vec<usize>, Vec<f32>)> = pairs_of
            .into_par_iter()
            .map(|(expert, pairs)| {
                let x: Vec<f32> = pairs.iter().flat_map(|&p| &h[p / k * dim..][..dim]).copied().collect();
                let y = self.swiglu(&x, act_bf16, act_scales, prefill_tile, |which| Weight::Expert { layer, expert, which })?;
                Ok((pairs, y))
            })
            .collect::<Result<_>>()?;
        let mut pair_rows: Vec<Option<&[f32]>> = vec![None; tokens * k];
        for (pairs, y) in &outputs {
            for (&p, row) in pairs.iter().zip(y.chunks_exact(dim)) {
                pair_rows[p] = Some(row);
            }
        }
        let mut out = vec![0.0f32; tokens * dim];
        for (p, row) in pair_rows.iter().enumerate() {
            if let Some(row) = row {
                let w = routing.weights[p];
                for (o, v) in out[p / k * dim..][..dim].iter_mut().zip(*row) {
                    *o += w * v;
                }
            }
        }
        Ok(out)
    }
}

/// What the router of one MoE layer takes and notes per token: the experts to force (None: its own top-k), the
/// smallest routing margin so far, the largest forcing gap so far.
struct RouterNotes<'a> {
    forced: Option<&'a [i32]>,
    margins: &'a mut [f32],
    gaps: &'a mut [f32],
}

fn no_vision_tower() -> Error {
    Error::Config("this model has no vision tower (its configuration or checkpoint has none)".into())
}

/// Index of the largest logit, the lower index among equals.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
