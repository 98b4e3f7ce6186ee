//! RMSNorm kernel against the CPU reference, on the interpreter and (when present) the GPU.

mod common;

use common::*;
use half::bf16;
use proptest::prelude::*;
use small4::device::{Device, DeviceBuffer};
use small4::kernels::norm;
use small4::reference;

/// Runs the kernel once (poisoned output, optional residual) and checks it against the reference from the same
/// bf16-rounded inputs. Returns the raw output bits for determinism checks.
fn check_rms_norm(device: &Device, rows: usize, cols: usize, fused: bool, seed: u64) -> Vec<u16> {
    let mut rng = rng(seed);
    let x = random_bf16(&mut rng, rows * cols, 4.0);
    let residual = random_bf16(&mut rng, rows * cols, 4.0);
    let weight = random_bf16(&mut rng, cols, 2.0);
    let eps = 1e-6;

    let x_dev = DeviceBuffer::from_slice(device, &x).unwrap();
    let w_dev = DeviceBuffer::from_slice(device, &weight).unwrap();
    let out = DeviceBuffer::<bf16>::filled_with_byte(device, rows * cols, 0xff).unwrap();
    let (h, want_h) = if fused {
        let r_dev = DeviceBuffer::from_slice(device, &residual).unwrap();
        let h_dev = DeviceBuffer::<bf16>::filled_with_byte(device, rows * cols, 0xff).unwrap();
        let shape = [rows, cols];
        norm::add_rms_norm(
            x_dev.view(shape).unwrap(),
            r_dev.view(shape).unwrap(),
            w_dev.as_vector(),
            h_dev.view(shape).unwrap(),
            out.view(shape).unwrap(),
            eps,
        )
        .unwrap();
        let want: Vec<f32> = x.iter().zip(&residual).map(|(a, b)| bf16::from_f32(a.to_f32() + b.to_f32()).to_f32()).collect();
        (to_f32(&h_dev.to_vec().unwrap()), want)
    } else {
        norm::rms_norm(x_dev.view([rows, cols]).unwrap(), w_dev.as_vector(), out.view([rows, cols]).unwrap(), eps).unwrap();
        (to_f32(&x), to_f32(&x))
    };
    assert_close("residual sum", &h, &want_h, 0.0, 0.0);
    let want = reference::norm::rms_norm(&want_h, &to_f32(&weight), eps);
    let got = out.to_vec().unwrap();
    // One bf16 rounding of the output (2^-8 relative) plus f32 accumulation-order noise.
    assert_close("rms_norm", &to_f32(&got), &want, 1e-5, 1.0 / 128.0);
    got.iter().map(|v| v.to_bits()).collect()
}

fn rms_norm_matches_reference(device: &Device) {
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig { cases: 12, ..ProptestConfig::default() });
    let shapes = (1usize..5, prop_oneof![Just(1usize), Just(17), Just(64), Just(200), Just(256), Just(4096)], any::<bool>(), any::<u64>());
    runner
        .run(&shapes, |(rows, cols, fused, seed)| {
            check_rms_norm(device, rows, cols, fused, seed);
            Ok(())
        })
        .unwrap();
}

fn rms_norm_is_deterministic(device: &Device) {
    let first = check_rms_norm(device, 3, 4096, true, 7);
    assert_eq!(first, check_rms_norm(device, 3, 4096, true, 7));
}

fn rms_norm_rejects_bad_shapes(device: &Device) {
    let x = DeviceBuffer::<bf16>::alloc(device, 10).unwrap();
    let w = DeviceBuffer::<bf16>::alloc(device, 4).unwrap();
    let out = DeviceBuffer::<bf16>::alloc(device, 8).unwrap();
    // A weight of 4 for rows of 5, an output of the wrong shape, a view past the buffer's end.
    let err = norm::rms_norm(x.view([2, 5]).unwrap(), w.as_vector(), out.view([2, 4]).unwrap(), 1e-6).unwrap_err();
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    let err = norm::rms_norm(x.view([2, 4]).unwrap(), w.as_vector(), out.view([1, 4]).unwrap(), 1e-6).unwrap_err();
    assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    assert!(matches!(out.view([3, 4]), Err(small4::Error::Shape { .. })));
    // A view one element off the 16-byte boundary the vector loads need.
    let shifted = small4::kernels::TensorView::strided(&x, 1, [1, 8], 8).unwrap();
    let out8 = out.view([1, 8]).unwrap();
    let err = norm::rms_norm(shifted, x.view([8]).unwrap(), out8, 1e-6).unwrap_err();
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
    let err = norm::rms_norm(out.view([2, 4]).unwrap(), w.as_vector(), out.view([2, 4]).unwrap(), f32::NAN).unwrap_err();
    assert!(matches!(err, small4::Error::InvalidArgument(_)), "{err}");
}

