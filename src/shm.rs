//! Shared memory underneath buffers and pools: the pool's header and
//! slots, each peer's ticket, the owner's bookkeeping of who holds which
//! slot, the receiver's mapping of a peer's pool, and the seal checks every
//! received region passes.
//!
//! A pool is two kinds of memfd. The **pool region** holds a header page
//! and the slots; its owner maps it writable and then seals it against new
//! writable mappings, so every receiver maps it read-only: no peer can
//! touch the header or another peer's data. Each peer the owner sends
//! slots to gets a **ticket** of its own, a small region shared by the
//! owner and that peer alone: one flag per slot ("I hold it" / "I let it
//! go") and a futex word. A receiver gives a slot back by clearing its own
//! flag, with no message; it cannot release, or hold, anything for anyone
//! else, and the owner decides what to reuse from its private table of who
//! holds what. One slot can be held by several peers at once (a broadcast):
//! it comes back when all of them let go.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytemuck::{Pod, Zeroable};

use crate::sys::{self, FutexWord, MapOptions, Mapping};
use crate::{Error, Result};

/// Most slots in one pool: a ticket stays within two pages, and a pool is
/// a handful of in-flight batches, not an allocator.
pub const MAX_POOL_SLOTS: u32 = 1024;
/// Most peers holding slots of one pool at once: each has a ticket the
/// owner watches, and one `futex_waitv` watches at most 128 words.
pub const MAX_POOL_SEATS: u32 = 64;
/// Most pools one link accepts from its peer; each costs three mappings
/// and two descriptors.
pub(crate) const MAX_POOLS_PER_LINK: usize = 64;

const POOL_MAGIC: u64 = u64::from_le_bytes(*b"MRAYPOOL");
const TICKET_MAGIC: u64 = u64::from_le_bytes(*b"MRAYTICK");
const POOL_VERSION: u32 = 3;
/// A ticket's flag values.
const HELD: u32 = 1;
const FREE: u32 = 0;
/// The longest an owner sleeps between looks at its tickets: a peer that
/// keeps its own wake-up from being sent delays only the notice of its own
/// releases, and by no more than this.
const RELEASE_LOOK_INTERVAL: Duration = Duration::from_millis(20);
/// Wake-ups in a row that freed nothing before an owner stops trusting the
/// futex and sleeps [`RELEASE_LOOK_INTERVAL`] plainly: a peer bumping its
/// word in a loop cannot make the owner spin.
const FRUITLESS_WAKES: u32 = 8;

/// The pool region's header page, read-only for every receiver.
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
    /// Offset of slot 0 in the region: one page.
    data_offset: u64,
    id: u64,
    /// Set to 1 by the owner when it drops the pool: receivers may unmap
    /// it once they hold no view of it. The only word the owner writes
    /// after the pool is shared.
    retired: u32,
    reserved: u32,
}

/// The start of a ticket; one `u32` flag per slot follows.
#[repr(C)]
#[derive(Clone, Copy, Pod, Zeroable)]
struct TicketHeader {
    magic: u64,
    pool_id: u64,
    slots: u32,
    /// Futex word: bumped by the peer on every release.
    wake: u32,
    /// The owner sleeping on `wake`; a release skips the wake call at 0.
    waiters: u32,
    reserved: u32,
}

const POOL_HEADER_LEN: usize = size_of::<PoolHeader>();
const TICKET_HEADER_LEN: usize = size_of::<TicketHeader>();
const _: () = {
    assert!(POOL_HEADER_LEN == 56);
    assert!(offset_of!(PoolHeader, retired) == 48);
    assert!(TICKET_HEADER_LEN == 32);
    assert!(offset_of!(TicketHeader, wake) == 20);
    assert!(offset_of!(TicketHeader, waiters) == 24);
};

fn ticket_len(slots: u32) -> usize {
    (TICKET_HEADER_LEN + 4 * slots as usize).next_multiple_of(sys::page_size())
}

/// A mapped region read as atomic words.
trait Words {
    fn map(&self) -> &Mapping;

    fn word<A>(&self, offset: usize) -> &A {
        let map = self.map();
        let size = size_of::<A>();
        assert!(
            offset + size <= map.len() && offset % size == 0,
            "shared word out of range"
        );
        // SAFETY: in bounds and aligned to the word's size (checked above;
        // the mapping is page-aligned); `A` is only ever AtomicU32, valid for
        // any bits; the mapping lives as long as `self`, and every process
        // sharing it accesses these words only atomically.
        unsafe { &*map.as_ptr().add(offset).cast::<A>() }
    }
}

