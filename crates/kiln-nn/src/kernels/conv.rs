//! Kiln's 2-D convolution kernel (f32, NCHW, groups 1).
//!
//! burn-flex convolves through a tiled im2col: it transposes the whole input to NHWC on one
//! thread, repacks the weights on every call, allocates a fresh column buffer and a fresh GEMM
//! result for every 512-pixel tile (page faults), and copies each result into the NCHW output
//! one strided element at a time; at the deep levels (8x8 pixels, 1280 channels) it leaves one
//! core idle. It reaches 40-150 GFLOP/s at SD's shapes on the 2-core Xeon.
//!
//! Here the work is cut into tasks of (image, panel of output rows, block of output channels),
//! run on rayon. A task gathers its panel's columns straight from NCHW into a `[K, pixels]`
//! buffer of its thread (each row of it is a shifted copy of one input row, so for stride 1 a
//! `memcpy` with zeroed edges), kept to [`PANEL_BUDGET`] elements so that it stays in L2, and
//! multiplies it on that thread with the weights as stored (`[out, in * kh * kw]` row-major is
//! already the left operand) into its block of the output in place, on top of the bias the
//! block was filled with. 1x1 convolutions with stride 1 and no padding multiply the input
//! directly. 150-220 GFLOP/s at the same shapes (`cargo bench --workspace --bench conv`). The
//! split depends on the shapes only, not on the thread count, so neither does the result.

use burn::tensor::Tensor;
use rayon::prelude::*;
use std::cell::RefCell;

use super::host::{self, Float, HostF32, grow};
use super::winograd;

/// Elements of one task's column panel (`K x pixels`): 256 Ki f32, 1 MB, so that it stays in
/// the core's L2 between being gathered and being packed by gemm. Measured on the 2-core Xeon
/// (2026-12-02) at the SD 1.5 UNet's and VAE's shapes, alternating settings in one process:
/// 128 Ki to 512 Ki elements were within the machine's noise of each other, 1 Mi and 2 Mi were
/// 10-40% slower on the 64x64 and 16x16 levels.
const PANEL_BUDGET: usize = 1 << 18;

/// Pixels of one panel at least, even past the budget (the deep levels' `K` is 11520): fewer
/// columns leave gemm's microkernel short rows to work on.
const MIN_COLS: usize = 128;

/// A 2-D convolution's geometry (groups 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dOptions {
    /// `[height, width]` strides.
    pub stride: [usize; 2],
    /// `[[top, bottom], [left, right]]` zero padding.
    pub padding: [[usize; 2]; 2],
    /// `[height, width]` dilation.
    pub dilation: [usize; 2],
}

