//! How much memory a generation needs beyond the loaded weights, estimated from the models'
//! configs before anything is allocated, and the limit it is checked against.
//!
//! The estimate follows what the forward passes hold at their peak:
//! - **UNet** (batch `n`, doubled under guidance): the skip connections the down blocks keep
//!   for the up blocks (`layers_per_block + 1` maps per level), plus the working set of the
//!   largest level: a transformer block's feed-forward holds its input, the GEGLU projection
//!   (8x the channels) and its gated half (4x), 16 maps of that level in all; plus the scores
//!   of attention, which are bounded (`kiln_nn::attention::MAX_SCORES` on burn's op, a few MiB
//!   in Kiln's kernel).
//! - **VAE decode** (batch `n`): 7 maps of the first block's width at the full image size (the
//!   up block's input, norm, activation, convolution and residual, the upsampled map of the
//!   block below) and the decoded image; tiled, the maps of one tile and three images' worth
//!   of decoded tiles and blending.
//!
//! - **Packed weights**: on a CPU with AMX tiles, bf16 models' linear and convolution weights
//!   are packed for the tiles on first use and kept (`kiln_nn::kernels::packs_weights`): as
//!   much again as the bf16 weights, through every stage.
//!
//! The score bound (256 MiB) is counted whether or not the kernel runs, so the estimate errs
//! high at small sizes. Against peak RSS (2026-12-02, the 2-core Xeon, release build): the SD
//! 1.5 UNet at 512 px holds 0.33 GiB beyond its weights (`kiln bench unet`; estimated 0.46) and
//! its VAE decode 0.96 GiB (estimated 1.13); `kiln generate` on the embedded tiny model, 2
//! steps, peaks 0.10 GiB above a 32 px run at 512 px (estimated 0.36) and 0.38 GiB at 1024 px
//! (estimated 0.70).

use burn::tensor::DType;
use kiln_vae::TilingOptions;

use crate::pipeline_stable_diffusion::StableDiffusionPipeline;

/// Bytes a generation needs beyond the loaded weights, by stage ([`StableDiffusionPipeline::
/// estimate_memory`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemoryEstimate {
    /// The UNet's activations at their peak, during one denoising step.
    pub unet: u64,
    /// The VAE decoder's activations at their peak, and the decoded images.
    pub vae_decode: u64,
    /// The copies of the weights that Kiln's kernels pack on first use and keep (bf16 on a CPU
    /// with AMX tiles: `kiln_nn::kernels::packs_weights`), held through every stage; 0
    /// elsewhere.
    pub packed_weights: u64,
}

impl MemoryEstimate {
    /// The peak: the stages run one after the other, the packed weights kept throughout.
    pub fn peak(&self) -> u64 {
        self.unet
            .max(self.vae_decode)
            .saturating_add(self.packed_weights)
    }

    /// `, weights packed for the CPU's tiles N GiB` where there are any (for messages).
    pub fn packed_note(&self) -> String {
        if self.packed_weights == 0 {
            String::new()
        } else {
            format!(
                ", weights packed for the CPU's tiles {:.2} GiB",
                gib(self.packed_weights)
            )
        }
    }
}

/// Bytes in GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The memory a generation may use when the caller sets no limit: what the operating system
/// reports as available (`MemAvailable` of `/proc/meminfo` on Linux), or `None` where it cannot
/// be read (then nothing is checked).
pub fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

impl StableDiffusionPipeline {
    /// Estimates the memory a `width x height` generation of `num_images` images needs beyond
    /// the loaded weights (see [`crate::memory`]); `guidance` doubles the UNet's batch, `tiling`
    /// bounds the decoder's maps by one tile.
    pub fn estimate_memory(
        &self,
        width: usize,
        height: usize,
        num_images: usize,
        guidance: bool,
        tiling: Option<&TilingOptions>,
    ) -> MemoryEstimate {
        // f64 throughout: sizes too large for memory must not overflow on the way to the error
        let element = match self.dtype() {
            DType::F16 | DType::BF16 => 2.0,
            _ => 4.0,
        };
        let f = self.vae_scale_factor().max(1) as f64;
        let (lh, lw) = ((height as f64 / f).ceil(), (width as f64 / f).ceil());
        let batch = num_images as f64 * if guidance { 2.0 } else { 1.0 };
        let config = &self.unet.config;
        let levels = config.block_out_channels.len();
        let layers = config
            .layers_per_block
            .expand(levels, "layers_per_block")
            .unwrap_or_else(|_| vec![2; levels]);
        let mut skips = 0.0;
        let mut largest: f64 = 0.0;
        for (i, (&channels, &layers)) in config.block_out_channels.iter().zip(&layers).enumerate() {
            let scale = 2f64.powi(i as i32);
            let pixels = (lh / scale).ceil() * (lw / scale).ceil();
            let map = batch * channels as f64 * pixels * element;
            skips += (layers + 1) as f64 * map;
            largest = largest.max(map);
        }
        let scores = kiln_nn::attention::MAX_SCORES as f64 * 4.0;
        let unet = skips + 16.0 * largest + scores;
        let top = self
            .vae
            .config
            .block_out_channels
            .first()
            .copied()
            .unwrap_or(128) as f64;
        let image_pixels = height as f64 * width as f64;
        // tiled: one tile's maps at a time, and the decoded tiles (overlaps included, about
        // twice the image) kept until they are blended
        let (map_pixels, image_copies) = match tiling {
            Some(t) => {
                let side = t.tile_sample_size.max(1);
                (height.min(side) as f64 * width.min(side) as f64, 3.0)
            }
            None => (image_pixels, 1.0),
        };
        let vae_decode = num_images as f64
            * (map_pixels * 7.0 * top * element + image_pixels * 3.0 * 4.0 * image_copies)
            + scores;
        MemoryEstimate {
            unet: to_bytes(unet),
            vae_decode: to_bytes(vae_decode),
            packed_weights: to_bytes(self.packed_weight_bytes()),
        }
    }

    /// Bytes of the packed copies Kiln's kernels keep of the models' weights (bf16, 2 bytes a
    /// parameter of the UNet and the VAE, nearly all of which are in the linear layers and
    /// convolutions that get packed; the text encoder stays f32).
    fn packed_weight_bytes(&self) -> f64 {
        #[cfg(feature = "flex")]
        if kiln_nn::kernels::packs_weights(self.device(), self.dtype()) {
            use burn::module::Module;
            return 2.0 * (self.unet.num_params() + self.vae.num_params()) as f64;
        }
        0.0
    }
}

fn to_bytes(x: f64) -> u64 {
    if x >= u64::MAX as f64 {
        u64::MAX
    } else {
        x as u64
    }
}
