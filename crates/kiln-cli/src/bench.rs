//! `kiln bench`: times one workload (a UNet forward, a VAE decode or encode, the text encoder, a
//! whole generation) on a preset's shapes with random weights or on a model folder, and prints
//! one JSON object as the last line of stdout (progress goes to stderr).
//!
//! Speed does not depend on the weights' values, so the presets measure SD 1.5 and 2.1 without
//! their files. The FLOP counts are PyTorch's `FlopCounterMode` rules (`kiln_nn::flops`), so
//! `gflops_per_s` compares with PyTorch's own figures; docs/performance.md has the side-by-side
//! runs.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Distribution, Tensor, TensorData};
use clap::{Args, ValueEnum};
use kiln_clip::ClipTextModel;
use kiln_nn::FloatKind;
use kiln_pipeline::{GenerateOptions, LoadOptions, ModelConfigs, Preset, StableDiffusionPipeline};
use kiln_scheduler::{NoiseSource, SamplerOptions, SeededNoise};
use kiln_unet::UNet2DConditionModel;
use kiln_vae::AutoencoderKL;

/// What `kiln bench` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// One UNet forward on `batch` latents (2 is one classifier-free-guidance step).
    Unet,
    /// One VAE decode of `batch` latents to `height x width` images (untiled).
    VaeDecode,
    /// One VAE encode of `batch` `height x width` images (untiled).
    VaeEncode,
    /// The text encoder on `batch` prompts of 77 tokens.
    TextEncoder,
    /// A whole txt2img generation of `batch` images: the text encoder, `steps` UNet steps with
    /// classifier-free guidance, the VAE decode.
    Pipeline,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::VaeDecode => "vae-decode",
            Self::VaeEncode => "vae-encode",
            Self::TextEncoder => "text-encoder",
            Self::Pipeline => "pipeline",
        }
    }
}

/// `kiln bench` options.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// What to time.
    #[arg(value_enum)]
    workload: Workload,
    /// Model shapes with random weights: sd15, sd21, sdxl or tiny (the embedded model's shapes).
    #[arg(long, conflicts_with = "model", default_value = "sd15")]
    preset: String,
    /// A diffusers model folder to time instead of a preset (its weights are loaded).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Batch size (default: 2 for `unet`, as one guided step runs it; 1 otherwise).
    #[arg(long)]
    batch: Option<usize>,
    /// Image height in pixels (default: the model's size).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels (default: the model's size).
    #[arg(long)]
    width: Option<usize>,
    /// Denoising steps of the `pipeline` workload.
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Untimed runs first (the first run also materialises lazily built weights).
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Timed runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Weights' and activations' precision: f32, f16 or bf16 (the text encoder stays f32).
    #[arg(long, default_value = "f32")]
    dtype: FloatKind,
    /// Seed of the inputs (and of the pipeline's random weights).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also time each call of the linear layers, convolutions, attention, GroupNorms and
    /// activations over the timed runs, and print the time by kind of op and by shape (stderr;
    /// the JSON gets a `profile` object). CPU devices only (flex, ndarray), where an op has
    /// finished when it returns.
    #[arg(long)]
    profile: bool,
}

/// Where the models come from.
enum Source {
    Preset(Preset),
    Folder(PathBuf),
}

impl Source {
    fn name(&self) -> String {
        match self {
            Self::Preset(p) => p.name().to_string(),
            Self::Folder(dir) => dir.display().to_string(),
        }
    }

    fn configs(&self) -> Result<ModelConfigs> {
        Ok(match self {
            Self::Preset(p) => p.configs()?,
            Self::Folder(dir) => ModelConfigs::from_dir(dir)?,
        })
    }

    fn unet(
        &self,
        configs: &ModelConfigs,
        dtype: FloatKind,
        device: &Device,
    ) -> Result<UNet2DConditionModel> {
        Ok(match self {
            // weights built lazily by burn's initialisers: their values do not change the speed
            Self::Preset(_) => kiln_nn::precision::cast_params(
                UNet2DConditionModel::new(&configs.unet, device)?,
                dtype.dtype(),
            ),
            Self::Folder(dir) => {
                UNet2DConditionModel::from_pretrained(&dir.join("unet"), dtype.dtype(), device)?
            }
        })
    }

    fn vae(
        &self,
        configs: &ModelConfigs,
        dtype: FloatKind,
        device: &Device,
    ) -> Result<AutoencoderKL> {
        Ok(match self {
            Self::Preset(_) => kiln_nn::precision::cast_params(
                AutoencoderKL::new(&configs.vae, device)?,
                dtype.dtype(),
            ),
            Self::Folder(dir) => {
                AutoencoderKL::from_pretrained(&dir.join("vae"), dtype.dtype(), device)?
            }
        })
    }

