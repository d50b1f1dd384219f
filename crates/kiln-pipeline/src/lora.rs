//! LoRAs on a pipeline: load several files with a scale each, fuse them into the UNet's and the
//! text encoder's weights (no cost per step), unfuse back to the original weights exactly.
//!
//! ```no_run
//! # fn main() -> kiln_pipeline::Result<()> {
//! # let device = kiln_nn::default_device()?;
//! use kiln_pipeline::{LoadOptions, LoraOptions, StableDiffusionPipeline};
//! let mut pipe = StableDiffusionPipeline::from_pretrained(
//!     "stable-diffusion-v1-5".as_ref(), LoadOptions::default(), &device)?;
//! pipe.load_lora("pixel-art.safetensors".as_ref(), 0.8, LoraOptions::default())?;
//! pipe.fuse_loras()?;   // generate with it ...
//! pipe.set_lora_scale("pixel-art", 0.5)?;
//! pipe.fuse_loras()?;   // ... at another strength
//! pipe.unfuse_loras()?; // the original weights, bit for bit
//! # Ok(()) }
//! ```
//!
//! The file layouts are those of [`kiln_nn::lora`]: kohya / A1111 and diffusers / PEFT. SDXL's
//! LoRAs update both text encoders; kohya's name the UNet's modules by the original (SGM)
//! layout (`lora_unet_input_blocks_4_1_...`), which is mapped onto diffusers' as single-file
//! checkpoints are ([`crate::single_file`]).

use std::path::Path;

use kiln_nn::lora::{LoraComponent, LoraFile, LoraFuser, LoraTarget, ScaledLora};

use crate::{Error, Result, StableDiffusionPipeline};

/// The text encoder's checkpoint prefix, which LoRA files keep and Kiln's module paths drop.
const TEXT_PREFIX: &[&str] = &["text_model."];

/// How to read a LoRA file.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoraOptions {
    /// Skip keys that belong to no LoRA layer instead of failing (they are listed in
    /// [`LoadedLora::skipped`]).
    pub allow_unknown_keys: bool,
}

/// A LoRA loaded into a pipeline.
#[derive(Debug, Clone)]
pub struct LoadedLora {
    /// Its name: the file name without extension.
    pub name: String,
    /// Its layers.
    pub file: LoraFile,
    /// The strength it is fused with.
    pub scale: f32,
    /// UNet layers it updates.
    pub unet_layers: usize,
    /// Text-encoder layers it updates.
    pub text_encoder_layers: usize,
    /// Layers of SDXL's second text encoder it updates (on the SDXL refiner, its one encoder).
    pub text_encoder_2_layers: usize,
}

impl LoadedLora {
    /// The keys skipped as unknown (only with [`LoraOptions::allow_unknown_keys`]).
    pub fn skipped(&self) -> &[String] {
        self.file.skipped()
    }
}

/// The LoRAs of a pipeline and what is fused.
#[derive(Debug, Default)]
pub struct LoraSet {
    loaded: Vec<LoadedLora>,
    unet: LoraFuser,
    text_encoder: LoraFuser,
    text_encoder_2: LoraFuser,
}

