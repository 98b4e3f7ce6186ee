//! The mixture-of-experts block on the CPU: router (softmax over all experts in f32, top-k with ties to the lower
//! index, renormalisation, routed scale) and SwiGLU experts.

use std::convert::Infallible;

use rayon::prelude::*;

use super::linear::matmul_nt;
use crate::model::checkpoint::ExpertMatrix;
use crate::quant::fp8::{e4m3_to_f32, f32_to_e4m3};
use crate::{Error, Result};

/// Top-k choice for each token: `ids[t * k + j]` and `weights[t * k + j]`, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub ids: Vec<i32>,
    pub weights: Vec<f32>,
}

/// Router logits `hidden [tokens, dim] . gate [experts, dim]^T` -> [tokens, experts].
pub fn router_logits(hidden: &[f32], gate: &[f32], tokens: usize, dim: usize, experts: usize) -> Vec<f32> {
    matmul_nt(hidden, gate, tokens, dim, experts)
}

/// softmax over all experts, top-k (ties to the lower index), `w / (sum w + 1e-20) * routed_scale`.
pub fn route(logits: &[f32], experts: usize, k: usize, routed_scale: f32) -> Routing {
    assert!(k >= 1 && k <= experts && logits.len() % experts == 0, "route: k {k} of {experts} experts");
    let tokens = logits.len() / experts;
    let mut routing = Routing { k, ids: Vec::with_capacity(tokens * k), weights: Vec::with_capacity(tokens * k) };
    for row in logits.chunks_exact(experts) {
        let probs = softmax(row);
        let mut order: Vec<usize> = (0..experts).collect();
        // Stable sort by descending probability keeps the lower index first among equals.
        order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap_or(std::cmp::Ordering::Equal));
        routing.push_renormalised(&probs, &order[..k], routed_scale);
    }
    routing
}

/// The routing of the given experts `ids` (`[tokens, k]`, chosen elsewhere: teacher forcing with the engine's
/// routing) weighted by these router `logits` as [`route`] weighs its own choice: each token's softmax over all
/// experts, the given experts' probabilities renormalised and times `routed_scale`, in the given order.
/// `Error::Shape` when `ids` is not `k` per token of `logits`, `Error::OutOfRange` for an id outside the experts,
/// `Error::InvalidArgument` for an expert given twice to one token.
///
/// ```
/// use small4::reference::moe::{route, route_forced};
///
/// let logits = [0.5, 2.0, 1.9, -1.0];
/// // The router's own choice, forced, gives the router's routing.
/// assert_eq!(route_forced(&logits, 4, &[1, 2], 2, 1.0)?, route(&logits, 4, 2, 1.0));
/// // Another choice keeps the router's probabilities of those experts, renormalised.
/// let forced = route_forced(&logits, 4, &[1, 0], 2, 1.0)?;
/// assert!((forced.weights[0] - 1.0 / (1.0 + (-1.5f32).exp())).abs() < 1e-6);
/// assert!(route_forced(&logits, 4, &[1, 1], 2, 1.0).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn route_forced(logits: &[f32], experts: usize, ids: &[i32], k: usize, routed_scale: f32) -> Result<Routing> {
    let tokens = logits.len() / experts.max(1);
    if k == 0 || k > experts || logits.len() != tokens * experts || ids.len() != tokens * k {
        return Err(Error::shape("forced routing ids [tokens, k]", format!("[{tokens}, {k}] of {experts} experts"), ids.len()));
    }
    let mut routing = Routing { k, ids: Vec::with_capacity(ids.len()), weights: Vec::with_capacity(ids.len()) };
    for (row, given) in logits.chunks_exact(experts).zip(ids.chunks_exact(k)) {
        let chosen: Vec<usize> = given
            .iter()
            .map(|&id| {
                usize::try_from(id).ok().filter(|&e| e < experts).ok_or(Error::OutOfRange {
                    what: "forced expert id".into(),
                    index: id.into(),
                    limit: experts as i64,
                })
            })
            .collect::<Result<_>>()?;
        if let Some(twice) = chosen.iter().enumerate().find(|(j, e)| chosen[..*j].contains(e)).map(|(_, e)| e) {
            return Err(Error::InvalidArgument(format!("forced routing gives expert {twice} twice to one token")));
        }
        routing.push_renormalised(&softmax(row), &chosen, routed_scale);
    }
    Ok(routing)
}

