//! `DDIMScheduler`: Song et al. 2020, "Denoising Diffusion Implicit Models"
//! (<https://arxiv.org/abs/2010.02502>), eq. 12; `eta` interpolates between DDIM (0) and DDPM (1).
//!
//! Mirrors diffusers' [`scheduling_ddim.py`][diffusers] (v0.42.1).
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_ddim.py

use burn::tensor::Tensor;

use crate::config::{SchedulerKind, invalid};
use crate::scheduling_utils::{self as utils, X0Clamp};
use crate::{Error, NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "DDIMScheduler";

/// DDIM, deterministic at `eta = 0`.
#[derive(Debug, Clone)]
pub struct DDIMScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    eta: f64,
    clamp: X0Clamp,
}

impl DDIMScheduler {
    /// Builds the tables (`eta = 0`).
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::Ddim);
        config.validate()?;
        let alphas_cumprod = utils::alphas_cumprod(&utils::betas(&config), false);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        let clamp = X0Clamp::from_config(&config, true);
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: None,
            eta: 0.0,
            clamp,
        })
    }

    /// Sets eta, the weight of fresh noise (0: deterministic DDIM, 1: DDPM-like). Must be >= 0.
    pub fn set_eta(&mut self, eta: f64) -> Result<()> {
        if !(eta >= 0.0 && eta.is_finite()) {
            return Err(invalid(
                "eta",
                eta,
                "a finite number >= 0 (0 is deterministic DDIM, 1 is DDPM-like)",
            ));
        }
        self.eta = eta;
        Ok(())
    }

    /// The current eta.
    pub fn eta(&self) -> f64 {
        self.eta
    }

    fn acp(&self, t: i64) -> f64 {
        if t >= 0 {
            self.alphas_cumprod[t as usize] as f64
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Scheduler for DDIMScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        utils::check_steps(
            num_inference_steps,
            self.config.num_train_timesteps,
            "at most num_train_timesteps",
        )?;
        let timesteps = utils::spaced_timesteps(&self.config, num_inference_steps);
        if timesteps
            .iter()
            .any(|&t| t >= self.config.num_train_timesteps as f64)
        {
            return Err(invalid(
                "steps_offset",
                self.config.steps_offset,
                "an offset keeping every timestep below num_train_timesteps",
            ));
        }
        self.timesteps = timesteps;
        self.num_inference_steps = Some(num_inference_steps);
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
        let n = self.num_inference_steps.ok_or(Error::NotInitialized {
            scheduler: NAME,
            call: "step",
        })?;
        let t = timestep as i64;
        if timestep.fract() != 0.0 || t < 0 || t as usize >= self.config.num_train_timesteps {
            return Err(Error::UnknownTimestep {
                scheduler: NAME,
                timestep,
                accepted: utils::format_list(&self.timesteps),
            });
        }
        // 1. previous timestep (t - T / n, as diffusers: not the next entry of the schedule)
        let prev_t = t - (self.config.num_train_timesteps / n) as i64;
        // 2. alphas, betas
        let acp_t = self.acp(t);
        let acp_prev = self.acp(prev_t);
        // 3. predicted x0 and epsilon ("predicted x0" of eq. 12)
        let prediction = self.config.prediction_type;
        let x0 = utils::x0_from_alpha(prediction, model_output.clone(), sample.clone(), acp_t);
        let eps = utils::eps_from_alpha(prediction, model_output, sample, x0.clone(), acp_t);
        // 4. clip or threshold x0
        let x0 = self.clamp.apply(x0);
        // 5. sigma_t(eta) (eq. 16)
        let variance = (1.0 - acp_prev) / (1.0 - acp_t) * (1.0 - acp_t / acp_prev);
        let std = self.eta * variance.sqrt();
        // 6-7. "direction pointing to x_t" and x_{t-1} (eq. 12)
        let direction = eps.mul_scalar((1.0 - acp_prev - std * std).sqrt());
        let mut prev = x0.clone().mul_scalar(acp_prev.sqrt()) + direction;
        if self.eta > 0.0 {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TimestepSpacing;

    #[test]
    fn diffusers_exact_timesteps() {
        // diffusers tests/schedulers/test_scheduler_ddim.py::test_steps_offset
        let c = SchedulerConfig::new(SchedulerKind::Ddim)
            .with_timestep_spacing(TimestepSpacing::Leading, 1);
        let mut s = DDIMScheduler::new(c).unwrap();
        s.set_timesteps(5).unwrap();
        assert_eq!(s.timesteps(), [801.0, 601.0, 401.0, 201.0, 1.0]);
    }

    #[test]
    fn bad_eta_and_steps() {
        let mut s = DDIMScheduler::new(SchedulerConfig::new(SchedulerKind::Ddim)).unwrap();
        let err = s.set_eta(-0.5).unwrap_err();
        assert!(err.to_string().contains(">= 0"), "{err}");
        let err = s.set_timesteps(0).unwrap_err();
        assert!(err.to_string().contains("1 to 1000"), "{err}");
        assert!(s.set_timesteps(1001).is_err());
    }
}
