//! Grouped expert GEMMs, the dense GEMM and a whole MoE layer against the CPU reference (`moe_block`, `matmul_nt`)
//! on the DEQUANTISED weights and bf16-rounded inputs, for every weight format, on the interpreter and the GPU.

mod common;

use common::*;
use half::bf16;
use proptest::prelude::*;
use rand::{rngs::StdRng, seq::SliceRandom, Rng};
use small4::device::{Device, DeviceBuffer};
use small4::kernels::dense;
use small4::kernels::gemm::{self, DeviceWeights, E4m3Rows, RowCounters};
use small4::kernels::moe::{self, Fp8ActScales, Grouping, MoeLayerWeights, MoeWorkspace, RoutingBuffers};
use small4::kernels::norm::{self, MoePairs, ResidualNorm};
use small4::kernels::Matrix;
use small4::quant::fp8::f32_to_e4m3;
use small4::quant::matrix::QuantizedMatrix;
use small4::quant::repack::{self, MatrixRef};
use small4::quant::WeightFormat;
use small4::reference::linear::matmul_nt;
use small4::reference::moe::{align_pairs, moe_block, moe_block_w8a8, quantize_act_e4m3, ExpertWeights, Routing};

const FORMATS: [WeightFormat; 6] = WeightFormat::ALL;

/// Random weights in [-a, a] with a = 1 / sqrt(cols) (unit-scale outputs), quantised; returns the matrix and its
/// values as the GEMM kernels multiply them (what the reference multiplies by: `dequantize_for_gemm`).
fn random_matrix(rng: &mut StdRng, format: WeightFormat, rows: usize, cols: usize) -> (QuantizedMatrix, Vec<f32>) {
    let a = 1.0 / (cols as f32).sqrt();
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-a..a)).collect();
    let q = QuantizedMatrix::quantize(format, &w, rows, cols).unwrap();
    let deq = q.dequantize_for_gemm();
    (q, deq)
}

struct Expert {
    w1: QuantizedMatrix,
    w3: QuantizedMatrix,
    w2: QuantizedMatrix,
    reference: ExpertWeights,
}

fn random_expert(rng: &mut StdRng, format: WeightFormat, dim: usize, hidden: usize) -> Expert {
    let (w1, d1) = random_matrix(rng, format, hidden, dim);
    let (w3, d3) = random_matrix(rng, format, hidden, dim);
    let (w2, d2) = random_matrix(rng, format, dim, hidden);
    Expert { w1, w3, w2, reference: ExpertWeights { w1: d1, w3: d3, w2: d2 } }
}

fn pack_layer(device: &Device, local: &[&Expert], shared: Option<&Expert>) -> MoeLayerWeights {
    let gate_up: Vec<(MatrixRef, MatrixRef)> = local.iter().map(|e| ((&e.w1).into(), (&e.w3).into())).collect();
    let down: Vec<MatrixRef> = local.iter().map(|e| (&e.w2).into()).collect();
    let gate_up = repack::repack_gate_up(&gate_up).unwrap();
    let down = repack::repack_linear(&down).unwrap();
    let shared = shared.map(|s| (repack::repack_gate_up(&[((&s.w1).into(), (&s.w3).into())]).unwrap(), repack::repack_linear(&[(&s.w2).into()]).unwrap()));
    MoeLayerWeights::upload(device, &gate_up, &down, shared.as_ref().map(|(a, b)| (a, b))).unwrap()
}

/// How tokens pick experts in a case.
#[derive(Clone, Copy, Debug)]
enum Pick {
    /// k distinct experts uniformly among all.
    Uniform,
    /// Every token's first choice is expert 0 and the rest among experts 1..=k-1 (all tokens on one expert, and
    /// the remaining experts idle).
    Concentrated,
}

#[derive(Clone, Debug)]
struct Case {
    tokens: usize,
    dim: usize,
    hidden: usize,
    experts: usize,
    k: usize,
    format: WeightFormat,
    shared: bool,
    /// Global experts owned by another GPU (expert_map -1).
    remote: usize,
    pick: Pick,
    seed: u64,
    /// W8A8 routed experts with these activation scales (per-tensor fp8 weights).
    w8a8: Option<Fp8ActScales>,
    /// Every fifth pair (p % 5 == 2) gets expert id -1 (no expert: skipped everywhere).
    unrouted_pairs: bool,
}

fn random_routing(rng: &mut StdRng, case: &Case) -> Routing {
    let mut ids = Vec::with_capacity(case.tokens * case.k);
    let mut weights = Vec::with_capacity(case.tokens * case.k);
    for _ in 0..case.tokens {
        let chosen: Vec<usize> = match case.pick {
            Pick::Uniform => {
                let mut all: Vec<usize> = (0..case.experts).collect();
                all.shuffle(rng);
                all.truncate(case.k);
                all
            }
            Pick::Concentrated => (0..case.k).collect(),
        };
        let raw: Vec<f32> = (0..case.k).map(|_| rng.random_range(0.1f32..1.0)).collect();
        let sum: f32 = raw.iter().sum();
        for (e, w) in chosen.into_iter().zip(raw) {
            ids.push(e as i32);
            weights.push(w / sum);
        }
    }
    Routing { k: case.k, ids, weights }
}

/// Runs one MoE layer on the device (poisoned output and workspaces) and returns (output bits, reference).
fn run_moe_case(device: &Device, case: &Case) -> (Vec<u16>, Vec<f32>) {
    let mut rng = rng(case.seed);
    let (dim, hidden, tokens, k) = (case.dim, case.hidden, case.tokens, case.k);
    let x = random_bf16(&mut rng, tokens * dim, 1.0);
    let experts: Vec<Expert> = (0..case.experts).map(|_| random_expert(&mut rng, case.format, dim, hidden)).collect();
    let shared = case.shared.then(|| random_expert(&mut rng, case.format, dim, hidden));
    let mut routing = random_routing(&mut rng, case);
    if case.unrouted_pairs {
        routing.ids.iter_mut().skip(2).step_by(5).for_each(|id| *id = -1);
    }

    // The last `remote` global experts live on another GPU.
    let local_count = case.experts - case.remote;
    let expert_map: Vec<i32> = (0..case.experts).map(|e| if e < local_count { e as i32 } else { -1 }).collect();
    let local: Vec<&Expert> = experts[..local_count].iter().collect();
    let tile_m = moe::moe_tile_m(tokens, k, local_count);
    let alignment = align_pairs(&routing.ids, Some(&expert_map), local_count, tile_m);

    let mut weights = pack_layer(device, &local, shared.as_ref());
    weights.set_fp8_activations(case.w8a8).unwrap();
    let capacity = alignment.sorted_pairs.len();
    let workspace = MoeWorkspace::new(device, &weights, tokens, k, capacity).unwrap();
    let up = |v: &[i32]| DeviceBuffer::from_slice(device, v).unwrap();
    let (sorted_pairs, tile_experts, expert_offsets) = (up(&alignment.sorted_pairs), up(&alignment.tile_experts), up(&alignment.expert_offsets));
    let num_padded = up(&[alignment.num_padded]);
    let grouping = Grouping { sorted_pairs: &sorted_pairs, tile_experts: &tile_experts, expert_offsets: &expert_offsets, num_padded: &num_padded, tile_m };
    let topk_ids = up(&routing.ids);
    let topk_weights = DeviceBuffer::from_slice(device, &routing.weights).unwrap();
    let map = up(&expert_map);
    let routing_dev = RoutingBuffers {
        topk_ids: topk_ids.view([tokens, k]).unwrap(),
        topk_weights: topk_weights.view([tokens, k]).unwrap(),
        expert_map: Some(map.as_vector()),
        experts: case.experts,
    };
    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let out = DeviceBuffer::<bf16>::filled_with_byte(device, tokens * dim, 0xff).unwrap();
    for b in [&workspace.act, &workspace.shared_act] {
        device.memset(b.addr(), 0xff, b.bytes()).unwrap();
    }
    for b in [&workspace.pair_out, &workspace.shared_out] {
        device.memset(b.addr(), 0xff, b.bytes()).unwrap();
    }
    // e4m3 0xff is NaN: a padding row read as data would show.
    for b in workspace.e4m3.iter().flat_map(|(x, act)| [x, act]) {
        device.memset(b.addr(), 0xff, b.bytes()).unwrap();
    }
    moe::moe_layer(&weights, x_dev.view([tokens, dim]).unwrap(), &routing_dev, &grouping, &workspace, out.view([tokens, dim]).unwrap()).unwrap();
    let got = out.to_vec().unwrap();

    let reference_experts: Vec<Option<ExpertWeights>> = experts.iter().enumerate().map(|(e, ex)| (e < local_count).then(|| ex.reference.clone())).collect();
    let shared_reference = shared.as_ref().map(|s| &s.reference);
    let want = match case.w8a8 {
        Some(s) => moe_block_w8a8(&to_f32(&x), &routing, &reference_experts, shared_reference, tokens, dim, hidden, (s.up, s.down)),
        None => moe_block(&to_f32(&x), &routing, &reference_experts, shared_reference, tokens, dim, hidden),
    };
    (got.iter().map(|v| v.to_bits()).collect(), want)
}

fn check_moe_case(device: &Device, case: &Case) -> Vec<u16> {
    let (bits, want) = run_moe_case(device, case);
    let got: Vec<f32> = bits.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
    assert_agrees(&format!("{case:?}"), &got, &want);
    bits
}

fn small_case(tokens: usize, k: usize, experts: usize, format: WeightFormat) -> Case {
    Case { tokens, dim: 256, hidden: 128, experts, k, format, shared: true, remote: 0, pick: Pick::Uniform, seed: 1, w8a8: None, unrouted_pairs: false }
}

/// Random decode-sized batches: tokens 1 / 17 / 33, k 1 / 4 / 8, 8 or 16 experts, some on another GPU, with and
/// without the shared expert (bf16 weights; the formats have their own test).
fn moe_layer_matches_reference(device: &Device) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 6, ..ProptestConfig::default() });
    let cases = (
        prop_oneof![Just(1usize), Just(17), Just(33)],
        prop_oneof![Just(1usize), Just(4), Just(8)],
        prop_oneof![Just(8usize), Just(16)],
        any::<bool>(),
        0usize..3,
        any::<u64>(),
    );
    runner
        .run(&cases, |(tokens, k, experts, shared, remote, seed)| {
            let case = Case { shared, remote, seed, ..small_case(tokens, k, experts, WeightFormat::Bf16) };
            check_moe_case(device, &case);
            Ok(())
        })
        .unwrap();
}

/// Every weight format through the whole layer (17 tokens, top-4 of 8, shared expert, one remote expert).
fn moe_layer_every_format(device: &Device) {
    for format in FORMATS {
        check_moe_case(device, &Case { remote: 1, seed: 2, ..small_case(17, 4, 8, format) });
    }
}

/// 222 tokens: the prefill tile (tile_m 64) and its tiled kernel, with 8 experts.
fn moe_layer_prefill_tiles(device: &Device) {
    let case = Case { seed: 3, ..small_case(222, 4, 8, WeightFormat::Nvfp4) };
    assert_eq!(moe::moe_tile_m(222, 4, 8), 64);
    check_moe_case(device, &case);
}

/// All tokens on expert 0, experts k.. get nothing; and 128 / 160 experts with tiny dims.
fn moe_layer_skewed_and_many_experts(device: &Device) {
    check_moe_case(device, &Case { pick: Pick::Concentrated, seed: 4, ..small_case(33, 4, 16, WeightFormat::Int4 { group: 128, zero_point: true }) });
    for experts in [128, 160] {
        let case = Case { dim: 64, hidden: 64, remote: 7, seed: 5, ..small_case(9, 8, experts, WeightFormat::Bf16) };
        check_moe_case(device, &case);
    }
}

