//! The vision tower's own kernels (`cuda/vision.cu`): the patch embedding's unfold, 2D RoPE, block-diagonal
//! attention, bias + exact GELU, the patch merger's unfold and the scatter of image features into the `[IMG]` rows.
//! Index tables the kernels read without bounds checks ([`TokenSegments`], [`MergeSources`], [`RowTargets`]) are
//! built and validated on the host, so a kernel can never read or write outside its buffers.

use std::cell::Cell;
use std::ops::Range;

use half::bf16;

use super::modules::{VISION, VISION_ATTENTION_WGMMA};
use super::params::{BiasActParams, PatchIm2colParams, PatchMergeParams, Rope2dParams, ScatterRowsParams, VisionAttentionParams};
use super::{check_len, to_i32};
use super::{Matrix, TensorView, Vector};
use crate::device::{launch_with, Device, DeviceBuffer, Dim3, Kernel, LaunchConfig};
use crate::error::{Error, Result};

const PATCH_IM2COL: Kernel = Kernel { module: VISION, entry: "patch_im2col" };
const ROPE_2D: Kernel = Kernel { module: VISION, entry: "rope_2d" };
const VISION_ATTENTION: Kernel = Kernel { module: VISION, entry: "vision_attention" };
const VISION_ATTENTION_WGMMA_KERNEL: Kernel = Kernel { module: VISION_ATTENTION_WGMMA, entry: "vision_attention_wgmma" };
const BIAS_ACT: Kernel = Kernel { module: VISION, entry: "bias_act" };
const PATCH_MERGE: Kernel = Kernel { module: VISION, entry: "patch_merge" };
const SCATTER_ROWS: Kernel = Kernel { module: VISION, entry: "scatter_rows" };

/// The head size `vision_attention` is written for (the tower's, SPEC-model.md).
pub const ATTENTION_HEAD_DIM: usize = 64;
/// Queries per block of both attention kernels.
const ATTENTION_QUERIES: usize = 64;
/// Threads per block of `vision_attention_wgmma`: one consumer warpgroup and the producer warp.
const ATTENTION_WGMMA_THREADS: u32 = 5 * 32;
/// Dynamic shared memory of `vision_attention_wgmma` (`kSharedBytes` in cuda/vision_attention_wgmma.cu): 3 stages of
/// a K and a V tile of 64 keys x 64 bf16, two mbarriers per stage.
const ATTENTION_WGMMA_SHARED_BYTES: u32 = 3 * 2 * 64 * 128 + 2 * 3 * 8;

/// The environment variable that sets the process default of [`VisionAttentionKernel`]: `wgmma` (or unset) or
/// `mma_sync`.
pub const VISION_ATTENTION_ENV: &str = "SMALL4_VISION_ATTENTION";

/// Which kernel runs [`vision_attention`]: both compute the same outputs (the same key tiles, masking, rounding of P
/// and normaliser), only the tensor-core instructions and the pipeline differ.
///
/// The default is [`VisionAttentionKernel::Wgmma`]; the environment's `SMALL4_VISION_ATTENTION=mma_sync`
/// ([`VISION_ATTENTION_ENV`]) selects the mma.sync kernel for the process, and [`VisionAttentionKernel::run`] for one
/// closure on the calling thread.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::vision::{vision_attention, TokenSegments, VisionAttentionKernel};
///
/// let device = simulator();
/// // One image of 3 tokens, one head.
/// let x: Vec<bf16> = (0..3 * 64).map(|i| bf16::from_f32((i % 7) as f32 / 8.0)).collect();
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let segments = TokenSegments::upload(&device, &[0..3])?;
/// let run = |kernel: VisionAttentionKernel| -> small4::Result<Vec<bf16>> {
///     let out = DeviceBuffer::<bf16>::alloc(&device, 3 * 64)?;
///     let view = x.view([3, 1, 64])?;
///     kernel.run(|| vision_attention(view, view, view, out.view([3, 1, 64])?, &segments, 0.125))?;
///     out.to_vec()
/// };
/// assert_eq!(run(VisionAttentionKernel::Wgmma)?, run(VisionAttentionKernel::MmaSync)?);
/// assert_eq!(device.last_launch_counters().unwrap().kernel, "vision_attention");
/// // The choice holds inside `run` only, on this thread:
/// assert_eq!(VisionAttentionKernel::MmaSync.run(VisionAttentionKernel::current)?, VisionAttentionKernel::MmaSync);
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VisionAttentionKernel {
    /// `vision_attention_wgmma`: wgmma m64n64k16, a producer warp and an mbarrier ring, FA3-style overlap.
    Wgmma,
    /// `vision_attention`: mma.sync m16n8k16, all warps load and compute.
    MmaSync,
}

