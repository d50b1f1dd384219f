//! Tiny end-to-end text-to-image generations (prompt to decoded image tensor), f32 on flex.
//!
//! `cargo bench -p kiln-pipeline --bench pipeline`. Workloads:
//!
//! - `pipeline/embedded/defaults_32x32`: the embedded default model
//!   (`StableDiffusionPipeline::embedded`, feature `embedded-model`) drawing one 32x32 image
//!   with its own defaults (its Euler scheduler, 25 steps, guidance 4), as `kiln generate` without
//!   `--model` does;
//! - `pipeline/tiny_sd1/4_steps_48x32`: the tiny random-weight SD 1.x pipeline of
//!   `fixtures/pipeline/sd1` (with the real CLIP vocabulary), 4 steps of its PNDM scheduler at
//!   guidance 7.5, one image 48 wide and 32 high (as the crate's tests draw it).
//!
//! Each iteration encodes the prompt, runs the denoising loop with classifier-free guidance and
//! decodes the latents; loading is not timed.

use std::cell::OnceCell;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, TensorData};
use criterion::{Criterion, criterion_group, criterion_main};
use kiln_pipeline::{GenerateOptions, LoadOptions, StableDiffusionPipeline};
use kiln_scheduler::{SamplerOptions, SeededNoise};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn device() -> Device {
    kiln_nn::parse_device("flex").expect("flex backend")
}

fn generate(pipe: &StableDiffusionPipeline, options: &GenerateOptions) -> TensorData {
    let mut scheduler = pipe
        .scheduler(None, SamplerOptions::default())
        .expect("scheduler");
    pipe.generate(&mut scheduler, options, &mut SeededNoise::new(0), None)
        .expect("generate")
        .images
        .into_data()
}

/// `fixtures/pipeline/sd1` as a complete diffusers folder in a temporary directory: the
/// committed components plus a classic tokenizer folder from `fixtures/clip` (as the crate's
/// tests assemble it).
fn tiny_sd1_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    kiln_nn::config::copy_dir(&root().join("fixtures/pipeline/sd1"), dir.path())
        .expect("copy fixture folder");
    let tok = dir.path().join("tokenizer");
    std::fs::create_dir_all(&tok).expect("tokenizer dir");
    let clip = root().join("fixtures/clip");
    for (from, name) in [
        (clip.join("vocab/vocab.json"), "vocab.json"),
        (clip.join("vocab/merges.txt"), "merges.txt"),
        (
            clip.join("tokenizer-sd1/special_tokens_map.json"),
            "special_tokens_map.json",
        ),
        (
            clip.join("tokenizer-sd1/tokenizer_config.json"),
            "tokenizer_config.json",
        ),
    ] {
        std::fs::copy(&from, tok.join(name)).expect("copy tokenizer file");
    }
    dir
}

#[cfg(feature = "embedded-model")]
fn embedded(c: &mut Criterion) {
    let pipe = OnceCell::new();
    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    group.bench_function("embedded/defaults_32x32", |b| {
        let pipe = pipe.get_or_init(|| {
            let pipe = StableDiffusionPipeline::embedded(&device()).expect("embedded model");
            assert_eq!(pipe.default_size(), (32, 32));
            pipe
        });
        let options = GenerateOptions::for_model(pipe, "a red circle on a blue background");
        b.iter(|| generate(pipe, &options))
    });
    group.finish();
}

#[cfg(not(feature = "embedded-model"))]
fn embedded(_: &mut Criterion) {}

fn tiny_sd1(c: &mut Criterion) {
    let loaded = OnceCell::new();
    let mut group = c.benchmark_group("pipeline");
    group.sample_size(10);
    group.bench_function("tiny_sd1/4_steps_48x32", |b| {
        let (_dir, pipe) = loaded.get_or_init(|| {
            let dir = tiny_sd1_folder();
            let pipe = StableDiffusionPipeline::from_pretrained(
                dir.path(),
                LoadOptions::default(),
                &device(),
            )
            .expect("tiny sd1 pipeline");
            (dir, pipe)
        });
        let options = GenerateOptions::new("a photo of an astronaut riding a horse")
            .with_steps(4)
            .with_size(48, 32);
        b.iter(|| generate(pipe, &options))
    });
    group.finish();
}

criterion_group!(benches, embedded, tiny_sd1);
criterion_main!(benches);
