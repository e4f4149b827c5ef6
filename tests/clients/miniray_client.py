#!/usr/bin/env python3
# python3 tests/clients/miniray_client.py ADDR KEY [--expect-refused KEY]
#
# A MiniRay client in another language, written from docs/PROTOCOL.md alone
# (Python standard library only). It starts remote workers on the server at
# ADDR (host:port), proving KEY, and checks every byte it gets back against
# the document: the handshake (both MACs, the refusal codes), the HELLOs,
# typed messages (u64, String, Vec<u8>), attachments as bytes in the stream,
# EXIT, CLOSE, KILL and STATUS. The server's binary must register the entry
# points `double`, `echo_string`, `reverse_bytes` and `tensor_sum` (see
# tests/foreign_client.rs, which runs this script).
#
# With --expect-refused KEY it only asks for a worker and succeeds if the
# server answers REFUSE with code KEY (run it with a wrong key).
#
# Exits 0 when every check passed, 1 at the first mismatch (saying which).

import hashlib
import hmac
import os
import socket
import struct
import sys

# -- constants, from docs/PROTOCOL.md ----------------------------------------

MAGIC = b"MRAY"
VERSION = 2
HEADER_LEN = 48
DESC_LEN = 112
HELLO_LEN = 48
AUTH_BODY_LEN = 112
MAX_AUTH_TEXT = 1024

MESSAGE, HELLO, EXIT, CLOSE, AUTH, STATUS, KILL, ENV = 1, 2, 3, 4, 5, 6, 7, 8
CHALLENGE, RESPONSE, ACCEPT, REFUSE = 1, 2, 3, 4
START, ATTACH = 1, 2
REFUSALS = {1: "KEY", 2: "ENTRY", 3: "BUSY", 4: "SESSION", 5: "REQUEST"}
STATUS_EXITED, STATUS_SIGNALED = 1, 2

FEATURE_FDS, FEATURE_INLINE_DATA, FEATURE_AUTH = 1, 2, 4
ATTACH_STREAM = 3
DTYPE_BYTES, DTYPE_U64 = 0, 11

CLIENT_LABEL = b"MINIRAY-AUTH-CLIENT-V2"
SERVER_LABEL = b"MINIRAY-AUTH-SERVER-V2"

# This client's limits, told to the worker in its HELLO (the defaults).
MAX_PAYLOAD_BYTES = 1 << 30
MAX_ATTACHMENTS = 64
MAX_REGION_BYTES = 64 << 30
MAX_DEPTH = 128

# Every blocking socket call gives up after this: a correct run takes
# milliseconds per step.
STEP_TIMEOUT_S = 20
# The liveness bound and the socket options it gives (docs: Liveness).
KEEPIDLE_S, KEEPINTVL_S, KEEPCNT, USER_TIMEOUT_MS = 4, 3, 3, 10000


class Mismatch(Exception):
    """What the server or worker sent differs from what the document says."""


def check(cond, what):
    if not cond:
        raise Mismatch(what)


# -- fingerprints and rkyv payloads -------------------------------------------


def fingerprint(type_name):
    """FNV-1a 64 of the Rust type name; 0 is sent as 1."""
    h = 0xCBF29CE484222325
    for b in type_name.encode():
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return max(h, 1)


FP_U64 = fingerprint("u64")
FP_UNIT = fingerprint("()")
FP_STRING = fingerprint("alloc::string::String")
FP_VEC_U8 = fingerprint("alloc::vec::Vec<u8>")
FP_U64_PAIR = fingerprint("(u64, u64)")


def pad4(b):
    return b + bytes(-len(b) % 4)


def enc_u64(v):
    return struct.pack("<Q", v)


def dec_u64(p):
    check(len(p) == 8, f"a u64 archive of {len(p)} bytes")
    return struct.unpack("<Q", p)[0]


def enc_string(s):
    b = s.encode()
    if len(b) <= 8:
        return b + b"\xff" * (8 - len(b))
    text = pad4(b)
    n = len(b)
    field = (n & 0x3F) | 0x80 | ((n & ~0x3F) << 2)
    return text + struct.pack("<Ii", field, -len(text))


