//! Kiln's elementwise kernels: GELU, GEGLU, SiLU, CLIP's quick GELU, and GroupNorm with an
//! optional SiLU, computed in f32 (bf16 and f16 inputs widened, the results rounded back).
//!
//! burn-flex computes `erf` and `exp` one scalar libm call at a time: GELU takes 16 ns per
//! element and SiLU 8 (`[2, 4096, 1280]` and `[2, 320, 64, 64]` on the 2-core Xeon), so the
//! SD 1.5 UNet spent about a second of a 512 px step in them, and burn's GroupNorm (composed of
//! tensor ops, with the SiLU after it a separate pass) writes the full tensor three times. Here
//! each is one pass over the data in vector loops compiled for AVX-512, AVX2+FMA and NEON and
//! chosen at run time (`multiversion`), in parallel chunks on rayon; each element's arithmetic
//! is the same whatever the split.
//!
//! GELU is the exact (erf) one, with `erf` as PyTorch's own vectorised CPU kernel computes it
//! (Abramowitz and Stegun 7.1.26: `1 - t (p1 + .. + p5 t^4) e^(-x^2)`, `t = 1 / (1 + p|x|)`,
//! absolute error below 1.5e-7), except that `1 + erf(x)` for negative `x` is taken as
//! `t (..) e^(-x^2)` directly, without the cancellation of adding it to 1.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::exp;
use super::host::{self, Float};

/// Elements of one parallel chunk of an elementwise kernel.
const CHUNK: usize = 1 << 14;

/// Exact GELU, `x / 2 (1 + erf(x / sqrt 2))`, of a float flex tensor, or `None` (the caller
/// then uses burn's op).
pub fn gelu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    dispatch!(x, map(x, gelu_slice))
}

/// SiLU, `x sigmoid(x)`, of a float flex tensor, or `None` (the caller then uses burn's op).
pub fn silu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    dispatch!(x, map(x, silu_slice))
}

/// CLIP's quick GELU, `x sigmoid(1.702 x)`, of a float flex tensor, or `None` (the caller then
/// uses burn's ops).
pub fn quick_gelu<const D: usize>(x: &Tensor<D>) -> Option<Tensor<D>> {
    dispatch!(x, map(x, quick_gelu_slice))
}

/// GEGLU's gating: `h[.., :n] * gelu(h[.., n:])` for `h` of last dimension `2n`, or `None`.
///
/// # Shapes
/// - `h`: `[batch, tokens, 2 * n]`
/// - output: `[batch, tokens, n]`
pub fn geglu(h: &Tensor<3>) -> Option<Tensor<3>> {
    dispatch!(h, geglu_host(h))
}

/// GroupNorm of a float flex tensor, then SiLU when `silu`, or `None` (the caller then uses
/// burn's ops). PyTorch's numerics: per (sample, group) the mean and the biased variance (two
/// passes, accumulated in f64), `eps` inside the square root, then `gamma`, `beta` per channel.
///
/// # Shapes
/// - `x`: `[batch, channels, ...]`; `gamma`, `beta`: `[channels]`
/// - output: same as `x`
pub fn group_norm<const D: usize>(
    x: &Tensor<D>,
    groups: usize,
    eps: f64,
    affine: Option<(&Tensor<1>, &Tensor<1>)>,
    silu: bool,
) -> Option<Tensor<D>> {
    dispatch!(x, group_norm_host(x, groups, eps, affine, silu))
}

/// [`group_norm`] taking `x` by value: where `x` is a contiguous flex tensor that nothing else
/// holds, the result is written over its elements (no second tensor of its size is allocated:
/// a VAE decoder's ResNet blocks at 512x512 peak 128 MiB lower); otherwise as [`group_norm`].
/// `Err(x)`, given back, where [`group_norm`] would return `None`.
// the error is the caller's own input handed back (a `Tensor` is 256 bytes), not an error value
#[allow(clippy::result_large_err)]
pub fn group_norm_owned<const D: usize>(
    x: Tensor<D>,
    groups: usize,
    eps: f64,
    affine: Option<(&Tensor<1>, &Tensor<1>)>,
    silu: bool,
) -> Result<Tensor<D>, Tensor<D>> {
    dispatch!(x, group_norm_in_place(x, groups, eps, affine, silu) else Err(x))
}

