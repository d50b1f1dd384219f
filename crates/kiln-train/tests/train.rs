//! Fine-tuning the tiny SD 1.x pipeline of `fixtures/pipeline/sd1` on two generated images: the
//! loss on fixed inputs falls, runs are reproducible, and the checkpoint is a diffusers folder
//! that loads back strictly with the trained weights.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor};
use kiln_pipeline::{GenerateOptions, LoadOptions, StableDiffusionPipeline};
use kiln_scheduler::{SamplerOptions, SeededNoise};
use kiln_train::{Error, ImageCaptionDataset, TrainConfig, Trainer};
use kiln_unet::UNet2DConditionModel;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn device() -> Device {
    kiln_nn::parse_device("flex").unwrap()
}

/// Two non-square images with captions (`.txt` layout).
fn dataset() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (i, caption) in ["a red square on blue", "a green stripe"]
        .iter()
        .enumerate()
    {
        let img = image::RgbImage::from_fn(40, 28, |x, y| {
            let v = ((x * 6 + y * 9 + i as u32 * 80) % 256) as u8;
            image::Rgb([v, 255 - v, (x * 7 % 256) as u8])
        });
        img.save(dir.path().join(format!("{i}.png"))).unwrap();
        std::fs::write(dir.path().join(format!("{i}.txt")), caption).unwrap();
    }
    dir
}

fn config(seed: u64) -> TrainConfig {
    TrainConfig {
        resolution: Some(16),
        batch_size: 2,
        learning_rate: 2e-3,
        seed,
        random_flip: true,
        ..TrainConfig::default()
    }
}

fn model() -> PathBuf {
    root().join("fixtures/pipeline/sd1")
}

#[test]
fn training_lowers_the_loss_and_saves_a_loadable_checkpoint() {
    let data = dataset();
    let device = device();
    let dataset = ImageCaptionDataset::from_dir(data.path()).unwrap();
    assert_eq!(dataset.len(), 2);
    assert_eq!(dataset.examples[1].caption, "a green stripe");
    let mut trainer = Trainer::new(&model(), dataset, config(7), &device).unwrap();
    let before = trainer.eval_loss(123).unwrap();
    assert_eq!(
        before,
        trainer.eval_loss(123).unwrap(),
        "eval loss is deterministic"
    );
    let losses: Vec<f32> = (0..40).map(|_| trainer.step().unwrap()).collect();
    let after = trainer.eval_loss(123).unwrap();
    eprintln!("eval loss {before:.4} -> {after:.4}; step losses {losses:?}");
    assert_eq!(trainer.steps(), 40);
    assert!(after < 0.8 * before, "eval loss {before} -> {after}");

    let out = tempfile::tempdir().unwrap();
    let checkpoint = out.path().join("tuned");
    trainer.save(&checkpoint).unwrap();
    // saving again replaces the checkpoint in place
    trainer.save(&checkpoint).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, ["tuned"]);

    // strict load: every key with diffusers' names and shapes, the trained values
    let loaded =
        UNet2DConditionModel::from_pretrained(&checkpoint.join("unet"), DType::F32, &device)
            .unwrap();
    let base =
        UNet2DConditionModel::from_pretrained(&model().join("unet"), DType::F32, &device).unwrap();
    let trained: Tensor<4> =
        Tensor::from_data(trainer.unet().conv_in.weight.val().into_data(), &device);
    let diff = |a: Tensor<4>, b: Tensor<4>| -> f32 { (a - b).abs().max().into_scalar() };
    assert_eq!(diff(loaded.conv_in.weight.val(), trained.clone()), 0.0);
    assert!(
        diff(base.conv_in.weight.val(), trained) > 1e-4,
        "training changed the weights"
    );

    let pipe =
        StableDiffusionPipeline::from_pretrained(&checkpoint, LoadOptions::default(), &device)
            .unwrap();
    let mut scheduler = pipe.scheduler(None, SamplerOptions::default()).unwrap();
    let out = pipe
        .generate(
            &mut scheduler,
            &GenerateOptions::new("a red square on blue")
                .with_steps(2)
                .with_size(16, 16),
            &mut SeededNoise::new(1),
            None,
        )
        .unwrap();
    assert_eq!(out.images.dims(), [1, 3, 16, 16]);
}

