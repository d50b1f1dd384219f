//! The VAE (AutoencoderKL) decode and encode, batch 1, untiled, f32 on flex.
//!
//! `cargo bench -p kiln-vae --bench vae`. Workloads:
//!
//! - `vae/tiny_sd1/decode_16x16` and `vae/tiny_sd1/encode_32x32`: the tiny VAE of
//!   `fixtures/pipeline/sd1/vae` (its fp16 file read as f32; scale factor 2), a 16x16 latent to a
//!   32x32 image and back;
//! - `vae/sd15/decode_32x32`: the full-size SD 1.5 VAE (the `vae` config of Kiln's `sd15` preset,
//!   `crates/kiln-pipeline/presets/sd15.json`)
//!   with random weights, a 32x32 latent to a 256x256 image. Speed does not depend on the
//!   weights; one iteration takes seconds, so criterion samples it flat, ten times.
//!
//! Models are built on first use (a filter such as `-- tiny` never builds the full-size one), and
//! each decodes a small latent before timing, which materialises burn's lazily initialised
//! weights (`--quick` runs no warm-up of its own).

use std::cell::OnceCell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::tensor::{DType, Device, Distribution, Tensor, TensorData};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use kiln_vae::{AutoencoderKL, AutoencoderKLConfig};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn device() -> Device {
    kiln_nn::parse_device("flex").expect("flex backend")
}

fn normal<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

fn decode(vae: &AutoencoderKL, latent: &Tensor<4>) -> TensorData {
    vae.decode(black_box(latent.clone()), None)
        .expect("decode")
        .into_data()
}

fn encode(vae: &AutoencoderKL, image: &Tensor<4>) -> TensorData {
    vae.encode(black_box(image.clone()), None)
        .expect("encode")
        .mode()
        .into_data()
}

fn tiny(c: &mut Criterion) {
    let vae = OnceCell::new();
    let get = || {
        vae.get_or_init(|| {
            let device = device();
            let vae = AutoencoderKL::from_pretrained(
                &root().join("fixtures/pipeline/sd1/vae"),
                DType::F32,
                &device,
            )
            .expect("tiny fixture VAE");
            decode(&vae, &normal([1, 4, 4, 4], &device));
            vae
        })
    };
    let mut group = c.benchmark_group("vae");
    group.bench_function("tiny_sd1/decode_16x16", |b| {
        let vae = get();
        let latent = normal([1, 4, 16, 16], &device());
        b.iter(|| decode(vae, &latent))
    });
    group.bench_function("tiny_sd1/encode_32x32", |b| {
        let vae = get();
        let image = normal([1, 3, 32, 32], &device());
        b.iter(|| encode(vae, &image))
    });
    group.finish();
}

fn sd15(c: &mut Criterion) {
    let vae = OnceCell::new();
    let mut group = c.benchmark_group("vae");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(30));
    group.bench_function("sd15/decode_32x32", |b| {
        let vae = vae.get_or_init(|| {
            let device = device();
            let path = root().join("crates/kiln-pipeline/presets/sd15.json");
            let preset: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(path).expect("the sd15 preset"))
                    .expect("the sd15 preset's JSON");
            let config: AutoencoderKLConfig =
                serde_json::from_value(preset["vae"].clone()).expect("SD 1.5 VAE config");
            config.validate().expect("SD 1.5 VAE config");
            let vae = AutoencoderKL::new(&config, &device).expect("SD 1.5 VAE");
            decode(&vae, &normal([1, 4, 4, 4], &device));
            vae
        });
        let latent = normal([1, 4, 32, 32], &device());
        b.iter(|| decode(vae, &latent))
    });
    group.finish();
}

criterion_group!(benches, tiny, sd15);
criterion_main!(benches);
