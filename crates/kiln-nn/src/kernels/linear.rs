//! Kiln's linear layer kernel: `x W + b`, in tasks of rows by output columns.
//!
//! burn's `Linear` multiplies a `[batch, tokens, in]` input as a batched matmul against the
//! broadcast weight, then adds the bias in a second pass over the output: at the UNet's
//! feed-forward (`[2, 4096, 320] -> 2560`) it runs at 72 GFLOP/s on the 2-core Xeon, where one
//! gemm call on the flattened rows reaches 185. Here the rows are flattened (the input is
//! already row-major) and cut with the output columns into tasks of [`TASK_ROWS`] x
//! [`TASK_COLS`] on rayon ([`tiled_linear`]); each task runs gemm single-threaded and adds the
//! bias to its block of the output while the block is in cache. In f32 the operands are read
//! in place and the product written straight into the output (filling the output with the bias
//! first and accumulating onto it, as this kernel did, cost a write and a read of the whole
//! output: 10-25% of the feed-forward's time); in bf16 and f16 each task widens its rows and
//! its block of weight columns into its thread's buffers (widening the whole weight at every
//! call, as before, cost about a third of a bf16 UNet step on a CPU without AMX) and rounds its
//! block of the output.
//!
//! In bf16 the product runs on AMX tiles where the CPU has them (the weights packed into the
//! tiles' layout once and kept while they live, the rows in tasks of [`AMX_ROWS`], read in
//! place where they are aligned and packed otherwise, the bias added and the result rounded to
//! bf16 as each block is stored).

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::host::{self, Float};

/// `x W + b` for flex tensors (burn's `Linear` layout: `weight` is `[in, out]`) in f32, bf16 or
/// f16, or `None` (the caller then uses burn's op).
///
/// # Shapes
/// - `x`: `[..., in]`, `weight`: `[in, out]`, `bias`: `[out]`
/// - output: `[..., out]`
pub fn linear<const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
) -> Option<Tensor<D>> {
    let mut dims = x.dims();
    let d_in = dims[D - 1];
    let [w_in, d_out] = weight.dims();
    let rows: usize = dims[..D - 1].iter().product();
    if w_in != d_in || bias.is_some_and(|b| b.dims() != [d_out]) || rows * d_in * d_out == 0 {
        return None;
    }
    let dtype = x.dtype();
    if weight.dtype() != dtype || bias.is_some_and(|b| b.dtype() != dtype) {
        return None;
    }
    dims[D - 1] = d_out;
    let sizes = [rows, d_in, d_out];
    match host::reduced_precision(x) {
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        Some(burn::tensor::DType::BF16) if super::native_bf16() => {
            amx_linear(x, weight, bias, sizes, dims)
        }
        Some(burn::tensor::DType::BF16) => {
            tiled_linear::<half::bf16, D>(x, weight, bias, sizes, dims)
        }
        Some(_) => tiled_linear::<half::f16, D>(x, weight, bias, sizes, dims),
        None if dtype == burn::tensor::DType::F32 => {
            tiled_linear::<f32, D>(x, weight, bias, sizes, dims)
        }
        None => None,
    }
}

/// Rows of one task of [`tiled_linear`]. Measured on the 2-core Xeon of 2026-12-06 at the UNet's
/// shapes in f32 (`[8192, 320] -> 320, 2560`, `[8192, 1280] -> 320`, `[2048, 640] -> 5120`,
/// `[512, 1280] -> 10240`), against one multithreaded gemm onto the output filled with the bias:
/// tasks of 512 x 512 took 0.78-0.95x its time (`cargo run --release -p kiln-nn --example
/// op_timings`, before and after). 256 x 256, 512 x 256, 1024 x 256 and 512 x 1024 were within
/// the machine's noise (10%) of 512 x 512, in f32 and in bf16 without AMX (`bf16_timings
/// linear`).
const TASK_ROWS: usize = 512;
/// Output columns of one task of [`tiled_linear`].
const TASK_COLS: usize = 512;

