//! Tensor maps (`CUtensorMap`) for TMA tile loads, made through the [`Backend`]: the driver's
//! `cuTensorMapEncodeTiled` on a GPU, the PTX interpreter's own encoder (`ptxsim::tensor_map`) on the CPU. The
//! description is the driver call's parameter list, the encoded map is 128 opaque bytes that a kernel receives inside
//! its parameter struct (a `Small4TensorMap` field of params.h; the kernel declares the struct
//! `const __grid_constant__`, so the map stays in the parameter space, where TMA may read it).
//!
//! A map of a 100 x 64 bf16 matrix loaded in 64 x 64 boxes with the 128-byte swizzle, and two descriptions the
//! driver refuses (both backends refuse them too, with `Error::InvalidArgument`):
//!
//! ```
//! use small4::device::simulator;
//! use small4::device::tensor_map::{DataType, Interleave, L2Promotion, OobFill, Swizzle, TiledTensorMap};
//!
//! let device = simulator();
//! let x = small4::DeviceBuffer::<half::bf16>::alloc(&device, 100 * 64)?;
//! let mut tiled = TiledTensorMap {
//!     data_type: DataType::Bfloat16,
//!     rank: 2,
//!     global_address: x.addr(),
//!     global_dim: vec![64, 100],
//!     global_strides: vec![128],
//!     box_dim: vec![64, 64],
//!     element_strides: vec![1, 1],
//!     interleave: Interleave::None,
//!     swizzle: Swizzle::B128,
//!     l2_promotion: L2Promotion::L2_128B,
//!     oob_fill: OobFill::None,
//! };
//! let map = device.encode_tensor_map_tiled(&tiled)?;
//! assert_eq!(std::mem::align_of_val(&map), 64); // what the driver needs of a map in a kernel parameter
//!
//! tiled.global_strides = vec![100]; // row stride not a multiple of 16 bytes
//! assert!(matches!(device.encode_tensor_map_tiled(&tiled), Err(small4::Error::InvalidArgument(_))));
//! tiled.global_strides = vec![128];
//! tiled.box_dim = vec![128, 64]; // a 256-byte box row exceeds the 128-byte swizzle span
//! assert!(matches!(device.encode_tensor_map_tiled(&tiled), Err(small4::Error::InvalidArgument(_))));
//! # Ok::<(), small4::Error>(())
//! ```

use std::sync::{Arc, Mutex, PoisonError, Weak};

use super::{Backend, Device};
use crate::error::{Error, Result};

pub use ptxsim::tensor_map::{DataType, Interleave, L2Promotion, OobFill, Swizzle};

/// The parameters of `cuTensorMapEncodeTiled` (CUDA driver API), one field each, in the driver's order and units:
/// `global_dim` in elements (dimension 0 innermost), `global_strides` in bytes for dimensions 1.. (`rank - 1` of
/// them; dimension 0's stride is the element size), `box_dim` and `element_strides` in elements. The array lengths
/// must match `rank`: the driver reads `rank` entries of each, so a mismatch is refused before any backend sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TiledTensorMap {
    /// `tensorDataType`.
    pub data_type: DataType,
    /// `tensorRank`, 1..=5 (3..=5 when interleaved).
    pub rank: u32,
    /// `globalAddress`: a device address, 16-byte aligned (32 with [`Interleave::B32`]).
    pub global_address: u64,
    /// `globalDim[rank]`: elements along each dimension.
    pub global_dim: Vec<u64>,
    /// `globalStrides[rank - 1]`: bytes between consecutive indices of dimensions 1..rank (multiples of 16).
    pub global_strides: Vec<u64>,
    /// `boxDim[rank]`: the box a tile load copies, in elements (1..=256 each).
    pub box_dim: Vec<u32>,
    /// `elementStrides[rank]`: the traversal step along each dimension (1..=8).
    pub element_strides: Vec<u32>,
    /// `interleave`.
    pub interleave: Interleave,
    /// `swizzle`: the shared-memory layout a load writes (it bounds the box's inner extent).
    pub swizzle: Swizzle,
    /// `l2Promotion`: an L2 hint.
    pub l2_promotion: L2Promotion,
    /// `oobFill`: what a load writes for out-of-bounds elements ([`OobFill::None`]: zeros).
    pub oob_fill: OobFill,
}

