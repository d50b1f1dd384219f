//! Full-size single-file checkpoints: SD 1.5 and SD 2.1 with random weights in the original LDM
//! layout, loaded with configs inferred from the shapes, against diffusers' outputs for the same
//! weights (`io.safetensors` of each component in `.cache/full-size/`).
//!
//! Heavy (4 and 4.9 GiB files), so gated: it runs only with `KILN_FULL_SIZE=1`, after
//! `cargo xtask py full_size.py make` and `cargo xtask py full_size.py single-file`:
//!
//! ```text
//! KILN_FULL_SIZE=1 cargo test -p kiln-pipeline --test full_size -- --nocapture
//! ```

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Int, Tensor};
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use kiln_pipeline::{SingleFileOptions, StableDiffusionPipeline};
use kiln_scheduler::PredictionType;

/// A forward pass in f32 against the reference in f32: the bound, and why it holds on any CPU
/// or thread count, is [`tolerance::FORWARD`].
const TOL: f32 = tolerance::FORWARD;

fn cache() -> Option<PathBuf> {
    if std::env::var_os("KILN_FULL_SIZE").is_none() {
        eprintln!(
            "skipped: set KILN_FULL_SIZE=1 (after `cargo xtask py full_size.py make` and `single-file`)"
        );
        return None;
    }
    Some(common::root().join(".cache/full-size"))
}

fn check(base: &Path, name: &str, vae_from: &str) {
    let device = common::device();
    let start = std::time::Instant::now();
    let pipe = StableDiffusionPipeline::from_single_file(
        &base.join(format!("{name}.safetensors")),
        &SingleFileOptions::default(),
        &device,
    )
    .unwrap();
    eprintln!(
        "{name}: loaded with inferred configs in {:.1?}",
        start.elapsed()
    );
    let v2 = name == "sd21";
    assert_eq!(
        pipe.scheduler_config.prediction_type,
        if v2 {
            PredictionType::VPrediction
        } else {
            PredictionType::Epsilon
        }
    );
    assert_eq!(
        pipe.default_size(),
        if v2 { (768, 768) } else { (512, 512) }
    );

    let io = Reference::open(&base.join(name).join("unet/io.safetensors")).unwrap();
    let out = pipe
        .unet
        .forward(
            io.tensor("sample", &device).unwrap(),
            io.tensor("timestep", &device).unwrap(),
            io.tensor("encoder_hidden_states", &device).unwrap(),
        )
        .unwrap();
    let err = max_relative_error(&out, &io.tensor("output", &device).unwrap());
    eprintln!("{name} unet: max relative error {err:.3e}");
    assert!(err < TOL, "{name} unet: {err}");

    let io = Reference::open(&base.join(vae_from).join("vae/io.safetensors")).unwrap();
    let decoded = pipe
        .vae
        .decode(io.tensor("latent", &device).unwrap(), None)
        .unwrap();
    let err = max_relative_error(&decoded, &io.tensor("decoded", &device).unwrap());
    eprintln!("{name} vae decode: max relative error {err:.3e}");
    assert!(err < TOL, "{name} vae: {err}");

    let io = Reference::open(&base.join(name).join("text_encoder/io.safetensors")).unwrap();
    let ids: Tensor<2> = io.tensor("input_ids", &device).unwrap();
    let ids: Tensor<2, Int> = ids.int();
    let hidden = pipe.text_encoder.forward(ids, 0).unwrap().hidden_state;
    let err = max_relative_error(&hidden, &io.tensor("last_hidden_state", &device).unwrap());
    eprintln!("{name} text encoder: max relative error {err:.3e}");
    assert!(err < TOL, "{name} text encoder: {err}");
}

/// Both checkpoints in one test, one after the other, so that only one is in memory.
#[test]
fn full_size_single_files_load_with_inferred_configs() {
    let Some(base) = cache() else { return };
    check(&base, "sd15", "sd15");
    check(&base, "sd21", "sd15");
}

