//! The fp8 tensor-core prefill kernels (`cuda/moe_gemm_wgmma_fp8.cu`: `moe_gemm_{fp8,fp8_block}_wgmma_a8`, wgmma
//! m64n64k32 e4m3 with the activations quantised on the fly by `moe_quantize_act_e4m3_block128`), chosen with
//! `PrefillGemm::WgmmaFp8Act`, against the CPU reference `reference::fp8_gemm`:
//! - the operand layout: the repacked weight fragments after the kernel's byte permutes, read with wgmma's 8-bit
//!   register-A formula, and the quantiser's permuted activation bytes, read as wgmma's K-major B, pair every weight
//!   column with the same activation column (brute force over every lane, register and byte);
//! - the quantiser bit for bit (codes and scales, strided rows, all-zero blocks);
//! - the GEMMs on data whose partial sums are exact in every summation order and every tensor-core rounding model
//!   (integer e4m3 codes, one 448 per activation block so its scale is a power of two, power-of-two weight scales:
//!   ../shared/HOPPER-ASYNC.md §1.6 keeps 13 fraction bits, and every partial here is an integer below 2^14), so the
//!   kernel equals the reference bit for bit (the SwiGLU act up to the device's `__expf` and the bf16 rounding): a
//!   wrong scale index, k order or slot mapping shows as a mismatch. Per-tensor and block-128 weights; dense (f32 and
//!   bf16 outputs, strided input rows, a row tail) and grouped (up + SwiGLU, down x routing weight; padding slots,
//!   unrouted and remote pairs), at the model's K = 4096 and 2048 (the 4-stage ring wraps 8 and 4 times);
//! - the persistent walk (`with_persistent_blocks`): grouped launches over uneven experts (empty ones first, between
//!   and last, an expert of several 64-slot groups, a partial group) on two blocks that walk 3-4 tiles each, and dense
//!   walks of four tiles on one block (K 640: each tile starts the ring at another stage and phase; K 4096), bit for
//!   bit the reference and the launches with one tile per block;
//! - planted bugs: a shifted activation-scale index (a wrong result), a missing proxy fence and an early
//!   wait_group (the interpreter's reports).
//!
//! The interpreter runs every check here (bounds, uninitialised reads, races through mbarrier happens-before,
//! async-proxy fences, wgmma operand lifetimes).

mod common;

use common::routing::{DeviceAlignment, RoutedBatch};
use common::*;
use half::bf16;
use rand::{rngs::StdRng, Rng};
use small4::device::{Device, DeviceBuffer};
use small4::kernels::dense;
use small4::kernels::gemm::DeviceWeights;
use small4::kernels::moe;
use small4::kernels::moe_wgmma::{with_persistent_blocks, PrefillGemm};
use small4::kernels::moe_wgmma_fp8::quantize_act_e4m3_block128;
use small4::quant::repack::{self, MatrixRef};
use small4::quant::{e4m3_to_f32, f32_to_e4m3, Fp8Block128, Fp8PerTensor, QuantizedMatrix, WeightFormat};
use small4::reference::fp8_gemm::{gemm_a8, permuted_column, quantize_act_block128, QuantizedActs};
use small4::reference::moe::align_pairs;
use std::num::NonZeroU32;

const FORMATS: [WeightFormat; 2] = [WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128];

/// The kernel the switch must pick for `format`.
fn entry(format: WeightFormat) -> &'static str {
    match format {
        WeightFormat::Fp8PerTensor => "moe_gemm_fp8_wgmma_a8",
        WeightFormat::Fp8Block128 => "moe_gemm_fp8_block_wgmma_a8",
        other => panic!("no fp8-activation kernel for {other}"),
    }
}

/// Runs `launch` with the fp8-activation kernels chosen and checks that `format`'s GEMM ran.
fn run_a8<T>(device: &Device, format: WeightFormat, launch: impl Fn() -> small4::Result<T>) -> small4::Result<T> {
    let out = PrefillGemm::WgmmaFp8Act.run(&launch)?;
    if let Some(counters) = device.last_launch_counters() {
        assert_eq!(counters.kernel, entry(format), "the switch picked the kernel");
    }
    Ok(out)
}

/// `__byte_perm(x, y, selector)` for selectors without sign replication: byte i of the result is byte
/// (selector >> 4 i) & 7 of y:x.
fn byte_perm(x: u32, y: u32, selector: u32) -> u32 {
    let bytes = (u64::from(y) << 32) | u64::from(x);
    (0..4).map(|i| (((bytes >> (8 * ((selector >> (4 * i)) & 7))) & 0xff) as u32) << (8 * i)).sum()
}

