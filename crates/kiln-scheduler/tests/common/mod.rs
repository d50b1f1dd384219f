//! Shared helpers for the scheduler tests: fixture loading, the UNet stand-in, error metrics.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::SafeTensors;

/// `fixtures/schedulers/` at the workspace root.
pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/schedulers")
}

/// The test device (flex, the CPU backend).
pub fn device() -> Device {
    Device::flex()
}

/// A safetensors fixture file held in memory.
pub struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    /// Reads `fixtures/schedulers/<name>`.
    pub fn open(name: &str) -> Self {
        let path = fixture_dir().join(name);
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        Self { bytes }
    }

    /// Whether the file holds `name`.
    pub fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes)
            .expect("valid safetensors")
            .tensor(name)
            .is_ok()
    }

    /// The f32 values and shape of tensor `name`.
    pub fn values(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = SafeTensors::deserialize(&self.bytes).expect("valid safetensors");
        let view = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (values, view.shape().to_vec())
    }

    /// Tensor `name` as a rank-4 burn tensor.
    pub fn tensor4(&self, name: &str, device: &Device) -> Tensor<4> {
        let (values, shape) = self.values(name);
        let shape: [usize; 4] = shape.try_into().expect("rank 4");
        Tensor::from_data(TensorData::new(values, shape), device)
    }
}

/// The deterministic UNet stand-in of `xtask/fixtures/schedulers.py`:
/// `0.5 tanh(x) + 0.01 (t / 1000) cos(x)`.
pub fn model(x: Tensor<4>, t: f64) -> Tensor<4> {
    x.clone().tanh().mul_scalar(0.5) + x.cos().mul_scalar(0.01 * (t / 1000.0))
}

/// The host values of a tensor.
pub fn host(t: &Tensor<4>) -> Vec<f32> {
    t.to_data().try_to_vec::<f32>().expect("f32 tensor")
}

/// max |a - b| / max |b|: the error relative to the reference's scale.
pub fn rel_err(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let scale = expected
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs() as f64))
        .max(1e-12);
    let diff = actual
        .iter()
        .zip(expected)
        .fold(0.0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    if actual.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale
}
