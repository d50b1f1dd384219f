//! CLIP's byte-level BPE tokenizer, as transformers' `CLIPTokenizer` builds it
//! (`transformers/models/clip/tokenization_clip.py`, v5), on the `tokenizers` crate.
//!
//! Two folder layouts load: `tokenizer.json` (what `save_pretrained` writes today) and the classic
//! `vocab.json` + `merges.txt` + `special_tokens_map.json` + `tokenizer_config.json` that the
//! Stable Diffusion 1.5 and 2.1 repos ship. Prompts are truncated and padded to
//! `model_max_length` (77) exactly as transformers does with `padding="max_length",
//! truncation=True`: BOS first, at most `max_length - 2` content tokens, EOS, then the folder's pad
//! token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// CLIP's pre-tokenizer pattern (special tokens, contractions, letters, single digits, other runs).
const SPLIT_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// CLIP's `vocab.json`, embedded for [`ClipTokenizer::embedded`].
const EMBEDDED_VOCAB: &str = include_str!("../vocab/vocab.json");
/// CLIP's `merges.txt`, embedded for [`ClipTokenizer::embedded`].
const EMBEDDED_MERGES: &str = include_str!("../vocab/merges.txt");

/// The vocabulary's licence notice (MIT), written next to it by [`ClipTokenizer::write_embedded`].
const EMBEDDED_LICENSE: &str = include_str!("../vocab/LICENSE");

/// The sequence length used when the folder does not say (CLIP's 77 positions).
pub const DEFAULT_MAX_LENGTH: usize = 77;

/// A special token as the folder's JSON names it: its text and whether it matches normalized text.
#[derive(Debug, Clone)]
struct SpecialToken {
    content: String,
    normalized: bool,
}

/// The special tokens and length limit read from `tokenizer_config.json` and `special_tokens_map.json`.
#[derive(Debug, Clone)]
struct SpecialTokens {
    bos: SpecialToken,
    eos: SpecialToken,
    pad: SpecialToken,
    unk: SpecialToken,
    max_length: usize,
}

impl SpecialTokens {
    /// Reads the two JSON files; `special_tokens_map.json` wins where both name a token, as in transformers.
    fn read(dir: &Path) -> Result<Self> {
        let read = |name: &str| -> Result<Option<Value>> {
            let path = dir.join(name);
            if path.is_file() {
                Ok(Some(kiln_nn::config::read_json(&path, name)?))
            } else {
                Ok(None)
            }
        };
        let config = read("tokenizer_config.json")?;
        let map = read("special_tokens_map.json")?;
        Self::parse(dir, config, map)
    }

    /// The special tokens from the parsed `tokenizer_config.json` and `special_tokens_map.json`
    /// (`dir` only names the source in errors).
    fn parse(dir: &Path, config: Option<Value>, map: Option<Value>) -> Result<Self> {
        let token = |key: &str, default: &str| -> Result<SpecialToken> {
            for source in [&map, &config] {
                match source.as_ref().and_then(|v| v.get(key)) {
                    None | Some(Value::Null) => continue,
                    Some(Value::String(s)) => {
                        return Ok(SpecialToken {
                            content: s.clone(),
                            normalized: false,
                        });
                    }
                    Some(Value::Object(o)) => {
                        let content =
                            o.get("content").and_then(Value::as_str).ok_or_else(|| {
                                invalid(dir, format!("`{key}` has no string `content`"))
                            })?;
                        return Ok(SpecialToken {
                            content: content.to_string(),
                            normalized: o
                                .get("normalized")
                                .and_then(Value::as_bool)
                                .unwrap_or(true),
                        });
                    }
                    Some(other) => {
                        return Err(invalid(
                            dir,
                            format!("`{key}` must be a string or an object, found {other}"),
                        ));
                    }
                }
            }
            Ok(SpecialToken {
                content: default.to_string(),
                normalized: false,
            })
        };
        let max_length = match config.as_ref().and_then(|c| c.get("model_max_length")) {
            None | Some(Value::Null) => DEFAULT_MAX_LENGTH,
            Some(v) => match v.as_f64() {
                // transformers writes a huge sentinel (1e30) when the length is unknown.
                Some(n) if (3.0..=1e6).contains(&n) => n as usize,
                Some(n) if n > 1e6 => DEFAULT_MAX_LENGTH,
                _ => {
                    return Err(invalid(
                        dir,
                        format!("`model_max_length` must be a number of at least 3, found {v}"),
                    ));
                }
            },
        };
        Ok(Self {
            bos: token("bos_token", "<|startoftext|>")?,
            eos: token("eos_token", "<|endoftext|>")?,
            pad: token("pad_token", "<|endoftext|>")?,
            unk: token("unk_token", "<|endoftext|>")?,
            max_length,
        })
    }
}

