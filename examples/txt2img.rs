//! Text to image with a diffusers Stable Diffusion folder, written as a binary PPM file.
//!
//! ```sh
//! cargo run --release -p kiln-pipeline --example txt2img -- MODEL_DIR "a photo of a cat" cat.ppm [SAMPLER]
//! ```
//! `MODEL_DIR` is a diffusers folder (`model_index.json`, `tokenizer/`, `text_encoder/`, `unet/`,
//! `vae/`, `scheduler/`); `SAMPLER` is a name such as `dpm++2m` (default: the folder's own
//! scheduler). The same seed gives the same image on every backend.

use std::ops::ControlFlow;

use kiln_pipeline::{GenerateOptions, LoadOptions, StableDiffusionPipeline, StepProgress};
use kiln_scheduler::{SamplerName, SamplerOptions, SeededNoise};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(model), Some(prompt), Some(output)) = (args.next(), args.next(), args.next()) else {
        eprintln!("usage: txt2img MODEL_DIR PROMPT OUTPUT.ppm [SAMPLER]");
        std::process::exit(2);
    };
    let sampler = args.next().map(|s| s.parse::<SamplerName>()).transpose()?;

    let device = kiln_nn::default_device()?;
    let pipe =
        StableDiffusionPipeline::from_pretrained(model.as_ref(), LoadOptions::default(), &device)?;
    let mut scheduler = pipe.scheduler(sampler, SamplerOptions::default())?;
    let options = GenerateOptions::new(prompt)
        .with_negative_prompt("blurry, low quality")
        .with_steps(25)
        .with_guidance_scale(7.5);
    let mut progress = |p: &StepProgress<'_>| {
        eprint!("\rstep {}/{}", p.step + 1, p.total);
        ControlFlow::Continue(())
    };
    let out = pipe.generate(
        &mut scheduler,
        &options,
        &mut SeededNoise::new(42),
        Some(&mut progress),
    )?;
    eprintln!();

    let image = &out.to_rgb8()?[0];
    let mut ppm = format!("P6\n{} {}\n255\n", image.width, image.height).into_bytes();
    ppm.extend_from_slice(&image.data);
    std::fs::write(&output, ppm)?;
    println!("wrote {output} ({}x{})", image.width, image.height);
    Ok(())
}
