//! The output side: incremental detokenisation for streaming and the parser of generated ids (SPEC-tokenizer.md
//! section 5, "Output"): `[THINK]reasoning[/THINK]`?, answer text and/or `[TOOL_CALLS]name[ARGS]{json}`..., `</s>`.
//!
//! # Example
//!
//! Generated ids (made here by encoding the pieces a model would generate), parsed whole, then streamed to a printer
//! as they would arrive:
//!
//! ```
//! use small4::tokenizer::{parse_output, OutputPrinter, OutputStream, Tokenizer};
//!
//! let t = Tokenizer::stand_in()?;
//! let mut ids = vec![t.special_id("[THINK]")?];
//! t.encode_into("Sunny, says the forecast.", &mut ids);
//! ids.push(t.special_id("[/THINK]")?);
//! t.encode_into("It is sunny.", &mut ids);
//! ids.push(t.eos_id());
//!
//! let parsed = parse_output(&t, &ids)?;
//! assert_eq!(parsed.reasoning.as_deref(), Some("Sunny, says the forecast."));
//! assert!(parsed.reasoning_closed && parsed.finished);
//! assert_eq!(parsed.answer, "It is sunny.");
//! assert!(parsed.tool_calls.is_empty());
//!
//! let mut stream = OutputStream::new(&t)?;
//! let mut printer = OutputPrinter::new(Vec::new());
//! for &id in &ids {
//!     for event in stream.push(id)? {
//!         printer.print(&event)?;
//!     }
//! }
//! assert!(stream.finished());
//! for event in stream.finish() {
//!     printer.print(&event)?;
//! }
//! printer.finish()?;
//! let printed = String::from_utf8(printer.into_inner()).unwrap();
//! assert_eq!(printed, "[reasoning]\nSunny, says the forecast.\n[answer]\nIt is sunny.\n");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::Write;

use tekken::special_tokens::{SpecialTokenPolicy, SpecialTokens};

use super::vocab::Token;
use super::{Tokenizer, TokenizerError};
use crate::Result;

/// Turns ids into text one at a time. A character split across tokens is returned once its last byte arrives; the
/// concatenation of everything returned (plus [`StreamingDecoder::finish`]) equals [`Tokenizer::decode`] of all ids.
///
/// ```
/// use small4::tokenizer::{SpecialTokenPolicy, StreamingDecoder, Tokenizer};
///
/// let t = Tokenizer::stand_in()?;
/// // "€" as its three bytes, one id each (ordinary id = byte + 1000 for the byte ranks).
/// let euro: Vec<u32> = "€".bytes().map(|b| t.num_special_tokens() as u32 + b as u32).collect();
/// let mut decoder = StreamingDecoder::new(&t, SpecialTokenPolicy::Keep);
/// assert_eq!(decoder.push(euro[0])?, "");
/// assert_eq!(decoder.push(euro[1])?, "");
/// assert_eq!(decoder.push(euro[2])?, "€"); // complete at its last byte
/// assert_eq!(decoder.push(t.eos_id())?, "</s>"); // kept, by the policy
///
/// // A character cut off at the end is flushed as U+FFFD.
/// decoder.push(euro[0])?;
/// assert_eq!(decoder.finish(), "\u{fffd}");
/// // An id outside the vocabulary is an error.
/// assert!(decoder.push(t.vocab_size() as u32).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub struct StreamingDecoder<'t> {
    tokenizer: &'t Tokenizer,
    policy: SpecialTokenPolicy,
    pending: Vec<u8>,
}

impl<'t> StreamingDecoder<'t> {
    /// A decoder with nothing pending; `policy` says what special ids become (as in [`Tokenizer::decode`]).
    pub fn new(tokenizer: &'t Tokenizer, policy: SpecialTokenPolicy) -> Self {
        StreamingDecoder { tokenizer, policy, pending: Vec::new() }
    }