#[test]
fn runs_with_the_same_seed_are_identical() {
    let data = dataset();
    let device = device();
    let run = |seed| {
        let dataset = ImageCaptionDataset::from_dir(data.path()).unwrap();
        let mut trainer = Trainer::new(&model(), dataset, config(seed), &device).unwrap();
        (0..3)
            .map(|_| trainer.step().unwrap())
            .collect::<Vec<f32>>()
    };
    let a = run(1);
    assert_eq!(a, run(1));
    assert_ne!(a, run(2));
}

#[test]
fn bad_datasets_and_options_are_typed_errors() {
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        ImageCaptionDataset::from_dir(empty.path()),
        Err(Error::Dataset { .. })
    ));
    std::fs::write(
        empty.path().join("metadata.jsonl"),
        "{\"file_name\": \"missing.png\", \"text\": \"x\"}\n",
    )
    .unwrap();
    let err = ImageCaptionDataset::from_dir(empty.path())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("line 1") && err.contains("missing.png"),
        "{err}"
    );

    let data = dataset();
    let dataset = ImageCaptionDataset::from_dir(data.path()).unwrap();
    let odd = TrainConfig {
        resolution: Some(15),
        ..config(0)
    };
    let err = Trainer::new(&model(), dataset.clone(), odd, &device()).unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err}");

    std::fs::write(data.path().join("0.png"), b"not a png").unwrap();
    let mut trainer = Trainer::new(&model(), dataset, config(0), &device()).unwrap();
    let err = trainer.step().unwrap_err();
    assert!(matches!(err, Error::Image { .. }), "{err}");
}

#[test]
fn accumulated_steps_with_a_schedule_train() {
    let data = dataset();
    let dataset = ImageCaptionDataset::from_dir(data.path()).unwrap();
    let config = TrainConfig {
        batch_size: 1,
        gradient_accumulation_steps: 2,
        lr_schedule: kiln_train::LrSchedule::Cosine,
        lr_warmup_steps: 2,
        max_steps: 20,
        ema_decay: Some(0.9),
        ..config(3)
    };
    let mut trainer = Trainer::new(&model(), dataset, config, &device()).unwrap();
    assert_eq!(trainer.learning_rate(), 0.0, "warm-up starts at 0");
    let before = trainer.eval_loss(5).unwrap();
    for _ in 0..20 {
        trainer.step().unwrap();
    }
    assert!(trainer.learning_rate() < 1e-12, "the cosine ends at 0");
    let after = trainer.eval_loss(5).unwrap();
    eprintln!("accumulated: eval loss {before:.4} -> {after:.4}");
    assert!(after < 0.9 * before, "{before} -> {after}");
    // the average lags the weights, and is what the checkpoint holds
    let ema = trainer.ema().unwrap();
    assert_eq!(ema.updates(), 20);
    let host = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &device());
    let trained = host(trainer.unet().conv_in.weight.val());
    let averaged = host(ema.model().unet.conv_in.weight.val());
    let gap: f32 = (trained - averaged.clone()).abs().max().into_scalar();
    assert!(gap > 0.0, "the average differs from the last weights");
    let out = tempfile::tempdir().unwrap();
    trainer.save(&out.path().join("ema")).unwrap();
    let saved =
        UNet2DConditionModel::from_pretrained(&out.path().join("ema/unet"), DType::F32, &device())
            .unwrap();
    let diff: f32 = (saved.conv_in.weight.val() - averaged)
        .abs()
        .max()
        .into_scalar();
    assert_eq!(diff, 0.0);
}

/// Gradient checkpointing recomputes activations instead of keeping them: the same losses, with
/// the text encoder trained alongside the UNet, caption dropout and offset noise.
#[test]
fn gradient_checkpointing_and_text_encoder_training_give_the_same_run() {
    let data = dataset();
    let device = device();
    let run = |checkpointing: bool| {
        let dataset = ImageCaptionDataset::from_dir(data.path()).unwrap();
        let config = TrainConfig {
            gradient_checkpointing: checkpointing,
            train_text_encoder: true,
            caption_dropout: 0.5,
            noise_offset: 0.1,
            ..config(5)
        };
        let mut trainer = Trainer::new(&model(), dataset, config, &device).unwrap();
        (0..3)
            .map(|_| trainer.step().unwrap())
            .collect::<Vec<f32>>()
    };
    let plain = run(false);
    let checkpointed = run(true);
    for (a, b) in plain.iter().zip(&checkpointed) {
        assert!(
            (a - b).abs() <= 1e-6 * a.abs(),
            "{plain:?} vs {checkpointed:?}"
        );
    }
}
