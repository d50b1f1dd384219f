//! `DPMSolverMultistepScheduler`: DPM-Solver++ (2M, 3M) and SDE-DPM-Solver++, Lu et al. 2022,
//! "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models"
//! (<https://arxiv.org/abs/2211.01095>), Algorithm 2 and eqs. in Appendix B; the SDE variant after
//! Gonzalez et al. / k-diffusion's `sample_dpmpp_2m_sde`.
//!
//! Mirrors diffusers' [`scheduling_dpmsolver_multistep.py`][diffusers] (v0.42.1). The step
//! coefficients (alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t), h) are computed in float32
//! from the float32 sigma table, as diffusers computes them; the deprecated `dpmsolver` and
//! `sde-dpmsolver` (noise-prediction) algorithms are not offered.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/blob/v0.42.1/src/diffusers/schedulers/scheduling_dpmsolver_multistep.py

use burn::tensor::Tensor;

use crate::config::{
    AlgorithmType, FinalSigmasType, SchedulerKind, SolverType, TimestepSpacing, VarianceType,
    invalid,
};
use crate::scheduling_utils::{self as utils, X0Clamp};
use crate::{
    Error, NoiseSource, PredictionType, Result, Scheduler, SchedulerConfig, SchedulerOutput,
};

const NAME: &str = "DPMSolverMultistepScheduler";

/// `(alpha_t, sigma_t)` of the VP process for a Karras sigma, in float32 (diffusers'
/// `_sigma_to_alpha_sigma_t`).
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// lambda = log(alpha) - log(sigma), the half log-SNR, in float32.
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// Checks and normalises the DPM-Solver keys shared with the single-step scheduler.
pub(crate) fn check_dpm_config(name: &'static str, config: &mut SchedulerConfig) -> Result<()> {
    config.validate()?;
    match config.algorithm_type {
        AlgorithmType::DpmSolverPlusPlus | AlgorithmType::SdeDpmSolverPlusPlus => {}
        AlgorithmType::Deis => config.algorithm_type = AlgorithmType::DpmSolverPlusPlus,
        other => {
            return Err(Error::Unsupported {
                scheduler: name,
                what: format!(
                    "`algorithm_type: {other:?}` (deprecated in diffusers; use dpmsolver++ or sde-dpmsolver++)"
                ),
            });
        }
    }
    if matches!(
        config.solver_type,
        SolverType::Bh1 | SolverType::Bh2 | SolverType::Logrho
    ) {
        config.solver_type = SolverType::Midpoint;
    }
    if !(1..=3).contains(&config.solver_order) {
        return Err(invalid("solver_order", config.solver_order, "1, 2 or 3"));
    }
    if matches!(
        config.variance_type,
        Some(VarianceType::Learned | VarianceType::LearnedRange)
    ) {
        return Err(Error::Unsupported {
            scheduler: name,
            what: "learned variances".into(),
        });
    }
    if config.lambda_min_clipped.is_nan() {
        return Err(invalid(
            "lambda_min_clipped",
            config.lambda_min_clipped,
            "a number (or -inf, the default)",
        ));
    }
    Ok(())
}

/// The DPM-Solver tables: alpha-bar and lambda_t over the training timesteps.
#[derive(Debug, Clone)]
pub(crate) struct DpmTables {
    pub alphas_cumprod: Vec<f32>,
    pub lambda_t: Vec<f32>,
}

impl DpmTables {
    pub fn new(config: &SchedulerConfig) -> Self {
        let zero_snr = config.rescale_betas_zero_snr && config.kind.supports_zero_snr();
        let alphas_cumprod = utils::alphas_cumprod(&utils::betas(config), zero_snr);
        let lambda_t = alphas_cumprod
            .iter()
            .map(|a| lambda(a.sqrt(), (1.0 - a).sqrt()))
            .collect();
        Self {
            alphas_cumprod,
            lambda_t,
        }
    }

    /// `torch.searchsorted(flip(lambda_t), lambda_min_clipped)`: how many training timesteps at
    /// the noisy end fall below the clipping threshold.
    pub fn clipped_idx(&self, lambda_min_clipped: f64) -> usize {
        self.lambda_t
            .iter()
            .rev()
            .take_while(|&&l| (l as f64) < lambda_min_clipped)
            .count()
    }

    /// Karras sigmas over the whole training range and their timesteps (rounded unless the
    /// schedule is cosine, as diffusers does).
    pub fn karras(&self, config: &SchedulerConfig, steps: usize) -> (Vec<f64>, Vec<f64>) {
        let train = utils::train_sigmas(&self.alphas_cumprod);
        let log = utils::log_sigmas(&train);
        let sigmas = utils::karras_sigmas(train[0] as f64, train[train.len() - 1] as f64, steps);
        let round = config.beta_schedule != crate::BetaSchedule::SquaredcosCapV2;
        let timesteps = sigmas
            .iter()
            .map(|&s| utils::sigma_to_t(s, &log))
            .map(|t| {
                if round {
                    t.round_ties_even()
                } else {
                    t.trunc()
                }
            })
            .collect();
        (timesteps, sigmas)
    }

