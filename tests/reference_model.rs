//! The CPU reference forward pass of the tiny preset: the two attention forms agree (also where the llama-4 query
//! scaling is active), prefill + decode equals one prefill, weights are seeded bf16 and well scaled, typed errors.

mod common;

use std::sync::OnceLock;

use common::assert_close;
use small4::model::ModelConfig;
use small4::reference::model::{argmax, AttentionForm, ForwardOptions, ReferenceKvCache, ReferenceModel, ReferenceWeights, RoundingMode};
use small4::Error;

const SEED: u64 = 4;
const PROMPT: [u32; 7] = [1, 1010, 73, 1932, 500, 17, 1221];

fn tiny_weights() -> &'static ReferenceWeights {
    static WEIGHTS: OnceLock<ReferenceWeights> = OnceLock::new();
    WEIGHTS.get_or_init(|| ReferenceWeights::random(&ModelConfig::tiny(), SEED).unwrap())
}

fn model(rounding: RoundingMode, attention: AttentionForm) -> ReferenceModel {
    ReferenceModel::new(tiny_weights().clone(), ForwardOptions { rounding, attention, fp8_activations: false, prefill_fp8_act: false }).unwrap()
}

/// Logits of `tokens` in one prefill on a cache whose first token is at `start`.
fn prefill_at(model: &ReferenceModel, tokens: &[u32], start: usize) -> Vec<f32> {
    model.prefill(tokens, &mut ReferenceKvCache::starting_at(model.config(), start)).unwrap()
}

