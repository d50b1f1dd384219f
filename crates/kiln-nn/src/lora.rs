//! LoRA files, and fusing their low-rank updates into a module's weights.
//!
//! A LoRA adds `scale * (alpha / rank) * up @ down` to the weights of some linear and convolution
//! layers. Two file layouts are in use, and both load:
//!
//! - kohya / the A1111 web UI: `lora_unet_<module>` and `lora_te_<module>` (the module path with
//!   `_` for `.`; SDXL's `lora_te1_` / `lora_te2_` for its two text encoders), each with
//!   `.lora_down.weight`, `.lora_up.weight` and a scalar `.alpha`;
//! - diffusers / PEFT: `unet.<module>`, `text_encoder.<module>` and `text_encoder_2.<module>`
//!   with `.lora_A.weight` and
//!   `.lora_B.weight`, or the older `.lora.down.weight` / `.lora.up.weight` (also
//!   `.lora_linear_layer.` and attention processors' `.processor.to_q_lora.`), optionally with
//!   `.alpha`, or peft's `lora_alpha` / `alpha_pattern` / `use_rslora` from the
//!   `lora_adapter_metadata` that diffusers writes into the header (else `alpha = rank`, a
//!   scale of 1).
//!
//! [`LoraFile::open`] reads the file's layout and groups its tensors into [`LoraLayer`]s by
//! component; [`LoraFuser`] resolves them against a module's own parameter paths, adds the
//! updates of one or several files with a scale each, and keeps the original tensors it replaced
//! so that [`LoraFuser::unfuse`] restores them bit for bit. Linear layers take `[rank, in]` /
//! `[out, rank]` factors, 1x1 and kxk convolutions `[rank, in, k, k]` / `[out, rank, 1, 1]`; a
//! 1x1-convolution factor on a linear layer (or the reverse) is reshaped, as diffusers does.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PathFilter, PyTorchToBurnAdapter, bridge};
use burn::tensor::{Device, Tensor, TensorData};

use crate::weights::{LazyTensor, WeightsFile};
use crate::{Error, Result};

/// The model a LoRA layer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LoraComponent {
    /// The UNet (`lora_unet_`, `unet.`).
    Unet,
    /// The CLIP text encoder (`lora_te_`, `lora_te1_`, `text_encoder.`).
    TextEncoder,
    /// SDXL's second text encoder (`lora_te2_`, `text_encoder_2.`).
    TextEncoder2,
}

impl std::fmt::Display for LoraComponent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Unet => "UNet",
            Self::TextEncoder => "text encoder",
            Self::TextEncoder2 => "second text encoder",
        })
    }
}

/// How a layer names its module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoraTarget {
    /// A dotted module path (diffusers / PEFT), such as `down_blocks.0.attentions.0.proj_in`.
    Path(String),
    /// kohya's name: the path with `_` for `.`, such as `down_blocks_0_attentions_0_proj_in`.
    Flat(String),
}

/// One layer's low-rank update, not read yet.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// The model it updates.
    pub component: LoraComponent,
    /// The module it updates, as the file names it.
    pub target: LoraTarget,
    /// The down (A) factor: `[rank, in]` or `[rank, in, kh, kw]`.
    pub down: LazyTensor,
    /// The up (B) factor: `[out, rank]` or `[out, rank, 1, 1]`.
    pub up: LazyTensor,
    /// The `alpha` the update is scaled by (over the rank); `None`: the rank (scale 1).
    pub alpha: Option<f32>,
    /// The file's key stem, for messages.
    pub key: String,
}

/// A LoRA file's layers.
#[derive(Debug, Clone)]
pub struct LoraFile {
    path: PathBuf,
    layers: Vec<LoraLayer>,
    skipped: Vec<String>,
}