impl Routing {
    /// Appends one token's `chosen` experts with their probabilities renormalised over the chosen ones, times
    /// `routed_scale`: `p / (sum p + 1e-20) * routed_scale`, the router kernel's formula.
    fn push_renormalised(&mut self, probs: &[f32], chosen: &[usize], routed_scale: f32) {
        let sum: f32 = chosen.iter().map(|&e| probs[e]).sum();
        for &e in chosen {
            self.ids.push(e as i32);
            self.weights.push(probs[e] / (sum + 1e-20) * routed_scale);
        }
    }
}

/// How far the experts `forced` (one token's) are from the choice these router logits make: the `k`-th largest
/// logit minus the smallest logit among `forced` (`k = forced.len()`), 0 when `forced` is the router's own choice
/// (or a tie with it). A computation whose router logits differ from these by less than half of this gap could not
/// have chosen `forced`: teacher-forced tests bound it to tell a rounding near-tie from a wrong routing.
///
/// ```
/// use small4::reference::moe::forcing_gap;
///
/// let row = [0.5, 2.0, 1.9, -1.0];
/// assert_eq!(forcing_gap(&row, &[2, 1]), 0.0); // the top 2, in another order
/// assert!((forcing_gap(&row, &[1, 0]) - 1.4).abs() < 1e-6); // expert 0 (0.5) instead of expert 2 (1.9)
/// ```
pub fn forcing_gap(logits_row: &[f32], forced: &[i32]) -> f32 {
    let Some(weakest) = forced.iter().filter_map(|&id| usize::try_from(id).ok().and_then(|e| logits_row.get(e))).copied().reduce(f32::min) else {
        return 0.0;
    };
    let mut sorted = logits_row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    (sorted[forced.len().min(sorted.len()) - 1] - weakest).max(0.0)
}

/// How far a token's routing is from a different choice of experts: the gap between its `k`-th and `(k+1)`-th largest
/// router logits (infinite when every expert is chosen). A computation whose router logits differ from these by less
/// than half the gap picks the same experts; the engine tests exclude positions whose gap is within their noise.
pub fn routing_margin(logits_row: &[f32], k: usize) -> f32 {
    if k >= logits_row.len() {
        return f32::INFINITY;
    }
    let mut sorted = logits_row.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    sorted[k - 1] - sorted[k]
}

/// Numerically stable softmax in f32 (max subtracted).
pub fn softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = row.iter().map(|&v| (v - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|&e| e / sum).collect()
}

pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// One SwiGLU expert on `tokens` rows: `w2 (silu(w1 x) * w3 x)`; w1, w3 [hidden, dim], w2 [dim, hidden].
pub fn swiglu_expert(x: &[f32], w1: &[f32], w3: &[f32], w2: &[f32], tokens: usize, dim: usize, hidden: usize) -> Vec<f32> {
    swiglu_expert_with(x, w1, w3, w2, tokens, dim, hidden, false)
}

/// [`swiglu_expert`] with the activation `silu(w1 x) * w3 x` rounded to bf16 when `act_bf16` (the grouped GEMM
/// stores it in bf16 between the up and the down projection).
#[allow(clippy::too_many_arguments)]
pub fn swiglu_expert_with(x: &[f32], w1: &[f32], w3: &[f32], w2: &[f32], tokens: usize, dim: usize, hidden: usize, act_bf16: bool) -> Vec<f32> {
    swiglu_by(x, act_bf16, None, f32_projection([w1, w3, w2], tokens, dim, hidden)).unwrap_or_else(|never| match never {})
}

/// `project` of [`swiglu_by`] over f32 matrices `[w1, w3, w2]` (w1, w3 [hidden, dim], w2 [dim, hidden]).
fn f32_projection<'a>(w: [&'a [f32]; 3], tokens: usize, dim: usize, hidden: usize) -> impl FnMut(ExpertMatrix, &[f32]) -> Result<Vec<f32>, Infallible> + 'a {
    move |which, input| {
        Ok(match which {
            ExpertMatrix::W1 => matmul_nt(input, w[0], tokens, dim, hidden),
            ExpertMatrix::W3 => matmul_nt(input, w[1], tokens, dim, hidden),
            ExpertMatrix::W2 => matmul_nt(input, w[2], tokens, hidden, dim),
        })
    }
}

