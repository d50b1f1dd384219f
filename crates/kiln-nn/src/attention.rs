//! Multi-head scaled dot-product attention, self and cross, on burn's fused attention op
//! (Vaswani et al., 2017).
//!
//! Mirrors `Attention` with `AttnProcessor2_0` in `diffusers/models/attention_processor.py`
//! (diffusers 0.42.1): `to_q`/`to_k`/`to_v` projections, any head count and head width,
//! `to_out.0` (and the parameterless dropout `to_out.1`), plus the VAE's spatial variant (a
//! GroupNorm in front, a residual connection and `rescale_output_factor`). The scores go through
//! [`burn::tensor::module::attention`], so backends with a fused kernel never materialise the
//! `[batch, heads, queries, keys]` matrix.

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, GroupNorm, Linear, LinearConfig};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, Tensor};

use crate::linear::linear;
use crate::normalization::{group_norm, group_norm_forward};

/// Shape and options of an [`Attention`] layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    /// Width of the queries (`query_dim`) and of the output.
    pub query_dim: usize,
    /// Width of keys and values before projection (`cross_attention_dim`); `None` for
    /// self-attention (then `query_dim`).
    pub cross_attention_dim: Option<usize>,
    /// Number of heads.
    pub heads: usize,
    /// Width of each head (`dim_head`).
    pub dim_head: usize,
    /// Whether `to_q`/`to_k`/`to_v` have biases (`bias`; false in the UNet, true in the VAE).
    pub bias: bool,
    /// Compute the scores in f32 when running in f16/bf16 (`upcast_attention`, SD 2.1).
    pub upcast: bool,
    /// GroupNorm in front, as `(groups, eps)` (`norm_num_groups`; the VAE's mid-block attention).
    pub group_norm: Option<(usize, f64)>,
    /// Add the input to the output (`residual_connection`; the VAE's mid-block attention).
    pub residual_connection: bool,
    /// The output is divided by this (`rescale_output_factor`).
    pub rescale_output_factor: f64,
}

impl AttentionConfig {
    /// Attention without biases, norm or residual, as in the UNet's transformer blocks.
    pub fn new(query_dim: usize, heads: usize, dim_head: usize) -> Self {
        Self {
            query_dim,
            cross_attention_dim: None,
            heads,
            dim_head,
            bias: false,
            upcast: false,
            group_norm: None,
            residual_connection: false,
            rescale_output_factor: 1.0,
        }
    }

    /// Keys and values come from a context of this width.
    pub fn with_cross_attention_dim(mut self, dim: Option<usize>) -> Self {
        self.cross_attention_dim = dim;
        self
    }

    /// Sets whether the q/k/v projections have biases.
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }

    /// Sets `upcast_attention`.
    pub fn with_upcast(mut self, upcast: bool) -> Self {
        self.upcast = upcast;
        self
    }

    /// The VAE's spatial attention: GroupNorm in front, residual connection, output rescaled.
    pub fn with_spatial_norm(mut self, groups: usize, eps: f64, rescale: f64) -> Self {
        self.group_norm = Some((groups, eps));
        self.residual_connection = true;
        self.rescale_output_factor = rescale;
        self
    }

    /// A randomly initialised layer (load weights afterwards).
    pub fn init(&self, device: &Device) -> Attention {
        let inner = self.heads * self.dim_head;
        let kv_dim = self.cross_attention_dim.unwrap_or(self.query_dim);
        let proj = |d_in| {
            LinearConfig::new(d_in, inner)
                .with_bias(self.bias)
                .init(device)
        };
        Attention {
            group_norm: self
                .group_norm
                .map(|(groups, eps)| group_norm(groups, self.query_dim, eps, device)),
            to_q: proj(self.query_dim),
            to_k: proj(kv_dim),
            to_v: proj(kv_dim),
            to_out: (
                LinearConfig::new(inner, self.query_dim).init(device),
                DropoutConfig::new(0.0).init(),
            ),
            heads: self.heads,
            upcast: self.upcast,
            residual_connection: self.residual_connection,
            rescale_output_factor: self.rescale_output_factor,
        }
    }
}

/// Multi-head attention with diffusers' parameter names.
#[derive(Module, Debug)]
pub struct Attention {
    /// GroupNorm applied to the input first (VAE only).
    pub group_norm: Option<GroupNorm>,
    /// Query projection.
    pub to_q: Linear,
    /// Key projection.
    pub to_k: Linear,
    /// Value projection.
    pub to_v: Linear,
    /// Output projection and (inference-time no-op) dropout: `to_out.0`, `to_out.1`.
    pub to_out: (Linear, Dropout),
    /// Number of heads.
    pub heads: usize,
    /// Compute the attention in f32 for f16/bf16 activations.
    pub upcast: bool,
    /// Add the input to the output.
    pub residual_connection: bool,
    /// Divisor of the output.
    pub rescale_output_factor: f64,
}

