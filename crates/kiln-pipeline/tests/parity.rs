//! End-to-end parity with diffusers' `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline`
//! and `StableDiffusionInpaintPipeline` on the tiny pipelines of `fixtures/pipeline/`
//! (`xtask/fixtures/pipeline.py`): same folder, same initial latents, the same random draws
//! replayed. Tolerance: the float images within [`tolerance::IMAGE`], and so the 8-bit images
//! within [`tolerance::levels`] of that (1/255); both are derived there for any CPU.

mod common;

use burn::tensor::Tensor;
use common::{cases, check_case};
use kiln_nn::reference::{Reference, tolerance};
use kiln_pipeline::{
    GenerateOptions, LoadOptions, PromptSyntax, StableDiffusionPipeline, images_to_rgb8,
};
use kiln_scheduler::{QueuedNoise, SamplerName, SamplerOptions};

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
            check_case(case, &pipe, &reference, &mut failures);
        }
    }
    assert!(failures.is_empty(), "beyond tolerance: {failures:?}");
}

/// A latent size the UNet cannot halve evenly (42x30 pixels: latents 21x15, one downsampler),
/// against diffusers' pipeline (`xtask/fixtures/unet_vae_odd_sizes.py`).
#[test]
fn odd_latent_sizes_match_diffusers() {
    let device = common::device();
    let reference = Reference::open(&common::fixtures().join("odd-size.safetensors")).unwrap();
    let dir = common::model("sd1");
    let pipe =
        StableDiffusionPipeline::from_pretrained(dir.path(), LoadOptions::default(), &device)
            .unwrap();
    let mut scheduler = pipe.scheduler(None, SamplerOptions::default()).unwrap();
    let options = GenerateOptions::new("a photo of an astronaut riding a horse")
        .with_steps(5)
        .with_size(42, 30)
        .with_latents(reference.tensor::<4>("latents", &device).unwrap());
    let out = pipe
        .generate(
            &mut scheduler,
            &options,
            &mut QueuedNoise::new(Vec::new()),
            None,
        )
        .unwrap();
    let expected: Tensor<4> = reference.tensor("image", &device).unwrap();
    assert_eq!(out.images.dims(), [1, 3, 30, 42]);
    let float_diff: f32 = (out.images.clone() - expected.clone())
        .abs()
        .max()
        .into_scalar();
    let byte_diff = images_to_rgb8(&out.images).unwrap()[0]
        .data
        .iter()
        .zip(&images_to_rgb8(&expected).unwrap()[0].data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    eprintln!("42x30: max |float diff| {float_diff:.2e}, max 8-bit diff {byte_diff}");
    assert!(
        byte_diff <= tolerance::levels(tolerance::IMAGE) && float_diff <= tolerance::IMAGE,
        "{float_diff} / {byte_diff}"
    );
}

/// A long weighted prompt (two windows, the web UI's emphasis) against a short weighted negative
/// prompt, which is padded with the empty prompt's window: diffusers' pipeline given the
/// embeddings that `xtask/fixtures/prompts.py` computes by the web UI's rules.
#[test]
fn weighted_long_prompts_match_the_web_ui_rules() {
    #[derive(serde::Deserialize)]
    struct Generate {
        prompt: String,
        negative: String,
        height: usize,
        width: usize,
        steps: usize,
        guidance: f64,
    }
    let device = common::device();
    let dir = common::root().join("fixtures/prompts");
    let reference = Reference::open(&dir.join("expected.safetensors")).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let case: Generate = serde_json::from_value(cases["generate"].clone()).unwrap();
    let model = common::model("sd1");
    let pipe =
        StableDiffusionPipeline::from_pretrained(model.path(), LoadOptions::default(), &device)
            .unwrap();
    let mut scheduler = pipe
        .scheduler(Some(SamplerName::Ddim), SamplerOptions::default())
        .unwrap();
    let options = GenerateOptions::new(&case.prompt)
        .with_negative_prompt(&case.negative)
        .with_prompt_syntax(PromptSyntax::A1111)
        .with_guidance_scale(case.guidance)
        .with_steps(case.steps)
        .with_size(case.width, case.height)
        .with_latents(reference.tensor::<4>("generate.latents", &device).unwrap());
    let out = pipe
        .generate(
            &mut scheduler,
            &options,
            &mut QueuedNoise::new(Vec::new()),
            None,
        )
        .unwrap();
    let expected: Tensor<4> = reference.tensor("generate.image", &device).unwrap();
    let float_diff: f32 = (out.images.clone() - expected.clone())
        .abs()
        .max()
        .into_scalar();
    eprintln!("weighted long prompt: max |float diff| {float_diff:.2e}");
    assert!(float_diff <= tolerance::IMAGE, "{float_diff}");
    // the same prompt read literally gives another image
    let literal = pipe
        .generate(
            &mut scheduler,
            &options.clone().with_prompt_syntax(PromptSyntax::Long),
            &mut QueuedNoise::new(Vec::new()),
            None,
        )
        .unwrap();
    let moved: f32 = (literal.images - expected).abs().max().into_scalar();
    assert!(moved > 10.0 * tolerance::IMAGE, "{moved}");
}
