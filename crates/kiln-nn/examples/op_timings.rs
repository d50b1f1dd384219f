//! Best-of-5 timings of burn's ops against Kiln's kernels at SD 1.5 UNet shapes, alternating in
//! one process (on a noisy machine, only figures from one run compare): linear layers,
//! GroupNorm + SiLU, GELU and GEGLU's gating. Prints one line per op.
//!
//! `cargo run --release -p kiln-nn --example op_timings`

use burn::nn::LinearConfig;
use burn::tensor::{Device, Distribution, Tensor, activation};
use kiln_nn::activation::Activation;
use kiln_nn::normalization as n;
use std::time::Instant;

/// Best of 5 runs of `f`, in milliseconds.
fn time<F: FnMut()>(mut f: F) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best * 1e3
}

fn main() {
    // as the `kiln` CLI runs
    kiln_nn::alloc::reuse_freed_memory();
    let device = Device::flex();
    let d = Distribution::Normal(0.0, 1.0);
    for (tokens, din, dout) in [
        (4096, 320, 320),
        (4096, 320, 2560),
        (4096, 1280, 320),
        (1024, 640, 5120),
    ] {
        let lin = LinearConfig::new(din, dout).init(&device);
        let x = Tensor::<3>::random([2, tokens, din], d, &device);
        let burn = time(|| {
            let _ = lin.forward(x.clone()).into_data();
        });
        let kiln = time(|| {
            let _ = kiln_nn::linear::linear(&lin, x.clone()).into_data();
        });
        let gflop = 4.0 * (tokens * din * dout) as f64 / 1e6;
        println!(
            "linear [2,{tokens},{din}]->{dout}: burn {burn:.1} ms ({:.0} GFLOP/s), kiln {kiln:.1} ms ({:.0} GFLOP/s)",
            gflop / burn,
            gflop / kiln
        );
    }
    let x = Tensor::<4>::random([2, 320, 64, 64], d, &device);
    let norm = n::group_norm(32, 320, 1e-5, &device);
    println!(
        "gn+silu [2,320,64,64]: burn {:.1} ms, kiln {:.1} ms",
        time(|| {
            let _ = activation::silu(n::reference_group_norm(&norm, x.clone())).into_data();
        }),
        time(|| {
            let _ = n::group_norm_silu(&norm, x.clone()).into_data();
        })
    );
    let g = Tensor::<3>::random([2, 4096, 2560], d, &device);
    println!(
        "gelu [2,4096,2560]: burn {:.1} ms, kiln {:.1} ms",
        time(|| {
            let _ = activation::gelu(g.clone()).into_data();
        }),
        time(|| {
            let _ = Activation::Gelu.forward(g.clone()).into_data();
        })
    );
    println!(
        "geglu [2,4096,2560]: burn {:.1} ms, kiln {:.1} ms",
        time(|| {
            let _ = (g.clone().narrow(2, 0, 1280)
                * activation::gelu(g.clone().narrow(2, 1280, 1280)))
            .into_data();
        }),
        time(|| {
            let _ = kiln_nn::activation::geglu(g.clone()).into_data();
        })
    );
    println!(
        "add [2,320,64,64]: {:.1} ms",
        time(|| {
            let _ = (x.clone() + x.clone()).into_data();
        })
    );
    println!(
        "transpose [2,4096,1280]: {:.1} ms",
        time(|| {
            let _ = g
                .clone()
                .narrow(2, 0, 1280)
                .swap_dims(1, 2)
                .reshape([2, 1280, 64, 64])
                .into_data();
        })
    );
}
