//! Checkpoints the project writes itself, in exactly the real layouts and formats: the real model (70-119 GB)
//! cannot be downloaded here, so tests and the demo write a seeded random-weight checkpoint of any preset and read
//! it back through the same loading code a real checkpoint goes through.
//!
//! What is quantised follows the published releases: experts (routed and shared) in the chosen format; the
//! attention linears FP8 when the format is FP8, bf16 otherwise; embedding, norms, router, head, vision tower and
//! projector always bf16.
//!
//! A round trip: the tiny preset's FP8 checkpoint read back to f32 weights, rewritten in the Hugging Face layout,
//! and opened again; both config files parse back to the preset.
//!
//! ```
//! use small4::model::checkpoint::{Checkpoint, Layout, MatrixData};
//! use small4::model::synthetic::{attention_format, hf_config_json, load_reference_weights, params_json, tiny_checkpoint,
//!     write_checkpoint, DEFAULT_TINY_SEED, HF_MISTRAL3_PREFIX, SYNTHETIC_ACT_SCALE};
//! use small4::model::ModelConfig;
//! use small4::quant::WeightFormat;
//!
//! let tiny = ModelConfig::tiny();
//! assert_eq!(ModelConfig::from_json_str(&params_json(&tiny).to_string())?, tiny);
//! assert_eq!(ModelConfig::from_json_str(&hf_config_json(&tiny).to_string())?, tiny);
//!
//! // FP8 releases store attention in FP8 too; every other expert format leaves attention bf16.
//! assert_eq!(attention_format(WeightFormat::Fp8PerTensor), WeightFormat::Fp8PerTensor);
//! assert_eq!(attention_format(WeightFormat::Nvfp4), WeightFormat::Bf16);
//!
//! let native = Checkpoint::open(tiny_checkpoint(WeightFormat::Fp8PerTensor, &Layout::Native, DEFAULT_TINY_SEED)?)?;
//! let weights = load_reference_weights(&native)?; // dequantised to f32 on the CPU
//! assert!(native.expert_activation_scales(0, tiny.experts, tiny.dim, tiny.expert_hidden)?.is_some()); // W8A8-ready
//!
//! let dir = std::env::temp_dir().join(format!("small4-synthetic-doc-{}", std::process::id()));
//! let hf = Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.into() };
//! write_checkpoint(&dir, &weights, &hf, WeightFormat::Fp8PerTensor, 1 << 20)?; // shards of at most 1 MiB
//! let reopened = Checkpoint::open(&dir)?;
//! assert_eq!(reopened.layout, hf);
//! assert!(reopened.shard_paths().len() > 1);
//!
//! // wq_a [q_lora_rank 128, dim 256], FP8 with the writer's static activation scale beside it.
//! let wq_a = reopened.matrix("layers.0.attention.wq_a", 128, 256)?;
//! assert_eq!(wq_a.format_name(), "fp8");
//! assert!(matches!(wq_a, MatrixData::Fp8PerTensor { activation_scale: Some(s), .. } if s == SYNTHETIC_ACT_SCALE));
//! // Rewriting FP8 values as FP8 keeps them: the two checkpoints dequantise to the same matrix.
//! let before = native.matrix("layers.0.attention.wq_a", 128, 256)?.to_quantized(128, 256)?.dequantize();
//! assert_eq!(wq_a.to_quantized(128, 256)?.dequantize(), before);
//! std::fs::remove_dir_all(&dir).map_err(|e| small4::Error::io(&dir, e))?;
//! # Ok::<(), small4::Error>(())
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::bf16;
use safetensors::Dtype;
use serde_json::json;

use super::checkpoint::{hf_name, vision_layer_prefix, write_shards, Checkpoint, ExpertMatrix, Layout, MatrixData, OwnedTensor};
use super::config::{ModelConfig, VisionConfig};
use crate::error::{Error, Result};
use crate::quant::{Fp8Block128, Fp8PerTensor, Int4Grouped, Nvfp4, QuantizedMatrix, WeightFormat};
use crate::reference::model::{AttentionWeights, FeedForward, LayerWeights, MoeWeights, ReferenceWeights};
use crate::reference::moe::ExpertWeights;
use crate::reference::vision::{permute_rows_to_hf, VisionWeights};

