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
use crate::codec::{AttachmentDesc, attach};
use crate::send_error::SendError;
use crate::shm::{PoolLease, PoolShared};
use crate::sys::Mapping;
use crate::tensor::Attachment;
use crate::transport::OutRegion;
use crate::{Error, Result};

/// What a link needs to know of its peer to describe a pool slot.
pub(crate) trait PoolPeer {
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
    /// A fresh region of ours, sealed; its writable mapping is dropped
    /// once the frame is out.
    Fresh {
        fd: OwnedFd,
        map: Option<Mapping>,
        len: usize,
    },
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

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    fn push(&mut self, att: Attachment) -> Result<(), (Error, Attachment)> {
        let (dtype, shape) = att.meta();
        let shape = shape.to_vec();
        let region = match att {
            Attachment::Buf(buf) => own(buf, (dtype, &shape))?,
            Attachment::Tensor(t) => own(t.into_buf(), (dtype, &shape))?,
            Attachment::View(view) => Region::View(view),
            Attachment::TensorView(t) => Region::View(t.into_buf()),
        };
        if let Region::View(view) = &region
            && let Err(error) = view.forward()
        {
            let Region::View(view) = region else {
                unreachable!()
            };
            return Err((error, Attachment::rebuild_view((dtype, shape), view)));
        }
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

    /// Every attachment, back in the form the caller attached it.
    pub(crate) fn hand_back(self) -> Vec<Attachment> {
        self.items
            .into_iter()
            .map(|item| {
                let meta = (item.dtype, item.shape);
                match item.region {
                    Region::Fresh { fd, map, len } => {
                        let out = Outgoing::Memfd { fd, map, len };
                        Attachment::rebuild_own(meta, SharedBuf::from_outgoing(out))
                    }
                    Region::Slot { lease, len } => {
                        let out = Outgoing::Pooled { lease, len };
                        Attachment::rebuild_own(meta, SharedBuf::from_outgoing(out))
                    }
                    Region::View(view) => Attachment::rebuild_view(meta, view),
                }
            })
            .collect()
    }

    /// All peers have their share: drop the sender-side mappings of fresh
    /// regions, and let forwarded views go without releasing (their new
    /// holder gives them back).
    pub(crate) fn finish(self) {
        for item in self.items {
            if let Region::View(view) = item.region {
                view.forwarded();
            }
        }
    }

    /// This set's descriptors and regions for one link.
    pub(crate) fn describe(&self, link: &mut dyn PoolPeer) -> Result<Described<'_>> {
        let mut out = Described {
            descs: Vec::with_capacity(self.items.len()),
            regions: Vec::with_capacity(self.items.len()),
            holds: Holds::default(),
        };
        if let Err(err) = self.describe_into(&mut out, link) {
            out.into_holds().cancel(self);
            return Err(err);
        }
        Ok(out)
    }

    fn describe_into<'a>(&'a self, out: &mut Described<'a>, link: &mut dyn PoolPeer) -> Result<()> {
        for (index, item) in self.items.iter().enumerate() {
            let mut desc = AttachmentDesc::zeroed();
            desc.set_tensor(item.dtype, &item.shape);
            let region = match &item.region {
                Region::Fresh { fd, map, len } => {
                    desc.kind = attach::MEMFD;
                    desc.len_bytes = *len as u64;
                    OutRegion {
                        fd: Some(fd.as_fd()),
                        bytes: map.as_ref().map_or(&[], |m| mapped(m, *len)),
                    }
                }
                Region::Slot { lease, len } => {
                    let fresh = out
                        .holds
                        .describe_slot(&mut desc, index, lease, *len, link)?;
                    OutRegion {
                        fd: fresh.then(|| lease.pool().fd()),
                        // SAFETY: the lease keeps `len` <= slot_len bytes
                        // of the pool's data mapping alive and unwritten
                        // while the frame is out (the owner holds it).
                        bytes: unsafe { std::slice::from_raw_parts(lease.data_ptr(), *len) },
                    }
                }
                Region::View(view) => describe_view(&mut desc, view)?,
            };
            out.descs.push(desc);
            out.regions.push(region);
        }
        Ok(())
    }
}

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
        Outgoing::Memfd { fd, map, .. } => Region::Fresh { fd, map, len },
        Outgoing::Pooled { lease, .. } => Region::Slot { lease, len },
    })
}

