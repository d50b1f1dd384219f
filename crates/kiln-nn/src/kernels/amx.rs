//! bf16 matrix products on Intel's AMX tiles (Sapphire Rapids and later): `tdpbf16ps`
//! multiplies a 16x32 bf16 tile by a 32x16 one into a 16x16 f32 tile, 8192 multiply-adds per
//! instruction (measured on one core of the 2-core Xeon: 2150 GFLOP/s for the block loop with
//! its operands in L1, 930 from L2, against gemm's ~95 in f32).
//!
//! Products are exact in f32 and accumulate in f32 (round-to-nearest-even), so the result is an
//! f32 GEMM of the bf16 operands up to summation order; only the final store rounds to bf16
//! where the output is bf16. That is what PyTorch's oneDNN bf16 kernels compute.
//!
//! The right operand is packed into the tiles' VNNI layout first ([`PackedB`]: `k` padded with
//! zeros to a multiple of 32, columns to 32), the left one read in place where its shape allows
//! ([`Lhs::in_place`]) and packed otherwise ([`pack_a`]), and one block of 32x32 outputs at a time
//! is computed in four tile registers ([`block`]) and written out by [`Epilogue`]. The callers
//! (`linear`, `conv`, `attention`) cut the work into tasks on rayon; each task loads the tile
//! configuration on its thread ([`Tiles`]).
//!
//! x86-64 Linux only: the kernel must grant the process AMX's 8 KiB of tile state
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), and [`available`] asks for it once.
//!
//! On a CPU with AVX512-BF16 but no AMX (Zen 4, Cooper Lake, Xeons whose hypervisor hides the
//! tiles), the same packed operands go through `vdpbf16ps` instead ([`Engine::DotProduct`],
//! [`dot_block`]), where it outruns f32 FMAs ([`engine`] measures that once). `KILN_BF16=emulate`
//! runs them in scalar code on any x86-64 CPU ([`Engine::Emulated`]), for tests.

use half::bf16;
use std::arch::asm;

/// bf16 elements along `k` in one tile row (64 bytes).
pub(super) const TK: usize = 32;
/// Rows of one output block (two A tiles of 16).
pub(super) const MR: usize = 32;
/// Columns of one output block (two B tiles of 16).
pub(super) const NR: usize = 32;
/// bf16 elements of one packed `MR x TK` (or `TK x NR`) block: two tiles of 1 KiB.
const BLOCK: usize = MR * TK;

/// Whether this CPU and OS run AMX's bf16 tiles: CPUID's AMX-TILE and AMX-BF16 bits, and the
/// Linux kernel's permission for the process (asked for once). `KILN_AMX=0` in the environment
/// turns it off (to compare, and to test the other path on such a CPU).
pub(super) fn available() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(|| {
        if std::env::var("KILN_AMX").is_ok_and(|v| v == "0") {
            return false;
        }
        use std::arch::x86_64::__cpuid_count;
        let (max_leaf, leaf7) = (__cpuid_count(0, 0).eax, __cpuid_count(7, 0));
        let amx_bf16 = leaf7.edx & (1 << 22) != 0;
        let amx_tile = leaf7.edx & (1 << 24) != 0;
        max_leaf >= 7 && amx_bf16 && amx_tile && request_permission()
    })
}

/// Asks Linux for the tile data state (`ARCH_REQ_XCOMP_PERM`, `XFEATURE_XTILEDATA`); `false`
/// where the kernel refuses (too old, or disabled).
fn request_permission() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: arch_prctl with these arguments only changes the process's permissions.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

/// The tile configuration (palette 1): all 8 tiles 16 rows of 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

/// The tiles configured on this thread for as long as the value lives (a task's lifetime),
/// released on drop; nothing where bf16 products run on AVX512-BF16 ([`engine`]).
pub(super) struct Tiles(bool);

impl Tiles {
    /// Loads the configuration where the engine is the tiles. Call only where [`engine`] is
    /// some.
    pub(super) fn new() -> Self {
        debug_assert!(engine().is_some());
        if engine() != Some(Engine::Tiles) {
            return Self(false);
        }
        Self::configure()
    }

    /// Loads the configuration. Call only where [`available`] is true.
    fn configure() -> Self {
        debug_assert!(available());
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        config.colsb[..8].fill(64);
        config.rows[..8].fill(16);
        // SAFETY: AMX is available and permitted (checked by the caller); the configuration is
        // a valid palette-1 one.
        unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
        Self(true)
    }
}

impl Drop for Tiles {
    fn drop(&mut self) {
        if self.0 {
            // SAFETY: tiles were configured by `new`.
            unsafe { asm!("tilerelease", options(nostack, nomem)) };
        }
    }
}

/// What multiplies bf16 operands on this CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Engine {
    /// AMX's tiles ([`block`]).
    Tiles,
    /// AVX512-BF16's `vdpbf16ps` on the same packed operands ([`dot_block`]): 16 f32 lanes,
    /// each adding two exact bf16 products.
    DotProduct,
    /// Scalar code that reads the packed operands as the tiles do and adds the products in
    /// `vdpbf16ps`'s order ([`emulated_block`]): never chosen by itself, only with
    /// `KILN_BF16=emulate`, so that the native bf16 paths (packing, blocking, epilogues,
    /// attention's packed exponentials) are tested on every x86-64 CPU. Slow.
    Emulated,
}

