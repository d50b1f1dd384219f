//! Single-file Stable Diffusion 1.x / 2.x and SDXL checkpoints: one `.safetensors` file with the
//! original CompVis / LDM / Stability key names (`model.diffusion_model.*`, `first_stage_model.*`,
//! `cond_stage_model.*`, SDXL's `conditioner.embedders.*`), as A1111, ComfyUI and civitai
//! distribute models.
//!
//! The tensors are mapped onto Kiln's (diffusers-named) modules as diffusers'
//! `loaders/single_file_utils.py` maps them (diffusers 0.42.1): UNet `input_blocks` /
//! `middle_block` / `output_blocks` to `down_blocks` / `mid_block` / `up_blocks`, the VAE's
//! `down.i.block.j` and reversed `up.i` to `down_blocks` / `up_blocks` (its 1x1-convolution
//! attention weights reshaped to linear ones), the SD 1.x text encoder (transformers' CLIP under
//! `cond_stage_model.transformer.`) as is, and the SD 2.x OpenCLIP text encoder
//! (`cond_stage_model.model.`) with its fused `in_proj` split into q, k and v. SDXL's base holds
//! CLIP ViT-L under `conditioner.embedders.0.transformer.` and OpenCLIP ViT-bigG under
//! `conditioner.embedders.1.model.` (its `text_projection`, stored for `x @ P`, transposed into
//! transformers' linear weight), the refiner the bigG alone under `conditioner.embedders.0.model.`,
//! and the UNet's `add_embedding` is `label_emb.0`. Everything else a
//! checkpoint carries (the DDPM schedule buffers, EMA copies, `position_ids`, OpenCLIP's
//! `text_projection` and `logit_scale`, a VAE's training loss) is skipped; a tensor under a
//! model prefix that maps nowhere is an error, as with every Kiln load.
//!
//! The configs come from a diffusers folder when the caller gives one (diffusers'
//! `from_single_file(config=...)`), or are inferred from the tensor shapes: channels, layers,
//! which blocks attend, the cross-attention width, linear or convolutional projections, 4 or 9
//! input channels. What shapes cannot tell follows the family, which the text encoder's layout
//! names: SD 1.x (transformers CLIP) has 8 attention heads per UNet block, SD 2.x (OpenCLIP) heads
//! of 64 channels and takes the text encoder's penultimate layer; SDXL heads of 64 channels, six
//! time ids for the base and five (aesthetic score) for the refiner, SDXL's VAE scaling factor
//! and Euler scheduler; text encoders have heads of 64 channels. Pickle `.ckpt` files read the
//! same, through [`kiln_nn::weights::WeightsFile`] (no Python code is run; their `state_dict`
//! is the checkpoint).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_clip::ClipTextConfig;
use kiln_nn::weights::{LazyTensor, WeightsFile};
use kiln_scheduler::{PredictionType, SchedulerConfig};
use kiln_unet::UNet2DConditionModelConfig;
use kiln_unet::unet_2d_condition::PerBlock;
use kiln_vae::AutoencoderKLConfig;
use serde_json::{Value, json};

use crate::{Error, Result};

/// The UNet's key prefix.
const UNET: &str = "model.diffusion_model.";
/// The VAE's key prefixes (the second in a few community files).
const VAE: [&str; 2] = ["first_stage_model.", "vae."];
/// The SD 1.x text encoder: transformers' `CLIPTextModel` state dict.
const CLIP: &str = "cond_stage_model.transformer.";
/// The SD 2.x text encoder: OpenCLIP's text tower.
const OPEN_CLIP: &str = "cond_stage_model.model.";
/// SDXL base's first text encoder: transformers' CLIP ViT-L.
const XL_CLIP: &str = "conditioner.embedders.0.transformer.";
/// SDXL base's second text encoder: OpenCLIP ViT-bigG.
const XL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";
/// The SDXL refiner's one text encoder: OpenCLIP ViT-bigG.
const XL_REFINER_OPEN_CLIP: &str = "conditioner.embedders.0.model.";

/// How to read a single-file checkpoint.
#[derive(Debug, Clone, Default)]
pub struct SingleFileOptions {
    /// Float type of the UNet and VAE (the text encoder runs in f32).
    pub dtype: kiln_nn::FloatKind,
    /// A diffusers folder whose `unet/`, `vae/`, `text_encoder/` and `scheduler/` configs (and
    /// `tokenizer/`, if present) describe the checkpoint, instead of inferring them.
    pub config: Option<PathBuf>,
    /// Overrides the scheduler's prediction type (SD 2.x 768 models predict `v`, SD 2.x base
    /// models `epsilon`; a checkpoint does not say which).
    pub prediction_type: Option<PredictionType>,
}

/// The Stable Diffusion family a checkpoint belongs to, named by its text encoders.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L/14 text encoder.
    V1,
    /// SD 2.x: OpenCLIP ViT-H/14 text encoder, penultimate layer.
    V2,
    /// SDXL base: CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 with its projection.
    Xl,
    /// SDXL refiner: OpenCLIP ViT-bigG/14 with its projection alone.
    XlRefiner,
}

impl Family {
    /// The first tokenizer's padding token: `<|endoftext|>` for CLIP (SD 1.x, SDXL base), `!`
    /// for OpenCLIP (SD 2.x, the SDXL refiner).
    pub fn pad_token(self) -> &'static str {
        self.pad_tokens()[0]
    }

    /// Whether it is SDXL (base or refiner).
    pub fn is_xl(self) -> bool {
        matches!(self, Self::Xl | Self::XlRefiner)
    }

    /// The `(tokenizer, text encoder)` folders of its diffusers layout, in order.
    pub fn text_folders(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Self::V1 | Self::V2 => &[("tokenizer", "text_encoder")],
            Self::Xl => &[
                ("tokenizer", "text_encoder"),
                ("tokenizer_2", "text_encoder_2"),
            ],
            Self::XlRefiner => &[("tokenizer_2", "text_encoder_2")],
        }
    }

    /// Each text encoder's tokenizer padding token, in order.
    pub fn pad_tokens(self) -> &'static [&'static str] {
        match self {
            Self::V1 => &["<|endoftext|>"],
            Self::V2 | Self::XlRefiner => &["!"],
            Self::Xl => &["<|endoftext|>", "!"],
        }
    }
}

/// How a checkpoint stores one of its text encoders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TextSource {
    /// The key prefix (a CLIP's includes transformers' `text_model.` when the file has it).
    pub prefix: String,
    /// OpenCLIP's layout (`resblocks`, fused q/k/v) rather than transformers'.
    pub open_clip: bool,
    /// OpenCLIP's `text_projection` is the model's (SDXL), not skipped (SD 2.x).
    pub projection: bool,
    /// OpenCLIP blocks beyond the penultimate are dropped (SD 2.x never runs its last).
    pub penultimate: bool,
}

/// The text encoders of a `family` checkpoint, in order.
pub(crate) fn text_sources(shapes: &Shapes<'_>, family: Family) -> Vec<TextSource> {
    let clip = |prefix: &str| TextSource {
        prefix: clip_prefix(shapes, prefix),
        open_clip: false,
        projection: false,
        penultimate: false,
    };
    let open_clip = |prefix: &str, xl: bool| TextSource {
        prefix: prefix.to_string(),
        open_clip: true,
        projection: xl,
        penultimate: !xl,
    };
    match family {
        Family::V1 => vec![clip(CLIP)],
        Family::V2 => vec![open_clip(OPEN_CLIP, false)],
        Family::Xl => vec![clip(XL_CLIP), open_clip(XL_OPEN_CLIP, true)],
        Family::XlRefiner => vec![open_clip(XL_REFINER_OPEN_CLIP, true)],
    }
}

/// The configs of a single-file checkpoint's components.
#[derive(Debug, Clone)]
pub struct SingleFileConfig {
    /// SD 1.x or 2.x.
    pub family: Family,
    /// The UNet.
    pub unet: UNet2DConditionModelConfig,
    /// The VAE.
    pub vae: AutoencoderKLConfig,
    /// The (first) text encoder: the refiner's is its OpenCLIP bigG.
    pub text_encoder: ClipTextConfig,
    /// SDXL base: the second text encoder (OpenCLIP bigG).
    pub text_encoder_2: Option<ClipTextConfig>,
    /// The scheduler.
    pub scheduler: SchedulerConfig,
    /// The same configs as diffusers' / transformers' `config.json` files, by folder (`unet`,
    /// `vae`, `text_encoder` and / or `text_encoder_2`, `scheduler`), for writing a diffusers
    /// folder.
    pub json: BTreeMap<&'static str, Value>,
}