fn mapped(map: &Mapping, len: usize) -> &[u8] {
    debug_assert!(len <= map.len());
    // SAFETY: the mapping is live for the borrow of `map` and at least
    // `len` bytes long; the region is sealed, so no one writes it.
    unsafe { std::slice::from_raw_parts(map.as_ptr(), len) }
}

fn describe_view<'a>(desc: &mut AttachmentDesc, view: &'a BufView) -> Result<OutRegion<'a>> {
    desc.len_bytes = view.len() as u64;
    let fd = match view.forward()? {
        Forward::Memfd(fd) => {
            desc.kind = attach::MEMFD;
            fd
        }
        Forward::Pooled { pool, slot, seat } => {
            // The next holder releases through the seat we were given, and
            // always gets the pool's descriptor: we cannot see whether it
            // has the pool mapped.
            desc.kind = attach::POOLED;
            desc.flags = attach::POOL_FD;
            desc.pool_id = pool.id();
            desc.slot = slot;
            desc.seat = seat;
            pool.fd()
        }
    };
    Ok(OutRegion {
        fd: Some(fd),
        bytes: view.as_bytes(),
    })
}

/// One link's share of a [`Prepared`] set.
pub(crate) struct Described<'a> {
    pub(crate) descs: Vec<AttachmentDesc>,
    pub(crate) regions: Vec<OutRegion<'a>>,
    holds: Holds,
}

impl Described<'_> {
    /// What must be committed or cancelled once the write is over.
    pub(crate) fn into_holds(self) -> Holds {
        self.holds
    }
}

/// The pool slots one link's frame holds for its peer, and the pools it
/// announces.
#[derive(Default)]
pub(crate) struct Holds {
    /// (item index, seat) of every pool slot held for this peer.
    holds: Vec<(usize, u32)>,
    new_pools: Vec<Arc<PoolShared>>,
}

impl Holds {
    /// Describes a slot; true if the pool's descriptor must go along.
    fn describe_slot(
        &mut self,
        desc: &mut AttachmentDesc,
        index: usize,
        lease: &PoolLease,
        len: usize,
        link: &mut dyn PoolPeer,
    ) -> Result<bool> {
        let pool = lease.pool();
        let seat = pool.seat_of(link.peer_id())?;
        desc.kind = attach::POOLED;
        desc.len_bytes = len as u64;
        desc.pool_id = pool.id();
        desc.slot = lease.slot();
        desc.seat = seat;
        let fresh = !link.pool_known(pool) && !self.new_pools.iter().any(|p| p.id() == pool.id());
        if fresh {
            desc.flags |= attach::POOL_FD;
            self.new_pools.push(pool.clone());
        }
        lease.prepare_send(seat);
        self.holds.push((index, seat));
        Ok(fresh)
    }

    /// The frame reached the peer: its seats hold their slots. Returns the
    /// pools it announced.
    pub(crate) fn commit(self, prepared: &mut Prepared) -> Vec<Arc<PoolShared>> {
        for (index, seat) in self.holds {
            if let Region::Slot { lease, .. } = &mut prepared.items[index].region {
                lease.commit_send(seat);
            }
        }
        self.new_pools
    }

    /// The frame never left: the seats' holds are lowered again.
    pub(crate) fn cancel(self, prepared: &Prepared) {
        for (index, seat) in self.holds {
            if let Region::Slot { lease, .. } = &prepared.items[index].region {
                lease.cancel_send(seat);
            }
        }
    }
}