/// The prefix of a mistral3 (text + vision) HF checkpoint's text weights.
pub const HF_MISTRAL3_PREFIX: &str = "model.language_model.";

/// The seed of the tiny preset's random weights that `small4 generate` uses unless told otherwise.
pub const DEFAULT_TINY_SEED: u64 = 4;

/// The embedded tiny model as `small4 generate` runs it: the tiny preset's seeded random weights written once, in
/// `layout` with experts in `format`, into the OS temp directory (regenerated when missing or unreadable), and the
/// directory returned. A killed run never leaves a half checkpoint behind: it is written beside the final directory,
/// then renamed.
///
/// ```
/// use small4::model::checkpoint::{Checkpoint, Layout};
/// use small4::model::synthetic::{tiny_checkpoint, DEFAULT_TINY_SEED};
/// use small4::quant::WeightFormat;
///
/// let dir = tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED)?;
/// assert!(Checkpoint::open(&dir).is_ok());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn tiny_checkpoint(format: WeightFormat, layout: &Layout, seed: u64) -> Result<PathBuf> {
    let layout_name = match layout {
        Layout::Native => "native",
        Layout::HuggingFace { .. } => "hf",
    };
    // v2: the preset has a vision tower (a cache written before it has none). v3: per-tensor FP8 matrices carry
    // activation scales (qscale_act, for W8A8). v4: so do the HF layout's stacked FP8 experts.
    let dir = std::env::temp_dir().join(format!("small4-tiny-v4-{layout_name}-{format}-seed{seed}"));
    if Checkpoint::open(&dir).is_err() {
        let weights = ReferenceWeights::random(&ModelConfig::tiny(), seed)?;
        let partial = dir.with_extension(format!("partial-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""));
        write_checkpoint(&partial, &weights, layout, format, 4 << 20)?;
        // Another thread or process may have finished the same directory meanwhile: then its copy is as good as ours
        // and stays (removing it first would pull it from under a reader that already opened it). Only a directory
        // that still does not open (a stale version, a broken write) is replaced.
        if std::fs::rename(&partial, &dir).is_err() {
            if Checkpoint::open(&dir).is_err() {
                let _ = std::fs::remove_dir_all(&dir);
                if let Err(e) = std::fs::rename(&partial, &dir) {
                    let _ = std::fs::remove_dir_all(&partial);
                    if Checkpoint::open(&dir).is_err() {
                        return Err(Error::io(&dir, e));
                    }
                }
            } else {
                let _ = std::fs::remove_dir_all(&partial);
            }
        }
    }
    Ok(dir)
}

/// Which format the attention linears take for a given expert format.
pub fn attention_format(expert_format: WeightFormat) -> WeightFormat {
    match expert_format {
        WeightFormat::Fp8PerTensor | WeightFormat::Fp8Block128 => expert_format,
        _ => WeightFormat::Bf16,
    }
}

/// `params.json` of a configuration (the keys `ModelConfig` parses), with `vision_encoder` when it has a tower.
pub fn params_json(c: &ModelConfig) -> serde_json::Value {
    let mut params = json!({
        "dim": c.dim, "n_layers": c.n_layers, "head_dim": c.qk_nope + c.qk_rope, "hidden_dim": c.dense_hidden,
        "n_heads": c.heads, "n_kv_heads": c.heads, "norm_eps": c.norm_eps, "vocab_size": c.vocab, "rope_theta": c.rope_theta,
        "tied_embeddings": c.tied_embeddings, "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
        "qk_nope_head_dim": c.qk_nope, "qk_rope_head_dim": c.qk_rope, "v_head_dim": c.v_head,
        "max_position_embeddings": c.max_position,
        "moe": { "num_experts": c.experts, "num_experts_per_tok": c.experts_per_token, "expert_hidden_dim": c.expert_hidden,
                 "first_k_dense_replace": c.first_k_dense_replace, "num_shared_experts": c.shared_experts, "routed_scale": c.routed_scale },
        "yarn": { "factor": c.yarn_factor, "original_max_position_embeddings": c.yarn_original_max_position,
                  "beta": c.yarn_beta_fast, "alpha": c.yarn_beta_slow, "apply_scale": false },
        "llama_4_scaling": { "beta": c.llama4_beta, "original_max_position_embeddings": c.llama4_original_max_position },
    });
    if let Some(v) = &c.vision {
        params["vision_encoder"] = json!({
            "hidden_size": v.hidden, "num_hidden_layers": v.n_layers, "num_attention_heads": v.heads, "head_dim": v.head_dim,
            "intermediate_size": v.intermediate, "patch_size": v.patch_size, "num_channels": v.num_channels,
            "image_size": v.image_size, "max_image_size": v.image_size, "rope_theta": v.rope_theta, "norm_eps": v.norm_eps,
            "spatial_merge_size": v.spatial_merge_size, "image_token_id": v.image_token_id,
            "image_break_token_id": v.image_break_token_id, "image_end_token_id": v.image_end_token_id,
            "adapter_bias": v.adapter_bias, "mm_projector_id": "patch_merge", "add_pre_mm_projector_layer_norm": true,
        });
    }
    params
}

/// HF `config.json` (mistral3 wrapper with a mistral4 `text_config`).
pub fn hf_config_json(c: &ModelConfig) -> serde_json::Value {
    let mut config = json!({
        "model_type": "mistral3",
        "architectures": ["Mistral3ForConditionalGeneration"],
        "text_config": {
            "model_type": "mistral4", "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.heads,
            "num_key_value_heads": c.heads, "q_lora_rank": c.q_lora_rank, "kv_lora_rank": c.kv_lora_rank,
            "qk_nope_head_dim": c.qk_nope, "qk_rope_head_dim": c.qk_rope, "v_head_dim": c.v_head, "vocab_size": c.vocab,
            "rms_norm_eps": c.norm_eps, "n_routed_experts": c.experts, "num_experts_per_tok": c.experts_per_token,
            "moe_intermediate_size": c.expert_hidden, "n_shared_experts": c.shared_experts, "routed_scaling_factor": c.routed_scale,
            "first_k_dense_replace": c.first_k_dense_replace, "intermediate_size": c.dense_hidden, "norm_topk_prob": true,
            "rope_interleave": true, "max_position_embeddings": c.max_position, "tie_word_embeddings": c.tied_embeddings,
            // transformers writes mscale_all_dim = 1 for this model; the loader ignores it (no mscale on the scale).
            "rope_parameters": { "rope_type": "yarn", "rope_theta": c.rope_theta, "factor": c.yarn_factor,
                "original_max_position_embeddings": c.yarn_original_max_position, "beta_fast": c.yarn_beta_fast,
                "beta_slow": c.yarn_beta_slow, "mscale_all_dim": 1.0, "llama_4_scaling_beta": c.llama4_beta },
        }
    });
    if let Some(v) = &c.vision {
        config["vision_config"] = json!({
            "model_type": "pixtral", "hidden_size": v.hidden, "num_hidden_layers": v.n_layers, "num_attention_heads": v.heads,
            "head_dim": v.head_dim, "intermediate_size": v.intermediate, "patch_size": v.patch_size,
            "num_channels": v.num_channels, "image_size": v.image_size, "rope_theta": v.rope_theta,
            "rms_norm_eps": v.norm_eps, "hidden_act": "silu",
        });
        config["spatial_merge_size"] = v.spatial_merge_size.into();
        config["image_token_index"] = v.image_token_id.into();
        config["multimodal_projector_bias"] = v.adapter_bias.into();
        config["projector_hidden_act"] = "gelu".into();
        config["vision_feature_layer"] = (-1).into();
    }
    config
}

fn bf16_tensor(values: &[f32], shape: &[usize]) -> OwnedTensor {
    let data = values.iter().flat_map(|&v| bf16::from_f32(v).to_bits().to_le_bytes()).collect();
    OwnedTensor { dtype: Dtype::BF16, shape: shape.to_vec(), data }
}

fn f32_scalar(v: f32) -> OwnedTensor {
    OwnedTensor { dtype: Dtype::F32, shape: vec![], data: v.to_le_bytes().to_vec() }
}

/// The static activation scale (`qscale_act`, x = e4m3 * scale) written beside every per-tensor FP8 matrix, as the
/// published checkpoint has one. The writer sees no activations to calibrate on: 1/64 spans |x| up to 7 (RMS-normed
/// inputs times norm weights near 1) with normal e4m3 values down to 2^-12, below the SwiGLU activations of the tiny
/// preset.
pub const SYNTHETIC_ACT_SCALE: f32 = 1.0 / 64.0;

/// The stored tensors of one quantised matrix, keyed by suffix (`weight`, `qscale_weight`, ...), native names.
fn matrix_tensors(m: &QuantizedMatrix) -> Vec<(&'static str, OwnedTensor)> {
    let (rows, cols) = m.shape();
    match m {
        QuantizedMatrix::Bf16 { data, .. } => {
            vec![("weight", OwnedTensor { dtype: Dtype::BF16, shape: vec![rows, cols], data: bytemuck::cast_slice(data).to_vec() })]
        }
        QuantizedMatrix::Fp8PerTensor(q) => vec![
            ("weight", OwnedTensor { dtype: Dtype::F8_E4M3, shape: vec![rows, cols], data: q.data.clone() }),
            ("qscale_weight", f32_scalar(q.scale)),
            ("qscale_act", f32_scalar(SYNTHETIC_ACT_SCALE)),
        ],
        QuantizedMatrix::Fp8Block128(q) => vec![
            ("weight", OwnedTensor { dtype: Dtype::F8_E4M3, shape: vec![rows, cols], data: q.data.clone() }),
            (
                "weight_scale_inv",
                OwnedTensor { dtype: Dtype::F32, shape: vec![rows.div_ceil(128), cols.div_ceil(128)], data: bytemuck::cast_slice(&q.scales).to_vec() },
            ),
        ],
        QuantizedMatrix::Int4(q) => {
            let groups = cols / q.group;
            let mut t = vec![
                ("weight_packed", OwnedTensor { dtype: Dtype::U8, shape: vec![rows, cols / 2], data: q.packed.clone() }),
                ("weight_scale", OwnedTensor { dtype: Dtype::BF16, shape: vec![rows, groups], data: bytemuck::cast_slice(&q.scales).to_vec() }),
            ];
            if let Some(z) = &q.zeros {
                t.push(("weight_zero_point", OwnedTensor { dtype: Dtype::U8, shape: vec![rows, groups], data: z.clone() }));
            }
            t
        }
        QuantizedMatrix::Nvfp4(q) => vec![
            ("weight_packed", OwnedTensor { dtype: Dtype::U8, shape: vec![rows, cols / 2], data: q.packed.clone() }),
            ("weight_scale", OwnedTensor { dtype: Dtype::F8_E4M3, shape: vec![rows, cols / 16], data: q.scales.clone() }),
            ("weight_global_scale", f32_scalar(q.global_scale)),
        ],
    }
}

/// Collects stored tensors under the layout's names.
struct TensorSet<'a> {
    layout: &'a Layout,
    tensors: BTreeMap<String, OwnedTensor>,
}

