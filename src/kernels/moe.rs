//! The MoE layer on the shared GEMM launcher ([`super::gemm`]): the routed experts' fused up-projection with
//! SwiGLU and their down-projection times the routing weight over the router's grouping ([`Grouping`]), the shared
//! expert (riding in the routed launches as a dense tail, or apart), the W8A8 activation quantiser, the
//! deterministic combine, the layer's weights and workspace, and one function that runs a whole MoE layer from the
//! router's outputs and grouping. Its kernels are `cuda/moe_gemm.cu`'s.

use std::sync::Arc;

use half::bf16;

use super::dense;
use super::gemm::{
    check_act_scale, check_quantize_rows, grouped_tile_shape, launch_gemm, DenseTail, DeviceWeights, E4m3Rows, Input, Output, RowCounters, RowFinish, Rows,
    TailOutput, TileShape,
};
use super::modules::MOE_GEMM;
use super::moe_wgmma_fp8::Fp8ActScratch;
use super::norm::{self, MoePairs, ResidualNorm};
use super::params::{MoeCombineParams, MoeQuantizeActParams};
use super::prefetch::L2Prefetch;
use super::{check_len, opt_ptr, opt_view_ptr, to_i32};
use super::{Matrix, Vector};
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};
use crate::quant::repack::PackedWeights;
use crate::quant::WeightFormat;

/// The aligner's tile for a batch: 8 slots while experts see few pairs on average (decode; the small kernel covers
/// up to 32 pairs of an expert in one pass over its weights), 64 once they see 32 or more (prefill tiles).
pub fn moe_tile_m(tokens: usize, k: usize, experts: usize) -> usize {
    if tokens * k >= 32 * experts.max(1) {
        64
    } else {
        8
    }
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
    pub(super) fn check(&self, local_experts: usize) -> Result<()> {
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
    pub(super) fn capacity(&self) -> usize {
        self.sorted_pairs.len()
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
    launch_gemm(w, x, tokens, true, Rows::Grouped { grouping, top_k, pairs: tokens * top_k, tail: None }, Output::SwiGlu(act), None, fp8_act, &L2Prefetch::NONE)
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
    launch_gemm(w, act, slots, false, Rows::Grouped { grouping, top_k, pairs, tail: None }, output, finish, fp8_act, &L2Prefetch::NONE)
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
/// use small4::kernels::gemm::E4m3Rows;
/// use small4::kernels::moe::{self, Fp8ActScales, Grouping, MoeLayerWeights};
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
    let narrow = [&weights.gate_up, &weights.down].iter().all(|w| grouped_tile_shape(grouping.tile_m, busy, w, tokens, false).carries_tail());
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
    launch_gemm(&weights.gate_up, Input::Bf16(x), tokens, true, rows, Output::SwiGlu(act), None, fp8_act, &L2Prefetch::NONE)?;
    let down_tail = DenseTail { w: dn, x: shared_act, out: TailOutput::F32(workspace.shared_out.view([tokens, dim])?) };
    let rows = Rows::Grouped { grouping, top_k, pairs: tokens * top_k, tail: Some(down_tail) };
    let output = Output::F32ByPair { out: workspace.pair_out.view([tokens * top_k, dim])?, pair_weights: Some(topk_weights) };
    launch_gemm(&weights.down, Input::Bf16(act), grouping.capacity(), false, rows, output, finish, fp8_act, &L2Prefetch::NONE)
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
/// use small4::kernels::gemm::RowCounters;
/// use small4::kernels::moe::{self, Grouping, MoeLayerWeights, MoeWorkspace, RoutingBuffers};
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
