//! Strict loading of safetensors weights into burn modules, over burn-store.
//!
//! Field names of Kiln's modules are the key segments of diffusers' and transformers' checkpoints,
//! so a file loads with at most a few prefix remappings. Loading is strict: a tensor the model
//! needs but the file lacks, a tensor the file holds but the model does not use, or a tensor of
//! the wrong shape is a typed [`Error`] naming the tensor. F16 and BF16 files are converted to the
//! requested float dtype as they load.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{
    ApplyError, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter,
    SafetensorsStore, SafetensorsStoreError,
};
use burn::tensor::DType;
use regex::Regex;
use serde::Deserialize;

use crate::{Error, Result};

/// Largest safetensors header Kiln accepts (the format's own limit is 100 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct TensorInfo {
    /// The dtype as the file names it (`F32`, `F16`, `BF16`, `I64`, ...).
    pub dtype: String,
    /// The shape, outermost dimension first.
    pub shape: Vec<usize>,
}

/// Reads only the header of a safetensors file: every tensor's name, dtype and shape.
///
/// Fails with [`Error::NotSafetensors`] when the file is too short, the header length is absurd or
/// the header is not the JSON the format prescribes.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let not_st = |reason: String| Error::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(source) if source.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::NotFound {
                what: "weights file".into(),
                path: path.to_path_buf(),
                hint: None,
            });
        }
        Err(source) => {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source,
            });
        }
    };
    let file_len = file
        .metadata()
        .map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|_| not_st("shorter than the 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
        return Err(not_st(format!(
            "header length {header_len} does not fit a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| not_st(format!("cannot read header: {e}")))?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| not_st(format!("header is not JSON: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            continue;
        }
        let info: TensorInfo = serde_json::from_value(value)
            .map_err(|e| not_st(format!("bad header entry for `{name}`: {e}")))?;
        tensors.insert(name, info);
    }
    Ok(tensors)
}

/// How to match a weights file's keys to a module, and which float dtype to load into.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `(regex, replacement)` pairs applied in order to every key of the file.
    pub remap: Vec<(String, String)>,
    /// Regexes of (remapped) file keys that may stay unused, such as transformers' `position_ids` buffer.
    pub ignore_unused: Vec<String>,
    /// The float dtype parameters are converted to.
    pub dtype: DType,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            remap: Vec::new(),
            ignore_unused: Vec::new(),
            dtype: DType::F32,
        }
    }
}

impl LoadOptions {
    /// Adds a key remapping: every file key matching `from` is rewritten with `to` (regex syntax, `$1` groups).
    pub fn with_remap(mut self, from: impl Into<String>, to: impl Into<String>) -> Self {
        self.remap.push((from.into(), to.into()));
        self
    }

    /// Allows file keys matching `pattern` to stay unused.
    pub fn with_ignored(mut self, pattern: impl Into<String>) -> Self {
        self.ignore_unused.push(pattern.into());
        self
    }

    /// Sets the float dtype parameters are loaded as.
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }
}

fn compile(patterns: &[String]) -> Result<Vec<Regex>> {
    patterns
        .iter()
        .map(|p| {
            Regex::new(p).map_err(|e| Error::InvalidInput(format!("bad key pattern `{p}`: {e}")))
        })
        .collect()
}

/// Rewrites `key` with every matching pattern of the remap table, in order, as burn-store's remapper does.
fn remap_key(key: &str, remap: &[(Regex, String)]) -> String {
    let mut key = key.to_string();
    for (re, to) in remap {
        if re.is_match(&key) {
            key = re.replace_all(&key, to.as_str()).into_owned();
        }
    }
    key
}

/// Turns burn's parameter names (`gamma`/`beta` of norms) back into the checkpoint's (`weight`/`bias`).
fn checkpoint_name(path: &str) -> String {
    if let Some(stem) = path.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = path.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        path.to_string()
    }
}

