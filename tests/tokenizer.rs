//! The tokenizer and the v15 chat prompt against SPEC-tokenizer.md: the worked examples of section 8, every
//! section-5 prompt shape against ids assembled by hand from the spec, every validation error, corrupt files, the
//! output parser and streaming, and round trips.

use std::sync::OnceLock;

use base64::Engine as _;
use proptest::prelude::*;
use small4::tokenizer::chat::{ChatRequest, RequestError};
use small4::tokenizer::{parse_output, OutputEvent, OutputStream, SpecialTokenPolicy, StreamingDecoder, Tokenizer, TokenizerError, TEKKEN_240911_PATH};
use small4::Error;

fn tekken_240911() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::from_file(TEKKEN_240911_PATH).expect("provisioned tekken_240911.json loads"))
}

fn stand_in() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::stand_in().expect("embedded stand-in loads"))
}

fn tiny() -> &'static Tokenizer {
    static T: OnceLock<Tokenizer> = OnceLock::new();
    T.get_or_init(|| Tokenizer::stand_in_truncated(512, 64).expect("truncated stand-in loads"))
}

/// The id of a special token of the stand-in, by its string.
fn sp(token: &str) -> u32 {
    stand_in().special_id(token).unwrap()
}

fn text(s: &str) -> Vec<u32> {
    stand_in().encode(s, false, false)
}

fn chat(json: &str) -> small4::Result<Vec<u32>> {
    let request = ChatRequest::from_json(json)?;
    stand_in()
        .encode_chat_with(&request, &mut |url| {
            // Tests name images by their size: "WxH.png".
            let (w, h) = url.trim_end_matches(".png").split_once('x').expect("test image urls are WxH.png");
            Ok(small4::tokenizer::ImageSize { width: w.parse().unwrap(), height: h.parse().unwrap() })
        })
        .map(|p| p.ids)
}

fn request_error(json: &str) -> RequestError {
    match chat(json) {
        Err(Error::Tokenizer(TokenizerError::InvalidRequest(e))) => e,
        other => panic!("expected a request error, got {other:?}"),
    }
}

/// `[MODEL_SETTINGS]{"reasoning_effort": "<effort>"}[/MODEL_SETTINGS]`
fn settings(effort: &str) -> Vec<u32> {
    [vec![sp("[MODEL_SETTINGS]")], text(&format!("{{\"reasoning_effort\": \"{effort}\"}}")), vec![sp("[/MODEL_SETTINGS]")]].concat()
}

fn inst(s: &str) -> Vec<u32> {
    [vec![sp("[INST]")], text(s), vec![sp("[/INST]")]].concat()
}

// ---- section 8: worked examples --------------------------------------------------------------------------------

#[test]
fn worked_examples_240911() {
    let t = tekken_240911();
    assert_eq!(t.encode("Hello, world!", false, false), [22177, 1044, 4304, 1033]);
    assert_eq!(t.encode("2026", false, false), [1050, 1048, 1050, 1054]);
    assert_eq!(t.encode(" [INST]", false, false), [1766, 3174, 3074, 1093]);
    assert_eq!(t.encode("héllo", false, false), [67679, 109232]);
    // The embedded file is the same BPE.
    assert_eq!(stand_in().encode("Hello, world!", false, false), [22177, 1044, 4304, 1033]);
}

#[test]
fn worked_example_user_hi() {
    let ids = chat(r#"{"messages": [{"role": "user", "content": "Hi"}]}"#).unwrap();
    assert_eq!(ids, [1, 36, 19227, 80277, 1302, 13196, 1609, 1449, 2811, 1429, 17670, 46005, 37, 3, 37133, 4]);
}

#[test]
fn worked_example_history_with_thinking() {
    let ids = chat(
        r#"{"reasoning_effort": "high", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Think hard."},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "ok"}, {"type": "text", "text": "Yes"}]},
            {"role": "user", "content": "Hi"}]}"#,
    )
    .unwrap();
    assert_eq!(
        ids,
        [
            1, 17, 5934, 13426, 1046, 18, 36, 19227, 80277, 1302, 13196, 1609, 1449, 2811, 1429, 24871, 46005, 37, 3, 99565, 5132, 1046, 4, 34, 1662, 35,
            16860, 2, 3, 37133, 4
        ]
    );
}

