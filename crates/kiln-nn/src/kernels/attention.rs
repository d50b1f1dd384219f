//! Kiln's attention kernels: `softmax(Q K^T / sqrt(d)) V` in f32 on the host.
//!
//! burn-flex's flash attention tiles the keys 64 at a time over all the queries of a head,
//! rescales the whole output after every tile, and computes its softmax one scalar `exp` at a
//! time; at the UNet's shapes (4096 queries and keys, heads of 40) it runs at about 50 GFLOP/s
//! against PyTorch's 128. Kiln has two kernels, the first the CPU runs:
//!
//! - [`fused`] (x86-64 with AVX2+FMA or AVX-512): each head's keys and values packed once, then
//!   groups of its query rows against chunks of up to a few hundred keys with flash attention's
//!   online softmax, the scores, exponentials and output accumulators in registers, L1 and L2
//!   (the microkernels hold the scores transposed, a vector lane per query row).
//! - [`gemm_attention`] (other CPUs, aarch64's NEON among them): blocks of queries with their
//!   scores against up to [`MAX_CHUNK`] keys at a time (`SCORE_BUDGET` elements at most),
//!   both products through the `gemm` crate (as flex's do), the exponentials a vector loop
//!   compiled for AVX-512, AVX2+FMA and NEON and chosen at run time (`multiversion`); where
//!   the keys fit in one chunk the softmax is exact in two passes, longer sequences go chunk by
//!   chunk with the online softmax.
//!
//! Tasks run in parallel on rayon; a row's arithmetic does not depend on how the work is split,
//! so the result is the same for any thread count (and, for the fused kernel, with AVX2 or
//! AVX-512). The operands may hold their heads first (`[batch, heads, tokens, d]`,
//! [`attention`]) or side by side in each token's row (`[batch, tokens, heads * d]`, as the
//! projections make them: [`attention_tokens`]); both kernels take either as strides.

use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use super::exp;
use super::host::HostF32;

/// Score elements one task holds (`rows x keys`): 1 Mi f32, 4 MB (256 query rows at 4096 keys).
/// Measured on a 2-core Xeon with AVX-512 (2026-12-02) for the SD 1.5 UNet's self-attention at
/// 512 px (`cargo bench --workspace --bench attention`): 2^16 0.80 s, 2^18 0.72 s, 2^19 0.68 s,
/// 2^20 0.62 s, 2^21 0.91 s (burn's op: 1.60 s).
const SCORE_BUDGET: usize = 1 << 20;

/// Keys one score block spans at most (rows against more keys go chunk by chunk): 256 query
/// rows of [`SCORE_BUDGET`]. Before, a block held its rows' scores against every key, so at
/// 16384 keys (the UNet's self-attention at 1024 px) it had 64 rows and the keys, repacked
/// for every block, were reused 4 times less than at 4096.
const MAX_CHUNK: usize = SCORE_BUDGET / 256;

/// Below this many keys burn's op keeps the attention (its naive path has no copies to make).
/// The UNet's cross-attention to 77 tokens (`2x8x4096x77x40`, f32) took 17.1 ms through
/// burn's op and 12.4 ms here (PyTorch: 10.4 ms), on the 2-core Xeon of 2026-12-06 with
/// `cargo run --release -p kiln-nn --example bf16_timings attention`; it was 256 when this
/// kernel's products went through gemm without its AVX-512 kernels.
pub const MIN_KEYS: usize = 64;

