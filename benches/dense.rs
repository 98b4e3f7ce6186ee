//! Dense decode GEMMs on a real GPU at the model's shapes (Mistral Small 4: dim 4096, q_lora 1024, kv latent 256 +
//! rope 64, 32 heads of 64 + 64 query dims and 128 value dims, vocab 131072): the latent projection (wq_a + wkv_a,
//! 1344 x 4096), the query projection (wq_b, 4096 x 1024), the output projection (wo, 4096 x 4096) and the output head
//! (131072 x 4096, f32 logits), at 1 and 8 tokens, in the attention formats the checkpoints use (bf16 with 4-bit
//! experts, per-tensor and 128x128-block FP8 with FP8 experts; the head is always bf16). Issue 16's target for these
//! is 75% of HBM. Throughput is the ideal bytes (the weights and their scales once + the activations in and out) over
//! the mean time of a call; each case prints GB/s as a fraction of the device's HBM bandwidth (`device::Ceilings`).
//! Weights are generated on the device (`kernels::synth`): no host copy of the 1 GiB head.
//! Without a GPU it prints that it skips and measures nothing.
//!
//! `cargo bench --bench dense`

mod common;

use std::time::Duration;

use common::time_calls;
use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use small4::device::{Ceilings, Device, DeviceBuffer};
use small4::kernels::dense;
use small4::kernels::gemm::DeviceWeights;
use small4::kernels::synth::{self, View};
use small4::model::synth::TensorSpec;
use small4::model::ModelConfig;
use small4::quant::WeightFormat;

/// One dense projection of a decode step: its name, output rows and reduction length.
struct Projection {
    name: &'static str,
    rows: usize,
    k_dim: usize,
    /// The output head writes f32 logits; the projections bf16.
    f32_out: bool,
}

fn projections(config: &ModelConfig) -> [Projection; 4] {
    let heads = config.heads;
    [
        Projection { name: "latent_projection", rows: config.q_lora_rank + config.kv_lora_rank + config.qk_rope, k_dim: config.dim, f32_out: false },
        Projection { name: "wq_b", rows: heads * (config.qk_nope + config.qk_rope), k_dim: config.q_lora_rank, f32_out: false },
        Projection { name: "wo", rows: config.dim, k_dim: heads * config.v_head, f32_out: false },
        Projection { name: "head", rows: config.vocab, k_dim: config.dim, f32_out: true },
    ]
}

fn bench_projection(c: &mut Criterion, device: &Device, projection: &Projection, format: WeightFormat, key: u64) {
    let ceilings = Ceilings::for_device_name(&device.device_name());
    let spec = TensorSpec::matrix(key, projection.rows, projection.k_dim, format, 0.02);
    let weights: DeviceWeights = synth::packed(device, std::slice::from_ref(&spec), View::Whole).unwrap();
    for tokens in [1usize, 8] {
        let x_host: Vec<bf16> = (0..tokens * projection.k_dim).map(|i| bf16::from_f32(((i % 17) as f32 - 8.0) / 16.0)).collect();
        let x = DeviceBuffer::from_slice(device, &x_host).unwrap();
        let x = x.view([tokens, projection.k_dim]).unwrap();
        let out_bytes = if projection.f32_out { 4 } else { 2 };
        let name = format!("dense/{}/{format}/tokens_{tokens}", projection.name);
        let mean = if projection.f32_out {
            let y = DeviceBuffer::<f32>::alloc(device, tokens * projection.rows).unwrap();
            let y = y.view([tokens, projection.rows]).unwrap();
            time_calls(c, device, &name, || dense::linear_f32(&weights, x, y, None).unwrap())
        } else {
            let y = DeviceBuffer::<bf16>::alloc(device, tokens * projection.rows).unwrap();
            let y = y.view([tokens, projection.rows]).unwrap();
            time_calls(c, device, &name, || dense::linear(&weights, x, y).unwrap())
        };
        let ideal_bytes = weights.bytes_per_expert + tokens * projection.k_dim * 2 + tokens * projection.rows * out_bytes;
        let seconds = mean.as_secs_f64();
        println!(
            "{name}: {:.1} us, {:.0} GB/s ({:.0}% of {}) for {:.1} MB of weights",
            seconds * 1e6,
            ideal_bytes as f64 / seconds / 1e9,
            100.0 * ideal_bytes as f64 / seconds / ceilings.hbm_bytes_per_s,
            ceilings.label,
            weights.bytes_per_expert as f64 / 1e6
        );
    }
}

fn dense_benches(c: &mut Criterion) {
    let Some(device) = small4::device::gpu_or_skip("benches/dense.rs") else { return };
    let config = ModelConfig::mistral_small_4();
    for (key, projection) in (1u64..).zip(projections(&config).iter()) {
        let formats: &[WeightFormat] =
            if projection.f32_out { &[WeightFormat::Bf16] } else { &[WeightFormat::Bf16, WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128] };
        for &format in formats {
            bench_projection(c, &device, projection, format, key);
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(2));
    targets = dense_benches
}
criterion_main!(benches);