/// One peer's ticket for one pool, as either side maps it (read-write).
pub(crate) struct Ticket {
    fd: OwnedFd,
    map: Mapping,
    slots: u32,
}

impl Words for Ticket {
    fn map(&self) -> &Mapping {
        &self.map
    }
}

impl Ticket {
    fn create(pool_id: u64, slots: u32) -> Result<Ticket> {
        let len = ticket_len(slots);
        let fd = sys::memfd_create(c"miniray-ticket", len as u64).map_err(Error::buffer)?;
        sys::add_seals(fd.as_fd(), sys::SEAL_SIZE | sys::SEAL_SEAL).map_err(Error::Buffer)?;
        let map = map_shared(&fd, 0, len, true)?;
        let header = TicketHeader {
            magic: TICKET_MAGIC,
            pool_id,
            slots,
            wake: 0,
            waiters: 0,
            reserved: 0,
        };
        // SAFETY: the mapping is writable, page-aligned and at least the
        // header's length; no other process has it yet.
        unsafe { map.as_ptr().cast::<TicketHeader>().write(header) };
        Ok(Ticket { fd, map, slots })
    }

    /// Maps a ticket received from a pool's owner, after checking it is
    /// one, for this pool, large enough for its slots.
    fn open(fd: OwnedFd, pool_id: u64, slots: u32) -> Result<Ticket> {
        check_sealed(&fd, sys::SEAL_SIZE)?;
        let size = sys::file_len(fd.as_fd()).map_err(Error::Buffer)?;
        let len = ticket_len(slots);
        if size < len as u64 {
            return Err(Error::Protocol(format!(
                "pool ticket of {size} bytes for {slots} slots"
            )));
        }
        let map = map_shared(&fd, 0, len, true)?;
        let ticket = Ticket { fd, map, slots };
        let magic = ticket.word::<AtomicU64>(offset_of!(TicketHeader, magic));
        let id = ticket.word::<AtomicU64>(offset_of!(TicketHeader, pool_id));
        if magic.load(Ordering::Relaxed) != TICKET_MAGIC || id.load(Ordering::Relaxed) != pool_id {
            return Err(Error::Protocol("bad pool ticket".into()));
        }
        Ok(ticket)
    }

    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn wake(&self) -> &AtomicU32 {
        self.word(offset_of!(TicketHeader, wake))
    }

    fn waiters(&self) -> &AtomicU32 {
        self.word(offset_of!(TicketHeader, waiters))
    }

    fn flag(&self, slot: u32) -> &AtomicU32 {
        assert!(slot < self.slots, "slot {slot} out of {}", self.slots);
        self.word(TICKET_HEADER_LEN + 4 * slot as usize)
    }

    /// The peer's side: lets go of `slot` and wakes a sleeping owner.
    fn release(&self, slot: u32) {
        self.flag(slot).store(FREE, Ordering::SeqCst);
        self.wake().fetch_add(1, Ordering::SeqCst);
        if self.waiters().load(Ordering::SeqCst) > 0 {
            sys::futex_wake_all(self.wake());
        }
    }
}

/// Who has a slot, in the owner's private table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    Writing,
    /// Handed to the peers in these seats while its lease still lives (a
    /// broadcast under way): not free, whatever those peers did with it.
    Sending {
        seats: u64,
    },
    /// Handed to the peers in these seats.
    Sent {
        seats: u64,
    },
}

/// A peer with a seat: its id and its ticket.
#[derive(Clone)]
struct Seat {
    peer: u64,
    ticket: Arc<Ticket>,
}

/// The owner's private bookkeeping, under one lock.
struct Table {
    slots: Vec<SlotState>,
    seats: Vec<Option<Seat>>,
    /// Peers seen to have mapped the pool (they released a slot of it).
    /// Until a peer is here, every slot sent to it carries the pool's
    /// descriptors again, in case the first ones were lost at its fd limit.
    confirmed: Vec<u64>,
}

