//! `ResnetBlock2D`: two GroupNorm-SiLU-conv stages with an optional time-embedding injection and
//! a residual connection (He et al., 2016, as adapted by DDPM).
//!
//! Mirrors `ResnetBlock2D` in `diffusers/models/resnet.py` (diffusers 0.42.1) with
//! `time_embedding_norm="default"`, no up/down sampling inside the block, and
//! `conv_shortcut=False` (a 1x1 convolution when the channel count changes).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use crate::activation::Activation;
use crate::conv::{conv2d, conv2d_owned, conv2d_writes_in_place, group_norm_act_conv2d};
use crate::linear::burn_linear;
use crate::normalization::{group_norm, group_norm_act};

/// Shape of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResnetBlock2DConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding; `None` for the VAE's blocks, which take none.
    pub temb_channels: Option<usize>,
    /// GroupNorm groups (`resnet_groups` / `norm_num_groups`).
    pub groups: usize,
    /// GroupNorm epsilon (`resnet_eps` / `norm_eps`).
    pub eps: f64,
    /// The output is divided by this (`output_scale_factor`, 1 except in some mid blocks).
    pub output_scale_factor: f64,
    /// The nonlinearity (`act_fn`, SiLU in SD).
    pub act: Activation,
}

impl ResnetBlock2DConfig {
    /// A block with SD's defaults: eps 1e-6, 32 groups, scale factor 1, SiLU.
    pub fn new(in_channels: usize, out_channels: usize, temb_channels: Option<usize>) -> Self {
        Self {
            in_channels,
            out_channels,
            temb_channels,
            groups: 32,
            eps: 1e-6,
            output_scale_factor: 1.0,
            act: Activation::Silu,
        }
    }

    /// Sets the GroupNorm groups and epsilon.
    pub fn with_norm(mut self, groups: usize, eps: f64) -> Self {
        self.groups = groups;
        self.eps = eps;
        self
    }

    /// Sets `output_scale_factor`.
    pub fn with_output_scale_factor(mut self, factor: f64) -> Self {
        self.output_scale_factor = factor;
        self
    }

    /// Sets the nonlinearity.
    pub fn with_act(mut self, act: Activation) -> Self {
        self.act = act;
        self
    }

    /// A randomly initialised block (load weights afterwards).
    pub fn init(&self, device: &Device) -> ResnetBlock2D {
        let conv3 = |cin, cout| {
            Conv2dConfig::new([cin, cout], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        ResnetBlock2D {
            norm1: group_norm(self.groups, self.in_channels, self.eps, device),
            conv1: conv3(self.in_channels, self.out_channels),
            time_emb_proj: self
                .temb_channels
                .map(|t| LinearConfig::new(t, self.out_channels).init(device)),
            norm2: group_norm(self.groups, self.out_channels, self.eps, device),
            conv2: conv3(self.out_channels, self.out_channels),
            conv_shortcut: (self.in_channels != self.out_channels).then(|| {
                Conv2dConfig::new([self.in_channels, self.out_channels], [1, 1]).init(device)
            }),
            output_scale_factor: self.output_scale_factor,
            act: self.act,
        }
    }
}

/// Input elements from which a block whose shortcut is a 1x1 convolution to fewer channels
/// reads its input through its first GroupNorm and writes the shortcut over the input
/// ([`crate::conv::group_norm_act_conv2d`], [`crate::conv::conv2d_owned`]), so that the input,
/// the shortcut and the first convolution's output are never alive together: 2^25 (128 MiB of
/// f32), the SD VAE decoder's last two levels from 512 px up (at 512 px the decode's peak RSS
/// 1037 -> 967 MiB with the fused upsampling, docs/performance.md). Smaller inputs keep the
/// allocating order: at the SD UNet's 96x96 level (768 px, 68 MiB inputs) writing in place
/// raised the UNet's peak RSS by 70-110 MiB, glibc's heap reusing the pages given back rather
/// than the free ones it held.
pub const IN_PLACE_FROM: usize = 1 << 25;

/// A residual block: `(shortcut(x) + conv2(act(norm2(conv1(act(norm1(x))) + temb)))) / scale`.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    /// GroupNorm over the input channels.
    pub norm1: GroupNorm,
    /// 3x3 convolution, `in -> out`.
    pub conv1: Conv2d,
    /// Projection of the (activated) time embedding to `out` channels.
    pub time_emb_proj: Option<Linear>,
    /// GroupNorm over the output channels.
    pub norm2: GroupNorm,
    /// 3x3 convolution, `out -> out`.
    pub conv2: Conv2d,
    /// 1x1 convolution on the residual path when `in != out`.
    pub conv_shortcut: Option<Conv2d>,
    /// Divisor of the output.
    pub output_scale_factor: f64,
    /// The nonlinearity.
    #[module(skip)]
    pub act: Activation,
}

impl ResnetBlock2D {
    /// FLOPs of [`forward`](Self::forward) on `batch` maps of `size` with a time embedding
    /// ([`crate::flops`]).
    pub fn flops(&self, batch: usize, size: [usize; 2]) -> u64 {
        let conv = |c: &burn::nn::conv::Conv2d| crate::flops::conv2d(c, batch, size).0;
        conv(&self.conv1)
            + conv(&self.conv2)
            + self.conv_shortcut.as_ref().map_or(0, conv)
            + self
                .time_emb_proj
                .as_ref()
                .map_or(0, |l| crate::flops::linear(l, batch))
    }

