//! The text side of Stable Diffusion: CLIP's BPE tokenizer and text encoder.
//!
//! - [`ClipTokenizer`] turns a prompt into the 77 ids the encoder reads, exactly as transformers'
//!   `CLIPTokenizer` does, from either tokenizer folder layout; [`ClipTokenizer::tokenize_prompt`]
//!   reads the A1111 web UI's emphasis syntax and keeps every token of long prompts
//!   ([`prompt`]).
//! - [`ClipTextModel`] is transformers' `CLIPTextModel`, its shape read from `config.json`
//!   (SD 1.x's ViT-L/14 tower with quick-GELU, SD 2.x's OpenCLIP ViT-H/14 tower with GELU), with
//!   clip skip and the pooled output; with `text_projection` it is `CLIPTextModelWithProjection`
//!   (SDXL's second encoder, OpenCLIP ViT-bigG/14), and [`HiddenLayer::Raw`] gives the
//!   un-normed hidden states SDXL reads.
//!
//! ```no_run
//! # fn main() -> kiln_clip::Result<()> {
//! use kiln_clip::{ClipTextModel, ClipTokenizer};
//! let device = kiln_nn::default_device()?;
//! let tokenizer = ClipTokenizer::from_dir("stable-diffusion-v1-5")?;
//! let encoder = ClipTextModel::from_dir("stable-diffusion-v1-5", &device)?;
//! let ids = tokenizer.encode("a photo of an astronaut riding a horse")?;
//! let embedding = encoder.encode_ids(&[ids], 0, &device)?; // [1, 77, 768]
//! # Ok(()) }
//! ```

pub mod configuration_clip;
mod error;
pub mod modeling_clip;
pub mod prompt;
pub mod textual_inversion;
pub mod tokenization_clip;

pub use configuration_clip::ClipTextConfig;
pub use error::{Error, Result};
pub use modeling_clip::{ClipTextModel, ClipTextOutput, HiddenLayer};
pub use prompt::{
    ExtraNetwork, PromptPiece, PromptSyntax, PromptWindows, extract_extra_networks, parse_prompt,
};
pub use textual_inversion::TextualInversion;
pub use tokenization_clip::ClipTokenizer;
