//! `kiln data shapes` and `kiln eval shapes`: the procedural shapes dataset of
//! [`kiln_train::shapes`], and the score of what a model draws for its captions, held-out
//! combinations apart from trained ones, with an optional PNG grid of the samples.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kiln_pipeline::{GenerateOptions, RgbImage};
use kiln_scheduler::{SamplerName, SamplerOptions, SeededNoise};
use kiln_train::shapes::{
    self, Classification, EVAL_SEED, EvalCase, EvalScore, ShapesSpec, Split, SplitScore,
};
use serde_json::json;

use crate::generate::{ModelLoad, load_pipeline, model_label, resolve_model};
use crate::png_io::encode_png;
use crate::{check_output, write_atomic};

/// `kiln data ...`: datasets to train on.
#[derive(clap::Subcommand, Debug)]
pub enum DataCommand {
    /// Write the procedural shapes dataset: PNGs of one flat-coloured circle, square or triangle
    /// on a flat background of another colour, each with its caption ("a red circle on a blue
    /// background") in a same-named .txt file; the held-out combinations are never drawn.
    Shapes(DataShapesArgs),
}

/// Arguments of `kiln data shapes`.
#[derive(clap::Args, Debug)]
pub struct DataShapesArgs {
    /// Number of images.
    #[arg(long)]
    count: usize,
    /// Image side in pixels.
    #[arg(long)]
    size: usize,
    /// Seed of every draw (the same seed writes the same files).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The folder to write (written under a temporary name, then renamed).
    #[arg(long)]
    output: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    overwrite: bool,
}

/// `kiln eval ...`: scores of a model.
#[derive(clap::Subcommand, Debug)]
pub enum EvalCommand {
    /// Generate every held-out shapes combination and a seeded sample of trained ones from their
    /// captions, classify the images from their pixels, and print the fractions drawn exactly as
    /// asked (background, colour and shape) and per attribute, held-out and trained apart.
    Shapes(Box<EvalShapesArgs>),
}

/// Arguments of `kiln eval shapes`.
#[derive(clap::Args, Debug)]
pub struct EvalShapesArgs {
    /// The model: a diffusers folder, a single-file checkpoint or a repo id in the local
    /// Hugging Face cache, as `kiln generate` takes (default: the embedded model).
    #[arg(long)]
    model: Option<String>,
    /// Images per prompt, seeds 0 to N-1.
    #[arg(long, default_value_t = 4)]
    seeds: usize,
    /// Trained combinations to evaluate besides the held-out ones (a fixed seeded sample).
    #[arg(long, default_value_t = 12)]
    trained: usize,
    /// Denoising steps (default: the folder's kiln.json, else 50).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (default: the folder's kiln.json, else 7.5).
    #[arg(long)]
    guidance: Option<f64>,
    /// Sampler, as `kiln generate --scheduler` (default: the model's own scheduler).
    #[arg(long)]
    scheduler: Option<String>,
    /// Square image side in pixels (default: the model's).
    #[arg(long)]
    size: Option<usize>,
    /// Also write a PNG grid of the samples: a row per prompt, a column per seed, the prompt
    /// and what was read under each, framed green where drawn exactly as asked, red elsewhere.
    #[arg(long, value_name = "OUT.png")]
    grid: Option<PathBuf>,
    /// Replace an existing grid file.
    #[arg(long)]
    overwrite: bool,
    /// Print one JSON object (scores and every sample) instead of the summary lines.
    #[arg(long)]
    json: bool,
}

/// Runs `kiln data ...`.
pub fn run_data(command: DataCommand) -> Result<()> {
    let DataCommand::Shapes(args) = command;
    let spec = ShapesSpec::new(args.count, args.size, args.seed).with_overwrite(args.overwrite);
    spec.validate()?;
    check_output(&args.output, args.overwrite)?;
    shapes::generate(&spec, &args.output)?;
    eprintln!(
        "wrote {} images of {} x {} px with captions (seed {}) to {}",
        spec.count,
        spec.size,
        spec.size,
        spec.seed,
        args.output.display()
    );
    Ok(())
}

/// One generated image and what was read from it.
struct Sampled {
    case: EvalCase,
    seed: u64,
    seen: Classification,
    image: Option<RgbImage>,
}

