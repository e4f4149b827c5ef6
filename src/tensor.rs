//! Tensors: a dtype and a shape over a shared buffer.

use std::fmt;

use bytemuck::Pod;

use crate::buffer::{BufView, SharedBuf};
use crate::codec::MAX_DIMS;
use crate::{Error, Result};

/// Element type of a tensor. Half-precision types are carried as raw `u16`.
///
/// # Examples
///
/// ```
/// use miniray::{DType, Tensor};
/// let t = Tensor::zeros(DType::BF16, &[2])?;
/// assert_eq!(t.dtype(), DType::BF16);
/// assert_eq!(t.as_slice::<u16>()?, &[0, 0]); // half types read as raw u16
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    /// IEEE 754 half precision, read as `u16`.
    F16,
    /// bfloat16, read as `u16`.
    BF16,
    /// `f32`.
    F32,
    /// `f64`.
    F64,
    /// `u8`.
    U8,
    /// `i8`.
    I8,
    /// `u16`.
    U16,
    /// `i16`.
    I16,
    /// `u32`.
    U32,
    /// `i32`.
    I32,
    /// `u64`.
    U64,
    /// `i64`.
    I64,
}

impl DType {
    const ALL: [DType; 12] = [
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::U8,
        DType::I8,
        DType::U16,
        DType::I16,
        DType::U32,
        DType::I32,
        DType::U64,
        DType::I64,
    ];

    /// Bytes per element.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(miniray::DType::BF16.size_bytes(), 2);
    /// assert_eq!(miniray::DType::F64.size_bytes(), 8);
    /// ```
    pub fn size_bytes(self) -> usize {
        match self {
            DType::U8 | DType::I8 => 1,
            DType::F16 | DType::BF16 | DType::U16 | DType::I16 => 2,
            DType::F32 | DType::U32 | DType::I32 => 4,
            DType::F64 | DType::U64 | DType::I64 => 8,
        }
    }

    /// The code on the wire (see `docs/PROTOCOL.md`); 0 means "not a
    /// tensor". Explicit numbers: reordering the enum changes nothing.
    pub(crate) fn code(self) -> u32 {
        match self {
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::F32 => 3,
            DType::F64 => 4,
            DType::U8 => 5,
            DType::I8 => 6,
            DType::U16 => 7,
            DType::I16 => 8,
            DType::U32 => 9,
            DType::I32 => 10,
            DType::U64 => 11,
            DType::I64 => 12,
        }
    }

    pub(crate) fn from_code(code: u32) -> Result<DType> {
        Self::ALL
            .into_iter()
            .find(|d| d.code() == code)
            .ok_or_else(|| Error::Protocol(format!("unknown dtype code {code}")))
    }
}

/// A plain element type that tensor data can be read as.
///
/// Implemented for the primitive numbers; `u16` also reads `F16` and `BF16`
/// tensors, whose bits it carries unchanged.
///
/// # Examples
///
/// ```
/// fn total<T: miniray::Element + Into<f64>>(t: &miniray::Tensor) -> miniray::Result<f64> {
///     Ok(t.as_slice::<T>()?.iter().map(|&x| x.into()).sum())
/// }
/// let t = miniray::Tensor::from_slice(&[1.0f32, 2.0], &[2])?;
/// assert_eq!(total::<f32>(&t)?, 3.0);
/// # Ok::<(), miniray::Error>(())
/// ```
pub trait Element: Pod {
    /// The dtype a tensor built from `Self` gets.
    const DTYPE: DType;

    /// Whether a tensor of `dtype` can be read as `Self`.
    fn reads(dtype: DType) -> bool {
        dtype == Self::DTYPE
    }
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => { $(impl Element for $t { const DTYPE: DType = DType::$d; })* };
}
element!(f32 => F32, f64 => F64, u8 => U8, i8 => I8, i16 => I16, u32 => U32, i32 => I32, u64 => U64, i64 => I64);

impl Element for u16 {
    const DTYPE: DType = DType::U16;

    fn reads(dtype: DType) -> bool {
        matches!(dtype, DType::U16 | DType::F16 | DType::BF16)
    }
}

/// Bytes needed for `shape` of `dtype`, checked for overflow and rank.
fn byte_len(dtype: DType, shape: &[usize]) -> Result<usize> {
    if shape.len() > MAX_DIMS {
        return Err(Error::View(format!(
            "{} dimensions (limit {MAX_DIMS})",
            shape.len()
        )));
    }
    shape
        .iter()
        .try_fold(dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::View(format!("shape {shape:?} overflows")))
}

fn check_reads<T: Element>(dtype: DType) -> Result<()> {
    if !T::reads(dtype) {
        return Err(Error::View(format!(
            "a {dtype:?} tensor cannot be read as {}",
            std::any::type_name::<T>()
        )));
    }
    Ok(())
}

