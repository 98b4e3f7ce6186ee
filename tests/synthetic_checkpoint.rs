//! Generated checkpoints in every layout and weight format load back through the real loading code to exactly the
//! weights the CPU quantiser produces, and the reference model runs on them.

use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::config::ModelConfig;
use small4::model::synthetic::{attention_format, load_reference_weights, write_checkpoint, HF_MISTRAL3_PREFIX};
use small4::quant::{QuantizedMatrix, WeightFormat};
use small4::reference::model::{FeedForward, ReferenceWeights};

fn quantized(format: WeightFormat, values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    QuantizedMatrix::quantize(format, values, rows, cols).unwrap().dequantize_for_gemm()
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
            tensors.insert(name.to_string(), small4::model::checkpoint::OwnedTensor { dtype: t.dtype, shape: t.shape.to_vec(), data: t.data.to_vec() });
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

/// An HF checkpoint whose config.json describes a vision tower but whose shards hold none of its weights (a text-only
/// export) loads as a text model with a notice, on the reference and the engine; it generates the same text as the
/// checkpoint with the tower, and refuses images. `small4 inspect` prints the notice and finds no problem.
#[test]
fn an_hf_checkpoint_without_vision_weights_loads_text_only() {
    use small4::model::engine::{DeviceModel, Shard};
    use small4::model::PixelImage;
    use small4::reference::model::{ForwardOptions, ReferenceModel};

    let config = ModelConfig::tiny();
    let hf = Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.to_string() };
    let weights = ReferenceWeights::random(&config, 7).unwrap();
    let (with_tower, text_only) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    write_checkpoint(with_tower.path(), &weights, &hf, WeightFormat::Bf16, 4 << 20).unwrap();
    write_checkpoint(text_only.path(), &ReferenceWeights { vision: None, ..weights }, &hf, WeightFormat::Bf16, 4 << 20).unwrap();

    let ck = Checkpoint::open(text_only.path()).unwrap();
    assert!(ModelConfig::from_json_str(&ck.config_json.to_string()).unwrap().vision.is_some(), "config.json keeps its vision_config");
    assert!(ck.text_only_notice().unwrap().contains("loaded as text-only"));
    let loaded = load_reference_weights(&ck).unwrap();
    assert!(loaded.config.vision.is_none() && loaded.vision.is_none());
    let text_model = ReferenceModel::new(loaded, ForwardOptions::default()).unwrap();
    let full = ReferenceModel::new(load_reference_weights(&Checkpoint::open(with_tower.path()).unwrap()).unwrap(), ForwardOptions::default()).unwrap();
    let prompt = [1, 300, 41, 977];
    assert_eq!(text_model.generate_greedy(&prompt, 3, |_| {}).unwrap().generated, full.generate_greedy(&prompt, 3, |_| {}).unwrap().generated);

    // Images need the tower this checkpoint does not have; with the tower, [IMG] tokens need their images.
    let v = config.vision.as_ref().unwrap();
    let image = PixelImage { width: 28, height: 28, channels: 3, data: vec![0.25; 3 * 28 * 28] };
    let pictured = [1, v.image_token_id, v.image_end_token_id, 300];
    let err = text_model.generate_greedy_with_images(&pictured, std::slice::from_ref(&image), 1, |_| {}).unwrap_err();
    assert!(matches!(err, small4::Error::Config(_)), "{err}");
    let err = full.generate_greedy(&pictured, 1, |_| {}).unwrap_err();
    assert!(matches!(&err, small4::Error::InvalidArgument(msg) if msg.contains("[IMG]")), "{err}");
    assert_eq!(full.generate_greedy_with_images(&pictured, &[image], 1, |_| {}).unwrap().generated.len(), 1);

    let model = DeviceModel::load(&small4::device::simulator(), &ck, Shard::SINGLE).unwrap();
    assert!(model.vision().is_none() && model.config().vision.is_none());

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_small4")).arg("inspect").arg(text_only.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout} {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("loaded as text-only") && stdout.contains("problems: none"), "{stdout}");
}

/// HF-layout FP8 experts carry their static activation scales as one f32 per expert beside each stack
/// (`experts.gate_up_proj_activation_scale`, `experts.down_proj_activation_scale`); the writer stores them and the
/// reader gives them to W8A8, as for a native checkpoint.
#[test]
fn hf_fp8_experts_carry_activation_scales() {
    use small4::model::synthetic::SYNTHETIC_ACT_SCALE;
    let config = ModelConfig { n_layers: 1, ..ModelConfig::tiny() };
    let hf = Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.to_string() };
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &ReferenceWeights::random(&config, 3).unwrap(), &hf, WeightFormat::Fp8PerTensor, 4 << 20).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let stack = format!("{HF_MISTRAL3_PREFIX}layers.0.mlp.experts");
    for name in ["gate_up_proj_activation_scale", "down_proj_activation_scale"] {
        let t = ck.stored(&format!("{stack}.{name}")).unwrap();
        assert_eq!((t.dtype, t.shape), (safetensors::Dtype::F32, &[config.experts][..]), "{name}");
    }
    let (c, want) = (&config, Some((SYNTHETIC_ACT_SCALE, SYNTHETIC_ACT_SCALE)));
    assert_eq!(ck.expert_activation_scales(0, c.experts, c.dim, c.expert_hidden).unwrap(), want);
    let FeedForward::Moe(moe) = &load_reference_weights(&ck).unwrap().layers[0].ffn else { panic!("a MoE layer") };
    assert_eq!(moe.fp8_act_scales, want, "the reference's W8A8 scales");
}
