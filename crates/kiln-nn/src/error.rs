//! The error type of `kiln-nn`: configs, weight files and devices.

use std::path::PathBuf;

/// Everything that can go wrong while reading a config, loading weights or picking a device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder that must exist does not.
    #[error("{what} not found at `{path}`{hint}", hint = hint_suffix(.hint))]
    NotFound {
        /// What was looked for ("model folder", "text encoder config", ...).
        what: String,
        /// Where it was looked for.
        path: PathBuf,
        /// How to fix it, if there is something to say.
        hint: Option<String>,
    },
    /// Reading a file failed at the operating-system level.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file is malformed or a field has the wrong type or value.
    #[error("invalid JSON in `{path}`: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// serde's description, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// A config parsed, but its values cannot describe a valid model.
    #[error("invalid config `{path}`: {message}")]
    InvalidConfig {
        /// The config file (or a description of where the config came from).
        path: PathBuf,
        /// What is wrong and which values would be accepted.
        message: String,
    },
    /// The file is not a safetensors file (or is truncated).
    #[error("`{path}` is not a valid safetensors file: {reason}")]
    NotSafetensors {
        /// The file.
        path: PathBuf,
        /// What the reader found wrong.
        reason: String,
    },
    /// A PyTorch pickle checkpoint (`.ckpt`, `.pt`, `.bin`) that cannot be read (truncated, not
    /// a checkpoint, or holding what a state dict does not: sparse or quantized tensors).
    #[error("`{path}` is not a PyTorch checkpoint Kiln can read: {reason}")]
    NotPytorch {
        /// The file.
        path: PathBuf,
        /// What the reader found wrong.
        reason: String,
    },
    /// The weights file lacks a tensor the model needs.
    #[error(
        "`{path}` has no tensor `{name}` (the model needs it); is this the right file for this config?"
    )]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The tensor's name as the model expects it.
        name: String,
    },
    /// The weights file holds tensors the model does not know, which means the config and the file disagree.
    #[error(
        "`{path}` holds {count} tensor(s) the model does not use, e.g. `{first}`; does the config match the weights?"
    )]
    UnexpectedTensors {
        /// The file.
        path: PathBuf,
        /// How many.
        count: usize,
        /// The first of them, by name.
        first: String,
    },
    /// A tensor exists but has the wrong shape.
    #[error("tensor `{name}` in `{path}` has shape {found:?}, but the model expects {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The tensor's name in the file.
        name: String,
        /// The shape the model needs, in the file's (PyTorch) layout.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor's data type cannot be loaded.
    #[error(
        "tensor `{name}` in `{path}` has dtype {dtype}, which Kiln cannot load (use F32, F16 or BF16 weights)"
    )]
    UnsupportedDType {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// Its dtype as the file names it.
        dtype: String,
    },
    /// Applying a tensor to the model failed for another reason.
    #[error("cannot load tensor `{name}` from `{path}`: {message}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// burn-store's description.
        message: String,
    },
    /// A device string names a backend this build lacks, or is malformed.
    #[error(
        "unknown or unavailable device `{requested}`: {reason}; this build offers: {available}"
    )]
    Device {
        /// What was asked for.
        requested: String,
        /// Why it cannot be had.
        reason: String,
        /// The device strings this build accepts.
        available: String,
    },
    /// A dtype name is not one of f32, f16, bf16.
    #[error("unknown dtype `{0}`: use f32, f16 or bf16")]
    DType(String),
    /// A LoRA file cannot be used: a key of an unknown kind, a layer the model lacks, factors
    /// that do not fit, a damaged value.
    #[error("LoRA `{path}`: `{key}` {message}")]
    Lora {
        /// The file.
        path: PathBuf,
        /// The key (or key stem) concerned.
        key: String,
        /// What is wrong.
        message: String,
    },
    /// A tensor given by the caller has the wrong shape or values.
    #[error("invalid input: {0}")]
    InvalidInput(String),
}

fn hint_suffix(hint: &Option<String>) -> String {
    hint.as_ref().map(|h| format!(": {h}")).unwrap_or_default()
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