/// `conv2d(x, weight) + bias` for plain f32 flex tensors, or `None` (the caller then uses burn's
/// op): another backend or dtype, an autodiff tensor, channels that do not match (groups other
/// than 1), or an empty output.
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`, `weight`: `[out, in, kh, kw]`, `bias`: `[out]`
/// - output: `[batch, out, out_height, out_width]`, as PyTorch's `F.conv2d`
pub fn conv2d(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: Conv2dOptions,
) -> Option<Tensor<4>> {
    conv2d_with(x, weight, bias, options, Conv2dAlgorithm::Auto)
}

/// What [`Conv2dAlgorithm::Auto`] means in this process: `KILN_CONV=im2col` or
/// `KILN_CONV=winograd` in the environment force that algorithm wherever it applies (a
/// diagnostic, to compare the two in whole models and to run the models' tests through either;
/// read once), anything else leaves the choice to the shapes.
fn auto_algorithm() -> Conv2dAlgorithm {
    static AUTO: std::sync::OnceLock<Conv2dAlgorithm> = std::sync::OnceLock::new();
    *AUTO.get_or_init(|| match std::env::var("KILN_CONV").as_deref() {
        Ok("im2col") => Conv2dAlgorithm::Im2col,
        Ok("winograd") => Conv2dAlgorithm::Winograd,
        _ => Conv2dAlgorithm::Auto,
    })
}

/// How [`conv2d_with`] computes a convolution.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Conv2dAlgorithm {
    /// Winograd's F(2x2, 3x3) for 3x3 kernels with stride 1 and dilation 1 from 16x16 output
    /// pixels up (where it was measured faster), im2col panels otherwise: what [`conv2d`] runs.
    /// `KILN_CONV=im2col` or `KILN_CONV=winograd` in the environment forces one of the two.
    #[default]
    Auto,
    /// im2col panels and one GEMM each, for every geometry.
    Im2col,
    /// Winograd's F(2x2, 3x3) wherever the geometry allows it (3x3, stride 1, dilation 1),
    /// whatever the size; im2col for the rest.
    Winograd,
}

/// [`conv2d`] with the algorithm chosen by the caller (the benches compare them; the results
/// agree within f32 rounding).
pub fn conv2d_with(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: Conv2dOptions,
    algorithm: Conv2dAlgorithm,
) -> Option<Tensor<4>> {
    let [batch, cin, h, w] = x.dims();
    let [cout, wcin, kh, kw] = weight.dims();
    if wcin != cin || bias.is_some_and(|b| b.dims() != [cout]) {
        return None;
    }
    let shape = ConvShape::new([batch, cin, h, w], [cout, kh, kw], options)?;
    if let Some(dtype) = host::reduced_precision(x) {
        if weight.dtype() != dtype || bias.is_some_and(|b| b.dtype() != dtype) {
            return None;
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        if dtype == burn::tensor::DType::BF16 && super::native_bf16() {
            return amx_conv2d(x, weight, bias, &shape);
        }
        return match dtype {
            burn::tensor::DType::BF16 => {
                reduced_conv2d::<half::bf16>(x, weight, bias, &shape, algorithm)
            }
            _ => reduced_conv2d::<half::f16>(x, weight, bias, &shape, algorithm),
        };
    }
    let x = HostF32::new(x.clone())?;
    let weight = HostF32::new(weight.clone())?;
    let bias = match bias {
        Some(b) => Some(HostF32::new(b.clone())?),
        None => None,
    };
    let bias = bias.as_ref().map(HostF32::as_slice);
    let out = conv2d_f32(x.as_slice(), weight.as_slice(), bias, &shape, algorithm);
    Some(host::tensor(out, [batch, cout, shape.oh, shape.ow]))
}

/// A bf16 or f16 convolution computed in f32: the input widened once, the weights a task's
/// block at a time in cache (so that a model's weights are never copied whole at every call),
/// the result rounded back.
fn reduced_conv2d<T: Float>(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    shape: &ConvShape,
    algorithm: Conv2dAlgorithm,
) -> Option<Tensor<4>> {
    let x = host::widen_vec(host::Host::<T>::new(x.clone())?.as_slice());
    let weight = host::Host::<T>::new(weight.clone())?;
    let bias = match bias {
        Some(b) => Some(host::bias_f32(b)?),
        None => None,
    };
    let out = conv2d_f32(&x, weight.as_slice(), bias.as_deref(), shape, algorithm);
    let dims = [shape.batch, shape.cout, shape.oh, shape.ow];
    Some(host::tensor(host::narrow_vec::<T>(&out), dims))
}

/// The convolution of an f32 input by weights of `W` (widened a block at a time), in the
/// algorithm `algorithm` picks for the shape.
fn conv2d_f32<W: Float>(
    x: &[f32],
    weight: &[W],
    bias: Option<&[f32]>,
    shape: &ConvShape,
    algorithm: Conv2dAlgorithm,
) -> Vec<f32> {
    let mut out = vec![0f32; shape.batch * shape.cout * shape.oh * shape.ow];
    let algorithm = match algorithm {
        Conv2dAlgorithm::Auto => auto_algorithm(),
        chosen => chosen,
    };
    let winograd = winograd::applies(shape)
        && match algorithm {
            Conv2dAlgorithm::Auto => winograd::pays(shape),
            Conv2dAlgorithm::Im2col => false,
            Conv2dAlgorithm::Winograd => true,
        };
    if winograd {
        winograd::conv3x3(x, weight, bias, shape, &mut out);
    } else {
        conv2d_host(x, weight, bias, shape, &mut out);
    }
    out
}

/// The sizes of one convolution.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConvShape {
    pub(super) batch: usize,
    pub(super) cin: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) cout: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) oh: usize,
    pub(super) ow: usize,
    pub(super) options: Conv2dOptions,
}

impl ConvShape {
    /// `None` for an empty output or a zero stride or dilation.
    fn new(
        [batch, cin, h, w]: [usize; 4],
        [cout, kh, kw]: [usize; 3],
        options: Conv2dOptions,
    ) -> Option<Self> {
        let out = |size: usize, [before, after]: [usize; 2], k: usize, s: usize, d: usize| {
            let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
            let padded = size.checked_add(before)?.checked_add(after)?;
            (s > 0 && padded >= span).then(|| (padded - span) / s + 1)
        };
        let Conv2dOptions {
            stride,
            padding,
            dilation,
            ..
        } = options;
        let oh = out(h, padding[0], kh, stride[0], dilation[0])?;
        let ow = out(w, padding[1], kw, stride[1], dilation[1])?;
        let nonempty = [batch, cin, cout, oh, ow].iter().all(|&n| n > 0);
        nonempty.then_some(Self {
            batch,
            cin,
            h,
            w,
            cout,
            kh,
            kw,
            oh,
            ow,
            options,
        })
    }

    /// The reduction length: `in * kh * kw`.
    fn k(&self) -> usize {
        self.cin * self.kh * self.kw
    }

    /// A 1x1 convolution with stride 1 and no padding: the input is already the right operand.
    fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.options.stride == [1, 1]
            && self.options.padding == [[0, 0], [0, 0]]
    }
}

thread_local! {
    /// Each thread's column panel, kept between calls so that it is not faulted in again.
    static PANEL: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's block of widened (bf16 or f16) weights.
    static WIDE_WEIGHTS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Fewer tasks than this and the output channels are split too (so that the deep, small levels
/// keep every core busy). A constant rather than the thread count: the split, and with it the
/// GEMMs' blocking, must not depend on the machine, so that the result does not either.
pub(super) const MIN_TASKS: usize = 8;

/// Output channels of one task at least (gemm's f32 AVX-512 microkernel is 64 rows tall).
pub(super) const MIN_CHANNELS: usize = 64;

/// The convolution on host slices: `out` (`[batch, cout, oh, ow]`) is overwritten.
///
/// The work is cut into tasks of (image, panel of output rows, block of output channels); each
/// task gathers its panel into its thread's buffer and multiplies it on that thread.
fn conv2d_host<W: Float>(
    x: &[f32],
    weight: &[W],
    bias: Option<&[f32]>,
    s: &ConvShape,
    out: &mut [f32],
) {
    let k = s.k();
    let pixels = s.oh * s.ow;
    let in_plane = s.cin * s.h * s.w;
    assert_eq!(x.len(), s.batch * in_plane);
    assert_eq!(weight.len(), s.cout * k);
    assert_eq!(out.len(), s.batch * s.cout * pixels);
    assert!(bias.is_none_or(|b| b.len() == s.cout));
    let pointwise = s.is_pointwise();
    let split = Split::new(s, if pointwise { None } else { Some(PANEL_BUDGET) }, 1);
    let out_ptr = host::SharedMut(out.as_mut_ptr());
    split.par_tasks(|task| {
        let Task {
            image,
            row0,
            rows,
            c0,
            channels,
        } = task;
        let cols = rows * s.ow;
        let x_b = &x[image * in_plane..(image + 1) * in_plane];
        // SAFETY: this task's block, channels c0..c0 + channels by columns row0 * ow ..
        // row0 * ow + cols of image `image`, is inside `out` and no other task's.
        let dst = unsafe {
            out_ptr
                .get()
                .add((image * s.cout + c0) * pixels + row0 * s.ow)
        };
        if let Some(bias) = bias {
            for c in 0..channels {
                // SAFETY: row c of this task's block (as above).
                let row = unsafe { std::slice::from_raw_parts_mut(dst.add(c * pixels), cols) };
                row.fill(bias[c0 + c]);
            }
        }
        let mut wide = WIDE_WEIGHTS.take();
        let lhs = W::widen(&weight[c0 * k..(c0 + channels) * k], &mut wide);
        let multiply = |rhs: &[f32], rhs_rs: usize| {
            debug_assert!(rhs.len() >= (k - 1) * rhs_rs + cols);
            // SAFETY: dst is this task's [channels, cols] block with row stride `pixels` (as
            // above), lhs is [channels, k] row-major, rhs is [k, cols] with row stride `rhs_rs`
            // (checked above); dst aliases neither.
            unsafe {
                super::host::gemm_rows(
                    (dst, pixels),
                    bias.is_some(),
                    (lhs.as_ptr(), k),
                    (rhs.as_ptr(), rhs_rs),
                    [channels, k, cols],
                )
            };
        };
        if pointwise {
            multiply(&x_b[row0 * s.ow..], pixels);
        } else {
            PANEL.with_borrow_mut(|panel| {
                grow(panel, k * rows * s.ow);
                let panel = &mut panel[..k * cols];
                im2col(x_b, s, row0, rows, panel);
                multiply(panel, cols);
            });
        }
        WIDE_WEIGHTS.set(wide);
    });
}

/// How a convolution is cut into tasks of (image, panel of output rows, block of output
/// channels). It depends on the shapes only, not on the thread count, so neither does the
/// result.
struct Split {
    batch: usize,
    rows: usize,
    panels: usize,
    blocks: usize,
    channels: usize,
    oh: usize,
    cout: usize,
}

/// One task of a [`Split`].
struct Task {
    image: usize,
    row0: usize,
    rows: usize,
    c0: usize,
    channels: usize,
}

impl Split {
    /// Panels of at most `budget` column-panel elements (`k x rows * ow`, at least
    /// [`MIN_COLS`] columns), or whole images (`None`: a pointwise convolution reads its input
    /// in place); the output channels split too where there are fewer than [`MIN_TASKS`], in
    /// blocks of a multiple of `align` channels.
    fn new(s: &ConvShape, budget: Option<usize>, align: usize) -> Self {
        let rows = match budget {
            None => s.oh,
            Some(budget) => (budget / (s.k() * s.ow))
                .max(MIN_COLS.div_ceil(s.ow))
                .clamp(1, s.oh),
        };
        let panels = s.oh.div_ceil(rows);
        // the same number of panels, as even as possible
        let rows = s.oh.div_ceil(panels);
        let blocks = MIN_TASKS
            .div_ceil(s.batch * panels)
            .min(s.cout / MIN_CHANNELS)
            .max(1);
        let channels = s.cout.div_ceil(blocks).next_multiple_of(align);
        let blocks = s.cout.div_ceil(channels);
        Self {
            batch: s.batch,
            rows,
            panels,
            blocks,
            channels,
            oh: s.oh,
            cout: s.cout,
        }
    }

    fn tasks(&self) -> usize {
        self.batch * self.panels * self.blocks
    }

    /// Runs `f` on every task, in parallel on rayon.
    fn par_tasks(&self, f: impl Fn(Task) + Send + Sync) {
        (0..self.tasks())
            .into_par_iter()
            .for_each(|task| f(self.task(task)));
    }

    fn task(&self, task: usize) -> Task {
        let (image_panel, block) = (task / self.blocks, task % self.blocks);
        let (image, panel) = (image_panel / self.panels, image_panel % self.panels);
        let row0 = panel * self.rows;
        let c0 = block * self.channels;
        Task {
            image,
            row0,
            rows: self.rows.min(self.oh - row0),
            c0,
            channels: self.channels.min(self.cout - c0),
        }
    }
}

/// Fills `panel` (`[k, rows * ow]` row-major) with the input patches of output rows
/// `row0..row0 + rows` of one image `x` (`[cin, h, w]`): element `((c, i, j), (y, x))` is
/// `x[c, y * sh + i * dh - top, x * sw + j * dw - left]`, or 0 in the padding.
fn im2col(x: &[f32], s: &ConvShape, row0: usize, rows: usize, panel: &mut [f32]) {
    let cols = rows * s.ow;
    panel
        .chunks_exact_mut(cols)
        .enumerate()
        .for_each(|(kk, dst)| im2col_row(x, s, row0, kk, dst));
}

/// Row `kk` of [`im2col`]'s panel, for the output rows `row0..` that `dst` (`rows * ow` long)
/// covers.
fn im2col_row<T: Copy + Default>(x: &[T], s: &ConvShape, row0: usize, kk: usize, dst: &mut [T]) {
    let Conv2dOptions {
        stride: [sh, sw],
        padding: [[top, _], [left, _]],
        dilation: [dh, dw],
    } = s.options;
    let (c, ij) = (kk / (s.kh * s.kw), kk % (s.kh * s.kw));
    let (i, j) = (ij / s.kw, ij % s.kw);
    let plane = &x[c * s.h * s.w..(c + 1) * s.h * s.w];
    // Output columns whose input column is inside the image: x * sw + j * dw - left in
    // [0, w), i.e. x in [lo, hi).
    let shift = j * dw;
    let lo = left.saturating_sub(shift).div_ceil(sw).min(s.ow);
    let hi = (s.w + left)
        .checked_sub(shift)
        .map_or(0, |end| end.div_ceil(sw))
        .clamp(lo, s.ow);
    for (r, dst) in dst.chunks_exact_mut(s.ow).enumerate() {
        let y = (row0 + r) * sh + i * dh;
        if y < top || y - top >= s.h {
            dst.fill(T::default());
            continue;
        }
        let src = &plane[(y - top) * s.w..(y - top + 1) * s.w];
        dst[..lo].fill(T::default());
        dst[hi..].fill(T::default());
        let start = lo * sw + shift - left;
        if sw == 1 {
            dst[lo..hi].copy_from_slice(&src[start..start + (hi - lo)]);
        } else {
            for (d, &v) in dst[lo..hi].iter_mut().zip(src[start..].iter().step_by(sw)) {
                *d = v;
            }
        }
    }
}

/// Panel elements (`k x pixels`) of one AMX task: 512 Ki bf16, 1 MiB, in L2 while every block
/// row of the weights passes over it.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
const AMX_PANEL_BUDGET: usize = 1 << 19;

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
std::thread_local! {
    /// Each thread's packed panel and two gathered rows, kept between calls so that they are
    /// not faulted in again.
    static PACKED_PANEL: std::cell::Cell<super::amx::Aligned> = std::cell::Cell::default();
    static ROW_PAIR: std::cell::Cell<Vec<half::bf16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// The bf16 convolution on AMX tiles: the same tasks as [`conv2d_host`] (channel blocks whole
/// multiples of 32), the weights packed for the tiles once and kept while they live, each
/// task's column panel gathered straight into the tiles' VNNI layout two rows at a time, the bias added and the
/// result rounded to bf16 as each block is stored.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn amx_conv2d(
    x: &Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    s: &ConvShape,
) -> Option<Tensor<4>> {
    use super::amx;
    use half::bf16;
    let x = host::Host::<bf16>::new(x.clone())?;
    let weight_host = host::Host::<bf16>::new(weight.clone())?;
    let bias = match bias {
        Some(b) => Some(host::bias_f32(b)?),
        None => None,
    };
    let (x, weight) = (x.as_slice(), weight_host.as_slice());
    let k = s.k();
    let pixels = s.oh * s.ow;
    let in_plane = s.cin * s.h * s.w;
    assert_eq!(x.len(), s.batch * in_plane);
    assert_eq!(weight.len(), s.cout * k);
    let mut out = bytemuck::zeroed_vec::<bf16>(s.batch * s.cout * pixels);
    let out_ptr = host::SharedMut(out.as_mut_ptr());
    let split = Split::new(s, Some(AMX_PANEL_BUDGET), amx::MR);
    let packed = amx::packed_weight(&weight_host, amx::Operand::Left, [s.cout, k], [k, 1]);
    let lhs = packed.left();
    split.par_tasks(|task| {
        let Task {
            image,
            row0,
            rows,
            c0,
            channels,
        } = task;
        let cols = rows * s.ow;
        let x_b = &x[image * in_plane..(image + 1) * in_plane];
        host::with_buffer(&PACKED_PANEL, |pbuf| {
            let panel = host::with_buffer(&ROW_PAIR, |pair| {
                im2col_packed(x_b, s, row0, rows, pair, pbuf)
            });
            let epilogue = amx::Epilogue {
                // SAFETY: channels c0..c0 + channels by columns row0 * ow .. row0 * ow +
                // cols of image `image` are this task's alone (the split's blocks).
                out: unsafe {
                    out_ptr
                        .get()
                        .add((image * s.cout + c0) * pixels + row0 * s.ow)
                },
                stride: pixels,
                rows: channels,
                cols,
                init: match &bias {
                    Some(b) => amx::Init::RowBias(&b[c0..]),
                    None => amx::Init::Zero,
                },
            };
            let _tiles = amx::Tiles::new();
            // SAFETY: c0 is a multiple of 32 (the split's alignment), so the weights' block
            // rows from c0 / 32 hold this task's channels; the panel holds its columns; the
            // epilogue's view is its block of `out`.
            unsafe {
                amx::multiply(
                    &lhs.rows_from_block(c0 / amx::MR),
                    &panel,
                    &epilogue,
                    amx::Order::RowsOuter,
                )
            };
        });
    });
    Some(host::tensor(out, [s.batch, s.cout, s.oh, s.ow]))
}

/// [`im2col`]'s panel in the AMX tiles' VNNI layout ([`super::amx::PackedB`]), gathered two
/// rows at a time into `pair` and interleaved into `buf`.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn im2col_packed<'a>(
    x: &[half::bf16],
    s: &ConvShape,
    row0: usize,
    rows: usize,
    pair: &mut Vec<half::bf16>,
    buf: &'a mut super::amx::Aligned,
) -> super::amx::PackedB<'a> {
    use super::amx;
    let (k, cols) = (s.k(), rows * s.ow);
    let kbs = amx::k_blocks(k);
    let len = amx::packed_b_len(k, cols);
    let data = buf.grow(len);
    if k % amx::TK != 0 || cols % amx::NR != 0 {
        data.fill(0);
    }
    if pair.len() < 2 * cols {
        *pair = vec![half::bf16::ZERO; 2 * cols];
    }
    let (lo, hi) = pair[..2 * cols].split_at_mut(cols);
    for kk in (0..k).step_by(2) {
        im2col_row(x, s, row0, kk, lo);
        if kk + 1 < k {
            im2col_row(x, s, row0, kk + 1, hi);
        } else {
            hi.fill(half::bf16::ZERO);
        }
        for (g, (lo, hi)) in lo.chunks(16).zip(hi.chunks(16)).enumerate() {
            let base = amx::b_offset(kbs, kk, g * 16);
            let dst = &mut data[base..base + 2 * lo.len()];
            for ((d, l), h) in dst.chunks_exact_mut(2).zip(lo).zip(hi) {
                d[0] = l.to_bits();
                d[1] = h.to_bits();
            }
        }
    }
    amx::PackedB {
        data,
        k_blocks: kbs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::module::conv2d as burn_conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{Device, Distribution};

    fn burn_reference(
        x: &Tensor<4>,
        weight: &Tensor<4>,
        bias: Option<&Tensor<1>>,
        o: Conv2dOptions,
    ) -> Tensor<4> {
        let options = ConvOptions::new_with_padding(
            o.stride,
            [
                (o.padding[0][0], o.padding[0][1]),
                (o.padding[1][0], o.padding[1][1]),
            ],
            o.dilation,
            1,
        );
        burn_conv2d(x.clone(), weight.clone(), bias.cloned(), options)
    }

    /// Against burn's conv2d (the op it replaces) on flex, within 1e-5 relative, at every
    /// geometry of [`geometries`].
    /// The geometries the tests run: `(input, weight, options, bias)`.
    type Geometry = ([usize; 4], [usize; 4], Conv2dOptions, bool);

    /// 3x3 with padding 1 (the UNet's and the VAE's), stride 2 with symmetric and one-sided
    /// padding (the UNet's and the VAE's downsamplers), 1x1 (shortcuts, projections), no bias,
    /// dilation, rectangular kernels and inputs, and panels that split an image (K * width
    /// large); `extra` adds to them.
    fn geometries(extra: &[Geometry]) -> Vec<Geometry> {
        let o = |stride: usize, [t, b, l, r]: [usize; 4], dilation: usize| Conv2dOptions {
            stride: [stride; 2],
            padding: [[t, b], [l, r]],
            dilation: [dilation; 2],
        };
        let mut all = vec![
            ([2, 5, 9, 7], [6, 5, 3, 3], o(1, [1; 4], 1), true),
            ([1, 8, 10, 11], [4, 8, 3, 3], o(2, [1; 4], 1), true),
            ([1, 8, 10, 11], [4, 8, 3, 3], o(2, [0, 1, 0, 1], 1), false),
            ([2, 16, 6, 5], [7, 16, 1, 1], o(1, [0; 4], 1), true),
            ([1, 3, 12, 12], [5, 3, 3, 3], o(1, [2; 4], 2), true),
            ([1, 4, 9, 13], [3, 4, 2, 5], o(1, [0, 1, 2, 0], 1), true),
            ([1, 2, 5, 5], [3, 2, 1, 1], o(2, [1; 4], 1), true),
            ([1, 600, 40, 37], [8, 600, 3, 3], o(1, [1; 4], 1), true),
        ];
        all.extend_from_slice(extra);
        all
    }

    #[test]
    fn matches_burns_conv2d() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        for (x, w, options, bias) in geometries(&[]) {
            let xt = Tensor::<4>::random(x, normal, &device);
            let wt = Tensor::<4>::random(w, normal, &device);
            let bt = bias.then(|| Tensor::<1>::random([w[0]], normal, &device));
            let ours = conv2d(&xt, &wt, bt.as_ref(), options).unwrap();
            let reference = burn_reference(&xt, &wt, bt.as_ref(), options);
            assert_eq!(ours.dims(), reference.dims(), "{x:?} {w:?} {options:?}");
            let error = crate::reference::max_relative_error(&ours, &reference);
            assert!(error < 1e-5, "{x:?} {w:?} {options:?}: {error:e}");
        }
    }

    /// bf16 (on AMX tiles where the CPU has them, else widened) gives the f32 result of the
    /// same bf16 operands rounded to bf16, at every geometry of [`geometries`] and two more;
    /// f16 likewise within its precision.
    #[test]
    fn bf16_and_f16_round_the_f32_result_of_their_operands() {
        use burn::tensor::DType;
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        let same = Conv2dOptions {
            stride: [1, 1],
            padding: [[1, 1], [1, 1]],
            dilation: [1, 1],
        };
        // 1x1 to 64 channels, and k = 576 with 96 output channels: channel blocks of 32
        let extra = [
            (
                [2, 32, 6, 5],
                [64, 32, 1, 1],
                Conv2dOptions {
                    padding: [[0, 0], [0, 0]],
                    ..same
                },
                true,
            ),
            ([2, 64, 20, 19], [96, 64, 3, 3], same, true),
        ];
        for (x, w, options, bias) in geometries(&extra) {
            for dtype in [DType::BF16, DType::F16] {
                let xt = Tensor::<4>::random(x, normal, &device).cast(dtype);
                let wt = Tensor::<4>::random(w, normal, &device).cast(dtype);
                let bt = bias.then(|| Tensor::<1>::random([w[0]], normal, &device).cast(dtype));
                let ours = conv2d(&xt, &wt, bt.as_ref(), options).unwrap();
                assert_eq!(ours.dtype(), dtype);
                let wide = |t: &Tensor<4>| t.clone().cast(DType::F32);
                let bw = bt.map(|b| b.cast(DType::F32));
                let exact = conv2d(&wide(&xt), &wide(&wt), bw.as_ref(), options).unwrap();
                if dtype == DType::BF16 {
                    let ulps = crate::kernels::bf16_check::ulps(&ours, &exact);
                    assert!(ulps <= 1.0, "{x:?} {w:?}: {ulps} half-ulps");
                } else {
                    let error = crate::reference::max_relative_error(&wide(&ours), &exact);
                    assert!(error < 1e-3, "{x:?} {w:?} f16: {error:e}");
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_the_result() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<4>::random([2, 64, 24, 24], normal, &device);
        let w = Tensor::<4>::random([96, 64, 3, 3], normal, &device);
        let b = Tensor::<1>::random([96], normal, &device);
        let options = Conv2dOptions {
            stride: [1, 1],
            padding: [[1, 1], [1, 1]],
            dilation: [1, 1],
        };
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let out = pool.install(|| conv2d(&x, &w, Some(&b), options).unwrap());
            out.into_data().try_into_vec::<f32>().unwrap()
        };
        assert_eq!(run(1), run(3));
    }

    #[test]
    fn other_dtypes_groups_and_empty_outputs_are_left_to_burn() {
        let device = Device::flex();
        let options = Conv2dOptions {
            stride: [1, 1],
            padding: [[0, 0], [0, 0]],
            dilation: [1, 1],
        };
        let x = Tensor::<4>::zeros([1, 4, 5, 5], &device);
        let w = Tensor::<4>::zeros([2, 4, 3, 3], &device);
        assert!(conv2d(&x, &w, None, options).is_some());
        let double = |t: &Tensor<4>| t.clone().cast(burn::tensor::DType::F64);
        assert!(conv2d(&double(&x), &double(&w), None, options).is_none());
        // mixed dtypes
        let half = |t: &Tensor<4>| t.clone().cast(burn::tensor::DType::BF16);
        assert!(conv2d(&half(&x), &w, None, options).is_none());
        // grouped weights: [out, in / groups, ..]
        assert!(conv2d(&x, &Tensor::zeros([2, 2, 3, 3], &device), None, options).is_none());
        // a kernel larger than the input
        assert!(conv2d(&x, &Tensor::zeros([2, 4, 7, 7], &device), None, options).is_none());
        // autodiff tensors keep burn's op (and its backward)
        let ad = Device::flex().autodiff();
        let xa = Tensor::<4>::zeros([1, 4, 5, 5], &ad).require_grad();
        assert!(conv2d(&xa, &Tensor::zeros([2, 4, 3, 3], &ad), None, options).is_none());
    }
}