#[test]
fn worked_example_image() {
    let ids = chat(
        r#"{"messages": [{"role": "user", "content": [
            {"type": "text", "text": "What is in this image?"},
            {"type": "image_url", "image_url": {"url": "56x28.png"}}]}]}"#,
    )
    .unwrap();
    assert!(ids.ends_with(&[37, 3, 10, 10, 13, 7493, 1395, 1294, 1593, 3937, 1063, 4]), "{ids:?}");
}

#[test]
fn tokenizer_basics() {
    let t = stand_in();
    assert_eq!(t.version().as_str(), "v15");
    assert_eq!(t.vocab_size(), 131072);
    assert_eq!((t.bos_id(), t.eos_id()), (1, 2));
    for (id, name) in [(34, "[THINK]"), (35, "[/THINK]"), (36, "[MODEL_SETTINGS]"), (37, "[/MODEL_SETTINGS]")] {
        assert_eq!(t.special_id(name).unwrap(), id);
    }
    assert_eq!(t.special_id("<SPECIAL_500>").unwrap(), 500);
    // Typed special-token strings are plain text.
    assert!(t.encode("[INST]</s><s>[THINK]", false, false).iter().all(|&id| id >= 1000));
    assert_eq!(t.encode("a", true, true), [1, 1097, 2]);
}

// ---- decode ----------------------------------------------------------------------------------------------------

#[test]
fn decode_policies_and_lossy_runs() {
    let t = stand_in();
    let mut ids = vec![1];
    ids.extend(t.encode("Hi", false, false));
    ids.push(2);
    assert_eq!(t.decode(&ids, SpecialTokenPolicy::Ignore).unwrap(), "Hi");
    assert_eq!(t.decode(&ids, SpecialTokenPolicy::Keep).unwrap(), "<s>Hi</s>");
    assert!(matches!(t.decode(&ids, SpecialTokenPolicy::Raise), Err(Error::Tokenizer(TokenizerError::SpecialTokenInText(1)))));
    // A special id inside a character: each run is decoded alone, lossily: the lead byte gives one U+FFFD and each
    // stray continuation byte one more (as Python's errors="replace").
    let euro: Vec<u32> = "€".bytes().map(|b| 1000 + b as u32).collect();
    let split = [&euro[..1], &[3], &euro[1..]].concat();
    assert_eq!(t.decode(&split, SpecialTokenPolicy::Ignore).unwrap(), "\u{fffd}\u{fffd}\u{fffd}");
    assert_eq!(t.decode(&euro, SpecialTokenPolicy::Ignore).unwrap(), "€");
}

#[test]
fn out_of_range_id_is_a_typed_error() {
    for t in [stand_in(), tiny()] {
        let limit = t.vocab_size() as u32;
        for id in [limit, limit + 1, u32::MAX] {
            assert!(matches!(t.decode(&[id], SpecialTokenPolicy::Ignore), Err(Error::Tokenizer(TokenizerError::IdOutOfRange { .. }))));
            assert!(StreamingDecoder::new(t, SpecialTokenPolicy::Ignore).push(id).is_err());
        }
    }
}

// ---- files: corrupt, truncated, unknown version, truncation ---------------------------------------------------------

fn small_file(version: &str, specials: Option<&str>, ranks: usize) -> String {
    let vocab: Vec<String> = (0..ranks)
        .map(|r| {
            let bytes: Vec<u8> = if r < 256 { vec![r as u8] } else { vec![b'a', b'a' + (r - 256) as u8] };
            let b64 = base64::engine::general_purpose::STANDARD.encode(bytes);
            format!(r#"{{"rank": {r}, "token_bytes": "{b64}", "token_str": null}}"#)
        })
        .collect();
    let specials = specials.map(|s| format!(r#""special_tokens": {s},"#)).unwrap_or_default();
    format!(
        r#"{{{specials} "config": {{"pattern": "\\p{{L}}+|\\s+(?!\\S)|\\s+|.", "num_vocab_tokens": {ranks},
        "default_vocab_size": {}, "default_num_special_tokens": 20, "version": "{version}"}}, "vocab": [{}]}}"#,
        ranks + 20,
        vocab.join(",")
    )
}

