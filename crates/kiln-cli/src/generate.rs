//! `kiln generate`: txt2img, img2img and inpainting to PNG files.
//!
//! Everything the run needs is checked before the model loads where it can be (sampler name,
//! output files, input images); images are written only after the whole batch is done, each
//! through a temporary file, so a failed run leaves no output behind.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_nn::FloatKind;
use kiln_pipeline::{
    GenerateOptions, HiresFix, LatentUpscaler, LoadOptions, Mode, RgbImage, SingleFileOptions,
    StableDiffusionPipeline, StepProgress,
};
use kiln_scheduler::{
    PredictionType, SamplerName, SamplerOptions, Scheduler, SchedulerKind, SeededNoise,
};

use crate::png_io::{encode_png, luminance, read_image, resize};
use crate::write_atomic;

/// Arguments of `kiln generate`.
#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A diffusers model folder, a single-file SD 1.x/2.x or SDXL checkpoint (`.safetensors` or
    /// `.ckpt` with the original CompVis key names), or a Hugging Face repo id (`owner/name`)
    /// already in the local hub cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`; read
    /// offline).
    #[arg(long)]
    model: Option<String>,
    /// For a single-file checkpoint: a diffusers folder whose `unet/`, `vae/`, `text_encoder/`
    /// and `scheduler/` configs describe it (default: inferred from the tensor shapes).
    #[arg(long, value_name = "DIR")]
    config: Option<PathBuf>,
    /// Override the scheduler's prediction type: `epsilon` or `v_prediction` (single-file SD 2.x
    /// checkpoints default to v-prediction, as the 768 models; the 512 base models need `epsilon`).
    #[arg(long, value_name = "TYPE")]
    prediction_type: Option<String>,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// The negative prompt.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[command(flatten)]
    prompt_syntax: crate::PromptArgs,
    /// A LoRA file to fuse into the model, with its strength (default 1); repeatable. The
    /// prompt's `<lora:NAME:SCALE>` tags add more, from --lora-dir.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// The folder where `<lora:NAME:SCALE>` tags find `NAME.safetensors`.
    #[arg(long, value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// A textual-inversion embedding (`.safetensors`, the A1111 web UI's or diffusers' layout);
    /// its token is the file name, or TOKEN; repeatable. Use the token in the prompt or the
    /// negative prompt.
    #[arg(long, value_name = "FILE[:TOKEN]")]
    embedding: Vec<String>,
    /// Skip the keys of LoRA files that belong to no LoRA layer (they are listed) instead of
    /// failing on them.
    #[arg(long)]
    lora_allow_unknown_keys: bool,
    /// Denoising steps (default: the model folder's kiln.json, else 50).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale, <= 1 disables guidance (default: the model folder's
    /// kiln.json, else 7.5).
    #[arg(long)]
    guidance: Option<f64>,
    /// diffusers' guidance_rescale (0 to 1), for zero-terminal-SNR models.
    #[arg(long, default_value_t = 0.0)]
    guidance_rescale: f64,
    /// Image width in pixels (default: the model's, or the input image's).
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels (default: the model's, or the input image's).
    #[arg(long)]
    height: Option<usize>,
    /// Decode (and encode) the image in overlapping tiles of the VAE's own size, blended as
    /// diffusers' `enable_tiling()` does: memory bounded by one tile at any image size.
    #[arg(long)]
    vae_tiling: bool,
    /// Memory the run may use beyond the loaded weights, in GiB (default: what the system has
    /// available). A size whose estimate is larger is refused before anything is allocated.
    #[arg(long, value_name = "GIB")]
    max_memory: Option<f64>,
    /// Random seed (default: from the clock; written into the PNG metadata).
    #[arg(long)]
    seed: Option<u64>,
    /// Images to make (default 1, or the batch of `--latents`). Files are numbered
    /// `NAME-0.png`, `NAME-1.png`, ... when there is more than one.
    #[arg(long)]
    batch: Option<usize>,
    /// Sampler: ddpm, ddim, pndm, lms, euler, euler-a, heun, dpm2, dpm2-a, dpm++2m, dpm++2m-sde,
    /// dpm++2s, unipc, lcm (default: the model's own scheduler).
    #[arg(long)]
    scheduler: Option<String>,
    /// Karras sigmas (lms, euler, heun, dpm2, dpm2-a, dpm++2m, dpm++2m-sde, dpm++2s, unipc).
    #[arg(long)]
    karras: bool,
    /// A `.safetensors` file with one tensor `latents` [batch, 4, h, w] of unit variance: the
    /// initial noise (scaled by the scheduler's init_noise_sigma, as diffusers' `latents=`).
    #[arg(long)]
    latents: Option<PathBuf>,
    /// UNet and VAE precision: f32, f16 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Text-encoder layers to skip from the end (A1111's "Clip skip: 2" is 1).
    #[arg(long, default_value_t = 0)]
    clip_skip: usize,
    /// Input PNG for img2img, or the image to inpaint with `--mask`.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Inpainting mask PNG, the size of `--image` (white = repaint, black = keep).
    #[arg(long)]
    mask: Option<PathBuf>,
    /// Fraction of the schedule to run from the input image (default 0.8 for img2img, 1.0 for
    /// inpainting).
    #[arg(long)]
    strength: Option<f64>,
    /// An SDXL refiner (folder or hub repo id) that finishes what the SDXL base of --model
    /// starts: the base runs the first --refiner-switch of the schedule, the refiner the rest
    /// on the base's latents (diffusers' base + refiner ensemble).
    #[arg(long, value_name = "DIR")]
    refiner: Option<String>,
    /// Where the refiner takes over, as a fraction of the schedule (0 to 1, default 0.8).
    #[arg(long, value_name = "FRACTION", requires = "refiner")]
    refiner_switch: Option<f64>,
    /// The hires fix (A1111's "Hires. fix"): draw at --width x --height, enlarge the latents by
    /// this factor (at least 1) and redraw the detail with an img2img pass at the larger size.
    #[arg(long, value_name = "FACTOR")]
    hires_scale: Option<f64>,
    /// The hires pass's schedule in steps (default: --steps), of which the last
    /// --hires-denoise fraction runs.
    #[arg(long, value_name = "N", requires = "hires_scale")]
    hires_steps: Option<usize>,
    /// How much the hires pass redraws, in (0, 1] (its img2img strength; default 0.7).
    #[arg(long, value_name = "STRENGTH", requires = "hires_scale")]
    hires_denoise: Option<f64>,
    /// How the hires fix enlarges the latents: latent (bilinear), latent-nearest or
    /// latent-bicubic (default latent).
    #[arg(long, value_name = "NAME", requires = "hires_scale")]
    hires_upscaler: Option<String>,
    /// Another VAE in place of the model's (A1111's "SD VAE"): a diffusers VAE folder, a model
    /// folder, a weights file (`.safetensors` or `.ckpt`; the original LDM layout, as A1111's VAE
    /// files, or diffusers'), or a Hugging Face repo id in the local cache. A file keeps the model's
    /// scaling factor; a folder brings its own.
    #[arg(long, value_name = "PATH")]
    vae: Option<String>,
    /// Output PNG file.
    #[arg(long)]
    output: PathBuf,
    /// Replace existing output files.
    #[arg(long)]
    overwrite: bool,
}

