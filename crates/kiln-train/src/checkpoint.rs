//! Writing what a run makes: diffusers folders from modules in memory, and the training state
//! (weights as they are, AdamW moments, moving average, data order, generator) that lets a run
//! stop and go on exactly.
//!
//! burn keys an optimiser's state by parameter id, and ids are drawn afresh each time a model is
//! built; [`stable_param_ids`] derives them from the parameters' names instead, so the state
//! saved by one process matches the model another process builds.

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::{Module, ModuleMapper, Param, ParamId};
use burn::optim::ModuleOptimizer;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, Tensor};
use kiln_clip::{ClipTextModel, ClipTokenizer};
use kiln_nn::init::{checkpoint_name, name_hash};
use kiln_scheduler::SeededNoise;
use kiln_unet::UNet2DConditionModel;
use kiln_vae::AutoencoderKL;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::trainer::{Batches, TokenizerFiles};
use crate::{Error, Result};

/// The folder inside a checkpoint that holds the training state.
pub const STATE_DIR: &str = "training_state";

/// The position of a run besides its weights and optimiser: what `state.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunState {
    /// Optimiser steps taken.
    pub(crate) steps: usize,
    /// The generator of every draw, where it stands.
    pub(crate) rng: SeededNoise,
    /// The epoch's shuffled order and the position in it.
    pub(crate) order: Vec<usize>,
    pub(crate) cursor: usize,
    /// Updates of the moving average, when there is one.
    pub(crate) ema_updates: Option<usize>,
}

impl RunState {
    /// The epoch order and position this state holds, checked against a dataset of `len`
    /// examples (a checkpoint of a run over other data is refused).
    pub(crate) fn batches(&self, len: usize, checkpoint: &Path) -> Result<Batches> {
        if self.order.iter().any(|&i| i >= len) || self.cursor > self.order.len() {
            return Err(Error::Resume(format!(
                "`{}` was written for a dataset of another size than this one ({len} examples)",
                checkpoint.display()
            )));
        }
        Ok(Batches {
            order: self.order.clone(),
            cursor: self.cursor,
        })
    }
}

/// Gives every float parameter of `module` an id derived from its name (FNV-1a of the
/// checkpoint name), so optimiser state saved by one process applies to the same model built by
/// another.
pub fn stable_param_ids<M: Module>(module: M) -> M {
    struct Ids {
        path: Vec<String>,
    }
    impl ModuleMapper for Ids {
        fn enter_module(&mut self, name: &str, _container_type: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _name: &str, _container_type: &str) {
            self.path.pop();
        }
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let name = checkpoint_name(&self.path);
            let (_, tensor, mapper) = param.consume();
            Param::from_mapped_value(ParamId::from(name_hash(&name)), tensor, mapper)
        }
    }
    module.map(&mut Ids { path: Vec::new() })
}

/// `module`'s values on `device`, trainable (requiring gradients) when `device` is an autodiff
/// device; ids are kept.
pub(crate) fn to_device<M: Module>(module: M, device: &Device) -> M {
    struct Move<'a> {
        device: &'a Device,
    }
    impl ModuleMapper for Move<'_> {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let device = self.device;
            param.map(|t| {
                let moved = Tensor::<D>::from_data(t.into_data(), device);
                if device.is_autodiff() {
                    moved.require_grad()
                } else {
                    moved
                }
            })
        }
    }
    module.map(&mut Move { device })
}

pub(crate) fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::Io {
        path: dir.to_path_buf(),
        source,
    })
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Save {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text + "\n").map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `checkpoint/training_state/`: the trained weights as they are, their moving average
/// when there is one, the optimiser's state and `state.json`.
pub(crate) fn write_training_state<M: Module>(
    checkpoint: &Path,
    model: &M,
    ema: Option<&M>,
    optim: &ModuleOptimizer,
    state: &RunState,
) -> Result<()> {
    let dir = checkpoint.join(STATE_DIR);
    create_dir(&dir)?;
    save_module(model, &dir.join("model.safetensors"))?;
    if let Some(ema) = ema {
        save_module(ema, &dir.join("ema.safetensors"))?;
    }
    save_optimizer(optim, &dir.join("optimizer.bpk"))?;
    write_json(&dir.join("state.json"), state)
}

