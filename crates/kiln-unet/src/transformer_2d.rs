//! `Transformer2DModel`: a spatial transformer that flattens a feature map to tokens, runs
//! `BasicTransformerBlock`s over them and folds them back, with a residual around it all.
//!
//! Mirrors the continuous-input path of `Transformer2DModel` in
//! `diffusers/models/transformers/transformer_2d.py` (diffusers 0.42.1): `proj_in`/`proj_out` are
//! 1x1 convolutions when `use_linear_projection` is false (SD 1.x) and linear layers when it is
//! true (SD 2.x).

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use kiln_nn::normalization::{group_norm, group_norm_forward};

use crate::attention::{BasicTransformerBlock, TransformerBlockConfig};
use kiln_nn::conv::conv2d;
use kiln_nn::linear::linear;

/// Input and output projection: 1x1 convolution or linear layer (`use_linear_projection`).
#[derive(Module, Debug)]
pub enum Projection {
    /// 1x1 convolution on the feature map (SD 1.x).
    Conv(Conv2d),
    /// Linear layer on the tokens (SD 2.x).
    Linear(Linear),
}

impl Projection {
    fn new(cin: usize, cout: usize, linear: bool, device: &Device) -> Self {
        if linear {
            Self::Linear(LinearConfig::new(cin, cout).init(device))
        } else {
            Self::Conv(Conv2dConfig::new([cin, cout], [1, 1]).init(device))
        }
    }
}

/// Options of a [`Transformer2DModel`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transformer2DConfig {
    /// Channels of the feature map.
    pub in_channels: usize,
    /// Number of heads; the token width is `heads * head_dim`.
    pub heads: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// Number of `BasicTransformerBlock`s (`transformer_layers_per_block`).
    pub num_layers: usize,
    /// Width of the cross-attention context.
    pub cross_attention_dim: usize,
    /// GroupNorm groups (`norm_num_groups`).
    pub norm_num_groups: usize,
    /// Linear rather than 1x1-conv projections.
    pub use_linear_projection: bool,
    /// `upcast_attention`.
    pub upcast_attention: bool,
}

/// `x + proj_out(blocks(proj_in(norm(x))))`, tokens in between.
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    /// GroupNorm over the input (eps 1e-6).
    pub norm: GroupNorm,
    /// Channels to token width.
    pub proj_in: Projection,
    /// The transformer blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// Token width back to channels.
    pub proj_out: Projection,
}

impl Projection {
    /// FLOPs on `batch` maps of `size` (a 1x1 convolution, or a linear layer on every pixel).
    fn flops(&self, batch: usize, size: [usize; 2]) -> u64 {
        match self {
            Self::Conv(conv) => kiln_nn::flops::conv2d(conv, batch, size).0,
            Self::Linear(linear) => kiln_nn::flops::linear(linear, batch * size[0] * size[1]),
        }
    }
}

impl Transformer2DModel {
    /// FLOPs of [`forward`](Self::forward) on `batch` maps of `size` with `context_tokens`
    /// context tokens ([`kiln_nn::flops`]).
    pub fn flops(&self, batch: usize, size: [usize; 2], context_tokens: usize) -> u64 {
        let tokens = size[0] * size[1];
        self.proj_in.flops(batch, size)
            + self
                .transformer_blocks
                .iter()
                .map(|b| b.flops(batch, tokens, context_tokens))
                .sum::<u64>()
            + self.proj_out.flops(batch, size)
    }

    /// A randomly initialised model (load weights afterwards).
    pub fn new(config: &Transformer2DConfig, device: &Device) -> Self {
        let inner = config.heads * config.head_dim;
        let block = TransformerBlockConfig {
            dim: inner,
            heads: config.heads,
            head_dim: config.head_dim,
            cross_attention_dim: config.cross_attention_dim,
            upcast: config.upcast_attention,
        };
        let linear = config.use_linear_projection;
        Self {
            norm: group_norm(config.norm_num_groups, config.in_channels, 1e-6, device),
            proj_in: Projection::new(config.in_channels, inner, linear, device),
            transformer_blocks: (0..config.num_layers)
                .map(|_| BasicTransformerBlock::new(&block, device))
                .collect(),
            proj_out: Projection::new(inner, config.in_channels, linear, device),
        }
    }

    /// Width the cross-attention context must have.
    pub fn context_dim(&self) -> Option<usize> {
        self.transformer_blocks
            .first()
            .map(|b| b.attn2.context_dim())
    }

    /// # Shapes
    /// - `x`: `[batch, channels, height, width]`
    /// - `context`: `[batch, context_tokens, cross_attention_dim]`
    /// - output: same as `x`
    pub fn forward(&self, x: Tensor<4>, context: &Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        // 1. Norm, then project in and flatten to tokens: [b, c, h, w] -> [b, h*w, inner]
        let x = group_norm_forward(&self.norm, x);
        let tokens = match &self.proj_in {
            Projection::Conv(conv) => {
                let x = conv2d(conv, x);
                let inner = x.dims()[1];
                x.reshape([b, inner, h * w]).swap_dims(1, 2)
            }
            Projection::Linear(layer) => linear(layer, x.reshape([b, c, h * w]).swap_dims(1, 2)),
        };
        // 2. Transformer blocks
        let tokens = self
            .transformer_blocks
            .iter()
            .fold(tokens, |t, block| block.forward(t, context));
        // 3. Project out and unflatten: [b, h*w, inner] -> [b, c, h, w]
        let out = match &self.proj_out {
            Projection::Conv(conv) => {
                let inner = tokens.dims()[2];
                conv2d(conv, tokens.swap_dims(1, 2).reshape([b, inner, h, w]))
            }
            Projection::Linear(layer) => {
                linear(layer, tokens).swap_dims(1, 2).reshape([b, c, h, w])
            }
        };
        // 4. Residual
        out + residual
    }
}
