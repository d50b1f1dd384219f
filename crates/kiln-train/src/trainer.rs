//! The fine-tuning loop of diffusers' `train_text_to_image.py`, UNet only: each step draws a
//! batch, encodes the images with the (frozen) VAE and the captions with the (frozen) text
//! encoder, and takes one AdamW step on the UNet's denoising loss
//! ([`kiln_pipeline::training::DiffusionLoss`]). Every random draw (order, crops, flips, VAE
//! samples, noise, timesteps) comes from one seeded host generator, so a run is reproducible on
//! every backend.

use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, ModuleOptimizer};
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use burn::tensor::{DType, Device, Tensor};
use kiln_clip::{ClipTextModel, ClipTokenizer};
use kiln_pipeline::training::DiffusionLoss;
use kiln_scheduler::{NoiseSource, SchedulerConfig, SeededNoise};
use kiln_unet::UNet2DConditionModel;
use kiln_unet::unet_2d_condition::SampleSize;
use kiln_vae::AutoencoderKL;

use crate::dataset::{ImageCaptionDataset, Preprocess, load_image};
use crate::ema::Ema;
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

/// Options of a fine-tuning run, with the defaults of diffusers' script where it has them.
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
    /// Keep an exponential moving average of the UNet with this maximum decay (diffusers'
    /// `--use_ema` uses 0.9999) and save it instead of the last weights (`None`: no average).
    pub ema_decay: Option<f64>,
    /// Clip the gradients to this global L2 norm before each step (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Min-SNR weighting `gamma` (`None`: plain mean squared error).
    pub snr_gamma: Option<f64>,
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
            snr_gamma: None,
            center_crop: false,
            random_flip: false,
            seed: 0,
        }
    }
}

