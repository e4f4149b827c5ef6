//! Shared buffers: memfd regions the writer fills and the receiver maps.
//!
//! [`SharedBuf`] is the writer's side: writable, owned, moved into a send.
//! [`BufView`] is the receiver's side: read-only, backed by the same pages.

use std::ffi::CStr;
use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use bytemuck::Pod;

use crate::landing::Landing;
use crate::shm::{PoolLease, PoolMapping, checked_region};
use crate::sys::{self, MapOptions, Mapping};
use crate::{Error, Result};

/// Name shown for our regions in `/proc/PID/fd` and `/proc/PID/maps`.
const MEMFD_NAME: &CStr = c"miniray";

/// A writable shared-memory region owned by this process, ready to be sent.
///
/// Created fresh with [`SharedBuf::new`] (a memfd of its own) or taken from a
/// [`BufferPool`](crate::BufferPool) with `acquire` (a slot of a region
/// already mapped on both sides: the fast path). The data is page-aligned.
/// Sending it moves it: once sent, the receiver's [`BufView`] is the only way
/// to the bytes, and a fresh region is sealed against writes and resizing.
///
/// # Examples
///
/// ```
/// let mut buf = miniray::SharedBuf::new(4 * 1024)?;
/// buf.as_mut_slice::<f32>()?.fill(1.5);
/// assert_eq!(buf.as_slice::<f32>()?.len(), 1024);
/// assert_eq!(buf.as_slice::<f32>()?[1023], 1.5);
/// # Ok::<(), miniray::Error>(())
/// ```
pub struct SharedBuf {
    len: usize,
    backing: Backing,
}

enum Backing {
    /// A memfd of its own; `map` is `None` for an empty buffer. `sealed`
    /// once a send sealed it (a send that failed hands it back so).
    Memfd {
        fd: OwnedFd,
        map: Option<Mapping>,
        sealed: bool,
    },
    /// A slot of a buffer pool.
    Pooled(PoolLease),
}

