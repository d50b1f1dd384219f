//! Training a VAE (diffusers' `AutoencoderKL`) from scratch as a variational autoencoder: each
//! step encodes a batch of images, samples the posterior, decodes, and takes an AdamW step on
//!
//! `loss = mean((decoded - image)^2) + kl_weight * mean(KL(posterior || N(0, 1)))`
//!
//! (the KL term per latent element, `0.5 (mean^2 + var - 1 - logvar)`, as the LDM autoencoder's
//! `DiagonalGaussianDistribution.kl`, averaged rather than summed so `kl_weight` does not depend
//! on the image size). Draws come from one seeded host generator; checkpoints hold everything a
//! run needs to go on exactly, as the denoising [`Trainer`](crate::Trainer)'s do.

use std::path::Path;

use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor};
use kiln_scheduler::{NoiseSource, SeededNoise};
use kiln_vae::AutoencoderKL;
use serde_json::Value;

use crate::checkpoint::{
    RunState, STATE_DIR, load_module, load_optimizer, read_state, stable_param_ids, to_device,
    write_training_state,
};
use crate::dataset::{ImageCaptionDataset, Preprocess, load_image};
use crate::trainer::{Batches, LrSchedule, TrainConfig, adamw, clip_grad_norm};
use crate::{Error, Result};

/// Options of a VAE training run.
#[derive(Debug, Clone, PartialEq)]
pub struct VaeTrainConfig {
    /// Square training resolution in pixels (a multiple of the VAE's scale factor).
    pub resolution: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW base learning rate.
    pub learning_rate: f64,
    /// How the learning rate changes over the run.
    pub lr_schedule: LrSchedule,
    /// Warm-up steps of the schedule.
    pub lr_warmup_steps: usize,
    /// The run's length in optimiser steps.
    pub max_steps: usize,
    /// Weight of the KL term (the LDM autoencoders use 1e-6 with a summed KL; Kiln's KL is a
    /// mean per latent element, so comparable weights are larger).
    pub kl_weight: f64,
    /// Clip the gradients to this global L2 norm (`None`: no clipping).
    pub max_grad_norm: Option<f64>,
    /// Flip half the images horizontally.
    pub random_flip: bool,
    /// Seed of every random draw.
    pub seed: u64,
}

impl Default for VaeTrainConfig {
    fn default() -> Self {
        Self {
            resolution: 32,
            batch_size: 16,
            learning_rate: 1e-3,
            lr_schedule: LrSchedule::Constant,
            lr_warmup_steps: 0,
            max_steps: 1000,
            kl_weight: 1e-4,
            max_grad_norm: Some(1.0),
            random_flip: false,
            seed: 0,
        }
    }
}

impl VaeTrainConfig {
    /// The AdamW and schedule options in the denoising trainer's terms (AdamW's defaults).
    fn optimizer(&self) -> TrainConfig {
        TrainConfig {
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            lr_schedule: self.lr_schedule,
            lr_warmup_steps: self.lr_warmup_steps,
            max_steps: self.max_steps,
            max_grad_norm: self.max_grad_norm,
            seed: self.seed,
            ..TrainConfig::default()
        }
    }
}

/// The losses of one VAE step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VaeLoss {
    /// `reconstruction + kl_weight * kl`, what the step minimises.
    pub total: f32,
    /// Mean squared error of the decoded batch, on images in [-1, 1].
    pub reconstruction: f32,
    /// Mean KL divergence per latent element.
    pub kl: f32,
}

/// A VAE training run: the VAE on `Device::autodiff(device)`, AdamW, the data and the generator.
pub struct VaeTrainer {
    vae: Option<AutoencoderKL>,
    config_json: Value,
    optim: ModuleOptimizer,
    rng: SeededNoise,
    batches: Batches,
    dataset: ImageCaptionDataset,
    config: VaeTrainConfig,
    pre: Preprocess,
    device: Device,
    train_device: Device,
    steps: usize,
}

