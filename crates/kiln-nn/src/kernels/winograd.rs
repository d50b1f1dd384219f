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
//! channels, group of panels). For each round of its channels a task transforms their filters
//! into its thread's `U` buffer, then for each of its panels transforms the input into `V`, runs
//! the 16 GEMMs single-threaded into `M` and transforms `M` into the output, adding the bias.
//! Nothing is kept between calls but the thread buffers: keeping the transformed filters would
//! hold 16/9 of every layer's weights more.
//!
//! [`conv2d`](super::conv2d) takes this path from 16x16 output pixels up ([`pays`]); PyTorch's
//! CPU convolutions run oneDNN's direct algorithm.

use rayon::prelude::*;
use std::cell::RefCell;

use super::conv::{ConvShape, MIN_CHANNELS, MIN_TASKS};
use super::host::{Float, SharedMut, grow};

/// Output tiles per image (16x16 output pixels), and over the batch (two such images), below
/// which [`pays`] declines. Measured on the 2-core Xeon (`cargo run --release -p kiln-nn
/// --example conv_algorithms`, the two algorithms alternating, three runs): Winograd 1.3-2.1x
/// faster than im2col panels at 64x64 pixels and above (the SD UNet's first level, the VAE's),
/// 1.04-1.5x at 32x32 and 16x16 (640 and 1280 channels, batch 2), 0.5-0.8x at 8x8, where the
/// rows of tiles are short and the filters large against the image.
const MIN_IMAGE_TILES: usize = 64;
const MIN_BATCH_TILES: usize = 128;

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

/// Whether it is the faster algorithm for `s` (see [`MIN_IMAGE_TILES`]).
pub(super) fn pays(s: &ConvShape) -> bool {
    let tiles = s.oh.div_ceil(2) * s.ow.div_ceil(2);
    tiles >= MIN_IMAGE_TILES && s.batch * tiles >= MIN_BATCH_TILES
}

