//! The Stable Diffusion pipelines: text-to-image, image-to-image and inpainting in one
//! [`StableDiffusionPipeline`], as diffusers' `StableDiffusionPipeline`,
//! `StableDiffusionImg2ImgPipeline` and `StableDiffusionInpaintPipeline` compute them
//! (`diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion{,_img2img,_inpaint}.py`,
//! diffusers 0.42.1), with classifier-free guidance (Ho & Salimans 2022) and guidance rescale
//! (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", 3.4).
//!
//! The same pipeline runs SDXL (Podell et al. 2023) and its refiner, as diffusers'
//! `StableDiffusionXLPipeline` and `StableDiffusionXLImg2ImgPipeline` do
//! (`pipelines/stable_diffusion_xl/`): a model is SDXL when its UNet has the `text_time`
//! addition embedding. Its conditioning stage then concatenates the penultimate hidden states
//! (before the final layer norm) of every text encoder, pools the last encoder's projected
//! output and adds the size / crop (or aesthetic-score) time ids ([`MicroConditioning`]); the
//! rest of the run is the same code.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor, TensorData};
use kiln_clip::{ClipTextConfig, ClipTextModel, ClipTokenizer, PromptSyntax};
use kiln_nn::weights::{WeightsFile, load_tensors};
use kiln_scheduler::{
    AnyScheduler, NoiseSource, SamplerName, SamplerOptions, Scheduler, SchedulerConfig,
};
use kiln_unet::unet_2d_condition::{AddedConditioning, ExtraConditioning, SampleSize};
use kiln_unet::{UNet2DConditionModel, UNet2DConditionModelConfig};
use kiln_vae::{AutoencoderKL, AutoencoderKLConfig, TilingOptions};
use serde::Deserialize;

use crate::single_file::{self, Family, SingleFileOptions};
use crate::{Error, Result};

/// The subfolders a diffusers Stable Diffusion folder must have besides its text encoders
/// ([`text_components`]).
const COMPONENTS: [&str; 3] = ["unet", "vae", "scheduler"];

/// The `(tokenizer, text encoder)` subfolders of a model folder, in order: `tokenizer/` and
/// `text_encoder/`, then SDXL's `tokenizer_2/` and `text_encoder_2/` where the folder has them.
/// The SDXL refiner has only the second pair, which is then the one.
pub(crate) fn text_components(dir: &Path) -> Vec<(&'static str, &'static str)> {
    let second = dir.join("text_encoder_2").is_dir();
    let mut pairs = Vec::new();
    if dir.join("text_encoder").is_dir() || !second {
        pairs.push(("tokenizer", "text_encoder"));
    }
    if second {
        pairs.push(("tokenizer_2", "text_encoder_2"));
    }
    pairs
}

/// The subfolders among `names` that `dir` lacks, each written `name/`.
pub(crate) fn missing_folders<'a>(
    dir: &Path,
    names: impl IntoIterator<Item = &'a str>,
) -> Vec<String> {
    names
        .into_iter()
        .filter(|c| !dir.join(c).is_dir())
        .map(|c| format!("{c}/"))
        .collect()
}

/// `model_index.json`: the class name and SDXL's `force_zeros_for_empty_prompt`; components
/// are found by folder name.
#[derive(Debug, Clone, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
    /// SDXL: an empty negative prompt is all-zero embeddings (default true for SDXL classes).
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
}

/// How to load a pipeline: the float type of the UNet and VAE (the text encoder always runs in
/// f32, its cost being negligible).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LoadOptions {
    /// Weights and activations of the UNet and VAE. F16 prefers the `.fp16.` weight files.
    pub dtype: kiln_nn::FloatKind,
}

/// What kind of run: from noise, from an image, or filling a masked region.
// One value per run, never stored in bulk: boxing the tensors would only add indirection.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Default)]
pub enum Mode {
    /// Text to image from (seeded or given) noise.
    #[default]
    Txt2Img,
    /// Image to image: the image is encoded, noised to the `strength` point of the schedule and
    /// denoised from there.
    Img2Img {
        /// `[1, 3, height, width]`, values in [-1, 1]; or latents as the UNet sees them,
        /// `[1 or num_images, latent channels, height / f, width / f]` (diffusers takes a
        /// 4-channel image as latents too), such as an SDXL base's
        /// [`generate_latents`](StableDiffusionPipeline::generate_latents) for its refiner.
        image: Tensor<4>,
        /// In (0, 1]: the fraction of the schedule run (1 ignores the image).
        strength: f64,
    },
    /// Inpainting: regenerate where `mask` is 1, keep the rest. A 9-channel inpainting UNet gets
    /// the mask and the masked image's latents as extra input; a regular UNet's latents are
    /// blended with the noised original after every step.
    Inpaint {
        /// `[1, 3, height, width]`, values in [-1, 1].
        image: Tensor<4>,
        /// `[1, 1, height, width]`, values in [0, 1] (binarised at 0.5; 1 = repaint).
        mask: Tensor<4>,
        /// In (0, 1]: the fraction of the schedule run.
        strength: f64,
    },
}

/// The file of a model folder that holds its generation defaults.
pub const GENERATION_FILE: &str = "kiln.json";

/// How a model is meant to be sampled, as its folder says in `kiln.json` (Kiln writes it into the
/// folders it trains): the defaults [`GenerateOptions::for_model`] starts from. A folder without
/// the file gets diffusers' pipeline defaults, 50 steps and guidance 7.5.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct GenerationDefaults {
    /// Denoising steps.
    #[serde(default = "fifty")]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[serde(default = "seven_and_a_half")]
    pub guidance_scale: f64,
}

fn fifty() -> usize {
    50
}

fn seven_and_a_half() -> f64 {
    7.5
}

impl Default for GenerationDefaults {
    fn default() -> Self {
        Self {
            steps: fifty(),
            guidance_scale: seven_and_a_half(),
        }
    }
}

impl GenerationDefaults {
    /// Reads `dir/kiln.json`; the defaults when the folder has none. A malformed file, or
    /// steps of 0 or a guidance that is not a finite number, is an error naming the file.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(GENERATION_FILE);
        if !path.is_file() {
            return Ok(Self::default());
        }
        let value: Self = kiln_nn::config::read_json(&path, "generation defaults")?;
        value.check().map_err(|message| {
            Error::Nn(kiln_nn::Error::InvalidConfig {
                path: path.clone(),
                message,
            })
        })?;
        Ok(value)
    }

    /// A model's defaults: its folder's `kiln.json` where it has one, else diffusers' pipeline
    /// defaults, whose guidance is 5 for SDXL (`xl`) and 7.5 otherwise.
    fn for_model(dir: Option<&Path>, xl: bool) -> Result<Self> {
        match dir {
            Some(dir) if dir.join(GENERATION_FILE).is_file() => Self::from_dir(dir),
            _ if xl => Ok(Self {
                guidance_scale: 5.0,
                ..Self::default()
            }),
            _ => Ok(Self::default()),
        }
    }

    /// Whether the values can drive a pipeline; the message says what is wrong.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.steps == 0 || !self.guidance_scale.is_finite() {
            return Err(format!(
                "steps ({}) must be at least 1 and guidance_scale ({}) a finite number",
                self.steps, self.guidance_scale
            ));
        }
        Ok(())
    }

    /// Writes `dir/kiln.json` (through a temporary file renamed into place).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(GENERATION_FILE);
        let tmp = dir.join(format!(".{GENERATION_FILE}.tmp"));
        let io = |p: &Path, source| {
            Error::Nn(kiln_nn::Error::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let text =
            serde_json::to_string_pretty(self).map_err(|e| Error::InvalidInput(e.to_string()))?;
        std::fs::write(&tmp, text + "\n").map_err(|e| io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| io(&path, e))
    }
}

