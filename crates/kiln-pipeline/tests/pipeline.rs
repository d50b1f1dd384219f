//! Behaviour of the pipeline beyond parity: seeds, guidance, callbacks, supplied embeddings, the
//! golden image, and typed errors for bad input.

mod common;

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::{Tensor, TensorData};
use kiln_nn::FloatKind;
use kiln_nn::reference::tolerance;
use kiln_pipeline::{
    Error, GenerateOptions, GenerateOutput, LoadOptions, Mode, PromptSyntax, RgbImage,
    StableDiffusionPipeline, StepProgress,
};
use kiln_scheduler::{SamplerName, SamplerOptions, SeededNoise};

fn load(dir: &Path) -> kiln_pipeline::Result<StableDiffusionPipeline> {
    StableDiffusionPipeline::from_pretrained(dir, LoadOptions::default(), &common::device())
}

fn run(
    pipe: &StableDiffusionPipeline,
    options: &GenerateOptions,
    seed: u64,
) -> kiln_pipeline::Result<GenerateOutput> {
    let mut scheduler = pipe.scheduler(Some(SamplerName::EulerA), SamplerOptions::default())?;
    pipe.generate(&mut scheduler, options, &mut SeededNoise::new(seed), None)
}

fn max_diff(a: &Tensor<4>, b: &Tensor<4>) -> f32 {
    (a.clone() - b.clone()).abs().max().into_scalar::<f32>()
}

fn small(prompt: &str) -> GenerateOptions {
    GenerateOptions::new(prompt).with_steps(3).with_size(48, 32)
}

#[test]
fn seeds_guidance_embeddings_and_callbacks() {
    let dir = common::model("sd1");
    let pipe = load(dir.path()).unwrap();
    assert_eq!(pipe.default_size(), (32, 32));
    assert!(!pipe.is_inpainting_unet());

    // the same seed gives the same image, another seed another one
    let a = run(&pipe, &small("a cat"), 1).unwrap();
    let b = run(&pipe, &small("a cat"), 1).unwrap();
    let c = run(&pipe, &small("a cat"), 2).unwrap();
    assert_eq!(a.images.dims(), [1, 3, 32, 48]);
    assert_eq!(max_diff(&a.images, &b.images), 0.0);
    assert!(max_diff(&a.images, &c.images) > 0.05);

    // at guidance 1 the negative prompt is not used
    let plain = run(&pipe, &small("a cat").with_guidance_scale(1.0), 1).unwrap();
    let neg = small("a cat")
        .with_guidance_scale(1.0)
        .with_negative_prompt("a dog");
    assert_eq!(
        max_diff(&plain.images, &run(&pipe, &neg, 1).unwrap().images),
        0.0
    );
    assert!(
        max_diff(&plain.images, &a.images) > 0.01,
        "guidance changes the image"
    );

    // supplied embeddings stand in for the prompts
    let embeds = pipe.encode_prompt("a cat", PromptSyntax::Plain, 0).unwrap();
    let empty = pipe.encode_prompt("", PromptSyntax::Plain, 0).unwrap();
    let supplied = run(
        &pipe,
        &small("ignored").with_prompt_embeds(embeds, Some(empty)),
        1,
    )
    .unwrap();
    assert!(max_diff(&supplied.images, &a.images) < 1e-6);

    // the callback sees every step and can cancel
    let mut seen = Vec::new();
    let mut cb = |p: &StepProgress<'_>| {
        seen.push((p.step, p.total));
        if p.step == 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    // (the folder's PNDM makes steps + 1 model calls; DDIM makes one per step)
    let mut scheduler = pipe
        .scheduler(Some(SamplerName::Ddim), SamplerOptions::default())
        .unwrap();
    let err = pipe
        .generate(
            &mut scheduler,
            &small("a cat"),
            &mut SeededNoise::new(1),
            Some(&mut cb),
        )
        .unwrap_err();
    assert!(matches!(err, Error::Cancelled { step: 1 }), "{err}");
    assert_eq!(seen, [(0, 3), (1, 3)]);
}

