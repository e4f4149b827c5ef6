//! Where streamed attachments land: memfd regions of the receiver's own,
//! kept mapped and faulted in between frames (a receive pool).
//!
//! Over TCP an attachment's bytes arrive in the stream, and the receiver
//! must put them somewhere. Filling a fresh memfd costs a page fault per
//! page, slower than loopback TCP delivers, so a region whose view was
//! dropped goes back to its connection's pool and the next attachment of a
//! similar size is read straight into its pages, already faulted in. The
//! region is a memfd, not a heap buffer, so a received tensor can go on to
//! a local worker without a copy ([`Landing::into_sealed`]).
//!
//! The pool keeps at most [`MAX_IDLE_REGIONS`] regions and
//! [`MAX_IDLE_BYTES`] bytes idle, the most recently used: a region given
//! back pushes out the longest idle ones, and is kept even when larger
//! than that alone, so a stream of huge tensors reuses its region.

use std::ffi::CStr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};

use crate::sys::{self, MapOptions, Mapping};
use crate::{Error, Result};

/// Idle regions kept per connection.
pub(crate) const MAX_IDLE_REGIONS: usize = 8;
/// Idle bytes kept per connection (past one region).
pub(crate) const MAX_IDLE_BYTES: usize = 1 << 30;
/// Region sizes are rounded up to this, so that sizes close to each other
/// share regions.
const GRANULE: usize = 64 << 10;

const NAME: &CStr = c"miniray-landing";

/// A connection's idle regions.
#[derive(Clone, Default)]
pub(crate) struct ReceivePool {
    idle: Arc<Mutex<Idle>>,
}

#[derive(Default)]
struct Idle {
    regions: Vec<Region>,
    bytes: usize,
}

/// A memfd and its writable mapping, `map.len()` bytes long.
struct Region {
    fd: OwnedFd,
    map: Mapping,
}

/// A region lent out for one attachment; back to its pool when dropped.
pub(crate) struct Landing {
    region: Option<Region>,
    home: Weak<Mutex<Idle>>,
}

impl ReceivePool {
    /// A region of at least `len` bytes (`len > 0`): an idle one that fits
    /// (at most twice the size a new one would have), or a new one.
    ///
    /// # Errors
    /// [`Error::FdLimit`], or [`Error::Buffer`] when no memfd can be made
    /// or mapped.
    pub(crate) fn take(&self, len: usize) -> Result<Landing> {
        debug_assert!(len > 0);
        let size = len.next_multiple_of(GRANULE);
        let reused = {
            let mut idle = lock(&self.idle);
            let fit = idle
                .regions
                .iter()
                .enumerate()
                .filter(|(_, r)| r.map.len() >= size && r.map.len() / 2 <= size)
                .min_by_key(|(_, r)| r.map.len())
                .map(|(i, _)| i);
            fit.map(|i| {
                let region = idle.regions.swap_remove(i);
                idle.bytes -= region.map.len();
                region
            })
        };
        let region = match reused {
            Some(region) => region,
            None => Region::new(size)?,
        };
        Ok(Landing {
            region: Some(region),
            home: Arc::downgrade(&self.idle),
        })
    }

    /// Idle regions and their bytes, for tests.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> (usize, usize) {
        let idle = lock(&self.idle);
        (idle.regions.len(), idle.bytes)
    }
}

impl Region {
    fn new(capacity: usize) -> Result<Region> {
        let fd = sys::memfd_create(NAME, capacity as u64).map_err(Error::buffer)?;
        let opts = MapOptions {
            writable: true,
            populate: false,
        };
        let map = Mapping::new(fd.as_fd(), 0, capacity, opts).map_err(Error::buffer)?;
        Ok(Region { fd, map })
    }
}

impl Landing {
    fn region(&self) -> &Region {
        self.region
            .as_ref()
            .expect("a landing holds its region until dropped")
    }

