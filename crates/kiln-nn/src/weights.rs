//! Strict loading of weights files into burn modules, over burn-store: safetensors, and
//! PyTorch's pickle checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`).
//!
//! Field names of Kiln's modules are the key segments of diffusers' and transformers' checkpoints,
//! so a file loads with at most a few prefix remappings. Loading is strict: a tensor the model
//! needs but the file lacks, a tensor the file holds but the model does not use, or a tensor of
//! the wrong shape is a typed [`Error`] naming the tensor. F16 and BF16 files are converted to the
//! requested float dtype as they load.
//!
//! Pickle files are read by burn's `pytorch-reader`, which interprets the pickle's opcodes into
//! dictionaries, lists and tensors itself: it never imports or calls Python code, so a hostile
//! `.ckpt` cannot run anything (the reason other tools refuse pickles, or need PyTorch's
//! `weights_only` unpickler). Nested dictionaries name their tensors by dotted paths, and a
//! checkpoint that keeps its weights under `state_dict` (PyTorch Lightning's, and so the original
//! Stable Diffusion `.ckpt` files) is read as that dictionary, as A1111 reads it.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::module::Module;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    ApplyError, FloatCastAdapter, ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, bridge,
};
use burn::tensor::{DType, TensorData};
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

/// One tensor's entry with its byte range, relative to the end of the header.
#[derive(Debug, Clone)]
struct Entry {
    info: TensorInfo,
    begin: u64,
    end: u64,
}

/// The raw header entry: dtype, shape and `data_offsets`.
#[derive(Debug, Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [u64; 2],
}

/// The parsed header: the open file, where the data starts, every entry, and `__metadata__`.
type Header = (
    std::fs::File,
    u64,
    BTreeMap<String, Entry>,
    BTreeMap<String, String>,
);

/// Opens `path` for reading; a missing file is [`Error::NotFound`].
fn open_file(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound {
                what: "weights file".into(),
                path: path.to_path_buf(),
                hint: None,
            }
        } else {
            Error::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

/// Whether `path` is a PyTorch pickle checkpoint rather than a safetensors file: by its
/// extension (`.safetensors` is never one; `.ckpt`, `.pt`, `.pth` and `.bin` always are), else by
/// its first bytes (a ZIP archive, as `torch.save` writes since PyTorch 1.6, or a pickle stream).
fn is_pickle(path: &Path) -> Result<bool> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("safetensors") => return Ok(false),
        Some("ckpt" | "pt" | "pth" | "bin") => return Ok(true),
        _ => {}
    }
    let mut magic = [0u8; 4];
    let mut file = open_file(path)?;
    let n = file.read(&mut magic).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let zip = n == 4 && magic == *b"PK\x03\x04";
    let pickle = n >= 2 && magic[0] == 0x80 && (2..=5).contains(&magic[1]);
    Ok(zip || pickle)
}

fn parse_header(path: &Path) -> Result<Header> {
    let not_st = |reason: String| Error::NotSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = open_file(path)?;
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
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut entries = BTreeMap::new();
    let mut metadata = BTreeMap::new();
    for (name, value) in raw {
        if name == "__metadata__" {
            // string to string, as the format defines it; other values are ignored
            if let serde_json::Value::Object(map) = value {
                for (k, v) in map {
                    if let serde_json::Value::String(v) = v {
                        metadata.insert(k, v);
                    }
                }
            }
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .map_err(|e| not_st(format!("bad header entry for `{name}`: {e}")))?;
        let [begin, end] = raw.data_offsets;
        let expected = dtype_of(&raw.dtype)
            .map(|d| raw.shape.iter().product::<usize>() as u64 * d.size() as u64);
        if begin > end || end > data_len || expected.is_some_and(|n| n != end - begin) {
            return Err(not_st(format!(
                "`{name}`: byte range {begin}..{end} does not fit its {} {:?} or the file's {data_len} data bytes",
                raw.dtype, raw.shape
            )));
        }
        entries.insert(
            name,
            Entry {
                info: TensorInfo {
                    dtype: raw.dtype,
                    shape: raw.shape,
                },
                begin,
                end,
            },
        );
    }
    Ok((file, data_start, entries, metadata))
}

/// burn's dtype for a safetensors dtype name, for the dtypes Kiln reads.
fn dtype_of(name: &str) -> Option<DType> {
    Some(match name {
        "F64" => DType::F64,
        "F32" => DType::F32,
        "F16" => DType::F16,
        "BF16" => DType::BF16,
        "I64" => DType::I64,
        "I32" => DType::I32,
        _ => return None,
    })
}

/// The dtype name a safetensors header gives a PyTorch tensor's dtype.
fn pickle_dtype_name(dtype: pytorch_reader::DType) -> &'static str {
    use pytorch_reader::DType as P;
    match dtype {
        P::F64 => "F64",
        P::F32 => "F32",
        P::F16 => "F16",
        P::BF16 => "BF16",
        P::I64 => "I64",
        P::I32 => "I32",
        P::I16 => "I16",
        P::I8 => "I8",
        P::U64 => "U64",
        P::U32 => "U32",
        P::U16 => "U16",
        P::U8 => "U8",
        P::Bool => "BOOL",
    }
}

