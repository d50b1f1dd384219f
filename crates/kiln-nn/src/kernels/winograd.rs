//! 3x3 convolutions with stride 1 by Winograd's minimal filtering, F(2x2, 3x3) (Lavin and Gray,
//! "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! Each 2x2 block of output pixels (a tile) of one output channel is `A^T [Σ_c (G g_c G^T) ⊙
//! (B^T d_c B)] A`, where `d_c` is the 4x4 input patch under the tile in input channel `c` and
//! `g_c` the 3x3 filter: 16 multiplications per tile and channel pair where the direct
//! convolution takes 36, so 2.25x fewer. The sum over channels is 16 independent GEMMs, one per
//! position ξ of the 4x4 transformed tile: `M[ξ] = U[ξ] V[ξ]` with `U[ξ]` the `[out, in]`
//! transformed filters and `V[ξ]` the `[in, tiles]` transformed input.
//!
//! The transforms' coefficients are 0, ±1 and ±1/2, exact in binary floating point, and the
//! transformed values are sums of at most four (input) or nine (filter) terms, so the rounding
//! stays that of the direct convolution's order (the tests bound it against burn's op and
//! against an f64 reference, next to the im2col kernel's own error).
//!
//! Work is cut as in [`super::conv`], by the shapes only (so the result does not depend on the
//! thread count): the tile rows of the whole batch into panels, and tasks of (block of output
//! channels, run of panels). For each round of its channels a task transforms their filters
//! into its thread's `U` buffer, then for each of its panels runs the 16 GEMMs single-threaded
//! into `M` against the transformed input `V` and transforms `M` into the output, adding the
//! bias. `V` is made once for all the tasks where the filters are large against the input
//! (the deep levels, whose filters cost more to transform than their images), else by each
//! task for its own panels ([`shares_input`]). Nothing is kept between calls but the buffers:
//! keeping the transformed filters would hold 16/9 of every layer's weights more.
//!
//! [`conv2d`](super::conv2d) takes this path from 8x8 output pixels up ([`pays`]); PyTorch's
//! CPU convolutions run oneDNN's direct algorithm.

use rayon::prelude::*;
use std::cell::RefCell;

use super::conv::{ConvShape, MIN_CHANNELS, MIN_TASKS};
use super::host::{self, Float, SharedMut, grow};

/// Output tiles per image (8x8 output pixels), and over the batch (two such images), below
/// which [`pays`] declines, except where [`full_width_fma`] raises the first to
/// [`WIDE_MIN_IMAGE_TILES`]. Measured on the 2-core Zen 3 (2026-12-07, `cargo run --release -p
/// kiln-nn --example conv_algorithms -- small`, two runs), Winograd against im2col panels at
/// 1280 channels, batch 2: 1.23-1.24x faster at 8x8, 1.37-1.38x at 10x10, 1.56-1.60x at 12x12
/// (the UNet's deepest level at 768 px), 1.66-1.72x at 14x14 and 16x16; 1.00-1.25x at 6x6 and
/// 0.57-0.58x at 4x4, where the filters cost more to transform than the image's few tiles
/// save; with batch 1, 1.05-1.07x at 8x8 and 0.99-1.22x at 12x12.
const MIN_IMAGE_TILES: usize = 16;
const MIN_BATCH_TILES: usize = 32;

/// [`MIN_IMAGE_TILES`] where the CPU runs 512-bit FMAs at full width (10x10 output pixels):
/// there im2col's GEMMs run at twice the FLOPs per cycle of Zen 3's, while the deep levels'
/// Winograd GEMMs (a few dozen tiles against 16/9 of the weights, transformed) are bound by
/// reading the transformed filters. The same runs on the 2-core Ice Lake (2026-12-07, two
/// runs): Winograd 0.86x and 0.72x of im2col's speed at 2x1280x8x8 and 0.63x and 0.76x at
/// 2x2560x8x8, 1.14x and 1.00x at 10x10, 1.23x and 1.03x at 12x12, 1.25-1.39x at 16x16; on
/// the Emerald Rapids Xeon (2026-12-06) level at 8x8.
const WIDE_MIN_IMAGE_TILES: usize = 25;

/// Whether this CPU has AVX-512 and is Intel's, whose server cores run two 512-bit FMAs a
/// cycle (AMD's Zen 4 runs them as two 256-bit halves, at Zen 3's FLOPs per cycle). Read once.
fn full_width_fma() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            let id = std::arch::x86_64::__cpuid(0);
            let intel = [id.ebx, id.edx, id.ecx] == [0x756e_6547, 0x4965_6e69, 0x6c65_746e];
            intel && is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Elements of one transformed-input slice `V[ξ]` (`in x tiles`) per task; the panel's 16
/// slices take 16 times this (8 MiB). Chosen on the Xeon above among 2^15 to 2^18, at the
/// 64x64 to 512x512 shapes.
const SLICE_BUDGET: usize = 1 << 17;

/// Tiles of one panel at least, even past the budget: fewer leave gemm's microkernel short
/// rows.
const MIN_TILES: usize = 64;

