//! Mixed precision: a module's float weights cast to another dtype for one forward pass.
//!
//! The cast is an ordinary tensor op, so on an autodiff device the cast copy is part of the graph:
//! a forward pass through it computes in the low precision, and `backward` carries the gradients
//! back through the casts to the original (f32) parameters, which the optimiser updates. This is
//! what PyTorch's `autocast` does op by op (it casts a layer's weights when the layer runs); Kiln
//! casts them all once per pass. Norm statistics and attention upcasts stay in f32 where the
//! blocks ask for it ([`crate::normalization`], [`crate::attention`]).

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{DType, Tensor};

/// `module` with every float parameter cast to `dtype` (a no-op for parameters already in it).
/// Integer and boolean parameters are left as they are.
pub fn cast_params<M: Module>(module: M, dtype: DType) -> M {
    struct Cast(DType);
    impl ModuleMapper for Cast {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let dtype = self.0;
            param.map(|t| t.cast(dtype))
        }
    }
    module.map(&mut Cast(dtype))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::nn::{Linear, LinearConfig};
    use burn::tensor::{Device, Distribution};

    #[derive(Module, Debug)]
    struct Two {
        a: Linear,
        b: Linear,
    }

    #[test]
    fn gradients_of_the_cast_copy_reach_the_f32_parameters() {
        let device = Device::autodiff(crate::default_device().unwrap());
        let model = Two {
            a: LinearConfig::new(8, 16).init(&device),
            b: LinearConfig::new(16, 4).init(&device),
        };
        let x = Tensor::<2>::random([3, 8], Distribution::Normal(0.0, 1.0), &device);
        let f32_loss = model
            .b
            .forward(model.a.forward(x.clone()))
            .powi_scalar(2)
            .mean();
        let f32_grads = f32_loss.backward();

        let low = cast_params(model.clone(), DType::BF16);
        assert_eq!(low.a.weight.val().dtype(), DType::BF16);
        assert_eq!(model.a.weight.val().dtype(), DType::F32);
        let out = low.b.forward(low.a.forward(x.cast(DType::BF16)));
        let loss = out.cast(DType::F32).powi_scalar(2).mean();
        let grads = loss.backward();

        for (w, name) in [(&model.a.weight, "a"), (&model.b.weight, "b")] {
            let g = w
                .val()
                .grad(&grads)
                .expect("the f32 parameter has a gradient");
            assert_eq!(g.dtype(), DType::F32, "{name}");
            let r = w.val().grad(&f32_grads).unwrap();
            let g: Vec<f32> = g.into_data().try_to_vec().unwrap();
            let r: Vec<f32> = r.into_data().try_to_vec().unwrap();
            let dot: f32 = g.iter().zip(&r).map(|(a, b)| a * b).sum();
            let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
            // bf16 rounds each op to 2^-9 relative; each gradient element here passes through
            // at most 8 rounded ops (two layers forward and back, the casts), so it is within
            // 2^-6 of the f32 one, its norm too, and the cosine is within 2^-12 of 1 (measured:
            // 2e-3 and 1e-5). A gradient that does not reach the f32 weights fails above.
            let cosine = dot / (norm(&g) * norm(&r));
            let scale = norm(&g) / norm(&r);
            eprintln!("{name}: cosine {cosine}, norm ratio {scale}");
            assert!(cosine > 1.0 - 2f32.powi(-12), "{name}: cosine {cosine}");
            assert!(
                (scale - 1.0).abs() < 2f32.powi(-6),
                "{name}: norm ratio {scale}"
            );
        }
    }
}