/// A contiguous row-major tensor: a dtype and a shape over a buffer.
///
/// `Tensor` (over a [`SharedBuf`]) is the writer's: owned, writable, its
/// data page-aligned. Send it with
/// [`Worker::send_attached`](crate::Worker::send_attached); the receiver gets a
/// [`TensorView`] (over a read-only [`BufView`]) of the same pages.
///
/// # Examples
///
/// ```
/// use miniray::{DType, Tensor};
///
/// let mut t = Tensor::zeros(DType::F32, &[2, 3])?;
/// t.as_mut_slice::<f32>()?.copy_from_slice(&[1., 2., 3., 4., 5., 6.]);
/// assert_eq!(t.shape(), &[2, 3]);
/// assert_eq!(t.as_slice::<f32>()?[5], 6.0);
/// assert!(t.as_slice::<i32>().is_err()); // dtype is checked
/// # Ok::<(), miniray::Error>(())
/// ```
pub struct Tensor<B = SharedBuf> {
    dtype: DType,
    shape: Vec<usize>,
    buf: B,
}

/// A received tensor: read-only and zero-copy.
///
/// # Examples
///
/// ```
/// let mut w = miniray::Worker::spawn(|h| {
///     let ((), mut parts) = h.recv_attached::<()>()?;
///     let t: miniray::TensorView = parts.remove(0).into_tensor()?;
///     h.send(&t.numel())
/// })?;
/// w.send_attached(&(), vec![miniray::Tensor::zeros(miniray::DType::U8, &[5])?.into()])?;
/// assert_eq!(w.recv::<usize>()?, 5);
/// # w.wait()?;
/// # Ok::<(), miniray::Error>(())
/// ```
pub type TensorView = Tensor<BufView>;

mod sealed {
    /// The buffers a tensor can sit on.
    pub trait Bytes {
        fn bytes(&self) -> &[u8];
    }

    impl Bytes for super::SharedBuf {
        fn bytes(&self) -> &[u8] {
            self.as_bytes()
        }
    }

    impl Bytes for super::BufView {
        fn bytes(&self) -> &[u8] {
            self.as_bytes()
        }
    }
}

impl<B: sealed::Bytes> Tensor<B> {
    /// Element type.
    ///
    /// # Examples
    ///
    /// ```
    /// let t = miniray::Tensor::from_slice(&[1u8, 2], &[2])?;
    /// assert_eq!(t.dtype(), miniray::DType::U8);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Dimensions, outermost first.
    ///
    /// # Examples
    ///
    /// ```
    /// let t = miniray::Tensor::zeros(miniray::DType::F32, &[4, 2])?;
    /// assert_eq!(t.shape(), &[4, 2]);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of elements.
    ///
    /// # Examples
    ///
    /// ```
    /// let t = miniray::Tensor::zeros(miniray::DType::F32, &[4, 2])?;
    /// assert_eq!(t.numel(), 8);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The elements.
    ///
    /// # Errors
    /// [`Error::View`] if `T` does not match the dtype.
    ///
    /// # Examples
    ///
    /// ```
    /// let t = miniray::Tensor::from_slice(&[1.0f32, 2.0], &[2])?;
    /// assert_eq!(t.as_slice::<f32>()?, &[1.0, 2.0]);
    /// assert!(t.as_slice::<u32>().is_err()); // not the tensor's dtype
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn as_slice<T: Element>(&self) -> Result<&[T]> {
        check_reads::<T>(self.dtype)?;
        bytemuck::try_cast_slice(self.buf.bytes()).map_err(|e| Error::View(e.to_string()))
    }

    /// The buffer underneath.
    ///
    /// # Examples
    ///
    /// ```
    /// let t = miniray::Tensor::from_slice(&[1u16, 2], &[2])?;
    /// let buf: miniray::SharedBuf = t.into_buf();
    /// assert_eq!(buf.len(), 4);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn into_buf(self) -> B {
        self.buf
    }
}