fn file_error(json: &str) -> TokenizerError {
    match Tokenizer::from_json(json.as_bytes()) {
        Err(Error::Tokenizer(e)) => e,
        Err(other) => panic!("expected a tokenizer error, got {other:?}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn small_file_loads_and_round_trips() {
    let t = Tokenizer::from_json(small_file("v3", None, 260).as_bytes()).unwrap();
    assert_eq!(t.vocab_size(), 280);
    assert_eq!(t.special_id("[INST]").unwrap(), 3);
    let ids = t.encode("aab ab", false, false);
    // "aab": "aa" (rank 256) merges first, "aab" is no rank; " "; "ab" is rank 257 whole.
    assert_eq!(ids, [20 + 256, 20 + b'b' as u32, 20 + b' ' as u32, 20 + 257]);
    assert_eq!(t.decode(&ids, SpecialTokenPolicy::Ignore).unwrap(), "aab ab");
}

#[test]
fn corrupt_files_are_typed_errors() {
    let good = small_file("v3", None, 260);
    for cut in [0, 1, 10, good.len() / 2, good.len() - 1] {
        assert!(matches!(file_error(&good[..cut]), TokenizerError::Parse(_)), "cut at {cut}");
    }
    assert!(matches!(file_error("[1, 2, 3]"), TokenizerError::Parse(_)));
    assert!(matches!(file_error(&small_file("v99", None, 260)), TokenizerError::UnknownVersion(v) if v == "v99"));
    // A vocab shorter than default_vocab_size - default_num_special_tokens.
    let short = small_file("v3", None, 260).replace("\"default_vocab_size\": 280", "\"default_vocab_size\": 300");
    assert!(matches!(file_error(&short), TokenizerError::InvalidFile(_)));
    // Fewer than the 256 byte ranks.
    assert!(matches!(file_error(&small_file("v3", None, 200)), TokenizerError::InvalidFile(_)));
    // Bad base64, a byte rank with the wrong byte, ranks out of order.
    let bad = good.replacen("\"token_bytes\": \"AA==\"", "\"token_bytes\": \"@@@\"", 1);
    assert!(matches!(file_error(&bad), TokenizerError::InvalidFile(_)));
    let bad = good.replacen("\"token_bytes\": \"AA==\"", "\"token_bytes\": \"AQ==\"", 1);
    assert!(matches!(file_error(&bad), TokenizerError::InvalidFile(_)));
    let bad = good.replacen("\"rank\": 5,", "\"rank\": 6,", 1);
    assert!(matches!(file_error(&bad), TokenizerError::InvalidFile(_)));
    // v15 must list its special tokens; a listed rank must equal its position; no duplicates.
    assert!(matches!(file_error(&small_file("v15", None, 260)), TokenizerError::InvalidFile(_)));
    let specials = r#"[{"rank": 0, "token_str": "<unk>", "is_control": true}, {"rank": 2, "token_str": "<s>", "is_control": true}]"#;
    assert!(matches!(file_error(&small_file("v13", Some(specials), 260)), TokenizerError::InvalidFile(_)));
    let specials = r#"[{"rank": 0, "token_str": "<s>", "is_control": true}, {"rank": 1, "token_str": "<s>", "is_control": true}]"#;
    assert!(matches!(file_error(&small_file("v13", Some(specials), 260)), TokenizerError::InvalidFile(_)));
    // A listed file without </s>.
    let specials = r#"[{"rank": 0, "token_str": "<unk>", "is_control": true}, {"rank": 1, "token_str": "<s>", "is_control": true}]"#;
    assert!(matches!(file_error(&small_file("v13", Some(specials), 260)), TokenizerError::MissingSpecialToken(_)));
    // A broken pattern.
    let bad = good.replace(r#"\\p{L}+|"#, r#"(\\p{L}+|"#);
    assert!(matches!(file_error(&bad), TokenizerError::InvalidFile(_)));
    // Missing file.
    assert!(matches!(Tokenizer::from_file("/nonexistent/tekken.json"), Err(Error::Io { .. })));
}

#[test]
fn chat_needs_v15() {
    let request = ChatRequest::from_json(r#"{"messages": [{"role": "user", "content": "Hi"}]}"#).unwrap();
    assert!(matches!(tekken_240911().encode_chat(&request), Err(Error::Tokenizer(TokenizerError::UnsupportedVersion { .. }))));
}

#[test]
fn truncated_vocab_for_small_models() {
    let t = tiny();
    assert_eq!(t.vocab_size(), 512);
    assert_eq!(t.num_special_tokens(), 64);
    assert_eq!(t.special_id("[/MODEL_SETTINGS]").unwrap(), 37);
    let s = "Hello, wörld! 2026 ☃";
    let ids = t.encode(s, false, false);
    assert!(ids.iter().all(|&id| (64..512).contains(&id)));
    assert_eq!(t.decode(&ids, SpecialTokenPolicy::Ignore).unwrap(), s);
    // The chat encoder works on it (same special strings).
    let request = ChatRequest::single_turn(Some("sys"), "hi", &[], Some("high"));
    let prompt = t.encode_chat(&request).unwrap();
    assert_eq!(prompt.ids[..2], [1, 17]);
    // Too few special ids for the v15 prompt: typed error, never a panic.
    let small = Tokenizer::stand_in_truncated(400, 30).unwrap();
    assert!(matches!(small.encode_chat(&request), Err(Error::Tokenizer(TokenizerError::MissingSpecialToken(_)))));
    assert!(matches!(Tokenizer::stand_in_truncated(100, 64), Err(Error::Tokenizer(TokenizerError::InvalidFile(_)))));
    assert!(matches!(Tokenizer::stand_in_truncated(200_000, 1000), Err(Error::Tokenizer(TokenizerError::InvalidFile(_)))));
}

// ---- section 5: prompt shapes, ids assembled from the spec -----------------------------------------------------

#[test]
fn system_prompts_stay_in_place() {
    let ids = chat(
        r#"{"messages": [{"role": "system", "content": "A"}, {"role": "user", "content": "u1"},
            {"role": "system", "content": [{"type": "text", "text": "B"}, {"type": "text", "text": "C"}]},
            {"role": "user", "content": "u2"}]}"#,
    )
    .unwrap();
    let expected = [
        vec![1, sp("[SYSTEM_PROMPT]")],
        text("A"),
        vec![sp("[/SYSTEM_PROMPT]")],
        settings("none"),
        inst("u1"),
        vec![sp("[SYSTEM_PROMPT]")],
        text("BC"),
        vec![sp("[/SYSTEM_PROMPT]")],
        inst("u2"),
    ]
    .concat();
    assert_eq!(ids, expected);
}

#[test]
fn consecutive_user_messages_and_chunks_join() {
    let ids = chat(
        r#"{"messages": [{"role": "user", "content": "one"},
            {"role": "user", "content": [{"type": "text", "text": "two"}, {"type": "text", "text": "three"}]}]}"#,
    )
    .unwrap();
    assert_eq!(ids, [vec![1], settings("none"), inst("one\n\ntwothree")].concat());
}

