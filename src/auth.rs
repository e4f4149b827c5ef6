//! The mutual HMAC-SHA256 handshake that starts every TCP connection, and
//! the cluster's shared [`Key`].
//!
//! # The exchange
//!
//! Four kinds of frame, each a normal frame header of kind
//! [`kind::AUTH`] followed by an [`AuthBody`] and up to [`MAX_AUTH_TEXT`]
//! bytes of UTF-8 text:
//!
//! 1. server → client, CHALLENGE: a fresh 32-byte nonce `ns`.
//! 2. client → server, RESPONSE: its own fresh nonce `nc`, the request
//!    (START a worker at the entry point named in the text, or ATTACH the
//!    data connection of the session named by a token) and
//!    `HMAC(key, "MINIRAY-AUTH-CLIENT-V2" || ns || nc || code || token || text)`.
//! 3. server → client, ACCEPT with the session token and
//!    `HMAC(key, "MINIRAY-AUTH-SERVER-V2" || nc || ns || token)`, or
//! 4. server → client, REFUSE with a reason code and text.
//!
//! # Why it is built this way
//!
//! - Mutual: the server must not run code for a stranger, and the client
//!   must not hand its work and data to an impostor; each side proves it
//!   knows the key before the other trusts it.
//! - Nonces both ways: each MAC covers the other side's fresh nonce, so a
//!   MAC recorded on one connection is worthless on the next (a replayed
//!   RESPONSE meets a new `ns` and fails).
//! - Labels: the two MACs start with different labels, so a server's MAC
//!   can never be reflected back as a client's, or the other way round,
//!   even though both cover the same two nonces.
//! - The request is inside the client's MAC: a man in the middle cannot
//!   turn a START of one entry point into another, or swap the token of an
//!   ATTACH, without the MAC failing.
//! - Constant-time checks ([`Mac::verify_slice`]): how long a refusal takes
//!   says nothing about how many bytes of a forged MAC were right.
//! - Bounded before trust: a peer that has proved nothing gets at most one
//!   header and [`MAX_AUTH_PAYLOAD`] bytes read into fixed arrays, and one
//!   deadline for the whole handshake, however slowly it trickles bytes.
//!
//! What it does not do: the connection continues in the clear after the
//! handshake, without integrity. It keeps strangers from starting workers;
//! it does not stop an attacker who can rewrite packets on the path. Run
//! clusters on a network you trust, or under a tunnel.
//!
//! All integers are little-endian; `docs/PROTOCOL.md` has the frame header.

use std::ffi::OsString;
use std::fmt;
use std::io::{self, Read, Write};
use std::mem::{offset_of, size_of};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use bytemuck::{Pod, Zeroable};
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::codec::{FrameHeader, HEADER_LEN, kind};
use crate::wait::Wait;
use crate::{Error, Result};

/// The environment variable that holds the key itself.
pub const ENV_KEY: &str = "MINIRAY_KEY";
/// The environment variable that names a file holding the key.
pub const ENV_KEY_FILE: &str = "MINIRAY_KEY_FILE";
/// Shortest key accepted: 128 bits, the strength HMAC-SHA256 is used for
/// here; a shorter secret could be guessed offline from one handshake.
pub(crate) const MIN_KEY_BYTES: usize = 16;
/// Longest text a handshake frame carries: an entry name or a refusal's
/// reason fits many times over, and it bounds what a stranger can make us
/// read.
pub(crate) const MAX_AUTH_TEXT: usize = 1024;
/// Longest entry point name a START may carry (a name, not a command line).
pub(crate) const MAX_ENTRY_BYTES: usize = 256;

/// Random bytes behind a generated key: 256 bits, HMAC-SHA256's block of
/// strength; written as twice as many hex characters.
const GENERATED_KEY_BYTES: usize = 32;
/// Largest key file read: a key is a few dozen bytes, so anything longer
/// is the wrong file, and the bound keeps us from reading one forever.
const MAX_KEY_FILE_BYTES: u64 = 4096;

/// Length of a nonce, a MAC (HMAC-SHA256's output) and a session token.
const FIELD_LEN: usize = 32;
/// Length of an [`AuthBody`].
pub(crate) const AUTH_BODY_LEN: usize = size_of::<AuthBody>();
/// Longest payload of a handshake frame: the body and the longest text.
pub(crate) const MAX_AUTH_PAYLOAD: usize = AUTH_BODY_LEN + MAX_AUTH_TEXT;
/// Longest handshake frame on the wire.
const MAX_AUTH_FRAME: usize = HEADER_LEN + MAX_AUTH_PAYLOAD;

/// Starts the client's MAC; never the start of the server's.
const CLIENT_LABEL: &[u8] = b"MINIRAY-AUTH-CLIENT-V2";
/// Starts the server's MAC; never the start of the client's.
const SERVER_LABEL: &[u8] = b"MINIRAY-AUTH-SERVER-V2";

type HmacSha256 = Hmac<Sha256>;

/// The steps of the handshake, [`AuthBody::step`].
pub(crate) mod step {
    /// Server to client: the server's nonce.
    pub const CHALLENGE: u32 = 1;
    /// Client to server: the client's nonce, request and MAC.
    pub const RESPONSE: u32 = 2;
    /// Server to client: the session token and the server's MAC.
    pub const ACCEPT: u32 = 3;
    /// Server to client: why not.
    pub const REFUSE: u32 = 4;
}

/// The roles a RESPONSE asks for, its [`AuthBody::code`].
pub(crate) mod role {
    /// Start a worker at the entry point named in the text.
    pub const START: u32 = 1;
    /// The data connection of the session named by the token.
    pub const ATTACH: u32 = 2;
}

/// The reasons of a REFUSE, its [`AuthBody::code`].
pub(crate) mod refuse {
    /// The client's MAC did not verify.
    pub const KEY: u32 = 1;
    /// No entry point of that name.
    pub const ENTRY: u32 = 2;
    /// No room for another worker or connection.
    pub const BUSY: u32 = 3;
    /// No session with that token, or it expired.
    pub const SESSION: u32 = 4;
    /// The request was malformed.
    pub const REQUEST: u32 = 5;
}

/// The fixed part of a handshake frame's payload; its text follows. 112
/// bytes. Fields a step does not use are zero, and checked to be.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub(crate) struct AuthBody {
    /// One of [`step`].
    pub(crate) step: u32,
    /// RESPONSE: one of [`role`]; REFUSE: one of [`refuse`]; else 0.
    pub(crate) code: u32,
    /// Reserved, zero.
    pub(crate) reserved: u64,
    /// CHALLENGE: the server's nonce; RESPONSE: the client's; else zero.
    pub(crate) nonce: [u8; FIELD_LEN],
    /// RESPONSE: the client's MAC; ACCEPT: the server's; else zero.
    pub(crate) mac: [u8; FIELD_LEN],
    /// RESPONSE to ATTACH and ACCEPT: the session token; else zero.
    pub(crate) token: [u8; FIELD_LEN],
}

