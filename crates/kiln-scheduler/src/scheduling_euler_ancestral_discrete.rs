//! `EulerAncestralDiscreteScheduler`: an Euler step down to sigma_down plus fresh noise of size
//! sigma_up, k-diffusion's `sample_euler_ancestral` (Karras et al. 2022 setting).
//!
//! Mirrors diffusers' [`scheduling_euler_ancestral_discrete.py`][diffusers] (v0.42.1). The
//! sigma_up / sigma_down split is computed in float32, as diffusers does on its float32 sigmas.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_euler_ancestral_discrete.py

use burn::tensor::Tensor;

use crate::config::{PredictionType, SchedulerKind};
use crate::scheduling_utils as utils;
use crate::sigma_schedule::SigmaSchedule;
use crate::{Error, NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "EulerAncestralDiscreteScheduler";

/// Euler ancestral (first order, stochastic).
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    config: SchedulerConfig,
    schedule: SigmaSchedule,
}

impl EulerAncestralDiscreteScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::EulerAncestral);
        config.validate()?;
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::Unsupported {
                scheduler: NAME,
                what: "`prediction_type: sample`".into(),
            });
        }
        let alphas_cumprod =
            utils::alphas_cumprod(&utils::betas(&config), config.rescale_betas_zero_snr);
        Ok(Self {
            config,
            schedule: SigmaSchedule::training(NAME, alphas_cumprod),
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.schedule
            .set_discrete(&self.config, num_inference_steps, (None, None), 0.0)
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma(&self.config)
    }

    fn scale_model_input(&mut self, sample: Tensor<4>, timestep: f64) -> Result<Tensor<4>> {
        self.schedule.scale_model_input(sample, timestep)
    }

    /// # Shapes
    /// `model_output`, `sample`: `[b, c, h, w]` -> `prev_sample`, `pred_original_sample` alike.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        timestep: f64,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerOutput> {
        utils::check_same_shape(&model_output, &sample)?;
        let i = self.schedule.index(timestep)?;
        let (from, to) = (self.schedule.sigmas[i], self.schedule.sigmas[i + 1]);
        // 1. x0
        let x0 = utils::x0_from_sigma(
            self.config.prediction_type,
            model_output,
            sample.clone(),
            from as f64,
        );
        // 2. split the next noise level into a deterministic and a fresh part (float32)
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        // 3. Euler step to sigma_down, then add sigma_up of fresh noise
        let derivative = (sample.clone() - x0.clone()).div_scalar(from as f64);
        let prev = sample + derivative.mul_scalar((sigma_down - from) as f64);
        let z = noise.noise(prev.dims(), &prev.device())?;
        let prev = prev + z.mul_scalar(sigma_up as f64);
        self.schedule.advance(i);
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn reset(&mut self) {
        self.schedule.reset();
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn add_noise_coefficients(&self, timestep: f64) -> Result<(f64, f64)> {
        self.schedule.add_noise_coefficients(timestep)
    }
}
