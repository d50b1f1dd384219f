//! Single-file Stable Diffusion 1.x / 2.x checkpoints: one `.safetensors` file with the original
//! CompVis / LDM key names (`model.diffusion_model.*`, `first_stage_model.*`,
//! `cond_stage_model.*`), as A1111, ComfyUI and civitai distribute models.
//!
//! The tensors are mapped onto Kiln's (diffusers-named) modules as diffusers'
//! `loaders/single_file_utils.py` maps them (diffusers 0.42.1): UNet `input_blocks` /
//! `middle_block` / `output_blocks` to `down_blocks` / `mid_block` / `up_blocks`, the VAE's
//! `down.i.block.j` and reversed `up.i` to `down_blocks` / `up_blocks` (its 1x1-convolution
//! attention weights reshaped to linear ones), the SD 1.x text encoder (transformers' CLIP under
//! `cond_stage_model.transformer.`) as is, and the SD 2.x OpenCLIP text encoder
//! (`cond_stage_model.model.`) with its fused `in_proj` split into q, k and v. Everything else a
//! checkpoint carries (the DDPM schedule buffers, EMA copies, `position_ids`, OpenCLIP's
//! `text_projection` and `logit_scale`, a VAE's training loss) is skipped; a tensor under a
//! model prefix that maps nowhere is an error, as with every Kiln load.
//!
//! The configs come from a diffusers folder when the caller gives one (diffusers'
//! `from_single_file(config=...)`), or are inferred from the tensor shapes: channels, layers,
//! which blocks attend, the cross-attention width, linear or convolutional projections, 4 or 9
//! input channels. What shapes cannot tell follows the family, which the text encoder's layout
//! names: SD 1.x (transformers CLIP) has 8 attention heads per UNet block, SD 2.x (OpenCLIP) heads
//! of 64 channels and takes the text encoder's penultimate layer; text encoders have heads of 64
//! channels. Pickle `.ckpt` files are refused: unpickling can execute code.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_clip::ClipTextConfig;
use kiln_nn::weights::{LazyTensor, SafetensorsFile};
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

/// The Stable Diffusion family a checkpoint belongs to, named by its text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: OpenAI CLIP ViT-L/14 text encoder.
    V1,
    /// SD 2.x: OpenCLIP ViT-H/14 text encoder, penultimate layer.
    V2,
}

impl Family {
    /// The tokenizer's padding token: `<|endoftext|>` for SD 1.x, `!` for SD 2.x.
    pub fn pad_token(self) -> &'static str {
        match self {
            Self::V1 => "<|endoftext|>",
            Self::V2 => "!",
        }
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
    /// The text encoder.
    pub text_encoder: ClipTextConfig,
    /// The scheduler.
    pub scheduler: SchedulerConfig,
    /// The same four configs as diffusers' / transformers' `config.json` files (`unet`, `vae`,
    /// `text_encoder`, `scheduler`), for writing a diffusers folder.
    pub json: BTreeMap<&'static str, Value>,
}

