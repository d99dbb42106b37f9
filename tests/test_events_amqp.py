"""Events to the real RabbitMQ on 127.0.0.1:5672: each event once (after de-duplication by
message id), in order per study, with the envelope and message properties documented in
``events/amqp.py`` and ``events/envelope.py``; a broker connection cut in the middle of a
stream loses nothing; a message no queue takes fails its event and holds the later events of
its study until it goes through. On SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pika
import pytest
from pydicom.uid import generate_uid

from archive import Archive
from archive.outbox import emit
from archive.subscriptions import Subscriptions
from config.settings import EventsSettings
from events import Dispatcher, Envelope
from tests.conftest import Backend, require_tool, start_server
from tests.dicom_factory import write_series

AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
AMQP_URL = f"amqp://guest:guest@{AMQP_HOST}:{AMQP_PORT}/%2F"
ENVELOPE = Envelope(
    source="https://pacs.test",
    fhir_base="https://pacs.test/fhir",
    dicomweb_base="https://pacs.test/dicom-web",
)


def _broker_up() -> bool:
    with contextlib.suppress(OSError), socket.create_connection((AMQP_HOST, AMQP_PORT), 2):
        return True
    return False


pytestmark = pytest.mark.skipif(not _broker_up(), reason="no RabbitMQ on 127.0.0.1:5672")


@dataclass
class Message:
    routing_key: str
    message_id: str
    properties: Any
    body: dict[str, Any]


class Consumer:
    """A queue of its own bound to the test's exchange (``binding`` patterns)."""

    def __init__(self, exchange: str, bindings: tuple[str, ...] = ("#",)) -> None:
        self.exchange = exchange
        self.connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        self.channel = self.connection.channel()
        self.channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        self.queue = self.channel.queue_declare("", exclusive=True).method.queue
        for pattern in bindings:
            self.bind(pattern)
        self.messages: list[Message] = []

    def bind(self, pattern: str) -> None:
        self.channel.queue_bind(self.queue, self.exchange, routing_key=pattern)

    def drain(self, want: int, timeout: float = 30.0) -> list[Message]:
        """Messages until ``want`` distinct message ids arrived (or the timeout)."""
        deadline = time.monotonic() + timeout
        while len({m.message_id for m in self.messages}) < want and time.monotonic() < deadline:
            method, properties, body = self.channel.basic_get(self.queue, auto_ack=True)
            if method is None:
                self.connection.sleep(0.05)
                continue
            self.messages.append(
                Message(method.routing_key, properties.message_id, properties, json.loads(body))
            )
        return self.messages

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.channel.exchange_delete(self.exchange)
        with contextlib.suppress(Exception):
            self.connection.close()


@pytest.fixture
def arc(index_backend: Backend) -> Iterator[Archive]:
    archive = Archive(index_backend.settings)
    yield archive
    archive.close()


@pytest.fixture
def exchange() -> str:
    return f"test.events.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def consumer(exchange: str) -> Iterator[Consumer]:
    consumer = Consumer(exchange)
    yield consumer
    consumer.close()


def fast(**overrides: Any) -> EventsSettings:
    values: dict[str, Any] = {"poll_interval": 0.05, "backoff_base": 0.05, "backoff_max": 0.5}
    return EventsSettings(**(values | overrides))


def drain_dispatcher(dispatcher: Dispatcher, rounds: int = 50) -> None:
    for _ in range(rounds):
        result = dispatcher.run_once()
        if not result.more and not result.delivered and not result.failed:
            return


def emit_one(arc: Archive, type_: str, study: str | None, **data: Any) -> str:
    with arc.db.write_connection() as conn:
        return emit(
            conn,
            type_,
            study_uid=study,
            patient_id="PAT-7" if study else None,
            resource=f"ImagingStudy/{study}" if study else "Invoice/9",
            data=data,
        )


