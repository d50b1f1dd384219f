//! Property tests (proptest): schedules stay in range and ordered for every step count and
//! spacing, forward noising is exactly invertible, tables are monotone, nothing turns NaN.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::{device, host, model};
use kiln_scheduler::{
    AnyScheduler, BetaSchedule, Error, NoNoise, Scheduler, SchedulerConfig, SchedulerKind,
    SeededNoise, TimestepSpacing,
};
use proptest::prelude::*;

const SPACINGS: [TimestepSpacing; 3] = [
    TimestepSpacing::Linspace,
    TimestepSpacing::Leading,
    TimestepSpacing::Trailing,
];

/// Kinds whose timestep list repeats entries by design: PNDM (PLMS repeats its second
/// timestep), Heun (each intermediate point is listed twice), KDPM2 ancestral (its midpoint
/// sigma sqrt(sigma_i * sigma_down) equals sigma_{i+1} exactly in real arithmetic, so each
/// intermediate timestep is the next timestep up to float32 rounding, either side of it).
fn repeats_by_design(kind: SchedulerKind) -> bool {
    matches!(
        kind,
        SchedulerKind::Pndm | SchedulerKind::Heun | SchedulerKind::Kdpm2Ancestral
    )
}

/// Kinds that look their sigmas up by interpolation, clamped at the schedule's ends: with
/// `leading` spacing, `steps_offset` 1 and 1000 steps their first timestep is 1000 (one past the
/// last training step), exactly as diffusers 0.42.1 gives it (`timesteps[0] == 1000`, sigma that
/// of 999); the samplers that index `alphas_cumprod` refuse that case instead.
fn interpolates_sigmas(kind: SchedulerKind) -> bool {
    matches!(
        kind,
        SchedulerKind::Lms
            | SchedulerKind::Euler
            | SchedulerKind::EulerAncestral
            | SchedulerKind::Heun
            | SchedulerKind::Kdpm2
            | SchedulerKind::Kdpm2Ancestral
    )
}

fn config(kind: SchedulerKind, spacing: TimestepSpacing, offset: usize) -> SchedulerConfig {
    let mut c = SchedulerConfig::stable_diffusion(kind).with_timestep_spacing(spacing, offset);
    c.skip_prk_steps = true;
    c
}

