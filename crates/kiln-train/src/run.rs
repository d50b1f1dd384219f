//! A from-scratch training run of a [`Recipe`] in a run folder, which can stop at any point and
//! go on exactly (`kiln train --config FILE.toml --output DIR`, `kiln train --resume DIR`).
//!
//! ```text
//! DIR/train.toml        the recipe, as given
//! DIR/run.json          where its data is (resolved), so a resumed run finds it
//! DIR/loss.csv          one row per step of each stage; DIR/loss.png plots it
//! DIR/checkpoints/      vae-000500/, denoiser-001000/, ...: the newest `keep` of each stage
//! DIR/vae/              stage 1's VAE (a diffusers folder, with its latent scaling factor)
//! DIR/model/            stage 2's result: a complete diffusers folder, with kiln.json
//! ```
//!
//! Stage 1 trains the VAE as an autoencoder ([`VaeTrainer`]); stage 2 freezes it and trains the
//! UNet and the text encoder together through the denoising loss ([`Trainer`]), with caption
//! dropout so classifier-free guidance works. Every checkpoint is written under a temporary name
//! and renamed, so a run killed at any moment resumes from its newest complete checkpoint.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};
use kiln_clip::{ClipTextModel, ClipTokenizer};
use kiln_unet::UNet2DConditionModel;
use kiln_vae::AutoencoderKL;
use serde::{Deserialize, Serialize};

use crate::monitor::{LossLog, PlotOptions, Progress, plot_loss_csv, read_loss_csv};
use crate::recipe::Recipe;
use crate::trainer::{Components, TokenizerFiles, Trainer};
use crate::{Error, ImageCaptionDataset, Result, VaeTrainer};

/// Where the run's data is, as resolved when it started, and the step counts it runs to (the
/// recipe's, or those a smoke run set with [`Recipe::with_steps`]).
#[derive(Debug, Serialize, Deserialize)]
struct RunFile {
    data_dir: PathBuf,
    vae_steps: usize,
    denoiser_steps: usize,
    checkpoint_every: usize,
}

/// How a run reports progress.
pub trait Observer {
    /// A stage starts (or resumes) at `step` of `total`.
    fn stage(&mut self, stage: &str, step: usize, total: usize);
    /// A step of the current stage ended with `loss`; `Break` stops the run there (it resumes
    /// from its newest checkpoint), as [`Error::Stopped`].
    fn step(&mut self, loss: f64) -> ControlFlow<()>;
    /// Something a person should read (a skipped image, a checkpoint).
    fn message(&mut self, message: &str);
}

/// Progress bars on the terminal ([`Progress`]); nothing when stderr is not one.
#[derive(Default)]
pub struct ProgressBars {
    bar: Option<Progress>,
}

impl Observer for ProgressBars {
    fn stage(&mut self, stage: &str, step: usize, total: usize) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        self.bar = Some(Progress::new(stage, total as u64, step as u64));
    }
    fn step(&mut self, loss: f64) -> ControlFlow<()> {
        if let Some(bar) = &mut self.bar {
            bar.inc(loss);
        }
        ControlFlow::Continue(())
    }
    fn message(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(message),
            None => eprintln!("{message}"),
        }
    }
}

/// Reports nothing (tests, library users with their own logging).
pub struct Silent;

impl Observer for Silent {
    fn stage(&mut self, _stage: &str, _step: usize, _total: usize) {}
    fn step(&mut self, _loss: f64) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
    fn message(&mut self, _message: &str) {}
}

