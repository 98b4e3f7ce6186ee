//! The small kernels of a layer (`cuda/ops.cu`): YaRN interleaved RoPE fused with the llama-4 query scale, embedding
//! gather, SiLU-and-multiply, greedy argmax and seeded temperature + top-p sampling.

use half::bf16;

use super::modules::OPS;
use super::params::{ArgmaxParams, DecodeAdvanceParams, EmbeddingParams, RopeParams, SampleParams, SiluMulParams};
use super::{Matrix, TensorView, Vector};
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};

const ROPE_Q_K: Kernel = Kernel { module: OPS, entry: "rope_q_k" };
const EMBEDDING_GATHER: Kernel = Kernel { module: OPS, entry: "embedding_gather" };
const SILU_MUL: Kernel = Kernel { module: OPS, entry: "silu_mul" };
const ARGMAX_ROWS: Kernel = Kernel { module: OPS, entry: "argmax_rows" };
const SAMPLE_ROWS: Kernel = Kernel { module: OPS, entry: "sample_rows" };
const DECODE_ADVANCE: Kernel = Kernel { module: OPS, entry: "decode_advance" };

/// Largest rope_dim the kernel's shared cos/sin table holds.
pub const MAX_ROPE_DIM: usize = 256;

fn check_i32(what: &str, value: usize) -> Result<()> {
    if value > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("{what} = {value} exceeds i32")));
    }
    Ok(())
}

/// The llama-4 query scaling `1 + beta * ln(1 + floor(pos / original_max))`.
#[derive(Clone, Copy, Debug)]
pub struct QueryScale {
    /// `beta` of the formula (the model config's `llama4_beta`); 0 leaves q unscaled. Must be finite.
    pub beta: f32,
    /// The divisor of the position (the config's `llama4_original_max_position`); must be in `1..=i32::MAX`.
    pub original_max_position: usize,
}

/// Rotates, in place, the last `rope_dim` dims of each head of `q [tokens, heads, head_dim]` and the `rope_dim` values
/// of each row of `k [tokens, rope_dim]` (interleaved pairs, angle `positions[t] * inv_freq[i]`), and multiplies all of
/// q by the query scale. `inv_freq [rope_dim / 2]` comes from `reference::rope::yarn_inv_freq`; `positions [tokens]`
/// must be >= 0.
///
/// `k` is usually the rope columns of a wider row, e.g. the last 64 of the 320 outputs of `wkv_a_with_mqa`:
/// `kv.columns(256..320)?`. The rows of `q` and `k` may be strided (a multiple of 8 elements apart).
///
/// `Error::Shape` when `positions` is not `[tokens]` or `k` not `[tokens, rope_dim]`. `Error::InvalidArgument` when
/// `head_dim` or `rope_dim = 2 * inv_freq.len()` is not a multiple of 8, `rope_dim` is 0 or above `head_dim` or
/// [`MAX_ROPE_DIM`], the query scale is invalid, `q` or `k` does not start on 16 bytes or has a row stride that is not
/// a multiple of 8, `positions` or `inv_freq` is strided, or an element count exceeds `i32`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::ops::{rope_q_k, QueryScale};
///
/// let device = simulator();
/// // One token at position 1, one head of 8 dims, all of them rope (4 pairs); k: the last 8 values of a 16-wide row.
/// let q = DeviceBuffer::from_slice(&device, &[bf16::ONE; 8])?;
/// let kv = DeviceBuffer::from_slice(&device, &[bf16::ONE; 16])?;
/// let positions = DeviceBuffer::from_slice(&device, &[1i32])?;
/// let inv_freq = DeviceBuffer::from_slice(&device, &[1.0f32, 0.0, 0.0, 0.0])?; // pair 0 turns by 1 rad, the rest not
/// let unscaled = QueryScale { beta: 0.0, original_max_position: 8192 };
/// let k = kv.view([1, 16])?.columns(8..16)?;
/// rope_q_k(q.view([1, 1, 8])?, Some(k), positions.as_vector(), inv_freq.as_vector(), unscaled)?;
/// let (cos, sin) = (1.0f32.cos(), 1.0f32.sin());
/// let got_q: Vec<f32> = q.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert!((got_q[0] - (cos - sin)).abs() < 1e-2 && (got_q[1] - (sin + cos)).abs() < 1e-2 && got_q[2] == 1.0);
/// let got_kv: Vec<f32> = kv.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert!(got_kv[..8].iter().all(|&v| v == 1.0) && (got_kv[8] - (cos - sin)).abs() < 1e-2); // only the rope columns turn
/// // Positions for two tokens with a q of one token: a typed error.
/// let two = DeviceBuffer::from_slice(&device, &[1i32, 2])?;
/// let err = rope_q_k(q.view([1, 1, 8])?, None, two.as_vector(), inv_freq.as_vector(), unscaled);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// // A rope part wider than the kernel's cos/sin table (MAX_ROPE_DIM) is refused, even in a head wide enough:
/// let wide = small4::kernels::ops::MAX_ROPE_DIM + 8;
/// let (q_wide, freq_wide) = (DeviceBuffer::from_slice(&device, &vec![bf16::ONE; wide])?, DeviceBuffer::from_slice(&device, &vec![1.0f32; wide / 2])?);
/// let err = rope_q_k(q_wide.view([1, 1, wide])?, None, positions.as_vector(), freq_wide.as_vector(), unscaled);
/// assert!(matches!(err, Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn rope_q_k(q: TensorView<bf16, 3>, k: Option<Matrix<bf16>>, positions: Vector<i32>, inv_freq: Vector<f32>, scale: QueryScale) -> Result<()> {
    let params = rope_params(q, k, positions, inv_freq, scale)?;
    if params.tokens == 0 {
        return Ok(());
    }
    let config = LaunchConfig { grid: Dim3::x(params.tokens as u32), block: Dim3::x(256), shared_bytes: 0 };
    launch_with(q.device(), &ROPE_Q_K, &config, &params)
}

