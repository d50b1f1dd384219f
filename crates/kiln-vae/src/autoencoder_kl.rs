//! `AutoencoderKL`: the VAE of latent diffusion (Rombach et al., 2022, "High-Resolution Image
//! Synthesis with Latent Diffusion Models"), with diffusers' tiled encode and decode.
//!
//! Mirrors `AutoencoderKL` in `diffusers/models/autoencoders/autoencoder_kl.py` (diffusers
//! 0.42.1): `encoder -> quant_conv -> DiagonalGaussianDistribution` and
//! `post_quant_conv -> decoder`; `enable_tiling()` becomes [`TilingOptions`].

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{DType, Device, Tensor, TensorData};
use kiln_nn::activation::Activation;
use kiln_nn::config::read_json;
use kiln_nn::weights::{LoadOptions, find_weights, load_safetensors};
use serde::Deserialize;

use crate::vae::{Decoder, DiagonalGaussianDistribution, Encoder};
use crate::{Error, Result};
use kiln_nn::conv::conv2d;

/// The encoder block types diffusers' `AutoencoderKL` accepts for SD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DownBlockType {
    /// ResNet blocks and a downsampler.
    DownEncoderBlock2D,
}

/// The decoder block types diffusers' `AutoencoderKL` accepts for SD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum UpBlockType {
    /// ResNet blocks and an upsampler.
    UpDecoderBlock2D,
}

/// `sample_size` as configs write it: one number or `[height, width]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    /// Square.
    Square(usize),
    /// `[height, width]`.
    Rect([usize; 2]),
}

impl SampleSize {
    /// The first (height) entry, which diffusers' tiling uses.
    pub fn first(self) -> usize {
        match self {
            Self::Square(s) => s,
            Self::Rect([h, _]) => h,
        }
    }
}

/// The attention layers' names in VAE files that diffusers wrote before its attention refactor
/// of 2023 (`AttentionBlock`), and today's: diffusers converts them as it loads
/// (`_convert_deprecated_attention_blocks`), and so does [`AutoencoderKL::load_weights`]. The
/// hub's SD 1.x and 2.x `vae/diffusion_pytorch_model.safetensors` files still use them.
pub const DEPRECATED_ATTENTION_NAMES: [(&str, &str); 4] = [
    ("query", "to_q"),
    ("key", "to_k"),
    ("value", "to_v"),
    ("proj_attn", "to_out.0"),
];

/// `vae/config.json` of a diffusers pipeline (unknown keys are ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// One per block.
    #[serde(default = "default_down")]
    pub down_block_types: Vec<DownBlockType>,
    /// One per block.
    #[serde(default = "default_up")]
    pub up_block_types: Vec<UpBlockType>,
    /// Channels of each block; their count sets the scale factor `2^(n - 1)`.
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder block (the decoder has one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Nonlinearity.
    #[serde(default = "silu")]
    pub act_fn: Activation,
    /// Latent channels.
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Image size the VAE was trained at: the default tile size for tiling.
    #[serde(default = "default_sample_size")]
    pub sample_size: SampleSize,
    /// Latents are `(z - shift_factor) * scaling_factor` for the diffusion model.
    #[serde(default = "default_scaling")]
    pub scaling_factor: f64,
    /// See `scaling_factor` (absent in SD 1.x/2.x, present in SD3/Flux VAEs).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether `quant_conv` exists.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether `post_quant_conv` exists.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks hold a self-attention.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// The VAE overflows in f16 and must run in f32 (the original SDXL VAE). diffusers' SDXL
    /// pipelines honour it, its SD 1.x / 2.x pipelines do not; Kiln likewise.
    #[serde(default = "yes")]
    pub force_upcast: bool,
}

