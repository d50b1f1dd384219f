//! The hires fix (the A1111 web UI's "Hires. fix"): a txt2img run at the size the model was
//! trained at, its latents enlarged, and an img2img pass at the larger size that redraws the
//! detail. Asked directly for a size well above its own, a UNet repeats its subject across the
//! canvas; the first pass fixes the composition at the size it knows.
//!
//! The latents are enlarged as the web UI's latent upscalers do (bilinear, nearest, bicubic:
//! PyTorch's `interpolate`, half-pixel centres, no antialiasing; [`upscale_latents`]), and the
//! second pass is diffusers' img2img on them: `strength` ([`HiresFix::denoise`]) of a schedule of
//! [`HiresFix::steps`] steps. Both passes draw from the caller's one noise source, in order, so a
//! seed gives one image.

use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{DType, Tensor};
use kiln_scheduler::{NoiseSource, Scheduler};

use crate::{
    Error, GenerateOptions, GenerateOutput, Mode, Result, StableDiffusionPipeline, StepCallback,
};

/// How the first pass's latents are enlarged: the web UI's latent upscalers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LatentUpscaler {
    /// Bilinear ("Latent", the web UI's default).
    #[default]
    Bilinear,
    /// Nearest neighbour, PyTorch's `nearest` ("Latent (nearest)").
    Nearest,
    /// Bicubic ("Latent (bicubic)").
    Bicubic,
}

impl LatentUpscaler {
    /// Every upscaler, in the order [`name`](Self::name)s are listed.
    pub const ALL: [Self; 3] = [Self::Bilinear, Self::Nearest, Self::Bicubic];

    /// The CLI's name: `latent`, `latent-nearest`, `latent-bicubic`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bilinear => "latent",
            Self::Nearest => "latent-nearest",
            Self::Bicubic => "latent-bicubic",
        }
    }

    /// The web UI's name, as its `Hires upscaler` parameter writes it.
    pub fn web_ui_name(self) -> &'static str {
        match self {
            Self::Bilinear => "Latent",
            Self::Nearest => "Latent (nearest)",
            Self::Bicubic => "Latent (bicubic)",
        }
    }

    fn mode(self) -> InterpolateMode {
        match self {
            Self::Bilinear => InterpolateMode::Bilinear,
            Self::Nearest => InterpolateMode::Nearest,
            Self::Bicubic => InterpolateMode::Bicubic,
        }
    }
}

