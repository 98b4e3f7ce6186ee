//! Tensor maps (`CUtensorMap`) for the TMA instructions, in the interpreter's own 128-byte encoding.
//!
//! Kernels never interpret a map's bytes: they pass its address to `cp.async.bulk.tensor` / `prefetch.tensormap`
//! or copy the 128 bytes, so the interpreter may define the layout (../shared/HOPPER-ASYNC.md §2.1). [`encode_tiled`]
//! takes exactly `cuTensorMapEncodeTiled`'s parameters and refuses what the driver refuses, so the same host code
//! makes the driver's map on a GPU and this one on the interpreter. All-zero bytes decode to a valid default map
//! (rank 1, one u8 element), as sm_90a allows building maps in a zeroed buffer (CUDA Programming Guide §4.11.2.2.2).
//!
//! Layout (little-endian): bytes 0..8 global address; 8..12 control word (bits 6:4 rank - 1, 10:7 element type in
//! the PTX `tensormap.replace` codes of PTX ISA Table 33, 12:11 interleave, 14:13 swizzle, 15 OOB fill, 17:16 L2
//! promotion); 12..44 the byte strides of dimensions 1..4 (u64 each); 44..64 global dims - 1 (u32 each); 64..69 box
//! dims - 1 (u8 each); 69..74 element strides - 1 (u8 each); the rest is zero.
//!
//! ```
//! use ptxsim::tensor_map::{encode_tiled, DataType, Interleave, L2Promotion, OobFill, Swizzle, TensorMap};
//! // A 100 x 64 bf16 matrix (row stride 128 bytes) loaded in 64 x 32 boxes with the 128-byte swizzle.
//! let map = encode_tiled(DataType::Bfloat16 as u32, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1],
//!     Interleave::None as u32, Swizzle::B128 as u32, L2Promotion::L2_128B as u32, OobFill::None as u32).unwrap();
//! let decoded = TensorMap::decode(&map);
//! assert_eq!((decoded.rank, decoded.global_dim[1], decoded.box_dim[0]), (2, 100, 64));
//! // The driver refuses a 64-element bf16 box row (128 bytes) with the 64-byte swizzle, and so does this encoder.
//! assert!(encode_tiled(DataType::Bfloat16 as u32, 2, 0x1000, &[64, 100], &[128], &[64, 32], &[1, 1],
//!     Interleave::None as u32, Swizzle::B64 as u32, L2Promotion::None as u32, OobFill::None as u32).is_err());
//! ```

use crate::SimError;

/// `CUtensorMapDataType` (cuda.h of CUDA 13.5; the packed 16U4/16U6 types, 13..=15, are not available on sm_90).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DataType {
    Uint8 = 0,
    Uint16,
    Uint32,
    Int32,
    Uint64,
    Int64,
    Float16,
    Float32,
    Float64,
    Bfloat16,
    Float32Ftz,
    Tfloat32,
    Tfloat32Ftz,
}

/// `CUtensorMapInterleave`.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Interleave {
    None = 0,
    B16,
    B32,
}

/// `CUtensorMapSwizzle` (the `128B_ATOM_*` modes, 4..=6, are not available on sm_90).
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Swizzle {
    None = 0,
    B32,
    B64,
    B128,
}

/// `CUtensorMapL2promotion`: a hint, kept in the map and otherwise ignored.
#[allow(missing_docs, non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum L2Promotion {
    None = 0,
    L2_64B,
    L2_128B,
    L2_256B,
}

/// `CUtensorMapFloatOOBfill`.
#[allow(missing_docs)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum OobFill {
    None = 0,
    NanRequestZeroFma,
}

/// Element bytes of each `CUtensorMapDataType`.
const ELEMENT_BYTES: [u32; 13] = [1, 2, 4, 4, 8, 8, 2, 4, 8, 2, 4, 4, 4];
/// `CUtensorMapDataType` -> PTX ISA Table 33 (`tensormap.replace` .elemtype) codes, and back.
const TO_PTX_CODE: [u32; 13] = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 8, 11, 12];
const FROM_PTX_CODE: [u32; 13] = [0, 1, 2, 3, 4, 5, 6, 7, 10, 8, 9, 11, 12];

/// A decoded tensor map. Arrays hold `rank` meaningful entries; `global_strides[i]` is the byte stride of dimension
/// `i` (dimension 0's is the element size).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMap {
    /// Start of the tensor in global memory.
    pub global_address: u64,
    /// `CUtensorMapDataType` value.
    pub data_type: u32,
    /// Dimensions, 1..=5.
    pub rank: u32,
    /// Elements along each dimension.
    pub global_dim: [u64; 5],
    /// Byte stride of each dimension.
    pub global_strides: [u64; 5],
    /// Box extent along each dimension, in elements (before element strides).
    pub box_dim: [u32; 5],
    /// Traversal step along each dimension.
    pub element_strides: [u32; 5],
    /// `CUtensorMapInterleave` value.
    pub interleave: u32,
    /// `CUtensorMapSwizzle` value.
    pub swizzle: u32,
    /// `CUtensorMapL2promotion` value.
    pub l2_promotion: u32,
    /// `CUtensorMapFloatOOBfill` value.
    pub oob_fill: u32,
}

