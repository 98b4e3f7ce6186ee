//! Typed tensor views: what every kernel entry point takes instead of a bare buffer plus sizes.
//!
//! A [`TensorView`] is a borrowed [`DeviceBuffer`] with a shape: the element type `T` is its dtype, the rank `N` is in
//! the type, the dims, an element offset and the stride between consecutive rows (the outermost dimension) travel with
//! it, and the buffer names its device. A view is checked once, when it is made: it must lie inside its buffer. The
//! kernels then read the sizes off their arguments and check that the arguments agree with each other (a weight
//! with `cols` elements for rows of `cols`, an output of the input's shape), so a caller never passes a row count
//! that disagrees with the memory behind it.
//!
//! Inner dimensions are packed; only rows may be strided (a head's slice of a `[tokens, heads, head_dim]` tensor, the
//! rope columns of a wider row). Views are `Copy`: pass them by value.
//!
//! ```
//! use half::bf16;
//! use small4::device::{simulator, DeviceBuffer};
//! use small4::kernels::DType;
//!
//! let device = simulator();
//! let buffer = DeviceBuffer::<bf16>::alloc(&device, 4 * 320)?;
//! let rows = buffer.view([4, 320])?; // 4 tokens of 320 values
//! assert_eq!((rows.dims(), rows.dtype(), rows.row_stride()), ([4, 320], DType::Bf16, 320));
//! let rope = rows.columns(256..320)?; // the last 64 values of each row, still 320 apart
//! assert_eq!((rope.dims(), rope.offset(), rope.row_stride()), ([4, 64], 256, 320));
//! assert!(!rope.is_packed());
//! assert!(buffer.view([5, 320]).is_err()); // more than the buffer holds: Error::Shape
//! # Ok::<(), small4::Error>(())
//! ```

use std::ops::Range;

use crate::device::{Device, DeviceBuffer, DeviceElement};
use crate::error::{Error, Result};

pub use crate::device::DType;

/// A borrowed, shaped, typed view of device memory: `N` dims, element `i0, i1, ..` at
/// `offset + i0 * row_stride + (i1 * dims[2] + i2) ...` of the buffer.
///
/// ```
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::kernels::{Matrix, TensorView, Vector};
///
/// let device = simulator();
/// let buffer = DeviceBuffer::<f32>::alloc(&device, 2 * 3 * 4)?;
/// // Head 1 of a [2 tokens, 3 heads, 4] tensor: rows 12 apart, starting 4 in.
/// let head: Matrix<f32> = TensorView::strided(&buffer, 4, [2, 4], 12)?;
/// assert_eq!((head.row_len(), head.row_stride(), head.is_packed()), (4, 12, false));
/// assert!(TensorView::strided(&buffer, 4, [2, 4], 3).is_err()); // a stride shorter than a row
/// assert!(TensorView::strided(&buffer, 16, [2, 4], 12).is_err()); // past the end of the buffer
///
/// // The checks a kernel makes on its arguments, each naming the argument in its error:
/// head.expect_dims("head", [2, 4])?;
/// assert!(matches!(head.expect_dims("head", [4, 2]), Err(small4::Error::Shape { .. })));
/// assert!(matches!(head.expect_packed("head"), Err(small4::Error::InvalidArgument(_))));
/// head.expect_aligned("head", 16)?; // 4 f32 in: 16 bytes past a buffer start
/// assert!(head.expect_aligned("head", 32).is_err());
/// head.expect_device("head", &device)?;
/// assert!(head.expect_device("head", &simulator()).is_err()); // another simulator instance
///
/// // Packed views reshape freely; as_matrix merges the inner dims and keeps the rows.
/// let tokens = buffer.view([2, 3, 4])?;
/// let flat: Vector<f32> = tokens.reshape([24])?;
/// assert_eq!(flat.dims(), [24]);
/// assert_eq!(tokens.as_matrix().dims(), [2, 12]);
/// assert!(tokens.reshape([5, 5]).is_err()); // 25 elements, not 24
/// assert!(head.reshape([8]).is_err()); // strided rows have no flat form
/// # Ok::<(), small4::Error>(())
/// ```
pub struct TensorView<'a, T: DeviceElement, const N: usize> {
    buffer: &'a DeviceBuffer<T>,
    offset: usize,
    dims: [usize; N],
    row_stride: usize,
}

/// A rank-1 view: `[len]`.
pub type Vector<'a, T> = TensorView<'a, T, 1>;
/// A rank-2 view: `[rows, cols]`.
pub type Matrix<'a, T> = TensorView<'a, T, 2>;

