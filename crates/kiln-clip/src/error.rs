//! The error type of `kiln-clip`.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running the CLIP tokenizer and text encoder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a config or weights file failed (see [`kiln_nn::Error`]).
    #[error(transparent)]
    Nn(#[from] kiln_nn::Error),
    /// The tokenizer files exist but the `tokenizers` library rejected them.
    #[error("cannot build the tokenizer from `{path}`: {message}")]
    Tokenizer {
        /// The file or folder.
        path: PathBuf,
        /// The library's message.
        message: String,
    },
    /// A special token the tokenizer needs is not in its vocabulary.
    #[error("the tokenizer in `{path}` has no token `{token}` (needed as its {role} token)")]
    MissingToken {
        /// The tokenizer folder.
        path: PathBuf,
        /// The token text.
        token: String,
        /// `bos`, `eos` or `pad`.
        role: &'static str,
    },
    /// Tokenizing a prompt failed.
    #[error("cannot tokenize the prompt: {0}")]
    Encode(String),
    /// A textual-inversion embedding file cannot be used.
    #[error("embedding `{path}` {message}")]
    Embedding {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The prompt's emphasis syntax is malformed (see [`crate::prompt`]).
    #[error("cannot read the prompt at character {position} (near `{context}`): {message}")]
    PromptSyntax {
        /// 1-based position of the offending character.
        position: usize,
        /// The text around it.
        context: String,
        /// What is wrong and how to fix it.
        message: String,
    },
    /// The caller passed ids or options the model cannot take.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
