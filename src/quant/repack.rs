//! Repacks checkpoint weights ([out, in] row-major, per expert, or the HF stacked `gate_up_proj` / `down_proj`) into
//! the layout `cuda/moe_gemm.cu` streams: mma.sync A fragments in lane order, so each lane loads its fragment with one
//! 16-byte vector and the block copies whole tiles verbatim with cp.async.
//!
//! Layout of one expert: 16-row tiles, each split into 64-k blocks; a (tile, k block) occupies `tile_bytes` bytes in
//! which lane l owns the 16-byte chunks at (chunk * 32 + l) * 16. Inside a k-step of 16, lane (g = l / 4, t = l % 4)
//! holds the elements (g, 2t) (g, 2t+1) (g+8, 2t) (g+8, 2t+1) (g, 2t+8) (g, 2t+9) (g+8, 2t+8) (g+8, 2t+9)
//! (tile-relative row, k-step-relative column). bf16: one chunk per k-step (2 bytes an element); fp8: one chunk per
//! two k-steps (1 byte); 4-bit: one chunk per 64-k block (a nibble, low nibble = earlier element).
//!
//! For the fused up-projection the rows of w1 (gate) and w3 (up) are interleaved in groups of 8: tile i holds gate
//! rows 8i..8i+8 then up rows 8i..8i+8, so the lane that accumulates `gate[h]` also holds `up[h]` (SwiGLU in registers).
//! Rows are padded with zero weights (and zero scales) to a multiple of [`ROW_ALIGN`].
//!
//! # Example
//!
//! Two bf16 experts of `[16, 64]` whose element `(r, c)` has the bit pattern `r * 64 + c`, so that the packed bytes
//! show where each element went:
//!
//! ```
//! use half::bf16;
//! use small4::quant::repack::{repack_linear, tile_bytes, MatrixRef, QuantData, K_ALIGN, ROW_ALIGN};
//! use small4::quant::WeightFormat;
//!
//! let (rows, cols) = (16, 64);
//! let w: Vec<bf16> = (0..rows * cols).map(|i| bf16::from_bits(i as u16)).collect();
//! let expert = MatrixRef { rows, cols, data: QuantData::Bf16(&w) };
//! let packed = repack_linear(&[expert, expert])?;
//!
//! // Rows padded to ROW_ALIGN: 8 tiles of 16 rows, one k block of K_ALIGN, per expert.
//! assert_eq!((packed.experts, packed.out_cols, packed.rows_padded, packed.k_dim), (2, 16, ROW_ALIGN, 64));
//! let tiles = ROW_ALIGN / 16;
//! assert_eq!(packed.expert_stride, tiles * (cols / K_ALIGN) * tile_bytes(WeightFormat::Bf16));
//! assert_eq!(packed.data.len(), 2 * packed.expert_stride);
//! assert_eq!(packed.bytes_per_expert(), packed.expert_stride); // bf16 has no scales
//!
//! // Lane 0's first 16-byte chunk: its mma A fragment of k-step 0, elements (0,0) (0,1) (8,0) (8,1) (0,8) (0,9)
//! // (8,8) (8,9); lane 1's chunk follows with the columns 2 and 3 (+8).
//! let element = |at: usize| u16::from_le_bytes([packed.data[2 * at], packed.data[2 * at + 1]]);
//! let code = |r: u16, c: u16| r * 64 + c;
//! let lane0: Vec<u16> = (0..8).map(element).collect();
//! assert_eq!(lane0, [code(0, 0), code(0, 1), code(8, 0), code(8, 1), code(0, 8), code(0, 9), code(8, 8), code(8, 9)]);
//! assert_eq!(element(8), code(0, 2));
//! // The padding rows are zero.
//! assert!(packed.data[tile_bytes(WeightFormat::Bf16)..packed.expert_stride].iter().all(|&b| b == 0));
//! # Ok::<(), small4::Error>(())
//! ```

use half::bf16;

use super::matrix::QuantizedMatrix;
use super::WeightFormat;
use crate::error::{Error, Result};

/// Weight rows are padded to a multiple of the largest block tile of the kernels (4 warps x 2 tiles x 16 rows).
/// See the module example.
pub const ROW_ALIGN: usize = 128;
/// The reduction dimension must be a multiple of the kernels' k stage.
///
/// ```
/// use half::bf16;
/// use small4::quant::repack::{MatrixRef, QuantData, K_ALIGN};
///
/// let w = vec![bf16::ZERO; 2 * K_ALIGN];
/// assert!(MatrixRef { rows: 1, cols: 2 * K_ALIGN, data: QuantData::Bf16(&w) }.validate("w").is_ok());
/// assert!(MatrixRef { rows: 2, cols: K_ALIGN / 2, data: QuantData::Bf16(&w[..K_ALIGN]) }.validate("w").is_err());
/// ```
pub const K_ALIGN: usize = 64;

