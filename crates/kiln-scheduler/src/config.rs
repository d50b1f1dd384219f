//! Scheduler configuration, read straight from diffusers' `scheduler/scheduler_config.json`.
//!
//! diffusers gives every scheduler class its own constructor defaults (DDIM spaces timesteps
//! `leading`, Euler `linspace`; DDPM clips samples, Heun does not). [`SchedulerConfig`] therefore
//! resolves a JSON file against the defaults of one [`SchedulerKind`]: the one named by
//! `_class_name` ([`SchedulerConfig::from_json`]) or another one the user picked
//! ([`SchedulerConfig::from_json_as`], what diffusers' `Scheduler.from_config(other.config)` does).
//! Unknown keys are ignored; a known key with a value of the wrong type or an unknown variant is an
//! [`Error::Json`], and values out of range are [`Error::InvalidValue`] when the scheduler is built.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The scheduler classes Kiln implements, named as diffusers' `_class_name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum SchedulerKind {
    /// `DDPMScheduler` (Ho et al. 2020), ancestral.
    #[serde(rename = "DDPMScheduler")]
    Ddpm,
    /// `DDIMScheduler` (Song et al. 2020), deterministic at `eta = 0`.
    #[serde(rename = "DDIMScheduler")]
    Ddim,
    /// `PNDMScheduler` (Liu et al. 2022): PLMS, optionally with Runge-Kutta warm-up.
    #[serde(rename = "PNDMScheduler")]
    Pndm,
    /// `LMSDiscreteScheduler`: linear multistep in sigma (Karras et al. 2022, k-diffusion).
    #[serde(rename = "LMSDiscreteScheduler")]
    Lms,
    /// `EulerDiscreteScheduler` (Karras et al. 2022, Algorithm 2 without churn).
    #[serde(rename = "EulerDiscreteScheduler")]
    Euler,
    /// `EulerAncestralDiscreteScheduler`.
    #[serde(rename = "EulerAncestralDiscreteScheduler")]
    EulerAncestral,
    /// `HeunDiscreteScheduler` (Karras et al. 2022, Algorithm 1).
    #[serde(rename = "HeunDiscreteScheduler")]
    Heun,
    /// `KDPM2DiscreteScheduler` (k-diffusion's DPM-2).
    #[serde(rename = "KDPM2DiscreteScheduler")]
    Kdpm2,
    /// `KDPM2AncestralDiscreteScheduler`.
    #[serde(rename = "KDPM2AncestralDiscreteScheduler")]
    Kdpm2Ancestral,
    /// `DPMSolverMultistepScheduler` (Lu et al. 2022, DPM-Solver++ 2M / 3M and the SDE variant).
    #[serde(rename = "DPMSolverMultistepScheduler")]
    DpmSolverMultistep,
    /// `DPMSolverSinglestepScheduler` (DPM-Solver++ 2S / 3S).
    #[serde(rename = "DPMSolverSinglestepScheduler")]
    DpmSolverSinglestep,
    /// `UniPCMultistepScheduler` (Zhao et al. 2023).
    #[serde(rename = "UniPCMultistepScheduler")]
    UniPc,
    /// `LCMScheduler` (Luo et al. 2023), for latent-consistency models.
    #[serde(rename = "LCMScheduler")]
    Lcm,
}

impl SchedulerKind {
    /// Every kind, in the order of the crate documentation's table.
    pub const ALL: [SchedulerKind; 13] = [
        Self::Ddpm,
        Self::Ddim,
        Self::Pndm,
        Self::Lms,
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
        Self::Kdpm2,
        Self::Kdpm2Ancestral,
        Self::DpmSolverMultistep,
        Self::DpmSolverSinglestep,
        Self::UniPc,
        Self::Lcm,
    ];