/// [`rope_q_k`]'s kernel parameters, checked as it checks them: for its launch, or for the query projection's GEMM
/// epilogue (`dense::linear_rope_q`).
pub(crate) fn rope_params(
    q: TensorView<bf16, 3>,
    k: Option<Matrix<bf16>>,
    positions: Vector<i32>,
    inv_freq: Vector<f32>,
    scale: QueryScale,
) -> Result<RopeParams> {
    let [tokens, heads, head_dim] = q.dims();
    let rope_dim = 2 * inv_freq.len();
    if head_dim % 8 != 0 || rope_dim % 8 != 0 || rope_dim == 0 || rope_dim > head_dim || rope_dim > MAX_ROPE_DIM {
        return Err(Error::InvalidArgument(format!(
            "rope: head_dim {head_dim} and rope_dim {rope_dim} must be multiples of 8 with 0 < rope_dim <= min(head_dim, {MAX_ROPE_DIM})"
        )));
    }
    if scale.original_max_position == 0 || !scale.beta.is_finite() {
        return Err(Error::InvalidArgument(format!("rope: query scale {scale:?}")));
    }
    positions.expect_dims("rope positions", [tokens])?;
    positions.expect_packed("rope positions")?;
    inv_freq.expect_packed("rope inv_freq")?;
    // The kernel moves 8 bf16 (16 bytes) at a time: every row must start on 16 bytes.
    q.expect_rows_aligned("rope q", 16)?;
    check_i32("rope q elements", q.len())?;
    check_i32("rope q row stride", q.row_stride())?;
    check_i32("rope original_max_position", scale.original_max_position)?;
    if let Some(k) = &k {
        k.expect_dims("rope k", [tokens, rope_dim])?;
        k.expect_rows_aligned("rope k", 16)?;
        check_i32("rope k row stride", k.row_stride())?;
    }
    Ok(RopeParams {
        q: q.mut_ptr(),
        k_rope: k.map_or(std::ptr::null_mut(), |k| k.mut_ptr()),
        positions: positions.ptr(),
        inv_freq: inv_freq.ptr(),
        tokens: tokens as i32,
        heads: heads as i32,
        head_dim: head_dim as i32,
        rope_dim: rope_dim as i32,
        q_row_stride: q.row_stride() as i32,
        k_row_stride: k.map_or(0, |k| k.row_stride() as i32),
        scale_beta: scale.beta,
        scale_original_max: scale.original_max_position as i32,
    })
}