fn one() -> usize {
    1
}
fn three() -> usize {
    3
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn yes() -> bool {
    true
}
fn silu() -> Activation {
    Activation::Silu
}
fn default_down() -> Vec<DownBlockType> {
    vec![DownBlockType::DownEncoderBlock2D]
}
fn default_up() -> Vec<UpBlockType> {
    vec![UpBlockType::UpDecoderBlock2D]
}
fn default_channels() -> Vec<usize> {
    vec![64]
}
fn default_sample_size() -> SampleSize {
    SampleSize::Square(32)
}
fn default_scaling() -> f64 {
    0.18215
}

impl AutoencoderKLConfig {
    /// Reads `config.json`, then [`validate`](Self::validate)s it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path, "VAE config")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the values describe a buildable VAE.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        let fail = |m: String| Err(Error::InvalidConfig(m));
        if n == 0 {
            return fail("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return fail(format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| *c == 0 || !c.is_multiple_of(self.norm_num_groups))
        {
            return fail(format!(
                "every block_out_channels entry {:?} must be a positive multiple of norm_num_groups {}",
                self.block_out_channels, self.norm_num_groups
            ));
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 || self.in_channels == 0 {
            return fail(
                "layers_per_block, latent_channels and in_channels must be positive".into(),
            );
        }
        Ok(())
    }

    /// `2^(len(block_out_channels) - 1)`: image pixels per latent pixel along each side.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

/// Tiled encode/decode, as diffusers' `enable_tiling()`: the input is cut into overlapping tiles
/// that are processed one by one and blended linearly where they overlap.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TilingOptions {
    /// Tile side in image pixels (`tile_sample_min_size`; diffusers uses `sample_size`).
    pub tile_sample_size: usize,
    /// Fraction of a tile shared with its neighbour (`tile_overlap_factor`, 0.25).
    pub overlap_factor: f64,
}

impl TilingOptions {
    /// diffusers' defaults for this VAE: tiles of `sample_size` pixels, overlap 0.25.
    pub fn from_config(config: &AutoencoderKLConfig) -> Self {
        Self {
            tile_sample_size: config.sample_size.first(),
            overlap_factor: 0.25,
        }
    }
}

/// The KL-regularised autoencoder.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    /// Image to moments.
    pub encoder: Encoder,
    /// Latent to image.
    pub decoder: Decoder,
    /// 1x1 convolution on the moments (`use_quant_conv`).
    pub quant_conv: Option<Conv2d>,
    /// 1x1 convolution on the latent before decoding (`use_post_quant_conv`).
    pub post_quant_conv: Option<Conv2d>,
    /// The config the model was built from.
    #[module(skip)]
    pub config: AutoencoderKLConfig,
}

/// Weight file names tried in a diffusers `vae/` folder, full precision first, safetensors
/// before the pickle files of older repos.
pub const WEIGHT_FILES: [&str; 5] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bf16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
];

impl AutoencoderKL {
    /// A VAE of `config`'s shape with fresh weights for training from scratch, drawn from
    /// `seed` with PyTorch's layer defaults, as diffusers builds one from a config
    /// ([`kiln_nn::init::pytorch_default`]). The same seed gives the same model on every backend.
    pub fn init(config: &AutoencoderKLConfig, seed: u64, device: &Device) -> Result<Self> {
        Ok(kiln_nn::init::initialize(
            Self::new(config, device)?,
            seed,
            kiln_nn::init::pytorch_default,
        ))
    }

    /// A randomly initialised VAE for `config` (load weights afterwards).
    pub fn new(config: &AutoencoderKLConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let moments = 2 * config.latent_channels;
        let latent = config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(config, device),
            decoder: Decoder::new(config, device),
            quant_conv: config
                .use_quant_conv
                .then(|| Conv2dConfig::new([moments, moments], [1, 1]).init(device)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2dConfig::new([latent, latent], [1, 1]).init(device)),
            config: config.clone(),
        })
    }

    /// Loads a diffusers `vae/` folder: `config.json` and the first of [`WEIGHT_FILES`] present
    /// (the `.fp16.` file first when `dtype` is F16), converted to `dtype`.
    pub fn from_pretrained(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        kiln_nn::config::require_dir(dir, "VAE folder")?;
        let config = AutoencoderKLConfig::from_file(&dir.join("config.json"))?;
        let mut candidates = WEIGHT_FILES.to_vec();
        if dtype == DType::F16 {
            candidates.swap(0, 1);
        }
        let weights = find_weights(dir, &candidates, "VAE weights")?;
        Self::new(&config, device)?.load_weights(&weights, dtype)
    }

    /// Loads a weights file (safetensors, or a pickle `.bin`) with diffusers' key names,
    /// strictly, converting to `dtype`.
    /// The mid blocks' attention may carry the names diffusers wrote before its attention
    /// refactor of 2023 ([`DEPRECATED_ATTENTION_NAMES`]), as the hub's SD 1.x / 2.x VAE files
    /// do.
    pub fn load_weights(self, path: &Path, dtype: DType) -> Result<Self> {
        let mut options = LoadOptions::default().with_dtype(dtype);
        for (old, new) in DEPRECATED_ATTENTION_NAMES {
            options = options.with_remap(
                format!(r"^(.*\.attentions\.\d+)\.{old}\."),
                format!("${{1}}.{new}."),
            );
        }
        Ok(load_safetensors(self, path, &options)?)
    }

    /// Image pixels per latent pixel along each side: `2^(len(block_out_channels) - 1)`.
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }

    /// `scaling_factor` of the config.
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// `shift_factor` of the config (0 when absent).
    pub fn shift_factor(&self) -> f64 {
        self.config.shift_factor.unwrap_or(0.0)
    }

    /// `(z - shift_factor) * scaling_factor`: a VAE latent as the diffusion model sees it.
    pub fn scale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        (z - self.shift_factor()) * self.scaling_factor()
    }

    /// `z / scaling_factor + shift_factor`: the inverse of [`scale_latents`](Self::scale_latents).
    pub fn unscale_latents(&self, z: Tensor<4>) -> Tensor<4> {
        z / self.scaling_factor() + self.shift_factor()
    }

    /// Encodes images to the posterior over latents; tiled when `tiling` is given and the image
    /// is larger than a tile.
    ///
    /// # Shapes
    /// - `x`: `[batch, in_channels, height, width]`, height and width multiples of
    ///   [`scale_factor`](Self::scale_factor)
    /// - output: mean and logvar `[batch, latent_channels, height / f, width / f]`
    pub fn encode(
        &self,
        x: Tensor<4>,
        tiling: Option<&TilingOptions>,
    ) -> Result<DiagonalGaussianDistribution> {
        let dims = x.dims();
        let f = self.scale_factor();
        if dims[1] != self.config.in_channels
            || !dims[2].is_multiple_of(f)
            || !dims[3].is_multiple_of(f)
            || dims[2] == 0
            || dims[3] == 0
        {
            return Err(Error::InputShape {
                name: "image",
                expected: format!(
                    "[batch, {}, height, width] with height and width positive multiples of {f}",
                    self.config.in_channels
                ),
                found: dims.to_vec(),
            });
        }
        let _span = tracing::debug_span!("vae_encode", height = dims[2], width = dims[3]).entered();
        let moments = match tiling {
            Some(t) if dims[2] > t.tile_sample_size || dims[3] > t.tile_sample_size => {
                self.tiled_encode(x, t)?
            }
            _ => self.encode_moments(x),
        };
        Ok(DiagonalGaussianDistribution::from_moments(moments))
    }

    /// Decodes latents (unscaled: apply [`unscale_latents`](Self::unscale_latents) first) to
    /// images; tiled when `tiling` is given and the latent is larger than a tile.
    ///
    /// # Shapes
    /// - `z`: `[batch, latent_channels, height, width]`
    /// - output: `[batch, out_channels, height * f, width * f]`
    pub fn decode(&self, z: Tensor<4>, tiling: Option<&TilingOptions>) -> Result<Tensor<4>> {
        let dims = z.dims();
        if dims[1] != self.config.latent_channels || dims[2] == 0 || dims[3] == 0 {
            return Err(Error::InputShape {
                name: "latent",
                expected: format!("[batch, {}, height, width]", self.config.latent_channels),
                found: dims.to_vec(),
            });
        }
        let _span = tracing::debug_span!("vae_decode", height = dims[2], width = dims[3]).entered();
        match tiling {
            Some(t) => {
                let tile_latent = self.tile_latent_size(t)?;
                if dims[2] > tile_latent || dims[3] > tile_latent {
                    return self.tiled_decode(z, t);
                }
                Ok(self.decode_plain(z))
            }
            None => Ok(self.decode_plain(z)),
        }
    }

    /// FLOPs of an untiled [`encode`](Self::encode) of `batch` images of `height x width`
    /// pixels, counted as PyTorch's `FlopCounterMode` counts them ([`kiln_nn::flops`]).
    pub fn encode_flops(&self, batch: usize, height: usize, width: usize) -> u64 {
        let (flops, size) = self.encoder.flops(batch, [height, width]);
        flops
            + self
                .quant_conv
                .as_ref()
                .map_or(0, |c| kiln_nn::flops::conv2d(c, batch, size).0)
    }

    /// FLOPs of an untiled [`decode`](Self::decode) of `batch` latents of `height x width`.
    pub fn decode_flops(&self, batch: usize, height: usize, width: usize) -> u64 {
        let post = self
            .post_quant_conv
            .as_ref()
            .map_or(0, |c| kiln_nn::flops::conv2d(c, batch, [height, width]).0);
        post + self.decoder.flops(batch, [height, width]).0
    }

    fn encode_moments(&self, x: Tensor<4>) -> Tensor<4> {
        let h = self.encoder.forward(x);
        match &self.quant_conv {
            Some(conv) => conv2d(conv, h),
            None => h,
        }
    }

    fn decode_plain(&self, z: Tensor<4>) -> Tensor<4> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv2d(conv, z),
            None => z,
        };
        self.decoder.forward(z)
    }

    fn tile_latent_size(&self, t: &TilingOptions) -> Result<usize> {
        let f = self.scale_factor();
        let size = t.tile_sample_size / f;
        if size == 0 || !(0.0..1.0).contains(&t.overlap_factor) {
            return Err(Error::InvalidConfig(format!(
                "tiling needs tile_sample_size >= {f} and 0 <= overlap_factor < 1, got {} and {}",
                t.tile_sample_size, t.overlap_factor
            )));
        }
        Ok(size)
    }

    /// diffusers' `_tiled_encode`: tiles of `tile_sample_size` pixels every
    /// `tile_sample_size * (1 - overlap)` pixels, blended over `tile_latent * overlap` latent
    /// pixels and cropped to `tile_latent - blend` each.
    fn tiled_encode(&self, x: Tensor<4>, t: &TilingOptions) -> Result<Tensor<4>> {
        let tile_latent = self.tile_latent_size(t)?;
        let stride = ((t.tile_sample_size as f64) * (1.0 - t.overlap_factor)) as usize;
        let blend = ((tile_latent as f64) * t.overlap_factor) as usize;
        let [_, _, h, w] = x.dims();
        let tiles = tile_grid(h, w, stride.max(1), t.tile_sample_size, |i, j, th, tw| {
            tracing::debug!(top = i, left = j, "encoding tile");
            self.encode_moments(x.clone().slice([
                0..x.dims()[0],
                0..x.dims()[1],
                i..i + th,
                j..j + tw,
            ]))
        });
        Ok(blend_tiles(tiles, blend, tile_latent - blend))
    }

    /// diffusers' `tiled_decode`: the mirror image of [`tiled_encode`](Self::tiled_encode).
    fn tiled_decode(&self, z: Tensor<4>, t: &TilingOptions) -> Result<Tensor<4>> {
        let tile_latent = self.tile_latent_size(t)?;
        let stride = ((tile_latent as f64) * (1.0 - t.overlap_factor)) as usize;
        let blend = ((t.tile_sample_size as f64) * t.overlap_factor) as usize;
        let [b, c, h, w] = z.dims();
        let tiles = tile_grid(h, w, stride.max(1), tile_latent, |i, j, th, tw| {
            tracing::debug!(top = i, left = j, "decoding tile");
            self.decode_plain(z.clone().slice([0..b, 0..c, i..i + th, j..j + tw]))
        });
        Ok(blend_tiles(tiles, blend, t.tile_sample_size - blend))
    }
}

