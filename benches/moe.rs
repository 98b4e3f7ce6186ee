//! Grouped expert GEMMs on a real GPU: one MoE layer's routed experts with the model's sizes (dim 4096, hidden 2048,
//! 128 experts, top-4) for every weight format. Two forms:
//! - `moe_layer/FORMAT/tokens_T` (1, 32 and 2048 tokens): `moe::moe_layer`, three launches (up + SwiGLU, down x
//!   routing weight, `moe_combine`), the form the stored H200 measurements timed;
//! - `moe_layer_norm/FORMAT/tokens_T` (decode: 1 and 32 tokens): `moe::moe_layer_add_rms_norm`, what the engine's
//!   decode step runs on one GPU: the combine, the residual add and the next RMSNorm in the down projection's row
//!   finisher (two launches), and `moe_layer_norm_shared/FORMAT/tokens_1` the same with the model's shared expert
//!   riding in the two launches' dense tail, the engine's whole MoE layer at batch 1 (router apart);
//! - `grouped_gemm/FORMAT/rows_R` (R = 16,384 and 65,536 routed rows: 4,096 and 16,384 tokens): the two grouped GEMMs
//!   alone (`moe::routed_experts`), issue 17's compute-bound sizes, and for the fp8 formats
//!   `grouped_gemm_fp8_act/FORMAT/rows_R`, the same on the fp8 tensor cores (`PrefillGemm::WgmmaFp8Act`).
//!
//! Reports GB/s over the ideal bytes (weights of the touched experts once + activations) against the device's HBM
//! bandwidth, and TFLOP/s against its dense bf16 rate (`device::Ceilings`). Without a GPU it prints that it skips and
//! measures nothing. Run: `cargo bench --bench moe`.

mod common;
// The tests' device alignment (only `DeviceAlignment` is used here).
#[allow(dead_code)]
#[path = "../tests/common/routing.rs"]
mod routing;

use std::sync::Arc;
use std::time::Duration;

use common::time_calls;
use criterion::{criterion_group, criterion_main, Criterion};
use half::bf16;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use routing::DeviceAlignment;
use small4::device::{Ceilings, Device, DeviceBuffer};
use small4::kernels::gemm::RowCounters;
use small4::kernels::moe::{self, Grouping, MoeLayerWeights, MoeWorkspace, RoutingBuffers};
use small4::kernels::moe_wgmma::PrefillGemm;
use small4::kernels::moe_wgmma_fp8::Fp8ActScratch;
use small4::kernels::norm::ResidualNorm;
use small4::kernels::Matrix;
use small4::quant::matrix::QuantizedMatrix;
use small4::quant::repack::{self, PackedWeights};
use small4::quant::WeightFormat;
use small4::reference::moe::align_pairs;

const DIM: usize = 4096;
const HIDDEN: usize = 2048;
const EXPERTS: usize = 128;
const TOP_K: usize = 4;

/// The same expert's packed weights `experts` times (the values do not change the speed; packing 128 experts
/// separately would take minutes of CPU).
fn replicate(p: &PackedWeights, experts: usize) -> PackedWeights {
    let rep = |v: &Option<Vec<f32>>| v.as_ref().map(|v| v.repeat(experts));
    PackedWeights {
        experts,
        data: p.data.repeat(experts),
        row_scales: rep(&p.row_scales),
        block_scales: rep(&p.block_scales),
        group_scales: p.group_scales.as_ref().map(|v| v.repeat(experts)),
        group_zeros: p.group_zeros.as_ref().map(|v| v.repeat(experts)),
        fp4_scales: p.fp4_scales.as_ref().map(|v| v.repeat(experts)),
        ..p.clone()
    }
}

/// The layer's routed experts, and the same with a shared expert packed like one of them (the engine's layers).
fn layer_weights(device: &Device, format: WeightFormat, rng: &mut StdRng) -> (MoeLayerWeights, MoeLayerWeights) {
    let mut matrix = |rows: usize, cols: usize| {
        let a = 1.0 / (cols as f32).sqrt();
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-a..a)).collect();
        QuantizedMatrix::quantize(format, &w, rows, cols).unwrap()
    };
    let (w1, w3, w2) = (matrix(HIDDEN, DIM), matrix(HIDDEN, DIM), matrix(DIM, HIDDEN));
    let gate_up = repack::repack_gate_up(&[((&w1).into(), (&w3).into())]).unwrap();
    let down = repack::repack_linear(&[(&w2).into()]).unwrap();
    let (routed_up, routed_down) = (replicate(&gate_up, EXPERTS), replicate(&down, EXPERTS));
    let routed = MoeLayerWeights::upload(device, &routed_up, &routed_down, None).unwrap();
    let with_shared = MoeLayerWeights::upload(device, &routed_up, &routed_down, Some((&gate_up, &down))).unwrap();
    (routed, with_shared)
}

/// What one timed form moves and computes, for its summary line.
struct Ideal {
    bytes: usize,
    flops: f64,
    touched: usize,
}

