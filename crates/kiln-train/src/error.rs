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
