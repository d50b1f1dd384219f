//! Stable Diffusion pipelines for Kiln: tokenizer, text encoder, UNet, scheduler and VAE composed
//! into text-to-image, image-to-image and inpainting, numerically following diffusers'
//! `StableDiffusionPipeline`, `StableDiffusionImg2ImgPipeline` and
//! `StableDiffusionInpaintPipeline` (diffusers 0.42.1).
//!
//! This crate is Kiln's API boundary: applications depend on it; the model crates are usable
//! alone.
//!
//! - **Loading**: [`StableDiffusionPipeline::from_pretrained`] reads a diffusers folder
//!   (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`, `vae/`, `scheduler/`), with
//!   `.fp16.` weight files where those are what the folder has, and checks that the components
//!   fit (text width = cross-attention width, UNet channels = VAE latents, or latents + mask +
//!   masked latents for an inpainting UNet) before reading any weight;
//!   [`StableDiffusionPipeline::from_single_file`] reads one `.safetensors` file with the original
//!   CompVis keys, its configs inferred from the tensor shapes or taken from a folder.
//! - **Scheduler**: the folder's own class and config, or any [`kiln_scheduler::SamplerName`]
//!   converted from it ([`StableDiffusionPipeline::scheduler`]); [`generate`] is generic over
//!   [`kiln_scheduler::Scheduler`].
//! - **Options** ([`GenerateOptions`]): prompt and negative prompt or their embeddings,
//!   classifier-free guidance (unconditional and conditional in one UNet batch; skipped at
//!   `guidance_scale <= 1`), `guidance_rescale`, images per prompt, size, steps, clip skip,
//!   initial latents, and the [`Mode`]: txt2img, img2img (`strength`) or inpainting (a 9-channel
//!   inpainting UNet, or mask blending with a regular UNet, as diffusers does).
//! - **Randomness**: every random tensor comes from one caller-supplied
//!   [`kiln_scheduler::NoiseSource`], in diffusers' order; [`kiln_scheduler::SeededNoise`] draws
//!   on the host, so a seed gives the same image on every backend.
//! - **Progress and cancellation**: a per-step callback ([`StepCallback`]).
//! - **Training**: [`training::DiffusionLoss`], the denoising loss of diffusers' fine-tuning
//!   script (epsilon / v targets, Min-SNR weighting), differentiable on burn's autodiff.
//!
//! # Parity
//!
//! `tests/parity.rs` runs the tiny SD 1.x (PNDM, DDIM with two images, Euler ancestral with
//! diffusers' noise replayed, DPM-Solver++ without guidance), SD 2.x v-prediction (DDIM, Euler
//! with guidance rescale), img2img (DDIM, PNDM) and both inpainting pipelines of
//! `fixtures/pipeline/` against diffusers 0.42.1's images for the same folder and latents: at
//! most 1/255 apart as 8-bit images (the issue's bound is 2/255), at most 8e-5 as floats.
//!
//! `tests/single_file.rs` runs the same cases from single-file (CompVis-key) checkpoints of the
//! same models ([`StableDiffusionPipeline::from_single_file`], [`single_file`]).
//!
//! [`generate`]: StableDiffusionPipeline::generate
//!
//! ```no_run
//! # fn main() -> kiln_pipeline::Result<()> {
//! use kiln_pipeline::{GenerateOptions, LoadOptions, StableDiffusionPipeline};
//! use kiln_scheduler::{SamplerName, SamplerOptions, SeededNoise};
//!
//! let device = kiln_nn::default_device()?;
//! let pipe = StableDiffusionPipeline::from_pretrained(
//!     "stable-diffusion-v1-5".as_ref(),
//!     LoadOptions::default(),
//!     &device,
//! )?;
//! let mut scheduler = pipe.scheduler(Some(SamplerName::DpmPp2m), SamplerOptions::default())?;
//! let options = GenerateOptions::new("a photo of an astronaut riding a horse")
//!     .with_negative_prompt("blurry")
//!     .with_steps(25)
//!     .with_size(512, 512);
//! let out = pipe.generate(&mut scheduler, &options, &mut SeededNoise::new(42), None)?;
//! let images = out.to_rgb8()?; // 8-bit RGB, one per image
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

#[cfg(feature = "embedded-model")]
pub mod embedded;
mod error;
pub mod hires;
pub mod lora;
pub mod memory;
pub mod pipeline_stable_diffusion;
pub mod presets;
pub mod single_file;
pub mod text_encoders;
pub mod training;

pub use error::{Error, Result};
pub use hires::{HiresFix, LatentUpscaler};
pub use kiln_clip::PromptSyntax;
pub use kiln_unet::{AddedConditioning, ExtraConditioning};
pub use lora::{LoadedLora, LoraOptions};
pub use pipeline_stable_diffusion::{
    Conditioning, GENERATION_FILE, GenerateOptions, GenerateOutput, GenerationDefaults,
    LoadOptions, MicroConditioning, Mode, RgbImage, StableDiffusionPipeline, StepCallback,
    StepProgress, images_to_rgb8, rgb8_to_tensor,
};
pub use presets::{ModelConfigs, Preset};
pub use single_file::{
    Family, SingleFileConfig, SingleFileOptions, convert_to_diffusers, infer_config,
    write_model_index,
};
pub use text_encoders::{PromptEncoding, TextEncoders};