/// Runs `kiln eval ...`.
pub fn run_eval(command: EvalCommand, device: impl FnOnce() -> Result<Device>) -> Result<()> {
    let EvalCommand::Shapes(args) = command;
    // 1. everything that can be checked before the model loads
    let sampler = args
        .scheduler
        .as_deref()
        .map(str::parse::<SamplerName>)
        .transpose()?;
    if args.seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    if args.steps == Some(0) {
        bail!("--steps must be at least 1");
    }
    if let Some(grid) = &args.grid {
        if !grid
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("png"))
        {
            bail!("--grid must name a .png file, got `{}`", grid.display());
        }
        check_output(grid, args.overwrite)?;
    }
    let cases = shapes::eval_cases(args.trained, EVAL_SEED)?;
    let model_dir = resolve_model(args.model.as_deref())?;

    // 2. the model
    let device = device()?;
    let pipe = load_pipeline(&model_dir, &ModelLoad::default(), &device)?;
    let steps = args.steps.unwrap_or(pipe.generation.steps);
    let guidance = args.guidance.unwrap_or(pipe.generation.guidance_scale);
    let (width, height) = match args.size {
        Some(s) => (s, s),
        None => pipe.default_size(),
    };
    let scheduler_label = match sampler {
        Some(name) => name.as_str().to_string(),
        None => pipe.scheduler_config.kind.class_name().to_string(),
    };
    let model_name = model_label(args.model.as_deref(), &model_dir);
    eprintln!(
        "evaluating {model_name}: {} prompts x {} seeds, {width}x{height}, {steps} steps, guidance {guidance}, {scheduler_label}",
        cases.len(),
        args.seeds
    );

    // 3. one image per prompt and seed, classified
    let total = cases.len() * args.seeds;
    let bar = ProgressBar::with_draw_target(Some(total as u64), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} images [{elapsed_precise}<{eta}]")
            .context("progress bar template")?,
    );
    let mut score = EvalScore::default();
    let mut samples = Vec::with_capacity(total);
    for case in &cases {
        let options = GenerateOptions::new(case.combo.caption())
            .with_steps(steps)
            .with_guidance_scale(guidance)
            .with_size(width, height);
        for seed in 0..args.seeds as u64 {
            // a fresh scheduler per image: no state carries from one run to the next
            let mut scheduler = pipe.scheduler(sampler, SamplerOptions::default())?;
            let out = pipe.generate(&mut scheduler, &options, &mut SeededNoise::new(seed), None)?;
            let image = out
                .to_rgb8()?
                .into_iter()
                .next()
                .context("the pipeline returned no image")?;
            let seen = shapes::classify(&image)?;
            score.record(case, &seen);
            samples.push(Sampled {
                case: *case,
                seed,
                seen,
                image: args.grid.is_some().then_some(image),
            });
            bar.inc(1);
        }
    }
    bar.finish_and_clear();

    // 4. the report
    if args.json {
        let split = |s: &SplitScore, split: Split| {
            let combos = cases.iter().filter(|c| c.split == split).count();
            let r = s.rates();
            json!({
                "combos": combos,
                "images": s.samples,
                "exact": r.exact,
                "background": r.background,
                "colour": r.colour,
                "shape": r.shape,
            })
        };
        let listed: Vec<_> = samples
            .iter()
            .map(|s| {
                json!({
                    "prompt": s.case.combo.caption(),
                    "split": s.case.split,
                    "seed": s.seed,
                    "seen": s.seen,
                    "exact": s.seen.matches(&s.case.combo),
                })
            })
            .collect();
        let out = json!({
            "model": model_name,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance": guidance,
            "scheduler": scheduler_label,
            "seeds": args.seeds,
            "held_out": split(&score.held_out, Split::HeldOut),
            "trained": split(&score.trained, Split::Trained),
            "samples": listed,
        });
        println!("{}", serde_json::to_string(&out)?);
    } else {
        for (name, split) in [("held-out", Split::HeldOut), ("trained", Split::Trained)] {
            let s = score.split(split);
            let combos = cases.iter().filter(|c| c.split == split).count();
            let r = s.rates();
            let f = |v: Option<f64>| v.map_or("n/a".to_string(), |v| format!("{v:.3}"));
            println!(
                "{name:<8} exact {}  background {}  colour {}  shape {}  ({} images: {combos} combos x {} seeds)",
                f(r.exact),
                f(r.background),
                f(r.colour),
                f(r.shape),
                s.samples,
                args.seeds
            );
        }
    }
    if let Some(path) = &args.grid {
        let grid = draw_grid(&samples, args.seeds)?;
        let text = format!("kiln eval shapes: {model_name}, {steps} steps, guidance {guidance}");
        write_atomic(path, &encode_png(&grid, &text)?)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

/// Grid cells are at least this wide: small images are enlarged by a whole factor (nearest).
const CELL_MIN: usize = 128;
/// Pixels between cells and around the grid.
const GAP: usize = 6;
/// Width of the frame around each image.
const FRAME: usize = 3;
/// Height of a text line (8 px glyphs).
const LINE: usize = 10;

/// The samples in a grid, `columns` to a row, each image framed (green: drawn as asked; red:
/// not), with its split and seed, prompt, and what was read written under it.
fn draw_grid(samples: &[Sampled], columns: usize) -> Result<RgbImage> {
    let Some(first) = samples.iter().find_map(|s| s.image.as_ref()) else {
        bail!("no images to put in the grid");
    };
    let (iw, ih) = (first.width, first.height);
    let scale = CELL_MIN.div_ceil(iw.max(1)).max(1);
    let (sw, sh) = (iw * scale, ih * scale);
    let cell_w = sw + 2 * FRAME;
    let chars = cell_w / 8;
    let texts: Vec<Vec<(String, [u8; 3])>> = samples
        .iter()
        .map(|s| {
            let split = match s.case.split {
                Split::HeldOut => "held out",
                Split::Trained => "trained",
            };
            let part = |v: Option<String>| v.unwrap_or_else(|| "?".into());
            let seen = format!(
                "read: {} {} on {}",
                part(s.seen.colour.map(|c| c.to_string())),
                part(s.seen.shape.map(|c| c.to_string())),
                part(s.seen.background.map(|c| c.to_string())),
            );
            let mut lines = vec![(format!("{split}, seed {}", s.seed), [150, 150, 150])];
            lines.extend(wrap(&s.case.combo.caption(), chars).map(|l| (l, [235, 235, 235])));
            lines.extend(wrap(&seen, chars).map(|l| (l, [150, 150, 150])));
            lines
        })
        .collect();
    let text_h = texts.iter().map(Vec::len).max().unwrap_or(0) * LINE;
    let cell_h = sh + 2 * FRAME + 4 + text_h;
    let rows = samples.len().div_ceil(columns);
    let width = GAP + columns * (cell_w + GAP);
    let height = GAP + rows * (cell_h + GAP);
    let mut grid = RgbImage {
        width,
        height,
        data: [30u8, 30, 30].repeat(width * height),
    };
    for (k, (sample, lines)) in samples.iter().zip(&texts).enumerate() {
        let (x0, y0) = (
            GAP + (k % columns) * (cell_w + GAP),
            GAP + (k / columns) * (cell_h + GAP),
        );
        let frame = if sample.seen.matches(&sample.case.combo) {
            [40, 200, 60]
        } else {
            [220, 40, 40]
        };
        fill(&mut grid, x0, y0, cell_w, sh + 2 * FRAME, frame);
        if let Some(image) = &sample.image {
            for y in 0..sh.min(image.height * scale) {
                for x in 0..sw.min(image.width * scale) {
                    let s = 3 * ((y / scale) * image.width + x / scale);
                    let d = 3 * ((y0 + FRAME + y) * width + x0 + FRAME + x);
                    grid.data[d..d + 3].copy_from_slice(&image.data[s..s + 3]);
                }
            }
        }
        for (i, (line, colour)) in lines.iter().enumerate() {
            let y = y0 + sh + 2 * FRAME + 4 + i * LINE;
            draw_text(&mut grid, x0, y, line, *colour);
        }
    }
    Ok(grid)
}

/// `text` in lines of at most `width` characters, broken at spaces (a longer word is cut).
fn wrap(text: &str, width: usize) -> impl Iterator<Item = String> {
    let width = width.max(1);
    let mut lines = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word = word.to_string();
        while word.len() > width {
            if !line.is_empty() {
                lines.push(std::mem::take(&mut line));
            }
            let rest = word.split_off(width);
            lines.push(word);
            word = rest;
        }
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(std::mem::take(&mut line));
        }
        if !line.is_empty() {
            line.push(' ');
        }
        line.push_str(&word);
    }
    if !line.is_empty() {
        lines.push(line);
    }
    lines.into_iter()
}

