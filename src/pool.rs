//! A pool of shared regions mapped once on both sides: the fast path.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::buffer::SharedBuf;
use crate::shm::{MAX_POOL_SLOTS, PoolShared};
use crate::sys;
use crate::{Error, Result};

/// A pool of equal-sized shared regions for repeated zero-copy sends.
///
/// Each slot is a page-aligned region of `slot_len` bytes.
/// [`acquire`](Self::acquire) hands out a free slot as a [`SharedBuf`];
/// sending it to a worker (or from a worker to its parent) passes only the
/// slot's number once the pool is known to that peer, and the receiver's
/// [`BufView`](crate::BufView) gives the slot back when dropped. All pages
/// are allocated and mapped when the pool is made, so the steady state has
/// no page faults, no copies and no new descriptors. An empty pool makes
/// `acquire` wait: backpressure.
///
/// One slot may be sent to many workers at once
/// ([`Workers::send_all_attached`](crate::Workers::send_all_attached)); it
/// comes back when the last of them drops its view. Up to 64 peers may hold
/// slots of one pool at the same time.
///
/// Cloning a `BufferPool` gives another handle to the same slots. A pool
/// belongs to the process that made it: a producer worker makes its own
/// pool inside the worker (a forked child inherits a copy of the parent's
/// bookkeeping, which would hand out slots the parent also hands out, so
/// `acquire` there panics).
///
/// # Examples
///
/// ```
/// use miniray::{BufferPool, Handle, Worker};
/// use std::time::Duration;
///
/// let pool = BufferPool::new(2, 1 << 20)?;
/// let mut w = Worker::spawn(|h: &mut Handle| loop {
///     let (step, bufs) = h.recv_attached::<u32>()?;
///     let view = bufs.into_iter().next().unwrap().into_buf();
///     h.send(&(step, view.as_slice::<f32>()?[0]))?; // `view` drops: slot returns
///     if step == 9 { return Ok(()) }
/// })?;
/// for step in 0..10u32 {
///     let mut buf = pool.acquire_timeout(Duration::from_secs(5))?;
///     buf.as_mut_slice::<f32>()?[0] = step as f32;
///     w.send_attached(&step, vec![buf.into()])?;
///     assert_eq!(w.recv::<(u32, f32)>()?, (step, step as f32));
/// }
/// w.wait()?;
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
}