/// The whole layer as the engine runs it: the router kernel (softmax + top-k + alignment on the device, with two
/// experts owned by another GPU), then the expert GEMMs and the combine from the router's own buffers. The reference
/// uses the device's routing choice (read back), so near-ties between CPU and GPU softmax cannot make it flaky.
fn router_then_moe_layer_matches_reference(device: &Device) {
    use small4::kernels::router::{route_and_align, ExpertMap, RouterConfig};
    let (tokens, dim, hidden, experts, k) = (17, 256, 128, 8, 4);
    let format = WeightFormat::Int4 { group: 128, zero_point: false };
    let mut rng = rng(9);
    let x = random_bf16(&mut rng, tokens * dim, 1.0);
    let gate = random_bf16(&mut rng, experts * dim, 0.2);
    let all: Vec<Expert> = (0..experts).map(|_| random_expert(&mut rng, format, dim, hidden)).collect();
    let shared = random_expert(&mut rng, format, dim, hidden);
    let map: Vec<i32> = vec![0, 1, -1, 2, 3, -1, 4, 5];
    let local: Vec<&Expert> = map.iter().zip(&all).filter(|(m, _)| **m >= 0).map(|(_, e)| e).collect();

    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let gate_dev = DeviceBuffer::from_slice(device, &gate).unwrap();
    let expert_map = ExpertMap::new(device, &map).unwrap();
    let tile_m = moe::moe_tile_m(tokens, k, local.len());
    let routing = route_and_align(
        x_dev.view([tokens, dim]).unwrap(),
        gate_dev.view([experts, dim]).unwrap(),
        &expert_map,
        &RouterConfig { k, routed_scale: 1.0, tile_m },
    )
    .unwrap();
    let grouping = Grouping::from(&routing.alignment);
    let weights = pack_layer(device, &local, Some(&shared));
    let workspace = MoeWorkspace::new(device, &weights, tokens, k, routing.alignment.sorted_pairs.len()).unwrap();
    let routing_dev = RoutingBuffers {
        topk_ids: routing.topk_ids.view([tokens, k]).unwrap(),
        topk_weights: routing.topk_weights.view([tokens, k]).unwrap(),
        expert_map: Some(expert_map.buffer().as_vector()),
        experts,
    };
    let out = DeviceBuffer::<bf16>::filled_with_byte(device, tokens * dim, 0xff).unwrap();
    moe::moe_layer(&weights, x_dev.view([tokens, dim]).unwrap(), &routing_dev, &grouping, &workspace, out.view([tokens, dim]).unwrap()).unwrap();

    let chosen = Routing { k, ids: routing.topk_ids.to_vec().unwrap(), weights: routing.topk_weights.to_vec().unwrap() };
    let reference_experts: Vec<Option<ExpertWeights>> = all.iter().zip(&map).map(|(e, &m)| (m >= 0).then(|| e.reference.clone())).collect();
    let want = moe_block(&to_f32(&x), &chosen, &reference_experts, Some(&shared.reference), tokens, dim, hidden);
    assert_agrees("router + moe layer", &to_f32(&out.to_vec().unwrap()), &want);
}

fn moe_layer_is_deterministic(device: &Device) {
    let case = Case { seed: 6, ..small_case(33, 8, 8, WeightFormat::Fp8PerTensor) };
    assert_eq!(check_moe_case(device, &case), check_moe_case(device, &case));
}

/// Dense `y = x W^T` through the same kernels (one group): decode rows (small tile) and prefill rows (tiled), an
/// output width that is not a multiple of the block (320, like wkv_a).
fn linear_matches_reference(device: &Device) {
    let (in_dim, out_dim) = (256, 320);
    let mut rng = rng(7);
    for (format, rows) in
        [(WeightFormat::Bf16, 1), (WeightFormat::Bf16, 17), (WeightFormat::Bf16, 70), (WeightFormat::Fp8PerTensor, 33), (WeightFormat::Nvfp4, 5)]
    {
        let (w, deq) = random_matrix(&mut rng, format, out_dim, in_dim);
        let packed = repack::repack_linear(&[(&w).into()]).unwrap();
        let weights = DeviceWeights::upload(device, &packed).unwrap();
        let x = random_bf16(&mut rng, rows * in_dim, 1.0);
        let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
        let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * out_dim, 0xff).unwrap();
        dense::linear(&weights, x_dev.view([rows, in_dim]).unwrap(), y.view([rows, out_dim]).unwrap()).unwrap();
        let want = matmul_nt(&to_f32(&x), &deq, rows, in_dim, out_dim);
        assert_agrees(&format!("linear {format} rows {rows}"), &to_f32(&y.to_vec().unwrap()), &want);
    }
}

/// The k splits of the dense decode launches (`DeviceWeights::set_decode_k_splits`: grid z = the split, the last
/// block of each output tile adding the splits' f32 partials in split order, cuda/moe_gemm.cu `sum_k_splits`) against
/// the CPU reference, with the tolerance of every GEMM check here (`assert_agrees`; the split only reorders the f32
/// additions: a few ulps of f32, far inside it). At the real reduction lengths (K = 2048 and 4096: the unsplit and
/// 2-split launches wrap the cp.async ring; 6 splits of 32 or 64 k blocks are uneven), 1 and 3 decode rows, the
/// formats the attention projections come in, an output (320 of 384 padded rows) with a partial last block. Each
/// launch runs twice into fresh outputs on the same split counters: the second finds them zero (its last block is
/// found again) and gives the same bits (the sum does not depend on which split arrives last).
fn linear_split_k_matches_reference(device: &Device) {
    let out_dim = 320;
    let mut rng = rng(70);
    for in_dim in [2048, 4096] {
        for format in [WeightFormat::Bf16, WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128] {
            let (w, deq) = random_matrix(&mut rng, format, out_dim, in_dim);
            let mut weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
            // The default for 6 column blocks: as many splits as ranges of 8 k blocks allow (44 would give 264 blocks).
            assert_eq!(weights.decode_k_splits(), in_dim / 64 / 8);
            for splits in [1, 2, 6] {
                weights.set_decode_k_splits(splits).unwrap();
                for rows in [1, 3] {
                    let x = random_bf16(&mut rng, rows * in_dim, 1.0);
                    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
                    let want = matmul_nt(&to_f32(&x), &deq, rows, in_dim, out_dim);
                    let what = format!("linear {format} K {in_dim} rows {rows} splits {splits}");
                    let launch = || {
                        let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * out_dim, 0xff).unwrap();
                        dense::linear(&weights, x_dev.view([rows, in_dim]).unwrap(), y.view([rows, out_dim]).unwrap()).unwrap();
                        if let Some(counters) = device.last_launch_counters() {
                            // Unsplit, the 320 outputs run the decode kernel's 2-warp blocks (BM 32): 12 of them.
                            let blocks = if splits == 1 { 12 } else { 6 * splits as u64 };
                            assert_eq!(counters.blocks, blocks, "{what}: blocks");
                        }
                        y
                    };
                    let first = launch();
                    assert_agrees(&what, &to_f32(&first.to_vec().unwrap()), &want);
                    assert_eq!(bits(&launch()), bits(&first), "{what}: second launch");
                }
            }
        }
    }
}

/// The real model's reduction lengths (K = 2048: the experts' down projection; K = 4096: dim, their up projection),
/// where the K loop runs 32 and 64 stages through the cp.async pipeline ring and wraps it many times, for every weight
/// format and both row paths of the launcher (1 decode row: the narrow tile; 70 rows: the prefill tile).
fn linear_at_real_reduction_lengths(device: &Device) {
    let out_dim = 128;
    let mut rng = rng(10);
    for in_dim in [2048, 4096] {
        for format in FORMATS {
            let (w, deq) = random_matrix(&mut rng, format, out_dim, in_dim);
            let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
            for rows in [1, 70] {
                let x = random_bf16(&mut rng, rows * in_dim, 1.0);
                let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
                let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * out_dim, 0xff).unwrap();
                dense::linear(&weights, x_dev.view([rows, in_dim]).unwrap(), y.view([rows, out_dim]).unwrap()).unwrap();
                let want = matmul_nt(&to_f32(&x), &deq, rows, in_dim, out_dim);
                assert_agrees(&format!("linear {format} K {in_dim} rows {rows}"), &to_f32(&y.to_vec().unwrap()), &want);
            }
        }
    }
}

/// The grouped expert GEMMs at the model's real sizes (up + SwiGLU at K = dim 4096, down at K = hidden 2048) for
/// every format, and in W8A8: one expert holding both tokens' pairs (the weights of more experts would only repeat
/// the same K loop at interpreter cost).
fn moe_layer_at_real_reduction_lengths(device: &Device) {
    for format in FORMATS {
        let case = Case { dim: 4096, hidden: 2048, shared: false, remote: 0, seed: 13, ..small_case(2, 1, 1, format) };
        check_moe_case(device, &case);
    }
    check_moe_case(device, &Case { dim: 4096, hidden: 2048, experts: 1, k: 1, remote: 0, shared: false, unrouted_pairs: false, ..w8a8_case(2, 1) });
}

/// The decode kernel (`moe_gemm_*_decode`, src/kernels/moe.rs `TileShape::Decode`: up to 8 tokens, weights straight
/// from global memory into registers, one 8-slot pair fragment) gives the narrow tile's outputs bit for bit (the same
/// mma k order) and agrees with the CPU reference, for every format: 1, 3 and 8 tokens, top-4 of 8 experts (one on
/// another GPU), the shared expert riding in the routed launches (the dense tail), unrouted pairs at 3 tokens. K 640
/// for up + SwiGLU (10 k blocks: whole rounds of the register ring and a remainder in every format) and 384 for down
/// (6: fewer than the 4-bit ring's 8, the remainder only). The real sizes: [`moe_layer_at_real_reduction_lengths`]
/// (which runs the decode kernel: 2 tokens) and `decode_kernel_at_real_sizes` (4 experts, ignored: minutes).
fn decode_kernel_equals_narrow_tile(device: &Device) {
    for format in FORMATS {
        for (tokens, unrouted_pairs) in [(1, false), (3, true), (8, false)] {
            let case = Case { dim: 640, hidden: 384, remote: 1, unrouted_pairs, seed: 21 + tokens as u64, ..small_case(tokens, 4, 8, format) };
            gemm::override_decode_tile(Some("decode")).unwrap();
            let decode = check_moe_case(device, &case);
            gemm::override_decode_tile(Some("narrow")).unwrap();
            let narrow = run_moe_case(device, &case).0;
            gemm::override_decode_tile(None).unwrap();
            assert_eq!(decode, narrow, "{case:?}");
        }
    }
}

/// Runs `launch` on the decode kernel and on the narrow tile (`override_decode_tile`) and returns the decode kernel's
/// output bits, requiring the narrow tile's to be the same bit for bit and the decode launch to have run a
/// `_decode`, `_decode_w2` or `_decode_split` entry (`what` names the case). The launches' own outputs are fresh each
/// call.
fn decode_equals_narrow<T: PartialEq + std::fmt::Debug>(device: &Device, what: &str, launch: impl Fn() -> T) -> T {
    gemm::override_decode_tile(Some("decode")).unwrap();
    let decode = launch();
    if let Some(counters) = device.last_launch_counters() {
        assert!(["_decode", "_decode_w2", "_decode_split"].iter().any(|e| counters.kernel.ends_with(e)), "{what}: launched {}", counters.kernel);
    }
    gemm::override_decode_tile(Some("narrow")).unwrap();
    let narrow = launch();
    gemm::override_decode_tile(None).unwrap();
    assert_eq!(decode, narrow, "{what}: the decode kernel against the narrow tile");
    decode
}