/// The fused end of a MoE layer equals its two launches (moe::combine, then add_rms_norm) bit for bit, at the real
/// width (4096) and an odd one, with and without the shared expert, with pairs skipped (an id past the experts, a
/// remote expert of the map, an id of -1), and its typed errors.
fn moe_combine_add_rms_norm_equals_combine_then_add_norm(device: &Device) {
    let mut rng = rng(31);
    for (rows, cols, k, shared) in [(1usize, 4096usize, 4usize, true), (3, 4096, 4, false), (2, 72, 2, true)] {
        let experts = 8;
        let pair_out: Vec<f32> = to_f32(&random_bf16(&mut rng, rows * k * cols, 0.5));
        let shared_out: Vec<f32> = to_f32(&random_bf16(&mut rng, rows * cols, 0.5));
        let residual = random_bf16(&mut rng, rows * cols, 2.0);
        let weight = random_bf16(&mut rng, cols, 1.5);
        // Every 3rd pair skipped one way or another: expert 5 is remote in the map, 9 is past the experts, -1 none.
        let ids: Vec<i32> = (0..rows * k)
            .map(|i| match i % 6 {
                1 => 5,
                3 => 9,
                5 => -1,
                _ => (i % experts) as i32,
            })
            .collect();
        let map: Vec<i32> = (0..experts as i32).map(|e| if e == 5 { -1 } else { e }).collect();
        let d = |v: &[f32]| DeviceBuffer::from_slice(device, v).unwrap();
        let (pair_dev, shared_dev) = (d(&pair_out), d(&shared_out));
        let (ids_dev, map_dev) = (DeviceBuffer::from_slice(device, &ids).unwrap(), DeviceBuffer::from_slice(device, &map).unwrap());
        let (r_dev, w_dev) = (DeviceBuffer::from_slice(device, &residual).unwrap(), DeviceBuffer::from_slice(device, &weight).unwrap());
        let poisoned = || DeviceBuffer::<bf16>::filled_with_byte(device, rows * cols, 0xff).unwrap();
        let shape = [rows, cols];
        let shared_view = shared.then(|| shared_dev.view(shape).unwrap());
        // Two launches.
        let (block, h_two, out_two) = (poisoned(), poisoned(), poisoned());
        small4::kernels::moe::combine(
            pair_dev.view([rows * k, cols]).unwrap(),
            shared_view,
            ids_dev.view([rows, k]).unwrap(),
            Some(map_dev.as_vector()),
            experts,
            block.view(shape).unwrap(),
        )
        .unwrap();
        norm::add_rms_norm(
            block.view(shape).unwrap(),
            r_dev.view(shape).unwrap(),
            w_dev.as_vector(),
            h_two.view(shape).unwrap(),
            out_two.view(shape).unwrap(),
            1e-5,
        )
        .unwrap();
        // One.
        let (h_one, out_one) = (poisoned(), poisoned());
        let pairs = norm::MoePairs {
            pair_out: pair_dev.view([rows * k, cols]).unwrap(),
            shared_out: shared_view,
            topk_ids: ids_dev.view([rows, k]).unwrap(),
            expert_map: Some(map_dev.as_vector()),
            experts,
        };
        norm::moe_combine_add_rms_norm(&pairs, r_dev.view(shape).unwrap(), w_dev.as_vector(), h_one.view(shape).unwrap(), out_one.view(shape).unwrap(), 1e-5)
            .unwrap();
        let bits = |b: &DeviceBuffer<bf16>| b.to_vec().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&h_one), bits(&h_two), "residual, rows {rows} cols {cols} shared {shared}");
        assert_eq!(bits(&out_one), bits(&out_two), "normed, rows {rows} cols {cols} shared {shared}");
        // The pairs must cover k per row: one row too few is a typed error.
        let short = norm::MoePairs { pair_out: pair_dev.view([rows * k - 1, cols]).unwrap(), ..pairs };
        let err = norm::moe_combine_add_rms_norm(
            &short,
            r_dev.view(shape).unwrap(),
            w_dev.as_vector(),
            h_one.view(shape).unwrap(),
            out_one.view(shape).unwrap(),
            1e-5,
        )
        .unwrap_err();
        assert!(matches!(err, small4::Error::Shape { .. }), "{err}");
    }
}

backend_tests!(rms_norm_matches_reference, rms_norm_is_deterministic, rms_norm_rejects_bad_shapes, moe_combine_add_rms_norm_equals_combine_then_add_norm);

#[test]
fn no_gpu_is_a_typed_error_not_a_panic() {
    match small4::device::gpu() {
        Ok(device) => assert_eq!(device.name(), "cuda"),
        Err(e) => assert!(matches!(e, small4::Error::NoGpu(_)), "{e}"),
    }
}

#[test]
fn ptxas_reports_no_spills() {
    assert!(!small4::kernels::KERNEL_RESOURCES.is_empty());
    for k in small4::kernels::KERNEL_RESOURCES {
        assert_eq!((k.spill_stores, k.spill_loads), (0, 0), "{}::{} spills", k.module, k.kernel);
    }
}

/// The interpreter's counters for one fused launch: printed, and every global request is fully coalesced
/// (the sectors moved carry exactly the bytes the kernel asked for).
#[test]
fn rms_norm_counters_on_the_interpreter() {
    let device = small4::device::simulator();
    check_rms_norm(&device, 4, 4096, true, 11);
    let counters = device.last_launch_counters().expect("the interpreter reports counters");
    eprintln!("{counters}");
    assert_eq!(counters.kernel, "rms_norm_bf16");
    let requested = counters.global_bytes_read + counters.global_bytes_written;
    assert_eq!(counters.traffic_efficiency(requested), 1.0, "{counters}");
    assert_eq!(counters.shared_bank_conflicts, 0);
}
