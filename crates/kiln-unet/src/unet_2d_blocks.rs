//! The UNet's blocks: `CrossAttnDownBlock2D`, `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `UpBlock2D` and `CrossAttnUpBlock2D`, with the skip-connection bookkeeping.
//!
//! Mirrors these classes of `diffusers/models/unets/unet_2d_blocks.py` (diffusers 0.42.1) with
//! `resnet_time_scale_shift="default"` and no dual or cross-only attention. Down blocks return
//! the hidden state after each ResNet (and after the downsampler) as skip connections; up blocks
//! pop one skip per ResNet from the end and concatenate it on channels.

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use kiln_nn::activation::Activation;
use kiln_nn::resampling::{Downsample2D, Upsample2D};
use kiln_nn::resnet::{ResnetBlock2D, ResnetBlock2DConfig};

use crate::transformer_2d::{Transformer2DConfig, Transformer2DModel};

/// What every block of one UNet shares: time-embedding width, norm and activation, attention
/// options.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BlockContext {
    /// Time-embedding width (`4 * block_out_channels[0]` unless configured).
    pub temb_channels: usize,
    /// GroupNorm groups (`norm_num_groups`).
    pub groups: usize,
    /// GroupNorm epsilon of the ResNets (`norm_eps`).
    pub eps: f64,
    /// Nonlinearity (`act_fn`).
    pub act: Activation,
    /// `use_linear_projection`.
    pub use_linear_projection: bool,
    /// `upcast_attention`.
    pub upcast_attention: bool,
}

impl BlockContext {
    fn resnet(&self, cin: usize, cout: usize, scale: f64, device: &Device) -> ResnetBlock2D {
        ResnetBlock2DConfig::new(cin, cout, Some(self.temb_channels))
            .with_norm(self.groups, self.eps)
            .with_act(self.act)
            .with_output_scale_factor(scale)
            .init(device)
    }

    fn transformer(
        &self,
        attn: &AttentionShape,
        channels: usize,
        device: &Device,
    ) -> Transformer2DModel {
        Transformer2DModel::new(
            &Transformer2DConfig {
                in_channels: channels,
                heads: attn.heads,
                head_dim: channels / attn.heads,
                num_layers: attn.layers,
                cross_attention_dim: attn.cross_attention_dim,
                norm_num_groups: self.groups,
                use_linear_projection: self.use_linear_projection,
                upcast_attention: self.upcast_attention,
            },
            device,
        )
    }
}

/// Attention shape of one cross-attention block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionShape {
    /// Heads (the head width is `channels / heads`).
    pub heads: usize,
    /// `BasicTransformerBlock`s per `Transformer2DModel` (`transformer_layers_per_block`).
    pub layers: usize,
    /// Context width (`cross_attention_dim`).
    pub cross_attention_dim: usize,
}

/// Channels and depth of one down or up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockShape {
    /// Input channels (`in_channels`).
    pub in_channels: usize,
    /// Output channels (`out_channels`).
    pub out_channels: usize,
    /// Channels coming from the previous up block (`prev_output_channel`; up blocks only).
    pub prev_output_channels: usize,
    /// ResNets in the block.
    pub num_layers: usize,
    /// Whether the block ends with a down- or upsampler.
    pub resample: bool,
}

fn down_resnets(shape: &BlockShape, ctx: &BlockContext, device: &Device) -> Vec<ResnetBlock2D> {
    (0..shape.num_layers)
        .map(|i| {
            let cin = if i == 0 {
                shape.in_channels
            } else {
                shape.out_channels
            };
            ctx.resnet(cin, shape.out_channels, 1.0, device)
        })
        .collect()
}

fn downsamplers(shape: &BlockShape, padding: usize, device: &Device) -> Vec<Downsample2D> {
    shape
        .resample
        .then(|| Downsample2D::new(shape.out_channels, shape.out_channels, padding, device))
        .into_iter()
        .collect()
}