impl SingleFileConfig {
    /// The text encoders' configs, in order.
    pub fn text_configs(&self) -> Vec<&ClipTextConfig> {
        std::iter::once(&self.text_encoder)
            .chain(self.text_encoder_2.as_ref())
            .collect()
    }

    /// Whether the UNet is a 9-channel inpainting UNet.
    pub fn is_inpainting(&self) -> bool {
        self.unet.in_channels == 2 * self.vae.latent_channels + 1
    }
}

/// Names and shapes of a checkpoint's tensors, the input of [`infer_config`].
pub type Shapes<'a> = BTreeMap<&'a str, &'a [usize]>;

fn invalid(message: impl Into<String>) -> Error {
    Error::Checkpoint(message.into())
}

/// The shape of `key`, or an error naming it.
fn shape<'a>(shapes: &Shapes<'a>, key: &str) -> Result<&'a [usize]> {
    shapes
        .get(key)
        .copied()
        .ok_or_else(|| invalid(format!("no tensor `{key}`")))
}

/// The shape of `key` as exactly `N` dimensions, or an error naming it.
fn dims<const N: usize>(shapes: &Shapes<'_>, key: &str) -> Result<[usize; N]> {
    let s = shape(shapes, key)?;
    s.try_into().map_err(|_| {
        invalid(format!(
            "`{key}` has shape {s:?}, not the {N} dimensions a Stable Diffusion checkpoint has there"
        ))
    })
}

/// The distinct values of the numeric key segment after `prefix` (`input_blocks.` -> {0, 1, ...}).
fn indices(shapes: &Shapes<'_>, prefix: &str) -> BTreeSet<usize> {
    shapes
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next()?.parse().ok())
        .collect()
}

/// The family, from the text encoders' layout, of a file that is a checkpoint at all (it has a
/// UNet).
pub(crate) fn family(shapes: &Shapes<'_>) -> Result<Family> {
    let has = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    if !has(UNET) {
        return Err(invalid(
            "no UNet: expected `model.diffusion_model.*` tensors (is this a diffusers-format or LoRA file?)",
        ));
    }
    if has(OPEN_CLIP) {
        Ok(Family::V2)
    } else if has(CLIP) {
        Ok(Family::V1)
    } else if has("conditioner.embedders.") {
        match (has(XL_CLIP), has(XL_OPEN_CLIP), has(XL_REFINER_OPEN_CLIP)) {
            (true, true, _) => Ok(Family::Xl),
            (false, false, true) => Ok(Family::XlRefiner),
            (true, false, _) => Err(invalid(
                "this SDXL checkpoint has the CLIP ViT-L text encoder (`conditioner.embedders.0.transformer.*`) \
                 but not the OpenCLIP ViT-bigG one (`conditioner.embedders.1.model.*`): the file is incomplete",
            )),
            (false, true, _) => Err(invalid(
                "this SDXL checkpoint has the OpenCLIP ViT-bigG text encoder (`conditioner.embedders.1.model.*`) \
                 but not the CLIP ViT-L one (`conditioner.embedders.0.transformer.*`): the file is incomplete",
            )),
            _ => Err(invalid(
                "unrecognised SDXL text encoders: expected `conditioner.embedders.0.transformer.*` and \
                 `conditioner.embedders.1.model.*` (base) or `conditioner.embedders.0.model.*` (refiner)",
            )),
        }
    } else {
        Err(invalid(
            "no text encoder: expected `cond_stage_model.transformer.*` (SD 1.x), `cond_stage_model.model.*` (SD 2.x) \
             or `conditioner.embedders.*` (SDXL) tensors",
        ))
    }
}

