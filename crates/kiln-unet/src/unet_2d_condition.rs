//! `UNet2DConditionModel`: the text-conditioned denoiser of Stable Diffusion (Rombach et al.,
//! 2022), shaped entirely by diffusers' `unet/config.json`.
//!
//! Mirrors `UNet2DConditionModel` in `diffusers/models/unets/unet_2d_condition.py` (diffusers
//! 0.42.1) for the SD 1.x/2.x and SDXL families: positional time embedding, `CrossAttnDownBlock2D`
//! / `DownBlock2D` / `UNetMidBlock2DCrossAttn` / `UpBlock2D` / `CrossAttnUpBlock2D`, any number of
//! blocks, layers and transformer layers per block, 4 or 9 (inpainting) input channels, and
//! SDXL's `text_time` addition embedding (pooled text embedding plus size / crop / aesthetic
//! conditioning, [`AddedConditioning`]). Class and time-conditioning embeddings and the other
//! addition embeddings are rejected when the config asks for them.

use std::path::Path;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{GroupNorm, PaddingConfig2d};
use burn::tensor::{DType, Device, Tensor, TensorData};
use kiln_nn::activation::Activation;
use kiln_nn::config::read_json;
use kiln_nn::embeddings::{TimestepEmbedding, Timesteps};
use kiln_nn::normalization::{group_norm, group_norm_act};
use kiln_nn::weights::{LoadOptions, find_weights, load_safetensors};
use serde::Deserialize;

use crate::unet_2d_blocks::{
    AttentionShape, BlockContext, BlockShape, CrossAttnDownBlock2D, CrossAttnUpBlock2D, DownBlock,
    DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock, UpBlock2D,
};
use crate::{Error, Result};
use kiln_nn::conv::conv2d;

/// Down block types of the SD 1.x/2.x family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum DownBlockType {
    /// ResNets with transformers.
    CrossAttnDownBlock2D,
    /// ResNets only.
    DownBlock2D,
}

/// Up block types of the SD 1.x/2.x family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum UpBlockType {
    /// ResNets with transformers.
    CrossAttnUpBlock2D,
    /// ResNets only.
    UpBlock2D,
}

/// Mid block types of the SD 1.x/2.x family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MidBlockType {
    /// ResNet, transformer, ResNet.
    UNetMidBlock2DCrossAttn,
}

/// A config value that is one number for every block or a list with one per block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same for every block.
    One(usize),
    /// One per down block (up blocks use it reversed).
    Many(Vec<usize>),
}