/// The dense decode launches (up to 8 rows) on the decode kernel (`moe_gemm_*_decode` in dense mode, src/kernels/moe.rs
/// `dense_tile_shape`; the launcher's default there) give the narrow tile's outputs bit for bit at the same k splits
/// (the same mma k order, split ranges and split-order partial sums) and agree with the CPU reference, in every output
/// form at the real shapes: plain `linear` for every format on the latent projection [1344, 4096] (its 8 default
/// splits) and on [320, 2048] at 3 and 8 rows unsplit and in 6 uneven splits; the f32 output (the head's logits);
/// `linear_rope_q` on wq_b [4096, 1024] (32 query heads of 64 nope + 64 rope, 2 splits); `linear_add_rms_norm` on wo
/// [4096, 4096] (4 splits, the finisher in each column block's last split block); `linear_per_head` (32 heads of W_UK
/// [256, 64] reading 128-wide query heads, unsplit: grid z = the heads).
fn dense_decode_kernel_equals_narrow_tile(device: &Device) {
    use small4::kernels::ops::{self, QueryScale};
    let mut rng = rng(72);
    let upload = |v: &[bf16]| DeviceBuffer::from_slice(device, v).unwrap();
    let poisoned = |len: usize| DeviceBuffer::<bf16>::filled_with_byte(device, len, 0xff).unwrap();
    // Plain and f32 outputs.
    for format in FORMATS {
        for (out_dim, in_dim, rows, splits) in [(1344, 4096, 1, None), (320, 2048, 3, Some(1)), (320, 2048, 8, Some(6))] {
            let (w, deq) = random_matrix(&mut rng, format, out_dim, in_dim);
            let mut weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
            if let Some(splits) = splits {
                weights.set_decode_k_splits(splits).unwrap();
            }
            let x_host = random_bf16(&mut rng, rows * in_dim, 1.0);
            let x = upload(&x_host);
            let what = format!("linear {format} [{out_dim}, {in_dim}] rows {rows} splits {}", weights.decode_k_splits());
            let y = decode_equals_narrow(device, &what, || {
                let y = poisoned(rows * out_dim);
                dense::linear(&weights, x.view([rows, in_dim]).unwrap(), y.view([rows, out_dim]).unwrap()).unwrap();
                bits(&y)
            });
            let want = matmul_nt(&to_f32(&x_host), &deq, rows, in_dim, out_dim);
            let y: Vec<f32> = y.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
            assert_agrees(&what, &y, &want);
            if rows == 3 {
                let logits = decode_equals_narrow(device, &format!("{what} f32"), || {
                    let y = DeviceBuffer::<f32>::filled_with_byte(device, rows * out_dim, 0xff).unwrap();
                    dense::linear_f32(&weights, x.view([rows, in_dim]).unwrap(), y.view([rows, out_dim]).unwrap(), None).unwrap();
                    y.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<u32>>()
                });
                let logits: Vec<f32> = logits.into_iter().map(f32::from_bits).collect();
                assert_agrees(&format!("{what} f32"), &logits, &want);
            }
        }
    }
    // The query projection with RoPE: wq_b.
    let (heads, head_dim, in_dim) = (32, 128, 1024);
    let scale = QueryScale { beta: 0.1, original_max_position: 8192 };
    let inv_freq = upload_f32(device, &(0..32).map(|i| 10_000f32.powf(-(i as f32) / 32.0)).collect::<Vec<f32>>());
    for (format, rows) in [(WeightFormat::Bf16, 1), (WeightFormat::Fp8PerTensor, 3)] {
        let (w, deq) = random_matrix(&mut rng, format, heads * head_dim, in_dim);
        let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        assert_eq!(weights.decode_k_splits(), 2);
        let x_host = random_bf16(&mut rng, rows * in_dim, 1.0);
        let x = upload(&x_host);
        let positions = DeviceBuffer::from_slice(device, &(0..rows).map(|_| rng.random_range(0..140_000)).collect::<Vec<i32>>()).unwrap();
        let what = format!("linear_rope_q {format} wq_b rows {rows}");
        let q = decode_equals_narrow(device, &what, || {
            let q = poisoned(rows * heads * head_dim);
            let qv = q.view([rows, heads, head_dim]).unwrap();
            dense::linear_rope_q(&weights, x.view([rows, in_dim]).unwrap(), qv, positions.as_vector(), inv_freq.as_vector(), scale, None).unwrap();
            bits(&q)
        });
        // Against the reference: the same RoPE on the reference product, both after one bf16 rounding.
        let product: Vec<bf16> = matmul_nt(&to_f32(&x_host), &deq, rows, in_dim, heads * head_dim).into_iter().map(bf16::from_f32).collect();
        let want = upload(&product);
        ops::rope_q_k(want.view([rows, heads, head_dim]).unwrap(), None, positions.as_vector(), inv_freq.as_vector(), scale).unwrap();
        let got: Vec<f32> = q.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        assert_agrees(&what, &got, &to_f32(&want.to_vec().unwrap()));
    }
    // wo with the residual add + RMSNorm finisher.
    for (format, rows) in [(WeightFormat::Bf16, 1), (WeightFormat::Fp8Block128, 2)] {
        let (out_dim, in_dim) = (4096, 4096);
        let (w, deq) = random_matrix(&mut rng, format, out_dim, in_dim);
        let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        assert_eq!(weights.decode_k_splits(), 4);
        let x_host = random_bf16(&mut rng, rows * in_dim, 1.0);
        let (x, residual) = (upload(&x_host), upload(&random_bf16(&mut rng, rows * out_dim, 1.0)));
        let gamma = upload(&random_bf16(&mut rng, out_dim, 1.0));
        let counters = RowCounters::new(device, rows).unwrap();
        let what = format!("linear_add_rms_norm {format} wo rows {rows}");
        let fused = decode_equals_narrow(device, &what, || wo_add_rms_norm_bits(&weights, &x, &residual, &gamma, &counters, true));
        assert_eq!(fused, wo_add_rms_norm_bits(&weights, &x, &residual, &gamma, &counters, false), "{what}: the launches apart");
        let y: Vec<f32> = fused.0.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
        assert_agrees(&what, &y, &matmul_nt(&to_f32(&x_host), &deq, rows, in_dim, out_dim));
    }
    // The per-head absorption products: W_UK.
    let (k_dim, head_in, out_cols) = (64, 128, 256);
    for (format, rows) in [(WeightFormat::Bf16, 1), (WeightFormat::Fp8PerTensor, 3)] {
        let mats: Vec<(QuantizedMatrix, Vec<f32>)> = (0..heads).map(|_| random_matrix(&mut rng, format, out_cols, k_dim)).collect();
        let packed = repack::repack_linear(&mats.iter().map(|(q, _)| q.into()).collect::<Vec<MatrixRef>>()).unwrap();
        let weights = DeviceWeights::upload(device, &packed).unwrap();
        let x_host = random_bf16(&mut rng, rows * heads * head_in, 1.0);
        let x = upload(&x_host);
        let what = format!("linear_per_head {format} W_UK rows {rows}");
        let y = decode_equals_narrow(device, &what, || {
            let y = poisoned(rows * heads * out_cols);
            dense::linear_per_head(&weights, x.view([rows, heads, head_in]).unwrap(), y.view([rows, heads, out_cols]).unwrap(), None).unwrap();
            bits(&y)
        });
        for (h, (_, deq)) in mats.iter().enumerate() {
            let x_h: Vec<f32> = (0..rows).flat_map(|r| to_f32(&x_host[(r * heads + h) * head_in..][..k_dim])).collect();
            let got: Vec<f32> = (0..rows).flat_map(|r| y[(r * heads + h) * out_cols..][..out_cols].iter().map(|&b| bf16::from_bits(b).to_f32())).collect();
            assert_agrees(&format!("{what} head {h}"), &got, &matmul_nt(&x_h, deq, rows, k_dim, out_cols));
        }
    }
}

fn upload_f32(device: &Device, v: &[f32]) -> DeviceBuffer<f32> {
    DeviceBuffer::from_slice(device, v).unwrap()
}

/// Decode rows above the decode kernel's 8 against an output wide enough (264 blocks of 128 features) that the
/// launcher picks the BM-128 "small" tile instead of the narrow one (src/kernels/moe.rs `TileShape::for_decode`; up
/// to 8 rows run the decode kernel whatever the width: `dense_decode_kernel_equals_narrow_tile`).
fn linear_wide_output_runs_the_small_tile(device: &Device) {
    let (in_dim, out_dim) = (64, 264 * 128);
    let mut rng = rng(9);
    for (format, rows) in [(WeightFormat::Bf16, 12), (WeightFormat::Nvfp4, 9)] {
        let (w, deq) = random_matrix(&mut rng, format, out_dim, in_dim);
        let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        let x = random_bf16(&mut rng, rows * in_dim, 1.0);
        let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
        let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * out_dim, 0xff).unwrap();
        dense::linear(&weights, x_dev.view([rows, in_dim]).unwrap(), y.view([rows, out_dim]).unwrap()).unwrap();
        if let Some(counters) = device.last_launch_counters() {
            assert!(counters.kernel.ends_with("_small"), "launched {}", counters.kernel);
        }
        let want = matmul_nt(&to_f32(&x), &deq, rows, in_dim, out_dim);
        assert_agrees(&format!("wide linear {format} rows {rows}"), &to_f32(&y.to_vec().unwrap()), &want);
    }
}

/// MLA's per-head products in one batched launch (`linear_per_head`) at the real geometry: 32 heads, W_UK reading
/// the 64 nope values of 128-wide query heads into 256 latents, W_UV reading 256 latents into 128 values; decode
/// (1 and 3 rows) and prefill (40 rows) tiles, every format the attention weights come in plus a 4-bit one. Each head
/// is checked against its own reference product, so a head reading its neighbour's columns or weights fails.
fn linear_per_head_matches_reference(device: &Device) {
    let heads = 32;
    let mut rng = rng(13);
    for (format, rows, (k_dim, head_in, out_cols)) in [
        (WeightFormat::Bf16, 1, (64, 128, 256)),
        (WeightFormat::Fp8PerTensor, 3, (64, 128, 256)),
        (WeightFormat::Bf16, 40, (256, 256, 128)),
        (WeightFormat::Fp8Block128, 1, (256, 256, 128)),
        (WeightFormat::Nvfp4, 3, (256, 256, 128)),
    ] {
        let mats: Vec<(QuantizedMatrix, Vec<f32>)> = (0..heads).map(|_| random_matrix(&mut rng, format, out_cols, k_dim)).collect();
        let packed = repack::repack_linear(&mats.iter().map(|(q, _)| q.into()).collect::<Vec<MatrixRef>>()).unwrap();
        let weights = DeviceWeights::upload(device, &packed).unwrap();
        let x = random_bf16(&mut rng, rows * heads * head_in, 1.0);
        let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
        let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * heads * out_cols, 0xff).unwrap();
        dense::linear_per_head(&weights, x_dev.view([rows, heads, head_in]).unwrap(), y.view([rows, heads, out_cols]).unwrap(), None).unwrap();
        let got = to_f32(&y.to_vec().unwrap());
        for (h, (_, deq)) in mats.iter().enumerate() {
            let x_h: Vec<f32> = (0..rows).flat_map(|r| to_f32(&x[(r * heads + h) * head_in..][..k_dim])).collect();
            let want = matmul_nt(&x_h, deq, rows, k_dim, out_cols);
            let got_h: Vec<f32> = (0..rows).flat_map(|r| got[(r * heads + h) * out_cols..][..out_cols].to_vec()).collect();
            assert_agrees(&format!("linear_per_head {format} rows {rows} head {h}"), &got_h, &want);
        }
    }
}

/// Two matrices stacked by rows (`repack_row_concat`: MLA's wq_a over wkv_a_with_mqa, 1024 + 320 rows at the real
/// size, here 128 + 320) give, in one GEMM, the columns of both products; FP8 per-tensor keeps each part's scale and
/// FP8 block-128 each part's block scales (also for 64-row pieces, as W_UV's).
fn row_concat_linear_matches_both_parts(device: &Device) {
    let in_dim = 256;
    let mut rng = rng(14);
    for (format, parts) in [
        (WeightFormat::Bf16, [128, 320]),
        (WeightFormat::Fp8PerTensor, [128, 320]),
        (WeightFormat::Fp8Block128, [64, 64]),
        (WeightFormat::Int4 { group: 128, zero_point: false }, [128, 320]),
    ] {
        let (a, da) = random_matrix(&mut rng, format, parts[0], in_dim);
        let (b, db) = random_matrix(&mut rng, format, parts[1], in_dim);
        let packed = repack::repack_row_concat(&[vec![(&a).into(), (&b).into()]]).unwrap();
        let weights = DeviceWeights::upload(device, &packed).unwrap();
        let rows = 2;
        let out = parts[0] + parts[1];
        let x = random_bf16(&mut rng, rows * in_dim, 1.0);
        let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
        let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * out, 0xff).unwrap();
        dense::linear(&weights, x_dev.view([rows, in_dim]).unwrap(), y.view([rows, out]).unwrap()).unwrap();
        let got = to_f32(&y.to_vec().unwrap());
        let (want_a, want_b) = (matmul_nt(&to_f32(&x), &da, rows, in_dim, parts[0]), matmul_nt(&to_f32(&x), &db, rows, in_dim, parts[1]));
        let want: Vec<f32> =
            (0..rows).flat_map(|r| want_a[r * parts[0]..][..parts[0]].iter().chain(&want_b[r * parts[1]..][..parts[1]]).copied().collect::<Vec<_>>()).collect();
        assert_agrees(&format!("row concat {format} {parts:?}"), &got, &want);
    }
}

