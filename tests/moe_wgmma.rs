//! The wgmma kernels of the prefill tile (`cuda/moe_gemm_wgmma.cu`: bf16, int4 symmetric and with zero points,
//! nvfp4 weights) against the mma.sync kernels they replace (`moe_gemm_{bf16,int4,nvfp4}_tiled`) and the CPU
//! reference: grouped up-projection with SwiGLU, grouped down-projection times the routing weight, and the dense GEMMs
//! (bf16, f32 and SwiGLU outputs, batched heads), the dense ones with both wgmma kernels of the format (activations by
//! TMA, `moe_gemm_{bf16,int4,nvfp4}_wgmma_dense`, and gathered, `moe_gemm_{bf16,int4,nvfp4}_wgmma`). The kernels
//! dequantise with the same code (weight_format.cuh) and, on the interpreter, sum each k-step of 16 exactly and round
//! once, in the same k order, so their outputs must be identical bit for bit (the two wgmma kernels on any device); on
//! a GPU each is held to the CPU reference with the GEMM tests' rule (`assert_agrees`). Launches whose matrices hold
//! more than `WIDE_MIN_ROWS` (48) rows on average take the wide kernels (192 slots a block,
//! `moe_gemm_{bf16,int4,nvfp4}_wide_wgmma[_dense]`), more than `WIDE256_MIN_ROWS` (192) the 256-slot ones (a producer
//! warpgroup and setmaxnreg, `moe_gemm_{bf16,int4,nvfp4}_wide256_wgmma[_dense]`); the cases cover the three widths,
//! wide blocks with one to four 64-slot tiles, and experts worked by more than one wide block.
//!
//! The interpreter runs every check here (bounds, uninitialised reads, shared-memory races through mbarrier
//! happens-before, async-proxy fences, wgmma register and operand lifetimes, mbarrier misuse and deadlocks): the
//! tests refuse to run with the race detector switched off (`PTXSIM_RACE_CHECK=0`).

mod common;

use common::routing::{DeviceAlignment, RoutedBatch};
use common::*;
use half::bf16;
use rand::{rngs::StdRng, Rng};
use small4::device::{Device, DeviceBuffer};
use small4::kernels::dense;
use small4::kernels::gemm::DeviceWeights;
use small4::kernels::moe;
use small4::kernels::moe_wgmma::{with_persistent_blocks, with_walk_window, PrefillGemm, WalkWindow, WIDE256_MIN_ROWS, WIDE_MIN_ROWS};
use small4::quant::matrix::QuantizedMatrix;
use small4::quant::repack::{self, MatrixRef};
use small4::quant::WeightFormat;
use small4::reference::linear::matmul_nt;
use small4::reference::moe::align_pairs;
use std::num::NonZeroU32;

/// The weight formats with a wgmma prefill kernel: bf16, int4 (group 128) symmetric and with zero points, nvfp4.
const FORMATS: [WeightFormat; 4] =
    [WeightFormat::Bf16, WeightFormat::INT4_G128, WeightFormat::Int4 { group: small4::quant::INT4_DEFAULT_GROUP, zero_point: true }, WeightFormat::Nvfp4];

/// A matrix [rows, cols] in `format` from values in [-a, a], a = 1 / sqrt(cols), and its values as the kernels
/// multiply them.
fn random_matrix(rng: &mut StdRng, format: WeightFormat, rows: usize, cols: usize) -> (QuantizedMatrix, Vec<f32>) {
    let a = 1.0 / (cols as f32).sqrt();
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.random_range(-a..a)).collect();
    let q = QuantizedMatrix::quantize(format, &w, rows, cols).unwrap();
    let deq = q.dequantize_for_gemm();
    (q, deq)
}

/// The kernel name's weight part: `moe_gemm_{name}_wgmma`, `moe_gemm_{name}_wgmma_dense` and `moe_gemm_{name}_tiled`.
fn kernel_format(format: WeightFormat) -> &'static str {
    match format {
        WeightFormat::Bf16 => "bf16",
        WeightFormat::Int4 { .. } => "int4",
        WeightFormat::Nvfp4 => "nvfp4",
        other => panic!("no wgmma prefill kernel for {other}"),
    }
}

/// Runs `launch` with `choice` and returns its output, after checking that `entry` ran.
fn run_on<T>(device: &Device, choice: PrefillGemm, entry: &str, launch: impl Fn() -> small4::Result<T>) -> small4::Result<T> {
    let out = choice.run(&launch)?;
    if let Some(counters) = device.last_launch_counters() {
        assert_eq!(counters.kernel, entry, "the switch picked the kernel");
    }
    Ok(out)
}

/// The wgmma kernels' name part for a launch of `rows_per_matrix` rows per matrix on average: `_wide256` above
/// [`WIDE256_MIN_ROWS`] (256 slots a block), `_wide` above [`WIDE_MIN_ROWS`] (192), else nothing (64).
fn width(rows_per_matrix: usize) -> &'static str {
    if rows_per_matrix > WIDE256_MIN_ROWS {
        "_wide256"
    } else if rows_per_matrix > WIDE_MIN_ROWS {
        "_wide"
    } else {
        ""
    }
}

/// Runs a grouped `launch` of `rows_per_matrix` pairs per local expert with each prefill kernel of `format` weights
/// and returns the two outputs (wgmma first).
fn both<T>(device: &Device, format: WeightFormat, rows_per_matrix: usize, launch: impl Fn() -> small4::Result<T>) -> small4::Result<(T, T)> {
    let name = kernel_format(format);
    Ok((
        run_on(device, PrefillGemm::Wgmma, &format!("moe_gemm_{name}{}_wgmma", width(rows_per_matrix)), &launch)?,
        run_on(device, PrefillGemm::MmaSync, &format!("moe_gemm_{name}_tiled"), &launch)?,
    ))
}

