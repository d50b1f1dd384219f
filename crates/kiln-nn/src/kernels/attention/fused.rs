//! The fused f32 attention of x86-64 CPUs with AVX2+FMA or AVX-512: `softmax(scale Q K^T) V`
//! for groups of query rows of one head, the keys a chunk at a time with flash attention's
//! online softmax, every intermediate in L1 / L2.
//!
//! A head's keys and values are packed once into the tiles' panels ([`pack`]). The
//! microkernels hold the scores transposed, a vector lane per query row: the queries are
//! transposed into `[d][R]` blocks of `R` rows; a tile of scores is `KT` keys by `R` rows, each
//! key's element broadcast against a vector of the queries' (no horizontal sums); the
//! softmax's maxima and sums are lane-wise, in registers; the product with `V` accumulates `DT`
//! output columns of `R` rows, each element of `V` broadcast against a vector of
//! exponentials.
//!
//! Every sum runs in the same order whatever the tiles and the vector width: a score is its
//! `d` products summed in order, a chunk's exponentials and products are summed key by key and
//! then added to the running sums. So the result depends on the chunk length only (set by the
//! shapes, [`chunk`]): the AVX2 and AVX-512 kernels give the same bits, and so does any split
//! of the rows into tasks.

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// f32 values of a task's state (its queries transposed and its output accumulators, `rows x
/// (d + dv)`), at most: 512 KiB, in L2 beside a chunk of keys and values. The VAE's head of 512
/// takes 96 rows a task with it, its keys and values read once per task. With half of it (64
/// rows, in tiles of 32) its 4096 x 4096 attention took 0.23 s against 0.19 s; with 1.5 times
/// it (192 rows) 0.19-0.20 s, as with it (2-core Ice Lake, `attention_timings`).
const TASK_FLOATS: usize = 1 << 17;

/// f32 values of one chunk of keys and values (`chunk x (d + dv)`), about: 64 KiB.
const CHUNK_FLOATS: usize = 1 << 14;

/// Query rows per task, at most: a multiple of every kernel's row tile (48 and 16), the task's
/// state within [`TASK_FLOATS`], from 48 to 288.
pub(super) fn task_rows(d: usize, dv: usize) -> usize {
    (TASK_FLOATS / (d + dv)).clamp(48, 288) / 48 * 48
}

/// Keys per chunk: about [`CHUNK_FLOATS`] of keys and values, from 96 to 384, a multiple of
/// every kernel's key tile (24). It sets where the online softmax rescales, so it depends on
/// the shapes alone.
pub(super) fn chunk(d: usize, dv: usize) -> usize {
    (CHUNK_FLOATS / (d + dv)).clamp(96, 384) / 24 * 24
}

/// The vector kernels this CPU runs, or `None` without AVX2 and FMA.
pub(super) fn available() -> Option<Isa> {
    if is_x86_feature_detected!("avx512f") {
        Some(Isa::Avx512)
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Some(Isa::Avx2)
    } else {
        None
    }
}

/// An instruction set the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// 48 rows a tile (three 16-lane registers), 8 keys, 8 output columns: 24 accumulators,
    /// 11 loads for 24 FMAs. Two registers of rows (8 keys, 10 loads for 16 FMAs) ran the
    /// loops at 0.7 of the FMAs' peak on Ice Lake, whose loads (about one a cycle beside
    /// 512-bit FMAs) bound them; three or four ran them at about 0.9 (docs/performance.md).
    Avx512,
    /// 16 rows a tile (two 8-lane registers), 6 keys, 5 output columns.
    Avx2,
}

/// AVX-512's keys per score tile and output columns per value tile: the one place the packing
/// ([`pack`]), its sizes ([`packed_len`]) and the microkernels ([`rows`]) take them from.
const AVX512_TILES: [usize; 2] = [8, 8];
/// AVX2's, as [`AVX512_TILES`].
const AVX2_TILES: [usize; 2] = [6, 5];

impl Isa {
    /// Keys per score tile.
    fn key_tile(self) -> usize {
        match self {
            Isa::Avx512 => AVX512_TILES[0],
            Isa::Avx2 => AVX2_TILES[0],
        }
    }