    /// The whole region, to read into.
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let map = &self.region.as_mut().expect("held until dropped").map;
        // SAFETY: the mapping is live and `len()` bytes long; this memfd
        // was never shared, so nothing else reads or writes it, and the
        // `&mut self` borrow makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(map.as_ptr(), map.len()) }
    }

    /// The first `len` bytes.
    pub(crate) fn bytes(&self, len: usize) -> &[u8] {
        let map = &self.region().map;
        assert!(
            len <= map.len(),
            "{len} bytes of a {}-byte region",
            map.len()
        );
        // SAFETY: as in `bytes_mut`; only shared references exist while
        // `&self` is borrowed.
        unsafe { std::slice::from_raw_parts(map.as_ptr(), len) }
    }

    /// Takes the region out of the pool for good and seals its first
    /// `len` bytes against any change, so that it can be sent as a fresh
    /// region to a local peer. The writable mapping goes first: a memfd
    /// cannot be sealed against writes while one exists.
    ///
    /// A process forked since the region was mapped maps it too, writable,
    /// so it cannot be sealed: then the region, mapped again, comes back as
    /// `Err(Some(landing))`, for the caller to copy.
    ///
    /// # Errors
    /// `Err(None)` when the kernel refuses to seal, resize or map again
    /// for another reason (the bytes are lost then).
    pub(crate) fn into_sealed(mut self, len: usize) -> Result<OwnedFd, Option<Landing>> {
        let Region { fd, map } = self.region.take().expect("held until dropped");
        let capacity = map.len();
        drop(map);
        match sys::add_seals(fd.as_fd(), sys::SEAL_WRITE) {
            Ok(()) => {}
            Err(e) if sys::is_busy(&e) => {
                let opts = MapOptions {
                    writable: true,
                    populate: false,
                };
                let map = Mapping::new(fd.as_fd(), 0, capacity, opts).map_err(|_| None)?;
                self.region = Some(Region { fd, map });
                return Err(Some(self));
            }
            Err(_) => return Err(None),
        }
        // Bytes past `len` are an earlier frame's: not the next holder's.
        sys::set_len(fd.as_fd(), len as u64).map_err(|_| None)?;
        sys::add_seals(fd.as_fd(), sys::SEAL_SIZE | sys::SEAL_SEAL).map_err(|_| None)?;
        Ok(fd)
    }
}

impl Drop for Landing {
    fn drop(&mut self) {
        let (Some(region), Some(home)) = (self.region.take(), self.home.upgrade()) else {
            return;
        };
        let mut idle = lock(&home);
        // The region just used is the likeliest to fit the next frame: it
        // stays, and the longest idle ones make room for it (unmapped and
        // closed as they go).
        idle.bytes += region.map.len();
        idle.regions.push(region);
        while idle.regions.len() > MAX_IDLE_REGIONS
            || (idle.bytes > MAX_IDLE_BYTES && idle.regions.len() > 1)
        {
            let oldest = idle.regions.remove(0);
            idle.bytes -= oldest.map.len();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A pool's list is never left half-updated by a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_region_is_reused_for_a_similar_size() {
        let pool = ReceivePool::default();
        let mut first = pool.take(1_000_000).unwrap();
        first.bytes_mut()[..4].copy_from_slice(b"mray");
        let addr = first.bytes(4).as_ptr();
        drop(first);
        assert_eq!(pool.idle().0, 1);
        let again = pool.take(900_000).unwrap();
        assert_eq!(again.bytes(4).as_ptr(), addr, "the same pages again");
        assert_eq!(again.bytes(4), b"mray");
        // Far smaller than the idle region: a new one, not a waste.
        drop(again);
        let small = pool.take(1000).unwrap();
        assert_ne!(small.bytes(1).as_ptr(), addr);
    }

    #[test]
    fn small_regions_are_reused_and_never_crowd_out_the_rest() {
        let pool = ReceivePool::default();
        for _ in 0..3 * MAX_IDLE_REGIONS {
            let small = pool.take(100).unwrap();
            let addr = small.bytes(1).as_ptr();
            drop(small);
            let again = pool.take(200).unwrap();
            assert_eq!(again.bytes(1).as_ptr(), addr, "a small region is reused");
        }
        assert_eq!(pool.idle().0, 1);
        // A full pool of small regions still takes in a large one.
        let held: Vec<_> = (0..MAX_IDLE_REGIONS)
            .map(|_| pool.take(10).unwrap())
            .collect();
        drop(held);
        let large = pool.take(10 * GRANULE).unwrap();
        let addr = large.bytes(1).as_ptr();
        drop(large);
        assert_eq!(pool.take(10 * GRANULE).unwrap().bytes(1).as_ptr(), addr);
    }

    #[test]
    fn idle_regions_are_bounded() {
        let pool = ReceivePool::default();
        let held: Vec<_> = (0..MAX_IDLE_REGIONS + 3)
            .map(|_| pool.take(GRANULE).unwrap())
            .collect();
        drop(held);
        assert_eq!(pool.idle(), (MAX_IDLE_REGIONS, MAX_IDLE_REGIONS * GRANULE));
    }

    #[test]
    fn a_sealed_region_leaves_the_pool_with_its_bytes() {
        let pool = ReceivePool::default();
        let mut landing = pool.take(10).unwrap();
        landing.bytes_mut()[..10].copy_from_slice(b"0123456789");
        let fd = landing.into_sealed(10).ok().unwrap();
        assert_eq!(pool.idle().0, 0);
        assert_eq!(sys::file_len(fd.as_fd()).unwrap(), 10);
        let seals = sys::seals(fd.as_fd()).unwrap();
        assert_eq!(seals & sys::SEAL_WRITE, sys::SEAL_WRITE);
    }
}