impl BufferPool {
    /// A pool of `slots` regions of `slot_len_bytes` each, all allocated now.
    ///
    /// # Errors
    /// [`Error::Buffer`] if the pool's size overflows or exceeds the
    /// machine's memory (checked before anything is allocated), or if the
    /// memfd cannot be created, sized or mapped; [`Error::FdLimit`] at the
    /// descriptor limit.
    ///
    /// # Panics
    /// If `slots` is 0 or above [`MAX_POOL_SLOTS`], or `slot_len_bytes` is 0.
    ///
    /// # Examples
    ///
    /// ```
    /// let pool = miniray::BufferPool::new(4, 1 << 16)?;
    /// assert_eq!((pool.slots(), pool.slot_len(), pool.available()), (4, 1 << 16, 4));
    /// assert!(miniray::BufferPool::new(2, usize::MAX).is_err());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn new(slots: u32, slot_len_bytes: usize) -> Result<BufferPool> {
        assert!(
            slots > 0 && slots <= MAX_POOL_SLOTS,
            "slots must be in 1..={MAX_POOL_SLOTS}"
        );
        assert!(slot_len_bytes > 0, "slot_len_bytes must be positive");
        let page = sys::page_size();
        let stride = slot_len_bytes
            .checked_next_multiple_of(page)
            .filter(|s| s.checked_mul(slots as usize + 1).is_some())
            .ok_or_else(|| too_big(format!("{slots} slots of {slot_len_bytes} bytes overflow")))?;
        let total = stride as u64 * u64::from(slots);
        if let Some(memory) = total_memory_bytes()
            && total > memory
        {
            return Err(too_big(format!(
                "a pool of {total} bytes exceeds this machine's {memory} bytes of memory"
            )));
        }
        let shared = PoolShared::create(slots, slot_len_bytes, stride)?;
        Ok(BufferPool {
            shared: Arc::new(shared),
        })
    }

    /// Number of slots.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(miniray::BufferPool::new(3, 10)?.slots(), 3);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn slots(&self) -> u32 {
        self.shared.slots()
    }

    /// Usable bytes per slot.
    ///
    /// # Examples
    ///
    /// ```
    /// assert_eq!(miniray::BufferPool::new(3, 10)?.slot_len(), 10);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn slot_len(&self) -> usize {
        self.shared.slot_len()
    }

    /// Slots that [`try_acquire`](Self::try_acquire) could hand out now.
    ///
    /// # Examples
    ///
    /// ```
    /// let pool = miniray::BufferPool::new(2, 64)?;
    /// let held = pool.try_acquire();
    /// assert_eq!(pool.available(), 1);
    /// drop(held);
    /// assert_eq!(pool.available(), 2);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn available(&self) -> usize {
        self.shared.available()
    }

    /// Takes a free slot, waiting as long as it takes for a receiver to
    /// give one back.
    ///
    /// # Errors
    /// [`Error::Buffer`] if the kernel refuses the wait (never expected).
    ///
    /// # Panics
    /// In a process other than the one that made the pool (a forked child).
    ///
    /// # Examples
    ///
    /// ```
    /// let pool = miniray::BufferPool::new(1, 4096)?;
    /// let buf = pool.acquire()?;
    /// assert_eq!(buf.len(), 4096);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn acquire(&self) -> Result<SharedBuf> {
        self.acquire_until(None, Duration::MAX)
    }

    /// Takes a free slot, waiting up to `timeout` for a receiver to give
    /// one back.
    ///
    /// # Errors
    /// [`Error::Timeout`] if no slot came free in time.
    ///
    /// # Panics
    /// In a process other than the one that made the pool (a forked child).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::Duration;
    /// let pool = miniray::BufferPool::new(1, 4096)?;
    /// let held = pool.acquire_timeout(Duration::from_secs(1))?;
    /// let err = pool.acquire_timeout(Duration::from_millis(10)).unwrap_err();
    /// assert!(matches!(err, miniray::Error::Timeout { .. }));
    /// drop(held);
    /// assert!(pool.acquire_timeout(Duration::from_millis(10)).is_ok());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn acquire_timeout(&self, timeout: Duration) -> Result<SharedBuf> {
        self.acquire_until(Instant::now().checked_add(timeout), timeout)
    }

    /// Takes a free slot, waiting until `deadline` at the latest.
    ///
    /// # Errors
    /// [`Error::Timeout`] if no slot came free in time.
    ///
    /// # Panics
    /// In a process other than the one that made the pool (a forked child).
    ///
    /// # Examples
    ///
    /// ```
    /// use std::time::{Duration, Instant};
    /// let pool = miniray::BufferPool::new(1, 4096)?;
    /// let buf = pool.acquire_deadline(Instant::now() + Duration::from_secs(1))?;
    /// # drop(buf);
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn acquire_deadline(&self, deadline: Instant) -> Result<SharedBuf> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        self.acquire_until(Some(deadline), timeout)
    }

    /// `deadline` `None` waits forever; `timeout` is what a `Timeout`
    /// error reports.
    fn acquire_until(&self, deadline: Option<Instant>, timeout: Duration) -> Result<SharedBuf> {
        let mut fruitless = 0;
        loop {
            if let Some(buf) = self.try_acquire() {
                return Ok(buf);
            }
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            let again = self
                .shared
                .wait_release(left, &mut fruitless, || self.try_acquire())?;
            match again {
                Some(buf) => return Ok(buf),
                None if left.is_zero() => return Err(Error::timeout(timeout)),
                None => {}
            }
        }
    }

    /// Takes a free slot if there is one now.
    ///
    /// # Panics
    /// In a process other than the one that made the pool (a forked child).
    ///
    /// # Examples
    ///
    /// ```
    /// let pool = miniray::BufferPool::new(1, 4096)?;
    /// let first = pool.try_acquire();
    /// assert!(first.is_some());
    /// assert!(pool.try_acquire().is_none());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn try_acquire(&self) -> Option<SharedBuf> {
        self.shared.try_take().map(SharedBuf::pooled)
    }
}

fn too_big(what: String) -> Error {
    Error::Buffer(io::Error::new(io::ErrorKind::OutOfMemory, what))
}

/// `MemTotal` from `/proc/meminfo`, in bytes; `None` if unreadable.
fn total_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let kib: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    kib.checked_mul(1024)
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("slots", &self.slots())
            .field("slot_len", &self.slot_len())
            .field("available", &self.available())
            .finish()
    }
}