/// Everything one generation needs besides the pipeline, the scheduler and the noise source.
///
/// Build with [`GenerateOptions::new`] and the `with_*` methods; unset sizes and step counts take
/// the model's defaults (the UNet's `sample_size` times the VAE scale factor, 50 steps, guidance
/// 7.5).
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    /// The prompt.
    pub prompt: String,
    /// The negative prompt (the unconditional side of guidance); empty means `""`, or for an
    /// SDXL model whose `model_index.json` has `force_zeros_for_empty_prompt` (the default),
    /// all-zero embeddings, as diffusers does when no negative prompt is given.
    pub negative_prompt: String,
    /// SDXL: the prompt for the second text encoder (`None`: `prompt`).
    pub prompt_2: Option<String>,
    /// SDXL: the negative prompt for the second text encoder (`None`: `negative_prompt`).
    pub negative_prompt_2: Option<String>,
    /// Classifier-free guidance scale; at or below 1 guidance is skipped (one UNet batch).
    pub guidance_scale: f64,
    /// diffusers' `guidance_rescale` (0 disables), for zero-terminal-SNR models.
    pub guidance_rescale: f64,
    /// Images per prompt.
    pub num_images: usize,
    /// Image height in pixels (`None`: the model's default).
    pub height: Option<usize>,
    /// Image width in pixels (`None`: the model's default).
    pub width: Option<usize>,
    /// Denoising steps.
    pub steps: usize,
    /// Text-encoder layers skipped from the end (diffusers' `clip_skip`).
    pub clip_skip: usize,
    /// How the prompts are read: [`PromptSyntax::Plain`] (diffusers: literal, 77 tokens; the
    /// default), [`PromptSyntax::Long`] (every token, in windows of 75) or
    /// [`PromptSyntax::A1111`] (the web UI's emphasis and `BREAK` as well).
    pub prompt_syntax: PromptSyntax,
    /// Initial latents `[num_images, 4, h / f, w / f]` with unit variance (diffusers' `latents=`);
    /// scaled by the scheduler's `init_noise_sigma`. `None`: drawn from the noise source.
    pub latents: Option<Tensor<4>>,
    /// Prompt embeddings `[1, seq, width]` used instead of encoding `prompt`.
    pub prompt_embeds: Option<Tensor<3>>,
    /// Negative prompt embeddings `[1, seq, width]` used instead of encoding `negative_prompt`.
    pub negative_prompt_embeds: Option<Tensor<3>>,
    /// SDXL: pooled prompt embeddings `[1, projection_dim]`, required with `prompt_embeds`.
    pub pooled_prompt_embeds: Option<Tensor<2>>,
    /// SDXL: pooled negative prompt embeddings, required with `negative_prompt_embeds`.
    pub negative_pooled_prompt_embeds: Option<Tensor<2>>,
    /// SDXL: the size, crop and aesthetic-score conditioning.
    pub micro_conditioning: MicroConditioning,
    /// Text to image, image to image or inpainting.
    pub mode: Mode,
    /// Bytes the generation may use beyond the loaded weights, checked against
    /// [`StableDiffusionPipeline::estimate_memory`] before anything is allocated. `None`: the
    /// memory available when the generation starts ([`crate::memory::available_memory`]);
    /// `Some(u64::MAX)` checks nothing.
    pub memory_limit: Option<u64>,
    /// Tiled VAE encode and decode (diffusers' `enable_tiling()`), for images larger than the
    /// VAE's tiles: decode memory is then bounded by one tile. `None`: untiled.
    pub vae_tiling: Option<TilingOptions>,
    /// In (0, 1): stop after this fraction of the schedule (diffusers' `denoising_end`: the
    /// timesteps at or above `round(T - denoising_end * T)` of the `T` training steps). The
    /// SDXL base's half of a base + refiner ensemble.
    pub denoising_end: Option<f64>,
    /// In (0, 1), img2img only: start at this fraction of the schedule (diffusers'
    /// `denoising_start`), with the input latents taken as they are, not noised; `strength` is
    /// then ignored. The refiner's half of an ensemble.
    pub denoising_start: Option<f64>,
}

impl GenerateOptions {
    /// Options for `prompt` with the defaults of diffusers' pipeline.
    pub fn new(prompt: impl Into<String>) -> Self {
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            guidance_scale: 7.5,
            guidance_rescale: 0.0,
            num_images: 1,
            height: None,
            width: None,
            steps: 50,
            clip_skip: 0,
            prompt_syntax: PromptSyntax::Plain,
            latents: None,
            prompt_embeds: None,
            negative_prompt_embeds: None,
            prompt_2: None,
            negative_prompt_2: None,
            pooled_prompt_embeds: None,
            negative_pooled_prompt_embeds: None,
            micro_conditioning: MicroConditioning::default(),
            mode: Mode::Txt2Img,
            memory_limit: None,
            vae_tiling: None,
            denoising_end: None,
            denoising_start: None,
        }
    }

    /// Options for `prompt` with `pipe`'s generation defaults (its folder's `kiln.json`).
    pub fn for_model(pipe: &StableDiffusionPipeline, prompt: impl Into<String>) -> Self {
        Self::new(prompt)
            .with_steps(pipe.generation.steps)
            .with_guidance_scale(pipe.generation.guidance_scale)
    }

    /// Sets the negative prompt.
    pub fn with_negative_prompt(mut self, negative: impl Into<String>) -> Self {
        self.negative_prompt = negative.into();
        self
    }

    /// Sets the guidance scale.
    pub fn with_guidance_scale(mut self, scale: f64) -> Self {
        self.guidance_scale = scale;
        self
    }

    /// Sets the guidance rescale factor.
    pub fn with_guidance_rescale(mut self, rescale: f64) -> Self {
        self.guidance_rescale = rescale;
        self
    }

    /// Sets the number of images.
    pub fn with_num_images(mut self, n: usize) -> Self {
        self.num_images = n;
        self
    }

    /// Sets the image size in pixels.
    pub fn with_size(mut self, width: usize, height: usize) -> Self {
        self.width = Some(width);
        self.height = Some(height);
        self
    }

    /// Sets the number of denoising steps.
    pub fn with_steps(mut self, steps: usize) -> Self {
        self.steps = steps;
        self
    }

    /// Sets clip skip.
    pub fn with_clip_skip(mut self, clip_skip: usize) -> Self {
        self.clip_skip = clip_skip;
        self
    }

    /// Sets how prompts are read (see [`PromptSyntax`]).
    pub fn with_prompt_syntax(mut self, syntax: PromptSyntax) -> Self {
        self.prompt_syntax = syntax;
        self
    }

    /// Supplies the initial (unit-variance) latents.
    pub fn with_latents(mut self, latents: Tensor<4>) -> Self {
        self.latents = Some(latents);
        self
    }

    /// Supplies prompt embeddings (and optionally negative ones) instead of prompts.
    pub fn with_prompt_embeds(mut self, embeds: Tensor<3>, negative: Option<Tensor<3>>) -> Self {
        self.prompt_embeds = Some(embeds);
        self.negative_prompt_embeds = negative;
        self
    }

    /// SDXL: sets the prompts of the second text encoder ([`Self::prompt_2`]).
    pub fn with_prompts_2(mut self, prompt_2: Option<String>, negative_2: Option<String>) -> Self {
        self.prompt_2 = prompt_2;
        self.negative_prompt_2 = negative_2;
        self
    }

    /// SDXL: supplies the pooled embeddings that go with [`with_prompt_embeds`](Self::with_prompt_embeds).
    pub fn with_pooled_prompt_embeds(
        mut self,
        pooled: Tensor<2>,
        negative: Option<Tensor<2>>,
    ) -> Self {
        self.pooled_prompt_embeds = Some(pooled);
        self.negative_pooled_prompt_embeds = negative;
        self
    }

    /// SDXL: sets the size, crop and aesthetic-score conditioning.
    pub fn with_micro_conditioning(mut self, micro: MicroConditioning) -> Self {
        self.micro_conditioning = micro;
        self
    }

    /// Sets the memory limit in bytes beyond the loaded weights ([`Self::memory_limit`]).
    pub fn with_memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// Decodes (and encodes) in tiles ([`Self::vae_tiling`]).
    pub fn with_vae_tiling(mut self, tiling: TilingOptions) -> Self {
        self.vae_tiling = Some(tiling);
        self
    }

    /// Sets where the schedule ends and starts ([`Self::denoising_end`],
    /// [`Self::denoising_start`]): a base + refiner ensemble runs the base with
    /// `(Some(0.8), None)` and the refiner with `(None, Some(0.8))` on the base's latents.
    pub fn with_denoising_range(mut self, end: Option<f64>, start: Option<f64>) -> Self {
        self.denoising_end = end;
        self.denoising_start = start;
        self
    }

    /// Sets the mode (img2img, inpainting).
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }
}

/// SDXL's micro-conditioning (Podell et al. 2023, 2.2): the UNet's time ids, as diffusers'
/// `original_size`, `crops_coords_top_left`, `target_size` and their negative versions, or for
/// the refiner the aesthetic scores. Sizes are `[height, width]` in pixels, the crop
/// `[top, left]`. Unset sizes are the generated image's, unset negative values the positive
/// ones: diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MicroConditioning {
    /// The size of the (training) image the output should look as if cropped from.
    pub original_size: Option<[usize; 2]>,
    /// The top-left corner of that crop: `[0, 0]` looks centred and whole.
    pub crops_coords_top_left: [usize; 2],
    /// The size the output should look as if made for.
    pub target_size: Option<[usize; 2]>,
    /// `original_size` of the negative (unconditional) side.
    pub negative_original_size: Option<[usize; 2]>,
    /// `crops_coords_top_left` of the negative side.
    pub negative_crops_coords_top_left: Option<[usize; 2]>,
    /// `target_size` of the negative side.
    pub negative_target_size: Option<[usize; 2]>,
    /// The refiner's aesthetic score (diffusers' default 6).
    pub aesthetic_score: f64,
    /// The refiner's aesthetic score of the negative side (diffusers' default 2.5).
    pub negative_aesthetic_score: f64,
}

impl Default for MicroConditioning {
    fn default() -> Self {
        Self {
            original_size: None,
            crops_coords_top_left: [0, 0],
            target_size: None,
            negative_original_size: None,
            negative_crops_coords_top_left: None,
            negative_target_size: None,
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
        }
    }
}

