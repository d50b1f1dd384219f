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
use crate::conv::conv2d;
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
        // the shortcut first where it is a convolution, so that `x` can be normalised in place
        // (its last use), which keeps one tensor of its size fewer alive
        let (shortcut, x_in) = match &self.conv_shortcut {
            Some(conv) => (conv2d(conv, x.clone()), x),
            None => (x.clone(), x),
        };
        // 1. norm1 -> act -> conv1
        let h = conv2d(&self.conv1, group_norm_act(&self.norm1, self.act, x_in));
        // 2. + time_emb_proj(act(temb))[:, :, None, None]
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(self.act.forward(temb.clone()));
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