/// ResNets of an up block: the `i`-th takes the previous output plus one skip connection.
fn up_resnets(shape: &BlockShape, ctx: &BlockContext, device: &Device) -> Vec<ResnetBlock2D> {
    (0..shape.num_layers)
        .map(|i| {
            let skip = if i + 1 == shape.num_layers {
                shape.in_channels
            } else {
                shape.out_channels
            };
            let cin = if i == 0 {
                shape.prev_output_channels
            } else {
                shape.out_channels
            };
            ctx.resnet(cin + skip, shape.out_channels, 1.0, device)
        })
        .collect()
}

fn upsamplers(shape: &BlockShape, device: &Device) -> Vec<Upsample2D> {
    shape
        .resample
        .then(|| Upsample2D::new(shape.out_channels, shape.out_channels, device))
        .into_iter()
        .collect()
}

/// Pops the last skip connection and concatenates it after `x` on channels.
fn with_skip(x: Tensor<4>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
    match skips.pop() {
        Some(skip) => Tensor::cat(vec![x, skip], 1),
        None => x,
    }
}

/// ResNets, each followed by a `Transformer2DModel`, then an optional downsampler.
#[derive(Module, Debug)]
pub struct CrossAttnDownBlock2D {
    /// One transformer per ResNet.
    pub attentions: Vec<Transformer2DModel>,
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one downsampler.
    pub downsamplers: Vec<Downsample2D>,
}

impl CrossAttnDownBlock2D {
    /// A randomly initialised block (load weights afterwards).
    pub fn new(
        shape: &BlockShape,
        attn: &AttentionShape,
        downsample_padding: usize,
        ctx: &BlockContext,
        device: &Device,
    ) -> Self {
        Self {
            attentions: (0..shape.num_layers)
                .map(|_| ctx.transformer(attn, shape.out_channels, device))
                .collect(),
            resnets: down_resnets(shape, ctx, device),
            downsamplers: downsamplers(shape, downsample_padding, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, in_channels, h, w]`, `temb`: `[batch, temb_channels]`,
    ///   `context`: `[batch, tokens, cross_attention_dim]`
    /// - output: `[batch, out_channels, h / 2, w / 2]` (or `h, w` without a downsampler); each
    ///   intermediate state is pushed onto `skips`
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        let mut x = x;
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            x = attn.forward(resnet.forward(x, Some(temb)), context);
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// ResNets, then an optional downsampler.
#[derive(Module, Debug)]
pub struct DownBlock2D {
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one downsampler.
    pub downsamplers: Vec<Downsample2D>,
}

impl DownBlock2D {
    /// A randomly initialised block (load weights afterwards).
    pub fn new(
        shape: &BlockShape,
        downsample_padding: usize,
        ctx: &BlockContext,
        device: &Device,
    ) -> Self {
        Self {
            resnets: down_resnets(shape, ctx, device),
            downsamplers: downsamplers(shape, downsample_padding, device),
        }
    }

    /// # Shapes
    /// As [`CrossAttnDownBlock2D::forward`], without a context.
    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
        let mut x = x;
        for resnet in &self.resnets {
            x = resnet.forward(x, Some(temb));
            skips.push(x.clone());
        }
        for down in &self.downsamplers {
            x = down.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// `resnets.0`, then (`attentions.i`, `resnets.i+1`) pairs, at the lowest resolution.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn {
    /// One transformer per layer.
    pub attentions: Vec<Transformer2DModel>,
    /// One more ResNet than transformers.
    pub resnets: Vec<ResnetBlock2D>,
}

impl UNetMidBlock2DCrossAttn {
    /// A randomly initialised block with one layer (load weights afterwards).
    pub fn new(
        channels: usize,
        attn: &AttentionShape,
        output_scale_factor: f64,
        ctx: &BlockContext,
        device: &Device,
    ) -> Self {
        Self {
            attentions: vec![ctx.transformer(attn, channels, device)],
            resnets: (0..2)
                .map(|_| ctx.resnet(channels, channels, output_scale_factor, device))
                .collect(),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, channels, h, w]`; output: same
    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>, context: &Tensor<3>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(attn.forward(x, context), Some(temb));
        }
        x
    }
}

