//! The crate's one error type: every failure a caller can cause or meet is a variant here, never a panic.

use thiserror::Error;

/// Every failure of the crate, typed so a caller can tell a bad argument from a missing GPU or a broken checkpoint.
///
/// A call with a buffer of the wrong length returns [`Error::Shape`], naming what was checked:
///
/// ```
/// use small4::device::{simulator, DeviceBuffer};
/// use small4::Error;
///
/// let device = simulator();
/// let buffer = DeviceBuffer::<f32>::alloc(&device, 4)?;
/// let err = buffer.copy_from(&[1.0, 2.0, 3.0]).unwrap_err(); // 3 values into 4 elements
/// match &err {
///     Error::Shape { what, expected, got } => {
///         assert_eq!(what, "DeviceBuffer::copy_from");
///         assert_eq!((expected.as_str(), got.as_str()), ("4", "3"));
///     }
///     other => panic!("expected a shape error, got {other}"),
/// }
/// assert!(err.to_string().starts_with("shape mismatch in DeviceBuffer::copy_from"));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Debug, Error)]
pub enum Error {
    /// No usable GPU: the CUDA driver or NCCL library is missing, the driver cannot be initialised, or the device
    /// ordinal does not exist. Hardware-only tools turn it into a stated skip (`device::gpu_or_skip`).
    #[error("no GPU: {0}")]
    NoGpu(String),
    /// A CUDA driver or NCCL call failed on a present GPU (module load, launch, copy, graph capture, collective).
    #[error("CUDA driver error: {0}")]
    Cuda(String),
    /// The PTX interpreter refused a module or faulted a launch: out-of-bounds or uninitialised reads, shared-memory
    /// races, a double free, a PTX parse error.
    #[error("PTX interpreter error: {0}")]
    Simulator(String),
    /// An argument has the wrong length or dimensions: `what` names the argument or call, `expected` and `got` the
    /// sizes (element counts, or shapes such as `[tokens, dim]`).
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        /// The argument or operation that was checked.
        what: String,
        /// The size or shape it needed.
        expected: String,
        /// The size or shape it was given.
        got: String,
    },
    /// An argument is invalid other than by its shape or range (an empty batch, a null or misaligned address, a
    /// host operation inside a graph capture, a backend that cannot capture graphs).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A checkpoint tensor or quantisation format has a dtype this crate cannot load for that weight.
    #[error("unknown dtype {0:?}")]
    UnknownDtype(String),
    /// An index is past its limit: a token id beyond the vocabulary, a position beyond the context, an expert or
    /// page index beyond its table.
    #[error("index out of range: {what} = {index}, limit {limit}")]
    OutOfRange {
        /// What was indexed.
        what: String,
        /// The index given.
        index: i64,
        /// The exclusive bound it must stay under.
        limit: i64,
    },
    /// The model configuration is inconsistent or unsupported (a params.json / config.json field missing or out of
    /// range, or a plan that does not fit the configuration).
    #[error("configuration error: {0}")]
    Config(String),
    /// A checkpoint directory is malformed: no config file, a missing or duplicated tensor, a tensor of the wrong
    /// dtype, a truncated shard. (A tensor of the wrong shape is an [`Error::Shape`].)
    #[error("checkpoint error: {0}")]
    Checkpoint(String),
    /// The tokenizer failed (vocabulary file, chat template, encoding or decoding); see
    /// [`crate::tokenizer::TokenizerError`].
    #[error("tokenizer error: {0}")]
    Tokenizer(crate::tokenizer::TokenizerError),
    /// A sequence id that the KV cache or engine does not hold (never added, or already freed or finished).
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    /// The KV cache has too few free pages for a sequence to grow; nothing was allocated.
    #[error("out of KV-cache pages: need {needed}, {free} free")]
    OutOfPages {
        /// Pages the request needed.
        needed: usize,
        /// Pages free when it was refused.
        free: usize,
    },
    /// An image could not be read or decoded (missing file, unsupported format, remote URL, malformed data URL).
    #[error("image {path} cannot be read: {reason}")]
    ImageUnreadable {
        /// The file path, URL or "data URL" that was given.
        path: String,
        /// Why it could not be read.
        reason: String,
    },
    /// An image exceeds the tokenizer's limits, checked before it is decoded: the file size
    /// (`MAX_IMAGE_FILE_BYTES`) or the pixels per side (`MAX_IMAGE_SIDE`).
    #[error("image {path} is too large: {what}")]
    ImageTooLarge {
        /// The file path or "data URL" that was given.
        path: String,
        /// The limit it exceeds.
        what: String,
    },
    /// Reading or writing a file failed (a config, checkpoint shard, index or vocabulary).
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory involved.
        path: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// A JSON document did not parse or did not match the expected schema.
    #[error("JSON error in {what}: {source}")]
    Json {
        /// The document: its file path, or a description such as "token id array on stdin".
        what: String,
        /// serde_json's error, with line and column.
        source: serde_json::Error,
    },
}

/// The crate's result type: `Error` unless another is named.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A shape error from anything displayable.
    pub fn shape(what: impl Into<String>, expected: impl std::fmt::Display, got: impl std::fmt::Display) -> Self {
        Error::Shape { what: what.into(), expected: expected.to_string(), got: got.to_string() }
    }

    /// An [`Error::Io`] naming the path the failed operation was on.
    ///
    /// For `map_err` on a `std::io` call: the error keeps the OS error as its source and says which path it hit.
    ///
    /// ```
    /// use small4::Error;
    ///
    /// let path = std::env::temp_dir().join("small4-no-such-dir").join("params.json");
    /// let err = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e)).unwrap_err();
    /// match &err {
    ///     Error::Io { path: p, source } => {
    ///         assert_eq!(p, &path.display().to_string());
    ///         assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
    ///     }
    ///     other => panic!("expected an I/O error, got {other}"),
    /// }
    /// assert!(err.to_string().starts_with("I/O error on "));
    /// ```
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), source }
    }
}