impl MicroConditioning {
    /// The time ids of a `[height, width]` run, `(positive, negative)`, for a UNet that takes
    /// `n` of them: 6 (SDXL base: original size, crop, target size) or 5 (refiner: original
    /// size, crop, aesthetic score).
    fn time_ids(&self, size: [usize; 2], n: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let original = self.original_size.unwrap_or(size);
        let target = self.target_size.unwrap_or(size);
        let crop = self.crops_coords_top_left;
        let negative_original = self.negative_original_size.unwrap_or(original);
        let negative_crop = self.negative_crops_coords_top_left.unwrap_or(crop);
        let negative_target = self.negative_target_size.unwrap_or(target);
        let f = |v: &[usize]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        match n {
            6 => Ok((
                f(&[
                    original[0],
                    original[1],
                    crop[0],
                    crop[1],
                    target[0],
                    target[1],
                ]),
                f(&[
                    negative_original[0],
                    negative_original[1],
                    negative_crop[0],
                    negative_crop[1],
                    negative_target[0],
                    negative_target[1],
                ]),
            )),
            5 => {
                let mut positive = f(&[original[0], original[1], crop[0], crop[1]]);
                positive.push(self.aesthetic_score as f32);
                let mut negative = f(&[
                    negative_original[0],
                    negative_original[1],
                    negative_crop[0],
                    negative_crop[1],
                ]);
                negative.push(self.negative_aesthetic_score as f32);
                Ok((positive, negative))
            }
            n => Err(Error::Mismatch(format!(
                "the UNet's add_embedding takes {n} time ids; SDXL's base takes 6 (size, crop, \
                 target size) and its refiner 5 (size, crop, aesthetic score)"
            ))),
        }
    }
}

/// The UNet's conditioning for a run ([`StableDiffusionPipeline::conditioning`]).
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// The text context, `[n, seq, width]`, or `[2n, seq, width]` (negative first) under
    /// guidance; SDXL's is the text encoders' states concatenated along `width`.
    pub context: Tensor<3>,
    /// Batched as `context`: SDXL's pooled text embeddings and time ids (`added`), and a
    /// guidance-distilled (LCM) UNet's embedding of `guidance_scale - 1` (`timestep_cond`),
    /// which it takes instead of classifier-free guidance.
    pub extra: ExtraConditioning,
}

/// What the step callback sees after each scheduler step.
#[derive(Debug)]
pub struct StepProgress<'a> {
    /// 0-based index of the step just done.
    pub step: usize,
    /// Number of model calls in this run.
    pub total: usize,
    /// The timestep of the step.
    pub timestep: f64,
    /// The latents after the step, `[num_images, 4, h / f, w / f]`.
    pub latents: &'a Tensor<4>,
}

/// The step callback: return `ControlFlow::Break(())` to cancel.
pub type StepCallback<'a> = dyn FnMut(&StepProgress<'_>) -> ControlFlow<()> + 'a;

/// The result of a run.
#[derive(Debug, Clone)]
pub struct GenerateOutput {
    /// Decoded images `[num_images, 3, height, width]`, values in [0, 1].
    pub images: Tensor<4>,
    /// The final latents (scaled, as the UNet sees them).
    pub latents: Tensor<4>,
}

/// One 8-bit RGB image, row-major, 3 bytes per pixel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `height * width * 3` bytes.
    pub data: Vec<u8>,
}

impl GenerateOutput {
    /// The images as 8-bit RGB, rounded as diffusers' `numpy_to_pil` does (`round(x * 255)`).
    pub fn to_rgb8(&self) -> Result<Vec<RgbImage>> {
        images_to_rgb8(&self.images)
    }
}

/// `[b, 3, h, w]` values in [0, 1] to 8-bit RGB images.
pub fn images_to_rgb8(images: &Tensor<4>) -> Result<Vec<RgbImage>> {
    let [b, c, h, w] = images.dims();
    if c != 3 {
        return Err(Error::InvalidInput(format!(
            "images must have 3 channels, got shape {:?}",
            images.dims()
        )));
    }
    let values = f32_values(images.clone().permute([0, 2, 3, 1]).to_data(), "images")?;
    Ok(values
        .chunks(h * w * 3)
        .take(b)
        .map(|px| RgbImage {
            width: w,
            height: h,
            data: px
                .iter()
                .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
                .collect(),
        })
        .collect())
}

/// 8-bit RGB to the `[1, 3, h, w]` tensor in [-1, 1] the img2img and inpainting modes take.
pub fn rgb8_to_tensor(image: &RgbImage, device: &Device) -> Result<Tensor<4>> {
    let (h, w) = (image.height, image.width);
    if image.data.len() != h * w * 3 || h == 0 || w == 0 {
        return Err(Error::InvalidInput(format!(
            "an RGB image of {w}x{h} needs {} bytes, got {}",
            h * w * 3,
            image.data.len()
        )));
    }
    let values: Vec<f32> = image
        .data
        .iter()
        .map(|&v| f32::from(v) / 127.5 - 1.0)
        .collect();
    Ok(Tensor::<4>::from_data(TensorData::new(values, [1, h, w, 3]), device).permute([0, 3, 1, 2]))
}

fn f32_values(data: TensorData, what: &str) -> Result<Vec<f32>> {
    data.convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::InvalidInput(format!("cannot read {what}: {e:?}")))
}

/// A loaded Stable Diffusion model: tokenizer, text encoder, UNet, VAE and the folder's scheduler
/// config. The scheduler itself is the caller's (see [`scheduler`](Self::scheduler)), so one
/// pipeline serves any sampler.
///
/// An SDXL base has two text encoders (`text_encoder`, CLIP ViT-L, and `text_encoder_2`,
/// OpenCLIP ViT-bigG with its projection); the SDXL refiner's folder has only
/// `text_encoder_2/`, which is then loaded as `text_encoder`: the encoders always fill the
/// first slots, so code that handles one encoder handles the refiner.
#[derive(Debug)]
pub struct StableDiffusionPipeline {
    /// The CLIP tokenizer (of the first text encoder).
    pub tokenizer: ClipTokenizer,
    /// The CLIP text encoder (the first one).
    pub text_encoder: ClipTextModel,
    /// SDXL base: the second text encoder's tokenizer.
    pub tokenizer_2: Option<ClipTokenizer>,
    /// SDXL base: the second text encoder (`CLIPTextModelWithProjection`).
    pub text_encoder_2: Option<ClipTextModel>,
    /// SDXL: an empty negative prompt is all-zero embeddings (`model_index.json`'s
    /// `force_zeros_for_empty_prompt`).
    pub force_zeros_for_empty_prompt: bool,
    /// The denoiser.
    pub unet: UNet2DConditionModel,
    /// The autoencoder.
    pub vae: AutoencoderKL,
    /// `scheduler/scheduler_config.json` (class included).
    pub scheduler_config: SchedulerConfig,
    /// `_class_name` of `model_index.json`.
    pub class_name: String,
    /// Where the model was loaded from.
    pub source: PathBuf,
    /// The folder's generation defaults (`kiln.json`), or diffusers' (50 steps, guidance 7.5).
    pub generation: GenerationDefaults,
    /// The loaded LoRAs ([`crate::lora`]).
    pub(crate) loras: crate::lora::LoraSet,
    device: Device,
    dtype: DType,
    /// The VAE's dtype: `dtype`, or f32 for an SDXL VAE with `force_upcast` in an f16 run.
    vae_dtype: DType,
}