def dec_string(p):
    check(len(p) >= 8, f"a String archive of {len(p)} bytes")
    at = len(p) - 8
    root = p[at:]
    if root[0] & 0xC0 != 0x80:
        end = root.find(b"\xff")
        return root[: 8 if end < 0 else end].decode()
    field, offset = struct.unpack("<Ii", root)
    n = (field & 0x3F) | ((field & ~0xFF) >> 2)
    start = at + offset
    check(n > 8 and 0 <= start and start + n <= at, f"out-of-line string {n} at {start}")
    return p[start : start + n].decode()


def enc_vec_u8(b):
    if not b:
        return struct.pack("<iI", 0, 0)
    elems = pad4(b)
    return elems + struct.pack("<iI", -len(elems), len(b))


def dec_vec_u8(p):
    check(len(p) >= 8, f"a Vec<u8> archive of {len(p)} bytes")
    at = len(p) - 8
    offset, n = struct.unpack("<iI", p[at:])
    start = at + offset
    check(n == 0 or (0 <= start and start + n <= at), f"vector of {n} at {start}")
    return p[start : start + n] if n else b""


# -- frames --------------------------------------------------------------------


def header(kind, payload_len=0, attachments=0, type_id=0, data_len=0):
    return MAGIC + struct.pack(
        "<HHIIQQQQ", VERSION, kind, attachments, 0, payload_len, type_id, data_len, 0
    )


def parse_header(b):
    magic = b[:4]
    version, kind, attachments, flags, payload_len, type_id, data_len, reserved = (
        struct.unpack("<HHIIQQQQ", b[4:])
    )
    check(magic == MAGIC and version == VERSION, f"header {b[:8].hex()}")
    check(flags == 0 and reserved == 0, "non-zero reserved header fields")
    return dict(kind=kind, attachments=attachments, payload_len=payload_len,
                type_id=type_id, data_len=data_len)


ELEMENT_BYTES = {1: 2, 2: 2, 3: 4, 4: 8, 5: 1, 6: 1, 7: 2, 8: 2, 9: 4, 10: 4, 11: 8, 12: 8}


def parse_desc(b):
    """A TCP attachment descriptor, checked: (dtype, shape, len_bytes)."""
    kind, dtype, ndim, slot, flags, seat, length, pool_id, reserved = struct.unpack(
        "<IIIIIIQQQ", b[:48])
    shape = list(struct.unpack("<8Q", b[48:]))
    check(kind == ATTACH_STREAM, f"attachment kind {kind} on TCP")
    check(slot == flags == seat == pool_id == reserved == 0, "non-zero unused descriptor fields")
    check(ndim <= 8 and not any(shape[ndim:]), f"shape {shape} past ndim {ndim}")
    if dtype != DTYPE_BYTES:
        check(dtype in ELEMENT_BYTES, f"unknown dtype {dtype}")
        count = 1
        for d in shape[:ndim]:
            count *= d
        check(count * ELEMENT_BYTES[dtype] == length, f"tensor {shape[:ndim]} of {length} bytes")
    return dtype, shape[:ndim], length


def recv_exact(sock, n):
    """n bytes, or fewer if the stream ended first."""
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def recv_all(sock, n, what):
    b = recv_exact(sock, n)
    check(len(b) == n, f"the stream ended in {what} ({len(b)} of {n} bytes)")
    return b


def expect_eof(sock, what):
    """The peer closed: no further byte. Returns how it closed."""
    try:
        rest = sock.recv(1)
    except ConnectionResetError:
        return "reset"
    check(rest == b"", f"{what}: a byte after the end: {rest.hex()}")
    return "eof"


# -- the handshake -------------------------------------------------------------


def auth_frame(step, code=0, nonce=bytes(32), mac=bytes(32), token=bytes(32), text=b""):
    body = struct.pack("<IIQ", step, code, 0) + nonce + mac + token
    return header(AUTH, AUTH_BODY_LEN + len(text)) + body + text


def recv_auth(sock):
    h = parse_header(recv_all(sock, HEADER_LEN, "an AUTH header"))
    check(h["kind"] == AUTH, f"frame of kind {h['kind']} during the handshake")
    check(h["attachments"] == 0 and h["type_id"] == 0 and h["data_len"] == 0,
          "an AUTH header with non-zero unused fields")
    n = h["payload_len"]
    check(AUTH_BODY_LEN <= n <= AUTH_BODY_LEN + MAX_AUTH_TEXT, f"AUTH payload of {n} bytes")
    p = recv_all(sock, n, "an AUTH payload")
    step, code, reserved = struct.unpack("<IIQ", p[:16])
    check(reserved == 0, "AUTH reserved field not zero")
    return dict(step=step, code=code, nonce=p[16:48], mac=p[48:80], token=p[80:112],
                text=p[112:].decode())


