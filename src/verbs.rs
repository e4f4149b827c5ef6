//! The verbs of both endpoints, written once: [`Worker`](crate::Worker)
//! (the parent's side) and [`Handle`](crate::Handle) (the worker's side)
//! each hold a [`Sender`](crate::Sender) and a [`Receiver`](crate::Receiver)
//! in fields `tx` and `rx`, and this macro gives both the same methods,
//! forwarding to the halves.

macro_rules! verbs {
    () => {
        /// Sends `msg` to the other side, waiting for room as long as the
        /// other side lives.
        ///
        /// # Errors
        /// As [`Sender::send`](crate::Sender::send).
        ///
        /// # Examples
        ///
        /// ```
        /// let mut w = miniray::Worker::spawn(|h| {
        ///     let x: u32 = h.recv()?;
        ///     h.send(&(x + 1))
        /// })?;
        /// w.send(&1u32)?;
        /// assert_eq!(w.recv::<u32>()?, 2);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn send<T: $crate::Message>(&mut self, msg: &T) -> $crate::Result<()> {
            self.tx.send(msg)
        }

        /// Sends `msg` only if it can start without waiting.
        ///
        /// # Errors
        /// [`Error::Full`](crate::Error::Full) if the connection has no
        /// room; as [`Sender::try_send`](crate::Sender::try_send).
        ///
        /// # Examples
        ///
        /// ```
        /// let mut w = miniray::Worker::spawn(|h| h.try_send(&3u8))?;
        /// assert_eq!(w.recv::<u8>()?, 3);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn try_send<T: $crate::Message>(&mut self, msg: &T) -> $crate::Result<()> {
            self.tx.try_send(msg)
        }

        /// Sends `msg`, waiting at most `timeout` for room.
        ///
        /// # Errors
        /// [`Error::Timeout`](crate::Error::Timeout); as
        /// [`Sender::send_timeout`](crate::Sender::send_timeout).
        ///
        /// # Examples
        ///
        /// ```
        /// use std::time::Duration;
        /// let mut w = miniray::Worker::spawn(|h| h.send_timeout(&3u8, Duration::from_secs(5)))?;
        /// assert_eq!(w.recv::<u8>()?, 3);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn send_timeout<T: $crate::Message>(
            &mut self,
            msg: &T,
            timeout: std::time::Duration,
        ) -> $crate::Result<()> {
            self.tx.send_timeout(msg, timeout)
        }

        /// Sends `msg`, waiting until `deadline` at the latest for room.
        ///
        /// # Errors
        /// As [`Sender::send_deadline`](crate::Sender::send_deadline).
        ///
        /// # Examples
        ///
        /// ```
        /// use std::time::{Duration, Instant};
        /// let mut w = miniray::Worker::spawn(|h| {
        ///     h.send_deadline(&3u8, Instant::now() + Duration::from_secs(5))
        /// })?;
        /// assert_eq!(w.recv::<u8>()?, 3);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn send_deadline<T: $crate::Message>(
            &mut self,
            msg: &T,
            deadline: std::time::Instant,
        ) -> $crate::Result<()> {
            self.tx.send_deadline(msg, deadline)
        }

        /// Sends `msg` with buffers, tensors or forwarded views attached;
        /// they move to the other side, which maps the same pages.
        ///
        /// # Errors
        /// A [`SendError`](crate::SendError) with the reason and every
        /// attachment that did not leave; see
        /// [`Sender::send_attached`](crate::Sender::send_attached).
        ///
        /// # Examples
        ///
        /// ```
        /// use miniray::Tensor;
        /// let mut w = miniray::Worker::spawn(|h| {
        ///     let ((), mut parts) = h.recv_attached::<()>()?;
        ///     let t = parts.remove(0).into_tensor()?;
        ///     h.send(&t.as_slice::<f32>()?.iter().sum::<f32>())
        /// })?;
        /// w.send_attached(&(), vec![Tensor::from_slice(&[1.0f32, 2.0], &[2])?.into()])?;
        /// assert_eq!(w.recv::<f32>()?, 3.0);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn send_attached<T: $crate::Message>(
            &mut self,
            msg: &T,
            attachments: Vec<$crate::Attachment>,
        ) -> std::result::Result<(), $crate::SendError> {
            self.tx.send_attached(msg, attachments)
        }

        /// As `send_attached`, only if the frame can start without waiting.
        ///
        /// # Errors
        /// As [`Sender::try_send_attached`](crate::Sender::try_send_attached).
        ///
        /// # Examples
        ///
        /// ```
        /// let mut w = miniray::Worker::spawn(|h| h.recv_attached::<()>().map(drop))?;
        /// w.try_send_attached(&(), vec![miniray::SharedBuf::new(8)?.into()])?;
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn try_send_attached<T: $crate::Message>(
            &mut self,
            msg: &T,
            attachments: Vec<$crate::Attachment>,
        ) -> std::result::Result<(), $crate::SendError> {
            self.tx.try_send_attached(msg, attachments)
        }

        /// As `send_attached`, waiting at most `timeout` for room.
        ///
        /// # Errors
        /// As [`Sender::send_attached_timeout`](crate::Sender::send_attached_timeout).
        ///
        /// # Examples
        ///
        /// ```
        /// use std::time::Duration;
        /// let mut w = miniray::Worker::spawn(|h| h.recv_attached::<()>().map(drop))?;
        /// let buf = miniray::SharedBuf::new(8)?;
        /// w.send_attached_timeout(&(), vec![buf.into()], Duration::from_secs(5))?;
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn send_attached_timeout<T: $crate::Message>(
            &mut self,
            msg: &T,
            attachments: Vec<$crate::Attachment>,
            timeout: std::time::Duration,
        ) -> std::result::Result<(), $crate::SendError> {
            self.tx.send_attached_timeout(msg, attachments, timeout)
        }

        /// As `send_attached`, waiting until `deadline` at the latest.
        ///
        /// # Errors
        /// As [`Sender::send_attached_deadline`](crate::Sender::send_attached_deadline).
        ///
        /// # Examples
        ///
        /// ```
        /// use std::time::{Duration, Instant};
        /// let mut w = miniray::Worker::spawn(|h| h.recv_attached::<()>().map(drop))?;
        /// let buf = miniray::SharedBuf::new(8)?;
        /// w.send_attached_deadline(&(), vec![buf.into()], Instant::now() + Duration::from_secs(5))?;
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn send_attached_deadline<T: $crate::Message>(
            &mut self,
            msg: &T,
            attachments: Vec<$crate::Attachment>,
            deadline: std::time::Instant,
        ) -> std::result::Result<(), $crate::SendError> {
            self.tx.send_attached_deadline(msg, attachments, deadline)
        }

        /// Closes the sending direction: the other side's receives return
        /// [`Error::Disconnected`](crate::Error::Disconnected) after what
        /// was sent before. Receiving still works.
        ///
        /// # Errors
        /// As [`Sender::close`](crate::Sender::close).
        ///
        /// # Examples
        ///
        /// ```
        /// let mut w = miniray::Worker::spawn(|h| {
        ///     h.close()?;
        ///     h.recv::<()>()
        /// })?;
        /// assert!(matches!(w.recv::<u8>(), Err(miniray::Error::Disconnected)));
        /// w.send(&())?;
        /// assert!(w.wait()?.success());
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn close(&mut self) -> $crate::Result<()> {
            self.tx.close()
        }

        /// Waits for the next message.
        ///
        /// # Errors
        /// As [`Receiver::recv`](crate::Receiver::recv).
        ///
        /// # Examples
        ///
        /// ```
        /// let mut w = miniray::Worker::spawn(|h| h.send(&vec![1u16, 2]))?;
        /// assert_eq!(w.recv::<Vec<u16>>()?, [1, 2]);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn recv<T: $crate::Message>(&mut self) -> $crate::Result<T> {
            self.rx.recv()
        }

        /// Returns a message if a whole one has arrived, without waiting.
        ///
        /// # Errors
        /// As [`Receiver::try_recv`](crate::Receiver::try_recv).
        ///
        /// # Examples
        ///
        /// ```
        /// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
        /// assert_eq!(w.try_recv::<u8>()?, None);
        /// w.send(&())?;
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn try_recv<T: $crate::Message>(&mut self) -> $crate::Result<Option<T>> {
            self.rx.try_recv()
        }

        /// Waits at most `timeout` for the next message.
        ///
        /// # Errors
        /// As [`Receiver::recv_timeout`](crate::Receiver::recv_timeout).
        ///
        /// # Examples
        ///
        /// ```
        /// use std::time::Duration;
        /// let mut w = miniray::Worker::spawn(|h| h.send(&1u8))?;
        /// assert_eq!(w.recv_timeout::<u8>(Duration::from_secs(10))?, 1);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn recv_timeout<T: $crate::Message>(
            &mut self,
            timeout: std::time::Duration,
        ) -> $crate::Result<T> {
            self.rx.recv_timeout(timeout)
        }

        /// Waits until `deadline` at the latest for the next message.
        ///
        /// # Errors
        /// As [`Receiver::recv_deadline`](crate::Receiver::recv_deadline).
        ///
        /// # Examples
        ///
        /// ```
        /// use std::time::{Duration, Instant};
        /// let mut w = miniray::Worker::spawn(|h| h.send(&1u8))?;
        /// assert_eq!(w.recv_deadline::<u8>(Instant::now() + Duration::from_secs(10))?, 1);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn recv_deadline<T: $crate::Message>(
            &mut self,
            deadline: std::time::Instant,
        ) -> $crate::Result<T> {
            self.rx.recv_deadline(deadline)
        }

        /// Waits for the next message and its attachments.
        ///
        /// # Errors
        /// As [`Receiver::recv_attached`](crate::Receiver::recv_attached).
        ///
        /// # Examples
        ///
        /// ```
        /// let mut w = miniray::Worker::spawn(|h| {
        ///     let buf = miniray::SharedBuf::from_slice(&[1u32, 2])?;
        ///     h.send_attached(&"b".to_string(), vec![buf.into()]).map_err(Into::into)
        /// })?;
        /// let (name, parts) = w.recv_attached::<String>()?;
        /// assert_eq!((name.as_str(), parts[0].as_bytes().len()), ("b", 8));
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn recv_attached<T: $crate::Message>(
            &mut self,
        ) -> $crate::Result<(T, Vec<$crate::Received>)> {
            self.rx.recv_attached()
        }

        /// As `recv_attached`, without waiting.
        ///
        /// # Errors
        /// As [`Receiver::try_recv_attached`](crate::Receiver::try_recv_attached).
        ///
        /// # Examples
        ///
        /// ```
        /// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
        /// assert!(w.try_recv_attached::<u8>()?.is_none());
        /// w.send(&())?;
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn try_recv_attached<T: $crate::Message>(
            &mut self,
        ) -> $crate::Result<Option<(T, Vec<$crate::Received>)>> {
            self.rx.try_recv_attached()
        }

        /// As `recv_attached`, giving up after `timeout`.
        ///
        /// # Errors
        /// As [`Receiver::recv_attached_timeout`](crate::Receiver::recv_attached_timeout).
        ///
        /// # Examples
        ///
        /// ```
        /// use std::time::Duration;
        /// let mut w = miniray::Worker::spawn(|h| h.send(&1u8))?;
        /// assert_eq!(w.recv_attached_timeout::<u8>(Duration::from_secs(10))?.0, 1);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn recv_attached_timeout<T: $crate::Message>(
            &mut self,
            timeout: std::time::Duration,
        ) -> $crate::Result<(T, Vec<$crate::Received>)> {
            self.rx.recv_attached_timeout(timeout)
        }

        /// As `recv_attached`, giving up at `deadline`.
        ///
        /// # Errors
        /// As [`Receiver::recv_attached_deadline`](crate::Receiver::recv_attached_deadline).
        ///
        /// # Examples
        ///
        /// ```
        /// use std::time::{Duration, Instant};
        /// let mut w = miniray::Worker::spawn(|h| h.send(&1u8))?;
        /// let deadline = Instant::now() + Duration::from_secs(10);
        /// assert_eq!(w.recv_attached_deadline::<u8>(deadline)?.0, 1);
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn recv_attached_deadline<T: $crate::Message>(
            &mut self,
            deadline: std::time::Instant,
        ) -> $crate::Result<(T, Vec<$crate::Received>)> {
            self.rx.recv_attached_deadline(deadline)
        }

        /// Whether views of fresh regions received from now on keep their
        /// descriptor so they can be forwarded; see
        /// [`Receiver::set_forwarding`](crate::Receiver::set_forwarding).
        ///
        /// # Examples
        ///
        /// ```
        /// let mut w = miniray::Worker::spawn(|h| h.recv::<()>())?;
        /// w.set_forwarding(true);
        /// w.send(&())?;
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn set_forwarding(&mut self, keep_fds: bool) {
            self.rx.set_forwarding(keep_fds)
        }

        /// The sending and receiving halves, to use from two threads at
        /// once (each is `Send`).
        ///
        /// # Examples
        ///
        /// ```
        /// use std::time::Duration;
        /// let mut w = miniray::Worker::spawn(|h| {
        ///     for _ in 0..3 {
        ///         let x: u32 = h.recv()?;
        ///         h.send(&(x * 10))?;
        ///     }
        ///     Ok(())
        /// })?;
        /// let (tx, rx) = w.split();
        /// std::thread::scope(|s| {
        ///     s.spawn(move || (0..3u32).try_for_each(|x| tx.send(&x)));
        ///     for x in 0..3u32 {
        ///         assert_eq!(rx.recv_timeout::<u32>(Duration::from_secs(10)).unwrap(), x * 10);
        ///     }
        /// });
        /// w.wait()?;
        /// # Ok::<(), miniray::Error>(())
        /// ```
        pub fn split(&mut self) -> (&mut $crate::Sender, &mut $crate::Receiver) {
            (&mut self.tx, &mut self.rx)
        }
    };
}

pub(crate) use verbs;