/// Bits per weight element in the packed layout (scales excluded).
///
/// ```
/// use small4::quant::repack::packed_bits;
/// use small4::quant::WeightFormat;
///
/// let bits: Vec<usize> = WeightFormat::ALL.iter().map(|&f| packed_bits(f)).collect();
/// assert_eq!(bits, [16, 8, 8, 4, 4, 4]);
/// ```
pub fn packed_bits(format: WeightFormat) -> usize {
    match format {
        WeightFormat::Bf16 => 16,
        WeightFormat::Fp8PerTensor | WeightFormat::Fp8Block128 => 8,
        WeightFormat::Int4 { .. } | WeightFormat::Nvfp4 => 4,
    }
}

/// Bytes of one 16-row x 64-k tile of the packed layout.
///
/// ```
/// use small4::quant::repack::tile_bytes;
/// use small4::quant::WeightFormat;
///
/// // 32 lanes x 16-byte chunks: 4 chunks a lane for bf16, 2 for fp8, 1 for the 4-bit formats.
/// assert_eq!(tile_bytes(WeightFormat::Bf16), 4 * 32 * 16);
/// assert_eq!(tile_bytes(WeightFormat::Fp8Block128), 2 * 32 * 16);
/// assert_eq!(tile_bytes(WeightFormat::Nvfp4), 32 * 16);
/// ```
pub fn tile_bytes(format: WeightFormat) -> usize {
    16 * K_ALIGN * packed_bits(format) / 8
}

/// One checkpoint matrix [rows, cols] row-major in one of the formats, borrowed.
///
/// Made by hand from a checkpoint's arrays, or borrowed from a [`QuantizedMatrix`]:
///
/// ```
/// use small4::quant::repack::{MatrixRef, QuantData};
/// use small4::quant::{QuantizedMatrix, WeightFormat};
///
/// let q = QuantizedMatrix::quantize(WeightFormat::Nvfp4, &vec![1.0f32; 2 * 64], 2, 64)?;
/// let m = MatrixRef::from(&q);
/// assert_eq!((m.rows, m.cols), (2, 64));
/// assert!(matches!(m.data, QuantData::Nvfp4 { .. }));
/// assert_eq!(m.data.format(), WeightFormat::Nvfp4);
/// m.validate("w1")?;
///
/// // validate checks every array against the shape: here one scale byte is missing.
/// let QuantData::Nvfp4 { packed, scales, global_scale } = m.data else { unreachable!() };
/// let short = MatrixRef { data: QuantData::Nvfp4 { packed, scales: &scales[1..], global_scale }, ..m };
/// assert!(short.validate("w1").is_err());
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct MatrixRef<'a> {
    /// Rows: output features N (more than 0).
    pub rows: usize,
    /// Columns: input features K (a multiple of [`K_ALIGN`] to be repacked).
    pub cols: usize,
    /// The format and its arrays, their lengths given by `rows` and `cols`.
    pub data: QuantData<'a>,
}

/// The storage of a [`MatrixRef`] (shapes as in `src/quant`: e4m3 bytes, nibbles packed low = even column).
#[derive(Clone, Copy, Debug)]
pub enum QuantData<'a> {
    /// bf16 weights `[rows, cols]`.
    Bf16(&'a [bf16]),
    /// FP8 e4m3 with one per-tensor scale: W = e4m3(data) * scale.
    Fp8 {
        /// e4m3 codes `[rows, cols]`.
        data: &'a [u8],
        /// The f32 multiplier of every code (finite).
        scale: f32,
    },
    /// `scales` [ceil(rows / 128), ceil(cols / 128)].
    Fp8Block {
        /// e4m3 codes `[rows, cols]`.
        data: &'a [u8],
        /// `[ceil(rows / 128), ceil(cols / 128)]` row-major f32 scales, one per 128x128 block.
        scales: &'a [f32],
    },
    /// `packed` [rows, cols / 2], `scales` [rows, cols / group], `zeros` (same shape, 0..=15) or symmetric (zero 8).
    Int4 {
        /// `[rows, cols / 2]` bytes of two 4-bit codes, the low nibble holding the even column.
        packed: &'a [u8],
        /// `[rows, cols / group]` bf16 scales, one per group of a row.
        scales: &'a [bf16],
        /// `[rows, cols / group]` zero points in 0..=15, or `None` for symmetric (zero 8).
        zeros: Option<&'a [u8]>,
        /// Weights per group along K (a multiple of [`K_ALIGN`] dividing `cols` to be repacked).
        group: usize,
    },
    /// `packed` [rows, cols / 2], `scales` e4m3 [rows, cols / 16], W = e2m1 * scale / global_scale.
    Nvfp4 {
        /// `[rows, cols / 2]` bytes of two e2m1 codes, the low nibble holding the even column.
        packed: &'a [u8],
        /// `[rows, cols / 16]` e4m3 bytes, one per block of 16 weights of a row.
        scales: &'a [u8],
        /// The f32 divisor of every block scale (finite, non-zero).
        global_scale: f32,
    },
}