    /// diffusers' class name (`_class_name`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddpm => "DDPMScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::Pndm => "PNDMScheduler",
            Self::Lms => "LMSDiscreteScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Heun => "HeunDiscreteScheduler",
            Self::Kdpm2 => "KDPM2DiscreteScheduler",
            Self::Kdpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
            Self::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            Self::DpmSolverSinglestep => "DPMSolverSinglestepScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Lcm => "LCMScheduler",
        }
    }

    /// Whether diffusers offers `rescale_betas_zero_snr` for this class (the others ignore it).
    pub fn supports_zero_snr(self) -> bool {
        matches!(
            self,
            Self::Ddpm
                | Self::Ddim
                | Self::Euler
                | Self::EulerAncestral
                | Self::DpmSolverMultistep
                | Self::UniPc
                | Self::Lcm
        )
    }

    /// Whether diffusers offers `use_karras_sigmas` for this class.
    pub fn supports_karras(self) -> bool {
        matches!(
            self,
            Self::Lms
                | Self::Euler
                | Self::Heun
                | Self::Kdpm2
                | Self::Kdpm2Ancestral
                | Self::DpmSolverMultistep
                | Self::DpmSolverSinglestep
                | Self::UniPc
        )
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.class_name())
    }
}

impl FromStr for SchedulerKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|k| k.class_name() == s)
            .ok_or_else(|| Error::UnknownClass {
                name: s.to_string(),
                accepted: Self::ALL.map(|k| k.class_name()).join(", "),
            })
    }
}

/// How the training betas are laid out (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Evenly spaced from `beta_start` to `beta_end` (DDPM).
    Linear,
    /// Evenly spaced in sqrt(beta), then squared (Stable Diffusion).
    ScaledLinear,
    /// The cosine schedule of Nichol & Dhariwal 2021, betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The noise added (epsilon).
    Epsilon,
    /// The velocity `sqrt(a) * eps - sqrt(1 - a) * x0` (Salimans & Ho 2022).
    VPrediction,
    /// The clean sample x0 itself.
    Sample,
}

/// How inference timesteps are spread over the training range (`timestep_spacing`,
/// table 2 of Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `round(linspace(0, T - 1, n))`, reversed.
    Linspace,
    /// `arange(n) * (T // n) + steps_offset`, reversed.
    Leading,
    /// `round(arange(T, 0, -T / n)) - 1`.
    Trailing,
}

/// The last sigma of a sigma schedule (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmasType {
    /// End at sigma = 0 (a fully denoised sample).
    Zero,
    /// End at the training schedule's smallest sigma.
    SigmaMin,
}

/// DDPM's posterior variance (`variance_type`); only the fixed variants are supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VarianceType {
    /// beta-tilde, the posterior variance (DDPM's default).
    FixedSmall,
    /// beta-tilde, computed through its log (same value).
    FixedSmallLog,
    /// beta_t.
    FixedLarge,
    /// log(beta_t): in diffusers it yields NaN; rejected here.
    FixedLargeLog,
    /// A learned variance (model outputs twice the channels): not supported.
    Learned,
    /// A learned interpolation between the two fixed ones: not supported.
    LearnedRange,
}

/// DPM-Solver's family (`algorithm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AlgorithmType {
    /// DPM-Solver++ (data prediction), the recommended one.
    #[serde(rename = "dpmsolver++")]
    DpmSolverPlusPlus,
    /// SDE-DPM-Solver++ (stochastic; needs a noise source).
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    /// The original DPM-Solver (noise prediction): deprecated in diffusers, not supported.
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// SDE-DPM-Solver: deprecated in diffusers, not supported.
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
    /// DEIS: diffusers maps it to `dpmsolver++`, as does Kiln.
    #[serde(rename = "deis")]
    Deis,
}

/// The second-order update rule (`solver_type`): DPM-Solver's or UniPC's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SolverType {
    /// DPM-Solver: midpoint rule.
    Midpoint,
    /// DPM-Solver: Heun's rule.
    Heun,
    /// UniPC: B(h) = h.
    Bh1,
    /// UniPC: B(h) = e^h - 1.
    Bh2,
    /// An alias diffusers maps to the scheduler's default.
    Logrho,
}

