//! Activations that burn lacks or that must match PyTorch exactly.

use burn::tensor::Tensor;
use burn::tensor::activation;
use serde::Deserialize;

/// `x * sigmoid(1.702 x)`: the "quick GELU" of OpenAI's CLIP (SD 1.x text encoder), in one
/// pass through Kiln's kernel on flex in f32 inference (burn's sigmoid takes a scalar libm
/// `exp` per element: 9% of the SD 1.5 text encoder's time).
pub fn quick_gelu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    timed("quick_gelu", x.dims(), || {
        #[cfg(feature = "flex")]
        if let Some(y) = crate::kernels::quick_gelu(&x) {
            return y;
        }
        x.clone() * activation::sigmoid(x * 1.702)
    })
}

/// `call`, timed as activation `name` on an input of `dims` by a running
/// [`profile`](crate::profile).
fn timed<T, const D: usize>(name: &str, dims: [usize; D], call: impl FnOnce() -> T) -> T {
    let describe = || (format!("{name} {}", crate::profile::dims(&dims)), 0);
    crate::profile::timed(crate::profile::OpKind::Activation, describe, call)
}

/// GEGLU's gating, `hidden * gelu(gate)` of the two halves of `h`'s last dimension (exact
/// GELU), in one pass through Kiln's kernel on flex in f32 inference.
///
/// # Shapes
/// - `h`: `[batch, tokens, 2 * n]`
/// - output: `[batch, tokens, n]`
pub fn geglu(h: Tensor<3>) -> Tensor<3> {
    timed("geglu", h.dims(), || {
        #[cfg(feature = "flex")]
        if let Some(out) = crate::kernels::geglu(&h) {
            return out;
        }
        let half = h.dims()[2] / 2;
        let hidden = h.clone().narrow(2, 0, half);
        let gate = h.narrow(2, half, half);
        hidden * activation::gelu(gate)
    })
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
    /// Applies the activation (GELU and SiLU through Kiln's kernels on flex in f32 inference,
    /// [`crate::kernels`]).
    pub fn forward<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        timed(self.name(), x.dims(), || self.apply(x))
    }

    /// The name configs give it: `quick_gelu`, `gelu`, `gelu_new` (tanh), `silu`, `relu`.
    pub fn name(self) -> &'static str {
        match self {
            Self::QuickGelu => "quick_gelu",
            Self::Gelu => "gelu",
            Self::GeluTanh => "gelu_new",
            Self::Silu => "silu",
            Self::Relu => "relu",
        }
    }

    /// [`forward`](Self::forward) without its timing.
    fn apply<const D: usize>(self, x: Tensor<D>) -> Tensor<D> {
        match self {
            Self::QuickGelu => quick_gelu(x),
            Self::Gelu => {
                #[cfg(feature = "flex")]
                if let Some(y) = crate::kernels::gelu(&x) {
                    return y;
                }
                activation::gelu(x)
            }
            Self::GeluTanh => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
                let inner = (x.clone() + x.clone().powi_scalar(3) * 0.044715)
                    * (2.0f64 / std::f64::consts::PI).sqrt();
                x * (inner.tanh() + 1.0) * 0.5
            }
            Self::Silu => {
                #[cfg(feature = "flex")]
                if let Some(y) = crate::kernels::silu(&x) {
                    return y;
                }
                activation::silu(x)
            }
            Self::Relu => activation::relu(x),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `name` is the spelling configs use, so that reports and configs agree.
    #[test]
    fn names_read_back_as_the_same_activation() {
        use Activation::*;
        for act in [QuickGelu, Gelu, GeluTanh, Silu, Relu] {
            let read: Activation = serde_json::from_str(&format!("\"{}\"", act.name())).unwrap();
            assert_eq!(read, act);
        }
    }
}