/// Every byte of the A registers the kernel builds (its 16-byte weight chunks, then weight_format.cuh
/// fp8_weights_to_e4m3_a's permutes) sits, by wgmma's 8-bit register-A formula, at a (row, col) whose weight is
/// W[row, 32 j + permuted_column(col)]; and the quantiser's byte col of a 32-k step (wgmma's K-major B reads byte col
/// of the step as k = col) holds activation column permuted_column(col) of the step. So both operands carry the same
/// permutation of each 16 k, and the wgmma sums are the dot products.
#[test]
fn operand_layouts_pair_the_same_columns() {
    let (rows, cols) = (16, 128);
    // Distinct codes per (row, col) where possible: the value identifies the element.
    let codes: Vec<u8> = (0..rows * cols).map(|i| ((i * 37 + i / 128 * 11) % 254) as u8).collect();
    let m = MatrixRef { rows, cols, data: repack::QuantData::Fp8 { data: &codes, scale: 1.0 } };
    let packed = repack::repack_linear(&[m]).unwrap();
    for lane in 0..32 {
        let (g, q) = (lane / 4, lane % 4);
        for j in 0..4 {
            // The kernel's load: 16 bytes at (j * 32 + lane) * 16 of the warp's two consecutive 64-k tiles.
            let at = (j * 32 + lane) * 16;
            let w: Vec<u32> = (0..4).map(|i| u32::from_le_bytes(packed.data[at + 4 * i..at + 4 * i + 4].try_into().unwrap())).collect();
            let a = [byte_perm(w[0], w[1], 0x5410), byte_perm(w[0], w[1], 0x7632), byte_perm(w[2], w[3], 0x5410), byte_perm(w[2], w[3], 0x7632)];
            for i in 0..16 {
                let byte = (a[i >> 2] >> (8 * (i & 3))) as u8;
                // ../shared/HOPPER-ASYNC.md §1.5, warp 0: row = g + 8 ((i >> 2) & 1), col = 4 q + (i & 3) + 16 (i >> 3).
                let (row, col) = (g + 8 * ((i >> 2) & 1), 4 * q + (i & 3) + 16 * (i >> 3));
                assert_eq!(byte, codes[row * cols + 32 * j + permuted_column(col)], "lane {lane} step {j} register byte {i}");
            }
        }
    }
    // The activation side: a row whose value at column c is code(c), quantised: byte 32 j + col holds column
    // 32 j + permuted_column(col).
    let values: Vec<f32> = (0..cols).map(|c| if c == 5 { 448.0 } else { (c % 15) as f32 - 7.0 }).collect();
    let acts = quantize_act_block128(&values, 1, cols).unwrap();
    assert_eq!(acts.scales, [1.0]);
    for j in 0..4 {
        for col in 0..32 {
            assert_eq!(e4m3_to_f32(acts.codes[32 * j + col]), values[32 * j + permuted_column(col)], "step {j} byte {col}");
        }
    }
}

/// The device quantiser equals the reference bit for bit: random rows whose 128-column blocks span magnitudes from
/// 2^-20 to 2^12 (so the scales differ block by block), an all-zero block, strided input rows.
fn quantiser_equals_reference(device: &Device) {
    let mut rng = rng(41);
    let (rows, cols, stride) = (37, 512, 520);
    let mut x = random_bf16(&mut rng, rows * stride, 1.0);
    for (i, v) in x.iter_mut().enumerate() {
        let (r, c) = (i / stride, i % stride);
        let magnitude = 2f32.powi(((r * 5 + c / 128 * 3) % 33) as i32 - 20);
        *v = if (r, c / 128) == (3, 2) { bf16::ZERO } else { bf16::from_f32(v.to_f32() * magnitude) };
    }
    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let out = DeviceBuffer::<u8>::filled_with_byte(device, rows * cols, 0xaa).unwrap();
    let scales = DeviceBuffer::<f32>::filled_with_byte(device, rows * cols / 128, 0xff).unwrap();
    quantize_act_e4m3_block128(
        x_dev.view([rows, stride]).unwrap().columns(0..cols).unwrap(),
        out.view([rows, cols]).unwrap(),
        scales.view([rows, cols / 128]).unwrap(),
    )
    .unwrap();
    let x_rows: Vec<f32> = (0..rows).flat_map(|r| to_f32(&x[r * stride..][..cols])).collect();
    let want = quantize_act_block128(&x_rows, rows, cols).unwrap();
    let got_scales = scales.to_vec().unwrap();
    let scale_bits = |s: &[f32]| s.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(scale_bits(&got_scales), scale_bits(&want.scales), "scales");
    assert_eq!(out.to_vec().unwrap(), want.codes, "codes");
    assert!(want.codes[3 * cols + 256..][..128].iter().all(|&c| c == 0), "the all-zero block quantises to zeros");
}

/// Weights `[rows, cols]` in `format` whose codes are integers in -8..=8 (exact in e4m3): per-tensor scale 1/8, or
/// block scales 1/2, 1 and 2 varying with the block.
fn integer_weights(rng: &mut StdRng, format: WeightFormat, rows: usize, cols: usize) -> QuantizedMatrix {
    let codes: Vec<u8> = (0..rows * cols).map(|_| f32_to_e4m3(rng.random_range(-8i32..=8) as f32)).collect();
    match format {
        WeightFormat::Fp8PerTensor => QuantizedMatrix::Fp8PerTensor(Fp8PerTensor::from_parts(codes, rows, cols, 0.125).unwrap()),
        WeightFormat::Fp8Block128 => {
            let blocks = rows.div_ceil(128) * cols.div_ceil(128);
            let scales = (0..blocks).map(|b| [0.5, 1.0, 2.0][(b * 7 + rng.random_range(0..3)) % 3]).collect();
            QuantizedMatrix::Fp8Block128(Fp8Block128::from_parts(codes, rows, cols, scales).unwrap())
        }
        other => panic!("{other}"),
    }
}