thread_local! {
    /// [`VisionAttentionKernel::run`]'s choice for the calling thread, over the environment's.
    static ATTENTION_OVERRIDE: Cell<Option<VisionAttentionKernel>> = const { Cell::new(None) };
}

impl VisionAttentionKernel {
    /// The choice in force on this thread: [`VisionAttentionKernel::run`]'s, else the environment's
    /// (`SMALL4_VISION_ATTENTION`), else [`VisionAttentionKernel::Wgmma`]. `Error::InvalidArgument` for an environment
    /// value other than `wgmma` and `mma_sync`.
    pub fn current() -> Result<Self> {
        super::current_choice(&ATTENTION_OVERRIDE, VISION_ATTENTION_ENV, &[("wgmma", Self::Wgmma), ("mma_sync", Self::MmaSync)], Self::Wgmma)
    }

    /// Runs `f` with this choice on the calling thread (launches are issued on the thread that calls the wrapper),
    /// restoring the previous choice afterwards, also when `f` panics.
    pub fn run<R>(self, f: impl FnOnce() -> R) -> R {
        super::with_choice(&ATTENTION_OVERRIDE, self, f)
    }
}
const THREADS: usize = 256;

fn elementwise_grid(elements: usize) -> Result<LaunchConfig> {
    let blocks = super::blocks_for(elements, THREADS);
    if blocks as usize > i32::MAX as usize {
        return Err(Error::InvalidArgument(format!("{elements} elements exceed one grid")));
    }
    Ok(LaunchConfig { grid: Dim3::x(blocks), block: Dim3::x(THREADS as u32), shared_bytes: 0 })
}

/// Writes the unfolded patches of the image `pixels [channels, height, width]` (f32, CHW, normalised) into `out
/// [patches, k_padded]` (bf16): row `gy * (width / patch) + gx` holds the `[c, ky, kx]` values of patch (gy, gx),
/// then zeros up to `k_padded` (the GEMM's k is a multiple of 64). Several images fill one GEMM input through
/// `out.rows(first..first + patches)`.
///
/// `Error::Shape` when a side is not a positive multiple of `patch` or `out` is not `[patches, k_padded]`;
/// `Error::InvalidArgument` when `k_padded` is below `channels * patch^2` or a view is not packed (the kernel takes
/// no strides); `Error::OutOfRange` for a size above `i32`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::vision::patch_im2col;
///
/// let device = simulator();
/// // One channel of 2x4 pixels, patches of 2: two patches of 4 values, padded to rows of 8.
/// let pixels = DeviceBuffer::from_slice(&device, &[0.0f32, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 2 * 8)?;
/// patch_im2col(pixels.view([1, 2, 4])?, 2, out.view([2, 8])?)?;
/// let got: Vec<f32> = out.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert_eq!(got, [0.0, 1.0, 4.0, 5.0, 0.0, 0.0, 0.0, 0.0, 2.0, 3.0, 6.0, 7.0, 0.0, 0.0, 0.0, 0.0]);
/// // An output with room for one patch only is a typed error:
/// let err = patch_im2col(pixels.view([1, 2, 4])?, 2, out.view([1, 8])?);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn patch_im2col(pixels: TensorView<f32, 3>, patch: usize, out: Matrix<bf16>) -> Result<()> {
    let [c, h, w] = pixels.dims();
    if patch == 0 || h == 0 || w == 0 || h % patch != 0 || w % patch != 0 {
        return Err(Error::shape("patch_im2col image size", format!("sides positive multiples of {patch}"), format!("{w}x{h}")));
    }
    let k_padded = out.dims()[1];
    if k_padded < c * patch * patch {
        return Err(Error::InvalidArgument(format!("patch_im2col: k_padded {k_padded} < {} values per patch", c * patch * patch)));
    }
    let patches = (h / patch) * (w / patch);
    out.expect_dims("patch_im2col out", [patches, k_padded])?;
    pixels.expect_packed("patch_im2col pixels")?;
    out.expect_packed("patch_im2col out")?;
    to_i32("patch_im2col pixels", pixels.len())?;
    let params = PatchIm2colParams {
        pixels: pixels.ptr(),
        out: out.mut_ptr(),
        channels: to_i32("channels", c)?,
        height: to_i32("height", h)?,
        width: to_i32("width", w)?,
        patch: to_i32("patch", patch)?,
        k_padded: to_i32("k_padded", k_padded)?,
    };
    let config = LaunchConfig { grid: Dim3::x(patches as u32), block: Dim3::x(THREADS as u32), shared_bytes: 0 };
    launch_with(out.device(), &PATCH_IM2COL, &config, &params)
}

