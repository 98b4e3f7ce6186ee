//! The GEMM launcher that the dense wrappers ([`super::dense`]: attention projections, MLA's absorption, the output
//! head, a dense FFN) and the MoE wrappers ([`super::moe`]: the routed experts' up and down projections, the shared
//! expert riding in them) share: `y = x W^T` for one matrix, one matrix per head, or each expert's matrix over the
//! router's grouping of (token, expert) pairs.
//!
//! It owns the weights on the device ([`DeviceWeights`], `weights`), the choice of tile and k splits for a launch of
//! so many rows (`tile`: the decode kernel up to [`DECODE_MAX_ROWS`] rows, the narrow or BM-128 decode tile up to 32,
//! the prefill tile above, on wgmma where [`super::moe_wgmma`] / [`super::moe_wgmma_fp8`] apply), the input, output
//! and row types of a launch, the parameter building and the launch itself (`launch_gemm`, with the L2 prefetch the
//! decode kernel may issue), and the row finisher some launches run on each finished row ([`RowCounters`]).
//!
//! The kernels of both modes live in `cuda/moe_gemm.cu` (mma.sync: decode kernel, narrow, small and prefill tiles, the
//! split-K sums, the W8A8 kernels) and `cuda/moe_gemm_wgmma*.cu` (the Hopper prefill tiles); dense launches are
//! grouped launches of one group.

mod tile;
mod weights;

use half::bf16;

pub use tile::{dense_takes_prefill_tile, override_decode_tile, DECODE_MAX_ROWS};
pub(super) use tile::{grouped_tile_shape, staged_scale_bytes, TileShape};
pub use weights::DeviceWeights;

use self::tile::{dense_tile_shape, DECODE_W2_WARPS};
use super::moe::Grouping;
use super::moe_wgmma_fp8::Fp8ActScratch;
use super::params::{
    GemmRowFinish, MlaCacheWriteParams, MoeDenseTail, MoeGemmParams, RmsNormParams, RopeParams, SMALL4_GEMM_FINISH_MLA_LATENTS_BF16,
    SMALL4_GEMM_FINISH_MLA_LATENTS_FP8, SMALL4_GEMM_FINISH_MOE_NORM, SMALL4_GEMM_FINISH_NONE, SMALL4_GEMM_FINISH_NORM,
};
use super::prefetch::L2Prefetch;
use super::{check_len, opt_ptr, opt_view_ptr, to_i32, Matrix};
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, LaunchConfig};
use crate::error::{Error, Result};
use crate::quant::WeightFormat;

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
    pub(super) w: &'a DeviceWeights,
    pub(super) x: Matrix<'a, bf16>,
    pub(super) out: TailOutput<'a>,
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

/// Activations quantised to e4m3 for the W8A8 GEMMs: rows of `cols` bytes, value = e4m3 * `scale`, each 32 columns
/// in the permuted order [`quantize_act_e4m3`](super::moe::quantize_act_e4m3) writes (only the
/// `moe_gemm_fp8_act_*` kernels read it). The rows may be strided (the GEMM loads 16 bytes at a time: the start and
/// the stride must be multiples of 16).
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

/// `Error::InvalidArgument` naming `what` unless a static activation scale is finite and positive.
pub(super) fn check_act_scale(what: &str, scale: f32) -> Result<()> {
    if !(scale.is_finite() && scale > 0.0) {
        return Err(Error::InvalidArgument(format!("{what}: activation scale {scale} must be finite and positive")));
    }
    Ok(())
}

