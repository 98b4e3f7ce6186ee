//! Dense GEMMs `y = x W^T` (one matrix, rows = tokens): the attention projections, MLA's per-head absorption (all
//! heads in one launch), the output head, a dense FFN's halves; with the small step that follows some of them done in
//! the same launch (the query's RoPE, the residual add + RMSNorm after wo). They run `cuda/moe_gemm.cu`'s kernels in
//! dense mode (one group): every weight format ([`DeviceWeights`]); up to 8 rows the decode kernel (weights straight
//! into registers, k split over the SMs as the matrix chose: [`DeviceWeights::decode_k_splits`]; the head too), 9-32
//! rows the narrow tile or, for wide outputs, the BM-128 decode tile, above that the prefill tile (on wgmma for bf16,
//! int4 and nvfp4, activations loaded by TMA: `kernels::moe_wgmma`), launched by [`super::gemm`]'s launcher, which
//! the MoE layer's launches share.

use half::bf16;

use super::gemm::{launch_gemm, DeviceWeights, Input, Output, RowCounters, RowFinish, Rows};
use super::moe_wgmma_fp8::Fp8ActScratch;
use super::norm::{self, ResidualNorm};
use super::ops::{self, QueryScale};
use super::prefetch::L2Prefetch;
use super::{Matrix, TensorView, Vector};
use crate::error::{Error, Result};

/// Dense `y = x W^T` (bf16 weights or any packed format, one matrix): x `[rows, k_dim]` -> y `[rows, out_cols]` bf16,
/// f32 accumulation.
///
/// Both views may have strided rows: one launch reads one head's slice of a `[tokens, heads, head_dim]` tensor or
/// writes into one head's columns of another (`.columns(..)`), without a copy. `x` must start on 16 bytes with a row
/// stride that is a multiple of 8 (the kernel's 16-byte loads).
///
/// `Error::InvalidArgument` when `w` holds more than one matrix or is SwiGLU-packed, `x` is misaligned, or the row
/// tiles exceed the grid; `Error::Shape` when `x` is not `[rows, k_dim]` or `y` not `[rows, out_cols]`;
/// `Error::OutOfRange` for a dimension above `i32`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dense;
/// use small4::kernels::gemm::DeviceWeights;
/// use small4::quant::{repack::repack_linear, QuantizedMatrix, WeightFormat};
///
/// let device = simulator(); // the PTX interpreter; `small4::device::gpu()?` on a GPU
/// // W [2, 64]: y0 = x0, y1 = 2 x1.
/// let mut w = vec![0.0f32; 2 * 64];
/// (w[0], w[64 + 1]) = (1.0, 2.0);
/// let w = QuantizedMatrix::quantize(WeightFormat::Bf16, &w, 2, 64)?;
/// let w = DeviceWeights::upload(&device, &repack_linear(&[(&w).into()])?)?;
/// // Three rows x = [r, 1, 0, ..].
/// let x: Vec<bf16> = (0..3 * 64).map(|i| bf16::from_f32(match i % 64 { 0 => (i / 64) as f32, 1 => 1.0, _ => 0.0 })).collect();
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// // Written into the last two columns of rows of four.
/// let y = DeviceBuffer::from_slice(&device, &[bf16::ZERO; 3 * 4])?;
/// dense::linear(&w, x.view([3, 64])?, y.view([3, 4])?.columns(2..4)?)?;
/// let got: Vec<f32> = y.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(got, [0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, 2.0, 2.0]);
/// // An output with fewer rows than the input is a typed error, not a short write:
/// let err = dense::linear(&w, x.view([3, 64])?, y.view([2, 2])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn linear(w: &DeviceWeights, x: Matrix<bf16>, y: Matrix<bf16>) -> Result<()> {
    let [rows, _] = x.dims();
    launch_gemm(w, Input::Bf16(x), rows, false, Rows::dense(rows), Output::Bf16(y), None, None, &L2Prefetch::NONE)
}

/// [`linear`] whose launch also runs `finish` on each output row (`attention::latent_projection`'s latent norms);
/// `fp8_act` as for [`linear_f32`].
pub(crate) fn linear_finishing_rows(w: &DeviceWeights, x: Matrix<bf16>, y: Matrix<bf16>, finish: &RowFinish, fp8_act: Option<&Fp8ActScratch>) -> Result<()> {
    let [rows, _] = x.dims();
    launch_gemm(w, Input::Bf16(x), rows, false, Rows::dense(rows), Output::Bf16(y), Some(finish), fp8_act, &L2Prefetch::NONE)
}

