//! The model configuration: every number the forward pass needs, parsed from a native Mistral `params.json` or a
//! Hugging Face `config.json` (mistral3 with a `text_config`, or a text-only mistral4), plus two built-in presets:
//! the real Mistral Small 4 and a tiny model of the same architecture for tests and the demo.
//!
//! Softmax scale: always `1/sqrt(qk_nope + qk_rope)`, with no YaRN mscale and no scaling of cos/sin
//! (params.json `yarn.apply_scale = false`). Hugging Face's `Mistral4` applies `(0.1 ln(factor) + 1)^2` to the scale
//! whenever `rope_parameters.mscale_all_dim` is present (its converter always writes 1.0): that is not what the model
//! was trained with, so this loader IGNORES `mscale_all_dim`, `mscale` and `attention_factor` (SPEC-model.md).
//!
//! The presets, what they derive, and a configuration read back from a file:
//!
//! ```
//! use small4::model::config::{ActiveParams, ParamCounts};
//! use small4::model::{synthetic, ModelConfig, VisionConfig};
//!
//! let big = ModelConfig::mistral_small_4();
//! big.validate()?;
//! assert_eq!(big.qk_head_dim(), 64 + 64);
//! let mla = big.mla_dims(); // what the attention kernels are specialised on
//! assert_eq!((mla.heads, mla.kv_lora_rank, mla.qk_rope, mla.v_head), (32, 256, 64, 128));
//! assert!((0..big.n_layers).all(|l| big.is_moe_layer(l))); // first_k_dense_replace = 0
//!
//! // About 119B parameters in all, about 6.6B read per token (4 of 128 experts).
//! let counts: ParamCounts = big.param_counts();
//! assert_eq!(counts.total(), counts.embedding + counts.attention + counts.router + counts.routed_experts
//!     + counts.shared_experts + counts.dense_ffn + counts.norms + counts.head);
//! assert_eq!(counts.total() / 1_000_000_000, 118); // 118.x B: the text model alone
//! let active: ActiveParams = big.active_params();
//! assert_eq!(active.with_embedding_and_head - active.core, 2 * 131_072 * 4096); // embedding + untied head
//! assert_eq!(active.with_embedding_and_head / 100_000_000, 66);
//! assert!(big.vision_param_count() > 400_000_000); // the tower and projector come on top
//!
//! // The tiny preset: same head geometry, a few layers, a small tower.
//! let mut tiny = ModelConfig::tiny();
//! let tower: &VisionConfig = tiny.vision.as_ref().unwrap();
//! tower.validate()?;
//! assert_eq!(tiny.vision_param_count(), tower.param_count(tiny.dim));
//! // A dense first layer: its FFN is counted as dense, not as experts.
//! tiny.first_k_dense_replace = 1;
//! assert!(!tiny.is_moe_layer(0) && tiny.is_moe_layer(1));
//! assert_eq!(tiny.param_counts().dense_ffn, 3 * 256 * 512);
//!
//! // validate() catches what the kernels cannot run, on the text model and on the tower.
//! assert!(ModelConfig { qk_rope: 63, ..ModelConfig::tiny() }.validate().is_err()); // RoPE rotates pairs
//! let bad_tower = VisionConfig { head_dim: 30, ..tower.clone() }; // 2 heads x 30 != hidden 128
//! assert!(bad_tower.validate().is_err());
//!
//! // from_file reads params.json (or config.json) and names the file in its errors.
//! use small4::Error;
//! let dir = std::env::temp_dir().join(format!("small4-config-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
//! let path = dir.join("params.json");
//! std::fs::write(&path, synthetic::params_json(&ModelConfig::tiny()).to_string()).map_err(|e| Error::io(&path, e))?;
//! assert_eq!(ModelConfig::from_file(&path)?, ModelConfig::tiny());
//! assert!(matches!(ModelConfig::from_file(dir.join("missing.json")), Err(Error::Io { .. })));
//! std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
//! # Ok::<(), small4::Error>(())
//! ```

use std::path::Path;

use serde_json::{Map, Value};

use crate::reference::attention::MlaDims;
use crate::reference::rope::YarnParams;
use crate::{Error, Result};

/// The vision tower (Pixtral style) and its projector into the text model.
///
/// Read from params.json's `vision_encoder` object, or from config.json's `vision_config` (the tower) and root (the
/// projector and image token); the key names below are params.json's, then config.json's where they differ.
#[derive(Clone, Debug, PartialEq)]
pub struct VisionConfig {
    /// Tower width: `hidden_size`.
    pub hidden: usize,
    /// Tower layers: `num_hidden_layers`.
    pub n_layers: usize,
    /// Attention heads per tower layer: `num_attention_heads`.
    pub heads: usize,
    /// Per-head width: `head_dim`, default `hidden / heads`. A multiple of 4 (2D RoPE).
    pub head_dim: usize,
    /// Width of each tower layer's SwiGLU FFN: `intermediate_size`.
    pub intermediate: usize,
    /// Side of a square patch in pixels: `patch_size` (14 for Pixtral).
    pub patch_size: usize,
    /// Input channels: `num_channels`, default 3 (RGB).
    pub num_channels: usize,
    /// Largest image side in pixels the tower is configured for: `image_size`.
    pub image_size: usize,
    /// 2D RoPE base of the tower: `rope_theta`.
    pub rope_theta: f32,
    /// RMSNorm epsilon of the tower: `norm_eps` / `rms_norm_eps`, default 1e-5 (Pixtral's).
    pub norm_eps: f32,
    /// Patches merged per side by the patch merger (2 -> 2x2 unfold): `spatial_merge_size` (config.json: at the
    /// root), default 1.
    pub spatial_merge_size: usize,
    /// The `[IMG]` placeholder token each merged patch replaces: `image_token_id` / root `image_token_index`,
    /// default 10.
    pub image_token_id: u32,
    /// The `[IMG_BREAK]` token ending each row of patches: `image_break_token_id` (config.json has none: 12).
    pub image_break_token_id: u32,
    /// The `[IMG_END]` token ending an image: `image_end_token_id` (config.json has none: 13).
    pub image_end_token_id: u32,
    /// Whether the two adapter linears have biases: `adapter_bias` / root `multimodal_projector_bias`, default false.
    pub adapter_bias: bool,
}

