//! The small kernels of a layer (`cuda/ops.cu`): YaRN interleaved RoPE fused with the llama-4 query scale, embedding
//! gather, SiLU-and-multiply, greedy argmax and seeded temperature + top-p sampling.

use half::bf16;

use super::modules::OPS;
use super::params::{ArgmaxParams, EmbeddingParams, RopeParams, SampleParams, SiluMulParams};
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};

const ROPE_Q_K: Kernel = Kernel { module: OPS, entry: "rope_q_k" };
const EMBEDDING_GATHER: Kernel = Kernel { module: OPS, entry: "embedding_gather" };
const SILU_MUL: Kernel = Kernel { module: OPS, entry: "silu_mul" };
const ARGMAX_ROWS: Kernel = Kernel { module: OPS, entry: "argmax_rows" };
const SAMPLE_ROWS: Kernel = Kernel { module: OPS, entry: "sample_rows" };

/// Largest rope_dim the kernel's shared cos/sin table holds.
pub const MAX_ROPE_DIM: usize = 256;

fn check_len(what: &str, len: usize, expected: usize) -> Result<()> {
    if len != expected {
        return Err(Error::shape(what, expected, len));
    }
    Ok(())
}

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

/// k_rope inside a wider row: `row_stride` elements per token, the rope values at `offset` (e.g. the last 64 of the
/// 320 outputs of `wkv_a_with_mqa`: offset 256, stride 320).
#[derive(Clone, Copy)]
pub struct KRope<'a> {
    /// `[tokens, row_stride]` bf16, rotated in place.
    pub buffer: &'a DeviceBuffer<bf16>,
    /// Element offset of the rope values inside a row (a multiple of 8).
    pub offset: usize,
    /// Elements per token row (a multiple of 8, at least `offset + rope_dim`).
    pub row_stride: usize,
}

/// Rotates, in place, the last `rope_dim` dims of each head of `q [tokens, heads, head_dim]` and the `rope_dim` values
/// of `k` (interleaved pairs, angle `positions[t] * inv_freq[i]`), and multiplies all of q by the query scale.
/// `inv_freq` comes from `reference::rope::yarn_inv_freq`. Positions must be >= 0.
///
/// `q` must hold `positions.len() * heads * head_dim` elements and `k.buffer` `positions.len() * k.row_stride`
/// (`Error::Shape`). `Error::InvalidArgument` when `head_dim` or `rope_dim = 2 * inv_freq.len()` is not a multiple of
/// 8, `rope_dim` is 0 or above `head_dim` or [`MAX_ROPE_DIM`], the query scale is invalid, `k`'s offset or stride is
/// misaligned or too short, or an element count exceeds `i32`.
#[allow(clippy::too_many_arguments)]
pub fn rope_q_k(
    q: &DeviceBuffer<bf16>,
    heads: usize,
    head_dim: usize,
    k: Option<KRope>,
    positions: &DeviceBuffer<i32>,
    inv_freq: &DeviceBuffer<f32>,
    scale: QueryScale,
) -> Result<()> {
    let rope_dim = 2 * inv_freq.len();
    let tokens = positions.len();
    if head_dim % 8 != 0 || rope_dim % 8 != 0 || rope_dim == 0 || rope_dim > head_dim || rope_dim > MAX_ROPE_DIM {
        return Err(Error::InvalidArgument(format!(
            "rope: head_dim {head_dim} and rope_dim {rope_dim} must be multiples of 8 with 0 < rope_dim <= min(head_dim, {MAX_ROPE_DIM})"
        )));
    }
    if scale.original_max_position == 0 || !scale.beta.is_finite() {
        return Err(Error::InvalidArgument(format!("rope: query scale {scale:?}")));
    }
    check_len("rope q", q.len(), tokens * heads * head_dim)?;
    check_i32("rope q elements", q.len())?;
    check_i32("rope original_max_position", scale.original_max_position)?;
    if let Some(k) = &k {
        if k.offset % 8 != 0 || k.row_stride % 8 != 0 || k.row_stride < k.offset + rope_dim {
            return Err(Error::InvalidArgument(format!(
                "rope k: offset {} and row stride {} must be multiples of 8 holding {rope_dim} values",
                k.offset, k.row_stride
            )));
        }
        check_len("rope k rows * row_stride", k.buffer.len(), tokens * k.row_stride)?;
        check_i32("rope k elements", k.buffer.len())?;
    }
    if tokens == 0 {
        return Ok(());
    }
    let params = RopeParams {
        q: q.mut_ptr(),
        k_rope: k.map_or(std::ptr::null_mut(), |k| (k.buffer.addr() + 2 * k.offset as u64) as *mut _),
        positions: positions.ptr(),
        inv_freq: inv_freq.ptr(),
        tokens: tokens as i32,
        heads: heads as i32,
        head_dim: head_dim as i32,
        rope_dim: rope_dim as i32,
        q_row_stride: (heads * head_dim) as i32,
        k_row_stride: k.map_or(0, |k| k.row_stride as i32),
        scale_beta: scale.beta,
        scale_original_max: scale.original_max_position as i32,
    };
    let config = LaunchConfig { grid: Dim3::x(tokens as u32), block: Dim3::x(256), shared_bytes: 0 };
    launch_with(q.device(), &ROPE_Q_K, &config, &params)
}

