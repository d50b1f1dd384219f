//! A from-scratch training run described in one TOML file (`kiln train --config FILE.toml`): the
//! models' shapes in diffusers' and transformers' own config fields, the data, and the options of
//! the two stages (the VAE as an autoencoder, then the UNet and the text encoder together through
//! the denoising loss).
//!
//! ```toml
//! seed = 0
//!
//! [data]
//! dir = "data/shapes"        # relative to this file
//! resolution = 32
//!
//! [models.vae]               # AutoencoderKL's config.json fields
//! block_out_channels = [32, 64, 64]
//! # ...
//! [models.text_encoder]      # CLIPTextConfig's
//! [models.unet]              # UNet2DConditionModel's
//! [models.scheduler]         # scheduler_config.json's (its `_class_name` is the default sampler)
//!
//! [generation]               # the defaults `kiln generate` takes from the trained folder
//! steps = 25
//! guidance_scale = 4.0
//!
//! [vae]                      # stage 1
//! steps = 3000
//! [denoiser]                 # stage 2
//! steps = 20000
//! mixed_precision = "no"     # or "bf16" (autocast of the UNet's forward)
//!
//! [checkpoints]
//! every = 500
//! ```
//!
//! Unknown fields anywhere, in Kiln's sections and in the model configs alike, are errors naming
//! the field, as are shapes that cannot fit together (the UNet's `cross_attention_dim` against the
//! text encoder's `hidden_size`, its `in_channels` against the VAE's `latent_channels`, channels
//! against group counts).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_clip::ClipTextConfig;
use kiln_pipeline::GenerationDefaults;
use kiln_unet::UNet2DConditionModelConfig;
use kiln_vae::AutoencoderKLConfig;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::ema::EmaWarmup;
use crate::trainer::{LrSchedule, MixedPrecision, TrainConfig};
use crate::{Error, Result, VaeTrainConfig};

