//! One UNet forward at 512x512 (latent 64x64, batch 2: classifier-free guidance) with random
//! weights, reporting wall time and the process's peak resident memory (`VmHWM`).
//!
//! ```text
//! cargo run -p kiln-unet --example unet_memory -- [path/to/unet/config.json] [latent side]
//! ```
//!
//! Without arguments it builds the SD 1.5 UNet (`.cache/full-size/sd15/unet/config.json`, written
//! by `cargo xtask py full_size.py make`). Compare with `cargo xtask py full_size.py memory`.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use kiln_unet::{UNet2DConditionModel, UNet2DConditionModelConfig};

fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let config_path = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../.cache/full-size/sd15/unet/config.json")
    });
    let side: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let config = UNet2DConditionModelConfig::from_file(&config_path)?;
    let device = Device::default();
    let unet = UNet2DConditionModel::new(&config, &device)?;
    let context_dim = match &config.cross_attention_dim {
        kiln_unet::unet_2d_condition::PerBlock::One(d) => *d,
        kiln_unet::unet_2d_condition::PerBlock::Many(d) => d[0],
    };
    let normal = Distribution::Normal(0.0, 1.0);
    let sample = Tensor::<4>::random([2, config.in_channels, side, side], normal, &device);
    let context = Tensor::<3>::random([2, 77, context_dim], normal, &device);
    let t = Tensor::<1>::from_floats([500.0, 500.0], &device);
    // A small warm-up forward materialises the (lazily initialised) weights before timing.
    let m = unet.size_multiple();
    let warm = Tensor::<4>::random([1, config.in_channels, m, m], normal, &device);
    let warm_context = Tensor::<3>::random([1, 77, context_dim], normal, &device);
    unet.forward(warm, Tensor::<1>::from_floats([1.0], &device), warm_context)?;
    println!(
        "{} parameters; peak RSS after a warm-up {:.2} GiB",
        unet.num_params(),
        peak_rss_gib().unwrap_or(f64::NAN)
    );
    let start = Instant::now();
    let out = unet.forward(sample, t, context)?;
    let sum: f32 = out.sum().into_scalar();
    println!(
        "forward {:?} -> {:?} in {:.2} s (checksum {sum:.3}); peak RSS {:.2} GiB",
        [2, config.in_channels, side, side],
        [2, config.out_channels, side, side],
        start.elapsed().as_secs_f64(),
        peak_rss_gib().unwrap_or(f64::NAN)
    );
    Ok(())
}