    /// Appends the final sigma and narrows to float32.
    pub fn finish_sigmas(&self, config: &SchedulerConfig, sigmas: &[f64]) -> Vec<f32> {
        let last = match config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => utils::train_sigmas(&self.alphas_cumprod[..1])[0],
        };
        sigmas.iter().map(|&s| s as f32).chain([last]).collect()
    }
}

/// Converts a model output to DPM-Solver++'s data prediction x0 at sigma (then thresholds it).
pub(crate) fn data_prediction(
    prediction: PredictionType,
    clamp: X0Clamp,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    sigma: f32,
) -> Tensor<4> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    let x0 = match prediction {
        PredictionType::Epsilon => (sample - model_output.mul_scalar(sigma_t)).div_scalar(alpha_t),
        PredictionType::Sample => model_output,
        PredictionType::VPrediction => {
            sample.mul_scalar(alpha_t) - model_output.mul_scalar(sigma_t)
        }
    };
    clamp.apply(x0)
}

/// DPM-Solver++ multistep (2M / 3M, optionally SDE).
#[derive(Debug, Clone)]
pub struct DPMSolverMultistepScheduler {
    config: SchedulerConfig,
    tables: DpmTables,
    clamp: X0Clamp,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    model_outputs: Vec<Tensor<4>>,
    lower_order_nums: usize,
    step_index: Option<usize>,
}

impl DPMSolverMultistepScheduler {
    /// Builds the tables.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        let mut config = config.into_kind(SchedulerKind::DpmSolverMultistep);
        check_dpm_config(NAME, &mut config)?;
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
            step_index: None,
        })
    }

    fn is_sde(&self) -> bool {
        self.config.algorithm_type == AlgorithmType::SdeDpmSolverPlusPlus
    }

    /// First order: DDIM in data-prediction form (DPM-Solver++ eq. 5) or its SDE counterpart.
    fn first_order(
        &self,
        i: usize,
        x0: Tensor<4>,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match noise {
            None => {
                sample.mul_scalar(sigma_t / sigma_s) - x0.mul_scalar(alpha_t * ((-h).exp() - 1.0))
            }
            Some(z) => {
                sample.mul_scalar(sigma_t / sigma_s * (-h).exp())
                    + x0.mul_scalar(alpha_t * (1.0 - (-2.0 * h).exp()))
                    + z.mul_scalar(sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())
            }
        }
    }

    /// Second-order multistep update (DPM-Solver++(2M), Algorithm 2).
    fn second_order(&self, i: usize, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (lt, l0, l1) = (
            lambda(alpha_t, sigma_t),
            lambda(alpha_s0, sigma_s0),
            lambda(alpha_s1, sigma_s1),
        );
        let n = self.model_outputs.len();
        let (m0, m1) = (
            self.model_outputs[n - 1].clone(),
            self.model_outputs[n - 2].clone(),
        );
        let (h, h_0) = (lt - l0, l0 - l1);
        let r0 = h_0 / h;
        let d0 = m0.clone();
        let d1 = (m0 - m1).mul_scalar(1.0 / r0);
        let heun = self.config.solver_type == SolverType::Heun;
        match noise {
            None => {
                let e = (-h).exp() - 1.0;
                let base = sample.mul_scalar(sigma_t / sigma_s0) - d0.mul_scalar(alpha_t * e);
                if heun {
                    base + d1.mul_scalar(alpha_t * (e / h + 1.0))
                } else {
                    base - d1.mul_scalar(0.5 * (alpha_t * e))
                }
            }
            Some(z) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                let base = sample.mul_scalar(sigma_t / sigma_s0 * (-h).exp())
                    + d0.mul_scalar(alpha_t * e2);
                let d1_term = if heun {
                    alpha_t * (e2 / (-2.0 * h) + 1.0)
                } else {
                    0.5 * (alpha_t * e2)
                };
                base + d1.mul_scalar(d1_term) + z.mul_scalar(sigma_t * e2.sqrt())
            }
        }
    }

    /// Third-order multistep update (DPM-Solver++(3M)).
    fn third_order(&self, i: usize, sample: Tensor<4>, noise: Option<Tensor<4>>) -> Tensor<4> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma(self.sigmas[i - 2]);
        let lt = lambda(alpha_t, sigma_t);
        let (l0, l1, l2) = (
            lambda(alpha_s0, sigma_s0),
            lambda(alpha_s1, sigma_s1),
            lambda(alpha_s2, sigma_s2),
        );
        let n = self.model_outputs.len();
        let m0 = self.model_outputs[n - 1].clone();
        let m1 = self.model_outputs[n - 2].clone();
        let m2 = self.model_outputs[n - 3].clone();
        let (h, h_0, h_1) = (lt - l0, l0 - l1, l1 - l2);
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = (m0.clone() - m1.clone()).mul_scalar(1.0 / r0);
        let d1_1 = (m1 - m2).mul_scalar(1.0 / r1);
        let d1 = d1_0.clone() + (d1_0.clone() - d1_1.clone()).mul_scalar(r0 / (r0 + r1));
        let d2 = (d1_0 - d1_1).mul_scalar(1.0 / (r0 + r1));
        match noise {
            None => {
                let e = (-h).exp() - 1.0;
                sample.mul_scalar(sigma_t / sigma_s0) - m0.mul_scalar(alpha_t * e)
                    + d1.mul_scalar(alpha_t * (e / h + 1.0))
                    - d2.mul_scalar(alpha_t * ((e + h) / (h * h) - 0.5))
            }
            Some(z) => {
                let e2 = 1.0 - (-2.0 * h).exp();
                sample.mul_scalar(sigma_t / sigma_s0 * (-h).exp())
                    + m0.mul_scalar(alpha_t * e2)
                    + d1.mul_scalar(alpha_t * (e2 / (-2.0 * h) + 1.0))
                    + d2.mul_scalar(alpha_t * ((e2 - 2.0 * h) / ((2.0 * h) * (2.0 * h)) - 0.5))
                    + z.mul_scalar(sigma_t * e2.sqrt())
            }
        }
    }
}

