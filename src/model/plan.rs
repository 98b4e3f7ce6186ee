//! Memory plans for the full model on one or several GPUs: per GPU, the weights by format, the activation
//! workspace, and what is left for the KV cache in tokens. Every byte count comes from the configuration and the
//! weight formats' exact sizes (`WeightFormat::matrix_bytes`), nothing is estimated from parameter totals.
//!
//! Sharding over `world` GPUs: routed experts by expert parallelism (each GPU owns experts/world of them);
//! attention by tensor parallelism over heads (wq_b, wkv_b, wo split; the latent down-projections wq_a and
//! wkv_a_with_mqa replicated, as MLA needs the whole latent on every rank); embedding and output head split over
//! the vocabulary; norms, router, shared expert and vision tower replicated. The MLA latent cache is per token, not
//! per head, so every GPU holds the full 320 values per token per layer.
//!
//! The plans `small4 plan` prints, and what one GPU's share adds up to:
//!
//! ```
//! use small4::model::plan::{standard_plans, FormatChoice, GpuPlan, GpuSpec, MemoryPlan, RUNTIME_RESERVE_BYTES};
//! use small4::model::Config;
//! use small4::quant::WeightFormat;
//!
//! let plans: Vec<MemoryPlan> = standard_plans(&Config::mistral_small_4())?;
//! assert_eq!(plans.len(), 5);
//! let nvfp4 = &plans[0];
//! assert_eq!((nvfp4.gpu, nvfp4.world, nvfp4.formats), (GpuSpec::H100_80GB, 1, FormatChoice::NVFP4_EXPERTS));
//!
//! // One GPU's memory: weights, activation workspace, the runtime reserve, and the rest for the KV cache.
//! let gpu: &GpuPlan = &nvfp4.gpus[0];
//! let used = gpu.weight_bytes() + gpu.activation_bytes + RUNTIME_RESERVE_BYTES;
//! assert_eq!(used + gpu.kv_budget_bytes, GpuSpec::H100_80GB.memory_bytes);
//! assert_eq!(gpu.kv_capacity_tokens, gpu.kv_budget_bytes / gpu.kv_bytes_per_token);
//! assert_eq!(gpu.kv_bytes_per_token, 36 * 320 * 2); // 36 layers of 320 bf16 values
//! assert_eq!(nvfp4.total_weight_bytes(), gpu.weight_bytes()); // one GPU
//!
//! // INT4 with a bf16 scale per 128 weights (4.125 bits) stores experts smaller than NVFP4 (4.5 bits).
//! let int4 = &plans[1];
//! assert_eq!(int4.formats, FormatChoice::INT4_EXPERTS);
//! assert!(int4.total_weight_bytes() < nvfp4.total_weight_bytes());
//!
//! // Eight GPUs: experts and heads split, but replicated weights count once per GPU in the total.
//! let bf16 = &plans[4];
//! assert_eq!((bf16.world, bf16.formats), (8, FormatChoice::all(WeightFormat::Bf16)));
//! assert_eq!(bf16.total_weight_bytes(), bf16.gpus.iter().map(GpuPlan::weight_bytes).sum::<u64>());
//! assert!(bf16.total_weight_bytes() > bf16.gpus[0].weight_bytes() * 7);
//! assert!(nvfp4.to_string().contains("KV cache"));
//! # Ok::<(), small4::Error>(())
//! ```

use std::fmt;

use crate::error::{Error, Result};
use crate::model::config::ModelConfig;
use crate::quant::WeightFormat;

/// A GPU model's usable memory as the driver reports it (nvidia-smi totals).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuSpec {
    /// The model's name in plans ("H100 80GB").
    pub name: &'static str,
    /// Total device memory in bytes, as the driver reports it.
    pub memory_bytes: u64,
}

impl GpuSpec {
    /// H100 SXM 80 GB: 81,559 MiB reported.
    pub const H100_80GB: GpuSpec = GpuSpec { name: "H100 80GB", memory_bytes: 81_559 * MIB };
    /// H200 141 GB: 143,771 MiB reported.
    pub const H200: GpuSpec = GpuSpec { name: "H200 141GB", memory_bytes: 143_771 * MIB };
}

const MIB: u64 = 1 << 20;
/// CUDA context, cuBLAS-free runtime, NCCL buffers and allocator slack kept out of the plan.
pub const RUNTIME_RESERVE_BYTES: u64 = 1 << 30;

