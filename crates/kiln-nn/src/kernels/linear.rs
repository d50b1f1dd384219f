//! Kiln's linear layer kernel: `x W + b` in f32, one GEMM into an output prefilled with the bias.
//!
//! burn's `Linear` multiplies a `[batch, tokens, in]` input as a batched matmul against the
//! broadcast weight, then adds the bias in a second pass over the output: at the UNet's
//! feed-forward (`[2, 4096, 320] -> 2560`) it runs at 72 GFLOP/s on the 2-core Xeon, where one
//! gemm call on the flattened rows reaches 185. Here the rows are flattened (the input is
//! already row-major), the output is filled with the bias and the product is accumulated onto
//! it by gemm on rayon.

use burn::tensor::Tensor;
use rayon::prelude::*;

use super::host::{self, HostF32};

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