/// Where `embedding_gather` reports ids outside the vocabulary without a host synchronisation: a count and the first
/// offending token. [`GatherStatus::check`] reads it back (after the caller's own synchronisation point).
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

    /// `Error::OutOfRange` naming the first out-of-range id when any gather since the last reset met one.
    pub fn check(&self, ids: &DeviceBuffer<i32>, vocab: usize) -> Result<()> {
        let status = self.buffer.to_vec()?;
        if status[0] == 0 {
            return Ok(());
        }
        let token = status[1] as usize;
        let id = ids.to_vec()?.get(token).copied().unwrap_or(-1);
        Err(Error::OutOfRange { what: format!("token id at position {token} ({} out of range)", status[0]), index: id as i64, limit: vocab as i64 })
    }
}

/// `out[t] = table[ids[t]]` for `table [vocab, dim]`; ids outside `0..vocab` produce zero rows and are recorded in
/// `status` (the table is never read out of bounds).
///
/// `ids [tokens]`, `table [vocab, dim]` and `out [tokens, dim]` bf16. `Error::Shape` when `dim` is 0 or does not
/// divide `table.len()`, or `out` does not hold `tokens * dim` elements; `Error::InvalidArgument` when `vocab` or
/// `dim` exceeds `i32`. Bad ids are no error here: [`GatherStatus::check`] reports them.
pub fn embedding_gather(ids: &DeviceBuffer<i32>, table: &DeviceBuffer<bf16>, dim: usize, out: &DeviceBuffer<bf16>, status: &GatherStatus) -> Result<()> {
    if dim == 0 || table.len() % dim != 0 {
        return Err(Error::shape("embedding table elements (vocab * dim)", format!("a multiple of {dim}"), table.len()));
    }
    let tokens = ids.len();
    check_len("embedding out", out.len(), tokens * dim)?;
    check_i32("embedding vocab", table.len() / dim)?;
    check_i32("embedding dim", dim)?;
    if tokens == 0 {
        return Ok(());
    }
    let params = EmbeddingParams {
        ids: ids.ptr(),
        table: table.ptr(),
        out: out.mut_ptr(),
        status: status.buffer.mut_ptr(),
        tokens: tokens as i32,
        vocab: (table.len() / dim) as i32,
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
/// small4::kernels::ops::embedding_gather_checked(&ids, &table, 8, &out)?;
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!((got[0], got[7], got[8], got[15]), (3.0, 3.0, 1.0, 1.0));
///
/// let bad = DeviceBuffer::from_slice(&device, &[1i32, 3])?; // 3 is outside the vocabulary
/// let err = small4::kernels::ops::embedding_gather_checked(&bad, &table, 8, &out).unwrap_err();
/// assert!(matches!(err, small4::Error::OutOfRange { index: 3, limit: 3, .. }), "{err}");
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!((got[0], got[8], got[15]), (2.0, 0.0, 0.0)); // the bad id's row is zeros
/// # Ok::<(), small4::Error>(())
/// ```
pub fn embedding_gather_checked(ids: &DeviceBuffer<i32>, table: &DeviceBuffer<bf16>, dim: usize, out: &DeviceBuffer<bf16>) -> Result<()> {
    let status = GatherStatus::new(ids.device())?;
    embedding_gather(ids, table, dim, out, &status)?;
    status.check(ids, table.len() / dim.max(1))
}

/// `out [tokens, hidden] = silu(gate) * up` from one `[tokens, 2 * hidden]` tensor holding gate then up in each row.
///
/// bf16 in and out, f32 arithmetic. `Error::Shape` when `gate_up` or `out` has the wrong length;
/// `Error::InvalidArgument` above 65535 tokens or `i32` elements.
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
/// small4::kernels::ops::silu_mul(&gate_up, &out, 1, 2)?;
/// let out: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// let silu2 = 2.0 / (1.0 + (-2.0f32).exp()); // silu(x) = x * sigmoid(x) = 1.7616
/// assert_eq!(out[0], 0.0); // silu(0) * 5
/// assert!((out[1] - silu2 * 3.0).abs() < 0.03, "{}", out[1]); // 5.285, within bf16 rounding
/// # Ok::<(), small4::Error>(())
/// ```
pub fn silu_mul(gate_up: &DeviceBuffer<bf16>, out: &DeviceBuffer<bf16>, tokens: usize, hidden: usize) -> Result<()> {
    check_len("silu_mul gate|up", gate_up.len(), tokens * 2 * hidden)?;
    let up = (gate_up.addr() + 2 * hidden as u64) as *const _;
    launch_silu_mul(gate_up, gate_up.ptr(), up, 2 * hidden, out, tokens, hidden)
}

/// `out [tokens, hidden] = silu(gate) * up` from two `[tokens, hidden]` tensors.
///
/// The same computation and errors as [`silu_mul`], the gate and up halves in separate buffers.
pub fn silu_mul_pair(gate: &DeviceBuffer<bf16>, up: &DeviceBuffer<bf16>, out: &DeviceBuffer<bf16>, tokens: usize, hidden: usize) -> Result<()> {
    check_len("silu_mul gate", gate.len(), tokens * hidden)?;
    check_len("silu_mul up", up.len(), tokens * hidden)?;
    launch_silu_mul(gate, gate.ptr(), up.ptr(), hidden, out, tokens, hidden)
}

fn launch_silu_mul(
    anchor: &DeviceBuffer<bf16>,
    gate: *const u16,
    up: *const u16,
    in_row_stride: usize,
    out: &DeviceBuffer<bf16>,
    tokens: usize,
    hidden: usize,
) -> Result<()> {
    check_len("silu_mul out", out.len(), tokens * hidden)?;
    check_i32("silu_mul elements", tokens * 2 * hidden)?;
    if tokens > 65535 {
        return Err(Error::InvalidArgument(format!("silu_mul: {tokens} tokens (grid rows <= 65535)")));
    }
    if tokens == 0 || hidden == 0 {
        return Ok(());
    }
    let params = SiluMulParams {
        gate,
        up,
        out: out.mut_ptr(),
        tokens: tokens as i32,
        hidden: hidden as i32,
        in_row_stride: in_row_stride as i32,
        out_row_stride: hidden as i32,
    };
    let threads = 256;
    let grid = Dim3::xy(super::blocks_for(hidden, 8 * threads), tokens as u32);
    launch_with(anchor.device(), &SILU_MUL, &LaunchConfig { grid, block: Dim3::x(threads as u32), shared_bytes: 0 }, &params)
}

/// A multiple of 32 threads, enough for `items` strided items, at most `max`.
fn threads_for_row(items: usize, max: usize) -> u32 {
    items.next_power_of_two().clamp(32, max) as u32
}

fn check_logits(logits: &DeviceBuffer<f32>, rows: usize, vocab: usize, ids: &DeviceBuffer<i32>) -> Result<()> {
    if vocab == 0 {
        return Err(Error::InvalidArgument("sampling over an empty vocabulary".into()));
    }
    check_len("logits", logits.len(), rows * vocab)?;
    check_len("sampled ids", ids.len(), rows)?;
    check_i32("logits elements", logits.len())?;
    if rows > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("{rows} rows")));
    }
    Ok(())
}

