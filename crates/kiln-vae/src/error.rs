//! The error type of `kiln-vae`.

/// Everything that can go wrong while loading or running the VAE.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the config or the weights failed (missing file, bad JSON, missing or misshaped
    /// tensor, ...).
    #[error(transparent)]
    Nn(#[from] kiln_nn::Error),
    /// The config parsed but describes a VAE Kiln cannot build.
    #[error("invalid VAE config: {0}")]
    InvalidConfig(String),
    /// A tensor given by the caller has the wrong shape.
    #[error("invalid VAE input `{name}`: shape {found:?}, expected {expected}")]
    InputShape {
        /// Which argument.
        name: &'static str,
        /// What was expected, in words.
        expected: String,
        /// The shape given.
        found: Vec<usize>,
    },
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