/// Task counts below which an odd count gets one more column of tasks (where that leaves
/// tasks of at least [`MIN_SPLIT_COLS`] columns): three equal tasks on two cores leave one idle
/// for a third of the call. SDXL's transformer blocks at 512 px run `[512, 1280] -> 1280`
/// 372 times a step and `[512, 5120] -> 1280` 60 times, three tasks each.
const EVEN_BELOW: usize = 8;
/// Output columns of a task at least, where [`EVEN_BELOW`] splits the columns further.
const MIN_SPLIT_COLS: usize = 128;

/// The rows and output columns of one task of [`tiled_linear`]: at most [`TASK_ROWS`] x
/// [`TASK_COLS`], the output cut into equal tasks (to a multiple of 8 rows and 16 columns), so
/// that a few large tasks do not leave a thread idle, and into an even number of them where
/// they are few ([`EVEN_BELOW`]). The text encoder's `[154, 768] -> 768` was one task of 512
/// columns and one of 256, a thread waiting a third of the time. The shape depends on the
/// sizes only, not on the thread count.
fn task_shape(rows: usize, d_out: usize) -> [usize; 2] {
    let row_tasks = rows.div_ceil(TASK_ROWS);
    let mut col_tasks = d_out.div_ceil(TASK_COLS);
    let tasks = row_tasks * col_tasks;
    if tasks < EVEN_BELOW && tasks % 2 == 1 && d_out / (col_tasks + 1) >= MIN_SPLIT_COLS {
        col_tasks += 1;
    }
    let task_rows = rows.div_ceil(row_tasks.max(1)).next_multiple_of(8);
    let task_cols = d_out.div_ceil(col_tasks.max(1)).next_multiple_of(16);
    [task_rows.min(TASK_ROWS), task_cols.min(TASK_COLS)]
}

std::thread_local! {
    /// Each thread's widened rows, widened block of weight columns and f32 result block (bf16
    /// and f16 only).
    static WIDE: std::cell::Cell<[Vec<f32>; 3]> = const {
        std::cell::Cell::new([Vec::new(), Vec::new(), Vec::new()])
    };
}

/// The input and the weight read in place as `T` on the host (their lengths checked against
/// `[rows, d_in, d_out]`), the bias widened to f32.
#[allow(clippy::type_complexity)]
fn host_operands<T: Float, const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    [rows, d_in, d_out]: [usize; 3],
) -> Option<(host::Host<T>, host::Host<T>, Option<Vec<f32>>)> {
    let bias = match bias {
        Some(b) => Some(host::bias_f32(b)?),
        None => None,
    };
    let (x, weight) = (
        host::Host::<T>::new(x.clone())?,
        host::Host::<T>::new(weight.clone())?,
    );
    assert_eq!(x.as_slice().len(), rows * d_in);
    assert_eq!(weight.as_slice().len(), d_in * d_out);
    Some((x, weight, bias))
}

