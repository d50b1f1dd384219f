//! Run-time choice of scheduler: [`AnyScheduler`] (an enum over every sampler) and the sampler
//! names the CLI accepts ([`SamplerName`]).

use std::fmt;
use std::str::FromStr;

use burn::tensor::Tensor;

use crate::config::{AlgorithmType, SchedulerKind, invalid};
use crate::{
    DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler, Error,
    EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler, LCMScheduler, LMSDiscreteScheduler,
    NoiseSource, PNDMScheduler, Result, Scheduler, SchedulerConfig, SchedulerOutput,
    UniPCMultistepScheduler,
};

/// The sampler names users type (`--sampler euler-a`), each a scheduler class plus settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerName {
    /// `ddpm`
    Ddpm,
    /// `ddim`
    Ddim,
    /// `pndm`
    Pndm,
    /// `lms`
    Lms,
    /// `euler`
    Euler,
    /// `euler-a`
    EulerA,
    /// `heun`
    Heun,
    /// `dpm2`
    Dpm2,
    /// `dpm2-a`
    Dpm2A,
    /// `dpm++2m`: DPM-Solver++ multistep, second order.
    DpmPp2m,
    /// `dpm++2m-sde`: SDE-DPM-Solver++ multistep, second order.
    DpmPp2mSde,
    /// `dpm++2s`: DPM-Solver++ single-step, second order.
    DpmPp2s,
    /// `unipc`
    UniPc,
    /// `lcm`
    Lcm,
}

impl SamplerName {
    /// Every name, in the order of the crate documentation's table.
    pub const ALL: [SamplerName; 14] = [
        Self::Ddpm,
        Self::Ddim,
        Self::Pndm,
        Self::Lms,
        Self::Euler,
        Self::EulerA,
        Self::Heun,
        Self::Dpm2,
        Self::Dpm2A,
        Self::DpmPp2m,
        Self::DpmPp2mSde,
        Self::DpmPp2s,
        Self::UniPc,
        Self::Lcm,
    ];

    /// The name as typed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ddpm => "ddpm",
            Self::Ddim => "ddim",
            Self::Pndm => "pndm",
            Self::Lms => "lms",
            Self::Euler => "euler",
            Self::EulerA => "euler-a",
            Self::Heun => "heun",
            Self::Dpm2 => "dpm2",
            Self::Dpm2A => "dpm2-a",
            Self::DpmPp2m => "dpm++2m",
            Self::DpmPp2mSde => "dpm++2m-sde",
            Self::DpmPp2s => "dpm++2s",
            Self::UniPc => "unipc",
            Self::Lcm => "lcm",
        }
    }

    /// The scheduler class behind the name.
    pub fn kind(self) -> SchedulerKind {
        match self {
            Self::Ddpm => SchedulerKind::Ddpm,
            Self::Ddim => SchedulerKind::Ddim,
            Self::Pndm => SchedulerKind::Pndm,
            Self::Lms => SchedulerKind::Lms,
            Self::Euler => SchedulerKind::Euler,
            Self::EulerA => SchedulerKind::EulerAncestral,
            Self::Heun => SchedulerKind::Heun,
            Self::Dpm2 => SchedulerKind::Kdpm2,
            Self::Dpm2A => SchedulerKind::Kdpm2Ancestral,
            Self::DpmPp2m | Self::DpmPp2mSde => SchedulerKind::DpmSolverMultistep,
            Self::DpmPp2s => SchedulerKind::DpmSolverSinglestep,
            Self::UniPc => SchedulerKind::UniPc,
            Self::Lcm => SchedulerKind::Lcm,
        }
    }

    /// The model's scheduler config converted for this sampler (diffusers' `from_config`), with
    /// the sampler's own settings and the options applied.
    pub fn config_from(
        self,
        model_config: &SchedulerConfig,
        options: &SamplerOptions,
    ) -> Result<SchedulerConfig> {
        let mut c = model_config.with_kind(self.kind());
        match self {
            Self::DpmPp2m | Self::DpmPp2s => {
                c.algorithm_type = AlgorithmType::DpmSolverPlusPlus;
                c.solver_order = 2;
            }
            Self::DpmPp2mSde => {
                c.algorithm_type = AlgorithmType::SdeDpmSolverPlusPlus;
                c.solver_order = 2;
            }
            Self::Pndm => c.skip_prk_steps = true,
            _ => {}
        }
        if options.karras {
            if !self.kind().supports_karras() {
                return Err(invalid(
                    "--karras",
                    self.as_str(),
                    "one of lms, euler, heun, dpm2, dpm2-a, dpm++2m, dpm++2m-sde, dpm++2s, unipc",
                ));
            }
            c.use_karras_sigmas = true;
        }
        Ok(c)
    }
}