def client_mac(key, ns, nc, code, token, text):
    msg = CLIENT_LABEL + ns + nc + struct.pack("<I", code) + token + text
    return hmac.new(key, msg, hashlib.sha256).digest()


def server_mac(key, ns, nc, token):
    return hmac.new(key, SERVER_LABEL + nc + ns + token, hashlib.sha256).digest()


class Refused(Exception):
    def __init__(self, code, text):
        super().__init__(f"REFUSE {REFUSALS.get(code, code)}: {text}")
        self.code, self.text = code, text


def tune(sock):
    """The socket options of docs: Liveness, and a bound on every call."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPIDLE_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPINTVL_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPCNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    sock.settimeout(STEP_TIMEOUT_S)


def handshake(addr, key, role, entry=b"", token=bytes(32)):
    """A new connection, authenticated: (socket, token from the ACCEPT).
    Raises Refused for a REFUSE (the connection is checked closed after it)."""
    sock = socket.create_connection(addr, timeout=STEP_TIMEOUT_S)
    tune(sock)
    challenge = recv_auth(sock)
    if challenge["step"] == REFUSE:
        raise refused(sock, challenge)
    check(challenge["step"] == CHALLENGE, f"step {challenge['step']} instead of CHALLENGE")
    check(challenge["code"] == 0 and challenge["mac"] == bytes(32)
          and challenge["token"] == bytes(32) and challenge["text"] == "",
          "a CHALLENGE with fields it does not use")
    ns, nc = challenge["nonce"], os.urandom(32)
    mac = client_mac(key, ns, nc, role, token, entry)
    sock.sendall(auth_frame(RESPONSE, role, nc, mac, token, entry))
    reply = recv_auth(sock)
    if reply["step"] == REFUSE:
        raise refused(sock, reply)
    check(reply["step"] == ACCEPT, f"step {reply['step']} instead of ACCEPT or REFUSE")
    check(reply["code"] == 0 and reply["nonce"] == bytes(32) and reply["text"] == "",
          "an ACCEPT with fields it does not use")
    expected = server_mac(key, ns, nc, reply["token"])
    check(hmac.compare_digest(expected, reply["mac"]), "the server's MAC does not verify")
    check(role != ATTACH or reply["token"] == token, "an ACCEPT of another session's token")
    return sock, reply["token"]


def refused(sock, frame):
    check(frame["nonce"] == bytes(32) and frame["mac"] == bytes(32)
          and frame["token"] == bytes(32), "a REFUSE with a nonce, MAC or token")
    check(frame["code"] in REFUSALS, f"unknown refusal code {frame['code']}")
    expect_eof(sock, "after a REFUSE")
    sock.close()
    return Refused(frame["code"], frame["text"])


# -- a remote worker -------------------------------------------------------------


class Worker:
    """A remote worker: its control and data connections, HELLOs exchanged."""

    def __init__(self, addr, key, entry):
        self.control, token = handshake(addr, key, START, entry.encode())
        # The worker's environment: one variable, which the entry can read.
        env = b"MINIRAY_FROM_PYTHON=1\0"
        self.control.sendall(header(ENV, len(env)) + env)
        self.token = token
        self.data, _ = handshake(addr, key, ATTACH, token=token)
        hello = struct.pack("<QQIIQIIQ", FEATURE_INLINE_DATA | FEATURE_AUTH,
                            MAX_PAYLOAD_BYTES, MAX_ATTACHMENTS, os.getpid(),
                            MAX_REGION_BYTES, MAX_DEPTH, 0, 0)
        self.data.sendall(header(HELLO, HELLO_LEN) + hello)
        self.pid = self.recv_hello()

    def recv_hello(self):
        h = parse_header(recv_all(self.data, HEADER_LEN, "the worker's HELLO"))
        check(h["kind"] == HELLO and h["payload_len"] == HELLO_LEN
              and h["attachments"] == 0 and h["type_id"] == 0 and h["data_len"] == 0,
              f"first frame {h} is not a HELLO")
        (features, max_payload, max_attachments, pid, max_region, max_depth,
         reserved, reserved2) = struct.unpack("<QQIIQIIQ", recv_all(self.data, HELLO_LEN, "HELLO"))
        check(reserved == 0 and reserved2 == 0 and max_depth >= 1, "bad HELLO reserved fields")
        check(features & (FEATURE_INLINE_DATA | FEATURE_AUTH) == FEATURE_INLINE_DATA | FEATURE_AUTH
              and not features & FEATURE_FDS, f"a TCP worker's features {features:#x}")
        check(max_payload == MAX_PAYLOAD_BYTES and max_attachments == MAX_ATTACHMENTS
              and max_region == MAX_REGION_BYTES and max_depth == MAX_DEPTH,
              "the worker's limits are not the defaults")
        check(pid != 0, "the worker's HELLO has no pid")
        return pid

    def send(self, payload, type_id, attachments=()):
        """A MESSAGE; attachments are (dtype, shape, bytes)."""
        descs = b""
        for dtype, shape, data in attachments:
            dims = list(shape) + [0] * (8 - len(shape))
            descs += struct.pack("<IIIIIIQQQ", ATTACH_STREAM, dtype, len(shape), 0, 0, 0,
                                 len(data), 0, 0) + struct.pack("<8Q", *dims)
        data_len = sum(len(d) for _, _, d in attachments)
        frame = header(MESSAGE, len(payload), len(attachments), type_id, data_len)
        self.data.sendall(frame + descs + payload + b"".join(d for _, _, d in attachments))

    def recv(self):
        """The next frame: (kind, type_id, payload, [(dtype, shape, bytes)])."""
        h = parse_header(recv_all(self.data, HEADER_LEN, "a frame header"))
        kind, n = h["kind"], h["attachments"]
        check(kind in (MESSAGE, EXIT, CLOSE), f"frame of kind {kind} on the data connection")
        check(kind == MESSAGE or (n == 0 and h["type_id"] == 0 and h["data_len"] == 0),
              f"a control frame {h} with message fields")
        check(h["payload_len"] <= MAX_PAYLOAD_BYTES and n <= MAX_ATTACHMENTS, f"limits: {h}")
        descs = [parse_desc(recv_all(self.data, DESC_LEN, "a descriptor")) for _ in range(n)]
        check(sum(d[2] for d in descs) == h["data_len"], "data_len is not the descriptors' sum")
        payload = recv_all(self.data, h["payload_len"], "a payload")
        parts = [(dtype, shape, recv_all(self.data, length, "attachment bytes"))
                 for dtype, shape, length in descs]
        return kind, h["type_id"], payload, parts

    def recv_message(self, type_id):
        kind, got_type, payload, parts = self.recv()
        check(kind == MESSAGE, f"frame of kind {kind} instead of a MESSAGE")
        check(got_type == type_id, f"type_id {got_type:#x} instead of {type_id:#x}")
        return payload, parts

    def recv_exit(self):
        kind, _, payload, _ = self.recv()
        check(kind == EXIT and len(payload) >= 8, f"frame of kind {kind} instead of EXIT")
        code, reserved = struct.unpack("<iI", payload[:8])
        check(reserved == 0, "EXIT reserved field not zero")
        return code, payload[8:].decode(errors="replace")

    def close(self):
        """CLOSE, then the half-close that goes with it."""
        self.data.sendall(header(CLOSE))
        self.data.shutdown(socket.SHUT_WR)

    def kill(self):
        self.control.sendall(header(KILL))

    def status(self):
        """The STATUS frame, and the control connection's end after it."""
        frame = recv_all(self.control, HEADER_LEN + 8, "the STATUS frame")
        check(frame[:HEADER_LEN] == header(STATUS, 8), f"STATUS header {frame[:48].hex()}")
        how, value = struct.unpack("<Ii", frame[HEADER_LEN:])
        check(how in (STATUS_EXITED, STATUS_SIGNALED), f"STATUS how {how}")
        ended = expect_eof(self.control, "after STATUS")
        return (how, value), ended

    def finish(self, expected_status):
        """The worker's data connection ends, then its STATUS is as expected."""
        expect_eof(self.data, "the data connection at the worker's end")
        status, ended = self.status()
        check(status == expected_status, f"STATUS {status} instead of {expected_status}")
        self.data.close()
        self.control.close()
        return ended


