//! Grouped expert GEMMs and the dense GEMM (`cuda/moe_gemm.cu`): weights uploaded from [`PackedWeights`], the fused
//! up-projection with SwiGLU, the down-projection times the routing weight, the deterministic combine, and one
//! function that runs a whole MoE layer from the router's outputs and grouping.

use std::sync::Arc;

use half::bf16;

use super::dense;
use super::modules::MOE_GEMM;
use super::moe_wgmma_fp8::Fp8ActScratch;
use super::norm::{self, MoePairs, ResidualNorm};
use super::params::{
    GemmRowFinish, MlaCacheWriteParams, MoeCombineParams, MoeDenseTail, MoeGemmParams, MoeQuantizeActParams, RmsNormParams, RopeParams,
    SMALL4_GEMM_FINISH_MLA_LATENTS_BF16, SMALL4_GEMM_FINISH_MLA_LATENTS_FP8, SMALL4_GEMM_FINISH_MOE_NORM, SMALL4_GEMM_FINISH_NONE, SMALL4_GEMM_FINISH_NORM,
};
use super::prefetch::L2Prefetch;
use super::{check_len, to_i32};
use super::{Matrix, TensorView, Vector};
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};
use crate::quant::repack::{tile_bytes, PackedWeights};
use crate::quant::WeightFormat;

const WARPS: usize = 4;
/// Bytes of one gathered activation row of a 64-k stage.
const X_ROW_BYTES: usize = 128;
/// The same for e4m3 activations (the W8A8 kernels).
const X_ROW_BYTES_E4M3: usize = 64;

/// The tile shapes compiled for every format (see `cuda/moe_gemm.cu`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TileShape {
    /// Grouped decode launches of at most [`DECODE_SLOTS`] tokens on a grid the narrow tile would run: 64 features x
    /// 8 pair slots, weights straight from global memory into registers, activations staged once per block
    /// (`decode_gemm` in moe_gemm.cu); the narrow tile's outputs bit for bit.
    Decode,
    /// Decode on a grid too small to fill the GPU: 64 features x 32 pair slots.
    Narrow,
    /// Decode: 128 features x 32 pair slots.
    Small,
    /// Prefill: 128 features x 64 pair slots.
    Tiled,
}

/// Blocks that give every SM of an H100 or H200 (132) two blocks. A decode grid of BM-128 blocks smaller than this
/// (batch 1: 4 experts x 32 column blocks) runs the narrow tile instead, which doubles the blocks. The timing model
/// agrees (`small4 calibrate --predict decode-choices`, docs/perf.md "Decode tile choices"): on the H200 narrow is
/// faster at batch 1 in all five formats (bf16 79.5 vs 96.8 µs) and slower at batch 32 (bf16 1269 vs 1120 µs).
const FULL_GRID_BLOCKS: usize = 2 * super::TARGET_SMS;

/// Fewest 64-k blocks one split of a split-K launch reduces: 512 of k, 64 KiB of bf16 weights a block of 64 rows.
/// Its f32 partials, stored and read back once (through L2), are 512 bytes of that at batch 1 and 16 KiB at 32 rows
/// (the narrow tile's most). The decode kernel, which runs the splits of up to 8 rows, pays a fixed cost per block
/// (the activation staging before its k loop, the partials and the last block's sum after it) that shorter splits
/// no longer hide: the timing model puts the latent projection [1344, 4096] at 5.9 µs with 8 splits of 8 k blocks
/// and 6.8 with 12 of 5-6 on an H100 SXM (cold L2, `small4 calibrate --predict decode-choices --only=-cold`,
/// docs/perf.md "Dense decode GEMMs on the decode kernel"; 4 k blocks a split was the narrow tile's minimum).
const MIN_SPLIT_K_BLOCKS: usize = 8;

/// The k splits a dense decode launch of one matrix (`rows_padded` x `k_dim`, 64-feature column blocks: the decode
/// kernel up to 8 rows, the narrow tile up to 32) runs with: as many as keep the column blocks times the splits at
/// most two blocks per SM of an H100 / H200 ([`FULL_GRID_BLOCKS`]: all resident at once), never under
/// [`MIN_SPLIT_K_BLOCKS`] a split, so the latent projection's 22 column blocks get 8 splits (176 blocks), wo's 64
/// get 4 (256), wq_b's 64 (K 1024) 2 (128); 1 when the column blocks alone come to more than one block per SM.
/// The timing model's optimum on the decode kernel at 1 token (H100 SXM, cold L2: `small4 calibrate --predict
/// decode-choices --only=-cold`, docs/perf.md "Dense decode GEMMs on the decode kernel"): latent 5.9 µs at 4 or 8
/// splits, 6.8 at 12; wo 12.2 at 2, 12.3 at 4, 12.4 at 8; wq_b 3.9 at 2, 3.8 at 4. (On the narrow tile, before,
/// it put the optimum at two blocks per SM: section "Split-K for the dense decode GEMMs".)
fn decode_k_splits(rows_padded: usize, k_dim: usize) -> usize {
    let column_blocks = (rows_padded / TileShape::Narrow.features()).max(1);
    (FULL_GRID_BLOCKS / column_blocks).min(k_dim / 64 / MIN_SPLIT_K_BLOCKS).max(1)
}

/// f32 values each narrow block of a split-K launch stores as its partial sums (`sum_k_splits` in moe_gemm.cu: a
/// float4 per thread per pair fragment).
const SPLIT_PARTIAL_FLOATS: usize = WARPS * 32 * 4 * (32 / 8);

/// A dense matrix's split-K state for its decode launches (params.h `MoeGemmParams.k_splits`): the split count, each
/// split block's f32 partials and one counter per column block (zero at rest: each launch leaves them zero). Owned by
/// the matrix, so launches of one matrix must be ordered (one stream, or a graph of one), as a decode step's are.
pub(crate) struct SplitK {
    splits: usize,
    partials: DeviceBuffer<f32>,
    counters: DeviceBuffer<i32>,
}

thread_local! {
    /// [`override_decode_tile`]'s choice for this thread. None: `for_decode` / `grouped_tile_shape` decide.
    static DECODE_TILE_OVERRIDE: std::cell::Cell<Option<TileShape>> = const { std::cell::Cell::new(None) };
}

/// Forces the decode tile of this thread's GEMM launches: `"decode"` (the decode kernel where it applies, else the
/// narrow tile), `"narrow"` (BM 64 x 32 slots) or `"small"` (BM 128); `None` gives the choice back to the launcher.
/// For `small4 calibrate` (its cases' `tile=`: the configurations the H200 measured before the current choice, and
/// the alternatives the timing model compares) and for tests that compare the tiles' outputs.
/// `Error::InvalidArgument` for another name.
///
/// ```
/// use small4::kernels::moe::override_decode_tile;
///
/// override_decode_tile(Some("narrow"))?;
/// override_decode_tile(None)?;
/// assert!(override_decode_tile(Some("wide")).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn override_decode_tile(tile: Option<&str>) -> Result<()> {
    let shape = match tile {
        None => None,
        Some("decode") => Some(TileShape::Decode),
        Some("narrow") => Some(TileShape::Narrow),
        Some("small") => Some(TileShape::Small),
        Some(other) => return Err(Error::InvalidArgument(format!("decode tile {other}: decode, narrow or small"))),
    };
    DECODE_TILE_OVERRIDE.set(shape);
    Ok(())
}

/// Most tokens of a grouped launch on the decode kernel: an expert then has at most this many pairs, one mma pair
/// fragment (`kDecodeSlots` in moe_gemm.cu).
const DECODE_SLOTS: usize = 8;

/// Dynamic shared memory the decode kernel may take for its activation rows (8 rows x K x 2 bytes): two blocks per
/// SM up to K 7168; the real shapes take 64 KiB (K 4096) and 32 KiB (K 2048).
const DECODE_SHARED_MAX: usize = 112 * 1024;

/// Shared memory the k pipeline may use (`kStageBudget` in moe_gemm.cu).
const STAGE_BUDGET: usize = 96 * 1024;

/// Scale bytes a pipeline stage holds per 16-row weight tile next to its weights (`kScaleBytes` of
/// cuda/include/weight_format.cuh): an fp8-block128 f32 pair (rows g and g + 8's 8-row groups), int4's 16 bf16
/// scales and 16 zero points (reserved when symmetric), nvfp4's 16 rows x 4 k-steps of e4m3.
pub(super) fn staged_scale_bytes(format: WeightFormat) -> usize {
    match format {
        WeightFormat::Bf16 | WeightFormat::Fp8PerTensor => 0,
        WeightFormat::Fp8Block128 => 8,
        WeightFormat::Int4 { .. } => 48,
        WeightFormat::Nvfp4 => 64,
    }
}

