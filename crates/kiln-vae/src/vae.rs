//! The VAE's `Encoder` (image to the moments of a diagonal Gaussian), `Decoder` (latent to
//! image) and `DiagonalGaussianDistribution` (Kingma & Welling, 2014; the KL-regularised
//! autoencoder of Rombach et al., 2022).
//!
//! Mirrors `Encoder`, `Decoder` and `DiagonalGaussianDistribution` in
//! `diffusers/models/autoencoders/vae.py` (diffusers 0.42.1).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::{Device, Tensor};
use kiln_nn::normalization::{group_norm, group_norm_act};

use crate::autoencoder_kl::AutoencoderKLConfig;
use crate::unet_2d_blocks::{BlockNorm, DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D};
use kiln_nn::conv::conv2d;

/// GroupNorm epsilon of every norm in the VAE (fixed in diffusers, not in the config).
pub const VAE_NORM_EPS: f64 = 1e-6;

fn conv3(cin: usize, cout: usize, device: &Device) -> Conv2d {
    Conv2dConfig::new([cin, cout], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(device)
}

fn block_norm(config: &AutoencoderKLConfig) -> BlockNorm {
    BlockNorm {
        groups: config.norm_num_groups,
        eps: VAE_NORM_EPS,
        act: config.act_fn,
    }
}

/// Image to `2 * latent_channels` moments (mean and log-variance), downsampling by
/// `2^(blocks - 1)`.
#[derive(Module, Debug)]
pub struct Encoder {
    /// `in_channels -> block_out_channels[0]`, 3x3.
    pub conv_in: Conv2d,
    /// One `DownEncoderBlock2D` per entry of `block_out_channels`.
    pub down_blocks: Vec<DownEncoderBlock2D>,
    /// The bottleneck.
    pub mid_block: UNetMidBlock2D,
    /// Final norm (followed by the activation).
    pub conv_norm_out: GroupNorm,
    /// `block_out_channels[-1] -> 2 * latent_channels`, 3x3.
    pub conv_out: Conv2d,
    /// The activation.
    #[module(skip)]
    pub act: kiln_nn::activation::Activation,
}

impl Encoder {
    /// A randomly initialised encoder (load weights afterwards).
    pub fn new(config: &AutoencoderKLConfig, device: &Device) -> Self {
        let channels = &config.block_out_channels;
        let norm = block_norm(config);
        let last = *channels.last().unwrap_or(&1);
        let mut output = channels[0];
        let down_blocks = channels
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let input = output;
                output = out;
                DownEncoderBlock2D::new(
                    input,
                    out,
                    config.layers_per_block,
                    i + 1 < channels.len(),
                    norm,
                    device,
                )
            })
            .collect();
        Self {
            conv_in: conv3(config.in_channels, channels[0], device),
            down_blocks,
            mid_block: UNetMidBlock2D::new(last, config.mid_block_add_attention, norm, device),
            conv_norm_out: group_norm(config.norm_num_groups, last, VAE_NORM_EPS, device),
            conv_out: conv3(last, 2 * config.latent_channels, device),
            act: config.act_fn,
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`
    /// - output: `[batch, 2 * latent_channels, height / f, width / f]`, `f = 2^(blocks - 1)`
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = conv2d(&self.conv_in, x);
        let x = self.down_blocks.iter().fold(x, |x, b| b.forward(x));
        let x = self.mid_block.forward(x);
        let x = group_norm_act(&self.conv_norm_out, self.act, x);
        conv2d(&self.conv_out, x)
    }

    /// FLOPs of [`forward`](Self::forward) on `batch` images of `size`, and the latent size
    /// ([`kiln_nn::flops`]).
    pub fn flops(&self, batch: usize, size: [usize; 2]) -> (u64, [usize; 2]) {
        let (mut flops, mut size) = kiln_nn::flops::conv2d(&self.conv_in, batch, size);
        for block in &self.down_blocks {
            let (f, s) = block.flops(batch, size);
            flops += f;
            size = s;
        }
        flops += self.mid_block.flops(batch, size);
        let (f, size) = kiln_nn::flops::conv2d(&self.conv_out, batch, size);
        (flops + f, size)
    }
}

/// Latent to image, upsampling by `2^(blocks - 1)`.
#[derive(Module, Debug)]
pub struct Decoder {
    /// `latent_channels -> block_out_channels[-1]`, 3x3.
    pub conv_in: Conv2d,
    /// The bottleneck.
    pub mid_block: UNetMidBlock2D,
    /// One `UpDecoderBlock2D` per entry of `block_out_channels`, widest first.
    pub up_blocks: Vec<UpDecoderBlock2D>,
    /// Final norm (followed by the activation).
    pub conv_norm_out: GroupNorm,
    /// `block_out_channels[0] -> out_channels`, 3x3.
    pub conv_out: Conv2d,
    /// The activation.
    #[module(skip)]
    pub act: kiln_nn::activation::Activation,
}

impl Decoder {
    /// A randomly initialised decoder (load weights afterwards).
    pub fn new(config: &AutoencoderKLConfig, device: &Device) -> Self {
        let norm = block_norm(config);
        let reversed: Vec<usize> = config.block_out_channels.iter().rev().copied().collect();
        let mut output = reversed[0];
        let up_blocks = reversed
            .iter()
            .enumerate()
            .map(|(i, &out)| {
                let prev = output;
                output = out;
                UpDecoderBlock2D::new(
                    prev,
                    out,
                    config.layers_per_block + 1,
                    i + 1 < reversed.len(),
                    norm,
                    device,
                )
            })
            .collect();
        let first = config.block_out_channels[0];
        Self {
            conv_in: conv3(config.latent_channels, reversed[0], device),
            mid_block: UNetMidBlock2D::new(
                reversed[0],
                config.mid_block_add_attention,
                norm,
                device,
            ),
            up_blocks,
            conv_norm_out: group_norm(config.norm_num_groups, first, VAE_NORM_EPS, device),
            conv_out: conv3(first, config.out_channels, device),
            act: config.act_fn,
        }
    }

    /// # Shapes
    /// - `z`: `[batch, latent_channels, height, width]`
    /// - output: `[batch, out_channels, height * f, width * f]`, `f = 2^(blocks - 1)`
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let x = conv2d(&self.conv_in, z);
        let x = self.mid_block.forward(x);
        let x = self.up_blocks.iter().fold(x, |x, b| b.forward(x));
        let x = group_norm_act(&self.conv_norm_out, self.act, x);
        conv2d(&self.conv_out, x)
    }

    /// FLOPs of [`forward`](Self::forward) on `batch` latents of `size`, and the image size
    /// ([`kiln_nn::flops`]).
    pub fn flops(&self, batch: usize, size: [usize; 2]) -> (u64, [usize; 2]) {
        let (mut flops, mut size) = kiln_nn::flops::conv2d(&self.conv_in, batch, size);
        flops += self.mid_block.flops(batch, size);
        for block in &self.up_blocks {
            let (f, s) = block.flops(batch, size);
            flops += f;
            size = s;
        }
        let (f, size) = kiln_nn::flops::conv2d(&self.conv_out, batch, size);
        (flops + f, size)
    }
}

/// The posterior `N(mean, exp(logvar))` the encoder predicts, per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussianDistribution {
    /// `[batch, latent_channels, h, w]`
    pub mean: Tensor<4>,
    /// Log-variance clamped to `[-30, 20]`, `[batch, latent_channels, h, w]`.
    pub logvar: Tensor<4>,
}

impl DiagonalGaussianDistribution {
    /// Splits `moments` into mean and log-variance along channels and clamps the log-variance.
    ///
    /// # Shapes
    /// - `moments`: `[batch, 2 * latent_channels, h, w]`
    pub fn from_moments(moments: Tensor<4>) -> Self {
        let half = moments.dims()[1] / 2;
        let mean = moments.clone().narrow(1, 0, half);
        let logvar = moments.narrow(1, half, half);
        Self {
            mean,
            logvar: logvar.clamp(-30.0, 20.0),
        }
    }

    /// `exp(logvar / 2)`.
    pub fn std(&self) -> Tensor<4> {
        (self.logvar.clone() * 0.5).exp()
    }

    /// `mean + std * noise`, with noise supplied by the caller (draw it on the host from a seeded
    /// RNG for the same result on every backend).
    ///
    /// # Shapes
    /// - `noise`: same as `mean`
    pub fn sample(&self, noise: Tensor<4>) -> Tensor<4> {
        self.mean.clone() + self.std() * noise
    }

    /// The mode of the distribution: its mean.
    pub fn mode(&self) -> Tensor<4> {
        self.mean.clone()
    }
}