/// The text decoder (and optional vision tower) of a Mistral Small 4 style model.
///
/// Each field names the key it is read from: params.json's first, then config.json's (`text_config`, or the root of
/// a text-only mistral4) where it differs. Parsing validates the result ([`ModelConfig::validate`]).
///
/// ```
/// use small4::model::ModelConfig;
///
/// let params = r#"{
///     "dim": 256, "n_layers": 4, "n_heads": 4, "norm_eps": 1e-06, "vocab_size": 2048, "rope_theta": 10000.0,
///     "q_lora_rank": 128, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 128,
///     "max_position_embeddings": 1048576,
///     "moe": {"num_experts": 16, "num_experts_per_tok": 4, "expert_hidden_dim": 128, "num_shared_experts": 1},
///     "yarn": {"factor": 128.0, "original_max_position_embeddings": 8192, "beta": 32.0, "alpha": 1.0},
///     "llama_4_scaling": {"beta": 0.1, "original_max_position_embeddings": 8192}
/// }"#;
/// let config = ModelConfig::from_json_str(params)?;
/// assert_eq!((config.dim, config.n_layers, config.heads, config.vocab), (256, 4, 4, 2048));
/// assert_eq!((config.experts, config.experts_per_token, config.shared_hidden()), (16, 4, 128));
/// assert_eq!(config.routed_scale, 1.0); // absent: the default
/// assert_eq!(config.first_k_dense_replace, 0); // every layer is MoE
/// assert!(config.vision.is_none()); // no `vision_encoder`
/// assert_eq!(config.softmax_scale(), 1.0 / 128f32.sqrt());
///
/// // top-k above the expert count is refused with a typed error
/// let bad = params.replace(r#""num_experts_per_tok": 4"#, r#""num_experts_per_tok": 17"#);
/// assert!(matches!(ModelConfig::from_json_str(&bad), Err(small4::Error::Config(_))));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    /// Model width (residual stream): `dim` / `hidden_size`.
    pub dim: usize,
    /// Decoder layers: `n_layers` / `num_hidden_layers`.
    pub n_layers: usize,
    /// Attention heads: `n_heads` / `num_attention_heads` (a KV head count, if given, must equal it: MLA has no GQA).
    pub heads: usize,
    /// Rank of the query's low-rank compression (`wq_a` output width): `q_lora_rank`.
    pub q_lora_rank: usize,
    /// Rank of the compressed KV latent, the width cached per token besides the rope key: `kv_lora_rank`.
    pub kv_lora_rank: usize,
    /// Per-head query/key dimensions without RoPE: `qk_nope_head_dim`.
    pub qk_nope: usize,
    /// Per-head query/key dimensions with RoPE (shared across heads for the key): `qk_rope_head_dim`. Even.
    pub qk_rope: usize,
    /// Per-head value dimension: `v_head_dim`.
    pub v_head: usize,
    /// Vocabulary size (embedding and head rows): `vocab_size`. Fits 32-bit token ids.
    pub vocab: usize,
    /// RMSNorm epsilon of the text model: `norm_eps` / `rms_norm_eps`.
    pub norm_eps: f32,
    /// Routed experts per MoE layer: `moe.num_experts` / `n_routed_experts`.
    pub experts: usize,
    /// Routed experts chosen per token (top-k): `moe.num_experts_per_tok` / `num_experts_per_tok`.
    pub experts_per_token: usize,
    /// Hidden size of each routed expert; a shared expert block has `expert_hidden * shared_experts`.
    /// `moe.expert_hidden_dim` / `moe_intermediate_size`.
    pub expert_hidden: usize,
    /// Shared experts, run for every token: `moe.num_shared_experts` / `n_shared_experts`, default 0.
    pub shared_experts: usize,
    /// Factor on the routed experts' weighted sum: `moe.routed_scale` / `routed_scaling_factor`, default 1.0.
    pub routed_scale: f32,
    /// The first `first_k_dense_replace` layers use a dense SwiGLU FFN of `dense_hidden` instead of the MoE.
    /// `moe.first_k_dense_replace` / `first_k_dense_replace`, default 0.
    pub first_k_dense_replace: usize,
    /// Hidden size of the dense FFN layers: `hidden_dim` / `intermediate_size` (required only when there are dense
    /// layers, else default 0).
    pub dense_hidden: usize,
    /// RoPE base: `rope_theta` (config.json: in `rope_parameters`, or at the top level beside `rope_scaling`).
    pub rope_theta: f32,
    /// YaRN context-extension factor: `yarn.factor` / `rope_parameters.factor`.
    pub yarn_factor: f32,
    /// The context YaRN extends from: `yarn.original_max_position_embeddings` / the same key in `rope_parameters`.
    pub yarn_original_max_position: usize,
    /// YaRN's fast boundary: `yarn.beta` / `rope_parameters.beta_fast`.
    pub yarn_beta_fast: f32,
    /// YaRN's slow boundary: `yarn.alpha` / `rope_parameters.beta_slow`.
    pub yarn_beta_slow: f32,
    /// Beta of the llama-4 query scaling, queries times `1 + beta * ln(1 + floor(pos / original_max))`:
    /// `llama_4_scaling.beta` / `rope_parameters.llama_4_scaling_beta`, default 0 (off) in config.json.
    pub llama4_beta: f32,
    /// `original_max` of the llama-4 query scaling, in tokens: `llama_4_scaling.original_max_position_embeddings`
    /// (config.json: YaRN's original context).
    pub llama4_original_max_position: usize,
    /// Longest context in tokens: `max_position_embeddings`.
    pub max_position: usize,
    /// Whether the output head is the embedding table: `tied_embeddings` / `tie_word_embeddings`, default false.
    pub tied_embeddings: bool,
    /// The vision tower: params.json `vision_encoder` / config.json `vision_config`; `None` for a text-only model.
    pub vision: Option<VisionConfig>,
}

/// Parameter counts of the text model, per component.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParamCounts {
    /// The token embedding table, `vocab * dim`.
    pub embedding: u64,
    /// wq_a, wq_b, wkv_a_with_mqa, wkv_b, wo of every layer (their q_a_norm / kv_a_norm are in `norms`).
    pub attention: u64,
    /// Router gates.
    pub router: u64,
    /// Every routed expert's w1, w2, w3 in every MoE layer.
    pub routed_experts: u64,
    /// The shared-expert blocks of every MoE layer.
    pub shared_experts: u64,
    /// Dense FFNs of the first `first_k_dense_replace` layers.
    pub dense_ffn: u64,
    /// attention_norm, ffn_norm, q_a_norm, kv_a_norm of every layer and the final norm.
    pub norms: u64,
    /// The output head; 0 when tied to the embedding.
    pub head: u64,
}

impl ParamCounts {
    /// The sum over components: the text model's parameter count (the vision tower is not included).
    pub fn total(&self) -> u64 {
        self.embedding + self.attention + self.router + self.routed_experts + self.shared_experts + self.dense_ffn + self.norms + self.head
    }
}

/// Parameters one token reads in a forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveParams {
    /// Attention, norms, router, top-k routed experts, shared experts, dense FFNs.
    pub core: u64,
    /// `core` plus one embedding row's table and the output head, as model cards count them.
    pub with_embedding_and_head: u64,
}