impl TileShape {
    /// Pair slots per block (BN).
    fn slots(self) -> usize {
        match self {
            Self::Decode => DECODE_SLOTS,
            Self::Narrow | Self::Small => 32,
            Self::Tiled => 64,
        }
    }
    /// Weight tiles of 16 rows per warp (MF in moe_gemm.cu).
    fn tiles_per_warp(self) -> usize {
        match self {
            Self::Decode | Self::Narrow => 1,
            Self::Small | Self::Tiled => 2,
        }
    }
    /// The small tile, or the narrow one when at most `busy_row_groups` block rows (experts with pairs, or dense row
    /// groups) of BM-128 blocks over `rows_padded` features would not fill the GPU.
    fn for_decode(busy_row_groups: usize, rows_padded: usize) -> Self {
        if let Some(shape) = DECODE_TILE_OVERRIDE.get() {
            return if shape == Self::Small { Self::Small } else { Self::Narrow };
        }
        if busy_row_groups * (rows_padded / Self::Small.features()).max(1) < FULL_GRID_BLOCKS {
            Self::Narrow
        } else {
            Self::Small
        }
    }
    /// Output features per block (BM).
    fn features(self) -> usize {
        WARPS * self.tiles_per_warp() * 16
    }
    /// Whether the decode kernel can run a grouped launch of `tokens` tokens over `w` where the narrow tile would:
    /// bf16 activations, at most [`DECODE_SLOTS`] tokens (so at most that many pairs an expert), aligner tiles of at
    /// most [`DECODE_SLOTS`] slots (a block computes the first 8 slots of an expert's group and nothing of the
    /// tiles after it), its activation rows within [`DECODE_SHARED_MAX`].
    fn decode_applies(w: &DeviceWeights, tokens: usize, tile_m: usize, e4m3_input: bool) -> bool {
        !e4m3_input && tokens <= DECODE_SLOTS && tile_m <= DECODE_SLOTS && Self::decode_shared_bytes(DECODE_SLOTS, w.k_dim) <= DECODE_SHARED_MAX
    }
    /// The same for a dense launch of `rows` rows over `w` (one block row of 8 slots, its activations over the
    /// longest k split).
    fn decode_applies_dense(w: &DeviceWeights, rows: usize, e4m3_input: bool) -> bool {
        !e4m3_input && rows <= DECODE_SLOTS && Self::dense_decode_shared_bytes(w, rows) <= DECODE_SHARED_MAX
    }
    /// The decode kernel's dynamic shared memory: `rows` activation rows over `k` (a grouped launch: 8 rows over the
    /// whole k, whatever its tiles hold).
    fn decode_shared_bytes(rows: usize, k: usize) -> usize {
        rows * k * 2
    }
    /// A dense decode launch's: its rows and the zero row the missing slots' lanes read (at most 8 in all, as
    /// `decode_gemm` stages them) over the longest of `w`'s k splits (`k_blocks * (split + 1) / splits` less
    /// `k_blocks * split / splits`: at most the ceiling of k_blocks / splits).
    fn dense_decode_shared_bytes(w: &DeviceWeights, rows: usize) -> usize {
        let longest_split = (w.k_dim / 64).div_ceil(w.decode_k_splits()) * 64;
        Self::decode_shared_bytes((rows + 1).min(DECODE_SLOTS), longest_split)
    }
    /// Deepest k pipeline (the `max_stages` of `stages_for` in moe_gemm.cu, which says why).
    fn max_stages(self) -> usize {
        match self {
            Self::Decode | Self::Narrow => 16,
            Self::Small | Self::Tiled => 8,
        }
    }
    /// Pipeline stages: as many as fit the budget, 2 to `max_stages` (`stages_for` in moe_gemm.cu); the decode
    /// kernel's activation rows.
    fn shared_bytes(self, format: WeightFormat, e4m3_input: bool, k_dim: usize) -> usize {
        if self == Self::Decode {
            return Self::decode_shared_bytes(DECODE_SLOTS, k_dim);
        }
        let x_row = if e4m3_input { X_ROW_BYTES_E4M3 } else { X_ROW_BYTES };
        let stage = WARPS * self.tiles_per_warp() * tile_bytes(format) + self.slots() * x_row;
        let stages = (STAGE_BUDGET / stage).clamp(2, self.max_stages());
        // The staged weight scales come on top of the budget (moe_gemm.cu says why).
        stages * (stage + WARPS * self.tiles_per_warp() * staged_scale_bytes(format)) + self.slots() * 4
    }
    /// The narrow tile's or the decode kernel's split-K kernel for `format` weights (bf16 inputs): the only kernels
    /// that read `MoeGemmParams.k_splits`; the others compile no split path. None for the other shapes.
    fn split_k_kernel(self, format: WeightFormat) -> Option<Kernel> {
        let entry = match (format, self) {
            (WeightFormat::Bf16, Self::Narrow) => "moe_gemm_bf16_narrow_split",
            (WeightFormat::Fp8PerTensor, Self::Narrow) => "moe_gemm_fp8_narrow_split",
            (WeightFormat::Fp8Block128, Self::Narrow) => "moe_gemm_fp8_block_narrow_split",
            (WeightFormat::Int4 { .. }, Self::Narrow) => "moe_gemm_int4_narrow_split",
            (WeightFormat::Nvfp4, Self::Narrow) => "moe_gemm_nvfp4_narrow_split",
            (WeightFormat::Bf16, Self::Decode) => "moe_gemm_bf16_decode_split",
            (WeightFormat::Fp8PerTensor, Self::Decode) => "moe_gemm_fp8_decode_split",
            (WeightFormat::Fp8Block128, Self::Decode) => "moe_gemm_fp8_block_decode_split",
            (WeightFormat::Int4 { .. }, Self::Decode) => "moe_gemm_int4_decode_split",
            (WeightFormat::Nvfp4, Self::Decode) => "moe_gemm_nvfp4_decode_split",
            (_, Self::Small | Self::Tiled) => return None,
        };
        Some(Kernel { module: MOE_GEMM, entry })
    }
    /// The kernel for `format` weights with bf16 inputs, or the W8A8 kernel with e4m3 inputs (per-tensor fp8 weights
    /// only; the launcher checks).
    fn kernel(self, format: WeightFormat, e4m3_input: bool) -> Kernel {
        if e4m3_input {
            let entry = match self {
                Self::Decode | Self::Narrow => "moe_gemm_fp8_act_narrow",
                Self::Small => "moe_gemm_fp8_act_small",
                Self::Tiled => "moe_gemm_fp8_act_tiled",
            };
            return Kernel { module: MOE_GEMM, entry };
        }
        let entry = match (format, self) {
            (WeightFormat::Bf16, Self::Decode) => "moe_gemm_bf16_decode",
            (WeightFormat::Bf16, Self::Narrow) => "moe_gemm_bf16_narrow",
            (WeightFormat::Bf16, Self::Small) => "moe_gemm_bf16_small",
            (WeightFormat::Bf16, Self::Tiled) => "moe_gemm_bf16_tiled",
            (WeightFormat::Fp8PerTensor, Self::Decode) => "moe_gemm_fp8_decode",
            (WeightFormat::Fp8PerTensor, Self::Narrow) => "moe_gemm_fp8_narrow",
            (WeightFormat::Fp8PerTensor, Self::Small) => "moe_gemm_fp8_small",
            (WeightFormat::Fp8PerTensor, Self::Tiled) => "moe_gemm_fp8_tiled",
            (WeightFormat::Fp8Block128, Self::Decode) => "moe_gemm_fp8_block_decode",
            (WeightFormat::Fp8Block128, Self::Narrow) => "moe_gemm_fp8_block_narrow",
            (WeightFormat::Fp8Block128, Self::Small) => "moe_gemm_fp8_block_small",
            (WeightFormat::Fp8Block128, Self::Tiled) => "moe_gemm_fp8_block_tiled",
            (WeightFormat::Int4 { .. }, Self::Decode) => "moe_gemm_int4_decode",
            (WeightFormat::Int4 { .. }, Self::Narrow) => "moe_gemm_int4_narrow",
            (WeightFormat::Int4 { .. }, Self::Small) => "moe_gemm_int4_small",
            (WeightFormat::Int4 { .. }, Self::Tiled) => "moe_gemm_int4_tiled",
            (WeightFormat::Nvfp4, Self::Decode) => "moe_gemm_nvfp4_decode",
            (WeightFormat::Nvfp4, Self::Narrow) => "moe_gemm_nvfp4_narrow",
            (WeightFormat::Nvfp4, Self::Small) => "moe_gemm_nvfp4_small",
            (WeightFormat::Nvfp4, Self::Tiled) => "moe_gemm_nvfp4_tiled",
        };
        Kernel { module: MOE_GEMM, entry }
    }
}

/// The aligner's tile for a batch: 8 slots while experts see few pairs on average (decode; the small kernel covers
/// up to 32 pairs of an expert in one pass over its weights), 64 once they see 32 or more (prefill tiles).
pub fn moe_tile_m(tokens: usize, k: usize, experts: usize) -> usize {
    if tokens * k >= 32 * experts.max(1) {
        64
    } else {
        8
    }
}

/// Whether a dense GEMM launch over `rows` rows takes the prefill tile (more rows than the decode tiles' 32):
/// the launches [`crate::kernels::moe_wgmma::PrefillGemm`] chooses a kernel for.
///
/// ```
/// use small4::kernels::moe::dense_takes_prefill_tile;
///
/// assert!(!dense_takes_prefill_tile(32) && dense_takes_prefill_tile(33));
/// ```
pub fn dense_takes_prefill_tile(rows: usize) -> bool {
    rows > TileShape::Small.slots()
}

/// Whether the grouped GEMM launches of `tokens` tokens routed to `k` of `experts` (local) experts take the prefill
/// tile: the aligner's 64-slot tiles ([`moe_tile_m`]).
///
/// ```
/// use small4::kernels::moe::grouped_takes_prefill_tile;
///
/// assert!(grouped_takes_prefill_tile(136, 4, 16) && !grouped_takes_prefill_tile(1, 4, 16));
/// ```
pub fn grouped_takes_prefill_tile(tokens: usize, k: usize, experts: usize) -> bool {
    moe_tile_m(tokens, k, experts) == TileShape::Tiled.slots()
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
    /// Rows interleaved as gate/up groups for the SwiGLU epilogue ([`up_swiglu`], [`dense::linear_swiglu`]).
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
    /// W_UV of MLA generated head by head on the device, then stacked for [`dense::linear_per_head`]).
    ///
    /// `Error::InvalidArgument` for no parts or parts of different formats, packings or shapes.
    ///
    /// ```
    /// use small4::device::simulator;
    /// use small4::kernels::moe::DeviceWeights;
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
        }
        .with_decode_k_splits()
    }

    /// The rows of several matrices (one each, same format and reduction length) one after another as one matrix, on
    /// the device: what `repack_row_concat` of their matrices uploads. Every part but the last must have whole
    /// 16-row tiles (`Error::InvalidArgument` otherwise, or for SwiGLU-packed parts, different formats or lengths).
    ///
    /// ```
    /// use small4::device::simulator;
    /// use small4::kernels::moe::DeviceWeights;
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
        }
        .with_bytes_per_expert()
        .with_decode_k_splits()
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
    /// use small4::kernels::moe::DeviceWeights;
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

/// The router's grouping of pairs by local expert, on the device (contract: `reference::moe::Alignment`).
///
/// The launchers check it against the weights: `Error::InvalidArgument` when `tile_m` does not divide 64,
/// `Error::Shape` when `sorted_pairs` is not `tile_experts.len() * tile_m` long, `expert_offsets` not
/// `local experts + 1` or `num_padded` not 1.
pub struct Grouping<'a> {
    /// `[capacity]` i32: the pair in each slot, -1 for padding.
    pub sorted_pairs: &'a DeviceBuffer<i32>,
    /// `[capacity / tile_m]` i32: the local expert of each tile, -1 past the end.
    pub tile_experts: &'a DeviceBuffer<i32>,
    /// `[local experts + 1]` i32: first slot of each expert.
    pub expert_offsets: &'a DeviceBuffer<i32>,
    /// `[1]` i32: slots in use.
    pub num_padded: &'a DeviceBuffer<i32>,
    /// Slots per tile: a divisor of 32 picks the decode tiles (32 slots a block), 64 the prefill tile.
    pub tile_m: usize,
}

impl<'a> From<&'a super::router::Alignment> for Grouping<'a> {
    /// The router's device alignment (`kernels::router::route_and_align`), consumed as is.
    fn from(a: &'a super::router::Alignment) -> Self {
        Grouping {
            sorted_pairs: &a.sorted_pairs,
            tile_experts: &a.tile_experts,
            expert_offsets: &a.expert_offsets,
            num_padded: &a.num_padded,
            tile_m: a.tile_m,
        }
    }
}

impl Grouping<'_> {
    fn check(&self, local_experts: usize) -> Result<()> {
        let tiles = self.tile_experts.len();
        if self.tile_m == 0 || 64 % self.tile_m != 0 {
            return Err(Error::InvalidArgument(format!("grouping: tile_m {} must divide 64", self.tile_m)));
        }
        if self.sorted_pairs.len() != tiles * self.tile_m {
            return Err(Error::shape("grouping sorted_pairs", tiles * self.tile_m, self.sorted_pairs.len()));
        }
        if self.expert_offsets.len() != local_experts + 1 {
            return Err(Error::shape("grouping expert_offsets", local_experts + 1, self.expert_offsets.len()));
        }
        if self.num_padded.len() != 1 {
            return Err(Error::shape("grouping num_padded", 1, self.num_padded.len()));
        }
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.sorted_pairs.len()
    }
    fn shape(&self) -> TileShape {
        if 32 % self.tile_m == 0 {
            TileShape::Small
        } else {
            TileShape::Tiled
        }
    }
}

/// Which rows a launch computes.
pub(super) enum Rows<'a> {
    /// `pairs`: the (token, expert) pairs routed to this launch's experts, at most (bounds the busy experts).
    /// `tail`: a dense GEMM in the same launch (the shared expert), in blocks after the grouped tiles.
    Grouped { grouping: &'a Grouping<'a>, top_k: usize, pairs: usize, tail: Option<DenseTail<'a>> },
    /// `heads` matrices (1: a plain dense GEMM), head h reading its input `x_head_stride` and writing its output
    /// `out_head_stride` elements after head h - 1's.
    Dense { rows: usize, heads: usize, x_head_stride: usize, out_head_stride: usize },
}

/// A dense GEMM run by a grouped launch's extra blocks: one matrix of the grouped weights' format and packed shape,
/// its input rows and its output (SwiGLU act for an up-projection, unweighted f32 rows for a down-projection, as the
/// grouped output is).
#[derive(Clone, Copy)]
pub(super) struct DenseTail<'a> {
    w: &'a DeviceWeights,
    x: Matrix<'a, bf16>,
    out: TailOutput<'a>,
}

#[derive(Clone, Copy)]
pub(super) enum TailOutput<'a> {
    SwiGlu(Matrix<'a, bf16>),
    F32(Matrix<'a, f32>),
}

impl Rows<'_> {
    pub(super) fn dense(rows: usize) -> Self {
        Rows::Dense { rows, heads: 1, x_head_stride: 0, out_head_stride: 0 }
    }
}