const _: () = {
    assert!(AUTH_BODY_LEN == 112);
    assert!(AUTH_BODY_LEN % 16 == 0);
    assert!(offset_of!(AuthBody, step) == 0);
    assert!(offset_of!(AuthBody, code) == 4);
    assert!(offset_of!(AuthBody, reserved) == 8);
    assert!(offset_of!(AuthBody, nonce) == 16);
    assert!(offset_of!(AuthBody, mac) == 48);
    assert!(offset_of!(AuthBody, token) == 80);
};

// ---------------------------------------------------------------------------
// The key
// ---------------------------------------------------------------------------

/// The shared secret of a cluster: every client and server of it holds the
/// same key, and a handshake succeeds only between two that do.
///
/// Its `Debug` shows `Key(..)`, never the bytes, so a key in a struct
/// that is logged stays secret. Any byte string of at least 16 bytes is a
/// key; [`Key::generate`] makes a strong one.
///
/// # Examples
///
/// ```
/// let key = miniray::Key::new("0123456789abcdef")?;
/// assert_eq!(format!("{key:?}"), "Key(..)");
/// # Ok::<(), miniray::Error>(())
/// ```
#[derive(Clone)]
pub struct Key {
    bytes: Vec<u8>,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A key of these bytes.
    ///
    /// # Errors
    ///
    /// [`Error::Auth`] if there are fewer than 16 bytes: a short secret can
    /// be guessed offline from one recorded handshake.
    ///
    /// # Examples
    ///
    /// ```
    /// let key = miniray::Key::new("0123456789abcdef")?;
    /// assert_eq!(key.reveal(), b"0123456789abcdef");
    /// assert!(miniray::Key::new("hunter2").is_err());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Key> {
        let bytes = bytes.into();
        if bytes.len() < MIN_KEY_BYTES {
            return Err(Error::Auth(format!(
                "a key of {} bytes is too short: use at least {MIN_KEY_BYTES} (Key::generate makes one)",
                bytes.len()
            )));
        }
        Ok(Key { bytes })
    }

    /// A fresh key: 32 random bytes from the operating system, written as
    /// 64 lowercase hex characters so it can go into a file or an
    /// environment variable as it is.
    ///
    /// # Errors
    ///
    /// [`Error::Auth`] if the operating system has no randomness to give.
    ///
    /// # Examples
    ///
    /// ```
    /// let key = miniray::Key::generate()?;
    /// assert_eq!(key.reveal().len(), 64);
    /// assert_ne!(key.reveal(), miniray::Key::generate()?.reveal());
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn generate() -> Result<Key> {
        let raw: [u8; GENERATED_KEY_BYTES] = random()?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Key::new(hex)
    }

    /// The key in a file: its whole content, less one trailing newline.
    ///
    /// The file must be private to its owner (`chmod 600`): a key that
    /// other users can read is no secret.
    ///
    /// # Errors
    ///
    /// [`Error::Auth`] naming the path if the file cannot be read, is open
    /// to its group or others (it says to `chmod 600` it), is longer than
    /// 4096 bytes, or holds fewer than 16 bytes.
    ///
    /// # Examples
    ///
    /// ```
    /// use std::os::unix::fs::PermissionsExt;
    ///
    /// let path = std::env::temp_dir().join(format!("miniray-doc-key-{}", std::process::id()));
    /// std::fs::write(&path, "0123456789abcdef\n")?;
    /// std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    /// let key = miniray::Key::from_file(&path)?;
    /// assert_eq!(key.reveal(), b"0123456789abcdef");
    /// std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644))?;
    /// assert!(miniray::Key::from_file(&path).unwrap_err().to_string().contains("chmod 600"));
    /// std::fs::remove_file(&path)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_file(path: impl AsRef<Path>) -> Result<Key> {
        let path = path.as_ref();
        let mut bytes = read_private_file(path)?;
        if bytes.last() == Some(&b'\n') {
            bytes.pop();
        }
        Key::new(bytes).map_err(|err| in_source(&path.display().to_string(), err))
    }

    /// The key from the environment: `MINIRAY_KEY` holds the key itself;
    /// if it is not set, `MINIRAY_KEY_FILE` names a file holding it (read
    /// as [`Key::from_file`] does).
    ///
    /// # Errors
    ///
    /// [`Error::Auth`] if neither variable is set (the text names both), or
    /// as [`Key::new`] and [`Key::from_file`], naming the variable.
    ///
    /// # Examples
    ///
    /// ```
    /// match miniray::Key::from_env() {
    ///     Ok(key) => assert!(key.reveal().len() >= 16),
    ///     Err(err) => assert!(err.to_string().contains("MINIRAY_KEY")),
    /// }
    /// ```
    pub fn from_env() -> Result<Key> {
        from_env_vars(std::env::var_os(ENV_KEY), std::env::var_os(ENV_KEY_FILE))
    }

    /// The key's bytes, to hand on to a server started by this process
    /// (on its standard input, say, where no other user can read them as
    /// they could an argument).
    ///
    /// # Examples
    ///
    /// ```
    /// let key = miniray::Key::new(*b"0123456789abcdef")?;
    /// assert_eq!(key.reveal(), b"0123456789abcdef");
    /// # Ok::<(), miniray::Error>(())
    /// ```
    pub fn reveal(&self) -> &[u8] {
        &self.bytes
    }

    /// A MAC under this key, started with a side's label.
    fn mac(&self, label: &[u8]) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(&self.bytes).expect("HMAC takes a key of any length");
        mac.update(label);
        mac
    }
}

/// [`Key::from_env`] on the two variables' values, so it can be tested
/// without changing the process's environment.
fn from_env_vars(key: Option<OsString>, file: Option<OsString>) -> Result<Key> {
    match (key, file) {
        (Some(key), _) => Key::new(key.into_vec()).map_err(|err| in_source(ENV_KEY, err)),
        (None, Some(path)) => Key::from_file(&path).map_err(|err| in_source(ENV_KEY_FILE, err)),
        (None, None) => Err(Error::Auth(format!(
            "no key: set {ENV_KEY} to the cluster's key, or {ENV_KEY_FILE} to a file holding it"
        ))),
    }
}

/// Says where a key that failed came from.
fn in_source(source: &str, err: Error) -> Error {
    match err {
        Error::Auth(text) => Error::Auth(format!("{source}: {text}")),
        other => other,
    }
}

