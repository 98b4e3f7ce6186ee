//! The forward pass on a device, written in the llm.c manner: [`Network::run`] is the whole network as a plain list
//! of kernel calls, one line per step of the architecture (SPEC-model.md), over the activation [`Workspace`] of a
//! batch and the output [`Head`]'s rows. It only launches kernels (no allocation, no copy), so the engine can capture
//! a decode step's run as a graph; what runs when is the engine's (`model::engine`).

use std::sync::Arc;

use half::bf16;

use crate::device::collective::Collective;
use crate::device::DeviceBuffer;
use crate::kernels::attention::{self, AttentionScratch, BlockTables, CacheWriteWeights, PagedCache, Queries, QueryLatentNorm, QueryLayout, TokenSlots};
use crate::kernels::dense;
use crate::kernels::gemm::{self, RowCounters};
use crate::kernels::moe::{self, Grouping, MoeWorkspace, RoutingBuffers};
use crate::kernels::moe_wgmma::PrefillGemm;
use crate::kernels::moe_wgmma_fp8::{self, Fp8ActScratch};
use crate::kernels::norm::{self, ResidualNorm};
use crate::kernels::ops::{self, GatherStatus, QueryScale};
use crate::kernels::router::{self, RouterConfig, RouterWorkspace, Routing};
use crate::kernels::vision::{self as vision_kernels, RowTargets};
use crate::model::decode_prefetch::LayerPrefetch;
use crate::model::device_model::DeviceModel;
use crate::model::engine::EngineOptions;
use crate::{Error, Result};

/// Activations of one forward pass over `tokens` tokens, allocated once per batch size and reused (a CUDA graph
/// replays over fixed buffers).
pub(super) struct Workspace {
    pub(super) tokens: usize,
    pub(super) ids: DeviceBuffer<i32>,
    pub(super) positions: DeviceBuffer<i32>,
    /// Residual stream, ping-ponged by the fused add + norm: x[0] holds it at the start of every layer.
    x: [DeviceBuffer<bf16>; 2],
    /// Normed input of the current block.
    h: DeviceBuffer<bf16>,
    /// `[tokens, q_lora_rank + kv_lora_rank + rope]`: `[q_a | kv]`, the stacked GEMM's output; the cache writer
    /// reads the kv columns (the wkv_a_with_mqa output).
    qkv_a: DeviceBuffer<bf16>,
    q_a_normed: DeviceBuffer<bf16>,
    /// `[tokens, local heads, nope + rope]`
    q: DeviceBuffer<bf16>,
    q_lat: DeviceBuffer<bf16>,
    o_lat: DeviceBuffer<bf16>,
    /// `[tokens, local heads * v_head]`
    attn: DeviceBuffer<bf16>,
    /// `[tokens, dim]`: wo's output, then the MoE block's.
    block_out: DeviceBuffer<bf16>,
    /// Tensor-parallel attention over 2+ ranks: where the partial `wo` outputs are summed.
    attention_sum: Option<AttentionSum>,
    router: RouterWorkspace,
    routing: Routing,
    moe: MoeWorkspace,
    /// One zero counter per token for the GEMMs that finish their rows in the same launch (the latent projection, wo,
    /// the experts' down projection: one GPU).
    row_counters: RowCounters,
    /// Where the fp8-activation prefill GEMMs (`PrefillGemm::WgmmaFp8Act`) quantise their inputs: sized here for the
    /// largest of the batch's fp8 GEMMs when that choice is in force, grown by a launch that needs more otherwise.
    /// `Network::run` passes it to each dense GEMM launch; `moe.fp8_act` holds it for the MoE launches.
    fp8_act: Arc<Fp8ActScratch>,
}

/// The f32 buffer a tensor-parallel rank's `wo` writes its partial sum into, all-reduced across the ranks, and the
/// ids that let the MoE combine kernel round it to bf16: with one "pair" per token and expert 0 valid, the combine
/// computes `out[t] = bf16(sum[t])`, the single rounding one rank applies to its whole `wo` output.
struct AttentionSum {
    /// `[tokens, dim]`
    sum: DeviceBuffer<f32>,
    /// `[tokens]` zeros.
    one_pair_ids: DeviceBuffer<i32>,
}