fn vae_prefix(shapes: &Shapes<'_>) -> Result<&'static str> {
    VAE.into_iter()
        .find(|p| shapes.contains_key(format!("{p}encoder.conv_in.weight").as_str()))
        .ok_or_else(|| invalid("no VAE: expected `first_stage_model.*` tensors"))
}

/// The prefix of a transformers CLIP text encoder stored under `base`, with or without
/// transformers' `text_model.`.
fn clip_prefix(shapes: &Shapes<'_>, base: &str) -> String {
    let with = format!("{base}text_model.");
    if shapes.keys().any(|k| k.starts_with(&with)) {
        with
    } else {
        base.to_string()
    }
}

/// Layers per block of the UNet, from the `input_blocks` numbering: `n` blocks of `L` layers and
/// `n - 1` downsamplers follow `conv_in`.
fn unet_layers(shapes: &Shapes<'_>) -> Result<(usize, usize)> {
    let inputs = indices(shapes, &format!("{UNET}input_blocks."));
    let count = inputs.iter().max().map_or(0, |m| m + 1);
    let downsamplers = inputs
        .iter()
        .filter(|i| shapes.contains_key(format!("{UNET}input_blocks.{i}.0.op.weight").as_str()))
        .count();
    let blocks = downsamplers + 1;
    let layered = count.saturating_sub(1 + downsamplers);
    if count < 2 || layered == 0 || !layered.is_multiple_of(blocks) {
        return Err(invalid(format!(
            "unrecognised UNet layout: {count} input blocks with {downsamplers} downsamplers"
        )));
    }
    Ok((blocks, layered / blocks))
}

/// Infers every component's config from tensor names and shapes (see the module docs).
///
/// `prediction_type` chooses between SD 2.x's 768 (v-prediction, the default, as diffusers
/// assumes) and base (epsilon) models, which have identical shapes.
pub fn infer_config(
    shapes: &Shapes<'_>,
    prediction_type: Option<PredictionType>,
) -> Result<SingleFileConfig> {
    let family = family(shapes)?;
    let conv = |key: &str| dims::<4>(shapes, &format!("{UNET}{key}"));

    // text encoders first: SDXL's UNet is conditioned on the last one's pooled projection
    let texts = text_sources(shapes, family)
        .iter()
        .map(|source| text_config_json(shapes, source))
        .collect::<Result<Vec<_>>>()?;
    let first_folder = family.text_folders()[0].1;
    let pooled = texts.last().and_then(|t| t["projection_dim"].as_u64());

    // UNet
    let (blocks, layers) = unet_layers(shapes)?;
    let conv_in = conv("input_blocks.0.0.weight")?;
    let conv_out = conv("out.2.weight")?;
    let first = |b: usize| 1 + b * (layers + 1);
    let mut channels = Vec::with_capacity(blocks);
    let mut down = Vec::with_capacity(blocks);
    let mut depth = Vec::new();
    let mut proj_in: Option<&[usize]> = None;
    let mut context = None;
    for b in 0..blocks {
        channels.push(conv(&format!("input_blocks.{}.0.out_layers.3.weight", first(b)))?[0]);
        let attn = format!("{UNET}input_blocks.{}.1.", first(b));
        if let Some(p) = shapes.get(format!("{attn}proj_in.weight").as_str()) {
            down.push("CrossAttnDownBlock2D");
            proj_in = Some(p);
            depth.push(Some(
                indices(shapes, &format!("{attn}transformer_blocks.")).len(),
            ));
            context = Some(
                dims::<2>(
                    shapes,
                    &format!("{attn}transformer_blocks.0.attn2.to_k.weight"),
                )?[1],
            );
        } else {
            down.push("DownBlock2D");
            depth.push(None);
        }
    }
    let up: Vec<&str> = (0..blocks)
        .map(|b| {
            let key = format!("{UNET}output_blocks.{}.1.proj_in.weight", b * (layers + 1));
            if shapes.contains_key(key.as_str()) {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    if !shapes.contains_key(format!("{UNET}middle_block.1.proj_in.weight").as_str()) {
        return Err(invalid(
            "the UNet has no mid-block attention (`middle_block.1`); Stable Diffusion UNets do",
        ));
    }
    let (Some(proj_in), Some(context)) = (proj_in, context) else {
        return Err(invalid("the UNet has no cross-attention blocks"));
    };
    let linear = proj_in.len() == 2;
    let heads: Value = match family {
        Family::V1 => json!(8),
        Family::V2 | Family::Xl | Family::XlRefiner => {
            if let Some(c) = channels.iter().find(|c| !c.is_multiple_of(64)) {
                return Err(invalid(format!(
                    "cannot infer attention heads: SD 2.x and SDXL use heads of 64 channels, and a block has {c}; give the configs: a diffusers folder (`kiln generate --config DIR`, `SingleFileOptions::config`)"
                )));
            }
            json!(channels.iter().map(|c| c / 64).collect::<Vec<_>>())
        }
    };
    // one value when every attending block has the same depth; else one per down block
    // (blocks without attention take diffusers' default of 1)
    let depths: BTreeSet<usize> = depth.iter().flatten().copied().collect();
    let depth: Value = match depths.iter().collect::<Vec<_>>()[..] {
        [one] => json!(one),
        _ => json!(depth.iter().map(|d| d.unwrap_or(1)).collect::<Vec<_>>()),
    };
    let inpainting = conv_in[1] == 9;
    let prediction = prediction_type.unwrap_or(match (family, inpainting) {
        (Family::V2, false) => PredictionType::VPrediction,
        _ => PredictionType::Epsilon,
    });
    let v_model = prediction == PredictionType::VPrediction;
    let latent_size = match family {
        Family::Xl | Family::XlRefiner => 128,
        Family::V2 if v_model => 96,
        _ => 64,
    };
    let mut unet = json!({
        "sample_size": latent_size,
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "conv_in_kernel": conv_in[2],
        "conv_out_kernel": conv_out[2],
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": channels,
        "layers_per_block": layers,
        "cross_attention_dim": context,
        "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "use_linear_projection": linear,
        "upcast_attention": family == Family::V2 && v_model,
        "norm_num_groups": 32,
    });
    // SDXL: the pooled text embedding and the time ids through `label_emb.0` (`add_embedding`)
    if family.is_xl() {
        let [_, input] = dims::<2>(shapes, &format!("{UNET}label_emb.0.0.weight"))?;
        let ids = if family == Family::Xl { 6 } else { 5 };
        let pooled = pooled.unwrap_or(0) as usize;
        let dim = input
            .checked_sub(pooled)
            .filter(|r| r % ids == 0 && *r > 0)
            .map(|r| r / ids)
            .ok_or_else(|| {
                invalid(format!(
                    "the UNet's `label_emb.0.0.weight` takes {input} values; the pooled text embedding \
                     has {pooled}, which leaves no whole width for {ids} time ids"
                ))
            })?;
        unet["addition_embed_type"] = json!("text_time");
        unet["addition_time_embed_dim"] = json!(dim);
        unet["projection_class_embeddings_input_dim"] = json!(input);
    }

    // VAE
    let layout = VaeLayout::read(shapes, &VaeNames::Ldm(vae_prefix(shapes)?))?;
    let vae = json!({
        "in_channels": layout.in_channels,
        "out_channels": layout.out_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; layout.block_out_channels.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; layout.block_out_channels.len()],
        "block_out_channels": layout.block_out_channels,
        "layers_per_block": layout.layers_per_block,
        "latent_channels": layout.latent_channels,
        "norm_num_groups": 32,
        "sample_size": latent_size * 8,
        "scaling_factor": if family.is_xl() { 0.13025 } else { 0.18215 },
        "use_quant_conv": layout.use_quant_conv,
        "use_post_quant_conv": layout.use_post_quant_conv,
        "mid_block_add_attention": layout.mid_block_add_attention,
    });

    let scheduler = if family.is_xl() {
        xl_scheduler(prediction)
    } else {
        default_scheduler(prediction, v_model && !inpainting)
    };
    unet["_class_name"] = json!("UNet2DConditionModel");
    let mut vae = vae;
    vae["_class_name"] = json!("AutoencoderKL");
    let mut json = BTreeMap::from([("unet", unet), ("vae", vae), ("scheduler", scheduler)]);
    for ((_, folder), text) in family.text_folders().iter().zip(texts) {
        json.insert(*folder, text);
    }
    let text_encoder: ClipTextConfig = from_value(json[first_folder].clone(), "text encoder")?;
    let text_encoder_2 = match family {
        Family::Xl => Some(from_value(
            json["text_encoder_2"].clone(),
            "second text encoder",
        )?),
        _ => None,
    };
    Ok(SingleFileConfig {
        family,
        unet: from_value(json["unet"].clone(), "UNet")?,
        vae: from_value(json["vae"].clone(), "VAE")?,
        text_encoder,
        text_encoder_2,
        scheduler: SchedulerConfig::from_json(&json["scheduler"].to_string())?,
        json,
    })
}

/// The `config.json` of one text encoder, inferred from its tensors' shapes.
fn text_config_json(shapes: &Shapes<'_>, source: &TextSource) -> Result<Value> {
    let p = &source.prefix;
    let mut text = if !source.open_clip {
        let t = |key: &str| dims::<2>(shapes, &format!("{p}{key}"));
        let [vocab, hidden] = t("embeddings.token_embedding.weight")?;
        json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": t("encoder.layers.0.mlp.fc1.weight")?[0],
            "num_hidden_layers": indices(shapes, &format!("{p}encoder.layers.")).len(),
            "num_attention_heads": text_heads(hidden)?,
            "max_position_embeddings": t("embeddings.position_embedding.weight")?[0],
            "hidden_act": "quick_gelu",
            "projection_dim": hidden,
            "architectures": ["CLIPTextModel"],
        })
    } else {
        let t = |key: &str| dims::<2>(shapes, &format!("{p}{key}"));
        let [vocab, hidden] = t("token_embedding.weight")?;
        let blocks = indices(shapes, &format!("{p}transformer.resblocks.")).len();
        let needed = if source.penultimate { 2 } else { 1 };
        if blocks < needed {
            return Err(invalid(format!(
                "the OpenCLIP text encoder under `{p}` has {blocks} layer(s); at least {needed} needed"
            )));
        }
        json!({
            "vocab_size": vocab,
            "hidden_size": hidden,
            "intermediate_size": t("transformer.resblocks.0.mlp.c_fc.weight")?[0],
            // SD 2.x conditions on the penultimate layer: the last block is never run
            "num_hidden_layers": if source.penultimate { blocks - 1 } else { blocks },
            "num_attention_heads": text_heads(hidden)?,
            "max_position_embeddings": t("positional_embedding")?[0],
            "hidden_act": "gelu",
            "architectures": ["CLIPTextModel"],
        })
    };
    if source.projection {
        let [width, projection] = dims::<2>(shapes, &format!("{p}text_projection"))?;
        if width != text["hidden_size"].as_u64().unwrap_or(0) as usize {
            return Err(invalid(format!(
                "`{p}text_projection` has shape [{width}, {projection}]; its first dimension must be the \
                 encoder's width, {}",
                text["hidden_size"]
            )));
        }
        text["projection_dim"] = json!(projection);
        text["architectures"] = json!(["CLIPTextModelWithProjection"]);
    }
    text["model_type"] = json!("clip_text_model");
    Ok(text)
}

/// Writes a single-file checkpoint as a diffusers folder at `out` (which must not exist): each
/// component's tensors under diffusers' names in their file dtype (the text encoder with
/// transformers' `text_model.` prefix, as the hub's SD repos have it), the configs (inferred, or
/// those of `options.config`), the tokenizer (`options.config`'s, or CLIP's vocabulary with the
/// family's padding token) and `model_index.json`. Values are copied, never recomputed: the
/// folder loads to exactly the weights the checkpoint holds. The folder is assembled under a
/// temporary name beside `out` and renamed into place.
pub fn convert_to_diffusers(path: &Path, options: &SingleFileOptions, out: &Path) -> Result<()> {
    let file = WeightsFile::open(path)?;
    let shapes = shapes_of(&file);
    let family = family(&shapes)?;
    let folders = family.text_folders();
    let mut json = match &options.config {
        Some(dir) => {
            kiln_nn::config::require_dir(dir, "config folder")?;
            let mut json = BTreeMap::new();
            let files = [
                ("unet", "unet/config.json".to_string()),
                ("vae", "vae/config.json".to_string()),
                ("scheduler", "scheduler/scheduler_config.json".to_string()),
            ]
            .into_iter()
            .chain(
                folders
                    .iter()
                    .map(|(_, encoder)| (*encoder, format!("{encoder}/config.json"))),
            );
            for (name, file) in files {
                let value: Value = kiln_nn::config::read_json(&dir.join(&file), &file)?;
                json.insert(name, value);
            }
            json
        }
        None => infer_config(&shapes, options.prediction_type)?.json,
    };
    if let Some(p) = options.prediction_type {
        json.get_mut("scheduler").expect("always present")["prediction_type"] =
            json!(prediction_name(p));
    }
    let unet: UNet2DConditionModelConfig = from_value(json["unet"].clone(), "UNet")?;
    let vae: AutoencoderKLConfig = from_value(json["vae"].clone(), "VAE")?;
    let sources = text_sources(&shapes, family);
    let mut texts = Vec::with_capacity(folders.len());
    for ((_, encoder), source) in folders.iter().zip(&sources) {
        let text: ClipTextConfig = from_value(json[encoder].clone(), "text encoder")?;
        let tensors = text_tensors(&file, source, text.num_hidden_layers, text.hidden_size)?;
        texts.push((*encoder, tensors));
    }

    kiln_nn::config::write_dir_atomically(out, false, |tmp: &Path| -> Result<()> {
        let mut components = vec![
            (
                "unet",
                "diffusion_pytorch_model.safetensors",
                unet_tensors(&file, uniform_layers(&unet)?)?,
            ),
            (
                "vae",
                "diffusion_pytorch_model.safetensors",
                vae_tensors(&file, vae.block_out_channels.len())?,
            ),
        ];
        for (encoder, tensors) in texts {
            components.push((
                encoder,
                "model.safetensors",
                tensors
                    .into_iter()
                    .map(|(k, t)| (format!("text_model.{k}"), t))
                    .collect(),
            ));
        }
        for (component, weights, tensors) in components {
            let dir = tmp.join(component);
            create_dir(&dir)?;
            write_json(&dir.join("config.json"), &json[component])?;
            write_tensors(&dir.join(weights), tensors)?;
        }
        let scheduler_dir = tmp.join("scheduler");
        create_dir(&scheduler_dir)?;
        write_json(
            &scheduler_dir.join("scheduler_config.json"),
            &json["scheduler"],
        )?;
        for ((tokenizer, _), pad) in folders.iter().zip(family.pad_tokens()) {
            let target = tmp.join(tokenizer);
            match options.config.as_ref().map(|d| d.join(tokenizer)) {
                Some(src) if src.is_dir() => kiln_nn::config::copy_dir(&src, &target)?,
                _ => kiln_clip::ClipTokenizer::write_embedded(&target, pad)?,
            }
        }
        let inpainting = unet.in_channels == 2 * vae.latent_channels + 1;
        write_json(
            &tmp.join("model_index.json"),
            &model_index(&json["scheduler"], family, inpainting),
        )
    })
}

/// Writes `model_index.json` of a Stable Diffusion folder into `dir`: the pipeline class
/// (`StableDiffusionInpaintPipeline` for a 9-channel UNet), the scheduler's class from
/// `scheduler_config`'s `_class_name`, and the standard component classes; no safety checker.
pub fn write_model_index(dir: &Path, scheduler_config: &Value, inpainting: bool) -> Result<()> {
    write_json(
        &dir.join("model_index.json"),
        &model_index(scheduler_config, Family::V1, inpainting),
    )
}

/// `model_index.json` of a `family` folder: the pipeline class, the scheduler's class from
/// `scheduler_config`'s `_class_name`, and the component classes (SDXL's encoders, the
/// refiner's second one alone, its aesthetic score); no safety checker.
fn model_index(scheduler_config: &Value, family: Family, inpainting: bool) -> Value {
    let scheduler = json!(["diffusers", scheduler_config["_class_name"].clone()]);
    let clip = json!(["transformers", "CLIPTextModel"]);
    let with_projection = json!(["transformers", "CLIPTextModelWithProjection"]);
    let tokenizer = json!(["transformers", "CLIPTokenizer"]);
    let none = json!([null, null]);
    let models = json!({
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": scheduler,
    });
    let mut index = match family {
        Family::V1 | Family::V2 => json!({
            "_class_name": if inpainting { "StableDiffusionInpaintPipeline" } else { "StableDiffusionPipeline" },
            "feature_extractor": none,
            "requires_safety_checker": false,
            "safety_checker": none,
            "text_encoder": clip,
            "tokenizer": tokenizer,
        }),
        Family::Xl => json!({
            "_class_name": if inpainting { "StableDiffusionXLInpaintPipeline" } else { "StableDiffusionXLPipeline" },
            "force_zeros_for_empty_prompt": true,
            "text_encoder": clip,
            "text_encoder_2": with_projection,
            "tokenizer": tokenizer,
            "tokenizer_2": tokenizer,
        }),
        Family::XlRefiner => json!({
            "_class_name": "StableDiffusionXLImg2ImgPipeline",
            "force_zeros_for_empty_prompt": false,
            "requires_aesthetics_score": true,
            "text_encoder": none,
            "text_encoder_2": with_projection,
            "tokenizer": none,
            "tokenizer_2": tokenizer,
        }),
    };
    if let (Some(index), Some(models)) = (index.as_object_mut(), models.as_object()) {
        index.extend(models.clone());
    }
    index
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Nn(kiln_nn::Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, e))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| invalid(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| io_error(path, e))
}