/// The owner's side of a pool: its region, mappings and table.
pub(crate) struct PoolShared {
    id: u64,
    /// The fork generation of the process that made the pool: a forked
    /// child sees another one, and may not hand out slots.
    owner_generation: u64,
    fd: OwnedFd,
    header: Mapping,
    data: Mapping,
    slots: u32,
    slot_len: usize,
    slot_stride: usize,
    table: Mutex<Table>,
    /// This process's own futex word: bumped when the owner frees a slot
    /// itself (a lease dropped unsent, a dead peer's slots taken back).
    local_wake: AtomicU32,
    /// Threads of this process sleeping on `local_wake`.
    local_waiters: AtomicU32,
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
        let page = sys::page_size();
        let data_len = stride * slots as usize;
        let total = (page + data_len) as u64;
        let fd = sys::memfd_create(c"miniray-pool", total).map_err(Error::buffer)?;
        sys::fallocate(fd.as_fd(), total).map_err(Error::buffer)?;
        let header = map_shared(&fd, 0, page, true)?;
        let data = Mapping::new(
            fd.as_fd(),
            page as u64,
            data_len,
            MapOptions {
                writable: true,
                populate: true,
            },
        )
        .map_err(Error::buffer)?;
        let id = next_pool_id();
        let fields = PoolHeader {
            magic: POOL_MAGIC,
            version: POOL_VERSION,
            slots,
            slot_len: slot_len as u64,
            slot_stride: stride as u64,
            data_offset: page as u64,
            id,
            retired: 0,
            reserved: 0,
        };
        // SAFETY: the header mapping is writable, page-aligned and a page
        // long; no other process has the region yet.
        unsafe { header.as_ptr().cast::<PoolHeader>().write(fields) };
        // From here on only our own mappings may write: every receiver's
        // is read-only.
        let seals = sys::SEAL_SIZE | sys::SEAL_FUTURE_WRITE | sys::SEAL_SEAL;
        sys::add_seals(fd.as_fd(), seals).map_err(Error::Buffer)?;
        let table = Mutex::new(Table {
            slots: vec![SlotState::Free; slots as usize],
            seats: vec![None; MAX_POOL_SEATS as usize],
            confirmed: Vec::new(),
        });
        Ok(PoolShared {
            id,
            owner_generation: sys::fork_generation(),
            fd,
            header,
            data,
            slots,
            slot_len,
            slot_stride: stride,
            table,
            local_wake: AtomicU32::new(0),
            local_waiters: AtomicU32::new(0),
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
        self.slots
    }

    pub(crate) fn slot_len(&self) -> usize {
        self.slot_len
    }

    /// Bytes of the whole pool region a receiver maps.
    pub(crate) fn region_len(&self) -> u64 {
        (self.header.len() + self.data.len()) as u64
    }

    /// Slots that [`PoolShared::try_take`] could hand out now.
    pub(crate) fn available(&self) -> usize {
        let mut table = self.lock();
        (0..table.slots.len())
            .filter(|&i| reusable(&mut table, i))
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
        let slot = (0..table.slots.len()).find(|&i| reusable(&mut table, i))?;
        table.slots[slot] = SlotState::Writing;
        drop(table);
        Some(PoolLease {
            pool: self.clone(),
            slot: slot as u32,
            sent: false,
        })
    }

    /// The seat of `peer` in this pool, with its ticket, given one if it
    /// has none.
    pub(crate) fn seat_of(&self, peer: u64) -> Result<(u32, Arc<Ticket>)> {
        let mut table = self.lock();
        let found = table
            .seats
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.peer == peer));
        if let Some(seat) = found {
            let ticket = table.seats[seat].as_ref().expect("found").ticket.clone();
            return Ok((seat as u32, ticket));
        }
        let Some(free) = table.seats.iter().position(Option::is_none) else {
            return Err(Error::PoolSeats {
                max: MAX_POOL_SEATS,
            });
        };
        let ticket = Arc::new(Ticket::create(self.id, self.slots)?);
        table.seats[free] = Some(Seat {
            peer,
            ticket: ticket.clone(),
        });
        Ok((free as u32, ticket))
    }

    /// Whether `peer` is known to have mapped this pool.
    pub(crate) fn is_confirmed(&self, peer: u64) -> bool {
        self.lock().confirmed.contains(&peer)
    }

    /// Takes back every slot held by `peer` (a dead process) and frees its
    /// seat, ticket and all.
    pub(crate) fn reclaim(&self, peer: u64) {
        let mut table = self.lock();
        let found = table
            .seats
            .iter()
            .position(|s| s.as_ref().is_some_and(|s| s.peer == peer));
        let Some(seat) = found else {
            return;
        };
        let bit = 1u64 << seat;
        for state in table.slots.iter_mut() {
            *state = match *state {
                SlotState::Sent { seats } if seats & bit != 0 => match seats & !bit {
                    0 => SlotState::Free,
                    rest => SlotState::Sent { seats: rest },
                },
                SlotState::Sending { seats } => SlotState::Sending {
                    seats: seats & !bit,
                },
                other => other,
            };
        }
        table.seats[seat] = None;
        table.confirmed.retain(|&p| p != peer); // Peer ids are never reused.
        drop(table);
        self.bump_local();
    }

    fn bump_local(&self) {
        self.local_wake.fetch_add(1, Ordering::SeqCst);
        if self.local_waiters.load(Ordering::SeqCst) > 0 {
            sys::futex_wake_all(&self.local_wake);
        }
    }

    /// Sleeps until a holder may have released a slot, or `timeout`
    /// passes; `retry` is asked once more after announcing the wait, so a
    /// release in between is never missed. Returns what `retry` found.
    ///
    /// Watches this process's own word and every seat's ticket at once.
    /// What a peer writes to its ticket can delay the notice of its own
    /// releases by [`RELEASE_LOOK_INTERVAL`] at most, and cannot make this
    /// spin (see [`FRUITLESS_WAKES`]).
    pub(crate) fn wait_release<T>(
        &self,
        timeout: Duration,
        fruitless: &mut u32,
        retry: impl FnOnce() -> Option<T>,
    ) -> Result<Option<T>> {
        let tickets: Vec<Arc<Ticket>> = self
            .lock()
            .seats
            .iter()
            .flatten()
            .map(|s| s.ticket.clone())
            .collect();
        self.local_waiters.fetch_add(1, Ordering::SeqCst);
        for t in &tickets {
            t.waiters().fetch_add(1, Ordering::SeqCst);
        }
        let mut words = vec![FutexWord {
            word: &self.local_wake,
            expected: self.local_wake.load(Ordering::SeqCst),
            shared: false,
        }];
        words.extend(tickets.iter().map(|t| FutexWord {
            word: t.wake(),
            expected: t.wake().load(Ordering::SeqCst),
            shared: true,
        }));
        let again = retry();
        let slice = timeout.min(RELEASE_LOOK_INTERVAL);
        let slept = match (
            again.is_some(),
            slice.is_zero(),
            *fruitless >= FRUITLESS_WAKES,
        ) {
            (true, _, _) | (_, true, _) => Ok(()),
            (_, _, true) => {
                *fruitless = 0;
                std::thread::sleep(slice);
                Ok(())
            }
            _ => {
                *fruitless += 1;
                sys::futex_wait_any(&words, slice)
            }
        };
        for t in &tickets {
            t.waiters().fetch_sub(1, Ordering::SeqCst);
        }
        slept.map_err(Error::Buffer)?;
        Ok(again)
    }
}