/// The SwiGLU `w2 (silu(w1 x) * w3 x)` of the rows `x`, where `project(which, input)` returns `input . W^T` for the
/// expert's matrix `which` (from f32 slices, or from weights dequantised block by block as the streaming reference
/// reads them): the one place the expert's arithmetic is written. The activation is rounded to bf16 when `act_bf16`.
/// With W8A8 `act_scales` (up input, down input) the up projections read `x` quantised with the first
/// ([`quantize_act_e4m3`]), the activation is rounded to bf16 (the GEMM stores it so, whatever `act_bf16`) and the
/// down projection reads it quantised with the second.
pub fn swiglu_by<E>(
    x: &[f32],
    act_bf16: bool,
    act_scales: Option<(f32, f32)>,
    mut project: impl FnMut(ExpertMatrix, &[f32]) -> Result<Vec<f32>, E>,
) -> Result<Vec<f32>, E> {
    let quantized;
    let input = match act_scales {
        Some((up_scale, _)) => {
            quantized = quantize_act_e4m3(x, up_scale);
            &quantized
        }
        None => x,
    };
    let gate = project(ExpertMatrix::W1, input)?;
    let up = project(ExpertMatrix::W3, input)?;
    let mut act: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect();
    if act_bf16 || act_scales.is_some() {
        super::linear::round_bf16(&mut act);
    }
    match act_scales {
        Some((_, down_scale)) => project(ExpertMatrix::W2, &quantize_act_e4m3(&act, down_scale)),
        None => project(ExpertMatrix::W2, &act),
    }
}

/// The weights of one SwiGLU expert, f32, as stored [out, in].
#[derive(Clone, Debug)]
pub struct ExpertWeights {
    pub w1: Vec<f32>,
    pub w3: Vec<f32>,
    pub w2: Vec<f32>,
}

/// The whole MoE block for `tokens` rows: shared expert + sum_k w_k * expert_k(x).
/// `experts[e]` may be `None` for experts this rank does not own (expert parallelism): their contribution is skipped.
pub fn moe_block(
    x: &[f32],
    routing: &Routing,
    experts: &[Option<ExpertWeights>],
    shared: Option<&ExpertWeights>,
    tokens: usize,
    dim: usize,
    hidden: usize,
) -> Vec<f32> {
    moe_block_with(x, routing, experts, shared, tokens, dim, hidden, false)
}

/// [`moe_block`] with each expert's SwiGLU activation rounded to bf16 when `act_bf16`.
#[allow(clippy::too_many_arguments)]
pub fn moe_block_with(
    x: &[f32],
    routing: &Routing,
    experts: &[Option<ExpertWeights>],
    shared: Option<&ExpertWeights>,
    tokens: usize,
    dim: usize,
    hidden: usize,
    act_bf16: bool,
) -> Vec<f32> {
    let shared_out = shared.map(|s| swiglu_expert_with(x, &s.w1, &s.w3, &s.w2, tokens, dim, hidden, act_bf16));
    routed_sum(x, routing, experts, shared_out, tokens, dim, |row, e| swiglu_expert_with(row, &e.w1, &e.w3, &e.w2, 1, dim, hidden, act_bf16))
}

/// `shared_out` (or zeros) + sum_k w_k * expert(x row, expert_k) per token, over the owned experts (ids < 0 and
/// `None` experts skipped).
fn routed_sum(
    x: &[f32],
    routing: &Routing,
    experts: &[Option<ExpertWeights>],
    shared_out: Option<Vec<f32>>,
    tokens: usize,
    dim: usize,
    expert: impl Fn(&[f32], &ExpertWeights) -> Vec<f32> + Sync,
) -> Vec<f32> {
    let mut out = shared_out.unwrap_or_else(|| vec![0.0; tokens * dim]);
    // Tokens are independent: one task per output row.
    out.par_chunks_mut(dim.max(1)).enumerate().for_each(|(t, out_row)| {
        let row = &x[t * dim..(t + 1) * dim];
        for j in 0..routing.k {
            let id = routing.ids[t * routing.k + j];
            let Some(Some(e)) = usize::try_from(id).ok().and_then(|i| experts.get(i)) else { continue };
            let y = expert(row, e);
            let w = routing.weights[t * routing.k + j];
            for (o, v) in out_row.iter_mut().zip(&y) {
                *o += w * v;
            }
        }
    });
    out
}

