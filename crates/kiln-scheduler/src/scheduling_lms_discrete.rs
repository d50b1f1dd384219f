//! `LMSDiscreteScheduler`: the linear multistep method in sigma (up to fourth order), as in
//! k-diffusion's `sample_lms` (Karras et al. 2022 setting).
//!
//! Mirrors diffusers' [`scheduling_lms_discrete.py`][diffusers] (v0.42.1). diffusers integrates the
//! Lagrange basis polynomials with `scipy.integrate.quad`; they are polynomials of degree <= 3,
//! so Kiln integrates them exactly with 3-point Gauss-Legendre quadrature.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_lms_discrete.py

use burn::tensor::Tensor;

use crate::config::SchedulerKind;
use crate::scheduling_utils as utils;
use crate::sigma_schedule::SigmaSchedule;
use crate::{NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "LMSDiscreteScheduler";
const ORDER: usize = 4;

/// Linear multistep (deterministic, up to order 4).
#[derive(Debug, Clone)]
pub struct LMSDiscreteScheduler {
    config: SchedulerConfig,
    schedule: SigmaSchedule,
    derivatives: Vec<Tensor<4>>,
}

impl LMSDiscreteScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::Lms);
        config.validate()?;
        let alphas_cumprod = utils::alphas_cumprod(&utils::betas(&config), false);
        let mut s = Self {
            config,
            schedule: SigmaSchedule::training(NAME, alphas_cumprod),
            derivatives: Vec::new(),
        };
        s.set_timesteps(s.config.num_train_timesteps)?;
        Ok(s)
    }

    /// The integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of history
    /// entry `current` among `order` entries.
    fn lms_coefficient(&self, order: usize, i: usize, current: usize) -> f64 {
        let sigmas = &self.schedule.sigmas;
        let s = |k: usize| sigmas[i - k] as f64;
        let basis = |tau: f64| {
            (0..order)
                .filter(|&k| k != current)
                .map(|k| (tau - s(k)) / (s(current) - s(k)))
                .product::<f64>()
        };
        let (a, b) = (sigmas[i] as f64, sigmas[i + 1] as f64);
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let node = (3.0f64 / 5.0).sqrt();
        half * (5.0 / 9.0 * basis(mid - half * node)
            + 8.0 / 9.0 * basis(mid)
            + 5.0 / 9.0 * basis(mid + half * node))
    }
}

impl Scheduler for LMSDiscreteScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.schedule
            .set_discrete(&self.config, num_inference_steps, (None, None), 0.0)?;
        self.reset();
        Ok(())
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
        let sigma = self.schedule.sigmas[i] as f64;
        // 1. x0, 2. derivative d = (x - x0) / sigma, kept for the last `ORDER` steps
        let x0 = utils::x0_from_sigma(
            self.config.prediction_type,
            model_output,
            sample.clone(),
            sigma,
        );
        self.derivatives
            .push((sample.clone() - x0.clone()).div_scalar(sigma));
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        // 3. x_{i+1} = x_i + sum_j c_j d_{i-j}
        let order = (i + 1).min(ORDER);
        let mut prev = sample;
        for (current, d) in (0..order).zip(self.derivatives.iter().rev()) {
            prev = prev
                + d.clone()
                    .mul_scalar(self.lms_coefficient(order, i, current));
        }
        self.schedule.advance(i);
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn reset(&mut self) {
        self.derivatives.clear();
        self.schedule.reset();
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn add_noise_coefficients(&self, timestep: f64) -> Result<(f64, f64)> {
        self.schedule.add_noise_coefficients(timestep)
    }
}