impl StableDiffusionPipeline {
    /// Loads a diffusers model folder (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`,
    /// `vae/`, `scheduler/`), checking that the components fit together.
    pub fn from_pretrained(dir: &Path, options: LoadOptions, device: &Device) -> Result<Self> {
        kiln_nn::config::require_dir(dir, "model folder")?;
        let mut missing: Vec<String> = Vec::new();
        if !dir.join("model_index.json").is_file() {
            missing.push("model_index.json".into());
        }
        let texts = text_components(dir);
        missing.extend(missing_folders(
            dir,
            texts.iter().flat_map(|(t, e)| [*t, *e]).chain(COMPONENTS),
        ));
        if !missing.is_empty() {
            return Err(Error::IncompleteModel {
                dir: dir.to_path_buf(),
                missing: missing.join(", "),
            });
        }
        let index: ModelIndex =
            kiln_nn::config::read_json(&dir.join("model_index.json"), "model index")?;
        // the configs first: mismatched components fail with one clear message before any
        // weight is read
        let crate::ModelConfigs {
            scheduler: scheduler_config,
            unet: unet_config,
            vae: vae_config,
            ..
        } = crate::ModelConfigs::from_dir(dir)?;
        let xl = unet_config.text_time().is_some();

        let dtype = options.dtype.dtype();
        let vae_dtype = vae_dtype(xl, &vae_config, dtype);
        let _span = tracing::info_span!("load_pipeline", dir = %dir.display()).entered();
        let mut encoders = crate::text_encoders::load(dir, &texts, device)?.into_iter();
        let (tokenizer, text_encoder) = encoders.next().expect("one text encoder at least");
        let (tokenizer_2, text_encoder_2) = encoders.next().unzip();
        let unet = UNet2DConditionModel::from_pretrained(&dir.join("unet"), dtype, device)?;
        let vae = AutoencoderKL::from_pretrained(&dir.join("vae"), vae_dtype, device)?;
        let generation = GenerationDefaults::for_model(Some(dir), xl)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            force_zeros_for_empty_prompt: index
                .force_zeros_for_empty_prompt
                .unwrap_or(index.class_name.starts_with("StableDiffusionXL")),
            unet,
            vae,
            scheduler_config,
            class_name: index.class_name,
            source: dir.to_path_buf(),
            generation,
            loras: Default::default(),
            device: device.clone(),
            dtype,
            vae_dtype,
        })
    }

    /// A pipeline of loaded components (checked by the caller).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        tokenizer: ClipTokenizer,
        text_encoder: ClipTextModel,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        scheduler_config: SchedulerConfig,
        source: PathBuf,
        generation: GenerationDefaults,
        device: &Device,
        dtype: DType,
    ) -> Self {
        Self {
            tokenizer,
            text_encoder,
            tokenizer_2: None,
            text_encoder_2: None,
            force_zeros_for_empty_prompt: false,
            unet,
            vae,
            scheduler_config,
            class_name: "StableDiffusionPipeline".into(),
            source,
            generation,
            loras: Default::default(),
            device: device.clone(),
            dtype,
            vae_dtype: dtype,
        }
    }

    /// Loads a single-file SD 1.x / 2.x or SDXL (base or refiner) checkpoint (`.safetensors`, or
    /// a pickle `.ckpt`, with the original CompVis / Stability key names), its configs inferred
    /// from the tensor shapes or read from `options.config`; see [`crate::single_file`].
    pub fn from_single_file(
        path: &Path,
        options: &SingleFileOptions,
        device: &Device,
    ) -> Result<Self> {
        let file = WeightsFile::open(path)?;
        let shapes = single_file::shapes_of(&file);
        let family = single_file::family(&shapes)?;
        let folders = family.text_folders();
        let (unet_config, vae_config, text_configs, mut scheduler_config, tokenizers) =
            match &options.config {
                Some(dir) => {
                    kiln_nn::config::require_dir(dir, "config folder")?;
                    let mut texts = Vec::with_capacity(folders.len());
                    let mut tokenizers = Vec::with_capacity(folders.len());
                    for ((tokenizer, encoder), pad) in folders.iter().zip(family.pad_tokens()) {
                        texts.push(ClipTextConfig::from_file(
                            &dir.join(encoder).join("config.json"),
                        )?);
                        tokenizers.push(if dir.join(tokenizer).is_dir() {
                            ClipTokenizer::from_dir(dir.join(tokenizer))?
                        } else {
                            ClipTokenizer::embedded(pad)?
                        });
                    }
                    (
                        UNet2DConditionModelConfig::from_file(&dir.join("unet/config.json"))?,
                        AutoencoderKLConfig::from_file(&dir.join("vae/config.json"))?,
                        texts,
                        SchedulerConfig::from_file(dir.join("scheduler/scheduler_config.json"))?,
                        tokenizers,
                    )
                }
                None => {
                    let c = single_file::infer_config(&shapes, options.prediction_type)?;
                    let tokenizers = family
                        .pad_tokens()
                        .iter()
                        .map(|pad| ClipTokenizer::embedded(pad))
                        .collect::<std::result::Result<Vec<_>, _>>()?;
                    let texts = c.text_configs().into_iter().cloned().collect();
                    (c.unet, c.vae, texts, c.scheduler, tokenizers)
                }
            };
        if let Some(prediction) = options.prediction_type {
            scheduler_config.prediction_type = prediction;
        }
        check_components(
            &text_configs.iter().collect::<Vec<_>>(),
            &unet_config,
            &vae_config,
        )?;

        let dtype = options.dtype.dtype();
        let xl = unet_config.text_time().is_some();
        let vae_dtype = vae_dtype(xl, &vae_config, dtype);
        let _span = tracing::info_span!("load_single_file", path = %path.display()).entered();
        let layers = single_file::uniform_layers(&unet_config)?;
        let unet = load_tensors(
            UNet2DConditionModel::new(&unet_config, device)?,
            single_file::unet_tensors(&file, layers)?,
            dtype,
            path,
        )
        .map_err(|e| single_file::component_error(e, "UNet"))?;
        let vae = load_tensors(
            AutoencoderKL::new(&vae_config, device)?,
            single_file::vae_tensors(&file, vae_config.block_out_channels.len())?,
            vae_dtype,
            path,
        )
        .map_err(|e| single_file::component_error(e, "VAE"))?;
        let mut encoders = Vec::with_capacity(text_configs.len());
        for ((config, source), tokenizer) in text_configs
            .iter()
            .zip(single_file::text_sources(&shapes, family))
            .zip(tokenizers)
        {
            let model = load_tensors(
                ClipTextModel::new(config, device),
                single_file::text_tensors(
                    &file,
                    &source,
                    config.num_hidden_layers,
                    config.hidden_size,
                )?,
                DType::F32,
                path,
            )
            .map_err(|e| single_file::component_error(e, "text encoder"))?;
            encoders.push((tokenizer, model));
        }
        let mut encoders = encoders.into_iter();
        let (tokenizer, text_encoder) = encoders
            .next()
            .ok_or_else(|| Error::Checkpoint("no text encoder".into()))?;
        let (tokenizer_2, text_encoder_2) = encoders.next().unzip();
        let inpainting = unet_config.in_channels == 2 * vae_config.latent_channels + 1;
        let class_name = match (family, inpainting) {
            (Family::Xl, false) => "StableDiffusionXLPipeline",
            (Family::Xl, true) => "StableDiffusionXLInpaintPipeline",
            (Family::XlRefiner, _) => "StableDiffusionXLImg2ImgPipeline",
            (_, true) => "StableDiffusionInpaintPipeline",
            (_, false) => "StableDiffusionPipeline",
        };
        let generation = GenerationDefaults::for_model(options.config.as_deref(), xl)?;
        Ok(Self {
            tokenizer,
            text_encoder,
            tokenizer_2,
            text_encoder_2,
            force_zeros_for_empty_prompt: family == Family::Xl,
            unet,
            vae,
            scheduler_config,
            class_name: class_name.into(),
            source: path.to_path_buf(),
            generation,
            loras: Default::default(),
            device: device.clone(),
            dtype,
            vae_dtype,
        })
    }

    /// The device the pipeline runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype the models compute in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the model is SDXL (base or refiner): its UNet has the `text_time` addition
    /// embedding, conditioned on pooled text embeddings and time ids.
    pub fn is_sdxl(&self) -> bool {
        self.unet.config.text_time().is_some()
    }

    /// Whether the model is an SDXL refiner: its UNet takes the aesthetic score among five time
    /// ids. A refiner refines (img2img); it cannot start from noise.
    pub fn is_sdxl_refiner(&self) -> bool {
        self.time_id_count() == Some(5)
    }

    /// How many time ids an SDXL UNet takes (6 for the base, 5 for the refiner): its
    /// `add_embedding`'s input width less the last encoder's pooled width, over each id's
    /// width (`check_components` has checked that it divides). `None` for other UNets.
    fn time_id_count(&self) -> Option<usize> {
        let (dim, input) = self.unet.config.text_time()?;
        let pooled = self
            .text_encoders()
            .last()
            .map_or(0, |(_, e)| e.config().projection_dim);
        input.checked_sub(pooled).map(|rest| rest / dim.max(1))
    }

    /// The text encoders with their tokenizers, in order (one for SD 1.x / 2.x and the SDXL
    /// refiner, two for the SDXL base).
    pub fn text_encoders(&self) -> Vec<(&ClipTokenizer, &ClipTextModel)> {
        let mut all = vec![(&self.tokenizer, &self.text_encoder)];
        if let (Some(t), Some(e)) = (&self.tokenizer_2, &self.text_encoder_2) {
            all.push((t, e));
        }
        all
    }

    /// Replaces the autoencoder with another one, as A1111's "SD VAE" setting and diffusers'
    /// `vae=` argument do (a fine-tuned VAE such as `sd-vae-ft-mse`, or SDXL's fp16 fix):
    ///
    /// - a diffusers VAE folder (`config.json` and its weights), or a model folder's `vae/`:
    ///   its own config, scaling factor and `force_upcast` included;
    /// - one weights file (`.safetensors` or a pickle), in the original LDM layout (A1111's VAE
    ///   files; the VAE of a whole checkpoint) or in diffusers': its shapes give the layout, and
    ///   the model's own VAE the scaling factor and the rest ([`single_file::load_vae_file`]).
    ///
    /// The new VAE must make latents of the UNet's channels (checked before any weight is read);
    /// its dtype is the pipeline's (f32 for an SDXL VAE with `force_upcast` in an f16 run). On
    /// error the pipeline is unchanged.
    pub fn load_vae(&mut self, path: &Path) -> Result<()> {
        let _span = tracing::info_span!("load_vae", path = %path.display()).entered();
        let vae = if path.is_dir() {
            let dir = if path.join("config.json").is_file() {
                path.to_path_buf()
            } else {
                path.join("vae")
            };
            if !dir.join("config.json").is_file() {
                return Err(Error::InvalidInput(format!(
                    "`{}` is neither a diffusers VAE folder (config.json and weights) nor a model \
                     folder with a vae/ folder",
                    path.display()
                )));
            }
            let config = AutoencoderKLConfig::from_file(&dir.join("config.json"))?;
            single_file::check_vae_latents(&config, &self.vae.config, path)?;
            let dtype = vae_dtype(self.is_sdxl(), &config, self.dtype);
            AutoencoderKL::from_pretrained(&dir, dtype, &self.device)?
        } else {
            if !path.is_file() {
                return Err(kiln_nn::Error::NotFound {
                    what: "VAE".into(),
                    path: path.to_path_buf(),
                    hint: Some(
                        "give a diffusers VAE folder, a model folder or a weights file".into(),
                    ),
                }
                .into());
            }
            single_file::load_vae_file(path, &self.vae.config, self.vae_dtype, &self.device)?
        };
        self.vae_dtype = vae_dtype(self.is_sdxl(), &vae.config, self.dtype);
        self.vae = vae;
        Ok(())
    }

    /// Whether the UNet is an inpainting UNet (latents, mask and masked-image latents as input).
    pub fn is_inpainting_unet(&self) -> bool {
        self.unet.config.in_channels == 2 * self.vae.config.latent_channels + 1
    }

    /// Image pixels per latent pixel.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// Width and height must be positive multiples of this: the VAE scale factor. Any latent
    /// size runs through the UNet (odd ones as diffusers runs them); diffusers' pipelines ask
    /// for multiples of 8 pixels, which is the same rule for Stable Diffusion's 8x VAE.
    pub fn size_multiple(&self) -> usize {
        self.vae_scale_factor()
    }

    /// The default `(width, height)`: the UNet's `sample_size` times the VAE scale factor.
    pub fn default_size(&self) -> (usize, usize) {
        let f = self.vae_scale_factor();
        match self.unet.config.sample_size {
            Some(SampleSize::Square(s)) => (s * f, s * f),
            Some(SampleSize::Rect([h, w])) => (w * f, h * f),
            None => (64 * f, 64 * f),
        }
    }

    /// The scheduler to run with: the folder's own class and config, or `sampler` converted from
    /// it (diffusers' `from_config`), with `options` (Karras sigmas, DDIM eta).
    pub fn scheduler(
        &self,
        sampler: Option<SamplerName>,
        options: SamplerOptions,
    ) -> Result<AnyScheduler> {
        Ok(match sampler {
            Some(name) => AnyScheduler::from_sampler(name, &self.scheduler_config, options)?,
            None => {
                let mut config = self.scheduler_config.clone();
                if options.karras {
                    if !config.kind.supports_karras() {
                        return Err(Error::InvalidInput(format!(
                            "the model's scheduler ({}) has no Karras sigmas; pick a sampler that does (e.g. dpm++2m)",
                            config.kind.class_name()
                        )));
                    }
                    config.use_karras_sigmas = true;
                }
                let mut s = AnyScheduler::new(config)?;
                if options.eta != 0.0 {
                    match &mut s {
                        AnyScheduler::Ddim(d) => d.set_eta(options.eta)?,
                        _ => {
                            return Err(Error::InvalidInput(
                                "eta is only for the ddim sampler".into(),
                            ));
                        }
                    }
                }
                s
            }
        })
    }

    /// Encodes one prompt by `syntax`'s rules: `[1, 77 * windows, width]` (one window for
    /// [`PromptSyntax::Plain`]); SDXL's is both encoders' states side by side (see
    /// [`encode_prompts`](Self::encode_prompts) for the pooled embedding and a second prompt).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        syntax: PromptSyntax,
        clip_skip: usize,
    ) -> Result<Tensor<3>> {
        Ok(self.encode_prompts([prompt, prompt], syntax, clip_skip)?.0)
    }

    /// Encodes `prompts[i]` with the `i`-th text encoder (an encoder beyond the first reads
    /// the second prompt): the hidden states `[1, 77 * windows, width]` concatenated along
    /// `width`, and for SDXL the pooled embedding `[1, projection_dim]`, the last encoder's
    /// projected output of the first window.
    ///
    /// SD 1.x / 2.x use the final layer norm of the layer `clip_skip` before the last; SDXL
    /// the layer `clip_skip + 1` before the last, without the norm, as diffusers does. A prompt
    /// that takes fewer windows in one encoder than in another (a different second prompt) is
    /// padded with windows of the empty prompt.
    pub fn encode_prompts(
        &self,
        prompts: [&str; 2],
        syntax: PromptSyntax,
        clip_skip: usize,
    ) -> Result<(Tensor<3>, Option<Tensor<2>>)> {
        let xl = self.is_sdxl();
        let out = crate::text_encoders::encode_prompts(
            &self.text_encoders(),
            xl,
            prompts,
            syntax,
            clip_skip,
            &self.device,
        )?;
        if xl && out.text_embeds.is_none() {
            return Err(Error::Mismatch(
                "an SDXL UNet needs a pooled text embedding, but the last text encoder has no \
                 text_projection (its config.json must name CLIPTextModelWithProjection)"
                    .into(),
            ));
        }
        Ok((out.hidden_states, out.text_embeds))
    }

    /// Loads a textual-inversion embedding ([`kiln_clip::textual_inversion`]): `token`, or the
    /// file's own name for it, becomes a word that prompts and negative prompts can use. Returns
    /// the token.
    ///
    /// SDXL takes SDXL's embeddings (`clip_l` for the first encoder, `clip_g` for the second;
    /// the refiner's one encoder takes `clip_g`); other models take one set of vectors.
    pub fn load_textual_inversion(&mut self, path: &Path, token: Option<&str>) -> Result<String> {
        let embedding = kiln_clip::TextualInversion::open(path, token)?;
        let refuse = |message: &str| {
            Err(Error::Clip(kiln_clip::Error::Embedding {
                path: path.to_path_buf(),
                message: message.into(),
            }))
        };
        let refiner = self.is_sdxl() && self.text_encoder_2.is_none();
        match (
            self.tokenizer_2.as_mut().zip(self.text_encoder_2.as_mut()),
            &embedding.vectors_2,
        ) {
            (Some((tokenizer_2, encoder_2)), Some(g)) => {
                // both widths first: nothing is added unless both fit
                embedding.check_width(&embedding.vectors, &self.text_encoder)?;
                embedding.check_width(g, encoder_2)?;
                embedding.load_into(&mut self.tokenizer, &mut self.text_encoder)?;
                embedding.load_second_into(tokenizer_2, encoder_2)?;
            }
            (None, Some(_)) if refiner => {
                embedding.load_second_into(&mut self.tokenizer, &mut self.text_encoder)?;
            }
            (None, Some(_)) => {
                return refuse(
                    "is an SDXL embedding (`clip_l` and `clip_g`); this model is not SDXL",
                );
            }
            (Some(_), None) => {
                return refuse(
                    "holds one set of vectors (an SD 1.x / 2.x embedding); SDXL's two text \
                     encoders take an embedding with `clip_l` and `clip_g`",
                );
            }
            (None, None) => {
                embedding.load_into(&mut self.tokenizer, &mut self.text_encoder)?;
            }
        }
        Ok(embedding.token)
    }

    /// Runs the pipeline.
    ///
    /// `noise` supplies every random tensor, in diffusers' order: VAE posterior samples of the
    /// input image (img2img; inpainting: the image for a regular UNet, the masked image for an
    /// inpainting UNet), the initial noise (unless `options.latents` is given), then the fresh
    /// noise of ancestral and SDE samplers. [`kiln_scheduler::SeededNoise`] makes a seed give the
    /// same image on every backend.
    ///
    /// # Shapes
    /// - `options.latents`: `[num_images, 4, height / f, width / f]`
    /// - output images: `[num_images, 3, height, width]` in [0, 1]
    pub fn generate<S: Scheduler + ?Sized>(
        &self,
        scheduler: &mut S,
        options: &GenerateOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<GenerateOutput> {
        let latents = self.generate_latents(scheduler, options, noise, callback)?;
        // decode, with the UNet's freed working set handed back to the system first
        kiln_nn::alloc::release_free_memory();
        let images = self.decode_tiled(latents.clone(), options.vae_tiling.as_ref())?;
        Ok(GenerateOutput { images, latents })
    }

    /// [`generate`](Self::generate) without the decode: the final latents, scaled as the UNet
    /// sees them, `[num_images, latent channels, height / f, width / f]`. With
    /// [`GenerateOptions::denoising_end`] these are what an SDXL refiner takes as its img2img
    /// input (with [`GenerateOptions::denoising_start`]).
    pub fn generate_latents<S: Scheduler + ?Sized>(
        &self,
        scheduler: &mut S,
        options: &GenerateOptions,
        noise: &mut dyn NoiseSource,
        callback: Option<&mut StepCallback<'_>>,
    ) -> Result<Tensor<4>> {
        let run = self.plan(options)?;
        let _span = tracing::info_span!(
            "generate",
            width = run.width,
            height = run.height,
            steps = options.steps
        )
        .entered();
        // 1. prompt embeddings, [uncond x n, cond x n] under guidance, and SDXL's added
        // conditioning
        let conditioning = self.conditioning_of(options, &run)?;
        // 2. timesteps, cut to the strength point for img2img / inpainting
        let timesteps = schedule(
            scheduler,
            options,
            self.scheduler_config.num_train_timesteps,
        )?;
        // 3. initial latents (and the inpainting inputs), per mode
        let (latents, inpaint) =
            self.initial_latents(scheduler, options, &run, &timesteps, noise)?;
        // 4. the denoising loop with its guidance
        self.denoise(
            scheduler,
            options,
            &run,
            Denoise {
                latents,
                conditioning: &conditioning,
                timesteps: &timesteps,
                inpaint: inpaint.as_ref(),
            },
            noise,
            callback,
        )
    }

    /// Checks a request and sizes its run: the image size, whether guidance runs, the latents'
    /// shape; refuses one whose memory estimate is above the limit before anything is allocated.
    pub(crate) fn plan(&self, options: &GenerateOptions) -> Result<RunPlan> {
        let (width, height) = self.resolve_size(options)?;
        let n = options.num_images;
        if n == 0 || options.steps == 0 {
            return Err(Error::InvalidInput(
                "the number of images and of steps must be at least 1".into(),
            ));
        }
        if !options.guidance_scale.is_finite() || !(0.0..=1.0).contains(&options.guidance_rescale) {
            return Err(Error::InvalidInput(format!(
                "guidance scale {} must be finite and guidance rescale {} within [0, 1]",
                options.guidance_scale, options.guidance_rescale
            )));
        }
        if self.is_sdxl_refiner() && matches!(options.mode, Mode::Txt2Img) {
            return Err(Error::InvalidInput(
                "this model is an SDXL refiner: it refines an image or an SDXL base's latents \
                 (img2img, with denoising_start in an ensemble); it cannot start from noise"
                    .into(),
            ));
        }
        let guided = self.guided(options);
        let estimate = self.estimate_memory(width, height, n, guided, options.vae_tiling.as_ref());
        if let Some(limit) = options
            .memory_limit
            .or_else(crate::memory::available_memory)
            && estimate.peak() > limit
        {
            return Err(Error::InsufficientMemory {
                width,
                height,
                num_images: n,
                estimate,
                limit,
            });
        }
        let f = self.vae_scale_factor();
        let latent_channels = self.vae.config.latent_channels;
        Ok(RunPlan {
            width,
            height,
            guided,
            shape: [n, latent_channels, height / f, width / f],
        })
    }

    /// The starting latents of each mode (scaled for the scheduler), and for inpainting the
    /// state the loop needs.
    fn initial_latents<S: Scheduler + ?Sized>(
        &self,
        scheduler: &mut S,
        options: &GenerateOptions,
        run: &RunPlan,
        timesteps: &[f64],
        noise: &mut dyn NoiseSource,
    ) -> Result<(Tensor<4>, Option<InpaintState>)> {
        let (shape, n) = (run.shape, run.shape[0]);
        let (width, height) = (run.width, run.height);
        let user_latents = match &options.latents {
            Some(l) if l.dims() != shape => {
                return Err(Error::InvalidInput(format!(
                    "initial latents have shape {:?}, this run needs {shape:?}",
                    l.dims()
                )));
            }
            Some(l) => Some(l.clone().cast(DType::F32)),
            None => None,
        };
        Ok(match &options.mode {
            Mode::Txt2Img => {
                let x = match user_latents {
                    Some(l) => l,
                    None => noise.noise(shape, &self.device)?,
                };
                (x * scheduler.init_noise_sigma(), None)
            }
            Mode::Img2Img { image, .. } => {
                let init = if self.is_latent_image(image) {
                    // latents (the SDXL base's output in an ensemble): used as they are
                    let [b, c, h, w] = image.dims();
                    if (b != 1 && b != n) || [c, h, w] != [shape[1], shape[2], shape[3]] {
                        return Err(Error::InvalidInput(format!(
                            "img2img latents have shape {:?}; this run needs [1 or {n}, {}, {}, {}]",
                            image.dims(),
                            shape[1],
                            shape[2],
                            shape[3]
                        )));
                    }
                    image.clone().cast(DType::F32).repeat_dim(0, n / b)
                } else {
                    self.check_image(image, width, height, 3, "image")?;
                    self.encode_image(image.clone(), options.vae_tiling.as_ref(), noise)?
                        .repeat_dim(0, n)
                };
                if options.denoising_start.is_some() {
                    // the schedule starts where the latents' noise level is: nothing is added
                    (init, None)
                } else {
                    let eps = match user_latents {
                        Some(l) => l,
                        None => noise.noise(shape, &self.device)?,
                    };
                    (scheduler.add_noise(init, eps, &timesteps[..1])?, None)
                }
            }
            Mode::Inpaint {
                image,
                mask,
                strength,
            } => {
                self.check_image(image, width, height, 3, "image")?;
                self.check_image(mask, width, height, 1, "mask")?;
                let mask = mask
                    .clone()
                    .cast(DType::F32)
                    .greater_equal_elem(0.5)
                    .float();
                let regular = !self.is_inpainting_unet();
                let image_latents = if regular || (user_latents.is_none() && *strength < 1.0) {
                    Some(
                        self.encode_image(image.clone(), options.vae_tiling.as_ref(), noise)?
                            .repeat_dim(0, n),
                    )
                } else {
                    None
                };
                let eps = match user_latents {
                    Some(l) => l,
                    None => noise.noise(shape, &self.device)?,
                };
                let x = match (&image_latents, *strength < 1.0) {
                    (Some(init), true) => {
                        scheduler.add_noise(init.clone(), eps.clone(), &timesteps[..1])?
                    }
                    _ => eps.clone() * scheduler.init_noise_sigma(),
                };
                let latent_mask = downsample_mask(&mask, [shape[2], shape[3]])?.repeat_dim(0, n);
                let masked_latents = if regular {
                    None
                } else {
                    let keep = mask.clone().lower_elem(0.5).float();
                    let masked = image.clone().cast(DType::F32) * keep;
                    Some(
                        self.encode_image(masked, options.vae_tiling.as_ref(), noise)?
                            .repeat_dim(0, n),
                    )
                };
                let state = InpaintState {
                    mask: latent_mask,
                    masked_latents,
                    image_latents,
                    noise: eps,
                };
                (x, Some(state))
            }
        })
    }

    /// The denoising loop: each step the UNet on the (guided) batch, guidance, the scheduler's
    /// step, the inpainting blend, the callback.
    fn denoise<S: Scheduler + ?Sized>(
        &self,
        scheduler: &mut S,
        options: &GenerateOptions,
        run: &RunPlan,
        state: Denoise<'_>,
        noise: &mut dyn NoiseSource,
        mut callback: Option<&mut StepCallback<'_>>,
    ) -> Result<Tensor<4>> {
        let Denoise {
            mut latents,
            conditioning,
            timesteps,
            inpaint,
        } = state;
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            let _step = tracing::debug_span!("step", i, t).entered();
            let input = if run.guided {
                Tensor::cat(vec![latents.clone(), latents.clone()], 0)
            } else {
                latents.clone()
            };
            let mut input = scheduler.scale_model_input(input, t)?;
            if let Some(inpaint) = inpaint {
                input = inpaint.model_input(input, run.guided);
            }
            let timestep =
                Tensor::<1>::from_data(TensorData::new(vec![t as f32], [1]), &self.device);
            let pred = self
                .unet
                .forward_with(
                    input.cast(self.dtype),
                    timestep,
                    conditioning.context.clone(),
                    &conditioning.extra,
                )?
                .cast(DType::F32);
            let pred = if run.guided {
                guide(pred, options.guidance_scale, options.guidance_rescale)
            } else {
                pred
            };
            latents = scheduler.step(pred, t, latents, noise)?.prev_sample;
            if let Some(inpaint) = inpaint {
                latents = inpaint.blend(latents, timesteps.get(i + 1).copied(), scheduler)?;
            }
            if let Some(cb) = callback.as_mut() {
                let progress = StepProgress {
                    step: i,
                    total,
                    timestep: t,
                    latents: &latents,
                };
                if cb(&progress).is_break() {
                    return Err(Error::Cancelled { step: i });
                }
            }
        }
        Ok(latents)
    }

    /// Decodes scaled latents to images in [0, 1].
    ///
    /// # Shapes
    /// `[b, 4, h, w]` -> `[b, 3, h * f, w * f]`
    pub fn decode(&self, latents: Tensor<4>) -> Result<Tensor<4>> {
        self.decode_tiled(latents, None)
    }

    /// [`decode`](Self::decode), in tiles when `tiling` is given and the latents are larger
    /// than a tile.
    pub fn decode_tiled(
        &self,
        latents: Tensor<4>,
        tiling: Option<&TilingOptions>,
    ) -> Result<Tensor<4>> {
        let z = self.vae.unscale_latents(latents).cast(self.vae_dtype);
        let x = self.vae.decode(z, tiling)?.cast(DType::F32);
        Ok((x / 2.0 + 0.5).clamp(0.0, 1.0))
    }

    /// Encodes an image in [-1, 1] to scaled latents, sampling the posterior with `noise`.
    fn encode_image(
        &self,
        image: Tensor<4>,
        tiling: Option<&TilingOptions>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor<4>> {
        let posterior = self.vae.encode(image.cast(self.vae_dtype), tiling)?;
        let eps = noise.noise(posterior.mean.dims(), &self.device)?;
        let z = posterior.sample(eps.cast(self.vae_dtype)).cast(DType::F32);
        Ok(z * self.vae.scaling_factor())
    }

    fn check_image(
        &self,
        image: &Tensor<4>,
        width: usize,
        height: usize,
        channels: usize,
        what: &str,
    ) -> Result<()> {
        let dims = image.dims();
        if dims != [1, channels, height, width] {
            return Err(Error::InvalidInput(format!(
                "the {what} has shape {dims:?} ({}x{}); this run needs [1, {channels}, {height}, {width}] ({width}x{height})",
                dims[3], dims[2]
            )));
        }
        Ok(())
    }

    /// Whether an img2img input is latents (`[b, latent channels, h / f, w / f]`) rather
    /// than an RGB image.
    fn is_latent_image(&self, image: &Tensor<4>) -> bool {
        let c = self.vae.config.latent_channels;
        c != 3 && image.dims()[1] == c
    }

    fn resolve_size(&self, options: &GenerateOptions) -> Result<(usize, usize)> {
        let (dw, dh) = match &options.mode {
            Mode::Img2Img { image, .. } if self.is_latent_image(image) => {
                let (d, f) = (image.dims(), self.vae_scale_factor());
                (d[3] * f, d[2] * f)
            }
            Mode::Img2Img { image, .. } | Mode::Inpaint { image, .. } => {
                let d = image.dims();
                (d[3], d[2])
            }
            Mode::Txt2Img => self.default_size(),
        };
        let (width, height) = (options.width.unwrap_or(dw), options.height.unwrap_or(dh));
        let multiple = self.size_multiple();
        if width == 0 || height == 0 || width % multiple != 0 || height % multiple != 0 {
            return Err(Error::Size {
                width,
                height,
                multiple,
            });
        }
        Ok((width, height))
    }

    /// The UNet's conditioning for `options` ([`Conditioning`]): the text context `[n, seq, d]`,
    /// or `[2n, seq, d]` (negative first) under guidance, and SDXL's pooled embeddings and time
    /// ids, as [`generate`](Self::generate) computes them.
    pub fn conditioning(&self, options: &GenerateOptions) -> Result<Conditioning> {
        let (width, height) = self.resolve_size(options)?;
        self.conditioning_for(options, [height, width], self.guided(options))
    }

    /// Whether a run uses classifier-free guidance (the UNet on `[uncond, cond]`): a guidance
    /// scale above 1, unless the UNet is guidance-distilled (LCM), which embeds the scale
    /// instead.
    fn guided(&self, options: &GenerateOptions) -> bool {
        options.guidance_scale > 1.0 && self.unet.config.time_cond_proj_dim.is_none()
    }

    fn conditioning_of(&self, options: &GenerateOptions, run: &RunPlan) -> Result<Conditioning> {
        self.conditioning_for(options, [run.height, run.width], run.guided)
    }

    /// [`conditioning`](Self::conditioning) of a `[height, width]` run: the text's, and a
    /// guidance-distilled UNet's guidance embedding.
    fn conditioning_for(
        &self,
        options: &GenerateOptions,
        size: [usize; 2],
        do_cfg: bool,
    ) -> Result<Conditioning> {
        let (context, added) = self.text_conditioning(options, size, do_cfg)?;
        let timestep_cond = self.unet.config.time_cond_proj_dim.map(|dim| {
            let w = vec![(options.guidance_scale - 1.0) as f32; options.num_images];
            kiln_unet::guidance_scale_embedding(&w, dim, &self.device)
        });
        Ok(Conditioning {
            context,
            extra: ExtraConditioning {
                added,
                timestep_cond,
            },
        })
    }

    /// The text context and SDXL's added conditioning of a `[height, width]` run.
    ///
    /// Under guidance the shorter of the two encodings is padded with windows of the empty
    /// prompt's, as the A1111 web UI pads them, so both have the same length.
    fn text_conditioning(
        &self,
        options: &GenerateOptions,
        size: [usize; 2],
        do_cfg: bool,
    ) -> Result<(Tensor<3>, Option<AddedConditioning>)> {
        let n = options.num_images;
        let width: usize = self
            .text_encoders()
            .iter()
            .map(|(_, e)| e.config().hidden_size)
            .sum();
        let window = self.tokenizer.max_length();
        let xl = self.is_sdxl();
        let pooled_width = self
            .text_encoders()
            .last()
            .map_or(0, |(_, e)| e.config().projection_dim);
        let check = |e: &Tensor<3>, what: &str| -> Result<()> {
            let d = e.dims();
            if d[0] != 1 || d[1] == 0 || d[2] != width {
                return Err(Error::InvalidInput(format!(
                    "{what} have shape {d:?}, expected [1, seq, {width}]"
                )));
            }
            Ok(())
        };
        let check_pooled = |e: Option<Tensor<2>>, what: &str| -> Result<Option<Tensor<2>>> {
            match (xl, e) {
                (false, _) => Ok(None),
                (true, Some(e)) if e.dims() == [1, pooled_width] => Ok(Some(e.cast(DType::F32))),
                (true, e) => Err(Error::InvalidInput(format!(
                    "an SDXL model needs {what} of shape [1, {pooled_width}] with the embeddings; \
                     got {:?}",
                    e.map(|e| e.dims())
                ))),
            }
        };
        let encode = |prompt: &str, prompt_2: &Option<String>| {
            let second = prompt_2.as_deref().unwrap_or(prompt);
            self.encode_prompts([prompt, second], options.prompt_syntax, options.clip_skip)
        };
        let (mut cond, pooled) = match &options.prompt_embeds {
            Some(e) => (
                e.clone().cast(DType::F32),
                check_pooled(
                    options.pooled_prompt_embeds.clone(),
                    "pooled prompt embeddings",
                )?,
            ),
            None => encode(&options.prompt, &options.prompt_2)?,
        };
        check(&cond, "prompt embeddings")?;
        let time_ids = match self.time_id_count() {
            Some(n) => Some(options.micro_conditioning.time_ids(size, n)?),
            None => None,
        };
        let batch = |x: Tensor<2>| x.repeat_dim(0, n);
        let ids = |v: &Vec<f32>| {
            Tensor::<2>::from_data(TensorData::new(v.clone(), [1, v.len()]), &self.device)
        };
        if !do_cfg {
            let added = match (pooled, &time_ids) {
                (Some(p), Some((positive, _))) => Some(AddedConditioning {
                    text_embeds: batch(p),
                    time_ids: batch(ids(positive)),
                }),
                _ => None,
            };
            return Ok((cond.repeat_dim(0, n).cast(self.dtype), added));
        }
        let zeros = xl
            && self.force_zeros_for_empty_prompt
            && options.negative_prompt.is_empty()
            && options.negative_prompt_2.is_none();
        let (mut uncond, negative_pooled) = match &options.negative_prompt_embeds {
            Some(e) => (
                e.clone().cast(DType::F32),
                check_pooled(
                    options.negative_pooled_prompt_embeds.clone(),
                    "pooled negative prompt embeddings",
                )?,
            ),
            // diffusers' force_zeros_for_empty_prompt: zeros the shape of the prompt's
            None if zeros => (cond.zeros_like(), pooled.as_ref().map(Tensor::zeros_like)),
            None => encode(&options.negative_prompt, &options.negative_prompt_2)?,
        };
        check(&uncond, "negative prompt embeddings")?;
        let (a, b) = (cond.dims()[1], uncond.dims()[1]);
        if a != b {
            // windows of the empty prompt make up the difference when both are whole windows
            let given = options.prompt_embeds.is_some() || options.negative_prompt_embeds.is_some();
            if given || a % window != 0 || b % window != 0 {
                return Err(Error::InvalidInput(format!(
                    "negative prompt embeddings {:?} and prompt embeddings {:?} differ in length",
                    uncond.dims(),
                    cond.dims()
                )));
            }
            let empty = encode("", &None)?.0;
            let pad = |e: Tensor<3>, to: usize| -> Tensor<3> {
                let windows = (to - e.dims()[1]) / window;
                Tensor::cat(vec![e, empty.clone().repeat_dim(1, windows)], 1)
            };
            if a < b {
                cond = pad(cond, b);
            } else {
                uncond = pad(uncond, a);
            }
        }
        let added = match (pooled, negative_pooled, &time_ids) {
            (Some(p), Some(np), Some((positive, negative))) => Some(AddedConditioning {
                text_embeds: Tensor::cat(vec![batch(np), batch(p)], 0),
                time_ids: Tensor::cat(vec![batch(ids(negative)), batch(ids(positive))], 0),
            }),
            _ => None,
        };
        let context = Tensor::cat(vec![uncond.repeat_dim(0, n), cond.repeat_dim(0, n)], 0);
        Ok((context.cast(self.dtype), added))
    }
}

