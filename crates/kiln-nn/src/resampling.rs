//! `Downsample2D` (a stride-2 convolution) and `Upsample2D` (nearest x2, then a convolution).
//!
//! Mirrors `diffusers/models/downsampling.py` and `upsampling.py` (diffusers 0.42.1) with
//! `use_conv=True`, no norm and no transposed convolution, as SD's UNet and VAE use them.

use crate::conv::conv2d;
use burn::module::Module;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Int, Tensor};

/// Halves height and width with a 3x3 stride-2 convolution.
#[derive(Module, Debug)]
pub struct Downsample2D {
    /// The convolution (`conv` in checkpoints, whatever diffusers' `name` argument was).
    pub conv: Conv2d,
}

impl Downsample2D {
    /// `padding` is diffusers' `downsample_padding`: 1 (UNet) pads one pixel on every side; 0
    /// (VAE) pads one pixel on the right and bottom only (`F.pad(x, (0, 1, 0, 1))`).
    pub fn new(in_channels: usize, out_channels: usize, padding: usize, device: &Device) -> Self {
        let padding = if padding == 0 {
            // (top, left, bottom, right)
            PaddingConfig2d::Explicit(0, 0, 1, 1)
        } else {
            PaddingConfig2d::Explicit(padding, padding, padding, padding)
        };
        Self {
            conv: Conv2dConfig::new([in_channels, out_channels], [3, 3])
                .with_stride([2, 2])
                .with_padding(padding)
                .init(device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    /// - output: `[batch, out_channels, ceil(height / 2), ceil(width / 2)]` (padding 1), or
    ///   `[.., floor(height / 2), floor(width / 2)]` (padding 0)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        conv2d(&self.conv, x)
    }

    /// FLOPs of [`forward`](Self::forward) on `batch` maps of `size`, and the output size.
    pub fn flops(&self, batch: usize, size: [usize; 2]) -> (u64, [usize; 2]) {
        crate::flops::conv2d(&self.conv, batch, size)
    }
}

/// Doubles height and width by nearest-neighbour repetition, then applies a 3x3 convolution.
#[derive(Module, Debug)]
pub struct Upsample2D {
    /// The 3x3 convolution after upsampling.
    pub conv: Conv2d,
}

impl Upsample2D {
    /// A randomly initialised upsampler (load weights afterwards).
    pub fn new(in_channels: usize, out_channels: usize, device: &Device) -> Self {
        Self {
            conv: Conv2dConfig::new([in_channels, out_channels], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    /// - output: `[batch, out_channels, 2 * height, 2 * width]`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_to(x, None)
    }

    /// FLOPs of [`forward_to`](Self::forward_to) producing `batch` maps of `size` (the
    /// convolution runs at the upsampled size).
    pub fn flops(&self, batch: usize, size: [usize; 2]) -> u64 {
        crate::flops::conv2d(&self.conv, batch, size).0
    }

    /// Upsamples to `size` (`[height, width]`; twice the input when `None`) with PyTorch's
    /// `nearest` rule, then convolves: how diffusers' UNet meets a skip connection of odd size.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    /// - output: `[batch, out_channels, size[0], size[1]]`
    pub fn forward_to(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let [oh, ow] = size.unwrap_or([2 * h, 2 * w]);
        #[cfg(feature = "flex")]
        if (oh, ow) == (2 * h, 2 * w)
            && let Some(y) = crate::profile::timed_some(
                crate::profile::OpKind::Conv,
                // named by the convolution's input, the upsampled map
                || {
                    let [b, c, _, _] = x.dims();
                    crate::conv::describe("upsample+", &self.conv, [b, c, oh, ow])
                },
                || self.fused(&x),
            )
        {
            return y;
        }
        let up = if (oh, ow) == (2 * h, 2 * w) {
            interpolate(
                x,
                InterpolateOptions::new(InterpolateMode::Nearest)
                    .with_align_corners(false)
                    .with_output_size([oh, ow]),
            )
        } else {
            let device = x.device();
            let rows = Tensor::<1, Int>::from_data(nearest_indices(h, oh).as_slice(), &device);
            let cols = Tensor::<1, Int>::from_data(nearest_indices(w, ow).as_slice(), &device);
            x.select(2, rows).select(3, cols)
        };
        conv2d(&self.conv, up)
    }

    /// On flex in f32 inference, the upsampling and the 3x3 convolution as one kernel
    /// ([`crate::kernels::upsample_conv2d`]: the same result within 1e-5 relative, without the
    /// upsampled image); `None` where the ops run (other backends and dtypes, autodiff, a
    /// convolution other than SD's 3x3 with stride 1 and padding 1).
    #[cfg(feature = "flex")]
    fn fused(&self, x: &Tensor<4>) -> Option<Tensor<4>> {
        let conv = &self.conv;
        let sd = conv.stride == [1, 1]
            && conv.dilation == [1, 1]
            && conv.groups == 1
            && conv.padding == PaddingConfig2d::Explicit(1, 1, 1, 1);
        if !sd {
            return None;
        }
        let bias = conv.bias.as_ref().map(|b| b.val());
        crate::kernels::upsample_conv2d(x, &conv.weight.val(), bias.as_ref())
    }
}

/// Source index of each output position under PyTorch's `nearest` interpolation
/// (`aten/src/ATen/native/UpSample.h`, `nearest_idx`): `min(floor(i * (in / out)), in - 1)` with
/// the scale in f32.
pub fn nearest_indices(input: usize, output: usize) -> Vec<i64> {
    if input == output {
        return (0..output as i64).collect();
    }
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|i| ((i as f32 * scale).floor() as usize).min(input - 1) as i64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The upsampler gives the ops' result (nearest x2, then burn-nn's convolution) where its
    /// fused kernel runs (64x64 input pixels and up on flex) and where it does not.
    #[test]
    fn forward_matches_upsampling_then_convolving() {
        let device = Device::default();
        let up = Upsample2D::new(3, 5, &device);
        for size in [[5, 7], [64, 66]] {
            let x = Tensor::<4>::random(
                [2, 3, size[0], size[1]],
                Distribution::Normal(0.0, 1.0),
                &device,
            );
            let ops = up.conv.forward(interpolate(
                x.clone(),
                InterpolateOptions::new(InterpolateMode::Nearest)
                    .with_output_size([2 * size[0], 2 * size[1]]),
            ));
            #[cfg(feature = "flex")]
            assert_eq!(up.fused(&x).is_some(), size == [64, 66], "{size:?}");
            let ours = up.forward(x);
            let error = crate::reference::max_relative_error(&ours, &ops);
            assert!(error < 1e-5, "{size:?}: {error:e}");
        }
    }
}
