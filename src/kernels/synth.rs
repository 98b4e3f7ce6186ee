//! Synthetic weights generated on the device (`cuda/synth.cu`), straight into the kernels' final layouts: plain bf16
//! arrays (embedding, norms, router) and the packed layout of `quant::repack` ([`DeviceWeights`]) for any number of
//! experts at once. The values are exactly those of `model::synth` (its module doc is the contract): the packed
//! arrays equal `repack_linear` / `repack_gate_up` of the CPU matrices, bit for bit, with no host copy of weights
//! (only the experts' 8-byte keys go up).
//!
//! ```
//! use small4::device::simulator;
//! use small4::kernels::synth::{packed, plain, View};
//! use small4::model::synth::{TensorKind, TensorSpec};
//! use small4::quant::repack::{repack_linear, MatrixRef, PackedWeights};
//! use small4::quant::WeightFormat;
//!
//! let device = simulator();
//! // Two nvfp4 "experts" [8, 128] generated on the device, against the CPU matrices repacked.
//! let specs: Vec<TensorSpec> = (0..2).map(|e| TensorSpec::matrix(100 + e, 8, 128, WeightFormat::Nvfp4, 0.1)).collect();
//! let on_device = packed(&device, &specs, View::Whole)?;
//! let cpu: Vec<_> = specs.iter().map(|s| s.generate()).collect::<small4::Result<_>>()?;
//! let want: PackedWeights = repack_linear(&cpu.iter().map(MatrixRef::from).collect::<Vec<_>>())?;
//! assert_eq!(on_device.data.to_vec()?, want.data);
//! assert_eq!(on_device.fp4_scales.as_ref().unwrap().to_vec()?, want.fp4_scales.unwrap());
//!
//! // A norm weight vector.
//! let norm = TensorSpec { key: 5, rows: 64, cols: 1, kind: TensorKind::Norm };
//! assert_eq!(plain(&device, &norm)?.to_vec()?, norm.bf16_values()?);
//! # Ok::<(), small4::Error>(())
//! ```

use half::bf16;

use super::gemm::DeviceWeights;
use super::modules::SYNTH;
use super::params::{SynthPackedParams, SynthPlainParams};
use super::to_i32;
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};
use crate::model::synth::{TensorKind, TensorSpec};
use crate::quant::repack::{tile_bytes, K_ALIGN, ROW_ALIGN};
use crate::quant::WeightFormat;

const PLAIN: Kernel = Kernel { module: SYNTH, entry: "synth_plain" };
const CODES: Kernel = Kernel { module: SYNTH, entry: "synth_packed_codes" };
const SCALES: Kernel = Kernel { module: SYNTH, entry: "synth_packed_scales" };

const THREADS: u32 = 256;
/// Grid cap of the grid-stride loops: 8 blocks of 256 threads on each of an H100's 132 SMs (`TARGET_SMS`).
const MAX_BLOCKS: u32 = super::TARGET_SMS as u32 * 8;

fn launch<P: Copy>(device: &Device, kernel: &Kernel, items: usize, params: &P) -> Result<()> {
    if items == 0 {
        return Ok(());
    }
    let blocks = super::blocks_for(items, THREADS as usize).clamp(1, MAX_BLOCKS);
    launch_with(device, kernel, &LaunchConfig { grid: Dim3::x(blocks), block: Dim3::x(THREADS), shared_bytes: 0 }, params)
}

/// A bf16 tensor (a norm vector, or a bf16 matrix such as the embedding or router, row-major) generated on `device`.
/// `Error::InvalidArgument` for a quantised matrix spec.
pub fn plain(device: &Device, spec: &TensorSpec) -> Result<DeviceBuffer<bf16>> {
    let (kind, unit) = match spec.kind {
        TensorKind::Norm => (1, 0.0),
        TensorKind::Matrix { format: WeightFormat::Bf16, unit } => (0, unit),
        TensorKind::Matrix { format, .. } => return Err(Error::InvalidArgument(format!("synth plain: a {format} matrix is not a bf16 array"))),
    };
    let n = spec.rows * spec.cols;
    let out = DeviceBuffer::<bf16>::alloc(device, n)?;
    let params = SynthPlainParams { out: out.mut_ptr(), key: spec.key, n: n as i64, unit, kind };
    launch(device, &PLAIN, n, &params)?;
    Ok(out)
}

/// Which part of each expert's checkpoint matrix `[rows, cols]` is packed (the slices `DeviceModel::load` derives).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// The whole matrix.
    Whole,
    /// Rows `first..first + count`.
    Rows {
        /// First row.
        first: usize,
        /// Rows taken.
        count: usize,
    },
    /// Rows `first..first + count`, transposed: `[cols, count]` (FP8 block-128: the count padded with zero columns
    /// to 128, as `DeviceModel::load` pads W_UK).
    TransposedRows {
        /// First row.
        first: usize,
        /// Rows taken (the packed matrix's columns).
        count: usize,
    },
}