/// Where a launch writes. Every output's rows may be strided: the kernel takes `out_stride`.
pub(super) enum Output<'a> {
    /// SwiGLU act, bf16 [rows (slots), out_cols].
    SwiGlu(Matrix<'a, bf16>),
    /// Plain bf16 [rows, out_cols].
    Bf16(Matrix<'a, bf16>),
    /// bf16 query heads [rows, out_cols] with rope_q_k's q half applied in the epilogue (dense launches; the
    /// parameters' q is this output).
    Bf16Rope(Matrix<'a, bf16>, RopeParams),
    /// f32 [pairs, out_cols] (indexed by pair), times the routing weight when given (`[tokens, k]`, one per pair).
    F32ByPair { out: Matrix<'a, f32>, pair_weights: Option<Matrix<'a, f32>> },
}

impl Output<'_> {
    fn row_stride(&self) -> usize {
        match self {
            Output::SwiGlu(v) | Output::Bf16(v) | Output::Bf16Rope(v, _) => v.row_stride(),
            Output::F32ByPair { out, .. } => out.row_stride(),
        }
    }
}

fn opt_ptr<T: crate::device::DeviceElement, P>(b: Option<&DeviceBuffer<T>>) -> *const P {
    b.map_or(std::ptr::null(), |b| b.ptr())
}

fn opt_view_ptr<T: crate::device::DeviceElement, P, const N: usize>(v: Option<TensorView<T, N>>) -> *const P {
    v.map_or(std::ptr::null(), |v| v.ptr())
}

/// Activations quantised to e4m3 for the W8A8 GEMMs: rows of `cols` bytes, value = e4m3 * `scale`, each 32 columns
/// in the permuted order [`quantize_act_e4m3`] writes (only the `moe_gemm_fp8_act_*` kernels read it). The rows may
/// be strided (the GEMM loads 16 bytes at a time: the start and the stride must be multiples of 16).
#[derive(Clone, Copy)]
pub struct E4m3Rows<'a> {
    /// `[rows, cols]` e4m3 codes.
    pub data: Matrix<'a, u8>,
    /// The static per-tensor activation scale the rows were quantised with.
    pub scale: f32,
}

/// The input rows of a GEMM launch.
#[derive(Clone, Copy)]
pub(super) enum Input<'a> {
    Bf16(Matrix<'a, bf16>),
    /// e4m3 rows of `k_dim` bytes (W8A8 kernels).
    E4m3(E4m3Rows<'a>),
}

/// The operands of an e4m3 activation quantiser (`what`): x's rows 4-byte aligned (bf16x2 loads), out `[rows, cols]`
/// of x, packed and 4-byte aligned (4-byte stores, no stride).
pub(super) fn check_quantize_rows(what: &str, x: Matrix<bf16>, out: Matrix<u8>) -> Result<()> {
    x.expect_rows_aligned(&format!("{what} x"), 4)?;
    out.expect_dims(&format!("{what} out"), x.dims())?;
    out.expect_packed(&format!("{what} out"))?;
    out.expect_aligned(&format!("{what} out"), 4)
}

fn check_act_scale(what: &str, scale: f32) -> Result<()> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidArgument(format!("{what}: activation scale {scale} must be finite and positive")));
    }
    Ok(())
}

/// One launch of the grouped or dense GEMM. The input holds `x_rows` rows of `w.k_dim`; `in_by_token` = rows are
/// picked by pair / k. Input and output rows may be strided (the kernel takes both strides); the input's 16-byte
/// loads need its start and stride on 16 bytes. `fp8_act`: where an fp8-activation prefill launch
/// ([`super::moe_wgmma_fp8`]) quantises its input rows (None: buffers of its own).
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_gemm(
    w: &DeviceWeights,
    input: Input,
    x_rows: usize,
    in_by_token: bool,
    rows: Rows,
    output: Output,
    finish: Option<&RowFinish>,
    fp8_act: Option<&Fp8ActScratch>,
) -> Result<()> {
    launch_gemm_prefetching(w, input, x_rows, in_by_token, rows, output, finish, fp8_act, &L2Prefetch::NONE)
}

/// [`launch_gemm`] whose decode-kernel launch also pulls `l2_prefetch` (a later kernel's weights) into L2
/// ([`super::prefetch`]); the other tiles ignore it.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_gemm_prefetching(
    w: &DeviceWeights,
    input: Input,
    x_rows: usize,
    in_by_token: bool,
    rows: Rows,
    output: Output,
    finish: Option<&RowFinish>,
    fp8_act: Option<&Fp8ActScratch>,
    l2_prefetch: &L2Prefetch,
) -> Result<()> {
    let e4m3_input = matches!(input, Input::E4m3(_));
    let (device, x_addr, x_stride) = match input {
        Input::Bf16(x) => {
            x.expect_dims("gemm x", [x_rows, w.k_dim])?;
            x.expect_rows_aligned("gemm x", 16)?;
            (x.device(), x.addr(), x.row_stride())
        }
        Input::E4m3(rows) => {
            if w.format != WeightFormat::Fp8PerTensor {
                return Err(Error::InvalidArgument(format!("gemm: e4m3 activations need per-tensor fp8 weights, not {}", w.format)));
            }
            check_act_scale("gemm e4m3 input", rows.scale)?;
            rows.data.expect_dims("gemm e4m3 x", [x_rows, w.k_dim])?;
            rows.data.expect_rows_aligned("gemm e4m3 x", 16)?;
            (rows.data.device(), rows.data.addr(), rows.data.row_stride())
        }
    };
    let swiglu = matches!(output, Output::SwiGlu(_));
    if swiglu != w.swiglu {
        return Err(Error::InvalidArgument(format!(
            "gemm: weights packed {} SwiGLU interleave but the launch {} it",
            if w.swiglu { "with" } else { "without" },
            if swiglu { "wants" } else { "does not want" }
        )));
    }
    let (heads, x_head_stride, out_head_stride) = match rows {
        Rows::Dense { heads, x_head_stride, out_head_stride, .. } => (heads, x_head_stride, out_head_stride),
        Rows::Grouped { .. } => (1, 0, 0),
    };
    let (shape, grid_y, top_k, grouping) = match rows {
        Rows::Grouped { grouping, top_k, pairs, tail } => {
            grouping.check(w.experts)?;
            if top_k == 0 {
                return Err(Error::InvalidArgument("gemm: top_k 0".into()));
            }
            let shape = grouped_tile_shape(grouping, pairs.min(w.experts) + tail.is_some() as usize, w, pairs / top_k, e4m3_input);
            if tail.is_some() && !matches!(shape, TileShape::Narrow | TileShape::Decode) {
                return Err(Error::InvalidArgument(format!("gemm: a dense tail runs with the narrow or decode tile only, not {shape:?}")));
            }
            (shape, grouping.tile_experts.len(), top_k, Some(grouping))
        }
        Rows::Dense { rows, heads, .. } => {
            if w.experts != heads {
                return Err(Error::InvalidArgument(format!("dense gemm: weights hold {} matrices, expected {heads}", w.experts)));
            }
            let shape = dense_tile_shape(w, rows, e4m3_input);
            (shape, super::blocks_for(rows, shape.slots()) as usize, 1, None)
        }
    };
    let rope = match &output {
        Output::Bf16Rope(..) if grouping.is_some() || heads != 1 => {
            return Err(Error::InvalidArgument(format!("gemm: query RoPE on a grouped or batched launch ({heads} heads)")));
        }
        Output::Bf16Rope(_, rope) => *rope,
        _ => RopeParams::default(),
    };
    // Rows of the output in slots (grouped) or rows (dense).
    let out_rows = grouping.map_or(x_rows, |g| g.capacity());
    let out_stride = output.row_stride();
    let (out_bf16, out_f32, pair_weights, out_by_pair) = match output {
        Output::SwiGlu(act) => {
            act.expect_dims("gemm SwiGLU act", [out_rows, w.out_cols])?;
            (act.mut_ptr(), std::ptr::null_mut(), std::ptr::null(), false)
        }
        Output::Bf16(y) | Output::Bf16Rope(y, _) => {
            y.expect_dims("gemm y", [out_rows, w.out_cols])?;
            (y.mut_ptr(), std::ptr::null_mut(), std::ptr::null(), false)
        }
        Output::F32ByPair { out, pair_weights } => {
            let [pairs, _] = out.dims();
            out.expect_dims("gemm pair output", [pairs, w.out_cols])?;
            if let Some(pw) = pair_weights {
                // The kernel reads weight[pair] with pair = token * k + j: one packed weight per output row.
                check_len("gemm pair weights", pw.len(), pairs)?;
                pw.expect_packed("gemm pair weights")?;
            }
            if grouping.is_none() {
                out.expect_dims("dense gemm f32 y", [x_rows, w.out_cols])?;
            }
            (std::ptr::null_mut(), out.mut_ptr(), opt_view_ptr(pair_weights), true)
        }
    };
    let tail = match rows {
        Rows::Grouped { tail: Some(tail), .. } => Some(check_tail(w, e4m3_input, &output, &tail)?),
        _ => None,
    };
    // The grouped tiles, then the tail's row blocks.
    let tiles = grid_y;
    let grid_y = tiles + tail.as_ref().map_or(0, |t| super::blocks_for(t.rows as usize, shape.slots()) as usize);
    if grid_y == 0 {
        return Ok(());
    }
    if grid_y > 65535 {
        return Err(Error::InvalidArgument(format!("gemm: {grid_y} row tiles exceed the grid's y limit (65535)")));
    }
    let grid_x = w.rows_padded / shape.features();
    // Split-K: the dense decode launches of one matrix on the decode kernel or the narrow tile (one row block) with
    // bf16 inputs, as the matrix chose; they run the _split kernels.
    let split_k =
        w.split_k.as_ref().filter(|_| grouping.is_none() && heads == 1 && matches!(shape, TileShape::Decode | TileShape::Narrow) && grid_y == 1 && !e4m3_input);
    let finish = match finish {
        None => GemmRowFinish { kind: SMALL4_GEMM_FINISH_NONE as i32, ..Default::default() },
        Some(f) => {
            // The rows the finisher sees: tokens.
            let finished_rows = match rows {
                Rows::Dense { rows, heads: 1, .. } => rows,
                Rows::Grouped { pairs, top_k, .. } => pairs / top_k,
                Rows::Dense { heads, .. } => return Err(Error::InvalidArgument(format!("gemm: a row finisher on a batched launch of {heads} heads"))),
            };
            f.check_rows(finished_rows)?;
            GemmRowFinish { column_blocks: to_i32("gemm finisher column blocks", grid_x)?, ..f.params }
        }
    };
    let params = MoeGemmParams {
        weights: w.data.ptr(),
        row_scales: opt_ptr(w.row_scales.as_ref()),
        block_scales: opt_ptr(w.block_scales.as_ref()),
        group_scales: opt_ptr(w.group_scales.as_ref()),
        group_zeros: opt_ptr(w.group_zeros.as_ref()),
        fp4_scales: opt_ptr(w.fp4_scales.as_ref()),
        x: if e4m3_input { std::ptr::null() } else { x_addr as *const _ },
        x_e4m3: if e4m3_input { x_addr as *const _ } else { std::ptr::null() },
        out_bf16,
        out_f32,
        sorted_pairs: opt_ptr(grouping.map(|g| g.sorted_pairs)),
        tile_experts: opt_ptr(grouping.map(|g| g.tile_experts)),
        expert_offsets: opt_ptr(grouping.map(|g| g.expert_offsets)),
        num_padded: opt_ptr(grouping.map(|g| g.num_padded)),
        pair_weights,
        expert_stride: w.expert_stride as i64,
        x_stride: to_i32("gemm x stride", x_stride)?,
        out_stride: to_i32("gemm out stride", out_stride)?,
        k_dim: to_i32("gemm k_dim", w.k_dim)?,
        rows_padded: to_i32("gemm rows", w.rows_padded)?,
        out_cols: to_i32("gemm out_cols", w.out_cols)?,
        dense_rows: to_i32("gemm rows", if grouping.is_none() { x_rows } else { 0 })?,
        x_batch_stride: to_i32("gemm x head stride", x_head_stride)?,
        out_batch_stride: to_i32("gemm out head stride", out_head_stride)?,
        capacity_tiles: to_i32("gemm tiles", tiles)?,
        top_k: to_i32("gemm top_k", top_k)?,
        tile_m: to_i32("gemm tile_m", grouping.map_or(shape.slots(), |g| g.tile_m))?,
        group: to_i32("gemm group", w.group)?,
        swiglu: swiglu as i32,
        in_by_token: in_by_token as i32,
        out_by_pair: out_by_pair as i32,
        tail: tail.unwrap_or(MoeDenseTail {
            weights: std::ptr::null(),
            row_scales: std::ptr::null(),
            block_scales: std::ptr::null(),
            group_scales: std::ptr::null(),
            group_zeros: std::ptr::null(),
            fp4_scales: std::ptr::null(),
            x: std::ptr::null(),
            out_bf16: std::ptr::null_mut(),
            out_f32: std::ptr::null_mut(),
            rows: 0,
            x_stride: 0,
            out_stride: 0,
        }),
        act_scale: match input {
            Input::E4m3(rows) => rows.scale,
            Input::Bf16(_) => 1.0,
        },
        finish,
        rope,
        k_splits: split_k.map_or(1, |s| s.splits as i32),
        split_partials: split_k.map_or(std::ptr::null_mut(), |s| s.partials.mut_ptr()),
        split_counters: split_k.map_or(std::ptr::null_mut(), |s| s.counters.mut_ptr()),
        x_block_scales: std::ptr::null(),
        l2_prefetch: l2_prefetch.for_grid(grid_x as u64 * grid_y as u64 * split_k.map_or(heads, |s| s.splits) as u64),
    };
    let shared_bytes = match (shape, &rows) {
        (TileShape::Decode, Rows::Dense { rows, .. }) => TileShape::dense_decode_shared_bytes(w, *rows),
        _ => shape.shared_bytes(w.format, e4m3_input, w.k_dim),
    };
    let config = LaunchConfig {
        grid: Dim3::xyz(grid_x as u32, grid_y as u32, split_k.map_or(heads, |s| s.splits) as u32),
        block: Dim3::x((WARPS * 32) as u32),
        shared_bytes: shared_bytes as u32,
    };
    // The fp8 prefill tiles run on the fp8 tensor cores with activations quantised on the fly when chosen
    // (moe_wgmma::PrefillGemm::WgmmaFp8Act); the input rows are a grouping's slots unless picked by token.
    if let (TileShape::Tiled, Input::Bf16(x)) = (shape, input) {
        if super::moe_wgmma_fp8::applies(w.format, heads, w.k_dim)? {
            let slots = if in_by_token { None } else { grouping };
            return super::moe_wgmma_fp8::launch(device, w.format, x, slots, &config, &params, fp8_act);
        }
    }
    // The bf16, int4 and nvfp4 prefill tiles run on wgmma unless switched off (moe_wgmma::PrefillGemm): same grid,
    // parameters and epilogue steps (cuda/include/gemm_epilogue.cuh).
    if shape == TileShape::Tiled && super::moe_wgmma::applies(w.format, e4m3_input)? {
        let rows_per_matrix = match rows {
            Rows::Grouped { pairs, .. } => pairs / w.experts.max(1),
            Rows::Dense { rows, .. } => rows,
        };
        return super::moe_wgmma::launch(device, w.format, rows_per_matrix, &config, &params);
    }
    let kernel = match split_k.and_then(|_| shape.split_k_kernel(w.format)) {
        Some(split) => split,
        None => shape.kernel(w.format, e4m3_input),
    };
    launch_with(device, &kernel, &config, &params)
}