/// Starts a run of `recipe` in the new folder `out` (an existing one is an error unless
/// `overwrite`, which removes it first) and trains both stages; returns the trained model's
/// folder (`out/model`).
pub fn start(
    recipe: &Recipe,
    out: &Path,
    overwrite: bool,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<PathBuf> {
    if out.exists() {
        if !overwrite {
            return Err(Error::OutputExists {
                path: out.to_path_buf(),
            });
        }
        std::fs::remove_dir_all(out).map_err(|source| Error::Io {
            path: out.to_path_buf(),
            source,
        })?;
    }
    // the data must be readable before anything is written
    ImageCaptionDataset::from_dir(&recipe.data_dir)?;
    let io = |path: &Path, source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    std::fs::write(out.join("train.toml"), &recipe.text).map_err(|e| io(out, e))?;
    let data_dir = std::path::absolute(&recipe.data_dir).map_err(|e| io(&recipe.data_dir, e))?;
    let run = serde_json::to_string_pretty(&RunFile {
        data_dir,
        vae_steps: recipe.vae_stage.max_steps,
        denoiser_steps: recipe.denoiser_stage.max_steps,
        checkpoint_every: recipe.checkpoint_every,
    })
    .expect("serializes");
    std::fs::write(out.join("run.json"), run).map_err(|e| io(out, e))?;
    LossLog::create(out, &LOG_COLUMNS)?;
    train(recipe, out, device, observer)
}

/// Goes on with the run in `out` from its newest checkpoint, with the recipe it was started
/// with (`out/train.toml`); returns the trained model's folder.
pub fn resume(out: &Path, device: &Device, observer: &mut dyn Observer) -> Result<PathBuf> {
    let recipe = load(out)?;
    train(&recipe, out, device, observer)
}

/// The recipe a run folder was started with, its data folder as resolved then.
pub fn load(out: &Path) -> Result<Recipe> {
    if !out.join("train.toml").is_file() || !out.join("run.json").is_file() {
        return Err(Error::Resume(format!(
            "`{}` is not a Kiln training run folder (no train.toml / run.json); start one with --config",
            out.display()
        )));
    }
    let mut recipe = Recipe::from_file(&out.join("train.toml"))?;
    let text = std::fs::read_to_string(out.join("run.json")).map_err(|source| Error::Io {
        path: out.join("run.json"),
        source,
    })?;
    let run: RunFile = serde_json::from_str(&text)
        .map_err(|e| Error::Resume(format!("`{}`: {e}", out.join("run.json").display())))?;
    recipe.data_dir = run.data_dir;
    Ok(recipe.with_steps(run.vae_steps, run.denoiser_steps, run.checkpoint_every))
}

/// The dataset with every image that cannot be decoded reported once and left out.
fn checked_dataset(recipe: &Recipe, observer: &mut dyn Observer) -> Result<ImageCaptionDataset> {
    let mut dataset = ImageCaptionDataset::from_dir(&recipe.data_dir)?;
    let skipped = dataset.drop_unreadable();
    for (path, reason) in &skipped {
        observer.message(&format!("skipping `{}`: {reason}", path.display()));
    }
    if dataset.is_empty() {
        return Err(Error::Dataset {
            path: recipe.data_dir.clone(),
            message: "no readable image".into(),
        });
    }
    Ok(dataset)
}

/// The checkpoints of `stage` in `out/checkpoints`, oldest first, with their steps.
fn checkpoints(out: &Path, stage: &str) -> Result<Vec<(usize, PathBuf)>> {
    let dir = out.join("checkpoints");
    let prefix = format!("{stage}-");
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&dir)
        .map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            Some((name.strip_prefix(&prefix)?.parse().ok()?, e.path()))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// The newest complete checkpoint of `stage`.
fn latest_checkpoint(out: &Path, stage: &str) -> Result<Option<PathBuf>> {
    Ok(checkpoints(out, stage)?
        .into_iter()
        .rev()
        .map(|(_, path)| path)
        .find(|path| {
            path.join(crate::checkpoint::STATE_DIR)
                .join("state.json")
                .is_file()
        }))
}

/// Removes all but the newest `keep` checkpoints of `stage`.
fn prune(out: &Path, stage: &str, keep: usize) -> Result<()> {
    let found = checkpoints(out, stage)?;
    let excess = found.len().saturating_sub(keep);
    for (_, path) in found.into_iter().take(excess) {
        std::fs::remove_dir_all(&path).map_err(|source| Error::Io { path, source })?;
    }
    Ok(())
}

fn checkpoint_path(out: &Path, stage: &str, step: usize) -> PathBuf {
    out.join("checkpoints").join(format!("{stage}-{step:06}"))
}

/// Removes what a killed write left: temporary folders (`.NAME.tmp-PID`, `.NAME.old-PID`) in the
/// run folder and its checkpoints.
fn remove_stale_temporaries(out: &Path) -> Result<()> {
    for dir in [out.to_path_buf(), out.join("checkpoints")] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.filter_map(|e| e.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-"));
            if stale && entry.path().is_dir() {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(|source| Error::Io { path, source })?;
            }
        }
    }
    Ok(())
}