impl PerBlock {
    /// One value per block, or an error naming `key` when a list has the wrong length.
    pub fn expand(&self, blocks: usize, key: &str) -> Result<Vec<usize>> {
        match self {
            Self::One(v) => Ok(vec![*v; blocks]),
            Self::Many(v) if v.len() == blocks => Ok(v.clone()),
            Self::Many(v) => Err(Error::InvalidConfig(format!(
                "`{key}` has {} entries for {blocks} blocks",
                v.len()
            ))),
        }
    }
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

/// `unet/config.json` of a diffusers pipeline (unknown keys are ignored; options of other UNet
/// families are read only to reject them).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct UNet2DConditionModelConfig {
    /// Default latent size (only a default: any size the UNet can downsample runs).
    #[serde(default)]
    pub sample_size: Option<SampleSize>,
    /// Latent channels in (4, or 9 for inpainting).
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Map the input from [0, 1] to [-1, 1] first.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Cosines first in the timestep embedding.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// `downscale_freq_shift` of the timestep embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// One per resolution level.
    #[serde(default = "default_down")]
    pub down_block_types: Vec<DownBlockType>,
    /// The bottleneck.
    #[serde(default = "default_mid")]
    pub mid_block_type: Option<MidBlockType>,
    /// One per resolution level, lowest first.
    #[serde(default = "default_up")]
    pub up_block_types: Vec<UpBlockType>,
    /// Channels per level.
    #[serde(default = "default_channels")]
    pub block_out_channels: Vec<usize>,
    /// ResNets per down block (up blocks have one more).
    #[serde(default = "two")]
    pub layers_per_block: PerBlock,
    /// 1 pads the downsamplers by one pixel on every side.
    #[serde(default = "one")]
    pub downsample_padding: usize,
    /// `output_scale_factor` of the mid block's ResNets.
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    /// Nonlinearity.
    #[serde(default = "silu")]
    pub act_fn: Activation,
    /// GroupNorm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: Option<usize>,
    /// GroupNorm epsilon of ResNets and the output norm.
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    /// Width of the text context.
    #[serde(default = "default_cross")]
    pub cross_attention_dim: PerBlock,
    /// `BasicTransformerBlock`s per transformer.
    #[serde(default = "one_per_block")]
    pub transformer_layers_per_block: PerBlock,
    /// Read as diffusers reads it: the number of heads per block when `num_attention_heads` is
    /// absent (SD 1.x's single 8, SD 2.x's `[5, 10, 20, 20]`).
    #[serde(default = "eight")]
    pub attention_head_dim: PerBlock,
    /// Heads per block (diffusers rejects it today; honoured when present).
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// Linear rather than 1x1-conv transformer projections (SD 2.x).
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Compute attention in f32 for f16/bf16 runs (SD 2.1).
    #[serde(default)]
    pub upcast_attention: bool,
    /// Width of the time embedding (default `4 * block_out_channels[0]`).
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    /// Kernel of `conv_in`.
    #[serde(default = "three")]
    pub conv_in_kernel: usize,
    /// Kernel of `conv_out`.
    #[serde(default = "three")]
    pub conv_out_kernel: usize,
    /// Must be `"default"`.
    #[serde(default = "default_str")]
    pub resnet_time_scale_shift: String,
    /// Must be `"positional"`.
    #[serde(default = "positional")]
    pub time_embedding_type: String,
    /// Unsupported when set.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Unsupported when set.
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    /// `"text_time"` (SDXL base and refiner): the pooled text embedding and the
    /// size / crop conditioning through `add_time_proj` and `add_embedding`. Other values are
    /// unsupported.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of each conditioning value's sinusoidal embedding (`text_time`; 256 in SDXL).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of `add_embedding`: the pooled text width plus `addition_time_embed_dim`
    /// per conditioning value (SDXL base: 1280 + 6 x 256; refiner: 1280 + 5 x 256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Unsupported when set.
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    /// Width of the guidance embedding a guidance-distilled (LCM) UNet adds to its time
    /// embedding through `time_embedding.cond_proj` ([`ExtraConditioning::timestep_cond`]).
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    /// Unsupported when set.
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    /// Unsupported when set.
    #[serde(default)]
    pub time_embedding_act_fn: Option<String>,
    /// Unsupported when true.
    #[serde(default)]
    pub dual_cross_attention: bool,
    /// Unsupported when true (a bool or a per-block list in diffusers).
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    /// Unsupported when set.
    #[serde(default)]
    pub reverse_transformer_layers_per_block: serde_json::Value,
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
fn one_f() -> f64 {
    1.0
}
fn thirty_two() -> Option<usize> {
    Some(32)
}
fn two() -> PerBlock {
    PerBlock::One(2)
}
fn one_per_block() -> PerBlock {
    PerBlock::One(1)
}
fn eight() -> PerBlock {
    PerBlock::One(8)
}
fn default_cross() -> PerBlock {
    PerBlock::One(1280)
}
fn yes() -> bool {
    true
}
fn silu() -> Activation {
    Activation::Silu
}
fn default_eps() -> f64 {
    1e-5
}
fn default_str() -> String {
    "default".into()
}
fn positional() -> String {
    "positional".into()
}
fn default_down() -> Vec<DownBlockType> {
    use DownBlockType::*;
    vec![
        CrossAttnDownBlock2D,
        CrossAttnDownBlock2D,
        CrossAttnDownBlock2D,
        DownBlock2D,
    ]
}
fn default_up() -> Vec<UpBlockType> {
    use UpBlockType::*;
    vec![
        UpBlock2D,
        CrossAttnUpBlock2D,
        CrossAttnUpBlock2D,
        CrossAttnUpBlock2D,
    ]
}
fn default_mid() -> Option<MidBlockType> {
    Some(MidBlockType::UNetMidBlock2DCrossAttn)
}
fn default_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}

