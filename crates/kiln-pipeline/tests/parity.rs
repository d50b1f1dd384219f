//! End-to-end parity with diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`
//! and `StableDiffusionInpaintPipeline` on the tiny pipelines of `fixtures/pipeline/`
//! (`xtask/fixtures/pipeline.py`): same folder, same initial latents, the same random draws
//! replayed. Tolerance, as issue 5 states it: the 8-bit images within 2/255 per channel; the float
//! images within 5e-4 (measured: at most 8e-5 and 1/255).

mod common;

use burn::tensor::Tensor;
use kiln_nn::reference::Reference;
use kiln_pipeline::{GenerateOptions, LoadOptions, Mode, StableDiffusionPipeline, images_to_rgb8};
use kiln_scheduler::{QueuedNoise, SamplerName, SamplerOptions};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    model: String,
    scheduler: String,
    prompt: String,
    negative: String,
    guidance: f64,
    rescale: f64,
    images: usize,
    steps: usize,
    height: usize,
    width: usize,
    mode: String,
    strength: f64,
    noise_draws: usize,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(common::fixtures().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Runs one case and returns (max |float diff|, max |8-bit diff|).
fn run_case(case: &Case, pipe: &StableDiffusionPipeline, reference: &Reference) -> (f32, u8) {
    let device = common::device();
    let sampler = match case.scheduler.as_str() {
        "default" => None,
        name => Some(name.parse::<SamplerName>().unwrap()),
    };
    let mut scheduler = pipe.scheduler(sampler, SamplerOptions::default()).unwrap();
    let draws: Vec<Tensor<4>> = (0..case.noise_draws)
        .map(|i| {
            reference
                .tensor::<4>(&format!("{}.noise.{i}", case.name), &device)
                .unwrap()
        })
        // diffusers also encodes the masked image for a regular UNet and drops the result
        .enumerate()
        .filter(|(i, _)| !(case.mode == "inpaint" && case.model != "inpaint" && *i == 1))
        .map(|(_, t)| t)
        .collect();
    let mut noise = QueuedNoise::new(draws);
    let image = reference.tensor::<4>("init_image", &device).unwrap() * 2.0 - 1.0;
    let mode = match case.mode.as_str() {
        "txt2img" => Mode::Txt2Img,
        "img2img" => Mode::Img2Img {
            image,
            strength: case.strength,
        },
        _ => Mode::Inpaint {
            image,
            mask: reference.tensor::<4>("mask", &device).unwrap(),
            strength: case.strength,
        },
    };
    let mut options = GenerateOptions::new(&case.prompt)
        .with_negative_prompt(&case.negative)
        .with_guidance_scale(case.guidance)
        .with_guidance_rescale(case.rescale)
        .with_num_images(case.images)
        .with_steps(case.steps)
        .with_size(case.width, case.height)
        .with_mode(mode);
    if case.mode != "img2img" {
        let latents = reference
            .tensor::<4>(&format!("{}.latents", case.name), &device)
            .unwrap();
        options = options.with_latents(latents);
    }
    let out = pipe
        .generate(&mut scheduler, &options, &mut noise, None)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    assert_eq!(noise.remaining(), 0, "{}: unused recorded noise", case.name);
    let expected = reference
        .tensor::<4>(&format!("{}.image", case.name), &device)
        .unwrap();
    assert_eq!(out.images.dims(), expected.dims(), "{}", case.name);
    let float_diff: f32 = (out.images.clone() - expected.clone())
        .abs()
        .max()
        .into_scalar::<f32>();
    let ours = images_to_rgb8(&out.images).unwrap();
    let theirs = images_to_rgb8(&expected).unwrap();
    let byte_diff = ours
        .iter()
        .zip(&theirs)
        .flat_map(|(a, b)| a.data.iter().zip(&b.data).map(|(x, y)| x.abs_diff(*y)))
        .max()
        .unwrap();
    (float_diff, byte_diff)
}

#[test]
fn pipelines_match_diffusers_within_two_levels() {
    let device = common::device();
    let reference = Reference::open(&common::fixtures().join("expected.safetensors")).unwrap();
    let mut failures = Vec::new();
    for kind in ["sd1", "sd2", "inpaint"] {
        let dir = common::model(kind);
        let pipe =
            StableDiffusionPipeline::from_pretrained(dir.path(), LoadOptions::default(), &device)
                .unwrap();
        for case in cases().iter().filter(|c| c.model == kind) {
            let (float_diff, byte_diff) = run_case(case, &pipe, &reference);
            eprintln!(
                "{}: max |float diff| {float_diff:.2e}, max 8-bit diff {byte_diff}",
                case.name
            );
            if byte_diff > 2 || float_diff > 5e-4 {
                failures.push(format!("{}: {float_diff:e} / {byte_diff}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "beyond tolerance: {failures:?}");
}
