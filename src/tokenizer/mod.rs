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
//!
//! # Example
//!
//! A request in, a prompt's ids out; the ids a model generates back into reasoning and answer:
//!
//! ```
//! use small4::tokenizer::{parse_output, ChatRequest, Tokenizer};
//!
//! // The v15 stand-in of the Small 4 tokenizer is built in; `Tokenizer::from_model_dir` loads a model's own file.
//! let t = Tokenizer::stand_in()?;
//! let request = ChatRequest::single_turn(Some("Be brief."), "Hi", &[], Some("high"));
//! let prompt = t.encode_chat(&request)?;
//! assert_eq!(prompt.ids[0], t.bos_id());
//! assert_eq!(prompt.ids.last(), Some(&t.special_id("[/INST]")?));
//!
//! // What a model might answer (encoded here for the example).
//! let mut generated = vec![t.special_id("[THINK]")?];
//! t.encode_into("A greeting.", &mut generated);
//! generated.push(t.special_id("[/THINK]")?);
//! t.encode_into("Hello!", &mut generated);
//! generated.push(t.eos_id());
//! let output = parse_output(&t, &generated)?;
//! assert_eq!((output.reasoning.as_deref(), output.answer.as_str()), (Some("A greeting."), "Hello!"));
//! # Ok::<(), small4::Error>(())
//! ```

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
///
/// ```
/// use small4::tokenizer::{SpecialTokenPolicy, Tokenizer, TokenizerError};
/// use small4::Error;
///
/// let t = Tokenizer::stand_in_truncated(512, 64)?;
/// match t.decode(&[600], SpecialTokenPolicy::Ignore) {
///     Err(Error::Tokenizer(TokenizerError::IdOutOfRange { id, vocab_size })) => {
///         assert_eq!((id, vocab_size), (600, 512))
///     }
///     other => panic!("expected IdOutOfRange, got {other:?}"),
/// }
/// assert!(matches!(
///     t.decode(&[t.bos_id()], SpecialTokenPolicy::Raise),
///     Err(Error::Tokenizer(TokenizerError::SpecialTokenInText(1)))
/// ));
/// assert!(matches!(t.special_id("[NOPE]"), Err(Error::Tokenizer(TokenizerError::MissingSpecialToken(_)))));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// The tokenizer file is not valid JSON or not the tekken layout.
    #[error("tekken.json does not parse: {0}")]
    Parse(String),
    /// The file parses but is inconsistent (vocab too short, ranks out of order, bad base64, ...).
    #[error("invalid tekken.json: {0}")]
    InvalidFile(String),
    /// The file's `config.version` is none of the known versions; holds it.
    #[error("unknown tokenizer version {0:?} (known: v3, v7, v11, v13, v15)")]
    UnknownVersion(String),
    /// An id at or beyond the vocabulary size.
    #[error("token id {id} is out of range (vocabulary of {vocab_size})")]
    IdOutOfRange {
        /// The offending id.
        id: u32,
        /// The vocabulary size: special and ordinary ids together.
        vocab_size: usize,
    },
    /// A special token the operation needs is not in this tokenizer; holds its string (e.g. `[THINK]`).
    #[error("special token {0:?} is not in this tokenizer")]
    MissingSpecialToken(String),
    /// A special id met while decoding with [`SpecialTokenPolicy::Raise`]; holds the id.
    #[error("special token id {0} met while decoding with policy `raise`")]
    SpecialTokenInText(u32),
    /// The chat encoder was given a tokenizer of another version than v15.
    #[error("this tokenizer is {found}, the chat encoder needs {needed}")]
    UnsupportedVersion {
        /// This tokenizer's version (e.g. `v13`).
        found: String,
        /// The version the chat encoder needs (`v15`).
        needed: String,
    },
    /// The chat request breaks a validation rule (see [`chat::RequestError`]).
    #[error("invalid chat request: {0}")]
    InvalidRequest(#[from] chat::RequestError),
    /// An image could not be read or sized (bad data URL, unreadable file, not a PNG or JPEG, truncated header) or
    /// its `[IMG]` grid not built; holds why.
    #[error("image: {0}")]
    Image(String),
    /// Generated ids break the `[THINK]` structure (a nested `[THINK]`, a `[/THINK]` without one); holds why.
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
