//! The crate's one error type: every failure a caller can cause or meet is a variant here, never a panic.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("no GPU: {0}")]
    NoGpu(String),
    #[error("CUDA driver error: {0}")]
    Cuda(String),
    #[error("PTX interpreter error: {0}")]
    Simulator(String),
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape { what: String, expected: String, got: String },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("unknown dtype {0:?}")]
    UnknownDtype(String),
    #[error("index out of range: {what} = {index}, limit {limit}")]
    OutOfRange { what: String, index: i64, limit: i64 },
    #[error("configuration error: {0}")]
    Config(String),
    #[error("checkpoint error: {0}")]
    Checkpoint(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(crate::tokenizer::TokenizerError),
    #[error("unknown sequence {0}")]
    UnknownSequence(u64),
    #[error("out of KV-cache pages: need {needed}, {free} free")]
    OutOfPages { needed: usize, free: usize },
    #[error("image {path} cannot be read: {reason}")]
    ImageUnreadable { path: String, reason: String },
    #[error("image {path} is too large: {what}")]
    ImageTooLarge { path: String, what: String },
    #[error("I/O error on {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("JSON error in {what}: {source}")]
    Json { what: String, source: serde_json::Error },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A shape error from anything displayable.
    pub fn shape(what: impl Into<String>, expected: impl std::fmt::Display, got: impl std::fmt::Display) -> Self {
        Error::Shape { what: what.into(), expected: expected.to_string(), got: got.to_string() }
    }

    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), source }
    }
}