#[test]
fn assistant_history_and_continuation() {
    // String content loses trailing spaces; chunk text keeps them; an open thinking block has no [/THINK];
    // prefix=true leaves the last turn open.
    let ids = chat(
        r#"{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a  "},
            {"role": "user", "content": "r"},
            {"role": "assistant", "prefix": true, "content": [{"type": "thinking", "thinking": "hm", "closed": false},
                {"type": "text", "text": "b "}]}]}"#,
    )
    .unwrap();
    let expected = [vec![1], settings("none"), inst("q"), text("a"), vec![2], inst("r"), vec![sp("[THINK]")], text("hm"), text("b ")].concat();
    assert_eq!(ids, expected);
}

#[test]
fn tools_calls_and_results() {
    let ids = chat(
        r#"{"reasoning_effort": "high",
        "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "strict": true}}],
        "messages": [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"id": "call00001", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
                {"id": "call00002", "type": "function", "function": {"name": "now", "arguments": ""}},
                {"id": "call00003", "type": "function", "function": {"name": "echo", "arguments": {"é": [1, 2.0]}}}]},
            {"role": "tool", "tool_call_id": "call00003", "content": "E"},
            {"role": "tool", "tool_call_id": "call00001", "content": "{\"temp\":  21}"},
            {"role": "tool", "tool_call_id": "call00002", "name": "now", "content": [{"type": "text", "text": "noon"}]},
            {"role": "user", "content": "Thanks"}]}"#,
    )
    .unwrap();
    let tools = r#"[{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]"#;
    let results = |content: &str| [vec![sp("[TOOL_RESULTS]")], text(content), vec![sp("[/TOOL_RESULTS]")]].concat();
    let expected = [
        vec![1, sp("[AVAILABLE_TOOLS]")],
        text(tools),
        vec![sp("[/AVAILABLE_TOOLS]")],
        settings("high"),
        inst("Weather?"),
        vec![sp("[TOOL_CALLS]")],
        text("get_weather"),
        vec![sp("[ARGS]")],
        text(r#"{"city": "Paris"}"#),
        vec![sp("[TOOL_CALLS]")],
        text("now"),
        vec![sp("[ARGS]")],
        text("{}"),
        vec![sp("[TOOL_CALLS]")],
        text("echo"),
        vec![sp("[ARGS]")],
        text(r#"{"é": [1, 2.0]}"#),
        vec![2],
        // Results in the order of the calls, raw.
        results("{\"temp\":  21}"),
        results("noon"),
        results("E"),
        inst("Thanks"),
    ]
    .concat();
    assert_eq!(ids, expected);
}

#[test]
fn tool_result_may_end_the_conversation() {
    let ids = chat(
        r#"{"messages": [{"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"id": "abc123xyz", "function": {"name": "f", "arguments": "not json"}}]},
            {"role": "tool", "tool_call_id": "abc123xyz", "content": "r"}]}"#,
    )
    .unwrap();
    let expected = [
        vec![1],
        settings("none"),
        inst("x"),
        vec![sp("[TOOL_CALLS]")],
        text("f"),
        vec![sp("[ARGS]")],
        text("\"not json\""),
        vec![2, sp("[TOOL_RESULTS]")],
        text("r"),
        vec![sp("[/TOOL_RESULTS]")],
    ]
    .concat();
    assert_eq!(ids, expected);
}

