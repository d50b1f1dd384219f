//! `KDPM2AncestralDiscreteScheduler`: k-diffusion's DPM-2 ancestral (`sample_dpm_2_ancestral`):
//! DPM-2 down to sigma_down, then fresh noise of size sigma_up.
//!
//! Mirrors diffusers' [`scheduling_k_dpm_2_ancestral_discrete.py`][diffusers] (v0.42.1); the sigma
//! tables are computed in float32 as diffusers does.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_k_dpm_2_ancestral_discrete.py

use burn::tensor::Tensor;

use crate::config::{PredictionType, SchedulerKind};
use crate::scheduling_k_dpm_2_discrete::{as_dtype, kdpm2_base, lerp_half, repeat_tail};
use crate::scheduling_utils as utils;
use crate::sigma_schedule::SigmaSchedule;
use crate::{Error, NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "KDPM2AncestralDiscreteScheduler";

/// DPM-2 ancestral (second order, stochastic, two model calls per step).
#[derive(Debug, Clone)]
pub struct KDPM2AncestralDiscreteScheduler {
    config: SchedulerConfig,
    /// The training tables, timesteps (model calls), sigmas and step index.
    schedule: SigmaSchedule,
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    sample: Option<Tensor<4>>,
}

impl KDPM2AncestralDiscreteScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::Kdpm2Ancestral);
        config.validate()?;
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::Unsupported {
                scheduler: NAME,
                what: "`prediction_type: sample`".into(),
            });
        }
        let alphas_cumprod = utils::alphas_cumprod(&utils::betas(&config), false);
        Ok(Self {
            config,
            schedule: SigmaSchedule::training(NAME, alphas_cumprod),
            sigmas_interpol: Vec::new(),
            sigmas_up: Vec::new(),
            sigmas_down: Vec::new(),
            sample: None,
        })
    }
}

impl Scheduler for KDPM2AncestralDiscreteScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        utils::check_steps(
            num_inference_steps,
            self.config.num_train_timesteps,
            "at most num_train_timesteps",
        )?;
        let karras = self.config.use_karras_sigmas;
        let (timesteps, sigmas, log_sigmas) = kdpm2_base(
            &self.config,
            &self.schedule.alphas_cumprod,
            num_inference_steps,
        );
        let n1 = sigmas.len();
        let next: Vec<f32> = (0..n1)
            .map(|k| if k + 1 < n1 { sigmas[k + 1] } else { 0.0 })
            .collect();
        let up: Vec<f32> = (0..n1)
            .map(|k| {
                (next[k] * next[k] * (sigmas[k] * sigmas[k] - next[k] * next[k])
                    / (sigmas[k] * sigmas[k]))
                    .sqrt()
            })
            .collect();
        let mut down: Vec<f32> = (0..n1)
            .map(|k| (next[k] * next[k] - up[k] * up[k]).sqrt())
            .collect();
        down[n1 - 1] = 0.0;
        let mut interpol: Vec<f32> = (0..n1)
            .map(|k| lerp_half(sigmas[k].ln(), down[k].ln()).exp())
            .collect();
        interpol[n1 - 1] = 0.0;
        if n1 >= 2 {
            interpol[n1 - 2] = 0.0;
        }
        let all_sigmas = repeat_tail(&sigmas);
        self.sigmas_interpol = repeat_tail(&interpol);
        self.sigmas_up = repeat_tail(&up);
        self.sigmas_down = repeat_tail(&down);
        let t_interpol: Vec<f64> = interpol
            .iter()
            .map(|&s| as_dtype(utils::sigma_to_t(s as f64, &log_sigmas), karras))
            .collect();
        // [t0, ti0, t1, ti1, t2, ...]
        let mut ts = vec![timesteps[0]];
        for k in 1..timesteps.len() {
            ts.push(t_interpol[k - 1]);
            ts.push(timesteps[k]);
        }
        self.schedule.set(ts, all_sigmas);
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
        let i = self.schedule.index(timestep)?;
        let sigma = if self.sample.is_none() {
            self.schedule.sigmas[i]
        } else {
            self.sigmas_interpol[i - 1]
        } as f64;
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
        let i = self.schedule.index(timestep)?;
        let first_order = self.sample.is_none();
        let k = if first_order { i } else { i - 1 };
        let (sigma, sigma_interpol) = (self.schedule.sigmas[k], self.sigmas_interpol[k]);
        let sigma_input = if first_order { sigma } else { sigma_interpol };
        let x0 = utils::x0_from_sigma(
            self.config.prediction_type,
            model_output,
            sample.clone(),
            sigma_input as f64,
        );
        let prev = match self.sample.take() {
            // 1. Euler half-step to the log-midpoint of sigma and sigma_down
            None => {
                let derivative = (sample.clone() - x0.clone()).div_scalar(sigma as f64);
                self.sample = Some(sample.clone());
                sample + derivative.mul_scalar((sigma_interpol - sigma) as f64)
            }
            // 2. full step to sigma_down with the midpoint derivative, plus sigma_up of noise
            Some(saved) => {
                let (sigma_up, sigma_down) = (self.sigmas_up[i - 1], self.sigmas_down[i - 1]);
                let derivative = (sample - x0.clone()).div_scalar(sigma_interpol as f64);
                let prev = saved + derivative.mul_scalar((sigma_down - sigma) as f64);
                let z = noise.noise(prev.dims(), &prev.device())?;
                prev + z.mul_scalar(sigma_up as f64)
            }
        };
        self.schedule.advance(i);
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn reset(&mut self) {
        self.sample = None;
        self.schedule.reset();
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.schedule.alphas_cumprod
    }

    fn add_noise_coefficients(&self, timestep: f64) -> Result<(f64, f64)> {
        self.schedule.add_noise_coefficients(timestep)
    }
}
