"""Hostile input at the DICOM edge: connect/close bursts, silent and truncated connections,
too many associations from one address, malformed PDUs over raw sockets. Each case asserts the
exact answer (A-ASSOCIATE-RJ or A-ABORT bytes, PS3.8 9.3) and that the server closes the
connection; the log holds one line per such peer and no traceback; the server still serves
C-ECHO and C-STORE afterwards and the instances stored before are byte-identical.

One `pacsbridge serve` for the module, with two DIMSE processes (the main one accepts every
connection and counts it per address, then hands about half to the other), the ARTIM timer at
1.5 s, a maximum PDU size of 64 KiB and an ACSE timeout far longer than the socket waits here:
a connection the server only closed at the ACSE timeout fails these tests. Peers are told apart
by source address: the loopback network is 127.0.0.0/8, so a client can bind 127.0.0.2,
127.0.0.3... The acceptor's parts that no peer can reach on purpose (an error inside the
association thread, descriptors above 1024, the refusing thread, the hand-over to the other
process) are driven in-process at the end.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.reduction import send_handle
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from archive import Archive
from config import Settings
from dicom_node import DimseServer
from dicom_node.acceptor import AddressLimiter, ConnectionRefuser
from dicom_node.pdata import c_store_request_command, pdata_pdus, plain_store_response_status
from pacsbridge.dimse_pool import receive_connections
from tests.conftest import RunningServer, _backend, require_tool, start_server
from tests.dicom_factory import write_series

ARTIM = 1.5
#: The network timeout: how long the server waits for the rest of a PDU during an association.
NETWORK_TIMEOUT = 6
#: Open associations one address may have.
LIMIT = 4
#: The largest PDU the server announces (PS3.8 D.1), and its listen backlog.
MAX_PDU = 65536
BACKLOG = 300
#: Long enough that a server that never closes fails the test rather than hanging it, and
#: shorter than the ACSE timeout (pynetdicom's wait for an A-ASSOCIATE-RQ).
SOCKET_WAIT = 20.0
ACSE_TIMEOUT = 120

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
VERIFICATION = b"1.2.840.10008.1.1"
CT_IMAGE_STORAGE = b"1.2.840.10008.5.1.4.1.1.2"
IMPLICIT_VR_LE = b"1.2.840.10008.1.2"
EXPLICIT_VR_LE = b"1.2.840.10008.1.2.1"

# The answers (PS3.8 9.3.4, 9.3.8).
REJECT_MALFORMED = bytes.fromhex("03 00 00000004 00 01 02 01")  # permanent, ACSE, no reason
REJECT_VERSION = bytes.fromhex("03 00 00000004 00 01 02 02")  # protocol version not supported
REJECT_CONTEXT_NAME = bytes.fromhex("03 00 00000004 00 01 01 02")  # application context name
REJECT_LOCAL_LIMIT = bytes.fromhex("03 00 00000004 00 02 03 02")  # transient, local limit
ABORT = bytes.fromhex("07 00 00000004 00 00 00 00")  # AA-1: service-user, not significant


def provider_abort(reason: int) -> bytes:
    """AA-8: an A-ABORT from the service provider with its reason (PS3.8 9.3.8, Table 9-26):
    0 not specified, 1 unrecognized PDU, 2 unexpected PDU, 6 invalid PDU parameter value."""
    return bytes.fromhex("07 00 00000004 00 00 02") + bytes([reason])


# --- PDUs, built byte for byte (PS3.8 9.3) ---------------------------------------------------
def item(item_type: int, body: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(body)) + body


def presentation_context(
    context_id: int, abstract: bytes = VERIFICATION, transfer: tuple[bytes, ...] = (IMPLICIT_VR_LE,)
) -> bytes:
    body = struct.pack(">BBBB", context_id, 0, 0, 0) + item(0x30, abstract)
    for syntax in transfer:
        body += item(0x40, syntax)
    return item(0x20, body)


def user_information(*sub_items: bytes) -> bytes:
    maximum_length = item(0x51, struct.pack(">I", 16384))
    return item(
        0x50, maximum_length + item(0x52, b"1.2.826.0.1.3680043.10.1506.9") + b"".join(sub_items)
    )


def user_identity(primary: bytes, declared: int | None = None) -> bytes:
    """A User Identity sub-item, username type (PS3.7 D.3.3.7.1); ``declared``: a primary
    field length other than the field's."""
    length = len(primary) if declared is None else declared
    return item(0x58, struct.pack(">BBH", 1, 0, length) + primary + struct.pack(">H", 0))


STANDARD_ITEMS = (item(0x10, APPLICATION_CONTEXT), presentation_context(1), user_information())


def associate_rq(*items: bytes, version: int = 1, called: bytes = b"PACSBRIDGE") -> bytes:
    items = items or STANDARD_ITEMS
    body = struct.pack(">HH", version, 0) + called.ljust(16) + b"HOSTILE".ljust(16) + bytes(32)
    body += b"".join(items)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