/// The grid position of every token and the 2D RoPE frequencies (`reference::vision::rope_2d_inv_freq`).
pub struct GridPositions<'a> {
    /// `[tokens]` i32: each token's patch row in its image.
    pub rows: &'a DeviceBuffer<i32>,
    /// `[tokens]` i32: each token's patch column.
    pub cols: &'a DeviceBuffer<i32>,
    /// `[head_dim / 4]` f32: frequencies of the pairs rotated by the row.
    pub inv_freq_rows: &'a DeviceBuffer<f32>,
    /// `[head_dim / 4]` f32: frequencies of the pairs rotated by the column.
    pub inv_freq_cols: &'a DeviceBuffer<f32>,
}

/// Rotates, in place, every head of `q` (and `k`) `[tokens, heads, head_dim]` by the token's grid position: the
/// first `head_dim / 4` interleaved pairs by its row, the rest by its column. Positions must be >= 0.
///
/// `Error::InvalidArgument` when `head_dim` is not a positive multiple of 4 or a view is not packed (or not on 4
/// bytes: the kernel moves pairs); `Error::Shape` when `k` is not `q`'s shape or `positions` does not hold `tokens`
/// rows and columns and `head_dim / 4` frequencies each; `Error::OutOfRange` for a size above `i32`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::vision::{rope_2d, GridPositions};
///
/// let device = simulator();
/// // One token at grid (1, 0), one head of 4: the first pair turns by the row (angle 1), the second stays.
/// let q = DeviceBuffer::from_slice(&device, &[bf16::ONE, bf16::ZERO, bf16::ONE, bf16::ZERO])?;
/// let (rows, cols) = (DeviceBuffer::from_slice(&device, &[1i32])?, DeviceBuffer::from_slice(&device, &[0i32])?);
/// let freq = DeviceBuffer::from_slice(&device, &[1.0f32])?;
/// let positions = GridPositions { rows: &rows, cols: &cols, inv_freq_rows: &freq, inv_freq_cols: &freq };
/// rope_2d(q.view([1, 1, 4])?, None, &positions)?;
/// let got: Vec<f32> = q.to_vec()?.iter().map(|v| v.to_f32()).collect();
/// assert!((got[0] - 1f32.cos()).abs() < 1e-2 && (got[1] - 1f32.sin()).abs() < 1e-2 && got[2..] == [1.0, 0.0]);
/// // Heads of 2 values cannot hold a row pair and a column pair: a typed error.
/// assert!(matches!(rope_2d(q.view([1, 2, 2])?, None, &positions), Err(small4::Error::InvalidArgument(_))));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn rope_2d(q: TensorView<bf16, 3>, k: Option<TensorView<bf16, 3>>, positions: &GridPositions) -> Result<()> {
    let [tokens, heads, head_dim] = q.dims();
    if head_dim == 0 || head_dim % 4 != 0 {
        return Err(Error::InvalidArgument(format!("rope_2d: head_dim {head_dim} must be a positive multiple of 4")));
    }
    check_len("rope_2d grid rows", positions.rows.len(), tokens)?;
    check_len("rope_2d grid cols", positions.cols.len(), tokens)?;
    check_len("rope_2d row frequencies", positions.inv_freq_rows.len(), head_dim / 4)?;
    check_len("rope_2d column frequencies", positions.inv_freq_cols.len(), head_dim / 4)?;
    for (what, view) in std::iter::once(("rope_2d q", q)).chain(k.map(|k| ("rope_2d k", k))) {
        view.expect_dims(what, [tokens, heads, head_dim])?;
        view.expect_packed(what)?;
        view.expect_aligned(what, 4)?;
    }
    to_i32("rope_2d elements", q.len())?;
    if tokens == 0 || heads == 0 {
        return Ok(());
    }
    let params = Rope2dParams {
        q: q.mut_ptr(),
        k: k.map_or(std::ptr::null_mut(), |k| k.mut_ptr()),
        grid_rows: positions.rows.ptr(),
        grid_cols: positions.cols.ptr(),
        inv_freq_rows: positions.inv_freq_rows.ptr(),
        inv_freq_cols: positions.inv_freq_cols.ptr(),
        tokens: tokens as i32,
        heads: to_i32("heads", heads)?,
        head_dim: head_dim as i32,
    };
    let config = LaunchConfig { grid: Dim3::x(tokens as u32), block: Dim3::x(THREADS as u32), shared_bytes: 0 };
    launch_with(q.device(), &ROPE_2D, &config, &params)
}