/// Checks that the text encoders' widths add up to the UNet's cross-attention width, that an
/// SDXL UNet's added conditioning fits the last encoder's projection (and only an SDXL UNet
/// has a second encoder), and that the UNet takes and returns the VAE's latents (or, for
/// inpainting, latents + mask + masked latents).
pub(crate) fn check_components(
    texts: &[&ClipTextConfig],
    unet: &UNet2DConditionModelConfig,
    vae: &AutoencoderKLConfig,
) -> Result<()> {
    let text_width: usize = texts.iter().map(|t| t.hidden_size).sum();
    let widths = unet
        .cross_attention_dim
        .expand(unet.down_block_types.len(), "cross_attention_dim")?;
    if let Some(w) = widths.iter().find(|&&w| w != text_width) {
        let sizes: Vec<String> = texts.iter().map(|t| t.hidden_size.to_string()).collect();
        return Err(Error::Mismatch(format!(
            "the text encoders' hidden sizes ({}) add up to {text_width}, the UNet's \
             cross-attention width is {w}",
            sizes.join(" + ")
        )));
    }
    match (unet.text_time(), texts.last()) {
        (Some((dim, input)), Some(last)) => {
            if !last.has_projection() {
                return Err(Error::Mismatch(
                    "the UNet is SDXL's (addition_embed_type \"text_time\"), but the last text \
                     encoder has no text_projection: give the folder SDXL's text_encoder_2 \
                     (CLIPTextModelWithProjection)"
                        .into(),
                ));
            }
            let pooled = last.projection_dim;
            let ids = input
                .checked_sub(pooled)
                .filter(|r| r % dim == 0)
                .map(|r| r / dim);
            if !matches!(ids, Some(5 | 6)) {
                return Err(Error::Mismatch(format!(
                    "the UNet's add_embedding takes {input} values; the text encoder's pooled \
                     embedding has {pooled}, which leaves {} for time ids of {dim} each \
                     (SDXL: 6 ids for the base, 5 for the refiner)",
                    input as i64 - pooled as i64
                )));
            }
        }
        (None, _) if texts.len() > 1 => {
            return Err(Error::Mismatch(
                "the folder has a second text encoder (text_encoder_2/), but its UNet is not \
                 SDXL's (no addition_embed_type \"text_time\")"
                    .into(),
            ));
        }
        _ => {}
    }
    let latent = vae.latent_channels;
    if unet.out_channels != latent
        || (unet.in_channels != latent && unet.in_channels != 2 * latent + 1)
    {
        return Err(Error::Mismatch(format!(
            "the VAE has {latent} latent channels; the UNet takes {} and returns {} (expected {latent} or {} in, {latent} out)",
            unet.in_channels,
            unet.out_channels,
            2 * latent + 1
        )));
    }
    Ok(())
}