/// Geometry of one generation: where the packed element (row, k) of source matrix m comes from.
struct Source {
    rows: usize,
    k_dim: usize,
    k_valid: usize,
    base: usize,
    row_stride: usize,
    col_stride: usize,
}

fn source(spec: &TensorSpec, format: WeightFormat, view: View) -> Result<Source> {
    let (rows, cols) = (spec.rows, spec.cols);
    let range = |first: usize, count: usize| -> Result<()> {
        if count == 0 || first + count > rows {
            return Err(Error::OutOfRange { what: "synth view rows".into(), index: (first + count) as i64, limit: rows as i64 });
        }
        Ok(())
    };
    Ok(match view {
        View::Whole => Source { rows, k_dim: cols, k_valid: cols, base: 0, row_stride: cols, col_stride: 1 },
        View::Rows { first, count } => {
            range(first, count)?;
            Source { rows: count, k_dim: cols, k_valid: cols, base: first * cols, row_stride: cols, col_stride: 1 }
        }
        View::TransposedRows { first, count } => {
            range(first, count)?;
            if !matches!(format, WeightFormat::Bf16 | WeightFormat::Fp8PerTensor | WeightFormat::Fp8Block128) {
                return Err(Error::InvalidArgument(format!("synth: a transposed view of a {format} matrix (bf16 or FP8 only)")));
            }
            let k_dim = if format == WeightFormat::Fp8Block128 { count.next_multiple_of(128) } else { count };
            Source { rows: cols, k_dim, k_valid: count, base: first * cols, row_stride: 1, col_stride: cols }
        }
    })
}

/// Every expert's spec must share the first's shape, format and unit. Returns (format, unit).
fn common_kind(specs: &[&TensorSpec]) -> Result<(WeightFormat, f32)> {
    let first = specs.first().ok_or_else(|| Error::InvalidArgument("synth packed: no matrices".into()))?;
    let TensorKind::Matrix { format, unit } = first.kind else {
        return Err(Error::InvalidArgument("synth packed: a norm vector is not a matrix".into()));
    };
    for s in specs {
        if (s.rows, s.cols, s.kind) != (first.rows, first.cols, first.kind) {
            return Err(Error::shape(
                "synth packed matrix",
                format!("{format} [{}, {}]", first.rows, first.cols),
                format!("{:?} [{}, {}]", s.kind, s.rows, s.cols),
            ));
        }
    }
    format.check_shape(first.rows, first.cols)?;
    Ok((format, unit))
}

/// Experts `specs` (same shape and format) generated on `device` into the packed layout of `quant::repack::repack_linear`
/// of their `view`s. Errors: `Error::InvalidArgument` for no specs, a norm spec, a transposed view of a 4-bit format
/// or a reduction length the layout cannot hold (not a multiple of 64; INT4 groups not dividing it; FP8 block-128
/// not a multiple of 128); `Error::Shape` for specs of different shapes; `Error::OutOfRange` for a view past the rows.
pub fn packed(device: &Device, specs: &[TensorSpec], view: View) -> Result<DeviceWeights> {
    let refs: Vec<&TensorSpec> = specs.iter().collect();
    let (format, unit) = common_kind(&refs)?;
    let src = source(&specs[0], format, view)?;
    let keys: Vec<u64> = specs.iter().map(|s| s.key).collect();
    generate(device, &keys, 1, format, unit, specs[0].cols, &src, src.rows, false)
}

/// Experts' gate (w1) and up (w3) projections generated on `device` into the fused SwiGLU layout of
/// `quant::repack::repack_gate_up`. Errors as [`packed`], and `Error::InvalidArgument` when the hidden size is not a
/// multiple of 8.
pub fn packed_gate_up(device: &Device, pairs: &[(TensorSpec, TensorSpec)]) -> Result<DeviceWeights> {
    let refs: Vec<&TensorSpec> = pairs.iter().flat_map(|(a, b)| [a, b]).collect();
    let (format, unit) = common_kind(&refs)?;
    let hidden = pairs[0].0.rows;
    if hidden % 8 != 0 {
        return Err(Error::InvalidArgument(format!("synth gate_up: hidden {hidden} must be a multiple of 8")));
    }
    let src = source(&pairs[0].0, format, View::Whole)?;
    let keys: Vec<u64> = refs.iter().map(|s| s.key).collect();
    generate(device, &keys, 2, format, unit, pairs[0].0.cols, &src, hidden, true)
}