/// Writes `tensors` (name, lazily read tensor) as one safetensors file, values and dtypes as read.
fn write_tensors(path: &Path, tensors: Vec<(String, LazyTensor)>) -> Result<()> {
    let mut data = Vec::with_capacity(tensors.len());
    for (name, tensor) in tensors {
        let values = tensor.read()?;
        let dtype = match tensor.dtype() {
            burn::tensor::DType::F32 => safetensors::Dtype::F32,
            burn::tensor::DType::F16 => safetensors::Dtype::F16,
            burn::tensor::DType::BF16 => safetensors::Dtype::BF16,
            burn::tensor::DType::F64 => safetensors::Dtype::F64,
            other => {
                return Err(invalid(format!(
                    "`{}` has dtype {other:?}, not a float",
                    tensor.name()
                )));
            }
        };
        data.push((name, dtype, tensor.shape().to_vec(), values.into_bytes()));
    }
    let views = data
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| invalid(format!("`{name}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path)
        .map_err(|e| invalid(format!("cannot write `{}`: {e}", path.display())))
}

/// CLIP text towers use heads of 64 channels (ViT-L/14: 12, ViT-H/14: 16).
fn text_heads(hidden: usize) -> Result<usize> {
    if hidden >= 64 && hidden.is_multiple_of(64) {
        Ok(hidden / 64)
    } else {
        Err(invalid(format!(
            "cannot infer the text encoder's attention heads from its width {hidden} (CLIP uses heads of 64 channels); give the configs: a diffusers folder (`kiln generate --config DIR`, `SingleFileOptions::config`)"
        )))
    }
}

/// The scheduler the hub's SD repos ship: SD 1.5's PNDM, or SD 2.1's DDIM for v-prediction.
fn default_scheduler(prediction: PredictionType, ddim: bool) -> Value {
    json!({
        "_class_name": if ddim { "DDIMScheduler" } else { "PNDMScheduler" },
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "clip_sample": false,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": prediction_name(prediction),
    })
}

/// The scheduler SDXL 1.0 ships: Euler, leading timesteps.
fn xl_scheduler(prediction: PredictionType) -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "clip_sample": false,
        "sample_max_value": 1.0,
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "interpolation_type": "linear",
        "use_karras_sigmas": false,
        "prediction_type": prediction_name(prediction),
    })
}

/// The name diffusers' configs use for `p`.
fn prediction_name(p: PredictionType) -> &'static str {
    match p {
        PredictionType::Epsilon => "epsilon",
        PredictionType::VPrediction => "v_prediction",
        PredictionType::Sample => "sample",
    }
}

fn from_value<T: serde::de::DeserializeOwned>(value: Value, what: &str) -> Result<T> {
    serde_json::from_value(value)
        .map_err(|e| invalid(format!("the inferred {what} config does not parse: {e}")))
}

/// The UNet's tensors under their diffusers names. `layers` is the (uniform) layers per block.
pub(crate) fn unet_tensors(file: &WeightsFile, layers: usize) -> Result<Vec<(String, LazyTensor)>> {
    let mut out = Vec::new();
    for (name, _) in file.tensors() {
        let Some(key) = name.strip_prefix(UNET) else {
            continue;
        };
        let target = unet_key(key, layers)
            .ok_or_else(|| invalid(format!("unrecognised UNet tensor `{name}`")))?;
        out.push((target, file.tensor(name)?));
    }
    Ok(out)
}