/// Which keys each token attends to: the token range of its image. Built from the images' contiguous ranges.
pub struct TokenSegments {
    start: DeviceBuffer<i32>,
    end: DeviceBuffer<i32>,
}

impl TokenSegments {
    /// `segments` must be non-empty ranges that follow each other from token 0 (image after image), else
    /// `Error::InvalidArgument`.
    pub fn upload(device: &Device, segments: &[Range<usize>]) -> Result<Self> {
        let mut next = 0;
        let (mut start, mut end) = (Vec::new(), Vec::new());
        for (i, s) in segments.iter().enumerate() {
            if s.start != next || s.is_empty() {
                return Err(Error::InvalidArgument(format!("segment {i} = {s:?}: segments must be non-empty and follow each other from 0 (next {next})")));
            }
            next = s.end;
            start.extend(std::iter::repeat_n(to_i32("segment start", s.start)?, s.len()));
            end.extend(std::iter::repeat_n(to_i32("segment end", s.end)?, s.len()));
        }
        Ok(TokenSegments { start: DeviceBuffer::from_slice(device, &start)?, end: DeviceBuffer::from_slice(device, &end)? })
    }

    /// Tokens covered (the end of the last segment).
    pub fn tokens(&self) -> usize {
        self.start.len()
    }
}

