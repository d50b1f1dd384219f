//! The host-side tables every scheduler shares: betas, alpha-bar, sigmas, timestep spacings,
//! Karras sigmas, and the tensor helpers for x0 prediction, clipping and dynamic thresholding.
//!
//! Mirrors the helpers repeated across diffusers' [`schedulers/scheduling_*.py`][diffusers] (v0.42.1):
//! `betas_for_alpha_bar`, `rescale_zero_terminal_snr`, `_sigma_to_t`, `_convert_to_karras`,
//! `_threshold_sample`, and the `timestep_spacing` branches of `set_timesteps`.
//!
//! Precision follows diffusers where it matters for parity: betas and alpha-bar are float32
//! tensors there (torch's `cumprod` accumulates in double on the CPU and rounds each output to
//! float32, as [`alphas_cumprod`] does), and sigma schedules go through numpy float64. Tables are
//! kept as `f32` where diffusers keeps float32 and widened to `f64` for numpy's float64 math.
//!
//! [diffusers]: https://github.com/huggingface/diffusers/tree/v0.42.1/src/diffusers/schedulers

use burn::tensor::Tensor;

use crate::config::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

/// The training betas, as diffusers computes them (float32).
///
/// `linear` and `scaled_linear` follow `torch.linspace` in float32 (the first half counted up from
/// the start, the second half down from the end); `squaredcos_cap_v2` is computed in `f64` from
/// `alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2)^2` and rounded, as diffusers does.
pub fn betas(config: &SchedulerConfig) -> Vec<f32> {
    let n = config.num_train_timesteps;
    let mut betas = if let Some(trained) = &config.trained_betas {
        trained.iter().map(|&b| b as f32).collect()
    } else {
        match config.beta_schedule {
            BetaSchedule::Linear => {
                torch_linspace_f32(config.beta_start as f32, config.beta_end as f32, n)
            }
            BetaSchedule::ScaledLinear => torch_linspace_f32(
                config.beta_start.sqrt() as f32,
                config.beta_end.sqrt() as f32,
                n,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            BetaSchedule::SquaredcosCapV2 => betas_for_alpha_bar(n, 0.999),
        }
    };
    if config.rescale_betas_zero_snr && config.kind.supports_zero_snr() {
        betas = rescale_zero_terminal_snr(&betas);
    }
    betas
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// Betas from a cumulative alpha-bar function (Nichol & Dhariwal 2021, eq. 17), capped at `max_beta`.
fn betas_for_alpha_bar(n: usize, max_beta: f64) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    (0..n)
        .map(|i| {
            let t1 = i as f64 / n as f64;
            let t2 = (i + 1) as f64 / n as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(max_beta) as f32
        })
        .collect()
}

/// Rescales betas to zero terminal SNR (Lin et al. 2023, Algorithm 1), in float32 as diffusers.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let sqrt: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt[0];
    let last = sqrt[sqrt.len() - 1];
    let scale = first / (first - last);
    let bar: Vec<f32> = sqrt
        .iter()
        .map(|s| (s - last) * scale)
        .map(|s| s * s)
        .collect();
    let mut out = Vec::with_capacity(bar.len());
    out.push(1.0 - bar[0]);
    out.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}

/// `torch.cumprod` of a float32 tensor on the CPU: accumulated in `f64`, each output rounded.
fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// alpha-bar_t = prod_{s <= t} (1 - beta_s), float32 as diffusers keeps it.
///
/// With `rescale_betas_zero_snr`, `zero_snr_floor` replaces the last value (exactly 0) by 2^-24,
/// as the sigma-based schedulers do so that sigma stays finite.
pub fn alphas_cumprod(betas: &[f32], zero_snr_floor: bool) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut acp = cumprod_f32(&alphas);
    if zero_snr_floor && let Some(last) = acp.last_mut() {
        *last = 2f32.powi(-24);
    }
    acp
}

/// sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t) over the training timesteps, in float32.
pub fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// `numpy.linspace(start, stop, num)` in float64 (the last value is exactly `stop`).
pub fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 0 {
        return Vec::new();
    }
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// The first `num` values of `numpy.arange(start, stop, step)` for float arguments.
///
/// numpy fills `start + i * delta` with `delta = (start + step) - start`; its length,
/// `ceil((stop - start) / step)`, is one too many for some step counts (e.g. 61 of 1000), which
/// makes diffusers' `trailing` spacing end on timestep -1. Kiln takes exactly `num` values.
fn np_arange_first(start: f64, step: f64, num: usize) -> Vec<f64> {
    let delta = (start + step) - start;
    (0..num).map(|i| start + i as f64 * delta).collect()
}

/// The inference timesteps of the alpha-bar schedulers (DDPM, DDIM, PNDM's base grid), integers,
/// from the largest down.
pub fn spaced_timesteps(config: &SchedulerConfig, steps: usize) -> Vec<f64> {
    let t = config.num_train_timesteps;
    match config.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(f64::round_ties_even)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + config.steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => trailing(t, t as f64 / steps as f64, steps),
    }
}

/// `round(arange(start, 0, -ratio)) - 1`, `steps` values.
pub fn trailing(start: usize, ratio: f64, steps: usize) -> Vec<f64> {
    np_arange_first(start as f64, -ratio, steps)
        .into_iter()
        .map(|v| v.round_ties_even() - 1.0)
        .collect()
}

/// The inference timesteps of the sigma schedulers (LMS, Euler, Heun, KDPM2): float32 values,
/// fractional for `linspace`.
pub fn spaced_timesteps_f32(config: &SchedulerConfig, steps: usize) -> Vec<f64> {
    let t = config.num_train_timesteps;
    match config.timestep_spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|v| v as f32 as f64)
            .collect(),
        _ => spaced_timesteps(config, steps),
    }
}

/// `numpy.interp(x, arange(len(fp)), fp)` in float64.
pub fn interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    let (lo, hi) = (fp[j] as f64, fp[j + 1] as f64);
    let slope = hi - lo;
    slope * (x - j as f64) + lo
}