#[test]
fn images_grid_and_order() {
    let img = |cols: usize, rows: usize| -> Vec<u32> {
        let mut ids = Vec::new();
        for _ in 0..rows {
            ids.extend(std::iter::repeat_n(sp("[IMG]"), cols));
            ids.push(sp("[IMG_BREAK]"));
        }
        *ids.last_mut().unwrap() = sp("[IMG_END]");
        ids
    };
    // [image, text, image] stays in order; 60x30 -> 3x2 tokens of 28 px; 3080x1000 is resized to 1540x500 -> 55x18.
    let ids = chat(
        r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "60x30.png"},
            {"type": "text", "text": "and"}, {"type": "image_url", "image_url": {"url": "3080x1000.png"}}]}]}"#,
    )
    .unwrap();
    assert_eq!(ids, [vec![1], settings("none"), vec![sp("[INST]")], img(3, 2), text("and"), img(55, 18), vec![sp("[/INST]")]].concat());
    // A very elongated image keeps at least one pixel (and so one token) on its short side.
    let ids = chat(r#"{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "100000x10.png"}]}]}"#).unwrap();
    assert_eq!(ids, [vec![1], settings("none"), vec![sp("[INST]")], img(55, 1), vec![sp("[/INST]")]].concat());
}

#[test]
fn image_sizes_from_headers_and_data_urls() {
    use small4::tokenizer::ImageSize;
    let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
    png.extend(56u32.to_be_bytes());
    png.extend(28u32.to_be_bytes());
    png.extend([8, 2, 0, 0, 0]);
    assert_eq!(ImageSize::from_header(&png).unwrap(), ImageSize { width: 56, height: 28 });
    // JPEG: SOI, an APP0 segment, then SOF0 with height 30 and width 70.
    let jpeg = [0xff, 0xd8, 0xff, 0xe0, 0, 4, 0, 0, 0xff, 0xc0, 0, 11, 8, 0, 30, 0, 70, 3, 0, 0, 0];
    assert_eq!(ImageSize::from_header(&jpeg).unwrap(), ImageSize { width: 70, height: 30 });
    assert!(ImageSize::from_header(&jpeg[..12]).is_err());
    assert!(ImageSize::from_header(&png[..18]).is_err());
    assert!(ImageSize::from_header(b"GIF89a").is_err());
    let url = format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(&png));
    assert_eq!(ImageSize::from_url(&url).unwrap(), ImageSize { width: 56, height: 28 });
    assert!(ImageSize::from_url("data:image/png;base64,@@").is_err());
    assert!(ImageSize::from_url("https://example.com/cat.png").is_err());
    assert!(ImageSize::from_url("/nonexistent.png").is_err());
    // The default resolver reads data URLs.
    let request = ChatRequest::single_turn(None, "What is in this image?", &[url], None);
    let prompt = stand_in().encode_chat(&request).unwrap();
    assert!(prompt.ids.ends_with(&[37, 3, 10, 10, 13, 7493, 1395, 1294, 1593, 3937, 1063, 4]));
    assert_eq!(prompt.images.len(), 1);
    assert_eq!(prompt.ids[prompt.images[0].ids.clone()], [10, 10, 13]);
}

