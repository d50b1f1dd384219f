//! `PNDMScheduler`: pseudo numerical methods, Liu et al. 2022, "Pseudo Numerical Methods for
//! Diffusion Models on Manifolds" (<https://arxiv.org/abs/2202.09778>): a Runge-Kutta warm-up
//! (PRK, eq. 13) then the linear multistep method (PLMS, eq. 12); Stable Diffusion ships it with
//! `skip_prk_steps` (PLMS only).
//!
//! Mirrors diffusers' [`scheduling_pndm.py`][diffusers] (v0.42.1), including its timestep lists:
//! PLMS repeats the second timestep, PRK lists each intermediate point.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_pndm.py

use burn::tensor::Tensor;

use crate::config::{PredictionType, SchedulerKind, TimestepSpacing, invalid};
use crate::scheduling_utils as utils;
use crate::{Error, NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "PNDMScheduler";
const PNDM_ORDER: usize = 4;

/// PNDM / PLMS (deterministic).
#[derive(Debug, Clone)]
pub struct PNDMScheduler {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f64,
    prk_timesteps: Vec<i64>,
    timesteps: Vec<f64>,
    num_inference_steps: Option<usize>,
    counter: usize,
    ets: Vec<Tensor<4>>,
    cur_model_output: Option<Tensor<4>>,
    cur_sample: Option<Tensor<4>>,
}

impl PNDMScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let config = config.into_kind(SchedulerKind::Pndm);
        config.validate()?;
        if config.prediction_type == PredictionType::Sample {
            return Err(Error::Unsupported {
                scheduler: NAME,
                what: "`prediction_type: sample`".into(),
            });
        }
        let alphas_cumprod = utils::alphas_cumprod(&utils::betas(&config), false);
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0] as f64
        };
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            prk_timesteps: Vec::new(),
            timesteps: Vec::new(),
            num_inference_steps: None,
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        })
    }

    fn acp(&self, t: i64) -> Result<f64> {
        if t < 0 {
            return Ok(self.final_alpha_cumprod);
        }
        self.alphas_cumprod
            .get(t as usize)
            .map(|&a| a as f64)
            .ok_or(Error::UnknownTimestep {
                scheduler: NAME,
                timestep: t as f64,
                accepted: format!("0..{}", self.alphas_cumprod.len()),
            })
    }

    /// x_{t_prev} from x_t and an epsilon estimate (the "transfer" phi of eq. 11).
    fn get_prev_sample(
        &self,
        sample: Tensor<4>,
        t: i64,
        prev_t: i64,
        model_output: Tensor<4>,
    ) -> Result<Tensor<4>> {
        let acp_t = self.acp(t)?;
        let acp_prev = self.acp(prev_t)?;
        let (beta_t, beta_prev) = (1.0 - acp_t, 1.0 - acp_prev);
        let eps = match self.config.prediction_type {
            PredictionType::VPrediction => {
                model_output.mul_scalar(acp_t.sqrt()) + sample.clone().mul_scalar(beta_t.sqrt())
            }
            _ => model_output,
        };
        let sample_coeff = (acp_prev / acp_t).sqrt();
        let denom = acp_t * beta_prev.sqrt() + (acp_t * beta_t * acp_prev).sqrt();
        Ok(sample.mul_scalar(sample_coeff) - eps.mul_scalar((acp_prev - acp_t) / denom))
    }

    fn step_prk(
        &mut self,
        model_output: Tensor<4>,
        timestep: i64,
        sample: Tensor<4>,
        n: usize,
    ) -> Result<Tensor<4>> {
        let half = (self.config.num_train_timesteps / n / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_t = timestep - diff_to_prev;
        let t = self.prk_timesteps[self.counter / 4 * 4];
        let add = |acc: Option<Tensor<4>>, v: Tensor<4>| match acc {
            Some(a) => a + v,
            None => v,
        };
        let model_output = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(add(
                    self.cur_model_output.take(),
                    model_output.clone().div_scalar(6.0),
                ));
                self.ets.push(model_output.clone());
                self.cur_sample = Some(sample.clone());
                model_output
            }
            1 | 2 => {
                self.cur_model_output = Some(add(
                    self.cur_model_output.take(),
                    model_output.clone().div_scalar(3.0),
                ));
                model_output
            }
            _ => add(self.cur_model_output.take(), model_output.div_scalar(6.0)),
        };
        let cur_sample = self.cur_sample.clone().unwrap_or(sample);
        let prev = self.get_prev_sample(cur_sample, t, prev_t, model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn step_plms(
        &mut self,
        model_output: Tensor<4>,
        timestep: i64,
        sample: Tensor<4>,
        n: usize,
    ) -> Result<Tensor<4>> {
        let ratio = (self.config.num_train_timesteps / n) as i64;
        let (mut t, mut prev_t) = (timestep, timestep - ratio);
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = timestep;
            t = timestep + ratio;
        }
        let e = |k: usize| self.ets[self.ets.len() - k].clone();
        let mut sample = sample;
        let model_output = match self.ets.len() {
            1 if self.counter == 0 => {
                self.cur_sample = Some(sample.clone());
                model_output
            }
            1 if self.counter == 1 => {
                sample = self.cur_sample.take().unwrap_or(sample);
                (model_output + e(1)).div_scalar(2.0)
            }
            2 => (e(1).mul_scalar(3.0) - e(2)).div_scalar(2.0),
            3 => (e(1).mul_scalar(23.0) - e(2).mul_scalar(16.0) + e(3).mul_scalar(5.0))
                .div_scalar(12.0),
            _ => (e(1).mul_scalar(55.0) - e(2).mul_scalar(59.0) + e(3).mul_scalar(37.0)
                - e(4).mul_scalar(9.0))
            .div_scalar(24.0),
        };
        let prev = self.get_prev_sample(sample, t, prev_t, model_output)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Scheduler for PNDMScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let t = self.config.num_train_timesteps;
        utils::check_steps(num_inference_steps, t, "at most num_train_timesteps")?;
        if !self.config.skip_prk_steps && num_inference_steps < PNDM_ORDER {
            return Err(invalid(
                "num_inference_steps",
                num_inference_steps,
                format!(
                    "{PNDM_ORDER} to {t} with the Runge-Kutta warm-up (or set `skip_prk_steps`)"
                ),
            ));
        }
        let n = num_inference_steps;
        // the base grid, ascending
        let base: Vec<i64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => utils::np_linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .map(|v| v.round_ties_even() as i64)
                .collect(),
            TimestepSpacing::Leading => (0..n)
                .map(|i| (i * (t / n) + self.config.steps_offset) as i64)
                .collect(),
            TimestepSpacing::Trailing => utils::trailing(t, t as f64 / n as f64, n)
                .into_iter()
                .rev()
                .map(|v| v as i64)
                .collect(),
        };
        if base.iter().any(|&v| v >= t as i64) {
            return Err(invalid(
                "steps_offset",
                self.config.steps_offset,
                "an offset keeping every timestep below num_train_timesteps",
            ));
        }
        let plms: Vec<i64>;
        if self.config.skip_prk_steps {
            self.prk_timesteps.clear();
            // [.., t_{n-2}, t_{n-2}, t_{n-1}] reversed: the second timestep is taken twice
            let mut v: Vec<i64> = base[..n - 1].to_vec();
            if n >= 2 {
                v.push(base[n - 2]);
            }
            v.push(base[n - 1]);
            v.reverse();
            plms = v;
        } else {
            let half = (t / n / 2) as i64;
            let top = &base[n - PNDM_ORDER..];
            let prk: Vec<i64> = top.iter().flat_map(|&v| [v, v + half]).collect();
            let prk = &prk[..prk.len() - 1];
            let doubled: Vec<i64> = prk.iter().flat_map(|&v| [v, v]).collect();
            let mut prk = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            self.prk_timesteps = prk;
            plms = base[..n - 3].iter().rev().copied().collect();
        }
        self.timesteps = self
            .prk_timesteps
            .iter()
            .chain(plms.iter())
            .map(|&v| v as f64)
            .collect();
        self.num_inference_steps = Some(n);
        self.reset();
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
    /// `model_output`, `sample`: `[b, c, h, w]` -> `prev_sample` alike (no x0 estimate).
    fn step(
        &mut self,
        model_output: Tensor<4>,
        timestep: f64,
        sample: Tensor<4>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerOutput> {
        utils::check_same_shape(&model_output, &sample)?;
        let n = self.num_inference_steps.ok_or(Error::NotInitialized {
            scheduler: NAME,
            call: "step",
        })?;
        if timestep.fract() != 0.0
            || !(0.0..self.config.num_train_timesteps as f64).contains(&timestep)
        {
            return Err(Error::UnknownTimestep {
                scheduler: NAME,
                timestep,
                accepted: utils::format_list(&self.timesteps),
            });
        }
        let t = timestep as i64;
        let prev = if self.counter < self.prk_timesteps.len() && !self.config.skip_prk_steps {
            self.step_prk(model_output, t, sample, n)?
        } else {
            self.step_plms(model_output, t, sample, n)?
        };
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: None,
        })
    }

    fn reset(&mut self) {
        self.counter = 0;
        self.ets.clear();
        self.cur_model_output = None;
        self.cur_sample = None;
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}