fn tensor(values: &[f32], device: &burn::tensor::Device) -> Tensor<4> {
    Tensor::from_data(TensorData::new(values.to_vec(), [1, 4, 2, 2]), device)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// For any step count and spacing, timesteps lie in [0, T) and decrease (strictly, except
    /// where a sampler repeats a timestep by design); the first steps give finite samples.
    #[test]
    fn schedules_are_in_range_and_decreasing(
        kind_idx in 0usize..13,
        spacing_idx in 0usize..3,
        offset in 0usize..2,
        steps in 1usize..=1000,
        seed in any::<u64>(),
    ) {
        let kind = SchedulerKind::ALL[kind_idx];
        let max = if kind == SchedulerKind::Lcm { 50 } else { 1000 };
        let steps = 1 + (steps - 1) % max;
        let mut s = AnyScheduler::new(config(kind, SPACINGS[spacing_idx], offset)).unwrap();
        match s.set_timesteps(steps) {
            Ok(()) => {}
            // a few combinations are refused up front, with the accepted range in the message
            Err(Error::InvalidValue { accepted, .. }) => {
                prop_assert!(offset == 1 || steps >= 999, "{kind}: {steps} steps refused: {accepted}");
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("{kind}: {e}"))),
        }
        let ts = s.timesteps().to_vec();
        prop_assert!(!ts.is_empty());
        let past_end = interpolates_sigmas(kind) && offset == 1;
        let in_range = |t: f64| t.is_finite() && t >= 0.0 && (t < 1000.0 || (past_end && t == 1000.0));
        prop_assert!(ts.iter().all(|&t| in_range(t)), "{kind}: {ts:?}");
        for w in ts.windows(2) {
            if repeats_by_design(kind) {
                prop_assert!(w[1] <= w[0] + 1e-3, "{kind} {steps}: {ts:?}");
            } else {
                prop_assert!(w[1] < w[0], "{kind} {steps} {:?}: {ts:?}", SPACINGS[spacing_idx]);
            }
        }
        prop_assert!(s.sigmas().iter().all(|v| v.is_finite()));
        prop_assert!(s.init_noise_sigma().is_finite());

        let dev = device();
        let mut rng = SeededNoise::new(seed);
        let init: Vec<f32> = (0..16).map(|_| rng.next_normal() as f32).collect();
        let mut x = tensor(&init, &dev).mul_scalar(s.init_noise_sigma());
        for &t in ts.iter().take(3) {
            let input = s.scale_model_input(x.clone(), t).unwrap();
            let out = s.step(model(input, t), t, x, &mut rng).unwrap();
            prop_assert!(host(&out.prev_sample).iter().all(|v| v.is_finite()), "{kind} at t = {t}");
            if let Some(x0) = &out.pred_original_sample {
                prop_assert!(host(x0).iter().all(|v| v.is_finite()));
            }
            x = out.prev_sample;
        }
    }

    /// `add_noise` followed by the exact inverse with the true noise gives back x0.
    #[test]
    fn add_noise_inverts(kind_idx in 0usize..13, t in 0usize..1000, steps in 2usize..60, seed in any::<u64>()) {
        let kind = SchedulerKind::ALL[kind_idx];
        let mut s = AnyScheduler::new(config(kind, TimestepSpacing::Leading, 1)).unwrap();
        s.set_timesteps(steps.min(if kind == SchedulerKind::Lcm { 50 } else { 1000 })).unwrap();
        // alpha-bar schedulers noise at any training timestep; sigma schedulers at scheduled ones
        let timestep = if s.add_noise_coefficients(t as f64).is_ok() {
            t as f64
        } else {
            s.timesteps()[t % s.timesteps().len()]
        };
        let (a, b) = s.add_noise_coefficients(timestep).unwrap();
        let dev = device();
        let mut rng = SeededNoise::new(seed);
        let x0: Vec<f32> = (0..16).map(|_| rng.next_normal() as f32).collect();
        let n: Vec<f32> = (0..16).map(|_| rng.next_normal() as f32).collect();
        let noisy = s.add_noise(tensor(&x0, &dev), tensor(&n, &dev), &[timestep]).unwrap();
        let back = (noisy - tensor(&n, &dev).mul_scalar(b)).div_scalar(a);
        let tol = 1e-5 * (1.0 + b / a);
        for (got, want) in host(&back).iter().zip(&x0) {
            prop_assert!(((got - want) as f64).abs() <= tol * (1.0 + want.abs() as f64), "{kind} t={timestep}: {got} vs {want}");
        }
        let v = s.velocity(tensor(&x0, &dev), tensor(&n, &dev), &[t as f64]).unwrap();
        prop_assert!(host(&v).iter().all(|x| x.is_finite()));
    }

    /// alpha-bar decreases and the training sigmas increase with t; inference sigmas never grow.
    #[test]
    fn tables_are_monotone(
        kind_idx in 0usize..13,
        schedule_idx in 0usize..3,
        zero_snr in any::<bool>(),
        karras in any::<bool>(),
        steps in 1usize..50,
    ) {
        let kind = SchedulerKind::ALL[kind_idx];
        let schedule = [BetaSchedule::Linear, BetaSchedule::ScaledLinear, BetaSchedule::SquaredcosCapV2][schedule_idx];
        let mut c = SchedulerConfig::new(kind).with_betas(schedule, 0.00085, 0.012);
        c.rescale_betas_zero_snr = zero_snr;
        c.use_karras_sigmas = karras && kind.supports_karras();
        c.skip_prk_steps = true;
        let mut s = AnyScheduler::new(c).unwrap();
        let acp = s.alphas_cumprod().to_vec();
        prop_assert!(acp.windows(2).all(|w| w[1] <= w[0]), "{kind}: alpha-bar not decreasing");
        prop_assert!(acp.iter().all(|a| a.is_finite() && *a >= 0.0 && *a <= 1.0));
        let train: Vec<f32> = acp.iter().filter(|a| **a > 0.0).map(|a| ((1.0 - a) / a).sqrt()).collect();
        prop_assert!(train.windows(2).all(|w| w[1] >= w[0]), "{kind}: training sigmas not increasing");
        s.set_timesteps(steps).unwrap();
        let sigmas = s.sigmas();
        prop_assert!(sigmas.iter().all(|v| v.is_finite()), "{kind}: {sigmas:?}");
        prop_assert!(sigmas.windows(2).all(|w| w[1] <= w[0]), "{kind}: {sigmas:?}");
    }
}