impl TensorSet<'_> {
    fn plain(&mut self, native: &str, values: &[f32], shape: &[usize]) {
        let name = self.stored(native);
        self.tensors.insert(name, bf16_tensor(values, shape));
    }

    fn matrix(&mut self, native_base: &str, format: WeightFormat, values: &[f32], rows: usize, cols: usize) -> Result<()> {
        let q = QuantizedMatrix::quantize(format, values, rows, cols)?;
        for (suffix, t) in matrix_tensors(&q) {
            let name = self.stored(&format!("{native_base}.{suffix}"));
            self.tensors.insert(name, t);
        }
        Ok(())
    }

    fn stored(&self, native: &str) -> String {
        match self.layout {
            Layout::Native => native.to_string(),
            Layout::HuggingFace { prefix } => hf_name(native, prefix),
        }
    }
}

/// Writes `weights` as a checkpoint directory in `layout` with experts in `format` (attention in
/// [`attention_format`], the rest bf16): the config file, shards of at most `shard_bytes` (a tensor larger than that
/// gets a shard of its own) and the index. Errors of quantisation for a matrix the format cannot store, and
/// `Error::Io` / `Error::Checkpoint` when writing fails.
pub fn write_checkpoint(dir: &Path, weights: &ReferenceWeights, layout: &Layout, format: WeightFormat, shard_bytes: usize) -> Result<()> {
    let c = &weights.config;
    let attn_format = attention_format(format);
    let mut set = TensorSet { layout, tensors: BTreeMap::new() };
    set.plain("tok_embeddings.weight", &weights.tok_embeddings, &[c.vocab, c.dim]);
    set.plain("norm.weight", &weights.norm, &[c.dim]);
    if !c.tied_embeddings {
        set.plain("output.weight", &weights.output, &[c.vocab, c.dim]);
    }
    let qk = c.qk_nope + c.qk_rope;
    for (l, layer) in weights.layers.iter().enumerate() {
        let p = format!("layers.{l}");
        set.plain(&format!("{p}.attention_norm.weight"), &layer.attention_norm, &[c.dim]);
        set.plain(&format!("{p}.ffn_norm.weight"), &layer.ffn_norm, &[c.dim]);
        let a = &layer.attention;
        set.plain(&format!("{p}.attention.q_a_norm.weight"), &a.q_a_norm, &[c.q_lora_rank]);
        set.plain(&format!("{p}.attention.kv_a_norm.weight"), &a.kv_a_norm, &[c.kv_lora_rank]);
        set.matrix(&format!("{p}.attention.wq_a"), attn_format, &a.wq_a, c.q_lora_rank, c.dim)?;
        set.matrix(&format!("{p}.attention.wq_b"), attn_format, &a.wq_b, c.heads * qk, c.q_lora_rank)?;
        set.matrix(&format!("{p}.attention.wkv_a_with_mqa"), attn_format, &a.wkv_a_with_mqa, c.kv_lora_rank + c.qk_rope, c.dim)?;
        set.matrix(&format!("{p}.attention.wkv_b"), attn_format, &a.wkv_b, c.heads * (c.qk_nope + c.v_head), c.kv_lora_rank)?;
        set.matrix(&format!("{p}.attention.wo"), attn_format, &a.wo, c.dim, c.heads * c.v_head)?;
        let FeedForward::Moe(moe) = &layer.ffn else {
            return Err(Error::Config("the synthetic checkpoint writer covers MoE layers only (first_k_dense_replace = 0)".into()));
        };
        set.plain(&format!("{p}.gate.weight"), &moe.gate, &[c.experts, c.dim]);
        if let Some(s) = &moe.shared_experts {
            let h = c.shared_hidden();
            set.matrix(&format!("{p}.shared_experts.w1"), format, &s.w1, h, c.dim)?;
            set.matrix(&format!("{p}.shared_experts.w3"), format, &s.w3, h, c.dim)?;
            set.matrix(&format!("{p}.shared_experts.w2"), format, &s.w2, c.dim, h)?;
        }
        let experts: Vec<&ExpertWeights> =
            moe.experts.iter().map(|e| e.as_ref().ok_or_else(|| Error::Config("a checkpoint holds every expert".into()))).collect::<Result<_>>()?;
        write_experts(&mut set, layout, l, &experts, c, format)?;
    }
    if let (Some(v), Some(w)) = (&c.vision, &weights.vision) {
        write_vision(&mut set, v, w, c.dim);
    }
    let (config_name, config) = match layout {
        Layout::Native => ("params.json", params_json(c)),
        Layout::HuggingFace { .. } => ("config.json", hf_config_json(c)),
    };
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let config_path = dir.join(config_name);
    std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).map_err(|e| Error::io(&config_path, e))?;
    write_shards(dir, layout, &set.tensors, shard_bytes)?;
    Ok(())
}

