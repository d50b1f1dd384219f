//! Nearest-neighbour x2 upsampling followed by a 3x3 convolution with stride 1 and padding 1
//! (diffusers' `Upsample2D`, as SD's UNet and VAE decoder use it), computed without the
//! upsampled image.
//!
//! Output pixel `(2i + py, 2j + px)` reads, under the filter's three rows, upsampled rows
//! `2i + py - 1 ..= 2i + py + 1`, which are input rows `i - 1, i, i` for `py = 0` and `i, i, i + 1`
//! for `py = 1`: two of the three land on the same input row, and likewise for the columns. So
//! each of the four phases `(py, px)` of the output is a 2x2 convolution of the input itself,
//! whose filter sums the taps that land together: rows `(w0, w1 + w2)` for `py = 0`,
//! `(w0 + w1, w2)` for `py = 1`, the same for the columns. That is 16 multiplications per input
//! pixel and channel pair where the convolution of the upsampled image takes 4 x 9 = 36 (the
//! saving of Winograd's F(2x2, 3x3) there, without its transforms), and the upsampled image,
//! four times the input, is never made: at the SD VAE decoder's last upsampler (256 channels at
//! 512x512 for a 512 px image) that is 256 MiB less at the decode's peak. The summed taps are
//! rounded once, as Winograd's transformed filters are.
//!
//! The work is cut by the shapes only, so that the result does not depend on the thread count:
//! tasks of (block of output channels, run of panels of input rows). A task sums its block's
//! taps for the four phases once, then for each of its panels gathers each phase's 2x2
//! patches (as the im2col kernel of [`super::conv`] does) and multiplies them into its
//! thread's buffer, and writes the four products interleaved, with the bias, into its rows of
//! the output.

use burn::tensor::Tensor;
use std::cell::RefCell;

use rayon::prelude::*;

use super::conv::{
    Conv2dOptions, ConvShape, MIN_CHANNELS, MIN_COLS, MIN_TASKS, PANEL_BUDGET, host_weights, im2col,
};
use super::host::{self, HostF32, SharedMut, grow};

