//! Kiln's own CPU kernels, for the ops where burn-flex's are well below what the CPU can do
//! (docs/performance.md). Each reads the host data of plain (not autodiff) flex tensors in
//! place and returns a new tensor, so it serves inference only: on an autodiff device, for
//! other dtypes and on every other backend it returns `None` and the callers use burn's op.
//! Each is checked against the burn op it replaces (the `tests` of each module).
//!
//! f32 is computed as described below. bf16 products run on Intel's AMX tiles where the CPU has
//! them ([`amx_available`]), or with AVX512-BF16's `vdpbf16ps` where that outruns f32 FMAs
//! ([`native_bf16`]): linear layers, convolutions, attention, their weights packed once and
//! kept while they live, f32-accumulated and rounded to bf16 once, as
//! PyTorch's oneDNN kernels compute; elsewhere bf16 and f16 run the f32 kernels and round the
//! result, the weights widened a task's block at a time in cache (never a whole-model copy at
//! every call; burn-flex widens each matmul's operands whole, or computes one scalar at a
//! time). The elementwise kernels widen a chunk at a time in every case.
//!
//! - [`attention`]: on x86-64 with AVX2 or AVX-512 a fused kernel (each head's keys and values
//!   packed once, the online softmax of chunks of keys in registers, L1 and L2); elsewhere
//!   blocks of queries whose score rows fit in cache, their products through gemm.
//! - [`conv2d`]: 3x3 convolutions with stride 1 from 8x8 output pixels up by Winograd's
//!   F(2x2, 3x3) (`winograd`: 16 GEMMs on transformed tiles, 2.25x fewer multiplications);
//!   the rest as im2col straight from NCHW into cache-sized column panels, one GEMM per panel
//!   on the weights as stored, written in place into the output. [`conv2d_with`] picks one.
//!   [`group_norm_conv2d`] reads its input through a GroupNorm and SiLU (in Winograd's input
//!   transform) so that the input stays as it is for a residual path; [`conv2d_pointwise_owned`]
//!   writes a 1x1 convolution over its own input; [`upsample_conv2d`] is nearest x2 upsampling
//!   and a 3x3 convolution as four 2x2 convolutions of the input, without the upsampled image
//!   (the three keep the VAE decoder's largest tensors from being alive together).
//! - [`linear`]: the flattened rows by the weight in tasks of rows x output columns, each
//!   written straight into the output with the bias added in cache.
//! - [`gelu`], [`geglu`], [`silu`], [`group_norm`] (with an optional SiLU): one vectorised pass
//!   each where burn computes one scalar libm call per element or several tensor passes.

/// Compiles each function given for AVX-512, AVX2+FMA and NEON (and the baseline), the version
/// chosen at run time from the CPU's features (`multiversion`).
macro_rules! vectorised {
    ($($item:item)*) => {
        $(
            #[multiversion::multiversion(targets(
                "x86_64+avx512f+avx512bw+avx512vl+avx512dq",
                "x86_64+avx2+fma",
                "aarch64+neon"
            ))]
            $item
        )*
    };
}

/// Whether the [`vectorised!`] clone this is expanded in has fused multiply-adds: a constant
/// of each clone (x86-64 with FMA, AArch64), false in the generic fallback, where `mul_add`
/// would be a library call per element. Only inside a function that [`vectorised!`] wraps.
macro_rules! has_fma {
    () => {
        multiversion::target::match_target! {
            "x86_64+fma" => true,
            "aarch64+neon" => true,
            _ => false,
        }
    };
}

/// Intel's AMX tiles (bf16 products): x86-64 Linux with glibc, where the kernel grants their
/// state (`arch_prctl`).
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
mod amx;
mod attention;
mod conv;
mod elementwise;
mod host;
mod linear;
#[cfg(target_arch = "x86_64")]
pub mod peak;
mod upsample;
mod winograd;

pub use attention::{MIN_KEYS, attention, attention_tokens};
pub use conv::{
    Conv2dAlgorithm, Conv2dOptions, InputGroupNorm, conv2d, conv2d_pointwise_owned, conv2d_with,
    group_norm_conv2d, pointwise_in_place_applies,
};
pub use elementwise::{geglu, gelu, group_norm, group_norm_owned, quick_gelu, silu};
pub use linear::linear;
pub use upsample::{UPSAMPLE_MIN_PIXELS, upsample_conv2d};

/// Whether Kiln's kernels keep a packed copy of the weights they multiply (linear layers and
/// convolutions, as much memory again as those weights) for models of `dtype` on `device`:
/// bf16 on flex where bf16 products run natively ([`native_bf16`]).
pub fn packs_weights(device: &burn::tensor::Device, dtype: burn::tensor::DType) -> bool {
    dtype == burn::tensor::DType::BF16 && *device == burn::tensor::Device::flex() && native_bf16()
}

/// Whether bf16 products run on bf16 operands here, their weights packed once: on AMX tiles
/// ([`amx_available`]), or with AVX512-BF16's `vdpbf16ps` where it outruns f32 FMAs (measured
/// once, at first use: Zen 4 has it at twice their rate). Elsewhere bf16 runs the f32 kernels
/// on operands widened a block at a time. `KILN_BF16=tiles|dot|f32` forces one of the three
/// where the CPU can run it; `KILN_BF16=emulate` runs the native paths on scalar code that reads
/// the packed operands as the tiles do, on any x86-64 CPU (for tests: slow).
pub fn native_bf16() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    return amx::engine().is_some();
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
    return false;
}