/// Bidirectional attention of `q`, `k`, `v` `[tokens, heads, 64]` within each token's segment (block-diagonal over
/// the images), softmax scale `scale`, into `out` (same shape, bf16). Runs the kernel [`VisionAttentionKernel`]
/// picks (wgmma by default).
///
/// `Error::Shape` when a view is not `[segments.tokens(), heads, 64]`; `Error::InvalidArgument` for a scale that is
/// not finite, more than 65535 heads, or a view that is not packed or not on 16 bytes (the kernel loads rows of 8);
/// `Error::OutOfRange` for a size above `i32`; `Error::InvalidArgument` for a `SMALL4_VISION_ATTENTION` other than
/// `wgmma` and `mma_sync`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::vision::{vision_attention, TokenSegments, ATTENTION_HEAD_DIM};
///
/// let device = simulator();
/// assert_eq!(ATTENTION_HEAD_DIM, 64); // the only head size the kernel takes
/// // Two images of one token each, one head: each token attends only to itself, so out = v.
/// let v: Vec<bf16> = (0..2 * 64).map(|i| bf16::from_f32(i as f32 / 64.0)).collect();
/// let (qk, v) = (DeviceBuffer::from_slice(&device, &[bf16::ONE; 2 * 64])?, DeviceBuffer::from_slice(&device, &v)?);
/// let out = DeviceBuffer::<bf16>::alloc(&device, 2 * 64)?;
/// let segments = TokenSegments::upload(&device, &[0..1, 1..2])?;
/// let shape = [2, 1, ATTENTION_HEAD_DIM];
/// vision_attention(qk.view(shape)?, qk.view(shape)?, v.view(shape)?, out.view(shape)?, &segments, 0.125)?;
/// assert_eq!(out.to_vec()?, v.to_vec()?);
/// // An output for one token only is a typed error:
/// let err = vision_attention(qk.view(shape)?, qk.view(shape)?, v.view(shape)?, out.view([1, 1, 64])?, &segments, 0.125);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// // So are heads of 32 (two per token here): the kernel is written for ATTENTION_HEAD_DIM.
/// let halves = [2, 2, ATTENTION_HEAD_DIM / 2];
/// let err = vision_attention(qk.view(halves)?, qk.view(halves)?, v.view(halves)?, out.view(halves)?, &segments, 0.125);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn vision_attention(
    q: TensorView<bf16, 3>,
    k: TensorView<bf16, 3>,
    v: TensorView<bf16, 3>,
    out: TensorView<bf16, 3>,
    segments: &TokenSegments,
    scale: f32,
) -> Result<()> {
    let tokens = segments.tokens();
    let heads = q.dims()[1];
    for (what, view) in [("vision attention q", q), ("vision attention k", k), ("vision attention v", v), ("vision attention out", out)] {
        view.expect_dims(what, [tokens, heads, ATTENTION_HEAD_DIM])?;
        view.expect_packed(what)?;
        view.expect_aligned(what, 16)?;
    }
    if !scale.is_finite() {
        return Err(Error::InvalidArgument(format!("vision attention: scale {scale}")));
    }
    to_i32("vision attention elements", q.len())?;
    if heads > 65535 {
        return Err(Error::InvalidArgument(format!("vision attention: {heads} heads (grid y <= 65535)")));
    }
    if tokens == 0 || heads == 0 {
        return Ok(());
    }
    let params = VisionAttentionParams {
        q: q.ptr(),
        k: k.ptr(),
        v: v.ptr(),
        out: out.mut_ptr(),
        segment_start: segments.start.ptr(),
        segment_end: segments.end.ptr(),
        tokens: tokens as i32,
        heads: heads as i32,
        scale,
    };
    let (kernel, block, shared_bytes) = match VisionAttentionKernel::current()? {
        VisionAttentionKernel::Wgmma => (&VISION_ATTENTION_WGMMA_KERNEL, ATTENTION_WGMMA_THREADS, ATTENTION_WGMMA_SHARED_BYTES),
        VisionAttentionKernel::MmaSync => (&VISION_ATTENTION, 128, 0),
    };
    let config = LaunchConfig { grid: Dim3::xy(super::blocks_for(tokens, ATTENTION_QUERIES), heads as u32), block: Dim3::x(block), shared_bytes };
    launch_with(q.device(), kernel, &config, &params)
}

/// The activation of [`bias_act`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// No activation: the bias add alone.
    Identity,
    /// Exact GELU `x (1 + erf(x / sqrt 2)) / 2`.
    Gelu,
}

