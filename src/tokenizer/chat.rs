//! The chat request (OpenAI/Mistral JSON shape) and the v15 instruct encoder of SPEC-tokenizer.md section 5
//! (mistral-common's `InstructRequestNormalizerV15`, `MistralRequestValidatorV15` in test mode and
//! `InstructTokenizerV15`).
//!
//! `<s>[SYSTEM_PROMPT]s[/SYSTEM_PROMPT][AVAILABLE_TOOLS]T[/AVAILABLE_TOOLS][MODEL_SETTINGS]{..}[/MODEL_SETTINGS]`
//! `[INST]u[/INST][THINK]t[/THINK]a</s>[INST]u2[/INST]`
//!
//! # Example
//!
//! The worked example of section 8: one user message, the stand-in tokenizer's default reasoning effort.
//!
//! ```
//! use small4::tokenizer::{ChatRequest, SpecialTokenPolicy, Tokenizer};
//!
//! let t = Tokenizer::stand_in()?;
//! let request = ChatRequest::from_json(r#"{"model": "small4", "messages": [{"role": "user", "content": "Hi"}]}"#)?;
//! let prompt = t.encode_chat(&request)?;
//! assert_eq!(prompt.ids, [1, 36, 19227, 80277, 1302, 13196, 1609, 1449, 2811, 1429, 17670, 46005, 37, 3, 37133, 4]);
//! assert!(prompt.images.is_empty());
//! assert_eq!(
//!     t.decode(&prompt.ids, SpecialTokenPolicy::Keep)?,
//!     r#"<s>[MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS][INST]Hi[/INST]"#
//! );
//! # Ok::<(), small4::Error>(())
//! ```

use serde::{Deserialize, Serialize};
use tekken::config::TokenizerVersion;
use tekken::model_settings::ReasoningEffort;
use tekken::special_tokens::SpecialTokens;

use super::image::{image_token_ids, ImageSize};
use super::json::PyJson;
use super::{Tokenizer, TokenizerError};
use crate::Result;

/// A chat completion request. Fields other than these (`model`, `temperature`, ...) are accepted and ignored.
///
/// Built in code rather than parsed: a system prompt, an earlier turn with its reasoning, and a question about an
/// image (the image's size comes from the caller here, so no file is needed).
///
/// ```
/// use small4::tokenizer::chat::{Chunk, Content, ImageUrl, Message, PromptImage};
/// use small4::tokenizer::{ChatRequest, EncodedPrompt, ImageSize, SpecialTokenPolicy, Tokenizer};
///
/// let t = Tokenizer::stand_in()?;
/// let text = |s: &str| Content::Text(s.to_string());
/// let request = ChatRequest {
///     messages: vec![
///         Message::System { content: text("Be brief.") },
///         Message::User { content: text("Think hard.") },
///         Message::Assistant {
///             content: Some(Content::Chunks(vec![
///                 Chunk::Thinking { thinking: "ok".into(), closed: true },
///                 Chunk::Text { text: "Yes".into() },
///             ])),
///             tool_calls: None,
///             prefix: false,
///         },
///         Message::User {
///             content: Content::Chunks(vec![
///                 Chunk::Text { text: "What is this?".into() },
///                 Chunk::ImageUrl { image_url: ImageUrl::Object { url: "photo.png".into() } },
///             ]),
///         },
///     ],
///     tools: None,
///     reasoning_effort: Some("high".into()),
/// };
/// let EncodedPrompt { ids, images } = t.encode_chat_with(&request, &mut |url| {
///     assert_eq!(url, "photo.png");
///     Ok(ImageSize { width: 56, height: 28 })
/// })?;
///
/// // The image, moved before the text, is a 2 x 1 grid of [IMG] tokens closed by [IMG_END].
/// let [PromptImage { url, size, ids: range }] = &images[..] else { panic!("one image") };
/// assert_eq!((url.as_str(), *size), ("photo.png", ImageSize { width: 56, height: 28 }));
/// assert_eq!(ids[range.clone()], [t.special_id("[IMG]")?, t.special_id("[IMG]")?, t.special_id("[IMG_END]")?]);
/// assert_eq!(
///     t.decode(&ids, SpecialTokenPolicy::Keep)?,
///     concat!(
///         "<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT]",
///         r#"[MODEL_SETTINGS]{"reasoning_effort": "high"}[/MODEL_SETTINGS]"#,
///         "[INST]Think hard.[/INST][THINK]ok[/THINK]Yes</s>",
///         "[INST][IMG][IMG][IMG_END]What is this?[/INST]",
///     )
/// );
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatRequest {
    /// The conversation, oldest first (at least one message; the order rules are [`RequestError`]'s).
    pub messages: Vec<Message>,
    /// The tools the model may call, listed in `[AVAILABLE_TOOLS]` before the first user message; `None` or empty
    /// lists none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// One of the tokenizer file's allowed values (Small 4: `none` or `high`); unset means the file's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
}