    /// Output columns per value tile.
    fn value_tile(self) -> usize {
        match self {
            Isa::Avx512 => AVX512_TILES[1],
            Isa::Avx2 => AVX2_TILES[1],
        }
    }

    /// Whether this CPU runs it.
    pub(super) fn runs_here(self) -> bool {
        match available() {
            Some(Isa::Avx512) => true,
            Some(Isa::Avx2) => self == Isa::Avx2,
            None => false,
        }
    }
}

/// One head's keys and values packed for `isa`'s tiles: `keys` holds its whole tiles of key
/// rows, each `[d][KT]`; `values` its whole tiles of columns, each `[m][DT]`. The keys and
/// columns past the last whole tile are read from the operands in place.
pub(super) struct Packed<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
}

impl<'a> Packed<'a> {
    /// The keys' and values' parts of a head's `packed` ([`packed_len`] long).
    pub(super) fn split(isa: Isa, packed: &'a [f32], [m, d]: [usize; 2]) -> Self {
        let (keys, values) = packed.split_at(packed_keys_len(isa, [m, d]));
        Packed { keys, values }
    }
}

/// f32 values of a head's packed keys: its whole tiles of `m` keys of `d`.
fn packed_keys_len(isa: Isa, [m, d]: [usize; 2]) -> usize {
    m / isa.key_tile() * isa.key_tile() * d
}

/// f32 values [`pack`] writes for a head of `m` keys of `d` and values of `dv`.
pub(super) fn packed_len(isa: Isa, [m, d, dv]: [usize; 3]) -> usize {
    let dt = isa.value_tile();
    packed_keys_len(isa, [m, d]) + dv / dt * dt * m
}

/// Packs one head's keys (`m` rows of `d`, `k.1` apart) and values (`m` rows of `dv`, `v.1`
/// apart) into `out` ([`packed_len`] long) for `isa`'s tiles: the keys first, then the values.
/// Every value of `out` is written.
pub(super) fn pack(
    isa: Isa,
    k: (&[f32], usize),
    v: (&[f32], usize),
    sizes: [usize; 3],
    out: &mut [MaybeUninit<f32>],
) {
    let [m, d, _] = sizes;
    assert_eq!(out.len(), packed_len(isa, sizes));
    let (keys, values) = out.split_at_mut(packed_keys_len(isa, [m, d]));
    match isa {
        Isa::Avx512 => {
            pack_with::<{ AVX512_TILES[0] }, { AVX512_TILES[1] }>(k, v, sizes, keys, values)
        }
        Isa::Avx2 => pack_with::<{ AVX2_TILES[0] }, { AVX2_TILES[1] }>(k, v, sizes, keys, values),
    }
}

/// [`pack`] for key tiles of `KT` and value tiles of `DT`: each key tile's rows read side by
/// side and written element by element in order, each value tile's row a fixed-size copy.
/// `keys` and `values` are whole tiles, so every value is written.
fn pack_with<const KT: usize, const DT: usize>(
    k: (&[f32], usize),
    v: (&[f32], usize),
    [m, d, dv]: [usize; 3],
    keys: &mut [MaybeUninit<f32>],
    values: &mut [MaybeUninit<f32>],
) {
    // the callers' reads rely on every value written: whole tiles, none left over
    assert!(keys.len() == m / KT * KT * d && values.len() == dv / DT * DT * m);
    for (t, tile) in keys.chunks_exact_mut(d * KT).enumerate() {
        let rows: [&[f32]; KT] = std::array::from_fn(|j| &k.0[(t * KT + j) * k.1..][..d]);
        for (dd, out) in tile.chunks_exact_mut(KT).enumerate() {
            for (out, row) in out.iter_mut().zip(&rows) {
                out.write(row[dd]);
            }
        }
    }
    for (t, tile) in values.chunks_exact_mut(m * DT).enumerate() {
        for (key, out) in tile.chunks_exact_mut(DT).enumerate() {
            let row: &[f32; DT] = v.0[key * v.1 + t * DT..][..DT].try_into().unwrap();
            for (out, &x) in out.iter_mut().zip(row) {
                out.write(x);
            }
        }
    }
}

