//! The prompt side of a model: its tokenizers and CLIP text encoders, and the prompt encoding
//! every pipeline shares (one encoder for SD 1.x / 2.x, two for SDXL, the second alone for the
//! SDXL refiner).
//!
//! [`TextEncoders::from_dir`] loads only these from a diffusers folder (not the UNet or the VAE),
//! for tools that need embeddings alone (`kiln encode`); [`StableDiffusionPipeline`] encodes its
//! prompts through the same `encode_prompts`.
//!
//! [`StableDiffusionPipeline`]: crate::StableDiffusionPipeline

use std::path::Path;

use burn::tensor::{Device, Tensor};
use kiln_clip::{ClipTextModel, ClipTokenizer, HiddenLayer, PromptSyntax};
use kiln_unet::UNet2DConditionModelConfig;

use crate::pipeline_stable_diffusion::{missing_folders, text_components};
use crate::{Error, Result};

/// A prompt encoded by every text encoder of a model.
#[derive(Debug, Clone)]
pub struct PromptEncoding {
    /// The encoders' hidden states side by side: `[1, 77 * windows, width]`, `width` the sum of
    /// the encoders' widths.
    pub hidden_states: Tensor<3>,
    /// The last encoder's pooled output of the first window (CLIP's `pooler_output`):
    /// `[1, hidden]`.
    pub pooled: Tensor<2>,
    /// The last encoder's projected pooled output of the first window (`text_embeds`), where it
    /// has a projection (SDXL's second encoder): `[1, projection_dim]`.
    pub text_embeds: Option<Tensor<2>>,
}

impl PromptEncoding {
    /// The pooled embedding the model's pipeline uses (diffusers' `pooled_prompt_embeds`):
    /// the projected one where the last encoder has a projection, CLIP's pooled output
    /// otherwise.
    pub fn pooled_prompt_embeds(&self) -> Tensor<2> {
        self.text_embeds
            .clone()
            .unwrap_or_else(|| self.pooled.clone())
    }
}

/// The tokenizers and text encoders of a diffusers folder, loaded without the UNet and VAE.
#[derive(Debug)]
pub struct TextEncoders {
    /// `(tokenizer, text encoder)` pairs in the folder's order: `tokenizer/` and
    /// `text_encoder/`, then SDXL's `tokenizer_2/` and `text_encoder_2/`.
    pub encoders: Vec<(ClipTokenizer, ClipTextModel)>,
    /// Whether prompts are encoded as SDXL encodes them (the hidden state before the final
    /// layer norm, one layer earlier).
    pub sdxl: bool,
}

impl TextEncoders {
    /// Loads the tokenizers and text encoders of a diffusers folder. The folder is SDXL when
    /// its `unet/config.json` has the `text_time` addition embedding, or, without a UNet config,
    /// when it has `text_encoder_2/`.
    pub fn from_dir(dir: &Path, device: &Device) -> Result<Self> {
        let pairs = text_components(dir);
        let missing = missing_folders(dir, pairs.iter().flat_map(|(t, e)| [*t, *e]));
        if !missing.is_empty() {
            return Err(Error::IncompleteModel {
                dir: dir.to_path_buf(),
                missing: missing.join(", "),
            });
        }
        let unet_config = dir.join("unet").join("config.json");
        let sdxl = if unet_config.is_file() {
            UNet2DConditionModelConfig::from_file(&unet_config)?
                .text_time()
                .is_some()
        } else {
            dir.join("text_encoder_2").is_dir()
        };
        Ok(Self {
            encoders: load(dir, &pairs, device)?,
            sdxl,
        })
    }

    /// Encodes `prompts[i]` with the `i`-th text encoder, as
    /// [`StableDiffusionPipeline::encode_prompts`](crate::StableDiffusionPipeline::encode_prompts)
    /// does.
    pub fn encode_prompts(
        &self,
        prompts: [&str; 2],
        syntax: PromptSyntax,
        clip_skip: usize,
        device: &Device,
    ) -> Result<PromptEncoding> {
        let pairs: Vec<_> = self.encoders.iter().map(|(t, e)| (t, e)).collect();
        encode_prompts(&pairs, self.sdxl, prompts, syntax, clip_skip, device)
    }
}

/// The `(tokenizer, text encoder)` subfolders `pairs` of `dir`, loaded in order.
pub(crate) fn load(
    dir: &Path,
    pairs: &[(&str, &str)],
    device: &Device,
) -> Result<Vec<(ClipTokenizer, ClipTextModel)>> {
    pairs
        .iter()
        .map(|(tokenizer, encoder)| {
            Ok((
                ClipTokenizer::from_dir(dir.join(tokenizer))?,
                ClipTextModel::from_dir(dir.join(encoder), device)?,
            ))
        })
        .collect()
}

/// Encodes `prompts[i]` with the `i`-th of `encoders` (an encoder beyond the first reads the
/// second prompt) and concatenates their hidden states along the width.
///
/// SD 1.x / 2.x use the final layer norm of the layer `clip_skip` before the last; SDXL
/// (`sdxl`) the layer `clip_skip + 1` before the last, without the norm, as diffusers does. A
/// prompt that takes fewer windows in one encoder than in another (a different second prompt)
/// is padded with windows of the empty prompt.
pub(crate) fn encode_prompts(
    encoders: &[(&ClipTokenizer, &ClipTextModel)],
    sdxl: bool,
    prompts: [&str; 2],
    syntax: PromptSyntax,
    clip_skip: usize,
    device: &Device,
) -> Result<PromptEncoding> {
    let layer = if sdxl {
        HiddenLayer::Raw(clip_skip + 1)
    } else {
        HiddenLayer::Normed(clip_skip)
    };
    let mut states = Vec::with_capacity(encoders.len());
    let mut pooled = None;
    let mut text_embeds = None;
    for (i, (tokenizer, encoder)) in encoders.iter().enumerate() {
        let windows = tokenizer.tokenize_prompt(prompts[i.min(1)], syntax)?;
        let out = encoder.encode_windows(&windows, layer, device)?;
        states.push(out.hidden_state);
        pooled = Some(out.pooled);
        text_embeds = out.text_embeds;
    }
    let pooled =
        pooled.ok_or_else(|| Error::InvalidInput("no text encoder to encode with".into()))?;
    let longest = states.iter().map(|s| s.dims()[1]).max().unwrap_or(0);
    for (state, (tokenizer, encoder)) in states.iter_mut().zip(encoders) {
        let seq = state.dims()[1];
        if seq < longest {
            let empty = tokenizer.tokenize_prompt("", syntax)?;
            let empty = encoder.encode_windows(&empty, layer, device)?;
            let window = empty.hidden_state.dims()[1];
            let pad = empty
                .hidden_state
                .repeat_dim(1, (longest - seq) / window.max(1));
            *state = Tensor::cat(vec![state.clone(), pad], 1);
        }
    }
    Ok(PromptEncoding {
        hidden_states: Tensor::cat(states, 2),
        pooled,
        text_embeds,
    })
}