/// Euler's sigma interpolation (`interpolation_type`); only `linear` is supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InterpolationType {
    /// Linear interpolation of sigma between training timesteps.
    Linear,
    /// Log-linear sigmas: not supported.
    LogLinear,
}

/// Euler's timestep type (`timestep_type`); only `discrete` is supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepType {
    /// Timesteps on the training grid (possibly fractional).
    Discrete,
    /// `0.25 * log(sigma)` timesteps (EDM-style v-prediction models): not supported.
    Continuous,
}

/// A resolved scheduler configuration: every key diffusers' constructors take, with the defaults
/// of [`SchedulerConfig::kind`] filled in.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchedulerConfig {
    /// The scheduler class (`_class_name`).
    #[serde(rename = "_class_name")]
    pub kind: SchedulerKind,
    /// Training timesteps T (default 1000).
    pub num_train_timesteps: usize,
    /// First beta of a linear / scaled-linear schedule.
    pub beta_start: f64,
    /// Last beta of a linear / scaled-linear schedule.
    pub beta_end: f64,
    /// The beta layout.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding `beta_schedule` (length must be `num_train_timesteps`).
    pub trained_betas: Option<Vec<f64>>,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// How inference timesteps are spread.
    pub timestep_spacing: TimestepSpacing,
    /// Added to `leading` timesteps (Stable Diffusion uses 1).
    pub steps_offset: usize,
    /// DDIM / PNDM / LCM: the alpha-bar after the last step is 1 (else alpha-bar at t = 0).
    pub set_alpha_to_one: bool,
    /// Clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    /// The clamp range of `clip_sample`.
    pub clip_sample_range: f64,
    /// Imagen's dynamic thresholding of the predicted x0 (pixel-space models only).
    pub thresholding: bool,
    /// The quantile of |x0| used as the threshold.
    pub dynamic_thresholding_ratio: f64,
    /// The largest threshold.
    pub sample_max_value: f64,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023); ignored, as in diffusers, by the
    /// classes without the key (PNDM, LMS, Heun, KDPM2, KDPM2 ancestral, DPM-Solver single-step).
    pub rescale_betas_zero_snr: bool,
    /// Use the Karras et al. 2022 sigma ramp (rho = 7).
    pub use_karras_sigmas: bool,
    /// Lower end of the Karras ramp (default: the schedule's smallest sigma); Euler only.
    pub sigma_min: Option<f64>,
    /// Upper end of the Karras ramp (default: the schedule's largest sigma); Euler only.
    pub sigma_max: Option<f64>,
    /// The last sigma of sigma schedules.
    pub final_sigmas_type: FinalSigmasType,
    /// DDPM's variance; DPM-Solver's learned-variance switch (`None`).
    pub variance_type: Option<VarianceType>,
    /// PNDM: skip the Runge-Kutta warm-up (PLMS only, as Stable Diffusion does).
    pub skip_prk_steps: bool,
    /// DPM-Solver / UniPC order (1 to 3).
    pub solver_order: usize,
    /// DPM-Solver's family.
    pub algorithm_type: AlgorithmType,
    /// DPM-Solver's (`midpoint`, `heun`) or UniPC's (`bh1`, `bh2`) update rule.
    pub solver_type: SolverType,
    /// Drop to lower orders on the last steps (stabilises runs under 15 steps).
    pub lower_order_final: bool,
    /// DPM-Solver multistep: first-order (Euler) final step.
    pub euler_at_final: bool,
    /// DPM-Solver: clip lambda(t) from below (for the cosine schedule, -5.1).
    pub lambda_min_clipped: f64,
    /// UniPC: predict x0 (data prediction) rather than noise.
    pub predict_x0: bool,
    /// UniPC: steps (0-based) whose corrector is skipped.
    pub disable_corrector: Vec<usize>,
    /// LCM: the step count of the distillation schedule.
    pub original_inference_steps: usize,
    /// LCM: the timestep scale of the boundary-condition coefficients.
    pub timestep_scaling: f64,
    /// Euler: sigma interpolation between training timesteps.
    pub interpolation_type: InterpolationType,
    /// Euler: timestep type.
    pub timestep_type: TimestepType,
    /// Unsupported sigma layouts; `true` is an error when the scheduler is built.
    pub use_exponential_sigmas: bool,
    /// See `use_exponential_sigmas`.
    pub use_beta_sigmas: bool,
    /// See `use_exponential_sigmas`.
    pub use_lu_lambdas: bool,
    /// See `use_exponential_sigmas` (flow-matching sigmas).
    pub use_flow_sigmas: bool,
    /// The JSON this config was read from, if any: [`SchedulerConfig::with_kind`] re-reads it
    /// for the new class, as diffusers' `from_config` does.
    #[serde(skip)]
    pub(crate) source: Option<RawConfig>,
}

