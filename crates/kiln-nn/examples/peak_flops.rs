//! The CPU's peak arithmetic rate, the floor that docs/performance.md measures Kiln's and
//! PyTorch's kernels against: f32 FMAs (AVX-512 where the CPU has it, and AVX2+FMA) and, where
//! the CPU has AVX512-BF16, `vdpbf16ps` (two bf16 products added into each f32 lane): the
//! register-only loops of `kiln_nn::kernels::peak`, on one thread and then on every rayon
//! thread at once.
//!
//! `cargo run --release -p kiln-nn --example peak_flops`
//!
//! On the 2-core Xeon of 2026-12-06 (Emerald Rapids, AMX not exposed), in four runs: f32 FMAs
//! 169-188 GFLOP/s per core on AVX-512 (321-375 on both cores), 95 on AVX2; `vdpbf16ps` 84-86:
//! there a bf16 product is faster computed in f32 from widened operands than with the bf16
//! instruction, which is what Kiln's kernels do on such a CPU.

use rayon::prelude::*;
use std::time::Instant;

/// Iterations of a loop per measurement.
const ITERS: usize = 20_000_000;

/// GFLOP/s of `run` on one thread, then on every rayon thread at once.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
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
        use kiln_nn::kernels::peak;
        if is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked above).
            measure("f32 FMA, AVX-512", peak::FMA_AVX512, |n| unsafe {
                peak::fma_avx512(n)
            });
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked above).
            measure("f32 FMA, AVX2", peak::FMA_AVX2, |n| unsafe {
                peak::fma_avx2(n)
            });
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16") {
            // SAFETY: the CPU has AVX-512F and AVX512-BF16 (checked above).
            measure("bf16 vdpbf16ps, AVX512-BF16", peak::DOT_BF16, |n| unsafe {
                peak::dot_bf16(n)
            });
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    println!("peak_flops measures x86-64 vector units only");
}