/// One launch of the grouped or dense GEMM. The input holds `x_rows` rows of `w.k_dim`; `in_by_token` = rows are
/// picked by pair / k. Input and output rows may be strided (the kernel takes both strides); the input's 16-byte
/// loads need its start and stride on 16 bytes. `fp8_act`: where an fp8-activation prefill launch
/// ([`super::moe_wgmma_fp8`]) quantises its input rows (None: buffers of its own). `l2_prefetch`: a later kernel's
/// weights the decode kernel pulls into L2 while it runs ([`super::prefetch`]; the other tiles ignore it): the
/// decode step's absorption launches pass a share of wo's, every other launch [`L2Prefetch::NONE`].
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
            let shape = grouped_tile_shape(grouping.tile_m, pairs.min(w.experts) + tail.is_some() as usize, w, pairs / top_k, e4m3_input);
            if tail.is_some() && !shape.carries_tail() {
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
    // Split-K: the dense decode launches of one matrix on the decode kernel or the narrow tile (one row block) with
    // bf16 inputs, as the matrix chose; they run the _split kernels.
    let split_k =
        w.split_k.as_ref().filter(|_| grouping.is_none() && heads == 1 && matches!(shape, TileShape::Decode | TileShape::Narrow) && grid_y == 1 && !e4m3_input);
    let shared_bytes = match (shape, &rows) {
        (TileShape::Decode, Rows::Dense { rows, .. }) => TileShape::dense_decode_shared_bytes(w, *rows),
        (TileShape::Decode, Rows::Grouped { pairs, top_k, .. }) => {
            TileShape::grouped_decode_shared_bytes(w, pairs / top_k, tail.as_ref().map_or(0, |t| t.rows as usize))
        }
        _ => shape.shared_bytes(w.format, e4m3_input, w.k_dim),
    };
    // Grid z: the k splits, or the heads of a batched dense launch.
    let grid_z = split_k.map_or(heads, |s| s.splits);
    let block_warps = shape.block_warps(split_k.is_some(), finish.is_some(), shared_bytes, w.rows_padded / shape.features() * grid_y * grid_z);
    let grid_x = w.rows_padded / shape.block_features(block_warps);
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
        weights: w.kernel_operand(),
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
        // No tail: rows 0 and null pointers.
        tail: tail.unwrap_or_default(),
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
        l2_prefetch: l2_prefetch.for_grid((grid_x * grid_y * grid_z) as u64),
        own_prefetch_k_blocks: own_prefetch_k_blocks(
            shape,
            grid_x * grid_y * grid_z,
            split_k.is_some(),
            block_warps,
            match rows {
                // A grouped launch's routed blocks wait first: only its dense tail's blocks prefetch.
                Rows::Grouped { tail, .. } => tail.map(|t| (t.w, grid_x * (grid_y - tiles), t.w.k_dim / K_BLOCK)),
                Rows::Dense { .. } => Some((w, grid_x * grid_y * grid_z, (w.k_dim / K_BLOCK).div_ceil(split_k.map_or(1, |s| s.splits)))),
            },
        ),
        walk_tiles: 0, // the whole walk (moe_wgmma::with_walk_window cuts it)
    };
    let config = LaunchConfig {
        grid: Dim3::xyz(grid_x as u32, grid_y as u32, grid_z as u32),
        block: Dim3::x((block_warps * 32) as u32),
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
        None if block_warps == DECODE_W2_WARPS => TileShape::decode_w2_kernel(w.format),
        None => shape.kernel(w.format, e4m3_input),
    };
    launch_with(device, &kernel, &config, &params)
}

/// k of one repacked k block (the kernels' kBK).
const K_BLOCK: usize = 64;

/// Most bytes of its own weights and scales one decode launch asks L2 for before its wait: two thirds of an H100's
/// 50 MB L2, so the lines stay there until their warp's k loop reads them, beside the step's activations and what the
/// launches before prefetched for later kernels. wo [4096, 4096] in bf16, the largest dense decode matrix but the
/// head, asks 28 MiB (its 4 splits' k ranges less the ring's first turns).
const OWN_PREFETCH_MAX_BYTES: usize = 32 << 20;

