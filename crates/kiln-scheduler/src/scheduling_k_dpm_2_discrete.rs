//! `KDPM2DiscreteScheduler`: k-diffusion's DPM-2 (`sample_dpm_2`), a second-order midpoint method
//! in log-sigma inspired by DPM-Solver (Lu et al. 2022, <https://arxiv.org/abs/2206.00927>).
//!
//! Mirrors diffusers' [`scheduling_k_dpm_2_discrete.py`][diffusers] (v0.42.1). Each step takes two
//! model calls: at sigma_i, then at the log-midpoint sigma_interpol; the schedule lists both.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_k_dpm_2_discrete.py

use burn::tensor::Tensor;

use crate::config::{PredictionType, SchedulerKind};
use crate::scheduling_heun_discrete::interleave;
use crate::scheduling_utils as utils;
use crate::sigma_schedule::SigmaSchedule;
use crate::{Error, NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "KDPM2DiscreteScheduler";

/// `torch.lerp(a, b, 0.5)` in float32 (`b - (b - a) * 0.5` for weights >= 0.5).
pub(crate) fn lerp_half(a: f32, b: f32) -> f32 {
    b - (b - a) * 0.5
}

/// The base sigma schedule of the KDPM2 schedulers: `(timesteps, sigmas with a final 0,
/// log-sigmas)`; Karras timesteps are rounded and kept in float64, others are float32 values.
pub(crate) fn kdpm2_base(
    config: &SchedulerConfig,
    acp: &[f32],
    steps: usize,
) -> (Vec<f64>, Vec<f32>, Vec<f32>) {
    let (timesteps, sigmas) = utils::discrete_sigma_schedule(config, acp, steps, (None, None));
    let timesteps = if config.use_karras_sigmas {
        timesteps.into_iter().map(f64::round_ties_even).collect()
    } else {
        timesteps.into_iter().map(|t| t as f32 as f64).collect()
    };
    let sigmas = sigmas.iter().map(|&s| s as f32).chain([0.0]).collect();
    (
        timesteps,
        sigmas,
        utils::log_sigmas(&utils::train_sigmas(acp)),
    )
}

/// Casts a timestep to the dtype diffusers keeps the schedule in.
pub(crate) fn as_dtype(t: f64, karras: bool) -> f64 {
    if karras { t } else { t as f32 as f64 }
}

/// `[v0, v1, v1, ..., v_n, v_n, v_n]` for `n + 1` values (diffusers'
/// `cat([v[:1], v[1:].repeat_interleave(2), v[-1:]])`).
pub(crate) fn repeat_tail(v: &[f32]) -> Vec<f32> {
    let mut out = interleave(v[0], &v[1..]);
    out.push(v[v.len() - 1]);
    out
}

/// DPM-2 (second order, deterministic, two model calls per step).
#[derive(Debug, Clone)]
pub struct KDPM2DiscreteScheduler {
    config: SchedulerConfig,
    /// The training tables, timesteps (model calls), sigmas and step index.
    schedule: SigmaSchedule,
    sigmas_interpol: Vec<f32>,
    sample: Option<Tensor<4>>,
}

impl KDPM2DiscreteScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::Kdpm2);
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
            sample: None,
        })
    }
}

impl Scheduler for KDPM2DiscreteScheduler {
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
        // log-midpoints between consecutive sigmas (index 0 pairs with the final 0 and is unused)
        let n1 = sigmas.len();
        let interpol: Vec<f32> = (0..n1)
            .map(|k| lerp_half(sigmas[k].ln(), sigmas[(k + n1 - 1) % n1].ln()).exp())
            .collect();
        let all_sigmas = repeat_tail(&sigmas);
        self.sigmas_interpol = repeat_tail(&interpol);
        let t_interpol: Vec<f64> = interpol
            .iter()
            .map(|&s| as_dtype(utils::sigma_to_t(s as f64, &log_sigmas), karras))
            .collect();
        // [t0, ti1, t1, ti2, t2, ...]
        let mut ts = vec![timesteps[0]];
        for k in 1..timesteps.len() {
            ts.push(t_interpol[k]);
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
            self.sigmas_interpol[i]
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerOutput> {
        utils::check_same_shape(&model_output, &sample)?;
        let i = self.schedule.index(timestep)?;
        let first_order = self.sample.is_none();
        let (sigma, sigma_interpol, sigma_next) = if first_order {
            (
                self.schedule.sigmas[i],
                self.sigmas_interpol[i + 1],
                self.schedule.sigmas[i + 1],
            )
        } else {
            (
                self.schedule.sigmas[i - 1],
                self.sigmas_interpol[i],
                self.schedule.sigmas[i],
            )
        };
        let sigma_input = if first_order { sigma } else { sigma_interpol };
        let x0 = utils::x0_from_sigma(
            self.config.prediction_type,
            model_output,
            sample.clone(),
            sigma_input as f64,
        );
        let prev = match self.sample.take() {
            // 1. Euler half-step to the log-midpoint
            None => {
                let derivative = (sample.clone() - x0.clone()).div_scalar(sigma as f64);
                self.sample = Some(sample.clone());
                sample + derivative.mul_scalar((sigma_interpol - sigma) as f64)
            }
            // 2. full step from the saved sample with the midpoint derivative
            Some(saved) => {
                let derivative = (sample - x0.clone()).div_scalar(sigma_interpol as f64);
                saved + derivative.mul_scalar((sigma_next - sigma) as f64)
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
