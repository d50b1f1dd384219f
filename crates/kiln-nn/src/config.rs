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

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Copies the folder `from` to `to`, recursively, following symbolic links (a copy must stand
/// alone).
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(|e| io_error(to, e))?;
    for entry in std::fs::read_dir(from).map_err(|e| io_error(from, e))? {
        let entry = entry.map_err(|e| io_error(from, e))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_dir(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(|e| io_error(&src, e))?;
        }
    }
    Ok(())
}

/// Builds the folder `out` under a temporary name beside it (`build` fills that folder), then
/// renames it into place, so that `out` is never seen half-written. An existing `out` is
/// replaced, only once the new folder is complete, when `replace` is true; it is an error
/// otherwise. On failure the temporary folder is removed.
pub fn write_dir_atomically<E: From<Error>>(
    out: &Path,
    replace: bool,
    build: impl FnOnce(&Path) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    if out.exists() && !replace {
        return Err(Error::InvalidInput(format!(
            "`{}` exists; choose a new folder",
            out.display()
        ))
        .into());
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = out
        .file_name()
        .ok_or_else(|| Error::InvalidInput(format!("`{}` names no folder", out.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| io_error(&tmp, e))?;
    if let Err(e) = build(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(out, &old).map_err(|e| io_error(out, e))?;
        std::fs::rename(&tmp, out).map_err(|e| io_error(out, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| io_error(&old, e))?;
    } else {
        std::fs::rename(&tmp, out).map_err(|e| io_error(out, e))?;
    }
    Ok(())
}
