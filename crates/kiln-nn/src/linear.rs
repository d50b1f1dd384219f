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
    let dims = x.dims();
    timed(layer, dims, || forward(layer, x))
}

/// `layer.forward(x)` through burn's op on every backend, timed as a linear layer by a running
/// [`profile`](crate::profile): the time embeddings' products of a few rows.
pub fn burn_linear<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    timed(layer, dims, || layer.forward(x))
}

/// `call`, timed as `layer` on an input of `dims` by a running [`profile`](crate::profile).
fn timed<T, const D: usize>(layer: &Linear, dims: [usize; D], call: impl FnOnce() -> T) -> T {
    let describe = || {
        let rows = dims[..D - 1].iter().product();
        let out = layer.weight.lazy_shape()[1];
        let op = format!("{} -> {out}", crate::profile::dims(&dims));
        (op, crate::flops::linear(layer, rows))
    };
    crate::profile::timed(crate::profile::OpKind::Linear, describe, call)
}

/// [`linear`] without its timing.
fn forward<const D: usize>(layer: &Linear, x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    {
        let bias = layer.bias.as_ref().map(|b| b.val());
        if let Some(y) = crate::kernels::linear(&x, &layer.weight.val(), bias.as_ref()) {
            return y;
        }
    }
    layer.forward(x)
}