// ---- validation errors -----------------------------------------------------------------------------------------

#[test]
fn every_validation_error() {
    use RequestError::*;
    let cases: Vec<(&str, RequestError)> = vec![
        (r#"{"messages": []}"#, Empty),
        (r#"{"messages": [{"role": "assistant", "content": "a"}]}"#, LoneMessage("assistant")),
        (r#"{"messages": [{"role": "tool", "tool_call_id": "x", "content": "a"}]}"#, LoneMessage("tool")),
        (r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}"#, LastMessage("assistant")),
        (r#"{"messages": [{"role": "user", "content": "u"}, {"role": "system", "content": "s"}]}"#, LastMessage("system")),
        (
            r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"},
               {"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}"#,
            UnexpectedRole { role: "system", after: "assistant" },
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"}, {"role": "tool", "tool_call_id": "x", "content": "t"}]}"#,
            UnexpectedRole { role: "tool", after: "user" },
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "prefix": true},
               {"role": "user", "content": "u"}]}"#,
            PrefixNotLast,
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": ""},
               {"role": "user", "content": "u"}]}"#,
            EmptyAssistant,
        ),
        (
            r#"{"messages": [{"role": "system", "content": [{"type": "thinking", "thinking": "t"}]},
               {"role": "user", "content": "u"}]}"#,
            ChunkNotAllowed { role: "system", chunk: "thinking" },
        ),
        (
            r#"{"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": "1x1.png"}]},
               {"role": "user", "content": "u"}]}"#,
            ChunkNotAllowed { role: "system", chunk: "image_url" },
        ),
        (r#"{"messages": [{"role": "user", "content": [{"type": "thinking", "thinking": "t"}]}]}"#, ChunkNotAllowed { role: "user", chunk: "thinking" }),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "content": [{"type": "image_url", "image_url": "1x1.png"}]}, {"role": "user", "content": "u"}]}"#,
            ChunkNotAllowed { role: "assistant", chunk: "image_url" },
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "x", "content": "t"}]}"#,
            MissingToolCallId(1),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "tool_calls": [{"id": "null", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "null", "content": "t"}]}"#,
            MissingToolCallId(1),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "content": "t"}]}"#,
            MissingToolCallId(2),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "bad name", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "a", "content": "t"}]}"#,
            InvalidFunctionName("bad name".into()),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "a", "name": "f.g", "content": "t"}]}"#,
            InvalidFunctionName("f.g".into()),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}},
                                                    {"id": "a", "function": {"name": "g", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "a", "content": "t"}]}"#,
            DuplicateToolCallId("a".into()),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "b", "content": "t"}]}"#,
            UnexpectedToolResult("b".into()),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "a", "content": "t"}, {"role": "tool", "tool_call_id": "a", "content": "t"}]}"#,
            DuplicateToolResult("a".into()),
        ),
        (
            r#"{"messages": [{"role": "user", "content": "u"},
               {"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}},
                                                    {"id": "b", "function": {"name": "f", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "a", "content": "t"},
               {"role": "assistant", "content": "x", "prefix": true}]}"#,
            ToolResultsMismatch,
        ),
        (
            r#"{"reasoning_effort": "low", "messages": [{"role": "user", "content": "u"}]}"#,
            InvalidReasoningEffort { value: "low".into(), allowed: "none|high".into() },
        ),
    ];
    for (json, expected) in cases {
        assert_eq!(request_error(json), expected, "{json}");
    }
    // Images need an image config: the 240911 file is v3, so build a v15 tokenizer without one from the stand-in.
    let request = ChatRequest::single_turn(None, "x", &["1x1.png".into()], None);
    let no_images = {
        let mut data: tekken::config::ModelData = serde_json::from_slice(small4::tokenizer::embedded_stand_in_json()).unwrap();
        data.image = None;
        data.special_tokens = Some(
            (0..1000)
                .map(|rank| tekken::special_tokens::SpecialTokenInfo {
                    rank,
                    token_str: stand_in()
                        .token(rank as u32)
                        .map(|t| match t {
                            small4::tokenizer::Token::Special(s) => s.to_string(),
                            small4::tokenizer::Token::Bytes(_) => unreachable!(),
                        })
                        .unwrap(),
                    is_control: true,
                })
                .collect(),
        );
        data.config.version = "v15".into();
        data.model_settings_builder = stand_in().model_settings_builder().cloned();
        Tokenizer::from_model_data(data, None).unwrap()
    };
    assert!(matches!(no_images.encode_chat(&request), Err(Error::Tokenizer(TokenizerError::InvalidRequest(RequestError::NoImageSupport)))));
    // Malformed JSON requests are JSON errors, not panics.
    assert!(matches!(ChatRequest::from_json(r#"{"messages": [{"role": "robot"}]}"#), Err(Error::Json { .. })));
}

// ---- output parser and streaming -------------------------------------------------------------------------------

#[test]
fn parse_reasoning_answer_and_tool_calls() {
    let ids = [
        vec![sp("[THINK]")],
        text("Let me think."),
        vec![sp("[/THINK]")],
        text("Checking."),
        vec![sp("[TOOL_CALLS]")],
        text("get_weather"),
        vec![sp("[ARGS]")],
        text(r#"{"city": "Paris"}"#),
        vec![sp("[TOOL_CALLS]")],
        text("now"),
        vec![sp("[ARGS]")],
        text("{}"),
        vec![2],
    ]
    .concat();
    let parsed = parse_output(stand_in(), &ids).unwrap();
    assert_eq!(parsed.reasoning.as_deref(), Some("Let me think."));
    assert!(parsed.reasoning_closed);
    assert_eq!(parsed.answer, "Checking.");
    assert_eq!(parsed.tool_calls.len(), 2);
    assert_eq!(parsed.tool_calls[0].name, "get_weather");
    assert_eq!(parsed.tool_calls[0].to_json(), serde_json::json!({"name": "get_weather", "arguments": {"city": "Paris"}}));
    assert_eq!(parsed.tool_calls[1].arguments, "{}");
    assert!(parsed.finished);

    // Cut short inside the reasoning: open block, not finished.
    let parsed = parse_output(stand_in(), &ids[..4]).unwrap();
    assert!(!parsed.reasoning_closed && !parsed.finished);
    assert_eq!(parsed.answer, "");
    assert!(parsed.reasoning.is_some());
    // Plain answer.
    let parsed = parse_output(stand_in(), &[text("Hello"), vec![2]].concat()).unwrap();
    assert_eq!((parsed.reasoning, parsed.answer.as_str(), parsed.finished), (None, "Hello", true));
    // Nested or unopened think blocks are typed errors.
    for bad in [vec![sp("[THINK]"), sp("[THINK]")], vec![sp("[/THINK]")]] {
        assert!(matches!(parse_output(stand_in(), &bad), Err(Error::Tokenizer(TokenizerError::InvalidOutput(_)))));
    }
}

#[test]
fn streaming_prints_characters_when_whole() {
    let t = stand_in();
    let euro: Vec<u32> = "€".bytes().map(|b| 1000 + b as u32).collect();
    let mut decoder = StreamingDecoder::new(t, SpecialTokenPolicy::Ignore);
    let out: Vec<String> = euro.iter().map(|&id| decoder.push(id).unwrap()).collect();
    assert_eq!(out, ["", "", "€"]);
    // Events: reasoning text arrives as it completes, then the answer.
    let mut stream = OutputStream::new(t).unwrap();
    let mut events = Vec::new();
    for id in [vec![sp("[THINK]")], euro.clone(), vec![sp("[/THINK]")], text("ok"), vec![2]].concat() {
        events.extend(stream.push(id).unwrap());
    }
    events.extend(stream.finish());
    assert_eq!(events, [OutputEvent::Reasoning("€".into()), OutputEvent::ReasoningEnd, OutputEvent::Answer("ok".into())]);
    assert!(stream.finished());
}

#[test]
fn printer_separates_reasoning_answer_and_tool_calls() {
    let mut printer = small4::tokenizer::OutputPrinter::new(Vec::new());
    for event in [
        OutputEvent::Reasoning("hmm".into()),
        OutputEvent::ReasoningEnd,
        OutputEvent::Answer("Yes".into()),
        OutputEvent::ToolCall(small4::tokenizer::ToolCallOutput { name: "f".into(), arguments: "{\"a\": 1}".into() }),
    ] {
        printer.print(&event).unwrap();
    }
    printer.finish().unwrap();
    let printed = String::from_utf8(printer.into_inner()).unwrap();
    assert_eq!(printed, "[reasoning]\nhmm\n[answer]\nYes\n[tool calls]\n{\"arguments\":{\"a\":1},\"name\":\"f\"}\n\n");
}

// ---- property tests --------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_arbitrary_unicode(s in "\\PC*|[ \\t\\n\\r\\u{a0}\\u{3000}a-zA-Z0-9é€😀]*") {
        for t in [stand_in(), tiny()] {
            let ids = t.encode(&s, false, false);
            prop_assert_eq!(t.decode(&ids, SpecialTokenPolicy::Ignore).unwrap(), s.clone());
        }
    }

    #[test]
    fn round_trip_any_chars(chars in proptest::collection::vec(any::<char>(), 0..64)) {
        let s: String = chars.into_iter().collect();
        let ids = stand_in().encode(&s, true, true);
        prop_assert_eq!(stand_in().decode(&ids, SpecialTokenPolicy::Ignore).unwrap(), s);
    }

    /// The `tekken` crate (tiktoken-rs) as an independent oracle of the BPE.
    #[test]
    fn same_ids_as_the_tekken_crate(s in "\\PC{0,40}|[ a-z\\n]{0,60}") {
        prop_assert_eq!(stand_in().encode(&s, false, false), tekken_crate().encode(&s, false, false).unwrap());
    }

    /// Streaming output equals the one-shot decode for any ids, split characters and specials included.
    #[test]
    fn streaming_equals_decode(ids in proptest::collection::vec(prop_oneof![0u32..40, 1000u32..1256, 1000u32..131072], 0..40)) {
        let t = stand_in();
        for policy in [SpecialTokenPolicy::Ignore, SpecialTokenPolicy::Keep] {
            let mut decoder = StreamingDecoder::new(t, policy);
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&decoder.push(id).unwrap());
            }
            streamed.push_str(&decoder.finish());
            prop_assert_eq!(streamed, t.decode(&ids, policy).unwrap());
        }
    }
}