/// `ids[r] = argmax(logits[r, :])` for `logits [rows, vocab]`: ties to the lower id, NaN ignored, -1 for a row with
/// no number.
///
/// `Error::InvalidArgument` when `vocab` is 0 or the sizes exceed `i32`; `Error::Shape` when `logits` does not hold
/// `rows * vocab` values or `ids` `rows`.
///
/// ```
/// use small4::device::{simulator, DeviceBuffer};
///
/// let device = simulator();
/// let logits = [0.5f32, 2.0, -1.0, 2.0, /* row 1: */ f32::NAN, -3.0, -2.5, -7.0];
/// let logits = DeviceBuffer::from_slice(&device, &logits)?;
/// let ids = DeviceBuffer::<i32>::alloc(&device, 2)?;
/// small4::kernels::ops::argmax(&logits, 2, 4, &ids)?;
/// // Row 0: the tie between ids 1 and 3 goes to 1. Row 1: the NaN is skipped.
/// assert_eq!(ids.to_vec()?, vec![1, 2]);
/// # Ok::<(), small4::Error>(())
/// ```
pub fn argmax(logits: &DeviceBuffer<f32>, rows: usize, vocab: usize, ids: &DeviceBuffer<i32>) -> Result<()> {
    check_logits(logits, rows, vocab, ids)?;
    if rows == 0 {
        return Ok(());
    }
    let params = ArgmaxParams { logits: logits.ptr(), ids: ids.mut_ptr(), rows: rows as i32, vocab: vocab as i32, row_stride: vocab as i32 };
    let config = LaunchConfig { grid: Dim3::x(rows as u32), block: Dim3::x(threads_for_row(vocab.div_ceil(4), 1024)), shared_bytes: 0 };
    launch_with(logits.device(), &ARGMAX_ROWS, &config, &params)
}