/// The thread count is not an axis of variation: flex splits matrix products and reductions
/// over output rows and columns, never along a sum, so every thread computes the same sums in
/// the same order and the image is the same to the bit with 1, 2 or 3 threads (docs/determinism.md).
#[test]
fn thread_count_does_not_change_the_image() {
    let dir = common::model("sd1");
    let pipe = load(dir.path()).unwrap();
    let options = small("a cat").with_negative_prompt("a dog");
    let with_threads = |n: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build()
            .unwrap();
        pool.install(|| run(&pipe, &options, 7).unwrap().images)
    };
    let one = with_threads(1);
    for n in [2, 3] {
        let bits = |t: &Tensor<4>| {
            t.to_data()
                .convert::<f32>()
                .try_to_vec::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(bits(&one), bits(&with_threads(n)), "1 vs {n} threads");
    }
}

/// A fixed seed, sampler and step count against `fixtures/pipeline/golden-sd1-euler-a-seed42.png`,
/// within [`tolerance::levels`] of twice [`tolerance::IMAGE`] (1/255) per channel: the golden
/// image was rounded from another machine's float image, and both machines' are within `IMAGE`
/// of diffusers', so within `2 IMAGE` of each other. `KILN_BLESS=1` rewrites the golden image.
#[test]
fn golden_image() {
    let dir = common::model("sd1");
    let pipe = load(dir.path()).unwrap();
    let options = GenerateOptions::new("a photo of an astronaut riding a horse")
        .with_negative_prompt("blurry")
        .with_steps(8)
        .with_size(48, 32);
    let image = run(&pipe, &options, 42)
        .unwrap()
        .to_rgb8()
        .unwrap()
        .remove(0);
    let path = common::fixtures().join("golden-sd1-euler-a-seed42.png");
    if std::env::var_os("KILN_BLESS").is_some() {
        let file = std::fs::File::create(&path).unwrap();
        let mut enc = png::Encoder::new(file, image.width as u32, image.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.write_header()
            .unwrap()
            .write_image_data(&image.data)
            .unwrap();
    }
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&path).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut golden = vec![0; reader.output_buffer_size().unwrap()];
    reader.next_frame(&mut golden).unwrap();
    assert_eq!(golden.len(), image.data.len());
    let worst = golden
        .iter()
        .zip(&image.data)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(
        worst <= tolerance::levels(2.0 * tolerance::IMAGE),
        "max 8-bit difference to the golden image: {worst}"
    );
}

#[test]
fn bad_input_is_a_typed_error() {
    let dir = common::model("sd1");
    let pipe = load(dir.path()).unwrap();
    let device = common::device();

    // the tiny VAE scales by 2
    let err = run(&pipe, &small("x").with_size(31, 32), 1).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Size {
                width: 31,
                multiple: 2,
                ..
            }
        ),
        "{err}"
    );

    let latents = Tensor::<4>::zeros([1, 4, 8, 8], &device);
    let err = run(&pipe, &small("x").with_latents(latents), 1).unwrap_err();
    assert!(err.to_string().contains("[1, 4, 16, 24]"), "{err}");

    let image = Tensor::<4>::zeros([1, 3, 32, 48], &device);
    let strength_zero = Mode::Img2Img {
        image: image.clone(),
        strength: 0.0,
    };
    let err = run(&pipe, &small("x").with_mode(strength_zero), 1).unwrap_err();
    assert!(err.to_string().contains("strength"), "{err}");

    let mask = Tensor::<4>::ones([1, 1, 16, 24], &device);
    let bad_mask = Mode::Inpaint {
        image,
        mask,
        strength: 1.0,
    };
    let err = run(&pipe, &small("x").with_mode(bad_mask), 1).unwrap_err();
    assert!(err.to_string().contains("mask"), "{err}");

    let err = pipe
        .scheduler(
            None,
            SamplerOptions {
                karras: true,
                eta: 0.0,
            },
        )
        .unwrap_err();
    assert!(err.to_string().contains("Karras"), "{err}");

    let rgb = RgbImage {
        width: 2,
        height: 2,
        data: vec![0; 5],
    };
    assert!(kiln_pipeline::rgb8_to_tensor(&rgb, &device).is_err());
    let gray = Tensor::<4>::from_data(TensorData::new(vec![0.5f32; 4], [1, 1, 2, 2]), &device);
    assert!(kiln_pipeline::images_to_rgb8(&gray).is_err());
}

