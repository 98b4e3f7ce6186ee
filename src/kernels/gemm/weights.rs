//! [`DeviceWeights`]: one GEMM's packed weights on the device (uploaded from [`PackedWeights`], stacked or joined
//! there), with a dense matrix's split-K workspace for its decode launches.

use half::bf16;

use super::tile::{decode_k_splits, TileShape, SPLIT_PARTIAL_FLOATS};
use crate::device::{Device, DeviceBuffer};
use crate::error::{Error, Result};
use crate::kernels::opt_ptr;
use crate::kernels::params::GemmWeights;
use crate::quant::repack::PackedWeights;
use crate::quant::WeightFormat;

/// A dense matrix's split-K state for its decode launches (params.h `MoeGemmParams.k_splits`): the split count, each
/// split block's f32 partials and one counter per column block (zero at rest: each launch leaves them zero). Owned by
/// the matrix, so launches of one matrix must be ordered (one stream, or a graph of one), as a decode step's are.
pub(crate) struct SplitK {
    pub(super) splits: usize,
    pub(super) partials: DeviceBuffer<f32>,
    pub(super) counters: DeviceBuffer<i32>,
}

/// Weights of one GEMM (all experts of one projection, or one dense matrix) in device memory.
///
/// The fields mirror [`PackedWeights`] (whose documentation gives each array's tile layout), uploaded as is.
pub struct DeviceWeights {
    /// The storage format of `data`, which selects the kernel.
    pub format: WeightFormat,
    /// Matrices back to back in `data` (1 for a dense matrix).
    pub experts: usize,
    /// Real output columns of the GEMM (for SwiGLU: the hidden size, half the packed rows in use).
    pub out_cols: usize,
    /// Packed rows per expert (a multiple of `quant::repack::ROW_ALIGN`).
    pub rows_padded: usize,
    /// Reduction length (the input row's width).
    pub k_dim: usize,
    /// Rows interleaved as gate/up groups for the SwiGLU epilogue ([`crate::kernels::moe::up_swiglu`],
    /// [`crate::kernels::dense::linear_swiglu`]).
    pub swiglu: bool,
    /// Bytes per expert in `data`.
    pub expert_stride: usize,
    /// INT4 group size along k (unused by the other formats).
    pub group: usize,
    /// The packed weight tiles of every expert.
    pub data: DeviceBuffer<u8>,
    /// `[experts, rows_padded]` f32 epilogue multipliers (per-tensor FP8 scale, 1 / NVFP4 global scale).
    pub row_scales: Option<DeviceBuffer<f32>>,
    /// FP8 128x128 block scales, f32, in the tile order of `PackedWeights::block_scales`.
    pub block_scales: Option<DeviceBuffer<f32>>,
    /// INT4 group scales, bf16, in the tile order of `PackedWeights::group_scales`.
    pub group_scales: Option<DeviceBuffer<bf16>>,
    /// INT4 zero points (u8 in `0..=15`, same layout as `group_scales`), None for symmetric INT4.
    pub group_zeros: Option<DeviceBuffer<u8>>,
    /// NVFP4 e4m3 block scales in the tile order of `PackedWeights::fp4_scales`.
    pub fp4_scales: Option<DeviceBuffer<u8>>,
    /// Weight and scale bytes per expert (the least a GEMM touching the expert must read).
    pub bytes_per_expert: usize,
    /// The decode launches' split-K workspace; None: no split ([`DeviceWeights::decode_k_splits`] 1).
    pub(crate) split_k: Option<SplitK>,
    /// Whether this matrix's decode launches ask L2 for their own k range before their wait
    /// ([`DeviceWeights::decode_own_prefetch`]).
    pub(crate) own_prefetch: bool,
}

fn upload<T: crate::device::DeviceElement>(device: &Device, v: &Option<Vec<T>>) -> Result<Option<DeviceBuffer<T>>> {
    v.as_ref().map(|v| DeviceBuffer::from_slice(device, v)).transpose()
}

