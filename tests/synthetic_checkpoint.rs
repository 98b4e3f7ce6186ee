//! Generated checkpoints in every layout and weight format load back through the real loading code to exactly the
//! weights the CPU quantiser produces, and the reference model runs on them.

use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::config::ModelConfig;
use small4::model::synthetic::{attention_format, load_reference_weights, write_checkpoint, HF_MISTRAL3_PREFIX};
use small4::quant::{QuantizedMatrix, WeightFormat};
use small4::reference::model::{FeedForward, ReferenceWeights};

fn quantized(format: WeightFormat, values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    QuantizedMatrix::quantize(format, values, rows, cols).unwrap().dequantize()
}

fn check(layout: Layout, format: WeightFormat) {
    let config = ModelConfig::tiny();
    let weights = ReferenceWeights::random(&config, 11).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &weights, &layout, format, 4 << 20).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.layout, layout);
    let loaded = load_reference_weights(&ck).unwrap();
    assert_eq!(loaded.config, config, "config round trip through {layout:?}");
    assert_eq!(loaded.tok_embeddings, weights.tok_embeddings);
    assert_eq!(loaded.output, weights.output);
    let (c, h) = (&config, config.expert_hidden);
    let attn = attention_format(format);
    let stacked_fp8 = matches!(layout, Layout::HuggingFace { .. }) && format == WeightFormat::Fp8PerTensor;
    for (l, (got, want)) in loaded.layers.iter().zip(&weights.layers).enumerate() {
        assert_eq!(got.attention_norm, want.attention_norm);
        assert_eq!(got.attention.wq_a, quantized(attn, &want.attention.wq_a, c.q_lora_rank, c.dim), "layer {l} wq_a");
        assert_eq!(got.attention.wo, quantized(attn, &want.attention.wo, c.dim, c.heads * c.v_head), "layer {l} wo");
        let (FeedForward::Moe(g), FeedForward::Moe(w)) = (&got.ffn, &want.ffn) else { panic!("MoE layers") };
        assert_eq!(g.gate, w.gate);
        for (e, (ge, we)) in g.experts.iter().zip(&w.experts).enumerate() {
            let (ge, we) = (ge.as_ref().unwrap(), we.as_ref().unwrap());
            if stacked_fp8 {
                // transformers' stacked FP8 experts share one scale for gate and up.
                let stack: Vec<f32> = we.w1.iter().chain(&we.w3).copied().collect();
                let both = quantized(format, &stack, 2 * h, c.dim);
                assert_eq!(ge.w1, both[..h * c.dim], "layer {l} expert {e} w1");
                assert_eq!(ge.w3, both[h * c.dim..], "layer {l} expert {e} w3");
            } else {
                assert_eq!(ge.w1, quantized(format, &we.w1, h, c.dim), "layer {l} expert {e} w1");
                assert_eq!(ge.w3, quantized(format, &we.w3, h, c.dim), "layer {l} expert {e} w3");
            }
            assert_eq!(ge.w2, quantized(format, &we.w2, c.dim, h), "layer {l} expert {e} w2");
        }
        let (gs, ws) = (g.shared_experts.as_ref().unwrap(), w.shared_experts.as_ref().unwrap());
        assert_eq!(gs.w2, quantized(format, &ws.w2, c.dim, c.shared_hidden()));
    }
}

#[test]
fn native_layout_every_format() {
    for format in WeightFormat::ALL {
        check(Layout::Native, format);
    }
}

#[test]
fn hf_layout_every_format() {
    let hf = Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.to_string() };
    for format in [WeightFormat::Bf16, WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128, WeightFormat::INT4_G128, WeightFormat::Nvfp4] {
        check(hf.clone(), format);
    }
}

#[test]
fn a_missing_tensor_names_itself() {
    let config = ModelConfig::tiny();
    let weights = ReferenceWeights::random(&config, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &weights, &Layout::Native, WeightFormat::Nvfp4, 64 << 20).unwrap();
    // Rewrite the index-less single shard without one expert's global scale.
    let ck = Checkpoint::open(dir.path()).unwrap();
    let mut tensors = std::collections::BTreeMap::new();
    for name in ck.stored_names() {
        if name != "layers.2.experts.5.w3.weight_global_scale" {
            let t = ck.stored(name).unwrap();
            tensors.insert(
                name.to_string(),
                small4::model::checkpoint::OwnedTensor { dtype: t.dtype, shape: t.shape.to_vec(), data: t.data.to_vec() },
            );
        }
    }
    drop(ck);
    for p in std::fs::read_dir(dir.path()).unwrap() {
        let p = p.unwrap().path();
        if p.extension().is_some_and(|e| e == "safetensors" || e == "json") && !p.ends_with("params.json") {
            std::fs::remove_file(p).unwrap();
        }
    }
    small4::model::checkpoint::write_shards(dir.path(), &Layout::Native, &tensors, 64 << 20).unwrap();
    let err = load_reference_weights(&Checkpoint::open(dir.path()).unwrap()).unwrap_err();
    assert!(err.to_string().contains("layers.2.experts.5.w3.weight_global_scale"), "{err}");
}