# -- the scenarios -----------------------------------------------------------------


def doubles(addr, key):
    w = Worker(addr, key, "double")
    values = [0, 1, 21, 1 << 40, (1 << 63) + 5]
    for i, v in enumerate(values):
        w.send(enc_u64(v), FP_U64 if i % 2 == 0 else 0)  # typed and untyped
        payload, parts = w.recv_message(FP_U64)
        got = dec_u64(payload)
        check(got == (2 * v) & 0xFFFFFFFFFFFFFFFF and not parts, f"{v} doubled is {got}")
    # The token was used once; it opens nothing now.
    try:
        handshake(addr, key, ATTACH, token=w.token)
        raise Mismatch("a second ATTACH with a used token was accepted")
    except Refused as r:
        check(r.code == 4, f"a used token got {r}, not SESSION")
    w.close()
    w.finish((STATUS_EXITED, 0))
    return f"{len(values)} u64 doubled (typed and untyped), CLOSE, STATUS exited 0; a used token is SESSION"


def strings(addr, key):
    w = Worker(addr, key, "echo_string")
    texts = ["", "hi", "abcdefgh", "abcdefghi", "héllo wörld, ünïcode ✓", "x" * 1000]
    for t in texts:
        w.send(enc_string(t), FP_STRING)
        payload, _ = w.recv_message(FP_STRING)
        check(payload == enc_string(t), f"{t!r} came back as {payload.hex()}")
        check(dec_string(payload) == t, f"{t!r} decoded as {dec_string(payload)!r}")
    w.close()
    w.finish((STATUS_EXITED, 0))
    return f"{len(texts)} strings, inline and out of line, byte for byte as rkyv writes them"


