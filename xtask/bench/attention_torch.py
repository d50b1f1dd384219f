"""PyTorch's side of `cargo run --release -p kiln-nn --example attention_timings`: f32
`scaled_dot_product_attention` at the same shapes, best of N, 2 threads.

    cargo xtask py bench/attention_torch.py [--runs N] [BxHxNxMxD ...]
"""

import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
args = sys.argv[1:]
runs = 3
if args[:1] == ["--runs"]:
    runs, args = int(args[1]), args[2:]
shapes = [tuple(int(x) for x in a.split("x")) for a in args] or [
    (2, 8, 4096, 4096, 40),
    (1, 8, 16384, 16384, 40),
    (1, 1, 4096, 4096, 512),
]
with torch.inference_mode():
    for b, h, n, m, d in shapes:
        q = torch.randn(b, h, n, d)
        k = torch.randn(b, h, m, d)
        v = torch.randn(b, h, m, d)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            times.append(time.perf_counter() - t)
        best = min(times)
        flops = 4.0 * b * h * n * m * d
        print(f"attention {b}x{h}x{n}x{m}x{d}: best {best:.3f} s ({flops / best / 1e9:.0f} GFLOP/s), runs "
              + " ".join(f"{t:.3f}" for t in times))