/// Runs `f(top, left, tile_h, tile_w)` on tiles of side `tile` starting every `stride` pixels
/// (edge tiles are smaller), row by row.
fn tile_grid(
    h: usize,
    w: usize,
    stride: usize,
    tile: usize,
    mut f: impl FnMut(usize, usize, usize, usize) -> Tensor<4>,
) -> Vec<Vec<Tensor<4>>> {
    (0..h)
        .step_by(stride)
        .map(|i| {
            (0..w)
                .step_by(stride)
                .map(|j| f(i, j, tile.min(h - i), tile.min(w - j)))
                .collect()
        })
        .collect()
}

/// Blends each tile with the (already blended) tiles above and to the left, crops it to
/// `row_limit` and stitches the result, exactly as diffusers' in-place loop does.
fn blend_tiles(mut rows: Vec<Vec<Tensor<4>>>, blend: usize, row_limit: usize) -> Tensor<4> {
    let mut result_rows = Vec::with_capacity(rows.len());
    for i in 0..rows.len() {
        let mut result_row = Vec::with_capacity(rows[i].len());
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = blend_edge(&rows[i - 1][j], tile, blend, 2);
            }
            if j > 0 {
                tile = blend_edge(&rows[i][j - 1], tile, blend, 3);
            }
            rows[i][j] = tile.clone();
            let [b, c, th, tw] = tile.dims();
            result_row.push(tile.slice([0..b, 0..c, 0..th.min(row_limit), 0..tw.min(row_limit)]));
        }
        result_rows.push(Tensor::cat(result_row, 3));
    }
    Tensor::cat(result_rows, 2)
}

