//! What users bring: LoRA files, textual-inversion embeddings and A1111 prompts, with a
//! diffusers Stable Diffusion folder, written as a binary PPM file.
//!
//! ```sh
//! cargo run --release -p kiln-pipeline --example lora_prompt -- MODEL_DIR OUT.ppm \
//!     --lora style.safetensors:0.8 --embedding easynegative.safetensors \
//!     "a ((castle)) on a hill, [fog], (sunset:1.2), highly detailed" "easynegative, blurry"
//! ```
//! Each `--lora FILE:SCALE` is fused into the weights once (no cost per step) and unfused at the
//! end; each `--embedding FILE` makes its file name a word of the prompts. The prompts are read
//! with the A1111 web UI's emphasis and no 77-token limit (docs/prompts.md).

use kiln_pipeline::{
    GenerateOptions, LoadOptions, LoraOptions, PromptSyntax, StableDiffusionPipeline,
};
use kiln_scheduler::{SamplerName, SamplerOptions, SeededNoise};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: lora_prompt MODEL_DIR OUT.ppm [--lora FILE:SCALE]... [--embedding FILE]... PROMPT [NEGATIVE]";
    let (mut loras, mut embeddings) = (Vec::new(), Vec::new());
    while let Some(i) = args
        .iter()
        .position(|a| a == "--lora" || a == "--embedding")
    {
        if i + 1 >= args.len() {
            return Err(usage.into());
        }
        let value = args.remove(i + 1);
        match args.remove(i).as_str() {
            "--lora" => loras.push(value),
            _ => embeddings.push(value),
        }
    }
    let [model, output, prompt, rest @ ..] = args.as_slice() else {
        return Err(usage.into());
    };
    let negative = rest.first().cloned().unwrap_or_default();

    let device = kiln_nn::default_device()?;
    let mut pipe =
        StableDiffusionPipeline::from_pretrained(model.as_ref(), LoadOptions::default(), &device)?;
    for file in &embeddings {
        let token = pipe.load_textual_inversion(file.as_ref(), None)?;
        eprintln!("embedding {file}: `{token}`");
    }
    for spec in &loras {
        let (file, scale) = match spec.rsplit_once(':') {
            Some((file, scale)) => (file, scale.parse::<f32>()?),
            None => (spec.as_str(), 1.0),
        };
        let lora = pipe.load_lora(file.as_ref(), scale, LoraOptions::default())?;
        eprintln!(
            "{}: {} UNet and {} text-encoder layers",
            lora.name, lora.unet_layers, lora.text_encoder_layers
        );
    }
    pipe.fuse_loras()?;

    let mut scheduler = pipe.scheduler(Some(SamplerName::DpmPp2m), SamplerOptions::default())?;
    let options = GenerateOptions::new(prompt.as_str())
        .with_negative_prompt(negative)
        .with_prompt_syntax(PromptSyntax::A1111)
        .with_steps(25);
    let out = pipe.generate(&mut scheduler, &options, &mut SeededNoise::new(42), None)?;
    pipe.unfuse_loras()?; // the original weights again, bit for bit

    let image = &out.to_rgb8()?[0];
    let mut ppm = format!("P6\n{} {}\n255\n", image.width, image.height).into_bytes();
    ppm.extend_from_slice(&image.data);
    std::fs::write(output, ppm)?;
    println!("wrote {output} ({}x{})", image.width, image.height);
    Ok(())
}
