//! Loading a `tekken.json` (SPEC-tokenizer.md section 1), the v15 stand-in of section 7, encode and decode.

use std::collections::HashMap;
use std::path::Path;

use base64::Engine as _;
use tekken::config::{ModelData, TokenizerVersion};
use tekken::image::{ImageConfig, ImageEncoder, SpecialImageIds};
use tekken::model_settings::ModelSettingsBuilder;
use tekken::special_tokens::{SpecialTokenInfo, SpecialTokenPolicy, SpecialTokens};

use super::bpe::Bpe;
use super::TokenizerError;
use crate::Result;

/// Path of the provisioned `tekken_240911.json` (build.rs installs and checks it; valid on the machine that built).
///
/// The file as published is a v3 tokenizer; [`Tokenizer::stand_in_from_json`] makes the v15 stand-in of it.
///
/// ```
/// use small4::tokenizer::{Tokenizer, TEKKEN_240911_PATH};
///
/// let t = Tokenizer::from_file(TEKKEN_240911_PATH)?;
/// assert_eq!(t.version().as_str(), "v3");
/// assert_eq!(t.vocab_size(), 131072);
/// assert_eq!(t.encode("Hello, world!", false, false), [22177, 1044, 4304, 1033]);
/// # Ok::<(), small4::Error>(())
/// ```
pub const TEKKEN_240911_PATH: &str = env!("SMALL4_TEKKEN_240911");

/// The embedded `tekken_240911.json` reduced to `config` and the used ranks (see build.rs for why).
///
/// It is a `tekken.json` document in its own right, the same BPE as the full file:
///
/// ```
/// use small4::tokenizer::{embedded_stand_in_json, Tokenizer};
///
/// let t = Tokenizer::from_json(embedded_stand_in_json())?;
/// assert_eq!((t.version().as_str(), t.vocab_size()), ("v3", 131072));
/// assert_eq!(t.encode("Hello, world!", false, false), [22177, 1044, 4304, 1033]);
/// # Ok::<(), small4::Error>(())
/// ```
pub fn embedded_stand_in_json() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/tekken_240911_embedded.json"))
}

/// A loaded tekken tokenizer: special ids `0..num_special`, BPE rank `r` is id `r + num_special`.
///
/// The v15 stand-in of the Small 4 tokenizer needs no file: it is built from the embedded vocabulary.
///
/// ```
/// use small4::tokenizer::{SpecialTokenPolicy, Token, Tokenizer};
///
/// let t = Tokenizer::stand_in()?;
/// assert_eq!(t.version().as_str(), "v15");
/// assert_eq!((t.vocab_size(), t.num_special_tokens()), (131072, 1000));
/// assert_eq!((t.bos_id(), t.eos_id()), (1, 2));
///
/// // Text: ordinary ids (BPE rank + 1000), optionally between <s> and </s>.
/// let ids = t.encode("Hello, world!", true, true);
/// assert_eq!(ids, [1, 22177, 1044, 4304, 1033, 2]);
/// assert_eq!(t.decode(&ids, SpecialTokenPolicy::Ignore)?, "Hello, world!");
/// assert_eq!(t.decode(&ids, SpecialTokenPolicy::Keep)?, "<s>Hello, world!</s>");
///
/// // Special tokens are found by their string; typed in text they are plain bytes.
/// let think = t.special_id("[THINK]")?;
/// assert_eq!(think, 34);
/// assert!(t.is_special(think) && !t.is_special(1044));
/// assert!(t.encode("[THINK]", false, false).iter().all(|&id| !t.is_special(id)));
/// assert_eq!(t.token(think)?, Token::Special("[THINK]"));
/// assert_eq!(t.token(1044)?, Token::Bytes(b","));
///
/// // Appending to a prompt under construction.
/// let mut prompt = vec![t.bos_id(), t.special_id("[INST]")?];
/// t.encode_into("Hello, world!", &mut prompt);
/// assert_eq!(&prompt[2..], &ids[1..5]);
///
/// // The stand-in knows images (patches of 14 pixels, merged 2 x 2) and the reasoning-effort setting.
/// assert_eq!(t.image_encoder().map(|e| e.config.image_patch_size), Some(14));
/// let effort = t.model_settings_builder().and_then(|b| b.reasoning_effort.as_ref());
/// assert_eq!(effort.map(|e| e.values.len()), Some(2)); // none, high
/// # Ok::<(), small4::Error>(())
/// ```
pub struct Tokenizer {
    version: TokenizerVersion,
    num_special: u32,
    specials: Vec<SpecialTokenInfo>,
    special_ids: HashMap<String, u32>,
    bpe: Bpe,
    bos: u32,
    eos: u32,
    image: Option<ImageEncoder>,
    model_settings: Option<ModelSettingsBuilder>,
}

