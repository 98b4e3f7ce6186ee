//! Tensor maps through the `Backend` (`src/device/tensor_map.rs`): what `cuTensorMapEncodeTiled` refuses, each
//! driver rule once, is `Error::InvalidArgument` on every backend; what it accepts encodes, and on the interpreter the
//! bytes decode (ptxsim's own layout) to exactly the description. The kernel side (a TMA load through such a map) is
//! tests/moe_wgmma.rs's dense GEMMs.

mod common;

use small4::device::tensor_map::{DataType, Interleave, L2Promotion, OobFill, Swizzle, TensorMap, TiledTensorMap};
use small4::device::{Device, DeviceBuffer};
use small4::Error;

/// The map the dense wgmma GEMM uses: a 3-d bf16 tensor {k 4096, rows 70, heads 2}, rows 8200 bytes apart (wider than
/// K), heads 70 rows apart, boxes of 64 x 64 x 1 with the 128-byte swizzle.
fn dense_gemm_map(address: u64) -> TiledTensorMap {
    TiledTensorMap {
        data_type: DataType::Bfloat16,
        rank: 3,
        global_address: address,
        global_dim: vec![4096, 70, 2],
        global_strides: vec![8208, 8208 * 70],
        box_dim: vec![64, 64, 1],
        element_strides: vec![1, 1, 1],
        interleave: Interleave::None,
        swizzle: Swizzle::B128,
        l2_promotion: L2Promotion::L2_128B,
        oob_fill: OobFill::None,
    }
}

/// An edit that breaks one rule of a valid map.
type Breakage = fn(&mut TiledTensorMap);

/// Every rule of the driver's documentation that a tiled map can break, one broken at a time from a valid map.
fn refusals_are_invalid_arguments(device: &Device) {
    let buffer = DeviceBuffer::<u8>::alloc(device, 8208 * 140).unwrap();
    let valid = dense_gemm_map(buffer.addr());
    device.encode_tensor_map_tiled(&valid).expect("the valid map encodes");
    let cases: Vec<(&str, Breakage)> = vec![
        ("rank 0", |m| m.rank = 0),
        ("rank 6", |m| m.rank = 6),
        ("arrays shorter than the rank", |m| m.rank = 4),
        ("a stride too many", |m| m.global_strides.push(16)),
        ("address not 16-byte aligned", |m| m.global_address += 8),
        ("a zero dimension", |m| m.global_dim[1] = 0),
        ("a stride not a multiple of 16", |m| m.global_strides[0] = 8200),
        ("a stride of 2^40", |m| m.global_strides[1] = 1 << 40),
        ("a zero box dimension", |m| m.box_dim[2] = 0),
        ("a box dimension over 256", |m| m.box_dim[1] = 257),
        ("an inner box row not a multiple of 16 bytes", |m| (m.box_dim[0], m.swizzle) = (60, Swizzle::None)),
        ("an inner box row wider than the swizzle span", |m| m.swizzle = Swizzle::B64),
        ("a zero element stride", |m| m.element_strides[1] = 0),
        ("an element stride over 8", |m| m.element_strides[1] = 9),
        ("INTERLEAVE_32B without SWIZZLE_32B", |m| (m.interleave, m.box_dim[0]) = (Interleave::B32, 16)),
        ("the NaN fill on an integer type", |m| (m.data_type, m.oob_fill) = (DataType::Uint16, OobFill::NanRequestZeroFma)),
    ];
    for (what, break_it) in cases {
        let mut map = valid.clone();
        break_it(&mut map);
        match device.encode_tensor_map_tiled(&map) {
            Err(Error::InvalidArgument(message)) => assert!(message.contains("cuTensorMapEncodeTiled"), "{what}: {message}"),
            other => panic!("{what}: expected Error::InvalidArgument, got {other:?}"),
        }
    }
    // Interleave needs rank >= 3.
    let map = TiledTensorMap {
        rank: 2,
        global_dim: vec![4096, 70],
        global_strides: vec![8208],
        box_dim: vec![16, 64],
        element_strides: vec![1, 1],
        interleave: Interleave::B16,
        swizzle: Swizzle::None,
        ..valid
    };
    assert!(matches!(device.encode_tensor_map_tiled(&map), Err(Error::InvalidArgument(_))), "interleave at rank 2");
}

/// An accepted map encodes to 128 bytes, 64-byte aligned; on the interpreter they decode to the description.
fn accepted_maps_round_trip(device: &Device) {
    let buffer = DeviceBuffer::<u8>::alloc(device, 8208 * 140).unwrap();
    let map: TensorMap = device.encode_tensor_map_tiled(&dense_gemm_map(buffer.addr())).unwrap();
    assert_eq!((std::mem::size_of::<TensorMap>(), std::mem::align_of::<TensorMap>()), (128, 64));
    if device.name() == "sim" {
        let decoded = ptxsim::tensor_map::TensorMap::decode(&map.to_bytes());
        assert_eq!(decoded.global_address, buffer.addr());
        assert_eq!((decoded.data_type, decoded.rank), (DataType::Bfloat16 as u32, 3));
        assert_eq!(decoded.global_dim[..3], [4096, 70, 2]);
        assert_eq!(decoded.global_strides[..3], [2, 8208, 8208 * 70]);
        assert_eq!((decoded.box_dim[..3].to_vec(), decoded.element_strides[..3].to_vec()), (vec![64, 64, 1], vec![1, 1, 1]));
        assert_eq!(
            (decoded.interleave, decoded.swizzle, decoded.l2_promotion, decoded.oob_fill),
            (Interleave::None as u32, Swizzle::B128 as u32, L2Promotion::L2_128B as u32, OobFill::None as u32)
        );
    }
    // The same description encodes to the same bytes (a map is plain data, fit for a captured launch parameter).
    assert_eq!(device.encode_tensor_map_tiled(&dense_gemm_map(buffer.addr())).unwrap(), map);
}

backend_tests!(refusals_are_invalid_arguments, accepted_maps_round_trip);