/// How each class of weight is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FormatChoice {
    /// Format of the routed experts' w1, w2, w3 (and of the dense FFNs, if any).
    pub routed_experts: WeightFormat,
    /// Format of the shared experts.
    pub shared_experts: WeightFormat,
    /// Format of the attention linears (wq_a, wq_b, wkv_a_with_mqa, wkv_b, wo).
    pub attention: WeightFormat,
    /// Embedding, output head, router, norms and vision tower are bf16 in every published release.
    pub rest: WeightFormat,
}

impl FormatChoice {
    /// Experts and attention in `format`, the rest bf16.
    pub const fn all(format: WeightFormat) -> Self {
        FormatChoice { routed_experts: format, shared_experts: format, attention: format, rest: WeightFormat::Bf16 }
    }
    /// The `-NVFP4` release: routed and shared experts NVFP4, attention bf16.
    pub const NVFP4_EXPERTS: FormatChoice =
        FormatChoice { routed_experts: WeightFormat::Nvfp4, shared_experts: WeightFormat::Nvfp4, attention: WeightFormat::Bf16, rest: WeightFormat::Bf16 };
    /// INT4 group-128 experts, bf16 attention.
    pub const INT4_EXPERTS: FormatChoice = FormatChoice {
        routed_experts: WeightFormat::INT4_G128,
        shared_experts: WeightFormat::INT4_G128,
        attention: WeightFormat::Bf16,
        rest: WeightFormat::Bf16,
    };
}

/// What the plan sizes activations for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Workload {
    /// Tokens per prefill chunk (the largest activation batch).
    pub prefill_chunk_tokens: usize,
    /// Sequences decoded together (logits are materialised for these only).
    pub decode_batch: usize,
    /// KV cache element bytes (2 for bf16, 1 for fp8 e4m3).
    pub kv_bytes_per_value: usize,
}

impl Default for Workload {
    fn default() -> Self {
        // The engine's default step budget (`EngineOptions::prefill_chunk`): the plan sizes the workspace it allocates.
        Workload { prefill_chunk_tokens: crate::model::engine::DEFAULT_PREFILL_CHUNK, decode_batch: 256, kv_bytes_per_value: 2 }
    }
}

/// One GPU's share of a [`MemoryPlan`], in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuPlan {
    /// The GPU's rank, `0..world`.
    pub rank: usize,
    /// (component, format, bytes) on this GPU.
    pub weights: Vec<(&'static str, WeightFormat, u64)>,
    /// Peak activation workspace: one prefill chunk through one layer plus the decode batch's f32 logits.
    pub activation_bytes: u64,
    /// KV-cache bytes one token takes over all layers (the latent + rope key, `kv_bytes_per_value` each).
    pub kv_bytes_per_token: u64,
    /// Memory left for the KV cache after weights, activations and the runtime reserve (0 when it does not fit).
    pub kv_budget_bytes: u64,
    /// Tokens the KV budget holds, over all sequences: `kv_budget_bytes / kv_bytes_per_token`.
    pub kv_capacity_tokens: u64,
}

impl GpuPlan {
    /// Bytes of all the weights on this GPU.
    pub fn weight_bytes(&self) -> u64 {
        self.weights.iter().map(|w| w.2).sum()
    }
}

/// The memory plan of a model on `world` GPUs of one kind (see [`plan`]); `Display` prints it as `small4 plan` does.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPlan {
    /// The plan's title ("2x H200, FP8").
    pub name: String,
    /// The GPU every rank runs on.
    pub gpu: GpuSpec,
    /// GPUs in the plan.
    pub world: usize,
    /// How the weights are stored.
    pub formats: FormatChoice,
    /// What the activations are sized for.
    pub workload: Workload,
    /// Each GPU's share, in rank order.
    pub gpus: Vec<GpuPlan>,
}

impl MemoryPlan {
    /// True when every GPU holds its weights and workspace and still has room for at least one full context.
    pub fn fits(&self, min_context_tokens: u64) -> bool {
        self.gpus.iter().all(|g| g.kv_capacity_tokens >= min_context_tokens)
    }

    /// Weight bytes summed over the GPUs (replicated weights count once per GPU).
    pub fn total_weight_bytes(&self) -> u64 {
        self.gpus.iter().map(GpuPlan::weight_bytes).sum()
    }
}

