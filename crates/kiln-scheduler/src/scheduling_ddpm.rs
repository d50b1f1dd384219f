//! `DDPMScheduler`: ancestral sampling of Ho et al. 2020, "Denoising Diffusion Probabilistic
//! Models" (<https://arxiv.org/abs/2006.11239>), eqs. 6-7.
//!
//! Mirrors diffusers' [`scheduling_ddpm.py`][diffusers] (v0.42.1), fixed variance types only.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_ddpm.py

use burn::tensor::Tensor;

use crate::config::{SchedulerKind, VarianceType, invalid};
use crate::scheduling_utils::{self as utils, X0Clamp};
use crate::{Error, NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "DDPMScheduler";

/// DDPM: the posterior mean of q(x_{t-1} | x_t, x0) plus fixed-variance noise.
#[derive(Debug, Clone)]
pub struct DDPMScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    variance: VarianceType,
    clamp: X0Clamp,
}

impl DDPMScheduler {
    /// Builds the tables; the config's own keys are checked here.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::Ddpm);
        config.validate()?;
        let variance = match config.variance_type.unwrap_or(VarianceType::FixedSmall) {
            v @ (VarianceType::FixedSmall
            | VarianceType::FixedSmallLog
            | VarianceType::FixedLarge) => v,
            other => {
                return Err(invalid(
                    "variance_type",
                    format!("{other:?}"),
                    "fixed_small, fixed_small_log or fixed_large",
                ));
            }
        };
        let alphas_cumprod = utils::alphas_cumprod(&utils::betas(&config), false);
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        let clamp = X0Clamp::from_config(&config, true);
        Ok(Self {
            config,
            alphas_cumprod,
            timesteps,
            variance,
            clamp,
        })
    }

    /// The timestep after `t` on the schedule, or -1 after the last.
    fn previous_timestep(&self, t: f64) -> Result<i64> {
        let idx =
            self.timesteps
                .iter()
                .position(|&x| x == t)
                .ok_or_else(|| Error::UnknownTimestep {
                    scheduler: NAME,
                    timestep: t,
                    accepted: utils::format_list(&self.timesteps),
                })?;
        Ok(self.timesteps.get(idx + 1).map_or(-1, |&p| p as i64))
    }
}

impl Scheduler for DDPMScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        utils::check_steps(
            num_inference_steps,
            self.config.num_train_timesteps,
            "at most num_train_timesteps",
        )?;
        self.timesteps = utils::spaced_timesteps(&self.config, num_inference_steps);
        if self
            .timesteps
            .iter()
            .any(|&t| t >= self.config.num_train_timesteps as f64)
        {
            return Err(invalid(
                "steps_offset",
                self.config.steps_offset,
                "an offset keeping every timestep below num_train_timesteps",
            ));
        }
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&mut self, sample: Tensor<4>, _timestep: f64) -> Result<Tensor<4>> {
        Ok(sample)
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
        let t = timestep;
        let prev_t = self.previous_timestep(t)?;
        // 1. alphas, betas
        let acp_t = self.alphas_cumprod[t as usize] as f64;
        let acp_prev = if prev_t >= 0 {
            self.alphas_cumprod[prev_t as usize] as f64
        } else {
            1.0
        };
        let beta_prod_t = 1.0 - acp_t;
        let beta_prod_prev = 1.0 - acp_prev;
        let current_alpha = acp_t / acp_prev;
        let current_beta = 1.0 - current_alpha;
        // 2. predicted x0 (eq. 15), 3. clipped or thresholded
        let x0 = utils::x0_from_alpha(
            self.config.prediction_type,
            model_output,
            sample.clone(),
            acp_t,
        );
        let x0 = self.clamp.apply(x0);
        // 4-5. posterior mean mu_t(x_t, x0) (eq. 7)
        let x0_coeff = acp_prev.sqrt() * current_beta / beta_prod_t;
        let sample_coeff = current_alpha.sqrt() * beta_prod_prev / beta_prod_t;
        let mut prev = x0.clone().mul_scalar(x0_coeff) + sample.mul_scalar(sample_coeff);
        // 6. noise
        if t > 0.0 {
            let variance = (beta_prod_prev / beta_prod_t * current_beta).max(1e-20);
            let std = match self.variance {
                VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
                VarianceType::FixedLarge => current_beta.sqrt(),
                _ => variance.sqrt(),
            };
            let z = noise.noise(prev.dims(), &prev.device())?;
            prev = prev + z.mul_scalar(std);
        }
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn reset(&mut self) {}

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}