/// Output channels per round of 16 GEMMs at most: each round transforms the panel's input
/// again, and more channels per round make that cheaper against the GEMMs (64 per round were
/// 1.2-1.5x slower than 128-512 at the VAE's shapes).
const MAX_SUB_CHANNELS: usize = 256;

/// Elements of one round's transformed filters `U` (`16 x channels x in`) at most, 16 MiB,
/// unless that leaves fewer than [`MIN_CHANNELS`] channels.
const FILTER_BUDGET: usize = 1 << 22;

/// Whether [`conv3x3`] can compute the convolution `s`: a 3x3 kernel with stride 1 and
/// dilation 1, any padding.
pub(super) fn applies(s: &ConvShape) -> bool {
    s.kh == 3 && s.kw == 3 && s.options.stride == [1, 1] && s.options.dilation == [1, 1]
}

/// Whether it is the faster algorithm for `s` on this CPU (see [`MIN_IMAGE_TILES`]).
pub(super) fn pays(s: &ConvShape) -> bool {
    let min_image_tiles = if full_width_fma() {
        WIDE_MIN_IMAGE_TILES
    } else {
        MIN_IMAGE_TILES
    };
    let tiles = s.oh.div_ceil(2) * s.ow.div_ceil(2);
    tiles >= min_image_tiles && s.batch * tiles >= MIN_BATCH_TILES
}

/// Whether the transformed input of a convolution `s` cut into `panels` panels is made once,
/// before the tasks, and shared by them: where the filters (`out x in x 9`) are at least 0.6
/// of the input (`batch x in x height x width`), so that transforming each filter once
/// (channels split before panels) saves more than each task's GEMMs finding their own panels'
/// input in cache, and there are at most [`MAX_SHARED_PANELS`]. Otherwise (large images
/// against their channels) each task transforms its own panels' input into its thread's
/// buffer.
///
/// Measured on the 2-core Zen 3 (2026-12-07, Winograd alone, best of 4, the two rules
/// alternating twice in one build): shared against per-task, SDXL's `[2, 1280, 32, 32] ->
/// 1280` (filters 5.6 times the input, six panels) 215-253 ms against 266-277, `[2, 2560, 32,
/// 32] -> 1280` (eight panels) 401-402 against 459-488, `[2, 1920, 32, 32] -> 1280` 300-327
/// against 358-366, `[2, 640, 64, 64] -> 640` (0.7, 11 panels) 209-215 against 231-242,
/// `[2, 640, 40, 40] -> 640` (1.8, four panels) 83 against 84-87, `[2, 1280, 28, 28] -> 1280`
/// (7.3) 154-160 against 185-186; per-task better at `[2, 320, 56, 56] -> 320` (0.46, four
/// panels) 42-43 ms against 42-46 and `[1, 320, 80, 80] -> 320` (0.45) 44-46 against 47-49,
/// level at the VAE's `[1, 512, 64, 64] -> 512` (1.1). This was a count of four panels at
/// most, chosen on the 2-core Xeon for the UNet's deep levels (at 32x32, 16x16 and 8x8 pixels
/// 32, 32 and 14 ms shared against 38, 42 and 18, and 39 ms against 35 at 64x64 pixels, six
/// panels of 320 channels).
fn shares_input(s: &ConvShape, panels: usize) -> bool {
    panels <= MAX_SHARED_PANELS && 15 * s.cout >= s.batch * s.oh * s.ow
}

/// Panels whose transformed input may be shared at most: the buffer holds 16 x `in` x tiles
/// of each panel, [`SLICE_BUDGET`] x 16 or less (8 MiB), so at most 128 MiB.
const MAX_SHARED_PANELS: usize = 16;