/// The plans `small4 plan` prints for the real model.
pub fn standard_plans(config: &ModelConfig) -> Result<Vec<MemoryPlan>> {
    let w = Workload::default();
    Ok(vec![
        plan(config, "1x H100, NVFP4 experts", GpuSpec::H100_80GB, 1, FormatChoice::NVFP4_EXPERTS, w)?,
        plan(config, "1x H100, INT4 g128 experts", GpuSpec::H100_80GB, 1, FormatChoice::INT4_EXPERTS, w)?,
        plan(config, "2x H200, FP8", GpuSpec::H200, 2, FormatChoice::all(WeightFormat::Fp8PerTensor), w)?,
        plan(config, "4x H100, FP8", GpuSpec::H100_80GB, 4, FormatChoice::all(WeightFormat::Fp8PerTensor), w)?,
        plan(config, "8x H100, bf16", GpuSpec::H100_80GB, 8, FormatChoice::all(WeightFormat::Bf16), w)?,
    ])
}

/// The memory plan of `config` on `world` GPUs of one kind: routed experts split evenly between the GPUs (expert
/// parallelism), attention heads split evenly (tensor parallelism, `engine::Shard::tensor_parallel`), embedding and
/// head split over the vocabulary, the rest replicated (module docs); weights in `formats`, activations and KV cache
/// sized for `workload`. `Error::Config` unless `world` is positive and divides both the experts and the heads;
/// errors of `WeightFormat::matrix_bytes` for a dimension the format cannot store.
///
/// ```
/// use small4::model::plan::{plan, FormatChoice, GpuSpec, Workload};
/// use small4::model::Config;
/// use small4::quant::WeightFormat;
///
/// let config = Config::mistral_small_4();
/// let fp8 = FormatChoice::all(WeightFormat::Fp8PerTensor);
/// let two = plan(&config, "2x H200", GpuSpec::H200, 2, fp8, Workload::default())?;
/// assert!(two.fits(256 * 1024)); // a full 256k context fits
/// assert!(plan(&config, "3 GPUs", GpuSpec::H200, 3, fp8, Workload::default()).is_err()); // 128 experts, 3 GPUs
/// # Ok::<(), small4::Error>(())
/// ```
pub fn plan(config: &ModelConfig, name: &str, gpu: GpuSpec, world: usize, formats: FormatChoice, workload: Workload) -> Result<MemoryPlan> {
    if world == 0 || config.experts % world != 0 || config.heads % world != 0 {
        return Err(Error::Config(format!("{world} GPUs must divide the {} experts and {} heads evenly", config.experts, config.heads)));
    }
    let gpus = (0..world).map(|rank| gpu_plan(config, gpu, world, rank, &formats, &workload)).collect::<Result<Vec<_>>>()?;
    Ok(MemoryPlan { name: name.to_string(), gpu, world, formats, workload, gpus })
}