/// `Error::InvalidArgument` unless rows `row_stride` elements apart all keep the 16-byte alignment of the first.
/// Where `embedding_gather` reports ids outside the vocabulary without a host synchronisation: a count and the first
/// offending token. [`GatherStatus::check`] reads it back (after the caller's own synchronisation point).
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::ops::{embedding_gather, GatherStatus};
///
/// let device = simulator();
/// // A vocabulary of 2 rows of dim 8: row v is all v + 1.
/// let table: Vec<bf16> = (0..2 * 8).map(|i| bf16::from_f32((i / 8 + 1) as f32)).collect();
/// let table = DeviceBuffer::from_slice(&device, &table)?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 2 * 8)?;
/// let status = GatherStatus::new(&device)?; // made once, reused every step
/// let bad = DeviceBuffer::from_slice(&device, &[1i32, 5])?; // 5 is outside the vocabulary
/// embedding_gather(bad.as_vector(), table.view([2, 8])?, out.view([2, 8])?, &status)?; // no error yet: no sync
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!((got[0], got[8]), (2.0, 0.0)); // the bad id's row is zeros
/// let err = status.check(bad.as_vector(), 2).unwrap_err();
/// assert!(matches!(err, small4::Error::OutOfRange { index: 5, limit: 2, .. }), "{err}");
/// // The record stays set until reset; a good gather then checks clean.
/// status.reset()?;
/// let good = DeviceBuffer::from_slice(&device, &[0i32, 1])?;
/// embedding_gather(good.as_vector(), table.view([2, 8])?, out.view([2, 8])?, &status)?;
/// status.check(good.as_vector(), 2)?;
/// assert_eq!(out.to_vec()?[8].to_f32(), 2.0);
/// # Ok::<(), small4::Error>(())
/// ```
pub struct GatherStatus {
    buffer: DeviceBuffer<i32>,
}

impl GatherStatus {
    /// A cleared record (no out-of-range id seen) on `device`: two `i32` (count, first offending position).
    pub fn new(device: &Device) -> Result<Self> {
        Ok(GatherStatus { buffer: DeviceBuffer::from_slice(device, &[0, i32::MAX])? })
    }

    /// Clears the record (before the next gather, e.g. once per graph replay).
    pub fn reset(&self) -> Result<()> {
        self.buffer.copy_from(&[0, i32::MAX])
    }

    /// `Error::OutOfRange` naming the first out-of-range id when any gather since the last reset met one; `ids` are
    /// the ids of that gather, `vocab` its table's rows.
    pub fn check(&self, ids: Vector<i32>, vocab: usize) -> Result<()> {
        let status = self.buffer.to_vec()?;
        if status[0] == 0 {
            return Ok(());
        }
        let token = status[1] as usize;
        // The view may start inside its buffer: element `token` is at offset + token * stride.
        let id = if token < ids.len() { ids.buffer().to_vec()?.get(ids.offset() + token * ids.row_stride()).copied() } else { None };
        let id = id.unwrap_or(-1);
        Err(Error::OutOfRange { what: format!("token id at position {token} ({} out of range)", status[0]), index: id as i64, limit: vocab as i64 })
    }
}

/// `out[t] = table[ids[t]]` for `table [vocab, dim]`; ids outside `0..vocab` produce zero rows and are recorded in
/// `status` (the table is never read out of bounds).
///
/// `ids [tokens]`, `table [vocab, dim]` and `out [tokens, dim]` bf16, all packed (the kernel takes no strides).
/// `Error::Shape` when `dim` is 0 or `out` is not `[tokens, dim]`; `Error::InvalidArgument` when `vocab`, `dim` or
/// `tokens` exceeds `i32` or a view is strided. Bad ids are no error here: [`GatherStatus::check`] reports them.
pub fn embedding_gather(ids: Vector<i32>, table: Matrix<bf16>, out: Matrix<bf16>, status: &GatherStatus) -> Result<()> {
    let [tokens] = ids.dims();
    let [vocab, dim] = table.dims();
    if dim == 0 {
        return Err(Error::shape("embedding table dim", "at least 1", dim));
    }
    out.expect_dims("embedding out", [tokens, dim])?;
    ids.expect_packed("embedding ids")?;
    table.expect_packed("embedding table")?;
    out.expect_packed("embedding out")?;
    check_i32("embedding vocab", vocab)?;
    check_i32("embedding dim", dim)?;
    check_i32("embedding tokens", tokens)?;
    if tokens == 0 {
        return Ok(());
    }
    let params = EmbeddingParams {
        ids: ids.ptr(),
        table: table.ptr(),
        out: out.mut_ptr(),
        status: status.buffer.mut_ptr(),
        tokens: tokens as i32,
        vocab: vocab as i32,
        dim: dim as i32,
    };
    let config = LaunchConfig { grid: Dim3::x(tokens as u32), block: Dim3::x(threads_for_row(dim / 8, 256)), shared_bytes: 0 };
    launch_with(ids.device(), &EMBEDDING_GATHER, &config, &params)
}

