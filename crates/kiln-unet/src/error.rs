//! The error type of `kiln-unet`.

/// Everything that can go wrong while loading or running the UNet.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the config or the weights failed (missing file, bad JSON, missing or misshaped
    /// tensor, ...).
    #[error(transparent)]
    Nn(#[from] kiln_nn::Error),
    /// The config parsed but describes a UNet Kiln cannot build.
    #[error("invalid UNet config: {0}")]
    InvalidConfig(String),
    /// A tensor given by the caller has the wrong shape.
    #[error("invalid UNet input `{name}`: shape {found:?}, expected {expected}")]
    InputShape {
        /// Which argument.
        name: &'static str,
        /// What was expected, in words.
        expected: String,
        /// The shape given.
        found: Vec<usize>,
    },
    /// The latent has no pixels.
    #[error("latent size {height}x{width} is empty: height and width must be positive")]
    SpatialSize {
        /// Latent height.
        height: usize,
        /// Latent width.
        width: usize,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
