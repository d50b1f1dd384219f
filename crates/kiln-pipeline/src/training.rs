//! The training objective of latent diffusion, as diffusers' text-to-image fine-tuning script
//! computes it (`examples/text_to_image/train_text_to_image.py`, diffusers 0.42.1): forward
//! noising of the latents by the model's training schedule, the noise (or `v`, or `x0`) as the
//! target, and the mean squared error of the UNet's prediction, optionally Min-SNR weighted
//! (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").
//!
//! The loss is an ordinary tensor: on an autodiff device (`Device::autodiff(device)`, burn's
//! `autodiff` feature) `loss.backward()` gives the UNet's gradients, for any optimiser.
//!
//! ```no_run
//! # fn main() -> kiln_pipeline::Result<()> {
//! use burn::tensor::{Device, Distribution, Tensor};
//! use kiln_pipeline::training::DiffusionLoss;
//!
//! let device = Device::autodiff(kiln_nn::default_device()?);
//! let unet = kiln_unet::UNet2DConditionModel::from_pretrained(
//!     "model/unet".as_ref(),
//!     burn::tensor::DType::F32,
//!     &device,
//! )?;
//! let config = kiln_scheduler::SchedulerConfig::from_file("model/scheduler/scheduler_config.json")?;
//! let objective = DiffusionLoss::new(&config, Some(5.0))?;
//! let latents = Tensor::<4>::random([2, 4, 64, 64], Distribution::Normal(0.0, 1.0), &device);
//! let noise = Tensor::<4>::random([2, 4, 64, 64], Distribution::Normal(0.0, 1.0), &device);
//! let context = Tensor::<3>::zeros([2, 77, 768], &device);
//! let loss = objective.loss(&unet, latents, noise, &[17.0, 640.0], context)?;
//! let grads = loss.backward();
//! # Ok(()) }
//! ```

use burn::tensor::{DType, Tensor, TensorData};
use kiln_scheduler::{
    AnyScheduler, PredictionType, SamplerName, SamplerOptions, Scheduler, SchedulerConfig,
};
use kiln_unet::UNet2DConditionModel;

use crate::{Error, Result};

/// The denoising loss of one model: its training schedule (the config's betas as a DDPM
/// schedule, as the training script builds it), prediction type and Min-SNR `gamma`.
#[derive(Debug, Clone)]
pub struct DiffusionLoss {
    schedule: AnyScheduler,
    prediction_type: PredictionType,
    snr_gamma: Option<f64>,
}

impl DiffusionLoss {
    /// The loss for a model with scheduler config `config` (its class is ignored: training
    /// noises with the DDPM schedule of the same betas). `snr_gamma` enables Min-SNR weighting
    /// (5.0 is the paper's choice); `None` is the plain mean squared error.
    pub fn new(config: &SchedulerConfig, snr_gamma: Option<f64>) -> Result<Self> {
        if let Some(g) = snr_gamma
            && !(g.is_finite() && g > 0.0)
        {
            return Err(Error::InvalidInput(format!(
                "snr_gamma must be positive and finite, got {g}"
            )));
        }
        let schedule =
            AnyScheduler::from_sampler(SamplerName::Ddpm, config, SamplerOptions::default())?;
        Ok(Self {
            prediction_type: schedule.config().prediction_type,
            schedule,
            snr_gamma,
        })
    }

    /// The number of training timesteps: timesteps are integers in `0..num_train_timesteps()`.
    pub fn num_train_timesteps(&self) -> usize {
        self.schedule.alphas_cumprod().len()
    }

    /// What the UNet learns to predict.
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// The signal-to-noise ratio `alpha-bar_t / (1 - alpha-bar_t)` at training timestep `t`
    /// (diffusers' `compute_snr`).
    pub fn snr(&self, timestep: f64) -> Result<f64> {
        let (a, s) = self.schedule.add_noise_coefficients(timestep)?;
        Ok((a / s).powi(2))
    }

    /// The loss for one batch: `latents` are the VAE's scaled latents `x0`, `noise` the Gaussian
    /// noise to add, `timesteps` one integer training timestep per sample, and
    /// `encoder_hidden_states` the text embeddings.
    ///
    /// # Shapes
    /// - `latents`, `noise`: `[batch, channels, h, w]`
    /// - `timesteps`: `batch` values
    /// - `encoder_hidden_states`: `[batch, tokens, cross_attention_dim]`
    /// - output: `[1]`, f32
    pub fn loss(
        &self,
        unet: &UNet2DConditionModel,
        latents: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
        encoder_hidden_states: Tensor<3>,
    ) -> Result<Tensor<1>> {
        let batch = latents.dims()[0];
        if timesteps.len() != batch {
            return Err(Error::InvalidInput(format!(
                "{} timesteps for a batch of {batch}: give one per sample",
                timesteps.len()
            )));
        }
        let device = latents.device();
        let noisy = self
            .schedule
            .add_noise(latents.clone(), noise.clone(), timesteps)?;
        let target = match self.prediction_type {
            PredictionType::Epsilon => noise,
            PredictionType::VPrediction => self.schedule.velocity(latents, noise, timesteps)?,
            PredictionType::Sample => latents,
        };
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::<1>::from_data(TensorData::new(t, [batch]), &device);
        // the UNet runs in its weights' dtype (bf16 for mixed precision, `kiln_nn::precision`)
        let dtype = unet.dtype();
        let pred = unet.forward(noisy.cast(dtype), t, encoder_hidden_states.cast(dtype))?;
        // the error in f32 whatever the UNet's dtype, as `F.mse_loss(pred.float(), target.float())`
        let err = (pred.cast(DType::F32) - target.cast(DType::F32)).powi_scalar(2);
        let Some(gamma) = self.snr_gamma else {
            return Ok(err.mean());
        };
        let weights = timesteps
            .iter()
            .map(|&t| {
                let snr = self.snr(t)?;
                let w = snr.min(gamma);
                Ok(match self.prediction_type {
                    PredictionType::Epsilon => w / snr,
                    PredictionType::VPrediction => w / (snr + 1.0),
                    PredictionType::Sample => w,
                } as f32)
            })
            .collect::<Result<Vec<f32>>>()?;
        let weights = Tensor::<1>::from_data(TensorData::new(weights, [batch]), &device);
        let per_sample: Tensor<1> = err.reshape([batch as i32, -1]).mean_dim(1).squeeze_dim(1);
        Ok((per_sample * weights).mean())
    }
}