fn gpu_plan(c: &ModelConfig, gpu: GpuSpec, world: usize, rank: usize, f: &FormatChoice, work: &Workload) -> Result<GpuPlan> {
    let layers = c.n_layers as u64;
    let bytes = |format: WeightFormat, rows: usize, cols: usize| -> Result<u64> { Ok(format.matrix_bytes(rows, cols)? as u64) };
    let heads_here = c.heads / world;
    let qk = c.qk_nope + c.qk_rope;

    // Attention: latent down-projections replicated, per-head up-projections and wo split by heads.
    let attention_per_layer = bytes(f.attention, c.q_lora_rank, c.dim)?
        + bytes(f.attention, heads_here * qk, c.q_lora_rank)?
        + bytes(f.attention, c.kv_lora_rank + c.qk_rope, c.dim)?
        + bytes(f.attention, heads_here * (c.qk_nope + c.v_head), c.kv_lora_rank)?
        + bytes(f.attention, c.dim, heads_here * c.v_head)?;
    let expert = |format: WeightFormat, hidden: usize| -> Result<u64> { Ok(2 * bytes(format, hidden, c.dim)? + bytes(format, c.dim, hidden)?) };
    let moe_layers = (0..c.n_layers).filter(|&l| c.is_moe_layer(l)).count() as u64;
    let dense_layers = layers - moe_layers;
    let routed = moe_layers * (c.experts / world) as u64 * expert(f.routed_experts, c.expert_hidden)?;
    let shared = moe_layers * c.shared_experts as u64 * expert(f.shared_experts, c.shared_hidden())?;
    let dense_ffn = dense_layers * expert(f.routed_experts, c.dense_hidden)?;
    let router = moe_layers * bytes(f.rest, c.experts, c.dim)?;
    let norms = 2 * (layers * (2 * c.dim + c.q_lora_rank + c.kv_lora_rank) as u64 + c.dim as u64);
    let vocab_here = c.vocab.div_ceil(world);
    let embedding = bytes(f.rest, vocab_here, c.dim)?;
    let head = if c.tied_embeddings { 0 } else { bytes(f.rest, vocab_here, c.dim)? };
    let vision = 2 * c.vision_param_count();

    let mut weights = vec![
        ("attention", f.attention, layers * attention_per_layer),
        ("routed experts", f.routed_experts, routed),
        ("shared experts", f.shared_experts, shared),
        ("router", f.rest, router),
        ("norms", f.rest, norms),
        ("embedding", f.rest, embedding),
        ("output head", f.rest, head),
        ("vision tower + projector", f.rest, vision),
    ];
    if dense_ffn > 0 {
        weights.push(("dense FFN", f.routed_experts, dense_ffn));
    }

    let activation_bytes = activation_workspace(c, heads_here, work);
    let kv_bytes_per_token = layers * (c.kv_lora_rank + c.qk_rope) as u64 * work.kv_bytes_per_value as u64;
    let used = weights.iter().map(|w| w.2).sum::<u64>() + activation_bytes + RUNTIME_RESERVE_BYTES;
    let kv_budget_bytes = gpu.memory_bytes.saturating_sub(used);
    Ok(GpuPlan { rank, weights, activation_bytes, kv_bytes_per_token, kv_budget_bytes, kv_capacity_tokens: kv_budget_bytes / kv_bytes_per_token })
}

/// Peak activation bytes of one prefill chunk through one layer (buffers are reused layer to layer), plus the
/// decode batch's f32 logits.
fn activation_workspace(c: &ModelConfig, heads_here: usize, work: &Workload) -> u64 {
    let t = work.prefill_chunk_tokens as u64;
    let bf16 = 2u64;
    let per_token = bf16
        * (3 * c.dim                                   // residual stream, normed input, layer output
            + c.q_lora_rank                            // q latent
            + heads_here * (c.qk_nope + c.qk_rope)     // q
            + 2 * heads_here * c.kv_lora_rank          // q_lat and o_lat in the latent
            + (c.kv_lora_rank + c.qk_rope)             // kv_a output
            + heads_here * c.v_head                    // attention output before wo
            + c.experts_per_token * 2 * c.expert_hidden) as u64 // gate|up activations of the k experts
        + 4 * (c.experts + 2 * c.experts_per_token + c.experts_per_token * c.dim) as u64; // router logits, ids/weights, f32 pair outputs
    t * per_token + 4 * (work.decode_batch * c.vocab) as u64
}

