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
