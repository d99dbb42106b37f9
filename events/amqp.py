"""RabbitMQ (AMQP 0-9-1): each event is one persistent message on a durable topic exchange.

Routing key = the event type (``study.stable``, ``order.scheduled``…), so that a consumer
binds its queue to the patterns it wants (``study.*``, ``order.#``, ``#``). Message
properties: ``message_id`` = the event id (de-duplication), ``type`` = the event type,
``content_type`` ``application/json``, ``delivery_mode`` 2 (persistent), ``timestamp`` (the
event's time), ``app_id`` ``pacsbridge`` and the headers ``study`` and ``sequence``.

Publisher confirms (RabbitMQ's ``confirm.select``): a publish counts only when the broker
has taken responsibility for it (``basic.ack``). A batch is published as one pipeline — every
message written, then the confirms awaited together — so that a message costs a few tens of
microseconds of CPU, not a round trip. py-amqp opens the connection and the channel and reads
the confirms; the ``basic.publish`` frames of a batch are encoded here (:class:`PublishFrames`)
and written with one send: the library's general encoder costs about three times as much CPU
per message, which the server's ingest would pay. A nack, a dropped connection or a refused one is a
channel failure: the messages confirmed before it count, the rest of the batch is sent again
(nothing is lost; a consumer may see a message twice and de-duplicates on its id). A message
no queue is bound for (``mandatory``, returned by the broker with ``basic.return``) fails that
event, so that an event is never silently dropped: bind a queue for every type the
subscription selects, or narrow its types. Events of the same study published in the same
batch after such a message are not held back behind it (they were on their way); later
batches hold them.
"""

from __future__ import annotations

import contextlib
import logging
import struct
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import amqp

from archive.subscriptions import EventRecord, mask_url
from events.channel import ChannelDown

log = logging.getLogger(__name__)

#: What a broken connection raises: the library's errors and the socket's.
_CONNECTION_ERRORS = (amqp.exceptions.AMQPError, OSError)