/// The shared expert in the routed experts' launches (`routed_and_shared_experts`: 2 launches) gives bit for bit the
/// pair outputs and shared output of the four launches apart (`routed_experts` then `shared_expert`), for every
/// format, at decode (narrow tile) and prefill (tiled) sizes, with a remote expert and unrouted pairs.
fn shared_expert_in_routed_launches_equals_apart(device: &Device) {
    for (format, tokens) in FORMATS.iter().map(|&f| (f, 3)).chain([(WeightFormat::Bf16, 70), (WeightFormat::Nvfp4, 70)]) {
        let (dim, hidden, k, experts) = (256, 128, 4, 8);
        let mut rng = rng(41);
        let x = random_bf16(&mut rng, tokens * dim, 1.0);
        let all: Vec<Expert> = (0..experts).map(|_| random_expert(&mut rng, format, dim, hidden)).collect();
        let shared = random_expert(&mut rng, format, dim, hidden);
        let case = Case { remote: 1, unrouted_pairs: true, ..small_case(tokens, k, experts, format) };
        let mut routing = random_routing(&mut rng, &case);
        routing.ids.iter_mut().skip(2).step_by(5).for_each(|id| *id = -1);
        let local_count = experts - 1;
        let expert_map: Vec<i32> = (0..experts).map(|e| if e < local_count { e as i32 } else { -1 }).collect();
        let local: Vec<&Expert> = all[..local_count].iter().collect();
        let tile_m = moe::moe_tile_m(tokens, k, local_count);
        let alignment = align_pairs(&routing.ids, Some(&expert_map), local_count, tile_m);
        let weights = pack_layer(device, &local, Some(&shared));
        let workspace = MoeWorkspace::new(device, &weights, tokens, k, alignment.sorted_pairs.len()).unwrap();
        let up = |v: &[i32]| DeviceBuffer::from_slice(device, v).unwrap();
        let (sorted_pairs, tile_experts, expert_offsets) = (up(&alignment.sorted_pairs), up(&alignment.tile_experts), up(&alignment.expert_offsets));
        let num_padded = up(&[alignment.num_padded]);
        let grouping = Grouping { sorted_pairs: &sorted_pairs, tile_experts: &tile_experts, expert_offsets: &expert_offsets, num_padded: &num_padded, tile_m };
        let topk_weights = DeviceBuffer::from_slice(device, &routing.weights).unwrap();
        let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
        let run = |fused: bool| {
            for b in [&workspace.pair_out, &workspace.shared_out] {
                device.memset(b.addr(), 0xff, b.bytes()).unwrap();
            }
            let (xv, wv) = (x_dev.view([tokens, dim]).unwrap(), topk_weights.view([tokens, k]).unwrap());
            if fused {
                moe::routed_and_shared_experts(&weights, xv, &grouping, wv, &workspace).unwrap();
            } else {
                moe::routed_experts(&weights, xv, &grouping, wv, &workspace).unwrap();
                moe::shared_expert(weights.shared.as_ref().unwrap(), xv, &workspace).unwrap();
            }
            let pairs: Vec<u32> = workspace.pair_out.to_vec().unwrap().iter().map(|v| v.to_bits()).collect();
            let shared_out: Vec<u32> = workspace.shared_out.to_vec().unwrap().iter().map(|v| v.to_bits()).collect();
            (pairs, shared_out)
        };
        let (apart, fused) = (run(false), run(true));
        assert_eq!(fused.1, apart.1, "{format} tokens {tokens}: shared output");
        // Pairs the grouping never writes (remote or unrouted) stay poisoned in both runs: compare every word.
        assert_eq!(fused.0, apart.0, "{format} tokens {tokens}: pair outputs");
        assert!(fused.1.iter().all(|&b| !f32::from_bits(b).is_nan()), "{format}: a shared output left unwritten");
    }
}

/// Device-side stacking and row concatenation of packed weights (what the synthetic model uses to assemble W_UK /
/// W_UV / wq_a + wkv_a on the device) give exactly the arrays of the host repack, for every format.
fn device_stack_and_concat_equal_host_repack(device: &Device) {
    fn same(what: &str, a: &DeviceWeights, b: &DeviceWeights) {
        assert_eq!(
            (a.format, a.experts, a.out_cols, a.rows_padded, a.k_dim, a.expert_stride, a.group, a.bytes_per_expert),
            (b.format, b.experts, b.out_cols, b.rows_padded, b.k_dim, b.expert_stride, b.group, b.bytes_per_expert),
            "{what}: shape"
        );
        assert_eq!(a.data.to_vec().unwrap(), b.data.to_vec().unwrap(), "{what}: data");
        let opt = |x: &Option<DeviceBuffer<f32>>| x.as_ref().map(|b| b.to_vec().unwrap());
        assert_eq!(opt(&a.row_scales), opt(&b.row_scales), "{what}: row scales");
        assert_eq!(opt(&a.block_scales), opt(&b.block_scales), "{what}: block scales");
        assert_eq!(a.group_scales.as_ref().map(|b| b.to_vec().unwrap()), b.group_scales.as_ref().map(|b| b.to_vec().unwrap()), "{what}: group scales");
        assert_eq!(a.group_zeros.as_ref().map(|b| b.to_vec().unwrap()), b.group_zeros.as_ref().map(|b| b.to_vec().unwrap()), "{what}: zero points");
        assert_eq!(a.fp4_scales.as_ref().map(|b| b.to_vec().unwrap()), b.fp4_scales.as_ref().map(|b| b.to_vec().unwrap()), "{what}: fp4 scales");
    }
    let mut rng = rng(43);
    let formats = FORMATS.iter().copied().chain([WeightFormat::Int4 { group: 128, zero_point: true }]);
    for format in formats {
        let k = 256;
        let (a, _) = random_matrix(&mut rng, format, 128, k);
        let (b, _) = random_matrix(&mut rng, format, 40, k);
        let one = |q: &QuantizedMatrix| DeviceWeights::upload(device, &repack::repack_linear(&[q.into()]).unwrap()).unwrap();
        let (da, db) = (one(&a), one(&b));
        let host = DeviceWeights::upload(device, &repack::repack_row_concat(&[vec![(&a).into(), (&b).into()]]).unwrap()).unwrap();
        same(&format!("{format} concat"), &DeviceWeights::concat_rows(&[&da, &db]).unwrap(), &host);
        let (c, _) = random_matrix(&mut rng, format, 128, k);
        let host = DeviceWeights::upload(device, &repack::repack_linear(&[(&a).into(), (&c).into()]).unwrap()).unwrap();
        same(&format!("{format} stack"), &DeviceWeights::stack(&[&da, &one(&c)]).unwrap(), &host);
        // Parts of different shapes do not stack; a first part of a partial tile does not concatenate.
        assert!(matches!(DeviceWeights::stack(&[&da, &db]), Err(small4::Error::InvalidArgument(_))));
        assert!(matches!(DeviceWeights::concat_rows(&[&db, &da]), Err(small4::Error::InvalidArgument(_))));
    }
}

/// Activation scales for the W8A8 cases: inputs are uniform in [-1, 1] and the quarter above 0.75 in magnitude
/// saturates (448 * scale = 0.75), so the saturation rule is exercised; the SwiGLU activations (about 0.1 at these
/// sizes) use the e4m3 range up to 0.5.
const W8A8_SCALES: Fp8ActScales = Fp8ActScales { up: 0.75 / 448.0, down: 0.5 / 448.0 };

fn w8a8_case(tokens: usize, k: usize) -> Case {
    Case { remote: 1, w8a8: Some(W8A8_SCALES), unrouted_pairs: true, seed: 21, ..small_case(tokens, k, 8, WeightFormat::Fp8PerTensor) }
}

/// W8A8 routed experts (e4m3 weights and activations on mma m16n8k32) against the reference that quantises the
/// activations the same way: 1 / 17 / 33 tokens, top-1 and top-4 of 8 experts (one on another GPU, idle experts,
/// every fifth pair with expert id -1), the shared expert in bf16; poisoned outputs and workspaces.
fn moe_layer_w8a8_matches_reference(device: &Device) {
    for tokens in [1, 17, 33] {
        for k in [1, 4] {
            check_moe_case(device, &w8a8_case(tokens, k));
        }
    }
}

/// W8A8 through the other two tiles: 70 tokens x top-4 of 8 (tile_m 64: the tiled kernel), and 128 experts whose
/// gate_up grid (3 blocks of 128 features each) passes the narrow threshold (the small kernel), all tokens on the
/// first experts.
fn moe_layer_w8a8_prefill_and_small_tiles(device: &Device) {
    assert_eq!(moe::moe_tile_m(70, 4, 8), 64);
    check_moe_case(device, &w8a8_case(70, 4));
    let many = Case { dim: 64, hidden: 192, experts: 128, remote: 0, pick: Pick::Concentrated, ..w8a8_case(33, 8) };
    check_moe_case(device, &many);
}

fn moe_layer_w8a8_is_deterministic(device: &Device) {
    let case = Case { seed: 22, ..w8a8_case(33, 4) };
    assert_eq!(check_moe_case(device, &case), check_moe_case(device, &case));
}

/// The device quantiser picks exactly the reference's e4m3 codes (ties to even, saturation, the sign of zero) and
/// stores each 32 columns in the GEMMs' B-operand order pi(c) = 16 (c / 16) + 2 ((c % 16) / 4) + c % 2 + 8 ((c / 2) % 2),
/// reading a strided input view.
fn activation_quantiser_matches_reference(device: &Device) {
    let (rows, cols, stride, scale) = (3, 128, 136, 0.25f32);
    let mut rng = rng(23);
    let mut x: Vec<bf16> = random_bf16(&mut rng, rows * stride, 200.0);
    // Exact halfway points between e4m3 neighbours (ties to even; the last between the subnormals 2^-9 and 2^-8),
    // saturation, zeros of both signs.
    for (i, v) in [1.0625f32, 1.1875, -1.0625, 449.0, -1e30, 0.0, -0.0, 0.0029296875].iter().enumerate() {
        x[i] = bf16::from_f32(v * scale);
    }
    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let out = DeviceBuffer::<u8>::filled_with_byte(device, rows * cols, 0xff).unwrap();
    let x_rows = x_dev.view([rows, stride]).unwrap().columns(0..cols).unwrap();
    moe::quantize_act_e4m3(x_rows, scale, out.view([rows, cols]).unwrap()).unwrap();
    let got = out.to_vec().unwrap();
    let inv_scale = 1.0 / scale;
    for r in 0..rows {
        for c in 0..cols {
            let (group, within) = (c / 32, c % 32);
            let col = group * 32 + 16 * (within / 16) + 2 * ((within % 16) / 4) + within % 2 + 8 * ((within / 2) % 2);
            let want = f32_to_e4m3(x[r * stride + col].to_f32() * inv_scale);
            assert_eq!(got[r * cols + c], want, "row {r} byte {c} (column {col})");
        }
    }
    // The reference's values are these codes times the scale.
    let first = quantize_act_e4m3(&to_f32(&x[..8]), scale);
    assert_eq!(first, [1.0f32, 1.25, -1.0, 448.0, -448.0, 0.0, 0.0, 0.00390625].map(|v| v * scale));
}

