//! The published model shapes Kiln knows by name, for running them with random weights: SD 1.5
//! and SD 2.1 (768, v-prediction) as their diffusers folders' `config.json` files describe them
//! (the same configs `xtask/full_size.py` builds the full-size reference models from), SDXL 1.0's
//! base (`xtask/fixtures/sdxl_single_file.py`'s configs, checked there against diffusers), and
//! `tiny`, the embedded default model's shapes (`crate::embedded`).
//!
//! Speed and memory do not depend on the weights' values, so `kiln bench --preset sd15`
//! measures SD 1.5 without downloading it ([`StableDiffusionPipeline::random`]).

use std::path::Path;

use kiln_clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};
use kiln_scheduler::SchedulerConfig;
use kiln_unet::{UNet2DConditionModel, UNet2DConditionModelConfig};
use kiln_vae::{AutoencoderKL, AutoencoderKLConfig};
use serde_json::Value;

use crate::{Error, GenerationDefaults, LoadOptions, Result, StableDiffusionPipeline};

/// A model shape by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Stable Diffusion 1.5: 512 px, CLIP ViT-L/14 text encoder, PNDM, epsilon.
    Sd15,
    /// Stable Diffusion 2.1: 768 px, OpenCLIP ViT-H text encoder, DDIM, v-prediction.
    Sd21,
    /// SDXL 1.0 base: 1024 px, CLIP ViT-L and OpenCLIP ViT-bigG text encoders, Euler.
    Sdxl,
    /// The embedded default model's shapes (32 px, 18.5 MB).
    Tiny,
}

impl std::str::FromStr for Preset {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sd15" => Ok(Self::Sd15),
            "sd21" => Ok(Self::Sd21),
            "sdxl" => Ok(Self::Sdxl),
            "tiny" => Ok(Self::Tiny),
            other => Err(Error::InvalidInput(format!(
                "unknown preset `{other}`: use sd15, sd21, sdxl or tiny"
            ))),
        }
    }
}

/// The configs of every component of a pipeline.
#[derive(Debug, Clone)]
pub struct ModelConfigs {
    /// `text_encoder/config.json` (the SDXL refiner's `text_encoder_2/config.json`: the first
    /// text encoder of the folder).
    pub text_encoder: ClipTextConfig,
    /// SDXL base: `text_encoder_2/config.json`.
    pub text_encoder_2: Option<ClipTextConfig>,
    /// `unet/config.json`.
    pub unet: UNet2DConditionModelConfig,
    /// `vae/config.json`.
    pub vae: AutoencoderKLConfig,
    /// `scheduler/scheduler_config.json`.
    pub scheduler: SchedulerConfig,
    /// The tokenizer's padding token (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).
    pub pad_token: String,
}

impl Preset {
    /// The preset's name, as [`FromStr`](std::str::FromStr) reads it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd15 => "sd15",
            Self::Sd21 => "sd21",
            Self::Sdxl => "sdxl",
            Self::Tiny => "tiny",
        }
    }

    /// The configs of the preset's components.
    pub fn configs(self) -> Result<ModelConfigs> {
        let json = match self {
            Self::Sd15 => include_str!("../presets/sd15.json").to_string(),
            Self::Sd21 => include_str!("../presets/sd21.json").to_string(),
            Self::Sdxl => include_str!("../presets/sdxl.json").to_string(),
            Self::Tiny => tiny_json(),
        };
        let mut all: Value = serde_json::from_str(&json).map_err(|e| preset_error(self, e))?;
        let mut part = |name: &str| all.get_mut(name).map(Value::take).unwrap_or(Value::Null);
        let text_encoder: ClipTextConfig =
            serde_json::from_value(part("text_encoder")).map_err(|e| preset_error(self, e))?;
        text_encoder.validate(Path::new(&format!("<preset {}>/text_encoder", self.name())))?;
        let text_encoder_2: Option<ClipTextConfig> = match part("text_encoder_2") {
            Value::Null => None,
            value => {
                let c: ClipTextConfig =
                    serde_json::from_value(value).map_err(|e| preset_error(self, e))?;
                c.validate(Path::new(&format!(
                    "<preset {}>/text_encoder_2",
                    self.name()
                )))?;
                Some(c)
            }
        };
        let unet: UNet2DConditionModelConfig =
            serde_json::from_value(part("unet")).map_err(|e| preset_error(self, e))?;
        unet.validate()?;
        let vae: AutoencoderKLConfig =
            serde_json::from_value(part("vae")).map_err(|e| preset_error(self, e))?;
        vae.validate()?;
        let scheduler = SchedulerConfig::from_json(&part("scheduler").to_string())?;
        let pad_token = part("pad_token")
            .as_str()
            .unwrap_or("<|endoftext|>")
            .to_string();
        Ok(ModelConfigs {
            text_encoder,
            text_encoder_2,
            unet,
            vae,
            scheduler,
            pad_token,
        })
    }
}