def connection_parameters(url: str) -> dict[str, Any]:
    """The py-amqp connection arguments of an ``amqp://`` / ``amqps://`` URL (RabbitMQ's URI
    spec: ``amqp://user:password@host:port/vhost``, the vhost percent-encoded, ``%2F`` for
    ``/``; no path means ``/``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(f"not an AMQP URL (amqp:// or amqps://): {mask_url(url)}")
    secure = parts.scheme == "amqps"
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if secure else 5672)
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return {
        "host": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "userid": unquote(parts.username) if parts.username is not None else "guest",
        "password": unquote(parts.password) if parts.password is not None else "guest",
        "virtual_host": unquote(path) if parts.path else "/",
        # py-amqp takes TLS options as a dict: a default context (certificate verified
        # against the system's CAs) that checks the broker's name, which it sends by SNI.
        "ssl": {
            "context": {"check_hostname": True},
            "server_hostname": host,
            "do_handshake_on_connect": False,
        }
        if secure
        else False,
    }


# --- basic.publish frames (AMQP 0-9-1) ----------------------------------------------------------
# amqp0-9-1.pdf 4.2.3 (a frame: type octet, channel short, size long, payload, frame-end 0xCE),
# 4.2.6 (content: a method frame, a content header frame, body frames of at most frame-max - 8
# octets), 1.8.3.7 (basic.publish: reserved-1 short, exchange shortstr, routing-key shortstr,
# mandatory and immediate bits) and the basic class's property list (flags from bit 15 down:
# content-type, content-encoding, headers, delivery-mode, priority, correlation-id, reply-to,
# expiration, message-id, timestamp, type, user-id, app-id). Field table values as RabbitMQ reads
# them (its AMQP 0-9-1 errata): S long string, I signed 32-bit, l signed 64-bit, t boolean, V void.
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY = 1, 2, 3
_FRAME_END = b"\xce"
_CLASS_BASIC, _METHOD_PUBLISH = 60, 40
_FLAG_CONTENT_TYPE = 0x8000
_FLAG_HEADERS = 0x2000
_FLAG_DELIVERY_MODE = 0x1000
_FLAG_MESSAGE_ID = 0x0080
_FLAG_TIMESTAMP = 0x0040
_FLAG_TYPE = 0x0020
_FLAG_APP_ID = 0x0008
_PUBLISH_FLAGS = (
    _FLAG_CONTENT_TYPE
    | _FLAG_HEADERS
    | _FLAG_DELIVERY_MODE
    | _FLAG_MESSAGE_ID
    | _FLAG_TIMESTAMP
    | _FLAG_TYPE
    | _FLAG_APP_ID
)
_PERSISTENT = 2
_FRAME_HEAD = struct.Struct(">BHI")
_HEADER_HEAD = struct.Struct(">HHQH")


def _shortstr(value: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > 255:
        raise ValueError(f"an AMQP short string is at most 255 octets: {value[:40]!r}...")
    return bytes((len(data),)) + data


def _table(values: Mapping[str, str | int | bool | None]) -> bytes:
    out = bytearray()
    for key, value in values.items():
        out += _shortstr(key)
        if value is None:
            out += b"V"
        elif isinstance(value, bool):
            out += b"t" + bytes((int(value),))
        elif isinstance(value, int):
            out += (
                b"I" + struct.pack(">i", value)
                if -(2**31) <= value < 2**31
                else b"l" + struct.pack(">q", value)
            )
        else:
            data = value.encode("utf-8")
            out += b"S" + struct.pack(">I", len(data)) + data
    return struct.pack(">I", len(out)) + bytes(out)


class PublishFrames:
    """The frames of ``basic.publish`` on one channel to one exchange: a method frame per
    routing key (built once), then per message its content header and body frames."""

    def __init__(self, channel_id: int, exchange: str, *, mandatory: bool, frame_max: int) -> None:
        self.channel_id = channel_id
        self.exchange = _shortstr(exchange)
        self.mandatory = mandatory
        self.chunk = max(1, frame_max - 8)  # the body frame's payload at most
        self._methods: dict[str, bytes] = {}

    def _frame(self, kind: int, payload: bytes) -> bytes:
        return _FRAME_HEAD.pack(kind, self.channel_id, len(payload)) + payload + _FRAME_END

    def method(self, routing_key: str) -> bytes:
        frame = self._methods.get(routing_key)
        if frame is None:
            payload = (
                struct.pack(">HHH", _CLASS_BASIC, _METHOD_PUBLISH, 0)
                + self.exchange
                + _shortstr(routing_key)
                + bytes((1 if self.mandatory else 0,))  # mandatory bit 0, immediate bit 1 off
            )
            frame = self._methods[routing_key] = self._frame(_FRAME_METHOD, payload)
        return frame

    def message(
        self,
        routing_key: str,
        body: bytes,
        *,
        content_type: str,
        message_id: str,
        type: str,
        timestamp: int,
        app_id: str,
        headers: Mapping[str, str | int | bool | None],
    ) -> bytes:
        """A persistent message's frames (delivery-mode 2), ready to be written."""
        header = (
            _HEADER_HEAD.pack(_CLASS_BASIC, 0, len(body), _PUBLISH_FLAGS)
            + _shortstr(content_type)
            + _table(headers)
            + bytes((_PERSISTENT,))
            + _shortstr(message_id)
            + struct.pack(">Q", timestamp)
            + _shortstr(type)
            + _shortstr(app_id)
        )
        parts = [self.method(routing_key), self._frame(_FRAME_HEADER, header)]
        for start in range(0, len(body), self.chunk):
            parts.append(self._frame(_FRAME_BODY, body[start : start + self.chunk]))
        return b"".join(parts)