fn train(
    recipe: &Recipe,
    out: &Path,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<PathBuf> {
    remove_stale_temporaries(out)?;
    let dataset = checked_dataset(recipe, observer)?;
    std::fs::create_dir_all(out.join("checkpoints")).map_err(|source| Error::Io {
        path: out.join("checkpoints"),
        source,
    })?;
    let vae_dir = out.join("vae");
    if !vae_dir.join("config.json").is_file() {
        train_vae(recipe, out, dataset.clone(), device, observer)?;
    }
    train_denoiser(recipe, out, dataset, device, observer)
}

/// The columns of `loss.csv` after `step,stage`: the step's loss, its learning rate, and the
/// training time so far in seconds (summed over every session of the run).
const LOG_COLUMNS: [&str; 3] = ["loss", "learning_rate", "seconds"];

/// The log cut back to `step` of `stage`, and the training seconds it had reached there.
fn log_for(out: &Path, stage: &str, step: usize) -> Result<(LossLog, f64)> {
    let log = LossLog::resume(out, stage, step as u64)?;
    let table = read_loss_csv(log.path())?;
    let seconds = table
        .column("seconds")
        .and_then(|c| table.rows.last().map(|r| r.values[c]))
        .filter(|s| s.is_finite())
        .unwrap_or(0.0);
    Ok((log, seconds))
}

fn plot(out: &Path, observer: &mut dyn Observer) {
    if let Err(e) = plot_loss_csv(
        &out.join("loss.csv"),
        &out.join("loss.png"),
        &PlotOptions::default(),
    ) {
        observer.message(&format!("cannot plot the loss: {e}"));
    }
}

fn train_vae(
    recipe: &Recipe,
    out: &Path,
    dataset: ImageCaptionDataset,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<()> {
    let vae = AutoencoderKL::init(&recipe.vae, recipe.seed, device)?;
    let mut trainer = VaeTrainer::new(
        vae,
        recipe.models["vae"].clone(),
        dataset,
        recipe.vae_stage.clone(),
        device,
    )?;
    if let Some(checkpoint) = latest_checkpoint(out, "vae")? {
        trainer = trainer.resume(&checkpoint)?;
        observer.message(&format!("vae: resumed from `{}`", checkpoint.display()));
    }
    let (mut log, seconds) = log_for(out, "vae", trainer.steps())?;
    let clock = std::time::Instant::now();
    let total = recipe.vae_stage.max_steps;
    observer.stage("vae", trainer.steps(), total);
    while trainer.steps() < total {
        let lr = trainer.learning_rate();
        let loss = trainer.step()?;
        let elapsed = seconds + clock.elapsed().as_secs_f64();
        log.record(
            "vae",
            trainer.steps() as u64,
            &[f64::from(loss.total), lr, elapsed],
        )?;
        let flow = observer.step(f64::from(loss.total));
        let step = trainer.steps();
        if step.is_multiple_of(recipe.checkpoint_every) || step == total {
            trainer.save_checkpoint(&checkpoint_path(out, "vae", step))?;
            prune(out, "vae", recipe.checkpoints_kept)?;
            plot(out, observer);
        }
        if flow.is_break() {
            return Err(Error::Stopped { stage: "vae", step });
        }
    }
    let scaling = trainer.latent_scaling_factor(256, recipe.seed)?;
    let error = trainer.eval_reconstruction(64)?;
    observer.message(&format!(
        "vae: reconstruction error {error:.5} (mean squared, images in [-1, 1]); latent scaling factor {scaling:.5}"
    ));
    trainer.save(&out.join("vae"), Some(scaling))
}

fn train_denoiser(
    recipe: &Recipe,
    out: &Path,
    dataset: ImageCaptionDataset,
    device: &Device,
    observer: &mut dyn Observer,
) -> Result<PathBuf> {
    let train_device = Device::autodiff(device.clone());
    let vae = AutoencoderKL::from_pretrained(&out.join("vae"), DType::F32, device)?;
    let mut configs = recipe.models.clone();
    configs.insert(
        "vae".into(),
        kiln_nn::config::read_json(&out.join("vae/config.json"), "vae/config.json")?,
    );
    let components = Components {
        tokenizer: ClipTokenizer::embedded(&recipe.pad_token)?,
        tokenizer_files: TokenizerFiles::Embedded(recipe.pad_token.clone()),
        text_encoder: ClipTextModel::init(
            &recipe.text_encoder,
            recipe.seed.wrapping_add(2),
            device,
        ),
        vae,
        unet: UNet2DConditionModel::init(&recipe.unet, recipe.seed.wrapping_add(3), &train_device)?,
        configs,
    };
    let mut trainer =
        Trainer::from_components(components, dataset, recipe.denoiser_stage.clone(), device)?;
    if let Some(checkpoint) = latest_checkpoint(out, "denoiser")? {
        trainer = trainer.resume(&checkpoint)?;
        observer.message(&format!(
            "denoiser: resumed from `{}`",
            checkpoint.display()
        ));
    }
    let (mut log, seconds) = log_for(out, "denoiser", trainer.steps())?;
    let clock = std::time::Instant::now();
    let total = recipe.denoiser_stage.max_steps;
    observer.stage("denoiser", trainer.steps(), total);
    while trainer.steps() < total {
        let lr = trainer.learning_rate();
        let loss = trainer.step()?;
        let elapsed = seconds + clock.elapsed().as_secs_f64();
        log.record(
            "denoiser",
            trainer.steps() as u64,
            &[f64::from(loss), lr, elapsed],
        )?;
        let flow = observer.step(f64::from(loss));
        let step = trainer.steps();
        if step.is_multiple_of(recipe.checkpoint_every) || step == total {
            let checkpoint = checkpoint_path(out, "denoiser", step);
            trainer.save_checkpoint(&checkpoint)?;
            // a checkpoint is a usable model folder, with the recipe's generation defaults
            recipe.generation.write(&checkpoint)?;
            prune(out, "denoiser", recipe.checkpoints_kept)?;
            plot(out, observer);
        }
        if flow.is_break() {
            return Err(Error::Stopped {
                stage: "denoiser",
                step,
            });
        }
    }
    let model = out.join("model");
    trainer.save(&model)?;
    recipe.generation.write(&model)?;
    plot(out, observer);
    Ok(model)
}
