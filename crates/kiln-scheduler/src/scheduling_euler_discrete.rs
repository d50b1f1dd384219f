//! `EulerDiscreteScheduler`: Euler's method on the probability-flow ODE in sigma, Karras et al.
//! 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
//! (<https://arxiv.org/abs/2206.00364>), Algorithm 2 without churn.
//!
//! Mirrors diffusers' [`scheduling_euler_discrete.py`][diffusers] (v0.42.1); `s_churn` is not
//! exposed (diffusers' default, 0), `interpolation_type` must be `linear`, `timestep_type`
//! `discrete`.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_euler_discrete.py

use burn::tensor::Tensor;

use crate::config::{FinalSigmasType, InterpolationType, SchedulerKind, TimestepType};
use crate::scheduling_utils as utils;
use crate::sigma_schedule::SigmaSchedule;
use crate::{Error, NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "EulerDiscreteScheduler";

/// Euler (first order, deterministic).
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: SchedulerConfig,
    schedule: SigmaSchedule,
}

impl EulerDiscreteScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::Euler);
        config.validate()?;
        if config.interpolation_type != InterpolationType::Linear {
            return Err(Error::Unsupported {
                scheduler: NAME,
                what: "`interpolation_type: log_linear`".into(),
            });
        }
        if config.timestep_type != TimestepType::Discrete {
            return Err(Error::Unsupported {
                scheduler: NAME,
                what: "`timestep_type: continuous`".into(),
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

impl Scheduler for EulerDiscreteScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let last = match self.config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => utils::train_sigmas(&self.schedule.alphas_cumprod[..1])[0],
        };
        let bounds = (self.config.sigma_min, self.config.sigma_max);
        self.schedule
            .set_discrete(&self.config, num_inference_steps, bounds, last)
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerOutput> {
        utils::check_same_shape(&model_output, &sample)?;
        let i = self.schedule.index(timestep)?;
        let sigmas = &self.schedule.sigmas;
        let sigma = sigmas[i] as f64;
        // 1. x0 from the model output (sigma_hat = sigma without churn)
        let x0 = utils::x0_from_sigma(
            self.config.prediction_type,
            model_output,
            sample.clone(),
            sigma,
        );
        // 2. ODE derivative d = (x - x0) / sigma (Karras eq. 3 / Algorithm 2, line 4)
        let derivative = (sample.clone() - x0.clone()).div_scalar(sigma);
        // 3. Euler step to the next sigma
        let dt = sigmas[i + 1] as f64 - sigma;
        let prev = sample + derivative.mul_scalar(dt);
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
