//! Shared memory underneath buffers and pools: the pool's control block,
//! the owner's bookkeeping of who holds which slot, the receiver's mapping
//! of a peer's pool, and the seal check every received region passes.
//!
//! One pool memfd holds a control block and `slots` data slots. Its
//! descriptor crosses to a peer with the slots sent there until the peer is
//! seen to release one (normally just the first); after that a send names a
//! slot and a length. Each peer that holds slots of a pool has a *seat*
//! (0..64) in it; a slot's 64-bit hold word has one bit per seat holding it,
//! so one slot can be handed to many peers at once (a broadcast) and comes
//! back when the last of them lets go. A receiver clears its bit (and wakes
//! a waiting owner with a futex), so a release costs no message. The owner
//! decides which slots it may reuse from its own private table; the shared
//! words only say "these readers are done".

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytemuck::{Pod, Zeroable};

use crate::sys::{self, MapOptions, Mapping};
use crate::{Error, Result};

/// Most slots in one pool: the control block stays within three pages, and
/// a pool is a handful of in-flight batches, not an allocator.
///
/// # Examples
///
/// ```
/// assert!(miniray::BufferPool::new(miniray::MAX_POOL_SLOTS, 64).is_ok());
/// # Ok::<(), miniray::Error>(())
/// ```
pub const MAX_POOL_SLOTS: u32 = 1024;
/// Most peers holding slots of one pool at once: one bit each in a slot's
/// 64-bit hold word.
///
/// # Examples
///
/// ```
/// assert_eq!(miniray::MAX_POOL_SEATS, 64);
/// ```
pub const MAX_POOL_SEATS: u32 = 64;
/// Most pools one link accepts from its peer; each costs two mappings and
/// one descriptor.
pub(crate) const MAX_POOLS_PER_LINK: usize = 64;

const POOL_MAGIC: u64 = u64::from_le_bytes(*b"MRAYPOOL");
const POOL_VERSION: u32 = 2;

/// The start of the control block, laid out for both processes.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
pub(crate) struct PoolHeader {
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
    /// Owners sleeping on `wake`; a release skips the wake syscall at 0.
    waiters: u32,
    /// Set to 1 when the owner drops the pool: receivers may unmap it once
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

fn control_len(slots: u32) -> usize {
    (HEADER_LEN + 8 * slots as usize).next_multiple_of(sys::page_size())
}

/// The writable control block, shared by the owner and its receivers.
struct Control {
    map: Mapping,
    slots: u32,
}

impl Control {
    fn at<A>(&self, offset: usize) -> &A {
        let size = size_of::<A>();
        assert!(
            offset + size <= self.map.len() && offset % size == 0,
            "control word out of range"
        );
        // SAFETY: in bounds and aligned to the word's size (checked above;
        // the mapping is page-aligned); `A` is only ever AtomicU32 or
        // AtomicU64, valid for any bits; the mapping is writable, lives as
        // long as `self`, and both processes access it only atomically.
        unsafe { &*self.map.as_ptr().add(offset).cast::<A>() }
    }

    fn wake(&self) -> &AtomicU32 {
        self.at(offset_of!(PoolHeader, wake))
    }

    fn waiters(&self) -> &AtomicU32 {
        self.at(offset_of!(PoolHeader, waiters))
    }

    fn retired(&self) -> &AtomicU32 {
        self.at(offset_of!(PoolHeader, retired))
    }

    fn hold(&self, slot: u32) -> &AtomicU64 {
        assert!(slot < self.slots, "slot {slot} out of {}", self.slots);
        self.at(HEADER_LEN + 8 * slot as usize)
    }

    /// Clears `seat`'s hold on `slot` and wakes a sleeping owner, in any
    /// process.
    fn release(&self, slot: u32, seat: u32) {
        self.hold(slot).fetch_and(!seat_bit(seat), Ordering::SeqCst);
        self.bump();
    }