/// Loads the safetensors file at `path` into `module`, strictly.
///
/// Keys are first rewritten with `options.remap`; then every parameter of the module must be
/// found with the right shape, and every remaining key of the file must match
/// `options.ignore_unused`. Linear weights are transposed from PyTorch's `[out, in]` and norm
/// `weight`/`bias` are matched to burn's `gamma`/`beta`; float tensors are cast to `options.dtype`.
pub fn load_safetensors<M: Module>(module: M, path: &Path, options: &LoadOptions) -> Result<M> {
    let header = read_header(path)?;
    let remap: Vec<(Regex, String)> = compile(
        &options
            .remap
            .iter()
            .map(|(from, _)| from.clone())
            .collect::<Vec<_>>(),
    )?
    .into_iter()
    .zip(options.remap.iter().map(|(_, to)| to.clone()))
    .collect();
    let ignored = compile(&options.ignore_unused)?;
    let is_ignored = |key: &str| ignored.iter().any(|re| re.is_match(key));

    // Remapped name -> original name, to report errors with the file's own names.
    let mut original: BTreeMap<String, String> = BTreeMap::new();
    for (name, info) in &header {
        let mapped = remap_key(name, &remap);
        if !is_ignored(&mapped) && !matches!(info.dtype.as_str(), "F32" | "F16" | "BF16" | "F64") {
            return Err(Error::UnsupportedDType {
                path: path.to_path_buf(),
                name: name.clone(),
                dtype: info.dtype.clone(),
            });
        }
        original.insert(mapped, name.clone());
    }

    let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(options.dtype));
    let mut store = SafetensorsStore::from_file(path)
        .with_from_adapter(adapter)
        .allow_partial(true)
        .validate(false)
        // Enum modules (e.g. a UNet's choice of block type) add no key segment.
        .skip_enum_variants(true);
    for (from, to) in &options.remap {
        store = store.with_key_remapping(from, to.clone());
    }
    let mut module = module;
    let result = module
        .load_from(&mut store)
        .map_err(|e| store_error(path, e))?;

    let file_name = |module_path: &str| {
        let name = checkpoint_name(module_path);
        original.get(&name).cloned().unwrap_or(name)
    };
    if let Some(error) = result.errors.first() {
        return Err(match error {
            ApplyError::ShapeMismatch {
                path: tensor,
                expected,
                found: adapted,
            } => {
                let name = file_name(tensor);
                let found = header
                    .get(&name)
                    .map(|i| i.shape.clone())
                    .unwrap_or_else(|| adapted.to_vec());
                let mut expected = expected.to_vec();
                // The adapter transposed a Linear weight to burn's [in, out]: report the file's layout.
                if adapted.as_slice() != found.as_slice() {
                    expected.reverse();
                }
                Error::ShapeMismatch {
                    path: path.to_path_buf(),
                    name,
                    expected,
                    found,
                }
            }
            other => Error::Load {
                path: path.to_path_buf(),
                name: apply_error_path(other).to_string(),
                message: format!("{other:?}"),
            },
        });
    }
    if let Some((missing, _)) = result.missing.first() {
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            name: file_name(missing),
        });
    }
    let unused: Vec<&String> = result.unused.iter().filter(|k| !is_ignored(k)).collect();
    if let Some(first) = unused.first() {
        return Err(Error::UnexpectedTensors {
            path: path.to_path_buf(),
            count: unused.len(),
            first: original
                .get(*first)
                .cloned()
                .unwrap_or_else(|| (*first).clone()),
        });
    }
    tracing::debug!(
        path = %path.display(),
        applied = result.applied.len(),
        "loaded weights"
    );
    Ok(module)
}

fn apply_error_path(error: &ApplyError) -> &str {
    match error {
        ApplyError::ShapeMismatch { path, .. }
        | ApplyError::DTypeMismatch { path, .. }
        | ApplyError::AdapterError { path, .. }
        | ApplyError::LoadError { path, .. } => path,
        #[allow(unreachable_patterns)]
        _ => "",
    }
}

fn store_error(path: &Path, error: SafetensorsStoreError) -> Error {
    match error {
        SafetensorsStoreError::Io(source) => Error::Io {
            path: path.to_path_buf(),
            source,
        },
        other => Error::NotSafetensors {
            path: path.to_path_buf(),
            reason: other.to_string(),
        },
    }
}

/// The first of `candidates` (file names inside `dir`) that exists, or [`Error::NotFound`] listing them all.
pub fn find_weights(dir: &Path, candidates: &[&str], what: &str) -> Result<PathBuf> {
    candidates
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::NotFound {
            what: what.to_string(),
            path: dir.to_path_buf(),
            hint: Some(format!("expected one of: {}", candidates.join(", "))),
        })
}
