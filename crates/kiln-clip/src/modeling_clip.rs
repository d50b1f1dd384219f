//! `CLIPTextModel`: the text tower of CLIP (Radford et al. 2021, "Learning Transferable Visual
//! Models From Natural Language Supervision"), mirroring transformers'
//! `models/clip/modeling_clip.py` (v5): token + position embeddings, pre-norm causal transformer
//! layers, final layer norm, and the pooled output at the end-of-text token.
//!
//! Field names are transformers' checkpoint keys, so `model.safetensors` loads with no table; the
//! hub's Stable Diffusion repos prefix every key with `text_model.`, which loading strips.

use std::path::Path;

use burn::module::{Module, Param};
use burn::nn::{
    Embedding, EmbeddingConfig, Initializer, LayerNorm, LayerNormConfig, Linear, LinearConfig,
};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln_nn::activation::Activation;
use kiln_nn::init::{Init, ParamInfo, initialize};
use kiln_nn::weights::{LoadOptions, find_weights, load_safetensors};

use crate::configuration_clip::ClipTextConfig;
use crate::prompt::PromptWindows;
use crate::{Error, Result};
use kiln_nn::linear::linear as layer;

/// Weight files tried in a text-encoder folder, in order, for a run in full precision
/// (safetensors before the pickle files of older repos).
pub const WEIGHT_FILES: [&str; 5] = [
    "model.safetensors",
    "model.fp16.safetensors",
    "model.bf16.safetensors",
    "pytorch_model.bin",
    "pytorch_model.fp16.bin",
];

fn linear(d_in: usize, d_out: usize, device: &Device) -> Linear {
    LinearConfig::new(d_in, d_out)
        .with_initializer(Initializer::Zeros)
        .init(device)
}

/// Token and position embeddings (`embeddings.*`).
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings {
    /// `[vocab_size, hidden_size]`.
    pub token_embedding: Embedding,
    /// `[max_position_embeddings, hidden_size]`.
    pub position_embedding: Embedding,
}

impl ClipTextEmbeddings {
    fn new(config: &ClipTextConfig, device: &Device) -> Self {
        let embedding = |n: usize| {
            EmbeddingConfig::new(n, config.hidden_size)
                .with_initializer(Initializer::Zeros)
                .init(device)
        };
        Self {
            token_embedding: embedding(config.vocab_size),
            position_embedding: embedding(config.max_position_embeddings),
        }
    }

    /// # Shapes
    /// `input_ids` `[batch, seq]` -> `[batch, seq, hidden]`.
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, seq] = input_ids.dims();
        let device = input_ids.device();
        let positions = Tensor::<1, Int>::arange(0..seq as i64, &device).unsqueeze::<2>();
        self.token_embedding.forward(input_ids) + self.position_embedding.forward(positions)
    }
}

/// Multi-head self-attention with a causal mask (`self_attn.*`).
#[derive(Module, Debug)]
pub struct ClipAttention {
    /// Query projection.
    pub q_proj: Linear,
    /// Key projection.
    pub k_proj: Linear,
    /// Value projection.
    pub v_proj: Linear,
    /// Output projection.
    pub out_proj: Linear,
    #[module(skip)]
    num_heads: usize,
}

impl ClipAttention {
    fn new(config: &ClipTextConfig, device: &Device) -> Self {
        let h = config.hidden_size;
        Self {
            q_proj: linear(h, h, device),
            k_proj: linear(h, h, device),
            v_proj: linear(h, h, device),
            out_proj: linear(h, h, device),
            num_heads: config.num_attention_heads,
        }
    }

