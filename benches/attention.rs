//! Attention at the shapes Stable Diffusion runs it, f32 on flex: burn-flex's fused op (`/burn`)
//! against what Kiln runs (`/kiln`: `kiln_nn::attention::fused_attention`, which takes Kiln's
//! kernel `kiln_nn::kernels::attention` from 256 keys up and burn's op below).
//!
//! `cargo bench -p kiln-nn --bench attention`. Shapes (`[batch, heads, queries, keys, head dim]`):
//! the SD 1.5 UNet's self-attention at 512 px (`2x8x4096x4096x40`) and 256 px
//! (`2x8x1024x1024x40`), its cross-attention (`2x8x4096x77x40`), and the VAE's single-head
//! mid-block attention at 512 px (`1x1x4096x4096x512`).

use std::hint::black_box;
use std::time::Duration;

use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};

fn bench(c: &mut Criterion) {
    let device = Device::flex();
    let mut group = c.benchmark_group("attention");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(20));
    for (name, [b, h, n, m, d]) in [
        ("unet_self_512px", [2, 8, 4096, 4096, 40]),
        ("unet_self_256px", [2, 8, 1024, 1024, 40]),
        ("unet_cross_512px", [2, 8, 4096, 77, 40]),
        ("vae_mid_512px", [1, 1, 4096, 4096, 512]),
    ] {
        let normal = Distribution::Normal(0.0, 1.0);
        let q = Tensor::<4>::random([b, h, n, d], normal, &device);
        let k = Tensor::<4>::random([b, h, m, d], normal, &device);
        let v = Tensor::<4>::random([b, h, m, d], normal, &device);
        // criterion's "elements" are FLOPs here: it reports FLOP/s
        group.throughput(Throughput::Elements(kiln_nn::flops::attention(
            b * h,
            n,
            m,
            d,
        )));
        group.bench_function(format!("{name}/burn"), |bench| {
            bench.iter(|| {
                let out = attention(
                    q.clone(),
                    k.clone(),
                    v.clone(),
                    None,
                    None,
                    AttentionModuleOptions::default(),
                );
                black_box(out.into_data())
            })
        });
        group.bench_function(format!("{name}/kiln"), |bench| {
            bench.iter(|| {
                let out = kiln_nn::attention::fused_attention(q.clone(), k.clone(), v.clone());
                black_box(out.into_data())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
