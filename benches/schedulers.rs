//! One `step` of each of Kiln's samplers on a latent `[2, 4, 64, 64]` (a 512x512 batch of two),
//! f32 on flex.
//!
//! `cargo bench -p kiln-scheduler --bench schedulers`; one sampler:
//! `cargo bench -p kiln-scheduler --bench schedulers -- 'scheduler_step/dpm\+\+2m$'`.
//!
//! Each sampler is built from SD 1.5's shipped scheduler config
//! (`fixtures/pipeline/sd1/scheduler/scheduler_config.json`) as `AnyScheduler::from_sampler` does
//! for `--scheduler NAME`, after `set_timesteps(20)`. [`WARM_STEPS`] steps run first, so that
//! multistep samplers have their history and the timed step is a regular one (second order
//! where the sampler is); every iteration then steps a fresh copy of that state, its sample
//! and model output freshly allocated as in a denoising loop. Stochastic samplers draw their
//! noise from `SeededNoise`, on the host, inside the timed step.

use std::hint::black_box;
use std::path::Path;

use burn::tensor::{Device, Distribution, Tensor, TensorData};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use kiln_scheduler::{
    AnyScheduler, SamplerName, SamplerOptions, Scheduler, SchedulerConfig, SeededNoise,
};

const SHAPE: [usize; 4] = [2, 4, 64, 64];
const STEPS: usize = 20;
/// Steps taken before the timed one.
const WARM_STEPS: usize = 3;

fn scheduler_step(c: &mut Criterion) {
    let device = Device::flex();
    let config_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/pipeline/sd1/scheduler/scheduler_config.json");
    let model_config = SchedulerConfig::from_file(&config_path).expect("SD 1.5 scheduler config");
    let normal = Distribution::Normal(0.0, 1.0);
    // A fixed stand-in for the UNet's prediction.
    let model_output: TensorData = Tensor::<4>::random(SHAPE, normal, &device).into_data();

    let mut group = c.benchmark_group("scheduler_step");
    for name in SamplerName::ALL {
        let mut scheduler =
            AnyScheduler::from_sampler(name, &model_config, SamplerOptions::default())
                .expect("sampler");
        scheduler.set_timesteps(STEPS).expect("set_timesteps");
        let timesteps = scheduler.timesteps().to_vec();
        let mut noise = SeededNoise::new(0);
        let mut sample = Tensor::<4>::random(SHAPE, normal, &device) * scheduler.init_noise_sigma();
        for &t in &timesteps[..WARM_STEPS] {
            let eps = Tensor::from_data(model_output.clone(), &device);
            let input = scheduler
                .scale_model_input(sample.clone(), t)
                .expect("scale");
            black_box(input);
            sample = scheduler
                .step(eps, t, sample, &mut noise)
                .expect("step")
                .prev_sample;
        }
        let t = timesteps[WARM_STEPS];
        let sample = sample.into_data();
        group.bench_function(name.as_str(), |b| {
            b.iter_batched(
                || {
                    let mut s = scheduler.clone();
                    // the denoising loop scales the model input before each step (untimed here)
                    let x = s
                        .scale_model_input(Tensor::from_data(sample.clone(), &device), t)
                        .expect("scale");
                    black_box(x);
                    (
                        s,
                        Tensor::<4>::from_data(model_output.clone(), &device),
                        Tensor::<4>::from_data(sample.clone(), &device),
                        SeededNoise::new(1),
                    )
                },
                |(mut s, eps, x, mut noise)| {
                    s.step(black_box(eps), t, black_box(x), &mut noise)
                        .expect("step")
                        .prev_sample
                },
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, scheduler_step);
criterion_main!(benches);