/// Runs a dense `launch` of `rows` rows and `format` weights with the TMA kernel, the gather kernel and mma.sync;
/// returns the TMA kernel's and mma.sync's outputs after checking that the gather kernel's equals the TMA kernel's bit
/// for bit (both wgmma: any device), untouched (NaN-poisoned) elements included.
fn dense_three<E: bytemuck::Pod>(
    device: &Device,
    format: WeightFormat,
    rows: usize,
    launch: impl Fn() -> small4::Result<Vec<E>>,
) -> small4::Result<(Vec<E>, Vec<E>)> {
    let (name, width) = (kernel_format(format), width(rows));
    let tma = run_on(device, PrefillGemm::Wgmma, &format!("moe_gemm_{name}{width}_wgmma_dense"), &launch)?;
    let gather = run_on(device, PrefillGemm::WgmmaGather, &format!("moe_gemm_{name}{width}_wgmma"), &launch)?;
    let (tma_bytes, gather_bytes): (&[u8], &[u8]) = (bytemuck::cast_slice(&tma), bytemuck::cast_slice(&gather));
    assert!(tma_bytes == gather_bytes, "{format}: the TMA and gather wgmma kernels differ");
    Ok((tma, run_on(device, PrefillGemm::MmaSync, &format!("moe_gemm_{name}_tiled"), &launch)?))
}

/// Bit-identical on the interpreter; both within the GEMM tests' rule of the reference everywhere.
fn check_pair(device: &Device, what: &str, wgmma: &[f32], mma_sync: &[f32], want: &[f32]) {
    if device.name() == "sim" {
        let differ = wgmma.iter().zip(mma_sync).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        assert_eq!(differ, 0, "{what}: {differ} of {} elements differ between wgmma and mma.sync", wgmma.len());
    }
    assert_agrees(&format!("{what} (wgmma)"), wgmma, want);
    assert_agrees(&format!("{what} (mma.sync)"), mma_sync, want);
}

struct Expert {
    gate_up: (QuantizedMatrix, QuantizedMatrix),
    down: QuantizedMatrix,
    /// Dequantised w1, w3 [hidden, dim] and w2 [down_out, down_k].
    w1: Vec<f32>,
    w3: Vec<f32>,
    w2: Vec<f32>,
}

fn random_expert(rng: &mut StdRng, format: WeightFormat, dim: usize, hidden: usize, down_k: usize, down_out: usize) -> Expert {
    let (q1, w1) = random_matrix(rng, format, hidden, dim);
    let (q3, w3) = random_matrix(rng, format, hidden, dim);
    let (q2, w2) = random_matrix(rng, format, down_out, down_k);
    Expert { gate_up: (q1, q3), down: q2, w1, w3, w2 }
}

/// A routed case of [`check_grouped`]: the up-projection [dim] -> [hidden] (SwiGLU of 2 x hidden packed rows), the
/// down-projection [down_k] -> [down_out], which reads the up-projection's output when `down_k == hidden` and its own
/// random rows otherwise (so both reductions can be long while the outputs stay one block wide).
#[derive(Clone, Copy)]
struct RoutedCase {
    format: WeightFormat,
    tokens: usize,
    k: usize,
    experts: usize,
    remote: usize,
    dim: usize,
    hidden: usize,
    down_k: usize,
    down_out: usize,
    seed: u64,
}

/// The 70-token case of [`grouped_gemms_equal_mma_sync`] (bf16: the planted-bug test's too).
const SMALL_CASE: RoutedCase =
    RoutedCase { format: WeightFormat::Bf16, tokens: 70, k: 4, experts: 8, remote: 1, dim: 256, hidden: 128, down_k: 128, down_out: 256, seed: 21 };

/// One routed case: `tokens` tokens pick `k` distinct experts of `experts` (the last `remote` owned by another GPU,
/// every seventh pair unrouted); the grouped up-projection (SwiGLU) and down-projection run with both kernels and are
/// checked against each other and the CPU reference.
/// A launch's error is returned (the planted-bug test expects some); a wrong result panics.
fn check_grouped(device: &Device, case: RoutedCase) -> small4::Result<()> {
    let RoutedCase { tokens, k, experts, remote, .. } = case;
    check_routed(device, case, |rng| RoutedBatch::random(rng, tokens, k, experts, remote))
}