/// One message of the conversation, tagged by its `role` in JSON (see [`ChatRequest`] for an example).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "lowercase")]
pub enum Message {
    /// `"role": "system"`: a system prompt, encoded in `[SYSTEM_PROMPT]..[/SYSTEM_PROMPT]`.
    System {
        /// The system prompt (text only).
        content: Content,
    },
    /// `"role": "user"`: a user turn, encoded in `[INST]..[/INST]` (consecutive user messages are merged).
    User {
        /// The user's text and images.
        content: Content,
    },
    /// `"role": "assistant"`: a model turn (reasoning, answer, tool calls), closed by `</s>` unless `prefix`.
    Assistant {
        /// The answer text, with `thinking` chunks for reasoning; may be `None` when the turn only calls tools.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        content: Option<Content>,
        /// The tools this turn called, each encoded `[TOOL_CALLS]name[ARGS]arguments` after the content.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tool_calls: Option<Vec<ToolCall>>,
        /// The message is the start of the answer to continue (only as the last message).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prefix: bool,
    },
    /// `"role": "tool"`: a tool's result, encoded in `[TOOL_RESULTS]..[/TOOL_RESULTS]`.
    Tool {
        /// What the tool returned (text and images).
        content: Content,
        /// The `id` of the call of the preceding assistant message this answers (required: non-empty, not `null`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tool_call_id: Option<String>,
        /// The called function's name (optional, `[a-zA-Z0-9_-]{1,64}` when given; not part of the prompt).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
}

/// A message's content: a string or a list of chunks.
///
/// ```
/// use small4::tokenizer::chat::{Chunk, Content, ImageUrl, Message};
/// use small4::tokenizer::ChatRequest;
///
/// // Both JSON shapes of content, and both shapes of image_url.
/// let request = ChatRequest::from_json(
///     r#"{"messages": [{"role": "user", "content": [
///         {"type": "image_url", "image_url": "a.png"},
///         {"type": "image_url", "image_url": {"url": "b.png"}},
///         {"type": "text", "text": "Compare."}]}]}"#,
/// )?;
/// let Message::User { content: Content::Chunks(chunks) } = &request.messages[0] else { panic!("user chunks") };
/// let urls: Vec<&str> = chunks
///     .iter()
///     .filter_map(|c| match c {
///         Chunk::ImageUrl { image_url } => Some(image_url.url()),
///         _ => None,
///     })
///     .collect();
/// assert_eq!(urls, ["a.png", "b.png"]);
/// assert_eq!(chunks[0], Chunk::ImageUrl { image_url: ImageUrl::Url("a.png".into()) });
/// assert_eq!(chunks[2], Chunk::Text { text: "Compare.".into() });
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// A plain string: `"content": "..."`.
    Text(String),
    /// A list of typed chunks: `"content": [{"type": ...}, ...]`.
    Chunks(Vec<Chunk>),
}

/// One piece of a [`Content::Chunks`] list, tagged by its `type` in JSON (see [`Content`] for an example). A
/// `thinking` chunk is only allowed in assistant messages; `closed: false` leaves its `[THINK]` open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Chunk {
    /// `{"type": "text", "text": ...}`: text.
    Text {
        /// The text.
        text: String,
    },
    /// `{"type": "image_url", "image_url": ...}`: an image, encoded as its `[IMG]` grid (user and tool messages).
    ImageUrl {
        /// Where the image is: a file path or a data URL, in either JSON shape.
        image_url: ImageUrl,
    },
    /// `{"type": "thinking", "thinking": ...}`: reasoning of an assistant message, encoded in `[THINK]..[/THINK]`.
    Thinking {
        /// The reasoning text.
        thinking: String,
        /// Whether `[/THINK]` closes the block (`true` when absent); `false` leaves it open for the model to go on.
        #[serde(default = "closed_by_default")]
        closed: bool,
    },
}

fn closed_by_default() -> bool {
    true
}

/// `"image_url": "URL"` (Mistral) or `"image_url": {"url": "URL"}` (OpenAI); URL is a file path or a data URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ImageUrl {
    /// The Mistral shape: the URL itself as a string.
    Url(String),
    /// The OpenAI shape: `{"url": URL}`.
    Object {
        /// The file path or data URL.
        url: String,
    },
}

impl ImageUrl {
    /// The URL, whichever shape it came in (see [`Content`] for an example).
    pub fn url(&self) -> &str {
        match self {
            ImageUrl::Url(url) | ImageUrl::Object { url } => url,
        }
    }
}