/// Whether `slot` can be handed out; seeing a slot every holder released
/// also records that those holders have the pool mapped.
fn reusable(table: &mut Table, slot: usize) -> bool {
    match table.slots[slot] {
        SlotState::Free => true,
        SlotState::Writing | SlotState::Sending { .. } => false,
        SlotState::Sent { seats } => {
            let held = holders(table, seats)
                .any(|s| s.ticket.flag(slot as u32).load(Ordering::Acquire) != FREE);
            if held {
                return false;
            }
            for seat in (0..MAX_POOL_SEATS as usize).filter(|i| seats & (1 << i) != 0) {
                let peer = table.seats[seat].as_ref().map(|s| s.peer);
                if let Some(peer) = peer
                    && !table.confirmed.contains(&peer)
                {
                    table.confirmed.push(peer);
                }
            }
            table.slots[slot] = SlotState::Free;
            true
        }
    }
}

/// The seats in the bit set `seats`.
fn holders(table: &Table, seats: u64) -> impl Iterator<Item = &Seat> {
    table
        .seats
        .iter()
        .enumerate()
        .filter(move |(i, _)| seats & (1 << i) != 0)
        .filter_map(|(_, s)| s.as_ref())
}

impl Drop for PoolShared {
    fn drop(&mut self) {
        let retired = offset_of!(PoolHeader, retired);
        let header = HeaderWords(&self.header);
        header.word::<AtomicU32>(retired).store(1, Ordering::SeqCst);
    }
}

/// A pool region's header mapping read as words.
struct HeaderWords<'a>(&'a Mapping);

