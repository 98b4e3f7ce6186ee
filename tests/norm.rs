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
        norm::add_rms_norm(x_dev.view(shape).unwrap(), r_dev.view(shape).unwrap(), w_dev.as_vector(), h_dev.view(shape).unwrap(), out.view(shape).unwrap(), eps).unwrap();
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

backend_tests!(rms_norm_matches_reference, rms_norm_is_deterministic, rms_norm_rejects_bad_shapes);

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