impl QuantData<'_> {
    /// The format of this storage (see [`MatrixRef`]'s example).
    pub fn format(&self) -> WeightFormat {
        match self {
            Self::Bf16(_) => WeightFormat::Bf16,
            Self::Fp8 { .. } => WeightFormat::Fp8PerTensor,
            Self::Fp8Block { .. } => WeightFormat::Fp8Block128,
            Self::Int4 { group, zeros, .. } => WeightFormat::Int4 { group: *group, zero_point: zeros.is_some() },
            Self::Nvfp4 { .. } => WeightFormat::Nvfp4,
        }
    }
}

impl<'a> From<&'a QuantizedMatrix> for MatrixRef<'a> {
    fn from(m: &'a QuantizedMatrix) -> Self {
        let (rows, cols) = m.shape();
        let data = match m {
            QuantizedMatrix::Bf16 { data, .. } => QuantData::Bf16(data),
            QuantizedMatrix::Fp8PerTensor(m) => QuantData::Fp8 { data: &m.data, scale: m.scale },
            QuantizedMatrix::Fp8Block128(m) => QuantData::Fp8Block { data: &m.data, scales: &m.scales },
            QuantizedMatrix::Int4(m) => QuantData::Int4 { packed: &m.packed, scales: &m.scales, zeros: m.zeros.as_deref(), group: m.group },
            QuantizedMatrix::Nvfp4(m) => QuantData::Nvfp4 { packed: &m.packed, scales: &m.scales, global_scale: m.global_scale },
        };
        MatrixRef { rows, cols, data }
    }
}

impl<'a> MatrixRef<'a> {
    /// Checks every buffer length against the shape (and the repacker's own limits: columns a multiple of
    /// [`K_ALIGN`], INT4 groups a multiple of it; see [`MatrixRef`]'s example). `what` names the matrix in errors.
    pub fn validate(&self, what: &str) -> Result<()> {
        let (r, c) = (self.rows, self.cols);
        let check = |name: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(Error::shape(format!("{what} {name} ({r}x{c})"), want, got))
            }
        };
        if c % K_ALIGN != 0 || r == 0 {
            return Err(Error::InvalidArgument(format!("{what}: {r}x{c} needs rows > 0 and columns a multiple of {K_ALIGN}")));
        }
        match self.data {
            QuantData::Bf16(d) => check("data", d.len(), r * c),
            QuantData::Fp8 { data, scale } => {
                if !scale.is_finite() {
                    return Err(Error::InvalidArgument(format!("{what}: fp8 scale {scale}")));
                }
                check("data", data.len(), r * c)
            }
            QuantData::Fp8Block { data, scales } => {
                check("data", data.len(), r * c)?;
                check("block scales", scales.len(), r.div_ceil(128) * c.div_ceil(128))
            }
            QuantData::Int4 { packed, scales, zeros, group } => {
                if group == 0 || group % K_ALIGN != 0 || c % group != 0 {
                    return Err(Error::InvalidArgument(format!("{what}: int4 group {group} must be a multiple of {K_ALIGN} dividing {c}")));
                }
                check("packed", packed.len(), r * c / 2)?;
                check("scales", scales.len(), r * c / group)?;
                if let Some(z) = zeros {
                    check("zeros", z.len(), r * c / group)?;
                    if z.iter().any(|&v| v > 15) {
                        return Err(Error::InvalidArgument(format!("{what}: int4 zero points must be 0..=15")));
                    }
                }
                Ok(())
            }
            QuantData::Nvfp4 { packed, scales, global_scale } => {
                if !(global_scale.is_finite() && global_scale != 0.0) {
                    return Err(Error::InvalidArgument(format!("{what}: nvfp4 global scale {global_scale}")));
                }
                check("packed", packed.len(), r * c / 2)?;
                check("scales", scales.len(), r * c / 16)
            }
        }
    }

    /// The raw code of element (row, col): bf16 bits, an e4m3 byte or a nibble.
    fn code(&self, row: usize, col: usize) -> u16 {
        let i = row * self.cols + col;
        match self.data {
            QuantData::Bf16(d) => d[i].to_bits(),
            QuantData::Fp8 { data, .. } | QuantData::Fp8Block { data, .. } => data[i] as u16,
            QuantData::Int4 { packed, .. } | QuantData::Nvfp4 { packed, .. } => ((packed[i / 2] >> (4 * (i % 2))) & 15) as u16,
        }
    }

    /// The per-row multiplier the kernel applies in its epilogue (per-tensor fp8 scale, 1 / nvfp4 global).
    fn row_scale(&self) -> f32 {
        match self.data {
            QuantData::Fp8 { scale, .. } => scale,
            QuantData::Nvfp4 { global_scale, .. } => 1.0 / global_scale,
            _ => 1.0,
        }
    }
}

