//! The device generator of synthetic weights (`cuda/synth.cu`) against the CPU one (`model::synth`): the packed
//! arrays equal `repack_linear` / `repack_gate_up` of the CPU matrices bit for bit, for every format, linear and
//! fused gate/up, several experts, K up to 4096 (every 64-k block and 128-k scale block index in use), and the views
//! `DeviceModel::load` cuts from `wkv_b`; bf16 arrays equal. Then the synthetic model built on the device
//! (`DeviceModel::synthetic`) against the CPU reference over the same weights, and against the same weights loaded
//! from a checkpoint.

mod common;

use common::forced::ForcedReference;
use half::bf16;
use small4::device::Device;
use small4::kernels::gemm::DeviceWeights;
use small4::kernels::synth::{packed, packed_gate_up, plain, View};
use small4::model::checkpoint::{Checkpoint, Layout};
use small4::model::engine::{DeviceModel, Engine, EngineOptions, Request, Sampling, Shard, StepToken};
use small4::model::synth::{tensor_key, SyntheticModel, TensorKind, TensorSpec};
use small4::model::synthetic::write_checkpoint;
use small4::model::ModelConfig;
use small4::quant::repack::{repack_gate_up, repack_linear, MatrixRef, PackedWeights};
use small4::quant::{QuantizedMatrix, WeightFormat};
use small4::reference::model::{ForwardOptions, ReferenceModel};

/// Every array of the device weights equals the CPU-packed one.
fn assert_same(what: &str, got: &DeviceWeights, want: &PackedWeights) {
    let geometry = |f, e, o, r, k, s, st, g| (f, e, o, r, k, s, st, g);
    assert_eq!(
        geometry(got.format, got.experts, got.out_cols, got.rows_padded, got.k_dim, got.swiglu, got.expert_stride, got.group),
        geometry(want.format, want.experts, want.out_cols, want.rows_padded, want.k_dim, want.swiglu, want.expert_stride, want.group),
        "{what}: geometry"
    );
    assert_eq!(got.bytes_per_expert, want.bytes_per_expert(), "{what}: bytes per expert");
    let data = got.data.to_vec().unwrap();
    if let Some(i) = data.iter().zip(&want.data).position(|(a, b)| a != b) {
        panic!("{what}: data byte {i} of {}: got {:#04x}, want {:#04x}", data.len(), data[i], want.data[i]);
    }
    assert_eq!(data.len(), want.data.len(), "{what}: data length");
    assert_eq!(got.row_scales.as_ref().map(|b| b.to_vec().unwrap()), want.row_scales, "{what}: row scales");
    assert_eq!(got.block_scales.as_ref().map(|b| b.to_vec().unwrap()), want.block_scales, "{what}: block scales");
    assert_eq!(got.group_scales.as_ref().map(|b| b.to_vec().unwrap()), want.group_scales, "{what}: group scales");
    assert_eq!(got.group_zeros.as_ref().map(|b| b.to_vec().unwrap()), want.group_zeros, "{what}: group zeros");
    assert_eq!(got.fp4_scales.as_ref().map(|b| b.to_vec().unwrap()), want.fp4_scales, "{what}: fp4 scales");
}

fn specs(format: WeightFormat, name: &str, experts: usize, rows: usize, cols: usize) -> Vec<TensorSpec> {
    (0..experts).map(|e| TensorSpec::matrix(tensor_key(9, &format!("{name}.{e}")), rows, cols, format, 1.0 / (cols as f64).sqrt())).collect()
}

fn generate(specs: &[TensorSpec]) -> Vec<QuantizedMatrix> {
    specs.iter().map(|s| s.generate().unwrap()).collect()
}

/// Linear (3 experts of [40, 4096]: one partial row tile, 64 k blocks) and fused gate/up (2 experts of hidden 24,
/// K 256) in every format.
fn packed_layouts_match_repack(device: &Device) {
    for format in WeightFormat::ALL {
        let down = specs(format, "down", 3, 40, 4096);
        let cpu = generate(&down);
        let want = repack_linear(&cpu.iter().map(MatrixRef::from).collect::<Vec<_>>()).unwrap();
        assert_same(&format!("{format} linear [40, 4096] x 3"), &packed(device, &down, View::Whole).unwrap(), &want);

        let (w1, w3) = (specs(format, "w1", 2, 24, 256), specs(format, "w3", 2, 24, 256));
        let pairs: Vec<(TensorSpec, TensorSpec)> = w1.iter().copied().zip(w3.iter().copied()).collect();
        let (c1, c3) = (generate(&w1), generate(&w3));
        let want = repack_gate_up(&c1.iter().zip(&c3).map(|(a, b)| (MatrixRef::from(a), MatrixRef::from(b))).collect::<Vec<_>>()).unwrap();
        assert_same(&format!("{format} gate_up hidden 24, K 256 x 2"), &packed_gate_up(device, &pairs).unwrap(), &want);
    }
}