/// The content of a key file, after checking that only its owner can get
/// at it. The mode is read from the open file, so the file checked is the
/// file read.
fn read_private_file(path: &Path) -> Result<Vec<u8>> {
    let shown = path.display();
    let cannot = |err: io::Error| Error::Auth(format!("cannot read the key file {shown}: {err}"));
    let file = std::fs::File::open(path).map_err(cannot)?;
    let mode = file.metadata().map_err(cannot)?.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(Error::Auth(format!(
            "the key file {shown} is open to other users (mode {:o}): chmod 600 {shown}",
            mode & 0o777
        )));
    }
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(cannot)?;
    if bytes.len() as u64 > MAX_KEY_FILE_BYTES {
        return Err(Error::Auth(format!(
            "the key file {shown} is longer than {MAX_KEY_FILE_BYTES} bytes: is it the right file?"
        )));
    }
    Ok(bytes)
}

/// `N` bytes from the operating system's generator.
fn random<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0; N];
    getrandom::fill(&mut bytes).map_err(|err| {
        Error::Auth(format!(
            "cannot get random bytes from the operating system: {err}"
        ))
    })?;
    Ok(bytes)
}

/// A fresh session token, for a `decide` that accepts a START.
///
/// # Errors
///
/// [`Error::Auth`] if the operating system has no randomness to give.
pub(crate) fn new_token() -> Result<[u8; FIELD_LEN]> {
    random()
}

// ---------------------------------------------------------------------------
// Requests and refusals
// ---------------------------------------------------------------------------

/// What an authenticated client asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    /// Start a worker at this entry point (1 to [`MAX_ENTRY_BYTES`] bytes).
    Start {
        /// The entry point's name, as registered with `dispatch`.
        entry: String,
    },
    /// Be the data connection of the session this token names.
    Attach {
        /// The token the START's ACCEPT carried.
        token: [u8; FIELD_LEN],
    },
}

/// Why a server turns an authenticated request down: a [`refuse`] code
/// and a text for the client's error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// One of [`refuse`].
    pub(crate) code: u32,
    /// Why, for a person; cut to [`MAX_AUTH_TEXT`] bytes on the wire.
    pub(crate) text: String,
}

impl Refusal {
    /// No entry point of this name is registered on the server.
    pub(crate) fn entry(name: &str) -> Refusal {
        Refusal {
            code: refuse::ENTRY,
            text: format!(
                "no entry point named {name:?}; register it in the server's dispatch list"
            ),
        }
    }

    /// No room for another worker or connection; `text` says which limit.
    pub(crate) fn busy(text: impl Into<String>) -> Refusal {
        Refusal {
            code: refuse::BUSY,
            text: text.into(),
        }
    }

    /// The token names no session, or one that has expired.
    pub(crate) fn session() -> Refusal {
        Refusal {
            code: refuse::SESSION,
            text: "no session with that token (unknown, or expired)".into(),
        }
    }

    /// The request was malformed; `text` says how.
    pub(crate) fn request(text: impl Into<String>) -> Refusal {
        Refusal {
            code: refuse::REQUEST,
            text: text.into(),
        }
    }

    /// What the server says to a client whose MAC did not verify.
    fn key() -> Refusal {
        Refusal {
            code: refuse::KEY,
            text: "the key did not match".into(),
        }
    }
}

/// A request's code, token and text: what the client's MAC covers.
fn role_fields(role: &Role) -> (u32, [u8; FIELD_LEN], &str) {
    match role {
        Role::Start { entry } => (role::START, [0; FIELD_LEN], entry),
        Role::Attach { token } => (role::ATTACH, *token, ""),
    }
}

// ---------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------

/// A parsed handshake frame whose fields were all checked for its step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct AuthFrame {
    /// The fixed part.
    pub(crate) body: AuthBody,
    /// The text, at most [`MAX_AUTH_TEXT`] bytes.
    pub(crate) text: String,
}

impl AuthFrame {
    fn new(step: u32, code: u32, text: &str) -> AuthFrame {
        AuthFrame {
            body: AuthBody {
                step,
                code,
                ..AuthBody::zeroed()
            },
            text: cut_text(text).to_owned(),
        }
    }

    /// The header and payload as they go on the wire.
    fn encode(&self) -> Vec<u8> {
        let payload_len = AUTH_BODY_LEN + self.text.len();
        let mut out = Vec::with_capacity(HEADER_LEN + payload_len);
        out.extend_from_slice(bytemuck::bytes_of(&FrameHeader::new(
            kind::AUTH,
            payload_len,
        )));
        out.extend_from_slice(bytemuck::bytes_of(&self.body));
        out.extend_from_slice(self.text.as_bytes());
        out
    }

    fn challenge(ns: [u8; FIELD_LEN]) -> AuthFrame {
        let mut frame = AuthFrame::new(step::CHALLENGE, 0, "");
        frame.body.nonce = ns;
        frame
    }

    fn response(key: &Key, ns: &[u8; FIELD_LEN], nc: [u8; FIELD_LEN], role: &Role) -> AuthFrame {
        let (code, token, text) = role_fields(role);
        let mut frame = AuthFrame::new(step::RESPONSE, code, text);
        frame.body.nonce = nc;
        frame.body.token = token;
        frame.body.mac = client_mac(key, ns, &frame).finalize().into_bytes().into();
        frame
    }

    fn accept(
        key: &Key,
        ns: &[u8; FIELD_LEN],
        nc: &[u8; FIELD_LEN],
        token: [u8; FIELD_LEN],
    ) -> AuthFrame {
        let mut frame = AuthFrame::new(step::ACCEPT, 0, "");
        frame.body.token = token;
        frame.body.mac = server_mac(key, ns, nc, &token)
            .finalize()
            .into_bytes()
            .into();
        frame
    }

    fn refuse(refusal: &Refusal) -> AuthFrame {
        AuthFrame::new(step::REFUSE, refusal.code, &refusal.text)
    }

    /// The request of a parsed RESPONSE.
    fn role(&self) -> Role {
        match self.body.code {
            role::START => Role::Start {
                entry: self.text.clone(),
            },
            _ => Role::Attach {
                token: self.body.token,
            },
        }
    }
}

/// The bytes of a REFUSE frame, for a server to send in place of a
/// CHALLENGE (a server with no room for another connection).
pub(crate) fn refusal_frame(refusal: &Refusal) -> Vec<u8> {
    AuthFrame::refuse(refusal).encode()
}

/// The client's MAC over the server's nonce and the RESPONSE `frame`
/// (its nonce, code, token and text).
fn client_mac(key: &Key, ns: &[u8; FIELD_LEN], frame: &AuthFrame) -> HmacSha256 {
    let mut mac = key.mac(CLIENT_LABEL);
    mac.update(ns);
    mac.update(&frame.body.nonce);
    mac.update(&frame.body.code.to_le_bytes());
    mac.update(&frame.body.token);
    mac.update(frame.text.as_bytes());
    mac
}