thread_local! {
    /// Each thread's transformed input `V` (`[16, in, tiles]`), transformed filters `U`
    /// (`[16, channels, in]`), GEMM results `M` (`[16, channels, tiles]`) and widened (bf16 or
    /// f16) filters, kept between calls so that they are not faulted in again.
    static BUFFERS: RefCell<[Vec<f32>; 4]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

/// The convolution `s` (see [`applies`]) on host slices: `out` (`[batch, out, oh, ow]`) is
/// overwritten.
///
/// The tile rows of all the images, one after the other, are cut into panels (so that at the
/// deep levels, a few tile rows per image, one panel serves the whole batch). A task takes a
/// block of output channels and a group of consecutive panels; for each sub-block of its
/// channels it transforms their filters once, then runs each of its panels: the panel's input
/// transform (again for each sub-block, which [`MAX_SUB_CHANNELS`] keeps few), the 16 GEMMs
/// and the output transform.
pub(super) fn conv3x3<W: Float>(
    x: &[f32],
    weight: &[W],
    bias: Option<&[f32]>,
    s: &ConvShape,
    out: &mut [f32],
) {
    debug_assert!(applies(s));
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
    let blocks = MIN_TASKS.div_ceil(panels).min(cout / MIN_CHANNELS).max(1);
    let channels = cout.div_ceil(blocks);
    let blocks = cout.div_ceil(channels);
    let groups = MIN_TASKS.div_ceil(blocks).min(panels);
    let group_panels = panels.div_ceil(groups);
    let groups = panels.div_ceil(group_panels);
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..groups * blocks).into_par_iter().for_each(|task| {
        let (group, block) = (task / blocks, task % blocks);
        let first_panel = group * group_panels;
        let group_panels = group_panels.min(panels - first_panel);
        let c0 = block * channels;
        let channels = channels.min(cout - c0);
        let most = (FILTER_BUDGET / (16 * cin)).clamp(MIN_CHANNELS, MAX_SUB_CHANNELS);
        // rounds as even as possible
        let sub = channels.div_ceil(channels.div_ceil(most));
        BUFFERS.with_borrow_mut(|[v, u, m, wide]| {
            grow(v, 16 * cin * tile_rows * tw);
            grow(u, 16 * sub * cin);
            grow(m, 16 * sub * tile_rows * tw);
            // a task of one panel (the deep levels) transforms its input once, before the
            // rounds; a task of several transforms each panel's input in every round
            let one_panel = group_panels == 1;
            let panel_rows = |panel: usize| {
                let row0 = panel * tile_rows;
                (row0, tile_rows.min(all_rows - row0))
            };
            if one_panel {
                let (row0, rows) = panel_rows(first_panel);
                transform_input(x, s, row0, rows, &mut v[..16 * cin * rows * tw]);
            }
            for sc in (c0..c0 + channels).step_by(sub) {
                let sub = sub.min(c0 + channels - sc);
                let u = &mut u[..16 * sub * cin];
                let g = W::widen(&weight[sc * cin * 9..(sc + sub) * cin * 9], wide);
                transform_filters(g, cin, u);
                for panel in first_panel..first_panel + group_panels {
                    let (row0, rows) = panel_rows(panel);
                    let tiles = rows * tw;
                    let v = &mut v[..16 * cin * tiles];
                    let m = &mut m[..16 * sub * tiles];
                    if !one_panel {
                        transform_input(x, s, row0, rows, v);
                    }
                    for xi in 0..16 {
                        let lhs = &u[xi * sub * cin..(xi + 1) * sub * cin];
                        let rhs = &v[xi * cin * tiles..(xi + 1) * cin * tiles];
                        let dst = &mut m[xi * sub * tiles..(xi + 1) * sub * tiles];
                        // SAFETY: dst is [sub, tiles], lhs [sub, cin] and rhs [cin, tiles],
                        // all row-major and of exactly those lengths; dst aliases neither.
                        unsafe {
                            gemm::gemm(
                                sub,
                                tiles,
                                cin,
                                dst.as_mut_ptr(),
                                1,
                                tiles as isize,
                                false,
                                lhs.as_ptr(),
                                1,
                                cin as isize,
                                rhs.as_ptr(),
                                1,
                                tiles as isize,
                                0.0,
                                1.0,
                                false,
                                false,
                                false,
                                gemm::Parallelism::None,
                            );
                        }
                    }
                    for c in 0..sub {
                        let co = sc + c;
                        let b = bias.map_or(0.0, |b| b[co]);
                        for r in 0..rows {
                            let (image, tr) = ((row0 + r) / th, (row0 + r) % th);
                            let out_rows = 2.min(s.oh - 2 * tr);
                            // SAFETY: output rows 2 tr .. 2 tr + out_rows of channel co of
                            // image `image`: inside `out`, and this task's (its tile rows, its
                            // channels) only.
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
        });
    });
}

/// The filters of a block of output channels (`weight`: `[channels, in, 3, 3]`) as `U = G g
/// G^T` for every (out, in) pair, into `u` laid out `[16, channels, in]`, so that each
/// position's `[channels, in]` matrix is a GEMM's left operand as it stands.
///
/// `G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]`, and `vec(U) = (G ⊗ G)
/// vec(g)`: one GEMM of the `[pairs, 9]` filters by the `[9, 16]` matrix `(G ⊗ G)^T`, written
/// with a column stride of one position's plane (gemm's kernels do the gathering and the
/// scattering that a loop over the pairs would do one scalar at a time).
fn transform_filters(weight: &[f32], cin: usize, u: &mut [f32]) {
    const G: [[f32; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    let pairs = weight.len() / 9;
    assert_eq!(pairs % cin, 0);
    assert_eq!(u.len(), 16 * pairs);
    // (G ⊗ G)^T: row (a, b) of the filter, column (i, j) of the transformed tile
    let mut kron = [0f32; 9 * 16];
    for (ab, row) in kron.chunks_exact_mut(16).enumerate() {
        for (ij, value) in row.iter_mut().enumerate() {
            *value = G[ij / 4][ab / 3] * G[ij % 4][ab % 3];
        }
    }
    // SAFETY: dst is u as [pairs, 16] with row stride 1 and column stride `pairs` (its 16
    // planes), lhs the weights as [pairs, 9] row-major, rhs kron as [9, 16] row-major: the
    // lengths are checked above, and dst aliases neither.
    unsafe {
        gemm::gemm(
            pairs,
            16,
            9,
            u.as_mut_ptr(),
            pairs as isize,
            1,
            false,
            weight.as_ptr(),
            1,
            9,
            kron.as_ptr(),
            1,
            16,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

vectorised! {
    /// `V = B^T d B` for the tiles of tile rows `row0..row0 + rows` of the batch `x` (`[batch,
    /// in, h, w]`; the tile rows of all images one after the other), into `v` (`[16, in, rows *
    /// tw]`); the patches outside the image read zeros (the padding).
    ///
    /// `B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]`. Each input row under a
    /// tile row is split into its even and odd columns (of the padded image), so that both
    /// passes of the transform run on contiguous lanes.
    fn transform_input(x: &[f32], s: &ConvShape, row0: usize, rows: usize, v: &mut [f32]) {
        let [[top, _], [left, _]] = s.options.padding;
        let (cin, h, w) = (s.cin, s.h, s.w);
        let (th, tw) = (s.oh.div_ceil(2), s.ow.div_ceil(2));
        let tiles = rows * tw;
        assert_eq!(v.len(), 16 * cin * tiles);
        // [row k of the patch][even, odd][tw + 1 lanes]
        let n = tw + 1;
        let mut d = vec![0f32; 8 * n];
        let mut e = vec![0f32; 8 * n];
        // channel by channel, so that each plane's rows are read in order
        for ci in 0..cin {
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
                    let v0 = &mut v[at(0)..at(0) + tw];
                    for t in 0..tw {
                        v0[t] = even[t] - even[t + 1];
                    }
                    let v1 = &mut v[at(1)..at(1) + tw];
                    for t in 0..tw {
                        v1[t] = odd[t] + even[t + 1];
                    }
                    let v2 = &mut v[at(2)..at(2) + tw];
                    for t in 0..tw {
                        v2[t] = even[t + 1] - odd[t];
                    }
                    let v3 = &mut v[at(3)..at(3) + tw];
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
    use burn::tensor::module::conv2d as burn_conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Device, Distribution, Tensor};

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

    /// The largest error against `exact`, relative to its largest magnitude.
    fn error(ours: &Tensor<4>, exact: &[f64]) -> f64 {
        let ours = values(ours);
        let scale = exact.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = ours
            .iter()
            .zip(exact)
            .fold(0f64, |m, (&a, &e)| m.max((a as f64 - e).abs()));
        worst / scale
    }

    /// Against burn's conv2d within 1e-5 relative and against an f64 reference within a small
    /// multiple of the im2col kernel's own error: odd and even sizes (tiles clipped at the
    /// right and bottom), padding 1 (SD's), none, asymmetric and 2, one row or column of output,
    /// several panels and channel blocks, with and without a bias.
    #[test]
    fn matches_burns_conv2d_and_the_exact_result() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        for (x, cout, padding, bias) in [
            ([2, 5, 9, 7], 6, [1; 4], true),
            ([1, 8, 10, 11], 4, [0; 4], true),
            ([1, 3, 6, 5], 130, [0, 1, 2, 0], false),
            ([1, 4, 3, 8], 3, [2; 4], true),
            ([3, 6, 3, 3], 2, [0; 4], true),
            ([1, 300, 33, 35], 140, [1; 4], true),
            ([2, 64, 16, 16], 192, [1; 4], true),
        ] {
            let xt = Tensor::<4>::random(x, normal, &device);
            let wt = Tensor::<4>::random([cout, x[1], 3, 3], normal, &device);
            let bt = Tensor::<1>::random([cout], normal, &device);
            let bias = if bias { bt.clone() } else { bt.zeros_like() };
            let o = options(padding);
            let ours = conv2d_with(&xt, &wt, Some(&bias), o, Conv2dAlgorithm::Winograd).unwrap();
            let reference = burn_conv2d(
                xt.clone(),
                wt.clone(),
                Some(bias.clone()),
                ConvOptions::new_with_padding(
                    [1, 1],
                    [(padding[0], padding[1]), (padding[2], padding[3])],
                    [1, 1],
                    1,
                ),
            );
            assert_eq!(ours.dims(), reference.dims(), "{x:?} {padding:?}");
            let relative = crate::reference::max_relative_error(&ours, &reference);
            assert!(relative < 1e-5, "{x:?} {padding:?}: {relative:e}");
            let exact = exact(&xt, &wt, &bias, o);
            let im2col = conv2d_with(&xt, &wt, Some(&bias), o, Conv2dAlgorithm::Im2col).unwrap();
            let (ours, direct) = (error(&ours, &exact), error(&im2col, &exact));
            assert!(
                ours < 4.0 * direct.max(f32::EPSILON as f64),
                "{x:?} {padding:?}: Winograd {ours:e}, im2col {direct:e}"
            );
        }
    }

    #[test]
    fn thread_count_does_not_change_the_result() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<4>::random([2, 64, 24, 23], normal, &device);
        let w = Tensor::<4>::random([160, 64, 3, 3], normal, &device);
        let b = Tensor::<1>::random([160], normal, &device);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let out = pool.install(|| {
                conv2d_with(&x, &w, Some(&b), options([1; 4]), Conv2dAlgorithm::Winograd).unwrap()
            });
            values(&out)
        };
        assert_eq!(run(1), run(3));
    }

    /// `Auto` takes Winograd's algorithm from 16x16 output pixels (and two such images) up and
    /// im2col below: bit for bit the result of the algorithm it should pick.
    #[test]
    fn auto_picks_winograd_from_16_pixels_up() {
        if std::env::var_os("KILN_CONV").is_some() {
            return; // the diagnostic override changes what Auto means
        }
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        for (x, winograd) in [
            ([2, 8, 16, 16], true),
            ([1, 8, 32, 16], true),
            ([1, 8, 16, 16], false),
            ([2, 8, 14, 16], false),
            ([4, 8, 8, 8], false),
        ] {
            let xt = Tensor::<4>::random(x, normal, &device);
            let wt = Tensor::<4>::random([4, 8, 3, 3], normal, &device);
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
