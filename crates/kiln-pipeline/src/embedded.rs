//! The default model compiled into Kiln: a tiny Stable Diffusion (VAE, CLIP-style text encoder,
//! UNet) that Kiln trained from scratch on its procedural shapes dataset
//! (`configs/tiny-shapes.toml`; docs/training.md). It draws "a {colour} {shape} on a {colour}
//! background" at 32x32 pixels, and is what `kiln generate` uses when no `--model` is given.
//!
//! The files are compiled into the binary; [`folder`] writes them out once, as a complete
//! diffusers folder, under the system's temporary directory (a name keyed by their content, so a
//! new build never reads an old model), and every loader then reads that folder.

use std::path::PathBuf;
use std::sync::OnceLock;

use burn::tensor::Device;

use crate::{LoadOptions, Result, StableDiffusionPipeline};

/// The model's name, as images' metadata records it.
pub const NAME: &str = "kiln-tiny-shapes";

macro_rules! files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!("../embedded/tiny-shapes/", $path)))),*]
    };
}

/// Every file of the folder but the tokenizer's (CLIP's vocabulary is embedded in kiln-clip).
const FILES: &[(&str, &[u8])] = files![
    "model_index.json",
    "kiln.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
];

/// FNV-1a over every file's name and bytes: the folder's name.
fn digest() -> u64 {
    static DIGEST: OnceLock<u64> = OnceLock::new();
    *DIGEST.get_or_init(|| {
        kiln_nn::init::fnv1a(
            FILES
                .iter()
                .flat_map(|(name, bytes)| name.bytes().chain(bytes.iter().copied())),
        )
    })
}

/// The embedded model as a diffusers folder on disk, written (atomically) on first use.
pub fn folder() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("{NAME}-{:016x}", digest()));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    kiln_nn::config::write_dir_atomically(&dir, true, |tmp: &std::path::Path| -> Result<()> {
        for (name, bytes) in FILES {
            let path = tmp.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| {
                    crate::Error::Nn(kiln_nn::Error::Io {
                        path: parent.to_path_buf(),
                        source,
                    })
                })?;
            }
            std::fs::write(&path, bytes)
                .map_err(|source| crate::Error::Nn(kiln_nn::Error::Io { path, source }))?;
        }
        kiln_clip::ClipTokenizer::write_embedded(&tmp.join("tokenizer"), "<|endoftext|>")?;
        Ok(())
    })?;
    Ok(dir)
}

impl StableDiffusionPipeline {
    /// The default model compiled into Kiln ([`crate::embedded`]), on `device`: generates
    /// 32x32 images of the prompts "a {colour} {shape} on a {colour} background".
    pub fn embedded(device: &Device) -> Result<Self> {
        Self::from_pretrained(&folder()?, LoadOptions::default(), device)
    }
}