/// diffusers' name for one LDM UNet key (without the prefix).
fn unet_key(key: &str, layers: usize) -> Option<String> {
    let fixed = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
        // SDXL's text_time embedding
        ("label_emb.0.0.", "add_embedding.linear_1."),
        ("label_emb.0.2.", "add_embedding.linear_2."),
    ];
    for (from, to) in fixed {
        if let Some(rest) = key.strip_prefix(from) {
            return Some(format!("{to}{rest}"));
        }
    }
    let (head, rest) = key.split_once('.')?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    if head == "middle_block" {
        return match i {
            0 | 2 => Some(format!("mid_block.resnets.{}.{}", i / 2, resnet_key(rest)?)),
            1 => Some(format!("mid_block.attentions.0.{rest}")),
            _ => None,
        };
    }
    let (j, rest) = rest.split_once('.')?;
    let j: usize = j.parse().ok()?;
    let per = layers + 1;
    Some(match (head, j) {
        ("input_blocks", 0) if i >= 1 => {
            let (b, l) = ((i - 1) / per, (i - 1) % per);
            match rest.strip_prefix("op.") {
                Some(p) => format!("down_blocks.{b}.downsamplers.0.conv.{p}"),
                None => format!("down_blocks.{b}.resnets.{l}.{}", resnet_key(rest)?),
            }
        }
        ("input_blocks", 1) if i >= 1 => {
            let (b, l) = ((i - 1) / per, (i - 1) % per);
            format!("down_blocks.{b}.attentions.{l}.{rest}")
        }
        ("output_blocks", _) => {
            let (b, l) = (i / per, i % per);
            match (j, rest.strip_prefix("conv.")) {
                (0, _) => format!("up_blocks.{b}.resnets.{l}.{}", resnet_key(rest)?),
                (1 | 2, Some(p)) => format!("up_blocks.{b}.upsamplers.0.conv.{p}"),
                (1, None) => format!("up_blocks.{b}.attentions.{l}.{rest}"),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// diffusers' flat module name (`.` as `_`, as kohya writes them) for kohya's flat name of an
/// original-layout (SGM / LDM) UNet module, such as kohya's SDXL LoRAs use:
/// `input_blocks_4_1_transformer_blocks_0_attn1_to_q` is
/// `down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q`, `input_blocks_1_0_in_layers_2`
/// `down_blocks_0_resnets_0_conv1`. `None` for a name of another layout. `layers` is the UNet's
/// (uniform) layers per block.
pub(crate) fn sgm_lora_target(flat: &str, layers: usize) -> Option<String> {
    // the sublayers LDM names with dots (ResNets, samplers); an attention's inner path stays
    // flat, as its diffusers name is LDM's
    let dotted = |inner: &str| -> String {
        const SUBLAYERS: [(&str, &str); 8] = [
            ("in_layers_0", "in_layers.0."),
            ("in_layers_2", "in_layers.2."),
            ("emb_layers_1", "emb_layers.1."),
            ("out_layers_0", "out_layers.0."),
            ("out_layers_3", "out_layers.3."),
            ("skip_connection", "skip_connection."),
            ("op", "op."),
            ("conv", "conv."),
        ];
        SUBLAYERS
            .iter()
            .find(|(f, _)| *f == inner)
            .map_or_else(|| inner.to_string(), |(_, d)| (*d).to_string())
    };
    let fixed = [
        ("time_embed_0", "time_embed.0."),
        ("time_embed_2", "time_embed.2."),
        ("label_emb_0_0", "label_emb.0.0."),
        ("label_emb_0_2", "label_emb.0.2."),
        ("out_0", "out.0."),
        ("out_2", "out.2."),
    ];
    let key = if let Some((_, key)) = fixed.iter().find(|(f, _)| *f == flat) {
        (*key).to_string()
    } else if let Some(rest) = flat.strip_prefix("middle_block_") {
        let (i, inner) = rest.split_once('_')?;
        format!(
            "middle_block.{}.{}",
            i.parse::<usize>().ok()?,
            dotted(inner)
        )
    } else {
        let (head, rest) = ["input_blocks", "output_blocks"]
            .iter()
            .find_map(|h| flat.strip_prefix(&format!("{h}_")).map(|r| (*h, r)))?;
        let (i, rest) = rest.split_once('_')?;
        let (j, inner) = rest.split_once('_').unwrap_or((rest, ""));
        let (i, j) = (i.parse::<usize>().ok()?, j.parse::<usize>().ok()?);
        format!("{head}.{i}.{j}.{}", dotted(inner))
    };
    unet_key(&key, layers).map(|path| path.trim_end_matches('.').replace('.', "_"))
}

/// diffusers' names inside a ResNet block.
fn resnet_key(rest: &str) -> Option<String> {
    let map = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    map.iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|p| format!("{to}{p}")))
}

/// The VAE's tensors under their diffusers names; `blocks` is the number of resolution levels.
pub(crate) fn vae_tensors(file: &WeightsFile, blocks: usize) -> Result<Vec<(String, LazyTensor)>> {
    let prefix = vae_prefix(&shapes_of(file))?;
    vae_tensors_at(file, prefix, blocks)
}

/// [`vae_tensors`] under `prefix` (empty for a VAE file of its own).
fn vae_tensors_at(
    file: &WeightsFile,
    prefix: &str,
    blocks: usize,
) -> Result<Vec<(String, LazyTensor)>> {
    let mut out = Vec::new();
    for (name, _) in file.tensors() {
        let Some(key) = name.strip_prefix(prefix) else {
            continue;
        };
        // some checkpoints keep the autoencoder's training loss (LPIPS, discriminator)
        if key.starts_with("loss.") {
            continue;
        }
        let target = vae_key(key, blocks)
            .ok_or_else(|| invalid(format!("unrecognised VAE tensor `{name}`")))?;
        let mut tensor = file.tensor(name)?;
        // the mid attention's q, k, v and proj_out are 1x1 convolutions in LDM, linear in diffusers
        if target.contains(".attentions.0.to_") && tensor.shape().len() > 2 {
            let s = tensor.shape().to_vec();
            tensor = tensor.reshape(s[..2].to_vec())?;
        }
        out.push((target, tensor));
    }
    Ok(out)
}

/// How a file names an autoencoder's tensors.
enum VaeNames {
    /// The original LDM names (`encoder.down.0.block.0.conv1.weight`) under a prefix:
    /// `first_stage_model.` in a whole checkpoint, none in a VAE file of its own (A1111's
    /// `vae-ft-mse-840000-ema-pruned.safetensors`, `sdxl_vae.safetensors`).
    Ldm(&'static str),
    /// diffusers' names (`encoder.down_blocks.0.resnets.0.conv1.weight`), as in a `vae/`
    /// folder's weights.
    Diffusers,
}

impl VaeNames {
    /// The naming of the file's autoencoder, if it holds one.
    fn of(shapes: &Shapes<'_>) -> Option<Self> {
        let has = |key: &str| shapes.contains_key(key);
        let ldm = |p: &&str| {
            has(&format!("{p}encoder.conv_in.weight"))
                && has(&format!("{p}encoder.down.0.block.0.conv1.weight"))
        };
        if let Some(prefix) = VAE.into_iter().chain([""]).find(ldm) {
            return Some(Self::Ldm(prefix));
        }
        (has("encoder.conv_in.weight") && has("encoder.down_blocks.0.resnets.0.conv1.weight"))
            .then_some(Self::Diffusers)
    }

    /// The key of the first convolution of level `i`'s first encoder ResNet, and the prefix
    /// under which that level's ResNets are numbered.
    fn level(&self, i: usize) -> (String, String) {
        match self {
            Self::Ldm(p) => (
                format!("{p}encoder.down.{i}.block.0.conv1.weight"),
                format!("{p}encoder.down.{i}.block."),
            ),
            Self::Diffusers => (
                format!("encoder.down_blocks.{i}.resnets.0.conv1.weight"),
                format!("encoder.down_blocks.{i}.resnets."),
            ),
        }
    }
}

/// What an autoencoder's tensor shapes say of its config.
struct VaeLayout {
    in_channels: usize,
    out_channels: usize,
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    latent_channels: usize,
    use_quant_conv: bool,
    use_post_quant_conv: bool,
    mid_block_add_attention: bool,
}

impl VaeLayout {
    fn read(shapes: &Shapes<'_>, names: &VaeNames) -> Result<Self> {
        let p = match names {
            VaeNames::Ldm(p) => *p,
            VaeNames::Diffusers => "",
        };
        let v = |key: &str| dims::<4>(shapes, &format!("{p}{key}"));
        let has = |key: &str| shapes.contains_key(format!("{p}{key}").as_str());
        let levels = match names {
            VaeNames::Ldm(p) => indices(shapes, &format!("{p}encoder.down.")),
            VaeNames::Diffusers => indices(shapes, "encoder.down_blocks."),
        };
        let block_out_channels = (0..levels.len())
            .map(|i| dims::<4>(shapes, &names.level(i).0).map(|s| s[0]))
            .collect::<Result<Vec<_>>>()?;
        let mid_attention = match names {
            VaeNames::Ldm(_) => has("encoder.mid.attn_1.q.weight"),
            VaeNames::Diffusers => {
                has("encoder.mid_block.attentions.0.to_q.weight")
                    || has("encoder.mid_block.attentions.0.query.weight")
            }
        };
        Ok(Self {
            in_channels: v("encoder.conv_in.weight")?[1],
            out_channels: v("decoder.conv_out.weight")?[0],
            block_out_channels,
            layers_per_block: indices(shapes, &names.level(0).1).len(),
            latent_channels: v("decoder.conv_in.weight")?[1],
            use_quant_conv: has("quant_conv.weight"),
            use_post_quant_conv: has("post_quant_conv.weight"),
            mid_block_add_attention: mid_attention,
        })
    }

    /// `base` with this layout: what the file says, the rest (scaling factor, groups, tile
    /// size, upcasting) as `base` has it.
    fn apply(self, base: &AutoencoderKLConfig) -> AutoencoderKLConfig {
        let levels = self.block_out_channels.len();
        AutoencoderKLConfig {
            in_channels: self.in_channels,
            out_channels: self.out_channels,
            down_block_types: vec![
                kiln_vae::autoencoder_kl::DownBlockType::DownEncoderBlock2D;
                levels
            ],
            up_block_types: vec![kiln_vae::autoencoder_kl::UpBlockType::UpDecoderBlock2D; levels],
            block_out_channels: self.block_out_channels,
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
            mid_block_add_attention: self.mid_block_add_attention,
            ..base.clone()
        }
    }
}

/// Whether a VAE of `config` (at `path`) can stand in for one of `base`: latents of the same
/// channels, which the model's UNet works on.
pub(crate) fn check_vae_latents(
    config: &AutoencoderKLConfig,
    base: &AutoencoderKLConfig,
    path: &Path,
) -> Result<()> {
    if config.latent_channels != base.latent_channels {
        return Err(Error::Mismatch(format!(
            "the VAE at `{}` makes latents of {} channels; this model's UNet works on {} \
             (is it a VAE for another model family?)",
            path.display(),
            config.latent_channels,
            base.latent_channels
        )));
    }
    Ok(())
}

/// The autoencoder in one weights file (`.safetensors`, or a pickle): a VAE file of its own in
/// the original LDM layout (A1111's VAE files) or diffusers' (a `vae/` folder's weights without
/// their config), or the VAE of a whole single-file checkpoint. A file carries no config: its
/// tensor shapes give the layout (channels, levels, layers, latent channels, which convolutions
/// and attention exist), and `base` (the model's own VAE config) the rest, its scaling factor
/// included, as A1111 keeps the model's when it swaps VAEs. A VAE whose latents have other
/// channels than `base`'s is refused before any weight is read. Loaded strictly, converted to
/// `dtype`.
pub fn load_vae_file(
    path: &Path,
    base: &AutoencoderKLConfig,
    dtype: burn::tensor::DType,
    device: &burn::tensor::Device,
) -> Result<kiln_vae::AutoencoderKL> {
    let file = WeightsFile::open(path)?;
    let shapes = shapes_of(&file);
    let names = VaeNames::of(&shapes).ok_or_else(|| {
        invalid(format!(
            "`{}` holds no autoencoder: expected the original LDM names \
             (`encoder.down.0.block.0.conv1.weight`, also under `first_stage_model.`) or \
             diffusers' (`encoder.down_blocks.0.resnets.0.conv1.weight`)",
            path.display()
        ))
    })?;
    let config = VaeLayout::read(&shapes, &names)?.apply(base);
    config.validate()?;
    check_vae_latents(&config, base, path)?;
    let vae = kiln_vae::AutoencoderKL::new(&config, device)?;
    match names {
        VaeNames::Ldm(prefix) => kiln_nn::weights::load_tensors(
            vae,
            vae_tensors_at(&file, prefix, config.block_out_channels.len())?,
            dtype,
            path,
        )
        .map_err(|e| component_error(e, "VAE")),
        VaeNames::Diffusers => Ok(vae.load_weights(path, dtype)?),
    }
}

/// diffusers' name for one LDM VAE key (without the prefix).
fn vae_key(key: &str, blocks: usize) -> Option<String> {
    let (side, rest) = key.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        return matches!(side, "quant_conv" | "post_quant_conv").then(|| key.to_string());
    }
    let resnet = |r: &str| {
        r.strip_prefix("nin_shortcut.")
            .map(|p| format!("conv_shortcut.{p}"))
            .unwrap_or_else(|| r.to_string())
    };
    let mapped = if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else if let Some(r) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{}", resnet(r))
    } else if let Some(r) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{}", resnet(r))
    } else if let Some(r) = rest.strip_prefix("mid.attn_1.") {
        let (part, param) = r.split_once('.')?;
        let part = match part {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        format!("mid_block.attentions.0.{part}.{param}")
    } else {
        let (level, r) = rest.split_once('.')?;
        let (i, r) = r.split_once('.')?;
        let i: usize = i.parse().ok()?;
        // the decoder's `up` levels are numbered from the lowest resolution
        let (group, b) = match (side, level) {
            ("encoder", "down") => ("down_blocks", i),
            ("decoder", "up") if i < blocks => ("up_blocks", blocks - 1 - i),
            _ => return None,
        };
        if let Some(r) = r.strip_prefix("block.") {
            let (j, r) = r.split_once('.')?;
            format!("{group}.{b}.resnets.{j}.{}", resnet(r))
        } else if let Some(r) = r
            .strip_prefix("downsample.conv.")
            .or_else(|| r.strip_prefix("upsample.conv."))
        {
            let sampler = if group == "down_blocks" {
                "downsamplers"
            } else {
                "upsamplers"
            };
            format!("{group}.{b}.{sampler}.0.conv.{r}")
        } else {
            return None;
        }
    };
    Some(format!("{side}.{mapped}"))
}

/// Where one text-encoder tensor goes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum TextTarget {
    /// Not part of the model Kiln runs.
    Skip,
    /// One parameter.
    One(String),
    /// A fused q/k/v tensor split into three parameters along the first dimension.
    Split([String; 3]),
    /// One parameter, the transpose of the stored tensor (OpenCLIP's `text_projection`).
    Transposed(String),
}