/// `softmax(Q K^T / sqrt(d)) V` of f32 tensors on the host, or `None` for other dtypes and for
/// fewer than [`MIN_KEYS`] keys (the caller then uses burn's op).
///
/// # Shapes
/// - `q`: `[batch, heads, queries, d]`, `k`: `[batch, heads, keys, d]`,
///   `v`: `[batch, heads, keys, dv]`
/// - output: `[batch, heads, queries, dv]`
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Option<Tensor<4>> {
    let dtype = q.dtype();
    if [k.dtype(), v.dtype()] != [dtype; 2] {
        return None;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    if dtype == DType::BF16 && super::native_bf16() && super::host::reduced_precision(&q).is_some()
    {
        return amx_attention(q, k, v);
    }
    if k.dims()[2] < MIN_KEYS {
        return None;
    }
    let [b, h, n, d] = q.dims();
    let [_, _, m, dv] = v.dims();
    in_f32(q, k, v, |q, k, v| {
        host_attention(q, k, v, Layout::HeadsFirst, [b, h, n, m, d, dv])
    })
}

/// [`attention`] on operands in the layout the projections make them, heads side by side in
/// each token's row, so that nothing is transposed: `None` where [`attention`] would be, and
/// for bf16 where it would run the bf16 products (the caller then splits the heads and calls
/// it). This saves the copies of q, k and v into heads-first order and of the output back:
/// four passes over `[batch, tokens, heads * d]` per call.
///
/// # Shapes
/// - `q`: `[batch, queries, heads * d]`, `k`: `[batch, keys, heads * d]`,
///   `v`: `[batch, keys, heads * dv]`
/// - output: `[batch, queries, heads * dv]`
pub fn attention_tokens(
    q: Tensor<3>,
    k: Tensor<3>,
    v: Tensor<3>,
    heads: usize,
) -> Option<Tensor<3>> {
    let dtype = q.dtype();
    let ([b, n, qw], [kb, m, kw], [vb, vm, vw]) = (q.dims(), k.dims(), v.dims());
    if [k.dtype(), v.dtype()] != [dtype; 2]
        || heads == 0
        || [kb, vb, vm] != [b, b, m]
        || qw != kw
        || qw % heads != 0
        || vw % heads != 0
        || m < MIN_KEYS
    {
        return None;
    }
    #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
    if dtype == DType::BF16 && super::native_bf16() {
        return None;
    }
    let (d, dv) = (qw / heads, vw / heads);
    in_f32(q, k, v, |q, k, v| {
        host_attention(q, k, v, Layout::TokensFirst, [b, heads, n, m, d, dv])
    })
}

/// `f` on f32 flex tensors: the operands themselves, or (bf16, f16) widened and the result
/// rounded back; `None` for other dtypes and devices.
fn in_f32<const D: usize>(
    q: Tensor<D>,
    k: Tensor<D>,
    v: Tensor<D>,
    f: impl FnOnce(Tensor<D>, Tensor<D>, Tensor<D>) -> Option<Tensor<D>>,
) -> Option<Tensor<D>> {
    match super::host::reduced_precision(&q) {
        Some(dtype) => {
            let wide = |t: Tensor<D>| super::host::widen(&t);
            f(wide(q), wide(k), wide(v)).map(|o| super::host::narrow(o, dtype))
        }
        None if q.dtype() == DType::F32 => f(q, k, v),
        None => None,
    }
}

/// Where the rows of each (batch, head) pair lie in an attention operand.
#[derive(Clone, Copy)]
enum Layout {
    /// `[batch, heads, tokens, width]`: a head's rows are contiguous.
    HeadsFirst,
    /// `[batch, tokens, heads * width]`: a head's rows are `heads * width` apart.
    TokensFirst,
}

impl Layout {
    /// The offset of row 0 of head `head` of image `image` and the distance between rows, in
    /// an operand of `tokens` rows of `width` per head.
    fn rows(self, [image, head]: [usize; 2], [heads, tokens, width]: [usize; 3]) -> (usize, usize) {
        match self {
            Layout::HeadsFirst => ((image * heads + head) * tokens * width, width),
            Layout::TokensFirst => (image * tokens * heads * width + head * width, heads * width),
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod fused;

/// f32 values of the packed keys and values the fused kernel holds at once (a pass packs as
/// many heads as fit, at least one): 16 MiB.
#[cfg(target_arch = "x86_64")]
const PACKED_FLOATS: usize = 1 << 22;

#[cfg(target_arch = "x86_64")]
std::thread_local! {
    /// Each thread's buffers of the fused kernel, kept between calls.
    static FUSED: std::cell::Cell<fused::Scratch> = std::cell::Cell::default();
}

std::thread_local! {
    /// Each thread's scores and their rows' maxima and sums, kept between calls so that they are
    /// not allocated and faulted in again for every block of queries.
    static SCORES: std::cell::Cell<[Vec<f32>; 2]> = const {
        std::cell::Cell::new([Vec::new(), Vec::new()])
    };
}

/// The attention kernels: the fused one where the CPU has its instructions, else blocks of
/// queries through the `gemm` crate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    /// [`fused`] (x86-64 with AVX2+FMA or AVX-512).
    #[cfg(target_arch = "x86_64")]
    Fused(fused::Isa),
    /// [`gemm_attention`]: other CPUs (aarch64's NEON through gemm's kernels).
    Gemm,
}

impl Kernel {
    /// The fastest this CPU runs, or gemm's blocks where `KILN_ATTENTION=gemm` (to compare
    /// the two: docs/performance.md).
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(isa) = fused::available()
            && std::env::var_os("KILN_ATTENTION").is_none_or(|v| v != "gemm")
        {
            return Kernel::Fused(isa);
        }
        Kernel::Gemm
    }
}

/// [`attention`] and [`attention_tokens`] without the choice of when to use them: f32 flex
/// operands in `layout`, the output in the same layout, through the best kernel this CPU runs.
fn host_attention<const D: usize>(
    q: Tensor<D>,
    k: Tensor<D>,
    v: Tensor<D>,
    layout: Layout,
    sizes: [usize; 6],
) -> Option<Tensor<D>> {
    host_attention_with(Kernel::best(), q, k, v, layout, sizes)
}

/// [`host_attention`] through `kernel`.
fn host_attention_with<const D: usize>(
    kernel: Kernel,
    q: Tensor<D>,
    k: Tensor<D>,
    v: Tensor<D>,
    layout: Layout,
    [b, h, n, m, d, dv]: [usize; 6],
) -> Option<Tensor<D>> {
    let device = q.device();
    let mut out_shape = q.dims();
    out_shape[D - 1] = match layout {
        Layout::HeadsFirst => dv,
        Layout::TokensFirst => h * dv,
    };
    if b * h * n * dv == 0 {
        return Some(Tensor::zeros(out_shape, &device));
    }
    // read in place (a copy only for strided views)
    let (q, k, v) = (HostF32::new(q)?, HostF32::new(k)?, HostF32::new(v)?);
    let (q, k, v) = (q.as_slice(), k.as_slice(), v.as_slice());
    assert_eq!(q.len(), b * h * n * d);
    assert_eq!(k.len(), b * h * m * d);
    assert_eq!(v.len(), b * h * m * dv);
    let mut out = Vec::<f32>::with_capacity(b * h * n * dv);
    let operands = Heads {
        q,
        k,
        v,
        layout,
        sizes: [b, h, n, m, d, dv],
    };
    let out_ptr = super::host::SharedMut(out.as_mut_ptr());
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Fused(isa) => fused_attention(operands, isa, out_ptr),
        Kernel::Gemm => gemm_attention(operands, out_ptr),
    }
    // SAFETY: the kernels write every row of every (image, head) pair: all of it.
    unsafe { out.set_len(b * h * n * dv) };
    Some(Tensor::from_data(TensorData::new(out, out_shape), &device))
}

/// The operands of every (image, head) pair, in `layout`: `[b, h, n, m, d, dv]` are the
/// images, heads, queries, keys, and the widths of a head's queries and keys and of its values.
#[derive(Clone, Copy)]
struct Heads<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    layout: Layout,
    sizes: [usize; 6],
}