    /// # Shapes
    /// `x` `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, s, h] = x.dims();
        let heads = self.num_heads;
        // [b, s, h] -> [b, heads, s, head_dim]
        let split = |t: Tensor<3>| t.reshape([b, s, heads, h / heads]).swap_dims(1, 2);
        let q = split(layer(&self.q_proj, x.clone()));
        let k = split(layer(&self.k_proj, x.clone()));
        let v = split(layer(&self.v_proj, x));
        let options = AttentionModuleOptions {
            is_causal: true,
            ..Default::default()
        };
        let describe = || {
            let d = h / heads;
            let op = format!("causal {b}x{heads}x{s}x{s}x{d}");
            (op, kiln_nn::flops::attention(b * heads, s, s, d))
        };
        let out = kiln_nn::profile::timed(kiln_nn::profile::OpKind::Attention, describe, || {
            attention(q, k, v, None, None, options)
        });
        // [b, heads, s, head_dim] -> [b, s, h]
        layer(&self.out_proj, out.swap_dims(1, 2).reshape([b, s, h]))
    }
}

/// The feed-forward block (`mlp.*`): `fc2(act(fc1(x)))`.
#[derive(Module, Debug)]
pub struct ClipMlp {
    /// `hidden -> intermediate`.
    pub fc1: Linear,
    /// `intermediate -> hidden`.
    pub fc2: Linear,
    #[module(skip)]
    activation: Activation,
}

impl ClipMlp {
    fn new(config: &ClipTextConfig, device: &Device) -> Self {
        Self {
            fc1: linear(config.hidden_size, config.intermediate_size, device),
            fc2: linear(config.intermediate_size, config.hidden_size, device),
            activation: config.hidden_act,
        }
    }

    /// # Shapes
    /// `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        layer(&self.fc2, self.activation.forward(layer(&self.fc1, x)))
    }
}

/// One pre-norm transformer layer (`encoder.layers.N.*`).
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    /// Causal self-attention.
    pub self_attn: ClipAttention,
    /// Norm before attention.
    pub layer_norm1: LayerNorm,
    /// Feed-forward.
    pub mlp: ClipMlp,
    /// Norm before the feed-forward.
    pub layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn new(config: &ClipTextConfig, device: &Device) -> Self {
        let norm = || {
            LayerNormConfig::new(config.hidden_size)
                .with_epsilon(config.layer_norm_eps)
                .init(device)
        };
        Self {
            self_attn: ClipAttention::new(config, device),
            layer_norm1: norm(),
            mlp: ClipMlp::new(config, device),
            layer_norm2: norm(),
        }
    }

    /// # Shapes
    /// `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// The stack of layers (`encoder.*`).
#[derive(Module, Debug)]
pub struct ClipEncoder {
    /// `encoder.layers.0 .. N-1`.
    pub layers: Vec<ClipEncoderLayer>,
}

/// Which hidden state [`ClipTextModel::forward`] returns as `hidden_state`.
///
/// A plain number converts to [`Normed`](Self::Normed): the `clip_skip` of diffusers' SD 1.x /
/// 2.x pipelines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HiddenLayer {
    /// The output of the layer `skip` layers before the last, through the final layer norm: 0 is
    /// transformers' `last_hidden_state`, 1 what the A1111 web UI calls "Clip skip: 2".
    Normed(usize),
    /// The output of the layer `skip` layers before the last, without the final layer norm:
    /// transformers' `hidden_states[-(skip + 1)]`. SDXL reads `Raw(clip_skip + 1)`.
    Raw(usize),
}

impl HiddenLayer {
    /// Layers counted back from the last.
    pub fn skip(self) -> usize {
        match self {
            Self::Normed(s) | Self::Raw(s) => s,
        }
    }
}

impl From<usize> for HiddenLayer {
    fn from(clip_skip: usize) -> Self {
        Self::Normed(clip_skip)
    }
}

/// What [`ClipTextModel::forward`] returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// The chosen layer's hidden state ([`HiddenLayer`]): `[batch, seq, hidden]`.
    pub hidden_state: Tensor<3>,
    /// The last layer's normed state at each sequence's end-of-text token: `[batch, hidden]`
    /// (transformers' `pooler_output`).
    pub pooled: Tensor<2>,
    /// `text_projection` of `pooled`, `[batch, projection_dim]`, for a model with a projection
    /// (transformers' `text_embeds`; SDXL's pooled prompt embedding).
    pub text_embeds: Option<Tensor<2>>,
}