/// The JSON as read: every key optional, unknown keys ignored.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub(crate) struct RawConfig {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    num_train_timesteps: Option<usize>,
    beta_start: Option<f64>,
    beta_end: Option<f64>,
    beta_schedule: Option<BetaSchedule>,
    trained_betas: Option<Vec<f64>>,
    prediction_type: Option<PredictionType>,
    timestep_spacing: Option<TimestepSpacing>,
    steps_offset: Option<usize>,
    set_alpha_to_one: Option<bool>,
    clip_sample: Option<bool>,
    clip_sample_range: Option<f64>,
    thresholding: Option<bool>,
    dynamic_thresholding_ratio: Option<f64>,
    sample_max_value: Option<f64>,
    rescale_betas_zero_snr: Option<bool>,
    use_karras_sigmas: Option<bool>,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigmas_type: Option<FinalSigmasType>,
    variance_type: Option<VarianceType>,
    skip_prk_steps: Option<bool>,
    solver_order: Option<usize>,
    algorithm_type: Option<AlgorithmType>,
    solver_type: Option<SolverType>,
    lower_order_final: Option<bool>,
    euler_at_final: Option<bool>,
    lambda_min_clipped: Option<f64>,
    predict_x0: Option<bool>,
    disable_corrector: Option<Vec<usize>>,
    original_inference_steps: Option<usize>,
    timestep_scaling: Option<f64>,
    interpolation_type: Option<InterpolationType>,
    timestep_type: Option<TimestepType>,
    use_exponential_sigmas: Option<bool>,
    use_beta_sigmas: Option<bool>,
    use_lu_lambdas: Option<bool>,
    use_flow_sigmas: Option<bool>,
}

impl SchedulerConfig {
    /// diffusers' constructor defaults for `kind`.
    pub fn new(kind: SchedulerKind) -> Self {
        use SchedulerKind as K;
        let (beta_start, beta_end, beta_schedule) = match kind {
            K::Heun => (0.00085, 0.012, BetaSchedule::Linear),
            K::Lcm => (0.00085, 0.012, BetaSchedule::ScaledLinear),
            _ => (0.0001, 0.02, BetaSchedule::Linear),
        };
        let timestep_spacing = match kind {
            K::Ddpm | K::Ddim | K::Pndm | K::Lcm => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        };
        Self {
            kind,
            num_train_timesteps: 1000,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing,
            steps_offset: 0,
            set_alpha_to_one: matches!(kind, K::Ddim | K::Lcm),
            clip_sample: matches!(kind, K::Ddpm | K::Ddim),
            clip_sample_range: 1.0,
            thresholding: false,
            dynamic_thresholding_ratio: 0.995,
            sample_max_value: 1.0,
            rescale_betas_zero_snr: false,
            use_karras_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            final_sigmas_type: FinalSigmasType::Zero,
            variance_type: matches!(kind, K::Ddpm).then_some(VarianceType::FixedSmall),
            skip_prk_steps: false,
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: if kind == K::UniPc {
                SolverType::Bh2
            } else {
                SolverType::Midpoint
            },
            lower_order_final: kind != K::DpmSolverSinglestep,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
            predict_x0: true,
            disable_corrector: Vec::new(),
            original_inference_steps: 50,
            timestep_scaling: 10.0,
            interpolation_type: InterpolationType::Linear,
            timestep_type: TimestepType::Discrete,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            source: None,
        }
    }