/// [`embedding_gather`] followed by a synchronisation and the status check (for callers outside a CUDA graph).
///
/// Returns the errors of [`embedding_gather`], and `Error::OutOfRange` naming the first id outside `0..vocab` (its
/// row of `out` is then zero).
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator();
/// // A vocabulary of 3 rows of dim 8: row v holds the value v + 1 in every column.
/// let table: Vec<bf16> = (0..3 * 8).map(|i| bf16::from_f32((i / 8 + 1) as f32)).collect();
/// let table = DeviceBuffer::from_slice(&device, &table)?;
/// let ids = DeviceBuffer::from_slice(&device, &[2i32, 0])?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 2 * 8)?;
/// small4::kernels::ops::embedding_gather_checked(ids.as_vector(), table.view([3, 8])?, out.view([2, 8])?)?;
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!((got[0], got[7], got[8], got[15]), (3.0, 3.0, 1.0, 1.0));
///
/// let bad = DeviceBuffer::from_slice(&device, &[1i32, 3])?; // 3 is outside the vocabulary
/// let err = small4::kernels::ops::embedding_gather_checked(bad.as_vector(), table.view([3, 8])?, out.view([2, 8])?).unwrap_err();
/// assert!(matches!(err, small4::Error::OutOfRange { index: 3, limit: 3, .. }), "{err}");
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!((got[0], got[8], got[15]), (2.0, 0.0, 0.0)); // the bad id's row is zeros
///
/// // An output of one row for two ids: a typed error before any launch.
/// let err = small4::kernels::ops::embedding_gather_checked(ids.as_vector(), table.view([3, 8])?, out.view([1, 8])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn embedding_gather_checked(ids: Vector<i32>, table: Matrix<bf16>, out: Matrix<bf16>) -> Result<()> {
    let status = GatherStatus::new(ids.device())?;
    embedding_gather(ids, table, out, &status)?;
    let [vocab, _] = table.dims();
    status.check(ids, vocab)
}

/// `out [tokens, hidden] = silu(gate) * up` from one `gate_up [tokens, 2 * hidden]` tensor holding gate then up in
/// each row.
///
/// bf16 in and out, f32 arithmetic; the rows of `gate_up` and `out` may be strided. `Error::Shape` when `gate_up` has
/// an odd column count or `out` is not `[tokens, hidden]`; `Error::InvalidArgument` above 65535 tokens or `i32`
/// elements.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator();
/// // One token, hidden 2: gate = [0, 2], up = [5, 3].
/// let gate_up: Vec<bf16> = [0.0f32, 2.0, 5.0, 3.0].iter().map(|&v| bf16::from_f32(v)).collect();
/// let gate_up = DeviceBuffer::from_slice(&device, &gate_up)?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 2)?;
/// small4::kernels::ops::silu_mul(gate_up.view([1, 4])?, out.view([1, 2])?)?;
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// let silu2 = 2.0 / (1.0 + (-2.0f32).exp()); // silu(x) = x * sigmoid(x) = 1.7616
/// assert_eq!(got[0], 0.0); // silu(0) * 5
/// assert!((got[1] - silu2 * 3.0).abs() < 0.03, "{}", got[1]); // 5.285, within bf16 rounding
/// // An output as wide as gate_up: a typed error.
/// let err = small4::kernels::ops::silu_mul(gate_up.view([1, 2])?, out.view([1, 2])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn silu_mul(gate_up: Matrix<bf16>, out: Matrix<bf16>) -> Result<()> {
    let [_, width] = gate_up.dims();
    if width % 2 != 0 {
        return Err(Error::shape("silu_mul gate|up columns", "an even count (gate then up)", width));
    }
    let hidden = width / 2;
    launch_silu_mul(gate_up.columns(0..hidden)?, gate_up.columns(hidden..width)?, out)
}

