"""What the dispatcher asks of a channel."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from archive.subscriptions import EventRecord


class ChannelDown(Exception):
    """The channel itself cannot be reached (broker down, connection refused): nothing of the
    batch from this event on was delivered; the whole subscription backs off and retries.
    ``done``: how many leading events of a batch (:meth:`BatchChannel.deliver_many`) were
    delivered before it failed."""

    def __init__(self, message: str, *, done: int = 0) -> None:
        super().__init__(message)
        self.done = done
        self.cursor: int | None = None
        """Set by the dispatcher: the outbox id its cursor may move to (what was delivered)."""


class Channel(Protocol):
    def deliver(self, event: EventRecord, body: bytes) -> str | None:
        """Deliver one event (``body``: its envelope). None when delivered (or when the
        channel has nothing to send for it); the reason when this event failed (retried with
        back-off, ``dead`` after the most attempts). Raises :class:`ChannelDown`."""
        ...

    def idle(self) -> None:
        """Called when there is nothing to deliver (keep a connection alive)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class BatchChannel(Channel, Protocol):
    """A channel that delivers a batch at once (AMQP: one pipeline of publishes, then the
    publisher confirms together)."""

    def deliver_many(self, items: Sequence[tuple[EventRecord, bytes]]) -> list[str | None]:
        """Deliver ``items`` in order: per item, None when delivered, else why it failed.
        Raises :class:`ChannelDown` with ``done`` set."""
        ...
