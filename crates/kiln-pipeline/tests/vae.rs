//! Swapping a pipeline's VAE (`StableDiffusionPipeline::load_vae`, `kiln generate --vae`): from
//! a diffusers VAE folder, a model folder, a whole single-file checkpoint, a VAE file of its own
//! in the original LDM layout (A1111's) and one in diffusers' layout. The tiny SD 1.x pipeline's
//! VAE (two levels, one ResNet each) and `fixtures/vae`'s (three levels, two ResNets each) are
//! different models, so each swap is seen in what the pipeline decodes.

mod common;

use std::path::Path;

use burn::tensor::{DType, Distribution, Tensor};
use kiln_pipeline::{Error, LoadOptions, StableDiffusionPipeline};
use kiln_vae::AutoencoderKL;

fn load(dir: &Path) -> StableDiffusionPipeline {
    StableDiffusionPipeline::from_pretrained(dir, LoadOptions::default(), &common::device())
        .unwrap()
}

/// `fixtures/vae/vae`: another VAE with the same latent channels.
fn other_vae() -> std::path::PathBuf {
    common::root().join("fixtures/vae/vae")
}

fn decode(pipe: &StableDiffusionPipeline, latents: &Tensor<4>) -> Vec<f32> {
    pipe.vae
        .decode(latents.clone(), None)
        .unwrap()
        .into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .unwrap()
}

/// `src`'s tensors, as they are, under the names `rename(name)` gives (none: left out), into
/// `dst`.
fn renamed(src: &Path, dst: &Path, rename: impl Fn(&str) -> Vec<String>) {
    let bytes = std::fs::read(src).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let views: Vec<_> = file
        .tensors()
        .into_iter()
        .flat_map(|(name, view)| rename(&name).into_iter().map(move |n| (n, view.clone())))
        .collect();
    safetensors::serialize_to_file(views, None, dst).unwrap();
}

#[test]
fn vaes_load_from_folders_and_files() {
    let device = common::device();
    let model = common::model("sd1");
    let mut pipe = load(model.path());
    let own_config = pipe.vae.config.clone();
    let latents = Tensor::<4>::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let own = decode(&pipe, &latents);
    let other = AutoencoderKL::from_pretrained(&other_vae(), DType::F32, &device)
        .unwrap()
        .decode(latents.clone(), None)
        .unwrap()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    assert_ne!(own.len(), other.len(), "the two VAEs scale by 2 and 4");

    // a diffusers VAE folder
    pipe.load_vae(&other_vae()).unwrap();
    assert_eq!(pipe.vae_scale_factor(), 4);
    assert_eq!(decode(&pipe, &latents), other);

    let tmp = tempfile::tempdir().unwrap();
    let checkpoint = common::root().join("fixtures/single-file/sd1.safetensors");
    // A1111's layout: LDM names without a prefix, and here the autoencoder's training loss
    // left in (skipped, as in whole checkpoints)
    let ldm = tmp.path().join("vae-ft-mse.safetensors");
    renamed(&checkpoint, &ldm, |name| {
        let Some(key) = name.strip_prefix("first_stage_model.") else {
            return Vec::new();
        };
        let mut names = vec![key.to_string()];
        if key == "quant_conv.bias" {
            names.push("loss.logvar".into());
        }
        names
    });
    let diffusers_file = model
        .path()
        .join("vae/diffusion_pytorch_model.fp16.safetensors");
    // `fixtures/pickle/`: the same VAE in a 2022 diffusers folder (`diffusion_pytorch_model.bin`
    // with the pre-2023 attention names), and the whole checkpoint as a `.ckpt`
    let pickles = common::root().join("fixtures/pickle");
    let old_folder = pickles.join("vae");
    let old_file = old_folder.join("diffusion_pytorch_model.bin");
    let ckpt = pickles.join("sd1.ckpt");
    for (what, source) in [
        ("a whole single-file checkpoint", checkpoint.as_path()),
        ("an LDM VAE file", &ldm),
        ("a diffusers-named VAE file", &diffusers_file),
        ("the model folder's vae/", model.path()),
        ("a 2022 diffusers folder", &old_folder),
        ("its .bin file", &old_file),
        ("a .ckpt checkpoint", &ckpt),
    ] {
        pipe.load_vae(&other_vae()).unwrap();
        assert_eq!(decode(&pipe, &latents), other, "{what}");
        pipe.load_vae(source)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        // the layout read from the file's shapes, the rest kept: the model's own config again
        assert_eq!(pipe.vae.config, own_config, "{what}");
        assert_eq!(decode(&pipe, &latents), own, "{what}");
    }
}