/// [`check_grouped`] on the routing `route` makes (after the experts, from the case's seed); its tokens, top-k and
/// experts are the case's.
fn check_routed(device: &Device, case: RoutedCase, route: impl FnOnce(&mut StdRng) -> RoutedBatch) -> small4::Result<()> {
    let RoutedCase { format, tokens, k, experts, remote, dim, hidden, down_k, down_out, seed } = case;
    require_race_check(device);
    let mut rng = rng(seed);
    let local = experts - remote;
    let all: Vec<Expert> = (0..local).map(|_| random_expert(&mut rng, format, dim, hidden, down_k, down_out)).collect();
    let batch = route(&mut rng);
    assert_eq!((batch.tokens, batch.k), (tokens, k), "the routing is the case's");
    let (alignment, weights, capacity) = (&batch.alignment, &batch.weights, batch.capacity());

    let gate_up: Vec<(MatrixRef, MatrixRef)> = all.iter().map(|e| ((&e.gate_up.0).into(), (&e.gate_up.1).into())).collect();
    let down: Vec<MatrixRef> = all.iter().map(|e| (&e.down).into()).collect();
    let gate_up = DeviceWeights::upload(device, &repack::repack_gate_up(&gate_up).unwrap()).unwrap();
    let down = DeviceWeights::upload(device, &repack::repack_linear(&down).unwrap()).unwrap();
    let alignment_dev = DeviceAlignment::upload(device, alignment, batch.tile_m);
    let grouping = alignment_dev.grouping();
    let x = random_bf16(&mut rng, tokens * dim, 1.0);
    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let topk_weights = DeviceBuffer::from_slice(device, weights).unwrap();
    let slots = batch.routed_slots();
    let routed = slots.len();
    let rows_per_expert = tokens * k / local;

    // Up + SwiGLU: act [capacity, hidden] bf16, padding rows untouched (poison).
    let (act_wgmma, act_mma) = both(device, format, rows_per_expert, || {
        let act = DeviceBuffer::<bf16>::filled_with_byte(device, capacity * hidden, 0xff)?;
        moe::up_swiglu(&gate_up, x_dev.view([tokens, dim])?, k, &grouping, act.view([capacity, hidden])?)?;
        act.to_vec()
    })?;
    let rows_of = |act: &[bf16]| -> Vec<f32> { slots.iter().flat_map(|&s| to_f32(&act[s * hidden..][..hidden])).collect() };
    let silu = |v: f32| v / (1.0 + (-v).exp());
    let mut want_act = Vec::with_capacity(slots.len() * hidden);
    for &s in &slots {
        let e = &all[batch.slot_expert(s)];
        let token = alignment.sorted_pairs[s] as usize / k;
        let x_row = to_f32(&x[token * dim..][..dim]);
        let (gate, up) = (matmul_nt(&x_row, &e.w1, 1, dim, hidden), matmul_nt(&x_row, &e.w3, 1, dim, hidden));
        want_act.extend(gate.iter().zip(&up).map(|(&g, &u)| silu(g) * u));
    }
    let what = format!("{format} up+SwiGLU {tokens} tokens x top-{k} ({routed} routed rows) K {dim}");
    check_pair(device, &what, &rows_of(&act_wgmma), &rows_of(&act_mma), &want_act);
    for (name, act) in [("wgmma", &act_wgmma), ("mma.sync", &act_mma)] {
        let touched = batch.padding_slots().into_iter().any(|s| act[s * hidden..][..hidden].iter().any(|v| v.to_bits() != 0xffff));
        assert!(!touched, "{what} ({name}): a padding slot's row was written");
    }

    // Down x routing weight: pair_out [pairs, down_out] f32 from the wgmma kernel's act (so both kernels read the
    // same), or from random rows.
    let act = if down_k == hidden { act_wgmma } else { random_bf16(&mut rng, capacity * down_k, 1.0) };
    let act_dev = DeviceBuffer::from_slice(device, &act).unwrap();
    let (out_wgmma, out_mma) = both(device, format, rows_per_expert, || {
        let out = DeviceBuffer::<f32>::filled_with_byte(device, tokens * k * down_out, 0xff)?;
        moe::down(&down, act_dev.view([capacity, down_k])?, &grouping, topk_weights.view([tokens, k])?, out.view([tokens * k, down_out])?)?;
        out.to_vec()
    })?;
    let pairs_rows =
        |out: &[f32]| -> Vec<f32> { slots.iter().flat_map(|&s| out[alignment.sorted_pairs[s] as usize * down_out..][..down_out].to_vec()).collect() };
    let mut want_out = Vec::with_capacity(slots.len() * down_out);
    for &s in &slots {
        let pair = alignment.sorted_pairs[s] as usize;
        let act_row = to_f32(&act[s * down_k..][..down_k]);
        want_out.extend(matmul_nt(&act_row, &all[batch.slot_expert(s)].w2, 1, down_k, down_out).iter().map(|v| v * weights[pair]));
    }
    let what = format!("{format} down x weight {tokens} tokens x top-{k} ({routed} routed rows) K {down_k}");
    check_pair(device, &what, &pairs_rows(&out_wgmma), &pairs_rows(&out_mma), &want_out);
    // Pairs without a local expert are not written by either kernel.
    let unwritten = batch.unslotted_pairs();
    for (name, out) in [("wgmma", &out_wgmma), ("mma.sync", &out_mma)] {
        assert!(
            unwritten.iter().all(|&p| out[p * down_out..][..down_out].iter().all(|v| v.to_bits() == u32::MAX)),
            "{what} ({name}): an unrouted pair was written"
        );
    }
    Ok(())
}

/// 70 tokens x top-4 of 8 experts (one on another GPU, every seventh pair unrouted): 5 to 7 64-slot tiles, most with
/// padding, at dim 256 / hidden 128 (two blocks of 128 features each way), in bf16 (40 pairs per local expert: the
/// 64-slot kernels).
fn grouped_gemms_equal_mma_sync(device: &Device) {
    check_grouped(device, SMALL_CASE).unwrap();
}

/// The model's reduction lengths (up: K = dim 4096, 64 stages; down: K = hidden 2048, 32 stages: the 4-stage bf16
/// rings wrap 16 and 8 times, the 4-bit rings (8 stages, wide 6) 8 and 4 times or more) with 150 tokens x top-2 of 2
/// local experts and a remote one (about 86 slotted pairs per local expert, not a multiple of 64: wide blocks of two
/// 64-slot tiles, the second partial), output widths cut to one block (hidden 64, down out 128) to keep the
/// interpreter's time to the K loops that matter. `format`'s weights.
fn grouped_at_real_reduction_lengths(device: &Device, format: WeightFormat, seed: u64) {
    let case = RoutedCase { format, tokens: 150, k: 2, experts: 3, remote: 1, dim: 4096, hidden: 64, down_k: 2048, down_out: 128, seed };
    check_grouped(device, case).unwrap();
}

/// [`grouped_at_real_reduction_lengths`]'s shapes with 40 tokens (40 pairs per local expert, one 64-slot tile each):
/// the 64-slot kernels at K 4096 and 2048, in bf16.
fn grouped_narrow_at_real_reduction_lengths(device: &Device) {
    let case = RoutedCase { format: FORMATS[0], tokens: 40, k: 2, experts: 3, remote: 1, dim: 4096, hidden: 64, down_k: 2048, down_out: 128, seed: 31 };
    check_grouped(device, case).unwrap();
}

/// 400 tokens x top-2 of 2 local experts (about 343 slotted pairs each; 400 rows per expert on average, so the
/// 256-slot kernels): every expert takes two 256-slot blocks, the first with four full 64-slot tiles, the second
/// with two tiles, the last partial; at K 4096 and 2048 (the bf16 ring of 4 stages wraps 16 and 8 times, the
/// 4-bit ring of 5 about 13 and 6 times). `format`'s weights.
fn grouped_wide_groups_at_real_reduction_lengths(device: &Device, format: WeightFormat, seed: u64) {
    let case = RoutedCase { format, tokens: 400, k: 2, experts: 2, remote: 0, dim: 4096, hidden: 64, down_k: 2048, down_out: 128, seed };
    assert!(case.tokens * case.k / case.experts > WIDE256_MIN_ROWS, "the 256-slot kernels run");
    let mut rng = rng(seed);
    // The case's claim, on the alignment check_grouped builds from the same seed: both experts span two 256-slot
    // blocks, the second partial.
    let _experts: Vec<Expert> = (0..2).map(|_| random_expert(&mut rng, format, case.dim, case.hidden, case.down_k, case.down_out)).collect();
    let batch = RoutedBatch::random(&mut rng, case.tokens, case.k, case.experts, case.remote);
    let slots = batch.routed_slots();
    let counts: Vec<usize> = (0..case.experts).map(|e| slots.iter().filter(|&&s| batch.slot_expert(s) == e).count()).collect();
    assert!(counts.iter().all(|&c| c > 256 && c % 256 != 0), "each expert spans two 256-slot blocks, the second partial: {counts:?}");
    check_grouped(device, case).unwrap();
}

