//! `HeunDiscreteScheduler`: Heun's second-order method in sigma, Karras et al. 2022
//! (<https://arxiv.org/abs/2206.00364>), Algorithm 1 without churn.
//!
//! Mirrors diffusers' [`scheduling_heun_discrete.py`][diffusers] (v0.42.1). Each step takes two
//! model calls; the schedule lists both (every timestep but the first appears twice).
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_heun_discrete.py

use burn::tensor::Tensor;

use crate::config::SchedulerKind;
use crate::scheduling_utils as utils;
use crate::sigma_schedule::SigmaSchedule;
use crate::{NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "HeunDiscreteScheduler";

/// State kept between the two model calls of one Heun step.
#[derive(Debug, Clone)]
struct FirstOrder {
    derivative: Tensor<4>,
    dt: f64,
    sample: Tensor<4>,
}

/// Heun (second order, deterministic, two model calls per step).
#[derive(Debug, Clone)]
pub struct HeunDiscreteScheduler {
    config: SchedulerConfig,
    schedule: SigmaSchedule,
    first: Option<FirstOrder>,
}

impl HeunDiscreteScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::Heun);
        config.validate()?;
        let alphas_cumprod = utils::alphas_cumprod(&utils::betas(&config), false);
        let mut s = Self {
            config,
            schedule: SigmaSchedule::training(NAME, alphas_cumprod),
            first: None,
        };
        s.set_timesteps(s.config.num_train_timesteps)?;
        Ok(s)
    }
}

/// `[v0, v1, v1, v2, v2, ...]`: every value but the first repeated (diffusers' `repeat_interleave`).
pub(crate) fn interleave<T: Copy>(first: T, rest: &[T]) -> Vec<T> {
    std::iter::once(first)
        .chain(rest.iter().flat_map(|&v| [v, v]))
        .collect()
}

impl Scheduler for HeunDiscreteScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.schedule
            .set_discrete(&self.config, num_inference_steps, (None, None), 0.0)?;
        // [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]
        self.schedule.interleave();
        self.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }

    fn order(&self) -> usize {
        2
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
        let first_order = self.first.is_none();
        let sigmas = &self.schedule.sigmas;
        let (sigma, sigma_next) = if first_order {
            (sigmas[i] as f64, sigmas[i + 1] as f64)
        } else {
            (sigmas[i - 1] as f64, sigmas[i] as f64)
        };
        // 1. x0 at the point the model saw (sigma, then sigma_next)
        let sigma_input = if first_order { sigma } else { sigma_next };
        let x0 = utils::x0_from_sigma(
            self.config.prediction_type,
            model_output,
            sample.clone(),
            sigma_input,
        );
        let x0 = if self.config.clip_sample {
            x0.clamp(
                -self.config.clip_sample_range,
                self.config.clip_sample_range,
            )
        } else {
            x0
        };
        let prev = match self.first.take() {
            // 2a. Euler predictor to sigma_next (Algorithm 1, lines 5-6)
            None => {
                let derivative = (sample.clone() - x0.clone()).div_scalar(sigma);
                let dt = sigma_next - sigma;
                let prev = sample.clone() + derivative.clone().mul_scalar(dt);
                self.first = Some(FirstOrder {
                    derivative,
                    dt,
                    sample,
                });
                prev
            }
            // 2b. trapezoidal corrector (lines 7-8)
            Some(first) => {
                let derivative = (sample - x0.clone()).div_scalar(sigma_next);
                let derivative = (first.derivative + derivative).div_scalar(2.0);
                first.sample + derivative.mul_scalar(first.dt)
            }
        };
        self.schedule.advance(i);
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn reset(&mut self) {
        self.first = None;
        self.schedule.reset();
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn add_noise_coefficients(&self, timestep: f64) -> Result<(f64, f64)> {
        self.schedule.add_noise_coefficients(timestep)
    }
}
