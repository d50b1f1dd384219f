"""PyTorch's side of `cargo run --release -p kiln-nn --example bf16_timings`: the same ops at the
same SD 1.5 UNet shapes (512 px, batch 2), best of 5, in f32 and bf16, 2 threads.

    cargo xtask py bench/ops_torch.py [FILTER]
"""

import sys
import time

import torch
import torch.nn.functional as F

torch.set_num_threads(2)
FILTER = sys.argv[1] if len(sys.argv) > 1 else ""


def best(f):
    with torch.inference_mode():
        f()
        times = []
        for _ in range(5):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
    return min(times)


def report(name, flops, make):
    if FILTER not in name:
        return
    line = [name + ":"]
    for dt in (torch.float32, torch.bfloat16):
        s = best(make(dt))
        line.append(f"{'f32' if dt == torch.float32 else 'bf16'} {s * 1e3:.2f} ms ({flops / s / 1e9:.0f} GFLOP/s)")
    print(" ".join(line[:2]) + ", " + line[2])


for c, side in [(320, 64), (640, 32), (1280, 16), (1280, 8)]:
    def make(dt, c=c, side=side):
        conv = torch.nn.Conv2d(c, c, 3, padding=1).to(dt)
        x = torch.randn(2, c, side, side, dtype=dt)
        return lambda: conv(x)
    report(f"conv3x3 [2,{c},{side},{side}]", 2.0 * 2 * c * c * 9 * side * side, make)
for tokens, din, dout in [(4096, 320, 320), (4096, 320, 2560), (4096, 1280, 320), (1024, 640, 5120), (256, 1280, 10240)]:
    def make(dt, tokens=tokens, din=din, dout=dout):
        lin = torch.nn.Linear(din, dout).to(dt)
        x = torch.randn(2, tokens, din, dtype=dt)
        return lambda: lin(x)
    report(f"linear [2,{tokens},{din}]->{dout}", 4.0 * tokens * din * dout, make)
for tokens, keys in [(4096, 4096), (1024, 1024), (4096, 77)]:
    def make(dt, tokens=tokens, keys=keys):
        q = torch.randn(2, 8, tokens, 40, dtype=dt)
        k = torch.randn(2, 8, keys, 40, dtype=dt)
        return lambda: F.scaled_dot_product_attention(q, k, k)
    report(f"attention 2x8x{tokens}x{keys}x40", 4.0 * 16 * tokens * keys * 40, make)