/// Reads only the names, dtypes and shapes of a weights file's tensors (a safetensors header, or
/// a pickle's tensor records).
///
/// Fails with [`Error::NotSafetensors`] when a safetensors file is too short, the header length
/// is absurd or the header is not the JSON the format prescribes, and with
/// [`Error::NotPytorch`] when a pickle checkpoint cannot be read.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let file = WeightsFile::open(path)?;
    Ok(file
        .tensors()
        .map(|(name, info)| (name.to_string(), info.clone()))
        .collect())
}

/// A weights file opened for lazy reads (safetensors, or a PyTorch pickle checkpoint): its
/// tensors' names, dtypes and shapes are read once, and each tensor's bytes only when a module
/// takes it. Cloning shares the open file.
#[derive(Debug, Clone)]
pub struct WeightsFile {
    inner: Arc<FileInner>,
}

#[derive(Debug)]
struct FileInner {
    path: PathBuf,
    source: Source,
    entries: BTreeMap<String, Entry>,
    metadata: BTreeMap<String, String>,
}

/// Where a [`WeightsFile`]'s bytes come from.
#[derive(Debug)]
enum Source {
    /// A safetensors file: each tensor's bytes at `data_start` plus its offsets.
    Safetensors {
        file: Mutex<std::fs::File>,
        data_start: u64,
    },
    /// A pickle checkpoint: `pytorch-reader`'s tensors, each read whole from the archive.
    Pickle {
        tensors: std::collections::HashMap<String, pytorch_reader::Tensor>,
    },
}

/// The key under which PyTorch Lightning (and so the original Stable Diffusion checkpoints) keep
/// a model's weights.
const STATE_DICT: &str = "state_dict.";

impl WeightsFile {
    /// Opens `path` (safetensors, or a PyTorch pickle checkpoint: `.ckpt`, `.pt`, `.pth`, `.bin`)
    /// and reads its tensors' names, dtypes and shapes.
    pub fn open(path: &Path) -> Result<Self> {
        if is_pickle(path)? {
            return Self::open_pickle(path);
        }
        let (file, data_start, entries, metadata) = parse_header(path)?;
        Ok(Self {
            inner: Arc::new(FileInner {
                path: path.to_path_buf(),
                source: Source::Safetensors {
                    file: Mutex::new(file),
                    data_start,
                },
                entries,
                metadata,
            }),
        })
    }