/// Fills a rectangle, clipped to the image.
fn fill(image: &mut RgbImage, x0: usize, y0: usize, w: usize, h: usize, colour: [u8; 3]) {
    for y in y0..(y0 + h).min(image.height) {
        for x in x0..(x0 + w).min(image.width) {
            let i = 3 * (y * image.width + x);
            image.data[i..i + 3].copy_from_slice(&colour);
        }
    }
}

/// Writes ASCII `text` with its top-left at (`x0`, `y0`) in the public-domain 8x8 bitmap font of
/// `font8x8` (bit 0 of each row byte is the leftmost pixel), clipped to the image; other
/// characters show as `?`.
fn draw_text(image: &mut RgbImage, x0: usize, y0: usize, text: &str, colour: [u8; 3]) {
    for (k, ch) in text.chars().enumerate() {
        let code = if ch.is_ascii() {
            ch as usize
        } else {
            '?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[code];
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    fill(image, x0 + 8 * k + col, y0 + row, 1, 1, colour);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_breaks_at_spaces_and_cuts_long_words() {
        let lines: Vec<String> = wrap("a purple triangle on a yellow background", 16).collect();
        assert_eq!(lines, ["a purple", "triangle on a", "yellow", "background"]);
        let lines: Vec<String> = wrap("abcdefghij", 4).collect();
        assert_eq!(lines, ["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 4).count(), 0);
    }
}