/// The tile a grouped launch of `tokens` tokens over `w` runs: the aligner's prefill tile, or the decode tile for
/// `busy` busy experts (plus a dense tail) over `w.rows_padded` features, where the narrow tile becomes the decode
/// kernel when that applies ([`TileShape::decode_applies`]: up to 8 tokens). The timing model predicts the decode
/// kernel faster than the narrow tile at batch 1 in every format (`small4 calibrate --predict decode-choices --only
/// moe-`, docs/perf.md "The decode kernel").
fn grouped_tile_shape(grouping: &Grouping, busy: usize, w: &DeviceWeights, tokens: usize, e4m3_input: bool) -> TileShape {
    if grouping.shape() == TileShape::Tiled {
        return TileShape::Tiled;
    }
    decode_tile_shape(busy, w.rows_padded, TileShape::decode_applies(w, tokens, grouping.tile_m, e4m3_input))
}

/// The tile a dense launch of `rows` rows over `w` runs: the prefill tile above [`TileShape::Small`]'s slots, else
/// the decode kernel when it applies ([`TileShape::decode_applies_dense`]: up to 8 rows, split-K included), else the
/// decode tile for one row group. The decode kernel also for outputs wide enough for the BM-128 tile: the timing
/// model predicts it faster on the output head, [131072, 4096] bf16 at 1 token, 404.0 -> 373.6 µs on an H100 SXM
/// (`small4 calibrate --predict decode-choices --only dense-head`, docs/perf.md "Dense decode GEMMs on the decode
/// kernel"); the narrow tile and split-K below it, as [`decode_k_splits`] says.
fn dense_tile_shape(w: &DeviceWeights, rows: usize, e4m3_input: bool) -> TileShape {
    if dense_takes_prefill_tile(rows) {
        return TileShape::Tiled;
    }
    let decode = TileShape::decode_applies_dense(w, rows, e4m3_input);
    match DECODE_TILE_OVERRIDE.get() {
        None if decode => TileShape::Decode,
        _ => decode_tile_shape(1, w.rows_padded, decode),
    }
}

/// The decode tile for `busy` block rows over `rows_padded` features ([`TileShape::for_decode`]), the narrow tile
/// replaced by the decode kernel when `decode` (it applies); [`override_decode_tile`]'s choice first.
fn decode_tile_shape(busy: usize, rows_padded: usize, decode: bool) -> TileShape {
    match DECODE_TILE_OVERRIDE.get() {
        Some(TileShape::Decode) if decode => TileShape::Decode,
        Some(TileShape::Small) => TileShape::Small,
        Some(_) => TileShape::Narrow,
        None => match TileShape::for_decode(busy, rows_padded) {
            TileShape::Narrow if decode => TileShape::Decode,
            shape => shape,
        },
    }
}

/// Checks a dense tail against the grouped launch it rides in and gives its kernel parameters.
fn check_tail(w: &DeviceWeights, e4m3_input: bool, output: &Output, tail: &DenseTail) -> Result<MoeDenseTail> {
    let t = tail.w;
    if e4m3_input {
        return Err(Error::InvalidArgument("gemm: a dense tail needs bf16 activations (W8A8 runs the shared expert apart)".into()));
    }
    if t.experts != 1 || (t.format, t.rows_padded, t.k_dim, t.out_cols, t.swiglu, t.group) != (w.format, w.rows_padded, w.k_dim, w.out_cols, w.swiglu, w.group)
    {
        return Err(Error::InvalidArgument(format!(
            "gemm tail: one {} matrix of [{}, {}] packed as the grouped weights expected, got {} x {} [{}, {}]",
            w.format, w.out_cols, w.k_dim, t.experts, t.format, t.out_cols, t.k_dim
        )));
    }
    let [rows, _] = tail.x.dims();
    tail.x.expect_dims("gemm tail x", [rows, w.k_dim])?;
    tail.x.expect_rows_aligned("gemm tail x", 16)?;
    let (out_bf16, out_f32, out_stride) = match (output, tail.out) {
        (Output::SwiGlu(_), TailOutput::SwiGlu(act)) => {
            act.expect_dims("gemm tail act", [rows, w.out_cols])?;
            (act.mut_ptr(), std::ptr::null_mut(), act.row_stride())
        }
        (Output::F32ByPair { .. }, TailOutput::F32(out)) => {
            out.expect_dims("gemm tail out", [rows, w.out_cols])?;
            (std::ptr::null_mut(), out.mut_ptr(), out.row_stride())
        }
        _ => return Err(Error::InvalidArgument("gemm tail: its output must be of the grouped output's kind".into())),
    };
    Ok(MoeDenseTail {
        weights: t.data.ptr(),
        row_scales: opt_ptr(t.row_scales.as_ref()),
        block_scales: opt_ptr(t.block_scales.as_ref()),
        group_scales: opt_ptr(t.group_scales.as_ref()),
        group_zeros: opt_ptr(t.group_zeros.as_ref()),
        fp4_scales: opt_ptr(t.fp4_scales.as_ref()),
        x: tail.x.ptr(),
        out_bf16,
        out_f32,
        rows: to_i32("gemm tail rows", rows)?,
        x_stride: to_i32("gemm tail x stride", tail.x.row_stride())?,
        out_stride: to_i32("gemm tail out stride", out_stride)?,
    })
}

/// Per-row arrival counters for GEMM launches that finish their rows themselves ([`dense::linear_add_rms_norm`],
/// [`moe_layer_add_rms_norm`], `attention::latent_projection`): one zero counter per token a launch may write. Every
/// such launch leaves them zero (the block that finishes a row resets its counter), so one set serves all the
/// launches of a stream, in order, and every replay of a CUDA graph.
///
/// ```
/// let counters = small4::kernels::moe::RowCounters::new(&small4::device::simulator(), 4)?;
/// assert_eq!(counters.rows(), 4);
/// # Ok::<(), small4::Error>(())
/// ```
pub struct RowCounters {
    counts: DeviceBuffer<i32>,
}

impl RowCounters {
    /// Counters for up to `rows` tokens a launch.
    pub fn new(device: &Device, rows: usize) -> Result<Self> {
        Ok(RowCounters { counts: DeviceBuffer::from_slice(device, &vec![0i32; rows.max(1)])? })
    }

    /// Tokens a launch may finish.
    pub fn rows(&self) -> usize {
        self.counts.len()
    }
}

/// A GEMM launch's row finisher (params.h `GemmRowFinish`): the step that follows the GEMM on each token's row, run
/// in the same launch by the last block that writes into the row.
pub(crate) struct RowFinish<'a> {
    counters: &'a RowCounters,
    /// Everything but `column_blocks`, which the launch knows.
    params: GemmRowFinish,
}

impl<'a> RowFinish<'a> {
    fn new(counters: &'a RowCounters, kind: u32, norm: RmsNormParams, cache: MlaCacheWriteParams) -> Self {
        RowFinish { counters, params: GemmRowFinish { kind: kind as i32, column_blocks: 0, counters: counters.counts.mut_ptr(), norm, cache } }
    }

    /// `rms_norm` (with its residual add, if `norm` has one) over the GEMM's bf16 output rows.
    pub(super) fn norm(counters: &'a RowCounters, norm: RmsNormParams) -> Self {
        Self::new(counters, SMALL4_GEMM_FINISH_NORM, norm, Default::default())
    }

    /// The MoE combine + residual add + RMSNorm over the pairs' f32 rows the launch writes.
    fn moe_norm(counters: &'a RowCounters, norm: RmsNormParams) -> Self {
        Self::new(counters, SMALL4_GEMM_FINISH_MOE_NORM, norm, Default::default())
    }

    /// The q latent's RMSNorm and the kv latent's cache write (bf16 or fp8 cache).
    pub(crate) fn mla_latents(counters: &'a RowCounters, q_norm: RmsNormParams, cache: MlaCacheWriteParams, fp8_cache: bool) -> Self {
        let kind = if fp8_cache { SMALL4_GEMM_FINISH_MLA_LATENTS_FP8 } else { SMALL4_GEMM_FINISH_MLA_LATENTS_BF16 };
        Self::new(counters, kind, q_norm, cache)
    }

    /// The finisher's parameters were made for `rows` tokens, and there is a counter for each.
    fn check_rows(&self, rows: usize) -> Result<()> {
        check_len("gemm finisher rows", self.params.norm.rows as usize, rows)?;
        if matches!(self.params.kind as u32, SMALL4_GEMM_FINISH_MLA_LATENTS_BF16 | SMALL4_GEMM_FINISH_MLA_LATENTS_FP8) {
            check_len("gemm finisher cache rows", self.params.cache.tokens as usize, rows)?;
        }
        if self.counters.rows() < rows {
            return Err(Error::shape("gemm finisher counters", rows, self.counters.rows()));
        }
        Ok(())
    }
}

