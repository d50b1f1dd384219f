//! Shared building blocks of Kiln: errors, config reading, device selection, activations and
//! strict safetensors weight loading over burn-store.
//!
//! Every model crate (`kiln-clip`, `kiln-vae`, `kiln-unet`) builds on these; nothing here knows a
//! particular model.

pub mod activation;
pub mod alloc;
pub mod attention;
pub mod config;
pub mod conv;
pub mod device;
pub mod embeddings;
mod error;
pub mod flops;
pub mod init;
#[cfg(feature = "flex")]
pub mod kernels;
pub mod linear;
pub mod lora;
pub mod normalization;
pub mod precision;
pub mod profile;
pub mod reference;
pub mod resampling;
pub mod resnet;
pub mod weights;

pub use burn;
pub use device::{FloatKind, available_devices, default_device, parse_device};
pub use error::{Error, Result};