impl SingleFileConfig {
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
            "`{key}` has shape {s:?}, not the {N} dimensions an SD 1.x/2.x checkpoint has there"
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

/// The family, from the text encoder's layout.
pub(crate) fn family(shapes: &Shapes<'_>) -> Result<Family> {
    if shapes.keys().any(|k| k.starts_with(OPEN_CLIP)) {
        Ok(Family::V2)
    } else if shapes.keys().any(|k| k.starts_with(CLIP)) {
        Ok(Family::V1)
    } else if shapes
        .keys()
        .any(|k| k.starts_with("conditioner.embedders."))
    {
        Err(invalid(
            "this is an SDXL checkpoint (`conditioner.embedders.*`); Kiln reads SD 1.x and 2.x",
        ))
    } else {
        Err(invalid(
            "no text encoder: expected `cond_stage_model.transformer.*` (SD 1.x) or `cond_stage_model.model.*` (SD 2.x) tensors",
        ))
    }
}

fn vae_prefix(shapes: &Shapes<'_>) -> Result<&'static str> {
    VAE.into_iter()
        .find(|p| shapes.contains_key(format!("{p}encoder.conv_in.weight").as_str()))
        .ok_or_else(|| invalid("no VAE: expected `first_stage_model.*` tensors"))
}

/// The text-encoder prefix of an SD 1.x file, with or without transformers' `text_model.`.
fn clip_prefix(shapes: &Shapes<'_>) -> String {
    let with = format!("{CLIP}text_model.");
    if shapes.keys().any(|k| k.starts_with(&with)) {
        with
    } else {
        CLIP.to_string()
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
    if !shapes.keys().any(|k| k.starts_with(UNET)) {
        return Err(invalid(
            "no UNet: expected `model.diffusion_model.*` tensors (is this a diffusers-format or LoRA file?)",
        ));
    }
    let family = family(shapes)?;
    let conv = |key: &str| dims::<4>(shapes, &format!("{UNET}{key}"));

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
            "the UNet has no mid-block attention (`middle_block.1`); SD 1.x/2.x UNets do",
        ));
    }
    let (Some(proj_in), Some(context)) = (proj_in, context) else {
        return Err(invalid("the UNet has no cross-attention blocks"));
    };
    let linear = proj_in.len() == 2;
    let heads: Value = match family {
        Family::V1 => json!(8),
        Family::V2 => {
            if let Some(c) = channels.iter().find(|c| !c.is_multiple_of(64)) {
                return Err(invalid(format!(
                    "cannot infer attention heads: SD 2.x uses heads of 64 channels, and a block has {c}; give the configs: a diffusers folder (`kiln generate --config DIR`, `SingleFileOptions::config`)"
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
    let latent_size = if family == Family::V2 && v_model {
        96
    } else {
        64
    };
    let unet = json!({
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

    // VAE
    let vae_at = vae_prefix(shapes)?;
    let v = |key: &str| dims::<4>(shapes, &format!("{vae_at}{key}"));
    let vae_blocks = indices(shapes, &format!("{vae_at}encoder.down.")).len();
    let vae_channels = (0..vae_blocks)
        .map(|i| v(&format!("encoder.down.{i}.block.0.conv1.weight")).map(|s| s[0]))
        .collect::<Result<Vec<_>>>()?;
    let vae = json!({
        "in_channels": v("encoder.conv_in.weight")?[1],
        "out_channels": v("decoder.conv_out.weight")?[0],
        "down_block_types": vec!["DownEncoderBlock2D"; vae_blocks],
        "up_block_types": vec!["UpDecoderBlock2D"; vae_blocks],
        "block_out_channels": vae_channels,
        "layers_per_block": indices(shapes, &format!("{vae_at}encoder.down.0.block.")).len(),
        "latent_channels": v("decoder.conv_in.weight")?[1],
        "norm_num_groups": 32,
        "sample_size": latent_size * 8,
        "scaling_factor": 0.18215,
        "use_quant_conv": shapes.contains_key(format!("{vae_at}quant_conv.weight").as_str()),
        "use_post_quant_conv": shapes.contains_key(format!("{vae_at}post_quant_conv.weight").as_str()),
        "mid_block_add_attention": shapes.contains_key(format!("{vae_at}encoder.mid.attn_1.q.weight").as_str()),
    });

    // text encoder
    let text = match family {
        Family::V1 => {
            let p = clip_prefix(shapes);
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
            })
        }
        Family::V2 => {
            let t = |key: &str| dims::<2>(shapes, &format!("{OPEN_CLIP}{key}"));
            let [vocab, hidden] = t("token_embedding.weight")?;
            let blocks = indices(shapes, &format!("{OPEN_CLIP}transformer.resblocks.")).len();
            if blocks < 2 {
                return Err(invalid(format!(
                    "the OpenCLIP text encoder has {blocks} layer(s); SD 2.x uses the penultimate of at least 2"
                )));
            }
            json!({
                "vocab_size": vocab,
                "hidden_size": hidden,
                "intermediate_size": t("transformer.resblocks.0.mlp.c_fc.weight")?[0],
                // SD 2.x conditions on the penultimate layer: the last block is never run
                "num_hidden_layers": blocks - 1,
                "num_attention_heads": text_heads(hidden)?,
                "max_position_embeddings": t("positional_embedding")?[0],
                "hidden_act": "gelu",
            })
        }
    };

    let scheduler = default_scheduler(prediction, v_model && !inpainting);
    let mut unet = unet;
    unet["_class_name"] = json!("UNet2DConditionModel");
    let mut vae = vae;
    vae["_class_name"] = json!("AutoencoderKL");
    let mut text = text;
    text["architectures"] = json!(["CLIPTextModel"]);
    text["model_type"] = json!("clip_text_model");
    Ok(SingleFileConfig {
        family,
        unet: from_value(unet.clone(), "UNet")?,
        vae: from_value(vae.clone(), "VAE")?,
        text_encoder: from_value(text.clone(), "text encoder")?,
        scheduler: SchedulerConfig::from_json(&scheduler.to_string())?,
        json: BTreeMap::from([
            ("unet", unet),
            ("vae", vae),
            ("text_encoder", text),
            ("scheduler", scheduler),
        ]),
    })
}

/// Writes a single-file checkpoint as a diffusers folder at `out` (which must not exist): each
/// component's tensors under diffusers' names in their file dtype (the text encoder with
/// transformers' `text_model.` prefix, as the hub's SD repos have it), the configs (inferred, or
/// those of `options.config`), the tokenizer (`options.config`'s, or CLIP's vocabulary with the
/// family's padding token) and `model_index.json`. Values are copied, never recomputed: the
/// folder loads to exactly the weights the checkpoint holds. The folder is assembled under a
/// temporary name beside `out` and renamed into place.
pub fn convert_to_diffusers(path: &Path, options: &SingleFileOptions, out: &Path) -> Result<()> {
    check_extension(path)?;
    let file = SafetensorsFile::open(path)?;
    let shapes = shapes_of(&file);
    let (family, mut json) = match &options.config {
        Some(dir) => {
            kiln_nn::config::require_dir(dir, "config folder")?;
            let mut json = BTreeMap::new();
            for (name, file) in [
                ("unet", "unet/config.json"),
                ("vae", "vae/config.json"),
                ("text_encoder", "text_encoder/config.json"),
                ("scheduler", "scheduler/scheduler_config.json"),
            ] {
                let value: Value = kiln_nn::config::read_json(&dir.join(file), file)?;
                json.insert(name, value);
            }
            (family(&shapes)?, json)
        }
        None => {
            let c = infer_config(&shapes, options.prediction_type)?;
            (c.family, c.json)
        }
    };
    if let Some(p) = options.prediction_type {
        json.get_mut("scheduler").expect("always present")["prediction_type"] =
            json!(prediction_name(p));
    }
    let unet: UNet2DConditionModelConfig = from_value(json["unet"].clone(), "UNet")?;
    let vae: AutoencoderKLConfig = from_value(json["vae"].clone(), "VAE")?;
    let text: ClipTextConfig = from_value(json["text_encoder"].clone(), "text encoder")?;

    kiln_nn::config::write_dir_atomically(out, false, |tmp: &Path| -> Result<()> {
        let components = [
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
            (
                "text_encoder",
                "model.safetensors",
                text_tensors(&file, family, text.num_hidden_layers, text.hidden_size)?
                    .into_iter()
                    .map(|(k, t)| (format!("text_model.{k}"), t))
                    .collect(),
            ),
        ];
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
        let tokenizer = tmp.join("tokenizer");
        match options.config.as_ref().map(|d| d.join("tokenizer")) {
            Some(src) if src.is_dir() => kiln_nn::config::copy_dir(&src, &tokenizer)?,
            _ => kiln_clip::ClipTokenizer::write_embedded(&tokenizer, family.pad_token())?,
        }
        let inpainting = unet.in_channels == 2 * vae.latent_channels + 1;
        write_model_index(tmp, &json["scheduler"], inpainting)
    })
}

/// Writes `model_index.json` of a Stable Diffusion folder into `dir`: the pipeline class
/// (`StableDiffusionInpaintPipeline` for a 9-channel UNet), the scheduler's class from
/// `scheduler_config`'s `_class_name`, and the standard component classes; no safety checker.
pub fn write_model_index(dir: &Path, scheduler_config: &Value, inpainting: bool) -> Result<()> {
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": if inpainting { "StableDiffusionInpaintPipeline" } else { "StableDiffusionPipeline" },
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", scheduler_config["_class_name"].clone()],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )
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
pub(crate) fn unet_tensors(
    file: &SafetensorsFile,
    layers: usize,
) -> Result<Vec<(String, LazyTensor)>> {
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
pub(crate) fn vae_tensors(
    file: &SafetensorsFile,
    blocks: usize,
) -> Result<Vec<(String, LazyTensor)>> {
    let shapes = shapes_of(file);
    let prefix = vae_prefix(&shapes)?;
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
}

/// kiln-clip's name for one text-encoder key (after `prefix`); `layers` limits an OpenCLIP tower.
fn text_key(key: &str, family: Family, layers: usize) -> Option<TextTarget> {
    use TextTarget::{One, Skip, Split};
    if family == Family::V1 {
        return Some(if key == "embeddings.position_ids" {
            Skip
        } else {
            One(key.to_string())
        });
    }
    Some(match key {
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

/// The text encoder's key prefix for `family`.
fn text_prefix(shapes: &Shapes<'_>, family: Family) -> String {
    match family {
        Family::V1 => clip_prefix(shapes),
        Family::V2 => OPEN_CLIP.to_string(),
    }
}

/// The text encoder's tensors under kiln-clip's names (transformers' without `text_model.`).
/// An OpenCLIP tower keeps its first `layers` blocks (SD 2.x's penultimate layer).
pub(crate) fn text_tensors(
    file: &SafetensorsFile,
    family: Family,
    layers: usize,
    hidden: usize,
) -> Result<Vec<(String, LazyTensor)>> {
    let prefix = text_prefix(&shapes_of(file), family);
    let mut out = Vec::new();
    for (name, _) in file.tensors() {
        let Some(key) = name.strip_prefix(prefix.as_str()) else {
            continue;
        };
        match text_key(key, family, layers) {
            None => {
                return Err(invalid(format!(
                    "unrecognised text-encoder tensor `{name}`"
                )));
            }
            Some(TextTarget::Skip) => {}
            Some(TextTarget::One(target)) => out.push((target, file.tensor(name)?)),
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
pub(crate) fn shapes_of(file: &SafetensorsFile) -> Shapes<'_> {
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

/// Refuses pickle checkpoints with the reason and the fix.
pub(crate) fn check_extension(path: &Path) -> Result<()> {
    Ok(kiln_nn::weights::refuse_pickle(path)?)
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
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/single-file/manifests")
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

    /// Maps every tensor name of a manifest; returns the (UNet, VAE, text) target names.
    fn map_all(m: &Manifest) -> [BTreeSet<String>; 3] {
        let shapes = m.shapes();
        let c = infer_config(&shapes, None).unwrap();
        let layers = uniform_layers(&c.unet).unwrap();
        let blocks = c.vae.block_out_channels.len();
        let text_at = text_prefix(&shapes, c.family);
        let mut out: [BTreeSet<String>; 3] = Default::default();
        let mut count = [0; 3];
        for name in m.tensors.keys() {
            if let Some(k) = name.strip_prefix(UNET) {
                out[0].insert(unet_key(k, layers).unwrap_or_else(|| panic!("{name}")));
                count[0] += 1;
            } else if let Some(k) = name.strip_prefix("first_stage_model.") {
                out[1].insert(vae_key(k, blocks).unwrap_or_else(|| panic!("{name}")));
                count[1] += 1;
            } else if let Some(k) = name.strip_prefix(text_at.as_str()) {
                match text_key(k, c.family, c.text_encoder.num_hidden_layers) {
                    Some(TextTarget::One(t)) => {
                        out[2].insert(t);
                        count[2] += 1;
                    }
                    Some(TextTarget::Split(ts)) => {
                        out[2].extend(ts);
                        count[2] += 3;
                    }
                    Some(TextTarget::Skip) => {}
                    None => panic!("{name}"),
                }
            }
        }
        // no two tensors land on the same parameter
        assert_eq!(count, [out[0].len(), out[1].len(), out[2].len()]);
        out
    }

    #[test]
    fn every_full_size_tensor_maps_onto_one_parameter() {
        // diffusers' parameter counts: UNet 686, VAE 248, text encoder 196 (SD 1.5) / 372 (SD 2.1)
        let [unet, vae, text] = map_all(&manifest("sd15"));
        assert_eq!((unet.len(), vae.len(), text.len()), (686, 248, 196));
        let [unet, vae, text] = map_all(&manifest("sd21"));
        assert_eq!((unet.len(), vae.len(), text.len()), (686, 248, 372));
        assert!(text.contains("encoder.layers.22.self_attn.v_proj.bias"));
        assert!(!text.iter().any(|t| t.starts_with("encoder.layers.23.")));
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
        assert_eq!(
            text_key(
                "transformer.resblocks.3.attn.in_proj_weight",
                Family::V2,
                23
            ),
            Some(TextTarget::Split(
                ["q_proj", "k_proj", "v_proj"]
                    .map(|p| format!("encoder.layers.3.self_attn.{p}.weight"))
            ))
        );
        assert_eq!(
            text_key("transformer.resblocks.23.mlp.c_fc.weight", Family::V2, 23),
            Some(TextTarget::Skip)
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
        sdxl.insert("conditioner.embedders.0.transformer.x", &[1]);
        let e = infer_config(&sdxl, None).unwrap_err().to_string();
        assert!(e.contains("SDXL"), "{e}");
    }
}
