//! The forward of burn-nn's [`Conv2d`], through Kiln's kernel where it applies.

use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

/// `conv.forward(x)`: on flex in f32 inference Kiln's kernel ([`crate::kernels::conv2d`], the
/// same result within 1e-5 relative and faster at every size SD uses), burn's op everywhere else
/// (other backends and dtypes, autodiff, groups, `Same` padding).
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`
/// - output: `[batch, out, out_height, out_width]`
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(options) = kernel_options(conv) {
        let bias = conv.bias.as_ref().map(|b| b.val());
        if let Some(y) = crate::kernels::conv2d(&x, &conv.weight.val(), bias.as_ref(), options) {
            return y;
        }
    }
    conv.forward(x)
}

/// The kernel's options for `conv`, or `None` where only burn's op applies.
#[cfg(feature = "flex")]
fn kernel_options(conv: &Conv2d) -> Option<crate::kernels::Conv2dOptions> {
    use burn::nn::PaddingConfig2d;
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [[0, 0], [0, 0]],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [[top, bottom], [left, right]],
        PaddingConfig2d::Same => return None,
    };
    (conv.groups == 1).then_some(crate::kernels::Conv2dOptions {
        stride: conv.stride,
        padding,
        dilation: conv.dilation,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::PaddingConfig2d;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    /// The module-level forward gives burn's result for the paddings burn-nn offers.
    #[test]
    fn matches_the_modules_own_forward() {
        let device = Device::default();
        for padding in [
            PaddingConfig2d::Valid,
            PaddingConfig2d::Explicit(1, 1, 1, 1),
            PaddingConfig2d::Explicit(0, 0, 1, 1),
            PaddingConfig2d::Same,
        ] {
            let conv = Conv2dConfig::new([3, 5], [3, 3])
                .with_padding(padding.clone())
                .init(&device);
            let x = Tensor::<4>::random([2, 3, 8, 7], Distribution::Normal(0.0, 1.0), &device);
            let error =
                crate::reference::max_relative_error(&conv2d(&conv, x.clone()), &conv.forward(x));
            assert!(error < 1e-5, "{padding:?}: {error:e}");
        }
    }
}
