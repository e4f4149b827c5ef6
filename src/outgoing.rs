//! Attachments on their way out: sealed once, described per link, and
//! handed back whole if the frame never left.
//!
//! [`Prepared`] is independent of any link, so one prepared set can go to
//! many peers (a broadcast): a fresh region's descriptor is passed to each,
//! a pool slot is held by each peer's seat. [`Prepared::describe`] makes one
//! link's descriptors; [`Holds::commit`] or [`Holds::cancel`] ends that
//! link's share once the write succeeded or failed before its first byte.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use bytemuck::Zeroable;

use crate::buffer::{BufView, Forward, Outgoing, SharedBuf};
use crate::codec::{AttachmentDesc, Limits, attach};
use crate::send_error::SendError;
use crate::shm::{PoolLease, PoolShared, Ticket};
use crate::tensor::Attachment;
use crate::transport::OutRegion;
use crate::{Error, Result};

/// What a link needs to know of its peer to describe a pool slot.
pub(crate) trait PoolPeer {
    /// Whether attachments reach this peer as bytes in the stream (TCP)
    /// rather than as descriptors.
    fn streams(&self) -> bool;
    /// The peer's id (its seat's owner).
    fn peer_id(&self) -> u64;
    /// Whether the peer surely has `pool` mapped (no descriptor needed).
    fn pool_known(&mut self, pool: &PoolShared) -> bool;
}

/// Every attachment of one send, ready to go to one or more peers.
#[derive(Default)]
pub(crate) struct Prepared {
    items: Vec<Item>,
}

struct Item {
    dtype: u32,
    shape: Vec<usize>,
    region: Region,
}

enum Region {
    /// A fresh region of ours, sealed against every write: nobody maps it
    /// writable any more.
    Fresh { fd: OwnedFd, len: usize },
    /// A slot of one of our pools.
    Slot { lease: PoolLease, len: usize },
    /// A view received from another process, passed on.
    View(BufView),
}

impl Prepared {
    /// Seals and takes over `attachments`; on failure, hands every one back.
    pub(crate) fn new(attachments: Vec<Attachment>) -> Result<Prepared, SendError> {
        let mut prepared = Prepared {
            items: Vec::with_capacity(attachments.len()),
        };
        let mut rest = attachments.into_iter();
        while let Some(att) = rest.next() {
            if let Err((error, att)) = prepared.push(att) {
                let mut back = prepared.hand_back();
                back.push(att);
                back.extend(rest);
                return Err(SendError {
                    error,
                    attachments: back,
                });
            }
        }
        Ok(prepared)
    }

    // The error hands the attachment back whole, moved, not boxed: a
    // refusal costs no allocation.
    #[allow(clippy::result_large_err)]
    fn push(&mut self, att: Attachment) -> Result<(), (Error, Attachment)> {
        let (dtype, shape) = att.meta();
        let shape = shape.to_vec();
        let region = match att {
            Attachment::Buf(buf) => own(buf, (dtype, &shape))?,
            Attachment::Tensor(t) => own(t.into_buf(), (dtype, &shape))?,
            Attachment::View(view) => Region::View(view),
            Attachment::TensorView(t) => Region::View(t.into_buf()),
        };
        self.items.push(Item {
            dtype,
            shape,
            region,
        });
        Ok(())
    }

    /// Whether these attachments may go to more than one peer: a
    /// forwarded pool slot is held through one seat, so it may not.
    pub(crate) fn check_broadcast(&self) -> Result<()> {
        let single = self.items.iter().any(|item| match &item.region {
            Region::View(view) => matches!(view.forward(), Ok(Forward::Pooled { .. })),
            _ => false,
        });
        if single {
            return Err(Error::View(
                "a forwarded pool slot can be passed on to one worker only".into(),
            ));
        }
        Ok(())
    }

    /// Every attachment, back in the form the caller attached it, except
    /// that a fresh region sealed for the send comes back as a read-only
    /// view of itself.
    pub(crate) fn hand_back(self) -> Vec<Attachment> {
        self.items
            .into_iter()
            .filter_map(|item| {
                let meta = (item.dtype, item.shape);
                match item.region {
                    // Sealed, it can no longer be written: it comes back as a
                    // read-only view of the same pages, which can be sent
                    // again as it is.
                    Region::Fresh { fd, len } => match BufView::from_memfd(fd, len, true, u64::MAX)
                    {
                        Ok(view) => Some(Attachment::rebuild_view(meta, view)),
                        Err(_) => None, // Mapping failed: out of memory.
                    },
                    Region::Slot { lease, len } => Some(Attachment::rebuild_own(
                        meta,
                        SharedBuf::from_lease(lease, len),
                    )),
                    Region::View(view) => Some(Attachment::rebuild_view(meta, view)),
                }
            })
            .collect()
    }

