//! The error type of `kiln-train`.

use std::path::PathBuf;

/// Everything that can go wrong while preparing data, training or saving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Loading or running a model component failed.
    #[error(transparent)]
    Pipeline(#[from] kiln_pipeline::Error),
    /// A dataset folder is missing, empty or malformed.
    #[error("dataset `{path}`: {message}")]
    Dataset {
        /// The folder or file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// An image cannot be read or decoded.
    #[error("cannot read image `{path}`: {message}")]
    Image {
        /// The file.
        path: PathBuf,
        /// The decoder's description.
        message: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Writing the trained weights failed.
    #[error("cannot save `{path}`: {message}")]
    Save {
        /// The file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// A training option is out of range.
    #[error("invalid training option: {0}")]
    InvalidOption(String),
    /// The loss stopped being a number; the last checkpoint is the last good state.
    #[error(
        "the loss became {value} at step {step}; lower the learning rate (or raise the warm-up) and resume from the last checkpoint"
    )]
    NonFiniteLoss {
        /// The loss.
        value: f32,
        /// The optimiser step (1-based) whose loss it was.
        step: usize,
    },
    /// The run was asked to stop (by its observer); it resumes from its newest checkpoint.
    #[error("stopped after step {step} of the {stage} stage; resume to go on")]
    Stopped {
        /// The stage.
        stage: &'static str,
        /// The last step taken.
        step: usize,
    },
    /// A checkpoint cannot be resumed from: incomplete, malformed, or of another model or run.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// A training config file is malformed or asks for something impossible.
    #[error("{}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// A shapes dataset request is out of range (count, image size, placement, combos asked for).
    #[error("invalid shapes request: {0}")]
    InvalidSpec(String),
    /// A colour, shape or caption is not one of the shapes dataset's.
    #[error("{0}")]
    Parse(String),
    /// The output folder exists and replacing it was not asked for.
    #[error("`{}` exists; ask to overwrite it or choose a new folder", path.display())]
    OutputExists {
        /// The folder.
        path: PathBuf,
    },
    /// An input value does not describe what it claims (e.g. an image buffer of the wrong length).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A loss log (`loss.csv`) is malformed, or a row or column does not fit it.
    #[error("loss log `{}`: {message}", path.display())]
    LossLog {
        /// The log file.
        path: PathBuf,
        /// What is wrong, with the line number where it is in the file.
        message: String,
    },
    /// Drawing a loss plot failed.
    #[error("cannot plot `{}`: {message}", path.display())]
    Plot {
        /// The image being written.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

macro_rules! from_component {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Self::Pipeline(e.into())
            }
        }
    )*};
}
from_component!(
    kiln_nn::Error,
    kiln_clip::Error,
    kiln_unet::Error,
    kiln_vae::Error,
    kiln_scheduler::Error
);

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
