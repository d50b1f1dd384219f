//! Noise schedulers (samplers) for Kiln, numerically matching diffusers 0.42.1.
//!
//! Pure math on tensors: nothing here knows a model. A scheduler serves inference (turn a model's
//! prediction into the next, less noisy sample) and training (forward noising with
//! [`Scheduler::add_noise`], the v-prediction target with [`Scheduler::velocity`]). Schedule
//! tables are computed once on the host, in the precision diffusers uses; per-step math runs as
//! burn tensor ops on whatever device the sample lives on.
//!
//! # Which sampler?
//!
//! | CLI name      | diffusers class                                   | steps for a good image | kind          | notes |
//! |---------------|---------------------------------------------------|------------------------|---------------|-------|
//! | `dpm++2m`     | `DPMSolverMultistepScheduler`                     | 15-30                  | deterministic | the usual default; `--karras` helps at low step counts |
//! | `unipc`       | `UniPCMultistepScheduler`                         | 10-25                  | deterministic | predictor-corrector; strongest at very few steps |
//! | `euler`       | `EulerDiscreteScheduler`                          | 20-40                  | deterministic | simple, robust; `--karras` supported |
//! | `euler-a`     | `EulerAncestralDiscreteScheduler`                 | 20-40                  | ancestral     | varied, soft results; does not converge as steps grow |
//! | `dpm++2m-sde` | `DPMSolverMultistepScheduler` (`sde-dpmsolver++`) | 20-40                  | stochastic    | detailed; pair with `--karras` |
//! | `dpm++2s`     | `DPMSolverSinglestepScheduler`                    | 15-30                  | deterministic | single-step: restarts from each pair's first sample |
//! | `heun`        | `HeunDiscreteScheduler`                           | 15-30 (x2 calls)       | deterministic | second order: two model calls per step |
//! | `dpm2`        | `KDPM2DiscreteScheduler`                          | 15-30 (x2 calls)       | deterministic | second order: two model calls per step |
//! | `dpm2-a`      | `KDPM2AncestralDiscreteScheduler`                 | 15-30 (x2 calls)       | ancestral     | second order with fresh noise |
//! | `lms`         | `LMSDiscreteScheduler`                            | 30-50                  | deterministic | can be unstable below ~20 steps |
//! | `ddim`        | `DDIMScheduler`                                   | 30-50                  | deterministic | `eta > 0` makes it stochastic; exact inversion at eta 0 |
//! | `pndm`        | `PNDMScheduler`                                   | 30-50                  | deterministic | Stable Diffusion 1.x's shipped default (PLMS) |
//! | `lcm`         | `LCMScheduler`                                    | 2-8                    | stochastic    | only for latent-consistency (LCM / LCM-LoRA) models |
//! | `ddpm`        | `DDPMScheduler`                                   | 250-1000               | ancestral     | the training-time reference; slow for inference |
//!
//! "Deterministic" samplers give the same image for the same seed and step count; ancestral and
//! SDE samplers add fresh noise each step, taken from a caller-supplied [`NoiseSource`] (host-side
//! [`SeededNoise`] is reproducible on every backend). `--karras` uses the Karras et al. 2022 sigma
//! ramp where diffusers offers it (LMS, Euler, Heun, DPM2, DPM2-a, DPM-Solver, UniPC).
//!
//! # Parity and deviations
//!
//! Every sampler and config option is checked against trajectories recorded from diffusers
//! 0.42.1 (`xtask/fixtures/schedulers.py`, `tests/parity.rs`): each step within 1e-5 relative in
//! f32 (1e-4 for zero-terminal-SNR sigma schedules, which start at sigma = 4096 where float32
//! itself only holds 2e-5). Where diffusers would break, Kiln deliberately differs:
//!
//! - `trailing` spacing always yields exactly `n` timesteps (numpy's float `arange` makes one too
//!   many for some `n`, e.g. 61 of 1000, ending diffusers' schedule on timestep -1);
//! - DPM-Solver and UniPC refuse `linspace` / `leading` step counts of `T` or more, where
//!   diffusers' grids repeat timesteps;
//! - UniPC skips the (empty) `B(h)` correction of a first-order step, so `bh1` ends finite at
//!   sigma = 0, and refuses the combinations diffusers turns into NaN (`predict_x0: false` or
//!   `lower_order_final: false` with `final_sigmas_type: zero`);
//! - [`Scheduler::velocity`] always uses alpha-bar at the training timestep (diffusers' sigma
//!   schedulers index alpha-bar by step index there);
//! - LMS integrates its (polynomial) coefficients exactly instead of with `scipy.integrate.quad`.
//!
//! Not offered (typed errors): learned variances, `s_churn`, exponential / beta / flow / Lu
//! sigmas, dynamic shifting, Euler's `log_linear` interpolation and `continuous` timesteps, the
//! deprecated `dpmsolver` / `sde-dpmsolver` algorithms, UniPC's `solver_p`, custom timestep lists.
//!
//! # Use
//!
//! ```no_run
//! use burn::tensor::{Device, Tensor};
//! use kiln_scheduler::{
//!     AnyScheduler, NoiseSource, SamplerName, SamplerOptions, Scheduler, SchedulerConfig, SeededNoise,
//! };
//!
//! # fn unet(x: Tensor<4>, _t: f64) -> Tensor<4> { x }
//! # fn main() -> kiln_scheduler::Result<()> {
//! // the model's scheduler_config.json, then the sampler the user asked for
//! let model_config = SchedulerConfig::from_file("sd15/scheduler/scheduler_config.json")?;
//! let options = SamplerOptions { karras: true, ..SamplerOptions::default() };
//! let sampler: SamplerName = "dpm++2m-sde".parse()?;
//! let mut scheduler = AnyScheduler::from_sampler(sampler, &model_config, options)?;
//! scheduler.set_timesteps(25)?;
//!
//! let device = Device::default();
//! let mut noise = SeededNoise::new(42);
//! let mut x = noise.noise([1, 4, 64, 64], &device)?.mul_scalar(scheduler.init_noise_sigma());
//! for t in scheduler.timesteps().to_vec() {
//!     let input = scheduler.scale_model_input(x.clone(), t)?;
//!     let eps = unet(input, t);
//!     x = scheduler.step(eps, t, x, &mut noise)?.prev_sample;
//! }
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

