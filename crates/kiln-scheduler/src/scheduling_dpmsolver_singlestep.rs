//! `DPMSolverSinglestepScheduler`: single-step DPM-Solver++ (2S, 3S), Lu et al. 2022
//! (<https://arxiv.org/abs/2211.01095>, Algorithm 1 in data-prediction form): each group of
//! `order` model calls restarts from the group's first sample.
//!
//! Mirrors diffusers' [`scheduling_dpmsolver_singlestep.py`][diffusers] (v0.42.1), including its
//! order list and its switch to `lower_order_final` when the step count does not divide by the
//! order or the final sigma is zero.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_dpmsolver_singlestep.py

use burn::tensor::Tensor;

use crate::config::{AlgorithmType, FinalSigmasType, SchedulerKind, SolverType, invalid};
use crate::scheduling_dpmsolver_multistep::{
    DpmTables, alpha_sigma, check_dpm_config, data_prediction, lambda,
};
use crate::scheduling_utils::{self as utils, X0Clamp};
use crate::{NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "DPMSolverSinglestepScheduler";

/// DPM-Solver++ single-step (2S / 3S, optionally SDE).
#[derive(Debug, Clone)]
pub struct DPMSolverSinglestepScheduler {
    config: SchedulerConfig,
    tables: DpmTables,
    clamp: X0Clamp,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    order_list: Vec<usize>,
    model_outputs: Vec<Option<Tensor<4>>>,
    sample: Option<Tensor<4>>,
    step_index: Option<usize>,
}

impl DPMSolverSinglestepScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let mut config = config.into_kind(SchedulerKind::DpmSolverSinglestep);
        check_dpm_config(NAME, &mut config)?;
        let tables = DpmTables::new(&config);
        let clamp = X0Clamp::from_config(&config, false);
        Ok(Self {
            config,
            tables,
            clamp,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            order_list: Vec::new(),
            model_outputs: Vec::new(),
            sample: None,
            step_index: None,
        })
    }

    /// The solver order of each step (diffusers' `get_order_list`).
    fn order_list(&self, steps: usize) -> Vec<usize> {
        let order = self.config.solver_order;
        let mut orders: Vec<usize> = if self.config.lower_order_final {
            match order {
                3 => {
                    let mut v: Vec<usize> = Vec::new();
                    match steps % 3 {
                        0 => {
                            (0..steps / 3 - 1).for_each(|_| v.extend([1, 2, 3]));
                            v.extend([1, 2, 1]);
                        }
                        1 => {
                            (0..steps / 3).for_each(|_| v.extend([1, 2, 3]));
                            v.push(1);
                        }
                        _ => {
                            (0..steps / 3).for_each(|_| v.extend([1, 2, 3]));
                            v.extend([1, 2]);
                        }
                    }
                    v
                }
                2 => {
                    let mut v: Vec<usize> = Vec::new();
                    if steps.is_multiple_of(2) {
                        (0..steps / 2 - 1).for_each(|_| v.extend([1, 2]));
                        v.extend([1, 1]);
                    } else {
                        (0..steps / 2).for_each(|_| v.extend([1, 2]));
                        v.push(1);
                    }
                    v
                }
                _ => vec![1; steps],
            }
        } else {
            (0..steps / order).flat_map(|_| 1..=order).collect()
        };
        if self.config.final_sigmas_type == FinalSigmasType::Zero
            && let Some(last) = orders.last_mut()
        {
            *last = 1;
        }
        orders
    }

    fn update(
        &self,
        i: usize,
        order: usize,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Tensor<4> {
        let n = self.model_outputs.len();
        let zeros = sample.zeros_like();
        let m = |k: usize| {
            self.model_outputs[n - k]
                .clone()
                .unwrap_or_else(|| zeros.clone())
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lt = lambda(alpha_t, sigma_t);
        let heun = self.config.solver_type == SolverType::Heun;
        // the group starts at s_{order-1}; h spans the whole group
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i + 1 - order]);
        let ls = lambda(alpha_s, sigma_s);
        let h = lt - ls;
        let (e, e2) = ((-h).exp() - 1.0, 1.0 - (-2.0 * h).exp());
        let (base, d0_coeff) = match noise {
            None => (sample.mul_scalar(sigma_t / sigma_s), -alpha_t * e),
            Some(_) => (
                sample.mul_scalar(sigma_t / sigma_s * (-h).exp()),
                alpha_t * e2,
            ),
        };
        let noise_term = |x: Tensor<4>| match &noise {
            Some(z) => x + z.clone().mul_scalar(sigma_t * e2.sqrt()),
            None => x,
        };
        let sde = noise.is_some();
        match order {
            1 => noise_term(base + m(1).mul_scalar(d0_coeff)),
            2 => {
                let (a0, s0) = alpha_sigma(self.sigmas[i]);
                let r0 = (lambda(a0, s0) - ls) / h;
                let (m0, m1) = (m(1), m(2));
                let d1 = (m0 - m1.clone()).mul_scalar(1.0 / r0);
                let d1_coeff = match (sde, heun) {
                    (false, false) => -0.5 * (alpha_t * e),
                    (false, true) => alpha_t * (e / h + 1.0),
                    (true, false) => 0.5 * (alpha_t * e2),
                    (true, true) => alpha_t * (e2 / (-2.0 * h) + 1.0),
                };
                noise_term(base + m1.mul_scalar(d0_coeff) + d1.mul_scalar(d1_coeff))
            }
            _ => {
                let (a0, s0) = alpha_sigma(self.sigmas[i]);
                let (a1, s1) = alpha_sigma(self.sigmas[i - 1]);
                let (r0, r1) = ((lambda(a0, s0) - ls) / h, (lambda(a1, s1) - ls) / h);
                let (m0, m1, m2) = (m(1), m(2), m(3));
                let d1_0 = (m1 - m2.clone()).mul_scalar(1.0 / r1);
                let d1_1 = (m0 - m2.clone()).mul_scalar(1.0 / r0);
                let out = base + m2.mul_scalar(d0_coeff);
                let out = if heun {
                    let d1 = (d1_0.clone().mul_scalar(r0) - d1_1.clone().mul_scalar(r1))
                        .div_scalar(r0 - r1);
                    let d2 = (d1_1 - d1_0).mul_scalar(2.0 / (r0 - r1));
                    if sde {
                        out + d1.mul_scalar(alpha_t * (e2 / (-2.0 * h) + 1.0))
                            + d2.mul_scalar(
                                alpha_t * ((e2 - 2.0 * h) / ((-2.0 * h) * (-2.0 * h)) - 0.5),
                            )
                    } else {
                        out + d1.mul_scalar(alpha_t * (e / h + 1.0))
                            - d2.mul_scalar(alpha_t * ((e + h) / (h * h) - 0.5))
                    }
                } else if sde {
                    out + d1_1.mul_scalar(alpha_t * (e2 / (-2.0 * h) + 1.0))
                } else {
                    out + d1_1.mul_scalar(alpha_t * (e / h + 1.0))
                };
                noise_term(out)
            }
        }
    }
}