    /// The text that `id` completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        match self.tokenizer.token(id)? {
            Token::Bytes(bytes) => {
                self.pending.extend_from_slice(bytes);
                Ok(self.take_complete())
            }
            Token::Special(name) => {
                // A special id ends the run of ordinary bytes: what is incomplete becomes U+FFFD, as in `decode`.
                let mut text = self.finish();
                match self.policy {
                    SpecialTokenPolicy::Ignore => {}
                    SpecialTokenPolicy::Keep => text.push_str(name),
                    SpecialTokenPolicy::Raise => return Err(TokenizerError::SpecialTokenInText(id).into()),
                }
                Ok(text)
            }
        }
    }

    /// Everything still held, incomplete characters as U+FFFD.
    pub fn finish(&mut self) -> String {
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        text
    }

    /// The longest decodable prefix of the pending bytes, with invalid sequences as U+FFFD exactly as
    /// `String::from_utf8_lossy` would write them; an incomplete character at the end stays pending.
    fn take_complete(&mut self) -> String {
        let mut text = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(valid) => {
                    text.push_str(valid);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid_end = start + e.valid_up_to();
                    text.push_str(std::str::from_utf8(&self.pending[start..valid_end]).expect("checked valid"));
                    match e.error_len() {
                        Some(invalid) => {
                            text.push(char::REPLACEMENT_CHARACTER);
                            start = valid_end + invalid;
                        }
                        None => {
                            start = valid_end;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        text
    }
}

/// One generated tool call: `[TOOL_CALLS]name[ARGS]arguments`.
///
/// ```
/// use small4::tokenizer::{parse_output, Tokenizer};
///
/// let t = Tokenizer::stand_in()?;
/// let mut ids = Vec::new();
/// for (name, arguments) in [("get_weather", r#"{"city": "Paris"}"#), ("now", "not json")] {
///     ids.push(t.special_id("[TOOL_CALLS]")?);
///     t.encode_into(name, &mut ids);
///     ids.push(t.special_id("[ARGS]")?);
///     t.encode_into(arguments, &mut ids);
/// }
/// ids.push(t.eos_id());
///
/// let calls = parse_output(&t, &ids)?.tool_calls;
/// assert_eq!((calls[0].name.as_str(), calls[0].arguments.as_str()), ("get_weather", r#"{"city": "Paris"}"#));
/// // As JSON: arguments parsed when they are JSON, else kept as a string.
/// assert_eq!(calls[0].to_json(), serde_json::json!({"name": "get_weather", "arguments": {"city": "Paris"}}));
/// assert_eq!(calls[1].to_json(), serde_json::json!({"name": "now", "arguments": "not json"}));
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ToolCallOutput {
    /// The function's name: the text between `[TOOL_CALLS]` and `[ARGS]`.
    pub name: String,
    /// The argument text as generated (normally a JSON object).
    pub arguments: String,
}

impl ToolCallOutput {
    /// `{"name": ..., "arguments": ...}` with the arguments parsed when they are JSON, else kept as a string.
    pub fn to_json(&self) -> serde_json::Value {
        let arguments = serde_json::from_str(&self.arguments).unwrap_or_else(|_| serde_json::Value::String(self.arguments.clone()));
        serde_json::json!({ "name": self.name, "arguments": arguments })
    }
}

/// What a generated id adds, for printing as generation goes.
///
/// ```
/// use small4::tokenizer::{OutputEvent, OutputStream, Tokenizer};
///
/// let t = Tokenizer::stand_in()?;
/// // The id of a one-character text (one byte: one ordinary id).
/// let id = |c: &str| t.encode(c, false, false)[0];
/// let mut stream = OutputStream::new(&t)?;
/// assert!(stream.push(t.special_id("[THINK]")?)?.is_empty());
/// assert_eq!(stream.push(id("H"))?, [OutputEvent::Reasoning("H".into())]);
/// assert_eq!(stream.push(t.special_id("[/THINK]")?)?, [OutputEvent::ReasoningEnd]);
/// assert_eq!(stream.push(id("Y"))?, [OutputEvent::Answer("Y".into())]);
/// // A tool call is whole only when it ends: here at </s>.
/// for next in [t.special_id("[TOOL_CALLS]")?, id("f"), t.special_id("[ARGS]")?, id("{"), id("}")] {
///     assert!(stream.push(next)?.is_empty());
/// }
/// let events = stream.push(t.eos_id())?;
/// assert!(matches!(&events[..], [OutputEvent::ToolCall(call)] if call.name == "f" && call.arguments == "{}"));
/// assert!(stream.finished());
/// # Ok::<(), small4::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// A piece of reasoning text (inside a `[THINK]` block).
    Reasoning(String),
    /// `[/THINK]`: the reasoning is over.
    ReasoningEnd,
    /// A piece of answer text (outside `[THINK]` blocks, before the first `[TOOL_CALLS]`).
    Answer(String),
    /// A tool call, whole: emitted at the next `[TOOL_CALLS]`, at `</s>` or at [`OutputStream::finish`].
    ToolCall(ToolCallOutput),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Answer,
    Reasoning,
    ToolName,
    ToolArguments,
}

/// Parses generated ids as they come, following mistral-common's `detokenize_to_assistant_message`: everything from
/// the first `[TOOL_CALLS]` on is tool calls (name before `[ARGS]`); before it, `[THINK]`/`[/THINK]` delimit
/// reasoning (an unclosed `[THINK]` runs to the end); other special ids are dropped.
pub struct OutputStream<'t> {
    decoder: StreamingDecoder<'t>,
    channel: Channel,
    call: Option<ToolCallOutput>,
    ids: Ids,
    finished: bool,
}