/// Which rows the output head runs over.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum HeadRows {
    /// Each sequence's last token (a step: only those rows are sampled).
    Last,
    /// Every token (`Engine::forward_logits`, for the tests' comparison with the reference).
    All,
}

/// The output head's rows and results: `rows` rows of the final norm's output gathered in batch order, their f32
/// logits and the chosen ids. Sized by the rows (sequences in a step), not by the tokens: a 2048-token prefill of one
/// sequence computes one row of logits (131072 x 4 bytes), not 2048 of them (1 GiB at the model's vocabulary).
pub(super) struct Head {
    pub(super) rows: usize,
    /// Row of the final norm's output each head row reads.
    pub(super) source_rows: DeviceBuffer<i32>,
    h: DeviceBuffer<bf16>,
    pub(super) logits: DeviceBuffer<f32>,
    pub(super) next: DeviceBuffer<i32>,
}

impl Head {
    pub(super) fn new(model: &DeviceModel, rows: usize) -> Result<Self> {
        let (c, d) = (&model.config, &model.device);
        Ok(Head {
            rows,
            source_rows: DeviceBuffer::alloc(d, rows)?,
            h: DeviceBuffer::alloc(d, rows * c.dim)?,
            logits: DeviceBuffer::alloc(d, rows * c.vocab)?,
            next: DeviceBuffer::alloc(d, rows)?,
        })
    }
}

impl Workspace {
    pub(super) fn new(model: &DeviceModel, tokens: usize) -> Result<Self> {
        let (c, d) = (&model.config, &model.device);
        let bf = |len: usize| DeviceBuffer::<bf16>::alloc(d, len);
        let local = model.expert_map.local_experts();
        let tile_m = moe::moe_tile_m(tokens, c.experts_per_token, local);
        let routing = Routing::alloc(d, tokens, c.experts_per_token, local, tile_m)?;
        let fp8_act = fp8_act_scratch(model, tokens, routing.alignment.max_padded)?;
        // The MoE launches quantise into the same scratch as the dense ones.
        let moe = MoeWorkspace {
            fp8_act: Some(fp8_act.clone()),
            ..MoeWorkspace::new(d, &model.layers[0].moe, tokens, c.experts_per_token, routing.alignment.max_padded)?
        };
        let heads = model.heads.len();
        let latent_rows = tokens * heads;
        let attention_sum = if model.shard.partial_attention_output() {
            Some(AttentionSum { sum: DeviceBuffer::alloc(d, tokens * c.dim)?, one_pair_ids: DeviceBuffer::from_slice(d, &vec![0i32; tokens])? })
        } else {
            None
        };
        Ok(Workspace {
            tokens,
            ids: DeviceBuffer::alloc(d, tokens)?,
            positions: DeviceBuffer::alloc(d, tokens)?,
            x: [bf(tokens * c.dim)?, bf(tokens * c.dim)?],
            h: bf(tokens * c.dim)?,
            qkv_a: bf(tokens * (c.q_lora_rank + c.kv_lora_rank + c.qk_rope))?,
            q_a_normed: bf(tokens * c.q_lora_rank)?,
            q: bf(latent_rows * c.qk_head_dim())?,
            q_lat: bf(latent_rows * c.kv_lora_rank)?,
            o_lat: bf(latent_rows * c.kv_lora_rank)?,
            attn: bf(tokens * heads * c.v_head)?,
            block_out: bf(tokens * c.dim)?,
            attention_sum,
            router: RouterWorkspace::new(d, tokens, c.experts, c.dim)?,
            routing,
            moe,
            row_counters: RowCounters::new(d, tokens)?,
            fp8_act,
        })
    }
}