/// The query projection with the query's RoPE in its epilogue: `q = x W^T` into `q [rows, heads, head_dim]`, then
/// [`ops::rope_q_k`]`(q, None, positions, inv_freq, scale)` on each finished tile (the rope dims of each head rotated,
/// all of q times the llama-4 query scale): bit for bit the two launches one after the other, in one. `fp8_act` as
/// for [`linear_f32`].
///
/// Errors as [`linear`] (with `y` = q as a matrix) and [`ops::rope_q_k`].
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dense;
/// use small4::kernels::gemm::DeviceWeights;
/// use small4::kernels::ops::QueryScale;
/// use small4::quant::{repack::repack_linear, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// // One head of 64 dims (all rope) = W x with W = identity: x = (1, 0, 1, 0, ..) at position 0 (angle 0): q = x.
/// let eye: Vec<f32> = (0..64 * 64).map(|i| if i % 65 == 0 { 1.0 } else { 0.0 }).collect();
/// let w = DeviceWeights::upload(&device, &repack_linear(&[(&QuantizedMatrix::quantize(WeightFormat::Bf16, &eye, 64, 64)?).into()])?)?;
/// let x: Vec<bf16> = (0..64).map(|i| if i % 2 == 0 { bf16::ONE } else { bf16::ZERO }).collect();
/// let (x, q) = (DeviceBuffer::from_slice(&device, &x)?, DeviceBuffer::<bf16>::alloc(&device, 64)?);
/// let (positions, inv_freq) = (DeviceBuffer::from_slice(&device, &[0i32])?, DeviceBuffer::from_slice(&device, &[1.0f32; 32])?);
/// let no_scale = QueryScale { beta: 0.0, original_max_position: 8192 };
/// dense::linear_rope_q(&w, x.view([1, 64])?, q.view([1, 1, 64])?, positions.as_vector(), inv_freq.as_vector(), no_scale, None)?;
/// assert_eq!(q.to_vec()?, x.to_vec()?);
/// # Ok::<(), small4::Error>(())
/// ```
pub fn linear_rope_q(
    w: &DeviceWeights,
    x: Matrix<bf16>,
    q: TensorView<bf16, 3>,
    positions: Vector<i32>,
    inv_freq: Vector<f32>,
    scale: QueryScale,
    fp8_act: Option<&Fp8ActScratch>,
) -> Result<()> {
    let [rows, _] = x.dims();
    let rope = ops::rope_params(q, None, positions, inv_freq, scale)?;
    launch_gemm(w, Input::Bf16(x), rows, false, Rows::dense(rows), Output::Bf16Rope(q.as_matrix(), rope), None, fp8_act, &L2Prefetch::NONE)
}

/// A block's output projection and the residual add + RMSNorm after it, in one launch: `y = x W^T` ([`linear`]), then,
/// as each row of `y` is finished, [`norm::add_rms_norm`]`(y, norm)`: `norm.residual_out = y + norm.residual`,
/// `norm.out = rms_norm(that) * norm.weight`. Bit for bit the two launches one after the other. `counters`: one zero
/// counter per row ([`RowCounters`]); `fp8_act` as for [`linear_f32`].
///
/// Errors as [`linear`] and [`norm::add_rms_norm`]; `Error::Shape` when `counters` is shorter than the rows.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dense;
/// use small4::kernels::gemm::{DeviceWeights, RowCounters};
/// use small4::kernels::norm::ResidualNorm;
/// use small4::quant::{repack::repack_linear, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// // W = identity [64, 64]; one row x = 1; the residual is 1, so h = 2 everywhere and rms_norm(h) = 1.
/// let eye: Vec<f32> = (0..64 * 64).map(|i| if i % 65 == 0 { 1.0 } else { 0.0 }).collect();
/// let w = DeviceWeights::upload(&device, &repack_linear(&[(&QuantizedMatrix::quantize(WeightFormat::Bf16, &eye, 64, 64)?).into()])?)?;
/// let ones = DeviceBuffer::from_slice(&device, &[bf16::ONE; 64])?;
/// let (y, h, out) = (DeviceBuffer::<bf16>::alloc(&device, 64)?, DeviceBuffer::<bf16>::alloc(&device, 64)?, DeviceBuffer::<bf16>::alloc(&device, 64)?);
/// let norm = ResidualNorm { residual: ones.view([1, 64])?, weight: ones.as_vector(), residual_out: h.view([1, 64])?, out: out.view([1, 64])?, eps: 0.0 };
/// dense::linear_add_rms_norm(&w, ones.view([1, 64])?, y.view([1, 64])?, &norm, &RowCounters::new(&device, 1)?, None)?;
/// assert!(h.to_vec()?.iter().all(|v| v.to_f32() == 2.0) && out.to_vec()?.iter().all(|v| *v == bf16::ONE));
/// // Counters for no row are a typed error:
/// let few = RowCounters::new(&device, 1)?;
/// let two = DeviceBuffer::<bf16>::alloc(&device, 128)?;
/// let norm2 = ResidualNorm { residual: two.view([2, 64])?, weight: ones.as_vector(), residual_out: two.view([2, 64])?, out: two.view([2, 64])?, eps: 0.0 };
/// assert!(matches!(dense::linear_add_rms_norm(&w, two.view([2, 64])?, two.view([2, 64])?, &norm2, &few, None), Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn linear_add_rms_norm(
    w: &DeviceWeights,
    x: Matrix<bf16>,
    y: Matrix<bf16>,
    norm: &ResidualNorm,
    counters: &RowCounters,
    fp8_act: Option<&Fp8ActScratch>,
) -> Result<()> {
    let finish = RowFinish::norm(counters, norm::add_rms_norm_params(y, norm)?);
    linear_finishing_rows(w, x, y, &finish, fp8_act)
}

