//! Full-size parity: the SD 1.5 and SD 2.1 UNet configs with random weights against diffusers,
//! one forward at latent 16x24 (batch 1, 77 context tokens).
//!
//! Heavy (two 3.4 GB models), so gated: it runs only with `KILN_FULL_SIZE=1`, after
//! `cargo xtask py full_size.py make` has written `.cache/full-size/`:
//!
//! ```text
//! KILN_FULL_SIZE=1 cargo test -p kiln-unet --test full_size -- --nocapture
//! ```
//!
//! Error measure: `max |kiln - diffusers| / max |diffusers|`, tolerance [`TOL`] in f32.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor};
use kiln_nn::reference::{Reference, max_relative_error, tolerance};
use kiln_unet::UNet2DConditionModel;

/// A forward pass in f32 against the reference in f32: the bound, and why it holds on any CPU
/// or thread count, is [`tolerance::FORWARD`].
const TOL: f32 = tolerance::FORWARD;

/// diffusers' parameter count of the SD 1.5 UNet.
const SD15_UNET_PARAMS: usize = 859_520_964;

fn cache() -> Option<PathBuf> {
    if std::env::var_os("KILN_FULL_SIZE").is_none() {
        eprintln!("skipped: set KILN_FULL_SIZE=1 (after `cargo xtask py full_size.py make`)");
        return None;
    }
    Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/full-size"))
}

fn check(base: &Path, name: &str) -> usize {
    let device = Device::default();
    let dir = base.join(name).join("unet");
    let start = std::time::Instant::now();
    let unet = UNet2DConditionModel::from_pretrained(&dir, DType::F32, &device).unwrap();
    let loaded = start.elapsed();
    let io = Reference::open(&dir.join("io.safetensors")).unwrap();
    let sample: Tensor<4> = io.tensor("sample", &device).unwrap();
    let t: Tensor<1> = io.tensor("timestep", &device).unwrap();
    let context: Tensor<3> = io.tensor("encoder_hidden_states", &device).unwrap();
    let expected: Tensor<4> = io.tensor("output", &device).unwrap();
    let start = std::time::Instant::now();
    let out = unet.forward(sample, t, context).unwrap();
    let err = max_relative_error(&out, &expected);
    eprintln!(
        "{name} unet: {} parameters, load {loaded:.1?}, forward {:.1?}, max relative error {err:.3e}",
        unet.num_params(),
        start.elapsed()
    );
    assert!(err < TOL, "{name} unet: relative error {err} >= {TOL}");

    let params: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(base.join(name).join("params.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        Some(unet.num_params() as u64),
        params["unet"].as_u64(),
        "{name}: parameter count"
    );
    unet.num_params()
}

/// Both pipelines in one test, one after the other, so that only one 3.4 GB model is in memory.
#[test]
fn sd15_and_sd21_unets_match_diffusers() {
    let Some(base) = cache() else { return };
    assert_eq!(check(&base, "sd15"), SD15_UNET_PARAMS);
    check(&base, "sd21");
}