/// The Karras et al. 2022 (eq. 5) sigma ramp with rho = 7, `steps` values from `sigma_max` down.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// The natural log of each training sigma, float32 as numpy computes it.
pub fn log_sigmas(train_sigmas: &[f32]) -> Vec<f32> {
    train_sigmas.iter().map(|s| s.ln()).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose log-sigma is `sigma`'s,
/// interpolated linearly in log-sigma.
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low = log_sigmas
        .iter()
        .rposition(|&l| log_sigma - l as f64 >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// Which steps an alpha-bar scheduler's x0 prediction is post-processed with.
#[derive(Debug, Clone, Copy)]
pub(crate) struct X0Clamp {
    /// Dynamic thresholding: `Some((ratio, max))`.
    pub threshold: Option<(f64, f64)>,
    /// Static clipping range.
    pub clip: Option<f64>,
}

impl X0Clamp {
    /// Thresholding if `thresholding`, else clipping if `clip_sample` (diffusers' precedence).
    pub fn from_config(c: &SchedulerConfig, clip_allowed: bool) -> Self {
        if c.thresholding {
            Self {
                threshold: Some((c.dynamic_thresholding_ratio, c.sample_max_value)),
                clip: None,
            }
        } else if clip_allowed && c.clip_sample {
            Self {
                threshold: None,
                clip: Some(c.clip_sample_range),
            }
        } else {
            Self {
                threshold: None,
                clip: None,
            }
        }
    }

    /// Applies the post-processing to a predicted x0.
    pub fn apply(self, x0: Tensor<4>) -> Tensor<4> {
        if let Some((ratio, max)) = self.threshold {
            threshold_sample(x0, ratio, max)
        } else if let Some(range) = self.clip {
            x0.clamp(-range, range)
        } else {
            x0
        }
    }
}

/// Imagen's dynamic thresholding (Saharia et al. 2022, section 2.3), per batch element:
/// `s = clamp(quantile(|x|, ratio), 1, max)`, then `clamp(x, -s, s) / s`.
///
/// The quantile interpolates linearly between order statistics, as `torch.quantile` does.
///
/// # Shapes
/// `x`: `[b, c, h, w]` -> `[b, c, h, w]`.
pub fn threshold_sample(x: Tensor<4>, ratio: f64, max: f64) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let n = c * h * w;
    if b == 0 || n == 0 {
        return x;
    }
    let flat: Tensor<2> = x.reshape([b, n]); // [b, c*h*w]
    let sorted = flat.clone().abs().sort(1);
    let pos = ratio * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(n - 1);
    let frac = pos - lo as f64;
    let below = sorted.clone().narrow(1, lo, 1); // [b, 1]
    let above = sorted.narrow(1, hi, 1);
    let s = (below.clone() + (above - below).mul_scalar(frac))
        .clamp(1.0, max)
        .expand([b, n]);
    let clamped = flat.max_pair(s.clone().neg()).min_pair(s.clone()) / s;
    clamped.reshape([b, c, h, w])
}

/// x0 from a model output at alpha-bar `acp` (DDPM/DDIM eq. 12 and its v / sample variants).
pub(crate) fn x0_from_alpha(
    prediction: PredictionType,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    acp: f64,
) -> Tensor<4> {
    let (a, s) = (acp.sqrt(), (1.0 - acp).sqrt());
    match prediction {
        PredictionType::Epsilon => (sample - model_output.mul_scalar(s)).div_scalar(a),
        PredictionType::Sample => model_output,
        PredictionType::VPrediction => sample.mul_scalar(a) - model_output.mul_scalar(s),
    }
}

/// epsilon from a model output at alpha-bar `acp`, given the (unclipped) x0 where needed.
pub(crate) fn eps_from_alpha(
    prediction: PredictionType,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    x0: Tensor<4>,
    acp: f64,
) -> Tensor<4> {
    let (a, s) = (acp.sqrt(), (1.0 - acp).sqrt());
    match prediction {
        PredictionType::Epsilon => model_output,
        PredictionType::Sample => (sample - x0.mul_scalar(a)).div_scalar(s),
        PredictionType::VPrediction => model_output.mul_scalar(a) + sample.mul_scalar(s),
    }
}

/// x0 in the Karras (sigma) parameterisation, where the sample is `x0 + sigma * eps`.
pub(crate) fn x0_from_sigma(
    prediction: PredictionType,
    model_output: Tensor<4>,
    sample: Tensor<4>,
    sigma: f64,
) -> Tensor<4> {
    match prediction {
        PredictionType::Epsilon => sample - model_output.mul_scalar(sigma),
        PredictionType::Sample => model_output,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            model_output.mul_scalar(-sigma / s2.sqrt()) + sample.div_scalar(s2)
        }
    }
}

/// Finds the schedule index of `timestep` as diffusers' `index_for_timestep` does: the second
/// match if the timestep occurs twice (so img2img starting mid-schedule does not skip a sigma).
pub(crate) fn index_for_timestep(
    scheduler: &'static str,
    timesteps: &[f64],
    timestep: f64,
) -> Result<usize> {
    let hits: Vec<usize> = timesteps
        .iter()
        .enumerate()
        .filter(|(_, t)| **t == timestep)
        .map(|(i, _)| i)
        .collect();
    match hits.as_slice() {
        [] => Err(Error::UnknownTimestep {
            scheduler,
            timestep,
            accepted: format_list(timesteps),
        }),
        [only] => Ok(*only),
        [_, second, ..] => Ok(*second),
    }
}

/// A short rendering of a list of timesteps for error messages.
pub(crate) fn format_list(values: &[f64]) -> String {
    let shown: Vec<String> = values.iter().take(12).map(|v| format!("{v}")).collect();
    if values.len() > 12 {
        format!("[{}, ... ({} in all)]", shown.join(", "), values.len())
    } else {
        format!("[{}]", shown.join(", "))
    }
}