impl Scheduler for DPMSolverSinglestepScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let t = self.config.num_train_timesteps;
        utils::check_steps(num_inference_steps, t, "at most num_train_timesteps")?;
        let n = num_inference_steps;
        let clipped = self.tables.clipped_idx(self.config.lambda_min_clipped);
        if clipped + 1 >= t {
            return Err(invalid(
                "lambda_min_clipped",
                self.config.lambda_min_clipped,
                "a threshold leaving at least two timesteps",
            ));
        }
        let span = t - clipped;
        if n >= span && !self.config.use_karras_sigmas {
            return Err(invalid(
                "num_inference_steps",
                n,
                format!("1 to {} (more would repeat timesteps)", span - 1),
            ));
        }
        let mut timesteps: Vec<f64> = utils::np_linspace(0.0, (t - 1 - clipped) as f64, n + 1)
            .into_iter()
            .rev()
            .map(f64::round_ties_even)
            .collect();
        timesteps.pop();
        let train = utils::train_sigmas(&self.tables.alphas_cumprod);
        let sigmas: Vec<f64> = if self.config.use_karras_sigmas {
            let (ts, s) = self.tables.karras(&self.config, n);
            timesteps = ts;
            s
        } else {
            timesteps
                .iter()
                .map(|&ts| utils::interp_index(ts, &train))
                .collect()
        };
        self.sigmas = self.tables.finish_sigmas(&self.config, &sigmas);
        self.timesteps = timesteps;
        // diffusers switches to lower_order_final (and keeps it) in these two cases
        if !self.config.lower_order_final
            && (!n.is_multiple_of(self.config.solver_order)
                || self.config.final_sigmas_type == FinalSigmasType::Zero)
        {
            tracing::warn!("{NAME}: switching to lower_order_final, as diffusers does");
            self.config.lower_order_final = true;
        }
        self.order_list = self.order_list(n);
        self.reset();
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn sigmas(&self) -> &[f32] {
        &self.sigmas
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
        let i = utils::init_step_index(&mut self.step_index, NAME, &self.timesteps, timestep)?;
        let x0 = data_prediction(
            self.config.prediction_type,
            self.clamp,
            model_output,
            sample.clone(),
            self.sigmas[i],
        );
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(x0.clone()));
        let z = if self.config.algorithm_type == AlgorithmType::SdeDpmSolverPlusPlus {
            Some(noise.noise(sample.dims(), &sample.device())?)
        } else {
            None
        };
        let len = self.model_outputs.len();
        let mut order = self.order_list[i];
        while order > 1 && self.model_outputs[len - order].is_none() {
            order -= 1;
        }
        if order == 1 {
            self.sample = Some(sample.clone());
        }
        let group_start = self.sample.clone().unwrap_or(sample);
        let prev = self.update(i, order, group_start, z);
        self.step_index = Some(i + 1);
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn reset(&mut self) {
        self.model_outputs = vec![None; self.config.solver_order];
        self.sample = None;
        self.step_index = None;
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.tables.alphas_cumprod
    }
}