/// The VAE's dtype in a `dtype` run: f32 for an SDXL VAE with `force_upcast` in f16, as
/// diffusers' SDXL pipelines upcast it.
fn vae_dtype(xl: bool, vae: &AutoencoderKLConfig, dtype: DType) -> DType {
    if xl && vae.force_upcast && dtype == DType::F16 {
        DType::F32
    } else {
        dtype
    }
}

/// The tensors the inpainting loop carries.
struct InpaintState {
    /// `[n, 1, h, w]` latent-size mask (1 = repaint).
    mask: Tensor<4>,
    /// The masked image's latents (inpainting UNet only).
    masked_latents: Option<Tensor<4>>,
    /// The image's latents (regular UNet: blended back each step).
    image_latents: Option<Tensor<4>>,
    /// The initial noise, re-used to noise the image latents to each step.
    noise: Tensor<4>,
}

impl InpaintState {
    /// The UNet's input: for an inpainting UNet, the latents with the mask and the masked
    /// image's latents as extra channels (duplicated for the guided batch).
    fn model_input(&self, input: Tensor<4>, guided: bool) -> Tensor<4> {
        let Some(masked) = &self.masked_latents else {
            return input;
        };
        let (m, ml) = if guided {
            (
                Tensor::cat(vec![self.mask.clone(), self.mask.clone()], 0),
                Tensor::cat(vec![masked.clone(), masked.clone()], 0),
            )
        } else {
            (self.mask.clone(), masked.clone())
        };
        Tensor::cat(vec![input, m, ml], 1)
    }

