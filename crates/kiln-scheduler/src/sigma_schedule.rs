//! The state the sigma samplers share: diffusers' Euler, Euler-a, LMS, Heun, KDPM2 and KDPM2-a
//! keep the same training tables, sigma schedule, step index and input scaling, and differ only
//! in `step` (Heun on an interleaved schedule; the KDPM2 pair on their own second-order one, with
//! midpoint sigmas beside it).

use burn::tensor::Tensor;

use crate::scheduling_utils as utils;
use crate::{Result, SchedulerConfig};

/// Timesteps, sigmas (one more than model calls, the last the final sigma) and the step index
/// of a sigma sampler, with the alpha-bar table they come from.
#[derive(Debug, Clone)]
pub(crate) struct SigmaSchedule {
    /// The scheduler's name, for errors.
    name: &'static str,
    pub alphas_cumprod: Vec<f32>,
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    step_index: Option<usize>,
}

impl SigmaSchedule {
    /// The training schedule diffusers starts from: every training timestep, descending, with
    /// its sigma, then 0.
    pub fn training(name: &'static str, alphas_cumprod: Vec<f32>) -> Self {
        let mut sigmas: Vec<f32> = utils::train_sigmas(&alphas_cumprod)
            .into_iter()
            .rev()
            .collect();
        sigmas.push(0.0);
        let timesteps = (0..alphas_cumprod.len()).rev().map(|t| t as f64).collect();
        Self {
            name,
            alphas_cumprod,
            timesteps,
            sigmas,
            step_index: None,
        }
    }

    /// `steps` timesteps of the config's spacing with their interpolated sigmas (Karras ones
    /// when configured, within `bounds`), then `last` as the final sigma; resets the step index.
    pub fn set_discrete(
        &mut self,
        config: &SchedulerConfig,
        steps: usize,
        bounds: (Option<f64>, Option<f64>),
        last: f32,
    ) -> Result<()> {
        utils::check_steps(
            steps,
            config.num_train_timesteps,
            "at most num_train_timesteps",
        )?;
        let (timesteps, sigmas) =
            utils::discrete_sigma_schedule(config, &self.alphas_cumprod, steps, bounds);
        self.sigmas = sigmas.iter().map(|&s| s as f32).chain([last]).collect();
        self.timesteps = timesteps.iter().map(|&t| t as f32 as f64).collect();
        self.step_index = None;
        Ok(())
    }

    /// Sets a schedule computed by the sampler itself (the KDPM2 pair's); resets the step index.
    pub fn set(&mut self, timesteps: Vec<f64>, sigmas: Vec<f32>) {
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
    }

    /// Turns a first-order schedule into the second-order samplers' (Heun): every timestep but
    /// the first listed twice, and every sigma but the first and the final one
    /// (`[s0, s1, s1, ..., s_{n-1}, s_{n-1}, last]`, diffusers' `repeat_interleave`).
    pub fn interleave(&mut self) {
        let last = self.sigmas.pop().unwrap_or(0.0);
        if let Some((&first, rest)) = self.sigmas.split_first() {
            self.sigmas = crate::scheduling_heun_discrete::interleave(first, rest);
        }
        self.sigmas.push(last);
        if let Some((&first, rest)) = self.timesteps.split_first() {
            self.timesteps = crate::scheduling_heun_discrete::interleave(first, rest);
        }
    }

    /// The index of the current step: found from `timestep` on the first call, then counted.
    pub fn index(&mut self, timestep: f64) -> Result<usize> {
        utils::init_step_index(&mut self.step_index, self.name, &self.timesteps, timestep)
    }

    /// Moves on to the step after `i`.
    pub fn advance(&mut self, i: usize) {
        self.step_index = Some(i + 1);
    }

    /// Forgets the step index.
    pub fn reset(&mut self) {
        self.step_index = None;
    }

    /// The sample divided by `sqrt(sigma^2 + 1)` for the model.
    pub fn scale_model_input(&mut self, sample: Tensor<4>, timestep: f64) -> Result<Tensor<4>> {
        let i = self.index(timestep)?;
        let sigma = self.sigmas[i] as f64;
        Ok(sample.div_scalar((sigma * sigma + 1.0).sqrt()))
    }

    /// The initial noise's scale.
    pub fn init_noise_sigma(&self, config: &SchedulerConfig) -> f64 {
        utils::sigma_init_noise(config, &self.sigmas)
    }

    /// `(1, sigma_t)`: forward noising at a timestep of the schedule.
    pub fn add_noise_coefficients(&self, timestep: f64) -> Result<(f64, f64)> {
        let i = utils::index_for_timestep(self.name, &self.timesteps, timestep)?;
        Ok((1.0, self.sigmas[i] as f64))
    }
}
