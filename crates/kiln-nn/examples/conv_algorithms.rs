//! Best-of-5 timings of Kiln's two convolution algorithms (im2col panels, Winograd F(2x2, 3x3))
//! and burn's op at the SD 1.5 UNet's and VAE's 3x3 shapes, alternating in one process (on a
//! noisy machine, only figures from one run compare). GFLOP/s count the direct convolution's
//! FLOPs, as PyTorch counts them. Prints one line per shape.
//!
//! `cargo run --release -p kiln-nn --example conv_algorithms [-- burn]`

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::{Device, Distribution, Tensor};
use kiln_nn::kernels::{Conv2dAlgorithm, Conv2dOptions, conv2d_with};
use std::time::Instant;

/// Best of 5 runs of `f`, in milliseconds.
fn time<F: FnMut()>(mut f: F) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best * 1e3
}

fn main() {
    let with_burn = std::env::args().any(|a| a == "burn");
    let device = Device::flex();
    let d = Distribution::Normal(0.0, 1.0);
    let options = Conv2dOptions {
        stride: [1, 1],
        padding: [[1, 1], [1, 1]],
        dilation: [1, 1],
    };
    for (name, [b, cin, h, w], cout) in [
        ("unet 320 64px", [2, 320, 64, 64], 320),
        ("unet 640 32px", [2, 640, 32, 32], 640),
        ("unet 1280 16px", [2, 1280, 16, 16], 1280),
        ("unet 1280 8px", [2, 1280, 8, 8], 1280),
        ("unet 640->320 64px", [2, 640, 64, 64], 320),
        ("vae 512 64px", [1, 512, 64, 64], 512),
        ("vae 512 128px", [1, 512, 128, 128], 512),
        ("vae 256 256px", [1, 256, 256, 256], 256),
        ("vae 128 512px", [1, 128, 512, 512], 128),
    ] {
        let conv = Conv2dConfig::new([cin, cout], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = Tensor::<4>::random([b, cin, h, w], d, &device);
        let (weight, bias) = (conv.weight.val(), conv.bias.as_ref().map(|b| b.val()));
        let gflop = kiln_nn::flops::conv2d(&conv, b, [h, w]).0 as f64 / 1e6;
        let run = |algorithm| {
            time(|| {
                let y = conv2d_with(&x, &weight, bias.as_ref(), options, algorithm).unwrap();
                let _ = y.into_data();
            })
        };
        let im2col = run(Conv2dAlgorithm::Im2col);
        let winograd = run(Conv2dAlgorithm::Winograd);
        let burn = if with_burn {
            let t = time(|| {
                let _ = conv.forward(x.clone()).into_data();
            });
            format!(", burn {t:.1} ms ({:.0})", gflop / t)
        } else {
            String::new()
        };
        println!(
            "{name} [{b},{cin},{h},{w}]->{cout}: im2col {im2col:.1} ms ({:.0} GFLOP/s), winograd {winograd:.1} ms ({:.0}), {:.2}x{burn}",
            gflop / im2col,
            gflop / winograd,
            im2col / winograd
        );
    }
}