struct Ids {
    eos: u32,
    tool_calls: u32,
    args: u32,
    begin_think: u32,
    end_think: u32,
}

impl<'t> OutputStream<'t> {
    /// A stream in the answer channel. Needs the v15 control tokens (`[TOOL_CALLS]`, `[ARGS]`, `[THINK]`,
    /// `[/THINK]`): a tokenizer without them is an error. See [`OutputEvent`] for an example.
    pub fn new(tokenizer: &'t Tokenizer) -> Result<Self> {
        let id = |token: SpecialTokens| tokenizer.special_id(token.as_str());
        Ok(OutputStream {
            decoder: StreamingDecoder::new(tokenizer, SpecialTokenPolicy::Ignore),
            channel: Channel::Answer,
            call: None,
            ids: Ids {
                eos: tokenizer.eos_id(),
                tool_calls: id(SpecialTokens::ToolCalls)?,
                args: id(SpecialTokens::Args)?,
                begin_think: id(SpecialTokens::BeginThink)?,
                end_think: id(SpecialTokens::EndThink)?,
            },
            finished: false,
        })
    }

    /// Whether `</s>` was the last id pushed.
    pub fn finished(&self) -> bool {
        self.finished
    }

    /// Feeds one generated id; returns what it completes.
    pub fn push(&mut self, id: u32) -> Result<Vec<OutputEvent>> {
        let mut events = Vec::new();
        let text = self.decoder.push(id)?;
        self.route(text, &mut events);
        self.finished = id == self.ids.eos;
        let in_tool_calls = matches!(self.channel, Channel::ToolName | Channel::ToolArguments);
        if id == self.ids.tool_calls {
            events.extend(self.call.take().map(OutputEvent::ToolCall));
            self.call = Some(ToolCallOutput::default());
            self.channel = Channel::ToolName;
        } else if id == self.ids.args && self.channel == Channel::ToolName {
            self.channel = Channel::ToolArguments;
        } else if id == self.ids.begin_think && !in_tool_calls {
            if self.channel == Channel::Reasoning {
                return Err(TokenizerError::InvalidOutput("nested [THINK]".into()).into());
            }
            self.channel = Channel::Reasoning;
        } else if id == self.ids.end_think && !in_tool_calls {
            if self.channel != Channel::Reasoning {
                return Err(TokenizerError::InvalidOutput("[/THINK] without [THINK]".into()).into());
            }
            self.channel = Channel::Answer;
            events.push(OutputEvent::ReasoningEnd);
        } else if self.finished {
            events.extend(self.call.take().map(OutputEvent::ToolCall));
        }
        Ok(events)
    }

    /// Ends the stream: flushes incomplete characters and an open tool call.
    pub fn finish(&mut self) -> Vec<OutputEvent> {
        let mut events = Vec::new();
        let text = self.decoder.finish();
        self.route(text, &mut events);
        events.extend(self.call.take().map(OutputEvent::ToolCall));
        events
    }

    fn route(&mut self, text: String, events: &mut Vec<OutputEvent>) {
        if text.is_empty() {
            return;
        }
        match self.channel {
            Channel::Answer => events.push(OutputEvent::Answer(text)),
            Channel::Reasoning => events.push(OutputEvent::Reasoning(text)),
            Channel::ToolName => self.call.get_or_insert_with(Default::default).name.push_str(&text),
            Channel::ToolArguments => self.call.get_or_insert_with(Default::default).arguments.push_str(&text),
        }
    }
}

/// Generated ids split into their parts, by [`parse_output`] (see the module example).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedOutput {
    /// The text of the `[THINK]` blocks, if there was one.
    pub reasoning: Option<String>,
    /// Whether the last `[THINK]` block was closed by `[/THINK]`.
    pub reasoning_closed: bool,
    /// The answer text: what was generated outside `[THINK]` blocks and before the first `[TOOL_CALLS]`, special
    /// ids dropped.
    pub answer: String,
    /// The tool calls, in the order generated (empty when there was no `[TOOL_CALLS]`).
    pub tool_calls: Vec<ToolCallOutput>,
    /// The last id is `</s>`: generation ended by itself.
    pub finished: bool,
}