impl std::str::FromStr for LatentUpscaler {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|u| u.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|u| u.name()).collect();
                Error::InvalidInput(format!(
                    "unknown latent upscaler `{s}`: use one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// `latents` `[n, c, h, w]` resized to `[n, c, height, width]` as PyTorch's
/// `interpolate(latents, size=(height, width), mode=...)` with `align_corners=False` does,
/// computed in f32 (every backend's interpolation takes it) and returned in the latents' dtype.
pub fn upscale_latents(
    latents: Tensor<4>,
    height: usize,
    width: usize,
    upscaler: LatentUpscaler,
) -> Result<Tensor<4>> {
    if height == 0 || width == 0 {
        return Err(Error::InvalidInput(format!(
            "cannot resize latents to {height}x{width}"
        )));
    }
    let options = InterpolateOptions::new(upscaler.mode())
        .with_align_corners(false)
        .with_output_size([height, width]);
    let dtype = latents.dtype();
    Ok(interpolate(latents.cast(DType::F32), options).cast(dtype))
}

/// The second pass of a hires fix.
#[derive(Debug, Clone, PartialEq)]
pub struct HiresFix {
    /// The final image's width in pixels.
    pub width: usize,
    /// The final image's height in pixels.
    pub height: usize,
    /// How the latents are enlarged.
    pub upscaler: LatentUpscaler,
    /// The second pass's schedule, in steps (`None`: the first pass's), of which the last
    /// [`denoise`](Self::denoise) fraction runs (diffusers' img2img counting).
    pub steps: Option<usize>,
    /// In (0, 1]: how much of the schedule the second pass runs, its img2img strength (the web
    /// UI's "Denoising strength"; its default 0.7).
    pub denoise: f64,
}

impl HiresFix {
    /// `scale` times the first pass's `width` x `height` (each rounded down to a multiple of
    /// `multiple`, the model's [`size_multiple`](StableDiffusionPipeline::size_multiple)), the
    /// web UI's defaults otherwise: bilinear latents, the first pass's steps, denoise 0.7.
    pub fn scaled(width: usize, height: usize, scale: f64, multiple: usize) -> Result<Self> {
        if !(scale.is_finite() && scale >= 1.0) {
            return Err(Error::InvalidInput(format!(
                "hires scale {scale} must be at least 1"
            )));
        }
        let round = |v: usize| {
            let scaled = (v as f64 * scale).floor();
            // checked before the cast: a huge scale must not wrap
            (scaled < (usize::MAX / 2) as f64)
                .then(|| scaled as usize / multiple.max(1) * multiple.max(1))
        };
        let (Some(w), Some(h)) = (round(width), round(height)) else {
            return Err(Error::InvalidInput(format!(
                "hires scale {scale} makes an image too large to represent"
            )));
        };
        Ok(Self {
            width: w,
            height: h,
            upscaler: LatentUpscaler::default(),
            steps: None,
            denoise: 0.7,
        })
    }
}

impl StableDiffusionPipeline {
    /// A txt2img run with the hires fix: `options` at their size (the first pass), its latents
    /// enlarged to `hires`' size ([`upscale_latents`]), then an img2img pass there that runs the
    /// last `hires.denoise` of a schedule of `hires.steps` steps. `options` must be txt2img (with
    /// or without initial latents); the second pass uses the same prompts, guidance and
    /// scheduler (reset by `set_timesteps`). Both passes are checked against the memory limit
    /// before the first starts. The callback sees the first pass's steps, then the second's
    /// (each pass's `step` from 0 and its own `total`).
    pub fn generate_hires<S: Scheduler + ?Sized>(
        &self,
        scheduler: &mut S,
        options: &GenerateOptions,
        hires: &HiresFix,
        noise: &mut dyn NoiseSource,
        mut callback: Option<&mut StepCallback<'_>>,
    ) -> Result<GenerateOutput> {
        if !matches!(options.mode, Mode::Txt2Img) {
            return Err(Error::InvalidInput(
                "the hires fix is for txt2img: enlarge an image with img2img at the larger size"
                    .into(),
            ));
        }
        if !(hires.denoise > 0.0 && hires.denoise <= 1.0) {
            return Err(Error::InvalidInput(format!(
                "hires denoise {} must be in (0, 1]",
                hires.denoise
            )));
        }
        let second = |image: Tensor<4>| {
            let mut second = options
                .clone()
                .with_size(hires.width, hires.height)
                .with_steps(hires.steps.unwrap_or(options.steps))
                .with_mode(Mode::Img2Img {
                    image,
                    strength: hires.denoise,
                });
            second.latents = None;
            second
        };
        // both passes' sizes and memory, before any work
        let (width, height) = {
            let run = self.plan(options)?;
            (run.width, run.height)
        };
        let f = self.vae_scale_factor();
        if hires.width < width || hires.height < height {
            return Err(Error::InvalidInput(format!(
                "the hires size {}x{} is smaller than the first pass's {width}x{height}",
                hires.width, hires.height
            )));
        }
        let probe = Tensor::<4>::zeros(
            [options.num_images, self.vae.config.latent_channels, 1, 1],
            self.device(),
        );
        self.plan(&second(probe))?;

        let first = self.generate_latents(scheduler, options, noise, callback.as_deref_mut())?;
        let enlarged = upscale_latents(first, hires.height / f, hires.width / f, hires.upscaler)?;
        self.generate(scheduler, &second(enlarged), noise, callback)
    }
}