/// One SDXL component's outputs against diffusers' (`.cache/full-size/sdxl/<part>/io.safetensors`):
/// the UNet with its added conditioning, the VAE's decode, each text encoder's penultimate
/// un-normed states (what SDXL reads) and the second one's projection.
fn check_sdxl_parts(
    base: &Path,
    what: &str,
    unet: &kiln_unet::UNet2DConditionModel,
    vae: &kiln_vae::AutoencoderKL,
    encoders: [&kiln_clip::ClipTextModel; 2],
) {
    let device = common::device();
    let dir = base.join("sdxl");
    let io = Reference::open(&dir.join("unet/io.safetensors")).unwrap();
    let added = kiln_pipeline::AddedConditioning {
        text_embeds: io.tensor("text_embeds", &device).unwrap(),
        time_ids: io.tensor("time_ids", &device).unwrap(),
    };
    let out = unet
        .forward_with(
            io.tensor("sample", &device).unwrap(),
            io.tensor("timestep", &device).unwrap(),
            io.tensor("encoder_hidden_states", &device).unwrap(),
            &kiln_pipeline::ExtraConditioning {
                added: Some(added),
                timestep_cond: None,
            },
        )
        .unwrap();
    let err = max_relative_error(&out, &io.tensor("output", &device).unwrap());
    eprintln!("sdxl ({what}) unet: max relative error {err:.3e}");
    assert!(err < TOL, "sdxl ({what}) unet: {err}");

    let io = Reference::open(&dir.join("vae/io.safetensors")).unwrap();
    let decoded = vae
        .decode(io.tensor("latent", &device).unwrap(), None)
        .unwrap();
    let err = max_relative_error(&decoded, &io.tensor("decoded", &device).unwrap());
    eprintln!("sdxl ({what}) vae decode: max relative error {err:.3e}");
    assert!(err < TOL, "sdxl ({what}) vae: {err}");

    for (part, encoder) in ["text_encoder", "text_encoder_2"].iter().zip(encoders) {
        let io = Reference::open(&dir.join(part).join("io.safetensors")).unwrap();
        let ids: Tensor<2> = io.tensor("input_ids", &device).unwrap();
        let out = encoder
            .forward(ids.int(), kiln_clip::HiddenLayer::Raw(1))
            .unwrap();
        let err = max_relative_error(
            &out.hidden_state,
            &io.tensor("penultimate", &device).unwrap(),
        );
        eprintln!("sdxl ({what}) {part}: max relative error {err:.3e}");
        assert!(err < TOL, "sdxl ({what}) {part}: {err}");
        if let Some(embeds) = out.text_embeds {
            let err = max_relative_error(&embeds, &io.tensor("text_embeds", &device).unwrap());
            eprintln!("sdxl ({what}) {part} text_embeds: max relative error {err:.3e}");
            assert!(err < TOL, "sdxl ({what}) {part} text_embeds: {err}");
        }
    }
}

/// SDXL 1.0 base at full size with random weights (`cargo xtask py full_size.py make-sdxl`):
/// each component from its diffusers folder, then the whole model from the F16 single file of
/// the same values with inferred configs.
#[test]
fn full_size_sdxl_from_folders_and_a_single_file() {
    use burn::module::Module;
    let Some(base) = cache() else { return };
    if !base.join("sdxl.safetensors").is_file() {
        eprintln!("skipped: run `cargo xtask py full_size.py make-sdxl` first");
        return;
    }
    let device = common::device();
    let dir = base.join("sdxl");
    let params: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("params.json")).unwrap()).unwrap();
    {
        let f32 = burn::tensor::DType::F32;
        let unet =
            kiln_unet::UNet2DConditionModel::from_pretrained(&dir.join("unet"), f32, &device)
                .unwrap();
        assert_eq!(Some(unet.num_params() as u64), params["unet"].as_u64());
        let vae = kiln_vae::AutoencoderKL::from_pretrained(&dir.join("vae"), f32, &device).unwrap();
        let te = kiln_clip::ClipTextModel::from_dir(dir.join("text_encoder"), &device).unwrap();
        let te2 = kiln_clip::ClipTextModel::from_dir(dir.join("text_encoder_2"), &device).unwrap();
        assert_eq!(
            Some(te2.num_params() as u64),
            params["text_encoder_2"].as_u64()
        );
        check_sdxl_parts(&base, "folders", &unet, &vae, [&te, &te2]);
    }
    let start = std::time::Instant::now();
    let pipe = StableDiffusionPipeline::from_single_file(
        &base.join("sdxl.safetensors"),
        &SingleFileOptions::default(),
        &device,
    )
    .unwrap();
    eprintln!(
        "sdxl.safetensors: loaded with inferred configs in {:.1?}",
        start.elapsed()
    );
    assert!(pipe.is_sdxl() && !pipe.is_sdxl_refiner());
    assert_eq!(pipe.default_size(), (1024, 1024));
    assert_eq!(pipe.generation.guidance_scale, 5.0);
    let te2 = pipe.text_encoder_2.as_ref().unwrap();
    check_sdxl_parts(
        &base,
        "single file",
        &pipe.unet,
        &pipe.vae,
        [&pipe.text_encoder, te2],
    );
}
