"""The polynomial of `kiln_nn::kernels::exp`: e^r on [-ln2/2, ln2/2] as 1 + c1 r + ... + c6 r^6,
fitted for the smallest largest relative error (Lawson's iteratively reweighted least squares,
the constant term fixed at 1 so that exp(0) is 1), then the kernel's f32 steps emulated with
each fused multiply-add rounded once, over [-87, 0], to give the error in f32 epsilons.

    cargo xtask py bench/exp_fit.py [DEGREE]
"""

import sys

import numpy as np

deg = int(sys.argv[1]) if len(sys.argv) > 1 else 6
half = np.log(2) / 2
x = np.cos(np.linspace(0, np.pi, 20001)) * half * 1.0005
w = np.ones_like(x)
target = np.exp(x) - 1
A = np.stack([x**k for k in range(1, deg + 1)], 1)
for _ in range(200):
    W = np.sqrt(w) / np.exp(x)
    c, *_ = np.linalg.lstsq(A * W[:, None], target * W, rcond=None)
    err = (A @ c - target) / np.exp(x)
    w = w * np.abs(err)
    w /= w.sum()
print(f"degree {deg}: largest relative error {np.abs(err).max():.3e} (exact coefficients)")
c32 = c.astype(np.float32)
print("coefficients c1..c6 as f32:", ", ".join(repr(float(v)) for v in c32))

f32 = np.float32


def fma(a, b, c):
    # f32 products are exact in f64, so this rounds (almost always) once, as an FMA does
    a, b, c = np.broadcast_arrays(a, b, c)
    return (a.astype(np.float64) * b.astype(np.float64) + c.astype(np.float64)).astype(np.float32)


LOG2E, ROUND = f32(np.log2(np.e)), f32(12582912.0)
LN2_HI, LN2_LO = f32(0.693359375), f32(-2.12194440e-4)
xs = -np.linspace(0, 87, 2_000_001).astype(np.float32)
t = fma(xs, LOG2E, ROUND)
n = (t - ROUND).astype(np.float32)
r = fma(-n, LN2_LO, fma(-n, LN2_HI, xs))
p = np.full_like(xs, c32[-1])
for k in range(deg - 2, -1, -1):
    p = fma(p, r, c32[k])
p = fma(p, r, f32(1.0))
e = (p.view(np.int32) + (n.astype(np.int32) << 23)).view(np.float32)
exact = np.exp(xs.astype(np.float64))
rel = np.abs(e.astype(np.float64) - exact) / exact
print(f"f32 with FMAs over [-87, 0]: largest relative error {rel.max():.3e}, "
      f"{rel.max() / np.finfo(np.float32).eps:.2f} epsilon")