/// The scratch of the fp8-activation GEMMs for a batch of `tokens` tokens whose grouping holds `slots` slots:
/// reserved for the largest input among the GEMMs that kernel serves (the fp8 attention projections and shared
/// expert over the tokens, the routed experts' up over the tokens and down over the slots) when
/// `PrefillGemm::WgmmaFp8Act` is chosen, empty otherwise.
fn fp8_act_scratch(model: &DeviceModel, tokens: usize, slots: usize) -> Result<Arc<Fp8ActScratch>> {
    let scratch = Arc::new(Fp8ActScratch::new(&model.device));
    if PrefillGemm::current()? != PrefillGemm::WgmmaFp8Act {
        return Ok(scratch);
    }
    // (rows, k) of each launch: the dense ones of one matrix, and the grouped ones (one launch over all experts).
    let mut inputs: Vec<(usize, usize)> = Vec::new();
    for layer in &model.layers {
        let shared = layer.moe.shared.iter().flat_map(|(up, down)| [up, down]);
        for w in [&layer.wqkv_a, &layer.wq_b, &layer.wo].into_iter().chain(shared) {
            if moe_wgmma_fp8::serves(w.format, w.experts, w.k_dim) {
                inputs.push((tokens, w.k_dim));
            }
        }
        for (w, rows) in [(&layer.moe.gate_up, tokens), (&layer.moe.down, slots)] {
            if moe_wgmma_fp8::serves(w.format, 1, w.k_dim) {
                inputs.push((rows, w.k_dim));
            }
        }
    }
    if let Some(&(rows, k_dim)) = inputs.iter().max_by_key(|(rows, k_dim)| rows * k_dim) {
        scratch.reserve(rows, k_dim)?;
    }
    Ok(scratch)
}

/// What the network reads besides a step's buffers: the weights, the caches and the options. Its `run` only
/// launches kernels (no allocation, no copy), so a decode step's run can be captured as a graph.
pub(super) struct Network<'a> {
    pub(super) model: &'a DeviceModel,
    pub(super) caches: &'a [PagedCache],
    pub(super) options: &'a EngineOptions,
    pub(super) collective: Option<&'a dyn Collective>,
    pub(super) gather_status: &'a GatherStatus,
    /// `EngineOptions::record_routing`: where each layer's router ids are copied (`[layers, tokens, k]`).
    pub(super) routing_record: Option<&'a DeviceBuffer<i32>>,
}

/// A prefill's image features and the `[IMG]` rows of the step they replace after the embedding gather.
pub(super) struct ImageRows<'a> {
    pub(super) features: &'a DeviceBuffer<bf16>,
    pub(super) rows: &'a RowTargets,
}