impl fmt::Display for SamplerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SamplerName {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let lower = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|n| n.as_str() == lower)
            .ok_or_else(|| Error::UnknownSampler {
                name: s.to_string(),
                accepted: Self::ALL.map(|n| n.as_str()).join(", "),
            })
    }
}

/// Run-time sampler options: the `--karras` switch and DDIM's eta.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SamplerOptions {
    /// Use Karras sigmas (only where diffusers offers them).
    pub karras: bool,
    /// DDIM's eta (0: deterministic). Must be >= 0; only DDIM uses it.
    pub eta: f64,
}

/// Any of Kiln's schedulers, chosen at run time (by config class or by [`SamplerName`]).
#[derive(Debug, Clone)]

pub enum AnyScheduler {
    /// DDPM.
    Ddpm(DDPMScheduler),
    /// DDIM.
    Ddim(DDIMScheduler),
    /// PNDM / PLMS.
    Pndm(PNDMScheduler),
    /// LMS.
    Lms(LMSDiscreteScheduler),
    /// Euler.
    Euler(EulerDiscreteScheduler),
    /// Euler ancestral.
    EulerAncestral(EulerAncestralDiscreteScheduler),
    /// Heun.
    Heun(HeunDiscreteScheduler),
    /// KDPM2.
    Kdpm2(KDPM2DiscreteScheduler),
    /// KDPM2 ancestral.
    Kdpm2Ancestral(KDPM2AncestralDiscreteScheduler),
    /// DPM-Solver++ multistep.
    DpmSolverMultistep(DPMSolverMultistepScheduler),
    /// DPM-Solver++ single-step.
    DpmSolverSinglestep(DPMSolverSinglestepScheduler),
    /// UniPC.
    UniPc(UniPCMultistepScheduler),
    /// LCM.
    Lcm(LCMScheduler),
}

