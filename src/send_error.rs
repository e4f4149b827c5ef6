//! The error of a send with attachments, which hands back what it could
//! not send.

use crate::error::Error;
use crate::tensor::Attachment;

/// A send with attachments that failed: the error, and every attachment
/// that did not leave, handed back to the caller (nothing is lost).
///
/// Converts into [`Error`], so `?` works in functions returning
/// [`Result`].
///
/// # Examples
///
/// ```
/// use std::time::Duration;
/// use miniray::{SharedBuf, Worker};
///
/// let mut w = Worker::spawn(|h| h.recv::<()>())?; // never reads attachments
/// w.send(&())?;
/// w.wait_timeout(Duration::from_secs(10))?;
/// let buf = SharedBuf::from_slice(&[7u8; 16])?;
/// let err = w.send_attached(&(), vec![buf.into()]).unwrap_err();
/// assert!(matches!(err.error, miniray::Error::WorkerDied { .. }));
/// assert_eq!(err.attachments.len(), 1); // the buffer came back
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct SendError {
    /// Why the send failed.
    #[source]
    pub error: Error,
    /// The attachments that were not sent, in their order; empty if the
    /// frame had started to leave (its descriptors went with its first
    /// byte).
    pub attachments: Vec<Attachment>,
}

impl From<SendError> for Error {
    fn from(err: SendError) -> Error {
        err.error
    }
}
