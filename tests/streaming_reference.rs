//! The streaming reference (weights read in place from the mapped checkpoint, dequantised block by block, only routed
//! experts touched) gives the in-memory reference's logits bit for bit, in every format and both layouts.

use small4::model::checkpoint::{write_shards, Checkpoint, ExpertMatrix, Layout, OwnedTensor};
use small4::model::synthetic::{load_reference_weights, tiny_checkpoint, DEFAULT_TINY_SEED, HF_MISTRAL3_PREFIX};
use small4::model::ModelConfig;
use small4::quant::WeightFormat;
use small4::reference::model::{AttentionForm, ForwardOptions, ReferenceModel, RoundingMode};
use small4::reference::weights::{CheckpointWeights, MatrixStorage, Weight, WeightMatrix, WeightSource, ROW_BLOCK};
use small4::Error;

const PROMPT: [u32; 5] = [1, 300, 301, 1010, 73];

fn layouts() -> [Layout; 2] {
    [Layout::Native, Layout::HuggingFace { prefix: HF_MISTRAL3_PREFIX.into() }]
}

/// Prompt logits, then two decode steps (the cache of the streaming pass is the one it appended).
fn logits<W: WeightSource>(model: &ReferenceModel<W>) -> Vec<Vec<f32>> {
    let mut cache = model.new_cache();
    let mut out = vec![model.forward(&PROMPT, &mut cache).unwrap()];
    for token in [7, 1999] {
        out.push(model.forward(&[token], &mut cache).unwrap());
    }
    out
}

#[test]
fn streaming_matches_in_memory_in_every_format_and_layout() {
    for layout in layouts() {
        for format in WeightFormat::ALL {
            let checkpoint = Checkpoint::open(tiny_checkpoint(format, &layout, DEFAULT_TINY_SEED).unwrap()).unwrap();
            let in_memory = load_reference_weights(&checkpoint).unwrap();
            for attention in [AttentionForm::Absorbed, AttentionForm::Naive] {
                let options = ForwardOptions { attention, ..ForwardOptions::default() };
                let want = logits(&ReferenceModel::new(in_memory.clone(), options).unwrap());
                let got = logits(&ReferenceModel::new(CheckpointWeights::new(&checkpoint).unwrap(), options).unwrap());
                assert!(got == want, "{format} {layout:?} {attention:?}: streaming logits differ from the in-memory ones");
            }
        }
    }
}

#[test]
fn streaming_matches_in_memory_with_f32_activations_and_w8a8() {
    // The native FP8 checkpoint carries the experts' static activation scales.
    let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Fp8PerTensor, &Layout::Native, DEFAULT_TINY_SEED).unwrap()).unwrap();
    let in_memory = load_reference_weights(&checkpoint).unwrap();
    for options in [
        ForwardOptions { rounding: RoundingMode::F32, attention: AttentionForm::Absorbed, fp8_activations: false, prefill_fp8_act: false },
        ForwardOptions { fp8_activations: true, ..ForwardOptions::default() },
    ] {
        let want = logits(&ReferenceModel::new(in_memory.clone(), options).unwrap());
        let got = logits(&ReferenceModel::new(CheckpointWeights::new(&checkpoint).unwrap(), options).unwrap());
        assert!(got == want, "{options:?}: streaming logits differ from the in-memory ones");
    }
    // W8A8 needs activation scales: the bf16 checkpoint has none, a typed error for both sources.
    let bf16 = Checkpoint::open(tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED).unwrap()).unwrap();
    let w8a8 = ForwardOptions { fp8_activations: true, ..ForwardOptions::default() };
    assert!(matches!(ReferenceModel::new(CheckpointWeights::new(&bf16).unwrap(), w8a8), Err(Error::InvalidArgument(_))));
}

#[test]
fn the_streaming_generation_is_the_in_memory_one_and_images_read_the_checkpoint_tower() {
    let checkpoint = Checkpoint::open(tiny_checkpoint(WeightFormat::Nvfp4, &layouts()[1], DEFAULT_TINY_SEED).unwrap()).unwrap();
    let in_memory = ReferenceModel::new(load_reference_weights(&checkpoint).unwrap(), ForwardOptions::default()).unwrap();
    let streaming = ReferenceModel::new(CheckpointWeights::new(&checkpoint).unwrap(), ForwardOptions::default()).unwrap();
    let want = in_memory.generate_greedy(&PROMPT, 4, |_| {}).unwrap().generated;
    assert_eq!(streaming.generate_greedy(&PROMPT, 4, |_| {}).unwrap().generated, want);
    // The vision tower comes from the checkpoint when an image needs it.
    let image = small4::model::PixelImage { width: 28, height: 28, channels: 3, data: vec![0.25; 3 * 28 * 28] };
    assert_eq!(streaming.encode_images(std::slice::from_ref(&image)).unwrap(), in_memory.encode_images(&[image]).unwrap());
}