impl Tensor {
    /// A zero-filled tensor in a fresh memfd, to be filled in place.
    ///
    /// # Errors
    /// [`Error::View`] for a shape over 8 dimensions or one that overflows;
    /// otherwise as [`SharedBuf::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// let mut t = miniray::Tensor::zeros(miniray::DType::I64, &[3])?;
    /// t.as_mut_slice::<i64>()?[2] = -1;
    /// assert_eq!(t.as_slice::<i64>()?, &[0, 0, -1]);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let buf = SharedBuf::new(byte_len(dtype, shape)?)?;
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            buf,
        })
    }

    /// A tensor holding a copy of `data`, shaped `shape`.
    ///
    /// # Errors
    /// [`Error::View`] if `shape` does not hold exactly `data.len()`
    /// elements; otherwise as [`SharedBuf::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// let t = miniray::Tensor::from_slice(&[1i64, 2, 3, 4], &[2, 2])?;
    /// assert_eq!(t.dtype(), miniray::DType::I64);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize]) -> Result<Tensor> {
        let len = byte_len(T::DTYPE, shape)?;
        if len != std::mem::size_of_val(data) {
            let count = data.len();
            return Err(Error::View(format!(
                "shape {shape:?} does not hold {count} elements"
            )));
        }
        Ok(Tensor {
            dtype: T::DTYPE,
            shape: shape.to_vec(),
            buf: SharedBuf::from_slice(data)?,
        })
    }

    /// A tensor over an existing buffer (for example a pool slot), which is
    /// shortened to exactly the tensor's bytes.
    ///
    /// # Errors
    /// [`Error::View`] if the buffer is smaller than the shape needs.
    ///
    /// # Examples
    ///
    /// ```
    /// let pool = miniray::BufferPool::new(1, 4096)?;
    /// let t = miniray::Tensor::from_buf(pool.acquire()?, miniray::DType::F32, &[16, 16])?;
    /// assert_eq!(t.numel(), 256);
    /// assert!(miniray::Tensor::from_buf(miniray::SharedBuf::new(8)?, miniray::DType::F32, &[4]).is_err());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn from_buf(mut buf: SharedBuf, dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let len = byte_len(dtype, shape)?;
        if len > buf.len() {
            let have = buf.len();
            return Err(Error::View(format!(
                "shape {shape:?} of {dtype:?} needs {len} bytes, buffer has {have}"
            )));
        }
        buf.truncate(len);
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            buf,
        })
    }

    /// The elements, writable.
    ///
    /// # Errors
    /// [`Error::View`] if `T` does not match the dtype.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut t = miniray::Tensor::zeros(miniray::DType::F64, &[2])?;
    /// t.as_mut_slice::<f64>()?.fill(0.5);
    /// assert_eq!(t.as_slice::<f64>()?, &[0.5, 0.5]);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn as_mut_slice<T: Element>(&mut self) -> Result<&mut [T]> {
        check_reads::<T>(self.dtype)?;
        self.buf.as_mut_slice()
    }
}

impl TensorView {
    pub(crate) fn new(dtype: DType, shape: Vec<usize>, buf: BufView) -> Result<TensorView> {
        let len = byte_len(dtype, &shape).map_err(|e| Error::Protocol(e.to_string()))?;
        if len != buf.len() {
            let sent = buf.len();
            return Err(Error::Protocol(format!(
                "tensor {shape:?} of {dtype:?} sent with {sent} bytes"
            )));
        }
        Ok(TensorView { dtype, shape, buf })
    }
}

impl<B> fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

/// Something to attach to a message: moved into the send.
///
/// The writer's own buffers and tensors, and views received from another
/// process, which travel on without a copy (forwarding; see
/// `docs/ZERO_COPY.md` for who then owns what).
///
/// # Examples
///
/// ```
/// use miniray::{Attachment, SharedBuf, Tensor};
///
/// let parts: Vec<Attachment> = vec![
///     SharedBuf::from_slice(&[1u8, 2, 3])?.into(),
///     Tensor::from_slice(&[1.0f32, 2.0], &[2])?.into(),
/// ];
/// assert_eq!(parts.len(), 2);
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Debug)]
pub enum Attachment {
    /// Plain bytes.
    Buf(SharedBuf),
    /// A tensor; its dtype and shape travel with it.
    Tensor(Tensor),
    /// Received bytes, forwarded.
    View(BufView),
    /// A received tensor, forwarded.
    TensorView(TensorView),
}

impl From<SharedBuf> for Attachment {
    fn from(buf: SharedBuf) -> Self {
        Attachment::Buf(buf)
    }
}

impl From<Tensor> for Attachment {
    fn from(t: Tensor) -> Self {
        Attachment::Tensor(t)
    }
}

impl From<BufView> for Attachment {
    fn from(view: BufView) -> Self {
        Attachment::View(view)
    }
}

impl From<TensorView> for Attachment {
    fn from(t: TensorView) -> Self {
        Attachment::TensorView(t)
    }
}

impl From<Received> for Attachment {
    fn from(r: Received) -> Self {
        match r {
            Received::Buf(view) => Attachment::View(view),
            Received::Tensor(t) => Attachment::TensorView(t),
        }
    }
}

impl Attachment {
    /// The tensor's dtype code and shape, or 0 and none for plain bytes.
    pub(crate) fn meta(&self) -> (u32, &[usize]) {
        match self {
            Attachment::Buf(_) | Attachment::View(_) => (0, &[]),
            Attachment::Tensor(t) => (t.dtype.code(), &t.shape),
            Attachment::TensorView(t) => (t.dtype.code(), &t.shape),
        }
    }

