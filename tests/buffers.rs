//! Shared buffers and tensors between processes: contents, order, dtypes and
//! shapes survive the trip; regions that are not size-sealed or are not
//! memfds are refused without breaking the connection; the receiver's
//! mapping is read-only and the sender can neither resize nor write a region
//! it sent; running out of descriptors is an `FdLimit` error, not a crash.

mod util;

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use miniray::rkyv::{Archive, Deserialize, Serialize};
use miniray::{DType, Error, ExitStatus, Received, SharedBuf, Tensor, Worker};

/// 64 Mi `f32`s: 256 MiB, the size the design's hand-off figure is quoted at.
const BIG_SHAPE: [usize; 2] = [64, 1 << 20];

/// The big tensor repeats `f(0), f(1), ..` with this prime period: every
/// value (and `x * 2 + 1`) is an exact integer in `f32`, and no page- or
/// row-sized shift maps the pattern onto itself.
const PERIOD: usize = 1_000_003;

/// One period of the pattern `f(i)`.
fn period_of(f: impl Fn(f32) -> f32) -> Vec<f32> {
    (0..PERIOD).map(|i| f(i as f32)).collect()
}

/// Fills `xs` with repeats of `period`, a chunk at a time (memcpy: fast
/// even in a debug build).
fn fill_periodic(xs: &mut [f32], period: &[f32]) {
    for chunk in xs.chunks_mut(PERIOD) {
        chunk.copy_from_slice(&period[..chunk.len()]);
    }
}

/// How many chunks of `xs` differ from `period`, compared as bytes (memcmp:
/// fast even in a debug build; the values are exact, so bytes are the test).
fn wrong_chunks(xs: &[f32], period: &[f32]) -> u64 {
    xs.chunks(PERIOD)
        .filter(|c| {
            bytemuck::cast_slice::<f32, u8>(c)
                != bytemuck::cast_slice::<f32, u8>(&period[..c.len()])
        })
        .count() as u64
}

/// An attachment as a worker saw it, sent back for the parent to check.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
#[rkyv(crate = miniray::rkyv)]
struct Seen {
    /// `Debug` of the dtype, or `None` for plain bytes.
    dtype: Option<String>,
    shape: Vec<u64>,
    bytes: Vec<u8>,
}

impl Seen {
    fn of(received: Received) -> Seen {
        match received {
            Received::Tensor(t) => Seen {
                dtype: Some(format!("{:?}", t.dtype())),
                shape: t.shape().iter().map(|&d| d as u64).collect(),
                bytes: t.into_buf().as_bytes().to_vec(),
            },
            Received::Buf(b) => Seen {
                dtype: None,
                shape: Vec::new(),
                bytes: b.as_bytes().to_vec(),
            },
        }
    }

    fn tensor(dtype: DType, shape: &[u64], bytes: &[u8]) -> Seen {
        Seen {
            dtype: Some(format!("{dtype:?}")),
            shape: shape.to_vec(),
            bytes: bytes.to_vec(),
        }
    }

    fn plain(bytes: &[u8]) -> Seen {
        Seen {
            dtype: None,
            shape: Vec::new(),
            bytes: bytes.to_vec(),
        }
    }
}

/// A worker that answers every message with what its attachments held.
fn describing_worker() -> miniray::Result<Worker> {
    Worker::spawn(|h| {
        let ((), got) = h.recv_attached_timeout::<()>(util::STEP)?;
        let seen: Vec<Seen> = got.into_iter().map(Seen::of).collect();
        h.send(&seen)
    })
}

/// The `errno` of a failed libc call, or 0 if it succeeded.
fn errno_of(ret: libc::c_long) -> i32 {
    match ret {
        r if r < 0 => std::io::Error::last_os_error().raw_os_error().unwrap_or(-1),
        _ => 0,
    }
}

