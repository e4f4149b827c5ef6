//! A pool of shared regions mapped once on both sides.
//!
//! One memfd holds a control block and `slots` data slots. Its descriptor
//! crosses to a peer with the slots sent there until the peer is seen to
//! release one (normally just the first); after that a send names a slot
//! and a length. The receiver hands a slot back by clearing its
//! flag in the control block (and waking a waiting writer with a futex), so
//! a release costs no message. The writer decides which slots it may reuse
//! from its own private table; the shared flags only say "the reader is done".

use std::collections::HashMap;
use std::fmt;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};

use crate::buffer::{SharedBuf, check_sealed};
use crate::sys::{self, MapOptions, Mapping};
use crate::{Error, Result};

/// Most slots in one pool: the control block stays within two pages, and a
/// pool is a handful of in-flight batches, not an allocator.
pub const MAX_POOL_SLOTS: u32 = 1024;
/// Most pools one link accepts from its peer; each costs two mappings.
pub const MAX_POOLS_PER_LINK: usize = 64;

const POOL_MAGIC: u64 = u64::from_le_bytes(*b"MRAYPOOL");
const POOL_VERSION: u32 = 1;
/// Shared flag values: the reader holds the slot, or is done with it.
const HELD: u32 = 1;
const FREE: u32 = 0;

/// The start of the control block, laid out for both processes.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct PoolHeader {
    magic: u64,
    version: u32,
    slots: u32,
    /// Usable bytes per slot.
    slot_len: u64,
    /// Distance between slots: `slot_len` rounded up to a page.
    slot_stride: u64,
    /// Offset of slot 0 in the memfd; a page multiple.
    data_offset: u64,
    id: u64,
    /// Futex word: bumped on every release.
    wake: u32,
    /// Writers sleeping on `wake`; a release skips the wake syscall at 0.
    waiters: u32,
    /// Set to 1 when the sender drops the pool: receivers may unmap it once
    /// they hold no view of it.
    retired: u32,
    reserved: u32,
}

const HEADER_LEN: usize = size_of::<PoolHeader>();
const _: () = {
    assert!(HEADER_LEN == 64);
    assert!(offset_of!(PoolHeader, wake) == 48);
    assert!(offset_of!(PoolHeader, waiters) == 52);
    assert!(offset_of!(PoolHeader, retired) == 56);
};

/// Who has a slot, in the writer's private table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    Writing,
    Sent { peer: u64 },
}

/// The writable control block, shared by both sides.
struct Control {
    map: Mapping,
    slots: u32,
}