    /// Runs the block.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    /// - `temb`: `[batch, temb_channels]` (ignored by blocks built without `temb_channels`)
    /// - output: `[batch, out_channels, height, width]`
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        self.forward_in_place_from(x, temb, IN_PLACE_FROM)
    }

    /// [`forward`](Self::forward), the shortcut written over the input from `in_place_from`
    /// input elements up (where the kernels can).
    fn forward_in_place_from(
        &self,
        x: Tensor<4>,
        temb: Option<&Tensor<2>>,
        in_place_from: usize,
    ) -> Tensor<4> {
        // 1. norm1 -> act -> conv1, and the shortcut
        let (shortcut, h) = match &self.conv_shortcut {
            Some(conv) => {
                // where the shortcut can be written over `x` itself (a large image), conv1
                // reads `x` through its norm (nothing of x's size stored) and the shortcut
                // comes after: at most `x` and conv1's output alive (a VAE decoder's 256 -> 128
                // block at 512x512: 384 MiB, not 512)
                let fused = (x.shape().num_elements() >= in_place_from
                    && conv2d_writes_in_place(conv, &x))
                .then(|| group_norm_act_conv2d(&self.norm1, self.act, &self.conv1, &x))
                .flatten();
                match fused {
                    Some(h) => (conv2d_owned(conv, x), h),
                    // the shortcut first, so that `x` can be normalised in place (its last use)
                    None => {
                        let shortcut = conv2d(conv, x.clone());
                        let h = conv2d(&self.conv1, group_norm_act(&self.norm1, self.act, x));
                        (shortcut, h)
                    }
                }
            }
            None => {
                let h = conv2d(
                    &self.conv1,
                    group_norm_act(&self.norm1, self.act, x.clone()),
                );
                (x, h)
            }
        };
        // 2. + time_emb_proj(act(temb))[:, :, None, None]
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = burn_linear(proj, self.act.forward(temb.clone()));
                let [b, c] = t.dims();
                h + t.reshape([b, c, 1, 1])
            }
            _ => h,
        };
        // 3. norm2 -> act -> (dropout) -> conv2
        let h = conv2d(&self.conv2, group_norm_act(&self.norm2, self.act, h));
        // 4. residual, scaled
        let out = shortcut + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::tensor::Distribution;
    use burn::tensor::activation::silu;

    /// The block (on flex: Kiln's kernels, the first GroupNorm folded into the first
    /// convolution and the shortcut written over the input where they apply, whatever the
    /// size or [`IN_PLACE_FROM`]) against the same block in burn's own ops, within 1e-5
    /// relative: channels shrinking on a large image (the shortcut over the input) and a small
    /// one (the shortcut first), the same (no shortcut), growing (a shortcut of its own), with
    /// a time embedding and an output scale.
    #[test]
    fn forward_matches_burns_ops() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        for (x, cout, temb, scale) in [
            // the shortcut over the input (eight bands of 8192 pixels)
            ([1, 64, 256, 256], 32, Some(16), 2.0),
            ([2, 64, 16, 16], 32, None, 1.0),
            ([2, 32, 16, 16], 32, Some(16), 1.0),
            ([2, 32, 16, 16], 64, None, 1.0),
        ] {
            let cin = x[1];
            let mut block = ResnetBlock2DConfig::new(cin, cout, temb)
                .with_output_scale_factor(scale)
                .init(&device);
            let random = |n: usize| Param::from_tensor(Tensor::<1>::random([n], normal, &device));
            for (norm, n) in [(&mut block.norm1, cin), (&mut block.norm2, cout)] {
                norm.gamma = Some(random(n));
                norm.beta = Some(random(n));
            }
            let xt = Tensor::<4>::random(x, normal, &device) + 1.0;
            let tt = temb.map(|t| Tensor::<2>::random([x[0], t], normal, &device));
            let expected = {
                let norm = crate::normalization::reference_group_norm;
                let h = block.conv1.forward(silu(norm(&block.norm1, xt.clone())));
                let h = match (&block.time_emb_proj, &tt) {
                    (Some(proj), Some(t)) => {
                        h + proj.forward(silu(t.clone())).reshape([x[0], cout, 1, 1])
                    }
                    _ => h,
                };
                let h = block.conv2.forward(silu(norm(&block.norm2, h)));
                let shortcut = match &block.conv_shortcut {
                    Some(conv) => conv.forward(xt.clone()),
                    None => xt.clone(),
                };
                (shortcut + h) / scale
            };
            let ours = block.forward(xt.clone(), tt.as_ref());
            let relative = crate::reference::max_relative_error(&ours, &expected);
            assert!(relative < 1e-5, "{x:?} -> {cout}: {relative:e}");
            // the shortcut over the input at any size (a copy of x that nothing else holds)
            let owned = Tensor::<4>::from_data(xt.to_data(), &device);
            let ours = block.forward_in_place_from(owned, tt.as_ref(), 0);
            let relative = crate::reference::max_relative_error(&ours, &expected);
            assert!(relative < 1e-5, "{x:?} -> {cout}, in place: {relative:e}");
        }
    }
}