    /// Reads a diffusers scheduler config; the class comes from `_class_name`.
    pub fn from_json(json: &str) -> Result<Self> {
        let raw = parse_raw(json)?;
        let name = raw.class_name.clone().ok_or_else(|| Error::InvalidValue {
            key: "_class_name",
            value: "(missing)".into(),
            accepted: SchedulerKind::ALL.map(|k| k.class_name()).join(", "),
        })?;
        let kind = name.parse()?;
        Ok(Self::resolve(kind, raw))
    }

    /// Reads a diffusers scheduler config for another scheduler class, as diffusers'
    /// `Kind.from_config(config)` does: shared keys carry over, the rest take `kind`'s defaults.
    pub fn from_json_as(json: &str, kind: SchedulerKind) -> Result<Self> {
        Ok(Self::resolve(kind, parse_raw(json)?))
    }

    /// Reads `scheduler_config.json` from a file (see [`SchedulerConfig::from_json`]).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// The same config for another class, as diffusers' `Kind.from_config(config)` does.
    ///
    /// A config read from JSON is re-read for `kind`: every key present in the file that `kind`
    /// knows carries over (Stable Diffusion's `"clip_sample": false` reaches DDIM), absent keys
    /// take `kind`'s defaults (a file without `timestep_spacing` gives Euler `linspace`), and model
    /// keys changed after reading (betas, prediction type, spacing, offset, zero-SNR) carry over
    /// too. A config built in code has no file: its model keys carry over, the rest are `kind`'s
    /// defaults.
    pub fn with_kind(&self, kind: SchedulerKind) -> Self {
        let (mut out, as_read) = match &self.source {
            Some(raw) => (
                Self::resolve(kind, raw.clone()),
                Some(Self::resolve(self.kind, raw.clone())),
            ),
            None => (Self::new(kind), None),
        };
        macro_rules! model_keys {
            ($($field:ident),*) => { $(
                if as_read.as_ref().is_none_or(|r| r.$field != self.$field) {
                    out.$field = self.$field.clone();
                }
            )* };
        }
        model_keys!(
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            prediction_type,
            timestep_spacing,
            steps_offset,
            rescale_betas_zero_snr
        );
        out
    }

    /// `self` if it is already for `kind`, else [`SchedulerConfig::with_kind`].
    pub fn into_kind(self, kind: SchedulerKind) -> Self {
        if self.kind == kind {
            self
        } else {
            self.with_kind(kind)
        }
    }

    /// Sets `use_karras_sigmas`.
    pub fn with_karras_sigmas(mut self, on: bool) -> Self {
        self.use_karras_sigmas = on;
        self
    }

    /// Sets `prediction_type`.
    pub fn with_prediction_type(mut self, prediction_type: PredictionType) -> Self {
        self.prediction_type = prediction_type;
        self
    }

    /// Sets `timestep_spacing` and `steps_offset`.
    pub fn with_timestep_spacing(mut self, spacing: TimestepSpacing, steps_offset: usize) -> Self {
        self.timestep_spacing = spacing;
        self.steps_offset = steps_offset;
        self
    }

    /// Sets the beta schedule and its end points.
    pub fn with_betas(mut self, schedule: BetaSchedule, beta_start: f64, beta_end: f64) -> Self {
        self.beta_schedule = schedule;
        self.beta_start = beta_start;
        self.beta_end = beta_end;
        self
    }

    /// The Stable Diffusion 1.x / 2.x betas (scaled-linear, 0.00085 to 0.012) on `kind`'s defaults.
    pub fn stable_diffusion(kind: SchedulerKind) -> Self {
        Self::new(kind).with_betas(BetaSchedule::ScaledLinear, 0.00085, 0.012)
    }