    fn bump(&self) {
        self.wake().fetch_add(1, Ordering::SeqCst);
        if self.waiters().load(Ordering::SeqCst) > 0 {
            sys::futex_wake_all(self.wake());
        }
    }
}

fn seat_bit(seat: u32) -> u64 {
    assert!(seat < MAX_POOL_SEATS, "seat {seat} out of range");
    1 << seat
}

/// Who has a slot, in the owner's private table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    Writing,
    /// Handed to the peers in these seats.
    Sent {
        seats: u64,
    },
}

/// The owner's private bookkeeping, under one lock.
struct Table {
    slots: Vec<SlotState>,
    /// The peer id in each seat.
    seats: [Option<u64>; MAX_POOL_SEATS as usize],
    /// Peers seen to have mapped the pool (they released a slot of it).
    /// Until a peer is here, every slot sent to it carries the pool's
    /// descriptor again, in case the first one was lost at its fd limit.
    confirmed: Vec<u64>,
}

/// The owner's side of a pool: its memfd, mappings and table.
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

/// Pool ids only need to be unique among the pools one peer receives; pid
/// in the high bits keeps pools of different processes apart, so a pool
/// forwarded by a middle process never collides with that process's own.
fn next_pool_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    (u64::from(sys::getpid()) << 32) | NEXT.fetch_add(1, Ordering::Relaxed)
}

impl PoolShared {
    /// Creates and maps a pool; sizes are checked by the caller.
    pub(crate) fn create(slots: u32, slot_len: usize, stride: usize) -> Result<PoolShared> {
        let ctl_len = control_len(slots);
        let data_len = stride * slots as usize;
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
            slot_len: slot_len as u64,
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
            seats: [None; MAX_POOL_SEATS as usize],
            confirmed: Vec::new(),
        });
        Ok(PoolShared {
            id,
            owner_generation: sys::fork_generation(),
            fd,
            control,
            data,
            slot_len,
            slot_stride: stride,
            table,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Table> {
        // The table holds no invariant a panicking holder could break.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub(crate) fn slots(&self) -> u32 {
        self.control.slots
    }

    pub(crate) fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Slots that [`PoolShared::try_take`] could hand out now.
    pub(crate) fn available(&self) -> usize {
        let mut table = self.lock();
        (0..table.slots.len())
            .filter(|&i| self.reusable(&mut table, i))
            .count()
    }

    /// Takes a free slot for writing, if there is one.
    ///
    /// # Panics
    /// In a process other than the one that made the pool (a forked child).
    pub(crate) fn try_take(self: &Arc<Self>) -> Option<PoolLease> {
        assert_eq!(
            sys::fork_generation(),
            self.owner_generation,
            "a BufferPool hands out slots only in the process that made it; make the pool inside the worker"
        );
        let mut table = self.lock();
        let slot = (0..table.slots.len()).find(|&i| self.reusable(&mut table, i))?;
        table.slots[slot] = SlotState::Writing;
        drop(table);
        Some(PoolLease {
            pool: self.clone(),
            slot: slot as u32,
            sent: false,
        })
    }

    /// Whether `slot` can be handed out; seeing a slot every holder
    /// released also records that those holders have the pool mapped.
    fn reusable(&self, table: &mut Table, slot: usize) -> bool {
        match table.slots[slot] {
            SlotState::Free => true,
            SlotState::Writing => false,
            SlotState::Sent { seats } => {
                let freed = self.control.hold(slot as u32).load(Ordering::Acquire) & seats == 0;
                if freed {
                    confirm_seats(table, seats);
                    table.slots[slot] = SlotState::Free;
                }
                freed
            }
        }
    }

    /// The seat of `peer` in this pool, given one if it has none.
    pub(crate) fn seat_of(&self, peer: u64) -> Result<u32> {
        let mut table = self.lock();
        if let Some(seat) = table.seats.iter().position(|&p| p == Some(peer)) {
            return Ok(seat as u32);
        }
        let Some(free) = table.seats.iter().position(Option::is_none) else {
            return Err(Error::PoolSeats {
                max: MAX_POOL_SEATS,
            });
        };
        table.seats[free] = Some(peer);
        Ok(free as u32)
    }

    /// Whether `peer` is known to have mapped this pool.
    pub(crate) fn is_confirmed(&self, peer: u64) -> bool {
        self.lock().confirmed.contains(&peer)
    }

    /// Takes back every slot held by `peer` (a dead process, or a link
    /// that closed) and frees its seat.
    pub(crate) fn reclaim(&self, peer: u64) {
        let mut table = self.lock();
        let Some(seat) = table.seats.iter().position(|&p| p == Some(peer)) else {
            return;
        };
        let bit = seat_bit(seat as u32);
        for slot in 0..table.slots.len() {
            if let SlotState::Sent { seats } = table.slots[slot]
                && seats & bit != 0
            {
                self.control
                    .hold(slot as u32)
                    .fetch_and(!bit, Ordering::SeqCst);
                table.slots[slot] = match seats & !bit {
                    0 => SlotState::Free,
                    rest => SlotState::Sent { seats: rest },
                };
            }
        }
        table.seats[seat] = None;
        table.confirmed.retain(|&p| p != peer); // Peer ids are never reused.
        drop(table);
        self.control.bump();
    }

    /// Sleeps until a receiver releases a slot or `timeout` passes;
    /// `retry` is asked once more after announcing the wait, so a release
    /// in between is never missed.
    pub(crate) fn wait_release<T>(
        &self,
        timeout: std::time::Duration,
        retry: impl FnOnce() -> Option<T>,
    ) -> Result<Option<T>> {
        let ctl = &self.control;
        ctl.waiters().fetch_add(1, Ordering::SeqCst);
        let seen = ctl.wake().load(Ordering::SeqCst);
        let again = retry();
        let slept = match again.is_none() && !timeout.is_zero() {
            true => sys::futex_wait(ctl.wake(), seen, timeout),
            false => Ok(()),
        };
        ctl.waiters().fetch_sub(1, Ordering::SeqCst);
        slept.map_err(Error::Buffer)?;
        Ok(again)
    }
}

fn confirm_seats(table: &mut Table, seats: u64) {
    for seat in 0..MAX_POOL_SEATS as usize {
        if let (true, Some(peer)) = (seats & (1 << seat) != 0, table.seats[seat])
            && !table.confirmed.contains(&peer)
        {
            table.confirmed.push(peer);
        }
    }
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        self.control.retired().store(1, Ordering::SeqCst);
    }
}

