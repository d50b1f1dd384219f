//! Fine-tuning Stable Diffusion UNets with Kiln, as diffusers' `train_text_to_image.py` does:
//! an [`ImageCaptionDataset`] (a folder of captioned images), the [`Trainer`] (frozen VAE and text
//! encoder, AdamW on the UNet's denoising loss, every random draw seeded on the host), and
//! checkpoints written as complete diffusers folders that every Kiln loader (and diffusers)
//! reads back.
//!
//! ```no_run
//! # fn main() -> kiln_train::Result<()> {
//! use kiln_train::{ImageCaptionDataset, TrainConfig, Trainer};
//!
//! let device = kiln_nn::default_device().map_err(kiln_pipeline::Error::from)?;
//! let data = ImageCaptionDataset::from_dir("my-photos".as_ref())?;
//! let config = TrainConfig {
//!     learning_rate: 1e-5,
//!     snr_gamma: Some(5.0),
//!     ..TrainConfig::default()
//! };
//! let mut trainer = Trainer::new("stable-diffusion-v1-5".as_ref(), data, config, &device)?;
//! for _ in 0..1000 {
//!     let loss = trainer.step()?;
//!     println!("step {}: loss {loss:.4}", trainer.steps());
//! }
//! trainer.save("my-model".as_ref())?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod autoencoder;
pub mod checkpoint;
pub mod dataset;
pub mod ema;
mod error;
pub mod monitor;
pub mod recipe;
pub mod run;
pub mod shapes;
pub mod trainer;

pub use autoencoder::{VaeLoss, VaeTrainConfig, VaeTrainer};
pub use dataset::{Example, ImageCaptionDataset, Preprocess};
pub use ema::{Ema, EmaWarmup};
pub use error::{Error, Result};
pub use monitor::{LossLog, PlotOptions, Progress, Smoothed, plot_loss_csv, read_loss_csv};
pub use recipe::Recipe;
pub use trainer::{
    Components, Denoiser, LrSchedule, MixedPrecision, TokenizerFiles, TrainConfig, Trainer, adamw,
    clip_grad_norm,
};