/// The shared expert on every token of `x [tokens, dim]`: `workspace.shared_out` `[tokens, dim]` f32 =
/// w2(silu(w1 x) * w3 x), through `workspace.shared_act` ([`dense::linear_swiglu`] then [`dense::linear_f32`], the
/// fp8-activation launches quantising into `workspace.fp8_act`). `shared` = (SwiGLU-packed w1/w3, w2). Errors as
/// [`dense::linear`], and `Error::Shape` when the workspace was made for another token count.
pub fn shared_expert(shared: &(DeviceWeights, DeviceWeights), x: Matrix<bf16>, workspace: &MoeWorkspace) -> Result<()> {
    let (up, dn) = shared;
    let [tokens, _] = x.dims();
    check_len("shared expert workspace", workspace.shared_act.len(), tokens * up.out_cols)?;
    check_len("shared expert workspace out", workspace.shared_out.len(), tokens * dn.out_cols)?;
    let act = workspace.shared_act.view([tokens, up.out_cols])?;
    let fp8_act = workspace.fp8_act.as_deref();
    dense::linear_swiglu(up, x, act, fp8_act)?;
    dense::linear_f32(dn, act, workspace.shared_out.view([tokens, dn.out_cols])?, fp8_act)
}

/// Up-projection of the routed experts: `act[slot] = silu(x W1_e^T) * (x W3_e^T)` for every slot of the grouping,
/// x `[tokens, dim]`, act `[capacity, hidden]` (padding slots are not written). Both may have strided rows (`x` as
/// for [`dense::linear`]).
///
/// `Error::InvalidArgument` when `w` is not SwiGLU-packed, `top_k` is 0 or `x` is misaligned, the errors of a bad
/// [`Grouping`], and `Error::Shape` when `x` is not `[tokens, dim]` or `act` not `[capacity, hidden]`.
///
/// The layer's steps one by one ([`moe_layer`] runs them together): the routed up- and down-projections, and the
/// shared expert.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::moe::{self, Grouping, MoeLayerWeights, MoeWorkspace};
/// use small4::kernels::router::{moe_align, ExpertMap};
/// use small4::quant::{repack, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// let (dim, hidden) = (64, 64);
/// // One expert with w1 = w3 = w2 = e_0 e_0^T: act_0 = silu(x_0) * x_0, out_0 = act_0. The same as shared expert.
/// let mut one_hot = vec![0.0f32; 64 * 64];
/// one_hot[0] = 1.0;
/// let w = QuantizedMatrix::quantize(WeightFormat::Bf16, &one_hot, 64, 64)?;
/// let gate_up = repack::repack_gate_up(&[((&w).into(), (&w).into())])?;
/// let down = repack::repack_linear(&[(&w).into()])?;
/// let weights = MoeLayerWeights::upload(&device, &gate_up, &down, Some((&gate_up, &down)))?;
/// // Two tokens (x_0 = 1 and 2), both routed to expert 0, with routing weights 0.5 and 1.
/// let mut x = vec![bf16::ZERO; 2 * dim];
/// (x[0], x[dim]) = (bf16::ONE, bf16::from_f32(2.0));
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let (ids, topk_weights) = (DeviceBuffer::from_slice(&device, &[0i32, 0])?, DeviceBuffer::from_slice(&device, &[0.5f32, 1.0])?);
/// let alignment = moe_align(ids.view([2, 1])?, &ExpertMap::identity(&device, 1)?, moe::moe_tile_m(2, 1, 1))?;
/// let (grouping, capacity) = (Grouping::from(&alignment), alignment.max_padded);
///
/// let act = DeviceBuffer::<bf16>::alloc(&device, capacity * hidden)?;
/// moe::up_swiglu(&weights.gate_up, x.view([2, dim])?, 1, &grouping, act.view([capacity, hidden])?)?;
/// let pair_out = DeviceBuffer::<f32>::alloc(&device, 2 * dim)?;
/// moe::down(&weights.down, act.view([capacity, hidden])?, &grouping, topk_weights.view([2, 1])?, pair_out.view([2, dim])?)?;
/// let silu = |v: f32| v / (1.0 + (-v).exp());
/// let got = pair_out.to_vec()?;
/// assert!((got[0] - 0.5 * silu(1.0)).abs() < 1e-2 && (got[dim] - 2.0 * silu(2.0)).abs() < 2e-2, "{got:?}");
///
/// // The shared expert sees every token, unweighted, into the workspace.
/// let workspace = MoeWorkspace::new(&device, &weights, 2, 1, capacity)?;
/// let shared = weights.shared.as_ref().expect("uploaded with a shared expert");
/// moe::shared_expert(shared, x.view([2, dim])?, &workspace)?;
/// let got = workspace.shared_out.to_vec()?;
/// assert!((got[0] - silu(1.0)).abs() < 1e-2 && (got[dim] - 2.0 * silu(2.0)).abs() < 2e-2, "{got:?}");
/// // One token against a workspace made for two is a typed error:
/// assert!(matches!(moe::shared_expert(shared, x.view([1, dim])?, &workspace), Err(small4::Error::Shape { .. })));
/// // So is an act buffer smaller than the grouping's capacity:
/// let err = moe::up_swiglu(&weights.gate_up, x.view([2, dim])?, 1, &grouping, act.view([capacity - 1, hidden])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn up_swiglu(w: &DeviceWeights, x: Matrix<bf16>, top_k: usize, grouping: &Grouping, act: Matrix<bf16>) -> Result<()> {
    launch_up_swiglu(w, Input::Bf16(x), top_k, grouping, act, None)
}

/// The up-projection launch of [`up_swiglu`] and [`up_swiglu_w8a8`]; `fp8_act` as for [`launch_gemm`].
fn launch_up_swiglu(w: &DeviceWeights, x: Input, top_k: usize, grouping: &Grouping, act: Matrix<bf16>, fp8_act: Option<&Fp8ActScratch>) -> Result<()> {
    let tokens = match x {
        Input::Bf16(x) => x.dims()[0],
        Input::E4m3(x) => x.data.dims()[0],
    };
    launch_gemm(w, x, tokens, true, Rows::Grouped { grouping, top_k, pairs: tokens * top_k, tail: None }, Output::SwiGlu(act), None, fp8_act)
}

/// Down-projection: `pair_out[p] = weight[p] * act[slot(p)] W2_e^T` (f32, `[tokens * k, dim]`) for every routed pair,
/// `act` `[capacity, hidden]`, `topk_weights` `[tokens, k]` (packed; k is read off it). Pairs owned by another GPU
/// are not written. Errors as [`up_swiglu`] (with `w` not SwiGLU-packed), and `Error::Shape` when `pair_out` is not
/// one row per weight of `topk_weights`.
pub fn down(w: &DeviceWeights, act: Matrix<bf16>, grouping: &Grouping, topk_weights: Matrix<f32>, pair_out: Matrix<f32>) -> Result<()> {
    launch_down(w, Input::Bf16(act), grouping, topk_weights, pair_out, None, None)
}

/// The down-projection launch of [`down`] and [`down_w8a8`], with an optional row finisher; `fp8_act` as for
/// [`launch_gemm`].
fn launch_down(
    w: &DeviceWeights,
    act: Input,
    grouping: &Grouping,
    topk_weights: Matrix<f32>,
    pair_out: Matrix<f32>,
    finish: Option<&RowFinish>,
    fp8_act: Option<&Fp8ActScratch>,
) -> Result<()> {
    let slots = grouping.capacity();
    let [_, top_k] = topk_weights.dims();
    let pairs = topk_weights.len();
    let output = Output::F32ByPair { out: pair_out, pair_weights: Some(topk_weights) };
    launch_gemm(w, act, slots, false, Rows::Grouped { grouping, top_k, pairs, tail: None }, output, finish, fp8_act)
}

/// W8A8 e4m3 inputs: `out` [rows, cols] = e4m3(x * (1 / scale)) (round to nearest even, saturating to ±448, the
/// CPU twin is `reference::moe::quantize_act_e4m3`), each 32 columns in the B-operand order of the W8A8 GEMMs
/// (`MoeQuantizeActParams` in params.h), for `x [rows, cols]`. `cols` a multiple of 64 (the GEMMs' k step); `x` may
/// have strided rows (an even stride from a 4-byte boundary: the kernel loads bf16 pairs); `out` is packed.
///
/// `Error::InvalidArgument` for a bad `scale` (not finite and positive), `cols`, or a misaligned or strided view;
/// `Error::Shape` when `out` is not `[rows, cols]`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator();
/// // One row of 64 values 0.5 at scale 1/4: each is 2.0 in e4m3 (code 0x40).
/// let x = DeviceBuffer::from_slice(&device, &[bf16::from_f32(0.5); 64])?;
/// let out = DeviceBuffer::<u8>::alloc(&device, 64)?;
/// small4::kernels::moe::quantize_act_e4m3(x.view([1, 64])?, 0.25, out.view([1, 64])?)?;
/// assert_eq!(out.to_vec()?, vec![0x40; 64]);
/// // Rows of 32 columns cannot feed the GEMMs' 64-column k steps:
/// let err = small4::kernels::moe::quantize_act_e4m3(x.view([2, 32])?, 1.0, out.view([2, 32])?);
/// assert!(matches!(err, Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn quantize_act_e4m3(x: Matrix<bf16>, scale: f32, out: Matrix<u8>) -> Result<()> {
    launch_quantize_act(x, scale, out, None)
}

/// [`quantize_act_e4m3`] of the slots of `grouping` (`x` `[capacity, cols]`): padding slots are neither read nor
/// written.
fn quantize_slots_e4m3(x: Matrix<bf16>, grouping: &Grouping, scale: f32, out: Matrix<u8>) -> Result<()> {
    let [_, cols] = x.dims();
    x.expect_dims("quantize slots x", [grouping.capacity(), cols])?;
    launch_quantize_act(x, scale, out, Some(grouping))
}

fn launch_quantize_act(x: Matrix<bf16>, scale: f32, out: Matrix<u8>, slots: Option<&Grouping>) -> Result<()> {
    check_act_scale("quantize_act_e4m3", scale)?;
    let [rows, cols] = x.dims();
    if cols == 0 || cols % 64 != 0 {
        return Err(Error::InvalidArgument(format!("quantize_act_e4m3: cols {cols} must be a positive multiple of 64")));
    }
    check_quantize_rows("quantize_act_e4m3", x, out)?;
    let words = rows * cols / 4;
    if words == 0 {
        return Ok(());
    }
    let params = MoeQuantizeActParams {
        x: x.ptr(),
        out: out.mut_ptr(),
        sorted_pairs: opt_ptr(slots.map(|g| g.sorted_pairs)),
        num_padded: opt_ptr(slots.map(|g| g.num_padded)),
        rows: to_i32("quantize_act_e4m3 rows", rows)?,
        cols: to_i32("quantize_act_e4m3 cols", cols)?,
        x_stride: to_i32("quantize_act_e4m3 stride", x.row_stride())?,
        inv_scale: 1.0 / scale,
    };
    // Grid-stride loop: enough blocks to fill a GPU, no more than the words need.
    let config = LaunchConfig { grid: Dim3::x(super::blocks_for(words, 256).min(1024)), block: Dim3::x(256), shared_bytes: 0 };
    launch_with(out.device(), &Kernel { module: MOE_GEMM, entry: "moe_quantize_act_e4m3" }, &config, &params)
}

