//! The Stable Diffusion VAE (`AutoencoderKL`) on burn, shaped entirely by diffusers'
//! `vae/config.json`: any number of blocks (scale factor `2^(blocks - 1)`), tiled encode and
//! decode for large images, weights from `diffusion_pytorch_model{,.fp16}.safetensors`.
//!
//! ```no_run
//! # fn main() -> kiln_vae::Result<()> {
//! use burn::tensor::{DType, Device, Tensor};
//! let device = Device::default();
//! let vae = kiln_vae::AutoencoderKL::from_pretrained("sd15/vae".as_ref(), DType::F32, &device)?;
//! let latent = Tensor::<4>::zeros([1, 4, 64, 64], &device);
//! let image = vae.decode(vae.unscale_latents(latent), None)?; // [1, 3, 512, 512]
//! # Ok(()) }
//! ```

pub mod autoencoder_kl;
mod error;
pub mod unet_2d_blocks;
pub mod vae;

pub use autoencoder_kl::{AutoencoderKL, AutoencoderKLConfig, TilingOptions};
pub use error::{Error, Result};
pub use vae::DiagonalGaussianDistribution;
