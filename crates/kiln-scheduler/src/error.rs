//! The error type of `kiln-scheduler`: bad configs, bad arguments and misuse of a scheduler.

use std::path::PathBuf;

/// Everything that can go wrong while reading a scheduler config or driving a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a config file failed at the operating-system level.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The JSON is malformed, or a known key has a value of the wrong type or an unknown variant.
    #[error("invalid scheduler config: {source}")]
    Json {
        /// serde's description, with line and column.
        #[source]
        source: serde_json::Error,
    },
    /// `_class_name` names a scheduler Kiln does not have.
    #[error("unknown scheduler class `{name}`; accepted: {accepted}")]
    UnknownClass {
        /// The class name found.
        name: String,
        /// The accepted class names.
        accepted: String,
    },
    /// A sampler name (as given on the command line) is not known.
    #[error("unknown sampler `{name}`; accepted: {accepted}")]
    UnknownSampler {
        /// The name given.
        name: String,
        /// The accepted names.
        accepted: String,
    },
    /// A config value is outside the range a scheduler accepts.
    #[error("invalid value for `{key}`: {value}; accepted: {accepted}")]
    InvalidValue {
        /// The config key or argument name.
        key: &'static str,
        /// The value given, formatted.
        value: String,
        /// The accepted range or set, in words.
        accepted: String,
    },
    /// A combination of options that diffusers does not support either.
    #[error("`{scheduler}` does not support {what}")]
    Unsupported {
        /// The scheduler class.
        scheduler: &'static str,
        /// What was asked for.
        what: String,
    },
    /// `step` or `scale_model_input` was called before `set_timesteps`.
    #[error("`{scheduler}`: call `set_timesteps` before `{call}`")]
    NotInitialized {
        /// The scheduler class.
        scheduler: &'static str,
        /// The call made too early.
        call: &'static str,
    },
    /// A timestep that is not on the current schedule.
    #[error("timestep {timestep} is not on the schedule of `{scheduler}`; accepted: {accepted}")]
    UnknownTimestep {
        /// The scheduler class.
        scheduler: &'static str,
        /// The timestep given.
        timestep: f64,
        /// The timesteps accepted.
        accepted: String,
    },
    /// `step` was called more times than the schedule has timesteps.
    #[error("`{scheduler}`: all {steps} steps have been taken; call `reset` or `set_timesteps`")]
    Exhausted {
        /// The scheduler class.
        scheduler: &'static str,
        /// The number of model calls on the schedule.
        steps: usize,
    },
    /// Two tensors (or a tensor and a list of timesteps) do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A noise source ran dry or could not produce noise.
    #[error("noise source: {0}")]
    Noise(String),
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