    fn text_encoder(&self, configs: &ModelConfigs, device: &Device) -> Result<ClipTextModel> {
        Ok(match self {
            Self::Preset(_) => ClipTextModel::new(&configs.text_encoder, device),
            Self::Folder(dir) => ClipTextModel::from_dir(dir.join("text_encoder"), device)?,
        })
    }

    fn pipeline(
        &self,
        dtype: FloatKind,
        seed: u64,
        device: &Device,
    ) -> Result<StableDiffusionPipeline> {
        let options = LoadOptions { dtype };
        Ok(match self {
            Self::Preset(p) => StableDiffusionPipeline::random(*p, options, seed, device)?,
            Self::Folder(dir) => StableDiffusionPipeline::from_pretrained(dir, options, device)?,
        })
    }
}

/// One prepared workload: a closure that runs it once and waits for the result.
type Run<'a> = Box<dyn FnMut() -> Result<()> + 'a>;

/// Runs `kiln bench`.
pub fn run(args: BenchArgs, device: impl FnOnce() -> Result<Device>) -> Result<()> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let source = match &args.model {
        Some(dir) => {
            kiln_nn::config::require_dir(dir, "model folder")?;
            Source::Folder(dir.clone())
        }
        None => Source::Preset(args.preset.parse()?),
    };
    let device = device()?;
    if args.profile && !kiln_nn::device::runs_synchronously(&device) {
        bail!(
            "--profile times each op until it returns, which is the time of its work only on CPU \
             devices (flex, ndarray); {} returns an op's tensor before computing it",
            device_name(&device)
        );
    }
    let configs = source
        .configs()
        .context("cannot read the model's configs")?;
    let f = 1usize << configs.vae.block_out_channels.len().saturating_sub(1);
    let (default_h, default_w) = match configs.unet.sample_size {
        Some(kiln_unet::unet_2d_condition::SampleSize::Square(s)) => (s * f, s * f),
        Some(kiln_unet::unet_2d_condition::SampleSize::Rect([h, w])) => (h * f, w * f),
        None => (512, 512),
    };
    let height = args.height.unwrap_or(default_h);
    let width = args.width.unwrap_or(default_w);
    if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
        bail!(
            "--height and --width must be positive multiples of the VAE's factor {f} (got {height}x{width})"
        );
    }
    let batch = args.batch.unwrap_or(match args.workload {
        Workload::Unet => 2,
        _ => 1,
    });
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let (lh, lw) = (height / f, width / f);
    let tokens = 77;
    eprintln!(
        "kiln bench {} on {} ({}, {:?}): batch {batch}, {width}x{height}, {} thread(s)",
        args.workload.name(),
        source.name(),
        device_name(&device),
        args.dtype,
        threads()
    );
    let mut noise = SeededNoise::new(args.seed);
    let normal = |dims: [usize; 4], noise: &mut SeededNoise| -> Result<Tensor<4>> {
        Ok(noise.noise(dims, &device)?)
    };
    let load = Instant::now();
    let (flops, mut work): (u64, Run<'_>) = match args.workload {
        Workload::Unet => {
            let unet = source.unet(&configs, args.dtype, &device)?;
            let flops = unet.flops(batch, lh, lw, tokens);
            let sample =
                normal([batch, configs.unet.in_channels, lh, lw], &mut noise)?.cast(unet.dtype());
            let text_width: usize = configs.text_configs().iter().map(|c| c.hidden_size).sum();
            let context = Tensor::<3>::random(
                [batch, tokens, text_width],
                Distribution::Normal(0.0, 1.0),
                &device,
            )
            .cast(unet.dtype());
            let t =
                Tensor::<1>::from_data(TensorData::new(vec![500.0f32; batch], [batch]), &device);
            // SDXL: a pooled embedding and the base's six time ids (or the refiner's five); an
            // LCM UNet: its guidance embedding
            let added = configs.unet.text_time().map(|(dim, input)| {
                let pooled = configs
                    .text_configs()
                    .last()
                    .map_or(0, |c| c.projection_dim);
                let ids = input.saturating_sub(pooled) / dim.max(1);
                let time_ids: Vec<f32> = [height, width, 0, 0, height, width]
                    .iter()
                    .map(|&v| v as f32)
                    .take(ids)
                    .cycle()
                    .take(ids * batch)
                    .collect();
                kiln_pipeline::AddedConditioning {
                    text_embeds: Tensor::<2>::random(
                        [batch, pooled],
                        Distribution::Normal(0.0, 1.0),
                        &device,
                    ),
                    time_ids: Tensor::<2>::from_data(
                        TensorData::new(time_ids, [batch, ids]),
                        &device,
                    ),
                }
            });
            let timestep_cond = configs
                .unet
                .time_cond_proj_dim
                .map(|dim| kiln_unet::guidance_scale_embedding(&vec![7.0; batch], dim, &device));
            let extra = kiln_unet::ExtraConditioning {
                added,
                timestep_cond,
            };
            (
                flops,
                Box::new(move || {
                    let out =
                        unet.forward_with(sample.clone(), t.clone(), context.clone(), &extra)?;
                    wait(out)
                }),
            )
        }
        Workload::VaeDecode => {
            let vae = source.vae(&configs, args.dtype, &device)?;
            let flops = vae.decode_flops(batch, lh, lw);
            let z = normal([batch, configs.vae.latent_channels, lh, lw], &mut noise)?
                .cast(args.dtype.dtype());
            (flops, Box::new(move || wait(vae.decode(z.clone(), None)?)))
        }
        Workload::VaeEncode => {
            let vae = source.vae(&configs, args.dtype, &device)?;
            let flops = vae.encode_flops(batch, height, width);
            let x = normal([batch, configs.vae.in_channels, height, width], &mut noise)?
                .cast(args.dtype.dtype());
            (
                flops,
                Box::new(move || wait(vae.encode(x.clone(), None)?.mean)),
            )
        }
        Workload::TextEncoder => {
            let model = source.text_encoder(&configs, &device)?;
            let flops = model.flops(batch, tokens);
            let ids: Vec<Vec<u32>> = (0..batch)
                .map(|b| {
                    (0..tokens as u32)
                        .map(|i| (i * 131 + b as u32 * 7) % 49000 + 1)
                        .collect()
                })
                .collect();
            let on = device.clone();
            (
                flops,
                Box::new(move || {
                    let out = model.encode_ids(&ids, 0, &on)?;
                    wait(out.hidden_state)
                }),
            )
        }
        Workload::Pipeline => {
            let pipe = source.pipeline(args.dtype, args.seed, &device)?;
            let guided = 2; // classifier-free guidance: the UNet runs on both halves
            // the prompt and the negative prompt are encoded once each, whatever the batch
            let text: u64 = pipe
                .text_encoders()
                .iter()
                .map(|(_, e)| e.flops(1, tokens))
                .sum();
            let flops = 2 * text
                + args.steps as u64 * pipe.unet.flops(guided * batch, lh, lw, tokens)
                + pipe.vae.decode_flops(batch, lh, lw);
            let options = GenerateOptions::new("a photo of an astronaut riding a horse on mars")
                .with_negative_prompt("blurry")
                .with_guidance_scale(7.5)
                .with_steps(args.steps)
                .with_size(width, height)
                .with_num_images(batch);
            let seed = args.seed;
            (
                flops,
                Box::new(move || {
                    let mut scheduler = pipe.scheduler(None, SamplerOptions::default())?;
                    let out =
                        pipe.generate(&mut scheduler, &options, &mut SeededNoise::new(seed), None)?;
                    wait(out.images)
                }),
            )
        }
    };
    eprintln!("built in {:.2} s", load.elapsed().as_secs_f64());
    for i in 0..args.warmup {
        let start = Instant::now();
        work()?;
        eprintln!(
            "warm-up {}/{}: {:.3} s",
            i + 1,
            args.warmup,
            start.elapsed().as_secs_f64()
        );
    }
    let mut timed_runs = || -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(args.runs);
        for i in 0..args.runs {
            let start = Instant::now();
            work()?;
            let s = start.elapsed().as_secs_f64();
            eprintln!("run {}/{}: {s:.3} s", i + 1, args.runs);
            times.push(s);
        }
        Ok(times)
    };
    let (times, profile) = if args.profile {
        let (times, profile) = kiln_nn::profile::profile(timed_runs);
        (times?, Some(profile))
    } else {
        (timed_runs()?, None)
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    let mut report = serde_json::json!({
        "workload": args.workload.name(),
        "model": source.name(),
        "device": device_name(&device),
        "dtype": format!("{:?}", args.dtype).to_lowercase(),
        "batch": batch,
        "height": height,
        "width": width,
        "steps": (args.workload == Workload::Pipeline).then_some(args.steps),
        "warmup": args.warmup,
        "runs": args.runs,
        "times_s": times,
        "median_s": median,
        "min_s": sorted[0],
        "max_s": sorted[n - 1],
        "flops": flops,
        "gflops_per_s": flops as f64 / median / 1e9,
        "peak_rss_bytes": peak_rss_bytes(),
        "threads": threads(),
        "cpu": cpu_name(),
        "simd": simd_features(),
        "bf16_products": bf16_products(),
    });
    if let Some(profile) = profile {
        let total: f64 = times.iter().sum();
        print_profile(&profile, total, args.runs);
        report["profile"] = profile_json(&profile, total);
    }
    println!("{report}");
    Ok(())
}