thread_local! {
    /// Each thread's transformed input `V` (`[16, in, tiles]`, when not shared), transformed
    /// filters `U` (`[16, channels, in]`), GEMM results `M` (`[16, channels, tiles]`) and
    /// widened (bf16 or f16) filters, kept between calls so that they are not faulted in again
    /// (a call that uses an eighth of `V`, `U`, `M` or the shared input or less hands the rest
    /// of its pages back: [`host::release_tail`]).
    static BUFFERS: RefCell<[Vec<f32>; 4]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
    /// The calling thread's shared transformed input, kept between calls (taken out while in
    /// use: a nested call on the same thread gets a fresh one).
    static SHARED_INPUT: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The convolution `s` (see [`applies`]) on host slices: `out` (`[batch, out, oh, ow]`) is
/// overwritten.
///
/// The tile rows of all the images, one after the other, are cut into panels (so that at the
/// deep levels, a few tile rows per image, one panel serves the whole batch). A task takes a
/// block of output channels and a run of consecutive panels; for each round of its channels it
/// transforms their filters once, then runs each of its panels: the 16 GEMMs and the output
/// transform. Where the filters are large against the input ([`shares_input`]: the deep
/// levels), the input is transformed once for all the tasks, and the channels are split
/// before the panels, so that each filter is transformed once per call (reading the weights
/// and writing their transform is most of what the algorithm adds to the GEMMs there);
/// elsewhere each task transforms its panels' input (again in each round, unless it has one
/// panel), and the panels are split before the channels.
pub(super) fn conv3x3<W: Float>(
    x: &[f32],
    weight: &[W],
    bias: Option<&[f32]>,
    s: &ConvShape,
    prologue: Option<Prologue<'_>>,
    out: &mut [f32],
) {
    debug_assert!(applies(s));
    assert!(prologue.is_none_or(|p| p.scale_shift.len() == s.batch * s.cin));
    let (cin, cout) = (s.cin, s.cout);
    let pixels = s.oh * s.ow;
    assert_eq!(x.len(), s.batch * cin * s.h * s.w);
    assert_eq!(weight.len(), cout * cin * 9);
    assert_eq!(out.len(), s.batch * cout * pixels);
    assert!(bias.is_none_or(|b| b.len() == cout));
    let (th, tw) = (s.oh.div_ceil(2), s.ow.div_ceil(2));
    let all_rows = s.batch * th;
    let tile_rows = (SLICE_BUDGET / (cin * tw))
        .max(MIN_TILES.div_ceil(tw))
        .clamp(1, all_rows);
    let panels = all_rows.div_ceil(tile_rows);
    // the same number of panels, as even as possible
    let tile_rows = all_rows.div_ceil(panels);
    let panel_len = 16 * cin * tile_rows * tw;
    let shared = shares_input(s, panels);
    let most_blocks = if shared {
        MIN_TASKS
    } else {
        MIN_TASKS.div_ceil(panels)
    };
    let blocks = most_blocks.min(cout / MIN_CHANNELS).max(1);
    let channels = cout.div_ceil(blocks);
    let blocks = cout.div_ceil(channels);
    let runs = MIN_TASKS.div_ceil(blocks).min(panels);
    let run_panels = panels.div_ceil(runs);
    let runs = panels.div_ceil(run_panels);
    let most = (FILTER_BUDGET / (16 * cin)).clamp(MIN_CHANNELS, MAX_SUB_CHANNELS);
    // rounds as even as possible
    let sub = channels.div_ceil(channels.div_ceil(most));
    let panel_rows = |panel: usize| {
        let row0 = panel * tile_rows;
        (row0, tile_rows.min(all_rows - row0))
    };
    let out_ptr = SharedMut(out.as_mut_ptr());
    super::host::with_buffer(&SHARED_INPUT, |shared_buf| {
        let shared_v: &[f32] = if shared {
            let v = grow(shared_buf, panels * panel_len);
            // tasks of (panel, block of input channels)
            let parts = MIN_TASKS.div_ceil(panels).min(cin);
            let part_channels = cin.div_ceil(parts);
            let parts = cin.div_ceil(part_channels);
            let v_ptr = SharedMut(v.as_mut_ptr());
            (0..panels * parts).into_par_iter().for_each(|task| {
                let (panel, part) = (task / parts, task % parts);
                let (row0, rows) = panel_rows(panel);
                let c0 = part * part_channels;
                let channels = c0..(c0 + part_channels).min(cin);
                // SAFETY: panel `panel`'s part of `v` (`panel_len` from `panel * panel_len`,
                // within its `panels * panel_len`), of which this task writes only its
                // channels' rows.
                unsafe {
                    transform_input(
                        x,
                        s,
                        prologue,
                        row0,
                        rows,
                        channels,
                        v_ptr.get().add(panel * panel_len),
                    )
                };
            });
            v
        } else {
            &[]
        };
        (0..runs * blocks).into_par_iter().for_each(|task| {
            let (run, block) = (task / blocks, task % blocks);
            let first_panel = run * run_panels;
            let run_panels = run_panels.min(panels - first_panel);
            let c0 = block * channels;
            let channels = channels.min(cout - c0);
            // what this task uses of its thread's buffers
            let (u_len, m_len) = (16 * sub * cin, 16 * sub * tile_rows * tw);
            let v_len = if shared { 0 } else { panel_len };
            BUFFERS.with_borrow_mut(|[own_v, u, m, wide]| {
                grow(u, u_len);
                grow(m, m_len);
                grow(own_v, v_len);
                for sc in (c0..c0 + channels).step_by(sub) {
                    let sub = sub.min(c0 + channels - sc);
                    let u = &mut u[..16 * sub * cin];
                    let g = W::widen(&weight[sc * cin * 9..(sc + sub) * cin * 9], wide);
                    transform_filters(g, u);
                    for panel in first_panel..first_panel + run_panels {
                        let (row0, rows) = panel_rows(panel);
                        let tiles = rows * tw;
                        let v = if shared {
                            &shared_v[panel * panel_len..panel * panel_len + 16 * cin * tiles]
                        } else {
                            let v = &mut own_v[..16 * cin * tiles];
                            // a task of one panel transforms its input once, in its first round
                            if run_panels > 1 || sc == c0 {
                                // SAFETY: `v` is this thread's, of the panel's length.
                                unsafe {
                                    transform_input(
                                        x,
                                        s,
                                        prologue,
                                        row0,
                                        rows,
                                        0..cin,
                                        v.as_mut_ptr(),
                                    )
                                };
                            }
                            &*v
                        };
                        let m = &mut m[..16 * sub * tiles];
                        panel_gemms(u, v, m, [sub, cin, tiles]);
                        for c in 0..sub {
                            let co = sc + c;
                            let b = bias.map_or(0.0, |b| b[co]);
                            for r in 0..rows {
                                let (image, tr) = ((row0 + r) / th, (row0 + r) % th);
                                let out_rows = 2.min(s.oh - 2 * tr);
                                // SAFETY: output rows 2 tr .. 2 tr + out_rows of channel co of
                                // image `image`: inside `out`, and this task's (its tile rows,
                                // its channels) only.
                                let dst = unsafe {
                                    std::slice::from_raw_parts_mut(
                                        out_ptr
                                            .get()
                                            .add((image * cout + co) * pixels + 2 * tr * s.ow),
                                        out_rows * s.ow,
                                    )
                                };
                                let m_row = |xi: usize| {
                                    let start = (xi * sub + c) * tiles + r * tw;
                                    &m[start..start + tw]
                                };
                                transform_output(std::array::from_fn(m_row), b, dst, s.ow);
                            }
                        }
                    }
                }
                // what this call did not use of the thread's buffers (grown for a larger
                // one) goes back to the system
                host::release_tail(u, u_len);
                host::release_tail(m, m_len);
                host::release_tail(own_v, v_len);
            });
        });
        let used = if shared { panels * panel_len } else { 0 };
        host::release_tail(shared_buf, used);
    });
}

/// What [`conv3x3`] applies to each input element as it reads it: `x * scale + shift` with the
/// `(scale, shift)` of the element's (image, channel), then SiLU where `silu`. A GroupNorm (and
/// its activation) folded into the convolution, so that the normalised input is never stored:
/// the result is bit for bit that of the convolution of the input normalised by
/// [`super::elementwise`]'s GroupNorm, which computes each element the same way.
#[derive(Clone, Copy, Debug)]
pub(super) struct Prologue<'a> {
    /// `[batch * in]`, image-major.
    pub(super) scale_shift: &'a [(f32, f32)],
    /// SiLU after the affine.
    pub(super) silu: bool,
}