impl Words for HeaderWords<'_> {
    fn map(&self) -> &Mapping {
        self.0
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

    /// Raises the flag in `ticket` (a seat's); call before the frame goes
    /// out, so the receiver's release can never come first.
    pub(crate) fn prepare_send(&self, ticket: &Ticket) {
        ticket.flag(self.slot).store(HELD, Ordering::SeqCst);
    }

    /// The frame never left: lowers the flag again.
    pub(crate) fn cancel_send(&self, ticket: &Ticket) {
        ticket.flag(self.slot).store(FREE, Ordering::SeqCst);
    }

    /// The frame went out: the slot is held by `seat` until its peer lets
    /// go (or dies, see [`PoolShared::reclaim`]).
    pub(crate) fn commit_send(&mut self, seat: u32) {
        let mut table = self.pool.lock();
        let state = &mut table.slots[self.slot as usize];
        let bit = 1u64 << seat;
        *state = match *state {
            SlotState::Sending { seats } => SlotState::Sending { seats: seats | bit },
            _ => SlotState::Sending { seats: bit },
        };
        self.sent = true;
    }
}

impl Drop for PoolLease {
    fn drop(&mut self) {
        let mut table = self.pool.lock();
        let state = &mut table.slots[self.slot as usize];
        let freed = match (*state, self.sent) {
            // Every peer it went to has its share now: their releases
            // decide when it is free.
            (SlotState::Sending { seats }, true) if seats != 0 => {
                *state = SlotState::Sent { seats };
                false
            }
            _ => {
                *state = SlotState::Free;
                true
            }
        };
        drop(table);
        if freed {
            self.pool.bump_local();
        }
    }
}

/// A peer's pool as mapped by the receiver: header and slots read-only,
/// its own ticket read-write. Both descriptors are kept, so that slots can
/// be forwarded to a third process.
pub(crate) struct PoolMapping {
    id: u64,
    fd: OwnedFd,
    data: Mapping,
    header: Mapping,
    ticket: Ticket,
    slots: u32,
    slot_len: usize,
    slot_stride: usize,
}

