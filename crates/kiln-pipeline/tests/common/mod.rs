//! Helpers shared by kiln-pipeline's integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::tensor::Tensor;
use kiln_nn::reference::{Reference, tolerance};
use kiln_pipeline::{GenerateOptions, Mode, StableDiffusionPipeline, images_to_rgb8};
use kiln_scheduler::{QueuedNoise, SamplerName, SamplerOptions};
use serde::Deserialize;

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `fixtures/pipeline/`.
pub fn fixtures() -> PathBuf {
    root().join("fixtures/pipeline")
}

fn copy_dir(from: &Path, to: &Path) {
    kiln_nn::config::copy_dir(from, to).expect("copy fixture folder");
}

/// A complete diffusers folder for `kind` (`sd1`, `sd2`, `inpaint`) in a temporary directory:
/// the committed components, the ones it shares with sd1 (sd2: the VAE; inpaint: the text
/// encoder and VAE) and a classic tokenizer folder from `fixtures/clip`.
pub fn model(kind: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = fixtures().join(kind);
    copy_dir(&src, dir.path());
    for component in ["text_encoder", "vae"] {
        if !dir.path().join(component).exists() {
            copy_dir(
                &fixtures().join("sd1").join(component),
                &dir.path().join(component),
            );
        }
    }
    let flavour = if kind == "sd2" { "sd2" } else { "sd1" };
    let tok = dir.path().join("tokenizer");
    std::fs::create_dir_all(&tok).expect("tokenizer dir");
    let clip = root().join("fixtures/clip");
    for (from, name) in [
        (clip.join("vocab/vocab.json"), "vocab.json"),
        (clip.join("vocab/merges.txt"), "merges.txt"),
        (
            clip.join(format!("tokenizer-{flavour}/special_tokens_map.json")),
            "special_tokens_map.json",
        ),
        (
            clip.join(format!("tokenizer-{flavour}/tokenizer_config.json")),
            "tokenizer_config.json",
        ),
    ] {
        std::fs::copy(&from, tok.join(name)).expect("copy tokenizer file");
    }
    dir
}

/// Every parameter of `module` by name, as its bytes: equal maps are the same weights to the bit.
pub fn module_bits<M: burn::module::Module>(
    module: &M,
) -> std::collections::BTreeMap<String, Vec<u8>> {
    burn::store::ModuleSnapshot::collect(module, None, None, true)
        .into_iter()
        .map(|t| {
            let data = burn::store::bridge::to_data(&t).unwrap();
            (t.name.clone(), data.into_bytes().to_vec())
        })
        .collect()
}

/// [`model`]`(kind)` loaded in f32 on [`device`], with the folder it lives in.
pub fn load(kind: &str) -> (tempfile::TempDir, StableDiffusionPipeline) {
    let model = model(kind);
    let pipe = StableDiffusionPipeline::from_pretrained(
        model.path(),
        kiln_pipeline::LoadOptions::default(),
        &device(),
    )
    .unwrap();
    (model, pipe)
}

/// The flex device the numeric tests run on.
pub fn device() -> burn::tensor::Device {
    kiln_nn::parse_device("flex").expect("flex is the default feature")
}

/// One recorded diffusers run of `fixtures/pipeline/cases.json`.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub model: String,
    pub scheduler: String,
    pub prompt: String,
    pub negative: String,
    pub guidance: f64,
    #[serde(default)]
    pub rescale: f64,
    pub images: usize,
    pub steps: usize,
    pub height: usize,
    pub width: usize,
    pub mode: String,
    pub strength: f64,
    pub noise_draws: usize,
}

pub fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(fixtures().join("cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Runs one case and returns (max |float diff|, max |8-bit diff|).
pub fn run_case(case: &Case, pipe: &StableDiffusionPipeline, reference: &Reference) -> (f32, u8) {
    let device = device();
    let sampler = match case.scheduler.as_str() {
        "default" => None,
        name => Some(name.parse::<SamplerName>().unwrap()),
    };
    let mut scheduler = pipe.scheduler(sampler, SamplerOptions::default()).unwrap();
    // recorded initial latents where the case gave diffusers some (else they are a noise draw)
    let latents = match case.mode.as_str() {
        "img2img" => None,
        _ => reference
            .tensor::<4>(&format!("{}.latents", case.name), &device)
            .ok(),
    };
    // diffusers also encodes the masked image for a regular UNet and drops the result: after
    // the image's encoding and the initial noise (when it is drawn)
    let masked_draw = if latents.is_some() { 1 } else { 2 };
    let draws: Vec<Tensor<4>> = (0..case.noise_draws)
        .map(|i| {
            reference
                .tensor::<4>(&format!("{}.noise.{i}", case.name), &device)
                .unwrap()
        })
        .enumerate()
        .filter(|(i, _)| !(case.mode == "inpaint" && case.model != "inpaint" && *i == masked_draw))
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
    if let Some(latents) = latents {
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

/// Runs one case, prints its differences, and records it in `failures` when it is beyond the
/// image tolerance ([`tolerance::IMAGE`] on the floats, [`tolerance::levels`] of it on 8 bits).
pub fn check_case(
    case: &Case,
    pipe: &StableDiffusionPipeline,
    reference: &Reference,
    failures: &mut Vec<String>,
) {
    let (float_diff, byte_diff) = run_case(case, pipe, reference);
    eprintln!(
        "{}: max |float diff| {float_diff:.2e}, max 8-bit diff {byte_diff}",
        case.name
    );
    if byte_diff > tolerance::levels(tolerance::IMAGE) || float_diff > tolerance::IMAGE {
        failures.push(format!("{}: {float_diff:e} / {byte_diff}", case.name));
    }
}

/// Runs `options` with DDIM and no random draws (the options carry the latents): the image.
pub fn ddim(pipe: &StableDiffusionPipeline, options: &GenerateOptions) -> Tensor<4> {
    let mut scheduler = pipe
        .scheduler(Some(SamplerName::Ddim), SamplerOptions::default())
        .unwrap();
    pipe.generate(
        &mut scheduler,
        options,
        &mut QueuedNoise::new(Vec::new()),
        None,
    )
    .unwrap()
    .images
}
