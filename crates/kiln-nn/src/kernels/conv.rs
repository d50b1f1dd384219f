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
pub(super) const PANEL_BUDGET: usize = 1 << 18;

/// Pixels of one panel at least, even past the budget (the deep levels' `K` is 11520): fewer
/// columns leave gemm's microkernel short rows to work on.
pub(super) const MIN_COLS: usize = 128;

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
    /// Winograd's F(2x2, 3x3) for 3x3 kernels with stride 1 and dilation 1 from 8x8 output
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
    let shape = ConvShape::of(x, weight, bias, options)?;
    let (batch, cout) = (shape.batch, shape.cout);
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
    let (weight, bias) = host_weights(weight, bias)?;
    let bias = bias.as_ref().map(HostF32::as_slice);
    let out = conv2d_f32(x.as_slice(), weight.as_slice(), bias, &shape, algorithm);
    Some(host::tensor(out, [batch, cout, shape.oh, shape.ow]))
}

/// The f32 host data of a convolution's weights and bias, or `None` where they are not plain
/// f32 flex tensors.
pub(super) fn host_weights(
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
) -> Option<(HostF32, Option<HostF32>)> {
    let weight = HostF32::new(weight.clone())?;
    let bias = match bias {
        Some(b) => Some(HostF32::new(b.clone())?),
        None => None,
    };
    Some((weight, bias))
}

/// Whether a convolution of `shape` runs Winograd's algorithm under `algorithm`.
fn runs_winograd(shape: &ConvShape, algorithm: Conv2dAlgorithm) -> bool {
    let algorithm = match algorithm {
        Conv2dAlgorithm::Auto => auto_algorithm(),
        chosen => chosen,
    };
    winograd::applies(shape)
        && match algorithm {
            Conv2dAlgorithm::Auto => winograd::pays(shape),
            Conv2dAlgorithm::Im2col => false,
            Conv2dAlgorithm::Winograd => true,
        }
}

/// The GroupNorm (and SiLU) that [`group_norm_conv2d`] applies to its input as it reads it.
#[derive(Clone, Copy, Debug)]
pub struct InputGroupNorm<'a> {
    /// Groups of channels.
    pub groups: usize,
    /// Added to the variance.
    pub eps: f64,
    /// `(gamma, beta)`, each `[in]`, or none.
    pub affine: Option<(&'a Tensor<1>, &'a Tensor<1>)>,
    /// SiLU after the normalisation.
    pub silu: bool,
}