fn invalid(dir: &Path, message: String) -> Error {
    kiln_nn::Error::InvalidConfig {
        path: dir.to_path_buf(),
        message,
    }
    .into()
}

fn tokenizer_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// CLIP's tokenizer: prompt text to the fixed-length id sequences the text encoder reads.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
    /// Textual-inversion tokens of several vectors: first id -> number of ids.
    embeddings: std::collections::BTreeMap<u32, usize>,
}

impl ClipTokenizer {
    /// Loads a tokenizer folder, or a model folder with a `tokenizer/` subfolder.
    ///
    /// `tokenizer.json` is used when present; otherwise `vocab.json` and `merges.txt` are required.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        kiln_nn::config::require_dir(dir, "tokenizer folder")?;
        let dir: PathBuf = if dir.join("tokenizer").is_dir() {
            dir.join("tokenizer")
        } else {
            dir.to_path_buf()
        };
        let special = SpecialTokens::read(&dir)?;
        let fast = dir.join("tokenizer.json");
        let inner = if fast.is_file() {
            let mut t = Tokenizer::from_file(&fast).map_err(|e| tokenizer_error(&fast, e))?;
            t.with_padding(None);
            t.with_truncation(None)
                .map_err(|e| tokenizer_error(&fast, e))?;
            t
        } else {
            Self::build_classic(&dir, &special)?
        };
        Self::finish(inner, &special, &dir)
    }

    /// CLIP's tokenizer with the vocabulary embedded in this crate (the one every Stable
    /// Diffusion 1.x and 2.x model ships; `vocab/LICENSE`), for checkpoints that carry no
    /// tokenizer: `pad_token` is `<|endoftext|>` for SD 1.x and `!` for SD 2.x, the rest as in
    /// the hub's tokenizer folders (77 tokens).
    pub fn embedded(pad_token: &str) -> Result<Self> {
        let source = Path::new("<embedded CLIP vocabulary>");
        let special_token =
            |content: &str| serde_json::json!({"content": content, "normalized": true});
        let config = serde_json::json!({
            "bos_token": special_token("<|startoftext|>"),
            "eos_token": special_token("<|endoftext|>"),
            "unk_token": special_token("<|endoftext|>"),
            "pad_token": pad_token,
            "model_max_length": DEFAULT_MAX_LENGTH,
        });
        let special = SpecialTokens::parse(source, Some(config), None)?;
        let inner = Self::build_bpe(source, EMBEDDED_VOCAB, EMBEDDED_MERGES, &special)?;
        Self::finish(inner, &special, source)
    }

    /// Writes the embedded vocabulary as a classic tokenizer folder at `dir` (`vocab.json`,
    /// `merges.txt`, `special_tokens_map.json`, `tokenizer_config.json`, as the hub's SD repos
    /// ship them, plus the vocabulary's licence), with `pad_token` as padding token.
    pub fn write_embedded(dir: &Path, pad_token: &str) -> Result<()> {
        let io = |path: &Path, source| -> Error {
            kiln_nn::Error::Io {
                path: path.to_path_buf(),
                source,
            }
            .into()
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let token = |content: &str| {
            serde_json::json!({
                "content": content, "lstrip": false, "normalized": true, "rstrip": false,
                "single_word": false,
            })
        };
        let added = |content: &str| {
            let mut t = token(content);
            t["__type"] = "AddedToken".into();
            t
        };
        let special = serde_json::json!({
            "bos_token": token("<|startoftext|>"),
            "eos_token": token("<|endoftext|>"),
            "pad_token": pad_token,
            "unk_token": token("<|endoftext|>"),
        });
        let config = serde_json::json!({
            "add_prefix_space": false,
            "bos_token": added("<|startoftext|>"),
            "do_lower_case": true,
            "eos_token": added("<|endoftext|>"),
            "errors": "replace",
            "model_max_length": DEFAULT_MAX_LENGTH,
            "pad_token": pad_token,
            "tokenizer_class": "CLIPTokenizer",
            "unk_token": added("<|endoftext|>"),
        });
        let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default() + "\n";
        for (name, text) in [
            ("vocab.json", EMBEDDED_VOCAB.to_string()),
            ("merges.txt", EMBEDDED_MERGES.to_string()),
            ("special_tokens_map.json", pretty(&special)),
            ("tokenizer_config.json", pretty(&config)),
            ("LICENSE", EMBEDDED_LICENSE.to_string()),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).map_err(|e| io(&path, e))?;
        }
        Ok(())
    }

    /// Registers the special tokens and looks up their ids.
    fn finish(mut inner: Tokenizer, special: &SpecialTokens, dir: &Path) -> Result<Self> {
        // Special tokens are matched in the raw text before BPE, as transformers registers them.
        let added: Vec<AddedToken> = [&special.pad, &special.bos, &special.eos, &special.unk]
            .into_iter()
            .map(|t| AddedToken::from(t.content.clone(), true).normalized(t.normalized))
            .collect();
        inner.add_special_tokens(&added);
        let id = |t: &SpecialToken, role: &'static str| {
            inner
                .token_to_id(&t.content)
                .ok_or_else(|| Error::MissingToken {
                    path: dir.to_path_buf(),
                    token: t.content.clone(),
                    role,
                })
        };
        Ok(Self {
            bos_id: id(&special.bos, "bos")?,
            eos_id: id(&special.eos, "eos")?,
            pad_id: id(&special.pad, "pad")?,
            max_length: special.max_length,
            inner,
            embeddings: Default::default(),
        })
    }

    /// Builds the tokenizer from `vocab.json` + `merges.txt` the way transformers' `CLIPTokenizer` does.
    fn build_classic(dir: &Path, special: &SpecialTokens) -> Result<Tokenizer> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for (path, what) in [
            (&vocab, "tokenizer vocab.json"),
            (&merges, "tokenizer merges.txt"),
        ] {
            if !path.is_file() {
                return Err(kiln_nn::Error::NotFound {
                    what: what.into(),
                    path: path.clone(),
                    hint: Some(
                        "a tokenizer folder needs tokenizer.json, or vocab.json and merges.txt"
                            .into(),
                    ),
                }
                .into());
            }
        }
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|source| {
                Error::from(kiln_nn::Error::Io {
                    path: path.to_path_buf(),
                    source,
                })
            })
        };
        Self::build_bpe(dir, &read(&vocab)?, &read(&merges)?, special)
    }

    /// Builds the tokenizer from the text of `vocab.json` and `merges.txt` (`source` names them in
    /// errors) the way transformers' `CLIPTokenizer` does.
    fn build_bpe(
        source: &Path,
        vocab_json: &str,
        merges_txt: &str,
        special: &SpecialTokens,
    ) -> Result<Tokenizer> {
        let dir = source;
        let vocab: std::collections::HashMap<String, u32> = serde_json::from_str(vocab_json)
            .map_err(|e| tokenizer_error(dir, format!("vocab.json: {e}")))?;
        let vocab: tokenizers::models::bpe::Vocab = vocab.into_iter().collect();
        let mut merges = Vec::new();
        for (rank, line) in merges_txt
            .lines()
            .filter(|l| !l.starts_with("#version"))
            .enumerate()
        {
            match line.split(' ').collect::<Vec<_>>().as_slice() {
                [a, b] => merges.push((a.to_string(), b.to_string())),
                _ => {
                    return Err(tokenizer_error(
                        dir,
                        format!("merges.txt: line {} is not two tokens", rank + 1),
                    ));
                }
            }
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .unk_token(special.unk.content.clone())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .build()
            .map_err(|e| tokenizer_error(dir, e))?;
        let mut tokenizer = Tokenizer::new(bpe);
        let replace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| tokenizer_error(dir, e))?;
        tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
            NFC.into(),
            replace.into(),
            Lowercase.into(),
        ])));
        let split = Split::new(
            SplitPattern::Regex(SPLIT_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| tokenizer_error(dir, e))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(tokenizer)
    }

    /// The sequence length every encoding has (`model_max_length`, 77 for Stable Diffusion).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of the begin-of-text token (49406 in CLIP's vocabulary).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The id of the end-of-text token (49407 in CLIP's vocabulary).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id sequences are padded with: the folder's pad token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The prompt's token ids without BOS/EOS, untruncated. A textual-inversion token of `n`
    /// vectors gives its `n` ids.
    pub fn content_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(prompt, false)
            .map_err(|e| Error::Encode(e.to_string()))?;
        let ids = encoding.get_ids();
        if self.embeddings.is_empty() {
            return Ok(ids.to_vec());
        }
        let mut out = Vec::with_capacity(ids.len());
        for &id in ids {
            let n = self.embedding_len(id);
            out.extend((0..n as u32).map(|k| id + k));
        }
        Ok(out)
    }

    /// How many ids `id` stands for: the vectors of a textual-inversion token it starts, else 1.
    pub(crate) fn embedding_len(&self, id: u32) -> usize {
        self.embeddings.get(&id).copied().unwrap_or(1)
    }

    /// Adds a textual-inversion token of `vectors` vectors (see
    /// [`crate::textual_inversion`]): `token` and, for more vectors, `token_1`, ... as
    /// diffusers names them, with the next free ids. The word `token` in a prompt then gives
    /// all of them.
    pub(crate) fn add_embedding_token(
        &mut self,
        token: &str,
        vectors: usize,
    ) -> std::result::Result<Vec<u32>, String> {
        if vectors > self.max_length - 2 {
            return Err(format!(
                "has {vectors} vectors; at most {} fit in a window",
                self.max_length - 2
            ));
        }
        let names: Vec<String> = (0..vectors)
            .map(|i| {
                if i == 0 {
                    token.to_string()
                } else {
                    format!("{token}_{i}")
                }
            })
            .collect();
        if let Some(taken) = names.iter().find(|n| self.inner.token_to_id(n).is_some()) {
            return Err(format!(
                "would add the token `{taken}`, which the tokenizer has already; name the \
                 embedding another word (FILE:TOKEN)"
            ));
        }
        let first = self.vocab_size() as u32;
        let added: Vec<AddedToken> = names
            .iter()
            .map(|n| AddedToken::from(n.clone(), false))
            .collect();
        self.inner.add_tokens(&added);
        let ids: Vec<u32> = names
            .iter()
            .map(|n| self.inner.token_to_id(n).unwrap_or(u32::MAX))
            .collect();
        if ids
            .iter()
            .enumerate()
            .any(|(i, &id)| id != first + i as u32)
        {
            return Err(format!(
                "the tokenizer gave the new tokens ids {ids:?}, not {first}.."
            ));
        }
        self.embeddings.insert(first, vectors);
        Ok(ids)
    }

    /// The id of a token of the vocabulary (such as `,</w>`), if it has one.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Wraps at most `max_length - 2` content ids in BOS/EOS and pads to `max_length`.
    pub(crate) fn wrap(&self, content: &[u32]) -> Vec<u32> {
        let room = self.max_length - 2;
        let content = &content[..content.len().min(room)];
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(content);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        ids
    }

    /// Tokenizes `prompt` to exactly `max_length` ids, truncating long prompts as transformers does
    /// (the EOS token stays last).
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self.wrap(&self.content_ids(prompt)?))
    }

    /// The token strings of `ids` (byte-level BPE pieces such as `cat</w>`).
    pub fn tokens(&self, ids: &[u32]) -> Vec<String> {
        ids.iter()
            .map(|&id| {
                self.inner
                    .id_to_token(id)
                    .unwrap_or_else(|| format!("<unk:{id}>"))
            })
            .collect()
    }

    /// The number of entries in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
