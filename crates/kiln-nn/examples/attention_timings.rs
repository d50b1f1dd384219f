//! Best-of-N timings of Kiln's f32 attention kernel at given shapes, for side-by-side runs
//! against `cargo xtask py bench/attention_torch.py` (PyTorch's `scaled_dot_product_attention`
//! at the same shapes, 2 threads).
//!
//! `cargo run --release -p kiln-nn --example attention_timings [-- [--runs N] [--tokens]
//! BxHxNxMxD ...]`
//!
//! Each shape is `batch x heads x queries x keys x head-dim` (`v` as wide as `q`). With
//! `--tokens` the operands hold the heads side by side in each token's row (`[batch, tokens,
//! heads * d]`, as the UNet's projections make them) and go through
//! `kernels::attention_tokens`; otherwise heads first, through `kernels::attention`. Without
//! shapes it times the SD 1.5 UNet's self-attention at 512 and 1024 px (`2x8x4096x4096x40`,
//! `1x8x16384x16384x40`: one image of a guided batch) and the VAE's mid-block attention at
//! 512 px (`1x1x4096x4096x512`).

use burn::tensor::{Device, Distribution, Tensor};
use std::time::Instant;

fn main() {
    // as the `kiln` CLI runs
    kiln_nn::alloc::reuse_freed_memory();
    let device = Device::flex();
    let mut runs = 3;
    let mut tokens = false;
    let mut shapes = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        if arg == "--runs" {
            runs = args.next().and_then(|n| n.parse().ok()).expect("--runs N");
            continue;
        }
        if arg == "--tokens" {
            tokens = true;
            continue;
        }
        let dims: Vec<usize> = arg
            .split('x')
            .map(|d| d.parse().expect("BxHxNxMxD"))
            .collect();
        let dims: [usize; 5] = dims.try_into().expect("five sizes: BxHxNxMxD");
        shapes.push(dims);
    }
    if shapes.is_empty() {
        shapes = vec![
            [2, 8, 4096, 4096, 40],
            [1, 8, 16384, 16384, 40],
            [1, 1, 4096, 4096, 512],
        ];
    }
    let dist = Distribution::Normal(0.0, 1.0);
    for [b, h, n, m, d] in shapes {
        let q = Tensor::<4>::random([b, h, n, d], dist, &device);
        let k = Tensor::<4>::random([b, h, m, d], dist, &device);
        let v = Tensor::<4>::random([b, h, m, d], dist, &device);
        // [b, h, t, d] -> [b, t, h * d], contiguous
        let side_by_side = |x: &Tensor<4>| {
            let [b, h, t, d] = x.dims();
            let x = x.clone().swap_dims(1, 2).reshape([b, t, h * d]);
            Tensor::<3>::from_data(x.to_data(), &device)
        };
        let side_by_side = tokens.then(|| (side_by_side(&q), side_by_side(&k), side_by_side(&v)));
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            // the output dropped inside the timing, as a caller's would be
            let ran = match &side_by_side {
                Some((q, k, v)) => {
                    kiln_nn::kernels::attention_tokens(q.clone(), k.clone(), v.clone(), h).is_some()
                }
                None => kiln_nn::kernels::attention(q.clone(), k.clone(), v.clone()).is_some(),
            };
            assert!(ran, "f32 attention with enough keys runs Kiln's kernel");
            times.push(t.elapsed().as_secs_f64());
        }
        let best = times.iter().copied().fold(f64::MAX, f64::min);
        let flops = 4.0 * (b * h * n * m * d) as f64;
        let times: Vec<String> = times.iter().map(|t| format!("{t:.3}")).collect();
        println!(
            "attention {b}x{h}x{n}x{m}x{d}{}: best {:.3} s ({:.0} GFLOP/s), runs {}",
            if tokens { " (tokens)" } else { "" },
            best,
            flops / best / 1e9,
            times.join(" ")
        );
    }
}
