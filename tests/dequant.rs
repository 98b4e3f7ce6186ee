//! Dequantisation kernels against `crate::quant`'s `dequantize()`, bit-exact after rounding to bf16, on the
//! interpreter and (when present) the GPU.

mod common;

use common::*;
use half::bf16;
use proptest::prelude::*;
use small4::device::{Device, DeviceBuffer};
use small4::kernels::dequant::{self, DeviceQuantized};
use small4::kernels::TensorView;
use small4::quant::{QuantizedMatrix, WeightFormat};

/// Random weights (bf16-representable, never 0 or ±1) whose magnitude changes from row to row and every 128
/// columns, so blocks and groups get different scales.
fn random_weights(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
    let values = to_f32(&random_bf16(&mut rng(seed), rows * cols, 3.0));
    values.iter().enumerate().map(|(i, &v)| v * 2f32.powi((i / cols % 3) as i32 - 1 + (i % cols / 128 % 2) as i32)).collect()
}

/// Quantises on the CPU, dequantises on `device` into a poisoned (0xff = NaN) buffer, and requires every output to
/// equal the CPU `dequantize()` rounded to bf16, bit for bit. Returns the output bits.
fn check_format(device: &Device, format: WeightFormat, rows: usize, cols: usize, seed: u64) -> Vec<u16> {
    let weights = random_weights(rows, cols, seed);
    let matrix = QuantizedMatrix::quantize(format, &weights, rows, cols).unwrap();
    let want: Vec<u16> = matrix.dequantize().iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let on_device = DeviceQuantized::upload(device, &matrix).unwrap();
    let out = DeviceBuffer::<bf16>::filled_with_byte(device, rows * cols, 0xff).unwrap();
    on_device.dequantize_into(out.view([rows, cols]).unwrap()).unwrap();
    let got: Vec<u16> = out.to_vec().unwrap().iter().map(|v| v.to_bits()).collect();
    for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
        // The reference is never NaN, so a left-over 0xffff poison fails here too.
        assert_eq!(g, w, "{format} [{rows}, {cols}] element {i} (row {}, col {}): got {} want {}", i / cols, i % cols, bf16::from_bits(g), bf16::from_bits(w));
    }
    got
}

fn rows_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![Just(1usize), Just(2), Just(17), Just(33), Just(130)]
}

fn run_cases(strategy: impl Strategy<Value = (WeightFormat, usize, usize, u64)>, device: &Device, cases: u32) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases, ..ProptestConfig::default() });
    runner
        .run(&strategy, |(format, rows, cols, seed)| {
            check_format(device, format, rows, cols, seed);
            Ok(())
        })
        .unwrap();
}

/// Any column count, so the flat tail (fewer than 16 codes after the last whole vector) is exercised.
fn fp8_per_tensor_matches_cpu(device: &Device) {
    let cols = prop_oneof![Just(3usize), Just(24), Just(100), Just(128), Just(136), Just(256), Just(384)];
    run_cases((Just(WeightFormat::Fp8PerTensor), rows_strategy(), cols, any::<u64>()), device, 10);
}

fn fp8_block128_matches_cpu(device: &Device) {
    let cols = prop_oneof![Just(16usize), Just(128), Just(144), Just(256), Just(384)];
    run_cases((Just(WeightFormat::Fp8Block128), rows_strategy(), cols, any::<u64>()), device, 10);
}

fn int4_matches_cpu(device: &Device) {
    let format_and_cols = (prop_oneof![Just(32usize), Just(96), Just(128)], any::<bool>(), 1usize..4)
        .prop_map(|(group, zero_point, groups)| (WeightFormat::Int4 { group, zero_point }, group * groups));
    let strategy = (format_and_cols, rows_strategy(), any::<u64>()).prop_map(|((f, cols), rows, seed)| (f, rows, cols, seed));
    run_cases(strategy, device, 12);
}

fn nvfp4_matches_cpu(device: &Device) {
    let cols = prop_oneof![Just(16usize), Just(48), Just(128), Just(256), Just(384)];
    run_cases((Just(WeightFormat::Nvfp4), rows_strategy(), cols, any::<u64>()), device, 10);
}

