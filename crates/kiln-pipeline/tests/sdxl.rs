//! SDXL end to end against diffusers' `StableDiffusionXLPipeline` and
//! `StableDiffusionXLImg2ImgPipeline` on the tiny base and refiner of `fixtures/sdxl/`
//! (`xtask/fixtures/sdxl.py`): the conditioning (`encode_prompt`'s four outputs) and whole runs
//! with the same initial latents and the same random draws replayed, with the tolerances of the
//! SD 1.x / 2.x parity tests ([`tolerance::FORWARD`], [`tolerance::IMAGE`]).

mod common;

use burn::tensor::Tensor;
use common::{Case, run_case};
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use kiln_pipeline::{
    Error, GenerateOptions, LoadOptions, MicroConditioning, Mode, StableDiffusionPipeline,
};

fn sdxl() -> std::path::PathBuf {
    common::root().join("fixtures/sdxl")
}

fn load(model: &str) -> StableDiffusionPipeline {
    StableDiffusionPipeline::from_pretrained(
        &sdxl().join(model),
        LoadOptions::default(),
        &common::device(),
    )
    .unwrap()
}

#[test]
fn folders_load_as_sdxl_base_and_refiner() {
    let base = load("base");
    assert!(base.is_sdxl());
    assert_eq!(base.text_encoders().len(), 2);
    assert!(base.force_zeros_for_empty_prompt);
    assert_eq!(base.generation.guidance_scale, 5.0);
    // the refiner's folder has text_encoder_2/ alone: it is the refiner's one encoder
    let refiner = load("refiner");
    assert!(refiner.is_sdxl());
    assert_eq!(refiner.text_encoders().len(), 1);
    assert!(refiner.text_encoder.text_projection.is_some());
    assert!(!refiner.force_zeros_for_empty_prompt);
}

/// The context and pooled embeddings of every `encode.*` case: `[negative, positive]` halves
/// against diffusers' `encode_prompt`.
#[test]
fn conditioning_matches_diffusers_encode_prompt() {
    let device = common::device();
    let reference = Reference::open(&sdxl().join("expected.safetensors")).unwrap();
    let prompt = "a photo of an astronaut riding a horse";
    for (name, model, negative, skip) in [
        ("base", "base", "blurry", 0),
        ("base_zeros", "base", "", 0),
        ("base_skip1", "base", "blurry", 1),
        ("refiner", "refiner", "blurry", 0),
        ("refiner_empty", "refiner", "", 0),
    ] {
        let pipe = load(model);
        let options = GenerateOptions::new(prompt)
            .with_negative_prompt(negative)
            .with_clip_skip(skip)
            .with_size(48, 32)
            .with_guidance_scale(5.0);
        let c = pipe.conditioning(&options).unwrap();
        let added = c.added.expect("SDXL has added conditioning");
        let t = |key: &str| {
            reference
                .tensor::<3>(&format!("encode.{name}.{key}"), &device)
                .unwrap()
        };
        let p = |key: &str| {
            reference
                .tensor::<2>(&format!("encode.{name}.{key}"), &device)
                .unwrap()
        };
        let half = |x: &Tensor<3>, i: usize| x.clone().narrow(0, i, 1);
        let half2 = |x: &Tensor<2>, i: usize| x.clone().narrow(0, i, 1);
        let mut checks = vec![
            (
                "prompt_embeds",
                max_relative_error(&half(&c.context, 1), &t("prompt_embeds")),
            ),
            (
                "pooled",
                max_relative_error(&half2(&added.text_embeds, 1), &p("pooled")),
            ),
        ];
        // diffusers encodes the negative prompt from the penultimate layer whatever the clip
        // skip; Kiln skips the same layers on both sides (docs/sdxl.md)
        if skip == 0 {
            checks.push((
                "negative_prompt_embeds",
                max_relative_error(&half(&c.context, 0), &t("negative_prompt_embeds")),
            ));
            checks.push((
                "negative_pooled",
                max_relative_error(&half2(&added.text_embeds, 0), &p("negative_pooled")),
            ));
        }
        for (what, err) in checks {
            eprintln!("{name} {what}: max relative error {err:.2e}");
            assert!(err < tolerance::FORWARD, "{name} {what}: {err}");
        }
        if name == "base_zeros" {
            let zero: f32 = half(&c.context, 0).abs().max().into_scalar();
            assert_eq!(zero, 0.0, "force_zeros_for_empty_prompt");
        }
        // time ids: [h, w, 0, 0, h, w] for the base, [h, w, 0, 0, score] for the refiner
        let ids: Vec<f32> = added
            .time_ids
            .into_data()
            .convert::<f32>()
            .try_into_vec::<f32>()
            .unwrap();
        let expected: Vec<f32> = if model == "base" {
            [32.0, 48.0, 0.0, 0.0, 32.0, 48.0].repeat(2)
        } else {
            vec![32.0, 48.0, 0.0, 0.0, 2.5, 32.0, 48.0, 0.0, 0.0, 6.0]
        };
        assert_eq!(ids, expected, "{name} time ids");
    }
}