/// In place `x = act(x + bias)` for `x [rows, cols]`, `bias [cols]` optional (bf16).
///
/// `Error::Shape` when `bias` is not `[cols]`, `Error::InvalidArgument` when `x` is not packed (the kernel walks it as
/// one run of elements), `Error::OutOfRange` for a size above `i32`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::vision::{bias_act, Activation};
///
/// let device = simulator();
/// let x = DeviceBuffer::from_slice(&device, &[bf16::ONE; 4])?;
/// let bias = DeviceBuffer::from_slice(&device, &[bf16::from_f32(-1.0), bf16::ONE])?;
/// bias_act(x.view([2, 2])?, Some(bias.as_vector()), Activation::Identity)?;
/// assert_eq!(x.to_vec()?, [bf16::ZERO, bf16::from_f32(2.0), bf16::ZERO, bf16::from_f32(2.0)]);
/// // A bias for rows of 2 on rows of 4 is a typed error:
/// let err = bias_act(x.view([1, 4])?, Some(bias.as_vector()), Activation::Gelu);
/// assert!(matches!(err, Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn bias_act(x: Matrix<bf16>, bias: Option<Vector<bf16>>, activation: Activation) -> Result<()> {
    let [rows, cols] = x.dims();
    if let Some(b) = bias {
        b.expect_dims("bias_act bias", [cols])?;
    }
    x.expect_packed("bias_act x")?;
    if x.is_empty() {
        return Ok(());
    }
    let params = BiasActParams {
        x: x.mut_ptr(),
        bias: bias.map_or(std::ptr::null(), |b| b.ptr()),
        rows: to_i32("bias_act rows", rows)?,
        cols: to_i32("bias_act cols", cols)?,
        gelu: (activation == Activation::Gelu) as i32,
    };
    to_i32("bias_act elements", x.len())?;
    launch_with(x.device(), &BIAS_ACT, &elementwise_grid(x.len())?, &params)
}

/// Which patch feeds each slot of each merged row: `group = merge^2` token indices per merged row, `[di, dj]` order,
/// merged rows in row-major order of each image's merged grid, images one after the other.
pub struct MergeSources {
    sources: DeviceBuffer<i32>,
    group: usize,
    tokens: usize,
}

impl MergeSources {
    /// The sources for images with patch grids `grids` (rows, cols), whose tokens follow each other in row-major
    /// order; both sides must be multiples of `merge` (`Error::Shape`), `merge` positive (`Error::InvalidArgument`).
    pub fn upload(device: &Device, grids: &[(usize, usize)], merge: usize) -> Result<Self> {
        if merge == 0 {
            return Err(Error::InvalidArgument("patch merge size 0".into()));
        }
        let mut sources = Vec::new();
        let mut first = 0;
        for (i, &(rows, cols)) in grids.iter().enumerate() {
            if rows % merge != 0 || cols % merge != 0 {
                return Err(Error::shape(format!("image {i} patch grid"), format!("sides multiples of {merge}"), format!("{rows}x{cols}")));
            }
            for by in 0..rows / merge {
                for bx in 0..cols / merge {
                    for di in 0..merge {
                        for dj in 0..merge {
                            sources.push(to_i32("merge source", first + (by * merge + di) * cols + bx * merge + dj)?);
                        }
                    }
                }
            }
            first += rows * cols;
        }
        Ok(MergeSources { sources: DeviceBuffer::from_slice(device, &sources)?, group: merge * merge, tokens: first })
    }

    /// Merged rows.
    pub fn rows(&self) -> usize {
        self.sources.len() / self.group
    }
}

/// The patch merger's unfold: `out [merged rows, hidden * group]` from `x [tokens, hidden]`, each row its group of
/// patches channel-major (`out[r, c * group + s] = x[source s of r, c]`, torch's unfold order).
///
/// `Error::Shape` when `x` does not have the sources' token count or `out` is not `[sources.rows(), hidden *
/// group]`; `Error::InvalidArgument` for a view that is not packed; `Error::OutOfRange` for a size above `i32`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::vision::{patch_merge, MergeSources};
///
/// let device = simulator();
/// // A 2x2 patch grid of hidden 1 merges into one row: the patches in [di, dj] order.
/// let x: Vec<bf16> = (0..4).map(|i| bf16::from_f32(i as f32)).collect();
/// let x = DeviceBuffer::from_slice(&device, &x)?;
/// let sources = MergeSources::upload(&device, &[(2, 2)], 2)?;
/// let out = DeviceBuffer::<bf16>::alloc(&device, 4)?;
/// patch_merge(x.view([4, 1])?, &sources, out.view([1, 4])?)?;
/// assert_eq!(out.to_vec()?, x.to_vec()?);
/// // Three tokens for a four-token grid is a typed error:
/// assert!(matches!(patch_merge(x.view([3, 1])?, &sources, out.view([1, 4])?), Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn patch_merge(x: Matrix<bf16>, sources: &MergeSources, out: Matrix<bf16>) -> Result<()> {
    let hidden = x.dims()[1];
    x.expect_dims("patch_merge x", [sources.tokens, hidden])?;
    out.expect_dims("patch_merge out", [sources.rows(), hidden * sources.group])?;
    x.expect_packed("patch_merge x")?;
    out.expect_packed("patch_merge out")?;
    if out.is_empty() {
        return Ok(());
    }
    to_i32("patch_merge elements", out.len())?;
    let params = PatchMergeParams {
        x: x.ptr(),
        sources: sources.sources.ptr(),
        out: out.mut_ptr(),
        rows: sources.rows() as i32,
        hidden: hidden as i32,
        group: sources.group as i32,
    };
    launch_with(x.device(), &PATCH_MERGE, &elementwise_grid(out.len())?, &params)
}