impl DeviceWeights {
    /// Copies the packed arrays to `device` (no checks beyond the allocation's).
    pub fn upload(device: &Device, p: &PackedWeights) -> Result<Self> {
        DeviceWeights {
            format: p.format,
            experts: p.experts,
            out_cols: p.out_cols,
            rows_padded: p.rows_padded,
            k_dim: p.k_dim,
            swiglu: p.swiglu,
            expert_stride: p.expert_stride,
            group: p.group,
            data: DeviceBuffer::from_slice(device, &p.data)?,
            row_scales: upload(device, &p.row_scales)?,
            block_scales: upload(device, &p.block_scales)?,
            group_scales: upload(device, &p.group_scales)?,
            group_zeros: upload(device, &p.group_zeros)?,
            fp4_scales: upload(device, &p.fp4_scales)?,
            bytes_per_expert: p.bytes_per_expert(),
            split_k: None,
            own_prefetch: true,
        }
        .with_decode_k_splits()
    }
}

/// One array of packed weights (data or a scale array), for the device-side stacking and concatenation below.
fn array_parts<'a, T: crate::device::DeviceElement>(
    parts: &'a [&DeviceWeights],
    array: impl Fn(&'a DeviceWeights) -> &'a Option<DeviceBuffer<T>>,
) -> Result<Option<Vec<&'a DeviceBuffer<T>>>> {
    let present: Vec<&DeviceBuffer<T>> = parts.iter().filter_map(|p| array(p).as_ref()).collect();
    match present.len() {
        0 => Ok(None),
        n if n == parts.len() => Ok(Some(present)),
        _ => Err(Error::InvalidArgument("packed weights: the parts do not carry the same scale arrays".into())),
    }
}