/// A tool call of an assistant message (earlier turns of a tool-using conversation).
///
/// ```
/// use small4::tokenizer::chat::{Arguments, Content, Function, FunctionCall, Message, ToolCall};
/// use small4::tokenizer::{ChatRequest, SpecialTokenPolicy, Tokenizer};
///
/// let t = Tokenizer::stand_in()?;
/// // The tools, as a client sends them (their JSON schema is kept as given).
/// let mut request = ChatRequest::from_json(
///     r#"{"tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
///         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
///         "messages": [{"role": "user", "content": "Weather in Paris?"}]}"#,
/// )?;
/// let tool = &request.tools.as_ref().unwrap()[0];
/// let Function { name, description, .. } = &tool.function;
/// assert_eq!(tool.kind, "function");
/// assert_eq!((name.as_str(), description.as_str()), ("get_weather", "Weather in a city"));
///
/// // The model's call and the tool's answer, appended in code.
/// let call = ToolCall {
///     id: Some("call00001".into()),
///     function: FunctionCall { name: "get_weather".into(), arguments: Arguments::Text(r#"{"city":"Paris"}"#.into()) },
/// };
/// request.messages.push(Message::Assistant { content: None, tool_calls: Some(vec![call]), prefix: false });
/// request.messages.push(Message::Tool {
///     content: Content::Text("21 C".into()),
///     tool_call_id: Some("call00001".into()),
///     name: None,
/// });
///
/// let prompt = t.decode(&t.encode_chat(&request)?.ids, SpecialTokenPolicy::Keep)?;
/// assert!(prompt.starts_with(r#"<s>[AVAILABLE_TOOLS][{"type": "function", "function": {"name": "get_weather""#));
/// // The arguments are re-serialised as Python's json.dumps writes them; the call id is not part of a v15 prompt.
/// assert!(prompt.ends_with(concat!(
///     r#"[INST]Weather in Paris?[/INST][TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>"#,
///     "[TOOL_RESULTS]21 C[/TOOL_RESULTS]",
/// )));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The call's id, quoted by the tool message that answers it as `tool_call_id` (required: non-empty, not
    /// `null`, unique within the message; not part of a v15 prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The function called and its arguments.
    pub function: FunctionCall,
}

/// The function a [`ToolCall`] calls and its arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// The called function's name, `[a-zA-Z0-9_-]{1,64}`.
    pub name: String,
    /// A JSON string (OpenAI) or a JSON object (Mistral).
    #[serde(default)]
    pub arguments: Arguments,
}

/// Call arguments as the request gave them: a JSON string (OpenAI) or a JSON value (Mistral). Both encode the same.
///
/// ```
/// use small4::tokenizer::chat::{Arguments, Message};
/// use small4::tokenizer::ChatRequest;
///
/// let request = ChatRequest::from_json(
///     r#"{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
///         {"id": "a1", "function": {"name": "f", "arguments": "{\"n\": 1}"}},
///         {"id": "a2", "function": {"name": "f", "arguments": {"n": 1}}}]}]}"#,
/// )?;
/// let Message::Assistant { tool_calls: Some(calls), .. } = &request.messages[1] else { panic!("a tool call") };
/// assert_eq!(calls[0].function.arguments, Arguments::Text(r#"{"n": 1}"#.into()));
/// assert!(matches!(calls[1].function.arguments, Arguments::Json(_)));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Arguments {
    /// The arguments as a JSON text (OpenAI); empty means `{}`, text that is not JSON is encoded as a JSON string.
    Text(String),
    /// The arguments as a JSON value (Mistral), object keys in the request's order.
    Json(PyJson),
}

impl Default for Arguments {
    fn default() -> Self {
        Arguments::Text(String::new())
    }
}

/// A tool the model may call (`"type": "function"`), listed in `[AVAILABLE_TOOLS]`; see [`ToolCall`] for an example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// The tool's `type` in JSON, `"function"` when absent.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function the model may call.
    pub function: Function,
}

fn function_type() -> String {
    "function".into()
}

/// A tool's function: its name, description and JSON-schema parameters (kept in the request's key order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Function {
    /// The function's name, as the model will call it.
    pub name: String,
    /// What the function does, for the model (empty when absent).
    #[serde(default)]
    pub description: String,
    /// The JSON schema of the arguments, kept as given (key order included).
    pub parameters: PyJson,
}