impl<T: DeviceElement, const N: usize> Clone for TensorView<'_, T, N> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: DeviceElement, const N: usize> Copy for TensorView<'_, T, N> {}

impl<T: DeviceElement, const N: usize> std::fmt::Debug for TensorView<'_, T, N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}{:?}", T::DTYPE, self.dims)?;
        if !self.is_packed() || self.offset != 0 {
            write!(f, " (offset {}, row stride {})", self.offset, self.row_stride)?;
        }
        Ok(())
    }
}

fn product(dims: &[usize]) -> Option<usize> {
    dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

impl<'a, T: DeviceElement, const N: usize> TensorView<'a, T, N> {
    /// A view of `dims` at element `offset` of `buffer`, rows `row_stride` elements apart.
    ///
    /// `Error::InvalidArgument` for rank 0, a stride shorter than a row, or sizes that overflow; `Error::Shape` when
    /// the view does not lie inside the buffer.
    pub fn strided(buffer: &'a DeviceBuffer<T>, offset: usize, dims: [usize; N], row_stride: usize) -> Result<Self> {
        if N == 0 {
            return Err(Error::InvalidArgument("a tensor view needs at least one dimension".into()));
        }
        let row = product(&dims[1..]).ok_or_else(|| Error::InvalidArgument(format!("dims {dims:?} overflow")))?;
        if row_stride < row && dims[0] > 1 {
            return Err(Error::InvalidArgument(format!("row stride {row_stride} is shorter than a row of {row} elements")));
        }
        let end = match dims[0] {
            0 => Some(offset),
            rows => (rows - 1).checked_mul(row_stride).and_then(|v| v.checked_add(row)).and_then(|v| v.checked_add(offset)),
        };
        let end = end.ok_or_else(|| Error::InvalidArgument(format!("dims {dims:?} at offset {offset} overflow")))?;
        if product(&dims) != Some(0) && end > buffer.len() {
            return Err(Error::shape(format!("view {dims:?} (offset {offset}, row stride {row_stride})"), format!("a buffer of >= {end}"), buffer.len()));
        }
        Ok(TensorView { buffer, offset, dims, row_stride: if dims[0] <= 1 { row } else { row_stride } })
    }

    /// The dims, outermost first.
    pub fn dims(&self) -> [usize; N] {
        self.dims
    }
    /// Elements in the view (the product of the dims).
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }
    /// Whether the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The element type.
    pub fn dtype(&self) -> DType {
        T::DTYPE
    }
    /// The device the memory lives on.
    pub fn device(&self) -> &'a Device {
        self.buffer.device()
    }
    /// The buffer the view is of.
    pub fn buffer(&self) -> &'a DeviceBuffer<T> {
        self.buffer
    }
    /// Element index of the first value inside the buffer.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Elements from one row (index of the outermost dim) to the next.
    pub fn row_stride(&self) -> usize {
        self.row_stride
    }
    /// Elements of one row: the product of the inner dims.
    pub fn row_len(&self) -> usize {
        self.dims[1..].iter().product()
    }
    /// Whether the rows are back to back (no gap between them).
    pub fn is_packed(&self) -> bool {
        self.row_stride == self.row_len()
    }
    /// The device address of the first value.
    pub fn addr(&self) -> u64 {
        self.buffer.addr() + (self.offset * size_of::<T>()) as u64
    }
    /// [`Self::addr`] as the pointer type a parameter struct field has.
    pub fn ptr<P>(&self) -> *const P {
        self.addr() as *const P
    }
    /// [`Self::addr`] as a mutable pointer, for an output field of a parameter struct.
    pub fn mut_ptr<P>(&self) -> *mut P {
        self.addr() as *mut P
    }

    /// `Error::Shape` naming `what` unless the view's dims are `expected`.
    pub fn expect_dims(&self, what: &str, expected: [usize; N]) -> Result<()> {
        if self.dims != expected {
            return Err(Error::shape(what, format!("{expected:?}"), format!("{:?}", self.dims)));
        }
        Ok(())
    }

    /// `Error::InvalidArgument` naming `what` unless the rows are back to back (for kernels that take no stride).
    pub fn expect_packed(&self, what: &str) -> Result<()> {
        if !self.is_packed() {
            return Err(Error::InvalidArgument(format!("{what}: rows {} apart, the kernel needs them packed ({self:?})", self.row_stride)));
        }
        Ok(())
    }

    /// `Error::InvalidArgument` naming `what` unless the first value's address is a multiple of `bytes` (a kernel's
    /// vector loads: 16 for `uint4`). Views at offset 0 always are: buffers start on 256 bytes.
    pub fn expect_aligned(&self, what: &str, bytes: usize) -> Result<()> {
        if self.addr() % bytes as u64 != 0 {
            return Err(Error::InvalidArgument(format!("{what}: {self:?} must start on a {bytes}-byte boundary")));
        }
        Ok(())
    }

    /// `Error::InvalidArgument` naming `what` unless every row starts on a multiple of `bytes`: the first value's
    /// address and the row stride in bytes both are (a kernel that vector-loads each row of a strided view).
    pub fn expect_rows_aligned(&self, what: &str, bytes: usize) -> Result<()> {
        self.expect_aligned(what, bytes)?;
        if (self.row_stride * size_of::<T>()) % bytes != 0 {
            return Err(Error::InvalidArgument(format!("{what}: row stride {} of {self:?} must be a multiple of {bytes} bytes", self.row_stride)));
        }
        Ok(())
    }

    /// `Error::InvalidArgument` naming `what` unless the view is on `device` (the same backend instance).
    pub fn expect_device(&self, what: &str, device: &Device) -> Result<()> {
        if !std::sync::Arc::ptr_eq(self.device(), device) {
            return Err(Error::InvalidArgument(format!("{what} is on another device ({})", self.device().name())));
        }
        Ok(())
    }

    /// The rows `range` of the outermost dim (same stride).
    pub fn rows(&self, range: Range<usize>) -> Result<Self> {
        if range.start > range.end || range.end > self.dims[0] {
            return Err(Error::OutOfRange { what: format!("rows {range:?} of {self:?}"), index: range.end as i64, limit: self.dims[0] as i64 });
        }
        let mut dims = self.dims;
        dims[0] = range.len();
        Self::strided(self.buffer, self.offset + range.start * self.row_stride, dims, self.row_stride)
    }

    /// The same elements under other dims (packed views only; the element count must not change).
    pub fn reshape<const M: usize>(&self, dims: [usize; M]) -> Result<TensorView<'a, T, M>> {
        self.expect_packed("reshape")?;
        if product(&dims) != Some(self.len()) {
            return Err(Error::shape("reshape", format!("{} elements", self.len()), format!("{dims:?}")));
        }
        TensorView::strided(self.buffer, self.offset, dims, product(&dims[1.min(M)..]).unwrap_or(0))
    }
}