impl<'a> Heads<'a> {
    /// Query rows `q0..q0 + r` of (image, head) `pair` and the distance between them.
    fn queries(&self, pair: [usize; 2], q0: usize, r: usize) -> (&'a [f32], usize) {
        let [_, h, n, _, d, _] = self.sizes;
        let (at, stride) = self.layout.rows(pair, [h, n, d]);
        let at = at + q0 * stride;
        (&self.q[at..at + (r - 1) * stride + d], stride)
    }

    /// The keys of `pair` and the distance between their rows.
    fn keys(&self, pair: [usize; 2]) -> (&'a [f32], usize) {
        let [_, h, _, m, d, _] = self.sizes;
        let (at, stride) = self.layout.rows(pair, [h, m, d]);
        (&self.k[at..at + (m - 1) * stride + d], stride)
    }

    /// The values of `pair` and the distance between their rows.
    fn values(&self, pair: [usize; 2]) -> (&'a [f32], usize) {
        let [_, h, _, m, _, dv] = self.sizes;
        let (at, stride) = self.layout.rows(pair, [h, m, dv]);
        (&self.v[at..at + (m - 1) * stride + dv], stride)
    }

    /// Where row 0 of `pair`'s output lies in the output, and the distance between its rows.
    fn output(&self, pair: [usize; 2]) -> (usize, usize) {
        let [_, h, n, _, _, dv] = self.sizes;
        self.layout.rows(pair, [h, n, dv])
    }
}

/// [`fused`] over every head, a group of heads at a time: their keys and values packed (in
/// parallel), then their groups of query rows in parallel, each written to `out` (`b * h * n *
/// dv` values in the operands' layout).
#[cfg(target_arch = "x86_64")]
fn fused_attention(ops: Heads, isa: fused::Isa, out: super::host::SharedMut<f32>) {
    let [b, h, n, m, d, dv] = ops.sizes;
    let scale = (d as f32).sqrt().recip();
    let chunk = fused::chunk(d, dv);
    // rows per task: as many as fit the task's state in L2, as few as give each thread several
    // tasks per head
    let spread = n
        .div_ceil(4 * rayon::current_num_threads())
        .next_multiple_of(48);
    let rows = fused::task_rows(d, dv).min(spread).min(n);
    let groups = n.div_ceil(rows);
    // heads packed at once: as many as fit in PACKED_FLOATS, at least one
    let packed_len = fused::packed_len(isa, [m, d, dv]);
    let heads = (PACKED_FLOATS / packed_len.max(1)).clamp(1, b * h);
    // not zeroed: `pack` writes every value of its heads before a task reads them
    let mut packed = Vec::<f32>::with_capacity(heads * packed_len);
    for first in (0..b * h).step_by(heads) {
        let pairs = heads.min(b * h - first);
        let pair = |i: usize| [(first + i) / h, (first + i) % h];
        packed.spare_capacity_mut()[..pairs * packed_len]
            .par_chunks_mut(packed_len.max(1))
            .enumerate()
            .for_each(|(i, out)| {
                let (k, v) = (ops.keys(pair(i)), ops.values(pair(i)));
                fused::pack(isa, k, v, [m, d, dv], out);
            });
        // SAFETY: `pack` wrote all `pairs * packed_len` values just above
        let packed = unsafe { std::slice::from_raw_parts(packed.as_ptr(), pairs * packed_len) };
        (0..pairs * groups).into_par_iter().for_each(|task| {
            let (i, group) = (task / groups, task % groups);
            let q0 = group * rows;
            let r = rows.min(n - q0);
            let (o_at, o_stride) = ops.output(pair(i));
            let head = &packed[i * packed_len..(i + 1) * packed_len];
            super::host::with_buffer(&FUSED, |scratch| {
                let operands = fused::Operands {
                    q: ops.queries(pair(i), q0, r),
                    k: ops.keys(pair(i)),
                    v: ops.values(pair(i)),
                    packed: fused::Packed::split(isa, head, [m, d]),
                    sizes: [r, d, m, dv],
                };
                fused::rows(operands, isa, scale, chunk, scratch);
                for (i, row) in scratch[4][..r * dv].chunks_exact(dv).enumerate() {
                    // SAFETY: row q0 + i of this (image, head) pair's output, `dv` wide: inside
                    // the `b * h * n * dv` values, and this task's alone.
                    unsafe {
                        let o = out.get().add(o_at + (q0 + i) * o_stride);
                        std::ptr::copy_nonoverlapping(row.as_ptr(), o, dv);
                    }
                }
            });
        });
    }
}