impl fmt::Display for MemoryPlan {
    fn fmt(&self, out: &mut fmt::Formatter<'_>) -> fmt::Result {
        const GB: f64 = 1e9;
        writeln!(out, "{} ({} x {}, {:.1} GB each)", self.name, self.world, self.gpu.name, self.gpu.memory_bytes as f64 / GB)?;
        let g = &self.gpus[0];
        for (component, format, bytes) in &g.weights {
            if *bytes > 0 {
                writeln!(out, "  {component:<26} {:<14} {:>9.2} GB", format.to_string(), *bytes as f64 / GB)?;
            }
        }
        writeln!(out, "  {:<41} {:>9.2} GB per GPU ({:.2} GB in all)", "weights", g.weight_bytes() as f64 / GB, self.total_weight_bytes() as f64 / GB)?;
        writeln!(
            out,
            "  {:<41} {:>9.2} GB ({} prefill tokens, {} decode logits)",
            "activation workspace",
            g.activation_bytes as f64 / GB,
            self.workload.prefill_chunk_tokens,
            self.workload.decode_batch
        )?;
        writeln!(out, "  {:<41} {:>9.2} GB", "runtime reserve", RUNTIME_RESERVE_BYTES as f64 / GB)?;
        writeln!(
            out,
            "  {:<41} {:>9.2} GB = {} tokens at {} bytes/token{}",
            "KV cache",
            g.kv_budget_bytes as f64 / GB,
            g.kv_capacity_tokens,
            g.kv_bytes_per_token,
            if g.kv_capacity_tokens == 0 { "  DOES NOT FIT" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_model_fits_one_h100_with_4bit_experts() {
        let c = ModelConfig::mistral_small_4();
        let p = plan(&c, "nvfp4", GpuSpec::H100_80GB, 1, FormatChoice::NVFP4_EXPERTS, Workload::default()).unwrap();
        // The published -NVFP4 release is 70.8 GB: our exact count of the same formats lands within 1% of it.
        let total = p.total_weight_bytes() as f64;
        assert!((total / 70.8e9 - 1.0).abs() < 0.01, "NVFP4 weights {total}");
        assert!(p.fits(256 * 1024), "a full 256k context fits: {p}");
        let int4 = plan(&c, "int4", GpuSpec::H100_80GB, 1, FormatChoice::INT4_EXPERTS, Workload::default()).unwrap();
        assert!(int4.fits(256 * 1024), "{int4}");
    }

    /// The engine sized by the one-H100 NVFP4 plan holds the context the plan promises (to one page), a full 256k
    /// context among them, with the plan's step budget.
    #[test]
    fn the_engine_sized_by_a_plan_holds_its_context() {
        use crate::model::engine::EngineOptions;
        let c = ModelConfig::mistral_small_4();
        let workload = Workload::default();
        let p = plan(&c, "nvfp4", GpuSpec::H100_80GB, 1, FormatChoice::NVFP4_EXPERTS, workload).unwrap();
        let gpu = &p.gpus[0];
        let options = EngineOptions::from_plan(gpu, &workload, 64).unwrap();
        let longest = options.max_context_tokens() as u64;
        assert!(longest <= gpu.kv_capacity_tokens && gpu.kv_capacity_tokens - longest < 64, "{longest} of {}", gpu.kv_capacity_tokens);
        assert!(longest >= 256 * 1024, "{longest}");
        assert_eq!(options.prefill_chunk, workload.prefill_chunk_tokens);
        // The cache of those options takes a sequence of that length, and not one token more.
        let mut kv =
            crate::model::kv_cache::KvCache::new(crate::model::kv_cache::CacheDescriptor::mla(options.num_pages, 64, options.cache_dtype).unwrap()).unwrap();
        let seq = kv.add_sequence();
        assert!(kv.append(seq, longest as usize).is_ok());
        assert!(kv.append(seq, 1).is_err());
    }

    #[test]
    fn multi_gpu_plans_split_experts_and_heads() {
        let c = ModelConfig::mistral_small_4();
        for p in standard_plans(&c).unwrap() {
            assert!(p.fits(1), "{p}");
            assert_eq!(p.gpus.len(), p.world);
            // KV per token is the MLA latent: 320 values x 36 layers x 2 bytes = 23,040 bytes on every GPU.
            assert!(p.gpus.iter().all(|g| g.kv_bytes_per_token == 23_040));
        }
        let one = plan(&c, "1", GpuSpec::H200, 1, FormatChoice::all(WeightFormat::Bf16), Workload::default()).unwrap();
        let eight = plan(&c, "8", GpuSpec::H200, 8, FormatChoice::all(WeightFormat::Bf16), Workload::default()).unwrap();
        let routed = |p: &MemoryPlan| p.gpus[0].weights.iter().find(|w| w.0 == "routed experts").unwrap().2;
        assert_eq!(routed(&one), 8 * routed(&eight));
        // bf16 everywhere: ~119.4B parameters x 2 bytes, replicated parts counted once per GPU.
        assert!((one.total_weight_bytes() as f64 / (2.0 * 119.4e9) - 1.0).abs() < 0.01, "{}", one.total_weight_bytes());
        assert!(!one.fits(1), "239 GB of bf16 weights cannot fit one H200: {one}");
        assert!(one.gpus[0].kv_capacity_tokens == 0 && one.to_string().contains("DOES NOT FIT"));
    }

    #[test]
    fn uneven_splits_are_config_errors() {
        let c = ModelConfig::mistral_small_4();
        assert!(matches!(plan(&c, "3", GpuSpec::H100_80GB, 3, FormatChoice::NVFP4_EXPERTS, Workload::default()), Err(Error::Config(_))));
    }
}