/// [`grouped_wide_groups_at_real_reduction_lengths`] in bf16.
fn grouped_wide_groups_bf16(device: &Device) {
    grouped_wide_groups_at_real_reduction_lengths(device, FORMATS[0], 32);
}

/// [`grouped_wide_groups_at_real_reduction_lengths`] in nvfp4.
fn grouped_wide_groups_nvfp4(device: &Device) {
    grouped_wide_groups_at_real_reduction_lengths(device, FORMATS[3], 33);
}

/// Persistent walks over uneven experts: 9 local experts with 0, 150, 0, 40, 64, 1, 0, 65 and 0 pairs before every
/// seventh pair is unrouted (empty experts first, between and last; an expert of three 64-slot groups, the last
/// partial; single-pair and near-full groups), 160 tokens x top-2 (35 pairs per expert on average: the 64-slot
/// kernels), at K 4096 and 2048 with one 128-feature tile each way, so the launch's work tiles are the experts'
/// groups (7 or 8). The grid is capped at two blocks ([`with_persistent_blocks`]): each walks three or four groups,
/// the ring's phases and the tile tables carried across them. Against mma.sync and the reference. `format`'s weights.
fn grouped_persistent_uneven_experts(device: &Device, format: WeightFormat, seed: u64) {
    let counts = [0, 150, 0, 40, 64, 1, 0, 65, 0];
    let case = RoutedCase { format, tokens: 160, k: 2, experts: counts.len(), remote: 0, dim: 4096, hidden: 64, down_k: 2048, down_out: 128, seed };
    assert!(case.tokens * case.k / case.experts <= WIDE_MIN_ROWS, "the 64-slot kernels run");
    with_persistent_blocks(NonZeroU32::new(2).unwrap(), || check_routed(device, case, |rng| RoutedBatch::from_counts(rng, &counts, case.k, 0))).unwrap();
}

/// [`grouped_persistent_uneven_experts`] in bf16.
fn grouped_persistent_uneven_experts_bf16(device: &Device) {
    grouped_persistent_uneven_experts(device, FORMATS[0], 37);
}

/// [`grouped_persistent_uneven_experts`] in nvfp4.
fn grouped_persistent_uneven_experts_nvfp4(device: &Device) {
    grouped_persistent_uneven_experts(device, FORMATS[3], 38);
}

/// [`grouped_wide_groups_at_real_reduction_lengths`] (bf16) on one persistent block: it walks both experts' two
/// 256-slot groups (four tiles, the second of each expert partial), its producer warpgroup at 48 registers.
fn grouped_persistent_wide256_one_block(device: &Device) {
    with_persistent_blocks(NonZeroU32::new(1).unwrap(), || grouped_wide_groups_at_real_reduction_lengths(device, FORMATS[0], 32));
}

/// [`grouped_at_real_reduction_lengths`] in bf16.
fn grouped_gemms_at_real_reduction_lengths(device: &Device) {
    grouped_at_real_reduction_lengths(device, FORMATS[0], 22);
}

/// [`grouped_at_real_reduction_lengths`] in int4, group 128, symmetric (zero 8).
fn grouped_int4_at_real_reduction_lengths(device: &Device) {
    grouped_at_real_reduction_lengths(device, FORMATS[1], 25);
}

/// [`grouped_at_real_reduction_lengths`] in int4, group 128, with a zero point per group.
fn grouped_int4_zero_point_at_real_reduction_lengths(device: &Device) {
    grouped_at_real_reduction_lengths(device, FORMATS[2], 26);
}

/// [`grouped_at_real_reduction_lengths`] in nvfp4 (its global divisor applied per row in the epilogue).
fn grouped_nvfp4_at_real_reduction_lengths(device: &Device) {
    grouped_at_real_reduction_lengths(device, FORMATS[3], 27);
}

/// The dense GEMMs on the prefill tile (more than 32 rows) in every format with a wgmma kernel: bf16, f32 and SwiGLU
/// outputs into strided views, and the batched per-head launch (grid z: the TMA map's third dimension), each with the
/// three kernels (wgmma with TMA, wgmma with the gather, mma.sync). K 384 (6 stages) wraps the bf16 ring; the per-head
/// K 128 does not ([`dense_gemms_at_real_reduction_lengths`] wraps the 4-bit one). 40 rows (64-slot kernels: the
/// block's rows 40..63 are out of bounds, TMA zero fill) in bf16 and int4 with zero points, 150 rows (192-slot
/// kernels: a block of two full 64-slot tiles and a partial one, rows 150..191 out of bounds) in int4, 200 rows
/// (256-slot kernels: a block of three full 64-slot tiles and a partial one, rows 200..255 out of bounds) in bf16 and
/// nvfp4.
fn dense_gemms_equal_mma_sync(device: &Device) {
    for ((format, seed), rows) in FORMATS.into_iter().zip(23..).zip([[40, 200].as_slice(), &[150], &[40], &[200]]) {
        for &rows in rows {
            check_dense(device, format, seed, rows);
        }
    }
}