/// Per-head dense products in one launch: `y[r, h, ..out_cols] = x[r, h, ..k_dim] W_h^T` for every head h, with `w`
/// holding one matrix per head (`repack_linear` of the heads' matrices, in head order). x is `[rows, heads, head_in]`
/// and the GEMM reads the first `k_dim` values of each head (the nope part of a query head, `k_dim <= head_in`); y is
/// `[rows, heads, out_cols]`. Both may have strided rows. MLA's absorbed products (W_UK on the queries, W_UV on the
/// attention's latent output) run through it: one launch for all heads instead of one per head. `fp8_act` as for
/// [`linear_f32`] (a launch of one head, fp8 weights and prefill rows may quantise there).
///
/// `Error::InvalidArgument` when `w` does not hold one matrix per head, is SwiGLU-packed, a head's input does not
/// start on 16 bytes, or `k_dim > head_in`; `Error::Shape` when y is not `[rows, heads, out_cols]`; the errors of
/// [`linear`] otherwise.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dense;
/// use small4::kernels::gemm::DeviceWeights;
/// use small4::quant::{repack::{repack_linear, MatrixRef}, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// // Two heads with W_h [2, 64]: head 0 gives (x0, x1), head 1 gives (2 x0, 3 x1).
/// let head = |a: f32, b: f32| {
///     let mut w = vec![0.0f32; 2 * 64];
///     (w[0], w[64 + 1]) = (a, b);
///     QuantizedMatrix::quantize(WeightFormat::Bf16, &w, 2, 64)
/// };
/// let (h0, h1) = (head(1.0, 1.0)?, head(2.0, 3.0)?);
/// let w = DeviceWeights::upload(&device, &repack_linear(&[MatrixRef::from(&h0), MatrixRef::from(&h1)])?)?;
/// // One row, two heads of 72 values (the GEMM reads the first 64 of each): head h holds x = (h + 1, 1, 0, ..).
/// let x: Vec<bf16> = (0..2 * 72).map(|i| bf16::from_f32(match i % 72 { 0 => (i / 72 + 1) as f32, 1 => 1.0, _ => 0.0 })).collect();
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let y = DeviceBuffer::<bf16>::alloc(&device, 4)?;
/// dense::linear_per_head(&w, x.view([1, 2, 72])?, y.view([1, 2, 2])?, None)?;
/// let got: Vec<f32> = y.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(got, [1.0, 1.0, 4.0, 3.0]);
/// // One matrix for three heads is a typed error:
/// let x3 = DeviceBuffer::<bf16>::alloc(&device, 3 * 72)?;
/// let y3 = DeviceBuffer::<bf16>::alloc(&device, 6)?;
/// assert!(matches!(dense::linear_per_head(&w, x3.view([1, 3, 72])?, y3.view([1, 3, 2])?, None), Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn linear_per_head(w: &DeviceWeights, x: TensorView<bf16, 3>, y: TensorView<bf16, 3>, fp8_act: Option<&Fp8ActScratch>) -> Result<()> {
    linear_per_head_prefetching(w, x, y, fp8_act, &L2Prefetch::NONE)
}

/// [`linear_per_head`] that also pulls `l2_prefetch` (a later kernel's weights, [`super::prefetch`]) into L2 while
/// it runs: the decode step's absorption launches, latency-bound at batch 1, stream wo's weights that way. Only the
/// decode kernel (up to 8 rows) issues it; the same results either way.
pub fn linear_per_head_prefetching(
    w: &DeviceWeights,
    x: TensorView<bf16, 3>,
    y: TensorView<bf16, 3>,
    fp8_act: Option<&Fp8ActScratch>,
    l2_prefetch: &L2Prefetch,
) -> Result<()> {
    let [rows, heads, head_in] = x.dims();
    if heads == 0 || heads > 65535 {
        return Err(Error::InvalidArgument(format!("linear_per_head: {heads} heads (1 to 65535)")));
    }
    if w.k_dim > head_in || head_in % 8 != 0 {
        return Err(Error::InvalidArgument(format!("linear_per_head: heads of {head_in} inputs (a multiple of 8) cannot feed a reduction of {}", w.k_dim)));
    }
    y.expect_dims("linear_per_head y", [rows, heads, w.out_cols])?;
    let dense = Rows::Dense { rows, heads, x_head_stride: head_in, out_head_stride: w.out_cols };
    let x = x.as_matrix().columns(0..w.k_dim)?;
    launch_gemm(w, Input::Bf16(x), rows, false, dense, Output::Bf16(y.as_matrix().columns(0..w.out_cols)?), None, fp8_act, l2_prefetch)
}