impl Scheduler for DPMSolverMultistepScheduler {
    fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let t = self.config.num_train_timesteps;
        utils::check_steps(num_inference_steps, t, "at most num_train_timesteps")?;
        let n = num_inference_steps;
        let clipped = self.tables.clipped_idx(self.config.lambda_min_clipped);
        let last = t - clipped;
        if last < 1 {
            return Err(invalid(
                "lambda_min_clipped",
                self.config.lambda_min_clipped,
                "a threshold leaving at least one timestep",
            ));
        }
        let mut timesteps: Vec<f64> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => {
                if n >= last && !self.config.use_karras_sigmas {
                    return Err(invalid(
                        "num_inference_steps",
                        n,
                        format!(
                            "1 to {} with `linspace` spacing (more would repeat timesteps)",
                            last - 1
                        ),
                    ));
                }
                let mut v: Vec<f64> = utils::np_linspace(0.0, (last - 1) as f64, n + 1)
                    .into_iter()
                    .rev()
                    .map(f64::round_ties_even)
                    .collect();
                v.pop();
                v
            }
            TimestepSpacing::Leading => {
                let ratio = last / (n + 1);
                if ratio == 0 {
                    return Err(invalid(
                        "num_inference_steps",
                        n,
                        format!(
                            "1 to {} with `leading` spacing (one more step would repeat timesteps)",
                            last - 1
                        ),
                    ));
                }
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + self.config.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = t as f64 / n as f64;
                let count = if last == t {
                    n
                } else {
                    ((last as f64 / ratio).ceil() as usize).min(n)
                };
                utils::trailing(last, ratio, count)
            }
        };
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
        if timesteps.is_empty() || timesteps.iter().any(|&ts| ts >= t as f64 || ts < 0.0) {
            return Err(invalid(
                "steps_offset",
                self.config.steps_offset,
                "an offset keeping every timestep below num_train_timesteps",
            ));
        }
        self.sigmas = self.tables.finish_sigmas(&self.config, &sigmas);
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
        let len = self.timesteps.len();
        let c = &self.config;
        let lower_order_final = i == len - 1
            && (c.euler_at_final
                || (c.lower_order_final && len < 15)
                || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = i + 2 == len && c.lower_order_final && len < 15;
        // 1. the data prediction x0 (DPM-Solver++ works in x0 space)
        let x0 = data_prediction(
            c.prediction_type,
            self.clamp,
            model_output,
            sample.clone(),
            self.sigmas[i],
        );
        self.model_outputs.push(x0.clone());
        if self.model_outputs.len() > c.solver_order {
            self.model_outputs.remove(0);
        }
        let z = if self.is_sde() {
            Some(noise.noise(sample.dims(), &sample.device())?)
        } else {
            None
        };
        // 2. the update of the highest order the history and the schedule allow
        let order = c.solver_order;
        let prev = if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(i, x0.clone(), sample, z)
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(i, sample, z)
        } else {
            self.third_order(i, sample, z)
        };
        if self.lower_order_nums < order {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(SchedulerOutput {
            prev_sample: prev,
            pred_original_sample: Some(x0),
        })
    }

    fn reset(&mut self) {
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.step_index = None;
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.tables.alphas_cumprod
    }
}
