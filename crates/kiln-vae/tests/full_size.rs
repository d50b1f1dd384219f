//! Full-size parity: the SD 1.5 and SD 2.1 VAE configs with random weights against diffusers:
//! encode a 64x96 image and decode a 16x24 latent.
//!
//! Gated: runs only with `KILN_FULL_SIZE=1`, after `cargo xtask py full_size.py make` has
//! written `.cache/full-size/`:
//!
//! ```text
//! KILN_FULL_SIZE=1 cargo test -p kiln-vae --test full_size -- --nocapture
//! ```
//!
//! Error measure: `max |kiln - diffusers| / max |diffusers|`, tolerance [`TOL`] in f32.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor};
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use kiln_vae::AutoencoderKL;

/// A forward pass in f32 against the reference in f32: the bound, and why it holds on any CPU
/// or thread count, is [`tolerance::FORWARD`].
const TOL: f32 = tolerance::FORWARD;

fn cache() -> Option<PathBuf> {
    if std::env::var_os("KILN_FULL_SIZE").is_none() {
        eprintln!("skipped: set KILN_FULL_SIZE=1 (after `cargo xtask py full_size.py make`)");
        return None;
    }
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/full-size"))
}

fn check(base: &Path, name: &str) {
    let device = Device::default();
    let dir = base.join(name).join("vae");
    let vae = AutoencoderKL::from_pretrained(&dir, DType::F32, &device).unwrap();
    assert_eq!(vae.scale_factor(), 8);
    let io = Reference::open(&dir.join("io.safetensors")).unwrap();
    let t = |n: &str| -> Tensor<4> { io.tensor(n, &device).unwrap() };
    let posterior = vae.encode(t("image"), None).unwrap();
    let decoded = vae.decode(t("latent"), None).unwrap();
    for (what, actual, expected) in [
        ("mean", &posterior.mean, "mean"),
        ("logvar", &posterior.logvar, "logvar"),
        ("decode", &decoded, "decoded"),
    ] {
        let err = max_relative_error(actual, &t(expected));
        eprintln!("{name} vae {what}: max relative error {err:.3e}");
        assert!(
            err < TOL,
            "{name} vae {what}: relative error {err} >= {TOL}"
        );
    }
    let params: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base.join(name).join("params.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        Some(vae.num_params() as u64),
        params["vae"].as_u64(),
        "{name}: parameter count"
    );
    eprintln!("{name} vae: {} parameters", vae.num_params());
}

#[test]
fn sd15_and_sd21_vaes_match_diffusers() {
    let Some(base) = cache() else { return };
    check(&base, "sd15");
    check(&base, "sd21");
}