impl Attention {
    /// Width that keys and values are projected from (the expected context width).
    pub fn context_dim(&self) -> usize {
        self.to_k.weight.dims()[0]
    }

    /// Attends from `x` to `context` (or to `x` itself when `context` is `None`).
    ///
    /// # Shapes
    /// - `x`: `[batch, queries, query_dim]`
    /// - `context`: `[batch, keys, cross_attention_dim]`
    /// - output: `[batch, queries, query_dim]`
    pub fn forward(&self, x: Tensor<3>, context: Option<&Tensor<3>>) -> Tensor<3> {
        let residual = self.residual_connection.then(|| x.clone());
        let x = match &self.group_norm {
            // GroupNorm over channels: [b, n, c] -> [b, c, n] -> norm -> [b, n, c]
            Some(norm) => group_norm_forward(norm, x.swap_dims(1, 2)).swap_dims(1, 2),
            None => x,
        };
        let kv_source = context.cloned().unwrap_or_else(|| x.clone());
        let q = linear(&self.to_q, x);
        let k = linear(&self.to_k, kv_source.clone());
        let v = linear(&self.to_v, kv_source);
        let ([b, n, inner], m) = (q.dims(), k.dims()[1]);
        let describe = || {
            let (h, d) = (self.heads, inner / self.heads);
            let op = format!("{b}x{h}x{n}x{m}x{d}");
            (op, crate::flops::attention(b * h, n, m, d))
        };
        let out = crate::profile::timed(crate::profile::OpKind::Attention, describe, || {
            self.core(q, k, v)
        });
        let out = linear(&self.to_out.0, out);
        let out = match residual {
            Some(r) => out + r,
            None => out,
        };
        if self.rescale_output_factor == 1.0 {
            out
        } else {
            out / self.rescale_output_factor
        }
    }

    /// `softmax(Q K^T / sqrt(d)) V` of the projections (`[batch, tokens, heads * d]`), in the
    /// same layout.
    fn core(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        match tokens_attention(&q, &k, &v, self.heads) {
            Some(out) => out,
            None => {
                let (q, k, v) = (
                    self.heads_first(q),
                    self.heads_first(k),
                    self.heads_first(v),
                );
                let dtype = q.dtype();
                let upcast = self.upcast && matches!(dtype, DType::F16 | DType::BF16);
                let out = if upcast {
                    let f32 = |t: Tensor<4>| t.cast(DType::F32);
                    fused_attention(f32(q), f32(k), f32(v)).cast(dtype)
                } else {
                    fused_attention(q, k, v)
                };
                // [b, heads, n, d] -> [b, n, heads, d] -> [b, n, heads * d]
                let [b, h, n, d] = out.dims();
                out.swap_dims(1, 2).reshape([b, n, h * d])
            }
        }
    }

    /// FLOPs of [`forward`](Self::forward) for `batch` sequences of `queries` queries attending
    /// to `keys` keys ([`crate::flops`]).
    pub fn flops(&self, batch: usize, queries: usize, keys: usize) -> u64 {
        let inner = self.to_q.weight.lazy_shape()[1];
        crate::flops::linear(&self.to_q, batch * queries)
            + crate::flops::linear(&self.to_k, batch * keys)
            + crate::flops::linear(&self.to_v, batch * keys)
            + crate::flops::attention(batch * self.heads, queries, keys, inner / self.heads)
            + crate::flops::linear(&self.to_out.0, batch * queries)
    }