/// Per-block values resolved from a config, as diffusers' `__init__` resolves them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Resolved {
    layers: Vec<usize>,
    heads: Vec<usize>,
    cross: Vec<usize>,
    transformer_layers: Vec<usize>,
    groups: usize,
}

impl UNet2DConditionModelConfig {
    /// Reads `config.json`, then checks it with [`validate`](Self::validate).
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path, "UNet config")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks that the values describe a UNet Kiln can build.
    pub fn validate(&self) -> Result<()> {
        self.resolve().map(|_| ())
    }

    fn resolve(&self) -> Result<Resolved> {
        let fail = |m: String| Err(Error::InvalidConfig(m));
        let n = self.block_out_channels.len();
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
        let unsupported = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            (
                "addition_embed_type",
                self.addition_embed_type
                    .as_deref()
                    .is_some_and(|t| t != "text_time"),
            ),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            (
                "time_embedding_act_fn",
                self.time_embedding_act_fn.is_some(),
            ),
            ("dual_cross_attention", self.dual_cross_attention),
            ("mid_block_type", self.mid_block_type.is_none()),
            (
                "only_cross_attention",
                !matches!(
                    self.only_cross_attention,
                    serde_json::Value::Null | serde_json::Value::Bool(false)
                ),
            ),
            (
                "reverse_transformer_layers_per_block",
                !self.reverse_transformer_layers_per_block.is_null(),
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift != "default",
            ),
            (
                "time_embedding_type",
                self.time_embedding_type != "positional",
            ),
        ];
        if let Some((key, _)) = unsupported.iter().find(|(_, bad)| *bad) {
            return fail(format!(
                "`{key}` asks for a UNet variant outside the SD 1.x/2.x family, which Kiln does not implement"
            ));
        }
        if self.addition_embed_type.is_some() {
            match (
                self.addition_time_embed_dim,
                self.projection_class_embeddings_input_dim,
            ) {
                (Some(d), Some(p)) if d > 0 && d.is_multiple_of(2) && p > d => {}
                (d, p) => {
                    return fail(format!(
                        "`addition_embed_type: \"text_time\"` needs a positive even \
                         `addition_time_embed_dim` and a larger \
                         `projection_class_embeddings_input_dim`; found {d:?} and {p:?}"
                    ));
                }
            }
        }
        let Some(groups) = self.norm_num_groups.filter(|g| *g > 0) else {
            return fail("norm_num_groups must be a positive number".into());
        };
        let heads_spec = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim);
        let resolved = Resolved {
            layers: self.layers_per_block.expand(n, "layers_per_block")?,
            heads: heads_spec.expand(n, "attention_head_dim")?,
            cross: self.cross_attention_dim.expand(n, "cross_attention_dim")?,
            transformer_layers: self
                .transformer_layers_per_block
                .expand(n, "transformer_layers_per_block")?,
            groups,
        };
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c == 0 || !c.is_multiple_of(groups) {
                return fail(format!(
                    "block_out_channels[{i}] = {c} is not a positive multiple of norm_num_groups {groups}"
                ));
            }
            let h = resolved.heads[i];
            if h == 0 || !c.is_multiple_of(h) {
                return fail(format!(
                    "block_out_channels[{i}] = {c} cannot be split into {h} attention heads"
                ));
            }
        }
        if resolved.layers.contains(&0) || self.in_channels == 0 || self.out_channels == 0 {
            return fail("layers_per_block, in_channels and out_channels must be positive".into());
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return fail("conv_in_kernel and conv_out_kernel must be odd".into());
        }
        Ok(resolved)
    }

    /// The `text_time` addition embedding's widths, `(addition_time_embed_dim,
    /// projection_class_embeddings_input_dim)`, when the config has one (SDXL).
    pub fn text_time(&self) -> Option<(usize, usize)> {
        match self.addition_embed_type.as_deref() {
            Some("text_time") => self
                .addition_time_embed_dim
                .zip(self.projection_class_embeddings_input_dim),
            _ => None,
        }
    }

    /// Downsamplers in the UNet: `len(block_out_channels) - 1`.
    pub fn num_downsamplers(&self) -> usize {
        self.block_out_channels.len().saturating_sub(1)
    }
}

