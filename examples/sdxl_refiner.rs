//! SDXL base + refiner ensemble (diffusers' "ensemble of expert denoisers"): the base runs the
//! first 80% of the schedule and hands its latents to the refiner, which finishes them; the
//! image is written as a binary PPM file.
//!
//! ```sh
//! cargo run --release -p kiln-pipeline --example sdxl_refiner -- BASE_DIR REFINER_DIR "a lighthouse at dawn" out.ppm
//! ```
//! The folders are diffusers' (`stabilityai/stable-diffusion-xl-base-1.0`,
//! `stabilityai/stable-diffusion-xl-refiner-1.0` or fine-tunes of them). `fixtures/sdxl/base` and
//! `fixtures/sdxl/refiner` run too (tiny random models: noise, at their 32x32).

use kiln_pipeline::{
    GenerateOptions, LoadOptions, MicroConditioning, Mode, StableDiffusionPipeline,
};
use kiln_scheduler::{SamplerOptions, SeededNoise};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [base, refiner, prompt, output] = args.as_slice() else {
        eprintln!("usage: sdxl_refiner BASE_DIR REFINER_DIR PROMPT OUTPUT.ppm");
        std::process::exit(2);
    };
    let device = kiln_nn::default_device()?;
    let base =
        StableDiffusionPipeline::from_pretrained(base.as_ref(), LoadOptions::default(), &device)?;
    let refiner = StableDiffusionPipeline::from_pretrained(
        refiner.as_ref(),
        LoadOptions::default(),
        &device,
    )?;
    if !base.is_sdxl() || !refiner.is_sdxl_refiner() {
        return Err("give an SDXL base folder, then an SDXL refiner folder".into());
    }
    let switch = 0.8;
    let options = GenerateOptions::for_model(&base, prompt.as_str())
        .with_steps(30)
        // look as if cropped from a larger picture, centred
        .with_micro_conditioning(MicroConditioning {
            original_size: Some([2048, 2048]),
            ..Default::default()
        });
    let mut noise = SeededNoise::new(42);

    let mut scheduler = base.scheduler(None, SamplerOptions::default())?;
    let latents = base.generate_latents(
        &mut scheduler,
        &options.clone().with_denoising_range(Some(switch), None),
        &mut noise,
        None,
    )?;
    let mut scheduler = refiner.scheduler(None, SamplerOptions::default())?;
    let refine = options
        .with_mode(Mode::Img2Img {
            image: latents,
            strength: 1.0,
        })
        .with_denoising_range(None, Some(switch));
    let out = refiner.generate(&mut scheduler, &refine, &mut noise, None)?;

    let image = &out.to_rgb8()?[0];
    let mut ppm = format!("P6\n{} {}\n255\n", image.width, image.height).into_bytes();
    ppm.extend_from_slice(&image.data);
    std::fs::write(output, ppm)?;
    println!("wrote {output} ({}x{})", image.width, image.height);
    Ok(())
}