impl Control {
    fn word(&self, offset: usize) -> &AtomicU32 {
        assert!(
            offset + 4 <= self.map.len() && offset % 4 == 0,
            "control word out of range"
        );
        // SAFETY: in bounds and 4-aligned (checked above; the mapping is
        // page-aligned); the mapping is writable, lives as long as `self`,
        // and is only ever accessed atomically by both processes.
        unsafe { &*self.map.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn wake(&self) -> &AtomicU32 {
        self.word(offset_of!(PoolHeader, wake))
    }

    fn waiters(&self) -> &AtomicU32 {
        self.word(offset_of!(PoolHeader, waiters))
    }

    fn retired(&self) -> &AtomicU32 {
        self.word(offset_of!(PoolHeader, retired))
    }

    fn flag(&self, slot: u32) -> &AtomicU32 {
        assert!(slot < self.slots, "slot {slot} out of {}", self.slots);
        self.word(HEADER_LEN + 4 * slot as usize)
    }

    /// Marks `slot` free and wakes sleeping writers, in any process.
    fn release(&self, slot: u32) {
        self.flag(slot).store(FREE, Ordering::SeqCst);
        self.bump();
    }

    fn bump(&self) {
        self.wake().fetch_add(1, Ordering::SeqCst);
        if self.waiters().load(Ordering::SeqCst) > 0 {
            sys::futex_wake_all(self.wake());
        }
    }
}

fn control_len(slots: u32) -> usize {
    (HEADER_LEN + 4 * slots as usize).next_multiple_of(sys::page_size())
}

/// A pool of equal-sized shared regions for repeated zero-copy sends.
///
/// Each slot is a page-aligned region of `slot_len` bytes. [`acquire`]
/// hands out a free slot as a [`SharedBuf`]; sending it to a worker (or from
/// a worker to its parent) passes only the slot's number once the pool is
/// known to that peer, and the receiver's [`BufView`](crate::BufView) gives
/// the slot back when dropped. All pages are allocated and mapped when the
/// pool is made, so the steady state has no page faults, no copies and no
/// new descriptors. An empty pool makes [`acquire`] wait: backpressure.
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
///     let (step, bufs) = h.recv_with::<u32>()?;
///     let view = bufs.into_iter().next().unwrap().into_buf();
///     h.send(&(step, view.as_slice::<f32>()?[0]))?; // `view` drops: slot returns
///     if step == 9 { return Ok(()) }
/// })?;
/// for step in 0..10u32 {
///     let mut buf = pool.acquire(Duration::from_secs(5))?;
///     buf.as_mut_slice::<f32>()?[0] = step as f32;
///     w.send_with(&step, vec![buf.into()])?;
///     assert_eq!(w.recv::<(u32, f32)>()?, (step, step as f32));
/// }
/// w.wait()?;
/// # Ok::<(), miniray::Error>(())
/// ```
///
/// [`acquire`]: BufferPool::acquire
#[derive(Clone)]
pub struct BufferPool {
    shared: Arc<PoolShared>,
}

pub(crate) struct PoolShared {
    id: u64,
    /// The fork generation of the process that made the pool: a forked
    /// child sees another one, and may not hand out slots.
    owner_generation: u64,
    fd: OwnedFd,
    control: Control,
    data: Mapping,
    slot_len: usize,
    slot_stride: usize,
    table: Mutex<Table>,
}

/// The writer's private bookkeeping, under one lock.
struct Table {
    slots: Vec<SlotState>,
    /// Peers seen to have mapped the pool (they released a slot of it).
    /// Until a peer is here, every slot sent to it carries the pool's
    /// descriptor again, in case the first one was lost at its fd limit.
    confirmed: Vec<u64>,
}

/// Pool ids only need to be unique among the pools one peer receives; pid
/// in the high bits keeps pools from a parent and its workers apart.
fn next_pool_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    (u64::from(sys::getpid()) << 32) | NEXT.fetch_add(1, Ordering::Relaxed)
}

impl BufferPool {
    /// A pool of `slots` regions of `slot_len_bytes` each, all allocated now.
    ///
    /// # Errors
    /// [`Error::FdLimit`] or [`Error::Buffer`] if the memfd cannot be
    /// created, sized or mapped (for example when memory is short).
    ///
    /// # Panics
    /// If `slots` is 0 or above [`MAX_POOL_SLOTS`], or `slot_len_bytes` is 0.
    pub fn new(slots: u32, slot_len_bytes: usize) -> Result<BufferPool> {
        assert!(
            slots > 0 && slots <= MAX_POOL_SLOTS,
            "slots must be in 1..={MAX_POOL_SLOTS}"
        );
        assert!(slot_len_bytes > 0, "slot_len_bytes must be positive");
        let stride = slot_len_bytes.next_multiple_of(sys::page_size());
        let ctl_len = control_len(slots);
        let data_len = stride
            .checked_mul(slots as usize)
            .expect("pool size overflows usize");
        let total = (ctl_len + data_len) as u64;
        let fd = sys::memfd_create(c"miniray-pool", total).map_err(Error::buffer)?;
        sys::fallocate(fd.as_fd(), total).map_err(Error::buffer)?;
        sys::add_seals(fd.as_fd(), sys::SEAL_SIZE | sys::SEAL_SEAL).map_err(Error::Buffer)?;
        let rw = MapOptions {
            writable: true,
            populate: true,
        };
        let control = Control {
            map: Mapping::new(fd.as_fd(), 0, ctl_len, rw).map_err(Error::buffer)?,
            slots,
        };
        let data = Mapping::new(fd.as_fd(), ctl_len as u64, data_len, rw).map_err(Error::buffer)?;
        let id = next_pool_id();
        let header = PoolHeader {
            magic: POOL_MAGIC,
            version: POOL_VERSION,
            slots,
            slot_len: slot_len_bytes as u64,
            slot_stride: stride as u64,
            data_offset: ctl_len as u64,
            id,
            wake: 0,
            waiters: 0,
            retired: 0,
            reserved: 0,
        };
        // SAFETY: the control mapping is writable, page-aligned and at least
        // HEADER_LEN long; no other process has it yet.
        unsafe { control.map.as_ptr().cast::<PoolHeader>().write(header) };
        let table = Mutex::new(Table {
            slots: vec![SlotState::Free; slots as usize],
            confirmed: Vec::new(),
        });
        let shared = PoolShared {
            id,
            owner_generation: sys::fork_generation(),
            fd,
            control,
            data,
            slot_len: slot_len_bytes,
            slot_stride: stride,
            table,
        };
        Ok(BufferPool {
            shared: Arc::new(shared),
        })
    }

