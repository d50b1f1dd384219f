//! The forward of burn-nn's [`Linear`], through Kiln's kernel where it applies.

use burn::nn::Linear;
use burn::tensor::Tensor;

/// `layer.forward(x)`: on flex in f32 inference Kiln's kernel ([`crate::kernels::linear`], one
/// GEMM onto the bias), burn's op everywhere else (other backends and dtypes, autodiff).
///
/// # Shapes
/// - `x`: `[..., in]`
/// - output: `[..., out]`
pub fn linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    {
        let bias = layer.bias.as_ref().map(|b| b.val());
        if let Some(y) = crate::kernels::linear(&x, &layer.weight.val(), bias.as_ref()) {
            return y;
        }
    }
    layer.forward(x)
}
