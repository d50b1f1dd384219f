//! The forward of burn-nn's [`Conv2d`], through Kiln's kernel where it applies.

use burn::nn::GroupNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

use crate::activation::Activation;
use crate::profile::OpKind::Conv;

/// How a [`profile`](crate::profile) names a convolution of `conv` on an input of `dims`, after
/// `prefix` (what runs with it), and its FLOPs: `3x3 [2, 320, 64, 64] -> 320`, `3x3/2 ...` for
/// a stride of 2.
pub(crate) fn describe(prefix: &str, conv: &Conv2d, dims: [usize; 4]) -> (String, u64) {
    let shape = conv.weight.lazy_shape();
    let [cout, kh, kw] = [shape[0], shape[2], shape[3]];
    let stride = match conv.stride {
        [1, 1] => String::new(),
        [s, t] if s == t => format!("/{s}"),
        [s, t] => format!("/{s}x{t}"),
    };
    let op = format!(
        "{prefix}{kh}x{kw}{stride} {} -> {cout}",
        crate::profile::dims(&dims)
    );
    let (flops, _) = crate::flops::conv2d(conv, dims[0], [dims[2], dims[3]]);
    (op, flops)
}

/// `conv.forward(x)`: on flex in f32 inference Kiln's kernel ([`crate::kernels::conv2d`], the
/// same result within 1e-5 relative and faster at every size SD uses), burn's op everywhere else
/// (other backends and dtypes, autodiff, groups, `Same` padding).
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`
/// - output: `[batch, out, out_height, out_width]`
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let dims = x.dims();
    crate::profile::timed(Conv, || describe("", conv, dims), || forward(conv, x))
}

/// [`conv2d`] without its timing.
fn forward(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if let Some(options) = kernel_options(conv) {
        let bias = conv.bias.as_ref().map(|b| b.val());
        if let Some(y) = crate::kernels::conv2d(&x, &conv.weight.val(), bias.as_ref(), options) {
            return y;
        }
    }
    conv.forward(x)
}

/// `conv.forward(act(norm(x)))` without storing `act(norm(x))`, where Kiln's kernel folds the
/// GroupNorm and a SiLU into the convolution's reading of its input
/// ([`crate::kernels::group_norm_conv2d`]: on flex in f32 inference, a convolution that runs
/// Winograd's algorithm); `None` elsewhere, and the caller normalises and convolves. `x` is
/// left as it is, for a residual path to read after. Bit for bit what
/// [`group_norm_act`](crate::normalization::group_norm_act) then [`conv2d`] give.
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`
/// - output: `[batch, out, out_height, out_width]`
pub fn group_norm_act_conv2d(
    norm: &GroupNorm,
    act: Activation,
    conv: &Conv2d,
    x: &Tensor<4>,
) -> Option<Tensor<4>> {
    #[cfg(feature = "flex")]
    if act == Activation::Silu
        && let Some(options) = kernel_options(conv)
    {
        let affine = crate::normalization::kernel_affine(norm)?;
        let norm = crate::kernels::InputGroupNorm {
            groups: norm.num_groups,
            eps: norm.epsilon,
            affine: affine.as_ref().map(|(g, b)| (g, b)),
            silu: true,
        };
        let bias = conv.bias.as_ref().map(|b| b.val());
        let dims = x.dims();
        return crate::profile::timed_some(
            Conv,
            || describe("groupnorm+silu+", conv, dims),
            || {
                crate::kernels::group_norm_conv2d(
                    x,
                    norm,
                    &conv.weight.val(),
                    bias.as_ref(),
                    options,
                )
            },
        );
    }
    let _ = (norm, act, conv, x);
    None
}

/// Whether [`conv2d_owned`] writes `conv`'s output over `x`'s storage when nothing else holds
/// `x` (see there); false where it allocates as [`conv2d`] does.
pub fn conv2d_writes_in_place(conv: &Conv2d, x: &Tensor<4>) -> bool {
    #[cfg(feature = "flex")]
    if let Some(options) = kernel_options(conv) {
        let [cout, cin, kh, kw] = conv.weight.dims();
        let pointwise =
            [kh, kw] == [1, 1] && options.stride == [1, 1] && options.padding == [[0, 0], [0, 0]];
        return pointwise
            && x.dims()[1] == cin
            && x.dtype() == burn::tensor::DType::F32
            && crate::kernels::pointwise_in_place_applies(x.dims(), cout);
    }
    let _ = (conv, x);
    false
}

/// [`conv2d`] taking `x` by value: a 1x1 convolution with stride 1, no padding and no more
/// output channels than input ones, on images large enough, is written over `x`'s own storage
/// where nothing else holds it ([`crate::kernels::conv2d_pointwise_owned`], on flex in f32
/// inference), so that no second tensor is allocated; otherwise as [`conv2d`].
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`
/// - output: `[batch, out, out_height, out_width]`
pub fn conv2d_owned(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let dims = x.dims();
    crate::profile::timed(Conv, || describe("", conv, dims), || owned(conv, x))
}

/// [`conv2d_owned`] without its timing.
fn owned(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    let x = if conv2d_writes_in_place(conv, &x) {
        let bias = conv.bias.as_ref().map(|b| b.val());
        match crate::kernels::conv2d_pointwise_owned(x, &conv.weight.val(), bias.as_ref()) {
            Ok(y) => return y,
            Err(x) => x,
        }
    } else {
        x
    };
    conv2d(conv, x)
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
