//! The denoising loop of diffusers' `train_text_to_image.py`: each step draws a batch, encodes
//! the images with the (frozen) VAE and the captions with the text encoder (frozen, or trained
//! with the UNet), and takes one AdamW step on the denoising loss
//! ([`kiln_pipeline::training::DiffusionLoss`]). Every random draw (order, crops, flips, caption
//! dropout, VAE samples, noise, timesteps) comes from one seeded host generator, so a run is
//! reproducible on every backend, and checkpoints hold everything a run needs to go on exactly
//! ([`Trainer::save_checkpoint`], [`Trainer::resume`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::tensor::{DType, Device, Tensor};
use kiln_clip::{ClipTextModel, ClipTokenizer};
use kiln_pipeline::training::DiffusionLoss;
use kiln_scheduler::{NoiseSource, SchedulerConfig, SeededNoise};
use kiln_unet::UNet2DConditionModel;
use kiln_unet::unet_2d_condition::SampleSize;
use kiln_vae::AutoencoderKL;
use serde_json::Value;

use crate::checkpoint::{
    PipelineWeights, RunState, STATE_DIR, load_module, load_optimizer, read_state,
    stable_param_ids, to_device, write_pipeline_folder, write_training_state,
};
use crate::dataset::{ImageCaptionDataset, Preprocess, load_image};
use crate::ema::{Ema, EmaWarmup};
use crate::{Error, Result};

/// The learning-rate schedule (diffusers' `get_scheduler` names), as a factor of the base rate
/// at each optimiser step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LrSchedule {
    /// The base rate throughout (the script's default).
    #[default]
    Constant,
    /// Linear warm-up from 0, then constant.
    ConstantWithWarmup,
    /// Linear warm-up, then linear decay to 0 at the last step.
    Linear,
    /// Linear warm-up, then half a cosine down to 0 at the last step.
    Cosine,
}

impl std::str::FromStr for LrSchedule {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            other => {
                return Err(Error::InvalidOption(format!(
                    "unknown learning-rate schedule `{other}`: use constant, constant_with_warmup, linear or cosine"
                )));
            }
        })
    }
}

impl LrSchedule {
    /// The factor at optimiser step `step` (0-based) of `total`, with `warmup` warm-up steps:
    /// transformers' `get_*_schedule_with_warmup` lambdas, which diffusers' script uses.
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let (step, warmup, total) = (step as f64, warmup as f64, total as f64);
        if self != Self::Constant && step < warmup {
            return step / warmup.max(1.0);
        }
        match self {
            Self::Constant | Self::ConstantWithWarmup => 1.0,
            Self::Linear => ((total - step) / (total - warmup).max(1.0)).max(0.0),
            Self::Cosine => {
                let progress = (step - warmup) / (total - warmup).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// The precision of the UNet's forward pass in training (the script's `--mixed_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MixedPrecision {
    /// Everything in f32 (the script's `no`).
    #[default]
    No,
    /// bf16 autocast: each step runs the UNet's forward (and so its backward) on a bf16 copy of
    /// the f32 weights ([`kiln_nn::precision::cast_params`]); the loss is computed in f32 and
    /// AdamW updates the f32 weights, which are what checkpoints hold. GroupNorm statistics stay
    /// in f32. Halves the activations' memory; the speed depends on the backend's bf16 kernels.
    Bf16,
}

impl std::str::FromStr for MixedPrecision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "no" | "f32" | "fp32" => Ok(Self::No),
            "bf16" => Ok(Self::Bf16),
            "fp16" | "f16" => Err(Error::InvalidOption(
                "fp16 mixed precision needs loss scaling, which Kiln does not do: use bf16 (same range as f32) or no".into(),
            )),
            other => Err(Error::InvalidOption(format!(
                "unknown mixed precision `{other}`: use no or bf16"
            ))),
        }
    }
}

