//! A tiled VAE decode with random weights, reporting wall time and the process's peak resident
//! memory (`VmHWM`).
//!
//! ```text
//! cargo run -p kiln-vae --example vae_memory -- [path/to/vae/config.json] [latent side]
//! ```
//!
//! Without arguments it builds the SD 1.5 VAE (`.cache/full-size/sd15/vae/config.json`, written
//! by `cargo xtask py full_size.py make`) and decodes a 64x64 latent (512x512 image) with
//! diffusers' default tiling (512-pixel tiles, overlap 0.25). Tiles are decoded one at a time, so
//! the peak stays that of one tile plus the decoded image: a 256x256 latent (2048x2048 image)
//! peaks at this figure plus about 0.1 GiB of finished tiles.

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use kiln_vae::{AutoencoderKL, AutoencoderKLConfig, TilingOptions};

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
            .join("../../.cache/full-size/sd15/vae/config.json")
    });
    let side: usize = args.next().map(|s| s.parse()).transpose()?.unwrap_or(64);
    let config = AutoencoderKLConfig::from_file(&config_path)?;
    let device = Device::default();
    let vae = AutoencoderKL::new(&config, &device)?;
    let tiling = TilingOptions::from_config(&config);
    let latent = Tensor::<4>::random(
        [1, config.latent_channels, side, side],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    println!(
        "{} parameters, tiles of {} px",
        vae.num_params(),
        tiling.tile_sample_size
    );
    let start = Instant::now();
    let image = vae.decode(latent, Some(&tiling))?;
    let dims = image.dims();
    let sum: f32 = image.sum().into_scalar();
    println!(
        "decode {side}x{side} -> {dims:?} in {:.2} s (checksum {sum:.3}); peak RSS {:.2} GiB",
        start.elapsed().as_secs_f64(),
        peak_rss_gib().unwrap_or(f64::NAN)
    );
    Ok(())
}
