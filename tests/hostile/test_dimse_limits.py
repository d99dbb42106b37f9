"""Hostile input at the DICOM edge, at scale: an A-ASSOCIATE-RQ with 1,000 presentation contexts
(or 128 of them in a request of the longest length read), and a stranger holding a hundred idle
connections and associations from one address, with ``PACSBRIDGE_AUTH=required``.

Each case asserts the exact PDUs (PS3.8 9.3) and that legitimate DCMTK clients are served while
it goes on; afterwards the server has no association open, every address has its slots back,
and the instances stored are byte-identical. One `pacsbridge serve` for the module, with auth
required (an undeclared Calling AE Title is rejected at association, PS3.8 9.3.4), two DIMSE
processes, the ARTIM timer at 1 s, a network (idle) timeout of 4 s and at most ``LIMIT`` open
connections per address. Peers are told apart by source address on 127.0.0.0/8.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest

from tests.conftest import RunningServer, _backend, require_tool, start_server
from tests.dicom_factory import write_series
from tests.hostile.test_dimse import (
    ABORT,
    APPLICATION_CONTEXT,
    CT_IMAGE_STORAGE,
    EXPLICIT_VR_LE,
    IMPLICIT_VR_LE,
    REJECT_LOCAL_LIMIT,
    REJECT_MALFORMED,
    RELEASE_RQ,
    VERIFICATION,
    _blobs,
    _spawned_children,
    item,
    peer_lines,
    presentation_context,
    read_to_end,
    recv_pdu,
    user_identity,
    user_information,
)

ARTIM = 1.0
#: The network timeout: an established association with nothing to read for this long is
#: aborted (dicom_node/reactor.py).
IDLE = 4.0
LIMIT = 8
ACSE_TIMEOUT = 120
SOCKET_WAIT = 20.0
#: The longest A-ASSOCIATE-RQ body the node reads (dicom_node/upper_layer.py,
#: MAX_ASSOCIATION_PDU_LENGTH).
MAX_RQ_BODY = 1024 * 1024

#: A-ASSOCIATE-RJ rejected-permanent, DICOM UL service-user, calling-AE-title-not-recognized
#: (PS3.8 9.3.4, Table 9-21).
REJECT_CALLING_AE = bytes.fromhex("03 00 00000004 00 01 01 03")
RELEASE_RP = bytes.fromhex("06 00 00000004 00000000")

#: Declared peers: the holder may echo and store, the workstation too.
HOLDER, WORKSTATION, STRANGER = "HOLDER", "WORKSTN", "STRANGER"


def associate_rq(calling: str, *items: bytes, called: bytes = b"PACSBRIDGE") -> bytes:
    """An A-ASSOCIATE-RQ (PS3.8 9.3.2) from ``calling`` with ``items`` (default: the DICOM
    application context, Verification on context 1, user information)."""
    items = items or (item(0x10, APPLICATION_CONTEXT), presentation_context(1), user_information())
    body = struct.pack(">HH", 1, 0) + called.ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += b"".join(items)
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


@dataclass(frozen=True)
class ContextResult:
    """A presentation context item of an A-ASSOCIATE-AC (PS3.8 9.3.3.2)."""

    context_id: int
    result: int
    transfer_syntax: bytes


def ac_contexts(ac: bytes) -> list[ContextResult]:
    """The presentation context items of an A-ASSOCIATE-AC, as they come."""
    assert ac[:1] == b"\x02", ac[:16]
    results = []
    offset = 6 + 68  # PDU header; protocol version .. reserved (PS3.8 Table 9-17)
    while offset < len(ac):
        item_type, _, length = struct.unpack(">BBH", ac[offset : offset + 4])
        body = ac[offset + 4 : offset + 4 + length]
        if item_type == 0x21:
            context_id, _, result, _ = body[:4]
            sub_type, _, sub_length = struct.unpack(">BBH", body[4:8])
            assert sub_type == 0x40
            results.append(ContextResult(context_id, result, body[8 : 8 + sub_length]))
        offset += 4 + length
    return results


# --- the server ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    tmp = tmp_path_factory.mktemp("hostile-dimse-limits")
    peers = {
        name.lower(): {
            "ae_title": name,
            "host": "127.0.0.1",
            "port": 104,
            "permissions": ["echo", "store"],
        }
        for name in (HOLDER, WORKSTATION)
    }
    backend = _backend(
        "sqlite",
        "file",
        tmp,
        request,
        peers=peers,
        dimse_query_from_any_ae=False,
        worker_in_serve=False,
    )
    srv = start_server(
        backend,
        tmp,
        PACSBRIDGE_AUTH="required",
        PACSBRIDGE_METRICS_LOOPBACK_WITHOUT_AUTH="true",
        PACSBRIDGE_ARTIM_TIMEOUT=str(ARTIM),
        PACSBRIDGE_ACSE_TIMEOUT=str(ACSE_TIMEOUT),
        PACSBRIDGE_NETWORK_TIMEOUT=str(IDLE),
        PACSBRIDGE_MAX_ASSOCIATIONS_PER_ADDRESS=str(LIMIT),
        PACSBRIDGE_DIMSE_PROCESSES="2",
    )
    try:
        yield srv
    finally:
        assert srv.stop() == 0, f"pacsbridge serve did not stop cleanly:\n{srv.log()[-3000:]}"


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(tmp_path_factory.mktemp("hostile-limits-series"), 2, size=32)


def storescu(server: RunningServer, calling: str, files: list[Path]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            require_tool("storescu"),
            "-aet",
            calling,
            "-aec",
            server.ae_title,
            "127.0.0.1",
            str(server.dimse_port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def echoscu(server: RunningServer, calling: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            require_tool("echoscu"),
            "-aet",
            calling,
            "-aec",
            server.ae_title,
            "127.0.0.1",
            str(server.dimse_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def connect(server: RunningServer, source: str) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", server.dimse_port), timeout=SOCKET_WAIT, source_address=(source, 0)
    )


def answer_to(server: RunningServer, source: str, request: bytes) -> tuple[bytes, bool]:
    """Send ``request`` from ``source``: the server's answer and whether it then closed the
    connection (read until it does, or SOCKET_WAIT passes)."""
    with connect(server, source) as sock:
        sock.sendall(request)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except TimeoutError:
            return answer, False
        except ConnectionResetError:
            pass
        return answer, True


def associate_and_release(server: RunningServer, source: str) -> bytes:
    """An association from ``source`` released at once: the answer to its request (an
    A-ASSOCIATE-AC, or what refused it)."""
    with connect(server, source) as sock:
        sock.sendall(associate_rq(HOLDER))
        answer = recv_pdu(sock)
        if answer[:1] == b"\x02":
            sock.sendall(RELEASE_RQ)
            assert recv_pdu(sock) == RELEASE_RP
        assert read_to_end(sock) == b""
        return answer


def open_associations(server: RunningServer) -> float:
    """``pacsbridge_associations_open``, summed over the DIMSE processes."""
    text = httpx.get(f"{server.http}/metrics", timeout=10).text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("pacsbridge_associations_open ")]
    return float(line.split()[1])


def wait_until_no_association_is_open(server: RunningServer) -> None:
    deadline = time.monotonic() + SOCKET_WAIT
    while (count := open_associations(server)) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert count == 0, server.log()[-3000:]


def server_rss(server: RunningServer) -> int:
    """Resident memory of `serve` and its DIMSE processes, in bytes."""
    total = 0
    for pid in (server.proc.pid, *_spawned_children(server.proc.pid)):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


class Alongside:
    """A legitimate modality (DCMTK) storing and echoing, over and over, on another thread."""

    def __init__(self, server: RunningServer, files: list[Path]) -> None:
        self.server = server
        self.files = files
        self.results: list[subprocess.CompletedProcess] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.results.append(storescu(self.server, WORKSTATION, self.files))
            self.results.append(echoscu(self.server, WORKSTATION))

    def __enter__(self) -> Alongside:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        failed = [r.stdout + r.stderr for r in self.results if r.returncode != 0]
        assert self.results and not failed, failed[:2]


def assert_served_and_unchanged(server: RunningServer, files: list[Path]) -> None:
    """DCMTK still stores and echoes; what was stored is byte-identical."""
    before = _blobs(server)
    done = storescu(server, WORKSTATION, files)
    assert done.returncode == 0, done.stdout + done.stderr
    assert echoscu(server, WORKSTATION).returncode == 0
    after = _blobs(server)
    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert all(any(k.endswith(f"/{sop}.dcm") for k in after) for sop in sops)
    assert {k: after.get(k) for k in before} == before


# --- 1,000 presentation contexts ---------------------------------------------------------------
def _many_contexts(ids: list[int]) -> bytes:
    return associate_rq(
        HOLDER,
        item(0x10, APPLICATION_CONTEXT),
        *(presentation_context(i) for i in ids),
        user_information(),
    )


#: 1,000 presentation contexts (PS3.8 9.3.2.2: an ID is an odd number from 1 to 255, each
#: proposed once, so at most 128 can be): the IDs cycle through the 128 odd ones, or the 128
#: odd ones come first and even ones (0 among them) follow.
THOUSAND = {
    "ids-repeat": (
        _many_contexts([1 + 2 * (n % 128) for n in range(1000)]),
        "presentation context ID 1 twice",
    ),
    "ids-out-of-range": (
        _many_contexts([1 + 2 * n for n in range(128)] + [(2 * n) % 256 for n in range(872)]),
        "presentation context ID 0 is not an odd number from 1 to 255",
    ),
}


@pytest.mark.parametrize("name", list(THOUSAND))
def test_a_thousand_presentation_contexts_are_rejected(
    server: RunningServer, series: list[Path], name: str
):
    """Rejected-permanent, service-provider (ACSE), no reason given (PS3.8 9.3.4), every time
    the same, one log line per address; a DCMTK modality is served meanwhile."""
    request, logged = THOUSAND[name]
    source = "127.0.1.1" if name == "ids-repeat" else "127.0.1.2"
    with Alongside(server, series):
        for _ in range(20):
            assert answer_to(server, source, request) == (REJECT_MALFORMED, True)
    lines = peer_lines(server, source)
    assert 1 <= len(lines) <= 2 and all(logged in line for line in lines), lines
    assert_served_and_unchanged(server, series)


def _fake_transfer_syntax(n: int) -> bytes:
    return f"1.2.826.0.1.3680043.10.1506.77.{n}".encode()


def longest_request() -> tuple[bytes, dict[int, tuple[int, bytes]]]:
    """An A-ASSOCIATE-RQ of exactly MAX_RQ_BODY bytes with all 128 presentation contexts, each
    proposing 210 transfer syntaxes nobody knows first; padded to length with a user
    identity (PS3.7 D.3.3.7). And what the node must answer for each context (PS3.8 9.3.3.2):
    Verification and CT Image Storage with a known transfer syntax last are accepted (0) with
    it, CT Image Storage with only unknown ones gets transfer-syntaxes-not-supported (4), an
    unknown abstract syntax abstract-syntax-not-supported (3)."""
    return _longest_request(210)


def _longest_request(proposed: int) -> tuple[bytes, dict[int, tuple[int, bytes]]]:
    fakes = tuple(_fake_transfer_syntax(n) for n in range(proposed))
    contexts: list[bytes] = []
    expected: dict[int, tuple[int, bytes]] = {}
    for n in range(128):
        context_id = 1 + 2 * n
        kind = n % 4
        if kind == 0:
            contexts.append(
                presentation_context(context_id, VERIFICATION, (*fakes, IMPLICIT_VR_LE))
            )
            expected[context_id] = (0, IMPLICIT_VR_LE)
        elif kind == 1:
            contexts.append(
                presentation_context(context_id, CT_IMAGE_STORAGE, (*fakes, EXPLICIT_VR_LE))
            )
            expected[context_id] = (0, EXPLICIT_VR_LE)
        elif kind == 2:
            contexts.append(presentation_context(context_id, CT_IMAGE_STORAGE, fakes))
            expected[context_id] = (4, b"")
        else:
            abstract = f"1.2.826.0.1.3680043.10.1506.78.{n}".encode()
            contexts.append(presentation_context(context_id, abstract, (*fakes, IMPLICIT_VR_LE)))
            expected[context_id] = (3, b"")
    head = associate_rq(HOLDER, item(0x10, APPLICATION_CONTEXT), *contexts, user_information())
    # The user identity sub-item adds 10 bytes and the length of its primary field.
    padding = MAX_RQ_BODY - (len(head) - 6) - 10
    assert 0 < padding < 65535 - 64, padding
    request = associate_rq(
        HOLDER,
        item(0x10, APPLICATION_CONTEXT),
        *contexts,
        user_information(user_identity(b"u" * padding)),
    )
    assert len(request) - 6 == MAX_RQ_BODY
    return request, expected


def test_all_128_presentation_contexts_in_the_longest_request_are_answered(
    server: RunningServer, series: list[Path]
):
    """The longest A-ASSOCIATE-RQ the node reads, with every presentation context ID there is:
    an A-ASSOCIATE-AC with one result per context, the same each time (PS3.8
    9.3.3.2); the association then works and is released. One byte longer and it is not
    read: A-ABORT (PS3.8 9.3.8). The DIMSE processes' memory does not grow with the number
    of such requests, and a DCMTK modality is served meanwhile."""
    request, expected = longest_request()
    source = "127.0.1.3"

    def answered_in_full() -> None:
        with connect(server, source) as sock:
            sock.sendall(request)
            results = ac_contexts(recv_pdu(sock))
            # One result per proposed context (PS3.8 9.3.3.2: each carries its ID; the order
            # is not given, pynetdicom answers the accepted ones first).
            assert sorted(r.context_id for r in results) == list(expected)
            # The transfer syntax of a context not accepted is not significant (PS3.8
            # 9.3.3.2, Table 9-18).
            answered = {
                r.context_id: (r.result, r.transfer_syntax if r.result == 0 else b"")
                for r in results
            }
            assert answered == expected
            sock.sendall(RELEASE_RQ)
            assert recv_pdu(sock) == RELEASE_RP
            assert read_to_end(sock) == b""

    with Alongside(server, series):
        for _ in range(32):
            answered_in_full()
    # Each request takes the process that decodes it some 11 MB while it does; once the
    # allocator's arenas of every DIMSE process hold that much (the requests above, spread
    # over the processes by their load), 40 more leave no trace (keeping the decoded requests
    # would take 400 MB).
    before = server_rss(server)
    for _ in range(40):
        answered_in_full()
    after = server_rss(server)
    assert after - before < 16 * 1024 * 1024, (before, after)
    assert peer_lines(server, source) == []
    # One byte longer: not read, A-ABORT (AA-1), and the address told once in the log.
    longer = associate_rq(
        HOLDER,
        item(0x10, APPLICATION_CONTEXT),
        *(presentation_context(1 + 2 * n) for n in range(1)),
        user_information(user_identity(b"u" * 60000)),
    )
    too_long = longer[:2] + struct.pack(">L", MAX_RQ_BODY + 1) + longer[6:]
    too_long += bytes(MAX_RQ_BODY + 1 - (len(too_long) - 6))
    assert answer_to(server, "127.0.1.4", too_long) == (ABORT, True)
    (line,) = peer_lines(server, "127.0.1.4")
    assert f"A-ASSOCIATE-RQ of {MAX_RQ_BODY + 1} bytes" in line
    wait_until_no_association_is_open(server)
    assert_served_and_unchanged(server, series)


# --- a stranger holding a hundred idle connections --------------------------------------------
def test_a_hundred_idle_associations_from_one_address(server: RunningServer, series: list[Path]):
    """100 A-ASSOCIATE-RQs from one address, each connection kept open and idle: the first
    LIMIT are accepted, the rest rejected-transient, local-limit-exceeded (PS3.8 9.3.4) and
    closed by the server at the ARTIM timer at the latest; while they are held, DCMTK stores
    from another address, under the holder's own AE title and another. At the network
    timeout each idle association gets an A-ABORT and is closed; then no association is
    open and the address has its slots back."""
    holder = "127.0.2.1"
    wait_until_no_association_is_open(server)
    sockets = [connect(server, holder) for _ in range(100)]
    try:
        answers = []
        for sock in sockets:
            sock.sendall(associate_rq(HOLDER))
            answers.append(recv_pdu(sock))
        assert [a[:1] for a in answers[:LIMIT]] == [b"\x02"] * LIMIT  # A-ASSOCIATE-AC
        assert answers[LIMIT:] == [REJECT_LOCAL_LIMIT] * (100 - LIMIT)
        assert open_associations(server) == LIMIT
        # Meanwhile: served from another address, under the holder's title and another.
        for calling in (HOLDER, WORKSTATION):
            done = storescu(server, calling, series)
            assert done.returncode == 0, done.stdout + done.stderr
        # The rejected ones are closed by the server, though the peer never closes them.
        for sock in sockets[LIMIT:]:
            assert read_to_end(sock) == b""
        # Idle for the network timeout: A-ABORT (service-user, reason not significant;
        # PS3.8 9.3.8), then the connection is closed.
        for sock in sockets[:LIMIT]:
            assert read_to_end(sock) == ABORT
    finally:
        for sock in sockets:
            sock.close()
    wait_until_no_association_is_open(server)
    held = [connect(server, holder) for _ in range(LIMIT)]
    try:
        for sock in held:
            sock.sendall(associate_rq(HOLDER))
            assert recv_pdu(sock)[:1] == b"\x02"
    finally:
        for sock in held:
            with sock:
                sock.sendall(RELEASE_RQ)
                assert recv_pdu(sock) == RELEASE_RP
    lines = peer_lines(server, holder)
    assert 1 <= len(lines) <= 2 and all("too many open from this address" in ln for ln in lines)
    wait_until_no_association_is_open(server)


def test_a_hundred_silent_connections_from_one_address(server: RunningServer, series: list[Path]):
    """100 connections that send nothing: each is closed by the server with no PDU when the
    ARTIM timer expires (AA-2, PS3.8 9.1.5), those within the limit and those over it; DCMTK
    is served meanwhile and the address then has its slots back."""
    silent = "127.0.2.2"
    sockets = [connect(server, silent) for _ in range(100)]
    try:
        assert echoscu(server, WORKSTATION).returncode == 0
        assert [read_to_end(sock) for sock in sockets] == [b""] * 100
    finally:
        for sock in sockets:
            sock.close()
    for _ in range(50):  # the slots come back as the server sees the connections end
        answer = associate_and_release(server, silent)
        if answer[:1] == b"\x02":
            break
        time.sleep(0.1)
    assert answer[:1] == b"\x02", answer
    assert all("too many open from this address" in ln for ln in peer_lines(server, silent))


def test_an_unknown_calling_ae_is_rejected_and_holds_no_slot(
    server: RunningServer, series: list[Path]
):
    """With auth required an undeclared Calling AE Title is rejected at association:
    rejected-permanent, service-user, calling-AE-title-not-recognized (PS3.8 9.3.4), and the
    server closes the connection though the stranger keeps it open. 2 x LIMIT such
    connections, one after the other, from one address take none of its slots: a declared
    peer there gets all LIMIT."""
    stranger = "127.0.2.3"
    sockets: list[socket.socket] = []
    try:
        for _ in range(2 * LIMIT):
            sockets.append(sock := connect(server, stranger))
            sock.sendall(associate_rq(STRANGER))
            assert recv_pdu(sock) == REJECT_CALLING_AE
            assert read_to_end(sock) == b""
        held = [connect(server, stranger) for _ in range(LIMIT)]
        for sock in held:
            sock.sendall(associate_rq(HOLDER))
            assert recv_pdu(sock)[:1] == b"\x02"
        for sock in held:
            with sock:
                sock.sendall(RELEASE_RQ)
                assert recv_pdu(sock) == RELEASE_RP
    finally:
        for sock in sockets:
            sock.close()
    # DCMTK under the stranger's title is told so, under a declared one served.
    refused = echoscu(server, STRANGER)
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
    assert echoscu(server, WORKSTATION).returncode == 0
    wait_until_no_association_is_open(server)


def test_still_serving_and_nothing_stored_changed(server: RunningServer, series: list[Path]):
    """Runs last: no association open, DCMTK served, the stored instances unchanged, no
    traceback in the log."""
    wait_until_no_association_is_open(server)
    assert_served_and_unchanged(server, series)
    log = server.log()
    assert "Traceback" not in log
    assert "Exception in thread" not in log
