//! Fine-tuning the tiny SD 1.x pipeline of `fixtures/pipeline/sd1` on two generated images: the
//! loss on fixed inputs falls, runs are reproducible, and the checkpoint is a diffusers folder
//! that loads back strictly with the trained weights.

use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor};
use kiln_pipeline::{GenerateOptions, LoadOptions, StableDiffusionPipeline};
use kiln_scheduler::{SamplerOptions, SeededNoise};
use kiln_train::{Error, ImageCaptionDataset, MixedPrecision, TrainConfig, Trainer};
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

/// bf16 autocast runs the UNet's forward on a bf16 copy of the f32 weights: the loss is that of
/// the f32 model to bf16's precision, the run still learns (the text encoder too, through the
/// cast context), and the checkpoint holds f32 weights.
#[test]
fn bf16_autocast_follows_the_f32_run_and_saves_f32_weights() {
    let data = dataset();
    let device = device();
    let trainer = |precision: MixedPrecision| {
        let dataset = ImageCaptionDataset::from_dir(data.path()).unwrap();
        let config = TrainConfig {
            mixed_precision: precision,
            train_text_encoder: true,
            gradient_checkpointing: precision == MixedPrecision::Bf16,
            ..config(11)
        };
        Trainer::new(&model(), dataset, config, &device).unwrap()
    };
    let mut full = trainer(MixedPrecision::No);
    let mut mixed = trainer(MixedPrecision::Bf16);
    let (f0, m0) = (full.eval_loss(3).unwrap(), mixed.eval_loss(3).unwrap());
    // bf16 rounds each op to 2^-9 relative; the loss is a mean over the batch of squared
    // errors whose rounding errors are independent, so it moves by a few parts in a thousand
    // (measured: 1.3e-3 on the Xeon of 2026-12-02). 2^-7 is six times that.
    assert!(
        (f0 - m0).abs() <= f0 * 2f32.powi(-7),
        "initial loss: f32 {f0} vs bf16 {m0}"
    );
    let te_before = mixed.model().text_encoder.as_ref().unwrap().clone();
    for _ in 0..30 {
        full.step().unwrap();
        mixed.step().unwrap();
    }
    let (f1, m1) = (full.eval_loss(3).unwrap(), mixed.eval_loss(3).unwrap());
    eprintln!("eval loss: f32 {f0} -> {f1}, bf16 {m0} -> {m1}");
    assert!(m1 < 0.8 * m0, "bf16 run: {m0} -> {m1}");
    // the two runs' weights part as each step's rounding differs (measured: 0.4% apart after
    // 30 steps); a tenth is the test that the bf16 run learns what the f32 run learns
    assert!(
        (f1 - m1).abs() <= 0.1 * f1,
        "after 30 steps: f32 {f1} vs bf16 {m1}"
    );
    let te_after = mixed.model().text_encoder.as_ref().unwrap();
    let moved: f32 = (te_after.final_layer_norm.gamma.val()
        - te_before.final_layer_norm.gamma.val())
    .abs()
    .max()
    .into_scalar();
    assert!(moved > 0.0, "the text encoder learns through the bf16 UNet");

    assert_eq!(
        mixed.unet().dtype(),
        DType::F32,
        "the trained weights stay f32"
    );
    let out = tempfile::tempdir().unwrap();
    mixed.save(&out.path().join("m")).unwrap();
    let file = kiln_nn::weights::WeightsFile::open(
        &out.path()
            .join("m/unet/diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    assert!(file.tensors().all(|(_, info)| info.dtype == "F32"));
}

#[test]
fn fp16_mixed_precision_is_refused_with_the_reason() {
    let err = "fp16".parse::<MixedPrecision>().unwrap_err().to_string();
    assert!(
        err.contains("loss scaling") && err.contains("bf16"),
        "{err}"
    );
    assert!("bf16".parse::<MixedPrecision>().is_ok());
}