/// The W_UK / W_UV views of a [2 heads x (64 + 128), 256] wkv_b in bf16 and FP8 (per-tensor, block-128: W_UK padded
/// to 128 columns, W_UV in 64-row pieces), against the CPU slices packed, as `DeviceModel::load` cuts them.
fn wkv_b_views_match_load(device: &Device) {
    for format in [WeightFormat::Bf16, WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128] {
        let spec = specs(format, "wkv_b", 1, 2 * 192, 256);
        let m = spec[0].generate().unwrap();
        let cols = 256;
        for h in 0..2 {
            // W_UK_h^T: rows h*192..h*192+64 transposed to [256, 64] (+ zero columns to 128 for block scales).
            let first = h * 192;
            let want = match &m {
                QuantizedMatrix::Bf16 { data, .. } => {
                    let t: Vec<bf16> = (0..cols).flat_map(|j| (0..64).map(move |d| (first + d) * cols + j)).map(|i| data[i]).collect();
                    QuantizedMatrix::Bf16 { data: t, rows: cols, cols: 64 }
                }
                QuantizedMatrix::Fp8PerTensor(f) => {
                    let t: Vec<u8> = (0..cols).flat_map(|j| (0..64).map(move |d| (first + d) * cols + j)).map(|i| f.data[i]).collect();
                    QuantizedMatrix::Fp8PerTensor(small4::quant::Fp8PerTensor::from_parts(t, cols, 64, f.scale).unwrap())
                }
                QuantizedMatrix::Fp8Block128(f) => {
                    let t: Vec<u8> = (0..cols).flat_map(|j| (0..128).map(move |d| if d < 64 { f.data[(first + d) * cols + j] } else { 0 })).collect();
                    let block = first / 128;
                    QuantizedMatrix::Fp8Block128(small4::quant::Fp8Block128::from_parts(t, cols, 128, f.scales[block * 2..block * 2 + 2].to_vec()).unwrap())
                }
                _ => unreachable!(),
            };
            let got = packed(device, &spec, View::TransposedRows { first, count: 64 }).unwrap();
            assert_same(&format!("{format} W_UK head {h}"), &got, &repack_linear(&[MatrixRef::from(&want)]).unwrap());
            // W_UV_h: rows first+64..first+192, in 64-row pieces (each inside one 128-row scale block).
            for o in [0, 64] {
                let row = first + 64 + o;
                let slice = small4::quant::repack::slice_rows(MatrixRef::from(&m), row, 64);
                // Block-128 slices that do not start a block: the CPU slice of its one block row.
                let want = match (slice, &m) {
                    (Ok(s), _) => repack_linear(&[s]).unwrap(),
                    (Err(_), QuantizedMatrix::Fp8Block128(f)) => {
                        let block = row / 128;
                        let part = small4::quant::Fp8Block128::from_parts(
                            f.data[row * cols..(row + 64) * cols].to_vec(),
                            64,
                            cols,
                            f.scales[block * 2..block * 2 + 2].to_vec(),
                        )
                        .unwrap();
                        repack_linear(&[MatrixRef::from(&QuantizedMatrix::Fp8Block128(part))]).unwrap()
                    }
                    (Err(e), _) => panic!("{e}"),
                };
                assert_same(&format!("{format} W_UV head {h} rows +{o}"), &packed(device, &spec, View::Rows { first: row, count: 64 }).unwrap(), &want);
            }
        }
    }
}

