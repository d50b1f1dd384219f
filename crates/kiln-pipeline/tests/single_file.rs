//! Single-file (CompVis / LDM key) checkpoints: the tiny SD 1.x and SD 2.x pipelines of
//! `fixtures/pipeline/` written in LDM layout by `xtask/fixtures/single_file.py` (and read back
//! there by diffusers' `from_single_file` to exactly the folders' weights) must give diffusers'
//! images for the recorded cases, with the configs taken from a folder that holds no weights.

mod common;

use std::path::{Path, PathBuf};

use common::{cases, run_case};
use kiln_nn::reference::{Reference, tolerance};
use kiln_pipeline::{Error, SingleFileOptions, StableDiffusionPipeline};

fn checkpoint(kind: &str) -> PathBuf {
    common::root()
        .join("fixtures/single-file")
        .join(format!("{kind}.safetensors"))
}

/// The assembled diffusers folder of `kind` with every weight file removed.
fn configs_only(kind: &str) -> tempfile::TempDir {
    let dir = common::model(kind);
    for component in ["unet", "vae", "text_encoder"] {
        for entry in std::fs::read_dir(dir.path().join(component)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                std::fs::remove_file(path).unwrap();
            }
        }
    }
    dir
}

fn options(config: &Path) -> SingleFileOptions {
    SingleFileOptions {
        config: Some(config.to_path_buf()),
        ..SingleFileOptions::default()
    }
}

#[test]
fn single_files_give_diffusers_images() {
    let device = common::device();
    let reference = Reference::open(&common::fixtures().join("expected.safetensors")).unwrap();
    let mut failures = Vec::new();
    let mut ran = 0;
    for kind in ["sd1", "sd2"] {
        let config = configs_only(kind);
        let pipe = StableDiffusionPipeline::from_single_file(
            &checkpoint(kind),
            &options(config.path()),
            &device,
        )
        .unwrap();
        for case in cases().iter().filter(|c| c.model == kind) {
            let (float_diff, byte_diff) = run_case(case, &pipe, &reference);
            eprintln!(
                "{kind}.safetensors, {}: max |float diff| {float_diff:.2e}, max 8-bit diff {byte_diff}",
                case.name
            );
            if byte_diff > tolerance::levels(tolerance::IMAGE) || float_diff > tolerance::IMAGE {
                failures.push(format!("{}: {float_diff:e} / {byte_diff}", case.name));
            }
            ran += 1;
        }
    }
    assert!(ran >= 8, "only {ran} cases ran");
    assert!(failures.is_empty(), "beyond tolerance: {failures:?}");
}

#[test]
fn tiny_checkpoints_without_configs_ask_for_them() {
    // 8-wide text encoders and 16-channel UNets have no SD 1.x/2.x head layout to infer
    let err = StableDiffusionPipeline::from_single_file(
        &checkpoint("sd1"),
        &SingleFileOptions::default(),
        &common::device(),
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, Error::Checkpoint(_)), "{message}");
    assert!(message.contains("give the configs"), "{message}");
}

