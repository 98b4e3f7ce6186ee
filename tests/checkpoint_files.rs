//! The checkpoint file layer: both layouts, every stored weight format, and clear errors for broken files.

use std::collections::BTreeMap;

use safetensors::Dtype;
use small4::model::checkpoint::{hf_name, write_shards, Checkpoint, ExpertMatrix, Layout, MatrixData, OwnedTensor};
use small4::Error;

fn tensor(dtype: Dtype, shape: &[usize], fill: u8) -> OwnedTensor {
    let elems: usize = shape.iter().product();
    let bytes = elems * dtype.bitsize() / 8;
    OwnedTensor { dtype, shape: shape.to_vec(), data: (0..bytes).map(|i| (i as u8).wrapping_mul(31).wrapping_add(fill)).collect() }
}

fn scalar(v: f32, shape: &[usize]) -> OwnedTensor {
    OwnedTensor { dtype: Dtype::F32, shape: shape.to_vec(), data: v.to_le_bytes().to_vec() }
}

fn write_dir(layout: &Layout, tensors: &BTreeMap<String, OwnedTensor>, shard_bytes: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = match layout {
        Layout::Native => "params.json",
        Layout::HuggingFace { .. } => "config.json",
    };
    std::fs::write(dir.path().join(config), r#"{"dim": 64}"#).unwrap();
    write_shards(dir.path(), layout, tensors, shard_bytes).unwrap();
    dir
}

#[test]
fn native_layout_reads_every_weight_format() {
    let mut t = BTreeMap::new();
    t.insert("norm.weight".to_string(), tensor(Dtype::BF16, &[64], 1));
    t.insert("layers.0.attention.wq_a.weight".to_string(), tensor(Dtype::BF16, &[32, 64], 2));
    // FP8 per tensor with the published scalar shapes [] and [1].
    t.insert("layers.0.attention.wo.weight".to_string(), tensor(Dtype::F8_E4M3, &[64, 64], 3));
    t.insert("layers.0.attention.wo.qscale_weight".to_string(), scalar(0.5, &[]));
    t.insert("layers.0.attention.wo.qscale_act".to_string(), scalar(2.0, &[1]));
    // FP8 block-128.
    t.insert("layers.0.attention.wq_b.weight".to_string(), tensor(Dtype::F8_E4M3, &[130, 64], 4));
    t.insert("layers.0.attention.wq_b.weight_scale_inv".to_string(), tensor(Dtype::F32, &[2, 1], 5));
    // NVFP4 expert, INT4 expert with zero points.
    t.insert("layers.0.experts.1.w1.weight_packed".to_string(), tensor(Dtype::U8, &[16, 32], 6));
    t.insert("layers.0.experts.1.w1.weight_scale".to_string(), tensor(Dtype::F8_E4M3, &[16, 4], 7));
    t.insert("layers.0.experts.1.w1.weight_global_scale".to_string(), scalar(448.0 * 6.0, &[1]));
    t.insert("layers.0.experts.1.w2.weight_packed".to_string(), tensor(Dtype::U8, &[64, 8], 8));
    t.insert("layers.0.experts.1.w2.weight_scale".to_string(), tensor(Dtype::BF16, &[64, 1], 9));
    t.insert("layers.0.experts.1.w2.weight_zero_point".to_string(), tensor(Dtype::U8, &[64, 1], 10));
    let dir = write_dir(&Layout::Native, &t, 4096);
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.layout, Layout::Native);
    assert!(ck.shard_paths().len() > 1, "small shard size splits the checkpoint");

    assert_eq!(ck.plain("norm.weight", Dtype::BF16, &[64]).unwrap().data, &t["norm.weight"].data[..]);
    match ck.matrix("layers.0.attention.wq_a", 32, 64).unwrap() {
        MatrixData::Bf16 { data } => assert_eq!(data, &t["layers.0.attention.wq_a.weight"].data[..]),
        other => panic!("{other:?}"),
    }
    match ck.matrix("layers.0.attention.wo", 64, 64).unwrap() {
        MatrixData::Fp8PerTensor { scale, activation_scale, .. } => assert_eq!((scale, activation_scale), (0.5, Some(2.0))),
        other => panic!("{other:?}"),
    }
    assert!(matches!(ck.matrix("layers.0.attention.wq_b", 130, 64).unwrap(), MatrixData::Fp8Block128 { .. }));
    match ck.expert_matrix(0, 1, ExpertMatrix::W1, 64, 16).unwrap() {
        MatrixData::Nvfp4 { global_scale, packed, .. } => {
            assert_eq!(global_scale, 2688.0);
            assert_eq!(packed, &t["layers.0.experts.1.w1.weight_packed"].data[..]);
        }
        other => panic!("{other:?}"),
    }
    match ck.expert_matrix(0, 1, ExpertMatrix::W2, 64, 16).unwrap() {
        MatrixData::Int4 { group, zeros, .. } => assert_eq!((group, zeros.is_some()), (16, true)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn hf_layout_slices_stacked_experts() {
    let (experts, dim, hidden) = (3, 8, 4);
    let prefix = "model.language_model.";
    let mut t = BTreeMap::new();
    let gate_up = tensor(Dtype::BF16, &[experts, 2 * hidden, dim], 11);
    let down = tensor(Dtype::BF16, &[experts, dim, hidden], 12);
    t.insert(format!("{prefix}layers.0.mlp.experts.gate_up_proj"), gate_up.clone());
    t.insert(format!("{prefix}layers.0.mlp.experts.down_proj"), down.clone());
    t.insert(hf_name("layers.0.attention.wkv_b.weight", prefix), tensor(Dtype::BF16, &[12, 8], 13));
    t.insert(hf_name("output.weight", prefix), tensor(Dtype::BF16, &[10, 8], 14));
    let dir = write_dir(&Layout::HuggingFace { prefix: prefix.into() }, &t, 1 << 20);
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.layout, Layout::HuggingFace { prefix: prefix.into() });
    let row = dim * 2;
    let bytes = |m: MatrixData| match m {
        MatrixData::Bf16 { data } => data.to_vec(),
        other => panic!("{other:?}"),
    };
    // Expert 2: gate rows first, then up rows, inside its [2*hidden, dim] slab.
    let w1 = bytes(ck.expert_matrix(0, 2, ExpertMatrix::W1, dim, hidden).unwrap());
    let w3 = bytes(ck.expert_matrix(0, 2, ExpertMatrix::W3, dim, hidden).unwrap());
    let w2 = bytes(ck.expert_matrix(0, 2, ExpertMatrix::W2, dim, hidden).unwrap());
    let slab = 2 * hidden * row;
    assert_eq!(w1, gate_up.data[2 * slab..2 * slab + hidden * row]);
    assert_eq!(w3, gate_up.data[2 * slab + hidden * row..3 * slab]);
    assert_eq!(w2, down.data[2 * dim * hidden * 2..3 * dim * hidden * 2]);
    assert!(ck.matrix("layers.0.attention.wkv_b", 12, 8).is_ok());
    assert_eq!(hf_name("output.weight", prefix), "lm_head.weight");
    assert!(ck.matrix("output", 10, 8).is_ok());
    let err = ck.expert_matrix(0, 3, ExpertMatrix::W1, dim, hidden).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "expert beyond the stack: {err}");
}

#[test]
fn broken_checkpoints_give_clear_errors() {
    let mut t = BTreeMap::new();
    t.insert("layers.0.attention.wq_a.weight".to_string(), tensor(Dtype::BF16, &[32, 64], 2));
    t.insert("layers.0.attention.wo.weight".to_string(), tensor(Dtype::F8_E4M3, &[8, 8], 3));
    t.insert("layers.0.attention.wkv_b.weight".to_string(), tensor(Dtype::I32, &[8, 8], 3));
    let dir = write_dir(&Layout::Native, &t, 1 << 20);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let err = ck.matrix("layers.0.attention.wq_a", 64, 32).unwrap_err();
    assert!(matches!(err, Error::Shape { .. }), "{err}");
    let err = ck.matrix("layers.0.attention.missing", 1, 1).unwrap_err();
    assert!(err.to_string().contains("missing tensor"), "{err}");
    let err = ck.matrix("layers.0.attention.wo", 8, 8).unwrap_err();
    assert!(err.to_string().contains("no scale"), "{err}");
    let err = ck.matrix("layers.0.attention.wkv_b", 8, 8).unwrap_err();
    assert!(matches!(err, Error::UnknownDtype(_)), "{err}");
    let shard = ck.shard_paths()[0].to_path_buf();
    drop(ck);

    // Truncated data.
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("truncated"), "{err}");
    // A header that is not JSON.
    let mut bad = bytes.clone();
    bad[8] = b'#';
    std::fs::write(&shard, &bad).unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("bad safetensors header"), "{err}");
    // A header length beyond the file.
    std::fs::write(&shard, [255u8; 12]).unwrap();
    assert!(matches!(Checkpoint::open(dir.path()), Err(Error::Checkpoint(_))));
    // No config at all.
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(Checkpoint::open(empty.path()), Err(Error::Checkpoint(_))));
    // A config that is not JSON.
    std::fs::write(empty.path().join("params.json"), "{dim: ").unwrap();
    assert!(matches!(Checkpoint::open(empty.path()), Err(Error::Json { .. })));
}