/// `x W + b` computed in f32 in tasks of at most [`TASK_ROWS`] rows by [`TASK_COLS`] output
/// columns ([`task_shape`]; see the module's doc). The tasks depend on the shapes only, so the
/// result does not depend on the thread count.
fn tiled_linear<T: Float, const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    [rows, d_in, d_out]: [usize; 3],
    dims: [usize; D],
) -> Option<Tensor<D>> {
    let (x, weight, bias) = host_operands::<T, D>(x, weight, bias, [rows, d_in, d_out])?;
    let (xs, ws) = (x.as_slice(), weight.as_slice());
    let mut out = Vec::<T>::with_capacity(rows * d_out);
    let out_ptr = host::SharedMut(out.as_mut_ptr());
    let [task_rows, task_cols] = task_shape(rows, d_out);
    let (row_tasks, col_tasks) = (rows.div_ceil(task_rows), d_out.div_ceil(task_cols));
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let (r0, j0) = (task / col_tasks * task_rows, task % col_tasks * task_cols);
        let (n, cols) = (task_rows.min(rows - r0), task_cols.min(d_out - j0));
        let bias = bias.as_ref().map(|b| &b[j0..j0 + cols]);
        // SAFETY (for the pointers into `out` below): rows r0..r0 + n, columns j0..j0 + cols
        // of the output are this task's alone, and inside its `rows * d_out` capacity.
        let block = unsafe { out_ptr.get().add(r0 * d_out + j0) };
        let rows_in = &xs[r0 * d_in..(r0 + n) * d_in];
        if let (Some(xw), Some(w)) = (T::as_f32(rows_in), T::as_f32(ws)) {
            // SAFETY: the block is [n, cols] with row stride d_out (see above; `T` is f32), xw
            // [n, d_in] row-major and w's columns j0..j0 + cols [d_in, cols] with row stride
            // d_out, inside `ws`; the output aliases neither.
            unsafe {
                host::gemm_rows(
                    (block.cast(), d_out),
                    false,
                    (xw.as_ptr(), d_in),
                    (w.as_ptr().add(j0), d_out),
                    [n, d_in, cols],
                );
                if let Some(b) = bias {
                    for i in 0..n {
                        let row = std::slice::from_raw_parts_mut(block.add(i * d_out).cast(), cols);
                        add_in_place(row, b);
                    }
                }
            }
            return;
        }
        host::with_buffer(&WIDE, |[xbuf, wbuf, obuf]| {
            let xw = T::widen(rows_in, xbuf);
            let w = host::grow(wbuf, d_in * cols);
            for (kk, dst) in w.chunks_exact_mut(cols).enumerate() {
                T::widen_into(&ws[kk * d_out + j0..kk * d_out + j0 + cols], dst);
            }
            let o = host::grow(obuf, n * cols);
            // SAFETY: o is [n, cols], xw [n, d_in] and w [d_in, cols], all row-major of those
            // lengths; o aliases neither.
            unsafe {
                host::gemm_rows(
                    (o.as_mut_ptr(), cols),
                    false,
                    (xw.as_ptr(), d_in),
                    (w.as_ptr(), cols),
                    [n, d_in, cols],
                )
            };
            for (i, row) in o.chunks_exact_mut(cols).enumerate() {
                if let Some(b) = bias {
                    add_in_place(row, b);
                }
                // SAFETY: see above.
                let dst = unsafe { std::slice::from_raw_parts_mut(block.add(i * d_out), cols) };
                T::narrow(row, dst);
            }
        });
    });
    // SAFETY: the tasks have written every element of the `rows * d_out` capacity (their
    // blocks cover the output).
    unsafe { out.set_len(rows * d_out) };
    Some(host::tensor(out, dims))
}

vectorised! {
    /// `row[j] += bias[j]`.
    fn add_in_place(row: &mut [f32], bias: &[f32]) {
        for (x, b) in row.iter_mut().zip(bias) {
            *x += b;
        }
    }
}

/// Rows of one AMX task (four blocks of 32).
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
const AMX_ROWS: usize = 128;

#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
std::thread_local! {
    /// Each thread's packed operands, kept between calls so that they are not faulted in again.
    static PACKED_A: std::cell::Cell<super::amx::Aligned> = std::cell::Cell::default();
}

