//! The hires fix (`kiln_pipeline::hires`): the latent upscalers against PyTorch's `interpolate`
//! (`fixtures/hires/`, `xtask/fixtures/hires.py`), and `generate_hires` as the composition of
//! its two passes on the tiny SD 1.x pipeline.

mod common;

use std::ops::ControlFlow;

use burn::tensor::Tensor;
use kiln_nn::reference::{Reference, max_relative_error};
use kiln_pipeline::hires::upscale_latents;
use kiln_pipeline::{
    Error, GenerateOptions, HiresFix, LatentUpscaler, Mode, StableDiffusionPipeline,
};
use kiln_scheduler::{SamplerName, SamplerOptions, SeededNoise};

#[test]
fn latent_upscalers_match_pytorch() {
    let device = common::device();
    let reference =
        Reference::open(&common::root().join("fixtures/hires/interpolate.safetensors")).unwrap();
    let input: Tensor<4> = reference.tensor("input", &device).unwrap();
    for (upscaler, mode) in [
        (LatentUpscaler::Bilinear, "bilinear"),
        (LatentUpscaler::Nearest, "nearest"),
        (LatentUpscaler::Bicubic, "bicubic"),
    ] {
        assert_eq!(upscaler.name().parse::<LatentUpscaler>().unwrap(), upscaler);
        for (h, w) in [(10, 14), (8, 11)] {
            let ours = upscale_latents(input.clone(), h, w, upscaler).unwrap();
            let theirs: Tensor<4> = reference
                .tensor(&format!("{mode}.{h}x{w}"), &device)
                .unwrap();
            assert_eq!(ours.dims(), theirs.dims());
            let err = max_relative_error(&ours, &theirs);
            assert!(err < 1e-6, "{mode} {h}x{w}: {err:e}");
        }
    }
    assert!("lanczos".parse::<LatentUpscaler>().is_err());
    assert!(upscale_latents(input, 0, 4, LatentUpscaler::Bilinear).is_err());
}

fn sampler(pipe: &StableDiffusionPipeline) -> kiln_scheduler::AnyScheduler {
    pipe.scheduler(Some(SamplerName::EulerA), SamplerOptions::default())
        .unwrap()
}

/// `generate_hires` is its two passes: the txt2img latents, enlarged, through img2img at the
/// larger size, all from one noise stream (an ancestral sampler, so the second pass draws too).
#[test]
fn the_hires_fix_is_its_two_passes() {
    let (_model, pipe) = common::load("sd1");
    let options = GenerateOptions::new("a photo of an astronaut riding a horse")
        .with_negative_prompt("blurry")
        .with_size(24, 16)
        .with_steps(4);
    let hires = HiresFix {
        steps: Some(6),
        denoise: 0.5,
        upscaler: LatentUpscaler::Bilinear,
        ..HiresFix::scaled(24, 16, 2.0, pipe.size_multiple()).unwrap()
    };
    assert_eq!((hires.width, hires.height), (48, 32));
    let mut calls = Vec::new();
    let mut on_step = |p: &kiln_pipeline::StepProgress<'_>| {
        calls.push((p.step, p.total));
        ControlFlow::Continue(())
    };
    let out = pipe
        .generate_hires(
            &mut sampler(&pipe),
            &options,
            &hires,
            &mut SeededNoise::new(7),
            Some(&mut on_step),
        )
        .unwrap();
    assert_eq!(out.images.dims(), [1, 3, 32, 48]);
    // 4 steps, then the last half of 6
    assert_eq!(
        calls,
        [(0, 4), (1, 4), (2, 4), (3, 4), (0, 3), (1, 3), (2, 3)]
    );

    // the same by hand
    let mut noise = SeededNoise::new(7);
    let mut scheduler = sampler(&pipe);
    let first = pipe
        .generate_latents(&mut scheduler, &options, &mut noise, None)
        .unwrap();
    assert_eq!(first.dims(), [1, 4, 8, 12]);
    let enlarged = upscale_latents(first, 16, 24, LatentUpscaler::Bilinear).unwrap();
    let second = options
        .clone()
        .with_size(48, 32)
        .with_steps(6)
        .with_mode(Mode::Img2Img {
            image: enlarged,
            strength: 0.5,
        });
    let by_hand = pipe
        .generate(&mut sampler(&pipe), &second, &mut noise, None)
        .unwrap();
    let bits = |t: &Tensor<4>| t.to_data().try_to_vec::<f32>().unwrap();
    assert_eq!(bits(&out.images), bits(&by_hand.images));

    // and not what txt2img draws at the larger size directly
    let direct = pipe
        .generate(
            &mut sampler(&pipe),
            &options.clone().with_size(48, 32),
            &mut SeededNoise::new(7),
            None,
        )
        .unwrap();
    assert!(max_relative_error(&direct.images, &out.images) > 0.01);
}