    /// After a step, for a regular UNet: the kept region replaced by the image's latents noised
    /// to the next timestep (`next`; the image itself after the last step).
    fn blend<S: Scheduler + ?Sized>(
        &self,
        latents: Tensor<4>,
        next: Option<f64>,
        scheduler: &S,
    ) -> Result<Tensor<4>> {
        let (Some(init), None) = (&self.image_latents, &self.masked_latents) else {
            return Ok(latents);
        };
        let proper = match next {
            Some(next) => scheduler.add_noise(init.clone(), self.noise.clone(), &[next])?,
            None => init.clone(),
        };
        Ok(proper * (self.mask.clone().neg() + 1.0) + latents * self.mask.clone())
    }
}

/// A run's sizes, checked by [`StableDiffusionPipeline::plan`].
pub(crate) struct RunPlan {
    pub(crate) width: usize,
    pub(crate) height: usize,
    /// Classifier-free guidance (the UNet runs on `[uncond, cond]`).
    guided: bool,
    /// `[num_images, latent channels, height / f, width / f]`.
    shape: [usize; 4],
}

/// What the denoising loop starts from.
struct Denoise<'a> {
    latents: Tensor<4>,
    conditioning: &'a Conditioning,
    timesteps: &'a [f64],
    inpaint: Option<&'a InpaintState>,
}