/// Activation rows `[rows, stride]` (the first `cols` used) whose 1x128 quantisation is exact: each block is c times
/// integers in -8..=8 with one c * 448 (its amax), c in {1/2, 1, 2} varying with the row and the block, so the scale is
/// c and the codes are the integers. With [`integer_weights`] every partial is an integer below 2^14 (448 * 8 +
/// 127 * 64) and the promoted sums are multiples of 2^-2 below 2^21: exact in f32 and in the tensor core's 13
/// fraction bits, in any order.
fn integer_activations(rng: &mut StdRng, rows: usize, cols: usize, stride: usize) -> Vec<bf16> {
    let mut x = vec![bf16::ZERO; rows * stride];
    for r in 0..rows {
        for b in 0..cols / 128 {
            let c = [0.5f32, 1.0, 2.0][(r * 5 + b * 3 + rng.random_range(0..2)) % 3];
            let peak = rng.random_range(0..128);
            for k in 0..128 {
                let v = if k == peak { 448.0 * if rng.random_bool(0.5) { 1.0 } else { -1.0 } } else { rng.random_range(-8i32..=8) as f32 };
                x[r * stride + b * 128 + k] = bf16::from_f32(v * c);
            }
        }
    }
    x
}

/// The reference of `x` rows `[rows, stride]` (first `cols`) times `w`: (the quantised rows, `[rows, n]` values).
fn reference(x: &[bf16], rows: usize, cols: usize, stride: usize, w: &QuantizedMatrix) -> (QuantizedActs, Vec<f32>) {
    let x_rows: Vec<f32> = (0..rows).flat_map(|r| to_f32(&x[r * stride..][..cols])).collect();
    let acts = quantize_act_block128(&x_rows, rows, cols).unwrap();
    let values = gemm_a8(&acts, w).unwrap().values;
    (acts, values)
}

/// Elements whose bits differ.
fn mismatches(got: &[f32], want: &[f32]) -> usize {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
}

/// One dense case: `rows` rows of K `k_dim` (16-byte strided wider than K) into 128 f32 features; the number of
/// output elements that differ from the reference.
fn dense_f32_mismatches(device: &Device, format: WeightFormat, rows: usize, k_dim: usize, seed: u64) -> small4::Result<usize> {
    let (got, want) = dense_f32(device, format, rows, k_dim, 128, seed)?;
    Ok(mismatches(&got, &want))
}

/// A dense f32 GEMM of `rows` exact-design rows (strided) through `out_dim` `format` features at `k_dim` under the
/// fp8-activation kernels: (the kernel's output, the reference's).
fn dense_f32(device: &Device, format: WeightFormat, rows: usize, k_dim: usize, out_dim: usize, seed: u64) -> small4::Result<(Vec<f32>, Vec<f32>)> {
    let mut rng = rng(seed);
    let w = integer_weights(&mut rng, format, out_dim, k_dim);
    let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
    let stride = k_dim + 16;
    let x = integer_activations(&mut rng, rows, k_dim, stride);
    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let (_, want) = reference(&x, rows, k_dim, stride, &w);
    let y = run_a8(device, format, || {
        let y = DeviceBuffer::<f32>::filled_with_byte(device, rows * out_dim, 0xff)?;
        dense::linear_f32(&weights, x_dev.view([rows, stride])?.columns(0..k_dim)?, y.view([rows, out_dim])?, None)?;
        y.to_vec()
    })?;
    Ok((y, want))
}

/// Dense f32 GEMMs at the model's reduction lengths (K 4096 and 2048; 70 rows: the second row block has 6 real rows),
/// both fp8 formats: bit for bit the reference.
fn dense_at_real_reduction_lengths(device: &Device) {
    for (format, seed) in FORMATS.into_iter().zip(50..) {
        for k_dim in [4096, 2048] {
            let bad = dense_f32_mismatches(device, format, 70, k_dim, seed).unwrap();
            assert_eq!(bad, 0, "{format} dense f32 K {k_dim}: {bad} elements differ from the reference");
        }
    }
}

/// Random data (bf16 activations, weights quantised by `Fp8Block128::quantize` / `Fp8PerTensor::quantize`), where
/// summation order and the tensor core's rounding matter: the dense f32 GEMM at K 2048 within
/// `reference::fp8_gemm`'s derived per-element bound of the reference. The activations are positive-leaning
/// (uniform in [-0.25, 1]) and so are the weights, so the sums are a sizeable fraction of the sums of magnitudes the
/// bound scales with and a wrong block would exceed it.
fn dense_random_within_the_derived_bound(device: &Device) {
    for (format, seed) in FORMATS.into_iter().zip(55..) {
        let mut rng = rng(seed);
        let (rows, k_dim, out_dim) = (70, 2048, 128);
        let w: Vec<f32> = (0..out_dim * k_dim).map(|_| rng.random_range(-0.25f32..1.0) / (k_dim as f32).sqrt()).collect();
        let w = QuantizedMatrix::quantize(format, &w, out_dim, k_dim).unwrap();
        let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        let x: Vec<bf16> = (0..rows * k_dim).map(|_| bf16::from_f32(rng.random_range(-0.25f32..1.0))).collect();
        let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
        let x_rows = to_f32(&x);
        let want = gemm_a8(&quantize_act_block128(&x_rows, rows, k_dim).unwrap(), &w).unwrap();
        let y = run_a8(device, format, || {
            let y = DeviceBuffer::<f32>::filled_with_byte(device, rows * out_dim, 0xff)?;
            dense::linear_f32(&weights, x_dev.view([rows, k_dim])?, y.view([rows, out_dim])?, None)?;
            y.to_vec()
        })
        .unwrap();
        let mut worst = 0f32;
        for (i, ((&got, &value), &bound)) in y.iter().zip(&want.values).zip(&want.bounds).enumerate() {
            assert!((got - value).abs() <= bound, "{format} random dense element {i}: {got}, reference {value}, bound {bound}");
            assert!(bound < 0.05 * value.abs(), "{format} element {i}: the bound {bound} is loose against {value}");
            worst = worst.max((got - value).abs() / bound);
        }
        println!("{format} random dense K {k_dim}: largest |kernel - reference| / bound = {worst:.2e}");
    }
}