thread_local! {
    /// Each thread's column panel, summed filter taps (`[channels, in * 4]`) and four products
    /// (`[4, channels, pixels]`), kept between calls so that they are not faulted in again.
    static BUFFERS: RefCell<[Vec<f32>; 3]> =
        const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

/// Input pixels per image below which [`upsample_conv2d`] declines. Measured on the 2-core Zen 3
/// (2026-12-06, `cargo run --release -p kiln-nn --example conv_algorithms`, two runs), as the
/// speedup over burn's upsampling and Kiln's Winograd convolution of the result: 1.07-1.21x at
/// 64x64 input pixels (the SD VAE decoder's first upsampler, 512 channels), 1.13-1.17x at
/// 128x128, 1.38-1.40x at 256x256 (256 channels); at 32x32 (the UNet's last, 640 channels)
/// 1.09x and 0.92x, no better; at 16x16 0.94x and at 8x8 0.44x (1280 channels), where each
/// block of output channels gathers the whole image again and the taps cost about as much to
/// sum as the products they save.
pub const UPSAMPLE_MIN_PIXELS: usize = 64 * 64;

/// `conv2d(upsample_nearest_2x(x), weight, padding 1) + bias` for plain f32 flex tensors, or
/// `None` (the caller then upsamples and convolves with the ops): another backend or dtype, an
/// autodiff tensor, a filter other than 3x3, channels that do not match, or fewer than
/// [`UPSAMPLE_MIN_PIXELS`] input pixels.
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`, `weight`: `[out, in, 3, 3]`, `bias`: `[out]`
/// - output: `[batch, out, 2 * height, 2 * width]`
pub fn upsample_conv2d(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
) -> Option<Tensor<4>> {
    let [_, _, h, w] = x.dims();
    if h * w < UPSAMPLE_MIN_PIXELS {
        return None;
    }
    upsample_conv2d_any(x, weight, bias)
}

/// [`upsample_conv2d`] at any size.
fn upsample_conv2d_any(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
) -> Option<Tensor<4>> {
    let [batch, cin, h, w] = x.dims();
    let [cout, wcin, kh, kw] = weight.dims();
    if [wcin, kh, kw] != [cin, 3, 3] || bias.is_some_and(|b| b.dims() != [cout]) {
        return None;
    }
    if [batch, cin, h, w, cout].contains(&0) {
        return None;
    }
    let x = HostF32::new(x.clone())?;
    let (weight, bias) = host_weights(weight, bias)?;
    let bias = bias.as_ref().map(HostF32::as_slice);
    let mut out = vec![0f32; batch * cout * 4 * h * w];
    upsample_conv3x3(
        x.as_slice(),
        weight.as_slice(),
        bias,
        [batch, cin, h, w, cout],
        &mut out,
    );
    Some(host::tensor(out, [batch, cout, 2 * h, 2 * w]))
}

/// The 2x2 convolution of phase `(py, px)` (see the module's doc): the input's size out, padded
/// on the side its first (`p = 0`) or second (`p = 1`) tap reaches past.
fn phase_shape([batch, cin, h, w, cout]: [usize; 5], py: usize, px: usize) -> ConvShape {
    let options = Conv2dOptions {
        stride: [1, 1],
        padding: [[1 - py, py], [1 - px, px]],
        dilation: [1, 1],
    };
    ConvShape::new([batch, cin, h, w], [cout, 2, 2], options).expect("a non-empty 2x2 convolution")
}

/// Elements of one task's summed taps for the four phases (`4 x channels x in * 4`) at most,
/// 8 MiB, unless that leaves fewer than [`MIN_CHANNELS`] channels.
const TAPS_BUDGET: usize = 1 << 21;

/// [`upsample_conv2d`] on host slices: `x` `[batch, in, h, w]`, `weight` `[out, in, 3, 3]`,
/// `out` `[batch, out, 2h, 2w]` (overwritten).
///
/// The input rows of all the images are cut into panels (within an image, of at most
/// [`PANEL_BUDGET`] gathered elements); a task takes a block of output channels and a run of
/// consecutive panels, sums its block's taps for the four phases once, then for each of its
/// panels gathers, multiplies and writes each phase.
fn upsample_conv3x3(
    x: &[f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    sizes @ [batch, cin, h, w, cout]: [usize; 5],
    out: &mut [f32],
) {
    let shapes = [0, 1, 2, 3].map(|phase| phase_shape(sizes, phase / 2, phase % 2));
    let k = cin * 4;
    let in_plane = cin * h * w;
    let out_plane = 4 * h * w;
    assert_eq!(x.len(), batch * in_plane);
    assert_eq!(weight.len(), cout * cin * 9);
    assert_eq!(out.len(), batch * cout * out_plane);
    assert!(bias.is_none_or(|b| b.len() == cout));
    // panels of input rows within each image, as even as possible
    let rows = (PANEL_BUDGET / (k * w))
        .max(MIN_COLS.div_ceil(w))
        .clamp(1, h);
    let image_panels = h.div_ceil(rows);
    let rows = h.div_ceil(image_panels);
    let panels = batch * image_panels;
    // blocks of output channels within the taps' budget, and enough tasks for the threads
    let most = (TAPS_BUDGET / (16 * cin)).max(MIN_CHANNELS);
    let blocks = cout.div_ceil(most);
    let channels = cout.div_ceil(blocks);
    let runs = MIN_TASKS.div_ceil(blocks).min(panels);
    let run_panels = panels.div_ceil(runs);
    let runs = panels.div_ceil(run_panels);
    let out_ptr = SharedMut(out.as_mut_ptr());
    (0..runs * blocks).into_par_iter().for_each(|task| {
        let (run, block) = (task / blocks, task % blocks);
        let c0 = block * channels;
        let channels = channels.min(cout - c0);
        let first = run * run_panels;
        BUFFERS.with_borrow_mut(|[panel, taps, products]| {
            let taps = grow(taps, 4 * channels * k);
            let filters = &weight[c0 * cin * 9..(c0 + channels) * cin * 9];
            for (phase, taps) in taps.chunks_exact_mut(channels * k).enumerate() {
                sum_taps(filters, phase / 2, phase % 2, taps);
            }
            let taps = &*taps;
            for p in first..(first + run_panels).min(panels) {
                let (image, row0) = (p / image_panels, p % image_panels * rows);
                let rows = rows.min(h - row0);
                let cols = rows * w;
                let x_b = &x[image * in_plane..(image + 1) * in_plane];
                let panel = grow(panel, k * cols);
                let products = grow(products, 4 * channels * cols);
                for (phase, product) in products.chunks_exact_mut(channels * cols).enumerate() {
                    im2col(x_b, &shapes[phase], row0, rows, panel);
                    let taps = &taps[phase * channels * k..(phase + 1) * channels * k];
                    // SAFETY: `product` is [channels, cols], `taps` [channels, k] and `panel`
                    // [k, cols], all row-major, of those lengths; none aliases another.
                    unsafe {
                        host::gemm_rows(
                            (product.as_mut_ptr(), cols),
                            false,
                            (taps.as_ptr(), k),
                            (panel.as_ptr(), cols),
                            [channels, k, cols],
                        )
                    };
                }
                let products = &*products;
                for c in 0..channels {
                    let b = bias.map_or(0.0, |b| b[c0 + c]);
                    // SAFETY: output rows 2 * row0 .. 2 * (row0 + rows) of channel c0 + c of
                    // image `image`: inside `out`, and this task's alone (the panels and the
                    // blocks of channels do not overlap).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out_ptr
                                .get()
                                .add((image * cout + c0 + c) * out_plane + 2 * row0 * 2 * w),
                            2 * rows * 2 * w,
                        )
                    };
                    for (r, pair) in dst.chunks_exact_mut(4 * w).enumerate() {
                        for (py, line) in pair.chunks_exact_mut(2 * w).enumerate() {
                            let at = |px: usize| {
                                let start = ((2 * py + px) * channels + c) * cols + r * w;
                                &products[start..start + w]
                            };
                            for ((o, &even), &odd) in line.chunks_exact_mut(2).zip(at(0)).zip(at(1))
                            {
                                o[0] = even + b;
                                o[1] = odd + b;
                            }
                        }
                    }
                }
            }
        });
    });
}

/// The 2x2 filters of phase `(py, px)` from 3x3 ones (`filters`: `[channels, in, 3, 3]`) into
/// `taps` (`[channels, in, 2, 2]`): the taps that land on the same input row (column) summed.
fn sum_taps(filters: &[f32], py: usize, px: usize, taps: &mut [f32]) {
    // the two input rows (columns) a phase reads and the filter rows (columns) each gathers
    let fold = |p: usize, g: [f32; 3]| -> [f32; 2] {
        if p == 0 {
            [g[0], g[1] + g[2]]
        } else {
            [g[0] + g[1], g[2]]
        }
    };
    for (g, t) in filters.chunks_exact(9).zip(taps.chunks_exact_mut(4)) {
        let rows = [0, 1, 2].map(|i| [g[3 * i], g[3 * i + 1], g[3 * i + 2]]);
        // rows folded first: [a][column]
        let folded = [0, 1, 2].map(|j| fold(py, [rows[0][j], rows[1][j], rows[2][j]]));
        for a in 0..2 {
            let [left, right] = fold(px, [folded[0][a], folded[1][a], folded[2][a]]);
            t[2 * a] = left;
            t[2 * a + 1] = right;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::{RoundingRatio, seeded_normal};
    use burn::tensor::module::{conv2d as burn_conv2d, interpolate};
    use burn::tensor::ops::{ConvOptions, InterpolateMode, InterpolateOptions};
    use burn::tensor::{DType, Device};

    /// burn's ops: nearest x2, then the 3x3 convolution with padding 1.
    fn reference(x: &Tensor<4>, weight: &Tensor<4>, bias: Option<&Tensor<1>>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let up = interpolate(
            x.clone(),
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([2 * h, 2 * w]),
        );
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        burn_conv2d(up, weight.clone(), bias.cloned(), options)
    }

    /// The exact result in f64, straight from the definition.
    fn exact(x: &Tensor<4>, weight: &Tensor<4>, bias: Option<&Tensor<1>>) -> Vec<f64> {
        let [batch, cin, h, w] = x.dims();
        let cout = weight.dims()[0];
        let xs: Vec<f32> = x.to_data().try_to_vec().unwrap();
        let ws: Vec<f32> = weight.to_data().try_to_vec().unwrap();
        let bs: Vec<f32> = bias.map_or(vec![0.0; cout], |b| b.to_data().try_to_vec().unwrap());
        let (oh, ow) = (2 * h, 2 * w);
        let mut out = vec![0f64; batch * cout * oh * ow];
        for b in 0..batch {
            for o in 0..cout {
                for y in 0..oh {
                    for xx in 0..ow {
                        let mut acc = bs[o] as f64;
                        for c in 0..cin {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (uy, ux) = (y + i, xx + j);
                                    if uy == 0 || ux == 0 || uy > oh || ux > ow {
                                        continue;
                                    }
                                    let v =
                                        xs[((b * cin + c) * h + (uy - 1) / 2) * w + (ux - 1) / 2];
                                    acc += v as f64 * ws[((o * cin + c) * 3 + i) * 3 + j] as f64;
                                }
                            }
                        }
                        out[((b * cout + o) * oh + y) * ow + xx] = acc;
                    }
                }
            }
        }
        out
    }

    /// Against burn's upsample and convolution within 1e-5 relative for each draw, and for
    /// each case the error to the exact result within 4 times that convolution's
    /// ([`RoundingRatio`], pooled over seeded draws). Over 100 other sets of draws (2026-12-07,
    /// Ice Lake, with AVX-512 and with it hidden) the worst ratio of any case was 1.33. Cases:
    /// odd and even sizes, one row or column, several panels and channel blocks, with and
    /// without a bias.
    #[test]
    fn matches_upsampling_then_convolving() {
        let device = Device::flex();
        for (case, (x, cout, with_bias)) in [
            ([1, 3, 5, 4], 2, true),
            ([2, 5, 7, 9], 6, false),
            ([1, 4, 1, 6], 3, true),
            ([1, 4, 6, 1], 3, true),
            ([1, 1, 1, 1], 1, true),
            ([2, 32, 12, 10], 130, true),
            ([1, 130, 40, 9], 70, true),
        ]
        .into_iter()
        .enumerate()
        {
            let outputs = x[0] * cout * 4 * x[2] * x[3];
            let mut rounding = RoundingRatio::default();
            for draw in 0..RoundingRatio::draws(outputs) {
                let seed = 1000 * (100 * case + draw) as u64;
                let xt = seeded_normal(x, seed, &device);
                let wt = seeded_normal([cout, x[1], 3, 3], seed + 1, &device);
                let bt = seeded_normal([cout], seed + 2, &device);
                let bias = with_bias.then_some(&bt);
                let ours = upsample_conv2d_any(&xt, &wt, bias).unwrap();
                let theirs = reference(&xt, &wt, bias);
                assert_eq!(ours.dims(), theirs.dims(), "{x:?}");
                let relative = crate::reference::max_relative_error(&ours, &theirs);
                assert!(relative < 1e-5, "{x:?} -> {cout}: {relative:e}");
                rounding.add(&ours, &theirs, &exact(&xt, &wt, bias));
            }
            let ratio = rounding.ratio();
            assert!(
                ratio < 4.0,
                "case {case}: error {ratio:.2} times upsampling then convolving's"
            );
        }
    }

    /// The work splits by the shapes only, so one thread and three give the same bits.
    #[test]
    fn thread_count_does_not_change_the_result() {
        let device = Device::flex();
        let x = seeded_normal([2, 48, 20, 18], 1, &device);
        let w = seeded_normal([96, 48, 3, 3], 2, &device);
        let b = seeded_normal([96], 3, &device);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| upsample_conv2d_any(&x, &w, Some(&b)).unwrap())
                .to_data()
                .try_to_vec::<f32>()
                .unwrap()
        };
        assert_eq!(run(1), run(3));
    }

    /// Other dtypes, filters and mismatched channels are left to the ops.
    #[test]
    fn declines_what_it_does_not_compute() {
        let device = Device::flex();
        let x = Tensor::<4>::ones([1, 4, 3, 3], &device);
        let w = Tensor::<4>::ones([2, 4, 3, 3], &device);
        assert!(upsample_conv2d_any(&x, &Tensor::ones([2, 4, 1, 1], &device), None).is_none());
        assert!(upsample_conv2d_any(&x, &Tensor::ones([2, 3, 3, 3], &device), None).is_none());
        assert!(upsample_conv2d_any(&x, &w, Some(&Tensor::ones([3], &device))).is_none());
        let half = |t: &Tensor<4>| t.clone().cast(DType::F16);
        assert!(upsample_conv2d_any(&half(&x), &half(&w), None).is_none());
        assert!(upsample_conv2d_any(&x, &w, None).is_some());
        // below the size where it pays, the ops run
        assert!(upsample_conv2d(&x, &w, None).is_none());
        let large = Tensor::<4>::ones([1, 4, 64, 64], &device);
        assert!(upsample_conv2d(&large, &w, None).is_some());
    }
}