def test_each_event_once_in_order_with_envelope(
    arc: Archive, exchange: str, consumer: Consumer
) -> None:
    store = Subscriptions(arc.db)
    emit_one(arc, "instance.stored", "1.2.3.0", n=-1)  # before the subscription: not sent
    store.create(
        "mq",
        channel="amqp",
        endpoint=AMQP_URL,
        event_types=["instance.*", "study.#", "invoice.paid"],
        options={"exchange": exchange},
    )
    studies = ["1.2.3.1", "1.2.3.2", "1.2.3.3"]
    sent: list[tuple[str, str, str | None]] = []
    for n in range(30):
        study = studies[n % 3]
        kind = "study.stable" if n % 5 == 4 else "instance.stored"
        sent.append((emit_one(arc, kind, study, n=n), kind, study))
        if n == 10:
            emit_one(arc, "charge.created", study, n=n)  # not among the types: never sent
    sent.append((emit_one(arc, "invoice.paid", None, n=99), "invoice.paid", None))
    dispatcher = Dispatcher(store, fast(), ENVELOPE, name="amqp-test")
    drain_dispatcher(dispatcher)
    dispatcher.close()
    messages = consumer.drain(len(sent))
    consumer.connection.sleep(0.3)
    messages = consumer.drain(len(sent) + 1, timeout=0.5)  # nothing more arrives
    assert [m.message_id for m in messages] == [event_id for event_id, _, _ in sent]
    first = messages[0]
    assert first.routing_key == "instance.stored"
    assert first.properties.delivery_mode == 2
    assert first.properties.content_type == "application/json"
    assert first.properties.type == "instance.stored"
    assert first.properties.headers["study"] == "1.2.3.1"
    assert first.properties.app_id == "pacsbridge"
    body = first.body
    assert first.properties.headers["sequence"] == body["sequence"]
    assert body["id"] == sent[0][0] and body["type"] == "instance.stored"
    assert body["study"] == "1.2.3.1" and body["data"] == {"n": 0}
    assert body["source"] == "https://pacs.test"
    assert body["links"] == {
        "fhir": "https://pacs.test/fhir/ImagingStudy/1.2.3.1",
        "dicomweb": "https://pacs.test/dicom-web/studies/1.2.3.1",
    }
    assert body["time"].endswith("Z") and "patient" not in body  # include_phi is off
    assert abs(first.properties.timestamp - time.time()) < 120
    last = messages[-1].body
    assert last["type"] == "invoice.paid" and last["study"] is None
    assert last["links"] == {"fhir": "https://pacs.test/fhir/Invoice/9"}
    sequences = [m.body["sequence"] for m in messages]
    assert sequences == sorted(sequences)
    assert store.get("mq") is not None and store.get("mq").cursor == store.head()  # type: ignore[union-attr]


def test_include_phi_puts_the_patient_id(arc: Archive, exchange: str, consumer: Consumer) -> None:
    store = Subscriptions(arc.db)
    store.create("mq", channel="amqp", endpoint=AMQP_URL, options={"exchange": exchange})
    event_id = emit_one(arc, "study.stable", "1.2.9")
    phi = Envelope(source="urn:pacsbridge:TEST", include_phi=True)
    drain_dispatcher(Dispatcher(store, fast(), phi, name="phi"))
    (message,) = consumer.drain(1)
    assert message.message_id == event_id
    assert message.body["patient"] == {"id": "PAT-7"}
    assert message.body["links"] == {} and message.body["source"] == "urn:pacsbridge:TEST"