    /// Number of slots.
    pub fn slots(&self) -> u32 {
        self.shared.control.slots
    }

    /// Usable bytes per slot.
    pub fn slot_len(&self) -> usize {
        self.shared.slot_len
    }

    /// Slots that [`try_acquire`](Self::try_acquire) could hand out now.
    pub fn available(&self) -> usize {
        let mut table = self.shared.lock();
        (0..table.slots.len())
            .filter(|&i| self.shared.reusable(&mut table, i))
            .count()
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
    /// let held = pool.acquire(Duration::from_secs(1))?;
    /// let err = pool.acquire(Duration::from_millis(10)).unwrap_err();
    /// assert!(matches!(err, miniray::Error::Timeout { .. }));
    /// drop(held);
    /// assert!(pool.acquire(Duration::from_millis(10)).is_ok());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn acquire(&self, timeout: Duration) -> Result<SharedBuf> {
        let deadline = Instant::now().checked_add(timeout); // None: forever.
        let ctl = &self.shared.control;
        loop {
            if let Some(buf) = self.try_acquire() {
                return Ok(buf);
            }
            ctl.waiters().fetch_add(1, Ordering::SeqCst);
            let seen = ctl.wake().load(Ordering::SeqCst);
            let again = self.try_acquire();
            let left = deadline.map_or(Duration::MAX, |d| {
                d.saturating_duration_since(Instant::now())
            });
            let slept = match again.is_none() && !left.is_zero() {
                true => sys::futex_wait(ctl.wake(), seen, left),
                false => Ok(()),
            };
            ctl.waiters().fetch_sub(1, Ordering::SeqCst);
            slept.map_err(Error::Buffer)?;
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
    pub fn try_acquire(&self) -> Option<SharedBuf> {
        assert_eq!(
            sys::fork_generation(),
            self.shared.owner_generation,
            "a BufferPool hands out slots only in the process that made it; make the pool inside the worker"
        );
        let mut table = self.shared.lock();
        let slot = (0..table.slots.len()).find(|&i| self.shared.reusable(&mut table, i))?;
        table.slots[slot] = SlotState::Writing;
        drop(table);
        Some(SharedBuf::pooled(PoolLease {
            pool: self.shared.clone(),
            slot: slot as u32,
            sent: false,
        }))
    }

    /// Takes back every slot sent to `peer` (a dead process's slots).
    pub(crate) fn reclaim(shared: &PoolShared, peer: u64) {
        let mut table = shared.lock();
        for state in table
            .slots
            .iter_mut()
            .filter(|s| **s == SlotState::Sent { peer })
        {
            *state = SlotState::Free;
        }
        table.confirmed.retain(|&p| p != peer); // Peer ids are never reused.
        drop(table);
        shared.control.bump();
    }
}

impl PoolShared {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table holds no invariant a panicking holder could break.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `slot` can be handed out; seeing a slot the peer released
    /// also records that the peer has the pool mapped.
    fn reusable(&self, table: &mut Table, slot: usize) -> bool {
        match table.slots[slot] {
            SlotState::Free => true,
            SlotState::Writing => false,
            SlotState::Sent { peer } => {
                let freed = self.control.flag(slot as u32).load(Ordering::Acquire) == FREE;
                if freed && !table.confirmed.contains(&peer) {
                    table.confirmed.push(peer);
                }
                freed
            }
        }
    }

    /// Whether `peer` is known to have mapped this pool.
    pub(crate) fn is_confirmed(&self, peer: u64) -> bool {
        self.lock().confirmed.contains(&peer)
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        self.control.retired().store(1, Ordering::SeqCst);
    }
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

/// The writer's hold on one slot, inside a [`SharedBuf`].
pub(crate) struct PoolLease {
    pool: Arc<PoolShared>,
    slot: u32,
    sent: bool,
}

impl PoolLease {
    pub(crate) fn capacity(&self) -> usize {
        self.pool.slot_len
    }

    pub(crate) fn data_ptr(&self) -> *mut u8 {
        let offset = self.slot as usize * self.pool.slot_stride;
        debug_assert!(offset + self.pool.slot_len <= self.pool.data.len());
        // SAFETY: the offset is within the data mapping (slot < slots).
        unsafe { self.pool.data.as_ptr().add(offset) }
    }

    pub(crate) fn pool(&self) -> &Arc<PoolShared> {
        &self.pool
    }

    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }

    /// Raises the shared "held" flag; call before the frame goes out, so the
    /// receiver's release can never come first.
    pub(crate) fn prepare_send(&self) {
        self.pool
            .control
            .flag(self.slot)
            .store(HELD, Ordering::SeqCst);
    }

    /// The frame went out: the slot is the peer's until it clears the flag
    /// (or dies, see [`BufferPool::reclaim`]).
    pub(crate) fn commit_send(mut self, peer: u64) {
        self.pool.lock().slots[self.slot as usize] = SlotState::Sent { peer };
        self.sent = true;
    }
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        if !self.sent {
            self.pool.lock().slots[self.slot as usize] = SlotState::Free;
            self.pool.control.bump();
        }
    }
}

/// A peer's pool as mapped by the receiver: control block writable (to
/// release slots), data read-only.
pub(crate) struct PoolMapping {
    control: Control,
    data: Mapping,
    slot_len: usize,
    slot_stride: usize,
}

impl PoolMapping {
    /// Validates and maps a pool memfd received from a peer, then closes it.
    pub(crate) fn map(fd: OwnedFd, id: u64) -> Result<PoolMapping> {
        check_sealed(&fd)?;
        let size = sys::file_len(fd.as_fd()).map_err(Error::Buffer)?;
        let header = read_header(&fd, size)?;
        let layout = PoolLayout::check(&header, id, size)?;
        let rw = MapOptions {
            writable: true,
            populate: false,
        };
        let ctl_map = Mapping::new(fd.as_fd(), 0, layout.control_len, rw).map_err(Error::buffer)?;
        let ro = MapOptions {
            writable: false,
            populate: true,
        };
        let data = Mapping::new(fd.as_fd(), layout.control_len as u64, layout.data_len, ro)
            .map_err(Error::buffer)?;
        let control = Control {
            map: ctl_map,
            slots: header.slots,
        };
        Ok(PoolMapping {
            control,
            data,
            slot_len: layout.slot_len,
            slot_stride: layout.slot_stride,
        })
    }

