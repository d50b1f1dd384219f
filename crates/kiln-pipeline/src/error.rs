//! The error type of `kiln-pipeline`.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a config or weights failed.
    #[error(transparent)]
    Nn(#[from] kiln_nn::Error),
    /// The tokenizer or text encoder failed.
    #[error(transparent)]
    Clip(#[from] kiln_clip::Error),
    /// The UNet failed to load or run.
    #[error(transparent)]
    Unet(#[from] kiln_unet::Error),
    /// The VAE failed to load or run.
    #[error(transparent)]
    Vae(#[from] kiln_vae::Error),
    /// The scheduler rejected its config or a step.
    #[error(transparent)]
    Scheduler(#[from] kiln_scheduler::Error),
    /// The model folder lacks files or subfolders a pipeline needs.
    #[error("`{dir}` is not a complete diffusers model folder: missing {missing}")]
    IncompleteModel {
        /// The folder.
        dir: PathBuf,
        /// What is missing, comma-separated.
        missing: String,
    },
    /// A single-file checkpoint is not one Kiln can read, or its layout is not recognised.
    #[error("single-file checkpoint: {0}")]
    Checkpoint(String),
    /// The components do not fit together (widths, channel counts).
    #[error("mismatched components: {0}")]
    Mismatch(String),
    /// The requested image size is not one the VAE and UNet can take.
    #[error(
        "image size {width}x{height} is not supported by this model: width and height must be positive multiples of {multiple}"
    )]
    Size {
        /// Requested width in pixels.
        width: usize,
        /// Requested height in pixels.
        height: usize,
        /// What both must be multiples of.
        multiple: usize,
    },
    /// An option or input tensor the caller gave is out of range or misshaped.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A generation would need more memory than it may use (estimated before anything is
    /// allocated).
    #[error(
        "a {width}x{height} generation of {num_images} image(s) needs about {:.2} GiB beyond the \
         loaded weights (UNet {:.2} GiB, VAE decode {:.2} GiB{}), more than the {:.2} GiB it \
         may use; choose a smaller size or fewer images, tile the VAE, or raise the memory limit",
        crate::memory::gib(estimate.peak()),
        crate::memory::gib(estimate.unet),
        crate::memory::gib(estimate.vae_decode),
        estimate.packed_note(),
        crate::memory::gib(*limit)
    )]
    InsufficientMemory {
        /// Image width in pixels.
        width: usize,
        /// Image height in pixels.
        height: usize,
        /// Images in the batch.
        num_images: usize,
        /// The estimate.
        estimate: crate::memory::MemoryEstimate,
        /// The limit it exceeds, in bytes.
        limit: u64,
    },
    /// The step callback asked to stop.
    #[error("generation cancelled at step {step}")]
    Cancelled {
        /// The step (0-based) after which the callback stopped the run.
        step: usize,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