impl Network<'_> {
    /// The whole network over the tokens of `ws` (ids and positions already written): embedding, the layers, the
    /// final norm and the output head over `head`'s rows. Launches kernels only (the fp8-activation GEMMs quantise
    /// into the workspace's scratch, `ws.fp8_act`, passed to each GEMM launch).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &self,
        ws: &Workspace,
        head: &Head,
        tables: &BlockTables,
        layout: &QueryLayout,
        slots: &TokenSlots,
        scratch: &mut AttentionScratch,
        images: Option<&ImageRows>,
    ) -> Result<()> {
        let c = &self.model.config;
        let device = &self.model.device;
        let t = ws.tokens;
        let m = self.model;
        // This rank's query heads: every tensor that is per head below holds only these.
        let (dim, heads, eps) = (c.dim, m.heads.len(), c.norm_eps);
        let (qk, nope, rank, v_head) = (c.qk_head_dim(), c.qk_nope, c.kv_lora_rank, c.v_head);
        let k = c.experts_per_token;
        let router_config = RouterConfig { k, routed_scale: c.routed_scale, tile_m: ws.routing.alignment.tile_m };
        let query_scale = QueryScale { beta: c.llama4_beta, original_max_position: c.llama4_original_max_position };
        let [x, x_mid] = &ws.x;
        let fp8_act = Some(&*ws.fp8_act);

        ops::embedding_gather(ws.ids.view([t])?, m.tok_embeddings.view([c.vocab, dim])?, x.view([t, dim])?, self.gather_status)?;
        if let Some(images) = images {
            vision_kernels::scatter_rows(images.features.view([images.rows.len(), dim])?, images.rows, x.view([t, dim])?)?;
        }
        norm::rms_norm(x.view([t, dim])?, m.layers[0].attention_norm.as_vector(), ws.h.view([t, dim])?, eps)?;
        // Only the latency-bound steps prefetch (model::decode_prefetch says which).
        let prefetching = self.options.l2_prefetch && t <= gemm::DECODE_MAX_ROWS;
        for (l, layer) in m.layers.iter().enumerate() {
            // What this layer's latency-bound launches pull into L2 for the GEMMs after them.
            let prefetch =
                if prefetching { LayerPrefetch::plan(&layer.wo, layer.moe.shared.as_ref().map(|(gate_up, _)| gate_up))? } else { LayerPrefetch::default() };
            // Attention: q = wq_b(q_a_norm(wq_a h)); cache row = [kv_a_norm(c) | rope(k_rope)].
            let qkv_a = ws.qkv_a.view([t, c.q_lora_rank + rank + c.qk_rope])?;
            // One launch: the stacked GEMM, then each finished row's q_a norm and kv cache write.
            let write = CacheWriteWeights { norm_weight: layer.kv_a_norm.as_vector(), eps, inv_freq: m.inv_freq.as_vector() };
            let q_norm = QueryLatentNorm { weight: layer.q_a_norm.as_vector(), out: ws.q_a_normed.view([t, c.q_lora_rank])?, eps };
            attention::latent_projection(
                &layer.wqkv_a,
                ws.h.view([t, dim])?,
                qkv_a,
                &q_norm,
                &self.caches[l],
                tables,
                &write,
                slots,
                &ws.row_counters,
                fp8_act,
            )?;
            // wq_b with the query's RoPE and llama-4 scale in its epilogue.
            let (positions, inv_freq) = (ws.positions.view([t])?, m.inv_freq.as_vector());
            dense::linear_rope_q(&layer.wq_b, ws.q_a_normed.view([t, c.q_lora_rank])?, ws.q.view([t, heads, qk])?, positions, inv_freq, query_scale, fp8_act)?;
            // Absorb W_UK into the query (all heads in one launch); the attention reads each head's rope half in place.
            dense::linear_per_head_prefetching(&layer.w_uk, ws.q.view([t, heads, qk])?, ws.q_lat.view([t, heads, rank])?, fp8_act, &prefetch.absorb_query)?;
            let queries = Queries { layout, q_lat: ws.q_lat.view([t, heads, rank])?, q_rope: ws.q.view([t * heads, qk])?.columns(nope..qk)? };
            attention::mla_attention_prefetching(
                &self.caches[l],
                tables,
                &queries,
                ws.o_lat.view([t, heads, rank])?,
                c.softmax_scale(),
                self.options.attention_splits,
                scratch,
                &prefetch.attention,
            )?;
            let attn = ws.attn.view([t, heads * v_head])?;
            dense::linear_per_head_prefetching(
                &layer.w_uv,
                ws.o_lat.view([t, heads, rank])?,
                ws.attn.view([t, heads, v_head])?,
                fp8_act,
                &prefetch.absorb_output,
            )?;
            // wo, the residual add and the MoE block's norm: x_mid = wo(attn) + x, h = ffn_norm(x_mid).
            let ffn_norm = ResidualNorm {
                residual: x.view([t, dim])?,
                weight: layer.ffn_norm.as_vector(),
                residual_out: x_mid.view([t, dim])?,
                out: ws.h.view([t, dim])?,
                eps,
            };
            match &ws.attention_sum {
                None => dense::linear_add_rms_norm(&layer.wo, attn, ws.block_out.view([t, dim])?, &ffn_norm, &ws.row_counters, fp8_act)?,
                Some(partial) => {
                    // Tensor parallelism: this rank's heads give a partial sum of wo's output; the ranks add theirs
                    // in f32 and round once, as one rank rounds its whole output.
                    let col = self.collective.ok_or_else(|| Error::InvalidArgument("tensor-parallel attention needs the ranks' collective".into()))?;
                    dense::linear_f32(&layer.wo, attn, partial.sum.view([t, dim])?, fp8_act)?;
                    col.all_reduce_sum_f32(&partial.sum)?;
                    moe::combine(partial.sum.view([t, dim])?, None, partial.one_pair_ids.view([t, 1])?, None, 1, ws.block_out.view([t, dim])?)?;
                    norm::add_rms_norm(ws.block_out.view([t, dim])?, ffn_norm.residual, ffn_norm.weight, ffn_norm.residual_out, ffn_norm.out, eps)?;
                }
            }

            // Mixture of experts: route, grouped up (SwiGLU), grouped down (x routing weight), shared, combine.
            let gate = layer.gate.view([c.experts, dim])?;
            router::route_and_align_prefetching(ws.h.view([t, dim])?, gate, &m.expert_map, &router_config, &ws.router, &ws.routing, &prefetch.router)?;
            if let Some(record) = self.routing_record {
                record.copy_within_device(l * t * k, &ws.routing.topk_ids, 0, t * k)?;
            }
            let a = &ws.routing.alignment;
            let grouping = Grouping {
                sorted_pairs: &a.sorted_pairs,
                tile_experts: &a.tile_experts,
                expert_offsets: &a.expert_offsets,
                num_padded: &a.num_padded,
                tile_m: a.tile_m,
            };
            if self.collective.is_some() {
                // Pairs of other ranks' experts stay zero here and arrive by the all-reduce.
                device.memset(ws.moe.pair_out.addr(), 0, ws.moe.pair_out.bytes())?;
            }
            let (h, topk_weights) = (ws.h.view([t, dim])?, ws.routing.topk_weights.view([t, k])?);
            // The residual add after the MoE block and the next block's norm: x = moe(h) + x_mid, h = norm(x).
            let next_norm = m.layers.get(l + 1).map_or(&m.norm, |next| &next.attention_norm);
            let residual_norm = ResidualNorm {
                residual: x_mid.view([t, dim])?,
                weight: next_norm.as_vector(),
                residual_out: x.view([t, dim])?,
                out: ws.h.view([t, dim])?,
                eps,
            };
            let topk_ids = ws.routing.topk_ids.view([t, k])?;
            match &self.collective {
                // One GPU: the shared expert rides in the routed experts' two launches, and the second one combines
                // each token's pairs, adds the residual and norms as the token's last pair is written.
                None => {
                    let routing = RoutingBuffers { topk_ids, topk_weights, expert_map: None, experts: c.experts };
                    moe::moe_layer_add_rms_norm(&layer.moe, h, &routing, &grouping, &ws.moe, &residual_norm, &ws.row_counters)?;
                }
                // Several: the routed pairs are summed over the ranks, the (replicated) shared expert is not.
                Some(col) => {
                    moe::routed_experts(&layer.moe, h, &grouping, topk_weights, &ws.moe)?;
                    col.all_reduce_sum_f32(&ws.moe.pair_out)?;
                    let shared = match &layer.moe.shared {
                        Some(s) => {
                            moe::shared_expert(s, h, &ws.moe)?;
                            Some(ws.moe.shared_out.view([t, dim])?)
                        }
                        None => None,
                    };
                    let pairs =
                        norm::MoePairs { pair_out: ws.moe.pair_out.view([t * k, dim])?, shared_out: shared, topk_ids, expert_map: None, experts: c.experts };
                    let r = &residual_norm;
                    norm::moe_combine_add_rms_norm(&pairs, r.residual, r.weight, r.residual_out, r.out, eps)?;
                }
            }
        }
        // ws.h is the final norm's output: gather the head's rows (host-computed, always in range), then the head.
        ops::embedding_gather(head.source_rows.as_vector(), ws.h.view([t, dim])?, head.h.view([head.rows, dim])?, self.gather_status)?;
        dense::linear_f32(&m.output, head.h.view([head.rows, dim])?, head.logits.view([head.rows, c.vocab])?, fp8_act)?;
        Ok(())
    }
}