/// `out [tokens, hidden] = silu(gate) * up` from two `[tokens, hidden]` tensors.
///
/// The same computation and errors as [`silu_mul`], the gate and up halves in separate views (`Error::Shape` when
/// `up` is not of `gate`'s dims); the kernel takes one input stride, so `Error::InvalidArgument` when their row
/// strides differ.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::ops::silu_mul_pair;
///
/// let device = simulator();
/// // Two tokens, hidden 2, gate and up in separate tensors.
/// let to_bf16 = |v: &[f32]| v.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>();
/// let gate = DeviceBuffer::from_slice(&device, &to_bf16(&[0.0, 1.0, -1.0, 2.0]))?;
/// let up = DeviceBuffer::from_slice(&device, &to_bf16(&[4.0, 2.0, 1.0, 0.5]))?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 4)?;
/// silu_mul_pair(gate.view([2, 2])?, up.view([2, 2])?, out.view([2, 2])?)?;
/// let silu = |x: f32| x / (1.0 + (-x).exp());
/// let want = [silu(0.0) * 4.0, silu(1.0) * 2.0, silu(-1.0) * 1.0, silu(2.0) * 0.5];
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert!(got.iter().zip(want).all(|(g, w)| (g - w).abs() < 1e-2), "{got:?}");
/// // An up tensor of another shape is a typed error:
/// let err = silu_mul_pair(gate.view([2, 2])?, up.view([1, 4])?, out.view([2, 2])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn silu_mul_pair(gate: Matrix<bf16>, up: Matrix<bf16>, out: Matrix<bf16>) -> Result<()> {
    up.expect_dims("silu_mul up", gate.dims())?;
    launch_silu_mul(gate, up, out)
}

fn launch_silu_mul(gate: Matrix<bf16>, up: Matrix<bf16>, out: Matrix<bf16>) -> Result<()> {
    let [tokens, hidden] = gate.dims();
    out.expect_dims("silu_mul out", [tokens, hidden])?;
    if gate.row_stride() != up.row_stride() {
        return Err(Error::InvalidArgument(format!("silu_mul: gate {gate:?} and up {up:?} must have the same row stride")));
    }
    check_i32("silu_mul elements", tokens * 2 * hidden)?;
    check_i32("silu_mul input row stride", gate.row_stride())?;
    check_i32("silu_mul output row stride", out.row_stride())?;
    if tokens > 65535 {
        return Err(Error::InvalidArgument(format!("silu_mul: {tokens} tokens (grid rows <= 65535)")));
    }
    if tokens == 0 || hidden == 0 {
        return Ok(());
    }
    // The kernel checks the 16-byte alignment of the rows itself and falls back to single elements.
    let params = SiluMulParams {
        gate: gate.ptr(),
        up: up.ptr(),
        out: out.mut_ptr(),
        tokens: tokens as i32,
        hidden: hidden as i32,
        in_row_stride: gate.row_stride() as i32,
        out_row_stride: out.row_stride() as i32,
    };
    let threads = 256;
    let grid = Dim3::xy(super::blocks_for(hidden, 8 * threads), tokens as u32);
    launch_with(gate.device(), &SILU_MUL, &LaunchConfig { grid, block: Dim3::x(threads as u32), shared_bytes: 0 }, &params)
}

/// A multiple of 32 threads, enough for `items` strided items, at most `max`.
fn threads_for_row(items: usize, max: usize) -> u32 {
    items.next_power_of_two().clamp(32, max) as u32
}

/// Checks `logits [rows, vocab]` (rows may be strided) against `ids [rows]`; returns `[rows, vocab]`.
fn check_logits(logits: Matrix<f32>, ids: Vector<i32>) -> Result<[usize; 2]> {
    let [rows, vocab] = logits.dims();
    if vocab == 0 {
        return Err(Error::InvalidArgument("sampling over an empty vocabulary".into()));
    }
    ids.expect_dims("sampled ids", [rows])?;
    ids.expect_packed("sampled ids")?;
    check_i32("logits elements", logits.len())?;
    check_i32("logits row stride", logits.row_stride())?;
    if rows > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("{rows} rows")));
    }
    Ok([rows, vocab])
}

