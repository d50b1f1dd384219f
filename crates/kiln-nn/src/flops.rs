//! Floating-point operations of a forward pass, counted as PyTorch's `FlopCounterMode` counts
//! them: two per multiply-add of the convolutions, the matmuls (linear layers, with or without
//! bias) and attention's two products; norms, activations and elementwise ops are not counted.
//! `kiln bench` divides these by the time taken; `fixtures/flops.json` (from
//! `xtask/fixtures/flops.py`) holds PyTorch's counts for the models' `flops` methods to match.
//!
//! Every function reads the layer's sizes from its weights' shapes (without materialising lazy
//! weights), so only the activations' spatial sizes and token counts are passed in.

use burn::nn::conv::Conv2d;
use burn::nn::{Linear, PaddingConfig2d};

/// A convolution's FLOPs on `batch` maps of `size` (`[height, width]`), and its output size.
pub fn conv2d(conv: &Conv2d, batch: usize, size: [usize; 2]) -> (u64, [usize; 2]) {
    let shape = conv.weight.lazy_shape();
    let [cout, cin_per_group, kh, kw] = [shape[0], shape[1], shape[2], shape[3]];
    let (top, left, bottom, right) = match conv.padding {
        PaddingConfig2d::Explicit(top, left, bottom, right) => (top, left, bottom, right),
        PaddingConfig2d::Valid => (0, 0, 0, 0),
        // `Same` keeps the size at stride 1
        _ => ((kh - 1) / 2, (kw - 1) / 2, kh / 2, kw / 2),
    };
    let out = |n: usize, lo: usize, hi: usize, k: usize, d: usize, s: usize| {
        (n + lo + hi).saturating_sub(d * (k - 1) + 1) / s + 1
    };
    let h = out(size[0], top, bottom, kh, conv.dilation[0], conv.stride[0]);
    let w = out(size[1], left, right, kw, conv.dilation[1], conv.stride[1]);
    let macs = (batch * h * w) as u64 * (cout * cin_per_group * kh * kw) as u64;
    (2 * macs, [h, w])
}

/// A linear layer's FLOPs on `rows` input vectors.
pub fn linear(linear: &Linear, rows: usize) -> u64 {
    let shape = linear.weight.lazy_shape();
    2 * rows as u64 * (shape[0] * shape[1]) as u64
}

/// Attention's FLOPs: `softmax(Q K^T) V` over `batch_heads` heads of `head_dim`, `queries`
/// queries and `keys` keys (two products of `queries x keys x head_dim` multiply-adds).
pub fn attention(batch_heads: usize, queries: usize, keys: usize, head_dim: usize) -> u64 {
    4 * (batch_heads * queries) as u64 * (keys * head_dim) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::LinearConfig;
    use burn::nn::conv::Conv2dConfig;

    #[test]
    fn convolutions_count_their_output_positions() {
        let device = crate::default_device().unwrap();
        let conv = Conv2dConfig::new([4, 8], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        assert_eq!(
            conv2d(&conv, 2, [5, 7]),
            (2 * 2 * 5 * 7 * 8 * 4 * 9, [5, 7])
        );
        // VAE downsampling: stride 2, padding only at the bottom and right
        let down = Conv2dConfig::new([4, 4], [3, 3])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Explicit(0, 0, 1, 1))
            .init(&device);
        assert_eq!(conv2d(&down, 1, [8, 9]).1, [4, 4]);
        let fc = LinearConfig::new(6, 10).init(&device);
        assert_eq!(linear(&fc, 3), 2 * 3 * 60);
        assert_eq!(attention(2, 4, 5, 8), 4 * 2 * 4 * 5 * 8);
    }
}
