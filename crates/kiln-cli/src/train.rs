//! `kiln train`: trains a Stable Diffusion from scratch from a TOML recipe (`--config`, resumable
//! with `--resume DIR`; [`kiln_train::run`]), or fine-tunes a diffusers folder's (or a
//! single-file checkpoint's) UNet on a folder of captioned images (`--model --data`), with a
//! progress bar showing the loss, checkpoints every `--save-every` steps and at the end (each
//! written complete under a temporary name, then renamed).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_train::run::{ProgressBars, resume, start};
use kiln_train::{ImageCaptionDataset, LrSchedule, MixedPrecision, Recipe, TrainConfig, Trainer};

/// Arguments of `kiln train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// A training recipe (TOML: the models' configs, the data, both stages' options): train a
    /// model from scratch into the run folder `--output`.
    #[arg(long, conflicts_with_all = ["model", "data", "resume"])]
    config: Option<PathBuf>,
    /// Go on with the run in this folder from its newest checkpoint.
    #[arg(long, conflicts_with_all = ["model", "data", "output"])]
    resume: Option<PathBuf>,
    /// With --config: VAE steps instead of the recipe's (a short smoke run of a real recipe).
    #[arg(long, requires = "config")]
    vae_steps: Option<usize>,
    /// With --config: denoiser steps instead of the recipe's.
    #[arg(long, requires = "config")]
    denoiser_steps: Option<usize>,
    /// The model to fine-tune: a diffusers folder, or a single-file SD 1.x / 2.x checkpoint
    /// (`.safetensors` or `.ckpt`, converted into a temporary diffusers folder beside --output
    /// first, as `kiln convert` does).
    #[arg(long, requires = "data")]
    model: Option<PathBuf>,
    /// For a single-file --model: a diffusers folder whose configs (and tokenizer) describe it
    /// (default: inferred from the tensor shapes).
    #[arg(long, value_name = "DIR", requires = "model")]
    model_config: Option<PathBuf>,
    /// A folder of images (.png, .jpg) with same-named .txt captions, or with a metadata.jsonl
    /// of {"file_name", "text"} lines.
    #[arg(long, requires = "model")]
    data: Option<PathBuf>,
    /// Where to write the fine-tuned model (a complete diffusers folder), or with --config the
    /// run folder.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Optimiser steps.
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-5)]
    learning_rate: f64,
    /// Learning-rate schedule: constant, constant_with_warmup, linear, cosine.
    #[arg(long, default_value = "constant")]
    lr_scheduler: String,
    /// Warm-up steps of the schedule (not used by `constant`).
    #[arg(long, default_value_t = 500)]
    lr_warmup_steps: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Batches averaged into each optimiser step.
    #[arg(long, default_value_t = 1)]
    gradient_accumulation_steps: usize,
    /// Square training resolution in pixels (default: the model's size).
    #[arg(long)]
    resolution: Option<usize>,
    /// Clip the gradients to this global L2 norm each step (0 disables clipping).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// Keep an exponential moving average of the UNet (maximum decay, e.g. 0.9999 as diffusers'
    /// --use_ema) and save it instead of the last weights.
    #[arg(long)]
    ema_decay: Option<f64>,
    /// Min-SNR weighting gamma (5 is the paper's choice; default: plain MSE).
    #[arg(long)]
    snr_gamma: Option<f64>,
    /// Train the text encoder with the UNet (otherwise it stays frozen).
    #[arg(long)]
    train_text_encoder: bool,
    /// Probability that a caption is replaced by the empty one (for classifier-free guidance).
    #[arg(long, default_value_t = 0.0)]
    caption_dropout: f64,
    /// Offset noise: this times N(0, 1) per sample and channel added to the noise.
    #[arg(long, default_value_t = 0.0)]
    noise_offset: f64,
    /// Recompute memory-bound activations in the backward pass (less memory, same values).
    #[arg(long)]
    gradient_checkpointing: bool,
    /// The UNet forward's precision: no (f32) or bf16 (autocast; the weights, the optimiser and
    /// the loss stay f32).
    #[arg(long, default_value = "no", value_parser = parse_precision)]
    mixed_precision: MixedPrecision,
    /// Crop the image centre instead of a random square.
    #[arg(long)]
    center_crop: bool,
    /// Flip half the images horizontally.
    #[arg(long)]
    random_flip: bool,
    /// Seed of every random draw.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also write the checkpoint every N steps.
    #[arg(long)]
    save_every: Option<usize>,
    /// Replace an existing output folder.
    #[arg(long)]
    overwrite: bool,
}