    /// Every peer has its share: views passed on to descriptor-passing
    /// peers are theirs to give back now, so they go without releasing;
    /// over a stream (`streamed`) their bytes were copied out, and they are
    /// simply dropped.
    pub(crate) fn finish(self, streamed: bool) {
        if streamed {
            return;
        }
        for item in self.items {
            if let Region::View(view) = item.region {
                view.forwarded();
            }
        }
    }

    /// Readies views that landed from a stream to go on to a peer that
    /// takes descriptors: each is sealed as a fresh region
    /// ([`BufView::seal_landed`]).
    pub(crate) fn seal_landed(&mut self) -> Result<()> {
        for item in &mut self.items {
            if let Region::View(view) = &mut item.region {
                view.seal_landed()?;
            }
        }
        Ok(())
    }

    /// Over a stream, every attachment is its bytes: no pool, no
    /// descriptor, nothing held once the frame is written.
    fn describe_streamed(&self, limits: &Limits) -> Result<(Vec<AttachmentDesc>, Holds)> {
        let mut descs = Vec::with_capacity(self.items.len());
        for item in &self.items {
            let len = match &item.region {
                Region::Fresh { len, .. } | Region::Slot { len, .. } => *len,
                Region::View(view) => view.len(),
            } as u64;
            if len > limits.max_region_bytes {
                let max = limits.max_region_bytes;
                return Err(Error::RegionTooLarge { len, max });
            }
            let mut desc = AttachmentDesc::zeroed();
            desc.set_tensor(item.dtype, &item.shape);
            desc.kind = attach::STREAM;
            desc.len_bytes = len;
            descs.push(desc);
        }
        let holds = Holds {
            items: self.items.iter().map(|_| None).collect(),
            new_pools: Vec::new(),
            streamed: true,
        };
        Ok((descs, holds))
    }

    /// This set's attachment descriptors for one link, and the holds
    /// they take for its peer (undone if describing fails half-way). What
    /// the peer's `limits` would refuse is refused here, before anything
    /// is held: a region too large, or more descriptors than a frame may
    /// carry; and, for a descriptor-passing peer, a view that cannot be
    /// forwarded.
    pub(crate) fn describe(
        &self,
        link: &mut dyn PoolPeer,
        limits: &Limits,
    ) -> Result<(Vec<AttachmentDesc>, Holds)> {
        if link.streams() {
            return self.describe_streamed(limits);
        }
        for item in &self.items {
            if let Region::View(view) = &item.region {
                view.forward()?;
            }
        }
        self.check_regions(limits)?;
        let mut descs = Vec::with_capacity(self.items.len());
        let mut holds = Holds::default();
        for item in &self.items {
            let mut desc = AttachmentDesc::zeroed();
            desc.set_tensor(item.dtype, &item.shape);
            let hold = match &item.region {
                Region::Fresh { len, .. } => {
                    desc.kind = attach::MEMFD;
                    desc.len_bytes = *len as u64;
                    Ok(None)
                }
                Region::Slot { lease, len } => {
                    slot_hold(&mut desc, lease, *len, link, &holds).map(Some)
                }
                Region::View(view) => describe_view(&mut desc, view).map(|()| None),
            };
            match hold {
                Ok(hold) => holds.items.push(hold),
                Err(err) => {
                    holds.cancel(self);
                    return Err(err);
                }
            }
            descs.push(desc);
        }
        let fds: usize = self.regions(&holds).iter().map(OutRegion::fd_count).sum();
        if fds > limits.max_attachments as usize {
            holds.cancel(self);
            return Err(Error::Encode(format!(
                "the attachments need {fds} descriptors, more than the limit of {} per message; send fewer at a time",
                limits.max_attachments
            )));
        }
        holds.new_pools = holds
            .items
            .iter()
            .zip(&self.items)
            .filter_map(|(hold, item)| match (hold, &item.region) {
                (Some(h), Region::Slot { lease, .. }) if h.announce => Some(lease.pool().clone()),
                _ => None,
            })
            .collect();
        Ok((descs, holds))
    }

    /// Refuses a region larger than the peer maps.
    fn check_regions(&self, limits: &Limits) -> Result<()> {
        let max = limits.max_region_bytes;
        for item in &self.items {
            let len = match &item.region {
                Region::Fresh { len, .. } => *len as u64,
                Region::Slot { lease, .. } => lease.pool().region_len(),
                Region::View(view) => view.len() as u64,
            };
            if len > max {
                return Err(Error::RegionTooLarge { len, max });
            }
        }
        Ok(())
    }