#[test]
fn scaling_factors_follow_folders_and_files_keep_the_models() {
    let model = common::model("sd1");
    let mut pipe = load(model.path());
    let tmp = tempfile::tempdir().unwrap();
    kiln_nn::config::copy_dir(&other_vae(), tmp.path()).unwrap();
    let config = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"scaling_factor\": 0.18215", "\"scaling_factor\": 0.5"),
    )
    .unwrap();
    pipe.load_vae(tmp.path()).unwrap();
    assert_eq!(pipe.vae.scaling_factor(), 0.5);
    // a file carries no config: the scaling factor stays the current VAE's
    let file = model
        .path()
        .join("vae/diffusion_pytorch_model.fp16.safetensors");
    pipe.load_vae(&file).unwrap();
    assert_eq!(pipe.vae.scaling_factor(), 0.5);
    assert_eq!(pipe.vae_scale_factor(), 2);
}

#[test]
fn bad_vaes_are_refused_and_leave_the_pipeline_as_it_was() {
    let device = common::device();
    let model = common::model("sd1");
    let mut pipe = load(model.path());
    let latents = Tensor::<4>::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let own = decode(&pipe, &latents);
    let tmp = tempfile::tempdir().unwrap();

    // latents of other channels (a VAE of another family), refused before any weight is read
    let eight = tmp.path().join("eight");
    kiln_nn::config::copy_dir(&other_vae(), &eight).unwrap();
    let config = eight.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"latent_channels\": 4", "\"latent_channels\": 8"),
    )
    .unwrap();
    let err = pipe.load_vae(&eight).unwrap_err();
    assert!(matches!(err, Error::Mismatch(_)), "{err}");
    assert!(err.to_string().contains("8 channels"), "{err}");
    // the same for a file, whose layout its shapes give: only `decoder.conv_in` says 8 latent
    // channels, so loading the weights would fail on shapes; the refusal comes first
    let file = tmp.path().join("eight.safetensors");
    let bytes = std::fs::read(
        model
            .path()
            .join("vae/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    let source = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let conv_in = source.tensor("decoder.conv_in.weight").unwrap();
    let mut shape = conv_in.shape().to_vec();
    shape[1] = 8;
    let zeros = vec![0u8; shape.iter().product::<usize>() * 2];
    let views: Vec<_> = source
        .tensors()
        .into_iter()
        .map(|(name, view)| match name.as_str() {
            "decoder.conv_in.weight" => (
                name,
                safetensors::tensor::TensorView::new(view.dtype(), shape.clone(), &zeros).unwrap(),
            ),
            _ => (name, view),
        })
        .collect();
    safetensors::serialize_to_file(views, None, &file).unwrap();
    let err = pipe.load_vae(&file).unwrap_err();
    assert!(matches!(err, Error::Mismatch(_)), "{err}");
    assert!(err.to_string().contains("8 channels"), "{err}");

    // a file with no autoencoder in it (a UNet's weights)
    let unet = model
        .path()
        .join("unet/diffusion_pytorch_model.fp16.safetensors");
    let err = pipe.load_vae(&unet).unwrap_err().to_string();
    assert!(err.contains("holds no autoencoder"), "{err}");

    // a folder with neither config.json nor vae/
    let err = pipe.load_vae(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("neither a diffusers VAE folder"), "{err}");

    // nothing there
    let err = pipe
        .load_vae(&tmp.path().join("absent.safetensors"))
        .unwrap_err();
    assert!(
        matches!(err, Error::Nn(kiln_nn::Error::NotFound { .. })),
        "{err}"
    );

    // a pickle file that is not a checkpoint
    let ckpt = tmp.path().join("vae.ckpt");
    std::fs::write(&ckpt, b"not read").unwrap();
    let err = pipe.load_vae(&ckpt).unwrap_err().to_string();
    assert!(err.contains("not a PyTorch checkpoint"), "{err}");

    assert_eq!(decode(&pipe, &latents), own);
}