/// Blocks of one head's queries with their scores against up to [`MAX_CHUNK`] keys at a
/// time, both products through the `gemm` crate, written to `out` as [`fused_attention`].
fn gemm_attention(ops: Heads, out_ptr: super::host::SharedMut<f32>) {
    let [b, h, n, m, d, dv] = ops.sizes;
    let scale = (d as f32).sqrt().recip();
    let chunk = key_chunk(m);
    let rows = (SCORE_BUDGET / chunk).clamp(4, 1024).min(n);
    let blocks = n.div_ceil(rows);
    (0..b * h * blocks).into_par_iter().for_each(|task| {
        let (pair, block) = (task / blocks, task % blocks);
        let pair = [pair / h, pair % h];
        let q0 = block * rows;
        let r = rows.min(n - q0);
        let (o_at, o_stride) = ops.output(pair);
        super::host::with_buffer(&SCORES, |[scores, stats]| {
            super::host::grow(scores, r * chunk);
            super::host::grow(stats, 2 * r);
            let operands = Operands {
                q: ops.queries(pair, q0, r),
                k: ops.keys(pair),
                v: ops.values(pair),
                // SAFETY: rows q0..q0 + r of this (image, head) pair's output, `dv` wide and
                // `o_stride` apart: inside the `b * h * n * dv` capacity, and this task's alone
                // (the tasks' rows and heads do not overlap).
                o: (unsafe { out_ptr.get().add(o_at + q0 * o_stride) }, o_stride),
            };
            // SAFETY: as above.
            unsafe {
                attention_block(
                    operands,
                    &mut scores[..r * chunk],
                    &mut stats[..2 * r],
                    [d, m, dv],
                    scale,
                )
            };
        });
    });
}