/// The 16 GEMMs of one panel and round: `m[ξ] = u[ξ] v[ξ]` for each position ξ, `u` being
/// `[16, sub, cin]`, `v` `[16, cin, tiles]` and `m` `[16, sub, tiles]`, all row-major.
fn panel_gemms(u: &[f32], v: &[f32], m: &mut [f32], [sub, cin, tiles]: [usize; 3]) {
    assert_eq!(u.len(), 16 * sub * cin);
    assert_eq!(v.len(), 16 * cin * tiles);
    assert_eq!(m.len(), 16 * sub * tiles);
    for xi in 0..16 {
        let lhs = &u[xi * sub * cin..(xi + 1) * sub * cin];
        let rhs = &v[xi * cin * tiles..(xi + 1) * cin * tiles];
        let dst = &mut m[xi * sub * tiles..(xi + 1) * sub * tiles];
        // SAFETY: dst is [sub, tiles], lhs [sub, cin] and rhs [cin, tiles], all row-major and
        // of exactly those lengths; dst aliases neither.
        unsafe {
            super::host::gemm_rows(
                (dst.as_mut_ptr(), tiles),
                false,
                (lhs.as_ptr(), cin),
                (rhs.as_ptr(), tiles),
                [sub, cin, tiles],
            )
        };
    }
}

/// Filters transformed per step of [`transform_filters`]: one AVX-512 register's lanes.
const FILTER_LANES: usize = 16;

vectorised! {
    /// The filters of a block of output channels (`weight`: `[channels, in, 3, 3]`) as `U = G g
    /// G^T` for every (out, in) pair, into `u` laid out `[16, channels, in]`, so that each
    /// position's `[channels, in]` matrix is a GEMM's left operand as it stands.
    ///
    /// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`: `G g` over the filter's
    /// columns, then `(G g) G^T` over its rows, each a sum of at most three terms (the halving
    /// is exact). [`FILTER_LANES`] pairs at a time, their nine taps gathered into one vector
    /// each, so that each of the 16 values is stored as a run of consecutive pairs of its
    /// plane. (This was one GEMM of the `[pairs, 9]` filters by `(G ⊗ G)^T`, with `k = 9`:
    /// about 7% of the SD 1.5 UNet's forward at 512 px on the 2-core Xeon, as much as 15 ms of
    /// a 45 ms convolution at 16x16 pixels.)
    fn transform_filters(weight: &[f32], u: &mut [f32]) {
        let pairs = weight.len() / 9;
        assert_eq!(weight.len(), 9 * pairs);
        assert_eq!(u.len(), 16 * pairs);
        let full = pairs / FILTER_LANES * FILTER_LANES;
        for p0 in (0..full).step_by(FILTER_LANES) {
            let w = &weight[9 * p0..9 * (p0 + FILTER_LANES)];
            let mut g = [[0f32; FILTER_LANES]; 9];
            for (lane, taps) in w.chunks_exact(9).enumerate() {
                for (tap, &value) in taps.iter().enumerate() {
                    g[tap][lane] = value;
                }
            }
            let mut t = [[0f32; FILTER_LANES]; 16];
            filter_tile(&g, &mut t);
            for (xi, values) in t.iter().enumerate() {
                u[xi * pairs + p0..xi * pairs + p0 + FILTER_LANES].copy_from_slice(values);
            }
        }
        for p in full..pairs {
            let mut g = [[0f32; 1]; 9];
            for (tap, value) in g.iter_mut().enumerate() {
                *value = [weight[9 * p + tap]];
            }
            let mut t = [[0f32; 1]; 16];
            filter_tile(&g, &mut t);
            for (xi, [value]) in t.into_iter().enumerate() {
                u[xi * pairs + p] = value;
            }
        }
    }
}