/// kiln-clip's name for one text-encoder key (after `source.prefix`); `layers` limits an
/// OpenCLIP tower.
fn text_key(key: &str, source: &TextSource, layers: usize) -> Option<TextTarget> {
    use TextTarget::{One, Skip, Split, Transposed};
    if !source.open_clip {
        return Some(if key == "embeddings.position_ids" {
            Skip
        } else {
            One(key.to_string())
        });
    }
    Some(match key {
        // SDXL's pooled embedding: OpenCLIP multiplies `x @ text_projection`
        "text_projection" if source.projection => Transposed("text_projection.weight".into()),
        // the projection into CLIP's joint space, its temperature, a causal-mask buffer
        "text_projection" | "logit_scale" | "attn_mask" => Skip,
        "token_embedding.weight" => One("embeddings.token_embedding.weight".into()),
        "positional_embedding" => One("embeddings.position_embedding.weight".into()),
        _ => {
            if let Some(p) = key.strip_prefix("ln_final.") {
                return Some(One(format!("final_layer_norm.{p}")));
            }
            let rest = key.strip_prefix("transformer.resblocks.")?;
            let (i, rest) = rest.split_once('.')?;
            let i: usize = i.parse().ok()?;
            if i >= layers {
                // SD 2.x stops at the penultimate layer
                return Some(Skip);
            }
            let layer = format!("encoder.layers.{i}");
            if let Some(param) = rest.strip_prefix("attn.in_proj_") {
                return Some(Split(
                    ["q_proj", "k_proj", "v_proj"]
                        .map(|proj| format!("{layer}.self_attn.{proj}.{param}")),
                ));
            }
            let mapped = [
                ("ln_1.", "layer_norm1."),
                ("ln_2.", "layer_norm2."),
                ("attn.out_proj.", "self_attn.out_proj."),
                ("mlp.c_fc.", "mlp.fc1."),
                ("mlp.c_proj.", "mlp.fc2."),
            ]
            .iter()
            .find_map(|(from, to)| rest.strip_prefix(from).map(|p| format!("{to}{p}")))?;
            One(format!("{layer}.{mapped}"))
        }
    })
}