/// Dense bf16 output into a column range of wider rows and the dense SwiGLU (K 384: 3 stages, no wrap; 200 and 96
/// features: feature tails), both formats: bf16 of the reference bit for bit, the SwiGLU act within its bf16 rounding.
fn dense_bf16_and_swiglu_outputs(device: &Device) {
    for (format, seed) in FORMATS.into_iter().zip(60..) {
        let mut rng = rng(seed);
        let (rows, k_dim, out_dim) = (70, 384, 200);
        let w = integer_weights(&mut rng, format, out_dim, k_dim);
        let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
        let x = integer_activations(&mut rng, rows, k_dim, k_dim);
        let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
        let (_, want) = reference(&x, rows, k_dim, k_dim, &w);
        let y = run_a8(device, format, || {
            let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * 216, 0xff)?;
            dense::linear(&weights, x_dev.view([rows, k_dim])?, y.view([rows, 216])?.columns(8..8 + out_dim)?)?;
            y.to_vec()
        })
        .unwrap();
        let got: Vec<u16> = (0..rows).flat_map(|r| y[r * 216 + 8..][..out_dim].iter().map(|v| v.to_bits())).collect();
        let want_bits: Vec<u16> = want.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        assert_eq!(got, want_bits, "{format} dense bf16 out");
        assert!(y.iter().enumerate().all(|(i, v)| (8..8 + out_dim).contains(&(i % 216)) || v.to_bits() == 0xffff), "wrote outside its columns");

        let hidden = 96;
        let (w1, w3) = (integer_weights(&mut rng, format, hidden, k_dim), integer_weights(&mut rng, format, hidden, k_dim));
        let gate_up = DeviceWeights::upload(device, &repack::repack_gate_up(&[((&w1).into(), (&w3).into())]).unwrap()).unwrap();
        let act = run_a8(device, format, || {
            let act = DeviceBuffer::<bf16>::filled_with_byte(device, rows * hidden, 0xff)?;
            dense::linear_swiglu(&gate_up, x_dev.view([rows, k_dim])?, act.view([rows, hidden])?, None)?;
            act.to_vec()
        })
        .unwrap();
        let (g, u) = (reference(&x, rows, k_dim, k_dim, &w1).1, reference(&x, rows, k_dim, k_dim, &w3).1);
        check_swiglu(&format!("{format} dense SwiGLU"), &to_f32(&act), &g, &u);
    }
}

/// The SwiGLU act against silu(g) * u of the reference's exact g and u: the kernel rounds it to bf16 (2^-9 relative)
/// and evaluates silu with the device's exp (relative 2^-21 or so), so 2^-8 relative bounds the difference.
fn check_swiglu(what: &str, got: &[f32], g: &[f32], u: &[f32]) {
    for (i, ((&got, &g), &u)) in got.iter().zip(g).zip(u).enumerate() {
        let want = g / (1.0 + (-g).exp()) * u;
        assert!((got - want).abs() <= want.abs() * 2f32.powi(-8) + f32::MIN_POSITIVE, "{what}: element {i} = {got}, reference {want}");
    }
}

