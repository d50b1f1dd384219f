//! Activations that burn lacks or that must match PyTorch exactly.

use burn::tensor::Tensor;
use burn::tensor::activation;
use serde::Deserialize;

/// `x * sigmoid(1.702 x)`: the "quick GELU" of OpenAI's CLIP (SD 1.x text encoder).
pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    x.clone() * activation::sigmoid(x * 1.702)
}

/// Activation names as transformers' and diffusers' configs spell them (`hidden_act`, `act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// CLIP's `x * sigmoid(1.702 x)`.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU.
    #[serde(rename = "gelu")]
    Gelu,
    /// GELU's tanh approximation.
    #[serde(alias = "gelu_pytorch_tanh", rename = "gelu_new")]
    GeluTanh,
    /// `x * sigmoid(x)`.
    #[serde(alias = "swish", rename = "silu")]
    Silu,
    /// `max(x, 0)`.
    #[serde(rename = "relu")]
    Relu,
}

impl Activation {
    /// Applies the activation.
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::QuickGelu => quick_gelu(x),
            Self::Gelu => activation::gelu(x),
            Self::GeluTanh => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715)
                    * (2.0f64 / std::f64::consts::PI).sqrt();
                x * (inner.tanh() + 1.0) * 0.5
            }
            Self::Silu => activation::silu(x),
            Self::Relu => activation::relu(x),
        }
    }
}
