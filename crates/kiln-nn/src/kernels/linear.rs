//! Kiln's linear layer kernel: `x W + b` in f32, one GEMM into an output prefilled with the bias.
//!
//! burn's `Linear` multiplies a `[batch, tokens, in]` input as a batched matmul against the
//! broadcast weight, then adds the bias in a second pass over the output: at the UNet's
//! feed-forward (`[2, 4096, 320] -> 2560`) it runs at 72 GFLOP/s on the 2-core Xeon, where one
//! gemm call on the flattened rows reaches 185. Here the rows are flattened (the input is
//! already row-major), the output is filled with the bias and the product is accumulated onto
//! it by gemm on rayon.
//!
//! In bf16 the product runs on AMX tiles where the CPU has them (the weights packed into the
//! tiles' layout once and kept while they live, the rows in tasks of [`AMX_ROWS`], read in
//! place where they are aligned and packed otherwise, the bias added and the result rounded to
//! bf16 as each block is stored); elsewhere, and in f16, in f32 tasks that widen their rows and
//! their block of weight columns in cache ([`reduced_linear`]): widening the whole weight at
//! every call, as before, cost about a third of a bf16 UNet step on a CPU without AMX.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::host::{self, Float, HostF32};

/// Below this many multiply-adds the GEMM runs on one thread (as burn-flex decides).
const PARALLEL_MIN: usize = 192 * 192 * 192;