/// Calls the generic host function `$f` for the element type of `$x` (f32, bf16 or f16), or
/// gives `$other` (`None` unless said) for other dtypes.
macro_rules! dispatch {
    ($x:expr, $f:ident($($arg:expr),*)) => {
        dispatch!($x, $f($($arg),*) else None)
    };
    ($x:expr, $f:ident($($arg:expr),*) else $other:expr) => {
        match $x.dtype() {
            burn::tensor::DType::F32 => $f::<f32, _>($($arg),*),
            burn::tensor::DType::BF16 => $f::<half::bf16, _>($($arg),*),
            burn::tensor::DType::F16 => $f::<half::f16, _>($($arg),*),
            _ => $other,
        }
    };
}
use dispatch;

std::thread_local! {
    /// Each thread's f32 scratch for widened inputs and outputs (a chunk each).
    static SCRATCH: std::cell::Cell<(Vec<f32>, Vec<f32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's two scratch buffers.
fn with_scratch<R>(f: impl FnOnce(&mut Vec<f32>, &mut Vec<f32>) -> R) -> R {
    let (mut a, mut b) = SCRATCH.take();
    let r = f(&mut a, &mut b);
    SCRATCH.set((a, b));
    r
}

/// `f` applied elementwise in parallel chunks.
fn map<T: Float, const D: usize>(x: &Tensor<D>, f: fn(&[f32], &mut [f32])) -> Option<Tensor<D>> {
    let dims = x.dims();
    let x = host::Host::<T>::new(x.clone())?;
    let xs = x.as_slice();
    let mut out = bytemuck::zeroed_vec::<T>(xs.len());
    out.par_chunks_mut(CHUNK)
        .zip(xs.par_chunks(CHUNK))
        .for_each(|(out, x)| {
            with_scratch(|wide, result| T::store(out, result, |out| f(T::widen(x, wide), out)))
        });
    Some(host::tensor(out, dims))
}

fn geglu_host<T: Float, const D: usize>(h: &Tensor<D>) -> Option<Tensor<D>> {
    let dims = h.dims();
    let two_n = dims[D - 1];
    if !two_n.is_multiple_of(2) {
        return None;
    }
    let n = two_n / 2;
    let h = host::Host::<T>::new(h.clone())?;
    let h = h.as_slice();
    let mut out_dims = dims;
    out_dims[D - 1] = n;
    let mut out = bytemuck::zeroed_vec::<T>(out_dims.iter().product());
    if n > 0 {
        let rows = CHUNK.div_ceil(n);
        out.par_chunks_mut(rows * n)
            .zip(h.par_chunks(rows * two_n))
            .for_each(|(out, h)| {
                with_scratch(|wide, result| {
                    let h = T::widen(h, wide);
                    T::store(out, result, |out| {
                        for (out, h) in out.chunks_exact_mut(n).zip(h.chunks_exact(two_n)) {
                            let (hidden, gate) = h.split_at(n);
                            geglu_row(hidden, gate, out);
                        }
                    })
                })
            });
    }
    Some(host::tensor(out, out_dims))
}

/// The checked sizes of a GroupNorm of `x`: `[spatial size, channels per group]` and the affine
/// parameters in f32, or `None` where the kernel does not apply.
#[allow(clippy::type_complexity)]
fn group_norm_sizes<const D: usize>(
    x: &Tensor<D>,
    groups: usize,
    affine: Option<(&Tensor<1>, &Tensor<1>)>,
) -> Option<([usize; 2], Option<(Vec<f32>, Vec<f32>)>)> {
    let dims = x.dims();
    if D < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        return None;
    }
    let channels = dims[1];
    let spatial: usize = dims[2..].iter().product();
    let affine = match affine {
        Some((gamma, beta)) => {
            if gamma.dims() != [channels] || beta.dims() != [channels] {
                return None;
            }
            Some((host::bias_f32(gamma)?, host::bias_f32(beta)?))
        }
        None => None,
    };
    Some(([spatial, channels / groups], affine))
}

/// The mean and `1 / sqrt(var + eps)` of one group's elements (two passes, in f64).
fn group_stats(x: &[f32], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = sum(x) / n;
    let var = centered_squares(x, mean as f32) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Channel `c` of a group's `(scale, shift)`: `y = x * scale + shift`.
fn channel_scale_shift(
    affine: &Option<(Vec<f32>, Vec<f32>)>,
    c: usize,
    (mean, inv_std): (f64, f64),
) -> (f32, f32) {
    let (gamma, beta) = match affine {
        Some((g, b)) => (g[c] as f64, b[c] as f64),
        None => (1.0, 0.0),
    };
    let scale = gamma * inv_std;
    (scale as f32, (beta - mean * scale) as f32)
}

fn group_norm_host<T: Float, const D: usize>(
    x: &Tensor<D>,
    groups: usize,
    eps: f64,
    affine: Option<(&Tensor<1>, &Tensor<1>)>,
    silu: bool,
) -> Option<Tensor<D>> {
    let ([spatial, per_group], affine) = group_norm_sizes(x, groups, affine)?;
    let host_x = host::Host::<T>::new(x.clone())?;
    let xs = host_x.as_slice();
    let mut out = bytemuck::zeroed_vec::<T>(xs.len());
    let block = per_group * spatial;
    if block > 0 {
        out.par_chunks_mut(block)
            .zip(xs.par_chunks(block))
            .enumerate()
            .for_each(|(i, (out, x))| {
                with_scratch(|wide, result| {
                    let x = T::widen(x, wide);
                    let stats = group_stats(x, eps);
                    let c0 = (i % groups) * per_group;
                    T::store(out, result, |out| {
                        for (c, (out, x)) in
                            out.chunks_mut(spatial).zip(x.chunks(spatial)).enumerate()
                        {
                            let (scale, shift) = channel_scale_shift(&affine, c0 + c, stats);
                            scale_shift(x, scale, shift, silu, out);
                        }
                    })
                })
            });
    }
    Some(host::tensor(out, x.dims()))
}

/// The `(scale, shift)` of each (image, channel) of the GroupNorm of `x` (f32, whose elements
/// are `xs`), image-major, computed as [`group_norm`] computes them: `x * scale + shift` is its
/// output before the SiLU. `None` where [`group_norm`] does not apply.
pub(super) fn group_norm_scale_shift<const D: usize>(
    x: &Tensor<D>,
    xs: &[f32],
    groups: usize,
    eps: f64,
    affine: Option<(&Tensor<1>, &Tensor<1>)>,
) -> Option<Vec<(f32, f32)>> {
    let ([spatial, per_group], affine) = group_norm_sizes(x, groups, affine)?;
    let block = per_group * spatial;
    if block == 0 || !xs.len().is_multiple_of(block) {
        return None;
    }
    let mut scale_shift = vec![(0f32, 0f32); xs.len() / spatial];
    scale_shift
        .par_chunks_mut(per_group)
        .zip(xs.par_chunks(block))
        .enumerate()
        .for_each(|(i, (out, x))| {
            let stats = group_stats(x, eps);
            let c0 = (i % groups) * per_group;
            for (c, out) in out.iter_mut().enumerate() {
                *out = channel_scale_shift(&affine, c0 + c, stats);
            }
        });
    Some(scale_shift)
}

/// [`group_norm_owned`] for element type `T`.
#[allow(clippy::result_large_err)]
fn group_norm_in_place<T: Float, const D: usize>(
    x: Tensor<D>,
    groups: usize,
    eps: f64,
    affine: Option<(&Tensor<1>, &Tensor<1>)>,
    silu: bool,
) -> Result<Tensor<D>, Tensor<D>> {
    use burn_flex::Flex;
    let Some(([spatial, per_group], affine_f32)) = group_norm_sizes(&x, groups, affine) else {
        return Err(x);
    };
    // shared or strided (or not flex, where the host path declines too): a new tensor
    let (mut flex, range) = match host::unique_flex(x) {
        Ok(unique) => unique,
        Err(x) => return group_norm_host::<T, D>(&x, groups, eps, affine, silu).ok_or(x),
    };
    let Some(storage) = flex.try_storage_mut::<T>() else {
        unreachable!("unique and of dtype T");
    };
    let xs = &mut storage[range];
    let block = per_group * spatial;
    if block > 0 {
        xs.par_chunks_mut(block).enumerate().for_each(|(i, x)| {
            with_scratch(|wide, result| {
                let stats = group_stats(T::widen(x, wide), eps);
                let c0 = (i % groups) * per_group;
                for (c, x) in x.chunks_mut(spatial).enumerate() {
                    let (scale, shift) = channel_scale_shift(&affine_f32, c0 + c, stats);
                    T::update(x, result, |x| scale_shift_in_place(x, scale, shift, silu));
                }
            })
        });
    }
    Ok(Tensor::from_primitive::<Flex>(flex))
}

const A_S_P: f32 = 0.327_591_1;
const A_S: [f32; 5] = [
    0.254_829_6,
    -0.284_496_74,
    1.421_413_8,
    -1.453_152,
    1.061_405_4,
];

/// `1 + erf(z)`, without cancellation for negative `z` (see the module docs).
#[inline(always)]
fn one_plus_erf(z: f32, fma: bool) -> f32 {
    let a = z.abs();
    let t = 1.0 / (1.0 + A_S_P * a);
    let r = t * (A_S[0] + t * (A_S[1] + t * (A_S[2] + t * (A_S[3] + t * A_S[4]))));
    // erfc(|z|) = r e^(-z^2)
    let q = r * exp(-a * a, fma);
    if z < 0.0 { q } else { 2.0 - q }
}

#[inline(always)]
fn gelu_one(x: f32, fma: bool) -> f32 {
    0.5 * x * one_plus_erf(x * std::f32::consts::FRAC_1_SQRT_2, fma)
}

/// `sigmoid(x)` from `e = e^(-|x|)` (never overflows): `1 / (1 + e)` for `x >= 0` and
/// `e / (1 + e)` below.
#[inline(always)]
fn sigmoid_one(x: f32, fma: bool) -> f32 {
    let e = exp(-x.abs(), fma);
    (if x >= 0.0 { 1.0 } else { e }) / (1.0 + e)
}

/// `x sigmoid(x)`.
#[inline(always)]
fn silu_one(x: f32, fma: bool) -> f32 {
    x * sigmoid_one(x, fma)
}

/// `x sigmoid(1.702 x)`, the product `1.702 x` rounded to f32 first, as transformers' CLIP
/// computes it.
#[inline(always)]
fn quick_gelu_one(x: f32, fma: bool) -> f32 {
    x * sigmoid_one(1.702 * x, fma)
}

vectorised! {
    fn gelu_slice(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = gelu_one(x, has_fma!());
        }
    }
}

vectorised! {
    fn silu_slice(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = silu_one(x, has_fma!());
        }
    }
}

