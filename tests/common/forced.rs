//! The engine against the CPU reference, teacher-forced: the one logit tolerance of every whole-model test, and the
//! reference run beside an engine that records its routing (`EngineOptions::record_routing`).
//!
//! Why forced: where a token's k-th and (k+1)-th router logits are closer than the two computations' rounding noise
//! (a near-tie), the engine and the reference may pick different experts, and that token's logits then differ by
//! ~0.5: legitimate rounding, not a kernel error. So each step the reference runs the engine's tokens with the experts
//! the engine chose (`ReferenceModel::forward_routed`, weighted by the reference's own router), and checks that every
//! forced expert is a near-tie (`ReferenceKvCache::forced_gaps` within [`ROUTER_NOISE`]): a wrong routing still fails.
//! Both are fed the engine's tokens, so a logit near-tie in the sampling cannot make them part either; a token the
//! reference would not pick must be within the logit tolerance of its choice.

use std::collections::BTreeMap;

use small4::model::engine::{Engine, Request, RequestId, StepToken};
use small4::reference::model::{argmax, ReferenceKvCache, ReferenceModel};

/// The engine's logit tolerance, for every weight format and layout: |engine - reference| <= 0.08 + 0.03 |reference|
/// per logit. The reference multiplies the weights the kernels multiply (`dequantize_for_gemm`) and rounds its
/// activations to bf16 where the kernels store them; what remains is the kernels' own rounding order (summation
/// orders, the attention's probabilities), independent of the reference's.
pub const LOGIT_ABS: f32 = 0.08;
pub const LOGIT_REL: f32 = 0.03;

/// The most a forced expert's router logit may lie below the reference's own k-th choice (`moe::forcing_gap`, router
/// logit units) for the engine's choice to count as a near-tie: the engine's router reads the engine's bf16 hidden
/// state, which differs from the reference's by its rounding. Two bf16 chains of the reference (f32 vs bf16
/// activations) part their 4th/5th router-logit gaps by up to 0.025 over the tiny preset's 4 layers; the largest
/// forcing gap the engine tests met (2026-12-06, every format, seeds 0..3) is 0.027, each run prints its own. An expert
/// chosen by a wrong router (another index, another softmax) lies about the spread of the router logits (O(1), unit
/// variance by construction) below the k-th, far beyond this bound.
pub const ROUTER_NOISE: f32 = 0.05;

/// What a teacher-forced run met.
#[derive(Clone, Copy, Debug, Default)]
pub struct ForcedStats {
    /// Tokens run (prompt and generated), and those whose forced experts were not the reference's own choice.
    pub tokens: usize,
    pub forced_tokens: usize,
    /// The largest forcing gap, and the largest |engine - reference| logit difference.
    pub worst_gap: f32,
    pub worst_logit: f32,
    /// Sampled tokens the reference would have picked otherwise (a logit near-tie within the tolerance).
    pub token_near_ties: usize,
}

impl ForcedStats {
    /// Adds `other`'s counts and keeps the larger extremes.
    pub fn merge(&mut self, other: &ForcedStats) {
        self.tokens += other.tokens;
        self.forced_tokens += other.forced_tokens;
        self.token_near_ties += other.token_near_ties;
        self.worst_gap = self.worst_gap.max(other.worst_gap);
        self.worst_logit = self.worst_logit.max(other.worst_logit);
    }
}

impl std::fmt::Display for ForcedStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} tokens, {} routed off the reference's own choice (largest forcing gap {:.4}), max logit diff {:.4}, {} token near-ties",
            self.tokens, self.forced_tokens, self.worst_gap, self.worst_logit, self.token_near_ties
        )
    }
}

/// One request's side of the reference: its cache and the tokens the engine will feed next.
struct Side {
    cache: ReferenceKvCache,
    pending: Vec<u32>,
}

/// The reference beside an engine built with `EngineOptions { record_routing: true, keep_logits: true, .. }`.
pub struct ForcedReference<'a> {
    reference: &'a ReferenceModel,
    requests: BTreeMap<RequestId, Side>,
    pub stats: ForcedStats,
}

impl<'a> ForcedReference<'a> {
    pub fn new(reference: &'a ReferenceModel) -> Self {
        ForcedReference { reference, requests: BTreeMap::new(), stats: ForcedStats::default() }
    }