impl MixedPrecision {
    /// The dtype the UNet's forward pass runs in.
    pub fn dtype(self) -> DType {
        match self {
            Self::No => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// Options of a denoising run (fine-tuning or from scratch), with the defaults of diffusers'
/// script where it has them.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// Square training resolution in pixels (`None`: the model's default size).
    pub resolution: Option<usize>,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW base learning rate.
    pub learning_rate: f64,
    /// How the learning rate changes over the run.
    pub lr_schedule: LrSchedule,
    /// Warm-up steps of the schedule (ignored by [`LrSchedule::Constant`]).
    pub lr_warmup_steps: usize,
    /// The run's length in optimiser steps, for the decaying schedules.
    pub max_steps: usize,
    /// Batches whose gradients are averaged into each optimiser step.
    pub gradient_accumulation_steps: usize,
    /// AdamW `beta_1`.
    pub adam_beta1: f32,
    /// AdamW `beta_2`.
    pub adam_beta2: f32,
    /// AdamW `epsilon`.
    pub adam_epsilon: f32,
    /// AdamW decoupled weight decay.
    pub adam_weight_decay: f32,
    /// Keep an exponential moving average of the trained weights with this maximum decay
    /// (diffusers' `--use_ema` uses 0.9999) and save it instead of the last weights (`None`: no
    /// average).
    pub ema_decay: Option<f64>,
    /// The moving average's warm-up ([`EmaWarmup`]; `None`: diffusers' default
    /// `(1 + s) / (10 + s)` ramp).
    pub ema_warmup: Option<EmaWarmup>,
    /// Clip the gradients to this global L2 norm before each step (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Min-SNR weighting `gamma` (`None`: plain mean squared error).
    pub snr_gamma: Option<f64>,
    /// Offset noise (the script's `--noise_offset`): `noise_offset * N(0, 1)` per sample and
    /// channel is added to the noise, so the model learns to change an image's mean brightness.
    pub noise_offset: f64,
    /// Train the text encoder with the UNet (from the same loss) instead of keeping it frozen.
    pub train_text_encoder: bool,
    /// The probability that an example's caption is replaced by the empty caption, so the model
    /// also learns the unconditional prediction that classifier-free guidance needs.
    pub caption_dropout: f64,
    /// Recompute the memory-bound parts of the forward pass during the backward pass instead of
    /// keeping their activations (burn's balanced gradient checkpointing, over the UNet and a
    /// trained text encoder): less memory, some more time; the same values.
    pub gradient_checkpointing: bool,
    /// The UNet forward's precision (the weights and the optimiser stay f32).
    pub mixed_precision: MixedPrecision,
    /// Crop the image centre (otherwise a random square).
    pub center_crop: bool,
    /// Flip half the images horizontally.
    pub random_flip: bool,
    /// Seed of every random draw.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            resolution: None,
            batch_size: 1,
            learning_rate: 1e-5,
            lr_schedule: LrSchedule::Constant,
            lr_warmup_steps: 500,
            max_steps: 1000,
            gradient_accumulation_steps: 1,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            adam_weight_decay: 1e-2,
            max_grad_norm: Some(1.0),
            ema_decay: None,
            ema_warmup: None,
            snr_gamma: None,
            noise_offset: 0.0,
            train_text_encoder: false,
            caption_dropout: 0.0,
            gradient_checkpointing: false,
            mixed_precision: MixedPrecision::No,
            center_crop: false,
            random_flip: false,
            seed: 0,
        }
    }
}

impl TrainConfig {
    /// The learning rate of optimiser step `step` (0-based): the base rate times the schedule.
    pub fn learning_rate_at(&self, step: usize) -> f64 {
        self.learning_rate
            * self
                .lr_schedule
                .factor(step, self.lr_warmup_steps, self.max_steps)
    }