vectorised! {
    fn quick_gelu_slice(x: &[f32], out: &mut [f32]) {
        for (o, &x) in out.iter_mut().zip(x) {
            *o = quick_gelu_one(x, has_fma!());
        }
    }
}

vectorised! {
    fn geglu_row(hidden: &[f32], gate: &[f32], out: &mut [f32]) {
        for ((o, &h), &g) in out.iter_mut().zip(hidden).zip(gate) {
            *o = h * gelu_one(g, has_fma!());
        }
    }
}

/// Lanes of the reductions' accumulators: one AVX-512 register of f32 (two AVX2 ones).
const LANES: usize = 16;

/// `sum(f(x))`, in f32 lanes over chunks of 1024 elements, each chunk's total added in f64.
/// Inlined into each vectorised caller, so that it is compiled for that caller's CPU features.
#[inline(always)]
fn blocked_sum(x: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0f64;
    for block in x.chunks(1024) {
        let mut acc = [0f32; LANES];
        let mut chunks = block.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += f(v);
            }
        }
        let rest: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
        total += acc.iter().map(|&a| a as f64).sum::<f64>() + rest as f64;
    }
    total
}

vectorised! {
    /// `sum(x)` ([`blocked_sum`]).
    fn sum(x: &[f32]) -> f64 {
        blocked_sum(x, |v| v)
    }
}