/// Why a request cannot be encoded (mistral-common's validator and normaliser rules).
///
/// It reaches the caller as `Error::Tokenizer(TokenizerError::InvalidRequest(..))`:
///
/// ```
/// use small4::tokenizer::chat::RequestError;
/// use small4::tokenizer::{ChatRequest, Tokenizer, TokenizerError};
/// use small4::Error;
///
/// let t = Tokenizer::stand_in()?;
/// let error = |request: &ChatRequest| match t.encode_chat(request) {
///     Err(Error::Tokenizer(TokenizerError::InvalidRequest(e))) => e,
///     other => panic!("expected a request error, got {other:?}"),
/// };
/// assert_eq!(error(&ChatRequest::default()), RequestError::Empty);
/// let medium = ChatRequest::single_turn(None, "Hi", &[], Some("medium"));
/// assert!(matches!(error(&medium), RequestError::InvalidReasoningEffort { value, .. } if value == "medium"));
/// let ends_with_assistant = ChatRequest::from_json(
///     r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#,
/// )?;
/// assert_eq!(error(&ends_with_assistant), RequestError::LastMessage("assistant"));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request has no message.
    #[error("the conversation has no message")]
    Empty,
    /// The only message is neither user nor system; holds its role.
    #[error("a conversation of one message must be a user or system message, got {0}")]
    LoneMessage(&'static str),
    /// A message whose role cannot follow the one before (tool after system or user, system after assistant or
    /// tool).
    #[error("role {role} cannot follow role {after}")]
    UnexpectedRole {
        /// The offending message's role.
        role: &'static str,
        /// The role of the message before it.
        after: &'static str,
    },
    /// The last of several messages is not user, tool or assistant with `prefix: true`; holds its role.
    #[error("the last message must be user or tool, or assistant with prefix=true; got {0}")]
    LastMessage(&'static str),
    /// An assistant message with `prefix: true` is not the last message.
    #[error("an assistant message with prefix=true must be the last message")]
    PrefixNotLast,
    /// An assistant turn (consecutive assistant messages merged) has neither content nor tool calls.
    #[error("an assistant message needs content or tool calls")]
    EmptyAssistant,
    /// A chunk type the role does not accept (system: text; user, tool: text, image_url; assistant: text,
    /// thinking).
    #[error("a {role} message cannot contain a {chunk} chunk")]
    ChunkNotAllowed {
        /// The message's role.
        role: &'static str,
        /// The chunk's type: `text`, `image_url` or `thinking`.
        chunk: &'static str,
    },
    /// A tool call or tool message without a valid id (absent, empty or `null`); holds the message's index.
    #[error("tool call id must be a non-empty string other than 'null' (message {0})")]
    MissingToolCallId(usize),
    /// A function name (of a tool call or a tool message) outside `[a-zA-Z0-9_-]{1,64}`; holds the name.
    #[error("function name {0:?} must match [a-zA-Z0-9_-]{{1,64}}")]
    InvalidFunctionName(String),
    /// Two tool calls of one assistant message share this id.
    #[error("tool call id {0:?} appears twice in one assistant message")]
    DuplicateToolCallId(String),
    /// A tool message answers this id, which no call of the preceding assistant message has.
    #[error("tool result for id {0:?} answers no pending tool call")]
    UnexpectedToolResult(String),
    /// Two tool messages answer this same call id.
    #[error("tool result for id {0:?} is given twice")]
    DuplicateToolResult(String),
    /// An assistant message comes before every call of the previous assistant message has its result.
    #[error("not the same number of tool calls and tool results")]
    ToolResultsMismatch,
    /// `reasoning_effort` is not one of the tokenizer file's allowed values.
    #[error("reasoning_effort {value:?} is not allowed; allowed: {allowed}")]
    InvalidReasoningEffort {
        /// The requested value.
        value: String,
        /// The allowed values, `|`-separated (Small 4: `none|high`).
        allowed: String,
    },
    /// The request has an image but the tokenizer file has no image config.
    #[error("images need a tokenizer with an image config")]
    NoImageSupport,
}

/// The ids of an encoded prompt and where its images are (see [`ChatRequest`] for an example).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPrompt {
    /// The prompt's token ids, `<s>` first.
    pub ids: Vec<u32>,
    /// The prompt's images, in the order their ids appear in `ids`.
    pub images: Vec<PromptImage>,
}

/// One image of a prompt: its source, its size and the range of its `[IMG]..[IMG_END]` ids in `ids` (see
/// [`ChatRequest`] for an example).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptImage {
    /// The image's URL as the request gave it (a file path or a data URL).
    pub url: String,
    /// Its size in pixels, which sets its `[IMG]` grid.
    pub size: ImageSize,
    /// The positions of its `[IMG]`..`[IMG_END]` ids in [`EncodedPrompt`]'s `ids`.
    pub ids: std::ops::Range<usize>,
}

impl ChatRequest {
    /// Parses a request from JSON (see the module example); malformed JSON is an `Error::Json`.
    ///
    /// ```
    /// use small4::tokenizer::ChatRequest;
    ///
    /// assert!(matches!(ChatRequest::from_json("{\"messages\": 3}"), Err(small4::Error::Json { .. })));
    /// ```
    pub fn from_json(text: &str) -> Result<ChatRequest> {
        serde_json::from_str(text).map_err(|e| crate::Error::Json { what: "chat request".into(), source: e })
    }

    /// A one-turn request as the `generate` command builds it: an optional system prompt, then one user message with
    /// the images first and the text after (the order mistral-common puts a [text, image] pair in).
    ///
    /// ```
    /// use small4::tokenizer::ChatRequest;
    ///
    /// let request = ChatRequest::single_turn(Some("Be brief."), "Describe.", &["cat.png".to_string()], Some("high"));
    /// let same = ChatRequest::from_json(
    ///     r#"{"reasoning_effort": "high", "messages": [{"role": "system", "content": "Be brief."},
    ///         {"role": "user", "content": [{"type": "image_url", "image_url": "cat.png"},
    ///             {"type": "text", "text": "Describe."}]}]}"#,
    /// )?;
    /// assert_eq!(request, same);
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn single_turn(system: Option<&str>, prompt: &str, images: &[String], reasoning_effort: Option<&str>) -> Self {
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(Message::System { content: Content::Text(system.to_string()) });
        }
        let content = if images.is_empty() {
            Content::Text(prompt.to_string())
        } else {
            let mut chunks: Vec<Chunk> = images.iter().map(|url| Chunk::ImageUrl { image_url: ImageUrl::Url(url.clone()) }).collect();
            chunks.push(Chunk::Text { text: prompt.to_string() });
            Content::Chunks(chunks)
        };
        messages.push(Message::User { content });
        ChatRequest { messages, tools: None, reasoning_effort: reasoning_effort.map(str::to_string) }
    }
}

