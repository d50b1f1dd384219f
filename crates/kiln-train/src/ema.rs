//! An exponential moving average of a model's weights, as diffusers' `EMAModel`
//! (`diffusers/training_utils.py`, 0.42.1) keeps it: after optimiser step `n`,
//! `ema -= (1 - d) * (ema - weights)` with `d = min(decay, ramp(s))` and `s = n - 1` (so the first
//! update copies the weights); `ramp(s)` is `(1 + s) / (10 + s)` by default, or with
//! `use_ema_warmup` `1 - (1 + s / inv_gamma)^-power` ([`EmaWarmup`]).

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

/// diffusers' `use_ema_warmup` ramp of the decay, `1 - (1 + s / inv_gamma)^-power`: with the
/// defaults (`inv_gamma` 1, `power` 2/3) it reaches 0.999 at 31.6k steps, with `power` 3/4 at
/// 10k, so short runs average over fewer steps than the fixed ramp gives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmaWarmup {
    /// `inv_gamma` (diffusers' default 1.0).
    pub inv_gamma: f64,
    /// `power` (diffusers' default 2/3).
    pub power: f64,
}

impl Default for EmaWarmup {
    fn default() -> Self {
        Self {
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }
}

/// The averaged copy of a module, outside autodiff.
#[derive(Debug, Clone)]
pub struct Ema<M> {
    model: M,
    decay: f64,
    warmup: Option<EmaWarmup>,
    updates: usize,
}

impl<M: Module> Ema<M> {
    /// Starts the average at `model`'s weights (taken out of autodiff) with maximum `decay`
    /// (diffusers' default 0.9999).
    pub fn new(model: &M, decay: f64) -> Self {
        Self {
            model: model.valid(),
            decay,
            warmup: None,
            updates: 0,
        }
    }

    /// The same average with diffusers' warm-up ramp (`None`: the default ramp).
    pub fn with_warmup(mut self, warmup: Option<EmaWarmup>) -> Self {
        self.warmup = warmup;
        self
    }

    /// The average as a checkpoint holds it: `model` after `updates` updates (for resuming).
    pub fn restored(mut self, model: M, updates: usize) -> Self {
        self.model = model;
        self.updates = updates;
        self
    }

    /// The averaged model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// Updates taken so far.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// The decay the `n`-th update (1-based) uses.
    pub fn decay_at(&self, n: usize) -> f64 {
        let s = n.saturating_sub(1) as f64;
        if s <= 0.0 {
            return 0.0;
        }
        let ramp = match self.warmup {
            Some(w) => 1.0 - (1.0 + s / w.inv_gamma).powf(-w.power),
            None => (1.0 + s) / (10.0 + s),
        };
        ramp.min(self.decay).max(0.0)
    }

    /// Moves the average towards `model`'s current weights (call after each optimiser step).
    pub fn update(&mut self, model: &M) {
        self.updates += 1;
        let rate = 1.0 - self.decay_at(self.updates);
        let mut current = Current::default();
        model.valid().visit(&mut current);
        let mut mapper = Towards {
            current: current.values,
            rate,
        };
        self.model = self.model.clone().map(&mut mapper);
    }
}

/// Every float parameter's value, flattened, by id.
#[derive(Default)]
struct Current {
    values: HashMap<ParamId, Tensor<1>>,
}

impl ModuleVisitor for Current {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.values.insert(param.id, param.val().flatten(0, D - 1));
    }
}

/// `ema -= rate * (ema - current)` for every parameter found in `current`.
struct Towards {
    current: HashMap<ParamId, Tensor<1>>,
    rate: f64,
}

impl ModuleMapper for Towards {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(current) = self.current.remove(&param.id) else {
            return param;
        };
        let rate = self.rate;
        param.map(|ema| {
            let current: Tensor<D> = current.reshape(ema.shape());
            ema.clone() - (ema - current) * rate
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Device, TensorData};

    /// diffusers' `EMAModel(params, decay=0.9999).get_decay(n)` for n = 1, 2, 3, 10, 100, 100000.
    /// `EMAModel(..., decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=2/3).get_decay(n)`
    /// at n = 1, 2, 3, 10, 100, 100 000: the formula of diffusers 0.42.1's `get_decay`.
    #[test]
    fn warmup_decay_follows_diffusers() {
        let device = Device::default();
        let ema = Ema::new(&LinearConfig::new(1, 1).init(&device), 0.9999)
            .with_warmup(Some(EmaWarmup::default()));
        for n in [1usize, 2, 3, 10, 100, 100_000] {
            let s = (n - 1) as f64;
            let want = if s == 0.0 {
                0.0
            } else {
                (1.0 - (1.0 + s).powf(-2.0 / 3.0)).min(0.9999)
            };
            assert!((ema.decay_at(n) - want).abs() < 1e-12, "n = {n}");
        }
        // two values worked by hand: 1 - 2^(-2/3), 1 - 10^(-2/3)
        assert!((ema.decay_at(2) - 0.370_039_5).abs() < 1e-6);
        assert!((ema.decay_at(10) - 0.784_556_5).abs() < 1e-6);
    }

    #[test]
    fn decay_follows_diffusers() {
        let device = Device::default();
        let ema = Ema::new(&LinearConfig::new(1, 1).init(&device), 0.9999);
        let expected = [0.0, 0.18181818, 0.25, 0.52631579, 0.91743119, 0.9999];
        for (n, want) in [1, 2, 3, 10, 100, 100_000].into_iter().zip(expected) {
            assert!((ema.decay_at(n) - want).abs() < 1e-8, "n = {n}");
        }
    }

    /// The shadow values diffusers' `EMAModel.step` gives for a parameter set to [3, -1], then
    /// [5, 0.5], then [-2, 4] (starting from [1, 2]).
    #[test]
    fn updates_follow_diffusers() {
        let device = Device::default();
        let set = |values: [f32; 2]| {
            let mut linear: Linear = LinearConfig::new(1, 2).with_bias(false).init(&device);
            linear.weight = Param::initialized(
                linear.weight.id,
                Tensor::from_data(TensorData::new(values.to_vec(), [1, 2]), &device),
            );
            linear
        };
        let start = set([1.0, 2.0]);
        let mut ema = Ema::new(&start, 0.9999);
        let expected = [
            [3.0, -1.0],
            [4.636_363_5, 0.227_272_75],
            [-0.340_909, 3.056_818_2],
        ];
        for (values, want) in [[3.0, -1.0], [5.0, 0.5], [-2.0, 4.0]]
            .into_iter()
            .zip(expected)
        {
            let mut model = set(values);
            model.weight = Param::initialized(start.weight.id, model.weight.val());
            ema.update(&model);
            let got: Vec<f32> = ema
                .model()
                .weight
                .val()
                .into_data()
                .try_to_vec::<f32>()
                .unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!((g - w).abs() < 1e-5, "{got:?} vs {want:?}");
            }
        }
        assert_eq!(ema.updates(), 3);
    }
}
