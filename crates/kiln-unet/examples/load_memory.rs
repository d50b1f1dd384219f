//! Loads a diffusers `unet/` folder and reports the wall time and the process's peak resident
//! memory (`VmHWM`): what loading costs beyond the weights themselves.
//!
//! ```text
//! cargo run --release -p kiln-unet --example load_memory -- [path/to/unet] [f32|f16]
//! ```
//!
//! Without arguments it loads the SD 1.5 UNet with random weights (`.cache/full-size/sd15/unet`,
//! written by `cargo xtask py full_size.py make`; 3.44 GB of f32 weights).

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{DType, Device};
use kiln_unet::UNet2DConditionModel;

fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.cache/full-size/sd15/unet")
    });
    let dtype = match args.next().as_deref() {
        None | Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some(other) => return Err(format!("unknown dtype `{other}` (f32 or f16)").into()),
    };
    let start = Instant::now();
    let unet = UNet2DConditionModel::from_pretrained(&dir, dtype, &Device::default())?;
    let bytes = unet.num_params() * dtype.size();
    println!(
        "loaded {} parameters ({:.2} GiB as {dtype:?}) in {:.1} s; peak RSS {:.2} GiB",
        unet.num_params(),
        bytes as f64 / (1u64 << 30) as f64,
        start.elapsed().as_secs_f64(),
        peak_rss_gib().unwrap_or(f64::NAN)
    );
    Ok(())
}
