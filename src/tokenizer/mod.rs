//! Text in, text out: the tekken tokenizer and the v15 chat prompt (contract: shared/SPEC-tokenizer.md).
//!
//! - [`Tokenizer`]: loads a `tekken.json` (section 1), encodes text (section 2) and decodes ids (section 3).
//!   The `tekken` crate parses the file and supplies the version, special-token names, image grids and
//!   `model_settings_builder`; the BPE itself is ours (`bpe.rs`) because the crate's is slow and its decode rejects
//!   what the spec decodes lossily (measured in docs/perf.md, "Tokenizer throughput").
//! - [`chat`]: the OpenAI/Mistral-shaped chat request and the v15 instruct encoder (section 5) with typed validation
//!   errors; [`image`] reads an image's size from its header for the `[IMG]` grid (section 6).
//! - [`output`]: the incremental UTF-8-safe detokeniser and the parser of generated ids into reasoning, answer and
//!   tool calls.

// The BPE and the Python-style JSON of the prompt template are internals (public with the `internals` feature, for
// this repository's benches); the tokenizer, the chat prompt, images and output parsing are the API.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub mod bpe;
#[cfg(not(feature = "internals"))]
#[allow(dead_code, unreachable_pub)]
mod bpe;
pub mod chat;
pub mod image;
mod json;
pub mod output;
mod vocab;

pub use chat::{ChatRequest, EncodedPrompt};
pub use image::ImageSize;
pub use output::{parse_output, OutputEvent, OutputPrinter, OutputStream, ParsedOutput, StreamingDecoder, ToolCallOutput};
pub use tekken::special_tokens::SpecialTokenPolicy;
pub use vocab::{embedded_stand_in_json, Token, Tokenizer, TEKKEN_240911_PATH};

/// Everything that can go wrong in this module; wrapped into [`crate::Error::Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file is not valid JSON or not the tekken layout.
    #[error("tekken.json does not parse: {0}")]
    Parse(String),
    /// The file parses but is inconsistent (vocab too short, ranks out of order, bad base64, ...).
    #[error("invalid tekken.json: {0}")]
    InvalidFile(String),
    #[error("unknown tokenizer version {0:?} (known: v3, v7, v11, v13, v15)")]
    UnknownVersion(String),
    #[error("token id {id} is out of range (vocabulary of {vocab_size})")]
    IdOutOfRange { id: u32, vocab_size: usize },
    #[error("special token {0:?} is not in this tokenizer")]
    MissingSpecialToken(String),
    #[error("special token id {0} met while decoding with policy `raise`")]
    SpecialTokenInText(u32),
    #[error("this tokenizer is {found}, the chat encoder needs {needed}")]
    UnsupportedVersion { found: String, needed: String },
    #[error("invalid chat request: {0}")]
    InvalidRequest(#[from] chat::RequestError),
    #[error("image: {0}")]
    Image(String),
    #[error("generated ids do not parse: {0}")]
    InvalidOutput(String),
}

impl From<TokenizerError> for crate::Error {
    fn from(e: TokenizerError) -> Self {
        crate::Error::Tokenizer(e)
    }
}

impl From<chat::RequestError> for crate::Error {
    fn from(e: chat::RequestError) -> Self {
        crate::Error::Tokenizer(TokenizerError::InvalidRequest(e))
    }
}