    /// Puts a buffer back into the shape it was attached in.
    pub(crate) fn rebuild_own(meta: (u32, Vec<usize>), buf: SharedBuf) -> Attachment {
        match DType::from_code(meta.0) {
            Ok(dtype) => Attachment::Tensor(Tensor {
                dtype,
                shape: meta.1,
                buf,
            }),
            Err(_) => Attachment::Buf(buf),
        }
    }

    /// As [`Attachment::rebuild_own`], for a forwarded view.
    pub(crate) fn rebuild_view(meta: (u32, Vec<usize>), buf: BufView) -> Attachment {
        match DType::from_code(meta.0) {
            Ok(dtype) => Attachment::TensorView(Tensor {
                dtype,
                shape: meta.1,
                buf,
            }),
            Err(_) => Attachment::View(buf),
        }
    }
}

/// An attachment as received, in the order it was attached.
///
/// # Examples
///
/// ```
/// let mut w = miniray::Worker::spawn(|h| {
///     let ((), parts) = h.recv_attached::<()>()?;
///     let kinds: Vec<bool> = parts.iter().map(|p| matches!(p, miniray::Received::Tensor(_))).collect();
///     h.send(&kinds)
/// })?;
/// let parts = vec![miniray::SharedBuf::new(4)?.into(), miniray::Tensor::zeros(miniray::DType::U8, &[4])?.into()];
/// w.send_attached(&(), parts)?;
/// assert_eq!(w.recv::<Vec<bool>>()?, [false, true]);
/// # w.wait()?;
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Debug)]
pub enum Received {
    /// Plain bytes.
    Buf(BufView),
    /// A tensor.
    Tensor(TensorView),
}

impl Received {
    /// The tensor, or an error if plain bytes were sent.
    ///
    /// # Errors
    /// [`Error::View`] if the sender attached a plain buffer.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let t = miniray::Tensor::from_slice(&[1i32, 2, 3, 4, 5, 6], &[2, 3])?;
    ///     h.send_attached(&(), vec![t.into()])?;
    ///     Ok(())
    /// })?;
    /// let ((), mut parts) = w.recv_attached::<()>()?;
    /// let t = parts.remove(0).into_tensor()?;
    /// assert_eq!((t.shape(), t.as_slice::<i32>()?[5]), (&[2usize, 3][..], 6));
    /// # drop(t); w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn into_tensor(self) -> Result<TensorView> {
        match self {
            Received::Tensor(t) => Ok(t),
            Received::Buf(_) => Err(Error::View(
                "attachment is plain bytes, not a tensor".into(),
            )),
        }
    }

    /// The bytes, whether sent as a buffer or a tensor.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let t = miniray::Tensor::from_slice(&[1i32, 2, 3, 4, 5, 6], &[2, 3])?;
    ///     h.send_attached(&(), vec![t.into()])?;
    ///     Ok(())
    /// })?;
    /// let ((), mut parts) = w.recv_attached::<()>()?;
    /// let bytes = parts.remove(0).into_buf(); // the tensor's bytes, dtype dropped
    /// assert_eq!(bytes.len(), 24);
    /// # drop(bytes); w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn into_buf(self) -> BufView {
        match self {
            Received::Tensor(t) => t.into_buf(),
            Received::Buf(b) => b,
        }
    }

    /// The bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let t = miniray::Tensor::from_slice(&[1i32, 2, 3, 4, 5, 6], &[2, 3])?;
    ///     h.send_attached(&(), vec![t.into()])?;
    ///     Ok(())
    /// })?;
    /// let ((), mut parts) = w.recv_attached::<()>()?;
    /// assert_eq!(parts[0].as_bytes().len(), 24);
    /// # drop(parts); w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Received::Tensor(t) => t.buf.as_bytes(),
            Received::Buf(b) => b.as_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_codes_round_trip() {
        for (i, d) in DType::ALL.into_iter().enumerate() {
            assert_eq!(DType::from_code(d.code()).unwrap(), d);
            assert_eq!(
                d.code(),
                i as u32 + 1,
                "codes are those of docs/PROTOCOL.md"
            );
        }
        assert!(DType::from_code(0).is_err());
        assert!(DType::from_code(13).is_err());
    }

    #[test]
    fn byte_len_checks_overflow_and_rank() {
        assert_eq!(byte_len(DType::F32, &[2, 3]).unwrap(), 24);
        assert_eq!(byte_len(DType::F32, &[]).unwrap(), 4);
        assert!(byte_len(DType::F64, &[usize::MAX, 2]).is_err());
        assert!(byte_len(DType::U8, &[1; 9]).is_err());
    }

    #[test]
    fn u16_reads_half_types() {
        assert!(u16::reads(DType::BF16) && u16::reads(DType::F16));
        assert!(!f32::reads(DType::I32));
    }
}
