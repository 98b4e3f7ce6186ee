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
pub const TEKKEN_240911_PATH: &str = env!("SMALL4_TEKKEN_240911");

/// The embedded `tekken_240911.json` reduced to `config` and the used ranks (see build.rs for why).
pub fn embedded_stand_in_json() -> &'static [u8] {
    include_bytes!(concat!(env!("OUT_DIR"), "/tekken_240911_embedded.json"))
}

/// A loaded tekken tokenizer: special ids `0..num_special`, BPE rank `r` is id `r + num_special`.
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
    /// Loads a `tekken.json` from disk with its own sizes.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let bytes = std::fs::read(path.as_ref()).map_err(|e| crate::Error::io(path.as_ref(), e))?;
        Self::from_json(&bytes)
    }

    /// Loads the `tekken.json` of a model directory (the file Mistral ships beside the weights).
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("tekken.json"))
    }

    /// Loads a `tekken.json` document with its own sizes.
    pub fn from_json(bytes: &[u8]) -> Result<Self> {
        Self::from_model_data(parse_model_data(bytes)?, None)
    }

    /// The v15 stand-in of section 7 from the embedded `tekken_240911.json`: needs no file at run time.
    pub fn stand_in() -> Result<Self> {
        Self::stand_in_from_json(embedded_stand_in_json(), None)
    }

    /// The v15 stand-in with a smaller vocabulary, for small models: `num_special` special ids (at least 38, so that
    /// `[/MODEL_SETTINGS]` = 37 exists) and `vocab_size` ids in all, the BPE truncated to its first
    /// `vocab_size - num_special` ranks (tekken allows this: merges beyond the cut are never made). For example
    /// (512, 64): 448 ranks, the 256 bytes and the first 192 merges, and every text still encodes and decodes exactly.
    pub fn stand_in_truncated(vocab_size: usize, num_special: usize) -> Result<Self> {
        Self::stand_in_from_json(embedded_stand_in_json(), Some((vocab_size, num_special)))
    }

    /// The v15 stand-in built from a `tekken_240911.json` document (the embedded one or the original file).
    pub fn stand_in_from_json(bytes: &[u8], sizes: Option<(usize, usize)>) -> Result<Self> {
        let mut data = parse_model_data(bytes)?;
        let num_special = data.config.default_num_special_tokens;
        let mut specials: Vec<SpecialTokenInfo> = DEPRECATED_SPECIALS
            .iter()
            .enumerate()
            .map(|(rank, token)| special(rank, token.as_str()))
            .collect();
        specials.extend((specials.len()..num_special).map(filler));
        for (id, token) in STAND_IN_EXTRA_SPECIALS {
            specials[id as usize] = special(id as usize, token.as_str());
        }
        data.special_tokens = Some(specials);
        data.config.version = "v15".to_string();
        data.image = Some(ImageConfig { image_patch_size: 14, max_image_size: 1540, spatial_merge_size: 2 });
        data.multimodal = None;
        data.model_settings_builder = Some(
            serde_json::from_str(
                r#"{"reasoning_effort":{"type":"enum","accepts_none":true,"default":"none","values":["none","high"]}}"#,
            )
            .expect("the stand-in's model_settings_builder is valid JSON"),
        );
        Self::from_model_data(data, sizes)
    }

    /// Builds the tokenizer from a parsed file. `sizes = Some((vocab_size, num_special))` overrides the file's
    /// `default_vocab_size` and `default_num_special_tokens` (truncation, as tekken's `vocab_size` argument).
    pub fn from_model_data(data: ModelData, sizes: Option<(usize, usize)>) -> Result<Self> {
        let version = TokenizerVersion::from_string(&data.config.version)
            .ok_or_else(|| TokenizerError::UnknownVersion(data.config.version.clone()))?;
        let (vocab_size, num_special) =
            sizes.unwrap_or((data.config.default_vocab_size, data.config.default_num_special_tokens));
        if num_special < DEPRECATED_SPECIALS.len() || vocab_size < num_special + 256 {
            return Err(invalid(format!(
                "vocab_size {vocab_size} with {num_special} special tokens: need at least 20 special ids and 256 byte ranks"
            )));
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
            None if version.requires_explicit_special_tokens() => {
                return Err(invalid(format!("version {} must list its special_tokens", version.as_str())))
            }
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
            let bytes = engine
                .decode(&token.token_bytes)
                .map_err(|e| invalid(format!("vocab[{position}].token_bytes is not base64: {e}")))?;
            pieces.push(bytes);
        }
        let bpe = Bpe::new(&data.config.pattern, pieces)?;

        let lookup = |token: SpecialTokens| -> Result<u32> {
            special_ids
                .get(token.as_str())
                .copied()
                .ok_or_else(|| TokenizerError::MissingSpecialToken(token.as_str().to_string()).into())
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
                let ids = SpecialImageIds {
                    img: lookup(SpecialTokens::Img)?,
                    img_break: lookup(SpecialTokens::ImgBreak)?,
                    img_end: lookup(SpecialTokens::ImgEnd)?,
                };
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

        Ok(Tokenizer {
            version,
            num_special: num_special as u32,
            specials,
            special_ids,
            bpe,
            bos,
            eos,
            image,
            model_settings: data.model_settings_builder,
        })
    }

    pub fn version(&self) -> TokenizerVersion {
        self.version
    }

    /// Number of ids: special tokens plus BPE ranks.
    pub fn vocab_size(&self) -> usize {
        self.num_special as usize + self.bpe.num_ranks()
    }

    pub fn num_special_tokens(&self) -> usize {
        self.num_special as usize
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// The id of a special token, looked up by its string (`"[INST]"`, `"[THINK]"`, ...).
    pub fn special_id(&self, token: &str) -> Result<u32> {
        self.special_ids.get(token).copied().ok_or_else(|| TokenizerError::MissingSpecialToken(token.to_string()).into())
    }

    pub fn is_special(&self, id: u32) -> bool {
        id < self.num_special
    }

    pub fn image_encoder(&self) -> Option<&ImageEncoder> {
        self.image.as_ref()
    }

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
        self.bpe
            .piece(id - self.num_special)
            .map(Token::Bytes)
            .ok_or_else(|| TokenizerError::IdOutOfRange { id, vocab_size: self.vocab_size() }.into())
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

/// One id's meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Token<'a> {
    Special(&'a str),
    Bytes(&'a [u8]),
}

fn invalid(message: String) -> crate::Error {
    TokenizerError::InvalidFile(message).into()
}

fn parse_model_data(bytes: &[u8]) -> Result<ModelData> {
    serde_json::from_slice(bytes).map_err(|e| TokenizerError::Parse(e.to_string()).into())
}