/// A fine-tuning run: the frozen VAE and text encoder on `device`, the trained UNet on
/// `Device::autodiff(device)`, the optimiser state, the data and the random generator.
pub struct Trainer {
    tokenizer: ClipTokenizer,
    text_encoder: ClipTextModel,
    vae: AutoencoderKL,
    unet: Option<UNet2DConditionModel>,
    ema: Option<Ema<UNet2DConditionModel>>,
    objective: DiffusionLoss,
    optim: ModuleOptimizer,
    rng: SeededNoise,
    dataset: ImageCaptionDataset,
    config: TrainConfig,
    pre: Preprocess,
    device: Device,
    train_device: Device,
    model_dir: PathBuf,
    steps: usize,
    order: Vec<usize>,
    cursor: usize,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("model_dir", &self.model_dir)
            .field("examples", &self.dataset.len())
            .field("config", &self.config)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl Trainer {
    /// Loads the diffusers folder `model_dir` (tokenizer, text encoder, VAE, UNet, scheduler
    /// config) for fine-tuning its UNet on `dataset`.
    pub fn new(
        model_dir: &Path,
        dataset: ImageCaptionDataset,
        config: TrainConfig,
        device: &Device,
    ) -> Result<Self> {
        kiln_nn::config::require_dir(model_dir, "model folder")?;
        if config.batch_size == 0
            || !(config.learning_rate > 0.0 && config.learning_rate.is_finite())
        {
            return Err(Error::InvalidOption(format!(
                "batch size {} must be at least 1 and learning rate {} positive",
                config.batch_size, config.learning_rate
            )));
        }
        let train_device = Device::autodiff(device.clone());
        let tokenizer = ClipTokenizer::from_dir(model_dir.join("tokenizer"))?;
        let text_encoder = ClipTextModel::from_dir(model_dir.join("text_encoder"), device)?;
        let vae = AutoencoderKL::from_pretrained(&model_dir.join("vae"), DType::F32, device)?;
        let unet = UNet2DConditionModel::from_pretrained(
            &model_dir.join("unet"),
            DType::F32,
            &train_device,
        )?;
        if unet.config.in_channels != vae.config.latent_channels {
            return Err(Error::InvalidOption(
                "this is an inpainting UNet; Kiln fine-tunes text-to-image UNets only".into(),
            ));
        }
        let scheduler_config =
            SchedulerConfig::from_file(model_dir.join("scheduler").join("scheduler_config.json"))?;
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
        if config
            .max_grad_norm
            .is_some_and(|n| !(n > 0.0 && n.is_finite()))
        {
            return Err(Error::InvalidOption(format!(
                "max_grad_norm {:?} must be positive",
                config.max_grad_norm
            )));
        }
        if config.ema_decay.is_some_and(|d| !(0.0..1.0).contains(&d)) {
            return Err(Error::InvalidOption(format!(
                "ema_decay {:?} must be in [0, 1)",
                config.ema_decay
            )));
        }
        let optim = adamw(&config);
        let ema = config.ema_decay.map(|d| Ema::new(&unet, d));
        Ok(Self {
            tokenizer,
            text_encoder,
            vae,
            unet: Some(unet),
            ema,
            objective,
            optim,
            rng: SeededNoise::new(config.seed),
            pre: Preprocess {
                resolution,
                center_crop: config.center_crop,
            },
            order: Vec::new(),
            cursor: 0,
            dataset,
            config,
            device: device.clone(),
            train_device,
            model_dir: model_dir.to_path_buf(),
            steps: 0,
        })
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The moving average of the UNet, when `ema_decay` is set.
    pub fn ema(&self) -> Option<&Ema<UNet2DConditionModel>> {
        self.ema.as_ref()
    }

    /// The square resolution images are trained at.
    pub fn resolution(&self) -> usize {
        self.pre.resolution
    }

    /// The UNet being trained (on the autodiff device).
    pub fn unet(&self) -> &UNet2DConditionModel {
        self.unet
            .as_ref()
            .expect("the UNet is only taken out during a step")
    }

    /// The next `batch_size` example indices: a fresh seeded shuffle every epoch.
    fn next_batch(&mut self) -> Vec<usize> {
        (0..self.config.batch_size)
            .map(|_| {
                if self.cursor == self.order.len() {
                    self.order = (0..self.dataset.len()).collect();
                    for i in (1..self.order.len()).rev() {
                        let j = self.rng.next_index(i + 1);
                        self.order.swap(i, j);
                    }
                    self.cursor = 0;
                }
                self.cursor += 1;
                self.order[self.cursor - 1]
            })
            .collect()
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
            images.push(load_image(
                &example.image,
                &self.pre,
                crop,
                flip,
                &self.device,
            )?);
            ids.push(self.tokenizer.encode(&example.caption)?);
        }
        let images = Tensor::cat(images, 0);
        // frozen encoders, outside the graph
        let posterior = self.vae.encode(images, None)?;
        let eps = self.rng.noise(posterior.mean.dims(), &self.device)?;
        let latents = self.vae.scale_latents(posterior.sample(eps));
        let context = self
            .text_encoder
            .encode_ids(&ids, 0, &self.device)?
            .hidden_state;
        let noise = self.rng.noise(latents.dims(), &self.device)?;
        let t_max = self.objective.num_train_timesteps();
        let timesteps: Vec<f64> = (0..n).map(|_| self.rng.next_index(t_max) as f64).collect();

        let to_train = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &self.train_device);
        let context = Tensor::<3>::from_data(context.into_data(), &self.train_device);
        Ok(self.objective.loss(
            self.unet(),
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
        let c = &self.config;
        c.learning_rate
            * c.lr_schedule
                .factor(self.steps, c.lr_warmup_steps, c.max_steps)
    }

    /// One optimiser step: `gradient_accumulation_steps` batches, their gradients averaged (each
    /// loss divided by the count, as accelerate does), clipped, then AdamW at the scheduled
    /// rate. Returns the mean loss of the batches.
    pub fn step(&mut self) -> Result<f32> {
        let k = self.config.gradient_accumulation_steps;
        let mut accumulated = GradientsAccumulator::<UNet2DConditionModel>::new();
        let mut total = 0.0f32;
        for _ in 0..k {
            let indices = self.next_batch();
            let loss = self.batch_loss(&indices)?;
            let value: f32 = loss.clone().into_scalar();
            if !value.is_finite() {
                return Err(Error::InvalidOption(format!(
                    "the loss became {value} at step {}; lower the learning rate",
                    self.steps + 1
                )));
            }
            total += value;
            let loss = if k > 1 { loss / k as f32 } else { loss };
            let grads = GradientsParams::from_grads(loss.backward(), self.unet());
            accumulated.accumulate(self.unet(), grads);
        }
        let lr = self.learning_rate();
        let unet = self.unet.take().expect("the UNet is present between steps");
        let mut grads = accumulated.grads();
        if let Some(max_norm) = self.config.max_grad_norm {
            clip_grad_norm(&unet, &mut grads, max_norm);
        }
        let unet = self.optim.step(lr, unet, grads);
        if let Some(ema) = &mut self.ema {
            ema.update(&unet);
        }
        self.unet = Some(unet);
        self.steps += 1;
        Ok(total / k as f32)
    }

    /// Writes a complete diffusers folder at `out`: the base model's tokenizer, text encoder,
    /// VAE, scheduler and `model_index.json`, and the trained UNet as f32 safetensors with
    /// diffusers' names (its moving average when `ema_decay` is set). The folder is assembled under a temporary name next to `out` and
    /// renamed into place, replacing an earlier checkpoint only once the new one is complete.
    pub fn save(&self, out: &Path) -> Result<()> {
        kiln_nn::config::write_dir_atomically(out, true, |tmp: &Path| self.write_folder(tmp))
    }

    fn write_folder(&self, dir: &Path) -> Result<()> {
        for component in ["tokenizer", "text_encoder", "vae", "scheduler"] {
            kiln_nn::config::copy_dir(&self.model_dir.join(component), &dir.join(component))?;
        }
        let index = self.model_dir.join("model_index.json");
        copy_file(&index, &dir.join("model_index.json"))?;
        let unet_dir = dir.join("unet");
        std::fs::create_dir_all(&unet_dir).map_err(|source| Error::Io {
            path: unet_dir.clone(),
            source,
        })?;
        copy_file(
            &self.model_dir.join("unet/config.json"),
            &unet_dir.join("config.json"),
        )?;
        let weights = unet_dir.join("diffusion_pytorch_model.safetensors");
        let mut store = SafetensorsStore::from_file(&weights)
            .with_to_adapter(BurnToPyTorchAdapter)
            .skip_enum_variants(true);
        let unet = match &self.ema {
            Some(ema) => ema.model().clone(),
            None => self.unet().valid(),
        };
        unet.save_into(&mut store).map_err(|e| Error::Save {
            path: weights.clone(),
            message: e.to_string(),
        })
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

fn copy_file(from: &Path, to: &Path) -> Result<()> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|source| Error::Io {
            path: from.to_path_buf(),
            source,
        })
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