/// One expert's weights (or one dense matrix) in the kernel layout, all experts back to back.
///
/// Which scale array is present depends on the format:
///
/// ```
/// use small4::quant::repack::{repack_linear, MatrixRef, PackedWeights, ROW_ALIGN};
/// use small4::quant::{QuantizedMatrix, WeightFormat};
///
/// let q = QuantizedMatrix::quantize(WeightFormat::Fp8PerTensor, &vec![0.5f32; 8 * 64], 8, 64)?;
/// let packed: PackedWeights = repack_linear(&[MatrixRef::from(&q)])?;
/// assert_eq!((packed.format, packed.experts, packed.k_dim), (WeightFormat::Fp8PerTensor, 1, 64));
/// // Per-tensor FP8: the scale is applied per output row in the epilogue, padding rows get 0.
/// let row_scales = packed.row_scales.as_ref().unwrap();
/// assert_eq!(row_scales.len(), ROW_ALIGN);
/// assert!(row_scales[..8].iter().all(|&s| s == 0.5 / 448.0) && row_scales[8..].iter().all(|&s| s == 0.0));
/// assert!(packed.block_scales.is_none() && packed.group_scales.is_none() && packed.fp4_scales.is_none());
/// // What one expert costs to read: the codes (1 byte each, padded rows included) and its row scales.
/// assert_eq!(packed.bytes_per_expert(), ROW_ALIGN * 64 + 4 * ROW_ALIGN);
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PackedWeights {
    /// The weight format of every expert (all experts share it).
    pub format: WeightFormat,
    /// Experts (matrices) stored back to back; 1 for a dense matrix.
    pub experts: usize,
    /// Real output columns of the GEMM (for SwiGLU: the hidden size, half the packed rows in use).
    pub out_cols: usize,
    /// Packed rows per expert (multiple of [`ROW_ALIGN`]).
    pub rows_padded: usize,
    /// Reduction length.
    pub k_dim: usize,
    /// Rows interleaved as gate/up groups of 8 for the SwiGLU epilogue.
    pub swiglu: bool,
    /// Bytes per expert in `data`.
    pub expert_stride: usize,
    /// `[experts, expert_stride]` bytes: each expert's 16-row x 64-k tiles of codes in mma fragment lane order (the
    /// module doc), padding rows zero.
    pub data: Vec<u8>,
    /// [experts, rows_padded] (Fp8, Nvfp4).
    pub row_scales: Option<Vec<f32>>,
    /// [experts, k_dim / 128, rows_padded / 8] (Fp8Block128): a tile's two 8-row groups are adjacent.
    pub block_scales: Option<Vec<f32>>,
    /// [experts, rows_padded / 16, k_dim / group, 16] (Int4): one tile's 16 rows of a group are contiguous, so a
    /// warp's scale loads touch one sector instead of one per row.
    pub group_scales: Option<Vec<bf16>>,
    /// [experts, rows_padded / 16, k_dim / group, 16] zero points in 0..=15, laid out as `group_scales` (Int4 with
    /// zero points; padding rows hold 8).
    pub group_zeros: Option<Vec<u8>>,
    /// INT4 weights per group along K; 0 for the other formats.
    pub group: usize,
    /// [experts, rows_padded / 16, k_dim / 64, 16 rows, 4] e4m3 (Nvfp4): the scales of one 16x64 tile in 64 bytes.
    pub fp4_scales: Option<Vec<u8>>,
}

impl PackedWeights {
    /// Bytes of weights and scales for one expert: what a GEMM that touches the expert must read at least once.
    pub fn bytes_per_expert(&self) -> usize {
        let lens = [
            self.row_scales.as_ref().map(Vec::len),
            self.block_scales.as_ref().map(Vec::len),
            self.group_scales.as_ref().map(Vec::len),
            self.group_zeros.as_ref().map(Vec::len),
            self.fp4_scales.as_ref().map(Vec::len),
        ];
        packed_bytes_per_expert(self.expert_stride, self.experts, lens)
    }
}

/// Bytes of one expert's weights and scales, from the packed arrays' element counts (over all experts) in the order
/// row scales (f32), block scales (f32), group scales (bf16), group zero points (u8), fp4 scales (u8): what
/// [`PackedWeights::bytes_per_expert`] and the device-side copies of packed weights report.
pub(crate) fn packed_bytes_per_expert(expert_stride: usize, experts: usize, scale_lens: [Option<usize>; 5]) -> usize {
    let sizes = [4, 4, 2, 1, 1];
    expert_stride + scale_lens.iter().zip(sizes).map(|(len, size)| len.map_or(0, |l| l * size / experts)).sum::<usize>()
}

/// A packed row: which source matrix (0 = the only one / gate, 1 = up) and which of its rows; None = padding.
type RowSource = Option<(usize, usize)>;