/// One task's operands: `rows` query rows of `d` (`q.1` apart), `m` keys of `d` and values of
/// `dv` (rows `k.1` and `v.1` apart), the head's [`Packed`] panels.
pub(super) struct Operands<'a> {
    pub q: (&'a [f32], usize),
    pub k: (&'a [f32], usize),
    pub v: (&'a [f32], usize),
    pub packed: Packed<'a>,
    pub sizes: [usize; 4],
}

/// Each thread's buffers: transposed queries, scores, output accumulators, row statistics and
/// the output rows.
pub(super) type Scratch = [Vec<f32>; 5];

/// `softmax(scale q k^T) v` for the task's rows, returned as `rows x dv` values in
/// `scratch[4]`, over the keys `chunk` at a time (a multiple of the key tile).
///
/// # Panics
/// If the operands' slices are shorter than their sizes and strides say, or `isa` is one this
/// CPU lacks ([`available`] gives the best it has).
pub(super) fn rows(ops: Operands, isa: Isa, scale: f32, chunk: usize, scratch: &mut Scratch) {
    let [rows, d, m, dv] = ops.sizes;
    assert!(rows > 0 && m > 0 && d > 0 && dv > 0);
    assert!(chunk > 0 && chunk.is_multiple_of(isa.key_tile()));
    let (q, k, v) = (ops.q, ops.k, ops.v);
    assert!(q.0.len() >= (rows - 1) * q.1 + d && q.1 >= d);
    assert!(k.0.len() >= (m - 1) * k.1 + d && k.1 >= d);
    assert!(v.0.len() >= (m - 1) * v.1 + dv && v.1 >= dv);
    assert!(ops.packed.keys.len() + ops.packed.values.len() >= packed_len(isa, [m, d, dv]));
    assert!(isa.runs_here(), "{isa:?} kernels on a CPU without them");
    // SAFETY: the CPU has the instructions, the operands their sizes (both checked above).
    unsafe {
        match isa {
            Isa::Avx512 => rows_avx512(ops, scale, chunk, scratch),
            Isa::Avx2 => rows_avx2(ops, scale, chunk, scratch),
        }
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(ops: Operands, scale: f32, chunk: usize, scratch: &mut Scratch) {
    // SAFETY: the caller's
    unsafe {
        rows_with::<Avx512, 48, 3, { AVX512_TILES[0] }, { AVX512_TILES[1] }>(
            ops, scale, chunk, scratch,
        )
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn rows_avx2(ops: Operands, scale: f32, chunk: usize, scratch: &mut Scratch) {
    // SAFETY: the caller's
    unsafe {
        rows_with::<Avx2, 16, 2, { AVX2_TILES[0] }, { AVX2_TILES[1] }>(ops, scale, chunk, scratch)
    }
}

/// [`rows`] with row tiles of `R` lanes (`NV` vectors), score tiles of `KT` keys and value
/// tiles of `DT` columns. Inlined into a function compiled for `V`'s instructions.
#[inline(always)]
unsafe fn rows_with<
    V: Vector,
    const R: usize,
    const NV: usize,
    const KT: usize,
    const DT: usize,
>(
    Operands {
        q,
        k,
        v,
        packed,
        sizes,
    }: Operands,
    scale: f32,
    chunk: usize,
    scratch: &mut Scratch,
) {
    debug_assert_eq!(R, NV * V::LANES);
    let [rows, d, m, dv] = sizes;
    let blocks = rows.div_ceil(R);
    let chunk = chunk.min(m);
    let [qt, st, ot, stats, out] = scratch;
    let qt = super::super::host::grow(qt, blocks * d * R);
    let st = super::super::host::grow(st, chunk * R);
    let ot = super::super::host::grow(ot, blocks * dv * R);
    let stats = super::super::host::grow(stats, blocks * 2 * R);
    // the queries transposed, a block of R rows at a time: qt[block][dd][lane], rows past the
    // end zero
    for (block, qt) in qt.chunks_exact_mut(d * R).enumerate() {
        for lane in 0..R {
            let row = block * R + lane;
            for dd in 0..d {
                qt[dd * R + lane] = if row < rows { q.0[row * q.1 + dd] } else { 0.0 };
            }
        }
    }
    ot.fill(0.0);
    for s in stats.chunks_exact_mut(2 * R) {
        s[..R].fill(f32::NEG_INFINITY);
        s[R..].fill(0.0);
    }
    let whole_keys = m / KT * KT;
    let whole_cols = dv / DT * DT;
    for k0 in (0..m).step_by(chunk) {
        let w = chunk.min(m - k0);
        let st = &mut st[..w * R];
        // the chunk's whole key tiles (k0 is a multiple of KT), then its keys in place
        let tiled = whole_keys.min(k0 + w).saturating_sub(k0);
        let keys = Keys {
            packed: &packed.keys[k0 * d..(k0 + tiled) * d],
            rest: (&k.0[(k0 + tiled).min(m - 1) * k.1..], k.1, w - tiled),
        };
        let values = Values {
            packed: (packed.values, m * DT, k0 * DT),
            rest: (&v.0[k0 * v.1 + whole_cols..], v.1, dv - whole_cols),
        };
        for block in 0..blocks {
            let qt = &qt[block * d * R..(block + 1) * d * R];
            let ot = &mut ot[block * dv * R..(block + 1) * dv * R];
            let stats = &mut stats[block * 2 * R..(block + 1) * 2 * R];
            // SAFETY: the slices hold what `Keys` and `Values` say (checked by `rows`); the
            // CPU runs V
            unsafe {
                let chunk_max = scores::<V, NV, KT>(qt, &keys, d, scale, st);
                softmax::<V, NV>(st, chunk_max, stats, ot);
                values_into::<V, NV, DT>(st, &values, [w, dv], ot);
            }
        }
    }
    let out = super::super::host::grow(out, rows * dv);
    for block in 0..blocks {
        let ot = &ot[block * dv * R..(block + 1) * dv * R];
        let sum = &stats[block * 2 * R + R..(block + 1) * 2 * R];
        for lane in 0..R.min(rows - block * R) {
            let row = block * R + lane;
            let inverse = sum[lane].recip();
            for col in 0..dv {
                out[row * dv + col] = ot[col * R + lane] * inverse;
            }
        }
    }
}

/// One chunk's keys: its whole tiles packed (`[d][KT]` each), then `rest.2` keys in place
/// (rows `rest.1` apart).
struct Keys<'a> {
    packed: &'a [f32],
    rest: (&'a [f32], usize, usize),
}

/// One chunk's values: the head's packed tiles (`packed.0`, tile `t` at `t * packed.1`, the
/// chunk's first row at `packed.2` in each), then `rest.2` columns in place (rows `rest.1`
/// apart).
struct Values<'a> {
    packed: (&'a [f32], usize, usize),
    rest: (&'a [f32], usize, usize),
}

/// `st[key][lane] = scale sum_dd qt[dd][lane] k[key][dd]` for the chunk's keys, and the
/// lanes' maxima over them.
///
/// # Safety
/// The CPU runs `V`; `qt` holds `d x NV * LANES` values, `st` a row of them per key; `keys`
/// holds what it says.
#[inline(always)]
unsafe fn scores<V: Vector, const NV: usize, const KT: usize>(
    qt: &[f32],
    keys: &Keys,
    d: usize,
    scale: f32,
    st: &mut [f32],
) -> [V; NV] {
    let r = NV * V::LANES;
    let tiles = keys.packed.len() / (KT * d);
    let (rest, rest_stride, rest_len) = keys.rest;
    debug_assert!(qt.len() >= d * r && st.len() >= (tiles * KT + rest_len) * r);
    debug_assert!(rest_len == 0 || rest.len() >= (rest_len - 1) * rest_stride + d);
    let (qt, st) = (qt.as_ptr(), st.as_mut_ptr());
    // SAFETY: tile t < tiles of the packed keys, key j < rest_len of the rest, their rows of st,
    // elements d0..d1 < d
    unsafe {
        let mut max = [V::splat(f32::NEG_INFINITY); NV];
        // wide heads a slice of DD_SLICE elements at a time (the slice's queries stay in L1),
        // each score's products still summed in order through its row of st
        for d0 in (0..d).step_by(DD_SLICE) {
            let dd = [d0, (d0 + DD_SLICE).min(d), d];
            for t in 0..tiles {
                let k = keys.packed.as_ptr().add(t * KT * d + d0 * KT);
                let st = st.add(t * KT * r);
                score_tile::<V, NV, KT>(qt, k, [1, KT], dd, scale, st, &mut max);
            }
            for j in 0..rest_len {
                let k = rest.as_ptr().add(j * rest_stride + d0);
                let st = st.add((tiles * KT + j) * r);
                score_tile::<V, NV, 1>(qt, k, [rest_stride, 1], dd, scale, st, &mut max);
            }
        }
        max
    }
}

/// Query elements a score tile takes at a time: the queries' slice (`DD_SLICE x R`, 16 KiB
/// with AVX-512) stays in L1.
const DD_SLICE: usize = 128;

/// The scores of `KT` keys against the `NV * LANES` queries of `qt` over the elements `d0..d1`
/// of `[d0, d1, d]` (`k` at element `d0`: key `j`'s element `d0 + i` at `k + j * steps[0] + i *
/// steps[1]`), added to the partial sums in `st` after the first slice; after the last, the
/// scores are scaled into `st` and `max` raised to them.
#[inline(always)]
unsafe fn score_tile<V: Vector, const NV: usize, const KT: usize>(
    qt: *const f32,
    k: *const f32,
    [key_step, dd_step]: [usize; 2],
    [d0, d1, d]: [usize; 3],
    scale: f32,
    st: *mut f32,
    max: &mut [V; NV],
) {
    let r = NV * V::LANES;
    // SAFETY: the caller's (`scores`)
    unsafe {
        let mut acc = [[V::zero(); NV]; KT];
        if d0 > 0 {
            for (j, acc) in acc.iter_mut().enumerate() {
                for (i, a) in acc.iter_mut().enumerate() {
                    *a = V::load(st.add(j * r + i * V::LANES));
                }
            }
        }
        for dd in d0..d1 {
            let qv: [V; NV] = std::array::from_fn(|i| V::load(qt.add(dd * r + i * V::LANES)));
            let k = k.add((dd - d0) * dd_step);
            for (j, acc) in acc.iter_mut().enumerate() {
                let kv = V::splat(*k.add(j * key_step));
                for (a, &qv) in acc.iter_mut().zip(&qv) {
                    *a = a.fma(kv, qv);
                }
            }
        }
        if d1 < d {
            for (j, acc) in acc.iter().enumerate() {
                for (i, a) in acc.iter().enumerate() {
                    a.store(st.add(j * r + i * V::LANES));
                }
            }
            return;
        }
        let scale = V::splat(scale);
        for (j, acc) in acc.iter().enumerate() {
            for (i, a) in acc.iter().enumerate() {
                let s = a.mul(scale);
                max[i] = max[i].max(s);
                s.store(st.add(j * r + i * V::LANES));
            }
        }
    }
}

/// The online softmax of one chunk's scores `st` (a row of `R = NV * LANES` per key): the rows'
/// maxima so far (`stats[..R]`) raised to `chunk_max`, the accumulators `ot` and the sums
/// (`stats[R..]`) rescaled by `exp(old - new)` (exactly 1 where nothing rose), the scores
/// replaced by `exp(score - max)`, and their sum (the chunk's apart) added.
///
/// # Safety
/// The CPU runs `V`; `stats` holds `2 R` values, `st` and `ot` whole rows of `R`.
#[inline(always)]
unsafe fn softmax<V: Vector, const NV: usize>(
    st: &mut [f32],
    chunk_max: [V; NV],
    stats: &mut [f32],
    ot: &mut [f32],
) {
    let (l, r) = (V::LANES, NV * V::LANES);
    debug_assert!(stats.len() == 2 * r && st.len().is_multiple_of(r) && ot.len().is_multiple_of(r));
    let (keys, cols) = (st.len() / r, ot.len() / r);
    let (st, stats, ot) = (st.as_mut_ptr(), stats.as_mut_ptr(), ot.as_mut_ptr());
    // SAFETY: inside the slices (checked above)
    unsafe {
        let mut new = [V::zero(); NV];
        let mut factor = [V::zero(); NV];
        for i in 0..NV {
            let old = V::load(stats.add(i * l));
            new[i] = old.max(chunk_max[i]);
            factor[i] = old.sub(new[i]).exp();
            new[i].store(stats.add(i * l));
        }
        for c in 0..cols {
            for (i, &f) in factor.iter().enumerate() {
                let o = ot.add(c * r + i * l);
                V::load(o).mul(f).store(o);
            }
        }
        let mut sum = [V::zero(); NV];
        for key in 0..keys {
            for (i, sum) in sum.iter_mut().enumerate() {
                let s = st.add(key * r + i * l);
                let e = V::load(s).sub(new[i]).exp();
                e.store(s);
                *sum = sum.add(e);
            }
        }
        for (i, (&sum, &f)) in sum.iter().zip(&factor).enumerate() {
            let s = stats.add(r + i * l);
            sum.fma(V::load(s), f).store(s);
        }
    }
}

/// `ot[col][lane] += sum_key st[key][lane] v[key][col]` for every column, the chunk's sum
/// taken apart first: whole tiles of `DT` columns from the packed panels, the rest in place.
///
/// # Safety
/// As [`scores`]: `st` holds `w` rows of `NV * LANES`, `ot` `dv` of them; `values` what it
/// says.
#[inline(always)]
unsafe fn values_into<V: Vector, const NV: usize, const DT: usize>(
    st: &[f32],
    values: &Values,
    [w, dv]: [usize; 2],
    ot: &mut [f32],
) {
    let r = NV * V::LANES;
    let ((packed, tile_len, first), (rest, rest_stride, rest_cols)) = (values.packed, values.rest);
    let tiles = (dv - rest_cols) / DT;
    debug_assert!(st.len() >= w * r && ot.len() >= dv * r);
    debug_assert!(tiles == 0 || packed.len() >= (tiles - 1) * tile_len + first + w * DT);
    debug_assert!(rest_cols == 0 || rest.len() >= (w - 1) * rest_stride + rest_cols);
    let (st, ot) = (st.as_ptr(), ot.as_mut_ptr());
    // SAFETY: tile t < tiles of the packed values, columns of the rest < rest_cols
    unsafe {
        for t in 0..tiles {
            let values = packed.as_ptr().add(t * tile_len + first);
            value_tile::<V, NV, DT>(st, w, values, DT, ot.add(t * DT * r));
        }
        for c in 0..rest_cols {
            let values = rest.as_ptr().add(c);
            value_tile::<V, NV, 1>(st, w, values, rest_stride, ot.add((tiles * DT + c) * r));
        }
    }
}

/// `DT` output columns of `NV * LANES` rows: the exponentials of `w` keys times their values
/// (`v` at the first column, rows `v_stride` apart), summed and added to `ot`.
#[inline(always)]
unsafe fn value_tile<V: Vector, const NV: usize, const DT: usize>(
    st: *const f32,
    w: usize,
    v: *const f32,
    v_stride: usize,
    ot: *mut f32,
) {
    let r = NV * V::LANES;
    // SAFETY: the caller's (`values_into`)
    unsafe {
        let mut acc = [[V::zero(); NV]; DT];
        for key in 0..w {
            let p: [V; NV] = std::array::from_fn(|i| V::load(st.add(key * r + i * V::LANES)));
            let row = v.add(key * v_stride);
            for (c, acc) in acc.iter_mut().enumerate() {
                let vv = V::splat(*row.add(c));
                for (a, &p) in acc.iter_mut().zip(&p) {
                    *a = a.fma(vv, p);
                }
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            for (i, a) in acc.iter().enumerate() {
                let o = ot.add(c * r + i * V::LANES);
                V::load(o).add(*a).store(o);
            }
        }
    }
}

/// An f32 vector register. Each method is one instruction (or, for [`Vector::exp`], the same
/// steps as the scalar `kernels::exp` with fused multiply-adds, so every width gives its bits).
trait Vector: Copy {
    /// Its f32 lanes.
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    /// `a * b + self`, rounded once.
    unsafe fn fma(self, a: Self, b: Self) -> Self;
    unsafe fn mul(self, b: Self) -> Self;
    unsafe fn add(self, b: Self) -> Self;
    unsafe fn sub(self, b: Self) -> Self;
    /// The lanes' maxima (`b` where either is NaN).
    unsafe fn max(self, b: Self) -> Self;
    /// `e^x` for `x <= 0` ([`super::super::exp`] with fused multiply-adds).
    unsafe fn exp(self) -> Self;
}

/// The [`Vector`] methods that are one instruction each, from their intrinsics.
macro_rules! one_instruction_each {
    ($zero:ident, $splat:ident, $load:ident, $store:ident, $fma:ident, $mul:ident, $add:ident,
     $sub:ident, $max:ident) => {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Self(unsafe { $zero() })
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Self(unsafe { $splat(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            Self(unsafe { $load(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { $store(p, self.0) }
        }
        #[inline(always)]
        unsafe fn fma(self, a: Self, b: Self) -> Self {
            Self(unsafe { $fma(a.0, b.0, self.0) })
        }
        #[inline(always)]
        unsafe fn mul(self, b: Self) -> Self {
            Self(unsafe { $mul(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn add(self, b: Self) -> Self {
            Self(unsafe { $add(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn sub(self, b: Self) -> Self {
            Self(unsafe { $sub(self.0, b.0) })
        }
        #[inline(always)]
        unsafe fn max(self, b: Self) -> Self {
            Self(unsafe { $max(self.0, b.0) })
        }
    };
}

#[derive(Clone, Copy)]
struct Avx512(__m512);

impl Vector for Avx512 {
    const LANES: usize = 16;
    one_instruction_each!(
        _mm512_setzero_ps,
        _mm512_set1_ps,
        _mm512_loadu_ps,
        _mm512_storeu_ps,
        _mm512_fmadd_ps,
        _mm512_mul_ps,
        _mm512_add_ps,
        _mm512_sub_ps,
        _mm512_max_ps
    );
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        use super::super::exp_constants::*;
        // SAFETY: the caller's (the CPU runs AVX-512)
        unsafe {
            let x = self.0;
            let keep = _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, _mm512_set1_ps(TINY));
            let t = _mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), _mm512_set1_ps(ROUND));
            let n = _mm512_sub_ps(t, _mm512_set1_ps(ROUND));
            let ni = _mm512_sub_epi32(
                _mm512_castps_si512(t),
                _mm512_set1_epi32(ROUND.to_bits() as i32),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            let mut p = _mm512_set1_ps(POLY[0]);
            for &c in &POLY[1..] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let e = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0));
            let e = _mm512_add_epi32(_mm512_castps_si512(e), _mm512_slli_epi32::<23>(ni));
            Self(_mm512_maskz_mov_ps(keep, _mm512_castsi512_ps(e)))
        }
    }
}

#[derive(Clone, Copy)]
struct Avx2(__m256);

impl Vector for Avx2 {
    const LANES: usize = 8;
    one_instruction_each!(
        _mm256_setzero_ps,
        _mm256_set1_ps,
        _mm256_loadu_ps,
        _mm256_storeu_ps,
        _mm256_fmadd_ps,
        _mm256_mul_ps,
        _mm256_add_ps,
        _mm256_sub_ps,
        _mm256_max_ps
    );
    #[inline(always)]
    unsafe fn exp(self) -> Self {
        use super::super::exp_constants::*;
        // SAFETY: the caller's (the CPU runs AVX2 and FMA)
        unsafe {
            let x = self.0;
            let keep = _mm256_cmp_ps::<_CMP_NLT_UQ>(x, _mm256_set1_ps(TINY));
            let t = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(ROUND));
            let n = _mm256_sub_ps(t, _mm256_set1_ps(ROUND));
            let ni = _mm256_sub_epi32(
                _mm256_castps_si256(t),
                _mm256_set1_epi32(ROUND.to_bits() as i32),
            );
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
            let mut p = _mm256_set1_ps(POLY[0]);
            for &c in &POLY[1..] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let e = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
            let e = _mm256_add_epi32(_mm256_castps_si256(e), _mm256_slli_epi32::<23>(ni));
            Self(_mm256_and_ps(keep, _mm256_castsi256_ps(e)))
        }
    }
}