/// `G g G^T` of `L` filters at once into `u`: `g[3 a + b][lane]` is tap `(a, b)` of filter
/// `lane`, `u[4 i + j][lane]` position `(i, j)` of its transformed tile.
#[inline(always)]
fn filter_tile<const L: usize>(g: &[[f32; L]; 9], u: &mut [[f32; L]; 16]) {
    // G applied to three values: [x0, (x0 + x1 + x2) / 2, (x0 - x1 + x2) / 2, x2]
    #[inline(always)]
    fn spread<const L: usize>(x: [&[f32; L]; 3], out: [&mut [f32; L]; 4]) {
        let [x0, x1, x2] = x;
        let [o0, o1, o2, o3] = out;
        for l in 0..L {
            let outer = x0[l] + x2[l];
            o0[l] = x0[l];
            o1[l] = 0.5 * (outer + x1[l]);
            o2[l] = 0.5 * (outer - x1[l]);
            o3[l] = x2[l];
        }
    }
    // over each column b of the filter: t[i][b] = (G g)[i][b], stored at t[3 i + b]
    let mut t = [[0f32; L]; 12];
    for b in 0..3 {
        let [t0, t1, t2, t3] = t.get_disjoint_mut([b, 3 + b, 6 + b, 9 + b]).unwrap();
        spread([&g[b], &g[3 + b], &g[6 + b]], [t0, t1, t2, t3]);
    }
    // over each row i: u[4 i + j] = (t G^T)[i][j]
    for (i, row) in u.chunks_exact_mut(4).enumerate() {
        let [u0, u1, u2, u3] = row else {
            unreachable!()
        };
        spread([&t[3 * i], &t[3 * i + 1], &t[3 * i + 2]], [u0, u1, u2, u3]);
    }
}

