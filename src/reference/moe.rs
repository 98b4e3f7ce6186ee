//! The mixture-of-experts block on the CPU: router (softmax over all experts in f32, top-k with ties to the lower
//! index, renormalisation, routed scale) and SwiGLU experts.

use super::linear::matmul_nt;

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
    let mut ids = Vec::with_capacity(tokens * k);
    let mut weights = Vec::with_capacity(tokens * k);
    for row in logits.chunks_exact(experts) {
        let probs = softmax(row);
        let mut order: Vec<usize> = (0..experts).collect();
        // Stable sort by descending probability keeps the lower index first among equals.
        order.sort_by(|&a, &b| probs[b].partial_cmp(&probs[a]).unwrap_or(std::cmp::Ordering::Equal));
        let chosen = &order[..k];
        let sum: f32 = chosen.iter().map(|&e| probs[e]).sum();
        for &e in chosen {
            ids.push(e as i32);
            weights.push(probs[e] / (sum + 1e-20) * routed_scale);
        }
    }
    Routing { k, ids, weights }
}

/// Rows the grouped GEMM may need for `pairs` (token, slot) pairs over `local_experts` experts when every expert's
/// rows start on a `tile_m` boundary: `(max_padded, max_tiles)` with max_padded = round_up(pairs + local_experts *
/// (tile_m - 1), tile_m). Buffers sized by this never overflow, whatever the routing.
pub fn aligned_capacity(pairs: usize, local_experts: usize, tile_m: usize) -> (usize, usize) {
    let max_padded = (pairs + local_experts * (tile_m - 1)).div_ceil(tile_m) * tile_m;
    (max_padded, max_padded / tile_m)
}

/// The (token, slot) pairs grouped by local expert, as the grouped GEMM reads them (see `kernels::router`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alignment {
    pub expert_counts: Vec<i32>,
    pub expert_offsets: Vec<i32>,
    pub sorted_pairs: Vec<i32>,
    pub tile_experts: Vec<i32>,
    pub num_padded: i32,
}

/// Groups the pairs `p = t * k + j` of `topk_ids` by `expert_map[id]` (-1: owned elsewhere, dropped), increasing `p`
/// inside an expert, each expert padded with -1 rows to a multiple of `tile_m`; `sorted_pairs` and `tile_experts`
/// have the capacity of `aligned_capacity`, filled with -1 past the end.
pub fn align(topk_ids: &[i32], expert_map: &[i32], local_experts: usize, tile_m: usize) -> Alignment {
    let (max_padded, max_tiles) = aligned_capacity(topk_ids.len(), local_experts, tile_m);
    let mut lists = vec![Vec::new(); local_experts];
    for (pair, &id) in topk_ids.iter().enumerate() {
        if let Some(&local) = expert_map.get(id as usize) {
            if local >= 0 {
                lists[local as usize].push(pair as i32);
            }
        }
    }
    let mut alignment = Alignment {
        expert_counts: lists.iter().map(|l| l.len() as i32).collect(),
        expert_offsets: vec![0],
        sorted_pairs: vec![-1; max_padded],
        tile_experts: vec![-1; max_tiles],
        num_padded: 0,
    };
    let mut offset = 0usize;
    for (expert, list) in lists.iter().enumerate() {
        alignment.sorted_pairs[offset..offset + list.len()].copy_from_slice(list);
        let end = offset + list.len().div_ceil(tile_m) * tile_m;
        alignment.tile_experts[offset / tile_m..end / tile_m].fill(expert as i32);
        offset = end;
        alignment.expert_offsets.push(offset as i32);
    }
    alignment.num_padded = offset as i32;
    alignment
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
    let gate = matmul_nt(x, w1, tokens, dim, hidden);
    let up = matmul_nt(x, w3, tokens, dim, hidden);
    let act: Vec<f32> = gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u).collect();
    matmul_nt(&act, w2, tokens, hidden, dim)
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
    let mut out = match shared {
        Some(s) => swiglu_expert(x, &s.w1, &s.w3, &s.w2, tokens, dim, hidden),
        None => vec![0.0; tokens * dim],
    };
    for t in 0..tokens {
        let row = &x[t * dim..(t + 1) * dim];
        for j in 0..routing.k {
            let id = routing.ids[t * routing.k + j];
            let Some(Some(e)) = usize::try_from(id).ok().and_then(|i| experts.get(i)) else { continue };
            let y = swiglu_expert(row, &e.w1, &e.w3, &e.w2, 1, dim, hidden);
            let w = routing.weights[t * routing.k + j];
            for (o, v) in out[t * dim..(t + 1) * dim].iter_mut().zip(&y) {
                *o += w * v;
            }
        }
    }
    out
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
    fn alignment_groups_pairs_by_local_expert_on_tile_boundaries() {
        // 3 tokens, k = 2; global expert 1 is owned elsewhere; global 0 -> local 1, global 2 -> local 0.
        let ids = [0, 2, 2, 1, 0, 2];
        let a = align(&ids, &[1, -1, 0], 2, 4);
        assert_eq!(a.expert_counts, vec![3, 2]);
        assert_eq!(a.expert_offsets, vec![0, 4, 8]);
        assert_eq!(a.num_padded, 8);
        let (max_padded, max_tiles) = aligned_capacity(6, 2, 4);
        assert_eq!((max_padded, max_tiles), (12, 3));
        assert_eq!(a.sorted_pairs, vec![1, 2, 5, -1, 0, 4, -1, -1, -1, -1, -1, -1]);
        assert_eq!(a.tile_experts, vec![0, 1, -1]);
    }
}
