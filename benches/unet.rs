//! The UNet forward (one denoising step with classifier-free guidance: batch 2), f32 on flex.
//!
//! `cargo bench -p kiln-unet --bench unet`. Two workloads:
//!
//! - `unet/tiny_sd1/batch2_16x16`: the tiny UNet of `fixtures/pipeline/sd1/unet` (its fp16 file
//!   read as f32) at its own latent size;
//! - `unet/sd15/batch2_32x32`: the full-size SD 1.5 UNet (the `unet` config of Kiln's `sd15`
//!   preset, `crates/kiln-pipeline/presets/sd15.json`)
//!   with random weights at latent 32x32 (a 256x256 image). Speed does not depend on the weights;
//!   one iteration takes seconds, so criterion samples it flat, ten times.
//!
//! Each model runs one small forward before timing, which materialises burn's lazily initialised
//! weights (`--quick` runs no warm-up of its own).

use std::cell::OnceCell;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::tensor::{DType, Device, Distribution, Tensor};
use criterion::{Criterion, SamplingMode, criterion_group, criterion_main};
use kiln_unet::unet_2d_condition::PerBlock;
use kiln_unet::{UNet2DConditionModel, UNet2DConditionModelConfig};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Kiln's `sd15` preset (`crates/kiln-pipeline/presets/sd15.json`: every component's config).
fn sd15_preset() -> serde_json::Value {
    let path = root().join("crates/kiln-pipeline/presets/sd15.json");
    let text = std::fs::read_to_string(path).expect("the sd15 preset");
    serde_json::from_str(&text).expect("the sd15 preset's JSON")
}

fn context_dim(config: &UNet2DConditionModelConfig) -> usize {
    match &config.cross_attention_dim {
        PerBlock::One(d) => *d,
        PerBlock::Many(d) => d[0],
    }
}

/// Inputs of one guided step: latents `[batch, in_channels, side, side]`, one timestep per
/// sample, 77 context tokens.
struct Inputs {
    sample: Tensor<4>,
    timesteps: Tensor<1>,
    context: Tensor<3>,
}

impl Inputs {
    fn new(
        config: &UNet2DConditionModelConfig,
        batch: usize,
        side: usize,
        device: &Device,
    ) -> Self {
        let normal = Distribution::Normal(0.0, 1.0);
        Self {
            sample: Tensor::random([batch, config.in_channels, side, side], normal, device),
            timesteps: Tensor::from_floats(vec![500.0f32; batch].as_slice(), device),
            context: Tensor::random([batch, 77, context_dim(config)], normal, device),
        }
    }
}

fn forward(unet: &UNet2DConditionModel, inputs: &Inputs) -> burn::tensor::TensorData {
    unet.forward(
        black_box(inputs.sample.clone()),
        inputs.timesteps.clone(),
        inputs.context.clone(),
    )
    .expect("forward")
    .into_data()
}

/// One batch-1 forward at the smallest size the UNet takes.
fn warm_up(unet: &UNet2DConditionModel, config: &UNet2DConditionModelConfig, device: &Device) {
    forward(unet, &Inputs::new(config, 1, unet.size_multiple(), device));
}

/// A model and its inputs, built on first use: criterion calls a benchmark's closure only when
/// the filter selects it, so `cargo bench --bench unet -- tiny` never builds the 3.4 GB model.
struct Case {
    unet: UNet2DConditionModel,
    inputs: Inputs,
}

impl Case {
    fn new(
        unet: UNet2DConditionModel,
        config: &UNet2DConditionModelConfig,
        side: usize,
        device: &Device,
    ) -> Self {
        warm_up(&unet, config, device);
        let inputs = Inputs::new(config, 2, side, device);
        Self { unet, inputs }
    }
}

fn tiny(c: &mut Criterion) {
    let case = OnceCell::new();
    let mut group = c.benchmark_group("unet");
    group.bench_function("tiny_sd1/batch2_16x16", |b| {
        let case = case.get_or_init(|| {
            let device = kiln_nn::parse_device("flex").expect("flex backend");
            let dir = root().join("fixtures/pipeline/sd1/unet");
            let config =
                UNet2DConditionModelConfig::from_file(&dir.join("config.json")).expect("config");
            // the folder holds only the .fp16. file: from_pretrained falls back to it and casts
            let unet = UNet2DConditionModel::from_pretrained(&dir, DType::F32, &device)
                .expect("tiny fixture UNet");
            Case::new(unet, &config, 16, &device)
        });
        b.iter(|| forward(&case.unet, &case.inputs))
    });
    group.finish();
}

fn sd15(c: &mut Criterion) {
    let case = OnceCell::new();
    let mut group = c.benchmark_group("unet");
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .measurement_time(Duration::from_secs(30));
    group.bench_function("sd15/batch2_32x32", |b| {
        let case = case.get_or_init(|| {
            let device = kiln_nn::parse_device("flex").expect("flex backend");
            let config: UNet2DConditionModelConfig =
                serde_json::from_value(sd15_preset()["unet"].take()).expect("SD 1.5 UNet config");
            config.validate().expect("SD 1.5 UNet config");
            let unet = UNet2DConditionModel::new(&config, &device).expect("SD 1.5 UNet");
            Case::new(unet, &config, 32, &device)
        });
        b.iter(|| forward(&case.unet, &case.inputs))
    });
    group.finish();
}

criterion_group!(benches, tiny, sd15);
criterion_main!(benches);