/// Runs `kiln generate`.
pub fn run(args: GenerateArgs, device: impl FnOnce() -> Result<Device>) -> Result<()> {
    // 1. everything that can be checked without the model
    let sampler = args
        .scheduler
        .as_deref()
        .map(str::parse::<SamplerName>)
        .transpose()?;
    let dtype: FloatKind = args.dtype.parse()?;
    if args.mask.is_some() && args.image.is_none() {
        bail!("--mask needs --image (the picture to inpaint)");
    }
    if args.strength.is_some() && args.image.is_none() {
        bail!("--strength needs --image (img2img or inpainting)");
    }
    let is_png = args
        .output
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if !is_png {
        bail!(
            "--output must name a .png file, got `{}`",
            args.output.display()
        );
    }
    let prediction_type = args
        .prediction_type
        .as_deref()
        .map(parse_prediction_type)
        .transpose()?;
    let switch = args.refiner_switch.unwrap_or(0.8);
    if args.refiner.is_some() && !(switch > 0.0 && switch < 1.0) {
        bail!("--refiner-switch {switch} must be between 0 and 1");
    }
    if args.refiner.is_some() && args.mask.is_some() {
        bail!("--refiner is for txt2img and img2img; inpaint with the base alone");
    }
    if args.hires_scale.is_some() && args.image.is_some() {
        bail!(
            "--hires-scale is for txt2img; to enlarge an image, run img2img at the larger --width and --height"
        );
    }
    if args.hires_scale.is_some() && args.refiner.is_some() {
        bail!("--hires-scale and --refiner cannot be combined; use one of them");
    }
    let hires_upscaler = args
        .hires_upscaler
        .as_deref()
        .map(str::parse::<LatentUpscaler>)
        .transpose()?
        .unwrap_or_default();
    let model_dir = resolve_model(args.model.as_deref())?;
    let refiner_dir = args
        .refiner
        .as_deref()
        .map(|r| resolve_model(Some(r)))
        .transpose()?;
    let vae_path = args.vae.as_deref().map(resolve_vae).transpose()?;
    let single_file = model_dir.is_file();
    if args.config.is_some() && !single_file {
        bail!(
            "--config is for single-file checkpoints; `{}` is a model folder with its own configs",
            model_dir.display()
        );
    }
    let device = device()?;
    let latents = args
        .latents
        .as_deref()
        .map(|p| read_latents(p, &device))
        .transpose()?;
    let batch = match (args.batch, &latents) {
        (Some(b), _) => b,
        (None, Some(l)) => l.dims()[0],
        (None, None) => 1,
    };
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let outputs = output_paths(&args.output, batch);
    for path in &outputs {
        crate::check_output(path, args.overwrite)?;
    }
    let ([prompt, negative_prompt], loras) = crate::loras::collect(
        &args.lora,
        args.lora_dir.as_deref(),
        [&args.prompt, &args.negative_prompt],
    )?;
    let image = args.image.as_deref().map(read_image).transpose()?;
    let mask = args.mask.as_deref().map(read_image).transpose()?;
    if let (Some(image), Some(mask)) = (&image, &mask)
        && (image.width, image.height) != (mask.width, mask.height)
    {
        bail!(
            "the mask is {}x{}, the image {}x{}: they must be the same size",
            mask.width,
            mask.height,
            image.width,
            image.height
        );
    }

    // 2. the model
    let started = Instant::now();
    let load = ModelLoad {
        dtype,
        config: args.config.clone(),
        prediction_type,
    };
    let mut pipe = load_pipeline(&model_dir, &load, &device)?;
    if pipe.is_sdxl_refiner() && image.is_none() {
        bail!(
            "`{}` is an SDXL refiner: it refines an image (--image) or, given as --refiner, what an \
             SDXL base makes; it cannot start from noise",
            model_dir.display()
        );
    }
    let refiner = match &refiner_dir {
        Some(dir) => {
            if !pipe.is_sdxl() {
                bail!(
                    "--refiner needs an SDXL base as --model; `{}` is not SDXL",
                    model_dir.display()
                );
            }
            let mut refiner = load_pipeline(dir, &load, &device)?;
            if !refiner.is_sdxl() {
                bail!("the refiner `{}` is not an SDXL model", dir.display());
            }
            // the refiner decodes the ensemble's image: it takes the VAE too
            if let Some(vae) = &vae_path {
                load_vae(&mut refiner, vae)?;
            }
            Some(refiner)
        }
        None => None,
    };
    if let Some(vae) = &vae_path {
        load_vae(&mut pipe, vae)?;
    }
    let embeddings = crate::loras::load_embeddings(&mut pipe, &args.embedding)?;
    crate::loras::apply(&mut pipe, &loras, args.lora_allow_unknown_keys)?;
    let options_sampler = SamplerOptions {
        karras: args.karras,
        eta: 0.0,
    };
    let mut scheduler = pipe.scheduler(sampler, options_sampler)?;
    let sampler_label = a1111_sampler(scheduler.config().kind, sampler, args.karras);

    // 3. the request. The output size defaults to the input image's, rounded down to what the
    // model takes; an input image of another size is resized to it (Lanczos), as diffusers'
    // image processor does.
    let multiple = pipe.size_multiple();
    let (default_w, default_h) = match &image {
        Some(image) => (
            image.width - image.width % multiple,
            image.height - image.height % multiple,
        ),
        None => pipe.default_size(),
    };
    let (width, height) = (
        args.width.unwrap_or(default_w),
        args.height.unwrap_or(default_h),
    );
    let fit = |img: Option<RgbImage>, what: &str| -> Result<Option<RgbImage>> {
        match img {
            Some(img) if (img.width, img.height) != (width, height) && width > 0 && height > 0 => {
                eprintln!(
                    "resized the input {what} from {}x{} to {width}x{height}",
                    img.width, img.height
                );
                Ok(Some(resize(&img, width, height)?))
            }
            other => Ok(other),
        }
    };
    let image = fit(image, "image")?;
    let mask = fit(mask, "mask")?;
    let (mode, strength) = match (&image, &mask) {
        (Some(image), mask) => {
            let tensor = kiln_pipeline::rgb8_to_tensor(image, &device)?;
            match mask {
                Some(mask) => {
                    let values = luminance(mask);
                    let m = Tensor::<4>::from_data(
                        TensorData::new(values, [1, 1, mask.height, mask.width]),
                        &device,
                    );
                    let strength = args.strength.unwrap_or(1.0);
                    let mode = Mode::Inpaint {
                        image: tensor,
                        mask: m,
                        strength,
                    };
                    (mode, Some(strength))
                }
                None => {
                    let strength = args.strength.unwrap_or(0.8);
                    let mode = Mode::Img2Img {
                        image: tensor,
                        strength,
                    };
                    (mode, Some(strength))
                }
            }
        }
        (None, _) => (Mode::Txt2Img, None),
    };
    let seed = args.seed.unwrap_or_else(clock_seed);
    let steps = args.steps.unwrap_or(pipe.generation.steps);
    let guidance = args.guidance.unwrap_or(pipe.generation.guidance_scale);
    let mut options = GenerateOptions::new(&prompt)
        .with_negative_prompt(&negative_prompt)
        .with_guidance_scale(guidance)
        .with_guidance_rescale(args.guidance_rescale)
        .with_num_images(batch)
        .with_size(width, height)
        .with_steps(steps)
        .with_clip_skip(args.clip_skip)
        .with_prompt_syntax(args.prompt_syntax.syntax())
        .with_mode(mode);
    if let Some(latents) = latents {
        options = options.with_latents(latents);
    }
    if args.vae_tiling {
        options = options.with_vae_tiling(kiln_vae::TilingOptions::from_config(&pipe.vae.config));
    }
    if let Some(gib) = args.max_memory {
        if gib.is_nan() || gib <= 0.0 {
            bail!("--max-memory {gib} must be a positive number of GiB");
        }
        options =
            options.with_memory_limit((gib * (1u64 << 30) as f64).min(u64::MAX as f64) as u64);
    }

    let hires = match args.hires_scale {
        Some(scale) => {
            let mut hires = HiresFix::scaled(width, height, scale, multiple)?;
            hires.upscaler = hires_upscaler;
            hires.steps = args.hires_steps;
            if let Some(denoise) = args.hires_denoise {
                hires.denoise = denoise;
            }
            Some(hires)
        }
        None => None,
    };

    // 4. the run, with a progress bar on stderr, drawn from the start and ticking through
    // long steps (a large image's first step, its decode) so that the elapsed time shows
    let bar = ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stderr());
    let style = |template: &str| -> Result<ProgressStyle> {
        Ok(ProgressStyle::with_template(template)
            .context("progress bar template")?
            .progress_chars("=> "))
    };
    // no rate or ETA until a step has been timed
    bar.set_style(style("{spinner} [{bar:30}] {pos}/{len} steps ({elapsed})")?);
    let timed =
        style("{spinner} [{bar:30}] {pos}/{len} steps, {per_sec}, ETA {eta} ({elapsed}) {msg}")?;
    bar.enable_steady_tick(std::time::Duration::from_millis(250));
    // passes of the run (a hires fix or a refiner adds one), each starting at step 0
    let passes = if hires.is_some() || refiner.is_some() {
        2
    } else {
        1
    };
    let mut pass = 0;
    let mut on_step = |p: &StepProgress<'_>| {
        if p.step == 0 {
            bar.set_style(timed.clone());
            pass += 1;
        }
        bar.set_length(p.total as u64);
        bar.set_position(p.step as u64 + 1);
        let last = p.step + 1 == p.total && pass == passes;
        bar.set_message(match (last, passes) {
            (true, _) => "decoding".to_string(),
            (false, 1) => String::new(),
            (false, _) => format!("pass {pass} of {passes}"),
        });
        std::ops::ControlFlow::Continue(())
    };
    let mut noise = SeededNoise::new(seed);
    let result = match (&refiner, &hires) {
        (None, Some(hires)) => pipe.generate_hires(
            &mut scheduler,
            &options,
            hires,
            &mut noise,
            Some(&mut on_step),
        ),
        (None, None) => pipe.generate(&mut scheduler, &options, &mut noise, Some(&mut on_step)),
        // the ensemble: the base to the switch point, the refiner from there on its latents
        (Some(refiner), _) => pipe
            .generate_latents(
                &mut scheduler,
                &options.clone().with_denoising_range(Some(switch), None),
                &mut noise,
                Some(&mut on_step),
            )
            .and_then(|latents| {
                let mut refiner_scheduler = refiner.scheduler(sampler, options_sampler)?;
                let refine = options
                    .clone()
                    .with_mode(Mode::Img2Img {
                        image: latents,
                        strength: 1.0,
                    })
                    .with_denoising_range(None, Some(switch));
                refiner.generate(
                    &mut refiner_scheduler,
                    &refine,
                    &mut noise,
                    Some(&mut on_step),
                )
            }),
    };
    // cleared before anything else is printed, an error included
    bar.finish_and_clear();
    let out = match result {
        Ok(out) => out,
        Err(e @ kiln_pipeline::Error::InsufficientMemory { .. }) => {
            bail!("{e} (--vae-tiling bounds the decode; --max-memory GIB sets the limit)")
        }
        Err(e) => return Err(e.into()),
    };

    // 5. encode every PNG, then write them all
    let images = out.to_rgb8()?;
    let model_name = model_label(args.model.as_deref(), &model_dir);
    // the prompt as given, with `--lora` files as tags, so that it reproduces the image
    let mut written_prompt = args.prompt.clone();
    for r in loras.iter().filter(|r| !r.from_prompt) {
        written_prompt.push_str(&format!(" <lora:{}:{}>", r.name, r.scale));
    }
    let lora_hashes = crate::loras::hashes(&loras)?;
    let ti_hashes = crate::loras::embedding_hashes(&embeddings)?;
    let vae = match (&args.vae, &vae_path) {
        (Some(spec), Some(path)) => Some(vae_label(spec, path)?),
        _ => None,
    };
    let mut encoded = Vec::new();
    for (i, image) in images.iter().enumerate() {
        let params = Parameters {
            prompt: &written_prompt,
            negative_prompt: &args.negative_prompt,
            lora_hashes: &lora_hashes,
            ti_hashes: &ti_hashes,
            vae: vae.as_ref(),
            steps,
            sampler: &sampler_label,
            guidance,
            seed,
            width,
            height,
            model: &model_name,
            strength: strength.or(hires.as_ref().map(|h| h.denoise)),
            hires: hires.as_ref().zip(args.hires_scale),
            clip_skip: args.clip_skip,
            batch: (batch, i),
            refiner: refiner_dir
                .as_ref()
                .map(|dir| (model_label(args.refiner.as_deref(), dir), switch)),
        };
        encoded.push(encode_png(image, &params.to_string())?);
    }
    for (path, bytes) in outputs.iter().zip(&encoded) {
        write_atomic(path, bytes)?;
        eprintln!("wrote {}", path.display());
    }
    eprintln!(
        "{} image(s), seed {seed}, in {:.1} s",
        images.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// How [`load_pipeline`] reads a model: what `kiln generate` and `kiln eval` share.
#[derive(Debug, Clone, Default)]
pub struct ModelLoad {
    /// UNet and VAE precision.
    pub dtype: FloatKind,
    /// For a single-file checkpoint: the diffusers folder whose configs describe it.
    pub config: Option<PathBuf>,
    /// Overrides the scheduler's prediction type.
    pub prediction_type: Option<PredictionType>,
}

/// Loads a diffusers folder or (when `model` is a file) a single-file checkpoint.
pub fn load_pipeline(
    model: &Path,
    load: &ModelLoad,
    device: &Device,
) -> Result<StableDiffusionPipeline> {
    let mut pipe = if model.is_file() {
        let options = SingleFileOptions {
            dtype: load.dtype,
            config: load.config.clone(),
            prediction_type: load.prediction_type,
        };
        StableDiffusionPipeline::from_single_file(model, &options, device)
    } else {
        StableDiffusionPipeline::from_pretrained(model, LoadOptions { dtype: load.dtype }, device)
    }
    .with_context(|| format!("cannot load the model `{}`", model.display()))?;
    if let Some(prediction) = load.prediction_type {
        pipe.scheduler_config.prediction_type = prediction;
    }
    Ok(pipe)
}

/// A model folder, or a repo id looked up in the local Hugging Face cache.
pub fn resolve_model(spec: Option<&str>) -> Result<PathBuf> {
    let Some(spec) = spec else {
        // the default model compiled into Kiln, written out once as a folder
        return kiln_pipeline::embedded::folder().context("cannot write out the embedded model");
    };
    resolve(
        spec,
        "model",
        "a diffusers folder, a .safetensors checkpoint or a Hugging Face repo id",
        &["model_index.json"],
    )
}

/// `--vae`: a folder or file, or a repo id (a VAE's own, or a whole model's) in the local
/// Hugging Face cache.
fn resolve_vae(spec: &str) -> Result<PathBuf> {
    resolve(
        spec,
        "VAE",
        "a diffusers VAE folder, a model folder, a weights file or a Hugging Face repo id",
        &["config.json", "model_index.json"],
    )
}

/// `spec` as a path that exists, else as a repo id whose snapshot in the local Hugging Face
/// cache holds the first of `markers` (its folder is returned); `what` and `expected` word the
/// errors.
fn resolve(spec: &str, what: &str, expected: &str, markers: &[&str]) -> Result<PathBuf> {
    let path = Path::new(spec);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    let parts: Vec<&str> = spec.split('/').collect();
    let looks_like_repo = parts.len() == 2
        && parts
            .iter()
            .all(|p| !p.is_empty() && !p.starts_with('.') && !p.contains('\\'));
    if !looks_like_repo {
        bail!("{what} `{spec}` does not exist (expected {expected})");
    }
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(spec.to_string());
    match markers.iter().find_map(|m| repo.get(m)) {
        Some(marker) => marker
            .parent()
            .map(Path::to_path_buf)
            .context("the hub cache returned a file without a folder"),
        None => bail!(
            "`{spec}` is neither a path nor a {what} in the Hugging Face cache at `{}` (Kiln reads the cache offline; download it first, e.g. `huggingface-cli download {spec}`)",
            cache.path().display()
        ),
    }
}

/// Swaps `pipe`'s VAE for the one at `path`, saying which on stderr.
fn load_vae(pipe: &mut StableDiffusionPipeline, path: &Path) -> Result<()> {
    pipe.load_vae(path)
        .with_context(|| format!("cannot load the VAE `{}`", path.display()))?;
    eprintln!("VAE `{}`", path.display());
    Ok(())
}

/// The `VAE` entry of the PNG parameters and, for a file, its `VAE hash` (as A1111 writes them:
/// the file's name, and the first 10 hex digits of the SHA-256 of the whole file).
fn vae_label(spec: &str, path: &Path) -> Result<(String, Option<String>)> {
    if !path.is_file() {
        return Ok((model_label(Some(spec), path), None));
    }
    let hash = crate::loras::sha256_hex(path, false, 10)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| spec.to_string());
    Ok((name, Some(hash)))
}

