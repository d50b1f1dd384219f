//! Parity of `AutoencoderKL` with diffusers on the tiny fixture of `xtask/fixtures/unet_vae.py`
//! (three blocks, scale factor 4, every parameter randomised, non-square inputs).
//!
//! Error measure: `max |kiln - diffusers| / max |diffusers|` over the whole output
//! ([`max_relative_error`]); tolerance [`TOL`] in f32.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor};
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use kiln_vae::{AutoencoderKL, Error, TilingOptions};

/// A forward pass in f32 against the reference in f32: the bound, and why it holds on any CPU
/// or thread count, is [`tolerance::FORWARD`].
const TOL: f32 = tolerance::FORWARD;

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/vae")
}

struct Setup {
    device: Device,
    vae: AutoencoderKL,
    io: Reference,
}

fn setup() -> Setup {
    let device = Device::default();
    let dir = fixture_dir();
    let vae = AutoencoderKL::from_pretrained(&dir.join("vae"), DType::F32, &device).unwrap();
    let io = Reference::open(&dir.join("io.safetensors")).unwrap();
    Setup { device, vae, io }
}

impl Setup {
    fn t(&self, name: &str) -> Tensor<4> {
        self.io.tensor(name, &self.device).unwrap()
    }

    fn check(&self, what: &str, actual: &Tensor<4>, expected: &str) -> f32 {
        let err = max_relative_error(actual, &self.t(expected));
        eprintln!("{what}: max relative error {err:.3e}");
        assert!(err < TOL, "{what}: relative error {err} >= {TOL}");
        err
    }
}

#[test]
fn scale_factor_comes_from_the_config() {
    let s = setup();
    assert_eq!(s.vae.scale_factor(), 4);
    assert_eq!(s.vae.scaling_factor(), 0.18215);
    assert_eq!(s.vae.shift_factor(), 0.0);
}

#[test]
fn encode_matches_diffusers() {
    let s = setup();
    let posterior = s.vae.encode(s.t("image"), None).unwrap();
    s.check("mean", &posterior.mean, "mean");
    s.check("logvar", &posterior.logvar, "logvar");
    s.check("sample", &posterior.sample(s.t("noise")), "sample");
    s.check("mode", &posterior.mode(), "mean");
}

#[test]
fn decode_matches_diffusers() {
    let s = setup();
    let decoded = s.vae.decode(s.t("latent"), None).unwrap();
    s.check("decode", &decoded, "decoded");
}

#[test]
fn tiled_encode_and_decode_match_diffusers() {
    let s = setup();
    let tiling = TilingOptions::from_config(&s.vae.config);
    assert_eq!(tiling.tile_sample_size, 32);
    let mean = s.vae.encode(s.t("big_image"), Some(&tiling)).unwrap().mean;
    s.check("tiled encode", &mean, "tiled_mean");
    let decoded = s.vae.decode(s.t("big_latent"), Some(&tiling)).unwrap();
    s.check("tiled decode", &decoded, "tiled_decoded");
    // The fixture really exercises tiling: untiled decoding differs far beyond the tolerance.
    let untiled = s.vae.decode(s.t("big_latent"), None).unwrap();
    assert!(max_relative_error(&untiled, &s.t("tiled_decoded")) > 100.0 * TOL);
}

#[test]
fn bad_inputs_are_typed_errors() {
    let s = setup();
    let wrong_channels = Tensor::<4>::zeros([1, 4, 32, 32], &s.device);
    assert!(matches!(
        s.vae.encode(wrong_channels, None),
        Err(Error::InputShape { name: "image", .. })
    ));
    let not_multiple = Tensor::<4>::zeros([1, 3, 30, 32], &s.device);
    assert!(matches!(
        s.vae.encode(not_multiple, None),
        Err(Error::InputShape { name: "image", .. })
    ));
    let wrong_latent = Tensor::<4>::zeros([1, 3, 8, 8], &s.device);
    assert!(matches!(
        s.vae.decode(wrong_latent, None),
        Err(Error::InputShape { name: "latent", .. })
    ));
}

/// Rewrites the fixture's weights through `edit` into a temporary folder next to its config.
fn edited_copy(
    edit: impl Fn(&str, Vec<f32>, Vec<usize>) -> Option<(safetensors::Dtype, Vec<u8>, Vec<usize>)>,
    file_name: &str,
) -> tempfile::TempDir {
    renamed_copy(|name| name.to_string(), edit, file_name)
}