/// diffusers' `blend_v` (`dim` 2) and `blend_h` (`dim` 3): the first `extent` rows (columns) of
/// `b` become `a_end * (1 - y / extent) + b * (y / extent)`, `a_end` being the last `extent` of `a`.
fn blend_edge(a: &Tensor<4>, b: Tensor<4>, extent: usize, dim: usize) -> Tensor<4> {
    let extent = extent.min(a.dims()[dim]).min(b.dims()[dim]);
    if extent == 0 {
        return b;
    }
    let device = b.device();
    let a_len = a.dims()[dim];
    let b_len = b.dims()[dim];
    let a_end = a.clone().narrow(dim, a_len - extent, extent);
    let b_start = b.clone().narrow(dim, 0, extent);
    let weights = |f: &dyn Fn(f64) -> f64| {
        let values: Vec<f32> = (0..extent)
            .map(|y| f(y as f64 / extent as f64) as f32)
            .collect();
        let mut shape = [1usize; 4];
        shape[dim] = extent;
        Tensor::<1>::from_data(TensorData::new(values, [extent]), &device)
            .cast(b.dtype())
            .reshape(shape)
    };
    let mixed = a_end * weights(&|r| 1.0 - r) + b_start * weights(&|r| r);
    if extent == b_len {
        mixed
    } else {
        Tensor::cat(vec![mixed, b.narrow(dim, extent, b_len - extent)], dim)
    }
}