impl SharedBuf {
    /// A zero-filled region of `len_bytes` in a fresh memfd.
    ///
    /// # Errors
    /// [`Error::FdLimit`] when the process is out of descriptors, otherwise
    /// [`Error::Buffer`] with what the kernel said.
    ///
    /// # Implementation notes
    /// Pages are allocated on first touch, so filling a fresh region costs a
    /// page fault per 4 KiB; a [`BufferPool`](crate::BufferPool) pays that
    /// once and reuses the pages.
    ///
    /// # Examples
    ///
    /// ```
    /// let buf = miniray::SharedBuf::new(10)?;
    /// assert_eq!(buf.as_bytes(), &[0u8; 10]);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn new(len_bytes: usize) -> Result<SharedBuf> {
        let fd = sys::memfd_create(MEMFD_NAME, len_bytes as u64).map_err(Error::buffer)?;
        let map = match len_bytes {
            0 => None,
            _ => Some(map_writable(&fd, len_bytes)?),
        };
        Ok(SharedBuf {
            len: len_bytes,
            backing: Backing::Memfd {
                fd,
                map,
                sealed: false,
            },
        })
    }

    /// A fresh region holding a copy of `data`.
    ///
    /// # Errors
    /// As [`SharedBuf::new`].
    ///
    /// # Examples
    ///
    /// ```
    /// let buf = miniray::SharedBuf::from_slice(&[1u32, 2, 3])?;
    /// assert_eq!(buf.as_slice::<u32>()?, &[1, 2, 3]);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn from_slice<T: Pod>(data: &[T]) -> Result<SharedBuf> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let mut buf = SharedBuf::new(bytes.len())?;
        buf.as_bytes_mut().copy_from_slice(bytes);
        Ok(buf)
    }

    pub(crate) fn pooled(lease: PoolLease) -> SharedBuf {
        SharedBuf {
            len: lease.capacity(),
            backing: Backing::Pooled(lease),
        }
    }

    /// Length in bytes (what a send hands over).
    ///
    /// # Examples
    ///
    /// ```
    /// let buf = miniray::SharedBuf::new(100)?;
    /// assert_eq!(buf.len(), 100);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// assert!(miniray::SharedBuf::new(0)?.is_empty());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Shortens the buffer to `len_bytes`; only that prefix is sent.
    ///
    /// # Panics
    /// If `len_bytes` is larger than the current length.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut buf = miniray::SharedBuf::from_slice(&[1u8, 2, 3, 4])?;
    /// buf.truncate(2);
    /// assert_eq!(buf.as_bytes(), &[1, 2]);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn truncate(&mut self, len_bytes: usize) {
        assert!(
            len_bytes <= self.len,
            "truncate({len_bytes}) on a buffer of {} bytes",
            self.len
        );
        self.len = len_bytes;
    }

    /// The bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// let buf = miniray::SharedBuf::from_slice(b"abc")?;
    /// assert_eq!(buf.as_bytes(), b"abc");
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        let ptr = self.data_ptr();
        if ptr.is_null() {
            return &[];
        }
        // SAFETY: ptr points to a live mapping of at least `len` bytes that
        // lives as long as `self`; this process writes it only through
        // `&mut self`.
        unsafe { std::slice::from_raw_parts(ptr, self.len) }
    }

    /// The bytes, writable.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut buf = miniray::SharedBuf::new(3)?;
    /// buf.as_bytes_mut().copy_from_slice(b"xyz");
    /// assert_eq!(buf.as_bytes(), b"xyz");
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        let ptr = self.data_ptr();
        if ptr.is_null() {
            return &mut [];
        }
        // SAFETY: as in `as_bytes`, and the mapping is writable; `&mut self`
        // makes this the only reference into the region in this process.
        unsafe { std::slice::from_raw_parts_mut(ptr, self.len) }
    }

    /// The data as a slice of `T`.
    ///
    /// # Errors
    /// [`Error::View`] if the length is not a multiple of `size_of::<T>()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let buf = miniray::SharedBuf::from_slice(&[1.5f64, 2.5])?;
    /// assert_eq!(buf.as_slice::<f64>()?, &[1.5, 2.5]);
    /// assert!(buf.as_slice::<[u8; 3]>().is_err()); // 16 bytes are not 3-byte items
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn as_slice<T: Pod>(&self) -> Result<&[T]> {
        cast(self.as_bytes())
    }

    /// The data as a mutable slice of `T`.
    ///
    /// # Errors
    /// [`Error::View`] if the length is not a multiple of `size_of::<T>()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut buf = miniray::SharedBuf::new(8)?;
    /// buf.as_mut_slice::<u32>()?.copy_from_slice(&[7, 9]);
    /// assert_eq!(buf.as_slice::<u32>()?, &[7, 9]);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn as_mut_slice<T: Pod>(&mut self) -> Result<&mut [T]> {
        bytemuck::try_cast_slice_mut(self.as_bytes_mut()).map_err(|e| Error::View(e.to_string()))
    }

    fn data_ptr(&self) -> *mut u8 {
        match &self.backing {
            Backing::Memfd { map: Some(map), .. } => map.as_ptr(),
            Backing::Memfd { map: None, .. } => std::ptr::null_mut(),
            Backing::Pooled(lease) => lease.data_ptr(),
        }
    }

    /// Seals a fresh region before it is sent, so that its bytes are fixed
    /// for everyone: its size (`F_SEAL_SHRINK | F_SEAL_GROW`), every write
    /// through any mapping (`F_SEAL_WRITE`) and further seals. `F_SEAL_WRITE`
    /// needs every writable mapping gone, so the writer's own is dropped
    /// first. If another process still maps it writable (a worker forked
    /// while the buffer existed inherited the mapping, and no seal can take
    /// it away), the buffer is replaced by a sealed copy of its bytes: what
    /// a receiver maps must never change under it.
    pub(crate) fn seal_for_send(&mut self) -> Result<()> {
        let len = self.len;
        let Backing::Memfd { fd, map, sealed } = &mut self.backing else {
            return Ok(());
        };
        if *sealed {
            return Ok(());
        }
        let mapped_len = map.as_ref().map(Mapping::len);
        drop(map.take());
        let seals = sys::SEAL_SIZE | sys::SEAL_WRITE | sys::SEAL_SEAL;
        match sys::add_seals(fd.as_fd(), seals) {
            Ok(()) => {
                *sealed = true;
                Ok(())
            }
            Err(err) if sys::is_busy(&err) => match sealed_copy(fd, len) {
                Ok(copy) => {
                    *self = copy;
                    Ok(())
                }
                Err(err) => {
                    // Nothing was sealed: give the writer its mapping back.
                    if let Some(mapped) = mapped_len {
                        *map = Some(map_writable(fd, mapped)?);
                    }
                    Err(err)
                }
            },
            Err(err) => {
                // Nothing was sealed: give the writer its mapping back.
                if let Some(mapped) = mapped_len {
                    *map = Some(map_writable(fd, mapped)?);
                }
                Err(Error::Buffer(err))
            }
        }
    }

    /// Turns the buffer into what a frame carries, after
    /// [`seal_for_send`](Self::seal_for_send).
    pub(crate) fn into_outgoing(self) -> Outgoing {
        match self.backing {
            Backing::Memfd { fd, sealed, .. } => {
                debug_assert!(sealed, "sealed before it goes out");
                Outgoing::Memfd(fd)
            }
            Backing::Pooled(lease) => Outgoing::Pooled(lease),
        }
    }

    /// A pool slot a send could not deliver, as its owner had it.
    pub(crate) fn from_lease(lease: PoolLease, len: usize) -> SharedBuf {
        SharedBuf {
            len,
            backing: Backing::Pooled(lease),
        }
    }
}