/// [`edited_copy`], each tensor stored under `rename(name)`.
fn renamed_copy(
    rename: impl Fn(&str) -> String,
    edit: impl Fn(&str, Vec<f32>, Vec<usize>) -> Option<(safetensors::Dtype, Vec<u8>, Vec<usize>)>,
    file_name: &str,
) -> tempfile::TempDir {
    let src = fixture_dir().join("vae");
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let tensors = kiln_nn::reference::read_tensors(&src.join(WEIGHTS)).unwrap();
    let mut out = Vec::new();
    for (name, data) in tensors {
        let shape = data.shape().to_vec();
        if let Some(entry) = edit(&name, data.try_to_vec::<f32>().unwrap(), shape) {
            out.push((rename(&name), entry));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = out
        .iter()
        .map(|(name, (dtype, bytes, shape))| {
            (
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &tmp.path().join(file_name)).unwrap();
    tmp
}

const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[test]
fn fp16_variant_loads_into_f32() {
    let tmp = edited_copy(
        |_, values, shape| {
            let bytes = values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect();
            Some((safetensors::Dtype::F16, bytes, shape))
        },
        "diffusion_pytorch_model.fp16.safetensors",
    );
    let s = setup();
    let vae = AutoencoderKL::from_pretrained(tmp.path(), DType::F32, &s.device).unwrap();
    let decoded = vae.decode(s.t("latent"), None).unwrap();
    assert_eq!(decoded.dtype(), DType::F32);
    // f16 weights: close to the f32 reference, but not bit-equal.
    let err = max_relative_error(&decoded, &s.t("decoded"));
    assert!(
        err < 1e-2 && err > 0.0,
        "fp16 variant: relative error {err}"
    );
}

/// A file with the attention names diffusers wrote before 2023 (`query`, `key`, `value`,
/// `proj_attn`, as the hub's SD 1.x / 2.x VAE files have them) loads to the same model.
#[test]
fn deprecated_attention_names_load() {
    let old_names = |name: &str| {
        let mut name = name.to_string();
        for (old, new) in kiln_vae::autoencoder_kl::DEPRECATED_ATTENTION_NAMES {
            name = name.replace(
                &format!(".attentions.0.{new}."),
                &format!(".attentions.0.{old}."),
            );
        }
        name
    };
    let names = kiln_nn::reference::read_tensors(&fixture_dir().join("vae").join(WEIGHTS)).unwrap();
    let renamed = names.iter().filter(|(name, _)| old_names(name) != **name);
    assert_eq!(renamed.count(), 16);
    let tmp = renamed_copy(
        old_names,
        |_, values, shape| Some((safetensors::Dtype::F32, f32_bytes(&values), shape)),
        WEIGHTS,
    );
    let s = setup();
    let old = AutoencoderKL::from_pretrained(tmp.path(), DType::F32, &s.device).unwrap();
    let decoded = old.decode(s.t("latent"), None).unwrap();
    let expected = s.vae.decode(s.t("latent"), None).unwrap();
    assert_eq!(
        decoded.into_data().try_to_vec::<f32>().unwrap(),
        expected.into_data().try_to_vec::<f32>().unwrap()
    );
}

#[test]
fn missing_and_misshaped_tensors_are_named() {
    let missing = "decoder.mid_block.attentions.0.to_k.weight";
    let tmp = edited_copy(
        |name, values, shape| {
            (name != missing).then(|| (safetensors::Dtype::F32, f32_bytes(&values), shape))
        },
        WEIGHTS,
    );
    let device = Device::default();
    match AutoencoderKL::from_pretrained(tmp.path(), DType::F32, &device) {
        Err(Error::Nn(kiln_nn::Error::MissingTensor { name, .. })) => assert_eq!(name, missing),
        other => panic!("expected MissingTensor, got {other:?}"),
    }

    let misshaped = "encoder.conv_in.bias";
    let tmp = edited_copy(
        |name, mut values, mut shape| {
            if name == misshaped {
                values.push(0.0);
                shape[0] += 1;
            }
            Some((safetensors::Dtype::F32, f32_bytes(&values), shape))
        },
        WEIGHTS,
    );
    match AutoencoderKL::from_pretrained(tmp.path(), DType::F32, &device) {
        Err(Error::Nn(kiln_nn::Error::ShapeMismatch { name, .. })) => assert_eq!(name, misshaped),
        other => panic!("expected ShapeMismatch, got {other:?}"),
    }
}
