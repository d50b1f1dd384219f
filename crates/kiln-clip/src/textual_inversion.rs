//! Textual-inversion embeddings: learned token vectors that a prompt names by a word.
//!
//! Two file layouts load, each holding one tensor of `[width]` or `[vectors, width]`: the A1111
//! web UI's (`emb_params` in `.safetensors`; `string_to_param.*` in its `.pt` files, whose
//! `string_to_token` is left aside) and diffusers' `learned_embeds.safetensors` or `.bin` (the
//! tensor named after its token, such as `<cat-toy>`); and SDXL's, with `clip_l` and `clip_g`
//! for its two text encoders. Pickle files are read without running Python code
//! ([`kiln_nn::weights::WeightsFile`]).
//!
//! [`TextualInversion::load_into`] adds the token to the tokenizer and the vectors to the text
//! encoder's token embedding table. An embedding of `n` vectors takes `n` ids: the word gives
//! all of them, as diffusers' `load_textual_inversion` expands `token` to
//! `token token_1 ... token_{n-1}`, and the long-prompt windows keep them together, as the web
//! UI does.

use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use kiln_nn::weights::WeightsFile;

use crate::{ClipTextModel, ClipTokenizer, Error, Result};

/// An embedding read from a file.
#[derive(Debug, Clone)]
pub struct TextualInversion {
    /// The word that names it in prompts.
    pub token: String,
    /// The vectors, f32 `[vectors, width]` (an SDXL embedding's `clip_l`, for its first text
    /// encoder).
    pub vectors: TensorData,
    /// An SDXL embedding's `clip_g` vectors for its second text encoder, `[vectors, width]`.
    pub vectors_2: Option<TensorData>,
    /// The file.
    pub path: PathBuf,
}

impl TextualInversion {
    /// Reads an embedding file. `token` names it in prompts; `None`: diffusers' key if the file
    /// has one (`<cat-toy>`), else the file name without extension (the web UI's rule).
    pub fn open(path: &Path, token: Option<&str>) -> Result<Self> {
        let file = WeightsFile::open(path)?;
        let bad = |message: String| Error::Embedding {
            path: path.to_path_buf(),
            message,
        };
        // the web UI's `.pt` files may keep the placeholder's token id as a tensor
        let mut names: Vec<String> = file
            .tensors()
            .map(|(n, _)| n.to_string())
            .filter(|n| !n.starts_with("string_to_token."))
            .collect();
        names.sort();
        let (name, vectors, vectors_2) = match names.as_slice() {
            [name] => (name.clone(), read_vectors(&file, name, &bad)?, None),
            // SDXL: one set of vectors per text encoder, as many of each
            [g, l] if g == "clip_g" && l == "clip_l" => {
                let g = read_vectors(&file, g, &bad)?;
                let l = read_vectors(&file, l, &bad)?;
                if g.shape()[0] != l.shape()[0] {
                    return Err(bad(format!(
                        "has {} `clip_l` vectors and {} `clip_g` ones; SDXL's take as many of each",
                        l.shape()[0],
                        g.shape()[0]
                    )));
                }
                ("clip_l".to_string(), l, Some(g))
            }
            _ => {
                return Err(bad(format!(
                    "holds {} tensors ({names:?}); an embedding file holds one, or SDXL's \
                     `clip_l` and `clip_g`",
                    names.len()
                )));
            }
        };
        let diffusers_key =
            vectors_2.is_none() && name != "emb_params" && !name.starts_with("string_to_param");
        let token = match token {
            Some(t) => t.to_string(),
            None if diffusers_key => name.clone(),
            None => path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("embedding")
                .to_string(),
        };
        if token.trim().is_empty() || token.chars().any(char::is_whitespace) {
            return Err(bad(format!(
                "the token `{token}` must be one word without spaces"
            )));
        }
        Ok(Self {
            token,
            vectors,
            vectors_2,
            path: path.to_path_buf(),
        })
    }

    /// The number of vectors (ids the token stands for).
    pub fn len(&self) -> usize {
        self.vectors.shape()[0]
    }

    /// Whether there are no vectors (never, for an opened file).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds the token to `tokenizer` and the vectors to `encoder`'s token embeddings; returns the
    /// ids they take. Fails if the width is not the encoder's or the token exists already.
    pub fn load_into(
        &self,
        tokenizer: &mut ClipTokenizer,
        encoder: &mut ClipTextModel,
    ) -> Result<Vec<u32>> {
        self.add(&self.vectors, tokenizer, encoder)
    }

    /// [`load_into`](Self::load_into) for SDXL's second text encoder: the `clip_g` vectors.
    pub fn load_second_into(
        &self,
        tokenizer: &mut ClipTokenizer,
        encoder: &mut ClipTextModel,
    ) -> Result<Vec<u32>> {
        let vectors = self.vectors_2.as_ref().ok_or_else(|| Error::Embedding {
            path: self.path.clone(),
            message: "holds one set of vectors, not SDXL's `clip_l` and `clip_g`".into(),
        })?;
        self.add(vectors, tokenizer, encoder)
    }

    /// Checks that `vectors` fit `encoder` (their width), without changing anything.
    pub fn check_width(&self, vectors: &TensorData, encoder: &ClipTextModel) -> Result<()> {
        let width = encoder.config().hidden_size;
        let file_width = vectors.shape()[1];
        if file_width != width {
            return Err(Error::Embedding {
                path: self.path.clone(),
                message: format!(
                    "has vectors of width {file_width}, but this text encoder's are {width} wide; \
                     is it for another model (SD 1.x: 768, SD 2.x: 1024, SDXL: 768 and 1280)?"
                ),
            });
        }
        Ok(())
    }

    fn add(
        &self,
        vectors: &TensorData,
        tokenizer: &mut ClipTokenizer,
        encoder: &mut ClipTextModel,
    ) -> Result<Vec<u32>> {
        self.check_width(vectors, encoder)?;
        let count = vectors.shape()[0];
        let first = encoder.config().vocab_size;
        if tokenizer.vocab_size() != first {
            return Err(Error::InvalidInput(format!(
                "the tokenizer has {} ids and the text encoder {first}: add embeddings to both together",
                tokenizer.vocab_size()
            )));
        }
        let ids = tokenizer
            .add_embedding_token(&self.token, count)
            .map_err(|message| Error::Embedding {
                path: self.path.clone(),
                message,
            })?;
        debug_assert_eq!(ids[0] as usize, first);
        encoder.add_token_embeddings(vectors.clone());
        Ok(ids)
    }
}

/// Reads one embedding tensor, `[width]` or `[vectors, width]`, as f32 `[vectors, width]`.
fn read_vectors(
    file: &WeightsFile,
    name: &str,
    bad: &dyn Fn(String) -> Error,
) -> Result<TensorData> {
    let tensor = file.tensor(name)?;
    let (count, width) = match *tensor.shape() {
        [width] => (1, width),
        [count, width] => (count, width),
        ref other => {
            return Err(bad(format!(
                "`{name}` has shape {other:?}; expected [width] or [vectors, width]"
            )));
        }
    };
    if count == 0 || width == 0 {
        return Err(bad(format!("`{name}` is empty")));
    }
    let values = tensor
        .read()?
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| bad(format!("cannot read `{name}`: {e:?}")))?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!("`{name}` holds {} at index {i}", values[i])));
    }
    Ok(TensorData::new(values, [count, width]))
}
