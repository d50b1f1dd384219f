//! 2-D convolutions at the shapes Stable Diffusion runs them, f32 on flex: burn's op (`/burn`)
//! against what Kiln runs (`/kiln`: `kiln_nn::conv::conv2d`, which takes Kiln's kernel
//! `kiln_nn::kernels::conv2d`, Winograd's algorithm where it pays) and Kiln's im2col kernel
//! alone (`/kiln_im2col`, for the 3x3 stride-1 shapes).
//!
//! `cargo bench --workspace --bench conv`. Shapes (`[batch, in, height, width] -> out, kernel,
//! stride`): the SD 1.5 UNet's 3x3 convolutions at each level of a 512 px step (batch 2), its
//! stride-2 downsampler and a 1x1 shortcut, and the VAE decoder's widest and largest 3x3 ones
//! for a 512 px image.

use std::hint::black_box;
use std::time::Duration;

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2dConfig;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("conv");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(10));
    for (name, [b, cin, h, w], cout, k, stride) in [
        ("unet_3x3_320_64px", [2, 320, 64, 64], 320, 3, 1),
        ("unet_3x3_640_32px", [2, 640, 32, 32], 640, 3, 1),
        ("unet_3x3_1280_16px", [2, 1280, 16, 16], 1280, 3, 1),
        ("unet_3x3_1280_8px", [2, 1280, 8, 8], 1280, 3, 1),
        ("unet_down_320_64px", [2, 320, 64, 64], 320, 3, 2),
        ("unet_1x1_960_32px", [2, 960, 32, 32], 640, 1, 1),
        ("vae_3x3_512_64px", [1, 512, 64, 64], 512, 3, 1),
        ("vae_3x3_128_512px", [1, 128, 512, 512], 128, 3, 1),
    ] {
        let padding = if k == 3 {
            PaddingConfig2d::Explicit(1, 1, 1, 1)
        } else {
            PaddingConfig2d::Valid
        };
        let conv = Conv2dConfig::new([cin, cout], [k, k])
            .with_stride([stride, stride])
            .with_padding(padding)
            .init(&device);
        let x = Tensor::<4>::random([b, cin, h, w], Distribution::Normal(0.0, 1.0), &device);
        // criterion's "elements" are FLOPs here: it reports FLOP/s
        group.throughput(Throughput::Elements(
            kiln_nn::flops::conv2d(&conv, b, [h, w]).0,
        ));
        group.bench_function(format!("{name}/burn"), |bench| {
            bench.iter(|| black_box(conv.forward(x.clone()).into_data()))
        });
        group.bench_function(format!("{name}/kiln"), |bench| {
            bench.iter(|| black_box(kiln_nn::conv::conv2d(&conv, x.clone()).into_data()))
        });
        if k == 3 && stride == 1 {
            let options = kiln_nn::kernels::Conv2dOptions {
                stride: [1, 1],
                padding: [[1, 1], [1, 1]],
                dilation: [1, 1],
            };
            let (weight, bias) = (conv.weight.val(), conv.bias.as_ref().map(|b| b.val()));
            group.bench_function(format!("{name}/kiln_im2col"), |bench| {
                bench.iter(|| {
                    let algorithm = kiln_nn::kernels::Conv2dAlgorithm::Im2col;
                    let y = kiln_nn::kernels::conv2d_with(
                        &x,
                        &weight,
                        bias.as_ref(),
                        options,
                        algorithm,
                    );
                    black_box(y.map(|y| y.into_data()))
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