#[test]
fn incomplete_and_mismatched_folders_are_refused() {
    let empty = tempfile::tempdir().unwrap();
    let err = load(empty.path()).unwrap_err();
    assert!(matches!(err, Error::IncompleteModel { .. }), "{err}");
    assert!(
        err.to_string().contains("model_index.json, tokenizer/"),
        "{err}"
    );

    let partial = common::model("sd1");
    std::fs::remove_dir_all(partial.path().join("unet")).unwrap();
    let err = load(partial.path()).unwrap_err();
    assert!(err.to_string().ends_with("missing unet/"), "{err}");

    // the SD 1 text encoder (width 8) with a UNet expecting width 16
    let mismatched = common::model("sd1");
    let config = mismatched.path().join("unet/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"cross_attention_dim\": 8", "\"cross_attention_dim\": 16"),
    )
    .unwrap();
    let err = load(mismatched.path()).unwrap_err();
    assert!(matches!(err, Error::Mismatch(_)), "{err}");

    let inpaint = common::model("inpaint");
    assert!(load(inpaint.path()).unwrap().is_inpainting_unet());
}

/// The `.fp16.` weights run in f16 (and bf16) stay close to the f32 run. Measured on this model
/// with `kiln generate --steps 3 --seed 1` (PNDM): 1/255 (f16) and 8/255 (bf16) at most; the
/// bounds leave room for the sampler and backend.
#[test]
fn half_precision_stays_close_to_f32() {
    let dir = common::model("sd1");
    let f32_pipe = load(dir.path()).unwrap();
    let reference = run(&f32_pipe, &small("a cat"), 3).unwrap().images;
    for (kind, bound) in [
        (FloatKind::F16, 4.0 / 255.0),
        (FloatKind::BF16, 24.0 / 255.0),
    ] {
        let pipe = StableDiffusionPipeline::from_pretrained(
            dir.path(),
            LoadOptions { dtype: kind },
            &common::device(),
        )
        .unwrap();
        let images = run(&pipe, &small("a cat"), 3).unwrap().images;
        let diff = max_diff(&images, &reference);
        assert!(diff <= bound, "{kind:?}: max difference {diff}");
    }
}

/// The embedded default model loads, with its own size and generation defaults, and draws.
#[test]
fn embedded_model_generates_at_its_size() {
    let device = common::device();
    let pipe = StableDiffusionPipeline::embedded(&device).unwrap();
    assert_eq!(pipe.default_size(), (32, 32));
    assert_eq!(
        (pipe.generation.steps, pipe.generation.guidance_scale),
        (25, 4.0)
    );
    let options = GenerateOptions::for_model(&pipe, "a red circle on a blue background");
    let mut scheduler = pipe.scheduler(None, SamplerOptions::default()).unwrap();
    let out = pipe
        .generate(&mut scheduler, &options, &mut SeededNoise::new(0), None)
        .unwrap();
    assert_eq!(out.images.dims(), [1, 3, 32, 32]);
    // a flat blue background: the corner pixel is far more blue than red
    let rgb = out.to_rgb8().unwrap().remove(0);
    let (r, b) = (rgb.data[0], rgb.data[2]);
    assert!(
        b > r.saturating_add(60),
        "corner pixel {:?}",
        &rgb.data[..3]
    );
}