/// Stacked HF FP8 experts: expert e's static activation scale is entry e of `{stack}_activation_scale` (`[E]`, or
/// `[E, 1, 1]` as some exporters keep it); W8A8 takes the largest per projection. A scale tensor of another shape is
/// a checkpoint error, not a silent read.
#[test]
fn hf_stacked_fp8_experts_read_per_expert_activation_scales() {
    let (experts, dim, hidden) = (3, 8, 4);
    let prefix = "model.language_model.";
    let base = format!("{prefix}layers.0.mlp.experts");
    let vector =
        |values: &[f32], shape: &[usize]| OwnedTensor { dtype: Dtype::F32, shape: shape.to_vec(), data: values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let mut t = BTreeMap::new();
    t.insert(format!("{base}.gate_up_proj"), tensor(Dtype::F8_E4M3, &[experts, 2 * hidden, dim], 1));
    t.insert(format!("{base}.down_proj"), tensor(Dtype::F8_E4M3, &[experts, dim, hidden], 2));
    t.insert(format!("{base}.gate_up_proj_scale_inv"), vector(&[0.5, 0.25, 0.125], &[experts, 1, 1]));
    t.insert(format!("{base}.down_proj_scale_inv"), vector(&[1.0, 2.0, 4.0], &[experts, 1, 1]));
    t.insert(format!("{base}.gate_up_proj_activation_scale"), vector(&[0.01, 0.03, 0.02], &[experts]));
    t.insert(format!("{base}.down_proj_activation_scale"), vector(&[0.5, 0.7, 0.6], &[experts, 1, 1]));
    let layout = Layout::HuggingFace { prefix: prefix.into() };
    let dir = write_dir(&layout, &t, 1 << 20);
    let ck = Checkpoint::open(dir.path()).unwrap();
    let scales = |which| match ck.expert_matrix(0, 1, which, dim, hidden).unwrap() {
        MatrixData::Fp8PerTensor { scale, activation_scale, .. } => (scale, activation_scale),
        other => panic!("{other:?}"),
    };
    assert_eq!(scales(ExpertMatrix::W1), (0.25, Some(0.03)));
    assert_eq!(scales(ExpertMatrix::W3), (0.25, Some(0.03)));
    assert_eq!(scales(ExpertMatrix::W2), (2.0, Some(0.7)));
    assert_eq!(ck.expert_activation_scales(0, experts, dim, hidden).unwrap(), Some((0.03, 0.7)));
    drop(ck);

    t.insert(format!("{base}.down_proj_activation_scale"), vector(&[0.5, 0.7, 0.6, 0.1], &[2, 2]));
    let dir = write_dir(&layout, &t, 1 << 20);
    let err = Checkpoint::open(dir.path()).unwrap().expert_matrix(0, 1, ExpertMatrix::W2, dim, hidden).unwrap_err();
    assert!(matches!(&err, Error::Checkpoint(msg) if msg.contains("down_proj_activation_scale")), "{err}");
}

/// `small4 inspect` lists every problem it finds: two truncated shards and the tensors they held, all in one report,
/// where opening the checkpoint stops at the first.
#[test]
fn inspect_lists_every_problem() {
    use small4::model::config::ModelConfig;
    use small4::model::synthetic::write_checkpoint;
    use small4::quant::WeightFormat;
    use small4::reference::model::ReferenceWeights;
    let config = ModelConfig { n_layers: 2, ..ModelConfig::tiny() };
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &ReferenceWeights::random(&config, 1).unwrap(), &Layout::Native, WeightFormat::Bf16, 256 << 10).unwrap();
    let shards: Vec<_> = Checkpoint::open(dir.path()).unwrap().shard_paths().iter().map(|p| p.to_path_buf()).collect();
    assert!(shards.len() >= 4, "{} shards", shards.len());
    let broken = [&shards[1], &shards[shards.len() - 2]];
    for shard in broken {
        let bytes = std::fs::read(shard).unwrap();
        std::fs::write(shard, &bytes[..bytes.len() - 3]).unwrap();
    }
    assert!(Checkpoint::open(dir.path()).is_err());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_small4")).arg("inspect").arg(dir.path()).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    let problems: Vec<&str> = stdout.lines().skip_while(|l| !l.starts_with("problems (")).skip(1).collect();
    for shard in broken {
        let name = shard.file_name().unwrap().to_str().unwrap();
        assert!(problems.iter().any(|p| p.contains(name) && p.contains("truncated")), "{name} not listed: {stdout}");
    }
    // The tensors of the broken shards are missing for the engine, each listed.
    assert!(problems.iter().filter(|p| p.contains("missing tensor")).count() >= 2, "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("{} problems", problems.len())), "{}", String::from_utf8_lossy(&out.stderr));
}