    pub(crate) fn slots(&self) -> u32 {
        self.control.slots
    }

    pub(crate) fn slot_len(&self) -> usize {
        self.slot_len
    }

    pub(crate) fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.control.slots, "slot {slot} out of range");
        // SAFETY: slot < slots, so the offset is within the data mapping.
        unsafe { self.data.as_ptr().add(slot as usize * self.slot_stride) }
    }

    pub(crate) fn release(&self, slot: u32) {
        self.control.release(slot);
    }

    fn is_retired(&self) -> bool {
        self.control.retired().load(Ordering::SeqCst) != 0
    }
}

fn read_header(fd: &OwnedFd, size: u64) -> Result<PoolHeader> {
    if size < HEADER_LEN as u64 {
        return Err(Error::Protocol(format!(
            "pool region of {size} bytes has no header"
        )));
    }
    let ro = MapOptions {
        writable: false,
        populate: false,
    };
    let first = Mapping::new(fd.as_fd(), 0, HEADER_LEN, ro).map_err(Error::buffer)?;
    // Only the fields before `wake` are constant; the rest other processes
    // may be updating atomically right now, so they are not read here.
    let constant = offset_of!(PoolHeader, wake);
    let mut header = PoolHeader::zeroed();
    // SAFETY: the mapping holds HEADER_LEN >= `constant` readable bytes that
    // nobody writes once the pool is shared; the destination is a distinct
    // local of at least that size; any bytes are a valid PoolHeader (Pod).
    unsafe {
        let dst = bytemuck::bytes_of_mut(&mut header).as_mut_ptr();
        std::ptr::copy_nonoverlapping(first.as_ptr(), dst, constant);
    }
    Ok(header)
}

