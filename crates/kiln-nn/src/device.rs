//! Choosing a burn [`Device`] at run time from a string such as `flex`, `wgpu:cpu` or `cuda:0`.
//!
//! Each backend is a cargo feature of Kiln's crates (`flex`, `ndarray`, `wgpu`, `cuda`), passed
//! through to burn; [`parse_device`] accepts only the backends this build was compiled with and
//! otherwise says which ones it has.

use burn::tensor::Device;

use crate::{Error, Result};

/// The device strings this build accepts, one per compiled backend (with its variants).
pub fn available_devices() -> Vec<&'static str> {
    let mut names = Vec::new();
    if cfg!(feature = "flex") {
        names.push("flex");
    }
    if cfg!(feature = "ndarray") {
        names.push("ndarray");
    }
    if cfg!(feature = "wgpu") {
        names.extend(["wgpu", "wgpu:cpu", "wgpu:N"]);
    }
    if cfg!(feature = "cuda") {
        names.extend(["cuda", "cuda:N"]);
    }
    names
}

/// The device used when the caller names none: the first compiled of cuda, wgpu, flex, ndarray.
pub fn default_device() -> Result<Device> {
    ["cuda", "wgpu", "flex", "ndarray"]
        .into_iter()
        .find_map(|name| parse_device(name).ok())
        .ok_or_else(|| unavailable("default", "no backend feature was compiled in"))
}

fn unavailable(requested: &str, reason: &str) -> Error {
    Error::Device {
        requested: requested.to_string(),
        reason: reason.to_string(),
        available: available_devices().join(", "),
    }
}

/// Parses a device string.
///
/// Accepted forms: `flex`; `ndarray`; `wgpu` (the best adapter, or `CUBECL_WGPU_DEFAULT_DEVICE`),
/// `wgpu:cpu` (a software adapter such as Mesa's lavapipe), `wgpu:N` (the N-th discrete GPU);
/// `cuda` and `cuda:N`. A backend missing from this build is an [`Error::Device`] listing the
/// ones it has.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec_lower = spec.trim().to_ascii_lowercase();
    let (backend, index) = match spec_lower.split_once(':') {
        Some((b, i)) => (b, Some(i)),
        None => (spec_lower.as_str(), None),
    };
    let not_built = |feature: &str| {
        unavailable(
            spec,
            &format!(
                "this build lacks the `{feature}` feature (rebuild with `--features {feature}`)"
            ),
        )
    };
    let bad_index = || unavailable(spec, "the part after `:` must be a device index such as 0");
    match (backend, index) {
        ("flex" | "cpu", None) => {
            #[cfg(feature = "flex")]
            return Ok(Device::flex());
            #[allow(unreachable_code)]
            Err(not_built("flex"))
        }
        ("ndarray", None) => {
            #[cfg(feature = "ndarray")]
            return Ok(Device::ndarray());
            #[allow(unreachable_code)]
            Err(not_built("ndarray"))
        }
        ("wgpu", index) => {
            let kind = match index {
                None => WgpuKind::Default,
                Some("cpu") => WgpuKind::Cpu,
                Some(i) => WgpuKind::Discrete(i.parse().map_err(|_| bad_index())?),
            };
            wgpu_device(kind).ok_or_else(|| not_built("wgpu"))
        }
        ("cuda", index) => {
            let index: usize = match index {
                None => 0,
                Some(i) => i.parse().map_err(|_| bad_index())?,
            };
            cuda_device(index).ok_or_else(|| not_built("cuda"))
        }
        _ => Err(unavailable(spec, "not a device name Kiln knows")),
    }
}

/// Whether `device`'s backend computes an op before returning its tensor (flex, ndarray), so
/// that the time a call takes is the time of its work; wgpu and CUDA return once the work is
/// queued.
pub fn runs_synchronously(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        return true;
    }
    #[cfg(feature = "ndarray")]
    if *device == Device::ndarray() {
        return true;
    }
    let _ = device;
    false
}

#[allow(dead_code)]
enum WgpuKind {
    Default,
    Cpu,
    Discrete(usize),
}

#[allow(unused_variables)]
fn wgpu_device(kind: WgpuKind) -> Option<Device> {
    #[cfg(feature = "wgpu")]
    {
        use burn::tensor::DeviceKind;
        return Some(Device::wgpu(match kind {
            WgpuKind::Default => DeviceKind::DefaultDevice,
            WgpuKind::Cpu => DeviceKind::Cpu,
            WgpuKind::Discrete(i) => DeviceKind::DiscreteGpu(i),
        }));
    }
    #[allow(unreachable_code)]
    None
}

#[allow(unused_variables)]
fn cuda_device(index: usize) -> Option<Device> {
    #[cfg(feature = "cuda")]
    return Some(Device::cuda(index));
    #[allow(unreachable_code)]
    None
}

/// A float dtype choice for weights and activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FloatKind {
    /// 32-bit IEEE float (the reference precision).
    #[default]
    F32,
    /// 16-bit IEEE float.
    F16,
    /// bfloat16.
    BF16,
}

impl FloatKind {
    /// The burn dtype.
    pub fn dtype(self) -> burn::tensor::DType {
        match self {
            Self::F32 => burn::tensor::DType::F32,
            Self::F16 => burn::tensor::DType::F16,
            Self::BF16 => burn::tensor::DType::BF16,
        }
    }
}

impl std::str::FromStr for FloatKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => Err(Error::DType(s.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_backends_run_synchronously() {
        #[cfg(feature = "flex")]
        assert!(runs_synchronously(&parse_device("flex").unwrap()));
        #[cfg(feature = "ndarray")]
        assert!(runs_synchronously(&parse_device("ndarray").unwrap()));
        #[cfg(feature = "wgpu")]
        assert!(!runs_synchronously(&parse_device("wgpu:cpu").unwrap()));
    }

    #[test]
    fn unknown_backend_lists_the_compiled_ones() {
        let err = parse_device("tpu").unwrap_err().to_string();
        assert!(err.contains("tpu"), "{err}");
        for name in available_devices() {
            assert!(err.contains(name), "{err} should list {name}");
        }
    }

    #[test]
    fn bad_index_is_an_error() {
        let err = parse_device("cuda:x").unwrap_err().to_string();
        assert!(err.contains("index") || err.contains("cuda"), "{err}");
    }

    #[cfg(feature = "flex")]
    #[test]
    fn flex_parses() {
        assert!(parse_device("flex").is_ok());
        assert!(parse_device(" FLEX ").is_ok());
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn missing_backend_says_which_feature() {
        let err = parse_device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }

    #[test]
    fn dtypes_parse() {
        assert_eq!("bf16".parse::<FloatKind>().unwrap(), FloatKind::BF16);
        assert!("f8".parse::<FloatKind>().is_err());
    }
}