/// The lowest free descriptor number: the next one this process would get.
fn lowest_free_fd() -> RawFd {
    // A new descriptor always takes the lowest free number.
    let probe = std::fs::File::open("/dev/null").expect("open /dev/null");
    probe.as_raw_fd()
}

/// Sets the soft `RLIMIT_NOFILE` of this process, keeping the hard limit.
fn set_fd_limit(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is valid for the kernel to read and write.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = soft;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

fn fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is valid for the kernel to write.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
    lim.rlim_cur
}

/// Keeps a worker that is about to crash on purpose from writing a core.
fn no_core_dumps() {
    let zero = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `zero` is a valid rlimit for the kernel to read.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) };
}

/// The rkyv archive of `()`, the message of every hand-built frame here.
fn unit_payload() -> Vec<u8> {
    miniray::rkyv::to_bytes::<miniray::rkyv::rancor::Error>(&())
        .expect("archive ()")
        .to_vec()
}

/// Whether any descriptor of this process refers to `target`.
fn holds_fd_to(target: &str) -> bool {
    util::open_fds()
        .into_iter()
        .any(|fd| util::fd_target(fd).is_some_and(|t| t.starts_with(target)))
}

#[test]
fn tensor_of_256_mib_goes_there_and_back_intact() -> miniray::Result<()> {
    let _w = util::watchdog(
        "tensor_of_256_mib_goes_there_and_back_intact",
        Duration::from_secs(120),
    );
    let mut w = Worker::spawn(|h| {
        let ((), mut got) = h.recv_attached_timeout::<()>(util::STEP)?;
        let x = got.remove(0).into_tensor()?;
        let xs = x.as_slice::<f32>()?;
        let wrong = wrong_chunks(xs, &period_of(|i| i));
        let mut y = Tensor::zeros(DType::F32, x.shape())?;
        for (out, &v) in y.as_mut_slice::<f32>()?.iter_mut().zip(xs) {
            *out = v * 2.0 + 1.0;
        }
        let meta = (format!("{:?}", x.dtype()), x.shape().to_vec(), wrong);
        drop(x); // the input's pages go as soon as neither side maps them
        h.send_attached(&meta, vec![y.into()])?;
        Ok(())
    })?;

    let mut x = Tensor::zeros(DType::F32, &BIG_SHAPE)?;
    assert_eq!(x.numel() * 4, 256 << 20);
    fill_periodic(x.as_mut_slice::<f32>()?, &period_of(|i| i));
    w.send_attached(&(), vec![x.into()])?;

    let ((dtype, shape, wrong), mut got) =
        w.recv_attached_timeout::<(String, Vec<usize>, u64)>(util::STEP)?;
    assert_eq!(wrong, 0, "chunks of the tensor the worker saw wrong");
    assert_eq!((dtype.as_str(), shape.as_slice()), ("F32", &BIG_SHAPE[..]));
    assert_eq!(got.len(), 1);
    let y = got.remove(0).into_tensor()?;
    assert_eq!((y.dtype(), y.shape()), (DType::F32, &BIG_SHAPE[..]));
    let ys = y.as_slice::<f32>()?;
    assert_eq!(ys.len(), BIG_SHAPE[0] * BIG_SHAPE[1]);
    let wrong = wrong_chunks(ys, &period_of(|i| i * 2.0 + 1.0));
    assert_eq!(wrong, 0, "chunks of the answer that are not x * 2 + 1");
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn several_tensors_arrive_in_order_with_dtype_and_shape() -> miniray::Result<()> {
    let _w = util::watchdog(
        "several_tensors_arrive_in_order_with_dtype_and_shape",
        Duration::from_secs(120),
    );
    let floats = [0.5f32, -1.25, 3.0, f32::MAX, f32::MIN_POSITIVE, -0.0];
    let longs = [-1i64, 2, i64::MAX, i64::MIN];
    let bytes: Vec<u8> = (0..12).collect();
    let halves = [0x3f80u16, 0x4000, 0xc040, 0x7f80, 0x0001]; // bf16 bit patterns
    let mut bf16 = Tensor::zeros(DType::BF16, &[5, 1])?;
    bf16.as_mut_slice::<u16>()?.copy_from_slice(&halves);

    let mut w = describing_worker()?;
    let attachments = vec![
        Tensor::from_slice(&floats, &[2, 3])?.into(),
        Tensor::from_slice(&longs, &[4])?.into(),
        Tensor::from_slice(&bytes, &[3, 2, 2])?.into(),
        bf16.into(),
        Tensor::zeros(DType::F32, &[0, 3])?.into(),
    ];
    w.send_attached(&(), attachments)?;

    let seen: Vec<Seen> = w.recv_timeout(util::STEP)?;
    let expected = [
        Seen::tensor(DType::F32, &[2, 3], bytemuck::cast_slice(&floats)),
        Seen::tensor(DType::I64, &[4], bytemuck::cast_slice(&longs)),
        Seen::tensor(DType::U8, &[3, 2, 2], &bytes),
        Seen::tensor(DType::BF16, &[5, 1], bytemuck::cast_slice(&halves)),
        Seen::tensor(DType::F32, &[0, 3], &[]),
    ];
    assert_eq!(seen, expected);
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn plain_buffers_and_an_empty_one_arrive_as_bytes() -> miniray::Result<()> {
    let _w = util::watchdog(
        "plain_buffers_and_an_empty_one_arrive_as_bytes",
        Duration::from_secs(120),
    );
    let mut cut = SharedBuf::new(8192)?;
    for (i, b) in cut.as_bytes_mut().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    cut.truncate(5000); // only the prefix travels
    let cut_expected: Vec<u8> = (0..5000).map(|i| (i % 251) as u8).collect();

    let mut w = describing_worker()?;
    let attachments = vec![
        SharedBuf::from_slice(&[1u64, 2, 3])?.into(),
        SharedBuf::new(0)?.into(),
        SharedBuf::from_slice(b"hello")?.into(),
        cut.into(),
    ];
    w.send_attached(&(), attachments)?;

    let seen: Vec<Seen> = w.recv_timeout(util::STEP)?;
    let expected = [
        Seen::plain(bytemuck::cast_slice(&[1u64, 2, 3])),
        Seen::plain(&[]),
        Seen::plain(b"hello"),
        Seen::plain(&cut_expected),
    ];
    assert_eq!(seen, expected);
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn a_buffer_made_before_a_worker_was_forked_can_be_sent_to_it() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_buffer_made_before_a_worker_was_forked_can_be_sent_to_it",
        Duration::from_secs(120),
    );
    // The worker inherits this process's writable mapping of the region;
    // sealing it for the send must not depend on that mapping being gone.
    let buf = SharedBuf::from_slice(&[3u16; 2048])?;
    let mut w = describing_worker()?;
    w.send_attached(&(), vec![buf.into()])?;
    let seen: Vec<Seen> = w.recv_timeout(util::STEP)?;
    assert_eq!(seen, [Seen::plain(bytemuck::cast_slice(&[3u16; 2048]))]);
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn into_tensor_on_a_plain_buffer_is_an_error() -> miniray::Result<()> {
    let _w = util::watchdog(
        "into_tensor_on_a_plain_buffer_is_an_error",
        Duration::from_secs(120),
    );
    let mut w = Worker::spawn(|h| {
        let plain = SharedBuf::from_slice(&[1.0f32, 2.0])?;
        let tensor = Tensor::from_slice(&[1.0f32, 2.0], &[2])?;
        h.send_attached(&(), vec![plain.into(), tensor.into()])?;
        Ok(())
    })?;
    let ((), mut got) = w.recv_attached_timeout::<()>(util::STEP)?;
    assert_eq!(got.len(), 2);
    let tensor = got.pop().expect("two attachments").into_tensor()?;
    assert_eq!((tensor.dtype(), tensor.shape()), (DType::F32, &[2][..]));
    let plain = got.pop().expect("two attachments");
    assert_eq!(
        plain.as_bytes(),
        bytemuck::cast_slice::<f32, u8>(&[1.0, 2.0])
    );
    assert!(matches!(plain.into_tensor(), Err(Error::View(_))));
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn unsealed_region_is_refused_and_the_link_still_works() -> miniray::Result<()> {
    let _w = util::watchdog(
        "unsealed_region_is_refused_and_the_link_still_works",
        Duration::from_secs(120),
    );
    let mut w = Worker::spawn(|h| {
        // A region its sender could still shrink: sealable, but no seals.
        // SAFETY: the name is a C string; the result is checked and owned.
        let raw = unsafe {
            libc::memfd_create(
                c"handmade".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        assert!(
            raw >= 0,
            "memfd_create: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `raw` was just returned by memfd_create and is ours.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: ftruncate on a descriptor we own.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) }, 0);
        let desc = util::RawDesc {
            kind: util::RAW_ATTACH_MEMFD,
            len_bytes: 4096,
            ..Default::default()
        };
        let frame = util::raw_frame(&[desc], &unit_payload());
        util::send_raw(h.as_fd(), &frame, &[fd.as_raw_fd()]).map_err(Error::Send)?;
        h.send(&"still here".to_string())
    })?;
    match w.recv_attached_timeout::<()>(util::STEP) {
        Err(Error::Unsealed { seals }) => {
            let size_seals = (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW) as u32;
            assert_eq!(seals & size_seals, 0, "reported seals {seals:#x}");
        }
        other => panic!("expected Error::Unsealed, got {other:?}"),
    }
    assert!(
        !holds_fd_to("/memfd:handmade"),
        "the refused region's fd is still open"
    );
    assert_eq!(w.recv_timeout::<String>(util::STEP)?, "still here");
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn a_pipe_sent_as_a_region_is_a_protocol_error() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_pipe_sent_as_a_region_is_a_protocol_error",
        Duration::from_secs(120),
    );
    let mut w = Worker::spawn(|h| {
        let mut ends = [0 as RawFd; 2];
        // SAFETY: `ends` is a valid array of two ints for the kernel to fill.
        assert_eq!(
            unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) },
            0
        );
        // SAFETY: both were just returned by pipe2 and are ours.
        let (rd, _wr) = unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
        let target = util::fd_target(rd.as_raw_fd()).expect("readlink the pipe");
        h.send(&target)?;
        let desc = util::RawDesc {
            kind: util::RAW_ATTACH_MEMFD,
            len_bytes: 4096,
            ..Default::default()
        };
        let frame = util::raw_frame(&[desc], &unit_payload());
        util::send_raw(h.as_fd(), &frame, &[rd.as_raw_fd()]).map_err(Error::Send)?;
        h.send(&"still here".to_string())
    })?;
    let pipe: String = w.recv_timeout(util::STEP)?;
    assert!(pipe.starts_with("pipe:["), "{pipe}");
    match w.recv_attached_timeout::<()>(util::STEP) {
        Err(Error::Protocol(why)) => assert!(why.contains("memfd"), "{why}"),
        other => panic!("expected Error::Protocol, got {other:?}"),
    }
    assert!(!holds_fd_to(&pipe), "the refused pipe's fd is still open");
    assert_eq!(w.recv_timeout::<String>(util::STEP)?, "still here");
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn writing_through_a_received_view_kills_the_writer() -> miniray::Result<()> {
    let _w = util::watchdog(
        "writing_through_a_received_view_kills_the_writer",
        Duration::from_secs(120),
    );
    let mut w = Worker::spawn(|h| {
        no_core_dumps();
        let ((), got) = h.recv_attached_timeout::<()>(util::STEP)?;
        let view = got.into_iter().next().expect("one attachment").into_buf();
        h.send(&view.as_bytes()[0])?; // reading is fine
        let ptr = view.as_bytes().as_ptr() as *mut u8;
        // SAFETY: none: this write breaks the view's contract on purpose, to
        // show the mapping is read-only. The process dies here with SIGSEGV.
        unsafe { ptr.write_volatile(0) };
        h.send(&0xffu8) // reached only if the page was writable
    })?;
    w.send_attached(&(), vec![SharedBuf::from_slice(&[42u8; 4096])?.into()])?;
    assert_eq!(w.recv_timeout::<u8>(util::STEP)?, 42);
    match w.recv_timeout::<u8>(util::STEP) {
        Err(Error::WorkerDied { pid, status, .. }) => {
            assert_eq!(pid, w.pid());
            assert_eq!(status, ExitStatus::Signaled(libc::SIGSEGV));
        }
        other => panic!("expected the writer to die of SIGSEGV, got {other:?}"),
    }
    Ok(())
}

/// What the sender of a region could still do to it after the send.
#[derive(Archive, Serialize, Deserialize, Debug, PartialEq)]
#[rkyv(crate = miniray::rkyv)]
struct AfterSend {
    /// `readlink` of the buffer's descriptor before the send.
    target: String,
    /// errno of resizing the region before the send (0: it worked).
    resize_before: i32,
    shrink_after: i32,
    grow_after: i32,
    write_after: i32,
}

#[test]
fn a_sent_region_cannot_be_resized_or_written_by_its_sender() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_sent_region_cannot_be_resized_or_written_by_its_sender",
        Duration::from_secs(120),
    );
    let len = 8192;
    let mut w = Worker::spawn(move |h| {
        // The worker is the sender here: one thread, so no other code opens
        // descriptors between the two listings.
        // (Regions of other tests may have been open when it was forked.)
        let regions = || {
            let region = Some("/memfd:miniray (deleted)");
            let fds = util::open_fds().into_iter();
            fds.filter(move |&fd| util::fd_target(fd).as_deref() == region)
        };
        let before: Vec<i32> = regions().collect();
        let buf = SharedBuf::from_slice(&vec![7u8; len])?;
        let mut new_fds = regions().filter(|fd| !before.contains(fd));
        let fd = new_fds.next().expect("the buffer's memfd");
        assert!(new_fds.next().is_none(), "one new region per buffer");
        let target = util::fd_target(fd).unwrap_or_default();
        // SAFETY: `fd` is open (the buffer owns it); dup returns a new one.
        let dup = unsafe { libc::dup(fd) };
        assert!(dup >= 0, "dup: {}", std::io::Error::last_os_error());
        // SAFETY: `dup` was just returned by dup and is ours.
        let dup = unsafe { OwnedFd::from_raw_fd(dup) };
        let raw = dup.as_raw_fd();
        // SAFETY: ftruncate and write on a descriptor we own, from a live
        // one-byte buffer.
        let report = unsafe {
            let resize_before = errno_of(libc::ftruncate(raw, len as libc::off_t).into());
            h.send_attached(&(), vec![buf.into()])?;
            AfterSend {
                target,
                resize_before,
                shrink_after: errno_of(libc::ftruncate(raw, 0).into()),
                grow_after: errno_of(libc::ftruncate(raw, 2 * len as libc::off_t).into()),
                write_after: errno_of(libc::write(raw, b"x".as_ptr().cast(), 1) as libc::c_long),
            }
        };
        h.send(&report)
    })?;
    let ((), got) = w.recv_attached_timeout::<()>(util::STEP)?;
    let report: AfterSend = w.recv_timeout(util::STEP)?;
    assert_eq!(report.target, "/memfd:miniray (deleted)");
    assert_eq!(
        report.resize_before, 0,
        "before the send the region is the sender's"
    );
    assert_eq!(report.shrink_after, libc::EPERM);
    assert_eq!(report.grow_after, libc::EPERM);
    assert_eq!(report.write_after, libc::EPERM);
    assert_eq!(
        got[0].as_bytes(),
        &vec![7u8; len][..],
        "the bytes changed after the send"
    );
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

#[test]
fn held_views_cost_no_descriptors() -> miniray::Result<()> {
    let _w = util::watchdog("held_views_cost_no_descriptors", Duration::from_secs(120));
    const MESSAGES: u64 = 4;
    const PER_MESSAGE: u64 = 50;
    let mut w = Worker::spawn(|h| {
        let before = util::open_fds().len();
        let mut held = Vec::new();
        for _ in 0..MESSAGES {
            let ((), got) = h.recv_attached_timeout::<()>(util::STEP)?;
            held.extend(got);
        }
        let after = util::open_fds().len();
        let sum: u64 = held
            .iter()
            .map(|r| r.as_bytes().iter().map(|&b| b as u64).sum::<u64>())
            .sum();
        h.send(&(before as u64, after as u64, held.len() as u64, sum))
    })?;
    for m in 0..MESSAGES {
        let bufs = (0..PER_MESSAGE)
            .map(|i| SharedBuf::from_slice(&[(m * PER_MESSAGE + i) as u8; 100]).map(Into::into))
            .collect::<miniray::Result<Vec<_>>>()?;
        w.send_attached(&(), bufs)?;
    }
    let (before, after, held, sum) = w.recv_timeout::<(u64, u64, u64, u64)>(util::STEP)?;
    assert_eq!(held, MESSAGES * PER_MESSAGE);
    assert_eq!(
        sum,
        (0..MESSAGES * PER_MESSAGE).map(|i| i * 100).sum::<u64>()
    );
    assert_eq!(after, before, "holding {held} views kept descriptors open");
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

/// What a worker saw when it ran out of descriptors creating buffers.
#[derive(Archive, Serialize, Deserialize, Debug)]
#[rkyv(crate = miniray::rkyv)]
struct AtLimit {
    limit: u64,
    created: u64,
    /// `Some(limit)` if the failure was `Error::FdLimit`.
    fd_limit: Option<u64>,
    message: String,
    /// Whether a pool could not be made either, with `Error::FdLimit`.
    pool_fd_limit: bool,
    /// Whether a buffer could be made again once the limit was raised.
    recovered: bool,
}

#[test]
fn creating_buffers_past_the_fd_limit_is_an_fd_limit_error() -> miniray::Result<()> {
    let _w = util::watchdog(
        "creating_buffers_past_the_fd_limit_is_an_fd_limit_error",
        Duration::from_secs(120),
    );
    const ROOM: u64 = 8;
    let mut w = Worker::spawn(|h| {
        let original = fd_limit();
        let limit = lowest_free_fd() as u64 + ROOM;
        set_fd_limit(limit);
        let mut bufs = Vec::new();
        let err = loop {
            match SharedBuf::new(4096) {
                Ok(buf) => bufs.push(buf),
                Err(err) => break err,
            }
            assert!(
                bufs.len() <= ROOM as usize,
                "created more buffers than the limit allows"
            );
        };
        let pool_fd_limit = matches!(
            miniray::BufferPool::new(1, 4096),
            Err(Error::FdLimit { .. })
        );
        set_fd_limit(original);
        let recovered = SharedBuf::new(4096).is_ok();
        let fd_limit = match err {
            Error::FdLimit { limit } => Some(limit),
            _ => None,
        };
        h.send(&AtLimit {
            limit,
            created: bufs.len() as u64,
            fd_limit,
            message: err.to_string(),
            pool_fd_limit,
            recovered,
        })
    })?;
    let seen: AtLimit = w.recv_timeout(util::STEP)?;
    assert_eq!(seen.fd_limit, Some(seen.limit), "{seen:?}");
    assert!(seen.message.contains("ulimit"), "{}", seen.message);
    assert!((1..=ROOM).contains(&seen.created), "{seen:?}");
    assert!(seen.pool_fd_limit, "{seen:?}");
    assert!(seen.recovered, "{seen:?}");
    assert!(w.wait_timeout(util::STEP)?.success(), "the worker crashed");
    Ok(())
}

#[test]
fn receiving_at_the_fd_limit_is_an_fd_limit_error_then_recovers() -> miniray::Result<()> {
    let _w = util::watchdog(
        "receiving_at_the_fd_limit_is_an_fd_limit_error_then_recovers",
        Duration::from_secs(120),
    );
    let mut w = Worker::spawn(|h| {
        let original = fd_limit();
        h.recv_timeout::<()>(util::STEP)?;
        // No descriptor can be added from here on.
        let limit = lowest_free_fd() as u64;
        set_fd_limit(limit);
        h.send(&limit)?;
        let first = match h.recv_attached_timeout::<u32>(util::STEP) {
            Err(Error::FdLimit { limit: said }) => format!("fd limit {said}"),
            Err(other) => format!("error: {other}"),
            Ok((n, got)) => format!("message {n} with {} attachments", got.len()),
        };
        set_fd_limit(original);
        h.send(&first)?;
        let (n, got) = h.recv_attached_timeout::<u32>(util::STEP)?;
        let bytes = got
            .first()
            .map(|r| r.as_bytes().to_vec())
            .unwrap_or_default();
        h.send(&(n, got.len() as u64, bytes))
    })?;
    w.send(&())?;
    let limit: u64 = w.recv_timeout(util::STEP)?;
    w.send_attached(&1u32, vec![SharedBuf::from_slice(&[1u8; 64])?.into()])?;
    assert_eq!(
        w.recv_timeout::<String>(util::STEP)?,
        format!("fd limit {limit}")
    );
    w.send_attached(&2u32, vec![SharedBuf::from_slice(&[2u8; 64])?.into()])?;
    let (n, count, bytes) = w.recv_timeout::<(u32, u64, Vec<u8>)>(util::STEP)?;
    assert_eq!((n, count, bytes), (2, 1, vec![2u8; 64]));
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

/// A frame that loses its descriptors at the receiver's fd limit still
/// gives back the pool slots it named: the pool does not leak a slot.
#[test]
fn a_pool_slot_in_a_frame_cut_at_the_fd_limit_comes_back() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_pool_slot_in_a_frame_cut_at_the_fd_limit_comes_back",
        Duration::from_secs(120),
    );
    let pool = miniray::BufferPool::new(2, 4096)?;
    let mut w = Worker::spawn(|h| {
        let original = fd_limit();
        drop(h.recv_attached_timeout::<u32>(util::STEP)?); // The pool is now mapped here.
        set_fd_limit(lowest_free_fd() as u64);
        h.send(&())?;
        let outcome = match h.recv_attached_timeout::<u32>(util::STEP) {
            Err(Error::FdLimit { .. }) => "fd limit".to_string(),
            Err(other) => format!("error: {other}"),
            Ok((n, got)) => format!("message {n} with {} attachments", got.len()),
        };
        set_fd_limit(original);
        h.send(&outcome)
    })?;
    let first = pool.acquire_timeout(util::STEP)?;
    w.send_attached(&1u32, vec![first.into()])?;
    w.recv_timeout::<()>(util::STEP)?;
    let slot = pool.acquire_timeout(util::STEP)?;
    let fresh = SharedBuf::from_slice(&[9u8; 64])?; // Needs a descriptor: cut.
    w.send_attached(&2u32, vec![slot.into(), fresh.into()])?;
    assert_eq!(w.recv_timeout::<String>(util::STEP)?, "fd limit");
    assert!(
        util::eventually(util::STEP, || pool.available() == 2),
        "the slot of the cut frame did not come back: {} of 2 available",
        pool.available()
    );
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}

/// Many small frames, some with descriptors, arrive together and are read
/// ahead in few reads: each message still gets exactly its own attachments.
#[test]
fn attachments_stay_with_their_message_when_frames_arrive_together() -> miniray::Result<()> {
    let _w = util::watchdog(
        "attachments_stay_with_their_message_when_frames_arrive_together",
        Duration::from_secs(120),
    );
    const COUNT: u32 = 60;
    let mut w = Worker::spawn(|h| {
        let pool = miniray::BufferPool::new(32, 4096)?;
        for i in 0..COUNT {
            let mut atts: Vec<miniray::Attachment> = Vec::new();
            for k in 0..i % 4 {
                let buf = if (i + k) % 5 == 0 {
                    let mut slot = pool.acquire_timeout(util::STEP)?;
                    slot.truncate(8);
                    slot.as_mut_slice::<u32>()?.copy_from_slice(&[i, k]);
                    slot
                } else {
                    SharedBuf::from_slice(&[i, k])?
                };
                atts.push(buf.into());
            }
            h.send_attached(&i, atts)?;
        }
        Ok(())
    })?;
    // Everything is queued before the first read: the worker has exited.
    assert!(w.wait_timeout(util::STEP)?.success());
    for i in 0..COUNT {
        let (n, got) = w.recv_attached_timeout::<u32>(util::STEP)?;
        assert_eq!(n, i, "messages arrive in order");
        assert_eq!(
            got.len() as u32,
            i % 4,
            "message {i} has its own attachments"
        );
        for (k, att) in got.iter().enumerate() {
            let words: &[u32] = bytemuck::cast_slice(att.as_bytes());
            assert_eq!(words, &[i, k as u32], "attachment {k} of message {i}");
        }
    }
    Ok(())
}

/// The frame that first carries a pool's descriptor is cut at the
/// receiver's fd limit: the next slot sent announces the pool again, the
/// receiver maps it then, and the cut frame's slot comes back too.
#[test]
fn a_pool_announcement_lost_at_the_fd_limit_is_made_again() -> miniray::Result<()> {
    let _w = util::watchdog(
        "a_pool_announcement_lost_at_the_fd_limit_is_made_again",
        Duration::from_secs(120),
    );
    let pool = miniray::BufferPool::new(2, 4096)?;
    let mut w = Worker::spawn(|h| {
        let original = fd_limit();
        set_fd_limit(lowest_free_fd() as u64);
        h.send(&())?;
        let first = match h.recv_attached_timeout::<u32>(util::STEP) {
            Err(Error::FdLimit { .. }) => "fd limit".to_string(),
            Err(other) => format!("error: {other}"),
            Ok((n, got)) => format!("message {n} with {} attachments", got.len()),
        };
        set_fd_limit(original);
        h.send(&first)?;
        let (n, got) = h.recv_attached_timeout::<u32>(util::STEP)?;
        let byte = got[0].as_bytes()[0];
        drop(got);
        h.send(&(n, byte))
    })?;
    w.recv_timeout::<()>(util::STEP)?;
    let mut lost = pool.acquire_timeout(util::STEP)?;
    lost.as_bytes_mut()[0] = 1;
    w.send_attached(&1u32, vec![lost.into()])?;
    assert_eq!(w.recv_timeout::<String>(util::STEP)?, "fd limit");
    let mut next = pool.acquire_timeout(util::STEP)?;
    next.as_bytes_mut()[0] = 2;
    w.send_attached(&2u32, vec![next.into()])?;
    assert_eq!(w.recv_timeout::<(u32, u8)>(util::STEP)?, (2, 2));
    assert!(
        util::eventually(util::STEP, || pool.available() == 2),
        "both slots come back: {} of 2 available",
        pool.available()
    );
    assert!(w.wait_timeout(util::STEP)?.success());
    Ok(())
}