    /// Checks every option's range; the message names the option and its allowed values.
    pub fn validate(&self) -> Result<()> {
        let fail = |m: String| Err(Error::InvalidOption(m));
        if self.batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return fail("batch size and gradient accumulation steps must be at least 1".into());
        }
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return fail(format!(
                "learning rate {} must be positive",
                self.learning_rate
            ));
        }
        if self
            .max_grad_norm
            .is_some_and(|n| !(n > 0.0 && n.is_finite()))
        {
            return fail(format!(
                "max_grad_norm {:?} must be positive",
                self.max_grad_norm
            ));
        }
        if self.ema_decay.is_some_and(|d| !(0.0..1.0).contains(&d)) {
            return fail(format!("ema_decay {:?} must be in [0, 1)", self.ema_decay));
        }
        if let Some(w) = self.ema_warmup
            && !(w.inv_gamma > 0.0
                && w.power > 0.0
                && w.inv_gamma.is_finite()
                && w.power.is_finite())
        {
            return fail(format!(
                "EMA warm-up inv_gamma {} and power {} must be positive",
                w.inv_gamma, w.power
            ));
        }
        if !(0.0..=1.0).contains(&self.caption_dropout) {
            return fail(format!(
                "caption_dropout {} must be a probability in [0, 1]",
                self.caption_dropout
            ));
        }
        if !(self.noise_offset >= 0.0 && self.noise_offset.is_finite()) {
            return fail(format!(
                "noise_offset {} must be 0 or more",
                self.noise_offset
            ));
        }
        Ok(())
    }
}

/// What a denoising run trains: the UNet, and the text encoder when it learns too.
#[derive(Module, Debug)]
pub struct Denoiser {
    /// The noise-prediction network.
    pub unet: UNet2DConditionModel,
    /// The text encoder, when it is trained (otherwise it stays frozen outside this module).
    pub text_encoder: Option<ClipTextModel>,
}

/// Where a run's tokenizer files come from when a folder is written.
#[derive(Debug, Clone)]
pub enum TokenizerFiles {
    /// Copied from this tokenizer folder.
    Folder(PathBuf),
    /// CLIP's embedded vocabulary with this padding token.
    Embedded(String),
}

/// Every part of a Stable Diffusion model a run starts from, with the diffusers configs that
/// describe them (written into each saved folder as they are).
#[derive(Debug)]
pub struct Components {
    /// The tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Where the tokenizer's files come from.
    pub tokenizer_files: TokenizerFiles,
    /// The text encoder (on the plain device; it moves to the autodiff device when trained).
    pub text_encoder: ClipTextModel,
    /// The VAE (frozen).
    pub vae: AutoencoderKL,
    /// The UNet (on the autodiff device).
    pub unet: UNet2DConditionModel,
    /// `config.json` of the UNet, VAE and text encoder and `scheduler_config.json`, by component
    /// name (`unet`, `vae`, `text_encoder`, `scheduler`).
    pub configs: BTreeMap<String, Value>,
}

impl Components {
    /// Loads a diffusers folder: tokenizer, text encoder and VAE on `device`, the UNet on
    /// `Device::autodiff(device)`, and the configs.
    pub fn from_dir(model_dir: &Path, device: &Device) -> Result<Self> {
        kiln_nn::config::require_dir(model_dir, "model folder")?;
        let tokenizer = ClipTokenizer::from_dir(model_dir.join("tokenizer"))?;
        let text_encoder = ClipTextModel::from_dir(model_dir.join("text_encoder"), device)?;
        let vae = AutoencoderKL::from_pretrained(&model_dir.join("vae"), DType::F32, device)?;
        let unet = UNet2DConditionModel::from_pretrained(
            &model_dir.join("unet"),
            DType::F32,
            &Device::autodiff(device.clone()),
        )?;
        let mut configs = BTreeMap::new();
        for (name, file) in COMPONENT_CONFIGS {
            let value: Value = kiln_nn::config::read_json(&model_dir.join(file), file)?;
            configs.insert(name.to_string(), value);
        }
        Ok(Self {
            tokenizer,
            tokenizer_files: TokenizerFiles::Folder(model_dir.join("tokenizer")),
            text_encoder,
            vae,
            unet,
            configs,
        })
    }
}

/// The components' config files in a diffusers folder.
pub(crate) const COMPONENT_CONFIGS: [(&str, &str); 4] = [
    ("unet", "unet/config.json"),
    ("vae", "vae/config.json"),
    ("text_encoder", "text_encoder/config.json"),
    ("scheduler", "scheduler/scheduler_config.json"),
];