/// Repacks a stack of plain linear layers `y = x W^T` (W [out, in]): the down projections, the shared expert's,
/// or a single dense matrix (one "expert"). See the module example; every expert must have the first one's format
/// and shape.
///
/// ```
/// use half::bf16;
/// use small4::quant::repack::{repack_linear, MatrixRef, QuantData};
///
/// let a = vec![bf16::ONE; 16 * 64];
/// let b = vec![bf16::ONE; 32 * 64];
/// let m = |rows, data| MatrixRef { rows, cols: 64, data: QuantData::Bf16(data) };
/// assert!(repack_linear(&[m(16, &a)]).is_ok());
/// assert!(repack_linear(&[m(16, &a), m(32, &b)]).is_err()); // shapes differ
/// assert!(repack_linear(&[]).is_err());
/// ```
pub fn repack_linear(experts: &[MatrixRef]) -> Result<PackedWeights> {
    let first = experts.first().ok_or_else(|| Error::InvalidArgument("repack_linear: no matrices".into()))?;
    let rows = first.rows;
    let rows_padded = rows.next_multiple_of(ROW_ALIGN);
    let sets: Vec<Vec<MatrixRef>> = experts.iter().map(|m| vec![*m]).collect();
    pack(&sets, true, rows, rows_padded, false, |r| (r < rows).then_some((0, r)))
}

/// Repacks the gate (w1) and up (w3) projections of each expert into one fused matrix, rows interleaved in groups
/// of 8 (see the module comment). `experts[e] = (w1, w3)`, each [hidden, dim].
///
/// ```
/// use half::bf16;
/// use small4::quant::repack::{repack_gate_up, MatrixRef, QuantData, ROW_ALIGN};
///
/// // hidden 8, dim 64: gate elements have the bit pattern 1, up elements 2.
/// let (gate, up) = (vec![bf16::from_bits(1); 8 * 64], vec![bf16::from_bits(2); 8 * 64]);
/// let m = |data| MatrixRef { rows: 8, cols: 64, data: QuantData::Bf16(data) };
/// let packed = repack_gate_up(&[(m(&gate), m(&up))])?;
/// assert!(packed.swiglu);
/// assert_eq!((packed.out_cols, packed.rows_padded), (8, ROW_ALIGN));
///
/// // Tile 0 = gate rows 0..8 then up rows 0..8: lane 0's fragment holds rows 0 and 8, so gate[0] and up[0].
/// let element = |at: usize| u16::from_le_bytes([packed.data[2 * at], packed.data[2 * at + 1]]);
/// assert_eq!([element(0), element(1), element(2), element(3)], [1, 1, 2, 2]);
/// # Ok::<(), small4::Error>(())
/// ```
pub fn repack_gate_up(experts: &[(MatrixRef, MatrixRef)]) -> Result<PackedWeights> {
    let (w1, _) = experts.first().ok_or_else(|| Error::InvalidArgument("repack_gate_up: no experts".into()))?;
    let hidden = w1.rows;
    if hidden % 8 != 0 {
        return Err(Error::InvalidArgument(format!("repack_gate_up: hidden {hidden} must be a multiple of 8")));
    }
    let rows_padded = (2 * hidden).next_multiple_of(ROW_ALIGN);
    let sets: Vec<Vec<MatrixRef>> = experts.iter().map(|(a, b)| vec![*a, *b]).collect();
    pack(&sets, true, hidden, rows_padded, true, |r| {
        let (tile, within) = (r / 16, r % 16);
        let row = tile * 8 + within % 8;
        (row < hidden).then_some((within / 8, row))
    })
}

/// Repacks matrices whose rows are stacked: each `experts[e]` is a list of parts (same format and columns), packed
/// as one matrix holding part 0's rows, then part 1's, and so on. Every expert must list parts of the same row
/// counts, and each part but the last a multiple of 16 rows (whole 16-row tiles; FP8 block-128 keeps every 8-row
/// scale group inside one part). It fuses two projections of the same input into one GEMM (MLA's `wq_a` and
/// `wkv_a_with_mqa`) and assembles a matrix from row pieces that carry their own block scales (a head's W_UV rows
/// of an FP8 block-128 `wkv_b`, which straddle two scale blocks).
///
/// ```
/// use half::bf16;
/// use small4::quant::repack::{repack_linear, repack_row_concat, MatrixRef, QuantData};
///
/// // [16, 64] of 1s above [8, 64] of 2s is the [24, 64] matrix of both.
/// let (a, b) = (vec![bf16::ONE; 16 * 64], vec![bf16::from_f32(2.0); 8 * 64]);
/// let m = |rows, data| MatrixRef { rows, cols: 64, data: QuantData::Bf16(data) };
/// let both: Vec<bf16> = a.iter().chain(&b).copied().collect();
/// assert_eq!(repack_row_concat(&[vec![m(16, &a), m(8, &b)]])?, repack_linear(&[m(24, &both)])?);
/// // A first part of 8 rows would split a 16-row tile between two parts:
/// assert!(repack_row_concat(&[vec![m(8, &b), m(16, &a)]]).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn repack_row_concat(experts: &[Vec<MatrixRef>]) -> Result<PackedWeights> {
    let first = experts.first().filter(|parts| !parts.is_empty()).ok_or_else(|| Error::InvalidArgument("repack_row_concat: no matrices".into()))?;
    let counts: Vec<usize> = first.iter().map(|m| m.rows).collect();
    if counts[..counts.len() - 1].iter().any(|r| r % 16 != 0) {
        return Err(Error::InvalidArgument(format!("repack_row_concat: parts of {counts:?} rows; every part but the last needs whole 16-row tiles")));
    }
    for (e, parts) in experts.iter().enumerate() {
        let rows: Vec<usize> = parts.iter().map(|m| m.rows).collect();
        if rows != counts {
            return Err(Error::shape(format!("repack_row_concat expert {e} parts"), format!("{counts:?} rows"), format!("{rows:?} rows")));
        }
    }
    let rows: usize = counts.iter().sum();
    let starts: Vec<usize> = counts.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
    pack(experts, false, rows, rows.next_multiple_of(ROW_ALIGN), false, |r| {
        (r < rows).then(|| {
            let part = starts.partition_point(|&s| s <= r) - 1;
            (part, r - starts[part])
        })
    })
}