/// The server's MAC: the nonces in the other order from the client's,
/// and the token it grants.
fn server_mac(
    key: &Key,
    ns: &[u8; FIELD_LEN],
    nc: &[u8; FIELD_LEN],
    token: &[u8; FIELD_LEN],
) -> HmacSha256 {
    let mut mac = key.mac(SERVER_LABEL);
    mac.update(nc);
    mac.update(ns);
    mac.update(token);
    mac
}

/// Cuts `text` to at most [`MAX_AUTH_TEXT`] bytes, on a character
/// boundary (a refusal may quote a long name back).
fn cut_text(text: &str) -> &str {
    let mut end = text.len().min(MAX_AUTH_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Checks a header read during the handshake and returns its payload's
/// length, at most [`MAX_AUTH_PAYLOAD`]: nothing longer is ever read from
/// a peer that has not authenticated.
///
/// # Errors
///
/// [`Error::Protocol`] for a bad magic or version, a kind other than
/// AUTH, a non-zero field an AUTH frame does not use, or a length out of
/// bounds.
pub(crate) fn check_auth_header(header: &FrameHeader) -> Result<usize> {
    let protocol = |what: String| Err(Error::Protocol(what));
    header.check_identity()?;
    if header.kind != kind::AUTH {
        return protocol(format!(
            "frame of kind {} during the handshake (expected AUTH, {})",
            header.kind,
            kind::AUTH
        ));
    }
    let unused = header.attachments | header.flags;
    if unused != 0 || header.type_id != 0 || header.data_len != 0 || header.reserved != 0 {
        return protocol("an AUTH frame header has non-zero fields it does not use".into());
    }
    match usize::try_from(header.payload_len) {
        Ok(len) if (AUTH_BODY_LEN..=MAX_AUTH_PAYLOAD).contains(&len) => Ok(len),
        _ => protocol(format!(
            "AUTH frame of {} bytes (expected {AUTH_BODY_LEN} to {MAX_AUTH_PAYLOAD})",
            header.payload_len
        )),
    }
}

/// Reads a handshake frame's payload and checks every field against what
/// its step allows.
///
/// # Errors
///
/// [`Error::Protocol`] for a short or long payload, an unknown step or
/// code, a non-zero reserved field, a nonce, MAC or token where the step
/// has none, text that is not UTF-8, or text where the step has none.
pub(crate) fn parse_auth_frame(payload: &[u8]) -> Result<AuthFrame> {
    if !(AUTH_BODY_LEN..=MAX_AUTH_PAYLOAD).contains(&payload.len()) {
        return Err(Error::Protocol(format!(
            "AUTH payload of {} bytes (expected {AUTH_BODY_LEN} to {MAX_AUTH_PAYLOAD})",
            payload.len()
        )));
    }
    let (body, text) = payload.split_at(AUTH_BODY_LEN);
    let body: AuthBody = bytemuck::pod_read_unaligned(body);
    let text = std::str::from_utf8(text)
        .map_err(|_| Error::Protocol("the text of an AUTH frame is not UTF-8".into()))?;
    let frame = AuthFrame {
        body,
        text: text.to_owned(),
    };
    check_fields(&frame).map_err(|what| {
        Error::Protocol(format!(
            "malformed AUTH frame of step {}: {what}",
            body.step
        ))
    })?;
    Ok(frame)
}

/// What is wrong with a frame's fields for its step, if anything.
fn check_fields(frame: &AuthFrame) -> std::result::Result<(), &'static str> {
    let b = &frame.body;
    if b.reserved != 0 {
        return Err("the reserved field is not zero");
    }
    let known_refusal = (refuse::KEY..=refuse::REQUEST).contains(&b.code);
    let (code_ok, nonce, mac, token, text_ok) = match b.step {
        step::CHALLENGE => (b.code == 0, true, false, false, frame.text.is_empty()),
        step::RESPONSE => return check_request(frame),
        step::ACCEPT => (b.code == 0, false, true, true, frame.text.is_empty()),
        step::REFUSE => (known_refusal, false, false, false, true),
        _ => return Err("unknown step"),
    };
    let stray = |used: bool, field: &[u8; FIELD_LEN]| !used && field.iter().any(|&x| x != 0);
    let faults = [
        (!code_ok, "unknown code"),
        (stray(nonce, &b.nonce), "a nonce where the step has none"),
        (stray(mac, &b.mac), "a MAC where the step has none"),
        (stray(token, &b.token), "a token where the step has none"),
        (!text_ok, "text where the step has none"),
    ];
    match faults.iter().find(|(fault, _)| *fault) {
        Some(&(_, why)) => Err(why),
        None => Ok(()),
    }
}

/// What is wrong with a RESPONSE's request, if anything: a START names
/// an entry point and carries no token, an ATTACH carries no text.
fn check_request(frame: &AuthFrame) -> std::result::Result<(), &'static str> {
    let no_token = frame.body.token.iter().all(|&x| x == 0);
    match frame.body.code {
        role::START if !no_token => Err("a token on a START"),
        role::START if !(1..=MAX_ENTRY_BYTES).contains(&frame.text.len()) => {
            Err("the entry point name is empty or too long")
        }
        role::ATTACH if !frame.text.is_empty() => Err("text on an ATTACH"),
        role::START | role::ATTACH => Ok(()),
        _ => Err("unknown role"),
    }
}

// ---------------------------------------------------------------------------
// The link: deadline-bounded reads and writes
// ---------------------------------------------------------------------------

/// A stream during the handshake: every read and write waits at most
/// until the handshake's one deadline. The stream's own timeouts are put
/// back when the handshake ends.
struct Link<'a> {
    stream: &'a TcpStream,
    addr: SocketAddr,
    wait: Wait,
    saved: (Option<Duration>, Option<Duration>),
}