fn std_dev(values: &[f32]) -> f32 {
    let mean = values.iter().sum::<f32>() / values.len() as f32;
    (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / values.len() as f32).sqrt()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn naive_and_absorbed_attention_agree_including_long_context_positions() {
    let naive = model(RoundingMode::F32, AttentionForm::Naive);
    let absorbed = model(RoundingMode::F32, AttentionForm::Absorbed);
    // 0: short context; 8190: the sequence crosses 8192 where the query scale steps up; 20000 and 70000: scale
    // 1 + 0.1 ln 3 and 1 + 0.1 ln 9, with YaRN angles far beyond the original context.
    for start in [0, 8190, 20_000, 70_000] {
        let want = prefill_at(&naive, &PROMPT, start);
        let got = prefill_at(&absorbed, &PROMPT, start);
        assert!(want.iter().all(|v| v.is_finite()));
        assert_close(&format!("absorbed vs naive logits from position {start}"), &got, &want, 2e-4, 2e-4);
    }
    // With bf16 activations the two forms round at different points (q_lat / o_lat vs expanded k, v), and a
    // difference of one bf16 step in the residual stream can flip a close top-4 routing choice: they agree to bf16
    // accuracy (mean difference ~1% of the logit spread, measured 0.007 to 0.06), with the same greedy choice.
    let naive = model(RoundingMode::Bf16Activations, AttentionForm::Naive);
    let absorbed = model(RoundingMode::Bf16Activations, AttentionForm::Absorbed);
    let vocab = naive.config().vocab;
    for start in [0, 20_000] {
        let want = prefill_at(&naive, &PROMPT, start);
        let got = prefill_at(&absorbed, &PROMPT, start);
        for (position, (g, w)) in got.chunks_exact(vocab).zip(want.chunks_exact(vocab)).enumerate() {
            let mean_diff = g.iter().zip(w).map(|(a, b)| (a - b).abs()).sum::<f32>() / vocab as f32;
            let spread = std_dev(w);
            assert!(mean_diff < 0.1 * spread, "bf16 absorbed vs naive from {start}, position {position}: mean diff {mean_diff}, logit std {spread}");
            assert_eq!(argmax(g), argmax(w), "bf16 absorbed vs naive from {start}, position {position}: greedy choice");
        }
    }
}

#[test]
fn llama4_query_scaling_acts_from_the_original_context_only() {
    let base = model(RoundingMode::F32, AttentionForm::Absorbed);
    let unscaled_config = ModelConfig { llama4_beta: 0.0, ..ModelConfig::tiny() };
    let unscaled = ReferenceModel::new(ReferenceWeights { config: unscaled_config, ..tiny_weights().clone() }, base.options()).unwrap();
    // Below 8192 the scale is exactly 1: identical logits.
    assert_eq!(prefill_at(&base, &PROMPT, 1000), prefill_at(&unscaled, &PROMPT, 1000));
    // From 8192 on it sharpens the attention: the logits move.
    let (scaled, plain) = (prefill_at(&base, &PROMPT, 20_000), prefill_at(&unscaled, &PROMPT, 20_000));
    assert!(max_abs_diff(&scaled, &plain) > 1e-3, "the llama-4 scale had no effect at position 20000");
    // Below it only relative positions matter (RoPE): shifting the whole sequence changes nothing but rounding.
    let shift = max_abs_diff(&prefill_at(&base, &PROMPT, 0), &prefill_at(&base, &PROMPT, 1000));
    assert!(shift < 1e-4, "shifting the sequence by 1000 positions moved the logits by {shift}");
}

#[test]
fn prefill_then_decode_equals_one_prefill() {
    let vocab = ModelConfig::tiny().vocab;
    let split = 3;
    for rounding in [RoundingMode::F32, RoundingMode::Bf16Activations] {
        for attention in [AttentionForm::Naive, AttentionForm::Absorbed] {
            let m = model(rounding, attention);
            for start in [0, 8190] {
                let whole = prefill_at(&m, &PROMPT, start);
                let mut cache = ReferenceKvCache::starting_at(m.config(), start);
                let mut stepped = m.prefill(&PROMPT[..split], &mut cache).unwrap();
                for &token in &PROMPT[split..] {
                    stepped.extend(m.decode(token, &mut cache).unwrap());
                }
                assert_eq!(cache.len(), PROMPT.len());
                assert_eq!(cache.next_position(), start + PROMPT.len());
                for position in 0..PROMPT.len() {
                    let range = position * vocab..(position + 1) * vocab;
                    let what = format!("{rounding:?} {attention:?} from {start}: logits of position {position}");
                    assert_close(&what, &stepped[range.clone()], &whole[range], 1e-5, 1e-5);
                }
            }
        }
    }
}

#[test]
fn random_weights_are_seeded_bf16_and_keep_activations_well_scaled() {
    let config = ModelConfig::tiny();
    let w = tiny_weights();
    let again = ReferenceWeights::random(&config, SEED).unwrap();
    assert_eq!(w.layers[3].attention.wkv_b, again.layers[3].attention.wkv_b);
    assert_eq!(w.output, again.output);
    let other = ReferenceWeights::random(&ModelConfig { n_layers: 1, ..config.clone() }, SEED + 1).unwrap();
    assert_ne!(w.layers[0].attention.wq_a, other.layers[0].attention.wq_a);
    let all_bf16 = |v: &[f32]| v.iter().all(|&x| half::bf16::from_f32(x).to_f32() == x);
    assert!(all_bf16(&w.tok_embeddings) && all_bf16(&w.output) && all_bf16(&w.norm));
    for layer in &w.layers {
        let a = &layer.attention;
        for t in [&a.wq_a, &a.q_a_norm, &a.wq_b, &a.wkv_a_with_mqa, &a.kv_a_norm, &a.wkv_b, &a.wo, &layer.attention_norm, &layer.ffn_norm] {
            assert!(all_bf16(t));
        }
    }
    assert_eq!(w.layers[0].attention.wkv_b.len(), config.heads * (config.qk_nope + config.v_head) * config.kv_lora_rank);

    let m = model(RoundingMode::Bf16Activations, AttentionForm::Absorbed);
    let logits = prefill_at(&m, &PROMPT, 0);
    for row in logits.chunks_exact(config.vocab) {
        let spread = std_dev(row);
        let peak = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        assert!(row.iter().all(|v| v.is_finite()));
        assert!((0.3..10.0).contains(&spread), "logit std {spread}: activations exploded or vanished");
        assert!(peak < 20.0 * spread, "one logit {peak} dominates");
    }
    let choices: std::collections::BTreeSet<u32> = logits.chunks_exact(config.vocab).map(argmax).collect();
    assert!(choices.len() > PROMPT.len() / 2, "greedy choices barely depend on the input: {choices:?}");
}

#[test]
fn greedy_generation_matches_the_argmax_of_one_forward() {
    let m = model(RoundingMode::Bf16Activations, AttentionForm::Absorbed);
    let vocab = m.config().vocab;
    let mut streamed = Vec::new();
    let stats = m.generate_greedy(&PROMPT, 5, |t| streamed.push(t)).unwrap();
    assert_eq!(stats.generated, streamed);
    assert_eq!(stats.generated.len(), 5);
    let mut sequence = PROMPT.to_vec();
    sequence.extend(&stats.generated[..4]);
    let logits = prefill_at(&m, &sequence, 0);
    for (i, &token) in stats.generated.iter().enumerate() {
        let row = PROMPT.len() - 1 + i;
        assert_eq!(argmax(&logits[row * vocab..(row + 1) * vocab]), token, "generated token {i}");
    }
}

#[test]
fn dense_layers_and_several_shared_experts_run_in_both_forms() {
    let config = ModelConfig { n_layers: 2, first_k_dense_replace: 1, shared_experts: 2, tied_embeddings: true, ..ModelConfig::tiny() };
    let weights = ReferenceWeights::random(&config, 9).unwrap();
    assert_eq!(weights.output, weights.tok_embeddings);
    let naive = ReferenceModel::new(
        weights.clone(),
        ForwardOptions { rounding: RoundingMode::F32, attention: AttentionForm::Naive, fp8_activations: false, prefill_fp8_act: false },
    )
    .unwrap();
    let absorbed = ReferenceModel::new(
        weights,
        ForwardOptions { rounding: RoundingMode::F32, attention: AttentionForm::Absorbed, fp8_activations: false, prefill_fp8_act: false },
    )
    .unwrap();
    let want = prefill_at(&naive, &PROMPT[..4], 9000);
    assert_close("dense + 2 shared experts: absorbed vs naive", &prefill_at(&absorbed, &PROMPT[..4], 9000), &want, 2e-4, 2e-4);
}

#[test]
fn bad_inputs_give_typed_errors() {
    let m = model(RoundingMode::F32, AttentionForm::Absorbed);
    let config = m.config().clone();
    let mut cache = m.new_cache();
    assert!(matches!(m.prefill(&[], &mut cache), Err(Error::InvalidArgument(_))));
    assert!(matches!(m.prefill(&[1, config.vocab as u32], &mut cache), Err(Error::OutOfRange { .. })));
    let mut at_the_end = ReferenceKvCache::starting_at(&config, config.max_position - 1);
    assert!(matches!(m.prefill(&[1, 2], &mut at_the_end), Err(Error::OutOfRange { .. })));
    let mut wrong = ReferenceKvCache::new(&ModelConfig { n_layers: 2, ..config.clone() });
    assert!(matches!(m.decode(1, &mut wrong), Err(Error::Shape { .. })));
    // Failed calls leave the cache untouched.
    assert!(cache.is_empty() && at_the_end.is_empty() && wrong.is_empty());
    assert!(matches!(ReferenceWeights::random(&ModelConfig { experts_per_token: 17, ..config.clone() }, 1), Err(Error::Config(_))));
    // Weights that do not match their configuration (as a checkpoint loader could build) are refused by name.
    let mut bad = tiny_weights().clone();
    bad.layers[2].attention.wkv_b.pop();
    match ReferenceModel::new(bad, m.options()) {
        Err(Error::Shape { what, .. }) => assert_eq!(what, "layers.2.attention.wkv_b"),
        other => panic!("expected a shape error, got {:?}", other.err()),
    }
    let mut bad = tiny_weights().clone();
    bad.config = ModelConfig { first_k_dense_replace: 1, ..config };
    assert!(matches!(ReferenceModel::new(bad, m.options()), Err(Error::Shape { .. })));
}

#[test]
fn cache_rows_hold_the_normed_latent_then_the_roped_shared_key() {
    use small4::reference::{linear::matmul_nt, norm::rms_norm, rope};
    let m = model(RoundingMode::F32, AttentionForm::Absorbed);
    let (config, w) = (m.config().clone(), tiny_weights());
    let start = 12_345;
    let mut cache = ReferenceKvCache::starting_at(&config, start);
    m.prefill(&PROMPT[..3], &mut cache).unwrap();
    let (rank, width) = (config.kv_lora_rank, cache.width());
    assert_eq!(width, 320);
    assert_eq!(cache.layer(0).len(), 3 * width);
    // Layer 0 sees the embeddings directly, so its rows follow from the weights alone.
    let layer = &w.layers[0];
    let inv_freq = rope::yarn_inv_freq(config.qk_rope, &config.yarn());
    for (i, &token) in PROMPT[..3].iter().enumerate() {
        let x = &w.tok_embeddings[token as usize * config.dim..][..config.dim];
        let h = rms_norm(x, &layer.attention_norm, config.norm_eps);
        let kv = matmul_nt(&h, &layer.attention.wkv_a_with_mqa, 1, config.dim, width);
        let mut want = rms_norm(&kv[..rank], &layer.attention.kv_a_norm, config.norm_eps);
        let mut k_rope = kv[rank..].to_vec();
        rope::apply_interleaved(&mut k_rope, &inv_freq, start + i);
        want.extend(k_rope);
        assert_close(&format!("cache row {i} of layer 0"), &cache.layer(0)[i * width..][..width], &want, 1e-6, 1e-6);
    }
}

#[test]
fn the_cli_generates_with_the_reference_backend_and_reports_no_gpu() {
    let run = |args: &[&str]| std::process::Command::new(env!("CARGO_BIN_EXE_small4")).args(args).output().unwrap();
    let seed = SEED.to_string();
    let out = run(&["generate", "--max-tokens", "3", "--prompt-ids", "1,1010,73", "--seed", &seed]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "generate failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let generated: Vec<u32> =
        stdout.lines().find_map(|l| l.strip_prefix("generated:")).expect("a `generated:` line").split_whitespace().map(|t| t.parse().unwrap()).collect();
    // The CLI's defaults: bf16 activations, absorbed attention.
    let m = model(RoundingMode::Bf16Activations, AttentionForm::Absorbed);
    assert_eq!(generated, m.generate_greedy(&[1, 1010, 73], 3, |_| {}).unwrap().generated);
    assert!(stdout.contains("tokens/s"), "{stdout}");
    let out = run(&["generate", "--backend", "gpu"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no GPU"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_cli_turns_a_text_prompt_into_text() {
    use small4::tokenizer::{ChatRequest, SpecialTokenPolicy, Tokenizer};
    let tokenizer = Tokenizer::stand_in_truncated(ModelConfig::tiny().vocab, 1000).unwrap();
    let ids = tokenizer.encode_chat(&ChatRequest::single_turn(None, "Hi", &[], Some("high"))).unwrap().ids;
    let seed = SEED.to_string();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_small4"))
        .args(["generate", "--max-tokens", "6", "--prompt", "Hi", "--reasoning-effort", "high", "--seed", &seed])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "generate failed: {stdout} {}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    // The prompt is the v15 chat encoding (settings block with the effort, [INST] ... [/INST]).
    let shown: Vec<String> = ids.iter().map(u32::to_string).collect();
    assert!(lines[0].ends_with(&format!("prompt: [{}]", shown.join(","))), "{}", lines[0]);
    assert!(lines.last().unwrap().starts_with("prefill:"), "{stdout}");
    // What is printed between is the streamed decoding of the reference's greedy tokens.
    let generated = model(RoundingMode::Bf16Activations, AttentionForm::Absorbed).generate_greedy(&ids, 6, |_| {}).unwrap().generated;
    let text = tokenizer.decode(&generated, SpecialTokenPolicy::Ignore).unwrap();
    assert_eq!(lines[1..lines.len() - 1].join("\n").trim_end(), text.trim_end());
}
