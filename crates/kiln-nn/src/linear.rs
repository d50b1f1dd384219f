//! The forward of burn-nn's [`Linear`], through Kiln's kernel where it applies.

use burn::nn::Linear;
use burn::tensor::Tensor;

/// `layer.forward(x)`: on flex in inference Kiln's kernel ([`crate::kernels::linear`]: tasks of
/// rows by output columns, the bias added in cache; f32, bf16 and f16), burn's op everywhere
/// else (other backends and dtypes, autodiff).
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