/// A denoising run: the frozen VAE (and text encoder, unless it is trained) on `device`, the
/// trained [`Denoiser`] on `Device::autodiff(device)`, the optimiser state, the data and the
/// random generator.
pub struct Trainer {
    tokenizer: ClipTokenizer,
    tokenizer_files: TokenizerFiles,
    frozen_text_encoder: Option<ClipTextModel>,
    vae: AutoencoderKL,
    model: Option<Denoiser>,
    ema: Option<Ema<Denoiser>>,
    objective: DiffusionLoss,
    optim: ModuleOptimizer,
    rng: SeededNoise,
    batches: Batches,
    dataset: ImageCaptionDataset,
    config: TrainConfig,
    pre: Preprocess,
    device: Device,
    train_device: Device,
    configs: BTreeMap<String, Value>,
    steps: usize,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("examples", &self.dataset.len())
            .field("config", &self.config)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// Loads the diffusers folder `model_dir` (tokenizer, text encoder, VAE, UNet, scheduler
    /// config) for fine-tuning its UNet (and its text encoder with `train_text_encoder`) on
    /// `dataset`.
    pub fn new(
        model_dir: &Path,
        dataset: ImageCaptionDataset,
        config: TrainConfig,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        Self::from_components(
            Components::from_dir(model_dir, device)?,
            dataset,
            config,
            device,
        )
    }

    /// A run over components built or loaded by the caller (a model trained from scratch starts
    /// here with freshly initialised ones).
    pub fn from_components(
        components: Components,
        dataset: ImageCaptionDataset,
        config: TrainConfig,
        device: &Device,
    ) -> Result<Self> {
        config.validate()?;
        let Components {
            tokenizer,
            tokenizer_files,
            text_encoder,
            vae,
            unet,
            configs,
        } = components;
        let train_device = match config.gradient_checkpointing {
            true => Device::autodiff(device.clone()).gradient_checkpointing(),
            false => Device::autodiff(device.clone()),
        };
        if unet.config.in_channels != vae.config.latent_channels {
            return Err(Error::InvalidOption(
                "this is an inpainting UNet; Kiln trains text-to-image UNets only".into(),
            ));
        }
        for name in ["unet", "vae", "text_encoder", "scheduler"] {
            if !configs.contains_key(name) {
                return Err(Error::InvalidOption(format!("no `{name}` config given")));
            }
        }
        let scheduler_config = SchedulerConfig::from_json(&configs["scheduler"].to_string())?;
        let objective = DiffusionLoss::new(&scheduler_config, config.snr_gamma)?;
        let f = vae.scale_factor();
        let resolution = config.resolution.unwrap_or(match unet.config.sample_size {
            Some(SampleSize::Square(s)) => s * f,
            Some(SampleSize::Rect([h, w])) => h.min(w) * f,
            None => 64 * f,
        });
        if resolution == 0 || !resolution.is_multiple_of(f) {
            return Err(Error::InvalidOption(format!(
                "resolution {resolution} must be a positive multiple of the VAE scale factor {f}"
            )));
        }
        let (frozen_text_encoder, trained_text_encoder) = if config.train_text_encoder {
            (None, Some(to_device(text_encoder, &train_device)))
        } else {
            (Some(text_encoder), None)
        };
        // parameters live under the training device's checkpointing strategy
        let unet = match config.gradient_checkpointing {
            true => to_device(unet, &train_device),
            false => unet,
        };
        let model = stable_param_ids(Denoiser {
            unet,
            text_encoder: trained_text_encoder,
        });
        let optim = adamw(&config);
        let ema = config
            .ema_decay
            .map(|d| Ema::new(&model, d).with_warmup(config.ema_warmup));
        Ok(Self {
            tokenizer,
            tokenizer_files,
            frozen_text_encoder,
            vae,
            model: Some(model),
            ema,
            objective,
            optim,
            rng: SeededNoise::new(config.seed),
            pre: Preprocess {
                resolution,
                center_crop: config.center_crop,
            },
            batches: Batches::default(),
            dataset,
            config,
            device: device.clone(),
            train_device,
            configs,
            steps: 0,
        })
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The options of the run.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The moving average of the trained weights, when `ema_decay` is set.
    pub fn ema(&self) -> Option<&Ema<Denoiser>> {
        self.ema.as_ref()
    }

    /// The square resolution images are trained at.
    pub fn resolution(&self) -> usize {
        self.pre.resolution
    }

    /// What is trained (on the autodiff device).
    pub fn model(&self) -> &Denoiser {
        self.model
            .as_ref()
            .expect("the model is only taken out during a step")
    }

    /// The UNet being trained (on the autodiff device).
    pub fn unet(&self) -> &UNet2DConditionModel {
        &self.model().unet
    }

    /// The denoising loss of one batch, with every input drawn from the generator; the graph is
    /// on the training device.
    fn batch_loss(&mut self, indices: &[usize]) -> Result<Tensor<1>> {
        let n = indices.len();
        let mut images = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        for &i in indices {
            let example = &self.dataset.examples[i];
            let crop = (
                self.rng.next_index(1 << 20) as f64 / (1 << 20) as f64,
                self.rng.next_index(1 << 20) as f64 / (1 << 20) as f64,
            );
            let flip = self.config.random_flip && self.rng.next_index(2) == 1;
            let drop = self.config.caption_dropout > 0.0
                && (self.rng.next_index(1 << 30) as f64)
                    < self.config.caption_dropout * (1u64 << 30) as f64;
            images.push(load_image(
                &example.image,
                &self.pre,
                crop,
                flip,
                &self.device,
            )?);
            ids.push(
                self.tokenizer
                    .encode(if drop { "" } else { &example.caption })?,
            );
        }
        let images = Tensor::cat(images, 0);
        // the frozen VAE, outside the graph
        let posterior = self.vae.encode(images, None)?;
        let eps = self.rng.noise(posterior.mean.dims(), &self.device)?;
        let latents = self.vae.scale_latents(posterior.sample(eps));
        let mut noise = self.rng.noise(latents.dims(), &self.device)?;
        if self.config.noise_offset > 0.0 {
            let [b, c, _, _] = latents.dims();
            let offset = self.rng.noise([b, c, 1, 1], &self.device)?;
            noise = noise + offset.mul_scalar(self.config.noise_offset);
        }
        let t_max = self.objective.num_train_timesteps();
        let timesteps: Vec<f64> = (0..n).map(|_| self.rng.next_index(t_max) as f64).collect();

        let context = match (&self.frozen_text_encoder, &self.model().text_encoder) {
            (_, Some(trained)) => {
                trained
                    .encode_ids(&ids, 0, &self.train_device)?
                    .hidden_state
            }
            (Some(frozen), None) => {
                let context = frozen.encode_ids(&ids, 0, &self.device)?.hidden_state;
                Tensor::<3>::from_data(context.into_data(), &self.train_device)
            }
            (None, None) => unreachable!("a text encoder is frozen or trained"),
        };
        let to_train = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &self.train_device);
        // autocast: a low-precision copy of the weights, inside the graph (its gradients flow
        // back to the f32 weights)
        let autocast;
        let unet = match self.config.mixed_precision {
            MixedPrecision::No => self.unet(),
            precision => {
                autocast = kiln_nn::precision::cast_params(self.unet().clone(), precision.dtype());
                &autocast
            }
        };
        Ok(self.objective.loss(
            unet,
            to_train(latents),
            to_train(noise),
            &timesteps,
            context,
        )?)
    }