/// The HF stacked layout `gate_up_proj` [E, 2 * hidden (gate rows then up rows), dim]: the (w1, w3) views of expert e.
///
/// ```
/// use half::bf16;
/// use small4::quant::repack::{split_gate_up, MatrixRef, QuantData};
///
/// // 2 experts, hidden 8, dim 64: row r of the stack holds the bit pattern r.
/// let stacked: Vec<bf16> = (0..32 * 64).map(|i| bf16::from_bits((i / 64) as u16)).collect();
/// let stack = MatrixRef { rows: 32, cols: 64, data: QuantData::Bf16(&stacked) };
/// let (w1, w3) = split_gate_up(stack, 2, 1)?;
/// let first_row = |m: MatrixRef| match m.data {
///     QuantData::Bf16(d) => d[0].to_bits(),
///     _ => unreachable!(),
/// };
/// // Expert 1's gate is stack rows 16..24, its up rows 24..32.
/// assert_eq!((w1.rows, first_row(w1)), (8, 16));
/// assert_eq!((w3.rows, first_row(w3)), (8, 24));
/// assert!(split_gate_up(stack, 2, 2).is_err()); // no expert 2
/// # Ok::<(), small4::Error>(())
/// ```
pub fn split_gate_up<'a>(stacked: MatrixRef<'a>, experts: usize, e: usize) -> Result<(MatrixRef<'a>, MatrixRef<'a>)> {
    if experts == 0 || e >= experts || stacked.rows % (2 * experts) != 0 {
        return Err(Error::InvalidArgument(format!("split_gate_up: expert {e} of {experts}, {} stacked rows", stacked.rows)));
    }
    let hidden = stacked.rows / experts / 2;
    let gate = slice_rows(stacked, e * 2 * hidden, hidden)?;
    let up = slice_rows(stacked, e * 2 * hidden + hidden, hidden)?;
    Ok((gate, up))
}

/// Rows [first, first + count) of a matrix, as a matrix (block-128 scales need 128-aligned slices).
///
/// ```
/// use small4::quant::repack::{slice_rows, MatrixRef, QuantData};
/// use small4::quant::{QuantizedMatrix, WeightFormat};
///
/// let weights: Vec<f32> = (0..4 * 64).map(|i| (i / 64) as f32).collect(); // row r holds r
/// let q = QuantizedMatrix::quantize(WeightFormat::Int4 { group: 64, zero_point: false }, &weights, 4, 64)?;
/// let rows = slice_rows(MatrixRef::from(&q), 2, 2)?;
/// let QuantData::Int4 { packed, scales, .. } = rows.data else { unreachable!() };
/// assert_eq!((rows.rows, packed.len(), scales.len()), (2, 2 * 32, 2)); // one group per row
/// assert!(slice_rows(MatrixRef::from(&q), 3, 2).is_err()); // past the end
/// # Ok::<(), small4::Error>(())
/// ```
pub fn slice_rows<'a>(m: MatrixRef<'a>, first: usize, count: usize) -> Result<MatrixRef<'a>> {
    if first + count > m.rows {
        return Err(Error::OutOfRange { what: "slice_rows end".into(), index: (first + count) as i64, limit: m.rows as i64 });
    }
    let c = m.cols;
    let range = |per_row: usize| first * per_row..(first + count) * per_row;
    let data = match m.data {
        QuantData::Bf16(d) => QuantData::Bf16(&d[range(c)]),
        QuantData::Fp8 { data, scale } => QuantData::Fp8 { data: &data[range(c)], scale },
        QuantData::Fp8Block { data, scales } => {
            if first % 128 != 0 {
                return Err(Error::InvalidArgument(format!("slice_rows: block-128 scales need a 128-aligned first row, got {first}")));
            }
            let per = c.div_ceil(128);
            let blocks = first / 128..(first + count).div_ceil(128);
            QuantData::Fp8Block { data: &data[range(c)], scales: &scales[blocks.start * per..blocks.end * per] }
        }
        QuantData::Int4 { packed, scales, zeros, group } => {
            QuantData::Int4 { packed: &packed[range(c / 2)], scales: &scales[range(c / group)], zeros: zeros.map(|z| &z[range(c / group)]), group }
        }
        QuantData::Nvfp4 { packed, scales, global_scale } => QuantData::Nvfp4 { packed: &packed[range(c / 2)], scales: &scales[range(c / 16)], global_scale },
    };
    Ok(MatrixRef { rows: count, cols: c, data })
}

