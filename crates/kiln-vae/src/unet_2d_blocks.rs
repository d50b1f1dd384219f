//! The VAE's blocks: `DownEncoderBlock2D`, `UpDecoderBlock2D` and `UNetMidBlock2D` (ResNet blocks
//! with one spatial self-attention in the middle, no time embedding).
//!
//! Mirrors these classes of `diffusers/models/unets/unet_2d_blocks.py` (diffusers 0.42.1) as
//! `Encoder` and `Decoder` of `diffusers/models/autoencoders/vae.py` build them
//! (`resnet_time_scale_shift="default"`, `temb_channels=None`).

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use kiln_nn::activation::Activation;
use kiln_nn::attention::{Attention, AttentionConfig};
use kiln_nn::resampling::{Downsample2D, Upsample2D};
use kiln_nn::resnet::{ResnetBlock2D, ResnetBlock2DConfig};

/// Shared shape of the VAE's blocks: norm groups, epsilon and activation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockNorm {
    /// GroupNorm groups (`norm_num_groups`).
    pub groups: usize,
    /// GroupNorm epsilon (1e-6 in the VAE).
    pub eps: f64,
    /// Nonlinearity (`act_fn`).
    pub act: Activation,
}

impl BlockNorm {
    fn resnet(&self, cin: usize, cout: usize) -> ResnetBlock2DConfig {
        ResnetBlock2DConfig::new(cin, cout, None)
            .with_norm(self.groups, self.eps)
            .with_act(self.act)
    }
}

/// `num_layers` ResNet blocks, then an optional stride-2 downsampler (padding `(0, 1, 0, 1)`).
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D {
    /// The ResNet blocks; the first maps `in -> out` channels.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one downsampler.
    pub downsamplers: Vec<Downsample2D>,
}

impl DownEncoderBlock2D {
    /// A randomly initialised block (load weights afterwards).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        add_downsample: bool,
        norm: BlockNorm,
        device: &Device,
    ) -> Self {
        Self {
            resnets: (0..num_layers)
                .map(|i| {
                    let cin = if i == 0 { in_channels } else { out_channels };
                    norm.resnet(cin, out_channels).init(device)
                })
                .collect(),
            downsamplers: add_downsample
                .then(|| Downsample2D::new(out_channels, out_channels, 0, device))
                .into_iter()
                .collect(),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    /// - output: `[batch, out_channels, height / 2, width / 2]` (or unchanged size without a
    ///   downsampler)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.resnets.iter().fold(x, |x, r| r.forward(x, None));
        self.downsamplers.iter().fold(x, |x, d| d.forward(x))
    }

    /// FLOPs of [`forward`](Self::forward) on `batch` maps of `size`, and the output size
    /// ([`kiln_nn::flops`]).
    pub fn flops(&self, batch: usize, size: [usize; 2]) -> (u64, [usize; 2]) {
        let resnets: u64 = self.resnets.iter().map(|r| r.flops(batch, size)).sum();
        self.downsamplers
            .iter()
            .fold((resnets, size), |(flops, size), d| {
                let (f, out) = d.flops(batch, size);
                (flops + f, out)
            })
    }
}

/// `num_layers` ResNet blocks, then an optional nearest x2 upsampler with a convolution.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D {
    /// The ResNet blocks; the first maps `in -> out` channels.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one upsampler.
    pub upsamplers: Vec<Upsample2D>,
}

impl UpDecoderBlock2D {
    /// A randomly initialised block (load weights afterwards).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        num_layers: usize,
        add_upsample: bool,
        norm: BlockNorm,
        device: &Device,
    ) -> Self {
        Self {
            resnets: (0..num_layers)
                .map(|i| {
                    let cin = if i == 0 { in_channels } else { out_channels };
                    norm.resnet(cin, out_channels).init(device)
                })
                .collect(),
            upsamplers: add_upsample
                .then(|| Upsample2D::new(out_channels, out_channels, device))
                .into_iter()
                .collect(),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    /// - output: `[batch, out_channels, 2 * height, 2 * width]` (or unchanged size without an
    ///   upsampler)
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.resnets.iter().fold(x, |x, r| r.forward(x, None));
        self.upsamplers.iter().fold(x, |x, u| u.forward(x))
    }

    /// FLOPs of [`forward`](Self::forward) on `batch` maps of `size`, and the output size
    /// ([`kiln_nn::flops`]).
    pub fn flops(&self, batch: usize, size: [usize; 2]) -> (u64, [usize; 2]) {
        let resnets: u64 = self.resnets.iter().map(|r| r.flops(batch, size)).sum();
        self.upsamplers
            .iter()
            .fold((resnets, size), |(flops, [h, w]), u| {
                (flops + u.flops(batch, [2 * h, 2 * w]), [2 * h, 2 * w])
            })
    }
}

/// `resnets.0 -> attentions.0 -> resnets.1`: the VAE's bottleneck, with one single-head spatial
/// self-attention (omitted when `mid_block_add_attention` is false).
#[derive(Module, Debug)]
pub struct UNetMidBlock2D {
    /// Zero or one attention layers.
    pub attentions: Vec<Attention>,
    /// Two ResNet blocks.
    pub resnets: Vec<ResnetBlock2D>,
}

impl UNetMidBlock2D {
    /// A randomly initialised block (load weights afterwards).
    pub fn new(channels: usize, add_attention: bool, norm: BlockNorm, device: &Device) -> Self {
        Self {
            attentions: add_attention
                .then(|| {
                    // heads = channels / attention_head_dim with attention_head_dim = channels.
                    AttentionConfig::new(channels, 1, channels)
                        .with_bias(true)
                        .with_spatial_norm(norm.groups, norm.eps, 1.0)
                        .init(device)
                })
                .into_iter()
                .collect(),
            resnets: (0..2)
                .map(|_| norm.resnet(channels, channels).init(device))
                .collect(),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`
    /// - output: same as `x`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(attn.forward_spatial(x), None);
        }
        if self.attentions.is_empty() {
            x = self.resnets[1].forward(x, None);
        }
        x
    }

    /// FLOPs of [`forward`](Self::forward) on `batch` maps of `size` ([`kiln_nn::flops`]).
    pub fn flops(&self, batch: usize, size: [usize; 2]) -> u64 {
        let pixels = size[0] * size[1];
        self.resnets
            .iter()
            .map(|r| r.flops(batch, size))
            .sum::<u64>()
            + self
                .attentions
                .iter()
                .map(|a| a.flops(batch, pixels, pixels))
                .sum::<u64>()
    }
}
