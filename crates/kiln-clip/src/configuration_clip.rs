//! `CLIPTextConfig`, read from a text encoder's `config.json`
//! (transformers' `models/clip/configuration_clip.py`).

use std::path::Path;

use kiln_nn::activation::Activation;
use serde::Deserialize;

use crate::Result;

/// The shape of a CLIP text transformer, with transformers' key names.
///
/// Unknown keys are ignored; a key with a value of the wrong type fails when the file is read.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct ClipTextConfig {
    /// Number of token embeddings (49408 for CLIP's BPE).
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    /// Width of the transformer (768 for SD 1.x, 1024 for SD 2.x).
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    /// Width of the MLP's hidden layer.
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    /// Number of encoder layers.
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    /// Number of attention heads; must divide `hidden_size`.
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    /// Number of positions (77).
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    /// The MLP activation: `quick_gelu` (SD 1.x) or `gelu` (SD 2.x).
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: Activation,
    /// Layer-norm epsilon.
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// End-of-text id. The legacy value 2 means "pool at the largest id", as transformers does.
    #[serde(default = "defaults::eos_token_id")]
    pub eos_token_id: i64,
    /// Width of `text_projection`'s output (`CLIPTextModelWithProjection`, SDXL's second
    /// encoder and refiner).
    #[serde(default = "defaults::projection_dim")]
    pub projection_dim: usize,
    /// transformers' class names; `CLIPTextModelWithProjection` adds `text_projection`. Some
    /// configs write `null`.
    #[serde(default)]
    pub architectures: Option<Vec<String>>,
}

mod defaults {
    use kiln_nn::activation::Activation;
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn hidden_act() -> Activation {
        Activation::QuickGelu
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn eos_token_id() -> i64 {
        2
    }
    pub fn projection_dim() -> usize {
        512
    }
}

impl ClipTextConfig {
    /// Reads `config.json` and checks that its values describe a model.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut value: serde_json::Value = kiln_nn::config::read_json(path, "text encoder config")?;
        // A full CLIPConfig nests the text tower under `text_config`.
        if let Some(text) = value.get_mut("text_config").map(serde_json::Value::take) {
            value = text;
        }
        let config: Self =
            serde_json::from_value(value).map_err(|source| kiln_nn::Error::Json {
                path: path.to_path_buf(),
                source,
            })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Whether the model has `text_projection` (transformers' `CLIPTextModelWithProjection`).
    pub fn has_projection(&self) -> bool {
        self.architectures
            .iter()
            .flatten()
            .any(|a| a == "CLIPTextModelWithProjection")
    }

    /// Checks the relations between fields that serde cannot.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let fail = |message: String| -> Result<()> {
            Err(kiln_nn::Error::InvalidConfig {
                path: path.to_path_buf(),
                message,
            }
            .into())
        };
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return fail(format!(
                "hidden_size ({}) must be a positive multiple of num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("max_position_embeddings", self.max_position_embeddings),
            ("projection_dim", self.projection_dim),
        ] {
            if value == 0 {
                return fail(format!("{name} must be at least 1"));
            }
        }
        // Written so that NaN fails too.
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return fail(format!(
                "layer_norm_eps must be positive, found {}",
                self.layer_norm_eps
            ));
        }
        Ok(())
    }
}