impl ModelConfig {
    /// Mistral Small 4 (119B): the values of SPEC-model.md.
    pub fn mistral_small_4() -> Self {
        ModelConfig {
            dim: 4096,
            n_layers: 36,
            heads: 32,
            q_lora_rank: 1024,
            kv_lora_rank: 256,
            qk_nope: 64,
            qk_rope: 64,
            v_head: 128,
            vocab: 131072,
            norm_eps: 1e-6,
            experts: 128,
            experts_per_token: 4,
            expert_hidden: 2048,
            shared_experts: 1,
            routed_scale: 1.0,
            first_k_dense_replace: 0,
            dense_hidden: 12288,
            rope_theta: 1e4,
            yarn_factor: 128.0,
            yarn_original_max_position: 8192,
            yarn_beta_fast: 32.0,
            yarn_beta_slow: 1.0,
            llama4_beta: 0.1,
            llama4_original_max_position: 8192,
            max_position: 1_048_576,
            tied_embeddings: false,
            vision: Some(VisionConfig {
                hidden: 1024,
                n_layers: 24,
                heads: 16,
                head_dim: 64,
                intermediate: 4096,
                patch_size: 14,
                num_channels: 3,
                image_size: 1540,
                rope_theta: 1e4,
                norm_eps: 1e-5,
                spatial_merge_size: 2,
                image_token_id: 10,
                image_break_token_id: 12,
                image_end_token_id: 13,
                adapter_bias: false,
            }),
        }
    }

    /// A tiny model of the same architecture. It keeps the real attention head geometry (64 nope + 64 rope, v 128,
    /// latent 256) because the kernels are specialised on it, and the real norm, YaRN and llama-4 constants.
    pub fn tiny() -> Self {
        ModelConfig {
            dim: 256,
            n_layers: 4,
            heads: 4,
            q_lora_rank: 128,
            kv_lora_rank: 256,
            experts: 16,
            experts_per_token: 4,
            expert_hidden: 128,
            shared_experts: 1,
            dense_hidden: 512,
            vocab: 2048,
            // A small tower of the real geometry per head (64) and the real patch, merge and image size, so the
            // tokenizer's image grid holds for it.
            vision: Some(VisionConfig { hidden: 128, n_layers: 2, heads: 2, head_dim: 64, intermediate: 256, ..Self::mistral_small_4().vision.unwrap() }),
            ..Self::mistral_small_4()
        }
    }

