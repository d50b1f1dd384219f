//! `UniPCMultistepScheduler`: the unified predictor-corrector of Zhao et al. 2023, "UniPC: A
//! Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models"
//! (<https://arxiv.org/abs/2302.04867>): UniP-p (Algorithm 2) with the UniC corrector
//! (Algorithm 1), B(h) = h (`bh1`) or e^h - 1 (`bh2`).
//!
//! Mirrors diffusers' [`scheduling_unipc_multistep.py`][diffusers] (v0.42.1); `solver_p`, flow
//! sigmas and dynamic shifting are not offered. The small linear systems for the rho
//! coefficients are solved on the host.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_unipc_multistep.py

use burn::tensor::Tensor;

use crate::config::{
    FinalSigmasType, PredictionType, SchedulerKind, SolverType, TimestepSpacing, invalid,
};
use crate::scheduling_dpmsolver_multistep::{DpmTables, alpha_sigma, lambda};
use crate::scheduling_utils::{self as utils, X0Clamp};
use crate::{Error, NoiseSource, Result, Scheduler, SchedulerConfig, SchedulerOutput};

const NAME: &str = "UniPCMultistepScheduler";

/// Solves the small dense system `a x = b` by Gaussian elimination with partial pivoting.
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))
            .unwrap_or(col);
        a.swap(col, pivot);
        b.swap(col, pivot);
        for row in col + 1..n {
            let f = a[row][col] / a[col][col];
            let pivot_row = a[col].clone();
            for (v, p) in a[row].iter_mut().zip(&pivot_row).skip(col) {
                *v -= f * p;
            }
            b[row] -= f * b[col];
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let s: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = (b[row] - s) / a[row][row];
    }
    x
}

/// UniPC (deterministic multistep predictor-corrector).
#[derive(Debug, Clone)]
pub struct UniPCMultistepScheduler {
    config: SchedulerConfig,
    tables: DpmTables,
    clamp: X0Clamp,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    model_outputs: Vec<Tensor<4>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor<4>>,
    step_index: Option<usize>,
}

/// The UniPC coefficient set for one update: `(h_phi_1, B(h), rks, b)`.
struct Coefficients {
    h_phi_1: f32,
    b_h: f32,
    rks: Vec<f32>,
    b: Vec<f32>,
}