/// Special tokens of the stand-in that the real Small 4 file has beyond the deprecated list (ids 32..37).
const STAND_IN_EXTRA_SPECIALS: [(u32, SpecialTokens); 6] = [
    (32, SpecialTokens::Args),
    (33, SpecialTokens::CallId),
    (34, SpecialTokens::BeginThink),
    (35, SpecialTokens::EndThink),
    (36, SpecialTokens::BeginModelSettings),
    (37, SpecialTokens::EndModelSettings),
];

/// The special tokens of files of version <= v7 that do not list them: ids 0..19 in this order.
const DEPRECATED_SPECIALS: [SpecialTokens; 20] = [
    SpecialTokens::Unk,
    SpecialTokens::Bos,
    SpecialTokens::Eos,
    SpecialTokens::BeginInst,
    SpecialTokens::EndInst,
    SpecialTokens::BeginTools,
    SpecialTokens::EndTools,
    SpecialTokens::BeginToolResults,
    SpecialTokens::EndToolResults,
    SpecialTokens::ToolCalls,
    SpecialTokens::Img,
    SpecialTokens::Pad,
    SpecialTokens::ImgBreak,
    SpecialTokens::ImgEnd,
    SpecialTokens::Prefix,
    SpecialTokens::Middle,
    SpecialTokens::Suffix,
    SpecialTokens::BeginSystem,
    SpecialTokens::EndSystem,
    SpecialTokens::BeginToolContent,
];

fn special(rank: usize, token: &str) -> SpecialTokenInfo {
    SpecialTokenInfo { rank, token_str: token.to_string(), is_control: true }
}

fn filler(rank: usize) -> SpecialTokenInfo {
    special(rank, &format!("<SPECIAL_{rank}>"))
}