/// `fixtures/pickle/sd1.ckpt` (`xtask/fixtures/pickle_files.py`) is `sd1.safetensors` as the
/// original `.ckpt` files hold a model (Lightning's `state_dict`, optimizer state beside it): it
/// loads to the same weights, so to the same images, bit for bit.
#[test]
fn pickle_checkpoints_load_as_their_safetensors_twins() {
    let device = common::device();
    let config = configs_only("sd1");
    let ckpt = common::root().join("fixtures/pickle/sd1.ckpt");
    let from_pickle =
        StableDiffusionPipeline::from_single_file(&ckpt, &options(config.path()), &device).unwrap();
    let from_safetensors = StableDiffusionPipeline::from_single_file(
        &checkpoint("sd1"),
        &options(config.path()),
        &device,
    )
    .unwrap();
    for (what, ours, theirs) in [
        (
            "UNet",
            common::module_bits(&from_pickle.unet),
            common::module_bits(&from_safetensors.unet),
        ),
        (
            "VAE",
            common::module_bits(&from_pickle.vae),
            common::module_bits(&from_safetensors.vae),
        ),
        (
            "text encoder",
            common::module_bits(&from_pickle.text_encoder),
            common::module_bits(&from_safetensors.text_encoder),
        ),
    ] {
        assert!(!ours.is_empty());
        assert!(ours == theirs, "{what}: the pickle's weights differ");
    }
    let reference = Reference::open(&common::fixtures().join("expected.safetensors")).unwrap();
    let cases = cases();
    let case = cases.iter().find(|c| c.model == "sd1").unwrap();
    let (float_diff, byte_diff) = run_case(case, &from_pickle, &reference);
    assert!(
        float_diff <= tolerance::IMAGE && byte_diff <= tolerance::levels(tolerance::IMAGE),
        "{}: {float_diff:e} / {byte_diff}",
        case.name
    );

    // not a checkpoint, or missing: clear errors, whatever the extension says
    let tmp = tempfile::tempdir().unwrap();
    for name in ["v1-5-pruned-emaonly.ckpt", "model.PT"] {
        let path = tmp.path().join(name);
        let err =
            StableDiffusionPipeline::from_single_file(&path, &options(config.path()), &device)
                .unwrap_err();
        assert!(
            matches!(err, Error::Nn(kiln_nn::Error::NotFound { .. })),
            "{err}"
        );
        std::fs::write(&path, b"not a checkpoint").unwrap();
        let err =
            StableDiffusionPipeline::from_single_file(&path, &options(config.path()), &device)
                .unwrap_err();
        assert!(
            matches!(err, Error::Nn(kiln_nn::Error::NotPytorch { .. })),
            "{err}"
        );
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn diffusers_weight_files_are_not_single_file_checkpoints() {
    let unet = common::fixtures().join("sd1/unet/diffusion_pytorch_model.fp16.safetensors");
    let err = StableDiffusionPipeline::from_single_file(
        &unet,
        &SingleFileOptions::default(),
        &common::device(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("model.diffusion_model"), "{err}");
}

/// A copy of the sd1 checkpoint with `edit` applied to its (name, tensor) list.
fn edited(
    edit: impl Fn(&mut Vec<(String, safetensors::tensor::TensorView<'_>)>),
) -> tempfile::NamedTempFile {
    let bytes = std::fs::read(checkpoint("sd1")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::tensor::TensorView<'_>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| (name.to_string(), view))
        .collect();
    edit(&mut tensors);
    let out = tempfile::Builder::new()
        .suffix(".safetensors")
        .tempfile()
        .unwrap();
    safetensors::serialize_to_file(tensors, None, out.path()).unwrap();
    out
}

#[test]
fn missing_and_unknown_tensors_are_named() {
    let config = configs_only("sd1");
    let device = common::device();
    let missing = edited(|t| t.retain(|(n, _)| n != "model.diffusion_model.out.2.bias"));
    let err =
        StableDiffusionPipeline::from_single_file(missing.path(), &options(config.path()), &device)
            .unwrap_err()
            .to_string();
    assert!(err.contains("UNet's `conv_out.bias`"), "{err}");

    let unknown = edited(|t| {
        let view = t[0].1.clone();
        t.push(("model.diffusion_model.input_blocks.1.5.weight".into(), view));
    });
    let err =
        StableDiffusionPipeline::from_single_file(unknown.path(), &options(config.path()), &device)
            .unwrap_err()
            .to_string();
    assert!(err.contains("input_blocks.1.5.weight"), "{err}");

    let no_vae = edited(|t| t.retain(|(n, _)| !n.starts_with("first_stage_model.")));
    let err =
        StableDiffusionPipeline::from_single_file(no_vae.path(), &options(config.path()), &device)
            .unwrap_err()
            .to_string();
    assert!(err.contains("VAE"), "{err}");
}

/// A single file converted to a diffusers folder loads with `from_pretrained` and gives the same
/// images, its weights copied in their file dtype.
#[test]
fn converted_folders_give_diffusers_images() {
    let device = common::device();
    let reference = Reference::open(&common::fixtures().join("expected.safetensors")).unwrap();
    let out = tempfile::tempdir().unwrap();
    for kind in ["sd1", "sd2"] {
        let config = configs_only(kind);
        let folder = out.path().join(kind);
        kiln_pipeline::convert_to_diffusers(&checkpoint(kind), &options(config.path()), &folder)
            .unwrap();
        let header =
            kiln_nn::weights::read_header(&folder.join("unet/diffusion_pytorch_model.safetensors"))
                .unwrap();
        assert!(header.values().all(|t| t.dtype == "F16"));
        let text =
            kiln_nn::weights::read_header(&folder.join("text_encoder/model.safetensors")).unwrap();
        assert!(text.keys().all(|k| k.starts_with("text_model.")));
        let pipe = StableDiffusionPipeline::from_pretrained(
            &folder,
            kiln_pipeline::LoadOptions::default(),
            &device,
        )
        .unwrap();
        for case in cases()
            .iter()
            .filter(|c| c.model == kind && c.mode == "txt2img")
        {
            let (float_diff, byte_diff) = run_case(case, &pipe, &reference);
            eprintln!(
                "converted {kind}, {}: {float_diff:.2e} / {byte_diff}",
                case.name
            );
            assert!(
                byte_diff <= tolerance::levels(tolerance::IMAGE) && float_diff <= tolerance::IMAGE,
                "{}",
                case.name
            );
        }
        let again = kiln_pipeline::convert_to_diffusers(
            &checkpoint(kind),
            &options(config.path()),
            &folder,
        )
        .unwrap_err()
        .to_string();
        assert!(again.contains("exists"), "{again}");
    }
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        2,
        "no temporary folders left: {leftovers:?}"
    );
}