def vectors(addr, key):
    w = Worker(addr, key, "reverse_bytes")
    for b in [b"", b"\x01\x02\x03", bytes(range(256)) * 4 + b"\x07"]:
        w.send(enc_vec_u8(b), FP_VEC_U8)
        payload, _ = w.recv_message(FP_VEC_U8)
        check(payload == enc_vec_u8(b[::-1]), f"Vec<u8> of {len(b)} came back as {payload[-8:].hex()}")
        check(dec_vec_u8(payload) == b[::-1], f"Vec<u8> of {len(b)} not reversed")
    w.close()
    w.finish((STATUS_EXITED, 0))
    return "3 Vec<u8> reversed"


def tensors(addr, key):
    w = Worker(addr, key, "tensor_sum")
    for shape in ([512], [16, 64]):
        count = 1
        for d in shape:
            count *= d
        xs = [(i * 2654435761) & 0xFFFFFFFFFFFF for i in range(count)]
        tensor = struct.pack(f"<{count}Q", *xs)
        raw = os.urandom(3000)
        w.send(b"", FP_UNIT, [(DTYPE_U64, shape, tensor), (DTYPE_BYTES, [], raw)])
        payload, parts = w.recv_message(FP_U64_PAIR)
        check(len(payload) == 16, f"a (u64, u64) archive of {len(payload)} bytes")
        check(struct.unpack("<QQ", payload) == (sum(xs), sum(raw)), "the sums are wrong")
        check(parts == [(DTYPE_U64, shape, tensor), (DTYPE_BYTES, [], raw[::-1])],
              f"attachments came back as {[(d, s, len(b)) for d, s, b in parts]}")
    w.close()
    w.finish((STATUS_EXITED, 0))
    return "a u64 tensor (4 KiB, then 8 KiB 2-D) and 3000 plain bytes, summed and sent back"


def type_mismatch(addr, key):
    w = Worker(addr, key, "double")
    w.send(enc_u64(4), FP_U64)
    check(dec_u64(w.recv_message(FP_U64)[0]) == 8, "4 doubled")
    w.send(enc_u64(4), FP_STRING)  # a u64 under String's fingerprint
    code, text = w.recv_exit()
    check(code == 1 and "`u64`" in text, f"EXIT {code} {text!r}")
    w.finish((STATUS_EXITED, 1))
    return "a wrong fingerprint is the worker's error: EXIT 1, STATUS exited 1"