impl Message {
    fn role(&self) -> &'static str {
        match self {
            Message::System { .. } => "system",
            Message::User { .. } => "user",
            Message::Assistant { .. } => "assistant",
            Message::Tool { .. } => "tool",
        }
    }
}

impl Chunk {
    fn kind(&self) -> &'static str {
        match self {
            Chunk::Text { .. } => "text",
            Chunk::ImageUrl { .. } => "image_url",
            Chunk::Thinking { .. } => "thinking",
        }
    }
}

/// The control ids the v15 prompt uses, looked up by string.
struct PromptIds {
    begin_inst: u32,
    end_inst: u32,
    begin_system: u32,
    end_system: u32,
    begin_tools: u32,
    end_tools: u32,
    begin_tool_results: u32,
    end_tool_results: u32,
    tool_calls: u32,
    args: u32,
    begin_think: u32,
    end_think: u32,
    begin_settings: u32,
    end_settings: u32,
}

impl PromptIds {
    fn resolve(t: &Tokenizer) -> Result<PromptIds> {
        let id = |token: SpecialTokens| t.special_id(token.as_str());
        Ok(PromptIds {
            begin_inst: id(SpecialTokens::BeginInst)?,
            end_inst: id(SpecialTokens::EndInst)?,
            begin_system: id(SpecialTokens::BeginSystem)?,
            end_system: id(SpecialTokens::EndSystem)?,
            begin_tools: id(SpecialTokens::BeginTools)?,
            end_tools: id(SpecialTokens::EndTools)?,
            begin_tool_results: id(SpecialTokens::BeginToolResults)?,
            end_tool_results: id(SpecialTokens::EndToolResults)?,
            tool_calls: id(SpecialTokens::ToolCalls)?,
            args: id(SpecialTokens::Args)?,
            begin_think: id(SpecialTokens::BeginThink)?,
            end_think: id(SpecialTokens::EndThink)?,
            begin_settings: id(SpecialTokens::BeginModelSettings)?,
            end_settings: id(SpecialTokens::EndModelSettings)?,
        })
    }
}

fn valid_function_name(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn valid_call_id(id: &Option<String>) -> bool {
    id.as_deref().is_some_and(|id| !id.is_empty() && id != "null")
}

/// mistral-common's validator (v15, test mode) on the messages as given.
fn validate(messages: &[Message]) -> Result<(), RequestError> {
    let (first, last) = match (messages.first(), messages.last()) {
        (Some(first), Some(last)) => (first, last),
        _ => return Err(RequestError::Empty),
    };
    if messages.len() == 1 && !matches!(first, Message::User { .. } | Message::System { .. }) {
        return Err(RequestError::LoneMessage(first.role()));
    }
    if messages.len() > 1 {
        let continuation = matches!(last, Message::Assistant { prefix: true, .. });
        if !matches!(last, Message::User { .. } | Message::Tool { .. }) && !continuation {
            return Err(RequestError::LastMessage(last.role()));
        }
    }
    for pair in messages.windows(2) {
        let allowed = match (&pair[0], &pair[1]) {
            (Message::System { .. }, next) => !matches!(next, Message::Tool { .. }),
            (Message::User { .. }, next) => !matches!(next, Message::Tool { .. }),
            (Message::Assistant { .. }, next) => !matches!(next, Message::System { .. }),
            (Message::Tool { .. }, next) => !matches!(next, Message::System { .. }),
        };
        if !allowed {
            return Err(RequestError::UnexpectedRole { role: pair[1].role(), after: pair[0].role() });
        }
    }
    for (index, message) in messages.iter().enumerate() {
        let chunks_allowed = |content: &Content, role: &'static str, allowed: &[&str]| -> Result<(), RequestError> {
            if let Content::Chunks(chunks) = content {
                if let Some(chunk) = chunks.iter().find(|c| !allowed.contains(&c.kind())) {
                    return Err(RequestError::ChunkNotAllowed { role, chunk: chunk.kind() });
                }
            }
            Ok(())
        };
        match message {
            Message::System { content } => chunks_allowed(content, "system", &["text"])?,
            Message::User { content } => chunks_allowed(content, "user", &["text", "image_url"])?,
            Message::Tool { content, tool_call_id, name } => {
                chunks_allowed(content, "tool", &["text", "image_url"])?;
                if let Some(name) = name {
                    if !valid_function_name(name) {
                        return Err(RequestError::InvalidFunctionName(name.clone()));
                    }
                }
                if !valid_call_id(tool_call_id) {
                    return Err(RequestError::MissingToolCallId(index));
                }
            }
            Message::Assistant { content, tool_calls, prefix } => {
                if let Some(content) = content {
                    chunks_allowed(content, "assistant", &["text", "thinking"])?;
                }
                for call in tool_calls.iter().flatten() {
                    if !valid_function_name(&call.function.name) {
                        return Err(RequestError::InvalidFunctionName(call.function.name.clone()));
                    }
                    if !valid_call_id(&call.id) {
                        return Err(RequestError::MissingToolCallId(index));
                    }
                }
                if *prefix && index + 1 != messages.len() {
                    return Err(RequestError::PrefixNotLast);
                }
            }
        }
    }
    validate_tool_results(messages)
}