/// `x W + b` for plain f32 flex tensors (burn's `Linear` layout: `weight` is `[in, out]`), or
/// `None` (the caller then uses burn's op).
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
    if let Some(dtype) = host::reduced_precision(x) {
        if weight.dtype() != dtype || bias.is_some_and(|b| b.dtype() != dtype) {
            return None;
        }
        #[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
        if dtype == burn::tensor::DType::BF16 && super::native_bf16() {
            dims[D - 1] = d_out;
            return amx_linear(x, weight, bias, [rows, d_in, d_out], dims);
        }
        dims[D - 1] = d_out;
        return match dtype {
            burn::tensor::DType::BF16 => {
                reduced_linear::<half::bf16, D>(x, weight, bias, [rows, d_in, d_out], dims)
            }
            _ => reduced_linear::<half::f16, D>(x, weight, bias, [rows, d_in, d_out], dims),
        };
    }
    let x = HostF32::new(x.clone())?;
    let weight = HostF32::new(weight.clone())?;
    let bias = match bias {
        Some(b) => Some(HostF32::new(b.clone())?),
        None => None,
    };
    let mut out = vec![0f32; rows * d_out];
    if let Some(bias) = &bias {
        let bias = bias.as_slice();
        out.par_chunks_mut(d_out)
            .for_each(|row| row.copy_from_slice(bias));
    }
    let parallelism = if rows * d_in * d_out >= PARALLEL_MIN {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    let (xs, ws) = (x.as_slice(), weight.as_slice());
    assert_eq!(xs.len(), rows * d_in);
    assert_eq!(ws.len(), d_in * d_out);
    // SAFETY: out is [rows, d_out], x [rows, d_in] and weight [d_in, d_out], all row-major with
    // the lengths checked above; out aliases neither.
    unsafe {
        gemm::gemm(
            rows,
            d_out,
            d_in,
            out.as_mut_ptr(),
            1,
            d_out as isize,
            bias.is_some(),
            xs.as_ptr(),
            1,
            d_in as isize,
            ws.as_ptr(),
            1,
            d_out as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    dims[D - 1] = d_out;
    Some(host::tensor(out, dims))
}

/// Rows of one task of [`reduced_linear`]. Measured on the 2-core Xeon of 2026-12-06 with this
/// path run in f32 against the one-gemm f32 path, alternating in one process at the UNet's
/// shapes: tasks of 256 x 256 took 1.05-1.17x the one-gemm time, 512 x 512 1.02-1.09x, 1024 x
/// 256 1.00-1.07x, 2048 x 128 1.00-1.10x.
const WIDE_ROWS: usize = 1024;
/// Output columns of one task of [`reduced_linear`].
const WIDE_COLS: usize = 256;

std::thread_local! {
    /// Each thread's widened rows, widened block of weight columns and f32 result block.
    static WIDE: std::cell::Cell<[Vec<f32>; 3]> = const {
        std::cell::Cell::new([Vec::new(), Vec::new(), Vec::new()])
    };
}

/// The input and the weight read in place as `T` on the host, the bias widened to f32.
#[allow(clippy::type_complexity)]
fn host_operands<T: Float, const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
) -> Option<(host::Host<T>, host::Host<T>, Option<Vec<f32>>)> {
    let bias = match bias {
        Some(b) => Some(host::bias_f32(b)?),
        None => None,
    };
    Some((
        host::Host::<T>::new(x.clone())?,
        host::Host::<T>::new(weight.clone())?,
        bias,
    ))
}

/// `x W + b` in bf16 or f16, computed in f32 in tasks of [`WIDE_ROWS`] rows by [`WIDE_COLS`]
/// output columns: each widens its rows and its block of weight columns into its thread's
/// buffers (in cache, so that the weights are never copied whole at every call), multiplies
/// them with gemm, adds the bias and rounds its block of the output.
fn reduced_linear<T: Float, const D: usize>(
    x: &Tensor<D>,
    weight: &Tensor<2>,
    bias: Option<&Tensor<1>>,
    [rows, d_in, d_out]: [usize; 3],
    dims: [usize; D],
) -> Option<Tensor<D>> {
    let (x, weight, bias) = host_operands::<T, D>(x, weight, bias)?;
    let (xs, ws) = (x.as_slice(), weight.as_slice());
    assert_eq!(xs.len(), rows * d_in);
    assert_eq!(ws.len(), d_in * d_out);
    let mut out = bytemuck::zeroed_vec::<T>(rows * d_out);
    let out_ptr = host::SharedMut(out.as_mut_ptr());
    let (row_tasks, col_tasks) = (rows.div_ceil(WIDE_ROWS), d_out.div_ceil(WIDE_COLS));
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let (r0, j0) = (task / col_tasks * WIDE_ROWS, task % col_tasks * WIDE_COLS);
        let (n, cols) = (WIDE_ROWS.min(rows - r0), WIDE_COLS.min(d_out - j0));
        host::with_buffer(&WIDE, |[xbuf, wbuf, obuf]| {
            let xw = T::widen(&xs[r0 * d_in..(r0 + n) * d_in], xbuf);
            let w = host::grow(wbuf, d_in * cols);
            for (kk, dst) in w.chunks_exact_mut(cols).enumerate() {
                T::widen_into(&ws[kk * d_out + j0..kk * d_out + j0 + cols], dst);
            }
            let o = host::grow(obuf, n * cols);
            match &bias {
                Some(b) => o
                    .chunks_exact_mut(cols)
                    .for_each(|row| row.copy_from_slice(&b[j0..j0 + cols])),
                None => o.fill(0.0),
            }
            // SAFETY: o is [n, cols], xw [n, d_in] and w [d_in, cols], all row-major of those
            // lengths; o aliases neither.
            unsafe {
                gemm::gemm(
                    n,
                    cols,
                    d_in,
                    o.as_mut_ptr(),
                    1,
                    cols as isize,
                    true,
                    xw.as_ptr(),
                    1,
                    d_in as isize,
                    w.as_ptr(),
                    1,
                    cols as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            for (i, row) in o.chunks_exact(cols).enumerate() {
                // SAFETY: row r0 + i, columns j0..j0 + cols of the output are this task's.
                let dst = unsafe {
                    std::slice::from_raw_parts_mut(out_ptr.get().add((r0 + i) * d_out + j0), cols)
                };
                T::narrow(row, dst);
            }
        });
    });
    Some(host::tensor(out, dims))
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
    let (x, weight, bias) = host_operands::<bf16, D>(x, weight, bias)?;
    let init = match &bias {
        Some(b) => amx::Init::ColBias(b),
        None => amx::Init::Zero,
    };
    let (xs, ws) = (x.as_slice(), weight.as_slice());
    assert_eq!(xs.len(), rows * d_in);
    assert_eq!(ws.len(), d_in * d_out);
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
    use burn::nn::LinearConfig;
    use burn::tensor::{Device, Distribution};

    /// Against burn's `Linear` (the op it replaces), with and without bias, ranks 2 to 4.
    #[test]
    fn matches_burns_linear() {
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        for bias in [true, false] {
            let layer = LinearConfig::new(70, 300).with_bias(bias).init(&device);
            let b = layer.bias.as_ref().map(|b| b.val());
            let x3 = Tensor::<3>::random([2, 33, 70], normal, &device);
            let ours = linear(&x3, &layer.weight.val(), b.as_ref()).unwrap();
            let error = crate::reference::max_relative_error(&ours, &layer.forward(x3));
            assert!(error < 1e-5, "bias {bias}: {error:e}");
            let x2 = Tensor::<2>::random([5, 70], normal, &device);
            let ours = linear(&x2, &layer.weight.val(), b.as_ref()).unwrap();
            assert!(crate::reference::max_relative_error(&ours, &layer.forward(x2)) < 1e-5);
            let x4 = Tensor::<4>::random([2, 3, 4, 70], normal, &device);
            let ours = linear(&x4, &layer.weight.val(), b.as_ref()).unwrap();
            assert!(crate::reference::max_relative_error(&ours, &layer.forward(x4)) < 1e-5);
        }
        // a strided input (a transposed view) is made contiguous first
        let layer = LinearConfig::new(8, 3).init(&device);
        let xt = Tensor::<3>::random([2, 8, 5], normal, &device).swap_dims(1, 2);
        let b = layer.bias.as_ref().map(|b| b.val());
        let ours = linear(&xt, &layer.weight.val(), b.as_ref()).unwrap();
        assert!(crate::reference::max_relative_error(&ours, &layer.forward(xt)) < 1e-5);
    }

    /// bf16 (on AMX tiles where the CPU has them, else widened) gives the f32 result of the
    /// same bf16 operands rounded to bf16; f16 likewise.
    #[test]
    fn bf16_and_f16_round_the_f32_result_of_their_operands() {
        use burn::tensor::DType;
        let device = Device::flex();
        let normal = Distribution::Normal(0.0, 1.0);
        // rows in place (multiples of 32, k of 32) and packed; columns not a multiple of 32;
        // without AMX, several tasks of rows and of columns, the last ones partial
        for (dims, d_in, d_out) in [
            ([2, 64], 320, 72),
            ([3, 11], 70, 40),
            ([1, 160], 64, 1),
            ([2, 300], 96, 300),
            ([1, 1100], 40, 300),
        ] {
            for dtype in [DType::BF16, DType::F16] {
                let x = Tensor::<3>::random([dims[0], dims[1], d_in], normal, &device).cast(dtype);
                let w = Tensor::<2>::random([d_in, d_out], normal, &device).cast(dtype);
                let b = Tensor::<1>::random([d_out], normal, &device).cast(dtype);
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
        let normal = Distribution::Normal(0.0, 1.0);
        let x = Tensor::<3>::random([2, 500, 320], normal, &device);
        let w = Tensor::<2>::random([320, 640], normal, &device);
        let b = Tensor::<1>::random([640], normal, &device);
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