/// Ops the `--profile` table lists one by one (the kinds' totals cover the rest).
const PROFILE_OPS: usize = 25;

/// The `--profile` table on stderr: time per run by kind of op (with what the recorded calls
/// leave, "other") and the [`PROFILE_OPS`] longest ops.
fn print_profile(profile: &kiln_nn::profile::Profile, total: f64, runs: usize) {
    let runs_f = runs as f64;
    let rate = |flops: u64, seconds: f64| {
        if flops == 0 || seconds <= 0.0 {
            String::new()
        } else {
            format!("{:.0}", flops as f64 / seconds / 1e9)
        }
    };
    eprintln!(
        "\nprofile, per run (mean of {runs}): {:.3} s",
        total / runs_f
    );
    eprintln!(
        "{:<12} {:>10} {:>6} {:>8} {:>8}",
        "kind", "time", "share", "calls", "GFLOP/s"
    );
    let share = |s: f64| 100.0 * s / total.max(f64::MIN_POSITIVE);
    for k in profile.kinds() {
        eprintln!(
            "{:<12} {:>8.3} s {:>5.1}% {:>8} {:>8}",
            k.kind.name(),
            k.seconds / runs_f,
            share(k.seconds),
            k.calls / runs as u64,
            rate(k.flops, k.seconds)
        );
    }
    let other = (total - profile.seconds()).max(0.0);
    eprintln!(
        "{:<12} {:>8.3} s {:>5.1}%",
        "other",
        other / runs_f,
        share(other)
    );
    eprintln!(
        "\n{:>10} {:>6} {:>6} {:>8}  op (longest {PROFILE_OPS})",
        "time", "share", "calls", "GFLOP/s"
    );
    for o in profile.ops.iter().take(PROFILE_OPS) {
        eprintln!(
            "{:>8.3} s {:>5.1}% {:>6} {:>8}  {} {}",
            o.seconds / runs_f,
            share(o.seconds),
            o.calls / runs as u64,
            rate(o.flops, o.seconds),
            o.kind.name(),
            o.op
        );
    }
}