/// `ids[r] = argmax(logits[r, :])` for `logits [rows, vocab]` (rows may be strided), `ids [rows]`: ties to the lower
/// id, NaN ignored, -1 for a row with no number.
///
/// `Error::InvalidArgument` when `vocab` is 0, the sizes exceed `i32` or `ids` is strided; `Error::Shape` when `ids`
/// is not `[rows]`.
///
/// ```
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator();
/// let logits = [0.5f32, 2.0, -1.0, 2.0, /* row 1: */ f32::NAN, -3.0, -2.5, -7.0];
/// let logits = DeviceBuffer::from_slice(&device, &logits)?;
/// let ids = DeviceBuffer::<i32>::alloc(&device, 2)?;
/// small4::kernels::ops::argmax(logits.view([2, 4])?, ids.as_vector())?;
/// // Row 0: the tie between ids 1 and 3 goes to 1. Row 1: the NaN is skipped.
/// assert_eq!(ids.to_vec()?, vec![1, 2]);
/// // One id for each of 4 rows of 2 does not fit in 2 ids: a typed error.
/// let err = small4::kernels::ops::argmax(logits.view([4, 2])?, ids.as_vector());
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn argmax(logits: Matrix<f32>, ids: Vector<i32>) -> Result<()> {
    let [rows, vocab] = check_logits(logits, ids)?;
    if rows == 0 {
        return Ok(());
    }
    let params = ArgmaxParams { logits: logits.ptr(), ids: ids.mut_ptr(), rows: rows as i32, vocab: vocab as i32, row_stride: logits.row_stride() as i32 };
    let config = LaunchConfig { grid: Dim3::x(rows as u32), block: Dim3::x(threads_for_row(vocab.div_ceil(4), 1024)), shared_bytes: 0 };
    launch_with(logits.device(), &ARGMAX_ROWS, &config, &params)
}

/// The next decode step's inputs, advanced on the device from this step's sampled tokens (`next [rows]`, one
/// sequence per row): `ids = next`, and `positions`, `cache_positions` and `seq_lens` each + 1. A graph replaying
/// decode steps then needs no upload between steps: the host only reads the sampled tokens. All views packed
/// `[rows]`; `cache_positions` (a `TokenSlots`' copy) and `seq_lens` (a `BlockTables`' lengths) may be absent.
///
/// `Error::Shape` when a view is not `[rows]`; `Error::InvalidArgument` when one is strided or `rows` exceeds `i32`.
///
/// ```
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator();
/// let next = DeviceBuffer::from_slice(&device, &[7i32, 9])?;
/// let (ids, positions, lens) = (DeviceBuffer::from_slice(&device, &[1i32, 2])?, DeviceBuffer::from_slice(&device, &[10i32, 3])?, DeviceBuffer::from_slice(&device, &[11i32, 4])?);
/// small4::kernels::ops::decode_advance(next.as_vector(), ids.as_vector(), positions.as_vector(), None, Some(lens.as_vector()))?;
/// assert_eq!((ids.to_vec()?, positions.to_vec()?, lens.to_vec()?), (vec![7, 9], vec![11, 4], vec![12, 5]));
/// // Three positions for two tokens: a typed error, nothing written.
/// let three = DeviceBuffer::from_slice(&device, &[0i32; 3])?;
/// assert!(matches!(small4::kernels::ops::decode_advance(next.as_vector(), ids.as_vector(), three.as_vector(), None, None), Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn decode_advance(
    next: Vector<i32>,
    ids: Vector<i32>,
    positions: Vector<i32>,
    cache_positions: Option<Vector<i32>>,
    seq_lens: Option<Vector<i32>>,
) -> Result<()> {
    let [rows] = next.dims();
    check_i32("decode rows", rows)?;
    for (what, view) in [
        ("decode next", Some(next)),
        ("decode ids", Some(ids)),
        ("decode positions", Some(positions)),
        ("decode cache positions", cache_positions),
        ("decode seq lens", seq_lens),
    ] {
        if let Some(v) = view {
            v.expect_dims(what, [rows])?;
            v.expect_packed(what)?;
        }
    }
    if rows == 0 {
        return Ok(());
    }
    let params = DecodeAdvanceParams {
        next: next.ptr(),
        ids: ids.mut_ptr(),
        positions: positions.mut_ptr(),
        cache_positions: cache_positions.map_or(std::ptr::null_mut(), |v| v.mut_ptr()),
        seq_lens: seq_lens.map_or(std::ptr::null_mut(), |v| v.mut_ptr()),
        rows: rows as i32,
    };
    let config = LaunchConfig { grid: Dim3::x(super::blocks_for(rows, 128)), block: Dim3::x(128), shared_bytes: 0 };
    launch_with(next.device(), &DECODE_ADVANCE, &config, &params)
}

