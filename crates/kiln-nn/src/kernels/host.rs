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

/// `t`'s flex primitive and the range of its elements in its storage, where `t` is a plain (not
/// autodiff) flex tensor, contiguous, that nothing else holds, so that a kernel may overwrite
/// its elements in place (`try_storage_mut` then succeeds); `t` back otherwise.
// the error is the caller's own input handed back (a `Tensor` is 256 bytes), not an error value
#[allow(clippy::result_large_err)]
pub(crate) fn unique_flex<const D: usize>(
    t: Tensor<D>,
) -> Result<(FlexTensor, std::ops::Range<usize>), Tensor<D>> {
    // a plain flex tensor (checked on a handle that is dropped at once, so that `t` is again
    // the only one)
    if t.clone().try_into_primitive::<Flex>().is_err() {
        return Err(t);
    }
    let Ok(flex) = t.try_into_primitive::<Flex>() else {
        unreachable!("checked above");
    };
    match (flex.layout().contiguous_offsets(), flex.is_unique()) {
        (Some((start, end)), true) => Ok((flex, start..end)),
        _ => Err(Tensor::from_primitive::<Flex>(flex)),
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

/// `t` (bf16 or f16 on flex) in f32, widened in parallel vector loops (burn-flex's cast
/// converts one element at a time); other tensors through burn's cast.
pub(crate) fn widen<const D: usize>(t: &Tensor<D>) -> Tensor<D> {
    fn host<T: Float, const D: usize>(t: &Tensor<D>) -> Option<Tensor<D>> {
        Some(tensor(
            widen_vec(Host::<T>::new(t.clone())?.as_slice()),
            t.dims(),
        ))
    }
    let wide = match t.dtype() {
        DType::BF16 => host::<bf16, D>(t),
        DType::F16 => host::<half::f16, D>(t),
        _ => None,
    };
    wide.unwrap_or_else(|| t.clone().cast(DType::F32))
}

/// `t` (f32 on flex) rounded to `dtype` (bf16 or f16) as [`widen`] widens; other cases through
/// burn's cast.
pub(crate) fn narrow<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    fn host<T: Float, const D: usize>(t: &Tensor<D>) -> Option<Tensor<D>> {
        Some(tensor(
            narrow_vec::<T>(HostF32::new(t.clone())?.as_slice()),
            t.dims(),
        ))
    }
    let narrow = match dtype {
        DType::BF16 => host::<bf16, D>(&t),
        DType::F16 => host::<half::f16, D>(&t),
        _ => None,
    };
    narrow.unwrap_or_else(|| t.cast(dtype))
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

/// The float types the kernels read and write; each computes in f32, a chunk at a time (so
/// that bf16 and f16 are widened and rounded back in cache, never in whole-tensor copies).
pub(crate) trait Float: burn::tensor::Element + bytemuck::Pod + Send + Sync {
    /// `x` as f32: in place for f32, widened into `scratch` otherwise.
    fn widen<'a>(x: &'a [Self], scratch: &'a mut Vec<f32>) -> &'a [f32];
    /// Runs `f` on an f32 buffer of `out.len()` (`out` itself for f32) and stores it in `out`.
    fn store(out: &mut [Self], scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32]));
    /// `out[i] = src[i]` rounded to nearest (even).
    fn narrow(src: &[f32], out: &mut [Self]);
    /// `out[i] = src[i]` in f32.
    fn widen_into(src: &[Self], out: &mut [f32]);
    /// `x` itself where `Self` is f32, else `None` (for kernels that read f32 operands in place).
    fn as_f32(x: &[Self]) -> Option<&[f32]>;
    /// Runs `f` on `x` in f32 (`x` itself for f32, widened into `scratch` otherwise) and stores
    /// the result back into `x`.
    fn update(x: &mut [Self], scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) {
        let wide = grow(scratch, x.len());
        Self::widen_into(x, wide);
        f(wide);
        Self::narrow(wide, x);
    }
}

