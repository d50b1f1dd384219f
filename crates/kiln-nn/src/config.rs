//! Reading diffusers / transformers `config.json` files into typed structs.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::{Error, Result};

/// Reads and deserializes a JSON file, mapping every failure to a typed [`Error`] naming the file.
///
/// Unknown keys are ignored (real configs carry many keys Kiln does not need); a known key with a
/// value of the wrong type fails here, with serde's line and column.
pub fn read_json<T: DeserializeOwned>(path: &Path, what: &str) -> Result<T> {
    let text = read_to_string(path, what)?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads a text file, turning a missing file into [`Error::NotFound`] with `what` in the message.
pub fn read_to_string(path: &Path, what: &str) -> Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => Err(Error::NotFound {
            what: what.to_string(),
            path: path.to_path_buf(),
            hint: None,
        }),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Checks that `dir` is an existing folder, naming it `what` in the error otherwise.
pub fn require_dir(dir: &Path, what: &str) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(Error::NotFound {
            what: what.to_string(),
            path: dir.to_path_buf(),
            hint: Some("pass the folder that holds the model's files".into()),
        })
    }
}
