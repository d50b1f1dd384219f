//! The CPU's peak arithmetic rate, the floor that docs/performance.md measures Kiln's and
//! PyTorch's kernels against: f32 FMAs (AVX-512 where the CPU has it, else AVX2+FMA) and, where
//! the CPU has AVX512-BF16, `vdpbf16ps` (two bf16 products added into each f32 lane), each as a
//! loop of independent accumulators in registers (24; 12 for AVX2's 16 registers), on one
//! thread and then on every rayon thread at once.
//!
//! `cargo run --release -p kiln-nn --example peak_flops`
//!
//! On the 2-core Xeon of 2026-12-06 (Emerald Rapids, AMX not exposed), in four runs: f32 FMAs
//! 169-188 GFLOP/s per core on AVX-512 (321-375 on both cores), 95 on AVX2; `vdpbf16ps` 84-86:
//! there a bf16 product is faster computed in f32 from widened operands than with the bf16
//! instruction, which is what Kiln's kernels do on such a CPU.

use rayon::prelude::*;
use std::time::Instant;

/// Iterations of the 24-accumulator loop per measurement.
const ITERS: usize = 20_000_000;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// FLOPs of one iteration of each loop: 24 vector instructions.
    pub const AVX512_FMA: usize = 24 * 32;
    pub const AVX2_FMA: usize = 12 * 16;
    pub const DPBF16: usize = 24 * 64;

    /// 24 chains of `acc = acc * a + b` on 16 lanes; returns their sum (so the loop is kept).
    #[target_feature(enable = "avx512f")]
    pub fn avx512_fma(iters: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 24];
        let (a, b) = (_mm512_set1_ps(0.5), _mm512_set1_ps(1.0));
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

    /// As [`avx512_fma`] on 8 lanes, with 12 chains (AVX2 has 16 registers).
    #[target_feature(enable = "avx2,fma")]
    pub fn avx2_fma(iters: usize) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 12];
        let (a, b) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        for _ in 0..iters {
            for r in &mut acc {
                *r = _mm256_fmadd_ps(*r, a, b);
            }
        }
        let mut lanes = [0f32; 8];
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &r| _mm256_add_ps(s, r));
        // SAFETY: `lanes` holds 8 f32.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        lanes.iter().sum()
    }

    /// 24 chains of `vdpbf16ps` (32 bf16 products into 16 f32 lanes each).
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub fn dpbf16(iters: usize) -> f32 {
        let mut acc = [_mm512_setzero_ps(); 24];
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.5), _mm512_set1_ps(0.5));
        let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(1e-3), _mm512_set1_ps(1e-3));
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
}

/// GFLOP/s of `run` on one thread, then on every rayon thread at once.
fn measure(name: &str, flops_per_iter: usize, run: fn(usize) -> f32) {
    let rate = |threads: usize| {
        let start = Instant::now();
        let sums: Vec<f32> = (0..threads).into_par_iter().map(|_| run(ITERS)).collect();
        let seconds = start.elapsed().as_secs_f64();
        std::hint::black_box(sums);
        (threads * ITERS * flops_per_iter) as f64 / seconds / 1e9
    };
    let one = rate(1);
    let threads = rayon::current_num_threads();
    let all = rate(threads);
    println!("{name}: {one:.0} GFLOP/s on one thread, {all:.0} on {threads} threads");
}

fn main() {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            measure("f32 FMA, AVX-512", x86::AVX512_FMA, |n| unsafe {
                x86::avx512_fma(n)
            });
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            measure("f32 FMA, AVX2", x86::AVX2_FMA, |n| unsafe {
                x86::avx2_fma(n)
            });
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
            // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked above).
            measure("bf16 vdpbf16ps, AVX512-BF16", x86::DPBF16, |n| unsafe {
                x86::dpbf16(n)
            });
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("peak_flops measures x86-64 vector units only");
}