    fn open_pickle(path: &Path) -> Result<Self> {
        // a missing file is NotFound, as for safetensors
        drop(open_file(path)?);
        let reader = pytorch_reader::PytorchReader::new(path).map_err(|e| Error::NotPytorch {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut tensors = reader.into_tensors();
        // `{"state_dict": {...}, "global_step": ..., "optimizer_states": [...]}`: the weights
        if tensors.keys().any(|k| k.starts_with(STATE_DICT)) {
            tensors = tensors
                .into_iter()
                .filter_map(|(k, t)| Some((k.strip_prefix(STATE_DICT)?.to_string(), t)))
                .collect();
        }
        let entries = tensors
            .iter()
            .map(|(name, t)| {
                let entry = Entry {
                    info: TensorInfo {
                        dtype: pickle_dtype_name(t.dtype()).to_string(),
                        shape: t.shape().to_vec(),
                    },
                    begin: 0,
                    end: t.byte_len() as u64,
                };
                (name.clone(), entry)
            })
            .collect();
        Ok(Self {
            inner: Arc::new(FileInner {
                path: path.to_path_buf(),
                source: Source::Pickle { tensors },
                entries,
                metadata: BTreeMap::new(),
            }),
        })
    }

    /// Whether the file is a PyTorch pickle checkpoint (else safetensors).
    pub fn is_pickle(&self) -> bool {
        matches!(self.inner.source, Source::Pickle { .. })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Every tensor's name with its dtype and shape, sorted by name.
    pub fn tensors(&self) -> impl Iterator<Item = (&str, &TensorInfo)> {
        self.inner
            .entries
            .iter()
            .map(|(name, entry)| (name.as_str(), &entry.info))
    }

    /// The header's `__metadata__` (string values; none in a pickle checkpoint).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.inner.metadata
    }

    /// One tensor's dtype and shape.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.inner.entries.get(name).map(|e| &e.info)
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.inner.entries.contains_key(name)
    }

    /// A lazy handle on tensor `name`; nothing is read yet.
    pub fn tensor(&self, name: &str) -> Result<LazyTensor> {
        let entry = self
            .inner
            .entries
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.inner.path.clone(),
                name: name.to_string(),
            })?;
        let dtype = dtype_of(&entry.info.dtype).ok_or_else(|| Error::UnsupportedDType {
            path: self.inner.path.clone(),
            name: name.to_string(),
            dtype: entry.info.dtype.clone(),
        })?;
        Ok(LazyTensor {
            file: self.clone(),
            name: name.to_string(),
            dtype,
            shape: entry.info.shape.clone(),
            begin: 0,
            end: entry.end - entry.begin,
            transposed: false,
        })
    }

    /// Bytes `begin..end` of tensor `name`'s data.
    fn read_bytes(&self, name: &str, begin: u64, end: u64) -> std::io::Result<Vec<u8>> {
        let entry = self.inner.entries.get(name).ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::NotFound, format!("no tensor `{name}`"))
        })?;
        match &self.inner.source {
            Source::Safetensors { file, data_start } => {
                let mut bytes = vec![0u8; (end - begin) as usize];
                // A poisoned lock only means another read panicked; the file handle itself is
                // intact.
                let mut file = file
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                file.seek(SeekFrom::Start(data_start + entry.begin + begin))?;
                file.read_exact(&mut bytes)?;
                Ok(bytes)
            }
            Source::Pickle { tensors } => {
                let mut bytes = tensors[name].read()?;
                if bytes.len() as u64 != entry.end {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "tensor `{name}` holds {} bytes, not {}",
                            bytes.len(),
                            entry.end
                        ),
                    ));
                }
                if (begin, end) != (0, entry.end) {
                    bytes = bytes[begin as usize..end as usize].to_vec();
                }
                Ok(bytes)
            }
        }
    }
}

/// A tensor of a [`WeightsFile`], not read yet, possibly narrowed to a range of rows or
/// reshaped: how single-file checkpoints' fused or differently shaped tensors become a model's.
#[derive(Debug, Clone)]
pub struct LazyTensor {
    file: WeightsFile,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
    /// A 2-D tensor read transposed (OpenCLIP's `x @ P` projection as a PyTorch linear weight).
    transposed: bool,
}

impl LazyTensor {
    /// The tensor's name in its file.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The shape after any narrowing or reshaping.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The file's dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Rows `start..start + len` of the outermost dimension (a split of a fused tensor).
    pub fn narrow(mut self, start: usize, len: usize) -> Result<Self> {
        let rows = self.shape.first().copied().unwrap_or(0);
        if len == 0 || start + len > rows || self.transposed {
            return Err(Error::InvalidInput(format!(
                "cannot take rows {start}..{} of `{}` with shape {:?}",
                start + len,
                self.name,
                self.shape
            )));
        }
        let row_bytes = (self.end - self.begin) / rows as u64;
        self.begin += start as u64 * row_bytes;
        self.end = self.begin + len as u64 * row_bytes;
        self.shape[0] = len;
        Ok(self)
    }

    /// The same values with another shape of the same size (a 1x1 convolution as a linear weight).
    pub fn reshape(mut self, shape: Vec<usize>) -> Result<Self> {
        if shape.iter().product::<usize>() != self.shape.iter().product::<usize>()
            || self.transposed
        {
            return Err(Error::InvalidInput(format!(
                "cannot reshape `{}` from {:?} to {shape:?}",
                self.name, self.shape
            )));
        }
        self.shape = shape;
        Ok(self)
    }

