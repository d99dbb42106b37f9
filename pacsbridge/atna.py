"""Export of the audit trail to a syslog collector (IHE ATNA, ITI-20 "Record Audit Event"):
every event as an RFC 5424 syslog message whose body is DICOM PS3.15 A.5 audit XML
(``<AuditMessage>``), over TCP with RFC 6587 octet counting (``tcp://host:port``) or TLS as
RFC 5425 says (``tls://host:port``, TLS 1.2 or newer, the collector's certificate verified).

The exporter is a background thread of ``pacsbridge serve`` that follows the ``audit_event``
table by id: it sends what every process recorded (the DIMSE acceptor processes, workers and
the command line included), and no request ever waits for it. Events recorded while the
collector is unreachable are sent once it is back (the table is the queue; the exporter keeps
at most one batch in memory).

Its position is kept in the index (``audit_export``, :mod:`archive.audit_export`): an export
resumes where it stopped, so the events recorded while no exporter ran (``serve`` down or
restarting, a worker or a command writing meanwhile) are sent when one runs again; the very
first start begins after the newest event (a new collector gets the events from then on).
Several ``serve`` processes on one index may all be configured with ``audit.syslog_url``: a
lease lets one of them export at a time and another takes over when it stops or its lease
passes, so the collector gets each event once (at least once: a process that loses its lease
in the middle of a round may have sent that round's events when the next one sends them
again).

On PostgreSQL an id is taken when a transaction inserts the event, not when it commits: a
later id can be visible before an earlier one. The cursor never passes a missing id while a
transaction that was running when the gap was seen may still commit it
(``txid_current_snapshot``); once every such transaction has ended, an id still missing was
rolled back and is passed. One snapshot covers every id missing below the highest one read, so
a burst of rolled-back events costs one wait, not one per event. An event whose message
cannot be built is logged with its id and passed: it never stalls the export.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import ssl
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from archive import Archive
from archive.audit import EVENT_TYPES, AuditEvent, AuditEventRow, event_of_row
from archive.audit_export import AuditExports
from archive.db import current_snapshot, snapshot_passed

log = logging.getLogger(__name__)

# RFC 5424 6.2.1: PRI = facility * 8 + severity; facility 10 (security/authorization, as
# IHE ITI-20 asks), severity 5 (notice) for a success, 4 (warning) for a failure.
_FACILITY = 10
APP_NAME = "pacsbridge"
MSGID = "IHE+RFC-3881"  # IHE ITI TF-2 3.20.7.3: the MSGID of ATNA messages
_BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: MSG-UTF8 starts with the BOM


def _code(tag: str, code: str, scheme: str, text: str | None) -> ET.Element:
    element = ET.Element(tag, {"csd-code": code, "codeSystemName": scheme})
    if text:
        element.set("originalText", text)
    return element


def _datetime(value: datetime) -> str:
    value = value if value.tzinfo else value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def audit_xml(event: AuditEvent, *, source_id: str, host: str) -> bytes:
    """The event as a DICOM PS3.15 A.5.1 ``AuditMessage``."""
    message = ET.Element("AuditMessage")
    ident = ET.SubElement(
        message,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": _datetime(event.recorded),
            "EventOutcomeIndicator": str(event.outcome),
        },
    )
    ident.append(_code("EventID", event.type_code, "DCM", EVENT_TYPES.get(event.type_code)))
    if event.subtype_code:
        ident.append(
            _code("EventTypeCode", event.subtype_code, "DCM", EVENT_TYPES.get(event.subtype_code))
        )
    if event.outcome_text:
        ET.SubElement(ident, "EventOutcomeDescription").text = event.outcome_text
    # The requestor (PS3.15 A.5.2.2), then this server as the other participant.
    requestor = ET.SubElement(
        message, "ActiveParticipant", {"UserID": event.agent, "UserIsRequestor": "true"}
    )
    if event.agent_address:
        requestor.set("NetworkAccessPointID", event.agent_address)
        requestor.set("NetworkAccessPointTypeCode", "2")  # an IP address
    ET.SubElement(
        message,
        "ActiveParticipant",
        {
            "UserID": source_id,
            "AlternativeUserID": str(os.getpid()),
            "UserIsRequestor": "false",
            "NetworkAccessPointID": host,
            "NetworkAccessPointTypeCode": "1",  # a machine name
        },
    )
    source = ET.SubElement(
        message,
        "AuditSourceIdentification",
        {"AuditSourceID": source_id, "AuditEnterpriseSiteID": event.source},
    )
    source.append(_code("AuditSourceTypeCode", "4", "DCM", "Application Server"))
    if event.patient_id:
        patient = ET.SubElement(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": event.patient_id,
                "ParticipantObjectTypeCode": "1",  # Person
                "ParticipantObjectTypeCodeRole": "1",  # Patient
            },
        )
        patient.append(_code("ParticipantObjectIDTypeCode", "2", "RFC-3881", "Patient Number"))
    if event.study_uid:
        study = ET.SubElement(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": event.study_uid,
                "ParticipantObjectTypeCode": "2",  # System Object
                "ParticipantObjectTypeCodeRole": "3",  # Report
            },
        )
        study.append(_code("ParticipantObjectIDTypeCode", "110180", "DCM", "Study Instance UID"))
    if event.entity or event.query is not None:
        what = ET.SubElement(
            message,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": event.entity or "-",
                "ParticipantObjectTypeCode": "2",
                # RFC 3881 object role 24 Query, else 4 Domain Resource
                "ParticipantObjectTypeCodeRole": "24" if event.query is not None else "4",
            },
        )
        what.append(_code("ParticipantObjectIDTypeCode", "12", "RFC-3881", "URI"))
        if event.query is not None:
            # PS3.15 A.5.3.12: the query, base64 encoded
            ET.SubElement(what, "ParticipantObjectQuery").text = base64.b64encode(
                event.query.encode()
            ).decode("ascii")
    return ET.tostring(message, encoding="utf-8", xml_declaration=True)


def _header_field(value: str, limit: int) -> str:
    """An RFC 5424 header field: printable US-ASCII, no spaces, at most ``limit``; NILVALUE
    when empty."""
    kept = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return kept or "-"


def syslog_message(event: AuditEvent, *, source_id: str, host: str) -> bytes:
    """One RFC 5424 message (6. Syslog Message Format) carrying the audit XML."""
    severity = 5 if event.outcome == 0 else 4
    header = " ".join(
        [
            f"<{_FACILITY * 8 + severity}>1",
            _datetime(event.recorded),
            _header_field(host, 255),
            _header_field(APP_NAME, 48),
            _header_field(str(os.getpid()), 128),
            _header_field(MSGID, 32),
            "-",  # no STRUCTURED-DATA
        ]
    )
    return header.encode("ascii") + b" " + _BOM + audit_xml(event, source_id=source_id, host=host)


def octet_counted(message: bytes) -> bytes:
    """RFC 6587 3.4.1 (and RFC 5425 4.3): ``MSG-LEN SP SYSLOG-MSG``."""
    return str(len(message)).encode("ascii") + b" " + message


class SyslogSender:
    """One connection to the collector, opened when needed and again after an error."""

    def __init__(self, url: str, ca_file: Path | None = None, timeout: float = 10.0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("tcp", "tls") or not parts.hostname or not parts.port:
            raise ValueError(f"syslog URL {url!r}: tcp://host:port or tls://host:port")
        self.host = parts.hostname
        self.port = parts.port
        self.timeout = timeout
        self._context: ssl.SSLContext | None = None
        if parts.scheme == "tls":
            # RFC 5425 5.1: the server is authenticated by its certificate; TLS 1.2 at least.
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._context = context
        self._sock: socket.socket | None = None

    def _connect(self) -> socket.socket:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        if self._context is not None:
            try:
                sock = self._context.wrap_socket(sock, server_hostname=self.host)
            except Exception:
                sock.close()
                raise
        return sock

    def send(self, messages: Sequence[bytes]) -> None:
        """Send every message or raise (the connection is closed then)."""
        if self._sock is None:
            self._sock = self._connect()
        try:
            self._sock.sendall(b"".join(octet_counted(m) for m in messages))
        except OSError:
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None


#: The ``audit_export`` row of this export.
EXPORT_NAME = "syslog"
#: How long a process holds the export without renewing its lease (seconds).
LEASE_SECONDS = 30.0
#: How long after a missing id is first seen its snapshot is taken: an insert takes its id a
#: moment before its transaction gets a transaction id (the snapshot must count it running).
GAP_MIN_AGE = 0.1
#: How long a missing id is waited for before a warning names it (it is still waited for).
GAP_WARN_AFTER = 60.0


@dataclass(slots=True)
class _Gap:
    """Missing ids the cursor waits at (PostgreSQL): from ``at`` up to ``upto``, the highest
    id of the read that found them. Each of them was taken before ``upto`` was, so one
    snapshot taken after that read covers them all: once it has passed, those still missing
    were rolled back, however many there are."""

    at: int
    upto: int
    since: float
    token: str | None = None
    resolved: bool = False
    warned: bool = False


class AtnaExporter:
    """Follows the audit table and sends each new event to the collector."""

    def __init__(
        self,
        archive: Archive,
        sender: SyslogSender,
        *,
        source_id: str,
        interval: float = 1.0,
        batch: int = 500,
        lease_seconds: float = LEASE_SECONDS,
        name: str = EXPORT_NAME,
    ) -> None:
        self.archive = archive
        self.sender = sender
        self.source_id = source_id
        self.host = socket.gethostname()
        self.interval = interval
        self.batch = batch
        self.lease_seconds = lease_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Unique per exporter: two in one process are two owners of the lease.
        owner = f"{self.host}:{os.getpid()}:atna:{uuid.uuid4().hex[:8]}"
        self.store = AuditExports(archive.db, name, owner)
        self.store.start()  # the first start of the export begins after the newest event
        self._gap: _Gap | None = None
        self._more = False
        self._gap_young = False  # this round left a gap waiting for its snapshot
        self.sent = 0

    def run_once(self) -> int:
        """Send the events recorded after the stored cursor (a batch) when this process holds
        the export; how many were sent (raises when the collector cannot be reached: they
        are sent on a later call)."""
        self._more = False
        self._gap_young = False
        state = self.store.state()
        if state is None:  # the row is gone (an index restored from before the export)
            self.store.start()
            return 0
        if not state.free:
            return 0  # another process exports
        cursor = state.cursor
        rows = self.store.rows(cursor, self.batch)
        if not rows:
            return 0
        held = self.store.take_lease(self.lease_seconds)
        if held is None:
            return 0  # taken by another process meanwhile
        if held != cursor:  # moved by another process since the read
            cursor = held
            rows = self.store.rows(cursor, self.batch)
        read = len(rows)
        rows = self._contiguous(cursor, rows)
        # Another round at once after a full batch, not while a gap is waited for.
        more = read == self.batch and len(rows) == read
        if not rows:
            return 0
        messages = []
        for row in rows:
            try:
                event = event_of_row(row)
                messages.append(syslog_message(event, source_id=self.source_id, host=self.host))
            except Exception:
                log.exception(
                    "audit event cannot be exported: passed", extra={"audit_event_id": row.id}
                )
        if messages:
            self.sender.send(messages)  # raises: the cursor stays, the events are sent later
        self.sent += len(messages)
        # After the collector accepted them (RFC 6587/5425 give no acknowledgement: what
        # the connection took), by compare-and-set on the cursor the round read.
        if not self.store.advance(cursor, rows[-1].id, self.lease_seconds):
            log.warning(
                "audit export lease lost: the process that holds it sends from its cursor",
                extra={"owner": self.store.owner},
            )
            return len(messages)
        self._more = self._more or more
        return len(messages)

    def _contiguous(self, cursor: int, rows: list[AuditEventRow]) -> list[AuditEventRow]:
        """The rows up to the first id still missing that a running transaction may yet
        commit (PostgreSQL); all of them on SQLite (one writer at a time: ids commit in
        their order)."""
        if self.archive.db.is_sqlite:
            return rows
        expected = cursor + 1
        for index, row in enumerate(rows):
            if row.id == expected:
                expected += 1
                continue
            gap = self._gap
            if gap is not None and gap.resolved and gap.at <= expected <= gap.upto:
                # Every transaction that may have held the missing ids has ended since, and
                # this read, made after, does not see them: they were rolled back.
                expected = row.id + 1
                continue
            if gap is None or not gap.at <= expected <= gap.upto:
                self._gap = _Gap(expected, rows[-1].id, time.monotonic())
                self._gap_young = True
                return rows[:index]
            age = time.monotonic() - gap.since
            if gap.token is None and age >= GAP_MIN_AGE:
                gap.token = current_snapshot(self.archive.db)
            if gap.token is not None and snapshot_passed(self.archive.db, gap.token):
                gap.resolved = True  # the next read sees the ids that were committed
                self._more = True
            # The snapshot is due GAP_MIN_AGE after the gap was seen: look again then, not
            # after the interval (only in a round that holds the export and read the gap).
            self._gap_young = gap.token is None
            if age >= GAP_WARN_AFTER and not gap.warned:
                gap.warned = True
                log.warning(
                    "audit export waits for a transaction that holds audit event ids",
                    extra={"from": expected, "to": row.id - 1},
                )
            return rows[:index]
        if self._gap is not None and self._gap.resolved and expected > self._gap.upto:
            self._gap = None  # every id it covered is sent or passed
        return rows

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.run_once()
                failures = 0
            except Exception as exc:
                failures += 1
                if failures == 1 or failures % 60 == 0:
                    log.warning(
                        "audit export failed (collector or index unreachable): events wait "
                        "in the index",
                        extra={"err": str(exc), "port": self.sender.port},
                    )
                self._more = False
            if not self._more:
                wait = min(self.interval * (1 + min(failures, 30)), 30.0)
                if self._gap_young and not failures:
                    wait = min(wait, GAP_MIN_AGE)
                self._stop.wait(wait)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="atna-export", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Send what is left (rounds until none is full, for ``timeout`` seconds at most: a
        backlog left is sent by the next process that exports, from the stored cursor), then
        stop and give the lease back."""
        deadline = time.monotonic() + timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():  # still sending: a second sender would interleave frames
                log.warning("audit export still busy at shutdown: last round skipped")
                self.sender.close()
                return
        try:
            self.run_once()
            while self._more and time.monotonic() < deadline:
                self.run_once()
        except Exception as exc:
            log.warning("audit events not sent at shutdown", extra={"err": str(exc)})
        self.sender.close()
        try:
            self.store.release()
        except Exception as exc:
            log.warning("audit export lease not given back", extra={"err": str(exc)})


def start_exporter(archive: Archive) -> AtnaExporter | None:
    """The exporter ``audit.syslog_url`` asks for (started), or None."""
    settings = archive.settings
    if not settings.audit.syslog_url:
        return None
    sender = SyslogSender(settings.audit.syslog_url, settings.audit.syslog_ca_file)
    exporter = AtnaExporter(archive, sender, source_id=settings.ae_title)
    exporter.start()
    return exporter
