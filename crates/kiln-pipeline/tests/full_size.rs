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