def bad_bytes(addr, key):
    w = Worker(addr, key, "double")
    w.data.sendall(b"AAAA" + bytes(44))
    code, text = w.recv_exit()
    check(code == 1 and "magic" in text, f"EXIT {code} {text!r}")
    w.finish((STATUS_EXITED, 1))
    return "a bad magic ends the worker: EXIT 1 naming it, STATUS exited 1"


def kill(addr, key):
    w = Worker(addr, key, "double")
    w.send(enc_u64(1), FP_U64)
    check(dec_u64(w.recv_message(FP_U64)[0]) == 2, "1 doubled")
    w.kill()
    ended = w.finish((STATUS_SIGNALED, 9))
    return f"KILL: no EXIT, STATUS signal 9, control then ended by {ended}"


def drop_control(addr, key):
    w = Worker(addr, key, "double")
    w.send(enc_u64(1), FP_U64)
    check(dec_u64(w.recv_message(FP_U64)[0]) == 2, "1 doubled")
    w.control.close()
    expect_eof(w.data, "the data connection of a worker whose control connection closed")
    w.data.close()
    return "closing the control connection kills the worker (its data connection ends)"


def refusals(addr, key):
    cases = [
        ("START of an unknown entry", dict(role=START, entry=b"no_such_entry"), 2),
        ("ATTACH with an unknown token", dict(role=ATTACH, token=os.urandom(32)), 4),
        ("START with a token", dict(role=START, entry=b"double", token=b"\x01" * 32), 5),
    ]
    for what, args, code in cases:
        try:
            sock, _ = handshake(addr, key, **args)
            sock.close()
            raise Mismatch(f"{what} was accepted")
        except Refused as r:
            check(r.code == code, f"{what}: {r}, expected {REFUSALS[code]}")
    return "unknown entry is ENTRY, unknown token SESSION, malformed request REQUEST"


def self_test():
    """The document's test vector and fingerprints, before any connection."""
    key, ns, nc, tok = b"0123456789abcdef" * 2, b"\x11" * 32, b"\x22" * 32, b"\x33" * 32
    vectors_hex = [
        (client_mac(key, ns, nc, START, bytes(32), b"double"),
         "e917afd49794b0ac6565be6bce7c526d75901bc2568c67c16c16edc7270bb807"),
        (client_mac(key, ns, nc, ATTACH, tok, b""),
         "a934dab0bd45a4381a5249ff40932aa2f006d221a6d856026ef8c30bde42fe24"),
        (server_mac(key, ns, nc, tok),
         "3ccfd6171e5b00b1ac425dcdd624b5b14b8a0a27b5921782d037b0f438bd8166"),
    ]
    for got, want in vectors_hex:
        check(got.hex() == want, f"HMAC test vector {got.hex()}")
    check(FP_U64 == 0x4D35D3193E8D66F2 and FP_STRING == 0x76E26E9121E02E46, "fingerprints")
    check(enc_string("abcdefghi").hex() == "616263646566676869000000" "89000000f4ffffff", "String")
    return "the document's HMAC test vectors and fingerprints"


SCENARIOS = [self_test, doubles, strings, vectors, tensors, type_mismatch, bad_bytes, kill,
             drop_control, refusals]


def expect_refused(addr, key, name):
    want = {v: k for k, v in REFUSALS.items()}[name]
    try:
        sock, _ = handshake(addr, key, START, b"double")
        sock.close()
    except Refused as r:
        check(r.code == want, f"{r}, expected {name}")
        print(f"ok: the server answered REFUSE {name} ({r.text!r}) and closed the connection")
        return
    raise Mismatch(f"the server accepted; expected REFUSE {name}")


def main(argv):
    if len(argv) not in (3, 5) or (len(argv) == 5 and argv[3] != "--expect-refused"):
        print(f"usage: {argv[0]} HOST:PORT KEY [--expect-refused KEY|ENTRY|...]", file=sys.stderr)
        return 2
    host, _, port = argv[1].rpartition(":")
    addr, key = (host.strip("[]"), int(port)), argv[2].encode()
    try:
        if len(argv) == 5:
            expect_refused(addr, key, argv[4])
            return 0
        for scenario in SCENARIOS:
            what = scenario() if scenario is self_test else scenario(addr, key)
            print(f"ok {scenario.__name__}: {what}", flush=True)
    except (Mismatch, Refused, OSError, UnicodeDecodeError) as err:
        print(f"FAIL: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"miniray_client: all {len(SCENARIOS)} scenarios passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