/// The engine bf16 products run on here, chosen once: the tiles where [`available`]; else
/// `vdpbf16ps` where the CPU has AVX512-BF16 and it outruns f32 FMAs (measured at first use,
/// [`dot_product_pays`]: twice their rate on Zen 4, less than half on an Emerald Rapids Xeon
/// without AMX); else `None`, and bf16 runs the f32 kernels on operands widened a block at a
/// time. `KILN_BF16=tiles|dot|f32` forces one where the CPU can run it (to compare them, and
/// to test each on a CPU that has it); `KILN_BF16=emulate` runs [`Engine::Emulated`] (tests).
pub(super) fn engine() -> Option<Engine> {
    static ENGINE: std::sync::OnceLock<Option<Engine>> = std::sync::OnceLock::new();
    *ENGINE.get_or_init(|| {
        let dot = dot_product_available();
        match std::env::var("KILN_BF16").as_deref() {
            Ok("f32") => None,
            Ok("emulate") => Some(Engine::Emulated),
            Ok("dot") if dot => Some(Engine::DotProduct),
            Ok("tiles") if available() => Some(Engine::Tiles),
            _ if available() => Some(Engine::Tiles),
            _ if dot && dot_product_pays() => Some(Engine::DotProduct),
            _ => None,
        }
    })
}

/// Whether the CPU has AVX512-BF16 (and AVX-512F).
fn dot_product_available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

/// Whether `vdpbf16ps` computes bf16 products at least 1.5 times as fast as f32 FMAs do (which
/// then also pay for widening the operands): each timed twice for about a millisecond on this
/// thread, the better time kept.
fn dot_product_pays() -> bool {
    const ITERS: usize = 100_000;
    let best = |run: fn(usize) -> f32| {
        (0..2)
            .map(|_| {
                let start = std::time::Instant::now();
                std::hint::black_box(run(std::hint::black_box(ITERS)));
                start.elapsed().as_secs_f64()
            })
            .fold(f64::MAX, f64::min)
    };
    // SAFETY: the CPU has AVX512-BF16 and AVX-512F (checked by the caller).
    let dot = best(|n| unsafe { super::peak::dot_bf16(n) });
    // SAFETY: as above.
    let fma = best(|n| unsafe { super::peak::fma_avx512(n) });
    // the same count of each instruction
    let ratio = fma / dot * super::peak::DOT_BF16 as f64 / super::peak::FMA_AVX512 as f64;
    ratio >= 1.5
}

/// `k` padded to whole tiles.
pub(super) fn k_blocks(k: usize) -> usize {
    k.div_ceil(TK)
}

/// Element types the packers read: f32 (rounded to nearest even) or bf16.
pub(super) trait ToBf16: Copy + Send + Sync {
    fn bits(self) -> u16;
    /// `dst[i] = src[i].bits()`.
    fn convert(src: &[Self], dst: &mut [u16]);
}
impl ToBf16 for f32 {
    #[inline(always)]
    fn bits(self) -> u16 {
        bf16_bits(self)
    }
    fn convert(src: &[f32], dst: &mut [u16]) {
        super::host::narrow_bf16(src, dst)
    }
}
impl ToBf16 for bf16 {
    #[inline(always)]
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn convert(src: &[bf16], dst: &mut [u16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d = s.to_bits();
        }
    }
}

use super::host::bf16_bits;

/// Element types the epilogue writes: f32, or bf16 rounded to nearest even.
pub(super) trait FromF32: Copy + Send + Sync {
    /// `dst[j] = src[j] + add + bias[j]` (`bias` empty for none), rounded to `Self`.
    fn store(dst: &mut [Self], src: &[f32], add: f32, bias: &[f32]);
}
impl FromF32 for f32 {
    fn store(dst: &mut [f32], src: &[f32], add: f32, bias: &[f32]) {
        store_f32(dst, src, add, bias)
    }
}
impl FromF32 for bf16 {
    fn store(dst: &mut [bf16], src: &[f32], add: f32, bias: &[f32]) {
        store_bf16(bytemuck::cast_slice_mut(dst), src, add, bias)
    }
}

vectorised! {
    fn store_f32(dst: &mut [f32], src: &[f32], add: f32, bias: &[f32]) {
        if bias.is_empty() {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = s + add;
            }
        } else {
            for ((d, &s), &b) in dst.iter_mut().zip(src).zip(bias) {
                *d = s + add + b;
            }
        }
    }
}

vectorised! {
    fn store_bf16(dst: &mut [u16], src: &[f32], add: f32, bias: &[f32]) {
        if bias.is_empty() {
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = bf16_bits(s + add);
            }
        } else {
            for ((d, &s), &b) in dst.iter_mut().zip(src).zip(bias) {
                *d = bf16_bits(s + add + b);
            }
        }
    }
}

/// A left operand `[m, k]` as the tiles read it: block row `mb` (rows `32 mb..`) is at
/// `ptr + mb * block`, its second 16-row tile `half` elements after the first, its `k` block
/// `kb` `kb * step` elements on, each tile row `stride` bytes after the one before.
#[derive(Clone, Copy)]
pub(super) struct Lhs<'a> {
    ptr: *const u16,
    stride: usize,
    half: usize,
    step: usize,
    block: usize,
    blocks: usize,
    pub(super) k_blocks: usize,
    _data: std::marker::PhantomData<&'a [u16]>,
}