/// Two runs give identical bits, for every kernel; the shape spans several warp tiles plus a tail.
fn dequant_is_deterministic(device: &Device) {
    for format in [WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128, WeightFormat::Int4 { group: 64, zero_point: true }, WeightFormat::Nvfp4] {
        let first = check_format(device, format, 37, 192, 11);
        assert_eq!(first, check_format(device, format, 37, 192, 11), "{format}");
    }
}

/// Small grids make every warp loop over several tiles (the grid-stride path); the bits do not change.
fn dequant_grid_stride_loop_gives_the_same_bits(device: &Device) {
    let (rows, cols) = (67, 640);
    let weights = random_weights(rows, cols, 21);
    for format in [WeightFormat::Fp8PerTensor, WeightFormat::Fp8Block128, WeightFormat::Int4 { group: 128, zero_point: true }, WeightFormat::Nvfp4] {
        let matrix = QuantizedMatrix::quantize(format, &weights, rows, cols).unwrap();
        let want: Vec<u16> = matrix.dequantize().iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let on_device = DeviceQuantized::upload(device, &matrix).unwrap();
        for max_blocks in [1, 2] {
            let out = DeviceBuffer::<bf16>::filled_with_byte(device, rows * cols, 0xff).unwrap();
            on_device.dequantize_into_with_max_blocks(out.view([rows, cols]).unwrap(), max_blocks).unwrap();
            let got: Vec<u16> = out.to_vec().unwrap().iter().map(|v| v.to_bits()).collect();
            assert!(got == want, "{format} with {max_blocks} blocks differs from the CPU");
        }
        let out = DeviceBuffer::<bf16>::alloc(device, rows * cols).unwrap();
        assert!(matches!(on_device.dequantize_into_with_max_blocks(out.view([rows, cols]).unwrap(), 0), Err(small4::Error::InvalidArgument(_))));
        // An output of the transposed shape.
        assert!(matches!(on_device.dequantize_into(out.view([cols, rows]).unwrap()), Err(small4::Error::Shape { .. })));
    }
}

fn dequant_rejects_bad_arguments(device: &Device) {
    let bytes = DeviceBuffer::<u8>::alloc(device, 64).unwrap();
    let out = DeviceBuffer::<bf16>::alloc(device, 64).unwrap();
    let shape = |r: small4::Result<()>| assert!(matches!(r, Err(small4::Error::Shape { .. })), "{r:?}");
    let invalid = |r: small4::Result<()>| assert!(matches!(r, Err(small4::Error::InvalidArgument(_))), "{r:?}");
    let view = |dims: [usize; 2]| bytes.view(dims).unwrap();
    let out_of = |dims: [usize; 2]| out.view(dims).unwrap();
    // FP8: codes of 2 x 32 for an output of 2 x 16; a NaN scale; 8 columns (not a multiple of 16); 2 block scales
    // for the single block of 4 x 16.
    shape(dequant::dequant_fp8_per_tensor(view([2, 32]), 0.5, out_of([2, 16])));
    invalid(dequant::dequant_fp8_per_tensor(view([4, 16]), f32::NAN, out_of([4, 16])));
    let scales = DeviceBuffer::<f32>::alloc(device, 2).unwrap();
    shape(dequant::dequant_fp8_block128(view([8, 8]), scales.view([1, 1]).unwrap(), out_of([8, 8])));
    shape(dequant::dequant_fp8_block128(view([4, 16]), scales.view([1, 2]).unwrap(), out_of([4, 16])));
    // INT4: a group of 8; 16 columns with a group of 32; packed codes viewed unpacked ([rows, cols] bytes); 3 zero
    // points for the 2 groups of 2 x 32.
    let packed = DeviceBuffer::<u8>::alloc(device, 32).unwrap();
    let int4_scales = DeviceBuffer::<bf16>::alloc(device, 8).unwrap();
    invalid(dequant::dequant_int4(packed.view([8, 4]).unwrap(), int4_scales.view([8, 1]).unwrap(), None, out_of([8, 8]), 8));
    shape(dequant::dequant_int4(packed.view([4, 8]).unwrap(), int4_scales.view([4, 1]).unwrap(), None, out_of([4, 16]), 32));
    shape(dequant::dequant_int4(packed.view([1, 32]).unwrap(), int4_scales.view([1, 1]).unwrap(), None, out_of([1, 32]), 32));
    let zeros = DeviceBuffer::<u8>::alloc(device, 3).unwrap();
    shape(dequant::dequant_int4(packed.view([2, 16]).unwrap(), int4_scales.view([2, 1]).unwrap(), Some(zeros.view([3, 1]).unwrap()), out_of([2, 32]), 32));
    // NVFP4: 8 columns; a global scale of 0; scales one byte off the 2-byte pairs the kernel loads.
    let nv_scales = DeviceBuffer::<u8>::alloc(device, 5).unwrap();
    shape(dequant::dequant_nvfp4(packed.view([8, 4]).unwrap(), nv_scales.view([8, 0]).unwrap(), 2.0, out_of([8, 8])));
    invalid(dequant::dequant_nvfp4(packed.view([4, 8]).unwrap(), nv_scales.view([4, 1]).unwrap(), 0.0, out_of([4, 16])));
    let odd_scales = TensorView::strided(&nv_scales, 1, [4, 1], 1).unwrap();
    invalid(dequant::dequant_nvfp4(packed.view([4, 8]).unwrap(), odd_scales, 2.0, out_of([4, 16])));
    // Views the flat kernels cannot take: an output one element off 16 bytes, strided codes.
    let shifted_out = TensorView::strided(&out, 1, [2, 16], 16).unwrap();
    invalid(dequant::dequant_fp8_per_tensor(view([2, 16]), 0.5, shifted_out));
    let strided_codes = TensorView::strided(&bytes, 0, [2, 16], 32).unwrap();
    invalid(dequant::dequant_fp8_per_tensor(strided_codes, 0.5, out_of([2, 16])));
    // Empty matrices launch nothing and succeed.
    let (empty_bytes, empty_out) = (DeviceBuffer::<u8>::alloc(device, 0).unwrap(), DeviceBuffer::<bf16>::alloc(device, 0).unwrap());
    dequant::dequant_nvfp4(empty_bytes.view([0, 8]).unwrap(), empty_bytes.view([0, 1]).unwrap(), 2.0, empty_out.view([0, 16]).unwrap()).unwrap();
}