#[test]
fn one_step_schedules_run() {
    let dev = device();
    for kind in SchedulerKind::ALL {
        for spacing in SPACINGS {
            let mut s = AnyScheduler::new(config(kind, spacing, 1)).unwrap();
            s.set_timesteps(1).unwrap();
            let mut x = tensor(&[0.3; 16], &dev).mul_scalar(s.init_noise_sigma());
            let mut noise = SeededNoise::new(1);
            for t in s.timesteps().to_vec() {
                let input = s.scale_model_input(x.clone(), t).unwrap();
                x = s
                    .step(model(input, t), t, x, &mut noise)
                    .unwrap()
                    .prev_sample;
            }
            assert!(host(&x).iter().all(|v| v.is_finite()), "{kind} {spacing:?}");
        }
    }
}

#[test]
fn deterministic_samplers_need_no_noise_and_reset_reproduces() {
    let dev = device();
    let mut s = AnyScheduler::new(SchedulerConfig::stable_diffusion(
        SchedulerKind::DpmSolverMultistep,
    ))
    .unwrap();
    s.set_timesteps(6).unwrap();
    let run = |s: &mut AnyScheduler| {
        let mut x = tensor(&[0.7; 16], &dev);
        for t in s.timesteps().to_vec() {
            let input = s.scale_model_input(x.clone(), t).unwrap();
            x = s
                .step(model(input, t), t, x, &mut NoNoise)
                .unwrap()
                .prev_sample;
        }
        host(&x)
    };
    let first = run(&mut s);
    s.reset();
    assert_eq!(first, run(&mut s));
    let mut sde_config = SchedulerConfig::stable_diffusion(SchedulerKind::DpmSolverMultistep);
    sde_config.algorithm_type = kiln_scheduler::AlgorithmType::SdeDpmSolverPlusPlus;
    let mut sde = AnyScheduler::new(sde_config).unwrap();
    sde.set_timesteps(4).unwrap();
    let t = sde.timesteps()[0];
    let err = sde
        .step(
            tensor(&[0.1; 16], &dev),
            t,
            tensor(&[0.1; 16], &dev),
            &mut NoNoise,
        )
        .unwrap_err();
    assert!(matches!(err, Error::Noise(_)), "{err}");
}

#[test]
fn bad_values_are_typed_errors_with_ranges() {
    let mut s = AnyScheduler::new(SchedulerConfig::new(SchedulerKind::Euler)).unwrap();
    let err = s.set_timesteps(0).unwrap_err();
    assert!(err.to_string().contains("1 to 1000"), "{err}");
    let mut lcm = AnyScheduler::new(SchedulerConfig::new(SchedulerKind::Lcm)).unwrap();
    let err = lcm.set_timesteps(51).unwrap_err();
    assert!(err.to_string().contains("1 to 50"), "{err}");
    let mut c = SchedulerConfig::new(SchedulerKind::DpmSolverMultistep);
    c.solver_order = 4;
    let err = AnyScheduler::new(c).unwrap_err();
    assert!(err.to_string().contains("1, 2 or 3"), "{err}");
    let mut c = SchedulerConfig::new(SchedulerKind::Ddim);
    c.beta_start = -0.1;
    assert!(matches!(
        AnyScheduler::new(c).unwrap_err(),
        Error::InvalidValue {
            key: "beta_start",
            ..
        }
    ));
    let mut ddim = AnyScheduler::new(SchedulerConfig::new(SchedulerKind::Ddim)).unwrap();
    let err = ddim
        .step(
            tensor(&[0.0; 16], &device()),
            10.0,
            tensor(&[0.0; 16], &device()),
            &mut NoNoise,
        )
        .unwrap_err();
    assert!(matches!(err, Error::NotInitialized { .. }), "{err}");
    ddim.set_timesteps(10).unwrap();
    let wide = Tensor::<4>::zeros([1, 8, 2, 2], &device());
    let err = ddim
        .step(wide, 901.0, tensor(&[0.0; 16], &device()), &mut NoNoise)
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err}");
    let mut ddpm = AnyScheduler::new(SchedulerConfig::new(SchedulerKind::Ddpm)).unwrap();
    ddpm.set_timesteps(10).unwrap();
    let zeros = || tensor(&[0.0; 16], &device());
    let err = ddpm
        .step(zeros(), 905.0, zeros(), &mut NoNoise)
        .unwrap_err();
    assert!(matches!(err, Error::UnknownTimestep { .. }), "{err}");
    assert!(err.to_string().contains("900"), "{err}");
    let err = ddim
        .add_noise(
            tensor(&[0.0; 16], &device()),
            tensor(&[0.0; 16], &device()),
            &[1000.0],
        )
        .unwrap_err();
    assert!(err.to_string().contains("0..=999"), "{err}");
}