impl UniPCMultistepScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let mut config = config.into_kind(SchedulerKind::UniPc);
        config.validate()?;
        if matches!(
            config.solver_type,
            SolverType::Midpoint | SolverType::Heun | SolverType::Logrho
        ) {
            config.solver_type = SolverType::Bh2;
        }
        if !(1..=3).contains(&config.solver_order) {
            return Err(invalid("solver_order", config.solver_order, "1, 2 or 3"));
        }
        if config.final_sigmas_type == FinalSigmasType::Zero && !config.predict_x0 {
            return Err(Error::Unsupported {
                scheduler: NAME,
                what: "`predict_x0: false` with `final_sigmas_type: zero` (diffusers yields NaN; use sigma_min)".into(),
            });
        }
        if config.final_sigmas_type == FinalSigmasType::Zero && !config.lower_order_final {
            return Err(Error::Unsupported {
                scheduler: NAME,
                what: "`lower_order_final: false` with `final_sigmas_type: zero` (diffusers yields NaN)".into(),
            });
        }
        let tables = DpmTables::new(&config);
        let clamp = X0Clamp::from_config(&config, false);
        Ok(Self {
            config,
            tables,
            clamp,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
            step_index: None,
        })
    }

    fn lambda_at(&self, k: usize) -> f32 {
        let (a, s) = alpha_sigma(self.sigmas[k]);
        lambda(a, s)
    }

    /// rks, h_phi and b of the UniPC update from s0 = `s0` to t = `t` using the history points
    /// `history` (indices into the sigma table), in float32 as diffusers.
    fn coefficients(&self, t: usize, s0: usize, history: &[usize], order: usize) -> Coefficients {
        let (lt, l0) = (self.lambda_at(t), self.lambda_at(s0));
        let h = lt - l0;
        let mut rks: Vec<f32> = history
            .iter()
            .map(|&si| (self.lambda_at(si) - l0) / h)
            .collect();
        rks.push(1.0);
        let hh = if self.config.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial = 1.0f32;
        let b_h = if self.config.solver_type == SolverType::Bh1 {
            hh
        } else {
            hh.exp_m1()
        };
        let mut b = Vec::with_capacity(order);
        for i in 1..=order {
            b.push(h_phi_k * factorial / b_h);
            factorial *= (i + 1) as f32;
            h_phi_k = h_phi_k / hh - 1.0 / factorial;
        }
        Coefficients {
            h_phi_1,
            b_h,
            rks,
            b,
        }
    }

    /// `R[row][col] = rks[col]^row` for the first `n` rows and columns.
    fn r_matrix(rks: &[f32], n: usize) -> Vec<Vec<f64>> {
        (0..n)
            .map(|row| {
                (0..n)
                    .map(|col| (rks[col] as f64).powi(row as i32))
                    .collect()
            })
            .collect()
    }

    /// The base of both updates: x_t' = sigma_t / sigma_s0 x - alpha_t h_phi_1 m0 (data
    /// prediction), or alpha_t / alpha_s0 x - sigma_t h_phi_1 m0 (noise prediction); returns it
    /// with the factor of the `B(h)` correction term.
    fn base(
        &self,
        t: usize,
        s0: usize,
        x: Tensor<4>,
        m0: Tensor<4>,
        h_phi_1: f32,
        b_h: f32,
    ) -> (Tensor<4>, f32) {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        if self.config.predict_x0 {
            (
                x.mul_scalar(sigma_t / sigma_s0) - m0.mul_scalar(alpha_t * h_phi_1),
                alpha_t * b_h,
            )
        } else {
            (
                x.mul_scalar(alpha_t / alpha_s0) - m0.mul_scalar(sigma_t * h_phi_1),
                sigma_t * b_h,
            )
        }
    }

    /// UniP: predicts x at step i + 1 from x at step i (`sample`).
    fn predictor(&self, i: usize, sample: Tensor<4>, order: usize) -> Tensor<4> {
        let n = self.model_outputs.len();
        let m0 = self.model_outputs[n - 1].clone();
        let history: Vec<usize> = (1..order).map(|k| i - k).collect();
        let c = self.coefficients(i + 1, i, &history, order);
        let (base, factor) = self.base(i + 1, i, sample, m0.clone(), c.h_phi_1, c.b_h);
        if order == 1 {
            return base;
        }
        let d1s: Vec<Tensor<4>> = (1..order)
            .map(|k| (self.model_outputs[n - 1 - k].clone() - m0.clone()).div_scalar(c.rks[k - 1]))
            .collect();
        let rhos: Vec<f64> = if order == 2 {
            vec![0.5]
        } else {
            solve(
                Self::r_matrix(&c.rks, order - 1),
                c.b[..order - 1].iter().map(|&v| v as f64).collect(),
            )
        };
        let pred_res = weighted_sum(&d1s, &rhos);
        base - pred_res.mul_scalar(factor)
    }

    /// UniC: the corrected x at step i, recomputed from `last_sample` (x at step i - 1) with the
    /// model output at step i (`model_t`); the predicted x at step i is not needed.
    fn corrector(
        &self,
        i: usize,
        last_sample: Tensor<4>,
        model_t: Tensor<4>,
        order: usize,
    ) -> Tensor<4> {
        let n = self.model_outputs.len();
        let m0 = self.model_outputs[n - 1].clone();
        let history: Vec<usize> = (1..order).map(|k| i - (k + 1)).collect();
        let c = self.coefficients(i, i - 1, &history, order);
        let (base, factor) = self.base(i, i - 1, last_sample, m0.clone(), c.h_phi_1, c.b_h);
        let rhos: Vec<f64> = if order == 1 {
            vec![0.5]
        } else {
            solve(
                Self::r_matrix(&c.rks, order),
                c.b.iter().map(|&v| v as f64).collect(),
            )
        };
        let d1s: Vec<Tensor<4>> = (1..order)
            .map(|k| (self.model_outputs[n - 1 - k].clone() - m0.clone()).div_scalar(c.rks[k - 1]))
            .collect();
        let d1_t = model_t - m0;
        let corr = match d1s.is_empty() {
            true => d1_t.mul_scalar(rhos[order - 1]),
            false => weighted_sum(&d1s, &rhos[..order - 1]) + d1_t.mul_scalar(rhos[order - 1]),
        };
        base - corr.mul_scalar(factor)
    }

    fn convert(&self, model_output: Tensor<4>, sample: Tensor<4>, sigma: f32) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        if self.config.predict_x0 {
            let x0 = match self.config.prediction_type {
                PredictionType::Epsilon => {
                    (sample - model_output.mul_scalar(sigma_t)).div_scalar(alpha_t)
                }
                PredictionType::Sample => model_output,
                PredictionType::VPrediction => {
                    sample.mul_scalar(alpha_t) - model_output.mul_scalar(sigma_t)
                }
            };
            self.clamp.apply(x0)
        } else {
            match self.config.prediction_type {
                PredictionType::Epsilon => model_output,
                PredictionType::Sample => {
                    (sample - model_output.mul_scalar(alpha_t)).div_scalar(sigma_t)
                }
                PredictionType::VPrediction => {
                    model_output.mul_scalar(alpha_t) + sample.mul_scalar(sigma_t)
                }
            }
        }
    }
}