mod any;
pub mod config;
mod error;
pub mod noise;
pub mod scheduling_ddim;
pub mod scheduling_ddpm;
pub mod scheduling_dpmsolver_multistep;
pub mod scheduling_dpmsolver_singlestep;
pub mod scheduling_euler_ancestral_discrete;
pub mod scheduling_euler_discrete;
pub mod scheduling_heun_discrete;
pub mod scheduling_k_dpm_2_ancestral_discrete;
pub mod scheduling_k_dpm_2_discrete;
pub mod scheduling_lcm;
pub mod scheduling_lms_discrete;
pub mod scheduling_pndm;
pub mod scheduling_unipc_multistep;
pub mod scheduling_utils;
mod sigma_schedule;

use burn::tensor::{Tensor, TensorData};

pub use any::{AnyScheduler, SamplerName, SamplerOptions};
pub use config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, SchedulerKind,
    SolverType, TimestepSpacing, VarianceType,
};
pub use error::{Error, Result};
pub use noise::{NoNoise, NoiseSource, QueuedNoise, SeededNoise};
pub use scheduling_ddim::DDIMScheduler;
pub use scheduling_ddpm::DDPMScheduler;
pub use scheduling_dpmsolver_multistep::DPMSolverMultistepScheduler;
pub use scheduling_dpmsolver_singlestep::DPMSolverSinglestepScheduler;
pub use scheduling_euler_ancestral_discrete::EulerAncestralDiscreteScheduler;
pub use scheduling_euler_discrete::EulerDiscreteScheduler;
pub use scheduling_heun_discrete::HeunDiscreteScheduler;
pub use scheduling_k_dpm_2_ancestral_discrete::KDPM2AncestralDiscreteScheduler;
pub use scheduling_k_dpm_2_discrete::KDPM2DiscreteScheduler;
pub use scheduling_lcm::LCMScheduler;
pub use scheduling_lms_discrete::LMSDiscreteScheduler;
pub use scheduling_pndm::PNDMScheduler;
pub use scheduling_unipc_multistep::UniPCMultistepScheduler;

/// What one [`Scheduler::step`] returns.
#[derive(Debug, Clone)]
pub struct SchedulerOutput {
    /// The sample for the next model call (x_{t-1}).
    pub prev_sample: Tensor<4>,
    /// The scheduler's estimate of the clean sample x0 at this step, where it has one (PNDM has
    /// none; LCM returns its `denoised`; DPM-Solver++ and UniPC their converted data prediction).
    pub pred_original_sample: Option<Tensor<4>>,
}

/// A noise scheduler: the part of a diffusion pipeline that is pure math.
///
/// Call [`set_timesteps`](Scheduler::set_timesteps), start from noise times
/// [`init_noise_sigma`](Scheduler::init_noise_sigma), and for each `t` in
/// [`timesteps`](Scheduler::timesteps) call [`scale_model_input`](Scheduler::scale_model_input),
/// the model, then [`step`](Scheduler::step). Second-order samplers (Heun, DPM2) list each
/// intermediate timestep, so the loop stays the same.
///
/// Latents are `[batch, channels, height, width]`.
pub trait Scheduler {
    /// The resolved configuration.
    fn config(&self) -> &SchedulerConfig;

    /// Computes the inference schedule for `num_inference_steps` and resets all state.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timesteps to call the model at, in order (one per model call).
    fn timesteps(&self) -> &[f64];

    /// The sigmas of sigma-based schedulers (one more than model calls), else empty.
    fn sigmas(&self) -> &[f32] {
        &[]
    }

    /// Model calls per denoising step, as diffusers' `order` counts them: 2 for the second-order
    /// samplers whose [`timesteps`](Self::timesteps) list two calls per step (Heun, KDPM2 and
    /// its ancestral form), 1 for the rest. img2img's strength cut skips `order` entries per
    /// skipped step.
    fn order(&self) -> usize {
        1
    }