// SAFETY: `Lhs` is a shared view of bf16 data that outlives it.
unsafe impl Send for Lhs<'_> {}
unsafe impl Sync for Lhs<'_> {}

impl<'a> Lhs<'a> {
    /// `a` as it is in memory (row-major `[m, k]`, `k` contiguous) where the tiles can read it
    /// in place at full speed: `k` and `m` multiples of 32 and the rows aligned to cache lines.
    /// `None` otherwise ([`pack_a`] it then).
    pub(super) fn in_place(a: &'a [bf16], m: usize, k: usize) -> Option<Self> {
        let aligned = (a.as_ptr() as usize).is_multiple_of(64);
        let fits = k.is_multiple_of(TK) && m.is_multiple_of(MR) && a.len() >= m * k && m > 0;
        (aligned && fits).then(|| Self {
            ptr: a.as_ptr().cast(),
            stride: 2 * k,
            half: 16 * k,
            step: TK,
            block: MR * k,
            blocks: m / MR,
            k_blocks: k / TK,
            _data: std::marker::PhantomData,
        })
    }
}

impl Lhs<'_> {
    /// The rows from block row `mb` on.
    pub(super) fn rows_from_block(&self, mb: usize) -> Self {
        assert!(mb <= self.blocks);
        Self {
            // SAFETY: block row mb is inside the view (asserted), or its end.
            ptr: unsafe { self.ptr.add(mb * self.block) },
            blocks: self.blocks - mb,
            ..*self
        }
    }
}

/// Packs rows `0..m` of `a` (element `(i, kk)` at `a[i * rs + kk]`, `k` columns) into `buf`
/// (grown as needed) in blocks of [`MR`] rows: block `mb`'s `k` block `kb` is the `MR x TK`
/// row-major slab at `(mb * k_blocks + kb) * BLOCK`, zero-padded.
pub(super) fn pack_a<'a, T: ToBf16>(
    a: &[T],
    rs: usize,
    m: usize,
    k: usize,
    buf: &'a mut Aligned,
) -> Lhs<'a> {
    let kbs = k_blocks(k);
    let data = buf.grow(packed_a_len(m, k));
    for (mb, slab) in data.chunks_exact_mut(kbs * BLOCK).enumerate() {
        for r in 0..MR {
            let i = mb * MR + r;
            let row = (i < m).then(|| &a[i * rs..i * rs + k]);
            for kb in 0..kbs {
                let dst = &mut slab[kb * BLOCK + r * TK..kb * BLOCK + (r + 1) * TK];
                match row {
                    Some(row) => {
                        let src = &row[(kb * TK).min(k)..((kb + 1) * TK).min(k)];
                        T::convert(src, &mut dst[..src.len()]);
                        dst[src.len()..].fill(0);
                    }
                    None => dst.fill(0),
                }
            }
        }
    }
    Lhs::packed(data, m, k)
}

/// bf16 elements of `[m, k]` packed as [`pack_a`] packs it.
pub(super) fn packed_a_len(m: usize, k: usize) -> usize {
    m.div_ceil(MR) * k_blocks(k) * BLOCK
}

/// The offset in [`pack_a`]'s layout of row `i`'s `k` block `kb` (32 elements, contiguous).
pub(super) fn a_offset(kbs: usize, i: usize, kb: usize) -> usize {
    ((i / MR) * kbs + kb) * BLOCK + (i % MR) * TK
}

impl<'a> Lhs<'a> {
    /// The view of `data` holding `[m, k]` in [`pack_a`]'s layout (written by the caller,
    /// padding zeroed).
    pub(super) fn packed(data: &'a [u16], m: usize, k: usize) -> Self {
        let kbs = k_blocks(k);
        assert!(data.len() >= packed_a_len(m, k));
        Lhs {
            ptr: data.as_ptr(),
            stride: 2 * TK,
            half: BLOCK / 2,
            step: BLOCK,
            block: kbs * BLOCK,
            blocks: m.div_ceil(MR),
            k_blocks: kbs,
            _data: std::marker::PhantomData,
        }
    }
}

/// A right operand `[k, n]` in blocks of [`NR`] columns, each `k` block two VNNI tiles (the
/// layout `tdpbf16ps` reads: row `p` of tile `t` holds, for its 16 columns, the pair of rows
/// `2p, 2p + 1`): element `(kk, j)` of block `(nb, kb)` is at
/// `((nb * k_blocks + kb) * 2 + t) * 512 + (kk % 32 / 2) * 32 + col * 2 + kk % 2`, where
/// `j % 32 = t * 16 + col`.
pub(super) struct PackedB<'a> {
    pub(super) data: &'a [u16],
    pub(super) k_blocks: usize,
}

/// The offset of element `(kk, j)` in a [`PackedB`] with `kbs` k blocks.
#[inline(always)]
pub(super) fn b_offset(kbs: usize, kk: usize, j: usize) -> usize {
    let (nb, t, col) = (j / NR, j % NR / 16, j % 16);
    let (kb, p, lo) = (kk / TK, kk % TK / 2, kk % 2);
    ((nb * kbs + kb) * 2 + t) * 512 + p * 32 + col * 2 + lo
}