/// Per-row sampling settings, on the device so that a CUDA graph replays with new values.
pub struct SamplingInputs<'a> {
    /// <= 0: greedy.
    pub temperature: &'a DeviceBuffer<f32>,
    /// In (0, 1], used as floor(top_p * 2^24) / 2^24; values >= 1 (or NaN) keep every token.
    pub top_p: &'a DeviceBuffer<f32>,
    /// The request's seed: its samples depend on (seed, step) only, not on its row in the batch.
    pub seeds: &'a DeviceBuffer<u64>,
    /// The request's step (its count of tokens generated so far): with the seed, what keys the random draw.
    pub steps: &'a DeviceBuffer<i32>,
}

/// Seeded temperature + top-p sampling of `logits [rows, vocab]` into `ids [rows]`; the algorithm is documented on
/// `sample_rows` in cuda/ops.cu and reproduced exactly by `reference::sampling::sample`.
///
/// Every buffer of `inputs` holds one value per row. Errors as [`argmax`], plus `Error::Shape` for an input of the
/// wrong length.
pub fn sample(logits: &DeviceBuffer<f32>, rows: usize, vocab: usize, inputs: &SamplingInputs, ids: &DeviceBuffer<i32>) -> Result<()> {
    check_logits(logits, rows, vocab, ids)?;
    check_len("temperature", inputs.temperature.len(), rows)?;
    check_len("top_p", inputs.top_p.len(), rows)?;
    check_len("seeds", inputs.seeds.len(), rows)?;
    check_len("steps", inputs.steps.len(), rows)?;
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
        row_stride: vocab as i32,
    };
    let config = LaunchConfig { grid: Dim3::x(rows as u32), block: Dim3::x(threads_for_row(vocab.div_ceil(4), 512)), shared_bytes: 0 };
    launch_with(logits.device(), &SAMPLE_ROWS, &config, &params)
}