/// Bad W8A8 inputs get typed errors: non-fp8 weights, scales that are not finite and positive, wrong lengths, column
/// counts the GEMMs cannot step through.
fn w8a8_wrappers_reject_bad_inputs(device: &Device) {
    let mut rng = rng(24);
    let (dim, hidden) = (128, 64);
    let bf16_expert = random_expert(&mut rng, WeightFormat::Bf16, dim, hidden);
    let mut bf16_layer = pack_layer(device, &[&bf16_expert], None);
    assert!(matches!(bf16_layer.set_fp8_activations(Some(W8A8_SCALES)), Err(small4::Error::InvalidArgument(_))));
    let fp8_expert = random_expert(&mut rng, WeightFormat::Fp8PerTensor, dim, hidden);
    let mut fp8_layer = pack_layer(device, &[&fp8_expert], None);
    for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
        let err = fp8_layer.set_fp8_activations(Some(Fp8ActScales { up: bad, down: 1.0 })).unwrap_err();
        assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
    }
    assert_eq!(fp8_layer.fp8_activations, None);
    let x = DeviceBuffer::<bf16>::alloc(device, 2 * dim).unwrap();
    let q = DeviceBuffer::<u8>::alloc(device, 2 * dim).unwrap();
    let (x_rows, q_rows) = (x.view([2, dim]).unwrap(), q.view([2, dim]).unwrap());
    let cols_96 = x.view([2, dim]).unwrap().columns(0..96).unwrap();
    assert!(matches!(moe::quantize_act_e4m3(cols_96, 1.0, q.view([2, 96]).unwrap()), Err(small4::Error::InvalidArgument(_))));
    assert!(matches!(x.view([3, dim]), Err(small4::Error::Shape { .. })));
    assert!(matches!(moe::quantize_act_e4m3(x_rows, 1.0, q.view([1, dim]).unwrap()), Err(small4::Error::Shape { .. })));
    assert!(matches!(moe::quantize_act_e4m3(x_rows, 0.0, q_rows), Err(small4::Error::InvalidArgument(_))));
    // The kernel loads bf16 pairs: a view starting on an odd element is refused; the output has no stride.
    let odd = small4::kernels::TensorView::strided(&x, 1, [1, 64], 64).unwrap();
    assert!(matches!(moe::quantize_act_e4m3(odd, 1.0, q.view([1, 64]).unwrap()), Err(small4::Error::InvalidArgument(_))));
    let q_strided = q.view([2, dim]).unwrap().columns(0..64).unwrap();
    assert!(matches!(moe::quantize_act_e4m3(cols_96.columns(0..64).unwrap(), 1.0, q_strided), Err(small4::Error::InvalidArgument(_))));
    // e4m3 rows into a GEMM whose weights are not per-tensor fp8, and a too-short e4m3 input.
    let up = |v: &[i32]| DeviceBuffer::from_slice(device, v).unwrap();
    let alignment = align_pairs(&[0, 0], None, 1, 8);
    let (sorted_pairs, tile_experts, expert_offsets) = (up(&alignment.sorted_pairs), up(&alignment.tile_experts), up(&alignment.expert_offsets));
    let num_padded = up(&[alignment.num_padded]);
    let grouping = Grouping { sorted_pairs: &sorted_pairs, tile_experts: &tile_experts, expert_offsets: &expert_offsets, num_padded: &num_padded, tile_m: 8 };
    let act_buffer = DeviceBuffer::<bf16>::alloc(device, alignment.sorted_pairs.len() * hidden).unwrap();
    let act = act_buffer.view([alignment.sorted_pairs.len(), hidden]).unwrap();
    let rows = E4m3Rows { data: q_rows, scale: 1.0 };
    let err = moe::up_swiglu_w8a8(&bf16_layer.gate_up, rows, 1, &grouping, act).unwrap_err();
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
    // Rows of 64 e4m3 codes for weights of k = 128; an activation with one slot too few.
    let short = E4m3Rows { data: q.view([4, dim / 2]).unwrap(), scale: 1.0 };
    let err = moe::up_swiglu_w8a8(&fp8_layer.gate_up, short, 1, &grouping, act).unwrap_err();
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    let few_slots = act_buffer.view([alignment.sorted_pairs.len() - 1, hidden]).unwrap();
    let err = moe::up_swiglu_w8a8(&fp8_layer.gate_up, rows, 1, &grouping, few_slots).unwrap_err();
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    // The GEMM loads 16 e4m3 codes at a time: rows 8 bytes into the buffer are refused.
    let shifted = E4m3Rows { data: small4::kernels::TensorView::strided(&q, 8, [1, dim], dim).unwrap(), scale: 1.0 };
    let err = moe::up_swiglu_w8a8(&fp8_layer.gate_up, shifted, 1, &grouping, act).unwrap_err();
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
}

fn wrappers_reject_bad_shapes(device: &Device) {
    let mut rng = rng(8);
    let (w, _) = random_matrix(&mut rng, WeightFormat::Bf16, 64, 128);
    let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
    let x = DeviceBuffer::<bf16>::alloc(device, 3 * 128).unwrap();
    let y = DeviceBuffer::<bf16>::alloc(device, 2 * 64).unwrap();
    // An output with fewer rows than the input, an input of the wrong width, an output of the wrong width.
    let err = dense::linear(&weights, x.view([3, 128]).unwrap(), y.view([2, 64]).unwrap()).unwrap_err();
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    let err = dense::linear(&weights, x.view([2, 192]).unwrap(), y.view([2, 64]).unwrap()).unwrap_err();
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    let err = dense::linear(&weights, x.view([2, 128]).unwrap(), y.view([4, 32]).unwrap()).unwrap_err();
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    // The 16-byte loads of x: a start 4 elements in, or a row stride of 132, is refused.
    let shifted = small4::kernels::TensorView::strided(&x, 4, [2, 128], 128).unwrap();
    let err = dense::linear(&weights, shifted, y.view([2, 64]).unwrap()).unwrap_err();
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
    let odd_stride = small4::kernels::TensorView::strided(&x, 0, [2, 128], 132).unwrap();
    let err = dense::linear(&weights, odd_stride, y.view([2, 64]).unwrap()).unwrap_err();
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
    // Columns not a multiple of 64 cannot be packed.
    let (odd, _) = random_matrix(&mut rng, WeightFormat::Bf16, 64, 96);
    assert!(matches!(repack::repack_linear(&[(&odd).into()]), Err(small4::Error::InvalidArgument(_))));
    // A SwiGLU-packed matrix is not a plain linear layer.
    let (w3, _) = random_matrix(&mut rng, WeightFormat::Bf16, 64, 128);
    let fused = DeviceWeights::upload(device, &repack::repack_gate_up(&[((&w).into(), (&w3).into())]).unwrap()).unwrap();
    let y = DeviceBuffer::<bf16>::alloc(device, 3 * 64).unwrap();
    assert!(matches!(dense::linear(&fused, x.view([3, 128]).unwrap(), y.view([3, 64]).unwrap()), Err(small4::Error::InvalidArgument(_))));
}

/// The GEMMs' in-register dequantisation bit for bit: one-hot input rows pick single weights, so each output is one
/// dequantised weight times 1 in the f32 accumulator (exact), times a per-row scale of 1: the bf16 the reference
/// dequantises to (`dequantize_for_gemm`), NaN where the weight's row holds a NaN (0 x NaN is NaN in the dot product),
/// and zero of either sign for a zero weight (the accumulator adds -0 to +0). Every code point of each format, as in
/// tests/dequant.rs: all finite e4m3 bytes as fp8 data (per-tensor and per block of 128 with f32 block scales), all
/// nibble pairs as int4 (group 64 with every zero point, symmetric group 128, two stages a group) and as e2m1 codes
/// (subnormal 0.5, negative zero), all 256 e4m3 bytes as nvfp4 block scales (subnormals, negative, NaN), and one row of
/// all 256 fp8 bytes, NaN codes included. Columns in launches of 32 one-hot rows (the narrow decode tile) and all at
/// once (the prefill tile); then K = 4096 and 2048 (the pipeline rings wrap) with 32 columns spread over K a launch.
fn gemm_dequantises_every_code_point_exactly(device: &Device) {
    use small4::quant::{Fp8Block128, Fp8PerTensor, Int4Grouped, Nvfp4};
    let codes: Vec<u8> = (0..=255u8).collect();
    let finite: Vec<u8> = codes.iter().map(|&c| if c & 0x7f == 0x7f { 0 } else { c }).collect();
    let int4 = |rows: usize, cols: usize, group: usize, zero_point: bool| {
        let packed = codes.repeat(rows * cols / 2 / 256);
        let scales = (0..rows * cols / group).map(|g| bf16::from_f32(0.01 + g as f32 * 0.37)).collect::<Vec<_>>();
        let zeros = zero_point.then(|| (0..rows * cols / group).map(|g| (g % 16) as u8).collect());
        QuantizedMatrix::Int4(Int4Grouped::from_parts(packed, rows, cols, group, scales, zeros).unwrap())
    };
    // NVFP4 blocks of 16 (8 bytes each): block b has bytes (8b .. 8b + 8) mod 256 and scale code scales[b].
    let nvfp4 = |rows: usize, cols: usize, scales: Vec<u8>| {
        let packed = (0..rows * cols / 2).map(|i| (i % 256) as u8).collect();
        QuantizedMatrix::Nvfp4(Nvfp4::from_parts(packed, rows, cols, scales, 1.0).unwrap())
    };
    let block_scales = vec![0.5, 3.0, 1.0 / 3.0, 7.0];
    let every_code = [
        QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::from_parts([finite.repeat(7), codes.clone()].concat(), 8, 256, 1.0).unwrap()),
        QuantizedMatrix::Fp8Block128(Fp8Block128::from_parts([finite.repeat(135), codes.clone()].concat(), 136, 256, block_scales).unwrap()),
        int4(16, 512, 64, true),
        int4(16, 512, 128, false),
        nvfp4(16, 256, codes.clone()),
    ];
    for matrix in &every_code {
        let cols = matrix.shape().1;
        let launches: Vec<Vec<usize>> = (0..cols / 32).map(|l| (32 * l..32 * l + 32).collect()).chain([(0..cols).collect()]).collect();
        check_gemm_exact(device, matrix, &launches);
    }
    // The rings: scales of every finite code cycled over the blocks (a NaN scale would make whole rows NaN).
    let long = [
        QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::from_parts(finite.repeat(8 * 16), 8, 4096, 1.0).unwrap()),
        QuantizedMatrix::Fp8Block128(Fp8Block128::from_parts(finite.repeat(8 * 8), 8, 2048, (0..16).map(|b| 0.25 + b as f32 / 7.0).collect()).unwrap()),
        int4(16, 4096, 128, true),
        nvfp4(16, 2048, finite.iter().cycle().step_by(7).take(16 * 2048 / 16).copied().collect()),
    ];
    for matrix in &long {
        let cols = matrix.shape().1;
        let launches: Vec<Vec<usize>> = [0, 45].iter().map(|&offset| (0..32).map(|r| (r * cols / 32 + offset + r) % cols).collect()).collect();
        check_gemm_exact(device, matrix, &launches);
    }
}

/// [`gemm_dequantises_every_code_point_exactly`] for one matrix: one `dense::linear` per entry of `launches`, whose
/// row r is one-hot at column `launch[r]`.
fn check_gemm_exact(device: &Device, matrix: &QuantizedMatrix, launches: &[Vec<usize>]) {
    let (rows, cols) = matrix.shape();
    let deq = matrix.dequantize_for_gemm();
    let nan_rows: Vec<bool> = deq.chunks(cols).map(|row| row.iter().any(|v| v.is_nan())).collect();
    let weights = DeviceWeights::upload(device, &repack::repack_linear(&[matrix.into()]).unwrap()).unwrap();
    for columns in launches {
        let batch = columns.len();
        let mut x = vec![bf16::ZERO; batch * cols];
        for (r, &c) in columns.iter().enumerate() {
            x[r * cols + c] = bf16::ONE;
        }
        let x = DeviceBuffer::from_slice(device, &x).unwrap();
        let y = DeviceBuffer::<bf16>::filled_with_byte(device, batch * rows, 0xff).unwrap();
        dense::linear(&weights, x.view([batch, cols]).unwrap(), y.view([batch, rows]).unwrap()).unwrap();
        let got = y.to_vec().unwrap();
        for (r, &c) in columns.iter().enumerate() {
            for n in 0..rows {
                let (g, w) = (got[r * rows + n], deq[n * cols + c]);
                let what = format!("{} [{rows}, {cols}], {batch} rows: weight ({n}, {c})", matrix.format());
                if nan_rows[n] {
                    assert!(g.is_nan(), "{what}: got {g}, want NaN");
                } else if w == 0.0 {
                    assert_eq!(g.to_f32(), 0.0, "{what}: got {g}, want 0");
                } else {
                    assert_eq!(g.to_bits(), bf16::from_f32(w).to_bits(), "{what}: got {g}, want {w}");
                }
            }
        }
    }
}