/// A routed case: `routing` draws the batch (its tokens, top-k, and `local` local experts, the others remote), after
/// the weights; up-projection [dim] -> [hidden] with SwiGLU, down-projection [down_k] -> [down_out] of its own
/// exact-design rows. Both against the reference; returns the outputs (act, down rows by pair) for comparisons.
fn check_grouped(
    device: &Device,
    format: WeightFormat,
    local: usize,
    dims: [usize; 4],
    seed: u64,
    routing: impl FnOnce(&mut StdRng) -> RoutedBatch,
) -> (Vec<bf16>, Vec<f32>) {
    let [dim, hidden, down_k, down_out] = dims;
    let mut rng = rng(seed);
    let w1: Vec<QuantizedMatrix> = (0..local).map(|_| integer_weights(&mut rng, format, hidden, dim)).collect();
    let w3: Vec<QuantizedMatrix> = (0..local).map(|_| integer_weights(&mut rng, format, hidden, dim)).collect();
    let w2: Vec<QuantizedMatrix> = (0..local).map(|_| integer_weights(&mut rng, format, down_out, down_k)).collect();
    let batch = routing(&mut rng);
    let (tokens, k) = (batch.tokens, batch.k);
    let (alignment, weights, capacity) = (&batch.alignment, &batch.weights, batch.capacity());

    let gate_up: Vec<(MatrixRef, MatrixRef)> = w1.iter().zip(&w3).map(|(a, b)| (a.into(), b.into())).collect();
    let down: Vec<MatrixRef> = w2.iter().map(|m| m.into()).collect();
    let gate_up = DeviceWeights::upload(device, &repack::repack_gate_up(&gate_up).unwrap()).unwrap();
    let down = DeviceWeights::upload(device, &repack::repack_linear(&down).unwrap()).unwrap();
    let alignment_dev = DeviceAlignment::upload(device, alignment, batch.tile_m);
    let grouping = alignment_dev.grouping();
    let x = integer_activations(&mut rng, tokens, dim, dim);
    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let topk_weights = DeviceBuffer::from_slice(device, weights).unwrap();
    let slots = batch.routed_slots();
    let what = format!("{format} {tokens} tokens x top-{k} ({} routed rows)", slots.len());

    // Up + SwiGLU: act [capacity, hidden], padding slots untouched (poison).
    let act = run_a8(device, format, || {
        let act = DeviceBuffer::<bf16>::filled_with_byte(device, capacity * hidden, 0xff)?;
        moe::up_swiglu(&gate_up, x_dev.view([tokens, dim])?, k, &grouping, act.view([capacity, hidden])?)?;
        act.to_vec()
    })
    .unwrap();
    let g_all: Vec<Vec<f32>> = w1.iter().map(|w| reference(&x, tokens, dim, dim, w).1).collect();
    let u_all: Vec<Vec<f32>> = w3.iter().map(|w| reference(&x, tokens, dim, dim, w).1).collect();
    let (mut got, mut g, mut u) = (Vec::new(), Vec::new(), Vec::new());
    for &s in &slots {
        let (e, token) = (batch.slot_expert(s), alignment.sorted_pairs[s] as usize / k);
        got.extend(to_f32(&act[s * hidden..][..hidden]));
        g.extend_from_slice(&g_all[e][token * hidden..][..hidden]);
        u.extend_from_slice(&u_all[e][token * hidden..][..hidden]);
    }
    check_swiglu(&format!("{what} up+SwiGLU K {dim}"), &got, &g, &u);
    let padding_written = batch.padding_slots().into_iter().any(|s| act[s * hidden..][..hidden].iter().any(|v| v.to_bits() != 0xffff));
    assert!(!padding_written, "{what}: a padding slot's row was written");

    // Down x routing weight, from exact-design slot rows (padding slots' rows are never read).
    let act_rows = integer_activations(&mut rng, capacity, down_k, down_k);
    let act_dev = DeviceBuffer::from_slice(device, &act_rows).unwrap();
    let out = run_a8(device, format, || {
        let out = DeviceBuffer::<f32>::filled_with_byte(device, tokens * k * down_out, 0xff)?;
        moe::down(&down, act_dev.view([capacity, down_k])?, &grouping, topk_weights.view([tokens, k])?, out.view([tokens * k, down_out])?)?;
        out.to_vec()
    })
    .unwrap();
    let y_all: Vec<Vec<f32>> = w2.iter().map(|w| reference(&act_rows, capacity, down_k, down_k, w).1).collect();
    let (mut got, mut want) = (Vec::new(), Vec::new());
    for &s in &slots {
        let pair = alignment.sorted_pairs[s] as usize;
        got.extend_from_slice(&out[pair * down_out..][..down_out]);
        want.extend(y_all[batch.slot_expert(s)][s * down_out..][..down_out].iter().map(|v| v * weights[pair]));
    }
    let bad = mismatches(&got, &want);
    assert_eq!(bad, 0, "{what} down x weight K {down_k}: {bad} elements differ from the reference");
    let unwritten = batch.unslotted_pairs();
    assert!(unwritten.iter().all(|&p| out[p * down_out..][..down_out].iter().all(|v| v.to_bits() == u32::MAX)), "{what}: an unrouted pair was written");
    (act, out)
}

/// Grouped up (K = dim 4096) and down (K = hidden 2048) at the model's reduction lengths: 150 tokens x top-2 of 2
/// local experts and a remote one (not a multiple of 64 slots), output widths cut to one block, per-tensor weights.
fn grouped_fp8_at_real_reduction_lengths(device: &Device) {
    check_grouped(device, FORMATS[0], 2, [4096, 64, 2048, 128], 70, |rng| RoutedBatch::random(rng, 150, 2, 3, 1));
}

/// The same with block-128 weights (their scales promoted per stage; the SwiGLU interleave draws gate and up rows'
/// scales from two matrices).
fn grouped_fp8_block_at_real_reduction_lengths(device: &Device) {
    check_grouped(device, FORMATS[1], 2, [4096, 64, 2048, 128], 71, |rng| RoutedBatch::random(rng, 150, 2, 3, 1));
}

/// Persistent walks over uneven experts (`format`'s weights): 9 local experts with 0, 150, 0, 40, 64, 1, 0, 65 and 0
/// pairs before every seventh pair is unrouted (empty experts first, between and last; an expert of three 64-slot
/// groups, the last partial; single-pair and near-full groups), 160 tokens x top-2, at K 4096 (up) and 2048 (down)
/// with one 128-feature tile each way, so the launch's work tiles are the experts' groups (7 or 8). The grid is
/// capped at two blocks ([`with_persistent_blocks`]): each walks three or four tiles, the ring's phases, the tile
/// tables and the slots' activation scales carried across them. Against the reference (the down-projection bit for
/// bit), and bit for bit against the same launches with one tile per block (the default grid holds every tile).
fn grouped_persistent_uneven_experts(device: &Device, format: WeightFormat, seed: u64) {
    let counts = [0, 150, 0, 40, 64, 1, 0, 65, 0];
    let run = || check_grouped(device, format, counts.len(), [4096, 64, 2048, 128], seed, |rng| RoutedBatch::from_counts(rng, &counts, 2, 0));
    let (act, out) = with_persistent_blocks(NonZeroU32::new(2).unwrap(), run);
    let (act_one, out_one) = run();
    let bits = |v: &[bf16]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&act), bits(&act_one), "{format}: up+SwiGLU on two persistent blocks differs from one tile per block");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&out), bits(&out_one), "{format}: down on two persistent blocks differs from one tile per block");
}