/// Dense SwiGLU `act = silu(x W1^T) * (x W3^T)` from gate/up weights packed by `repack_gate_up` (one matrix pair):
/// x `[rows, k_dim]` -> act `[rows, hidden]` bf16, the gate and up values kept in f32 registers (a dense FFN's up
/// half). `fp8_act` as for [`linear_f32`]. Errors as [`linear`], the weights having to be SwiGLU-packed.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::dense;
/// use small4::kernels::gemm::DeviceWeights;
/// use small4::quant::{repack, QuantizedMatrix, WeightFormat};
///
/// let device = simulator();
/// let dim = 64;
/// // w1 = w3 = e_0 e_0^T (hidden 64): act_0 = silu(x_0) * x_0, every other column 0.
/// let mut one_hot = vec![0.0f32; 64 * dim];
/// one_hot[0] = 1.0;
/// let w1 = QuantizedMatrix::quantize(WeightFormat::Bf16, &one_hot, 64, dim)?;
/// let gate_up = DeviceWeights::upload(&device, &repack::repack_gate_up(&[((&w1).into(), (&w1).into())])?)?;
/// let mut x = vec![bf16::ZERO; dim];
/// x[0] = bf16::from_f32(2.0);
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let act = DeviceBuffer::<bf16>::alloc(&device, 64)?;
/// dense::linear_swiglu(&gate_up, x.view([1, dim])?, act.view([1, 64])?, None)?;
/// let act = act.to_vec()?;
/// let silu = |v: f32| v / (1.0 + (-v).exp());
/// assert!((act[0].to_f32() - 2.0 * silu(2.0)).abs() < 2e-2 && act[1..].iter().all(|v| v.to_f32() == 0.0));
///
/// // An output head with f32 logits: head[r, 0] = r + 1, so logits = (r + 1) * x_0.
/// let mut head = vec![0.0f32; 3 * dim];
/// (0..3).for_each(|r| head[r * dim] = (r + 1) as f32);
/// let head = QuantizedMatrix::quantize(WeightFormat::Bf16, &head, 3, dim)?;
/// let head = DeviceWeights::upload(&device, &repack::repack_linear(&[(&head).into()])?)?;
/// let logits = DeviceBuffer::<f32>::alloc(&device, 3)?;
/// dense::linear_f32(&head, x.view([1, dim])?, logits.view([1, 3])?, None)?;
/// assert_eq!(logits.to_vec()?, vec![2.0, 4.0, 6.0]);
/// // Plain weights are not SwiGLU-packed: a typed error.
/// let out = DeviceBuffer::<bf16>::alloc(&device, 3)?;
/// let err = dense::linear_swiglu(&head, x.view([1, dim])?, out.view([1, 3])?, None);
/// assert!(matches!(err, Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn linear_swiglu(w: &DeviceWeights, x: Matrix<bf16>, act: Matrix<bf16>, fp8_act: Option<&Fp8ActScratch>) -> Result<()> {
    let [rows, _] = x.dims();
    launch_gemm(w, Input::Bf16(x), rows, false, Rows::dense(rows), Output::SwiGlu(act), None, fp8_act, &L2Prefetch::NONE)
}

/// Dense `y = x W^T` with an f32 output `[rows, out_cols]` (the logits of the output head). `fp8_act`: where the
/// launch quantises its input rows when it runs on the fp8 tensor cores with activations quantised on the fly
/// ([`super::moe_wgmma_fp8`]: fp8 weights, prefill rows, `PrefillGemm::WgmmaFp8Act` chosen); None: buffers of its
/// own for this launch (the engine passes the scratch it sized for the batch). Errors as [`linear`].
pub fn linear_f32(w: &DeviceWeights, x: Matrix<bf16>, y: Matrix<f32>, fp8_act: Option<&Fp8ActScratch>) -> Result<()> {
    let [rows, _] = x.dims();
    launch_gemm(w, Input::Bf16(x), rows, false, Rows::dense(rows), Output::F32ByPair { out: y, pair_weights: None }, None, fp8_act, &L2Prefetch::NONE)
}