impl std::fmt::Debug for VaeTrainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaeTrainer")
            .field("examples", &self.dataset.len())
            .field("config", &self.config)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl VaeTrainer {
    /// A run training `vae` (built on any device; it is moved to the autodiff device), whose
    /// diffusers `config.json` is `config_json` (written into saved folders).
    pub fn new(
        vae: AutoencoderKL,
        config_json: Value,
        dataset: ImageCaptionDataset,
        config: VaeTrainConfig,
        device: &Device,
    ) -> Result<Self> {
        config.optimizer().validate()?;
        if !(config.kl_weight >= 0.0 && config.kl_weight.is_finite()) {
            return Err(Error::InvalidOption(format!(
                "kl_weight {} must be 0 or more",
                config.kl_weight
            )));
        }
        let f = vae.scale_factor();
        if config.resolution == 0 || !config.resolution.is_multiple_of(f) {
            return Err(Error::InvalidOption(format!(
                "resolution {} must be a positive multiple of the VAE scale factor {f}",
                config.resolution
            )));
        }
        let train_device = Device::autodiff(device.clone());
        let vae = stable_param_ids(to_device(vae, &train_device));
        Ok(Self {
            vae: Some(vae),
            config_json,
            optim: adamw(&config.optimizer()),
            rng: SeededNoise::new(config.seed),
            batches: Batches::default(),
            pre: Preprocess {
                resolution: config.resolution,
                center_crop: true,
            },
            dataset,
            config,
            device: device.clone(),
            train_device,
            steps: 0,
        })
    }

    /// Optimiser steps taken so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The run's options.
    pub fn config(&self) -> &VaeTrainConfig {
        &self.config
    }

    /// The VAE as trained so far, outside autodiff.
    pub fn vae(&self) -> AutoencoderKL {
        self.trained().valid()
    }

    fn trained(&self) -> &AutoencoderKL {
        self.vae
            .as_ref()
            .expect("the VAE is only taken out during a step")
    }

    /// The learning rate of the next step.
    pub fn learning_rate(&self) -> f64 {
        self.config.optimizer().learning_rate_at(self.steps)
    }

    fn images(&mut self, indices: &[usize], device: &Device) -> Result<Tensor<4>> {
        let mut images = Vec::with_capacity(indices.len());
        for &i in indices {
            let flip = self.config.random_flip && self.rng.next_index(2) == 1;
            images.push(load_image(
                &self.dataset.examples[i].image,
                &self.pre,
                (0.5, 0.5),
                flip,
                device,
            )?);
        }
        Ok(Tensor::cat(images, 0))
    }

    fn losses(&mut self, indices: &[usize]) -> Result<(Tensor<1>, Tensor<1>, Tensor<1>)> {
        let device = self.train_device.clone();
        let x = self.images(indices, &device)?;
        let vae = self.trained();
        let posterior = vae.encode(x.clone(), None)?;
        let eps = self.rng.noise(posterior.mean.dims(), &self.device)?;
        let eps = Tensor::<4>::from_data(eps.into_data(), &device);
        let vae = self.trained();
        let decoded = vae.decode(posterior.sample(eps), None)?;
        let reconstruction = (decoded - x).powi_scalar(2).mean();
        let var = posterior.logvar.clone().exp();
        let kl =
            ((posterior.mean.powi_scalar(2) + var - posterior.logvar).sub_scalar(1.0) * 0.5).mean();
        let total = reconstruction.clone() + kl.clone().mul_scalar(self.config.kl_weight);
        Ok((total, reconstruction, kl))
    }

    /// One AdamW step on a batch; returns its losses. A loss that is not finite is an
    /// [`Error::NonFiniteLoss`] and changes nothing.
    pub fn step(&mut self) -> Result<VaeLoss> {
        let indices = self
            .batches
            .next(&mut self.rng, self.dataset.len(), self.config.batch_size);
        let (total, reconstruction, kl) = self.losses(&indices)?;
        let loss = VaeLoss {
            total: total.clone().into_scalar(),
            reconstruction: reconstruction.into_scalar(),
            kl: kl.into_scalar(),
        };
        if !loss.total.is_finite() {
            return Err(Error::NonFiniteLoss {
                value: loss.total,
                step: self.steps + 1,
            });
        }
        let mut grads = GradientsParams::from_grads(total.backward(), self.trained());
        if let Some(max_norm) = self.config.max_grad_norm {
            clip_grad_norm(self.trained(), &mut grads, max_norm);
        }
        let lr = self.learning_rate();
        let vae = self.vae.take().expect("present between steps");
        self.vae = Some(self.optim.step(lr, vae, grads));
        self.steps += 1;
        Ok(loss)
    }

    /// The reconstruction error (mean squared, images in [-1, 1]) of the posterior means of the
    /// dataset's first `n` examples, decoded: a validation figure. Changes nothing.
    pub fn eval_reconstruction(&mut self, n: usize) -> Result<f32> {
        let indices: Vec<usize> = (0..n.min(self.dataset.len())).collect();
        let vae = self.vae();
        let x = self.images(&indices, &self.device.clone())?;
        let z = vae.encode(x.clone(), None)?.mode();
        let decoded = vae.decode(z, None)?;
        Ok((decoded - x).powi_scalar(2).mean().into_scalar())
    }

    /// `1 / std` of the posterior samples of the first `n` examples: the `scaling_factor` that
    /// gives the diffusion model latents of unit variance, as the LDM paper sets it (0.18215
    /// for SD's VAE). Draws from a generator seeded with `seed`; changes nothing.
    pub fn latent_scaling_factor(&mut self, n: usize, seed: u64) -> Result<f64> {
        let indices: Vec<usize> = (0..n.min(self.dataset.len())).collect();
        let vae = self.vae();
        let x = self.images(&indices, &self.device.clone())?;
        let posterior = vae.encode(x, None)?;
        let eps = SeededNoise::new(seed).noise(posterior.mean.dims(), &self.device)?;
        let z = posterior.sample(eps);
        let values: Vec<f64> = z
            .into_data()
            .convert::<f64>()
            .try_to_vec::<f64>()
            .map_err(|e| Error::InvalidInput(format!("{e:?}")))?;
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        if !(var > 0.0 && var.is_finite()) {
            return Err(Error::InvalidInput(format!(
                "the latents' variance is {var}: the VAE has not learnt to encode"
            )));
        }
        Ok(1.0 / var.sqrt())
    }

    /// The VAE's diffusers `config.json`, with `scaling_factor` set.
    pub fn config_json(&self, scaling_factor: Option<f64>) -> Value {
        let mut json = self.config_json.clone();
        if let (Some(s), Some(map)) = (scaling_factor, json.as_object_mut()) {
            map.insert("scaling_factor".into(), serde_json::json!(s));
        }
        json
    }

    /// Writes a diffusers VAE folder (`config.json` with `scaling_factor`, and f32 weights under
    /// diffusers' names) at `out`, atomically.
    pub fn save(&self, out: &Path, scaling_factor: Option<f64>) -> Result<()> {
        kiln_nn::config::write_dir_atomically(out, true, |tmp: &Path| {
            crate::checkpoint::write_component(
                tmp,
                &self.config_json(scaling_factor),
                "AutoencoderKL",
                &self.vae(),
            )
        })
    }

    /// Writes a checkpoint [`resume`](Self::resume) continues from: the VAE folder and under
    /// `training_state/` the weights, AdamW state, data order and generator.
    pub fn save_checkpoint(&self, out: &Path) -> Result<()> {
        kiln_nn::config::write_dir_atomically(out, true, |tmp: &Path| {
            crate::checkpoint::write_component(
                tmp,
                &self.config_json(None),
                "AutoencoderKL",
                &self.vae(),
            )?;
            write_training_state(
                tmp,
                self.trained(),
                None,
                &self.optim,
                &RunState {
                    steps: self.steps,
                    rng: self.rng.clone(),
                    order: self.batches.order.clone(),
                    cursor: self.batches.cursor,
                    ema_updates: None,
                },
            )
        })
    }

    /// Continues from a checkpoint of [`save_checkpoint`](Self::save_checkpoint) exactly; a
    /// checkpoint of another VAE shape is refused, naming the mismatch.
    pub fn resume(mut self, checkpoint: &Path) -> Result<Self> {
        let dir = checkpoint.join(STATE_DIR);
        let state = read_state(&dir.join("state.json"))?;
        let vae = self.vae.take().expect("present between steps");
        self.vae = Some(load_module(vae, &dir.join("model.safetensors"))?);
        let optim = std::mem::replace(&mut self.optim, adamw(&self.config.optimizer()));
        self.optim = load_optimizer(optim, &dir.join("optimizer.bpk"))?;
        self.batches = state.batches(self.dataset.len(), checkpoint)?;
        self.steps = state.steps;
        self.rng = state.rng;
        Ok(self)
    }
}