#[test]
fn a_weight_that_cannot_be_read_fails_the_pass_and_leaves_the_cache_as_it_was() {
    // A checkpoint missing one expert's tensors: the pass that routes to it fails with a checkpoint error.
    let source = tiny_checkpoint(WeightFormat::Bf16, &Layout::Native, DEFAULT_TINY_SEED).unwrap();
    let full = Checkpoint::open(&source).unwrap();
    let model = ReferenceModel::new(CheckpointWeights::new(&full).unwrap(), ForwardOptions::default()).unwrap();
    let mut cache = model.new_cache();
    model.forward(&PROMPT, &mut cache).unwrap();
    let rows: Vec<usize> = (0..ModelConfig::tiny().n_layers).map(|l| cache.layer(l).len()).collect();

    // The same checkpoint rewritten without layer 0's routed experts.
    let kept: std::collections::BTreeMap<String, OwnedTensor> = full
        .stored_names()
        .into_iter()
        .filter(|n| !n.starts_with("layers.0.experts."))
        .map(|n| {
            let t = full.stored(n).unwrap();
            (n.to_string(), OwnedTensor { dtype: t.dtype, shape: t.shape.to_vec(), data: t.data.to_vec() })
        })
        .collect();
    let broken_dir = tempfile::tempdir().unwrap();
    write_shards(broken_dir.path(), &Layout::Native, &kept, 1 << 40).unwrap();
    std::fs::copy(source.join("params.json"), broken_dir.path().join("params.json")).unwrap();
    let broken = Checkpoint::open(broken_dir.path()).unwrap();
    let broken_model = ReferenceModel::new(CheckpointWeights::new(&broken).unwrap(), ForwardOptions::default()).unwrap();
    let mut broken_cache = broken_model.new_cache();
    assert!(matches!(broken_model.forward(&PROMPT, &mut broken_cache), Err(Error::Checkpoint(_))));
    assert!(broken_cache.is_empty() && (0..rows.len()).all(|l| broken_cache.layer(l).is_empty()), "the failed pass left cache rows");
    // The intact model continues from its own cache.
    assert!(model.forward(&[5], &mut cache).is_ok());
    assert!((0..rows.len()).all(|l| cache.layer(l).len() == rows[l] + cache.width()));
}

#[test]
fn block_products_equal_the_product_over_the_whole_dequantised_matrix() {
    // 300 rows: two full blocks and a ragged one; every format reads back the same values block by block.
    let (rows, cols) = (2 * ROW_BLOCK + 44, 256);
    let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 300.0).collect();
    let x: Vec<f32> = (0..3 * cols).map(|i| ((i * 31 % 97) as f32 - 48.0) / 50.0).collect();
    for format in WeightFormat::ALL {
        let q = small4::quant::QuantizedMatrix::quantize(format, &values, rows, cols).unwrap();
        // The weights as the GEMM kernels multiply them (bf16-rounded for FP8 block-128 and INT4), as the reference reads them.
        let dense = q.dequantize_for_gemm();
        let want = small4::reference::linear::matmul_nt(&x, &dense, 3, cols, rows);
        let owned = WeightMatrix { rows, cols, storage: MatrixStorage::Owned(q.clone()) };
        assert_eq!(owned.to_f32().unwrap().as_ref(), dense.as_slice(), "{format}");
        assert_eq!(owned.matmul(&x).unwrap(), want, "{format}");
        let stored = WeightMatrix { rows, cols, storage: MatrixStorage::Stored((&q).into()) };
        assert_eq!(stored.matmul(&x).unwrap(), want, "{format}");
        // Bad inputs are typed errors: an input that is not rows of `cols`, rows past the end.
        assert!(matches!(owned.matmul(&x[1..]), Err(Error::Shape { .. })));
        assert!(matches!(owned.rows_f32(rows - 1..rows + 1), Err(Error::OutOfRange { .. })));
    }
    // The weight names are the native checkpoint's.
    let c = ModelConfig::tiny();
    let expert = Weight::Expert { layer: 2, expert: 5, which: ExpertMatrix::W2 };
    assert_eq!((expert.native_name(), expert.shape(&c)), ("layers.2.experts.5.w2".to_string(), (c.dim, c.expert_hidden)));
    assert_eq!(Weight::KvaNorm(1).native_name(), "layers.1.attention.kv_a_norm.weight");
}

#[test]
fn the_synthetic_source_streams_the_in_memory_synthetic_weights_bit_for_bit() {
    use small4::model::synth::SyntheticModel;
    for format in WeightFormat::ALL {
        let synthetic = SyntheticModel::new(ModelConfig::tiny(), format, 3).unwrap();
        let want = logits(&ReferenceModel::new(synthetic.reference_weights().unwrap(), ForwardOptions::default()).unwrap());
        let got = logits(&ReferenceModel::new(synthetic, ForwardOptions::default()).unwrap());
        assert!(got == want, "{format}: streaming synthetic logits differ from the in-memory ones");
    }
}