/// `epsilon`, `v_prediction` or `sample`, as diffusers' configs write them.
pub fn parse_prediction_type(text: &str) -> Result<PredictionType> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|_| {
        anyhow::anyhow!("unknown --prediction-type `{text}`: use epsilon, v_prediction or sample")
    })
}

/// The model name for the metadata: the repo id, the checkpoint's file stem, or the folder's name.
pub fn model_label(spec: Option<&str>, dir: &Path) -> String {
    match spec {
        None => kiln_pipeline::embedded::NAME.to_string(),
        Some(s) if !Path::new(s).exists() => s.to_string(),
        _ if dir.is_file() => dir
            .file_stem()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| dir.display().to_string()),
        _ => dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| dir.display().to_string()),
    }
}

/// `out.png` for one image; `out-0.png`, `out-1.png`, ... for several.
pub fn output_paths(output: &Path, batch: usize) -> Vec<PathBuf> {
    if batch == 1 {
        return vec![output.to_path_buf()];
    }
    let stem = output
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = output
        .extension()
        .map(|e| e.to_string_lossy().into_owned())
        .unwrap_or_else(|| "png".into());
    (0..batch)
        .map(|i| output.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

/// Reads the one tensor `latents` of a safetensors file as f32 `[b, c, h, w]`.
fn read_latents(path: &Path, device: &Device) -> Result<Tensor<4>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("`{}` is not a safetensors file", path.display()))?;
    let view = file
        .tensor("latents")
        .with_context(|| format!("`{}` has no tensor named `latents`", path.display()))?;
    let shape = view.shape().to_vec();
    let Ok(shape4) = <[usize; 4]>::try_from(shape.as_slice()) else {
        bail!(
            "`latents` in `{}` has shape {shape:?}; expected [batch, 4, height / 8, width / 8]",
            path.display()
        );
    };
    let raw = view.data();
    let values: Vec<f32> = match view.dtype() {
        safetensors::Dtype::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        other => bail!(
            "`latents` in `{}` is {other:?}; Kiln reads f32 latents",
            path.display()
        ),
    };
    Ok(Tensor::from_data(TensorData::new(values, shape4), device))
}