    /// Reads `params.json` or `config.json` (the layout is recognised from the keys). `Error::Io` when the file
    /// cannot be read; otherwise as [`ModelConfig::from_json_str`], with the path prefixed to `Error::Config` messages.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text).map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            other => other,
        })
    }

    /// Parses a native `params.json` (has `dim`) or a HF `config.json` (has `text_config` or `hidden_size`).
    /// `Error::Config` naming the key for invalid JSON, a missing or mistyped key, an unsupported feature (YaRN
    /// `apply_scale`, GQA, group-limited routing, non-interleaved RoPE, a non-yarn rope type, a non-mistral4 text
    /// model) or values [`ModelConfig::validate`] rejects.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        let Value::Object(root) = &value else {
            return Err(Error::Config("the configuration must be a JSON object".into()));
        };
        let config = if root.contains_key("dim") {
            Self::from_native(&Obj::root(root, "params.json"))?
        } else if root.contains_key("text_config") || root.contains_key("hidden_size") {
            Self::from_hf(&Obj::root(root, "config.json"))?
        } else {
            return Err(Error::Config("neither a native params.json (no `dim`) nor a HF config.json (no `text_config` / `hidden_size`)".into()));
        };
        config.validate()?;
        Ok(config)
    }

    fn from_native(p: &Obj) -> Result<Self> {
        let moe = p.obj("moe")?;
        let yarn = p.obj("yarn")?;
        if yarn.opt_bool("apply_scale")?.unwrap_or(false) {
            return Err(p.bad("yarn.apply_scale", "true is not supported: Mistral Small 4 uses no YaRN mscale"));
        }
        let llama4 = p.obj("llama_4_scaling")?;
        let heads = p.usize("n_heads")?;
        if let Some(kv_heads) = p.opt_usize("n_kv_heads")? {
            if kv_heads != heads {
                return Err(p.bad("n_kv_heads", format!("{kv_heads} differs from n_heads {heads}: MLA has no GQA")));
            }
        }
        let (qk_nope, qk_rope) = (p.usize("qk_nope_head_dim")?, p.usize("qk_rope_head_dim")?);
        if let Some(head_dim) = p.opt_usize("head_dim")? {
            if head_dim != qk_nope + qk_rope {
                return Err(p.bad("head_dim", format!("{head_dim} is not qk_nope_head_dim + qk_rope_head_dim = {}", qk_nope + qk_rope)));
            }
        }
        let first_k_dense_replace = moe.opt_usize("first_k_dense_replace")?.unwrap_or(0);
        Ok(ModelConfig {
            dim: p.usize("dim")?,
            n_layers: p.usize("n_layers")?,
            heads,
            q_lora_rank: p.usize("q_lora_rank")?,
            kv_lora_rank: p.usize("kv_lora_rank")?,
            qk_nope,
            qk_rope,
            v_head: p.usize("v_head_dim")?,
            vocab: p.usize("vocab_size")?,
            norm_eps: p.f32("norm_eps")?,
            experts: moe.usize("num_experts")?,
            experts_per_token: moe.usize("num_experts_per_tok")?,
            expert_hidden: moe.usize("expert_hidden_dim")?,
            shared_experts: moe.opt_usize("num_shared_experts")?.unwrap_or(0),
            routed_scale: moe.opt_f32("routed_scale")?.unwrap_or(1.0),
            first_k_dense_replace,
            dense_hidden: if first_k_dense_replace > 0 { p.usize("hidden_dim")? } else { p.opt_usize("hidden_dim")?.unwrap_or(0) },
            rope_theta: p.f32("rope_theta")?,
            yarn_factor: yarn.f32("factor")?,
            yarn_original_max_position: yarn.usize("original_max_position_embeddings")?,
            // Mistral's names: `beta` is beta_fast, `alpha` is beta_slow.
            yarn_beta_fast: yarn.f32("beta")?,
            yarn_beta_slow: yarn.f32("alpha")?,
            llama4_beta: llama4.f32("beta")?,
            llama4_original_max_position: llama4.usize("original_max_position_embeddings")?,
            max_position: p.usize("max_position_embeddings")?,
            tied_embeddings: p.opt_bool("tied_embeddings")?.unwrap_or(false),
            vision: match p.opt_obj("vision_encoder")? {
                Some(v) => Some(VisionConfig::from_native(&v)?),
                None => None,
            },
        })
    }

    fn from_hf(root: &Obj) -> Result<Self> {
        let (t, vision) = match root.opt_obj("text_config")? {
            Some(text) => (text, root.opt_obj("vision_config")?),
            None => (root.clone(), None),
        };
        if let Some(model_type) = t.opt_str("model_type")? {
            if model_type != "mistral4" {
                return Err(t.bad("model_type", format!("{model_type:?} is not a mistral4 text model")));
            }
        }
        let heads = t.usize("num_attention_heads")?;
        if let Some(kv_heads) = t.opt_usize("num_key_value_heads")? {
            if kv_heads != heads {
                return Err(t.bad("num_key_value_heads", format!("{kv_heads} differs from num_attention_heads {heads}: MLA has no GQA")));
            }
        }
        // Group-limited routing (DeepSeek-V3) is not part of this model: groups may only be present if they restrict nothing.
        let n_group = t.opt_usize("n_group")?.unwrap_or(1);
        let topk_group = t.opt_usize("topk_group")?.unwrap_or(n_group);
        if topk_group < n_group {
            return Err(t.bad("topk_group", format!("{topk_group} of {n_group} groups: group-limited routing is not supported")));
        }
        if t.opt_bool("norm_topk_prob")? == Some(false) {
            return Err(t.bad("norm_topk_prob", "false is not supported: the router renormalises its top-k weights"));
        }
        if t.opt_bool("rope_interleave")? == Some(false) {
            return Err(t.bad("rope_interleave", "false is not supported: the checkpoints use interleaved-pair RoPE"));
        }
        // transformers >= 5 writes `rope_parameters`, older versions `rope_scaling` (+ a top-level `rope_theta`).
        let rope = match t.opt_obj("rope_parameters")? {
            Some(r) => r,
            None => t.obj("rope_scaling")?,
        };
        if let Some(kind) = rope.opt_str("rope_type")?.or(rope.opt_str("type")?) {
            if kind != "yarn" {
                return Err(rope.bad("rope_type", format!("{kind:?}: only \"yarn\" is supported")));
            }
        }
        let rope_theta = match rope.opt_f32("rope_theta")? {
            Some(theta) => theta,
            None => t.f32("rope_theta")?,
        };
        let yarn_original = rope.usize("original_max_position_embeddings")?;
        let first_k_dense_replace = t.opt_usize("first_k_dense_replace")?.unwrap_or(0);
        let dim = t.usize("hidden_size")?;
        Ok(ModelConfig {
            dim,
            n_layers: t.usize("num_hidden_layers")?,
            heads,
            q_lora_rank: t.usize("q_lora_rank")?,
            kv_lora_rank: t.usize("kv_lora_rank")?,
            qk_nope: t.usize("qk_nope_head_dim")?,
            qk_rope: t.usize("qk_rope_head_dim")?,
            v_head: t.usize("v_head_dim")?,
            vocab: t.usize("vocab_size")?,
            norm_eps: t.f32("rms_norm_eps")?,
            experts: t.usize("n_routed_experts")?,
            experts_per_token: t.usize("num_experts_per_tok")?,
            expert_hidden: t.usize("moe_intermediate_size")?,
            shared_experts: t.opt_usize("n_shared_experts")?.unwrap_or(0),
            routed_scale: t.opt_f32("routed_scaling_factor")?.unwrap_or(1.0),
            first_k_dense_replace,
            dense_hidden: if first_k_dense_replace > 0 { t.usize("intermediate_size")? } else { t.opt_usize("intermediate_size")?.unwrap_or(0) },
            rope_theta,
            yarn_factor: rope.f32("factor")?,
            yarn_original_max_position: yarn_original,
            yarn_beta_fast: rope.f32("beta_fast")?,
            yarn_beta_slow: rope.f32("beta_slow")?,
            // HF keeps one `original_max_position_embeddings` for YaRN and the llama-4 query scaling.
            llama4_beta: rope.opt_f32("llama_4_scaling_beta")?.unwrap_or(0.0),
            llama4_original_max_position: yarn_original,
            max_position: t.usize("max_position_embeddings")?,
            tied_embeddings: t.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            vision: match vision {
                Some(v) => Some(VisionConfig::from_hf(&v, root)?),
                None => None,
            },
        })
    }

    /// Rejects values the forward pass cannot run with, as `Error::Config`: zero sizes, top-k above the expert count,
    /// odd `qk_rope`, more dense layers than layers, non-positive or non-finite eps / scale / theta, YaRN betas out of
    /// order, a vocabulary beyond 32-bit ids, and an invalid vision tower.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("dim", self.dim),
            ("n_layers", self.n_layers),
            ("heads", self.heads),
            ("q_lora_rank", self.q_lora_rank),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope", self.qk_nope),
            ("qk_rope", self.qk_rope),
            ("v_head", self.v_head),
            ("vocab", self.vocab),
            ("experts", self.experts),
            ("experts_per_token", self.experts_per_token),
            ("expert_hidden", self.expert_hidden),
            ("yarn_original_max_position", self.yarn_original_max_position),
            ("llama4_original_max_position", self.llama4_original_max_position),
            ("max_position", self.max_position),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        let bad = |msg: String| Err(Error::Config(msg));
        if self.experts_per_token > self.experts {
            return bad(format!("experts_per_token {} exceeds the {} experts", self.experts_per_token, self.experts));
        }
        if self.qk_rope % 2 != 0 {
            return bad(format!("qk_rope {} must be even: RoPE rotates pairs", self.qk_rope));
        }
        if self.first_k_dense_replace > self.n_layers {
            return bad(format!("first_k_dense_replace {} exceeds n_layers {}", self.first_k_dense_replace, self.n_layers));
        }
        if self.first_k_dense_replace > 0 && self.dense_hidden == 0 {
            return bad("dense layers need a positive dense hidden size".into());
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad(format!("norm_eps {} must be positive and finite", self.norm_eps));
        }
        if !(self.routed_scale.is_finite() && self.routed_scale > 0.0) {
            return bad(format!("routed_scale {} must be positive and finite", self.routed_scale));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta {} must be finite and above 1", self.rope_theta));
        }
        if !(self.yarn_factor.is_finite() && self.yarn_factor >= 1.0) {
            return bad(format!("YaRN factor {} must be finite and at least 1", self.yarn_factor));
        }
        if !(self.yarn_beta_slow > 0.0 && self.yarn_beta_fast > self.yarn_beta_slow && self.yarn_beta_fast.is_finite()) {
            return bad(format!("YaRN needs 0 < beta_slow < beta_fast, got {} and {}", self.yarn_beta_slow, self.yarn_beta_fast));
        }
        if !(self.llama4_beta.is_finite() && self.llama4_beta >= 0.0) {
            return bad(format!("llama-4 scaling beta {} must be finite and non-negative", self.llama4_beta));
        }
        if u32::try_from(self.vocab).is_err() {
            return bad(format!("vocab {} does not fit token ids of 32 bits", self.vocab));
        }
        if let Some(v) = &self.vision {
            v.validate()?;
        }
        Ok(())
    }

    /// The attention dimensions the MLA kernels and reference take.
    pub fn mla_dims(&self) -> MlaDims {
        MlaDims { heads: self.heads, kv_lora_rank: self.kv_lora_rank, qk_nope: self.qk_nope, qk_rope: self.qk_rope, v_head: self.v_head }
    }

    /// Query/key head dimension (nope + rope).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope + self.qk_rope
    }

    /// `1/sqrt(qk_nope + qk_rope)`: no YaRN mscale (see the module documentation).
    pub fn softmax_scale(&self) -> f32 {
        1.0 / (self.qk_head_dim() as f32).sqrt()
    }

    /// The YaRN RoPE parameters (theta, factor, original context, betas) the cos/sin tables are built from.
    pub fn yarn(&self) -> YarnParams {
        YarnParams {
            theta: self.rope_theta,
            factor: self.yarn_factor,
            original_max_position: self.yarn_original_max_position,
            beta_fast: self.yarn_beta_fast,
            beta_slow: self.yarn_beta_slow,
        }
    }

    /// Hidden size of the shared-expert block (the shared experts act as one SwiGLU of this width).
    pub fn shared_hidden(&self) -> usize {
        self.expert_hidden * self.shared_experts
    }

    /// Whether layer `layer` uses the MoE (else a dense FFN).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        layer >= self.first_k_dense_replace
    }

    fn attention_matrices_per_layer(&self) -> u64 {
        let (d, h) = (self.dim as u64, self.heads as u64);
        let (q, kv, nope, rope, v) = (self.q_lora_rank as u64, self.kv_lora_rank as u64, self.qk_nope as u64, self.qk_rope as u64, self.v_head as u64);
        q * d + h * (nope + rope) * q + (kv + rope) * d + h * (nope + v) * kv + d * h * v
    }

    fn swiglu(&self, hidden: usize) -> u64 {
        3 * self.dim as u64 * hidden as u64
    }

    /// Parameters of the text model per component.
    pub fn param_counts(&self) -> ParamCounts {
        let (d, layers) = (self.dim as u64, self.n_layers as u64);
        let moe_layers = (self.n_layers - self.first_k_dense_replace) as u64;
        let dense_layers = self.first_k_dense_replace as u64;
        ParamCounts {
            embedding: self.vocab as u64 * d,
            attention: layers * self.attention_matrices_per_layer(),
            router: moe_layers * self.experts as u64 * d,
            routed_experts: moe_layers * self.experts as u64 * self.swiglu(self.expert_hidden),
            shared_experts: moe_layers * self.swiglu(self.shared_hidden()),
            dense_ffn: dense_layers * self.swiglu(self.dense_hidden),
            norms: layers * (2 * d + (self.q_lora_rank + self.kv_lora_rank) as u64) + d,
            head: if self.tied_embeddings { 0 } else { self.vocab as u64 * d },
        }
    }

    /// Parameters one token reads: routed experts count `experts_per_token` of `experts`.
    pub fn active_params(&self) -> ActiveParams {
        let c = self.param_counts();
        let moe_layers = (self.n_layers - self.first_k_dense_replace) as u64;
        let active_routed = moe_layers * self.experts_per_token as u64 * self.swiglu(self.expert_hidden);
        let core = c.attention + c.router + active_routed + c.shared_experts + c.dense_ffn + c.norms;
        let head = if self.tied_embeddings { c.embedding } else { c.head };
        ActiveParams { core, with_embedding_and_head: core + c.embedding + head }
    }

    /// Parameters of the vision tower and projector (0 without one).
    pub fn vision_param_count(&self) -> u64 {
        self.vision.as_ref().map_or(0, |v| v.param_count(self.dim))
    }
}