class Proxy:
    """A TCP relay on 127.0.0.1 in front of RabbitMQ that the test cuts and restores."""

    def __init__(self) -> None:
        self.port = 0
        self._server: socket.socket | None = None
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self.open()

    def open(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self.port = server.getsockname()[1]
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((AMQP_HOST, AMQP_PORT))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Refuse new connections and break the open ones."""
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
            self._server.close()
            self._server = None
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.cut()


def test_broker_connection_cut_loses_nothing(
    arc: Archive, exchange: str, consumer: Consumer
) -> None:
    proxy = Proxy()
    store = Subscriptions(arc.db)
    store.create(
        "mq",
        channel="amqp",
        endpoint=f"amqp://guest:guest@127.0.0.1:{proxy.port}/%2F",
        options={"exchange": exchange},
    )
    dispatcher = Dispatcher(store, fast(), ENVELOPE, name="cut")
    dispatcher.start()
    studies = [f"1.2.4.{i}" for i in range(4)]
    sent: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            sent.append(emit_one(arc, "instance.stored", studies[n % 4], n=n))
            n += 1
            time.sleep(0.005)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        consumer.drain(60)
        assert len(consumer.messages) >= 60, "events flowed before the cut"
        proxy.cut()
        # The dispatcher notices: the subscription is in error, backing off.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            sub = store.get("mq")
            assert sub is not None
            if sub.status == "error" and sub.attempts >= 2:
                break
            time.sleep(0.05)
        assert sub is not None and sub.status == "error"
        assert sub.error and "connect" in sub.error.lower()
        proxy.open()  # the same port again
        producer.join(60)
        stop.set()
        messages = consumer.drain(len(sent), timeout=60)
    finally:
        stop.set()
        producer.join(10)
        dispatcher.stop(10)
        proxy.close()
    unique: dict[str, Message] = {}
    for message in messages:
        unique.setdefault(message.message_id, message)
    assert set(unique) == set(sent) and len(sent) == 400
    for study in studies:
        seen = [m.body["data"]["n"] for m in unique.values() if m.body["study"] == study]
        assert seen == sorted(seen) and len(seen) == 100
    sub = store.get("mq")
    assert sub is not None and sub.status == "active" and sub.error is None
    assert sub.counts == {}  # no delivery row: the channel failed, not the events


def test_unroutable_event_holds_its_study(arc: Archive, exchange: str) -> None:
    """A message no queue takes fails its event; the events of its study that were on their
    way in the same pipelined batch still go, the later ones wait behind it; other studies go
    on. Once a queue takes it, it goes, then the ones held."""
    consumer = Consumer(exchange, bindings=("instance.*",))
    try:
        store = Subscriptions(arc.db)
        store.create("mq", channel="amqp", endpoint=AMQP_URL, options={"exchange": exchange})
        a, b = "1.2.5.1", "1.2.5.2"
        first = emit_one(arc, "instance.stored", a)
        stable = emit_one(arc, "study.stable", a)  # no queue takes study.*: fails
        along = emit_one(arc, "instance.stored", a)  # in the same batch: on its way already
        other = emit_one(arc, "instance.stored", b)  # another study: goes
        dispatcher = Dispatcher(store, fast(), ENVELOPE, name="unroutable")
        drain_dispatcher(dispatcher, rounds=3)
        assert [m.message_id for m in consumer.drain(3, timeout=5)] == [first, along, other]
        after = emit_one(arc, "instance.stored", a)  # a later batch: waits behind it
        later = emit_one(arc, "instance.stored", b)
        drain_dispatcher(dispatcher, rounds=3)
        assert [m.message_id for m in consumer.drain(4, timeout=5)][3:] == [later]
        listed = {e["id"]: e for e in store.events(limit=10)}
        assert listed[stable]["deliveries"][0]["status"] == "failed"
        assert "no queue is bound" in listed[stable]["deliveries"][0]["last_error"]
        assert listed[after]["deliveries"][0]["status"] == "held"
        assert listed[other]["deliveries"] == [] and listed[other]["pending"] == []
        consumer.bind("study.*")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(consumer.messages) < 6:
            dispatcher.run_once()
            consumer.drain(6, timeout=0.2)
        dispatcher.close()
        assert [m.message_id for m in consumer.messages] == [
            first,
            along,
            other,
            later,
            stable,
            after,
        ]
        statuses = {e["id"]: [d["status"] for d in e["deliveries"]] for e in store.events()}
        assert statuses[stable] == ["delivered"] and statuses[after] == ["delivered"]
        sub = store.get("mq")
        assert sub is not None and sub.status == "active"
    finally:
        consumer.close()


def test_unreachable_broker_backs_off_without_moving_the_cursor(arc: Archive) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = Subscriptions(arc.db)
    sub = store.create("down", channel="amqp", endpoint=f"amqp://guest:guest@127.0.0.1:{port}/%2F")
    emit_one(arc, "study.stable", "1.2.6.1")
    dispatcher = Dispatcher(store, fast(backoff_base=5.0, backoff_max=60.0), ENVELOPE, name="d")
    dispatcher.run_once()
    after = store.get("down")
    assert after is not None
    assert after.cursor == sub.cursor and after.attempts == 1 and after.status == "error"
    assert after.next_attempt_at is not None and after.error and "cannot connect" in after.error
    dispatcher.run_once()  # backing off: not tried again yet
    again = store.get("down")
    assert again is not None and again.attempts == 1
    dispatcher.close()


@pytest.mark.parametrize(
    ("frame_max", "body_size", "study"),
    [(131072, 700, "1.2.840.113619.2.55.3.1"), (4096, 10_000, None), (4096, 0, "1.2.3")],
)
def test_publish_frames_are_the_library_encoding(
    frame_max: int, body_size: int, study: str | None
) -> None:
    """The frames ``events/amqp.py`` writes for a publish are, octet for octet, those that
    py-amqp's own encoder writes for the same message (a body larger than a frame included)."""
    import amqp
    from amqp.method_framing import frame_writer
    from amqp.serialization import dumps

    from events.amqp import PublishFrames

    written: list[bytes] = []

    class Transport:
        def write(self, data: Any) -> None:
            written.append(bytes(data))

    class Connection:
        bytes_sent = 0

    connection = Connection()
    connection.frame_max = frame_max  # type: ignore[attr-defined]
    write = frame_writer(connection, Transport())
    body = bytes(range(256)) * (body_size // 256) + b"x" * (body_size % 256)
    properties: dict[str, Any] = {
        "content_type": "application/json",
        "message_id": str(uuid.uuid4()),
        "type": "study.stable",
        "timestamp": 1_796_000_000,
        "app_id": "pacsbridge",
    }
    headers = {"study": study, "sequence": 2**31 - 1}
    message = amqp.Message(body, delivery_mode=2, application_headers=dict(headers), **properties)
    write(
        1,
        7,
        (60, 40),
        dumps("Bssbb", (0, "pacsbridge.events", "study.stable", True, False)),
        message,
    )
    ours = PublishFrames(7, "pacsbridge.events", mandatory=True, frame_max=frame_max).message(
        "study.stable", body, headers=headers, **properties
    )
    assert ours == b"".join(written)


def test_amqp_url_password_is_masked(arc: Archive) -> None:
    store = Subscriptions(arc.db)
    record = store.create("m", channel="amqp", endpoint="amqp://user:s3cret@broker:5672/%2F")
    shown = record.to_json()
    assert shown["endpoint"] == "amqp://user:***@broker:5672/%2F"
    assert "s3cret" not in json.dumps(shown)


def test_serve_delivers_its_events(
    index_backend: Backend, exchange: str, consumer: Consumer, tmp_path: Path
) -> None:
    """A running ``pacsbridge serve`` with a subscription of its settings: DCMTK ``storescu``
    stores a series, and the consumer gets each ``instance.stored`` and then ``study.stable``
    of the study, with the server's links. They come from ``serve``'s event delivery process;
    killed, it is replaced, and the next study's events arrive as well."""
    storescu = require_tool("storescu")
    events = {
        "subscriptions": {
            "mq": {"channel": "amqp", "url": AMQP_URL, "exchange": exchange, "types": ["#"]}
        }
    }
    server = start_server(
        index_backend,
        tmp_path,
        PACSBRIDGE_EVENTS=json.dumps(events),
        PACSBRIDGE_PUBLIC_URL="https://pacs.example",
        PACSBRIDGE_STABLE_AGE="1",
        PACSBRIDGE_STABLE_SCAN_INTERVAL="0.5",
    )

    def send(study: str, folder: Path) -> None:
        files = write_series(folder, 3, study_uid=study)
        sent = subprocess.run(
            [storescu, "-aec", server.ae_title, "127.0.0.1", str(server.dimse_port)]
            + [str(f) for f in files],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr

    try:
        study = generate_uid()
        send(study, tmp_path / "series")
        messages = list(consumer.drain(4, timeout=30))
        (delivery,) = _event_processes(server.proc.pid)
        os.kill(delivery, signal.SIGKILL)
        later = generate_uid()
        send(later, tmp_path / "later")
        # Drained by distinct ids: one the killed process published without recording it
        # comes again (at least once).
        everything = consumer.drain(8, timeout=60)
        assert [p for p in _event_processes(server.proc.pid) if p != delivery]
        assert "event delivery process ended; starting another" in server.log()
    finally:
        assert server.stop() == 0, server.log()[-3000:]
    assert not _event_processes(server.proc.pid)  # it stopped with serve
    replaced = list({m.message_id: m for m in everything if m.body["study"] == later}.values())
    assert [m.routing_key for m in replaced] == ["instance.stored"] * 3 + ["study.stable"]
    assert [m.routing_key for m in messages] == ["instance.stored"] * 3 + ["study.stable"]
    assert {m.body["study"] for m in messages} == {study}
    assert messages[-1].body["links"]["dicomweb"] == (
        f"https://pacs.example/dicom-web/studies/{study}"
    )
    assert messages[0].body["source"] == "https://pacs.example"
    assert "patient" not in messages[0].body
    assert len({m.message_id for m in messages}) == 4


def _event_processes(pid: int) -> list[int]:
    """The live event delivery processes that ``pid`` started (their name is set)."""
    from pacsbridge.event_process import PROCESS_NAME

    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            name = (entry / "comm").read_text().strip()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and name == PROCESS_NAME and fields[0] != "Z":
            found.append(int(entry.name))
    return found
