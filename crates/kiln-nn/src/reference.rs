//! Reading reference tensors (inputs and expected outputs written by the fixture scripts) and
//! measuring how far a result is from them. Used by every model crate's parity tests and by the
//! full-size checks.

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// Every tensor of a safetensors file as f32 [`TensorData`] (f16, bf16 and f64 are converted).
pub fn read_tensors(path: &Path) -> Result<BTreeMap<String, TensorData>> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => Error::NotFound {
            what: "reference tensors".into(),
            path: path.to_path_buf(),
            hint: Some("run `cargo xtask fixtures`".into()),
        },
        _ => Error::Io {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let file = SafeTensors::deserialize(&bytes).map_err(|e| Error::NotSafetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let raw = view.data();
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::I64 => raw
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            other => {
                return Err(Error::UnsupportedDType {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{other:?}"),
                });
            }
        };
        out.insert(name, TensorData::new(values, view.shape().to_vec()));
    }
    Ok(out)
}

/// Named reference tensors, taken out as burn tensors of a given rank.
pub struct Reference {
    path: std::path::PathBuf,
    tensors: BTreeMap<String, TensorData>,
}

impl Reference {
    /// Reads `path` with [`read_tensors`].
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            path: path.to_path_buf(),
            tensors: read_tensors(path)?,
        })
    }

    /// The tensor `name` on `device`, or [`Error::MissingTensor`] / [`Error::ShapeMismatch`]
    /// when it is absent or not of rank `D`.
    pub fn tensor<const D: usize>(&self, name: &str, device: &Device) -> Result<Tensor<D>> {
        let data = self.tensors.get(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        if data.shape().len() != D {
            return Err(Error::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_string(),
                expected: vec![0; D],
                found: data.shape().to_vec(),
            });
        }
        Ok(Tensor::from_data(data.clone(), device))
    }
}

/// `max |actual - expected| / max |expected|`: the error measure of Kiln's parity tests.
///
/// Returns infinity when the shapes differ or a value is not finite, so a test comparing it
/// with a tolerance fails.
pub fn max_relative_error<const D: usize>(actual: &Tensor<D>, expected: &Tensor<D>) -> f32 {
    if actual.dims() != expected.dims() {
        return f32::INFINITY;
    }
    let a: Vec<f32> = actual
        .to_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap_or_default();
    let e: Vec<f32> = expected
        .to_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap_or_default();
    let mut max_diff = 0f32;
    let mut max_ref = 0f32;
    for (x, y) in a.iter().zip(&e) {
        if !x.is_finite() {
            return f32::INFINITY;
        }
        max_diff = max_diff.max((x - y).abs());
        max_ref = max_ref.max(y.abs());
    }
    if max_ref == 0.0 {
        max_diff
    } else {
        max_diff / max_ref
    }
}