impl Tokenizer {
    /// Loads a `tekken.json` from disk with its own sizes. See [`TEKKEN_240911_PATH`] for an example; a missing file
    /// is an [`Error::Io`](crate::Error::Io):
    ///
    /// ```
    /// use small4::tokenizer::Tokenizer;
    ///
    /// assert!(matches!(Tokenizer::from_file("/nonexistent/tekken.json"), Err(small4::Error::Io { .. })));
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let bytes = std::fs::read(path.as_ref()).map_err(|e| crate::Error::io(path.as_ref(), e))?;
        Self::from_json(&bytes)
    }

    /// Loads the `tekken.json` of a model directory (the file Mistral ships beside the weights).
    ///
    /// ```
    /// use small4::tokenizer::{embedded_stand_in_json, Tokenizer};
    ///
    /// let dir = std::env::temp_dir().join(format!("small4-doc-model-dir-{}", std::process::id()));
    /// std::fs::create_dir_all(&dir)?;
    /// std::fs::write(dir.join("tekken.json"), embedded_stand_in_json())?;
    /// let t = Tokenizer::from_model_dir(&dir)?;
    /// assert_eq!(t.encode("Hello, world!", false, false), [22177, 1044, 4304, 1033]);
    /// std::fs::remove_dir_all(&dir)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("tekken.json"))
    }

    /// Loads a `tekken.json` document with its own sizes (see [`embedded_stand_in_json`] for an example). A document
    /// that does not parse or is inconsistent is a typed error:
    ///
    /// ```
    /// use small4::tokenizer::{Tokenizer, TokenizerError};
    /// use small4::Error;
    ///
    /// assert!(matches!(Tokenizer::from_json(b"[1, 2, 3]"), Err(Error::Tokenizer(TokenizerError::Parse(_)))));
    /// ```
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        Self::from_model_data(parse_model_data(bytes)?, None)
    }

    /// The v15 stand-in of section 7 from the embedded `tekken_240911.json`: needs no file at run time. See
    /// [`Tokenizer`] for a tour.
    pub fn stand_in() -> Result<Self> {
        Self::stand_in_from_json(embedded_stand_in_json(), None)
    }

    /// The v15 stand-in with a smaller vocabulary, for small models: `num_special` special ids (at least 38, so that
    /// `[/MODEL_SETTINGS]` = 37 exists) and `vocab_size` ids in all, the BPE truncated to its first
    /// `vocab_size - num_special` ranks (tekken allows this: merges beyond the cut are never made). For example
    /// (512, 64): 448 ranks, the 256 bytes and the first 192 merges, and every text still encodes and decodes exactly.
    ///
    /// ```
    /// use small4::tokenizer::{SpecialTokenPolicy, Tokenizer};
    ///
    /// let t = Tokenizer::stand_in_truncated(512, 64)?;
    /// assert_eq!((t.vocab_size(), t.num_special_tokens()), (512, 64));
    /// let text = "Grüße, 世界!";
    /// let ids = t.encode(text, false, false);
    /// assert!(ids.iter().all(|&id| (64..512).contains(&id)));
    /// assert_eq!(t.decode(&ids, SpecialTokenPolicy::Raise)?, text);
    /// // The v15 control tokens keep their ids.
    /// assert_eq!(t.special_id("[/MODEL_SETTINGS]")?, 37);
    /// // With fewer than 38 special ids the v15 control tokens past the cut are gone.
    /// let cut = Tokenizer::stand_in_truncated(512, 30)?;
    /// assert!(cut.special_id("[/MODEL_SETTINGS]").is_err());
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn stand_in_truncated(vocab_size: usize, num_special: usize) -> Result<Self> {
        Self::stand_in_from_json(embedded_stand_in_json(), Some((vocab_size, num_special)))
    }

    /// The v15 stand-in built from a `tekken_240911.json` document (the embedded one or the original file).
    ///
    /// ```
    /// use small4::tokenizer::{Tokenizer, TEKKEN_240911_PATH};
    ///
    /// // From the original file: the same tokenizer as `Tokenizer::stand_in()`.
    /// let t = Tokenizer::stand_in_from_json(&std::fs::read(TEKKEN_240911_PATH)?, None)?;
    /// assert_eq!((t.version().as_str(), t.vocab_size()), ("v15", 131072));
    /// assert_eq!(t.special_id("[MODEL_SETTINGS]")?, 36);
    /// assert_eq!(t.encode("Hello, world!", false, false), [22177, 1044, 4304, 1033]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn stand_in_from_json(bytes: &[u8], sizes: Option<(usize, usize)>) -> Result<Self> {
        let mut data = parse_model_data(bytes)?;
        let num_special = data.config.default_num_special_tokens;
        let mut specials: Vec<SpecialTokenInfo> = DEPRECATED_SPECIALS.iter().enumerate().map(|(rank, token)| special(rank, token.as_str())).collect();
        specials.extend((specials.len()..num_special).map(filler));
        for (id, token) in STAND_IN_EXTRA_SPECIALS {
            specials[id as usize] = special(id as usize, token.as_str());
        }
        data.special_tokens = Some(specials);
        data.config.version = "v15".to_string();
        data.image = Some(ImageConfig { image_patch_size: 14, max_image_size: 1540, spatial_merge_size: 2 });
        data.multimodal = None;
        data.model_settings_builder = Some(
            serde_json::from_str(r#"{"reasoning_effort":{"type":"enum","accepts_none":true,"default":"none","values":["none","high"]}}"#)
                .expect("the stand-in's model_settings_builder is valid JSON"),
        );
        Self::from_model_data(data, sizes)
    }

    /// Builds the tokenizer from a parsed file. `sizes = Some((vocab_size, num_special))` overrides the file's
    /// `default_vocab_size` and `default_num_special_tokens` (truncation, as tekken's `vocab_size` argument).
    ///
    /// ```
    /// use small4::tokenizer::{embedded_stand_in_json, Tokenizer};
    ///
    /// // The parsed file (the `tekken` crate's type), cut to its 1000 special ids and the first 300 ranks.
    /// let data: tekken::config::ModelData =
    ///     serde_json::from_slice(embedded_stand_in_json()).expect("the file parses");
    /// let t = Tokenizer::from_model_data(data, Some((1300, 1000)))?;
    /// assert_eq!(t.vocab_size(), 1300);
    /// assert_eq!(t.special_id("[INST]")?, 3); // a v3 file lists no specials: the 20 of the old layout
    /// assert!(t.encode("Hello, world!", false, false).iter().all(|&id| id < 1300));
    /// # Ok::<(), small4::Error>(())
    /// ```
    pub fn from_model_data(data: ModelData, sizes: Option<(usize, usize)>) -> Result<Self> {
        let version = TokenizerVersion::from_string(&data.config.version).ok_or_else(|| TokenizerError::UnknownVersion(data.config.version.clone()))?;
        let (vocab_size, num_special) = sizes.unwrap_or((data.config.default_vocab_size, data.config.default_num_special_tokens));
        if num_special < DEPRECATED_SPECIALS.len() || vocab_size < num_special + 256 {
            return Err(invalid(format!("vocab_size {vocab_size} with {num_special} special tokens: need at least 20 special ids and 256 byte ranks")));
        }
        if num_special > u32::MAX as usize / 2 || vocab_size > u32::MAX as usize / 2 {
            return Err(invalid(format!("vocab_size {vocab_size} does not fit token ids")));
        }
        let num_ranks = vocab_size - num_special;
        if data.vocab.len() < num_ranks {
            return Err(invalid(format!(
                "the vocab lists {} ranks, vocab_size {vocab_size} - {num_special} special tokens needs {num_ranks}",
                data.vocab.len()
            )));
        }

        let listed = match data.special_tokens {
            Some(list) => list,
            None if version.requires_explicit_special_tokens() => return Err(invalid(format!("version {} must list its special_tokens", version.as_str()))),
            None => DEPRECATED_SPECIALS.iter().enumerate().map(|(rank, t)| special(rank, t.as_str())).collect(),
        };
        let mut specials = Vec::with_capacity(num_special);
        let mut special_ids = HashMap::with_capacity(num_special);
        for (position, token) in listed.into_iter().enumerate() {
            if token.rank != position {
                return Err(invalid(format!("special_tokens[{position}] has rank {}", token.rank)));
            }
            if position >= num_special {
                // Truncation to fewer special ids drops the rest of the list (only ids below num_special exist).
                break;
            }
            if special_ids.insert(token.token_str.clone(), position as u32).is_some() {
                return Err(invalid(format!("special token {:?} is listed twice", token.token_str)));
            }
            specials.push(token);
        }
        for rank in specials.len()..num_special {
            let token = filler(rank);
            special_ids.entry(token.token_str.clone()).or_insert(rank as u32);
            specials.push(token);
        }

        let engine = base64::engine::general_purpose::STANDARD;
        let mut pieces = Vec::with_capacity(num_ranks);
        for (position, token) in data.vocab.iter().take(num_ranks).enumerate() {
            if token.rank != position {
                return Err(invalid(format!("vocab[{position}] has rank {}", token.rank)));
            }
            let bytes = engine.decode(&token.token_bytes).map_err(|e| invalid(format!("vocab[{position}].token_bytes is not base64: {e}")))?;
            pieces.push(bytes);
        }
        let bpe = Bpe::new(&data.config.pattern, pieces)?;

        let lookup = |token: SpecialTokens| -> Result<u32> {
            special_ids.get(token.as_str()).copied().ok_or_else(|| TokenizerError::MissingSpecialToken(token.as_str().to_string()).into())
        };
        let bos = lookup(SpecialTokens::Bos)?;
        let eos = lookup(SpecialTokens::Eos)?;

        let image_config = match data.multimodal {
            Some(_) if !version.allows_deprecated_multimodal_key() => {
                return Err(invalid(format!("version {} must call the image config `image`", version.as_str())))
            }
            Some(config) => Some(config),
            None => data.image,
        };
        let image = match image_config {
            Some(config) => {
                config.validate().map_err(|e| invalid(e.to_string()))?;
                let ids =
                    SpecialImageIds { img: lookup(SpecialTokens::Img)?, img_break: lookup(SpecialTokens::ImgBreak)?, img_end: lookup(SpecialTokens::ImgEnd)? };
                Some(ImageEncoder::new(config, ids))
            }
            None => None,
        };
        if let Some(builder) = &data.model_settings_builder {
            if !version.supports_model_settings() {
                return Err(invalid(format!("model_settings_builder needs v15, the file is {}", version.as_str())));
            }
            builder.validate().map_err(|e| invalid(e.to_string()))?;
        }

        Ok(Tokenizer { version, num_special: num_special as u32, specials, special_ids, bpe, bos, eos, image, model_settings: data.model_settings_builder })
    }

    /// The file's format version (`v15` for Small 4); the chat encoder needs v15.
    pub fn version(&self) -> TokenizerVersion {
        self.version
    }

    /// Number of ids: special tokens plus BPE ranks.
    pub fn vocab_size(&self) -> usize {
        self.num_special as usize + self.bpe.num_ranks()
    }

    /// Number of special ids; the ordinary ids start here.
    pub fn num_special_tokens(&self) -> usize {
        self.num_special as usize
    }

    /// The id of `<s>`.
    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    /// The id of `</s>`.
    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The id of a special token, looked up by its string (`"[INST]"`, `"[THINK]"`, ...).
    pub fn special_id(&self, token: &str) -> Result<u32> {
        self.special_ids.get(token).copied().ok_or_else(|| TokenizerError::MissingSpecialToken(token.to_string()).into())
    }

    /// Whether `id` is a special (control) id rather than BPE bytes.
    pub fn is_special(&self, id: u32) -> bool {
        id < self.num_special
    }

    /// The `[IMG]` grid layout, when the file has an image config (see
    /// [`image_token_ids`](super::image::image_token_ids)).
    pub fn image_encoder(&self) -> Option<&ImageEncoder> {
        self.image.as_ref()
    }

    /// The file's `model_settings_builder` (the allowed `reasoning_effort` values and default), v15 only.
    pub fn model_settings_builder(&self) -> Option<&ModelSettingsBuilder> {
        self.model_settings.as_ref()
    }

    /// Encodes text as ordinary tokens (section 2): typed special-token strings stay plain bytes.
    pub fn encode(&self, text: &str, bos: bool, eos: bool) -> Vec<u32> {
        let mut ids = Vec::with_capacity(text.len() / 3 + 2);
        if bos {
            ids.push(self.bos);
        }
        self.encode_into(text, &mut ids);
        if eos {
            ids.push(self.eos);
        }
        ids
    }

    /// Appends the ordinary tokens of `text` to `ids`.
    pub fn encode_into(&self, text: &str, ids: &mut Vec<u32>) {
        self.bpe.encode_into(text, self.num_special, ids);
    }

    /// What one id stands for: a special token's string or an ordinary token's bytes.
    pub fn token(&self, id: u32) -> Result<Token<'_>> {
        if id < self.num_special {
            return Ok(Token::Special(&self.specials[id as usize].token_str));
        }
        self.bpe.piece(id - self.num_special).map(Token::Bytes).ok_or_else(|| TokenizerError::IdOutOfRange { id, vocab_size: self.vocab_size() }.into())
    }

    /// Decodes ids (section 3): each maximal run of ordinary ids is decoded alone, lossily; special ids follow
    /// `policy`. Any id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32], policy: SpecialTokenPolicy) -> Result<String> {
        let mut text = String::new();
        let mut run: Vec<u8> = Vec::new();
        for &id in ids {
            match self.token(id)? {
                Token::Bytes(bytes) => run.extend_from_slice(bytes),
                Token::Special(name) => {
                    text.push_str(&String::from_utf8_lossy(&run));
                    run.clear();
                    match policy {
                        SpecialTokenPolicy::Ignore => {}
                        SpecialTokenPolicy::Keep => text.push_str(name),
                        SpecialTokenPolicy::Raise => return Err(TokenizerError::SpecialTokenInText(id).into()),
                    }
                }
            }
        }
        text.push_str(&String::from_utf8_lossy(&run));
        Ok(text)
    }
}

/// One id's meaning, from [`Tokenizer::token`] (see [`Tokenizer`] for an example).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    /// A special (control) id, below the tokenizer's count of special ids: its string, e.g. `[INST]`.
    Special(&'a str),
    /// An ordinary id: its bytes (not necessarily whole UTF-8 characters).
    Bytes(&'a [u8]),
}

fn invalid(message: String) -> crate::Error {
    TokenizerError::InvalidFile(message).into()
}

fn parse_model_data(bytes: &[u8]) -> Result<ModelData> {
    serde_json::from_slice(bytes).map_err(|e| TokenizerError::Parse(e.to_string()).into())
}