    /// The regions a transport passes for one link, as `holds` says.
    pub(crate) fn regions<'a>(&'a self, holds: &'a Holds) -> Vec<OutRegion<'a>> {
        self.items
            .iter()
            .zip(&holds.items)
            .map(|(item, hold)| match (&item.region, hold) {
                (Region::View(view), _) if holds.streamed => OutRegion {
                    fd: None,
                    ticket: None,
                    bytes: view.as_bytes(),
                },
                (Region::Fresh { fd, .. }, _) => OutRegion {
                    fd: Some(fd.as_fd()),
                    ticket: None,
                    bytes: &[], // A streaming transport maps it from `fd`.
                },
                (Region::Slot { lease, len }, hold) => {
                    let announce = hold.as_ref().filter(|h| h.announce);
                    OutRegion {
                        fd: announce.map(|_| lease.pool().fd()),
                        ticket: announce.map(|h| h.ticket.fd()),
                        // SAFETY: the lease keeps `len` <= slot_len bytes
                        // of the pool's data mapping alive and unwritten
                        // while the frame is out (the owner holds it).
                        bytes: unsafe { std::slice::from_raw_parts(lease.data_ptr(), *len) },
                    }
                }
                (Region::View(view), _) => view_region(view),
            })
            .collect()
    }
}

// The error hands the attachment back whole, moved, not boxed: a
// refusal costs no allocation.
#[allow(clippy::result_large_err)]
fn own(mut buf: SharedBuf, meta: (u32, &[usize])) -> Result<Region, (Error, Attachment)> {
    let len = buf.len();
    if let Err(error) = buf.seal_for_send() {
        // A failed seal leaves the buffer as it was: hand it back whole.
        return Err((
            error,
            Attachment::rebuild_own((meta.0, meta.1.to_vec()), buf),
        ));
    }
    Ok(match buf.into_outgoing() {
        Outgoing::Memfd(fd) => Region::Fresh { fd, len },
        Outgoing::Pooled(lease) => Region::Slot { lease, len },
    })
}

fn describe_view(desc: &mut AttachmentDesc, view: &BufView) -> Result<()> {
    desc.len_bytes = view.len() as u64;
    match view.forward()? {
        Forward::Memfd(_) => desc.kind = attach::MEMFD,
        Forward::Pooled { pool, slot, seat } => {
            // The next holder releases through our ticket, and always gets
            // the pool's descriptors: we cannot see whether it has the
            // pool mapped.
            desc.kind = attach::POOLED;
            desc.flags = attach::POOL_FD;
            desc.pool_id = pool.id();
            desc.slot = slot;
            desc.seat = seat;
        }
    }
    Ok(())
}

fn view_region(view: &BufView) -> OutRegion<'_> {
    let (fd, ticket) = match view.forward() {
        Ok(Forward::Memfd(fd)) => (Some(fd), None),
        Ok(Forward::Pooled { pool, .. }) => (Some(pool.fd()), Some(pool.ticket_fd())),
        Err(_) => unreachable!("a view that cannot be forwarded is refused when described"),
    };
    OutRegion {
        fd,
        ticket,
        bytes: view.as_bytes(),
    }
}

/// Describes a slot for one link: the peer's seat and ticket, the hold
/// raised in it, and whether the pool's descriptors must go along.
fn slot_hold(
    desc: &mut AttachmentDesc,
    lease: &PoolLease,
    len: usize,
    link: &mut dyn PoolPeer,
    earlier: &Holds,
) -> Result<SlotHold> {
    let pool = lease.pool();
    let (seat, ticket) = pool.seat_of(link.peer_id())?;
    desc.kind = attach::POOLED;
    desc.len_bytes = len as u64;
    desc.pool_id = pool.id();
    desc.slot = lease.slot();
    desc.seat = seat;
    let announced_here = earlier
        .items
        .iter()
        .flatten()
        .any(|h| h.announce && h.pool_id == pool.id());
    let announce = !link.pool_known(pool) && !announced_here;
    if announce {
        desc.flags |= attach::POOL_FD;
    }
    lease.prepare_send(&ticket);
    Ok(SlotHold {
        seat,
        ticket,
        announce,
        pool_id: pool.id(),
    })
}

/// The holds one link's frame takes for its peer, and the pools it
/// announces.
#[derive(Default)]
pub(crate) struct Holds {
    /// Per item, in order: the hold of a pool slot, `None` otherwise.
    items: Vec<Option<SlotHold>>,
    new_pools: Vec<Arc<PoolShared>>,
    /// Described for a stream: regions are their bytes alone.
    streamed: bool,
}

struct SlotHold {
    seat: u32,
    ticket: Arc<Ticket>,
    /// The pool's region and this ticket go with the frame.
    announce: bool,
    pool_id: u64,
}

impl Holds {
    /// The frame reached the peer: its seats hold their slots. Returns the
    /// pools it announced.
    pub(crate) fn commit(self, prepared: &mut Prepared) -> Vec<Arc<PoolShared>> {
        for (item, hold) in prepared.items.iter_mut().zip(self.items) {
            if let (Region::Slot { lease, .. }, Some(hold)) = (&mut item.region, hold) {
                lease.commit_send(hold.seat);
            }
        }
        self.new_pools
    }

    /// The frame never left: the holds are lowered again.
    pub(crate) fn cancel(self, prepared: &Prepared) {
        for (item, hold) in prepared.items.iter().zip(self.items) {
            if let (Region::Slot { lease, .. }, Some(hold)) = (&item.region, hold) {
                lease.cancel_send(&hold.ticket);
            }
        }
    }
}