/// What bf16 products run on here, for reports: `"amx"` (the tiles), `"avx512bf16"`
/// (`vdpbf16ps`), `"emulated"` (`KILN_BF16=emulate`) or `"f32"` (the f32 kernels on operands
/// widened a block at a time); see
/// [`native_bf16`].
pub fn bf16_products() -> &'static str {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    return match amx::engine() {
        Some(amx::Engine::Tiles) => "amx",
        Some(amx::Engine::DotProduct) => "avx512bf16",
        Some(amx::Engine::Emulated) => "emulated",
        None => "f32",
    };
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
    return "f32";
}

/// Whether bf16 products run on AMX tiles here (x86-64 Linux with AMX-BF16, the kernel's
/// permission granted, `KILN_AMX` not `0`); elsewhere bf16 kernels run in f32, their operands
/// widened a block at a time.
pub fn amx_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    return amx::available();
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu")))]
    return false;
}

/// `a * b + c`, in one rounding (one instruction) when `fma` (see [`has_fma!`]).
#[inline(always)]
fn madd(a: f32, b: f32, c: f32, fma: bool) -> f32 {
    if fma { a.mul_add(b, c) } else { a * b + c }
}

/// `e^x` for `x <= 0` to within an ulp (branch-free, so that the kernels' loops vectorise):
/// `x = n ln 2 + r`, `|r| <= ln 2 / 2`, `e^x = 2^n e^r`, with `e^r` a degree-6 polynomial
/// (a minimax fit for relative error, 2e-9 before rounding; `xtask/bench/exp_fit.py`) and
/// `2^n` added to the result's exponent bits. Below -87 (near f32's smallest normal number)
/// the result is 0; NaN stays NaN. With `fma` ([`has_fma!`]) the range reduction and the
/// polynomial's steps are fused multiply-adds (about a third fewer instructions; the softmax's
/// exponentials are ALU-bound).
#[inline(always)]
fn exp(x: f32, fma: bool) -> f32 {
    use exp_constants::*;
    let tiny = x < TINY;
    let t = madd(x, LOG2E, ROUND, fma);
    let n = t - ROUND;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let r = madd(-n, LN2_LO, madd(-n, LN2_HI, x, fma), fma);
    let mut p = POLY[0];
    for c in &POLY[1..] {
        p = madd(p, r, *c, fma);
    }
    let e = madd(p, r, 1.0, fma);
    // e^r in [0.7, 1.42] times 2^n: for x >= -87, n >= -126 and the product is a normal
    // number, so adding n to the exponent field is exact (one integer add, not a multiply)
    let e = f32::from_bits((e.to_bits() as i32).wrapping_add(ni.wrapping_shl(23)) as u32);
    if tiny { 0.0 } else { e }
}

/// The constants of [`exp`], shared with the vector kernels that take the same steps.
mod exp_constants {
    /// Below this, `exp` is 0.
    pub(super) const TINY: f32 = -87.0;
    pub(super) const LOG2E: f32 = std::f32::consts::LOG2_E;
    /// 1.5 * 2^23: adding it rounds to an integer held in the low mantissa bits.
    pub(super) const ROUND: f32 = 12_582_912.0;
    /// ln 2 in two parts, for an exact `x - n ln 2`.
    pub(super) const LN2_HI: f32 = 0.693_359_4;
    pub(super) const LN2_LO: f32 = -2.121_944_4e-4;
    /// The polynomial `p(r) ~ (e^r - 1) / r`, highest degree first (Horner's steps), so that
    /// `e^r = p(r) r + 1`.
    pub(super) const POLY: [f32; 6] = [
        1.384_360_7e-3,
        8.374_196e-3,
        4.166_800_5e-2,
        1.666_643e-1,
        0.499_999_94,
        1.0,
    ];
}

/// Test helpers for the kernels' bf16 paths.
#[cfg(test)]
pub(crate) mod bf16_check {
    use burn::tensor::Tensor;

    /// The largest `|ours - exact| / (2^-8 |exact| + 1e-6 max|exact|)` over the elements: at most
    /// 1 when every element of `ours` (bf16) is `exact` (an f32 result of the same bf16 inputs)
    /// rounded to bf16, half a bf16 ulp, give or take f32's summation-order differences.
    pub(crate) fn ulps<const D: usize>(ours: &Tensor<D>, exact: &Tensor<D>) -> f32 {
        assert_eq!(ours.dims(), exact.dims());
        assert_eq!(ours.dtype(), burn::tensor::DType::BF16);
        let o: Vec<f32> = ours.to_data().convert::<f32>().try_to_vec().unwrap();
        let e: Vec<f32> = exact.to_data().convert::<f32>().try_to_vec().unwrap();
        let max = e.iter().fold(0f32, |m, v| m.max(v.abs()));
        o.iter()
            .zip(&e)
            .map(|(o, e)| (o - e).abs() / (e.abs() / 256.0 + 1e-6 * max))
            .fold(0f32, f32::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_an_ulp() {
        let mut worst = 0f64;
        for fma in [false, true] {
            for i in 0..=200_000 {
                let x = -87.0 * i as f32 / 200_000.0;
                let ours = exp(x, fma) as f64;
                let exact = (x as f64).exp();
                worst = worst.max((ours - exact).abs() / exact);
            }
            assert!(
                worst < f32::EPSILON as f64,
                "fma {fma}: worst relative error {worst:e}"
            );
            assert_eq!(exp(0.0, fma), 1.0);
            assert_eq!(exp(-88.0, fma), 0.0);
            assert_eq!(exp(-1e30, fma), 0.0);
            assert_eq!(exp(f32::NEG_INFINITY, fma), 0.0);
            assert!(exp(f32::NAN, fma).is_nan());
        }
    }
}