/// [`up_swiglu`] in W8A8: `x` the tokens' e4m3 rows (`[tokens, dim]`, from [`quantize_act_e4m3`]), per-tensor fp8
/// weights (else `Error::InvalidArgument`).
///
/// A W8A8 layer step by step: per-tensor FP8 weights, static activation scales ([`Fp8ActScales`]), the inputs
/// quantised with [`quantize_act_e4m3`] and passed as [`E4m3Rows`]; then [`down_w8a8`] on the quantised activation.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::moe::{self, E4m3Rows, Fp8ActScales, Grouping, MoeLayerWeights};
/// use small4::kernels::router::{moe_align, ExpertMap};
/// use small4::quant::{repack, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// let (dim, hidden) = (64, 64);
/// // One expert, w1 = w3 = w2 = e_0 e_0^T in per-tensor FP8 (1.0 is exact in e4m3 times its scale).
/// let mut one_hot = vec![0.0f32; 64 * 64];
/// one_hot[0] = 1.0;
/// let w = QuantizedMatrix::quantize(WeightFormat::Fp8PerTensor, &one_hot, 64, 64)?;
/// let gate_up = repack::repack_gate_up(&[((&w).into(), (&w).into())])?;
/// let mut weights = MoeLayerWeights::upload(&device, &gate_up, &repack::repack_linear(&[(&w).into()])?, None)?;
/// // Activations up to 8 in magnitude: 1/64 puts them well inside e4m3's range (448).
/// let scales = Fp8ActScales { up: 1.0 / 64.0, down: 1.0 / 64.0 };
/// weights.set_fp8_activations(Some(scales))?;
/// assert_eq!(weights.fp8_activations, Some(scales));
/// assert!(weights.set_fp8_activations(Some(Fp8ActScales { up: 0.0, ..scales })).is_err()); // scales must be > 0
///
/// // Two tokens (x_0 = 1 and 2) routed to expert 0 with weight 1.
/// let mut x = vec![bf16::ZERO; 2 * dim];
/// (x[0], x[dim]) = (bf16::ONE, bf16::from_f32(2.0));
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let (ids, topk_weights) = (DeviceBuffer::from_slice(&device, &[0i32, 0])?, DeviceBuffer::from_slice(&device, &[1.0f32; 2])?);
/// let alignment = moe_align(ids.view([2, 1])?, &ExpertMap::identity(&device, 1)?, moe::moe_tile_m(2, 1, 1))?;
/// let (grouping, capacity) = (Grouping::from(&alignment), alignment.max_padded);
///
/// let x8 = DeviceBuffer::<u8>::alloc(&device, 2 * dim)?;
/// moe::quantize_act_e4m3(x.view([2, dim])?, scales.up, x8.view([2, dim])?)?;
/// let act = DeviceBuffer::from_slice(&device, &vec![bf16::ZERO; capacity * hidden])?; // padding slots stay 0
/// let x_rows = E4m3Rows { data: x8.view([2, dim])?, scale: scales.up };
/// moe::up_swiglu_w8a8(&weights.gate_up, x_rows, 1, &grouping, act.view([capacity, hidden])?)?;
/// let act8 = DeviceBuffer::<u8>::alloc(&device, capacity * hidden)?;
/// moe::quantize_act_e4m3(act.view([capacity, hidden])?, scales.down, act8.view([capacity, hidden])?)?;
/// let act_rows = E4m3Rows { data: act8.view([capacity, hidden])?, scale: scales.down };
/// let pair_out = DeviceBuffer::<f32>::alloc(&device, 2 * dim)?;
/// moe::down_w8a8(&weights.down, act_rows, &grouping, topk_weights.view([2, 1])?, pair_out.view([2, dim])?)?;
/// // silu(x) * x, within e4m3's rounding of the activation (3 mantissa bits: about 6%).
/// let silu = |v: f32| v / (1.0 + (-v).exp());
/// let got = pair_out.to_vec()?;
/// for (t, x0) in [(0, 1.0f32), (1, 2.0)] {
///     let want = x0 * silu(x0);
///     assert!((got[t * dim] - want).abs() < 0.07 * want, "{got:?}");
/// }
/// // bf16 weights have no W8A8 kernel: a typed error.
/// let bf16_w = QuantizedMatrix::quantize(WeightFormat::Bf16, &one_hot, 64, 64)?;
/// let bf16_up = repack::repack_gate_up(&[((&bf16_w).into(), (&bf16_w).into())])?;
/// let mut plain = MoeLayerWeights::upload(&device, &bf16_up, &repack::repack_linear(&[(&bf16_w).into()])?, None)?;
/// assert!(matches!(plain.set_fp8_activations(Some(scales)), Err(small4::Error::InvalidArgument(_))));
/// let err = moe::up_swiglu_w8a8(&plain.gate_up, x_rows, 1, &grouping, act.view([capacity, hidden])?);
/// assert!(matches!(err, Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn up_swiglu_w8a8(w: &DeviceWeights, x: E4m3Rows, top_k: usize, grouping: &Grouping, act: Matrix<bf16>) -> Result<()> {
    launch_up_swiglu(w, Input::E4m3(x), top_k, grouping, act, None)
}

/// [`down`] in W8A8: `act` the slots' e4m3 rows (`[capacity, hidden]`, from [`quantize_act_e4m3`]), per-tensor fp8
/// weights (else `Error::InvalidArgument`).
pub fn down_w8a8(w: &DeviceWeights, act: E4m3Rows, grouping: &Grouping, topk_weights: Matrix<f32>, pair_out: Matrix<f32>) -> Result<()> {
    launch_down(w, Input::E4m3(act), grouping, topk_weights, pair_out, None, None)
}

/// `out[t] = bf16(shared_out[t] + sum_j pair_out[t*k + j])` over the locally computed pairs, in fixed j order.
///
/// `out [tokens, dim]` bf16, `topk_ids [tokens, k]` global ids, `pair_out [tokens * k, dim]` f32,
/// `shared_out [tokens, dim]` f32, `expert_map [experts]` (global -> local or -1; None: all local); every view packed
/// (the kernel takes no strides). `Error::InvalidArgument` when `dim` is not a positive multiple of 4 or a view is
/// strided or misaligned; `Error::Shape` for a view of the wrong dims; `Error::OutOfRange` for a size above `i32`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator();
/// // One token, k = 2, dim 4: expert 3 is not one of the 2 experts, so its pair is skipped.
/// let pair_out = DeviceBuffer::from_slice(&device, &[1.0f32, 2.0, 3.0, 4.0, 100.0, 100.0, 100.0, 100.0])?;
/// let ids = DeviceBuffer::from_slice(&device, &[1i32, 3])?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 4)?;
/// small4::kernels::moe::combine(pair_out.view([2, 4])?, None, ids.view([1, 2])?, None, 2, out.view([1, 4])?)?;
/// assert_eq!(out.to_vec()?.iter().map(|v| v.to_f32()).collect::<Vec<_>>(), [1.0, 2.0, 3.0, 4.0]);
/// // pair_out must hold one row per (token, expert) pair:
/// let err = small4::kernels::moe::combine(pair_out.view([1, 4])?, None, ids.view([1, 2])?, None, 2, out.view([1, 4])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn combine(
    pair_out: Matrix<f32>,
    shared_out: Option<Matrix<f32>>,
    topk_ids: Matrix<i32>,
    expert_map: Option<Vector<i32>>,
    experts: usize,
    out: Matrix<bf16>,
) -> Result<()> {
    let [tokens, dim] = out.dims();
    let [_, top_k] = topk_ids.dims();
    if dim % 4 != 0 || dim == 0 {
        return Err(Error::InvalidArgument(format!("moe combine: dim {dim} must be a positive multiple of 4")));
    }
    pair_out.expect_dims("moe combine pair_out", [tokens * top_k, dim])?;
    topk_ids.expect_dims("moe combine topk_ids", [tokens, top_k])?;
    if let Some(s) = shared_out {
        s.expect_dims("moe combine shared_out", [tokens, dim])?;
    }
    if let Some(m) = expert_map {
        m.expect_dims("moe combine expert_map", [experts])?;
        m.expect_packed("moe combine expert_map")?;
    }
    // Rows of dim back to back, read as float4 and written as 4 bf16 at a time.
    for (what, view) in [("moe combine pair_out", Some(pair_out)), ("moe combine shared_out", shared_out)] {
        if let Some(v) = view {
            v.expect_packed(what)?;
            v.expect_aligned(what, 16)?;
        }
    }
    topk_ids.expect_packed("moe combine topk_ids")?;
    out.expect_packed("moe combine out")?;
    out.expect_aligned("moe combine out", 8)?;
    if tokens == 0 {
        return Ok(());
    }
    let params = MoeCombineParams {
        pair_out: pair_out.ptr(),
        shared_out: opt_view_ptr(shared_out),
        topk_ids: topk_ids.ptr(),
        expert_map: opt_view_ptr(expert_map),
        out: out.mut_ptr(),
        tokens: to_i32("combine tokens", tokens)?,
        top_k: to_i32("combine top_k", top_k)?,
        dim: to_i32("combine dim", dim)?,
        experts: to_i32("combine experts", experts)?,
    };
    let threads = (dim / 4).next_power_of_two().clamp(32, 256) as u32;
    let config = LaunchConfig { grid: Dim3::x(tokens as u32), block: Dim3::x(threads), shared_bytes: 0 };
    launch_with(out.device(), &Kernel { module: MOE_GEMM, entry: "moe_combine" }, &config, &params)
}

/// All weights of one MoE layer on the device, in one format.
pub struct MoeLayerWeights {
    /// Routed experts' fused w1/w3 (SwiGLU interleave), `[experts] x [2 * hidden (padded), dim]`.
    pub gate_up: DeviceWeights,
    /// Routed experts' w2, `[experts] x [dim (padded), hidden]`.
    pub down: DeviceWeights,
    /// The shared expert (one matrix each: SwiGLU-packed w1/w3, then w2), or None.
    pub shared: Option<(DeviceWeights, DeviceWeights)>,
    /// W8A8 for the routed experts (per-tensor fp8 weights only): the static activation scales, or None for bf16
    /// activations. The shared expert keeps bf16 activations.
    pub fp8_activations: Option<Fp8ActScales>,
}

/// Static per-tensor activation scales of a W8A8 MoE layer (x = e4m3 * scale): the checkpoint's `qscale_act` of
/// each routed projection. The checkpoint has one per expert; one quantised copy of a token's row feeds all of its
/// experts, so the layer takes the largest over the experts (nothing saturates that would not for some expert).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Fp8ActScales {
    /// Input of the fused w1/w3 (the layer's input x).
    pub up: f32,
    /// Input of w2 (the SwiGLU activation).
    pub down: f32,
}

impl MoeLayerWeights {
    /// Uploads the routed experts' `gate_up` (SwiGLU-packed) and `down`, and the optional shared expert, with bf16
    /// activations. `Error::InvalidArgument` when the packing, the expert counts or the shared expert's shapes do not
    /// fit together, `Error::Shape` when `down` is not `[dim, hidden]` for `gate_up`'s `[hidden, dim]`.
    pub fn upload(device: &Device, gate_up: &PackedWeights, down: &PackedWeights, shared: Option<(&PackedWeights, &PackedWeights)>) -> Result<Self> {
        if !gate_up.swiglu || down.swiglu || gate_up.experts != down.experts {
            return Err(Error::InvalidArgument("MoeLayerWeights: gate_up must be SwiGLU-packed and match down's expert count".into()));
        }
        if gate_up.out_cols != down.k_dim || down.out_cols != gate_up.k_dim {
            return Err(Error::shape(
                "MoeLayerWeights down",
                format!("[{}, {}]", gate_up.k_dim, gate_up.out_cols),
                format!("[{}, {}]", down.out_cols, down.k_dim),
            ));
        }
        let shared = match shared {
            Some((su, sd)) => {
                if !su.swiglu || su.experts != 1 || sd.experts != 1 || su.k_dim != gate_up.k_dim || sd.out_cols != down.out_cols || su.out_cols != sd.k_dim {
                    return Err(Error::InvalidArgument("MoeLayerWeights: shared expert shapes do not match the routed experts".into()));
                }
                Some((DeviceWeights::upload(device, su)?, DeviceWeights::upload(device, sd)?))
            }
            None => None,
        };
        Ok(MoeLayerWeights { gate_up: DeviceWeights::upload(device, gate_up)?, down: DeviceWeights::upload(device, down)?, shared, fp8_activations: None })
    }
    /// Runs the routed experts in W8A8 with these activation scales (both projections must hold per-tensor fp8), or
    /// with bf16 activations (None). Workspaces are sized by it: make them after.
    pub fn set_fp8_activations(&mut self, scales: Option<Fp8ActScales>) -> Result<()> {
        if let Some(scales) = scales {
            for (what, w) in [("gate_up", &self.gate_up), ("down", &self.down)] {
                if w.format != WeightFormat::Fp8PerTensor {
                    return Err(Error::InvalidArgument(format!("fp8 activations: {what} weights are {}, not per-tensor fp8", w.format)));
                }
            }
            check_act_scale("fp8 activations (up)", scales.up)?;
            check_act_scale("fp8 activations (down)", scales.down)?;
        }
        self.fp8_activations = scales;
        Ok(())
    }
    /// Model width: the layer's input and output row length.
    pub fn dim(&self) -> usize {
        self.gate_up.k_dim
    }
    /// Expert hidden size (the SwiGLU activation's row length).
    pub fn hidden(&self) -> usize {
        self.gate_up.out_cols
    }
    /// Routed experts held (the local ones under expert parallelism).
    pub fn experts(&self) -> usize {
        self.gate_up.experts
    }
}

