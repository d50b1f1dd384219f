//! Zero-copy access to the host data of flex tensors (burn's `extension` feature).

use burn::tensor::{DType, Tensor, TensorData};
use burn_flex::{Flex, FlexTensor};

/// A contiguous f32 flex tensor whose elements can be borrowed in place.
pub(crate) struct HostF32(FlexTensor);

impl HostF32 {
    /// `t`'s flex primitive when `t` is a plain (not autodiff) f32 flex tensor, made contiguous
    /// (a copy only when it is a strided view); `None` otherwise.
    pub(crate) fn new<const D: usize>(t: Tensor<D>) -> Option<Self> {
        if t.dtype() != DType::F32 {
            return None;
        }
        let t = t.try_into_primitive::<Flex>().ok()?;
        let t = if t.is_contiguous() {
            t
        } else {
            t.to_contiguous()
        };
        Some(Self(t))
    }

    /// The elements in row-major order.
    pub(crate) fn as_slice(&self) -> &[f32] {
        let (start, end) = self
            .0
            .layout()
            .contiguous_offsets()
            .expect("made contiguous in `new`");
        &self.0.storage::<f32>()[start..end]
    }
}

/// A flex tensor of `shape` holding `data` (moved, not copied).
pub(crate) fn tensor<const D: usize>(data: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
    Tensor::from_data(TensorData::new(data, shape), &burn::tensor::Device::flex())
}