class AmqpChannel:
    """One connection (heartbeats on) and one confirming channel, opened on first use and
    reopened after a failure."""

    def __init__(
        self,
        url: str,
        exchange: str,
        *,
        heartbeat: int = 30,
        mandatory: bool = True,
        timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.exchange = exchange
        self.heartbeat = heartbeat
        self.mandatory = mandatory
        self.timeout = timeout
        self._connection: Any = None
        self._channel: Any = None
        self._frames: PublishFrames | None = None
        self._tag = 0  # the delivery tag of the last message published on the channel
        self._pending: dict[int, int] = {}  # delivery tag -> index in the batch
        self._acked: set[int] = set()  # indexes confirmed
        self._nacked: set[int] = set()
        self._returned: dict[str, str] = {}  # message id -> why the broker returned it

    def _open(self) -> None:
        try:
            params = connection_parameters(self.url)
        except ValueError as exc:  # its text may quote part of the URL's password
            raise ChannelDown(f"not a valid AMQP URL: {mask_url(self.url)}") from exc
        connection = amqp.Connection(
            **params,
            heartbeat=self.heartbeat,
            connect_timeout=self.timeout,
            read_timeout=self.timeout,
            write_timeout=self.timeout,
            client_properties={"connection_name": "pacsbridge events"},
        )
        try:
            connection.connect()
        except _CONNECTION_ERRORS as exc:
            with contextlib.suppress(Exception):
                connection.collect()
            raise ChannelDown(f"cannot connect to {mask_url(self.url)}: {_reason(exc)}") from exc
        try:
            channel = connection.channel()
            channel.exchange_declare(self.exchange, "topic", durable=True, auto_delete=False)
            channel.confirm_select()
        except _CONNECTION_ERRORS as exc:
            with contextlib.suppress(Exception):
                connection.close()
            raise ChannelDown(f"exchange {self.exchange!r}: {_reason(exc)}") from exc
        self._frames = PublishFrames(
            channel.channel_id,
            self.exchange,
            mandatory=self.mandatory,
            frame_max=int(connection.frame_max),
        )
        channel.events["basic_ack"].add(self._on_ack)
        channel.events["basic_nack"].add(self._on_nack)
        channel.events["basic_return"].add(self._on_return)
        self._connection, self._channel, self._tag = connection, channel, 0
        log.info(
            "connected to the AMQP broker",
            extra={"broker": mask_url(self.url), "exchange": self.exchange},
        )

    # --- confirms (called by the library while it reads the connection) -------------------

    def _confirmed(self, tag: int, multiple: bool) -> list[int]:
        tags = [t for t in self._pending if t <= tag] if multiple else [tag]
        return [self._pending.pop(t) for t in tags if t in self._pending]

    def _on_ack(self, tag: int, multiple: bool) -> None:
        self._acked.update(self._confirmed(tag, multiple))

    def _on_nack(self, tag: int, multiple: bool) -> None:
        self._nacked.update(self._confirmed(tag, multiple))

    def _on_return(self, exc: Exception, exchange: str, routing_key: str, message: Any) -> None:
        message_id = str(message.properties.get("message_id", ""))
        self._returned[message_id] = (
            f"no queue is bound to exchange {exchange!r} for {routing_key!r} ({exc})"
        )

    # --- delivery -------------------------------------------------------------------------

    def deliver(self, event: EventRecord, body: bytes) -> str | None:
        return self.deliver_many([(event, body)])[0]

    def deliver_many(self, items: Sequence[tuple[EventRecord, bytes]]) -> list[str | None]:
        """Publish ``items`` in order and wait for their confirms: per item, None when the
        broker confirmed it, else why it failed (returned unroutable). Raises
        :class:`ChannelDown` (with ``done``: how many leading items were confirmed) when the
        connection fails or the broker nacks."""
        if not items:
            return []
        if self._channel is None:
            self._open()
        self._pending.clear()
        self._acked.clear()
        self._nacked.clear()
        self._returned.clear()
        frames = self._frames
        assert frames is not None
        data = bytearray()
        for event, body in items:  # encoded first: a tag is taken only by what is sent
            data += frames.message(
                event.type,
                body,
                content_type="application/json",
                message_id=event.event_id,
                type=event.type,
                timestamp=int(event.created_at.timestamp()),
                app_id="pacsbridge",
                headers={"study": event.study_instance_uid, "sequence": event.id},
            )
        for index in range(len(items)):
            self._tag += 1
            self._pending[self._tag] = index
        try:
            # The batch in one send: it leaves in full segments, not a small packet per frame,
            # which spares the broker's CPU as much as ours.
            self._connection.transport.write(bytes(data))
            self._connection.bytes_sent += 1  # what the library's heartbeat check looks at
            deadline = time.monotonic() + self.timeout
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no confirm within {self.timeout:g} s")
                self._connection.drain_events(timeout=remaining)
        except _CONNECTION_ERRORS as exc:
            done = self._prefix_done(items)
            self._drop()
            raise ChannelDown(
                f"publish to {mask_url(self.url)}: {_reason(exc)}", done=done
            ) from exc
        if self._nacked:
            done = self._prefix_done(items)
            self._drop()
            raise ChannelDown("the broker refused a message (nack)", done=done)
        return [self._returned.get(event.event_id) for event, _body in items]

    def _prefix_done(self, items: Sequence[tuple[EventRecord, bytes]]) -> int:
        """How many leading items of the batch the broker confirmed and routed."""
        done = 0
        while (
            done < len(items)
            and done in self._acked
            and items[done][0].event_id not in self._returned
        ):
            done += 1
        return done

    def idle(self) -> None:
        """Answer the broker's heartbeats while nothing is published."""
        if self._connection is None:
            return
        try:
            self._connection.heartbeat_tick()
            with contextlib.suppress(TimeoutError):
                self._connection.drain_events(timeout=0)
        except _CONNECTION_ERRORS:
            self._drop()

    def _drop(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        self._pending.clear()
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.collect()  # the socket may be gone: no close handshake

    def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()
            with contextlib.suppress(Exception):
                connection.collect()


def _reason(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}"[:500]
