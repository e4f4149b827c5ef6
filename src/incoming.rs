//! Attachments on their way in: descriptors and regions turned into views.

use std::os::fd::OwnedFd;

use crate::buffer::BufView;
use crate::codec::{AttachmentDesc, DESC_LEN, attach};
use crate::landing::Landing;
use crate::shm::{MAX_POOL_SEATS, ReceivedPools};
use crate::tensor::{DType, Received, TensorView};
use crate::{Error, Result};

/// Decodes every attachment it can, and reports the first failure. It goes
/// on past a failure so that each pool slot the frame names is still taken,
/// and so given back when the caller drops the result: a bad attachment
/// never strands the good ones' slots in the sender's pool.
pub(crate) fn decode_attachments(
    desc_bytes: &[u8],
    (fds, landed): (Vec<OwnedFd>, Vec<Option<Landing>>),
    pools: &mut ReceivedPools,
    keep_fds: bool,
    max_region_bytes: u64,
) -> (Vec<Received>, Option<Error>) {
    let mut fds = fds.into_iter();
    let mut landed = landed.into_iter();
    let mut out = Vec::with_capacity(desc_bytes.len() / DESC_LEN);
    let mut failed = None;
    for chunk in desc_bytes.chunks_exact(DESC_LEN) {
        let desc: AttachmentDesc = bytemuck::pod_read_unaligned(chunk);
        let decoded = match desc.kind {
            // The transport checked the kind, lengths and sum already.
            attach::STREAM => match landed.next() {
                Some(landing) => typed(&desc, BufView::landed(landing, desc.len_bytes as usize)),
                None => Err(Error::Protocol("attachment without its bytes".into())),
            },
            _ => decode_one(&desc, &mut fds, pools, (keep_fds, max_region_bytes)),
        };
        match decoded {
            Ok(received) => out.push(received),
            Err(err) => failed = failed.or(Some(err)),
        }
    }
    if fds.next().is_some() {
        failed = failed.or(Some(Error::Protocol(
            "more descriptors than attachments".into(),
        )));
    }
    (out, failed)
}

fn decode_one(
    desc: &AttachmentDesc,
    fds: &mut impl Iterator<Item = OwnedFd>,
    pools: &mut ReceivedPools,
    (keep_fds, max_region_bytes): (bool, u64),
) -> Result<Received> {
    let mut next_fd = || {
        fds.next()
            .ok_or_else(|| Error::Protocol("attachment without its descriptor".into()))
    };
    let checked = desc.check_reserved();
    let len = usize::try_from(desc.len_bytes)
        .map_err(|_| Error::Protocol("attachment length overflows".into()))?;
    let view = match desc.kind {
        attach::MEMFD => {
            let fd = next_fd()?;
            checked?;
            BufView::from_memfd(fd, len, keep_fds, max_region_bytes).map_err(peer_region)?
        }
        attach::POOLED => {
            let key = (desc.pool_id, desc.seat);
            let announced = match desc.flags & attach::POOL_FD {
                0 => Ok(()),
                // The pool's region, then this receiver's ticket for it.
                _ => next_fd()
                    .and_then(|fd| Ok((fd, next_fd()?)))
                    .and_then(|fds| {
                        pools
                            .register(key, fds, max_region_bytes)
                            .map_err(peer_region)
                    }),
            };
            // Looked up even if the announcement failed: an unknown pool's
            // slot is remembered, to be released once the pool is mapped.
            let pool = pools.get(desc.pool_id, desc.seat, desc.slot);
            announced?;
            let pool = pool?;
            if desc.slot >= pool.slots() || len > pool.slot_len() || desc.seat >= MAX_POOL_SEATS {
                return Err(Error::Protocol(format!(
                    "slot {} (seat {}) of {len} bytes is outside its pool",
                    desc.slot, desc.seat
                )));
            }
            let view = BufView::pooled(pool.clone(), desc.slot, desc.seat, len);
            checked?;
            view
        }
        other => return Err(Error::Protocol(format!("unknown attachment kind {other}"))),
    };
    typed(desc, view)
}

/// The view as the descriptor types it: plain bytes or a tensor.
fn typed(desc: &AttachmentDesc, view: BufView) -> Result<Received> {
    desc.check_reserved()?;
    match desc.dtype {
        // Plain bytes need no shape, but the rules for one hold on every
        // descriptor (at most 8 dimensions, zero past `ndim`).
        0 => desc.shape().map(|_| Received::Buf(view)),
        code => Ok(Received::Tensor(TensorView::new(
            DType::from_code(code)?,
            desc.shape()?,
            view,
        )?)),
    }
}

/// A region the peer sent that cannot be mapped as the protocol needs (a
/// pool's ticket opened read-only, or sealed against writes, when it is
/// mapped writable; a region larger than this process can map) is the
/// peer's fault, not a failure to create a buffer of our own. Running out
/// of descriptors stays what it is.
fn peer_region(err: Error) -> Error {
    match err {
        Error::Buffer(e) => Error::Protocol(format!("cannot map a region the peer sent ({e})")),
        other => other,
    }
}