/// The block's upsampler (if any) to the spatial size of the next skip connection: twice the size
/// when the latent divides evenly, the odd size the downsampler came from otherwise (diffusers'
/// `forward_upsample_size`).
fn upsample(upsamplers: &[Upsample2D], x: Tensor<4>, skips: &[Tensor<4>]) -> Tensor<4> {
    let size = skips.last().map(|s| {
        let [_, _, h, w] = s.dims();
        [h, w]
    });
    upsamplers.iter().fold(x, |x, up| up.forward_to(x, size))
}

/// ResNets over `[x, skip]` concatenations, then an optional upsampler.
#[derive(Module, Debug)]
pub struct UpBlock2D {
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one upsampler.
    pub upsamplers: Vec<Upsample2D>,
}

impl UpBlock2D {
    /// A randomly initialised block (load weights afterwards).
    pub fn new(shape: &BlockShape, ctx: &BlockContext, device: &Device) -> Self {
        Self {
            resnets: up_resnets(shape, ctx, device),
            upsamplers: upsamplers(shape, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, prev_output_channels, h, w]`; pops one skip per ResNet from `skips`
    /// - output: `[batch, out_channels, 2h, 2w]` (or `h, w` without an upsampler; the next
    ///   skip's size when the latent size was odd at that level)
    pub fn forward(&self, x: Tensor<4>, temb: &Tensor<2>, skips: &mut Vec<Tensor<4>>) -> Tensor<4> {
        let mut x = x;
        for resnet in &self.resnets {
            x = resnet.forward(with_skip(x, skips), Some(temb));
        }
        upsample(&self.upsamplers, x, skips)
    }
}

/// ResNets over `[x, skip]` concatenations, each followed by a `Transformer2DModel`, then an
/// optional upsampler.
#[derive(Module, Debug)]
pub struct CrossAttnUpBlock2D {
    /// One transformer per ResNet.
    pub attentions: Vec<Transformer2DModel>,
    /// The ResNets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Zero or one upsampler.
    pub upsamplers: Vec<Upsample2D>,
}

impl CrossAttnUpBlock2D {
    /// A randomly initialised block (load weights afterwards).
    pub fn new(
        shape: &BlockShape,
        attn: &AttentionShape,
        ctx: &BlockContext,
        device: &Device,
    ) -> Self {
        Self {
            attentions: (0..shape.num_layers)
                .map(|_| ctx.transformer(attn, shape.out_channels, device))
                .collect(),
            resnets: up_resnets(shape, ctx, device),
            upsamplers: upsamplers(shape, device),
        }
    }

    /// # Shapes
    /// As [`UpBlock2D::forward`], with `context`: `[batch, tokens, cross_attention_dim]`.
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        let mut x = x;
        for (resnet, attn) in self.resnets.iter().zip(&self.attentions) {
            x = attn.forward(resnet.forward(with_skip(x, skips), Some(temb)), context);
        }
        upsample(&self.upsamplers, x, skips)
    }
}

/// One down block of either type; no key segment of its own in checkpoints.
#[derive(Module, Debug)]
pub enum DownBlock {
    /// With cross-attention.
    CrossAttnDownBlock2D(CrossAttnDownBlock2D),
    /// ResNets only.
    DownBlock2D(DownBlock2D),
}

/// One up block of either type; no key segment of its own in checkpoints.
#[derive(Module, Debug)]
pub enum UpBlock {
    /// With cross-attention.
    CrossAttnUpBlock2D(CrossAttnUpBlock2D),
    /// ResNets only.
    UpBlock2D(UpBlock2D),
}

/// What the FLOP count of a pass needs: the batch, the context length, and the sizes of the
/// skip connections as the down blocks push them (the up blocks upsample to them).
#[derive(Debug, Clone)]
pub struct FlopCount {
    /// Batch size.
    pub batch: usize,
    /// Context tokens of the cross-attention.
    pub context_tokens: usize,
    /// `[height, width]` of each skip connection, as the forward pass's stack holds them.
    pub skips: Vec<[usize; 2]>,
}

impl FlopCount {
    fn transformers(&self, attentions: &[Transformer2DModel], size: [usize; 2]) -> u64 {
        attentions
            .iter()
            .map(|a| a.flops(self.batch, size, self.context_tokens))
            .sum()
    }

    fn down(
        &mut self,
        resnets: &[ResnetBlock2D],
        attentions: &[Transformer2DModel],
        downsamplers: &[Downsample2D],
        size: [usize; 2],
    ) -> (u64, [usize; 2]) {
        let mut flops = 0;
        for (i, resnet) in resnets.iter().enumerate() {
            flops += resnet.flops(self.batch, size);
            flops += self.transformers(attentions.get(i..=i).unwrap_or(&[]), size);
            self.skips.push(size);
        }
        let mut size = size;
        for down in downsamplers {
            let (f, out) = down.flops(self.batch, size);
            flops += f;
            size = out;
            self.skips.push(size);
        }
        (flops, size)
    }

    fn up(
        &mut self,
        resnets: &[ResnetBlock2D],
        attentions: &[Transformer2DModel],
        upsamplers: &[Upsample2D],
        size: [usize; 2],
    ) -> (u64, [usize; 2]) {
        let mut flops = 0;
        for (i, resnet) in resnets.iter().enumerate() {
            self.skips.pop();
            flops += resnet.flops(self.batch, size);
            flops += self.transformers(attentions.get(i..=i).unwrap_or(&[]), size);
        }
        let mut size = size;
        for up in upsamplers {
            size = self
                .skips
                .last()
                .copied()
                .unwrap_or([2 * size[0], 2 * size[1]]);
            flops += up.flops(self.batch, size);
        }
        (flops, size)
    }
}

impl UNetMidBlock2DCrossAttn {
    /// FLOPs of [`forward`](Self::forward) on maps of `size` ([`kiln_nn::flops`]).
    pub fn flops(&self, count: &FlopCount, size: [usize; 2]) -> u64 {
        self.resnets
            .iter()
            .map(|r| r.flops(count.batch, size))
            .sum::<u64>()
            + count.transformers(&self.attentions, size)
    }
}

impl DownBlock {
    /// FLOPs of [`forward`](Self::forward) on maps of `size`, pushing its skip sizes onto
    /// `count`; returns them and the output size.
    pub fn flops(&self, count: &mut FlopCount, size: [usize; 2]) -> (u64, [usize; 2]) {
        match self {
            Self::CrossAttnDownBlock2D(b) => {
                count.down(&b.resnets, &b.attentions, &b.downsamplers, size)
            }
            Self::DownBlock2D(b) => count.down(&b.resnets, &[], &b.downsamplers, size),
        }
    }

    /// Runs the block, pushing its skip connections.
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        match self {
            Self::CrossAttnDownBlock2D(b) => b.forward(x, temb, context, skips),
            Self::DownBlock2D(b) => b.forward(x, temb, skips),
        }
    }

    /// The transformers of the block (none for `DownBlock2D`).
    pub fn attentions(&self) -> &[Transformer2DModel] {
        match self {
            Self::CrossAttnDownBlock2D(b) => &b.attentions,
            Self::DownBlock2D(_) => &[],
        }
    }
}

impl UpBlock {
    /// FLOPs of [`forward`](Self::forward) on maps of `size`, popping its skips from `count`;
    /// returns them and the output size.
    pub fn flops(&self, count: &mut FlopCount, size: [usize; 2]) -> (u64, [usize; 2]) {
        match self {
            Self::CrossAttnUpBlock2D(b) => count.up(&b.resnets, &b.attentions, &b.upsamplers, size),
            Self::UpBlock2D(b) => count.up(&b.resnets, &[], &b.upsamplers, size),
        }
    }

    /// Runs the block, popping its skip connections.
    pub fn forward(
        &self,
        x: Tensor<4>,
        temb: &Tensor<2>,
        context: &Tensor<3>,
        skips: &mut Vec<Tensor<4>>,
    ) -> Tensor<4> {
        match self {
            Self::CrossAttnUpBlock2D(b) => b.forward(x, temb, context, skips),
            Self::UpBlock2D(b) => b.forward(x, temb, skips),
        }
    }

    /// The transformers of the block (none for `UpBlock2D`).
    pub fn attentions(&self) -> &[Transformer2DModel] {
        match self {
            Self::CrossAttnUpBlock2D(b) => &b.attentions,
            Self::UpBlock2D(_) => &[],
        }
    }
}