/// bf16 elements of a [`PackedB`] of `[k, n]`.
pub(super) fn packed_b_len(k: usize, n: usize) -> usize {
    n.div_ceil(NR) * k_blocks(k) * BLOCK
}

/// Packs `b` (element `(kk, j)` at `b[kk * rs + j * cs]`, `[k, n]`) into `buf` (grown as
/// needed; the padding zeroed) and returns the view. Large operands (weights) are packed a
/// block column per rayon task.
pub(super) fn pack_b<'a, T: ToBf16>(
    b: &[T],
    rs: usize,
    cs: usize,
    k: usize,
    n: usize,
    buf: &'a mut Aligned,
) -> PackedB<'a> {
    use rayon::prelude::*;
    let kbs = k_blocks(k);
    let len = packed_b_len(k, n);
    let data = buf.grow(len);
    let pack = |(nb, slab): (usize, &mut [u16])| {
        let cols = NR.min(n - nb * NR);
        if cols < NR || !k.is_multiple_of(TK) {
            slab.fill(0);
        }
        let j0 = nb * NR;
        // two rows at a time, each pair one 32-bit word of a tile row
        for kk in (0..k).step_by(2) {
            for t in 0..cols.div_ceil(16) {
                let base = b_offset(kbs, kk, t * 16);
                let group = 16.min(cols - t * 16);
                let dst = &mut slab[base..base + 2 * group];
                for (c, d) in dst.chunks_exact_mut(2).enumerate() {
                    let j = j0 + t * 16 + c;
                    d[0] = b[kk * rs + j * cs].bits();
                    d[1] = if kk + 1 < k {
                        b[(kk + 1) * rs + j * cs].bits()
                    } else {
                        0
                    };
                }
            }
        }
    };
    if k * n >= 1 << 16 {
        data.par_chunks_mut(kbs * BLOCK).enumerate().for_each(pack);
    } else {
        data.chunks_mut(kbs * BLOCK).enumerate().for_each(pack);
    }
    PackedB {
        data,
        k_blocks: kbs,
    }
}

/// Which operand a weight is packed as.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Operand {
    /// [`pack_a`]'s layout, `[m, k]` (a convolution's weights).
    Left,
    /// [`pack_b`]'s, `[k, n]` (a linear layer's).
    Right,
}

/// A weight packed for the tiles and kept for the weight's lifetime ([`packed_weight`]).
pub(super) struct PackedWeight {
    data: Aligned,
    operand: Operand,
    /// `[m, k]` for [`Operand::Left`], `[k, n]` for [`Operand::Right`].
    dims: [usize; 2],
}

impl PackedWeight {
    /// The packed right operand (packed as [`Operand::Right`]).
    pub(super) fn right(&self) -> PackedB<'_> {
        assert_eq!(self.operand, Operand::Right);
        let [k, n] = self.dims;
        PackedB {
            data: self.data.get(packed_b_len(k, n)),
            k_blocks: k_blocks(k),
        }
    }

    /// The packed left operand (packed as [`Operand::Left`]).
    pub(super) fn left(&self) -> Lhs<'_> {
        assert_eq!(self.operand, Operand::Left);
        let [m, k] = self.dims;
        Lhs::packed(self.data.get(packed_a_len(m, k)), m, k)
    }
}

/// How a weight was packed: the layout and the view (`[m, k]` or `[k, n]`, then the strides).
type PackedAs = (Operand, [usize; 4]);

/// Packed weights by the address of the weight's elements, each with one handle on the weight's
/// storage, so that the address cannot be reused while the entry lives, and burn cannot change
/// the storage in place (a shared storage is copied on write).
type WeightCache = std::collections::HashMap<
    usize,
    (
        burn_flex::FlexTensor,
        Vec<(PackedAs, std::sync::Arc<PackedWeight>)>,
    ),
>;

static WEIGHTS: std::sync::Mutex<Option<WeightCache>> = std::sync::Mutex::new(None);

/// `weight` packed for the tiles on first use and kept while the weight lives, so that a
/// model's weights are packed once, not at every call (packing a linear layer's weights took
/// about as long as its product at the UNet's deep levels): as a right operand, element
/// `(kk, j)` at `[kk * rs + j * cs]` of `[k, n] = dims`; as a left one, row-major `[m, k] =
/// dims`. A weight's entry goes when the cache holds the last handle on its storage (swept at
/// each insertion), so dropping a model frees its packed weights at the next new one.
pub(super) fn packed_weight(
    weight: &super::host::Host<bf16>,
    operand: Operand,
    dims: [usize; 2],
    [rs, cs]: [usize; 2],
) -> std::sync::Arc<PackedWeight> {
    let elements = weight.as_slice();
    let address = elements.as_ptr() as usize;
    let how = (operand, [dims[0], dims[1], rs, cs]);
    let lock = || {
        WEIGHTS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    };
    let find = |cache: &mut Option<WeightCache>| {
        let (_, packs) = cache.get_or_insert_with(Default::default).get(&address)?;
        packs
            .iter()
            .find(|(h, _)| *h == how)
            .map(|(_, p)| p.clone())
    };
    if let Some(packed) = find(&mut lock()) {
        return packed;
    }
    // packed outside the lock; another thread may have packed the same weight meanwhile
    let mut data = Aligned::default();
    match operand {
        Operand::Right => drop(pack_b(elements, rs, cs, dims[0], dims[1], &mut data)),
        Operand::Left => drop(pack_a(elements, rs, dims[0], dims[1], &mut data)),
    }
    let packed = std::sync::Arc::new(PackedWeight {
        data,
        operand,
        dims,
    });
    let mut guard = lock();
    if let Some(theirs) = find(&mut guard) {
        return theirs;
    }
    let cache = guard.get_or_insert_with(Default::default);
    cache.retain(|_, (storage, _)| !storage.is_unique());
    cache
        .entry(address)
        .or_insert_with(|| (weight.primitive().clone(), Vec::new()))
        .1
        .push((how, packed.clone()));
    packed
}