fn bits(v: &DeviceBuffer<bf16>) -> Vec<u16> {
    v.to_vec().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// wo's launch with split k (`linear_add_rms_norm` on weights of 2 and 6 decode k splits): the row finisher runs
/// once the last split of every column block is in, and gives bit for bit `linear` (same splits) then
/// `add_rms_norm`, launched twice on the same row and split counters; its GEMM output agrees with the CPU reference
/// (`assert_agrees`). K = 2048 and 4096, the formats of the attention projections, 1 and 3 decode rows.
fn linear_add_rms_norm_split_k_equals_the_launches_apart(device: &Device) {
    let out_dim = 320;
    let mut rng = rng(71);
    for (in_dim, format, rows) in [
        (4096, WeightFormat::Bf16, 1),
        (2048, WeightFormat::Bf16, 3),
        (4096, WeightFormat::Fp8PerTensor, 3),
        (2048, WeightFormat::Fp8PerTensor, 1),
        (4096, WeightFormat::Fp8Block128, 1),
        (2048, WeightFormat::Fp8Block128, 3),
    ] {
        let (w, deq) = random_matrix(&mut rng, format, out_dim, in_dim);
        let mut weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        let upload = |v: &[bf16]| DeviceBuffer::from_slice(device, v).unwrap();
        let x_host = random_bf16(&mut rng, rows * in_dim, 1.0);
        let (x, residual) = (upload(&x_host), upload(&random_bf16(&mut rng, rows * out_dim, 1.0)));
        let gamma = upload(&random_bf16(&mut rng, out_dim, 1.0));
        let counters = RowCounters::new(device, rows).unwrap();
        let want = matmul_nt(&to_f32(&x_host), &deq, rows, in_dim, out_dim);
        for splits in [2, 6] {
            weights.set_decode_k_splits(splits).unwrap();
            let run = |fused: bool| wo_add_rms_norm_bits(&weights, &x, &residual, &gamma, &counters, fused);
            let apart = run(false);
            let what = format!("{format} K {in_dim} rows {rows} splits {splits}");
            for launch in 0..2 {
                assert_eq!(run(true), apart, "{what}: fused launch {launch}");
            }
            let y: Vec<f32> = apart.0.iter().map(|&b| bf16::from_bits(b).to_f32()).collect();
            assert_agrees(&what, &y, &want);
            assert!(apart.2.iter().all(|&b| !bf16::from_bits(b).is_nan()), "{what}: a row left unnormed");
        }
    }
}

/// The bits of (y, h, out) for `rows` = x's rows of wo then the residual add + RMSNorm, in one launch
/// (`linear_add_rms_norm`, `fused`) or two (`linear`, `add_rms_norm`), into outputs poisoned with NaN first.
fn wo_add_rms_norm_bits(
    weights: &DeviceWeights,
    x: &DeviceBuffer<bf16>,
    residual: &DeviceBuffer<bf16>,
    gamma: &DeviceBuffer<bf16>,
    counters: &RowCounters,
    fused: bool,
) -> (Vec<u16>, Vec<u16>, Vec<u16>) {
    let (in_dim, out_dim) = (weights.k_dim, weights.out_cols);
    let rows = x.len() / in_dim;
    let poisoned = || DeviceBuffer::<bf16>::filled_with_byte(x.device(), rows * out_dim, 0xff).unwrap();
    let (y, h, out) = (poisoned(), poisoned(), poisoned());
    fn view(b: &DeviceBuffer<bf16>, rows: usize, cols: usize) -> Matrix<'_, bf16> {
        b.view([rows, cols]).unwrap()
    }
    let view = |b| view(b, rows, out_dim);
    let norm = ResidualNorm { residual: view(residual), weight: gamma.as_vector(), residual_out: view(&h), out: view(&out), eps: 1e-6 };
    if fused {
        dense::linear_add_rms_norm(weights, x.view([rows, in_dim]).unwrap(), view(&y), &norm, counters, None).unwrap();
    } else {
        dense::linear(weights, x.view([rows, in_dim]).unwrap(), view(&y)).unwrap();
        norm::add_rms_norm(view(&y), norm.residual, norm.weight, norm.residual_out, norm.out, norm.eps).unwrap();
    }
    (bits(&y), bits(&h), bits(&out))
}

/// `linear_add_rms_norm` (the GEMM finishing its rows with the residual add + RMSNorm, one launch) gives bit for bit
/// `linear` then `add_rms_norm`, for every format, at 1 and 3 rows (the narrow decode tile) and 70 (the prefill tile),
/// twice in a row on the same counters (each launch leaves them zero).
fn linear_add_rms_norm_equals_the_launches_apart(device: &Device) {
    let (in_dim, out_dim) = (256, 320);
    let mut rng = rng(51);
    for (format, rows) in FORMATS.iter().map(|&f| (f, 3)).chain([(WeightFormat::Bf16, 1), (WeightFormat::Bf16, 70), (WeightFormat::Nvfp4, 70)]) {
        let (w, _) = random_matrix(&mut rng, format, out_dim, in_dim);
        let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        let upload = |v: &[bf16]| DeviceBuffer::from_slice(device, v).unwrap();
        let (x, residual) = (upload(&random_bf16(&mut rng, rows * in_dim, 1.0)), upload(&random_bf16(&mut rng, rows * out_dim, 1.0)));
        let gamma = upload(&random_bf16(&mut rng, out_dim, 1.0));
        let counters = RowCounters::new(device, rows).unwrap();
        let run = |fused: bool| wo_add_rms_norm_bits(&weights, &x, &residual, &gamma, &counters, fused);
        let apart = run(false);
        for launch in 0..2 {
            assert_eq!(run(true), apart, "{format} rows {rows}, fused launch {launch}");
        }
        assert!(apart.2.iter().all(|&b| !bf16::from_bits(b).is_nan()), "{format}: a row left unnormed");
    }
}

/// `moe_layer_add_rms_norm` (the combine + residual add + RMSNorm run by the down projection's last block per token)
/// gives bit for bit `routed_and_shared_experts` then `moe_combine_add_rms_norm`: every format at 3 tokens (shared
/// expert in the routed launches), 70 tokens (prefill tile, shared expert apart), without a shared expert, with
/// unrouted pairs (never written, so never waited for), and in W8A8.
fn moe_layer_add_rms_norm_equals_the_launches_apart(device: &Device) {
    let bf16_case = |tokens, shared| Case { shared, unrouted_pairs: true, seed: 52, ..small_case(tokens, 4, 8, WeightFormat::Bf16) };
    let cases = FORMATS
        .iter()
        .map(|&format| Case { seed: 53, ..small_case(3, 4, 8, format) })
        .chain([bf16_case(3, true), bf16_case(3, false), bf16_case(70, true), Case { seed: 54, ..small_case(70, 4, 8, WeightFormat::Nvfp4) }])
        .chain([Case { remote: 0, ..w8a8_case(3, 4) }, Case { remote: 0, ..w8a8_case(70, 4) }]);
    for case in cases {
        let (dim, hidden, tokens, k) = (case.dim, case.hidden, case.tokens, case.k);
        let mut rng = rng(case.seed);
        let x = random_bf16(&mut rng, tokens * dim, 1.0);
        let experts: Vec<Expert> = (0..case.experts).map(|_| random_expert(&mut rng, case.format, dim, hidden)).collect();
        let shared = case.shared.then(|| random_expert(&mut rng, case.format, dim, hidden));
        let mut routing = random_routing(&mut rng, &case);
        if case.unrouted_pairs {
            routing.ids.iter_mut().skip(2).step_by(5).for_each(|id| *id = -1);
        }
        let tile_m = moe::moe_tile_m(tokens, k, case.experts);
        let alignment = align_pairs(&routing.ids, None, case.experts, tile_m);
        let mut weights = pack_layer(device, &experts.iter().collect::<Vec<_>>(), shared.as_ref());
        weights.set_fp8_activations(case.w8a8).unwrap();
        let workspace = MoeWorkspace::new(device, &weights, tokens, k, alignment.sorted_pairs.len()).unwrap();
        let up = |v: &[i32]| DeviceBuffer::from_slice(device, v).unwrap();
        let (sorted_pairs, tile_experts, expert_offsets) = (up(&alignment.sorted_pairs), up(&alignment.tile_experts), up(&alignment.expert_offsets));
        let num_padded = up(&[alignment.num_padded]);
        let grouping = Grouping { sorted_pairs: &sorted_pairs, tile_experts: &tile_experts, expert_offsets: &expert_offsets, num_padded: &num_padded, tile_m };
        let (topk_ids, topk_weights) = (up(&routing.ids), DeviceBuffer::from_slice(device, &routing.weights).unwrap());
        let routing_dev = RoutingBuffers {
            topk_ids: topk_ids.view([tokens, k]).unwrap(),
            topk_weights: topk_weights.view([tokens, k]).unwrap(),
            expert_map: None,
            experts: case.experts,
        };
        let upload = |v: &[bf16]| DeviceBuffer::from_slice(device, v).unwrap();
        let (x_dev, residual, gamma) = (upload(&x), upload(&random_bf16(&mut rng, tokens * dim, 1.0)), upload(&random_bf16(&mut rng, dim, 1.0)));
        let counters = RowCounters::new(device, tokens).unwrap();
        let run = |fused: bool| {
            for b in [&workspace.pair_out, &workspace.shared_out] {
                device.memset(b.addr(), 0xff, b.bytes()).unwrap();
            }
            let poisoned = || DeviceBuffer::<bf16>::filled_with_byte(device, tokens * dim, 0xff).unwrap();
            let (h, out) = (poisoned(), poisoned());
            fn view(b: &DeviceBuffer<bf16>, rows: usize, cols: usize) -> Matrix<'_, bf16> {
                b.view([rows, cols]).unwrap()
            }
            let view = |b| view(b, tokens, dim);
            let norm = ResidualNorm { residual: view(&residual), weight: gamma.as_vector(), residual_out: view(&h), out: view(&out), eps: 1e-6 };
            let xv = view(&x_dev);
            if fused {
                moe::moe_layer_add_rms_norm(&weights, xv, &routing_dev, &grouping, &workspace, &norm, &counters).unwrap();
            } else {
                moe::routed_and_shared_experts(&weights, xv, &grouping, routing_dev.topk_weights, &workspace).unwrap();
                let shared_out = weights.shared.as_ref().map(|_| workspace.shared_out.view([tokens, dim]).unwrap());
                let pairs = MoePairs {
                    pair_out: workspace.pair_out.view([tokens * k, dim]).unwrap(),
                    shared_out,
                    topk_ids: routing_dev.topk_ids,
                    expert_map: None,
                    experts: case.experts,
                };
                norm::moe_combine_add_rms_norm(&pairs, norm.residual, norm.weight, norm.residual_out, norm.out, norm.eps).unwrap();
            }
            (bits(&h), bits(&out))
        };
        let apart = run(false);
        for launch in 0..2 {
            assert_eq!(run(true), apart, "{case:?}: fused launch {launch}");
        }
        assert!(apart.1.iter().all(|&b| !bf16::from_bits(b).is_nan()), "{case:?}: a token left unnormed");
    }
}

