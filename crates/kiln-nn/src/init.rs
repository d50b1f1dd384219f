//! Fresh weights for training from scratch, drawn on the host from a seeded generator, so a seed
//! gives the same model on every backend and machine.
//!
//! The models' `new` constructors build the module tree only (their values are whatever burn's
//! initialisers put there, or zeros); [`initialize`] then overwrites every float parameter with
//! values drawn by a rule that sees the parameter's checkpoint name and shape. Each parameter
//! draws from its own stream (keyed by its name), so the values do not depend on the order in
//! which modules are visited. The rules of the reference libraries are here too:
//! [`pytorch_default`] (what diffusers' UNet and VAE get from `torch.nn`'s layer constructors).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How one parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Uniform in `[-bound, bound]`.
    Uniform(f64),
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
    /// Every element equal to this value.
    Constant(f64),
}

/// A parameter as an initialisation rule sees it.
#[derive(Debug, Clone, Copy)]
pub struct ParamInfo<'a> {
    /// Its checkpoint name (`down_blocks.0.resnets.0.conv1.weight`; norms' `gamma` / `beta` are
    /// `weight` / `bias`, as in PyTorch).
    pub name: &'a str,
    /// Its shape in burn's layout (a `Linear` weight is `[d_in, d_out]`).
    pub shape: &'a [usize],
    /// The fan-in of the layer it belongs to: for a weight of rank 2 or more its own
    /// (`[d_in, d_out]` linear: `d_in`; `[out, in, kh, kw]` convolution: `in * kh * kw`), for a
    /// bias its layer's weight's. `None` for normalisation scales and shifts, embeddings' tables
    /// are rank 2 and get `Some(rows)`: tell them apart by name.
    pub fan_in: Option<usize>,
    /// Whether it is a normalisation layer's scale (`gamma`) or shift (`beta`).
    pub is_norm: bool,
}

/// PyTorch's defaults for `nn.Linear` and `nn.Conv2d` (Kaiming-uniform with `a = sqrt(5)`, that is
/// uniform in `±1 / sqrt(fan_in)`, for weights and biases alike) and for `nn.GroupNorm` /
/// `nn.LayerNorm` (scale 1, shift 0): what a diffusers `UNet2DConditionModel` or `AutoencoderKL`
/// built from a config starts from.
pub fn pytorch_default(p: &ParamInfo<'_>) -> Init {
    match (p.is_norm, p.fan_in) {
        (true, _) if p.name.ends_with("weight") => Init::Constant(1.0),
        (true, _) => Init::Constant(0.0),
        (false, Some(fan_in)) => Init::Uniform(1.0 / (fan_in.max(1) as f64).sqrt()),
        (false, None) => Init::Constant(0.0),
    }
}