    fn resolve(kind: SchedulerKind, raw: RawConfig) -> Self {
        let mut c = Self::new(kind);
        c.source = Some(raw.clone());
        macro_rules! take {
            ($($field:ident),* $(,)?) => { $( if let Some(v) = raw.$field { c.$field = v; } )* };
        }
        take!(
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            prediction_type,
            timestep_spacing,
            steps_offset,
            set_alpha_to_one,
            clip_sample,
            clip_sample_range,
            thresholding,
            dynamic_thresholding_ratio,
            sample_max_value,
            rescale_betas_zero_snr,
            use_karras_sigmas,
            final_sigmas_type,
            skip_prk_steps,
            solver_order,
            algorithm_type,
            solver_type,
            lower_order_final,
            euler_at_final,
            lambda_min_clipped,
            predict_x0,
            disable_corrector,
            original_inference_steps,
            timestep_scaling,
            interpolation_type,
            timestep_type,
            use_exponential_sigmas,
            use_beta_sigmas,
            use_lu_lambdas,
            use_flow_sigmas,
        );
        c.trained_betas = raw.trained_betas;
        c.sigma_min = raw.sigma_min;
        c.sigma_max = raw.sigma_max;
        if raw.variance_type.is_some() {
            c.variance_type = raw.variance_type;
        }
        c
    }

    /// Checks the values shared by every scheduler; each scheduler checks its own keys too.
    pub(crate) fn validate(&self) -> Result<()> {
        let name = self.kind.class_name();
        if self.num_train_timesteps < 2 {
            return Err(invalid(
                "num_train_timesteps",
                self.num_train_timesteps,
                "an integer >= 2",
            ));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != self.num_train_timesteps {
                return Err(invalid(
                    "trained_betas",
                    format!("{} values", betas.len()),
                    format!(
                        "exactly num_train_timesteps = {} values",
                        self.num_train_timesteps
                    ),
                ));
            }
            if let Some(b) = betas.iter().find(|b| !(**b > 0.0 && **b < 1.0)) {
                return Err(invalid("trained_betas", b, "every beta in (0, 1)"));
            }
        } else if self.beta_schedule != BetaSchedule::SquaredcosCapV2 {
            for (key, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
                if !(v > 0.0 && v < 1.0) {
                    return Err(invalid(key, v, "a number in (0, 1)"));
                }
            }
        }
        if !(self.clip_sample_range > 0.0 && self.clip_sample_range.is_finite()) {
            return Err(invalid(
                "clip_sample_range",
                self.clip_sample_range,
                "a finite number > 0",
            ));
        }
        if !(self.dynamic_thresholding_ratio > 0.0 && self.dynamic_thresholding_ratio <= 1.0) {
            return Err(invalid(
                "dynamic_thresholding_ratio",
                self.dynamic_thresholding_ratio,
                "a number in (0, 1]",
            ));
        }
        if self.sample_max_value.is_nan() || self.sample_max_value < 1.0 {
            return Err(invalid(
                "sample_max_value",
                self.sample_max_value,
                "a number >= 1",
            ));
        }
        if self.use_karras_sigmas && !self.kind.supports_karras() {
            return Err(Error::Unsupported {
                scheduler: name,
                what: "`use_karras_sigmas` (diffusers offers Karras sigmas for LMS, Euler, Heun, \
                       KDPM2, KDPM2 ancestral, DPM-Solver and UniPC)"
                    .into(),
            });
        }
        for (key, on) in [
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("use_flow_sigmas", self.use_flow_sigmas),
        ] {
            if on {
                return Err(Error::Unsupported {
                    scheduler: name,
                    what: format!("`{key}: true`"),
                });
            }
        }
        Ok(())
    }
}

fn parse_raw(json: &str) -> Result<RawConfig> {
    serde_json::from_str(&python_floats_to_null(json)).map_err(|source| Error::Json { source })
}