/// One cache line of bf16.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u16; 32]);

/// A buffer of bf16 bits aligned to cache lines: `tileloadd` of rows that straddle two lines
/// runs at less than half the rate (measured on the Xeon: 2150 against 850 GFLOP/s per core
/// for the same L1-resident loop).
#[derive(Default)]
pub(super) struct Aligned(Vec<Line>);

impl Aligned {
    /// The first `len` elements, the buffer grown (zeroed) first where it is shorter; kept
    /// between calls by its owner so that it is not faulted in again.
    pub(super) fn grow(&mut self, len: usize) -> &mut [u16] {
        let lines = len.div_ceil(32);
        if self.0.len() < lines {
            self.0 = vec![Line([0; 32]); lines];
        }
        &mut bytemuck::cast_slice_mut::<Line, u16>(&mut self.0)[..len]
    }

    /// The first `len` elements (at most what was grown).
    pub(super) fn get(&self, len: usize) -> &[u16] {
        &bytemuck::cast_slice::<Line, u16>(&self.0)[..len]
    }
}

// SAFETY: `Line` is 32 u16 with no padding (64 bytes, aligned to 64).
unsafe impl bytemuck::Zeroable for Line {}
unsafe impl bytemuck::Pod for Line {}

/// One 32x32 block of `A B` in f32 into `c` (row-major, 32 wide), over `a`'s k blocks: block
/// row `mb` of `a`, `b` one block column of a [`PackedB`].
///
/// # Safety
/// AMX must be configured on this thread ([`Tiles`]); `mb` must be one of `a`'s blocks and `b`
/// hold `a.k_blocks * BLOCK` elements.
#[inline]
unsafe fn block(a: &Lhs<'_>, mb: usize, b: *const u16, c: &mut CBlock) {
    // SAFETY: tiles 0-3 accumulate, 4-5 hold A's two 16-row tiles, 6-7 B's two 16-column VNNI
    // tiles; every load reads inside block `mb` of `a` and the `k_blocks * BLOCK` elements of
    // `b` the caller guarantees, the stores write the four 16x16 quarters of `c` (128-byte
    // rows).
    unsafe {
        let a_block = a.ptr.add(mb * a.block);
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            options(nostack, nomem)
        );
        for kb in 0..a.k_blocks {
            let a0 = a_block.add(kb * a.step);
            let b = b.add(kb * BLOCK);
            asm!(
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{a2} + {sa}*1]",
                "tileloadd tmm6, [{b} + {s}*1]",
                "tileloadd tmm7, [{b2} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a = in(reg) a0,
                a2 = in(reg) a0.add(a.half),
                sa = in(reg) a.stride,
                b = in(reg) b,
                b2 = in(reg) b.add(BLOCK / 2),
                s = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        let c = c.0.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c1} + {s}*1], tmm1",
            "tilestored [{c2} + {s}*1], tmm2",
            "tilestored [{c3} + {s}*1], tmm3",
            c0 = in(reg) c,
            c1 = in(reg) c.add(16),
            c2 = in(reg) c.add(16 * NR),
            c3 = in(reg) c.add(16 * NR + 16),
            s = in(reg) 4 * NR,
            options(nostack)
        );
    }
}

/// The left 32x16 half of [`block`] (the right half of `c` is left as it was): a last block
/// column of at most 16 outputs (heads of 40: 32 + 8) takes half the tile products.
///
/// # Safety
/// As [`block`].
#[inline]
unsafe fn half_block(a: &Lhs<'_>, mb: usize, b: *const u16, c: &mut CBlock) {
    // SAFETY: as in `block`, with tiles 0 and 2 accumulating and only B's first tile loaded.
    unsafe {
        let a_block = a.ptr.add(mb * a.block);
        asm!("tilezero tmm0", "tilezero tmm2", options(nostack, nomem));
        for kb in 0..a.k_blocks {
            let a0 = a_block.add(kb * a.step);
            asm!(
                "tileloadd tmm4, [{a} + {sa}*1]",
                "tileloadd tmm5, [{a2} + {sa}*1]",
                "tileloadd tmm6, [{b} + {s}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a = in(reg) a0,
                a2 = in(reg) a0.add(a.half),
                sa = in(reg) a.stride,
                b = in(reg) b.add(kb * BLOCK),
                s = in(reg) 64usize,
                options(nostack, readonly)
            );
        }
        let c = c.0.as_mut_ptr();
        asm!(
            "tilestored [{c0} + {s}*1], tmm0",
            "tilestored [{c2} + {s}*1], tmm2",
            c0 = in(reg) c,
            c2 = in(reg) c.add(16 * NR),
            s = in(reg) 4 * NR,
            options(nostack)
        );
    }
}