    /// The loss on the dataset's first `batch_size` examples with every random draw taken from a
    /// generator seeded with `seed`: the same inputs every call, so it tracks progress (a
    /// validation loss). Changes nothing.
    pub fn eval_loss(&mut self, seed: u64) -> Result<f32> {
        let saved = std::mem::replace(&mut self.rng, SeededNoise::new(seed));
        let n = self.config.batch_size.min(self.dataset.len());
        let indices: Vec<usize> = (0..n).collect();
        let loss = self.batch_loss(&indices);
        self.rng = saved;
        Ok(loss?.into_scalar())
    }

    /// The learning rate of the next optimiser step.
    pub fn learning_rate(&self) -> f64 {
        self.config.learning_rate_at(self.steps)
    }

    /// One optimiser step: `gradient_accumulation_steps` batches, their gradients averaged (each
    /// loss divided by the count, as accelerate does), clipped, then AdamW at the scheduled
    /// rate. Returns the mean loss of the batches. A loss that is not finite is an
    /// [`Error::NonFiniteLoss`] and changes nothing.
    pub fn step(&mut self) -> Result<f32> {
        let k = self.config.gradient_accumulation_steps;
        let mut accumulated = GradientsAccumulator::<Denoiser>::new();
        let mut total = 0.0f32;
        for _ in 0..k {
            let indices =
                self.batches
                    .next(&mut self.rng, self.dataset.len(), self.config.batch_size);
            let loss = self.batch_loss(&indices)?;
            let value: f32 = loss.clone().into_scalar();
            if !value.is_finite() {
                return Err(Error::NonFiniteLoss {
                    value,
                    step: self.steps + 1,
                });
            }
            total += value;
            let loss = if k > 1 { loss / k as f32 } else { loss };
            let grads = GradientsParams::from_grads(loss.backward(), self.model());
            accumulated.accumulate(self.model(), grads);
        }
        let lr = self.learning_rate();
        let model = self
            .model
            .take()
            .expect("the model is present between steps");
        let mut grads = accumulated.grads();
        if let Some(max_norm) = self.config.max_grad_norm {
            clip_grad_norm(&model, &mut grads, max_norm);
        }
        let model = self.optim.step(lr, model, grads);
        if let Some(ema) = &mut self.ema {
            ema.update(&model);
        }
        self.model = Some(model);
        self.steps += 1;
        Ok(total / k as f32)
    }