impl VisionConfig {
    fn from_native(v: &Obj) -> Result<Self> {
        let hidden = v.usize("hidden_size")?;
        let heads = v.usize("num_attention_heads")?;
        Ok(VisionConfig {
            hidden,
            n_layers: v.usize("num_hidden_layers")?,
            heads,
            head_dim: v.opt_usize("head_dim")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
            intermediate: v.usize("intermediate_size")?,
            patch_size: v.usize("patch_size")?,
            num_channels: v.opt_usize("num_channels")?.unwrap_or(3),
            image_size: v.usize("image_size")?,
            rope_theta: v.f32("rope_theta")?,
            norm_eps: v.opt_f32("norm_eps")?.unwrap_or(PIXTRAL_NORM_EPS),
            spatial_merge_size: v.opt_usize("spatial_merge_size")?.unwrap_or(1),
            image_token_id: v.u32("image_token_id")?,
            image_break_token_id: v.u32("image_break_token_id")?,
            image_end_token_id: v.u32("image_end_token_id")?,
            adapter_bias: v.opt_bool("adapter_bias")?.unwrap_or(false),
        })
    }

    /// HF keeps the tower in `vision_config` and the projector and image token at the root. The break and end token
    /// ids live in the processor files, not config.json: they default to tekken's `[IMG_BREAK]` 12 and `[IMG_END]` 13.
    /// The tower's RoPE base is `vision_config.rope_theta` or `vision_config.rope_parameters.rope_theta`; a
    /// `hidden_act` other than `silu` or a `vision_feature_layer` other than -1 is an `Error::Config`.
    fn from_hf(v: &Obj, root: &Obj) -> Result<Self> {
        let hidden = v.usize("hidden_size")?;
        let heads = v.usize("num_attention_heads")?;
        if let Some(act) = root.opt_str("projector_hidden_act")? {
            if act != "gelu" {
                return Err(root.bad("projector_hidden_act", format!("{act:?}: only \"gelu\" is supported")));
            }
        }
        // Settings the tower does not implement are refused, not computed as something else.
        if let Some(act) = v.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(v.bad("hidden_act", format!("{act:?}: only \"silu\" is supported (the tower's SwiGLU feed-forward)")));
            }
        }
        match root.get("vision_feature_layer") {
            None => {}
            Some(Value::Number(n)) if n.as_i64() == Some(-1) => {}
            Some(other) => return Err(root.bad("vision_feature_layer", format!("{other}: only -1 (the last layer's output) is supported"))),
        }
        // transformers < 5 writes `rope_theta` in the tower's config; 5.x and its Mistral4 converter only
        // `rope_parameters: {rope_theta, rope_type: "axial"}` (Pixtral's 2D RoPE either way).
        let rope_theta = match (v.opt_f32("rope_theta")?, v.opt_obj("rope_parameters")?) {
            (theta, Some(rope)) => {
                if let Some(kind) = rope.opt_str("rope_type")? {
                    if kind != "axial" && kind != "default" {
                        return Err(rope.bad("rope_type", format!("{kind:?}: the tower's RoPE is 2D (\"axial\")")));
                    }
                }
                match (theta, rope.opt_f32("rope_theta")?) {
                    (Some(top), Some(inner)) if top != inner => {
                        return Err(rope.bad("rope_theta", format!("{inner} differs from vision_config.rope_theta {top}")));
                    }
                    (_, Some(inner)) => inner,
                    (Some(top), None) => top,
                    (None, None) => return Err(rope.missing("rope_theta")),
                }
            }
            (Some(theta), None) => theta,
            (None, None) => return Err(v.missing("rope_theta")),
        };
        Ok(VisionConfig {
            hidden,
            n_layers: v.usize("num_hidden_layers")?,
            heads,
            head_dim: v.opt_usize("head_dim")?.unwrap_or(hidden.checked_div(heads).unwrap_or(0)),
            intermediate: v.usize("intermediate_size")?,
            patch_size: v.usize("patch_size")?,
            num_channels: v.opt_usize("num_channels")?.unwrap_or(3),
            image_size: v.usize("image_size")?,
            rope_theta,
            norm_eps: v.opt_f32("rms_norm_eps")?.unwrap_or(PIXTRAL_NORM_EPS),
            spatial_merge_size: root.opt_usize("spatial_merge_size")?.unwrap_or(1),
            image_token_id: root.opt_u32("image_token_index")?.unwrap_or(10),
            image_break_token_id: 12,
            image_end_token_id: 13,
            adapter_bias: root.opt_bool("multimodal_projector_bias")?.unwrap_or(false),
        })
    }

    /// Rejects a tower the kernels cannot run, as `Error::Config`: zero sizes, `heads * head_dim != hidden`, a
    /// `head_dim` not a multiple of 4, a non-positive or non-finite `norm_eps`.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("vision hidden", self.hidden),
            ("vision n_layers", self.n_layers),
            ("vision heads", self.heads),
            ("vision head_dim", self.head_dim),
            ("vision intermediate", self.intermediate),
            ("vision patch_size", self.patch_size),
            ("vision num_channels", self.num_channels),
            ("vision image_size", self.image_size),
            ("vision spatial_merge_size", self.spatial_merge_size),
        ] {
            if value == 0 {
                return Err(Error::Config(format!("{name} must be positive")));
            }
        }
        if self.heads * self.head_dim != self.hidden {
            return Err(Error::Config(format!("vision heads {} x head_dim {} is not hidden {}", self.heads, self.head_dim, self.hidden)));
        }
        if self.head_dim % 4 != 0 {
            return Err(Error::Config(format!("vision head_dim {} must be a multiple of 4 for 2D RoPE", self.head_dim)));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::Config(format!("vision norm_eps {} must be positive and finite", self.norm_eps)));
        }
        Ok(())
    }

    /// Tower (patch conv, ln_pre, layers) plus projector (pre-projector norm, patch merger, two-layer adapter into `text_dim`).
    pub fn param_count(&self, text_dim: usize) -> u64 {
        let (h, i, t) = (self.hidden as u64, self.intermediate as u64, text_dim as u64);
        let merged = h * (self.spatial_merge_size * self.spatial_merge_size) as u64;
        let patch_conv = h * self.num_channels as u64 * (self.patch_size * self.patch_size) as u64;
        let layer = 4 * h * h + 3 * h * i + 2 * h;
        let bias = |n: u64| if self.adapter_bias { n } else { 0 };
        let projector = h + merged * h + (h * t + bias(t)) + (t * t + bias(t));
        patch_conv + h + self.n_layers as u64 * layer + projector
    }
}