impl<'a> Link<'a> {
    fn new(stream: &'a TcpStream, deadline: Instant) -> Result<Link<'a>> {
        let saved = (
            stream.read_timeout().map_err(Error::Recv)?,
            stream.write_timeout().map_err(Error::Send)?,
        );
        Ok(Link {
            stream,
            addr: stream.peer_addr().map_err(Error::Recv)?,
            wait: Wait::deadline(deadline),
            saved,
        })
    }

    /// Time left, never zero (a zero socket timeout is an error, not an
    /// immediate one), or [`Error::Timeout`] with the handshake's timeout.
    fn left(&self) -> Result<Duration> {
        match self.wait.remaining() {
            Some(left) if !left.is_zero() => Ok(left),
            _ => Err(self.wait.expired()),
        }
    }

    fn send(&self, frame: &AuthFrame) -> Result<()> {
        let bytes = frame.encode();
        debug_assert!(bytes.len() <= MAX_AUTH_FRAME, "an AUTH frame is bounded");
        let (mut stream, mut sent) = (self.stream, 0);
        while sent < bytes.len() {
            self.stream
                .set_write_timeout(Some(self.left()?))
                .map_err(Error::Send)?;
            match stream.write(&bytes[sent..]) {
                Ok(0) => return Err(Error::Send(io::ErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                Err(err) if is_retry(&err) => {}
                Err(err) => return Err(Error::Send(err)),
            }
        }
        Ok(())
    }

    /// Fills `buf`, a few bytes at a time if the peer sends them so,
    /// checking the deadline before each read.
    fn read_full(&self, buf: &mut [u8]) -> Result<()> {
        let (mut stream, mut filled) = (self.stream, 0);
        while filled < buf.len() {
            self.stream
                .set_read_timeout(Some(self.left()?))
                .map_err(Error::Recv)?;
            match stream.read(&mut buf[filled..]) {
                Ok(0) => return Err(Error::Disconnected),
                Ok(n) => filled += n,
                Err(err) if is_retry(&err) => {}
                Err(err) => return Err(Error::Recv(err)),
            }
        }
        Ok(())
    }

    /// One frame, into fixed arrays: the header, then a payload whose
    /// length was checked first.
    fn recv(&self) -> Result<AuthFrame> {
        let mut header = [0; HEADER_LEN];
        self.read_full(&mut header)?;
        let len = check_auth_header(&bytemuck::pod_read_unaligned(&header))?;
        let mut payload = [0; MAX_AUTH_PAYLOAD];
        self.read_full(&mut payload[..len])?;
        parse_auth_frame(&payload[..len])
    }
}

impl Drop for Link<'_> {
    fn drop(&mut self) {
        // Best effort: the handshake's result matters more than this one.
        let _ = self.stream.set_read_timeout(self.saved.0);
        let _ = self.stream.set_write_timeout(self.saved.1);
    }
}

/// A timeout that fired (the deadline is checked next time round), or a
/// signal: both mean "try again".
fn is_retry(err: &io::Error) -> bool {
    matches!(
        err.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

// ---------------------------------------------------------------------------
// The two sides
// ---------------------------------------------------------------------------

/// The client's side of the handshake on a connected, blocking stream:
/// answers the server's challenge with `role`, and checks that the server
/// knows the key too. Returns the session token of the server's ACCEPT.
///
/// The whole handshake ends by `deadline`; the stream's own timeouts are
/// as they were afterwards.
///
/// # Errors
///
/// - [`Error::Auth`] if the server refused the key, could not prove it
///   knows it, or closed the connection before answering; or if `role`
///   names an entry point that is empty or longer than 256 bytes.
/// - [`Error::Refused`] if the server turned the request down (an unknown
///   entry point, no room, an unknown session), with its reason.
/// - [`Error::Protocol`] if the server sent what the handshake does not
///   allow; [`Error::Timeout`] at the deadline; [`Error::Disconnected`],
///   [`Error::Recv`] or [`Error::Send`] if the connection failed.
pub(crate) fn client_handshake(
    stream: &mut TcpStream,
    key: &Key,
    role: &Role,
    deadline: Instant,
) -> Result<[u8; FIELD_LEN]> {
    check_role(role)?;
    let link = Link::new(stream, deadline)?;
    let challenge = link.recv()?;
    match challenge.body.step {
        step::CHALLENGE => {}
        // A server with no room may say so before it challenges anyone.
        step::REFUSE => return Err(refused(link.addr, challenge)),
        _ => return Err(unexpected(&challenge, "CHALLENGE")),
    }
    let ns = challenge.body.nonce;
    let response = AuthFrame::response(key, &ns, random()?, role);
    link.send(&response)?;
    let reply = link.recv().map_err(|err| closed_early(link.addr, err))?;
    match reply.body.step {
        step::ACCEPT => accepted(&link, key, &ns, &response, &reply),
        step::REFUSE => Err(refused(link.addr, reply)),
        _ => Err(unexpected(&reply, "ACCEPT or REFUSE")),
    }
}

/// Refuses, before anything is sent, a request no server would take.
fn check_role(role: &Role) -> Result<()> {
    match role {
        Role::Start { entry } if !(1..=MAX_ENTRY_BYTES).contains(&entry.len()) => {
            Err(Error::Auth(format!(
                "an entry point name of {} bytes: names are 1 to {MAX_ENTRY_BYTES} bytes",
                entry.len()
            )))
        }
        _ => Ok(()),
    }
}

/// The end of a connection right after our RESPONSE is the server's way
/// of saying no without saying why.
fn closed_early(addr: SocketAddr, err: Error) -> Error {
    match err {
        Error::Disconnected => Error::Auth(format!(
            "the server at {addr} closed the connection during authentication: check {ENV_KEY} on both sides and the server's log"
        )),
        other => other,
    }
}

/// Checks an ACCEPT's MAC (in constant time) and token.
fn accepted(
    link: &Link<'_>,
    key: &Key,
    ns: &[u8; FIELD_LEN],
    response: &AuthFrame,
    reply: &AuthFrame,
) -> Result<[u8; FIELD_LEN]> {
    let token = reply.body.token;
    let mac = server_mac(key, ns, &response.body.nonce, &token);
    if mac.verify_slice(&reply.body.mac).is_err() {
        return Err(Error::Auth(format!(
            "the server at {} could not prove it knows the key: check {ENV_KEY} on both sides",
            link.addr
        )));
    }
    if response.body.code == role::ATTACH && token != response.body.token {
        return Err(Error::Protocol(
            "the server accepted an ATTACH with another session's token".into(),
        ));
    }
    Ok(token)
}

/// The client's error for a REFUSE.
fn refused(addr: SocketAddr, reply: AuthFrame) -> Error {
    match reply.body.code {
        refuse::KEY => Error::Auth(format!(
            "the server at {addr} refused the key: check {ENV_KEY} on both sides"
        )),
        _ => Error::Refused {
            addr,
            reason: reply.text,
        },
    }
}

/// The error for a frame of the wrong step.
fn unexpected(frame: &AuthFrame, expected: &str) -> Error {
    Error::Protocol(format!(
        "handshake step {} where {expected} belongs",
        frame.body.step
    ))
}

/// The server's side of the handshake on an accepted, blocking stream:
/// challenges the client, checks its MAC (in constant time), and hands
/// the authenticated request to `decide`, which returns the session token
/// to accept with (a fresh one for a START, the client's own for an
/// ATTACH) or a [`Refusal`]. Returns the request accepted.
///
/// `decide` runs only for a client that proved it knows the key, and its
/// time counts against `deadline`, by which the whole handshake ends: it
/// should decide, not do the work. The stream's own timeouts are as they
/// were afterwards.
///
/// # Errors
///
/// - [`Error::Auth`] if the client's MAC did not verify (a wrong key, or a
///   replayed response), or `decide` refused it; the client was told.
/// - [`Error::Protocol`] if the client sent a malformed frame; it was told
///   when the frame could be read whole.
/// - [`Error::Timeout`] at the deadline; [`Error::Disconnected`],
///   [`Error::Recv`] or [`Error::Send`] if the connection failed.
pub(crate) fn server_handshake(
    stream: &mut TcpStream,
    key: &Key,
    deadline: Instant,
    decide: impl FnOnce(&Role) -> Result<[u8; FIELD_LEN], Refusal>,
) -> Result<Role> {
    let link = Link::new(stream, deadline)?;
    let ns = random()?;
    link.send(&AuthFrame::challenge(ns))?;
    let response = recv_response(&link)?;
    verify_client(&link, key, &ns, &response)?;
    let role = response.role();
    match decide(&role) {
        Ok(token) => {
            link.send(&AuthFrame::accept(key, &ns, &response.body.nonce, token))?;
            Ok(role)
        }
        Err(refusal) => {
            let _ = link.send(&AuthFrame::refuse(&refusal));
            Err(Error::Auth(format!(
                "refused the client at {}: {}",
                link.addr, refusal.text
            )))
        }
    }
}

/// Checks the client's MAC in constant time, and tells a client that
/// fails why (best effort, as for a malformed request).
fn verify_client(
    link: &Link<'_>,
    key: &Key,
    ns: &[u8; FIELD_LEN],
    response: &AuthFrame,
) -> Result<()> {
    let mac = client_mac(key, ns, response);
    if mac.verify_slice(&response.body.mac).is_ok() {
        return Ok(());
    }
    let _ = link.send(&AuthFrame::refuse(&Refusal::key()));
    Err(Error::Auth(format!(
        "the client at {} did not prove it knows the key (a wrong key, or a replayed response): check {ENV_KEY} on both sides",
        link.addr
    )))
}

/// The client's RESPONSE; a malformed one is refused with the reason (best
/// effort: the client may be gone, and the error is ours to return).
fn recv_response(link: &Link<'_>) -> Result<AuthFrame> {
    let malformed = match link.recv() {
        Ok(frame) if frame.body.step == step::RESPONSE => return Ok(frame),
        Ok(frame) => unexpected(&frame, "RESPONSE"),
        Err(err @ Error::Protocol(_)) => err,
        Err(err) => return Err(err),
    };
    let _ = link.send(&AuthFrame::refuse(&Refusal::request(malformed.to_string())));
    Err(malformed)
}

#[cfg(test)]
mod tests {
    use std::net::{Shutdown, TcpListener};
    use std::sync::atomic::{AtomicU32, Ordering};

    use proptest::prelude::*;

    use super::*;

    /// Bound on every blocking step of a test that should succeed.
    const TEST_DEADLINE: Duration = Duration::from_secs(10);

    fn soon() -> Instant {
        Instant::now() + TEST_DEADLINE
    }

    fn key(byte: u8) -> Key {
        Key::new([byte; 32]).unwrap()
    }

    /// A connected loopback pair: (client, server).
    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    /// Runs `server` on a thread and `client` on this one, over a fresh
    /// loopback connection.
    fn run<A, B: Send>(
        client: impl FnOnce(TcpStream) -> A,
        server: impl FnOnce(TcpStream) -> B + Send,
    ) -> (A, B) {
        let (c, s) = pair();
        std::thread::scope(|scope| {
            let server = scope.spawn(move || server(s));
            let client = client(c);
            (client, server.join().unwrap())
        })
    }

    fn start(entry: &str) -> Role {
        Role::Start {
            entry: entry.into(),
        }
    }

    fn serve(key: &Key, mut s: TcpStream, token: [u8; FIELD_LEN]) -> Result<Role> {
        server_handshake(&mut s, key, soon(), |_| Ok(token))
    }

    fn connect(key: &Key, mut c: TcpStream, role: &Role) -> Result<[u8; FIELD_LEN]> {
        client_handshake(&mut c, key, role, soon())
    }

    #[test]
    fn start_and_attach_are_accepted_with_the_same_token() {
        let k = key(7);
        let granted = new_token().unwrap();
        let (token, seen) = run(
            |c| connect(&k, c, &start("train")),
            |s| serve(&k, s, granted),
        );
        assert_eq!(token.unwrap(), granted);
        assert_eq!(seen.unwrap(), start("train"));
        let attach = Role::Attach { token: granted };
        let (again, seen) = run(
            |c| connect(&k, c, &attach),
            |mut s| {
                server_handshake(&mut s, &k, soon(), |role| match role {
                    Role::Attach { token } => Ok(*token),
                    Role::Start { .. } => Err(Refusal::request("expected an ATTACH")),
                })
            },
        );
        assert_eq!(again.unwrap(), granted);
        assert_eq!(seen.unwrap(), attach);
    }

    #[test]
    fn a_wrong_client_key_is_refused_on_both_sides() {
        let (client, server) = run(
            |c| connect(&key(1), c, &start("train")),
            |s| serve(&key(2), s, [9; FIELD_LEN]),
        );
        assert!(matches!(client, Err(Error::Auth(m)) if m.contains("refused the key")));
        assert!(matches!(server, Err(Error::Auth(m)) if m.contains("did not prove")));
    }

    #[test]
    fn a_server_without_the_key_cannot_prove_it() {
        // The impostor takes any client MAC and answers with its own key.
        let impostor = |s: TcpStream| {
            let link = Link::new(&s, soon())?;
            let ns = [3; FIELD_LEN];
            link.send(&AuthFrame::challenge(ns))?;
            let response = link.recv()?;
            link.send(&AuthFrame::accept(
                &key(2),
                &ns,
                &response.body.nonce,
                [4; 32],
            ))
        };
        let (client, server) = run(|c| connect(&key(1), c, &start("train")), impostor);
        server.unwrap();
        assert!(matches!(client, Err(Error::Auth(m)) if m.contains("could not prove")));
    }

    #[test]
    fn a_replayed_response_is_refused() {
        let k = key(5);
        // A raw client that computes its MAC itself and keeps the bytes.
        let record = |c: TcpStream| {
            let link = Link::new(&c, soon()).unwrap();
            let challenge = link.recv().unwrap();
            let response = AuthFrame::response(&k, &challenge.body.nonce, [8; 32], &start("train"));
            link.send(&response).unwrap();
            assert_eq!(link.recv().unwrap().body.step, step::ACCEPT);
            response.encode()
        };
        let (recorded, first) = run(record, |s| serve(&k, s, [1; FIELD_LEN]));
        assert!(first.is_ok());
        let replay = |c: TcpStream| {
            let link = Link::new(&c, soon()).unwrap();
            link.recv().unwrap();
            (&c).write_all(&recorded).unwrap();
            link.recv().unwrap()
        };
        let (reply, second) = run(replay, |s| serve(&k, s, [1; FIELD_LEN]));
        assert_eq!(
            (reply.body.step, reply.body.code),
            (step::REFUSE, refuse::KEY)
        );
        assert!(matches!(second, Err(Error::Auth(_))));
    }

    #[test]
    fn a_refusal_reaches_the_client_with_its_reason() {
        let k = key(6);
        let (client, server) = run(
            |c| connect(&k, c, &start("nope")),
            |mut s| {
                server_handshake(&mut s, &k, soon(), |role| match role {
                    Role::Start { entry } => Err(Refusal::entry(entry)),
                    Role::Attach { .. } => Err(Refusal::session()),
                })
            },
        );
        let Err(Error::Refused { reason, .. }) = client else {
            panic!("expected a refusal, got {client:?}");
        };
        assert!(reason.contains("no entry point named \"nope\""), "{reason}");
        assert!(matches!(server, Err(Error::Auth(m)) if m.contains("nope")));
    }

    #[test]
    fn a_server_that_hangs_up_after_the_response_is_an_auth_error() {
        let hang_up = |s: TcpStream| {
            let link = Link::new(&s, soon())?;
            link.send(&AuthFrame::challenge([2; FIELD_LEN]))?;
            link.recv().map(drop)
        };
        let (client, server) = run(|c| connect(&key(1), c, &start("train")), hang_up);
        server.unwrap();
        assert!(matches!(client, Err(Error::Auth(m)) if m.contains("closed the connection")));
    }

    #[test]
    fn a_slow_client_runs_into_the_deadline() {
        const DRIBBLE: Duration = Duration::from_millis(200);
        const SERVER_DEADLINE: Duration = Duration::from_secs(1);
        let header = FrameHeader::new(kind::AUTH, AUTH_BODY_LEN);
        // One byte each 200 ms: the header alone would take 9.6 s, and
        // the client stops there, so only the deadline ends it with a
        // timeout (a per-read timeout would end it at EOF instead).
        let slowloris = |c: TcpStream| {
            for byte in bytemuck::bytes_of(&header) {
                if (&c).write_all(&[*byte]).is_err() {
                    break;
                }
                std::thread::sleep(DRIBBLE);
            }
        };
        let began = Instant::now();
        let ((), server) = run(slowloris, |mut s| {
            server_handshake(&mut s, &key(1), Instant::now() + SERVER_DEADLINE, |_| {
                Ok([0; FIELD_LEN])
            })
        });
        assert!(matches!(server, Err(Error::Timeout { timeout_ms }) if timeout_ms <= 1000));
        assert!(
            began.elapsed() < TEST_DEADLINE,
            "took {:?}",
            began.elapsed()
        );
    }

    /// What the server makes of `bytes` from a client that then stops
    /// sending.
    fn server_on(bytes: Vec<u8>) -> Result<Role> {
        let raw = move |c: TcpStream| {
            let _ = (&c).write_all(&bytes);
            let _ = c.shutdown(Shutdown::Write);
            // Keep reading until the server is done, so its refusal is
            // not met by a reset.
            let _ = c.set_read_timeout(Some(TEST_DEADLINE));
            let _ = std::io::copy(&mut &c, &mut std::io::sink());
        };
        run(raw, |s| serve(&key(1), s, [1; FIELD_LEN])).1
    }

    fn frame_bytes(header: FrameHeader, body: AuthBody, text: &[u8]) -> Vec<u8> {
        let mut out = bytemuck::bytes_of(&header).to_vec();
        out.extend_from_slice(bytemuck::bytes_of(&body));
        out.extend_from_slice(text);
        out
    }

    fn response_body() -> AuthBody {
        AuthBody {
            step: step::RESPONSE,
            code: role::START,
            ..AuthBody::zeroed()
        }
    }

    #[test]
    fn garbage_from_a_client_is_an_error() {
        let random_bytes: [u8; 300] = random().unwrap();
        assert!(server_on(random_bytes.to_vec()).is_err());
        let header = bytemuck::bytes_of(&FrameHeader::new(kind::AUTH, AUTH_BODY_LEN + 5)).to_vec();
        assert!(matches!(
            server_on(header[..20].to_vec()),
            Err(Error::Disconnected)
        ));
        let huge = FrameHeader {
            payload_len: 100 << 30,
            ..FrameHeader::new(kind::AUTH, 0)
        };
        let huge = bytemuck::bytes_of(&huge).to_vec();
        assert!(matches!(server_on(huge), Err(Error::Protocol(m)) if m.contains("bytes")));
        let wrong_step = AuthBody {
            step: step::ACCEPT,
            code: 0,
            ..AuthBody::zeroed()
        };
        let wrong_step = frame_bytes(FrameHeader::new(kind::AUTH, AUTH_BODY_LEN), wrong_step, b"");
        assert!(matches!(server_on(wrong_step), Err(Error::Protocol(m)) if m.contains("RESPONSE")));
        let reserved = AuthBody {
            reserved: 1,
            ..response_body()
        };
        let reserved = frame_bytes(
            FrameHeader::new(kind::AUTH, AUTH_BODY_LEN + 5),
            reserved,
            b"train",
        );
        assert!(matches!(server_on(reserved), Err(Error::Protocol(m)) if m.contains("reserved")));
        let long = frame_bytes(
            FrameHeader::new(kind::AUTH, AUTH_BODY_LEN + 1025),
            response_body(),
            &[b'a'; 1025],
        );
        assert!(matches!(server_on(long), Err(Error::Protocol(_))));
    }

    #[test]
    fn garbage_from_a_server_is_an_error() {
        let bad_challenge = |s: TcpStream| {
            let mut challenge = AuthFrame::challenge([1; FIELD_LEN]);
            challenge.body.token = [1; FIELD_LEN];
            (&s).write_all(&challenge.encode())
        };
        let (client, server) = run(|c| connect(&key(1), c, &start("train")), bad_challenge);
        server.unwrap();
        assert!(matches!(client, Err(Error::Protocol(m)) if m.contains("token")));
    }

    #[test]
    fn a_busy_server_may_refuse_before_its_challenge() {
        let busy = |s: TcpStream| {
            let refusal = AuthFrame::refuse(&Refusal::busy("64 workers already run here"));
            (&s).write_all(&refusal.encode())
        };
        let (client, server) = run(|c| connect(&key(1), c, &start("train")), busy);
        server.unwrap();
        assert!(
            matches!(client, Err(Error::Refused { reason, .. }) if reason.contains("64 workers"))
        );
    }

    #[test]
    fn every_field_is_checked() {
        let parse = |frame: &AuthFrame| parse_auth_frame(&frame.encode()[HEADER_LEN..]);
        let good = AuthFrame::response(&key(1), &[0; 32], [1; 32], &start("train"));
        assert_eq!(parse(&good).unwrap(), good);
        let patches: [fn(&mut AuthFrame); 9] = [
            |f| f.body.step = 9,
            |f| f.body.code = 3,
            |f| f.body.reserved = 1,
            |f| f.body.token = [1; 32],
            |f| f.text = String::new(),
            |f| f.text = "x".repeat(MAX_ENTRY_BYTES + 1),
            |f| *f = AuthFrame::challenge([1; 32]).with_mac(),
            |f| *f = AuthFrame::refuse(&Refusal::session()).with_nonce(),
            |f| {
                *f = AuthFrame::refuse(&Refusal {
                    code: 6,
                    text: String::new(),
                })
            },
        ];
        for patch in patches {
            let mut bad = good.clone();
            patch(&mut bad);
            assert!(matches!(parse(&bad), Err(Error::Protocol(_))), "{bad:?}");
        }
        let mut not_utf8 = good.encode()[HEADER_LEN..].to_vec();
        *not_utf8.last_mut().unwrap() = 0xff;
        assert!(parse_auth_frame(&not_utf8).is_err());
    }

    impl AuthFrame {
        fn with_mac(mut self) -> AuthFrame {
            self.body.mac = [1; 32];
            self
        }

        fn with_nonce(mut self) -> AuthFrame {
            self.body.nonce = [1; 32];
            self
        }
    }

    #[test]
    fn auth_headers_are_checked() {
        let ok = FrameHeader::new(kind::AUTH, AUTH_BODY_LEN);
        assert_eq!(check_auth_header(&ok).unwrap(), AUTH_BODY_LEN);
        let patches: [fn(&mut FrameHeader); 8] = [
            |h| h.magic = 0,
            |h| h.version = 1,
            |h| h.kind = kind::HELLO,
            |h| h.attachments = 1,
            |h| h.type_id = 1,
            |h| h.data_len = 1,
            |h| h.payload_len = AUTH_BODY_LEN as u64 - 1,
            |h| h.payload_len = MAX_AUTH_PAYLOAD as u64 + 1,
        ];
        for patch in patches {
            let mut bad = ok;
            patch(&mut bad);
            assert!(
                matches!(check_auth_header(&bad), Err(Error::Protocol(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn long_refusals_are_cut_on_a_char_boundary() {
        let frame = AuthFrame::refuse(&Refusal::busy("é".repeat(MAX_AUTH_TEXT)));
        assert!(frame.text.len() <= MAX_AUTH_TEXT && frame.text.len() % 2 == 0);
        assert!(frame.encode().len() <= MAX_AUTH_FRAME);
        assert_eq!(
            parse_auth_frame(&frame.encode()[HEADER_LEN..]).unwrap(),
            frame
        );
    }

    #[test]
    fn keys_shorter_than_the_minimum_are_refused() {
        assert!(matches!(Key::new("short"), Err(Error::Auth(m)) if m.contains("too short")));
        assert!(Key::new([0; MIN_KEY_BYTES]).is_ok());
    }

    #[test]
    fn generated_keys_are_hex_and_differ() {
        let (a, b) = (Key::generate().unwrap(), Key::generate().unwrap());
        assert_eq!(a.reveal().len(), 2 * GENERATED_KEY_BYTES);
        assert!(
            a.reveal()
                .iter()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        );
        assert_ne!(a.reveal(), b.reveal());
    }

    #[test]
    fn debug_never_shows_the_key() {
        let k = Key::new("sup3r-s3cret-k3y-bytes").unwrap();
        let shown = format!("{k:?} {:?}", Some(k.clone()));
        assert!(
            !shown.contains("s3cret") && shown.contains("Key(..)"),
            "{shown}"
        );
    }

    /// A file of its own for each test, removed when dropped.
    struct TempFile(std::path::PathBuf);

    impl TempFile {
        fn new(content: &str, mode: u32) -> TempFile {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let name = format!("miniray-key-test-{}-{n}", std::process::id());
            let file = TempFile(std::env::temp_dir().join(name));
            std::fs::write(&file.0, content).unwrap();
            let mode = std::fs::Permissions::from_mode(mode);
            std::fs::set_permissions(&file.0, mode).unwrap();
            file
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    #[test]
    fn key_files_must_be_private_and_lose_one_newline() {
        let open = TempFile::new("0123456789abcdef\n", 0o644);
        let err = Key::from_file(&open.0).unwrap_err().to_string();
        assert!(
            err.contains("chmod 600") && err.contains(&*open.0.to_string_lossy()),
            "{err}"
        );
        let private = TempFile::new("0123456789abcdef\n\n", 0o600);
        assert_eq!(
            Key::from_file(&private.0).unwrap().reveal(),
            b"0123456789abcdef\n"
        );
        let missing = private.0.with_extension("missing");
        let err = Key::from_file(&missing).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    #[test]
    fn the_environment_gives_the_key_or_its_file() {
        let file = TempFile::new("fedcba9876543210\n", 0o600);
        let given = |key: Option<&str>, file: Option<&Path>| {
            from_env_vars(key.map(Into::into), file.map(Into::into))
        };
        let direct = given(Some("0123456789abcdef"), Some(&file.0)).unwrap();
        assert_eq!(direct.reveal(), b"0123456789abcdef");
        assert_eq!(
            given(None, Some(&file.0)).unwrap().reveal(),
            b"fedcba9876543210"
        );
        let none = given(None, None).unwrap_err().to_string();
        assert!(
            none.contains(ENV_KEY) && none.contains(ENV_KEY_FILE),
            "{none}"
        );
        let short = given(Some("short"), None).unwrap_err().to_string();
        assert!(
            short.starts_with(&format!("authentication failed: {ENV_KEY}:")),
            "{short}"
        );
    }

    proptest! {
        #[test]
        fn parsing_arbitrary_payloads_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..MAX_AUTH_PAYLOAD + 16)) {
            let _ = parse_auth_frame(&bytes);
        }

        #[test]
        fn checking_arbitrary_headers_never_panics(bytes in any::<[u8; HEADER_LEN]>()) {
            let header: FrameHeader = bytemuck::pod_read_unaligned(&bytes);
            if let Ok(len) = check_auth_header(&header) {
                prop_assert!(len <= MAX_AUTH_PAYLOAD);
            }
        }

        #[test]
        fn a_valid_frame_with_one_byte_changed_never_panics(at in 0..AUTH_BODY_LEN + 5, to in any::<u8>()) {
            let mut bytes = AuthFrame::response(&key(1), &[0; 32], [1; 32], &start("train")).encode();
            bytes[HEADER_LEN + at] = to;
            let _ = parse_auth_frame(&bytes[HEADER_LEN..]);
        }
    }
}