impl TensorMap {
    /// Bytes per element.
    pub fn element_bytes(&self) -> u32 {
        ELEMENT_BYTES[self.data_type as usize]
    }

    /// Decodes 128 bytes in this module's layout (any bytes decode; all zero is rank 1, one u8 element).
    pub fn decode(bytes: &[u8; 128]) -> TensorMap {
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
        let ctrl = u32_at(8);
        let code = (ctrl >> 7) & 0xf;
        let data_type = FROM_PTX_CODE.get(code as usize).copied().unwrap_or(0);
        let mut m = TensorMap {
            global_address: u64_at(0),
            data_type,
            rank: ((ctrl >> 4) & 7) + 1,
            global_dim: [0; 5],
            global_strides: [0; 5],
            box_dim: [0; 5],
            element_strides: [0; 5],
            interleave: (ctrl >> 11) & 3,
            swizzle: (ctrl >> 13) & 3,
            oob_fill: (ctrl >> 15) & 1,
            l2_promotion: (ctrl >> 16) & 3,
        };
        m.global_strides[0] = m.element_bytes() as u64;
        for i in 0..5 {
            if i > 0 {
                m.global_strides[i] = u64_at(12 + 8 * (i - 1));
            }
            m.global_dim[i] = u32_at(44 + 4 * i) as u64 + 1;
            m.box_dim[i] = bytes[64 + i] as u32 + 1;
            m.element_strides[i] = bytes[69 + i] as u32 + 1;
        }
        m
    }

    /// The 128 bytes of this map (the inverse of `decode` for maps `encode_tiled` accepts).
    pub fn encode(&self) -> [u8; 128] {
        let mut b = [0u8; 128];
        b[0..8].copy_from_slice(&self.global_address.to_le_bytes());
        let ctrl = (self.rank - 1) << 4
            | TO_PTX_CODE[self.data_type as usize] << 7
            | self.interleave << 11
            | self.swizzle << 13
            | self.oob_fill << 15
            | self.l2_promotion << 16;
        b[8..12].copy_from_slice(&ctrl.to_le_bytes());
        for i in 0..5 {
            if i > 0 {
                b[12 + 8 * (i - 1)..20 + 8 * (i - 1)].copy_from_slice(&self.global_strides[i].to_le_bytes());
            }
            b[44 + 4 * i..48 + 4 * i].copy_from_slice(&(self.global_dim[i].max(1) as u32 - 1).to_le_bytes());
            b[64 + i] = (self.box_dim[i].max(1) - 1) as u8;
            b[69 + i] = (self.element_strides[i].max(1) - 1) as u8;
        }
        b
    }
}