impl PoolMapping {
    /// Validates and maps a pool region and ticket received from a peer.
    /// Nothing is faulted in: the pages are the owner's, and a region that
    /// only claims to be a pool must not make us allocate.
    pub(crate) fn map(
        fd: OwnedFd,
        ticket: OwnedFd,
        id: u64,
        max_region_bytes: u64,
    ) -> Result<PoolMapping> {
        // Without the future-write seal another receiver could map it
        // writable and change our slots or the header.
        let size = checked_region(
            &fd,
            sys::SEAL_SIZE | sys::SEAL_FUTURE_WRITE,
            max_region_bytes,
        )?;
        let page = sys::page_size();
        if size < page as u64 {
            return Err(Error::Protocol(format!(
                "pool region of {size} bytes has no header"
            )));
        }
        let header_map = map_shared(&fd, 0, page, false)?;
        let header = read_header(&header_map);
        let layout = PoolLayout::check(&header, id, size)?;
        let data = map_shared(&fd, page as u64, layout.data_len, false)?;
        let ticket = Ticket::open(ticket, id, header.slots)?;
        Ok(PoolMapping {
            id,
            fd,
            data,
            header: header_map,
            ticket,
            slots: header.slots,
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

    /// Our ticket's descriptor, for forwarding: the next holder releases
    /// the slot through it.
    pub(crate) fn ticket_fd(&self) -> BorrowedFd<'_> {
        self.ticket.fd.as_fd()
    }

    pub(crate) fn slots(&self) -> u32 {
        self.slots
    }

    pub(crate) fn slot_len(&self) -> usize {
        self.slot_len
    }

    pub(crate) fn slot_ptr(&self, slot: u32) -> *mut u8 {
        assert!(slot < self.slots, "slot {slot} out of range");
        // SAFETY: slot < slots, so the offset is within the data mapping.
        unsafe { self.data.as_ptr().add(slot as usize * self.slot_stride) }
    }

    pub(crate) fn release(&self, slot: u32) {
        self.ticket.release(slot);
    }

    fn is_retired(&self) -> bool {
        let retired = offset_of!(PoolHeader, retired);
        HeaderWords(&self.header)
            .word::<AtomicU32>(retired)
            .load(Ordering::SeqCst)
            != 0
    }
}

fn map_shared(fd: &OwnedFd, offset: u64, len: usize, writable: bool) -> Result<Mapping> {
    let opts = MapOptions {
        writable,
        populate: false,
    };
    Mapping::new(fd.as_fd(), offset, len, opts).map_err(Error::buffer)
}

/// The header's constant fields (all but `retired`, which the owner may be
/// setting right now and is read atomically where needed).
fn read_header(map: &Mapping) -> PoolHeader {
    let constant = offset_of!(PoolHeader, retired);
    let mut header = PoolHeader::zeroed();
    // SAFETY: the mapping is a page, more than `constant` readable bytes,
    // which nobody writes once the pool is shared; the destination is a
    // distinct local of at least that size; any bytes are a valid
    // PoolHeader (Pod).
    unsafe {
        let dst = bytemuck::bytes_of_mut(&mut header).as_mut_ptr();
        std::ptr::copy_nonoverlapping(map.as_ptr(), dst, constant);
    }
    header
}

/// A received pool header, checked against the region's real size.
struct PoolLayout {
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
        if h.slot_len == 0
            || h.slot_stride % page != 0
            || h.slot_stride < h.slot_len
            || h.data_offset != page
        {
            return bad("slot layout");
        }
        let data_len = h.slot_stride.checked_mul(u64::from(h.slots));
        match data_len.and_then(|d| d.checked_add(page)) {
            Some(total) if total <= size => Ok(PoolLayout {
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

/// Pools a link has received from its peer, by id and seat (a forwarded
/// slot arrives through the forwarder's seat and ticket).
#[derive(Default)]
pub(crate) struct ReceivedPools {
    pools: HashMap<(u64, u32), Arc<PoolMapping>>,
    /// Slots named before their pool was mapped (its descriptors lost at
    /// the fd limit): released as soon as the pool is announced again.
    orphans: Vec<(u64, u32, u32)>,
}

impl ReceivedPools {
    /// Maps a pool the peer announced. A pool already mapped is announced
    /// again until its sender has seen a release from us: those copies of
    /// the descriptors are simply closed.
    pub(crate) fn register(
        &mut self,
        (id, seat): (u64, u32),
        (fd, ticket): (OwnedFd, OwnedFd),
        max_region_bytes: u64,
    ) -> Result<()> {
        if self.pools.contains_key(&(id, seat)) {
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
        let pool = Arc::new(PoolMapping::map(fd, ticket, id, max_region_bytes)?);
        self.release_orphans(id, seat, &pool);
        self.pools.insert((id, seat), pool);
        Ok(())
    }

    fn release_orphans(&mut self, id: u64, seat: u32, pool: &PoolMapping) {
        self.orphans.retain(|&(orphan_id, orphan_seat, slot)| {
            let ours = orphan_id == id && orphan_seat == seat;
            if ours && slot < pool.slots() {
                pool.release(slot);
            }
            !ours
        });
    }

    /// The pool of a slot; an unknown pool's slot is remembered, to be
    /// released if the pool is announced later.
    pub(crate) fn get(&mut self, id: u64, seat: u32, slot: u32) -> Result<&Arc<PoolMapping>> {
        if !self.pools.contains_key(&(id, seat)) && self.orphans.len() < MAX_ORPHAN_SLOTS {
            self.orphans.push((id, seat, slot));
        }
        self.pools
            .get(&(id, seat))
            .ok_or_else(|| Error::Protocol(format!("slot of unknown pool {id:#x}")))
    }
}

/// Checks a received region's seals and size, before it is mapped;
/// returns its size.
pub(crate) fn checked_region(
    fd: &OwnedFd,
    required_seals: u32,
    max_region_bytes: u64,
) -> Result<u64> {
    check_sealed(fd, required_seals)?;
    let size = sys::file_len(fd.as_fd()).map_err(Error::Buffer)?;
    check_region_size(size, max_region_bytes)?;
    Ok(size)
}

/// Refuses a region larger than the limit, before it is mapped.
fn check_region_size(size: u64, max_region_bytes: u64) -> Result<()> {
    if size > max_region_bytes {
        return Err(Error::Protocol(format!(
            "a shared region of {size} bytes exceeds the limit of {max_region_bytes} (Limits::max_region_bytes)"
        )));
    }
    Ok(())
}

/// Refuses a region that lacks any of the `required` seals: one whose size
/// its sender could change (a shrink would turn our reads into `SIGBUS`),
/// or whose bytes someone else could still change.
pub(crate) fn check_sealed(fd: &OwnedFd, required: u32) -> Result<()> {
    let seals = sys::seals(fd.as_fd())
        .map_err(|e| Error::Protocol(format!("an attachment is not a sealable memfd ({e})")))?;
    if seals & required != required {
        return Err(Error::Unsealed { seals });
    }
    Ok(())
}