/// `linear_rope_q` (the query projection with RoPE and the llama-4 query scale in its epilogue) gives bit for bit
/// `linear` then `rope_q_k`, for every format, at 1 and 3 rows (narrow tile) and 70 (tiled), heads of 192 (128 nope
/// and 64 rope), positions up to ~2^17 with a non-zero query scale; the decode rows also with the k split 3 ways (the
/// RoPE in each output tile's last split block).
fn linear_rope_q_equals_the_launches_apart(device: &Device) {
    use small4::kernels::ops::{self, QueryScale};
    let (in_dim, heads, head_dim) = (256, 3, 192);
    let out_dim = heads * head_dim;
    let scale = QueryScale { beta: 0.1, original_max_position: 8192 };
    let inv_freq: Vec<f32> = (0..32).map(|i| 10_000f32.powf(-(i as f32) / 32.0)).collect();
    let mut rng = rng(55);
    for (format, rows) in
        FORMATS.iter().map(|&f| (f, 3)).chain([(WeightFormat::Bf16, 1), (WeightFormat::Bf16, 70), (WeightFormat::Int4 { group: 64, zero_point: true }, 70)])
    {
        let (w, _) = random_matrix(&mut rng, format, out_dim, in_dim);
        let mut weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        let x = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, rows * in_dim, 1.0)).unwrap();
        let positions: Vec<i32> = (0..rows).map(|_| rng.random_range(0..140_000)).collect();
        let (positions, inv_freq) = (DeviceBuffer::from_slice(device, &positions).unwrap(), DeviceBuffer::from_slice(device, &inv_freq).unwrap());
        let run = |weights: &DeviceWeights, fused: bool| {
            let q = DeviceBuffer::<bf16>::filled_with_byte(device, rows * out_dim, 0xff).unwrap();
            let (xv, qv) = (x.view([rows, in_dim]).unwrap(), q.view([rows, heads, head_dim]).unwrap());
            if fused {
                dense::linear_rope_q(weights, xv, qv, positions.as_vector(), inv_freq.as_vector(), scale, None).unwrap();
            } else {
                dense::linear(weights, xv, q.view([rows, out_dim]).unwrap()).unwrap();
                ops::rope_q_k(qv, None, positions.as_vector(), inv_freq.as_vector(), scale).unwrap();
            }
            bits(&q)
        };
        let apart = run(&weights, false);
        assert_eq!(run(&weights, true), apart, "{format} rows {rows}");
        assert!(apart.iter().all(|&b| !bf16::from_bits(b).is_nan()), "{format}: a query left unwritten");
        if rows <= 32 {
            // Split k at decode (3 splits of the 4 k blocks: ranges of 1, 1 and 2, shorter than the pipeline): the
            // RoPE runs in each tile's last block, on the summed tile.
            weights.set_decode_k_splits(3).unwrap();
            let apart = run(&weights, false);
            assert_eq!(run(&weights, true), apart, "{format} rows {rows}, 3 k splits");
            assert!(apart.iter().all(|&b| !bf16::from_bits(b).is_nan()), "{format}: a query left unwritten (3 k splits)");
        }
    }
}

backend_tests!(
    gemm_dequantises_every_code_point_exactly,
    decode_kernel_equals_narrow_tile,
    dense_decode_kernel_equals_narrow_tile,
    moe_layer_at_real_reduction_lengths,
    linear_at_real_reduction_lengths,
    linear_wide_output_runs_the_small_tile,
    linear_per_head_matches_reference,
    row_concat_linear_matches_both_parts,
    shared_expert_in_routed_launches_equals_apart,
    linear_add_rms_norm_equals_the_launches_apart,
    linear_rope_q_equals_the_launches_apart,
    moe_layer_add_rms_norm_equals_the_launches_apart,
    device_stack_and_concat_equal_host_repack,
    moe_layer_matches_reference,
    moe_layer_every_format,
    moe_layer_prefill_tiles,
    moe_layer_skewed_and_many_experts,
    moe_layer_is_deterministic,
    router_then_moe_layer_matches_reference,
    linear_matches_reference,
    linear_split_k_matches_reference,
    linear_add_rms_norm_split_k_equals_the_launches_apart,
    wrappers_reject_bad_shapes,
    moe_layer_w8a8_matches_reference,
    moe_layer_w8a8_prefill_and_small_tiles,
    moe_layer_w8a8_is_deterministic,
    activation_quantiser_matches_reference,
    w8a8_wrappers_reject_bad_inputs,
);

/// Traffic of the two grouped GEMMs at decode shapes with the model's real sizes (dim 4096, hidden 2048), from the
/// interpreter's counters: 32-byte sectors moved / ideal bytes (weights and scales of the touched experts read once,
/// the activations read once, the outputs written once), each within 0.01 of the figures of docs/perf.md, and the
/// distinct sectors (the DRAM estimate) at the ideal. Slow (about 90 s each for 4-bit weights, minutes for bf16): run
/// with `cargo test --test moe decode_traffic -- --ignored --nocapture` (one test per format, they run in parallel);
/// `decode_traffic_at_small_dims` guards the same ratios at a quarter of the sizes in the normal suite.
#[test]
#[ignore = "real dims: minutes on the interpreter; the docs/perf.md table"]
fn decode_traffic_bf16() {
    check_decode_traffic(WeightFormat::Bf16, None, REAL_DIMS, [[1.017, 1.018], [1.251, 1.250]]);
}

#[test]
#[ignore = "real dims: minutes on the interpreter; the docs/perf.md table"]
fn decode_traffic_nvfp4() {
    check_decode_traffic(WeightFormat::Nvfp4, None, REAL_DIMS, [[1.059, 1.063], [1.879, 1.807]]);
}

#[test]
#[ignore = "real dims: minutes on the interpreter; the docs/perf.md table"]
fn decode_traffic_fp8() {
    check_decode_traffic(WeightFormat::Fp8PerTensor, None, REAL_DIMS, [[1.033, 1.036], [1.499, 1.480]]);
}

/// The W8A8 kernels (per-tensor fp8 weights, e4m3 activations); the activation quantiser's launches are not counted.
#[test]
#[ignore = "real dims: minutes on the interpreter; the docs/perf.md table"]
fn decode_traffic_fp8_w8a8() {
    check_decode_traffic(WeightFormat::Fp8PerTensor, Some(W8A8_SCALES), REAL_DIMS, [[1.018, 1.020], [1.255, 1.258]]);
}

/// Warp instructions of one decode launch per format (1 row on the narrow tile; 512 outputs, K = 4096, one k split) on the
/// interpreter, printed as docs/perf.md's table rows: in total and per weight fragment (a warp's 16 x 16 A operand:
/// 32 tiles x 256 k-steps = 8192 a launch; the k loop's loads, ldmatrix and mma.sync included), the global loads on
/// the longest warp's dependence chain and the H100 time the timing model predicts; and requires the instructions
/// per fragment within 0.5 of [`DECODE_INSTRUCTIONS_PER_FRAGMENT`] (measured 2026-12-06), so a costlier
/// dequantisation shows here. `cargo test --test moe decode_warp_instructions -- --nocapture` prints the table.
#[test]
fn decode_warp_instructions() {
    let device = small4::device::simulator();
    let (out_dim, in_dim) = (512, 4096);
    let mut rng = rng(14);
    println!("| format | warp instructions | per fragment | global loads on the longest chain | predicted H100 µs |");
    let mut over = Vec::new();
    for (format, limit) in FORMATS.into_iter().zip(DECODE_INSTRUCTIONS_PER_FRAGMENT) {
        let (w, _) = random_matrix(&mut rng, format, out_dim, in_dim);
        let mut weights = DeviceWeights::upload(&device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        // One k split: the figure is the k loop's cost per fragment, not split-K's partial sums.
        weights.set_decode_k_splits(1).unwrap();
        let x = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, in_dim, 1.0)).unwrap();
        let y = DeviceBuffer::<bf16>::alloc(&device, out_dim).unwrap();
        // The narrow tile, which dense launches of 1 row ran before the decode kernel took them.
        gemm::override_decode_tile(Some("narrow")).unwrap();
        dense::linear(&weights, x.view([1, in_dim]).unwrap(), y.view([1, out_dim]).unwrap()).unwrap();
        gemm::override_decode_tile(None).unwrap();
        let counters = device.last_launch_counters().unwrap();
        let per_fragment = counters.timing.warp_instructions as f64 / ((out_dim / 16) * (in_dim / 16)) as f64;
        let predicted = counters.predicted_us.map_or("-".to_string(), |us| format!("{us:.2}"));
        println!("| {format} | {} | {per_fragment:.1} | {} | {predicted} |", counters.timing.warp_instructions, counters.timing.chain_globals_max);
        if per_fragment > limit + 0.5 {
            over.push(format!("{format}: {per_fragment:.1} warp instructions per fragment, recorded {limit}"));
        }
    }
    assert!(over.is_empty(), "{over:?}");
}

/// [`decode_warp_instructions`]'s figures, in the order of `FORMATS` (bf16, fp8, fp8-block128, int4-g128,
/// int4-g128-zp, nvfp4). Measured after split-K moved to entries of its own (`moe_gemm_*_narrow_split`, 2026-12-06
/// 19:50 UTC): the unsplit kernels, which this launch runs, compile no split code and are back at the figures of
/// before split-K (fp8 80.7 again instead of 84.7: docs/perf.md "moe_gemm decode: dequantisation instructions").
/// bf16 69.4 -> 70.9 on 2026-12-07 (branch moe-decode: the row finisher's overlapped loads, inlined in every narrow
/// kernel, changed its k loop's code; docs/perf.md "The narrow tile after the finisher change").
const DECODE_INSTRUCTIONS_PER_FRAGMENT: [f64; 6] = [70.9, 80.7, 95.2, 87.8, 89.9, 91.7];

/// The decode kernel at the model's real sizes as a decode step runs it: 1 token on top-4 of 4 experts (up + SwiGLU:
/// 4 x 4096 packed rows at K 4096; down: 4 x 4096 rows at K 2048), every format, against the CPU reference. Minutes
/// a format on the interpreter: `cargo test --test moe decode_kernel_at_real_sizes -- --ignored`.
#[test]
#[ignore = "real sizes, 4 experts: minutes a format on the interpreter"]
fn decode_kernel_at_real_sizes() {
    let device = small4::device::simulator();
    for format in FORMATS {
        let case = Case { dim: 4096, hidden: 2048, shared: false, remote: 0, seed: 31, ..small_case(1, 4, 4, format) };
        check_moe_case(&device, &case);
    }
}