impl<'a, T: DeviceElement> TensorView<'a, T, 2> {
    /// The columns `range` of every row (same rows, same stride): a head's slice, the rope part of a wider row.
    pub fn columns(&self, range: Range<usize>) -> Result<Self> {
        if range.start > range.end || range.end > self.dims[1] {
            return Err(Error::OutOfRange { what: format!("columns {range:?} of {self:?}"), index: range.end as i64, limit: self.dims[1] as i64 });
        }
        Self::strided(self.buffer, self.offset + range.start, [self.dims[0], range.len()], self.row_stride)
    }
}

impl<'a, T: DeviceElement, const N: usize> TensorView<'a, T, N> {
    /// The view `[d0, d1 * .. * dN]`: rows kept (and their stride), the inner dims merged.
    pub fn as_matrix(&self) -> Matrix<'a, T> {
        TensorView { buffer: self.buffer, offset: self.offset, dims: [self.dims[0], self.row_len()], row_stride: self.row_stride }
    }
}

impl<T: DeviceElement> DeviceBuffer<T> {
    /// The first `product(dims)` elements as a packed view of `dims`; `Error::Shape` when the buffer holds fewer.
    ///
    /// ```
    /// use small4::device::{simulator, DeviceBuffer};
    ///
    /// let buffer = DeviceBuffer::<f32>::alloc(&simulator(), 12)?;
    /// assert_eq!(buffer.view([2, 3, 2])?.len(), 12);
    /// assert_eq!(buffer.view([2, 4])?.dims(), [2, 4]); // a prefix of a larger buffer is fine
    /// assert!(matches!(buffer.view([13]), Err(small4::Error::Shape { .. })));
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn view<const N: usize>(&self, dims: [usize; N]) -> Result<TensorView<'_, T, N>> {
        let row = product(&dims[1.min(N)..]).ok_or_else(|| Error::InvalidArgument(format!("dims {dims:?} overflow")))?;
        TensorView::strided(self, 0, dims, row)
    }

    /// The whole buffer as a vector view.
    pub fn as_vector(&self) -> Vector<'_, T> {
        TensorView { buffer: self, offset: 0, dims: [self.len()], row_stride: 1 }
    }
}