/// Checks that a model output fits the sample it belongs to.
pub(crate) fn check_same_shape(model_output: &Tensor<4>, sample: &Tensor<4>) -> Result<()> {
    if model_output.dims() != sample.dims() {
        return Err(Error::Shape(format!(
            "model output {:?} vs sample {:?} (learned-variance outputs with twice the channels are not supported)",
            model_output.dims(),
            sample.dims()
        )));
    }
    Ok(())
}

/// Checks a step count against `1..=max`.
pub(crate) fn check_steps(steps: usize, max: usize, why: &str) -> Result<()> {
    if steps == 0 || steps > max {
        return Err(Error::InvalidValue {
            key: "num_inference_steps",
            value: steps.to_string(),
            accepted: format!("1 to {max} ({why})"),
        });
    }
    Ok(())
}

/// The sigma schedule shared by LMS, Euler, Heun and KDPM2 before the final sigma is appended:
/// `(timesteps, sigmas)`, both in float64 as numpy holds them.
///
/// Sigmas are the training sigmas interpolated at the spaced timesteps; with `use_karras_sigmas`
/// they are replaced by the Karras ramp between `sigma_bounds` (default: the interpolated ends)
/// and the timesteps by the matching fractional training timesteps.
pub fn discrete_sigma_schedule(
    config: &SchedulerConfig,
    alphas_cumprod: &[f32],
    steps: usize,
    sigma_bounds: (Option<f64>, Option<f64>),
) -> (Vec<f64>, Vec<f64>) {
    let train = train_sigmas(alphas_cumprod);
    let mut timesteps = spaced_timesteps_f32(config, steps);
    let mut sigmas: Vec<f64> = timesteps.iter().map(|&t| interp_index(t, &train)).collect();
    if config.use_karras_sigmas {
        let log = log_sigmas(&train);
        let smin = sigma_bounds.0.unwrap_or(sigmas[sigmas.len() - 1]);
        let smax = sigma_bounds.1.unwrap_or(sigmas[0]);
        sigmas = karras_sigmas(smin, smax, steps);
        timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log)).collect();
    }
    (timesteps, sigmas)
}

/// `init_noise_sigma` of the sigma schedulers: the largest sigma, or sqrt(sigma_max^2 + 1) with
/// `leading` spacing (float32, as diffusers computes it from its float32 sigma tensor).
pub fn sigma_init_noise(config: &SchedulerConfig, sigmas: &[f32]) -> f64 {
    let max = sigmas.iter().copied().fold(0.0f32, f32::max);
    match config.timestep_spacing {
        TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        _ => max as f64,
    }
}

/// Looks up (on the first call) or returns the current step index of an index-based scheduler.
pub(crate) fn init_step_index(
    step_index: &mut Option<usize>,
    scheduler: &'static str,
    timesteps: &[f64],
    timestep: f64,
) -> Result<usize> {
    if timesteps.is_empty() {
        return Err(Error::NotInitialized {
            scheduler,
            call: "step",
        });
    }
    let idx = match *step_index {
        Some(i) => i,
        None => index_for_timestep(scheduler, timesteps, timestep)?,
    };
    if idx >= timesteps.len() {
        return Err(Error::Exhausted {
            scheduler,
            steps: timesteps.len(),
        });
    }
    *step_index = Some(idx);
    Ok(idx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SchedulerKind;

    #[test]
    fn trailing_has_exactly_n_steps() {
        let c = SchedulerConfig::new(SchedulerKind::Ddim)
            .with_timestep_spacing(TimestepSpacing::Trailing, 0);
        for n in [1, 61, 103, 1000] {
            let ts = spaced_timesteps(&c, n);
            assert_eq!(ts.len(), n);
            assert!(ts.iter().all(|t| (0.0..1000.0).contains(t)), "{n}: {ts:?}");
        }
    }

    #[test]
    fn numpy_rounding_is_half_to_even() {
        let c = SchedulerConfig::new(SchedulerKind::Ddim)
            .with_timestep_spacing(TimestepSpacing::Trailing, 0);
        // 1000 - 62.5 i: 937.5 rounds to 938 (even), 812.5 to 812.
        assert_eq!(spaced_timesteps(&c, 16)[..4], [999.0, 937.0, 874.0, 811.0]);
    }
}