/// SDXL's extra conditioning of the UNet (diffusers' `added_cond_kwargs`), for a UNet whose
/// config has `addition_embed_type: "text_time"`.
#[derive(Debug, Clone)]
pub struct AddedConditioning {
    /// The pooled text embedding (the projected output of the last text encoder):
    /// `[batch, width]`.
    pub text_embeds: Tensor<2>,
    /// The conditioning values of each sample, `[batch, n]`: the base's original size
    /// `(h, w)`, crop top-left `(y, x)` and target size `(h, w)` (n = 6), or the refiner's
    /// original size, crop and aesthetic score (n = 5).
    pub time_ids: Tensor<2>,
}

/// What conditions the UNet besides the sample, the timestep and the text context; each part is
/// present exactly when the UNet's config asks for it.
#[derive(Debug, Clone, Default)]
pub struct ExtraConditioning {
    /// SDXL's pooled text embedding and time ids (`addition_embed_type: "text_time"`).
    pub added: Option<AddedConditioning>,
    /// A guidance-distilled (LCM) UNet's guidance embedding, `[batch, time_cond_proj_dim]`
    /// (diffusers' `timestep_cond`; [`guidance_scale_embedding`]).
    pub timestep_cond: Option<Tensor<2>>,
}

/// The sinusoidal embedding of guidance scales `w` that guidance-distilled (LCM) UNets take as
/// `timestep_cond`, `[w.len(), dim]`: diffusers' `get_guidance_scale_embedding` (Meng et al.
/// 2023; the pipelines pass `guidance_scale - 1`), in f32: `w * 1000` times
/// `exp(-ln(10000) i / (dim/2 - 1))`, sines then cosines, a zero column for an odd `dim`.
pub fn guidance_scale_embedding(w: &[f32], dim: usize, device: &Device) -> Tensor<2> {
    let half = dim / 2;
    let step = 10000f32.ln() / (half.max(2) - 1) as f32;
    let freqs: Vec<f32> = (0..half).map(|i| (i as f32 * -step).exp()).collect();
    let mut values = Vec::with_capacity(w.len() * dim);
    for &scale in w {
        let scaled = scale * 1000.0;
        values.extend(freqs.iter().map(|f| (scaled * f).sin()));
        values.extend(freqs.iter().map(|f| (scaled * f).cos()));
        if dim % 2 == 1 {
            values.push(0.0);
        }
    }
    Tensor::from_data(TensorData::new(values, [w.len(), dim]), device)
}

/// The conditional UNet.
#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    /// `in_channels -> block_out_channels[0]`.
    pub conv_in: Conv2d,
    /// MLP over the sinusoidal timestep embedding.
    pub time_embedding: TimestepEmbedding,
    /// SDXL's `text_time` embedding: MLP over the pooled text embedding and the sinusoidal
    /// embeddings of the conditioning values, added to the time embedding.
    pub add_embedding: Option<TimestepEmbedding>,
    /// Down blocks, highest resolution first.
    pub down_blocks: Vec<DownBlock>,
    /// The bottleneck.
    pub mid_block: UNetMidBlock2DCrossAttn,
    /// Up blocks, lowest resolution first.
    pub up_blocks: Vec<UpBlock>,
    /// Output GroupNorm (followed by the activation).
    pub conv_norm_out: GroupNorm,
    /// `block_out_channels[0] -> out_channels`.
    pub conv_out: Conv2d,
    /// The config the model was built from.
    #[module(skip)]
    pub config: UNet2DConditionModelConfig,
}