/// A sealed fresh region holding a copy of `bytes`: its descriptor.
fn sealed_copy_of(bytes: &[u8]) -> Result<OwnedFd> {
    let mut copy = SharedBuf::new(bytes.len())?;
    copy.as_bytes_mut().copy_from_slice(bytes);
    copy.seal_for_send()?;
    match copy.into_outgoing() {
        Outgoing::Memfd(fd) => Ok(fd),
        Outgoing::Pooled(_) => unreachable!("a fresh buffer is no pool slot"),
    }
}

/// A sealed fresh region holding the first `len` bytes of `fd`.
fn sealed_copy(fd: &OwnedFd, len: usize) -> Result<SharedBuf> {
    let mut copy = SharedBuf::new(len)?;
    if len > 0 {
        let ro = MapOptions {
            writable: false,
            populate: false,
        };
        let original = Mapping::new(fd.as_fd(), 0, len, ro).map_err(Error::buffer)?;
        // SAFETY: the mapping is live and `len` bytes long; nobody writes
        // the region while the sender, its owner, is in this call (the
        // forked process that still maps it never writes through it).
        let bytes = unsafe { std::slice::from_raw_parts(original.as_ptr(), len) };
        copy.as_bytes_mut().copy_from_slice(bytes);
    }
    copy.seal_for_send()?;
    Ok(copy)
}

/// A buffer on its way out, after [`SharedBuf::into_outgoing`].
pub(crate) enum Outgoing {
    /// A sealed fresh region; nobody maps it writable any more.
    Memfd(OwnedFd),
    Pooled(PoolLease),
}

impl fmt::Debug for SharedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.backing {
            Backing::Memfd { .. } => "memfd",
            Backing::Pooled(_) => "pooled",
        };
        f.debug_struct("SharedBuf")
            .field("len", &self.len)
            .field("backing", &kind)
            .finish()
    }
}

fn map_writable(fd: &OwnedFd, len: usize) -> Result<Mapping> {
    let opts = MapOptions {
        writable: true,
        populate: false,
    };
    Mapping::new(fd.as_fd(), 0, len, opts).map_err(Error::buffer)
}

fn cast<T: Pod>(bytes: &[u8]) -> Result<&[T]> {
    bytemuck::try_cast_slice(bytes).map_err(|e| {
        Error::View(format!(
            "{} bytes as {}: {e}",
            bytes.len(),
            std::any::type_name::<T>()
        ))
    })
}

/// A received shared buffer: read-only, zero-copy.
///
/// The pages are the sender's; nothing was copied. A view from a fresh
/// region is mapped read-only and its descriptor already closed, so holding
/// many views costs no descriptors. A view of a pool slot hands the slot
/// back to the sender's pool when dropped.
///
/// # Examples
///
/// ```
/// use miniray::{Handle, SharedBuf, Worker};
///
/// let mut w = Worker::spawn(|h: &mut Handle| {
///     let ((), bufs) = h.recv_attached::<()>()?;
///     let view = bufs.into_iter().next().unwrap().into_buf();
///     h.send(&view.as_slice::<u64>()?.iter().sum::<u64>())
/// })?;
/// w.send_attached(&(), vec![SharedBuf::from_slice(&[1u64, 2, 3])?.into()])?;
/// assert_eq!(w.recv::<u64>()?, 6);
/// w.wait()?;
/// # Ok::<(), miniray::Error>(())
/// ```
pub struct BufView {
    len: usize,
    backing: ViewBacking,
}

enum ViewBacking {
    /// No bytes; `fd` kept only to forward the (empty) region.
    Empty { fd: Option<OwnedFd> },
    /// A fresh region; its descriptor is kept only if the receiver asked
    /// to forward what it receives.
    Memfd { map: Mapping, fd: Option<OwnedFd> },
    /// A slot of the peer's pool, held through the ticket of `seat`.
    Pooled {
        pool: Arc<PoolMapping>,
        slot: u32,
        seat: u32,
    },
    /// A region of our own that a streaming transport filled; back to
    /// that connection's receive pool on drop.
    Landed(Landing),
}