/// [`block`] (`TILES` = 2) or [`half_block`] (1) with AVX512-BF16's `vdpbf16ps` instead of
/// the tiles, on the same operands: a row's pair of `k` elements is broadcast to 16 lanes and
/// multiplied with a row of B's VNNI tile (16 columns, that pair of `k` each), both products
/// added exactly into each f32 lane. Eight rows at a time, 16 accumulators.
///
/// # Safety
/// As [`block`], on a CPU with AVX-512F and AVX512-BF16 (no tiles needed).
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dot_block<const TILES: usize>(a: &Lhs<'_>, mb: usize, b: *const u16, c: &mut CBlock) {
    use std::arch::x86_64::*;
    const ROWS: usize = 8;
    // SAFETY: every read is inside block row `mb` of `a` (rows of `a.stride` bytes, the second
    // tile `a.half` elements on, `k` block `kb` at `kb * a.step`, 32 elements each) or inside
    // the `k_blocks * BLOCK` elements of `b`; the stores write rows of `c`.
    unsafe {
        let a_block = a.ptr.add(mb * a.block);
        for pass in 0..MR / ROWS {
            let rows: [*const u16; ROWS] = std::array::from_fn(|i| {
                let r = pass * ROWS + i;
                a_block.add((r / 16) * a.half + (r % 16) * (a.stride / 2))
            });
            let mut acc = [[_mm512_setzero_ps(); TILES]; ROWS];
            for kb in 0..a.k_blocks {
                let bk = b.add(kb * BLOCK);
                for p in 0..TK / 2 {
                    let bv: [__m512bh; TILES] = std::array::from_fn(|t| {
                        std::mem::transmute(_mm512_loadu_si512(bk.add(t * 512 + p * 32).cast()))
                    });
                    for (row, acc) in rows.iter().zip(&mut acc) {
                        let pair = row.add(kb * a.step + 2 * p).cast::<i32>().read_unaligned();
                        let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                        for (acc, &bv) in acc.iter_mut().zip(&bv) {
                            *acc = _mm512_dpbf16_ps(*acc, av, bv);
                        }
                    }
                }
            }
            for (i, acc) in acc.iter().enumerate() {
                let row = c.0.as_mut_ptr().add((pass * ROWS + i) * NR);
                for (t, &acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(row.add(t * 16), acc);
                }
            }
        }
    }
}

/// [`dot_block`] in scalar code ([`Engine::Emulated`]): the same reads of the packed operands,
/// each lane's pair of exact products added to its f32 accumulator in `vdpbf16ps`'s order (the
/// odd element's product first).
///
/// # Safety
/// As [`block`] (no tiles or CPU features needed).
unsafe fn emulated_block<const TILES: usize>(
    a: &Lhs<'_>,
    mb: usize,
    b: *const u16,
    c: &mut CBlock,
) {
    let widen = |bits: u16| f32::from_bits(u32::from(bits) << 16);
    // SAFETY: the reads are those of `dot_block`, inside block row `mb` of `a` and the
    // `k_blocks * BLOCK` elements of `b` (the caller's guarantee).
    unsafe {
        let a_block = a.ptr.add(mb * a.block);
        for r in 0..MR {
            let row = a_block.add((r / 16) * a.half + (r % 16) * (a.stride / 2));
            let mut acc = [0f32; 32];
            for kb in 0..a.k_blocks {
                let bk = b.add(kb * BLOCK);
                for p in 0..TK / 2 {
                    let (a0, a1) = (
                        widen(*row.add(kb * a.step + 2 * p)),
                        widen(*row.add(kb * a.step + 2 * p + 1)),
                    );
                    for (j, acc) in acc[..16 * TILES].iter_mut().enumerate() {
                        let pair = bk.add((j / 16) * 512 + p * 32 + 2 * (j % 16));
                        *acc = (*acc + a1 * widen(*pair.add(1))) + a0 * widen(*pair);
                    }
                }
            }
            c.0[r * NR..r * NR + 16 * TILES].copy_from_slice(&acc[..16 * TILES]);
        }
    }
}

/// One 32x32 block of f32 results, aligned to cache lines for the tile stores.
#[repr(C, align(64))]
pub(super) struct CBlock([f32; MR * NR]);

/// What an output block starts from before the product is added.
#[derive(Clone, Copy)]
pub(super) enum Init<'a> {
    /// Zero.
    Zero,
    /// `bias[row]` (a convolution's output channels are rows).
    RowBias(&'a [f32]),
    /// `bias[column]` (a linear layer's outputs are columns).
    ColBias(&'a [f32]),
}

/// Where the blocks go: `out` is `[rows, cols]` with row stride `stride`.
#[derive(Clone, Copy)]
pub(super) struct Epilogue<'a, O> {
    pub(super) out: *mut O,
    pub(super) stride: usize,
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) init: Init<'a>,
}