/// Norm vectors and bf16 tables equal the CPU values; a quantised spec is refused as a plain array.
fn plain_arrays_match_cpu(device: &Device) {
    let norm = TensorSpec { key: tensor_key(3, "norm.weight"), rows: 1000, cols: 1, kind: TensorKind::Norm };
    assert_eq!(plain(device, &norm).unwrap().to_vec().unwrap(), norm.bf16_values().unwrap());
    let table = specs(WeightFormat::Bf16, "tok_embeddings.weight", 1, 33, 96)[0];
    assert_eq!(plain(device, &table).unwrap().to_vec().unwrap(), table.bf16_values().unwrap());
    let nvfp4 = specs(WeightFormat::Nvfp4, "w", 1, 16, 64)[0];
    assert!(matches!(plain(device, &nvfp4), Err(small4::Error::InvalidArgument(_))));
    assert!(matches!(packed(device, &[norm], View::Whole), Err(small4::Error::InvalidArgument(_))));
    assert!(matches!(packed(device, &[nvfp4], View::TransposedRows { first: 0, count: 8 }), Err(small4::Error::InvalidArgument(_))));
    assert!(matches!(packed(device, &[nvfp4], View::Rows { first: 8, count: 16 }), Err(small4::Error::OutOfRange { .. })));
}

/// One decoder layer of the tiny preset built on the device from the generator: prefill and 5 greedy decode steps of
/// three prompts in one engine, every format, against the CPU reference over `reference_weights()` forced to the
/// engine's routing (`common::forced`, as tests/engine.rs does): logits within the one engine tolerance at every step.
/// Measured (seed 1): the largest logit difference is 0.012-0.029 over all formats, prompts and steps. Over the 4
/// layers of the preset the forced comparison passes as well (every format within 0.06, 2026-12-06: 216 s on the
/// interpreter, hence one layer here; before the forcing, router near-ties parted single steps by 0.15-0.42 there).
fn synthetic_model_matches_reference(device: &Device) {
    for format in WeightFormat::ALL {
        let synthetic = SyntheticModel::new(ModelConfig { n_layers: 1, ..ModelConfig::tiny() }, format, 1).unwrap();
        let reference = ReferenceModel::new(synthetic.reference_weights().unwrap(), ForwardOptions::default()).unwrap();
        let model = DeviceModel::synthetic(device, &synthetic).unwrap();
        let options = EngineOptions { eos: None, keep_logits: true, record_routing: true, ..EngineOptions::default() };
        let mut engine = Engine::new(model, options, None).unwrap();
        let mut forced = ForcedReference::new(&reference);
        for (p, prompt) in [vec![1u32, 300, 301, 17], vec![1, 2000, 5, 77, 1024, 9], vec![1, 40, 41, 42, 43, 44, 45, 46]].into_iter().enumerate() {
            forced.generate(&mut engine, vec![Request { prompt, max_tokens: 6, sampling: Sampling::Greedy }], &format!("{format} prompt {p}"));
        }
        eprintln!("{format}: {}", forced.stats);
    }
}

/// The 4-layer bf16 synthetic model built by the device generator and the same weights written as a checkpoint and
/// loaded by `DeviceModel::load` give the same logits bit for bit (3 greedy steps). bf16 only: the checkpoint writer
/// quantises f32 weights itself, which reproduces the generator's codes only for bf16.
fn synthetic_model_equals_loaded_checkpoint(device: &Device) {
    let synthetic = SyntheticModel::new(ModelConfig::tiny(), WeightFormat::Bf16, 1).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_checkpoint(dir.path(), &synthetic.reference_weights().unwrap(), &Layout::Native, WeightFormat::Bf16, 1 << 22).unwrap();
    let checkpoint = Checkpoint::open(dir.path()).unwrap();
    let run = |model: DeviceModel| -> Vec<Vec<f32>> {
        let mut engine = Engine::new(model, EngineOptions { eos: None, keep_logits: true, ..EngineOptions::default() }, None).unwrap();
        let mut got: Vec<StepToken> = Vec::new();
        engine.generate(vec![Request { prompt: vec![1, 2000, 5, 77, 1024, 9], max_tokens: 3, sampling: Sampling::Greedy }], |t| got.push(t.clone())).unwrap();
        got.into_iter().map(|t| t.logits.unwrap()).collect()
    };
    let loaded = run(DeviceModel::load(device, &checkpoint, Shard::SINGLE).unwrap());
    assert_eq!(run(DeviceModel::synthetic(device, &synthetic).unwrap()), loaded);
}

backend_tests!(
    packed_layouts_match_repack,
    wkv_b_views_match_load,
    plain_arrays_match_cpu,
    synthetic_model_matches_reference,
    synthetic_model_equals_loaded_checkpoint
);