/// A parsed and checked recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The file it was read from.
    pub path: PathBuf,
    /// The file's text, copied into the run folder.
    pub text: String,
    /// Seed of the initial weights and of every draw.
    pub seed: u64,
    /// The dataset folder (resolved against the recipe's folder).
    pub data_dir: PathBuf,
    /// Square training resolution in pixels.
    pub resolution: usize,
    /// The models' diffusers configs by component (`vae`, `text_encoder`, `unet`, `scheduler`).
    pub models: BTreeMap<String, Value>,
    /// The VAE's config, parsed.
    pub vae: AutoencoderKLConfig,
    /// The text encoder's config, parsed.
    pub text_encoder: ClipTextConfig,
    /// The UNet's config, parsed.
    pub unet: UNet2DConditionModelConfig,
    /// Generation defaults written into the trained folder.
    pub generation: GenerationDefaults,
    /// Stage 1.
    pub vae_stage: VaeTrainConfig,
    /// Stage 2.
    pub denoiser_stage: TrainConfig,
    /// Steps between checkpoints.
    pub checkpoint_every: usize,
    /// Checkpoints kept per stage (older ones are removed once a newer one is complete).
    pub checkpoints_kept: usize,
    /// Padding token of the tokenizer (CLIP's embedded vocabulary).
    pub pad_token: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    seed: u64,
    data: DataSection,
    models: ModelsSection,
    #[serde(default)]
    generation: GenerationDefaults,
    vae: VaeSection,
    denoiser: DenoiserSection,
    #[serde(default)]
    checkpoints: CheckpointSection,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DataSection {
    dir: PathBuf,
    resolution: usize,
    #[serde(default)]
    random_flip: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelsSection {
    vae: toml::Table,
    text_encoder: toml::Table,
    unet: toml::Table,
    scheduler: toml::Table,
    #[serde(default = "default_pad")]
    pad_token: String,
}

fn default_pad() -> String {
    "<|endoftext|>".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VaeSection {
    steps: usize,
    #[serde(default = "sixteen")]
    batch_size: usize,
    #[serde(default = "vae_lr")]
    learning_rate: f64,
    #[serde(default)]
    lr_schedule: Schedule,
    #[serde(default)]
    lr_warmup_steps: usize,
    #[serde(default = "kl_weight")]
    kl_weight: f64,
    #[serde(default = "one")]
    max_grad_norm: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DenoiserSection {
    steps: usize,
    #[serde(default = "sixteen")]
    batch_size: usize,
    #[serde(default = "denoiser_lr")]
    learning_rate: f64,
    #[serde(default)]
    lr_schedule: Schedule,
    #[serde(default)]
    lr_warmup_steps: usize,
    #[serde(default = "one_usize")]
    gradient_accumulation_steps: usize,
    #[serde(default = "one")]
    max_grad_norm: f64,
    #[serde(default = "dropout")]
    caption_dropout: f64,
    #[serde(default = "yes")]
    train_text_encoder: bool,
    snr_gamma: Option<f64>,
    #[serde(default)]
    noise_offset: f64,
    ema_decay: Option<f64>,
    #[serde(default)]
    use_ema_warmup: bool,
    #[serde(default = "one")]
    ema_inv_gamma: f64,
    #[serde(default = "two_thirds")]
    ema_power: f64,
    #[serde(default = "adam_wd")]
    adam_weight_decay: f32,
    #[serde(default)]
    gradient_checkpointing: bool,
    #[serde(default)]
    mixed_precision: Precision,
}

/// A mixed-precision choice as the TOML spells it (diffusers' `--mixed_precision` values).
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Precision {
    #[default]
    No,
    Bf16,
}

impl From<Precision> for MixedPrecision {
    fn from(p: Precision) -> Self {
        match p {
            Precision::No => Self::No,
            Precision::Bf16 => Self::Bf16,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckpointSection {
    #[serde(default = "five_hundred")]
    every: usize,
    #[serde(default = "two")]
    keep: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: five_hundred(),
            keep: two(),
        }
    }
}

/// A schedule name as the TOML spells it.
#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Schedule {
    #[default]
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl From<Schedule> for LrSchedule {
    fn from(s: Schedule) -> Self {
        match s {
            Schedule::Constant => Self::Constant,
            Schedule::ConstantWithWarmup => Self::ConstantWithWarmup,
            Schedule::Linear => Self::Linear,
            Schedule::Cosine => Self::Cosine,
        }
    }
}

fn sixteen() -> usize {
    16
}
fn vae_lr() -> f64 {
    1e-3
}
fn denoiser_lr() -> f64 {
    1e-3
}
fn kl_weight() -> f64 {
    1e-4
}
fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn dropout() -> f64 {
    0.1
}
fn yes() -> bool {
    true
}
fn two_thirds() -> f64 {
    2.0 / 3.0
}
fn adam_wd() -> f32 {
    1e-2
}
fn five_hundred() -> usize {
    500
}
fn two() -> usize {
    2
}

/// Deserializes a model section into its config type, with every key the type does not read
/// reported as an unknown field.
fn model_config<T: DeserializeOwned>(table: &toml::Table, section: &str) -> Result<(T, Value)> {
    let json = serde_json::to_value(table)
        .map_err(|e| Error::InvalidOption(format!("[models.{section}]: {e}")))?;
    let mut unknown = Vec::new();
    let config: T = serde_ignored::deserialize(json.clone(), |path| unknown.push(path.to_string()))
        .map_err(|e| Error::InvalidOption(format!("[models.{section}]: {e}")))?;
    if let Some(first) = unknown.first() {
        return Err(Error::InvalidOption(format!(
            "[models.{section}]: unknown field `{first}` (the section takes diffusers' / transformers' config.json fields)"
        )));
    }
    Ok((config, json))
}

impl Recipe {
    /// Reads and checks the recipe at `path`; every problem is an [`Error::Config`] naming the
    /// file and what is wrong.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path).map_err(|e| match e {
            Error::Config { .. } => e,
            other => Error::Config {
                path: path.to_path_buf(),
                message: other.to_string(),
            },
        })
    }

    fn parse(text: &str, path: &Path) -> Result<Self> {
        let file: File = toml::from_str(text).map_err(|e| {
            // one line: where, and what (toml's own rendering spans several lines)
            let at = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!("line {line}, column {column}: ")
            });
            Error::Config {
                path: path.to_path_buf(),
                message: format!("{}{}", at.unwrap_or_default(), e.message().trim()),
            }
        })?;
        let (vae, vae_json): (AutoencoderKLConfig, _) = model_config(&file.models.vae, "vae")?;
        let (text_encoder, text_json): (ClipTextConfig, _) =
            model_config(&file.models.text_encoder, "text_encoder")?;
        let (unet, unet_json): (UNet2DConditionModelConfig, _) =
            model_config(&file.models.unet, "unet")?;
        let scheduler_json = serde_json::to_value(&file.models.scheduler)
            .map_err(|e| Error::InvalidOption(format!("[models.scheduler]: {e}")))?;
        if scheduler_json.get("_class_name").is_none() {
            return Err(Error::InvalidOption(
                "[models.scheduler] needs `_class_name` (the sampler generation uses, e.g. \"EulerDiscreteScheduler\")".into(),
            ));
        }
        kiln_scheduler::SchedulerConfig::from_json(&scheduler_json.to_string())?;
        vae.validate()?;
        unet.validate()?;
        text_encoder.validate(path)?;

        let fail = |m: String| Err(Error::InvalidOption(m));
        let cross = unet
            .cross_attention_dim
            .expand(unet.block_out_channels.len(), "cross_attention_dim")?;
        if cross.iter().any(|&c| c != text_encoder.hidden_size) {
            return fail(format!(
                "the UNet's cross_attention_dim ({:?}) must equal the text encoder's hidden_size ({})",
                unet.cross_attention_dim, text_encoder.hidden_size
            ));
        }
        if unet.in_channels != vae.latent_channels || unet.out_channels != vae.latent_channels {
            return fail(format!(
                "the UNet's in_channels ({}) and out_channels ({}) must equal the VAE's latent_channels ({})",
                unet.in_channels, unet.out_channels, vae.latent_channels
            ));
        }
        let f = vae.scale_factor();
        let resolution = file.data.resolution;
        if resolution == 0 || !resolution.is_multiple_of(f) {
            return fail(format!(
                "[data] resolution {resolution} must be a positive multiple of the VAE's scale factor {f}"
            ));
        }
        let m = 1usize << unet.num_downsamplers();
        if !resolution.is_multiple_of(f * m) {
            return fail(format!(
                "[data] resolution {resolution} must be a multiple of {} (the VAE's factor {f} times the UNet's {m})",
                f * m
            ));
        }
        if text_encoder.max_position_embeddings < 77 {
            return fail(format!(
                "[models.text_encoder] max_position_embeddings {} must be at least 77 (CLIP's tokenizer pads to 77)",
                text_encoder.max_position_embeddings
            ));
        }
        if text_encoder.vocab_size != 49408 {
            return fail(format!(
                "[models.text_encoder] vocab_size {} must be 49408, CLIP's vocabulary",
                text_encoder.vocab_size
            ));
        }
        let (v, d) = (&file.vae, &file.denoiser);
        if v.steps == 0 || d.steps == 0 {
            return fail("[vae] and [denoiser] steps must be at least 1".into());
        }
        if file.checkpoints.every == 0 || file.checkpoints.keep == 0 {
            return fail("[checkpoints] every and keep must be at least 1".into());
        }
        if file.generation.steps == 0
            || !(file.generation.guidance_scale >= 1.0
                && file.generation.guidance_scale.is_finite())
        {
            return fail(
                "[generation] steps must be at least 1 and guidance_scale at least 1".into(),
            );
        }
        let vae_stage = VaeTrainConfig {
            resolution,
            batch_size: v.batch_size,
            learning_rate: v.learning_rate,
            lr_schedule: v.lr_schedule.into(),
            lr_warmup_steps: v.lr_warmup_steps,
            max_steps: v.steps,
            kl_weight: v.kl_weight,
            max_grad_norm: Some(v.max_grad_norm),
            random_flip: file.data.random_flip,
            seed: file.seed,
        };
        let denoiser_stage = TrainConfig {
            resolution: Some(resolution),
            batch_size: d.batch_size,
            learning_rate: d.learning_rate,
            lr_schedule: d.lr_schedule.into(),
            lr_warmup_steps: d.lr_warmup_steps,
            max_steps: d.steps,
            gradient_accumulation_steps: d.gradient_accumulation_steps,
            adam_weight_decay: d.adam_weight_decay,
            ema_decay: d.ema_decay,
            ema_warmup: d.use_ema_warmup.then_some(EmaWarmup {
                inv_gamma: d.ema_inv_gamma,
                power: d.ema_power,
            }),
            max_grad_norm: Some(d.max_grad_norm),
            snr_gamma: d.snr_gamma,
            noise_offset: d.noise_offset,
            train_text_encoder: d.train_text_encoder,
            caption_dropout: d.caption_dropout,
            gradient_checkpointing: d.gradient_checkpointing,
            mixed_precision: d.mixed_precision.into(),
            center_crop: true,
            random_flip: file.data.random_flip,
            seed: file.seed.wrapping_add(1),
            ..TrainConfig::default()
        };
        denoiser_stage.validate()?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut models = BTreeMap::new();
        models.insert("vae".to_string(), vae_json);
        models.insert("text_encoder".to_string(), text_json);
        models.insert("unet".to_string(), unet_json);
        models.insert("scheduler".to_string(), scheduler_json);
        Ok(Self {
            path: path.to_path_buf(),
            text: text.to_string(),
            seed: file.seed,
            data_dir: base.join(&file.data.dir),
            resolution,
            models,
            vae,
            text_encoder,
            unet,
            generation: file.generation,
            vae_stage,
            denoiser_stage,
            checkpoint_every: file.checkpoints.every,
            checkpoints_kept: file.checkpoints.keep,
            pad_token: file.models.pad_token,
        })
    }

    /// The same recipe with every stage's step count and the checkpoint interval replaced (for
    /// smoke runs of a real config: CI trains a few steps of the shipped one).
    pub fn with_steps(mut self, vae_steps: usize, denoiser_steps: usize, every: usize) -> Self {
        self.vae_stage.max_steps = vae_steps.max(1);
        self.denoiser_stage.max_steps = denoiser_steps.max(1);
        self.checkpoint_every = every.max(1);
        self
    }
}