impl DeviceWeights {
    /// Matrices of the same format and packed shape stacked as the experts of one weight set, on the device: what
    /// `repack_linear` (or `repack_gate_up`) of all their matrices uploads, without a host copy (the per-head W_UK /
    /// W_UV of MLA generated head by head on the device, then stacked for [`crate::kernels::dense::linear_per_head`]).
    ///
    /// `Error::InvalidArgument` for no parts or parts of different formats, packings or shapes.
    ///
    /// ```
    /// use small4::device::simulator;
    /// use small4::kernels::gemm::DeviceWeights;
    /// use small4::quant::{repack::{repack_linear, MatrixRef}, QuantizedMatrix, WeightFormat};
    ///
    /// let device = simulator();
    /// let m = |v: f32| QuantizedMatrix::quantize(WeightFormat::Fp8PerTensor, &vec![v; 16 * 64], 16, 64);
    /// let (a, b) = (m(0.5)?, m(-2.0)?);
    /// let one = |q: &QuantizedMatrix| DeviceWeights::upload(&device, &repack_linear(&[MatrixRef::from(q)])?);
    /// let stacked = DeviceWeights::stack(&[&one(&a)?, &one(&b)?])?;
    /// let both = DeviceWeights::upload(&device, &repack_linear(&[MatrixRef::from(&a), MatrixRef::from(&b)])?)?;
    /// assert_eq!(stacked.experts, 2);
    /// assert_eq!(stacked.data.to_vec()?, both.data.to_vec()?);
    /// assert_eq!(stacked.row_scales.as_ref().unwrap().to_vec()?, both.row_scales.as_ref().unwrap().to_vec()?);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn stack(parts: &[&DeviceWeights]) -> Result<Self> {
        let first = *parts.first().ok_or_else(|| Error::InvalidArgument("DeviceWeights::stack: no parts".into()))?;
        let shape = |w: &DeviceWeights| (w.format, w.out_cols, w.rows_padded, w.k_dim, w.swiglu, w.group, w.expert_stride / w.experts.max(1));
        if let Some(other) = parts.iter().find(|p| shape(p) != shape(first) || p.experts != 1) {
            return Err(Error::InvalidArgument(format!(
                "DeviceWeights::stack: parts of one matrix each, all {} [{}, {}]; got {} x {} [{}, {}]",
                first.format, first.out_cols, first.k_dim, other.experts, other.format, other.out_cols, other.k_dim
            )));
        }
        fn concat<T: crate::device::DeviceElement>(parts: Option<Vec<&DeviceBuffer<T>>>) -> Result<Option<DeviceBuffer<T>>> {
            let Some(parts) = parts else { return Ok(None) };
            let out = DeviceBuffer::<T>::alloc(parts[0].device(), parts.iter().map(|p| p.len()).sum())?;
            let mut at = 0;
            for p in parts {
                out.copy_within_device(at, p, 0, p.len())?;
                at += p.len();
            }
            Ok(Some(out))
        }
        DeviceWeights {
            format: first.format,
            experts: parts.len(),
            out_cols: first.out_cols,
            rows_padded: first.rows_padded,
            k_dim: first.k_dim,
            swiglu: first.swiglu,
            expert_stride: first.expert_stride,
            group: first.group,
            data: concat(Some(parts.iter().map(|p| &p.data).collect()))?.expect("data is always present"),
            row_scales: concat(array_parts(parts, |p| &p.row_scales)?)?,
            block_scales: concat(array_parts(parts, |p| &p.block_scales)?)?,
            group_scales: concat(array_parts(parts, |p| &p.group_scales)?)?,
            group_zeros: concat(array_parts(parts, |p| &p.group_zeros)?)?,
            fp4_scales: concat(array_parts(parts, |p| &p.fp4_scales)?)?,
            bytes_per_expert: first.bytes_per_expert,
            split_k: None,
            own_prefetch: true,
        }
        .with_decode_k_splits()
    }

    /// The rows of several matrices (one each, same format and reduction length) one after another as one matrix, on
    /// the device: what `repack_row_concat` of their matrices uploads. Every part but the last must have whole
    /// 16-row tiles (`Error::InvalidArgument` otherwise, or for SwiGLU-packed parts, different formats or lengths).
    ///
    /// ```
    /// use small4::device::simulator;
    /// use small4::kernels::gemm::DeviceWeights;
    /// use small4::quant::{repack::{repack_linear, repack_row_concat, MatrixRef}, QuantizedMatrix, WeightFormat};
    ///
    /// let device = simulator();
    /// let w = |rows: usize, v: f32| QuantizedMatrix::quantize(WeightFormat::Fp8Block128, &vec![v; rows * 128], rows, 128);
    /// let (a, b) = (w(64, 0.5)?, w(40, 3.0)?);
    /// let one = |q: &QuantizedMatrix| DeviceWeights::upload(&device, &repack_linear(&[MatrixRef::from(q)])?);
    /// let joined = DeviceWeights::concat_rows(&[&one(&a)?, &one(&b)?])?;
    /// let host = DeviceWeights::upload(&device, &repack_row_concat(&[vec![MatrixRef::from(&a), MatrixRef::from(&b)]])?)?;
    /// assert_eq!((joined.out_cols, joined.rows_padded), (104, 128));
    /// assert_eq!(joined.data.to_vec()?, host.data.to_vec()?);
    /// assert_eq!(joined.block_scales.as_ref().unwrap().to_vec()?, host.block_scales.as_ref().unwrap().to_vec()?);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn concat_rows(parts: &[&DeviceWeights]) -> Result<Self> {
        let first = *parts.first().ok_or_else(|| Error::InvalidArgument("DeviceWeights::concat_rows: no parts".into()))?;
        let last = parts.len() - 1;
        for (i, p) in parts.iter().enumerate() {
            if p.experts != 1 || p.swiglu || (p.format, p.k_dim, p.group) != (first.format, first.k_dim, first.group) || (i < last && p.out_cols % 16 != 0) {
                return Err(Error::InvalidArgument(format!(
                    "DeviceWeights::concat_rows: part {i} ({} x {} [{}, {}]) does not continue {} [.., {}] (one plain matrix each, whole 16-row tiles but the last)",
                    p.experts, p.format, p.out_cols, p.k_dim, first.format, first.k_dim
                )));
            }
        }
        let device = first.data.device();
        let rows: usize = parts.iter().map(|p| p.out_cols).sum();
        let rows_padded = rows.next_multiple_of(crate::quant::repack::ROW_ALIGN);
        let tiles = |rows: usize| rows.div_ceil(16);
        // Each array is a sequence of runs per "outer" index (k block for block scales, else one run): a part gives
        // the leading units that hold its rows, the rest of the run is padding.
        fn join<T: crate::device::DeviceElement>(
            device: &Device,
            parts: Option<Vec<&DeviceBuffer<T>>>,
            outer: usize,
            units: &[(usize, usize)],
            total_units: usize,
            unit_len: usize,
            pad: u8,
        ) -> Result<Option<DeviceBuffer<T>>> {
            let Some(parts) = parts else { return Ok(None) };
            let out = DeviceBuffer::<T>::filled_with_byte(device, outer * total_units * unit_len, pad)?;
            for o in 0..outer {
                let mut at = o * total_units * unit_len;
                for (p, &(used, part_units)) in parts.iter().zip(units) {
                    out.copy_within_device(at, p, o * part_units * unit_len, used * unit_len)?;
                    at += used * unit_len;
                }
            }
            Ok(Some(out))
        }
        let tile_span = first.data.len() / (first.rows_padded / 16);
        let tile_units: Vec<(usize, usize)> = parts.iter().map(|p| (tiles(p.out_cols), p.rows_padded / 16)).collect();
        let row_units: Vec<(usize, usize)> = parts.iter().map(|p| (p.out_cols, p.rows_padded)).collect();
        let group_units: Vec<(usize, usize)> = parts.iter().map(|p| (p.out_cols.div_ceil(8), p.rows_padded / 8)).collect();
        let per_tile = |len: Option<usize>| len.map_or(0, |l| l / (first.rows_padded / 16));
        let (scale_span, zero_span, fp4_span) = (
            per_tile(first.group_scales.as_ref().map(|b| b.len())),
            per_tile(first.group_zeros.as_ref().map(|b| b.len())),
            per_tile(first.fp4_scales.as_ref().map(|b| b.len())),
        );
        let padded_tiles = rows_padded / 16;
        let data = join(device, Some(parts.iter().map(|p| &p.data).collect()), 1, &tile_units, padded_tiles, tile_span, 0)?.expect("data is always present");
        let block_kb = first.block_scales.as_ref().map_or(0, |b| b.len() / (first.rows_padded / 8));
        DeviceWeights {
            format: first.format,
            experts: 1,
            out_cols: rows,
            rows_padded,
            k_dim: first.k_dim,
            swiglu: false,
            expert_stride: data.len(),
            group: first.group,
            row_scales: join(device, array_parts(parts, |p| &p.row_scales)?, 1, &row_units, rows_padded, 1, 0)?,
            block_scales: join(device, array_parts(parts, |p| &p.block_scales)?, block_kb, &group_units, rows_padded / 8, 1, 0)?,
            group_scales: join(device, array_parts(parts, |p| &p.group_scales)?, 1, &tile_units, padded_tiles, scale_span, 0)?,
            // Padding rows' INT4 zero points are 8, as repack writes them.
            group_zeros: join(device, array_parts(parts, |p| &p.group_zeros)?, 1, &tile_units, padded_tiles, zero_span, 8)?,
            fp4_scales: join(device, array_parts(parts, |p| &p.fp4_scales)?, 1, &tile_units, padded_tiles, fp4_span, 0)?,
            bytes_per_expert: 0,
            data,
            split_k: None,
            own_prefetch: true,
        }
        .with_bytes_per_expert()
        .with_decode_k_splits()
    }

    /// The weight operand of a GEMM launch (params.h `GemmWeights`: `MoeGemmParams.weights`, and a dense tail's): the
    /// device addresses of `data` and the scale arrays, null for the arrays the format has none of.
    pub(crate) fn kernel_operand(&self) -> GemmWeights {
        GemmWeights {
            data: self.data.ptr(),
            row_scales: opt_ptr(self.row_scales.as_ref()),
            block_scales: opt_ptr(self.block_scales.as_ref()),
            group_scales: opt_ptr(self.group_scales.as_ref()),
            group_zeros: opt_ptr(self.group_zeros.as_ref()),
            fp4_scales: opt_ptr(self.fp4_scales.as_ref()),
        }
    }

    /// Sets `bytes_per_expert` from the arrays held.
    fn with_bytes_per_expert(mut self) -> Self {
        let lens = [
            self.row_scales.as_ref().map(|b| b.len()),
            self.block_scales.as_ref().map(|b| b.len()),
            self.group_scales.as_ref().map(|b| b.len()),
            self.group_zeros.as_ref().map(|b| b.len()),
            self.fp4_scales.as_ref().map(|b| b.len()),
        ];
        self.bytes_per_expert = crate::quant::repack::packed_bytes_per_expert(self.expert_stride, self.experts, lens);
        self
    }

    /// The weights with the split-K workspace of their default decode split count (`decode_k_splits`; none for
    /// several matrices).
    pub(crate) fn with_decode_k_splits(mut self) -> Result<Self> {
        if self.experts == 1 {
            self.set_decode_k_splits(decode_k_splits(self.rows_padded, self.k_dim))?;
        }
        Ok(self)
    }

    /// The k splits of this matrix's dense decode launches (up to 8 rows on the decode kernel, up to 32 on the narrow
    /// 64-feature tile, one launch each: grid z = the split, the partial sums added in split order by the last block of each output tile,
    /// `cuda/moe_gemm.cu`). Chosen at upload from the column blocks and the SM count: up to two blocks per SM of an H100
    /// / H200; 1 (no split) for a matrix whose columns fill the GPU and for several matrices.
    ///
    /// ```
    /// use small4::device::simulator;
    /// use small4::kernels::gemm::DeviceWeights;
    /// use small4::quant::{repack::repack_linear, QuantizedMatrix, WeightFormat};
    ///
    /// let device = simulator();
    /// // 128 outputs (2 column blocks of 64) at K = 4096 (64 k blocks): 8 splits of 8 k blocks (16 blocks).
    /// let w = QuantizedMatrix::quantize(WeightFormat::Bf16, &vec![0.5; 128 * 4096], 128, 4096)?;
    /// let mut w = DeviceWeights::upload(&device, &repack_linear(&[(&w).into()])?)?;
    /// assert_eq!(w.decode_k_splits(), 8);
    /// w.set_decode_k_splits(1)?;
    /// assert_eq!(w.decode_k_splits(), 1);
    /// assert!(w.set_decode_k_splits(65).is_err()); // more splits than k blocks
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn decode_k_splits(&self) -> usize {
        self.split_k.as_ref().map_or(1, |s| s.splits)
    }

    /// Whether this matrix's launches on the decode kernel (dense, or as a grouped launch's dense tail) ask L2, before
    /// their `griddepcontrol.wait`, for the rest of each warp's weight tile over its k range beyond the register
    /// ring's first turn, so the whole weight stream starts while the kernel before finishes (`cuda/moe_gemm.cu`
    /// `decode_gemm`; the launcher decides per launch whether it pays, `gemm::own_prefetch_k_blocks`). On by default;
    /// a hint, so the outputs are the same bit for bit without it.
    pub fn decode_own_prefetch(&self) -> bool {
        self.own_prefetch
    }

    /// Turns [`DeviceWeights::decode_own_prefetch`] on or off: for tests and the timing model's alternatives.
    pub fn set_decode_own_prefetch(&mut self, on: bool) {
        self.own_prefetch = on;
    }

    /// Sets the k splits of this matrix's dense decode launches ([`DeviceWeights::decode_k_splits`]) and allocates
    /// their workspace: for tests and the timing model's alternatives; the default is the upload's choice.
    ///
    /// `Error::InvalidArgument` for 0 splits, more splits than 64-k blocks, or more than one split of several matrices.
    pub fn set_decode_k_splits(&mut self, splits: usize) -> Result<()> {
        let k_blocks = self.k_dim / 64;
        if splits == 0 || splits > k_blocks.max(1) || (splits > 1 && self.experts != 1) {
            return Err(Error::InvalidArgument(format!(
                "decode k splits: {splits} for {} matrices of {k_blocks} k blocks (1 to the k blocks, of one matrix)",
                self.experts
            )));
        }
        // Allocated before anything is replaced: a failed allocation leaves the matrix's splits as they were.
        self.split_k = if splits > 1 {
            let device = self.data.device();
            let column_blocks = self.rows_padded / TileShape::Narrow.features();
            Some(SplitK {
                splits,
                partials: DeviceBuffer::alloc(device, column_blocks * splits * SPLIT_PARTIAL_FLOATS)?,
                counters: DeviceBuffer::from_slice(device, &vec![0i32; column_blocks])?,
            })
        } else {
            None
        };
        Ok(())
    }
}