/// `sum_k w_k t_k` (diffusers' `einsum("k,bkc...->bc...")`).
fn weighted_sum(tensors: &[Tensor<4>], weights: &[f64]) -> Tensor<4> {
    let mut it = tensors.iter().zip(weights);
    let (t0, w0) = it
        .next()
        .map(|(t, w)| (t.clone(), *w))
        .unwrap_or_else(|| (tensors[0].zeros_like(), 0.0));
    it.fold(t0.mul_scalar(w0), |acc, (t, w)| {
        acc + t.clone().mul_scalar(*w)
    })
}

impl Scheduler for UniPCMultistepScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let t = self.config.num_train_timesteps;
        utils::check_steps(num_inference_steps, t, "at most num_train_timesteps")?;
        let n = num_inference_steps;
        let mut timesteps: Vec<f64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                if n >= t && !self.config.use_karras_sigmas {
                    return Err(invalid(
                        "num_inference_steps",
                        n,
                        format!(
                            "1 to {} with `linspace` spacing (more would repeat timesteps)",
                            t - 1
                        ),
                    ));
                }
                let mut v: Vec<f64> = utils::np_linspace(0.0, (t - 1) as f64, n + 1)
                    .into_iter()
                    .rev()
                    .map(f64::round_ties_even)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = t / (n + 1);
                if ratio == 0 {
                    return Err(invalid(
                        "num_inference_steps",
                        n,
                        format!(
                            "1 to {} with `leading` spacing (one more step would repeat timesteps)",
                            t - 1
                        ),
                    ));
                }
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => utils::trailing(t, t as f64 / n as f64, n),
        };
        let train = utils::train_sigmas(&self.tables.alphas_cumprod);
        let mut sigmas: Vec<f32> = if self.config.use_karras_sigmas {
            let log = utils::log_sigmas(&train);
            let smin = self.config.sigma_min.unwrap_or(train[0] as f64);
            let smax = self.config.sigma_max.unwrap_or(train[t - 1] as f64);
            let s = utils::karras_sigmas(smin, smax, n);
            timesteps = s
                .iter()
                .map(|&v| utils::sigma_to_t(v, &log).round_ties_even())
                .collect();
            let last = match self.config.final_sigmas_type {
                FinalSigmasType::Zero => 0.0,
                FinalSigmasType::SigmaMin => s[s.len() - 1],
            };
            s.iter().chain([&last]).map(|&v| v as f32).collect()
        } else {
            let s: Vec<f64> = timesteps
                .iter()
                .map(|&ts| utils::interp_index(ts, &train))
                .collect();
            self.tables.finish_sigmas(&self.config, &s)
        };
        if timesteps.iter().any(|&ts| ts >= t as f64 || ts < 0.0) {
            return Err(invalid(
                "steps_offset",
                self.config.steps_offset,
                "an offset keeping every timestep below num_train_timesteps",
            ));
        }
        sigmas.truncate(timesteps.len() + 1);
        self.sigmas = sigmas;
        self.timesteps = timesteps;
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
    /// `model_output`, `sample`: `[b, c, h, w]` -> `prev_sample` and (with `predict_x0`) the data
    /// prediction alike.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        timestep: f64,
        sample: Tensor<4>,
        _noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerOutput> {
        utils::check_same_shape(&model_output, &sample)?;
        let i = utils::init_step_index(&mut self.step_index, NAME, &self.timesteps, timestep)?;
        let use_corrector = i > 0
            && !self.config.disable_corrector.contains(&(i - 1))
            && self.last_sample.is_some();
        let converted = self.convert(model_output, sample.clone(), self.sigmas[i]);
        // 1. UniC: correct the sample the previous predictor produced
        let sample = match (use_corrector, self.last_sample.take()) {
            (true, Some(last)) => self.corrector(i, last, converted.clone(), self.this_order),
            _ => sample,
        };
        self.model_outputs.push(converted.clone());
        if self.model_outputs.len() > self.config.solver_order {
            self.model_outputs.remove(0);
        }
        // 2. the order of this step
        let order = if self.config.lower_order_final {
            self.config.solver_order.min(self.timesteps.len() - i)
        } else {
            self.config.solver_order
        };
        self.this_order = order.min(self.lower_order_nums + 1);
        self.last_sample = Some(sample.clone());
        // 3. UniP: predict the next sample
        let prev = self.predictor(i, sample, self.this_order);
        if self.lower_order_nums < self.config.solver_order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        let x0 = self.config.predict_x0.then_some(converted);
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: x0,
        })
    }

    fn reset(&mut self) {
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.this_order = 1;
        self.last_sample = None;
        self.step_index = None;
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.tables.alphas_cumprod
    }
}
