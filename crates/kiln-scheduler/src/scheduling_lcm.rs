//! `LCMScheduler`: multistep consistency sampling for latent consistency models, Luo et al. 2023,
//! "Latent Consistency Models" (<https://arxiv.org/abs/2310.04378>), Algorithm 3.
//!
//! Mirrors diffusers' [`scheduling_lcm.py`][diffusers] (v0.42.1), with `strength = 1` (img2img
//! strength is the pipeline's business).
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_lcm.py

use burn::tensor::Tensor;

use crate::config::{SchedulerKind, invalid};
use crate::scheduling_utils::{self as utils, X0Clamp};
use crate::{NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "LCMScheduler";
const SIGMA_DATA: f64 = 0.5;

/// LCM (few-step, stochastic between steps).
#[derive(Debug, Clone)]
pub struct LCMScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    timesteps: Vec<f64>,
    clamp: X0Clamp,
    step_index: Option<usize>,
}

impl LCMScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::Lcm);
        config.validate()?;
        let t = config.num_train_timesteps;
        if !(1..=t).contains(&config.original_inference_steps) {
            return Err(invalid(
                "original_inference_steps",
                config.original_inference_steps,
                format!("1 to {t}"),
            ));
        }
        if !(config.timestep_scaling > 0.0 && config.timestep_scaling.is_finite()) {
            return Err(invalid(
                "timestep_scaling",
                config.timestep_scaling,
                "a finite number > 0",
            ));
        }
        let alphas_cumprod = utils::alphas_cumprod(&utils::betas(&config), false);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        let clamp = X0Clamp::from_config(&config, true);
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps: Vec::new(),
            clamp,
            step_index: None,
        })
    }

    /// The boundary-condition scalings `(c_skip, c_out)` of the consistency function (eq. 5).
    fn scalings(&self, t: f64) -> (f64, f64) {
        let scaled = t * self.config.timestep_scaling;
        let d2 = SIGMA_DATA * SIGMA_DATA;
        (
            d2 / (scaled * scaled + d2),
            scaled / (scaled * scaled + d2).sqrt(),
        )
    }
}

impl Scheduler for LCMScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let original = self.config.original_inference_steps;
        utils::check_steps(
            num_inference_steps,
            original,
            "at most original_inference_steps",
        )?;
        // the distillation schedule: k - 1, 2k - 1, ..., original * k - 1, from the top
        let k = self.config.num_train_timesteps / original;
        let origin: Vec<usize> = (1..=original).rev().map(|i| i * k - 1).collect();
        let step = origin.len() as f64 / num_inference_steps as f64;
        self.timesteps = (0..num_inference_steps)
            .map(|i| origin[(i as f64 * step).floor() as usize] as f64)
            .collect();
        self.step_index = None;
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
    /// `model_output`, `sample`: `[b, c, h, w]` -> `prev_sample`, `pred_original_sample` (the
    /// denoised sample) alike.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        timestep: f64,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerOutput> {
        utils::check_same_shape(&model_output, &sample)?;
        let i = utils::init_step_index(&mut self.step_index, NAME, &self.timesteps, timestep)?;
        // 1. this and the next timestep on the schedule (the step index, not the argument, rules)
        let timestep = self.timesteps[i];
        let prev_t = self.timesteps.get(i + 1).copied().unwrap_or(timestep);
        // 2. alphas, betas, boundary scalings
        let acp_t = self.alphas_cumprod[timestep as usize] as f64;
        let acp_prev = if prev_t >= 0.0 {
            self.alphas_cumprod[prev_t as usize] as f64
        } else {
            self.final_alpha_cumprod
        };
        let (c_skip, c_out) = self.scalings(timestep);
        // 3. x0, clipped or thresholded; 4. the consistency function's output
        let x0 = utils::x0_from_alpha(
            self.config.prediction_type,
            model_output,
            sample.clone(),
            acp_t,
        );
        let x0 = self.clamp.apply(x0);
        let denoised = x0.mul_scalar(c_out) + sample.mul_scalar(c_skip);
        // 5. re-noise to the next timestep (not after the last)
        let prev = if i + 1 != self.timesteps.len() {
            let z = noise.noise(denoised.dims(), &denoised.device())?;
            denoised.clone().mul_scalar(acp_prev.sqrt()) + z.mul_scalar((1.0 - acp_prev).sqrt())
        } else {
            denoised.clone()
        };
        self.step_index = Some(i + 1);
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: Some(denoised),
        })
    }

    fn reset(&mut self) {
        self.step_index = None;
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}