fn clock_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    (nanos as u64) % 4_294_967_296
}

/// The A1111 / civitai sampler label.
fn a1111_sampler(kind: SchedulerKind, name: Option<SamplerName>, karras: bool) -> String {
    let name = name.unwrap_or_else(|| {
        SamplerName::ALL
            .into_iter()
            .find(|n| n.kind() == kind)
            .unwrap_or(SamplerName::Pndm)
    });
    let base = match name {
        SamplerName::Ddpm => "DDPM",
        SamplerName::Ddim => "DDIM",
        SamplerName::Pndm => "PLMS",
        SamplerName::Lms => "LMS",
        SamplerName::Euler => "Euler",
        SamplerName::EulerA => "Euler a",
        SamplerName::Heun => "Heun",
        SamplerName::Dpm2 => "DPM2",
        SamplerName::Dpm2A => "DPM2 a",
        SamplerName::DpmPp2m => "DPM++ 2M",
        SamplerName::DpmPp2mSde => "DPM++ 2M SDE",
        SamplerName::DpmPp2s => "DPM++ 2S",
        SamplerName::UniPc => "UniPC",
        SamplerName::Lcm => "LCM",
    };
    if karras {
        format!("{base} Karras")
    } else {
        base.to_string()
    }
}

/// The `parameters` text A1111 writes and civitai reads.
struct Parameters<'a> {
    prompt: &'a str,
    negative_prompt: &'a str,
    steps: usize,
    sampler: &'a str,
    guidance: f64,
    seed: u64,
    width: usize,
    height: usize,
    model: &'a str,
    strength: Option<f64>,
    clip_skip: usize,
    batch: (usize, usize),
    /// `name: hash, ...` of the LoRAs used (empty: none).
    lora_hashes: &'a str,
    /// `token: hash, ...` of the textual-inversion embeddings loaded (empty: none).
    ti_hashes: &'a str,
    /// The hires fix and its scale.
    hires: Option<(&'a HiresFix, f64)>,
    /// The `--vae` and, for a file, its hash.
    vae: Option<&'a (String, Option<String>)>,
    /// The SDXL refiner's name and switch point.
    refiner: Option<(String, f64)>,
}

