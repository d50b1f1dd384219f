//! GroupNorm with PyTorch's numerics (biased variance, `eps` inside the square root), written
//! with as few tensor operations as possible.
//!
//! Mirrors `torch.nn.GroupNorm` as diffusers uses it (`diffusers/models/resnet.py`,
//! `attention_processor.py`, `transformers/transformer_2d.py`). The parameters live in burn-nn's
//! [`GroupNorm`] (so `weight`/`bias` load into `gamma`/`beta` with no remapping); the forward
//! here folds the statistics and the affine into one per-channel scale and shift, so the
//! full-size tensor is touched by one reduction pass and one fused multiply-add.

use burn::nn::{GroupNorm, GroupNormConfig};
use burn::tensor::{DType, Device, Tensor};

use crate::activation::Activation;
use crate::profile::OpKind::Norm;

/// Builds an affine [`GroupNorm`] over `channels` in `groups` groups.
pub fn group_norm(groups: usize, channels: usize, eps: f64, device: &Device) -> GroupNorm {
    GroupNormConfig::new(groups, channels)
        .with_epsilon(eps)
        .init(device)
}

/// Applies `norm` to `x`: on flex in f32 inference through Kiln's kernel
/// ([`crate::kernels::group_norm`], one pass for the statistics and one for the output), with
/// burn's tensor ops everywhere else ([`reference_group_norm`]).
///
/// # Shapes
/// - `x`: `[batch, channels, ...]` (any rank `D >= 3`)
/// - output: same as `x`
pub fn group_norm_forward<const D: usize>(norm: &GroupNorm, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let describe = || (format!("groupnorm {}", crate::profile::dims(&dims)), 0);
    crate::profile::timed(Norm, describe, || norm_forward(norm, x))
}

/// [`group_norm_forward`] without its timing.
fn norm_forward<const D: usize>(norm: &GroupNorm, x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    let x = match kernel_group_norm(norm, x, false) {
        Ok(y) => return y,
        Err(x) => x,
    };
    reference_group_norm(norm, x)
}

/// [`group_norm_forward`] followed by `act`, fused into one pass for SiLU on flex in f32.
///
/// # Shapes
/// - `x`: `[batch, channels, ...]`
/// - output: same as `x`
pub fn group_norm_act<const D: usize>(
    norm: &GroupNorm,
    act: Activation,
    x: Tensor<D>,
) -> Tensor<D> {
    let dims = x.dims();
    let describe = || {
        let op = format!("groupnorm+{} {}", act.name(), crate::profile::dims(&dims));
        (op, 0)
    };
    crate::profile::timed(Norm, describe, || norm_act(norm, act, x))
}

/// [`group_norm_act`] without its timing.
fn norm_act<const D: usize>(norm: &GroupNorm, act: Activation, x: Tensor<D>) -> Tensor<D> {
    #[cfg(feature = "flex")]
    let x = match act {
        Activation::Silu => match kernel_group_norm(norm, x, true) {
            Ok(y) => return y,
            Err(x) => x,
        },
        _ => x,
    };
    act.forward(group_norm_forward(norm, x))
}

/// [`group_norm_act`] with SiLU, the pairing of every ResNet block.
///
/// # Shapes
/// - `x`: `[batch, channels, ...]`
/// - output: same as `x`
pub fn group_norm_silu<const D: usize>(norm: &GroupNorm, x: Tensor<D>) -> Tensor<D> {
    group_norm_act(norm, Activation::Silu, x)
}

/// Kiln's GroupNorm kernel (over `x`'s own elements where nothing else holds them), or `x`
/// back where it does not apply.
#[cfg(feature = "flex")]
#[allow(clippy::result_large_err)]
fn kernel_group_norm<const D: usize>(
    norm: &GroupNorm,
    x: Tensor<D>,
    silu: bool,
) -> Result<Tensor<D>, Tensor<D>> {
    let Some(affine) = kernel_affine(norm) else {
        return Err(x);
    };
    crate::kernels::group_norm_owned(
        x,
        norm.num_groups,
        norm.epsilon,
        affine.as_ref().map(|(g, b)| (g, b)),
        silu,
    )
}

/// `norm`'s `(gamma, beta)` as Kiln's GroupNorm kernels take them: `Some(None)` without an
/// affine, `None` for one of the two alone (the kernels do not apply).
#[cfg(feature = "flex")]
pub(crate) fn kernel_affine(norm: &GroupNorm) -> Option<Option<(Tensor<1>, Tensor<1>)>> {
    match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) => Some(Some((gamma.val(), beta.val()))),
        (None, None) => Some(None),
        _ => None,
    }
}

/// GroupNorm of burn's tensor ops, on every backend and dtype.
///
/// The mean and the biased variance of each (sample, group) are computed in f32 (widened from
/// f16/bf16 inputs), then `y = x * a + s` with `a = gamma / sqrt(var + eps)` and
/// `s = beta - mean * a` per (sample, channel).
///
/// # Shapes
/// - `x`: `[batch, channels, ...]` (any rank `D >= 3`)
/// - output: same as `x`
pub fn reference_group_norm<const D: usize>(norm: &GroupNorm, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    let (batch, channels) = (dims[0], dims[1]);
    let groups = norm.num_groups;
    let per_group = channels / groups;
    let dtype = x.dtype();
    let wide = matches!(dtype, DType::F16 | DType::BF16);

    // [b, groups, channels/groups * spatial]
    let grouped: Tensor<3> = x.clone().reshape([batch as i32, groups as i32, -1]);
    let grouped = if wide {
        grouped.cast(DType::F32)
    } else {
        grouped
    };
    let (var, mean) = grouped.var_mean_bias(2); // [b, groups, 1] each
    let inv_std = var.add_scalar(norm.epsilon).sqrt().recip();

    // Per (sample, channel): [b, groups, 1] -> [b, groups, per_group] -> [b, channels]
    let per_channel = |t: Tensor<3>| -> Tensor<2> {
        t.expand([batch, groups, per_group])
            .reshape([batch, channels])
    };
    let mut scale = per_channel(inv_std);
    let mut shift = per_channel(mean.neg()) * scale.clone();
    if let (Some(gamma), Some(beta)) = (&norm.gamma, &norm.beta) {
        let gamma = gamma.val().cast(scale.dtype()).unsqueeze_dim::<2>(0);
        let beta = beta.val().cast(scale.dtype()).unsqueeze_dim::<2>(0);
        scale = scale * gamma.clone();
        shift = shift * gamma + beta;
    }
    if wide {
        scale = scale.cast(dtype);
        shift = shift.cast(dtype);
    }
    let mut affine_shape = [1usize; D];
    affine_shape[0] = batch;
    affine_shape[1] = channels;
    x * scale.reshape(affine_shape) + shift.reshape(affine_shape)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, Tolerance};

    #[test]
    fn matches_burn_nn_group_norm() {
        let device = Device::default();
        let mut norm = group_norm(4, 8, 1e-6, &device);
        norm.gamma = Some(burn::module::Param::from_tensor(Tensor::random(
            [8],
            Distribution::Normal(1.0, 0.3),
            &device,
        )));
        norm.beta = Some(burn::module::Param::from_tensor(Tensor::random(
            [8],
            Distribution::Normal(0.0, 0.3),
            &device,
        )));
        let x = Tensor::<4>::random([2, 8, 5, 3], Distribution::Normal(0.5, 2.0), &device);
        let expected = norm.forward(x.clone());
        let got = group_norm_forward(&norm, x);
        got.into_data()
            .assert_approx_eq::<f32>(&expected.into_data(), Tolerance::<f32>::absolute(1e-5));
    }
}