/// W8A8 activations: `e4m3(x * (1 / scale)) * scale` per element, e4m3 rounding to nearest even and saturating to
/// ±448 (`f32_to_e4m3`, the rule of PTX `cvt.rn.satfinite.e4m3x2.f32`). The reciprocal is taken once in f32 and
/// multiplied, as the device's quantiser (`kernels::moe::quantize_act_e4m3`) does, so both pick the same codes.
pub fn quantize_act_e4m3(x: &[f32], scale: f32) -> Vec<f32> {
    let inv_scale = 1.0 / scale;
    x.iter().map(|&v| e4m3_to_f32(f32_to_e4m3(v * inv_scale)) * scale).collect()
}

/// One SwiGLU expert in W8A8 on `tokens` rows: the input quantised with `scales.0` ([`quantize_act_e4m3`]), the
/// activation `silu(w1 x) * w3 x` rounded to bf16 (the GEMM stores it so) and quantised with `scales.1`. The weights
/// are the dequantised fp8 values; products of e4m3 values are exact in f32.
pub fn swiglu_expert_w8a8(x: &[f32], e: &ExpertWeights, tokens: usize, dim: usize, hidden: usize, scales: (f32, f32)) -> Vec<f32> {
    swiglu_by(x, true, Some(scales), f32_projection([&e.w1, &e.w3, &e.w2], tokens, dim, hidden)).unwrap_or_else(|never| match never {})
}

/// [`moe_block`] with the routed experts in W8A8 ([`swiglu_expert_w8a8`], `scales` = (up input, down input)); the
/// shared expert keeps bf16 activations, as `kernels::moe::moe_layer` runs it.
#[allow(clippy::too_many_arguments)]
pub fn moe_block_w8a8(
    x: &[f32],
    routing: &Routing,
    experts: &[Option<ExpertWeights>],
    shared: Option<&ExpertWeights>,
    tokens: usize,
    dim: usize,
    hidden: usize,
    scales: (f32, f32),
) -> Vec<f32> {
    let shared_out = shared.map(|s| swiglu_expert(x, &s.w1, &s.w3, &s.w2, tokens, dim, hidden));
    routed_sum(x, routing, experts, shared_out, tokens, dim, |row, e| swiglu_expert_w8a8(row, e, 1, dim, hidden, scales))
}

/// The grouping of (token, expert) pairs that the grouped GEMM consumes (the router's alignment produces the same on
/// the device). Pair p = t * k + j. Only locally owned experts appear (`expert_map[id] >= 0`).
#[derive(Clone, Debug, PartialEq)]
pub struct Alignment {
    /// [local experts] pairs per local expert.
    pub expert_counts: Vec<i32>,
    /// [local experts + 1] first slot of each expert: prefix sums of the counts rounded up to `tile_m`.
    pub expert_offsets: Vec<i32>,
    /// `[capacity]` pairs grouped by local expert, increasing p inside an expert, padding -1.
    pub sorted_pairs: Vec<i32>,
    /// [capacity / tile_m] local expert of each tile of `tile_m` slots, -1 past the end.
    pub tile_experts: Vec<i32>,
    /// Slots in use (the last offset).
    pub num_padded: i32,
}

/// Slots the grouping may need for `pairs` pairs over `local_experts` experts: every non-empty expert wastes at most
/// tile_m - 1 slots, and at most min(pairs, experts) experts are non-empty. A multiple of `tile_m`.
pub fn max_padded_slots(pairs: usize, local_experts: usize, tile_m: usize) -> usize {
    (pairs + pairs.min(local_experts) * (tile_m - 1)).next_multiple_of(tile_m)
}

