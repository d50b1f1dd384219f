//! Best-of-5 timings of Kiln's kernels in f32 and bf16 at SD 1.5 UNet shapes (512 px, batch
//! 2), alternating in one process: the 3x3 convolutions of each level, linear layers and
//! self-attention. bf16 runs on AMX tiles where the CPU has them (`KILN_AMX=0` turns them off).
//! Prints one line per shape with each dtype's time and GFLOP/s.
//!
//! `cargo run --release -p kiln-nn --example bf16_timings [-- FILTER]` (a filter such as
//! `attention` keeps the shapes whose name contains it)

use burn::tensor::{DType, Device, Distribution, Tensor};
use kiln_nn::kernels::{Conv2dOptions, attention, conv2d, linear};
use std::time::Instant;

/// Best of 5 runs of `f`, in seconds.
fn time<F: FnMut()>(mut f: F) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn report(name: &str, flops: f64, mut run: impl FnMut(DType)) {
    // an argument keeps the shapes whose name contains it
    if std::env::args()
        .nth(1)
        .is_some_and(|filter| !name.contains(&filter))
    {
        return;
    }
    let f32_s = time(|| run(DType::F32));
    let bf16_s = time(|| run(DType::BF16));
    println!(
        "{name}: f32 {:.2} ms ({:.0} GFLOP/s), bf16 {:.2} ms ({:.0} GFLOP/s)",
        f32_s * 1e3,
        flops / f32_s / 1e9,
        bf16_s * 1e3,
        flops / bf16_s / 1e9
    );
}

fn main() {
    // as the `kiln` CLI runs
    kiln_nn::alloc::reuse_freed_memory();
    let device = Device::flex();
    let d = Distribution::Normal(0.0, 1.0);
    println!("AMX: {}", kiln_nn::kernels::amx_available());
    let same = Conv2dOptions {
        stride: [1, 1],
        padding: [[1, 1], [1, 1]],
        dilation: [1, 1],
    };
    for (c, side) in [(320usize, 64usize), (640, 32), (1280, 16), (1280, 8)] {
        let x = Tensor::<4>::random([2, c, side, side], d, &device);
        let w = Tensor::<4>::random([c, c, 3, 3], d, &device);
        let b = Tensor::<1>::random([c], d, &device);
        let casts = [DType::F32, DType::BF16]
            .map(|t| (x.clone().cast(t), w.clone().cast(t), b.clone().cast(t)));
        let flops = 2.0 * (2 * c * c * 9 * side * side) as f64;
        report(&format!("conv3x3 [2,{c},{side},{side}]"), flops, |t| {
            let (x, w, b) = &casts[usize::from(t == DType::BF16)];
            let _ = conv2d(x, w, Some(b), same).unwrap();
        });
    }
    for (tokens, din, dout) in [
        (4096usize, 320usize, 320usize),
        (4096, 320, 2560),
        (4096, 1280, 320),
        (1024, 640, 5120),
        (256, 1280, 10240),
    ] {
        let x = Tensor::<3>::random([2, tokens, din], d, &device);
        let w = Tensor::<2>::random([din, dout], d, &device);
        let b = Tensor::<1>::random([dout], d, &device);
        let casts = [DType::F32, DType::BF16]
            .map(|t| (x.clone().cast(t), w.clone().cast(t), b.clone().cast(t)));
        let flops = 4.0 * (tokens * din * dout) as f64;
        report(&format!("linear [2,{tokens},{din}]->{dout}"), flops, |t| {
            let (x, w, b) = &casts[usize::from(t == DType::BF16)];
            let _ = linear(x, w, Some(b)).unwrap();
        });
    }
    for (tokens, keys) in [(4096usize, 4096usize), (1024, 1024), (4096, 77)] {
        let q = Tensor::<4>::random([2, 8, tokens, 40], d, &device);
        let k = Tensor::<4>::random([2, 8, keys, 40], d, &device);
        let casts = [DType::F32, DType::BF16].map(|t| (q.clone().cast(t), k.clone().cast(t)));
        let flops = 4.0 * (16 * tokens * keys * 40) as f64;
        report(&format!("attention 2x8x{tokens}x{keys}x40"), flops, |t| {
            let (q, k) = &casts[usize::from(t == DType::BF16)];
            match attention(q.clone(), k.clone(), k.clone()) {
                Some(o) => drop(o),
                None => drop(kiln_nn::attention::fused_attention(
                    q.clone(),
                    k.clone(),
                    k.clone(),
                )),
            }
        });
    }
}