fn check_dense(device: &Device, format: WeightFormat, seed: u64, rows: usize) {
    require_race_check(device);
    let mut rng = rng(seed);
    let (in_dim, out_dim) = (384, 200);
    let (w, deq) = random_matrix(&mut rng, format, out_dim, in_dim);
    let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
    let x = random_bf16(&mut rng, rows * in_dim, 1.0);
    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let want = matmul_nt(&to_f32(&x), &deq, rows, in_dim, out_dim);

    // bf16 into columns 8.. of rows of 216.
    let (y_wgmma, y_mma) = dense_three(device, format, rows, || {
        let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * 216, 0xff)?;
        dense::linear(&weights, x_dev.view([rows, in_dim])?, y.view([rows, 216])?.columns(8..8 + out_dim)?)?;
        y.to_vec()
    })
    .unwrap();
    let cols = |y: &[bf16]| -> Vec<f32> { (0..rows).flat_map(|r| to_f32(&y[r * 216 + 8..][..out_dim])).collect() };
    check_pair(device, &format!("{format} dense bf16 out"), &cols(&y_wgmma), &cols(&y_mma), &want);
    assert!(y_wgmma.iter().enumerate().all(|(i, v)| (8..8 + out_dim).contains(&(i % 216)) || v.to_bits() == 0xffff), "wrote outside its columns");

    let (f_wgmma, f_mma) = dense_three(device, format, rows, || {
        let y = DeviceBuffer::<f32>::filled_with_byte(device, rows * out_dim, 0xff)?;
        dense::linear_f32(&weights, x_dev.view([rows, in_dim])?, y.view([rows, out_dim])?, None)?;
        y.to_vec()
    })
    .unwrap();
    check_pair(device, &format!("{format} dense f32 out"), &f_wgmma, &f_mma, &want);

    let hidden = 96;
    let (w1, d1) = random_matrix(&mut rng, format, hidden, in_dim);
    let (w3, d3) = random_matrix(&mut rng, format, hidden, in_dim);
    let gate_up = DeviceWeights::upload(device, &repack::repack_gate_up(&[((&w1).into(), (&w3).into())]).unwrap()).unwrap();
    let (a_wgmma, a_mma) = dense_three(device, format, rows, || {
        let act = DeviceBuffer::<bf16>::filled_with_byte(device, rows * hidden, 0xff)?;
        dense::linear_swiglu(&gate_up, x_dev.view([rows, in_dim])?, act.view([rows, hidden])?, None)?;
        act.to_vec()
    })
    .unwrap();
    let (g, u) = (matmul_nt(&to_f32(&x), &d1, rows, in_dim, hidden), matmul_nt(&to_f32(&x), &d3, rows, in_dim, hidden));
    let want_act: Vec<f32> = g.iter().zip(&u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u).collect();
    check_pair(device, &format!("{format} dense SwiGLU"), &to_f32(&a_wgmma), &to_f32(&a_mma), &want_act);

    // Four heads of [64, 128] over 136-wide head inputs (the GEMM reads the first 128 of each).
    let (heads, head_in, k_dim, head_out) = (4, 136, 128, 64);
    let mats: Vec<(QuantizedMatrix, Vec<f32>)> = (0..heads).map(|_| random_matrix(&mut rng, format, head_out, k_dim)).collect();
    let per_head = DeviceWeights::upload(device, &repack::repack_linear(&mats.iter().map(|(q, _)| q.into()).collect::<Vec<MatrixRef>>()).unwrap()).unwrap();
    let xh = random_bf16(&mut rng, rows * heads * head_in, 1.0);
    let xh_dev = DeviceBuffer::from_slice(device, &xh).unwrap();
    let (h_wgmma, h_mma) = dense_three(device, format, rows, || {
        let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * heads * head_out, 0xff)?;
        dense::linear_per_head(&per_head, xh_dev.view([rows, heads, head_in])?, y.view([rows, heads, head_out])?, None)?;
        y.to_vec()
    })
    .unwrap();
    for (h, (_, deq)) in mats.iter().enumerate() {
        let x_h: Vec<f32> = (0..rows).flat_map(|r| to_f32(&xh[(r * heads + h) * head_in..][..k_dim])).collect();
        let want = matmul_nt(&x_h, deq, rows, k_dim, head_out);
        let head = |y: &[bf16]| -> Vec<f32> { (0..rows).flat_map(|r| to_f32(&y[(r * heads + h) * head_out..][..head_out])).collect() };
        check_pair(device, &format!("{format} per-head head {h}"), &head(&h_wgmma), &head(&h_mma), &want);
    }
}

/// Dense GEMMs at the model's reduction lengths (K = 4096 and 2048: the 4-stage bf16 ring wraps 16 and 8 times, the
/// 8-stage 4-bit ring 8 and 4 times) with `rows` rows (70: one wide block of two 64-slot tiles, the second's TMA box
/// reading 58 rows out of bounds, zero-filled; 40: the 64-slot kernels; 260: the 256-slot kernels, a block of four
/// full 64-slot tiles and one of a single tile whose box reads 60 rows out of bounds), one 128-feature block wide, rows 16-byte
/// strided wider than K; the TMA kernel against the gather kernel and mma.sync, and all against the reference.
/// `format`'s weights.
fn dense_at_real_reduction_lengths(device: &Device, format: WeightFormat, seed: u64, rows: usize) {
    dense_at_real_reduction_lengths_wide(device, format, seed, rows, 128);
}

/// [`dense_at_real_reduction_lengths`] with `out_dim` output features (a multiple of 128: that many 128-feature tiles).
fn dense_at_real_reduction_lengths_wide(device: &Device, format: WeightFormat, seed: u64, rows: usize, out_dim: usize) {
    require_race_check(device);
    let mut rng = rng(seed);
    for k_dim in [4096, 2048] {
        let (w, deq) = random_matrix(&mut rng, format, out_dim, k_dim);
        let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        let x_stride = k_dim + 8;
        let x = random_bf16(&mut rng, rows * x_stride, 1.0);
        let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
        let x_rows: Vec<f32> = (0..rows).flat_map(|r| to_f32(&x[r * x_stride..][..k_dim])).collect();
        let want = matmul_nt(&x_rows, &deq, rows, k_dim, out_dim);
        let (y_tma, y_mma) = dense_three(device, format, rows, || {
            let y = DeviceBuffer::<f32>::filled_with_byte(device, rows * out_dim, 0xff)?;
            dense::linear_f32(&weights, x_dev.view([rows, x_stride])?.columns(0..k_dim)?, y.view([rows, out_dim])?, None)?;
            y.to_vec()
        })
        .unwrap();
        check_pair(device, &format!("{format} dense f32 K {k_dim}"), &y_tma, &y_mma, &want);
    }
}