/// Distinct destination rows for [`scatter_rows`], each below `limit`.
pub struct RowTargets {
    rows: DeviceBuffer<i32>,
    limit: usize,
}

impl RowTargets {
    /// Checks and uploads the target rows: `Error::OutOfRange` for a row at or above `limit` (the destination's row
    /// count), `Error::InvalidArgument` for a row given twice.
    pub fn upload(device: &Device, rows: &[usize], limit: usize) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        for &r in rows {
            if r >= limit {
                return Err(Error::OutOfRange { what: "scatter target row".into(), index: r as i64, limit: limit as i64 });
            }
            if !seen.insert(r) {
                return Err(Error::InvalidArgument(format!("scatter target row {r} appears twice")));
            }
        }
        let rows: Vec<i32> = rows.iter().map(|&r| to_i32("scatter target row", r)).collect::<Result<_>>()?;
        Ok(RowTargets { rows: DeviceBuffer::from_slice(device, &rows)?, limit })
    }

    /// Rows to scatter.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// No rows to scatter.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// `out[targets[i], :] = src[i, :]` for `src [targets.len(), cols]` and `out [targets' limit, cols]`; other rows of
/// `out` keep their values (image features over the `[IMG]` embeddings).
///
/// `Error::Shape` when `src` does not have one row per target or `out` is not `[limit, cols]`;
/// `Error::InvalidArgument` for a view that is not packed; `Error::OutOfRange` for a size above `i32`.
///
/// ```
/// use half::bf16;
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::vision::{scatter_rows, RowTargets};
///
/// let device = simulator();
/// let src = DeviceBuffer::from_slice(&device, &[bf16::ONE; 2])?;
/// let out = DeviceBuffer::from_slice(&device, &[bf16::ZERO; 6])?;
/// let targets = RowTargets::upload(&device, &[2], 3)?; // row 2 of 3
/// scatter_rows(src.view([1, 2])?, &targets, out.view([3, 2])?)?;
/// assert_eq!(out.to_vec()?, [bf16::ZERO, bf16::ZERO, bf16::ZERO, bf16::ZERO, bf16::ONE, bf16::ONE]);
/// // An output of two rows for targets checked against three is a typed error:
/// assert!(matches!(scatter_rows(src.view([1, 2])?, &targets, out.view([2, 2])?), Err(small4::Error::Shape { .. })));
/// # Ok::<(), small4::Error>(())
/// ```
pub fn scatter_rows(src: Matrix<bf16>, targets: &RowTargets, out: Matrix<bf16>) -> Result<()> {
    let cols = src.dims()[1];
    src.expect_dims("scatter_rows src", [targets.len(), cols])?;
    out.expect_dims("scatter_rows out", [targets.limit, cols])?;
    src.expect_packed("scatter_rows src")?;
    out.expect_packed("scatter_rows out")?;
    to_i32("scatter_rows out elements", out.len())?;
    if targets.is_empty() || cols == 0 {
        return Ok(());
    }
    let params = ScatterRowsParams { src: src.ptr(), rows: targets.rows.ptr(), out: out.mut_ptr(), count: targets.len() as i32, cols: cols as i32 };
    let config = LaunchConfig { grid: Dim3::x(targets.len() as u32), block: Dim3::x(THREADS as u32), shared_bytes: 0 };
    launch_with(src.device(), &SCATTER_ROWS, &config, &params)
}