/// Overwrites every float parameter of `module` with values drawn by `rule`, from streams seeded
/// by `seed` and each parameter's name. Parameters keep their ids and whether they require
/// gradients, so a module on an autodiff device stays trainable.
pub fn initialize<M: Module>(module: M, seed: u64, rule: impl Fn(&ParamInfo<'_>) -> Init) -> M {
    let mut shapes = Shapes::default();
    module.visit(&mut shapes);
    let mut mapper = Draw {
        path: Vec::new(),
        shapes: shapes.params,
        seed,
        rule,
    };
    module.map(&mut mapper)
}

/// `n` values from a normal distribution with mean 0 and standard deviation `std`, drawn by
/// Box-Muller from `rng` (the same values on every machine for the same generator state).
pub fn normal(rng: &mut impl Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Box-Muller on (0, 1]
        let u1 = 1.0 - rng.random::<f64>();
        let u2 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let theta = 2.0 * std::f64::consts::PI * u2;
        out.push((r * theta.cos()) as f32);
        out.push((r * theta.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// The checkpoint name of a parameter at `path` (module field names, outermost first): enum
/// variants (CamelCase) add no segment and norms' `gamma` / `beta` are `weight` / `bias`.
pub fn checkpoint_name(path: &[String]) -> String {
    path.iter()
        .filter(|s| !s.is_empty() && !s.starts_with(|c: char| c.is_ascii_uppercase()))
        .map(|s| match s.as_str() {
            "gamma" => "weight",
            "beta" => "bias",
            other => other,
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Every float parameter's name, shape and whether it is a norm's, in visiting order.
#[derive(Default)]
struct Shapes {
    path: Vec<String>,
    params: BTreeMap<String, (Vec<usize>, bool)>,
}

impl ModuleVisitor for Shapes {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let is_norm = matches!(self.path.last().map(String::as_str), Some("gamma" | "beta"));
        self.params.insert(
            checkpoint_name(&self.path),
            (param.val().dims().to_vec(), is_norm),
        );
    }
}

struct Draw<F> {
    path: Vec<String>,
    shapes: BTreeMap<String, (Vec<usize>, bool)>,
    seed: u64,
    rule: F,
}

fn fan_in(shape: &[usize]) -> Option<usize> {
    match shape {
        [d_in, _] => Some(*d_in),
        [_, cin, rest @ ..] if !rest.is_empty() => Some(cin * rest.iter().product::<usize>()),
        _ => None,
    }
}

/// FNV-1a of a parameter's name: its initialisation stream here, and a stable parameter id for
/// training state (`kiln_train::checkpoint::stable_param_ids`).
pub fn name_hash(name: &str) -> u64 {
    fnv1a(name.bytes())
}

/// The 64-bit FNV-1a hash of `bytes`: stable across machines and releases.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl<F: Fn(&ParamInfo<'_>) -> Init> ModuleMapper for Draw<F> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = checkpoint_name(&self.path);
        let Some((shape, is_norm)) = self.shapes.get(&name).cloned() else {
            return param;
        };
        let layer_fan_in = match shape.len() {
            1 => name
                .strip_suffix("bias")
                .and_then(|stem| self.shapes.get(&format!("{stem}weight")))
                .and_then(|(s, _)| fan_in(s)),
            _ => fan_in(&shape),
        };
        let init = (self.rule)(&ParamInfo {
            name: &name,
            shape: &shape,
            fan_in: if is_norm { None } else { layer_fan_in },
            is_norm,
        });
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(name_hash(&name));
        let n: usize = shape.iter().product();
        let values: Vec<f32> = match init {
            Init::Constant(c) => vec![c as f32; n],
            Init::Uniform(bound) => (0..n)
                .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                .collect(),
            Init::Normal(std) => normal(&mut rng, n, std),
        };
        param.map(|old| {
            let trainable = old.is_require_grad();
            let fresh = Tensor::<D>::from_data(TensorData::new(values, shape), &old.device());
            if trainable {
                fresh.require_grad()
            } else {
                fresh
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::conv::{Conv2d, Conv2dConfig};
    use burn::nn::{GroupNorm, GroupNormConfig, Linear, LinearConfig};
    use burn::tensor::Device;

    #[derive(Module, Debug)]
    struct Block {
        conv: Conv2d,
        norm: GroupNorm,
        proj: Linear,
    }

    fn block(device: &Device) -> Block {
        Block {
            conv: Conv2dConfig::new([4, 8], [3, 3]).init(device),
            norm: GroupNormConfig::new(2, 8).init(device),
            proj: LinearConfig::new(8, 16).init(device),
        }
    }

    fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
        t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap()
    }

    #[test]
    fn pytorch_bounds_norms_and_seeds() {
        let device = Device::default();
        let a = initialize(block(&device), 7, pytorch_default);
        let conv = values(&a.conv.weight.val());
        let bound = 1.0 / (4.0f32 * 9.0).sqrt();
        assert!(conv.iter().all(|v| v.abs() <= bound));
        assert!(
            conv.iter().any(|v| v.abs() > 0.9 * bound),
            "fills the range"
        );
        let bias = values(&a.conv.bias.as_ref().unwrap().val());
        assert!(bias.iter().all(|v| v.abs() <= bound) && bias.iter().any(|v| *v != 0.0));
        let proj = values(&a.proj.weight.val());
        assert!(proj.iter().all(|v| v.abs() <= 1.0 / 8f32.sqrt()));
        assert!(
            values(&a.norm.gamma.as_ref().unwrap().val())
                .iter()
                .all(|v| *v == 1.0)
        );
        assert!(
            values(&a.norm.beta.as_ref().unwrap().val())
                .iter()
                .all(|v| *v == 0.0)
        );

        // the same seed gives the same values, another seed others; ids are kept
        let b = initialize(block(&device), 7, pytorch_default);
        let c = initialize(block(&device), 8, pytorch_default);
        assert_eq!(conv, values(&b.conv.weight.val()));
        assert_ne!(conv, values(&c.conv.weight.val()));
        let fresh = block(&device);
        let id = fresh.proj.weight.id;
        assert_eq!(initialize(fresh, 1, pytorch_default).proj.weight.id, id);
    }

    #[test]
    fn normal_rule_has_its_spread_and_names_are_checkpoint_names() {
        let device = Device::default();
        let seen = std::cell::RefCell::new(Vec::new());
        let m = initialize(block(&device), 3, |p| {
            seen.borrow_mut()
                .push((p.name.to_string(), p.fan_in, p.is_norm));
            Init::Normal(0.5)
        });
        let v = values(&m.proj.weight.val());
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!((std - 0.5).abs() < 0.1, "std {std}");
        let seen = seen.into_inner();
        assert!(seen.contains(&("conv.weight".into(), Some(36), false)));
        assert!(seen.contains(&("conv.bias".into(), Some(36), false)));
        assert!(seen.contains(&("norm.weight".into(), None, true)));
        assert!(seen.contains(&("proj.bias".into(), Some(8), false)));
    }
}