/// Persistent dense walks on a grid capped at two blocks ([`with_persistent_blocks`]), at K 4096 and 2048, 512 output
/// features (four 128-feature tiles, the fastest index of the tile space), so each block walks two tiles: bf16 over
/// 100 rows (the 192-slot kernels: one row block of two 64-slot tiles, the second's box reading 28 rows out of
/// bounds, zero-filled) and int4 with zero points over 40 rows (the 64-slot kernels, 24 rows out of bounds).
fn dense_persistent_at_real_reduction_lengths(device: &Device) {
    with_persistent_blocks(NonZeroU32::new(2).unwrap(), || {
        dense_at_real_reduction_lengths_wide(device, FORMATS[0], 39, 100, 512);
        dense_at_real_reduction_lengths_wide(device, FORMATS[2], 40, 40, 512);
    });
}

/// A persistent batched launch: 3 heads of [256, 128] (two 128-feature tiles each) over 300 rows (the 256-slot
/// kernels: two row blocks, the second of 44 rows), one block per head walking its four tiles with two k blocks each
/// (fewer than the ring's cp.async groups in flight: the gather drains each tile's copies before the next tile's
/// table), bf16 and nvfp4; the three kernels against each other and the reference per head.
fn dense_persistent_batched_heads(device: &Device) {
    require_race_check(device);
    let (heads, rows, k_dim, head_out) = (3, 300, 128, 256);
    for (format, seed) in [(FORMATS[0], 41), (FORMATS[3], 42)] {
        let mut rng = rng(seed);
        let mats: Vec<(QuantizedMatrix, Vec<f32>)> = (0..heads).map(|_| random_matrix(&mut rng, format, head_out, k_dim)).collect();
        let per_head = DeviceWeights::upload(device, &repack::repack_linear(&mats.iter().map(|(q, _)| q.into()).collect::<Vec<MatrixRef>>()).unwrap()).unwrap();
        let xh = random_bf16(&mut rng, rows * heads * k_dim, 1.0);
        let xh_dev = DeviceBuffer::from_slice(device, &xh).unwrap();
        let (h_wgmma, h_mma) = with_persistent_blocks(NonZeroU32::new(1).unwrap(), || {
            dense_three(device, format, rows, || {
                let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * heads * head_out, 0xff)?;
                dense::linear_per_head(&per_head, xh_dev.view([rows, heads, k_dim])?, y.view([rows, heads, head_out])?, None)?;
                y.to_vec()
            })
        })
        .unwrap();
        for (h, (_, deq)) in mats.iter().enumerate() {
            let x_h: Vec<f32> = (0..rows).flat_map(|r| to_f32(&xh[(r * heads + h) * k_dim..][..k_dim])).collect();
            let want = matmul_nt(&x_h, deq, rows, k_dim, head_out);
            let head = |y: &[bf16]| -> Vec<f32> { (0..rows).flat_map(|r| to_f32(&y[(r * heads + h) * head_out..][..head_out])).collect() };
            check_pair(device, &format!("{format} persistent per-head head {h}"), &head(&h_wgmma), &head(&h_mma), &want);
        }
    }
}