impl TiledTensorMap {
    /// Refuses arrays whose lengths disagree with `rank` (`Error::InvalidArgument`): the driver would read past them.
    pub(crate) fn check_lengths(&self) -> Result<()> {
        let r = self.rank as usize;
        if !(1..=5).contains(&r) {
            return Err(refused(format!("tensorRank {} outside 1..=5", self.rank)));
        }
        if self.global_dim.len() != r || self.global_strides.len() != r - 1 || self.box_dim.len() != r || self.element_strides.len() != r {
            return Err(refused(format!(
                "rank {r} needs {r} global dims, {} strides, {r} box dims and {r} element strides (got {}, {}, {}, {})",
                r - 1,
                self.global_dim.len(),
                self.global_strides.len(),
                self.box_dim.len(),
                self.element_strides.len()
            )));
        }
        Ok(())
    }

    /// The interpreter's encoding (ptxsim's `encode_tiled`, which applies the driver's rules).
    pub(crate) fn encode_for_interpreter(&self) -> Result<TensorMap> {
        self.check_lengths()?;
        let bytes = ptxsim::tensor_map::encode_tiled(
            self.data_type as u32,
            self.rank,
            self.global_address,
            &self.global_dim,
            &self.global_strides,
            &self.box_dim,
            &self.element_strides,
            self.interleave as u32,
            self.swizzle as u32,
            self.l2_promotion as u32,
            self.oob_fill as u32,
        )
        .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(TensorMap::from_bytes(&bytes))
    }
}

/// A refusal in the driver's words.
pub(crate) fn refused(rule: String) -> Error {
    Error::InvalidArgument(format!("cuTensorMapEncodeTiled: {rule}"))
}

/// An encoded tensor map: `CUtensorMap`'s 128 opaque bytes, 64-byte aligned as the driver requires of a map in a
/// kernel parameter. Only TMA instructions read it; copy it into the kernel's parameter struct unchanged.
#[repr(C, align(64))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorMap {
    /// The bytes, as the backend's encoder wrote them (little-endian words).
    pub opaque: [u64; 16],
}

impl TensorMap {
    /// The map from its 128 bytes.
    pub(crate) fn from_bytes(bytes: &[u8; 128]) -> Self {
        let mut opaque = [0u64; 16];
        for (word, chunk) in opaque.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        }
        TensorMap { opaque }
    }

    /// The 128 bytes of the map.
    pub fn to_bytes(&self) -> [u8; 128] {
        let mut bytes = [0u8; 128];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(self.opaque) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        bytes
    }
}

/// The most maps [`encode_cached`] keeps per device: more than the distinct (activation buffer, shape) pairs of a
/// forward pass's dense TMA launches (a few per layer, on the same scratch buffers in every layer), so all but a
/// step's first launches of each find their map.
const CACHED_MAPS_PER_DEVICE: usize = 32;

/// A map [`encode_cached`] made: the device (held weakly, so its allocation, and with it the key, cannot pass to
/// another device while the entry exists), the description and the map.
type CachedMap = (Weak<dyn Backend>, TiledTensorMap, TensorMap);

/// [`encode_cached`]'s maps, least recently used first.
static CACHED_MAPS: Mutex<Vec<CachedMap>> = Mutex::new(Vec::new());

/// `device.encode_tensor_map_tiled(tiled)`, reusing the map encoded earlier for the same device and the same
/// description (address, dims, strides, box and every other field): a launch whose buffer and shape are those of an
/// earlier launch pays no encoding (a driver call on a GPU). A map is a function of its description alone, so a reused
/// map is the map the device would encode now, also when a buffer was freed and another allocated at its address.
/// Refused descriptions are not kept (each call reports the refusal).
pub(crate) fn encode_cached(device: &Device, tiled: &TiledTensorMap) -> Result<TensorMap> {
    let key = Arc::downgrade(device);
    let same_device = |(owner, _, _): &CachedMap| Weak::ptr_eq(owner, &key);
    {
        let mut cache = CACHED_MAPS.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = cache.iter().position(|entry| same_device(entry) && entry.1 == *tiled) {
            let entry = cache.remove(i);
            let map = entry.2;
            cache.push(entry);
            return Ok(map);
        }
    }
    let map = device.encode_tensor_map_tiled(tiled)?;
    let mut cache = CACHED_MAPS.lock().unwrap_or_else(PoisonError::into_inner);
    cache.retain(|(owner, _, _)| owner.strong_count() > 0);
    if cache.iter().filter(|entry| same_device(entry)).count() >= CACHED_MAPS_PER_DEVICE {
        let oldest = cache.iter().position(same_device).expect("the device has entries");
        cache.remove(oldest);
    }
    cache.push((key, tiled.clone(), map));
    Ok(map)
}