impl<O: FromF32> Epilogue<'_, O> {
    /// Writes block `c` at rows `i0..`, columns `j0..` (clipped to the output).
    ///
    /// # Safety
    /// `out` must be valid for the whole `[rows, cols]` view and this block not written by
    /// another thread meanwhile.
    #[inline]
    pub(super) unsafe fn write(&self, c: &CBlock, i0: usize, j0: usize) {
        let rows = MR.min(self.rows - i0);
        let cols = NR.min(self.cols - j0);
        for r in 0..rows {
            let i = i0 + r;
            // SAFETY: row i, columns j0..j0 + cols are inside the view (clipped above).
            let dst =
                unsafe { std::slice::from_raw_parts_mut(self.out.add(i * self.stride + j0), cols) };
            let src = &c.0[r * NR..r * NR + cols];
            match self.init {
                Init::Zero => O::store(dst, src, 0.0, &[]),
                Init::RowBias(bias) => O::store(dst, src, bias[i], &[]),
                Init::ColBias(bias) => O::store(dst, src, 0.0, &bias[j0..j0 + cols]),
            }
        }
    }
}

/// `A B` written through `epilogue` (rows `0..epilogue.rows` of `a`, all of `b`'s columns), on
/// this thread (tiles configured by the caller): the loop every caller's task runs, in `order`.
///
/// # Safety
/// As [`Epilogue::write`]; tiles configured ([`Tiles`]); `a` and `b` must have the same
/// `k_blocks`, `epilogue.rows` be at most `a`'s rows (blocks of 32) and `epilogue.cols` at most
/// `b`'s columns.
pub(super) unsafe fn multiply<O: FromF32>(
    a: &Lhs<'_>,
    b: &PackedB<'_>,
    epilogue: &Epilogue<'_, O>,
    order: Order,
) {
    let engine = engine().expect("bf16 products run natively here");
    // SAFETY: the caller's guarantees, and the engine is this CPU's.
    unsafe { multiply_on(engine, a, b, epilogue, order) }
}

/// [`multiply`] on `engine`.
///
/// # Safety
/// As [`multiply`]; the CPU must run `engine` (tiles configured by the caller for
/// [`Engine::Tiles`]).
unsafe fn multiply_on<O: FromF32>(
    engine: Engine,
    a: &Lhs<'_>,
    b: &PackedB<'_>,
    epilogue: &Epilogue<'_, O>,
    order: Order,
) {
    let slab = a.k_blocks * BLOCK;
    assert_eq!(a.k_blocks, b.k_blocks);
    assert!(epilogue.rows.div_ceil(MR) <= a.blocks);
    assert!(epilogue.cols.div_ceil(NR) * slab <= b.data.len());
    let mut c = CBlock([0.0; MR * NR]);
    let (mbs, nbs) = (epilogue.rows.div_ceil(MR), epilogue.cols.div_ceil(NR));
    let (outer, inner) = match order {
        Order::ColumnsOuter => (nbs, mbs),
        Order::RowsOuter => (mbs, nbs),
    };
    for o in 0..outer {
        for i in 0..inner {
            let (mb, nb) = match order {
                Order::ColumnsOuter => (i, o),
                Order::RowsOuter => (o, i),
            };
            // SAFETY: block row mb of `a` and block column nb of `b` exist (asserted above);
            // tiles are configured and the epilogue's view is valid (the caller's guarantee).
            unsafe {
                let b = b.data.as_ptr().add(nb * slab);
                let half = epilogue.cols - nb * NR <= 16;
                match (engine, half) {
                    (Engine::Tiles, true) => half_block(a, mb, b, &mut c),
                    (Engine::Tiles, false) => block(a, mb, b, &mut c),
                    (Engine::DotProduct, true) => dot_block::<1>(a, mb, b, &mut c),
                    (Engine::DotProduct, false) => dot_block::<2>(a, mb, b, &mut c),
                    (Engine::Emulated, true) => emulated_block::<1>(a, mb, b, &mut c),
                    (Engine::Emulated, false) => emulated_block::<2>(a, mb, b, &mut c),
                }
                epilogue.write(&c, mb * MR, nb * NR);
            }
        }
    }
}

