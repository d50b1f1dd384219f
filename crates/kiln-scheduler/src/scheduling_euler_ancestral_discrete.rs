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
use crate::{Error, NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "EulerAncestralDiscreteScheduler";

/// Euler ancestral (first order, stochastic).
#[derive(Debug, Clone)]
pub struct EulerAncestralDiscreteScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    step_index: Option<usize>,
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
        let mut sigmas: Vec<f32> = utils::train_sigmas(&alphas_cumprod)
            .into_iter()
            .rev()
            .collect();
        sigmas.push(0.0);
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            config,
            alphas_cumprod,
            timesteps,
            sigmas,
            step_index: None,
        })
    }
}

impl Scheduler for EulerAncestralDiscreteScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        utils::check_steps(
            num_inference_steps,
            self.config.num_train_timesteps,
            "at most num_train_timesteps",
        )?;
        let (timesteps, sigmas) = utils::discrete_sigma_schedule(
            &self.config,
            &self.alphas_cumprod,
            num_inference_steps,
            (None, None),
        );
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
        self.timesteps = timesteps.iter().map(|&t| t as f32 as f64).collect();
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    fn init_noise_sigma(&self) -> f64 {
        utils::sigma_init_noise(&self.config, &self.sigmas)
    }

    fn scale_model_input(&mut self, sample: Tensor<4>, timestep: f64) -> Result<Tensor<4>> {
        let i = utils::init_step_index(&mut self.step_index, NAME, &self.timesteps, timestep)?;
        let sigma = self.sigmas[i] as f64;
        Ok(sample.div_scalar((sigma * sigma + 1.0).sqrt()))
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
        let i = utils::init_step_index(&mut self.step_index, NAME, &self.timesteps, timestep)?;
        let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
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
        self.step_index = Some(i + 1);
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn reset(&mut self) {
        self.step_index = None;
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    fn add_noise_coefficients(&self, timestep: f64) -> Result<(f64, f64)> {
        let i = utils::index_for_timestep(NAME, &self.timesteps, timestep)?;
        Ok((1.0, self.sigmas[i] as f64))
    }
}