vectorised! {
    /// `V = B^T d B` of input channels `channels` for the tiles of tile rows `row0..row0 +
    /// rows` of the batch `x` (`[batch, in, h, w]`; the tile rows of all images one after the
    /// other), into their rows of `v` (`[16, in, rows * tw]`); the patches outside the image
    /// read zeros (the padding), and the `prologue`, if any, applies to the image's elements
    /// as each row is read (not to the padding).
    ///
    /// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`. Each input row under a
    /// tile row is split into its even and odd columns (of the padded image), so that both
    /// passes of the transform run on contiguous lanes.
    ///
    /// # Safety
    /// `v` points to `16 * in * rows * tw` writable f32s, of which no one else reads or writes
    /// the rows of `channels` (`v[ξ][c]` for every ξ and `c` in `channels`) during the call.
    // one argument per thing the transform reads, as the kernel's callers have them
    #[allow(clippy::too_many_arguments)]
    unsafe fn transform_input<'p>(
        x: &[f32],
        s: &ConvShape,
        prologue: Option<Prologue<'p>>,
        row0: usize,
        rows: usize,
        channels: std::ops::Range<usize>,
        v: *mut f32,
    ) {
        let [[top, _], [left, _]] = s.options.padding;
        let (cin, h, w) = (s.cin, s.h, s.w);
        let (th, tw) = (s.oh.div_ceil(2), s.ow.div_ceil(2));
        let tiles = rows * tw;
        assert!(channels.end <= cin);
        // [row k of the patch][even, odd][tw + 1 lanes]
        let n = tw + 1;
        let mut d = vec![0f32; 8 * n];
        let mut e = vec![0f32; 8 * n];
        // the prologue's output, one input row
        let mut applied = vec![0f32; if prologue.is_some() { w } else { 0 }];
        // channel by channel, so that each plane's rows are read in order
        for ci in channels {
            for r in 0..rows {
                let (image, tr) = ((row0 + r) / th, (row0 + r) % th);
                let plane = &x[(image * cin + ci) * h * w..(image * cin + ci + 1) * h * w];
                for (k, lanes) in d.chunks_exact_mut(2 * n).enumerate() {
                    let (even, odd) = lanes.split_at_mut(n);
                    let y = 2 * tr + k;
                    if y < top || y - top >= h {
                        even.fill(0.0);
                        odd.fill(0.0);
                    } else {
                        let src = &plane[(y - top) * w..(y - top + 1) * w];
                        let src = match prologue {
                            Some(p) => {
                                let (scale, shift) = p.scale_shift[image * cin + ci];
                                super::elementwise::scale_shift(
                                    src,
                                    scale,
                                    shift,
                                    p.silu,
                                    &mut applied,
                                );
                                &applied[..]
                            }
                            None => src,
                        };
                        split_columns(src, left, even, odd);
                    }
                }
                let (d0, rest) = d.split_at(2 * n);
                let (d1, rest) = rest.split_at(2 * n);
                let (d2, d3) = rest.split_at(2 * n);
                let (e0, rest) = e.split_at_mut(2 * n);
                let (e1, rest) = rest.split_at_mut(2 * n);
                let (e2, e3) = rest.split_at_mut(2 * n);
                for c in 0..2 * n {
                    e0[c] = d0[c] - d2[c];
                    e1[c] = d1[c] + d2[c];
                    e2[c] = d2[c] - d1[c];
                    e3[c] = d1[c] - d3[c];
                }
                for (i, ei) in e.chunks_exact(2 * n).enumerate() {
                    let (even, odd) = ei.split_at(n);
                    let at = |j: usize| ((i * 4 + j) * cin + ci) * tiles + r * tw;
                    // SAFETY: row (ξ, ci) of `v`, columns r tw .. (r + 1) tw: in bounds and
                    // this call's (see # Safety).
                    let v0 = unsafe { std::slice::from_raw_parts_mut(v.add(at(0)), tw) };
                    for t in 0..tw {
                        v0[t] = even[t] - even[t + 1];
                    }
                    // SAFETY: row (ξ, ci) of `v`, columns r tw .. (r + 1) tw: in bounds and
                    // this call's (see # Safety).
                    let v1 = unsafe { std::slice::from_raw_parts_mut(v.add(at(1)), tw) };
                    for t in 0..tw {
                        v1[t] = odd[t] + even[t + 1];
                    }
                    // SAFETY: row (ξ, ci) of `v`, columns r tw .. (r + 1) tw: in bounds and
                    // this call's (see # Safety).
                    let v2 = unsafe { std::slice::from_raw_parts_mut(v.add(at(2)), tw) };
                    for t in 0..tw {
                        v2[t] = even[t + 1] - odd[t];
                    }
                    // SAFETY: row (ξ, ci) of `v`, columns r tw .. (r + 1) tw: in bounds and
                    // this call's (see # Safety).
                    let v3 = unsafe { std::slice::from_raw_parts_mut(v.add(at(3)), tw) };
                    for t in 0..tw {
                        v3[t] = odd[t] - odd[t + 1];
                    }
                }
            }
        }
    }

    /// `Y = A^T M A + bias` for one row of `tw` tiles of one channel, `m[ξ]` holding position ξ
    /// of each, written into `out`: the one or two output rows (`ow` wide) these tiles cover,
    /// the last tile clipped to the image.
    ///
    /// `A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]`.
    fn transform_output(m: [&[f32]; 16], bias: f32, out: &mut [f32], ow: usize) {
        let tw = m[0].len();
        let (top, bottom) = out.split_at_mut(ow.min(out.len()));
        // full tiles, then the last one when ow is odd
        let full = ow / 2;
        for t in 0..full.min(tw) {
            let [y00, y01, y10, y11] = tile_output(&m, t, bias);
            top[2 * t] = y00;
            top[2 * t + 1] = y01;
            if !bottom.is_empty() {
                bottom[2 * t] = y10;
                bottom[2 * t + 1] = y11;
            }
        }
        if ow % 2 == 1 && full < tw {
            let [y00, _, y10, _] = tile_output(&m, full, bias);
            top[2 * full] = y00;
            if !bottom.is_empty() {
                bottom[2 * full] = y10;
            }
        }
    }
}

/// The input's even and odd columns, as the padded image has them (column `c` of the padded
/// row is `src[c - left]`, or 0 outside it): `even[t]` is column `2 t`, `odd[t]` column `2 t + 1`.
#[inline(always)]
fn split_columns(src: &[f32], left: usize, even: &mut [f32], odd: &mut [f32]) {
    let n = even.len();
    let get = |c: usize| {
        c.checked_sub(left)
            .and_then(|c| src.get(c))
            .copied()
            .unwrap_or(0.0)
    };
    // lanes whose two columns are both inside the row: 2 t >= left and 2 t + 1 - left < w
    let lo = left.div_ceil(2).min(n);
    let hi = ((src.len() + left) / 2).clamp(lo, n);
    for t in (0..lo).chain(hi..n) {
        even[t] = get(2 * t);
        odd[t] = get(2 * t + 1);
    }
    if hi > lo {
        let pairs = &src[2 * lo - left..2 * hi - left];
        for ((e, o), pair) in even[lo..hi]
            .iter_mut()
            .zip(&mut odd[lo..hi])
            .zip(pairs.chunks_exact(2))
        {
            *e = pair[0];
            *o = pair[1];
        }
    }
}