#[test]
fn pipelines_match_diffusers_within_two_levels() {
    let text = std::fs::read_to_string(sdxl().join("cases.json")).unwrap();
    let cases: Vec<Case> = serde_json::from_str(&text).unwrap();
    assert!(cases.len() >= 6);
    let reference = Reference::open(&sdxl().join("expected.safetensors")).unwrap();
    let mut failures = Vec::new();
    for model in ["base", "refiner"] {
        let pipe = load(model);
        for case in cases.iter().filter(|c| c.model == model) {
            let (float_diff, byte_diff) = run_case(case, &pipe, &reference);
            eprintln!(
                "{}: max |float diff| {float_diff:.2e}, max 8-bit diff {byte_diff}",
                case.name
            );
            if byte_diff > tolerance::levels(tolerance::IMAGE) || float_diff > tolerance::IMAGE {
                failures.push(format!("{}: {float_diff:e} / {byte_diff}", case.name));
            }
        }
    }
    assert!(failures.is_empty(), "beyond tolerance: {failures:?}");
}

/// The micro-conditioning reaches the UNet: another original size gives another image.
#[test]
fn micro_conditioning_changes_the_image() {
    let device = common::device();
    let pipe = load("base");
    let latents = Tensor::<4>::ones([1, 4, 16, 24], &device) * 0.5;
    let options = GenerateOptions::new("a cat")
        .with_size(48, 32)
        .with_steps(2)
        .with_latents(latents);
    let plain = common::ddim(&pipe, &options);
    let cropped = common::ddim(
        &pipe,
        &options.clone().with_micro_conditioning(MicroConditioning {
            original_size: Some([512, 512]),
            crops_coords_top_left: [64, 0],
            ..Default::default()
        }),
    );
    let moved: f32 = (plain - cropped).abs().max().into_scalar();
    assert!(moved > 1e-4, "{moved}");
}

#[test]
fn bad_sdxl_requests_are_typed_errors() {
    let device = common::device();
    let pipe = load("base");
    // embeddings without their pooled embedding
    let embeds = Tensor::<3>::zeros([1, 77, 16], &device);
    let options = GenerateOptions::new("").with_prompt_embeds(embeds, None);
    let err = pipe.conditioning(&options).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidInput(m) if m.contains("pooled")),
        "{err}"
    );
    // inpainting is refused before any work
    let image = Tensor::<4>::zeros([1, 3, 32, 48], &device);
    let mask = Tensor::<4>::ones([1, 1, 32, 48], &device);
    let options = GenerateOptions::new("a cat").with_mode(Mode::Inpaint {
        image,
        mask,
        strength: 1.0,
    });
    let mut scheduler = pipe
        .scheduler(None, kiln_scheduler::SamplerOptions::default())
        .unwrap();
    let err = pipe
        .generate(
            &mut scheduler,
            &options,
            &mut kiln_scheduler::QueuedNoise::new(Vec::new()),
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("inpainting"), "{err}");
}