/// Sets the scheduler's timesteps and cuts them to the strength point of img2img and
/// inpainting (`order` entries per skipped step).
fn schedule<S: Scheduler + ?Sized>(
    scheduler: &mut S,
    options: &GenerateOptions,
    train_steps: usize,
) -> Result<Vec<f64>> {
    for (name, value) in [
        ("denoising_end", options.denoising_end),
        ("denoising_start", options.denoising_start),
    ] {
        if let Some(d) = value
            && !(d > 0.0 && d < 1.0)
        {
            return Err(Error::InvalidInput(format!("{name} {d} must be in (0, 1)")));
        }
    }
    if let (Some(end), Some(start)) = (options.denoising_end, options.denoising_start)
        && start >= end
    {
        return Err(Error::InvalidInput(format!(
            "denoising_start {start} must be below denoising_end {end}"
        )));
    }
    scheduler.set_timesteps(options.steps)?;
    let all: Vec<f64> = scheduler.timesteps().to_vec();
    // diffusers' discrete_timestep_cutoff
    let cutoff = |d: f64| (train_steps as f64 - d * train_steps as f64).round();
    let mut timesteps = match (&options.mode, options.denoising_start) {
        (Mode::Img2Img { .. }, Some(start)) => {
            let c = cutoff(start);
            let mut n = all.iter().filter(|&&t| t < c).count();
            // a second-order step must not be cut in half
            if scheduler.order() == 2 && n % 2 == 0 {
                n += 1;
            }
            let n = n.min(all.len());
            if n == 0 {
                return Err(Error::InvalidInput(format!(
                    "denoising_start {start} with {} steps leaves no step to run",
                    options.steps
                )));
            }
            all[all.len() - n..].to_vec()
        }
        (_, Some(_)) => {
            return Err(Error::InvalidInput(
                "denoising_start is for img2img runs (the refiner of an ensemble)".into(),
            ));
        }
        (mode, None) => {
            let strength = match mode {
                Mode::Txt2Img => 1.0,
                Mode::Img2Img { strength, .. } | Mode::Inpaint { strength, .. } => *strength,
            };
            if !(strength > 0.0 && strength <= 1.0) {
                return Err(Error::InvalidInput(format!(
                    "strength {strength} must be in (0, 1]"
                )));
            }
            strength_timesteps(&all, options.steps, strength, scheduler.order())?
        }
    };
    if let Some(end) = options.denoising_end {
        let c = cutoff(end);
        let n = timesteps.iter().filter(|&&t| t >= c).count();
        if n == 0 {
            return Err(Error::InvalidInput(format!(
                "denoising_end {end} with {} steps leaves no step to run",
                options.steps
            )));
        }
        timesteps.truncate(n);
    }
    Ok(timesteps)
}

/// Classifier-free guidance on `[2n, ...]` predictions (unconditional half first), with
/// diffusers' `rescale_noise_cfg` when `rescale > 0`.
fn guide(pred: Tensor<4>, scale: f64, rescale: f64) -> Tensor<4> {
    let [b, c, h, w] = pred.dims();
    let n = b / 2;
    let uncond = pred.clone().narrow(0, 0, n);
    let text = pred.narrow(0, n, n);
    let cfg = uncond.clone() + (text.clone() - uncond) * scale;
    if rescale <= 0.0 {
        return cfg;
    }
    // std over every dim but the batch, unbiased as torch.std
    let std = |x: Tensor<4>| -> Tensor<4> {
        let flat = x.reshape([n, c * h * w]); // [n, chw]
        let var = flat.var(1); // [n, 1], unbiased
        var.sqrt().reshape([n, 1, 1, 1])
    };
    let ratio = std(text) / std(cfg.clone());
    let rescaled = cfg.clone() * ratio;
    rescaled * rescale + cfg * (1.0 - rescale)
}

/// diffusers' `get_timesteps`: the schedule without its first `steps - floor(steps * strength)`
/// steps (times the scheduler's order).
fn strength_timesteps(all: &[f64], steps: usize, strength: f64, order: usize) -> Result<Vec<f64>> {
    if strength >= 1.0 {
        return Ok(all.to_vec());
    }
    let init = ((steps as f64 * strength) as usize).min(steps);
    let t_start = steps - init;
    let skip = t_start * order;
    if init == 0 || skip >= all.len() {
        return Err(Error::InvalidInput(format!(
            "strength {strength} with {steps} steps leaves no step to run"
        )));
    }
    Ok(all[skip..].to_vec())
}

/// Nearest-neighbour downsampling of a `[1, 1, H, W]` mask as torch's `interpolate(mode="nearest")`
/// does it (source index `floor(i * H / h)`), on the host.
fn downsample_mask(mask: &Tensor<4>, size: [usize; 2]) -> Result<Tensor<4>> {
    let [_, _, hh, ww] = mask.dims();
    let [h, w] = size;
    let values = f32_values(mask.to_data(), "mask")?;
    let (sy, sx) = (hh as f32 / h as f32, ww as f32 / w as f32);
    let mut out = Vec::with_capacity(h * w);
    for y in 0..h {
        let yy = ((y as f32 * sy).floor() as usize).min(hh - 1);
        for x in 0..w {
            let xx = ((x as f32 * sx).floor() as usize).min(ww - 1);
            out.push(values[yy * ww + xx]);
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(out, [1, 1, h, w]),
        &mask.device(),
    ))
}