fn tekken_crate() -> &'static tekken::Tekkenizer {
    static T: OnceLock<tekken::Tekkenizer> = OnceLock::new();
    T.get_or_init(|| tekken::Tekkenizer::from_file(TEKKEN_240911_PATH).unwrap())
}

// ---- command line ----------------------------------------------------------------------------------------------

fn run_cli(args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_small4"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (out.status.success(), String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
}

#[test]
fn cli_tokenize_and_detokenize() {
    for (input, ids) in [("Hello, world!", "[22177,1044,4304,1033]"), (" [INST]", "[1766,3174,3074,1093]"), ("héllo", "[67679,109232]")] {
        assert_eq!(run_cli(&["tokenize"], input), (true, format!("{ids}\n"), String::new()));
        assert_eq!(run_cli(&["detokenize"], ids).1, input);
        assert_eq!(run_cli(&["tokenize", "--tokenizer", TEKKEN_240911_PATH], input).1, format!("{ids}\n"));
    }
    let dir = std::env::temp_dir().join(format!("small4-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let request = dir.join("chat.json");
    std::fs::write(&request, r#"{"messages": [{"role": "user", "content": "Hi"}]}"#).unwrap();
    let (ok, out, _) = run_cli(&["tokenize", "--chat", request.to_str().unwrap()], "");
    assert!(ok);
    assert_eq!(out, "[1,36,19227,80277,1302,13196,1609,1449,2811,1429,17670,46005,37,3,37133,4]\n");
    assert_eq!(run_cli(&["detokenize", "--keep-special"], &out).1, "<s>[MODEL_SETTINGS]{\"reasoning_effort\": \"none\"}[/MODEL_SETTINGS][INST]Hi[/INST]");
    // Bad input is an error message and a failure status, not a panic.
    let (ok, _, err) = run_cli(&["detokenize"], "[999999999]");
    assert!(!ok && err.contains("out of range"), "{err}");
    std::fs::write(&request, r#"{"messages": []}"#).unwrap();
    let (ok, _, err) = run_cli(&["tokenize", "--chat", request.to_str().unwrap()], "");
    assert!(!ok && err.contains("no message"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