/// One text encoder's tensors under kiln-clip's names (transformers' without `text_model.`).
/// An OpenCLIP tower keeps its first `layers` blocks (SD 2.x's penultimate layer).
pub(crate) fn text_tensors(
    file: &WeightsFile,
    source: &TextSource,
    layers: usize,
    hidden: usize,
) -> Result<Vec<(String, LazyTensor)>> {
    let prefix = &source.prefix;
    let mut out = Vec::new();
    for (name, _) in file.tensors() {
        let Some(key) = name.strip_prefix(prefix.as_str()) else {
            continue;
        };
        match text_key(key, source, layers) {
            None => {
                return Err(invalid(format!(
                    "unrecognised text-encoder tensor `{name}`"
                )));
            }
            Some(TextTarget::Skip) => {}
            Some(TextTarget::One(target)) => out.push((target, file.tensor(name)?)),
            Some(TextTarget::Transposed(target)) => {
                out.push((target, file.tensor(name)?.transpose()?))
            }
            Some(TextTarget::Split(targets)) => {
                let fused = file.tensor(name)?;
                for (k, target) in targets.into_iter().enumerate() {
                    out.push((target, fused.clone().narrow(k * hidden, hidden)?));
                }
            }
        }
    }
    Ok(out)
}

/// Names and shapes of every tensor of `file`.
pub(crate) fn shapes_of(file: &WeightsFile) -> Shapes<'_> {
    file.tensors()
        .map(|(name, info)| (name, info.shape.as_slice()))
        .collect()
}

/// The uniform layers per block of a UNet config (LDM numbering assumes one count).
pub(crate) fn uniform_layers(config: &UNet2DConditionModelConfig) -> Result<usize> {
    match &config.layers_per_block {
        PerBlock::One(n) => Ok(*n),
        PerBlock::Many(v) if v.windows(2).all(|w| w[0] == w[1]) && !v.is_empty() => Ok(v[0]),
        PerBlock::Many(v) => Err(invalid(format!(
            "LDM checkpoints number UNet layers uniformly; this config has layers_per_block {v:?}"
        ))),
    }
}