/// Writes the fragment layout and the format's scale arrays for every expert. `sources[e]` are the expert's source
/// matrices (same format and columns; the same rows too when `same_rows`); `row_source` maps a packed row to
/// (matrix, row) or padding.
fn pack(
    sources: &[Vec<MatrixRef>],
    same_rows: bool,
    out_cols: usize,
    rows_padded: usize,
    swiglu: bool,
    row_source: impl Fn(usize) -> RowSource,
) -> Result<PackedWeights> {
    let reference = sources[0][0];
    let format = reference.data.format();
    let k_dim = reference.cols;
    let group = match reference.data {
        QuantData::Int4 { group, .. } => group,
        _ => 0,
    };
    for (e, set) in sources.iter().enumerate() {
        for (i, m) in set.iter().enumerate() {
            m.validate(&format!("expert {e} matrix {i}"))?;
            if m.data.format() != format || m.cols != k_dim || (same_rows && m.rows != reference.rows) {
                return Err(Error::shape(
                    format!("expert {e} matrix {i}"),
                    format!("{} {}x{}", format, reference.rows, k_dim),
                    format!("{} {}x{}", m.data.format(), m.rows, m.cols),
                ));
            }
        }
    }

    let experts = sources.len();
    let tiles = rows_padded / 16;
    let k_blocks = k_dim / K_ALIGN;
    let tile_bytes = tile_bytes(format);
    let expert_stride = tiles * k_blocks * tile_bytes;
    let mut data = vec![0u8; experts * expert_stride];
    let rows: Vec<RowSource> = (0..rows_padded).map(&row_source).collect();

    for (e, set) in sources.iter().enumerate() {
        let expert = &mut data[e * expert_stride..(e + 1) * expert_stride];
        for tile in 0..tiles {
            for kb in 0..k_blocks {
                let block = &mut expert[(tile * k_blocks + kb) * tile_bytes..][..tile_bytes];
                for lane in 0..32 {
                    let (g, t) = (lane / 4, lane % 4);
                    for ks in 0..K_ALIGN / 16 {
                        // The 8 elements of this lane's fragment at k-step ks, in register order.
                        let elements = [
                            (g, 2 * t),
                            (g, 2 * t + 1),
                            (g + 8, 2 * t),
                            (g + 8, 2 * t + 1),
                            (g, 2 * t + 8),
                            (g, 2 * t + 9),
                            (g + 8, 2 * t + 8),
                            (g + 8, 2 * t + 9),
                        ];
                        for (i, &(r, c)) in elements.iter().enumerate() {
                            let code = match rows[tile * 16 + r] {
                                Some((m, row)) => set[m].code(row, kb * K_ALIGN + ks * 16 + c),
                                None => 0,
                            };
                            match packed_bits(format) {
                                16 => {
                                    let at = (ks * 32 + lane) * 16 + 2 * i;
                                    block[at..at + 2].copy_from_slice(&code.to_le_bytes());
                                }
                                8 => block[((ks / 2) * 32 + lane) * 16 + (ks % 2) * 8 + i] = code as u8,
                                _ => block[lane * 16 + ks * 4 + i / 2] |= (code as u8) << (4 * (i % 2)),
                            }
                        }
                    }
                }
            }
        }
    }

    let per_row = |n: usize| experts * rows_padded * n;
    let mut packed = PackedWeights {
        format,
        experts,
        out_cols,
        rows_padded,
        k_dim,
        swiglu,
        expert_stride,
        data,
        row_scales: None,
        block_scales: None,
        group_scales: None,
        group_zeros: None,
        group,
        fp4_scales: None,
    };
    match format {
        WeightFormat::Bf16 => {}
        WeightFormat::Fp8PerTensor | WeightFormat::Nvfp4 => {
            let mut s = vec![0f32; per_row(1)];
            for (e, set) in sources.iter().enumerate() {
                for (r, src) in rows.iter().enumerate() {
                    if let Some((m, _)) = src {
                        s[e * rows_padded + r] = set[*m].row_scale();
                    }
                }
            }
            packed.row_scales = Some(s);
        }
        _ => {}
    }
    match format {
        WeightFormat::Fp8Block128 => {
            let kblocks = k_dim / 128;
            if k_dim % 128 != 0 {
                return Err(Error::InvalidArgument(format!("fp8 block-128: k {k_dim} must be a multiple of 128")));
            }
            let groups = rows_padded / 8;
            let mut s = vec![0f32; experts * groups * kblocks];
            for (e, set) in sources.iter().enumerate() {
                for gi in 0..groups {
                    // The 8 rows of a group come from one matrix and one aligned 8-row run: one 128-row block.
                    let Some((m, row)) = rows[gi * 8] else { continue };
                    let QuantData::Fp8Block { scales, .. } = set[m].data else { unreachable!() };
                    for kb in 0..kblocks {
                        s[(e * kblocks + kb) * groups + gi] = scales[(row / 128) * k_dim.div_ceil(128) + kb];
                    }
                }
            }
            packed.block_scales = Some(s);
        }
        WeightFormat::Int4 { .. } => {
            let per = k_dim / group;
            let mut s = vec![bf16::ZERO; per_row(per)];
            let mut z = matches!(reference.data, QuantData::Int4 { zeros: Some(_), .. }).then(|| vec![8u8; per_row(per)]);
            for (e, set) in sources.iter().enumerate() {
                for (r, src) in rows.iter().enumerate() {
                    let Some((m, row)) = *src else { continue };
                    let QuantData::Int4 { scales, zeros, .. } = set[m].data else { unreachable!() };
                    for gi in 0..per {
                        let at = ((e * tiles + r / 16) * per + gi) * 16 + r % 16;
                        s[at] = scales[row * per + gi];
                        if let (Some(z), Some(zeros)) = (z.as_mut(), zeros) {
                            z[at] = zeros[row * per + gi];
                        }
                    }
                }
            }
            packed.group_scales = Some(s);
            packed.group_zeros = z.take();
        }
        WeightFormat::Nvfp4 => {
            let per = k_dim / 16;
            let mut s = vec![0u8; per_row(per)];
            for (e, set) in sources.iter().enumerate() {
                for (r, src) in rows.iter().enumerate() {
                    let Some((m, row)) = *src else { continue };
                    let QuantData::Nvfp4 { scales, .. } = set[m].data else { unreachable!() };
                    for kb in 0..k_blocks {
                        let at = (((e * tiles + r / 16) * k_blocks + kb) * 16 + r % 16) * 4;
                        s[at..at + 4].copy_from_slice(&scales[row * per + kb * 4..][..4]);
                    }
                }
            }
            packed.fp4_scales = Some(s);
        }
        _ => {}
    }
    Ok(packed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fragment layout puts element (row, col) of a bf16 matrix where the kernel's lane reads it.
    #[test]
    fn bf16_fragments_land_where_the_lanes_read_them() {
        let (rows, cols) = (16, 64);
        let values: Vec<bf16> = (0..rows * cols).map(|i| bf16::from_f32(i as f32)).collect();
        let p = repack_linear(&[MatrixRef { rows, cols, data: QuantData::Bf16(&values) }]).unwrap();
        assert_eq!(p.rows_padded, 128);
        let read = |lane: usize, ks: usize, reg: usize, half: usize| {
            let at = (ks * 32 + lane) * 16 + reg * 4 + half * 2;
            bf16::from_bits(u16::from_le_bytes([p.data[at], p.data[at + 1]])).to_f32()
        };
        // lane 13: g = 3, t = 1; register 2 holds (g, 2t+8), (g, 2t+9) of k-step 2.
        let value = |row: usize, col: usize| bf16::from_f32((row * cols + col) as f32).to_f32();
        assert_eq!(read(13, 2, 2, 0), value(3, 32 + 10));
        assert_eq!(read(13, 2, 3, 1), value(3 + 8, 32 + 11));
    }

    #[test]
    fn gate_and_up_rows_interleave_in_groups_of_eight() {
        let (hidden, cols) = (16, 64);
        let gate: Vec<bf16> = (0..hidden * cols).map(|i| bf16::from_f32((i / cols) as f32 + 0.25)).collect();
        let up: Vec<bf16> = (0..hidden * cols).map(|i| bf16::from_f32(-((i / cols) as f32) - 0.5)).collect();
        let m = |d| MatrixRef { rows: hidden, cols, data: QuantData::Bf16(d) };
        let p = repack_gate_up(&[(m(&gate), m(&up))]).unwrap();
        let first = |tile: usize, lane: usize| {
            let at = tile * tile_bytes(p.format) + lane * 16;
            bf16::from_bits(u16::from_le_bytes([p.data[at], p.data[at + 1]])).to_f32()
        };
        // Tile 1, lane 4 * 5: row g = 5 of the tile = gate row 13; register 1 is row g + 8 = up row 13.
        assert_eq!(first(1, 20), 13.25);
        let at = tile_bytes(p.format) + 20 * 16 + 4;
        assert_eq!(bf16::from_bits(u16::from_le_bytes([p.data[at], p.data[at + 1]])).to_f32(), -13.5);
    }
}