impl Float for f32 {
    fn widen<'a>(x: &'a [f32], _: &'a mut Vec<f32>) -> &'a [f32] {
        x
    }
    fn store(out: &mut [f32], _: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) {
        f(out)
    }
    fn narrow(src: &[f32], out: &mut [f32]) {
        out.copy_from_slice(src)
    }
    fn widen_into(src: &[f32], out: &mut [f32]) {
        out.copy_from_slice(src)
    }
    fn as_f32(x: &[f32]) -> Option<&[f32]> {
        Some(x)
    }
    fn update(x: &mut [f32], _: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) {
        f(x)
    }
}

macro_rules! reduced_float {
    ($t:ty) => {
        impl Float for $t {
            fn widen<'a>(x: &'a [$t], scratch: &'a mut Vec<f32>) -> &'a [f32] {
                let out = grow(scratch, x.len());
                Self::widen_into(x, out);
                out
            }
            fn widen_into(src: &[$t], out: &mut [f32]) {
                <$t as NarrowFrom>::widen_from(src, out)
            }
            fn as_f32(_: &[$t]) -> Option<&[f32]> {
                None
            }

            fn store(out: &mut [$t], scratch: &mut Vec<f32>, f: impl FnOnce(&mut [f32])) {
                let wide = grow(scratch, out.len());
                f(wide);
                <$t>::narrow(wide, out);
            }
            fn narrow(src: &[f32], out: &mut [$t]) {
                <$t as NarrowFrom>::narrow_from(src, out)
            }
        }
    };
}
reduced_float!(half::bf16);
reduced_float!(half::f16);

/// Hands the whole pages of `buf` past its first `keep` elements back to the system where the
/// call used at most an eighth of it and there are at least [`RELEASE_MIN`] bytes of them
/// (Linux: they read as zero afterwards, and fault in again when next written), so that a
/// thread buffer grown for a much larger call does not keep them resident through smaller
/// ones, while buffers whose size only wavers between calls stay in place; elsewhere it does
/// nothing.
pub(crate) fn release_tail(buf: &mut [f32], keep: usize) {
    if keep <= buf.len() / 8 {
        release_pages(buf, keep);
    }
}

/// Hands the whole pages of `buf` past its first `keep` elements back to the system where there
/// are at least [`RELEASE_MIN`] bytes of them (on Linux with glibc: they read as zero
/// afterwards, and fault in again when next written); elsewhere it does nothing.
pub(crate) fn release_pages(buf: &mut [f32], keep: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        static PAGE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        // SAFETY: `sysconf` only reads a system constant.
        let page = *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as usize,
            _ => 4096,
        });
        let base = buf.as_mut_ptr() as usize;
        let start = (base + keep.min(buf.len()) * 4).next_multiple_of(page);
        let end = (base + buf.len() * 4) / page * page;
        if end >= start + RELEASE_MIN {
            // SAFETY: [start, end) is whole pages inside `buf`, which the caller holds
            // exclusively; MADV_DONTNEED on private anonymous memory only zeroes those pages
            // (the allocator's own bookkeeping lies outside a live block).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (buf, keep);
}

/// The least [`release_pages`] hands back: 4 MiB.
const RELEASE_MIN: usize = 4 << 20;

/// The first `len` elements of the thread buffer `buf`, which is reallocated (zeroed) only when
/// it is too short, so that it is not faulted in again; the contents are the caller's to
/// overwrite.
pub(crate) fn grow(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buf.len() < len {
        *buf = vec![0f32; len];
    }
    &mut buf[..len]
}

impl NarrowFrom for half::bf16 {
    fn narrow_from(src: &[f32], out: &mut [Self]) {
        narrow_bf16(src, bytemuck::cast_slice_mut(out))
    }
    fn widen_from(src: &[Self], out: &mut [f32]) {
        widen_bf16(bytemuck::cast_slice(src), out)
    }
}
impl NarrowFrom for half::f16 {
    fn narrow_from(src: &[f32], out: &mut [Self]) {
        use half::slice::HalfFloatSliceExt;
        out.convert_from_f32_slice(src)
    }
    fn widen_from(src: &[Self], out: &mut [f32]) {
        use half::slice::HalfFloatSliceExt;
        src.convert_to_f32_slice(out)
    }
}