/// The tower and projector, bf16 in every release. HF stores the tower's `wq`/`wk` rows permuted for rotate-half
/// RoPE, as transformers' converter writes them.
fn write_vision(set: &mut TensorSet, v: &VisionConfig, w: &VisionWeights, text_dim: usize) {
    let (h, p, m) = (v.hidden, v.patch_size, v.spatial_merge_size);
    let hf = matches!(set.layout, Layout::HuggingFace { .. });
    let rope_rows = |values: &[f32]| if hf { permute_rows_to_hf(values, v.head_dim, h) } else { values.to_vec() };
    set.plain("vision_encoder.patch_conv.weight", &w.patch_conv, &[h, v.num_channels, p, p]);
    set.plain("vision_encoder.ln_pre.weight", &w.ln_pre, &[h]);
    for (l, layer) in w.layers.iter().enumerate() {
        let at = vision_layer_prefix(l);
        set.plain(&format!("{at}.attention_norm.weight"), &layer.attention_norm, &[h]);
        set.plain(&format!("{at}.ffn_norm.weight"), &layer.ffn_norm, &[h]);
        set.plain(&format!("{at}.attention.wq.weight"), &rope_rows(&layer.wq), &[h, h]);
        set.plain(&format!("{at}.attention.wk.weight"), &rope_rows(&layer.wk), &[h, h]);
        set.plain(&format!("{at}.attention.wv.weight"), &layer.wv, &[h, h]);
        set.plain(&format!("{at}.attention.wo.weight"), &layer.wo, &[h, h]);
        set.plain(&format!("{at}.feed_forward.w1.weight"), &layer.w1, &[v.intermediate, h]);
        set.plain(&format!("{at}.feed_forward.w3.weight"), &layer.w3, &[v.intermediate, h]);
        set.plain(&format!("{at}.feed_forward.w2.weight"), &layer.w2, &[h, v.intermediate]);
    }
    set.plain("pre_mm_projector_norm.weight", &w.pre_mm_projector_norm, &[h]);
    set.plain("patch_merger.merging_layer.weight", &w.merging_layer, &[h, h * m * m]);
    set.plain("vision_language_adapter.w_in.weight", &w.w_in, &[text_dim, h]);
    set.plain("vision_language_adapter.w_out.weight", &w.w_out, &[text_dim, text_dim]);
    for (name, bias) in [("w_in", &w.w_in_bias), ("w_out", &w.w_out_bias)] {
        if let Some(b) = bias {
            set.plain(&format!("vision_language_adapter.{name}.bias"), b, &[text_dim]);
        }
    }
}