/// A size too large for memory is refused before anything is allocated, with the estimate and
/// the limit; the estimate grows with the size, the batch and guidance; a limit above the
/// estimate lets the run go.
#[test]
fn sizes_too_large_for_memory_are_refused_up_front() {
    let dir = common::model("sd1");
    let pipe = load(dir.path()).unwrap();
    let huge = GenerateOptions::new("a cat")
        .with_steps(1)
        .with_size(100_000, 100_000);
    let started = std::time::Instant::now();
    match run(&pipe, &huge, 0) {
        Err(e @ Error::InsufficientMemory { .. }) => {
            let message = e.to_string();
            assert!(message.contains("100000x100000"), "{message}");
            assert!(message.contains("GiB"), "{message}");
        }
        other => panic!("expected InsufficientMemory, got {other:?}"),
    }
    // refused before the prompt is even encoded (timing is not asserted, only reported)
    eprintln!("refused in {:?}", started.elapsed());

    let estimate = |w, h, n, cfg| pipe.estimate_memory(w, h, n, cfg, None);
    let base = estimate(64, 64, 1, true);
    assert!(estimate(128, 128, 1, true).unet > base.unet);
    assert!(estimate(128, 128, 1, true).vae_decode > base.vae_decode);
    assert!(estimate(64, 64, 2, true).unet > base.unet);
    assert!(estimate(64, 64, 1, false).unet < base.unet);
    assert_eq!(base.packed_weights, 0, "f32 weights are never packed");
    assert_eq!(base.peak(), base.unet.max(base.vae_decode));
    assert_eq!(estimate(usize::MAX, usize::MAX, 1, true).peak(), u64::MAX);
    // bf16 on a CPU with AMX tiles: the UNet's and the VAE's weights packed once more, held
    // through both stages
    let options = LoadOptions {
        dtype: kiln_nn::FloatKind::BF16,
    };
    let half =
        StableDiffusionPipeline::from_pretrained(dir.path(), options, &common::device()).unwrap();
    let packed = half.estimate_memory(64, 64, 1, true, None);
    if kiln_nn::kernels::packs_weights(half.device(), half.dtype()) {
        use burn::module::Module;
        let params = half.unet.num_params() + half.vae.num_params();
        assert_eq!(packed.packed_weights, 2 * params as u64);
        assert_eq!(
            packed.peak(),
            packed.unet.max(packed.vae_decode) + packed.packed_weights
        );
        assert!(packed.packed_note().contains("GiB"));
    } else {
        assert_eq!(packed.packed_weights, 0);
        assert_eq!(packed.packed_note(), "");
    }

    let small_run = small("a cat");
    let needed = pipe.estimate_memory(48, 32, 1, true, None).peak();
    // tiles bound the decoder's maps
    let tiles = kiln_vae::TilingOptions {
        tile_sample_size: 64,
        overlap_factor: 0.25,
    };
    assert!(
        pipe.estimate_memory(4096, 4096, 1, true, Some(&tiles))
            .vae_decode
            < estimate(4096, 4096, 1, true).vae_decode
    );
    match run(&pipe, &small_run.clone().with_memory_limit(needed - 1), 0) {
        Err(Error::InsufficientMemory { limit, .. }) => assert_eq!(limit, needed - 1),
        other => panic!("expected InsufficientMemory, got {other:?}"),
    }
    assert!(run(&pipe, &small_run.with_memory_limit(needed), 0).is_ok());
}

/// `vae_tiling` decodes in tiles: at a size within one tile the image is the untiled one to the
/// bit, at a larger size it stays close to it (the tiles overlap and are blended).
#[test]
fn vae_tiling_is_the_untiled_decode_within_a_tile_and_close_beyond() {
    let dir = common::model("sd1");
    let pipe = load(dir.path()).unwrap();
    let tiles = kiln_vae::TilingOptions::from_config(&pipe.vae.config);
    let side = tiles.tile_sample_size;
    let at = |w: usize, h: usize, tiled: bool| {
        let mut options = small("a cat").with_size(w, h);
        if tiled {
            options = options.with_vae_tiling(tiles);
        }
        run(&pipe, &options, 3).unwrap().images
    };
    assert_eq!(max_diff(&at(side, side, false), &at(side, side, true)), 0.0);
    let (untiled, tiled) = (at(3 * side, 2 * side, false), at(3 * side, 2 * side, true));
    assert_eq!(tiled.dims(), [1, 3, 2 * side, 3 * side]);
    let mean = (untiled - tiled).abs().mean().into_scalar::<f32>();
    assert!(mean > 0.0 && mean < 0.1, "mean difference {mean}");
}