/// Conversion to and from f32 a slice at a time (vectorised; `half`'s own slice conversions use
/// F16C for f16 where the CPU has it).
trait NarrowFrom: Sized {
    fn narrow_from(src: &[f32], out: &mut [Self]);
    fn widen_from(src: &[Self], out: &mut [f32]);
}

vectorised! {
    /// `out[i]` = the bf16 of bits `src[i]` in f32 (exact).
    fn widen_bf16(src: &[u16], out: &mut [f32]) {
        for (o, &s) in out.iter_mut().zip(src) {
            *o = f32::from_bits(u32::from(s) << 16);
        }
    }
}

/// `x` rounded to the nearest bf16 (ties to even; NaN stays NaN), branch-free so that loops of
/// it vectorise: the same bits as `half::bf16::from_f32`.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let quiet = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() { quiet } else { rounded }
}

vectorised! {
    /// `out[i] = bf16_bits(src[i])`.
    pub(crate) fn narrow_bf16(src: &[f32], out: &mut [u16]) {
        for (o, &x) in out.iter_mut().zip(src) {
            *o = bf16_bits(x);
        }
    }
}

/// `data` widened to f32, in parallel chunks.
pub(crate) fn widen_vec<T: Float>(data: &[T]) -> Vec<f32> {
    use rayon::prelude::*;
    let mut out = vec![0f32; data.len()];
    out.par_chunks_mut(1 << 14)
        .zip(data.par_chunks(1 << 14))
        .for_each(|(o, d)| T::widen_into(d, o));
    out
}

/// `data` (f32) rounded to `T`, in parallel chunks.
pub(crate) fn narrow_vec<T: Float>(data: &[f32]) -> Vec<T> {
    use rayon::prelude::*;
    let mut out = bytemuck::zeroed_vec::<T>(data.len());
    out.par_chunks_mut(1 << 14)
        .zip(data.par_chunks(1 << 14))
        .for_each(|(o, d)| T::narrow(d, o));
    out
}

/// `dst = lhs rhs`, or `dst += lhs rhs` when `accumulate`, on this thread (the `gemm` crate,
/// single-threaded), for row-major matrices with the given row strides: `dst` `[m, n]`, `lhs`
/// `[m, k]`, `rhs` `[k, n]`. Without `accumulate`, `dst` is only written.
///
/// # Safety
/// Each pointer covers its matrix (`(rows - 1) * stride + columns` elements), and `dst` aliases
/// neither operand.
pub(crate) unsafe fn gemm_rows(
    (dst, dst_stride): (*mut f32, usize),
    accumulate: bool,
    (lhs, lhs_stride): (*const f32, usize),
    (rhs, rhs_stride): (*const f32, usize),
    [m, k, n]: [usize; 3],
) {
    // SAFETY: as the caller promises.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_stride as isize,
            accumulate,
            lhs,
            1,
            lhs_stride as isize,
            rhs,
            1,
            rhs_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A buffer a call used an eighth of or less loses the pages past what it used (they read
    /// as zero on Linux with glibc) and keeps what it used; one used more keeps everything.
    #[test]
    fn release_tail_keeps_what_was_used() {
        let len = 4 << 20; // 16 MiB of f32
        let mut buf = vec![1f32; len];
        release_tail(&mut buf, len / 4);
        assert!(
            buf.iter().all(|&x| x == 1.0),
            "a quarter used: nothing released"
        );
        let keep = len / 16;
        release_tail(&mut buf, keep);
        assert!(
            buf[..keep].iter().all(|&x| x == 1.0),
            "the used part changed"
        );
        let released = buf[keep..].iter().filter(|&&x| x == 0.0).count();
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            // all but the partial pages after `keep` and at the end (pages of up to 64 KiB)
            assert!(
                released + 2 * (16 << 10) >= len - keep,
                "{released} of {}",
                len - keep
            );
        } else {
            assert_eq!(released, 0);
        }
        // still usable: written again, it holds what it is given
        buf.fill(2.0);
        assert!(buf.iter().all(|&x| x == 2.0));
    }
}