/// Native: one tensor set per expert. HF: bf16 and FP8 per-tensor experts STACKED as transformers stores them
/// (`gate_up_proj` [E, 2*hidden, dim] gate rows first, `down_proj` [E, dim, hidden], FP8 scales [E,1,1] shared by gate
/// and up, static activation scales [E]); other formats per expert (`mlp.experts.N.{gate,up,down}_proj`), as compressed-tensors stores them.
fn write_experts(set: &mut TensorSet, layout: &Layout, l: usize, experts: &[&ExpertWeights], c: &ModelConfig, format: WeightFormat) -> Result<()> {
    let (dim, h) = (c.dim, c.expert_hidden);
    let Layout::HuggingFace { prefix } = layout else {
        for (e, w) in experts.iter().enumerate() {
            set.matrix(&format!("layers.{l}.experts.{e}.w1"), format, &w.w1, h, dim)?;
            set.matrix(&format!("layers.{l}.experts.{e}.w3"), format, &w.w3, h, dim)?;
            set.matrix(&format!("layers.{l}.experts.{e}.w2"), format, &w.w2, dim, h)?;
        }
        return Ok(());
    };
    let base = format!("{prefix}layers.{l}.mlp.experts");
    match format {
        WeightFormat::Bf16 | WeightFormat::Fp8PerTensor => {
            let mut gate_up = Vec::new();
            let mut down = Vec::new();
            let (mut gate_up_scales, mut down_scales) = (Vec::new(), Vec::new());
            for w in experts {
                let stacked: Vec<f32> = w.w1.iter().chain(&w.w3).copied().collect();
                let gu = QuantizedMatrix::quantize(format, &stacked, 2 * h, dim)?;
                let dn = QuantizedMatrix::quantize(format, &w.w2, dim, h)?;
                for (q, bytes, scales) in [(&gu, &mut gate_up, &mut gate_up_scales), (&dn, &mut down, &mut down_scales)] {
                    match q {
                        QuantizedMatrix::Bf16 { data, .. } => bytes.extend_from_slice(bytemuck::cast_slice(data)),
                        QuantizedMatrix::Fp8PerTensor(f) => {
                            bytes.extend_from_slice(&f.data);
                            scales.extend_from_slice(&f.scale.to_le_bytes());
                        }
                        _ => unreachable!("matched above"),
                    }
                }
            }
            let dtype = if format == WeightFormat::Bf16 { Dtype::BF16 } else { Dtype::F8_E4M3 };
            let n = experts.len();
            set.tensors.insert(format!("{base}.gate_up_proj"), OwnedTensor { dtype, shape: vec![n, 2 * h, dim], data: gate_up });
            set.tensors.insert(format!("{base}.down_proj"), OwnedTensor { dtype, shape: vec![n, dim, h], data: down });
            if format == WeightFormat::Fp8PerTensor {
                let scale = |data| OwnedTensor { dtype: Dtype::F32, shape: vec![n, 1, 1], data };
                set.tensors.insert(format!("{base}.gate_up_proj_scale_inv"), scale(gate_up_scales));
                set.tensors.insert(format!("{base}.down_proj_scale_inv"), scale(down_scales));
                // The static activation scales for W8A8, one f32 per expert (transformers' fine-grained FP8 layout).
                let activation = || OwnedTensor { dtype: Dtype::F32, shape: vec![n], data: SYNTHETIC_ACT_SCALE.to_le_bytes().repeat(n) };
                set.tensors.insert(format!("{base}.gate_up_proj_activation_scale"), activation());
                set.tensors.insert(format!("{base}.down_proj_activation_scale"), activation());
            }
        }
        _ => {
            for (e, w) in experts.iter().enumerate() {
                for (name, values, rows, cols) in [("gate_proj", &w.w1, h, dim), ("up_proj", &w.w3, h, dim), ("down_proj", &w.w2, dim, h)] {
                    let q = QuantizedMatrix::quantize(format, values, rows, cols)?;
                    for (suffix, t) in matrix_tensors(&q) {
                        set.tensors.insert(format!("{base}.{e}.{name}.{suffix}"), t);
                    }
                }
            }
        }
    }
    Ok(())
}

