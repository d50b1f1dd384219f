//! `BasicTransformerBlock` (self-attention, cross-attention, GEGLU feed-forward, each behind a
//! LayerNorm and a residual) and its `FeedForward` / `GEGLU` parts.
//!
//! Mirrors `BasicTransformerBlock` and `FeedForward` in `diffusers/models/attention.py` and
//! `GEGLU` in `diffusers/models/activations.py` (diffusers 0.42.1) with `norm_type="layer_norm"`,
//! `activation_fn="geglu"` (Shazeer, 2020, "GLU Variants Improve Transformer"), as SD 1.x/2.x
//! configure them.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use kiln_nn::attention::{Attention, AttentionConfig};
use kiln_nn::linear::linear;

/// `proj` to twice the width, then `hidden * gelu(gate)` (exact GELU).
#[derive(Module, Debug)]
pub struct GEGLU {
    /// `dim_in -> 2 * dim_out`: hidden and gate halves.
    pub proj: Linear,
}

impl GEGLU {
    /// # Shapes
    /// - `x`: `[batch, tokens, dim_in]`
    /// - output: `[batch, tokens, dim_out]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        kiln_nn::activation::geglu(linear(&self.proj, x))
    }
}

/// `net.0` (GEGLU), `net.1` (dropout), `net.2` (linear back to `dim`).
#[derive(Module, Debug)]
pub struct FeedForward {
    /// The three layers, named `net.0`, `net.1`, `net.2` as in checkpoints.
    pub net: (GEGLU, Dropout, Linear),
}

impl FeedForward {
    /// A randomly initialised feed-forward of inner width `4 * dim`.
    pub fn new(dim: usize, device: &Device) -> Self {
        let inner = 4 * dim;
        Self {
            net: (
                GEGLU {
                    proj: LinearConfig::new(dim, 2 * inner).init(device),
                },
                DropoutConfig::new(0.0).init(),
                LinearConfig::new(inner, dim).init(device),
            ),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, dim]`
    /// - output: same as `x`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        linear(&self.net.2, self.net.0.forward(x))
    }
}

/// Options of a [`BasicTransformerBlock`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TransformerBlockConfig {
    /// Token width (`heads * head_dim`).
    pub dim: usize,
    /// Number of heads.
    pub heads: usize,
    /// Width of each head.
    pub head_dim: usize,
    /// Width of the cross-attention context (`cross_attention_dim`).
    pub cross_attention_dim: usize,
    /// `upcast_attention`.
    pub upcast: bool,
}

/// `x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))`.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    /// LayerNorm before self-attention.
    pub norm1: LayerNorm,
    /// Self-attention.
    pub attn1: Attention,
    /// LayerNorm before cross-attention.
    pub norm2: LayerNorm,
    /// Cross-attention to the text context.
    pub attn2: Attention,
    /// LayerNorm before the feed-forward.
    pub norm3: LayerNorm,
    /// GEGLU feed-forward.
    pub ff: FeedForward,
}

impl FeedForward {
    /// FLOPs on `rows` tokens ([`kiln_nn::flops`]).
    pub fn flops(&self, rows: usize) -> u64 {
        kiln_nn::flops::linear(&self.net.0.proj, rows) + kiln_nn::flops::linear(&self.net.2, rows)
    }
}

impl BasicTransformerBlock {
    /// FLOPs of [`forward`](Self::forward) on `batch` sequences of `tokens` tokens with
    /// `context_tokens` context tokens.
    pub fn flops(&self, batch: usize, tokens: usize, context_tokens: usize) -> u64 {
        self.attn1.flops(batch, tokens, tokens)
            + self.attn2.flops(batch, tokens, context_tokens)
            + self.ff.flops(batch * tokens)
    }

    /// A randomly initialised block (load weights afterwards).
    pub fn new(config: &TransformerBlockConfig, device: &Device) -> Self {
        let norm = || {
            LayerNormConfig::new(config.dim)
                .with_epsilon(1e-5)
                .init(device)
        };
        let attn = |context: Option<usize>| {
            AttentionConfig::new(config.dim, config.heads, config.head_dim)
                .with_cross_attention_dim(context)
                .with_upcast(config.upcast)
                .init(device)
        };
        Self {
            norm1: norm(),
            attn1: attn(None),
            norm2: norm(),
            attn2: attn(Some(config.cross_attention_dim)),
            norm3: norm(),
            ff: FeedForward::new(config.dim, device),
        }
    }

    /// # Shapes
    /// - `x`: `[batch, tokens, dim]`
    /// - `context`: `[batch, context_tokens, cross_attention_dim]`
    /// - output: same as `x`
    pub fn forward(&self, x: Tensor<3>, context: &Tensor<3>) -> Tensor<3> {
        // 1. Self-attention
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        // 2. Cross-attention
        let x = self
            .attn2
            .forward(self.norm2.forward(x.clone()), Some(context))
            + x;
        // 3. Feed-forward
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}