/// [`grouped_persistent_uneven_experts`] with per-tensor weights.
fn grouped_persistent_uneven_experts_fp8(device: &Device) {
    grouped_persistent_uneven_experts(device, FORMATS[0], 72);
}

/// [`grouped_persistent_uneven_experts`] with block-128 weights (their scales staged per stage across tiles).
fn grouped_persistent_uneven_experts_fp8_block(device: &Device) {
    grouped_persistent_uneven_experts(device, FORMATS[1], 73);
}

/// A persistent dense walk on one block ([`with_persistent_blocks`]): 70 rows (the second row block has 6 real rows,
/// its padding slots zero-filled) through 256 features (two 128-feature tiles, the fastest index), so the block walks
/// four tiles; at K 640 (5 k blocks a tile: each tile starts the 4-stage ring at another stage and phase) for both
/// formats and at K 4096 per-tensor. Bit for bit the reference and the launch with one tile per block.
fn dense_persistent_walks(device: &Device) {
    for (format, k_dim, seed) in [(FORMATS[0], 640, 74), (FORMATS[1], 640, 75), (FORMATS[0], 4096, 76)] {
        let (got, want) = with_persistent_blocks(NonZeroU32::new(1).unwrap(), || dense_f32(device, format, 70, k_dim, 256, seed)).unwrap();
        let bad = mismatches(&got, &want);
        assert_eq!(bad, 0, "{format} persistent dense K {k_dim}: {bad} elements differ from the reference");
        let (one_per_block, _) = dense_f32(device, format, 70, k_dim, 256, seed).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&one_per_block), "{format} K {k_dim}: one persistent block differs from one tile per block");
    }
}