impl MatrixData<'_> {
    /// Copies the view into an owned matrix of the quant module (dequantisable on the CPU).
    pub fn to_quantized(&self, rows: usize, cols: usize) -> Result<QuantizedMatrix> {
        Ok(match self {
            MatrixData::Bf16 { data } => QuantizedMatrix::Bf16 { data: bytemuck::pod_collect_to_vec(data), rows, cols },
            MatrixData::Fp8PerTensor { data, scale, .. } => QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::from_parts(data.to_vec(), rows, cols, *scale)?),
            MatrixData::Fp8Block128 { data, scales } => {
                QuantizedMatrix::Fp8Block128(Fp8Block128::from_parts(data.to_vec(), rows, cols, bytemuck::pod_collect_to_vec(scales))?)
            }
            MatrixData::Int4 { packed, scales, zeros, group } => QuantizedMatrix::Int4(Int4Grouped::from_parts(
                packed.to_vec(),
                rows,
                cols,
                *group,
                bytemuck::pod_collect_to_vec(scales),
                zeros.map(<[u8]>::to_vec),
            )?),
            MatrixData::Nvfp4 { packed, scales, global_scale, .. } => {
                QuantizedMatrix::Nvfp4(Nvfp4::from_parts(packed.to_vec(), rows, cols, scales.to_vec(), *global_scale)?)
            }
        })
    }
}