    /// Adds `request` to `engine` and follows it.
    pub fn add(&mut self, engine: &mut Engine, request: Request) -> RequestId {
        let prompt = request.prompt.clone();
        let id = engine.add(request).unwrap();
        self.requests.insert(id, Side { cache: self.reference.new_cache(), pending: prompt });
        id
    }

    /// One engine step, then the same tokens through the reference with the engine's routing: every sampled token's
    /// logits within the tolerance, every forced expert a near-tie. Returns the step's tokens.
    pub fn step(&mut self, engine: &mut Engine, what: &str) -> Vec<StepToken> {
        let out = engine.step().unwrap();
        let routing = engine.last_routing().unwrap();
        let vocab = self.reference.config().vocab;
        for (id, rows) in &routing.sequences {
            let id = id.expect("a step's sequences are requests");
            let side = self.requests.get_mut(&id).expect("a request the reference follows");
            // The engine fed this request `rows.len()` tokens: the next of its prompt, or its last token.
            let fed: Vec<u32> = side.pending.drain(..rows.len()).collect();
            let before = side.cache.len();
            let logits = forced_logits(self.reference, &mut side.cache, &routing.rows(rows.clone()).unwrap(), &fed, &format!("{what}, request {}", id.0));
            let gaps = &side.cache.forced_gaps()[before..];
            let worst_gap = gaps.iter().copied().fold(0.0, f32::max);
            self.stats.tokens += fed.len();
            self.stats.forced_tokens += gaps.iter().filter(|&&g| g > 0.0).count();
            self.stats.worst_gap = self.stats.worst_gap.max(worst_gap);
            let Some(t) = out.iter().find(|t| t.id == id) else { continue };
            let (got, want) = (t.logits.as_ref().expect("keep_logits"), &logits[logits.len() - vocab..]);
            let step = side.cache.len();
            super::assert_close(&format!("{what}, request {} after {step} tokens", id.0), got, want, LOGIT_ABS, LOGIT_REL);
            self.stats.worst_logit = self.stats.worst_logit.max(got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0, f32::max));
            let own = argmax(want) as usize;
            if own != t.token as usize {
                // Implied by the logits' check; said plainly here.
                let tolerance = 2.0 * LOGIT_ABS + LOGIT_REL * (want[own].abs() + want[t.token as usize].abs());
                assert!(want[own] - want[t.token as usize] <= tolerance, "{what}, request {}: token {} where the reference picks {own}", id.0, t.token);
                self.stats.token_near_ties += 1;
            }
            side.pending = vec![t.token];
        }
        for t in out.iter().filter(|t| t.finished.is_some()) {
            self.requests.remove(&t.id);
        }
        out
    }

    /// Runs `requests` to completion; returns each request's (token, logits) in order.
    pub fn generate(&mut self, engine: &mut Engine, requests: Vec<Request>, what: &str) -> Vec<Vec<(u32, Vec<f32>)>> {
        let ids: Vec<RequestId> = requests.into_iter().map(|r| self.add(engine, r)).collect();
        let mut steps = vec![Vec::new(); ids.len()];
        while engine.active() > 0 {
            for t in self.step(engine, what) {
                steps[ids.iter().position(|&id| id == t.id).unwrap()].push((t.token, t.logits.unwrap()));
            }
        }
        steps
    }
}

/// The reference's logits of `tokens` after what `cache` holds, its MoE layers forced to `routing` (the engine's, per
/// layer `[tokens, k]`), asserting that every forced expert is a near-tie (`forced_gaps` within [`ROUTER_NOISE`]).
pub fn forced_logits(reference: &ReferenceModel, cache: &mut ReferenceKvCache, routing: &[Vec<i32>], tokens: &[u32], what: &str) -> Vec<f32> {
    let before = cache.len();
    let logits = reference.forward_routed(tokens, routing, cache).unwrap();
    let gaps = &cache.forced_gaps()[before..];
    let worst = gaps.iter().copied().fold(0.0, f32::max);
    assert!(
        worst <= ROUTER_NOISE,
        "{what}: the engine routed a token {worst:.4} router-logit units below the reference's own choice (gaps {gaps:?}): not a near-tie"
    );
    logits
}