/// Runs `kiln train`.
pub fn run(args: TrainArgs, device: impl FnOnce() -> Result<Device>) -> Result<()> {
    if let Some(dir) = &args.resume {
        let device = device()?;
        let model = resume(dir, &device, &mut ProgressBars::default())?;
        eprintln!("wrote {}", model.display());
        return Ok(());
    }
    let Some(output) = args.output.clone() else {
        bail!("give --output DIR (with --config FILE, or with --model DIR --data DIR)");
    };
    if let Some(config) = &args.config {
        let mut recipe = Recipe::from_file(config)?;
        if args.vae_steps.is_some() || args.denoiser_steps.is_some() || args.save_every.is_some() {
            let every = args.save_every.unwrap_or(recipe.checkpoint_every);
            let vae = args.vae_steps.unwrap_or(recipe.vae_stage.max_steps);
            let denoiser = args
                .denoiser_steps
                .unwrap_or(recipe.denoiser_stage.max_steps);
            if vae == 0 || denoiser == 0 || every == 0 {
                bail!("--vae-steps, --denoiser-steps and --save-every must be at least 1");
            }
            recipe = recipe.with_steps(vae, denoiser, every);
        }
        if output.exists() && !args.overwrite {
            bail!(
                "`{}` exists; pass --overwrite to replace it, or --resume {} to go on with it",
                output.display(),
                output.display()
            );
        }
        let device = device()?;
        let model = start(
            &recipe,
            &output,
            args.overwrite,
            &device,
            &mut ProgressBars::default(),
        )?;
        eprintln!("wrote {}", model.display());
        return Ok(());
    }
    let (Some(model), Some(data)) = (args.model.clone(), args.data.clone()) else {
        bail!("give --config FILE (train from scratch) or --model DIR --data DIR (fine-tune)");
    };
    if output.exists() && !args.overwrite {
        bail!(
            "`{}` exists; pass --overwrite to replace it",
            output.display()
        );
    }
    if args.steps == 0 || args.save_every == Some(0) {
        bail!("--steps and --save-every must be at least 1");
    }
    let lr_schedule: LrSchedule = args.lr_scheduler.parse()?;
    let dataset = ImageCaptionDataset::from_dir(&data)?;
    // a single-file checkpoint: a diffusers folder of it for the run, removed at the end
    let source = model;
    let (model, _converted) = model_folder(&source, args.model_config.as_deref(), &output)?;
    let device = device()?;
    let config = TrainConfig {
        resolution: args.resolution,
        batch_size: args.batch,
        learning_rate: args.learning_rate,
        lr_schedule,
        lr_warmup_steps: args.lr_warmup_steps,
        max_steps: args.steps,
        gradient_accumulation_steps: args.gradient_accumulation_steps,
        snr_gamma: args.snr_gamma,
        max_grad_norm: (args.max_grad_norm != 0.0).then_some(args.max_grad_norm),
        ema_decay: args.ema_decay,
        train_text_encoder: args.train_text_encoder,
        caption_dropout: args.caption_dropout,
        noise_offset: args.noise_offset,
        gradient_checkpointing: args.gradient_checkpointing,
        mixed_precision: args.mixed_precision,
        center_crop: args.center_crop,
        random_flip: args.random_flip,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let examples = dataset.len();
    let mut trainer = Trainer::new(&model, dataset, config, &device)?;
    eprintln!(
        "training {} on {examples} example(s) at {}x{} for {} steps",
        source.display(),
        trainer.resolution(),
        trainer.resolution(),
        args.steps
    );
    let bar = ProgressBar::with_draw_target(Some(args.steps as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}, {per_sec}] {msg}",
        )
        .expect("static template"),
    );
    bar.enable_steady_tick(Duration::from_millis(500));
    let mut recent = Vec::new();
    for step in 1..=args.steps {
        let loss = trainer.step()?;
        recent.push(loss);
        if recent.len() > 20 {
            recent.remove(0);
        }
        let mean = recent.iter().sum::<f32>() / recent.len() as f32;
        bar.set_message(format!(
            "loss {loss:.4} (mean of last {}: {mean:.4})",
            recent.len()
        ));
        bar.inc(1);
        if args.save_every.is_some_and(|n| step % n == 0) && step != args.steps {
            trainer.save(&output)?;
        }
    }
    bar.finish();
    trainer.save(&output)?;
    eprintln!("wrote {}", output.display());
    Ok(())
}

fn parse_precision(s: &str) -> std::result::Result<MixedPrecision, String> {
    s.parse().map_err(|e: kiln_train::Error| e.to_string())
}

/// The diffusers folder to fine-tune `model` from: the folder itself, or a single-file
/// checkpoint converted into a temporary folder on `output`'s disk (with `config`'s configs, or
/// ones inferred), removed when the returned guard drops.
fn model_folder(
    model: &Path,
    config: Option<&Path>,
    output: &Path,
) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    if !model.is_file() {
        if config.is_some() {
            bail!(
                "--model-config is for single-file checkpoints; `{}` is a folder with its own configs",
                model.display()
            );
        }
        return Ok((model.to_path_buf(), None));
    }
    let parent = crate::folder_of(output);
    std::fs::create_dir_all(parent)
        .with_context(|| format!("cannot create `{}`", parent.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-base-")
        .tempdir_in(parent)
        .with_context(|| format!("cannot create a temporary folder in `{}`", parent.display()))?;
    let folder = tmp.path().join("model");
    eprintln!("converting {} to a diffusers folder", model.display());
    let options = kiln_pipeline::SingleFileOptions {
        config: config.map(Path::to_path_buf),
        ..Default::default()
    };
    kiln_pipeline::convert_to_diffusers(model, &options, &folder)
        .with_context(|| format!("cannot convert `{}`", model.display()))?;
    Ok((folder, Some(tmp)))
}