fn report(name: &str, mean: Duration, ideal: &Ideal, ceilings: &Ceilings) {
    let seconds = mean.as_secs_f64();
    println!(
        "{name}: {:.1} us, {:.0} GB/s ({:.0}% of {}) over {} touched experts, {:.1} TFLOP/s ({:.1}% of peak)",
        seconds * 1e6,
        ideal.bytes as f64 / seconds / 1e9,
        100.0 * ideal.bytes as f64 / seconds / ceilings.hbm_bytes_per_s,
        ceilings.label,
        ideal.touched,
        ideal.flops / seconds / 1e12,
        100.0 * ideal.flops / seconds / ceilings.dense_bf16_flops
    );
}

/// One batch of `tokens` tokens routed at random to TOP_K distinct experts each, weight 0.25, aligned on the host
/// (`reference::moe::align_pairs`) into the grouping the launches read, with random activations.
struct Batch {
    tokens: usize,
    touched: usize,
    capacity: usize,
    alignment: DeviceAlignment,
    topk_ids: DeviceBuffer<i32>,
    topk_weights: DeviceBuffer<f32>,
    x: DeviceBuffer<bf16>,
}

impl Batch {
    fn new(device: &Device, tokens: usize, rng: &mut StdRng) -> Batch {
        let mut ids = Vec::with_capacity(tokens * TOP_K);
        for _ in 0..tokens {
            let mut all: Vec<i32> = (0..EXPERTS as i32).collect();
            all.shuffle(rng);
            ids.extend_from_slice(&all[..TOP_K]);
        }
        let tile_m = moe::moe_tile_m(tokens, TOP_K, EXPERTS);
        let identity: Vec<i32> = (0..EXPERTS as i32).collect();
        let alignment = align_pairs(&ids, Some(&identity), EXPERTS, tile_m);
        let x: Vec<bf16> = (0..tokens * DIM).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
        Batch {
            tokens,
            touched: alignment.expert_counts.iter().filter(|&&c| c > 0).count(),
            capacity: alignment.sorted_pairs.len(),
            alignment: DeviceAlignment::upload(device, &alignment, tile_m),
            topk_ids: DeviceBuffer::from_slice(device, &ids).unwrap(),
            topk_weights: DeviceBuffer::from_slice(device, &vec![0.25f32; tokens * TOP_K]).unwrap(),
            x: DeviceBuffer::from_slice(device, &x).unwrap(),
        }
    }

    fn grouping(&self) -> Grouping<'_> {
        self.alignment.grouping()
    }

    fn routing(&self) -> RoutingBuffers<'_> {
        RoutingBuffers {
            topk_ids: self.topk_ids.view([self.tokens, TOP_K]).unwrap(),
            topk_weights: self.topk_weights.view([self.tokens, TOP_K]).unwrap(),
            expert_map: None,
            experts: EXPERTS,
        }
    }

    fn x(&self) -> Matrix<'_, bf16> {
        self.x.view([self.tokens, DIM]).unwrap()
    }

    /// The routed experts' ideal traffic and work: the touched experts' weights once, the input read, the SwiGLU
    /// activations written and read (bf16), the pairs' f32 rows written and read (by the combine), and the two GEMMs'
    /// FLOPs.
    fn routed_ideal(&self, expert_bytes: usize) -> Ideal {
        let pairs = self.tokens * TOP_K;
        Ideal {
            bytes: self.touched * expert_bytes + self.tokens * DIM * 2 * 2 + pairs * HIDDEN * 2 * 2 + pairs * DIM * 4 * 2,
            flops: 2.0 * pairs as f64 * (DIM * 2 * HIDDEN + HIDDEN * DIM) as f64,
            touched: self.touched,
        }
    }
}