#[test]
fn hires_mistakes_are_refused_before_any_work() {
    let (_model, pipe) = common::load("sd1");
    let options = GenerateOptions::new("a cat")
        .with_size(24, 16)
        .with_steps(2);
    let good = HiresFix::scaled(24, 16, 1.5, pipe.size_multiple()).unwrap();
    assert_eq!((good.width, good.height), (36, 24));
    let run = |options: &GenerateOptions, hires: &HiresFix| {
        let mut steps = 0;
        let mut count = |_: &kiln_pipeline::StepProgress<'_>| {
            steps += 1;
            ControlFlow::Continue(())
        };
        let result = pipe.generate_hires(
            &mut sampler(&pipe),
            options,
            hires,
            &mut SeededNoise::new(1),
            Some(&mut count),
        );
        (result.map(|_| ()), steps)
    };
    let cases: Vec<(GenerateOptions, HiresFix, &str)> = vec![
        (
            options.clone(),
            HiresFix {
                denoise: 0.0,
                ..good.clone()
            },
            "denoise",
        ),
        (
            options.clone(),
            HiresFix {
                denoise: 1.5,
                ..good.clone()
            },
            "denoise",
        ),
        (
            options.clone(),
            HiresFix {
                width: 12,
                ..good.clone()
            },
            "smaller",
        ),
        (
            options.clone(),
            HiresFix {
                width: 37,
                ..good.clone()
            },
            "multiples",
        ),
        (
            options.clone().with_memory_limit(1 << 20),
            good.clone(),
            "GiB",
        ),
        (
            options.clone().with_mode(Mode::Img2Img {
                image: Tensor::<4>::zeros([1, 3, 16, 24], &common::device()),
                strength: 0.5,
            }),
            good.clone(),
            "txt2img",
        ),
    ];
    for (options, hires, needle) in cases {
        let (result, steps) = run(&options, &hires);
        let err = result.unwrap_err();
        assert!(err.to_string().contains(needle), "{needle}: {err}");
        assert_eq!(steps, 0, "{needle}: refused after {steps} steps");
    }
    // a memory limit only the second pass exceeds is caught before the first runs
    let first = pipe.estimate_memory(24, 16, 1, true, None).peak();
    let second = pipe.estimate_memory(72, 48, 1, true, None).peak();
    assert!(second > first);
    let big = HiresFix::scaled(24, 16, 3.0, pipe.size_multiple()).unwrap();
    let (result, steps) = run(&options.clone().with_memory_limit(first + 1), &big);
    assert!(
        matches!(result, Err(Error::InsufficientMemory { width: 72, .. })),
        "{result:?}"
    );
    assert_eq!(steps, 0);
    assert!(HiresFix::scaled(24, 16, 0.5, 8).is_err());
    assert!(HiresFix::scaled(24, 16, f64::NAN, 8).is_err());
    assert!(HiresFix::scaled(24, 16, 1e300, 8).is_err());
}