/// Runs `matrix` through its kernel and compares with the CPU bit for bit; where the CPU gives NaN (an e4m3 NaN code
/// as data or scale) the kernel must give NaN too.
fn check_matrix_exact(device: &Device, matrix: &QuantizedMatrix) {
    let (rows, cols) = matrix.shape();
    let want = matrix.dequantize();
    let out = DeviceBuffer::<bf16>::filled_with_byte(device, rows * cols, 0xff).unwrap();
    DeviceQuantized::upload(device, matrix).unwrap().dequantize_into(out.view([rows, cols]).unwrap()).unwrap();
    for (i, (g, &w)) in out.to_vec().unwrap().iter().zip(&want).enumerate() {
        if w.is_nan() {
            assert!(g.is_nan(), "{} element {i}: got {g}, want NaN", matrix.format());
        } else {
            assert_eq!(g.to_bits(), bf16::from_f32(w).to_bits(), "{} element {i}: got {g}, want {w}", matrix.format());
        }
    }
}

/// Every code point through the device decoders: all 256 e4m3 bytes as FP8 data (per-tensor and block scales), all
/// 256 nibble pairs as INT4 (symmetric, and with every zero point 0..=15), all 256 nibble pairs as NVFP4 codes and
/// all 256 e4m3 bytes as NVFP4 block scales (NaN codes included).
fn every_code_point_decodes_exactly(device: &Device) {
    use small4::quant::{Fp8Block128, Fp8PerTensor, Int4Grouped, Nvfp4};
    let bytes: Vec<u8> = (0..=255u8).collect();
    let fp8 = Fp8PerTensor::from_parts(bytes.repeat(2), 2, 256, 0.75).unwrap();
    check_matrix_exact(device, &QuantizedMatrix::Fp8PerTensor(fp8));
    let block = Fp8Block128::from_parts(bytes.repeat(130), 130, 256, vec![0.5, 3.0, 1.0 / 3.0, 7.0]).unwrap();
    check_matrix_exact(device, &QuantizedMatrix::Fp8Block128(block));
    // 16 rows of 512 nibbles; group 32 -> 16 groups per row, zero point = group index within the row.
    let (rows, cols, group) = (16, 512, 32);
    let packed = bytes.repeat(rows * cols / 2 / 256);
    let scales = (0..rows * cols / group).map(|g| bf16::from_f32(0.01 + g as f32 * 0.37)).collect::<Vec<_>>();
    let zeros = (0..rows * cols / group).map(|g| (g % 16) as u8).collect();
    let int4 = Int4Grouped::from_parts(packed.clone(), rows, cols, group, scales.clone(), Some(zeros)).unwrap();
    check_matrix_exact(device, &QuantizedMatrix::Int4(int4));
    let int4_sym = Int4Grouped::from_parts(packed, rows, cols, group, scales, None).unwrap();
    check_matrix_exact(device, &QuantizedMatrix::Int4(int4_sym));
    // 256 NVFP4 blocks of 16 (8 bytes each): block b has scale code b and bytes (8b .. 8b + 8) mod 256.
    let packed = (0..256 * 8).map(|i| (i % 256) as u8).collect();
    let nvfp4 = Nvfp4::from_parts(packed, 16, 256, bytes.clone(), 1234.5).unwrap();
    check_matrix_exact(device, &QuantizedMatrix::Nvfp4(nvfp4));
}

