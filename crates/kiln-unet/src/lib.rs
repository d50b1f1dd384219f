//! The Stable Diffusion denoiser (`UNet2DConditionModel`) on burn, shaped entirely by diffusers'
//! `unet/config.json`: one implementation for SD 1.x, SD 2.x, SDXL (base and refiner), their
//! inpainting variants and fine-tunes. Weights load from `diffusion_pytorch_model{,.fp16}.safetensors` with diffusers'
//! key names.
//!
//! ```no_run
//! # fn main() -> kiln_unet::Result<()> {
//! use burn::tensor::{DType, Device, Tensor};
//! let device = Device::default();
//! let unet = kiln_unet::UNet2DConditionModel::from_pretrained("sd15/unet".as_ref(), DType::F32, &device)?;
//! let latents = Tensor::<4>::zeros([2, 4, 64, 64], &device);
//! let t = Tensor::<1>::from_floats([981.0], &device);
//! let text = Tensor::<3>::zeros([2, 77, 768], &device);
//! let noise_pred = unet.forward(latents, t, text)?; // [2, 4, 64, 64]
//! # Ok(()) }
//! ```

pub mod attention;
mod error;
pub mod transformer_2d;
pub mod unet_2d_blocks;
pub mod unet_2d_condition;

pub use error::{Error, Result};
pub use unet_2d_condition::{
    AddedConditioning, ExtraConditioning, UNet2DConditionModel, UNet2DConditionModelConfig,
    guidance_scale_embedding,
};