#[test]
fn unipc_bh1_ends_finite_at_sigma_zero() {
    // diffusers yields NaN here (0 * inf in the empty B(h) term of the last, first-order step)
    let mut c = SchedulerConfig::stable_diffusion(SchedulerKind::UniPc);
    c.solver_type = kiln_scheduler::SolverType::Bh1;
    let mut s = AnyScheduler::new(c).unwrap();
    s.set_timesteps(5).unwrap();
    let dev = device();
    let mut x = tensor(&[0.4; 16], &dev);
    for t in s.timesteps().to_vec() {
        x = s
            .step(model(x.clone(), t), t, x, &mut NoNoise)
            .unwrap()
            .prev_sample;
    }
    assert!(host(&x).iter().all(|v| v.is_finite()));
}

#[test]
fn every_cli_sampler_runs_from_the_stable_diffusion_config() {
    // Stable Diffusion 1.x's scheduler/scheduler_config.json, as shipped
    let json = r#"{"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1, "trained_betas": null,
        "clip_sample": false}"#;
    let model_config = SchedulerConfig::from_json(json).unwrap();
    let dev = device();
    for name in kiln_scheduler::SamplerName::ALL {
        for karras in [false, true] {
            if karras && !name.kind().supports_karras() {
                continue;
            }
            let options = kiln_scheduler::SamplerOptions { karras, eta: 0.0 };
            let mut s = AnyScheduler::from_sampler(name, &model_config, options).unwrap();
            assert!(
                !s.config().clip_sample,
                "{name}: the file's clip_sample: false carries over"
            );
            s.set_timesteps(8).unwrap();
            let mut noise = SeededNoise::new(7);
            let mut x = tensor(&[0.5; 16], &dev).mul_scalar(s.init_noise_sigma());
            for t in s.timesteps().to_vec() {
                let input = s.scale_model_input(x.clone(), t).unwrap();
                x = s
                    .step(model(input, t), t, x, &mut noise)
                    .unwrap()
                    .prev_sample;
            }
            assert!(
                host(&x).iter().all(|v| v.is_finite()),
                "{name} karras={karras}"
            );
        }
    }
}

/// The corner the range property above allows: diffusers 0.42.1's Euler and LMS with `leading`
/// spacing, `steps_offset` 1 and 1000 steps start at timestep 1000 with the sigma of 999
/// (14.6146...), their interpolation clamped; Kiln gives the same.
#[test]
fn sigma_samplers_start_one_past_the_end_like_diffusers() {
    for kind in [SchedulerKind::Euler, SchedulerKind::Lms] {
        let mut s = AnyScheduler::new(config(kind, TimestepSpacing::Leading, 1)).unwrap();
        s.set_timesteps(1000).unwrap();
        assert_eq!(&s.timesteps()[..2], &[1000.0, 999.0], "{kind}");
        let sigmas = s.sigmas();
        assert!(
            (sigmas[0] - 14.614647).abs() < 1e-4,
            "{kind}: {}",
            sigmas[0]
        );
        assert_eq!(sigmas[0], sigmas[1], "{kind}");
    }
}

/// `order` is diffusers' `order`: the second-order samplers list two model calls per step but
/// the last (`2 n - 1` timesteps for `n` steps), the first-order ones one call per step (PNDM's
/// PLMS one more: it repeats a timestep to warm up).
#[test]
fn order_counts_the_model_calls_per_step() {
    for kind in SchedulerKind::ALL {
        let mut s = AnyScheduler::new(config(kind, TimestepSpacing::Leading, 1)).unwrap();
        s.set_timesteps(10).unwrap();
        let calls = s.timesteps().len();
        let second_order = matches!(
            kind,
            SchedulerKind::Heun | SchedulerKind::Kdpm2 | SchedulerKind::Kdpm2Ancestral
        );
        assert_eq!(s.order(), if second_order { 2 } else { 1 }, "{kind:?}");
        let expected = match kind {
            _ if second_order => 19,
            SchedulerKind::Pndm => 11,
            _ => 10,
        };
        assert_eq!(calls, expected, "{kind:?}");
    }
}