/// A window of a persistent walk (`with_walk_window`, the timing model's way to run every block of a persistent grid
/// over its first tiles): a dense launch of 40 rows into 512 features (four 128-feature tiles, one 64-slot row
/// block), bf16 weights, on both wgmma kernels (TMA and gather). One block asking 2 tiles, and two blocks asking 1
/// each, compute the walk's first two tiles (features 0-255) bit for bit as the whole walk does and write nothing
/// else; the window each launch ran is reported; a window past the walk's end runs the whole walk.
fn dense_walk_window_runs_the_first_tiles(device: &Device) {
    require_race_check(device);
    let mut rng = rng(43);
    let (rows, k_dim, out_dim) = (40, 128, 512);
    let (w, _) = random_matrix(&mut rng, WeightFormat::Bf16, out_dim, k_dim);
    let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
    let x_dev = DeviceBuffer::from_slice(device, &random_bf16(&mut rng, rows * k_dim, 1.0)).unwrap();
    let run = || -> small4::Result<Vec<f32>> {
        let y = DeviceBuffer::<f32>::filled_with_byte(device, rows * out_dim, 0xff)?;
        dense::linear_f32(&weights, x_dev.view([rows, k_dim])?, y.view([rows, out_dim])?, None)?;
        y.to_vec()
    };
    for (choice, kernel) in [(PrefillGemm::Wgmma, "moe_gemm_bf16_wgmma_dense"), (PrefillGemm::WgmmaGather, "moe_gemm_bf16_wgmma")] {
        let whole = choice.run(|| with_persistent_blocks(NonZeroU32::new(1).unwrap(), run)).unwrap();
        assert!(whole.iter().all(|v| v.to_bits() != u32::MAX), "{kernel}: the whole walk left outputs unwritten");
        for (blocks, tiles_per_block) in [(1, 2), (2, 1)] {
            let cap = |n: u32| NonZeroU32::new(n).unwrap();
            let (window, windows) = choice.run(|| with_persistent_blocks(cap(blocks), || with_walk_window(cap(tiles_per_block), run)));
            let window = window.unwrap();
            let want = WalkWindow { kernel, blocks, tiles: 2, feature_tiles: 4, slots_per_tile: 64 };
            assert_eq!(windows, [want], "{kernel}, {blocks} blocks");
            assert_eq!(want.windows_in(4), 2.0);
            for (i, (&got, &all)) in window.iter().zip(&whole).enumerate() {
                let in_window = i % out_dim < 256;
                assert_eq!(got.to_bits(), if in_window { all.to_bits() } else { u32::MAX }, "{kernel}, {blocks} blocks: element {i}");
            }
        }
        let (past_end, windows) = choice.run(|| with_walk_window(NonZeroU32::new(8).unwrap(), run));
        assert_eq!(past_end.unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(), whole.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
        assert_eq!(windows.len(), 1);
        assert_eq!(windows[0].windows_in(4), 1.0, "a window holding the whole walk");
    }
}

/// [`dense_at_real_reduction_lengths`] in bf16.
fn dense_gemms_at_real_reduction_lengths(device: &Device) {
    dense_at_real_reduction_lengths(device, FORMATS[0], 25, 70);
}

/// [`dense_at_real_reduction_lengths`] in nvfp4 (the 8-stage ring of the 4-bit formats, whose TMA stages expect
/// 4 KiB of weights beside the 8 KiB box; its global divisor applied per row in the epilogue).
fn dense_nvfp4_at_real_reduction_lengths(device: &Device) {
    dense_at_real_reduction_lengths(device, FORMATS[3], 28, 70);
    dense_at_real_reduction_lengths(device, FORMATS[3], 34, 40);
}

/// [`dense_at_real_reduction_lengths`] on the 256-slot kernels (260 rows) in bf16 (4-stage ring, 4 boxes a stage).
fn dense_wide256_at_real_reduction_lengths(device: &Device) {
    dense_at_real_reduction_lengths(device, FORMATS[0], 35, 260);
}

/// [`dense_at_real_reduction_lengths`] on the 256-slot kernels (260 rows) in int4 with zero points (the 5-stage
/// 4-bit ring, scales and zero points staged beside the weights).
fn dense_wide256_int4_at_real_reduction_lengths(device: &Device) {
    dense_at_real_reduction_lengths(device, FORMATS[2], 36, 260);
}

backend_tests!(
    grouped_gemms_equal_mma_sync,
    grouped_gemms_at_real_reduction_lengths,
    grouped_int4_at_real_reduction_lengths,
    grouped_int4_zero_point_at_real_reduction_lengths,
    grouped_nvfp4_at_real_reduction_lengths,
    grouped_narrow_at_real_reduction_lengths,
    grouped_wide_groups_bf16,
    grouped_wide_groups_nvfp4,
    dense_gemms_equal_mma_sync,
    dense_gemms_at_real_reduction_lengths,
    dense_nvfp4_at_real_reduction_lengths,
    dense_wide256_at_real_reduction_lengths,
    dense_wide256_int4_at_real_reduction_lengths,
    grouped_persistent_uneven_experts_bf16,
    grouped_persistent_uneven_experts_nvfp4,
    grouped_persistent_wide256_one_block,
    dense_persistent_at_real_reduction_lengths,
    dense_persistent_batched_heads,
    dense_walk_window_runs_the_first_tiles
);

/// The dense TMA launch encodes its activations' tensor map once per buffer and shape: a second launch on the same
/// rows encodes none (and computes the same), a launch on another buffer or on fewer rows of the same one encodes its own.
#[test]
fn dense_tma_launch_reuses_its_tensor_map() {
    let counted = small4::device::Instrumented::wrap(small4::device::simulator());
    let device: Device = counted.clone();
    let mut rng = rng(29);
    let (rows, in_dim, out_dim) = (40, 128, 128);
    let (w, _) = random_matrix(&mut rng, WeightFormat::Bf16, out_dim, in_dim);
    let weights = DeviceWeights::upload(&device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
    let x = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, rows * in_dim, 1.0)).unwrap();
    let other_x = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, rows * in_dim, 1.0)).unwrap();
    let y = DeviceBuffer::<f32>::alloc(&device, rows * out_dim).unwrap();
    let launch = |x: &DeviceBuffer<bf16>, rows: usize| -> Vec<f32> {
        run_on(&device, PrefillGemm::Wgmma, "moe_gemm_bf16_wgmma_dense", || {
            dense::linear_f32(&weights, x.view([rows, in_dim])?, y.view([rows, out_dim])?, None)?;
            y.to_vec()
        })
        .unwrap()
    };
    let encoded = || counted.counts().tensor_maps_encoded;
    let first = launch(&x, rows);
    assert_eq!(encoded(), 1);
    assert_eq!(launch(&x, rows), first, "the reused map loads the same rows");
    assert_eq!(encoded(), 1, "a second launch on the same buffer and shape reuses the map");
    launch(&other_x, rows);
    assert_eq!(encoded(), 2, "another buffer gets its own map");
    launch(&x, rows - 4);
    assert_eq!(encoded(), 3, "fewer rows of the same buffer get their own map");
    launch(&x, rows);
    assert_eq!(encoded(), 3, "the first map is still kept");
}

/// The 4-bit wgmma kernels' k loop waits on no global load: the producer stages each stage's scales in the ring with its
/// weights (one bulk copy per tile and piece, in the stage's transaction bytes), so the longest warp's dependence chain
/// of a K = 4096 launch (64 stages) holds at most [`CHAIN_GLOBAL_LOADS`] global loads, where reading the scales from
/// global memory in the loop put one or two per stage on it (96 for int4 with zero points, TMA kernel). Dense launches
/// (TMA and gather), one block.
#[test]
fn wgmma_4bit_k_loop_has_no_global_loads_on_its_chain() {
    let device = small4::device::simulator();
    let mut rng = rng(30);
    let (rows, k_dim, out_dim) = (64, 4096, 128);
    let x = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, rows * k_dim, 1.0)).unwrap();
    let y = DeviceBuffer::<f32>::alloc(&device, rows * out_dim).unwrap();
    for format in [FORMATS[2], FORMATS[3]] {
        let (w, _) = random_matrix(&mut rng, format, out_dim, k_dim);
        let weights = DeviceWeights::upload(&device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        for choice in [PrefillGemm::Wgmma, PrefillGemm::WgmmaGather] {
            choice.run(|| dense::linear_f32(&weights, x.view([rows, k_dim])?, y.view([rows, out_dim])?, None)).unwrap();
            let c = device.last_launch_counters().unwrap();
            println!("{format} {}: {} global loads on the longest chain", c.kernel, c.timing.chain_globals_max);
            assert!(
                c.timing.chain_globals_max <= CHAIN_GLOBAL_LOADS,
                "{format} {}: {} global loads on the longest chain",
                c.kernel,
                c.timing.chain_globals_max
            );
        }
    }
}

/// The most global loads [`wgmma_4bit_k_loop_has_no_global_loads_on_its_chain`] allows on a launch's longest chain: what
/// the kernels show with staged scales (0-1, none of them per stage).
const CHAIN_GLOBAL_LOADS: u64 = 1;