/// Scratch buffers of a MoE layer for a batch of `tokens` tokens (allocate once, reuse every step: no allocation in a
/// CUDA graph).
pub struct MoeWorkspace {
    /// Tokens of the batch it was made for ([`moe_layer`] requires the same).
    pub tokens: usize,
    /// Experts per token it was made for.
    pub top_k: usize,
    /// `[capacity, hidden]` bf16: the routed experts' SwiGLU activations, one row per slot of the grouping.
    pub act: DeviceBuffer<bf16>,
    /// `[tokens * k, dim]` f32: each pair's down-projection times its routing weight.
    pub pair_out: DeviceBuffer<f32>,
    /// `[tokens, hidden]` bf16: the shared expert's SwiGLU activation.
    pub shared_act: DeviceBuffer<bf16>,
    /// `[tokens, dim]` f32: the shared expert's output.
    pub shared_out: DeviceBuffer<f32>,
    /// W8A8 layers only: the e4m3 copies of the input `[tokens, dim]` and of `act` `[capacity, hidden]`.
    pub e4m3: Option<(DeviceBuffer<u8>, DeviceBuffer<u8>)>,
    /// Where the layer's fp8-activation prefill GEMMs (`PrefillGemm::WgmmaFp8Act`) quantise their input rows: the
    /// engine's, shared with its dense launches and sized when it plans the batch. None (what [`MoeWorkspace::new`]
    /// makes): each such launch allocates its own.
    pub fp8_act: Option<Arc<Fp8ActScratch>>,
}

impl MoeWorkspace {
    /// The views a whole layer (`what`) writes for `x [tokens, dim]` routed by `routing`: the pairs' rows
    /// `[tokens * k, dim]` and the shared expert's `[tokens, dim]` (None without one), after checking that the workspace
    /// was made for this batch and that the routing weights are `[tokens, k]`.
    fn layer_outputs(
        &self,
        what: &str,
        weights: &MoeLayerWeights,
        x: Matrix<bf16>,
        routing: &RoutingBuffers,
    ) -> Result<(Matrix<'_, f32>, Option<Matrix<'_, f32>>)> {
        let dim = weights.dim();
        let [tokens, _] = x.dims();
        let [_, k] = routing.topk_ids.dims();
        if tokens != self.tokens || k != self.top_k {
            return Err(Error::InvalidArgument(format!("{what}: {tokens} tokens x top-{k} but the workspace holds {} x top-{}", self.tokens, self.top_k)));
        }
        routing.topk_weights.expect_dims(&format!("{what} topk_weights"), [tokens, k])?;
        check_len(&format!("{what} pair_out"), self.pair_out.len(), tokens * k * dim)?;
        let shared_out = match &weights.shared {
            Some(_) => Some(self.shared_out.view([tokens, dim])?),
            None => None,
        };
        Ok((self.pair_out.view([tokens * k, dim])?, shared_out))
    }

    /// `capacity` = the grouping's slot count (`reference::moe::max_padded_slots`).
    pub fn new(device: &Device, weights: &MoeLayerWeights, tokens: usize, top_k: usize, capacity: usize) -> Result<Self> {
        let (dim, hidden) = (weights.dim(), weights.hidden());
        Ok(MoeWorkspace {
            tokens,
            top_k,
            act: DeviceBuffer::alloc(device, capacity * hidden)?,
            pair_out: DeviceBuffer::alloc(device, tokens * top_k * dim)?,
            shared_act: DeviceBuffer::alloc(device, tokens * hidden)?,
            shared_out: DeviceBuffer::alloc(device, tokens * dim)?,
            e4m3: match weights.fp8_activations {
                Some(_) => Some((DeviceBuffer::alloc(device, tokens * dim)?, DeviceBuffer::alloc(device, capacity * hidden)?)),
                None => None,
            },
            fp8_act: None,
        })
    }
}

/// The router's outputs for a batch: global expert ids and renormalised weights `[tokens, k]`, and the expert map
/// (global -> local, -1 = another GPU; None = all experts local).
#[derive(Clone, Copy)]
pub struct RoutingBuffers<'a> {
    /// `[tokens, k]` i32 global expert ids (`router::Routing::topk_ids`); k is read off it.
    pub topk_ids: Matrix<'a, i32>,
    /// `[tokens, k]` f32 routing weights (`router::Routing::topk_weights`).
    pub topk_weights: Matrix<'a, f32>,
    /// `[experts]` i32, global -> local or -1 (`router::ExpertMap::buffer`); None when all experts are local.
    pub expert_map: Option<Vector<'a, i32>>,
    /// Global expert count (the range of topk_ids).
    pub experts: usize,
}

/// The routed experts of a layer: `workspace.pair_out` `[tokens * k, dim]` = routing weight x expert(x) for every pair
/// of the grouping, through `workspace.act` (up + SwiGLU, then down); in W8A8 when `weights.fp8_activations`, with the
/// input and the activation quantised to e4m3 into `workspace.e4m3` first. `x` is `[tokens, dim]`, `topk_weights`
/// `[tokens, k]`.
///
/// Errors as [`up_swiglu`] and [`down`]; `Error::Shape` when `topk_weights` is not `[tokens, k]` or the workspace
/// was made for another batch; `Error::InvalidArgument` for a W8A8 layer whose workspace has no e4m3 buffers (made
/// before [`MoeLayerWeights::set_fp8_activations`]).
pub fn routed_experts(weights: &MoeLayerWeights, x: Matrix<bf16>, grouping: &Grouping, topk_weights: Matrix<f32>, workspace: &MoeWorkspace) -> Result<()> {
    routed_experts_finishing(weights, x, grouping, topk_weights, workspace, None)
}

/// [`routed_experts`] with an optional row finisher on the down-projection's launch.
fn routed_experts_finishing(
    weights: &MoeLayerWeights,
    x: Matrix<bf16>,
    grouping: &Grouping,
    topk_weights: Matrix<f32>,
    workspace: &MoeWorkspace,
    finish: Option<&RowFinish>,
) -> Result<()> {
    let (dim, hidden) = (weights.dim(), weights.hidden());
    let [tokens, _] = x.dims();
    let [_, top_k] = topk_weights.dims();
    topk_weights.expect_dims("routed experts topk_weights", [tokens, top_k])?;
    check_len("routed experts workspace act", workspace.act.len(), grouping.capacity() * hidden)?;
    check_len("routed experts workspace pair_out", workspace.pair_out.len(), tokens * top_k * dim)?;
    let act = workspace.act.view([grouping.capacity(), hidden])?;
    let pair_out = workspace.pair_out.view([tokens * top_k, dim])?;
    let Some(scales) = weights.fp8_activations else {
        let fp8_act = workspace.fp8_act.as_deref();
        launch_up_swiglu(&weights.gate_up, Input::Bf16(x), top_k, grouping, act, fp8_act)?;
        return launch_down(&weights.down, Input::Bf16(act), grouping, topk_weights, pair_out, finish, fp8_act);
    };
    let Some((x_e4m3, act_e4m3)) = &workspace.e4m3 else {
        return Err(Error::InvalidArgument("routed experts: W8A8 weights but the workspace has no e4m3 buffers (made before?)".into()));
    };
    x.expect_dims("routed experts x", [tokens, dim])?;
    let x_e4m3 = x_e4m3.view([tokens, dim])?;
    let act_e4m3 = act_e4m3.view([grouping.capacity(), hidden])?;
    quantize_act_e4m3(x, scales.up, x_e4m3)?;
    up_swiglu_w8a8(&weights.gate_up, E4m3Rows { data: x_e4m3, scale: scales.up }, top_k, grouping, act)?;
    quantize_slots_e4m3(act, grouping, scales.down, act_e4m3)?;
    launch_down(&weights.down, Input::E4m3(E4m3Rows { data: act_e4m3, scale: scales.down }), grouping, topk_weights, pair_out, finish, None)
}

/// The routed experts and the shared expert of a layer: `workspace.pair_out` as [`routed_experts`] writes it and
/// `workspace.shared_out` as [`shared_expert`] does, bit for bit. When the shared expert is packed like the routed
/// experts (same format and shape), the activations are bf16 and the launches run the narrow decode tile (small
/// batches: the single-stream case), it rides in the routed launches' extra blocks: two launches for the whole step
/// instead of four. Otherwise it runs apart, and without a shared expert this is [`routed_experts`].
///
/// Errors as [`routed_experts`] and [`shared_expert`].
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::moe::{self, Grouping, MoeLayerWeights, MoeWorkspace};
/// use small4::kernels::router::{moe_align, ExpertMap};
/// use small4::quant::{repack, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// // One routed expert (w = e_0 e_0^T) and a shared one twice as large (2 e_0 e_0^T), dim = hidden = 64.
/// let one_hot = |v: f32| {
///     let mut w = vec![0.0f32; 64 * 64];
///     w[0] = v;
///     QuantizedMatrix::quantize(WeightFormat::Bf16, &w, 64, 64)
/// };
/// let (routed, shared) = (one_hot(1.0)?, one_hot(2.0)?);
/// let pack = |w: &QuantizedMatrix| -> small4::Result<_> { Ok((repack::repack_gate_up(&[(w.into(), w.into())])?, repack::repack_linear(&[w.into()])?)) };
/// let ((ru, rd), (su, sd)) = (pack(&routed)?, pack(&shared)?);
/// let weights = MoeLayerWeights::upload(&device, &ru, &rd, Some((&su, &sd)))?;
/// // One token, x_0 = 1, routed to expert 0 with weight 0.5.
/// let mut x = vec![bf16::ZERO; 64];
/// x[0] = bf16::ONE;
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let (ids, topk_weights) = (DeviceBuffer::from_slice(&device, &[0i32])?, DeviceBuffer::from_slice(&device, &[0.5f32])?);
/// let alignment = moe_align(ids.view([1, 1])?, &ExpertMap::identity(&device, 1)?, moe::moe_tile_m(1, 1, 1))?;
/// let workspace = MoeWorkspace::new(&device, &weights, 1, 1, alignment.max_padded)?;
/// moe::routed_and_shared_experts(&weights, x.view([1, 64])?, &Grouping::from(&alignment), topk_weights.view([1, 1])?, &workspace)?;
/// let silu = |v: f32| v / (1.0 + (-v).exp());
/// // Routed: 0.5 * silu(1) * 1; shared: 2 * silu(2) * 2 (w1 = w3 = w2 = 2 e_0 e_0^T).
/// let (routed_out, shared_out) = (workspace.pair_out.to_vec()?[0], workspace.shared_out.to_vec()?[0]);
/// assert!((routed_out - 0.5 * silu(1.0)).abs() < 1e-2 && (shared_out - 4.0 * silu(2.0)).abs() < 5e-2, "{routed_out} {shared_out}");
/// # Ok::<(), small4::Error>(())
/// ```
pub fn routed_and_shared_experts(
    weights: &MoeLayerWeights,
    x: Matrix<bf16>,
    grouping: &Grouping,
    topk_weights: Matrix<f32>,
    workspace: &MoeWorkspace,
) -> Result<()> {
    routed_and_shared_finishing(weights, x, grouping, topk_weights, workspace, None)
}