backend_tests!(
    every_code_point_decodes_exactly,
    fp8_per_tensor_matches_cpu,
    fp8_block128_matches_cpu,
    int4_matches_cpu,
    nvfp4_matches_cpu,
    dequant_is_deterministic,
    dequant_grid_stride_loop_gives_the_same_bits,
    dequant_rejects_bad_arguments
);

/// Traffic efficiency (ideal bytes / bytes in the 32-byte sectors the warps touched) of each kernel on the
/// interpreter, printed and required within 0.01 of docs/perf.md's table (the same at any row count: the excess is one
/// scale sector per warp tile). Ideal = the stored arrays + the bf16 output, each byte once.
fn check_traffic(rows: usize, cols: usize) {
    let device = small4::device::simulator();
    let weights = random_weights(rows, cols, 3);
    // (format, docs/perf.md's efficiency)
    let formats = [
        (WeightFormat::Fp8PerTensor, 1.000),
        (WeightFormat::Fp8Block128, 0.980),
        (WeightFormat::INT4_G128, 0.994),
        (WeightFormat::Int4 { group: 128, zero_point: true }, 0.985),
        (WeightFormat::Nvfp4, 1.000),
    ];
    let out = DeviceBuffer::<bf16>::filled_with_byte(&device, rows * cols, 0xff).unwrap();
    for (format, figure) in formats {
        let matrix = QuantizedMatrix::quantize(format, &weights, rows, cols).unwrap();
        let on_device = DeviceQuantized::upload(&device, &matrix).unwrap();
        let started = std::time::Instant::now();
        on_device.dequantize_into(out.view([rows, cols]).unwrap()).unwrap();
        device.synchronize().unwrap();
        let seconds = started.elapsed().as_secs_f64();
        let counters = device.last_launch_counters().expect("the interpreter counts traffic");
        let ideal = (on_device.bytes() + out.bytes()) as u64;
        let efficiency = counters.traffic_efficiency(ideal);
        println!(
            "{format} [{rows}, {cols}]: ideal {ideal} B, read {} B, written {} B, sectors {} B, efficiency {efficiency:.3} \
             ({} warp instructions, {seconds:.1} s on the interpreter)",
            counters.global_bytes_read,
            counters.global_bytes_written,
            counters.sector_bytes(),
            counters.instructions
        );
        assert!(efficiency >= figure - 0.01, "{format}: traffic efficiency {efficiency:.3} below docs/perf.md's {figure} - 0.01");
    }
}

/// 256 rows of the real expert width (the kernels' traffic per element does not depend on the row count).
#[test]
fn traffic_at_expert_width() {
    check_traffic(256, 4096);
}

/// The whole expert matrix [2048, 4096] (w1 / w3 of one expert), ~8 s on the interpreter: the docs/perf.md table,
/// printed by `cargo test --test dequant traffic_at_expert_shape -- --nocapture`.
#[test]
fn traffic_at_expert_shape() {
    check_traffic(2048, 4096);
}