/// Parses a complete list of generated ids (the same rules as [`OutputStream`], which it runs).
///
/// ```
/// use small4::tokenizer::{parse_output, ParsedOutput, Tokenizer};
///
/// let t = Tokenizer::stand_in()?;
/// // Just </s>: an empty answer, finished.
/// assert_eq!(parse_output(&t, &[t.eos_id()])?, ParsedOutput { finished: true, ..ParsedOutput::default() });
/// // Cut off by the token limit inside the reasoning: no </s>, an unclosed [THINK].
/// let mut ids = vec![t.special_id("[THINK]")?];
/// t.encode_into("Let me", &mut ids);
/// let parsed = parse_output(&t, &ids)?;
/// assert_eq!(parsed.reasoning.as_deref(), Some("Let me"));
/// assert!(!parsed.reasoning_closed && !parsed.finished);
/// assert_eq!(parsed.answer, "");
/// // [/THINK] with no [THINK] before it does not parse.
/// assert!(parse_output(&t, &[t.special_id("[/THINK]")?]).is_err());
/// # Ok::<(), small4::Error>(())
/// ```
pub fn parse_output(tokenizer: &Tokenizer, ids: &[u32]) -> Result<ParsedOutput> {
    let mut stream = OutputStream::new(tokenizer)?;
    let mut parsed = ParsedOutput::default();
    let absorb = |parsed: &mut ParsedOutput, events: Vec<OutputEvent>| {
        for event in events {
            match event {
                OutputEvent::Reasoning(text) => parsed.reasoning.get_or_insert_with(String::new).push_str(&text),
                OutputEvent::ReasoningEnd => parsed.reasoning_closed = true,
                OutputEvent::Answer(text) => parsed.answer.push_str(&text),
                OutputEvent::ToolCall(call) => parsed.tool_calls.push(call),
            }
        }
    };
    for &id in ids {
        if id == stream.ids.begin_think && stream.channel == Channel::Answer {
            parsed.reasoning.get_or_insert_with(String::new);
            parsed.reasoning_closed = false;
        }
        let events = stream.push(id)?;
        absorb(&mut parsed, events);
    }
    parsed.finished = stream.finished();
    let events = stream.finish();
    absorb(&mut parsed, events);
    Ok(parsed)
}

/// Prints a generation as it streams: reasoning apart from the answer (under a `[reasoning]` / `[answer]` header),
/// tool calls as one JSON object per line. A plain answer (no reasoning before it) is printed without a header.
///
/// ```
/// use small4::tokenizer::{OutputEvent, OutputPrinter, ToolCallOutput};
///
/// let mut printer = OutputPrinter::new(Vec::new());
/// printer.print(&OutputEvent::Answer("Let me check.".into()))?;
/// printer.print(&OutputEvent::ToolCall(ToolCallOutput { name: "now".into(), arguments: "{}".into() }))?;
/// printer.finish()?;
/// let printed = String::from_utf8(printer.into_inner()).unwrap();
/// assert_eq!(printed, "Let me check.\n[tool calls]\n{\"arguments\":{},\"name\":\"now\"}\n\n");
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct OutputPrinter<W: Write> {
    out: W,
    section: Option<&'static str>,
}

impl<W: Write> OutputPrinter<W> {
    /// A printer writing to `out`, nothing printed yet.
    pub fn new(out: W) -> Self {
        OutputPrinter { out, section: None }
    }

    /// Prints one event (opening its section first if it changed) and flushes.
    pub fn print(&mut self, event: &OutputEvent) -> std::io::Result<()> {
        match event {
            OutputEvent::Reasoning(text) => {
                self.enter("reasoning")?;
                write!(self.out, "{text}")?;
            }
            OutputEvent::ReasoningEnd => {}
            OutputEvent::Answer(text) => {
                // Whitespace between the reasoning and the answer would open an empty answer section.
                if self.section.is_none() || !text.trim().is_empty() || self.section == Some("answer") {
                    self.enter("answer")?;
                    write!(self.out, "{text}")?;
                }
            }
            OutputEvent::ToolCall(call) => {
                self.enter("tool calls")?;
                writeln!(self.out, "{}", call.to_json())?;
            }
        }
        self.out.flush()
    }

    /// The writer back, e.g. the `Vec<u8>` printed into.
    pub fn into_inner(self) -> W {
        self.out
    }

    /// Ends the output with a newline if anything was printed.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if self.section.is_some() {
            writeln!(self.out)?;
        }
        self.out.flush()
    }

    fn enter(&mut self, section: &'static str) -> std::io::Result<()> {
        if self.section != Some(section) {
            if self.section.is_some() {
                writeln!(self.out)?;
            }
            // A plain answer with no reasoning before it needs no header.
            if section != "answer" || self.section.is_some() {
                writeln!(self.out, "[{section}]")?;
            }
            self.section = Some(section);
        }
        Ok(())
    }
}