/// A received pool header, checked against the region's real size.
struct PoolLayout {
    control_len: usize,
    data_len: usize,
    slot_len: usize,
    slot_stride: usize,
}

impl PoolLayout {
    fn check(h: &PoolHeader, id: u64, size: u64) -> Result<PoolLayout> {
        let bad = |what: &str| Err(Error::Protocol(format!("bad pool region: {what}")));
        if h.magic != POOL_MAGIC || h.version != POOL_VERSION {
            return bad("magic or version");
        }
        if h.id != id {
            return bad("id does not match the attachment");
        }
        if h.slots == 0 || h.slots > MAX_POOL_SLOTS {
            return bad("slot count");
        }
        let page = sys::page_size() as u64;
        let control_len = control_len(h.slots) as u64;
        if h.slot_len == 0
            || h.slot_stride % page != 0
            || h.slot_stride < h.slot_len
            || h.data_offset != control_len
        {
            return bad("slot layout");
        }
        let data_len = h.slot_stride.checked_mul(u64::from(h.slots));
        match data_len.and_then(|d| d.checked_add(control_len)) {
            Some(total) if total <= size => Ok(PoolLayout {
                control_len: control_len as usize,
                data_len: data_len.unwrap_or(0) as usize,
                slot_len: h.slot_len as usize,
                slot_stride: h.slot_stride as usize,
            }),
            _ => bad("slots extend past the end of the region"),
        }
    }
}

/// Most slots a receiver remembers from pools it has not mapped (yet).
const MAX_ORPHAN_SLOTS: usize = 1024;

/// Pools a link has received from its peer, by id.
#[derive(Default)]
pub(crate) struct ReceivedPools {
    pools: HashMap<u64, Arc<PoolMapping>>,
    /// Slots named before their pool was mapped (its descriptor lost at
    /// the fd limit): released as soon as the pool is announced again.
    orphans: Vec<(u64, u32)>,
}

impl ReceivedPools {
    /// Maps a pool the peer announced. A pool already mapped is announced
    /// again until its sender has seen a release from us: that copy of the
    /// descriptor is simply closed.
    pub(crate) fn register(&mut self, id: u64, fd: OwnedFd) -> Result<()> {
        if self.pools.contains_key(&id) {
            return Ok(());
        }
        // Unmap pools their sender has dropped and no view still uses.
        self.pools
            .retain(|_, pool| !(pool.is_retired() && Arc::strong_count(pool) == 1));
        if self.pools.len() >= MAX_POOLS_PER_LINK {
            return Err(Error::Protocol(format!(
                "more than {MAX_POOLS_PER_LINK} pools from one peer"
            )));
        }
        let pool = Arc::new(PoolMapping::map(fd, id)?);
        self.release_orphans(id, &pool);
        self.pools.insert(id, pool);
        Ok(())
    }

    fn release_orphans(&mut self, id: u64, pool: &PoolMapping) {
        self.orphans.retain(|&(orphan_id, slot)| {
            if orphan_id == id && slot < pool.slots() {
                pool.release(slot);
            }
            orphan_id != id
        });
    }

    /// The pool of a slot; an unknown pool's slot is remembered, to be
    /// released if the pool is announced later.
    pub(crate) fn get(&mut self, id: u64, slot: u32) -> Result<&Arc<PoolMapping>> {
        if !self.pools.contains_key(&id) && self.orphans.len() < MAX_ORPHAN_SLOTS {
            self.orphans.push((id, slot));
        }
        self.pools
            .get(&id)
            .ok_or_else(|| Error::Protocol(format!("slot of unknown pool {id:#x}")))
    }
}