impl StableDiffusionPipeline {
    /// Loads a LoRA file with a strength (1: as trained), checking that every layer matches a
    /// layer of this model and fits its shape. Nothing changes until
    /// [`fuse_loras`](Self::fuse_loras).
    pub fn load_lora(
        &mut self,
        path: &Path,
        scale: f32,
        options: LoraOptions,
    ) -> Result<&LoadedLora> {
        if !scale.is_finite() {
            return Err(Error::InvalidInput(format!(
                "LoRA scale {scale} for `{}` must be a finite number",
                path.display()
            )));
        }
        let mut file = LoraFile::open(path, options.allow_unknown_keys)?;
        // kohya's SDXL LoRAs: the UNet's modules by their original (SGM) names
        if let Ok(layers) = crate::single_file::uniform_layers(&self.unet.config) {
            file.rename_targets(LoraComponent::Unet, |target| match target {
                LoraTarget::Flat(flat) => {
                    crate::single_file::sgm_lora_target(flat, layers).map(LoraTarget::Flat)
                }
                LoraTarget::Path(_) => None,
            });
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("lora")
            .to_string();
        if self.loras.loaded.iter().any(|l| l.name == name) {
            return Err(Error::InvalidInput(format!(
                "a LoRA named `{name}` is loaded already (from `{}`)",
                path.display()
            )));
        }
        let one = [ScaledLora { file: &file, scale }];
        let unet_layers = LoraFuser::check(&self.unet, LoraComponent::Unet, &one, &[])?;
        let first = self.first_encoder_component();
        let first_layers = LoraFuser::check(&self.text_encoder, first, &one, TEXT_PREFIX)?;
        let second_layers = match &self.text_encoder_2 {
            Some(encoder) => {
                LoraFuser::check(encoder, LoraComponent::TextEncoder2, &one, TEXT_PREFIX)?
            }
            None => 0,
        };
        // layers of an encoder this model does not have
        let missing = match (first, &self.text_encoder_2) {
            (LoraComponent::TextEncoder2, _) => Some((
                LoraComponent::TextEncoder,
                "is a layer of SDXL's first text encoder (CLIP ViT-L), which the SDXL refiner \
                 does not have; is the LoRA for the SDXL base?",
            )),
            (_, None) => Some((
                LoraComponent::TextEncoder2,
                "is a layer of SDXL's second text encoder, which this model does not have; is \
                 the LoRA for SDXL?",
            )),
            (_, Some(_)) => None,
        };
        if let Some((component, message)) = missing
            && let Some(layer) = file.component(component).next()
        {
            return Err(Error::Nn(kiln_nn::Error::Lora {
                path: path.to_path_buf(),
                key: layer.key.clone(),
                message: message.into(),
            }));
        }
        let (text_encoder_layers, text_encoder_2_layers) = match first {
            LoraComponent::TextEncoder2 => (0, first_layers),
            _ => (first_layers, second_layers),
        };
        self.loras.loaded.push(LoadedLora {
            name,
            file,
            scale,
            unet_layers,
            text_encoder_layers,
            text_encoder_2_layers,
        });
        Ok(self.loras.loaded.last().expect("just pushed"))
    }

    /// Which LoRA layers the first encoder slot takes: SDXL's second encoder's (`lora_te2_`,
    /// `text_encoder_2.`) on the SDXL refiner, whose one encoder (OpenCLIP ViT-bigG) is held
    /// there; the text encoder's everywhere else.
    fn first_encoder_component(&self) -> LoraComponent {
        if self.is_sdxl_refiner() {
            LoraComponent::TextEncoder2
        } else {
            LoraComponent::TextEncoder
        }
    }

    /// The loaded LoRAs, in loading order.
    pub fn loras(&self) -> &[LoadedLora] {
        &self.loras.loaded
    }

    /// Sets the strength of the LoRA named `name`; takes effect at the next
    /// [`fuse_loras`](Self::fuse_loras).
    pub fn set_lora_scale(&mut self, name: &str, scale: f32) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::InvalidInput(format!(
                "LoRA scale {scale} must be a finite number"
            )));
        }
        let known: Vec<String> = self.loras.loaded.iter().map(|l| l.name.clone()).collect();
        let lora = self
            .loras
            .loaded
            .iter_mut()
            .find(|l| l.name == name)
            .ok_or_else(|| {
                Error::InvalidInput(format!(
                    "no LoRA named `{name}` is loaded (loaded: {known:?})"
                ))
            })?;
        lora.scale = scale;
        Ok(())
    }

    /// Fuses every loaded LoRA, at its scale, into the UNet's and the text encoder's weights
    /// (replacing what was fused before). Generation then costs what it costs without LoRAs.
    pub fn fuse_loras(&mut self) -> Result<()> {
        self.unfuse_loras()?;
        let scaled: Vec<ScaledLora<'_>> = self
            .loras
            .loaded
            .iter()
            .map(|l| ScaledLora {
                file: &l.file,
                scale: l.scale,
            })
            .collect();
        let device = self.device().clone();
        self.loras
            .unet
            .fuse(&mut self.unet, LoraComponent::Unet, &scaled, &[], &device)?;
        let first = self.first_encoder_component();
        let mut fused = self.loras.text_encoder.fuse(
            &mut self.text_encoder,
            first,
            &scaled,
            TEXT_PREFIX,
            &device,
        );
        if let (Ok(_), Some(encoder)) = (&fused, self.text_encoder_2.as_mut()) {
            fused = self.loras.text_encoder_2.fuse(
                encoder,
                LoraComponent::TextEncoder2,
                &scaled,
                TEXT_PREFIX,
                &device,
            );
        }
        if let Err(e) = fused {
            // nothing half-fused: every component back as it was
            self.unfuse_loras()?;
            return Err(e.into());
        }
        Ok(())
    }

    /// Restores the weights as they were before [`fuse_loras`](Self::fuse_loras), bit for bit.
    /// The LoRAs stay loaded.
    pub fn unfuse_loras(&mut self) -> Result<()> {
        self.loras.unet.unfuse(&mut self.unet)?;
        self.loras.text_encoder.unfuse(&mut self.text_encoder)?;
        if let Some(encoder) = self.text_encoder_2.as_mut() {
            self.loras.text_encoder_2.unfuse(encoder)?;
        }
        Ok(())
    }

    /// Whether LoRAs are fused into the weights now.
    pub fn loras_fused(&self) -> bool {
        self.loras.unet.is_fused()
            || self.loras.text_encoder.is_fused()
            || self.loras.text_encoder_2.is_fused()
    }

    /// Unfuses and forgets every LoRA.
    pub fn clear_loras(&mut self) -> Result<()> {
        self.unfuse_loras()?;
        self.loras.loaded.clear();
        Ok(())
    }
}
