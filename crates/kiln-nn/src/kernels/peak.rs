//! Register-only loops that time the CPU's arithmetic units: the floor Kiln's kernels and
//! PyTorch's are measured against (`cargo run --release -p kiln-nn --example peak_flops`), and
//! the one-off timing that picks the bf16 engine where AVX512-BF16 has no AMX beside it. Each
//! runs chains of `acc = acc * a + b` (or its bf16 dot-product form) on independent
//! accumulators that fit in the registers, its inputs opaque to the compiler so that nothing is
//! folded away, and returns the accumulators' sum.

use std::arch::x86_64::*;

/// FLOPs of one iteration of [`fma_avx512`]: 24 FMAs on 16 lanes.
pub const FMA_AVX512: usize = 24 * 32;
/// FLOPs of one iteration of [`fma_avx2`]: 12 FMAs on 8 lanes (AVX2 has 16 registers).
pub const FMA_AVX2: usize = 12 * 16;
/// FLOPs of one iteration of [`dot_bf16`]: 24 `vdpbf16ps`, two products into each of 16 lanes.
pub const DOT_BF16: usize = 24 * 64;

/// `iters` iterations of 24 f32 FMA chains on AVX-512.
///
/// # Safety
/// The CPU must have AVX-512F.
#[target_feature(enable = "avx512f")]
pub unsafe fn fma_avx512(iters: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 24];
    let (x, y) = std::hint::black_box((0.5, 1e-3));
    let (a, b) = (_mm512_set1_ps(x), _mm512_set1_ps(y));
    for _ in 0..iters {
        for r in &mut acc {
            *r = _mm512_fmadd_ps(*r, a, b);
        }
    }
    let sum = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, &r| _mm512_add_ps(s, r));
    _mm512_reduce_add_ps(sum)
}

/// `iters` iterations of 12 f32 FMA chains on AVX2.
///
/// # Safety
/// The CPU must have AVX2 and FMA.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn fma_avx2(iters: usize) -> f32 {
    let mut acc = [_mm256_setzero_ps(); 12];
    let (x, y) = std::hint::black_box((0.5, 1e-3));
    let (a, b) = (_mm256_set1_ps(x), _mm256_set1_ps(y));
    for _ in 0..iters {
        for r in &mut acc {
            *r = _mm256_fmadd_ps(*r, a, b);
        }
    }
    let sum = acc
        .iter()
        .fold(_mm256_setzero_ps(), |s, &r| _mm256_add_ps(s, r));
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` holds 8 f32.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
    lanes.iter().sum()
}

/// `iters` iterations of 24 `vdpbf16ps` chains.
///
/// # Safety
/// The CPU must have AVX-512F and AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub unsafe fn dot_bf16(iters: usize) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 24];
    let (x, y) = std::hint::black_box((0.5, 1e-3));
    let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(x), _mm512_set1_ps(x));
    let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(y), _mm512_set1_ps(y));
    for _ in 0..iters {
        for r in &mut acc {
            *r = _mm512_dpbf16_ps(*r, a, b);
        }
    }
    let sum = acc
        .iter()
        .fold(_mm512_setzero_ps(), |s, &r| _mm512_add_ps(s, r));
    _mm512_reduce_add_ps(sum)
}