    /// The transpose of a 2-D tensor (read as `[cols, rows]`); the last change made to it.
    pub fn transpose(mut self) -> Result<Self> {
        if self.shape.len() != 2 || self.transposed {
            return Err(Error::InvalidInput(format!(
                "cannot transpose `{}` with shape {:?}: only a 2-D tensor, once",
                self.name, self.shape
            )));
        }
        self.shape.swap(0, 1);
        self.transposed = true;
        Ok(self)
    }

    /// Reads the values.
    pub fn read(&self) -> Result<TensorData> {
        let mut bytes = self
            .file
            .read_bytes(&self.name, self.begin, self.end)
            .map_err(|source| Error::Io {
                path: self.file.path().to_path_buf(),
                source,
            })?;
        if self.transposed {
            // stored [cols, rows], wanted [rows, cols]: element (r, c) is stored at (c, r)
            let [rows, cols] = [self.shape[0], self.shape[1]];
            let size = self.dtype.size();
            let mut out = vec![0u8; bytes.len()];
            for r in 0..rows {
                for c in 0..cols {
                    let (to, from) = ((r * cols + c) * size, (c * rows + r) * size);
                    out[to..to + size].copy_from_slice(&bytes[from..from + size]);
                }
            }
            bytes = out;
        }
        Ok(TensorData::from_bytes_vec(
            bytes,
            self.shape.clone(),
            self.dtype,
        ))
    }

    /// The burn-store tensor named `key` whose bytes are read when the module takes it.
    fn into_pack(self, key: String) -> PackTensor {
        let shape = burn::tensor::Shape::from(self.shape.clone());
        let dtype = self.dtype;
        bridge::deferred(key, dtype, shape, None, move || {
            self.read()
                .map_err(|e| burn::store::burn_pack::Error::ValidationError(e.to_string()))
        })
    }
}

/// Loads `tensors` (module key, source tensor) into `module`, strictly: every parameter must be
/// among them with the right shape, and every one of them must be used. Linear weights are
/// transposed from PyTorch's layout and float tensors cast to `dtype` as in
/// [`load_safetensors`]. Errors name the file `source` and the tensors by their file names.
pub fn load_tensors<M: Module>(
    module: M,
    tensors: Vec<(String, LazyTensor)>,
    dtype: DType,
    source: &Path,
) -> Result<M> {
    let mut original: BTreeMap<String, (String, Vec<usize>)> = BTreeMap::new();
    let mut packs = Vec::with_capacity(tensors.len());
    for (key, tensor) in tensors {
        if !tensor.dtype.is_float() {
            return Err(Error::UnsupportedDType {
                path: source.to_path_buf(),
                name: tensor.name.clone(),
                dtype: format!("{:?}", tensor.dtype),
            });
        }
        if let Some((previous, _)) = original.get(&key) {
            return Err(Error::InvalidInput(format!(
                "`{}` and `{previous}` both map to `{key}`",
                tensor.name
            )));
        }
        original.insert(key.clone(), (tensor.name.clone(), tensor.shape.clone()));
        packs.push(tensor.into_pack(key));
    }
    let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(dtype));
    let mut module = module;
    let result = module.apply(packs, None, Some(Box::new(adapter)), true);
    check_applied(&result, source, &|key| original.get(key).cloned(), &|_| {
        false
    })?;
    tracing::debug!(
        path = %source.display(),
        applied = result.applied.len(),
        "loaded weights"
    );
    Ok(module)
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