/// Weight file names tried in a diffusers `unet/` folder, full precision first, safetensors
/// before the pickle files of older repos.
pub const WEIGHT_FILES: [&str; 5] = [
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bf16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
];

fn conv(cin: usize, cout: usize, kernel: usize, device: &Device) -> Conv2d {
    let p = (kernel - 1) / 2;
    Conv2dConfig::new([cin, cout], [kernel, kernel])
        .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
        .init(device)
}

impl UNet2DConditionModel {
    /// A UNet of `config`'s shape with fresh weights for training from scratch, drawn from
    /// `seed` with PyTorch's layer defaults, as diffusers builds one from a config
    /// ([`kiln_nn::init::pytorch_default`]). The same seed gives the same model on every backend.
    pub fn init(config: &UNet2DConditionModelConfig, seed: u64, device: &Device) -> Result<Self> {
        Ok(kiln_nn::init::initialize(
            Self::new(config, device)?,
            seed,
            kiln_nn::init::pytorch_default,
        ))
    }

    /// A randomly initialised UNet for `config` (load weights afterwards).
    pub fn new(config: &UNet2DConditionModelConfig, device: &Device) -> Result<Self> {
        let r = config.resolve()?;
        let channels = &config.block_out_channels;
        let n = channels.len();
        let temb = config.time_embedding_dim.unwrap_or(4 * channels[0]);
        let ctx = BlockContext {
            temb_channels: temb,
            groups: r.groups,
            eps: config.norm_eps,
            act: config.act_fn,
            use_linear_projection: config.use_linear_projection,
            upcast_attention: config.upcast_attention,
        };
        let attn = |i: usize| AttentionShape {
            heads: r.heads[i],
            layers: r.transformer_layers[i],
            cross_attention_dim: r.cross[i],
        };

        // Down blocks: in = previous out (the first takes block_out_channels[0]).
        let mut output = channels[0];
        let mut down_blocks = Vec::with_capacity(n);
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let input = output;
            output = channels[i];
            let shape = BlockShape {
                in_channels: input,
                out_channels: output,
                prev_output_channels: 0,
                num_layers: r.layers[i],
                resample: i + 1 < n,
            };
            down_blocks.push(match kind {
                DownBlockType::CrossAttnDownBlock2D => {
                    DownBlock::CrossAttnDownBlock2D(CrossAttnDownBlock2D::new(
                        &shape,
                        &attn(i),
                        config.downsample_padding,
                        &ctx,
                        device,
                    ))
                }
                DownBlockType::DownBlock2D => DownBlock::DownBlock2D(DownBlock2D::new(
                    &shape,
                    config.downsample_padding,
                    &ctx,
                    device,
                )),
            });
        }

        let mid_block = UNetMidBlock2DCrossAttn::new(
            channels[n - 1],
            &attn(n - 1),
            config.mid_block_scale_factor,
            &ctx,
            device,
        );