/// The part of a key that names the factor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Suffixes of factor keys, longest first, and what they hold.
const SUFFIXES: &[(&str, Part)] = &[
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    (".lora_down.weight", Part::Down),
    (".lora_up.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    ("_lora.down.weight", Part::Down),
    ("_lora.up.weight", Part::Up),
    (".lora_A.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".alpha", Part::Alpha),
];

impl LoraFile {
    /// Opens a LoRA file (`.safetensors`, or a pickle `.pt` / `.bin`) and groups its keys into
    /// layers. A key that is not part of a LoRA layer of the UNet or the text encoder is an
    /// error naming it, unless `allow_unknown` is set: then it is left out and listed by
    /// [`skipped`](Self::skipped).
    pub fn open(path: &Path, allow_unknown: bool) -> Result<Self> {
        let file = WeightsFile::open(path)?;
        let bad = |key: &str, message: String| Error::Lora {
            path: path.to_path_buf(),
            key: key.to_string(),
            message,
        };
        // stem -> (component, target, down, up, alpha key)
        type Parts = (Option<String>, Option<String>, Option<String>);
        let mut groups: BTreeMap<(LoraComponent, String, bool), (String, Parts)> = BTreeMap::new();
        let mut skipped = Vec::new();
        for (key, _) in file.tensors() {
            let Some((stem, part)) = SUFFIXES
                .iter()
                .find_map(|(suffix, part)| key.strip_suffix(suffix).map(|s| (s, *part)))
            else {
                skipped.push(key.to_string());
                continue;
            };
            let Some((component, target, flat)) = split_stem(stem) else {
                skipped.push(key.to_string());
                continue;
            };
            let entry = groups
                .entry((component, target, flat))
                .or_insert_with(|| (stem.to_string(), (None, None, None)));
            let slot = match part {
                Part::Down => &mut entry.1.0,
                Part::Up => &mut entry.1.1,
                Part::Alpha => &mut entry.1.2,
            };
            if let Some(previous) = slot.replace(key.to_string()) {
                return Err(bad(
                    key,
                    format!("holds the same factor as `{previous}`; the file mixes two layouts"),
                ));
            }
        }
        if !skipped.is_empty() && !allow_unknown {
            return Err(bad(
                &skipped[0],
                format!(
                    "is not a LoRA factor of the UNet or a text encoder ({} such key(s); \
                     LoHa, LoKr and DoRA are not supported); allow unknown keys to skip them",
                    skipped.len()
                ),
            ));
        }
        let configs = PeftConfigs::read(&file).map_err(|m| bad("__metadata__", m))?;
        let mut layers = Vec::with_capacity(groups.len());
        for ((component, target, flat), (stem, (down, up, alpha))) in groups {
            let (Some(down), Some(up)) = (down, up) else {
                return Err(bad(
                    &stem,
                    "has only one of its two factors (down/A and up/B)".into(),
                ));
            };
            let down = file.tensor(&down)?;
            let alpha = match alpha {
                Some(key) => Some(read_alpha(&file, &key).map_err(|m| bad(&key, m))?),
                // diffusers' files name modules by dotted paths
                None => match configs.get(component) {
                    Some(config) if !flat => {
                        let rank = down.shape().first().copied().unwrap_or(1);
                        Some(config.alpha(&target, rank))
                    }
                    _ => None,
                },
            };
            layers.push(LoraLayer {
                component,
                target: if flat {
                    LoraTarget::Flat(target)
                } else {
                    LoraTarget::Path(target)
                },
                down,
                up: file.tensor(&up)?,
                alpha,
                key: stem,
            });
        }
        if layers.is_empty() {
            return Err(bad(
                "",
                "holds no LoRA layers (no `lora_down`/`lora_up`, `lora_A`/`lora_B` or `lora.down`/`lora.up` keys)".into(),
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            layers,
            skipped,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every layer, sorted by component and name.
    pub fn layers(&self) -> &[LoraLayer] {
        &self.layers
    }

    /// The keys left out because they belong to no LoRA layer (only with `allow_unknown`).
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// The layers of one component.
    pub fn component(&self, component: LoraComponent) -> impl Iterator<Item = &LoraLayer> {
        self.layers.iter().filter(move |l| l.component == component)
    }

    /// Renames the targets of `component`'s layers where `rename` gives a new one: for files
    /// that name modules by another layout of the same model (kohya's SDXL LoRAs name the
    /// UNet's by the original SGM layout, `input_blocks_4_1_...`).
    pub fn rename_targets(
        &mut self,
        component: LoraComponent,
        rename: impl Fn(&LoraTarget) -> Option<LoraTarget>,
    ) {
        for layer in self.layers.iter_mut().filter(|l| l.component == component) {
            if let Some(target) = rename(&layer.target) {
                layer.target = target;
            }
        }
    }
}

/// The adapter configs diffusers writes into a LoRA file's `__metadata__`
/// (`lora_adapter_metadata`: peft's `LoraConfig` per component, keys `unet.lora_alpha`, ...).
#[derive(Debug, Default)]
struct PeftConfigs {
    unet: Option<PeftConfig>,
    text_encoder: Option<PeftConfig>,
    text_encoder_2: Option<PeftConfig>,
}

/// The fields of peft's `LoraConfig` that decide the scale.
#[derive(Debug)]
struct PeftConfig {
    lora_alpha: f32,
    alpha_pattern: Vec<(regex::Regex, f32)>,
    use_rslora: bool,
}

impl PeftConfigs {
    fn read(file: &WeightsFile) -> std::result::Result<Self, String> {
        let Some(text) = file.metadata().get("lora_adapter_metadata") else {
            return Ok(Self::default());
        };
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| format!("holds `lora_adapter_metadata` that is not JSON: {e}"))?;
        let component = |prefix: &str| -> std::result::Result<Option<PeftConfig>, String> {
            let field = |name: &str| value.get(format!("{prefix}.{name}"));
            let Some(alpha) = field("lora_alpha") else {
                return Ok(None);
            };
            if field("use_dora").and_then(|v| v.as_bool()) == Some(true) {
                return Err(format!(
                    "describes a DoRA adapter for the {prefix}, which Kiln does not support"
                ));
            }
            let lora_alpha = alpha
                .as_f64()
                .ok_or_else(|| format!("has `{prefix}.lora_alpha` = {alpha}, not a number"))?
                as f32;
            let mut alpha_pattern = Vec::new();
            if let Some(map) = field("alpha_pattern").and_then(|v| v.as_object()) {
                for (pattern, alpha) in map {
                    let re = regex::Regex::new(&format!(r"(^|\.)({pattern})$"))
                        .map_err(|e| format!("has the alpha pattern `{pattern}`: {e}"))?;
                    let alpha = alpha.as_f64().ok_or_else(|| {
                        format!("has the alpha of `{pattern}` = {alpha}, not a number")
                    })?;
                    alpha_pattern.push((re, alpha as f32));
                }
            }
            Ok(Some(PeftConfig {
                lora_alpha,
                alpha_pattern,
                use_rslora: field("use_rslora").and_then(|v| v.as_bool()) == Some(true),
            }))
        };
        Ok(Self {
            unet: component("unet")?,
            text_encoder: component("text_encoder")?,
            text_encoder_2: component("text_encoder_2")?,
        })
    }

    fn get(&self, component: LoraComponent) -> Option<&PeftConfig> {
        match component {
            LoraComponent::Unet => self.unet.as_ref(),
            LoraComponent::TextEncoder => self.text_encoder.as_ref(),
            LoraComponent::TextEncoder2 => self.text_encoder_2.as_ref(),
        }
    }
}

impl PeftConfig {
    /// The alpha of the module at `path` such that `alpha / rank` is peft's scaling
    /// (`lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA).
    fn alpha(&self, path: &str, rank: usize) -> f32 {
        let matched: Vec<f32> = self
            .alpha_pattern
            .iter()
            .filter(|(re, _)| re.is_match(path))
            .map(|(_, a)| *a)
            .collect();
        let alpha = matched.first().copied().unwrap_or(self.lora_alpha);
        if self.use_rslora {
            alpha * (rank as f32).sqrt()
        } else {
            alpha
        }
    }
}

/// Splits a key stem into its component, target and whether the target is kohya's flat name.
fn split_stem(stem: &str) -> Option<(LoraComponent, String, bool)> {
    if let Some(rest) = stem.strip_prefix("lora_unet_") {
        return Some((LoraComponent::Unet, rest.to_string(), true));
    }
    for (prefix, component) in [
        ("lora_te_", LoraComponent::TextEncoder),
        ("lora_te1_", LoraComponent::TextEncoder),
        ("lora_te2_", LoraComponent::TextEncoder2),
    ] {
        if let Some(rest) = stem.strip_prefix(prefix) {
            return Some((component, rest.to_string(), true));
        }
    }
    let (component, rest) = if let Some(rest) = stem.strip_prefix("unet.") {
        (LoraComponent::Unet, rest)
    } else if let Some(rest) = stem.strip_prefix("text_encoder_2.") {
        (LoraComponent::TextEncoder2, rest)
    } else if let Some(rest) = stem.strip_prefix("text_encoder.") {
        (LoraComponent::TextEncoder, rest)
    } else {
        return None;
    };
    // attention processors of older diffusers files: `attn1.processor.to_q_lora` -> `attn1.to_q`
    let path = match rest.split_once(".processor.") {
        Some((module, projection)) => {
            let projection = match projection {
                "to_out" => "to_out.0",
                other => other,
            };
            format!("{module}.{projection}")
        }
        None => rest.to_string(),
    };
    Some((component, path, false))
}

/// Reads a scalar `alpha`.
fn read_alpha(file: &WeightsFile, key: &str) -> std::result::Result<f32, String> {
    let tensor = file.tensor(key).map_err(|e| e.to_string())?;
    if tensor.shape().iter().product::<usize>() != 1 {
        return Err(format!(
            "is an alpha of shape {:?}; it must be one number",
            tensor.shape()
        ));
    }
    let values = tensor
        .read()
        .map_err(|e| e.to_string())?
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| format!("{e:?}"))?;
    match values[0] {
        a if a.is_finite() => Ok(a),
        a => Err(format!("is {a}, not a finite number")),
    }
}

/// One file's layers with the scale the user gave it.
#[derive(Debug, Clone)]
pub struct ScaledLora<'a> {
    /// The file.
    pub file: &'a LoraFile,
    /// The user's scale (1 for the file's own strength).
    pub scale: f32,
}

/// Fuses LoRA updates into one module's weights and restores the originals.
#[derive(Debug, Default)]
pub struct LoraFuser {
    /// The replaced tensors, in PyTorch layout, by parameter path.
    originals: Vec<PackTensor>,
}

impl LoraFuser {
    /// A fuser that has fused nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether something is fused.
    pub fn is_fused(&self) -> bool {
        !self.originals.is_empty()
    }

    /// Checks that every `component` layer of `loras` matches a layer of `module` and fits its
    /// shape, without reading any factor; returns how many layers of `module` they update.
    pub fn check<M: Module>(
        module: &M,
        component: LoraComponent,
        loras: &[ScaledLora<'_>],
        strip: &[&str],
    ) -> Result<usize> {
        Ok(plan(module, component, loras, strip)?.len())
    }

    /// Adds the `component` layers of `loras` to `module`'s weights, each scaled by its file's
    /// scale and `alpha / rank`; returns how many layers changed. `strip` lists path prefixes the
    /// files may put before the module's own paths (the text encoder's `text_model.`). Fails
    /// without changing `module` if a layer matches no module, its shapes do not fit, or a
    /// factor holds a NaN. Whatever was fused before is unfused first.
    pub fn fuse<M: Module>(
        &mut self,
        module: &mut M,
        component: LoraComponent,
        loras: &[ScaledLora<'_>],
        strip: &[&str],
        device: &Device,
    ) -> Result<usize> {
        self.unfuse(module)?;
        let plan = plan(module, component, loras, strip)?;
        if plan.is_empty() {
            return Ok(0);
        }
        let mut fused = Vec::with_capacity(plan.len());
        let mut originals = Vec::with_capacity(plan.len());
        for (original, layers) in plan {
            let data = bridge::to_data(&original).map_err(|e| {
                Error::InvalidInput(format!("cannot read `{}`: {e}", original.name))
            })?;
            fused.push(fused_tensor(&original.name, &data, &layers, device)?);
            originals.push(bridge::from_data(data, original.name.clone(), None));
        }
        let count = fused.len();
        apply(module, fused)?;
        self.originals = originals;
        Ok(count)
    }

    /// Puts the original weights back, bit for bit; nothing happens if nothing is fused.
    pub fn unfuse<M: Module>(&mut self, module: &mut M) -> Result<()> {
        if self.originals.is_empty() {
            return Ok(());
        }
        apply(module, std::mem::take(&mut self.originals))
    }
}

/// Updates of one weight: the layers and their scales, with their files.
type Updates<'a> = Vec<(&'a LoraLayer, f32, &'a Path)>;

/// Resolves every `component` layer of `loras` to a weight of `module` (in PyTorch layout, not
/// read yet) and checks the factors' shapes against it.
fn plan<'a, M: Module>(
    module: &M,
    component: LoraComponent,
    loras: &[ScaledLora<'a>],
    strip: &[&str],
) -> Result<Vec<(PackTensor, Updates<'a>)>> {
    let paths: BTreeSet<String> = module
        .collect(None, None, true)
        .into_iter()
        .filter_map(|t| t.name.strip_suffix(".weight").map(str::to_string))
        .collect();
    // kohya's flat names; `None` where two paths flatten alike
    let mut flat: BTreeMap<String, Option<String>> = BTreeMap::new();
    for p in &paths {
        flat.entry(p.replace('.', "_"))
            .and_modify(|e| *e = None)
            .or_insert_with(|| Some(p.clone()));
    }
    let mut updates: BTreeMap<String, Updates<'a>> = BTreeMap::new();
    for lora in loras {
        for layer in lora.file.component(component) {
            let resolved = match &layer.target {
                LoraTarget::Path(p) => {
                    let p = strip_prefix(p, strip, '.');
                    paths.contains(p).then(|| p.to_string())
                }
                LoraTarget::Flat(f) => flat.get(strip_prefix(f, strip, '_')).cloned().flatten(),
            };
            let Some(target) = resolved else {
                return Err(Error::Lora {
                    path: lora.file.path().to_path_buf(),
                    key: layer.key.clone(),
                    message: format!(
                        "matches no layer of this {component}; is the LoRA for another \
                         architecture (SD 1.x, SD 2.x, SDXL)?"
                    ),
                });
            };
            updates
                .entry(target)
                .or_default()
                .push((layer, lora.scale, lora.file.path()));
        }
    }
    if updates.is_empty() {
        return Ok(Vec::new());
    }
    let filter = PathFilter::new().with_full_paths(updates.keys().map(|p| format!("{p}.weight")));
    let weights = module.collect(Some(filter), Some(Box::new(BurnToPyTorchAdapter)), true);
    let mut plan = Vec::with_capacity(weights.len());
    for weight in weights {
        let path = weight.name.strip_suffix(".weight").unwrap_or(&weight.name);
        let Some(layers) = updates.remove(path) else {
            continue;
        };
        let shape = weight.shape.to_vec();
        for (layer, _, file) in &layers {
            let (down, up) = (layer.down.shape(), layer.up.shape());
            let rank = down.first().copied().unwrap_or(0);
            let fits = shape.len() >= 2
                && rank > 0
                && up.len() >= 2
                && up[0] == shape[0]
                && up[1] == rank
                && up[2..].iter().all(|&d| d == 1)
                && down[1..].iter().product::<usize>() == shape[1..].iter().product::<usize>();
            if !fits {
                return Err(Error::Lora {
                    path: file.to_path_buf(),
                    key: layer.key.clone(),
                    message: format!(
                        "has factors {down:?} (down) and {up:?} (up), which do not fit the \
                         layer's weight {shape:?}; is the LoRA for another architecture?"
                    ),
                });
            }
        }
        plan.push((weight, layers));
    }
    if let Some((path, _)) = updates.into_iter().next() {
        return Err(Error::InvalidInput(format!(
            "the weight of `{path}` could not be read"
        )));
    }
    Ok(plan)
}

/// `path` without the first of `prefixes` (dotted, such as `text_model.`) it starts with, the
/// prefix's dots read as `sep` (`.` for dotted paths, `_` for kohya's flat names).
fn strip_prefix<'a>(path: &'a str, prefixes: &[&str], sep: char) -> &'a str {
    for prefix in prefixes {
        let prefix = prefix.trim_end_matches('.').replace('.', &sep.to_string());
        if let Some(rest) = path.strip_prefix(prefix.as_str())
            && let Some(rest) = rest.strip_prefix(sep)
        {
            return rest;
        }
    }
    path
}

/// Applies tensors in PyTorch layout to `module`, checking every one lands.
fn apply<M: Module>(module: &mut M, tensors: Vec<PackTensor>) -> Result<()> {
    let count = tensors.len();
    let result = module.apply(tensors, None, Some(Box::new(PyTorchToBurnAdapter)), true);
    if let Some(error) = result.errors.first() {
        return Err(Error::InvalidInput(format!(
            "cannot set LoRA weights: {error:?}"
        )));
    }
    if result.applied.len() != count {
        return Err(Error::InvalidInput(format!(
            "set {} of {count} LoRA-updated weights (unused: {:?})",
            result.applied.len(),
            result.unused
        )));
    }
    Ok(())
}

/// `original + Σ scale * alpha / rank * up @ down`, in the original's dtype (shapes checked by
/// [`plan`]).
fn fused_tensor(
    name: &str,
    original: &TensorData,
    layers: &Updates<'_>,
    device: &Device,
) -> Result<PackTensor> {
    let dtype = original.dtype();
    let shape = original.shape().to_vec();
    let out = shape[0];
    let rest: usize = shape[1..].iter().product();
    let values = original
        .clone()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::InvalidInput(format!("cannot read `{name}`: {e:?}")))?;
    let mut weight = Tensor::<2>::from_data(TensorData::new(values, [out, rest]), device);
    for (layer, scale, path) in layers {
        let bad = |message: String| Error::Lora {
            path: path.to_path_buf(),
            key: layer.key.clone(),
            message,
        };
        let read = |t: &LazyTensor| -> Result<Vec<f32>> {
            let values = t
                .read()?
                .convert::<f32>()
                .try_into_vec::<f32>()
                .map_err(|e| bad(format!("cannot read `{}`: {e:?}", t.name())))?;
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(bad(format!(
                    "holds {} at index {i} of `{}`; the file is damaged",
                    values[i],
                    t.name()
                )));
            }
            Ok(values)
        };
        let rank = layer.down.shape()[0];
        let down =
            Tensor::<2>::from_data(TensorData::new(read(&layer.down)?, [rank, rest]), device);
        let up = Tensor::<2>::from_data(TensorData::new(read(&layer.up)?, [out, rank]), device);
        let alpha = layer.alpha.unwrap_or(rank as f32);
        weight = weight + up.matmul(down) * (scale * alpha / rank as f32);
    }
    let fused = weight.cast(dtype).into_data();
    let fused = TensorData::from_bytes_vec(fused.into_bytes().to_vec(), shape, dtype);
    Ok(bridge::from_data(fused, name.to_string(), None))
}