/// The decode kernel's `own_prefetch_k_blocks` (params.h) for a launch of `blocks` blocks of `warps` warps in all on
/// `shape` (split-K entries when `split`), of which `prefetching` = (the weights, their blocks, k blocks a block
/// reduces) issue their own k range's prefetch (a dense launch's blocks, a grouped launch's dense tail; None: no such
/// block).
///
/// 0 unless the decode kernel runs, the weights allow it ([`DeviceWeights::decode_own_prefetch`]) and the whole grid is
/// resident at once ([`TileShape::decode_one_round_blocks`]): a later wave's blocks start after the kernel before has
/// finished, so their prefetch overlaps nothing, and the launches of several waves (the output head: 2,048 blocks, 1
/// GiB of bf16) already stream at 87-88% of HBM in the timing model (docs/perf.md "Dense decode GEMMs on the decode
/// kernel"). Otherwise the blocks' whole k range, or as much of it as keeps the launch under
/// [`OWN_PREFETCH_MAX_BYTES`].
fn own_prefetch_k_blocks(shape: TileShape, blocks: usize, split: bool, warps: usize, prefetching: Option<(&DeviceWeights, usize, usize)>) -> i32 {
    let Some((w, prefetching_blocks, k_blocks)) = prefetching else { return 0 };
    if shape != TileShape::Decode || !w.own_prefetch || blocks > TileShape::decode_one_round_blocks(split, warps) || prefetching_blocks == 0 {
        return 0;
    }
    let bytes_per_k_block = prefetching_blocks * warps * (crate::quant::repack::tile_bytes(w.format) + staged_scale_bytes(w.format));
    k_blocks.min(OWN_PREFETCH_MAX_BYTES / bytes_per_k_block) as i32
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
        weights: t.kernel_operand(),
        x: tail.x.ptr(),
        out_bf16,
        out_f32,
        rows: to_i32("gemm tail rows", rows)?,
        x_stride: to_i32("gemm tail x stride", tail.x.row_stride())?,
        out_stride: to_i32("gemm tail out stride", out_stride)?,
    })
}