/// How a view can travel on to another process, if it can.
pub(crate) enum Forward<'a> {
    /// A fresh region: its descriptor.
    Memfd(BorrowedFd<'a>),
    /// A pool slot: the pool, the slot and the seat that holds it.
    Pooled {
        pool: &'a PoolMapping,
        slot: u32,
        seat: u32,
    },
}

impl BufView {
    /// Maps a received memfd read-only after checking that its size and
    /// bytes are sealed. The descriptor is closed at once unless `keep_fd`
    /// (to forward the view).
    pub(crate) fn from_memfd(
        fd: OwnedFd,
        len: usize,
        keep_fd: bool,
        max_region_bytes: u64,
    ) -> Result<BufView> {
        let size = checked_region(&fd, sys::SEAL_SIZE | sys::SEAL_WRITE, max_region_bytes)?;
        if len as u64 > size {
            return Err(Error::Protocol(format!(
                "attachment of {len} bytes in a region of {size} bytes"
            )));
        }
        if len == 0 {
            let fd = keep_fd.then_some(fd);
            return Ok(BufView {
                len,
                backing: ViewBacking::Empty { fd },
            });
        }
        let opts = MapOptions {
            writable: false,
            populate: false,
        };
        let map = Mapping::new(fd.as_fd(), 0, len, opts).map_err(Error::buffer)?;
        let fd = keep_fd.then_some(fd); // Otherwise it closes here.
        Ok(BufView {
            len,
            backing: ViewBacking::Memfd { map, fd },
        })
    }

    pub(crate) fn pooled(pool: Arc<PoolMapping>, slot: u32, seat: u32, len: usize) -> BufView {
        debug_assert!(len <= pool.slot_len());
        BufView {
            len,
            backing: ViewBacking::Pooled { pool, slot, seat },
        }
    }

    /// Bytes that a streaming transport landed in `landing` (none for an
    /// empty attachment).
    pub(crate) fn landed(landing: Option<Landing>, len: usize) -> BufView {
        let backing = match landing {
            Some(landing) => ViewBacking::Landed(landing),
            None => ViewBacking::Empty { fd: None },
        };
        BufView { len, backing }
    }

    /// Makes a landed view sendable to a local peer: its region leaves the
    /// receive pool and is sealed like a fresh one, then mapped read-only.
    /// Other views are left as they are.
    ///
    /// A process forked since the bytes landed maps the region too, so
    /// then the bytes go on in a sealed copy instead.
    ///
    /// # Errors
    /// [`Error::Buffer`] if the kernel refuses to seal or map the region,
    /// or no copy can be made; the view is then empty (length 0).
    pub(crate) fn seal_landed(&mut self) -> Result<()> {
        if !matches!(self.backing, ViewBacking::Landed(_)) {
            return Ok(());
        }
        let empty = ViewBacking::Empty { fd: None };
        let ViewBacking::Landed(landing) = std::mem::replace(&mut self.backing, empty) else {
            unreachable!("matched above");
        };
        let fd = match landing.into_sealed(self.len) {
            Ok(fd) => fd,
            // A process forked since maps the region: send a sealed copy.
            // If none can be made, the view keeps its region, unchanged.
            Err(Some(landing)) => match sealed_copy_of(landing.bytes(self.len)) {
                Ok(fd) => fd,
                Err(err) => {
                    self.backing = ViewBacking::Landed(landing);
                    return Err(err);
                }
            },
            Err(None) => {
                self.len = 0; // Its bytes are gone: say so.
                return Err(Error::Buffer(std::io::Error::other(
                    "cannot seal a region received over TCP",
                )));
            }
        };
        let len = std::mem::take(&mut self.len); // Empty if mapping fails.
        *self = BufView::from_memfd(fd, len, true, u64::MAX)?;
        Ok(())
    }

