//! Best-of-5 timings of Kiln's two convolution algorithms (im2col panels, Winograd F(2x2, 3x3))
//! and burn's op at the SD 1.5 UNet's and VAE's 3x3 shapes, then of the upsamplers' nearest x2
//! and convolution as two ops (burn's upsampling, Kiln's convolution) and as Kiln's one
//! kernel, then of a ResNet block's first GroupNorm, SiLU and convolution as two kernels (the
//! GroupNorm over its input in place) and as the convolution reading its input through the
//! GroupNorm ([`group_norm_conv2d`]), alternating in one process (on a noisy machine, only
//! figures from one run compare).
//! GFLOP/s count the direct convolution's FLOPs, as PyTorch counts them. Prints one line per
//! shape.
//!
//! `cargo run --release -p kiln-nn --example conv_algorithms [-- burn] [-- small]`
//!
//! `small` times only the two algorithms at the UNet's deepest levels, 1280 channels from 4x4
//! to 16x16 pixels (where `Auto` switches from im2col to Winograd), and stops there.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Distribution, Tensor};
use kiln_nn::kernels::{
    Conv2dAlgorithm, Conv2dOptions, InputGroupNorm, conv2d, conv2d_with, group_norm_conv2d,
    group_norm_owned, upsample_conv2d,
};
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
    let small = std::env::args().any(|a| a == "small");
    let device = Device::flex();
    let d = Distribution::Normal(0.0, 1.0);
    let options = Conv2dOptions {
        stride: [1, 1],
        padding: [[1, 1], [1, 1]],
        dilation: [1, 1],
    };
    let shapes = if small {
        vec![
            ("unet 1280 4px", [2, 1280, 4, 4], 1280),
            ("unet 1280 6px", [2, 1280, 6, 6], 1280),
            ("unet 1280 8px", [2, 1280, 8, 8], 1280),
            ("unet 1280 8px batch 1", [1, 1280, 8, 8], 1280),
            ("unet 2560->1280 8px", [2, 2560, 8, 8], 1280),
            ("unet 1280 10px", [2, 1280, 10, 10], 1280),
            ("unet 1280 12px (768 px)", [2, 1280, 12, 12], 1280),
            ("unet 1280 12px batch 1", [1, 1280, 12, 12], 1280),
            ("unet 2560->1280 12px", [2, 2560, 12, 12], 1280),
            ("unet 1280 14px", [2, 1280, 14, 14], 1280),
            ("unet 1280 16px", [2, 1280, 16, 16], 1280),
        ]
    } else {
        vec![
            ("unet 320 64px", [2, 320, 64, 64], 320),
            ("unet 320 128px (1024 px)", [2, 320, 128, 128], 320),
            ("unet 640 32px", [2, 640, 32, 32], 640),
            ("unet 1280 16px", [2, 1280, 16, 16], 1280),
            ("unet 1280 8px", [2, 1280, 8, 8], 1280),
            ("unet 640->320 64px", [2, 640, 64, 64], 320),
            ("vae 512 64px", [1, 512, 64, 64], 512),
            ("vae 512 128px", [1, 512, 128, 128], 512),
            ("vae 256 256px", [1, 256, 256, 256], 256),
            ("vae 128 512px", [1, 128, 512, 512], 128),
        ]
    };
    for (name, [b, cin, h, w], cout) in shapes {
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
    if small {
        return;
    }
    // the upsamplers: input sizes, the convolution at twice them
    for (name, [b, c, h, w]) in [
        ("unet 1280 8->16px", [2, 1280, 8, 8]),
        ("unet 1280 16->32px", [2, 1280, 16, 16]),
        ("unet 640 32->64px", [2, 640, 32, 32]),
        ("unet 640 64->128px (1024 px)", [2, 640, 64, 64]),
        ("vae 512 64->128px", [1, 512, 64, 64]),
        ("vae 512 128->256px", [1, 512, 128, 128]),
        ("vae 256 256->512px", [1, 256, 256, 256]),
    ] {
        let conv = Conv2dConfig::new([c, c], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = Tensor::<4>::random([b, c, h, w], d, &device);
        let (weight, bias) = (conv.weight.val(), conv.bias.as_ref().map(|b| b.val()));
        let gflop = kiln_nn::flops::conv2d(&conv, b, [2 * h, 2 * w]).0 as f64 / 1e6;
        let two_ops = time(|| {
            let up = interpolate(
                x.clone(),
                InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]),
            );
            let _ = conv2d(&up, &weight, bias.as_ref(), options)
                .unwrap()
                .into_data();
        });
        if upsample_conv2d(&x, &weight, bias.as_ref()).is_none() {
            println!(
                "upsample {name} [{b},{c},{h},{w}]: upsample + conv {two_ops:.1} ms ({:.0} GFLOP/s), one kernel declines (below UPSAMPLE_MIN_PIXELS)",
                gflop / two_ops
            );
            continue;
        }
        let fused = time(|| {
            let _ = upsample_conv2d(&x, &weight, bias.as_ref())
                .unwrap()
                .into_data();
        });
        println!(
            "upsample {name} [{b},{c},{h},{w}]: upsample + conv {two_ops:.1} ms ({:.0} GFLOP/s), one kernel {fused:.1} ms ({:.0}), {:.2}x",
            gflop / two_ops,
            gflop / fused,
            two_ops / fused
        );
    }
    // the first GroupNorm, SiLU and convolution of the ResNet blocks that change their channel
    // count (the UNet's up blocks at 512 px, the VAE decoder's at 512 px)
    for (name, [b, cin, h, w], cout) in [
        ("unet 960->320 64px", [2, 960, 64, 64], 320),
        ("unet 640->320 64px", [2, 640, 64, 64], 320),
        ("unet 1920->640 32px", [2, 1920, 32, 32], 640),
        ("unet 2560->1280 16px", [2, 2560, 16, 16], 1280),
        ("vae 512->256 256px", [1, 512, 256, 256], 256),
        ("vae 256->128 512px", [1, 256, 512, 512], 128),
    ] {
        let conv = Conv2dConfig::new([cin, cout], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device);
        let x = Tensor::<4>::random([b, cin, h, w], d, &device);
        let gamma = Tensor::<1>::random([cin], d, &device);
        let beta = Tensor::<1>::random([cin], d, &device);
        let (weight, bias) = (conv.weight.val(), conv.bias.as_ref().map(|b| b.val()));
        let gflop = kiln_nn::flops::conv2d(&conv, b, [h, w]).0 as f64 / 1e6;
        // best of 5, each on a fresh copy that the GroupNorm may overwrite
        let mut two = f64::MAX;
        let mut one = f64::MAX;
        for _ in 0..5 {
            let copy = Tensor::<4>::from_data(x.to_data(), &device);
            let t = Instant::now();
            let normed = group_norm_owned(copy, 32, 1e-6, Some((&gamma, &beta)), true).unwrap();
            let _ = conv2d(&normed, &weight, bias.as_ref(), options)
                .unwrap()
                .into_data();
            two = two.min(t.elapsed().as_secs_f64() * 1e3);
            drop(normed);
            let norm = InputGroupNorm {
                groups: 32,
                eps: 1e-6,
                affine: Some((&gamma, &beta)),
                silu: true,
            };
            let t = Instant::now();
            let _ = group_norm_conv2d(&x, norm, &weight, bias.as_ref(), options)
                .unwrap()
                .into_data();
            one = one.min(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "group norm {name} [{b},{cin},{h},{w}]->{cout}: norm + conv {two:.1} ms ({:.0} GFLOP/s), conv reading through the norm {one:.1} ms ({:.0}), {:.2}x",
            gflop / two,
            gflop / one,
            two / one
        );
    }
}