/// Python's `json` writes `-Infinity`, `Infinity` and `NaN` (diffusers saves
/// `"lambda_min_clipped": -Infinity`); JSON has no such tokens. Outside strings they become
/// `null`, i.e. the key's default (for `lambda_min_clipped`, -inf).
fn python_floats_to_null(json: &str) -> std::borrow::Cow<'_, str> {
    if !(json.contains("Infinity") || json.contains("NaN")) {
        return json.into();
    }
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = json;
    while let Some(c) = rest.chars().next() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|t| rest.starts_with(t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

/// An [`Error::InvalidValue`] for `key`.
pub(crate) fn invalid(
    key: &'static str,
    value: impl fmt::Display,
    accepted: impl Into<String>,
) -> Error {
    Error::InvalidValue {
        key,
        value: value.to_string(),
        accepted: accepted.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_diffusion_pndm_config_reads() {
        let json = r#"{
            "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "trained_betas": null, "clip_sample": false
        }"#;
        let c = SchedulerConfig::from_json(json).unwrap();
        assert_eq!(c.kind, SchedulerKind::Pndm);
        assert_eq!(c.beta_schedule, BetaSchedule::ScaledLinear);
        assert!(c.skip_prk_steps);
        assert_eq!(c.timestep_spacing, TimestepSpacing::Leading);
        let euler = SchedulerConfig::from_json_as(json, SchedulerKind::Euler).unwrap();
        assert_eq!(euler.kind, SchedulerKind::Euler);
        assert_eq!(euler.timestep_spacing, TimestepSpacing::Linspace);
        assert_eq!(euler.steps_offset, 1);
        // DDIM's own default clips x0; the file says not to, and that carries over
        assert!(SchedulerConfig::new(SchedulerKind::Ddim).clip_sample);
        let ddim = c.with_kind(SchedulerKind::Ddim);
        assert!(!ddim.clip_sample && !ddim.set_alpha_to_one);
        assert_eq!(ddim.beta_schedule, BetaSchedule::ScaledLinear);
        // absent from the file: the new class's default, unless changed after reading
        assert_eq!(
            c.with_kind(SchedulerKind::Euler).timestep_spacing,
            TimestepSpacing::Linspace
        );
        let trailing = c
            .clone()
            .with_timestep_spacing(TimestepSpacing::Trailing, 0);
        let euler = trailing.with_kind(SchedulerKind::Euler);
        assert_eq!(
            (euler.timestep_spacing, euler.steps_offset),
            (TimestepSpacing::Trailing, 0)
        );
    }

    #[test]
    fn serialized_config_reads_back() {
        let mut c = SchedulerConfig::stable_diffusion(SchedulerKind::DpmSolverMultistep);
        c.use_karras_sigmas = true;
        c.disable_corrector = vec![1];
        let json = serde_json::to_string(&c).unwrap();
        let back = SchedulerConfig::from_json(&json).unwrap();
        assert_eq!(
            SchedulerConfig {
                source: None,
                ..back
            },
            c
        );
    }

    #[test]
    fn bad_values_are_typed_errors() {
        let err = SchedulerConfig::from_json(r#"{"_class_name": "FancyScheduler"}"#).unwrap_err();
        assert!(matches!(err, Error::UnknownClass { .. }), "{err}");
        assert!(err.to_string().contains("DDIMScheduler"));
        let err = SchedulerConfig::from_json(
            r#"{"_class_name": "DDIMScheduler", "beta_schedule": "cubic"}"#,
        )
        .unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err}");
        let err =
            SchedulerConfig::from_json(r#"{"_class_name": "DDIMScheduler", "prediction_type": 3}"#)
                .unwrap_err();
        assert!(matches!(err, Error::Json { .. }), "{err}");
        let ok = SchedulerConfig::from_json(
            r#"{"_class_name": "DDIMScheduler", "some_future_key": [1, 2]}"#,
        );
        assert!(ok.is_ok());
    }

    #[test]
    fn python_infinity_reads_as_default() {
        let json = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                       "note": "-Infinity in a string stays"}"#;
        let c = SchedulerConfig::from_json(json).unwrap();
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
    }
}