/// `cuTensorMapEncodeTiled` for the interpreter: the same parameters (enum values as the driver takes them), the
/// driver's validation, and this module's byte layout. Each refusal names the rule; the rules are those of the
/// `cuTensorMapEncodeTiled` documentation in cuda.h (CUDA 13.5) unless marked otherwise.
#[allow(clippy::too_many_arguments)]
pub fn encode_tiled(
    data_type: u32,
    rank: u32,
    global_address: u64,
    global_dim: &[u64],
    global_strides: &[u64],
    box_dim: &[u32],
    element_strides: &[u32],
    interleave: u32,
    swizzle: u32,
    l2_promotion: u32,
    oob_fill: u32,
) -> Result<[u8; 128], SimError> {
    let refuse = |rule: String| Err(SimError::host(format!("cuTensorMapEncodeTiled: {rule}")));
    // cuda.h: tensorDataType is a CUtensorMapDataType; the packed 16U4/16U6 types are sm_100+ (HOPPER-ASYNC.md §2.1).
    if data_type >= 13 {
        return refuse(format!("data type {data_type} is not a CUtensorMapDataType available on sm_90 (0..=12)"));
    }
    // cuda.h: interleave / swizzle / l2Promotion / oobFill are values of their enums; 128B_ATOM swizzles are sm_100+.
    if interleave > 2 {
        return refuse(format!("interleave {interleave} is not a CUtensorMapInterleave"));
    }
    if swizzle > 3 {
        return refuse(format!("swizzle {swizzle} is not a CUtensorMapSwizzle available on sm_90 (NONE, 32B, 64B, 128B)"));
    }
    if l2_promotion > 3 {
        return refuse(format!("l2Promotion {l2_promotion} is not a CUtensorMapL2promotion"));
    }
    if oob_fill > 1 {
        return refuse(format!("oobFill {oob_fill} is not a CUtensorMapFloatOOBfill"));
    }
    // cuda.h: rank non-zero and <= 5; >= 3 when interleaved.
    if !(1..=5).contains(&rank) {
        return refuse(format!("tensorRank {rank} outside 1..=5"));
    }
    if interleave != Interleave::None as u32 && rank < 3 {
        return refuse(format!("tensorRank {rank} with interleave: needs rank >= 3"));
    }
    let r = rank as usize;
    if global_dim.len() != r || global_strides.len() != r - 1 || box_dim.len() != r || element_strides.len() != r {
        return refuse(format!(
            "rank {rank} needs {r} global dims, {} strides, {r} box dims and {r} element strides (got {}, {}, {}, {})",
            r - 1,
            global_dim.len(),
            global_strides.len(),
            box_dim.len(),
            element_strides.len()
        ));
    }
    // cuda.h: globalAddress 16-byte aligned, 32 with INTERLEAVE_32B.
    let align = if interleave == Interleave::B32 as u32 { 32 } else { 16 };
    if global_address % align != 0 {
        return refuse(format!("globalAddress {global_address:#x} is not {align}-byte aligned"));
    }
    // cuda.h: globalDim non-zero and <= 2^31.
    if let Some((i, d)) = global_dim.iter().enumerate().find(|(_, &d)| d == 0 || d > 1 << 31) {
        return refuse(format!("globalDim[{i}] = {d} outside 1..=2^31"));
    }
    // cuda.h: strides multiples of 16 (32 with INTERLEAVE_32B) and < 2^40. They need not increase.
    if let Some((i, s)) = global_strides.iter().enumerate().find(|(_, &s)| s % align != 0 || s >= 1 << 40) {
        return refuse(format!("globalStrides[{i}] = {s} is not a multiple of {align} below 2^40"));
    }
    // cuda.h: box dims non-zero and <= 256; without interleave boxDim[0] * element size a multiple of 16.
    if let Some((i, b)) = box_dim.iter().enumerate().find(|(_, &b)| b == 0 || b > 256) {
        return refuse(format!("boxDim[{i}] = {b} outside 1..=256"));
    }
    let eb = ELEMENT_BYTES[data_type as usize];
    let inner = box_dim[0] * eb;
    if interleave == Interleave::None as u32 && inner % 16 != 0 {
        return refuse(format!("boxDim[0] * element size = {inner} bytes is not a multiple of 16"));
    }
    // cuda.h: element strides non-zero and <= 8.
    if let Some((i, e)) = element_strides.iter().enumerate().find(|(_, &e)| e == 0 || e > 8) {
        return refuse(format!("elementStrides[{i}] = {e} outside 1..=8"));
    }
    // cuda.h: without interleave, a swizzle bounds the box's inner dimension: <= 32 / 64 / 128 bytes.
    if interleave == Interleave::None as u32 && swizzle != Swizzle::None as u32 {
        let span = 16u32 << swizzle;
        if inner > span {
            return refuse(format!("boxDim[0] * element size = {inner} bytes exceeds the {span}-byte swizzle span"));
        }
    }
    // cuda.h: INTERLEAVE_32B requires SWIZZLE_32B.
    if interleave == Interleave::B32 as u32 && swizzle != Swizzle::B32 as u32 {
        return refuse("INTERLEAVE_32B requires SWIZZLE_32B".into());
    }
    // cuda.h: the NaN OOB fill only for floating-point data types.
    let is_float = matches!(data_type, 6..=12);
    if oob_fill == OobFill::NanRequestZeroFma as u32 && !is_float {
        return refuse(format!("oobFill NAN_REQUEST_ZERO_FMA needs a floating-point data type (got {data_type})"));
    }
    let mut m = TensorMap {
        global_address,
        data_type,
        rank,
        global_dim: [1; 5],
        global_strides: [0; 5],
        box_dim: [1; 5],
        element_strides: [1; 5],
        interleave,
        swizzle,
        l2_promotion,
        oob_fill,
    };
    m.global_strides[0] = eb as u64;
    for i in 0..r {
        m.global_dim[i] = global_dim[i];
        m.box_dim[i] = box_dim[i];
        m.element_strides[i] = element_strides[i];
        if i > 0 {
            m.global_strides[i] = global_strides[i - 1];
        }
    }
    Ok(m.encode())
}

/// The shared-memory swizzle of TMA and wgmma: 16-byte chunk bits 4..7 XOR 128-byte row bits 7..10 of the absolute
/// CTA shared offset, over 2 / 4 / 8 rows for the 32 / 64 / 128-byte modes (PTX ISA §5.5.7; CuTe `Swizzle<B,4,3>`;
/// HOPPER-ASYNC.md §2.3). `swizzle` is the `CUtensorMapSwizzle` value (0 = none).
pub fn swizzle_offset(offset: u32, swizzle: u32) -> u32 {
    if swizzle == 0 {
        return offset;
    }
    let rows_mask = (1u32 << swizzle) - 1;
    offset ^ (((offset >> 7) & rows_mask) << 4)
}