/// The JSON report's `profile`: the totals over the timed runs by kind (and the rest,
/// `other_s`) and by op.
fn profile_json(profile: &kiln_nn::profile::Profile, total: f64) -> serde_json::Value {
    let kinds: Vec<_> = profile
        .kinds()
        .iter()
        .map(|k| {
            serde_json::json!({
                "kind": k.kind.name(),
                "seconds": k.seconds,
                "calls": k.calls,
                "flops": k.flops,
            })
        })
        .collect();
    let ops: Vec<_> = profile
        .ops
        .iter()
        .map(|o| {
            serde_json::json!({
                "kind": o.kind.name(),
                "op": o.op,
                "seconds": o.seconds,
                "calls": o.calls,
                "flops": o.flops,
            })
        })
        .collect();
    serde_json::json!({
        "kinds": kinds,
        "ops": ops,
        "other_s": (total - profile.seconds()).max(0.0),
    })
}

/// Waits for a tensor's computation (asynchronous backends queue it) by reading one value.
fn wait<const D: usize>(t: Tensor<D>) -> Result<()> {
    let _: f32 = t.sum().cast(burn::tensor::DType::F32).into_scalar();
    Ok(())
}

fn device_name(device: &Device) -> String {
    format!("{device:?}")
}

/// The rayon pool's size (what flex's kernels split across).
fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The process's peak resident set (`VmHWM`), where the system reports it.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// What Kiln's kernels run bf16 products on here (`kiln_nn::kernels::bf16_products`).
fn bf16_products() -> &'static str {
    #[cfg(feature = "flex")]
    return kiln_nn::kernels::bf16_products();
    #[cfg(not(feature = "flex"))]
    return "f32";
}

/// The CPU's model name, where the system reports it.
fn cpu_name() -> Option<String> {
    let info = std::fs::read_to_string(Path::new("/proc/cpuinfo")).ok()?;
    let line = info.lines().find(|l| l.starts_with("model name"))?;
    Some(line.split_once(':')?.1.trim().to_string())
}

/// The vector extensions this CPU has, detected at run time.
fn simd_features() -> Vec<&'static str> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! detect {
            ($($f:tt),*) => {
                $(if std::is_x86_feature_detected!($f) { found.push($f); })*
            };
        }
        detect!(
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512bf16",
            "avx512fp16"
        );
    }
    // AMX's bf16 tiles, where Kiln's kernels use them (the CPU has them and the OS grants them)
    #[cfg(feature = "flex")]
    if kiln_nn::kernels::amx_available() {
        found.push("amx-bf16");
    }
    #[cfg(target_arch = "aarch64")]
    {
        if std::arch::is_aarch64_feature_detected!("neon") {
            found.push("neon");
        }
    }
    found
}