/// The bf16 product on AMX tiles (see the module's doc).
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
fn amx_linear<const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    [rows, d_in, d_out]: [usize; 3],
    dims: [usize; D],
) -> Option<Tensor<D>> {
    use super::amx;
    use half::bf16;
    let (x, weight, bias) = host_operands::<bf16, D>(x, weight, bias, [rows, d_in, d_out])?;
    let init = match &bias {
        Some(b) => amx::Init::ColBias(b),
        None => amx::Init::Zero,
    };
    let xs = x.as_slice();
    let mut out = bytemuck::zeroed_vec::<bf16>(rows * d_out);
    let out_ptr = host::SharedMut(out.as_mut_ptr());
    let packed = amx::packed_weight(&weight, amx::Operand::Right, [d_in, d_out], [d_out, 1]);
    let b = packed.right();
    (0..rows.div_ceil(AMX_ROWS))
        .into_par_iter()
        .for_each(|task| {
            let r0 = task * AMX_ROWS;
            let n = AMX_ROWS.min(rows - r0);
            host::with_buffer(&PACKED_A, |abuf| {
                let rows = &xs[r0 * d_in..(r0 + n) * d_in];
                let a = match amx::Lhs::in_place(rows, n, d_in) {
                    Some(a) => a,
                    None => amx::pack_a(rows, d_in, n, d_in, abuf),
                };
                let epilogue = amx::Epilogue {
                    // SAFETY: rows r0..r0 + n of the output are this task's alone.
                    out: unsafe { out_ptr.get().add(r0 * d_out) },
                    stride: d_out,
                    rows: n,
                    cols: d_out,
                    init,
                };
                let _tiles = amx::Tiles::new();
                // SAFETY: `a` holds rows r0..r0 + n and `b` all columns, both packed from
                // the same k; the epilogue's view is this task's rows of `out`.
                unsafe { amx::multiply(&a, &b, &epilogue, amx::Order::ColumnsOuter) };
            });
        });
    Some(host::tensor(out, dims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::seeded_normal;
    use burn::nn::LinearConfig;
    use burn::tensor::Device;

    /// Against burn's `Linear` (the op it replaces), with and without bias, ranks 2 to 4.
    #[test]
    fn matches_burns_linear() {
        let device = Device::flex();
        for bias in [true, false] {
            let layer = LinearConfig::new(70, 300).with_bias(bias).init(&device);
            let b = layer.bias.as_ref().map(|b| b.val());
            let x3 = seeded_normal([2, 33, 70], 1, &device);
            let ours = linear(&x3, &layer.weight.val(), b.as_ref()).unwrap();
            let error = crate::reference::max_relative_error(&ours, &layer.forward(x3));
            assert!(error < 1e-5, "bias {bias}: {error:e}");
            let x2 = seeded_normal([5, 70], 2, &device);
            let ours = linear(&x2, &layer.weight.val(), b.as_ref()).unwrap();
            assert!(crate::reference::max_relative_error(&ours, &layer.forward(x2)) < 1e-5);
            let x4 = seeded_normal([2, 3, 4, 70], 3, &device);
            let ours = linear(&x4, &layer.weight.val(), b.as_ref()).unwrap();
            assert!(crate::reference::max_relative_error(&ours, &layer.forward(x4)) < 1e-5);
        }
        // several tasks of rows and of output columns, the last ones partial
        let layer = LinearConfig::new(70, 1100).init(&device);
        let x = seeded_normal([2, 600, 70], 4, &device);
        let b = layer.bias.as_ref().map(|b| b.val());
        let ours = linear(&x, &layer.weight.val(), b.as_ref()).unwrap();
        assert!(crate::reference::max_relative_error(&ours, &layer.forward(x)) < 1e-5);
        // a strided input (a transposed view) is made contiguous first
        let layer = LinearConfig::new(8, 3).init(&device);
        let xt = seeded_normal([2, 8, 5], 5, &device).swap_dims(1, 2);
        let b = layer.bias.as_ref().map(|b| b.val());
        let ours = linear(&xt, &layer.weight.val(), b.as_ref()).unwrap();
        assert!(crate::reference::max_relative_error(&ours, &layer.forward(xt)) < 1e-5);
    }

    /// Tasks are at most 512 x 512, cover the output, and are equal but for the last, which
    /// is short by less than the rounding (8 rows, 16 columns).
    #[test]
    fn tasks_are_equal_and_bounded() {
        for (rows, d_out) in [
            (154, 768),
            (8192, 320),
            (8192, 1280),
            (2048, 5120),
            (512, 1280),
            (1, 1),
        ] {
            let [tr, tc] = task_shape(rows, d_out);
            assert!(
                tr <= TASK_ROWS && tc <= TASK_COLS,
                "{rows}x{d_out}: {tr}x{tc}"
            );
            let (nr, nc) = (rows.div_ceil(tr), d_out.div_ceil(tc));
            let (last_r, last_c) = (rows - (nr - 1) * tr, d_out - (nc - 1) * tc);
            assert!(
                tr - last_r < 8 * nr && tc - last_c < 16 * nc,
                "{rows}x{d_out}"
            );
        }
        // the text encoder's [154, 768] -> 768: two tasks of 384 columns, not 512 and 256
        assert_eq!(task_shape(154, 768), [160, 384]);
        assert_eq!(task_shape(8192, 1280), [512, 432]);
        // SDXL's [512, 1280] -> 1280 and [154, 2048] -> 1280: four tasks of 320 columns, not
        // three of 432; one task becomes two, unless that leaves fewer than 128 columns each
        assert_eq!(task_shape(512, 1280), [512, 320]);
        assert_eq!(task_shape(154, 1280), [160, 320]);
        assert_eq!(task_shape(512, 320), [512, 160]);
        assert_eq!(task_shape(512, 200), [512, 208]);
    }

    /// bf16 (on AMX tiles where the CPU has them, else widened) gives the f32 result of the
    /// same bf16 operands rounded to bf16; f16 likewise.
    #[test]
    fn bf16_and_f16_round_the_f32_result_of_their_operands() {
        use burn::tensor::DType;
        let device = Device::flex();
        // rows in place (multiples of 32, k of 32) and packed; columns not a multiple of 32;
        // without AMX, several tasks of rows and of columns, the last ones partial
        for (dims, d_in, d_out) in [
            ([2, 64], 320, 72),
            ([3, 11], 70, 40),
            ([1, 160], 64, 1),
            ([2, 300], 96, 300),
            ([1, 1100], 40, 300),
            ([1, 700], 40, 1100),
        ] {
            for dtype in [DType::BF16, DType::F16] {
                let x = seeded_normal([dims[0], dims[1], d_in], 30, &device).cast(dtype);
                let w = seeded_normal([d_in, d_out], 6, &device).cast(dtype);
                let b = seeded_normal([d_out], 7, &device).cast(dtype);
                let ours = linear(&x, &w, Some(&b)).unwrap();
                assert_eq!(ours.dtype(), dtype);
                let wide = |t: Tensor<3>| t.cast(DType::F32);
                let exact = linear(
                    &wide(x.clone()),
                    &w.clone().cast(DType::F32),
                    Some(&b.clone().cast(DType::F32)),
                )
                .unwrap();
                if dtype == DType::BF16 {
                    let ulps = crate::kernels::bf16_check::ulps(&ours, &exact);
                    assert!(ulps <= 1.0, "{dims:?} {d_in} {d_out}: {ulps} half-ulps");
                } else {
                    let error = crate::reference::max_relative_error(&wide(ours), &exact);
                    assert!(error < 1e-3, "{dims:?} {d_in} {d_out} f16: {error:e}");
                }
                let unbiased = linear(&x, &w, None).unwrap();
                let exact = linear(&wide(x), &w.cast(DType::F32), None).unwrap();
                assert!(crate::reference::max_relative_error(&wide(unbiased), &exact) < 4e-3);
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_the_result() {
        let device = Device::flex();
        let x = seeded_normal([2, 500, 320], 8, &device);
        let w = seeded_normal([320, 640], 9, &device);
        let b = seeded_normal([640], 10, &device);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let out = pool.install(|| linear(&x, &w, Some(&b)).unwrap());
            out.into_data().try_into_vec::<f32>().unwrap()
        };
        assert_eq!(run(1), run(3));
    }
}