/// The owner's hold on one slot, inside a [`SharedBuf`](crate::SharedBuf).
pub(crate) struct PoolLease {
    pool: Arc<PoolShared>,
    slot: u32,
    /// Committed to at least one peer: the slot is theirs now.
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

    /// Raises `seat`'s hold bit; call before the frame goes out, so the
    /// receiver's release can never come first.
    pub(crate) fn prepare_send(&self, seat: u32) {
        let hold = self.pool.control.hold(self.slot);
        hold.fetch_or(seat_bit(seat), Ordering::SeqCst);
    }

    /// The frame never left: lowers the bit again.
    pub(crate) fn cancel_send(&self, seat: u32) {
        let hold = self.pool.control.hold(self.slot);
        hold.fetch_and(!seat_bit(seat), Ordering::SeqCst);
    }

    /// The frame went out: the slot is held by `seat` until its peer
    /// clears the bit (or dies, see [`PoolShared::reclaim`]).
    pub(crate) fn commit_send(&mut self, seat: u32) {
        let mut table = self.pool.lock();
        let state = &mut table.slots[self.slot as usize];
        *state = match *state {
            SlotState::Sent { seats } => SlotState::Sent {
                seats: seats | seat_bit(seat),
            },
            _ => SlotState::Sent {
                seats: seat_bit(seat),
            },
        };
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
/// release slots), data read-only, the descriptor kept so that slots can be
/// forwarded to a third process.
pub(crate) struct PoolMapping {
    id: u64,
    fd: OwnedFd,
    control: Control,
    data: Mapping,
    slot_len: usize,
    slot_stride: usize,
}

impl PoolMapping {
    /// Validates and maps a pool memfd received from a peer. Nothing is
    /// faulted in: a pool's pages are the owner's, already allocated, and
    /// a region that only claims to be a pool must not make us allocate.
    pub(crate) fn map(fd: OwnedFd, id: u64, max_region_bytes: u64) -> Result<PoolMapping> {
        check_sealed(&fd)?;
        let size = sys::file_len(fd.as_fd()).map_err(Error::Buffer)?;
        check_region_size(size, max_region_bytes)?;
        let header = read_header(&fd, size)?;
        let layout = PoolLayout::check(&header, id, size)?;
        let rw = MapOptions {
            writable: true,
            populate: false,
        };
        let ctl_map = Mapping::new(fd.as_fd(), 0, layout.control_len, rw).map_err(Error::buffer)?;
        let ro = MapOptions {
            writable: false,
            populate: false,
        };
        let data = Mapping::new(fd.as_fd(), layout.control_len as u64, layout.data_len, ro)
            .map_err(Error::buffer)?;
        let control = Control {
            map: ctl_map,
            slots: header.slots,
        };
        Ok(PoolMapping {
            id,
            fd,
            control,
            data,
            slot_len: layout.slot_len,
            slot_stride: layout.slot_stride,
        })
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
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

    pub(crate) fn release(&self, slot: u32, seat: u32) {
        self.control.release(slot, seat);
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
    orphans: Vec<(u64, u32, u32)>,
}

impl ReceivedPools {
    /// Maps a pool the peer announced. A pool already mapped is announced
    /// again until its sender has seen a release from us: that copy of the
    /// descriptor is simply closed.
    pub(crate) fn register(&mut self, id: u64, fd: OwnedFd, max_region_bytes: u64) -> Result<()> {
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
        let pool = Arc::new(PoolMapping::map(fd, id, max_region_bytes)?);
        self.release_orphans(id, &pool);
        self.pools.insert(id, pool);
        Ok(())
    }

    fn release_orphans(&mut self, id: u64, pool: &PoolMapping) {
        self.orphans.retain(|&(orphan_id, slot, seat)| {
            if orphan_id == id && slot < pool.slots() && seat < MAX_POOL_SEATS {
                pool.release(slot, seat);
            }
            orphan_id != id
        });
    }

    /// The pool of a slot; an unknown pool's slot is remembered, to be
    /// released if the pool is announced later.
    pub(crate) fn get(&mut self, id: u64, slot: u32, seat: u32) -> Result<&Arc<PoolMapping>> {
        if !self.pools.contains_key(&id) && self.orphans.len() < MAX_ORPHAN_SLOTS {
            self.orphans.push((id, slot, seat));
        }
        self.pools
            .get(&id)
            .ok_or_else(|| Error::Protocol(format!("slot of unknown pool {id:#x}")))
    }
}

/// Refuses a region larger than the limit, before it is mapped.
pub(crate) fn check_region_size(size: u64, max_region_bytes: u64) -> Result<()> {
    if size > max_region_bytes {
        return Err(Error::Protocol(format!(
            "a shared region of {size} bytes exceeds the limit of {max_region_bytes} (Limits::max_region_bytes)"
        )));
    }
    Ok(())
}

/// Refuses a region whose size its sender could still change.
pub(crate) fn check_sealed(fd: &OwnedFd) -> Result<()> {
    let seals = sys::seals(fd.as_fd())
        .map_err(|e| Error::Protocol(format!("an attachment is not a sealable memfd ({e})")))?;
    if seals & sys::SEAL_SIZE != sys::SEAL_SIZE {
        return Err(Error::Unsealed { seals });
    }
    Ok(())
}