/// Loads the weights file at `path` (safetensors, or a pickle: [`WeightsFile`]) into `module`,
/// strictly.
///
/// Keys are first rewritten with `options.remap`; keys matching `options.ignore_unused` are
/// skipped; then every parameter of the module must be found with the right shape and every
/// other key of the file must be used. Tensors are read one at a time as the module takes them
/// ([`load_tensors`]), so loading needs little memory beyond the model itself. Linear weights are transposed from PyTorch's `[out, in]` and norm
/// `weight`/`bias` are matched to burn's `gamma`/`beta`; float tensors are cast to `options.dtype`.
///
/// `path` may also be a sharded checkpoint's index (`*.safetensors.index.json`, as diffusers and
/// transformers write models above their shard size): its shards are read as one file.
pub fn load_safetensors<M: Module>(module: M, path: &Path, options: &LoadOptions) -> Result<M> {
    let files = open_shards(path)?;
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
    let mut tensors = Vec::new();
    for file in &files {
        for (name, _) in file.tensors() {
            let mapped = remap_key(name, &remap);
            if ignored.iter().any(|re| re.is_match(&mapped)) {
                continue;
            }
            tensors.push((mapped, file.tensor(name)?));
        }
    }
    load_tensors(module, tensors, options.dtype, path)
}

/// The suffix of a sharded checkpoint's index next to its shards.
const INDEX_SUFFIX: &str = ".index.json";

/// The files of a checkpoint: the weights file at `path`, or the shards a `*.index.json`
/// (`*.safetensors.index.json`, `*.bin.index.json`) lists in its `weight_map` (each once, every
/// one present, and every tensor in the shard the index names).
fn open_shards(path: &Path) -> Result<Vec<WeightsFile>> {
    let is_index = path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.ends_with(INDEX_SUFFIX));
    if !is_index {
        return Ok(vec![WeightsFile::open(path)?]);
    }
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = crate::config::read_json(path, "sharded checkpoint index")?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let shards: std::collections::BTreeSet<&String> = index.weight_map.values().collect();
    if shards.is_empty() {
        return Err(Error::InvalidInput(format!(
            "`{}` lists no shards in its weight_map",
            path.display()
        )));
    }
    let mut files = Vec::with_capacity(shards.len());
    for shard in shards {
        if shard.contains('/') || shard.contains('\\') || shard.starts_with('.') {
            return Err(Error::InvalidInput(format!(
                "`{}` names the shard `{shard}` outside its folder",
                path.display()
            )));
        }
        let file = WeightsFile::open(&dir.join(shard))?;
        files.push((shard.as_str(), file));
    }
    for (tensor, shard) in &index.weight_map {
        let found = files
            .iter()
            .any(|(name, file)| *name == shard.as_str() && file.contains(tensor));
        if !found {
            return Err(Error::InvalidInput(format!(
                "`{}` places `{tensor}` in `{shard}`, which does not hold it",
                path.display()
            )));
        }
    }
    Ok(files.into_iter().map(|(_, file)| file).collect())
}

/// For a module key: the file's name and shape of the tensor mapped onto it.
type FileTensorLookup<'a> = dyn Fn(&str) -> Option<(String, Vec<usize>)> + 'a;

/// Turns burn-store's apply result into Kiln's strict errors. `lookup` gives, for a module key,
/// the file's name and shape of the tensor mapped onto it.
fn check_applied(
    result: &burn::store::ApplyResult,
    path: &Path,
    lookup: &FileTensorLookup<'_>,
    is_ignored: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let file_name = |module_path: &str| {
        let name = checkpoint_name(module_path);
        lookup(&name).map(|(n, _)| n).unwrap_or(name)
    };
    if let Some(error) = result.errors.first() {
        return Err(match error {
            ApplyError::ShapeMismatch {
                path: tensor,
                expected,
                found: adapted,
            } => {
                let key = checkpoint_name(tensor);
                let (name, found) = lookup(&key).unwrap_or_else(|| (key, adapted.to_vec()));
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
            first: lookup(first)
                .map(|(n, _)| n)
                .unwrap_or_else(|| (*first).clone()),
        });
    }
    Ok(())
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

/// The first of `candidates` (file names inside `dir`) that exists, as one file or as a sharded
/// checkpoint's index (`<candidate>.index.json`, which [`load_safetensors`] reads with its
/// shards), or [`Error::NotFound`] listing them all.
pub fn find_weights(dir: &Path, candidates: &[&str], what: &str) -> Result<PathBuf> {
    candidates
        .iter()
        .flat_map(|name| [dir.join(name), dir.join(format!("{name}{INDEX_SUFFIX}"))])
        .find(|p| p.is_file())
        .ok_or_else(|| Error::NotFound {
            what: what.to_string(),
            path: dir.to_path_buf(),
            hint: Some(format!(
                "expected one of: {} (or a sharded checkpoint's `.index.json`)",
                candidates.join(", ")
            )),
        })
}