#[allow(clippy::too_many_arguments)]
fn generate(
    device: &Device,
    keys: &[u64],
    mats: usize,
    format: WeightFormat,
    unit: f32,
    src_cols: usize,
    src: &Source,
    out_cols: usize,
    swiglu: bool,
) -> Result<DeviceWeights> {
    let experts = keys.len() / mats;
    let k_dim = src.k_dim;
    let group = match format {
        WeightFormat::Int4 { group, .. } => group,
        _ => 0,
    };
    if k_dim == 0
        || k_dim % K_ALIGN != 0
        || (group > 0 && (group % K_ALIGN != 0 || k_dim % group != 0))
        || (format == WeightFormat::Fp8Block128 && k_dim % 128 != 0)
    {
        return Err(Error::InvalidArgument(format!("synth packed: {format} with a reduction length of {k_dim}")));
    }
    let rows_padded = (if swiglu { 2 * out_cols } else { out_cols }).next_multiple_of(ROW_ALIGN);
    let tiles = rows_padded / 16;
    let k_blocks = k_dim / K_ALIGN;
    let expert_stride = tiles * k_blocks * tile_bytes(format);
    let data = DeviceBuffer::<u8>::alloc(device, experts * expert_stride)?;
    let device_keys = DeviceBuffer::from_slice(device, keys)?;
    let per_row = |n: usize| experts * rows_padded * n;
    let row_scales = matches!(format, WeightFormat::Fp8PerTensor | WeightFormat::Nvfp4).then(|| DeviceBuffer::<f32>::alloc(device, per_row(1))).transpose()?;
    let block_scales =
        (format == WeightFormat::Fp8Block128).then(|| DeviceBuffer::<f32>::alloc(device, experts * (k_dim / 128) * (rows_padded / 8))).transpose()?;
    let group_scales = (group > 0).then(|| DeviceBuffer::<bf16>::alloc(device, per_row(k_dim / group.max(1)))).transpose()?;
    let group_zeros =
        matches!(format, WeightFormat::Int4 { zero_point: true, .. }).then(|| DeviceBuffer::<u8>::alloc(device, per_row(k_dim / group.max(1)))).transpose()?;
    let fp4_scales = (format == WeightFormat::Nvfp4).then(|| DeviceBuffer::<u8>::alloc(device, per_row(k_dim / 16))).transpose()?;
    let format_code = match format {
        WeightFormat::Bf16 => 0,
        WeightFormat::Fp8PerTensor => 1,
        WeightFormat::Fp8Block128 => 2,
        WeightFormat::Int4 { .. } => 3,
        WeightFormat::Nvfp4 => 4,
    };
    let mut params = SynthPackedParams {
        data: data.mut_ptr(),
        row_scales: row_scales.as_ref().map_or(std::ptr::null_mut(), |b| b.mut_ptr()),
        block_scales: block_scales.as_ref().map_or(std::ptr::null_mut(), |b| b.mut_ptr()),
        group_scales: group_scales.as_ref().map_or(std::ptr::null_mut(), |b| b.mut_ptr()),
        group_zeros: group_zeros.as_ref().map_or(std::ptr::null_mut(), |b| b.mut_ptr()),
        fp4_scales: fp4_scales.as_ref().map_or(std::ptr::null_mut(), |b| b.mut_ptr()),
        keys: device_keys.ptr(),
        base: src.base as i64,
        row_stride: src.row_stride as i64,
        col_stride: src.col_stride as i64,
        src_cols: src_cols as i64,
        experts: to_i32("synth experts", experts)?,
        mats: mats as i32,
        rows: to_i32("synth rows", src.rows)?,
        rows_padded: to_i32("synth rows_padded", rows_padded)?,
        k_dim: to_i32("synth k_dim", k_dim)?,
        k_valid: to_i32("synth k_valid", src.k_valid)?,
        format: format_code,
        group: group as i32,
        scale_array: 0,
        unit,
    };
    launch(device, &CODES, experts * expert_stride / 16, &params)?;
    let scale_launches = [
        (0, row_scales.as_ref().map(|b| b.len())),
        (1, block_scales.as_ref().map(|b| b.len())),
        (2, group_scales.as_ref().map(|b| b.len())),
        (3, fp4_scales.as_ref().map(|b| b.len())),
    ];
    for (array, len) in scale_launches {
        if let Some(len) = len {
            params.scale_array = array;
            launch(device, &SCALES, len, &params)?;
        }
    }
    let scale_bytes = [
        row_scales.as_ref().map_or(0, |b| b.bytes()),
        block_scales.as_ref().map_or(0, |b| b.bytes()),
        group_scales.as_ref().map_or(0, |b| b.bytes()),
        group_zeros.as_ref().map_or(0, |b| b.bytes()),
        fp4_scales.as_ref().map_or(0, |b| b.bytes()),
    ];
    // The keys are read by the launches above: keep them alive until the device has run them.
    device.synchronize()?;
    drop(device_keys);
    DeviceWeights {
        format,
        experts,
        out_cols,
        rows_padded,
        k_dim,
        swiglu,
        expert_stride,
        group,
        data,
        row_scales,
        block_scales,
        group_scales,
        group_zeros,
        fp4_scales,
        bytes_per_expert: expert_stride + scale_bytes.iter().sum::<usize>() / experts,
        split_k: None,
        own_prefetch: true,
    }
    .with_decode_k_splits()
}
