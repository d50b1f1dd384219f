//! Zero-copy access to the host data of flex tensors (burn's `extension` feature).

use burn::tensor::{DType, Element, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};
use half::bf16;

/// A contiguous flex tensor of element type `E` whose elements can be borrowed in place.
pub(crate) struct Host<E>(FlexTensor, std::marker::PhantomData<E>);

/// [`Host`] for f32, which every kernel reads.
pub(crate) type HostF32 = Host<f32>;

impl<E: Element + bytemuck::Pod> Host<E> {
    /// `t`'s flex primitive when `t` is a plain (not autodiff) flex tensor of `E`, made
    /// contiguous (a copy only when it is a strided view); `None` otherwise.
    pub(crate) fn new<const D: usize>(t: Tensor<D>) -> Option<Self> {
        if t.dtype() != E::dtype() {
            return None;
        }
        let t = t.try_into_primitive::<Flex>().ok()?;
        let t = if t.is_contiguous() {
            t
        } else {
            t.to_contiguous()
        };
        Some(Self(t, std::marker::PhantomData))
    }

    /// The flex tensor (a handle sharing its storage).
    pub(crate) fn primitive(&self) -> &FlexTensor {
        &self.0
    }

    /// The elements in row-major order.
    pub(crate) fn as_slice(&self) -> &[E] {
        let (start, end) = self
            .0
            .layout()
            .contiguous_offsets()
            .expect("made contiguous in `new`");
        &self.0.storage::<E>()[start..end]
    }
}

/// A flex tensor of `shape` holding `data` (moved, not copied), of `E`'s dtype.
pub(crate) fn tensor<E: Element, const D: usize>(data: Vec<E>, shape: [usize; D]) -> Tensor<D> {
    Tensor::from_data(
        TensorData::new(data, shape),
        (&burn::tensor::Device::flex(), E::dtype()),
    )
}

/// The dtype of `t` when it is a plain (not autodiff) flex tensor of f16 or bf16: the kernels
/// then run in f32 on widened copies ([`widen`]) and round the result back, where burn-flex
/// itself widens to f32 op by op (its matmul) or computes one scalar at a time.
pub(crate) fn reduced_precision<const D: usize>(t: &Tensor<D>) -> Option<DType> {
    let dtype = t.dtype();
    (matches!(dtype, DType::F16 | DType::BF16) && t.clone().try_into_primitive::<Flex>().is_ok())
        .then_some(dtype)
}

/// `t` in f32.
pub(crate) fn widen<const D: usize>(t: &Tensor<D>) -> Tensor<D> {
    t.clone().cast(DType::F32)
}

/// `bias` as f32 on the host, whatever its float dtype (the kernels add it in f32).
pub(crate) fn bias_f32(bias: &Tensor<1>) -> Option<Vec<f32>> {
    match bias.dtype() {
        DType::F32 => Some(HostF32::new(bias.clone())?.as_slice().to_vec()),
        DType::BF16 => Some(
            Host::<bf16>::new(bias.clone())?
                .as_slice()
                .iter()
                .map(|b| b.to_f32())
                .collect(),
        ),
        _ => Host::<f32>::new(widen(bias)).map(|b| b.as_slice().to_vec()),
    }
}

/// A pointer the tasks of one kernel share, each writing its own disjoint part of what it
/// points to.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: the kernels' tasks write disjoint parts through it (each use says which).
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so that closures capture the whole `Sync` wrapper).
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}

/// Runs `f` on this thread's buffer `key`, taken out of the thread-local for the call (so that
/// a nested call on the same thread, as rayon's work stealing can make, gets a fresh one
/// rather than a borrow panic) and put back after.
pub(crate) fn with_buffer<T: Default, R>(
    key: &'static std::thread::LocalKey<std::cell::Cell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut buf = key.take();
    let r = f(&mut buf);
    key.set(buf);
    r
}