/// The interpreter's checks are live on this kernel: each planted bug (an edit of the kernel's own PTX) makes the
/// grouped up-projection fail with the hazard's report, where the unedited kernel passes.
#[test]
fn planted_bugs_in_the_wgmma_kernel_are_reported() {
    let original = small4::kernels::modules::MOE_GEMM_WGMMA.ptx;
    let bulk_expect_tx = regex_free_replace(original, "mbarrier.arrive.expect_tx.shared::cta.b64 _, [", "], %r", "], 32768;");
    let cases: [(&'static str, String, &str); 4] = [
        // The producer's cp.async activation rows reach wgmma (the async proxy) without fence.proxy.async.
        ("no_proxy_fence", without_proxy_fences(original), "no fence.proxy.async"),
        // wait_group 2 leaves the previous stage's wgmmas in flight while their A registers are reloaded.
        ("wait_group_2", original.replace("wgmma.wait_group.sync.aligned 1;", "wgmma.wait_group.sync.aligned 2;"), "accessed before the wgmma.wait_group"),
        // Twice the weight bytes expected: the full barrier's phase never completes.
        ("double_expect_tx", bulk_expect_tx, "deadlock"),
        // Nobody waits on a barrier: the consumers read stages before anything landed there.
        ("no_waits", without_mbarrier_waits(original), "read of uninitialised shared memory"),
    ];
    let run = |device: &Device| check_grouped(device, SMALL_CASE);
    for (name, ptx, expected) in cases {
        assert_reported(name, run(&Planted::edited(small4::kernels::modules::MOE_GEMM_WGMMA, "moe_gemm_bf16_wgmma", name, ptx)), expected);
    }
    let unedited = Planted::unedited(small4::kernels::modules::MOE_GEMM_WGMMA, "moe_gemm_bf16_wgmma");
    run(&unedited).unwrap();
}

/// The interpreter's counters of the prefill kernels at the model's sizes (up + SwiGLU: K = dim 4096 into 2048
/// hidden; down: K = 2048 into dim 4096), 64 tokens routed to both of 2 experts (one full 64-slot tile each, 64
/// blocks per launch), and a dense GEMM of the down-projection's shape over 100 rows (mma.sync, wgmma with the
/// gather, wgmma with TMA), 8 evenly spaced blocks interpreted per launch, for bf16, int4 (group 128) and nvfp4 weights
/// (`SMALL4_COUNTER_FORMATS=int4,nvfp4` picks some). Prints one Markdown row per launch for docs/perf.md:
/// `cargo test --test moe_wgmma prefill_counters -- --ignored --nocapture`.
#[test]
#[ignore]
fn prefill_counters_at_real_dims() {
    let formats: Vec<WeightFormat> = match std::env::var("SMALL4_COUNTER_FORMATS") {
        Ok(list) => list.split(',').map(|f| f.parse().unwrap()).collect(),
        Err(_) => vec![FORMATS[0], FORMATS[1], FORMATS[3]],
    };
    println!("| launch | kernel | blocks run / grid | warp instructions | shared requests | bank-conflict wavefronts | global bytes read | tensor instructions | tensor FLOPs |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for format in formats {
        print_prefill_counters(format);
    }
}

fn print_prefill_counters(format: WeightFormat) {
    let sim = std::sync::Arc::new(small4::device::sim::SimBackend::new());
    let device: Device = sim.clone();
    sim.set_block_sample(Some(8));
    let (dim, hidden, tokens, k) = (4096, 2048, 64, 2);
    let mut rng = rng(24);
    let all: Vec<Expert> = (0..2).map(|_| random_expert(&mut rng, format, dim, hidden, hidden, dim)).collect();
    let gate_up: Vec<(MatrixRef, MatrixRef)> = all.iter().map(|e| ((&e.gate_up.0).into(), (&e.gate_up.1).into())).collect();
    let down: Vec<MatrixRef> = all.iter().map(|e| (&e.down).into()).collect();
    let gate_up = DeviceWeights::upload(&device, &repack::repack_gate_up(&gate_up).unwrap()).unwrap();
    let down = DeviceWeights::upload(&device, &repack::repack_linear(&down).unwrap()).unwrap();
    let ids: Vec<i32> = (0..tokens * k).map(|p| (p % k) as i32).collect();
    let alignment = align_pairs(&ids, None, 2, 64);
    let alignment_dev = DeviceAlignment::upload(&device, &alignment, 64);
    let grouping = alignment_dev.grouping();
    let capacity = alignment.sorted_pairs.len();
    let x = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, tokens * dim, 1.0)).unwrap();
    let act = DeviceBuffer::<bf16>::alloc(&device, capacity * hidden).unwrap();
    let out = DeviceBuffer::<f32>::alloc(&device, tokens * k * dim).unwrap();
    let weights = DeviceBuffer::from_slice(&device, &vec![0.5f32; tokens * k]).unwrap();
    // A dense GEMM of the down-projection's shape: 100 rows (the second row block's TMA boxes read 28 rows out of
    // bounds) of K = hidden 2048 into dim 4096 features, f32 out: 32 feature blocks x 2 row blocks.
    let dense_rows = 100;
    let dense_w = DeviceWeights::upload(&device, &repack::repack_linear(&[(&random_matrix(&mut rng, format, dim, hidden).0).into()]).unwrap()).unwrap();
    let dense_x = DeviceBuffer::from_slice(&device, &random_bf16(&mut rng, dense_rows * hidden, 1.0)).unwrap();
    let dense_y = DeviceBuffer::<f32>::alloc(&device, dense_rows * dim).unwrap();
    for choice in [PrefillGemm::MmaSync, PrefillGemm::WgmmaGather, PrefillGemm::Wgmma] {
        for launch in ["up + SwiGLU (K 4096)", "down x weight (K 2048)", "dense f32 (K 2048, 100 rows)"] {
            if choice == PrefillGemm::WgmmaGather && !launch.starts_with("dense") {
                continue; // grouped launches gather with either choice
            }
            choice
                .run(|| match &launch[..2] {
                    "up" => moe::up_swiglu(&gate_up, x.view([tokens, dim])?, k, &grouping, act.view([capacity, hidden])?),
                    "do" => moe::down(&down, act.view([capacity, hidden])?, &grouping, weights.view([tokens, k])?, out.view([tokens * k, dim])?),
                    _ => dense::linear_f32(&dense_w, dense_x.view([dense_rows, hidden])?, dense_y.view([dense_rows, dim])?, None),
                })
                .unwrap();
            let c = device.last_launch_counters().unwrap();
            println!("| {launch} | {} |", counter_cells(&c));
        }
    }
}