/// Per-row arrival counters for GEMM launches that finish their rows themselves
/// ([`super::dense::linear_add_rms_norm`], [`super::moe::moe_layer_add_rms_norm`], `attention::latent_projection`):
/// one zero counter per token a launch may write. Every such launch leaves them zero (the block that finishes a row
/// resets its counter), so one set serves all the launches of a stream, in order, and every replay of a CUDA graph.
///
/// ```
/// let counters = small4::kernels::gemm::RowCounters::new(&small4::device::simulator(), 4)?;
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
    pub(super) fn moe_norm(counters: &'a RowCounters, norm: RmsNormParams) -> Self {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::simulator;
    use crate::quant::repack::repack_linear;
    use crate::quant::QuantizedMatrix;

    /// The host's rule for a decode launch's own-range prefetch: none off the decode kernel, with the weights' switch
    /// off, or on a grid of more than one wave (the entries' guaranteed residency on 132 SMs); else the blocks' k range,
    /// cut to keep the launch's bytes under `OWN_PREFETCH_MAX_BYTES`.
    #[test]
    fn own_prefetch_only_on_one_wave_of_the_decode_kernel_within_the_budget() {
        let device = simulator();
        let q = QuantizedMatrix::quantize(WeightFormat::Bf16, &vec![0.5; 128 * 4096], 128, 4096).unwrap();
        let mut w = DeviceWeights::upload(&device, &repack_linear(&[(&q).into()]).unwrap()).unwrap();
        let decode = |w: &DeviceWeights, blocks: usize, split: bool, k_blocks: usize| {
            own_prefetch_k_blocks(TileShape::Decode, blocks, split, 4, Some((w, blocks, k_blocks)))
        };
        // wo [4096, 4096] bf16 in 4 splits: 256 blocks of 16 k blocks, all of it within 32 MiB.
        assert_eq!(decode(&w, 256, true, 16), 16);
        // One wave: 264 split blocks (2 an SM), 396 unsplit (3 an SM); 264 blocks of 8 KiB a k block fit 15 of 16 in 32 MiB.
        assert_eq!((decode(&w, 264, true, 16), decode(&w, 265, true, 16), decode(&w, 396, false, 8), decode(&w, 397, false, 8)), (15, 0, 8, 0));
        // The head's 2,048 blocks: several waves.
        assert_eq!(decode(&w, 2048, false, 64), 0);
        // 396 unsplit blocks of 64 k blocks (8 KiB a k block a block): 32 MiB / (396 x 8 KiB) = 10 k blocks.
        assert_eq!(decode(&w, 396, false, 64), 10);
        // 2-warp blocks: 6 an SM, 792 at once; 4 KiB a k block a block.
        let w2 = |blocks: usize, k_blocks: usize| own_prefetch_k_blocks(TileShape::Decode, blocks, false, DECODE_W2_WARPS, Some((&w, blocks, k_blocks)));
        assert_eq!((w2(792, 8), w2(793, 8), w2(792, 64)), (8, 0, 10));
        assert_eq!(own_prefetch_k_blocks(TileShape::Narrow, 256, true, 4, Some((&w, 256, 16))), 0);
        assert_eq!(own_prefetch_k_blocks(TileShape::Decode, 320, false, 4, None), 0, "a grouped launch without a tail");
        w.set_decode_own_prefetch(false);
        assert_eq!(decode(&w, 256, true, 16), 0);
    }

    /// The decode kernel's block: 2 warps for unsplit launches of one round without a row finisher where that lowers
    /// the busiest SM's warp tiles and the activation rows let six blocks share an SM (batch 1 to 3 at K 4096, up to 8
    /// tokens at K 2048), else 4 warps; the other tiles 4.
    #[test]
    fn two_warp_decode_blocks_only_unsplit_without_a_finisher_where_six_fit() {
        let device = simulator();
        let wide = |k: usize| {
            let q = QuantizedMatrix::quantize(WeightFormat::Nvfp4, &vec![0.5; 128 * k], 128, k).unwrap();
            DeviceWeights::upload(&device, &repack_linear(&[(&q).into()]).unwrap()).unwrap()
        };
        let (k4096, k2048) = (wide(4096), wide(2048));
        let warps = |w: &DeviceWeights, tokens: usize, split: bool, finisher: bool| {
            TileShape::Decode.block_warps(split, finisher, TileShape::grouped_decode_shared_bytes(w, tokens, 0), 320)
        };
        // One token at K 4096: its row and the zero row, 16 KiB.
        assert_eq!(TileShape::grouped_decode_shared_bytes(&k4096, 1, 0), 16 << 10);
        assert_eq!(TileShape::grouped_decode_shared_bytes(&k4096, 1, 3), 32 << 10, "a tail of 3 rows stages 4");
        assert_eq!((warps(&k4096, 1, false, false), warps(&k4096, 3, false, false), warps(&k4096, 4, false, false)), (2, 2, 4));
        assert_eq!((warps(&k2048, 8, false, false), warps(&k4096, 1, true, false), warps(&k4096, 1, false, true)), (2, 4, 4));
        assert_eq!(TileShape::Narrow.block_warps(false, false, 0, 320), 4);
        // Batch 1's MoE launches with the shared expert are 320 blocks of 4 warps, one round of 3 an SM (the busiest SM
        // 12 warp tiles, 10 in 2-warp blocks); without it 256, 2 an SM (8 warp tiles either way); the output head's
        // 2,048 are several rounds; 64 blocks leave SMs idle.
        let one_token = TileShape::grouped_decode_shared_bytes(&k4096, 1, 0);
        let at = |blocks: usize| TileShape::Decode.block_warps(false, false, one_token, blocks);
        assert_eq!((at(320), at(256), at(2048), at(64), at(133)), (2, 4, 4, 2, 2));
        assert_eq!((TileShape::Decode.block_features(2), TileShape::decode_one_round_blocks(false, 2)), (32, 792));
    }
}