impl ModelConfigs {
    /// The configs of a diffusers folder (`text_encoder/config.json`, `unet/config.json`,
    /// `vae/config.json`, `scheduler/scheduler_config.json`), checked to fit together, before any
    /// weight is read. `pad_token` is SD 1.x's: a folder's own tokenizer files say its padding.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut texts = crate::pipeline_stable_diffusion::text_components(dir)
            .into_iter()
            .map(|(_, encoder)| ClipTextConfig::from_file(&dir.join(encoder).join("config.json")));
        let text_encoder = texts.next().expect("one text encoder at least")?;
        let text_encoder_2 = texts.next().transpose()?;
        let configs = Self {
            text_encoder,
            text_encoder_2,
            unet: UNet2DConditionModelConfig::from_file(&dir.join("unet").join("config.json"))?,
            vae: AutoencoderKLConfig::from_file(&dir.join("vae").join("config.json"))?,
            scheduler: SchedulerConfig::from_file(
                dir.join("scheduler").join("scheduler_config.json"),
            )?,
            pad_token: "<|endoftext|>".into(),
        };
        crate::pipeline_stable_diffusion::check_components(
            &configs.text_configs(),
            &configs.unet,
            &configs.vae,
        )?;
        Ok(configs)
    }

    /// The text encoders' configs, in order.
    pub fn text_configs(&self) -> Vec<&ClipTextConfig> {
        std::iter::once(&self.text_encoder)
            .chain(self.text_encoder_2.as_ref())
            .collect()
    }
}

fn preset_error(preset: Preset, e: serde_json::Error) -> Error {
    Error::InvalidInput(format!("preset {}: {e}", preset.name()))
}

/// The embedded model's configs (its own files, so the two cannot drift apart).
fn tiny_json() -> String {
    macro_rules! embedded {
        ($path:literal) => {
            include_str!(concat!("../embedded/tiny-shapes/", $path))
        };
    }
    format!(
        r#"{{"text_encoder": {}, "unet": {}, "vae": {}, "scheduler": {}, "pad_token": "<|endoftext|>"}}"#,
        embedded!("text_encoder/config.json"),
        embedded!("unet/config.json"),
        embedded!("vae/config.json"),
        embedded!("scheduler/scheduler_config.json"),
    )
}

impl StableDiffusionPipeline {
    /// A pipeline of `preset`'s shapes with fresh random weights drawn from `seed` (PyTorch's
    /// layer defaults, [`kiln_nn::init`]), in `options.dtype`, and the CLIP tokenizer compiled
    /// into Kiln: for measuring speed and memory, not for pictures.
    pub fn random(
        preset: Preset,
        options: LoadOptions,
        seed: u64,
        device: &burn::tensor::Device,
    ) -> Result<Self> {
        let configs = preset.configs()?;
        Self::from_configs(configs, options, seed, device, preset.name())
    }

    /// A pipeline of `configs`' shapes with fresh random weights drawn from `seed`.
    pub fn from_configs(
        configs: ModelConfigs,
        options: LoadOptions,
        seed: u64,
        device: &burn::tensor::Device,
        name: &str,
    ) -> Result<Self> {
        crate::pipeline_stable_diffusion::check_components(
            &configs.text_configs(),
            &configs.unet,
            &configs.vae,
        )?;
        let dtype = options.dtype.dtype();
        // SDXL's second encoder (OpenCLIP) pads with "!"
        let second = match &configs.text_encoder_2 {
            Some(c) => Some((
                ClipTokenizer::embedded("!")?,
                ClipTextModel::init(c, seed.wrapping_add(3), device),
            )),
            None => None,
        };
        let text_encoder = ClipTextModel::init(&configs.text_encoder, seed, device);
        let unet = kiln_nn::precision::cast_params(
            UNet2DConditionModel::init(&configs.unet, seed.wrapping_add(1), device)?,
            dtype,
        );
        let vae = kiln_nn::precision::cast_params(
            AutoencoderKL::init(&configs.vae, seed.wrapping_add(2), device)?,
            dtype,
        );
        let mut pipe = Self::from_parts(
            ClipTokenizer::embedded(&configs.pad_token)?,
            text_encoder,
            unet,
            vae,
            configs.scheduler,
            format!("<random {name}>").into(),
            GenerationDefaults::default(),
            device,
            dtype,
        );
        (pipe.tokenizer_2, pipe.text_encoder_2) = second.unzip();
        pipe.force_zeros_for_empty_prompt = pipe.is_sdxl();
        Ok(pipe)
    }
}