/// Launches the fp8 kernels do not serve keep mma.sync under `PrefillGemm::WgmmaFp8Act`: a per-tensor GEMM whose K
/// (192) is not a whole number of 128-k scale blocks, and a batched per-head launch (grid z); each still computes
/// the bf16-activation result (within the GEMM tests' rule of the dequantised reference).
fn launches_it_does_not_serve_keep_mma_sync(device: &Device) {
    let mut rng = rng(95);
    let rows = 70;
    let run_checked = |what: &str, launch: &dyn Fn() -> small4::Result<Vec<f32>>, want: &[f32]| {
        let got = PrefillGemm::WgmmaFp8Act.run(launch).unwrap();
        if let Some(counters) = device.last_launch_counters() {
            assert_eq!(counters.kernel, "moe_gemm_fp8_tiled", "{what}");
        }
        assert_agrees(what, &got, want);
    };
    let (k_dim, out_dim) = (192, 64);
    let w = integer_weights(&mut rng, WeightFormat::Fp8PerTensor, out_dim, k_dim);
    let weights = DeviceWeights::upload(device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
    let x = random_bf16(&mut rng, rows * k_dim, 1.0);
    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let want = small4::reference::linear::matmul_nt(&to_f32(&x), &w.dequantize_for_gemm(), rows, k_dim, out_dim);
    let launch = || {
        let y = DeviceBuffer::<f32>::filled_with_byte(device, rows * out_dim, 0xff)?;
        dense::linear_f32(&weights, x_dev.view([rows, k_dim])?, y.view([rows, out_dim])?, None)?;
        y.to_vec()
    };
    run_checked("K 192", &launch, &want);

    let (heads, k_dim, head_out) = (2, 128, 64);
    let mats: Vec<QuantizedMatrix> = (0..heads).map(|_| integer_weights(&mut rng, WeightFormat::Fp8PerTensor, head_out, k_dim)).collect();
    let per_head = DeviceWeights::upload(device, &repack::repack_linear(&mats.iter().map(|m| m.into()).collect::<Vec<MatrixRef>>()).unwrap()).unwrap();
    let xh = random_bf16(&mut rng, rows * heads * k_dim, 1.0);
    let xh_dev = DeviceBuffer::from_slice(device, &xh).unwrap();
    let mut want = vec![0f32; rows * heads * head_out];
    for (h, m) in mats.iter().enumerate() {
        let x_h: Vec<f32> = (0..rows).flat_map(|r| to_f32(&xh[(r * heads + h) * k_dim..][..k_dim])).collect();
        for (i, v) in small4::reference::linear::matmul_nt(&x_h, &m.dequantize_for_gemm(), rows, k_dim, head_out).into_iter().enumerate() {
            want[((i / head_out) * heads + h) * head_out + i % head_out] = bf16::from_f32(v).to_f32();
        }
    }
    let launch = || {
        let y = DeviceBuffer::<bf16>::filled_with_byte(device, rows * heads * head_out, 0xff)?;
        dense::linear_per_head(&per_head, xh_dev.view([rows, heads, k_dim])?, y.view([rows, heads, head_out])?, None)?;
        Ok(to_f32(&y.to_vec()?))
    };
    run_checked("per-head", &launch, &want);
}

backend_tests!(
    quantiser_equals_reference,
    launches_it_does_not_serve_keep_mma_sync,
    dense_random_within_the_derived_bound,
    dense_at_real_reduction_lengths,
    dense_bf16_and_swiglu_outputs,
    grouped_fp8_at_real_reduction_lengths,
    grouped_fp8_block_at_real_reduction_lengths,
    grouped_persistent_uneven_experts_fp8,
    grouped_persistent_uneven_experts_fp8_block,
    dense_persistent_walks
);

/// The exact-design GEMMs and the random-data bound under the interpreter's other tensor-core model, MMA-Sim's
/// truncating Hopper model (13 fraction bits for fp8 sums, ../shared/HOPPER-ASYNC.md §1.6, UNVERIFIED until a GPU
/// run): the exact-design partials are integers below 2^14, exact in it too, and `reference::fp8_gemm`'s bound is
/// derived for it.
#[test]
fn gemms_hold_under_the_truncating_tensor_model() {
    let sim = std::sync::Arc::new(small4::device::sim::SimBackend::new());
    sim.set_hopper_truncated_tensor_arith(true);
    let device: Device = sim;
    for (format, seed) in FORMATS.into_iter().zip(50..) {
        let bad = dense_f32_mismatches(&device, format, 70, 2048, seed).unwrap();
        assert_eq!(bad, 0, "{format} dense f32 K 2048 (truncating model): {bad} elements differ from the reference");
    }
    dense_random_within_the_derived_bound(&device);
}

/// Planted bugs in the fp8 kernel (edits of its own PTX), each caught where the unedited kernel passes: the
/// promotion reading each slot's activation scale from its neighbour's (a wrong scale index) gives wrong sums;
/// without fence.proxy.async the interpreter reports the producer's cp.async rows reaching wgmma unfenced; with
/// wait_group 1 instead of 0 it reports the partial read before its wgmmas retire.
#[test]
fn planted_bugs_in_the_fp8_kernel_are_caught() {
    let original = small4::kernels::modules::MOE_GEMM_WGMMA_FP8.ptx;
    let entry = "moe_gemm_fp8_block_wgmma_a8";
    let planted = |name: &str, ptx: String| Planted::edited(small4::kernels::modules::MOE_GEMM_WGMMA_FP8, entry, name, ptx);
    let run = |device: &Device| dense_f32_mismatches(device, WeightFormat::Fp8Block128, 70, 512, 80);
    // The consumers' 8-byte loads of two slots' activation scales (8 f + 2 t and the next) with the halves swapped:
    // each slot promoted with its neighbour's scale.
    let swapped = original
        .lines()
        .map(|l| match (l.contains("ld.shared.v2.f32"), l.find('{'), l.find('}')) {
            (true, Some(open), Some(close)) => {
                let (a, b) = l[open + 1..close].split_once(',').unwrap();
                format!("{}{{{}, {}}}{}", &l[..open], b.trim(), a.trim(), &l[close + 1..])
            }
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let bad = run(&planted("swapped_slot_scales", swapped)).unwrap();
    assert!(bad > 0, "a wrong activation-scale index went unnoticed");
    let hazards: [(&str, String, &str); 2] = [
        ("no_proxy_fence", without_proxy_fences(original), "no fence.proxy.async"),
        ("wait_group_1", original.replace("wgmma.wait_group.sync.aligned 0;", "wgmma.wait_group.sync.aligned 1;"), "before the wgmma.wait_group"),
    ];
    for (name, ptx, expected) in hazards {
        assert_reported(name, run(&planted(name, ptx)), expected);
    }
    let unedited = Planted::unedited(small4::kernels::modules::MOE_GEMM_WGMMA_FP8, entry);
    assert_eq!(run(&unedited).unwrap(), 0);
}

/// The interpreter's counters of the fp8-activation kernels at the model's sizes (up + SwiGLU: K = dim 4096 into 2048
/// hidden; down: K = 2048 into dim 4096), 64 tokens routed to both of 2 experts (one full 64-slot tile each), and a
/// dense f32 GEMM of the down-projection's shape over 100 rows, 8 evenly spaced blocks interpreted per launch, for
/// both fp8 formats, beside mma.sync's bf16-activation kernels of the same weights. One Markdown row per launch for
/// docs/perf.md: `cargo test --test moe_wgmma_fp8 fp8_counters -- --ignored --nocapture`.
#[test]
#[ignore]
fn fp8_counters_at_real_dims() {
    println!("| launch | kernel | blocks run / grid | warp instructions | shared requests | bank-conflict wavefronts | global bytes read | tensor instructions | tensor FLOPs |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for format in FORMATS {
        let sim = std::sync::Arc::new(small4::device::sim::SimBackend::new());
        let device: Device = sim.clone();
        sim.set_block_sample(Some(8));
        let (dim, hidden, tokens, k) = (4096, 2048, 64, 2);
        let mut rng = rng(90);
        let w1: Vec<QuantizedMatrix> = (0..2).map(|_| integer_weights(&mut rng, format, hidden, dim)).collect();
        let w2: Vec<QuantizedMatrix> = (0..2).map(|_| integer_weights(&mut rng, format, dim, hidden)).collect();
        let gate_up: Vec<(MatrixRef, MatrixRef)> = w1.iter().map(|w| (w.into(), w.into())).collect();
        let gate_up = DeviceWeights::upload(&device, &repack::repack_gate_up(&gate_up).unwrap()).unwrap();
        let down = DeviceWeights::upload(&device, &repack::repack_linear(&w2.iter().map(|w| w.into()).collect::<Vec<MatrixRef>>()).unwrap()).unwrap();
        let ids: Vec<i32> = (0..tokens * k).map(|p| (p % k) as i32).collect();
        let alignment = align_pairs(&ids, None, 2, 64);
        let alignment_dev = DeviceAlignment::upload(&device, &alignment, 64);
        let grouping = alignment_dev.grouping();
        let capacity = alignment.sorted_pairs.len();
        let x = DeviceBuffer::from_slice(&device, &integer_activations(&mut rng, tokens, dim, dim)).unwrap();
        let act = DeviceBuffer::from_slice(&device, &integer_activations(&mut rng, capacity, hidden, hidden)).unwrap();
        let out = DeviceBuffer::<f32>::alloc(&device, tokens * k * dim).unwrap();
        let weights = DeviceBuffer::from_slice(&device, &vec![0.5f32; tokens * k]).unwrap();
        let dense_rows = 100;
        let dense_w = DeviceWeights::upload(&device, &repack::repack_linear(&[(&integer_weights(&mut rng, format, dim, hidden)).into()]).unwrap()).unwrap();
        let dense_x = DeviceBuffer::from_slice(&device, &integer_activations(&mut rng, dense_rows, hidden, hidden)).unwrap();
        let dense_y = DeviceBuffer::<f32>::alloc(&device, dense_rows * dim).unwrap();
        let act_out = DeviceBuffer::<bf16>::alloc(&device, capacity * hidden).unwrap();
        for choice in [PrefillGemm::MmaSync, PrefillGemm::WgmmaFp8Act] {
            for launch in ["up + SwiGLU (K 4096)", "down x weight (K 2048)", "dense f32 (K 2048, 100 rows)"] {
                choice
                    .run(|| match &launch[..2] {
                        "up" => moe::up_swiglu(&gate_up, x.view([tokens, dim])?, k, &grouping, act_out.view([capacity, hidden])?),
                        "do" => moe::down(&down, act.view([capacity, hidden])?, &grouping, weights.view([tokens, k])?, out.view([tokens * k, dim])?),
                        _ => dense::linear_f32(&dense_w, dense_x.view([dense_rows, hidden])?, dense_y.view([dense_rows, dim])?, None),
                    })
                    .unwrap();
                let c = device.last_launch_counters().unwrap();
                println!("| {format} {launch} | {} |", counter_cells(&c));
            }
        }
    }
}

/// The launches quantise into the `Fp8ActScratch` they are given (as the engine gives its own): once reserved,
/// repeated launches that fit allocate nothing (on CUDA each allocation and free synchronises the stream) and still
/// equal the reference bit for bit; a launch of more rows grows the two buffers once, and the smaller launches after
/// it reuse the grown ones. A launch given none allocates its own.
#[test]
fn repeated_launches_reuse_the_scratch() {
    use small4::kernels::moe_wgmma_fp8::Fp8ActScratch;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    let allocations = Arc::new(AtomicUsize::new(0));
    let mut hooked = Hooked::new(small4::device::simulator());
    let counter = allocations.clone();
    hooked.on_alloc = Box::new(move |_, _| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let device: Device = Arc::new(hooked);
    let (format, k_dim, out_dim, max_rows) = (WeightFormat::Fp8Block128, 256, 128, 80);
    let mut rng = rng(61);
    let w = integer_weights(&mut rng, format, out_dim, k_dim);
    let weights = DeviceWeights::upload(&device, &repack::repack_linear(&[(&w).into()]).unwrap()).unwrap();
    let x = integer_activations(&mut rng, max_rows, k_dim, k_dim);
    let x_dev = DeviceBuffer::from_slice(&device, &x).unwrap();
    let y = DeviceBuffer::<f32>::alloc(&device, max_rows * out_dim).unwrap();
    // Allocations made by one launch of `rows` rows quantising into `scratch`, and whether its output equals the
    // reference.
    let launch = |rows: usize, scratch: Option<&Fp8ActScratch>| -> (usize, bool) {
        let before = allocations.load(Ordering::SeqCst);
        run_a8(&device, format, || dense::linear_f32(&weights, x_dev.view([rows, k_dim])?, y.view([rows, out_dim])?, scratch)).unwrap();
        let made = allocations.load(Ordering::SeqCst) - before;
        let got = y.to_vec().unwrap();
        let (_, want) = reference(&x[..rows * k_dim], rows, k_dim, k_dim, &w);
        (made, mismatches(&got[..rows * out_dim], &want) == 0)
    };
    let scratch = Fp8ActScratch::new(&device);
    scratch.reserve(48, k_dim).unwrap();
    assert_eq!(scratch.capacity(), (48 * k_dim, 48 * 2));
    let runs = [48, 40, max_rows, 48, max_rows].map(|rows| launch(rows, Some(&scratch)));
    assert_eq!(runs, [(0, true), (0, true), (2, true), (0, true), (0, true)], "(allocations, equal to the reference) per launch");
    assert_eq!(scratch.capacity(), (max_rows * k_dim, max_rows * 2));
    // Without a scratch: the launch's own codes and scales.
    assert_eq!(launch(40, None), (2, true));
    // Bad sizes are typed errors, and leave the buffers as they were.
    for (rows, k) in [(4, 0), (4, 200), (usize::MAX / 64, 128)] {
        assert!(matches!(scratch.reserve(rows, k), Err(small4::Error::InvalidArgument(_))), "reserve({rows}, {k})");
    }
    assert_eq!(scratch.capacity(), (max_rows * k_dim, max_rows * 2));
}