/// Which operand [`multiply`] keeps in cache while the other streams past it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Order {
    /// Each block column of B over every block row of A: B larger than the cache (weights),
    /// A a task's rows.
    ColumnsOuter,
    /// Each block row of A over every block column of B: B a task's panel in L2, A (weights)
    /// larger than the cache.
    RowsOuter,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn bf16_round(v: f32) -> f32 {
        bf16::from_f32(v).to_f32()
    }

    /// A weight is packed once while it lives; its entry goes once the weight is dropped (at
    /// the next insertion).
    #[test]
    fn weights_are_packed_once_while_they_live() {
        use burn::tensor::{DType, Device, Distribution, Tensor};
        let device = Device::flex();
        let host = |t: &Tensor<2>| super::super::host::Host::<bf16>::new(t.clone()).unwrap();
        let w = Tensor::<2>::random([64, 48], Distribution::Default, &device).cast(DType::BF16);
        let right = |t: &Tensor<2>| packed_weight(&host(t), Operand::Right, [64, 48], [48, 1]);
        let (first, again) = (right(&w), right(&w));
        assert!(std::sync::Arc::ptr_eq(&first, &again));
        // the same values packed directly
        let mut buf = Aligned::default();
        let direct = pack_b(host(&w).as_slice(), 48, 1, 64, 48, &mut buf);
        assert_eq!(first.right().data, direct.data);
        // as a left operand: another entry
        let left = packed_weight(&host(&w), Operand::Left, [64, 48], [48, 1]);
        assert!(!std::sync::Arc::ptr_eq(&first, &left));
        let mut buf = Aligned::default();
        let direct = pack_a(host(&w).as_slice(), 48, 64, 48, &mut buf);
        assert_eq!(left.left().blocks, direct.blocks);
        assert_eq!(
            left.data.get(packed_a_len(64, 48)),
            buf.get(packed_a_len(64, 48))
        );
        let key = |t: &Tensor<2>| host(t).as_slice().as_ptr() as usize;
        let old_key = key(&w);
        drop(w);
        let other = Tensor::<2>::random([64, 48], Distribution::Default, &device).cast(DType::BF16);
        let _ = right(&other);
        let cache = WEIGHTS.lock().unwrap();
        let cache = cache.as_ref().unwrap();
        assert!(cache.contains_key(&key(&other)));
        assert!(old_key == key(&other) || !cache.contains_key(&old_key));
    }

    /// The branch-free rounding gives half's bits for every class of f32.
    #[test]
    fn bf16_rounding_matches_half() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let special = [
            0.0,
            -0.0,
            1.0,
            f32::MAX,
            f32::MIN_POSITIVE,
            1e-40,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x3f80_8000), // ties: down to even
            f32::from_bits(0x3f81_8000), // and up to even
        ];
        let random = (0..100_000).map(|_| f32::from_bits(rng.random::<u32>()));
        for x in special.into_iter().chain(random) {
            let ours = bf16_bits(x);
            let theirs = bf16::from_f32(x).to_bits();
            if x.is_nan() {
                assert!(bf16::from_bits(ours).is_nan());
            } else {
                assert_eq!(ours, theirs, "{x:e}");
            }
        }
    }

    /// The product of each engine this CPU runs (the tiles, `vdpbf16ps`, the emulation) against
    /// an f64 one of the same bf16 operands, at sizes that are not multiples of the blocks, for
    /// each way an output block starts.
    #[test]
    fn matches_an_f64_product_of_the_bf16_operands() {
        let engines: Vec<Engine> = [
            available().then_some(Engine::Tiles),
            dot_product_available().then_some(Engine::DotProduct),
            Some(Engine::Emulated),
        ]
        .into_iter()
        .flatten()
        .collect();
        for engine in engines {
            products_match_f64(engine);
        }
    }

    fn products_match_f64(engine: Engine) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // (64, 96, 320) and (32, 40, 64) are read in place, the rest packed
        for (m, n, k) in [
            (1, 1, 1),
            (33, 17, 70),
            (64, 96, 320),
            (5, 40, 33),
            (70, 3, 96),
            (32, 40, 64),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.random_range(-1.0..1.0)).collect();
            let bias: Vec<f32> = (0..m.max(n)).map(|_| rng.random_range(-1.0..1.0)).collect();
            let (mut abuf, mut bbuf) = (Aligned::default(), Aligned::default());
            let a16: Vec<bf16> = a.iter().map(|&v| bf16::from_f32(v)).collect();
            let pa = match Lhs::in_place(&a16, m, k) {
                Some(in_place) => in_place,
                None => pack_a(&a, k, m, k, &mut abuf),
            };
            // b transposed in memory (element (kk, j) at j * k + kk) as attention's keys are
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            let pb = pack_b(&bt, 1, k, k, n, &mut bbuf);
            for init in ["zero", "row", "col"] {
                let mut out = vec![0.5f32; m * n];
                let epilogue = Epilogue {
                    out: out.as_mut_ptr(),
                    stride: n,
                    rows: m,
                    cols: n,
                    init: match init {
                        "zero" => Init::Zero,
                        "row" => Init::RowBias(&bias),
                        _ => Init::ColBias(&bias),
                    },
                };
                let _tiles = (engine == Engine::Tiles).then(Tiles::configure);
                unsafe { multiply_on(engine, &pa, &pb, &epilogue, Order::ColumnsOuter) };
                for i in 0..m {
                    for j in 0..n {
                        let dot: f64 = (0..k)
                            .map(|kk| {
                                bf16_round(a[i * k + kk]) as f64 * bf16_round(b[kk * n + j]) as f64
                            })
                            .sum();
                        let start = match init {
                            "zero" => 0.0,
                            "row" => bias[i] as f64,
                            _ => bias[j] as f64,
                        };
                        let expected = start + dot;
                        let got = out[i * n + j] as f64;
                        let scale: f64 = (0..k)
                            .map(|kk| (a[i * k + kk] * b[kk * n + j]).abs() as f64)
                            .sum::<f64>()
                            + start.abs();
                        assert!(
                            (got - expected).abs() <= 1e-6 * scale.max(1e-30),
                            "{engine:?} {m}x{n}x{k} {init} ({i}, {j}): {got} vs {expected}"
                        );
                    }
                }
            }
        }
    }
}