/// One block's operands: `q` (`r` rows of `d`), `k` (`m` rows of `d`), `v` (`m` rows of `dv`)
/// and the output `o` (`r` rows of `dv`), each with its distance between rows.
struct Operands<'a> {
    q: (&'a [f32], usize),
    k: (&'a [f32], usize),
    v: (&'a [f32], usize),
    o: (*mut f32, usize),
}

/// Keys per score chunk for `m` keys: all of them up to [`MAX_CHUNK`], else equal chunks of at
/// most [`MAX_CHUNK`] (a multiple of 16, as gemm's microkernels' widths divide).
fn key_chunk(m: usize) -> usize {
    if m <= MAX_CHUNK {
        return m.max(1);
    }
    m.div_ceil(m.div_ceil(MAX_CHUNK)).next_multiple_of(16)
}

/// One block of `r` query rows of one head: `o = softmax(scale q k^T) v`, over the keys in
/// chunks of `scores.len() / r`.
///
/// With one chunk (all the keys) the scores' exponentials are taken against each row's maximum
/// and the product with `v` divided by their sum. With more, each chunk's exponentials are taken
/// against the row's maximum so far, and where a chunk raises it the output and the sum so far
/// are scaled by `exp(old - new)` first (flash attention's online softmax).
///
/// # Safety
/// `o` points to `r` writable rows of `dv` f32s, its stride apart, that nothing else reads or
/// writes during the call.
unsafe fn attention_block(
    Operands { q, k, v, o }: Operands,
    scores: &mut [f32],
    stats: &mut [f32],
    [d, m, dv]: [usize; 3],
    scale: f32,
) {
    let r = stats.len() / 2;
    let chunk = scores.len() / r;
    let ((q, q_stride), (k, k_stride), (v, v_stride), (o, o_stride)) = (q, k, v, o);
    assert_eq!(q.len(), (r - 1) * q_stride + d);
    assert_eq!(k.len(), (m - 1) * k_stride + d);
    assert_eq!(v.len(), (m - 1) * v_stride + dv);
    assert_eq!(scores.len(), r * chunk);
    let (max, sum) = stats.split_at_mut(r);
    // row i of `o` times `factor`
    let scale_row = |i: usize, factor: f32| {
        // SAFETY: row i < r of `o`, the caller's alone; written by the first chunk's product
        // before any call.
        let row = unsafe { std::slice::from_raw_parts_mut(o.add(i * o_stride), dv) };
        for x in row {
            *x *= factor;
        }
    };
    for k0 in (0..m).step_by(chunk) {
        let w = chunk.min(m - k0);
        let scores = &mut scores[..r * w];
        // SAFETY: every pointer covers the matrix its sizes and strides describe (the slices'
        // lengths are checked above, `o` by the caller), `scores` and `o` are not aliased by
        // the inputs.
        unsafe {
            // scores [r, w] = scale * q [r, d] @ k[k0..k0 + w]^T (k is [m, d], rows k_stride
            // apart)
            gemm::gemm(
                r,
                w,
                d,
                scores.as_mut_ptr(),
                1,
                w as isize,
                false,
                q.as_ptr(),
                1,
                q_stride as isize,
                k[k0 * k_stride..].as_ptr(),
                k_stride as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        for (i, row) in scores.chunks_exact_mut(w).enumerate() {
            let chunk_max = row_max(row);
            if k0 == 0 {
                max[i] = chunk_max;
                sum[i] = exp_in_place(row, chunk_max);
                continue;
            }
            let new = max[i].max(chunk_max);
            if new > max[i] {
                let factor = (max[i] - new).exp();
                sum[i] *= factor;
                scale_row(i, factor);
                max[i] = new;
            }
            sum[i] += exp_in_place(row, new);
        }
        // SAFETY: as above; v's rows k0..k0 + w.
        unsafe {
            // o [r, dv] (+)= exp-scores [r, w] @ v[k0..k0 + w] [w, dv]
            super::host::gemm_rows(
                (o, o_stride),
                k0 > 0,
                (scores.as_ptr(), w),
                (v[k0 * v_stride..].as_ptr(), v_stride),
                [r, w, dv],
            )
        };
    }
    for (i, s) in sum.iter().enumerate() {
        scale_row(i, s.recip());
    }
}

/// Score elements one AMX task holds (`rows x keys`, f32): 256 Ki, 1 MiB (64 query rows at
/// 4096 keys), beside their bf16 copy.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
const AMX_SCORE_BUDGET: usize = 1 << 18;

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
std::thread_local! {
    /// Each thread's packed keys and values of one head, kept between calls so that they are
    /// not faulted in again (taken out while in use: a nested head on the same thread gets
    /// fresh ones).
    static HEAD_KV: std::cell::Cell<(super::amx::Aligned, super::amx::Aligned)> =
        std::cell::Cell::default();
}

/// [`attention`] in bf16 on AMX tiles, as PyTorch's CPU flash attention computes it in bf16:
/// `Q K^T` from the bf16 operands accumulated in f32, scaled and the softmax's exponentials
/// taken in f32, rounded to bf16 for their product with `V` (accumulated in f32), divided by
/// the row's sum and rounded to bf16. Each head's keys and values are packed once into the
/// tiles' layout; its query blocks run in parallel, each with its full score rows.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn amx_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Option<Tensor<4>> {
    use super::amx;
    use super::host::{self, Host};
    use half::bf16;
    let [b, h, n, d] = q.dims();
    let [_, _, m, dv] = v.dims();
    if k.dims() != [b, h, m, d] || v.dims()[..2] != [b, h] {
        return None;
    }
    let out_shape = [b, h, n, dv];
    if b * h * n * dv == 0 || m == 0 {
        return None;
    }
    let (q, k, v) = (
        Host::<bf16>::new(q)?,
        Host::<bf16>::new(k)?,
        Host::<bf16>::new(v)?,
    );
    let (q, k, v) = (q.as_slice(), k.as_slice(), v.as_slice());
    let mut out = bytemuck::zeroed_vec::<bf16>(b * h * n * dv);
    let scale = (d as f32).sqrt().recip();
    let rows = (AMX_SCORE_BUDGET / m)
        .clamp(amx::MR, 1024)
        .min(n.next_multiple_of(amx::MR));
    out.par_chunks_mut(n * dv)
        .enumerate()
        .for_each(|(head, out_head)| {
            let qh = &q[head * n * d..(head + 1) * n * d];
            let kh = &k[head * m * d..(head + 1) * m * d];
            let vh = &v[head * m * dv..(head + 1) * m * dv];
            let (mut kbuf, mut vbuf) = HEAD_KV.take();
            // K^T: element (j, key) at kh[key * d + j]
            let kt = amx::pack_b(kh, 1, d, d, m, &mut kbuf);
            let vp = amx::pack_b(vh, dv, 1, m, dv, &mut vbuf);
            out_head
                .par_chunks_mut(rows * dv)
                .enumerate()
                .for_each_init(
                    || {
                        (
                            amx::Aligned::default(),
                            amx::Aligned::default(),
                            vec![0f32; rows * m],
                            vec![0f32; rows * dv],
                        )
                    },
                    |(abuf, pbuf, scores, o32), (block, o)| {
                        let r = o.len() / dv;
                        let q0 = block * rows;
                        let qa = amx::pack_a(&qh[q0 * d..(q0 + r) * d], d, r, d, abuf);
                        let _tiles = amx::Tiles::new();
                        let scores = &mut scores[..r * m];
                        let epilogue = amx::Epilogue {
                            out: scores.as_mut_ptr(),
                            stride: m,
                            rows: r,
                            cols: m,
                            init: amx::Init::Zero,
                        };
                        // SAFETY: `qa` holds r rows, `kt` m columns, both of d; the
                        // epilogue's view is `scores` ([r, m]).
                        unsafe { amx::multiply(&qa, &kt, &epilogue, amx::Order::RowsOuter) };
                        // the exponentials, rounded to bf16 straight into the tiles' layout
                        let kbs = amx::k_blocks(m);
                        let len = amx::packed_a_len(r, m);
                        let packed = pbuf.grow(len);
                        let mut inverse = [0f32; 1024];
                        for (i, (row, inv)) in
                            scores.chunks_exact(m).zip(inverse.iter_mut()).enumerate()
                        {
                            let max = row_max(row);
                            let base = amx::a_offset(kbs, i, 0);
                            *inv = exp_packed(row, max, scale, &mut packed[base..], kbs).recip();
                        }
                        for i in r..r.next_multiple_of(amx::MR) {
                            for kb in 0..kbs {
                                let at = amx::a_offset(kbs, i, kb);
                                packed[at..at + amx::TK].fill(0);
                            }
                        }
                        let pa = amx::Lhs::packed(packed, r, m);
                        let o32 = &mut o32[..r * dv];
                        let epilogue = amx::Epilogue {
                            out: o32.as_mut_ptr(),
                            stride: dv,
                            rows: r,
                            cols: dv,
                            init: amx::Init::Zero,
                        };
                        // SAFETY: `pa` holds r rows of m, `vp` dv columns of m; the view is
                        // `o32` ([r, dv]).
                        unsafe { amx::multiply(&pa, &vp, &epilogue, amx::Order::RowsOuter) };
                        for ((o, w), inv) in o
                            .chunks_exact_mut(dv)
                            .zip(o32.chunks_exact(dv))
                            .zip(&inverse[..r])
                        {
                            for (o, w) in o.iter_mut().zip(w) {
                                *o = bf16::from_f32(w * inv);
                            }
                        }
                    },
                );
            HEAD_KV.set((kbuf, vbuf));
        });
    Some(host::tensor(out, out_shape))
}

vectorised! {
    /// `max(row)`, or 0 for an empty or all `-inf` row.
    fn row_max(row: &[f32]) -> f32 {
        let mut max = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (m, &x) in max.iter_mut().zip(chunk) {
                *m = if x > *m { x } else { *m };
            }
        }
        let mut max = max.into_iter().fold(f32::NEG_INFINITY, f32::max);
        for &x in chunks.remainder() {
            max = max.max(x);
        }
        if max == f32::NEG_INFINITY { 0.0 } else { max }
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
vectorised! {
    /// `exp(scale (row - max))` rounded to bf16 into one row of a packed left operand (`dst`
    /// from the row's first block: block `kb` at `kb * 1024`, 32 elements each, the last one's
    /// tail zeroed), returning the sum of the exponentials in f32 (before rounding, as
    /// PyTorch's flash attention sums them).
    fn exp_packed(row: &[f32], max: f32, scale: f32, dst: &mut [u16], kbs: usize) -> f32 {
        let mut sum = [0f32; 32];
        let full = row.len() / 32;
        for kb in 0..full {
            let chunk: &[f32; 32] = row[kb * 32..kb * 32 + 32].try_into().unwrap();
            let out: &mut [u16; 32] = (&mut dst[kb * 1024..kb * 1024 + 32]).try_into().unwrap();
            for j in 0..32 {
                let e = exp((chunk[j] - max) * scale, has_fma!());
                sum[j] += e;
                out[j] = super::host::bf16_bits(e);
            }
        }
        let mut total: f32 = sum.iter().sum();
        if full < kbs {
            let chunk = &row[full * 32..];
            let out = &mut dst[full * 1024..full * 1024 + 32];
            for (o, &x) in out.iter_mut().zip(chunk) {
                let e = exp((x - max) * scale, has_fma!());
                total += e;
                *o = super::host::bf16_bits(e);
            }
            out[chunk.len()..].fill(0);
        }
        total
    }
}

/// Lanes of the vector loops' accumulators: one AVX-512 register of f32 (two AVX2 ones).
const LANES: usize = 16;

vectorised! {
    /// Replaces `row` by `exp(row - max)` and returns its sum (the softmax's denominator, or
    /// its share of it); `max` at least the row's largest element.
    fn exp_in_place(row: &mut [f32], max: f32) -> f32 {
        let mut sum = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (s, x) in sum.iter_mut().zip(chunk.iter_mut()) {
                let e = exp(*x - max, has_fma!());
                *x = e;
                *s += e;
            }
        }
        let mut total: f32 = sum.iter().sum();
        for x in chunks.into_remainder() {
            let e = exp(*x - max, has_fma!());
            *x = e;
            total += e;
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::seeded_normal;
    use burn::tensor::Device;
    use burn::tensor::module::attention as burn_attention;
    use burn::tensor::ops::AttentionModuleOptions;

    /// Every kernel this CPU runs: the fused one with each instruction set it has, and gemm's.
    fn kernels() -> Vec<Kernel> {
        let mut kernels = vec![Kernel::Gemm];
        #[cfg(target_arch = "x86_64")]
        for isa in [fused::Isa::Avx2, fused::Isa::Avx512] {
            if isa.runs_here() {
                kernels.push(Kernel::Fused(isa));
            }
        }
        kernels
    }

    /// Against burn's fused attention (the op it replaces) on flex, within 1e-5 relative, at
    /// shapes that exercise partial blocks and tiles (of rows, keys and value columns), cross-
    /// attention lengths, a single wide head (the VAE's, its queries a slice at a time) and `dv
    /// != d`, through every kernel this CPU runs.
    #[test]
    fn matches_burns_attention() {
        let device = Device::flex();
        for [b, h, n, m, d, dv] in [
            [2, 3, 37, 37, 8, 8],
            [1, 2, 300, 77, 40, 40],
            [2, 1, 257, 257, 64, 32],
            [1, 1, 1000, 1000, 512, 512],
            [1, 4, 5, 3000, 16, 16],
            [1, 2, 70, 200, 130, 13],
        ] {
            let q = seeded_normal([b, h, n, d], 1, &device) * 2.0;
            let k = seeded_normal([b, h, m, d], 2, &device);
            let v = seeded_normal([b, h, m, dv], 3, &device);
            let sizes = [b, h, n, m, d, dv];
            let options = AttentionModuleOptions::default();
            let reference = burn_attention(q.clone(), k.clone(), v.clone(), None, None, options);
            // the same heads side by side in each token's row: the same result, in that layout
            let tokens = |t: Tensor<4>| {
                let [b, h, n, w] = t.dims();
                t.swap_dims(1, 2).reshape([b, n, h * w])
            };
            let side_by_side = (tokens(q.clone()), tokens(k.clone()), tokens(v.clone()));
            let reference_tokens = tokens(reference.clone());
            for kernel in kernels() {
                let (q, k, v) = (q.clone(), k.clone(), v.clone());
                let ours = host_attention_with(kernel, q, k, v, Layout::HeadsFirst, sizes).unwrap();
                let error = crate::reference::max_relative_error(&ours, &reference);
                assert!(error < 1e-5, "{kernel:?} {sizes:?}: {error:e}");
                let (q, k, v) = side_by_side.clone();
                let ours =
                    host_attention_with(kernel, q, k, v, Layout::TokensFirst, sizes).unwrap();
                let error = crate::reference::max_relative_error(&ours, &reference_tokens);
                assert!(error < 1e-5, "{kernel:?} tokens {sizes:?}: {error:e}");
            }
        }
    }

    /// The fused kernel sums in the same order with either vector width: AVX2's result is
    /// AVX-512's, bit for bit (where the CPU runs both).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn fused_kernels_agree_bitwise() {
        if !fused::Isa::Avx512.runs_here() {
            return;
        }
        let device = Device::flex();
        for [b, h, n, m, d, dv] in [[2, 3, 100, 1000, 40, 40], [1, 1, 50, 300, 200, 77]] {
            let q = seeded_normal([b, h, n, d], 4, &device) * 2.0;
            let k = seeded_normal([b, h, m, d], 5, &device);
            let v = seeded_normal([b, h, m, dv], 6, &device);
            let run = |isa| {
                let (q, k, v) = (q.clone(), k.clone(), v.clone());
                let sizes = [b, h, n, m, d, dv];
                let out =
                    host_attention_with(Kernel::Fused(isa), q, k, v, Layout::HeadsFirst, sizes);
                out.unwrap().into_data().try_into_vec::<f32>().unwrap()
            };
            let (wide, narrow) = (run(fused::Isa::Avx512), run(fused::Isa::Avx2));
            let differ = wide
                .iter()
                .zip(&narrow)
                .filter(|(a, b)| a.to_bits() != b.to_bits());
            assert_eq!(differ.count(), 0, "{:?}", [b, h, n, m, d, dv]);
        }
    }

    /// Keys beyond one chunk go through the online softmax: against burn's op where every later
    /// chunk raises the rows' maxima (keys growing along the sequence, so the output and sums
    /// are rescaled at each chunk), where none does (shrinking), and with a short last chunk.
    #[test]
    fn long_sequences_go_chunk_by_chunk() {
        let device = Device::flex();
        let (b, h, n, m, d) = (1, 2, 37, 2 * MAX_CHUNK + 100, 8);
        assert!(key_chunk(m) < m);
        let ramp: Vec<f32> = (0..m).map(|i| i as f32 / m as f32).collect();
        let ramp = Tensor::<1>::from_data(TensorData::new(ramp, [m]), &device);
        for along in [ramp.clone() * 3.0 + 0.5, (-ramp + 1.0) * 3.0 + 0.5] {
            let q = seeded_normal([b, h, n, d], 7, &device);
            let k = seeded_normal([b, h, m, d], 8, &device) * along.reshape([1, 1, m, 1]);
            let v = seeded_normal([b, h, m, d], 9, &device);
            let sizes = [b, h, n, m, d, d];
            let options = AttentionModuleOptions::default();
            let reference = burn_attention(q.clone(), k.clone(), v.clone(), None, None, options);
            for kernel in kernels() {
                let (q, k, v) = (q.clone(), k.clone(), v.clone());
                let ours = host_attention_with(kernel, q, k, v, Layout::HeadsFirst, sizes).unwrap();
                let error = crate::reference::max_relative_error(&ours, &reference);
                assert!(error < 1e-5, "{kernel:?}: {error:e}");
            }
        }
    }

    #[test]
    fn key_chunks_are_equal_and_bounded() {
        for m in [
            1,
            77,
            4096,
            MAX_CHUNK,
            MAX_CHUNK + 1,
            9000,
            16384,
            65536,
            100_003,
        ] {
            let chunk = key_chunk(m);
            assert!(chunk <= MAX_CHUNK, "{m}: {chunk}");
            if m <= MAX_CHUNK {
                assert_eq!(chunk, m);
                continue;
            }
            assert_eq!(chunk % 16, 0, "{m}: {chunk}");
            // as few chunks as the bound allows, the last one short by less than a chunk
            assert_eq!(m.div_ceil(chunk), m.div_ceil(MAX_CHUNK), "{m}: {chunk}");
        }
    }

    #[test]
    fn thread_count_does_not_change_the_result() {
        let device = Device::flex();
        // one chunk of keys, and several
        for (n, m, d) in [(500, 600, 40), (50, MAX_CHUNK + 300, 8)] {
            let q = seeded_normal([1, 2, n, d], 10, &device);
            let k = seeded_normal([1, 2, m, d], 11, &device);
            let v = seeded_normal([1, 2, m, d], 12, &device);
            for kernel in kernels() {
                let run = |threads: usize| {
                    let pool = rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .build()
                        .unwrap();
                    let (q, k, v) = (q.clone(), k.clone(), v.clone());
                    let sizes = [1, 2, n, m, d, d];
                    let out = pool.install(|| {
                        host_attention_with(kernel, q, k, v, Layout::HeadsFirst, sizes).unwrap()
                    });
                    out.into_data().try_into_vec::<f32>().unwrap()
                };
                assert_eq!(run(1), run(3), "{kernel:?}");
            }
        }
    }

    #[test]
    fn other_dtypes_and_short_contexts_are_left_to_burn() {
        let device = Device::flex();
        let q = Tensor::<4>::zeros([1, 1, 4, 8], &device);
        let long = Tensor::<4>::zeros([1, 1, MIN_KEYS, 8], &device);
        assert!(attention(q.clone(), long.clone(), long.clone()).is_some());
        assert!(attention(q.clone(), q.clone(), q.clone()).is_none());
        let half = |t: &Tensor<4>| t.clone().cast(DType::F16);
        assert!(attention(half(&q), half(&long), half(&long)).is_some());
        assert!(attention(half(&q), half(&q), half(&q)).is_none());
        let double = |t: &Tensor<4>| t.clone().cast(DType::F64);
        assert!(attention(double(&q), double(&long), double(&long)).is_none());
        // the token-major entry: the same rules, and heads that must divide the widths
        let q = Tensor::<3>::zeros([1, 4, 8], &device);
        let long = Tensor::<3>::zeros([1, MIN_KEYS, 8], &device);
        assert!(attention_tokens(q.clone(), long.clone(), long.clone(), 2).is_some());
        assert!(attention_tokens(q.clone(), q.clone(), q.clone(), 2).is_none());
        assert!(attention_tokens(q.clone(), long.clone(), long.clone(), 3).is_none());
        assert!(attention_tokens(q.clone(), long.clone(), long.clone(), 0).is_none());
        let half = |t: &Tensor<3>| t.clone().cast(DType::F16);
        assert!(attention_tokens(half(&q), half(&long), half(&long), 2).is_some());
    }

    /// bf16 against the same attention in f64 of the bf16 operands. On AMX the exponentials are
    /// rounded to bf16 before their product with `V` (as PyTorch's bf16 flash attention does),
    /// each by at most half a bf16 ulp, and the result is rounded once more: the bound is a bf16
    /// ulp of the result plus one of `sum |e_j v_j| / sum e_j` (twice the worst case, for f32's
    /// own rounding). Without AMX bf16 runs widened to f32 and meets the same bound.
    #[test]
    fn bf16_matches_the_reference_and_f16_the_f32_kernel() {
        let device = Device::flex();
        for [b, h, n, m, d, dv] in [
            [2, 3, 37, 300, 8, 8],
            [1, 2, 300, 77, 40, 40],
            [1, 1, 70, 257, 64, 32],
            [2, 2, 256, 256, 40, 40],
        ] {
            let q = (seeded_normal([b, h, n, d], 13, &device) * 2.0).cast(DType::BF16);
            let k = seeded_normal([b, h, m, d], 14, &device).cast(DType::BF16);
            let v = seeded_normal([b, h, m, dv], 15, &device).cast(DType::BF16);
            let Some(ours) = attention(q.clone(), k.clone(), v.clone()) else {
                assert!(m < MIN_KEYS && !crate::kernels::native_bf16());
                continue;
            };
            assert_eq!(ours.dtype(), DType::BF16);
            let values = |t: &Tensor<4>| -> Vec<f64> {
                t.to_data()
                    .convert::<f32>()
                    .try_to_vec::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect()
            };
            let (qv, kv, vv, ov) = (values(&q), values(&k), values(&v), values(&ours));
            let scale = 1.0 / (d as f64).sqrt();
            let mut worst = 0f64;
            for head in 0..b * h {
                for i in 0..n {
                    let qi = &qv[(head * n + i) * d..(head * n + i + 1) * d];
                    let s: Vec<f64> = (0..m)
                        .map(|j| {
                            let kj = &kv[(head * m + j) * d..(head * m + j + 1) * d];
                            qi.iter().zip(kj).map(|(a, b)| a * b).sum::<f64>() * scale
                        })
                        .collect();
                    let max = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = s.iter().map(|s| (s - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for c in 0..dv {
                        let terms = e
                            .iter()
                            .enumerate()
                            .map(|(j, &e)| e * vv[(head * m + j) * dv + c]);
                        let expected = terms.clone().sum::<f64>() / sum;
                        let magnitude = terms.map(f64::abs).sum::<f64>() / sum;
                        let got = ov[(head * n + i) * dv + c];
                        let bound = (expected.abs() + magnitude) / 128.0 + 1e-6;
                        worst = worst.max((got - expected).abs() / bound);
                    }
                }
            }
            assert!(
                worst <= 1.0,
                "{:?}: {worst} of the bound",
                [b, h, n, m, d, dv]
            );
        }
    }
}