/// Groups the pairs of `ids` ([tokens * k] global expert ids) by local expert. `expert_map[global] = local or -1`
/// (None: identity over `local_experts`); ids < 0 are skipped too. Buffers are sized by [`max_padded_slots`].
pub fn align_pairs(ids: &[i32], expert_map: Option<&[i32]>, local_experts: usize, tile_m: usize) -> Alignment {
    assert!(tile_m >= 1, "align_pairs: tile_m 0");
    let local = |id: i32| -> Option<usize> {
        let id = usize::try_from(id).ok()?;
        let l = match expert_map {
            Some(map) => usize::try_from(*map.get(id)?).ok()?,
            None => id,
        };
        (l < local_experts).then_some(l)
    };
    let mut lists = vec![Vec::new(); local_experts];
    for (p, &id) in ids.iter().enumerate() {
        if let Some(l) = local(id) {
            lists[l].push(p as i32);
        }
    }
    let capacity = max_padded_slots(ids.len(), local_experts, tile_m);
    let mut sorted_pairs = vec![-1; capacity];
    let mut tile_experts = vec![-1; capacity / tile_m];
    let mut expert_offsets = vec![0i32; local_experts + 1];
    let mut slot = 0usize;
    for (e, list) in lists.iter().enumerate() {
        expert_offsets[e] = slot as i32;
        sorted_pairs[slot..slot + list.len()].copy_from_slice(list);
        let padded = list.len().next_multiple_of(tile_m);
        tile_experts[slot / tile_m..(slot + padded) / tile_m].fill(e as i32);
        slot += padded;
    }
    expert_offsets[local_experts] = slot as i32;
    Alignment { expert_counts: lists.iter().map(|l| l.len() as i32).collect(), expert_offsets, sorted_pairs, tile_experts, num_padded: slot as i32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_lower_index_and_weights_renormalise() {
        let logits = [0.5, 2.0, 2.0, -1.0, 2.0, 0.0];
        let r = route(&logits, 6, 2, 1.0);
        assert_eq!(r.ids, vec![1, 2]);
        assert!((r.weights[0] - 0.5).abs() < 1e-6 && (r.weights[1] - 0.5).abs() < 1e-6);
        let r = route(&logits, 6, 4, 2.0);
        assert_eq!(r.ids, vec![1, 2, 4, 0]);
        assert!((r.weights.iter().sum::<f32>() - 2.0).abs() < 1e-5);
    }

    #[test]
    fn alignment_groups_pairs_by_local_expert_with_padding() {
        // 3 tokens, k 2; global expert 1 lives on another GPU.
        let ids = [0, 2, 2, 1, 0, 2];
        let map = [0, -1, 1];
        let a = align_pairs(&ids, Some(&map), 2, 4);
        assert_eq!(a.expert_counts, vec![2, 3]);
        assert_eq!(a.expert_offsets, vec![0, 4, 8]);
        assert_eq!(a.num_padded, 8);
        assert_eq!(a.sorted_pairs.len(), max_padded_slots(6, 2, 4));
        assert_eq!(&a.sorted_pairs[..8], &[0, 4, -1, -1, 1, 2, 5, -1]);
        assert!(a.sorted_pairs[8..].iter().all(|&p| p == -1));
        assert_eq!(&a.tile_experts[..2], &[0, 1]);
        assert!(a.tile_experts[2..].iter().all(|&e| e == -1));
    }

    #[test]
    fn activation_quantiser_rounds_to_nearest_even_and_saturates() {
        // Scale 2: 3.25 / 2 = 1.625 is exact in e4m3; 1.0625 * 2 lies halfway between 1.0 and 1.125 (even: 1.0);
        // 1.1875 * 2 halfway between 1.125 and 1.25 (even: 1.25); 1000 saturates at 448 * 2; NaN stays NaN.
        let got = quantize_act_e4m3(&[3.25, 2.125, 2.375, 1000.0, -1000.0, 0.0, f32::NAN], 2.0);
        assert_eq!(&got[..6], &[3.25, 2.0, 2.5, 896.0, -896.0, 0.0]);
        assert!(got[6].is_nan());
    }
}
