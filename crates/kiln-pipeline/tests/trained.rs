//! diffusers runs the model Kiln trained: the embedded default model, loaded strictly by
//! diffusers' `StableDiffusionPipeline.from_pretrained` (`xtask/fixtures/trained_model.py`),
//! gives the images Kiln gives from the same latents. So the folders Kiln's training writes are
//! diffusers models, not just files that Kiln alone reads back.
//!
//! Tolerance: the text embeddings within [`tolerance::FORWARD`]; the images within
//! [`tolerance::IMAGE`] (its derivation covers up to 8 steps) and so within
//! [`tolerance::levels`] of it in 8 bits; the 25-step case within 25 steps' worth of
//! [`tolerance::FORWARD`] on the latent, as that derivation scales.
#![cfg(feature = "embedded-model")]

mod common;

use burn::tensor::Tensor;
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use kiln_pipeline::{GenerateOptions, PromptSyntax, StableDiffusionPipeline, images_to_rgb8};
use kiln_scheduler::{QueuedNoise, SamplerOptions};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    name: String,
    prompt: String,
    negative: String,
    steps: usize,
    guidance: f64,
}

#[test]
fn diffusers_draws_what_kiln_draws_with_the_embedded_model() {
    let device = common::device();
    let dir = common::root().join("fixtures/trained");
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    let reference = Reference::open(&dir.join("expected.safetensors")).unwrap();
    let pipe = StableDiffusionPipeline::embedded(&device).unwrap();
    let mut failures = Vec::new();
    for case in &cases {
        let name = |what: &str| format!("{}.{what}", case.name);
        let embeds = pipe
            .encode_prompt(&case.prompt, PromptSyntax::Plain, 0)
            .unwrap();
        let expected_embeds: Tensor<3> = reference.tensor(&name("prompt_embeds"), &device).unwrap();
        let embed_error = max_relative_error(&embeds, &expected_embeds);

        let options = GenerateOptions::for_model(&pipe, &case.prompt)
            .with_negative_prompt(&case.negative)
            .with_steps(case.steps)
            .with_guidance_scale(case.guidance)
            .with_latents(reference.tensor(&name("latents"), &device).unwrap());
        let mut scheduler = pipe.scheduler(None, SamplerOptions::default()).unwrap();
        // the folder's Euler sampler draws no noise
        let mut noise = QueuedNoise::new(Vec::new());
        let out = pipe
            .generate(&mut scheduler, &options, &mut noise, None)
            .unwrap();
        let expected: Tensor<4> = reference.tensor(&name("image"), &device).unwrap();
        assert_eq!(out.images.dims(), expected.dims(), "{}", case.name);
        let float_diff: f32 = (out.images.clone() - expected.clone())
            .abs()
            .max()
            .into_scalar();
        let ours = images_to_rgb8(&out.images).unwrap().remove(0);
        let theirs = images_to_rgb8(&expected).unwrap().remove(0);
        let byte_diff = ours
            .data
            .iter()
            .zip(&theirs.data)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        let bound = match case.steps {
            0..=8 => tolerance::IMAGE,
            n => n as f32 * tolerance::FORWARD,
        };
        eprintln!(
            "{}: embeddings {embed_error:.2e}, image max |float diff| {float_diff:.2e} (bound {bound:.1e}), 8-bit {byte_diff}",
            case.name
        );
        if embed_error > tolerance::FORWARD
            || float_diff > bound
            || byte_diff > tolerance::levels(bound)
        {
            failures.push(case.name.clone());
        }
    }
    assert!(failures.is_empty(), "beyond tolerance: {failures:?}");
}