/// Loads a checkpoint (any layout, any format) into f32 reference weights, dequantising on the CPU to the values the
/// GEMM kernels multiply (`QuantizedMatrix::dequantize_for_gemm`).
pub fn load_reference_weights(ck: &Checkpoint) -> Result<ReferenceWeights> {
    let c = ck.model_config()?;
    // A bf16 tensor stored as is (norms, embedding, router, head), checked against `shape`.
    let bf16_tensor = |name: &str, shape: &[usize]| -> Result<Vec<f32>> {
        let t = ck.plain(name, Dtype::BF16, shape)?;
        Ok(t.data.chunks_exact(2).map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect())
    };
    let plain = |name: &str, len: usize| bf16_tensor(name, &[len]);
    // Dequantised as the GEMM kernels see them (bf16-rounded for fp8 block-128 and int4), so the reference and the
    // engine multiply the same weights.
    let matrix =
        |name: &str, rows: usize, cols: usize| -> Result<Vec<f32>> { Ok(ck.matrix(name, rows, cols)?.to_quantized(rows, cols)?.dequantize_for_gemm()) };
    let embedding = |name: &str| bf16_tensor(name, &[c.vocab, c.dim]);
    let qk = c.qk_nope + c.qk_rope;
    let mut layers = Vec::with_capacity(c.n_layers);
    for l in 0..c.n_layers {
        let p = format!("layers.{l}");
        let attention = AttentionWeights {
            wq_a: matrix(&format!("{p}.attention.wq_a"), c.q_lora_rank, c.dim)?,
            q_a_norm: plain(&format!("{p}.attention.q_a_norm.weight"), c.q_lora_rank)?,
            wq_b: matrix(&format!("{p}.attention.wq_b"), c.heads * qk, c.q_lora_rank)?,
            wkv_a_with_mqa: matrix(&format!("{p}.attention.wkv_a_with_mqa"), c.kv_lora_rank + c.qk_rope, c.dim)?,
            kv_a_norm: plain(&format!("{p}.attention.kv_a_norm.weight"), c.kv_lora_rank)?,
            wkv_b: matrix(&format!("{p}.attention.wkv_b"), c.heads * (c.qk_nope + c.v_head), c.kv_lora_rank)?,
            wo: matrix(&format!("{p}.attention.wo"), c.dim, c.heads * c.v_head)?,
        };
        let expert = |e: usize| -> Result<ExpertWeights> {
            let get = |which| -> Result<Vec<f32>> {
                let (rows, cols) = if which == ExpertMatrix::W2 { (c.dim, c.expert_hidden) } else { (c.expert_hidden, c.dim) };
                Ok(ck.expert_matrix(l, e, which, c.dim, c.expert_hidden)?.to_quantized(rows, cols)?.dequantize_for_gemm())
            };
            Ok(ExpertWeights { w1: get(ExpertMatrix::W1)?, w3: get(ExpertMatrix::W3)?, w2: get(ExpertMatrix::W2)? })
        };
        let h = c.shared_hidden();
        let shared_experts = if c.shared_experts > 0 {
            Some(ExpertWeights {
                w1: matrix(&format!("{p}.shared_experts.w1"), h, c.dim)?,
                w3: matrix(&format!("{p}.shared_experts.w3"), h, c.dim)?,
                w2: matrix(&format!("{p}.shared_experts.w2"), c.dim, h)?,
            })
        } else {
            None
        };
        let moe = MoeWeights {
            fp8_act_scales: ck.expert_activation_scales(l, c.experts, c.dim, c.expert_hidden)?,
            gate: bf16_tensor(&format!("{p}.gate.weight"), &[c.experts, c.dim])?,
            experts: (0..c.experts).map(|e| expert(e).map(Some)).collect::<Result<_>>()?,
            shared_experts,
        };
        layers.push(LayerWeights {
            attention_norm: plain(&format!("{p}.attention_norm.weight"), c.dim)?,
            attention,
            ffn_norm: plain(&format!("{p}.ffn_norm.weight"), c.dim)?,
            ffn: FeedForward::Moe(moe),
        });
    }
    let tok_embeddings = embedding("tok_embeddings.weight")?;
    let output = if c.tied_embeddings { tok_embeddings.clone() } else { embedding("output.weight")? };
    let vision = c.vision.as_ref().map(|v| ck.vision_weights(v, c.dim)).transpose()?;
    Ok(ReferenceWeights { norm: plain("norm.weight", c.dim)?, tok_embeddings, output, layers, vision, config: c })
}