        // Up blocks walk the levels in reverse; per-block lists are reversed with them.
        let mut output = channels[n - 1];
        let mut up_blocks = Vec::with_capacity(n);
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let level = n - 1 - i;
            let prev = output;
            output = channels[level];
            let shape = BlockShape {
                in_channels: channels[level.saturating_sub(1)],
                out_channels: output,
                prev_output_channels: prev,
                num_layers: r.layers[level] + 1,
                resample: i + 1 < n,
            };
            up_blocks.push(match kind {
                UpBlockType::CrossAttnUpBlock2D => UpBlock::CrossAttnUpBlock2D(
                    CrossAttnUpBlock2D::new(&shape, &attn(level), &ctx, device),
                ),
                UpBlockType::UpBlock2D => UpBlock::UpBlock2D(UpBlock2D::new(&shape, &ctx, device)),
            });
        }

        Ok(Self {
            conv_in: conv(
                config.in_channels,
                channels[0],
                config.conv_in_kernel,
                device,
            ),
            time_embedding: match config.time_cond_proj_dim {
                Some(dim) => TimestepEmbedding::new(channels[0], temb, config.act_fn, device)
                    .with_cond_proj(dim, device),
                None => TimestepEmbedding::new(channels[0], temb, config.act_fn, device),
            },
            // diffusers builds it with TimestepEmbedding's default activation, whatever act_fn is
            add_embedding: config
                .text_time()
                .map(|(_, input)| TimestepEmbedding::new(input, temb, Activation::Silu, device)),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(r.groups, channels[0], config.norm_eps, device),
            conv_out: conv(
                channels[0],
                config.out_channels,
                config.conv_out_kernel,
                device,
            ),
            config: config.clone(),
        })
    }

    /// Loads a diffusers `unet/` folder: `config.json` and the first of [`WEIGHT_FILES`]
    /// present (the `.fp16.` file first when `dtype` is F16), converted to `dtype`.
    pub fn from_pretrained(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        kiln_nn::config::require_dir(dir, "UNet folder")?;
        let config = UNet2DConditionModelConfig::from_file(&dir.join("config.json"))?;
        let mut candidates = WEIGHT_FILES.to_vec();
        if dtype == DType::F16 {
            candidates.swap(0, 1);
        }
        let weights = find_weights(dir, &candidates, "UNet weights")?;
        Self::new(&config, device)?.load_weights(&weights, dtype)
    }

    /// Loads a weights file (safetensors, or a pickle `.bin`) with diffusers' key names,
    /// strictly, converting to `dtype`.
    pub fn load_weights(self, path: &Path, dtype: DType) -> Result<Self> {
        let options = LoadOptions::default().with_dtype(dtype);
        Ok(load_safetensors(self, path, &options)?)
    }

    /// FLOPs of one [`forward`](Self::forward) on `batch` latents of `height x width` with
    /// `context_tokens` text tokens, counted as PyTorch's `FlopCounterMode` counts them
    /// ([`kiln_nn::flops`]; checked against it in `tests/flops.rs`).
    pub fn flops(&self, batch: usize, height: usize, width: usize, context_tokens: usize) -> u64 {
        let mut count = crate::unet_2d_blocks::FlopCount {
            batch,
            context_tokens,
            skips: Vec::new(),
        };
        let (mut flops, mut size) = kiln_nn::flops::conv2d(&self.conv_in, batch, [height, width]);
        flops += self.time_embedding.flops(batch);
        flops += self.add_embedding.as_ref().map_or(0, |e| e.flops(batch));
        count.skips.push(size);
        for block in &self.down_blocks {
            let (f, s) = block.flops(&mut count, size);
            flops += f;
            size = s;
        }
        flops += self.mid_block.flops(&count, size);
        for block in &self.up_blocks {
            let (f, s) = block.flops(&mut count, size);
            flops += f;
            size = s;
        }
        flops + kiln_nn::flops::conv2d(&self.conv_out, batch, size).0
    }

    /// The float dtype of the weights, which is the dtype `forward` computes in (the caller
    /// casts the inputs to it).
    pub fn dtype(&self) -> DType {
        self.conv_in.weight.val().dtype()
    }

    /// The time-embedding projection (no parameters) this config describes.
    fn time_proj(&self) -> Timesteps {
        Timesteps::new(
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )
    }

    /// Latent sizes that are multiples of this go down and back up by exact halvings; any other
    /// positive size runs too, the upsamplers meeting the odd skip sizes as diffusers does.
    pub fn size_multiple(&self) -> usize {
        1 << self.config.num_downsamplers()
    }

    fn check_inputs(
        &self,
        sample: &Tensor<4>,
        timesteps: &Tensor<1>,
        context: &Tensor<3>,
    ) -> Result<()> {
        let [b, c, h, w] = sample.dims();
        if c != self.config.in_channels || b == 0 {
            return Err(Error::InputShape {
                name: "sample",
                expected: format!("[batch, {}, height, width]", self.config.in_channels),
                found: sample.dims().to_vec(),
            });
        }
        if h == 0 || w == 0 {
            return Err(Error::SpatialSize {
                height: h,
                width: w,
            });
        }
        let t = timesteps.dims()[0];
        if t != 1 && t != b {
            return Err(Error::InputShape {
                name: "timesteps",
                expected: format!("[1] or [{b}] (one per sample)"),
                found: vec![t],
            });
        }
        let [cb, tokens, width] = context.dims();
        let widths = self
            .down_blocks
            .iter()
            .flat_map(|d| d.attentions())
            .chain(&self.mid_block.attentions)
            .chain(self.up_blocks.iter().flat_map(|u| u.attentions()))
            .filter_map(|t| t.context_dim());
        for expected in widths {
            if cb != b || tokens == 0 || width != expected {
                return Err(Error::InputShape {
                    name: "encoder_hidden_states",
                    expected: format!("[{b}, tokens, {expected}]"),
                    found: context.dims().to_vec(),
                });
            }
        }
        Ok(())
    }

    /// Checks the guidance embedding against the UNet: present exactly when the config has
    /// `time_cond_proj_dim`, `[batch, time_cond_proj_dim]`.
    fn check_timestep_cond(&self, batch: usize, cond: Option<&Tensor<2>>) -> Result<()> {
        match (self.config.time_cond_proj_dim, cond) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(Error::InvalidConfig(
                "a guidance embedding (timestep_cond) was given, but this UNet's config has no \
                 `time_cond_proj_dim`: it is not guidance-distilled"
                    .into(),
            )),
            (Some(dim), None) => Err(Error::InvalidConfig(format!(
                "this UNet is guidance-distilled (LCM, `time_cond_proj_dim` {dim}): give its \
                 guidance embedding as `timestep_cond` (kiln_unet::guidance_scale_embedding)"
            ))),
            (Some(dim), Some(c)) if c.dims() != [batch, dim] => Err(Error::InputShape {
                name: "timestep_cond",
                expected: format!("[{batch}, {dim}]"),
                found: c.dims().to_vec(),
            }),
            _ => Ok(()),
        }
    }

    /// Checks the added conditioning against the UNet: present exactly when the config has a
    /// `text_time` embedding, `[batch, width]` and `[batch, n]` with `width + n *
    /// addition_time_embed_dim` the embedding's input width.
    fn check_added(&self, batch: usize, added: Option<&AddedConditioning>) -> Result<()> {
        let shape = |name, expected: String, found: Vec<usize>| {
            Err(Error::InputShape {
                name,
                expected,
                found,
            })
        };
        match (self.config.text_time(), added) {
            (None, None) => Ok(()),
            (None, Some(_)) => Err(Error::InvalidConfig(
                "added conditioning (pooled text embedding and time ids) was given, but this \
                 UNet's config has no `addition_embed_type: \"text_time\"`; call `forward`"
                    .into(),
            )),
            (Some(_), None) => Err(Error::InvalidConfig(
                "this UNet (SDXL) is conditioned on a pooled text embedding and time ids \
                 (`addition_embed_type: \"text_time\"`); call `forward_with` with them"
                    .into(),
            )),
            (Some((dim, input)), Some(a)) => {
                let [tb, width] = a.text_embeds.dims();
                let [ib, n] = a.time_ids.dims();
                if tb != batch || width == 0 || width >= input {
                    return shape(
                        "text_embeds",
                        format!("[{batch}, width] with width below {input}"),
                        a.text_embeds.dims().to_vec(),
                    );
                }
                if ib != batch || width + n * dim != input {
                    return shape(
                        "time_ids",
                        format!(
                            "[{batch}, {}] (the UNet's add_embedding takes {input} = {width} + n x {dim})",
                            (input - width) / dim
                        ),
                        a.time_ids.dims().to_vec(),
                    );
                }
                Ok(())
            }
        }
    }

    /// Predicts the noise (or `v`) for `sample` at `timesteps`, conditioned on
    /// `encoder_hidden_states`: [`forward_with`](Self::forward_with) for a UNet without added
    /// conditioning (SD 1.x / 2.x).
    ///
    /// # Shapes
    /// - `sample`: `[batch, in_channels, height, width]`, any positive size (see
    ///   [`size_multiple`](Self::size_multiple))
    /// - `timesteps`: `[batch]` or `[1]` (broadcast), any float or integer values
    /// - `encoder_hidden_states`: `[batch, tokens, cross_attention_dim]`
    /// - output: `[batch, out_channels, height, width]`
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
    ) -> Result<Tensor<4>> {
        self.forward_with(
            sample,
            timesteps,
            encoder_hidden_states,
            &ExtraConditioning::default(),
        )
    }

    /// [`forward`](Self::forward) with the conditioning some UNets take besides the text
    /// ([`ExtraConditioning`]): SDXL's added conditioning, which a UNet with a `text_time`
    /// embedding requires and any other refuses, and a guidance-distilled UNet's guidance
    /// embedding, likewise.
    ///
    /// # Shapes
    /// As [`forward`](Self::forward), and [`ExtraConditioning`]'s tensors with `batch` rows.
    pub fn forward_with(
        &self,
        sample: Tensor<4>,
        timesteps: Tensor<1>,
        encoder_hidden_states: Tensor<3>,
        extra: &ExtraConditioning,
    ) -> Result<Tensor<4>> {
        self.check_inputs(&sample, &timesteps, &encoder_hidden_states)?;
        let [batch, _, height, width] = sample.dims();
        let added = extra.added.as_ref();
        self.check_added(batch, added)?;
        self.check_timestep_cond(batch, extra.timestep_cond.as_ref())?;
        let _span = tracing::debug_span!("unet_forward", batch, height, width).entered();
        let dtype = sample.dtype();
        let context = encoder_hidden_states;

        // 0. center input if necessary
        let sample = if self.config.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample
        };

        // 1. time: sinusoidal projection (f32), cast to the run's dtype, then the MLP
        let timesteps = if timesteps.dims()[0] == batch {
            timesteps
        } else {
            timesteps.expand([batch])
        };
        let t_emb = self.time_proj().forward(timesteps).cast(dtype);
        let cond = extra.timestep_cond.clone().map(|c| c.cast(dtype));
        let mut emb = self.time_embedding.forward_with(t_emb, cond);
        // SDXL: sinusoidal embeddings of the time ids (f32) after the pooled text embedding,
        // through add_embedding, added to the time embedding
        if let (Some(embedding), Some(added), Some((dim, _))) =
            (&self.add_embedding, added, self.config.text_time())
        {
            let n = added.time_ids.dims()[1];
            let ids = added.time_ids.clone().cast(DType::F32).reshape([batch * n]);
            let proj = Timesteps::new(dim, self.config.flip_sin_to_cos, self.config.freq_shift);
            let time_embeds = proj.forward(ids).reshape([batch, n * dim]);
            let text = added.text_embeds.clone().cast(DType::F32);
            let add = Tensor::cat(vec![text, time_embeds], 1).cast(dtype);
            emb = emb + embedding.forward(add);
        }
        // 2. pre-process
        let mut x = conv2d(&self.conv_in, sample);

        // 3. down, keeping every intermediate state as a skip connection
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &emb, &context, &mut skips);
        }

        // 4. mid
        x = self.mid_block.forward(x, &emb, &context);

        // 5. up, each block popping one skip per ResNet
        for block in &self.up_blocks {
            x = block.forward(x, &emb, &context, &mut skips);
        }

        // 6. post-process
        let x = group_norm_act(&self.conv_norm_out, self.config.act_fn, x);
        Ok(conv2d(&self.conv_out, x))
    }
}