fn bench_format(c: &mut Criterion, device: &Device, format: WeightFormat) {
    let ceilings = Ceilings::for_device_name(&device.device_name());
    let mut rng = StdRng::seed_from_u64(1);
    let (weights, weights_shared) = layer_weights(device, format, &mut rng);
    let expert_bytes = weights.gate_up.bytes_per_expert + weights.down.bytes_per_expert;
    for tokens in [1usize, 32, 2048] {
        let batch = Batch::new(device, tokens, &mut rng);
        let (grouping, routing, x) = (batch.grouping(), batch.routing(), batch.x());
        let workspace = MoeWorkspace::new(device, &weights, tokens, TOP_K, batch.capacity).unwrap();
        let out = DeviceBuffer::<bf16>::alloc(device, tokens * DIM).unwrap();
        let routed = batch.routed_ideal(expert_bytes);
        let name = format!("moe_layer/{format}/tokens_{tokens}");
        let mean = time_calls(c, device, &name, || moe::moe_layer(&weights, x, &routing, &grouping, &workspace, out.view([tokens, DIM]).unwrap()).unwrap());
        report(&name, mean, &routed, &ceilings);
        if tokens > 32 {
            continue;
        }

        // The engine's decode form: the combine, the residual add and the next norm in the down projection's row
        // finisher. Against the three-launch form it reads the residual and the norm weight and writes two rows
        // (residual out, normed) instead of one.
        let residual_host: Vec<bf16> = (0..tokens * DIM).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
        let norm_weight: Vec<bf16> = (0..DIM).map(|_| bf16::from_f32(rng.random_range(0.5f32..1.5))).collect();
        let residual = DeviceBuffer::from_slice(device, &residual_host).unwrap();
        let norm_weight = DeviceBuffer::from_slice(device, &norm_weight).unwrap();
        let residual_out = DeviceBuffer::<bf16>::alloc(device, tokens * DIM).unwrap();
        let counters = RowCounters::new(device, tokens).unwrap();
        let norm = ResidualNorm {
            residual: residual.view([tokens, DIM]).unwrap(),
            weight: norm_weight.as_vector(),
            residual_out: residual_out.view([tokens, DIM]).unwrap(),
            out: out.view([tokens, DIM]).unwrap(),
            eps: 1e-5,
        };
        let norm_rows_bytes = tokens * DIM * 2 * 2 + DIM * 2;
        let mut forms = vec![("moe_layer_norm", &weights, Ideal { bytes: routed.bytes + norm_rows_bytes, ..routed })];
        if tokens == 1 {
            // The shared expert: its weights once, its activation and f32 output row written and read once.
            let shared_bytes = expert_bytes + tokens * HIDDEN * 2 * 2 + tokens * DIM * 4 * 2;
            let shared_flops = 2.0 * tokens as f64 * (DIM * 2 * HIDDEN + HIDDEN * DIM) as f64;
            let ideal = Ideal { bytes: routed.bytes + norm_rows_bytes + shared_bytes, flops: routed.flops + shared_flops, touched: batch.touched + 1 };
            forms.push(("moe_layer_norm_shared", &weights_shared, ideal));
        }
        for (form, layer, ideal) in forms {
            let workspace = MoeWorkspace::new(device, layer, tokens, TOP_K, batch.capacity).unwrap();
            let name = format!("{form}/{format}/tokens_{tokens}");
            let mean = time_calls(c, device, &name, || moe::moe_layer_add_rms_norm(layer, x, &routing, &grouping, &workspace, &norm, &counters).unwrap());
            report(&name, mean, &ideal, &ceilings);
        }
    }
    bench_grouped_gemms(c, device, format, &weights, &mut rng, &ceilings);
}

/// Issue 17's grouped-GEMM sizes: 16k and 64k routed rows (4,096 and 16,384 tokens x top-4), the prefill tile's
/// compute-bound regime, where the targets are TFLOP/s (800 bf16, 1,400 fp8, 650 W4A16 on an H100 SXM).
const PREFILL_GEMM_TOKENS: [usize; 2] = [4096, 16384];

/// The routed experts' two grouped GEMMs alone (`moe::routed_experts`: up + SwiGLU, then down x routing weight into
/// the pairs' f32 rows; no combine) at [`PREFILL_GEMM_TOKENS`], as `grouped_gemm/FORMAT/rows_R` (R routed rows), with
/// the prefill kernels the engine picks by default; for the fp8 formats also `grouped_gemm_fp8_act/FORMAT/rows_R`, the
/// fp8 tensor-core kernels with the activations quantised to e4m3 on the fly ([`PrefillGemm::WgmmaFp8Act`]; the
/// quantisation launches included). Their TFLOP/s line's "% of peak" is of the dense bf16 rate.
fn bench_grouped_gemms(c: &mut Criterion, device: &Device, format: WeightFormat, weights: &MoeLayerWeights, rng: &mut StdRng, ceilings: &Ceilings) {
    let expert_bytes = weights.gate_up.bytes_per_expert + weights.down.bytes_per_expert;
    let mut forms = vec![("grouped_gemm", PrefillGemm::Wgmma)];
    if matches!(format, WeightFormat::Fp8PerTensor | WeightFormat::Fp8Block128) {
        forms.push(("grouped_gemm_fp8_act", PrefillGemm::WgmmaFp8Act));
    }
    for tokens in PREFILL_GEMM_TOKENS {
        let batch = Batch::new(device, tokens, rng);
        let (grouping, x) = (batch.grouping(), batch.x());
        let topk_weights = batch.topk_weights.view([tokens, TOP_K]).unwrap();
        // One scratch for the fp8 activations, reserved by the first call and reused (no allocation in the timing).
        let workspace =
            MoeWorkspace { fp8_act: Some(Arc::new(Fp8ActScratch::new(device))), ..MoeWorkspace::new(device, weights, tokens, TOP_K, batch.capacity).unwrap() };
        let ideal = batch.routed_ideal(expert_bytes);
        for (form, gemm) in &forms {
            let name = format!("{form}/{format}/rows_{}", tokens * TOP_K);
            let mean = time_calls(c, device, &name, || gemm.run(|| moe::routed_experts(weights, x, &grouping, topk_weights, &workspace)).unwrap());
            report(&name, mean, &ideal, ceilings);
        }
    }
}

fn moe_benches(c: &mut Criterion) {
    let Some(device) = small4::device::gpu_or_skip("benches/moe.rs") else { return };
    for format in WeightFormat::ALL {
        bench_format(c, &device, format);
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3));
    targets = moe_benches
}
criterion_main!(benches);