    /// The factor for the initial Gaussian noise.
    fn init_noise_sigma(&self) -> f64;

    /// Scales the sample for the model at `timestep` (a no-op for the alpha-bar schedulers).
    fn scale_model_input(&mut self, sample: Tensor<4>, timestep: f64) -> Result<Tensor<4>>;

    /// One denoising step: from the model's output at `timestep` and the current `sample`, the
    /// previous (less noisy) sample. Stochastic samplers draw from `noise`.
    fn step(
        &mut self,
        model_output: Tensor<4>,
        timestep: f64,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerOutput>;

    /// Forgets the multistep history and step index, keeping the timesteps (to reuse the schedule).
    fn reset(&mut self);

    /// The training alpha-bar table (float32, as diffusers keeps it).
    fn alphas_cumprod(&self) -> &[f32];

    /// The coefficients `(a, b)` with `add_noise(x0, noise, t) = a * x0 + b * noise`.
    ///
    /// Alpha-bar schedulers: `(sqrt(alpha-bar_t), sqrt(1 - alpha-bar_t))` for an integer training
    /// timestep; sigma schedulers: `(1, sigma)` for a timestep on the current schedule.
    fn add_noise_coefficients(&self, timestep: f64) -> Result<(f64, f64)> {
        let acp = train_alpha(self.alphas_cumprod(), timestep)?;
        Ok((acp.sqrt(), (1.0 - acp).sqrt()))
    }

    /// Forward noising (training, img2img): `a_t * x0 + b_t * noise`, one timestep per batch
    /// element (or one for all).
    ///
    /// # Shapes
    /// `original`, `noise`: `[b, c, h, w]`; `timesteps`: `b` or 1 values -> `[b, c, h, w]`.
    fn add_noise(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>> {
        if original.dims() != noise.dims() {
            return Err(Error::Shape(format!(
                "x0 {:?} vs noise {:?}",
                original.dims(),
                noise.dims()
            )));
        }
        let coeffs = timesteps
            .iter()
            .map(|&t| self.add_noise_coefficients(t))
            .collect::<Result<Vec<_>>>()?;
        let (a, b): (Vec<f64>, Vec<f64>) = coeffs.into_iter().unzip();
        let dims = original.dims();
        let a = per_batch(&a, dims, &original)?;
        let b = per_batch(&b, dims, &original)?;
        Ok(original * a + noise * b)
    }

    /// The v-prediction target `sqrt(alpha-bar_t) * noise - sqrt(1 - alpha-bar_t) * x0` at
    /// training timesteps (diffusers' `get_velocity`), one per batch element (or one for all).
    ///
    /// # Shapes
    /// `original`, `noise`: `[b, c, h, w]`; `timesteps`: `b` or 1 values -> `[b, c, h, w]`.
    fn velocity(
        &self,
        original: Tensor<4>,
        noise: Tensor<4>,
        timesteps: &[f64],
    ) -> Result<Tensor<4>> {
        if original.dims() != noise.dims() {
            return Err(Error::Shape(format!(
                "x0 {:?} vs noise {:?}",
                original.dims(),
                noise.dims()
            )));
        }
        let acp = timesteps
            .iter()
            .map(|&t| train_alpha(self.alphas_cumprod(), t))
            .collect::<Result<Vec<_>>>()?;
        let a: Vec<f64> = acp.iter().map(|v| v.sqrt()).collect();
        let b: Vec<f64> = acp.iter().map(|v| (1.0 - v).sqrt()).collect();
        let dims = original.dims();
        let a = per_batch(&a, dims, &original)?;
        let b = per_batch(&b, dims, &original)?;
        Ok(noise * a - original * b)
    }
}

/// alpha-bar at an integer training timestep, as f64 from the float32 table.
fn train_alpha(acp: &[f32], timestep: f64) -> Result<f64> {
    let idx = timestep as usize;
    if timestep.fract() != 0.0 || timestep < 0.0 || idx >= acp.len() {
        return Err(Error::InvalidValue {
            key: "timestep",
            value: timestep.to_string(),
            accepted: format!("an integer training timestep in 0..={}", acp.len() - 1),
        });
    }
    Ok(acp[idx] as f64)
}

/// A `[b, c, h, w]` tensor holding `values[i]` across batch element `i` (or `values[0]` for all).
fn per_batch(values: &[f64], dims: [usize; 4], like: &Tensor<4>) -> Result<Tensor<4>> {
    let [b, c, h, w] = dims;
    let values: Vec<f32> = match values.len() {
        1 => vec![values[0] as f32; b],
        n if n == b => values.iter().map(|v| *v as f32).collect(),
        n => return Err(Error::Shape(format!("{n} timesteps for a batch of {b}"))),
    };
    let t: Tensor<4> = Tensor::from_data(TensorData::new(values, [b, 1, 1, 1]), &like.device());
    Ok(t.expand([b, c, h, w]))
}