/// The 2x2 outputs `[y00, y01, y10, y11]` of tile `t`: `A^T M A + bias`.
#[inline(always)]
fn tile_output(m: &[&[f32]; 16], t: usize, bias: f32) -> [f32; 4] {
    // A^T over the rows, then over the columns
    let mut q = [[0f32; 4]; 2];
    for j in 0..4 {
        let (m0, m1, m2, m3) = (m[j][t], m[4 + j][t], m[8 + j][t], m[12 + j][t]);
        q[0][j] = m0 + m1 + m2;
        q[1][j] = m1 - m2 - m3;
    }
    [
        bias + (q[0][0] + q[0][1] + q[0][2]),
        bias + (q[0][1] - q[0][2] - q[0][3]),
        bias + (q[1][0] + q[1][1] + q[1][2]),
        bias + (q[1][1] - q[1][2] - q[1][3]),
    ]
}

#[cfg(test)]
mod tests {
    use super::super::conv::{Conv2dAlgorithm, Conv2dOptions, conv2d_with};
    use crate::reference::{RoundingRatio, seeded_normal};
    use burn::tensor::module::conv2d as burn_conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Device, Tensor};

    fn options([t, b, l, r]: [usize; 4]) -> Conv2dOptions {
        Conv2dOptions {
            stride: [1, 1],
            padding: [[t, b], [l, r]],
            dilation: [1, 1],
        }
    }

    fn values<const D: usize>(t: &Tensor<D>) -> Vec<f32> {
        t.to_data().try_into_vec::<f32>().unwrap()
    }

    /// The convolution in f64 from the same f32 inputs.
    fn exact(x: &Tensor<4>, w: &Tensor<4>, b: &Tensor<1>, o: Conv2dOptions) -> Vec<f64> {
        let ([n, cin, h, wd], [cout, _, _, _]) = (x.dims(), w.dims());
        let (xs, ws, bs) = (values(x), values(w), values(b));
        let [[t, bo], [l, r]] = o.padding;
        let (oh, ow) = (h + t + bo - 2, wd + l + r - 2);
        let mut out = vec![0f64; n * cout * oh * ow];
        for img in 0..n {
            for co in 0..cout {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut acc = bs[co] as f64;
                        for ci in 0..cin {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (iy, ix) = (
                                        (y + i) as isize - t as isize,
                                        (xx + j) as isize - l as isize,
                                    );
                                    if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                        continue;
                                    }
                                    let xv =
                                        xs[((img * cin + ci) * h + iy as usize) * wd + ix as usize];
                                    let wv = ws[((co * cin + ci) * 3 + i) * 3 + j];
                                    acc += xv as f64 * wv as f64;
                                }
                            }
                        }
                        out[((img * cout + co) * oh + y) * ow + xx] = acc;
                    }
                }
            }
        }
        out
    }

    /// Against burn's conv2d within 1e-5 relative for each draw, and for each case Winograd's
    /// error to the exact result within 4 times im2col's ([`RoundingRatio`], pooled over
    /// seeded draws). Over 60 other sets of draws (2026-12-07, Ice Lake, with AVX-512 and with
    /// it hidden) the worst ratio of any case was 2.09 (the 3x3 input's), where the worst error
    /// of one draw of its 6 outputs, the check before, reached 4.2 times im2col's in 200 draws.
    /// Cases: odd and even sizes (tiles clipped at the right and bottom), padding 1 (SD's),
    /// none, asymmetric and 2, one row or column of output, several panels and channel blocks,
    /// with and without a bias.
    #[test]
    fn matches_burns_conv2d_and_the_exact_result() {
        let device = Device::flex();
        for (case, (x, cout, padding, with_bias)) in [
            ([2, 5, 9, 7], 6, [1; 4], true),
            ([1, 8, 10, 11], 4, [0; 4], true),
            ([1, 3, 6, 5], 130, [0, 1, 2, 0], false),
            ([1, 4, 3, 8], 3, [2; 4], true),
            ([3, 6, 3, 3], 2, [0; 4], true),
            ([1, 300, 33, 35], 140, [1; 4], true),
            ([2, 64, 16, 16], 192, [1; 4], true),
        ]
        .into_iter()
        .enumerate()
        {
            let o = options(padding);
            let [t, b, l, r] = padding;
            let outputs = x[0] * cout * (x[2] + t + b - 2) * (x[3] + l + r - 2);
            let mut rounding = RoundingRatio::default();
            for draw in 0..RoundingRatio::draws(outputs) {
                let seed = 1000 * (100 * case + draw) as u64;
                let xt = seeded_normal(x, seed, &device);
                let wt = seeded_normal([cout, x[1], 3, 3], seed + 1, &device);
                let bias = seeded_normal([cout], seed + 2, &device);
                let bias = if with_bias { bias } else { bias.zeros_like() };
                let ours =
                    conv2d_with(&xt, &wt, Some(&bias), o, Conv2dAlgorithm::Winograd).unwrap();
                let reference = burn_conv2d(
                    xt.clone(),
                    wt.clone(),
                    Some(bias.clone()),
                    ConvOptions::new_with_padding([1, 1], [(t, b), (l, r)], [1, 1], 1),
                );
                assert_eq!(ours.dims(), reference.dims(), "{x:?} {padding:?}");
                let relative = crate::reference::max_relative_error(&ours, &reference);
                assert!(relative < 1e-5, "{x:?} {padding:?}: {relative:e}");
                let exact = exact(&xt, &wt, &bias, o);
                let im2col =
                    conv2d_with(&xt, &wt, Some(&bias), o, Conv2dAlgorithm::Im2col).unwrap();
                rounding.add(&ours, &im2col, &exact);
            }
            let ratio = rounding.ratio();
            assert!(
                ratio < 4.0,
                "case {case}: Winograd's error {ratio:.2} times im2col's"
            );
        }
    }

    /// Both ways of splitting the work, at sizes with several panels, runs of panels, channel
    /// blocks and rounds of filters: against the im2col kernel within 1e-5 relative (the small
    /// cases above check both against burn and the exact result).
    #[test]
    fn every_split_matches_im2col() {
        let device = Device::flex();
        for (x, cout) in [
            // 12 panels, each task's own input: runs of two panels, two rounds of 105 channels
            ([2, 1280, 48, 48], 210),
            // two panels, shared input: eight blocks of 129 channels, two rounds each
            ([2, 2048, 16, 16], 1032),
            // eight panels, shared input (the filters 1.1 times the input): two blocks of 80
            // channels, each in runs of two panels
            ([8, 2048, 16, 16], 160),
        ] {
            let xt = seeded_normal(x, 1, &device);
            let wt = seeded_normal([cout, x[1], 3, 3], 2, &device);
            let bt = seeded_normal([cout], 3, &device);
            let run = |algorithm| conv2d_with(&xt, &wt, Some(&bt), options([1; 4]), algorithm);
            let ours = run(Conv2dAlgorithm::Winograd).unwrap();
            let im2col = run(Conv2dAlgorithm::Im2col).unwrap();
            let relative = crate::reference::max_relative_error(&ours, &im2col);
            assert!(relative < 1e-5, "{x:?} -> {cout}: {relative:e}");
        }
    }

    #[test]
    fn thread_count_does_not_change_the_result() {
        let device = Device::flex();
        // one panel (shared input), then five (each task's own)
        for (x, cout) in [([2, 64, 24, 23], 160), ([130, 256, 8, 8], 8)] {
            let x = seeded_normal(x, 1, &device);
            let w = seeded_normal([cout, x.dims()[1], 3, 3], 2, &device);
            let b = seeded_normal([cout], 3, &device);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let out = pool.install(|| {
                    conv2d_with(&x, &w, Some(&b), options([1; 4]), Conv2dAlgorithm::Winograd)
                        .unwrap()
                });
                values(&out)
            };
            assert_eq!(run(1), run(3));
        }
    }

    /// `Auto` takes Winograd's algorithm from 8x8 output pixels (10x10 on Intel's AVX-512
    /// cores) and two such images up, and im2col below: bit for bit the result of the
    /// algorithm it should pick.
    #[test]
    fn auto_picks_winograd_from_8_pixels_up() {
        if std::env::var_os("KILN_CONV").is_some() {
            return; // the diagnostic override changes what Auto means
        }
        let device = Device::flex();
        let wide = super::full_width_fma();
        // input, then whether Winograd: elsewhere, on full-width AVX-512
        for (x, [elsewhere, on_wide]) in [
            ([2, 8, 8, 8], [true, false]),
            ([1, 8, 16, 8], [true, true]),
            ([4, 8, 8, 8], [true, false]),
            ([2, 8, 10, 10], [true, true]),
            ([2, 8, 10, 8], [true, false]),
            ([1, 8, 10, 10], [false, false]),
            ([1, 8, 8, 8], [false, false]),
            ([2, 8, 6, 8], [false, false]),
            ([8, 8, 4, 4], [false, false]),
        ] {
            let winograd = if wide { on_wide } else { elsewhere };
            let xt = seeded_normal(x, 1, &device);
            let wt = seeded_normal([4, 8, 3, 3], 2, &device);
            let run = |algorithm| {
                values(&conv2d_with(&xt, &wt, None, options([1; 4]), algorithm).unwrap())
            };
            let expected = if winograd {
                Conv2dAlgorithm::Winograd
            } else {
                Conv2dAlgorithm::Im2col
            };
            assert_eq!(run(Conv2dAlgorithm::Auto), run(expected), "{x:?}");
            assert_ne!(
                run(Conv2dAlgorithm::Winograd),
                run(Conv2dAlgorithm::Im2col),
                "{x:?}"
            );
        }
    }
}