/// Every tool call of an assistant message is answered once by the tool messages that follow it, before the next
/// assistant message (mistral-common v11+ in test mode: a trailing assistant call may still be unanswered).
fn validate_tool_results(messages: &[Message]) -> Result<(), RequestError> {
    let mut expected: Vec<&str> = Vec::new();
    let mut observed: Vec<&str> = Vec::new();
    for message in messages.iter().skip(1) {
        match message {
            Message::Tool { tool_call_id, .. } => {
                let id = tool_call_id.as_deref().unwrap_or("");
                if observed.contains(&id) {
                    return Err(RequestError::DuplicateToolResult(id.to_string()));
                }
                if !expected.contains(&id) {
                    return Err(RequestError::UnexpectedToolResult(id.to_string()));
                }
                observed.push(id);
            }
            Message::Assistant { tool_calls, .. } => {
                if expected.len() != observed.len() {
                    return Err(RequestError::ToolResultsMismatch);
                }
                expected.clear();
                observed.clear();
                for call in tool_calls.iter().flatten() {
                    let id = call.id.as_deref().unwrap_or("");
                    if expected.contains(&id) {
                        return Err(RequestError::DuplicateToolCallId(id.to_string()));
                    }
                    expected.push(id);
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// A piece of content after normalisation.
#[derive(Debug, Clone)]
enum Part {
    Text(String),
    Image(String),
    Thinking { text: String, closed: bool },
}

/// A message after normalisation: consecutive user and assistant messages merged, tool results in call order.
#[derive(Debug)]
enum Turn {
    System(Vec<Part>),
    User(Vec<Part>),
    /// `text_only` content is a plain string: it loses trailing spaces.
    Assistant {
        parts: Vec<Part>,
        text_only: bool,
        calls: Vec<(String, String)>,
        prefix: bool,
    },
    Tool {
        parts: Vec<Part>,
        call_id: String,
    },
}

/// mistral-common's `_aggregate_content_chunks_impl`: text of different messages joined by `\n\n`, text chunks of one
/// message by "" (v15); empty text skipped; other chunks kept in place.
fn aggregate(contents: &[&Content]) -> Vec<Part> {
    let mut parts = Vec::new();
    let mut text = String::new();
    let mut has_text = false;
    for content in contents {
        let needs_message_separator = has_text;
        match content {
            Content::Text(s) if s.is_empty() => {}
            Content::Text(s) => {
                if needs_message_separator {
                    text.push_str("\n\n");
                }
                text.push_str(s);
                has_text = true;
            }
            Content::Chunks(chunks) => {
                let mut first_of_message = true;
                for chunk in chunks {
                    match chunk {
                        Chunk::Text { text: t } if t.is_empty() => {}
                        Chunk::Text { text: t } => {
                            if has_text && needs_message_separator && first_of_message {
                                text.push_str("\n\n");
                            }
                            text.push_str(t);
                            has_text = true;
                            first_of_message = false;
                        }
                        other => {
                            if has_text {
                                parts.push(Part::Text(std::mem::take(&mut text)));
                                has_text = false;
                            }
                            first_of_message = false;
                            parts.push(match other {
                                Chunk::ImageUrl { image_url } => Part::Image(image_url.url().to_string()),
                                Chunk::Thinking { thinking, closed } => Part::Thinking { text: thinking.clone(), closed: *closed },
                                Chunk::Text { .. } => unreachable!("text chunks are handled above"),
                            });
                        }
                    }
                }
            }
        }
    }
    if has_text {
        parts.push(Part::Text(text));
    }
    parts
}

/// Python `json.loads` then `json.dumps` of call arguments, applied twice by mistral-common (normaliser, then
/// encoder): "" becomes `{}`, JSON is re-serialised, anything else becomes a JSON string.
fn normalized_arguments(arguments: &Arguments) -> String {
    let text = match arguments {
        Arguments::Json(value) => value.dumps(),
        Arguments::Text(text) if text.is_empty() => "{}".to_string(),
        Arguments::Text(text) => text.clone(),
    };
    match PyJson::parse(&text) {
        Ok(value) => value.dumps(),
        Err(_) => PyJson::Str(text).dumps(),
    }
}

fn normalize(messages: &[Message]) -> Vec<Turn> {
    let mut turns = Vec::new();
    let mut latest_call_ids: Vec<String> = Vec::new();
    let mut i = 0;
    while i < messages.len() {
        let same_role = messages[i..].iter().take_while(|m| m.role() == messages[i].role()).count();
        let group = &messages[i..i + same_role];
        i += same_role;
        match &group[0] {
            Message::System { .. } => {
                for message in group {
                    if let Message::System { content } = message {
                        turns.push(Turn::System(aggregate(&[content])));
                    }
                }
            }
            Message::User { .. } => {
                let contents: Vec<&Content> = group
                    .iter()
                    .filter_map(|m| match m {
                        Message::User { content } => Some(content),
                        _ => None,
                    })
                    .collect();
                turns.push(Turn::User(aggregate(&contents)));
            }
            Message::Assistant { .. } => {
                let mut contents = Vec::new();
                let mut calls = Vec::new();
                let mut prefix = false;
                latest_call_ids.clear();
                for message in group {
                    if let Message::Assistant { content, tool_calls, prefix: p } = message {
                        contents.extend(content.iter());
                        for call in tool_calls.iter().flatten() {
                            calls.push((call.function.name.clone(), normalized_arguments(&call.function.arguments)));
                            latest_call_ids.push(call.id.clone().unwrap_or_default());
                        }
                        prefix |= *p;
                    }
                }
                let parts = aggregate(&contents);
                let text_only = parts.iter().all(|p| matches!(p, Part::Text(_)));
                turns.push(Turn::Assistant { parts, text_only, calls, prefix });
            }
            Message::Tool { .. } => {
                let mut results: Vec<(usize, Turn)> = group
                    .iter()
                    .enumerate()
                    .filter_map(|(position, m)| match m {
                        Message::Tool { content, tool_call_id, .. } => {
                            let call_id = tool_call_id.clone().unwrap_or_default();
                            Some((position, Turn::Tool { parts: aggregate(&[content]), call_id }))
                        }
                        _ => None,
                    })
                    .collect();
                // In the order of the calls; results answering no listed call keep their order at the end.
                let call_order = |turn: &Turn| match turn {
                    Turn::Tool { call_id, .. } => latest_call_ids.iter().position(|id| id == call_id).unwrap_or(usize::MAX),
                    _ => usize::MAX,
                };
                results.sort_by_key(|(position, turn)| (call_order(turn), *position));
                turns.extend(results.into_iter().map(|(_, turn)| turn));
                latest_call_ids.clear();
            }
        }
    }
    turns
}

impl Tokenizer {
    /// Encodes a chat request as a v15 prompt; image sizes are read from the files or data URLs (only the header is
    /// read: see [`ImageSize::from_url`]). Needs a v15 tokenizer.
    ///
    /// ```
    /// use small4::tokenizer::{ChatRequest, ImageSize, Tokenizer, TokenizerError, TEKKEN_240911_PATH};
    ///
    /// // A PNG header is enough to size the image: signature, IHDR length and tag, width 56, height 56.
    /// let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    /// png.extend(56u32.to_be_bytes());
    /// png.extend(56u32.to_be_bytes());
    /// let path = std::env::temp_dir().join(format!("small4-doc-encode-chat-{}.png", std::process::id()));
    /// std::fs::write(&path, &png)?;
    ///
    /// let t = Tokenizer::stand_in()?;
    /// let request = ChatRequest::single_turn(None, "What is it?", &[path.display().to_string()], None);
    /// let prompt = t.encode_chat(&request)?;
    /// std::fs::remove_file(&path)?;
    /// // 56 x 56 pixels: 2 x 2 tokens of 28 x 28, rows ended by [IMG_BREAK], the last by [IMG_END].
    /// let [img, brk, end] = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"].map(|s| t.special_id(s).unwrap());
    /// assert_eq!(prompt.images[0].size, ImageSize { width: 56, height: 56 });
    /// assert_eq!(prompt.ids[prompt.images[0].ids.clone()], [img, img, brk, img, img, end]);
    ///
    /// // The published tekken_240911.json is v3: it has no v15 chat template.
    /// let v3 = Tokenizer::from_file(TEKKEN_240911_PATH)?;
    /// assert!(matches!(
    ///     v3.encode_chat(&request),
    ///     Err(small4::Error::Tokenizer(TokenizerError::UnsupportedVersion { .. }))
    /// ));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn encode_chat(&self, request: &ChatRequest) -> Result<EncodedPrompt> {
        self.encode_chat_with(request, &mut |url| ImageSize::from_url(url))
    }

    /// As [`Tokenizer::encode_chat`], with the caller telling the size of each image URL (see [`ChatRequest`] for an
    /// example).
    pub fn encode_chat_with(&self, request: &ChatRequest, image_size: &mut dyn FnMut(&str) -> Result<ImageSize, TokenizerError>) -> Result<EncodedPrompt> {
        if self.version() != TokenizerVersion::V15 {
            return Err(TokenizerError::UnsupportedVersion { found: self.version().as_str().to_string(), needed: "v15".to_string() }.into());
        }
        let ids = PromptIds::resolve(self)?;
        validate(&request.messages)?;
        let settings = self.settings_json(request.reasoning_effort.as_deref())?;
        let turns = normalize(&request.messages);
        let first_user = turns.iter().position(|t| matches!(t, Turn::User(_)));

        let mut prompt = EncodedPrompt { ids: vec![self.bos_id()], images: Vec::new() };
        for (index, turn) in turns.iter().enumerate() {
            match turn {
                Turn::System(parts) => {
                    prompt.ids.push(ids.begin_system);
                    self.encode_parts(parts, &mut prompt, image_size)?;
                    prompt.ids.push(ids.end_system);
                }
                Turn::User(parts) => {
                    if Some(index) == first_user {
                        if let Some(tools) = request.tools.as_ref().filter(|t| !t.is_empty()) {
                            prompt.ids.push(ids.begin_tools);
                            self.encode_into(&tools_json(tools), &mut prompt.ids);
                            prompt.ids.push(ids.end_tools);
                        }
                        if let Some(settings) = &settings {
                            prompt.ids.push(ids.begin_settings);
                            self.encode_into(settings, &mut prompt.ids);
                            prompt.ids.push(ids.end_settings);
                        }
                    }
                    prompt.ids.push(ids.begin_inst);
                    self.encode_parts(&image_first(parts), &mut prompt, image_size)?;
                    prompt.ids.push(ids.end_inst);
                }
                Turn::Assistant { parts, text_only, calls, prefix } => {
                    if parts.is_empty() && calls.is_empty() {
                        return Err(RequestError::EmptyAssistant.into());
                    }
                    for part in parts {
                        match part {
                            Part::Text(text) if *text_only => self.encode_into(text.trim_end_matches(' '), &mut prompt.ids),
                            Part::Thinking { text, closed } => {
                                prompt.ids.push(ids.begin_think);
                                self.encode_into(text, &mut prompt.ids);
                                if *closed {
                                    prompt.ids.push(ids.end_think);
                                }
                            }
                            other => self.encode_parts(std::slice::from_ref(other), &mut prompt, image_size)?,
                        }
                    }
                    for (name, arguments) in calls {
                        prompt.ids.push(ids.tool_calls);
                        self.encode_into(name, &mut prompt.ids);
                        prompt.ids.push(ids.args);
                        self.encode_into(arguments, &mut prompt.ids);
                    }
                    if !prefix {
                        prompt.ids.push(self.eos_id());
                    }
                }
                Turn::Tool { parts, .. } => {
                    prompt.ids.push(ids.begin_tool_results);
                    self.encode_parts(parts, &mut prompt, image_size)?;
                    prompt.ids.push(ids.end_tool_results);
                }
            }
        }
        Ok(prompt)
    }

    /// The `[MODEL_SETTINGS]` JSON: the requested effort checked against the file's `model_settings_builder`, or its
    /// default. `None` when the resolved settings are empty (a builder with no default and no value).
    fn settings_json(&self, requested: Option<&str>) -> Result<Option<String>> {
        let Some(builder) = self.model_settings_builder() else {
            return Err(TokenizerError::InvalidFile("a v15 tokenizer needs a model_settings_builder".into()).into());
        };
        let allowed = || {
            let values = builder.reasoning_effort.as_ref().map(|b| b.values.clone()).unwrap_or_default();
            values.iter().map(|v| effort_name(*v)).collect::<Vec<_>>().join("|")
        };
        let reject = |value: &str| RequestError::InvalidReasoningEffort { value: value.to_string(), allowed: allowed() };
        let effort: Option<ReasoningEffort> = match requested {
            None => None,
            Some(value) => Some(serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|_| reject(value))?),
        };
        let settings = builder.build_settings(effort).map_err(|_| reject(requested.unwrap_or("unset")))?;
        Ok(settings.reasoning_effort.map(|effort| PyJson::Object(vec![("reasoning_effort".into(), PyJson::Str(effort_name(effort)))]).dumps()))
    }

    fn encode_parts(&self, parts: &[Part], prompt: &mut EncodedPrompt, image_size: &mut dyn FnMut(&str) -> Result<ImageSize, TokenizerError>) -> Result<()> {
        for part in parts {
            match part {
                Part::Text(text) => self.encode_into(text, &mut prompt.ids),
                Part::Image(url) => {
                    let encoder = self.image_encoder().ok_or(RequestError::NoImageSupport)?;
                    let size = image_size(url)?;
                    let start = prompt.ids.len();
                    prompt.ids.extend(image_token_ids(encoder, size)?);
                    prompt.images.push(PromptImage { url: url.clone(), size, ids: start..prompt.ids.len() });
                }
                Part::Thinking { .. } => unreachable!("validation admits thinking only in assistant messages"),
            }
        }
        Ok(())
    }
}

fn effort_name(effort: ReasoningEffort) -> String {
    match serde_json::to_value(effort) {
        Ok(serde_json::Value::String(name)) => name,
        _ => format!("{effort:?}").to_lowercase(),
    }
}

/// mistral-common puts an image that ends an otherwise all-text user message first.
fn image_first(parts: &[Part]) -> Vec<Part> {
    let mut parts = parts.to_vec();
    if parts.len() >= 2 && matches!(parts.last(), Some(Part::Image(_))) && parts[..parts.len() - 1].iter().all(|p| matches!(p, Part::Text(_))) {
        parts.rotate_right(1);
    }
    parts
}

/// `json.dumps([tool.model_dump(exclude strict)])`.
fn tools_json(tools: &[Tool]) -> String {
    PyJson::List(
        tools
            .iter()
            .map(|tool| {
                PyJson::Object(vec![
                    ("type".into(), PyJson::Str(tool.kind.clone())),
                    (
                        "function".into(),
                        PyJson::Object(vec![
                            ("name".into(), PyJson::Str(tool.function.name.clone())),
                            ("description".into(), PyJson::Str(tool.function.description.clone())),
                            ("parameters".into(), tool.function.parameters.clone()),
                        ]),
                    ),
                ])
            })
            .collect(),
    )
    .dumps()
}
