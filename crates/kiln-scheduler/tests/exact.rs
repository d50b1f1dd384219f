//! diffusers' exact-number tests, ported: schedules whose values are known integers or
//! float32 constants (`tests/schedulers/test_scheduler_*.py` in diffusers, plus values printed
//! from diffusers 0.42.1 for the same configs).

use kiln_scheduler::{AnyScheduler, Scheduler, SchedulerConfig, SchedulerKind, TimestepSpacing};

fn schedule(config: SchedulerConfig, steps: usize) -> AnyScheduler {
    let mut s = AnyScheduler::new(config).expect("scheduler");
    s.set_timesteps(steps).expect("set_timesteps");
    s
}

#[test]
fn ddim_steps_offset() {
    // test_scheduler_ddim.py::test_steps_offset
    let c = SchedulerConfig::new(SchedulerKind::Ddim)
        .with_timestep_spacing(TimestepSpacing::Leading, 1);
    assert_eq!(
        schedule(c, 5).timesteps(),
        [801.0, 601.0, 401.0, 201.0, 1.0]
    );
}

#[test]
fn pndm_steps_offset_with_runge_kutta_warmup() {
    // test_scheduler_pndm.py::test_steps_offset
    let c = SchedulerConfig::new(SchedulerKind::Pndm)
        .with_timestep_spacing(TimestepSpacing::Leading, 1);
    let expected = [
        901.0, 851.0, 851.0, 801.0, 801.0, 751.0, 751.0, 701.0, 701.0, 651.0, 651.0, 601.0, 601.0,
        501.0, 401.0, 301.0, 201.0, 101.0, 1.0,
    ];
    assert_eq!(schedule(c, 10).timesteps(), expected);
}

#[test]
fn ddpm_trailing() {
    let c = SchedulerConfig::new(SchedulerKind::Ddpm)
        .with_timestep_spacing(TimestepSpacing::Trailing, 0);
    assert_eq!(schedule(c, 4).timesteps(), [999.0, 749.0, 499.0, 249.0]);
}

#[test]
fn dpm_solver_linspace_drops_the_last_point() {
    let s = schedule(
        SchedulerConfig::stable_diffusion(SchedulerKind::DpmSolverMultistep),
        10,
    );
    assert_eq!(
        s.timesteps(),
        [
            999.0, 899.0, 799.0, 699.0, 599.0, 500.0, 400.0, 300.0, 200.0, 100.0
        ]
    );
}

#[test]
fn euler_stable_diffusion_sigmas() {
    let s = schedule(SchedulerConfig::stable_diffusion(SchedulerKind::Euler), 4);
    assert_eq!(s.timesteps(), [999.0, 666.0, 333.0, 0.0]);
    let expected = [14.614647f32, 2.9183085, 0.9323584, 0.029167535, 0.0];
    // within one float32 ulp: torch's vectorised `pow(x, 0.5)` behind diffusers' sigma table is
    // not always correctly rounded, Rust's `sqrt` is
    for (got, want) in s.sigmas().iter().zip(expected) {
        assert!((got - want).abs() <= want * f32::EPSILON, "{got} vs {want}");
    }
    assert_eq!(s.init_noise_sigma() as f32, 14.614647);
}

#[test]
fn heun_lists_each_intermediate_point_twice() {
    let s = schedule(SchedulerConfig::new(SchedulerKind::Heun), 3);
    assert_eq!(s.timesteps(), [999.0, 499.5, 499.5, 0.0, 0.0]);
}

#[test]
fn lcm_skips_through_the_distillation_schedule() {
    let s = schedule(SchedulerConfig::new(SchedulerKind::Lcm), 4);
    assert_eq!(s.timesteps(), [999.0, 759.0, 499.0, 259.0]);
}