    /// Writes a complete diffusers folder at `out`: tokenizer, text encoder, VAE, UNet,
    /// scheduler and `model_index.json`, the weights as f32 safetensors with diffusers' (and
    /// transformers') names; the trained ones are their moving average when `ema_decay` is set.
    /// The folder is assembled under a temporary name next to `out` and renamed into place,
    /// replacing an earlier one only once the new one is complete.
    pub fn save(&self, out: &Path) -> Result<()> {
        kiln_nn::config::write_dir_atomically(out, true, |tmp: &Path| self.write_folder(tmp))
    }

    /// Writes a checkpoint a run can resume from: the folder [`save`](Self::save) writes, and
    /// under `training_state/` the trained weights as they are (not averaged), the AdamW state,
    /// the moving average and everything else [`resume`](Self::resume) needs. Written under a
    /// temporary name and renamed into place.
    pub fn save_checkpoint(&self, out: &Path) -> Result<()> {
        kiln_nn::config::write_dir_atomically(out, true, |tmp: &Path| {
            self.write_folder(tmp)?;
            write_training_state(
                tmp,
                self.model(),
                self.ema.as_ref().map(Ema::model),
                &self.optim,
                &RunState {
                    steps: self.steps,
                    rng: self.rng.clone(),
                    order: self.batches.order.clone(),
                    cursor: self.batches.cursor,
                    ema_updates: self.ema.as_ref().map(Ema::updates),
                },
            )
        })
    }

    /// Continues from a checkpoint written by [`save_checkpoint`](Self::save_checkpoint): the
    /// weights, AdamW moments and step counts, the moving average, the data order and the
    /// generator are restored, so the run goes on exactly as if it had not stopped.
    /// `components` must be the run's model (as [`Components::from_dir`] reads the checkpoint's
    /// folder); a checkpoint of another shape is refused, naming what differs.
    pub fn resume(mut self, checkpoint: &Path) -> Result<Self> {
        let state_dir = checkpoint.join(STATE_DIR);
        let state: RunState = read_state(&state_dir.join("state.json"))?;
        let model = self.model.take().expect("present between steps");
        let model = load_module(model, &state_dir.join("model.safetensors"))?;
        self.model = Some(model);
        if let Some(ema) = self.ema.take() {
            let updates = state.ema_updates.ok_or_else(|| {
                Error::Resume(format!(
                    "`{}` holds no moving average; resume without ema_decay or from another checkpoint",
                    checkpoint.display()
                ))
            })?;
            let averaged = load_module(ema.model().clone(), &state_dir.join("ema.safetensors"))?;
            self.ema = Some(ema.restored(averaged, updates));
        }
        let optim = std::mem::replace(&mut self.optim, adamw(&self.config));
        self.optim = load_optimizer(optim, &state_dir.join("optimizer.bpk"))?;
        self.batches = state.batches(self.dataset.len(), checkpoint)?;
        self.steps = state.steps;
        self.rng = state.rng;
        Ok(self)
    }