/// `conv2d(silu(group_norm(x)), weight) + bias` without storing the normalised input: the
/// GroupNorm's statistics are taken first, then each input row is normalised (and activated)
/// as the convolution reads it, so `x` is left as it is and can still feed a residual path
/// (a ResNet block's shortcut) with no second tensor of its size alive. The result is bit for
/// bit that of [`group_norm`](super::group_norm) followed by [`conv2d`].
///
/// `Some` where the convolution runs Winograd's algorithm (a 3x3 kernel with stride 1 from 8x8
/// output pixels up, see [`Conv2dAlgorithm::Auto`]) on plain f32 flex tensors; `None`
/// otherwise, and the caller normalises and convolves.
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`, `weight`: `[out, in, 3, 3]`, `bias`: `[out]`
/// - output: `[batch, out, out_height, out_width]`
pub fn group_norm_conv2d(
    x: &Tensor<4>,
    norm: InputGroupNorm<'_>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
    options: Conv2dOptions,
) -> Option<Tensor<4>> {
    let shape = ConvShape::of(x, weight, bias, options)?;
    if !runs_winograd(&shape, Conv2dAlgorithm::Auto) {
        return None;
    }
    let host_x = HostF32::new(x.clone())?;
    let (weight, bias) = host_weights(weight, bias)?;
    let scale_shift = super::elementwise::group_norm_scale_shift(
        x,
        host_x.as_slice(),
        norm.groups,
        norm.eps,
        norm.affine,
    )?;
    let prologue = winograd::Prologue {
        scale_shift: &scale_shift,
        silu: norm.silu,
    };
    let mut out = vec![0f32; shape.batch * shape.cout * shape.oh * shape.ow];
    winograd::conv3x3(
        host_x.as_slice(),
        weight.as_slice(),
        bias.as_ref().map(HostF32::as_slice),
        &shape,
        Some(prologue),
        &mut out,
    );
    let dims = [shape.batch, shape.cout, shape.oh, shape.ow];
    Some(host::tensor(out, dims))
}

/// A 1x1 convolution (stride 1, no padding) written over its own input's storage, a band of
/// pixels at a time (each output pixel reads only the input pixel under it): where `x` is a
/// contiguous f32 flex tensor that nothing else holds and [`pointwise_in_place_applies`]. The
/// storage's pages past the output go back to the system (on Linux with glibc). The result
/// equals [`conv2d`]'s within f32 rounding. `Err(x)`, given back, where it does not apply.
///
/// # Shapes
/// - `x`: `[batch, in, height, width]`, `weight`: `[out, in, 1, 1]` with `out <= in`,
///   `bias`: `[out]`
/// - output: `[batch, out, height, width]`
// the error is the caller's own input handed back (a `Tensor` is 256 bytes), not an error value
#[allow(clippy::result_large_err)]
pub fn conv2d_pointwise_owned(
    x: Tensor<4>,
    weight: &Tensor<4>,
    bias: Option<&Tensor<1>>,
) -> Result<Tensor<4>, Tensor<4>> {
    use burn_flex::{Flex, Layout};
    let [batch, cin, h, w] = x.dims();
    let [cout, wcin, kh, kw] = weight.dims();
    let applies = x.dtype() == burn::tensor::DType::F32
        && [wcin, kh, kw] == [cin, 1, 1]
        && pointwise_in_place_applies([batch, cin, h, w], cout)
        && bias.is_none_or(|b| b.dims() == [cout]);
    if !applies {
        return Err(x);
    }
    let Some((weight, bias)) = host_weights(weight, bias) else {
        return Err(x);
    };
    let (mut flex, range) = host::unique_flex(x)?;
    let start = range.start;
    let Some(storage) = flex.try_storage_mut::<f32>() else {
        unreachable!("unique and of f32");
    };
    let pixels = h * w;
    pointwise_in_place(
        &mut storage[range],
        weight.as_slice(),
        bias.as_ref().map(HostF32::as_slice),
        [batch, cin, cout, pixels],
    );
    let keep = start + batch * cout * pixels;
    host::release_pages(storage, keep);
    let shape = burn::tensor::Shape::new([batch, cout, h, w]);
    let strides = [cout * pixels, pixels, w, 1].map(|s| s as isize).to_vec();
    let view = Layout::new(shape, strides, start);
    let flex = flex.with_layout(view);
    Ok(Tensor::from_primitive::<Flex>(flex))
}

/// Whether [`conv2d_pointwise_owned`] writes a 1x1 convolution from `in` to `out` channels of
/// an input of `[batch, in, height, width]` over the input: where it has at most as many output
/// channels as input ones (a ResNet block's shortcut where the channels shrink) and each image
/// has at least `MIN_TASKS` (8) bands of pixels (the images go one after the other, so fewer
/// would leave threads idle: the SD UNet's shortcuts at 512 px,
/// 64x64 pixels and less, are faster through [`conv2d`], and small enough not to matter for
/// memory; the VAE decoder's at 256x256 and 512x512 pixels, 64 and 256 MiB, are written in
/// place).
pub fn pointwise_in_place_applies([batch, cin, h, w]: [usize; 4], cout: usize) -> bool {
    let pixels = h * w;
    cout > 0 && cout <= cin && batch > 0 && pixels >= MIN_TASKS * band_pixels(cout)
}

/// Output elements (`out x pixels`) of one band of [`pointwise_in_place`] at most (1 MiB, in
/// L2).
const BAND_BUDGET: usize = 1 << 18;

/// Pixels of one band of [`pointwise_in_place`] with `cout` output channels (64 at least).
fn band_pixels(cout: usize) -> usize {
    (BAND_BUDGET / cout.max(1)).max(64)
}

thread_local! {
    /// Each thread's band of a pointwise convolution's output, before it is copied over the
    /// input.
    static BAND: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `x` (`[batch, in, pixels]`) becomes `[batch, out, pixels]` (its first `batch * out *