    /// What a forward of this view sends, or why it cannot be forwarded.
    pub(crate) fn forward(&self) -> Result<Forward<'_>> {
        match &self.backing {
            ViewBacking::Landed(_) => Err(Error::View(
                "a view received over TCP is sealed before it goes on to a local worker".into(),
            )),
            ViewBacking::Empty { fd: Some(fd) } | ViewBacking::Memfd { fd: Some(fd), .. } => {
                Ok(Forward::Memfd(fd.as_fd()))
            }
            ViewBacking::Empty { fd: None } | ViewBacking::Memfd { fd: None, .. } => {
                Err(Error::View(
                    "this view's descriptor was closed when it arrived; call set_forwarding(true) on the receiving side before receiving what you forward, or send pool slots".into(),
                ))
            }
            ViewBacking::Pooled { pool, slot, seat } => Ok(Forward::Pooled {
                pool,
                slot: *slot,
                seat: *seat,
            }),
        }
    }

    /// The view went to another process, which now gives the slot back:
    /// drop it without releasing.
    pub(crate) fn forwarded(mut self) {
        if let ViewBacking::Pooled { .. } = self.backing {
            self.backing = ViewBacking::Empty { fd: None };
        }
    }

    /// Length in bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let buf = miniray::SharedBuf::from_slice(&[1u32, 2, 3])?;
    ///     h.send_attached(&(), vec![buf.into()])?;
    ///     Ok(())
    /// })?;
    /// let ((), mut parts) = w.recv_attached::<()>()?;
    /// let view = parts.remove(0).into_buf();
    /// assert_eq!(view.len(), 12);
    /// # drop(view); w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the view holds no bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let buf = miniray::SharedBuf::from_slice(&[1u32, 2, 3])?;
    ///     h.send_attached(&(), vec![buf.into()])?;
    ///     Ok(())
    /// })?;
    /// let ((), mut parts) = w.recv_attached::<()>()?;
    /// let view = parts.remove(0).into_buf();
    /// assert!(!view.is_empty());
    /// # drop(view); w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let buf = miniray::SharedBuf::from_slice(&[1u32, 2, 3])?;
    ///     h.send_attached(&(), vec![buf.into()])?;
    ///     Ok(())
    /// })?;
    /// let ((), mut parts) = w.recv_attached::<()>()?;
    /// let view = parts.remove(0).into_buf();
    /// assert_eq!(&view.as_bytes()[..4], &1u32.to_ne_bytes());
    /// # drop(view); w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn as_bytes(&self) -> &[u8] {
        let ptr = match &self.backing {
            ViewBacking::Empty { .. } => return &[],
            ViewBacking::Memfd { map, .. } => map.as_ptr(),
            ViewBacking::Pooled { pool, slot, .. } => pool.slot_ptr(*slot),
            ViewBacking::Landed(landing) => return landing.bytes(self.len),
        };
        // SAFETY: ptr points to a live read-only mapping of at least `len`
        // bytes held by `self`. A fresh region is write-sealed; a pool slot
        // is not written by a well-behaved sender while a view holds it
        // (the trusted-peer model of docs/ZERO_COPY.md).
        unsafe { std::slice::from_raw_parts(ptr, self.len) }
    }

    /// The data as a slice of `T`.
    ///
    /// # Errors
    /// [`Error::View`] if the length is not a multiple of `size_of::<T>()`.
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let buf = miniray::SharedBuf::from_slice(&[1u32, 2, 3])?;
    ///     h.send_attached(&(), vec![buf.into()])?;
    ///     Ok(())
    /// })?;
    /// let ((), mut parts) = w.recv_attached::<()>()?;
    /// let view = parts.remove(0).into_buf();
    /// assert_eq!(view.as_slice::<u32>()?, &[1, 2, 3]);
    /// # drop(view); w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn as_slice<T: Pod>(&self) -> Result<&[T]> {
        cast(self.as_bytes())
    }

    /// Whether this view is a pool slot (returned to the pool on drop).
    ///
    /// # Examples
    ///
    /// ```
    /// let mut w = miniray::Worker::spawn(|h| {
    ///     let buf = miniray::SharedBuf::from_slice(&[1u32, 2, 3])?;
    ///     h.send_attached(&(), vec![buf.into()])?;
    ///     Ok(())
    /// })?;
    /// let ((), mut parts) = w.recv_attached::<()>()?;
    /// let view = parts.remove(0).into_buf();
    /// assert!(!view.is_pooled()); // a fresh region, not a pool slot
    /// # drop(view); w.wait()?;
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn is_pooled(&self) -> bool {
        matches!(self.backing, ViewBacking::Pooled { .. })
    }
}

impl Drop for BufView {
    fn drop(&mut self) {
        if let ViewBacking::Pooled { pool, slot, .. } = &self.backing {
            pool.release(*slot);
        }
    }
}

impl fmt::Debug for BufView {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufView")
            .field("len", &self.len)
            .field("pooled", &self.is_pooled())
            .finish()
    }
}