/// [`routed_and_shared_experts`] with an optional row finisher on the last launch (the routed down-projection, which
/// then runs after the shared expert when that one runs apart).
fn routed_and_shared_finishing(
    weights: &MoeLayerWeights,
    x: Matrix<bf16>,
    grouping: &Grouping,
    topk_weights: Matrix<f32>,
    workspace: &MoeWorkspace,
    finish: Option<&RowFinish>,
) -> Result<()> {
    let Some(shared) = &weights.shared else {
        return routed_experts_finishing(weights, x, grouping, topk_weights, workspace, finish);
    };
    let (up, dn) = shared;
    let same_packing = |a: &DeviceWeights, b: &DeviceWeights| {
        (a.format, a.rows_padded, a.k_dim, a.out_cols, a.group) == (b.format, b.rows_padded, b.k_dim, b.out_cols, b.group)
    };
    let [tokens, _] = x.dims();
    let [_, top_k] = topk_weights.dims();
    // The tail rides only in the narrow and decode tiles (the kernel's wider tiles have no registers for it).
    let busy = (tokens * top_k).min(weights.experts()) + 1;
    let narrow =
        [&weights.gate_up, &weights.down].iter().all(|w| matches!(grouped_tile_shape(grouping, busy, w, tokens, false), TileShape::Narrow | TileShape::Decode));
    if weights.fp8_activations.is_some() || !narrow || !same_packing(up, &weights.gate_up) || !same_packing(dn, &weights.down) {
        shared_expert(shared, x, workspace)?;
        return routed_experts_finishing(weights, x, grouping, topk_weights, workspace, finish);
    }
    let (dim, hidden) = (weights.dim(), weights.hidden());
    topk_weights.expect_dims("routed experts topk_weights", [tokens, top_k])?;
    check_len("routed experts workspace act", workspace.act.len(), grouping.capacity() * hidden)?;
    check_len("routed experts workspace pair_out", workspace.pair_out.len(), tokens * top_k * dim)?;
    check_len("shared expert workspace", workspace.shared_act.len(), tokens * hidden)?;
    check_len("shared expert workspace out", workspace.shared_out.len(), tokens * dim)?;
    let act = workspace.act.view([grouping.capacity(), hidden])?;
    let shared_act = workspace.shared_act.view([tokens, hidden])?;
    let up_tail = DenseTail { w: up, x, out: TailOutput::SwiGlu(shared_act) };
    let rows = Rows::Grouped { grouping, top_k, pairs: tokens * top_k, tail: Some(up_tail) };
    let fp8_act = workspace.fp8_act.as_deref();
    launch_gemm(&weights.gate_up, Input::Bf16(x), tokens, true, rows, Output::SwiGlu(act), None, fp8_act)?;
    let down_tail = DenseTail { w: dn, x: shared_act, out: TailOutput::F32(workspace.shared_out.view([tokens, dim])?) };
    let rows = Rows::Grouped { grouping, top_k, pairs: tokens * top_k, tail: Some(down_tail) };
    let output = Output::F32ByPair { out: workspace.pair_out.view([tokens * top_k, dim])?, pair_weights: Some(topk_weights) };
    launch_gemm(&weights.down, Input::Bf16(act), grouping.capacity(), false, rows, output, finish, fp8_act)
}

/// One whole MoE layer: out `[tokens, dim]` bf16 = shared(x) + sum_j w_j expert_j(x) over the locally owned experts,
/// for `x [tokens, dim]` (the token count is read off it). Three launches: routed up (+SwiGLU) with the shared
/// expert's up, routed down (x routing weight) with the shared expert's down, combine (five when the shared expert is
/// packed apart, see [`routed_and_shared_experts`]); W8A8 layers (`weights.fp8_activations`) quantise the input and the
/// SwiGLU activation to e4m3 first (two more).
///
/// `Error::InvalidArgument` when `workspace` was made for another token count or `top_k`; `Error::Shape` when
/// `routing.topk_weights` is not `[tokens, k]`; otherwise the errors of [`routed_experts`], [`shared_expert`] and
/// [`combine`].
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::moe::{self, Grouping, MoeLayerWeights, MoeWorkspace, RoutingBuffers};
/// use small4::kernels::router::{moe_align, ExpertMap};
/// use small4::quant::{repack, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// let (dim, hidden) = (64, 64);
/// // One expert: act_0 = silu(x_0) * x_0, out_0 = act_0; every other weight 0.
/// let one_hot = |rows: usize, cols: usize| {
///     let mut w = vec![0.0f32; rows * cols];
///     w[0] = 1.0;
///     QuantizedMatrix::quantize(WeightFormat::Bf16, &w, rows, cols)
/// };
/// let (w1, w3, w2) = (one_hot(hidden, dim)?, one_hot(hidden, dim)?, one_hot(dim, hidden)?);
/// let gate_up = repack::repack_gate_up(&[((&w1).into(), (&w3).into())])?;
/// let weights = MoeLayerWeights::upload(&device, &gate_up, &repack::repack_linear(&[(&w2).into()])?, None)?;
/// // Two tokens, x_0 = 1 and 2, both routed to expert 0 with weight 1.
/// let mut x = vec![bf16::ZERO; 2 * dim];
/// (x[0], x[dim]) = (bf16::ONE, bf16::from_f32(2.0));
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let (ids, topk_weights) = (DeviceBuffer::from_slice(&device, &[0i32, 0])?, DeviceBuffer::from_slice(&device, &[1.0f32, 1.0])?);
/// let alignment = moe_align(ids.view([2, 1])?, &ExpertMap::identity(&device, 1)?, moe::moe_tile_m(2, 1, 1))?;
/// let workspace = MoeWorkspace::new(&device, &weights, 2, 1, alignment.max_padded)?;
/// let routing = RoutingBuffers { topk_ids: ids.view([2, 1])?, topk_weights: topk_weights.view([2, 1])?, expert_map: None, experts: 1 };
/// let out = DeviceBuffer::<bf16>::alloc(&device, 2 * dim)?;
/// moe::moe_layer(&weights, x.view([2, dim])?, &routing, &Grouping::from(&alignment), &workspace, out.view([2, dim])?)?;
/// let got = out.to_vec()?;
/// let silu = |v: f32| v / (1.0 + (-v).exp());
/// assert!((got[0].to_f32() - silu(1.0)).abs() < 1e-2 && (got[dim].to_f32() - 2.0 * silu(2.0)).abs() < 2e-2);
/// assert!(got[1..dim].iter().all(|v| v.to_f32() == 0.0));
/// // One token against a workspace made for two is a typed error:
/// let one = RoutingBuffers { topk_ids: ids.view([1, 1])?, topk_weights: topk_weights.view([1, 1])?, ..routing };
/// let err = moe::moe_layer(&weights, x.view([1, dim])?, &one, &Grouping::from(&alignment), &workspace, out.view([1, dim])?);
/// assert!(matches!(err, Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn moe_layer(
    weights: &MoeLayerWeights,
    x: Matrix<bf16>,
    routing: &RoutingBuffers,
    grouping: &Grouping,
    workspace: &MoeWorkspace,
    out: Matrix<bf16>,
) -> Result<()> {
    let (pair_out, shared_out) = workspace.layer_outputs("moe_layer", weights, x, routing)?;
    routed_and_shared_experts(weights, x, grouping, routing.topk_weights, workspace)?;
    combine(pair_out, shared_out, routing.topk_ids, routing.expert_map, routing.experts, out)
}

/// One whole MoE layer and the residual add + RMSNorm after it, the combine running in the experts' last launch:
/// `norm.residual_out = combine(pairs) + norm.residual` (the combine rounded to bf16 as [`combine`] writes it),
/// `norm.out = rms_norm(that) * norm.weight`, bit for bit [`moe_layer`] followed by [`norm::add_rms_norm`] (and
/// [`routed_and_shared_experts`] followed by [`norm::moe_combine_add_rms_norm`]). A batch-1 decode step's MoE layer is
/// then the router and two launches. `counters`: one zero counter per token ([`RowCounters`]).
///
/// Every expert must be local (`routing.expert_map` None): a token's row is finished when all its pairs are in, and
/// another GPU's pairs never arrive here. `Error::InvalidArgument` otherwise; errors as [`moe_layer`] and
/// [`norm::moe_combine_add_rms_norm`]; `Error::Shape` when `counters` is shorter than the tokens.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::moe::{self, Grouping, MoeLayerWeights, MoeWorkspace, RoutingBuffers, RowCounters};
/// use small4::kernels::norm::ResidualNorm;
/// use small4::kernels::router::{moe_align, ExpertMap};
/// use small4::quant::{repack, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// let dim = 64;
/// // One expert with w1 = w3 = w2 = identity: out = silu(x) * x. One token x = 1 (routing weight 1), residual 0:
/// // h = bf16(silu(1)) everywhere and rms_norm(h) = 1.
/// let eye: Vec<f32> = (0..dim * dim).map(|i| if i % (dim + 1) == 0 { 1.0 } else { 0.0 }).collect();
/// let w = QuantizedMatrix::quantize(WeightFormat::Bf16, &eye, dim, dim)?;
/// let gate_up = repack::repack_gate_up(&[((&w).into(), (&w).into())])?;
/// let weights = MoeLayerWeights::upload(&device, &gate_up, &repack::repack_linear(&[(&w).into()])?, None)?;
/// let x = DeviceBuffer::from_slice(&device, &[bf16::ONE; 64])?;
/// let (ids, topk_weights) = (DeviceBuffer::from_slice(&device, &[0i32])?, DeviceBuffer::from_slice(&device, &[1.0f32])?);
/// let alignment = moe_align(ids.view([1, 1])?, &ExpertMap::identity(&device, 1)?, moe::moe_tile_m(1, 1, 1))?;
/// let workspace = MoeWorkspace::new(&device, &weights, 1, 1, alignment.max_padded)?;
/// let routing = RoutingBuffers { topk_ids: ids.view([1, 1])?, topk_weights: topk_weights.view([1, 1])?, expert_map: None, experts: 1 };
/// let (zeros, ones) = (DeviceBuffer::from_slice(&device, &[bf16::ZERO; 64])?, DeviceBuffer::from_slice(&device, &[bf16::ONE; 64])?);
/// let (h, out) = (DeviceBuffer::<bf16>::alloc(&device, 64)?, DeviceBuffer::<bf16>::alloc(&device, 64)?);
/// let norm = ResidualNorm { residual: zeros.view([1, 64])?, weight: ones.as_vector(), residual_out: h.view([1, 64])?, out: out.view([1, 64])?, eps: 0.0 };
/// moe::moe_layer_add_rms_norm(&weights, x.view([1, 64])?, &routing, &Grouping::from(&alignment), &workspace, &norm, &RowCounters::new(&device, 1)?)?;
/// let silu_1 = bf16::from_f32(1.0 / (1.0 + (-1.0f32).exp()));
/// assert!(h.to_vec()?.iter().all(|v| (v.to_f32() - silu_1.to_f32()).abs() < 1e-2));
/// assert!(out.to_vec()?.iter().all(|v| *v == bf16::ONE));
/// # Ok::<(), small4::Error>(())
/// ```
#[allow(clippy::too_many_arguments)]
pub fn moe_layer_add_rms_norm(
    weights: &MoeLayerWeights,
    x: Matrix<bf16>,
    routing: &RoutingBuffers,
    grouping: &Grouping,
    workspace: &MoeWorkspace,
    norm: &ResidualNorm,
    counters: &RowCounters,
) -> Result<()> {
    if routing.expert_map.is_some() {
        return Err(Error::InvalidArgument("moe_layer_add_rms_norm: every expert must be local (no expert map)".into()));
    }
    let (pair_out, shared_out) = workspace.layer_outputs("moe_layer_add_rms_norm", weights, x, routing)?;
    let pairs = MoePairs { pair_out, shared_out, topk_ids: routing.topk_ids, expert_map: None, experts: routing.experts };
    let finish = RowFinish::moe_norm(counters, norm::moe_combine_add_rms_norm_params(&pairs, norm)?);
    routed_and_shared_finishing(weights, x, grouping, routing.topk_weights, workspace, Some(&finish))
}