/// A parameter no tensor of the file maps to is named by its diffusers name and component (the
/// LDM name it would have had is not unique to reconstruct); other errors pass through.
pub(crate) fn component_error(error: kiln_nn::Error, component: &str) -> Error {
    match error {
        kiln_nn::Error::MissingTensor { path, name } => invalid(format!(
            "`{}` has no tensor for the {component}'s `{name}` (diffusers name): the file is incomplete, or its config does not match it",
            path.display()
        )),
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    //! Inference and key mapping on the names and shapes of full-size SD 1.5 and SD 2.1
    //! checkpoints (`fixtures/single-file/manifests/`, written by
    //! `xtask/fixtures/single_file.py` and checked there against diffusers' own converters).

    use super::*;

    struct Manifest {
        tensors: BTreeMap<String, Vec<usize>>,
        diffusers: Value,
    }

    fn manifest(name: &str) -> Manifest {
        manifest_at("single-file", name)
    }

    /// `fixtures/<dir>/manifests/<name>.json`.
    fn manifest_at(dir: &str, name: &str) -> Manifest {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(dir)
            .join("manifests")
            .join(format!("{name}.json"));
        let value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let tensors = value["tensors"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    serde_json::from_value(v["shape"].clone()).unwrap(),
                )
            })
            .collect();
        Manifest {
            tensors,
            diffusers: value["diffusers"].clone(),
        }
    }

    impl Manifest {
        fn shapes(&self) -> Shapes<'_> {
            self.tensors
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
                .collect()
        }

        fn expected(
            &self,
        ) -> (
            UNet2DConditionModelConfig,
            AutoencoderKLConfig,
            ClipTextConfig,
        ) {
            let d = &self.diffusers;
            (
                serde_json::from_value(d["unet"].clone()).unwrap(),
                serde_json::from_value(d["vae"].clone()).unwrap(),
                serde_json::from_value(d["text_encoder"].clone()).unwrap(),
            )
        }
    }

    /// Fields diffusers writes that Kiln reads only to reject other UNet families.
    fn normalise(mut c: UNet2DConditionModelConfig) -> UNet2DConditionModelConfig {
        c.only_cross_attention = Value::Null;
        c.reverse_transformer_layers_per_block = Value::Null;
        c
    }

    /// The text encoder's config without the fields only a projection reads: SD 1.x / 2.x
    /// encoders have none (asserted), and diffusers' configs write `architectures` as null and
    /// `projection_dim` as whatever the hub's copy had.
    fn without_projection(mut c: ClipTextConfig) -> ClipTextConfig {
        assert!(!c.has_projection(), "{:?}", c.architectures);
        c.architectures = None;
        c.projection_dim = 0;
        c
    }

    #[test]
    fn sd15_configs_are_inferred_exactly() {
        let m = manifest("sd15");
        let c = infer_config(&m.shapes(), None).unwrap();
        let (unet, vae, text) = m.expected();
        assert_eq!(c.family, Family::V1);
        assert_eq!(normalise(c.unet), normalise(unet));
        assert_eq!(c.vae, vae);
        assert_eq!(without_projection(c.text_encoder), without_projection(text));
        assert_eq!(c.scheduler.kind.class_name(), "PNDMScheduler");
        assert_eq!(c.scheduler.prediction_type, PredictionType::Epsilon);
    }

    #[test]
    fn sd21_configs_are_inferred_exactly() {
        let m = manifest("sd21");
        let c = infer_config(&m.shapes(), None).unwrap();
        let (unet, vae, text) = m.expected();
        assert_eq!(c.family, Family::V2);
        assert_eq!(normalise(c.unet), normalise(unet));
        assert_eq!(c.vae, vae);
        // 24 OpenCLIP blocks in the file, 23 run
        assert_eq!(c.text_encoder.num_hidden_layers, 23);
        assert_eq!(without_projection(c.text_encoder), without_projection(text));
        assert_eq!(c.scheduler.kind.class_name(), "DDIMScheduler");
        assert_eq!(c.scheduler.prediction_type, PredictionType::VPrediction);
    }

    #[test]
    fn sd2_base_and_inpainting_variants_follow_the_prediction_type_and_channels() {
        let m = manifest("sd21");
        let base = infer_config(&m.shapes(), Some(PredictionType::Epsilon)).unwrap();
        assert_eq!(
            base.unet.sample_size,
            Some(kiln_unet::unet_2d_condition::SampleSize::Square(64))
        );
        assert!(!base.unet.upcast_attention);
        assert_eq!(base.scheduler.prediction_type, PredictionType::Epsilon);

        for name in ["sd15", "sd21"] {
            let mut m = manifest(name);
            m.tensors
                .get_mut("model.diffusion_model.input_blocks.0.0.weight")
                .unwrap()[1] = 9;
            let c = infer_config(&m.shapes(), None).unwrap();
            assert!(c.is_inpainting(), "{name}");
            assert_eq!(c.unet.in_channels, 9);
            assert_eq!(
                c.scheduler.prediction_type,
                PredictionType::Epsilon,
                "{name}"
            );
            assert_eq!(c.scheduler.kind.class_name(), "PNDMScheduler", "{name}");
        }
    }

    /// Maps every tensor name of a manifest; returns the target names of the UNet, the VAE and
    /// each text encoder.
    fn map_all(m: &Manifest) -> Vec<BTreeSet<String>> {
        let shapes = m.shapes();
        let c = infer_config(&shapes, None).unwrap();
        let layers = uniform_layers(&c.unet).unwrap();
        let blocks = c.vae.block_out_channels.len();
        let sources = text_sources(&shapes, c.family);
        let texts = c.text_configs();
        let mut out: Vec<BTreeSet<String>> = vec![Default::default(); 2 + sources.len()];
        let mut count = vec![0; out.len()];
        for name in m.tensors.keys() {
            if let Some(k) = name.strip_prefix(UNET) {
                out[0].insert(unet_key(k, layers).unwrap_or_else(|| panic!("{name}")));
                count[0] += 1;
            } else if let Some(k) = name.strip_prefix("first_stage_model.") {
                out[1].insert(vae_key(k, blocks).unwrap_or_else(|| panic!("{name}")));
                count[1] += 1;
            } else if let Some(i) = sources.iter().position(|s| name.starts_with(&s.prefix)) {
                let k = &name[sources[i].prefix.len()..];
                let (set, n) = (&mut out[2 + i], &mut count[2 + i]);
                match text_key(k, &sources[i], texts[i].num_hidden_layers) {
                    Some(TextTarget::One(t) | TextTarget::Transposed(t)) => {
                        set.insert(t);
                        *n += 1;
                    }
                    Some(TextTarget::Split(ts)) => {
                        set.extend(ts);
                        *n += 3;
                    }
                    Some(TextTarget::Skip) => {}
                    None => panic!("{name}"),
                }
            }
        }
        // no two tensors land on the same parameter
        assert_eq!(count, out.iter().map(BTreeSet::len).collect::<Vec<_>>());
        out
    }

    #[test]
    fn every_full_size_tensor_maps_onto_one_parameter() {
        // diffusers' parameter counts: UNet 686, VAE 248, text encoder 196 (SD 1.5) / 372 (SD 2.1)
        let lens = |sets: &[BTreeSet<String>]| sets.iter().map(BTreeSet::len).collect::<Vec<_>>();
        assert_eq!(lens(&map_all(&manifest("sd15"))), [686, 248, 196]);
        let sd21 = map_all(&manifest("sd21"));
        assert_eq!(lens(&sd21), [686, 248, 372]);
        assert!(sd21[2].contains("encoder.layers.22.self_attn.v_proj.bias"));
        assert!(!sd21[2].iter().any(|t| t.starts_with("encoder.layers.23.")));
        // SDXL 1.0 (diffusers' counts; `xtask/fixtures/sdxl_single_file.py`): both encoders
        // whole, the bigG with its projection
        let base = map_all(&manifest_at("sdxl/single-file", "sdxl_base"));
        assert_eq!(lens(&base), [1680, 248, 196, 517]);
        assert!(base[0].contains("add_embedding.linear_2.bias"));
        assert!(base[3].contains("encoder.layers.31.mlp.fc2.bias"));
        assert!(base[3].contains("text_projection.weight"));
        let refiner = map_all(&manifest_at("sdxl/single-file", "sdxl_refiner"));
        assert_eq!(lens(&refiner), [1220, 248, 517]);
    }

    /// The configs diffusers' SDXL 1.0 base and refiner folders publish, from the shapes alone.
    #[test]
    fn sdxl_configs_are_inferred_exactly() {
        for (name, family, folders) in [
            (
                "sdxl_base",
                Family::Xl,
                vec!["text_encoder", "text_encoder_2"],
            ),
            ("sdxl_refiner", Family::XlRefiner, vec!["text_encoder_2"]),
        ] {
            let m = manifest_at("sdxl/single-file", name);
            let c = infer_config(&m.shapes(), None).unwrap();
            assert_eq!(c.family, family);
            let d = &m.diffusers;
            let unet: UNet2DConditionModelConfig =
                serde_json::from_value(d["unet"].clone()).unwrap();
            assert_eq!(normalise(c.unet.clone()), normalise(unet), "{name}");
            let vae: AutoencoderKLConfig = serde_json::from_value(d["vae"].clone()).unwrap();
            assert_eq!(c.vae, vae, "{name}");
            assert_eq!(c.vae.scaling_factor, 0.13025);
            for (config, folder) in c.text_configs().into_iter().zip(&folders) {
                let want: ClipTextConfig = serde_json::from_value(d[*folder].clone()).unwrap();
                assert_eq!(config, &want, "{name} {folder}");
            }
            assert_eq!(c.text_configs().len(), folders.len());
            assert_eq!(c.scheduler.kind.class_name(), "EulerDiscreteScheduler");
            assert_eq!(c.scheduler.prediction_type, PredictionType::Epsilon);
        }
    }

    /// An SDXL file without one of the base's encoders says which one is missing.
    #[test]
    fn sdxl_files_missing_a_text_encoder_say_which() {
        let m = manifest_at("sdxl/single-file", "sdxl_base");
        for (drop, missing) in [(XL_OPEN_CLIP, "bigG"), (XL_CLIP, "ViT-L")] {
            let mut shapes = m.shapes();
            shapes.retain(|k, _| !k.starts_with(drop));
            let e = infer_config(&shapes, None).unwrap_err().to_string();
            assert!(e.contains(missing) && e.contains("incomplete"), "{e}");
        }
    }

    #[test]
    fn ldm_names_map_to_diffusers_names() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "input_blocks.11.0.emb_layers.1.weight",
                "down_blocks.3.resnets.1.time_emb_proj.weight",
            ),
            (
                "middle_block.0.out_layers.3.weight",
                "mid_block.resnets.0.conv2.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "middle_block.2.in_layers.2.bias",
                "mid_block.resnets.1.conv1.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.3.1.norm.weight",
                "up_blocks.1.attentions.0.norm.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.11.0.out_layers.0.bias",
                "up_blocks.3.resnets.2.norm2.bias",
            ),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_key(ldm, 2).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(unet_key("input_blocks.1.7.weight", 2), None);
        // kohya's SDXL LoRA names (SGM layout, flat), two layers per block
        for (sgm, diffusers) in [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q",
            ),
            (
                "input_blocks_1_0_in_layers_2",
                "down_blocks_0_resnets_0_conv1",
            ),
            ("input_blocks_0_0", "conv_in"),
            ("input_blocks_3_0_op", "down_blocks_0_downsamplers_0_conv"),
            ("middle_block_1_proj_out", "mid_block_attentions_0_proj_out"),
            (
                "middle_block_2_emb_layers_1",
                "mid_block_resnets_1_time_emb_proj",
            ),
            ("output_blocks_2_2_conv", "up_blocks_0_upsamplers_0_conv"),
            (
                "output_blocks_5_0_skip_connection",
                "up_blocks_1_resnets_2_conv_shortcut",
            ),
            ("label_emb_0_2", "add_embedding_linear_2"),
            ("time_embed_0", "time_embedding_linear_1"),
        ] {
            assert_eq!(sgm_lora_target(sgm, 2).as_deref(), Some(diffusers), "{sgm}");
        }
        for other in [
            "down_blocks_0_attentions_0_proj_in",
            "input_blocks_x_1",
            "text_model",
        ] {
            assert_eq!(sgm_lora_target(other, 2), None, "{other}");
        }
        let vae = [
            (
                "encoder.down.0.block.1.nin_shortcut.weight",
                "encoder.down_blocks.0.resnets.1.conv_shortcut.weight",
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.3.block.0.conv1.weight",
                "decoder.up_blocks.0.resnets.0.conv1.weight",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.attn_1.proj_out.bias",
                "decoder.mid_block.attentions.0.to_out.0.bias",
            ),
            (
                "encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
            ),
            ("encoder.norm_out.bias", "encoder.conv_norm_out.bias"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        for (ldm, diffusers) in vae {
            assert_eq!(vae_key(ldm, 4).as_deref(), Some(diffusers), "{ldm}");
        }
        let shapes = manifest("sd21");
        let sd2 = &text_sources(&shapes.shapes(), Family::V2)[0];
        assert_eq!(
            text_key("transformer.resblocks.3.attn.in_proj_weight", sd2, 23),
            Some(TextTarget::Split(
                ["q_proj", "k_proj", "v_proj"]
                    .map(|p| format!("encoder.layers.3.self_attn.{p}.weight"))
            ))
        );
        assert_eq!(
            text_key("transformer.resblocks.23.mlp.c_fc.weight", sd2, 23),
            Some(TextTarget::Skip)
        );
        assert_eq!(text_key("text_projection", sd2, 23), Some(TextTarget::Skip));
        let xl = manifest_at("sdxl/single-file", "sdxl_base");
        let big_g = &text_sources(&xl.shapes(), Family::Xl)[1];
        assert_eq!(
            text_key("text_projection", big_g, 32),
            Some(TextTarget::Transposed("text_projection.weight".into()))
        );
        assert_eq!(
            unet_key("label_emb.0.2.weight", 2).as_deref(),
            Some("add_embedding.linear_2.weight")
        );
    }

    #[test]
    fn misshapen_tensors_are_errors_not_panics() {
        let m = manifest("sd15");
        for key in [
            "model.diffusion_model.input_blocks.0.0.weight",
            "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
            "first_stage_model.decoder.conv_in.weight",
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        ] {
            let mut shapes = m.shapes();
            shapes.insert(key, &[7]);
            let e = infer_config(&shapes, None).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("dimensions"), "{e}");
        }
    }

    #[test]
    fn files_that_are_not_sd1_or_sd2_checkpoints_say_what_they_are() {
        let m = manifest("sd15");
        let without_unet: BTreeMap<&str, &[usize]> = m
            .shapes()
            .into_iter()
            .filter(|(k, _)| !k.starts_with(UNET))
            .collect();
        let e = infer_config(&without_unet, None).unwrap_err().to_string();
        assert!(e.contains("no UNet"), "{e}");
        let mut sdxl = m.shapes();
        sdxl.retain(|k, _| !k.starts_with("cond_stage_model."));
        sdxl.insert("conditioner.embedders.2.x", &[1]);
        let e = infer_config(&sdxl, None).unwrap_err().to_string();
        assert!(e.contains("SDXL"), "{e}");
    }
}