vectorised! {
    /// `sum((x - mean)^2)` ([`blocked_sum`]).
    fn centered_squares(x: &[f32], mean: f32) -> f64 {
        blocked_sum(x, |v| (v - mean) * (v - mean))
    }
}

vectorised! {
    /// `x = x * scale + shift`, then SiLU when `silu`.
    fn scale_shift_in_place(x: &mut [f32], scale: f32, shift: f32, silu: bool) {
        if silu {
            for x in x.iter_mut() {
                *x = silu_one(*x * scale + shift, has_fma!());
            }
        } else {
            for x in x.iter_mut() {
                *x = *x * scale + shift;
            }
        }
    }
}

vectorised! {
    /// `out = x * scale + shift`, then SiLU when `silu`.
    pub(super) fn scale_shift(x: &[f32], scale: f32, shift: f32, silu: bool, out: &mut [f32]) {
        if silu {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = silu_one(x * scale + shift, has_fma!());
            }
        } else {
            for (o, &x) in out.iter_mut().zip(x) {
                *o = x * scale + shift;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::seeded_normal;
    use burn::tensor::{Device, activation};

    fn values(t: &Tensor<1>) -> Vec<f32> {
        t.to_data().try_into_vec::<f32>().unwrap()
    }

    /// GELU and SiLU element by element against burn's (libm) ops, over [-12, 12] and the
    /// extremes. The bound: erf's approximation error here (1.5e-7) and burn's rounding of
    /// `1 + erf` for negative `x` (half an ulp of 1, 6e-8), each times `|x| / 2` in GELU; plus 5
    /// f32 ulps of the result for the rounding of the few operations on either side.
    #[test]
    fn activations_match_burns() {
        let device = Device::flex();
        let mut xs: Vec<f32> = (-120_000..=120_000).map(|i| i as f32 * 1e-4).collect();
        xs.extend([-1e30, -100.0, -88.0, 88.0, 100.0, 1e30, 0.0, -0.0]);
        let x = Tensor::<1>::from_data(xs.as_slice(), &device);
        for (name, ours, reference, approximation) in [
            (
                "gelu",
                gelu(&x).unwrap(),
                activation::gelu(x.clone()),
                (1.5e-7 + 6e-8) / 2.0,
            ),
            ("silu", silu(&x).unwrap(), activation::silu(x.clone()), 0.0),
            (
                "quick_gelu",
                quick_gelu(&x).unwrap(),
                x.clone() * activation::sigmoid(x.clone() * 1.702),
                0.0,
            ),
        ] {
            for ((&x, o), r) in xs.iter().zip(values(&ours)).zip(values(&reference)) {
                let bound = approximation * x.abs() + 5.0 * f32::EPSILON * r.abs() + 1e-30;
                assert!((o - r).abs() <= bound, "{name}({x}) = {o}, burn: {r}");
            }
        }
    }

    #[test]
    fn geglu_matches_burn() {
        let device = Device::flex();
        let h = seeded_normal([2, 37, 2 * 41], 1, &device) * 2.0;
        let hidden = h.clone().narrow(2, 0, 41);
        let gate = h.clone().narrow(2, 41, 41);
        let reference = hidden * activation::gelu(gate);
        let error = crate::reference::max_relative_error(&geglu(&h).unwrap(), &reference);
        assert!(error < 1e-6, "{error:e}");
    }

    /// Against `group_norm_forward` (burn's ops) with and without SiLU, affine or not, on
    /// inputs far from zero mean (where a one-pass variance would lose digits).
    #[test]
    fn group_norm_matches_burns_ops() {
        let device = Device::flex();
        let mut norm = crate::normalization::group_norm(4, 12, 1e-6, &device);
        norm.gamma = Some(burn::module::Param::from_tensor(
            seeded_normal([12], 101, &device) * 0.3 + 0.5,
        ));
        norm.beta = Some(burn::module::Param::from_tensor(
            seeded_normal([12], 102, &device) * 0.3 + 0.5,
        ));
        let x = seeded_normal([2, 12, 9, 7], 2, &device) * 2.0 + 30.0;
        let gamma = norm.gamma.as_ref().unwrap().val();
        let beta = norm.beta.as_ref().unwrap().val();
        let reference = crate::normalization::reference_group_norm(&norm, x.clone());
        for (affine, silu) in [(true, false), (true, true), (false, false)] {
            let ours = group_norm(&x, 4, 1e-6, affine.then_some((&gamma, &beta)), silu).unwrap();
            let reference = if affine {
                reference.clone()
            } else {
                let mut plain = norm.clone();
                plain.gamma = None;
                plain.beta = None;
                crate::normalization::reference_group_norm(&plain, x.clone())
            };
            let reference = if silu {
                activation::silu(reference)
            } else {
                reference
            };
            let error = crate::reference::max_relative_error(&ours, &reference);
            assert!(error < 1e-5, "affine {affine} silu {silu}: {error:e}");
        }
        // rank 3 (the VAE's attention norm sees [batch, channels, tokens])
        let x3 = seeded_normal([1, 12, 50], 3, &device);
        let ours = group_norm(&x3, 4, 1e-6, Some((&gamma, &beta)), false).unwrap();
        let reference = crate::normalization::reference_group_norm(&norm, x3);
        assert!(crate::reference::max_relative_error(&ours, &reference) < 1e-5);
    }

    /// `group_norm_owned` gives `group_norm`'s values, bit for bit, in every dtype: over the
    /// input's own storage where nothing else holds it, into a new tensor where something does
    /// (the input left as it was); `Err` with the input back where the kernel does not apply.
    #[test]
    fn group_norm_owned_writes_in_place_only_when_unique() {
        use burn::tensor::DType;
        use burn_flex::Flex;
        let device = Device::flex();
        let gamma = seeded_normal([12], 4, &device) * 0.3 + 1.0;
        let beta = seeded_normal([12], 5, &device) * 0.3;
        let address = |t: &Tensor<4>| {
            let flex = t.clone().try_into_primitive::<Flex>().unwrap();
            flex.bytes().as_ptr() as usize
        };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let x = (seeded_normal([2, 12, 9, 7], 6, &device) * 2.0 + 3.0).cast(dtype);
            let expected = group_norm(&x, 4, 1e-6, Some((&gamma, &beta)), true).unwrap();
            let values = |t: &Tensor<4>| t.to_data().convert::<f32>().try_to_vec::<f32>().unwrap();
            // shared: a new tensor, the input unchanged
            let before = values(&x);
            let shared = group_norm_owned(x.clone(), 4, 1e-6, Some((&gamma, &beta)), true).unwrap();
            assert_eq!(values(&shared), values(&expected), "{dtype:?}");
            assert_ne!(address(&shared), address(&x));
            assert_eq!(values(&x), before);
            // unique: the same storage
            let at = address(&x);
            let owned = group_norm_owned(x, 4, 1e-6, Some((&gamma, &beta)), true).unwrap();
            assert_eq!(address(&owned), at, "{dtype:?}");
            assert_eq!(values(&owned), values(&expected), "{dtype:?}");
        }
        // 12 channels in 5 groups: not applicable, the input comes back
        let x = Tensor::<4>::ones([1, 12, 2, 2], &device);
        let back = group_norm_owned(x, 5, 1e-6, None, false).unwrap_err();
        assert_eq!(back.dims(), [1, 12, 2, 2]);
    }

    /// bf16 and f16 inputs give the f32 kernel's result on the widened input, rounded to their
    /// dtype (bf16: within half an ulp, give or take f32's rounding; f16: its precision).
    #[test]
    fn bf16_and_f16_round_the_f32_result() {
        use burn::tensor::DType;
        let device = Device::flex();
        let gamma = seeded_normal([12], 8, &device) * 2.0 + 0.3;
        let beta = seeded_normal([12], 9, &device) * 2.0 + 0.3;
        for dtype in [DType::BF16, DType::F16] {
            let x = (seeded_normal([2, 12, 9, 7], 10, &device) * 2.0 + 0.3).cast(dtype);
            let h = (seeded_normal([2, 37, 82], 11, &device) * 2.0 + 0.3).cast(dtype);
            let (g, b) = (gamma.clone().cast(dtype), beta.clone().cast(dtype));
            let wide = |t: &Tensor<4>| t.clone().cast(DType::F32);
            let (gw, bw) = (
                wide(&g.clone().reshape([1, 12, 1, 1])).reshape([12]),
                b.clone().cast(DType::F32),
            );
            let cases: Vec<(&str, Tensor<4>, Tensor<4>)> = vec![
                ("gelu", gelu(&x).unwrap(), gelu(&wide(&x)).unwrap()),
                ("silu", silu(&x).unwrap(), silu(&wide(&x)).unwrap()),
                (
                    "quick_gelu",
                    quick_gelu(&x).unwrap(),
                    quick_gelu(&wide(&x)).unwrap(),
                ),
                (
                    "group_norm",
                    group_norm(&x, 4, 1e-6, Some((&g, &b)), true).unwrap(),
                    group_norm(&wide(&x), 4, 1e-6, Some((&gw, &bw)), true).unwrap(),
                ),
                (
                    "geglu",
                    geglu(&h).unwrap().unsqueeze(),
                    geglu(&h.clone().cast(DType::F32)).unwrap().unsqueeze(),
                ),
            ];
            for (name, ours, exact) in cases {
                assert_eq!(ours.dtype(), dtype, "{name}");
                if dtype == DType::BF16 {
                    let ulps = crate::kernels::bf16_check::ulps(&ours, &exact);
                    assert!(ulps <= 1.0, "{name}: {ulps} half-ulps");
                } else {
                    let error = crate::reference::max_relative_error(&wide(&ours), &exact);
                    assert!(error < 1e-3, "{name} f16: {error:e}");
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_the_result() {
        let device = Device::flex();
        let x = seeded_normal([2, 64, 33, 31], 7, &device);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let g = group_norm(&x, 32, 1e-5, None, true).unwrap();
                let a = gelu(&x).unwrap();
                [g, a].map(|t| t.into_data().try_into_vec::<f32>().unwrap())
            })
        };
        assert_eq!(run(1), run(3));
    }
}