/// Per-row sampling settings, on the device so that a CUDA graph replays with new values: each a packed `[rows]`.
#[derive(Clone, Copy)]
pub struct SamplingInputs<'a> {
    /// <= 0: greedy.
    pub temperature: Vector<'a, f32>,
    /// In (0, 1], used as floor(top_p * 2^24) / 2^24; values >= 1 (or NaN) keep every token.
    pub top_p: Vector<'a, f32>,
    /// The request's seed: its samples depend on (seed, step) only, not on its row in the batch.
    pub seeds: Vector<'a, u64>,
    /// The request's step (its count of tokens generated so far): with the seed, what keys the random draw.
    pub steps: Vector<'a, i32>,
}

/// Seeded temperature + top-p sampling of `logits [rows, vocab]` into `ids [rows]`; the algorithm is documented on
/// `sample_rows` in cuda/ops.cu and reproduced exactly by `reference::sampling::sample`.
///
/// Every view of `inputs` is `[rows]`. Errors as [`argmax`], plus `Error::Shape` for an input of other dims and
/// `Error::InvalidArgument` for a strided one.
///
/// ```
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::ops::{sample, SamplingInputs};
///
/// let device = simulator();
/// let logits = DeviceBuffer::from_slice(&device, &[0.0f32, 9.0, 1.0, /* row 1: */ 2.0, 0.0, 1.0])?;
/// // Row 0 greedy (temperature 0), row 1 with top_p so small that only its most likely id stays.
/// let temperature = DeviceBuffer::from_slice(&device, &[0.0f32, 1.0])?;
/// let top_p = DeviceBuffer::from_slice(&device, &[1.0f32, 1e-6])?;
/// let (seeds, steps) = (DeviceBuffer::from_slice(&device, &[7u64, 8])?, DeviceBuffer::from_slice(&device, &[0i32, 3])?);
/// let inputs = SamplingInputs { temperature: temperature.as_vector(), top_p: top_p.as_vector(), seeds: seeds.as_vector(), steps: steps.as_vector() };
/// let ids = DeviceBuffer::<i32>::alloc(&device, 2)?;
/// sample(logits.view([2, 3])?, &inputs, ids.as_vector())?;
/// assert_eq!(ids.to_vec()?, vec![1, 0]);
/// // Settings for 2 rows with logits of 1 row: a typed error.
/// let err = sample(logits.view([1, 3])?, &inputs, ids.view([1])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn sample(logits: Matrix<f32>, inputs: &SamplingInputs, ids: Vector<i32>) -> Result<()> {
    let [rows, vocab] = check_logits(logits, ids)?;
    inputs.temperature.expect_dims("temperature", [rows])?;
    inputs.top_p.expect_dims("top_p", [rows])?;
    inputs.seeds.expect_dims("seeds", [rows])?;
    inputs.steps.expect_dims("steps", [rows])?;
    inputs.temperature.expect_packed("temperature")?;
    inputs.top_p.expect_packed("top_p")?;
    inputs.seeds.expect_packed("seeds")?;
    inputs.steps.expect_packed("steps")?;
    if rows == 0 {
        return Ok(());
    }
    let params = SampleParams {
        logits: logits.ptr(),
        ids: ids.mut_ptr(),
        temperature: inputs.temperature.ptr(),
        top_p: inputs.top_p.ptr(),
        seeds: inputs.seeds.ptr(),
        steps: inputs.steps.ptr(),
        rows: rows as i32,
        vocab: vocab as i32,
        row_stride: logits.row_stride() as i32,
    };
    let config = LaunchConfig { grid: Dim3::x(rows as u32), block: Dim3::x(threads_for_row(vocab.div_ceil(4), 512)), shared_bytes: 0 };
    launch_with(logits.device(), &SAMPLE_ROWS, &config, &params)
}