impl std::fmt::Display for Parameters<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.prompt)?;
        if !self.negative_prompt.is_empty() {
            writeln!(f, "Negative prompt: {}", self.negative_prompt)?;
        }
        write!(
            f,
            "Steps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps, self.sampler, self.guidance, self.seed, self.width, self.height, self.model
        )?;
        if let Some((name, hash)) = self.vae {
            if let Some(hash) = hash {
                write!(f, ", VAE hash: {hash}")?;
            }
            write!(f, ", VAE: {name}")?;
        }
        if let Some(s) = self.strength {
            write!(f, ", Denoising strength: {s}")?;
        }
        if self.clip_skip > 0 {
            write!(f, ", Clip skip: {}", self.clip_skip + 1)?;
        }
        if let Some((hires, scale)) = self.hires {
            write!(f, ", Hires upscale: {scale}")?;
            if let Some(steps) = hires.steps {
                write!(f, ", Hires steps: {steps}")?;
            }
            write!(f, ", Hires upscaler: {}", hires.upscaler.web_ui_name())?;
        }
        if !self.lora_hashes.is_empty() {
            write!(f, ", Lora hashes: \"{}\"", self.lora_hashes)?;
        }
        if !self.ti_hashes.is_empty() {
            write!(f, ", TI hashes: \"{}\"", self.ti_hashes)?;
        }
        if let Some((name, switch)) = &self.refiner {
            write!(f, ", Refiner: {name}, Refiner switch at: {switch}")?;
        }
        if self.batch.0 > 1 {
            write!(
                f,
                ", Batch size: {}, Batch pos: {}",
                self.batch.0, self.batch.1
            )?;
        }
        write!(f, ", Version: kiln {}", env!("CARGO_PKG_VERSION"))
    }
}
