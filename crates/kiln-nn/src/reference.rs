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

/// A tensor of standard normal values drawn on the host from `ChaCha8Rng` seeded with `seed`:
/// the same values on every backend and machine, so a test's inputs (and its margin to its
/// tolerance) do not change from run to run as `Tensor::random`'s do.
pub fn seeded_normal<const D: usize>(shape: [usize; D], seed: u64, device: &Device) -> Tensor<D> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let values = crate::init::normal(&mut rng, shape.iter().product(), 1.0);
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Two algorithms' errors to the exact (f64) result of the same computation, pooled over
/// draws: [`ratio`](Self::ratio) is the root of the ratio of their summed squared errors, so a
/// kernel's test can bound its rounding by a multiple of a reference algorithm's. A mean over
/// many outputs, steadier than the worst value when the outputs are few; the tests pool at
/// least [`OUTPUTS`](Self::OUTPUTS) of them ([`draws`](Self::draws)).
#[derive(Clone, Copy, Debug, Default)]
pub struct RoundingRatio {
    ours: f64,
    theirs: f64,
}

impl RoundingRatio {
    /// Outputs to pool at least. The worst error of one draw of 6 outputs against another
    /// algorithm's reached 4.2 times it in 200 draws where, pooled to this many, the ratio
    /// stayed at 2.1 or less (the Winograd kernel's tests).
    pub const OUTPUTS: usize = 256;

    /// Draws of `outputs` values each that pool at least [`OUTPUTS`](Self::OUTPUTS).
    pub fn draws(outputs: usize) -> usize {
        Self::OUTPUTS.div_ceil(outputs.max(1))
    }

    /// Adds one draw: `ours` and `theirs` against `exact`, in row-major order.
    pub fn add<const D: usize>(&mut self, ours: &Tensor<D>, theirs: &Tensor<D>, exact: &[f64]) {
        self.ours += squared_error_to_exact(ours, exact);
        self.theirs += squared_error_to_exact(theirs, exact);
    }

    /// `sqrt(Σ ours' squared errors / Σ theirs')`: infinite (or NaN) where a result was not
    /// finite or did not match `exact`'s length, so a test bounding it fails.
    pub fn ratio(&self) -> f64 {
        (self.ours / self.theirs.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// `Σ (actual - exact)²`; infinity when the lengths differ or a value is not finite.
fn squared_error_to_exact<const D: usize>(actual: &Tensor<D>, exact: &[f64]) -> f64 {
    let actual: Vec<f32> = actual
        .to_data()
        .convert::<f32>()
        .try_to_vec()
        .unwrap_or_default();
    if actual.len() != exact.len() || !actual.iter().all(|a| a.is_finite()) {
        return f64::INFINITY;
    }
    actual
        .iter()
        .zip(exact)
        .map(|(&a, &e)| (a as f64 - e).powi(2))
        .sum()
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

/// The bounds Kiln's parity tests use, and why they hold on every machine.
///
/// Kiln and the reference (PyTorch) evaluate the same function in f32 in different orders:
/// other GEMM and convolution tilings, 8 or 16 SIMD lanes (AVX2 or AVX-512), fused or separate
/// multiply-adds, partial sums split across however many threads there are, other `exp` / `erf`
/// approximations. None of these is more exact than the others; they round differently. So a
/// parity bound must hold for any order, and it is stated relative to the size of the result
/// ([`max_relative_error`]), because that is what rounding error scales with.
pub mod tolerance {
    /// The unit roundoff of f32, `2^-24`: the largest relative error of one rounded operation.
    pub const U: f64 = f32::EPSILON as f64 / 2.0;

    /// A network's forward pass (text encoder, UNet, VAE; tiny or full size) against the
    /// reference, as [`max_relative_error`](super::max_relative_error).
    ///
    /// Each layer ends in dot products of length `K` (at most 11 520 in SD: a 3x3 convolution
    /// over 1 280 channels). Summed in any order, with or without FMA, the rounding errors of
    /// such a sum are independent and of either sign, so its error is about `U sqrt(K)` of the
    /// result (worst case `K U`, never approached): 1.2e-6 at `K = 400`, 6.4e-6 at `K = 11 520`.
    /// Layers add their errors; normalisations (GroupNorm, LayerNorm) rescale, so errors do not
    /// compound multiplicatively, and over `L` layers on the longest path they add up to about
    /// `sqrt(L)` times one layer's (`L` about 60 in SD 1.5's UNet): 5e-5 at full size, and both
    /// sides carry such an error. The measured errors are well inside that (2e-6 to 3e-6 on
    /// Zen 4 and Xeon AVX-512 machines and on an AVX2-only CPU, full size included), and `1e-4`
    /// is above the estimate while still 10x below the smallest real defect the tests are meant
    /// to catch (a wrong weight, epsilon or activation moves the result by 1e-3 or more; each
    /// model's test of a deliberately wrong weight checks that).
    pub const FORWARD: f32 = 1e-4;

    /// Gradients of a loss through a network (backward pass) and quantities computed from them
    /// (their global norm), as [`max_relative_error`](super::max_relative_error).
    ///
    /// The backward pass is the forward's products transposed: the same dot-product lengths and
    /// depths, so the same estimate as [`FORWARD`] and the same bound. What an optimiser makes
    /// of a gradient is bounded separately (see `crates/kiln-train/tests/optimizer.rs`), since
    /// Adam amplifies the error of gradients near its epsilon.
    pub const GRADIENT: f32 = 1e-4;

    /// A whole pipeline's float image (values in [0, 1]) against the reference's, as the
    /// largest absolute difference.
    ///
    /// A run of `n` denoising steps calls the UNet `n` (or, with classifier-free guidance,
    /// `2 n`) times and the VAE decoder once. Each call adds an error of at most [`FORWARD`]
    /// of its output's size, and the samplers' updates are linear combinations with
    /// coefficients of at most a few units: the latent's error is at most about
    /// `n FORWARD` of its size (the tests run 2 to 8 steps), and the decoder maps latents of size
    /// 1 to 4 onto images in [0, 1]. `5e-4` is that for the tests' step counts; the measured
    /// differences are below 1e-4.
    pub const IMAGE: f32 = 5e-4;

    /// The largest 8-bit difference that follows from a float difference of at most `float`
    /// (images in [0, 1], rounded to `round(255 x)`): rounding moves a value by at most half a
    /// level, so two values `float` apart round at most `ceil(255 float)` levels apart.
    pub fn levels(float: f32) -> u8 {
        (255.0 * float).ceil().min(255.0) as u8
    }
}