/// Pixtral's RMSNorm eps when a config does not say.
const PIXTRAL_NORM_EPS: f32 = 1e-5;

/// A JSON object with its path in the document, for error messages that name the key.
#[derive(Clone)]
struct Obj<'a> {
    map: &'a Map<String, Value>,
    file: &'static str,
    /// Dotted path of this object inside the document, ending with a dot (empty at the root).
    prefix: String,
}

impl<'a> Obj<'a> {
    fn root(map: &'a Map<String, Value>, file: &'static str) -> Self {
        Obj { map, file, prefix: String::new() }
    }

    fn key_path(&self, key: &str) -> String {
        format!("{}: `{}{key}`", self.file, self.prefix)
    }

    fn bad(&self, key: &str, why: impl std::fmt::Display) -> Error {
        Error::Config(format!("{}: {why}", self.key_path(key)))
    }

    fn missing(&self, key: &str) -> Error {
        Error::Config(format!("{}: missing", self.key_path(key)))
    }

    /// The value, with JSON `null` read as absent.
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn opt_obj(&self, key: &str) -> Result<Option<Obj<'a>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Obj { map, file: self.file, prefix: format!("{}{key}.", self.prefix) })),
            Some(other) => Err(self.bad(key, format!("expected an object, got {other}"))),
        }
    }

    fn obj(&self, key: &str) -> Result<Obj<'a>> {
        self.opt_obj(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            // Some writers store integers as floats (`8192.0`): accept whole numbers.
            Some(Value::Number(n)) => {
                let as_int = n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0 && f.fract() == 0.0 && *f < 2f64.powi(53)).map(|f| f as u64));
                match as_int.and_then(|v| usize::try_from(v).ok()) {
                    Some(v) => Ok(Some(v)),
                    None => Err(self.bad(key, format!("expected a non-negative integer, got {n}"))),
                }
            }
            Some(other) => Err(self.bad(key, format!("expected a non-negative integer, got {other}"))),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        match self.opt_usize(key)? {
            None => Ok(None),
            Some(v) => u32::try_from(v).map(Some).map_err(|_| self.bad(key, format!("{v} does not fit 32 bits"))),
        }
    }

    fn u32(&self, key: &str) -> Result<u32> {
        self.opt_u32(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if f.is_finite() => Ok(Some(f as f32)),
                _ => Err(self.bad(key, format!("expected a finite number, got {n}"))),
            },
            Some(other) => Err(self.bad(key, format!("expected a number, got {other}"))),
        }
    }

    fn f32(&self, key: &str) -> Result<f32> {
        self.opt_f32(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(self.bad(key, format!("expected true or false, got {other}"))),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(self.bad(key, format!("expected a string, got {other}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_real_preset_counts_118_97b_text_parameters() {
        let c = ModelConfig::mistral_small_4();
        c.validate().unwrap();
        let p = c.param_counts();
        assert_eq!(p.total(), 118_972_826_624);
        assert_eq!((p.total() as f64 / 1e9 * 100.0).round() / 100.0, 118.97);
        assert_eq!(p.embedding, 131072 * 4096);
        assert_eq!(p.head, p.embedding);
        assert_eq!(p.routed_experts, 36 * 128 * 3 * 2048 * 4096);
        let active = c.active_params();
        assert_eq!((active.core as f64 / 1e7).round() / 100.0, 5.56);
        assert_eq!((active.with_embedding_and_head as f64 / 1e7).round() / 100.0, 6.63);
        // SPEC-model.md: vision 0.43B, total ~119.4B.
        assert_eq!((c.vision_param_count() as f64 / 1e7).round() / 100.0, 0.43);
        assert_eq!(((p.total() + c.vision_param_count()) as f64 / 1e8).round() / 10.0, 119.4);
    }

    #[test]
    fn derived_helpers_follow_the_spec() {
        let c = ModelConfig::mistral_small_4();
        assert_eq!(c.softmax_scale(), 1.0 / 128f32.sqrt());
        assert_eq!(c.mla_dims().cache_width(), 320);
        let t = ModelConfig::tiny();
        t.validate().unwrap();
        assert_eq!(t.mla_dims().cache_width(), 320);
        assert_eq!(t.yarn(), c.yarn());
        assert_eq!(t.softmax_scale(), c.softmax_scale());
        assert_eq!((t.dim, t.n_layers, t.heads, t.q_lora_rank, t.experts, t.experts_per_token, t.expert_hidden, t.vocab), (256, 4, 4, 128, 16, 4, 128, 2048));
        // Tied embeddings: the head counts once in the total and is still read per token.
        let tied = ModelConfig { tied_embeddings: true, ..t.clone() };
        assert_eq!(tied.param_counts().total(), t.param_counts().total() - t.param_counts().head);
        assert_eq!(tied.active_params(), t.active_params());
    }

    #[test]
    fn inconsistent_values_are_rejected() {
        let t = ModelConfig::tiny();
        let cases = [
            (ModelConfig { experts_per_token: 17, ..t.clone() }, "exceeds the 16 experts"),
            (ModelConfig { qk_rope: 63, ..t.clone() }, "must be even"),
            (ModelConfig { dim: 0, ..t.clone() }, "dim must be positive"),
            (ModelConfig { first_k_dense_replace: 5, ..t.clone() }, "first_k_dense_replace"),
            (ModelConfig { norm_eps: 0.0, ..t.clone() }, "norm_eps"),
            (ModelConfig { yarn_beta_fast: 0.5, ..t.clone() }, "beta_slow < beta_fast"),
            (ModelConfig { yarn_factor: 0.5, ..t.clone() }, "factor"),
        ];
        for (config, needle) in cases {
            match config.validate() {
                Err(Error::Config(msg)) => assert!(msg.contains(needle), "{msg:?} should mention {needle:?}"),
                other => panic!("expected a config error mentioning {needle:?}, got {other:?}"),
            }
        }
    }

    /// A native params.json with the keys SPEC-model.md lists, holding the real values.
    const PARAMS_JSON: &str = r#"{
        "dim": 4096, "n_layers": 36, "head_dim": 128, "hidden_dim": 12288, "n_heads": 32, "n_kv_heads": 32,
        "norm_eps": 1e-06, "vocab_size": 131072, "rope_theta": 10000.0, "tied_embeddings": false,
        "q_lora_rank": 1024, "kv_lora_rank": 256, "qk_nope_head_dim": 64, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "max_position_embeddings": 1048576,
        "moe": {"num_experts": 128, "num_experts_per_tok": 4, "expert_hidden_dim": 2048, "first_k_dense_replace": 0,
                "num_shared_experts": 1, "routed_scale": 1.0},
        "yarn": {"factor": 128.0, "original_max_position_embeddings": 8192, "beta": 32.0, "alpha": 1.0, "apply_scale": false},
        "llama_4_scaling": {"beta": 0.1, "original_max_position_embeddings": 8192},
        "vision_encoder": {"hidden_size": 1024, "num_channels": 3, "image_size": 1540, "patch_size": 14,
                "rope_theta": 10000.0, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                "image_token_id": 10, "image_break_token_id": 12, "image_end_token_id": 13, "adapter_bias": false,
                "spatial_merge_size": 2, "mm_projector_id": "patch_merge"},
        "quantization": {"qformat_weight": "fp8_e4m3", "qscheme_act": "TENSOR"}
    }"#;

    /// A HF mistral3 config.json with a mistral4 text_config (transformers >= 5 `rope_parameters`).
    const CONFIG_JSON: &str = r#"{
        "architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "image_token_index": 10,
        "multimodal_projector_bias": false, "projector_hidden_act": "gelu", "spatial_merge_size": 2,
        "vision_feature_layer": -1,
        "text_config": {
            "model_type": "mistral4", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 32, "q_lora_rank": 1024, "kv_lora_rank": 256, "qk_nope_head_dim": 64,
            "qk_rope_head_dim": 64, "v_head_dim": 128, "head_dim": 128, "vocab_size": 131072, "rms_norm_eps": 1e-06,
            "n_routed_experts": 128, "num_experts_per_tok": 4, "moe_intermediate_size": 2048, "n_shared_experts": 1,
            "routed_scaling_factor": 1.0, "first_k_dense_replace": 0, "intermediate_size": 12288, "n_group": 1,
            "topk_group": 1, "norm_topk_prob": true, "max_position_embeddings": 1048576, "tie_word_embeddings": false,
            "rope_interleave": true,
            "rope_parameters": {"type": "yarn", "rope_type": "yarn", "rope_theta": 10000.0, "factor": 128.0,
                "original_max_position_embeddings": 8192, "max_position_embeddings": 1048576, "beta_fast": 32.0,
                "beta_slow": 1.0, "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}
        },
        "vision_config": {"model_type": "pixtral", "hidden_size": 1024, "num_hidden_layers": 24,
            "num_attention_heads": 16, "head_dim": 64, "intermediate_size": 4096, "patch_size": 14, "image_size": 1540,
            "num_channels": 3, "rope_theta": 10000.0, "hidden_act": "silu"}
    }"#;

    fn edited(json: &str, edit: impl FnOnce(&mut Value)) -> String {
        let mut value: Value = serde_json::from_str(json).unwrap();
        edit(&mut value);
        value.to_string()
    }

    fn config_error(text: &str) -> String {
        match ModelConfig::from_json_str(text) {
            Err(Error::Config(msg)) => msg,
            other => panic!("expected a configuration error, got {other:?}"),
        }
    }

    #[test]
    fn native_params_json_gives_the_real_preset() {
        assert_eq!(ModelConfig::from_json_str(PARAMS_JSON).unwrap(), ModelConfig::mistral_small_4());
    }

    #[test]
    fn hf_config_json_gives_the_real_preset_and_ignores_mscale_all_dim() {
        let config = ModelConfig::from_json_str(CONFIG_JSON).unwrap();
        assert_eq!(config, ModelConfig::mistral_small_4());
        // HF would multiply the scale by (1 + 0.1 ln 128)^2 = 2.2058 because of mscale_all_dim; we must not.
        assert_eq!(config.softmax_scale(), 1.0 / 128f32.sqrt());
        let big_mscale = edited(CONFIG_JSON, |v| v["text_config"]["rope_parameters"]["mscale_all_dim"] = 7.0.into());
        assert_eq!(ModelConfig::from_json_str(&big_mscale).unwrap().softmax_scale(), config.softmax_scale());
    }

    #[test]
    fn text_only_mistral4_and_legacy_rope_scaling_parse() {
        let text_only = edited(CONFIG_JSON, |v| *v = v["text_config"].clone());
        let want = ModelConfig { vision: None, ..ModelConfig::mistral_small_4() };
        assert_eq!(ModelConfig::from_json_str(&text_only).unwrap(), want);
        // transformers 4.x: `rope_scaling` without a theta, `rope_theta` at the top level.
        let legacy = edited(&text_only, |v| {
            let mut rope = v["rope_parameters"].take();
            rope.as_object_mut().unwrap().remove("rope_theta");
            let map = v.as_object_mut().unwrap();
            map.remove("rope_parameters");
            map.insert("rope_scaling".into(), rope);
            map.insert("rope_theta".into(), 10000.0.into());
        });
        assert_eq!(ModelConfig::from_json_str(&legacy).unwrap(), want);
    }

    /// transformers 5.x (and its Mistral4 converter) keep the tower's RoPE base only in `rope_parameters`, with
    /// `rope_type: "axial"`; both forms give the same tower, and a disagreement between them is refused.
    #[test]
    fn vision_rope_theta_is_read_in_both_forms() {
        let nested = edited(CONFIG_JSON, |v| {
            let tower = v["vision_config"].as_object_mut().unwrap();
            let theta = tower.remove("rope_theta").unwrap();
            tower.insert("rope_parameters".into(), serde_json::json!({"rope_theta": theta, "rope_type": "axial"}));
        });
        assert_eq!(ModelConfig::from_json_str(&nested).unwrap(), ModelConfig::mistral_small_4());
        let both = edited(CONFIG_JSON, |v| v["vision_config"]["rope_parameters"] = serde_json::json!({"rope_theta": 10000.0, "rope_type": "axial"}));
        assert_eq!(ModelConfig::from_json_str(&both).unwrap(), ModelConfig::mistral_small_4());
        let other = ModelConfig::from_json_str(&edited(&nested, |v| v["vision_config"]["rope_parameters"]["rope_theta"] = 500.0.into())).unwrap();
        assert_eq!(other.vision.unwrap().rope_theta, 500.0);
        let cases: Vec<(String, &str)> = vec![
            (edited(&both, |v| v["vision_config"]["rope_parameters"]["rope_theta"] = 20000.0.into()), "differs from vision_config.rope_theta"),
            (edited(&nested, |v| v["vision_config"]["rope_parameters"]["rope_type"] = "yarn".into()), "`vision_config.rope_parameters.rope_type`"),
            (
                edited(&nested, |v| {
                    v["vision_config"]["rope_parameters"].as_object_mut().unwrap().remove("rope_theta");
                }),
                "`vision_config.rope_parameters.rope_theta`: missing",
            ),
            (
                edited(CONFIG_JSON, |v| {
                    v["vision_config"].as_object_mut().unwrap().remove("rope_theta");
                }),
                "`vision_config.rope_theta`: missing",
            ),
        ];
        for (text, needle) in cases {
            let msg = config_error(&text);
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
    }

    /// A vision activation or feature layer the tower does not implement is refused, not computed as silu / the last
    /// layer.
    #[test]
    fn unsupported_vision_settings_are_refused() {
        let cases: Vec<(String, &str)> = vec![
            (edited(CONFIG_JSON, |v| v["vision_config"]["hidden_act"] = "gelu".into()), "`vision_config.hidden_act`: \"gelu\""),
            (edited(CONFIG_JSON, |v| v["vision_feature_layer"] = (-2).into()), "`vision_feature_layer`: -2"),
            (edited(CONFIG_JSON, |v| v["vision_feature_layer"] = serde_json::json!([-1, -3])), "`vision_feature_layer`: [-1,-3]"),
        ];
        for (text, needle) in cases {
            let msg = config_error(&text);
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
        // The supported values, and their absence, parse.
        let absent = edited(CONFIG_JSON, |v| {
            v.as_object_mut().unwrap().remove("vision_feature_layer");
            v["vision_config"].as_object_mut().unwrap().remove("hidden_act");
        });
        assert_eq!(ModelConfig::from_json_str(&absent).unwrap(), ModelConfig::mistral_small_4());
    }

    #[test]
    fn bad_files_give_clear_config_errors() {
        let cases: Vec<(String, &str)> = vec![
            ("{ not json".into(), "not valid JSON"),
            ("[1, 2]".into(), "must be a JSON object"),
            (r#"{"layers": 3}"#.into(), "neither a native params.json"),
            (
                edited(PARAMS_JSON, |v| {
                    v["moe"].as_object_mut().unwrap().remove("num_experts");
                }),
                "`moe.num_experts`: missing",
            ),
            (edited(PARAMS_JSON, |v| v["dim"] = "4096".into()), "`dim`: expected a non-negative integer"),
            (edited(PARAMS_JSON, |v| v["n_layers"] = (-3).into()), "`n_layers`: expected a non-negative integer"),
            (edited(PARAMS_JSON, |v| v["norm_eps"] = true.into()), "`norm_eps`: expected a number"),
            (edited(PARAMS_JSON, |v| v["moe"]["num_experts_per_tok"] = 129.into()), "exceeds the 128 experts"),
            (
                edited(PARAMS_JSON, |v| {
                    v["qk_rope_head_dim"] = 63.into();
                    v["head_dim"] = 127.into();
                }),
                "must be even",
            ),
            (edited(PARAMS_JSON, |v| v["head_dim"] = 96.into()), "`head_dim`: 96 is not"),
            (edited(PARAMS_JSON, |v| v["n_kv_heads"] = 8.into()), "MLA has no GQA"),
            (edited(PARAMS_JSON, |v| v["yarn"]["apply_scale"] = true.into()), "`yarn.apply_scale`"),
            (edited(PARAMS_JSON, |v| v["yarn"] = 3.into()), "`yarn`: expected an object"),
            (edited(PARAMS_JSON, |v| v["vision_encoder"]["num_attention_heads"] = 12.into()), "vision heads 12"),
            (edited(CONFIG_JSON, |v| v["text_config"]["rope_parameters"]["rope_type"] = "linear".into()), "only \"yarn\""),
            (edited(CONFIG_JSON, |v| v["text_config"]["n_group"] = 8.into()), "1 of 8 groups"),
            (edited(CONFIG_JSON, |v| v["text_config"]["model_type"] = "llama".into()), "not a mistral4"),
            (edited(CONFIG_JSON, |v| v["text_config"]["q_lora_rank"] = Value::Null), "`text_config.q_lora_rank`: missing"),
        ];
        for (text, needle) in cases {
            let msg = config_error(&text);
            assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");
        }
    }

    #[test]
    fn from_file_names_the_file() {
        let dir = std::env::temp_dir().join(format!("small4-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("params.json");
        std::fs::write(&path, edited(PARAMS_JSON, |v| v["vocab_size"] = 0.into())).unwrap();
        match ModelConfig::from_file(&path) {
            Err(Error::Config(msg)) => assert!(msg.contains("params.json") && msg.contains("vocab must be positive"), "{msg}"),
            other => panic!("expected a config error, got {other:?}"),
        }
        assert!(matches!(ModelConfig::from_file(dir.join("missing.json")), Err(Error::Io { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
