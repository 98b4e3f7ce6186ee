//! MLA attention in the absorbed (latent) form on the CPU: what the paged attention kernels compute.
//!
//! Per token the cache holds `kv_lora_rank + qk_rope` values: [kv_a_norm(c) | rope(k_rope)]. For head h, with
//! `q_lat = q_nope_h . W_UK_h` (absorbed into the latent) and `q_rope_h` already rotated:
//! `score_j = (q_lat . c_j + q_rope_h . k_rope_j) * scale`, `o_lat = softmax(score) . c` (in the latent, before W_UV).

use rayon::prelude::*;

use super::linear::dot;

/// The head geometry of MLA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MlaDims {
    pub heads: usize,
    pub kv_lora_rank: usize,
    pub qk_nope: usize,
    pub qk_rope: usize,
    pub v_head: usize,
}

impl MlaDims {
    /// Values per token in the latent cache.
    pub fn cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope
    }
}

/// Causal latent attention.
/// `q_lat` [q_tokens, heads, kv_lora_rank], `q_rope` [q_tokens, heads, qk_rope], `cache` [kv_tokens, cache_width],
/// `q_positions[i]`: the cache index of query i (it attends to cache rows `0..=q_positions[i]`).
/// Returns `o_lat` [q_tokens, heads, kv_lora_rank].
pub fn latent_attention(q_lat: &[f32], q_rope: &[f32], cache: &[f32], q_positions: &[usize], dims: &MlaDims, scale: f32) -> Vec<f32> {
    let (h, r, p, w) = (dims.heads, dims.kv_lora_rank, dims.qk_rope, dims.cache_width());
    let q_tokens = q_positions.len();
    assert_eq!(q_lat.len(), q_tokens * h * r, "latent_attention: q_lat shape");
    assert_eq!(q_rope.len(), q_tokens * h * p, "latent_attention: q_rope shape");
    assert_eq!(cache.len() % w, 0, "latent_attention: cache shape");
    let kv_tokens = cache.len() / w;
    assert!(q_positions.iter().all(|&pos| pos < kv_tokens), "latent_attention: a query position is beyond {kv_tokens} cached tokens");
    let mut out = vec![0.0f32; q_tokens * h * r];
    // One (query, head) pair per task: independent rows of the output.
    out.par_chunks_mut(r.max(1)).enumerate().for_each(|(index, o)| {
        let (i, head) = (index / h, index % h);
        let ql = &q_lat[(i * h + head) * r..][..r];
        let qr = &q_rope[(i * h + head) * p..][..p];
        let scores: Vec<f32> = (0..=q_positions[i])
            .map(|j| {
                let row = &cache[j * w..][..w];
                (dot(ql, &row[..r]) + dot(qr, &row[r..])) * scale
            })
            .collect();
        let probs = super::moe::softmax(&scores);
        for (j, &pj) in probs.iter().enumerate() {
            for (acc, &c) in o.iter_mut().zip(&cache[j * w..][..r]) {
                *acc += pj * c;
            }
        }
    });
    out
}