/// pixels` elements), the 1x1 convolution by `weight` (`[out, in]`) plus `bias`: image by image,
/// each image's pixels in bands on rayon, each band multiplied into its thread's buffer and
/// then copied over the input at the same pixels. Output image `n` lands on the pixels of
/// input image `n` (channels shifted down by `n (in - out)`) or of the images before it, which
/// are done, so a band overwrites only what it has read.
fn pointwise_in_place(
    x: &mut [f32],
    weight: &[f32],
    bias: Option<&[f32]>,
    [batch, cin, cout, pixels]: [usize; 4],
) {
    assert!(cout <= cin);
    assert_eq!(x.len(), batch * cin * pixels);
    assert_eq!(weight.len(), cout * cin);
    assert!(bias.is_none_or(|b| b.len() == cout));
    let band = band_pixels(cout).min(pixels);
    let bands = pixels.div_ceil(band);
    let x_ptr = host::SharedMut(x.as_mut_ptr());
    for image in 0..batch {
        (0..bands).into_par_iter().for_each(|b| {
            let p0 = b * band;
            let n = band.min(pixels - p0);
            host::with_buffer(&BAND, |buf| {
                let out = grow(buf, cout * n);
                if let Some(bias) = bias {
                    for (row, &b) in out.chunks_exact_mut(n).zip(bias) {
                        row.fill(b);
                    }
                }
                // SAFETY: out is [cout, n] row-major; weight [cout, cin] row-major; the right
                // operand is pixels p0..p0 + n of image `image`'s cin planes (row stride
                // `pixels`), inside `x` (checked above), which no task writes before every
                // band of this image has been read (see below); out aliases neither.
                unsafe {
                    host::gemm_rows(
                        (out.as_mut_ptr(), n),
                        bias.is_some(),
                        (weight.as_ptr(), cin),
                        (x_ptr.get().add(image * cin * pixels + p0), pixels),
                        [cout, cin, n],
                    )
                };
                for (o, row) in out.chunks_exact(n).enumerate() {
                    // SAFETY: output channel o's pixels p0..p0 + n: inside `x` (cout <= cin),
                    // at pixels p0..p0 + n of a plane of this image, which only this task
                    // reads and it has read them, or of an earlier image, which is done.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            x_ptr.get().add((image * cout + o) * pixels + p0),
                            n,
                        )
                    };
                    dst.copy_from_slice(row);
                }
            });
        });
    }
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
    if runs_winograd(shape, algorithm) {
        winograd::conv3x3(x, weight, bias, shape, None, &mut out);
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
    /// The convolution of `x` by `weight` (and `bias`), or `None` where their channels do not
    /// match (groups other than 1), or as [`new`](Self::new).
    pub(super) fn of(
        x: &Tensor<4>,
        weight: &Tensor<4>,
        bias: Option<&Tensor<1>>,
        options: Conv2dOptions,
    ) -> Option<Self> {
        let [batch, cin, h, w] = x.dims();
        let [cout, wcin, kh, kw] = weight.dims();
        if wcin != cin || bias.is_some_and(|b| b.dims() != [cout]) {
            return None;
        }
        Self::new([batch, cin, h, w], [cout, kh, kw], options)
    }

    /// `None` for an empty output or a zero stride or dilation.
    pub(super) fn new(
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
pub(super) fn im2col(x: &[f32], s: &ConvShape, row0: usize, rows: usize, panel: &mut [f32]) {
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
    use crate::reference::seeded_normal;
    use burn::tensor::Device;
    use burn::tensor::module::conv2d as burn_conv2d;
    use burn::tensor::ops::ConvOptions;

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
        for (x, w, options, bias) in geometries(&[]) {
            let xt = seeded_normal(x, 1, &device);
            let wt = seeded_normal(w, 2, &device);
            let bt = bias.then(|| seeded_normal([w[0]], 30, &device));
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
                let xt = seeded_normal(x, 3, &device).cast(dtype);
                let wt = seeded_normal(w, 4, &device).cast(dtype);
                let bt = bias.then(|| seeded_normal([w[0]], 31, &device).cast(dtype));
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
        let x = seeded_normal([2, 64, 24, 24], 5, &device);
        let w = seeded_normal([96, 64, 3, 3], 6, &device);
        let b = seeded_normal([96], 7, &device);
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

    fn values(t: &Tensor<4>) -> Vec<f32> {
        t.to_data().convert::<f32>().try_into_vec::<f32>().unwrap()
    }

    /// The GroupNorm folded into Winograd's input transform gives bit for bit the convolution of
    /// the tensor Kiln's GroupNorm kernel writes, with and without the affine and the SiLU,
    /// padding 1 and none, odd sizes, a batch of two (statistics per image), shared and
    /// per-task transformed inputs; the input is left as it was; `None` where Winograd's
    /// algorithm does not run (a 1x1 kernel, small images, bf16).
    #[test]
    fn group_norm_conv2d_is_the_normalised_convolution() {
        if std::env::var_os("KILN_CONV").is_some() {
            return; // the diagnostic override changes which convolutions run Winograd
        }
        let device = Device::flex();
        let o = |p: usize| Conv2dOptions {
            stride: [1, 1],
            padding: [[p, p], [p, p]],
            dilation: [1, 1],
        };
        for (x, groups, cout, padding, affine, silu) in [
            ([2, 64, 16, 16], 32, 48, 1, true, true),
            ([2, 96, 21, 17], 32, 130, 1, true, true),
            ([2, 12, 18, 18], 4, 8, 0, false, true),
            ([2, 16, 20, 24], 8, 16, 1, true, false),
            // five panels: each task transforms its own panels' input
            ([1, 256, 160, 64], 32, 64, 1, true, true),
        ] {
            let cin = x[1];
            // an offset, so that the statistics matter
            let xt = seeded_normal(x, 8, &device) + 3.0;
            let before = values(&xt);
            let wt = seeded_normal([cout, cin, 3, 3], 9, &device);
            let bt = seeded_normal([cout], 10, &device);
            let gamma = seeded_normal([cin], 11, &device);
            let beta = seeded_normal([cin], 12, &device);
            let affine = affine.then_some((&gamma, &beta));
            let norm = InputGroupNorm {
                groups,
                eps: 1e-6,
                affine,
                silu,
            };
            let ours = group_norm_conv2d(&xt, norm, &wt, Some(&bt), o(padding)).unwrap();
            let normed = super::super::group_norm(&xt, groups, 1e-6, affine, silu).unwrap();
            let expected = conv2d(&normed, &wt, Some(&bt), o(padding)).unwrap();
            assert_eq!(ours.dims(), expected.dims(), "{x:?}");
            assert!(values(&ours) == values(&expected), "{x:?} -> {cout}");
            assert!(values(&xt) == before, "{x:?}: the input changed");
        }
        let norm = InputGroupNorm {
            groups: 4,
            eps: 1e-6,
            affine: None,
            silu: true,
        };
        let x = seeded_normal([2, 8, 16, 16], 13, &device);
        let pointwise = seeded_normal([4, 8, 1, 1], 14, &device);
        assert!(group_norm_conv2d(&x, norm, &pointwise, None, o(0)).is_none());
        let w = seeded_normal([4, 8, 3, 3], 15, &device);
        let small = seeded_normal([1, 8, 8, 8], 16, &device);
        assert!(group_norm_conv2d(&small, norm, &w, None, o(1)).is_none());
        let half = |t: &Tensor<4>| t.clone().cast(burn::tensor::DType::BF16);
        assert!(group_norm_conv2d(&half(&x), norm, &half(&w), None, o(1)).is_none());
        assert!(group_norm_conv2d(&x, norm, &w, None, o(1)).is_some());
    }

    /// A 1x1 convolution written over its input: Kiln's convolution's result within f32
    /// rounding and burn's within 1e-5, for fewer and as many output channels, batches of one
    /// to three (later images land on earlier ones' storage), bands that do not divide the
    /// image, with and without a bias; the result works as any tensor afterwards; a shared
    /// input, more output channels, too few pixels, another kernel size and another dtype are
    /// given back untouched.
    #[test]
    fn pointwise_owned_writes_over_its_input() {
        let device = Device::flex();
        let options = Conv2dOptions {
            stride: [1, 1],
            padding: [[0, 0], [0, 0]],
            dilation: [1, 1],
        };
        // each image at least eight bands of BAND_BUDGET / out pixels
        for (x, cout, bias) in [
            ([1, 1100, 50, 43], 1000, true),
            ([3, 600, 70, 61], 500, true),
            ([2, 600, 70, 60], 600, false),
            // the pages past the output go back to the system
            ([1, 32, 512, 512], 8, true),
        ] {
            assert!(pointwise_in_place_applies(x, cout), "{x:?} -> {cout}");
            let xt = seeded_normal(x, 17, &device);
            let wt = seeded_normal([cout, x[1], 1, 1], 32, &device);
            let bt = seeded_normal([cout], 18, &device);
            let bias = bias.then_some(&bt);
            let expected = conv2d(&xt, &wt, bias, options).unwrap();
            let reference = burn_reference(&xt, &wt, bias, options);
            // a copy of x's elements that nothing else holds
            let owned = Tensor::<4>::from_data(xt.to_data(), &device);
            let ours = conv2d_pointwise_owned(owned, &wt, bias).unwrap();
            assert_eq!(ours.dims(), [x[0], cout, x[2], x[3]]);
            let relative = crate::reference::max_relative_error(&ours, &expected);
            assert!(relative < 1e-6, "{x:?} -> {cout}: {relative:e}");
            let relative = crate::reference::max_relative_error(&ours, &reference);
            assert!(relative < 1e-5, "{x:?} -> {cout}: {relative:e}");
            let doubled = values(&(ours.clone() + ours));
            let twice: Vec<f32> = values(&expected).iter().map(|v| v * 2.0).collect();
            let close = doubled
                .iter()
                .zip(&twice)
                .all(|(a, b)| (a - b).abs() <= 1e-5 * (1.0 + b.abs()));
            assert!(close, "{x:?}: the result as an operand");
        }
        let x = seeded_normal([1, 300, 128, 64], 19, &device);
        let before = values(&x);
        let w = seeded_normal([256, 300, 1, 1], 20, &device);
        assert!(pointwise_in_place_applies(x.dims(), 256));
        // too few pixels for eight bands: the convolution allocates
        assert!(!pointwise_in_place_applies([2, 960, 64, 64], 320));
        assert!(!pointwise_in_place_applies([1, 8, 1024, 1], 9));
        let held = x.clone();
        let back = conv2d_pointwise_owned(x, &w, None).unwrap_err();
        assert!(values(&back) == before && values(&held) == before);
        drop(held);
        let wide = seeded_normal([301, 300, 1, 1], 21, &device);
        let back = conv2d_pointwise_owned(back, &wide, None).unwrap_err();
        let three = seeded_normal([256, 300, 3, 3], 22, &device);
        let back = conv2d_pointwise_owned(back, &three, None).unwrap_err();
        assert!(values(&back) == before);
        let half = back.cast(burn::tensor::DType::BF16);
        assert!(conv2d_pointwise_owned(half, &w.cast(burn::tensor::DType::BF16), None).is_err());
    }
}