/// Warp instructions per 16 x 16 weight fragment of a grouped decode launch at batch 1 (up + SwiGLU, 1 token on 1
/// expert of 512 packed rows, K 4096: 8 blocks of 64 rows), on the narrow tile and on the decode kernel the launcher
/// now picks, with the global loads on the longest warp's chain and the timing model's H100 SXM time of the launch.
/// `cargo test --test moe grouped_decode_warp_instructions -- --nocapture` prints the table (docs/perf.md "The decode
/// kernel"); each tile's figures must stay within 0.5 of [`GROUPED_DECODE_INSTRUCTIONS_PER_FRAGMENT`].
#[test]
fn grouped_decode_warp_instructions() {
    let device = small4::device::simulator();
    let (dim, hidden) = (4096, 256);
    let mut rng = rng(15);
    let fragments = (2 * hidden / 16) * (dim / 16);
    println!("| format | tile | kernel | warp instructions | per fragment | global loads on the longest chain | predicted H100 µs |");
    let mut over = Vec::new();
    for (format, limits) in FORMATS.into_iter().zip(GROUPED_DECODE_INSTRUCTIONS_PER_FRAGMENT) {
        let expert = random_expert(&mut rng, format, dim, hidden);
        let weights = pack_layer(&device, &[&expert], None);
        let tile_m = moe::moe_tile_m(1, 1, 1);
        let alignment = align_pairs(&[0], Some(&[0]), 1, tile_m);
        let up = |v: &[i32]| DeviceBuffer::from_slice(&device, v).unwrap();
        let (sorted_pairs, tile_experts, expert_offsets) = (up(&alignment.sorted_pairs), up(&alignment.tile_experts), up(&alignment.expert_offsets));
        let num_padded = up(&[alignment.num_padded]);
        let grouping = Grouping { sorted_pairs: &sorted_pairs, tile_experts: &tile_experts, expert_offsets: &expert_offsets, num_padded: &num_padded, tile_m };
        let x = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, dim, 1.0)).unwrap();
        let act = DeviceBuffer::<bf16>::alloc(&device, alignment.sorted_pairs.len() * hidden).unwrap();
        let act_rows = act.view([alignment.sorted_pairs.len(), hidden]).unwrap();
        let mut outputs = Vec::new();
        for (tile, limit) in ["narrow", "decode"].into_iter().zip(limits) {
            gemm::override_decode_tile(Some(tile)).unwrap();
            let launched = moe::up_swiglu(&weights.gate_up, x.view([1, dim]).unwrap(), 1, &grouping, act_rows);
            gemm::override_decode_tile(None).unwrap();
            launched.unwrap();
            let counters = device.last_launch_counters().unwrap();
            // The decode tile of an up projection at one token runs the decode kernel's 2-warp blocks.
            let entry = if tile == "decode" { "decode_w2" } else { tile };
            assert!(counters.kernel.ends_with(entry), "{format} {tile}: ran {}", counters.kernel);
            let per_fragment = counters.timing.warp_instructions as f64 / fragments as f64;
            let predicted = counters.predicted_us.map_or("-".to_string(), |us| format!("{us:.2}"));
            println!(
                "| {format} | {tile} | {} | {} | {per_fragment:.1} | {} | {predicted} |",
                counters.kernel, counters.timing.warp_instructions, counters.timing.chain_globals_max
            );
            if per_fragment > limit + 0.5 {
                over.push(format!("{format} {tile}: {per_fragment:.1} warp instructions per fragment, recorded {limit}"));
            }
            outputs.push(bits(&act));
        }
        assert_eq!(outputs[0], outputs[1], "{format}: the decode kernel's SwiGLU output differs from the narrow tile's");
    }
    assert!(over.is_empty(), "{over:?}");
}

/// [`grouped_decode_warp_instructions`]'s figures, in the order of `FORMATS` (bf16, fp8, fp8-block128, int4-g128,
/// int4-g128-zp, nvfp4): (narrow tile, decode kernel), measured 2026-12-06 23:35 UTC (docs/perf.md "The decode
/// kernel"); the narrow tile's bf16 67.9 -> 71.0 and fp8-block128 91.9 -> 95.3 on 2026-12-07 (the finisher change
/// of [`DECODE_INSTRUCTIONS_PER_FRAGMENT`]). The decode column since 2026-12-07 22:00 UTC: the launcher runs this
/// launch (one round, no row finisher) in the decode kernel's 2-warp blocks, `_decode_w2` (14.3, 41.2, 50.5, 42.6,
/// 43.1, 42.3 in 4-warp blocks; docs/perf.md "The decode kernel in 2-warp blocks").
const GROUPED_DECODE_INSTRUCTIONS_PER_FRAGMENT: [[f64; 2]; 6] = [[71.0, 12.5], [80.7, 39.4], [95.3, 48.7], [87.9, 40.8], [90.0, 41.3], [91.8, 40.4]];

/// The model's expert sizes: (dim, hidden).
const REAL_DIMS: (usize, usize) = (4096, 2048);

/// The decode-traffic ratios of every format at a quarter of the real sizes (dim 1024, hidden 512), where each row's
/// excess has the same sources (the activation rows re-read by every block column, the half-used sectors of the bf16
/// stores) in about the same proportion, so a change of the kernels' access pattern shows here in the normal suite.
/// Limits: the figures measured at these sizes (2026-12-06) plus 0.01; ~15 s on the interpreter.
#[test]
fn decode_traffic_at_small_dims() {
    let small = (1024, 512);
    check_decode_traffic(WeightFormat::Bf16, None, small, SMALL_LIMITS[0]);
    check_decode_traffic(WeightFormat::Nvfp4, None, small, SMALL_LIMITS[1]);
    check_decode_traffic(WeightFormat::Fp8PerTensor, None, small, SMALL_LIMITS[2]);
    check_decode_traffic(WeightFormat::Fp8PerTensor, Some(W8A8_SCALES), small, SMALL_LIMITS[3]);
}

/// [`decode_traffic_at_small_dims`]'s figures: per format (bf16, nvfp4, fp8, fp8 W8A8), per batch (1, 32), the
/// sectors / ideal of (up + SwiGLU, down x weight). Batch 1's bf16, nvfp4 and fp8 launches (64 blocks of 4 warps at
/// these sizes, under one an SM) run the decode kernel's 2-warp blocks since 2026-12-07 (src/kernels/gemm/tile.rs
/// `TileShape::block_warps`), whose twice as many blocks each re-read the token's activation row: measured then
/// (they were 1.020, 1.025; 1.070, 1.086; 1.040, 1.049 in 4-warp blocks). At the real sizes (256 blocks) the
/// launches keep 4-warp blocks and the figures of the `decode_traffic_*` tests above.
const SMALL_LIMITS: [[[f64; 2]; 2]; 4] =
    [[[1.036, 1.041], [1.255, 1.248]], [[1.126, 1.141], [1.850, 1.650]], [[1.071, 1.081], [1.496, 1.435]], [[1.024, 1.034], [1.268, 1.276]]];

/// Runs [`decode_traffic_at_dims`] and requires each row's sectors / ideal within 0.01 of `figures[batch][kernel]`
/// (batches 1 and 32; kernels up + SwiGLU and down x weight) and its distinct sectors within 0.1% of ideal.
fn check_decode_traffic(format: WeightFormat, w8a8: Option<Fp8ActScales>, dims: (usize, usize), figures: [[f64; 2]; 2]) {
    for (row, ratios) in decode_traffic_at_dims(format, w8a8, dims).iter().enumerate() {
        let (figure, [sectors, distinct]) = (figures[row / 2][row % 2], *ratios);
        assert!(sectors <= figure + 0.01, "{format} (W8A8 {}) at {dims:?}, row {row}: sectors / ideal {sectors:.3} above {figure:.3} + 0.01", w8a8.is_some());
        assert!(distinct <= 1.001, "{format} (W8A8 {}) at {dims:?}, row {row}: distinct sectors / ideal {distinct:.4}", w8a8.is_some());
    }
}

/// Prints one Markdown table row per (batch, kernel): `| format | tokens | experts touched | kernel | sector bytes |
/// distinct sector bytes | ideal bytes | sectors / ideal | distinct / ideal |` (distinct = DRAM if L2 keeps re-reads),
/// for batches 1 and 32 on 4 experts at `(dim, hidden)`, with e4m3 activations (the W8A8 kernels, 1 byte per
/// activation element) when `w8a8` holds scales. Returns each row's [sectors / ideal, distinct / ideal] in that order.
fn decode_traffic_at_dims(format: WeightFormat, w8a8: Option<Fp8ActScales>, (dim, hidden): (usize, usize)) -> Vec<[f64; 2]> {
    let device = small4::device::simulator();
    let k = 4;
    let mut ratios = Vec::new();
    {
        let mut rng = rng(11);
        let expert = random_expert(&mut rng, format, dim, hidden);
        for (tokens, experts) in [(1usize, 4usize), (32, 4)] {
            // Every expert gets the same weights (traffic does not depend on the values); the routing spreads the
            // tokens' k distinct choices uniformly over the experts present.
            let local: Vec<&Expert> = (0..experts).map(|_| &expert).collect();
            let weights = pack_layer(&device, &local, None);
            let case =
                Case { tokens, dim, hidden, experts, k, format, shared: false, remote: 0, pick: Pick::Uniform, seed: 12, w8a8: None, unrouted_pairs: false };
            let routing = random_routing(&mut rng, &case);
            let tile_m = moe::moe_tile_m(tokens, k, experts);
            let identity: Vec<i32> = (0..experts as i32).collect();
            let alignment = align_pairs(&routing.ids, Some(&identity), experts, tile_m);
            let touched = alignment.expert_counts.iter().filter(|&&c| c > 0).count();
            let up = |v: &[i32]| DeviceBuffer::from_slice(&device, v).unwrap();
            let (sorted_pairs, tile_experts, expert_offsets) = (up(&alignment.sorted_pairs), up(&alignment.tile_experts), up(&alignment.expert_offsets));
            let num_padded = up(&[alignment.num_padded]);
            let grouping =
                Grouping { sorted_pairs: &sorted_pairs, tile_experts: &tile_experts, expert_offsets: &expert_offsets, num_padded: &num_padded, tile_m };
            let x = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, tokens * dim, 1.0)).unwrap();
            let act = DeviceBuffer::<bf16>::filled_with_byte(&device, alignment.sorted_pairs.len() * hidden, 0xff).unwrap();
            let pair_out = DeviceBuffer::<f32>::filled_with_byte(&device, tokens * k * dim, 0xff).unwrap();
            let topk_weights = DeviceBuffer::from_slice(&device, &routing.weights).unwrap();
            let pairs = tokens * k;
            let act_rows = act.view([alignment.sorted_pairs.len(), hidden]).unwrap();
            let (topk_weights, pair_out) = (topk_weights.view([tokens, k]).unwrap(), pair_out.view([pairs, dim]).unwrap());
            // Grouping metadata the kernels read: sorted pairs of the used slots, tile experts, offsets.
            let grouping_bytes = 4 * (alignment.num_padded as usize * 2 / tile_m.max(1) + alignment.num_padded as usize + 2 * experts);

            // Bytes per input activation element the GEMMs read.
            let in_bytes = if w8a8.is_some() { 1 } else { 2 };
            match w8a8 {
                Some(scales) => {
                    let x_e4m3 = DeviceBuffer::<u8>::alloc(&device, tokens * dim).unwrap();
                    let x_e4m3 = x_e4m3.view([tokens, dim]).unwrap();
                    moe::quantize_act_e4m3(x.view([tokens, dim]).unwrap(), scales.up, x_e4m3).unwrap();
                    moe::up_swiglu_w8a8(&weights.gate_up, E4m3Rows { data: x_e4m3, scale: scales.up }, k, &grouping, act_rows).unwrap();
                }
                None => moe::up_swiglu(&weights.gate_up, x.view([tokens, dim]).unwrap(), k, &grouping, act_rows).unwrap(),
            }
            let up_counters = device.last_launch_counters().unwrap();
            let up_ideal = touched * weights.gate_up.bytes_per_expert + tokens * dim * in_bytes + pairs * hidden * 2 + grouping_bytes;
            match w8a8 {
                Some(scales) => {
                    let slots = alignment.sorted_pairs.len();
                    let act_e4m3 = DeviceBuffer::<u8>::alloc(&device, slots * hidden).unwrap();
                    let act_e4m3 = act_e4m3.view([slots, hidden]).unwrap();
                    moe::quantize_act_e4m3(act_rows, scales.down, act_e4m3).unwrap();
                    let rows = E4m3Rows { data: act_e4m3, scale: scales.down };
                    moe::down_w8a8(&weights.down, rows, &grouping, topk_weights, pair_out).unwrap();
                }
                None => moe::down(&weights.down, act_rows, &grouping, topk_weights, pair_out).unwrap(),
            }
            let down_counters = device.last_launch_counters().unwrap();
            let down_ideal = touched * weights.down.bytes_per_expert + pairs * hidden * in_bytes + pairs * dim * 4 + pairs * 4 + grouping_bytes;
            let format = if w8a8.is_some() { format!("{format} W8A8") } else { format.to_string() };
            for (name, counters, ideal) in [("up + SwiGLU", up_counters, up_ideal), ("down x weight", down_counters, down_ideal)] {
                let (sectors, distinct) = (counters.sector_bytes() as f64 / ideal as f64, counters.dram_bytes() as f64 / ideal as f64);
                println!(
                    "| {format} | {tokens} | {touched} | {name} | {} | {} | {ideal} | {sectors:.3} | {distinct:.3} |",
                    counters.sector_bytes(),
                    counters.dram_bytes()
                );
                ratios.push([sectors, distinct]);
            }
        }
    }
    ratios
}
