//! The vision tower on a real GPU at the model's geometry (hidden 1024, 24 layers, 16 heads of 64, intermediate 4096,
//! projected into 4096): the block-diagonal attention alone over one image of T patches, and the whole tower plus
//! projector (`DeviceVisionTower::encode`, host uploads and allocations included) for a 448x448 image (1024 patches)
//! and the largest one, 1540x1540 (12100 patches). Attention throughput is its FLOPs (4 * 64 per query-key pair per
//! head) per second; `T=..` runs the default kernel (wgmma), `mma_sync T=..` the mma.sync one. Without a GPU it
//! prints that it skips, and why.
//!
//! `cargo bench --bench vision`

use criterion::{BenchmarkId, Criterion, Throughput};
use half::bf16;
use rand::{Rng, SeedableRng};
use small4::device::{Device, DeviceBuffer};
use small4::kernels::vision::{vision_attention, TokenSegments, VisionAttentionKernel};
use small4::model::vision::DeviceVisionTower;
use small4::model::ModelConfig;
use small4::reference::vision::{PixelImage, VisionLayerWeights, VisionWeights};

fn random(rng: &mut rand::rngs::StdRng, len: usize, scale: f32) -> Vec<f32> {
    (0..len).map(|_| rng.random_range(-scale..scale)).collect()
}

fn bench_attention(c: &mut Criterion, device: &Device) {
    let mut group = c.benchmark_group("vision_attention");
    group.sample_size(10);
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let heads = 16;
    for tokens in [1024usize, 12100] {
        let len = tokens * heads * 64;
        let buffer = |rng: &mut rand::rngs::StdRng| {
            DeviceBuffer::from_slice(device, &random(rng, len, 1.0).into_iter().map(bf16::from_f32).collect::<Vec<_>>()).unwrap()
        };
        let (q, k, v) = (buffer(&mut rng), buffer(&mut rng), buffer(&mut rng));
        let out = DeviceBuffer::<bf16>::alloc(device, len).unwrap();
        let segments = TokenSegments::upload(device, std::slice::from_ref(&(0..tokens))).unwrap();
        let [q, k, v, out] = [&q, &k, &v, &out].map(|b| b.view([tokens, heads, 64]).unwrap());
        group.throughput(Throughput::Elements((4 * 64 * heads * tokens * tokens) as u64));
        for (kernel, prefix) in [(VisionAttentionKernel::Wgmma, ""), (VisionAttentionKernel::MmaSync, "mma_sync ")] {
            group.bench_with_input(BenchmarkId::from_parameter(format!("{prefix}T={tokens}")), &tokens, |b, _| {
                b.iter_custom(|iters| {
                    device.synchronize().unwrap();
                    let start = std::time::Instant::now();
                    kernel.run(|| {
                        for _ in 0..iters {
                            vision_attention(q, k, v, out, &segments, 0.125).unwrap();
                        }
                    });
                    device.synchronize().unwrap();
                    start.elapsed()
                })
            });
        }
    }
    group.finish();
}

fn bench_tower(c: &mut Criterion, device: &Device) {
    let config = ModelConfig::mistral_small_4();
    let v = config.vision.as_ref().unwrap();
    let (h, text) = (v.hidden, config.dim);
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let mut matrix = |rows: usize, cols: usize| random(&mut rng, rows * cols, 1.0 / (cols as f32).sqrt());
    let layers = (0..v.n_layers)
        .map(|_| VisionLayerWeights {
            attention_norm: vec![1.0; h],
            wq: matrix(h, h),
            wk: matrix(h, h),
            wv: matrix(h, h),
            wo: matrix(h, h),
            ffn_norm: vec![1.0; h],
            w1: matrix(v.intermediate, h),
            w3: matrix(v.intermediate, h),
            w2: matrix(h, v.intermediate),
        })
        .collect();
    let weights = VisionWeights {
        patch_conv: matrix(h, 3 * v.patch_size * v.patch_size),
        ln_pre: vec![1.0; h],
        layers,
        pre_mm_projector_norm: vec![1.0; h],
        merging_layer: matrix(h, 4 * h),
        w_in: matrix(text, h),
        w_in_bias: None,
        w_out: matrix(text, text),
        w_out_bias: None,
    };
    let tower = DeviceVisionTower::upload(device, &weights, v, text).unwrap();
    drop(weights);
    let mut group = c.benchmark_group("vision_tower");
    group.sample_size(10);
    for side in [448usize, 1540] {
        let image = PixelImage { width: side, height: side, channels: 3, data: random(&mut rand::rngs::StdRng::seed_from_u64(3), 3 * side * side, 1.0) };
        group.bench_with_input(BenchmarkId::from_parameter(format!("{side}x{side}")), &side, |b, _| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                for _ in 0..iters {
                    let features = tower.encode(std::slice::from_ref(&image)).unwrap();
                    device.synchronize().unwrap();
                    drop(features);
                }
                start.elapsed()
            })
        });
    }
    group.finish();
}

fn main() {
    let Some(device) = small4::device::gpu_or_skip("vision bench") else { return };
    let mut criterion = Criterion::default().configure_from_args();
    bench_attention(&mut criterion, &device);
    bench_tower(&mut criterion, &device);
    criterion.final_summary();
}