    /// Self-attention over the pixels of a feature map (the VAE's mid-block attention).
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, height, width]` with `channels = query_dim`
    /// - output: same as `x`
    pub fn forward_spatial(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        // [b, c, h, w] -> [b, h*w, c]
        let tokens = x.reshape([b, c, h * w]).swap_dims(1, 2);
        self.forward(tokens, None)
            .swap_dims(1, 2)
            .reshape([b, c, h, w])
    }

    /// `[b, n, heads * d] -> [b, heads, n, d]`
    fn heads_first(&self, t: Tensor<3>) -> Tensor<4> {
        let [b, n, inner] = t.dims();
        t.reshape([b, n, self.heads, inner / self.heads])
            .swap_dims(1, 2)
    }
}

/// Kiln's attention kernel on the projections' `[batch, tokens, heads * d]` outputs as they
/// are ([`crate::kernels::attention_tokens`]: no heads-first copies), where it applies (flex;
/// f32, or bf16 and f16 computed in f32 and rounded once, which is what upcasting gives too).
#[cfg(feature = "flex")]
fn tokens_attention(
    q: &Tensor<3>,
    k: &Tensor<3>,
    v: &Tensor<3>,
    heads: usize,
) -> Option<Tensor<3>> {
    if !is_flex(&q.device()) {
        return None;
    }
    crate::kernels::attention_tokens(q.clone(), k.clone(), v.clone(), heads)
}

#[cfg(not(feature = "flex"))]
fn tokens_attention(_: &Tensor<3>, _: &Tensor<3>, _: &Tensor<3>, _: usize) -> Option<Tensor<3>> {
    None
}

/// Smallest `queries * keys` product for which [`fused_attention`] splits the queries (below it,
/// flex's attention is cheap enough not to bother).
const SPLIT_MIN_SCORES: usize = 1 << 18;

/// burn's fused attention (`scale` 1/sqrt(d), no mask), on flex in f32 Kiln's own kernel
/// ([`crate::kernels::attention`], 2-3x faster at the UNet's shapes).
///
/// For flex's own op (f16 / bf16): burn-flex runs one (batch, head) pair per thread with single-threaded GEMMs, so the VAE's
/// single-head attention (batch 1) would use one core. On flex, when there are fewer
/// (batch, head) pairs than cores, the queries are cut into chunks that become extra "heads"
/// sharing the same keys and values: each query row is computed exactly as before, only in
/// parallel. Other backends get the op unchanged, except that at most [`MAX_SCORES`] scores go
/// through one call (queries in blocks), so memory stays bounded at any size.
///
/// # Shapes
/// - `q`: `[batch, heads, queries, d]`, `k`: `[batch, heads, keys, d]`,
///   `v`: `[batch, heads, keys, dv]`
/// - output: `[batch, heads, queries, dv]`
pub fn fused_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    if is_flex(&q.device())
        && let Some(out) = crate::kernels::attention(q.clone(), k.clone(), v.clone())
    {
        return out;
    }
    in_query_blocks(q, k, v, MAX_SCORES)
}

/// burn's op on blocks of queries of at most `max_scores` scores each.
fn in_query_blocks(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, max_scores: usize) -> Tensor<4> {
    let [b, h, n, _] = q.dims();
    let m = k.dims()[2];
    // Bounded memory: burn's op may hold every score of the batch at once (its naive path, and
    // every path under autodiff), so long sequences go through it a block of queries at a time.
    let rows = (max_scores / (b * h * m).max(1)).max(1);
    if rows < n {
        let blocks: Vec<Tensor<4>> = (0..n)
            .step_by(rows)
            .map(|start| {
                let len = rows.min(n - start);
                burn_attention(q.clone().narrow(2, start, len), k.clone(), v.clone())
            })
            .collect();
        return Tensor::cat(blocks, 2);
    }
    burn_attention(q, k, v)
}

/// Scores one call of burn's attention op may hold: 2^26 (256 MiB in f32). Queries beyond it are
/// split into blocks ([`fused_attention`]); each query row is computed exactly as before.
pub const MAX_SCORES: usize = 1 << 26;

/// burn's op, with flex's single-thread heads split over the cores (see [`fused_attention`]).
fn burn_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, h, n, d] = q.dims();
    let [_, _, m, dv] = v.dims();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunks = if is_flex(&q.device()) && b * h < threads && n * m >= SPLIT_MIN_SCORES {
        let mut c = threads.div_ceil(b * h);
        while c > 1 && !n.is_multiple_of(c) {
            c -= 1;
        }
        c
    } else {
        1
    };
    if chunks == 1 {
        return attention(q, k, v, None, None, AttentionModuleOptions::default());
    }
    // [b, h, n, d] -> [b, h * chunks, n / chunks, d]; keys and values repeated per chunk.
    let q = q.reshape([b, h * chunks, n / chunks, d]);
    let repeat = |t: Tensor<4>, width: usize| {
        t.unsqueeze_dim::<5>(2)
            .expand([b, h, chunks, m, width])
            .reshape([b, h * chunks, m, width])
    };
    let out = attention(
        q,
        repeat(k, d),
        repeat(v, dv),
        None,
        None,
        AttentionModuleOptions::default(),
    );
    out.reshape([b, h, n, dv])
}

#[cfg(feature = "flex")]
fn is_flex(device: &Device) -> bool {
    *device == Device::flex()
}

#[cfg(not(feature = "flex"))]
fn is_flex(_device: &Device) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::softmax;
    use burn::tensor::{Distribution, Tolerance};

    /// A profile of one forward: the four projections and the core, named by their shapes,
    /// whose FLOPs add up to [`Attention::flops`].
    #[test]
    fn a_profile_names_the_projections_and_the_core_and_counts_their_flops() {
        let device = Device::default();
        let attn = AttentionConfig::new(12, 3, 5)
            .with_cross_attention_dim(Some(7))
            .init(&device);
        let x = Tensor::<3>::random([2, 6, 12], Distribution::Default, &device);
        let context = Tensor::<3>::random([2, 4, 7], Distribution::Default, &device);
        let (_, profile) = crate::profile::profile(|| attn.forward(x, Some(&context)));
        let mut ops: Vec<_> = profile
            .ops
            .iter()
            .map(|o| (o.kind.name(), o.op.as_str(), o.calls))
            .collect();
        ops.sort();
        assert_eq!(
            ops,
            [
                ("attention", "2x3x6x4x5", 1),
                // to_k and to_v
                ("linear", "[2, 4, 7] -> 15", 2),
                // to_q, then to_out
                ("linear", "[2, 6, 12] -> 15", 1),
                ("linear", "[2, 6, 15] -> 12", 1),
            ]
        );
        let flops: u64 = profile.ops.iter().map(|o| o.flops).sum();
        assert_eq!(flops, attn.flops(2, 6, 4));
    }

    /// The fused op against an explicit softmax(QK^T / sqrt(d)) V, with 3 heads of width 5 and a
    /// context of another width and length.
    #[test]
    fn cross_attention_matches_explicit_softmax() {
        let device = Device::default();
        let attn = AttentionConfig::new(12, 3, 5)
            .with_cross_attention_dim(Some(7))
            .init(&device);
        let x = Tensor::<3>::random([2, 6, 12], Distribution::Normal(0.0, 1.0), &device);
        let ctx = Tensor::<3>::random([2, 4, 7], Distribution::Normal(0.0, 1.0), &device);
        let got = attn.forward(x.clone(), Some(&ctx));

        let q = attn.heads_first(attn.to_q.forward(x));
        let k = attn.heads_first(attn.to_k.forward(ctx.clone()));
        let v = attn.heads_first(attn.to_v.forward(ctx));
        let scores = q.matmul(k.swap_dims(2, 3)) / 5f64.sqrt();
        let out = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([2, 6, 15]);
        let expected = attn.to_out.0.forward(out);
        got.into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::<f32>::absolute(1e-5));
        assert_eq!(attn.context_dim(), 7);
    }

    /// burn's fused op, unsplit.
    fn plain_attention(q: &Tensor<4>, k: &Tensor<4>, v: &Tensor<4>) -> Tensor<4> {
        let options = AttentionModuleOptions::default();
        attention(q.clone(), k.clone(), v.clone(), None, None, options)
    }

    /// The query-split path (one head, many queries) equals the plain fused op.
    #[test]
    fn split_queries_match_the_plain_op() {
        let device = Device::default();
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([1, 1, 1024, 16], normal, &device);
        let k = Tensor::<4>::random([1, 1, 512, 16], normal, &device);
        let v = Tensor::<4>::random([1, 1, 512, 8], normal, &device);
        let plain = plain_attention(&q, &k, &v);
        let split = fused_attention(q, k, v);
        split
            .into_data()
            .assert_approx_eq::<f32>(&plain.into_data(), Tolerance::<f32>::absolute(1e-6));
    }

    /// Queries in blocks (bounded memory) give the op's result, here under autodiff, where burn
    /// materialises the scores, and with gradients flowing through the blocks.
    #[test]
    fn query_blocks_match_the_plain_op() {
        let device = Device::default().autodiff();
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([2, 3, 50, 8], normal, &device).require_grad();
        let k = Tensor::<4>::random([2, 3, 40, 8], normal, &device);
        let v = Tensor::<4>::random([2, 3, 40, 8], normal, &device);
        let plain = plain_attention(&q, &k, &v);
        // 6 (batch, head) pairs x 40 keys: blocks of 7 queries
        let blocked = in_query_blocks(q.clone(), k, v, 6 * 40 * 7);
        let grad = blocked.clone().sum().backward();
        assert!(q.grad(&grad).is_some());
        blocked
            .into_data()
            .assert_approx_eq::<f32>(&plain.into_data(), Tolerance::<f32>::absolute(1e-6));
    }
}