VALID_RQ = associate_rq()
RELEASE_RQ = pdu(0x05, bytes(4))


# --- the server ----------------------------------------------------------------------------
@dataclass
class Stored:
    files: list[Path]
    blobs: dict[str, bytes]


_addresses = (f"127.0.0.{n}" for n in itertools.count(10))


def new_address() -> str:
    """A source address no other test has used (the server counts and logs per address)."""
    return next(_addresses)


@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("hostile-dimse")
    backend = _backend("sqlite", "file", tmp, request)
    srv = start_server(
        backend,
        tmp,
        PACSBRIDGE_ARTIM_TIMEOUT=str(ARTIM),
        PACSBRIDGE_ACSE_TIMEOUT=str(ACSE_TIMEOUT),
        PACSBRIDGE_NETWORK_TIMEOUT=str(NETWORK_TIMEOUT),
        PACSBRIDGE_MAX_ASSOCIATIONS_PER_ADDRESS=str(LIMIT),
        PACSBRIDGE_MAXIMUM_PDU_SIZE=str(MAX_PDU),
        PACSBRIDGE_DIMSE_BACKLOG=str(BACKLOG),
        PACSBRIDGE_DIMSE_PROCESSES="2",
        PACSBRIDGE_WORKER_IN_SERVE="false",
    )
    try:
        yield srv
    finally:
        assert srv.stop() == 0, f"pacsbridge serve did not stop cleanly:\n{srv.log()[-3000:]}"


def _blobs(server: RunningServer) -> dict[str, bytes]:
    root = Path(server.backend.settings.data_dir) / "blobs"
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.dcm"))}