    fn write_folder(&self, dir: &Path) -> Result<()> {
        let model = match &self.ema {
            Some(ema) => ema.model().clone(),
            None => self.model().valid(),
        };
        let text_encoder = match (&model.text_encoder, &self.frozen_text_encoder) {
            (Some(trained), _) => trained,
            (None, Some(frozen)) => frozen,
            (None, None) => unreachable!("a text encoder is frozen or trained"),
        };
        write_pipeline_folder(
            dir,
            &self.configs,
            &self.tokenizer_files,
            &PipelineWeights {
                unet: &model.unet,
                vae: &self.vae,
                text_encoder,
            },
        )
    }
}

/// The epoch order of a run and the position in it: a fresh seeded shuffle every epoch.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Batches {
    pub(crate) order: Vec<usize>,
    pub(crate) cursor: usize,
}

impl Batches {
    /// The next `batch` example indices of a dataset of `len` examples.
    pub(crate) fn next(&mut self, rng: &mut SeededNoise, len: usize, batch: usize) -> Vec<usize> {
        (0..batch)
            .map(|_| {
                if self.cursor >= self.order.len() {
                    self.order = (0..len).collect();
                    for i in (1..self.order.len()).rev() {
                        let j = rng.next_index(i + 1);
                        self.order.swap(i, j);
                    }
                    self.cursor = 0;
                }
                self.cursor += 1;
                self.order[self.cursor - 1]
            })
            .collect()
    }
}

/// burn's AdamW with `config`'s betas, epsilon and decoupled weight decay (the update PyTorch's
/// `torch.optim.AdamW` makes).
pub fn adamw(config: &TrainConfig) -> ModuleOptimizer {
    AdamWConfig::new()
        .with_beta_1(config.adam_beta1)
        .with_beta_2(config.adam_beta2)
        .with_epsilon(config.adam_epsilon)
        .with_weight_decay(config.adam_weight_decay)
        .init()
}

/// Scales `grads` so that their global L2 norm (over every parameter of `module`) is at most
/// `max_norm`, as `torch.nn.utils.clip_grad_norm_` does (coefficient
/// `min(1, max_norm / (norm + 1e-6))`); returns the norm before clipping. burn's own clipping
/// works per parameter tensor, which is not what the fine-tuning script does.
pub fn clip_grad_norm<M: Module>(module: &M, grads: &mut GradientsParams, max_norm: f64) -> f64 {
    struct Norm<'a> {
        grads: &'a GradientsParams,
        sum_sq: f64,
    }
    impl ModuleVisitor for Norm<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.get::<D>(param.id) {
                self.sum_sq += g.powi_scalar(2).sum().into_scalar::<f64>();
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        coef: f64,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                self.grads.register(param.id, g * self.coef);
            }
        }
    }
    let mut norm = Norm { grads, sum_sq: 0.0 };
    module.visit(&mut norm);
    let total = norm.sum_sq.sqrt();
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef < 1.0 {
        module.visit(&mut Scale { grads, coef });
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The factors diffusers' `get_scheduler(name, optimizer, num_warmup_steps=10,
    /// num_training_steps=100)` gives at steps 0, 5, 10, 30, 55, 99, 100 (torch 2.15,
    /// diffusers 0.42.1; rounded to 6 digits).
    #[test]
    fn schedules_match_diffusers_get_scheduler() {
        let steps = [0, 5, 10, 30, 55, 99, 100];
        let expected: [(&str, [f64; 7]); 4] = [
            ("constant", [1.0; 7]),
            ("constant_with_warmup", [0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]),
            ("linear", [0.0, 0.5, 1.0, 0.777778, 0.5, 0.011111, 0.0]),
            ("cosine", [0.0, 0.5, 1.0, 0.883022, 0.5, 0.000305, 0.0]),
        ];
        for (name, values) in expected {
            let schedule: LrSchedule = name.parse().unwrap();
            for (step, want) in steps.iter().zip(values) {
                let got = schedule.factor(*step, 10, 100);
                assert!(
                    (got - want).abs() < 1e-6,
                    "{name} at {step}: {got} vs {want}"
                );
            }
        }
        assert!("warmup_cosine".parse::<LrSchedule>().is_err());
    }
}