/// The CLIP text encoder: transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when
/// the config's `architectures` names it.
#[derive(Module, Debug)]
pub struct ClipTextModel {
    /// Token and position embeddings.
    pub embeddings: ClipTextEmbeddings,
    /// The transformer layers.
    pub encoder: ClipEncoder,
    /// The norm applied to the output.
    pub final_layer_norm: LayerNorm,
    /// `hidden_size -> projection_dim`, no bias (`CLIPTextModelWithProjection` only).
    pub text_projection: Option<Linear>,
    #[module(skip)]
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// FLOPs of one [`forward`](Self::forward) on `batch` sequences of `tokens` tokens, counted
    /// as PyTorch's `FlopCounterMode` counts them ([`kiln_nn::flops`]).
    pub fn flops(&self, batch: usize, tokens: usize) -> u64 {
        use kiln_nn::flops::{attention, linear};
        let rows = batch * tokens;
        let heads = self.config.num_attention_heads;
        let head_dim = self.config.hidden_size / heads;
        self.encoder
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                linear(&a.q_proj, rows)
                    + linear(&a.k_proj, rows)
                    + linear(&a.v_proj, rows)
                    + attention(batch * heads, tokens, tokens, head_dim)
                    + linear(&a.out_proj, rows)
                    + linear(&l.mlp.fc1, rows)
                    + linear(&l.mlp.fc2, rows)
            })
            .sum()
    }

    /// A model of `config`'s shape with zero weights (load weights next).
    pub fn new(config: &ClipTextConfig, device: &Device) -> Self {
        Self {
            embeddings: ClipTextEmbeddings::new(config, device),
            encoder: ClipEncoder {
                layers: (0..config.num_hidden_layers)
                    .map(|_| ClipEncoderLayer::new(config, device))
                    .collect(),
            },
            final_layer_norm: LayerNormConfig::new(config.hidden_size)
                .with_epsilon(config.layer_norm_eps)
                .init(device),
            text_projection: config.has_projection().then(|| {
                LinearConfig::new(config.hidden_size, config.projection_dim)
                    .with_bias(false)
                    .with_initializer(Initializer::Zeros)
                    .init(device)
            }),
            config: config.clone(),
        }
    }

    /// A model of `config`'s shape with fresh weights for training from scratch, drawn from
    /// `seed` as transformers' `CLIPTextModel` initialises them (`initializer_range` 0.02,
    /// `initializer_factor` 1): embeddings normal with std 0.02; q/k/v and `fc2` normal with std
    /// `hidden^-0.5 (2 layers)^-0.5`, `out_proj` and `text_projection` `hidden^-0.5`, `fc1`
    /// `(2 hidden)^-0.5`; linear biases 0; layer norms 1 and 0. The same seed gives the same model on every backend.
    pub fn init(config: &ClipTextConfig, seed: u64, device: &Device) -> Self {
        let hidden = config.hidden_size as f64;
        let in_proj = hidden.powf(-0.5) * (2.0 * config.num_hidden_layers.max(1) as f64).powf(-0.5);
        let rule = |p: &ParamInfo<'_>| {
            let name = p.name;
            if p.is_norm {
                return kiln_nn::init::pytorch_default(p);
            }
            if name.ends_with(".bias") {
                return Init::Constant(0.0);
            }
            if name.starts_with("embeddings.") {
                Init::Normal(0.02)
            } else if name.ends_with("out_proj.weight") || name.starts_with("text_projection") {
                Init::Normal(hidden.powf(-0.5))
            } else if name.ends_with("fc1.weight") {
                Init::Normal((2.0 * hidden).powf(-0.5))
            } else {
                // q_proj, k_proj, v_proj, fc2
                Init::Normal(in_proj)
            }
        };
        initialize(Self::new(config, device), seed, rule)
    }

    /// Loads a text-encoder folder: `config.json` and the first weight file found of
    /// [`WEIGHT_FILES`] (or a model folder with a `text_encoder/` subfolder).
    pub fn from_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        kiln_nn::config::require_dir(dir, "text encoder folder")?;
        let dir = if dir.join("text_encoder").is_dir() {
            dir.join("text_encoder")
        } else {
            dir.to_path_buf()
        };
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let weights = find_weights(&dir, &WEIGHT_FILES, "text encoder weights")?;
        Self::new(&config, device).load(&weights)
    }

    /// Loads weights from a safetensors (or pickle `.bin`) file with transformers' key names,
    /// with or without the `text_model.` prefix; f16 and bf16 files are converted to f32.
    pub fn load(self, path: &Path) -> Result<Self> {
        Ok(load_safetensors(self, path, &load_options())?)
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Encodes rows of token ids (each as long as the others), as [`forward`](Self::forward) does.
    pub fn encode_ids(
        &self,
        rows: &[Vec<u32>],
        layer: impl Into<HiddenLayer>,
        device: &Device,
    ) -> Result<ClipTextOutput> {
        let seq = rows.first().map(Vec::len).unwrap_or(0);
        if rows.is_empty() || rows.iter().any(|r| r.len() != seq) {
            return Err(Error::InvalidInput(
                "give at least one row of ids, all of the same length".into(),
            ));
        }
        let flat: Vec<i64> = rows.iter().flatten().map(|&id| i64::from(id)).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(flat, [rows.len(), seq]), device);
        self.forward(ids, layer)
    }

    /// Encodes a prompt's windows (from
    /// [`ClipTokenizer::tokenize_prompt`](crate::ClipTokenizer::tokenize_prompt)): each window
    /// separately, its hidden states multiplied by the token weights and rescaled so that the
    /// window's mean is what it was unweighted (the A1111 web UI's "Original" emphasis), the
    /// windows concatenated along the sequence axis: `hidden_state` `[1, windows * seq, hidden]`.
    /// Unweighted windows are used exactly as encoded. `pooled` and `text_embeds` are the first
    /// window's (`[1, hidden]`, `[1, projection_dim]`), as the A1111 web UI pools a long prompt.
    pub fn encode_windows(
        &self,
        windows: &PromptWindows,
        layer: impl Into<HiddenLayer>,
        device: &Device,
    ) -> Result<ClipTextOutput> {
        if windows.weights.len() != windows.ids.len()
            || windows
                .weights
                .iter()
                .zip(&windows.ids)
                .any(|(w, ids)| w.len() != ids.len())
        {
            return Err(Error::InvalidInput(
                "prompt windows need one weight per token id".into(),
            ));
        }
        let out = self.encode_ids(&windows.ids, layer, device)?;
        let mut z = out.hidden_state;
        let [n, seq, hidden] = z.dims();
        if !windows.is_unweighted() {
            let flat: Vec<f32> = windows.weights.iter().flatten().copied().collect();
            let weights =
                Tensor::<3>::from_data(TensorData::new(flat, [n, seq, 1]), device).cast(z.dtype());
            let mean = |z: &Tensor<3>| z.clone().reshape([n, seq * hidden]).mean_dim(1);
            let original = mean(&z);
            z = z * weights;
            let restore = (original / mean(&z)).reshape([n, 1, 1]);
            z = z * restore;
        }
        Ok(ClipTextOutput {
            hidden_state: z.reshape([1, n * seq, hidden]),
            pooled: out.pooled.narrow(0, 0, 1),
            text_embeds: out.text_embeds.map(|t| t.narrow(0, 0, 1)),
        })
    }

    /// Encodes token ids.
    ///
    /// `layer` picks the hidden state returned ([`HiddenLayer`]); a number is diffusers'
    /// `clip_skip` for SD 1.x / 2.x: layers dropped from the end, 0 the last layer, 1 the
    /// penultimate (what the A1111 web UI calls "Clip skip: 2"), the chosen state through the
    /// final layer norm.
    ///
    /// # Shapes
    /// `input_ids` `[batch, seq]` with `seq <= max_position_embeddings`; returns
    /// `hidden_state` `[batch, seq, hidden]`, `pooled` `[batch, hidden]` and, with a projection,
    /// `text_embeds` `[batch, projection_dim]`.
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        layer: impl Into<HiddenLayer>,
    ) -> Result<ClipTextOutput> {
        let layer = layer.into();
        let clip_skip = layer.skip();
        let [batch, seq] = input_ids.dims();
        let layers = self.encoder.layers.len();
        if seq == 0 || seq > self.config.max_position_embeddings {
            return Err(Error::InvalidInput(format!(
                "sequence length {seq} must be between 1 and max_position_embeddings ({})",
                self.config.max_position_embeddings
            )));
        }
        if clip_skip >= layers {
            return Err(Error::InvalidInput(format!(
                "clip_skip {clip_skip} skips every one of the model's {layers} layers; give a \
                 clip_skip below {layers}"
            )));
        }
        let ids: Vec<i64> = input_ids
            .to_data()
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| Error::InvalidInput(format!("cannot read input ids: {e:?}")))?;
        if let Some(bad) = ids
            .iter()
            .find(|&&id| id < 0 || id as usize >= self.config.vocab_size)
        {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary (0..{})",
                self.config.vocab_size
            )));
        }

        let mut x = self.embeddings.forward(input_ids);
        let mut chosen = None;
        for (i, encoder_layer) in self.encoder.layers.iter().enumerate() {
            x = encoder_layer.forward(x);
            if i + 1 + clip_skip == layers {
                chosen = Some(x.clone());
            }
        }
        let chosen = chosen.unwrap_or_else(|| x.clone());
        let last = self.final_layer_norm.forward(x);
        let hidden_state = match layer {
            HiddenLayer::Normed(0) => last.clone(),
            HiddenLayer::Normed(_) => self.final_layer_norm.forward(chosen),
            HiddenLayer::Raw(_) => chosen,
        };

        // Pool at the end-of-text token: the largest id for legacy configs (eos_token_id == 2),
        // else the first position holding eos_token_id (position 0 if there is none).
        let positions: Vec<i64> = ids
            .chunks(seq)
            .map(|row| {
                let pos = if self.config.eos_token_id == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&id| id == max)
                } else {
                    row.iter().position(|&id| id == self.config.eos_token_id)
                };
                pos.unwrap_or(0) as i64
            })
            .collect();
        let hidden = self.config.hidden_size;
        let device = last.device();
        let index = Tensor::<1, Int>::from_data(TensorData::new(positions, [batch]), &device)
            .reshape([batch, 1, 1])
            .expand([batch, 1, hidden]);
        let pooled = last.gather(1, index).reshape([batch, hidden]);
        let text_embeds = self
            .text_projection
            .as_ref()
            .map(|p| p.forward(pooled.clone()));
        Ok(ClipTextOutput {
            hidden_state,
            pooled,
            text_embeds,
        })
    }
}

/// Key handling shared by every CLIP text-encoder file: strip the hub's `text_model.` prefix and
/// ignore transformers' old `position_ids` buffer.
pub fn load_options() -> LoadOptions {
    LoadOptions::default()
        .with_remap(r"^text_model\.", "")
        .with_ignored(r"^embeddings\.position_ids$")
}

impl ClipTextModel {
    /// Appends rows to the token embedding table (`[vectors, width]`); they take the next ids.
    pub(crate) fn add_token_embeddings(&mut self, vectors: TensorData) {
        let count = vectors.shape()[0];
        let table = self.embeddings.token_embedding.weight.val();
        let device = table.device();
        let rows = Tensor::<2>::from_data(vectors, &device).cast(table.dtype());
        let table = Tensor::cat(vec![table, rows], 0);
        self.embeddings.token_embedding.weight = Param::from_tensor(table);
        self.config.vocab_size += count;
    }
}
