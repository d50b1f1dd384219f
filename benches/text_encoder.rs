//! CLIP tokenizer and text encoder at Stable Diffusion's sizes.
//!
//! `cargo bench -p kiln-clip --bench text_encoder`; the PyTorch side of the comparison is
//! `cargo xtask py bench/clip_text_torch.py`. Weights are zeros: speed does not depend on them.

use std::hint::black_box;
use std::path::Path;

use criterion::{Criterion, criterion_group, criterion_main};
use kiln_clip::{ClipTextConfig, ClipTextModel, ClipTokenizer};

fn fixtures() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/clip"))
}

fn tokenizer(c: &mut Criterion) {
    let tokenizer =
        ClipTokenizer::from_dir(fixtures().join("model-fullvocab")).expect("fixture tokenizer");
    let prompt = "a highly detailed oil painting of an astronaut riding a horse on mars, \
                  cinematic lighting, by Greg Rutkowski, trending on artstation, 8k";
    c.bench_function("tokenizer/encode_77", |b| {
        b.iter(|| tokenizer.encode(black_box(prompt)))
    });
}

fn text_encoder(c: &mut Criterion) {
    let device = kiln_nn::parse_device("flex").expect("flex backend");
    let mut group = c.benchmark_group("text_encoder");
    group.sample_size(10);
    for name in ["sd15", "sd21"] {
        let config_path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/{name}_text_encoder.json"));
        let config = ClipTextConfig::from_file(&config_path).expect("preset config");
        let model = ClipTextModel::new(&config, &device);
        // Two prompts, as classifier-free guidance encodes (negative, positive).
        let ids: Vec<Vec<u32>> = (0..2)
            .map(|i| {
                (0..77)
                    .map(|j| ((i * 77 + j) * 131 % 49406) as u32)
                    .collect()
            })
            .collect();
        group.bench_function(format!("{name}/batch2"), |b| {
            b.iter(|| {
                let out = model
                    .encode_ids(black_box(&ids), 0, &device)
                    .expect("forward");
                out.hidden_state.into_data()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, tokenizer, text_encoder);
criterion_main!(benches);