def _ae() -> AE:
    ae = AE(ae_title="HOSTILESCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = SOCKET_WAIT
    return ae


def associate(server: RunningServer, source: str, contexts: list | None = None) -> Association:
    return _ae().associate(
        "127.0.0.1",
        server.dimse_port,
        contexts=contexts or [build_context(Verification)],
        ae_title=server.ae_title,
        bind_address=(source, 0),
    )


def echo(server: RunningServer, source: str) -> int | None:
    """The status of a C-ECHO from ``source`` (None: no association)."""
    assoc = associate(server, source)
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def stored(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Stored:
    files = write_series(tmp_path_factory.mktemp("hostile-dimse-series"), 3, size=32)
    assoc = associate(server, "127.0.0.1", [build_context(CTImageStorage)])
    assert assoc.is_established
    try:
        for path in files:
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    blobs = _blobs(server)
    assert len(blobs) == 3
    return Stored(files, blobs)


@dataclass
class Exchange:
    answer: bytes
    closed: bool  # the server closed the connection (within SOCKET_WAIT)


def exchange(
    server: RunningServer | int, source: str, data: bytes, *, wait: float = SOCKET_WAIT
) -> Exchange:
    """Send ``data`` from ``source`` to the server (or a port) and read until the server closes
    the connection."""
    port = server if isinstance(server, int) else server.dimse_port
    with socket.create_connection(
        ("127.0.0.1", port), timeout=wait, source_address=(source, 0)
    ) as sock:
        if data:
            sock.sendall(data)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            return Exchange(answer, closed=False)
        except ConnectionResetError:
            pass
        return Exchange(answer, closed=True)


def recv_pdu(sock: socket.socket) -> bytes:
    data = b""
    while len(data) < 6 or len(data) < 6 + struct.unpack(">L", data[2:6])[0]:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed after {data!r}"
        data += chunk
    return data


def raw_association(server: RunningServer, source: str, request: bytes = VALID_RQ) -> socket.socket:
    """An association from ``source`` established over a raw socket (no threads here)."""
    sock = socket.create_connection(
        ("127.0.0.1", server.dimse_port), timeout=SOCKET_WAIT, source_address=(source, 0)
    )
    sock.sendall(request)
    answer = recv_pdu(sock)
    assert answer[:1] == b"\x02", answer  # A-ASSOCIATE-AC
    return sock


def release(sock: socket.socket) -> None:
    """A-RELEASE-RQ, the A-RELEASE-RP back, and the connection closed by the acceptor."""
    with sock:
        sock.sendall(RELEASE_RQ)
        assert recv_pdu(sock) == bytes.fromhex("06 00 00000004 00000000")
        assert sock.recv(10) == b""


def store_request(path: Path, max_pdu_length: int = 16384) -> bytes:
    """The P-DATA-TF PDUs of a C-STORE-RQ of a Part-10 file on presentation context 1
    (PS3.7 9.3.1, PS3.8 9.3.5), each at most ``max_pdu_length`` bytes."""
    data = path.read_bytes()
    meta_length = struct.unpack("<L", data[140:144])[0]  # (0002,0000) File Meta Group Length
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    command = c_store_request_command(
        str(ds.SOPClassUID), str(ds.SOPInstanceUID), message_id=7, priority=0
    )
    return pdata_pdus(1, command, data[144 + meta_length :], max_pdu_length)


def raw_store(sock: socket.socket, path: Path) -> int | None:
    """C-STORE of a Part-10 file on presentation context 1: the status of the response."""
    sock.sendall(store_request(path))
    return plain_store_response_status(recv_pdu(sock), 7)


def reader_holds_the_socket() -> None:
    """After a C-STORE the server's C-STORE reader takes the connection's socket from the DUL
    (dicom_node/store_receive.py) and keeps it while requests come within half a second: a
    moment's pause makes sure it has it before the next PDU arrives."""
    time.sleep(0.1)


def read_to_end(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def peer_lines(server: RunningServer, source: str) -> list[str]:
    return [
        line
        for line in server.log().splitlines()
        if re.search(rf"\bpeer={re.escape(source)}\b", line)
    ]


# --- connect/close bursts and the per-address limit -------------------------------------------
def test_connect_close_burst_leaves_other_addresses_served(server: RunningServer, stored: Stored):
    """130 connections from 127.0.0.1 that close at once while 127.0.0.2 asks for a C-ECHO:
    every one from 127.0.0.2 succeeds, the one right after the burst within a second, and
    127.0.0.1 has all its association slots back as soon as the burst is over."""
    other = "127.0.0.2"
    during: list[int | None] = []
    burst_over = threading.Event()

    def alongside() -> None:
        while not burst_over.is_set():
            during.append(echo(server, other))

    thread = threading.Thread(target=alongside)
    thread.start()
    try:
        for _ in range(130):
            socket.create_connection(("127.0.0.1", server.dimse_port)).close()
    finally:
        burst_over.set()
        thread.join()
    started = time.monotonic()
    status = echo(server, other)
    elapsed = time.monotonic() - started
    assert status == 0x0000
    assert elapsed < 1.0, f"C-ECHO from another address took {elapsed:.2f} s after the burst"
    assert during and all(s == 0x0000 for s in during), during
    # The closed connections hold nothing: the address gets its whole limit back...
    for _ in range(50):
        held = [associate(server, "127.0.0.1") for _ in range(LIMIT)]
        if all(a.is_established for a in held):
            break
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        time.sleep(0.2)
    try:
        assert [a.is_established for a in held] == [True] * LIMIT
        # ... and no more: a sender from there is told why (PS3.8 9.3.4).
        done = subprocess.run(
            [require_tool("echoscu"), "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        assert "Rejected Transient" in done.stderr + done.stdout
        assert "Local Limit Exceeded" in done.stderr + done.stdout
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    # A burst of connections is no malformed input: at most one line (the limit's) per process.
    assert len(peer_lines(server, "127.0.0.1")) <= 2


def test_associations_over_the_address_limit_are_rejected_transient(
    server: RunningServer, stored: Stored
):
    busy, other = new_address(), new_address()
    held = [raw_association(server, busy) for _ in range(LIMIT)]
    try:
        # Rejected-transient, service-provider (presentation related), local-limit-exceeded
        # (PS3.8 9.3.4), and our side closed at once. (How DCMTK reads it: the burst test.)
        answered = exchange(server, busy, VALID_RQ)
        assert answered.answer == REJECT_LOCAL_LIMIT
        assert answered.closed
        # Silent, or closed before its request: closed, nothing sent.
        assert exchange(server, busy, b"") == Exchange(b"", closed=True)
        assert exchange(server, busy, VALID_RQ[:20]) == Exchange(b"", closed=True)
        # Other addresses are not limited by it.
        assert echo(server, other) == 0x0000
    finally:
        for sock in held:
            release(sock)
    for _ in range(50):  # the slots come back as the associations end
        status = echo(server, busy)
        if status == 0x0000:
            break
        time.sleep(0.1)
    assert status == 0x0000, server.log()[-3000:]
    lines = peer_lines(server, busy)
    assert len(lines) == 1 and "too many open from this address" in lines[0], lines


# --- silent and truncated connections (ARTIM, PS3.8 9.1.5) ------------------------------------
@pytest.mark.parametrize(
    "data, logged",
    [
        (b"", None),
        (VALID_RQ[:3], "PDU header incomplete when the ARTIM timer expired"),
        (VALID_RQ[:40], "A-ASSOCIATE-RQ incomplete when the ARTIM timer expired"),
    ],
    ids=["silent", "header-cut", "request-cut"],
)
def test_silent_or_stalled_connection_is_closed_when_artim_expires(
    server: RunningServer, stored: Stored, data: bytes, logged: str | None
):
    source = new_address()
    started = time.monotonic()
    result = exchange(server, source, data)
    elapsed = time.monotonic() - started
    assert result == Exchange(b"", closed=True)  # AA-2: the connection closed, no PDU
    assert elapsed >= ARTIM * 0.9, f"closed after {elapsed:.2f} s, before the ARTIM timer"
    lines = peer_lines(server, source)
    if logged is None:
        assert lines == []
    else:
        assert len(lines) == 1 and logged in lines[0], lines


# --- malformed PDUs ---------------------------------------------------------------------------
MALFORMED = {
    # A-ASSOCIATE-RQs that decode but break PS3.8 9.3.2: A-ASSOCIATE-RJ (AE-6).
    "no-transfer-syntax": (
        associate_rq(
            item(0x10, APPLICATION_CONTEXT),
            presentation_context(1, transfer=()),
            user_information(),
        ),
        REJECT_MALFORMED,
        "presentation context 1 does not hold one abstract syntax and one or more transfer",
    ),
    "even-context-id": (
        associate_rq(item(0x10, APPLICATION_CONTEXT), presentation_context(2), user_information()),
        REJECT_MALFORMED,
        "presentation context ID 2 is not an odd number from 1 to 255",
    ),
    "context-id-zero": (
        associate_rq(item(0x10, APPLICATION_CONTEXT), presentation_context(0), user_information()),
        REJECT_MALFORMED,
        "presentation context ID 0 is not an odd number",
    ),
    "duplicate-context-id": (
        associate_rq(
            item(0x10, APPLICATION_CONTEXT),
            presentation_context(1),
            presentation_context(1),
            user_information(),
        ),
        REJECT_MALFORMED,
        "presentation context ID 1 twice",
    ),
    "no-abstract-syntax": (
        associate_rq(
            item(0x10, APPLICATION_CONTEXT),
            item(0x20, struct.pack(">BBBB", 1, 0, 0, 0) + item(0x40, IMPLICIT_VR_LE)),
            user_information(),
        ),
        REJECT_MALFORMED,
        "presentation context 1 does not hold one abstract syntax",
    ),
    "no-presentation-context": (
        associate_rq(item(0x10, APPLICATION_CONTEXT), user_information()),
        REJECT_MALFORMED,
        "no presentation context item",
    ),
    "no-user-information": (
        associate_rq(item(0x10, APPLICATION_CONTEXT), presentation_context(1)),
        REJECT_MALFORMED,
        "0 user information items, not one",
    ),
    "user-identity-length-lies": (
        associate_rq(
            item(0x10, APPLICATION_CONTEXT),
            presentation_context(1),
            user_information(user_identity(b"alice", declared=60000)),
        ),
        REJECT_MALFORMED,
        "user identity primary field of 60000 bytes",
    ),
    "protocol-version-2": (
        associate_rq(version=2),
        REJECT_VERSION,
        "protocol version 0x0002 not supported",
    ),
    "no-application-context": (
        associate_rq(presentation_context(1), user_information()),
        REJECT_CONTEXT_NAME,
        "application context missing",
    ),
    "other-application-context": (
        associate_rq(item(0x10, b"1.2.3.4"), presentation_context(1), user_information()),
        REJECT_CONTEXT_NAME,
        "application context 1.2.3.4, not DICOM's",
    ),
    # PDUs that cannot be framed or decoded, or come before an association: A-ABORT (AA-1).
    "garbage": (b"\xff" * 20, ABORT, "unrecognised PDU type 0xFF"),
    "http-request": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", ABORT, "unrecognised PDU type 0x47"),
    "length-short": (
        VALID_RQ[:2] + struct.pack(">L", 5) + VALID_RQ[6:],
        ABORT,
        "A-ASSOCIATE-RQ cannot be decoded",
    ),
    "length-huge": (
        VALID_RQ[:2] + struct.pack(">L", 0xFFFFFFFF) + VALID_RQ[6:],
        ABORT,
        "A-ASSOCIATE-RQ of 4294967295 bytes",
    ),
    "item-length-lies": (  # the last item says 500 bytes, the PDU holds 30 more
        associate_rq(
            item(0x10, APPLICATION_CONTEXT),
            user_information(),
            struct.pack(">BBHBBBB", 0x20, 0, 500, 1, 0, 0, 0) + item(0x30, VERIFICATION),
        ),
        ABORT,
        "A-ASSOCIATE-RQ cannot be decoded",
    ),
    "unknown-item-type": (
        associate_rq(*STANDARD_ITEMS, item(0x99, b"xx")),
        ABORT,
        "A-ASSOCIATE-RQ cannot be decoded",
    ),
    "uid-too-long": (
        associate_rq(
            item(0x10, APPLICATION_CONTEXT),
            presentation_context(1, abstract=b"1." + b"2" * 70),
            user_information(),
        ),
        ABORT,
        "must not exceed 64 characters",
    ),
    "p-data-before-association": (
        pdu(0x04, struct.pack(">LBB", 2, 1, 0x03)),
        ABORT,
        "P-DATA-TF before an association",
    ),
    "p-data-huge-before-association": (
        struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + bytes(64),
        ABORT,
        "P-DATA-TF before an association",
    ),
    "release-before-association": (RELEASE_RQ, ABORT, "A-RELEASE-RQ unexpected"),
    "accept-from-a-requestor": (
        pdu(0x02, VALID_RQ[6:]),
        ABORT,
        "A-ASSOCIATE-AC unexpected",
    ),
    "release-rp-of-odd-length": (
        pdu(0x06, bytes(5000)),
        ABORT,
        "A-RELEASE-RP of 5000 bytes",
    ),
    "abort-before-association": (pdu(0x07, bytes(4)), b"", None),  # AA-2: closed, no answer
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_pdu_is_answered_and_the_connection_closed(
    server: RunningServer, stored: Stored, name: str
):
    data, answer, logged = MALFORMED[name]
    source = new_address()
    result = exchange(server, source, data)
    assert result.answer == answer
    assert result.closed
    lines = peer_lines(server, source)
    if logged is None:
        assert lines == []
    else:
        assert len(lines) == 1 and logged in lines[0], lines


STORAGE_RQ = associate_rq(
    item(0x10, APPLICATION_CONTEXT),
    presentation_context(1, abstract=CT_IMAGE_STORAGE, transfer=(EXPLICIT_VR_LE,)),
    user_information(),
)
P_DATA_CUT = struct.pack(">BBL", 0x04, 0, 1000) + bytes(100)  # 100 of the 1,000 bytes it gives
#: A P-DATA-TF longer than the maximum PDU length the server announced (PS3.8 D.1); only its
#: first 100 bytes are sent: the header is enough.
P_DATA_TOO_LONG = struct.pack(">BBL", 0x04, 0, MAX_PDU + 1) + bytes(100)


@pytest.mark.parametrize("after_store", [False, True], ids=["first-message", "after-c-store"])
@pytest.mark.parametrize(
    "data, reason, logged",
    [
        (b"\xff" * 20, 1, "unrecognised PDU type 0xFF"),
        (VALID_RQ, 2, "A-ASSOCIATE-RQ unexpected"),  # in Sta6: AA-8
        (VALID_RQ[:2] + struct.pack(">L", 5) + VALID_RQ[6:11], 6, "A-ASSOCIATE-RQ cannot be"),
        (P_DATA_TOO_LONG, 6, f"P-DATA-TF of {MAX_PDU + 1} bytes, longer than the negotiated"),
        (pdu(0x05, bytes(5000)), 6, "A-RELEASE-RQ of 5000 bytes"),
        (P_DATA_CUT, 0, "incomplete after the network timeout"),
    ],
    ids=["garbage", "associate-rq", "undecodable", "p-data-too-long", "release-rq-long", "cut"],
)
def test_malformed_pdu_during_an_association_aborts_it(
    server: RunningServer,
    stored: Stored,
    tmp_path: Path,
    after_store: bool,
    data: bytes,
    reason: int,
    logged: str | None,
):
    """During data transfer (Sta6) an invalid PDU gets an A-ABORT from the service provider
    (AA-8) with the reason PS3.8 9.3.8 gives, whether pynetdicom's DUL reads it (first
    message) or the C-STORE reader that borrows its socket (after a C-STORE), at its header
    when that is enough to tell; a PDU cut short, once the network timeout passes."""
    source = new_address()
    sock = raw_association(server, source, STORAGE_RQ)
    with sock:
        if after_store:
            (path,) = write_series(tmp_path, 1, size=32)
            assert raw_store(sock, path) == 0x0000
            reader_holds_the_socket()
        started = time.monotonic()
        sock.sendall(data)
        assert read_to_end(sock) == provider_abort(reason)
        elapsed = time.monotonic() - started
    if reason:  # (a PDU cut short is aborted at the network timeout)
        assert elapsed < NETWORK_TIMEOUT, f"aborted after {elapsed:.1f} s, not at its header"
    lines = peer_lines(server, source)
    if logged is None:
        assert lines == []
    else:
        assert len(lines) == 1 and logged in lines[0], lines


@pytest.mark.parametrize("after_store", [False, True], ids=["first-message", "after-c-store"])
def test_a_data_set_in_pdus_longer_than_announced_is_not_stored(
    server: RunningServer, stored: Stored, tmp_path: Path, after_store: bool
):
    """A whole C-STORE whose data set comes in one P-DATA-TF of about 130 KB, over the 64 KiB
    the server announced (PS3.8 D.1): A-ABORT, invalid PDU parameter value; nothing stored."""
    source = new_address()
    (big,) = write_series(tmp_path / "big", 1, size=256)
    big_sop = str(pydicom.dcmread(big, stop_before_pixels=True).SOPInstanceUID)
    request = store_request(big, max_pdu_length=1 << 20)
    assert max(len(part) for part in split_pdus(request)) > MAX_PDU
    sock = raw_association(server, source, STORAGE_RQ)
    with sock:
        if after_store:
            (path,) = write_series(tmp_path / "small", 1, size=32)
            assert raw_store(sock, path) == 0x0000
            reader_holds_the_socket()
        sock.sendall(request)
        assert read_to_end(sock) == provider_abort(6)
    assert not any(key.endswith(f"/{big_sop}.dcm") for key in _blobs(server))
    lines = peer_lines(server, source)
    assert len(lines) == 1 and "longer than the negotiated 65536" in lines[0], lines


def split_pdus(stream: bytes) -> list[bytes]:
    """The PDUs of a byte stream of whole PDUs."""
    pdus = []
    while stream:
        size = 6 + struct.unpack(">L", stream[2:6])[0]
        pdus.append(stream[:size])
        stream = stream[size:]
    return pdus


def test_the_dicom_port_listens_with_the_configured_backlog(server: RunningServer):
    """PACSBRIDGE_DIMSE_BACKLOG, not socketserver's 5: in a burst of connections a full queue
    drops SYNs, which the peer sends again only after 1 s, then 3 s. (``ss`` shows a listening
    socket's backlog as its Send-Q.)"""
    done = subprocess.run(
        [require_tool("ss"), "-ltnH", f"sport = :{server.dimse_port}"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    (line,) = done.stdout.splitlines()
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert int(line.split()[2]) == min(BACKLOG, somaxconn)


def test_requests_that_only_look_odd_are_accepted(server: RunningServer, stored: Stored):
    """Protocol version 0x0003 (a receiver tests only bit 0, PS3.8 9.3.2) and a 60,000-byte
    user identity (the acceptor ignores what it does not check, PS3.7 D.3.3.7) associate."""
    for request in (
        associate_rq(version=3),
        associate_rq(
            item(0x10, APPLICATION_CONTEXT),
            presentation_context(1),
            user_information(user_identity(b"x" * 60000)),
        ),
    ):
        source = new_address()
        sock = socket.create_connection(
            ("127.0.0.1", server.dimse_port), timeout=SOCKET_WAIT, source_address=(source, 0)
        )
        sock.sendall(request)
        assert recv_pdu(sock)[:1] == b"\x02"  # A-ASSOCIATE-AC
        release(sock)
        assert peer_lines(server, source) == []


def test_repeated_malformed_requests_are_logged_once_per_process(
    server: RunningServer, stored: Stored
):
    source = new_address()
    for _ in range(6):
        result = exchange(server, source, b"\xff" * 20)
        assert result == Exchange(ABORT, closed=True)
    lines = peer_lines(server, source)
    # One line a minute per address in each of the two DIMSE processes.
    assert 1 <= len(lines) <= 2, lines


def test_malformed_requests_do_not_disturb_dcmtk(server: RunningServer, stored: Stored):
    echoscu = require_tool("echoscu")
    for _ in range(3):
        exchange(server, new_address(), MALFORMED["no-transfer-syntax"][0])
        done = subprocess.run(
            [echoscu, "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr


# --- the DIMSE processes ------------------------------------------------------------------------
def _spawned_children(pid: int) -> list[int]:
    """The acceptor processes ``pid`` started (multiprocessing's spawned children, not its
    resource tracker nor its event delivery process)."""
    from pacsbridge.event_process import PROCESS_NAME

    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        if parent == pid and b"spawn_main" in cmdline and name != PROCESS_NAME:
            children.append(int(entry.name))
    return children


def test_a_dimse_process_that_dies_is_replaced(server: RunningServer, stored: Stored):
    """The other acceptor process is killed: `serve` logs it as an error, hands it no more
    connections, starts another and hands connections to that one once it is ready."""
    (child,) = _spawned_children(server.proc.pid)
    assert httpx.get(f"{server.http}/health", timeout=10).json()["dimse_processes"] == {
        "configured": 2,
        "ready": 2,
    }
    os.kill(child, signal.SIGKILL)
    deadline = time.monotonic() + 60
    successor: list[int] = []
    while time.monotonic() < deadline:
        successor = [pid for pid in _spawned_children(server.proc.pid) if pid != child]
        health = httpx.get(f"{server.http}/health", timeout=10).json()["dimse_processes"]
        if successor and health["ready"] == 2 and f"pid={successor[0]}" in server.log():
            break
        # Meanwhile every connection is served (by `serve` itself).
        assert echo(server, new_address()) == 0x0000
        time.sleep(0.2)
    else:
        pytest.fail(f"no acceptor process took the killed one's place:\n{server.log()[-3000:]}")
    assert any(
        "DIMSE acceptor process ended; starting another" in line and f"pid={child}" in line
        for line in server.log().splitlines()
    ), server.log()[-3000:]
    # Connections go to both processes again: each counts under its own address.
    assert [echo(server, new_address()) for _ in range(6)] == [0x0000] * 6


def _store_and_echo(port: int, files: list[Path]) -> list[int]:
    """The statuses of a C-STORE of each file and a C-ECHO, in one association."""
    contexts = [build_context(CTImageStorage), build_context(Verification)]
    assoc = _ae().associate("127.0.0.1", port, contexts=contexts, ae_title="PACSBRIDGE")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(path).Status) for path in files]
        statuses.append(int(assoc.send_c_echo().Status))
        return statuses
    finally:
        assoc.release()


# --- in-process: what no peer reaches on purpose -----------------------------------------------
@dataclass
class Node:
    server: DimseServer
    archive: Archive
    port: int


@pytest.fixture
def node(tmp_path: Path, pynetdicom_patched: None) -> Iterator[Node]:
    """A DimseServer in this process (pynetdicom patched as `serve` runs it)."""
    settings = Settings(
        data_dir=tmp_path / "node",
        dimse_host="127.0.0.1",
        dimse_port=0,
        artim_timeout=ARTIM,
        acse_timeout=ACSE_TIMEOUT,
        network_timeout=NETWORK_TIMEOUT,
    )
    archive = Archive(settings)
    server = DimseServer(archive, settings)
    _host, port = server.start()
    try:
        yield Node(server, archive, port)
    finally:
        server.stop()
        archive.close()


def test_an_error_while_the_request_waits_is_answered_before_the_connection_closes(
    node: Node, monkeypatch: pytest.MonkeyPatch
):
    """An error in the association thread after the A-ASSOCIATE-RQ arrived (here: in the
    notification of the request) gets the A-ASSOCIATE-RJ out before the connection closes
    (PS3.8 9.3.4: rejected-permanent, service-provider (ACSE), no reason given)."""
    original = evt.trigger

    def trigger(assoc: Any, event: Any, attrs: Any) -> Any:
        if event is evt.EVT_REQUESTED:
            raise RuntimeError("handler state lost")
        return original(assoc, event, attrs)

    monkeypatch.setattr(evt, "trigger", trigger)
    for _ in range(3):
        assert exchange(node.port, "127.0.0.1", VALID_RQ) == Exchange(REJECT_MALFORMED, True)
    monkeypatch.undo()
    assert _store_and_echo(node.port, []) == [0x0000]


def test_connections_on_descriptors_above_1024_are_served(node: Node, tmp_path: Path):
    """select() refuses descriptors from 1024 on: the DUL, its reads and the C-STORE reader
    wait with poll(). Every descriptor below 1100 is taken first, so that the connection, its
    wake-up pipe and the client's socket all come above."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"at most {hard} open files allowed here")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    files = write_series(tmp_path / "ct", 4, size=256)  # 128 KiB data sets: read in parts
    fillers: list[int] = []
    try:
        while not fillers or fillers[-1] < 1100:
            fillers.append(os.open(os.devnull, os.O_RDONLY))
        probe = socket.socket()
        assert probe.fileno() > 1024
        probe.close()
        assert _store_and_echo(node.port, files) == [0x0000] * 5
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert node.archive.stats().instances == 4


# --- in-process: the per-address limit and its refusals -----------------------------------------
def test_a_limit_of_zero_admits_any_number_from_one_address():
    """Behind a load balancer or NAT every peer has the same address:
    PACSBRIDGE_MAX_ASSOCIATIONS_PER_ADDRESS=0 turns the limit off."""
    assert Settings(max_associations_per_address=0).max_associations_per_address == 0
    limiter = AddressLimiter(0)
    assert all(limiter.admit("192.0.2.1") for _ in range(500))
    assert limiter.open_connections("192.0.2.1") == 500


def test_a_connection_released_twice_is_logged(caplog: pytest.LogCaptureFixture):
    limiter = AddressLimiter(2)
    assert limiter.admit("192.0.2.2")
    limiter.release("192.0.2.2")
    with caplog.at_level(logging.ERROR, logger="dicom_node.acceptor"):
        limiter.release("192.0.2.2")
    (record,) = caplog.records
    assert record.getMessage() == "DICOM connection count: a connection ended that was not counted"
    assert record.peer == "192.0.2.2"  # type: ignore[attr-defined]
    assert limiter.open_connections("192.0.2.2") == 0
    assert limiter.admit("192.0.2.2") and limiter.admit("192.0.2.2")
    assert not limiter.admit("192.0.2.2")


def _refused(refuser: ConnectionRefuser) -> socket.socket:
    """A connection handed to the refuser; the peer's end."""
    ours, peer = socket.socketpair()
    peer.settimeout(5)
    refuser.refuse(ours)
    return peer


def _closed(peer: socket.socket) -> bool:
    """Whether the refuser closed its end, with nothing sent (a reset when it had not read
    all that was sent)."""
    try:
        return peer.recv(100) == b""
    except ConnectionResetError:
        return True


def test_the_refusing_thread_survives_an_error_with_one_connection(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    refuser = ConnectionRefuser(artim_timeout=5)
    original = ConnectionRefuser._readable
    failures = iter([True])

    def readable(self: ConnectionRefuser, *args: Any) -> None:
        if next(failures, False):
            raise RuntimeError("bad state")
        original(self, *args)

    monkeypatch.setattr(ConnectionRefuser, "_readable", readable)
    try:
        first = _refused(refuser)
        first.sendall(VALID_RQ)
        assert _closed(first)  # after the error
        second = _refused(refuser)
        second.sendall(VALID_RQ)
        assert second.recv(100) == REJECT_LOCAL_LIMIT
        assert "refused DICOM connection closed after an error" in caplog.text
    finally:
        refuser.stop()


def test_a_refusing_thread_that_ended_is_started_again(monkeypatch: pytest.MonkeyPatch):
    refuser = ConnectionRefuser(artim_timeout=5)
    original = ConnectionRefuser._take_incoming
    failures = iter([True])

    def take_incoming(self: ConnectionRefuser, *args: Any) -> None:
        if next(failures, False):
            raise RuntimeError("selector gone")
        original(self, *args)

    monkeypatch.setattr(ConnectionRefuser, "_take_incoming", take_incoming)
    try:
        first = _refused(refuser)
        assert refuser._thread is not None
        refuser._thread.join(5)  # ended by the error
        second = _refused(refuser)
        for peer in (first, second):
            peer.sendall(VALID_RQ)
            assert peer.recv(100) == REJECT_LOCAL_LIMIT
    finally:
        refuser.stop()


def test_stopping_the_refuser_closes_connections_it_has_not_taken_up(
    monkeypatch: pytest.MonkeyPatch,
):
    refuser = ConnectionRefuser(artim_timeout=30)
    # The thread is busy elsewhere: it never takes these up.
    monkeypatch.setattr(ConnectionRefuser, "_take_incoming", lambda self, *args: None)
    peers = [_refused(refuser) for _ in range(3)]
    refuser.stop()
    for peer in peers:
        assert _closed(peer)
        peer.close()
    # After stop(), a connection is closed at once.
    assert _closed(_refused(refuser))


# --- in-process: handing connections to another process ------------------------------------------
def _receiving(child: Any) -> tuple[threading.Thread, list[tuple[socket.socket, str]], list[str]]:
    served: list[tuple[socket.socket, str]] = []
    ended: list[str] = []

    def run() -> None:
        with contextlib.suppress(EOFError, OSError):
            receive_connections(child, lambda c, a: served.append((c, a)), ended.append)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, served, ended


def test_a_connection_handed_over_without_its_descriptor_is_ended_and_the_next_served():
    """When the descriptor does not come with its message (the kernel drops it when the child
    has none free), the child reports the connection ended (so that the parent's counts stay
    true) and serves the next one."""
    parent, child = multiprocessing.Pipe(duplex=True)
    thread, served, ended = _receiving(child)
    ours, peer = socket.socketpair()
    try:
        # What send_handle() writes, without the descriptor, then the address.
        with socket.socket(fileno=os.dup(parent.fileno())) as raw:
            raw.sendall(b"\x01")
        parent.send_bytes(b"192.0.2.10")
        send_handle(parent, ours.fileno(), os.getpid())
        parent.send_bytes(b"192.0.2.11")
        ours.close()
        deadline = time.monotonic() + 5
        while not served and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ended == ["192.0.2.10"]
        ((connection, address),) = served
        assert address == "192.0.2.11"
        peer.sendall(b"A")
        assert connection.recv(1) == b"A"
        connection.close()
    finally:
        parent.close()
        thread.join(5)
        peer.close()
    assert not thread.is_alive()


def test_a_descriptor_whose_address_never_comes_is_closed():
    parent, child = multiprocessing.Pipe(duplex=True)
    thread, served, ended = _receiving(child)
    ours, peer = socket.socketpair()
    peer.settimeout(5)
    try:
        send_handle(parent, ours.fileno(), os.getpid())
        ours.close()
        parent.close()  # gone before the address
        thread.join(5)
        assert not thread.is_alive()
        assert served == [] and ended == []
        assert peer.recv(1) == b""  # no copy of the connection is left open
    finally:
        peer.close()


# --- afterwards -----------------------------------------------------------------------------
def test_still_serving_and_nothing_stored_changed(
    server: RunningServer, stored: Stored, tmp_path: Path
):
    """Runs last: C-ECHO and C-STORE still work, the instances stored first are byte-identical,
    and nothing of all this left a traceback in the log."""
    assert echo(server, new_address()) == 0x0000
    new = write_series(tmp_path / "after", 1, size=32)
    assoc = associate(server, new_address(), [build_context(CTImageStorage)])
    assert assoc.is_established
    try:
        assert assoc.send_c_store(new[0]).Status == 0x0000
    finally:
        assoc.release()
    blobs = _blobs(server)
    sop = pydicom.dcmread(new[0], stop_before_pixels=True).SOPInstanceUID
    assert any(key.endswith(f"/{sop}.dcm") for key in blobs)
    assert {key: blobs[key] for key in stored.blobs} == stored.blobs
    log = server.log()
    assert "Traceback" not in log
    assert "Exception in thread" not in log