impl AnyScheduler {
    /// Builds the scheduler named by `config.kind`.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        Ok(match config.kind {
            SchedulerKind::Ddpm => Self::Ddpm(DDPMScheduler::new(config)?),
            SchedulerKind::Ddim => Self::Ddim(DDIMScheduler::new(config)?),
            SchedulerKind::Pndm => Self::Pndm(PNDMScheduler::new(config)?),
            SchedulerKind::Lms => Self::Lms(LMSDiscreteScheduler::new(config)?),
            SchedulerKind::Euler => Self::Euler(EulerDiscreteScheduler::new(config)?),
            SchedulerKind::EulerAncestral => {
                Self::EulerAncestral(EulerAncestralDiscreteScheduler::new(config)?)
            }
            SchedulerKind::Heun => Self::Heun(HeunDiscreteScheduler::new(config)?),
            SchedulerKind::Kdpm2 => Self::Kdpm2(KDPM2DiscreteScheduler::new(config)?),
            SchedulerKind::Kdpm2Ancestral => {
                Self::Kdpm2Ancestral(KDPM2AncestralDiscreteScheduler::new(config)?)
            }
            SchedulerKind::DpmSolverMultistep => {
                Self::DpmSolverMultistep(DPMSolverMultistepScheduler::new(config)?)
            }
            SchedulerKind::DpmSolverSinglestep => {
                Self::DpmSolverSinglestep(DPMSolverSinglestepScheduler::new(config)?)
            }
            SchedulerKind::UniPc => Self::UniPc(UniPCMultistepScheduler::new(config)?),
            SchedulerKind::Lcm => Self::Lcm(LCMScheduler::new(config)?),
        })
    }

    /// Builds a sampler by its CLI name from the model's scheduler config.
    pub fn from_sampler(
        name: SamplerName,
        model_config: &SchedulerConfig,
        options: SamplerOptions,
    ) -> Result<Self> {
        let mut s = Self::new(name.config_from(model_config, &options)?)?;
        match &mut s {
            Self::Ddim(d) => d.set_eta(options.eta)?,
            _ if options.eta != 0.0 => {
                return Err(invalid(
                    "eta",
                    options.eta,
                    format!("0 for `{name}` (only ddim takes eta)"),
                ));
            }
            _ => {}
        }
        Ok(s)
    }

    fn inner(&self) -> &dyn Scheduler {
        match self {
            Self::Ddpm(s) => s,
            Self::Ddim(s) => s,
            Self::Pndm(s) => s,
            Self::Lms(s) => s,
            Self::Euler(s) => s,
            Self::EulerAncestral(s) => s,
            Self::Heun(s) => s,
            Self::Kdpm2(s) => s,
            Self::Kdpm2Ancestral(s) => s,
            Self::DpmSolverMultistep(s) => s,
            Self::DpmSolverSinglestep(s) => s,
            Self::UniPc(s) => s,
            Self::Lcm(s) => s,
        }
    }

    fn inner_mut(&mut self) -> &mut dyn Scheduler {
        match self {
            Self::Ddpm(s) => s,
            Self::Ddim(s) => s,
            Self::Pndm(s) => s,
            Self::Lms(s) => s,
            Self::Euler(s) => s,
            Self::EulerAncestral(s) => s,
            Self::Heun(s) => s,
            Self::Kdpm2(s) => s,
            Self::Kdpm2Ancestral(s) => s,
            Self::DpmSolverMultistep(s) => s,
            Self::DpmSolverSinglestep(s) => s,
            Self::UniPc(s) => s,
            Self::Lcm(s) => s,
        }
    }
}

impl Scheduler for AnyScheduler {
    fn config(&self) -> &SchedulerConfig {
        self.inner().config()
    }

    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        self.inner_mut().set_timesteps(num_inference_steps)
    }

    fn timesteps(&self) -> &[f64] {
        self.inner().timesteps()
    }

    fn sigmas(&self) -> &[f32] {
        self.inner().sigmas()
    }

    fn order(&self) -> usize {
        self.inner().order()
    }

    fn init_noise_sigma(&self) -> f64 {
        self.inner().init_noise_sigma()
    }

    fn scale_model_input(&mut self, sample: Tensor<4>, timestep: f64) -> Result<Tensor<4>> {
        self.inner_mut().scale_model_input(sample, timestep)
    }

    fn step(
        &mut self,
        model_output: Tensor<4>,
        timestep: f64,
        sample: Tensor<4>,
        noise: &mut dyn NoiseSource,
    ) -> Result<SchedulerOutput> {
        self.inner_mut().step(model_output, timestep, sample, noise)
    }

    fn reset(&mut self) {
        self.inner_mut().reset()
    }

    fn alphas_cumprod(&self) -> &[f32] {
        self.inner().alphas_cumprod()
    }

    fn add_noise_coefficients(&self, timestep: f64) -> Result<(f64, f64)> {
        self.inner().add_noise_coefficients(timestep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_errors_list_choices() {
        for n in SamplerName::ALL {
            assert_eq!(n.as_str().parse::<SamplerName>().unwrap(), n);
        }
        let err = "euler_a".parse::<SamplerName>().unwrap_err();
        assert!(err.to_string().contains("euler-a"), "{err}");
        let base = SchedulerConfig::stable_diffusion(SchedulerKind::Pndm);
        let karras = SamplerOptions {
            karras: true,
            eta: 0.0,
        };
        assert!(AnyScheduler::from_sampler(SamplerName::DpmPp2m, &base, karras).is_ok());
        let err = AnyScheduler::from_sampler(SamplerName::EulerA, &base, karras).unwrap_err();
        assert!(err.to_string().contains("euler, heun"), "{err}");
        let neg = SamplerOptions {
            karras: false,
            eta: -1.0,
        };
        assert!(AnyScheduler::from_sampler(SamplerName::Ddim, &base, neg).is_err());
    }
}