pub(crate) fn read_state(path: &Path) -> Result<RunState> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::Resume(format!(
            "cannot read `{}` ({e}): this is not a Kiln checkpoint folder, or an incomplete one",
            path.display()
        ))
    })?;
    serde_json::from_str(&text)
        .map_err(|e| Error::Resume(format!("`{}` is malformed: {e}", path.display())))
}

/// Writes `module`'s parameters as they are (burn's names, f32) to a safetensors file.
fn save_module<M: Module>(module: &M, path: &Path) -> Result<()> {
    // one metadata entry: burn's default metadata is a hash map, whose order (and so the file's
    // bytes) changes from run to run
    let mut store = SafetensorsStore::from_file(path)
        .clear_metadata()
        .metadata("format", "pt")
        .overwrite(true);
    module.save_into(&mut store).map_err(|e| Error::Save {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Loads what [`save_module`] wrote into `module`, strictly: a missing, unused or misshaped
/// tensor (a checkpoint of another model) is an [`Error::Resume`] naming it.
pub(crate) fn load_module<M: Module>(mut module: M, path: &Path) -> Result<M> {
    let mut store = SafetensorsStore::from_file(path)
        .allow_partial(true)
        .validate(false);
    let result = module
        .load_from(&mut store)
        .map_err(|e| Error::Resume(format!("cannot read `{}`: {e}", path.display())))?;
    let mismatch = |what: String, count: usize| {
        Error::Resume(format!(
            "`{}` is a checkpoint of another model: {what}{}; resume with the config that made it",
            path.display(),
            if count > 1 {
                format!(" (and {} more)", count - 1)
            } else {
                String::new()
            }
        ))
    };
    if let Some(first) = result.errors.first() {
        let what = match first {
            burn::store::ApplyError::ShapeMismatch {
                path,
                expected,
                found,
            } => format!(
                "`{path}` is {:?} there and {:?} in this model",
                found.as_slice(),
                expected.as_slice()
            ),
            other => format!("{other:?}"),
        };
        return Err(mismatch(what, result.errors.len()));
    }
    if let Some((name, _)) = result.missing.first() {
        return Err(mismatch(format!("it lacks `{name}`"), result.missing.len()));
    }
    if let Some(name) = result.unused.first() {
        return Err(mismatch(
            format!("it has `{name}`, which this model has not"),
            result.unused.len(),
        ));
    }
    Ok(module)
}

fn save_optimizer(optim: &ModuleOptimizer, path: &Path) -> Result<()> {
    optim.save(path).map_err(|e| Error::Save {
        path: path.to_path_buf(),
        message: format!("{e:?}"),
    })
}

pub(crate) fn load_optimizer(optim: ModuleOptimizer, path: &Path) -> Result<ModuleOptimizer> {
    optim
        .load(path)
        .map_err(|e| Error::Resume(format!("cannot read `{}`: {e:?}", path.display())))
}

/// The weights of a Stable Diffusion folder, from modules in memory.
pub struct PipelineWeights<'a> {
    /// The UNet.
    pub unet: &'a UNet2DConditionModel,
    /// The VAE.
    pub vae: &'a AutoencoderKL,
    /// The text encoder.
    pub text_encoder: &'a ClipTextModel,
}

/// The class names diffusers' and transformers' loaders read from each `config.json`.
fn with_class(mut config: Value, class: &str) -> Value {
    if let Some(map) = config.as_object_mut() {
        map.entry("_class_name").or_insert_with(|| json!(class));
        if class == "CLIPTextModel" {
            map.entry("architectures")
                .or_insert_with(|| json!(["CLIPTextModel"]));
            map.entry("model_type")
                .or_insert_with(|| json!("clip_text_model"));
        }
    }
    config
}

/// burn-store creates its files readable by their owner only (0600, a temporary file's mode);
/// a model folder is shared, so its files get the usual 0644.
fn make_shareable(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).map_err(
            |source| Error::Io {
                path: path.to_path_buf(),
                source,
            },
        )?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn save_pytorch<M: Module>(module: &M, path: &Path, prefix: Option<&str>) -> Result<()> {
    // `format: pt` is what transformers' loader requires of a safetensors file's metadata (burn's
    // default says `safetensors`, and its several entries come in hash order: files of equal
    // weights would differ in their bytes)
    let mut store = SafetensorsStore::from_file(path)
        .with_to_adapter(BurnToPyTorchAdapter)
        .skip_enum_variants(true)
        .clear_metadata()
        .metadata("format", "pt")
        .overwrite(true);
    if let Some(prefix) = prefix {
        store = store.with_key_remapping("^", prefix);
    }
    module.save_into(&mut store).map_err(|e| Error::Save {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    make_shareable(path)
}

/// Writes one component folder `dir` (created if missing): `config.json` (with the loaders'
/// class names added where missing) and the f32 weights under diffusers' names, or for the text
/// encoder (`class` `CLIPTextModel`) transformers' names with the hub's `text_model.` prefix.
pub fn write_component<M: Module>(
    dir: &Path,
    config: &Value,
    class: &str,
    module: &M,
) -> Result<()> {
    create_dir(dir)?;
    write_json(&dir.join("config.json"), &with_class(config.clone(), class))?;
    if class == "CLIPTextModel" {
        save_pytorch(module, &dir.join("model.safetensors"), Some("text_model."))
    } else {
        save_pytorch(
            module,
            &dir.join("diffusion_pytorch_model.safetensors"),
            None,
        )
    }
}

/// Writes a complete diffusers Stable Diffusion folder into the existing folder `dir`: each
/// component's `config.json` (from `configs`, by component name, with the loaders' class names
/// added where missing) and f32 weights under diffusers' and transformers' names (the text
/// encoder with the hub's `text_model.` prefix), the scheduler config, the tokenizer and
/// `model_index.json`.
pub fn write_pipeline_folder(
    dir: &Path,
    configs: &BTreeMap<String, Value>,
    tokenizer: &TokenizerFiles,
    weights: &PipelineWeights<'_>,
) -> Result<()> {
    let config = |name: &str| {
        configs
            .get(name)
            .cloned()
            .ok_or_else(|| Error::InvalidOption(format!("no `{name}` config given")))
    };
    write_component(
        &dir.join("unet"),
        &config("unet")?,
        "UNet2DConditionModel",
        weights.unet,
    )?;
    write_component(
        &dir.join("vae"),
        &config("vae")?,
        "AutoencoderKL",
        weights.vae,
    )?;
    write_component(
        &dir.join("text_encoder"),
        &config("text_encoder")?,
        "CLIPTextModel",
        weights.text_encoder,
    )?;
    let scheduler = config("scheduler")?;
    let sub = dir.join("scheduler");
    create_dir(&sub)?;
    write_json(&sub.join("scheduler_config.json"), &scheduler)?;
    let tokenizer_dir = dir.join("tokenizer");
    match tokenizer {
        TokenizerFiles::Folder(src) => kiln_nn::config::copy_dir(src, &tokenizer_dir)?,
        TokenizerFiles::Embedded(pad) => ClipTokenizer::write_embedded(&tokenizer_dir, pad)?,
    }
    let inpainting = weights.unet.config.in_channels == 2 * weights.vae.config.latent_channels + 1;
    kiln_pipeline::write_model_index(dir, &scheduler, inpainting)?;
    Ok(())
}
