"""The dispatcher: a thread that delivers the outbox to every subscription.

Each round, for every subscription to deliver (``active`` or ``error``) that this process can
hold (a lease in the index: one process delivers a subscription at a time, which keeps the
order):

1. retries: its ``failed`` deliveries that are due and its ``held`` ones whose study has no
   earlier failing delivery left, in event order, a batch at a time;
2. new events: those after its cursor (a batch in id order), filtered by its types. An event
   whose study has a failed or held delivery waits behind it (``held``); an event that fails
   gets a ``failed`` row (retried with exponential back-off, ``dead`` after the
   subscription's most attempts). The cursor moves past them in the same transaction that
   writes those rows.

When the channel itself fails (broker down, connection refused) the cursor stays where the
last delivered event left it: the subscription backs off (``attempts``, ``next_attempt_at``)
and the same events are tried again — nothing is lost. Delivery is at least once: a
process that dies between a publish and the cursor's commit publishes those events again;
consumers de-duplicate on the event id.

On PostgreSQL an outbox id is taken when its transaction inserts the event, not when it
commits: a later id can be visible before an earlier one. The cursor therefore never passes
a missing id while a transaction that was running when the gap was seen may still commit it
(``txid_current_snapshot``); an id missing after ``events.gap_timeout`` is passed (a rolled
back transaction) but watched for a while should it still appear.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from archive.subscriptions import (
    EventRecord,
    SubscriptionRecord,
    Subscriptions,
    types_match,
)
from config.settings import EventsSettings
from events import metrics
from events.amqp import AmqpChannel
from events.channel import BatchChannel, Channel, ChannelDown
from events.envelope import Envelope
from events.resthook import RestHookChannel, RestHookRender
from events.webhook import WebhookChannel

log = logging.getLogger(__name__)

#: How long an outbox id passed by ``gap_timeout`` is still looked for (seconds).
LATE_WATCH = 600.0
#: The snapshot that resolves a gap is taken this long after the gap is seen (an insert takes
#: its id a moment before its transaction id).
GAP_MIN_AGE = 0.1


class _LeaseLost(Exception):
    """Another process took the subscription over (this one was too slow to renew)."""


@dataclass(slots=True)
class _Gap:
    at: int
    since: float
    token: str | None
    resolved: bool = False
    timed_out: bool = False


@dataclass(slots=True)
class _State:
    """What this process keeps of one subscription between rounds."""

    version: int
    channel: Channel
    gap: _Gap | None = None
    late: dict[int, float] = field(default_factory=dict)
    """Outbox ids passed by the gap timeout → until when they are looked for."""


@dataclass(slots=True)
class RoundResult:
    delivered: int = 0
    failed: int = 0
    more: bool = False


class Dispatcher:
    """Delivers events until :meth:`stop`; :meth:`run_once` is one round (tests call it)."""

    def __init__(
        self,
        store: Subscriptions,
        settings: EventsSettings,
        envelope: Envelope,
        *,
        name: str | None = None,
        rest_hook_render: RestHookRender | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.envelope = envelope
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:events"
        self.rest_hook_render = rest_hook_render
        self._states: dict[int, _State] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_prune = 0.0

    # --- the thread ---------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)
        self._thread.start()
        log.info("event dispatcher started", extra={"dispatcher": self.name})

    def wake(self) -> None:
        """Look at the outbox now rather than at the next poll."""
        self._wake.set()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop after the current delivery; close the channels and give the leases back."""
        self._stop.set()
        self._wake.set()
        stopped = True
        if self._thread is not None:
            self._thread.join(timeout)
            stopped = not self._thread.is_alive()
        if stopped:
            self.close()
        return stopped

    def close(self) -> None:
        for sub_id, state in list(self._states.items()):
            with contextlib.suppress(Exception):
                state.channel.close()
            with contextlib.suppress(Exception):
                self.store.release_lease(sub_id, self.name)
        self._states.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                result = self.run_once()
            except Exception:
                log.exception("event dispatcher round failed")
                result = RoundResult()
                self._stop.wait(min(5.0, self.settings.backoff_max))
            self._prune_due()
            if not result.more:
                self._wake.wait(self.settings.poll_interval)
                self._wake.clear()

    def _prune_due(self) -> None:
        now = time.monotonic()
        if now < self._next_prune:
            return
        self._next_prune = now + 3600.0
        try:
            self.store.prune(self.settings.retention_days)
        except Exception:
            log.exception("pruning delivered events failed")

    # --- one round ----------------------------------------------------------------------------
    def run_once(self) -> RoundResult:
        """One look at every subscription; ``more`` when a batch was full (or a gap was just
        resolved), so that the next round should not wait."""
        total = RoundResult()
        subs = self.store.active()
        live = {sub.id for sub in subs}
        for sub_id in [i for i in self._states if i not in live]:
            self._forget(sub_id)
        if not subs:
            return total
        head = self.store.head()
        due = self.store.due()
        for sub in subs:
            if self._stop.is_set():
                break
            # Read per subscription: serving the ones before may have taken a while, and the
            # lease left is measured from now.
            now = datetime.now(UTC)
            if sub.next_attempt_at is not None and sub.next_attempt_at > now:
                continue  # the channel backs off
            when, held = due.get(sub.id, (None, 0))
            retries = held > 0 or (when is not None and when <= now)
            state = self._states.get(sub.id)
            late = bool(state and state.late)
            if head <= sub.cursor and not retries and not late:
                if state is not None:
                    state.channel.idle()
                continue
            if (
                sub.locked_by not in (None, self.name)
                and sub.locked_until is not None
                and sub.locked_until > now
            ):
                continue  # another process delivers it
            held_sub: SubscriptionRecord | None = sub
            left = (
                (sub.locked_until - now).total_seconds()
                if sub.locked_by == self.name and sub.locked_until is not None
                else 0.0
            )
            if left < self.settings.lease_seconds / 2:  # renew (or take) the lease
                held_sub = self.store.take_lease(sub.id, self.name, self.settings.lease_seconds)
            if held_sub is None:
                continue
            # Its retries are read only when it has failed or held deliveries at all.
            result = self._serve(held_sub, owes=sub.id in due)
            total.delivered += result.delivered
            total.failed += result.failed
            total.more = total.more or result.more
        return total

    def _forget(self, sub_id: int) -> None:
        state = self._states.pop(sub_id, None)
        if state is not None:
            with contextlib.suppress(Exception):
                state.channel.close()

    def _channel(self, sub: SubscriptionRecord) -> _State:
        state = self._states.get(sub.id)
        if state is not None and state.version == sub.version:
            return state
        if state is not None:
            self._forget(sub.id)
        state = _State(sub.version, self._open(sub))
        self._states[sub.id] = state
        return state

    def _open(self, sub: SubscriptionRecord) -> Channel:
        options = sub.options
        timeout = float(options.get("timeout") or self.settings.webhook_timeout)
        if sub.channel == "amqp":
            return AmqpChannel(
                sub.endpoint,
                str(options.get("exchange") or self.settings.exchange),
                heartbeat=self.settings.amqp_heartbeat,
                mandatory=bool(options.get("mandatory", True)),
            )
        if sub.channel == "webhook":
            return WebhookChannel(
                sub.endpoint,
                secret=sub.secret,
                timeout=timeout,
                headers=list(options.get("headers") or ()),
            )
        return RestHookChannel(
            sub.endpoint,
            sub.criteria or "",
            self.rest_hook_render,
            payload=options.get("payload"),
            headers=list(options.get("headers") or ()),
            timeout=timeout,
        )

    def _max_attempts(self, sub: SubscriptionRecord) -> int | None:
        value = sub.options.get("max_attempts")
        if value:
            return int(value)
        return None if sub.channel == "amqp" else self.settings.webhook_max_attempts

    def _backoff(self, attempts: int) -> float:
        delay = self.settings.backoff_base * 2 ** max(0, min(attempts - 1, 30))
        return min(delay, self.settings.backoff_max) * random.uniform(0.9, 1.1)

    # --- one subscription ---------------------------------------------------------------------
    def _serve(self, sub: SubscriptionRecord, *, owes: bool = True) -> RoundResult:
        result = RoundResult()
        state = self._channel(sub)
        patterns = sub.event_types
        max_attempts = self._max_attempts(sub)
        now = datetime.now(UTC)
        changed: list[dict[str, Any]] = []
        new_rows: list[dict[str, Any]] = []
        blocked: set[str] = set()
        down: str | None = None
        dead_error: str | None = None
        renew_at = time.monotonic() + self.settings.lease_seconds / 3

        def keep_lease() -> None:
            nonlocal renew_at
            if time.monotonic() > renew_at:  # a long batch: keep the lease while it runs
                if self.store.take_lease(sub.id, self.name, self.settings.lease_seconds) is None:
                    raise _LeaseLost
                renew_at = time.monotonic() + self.settings.lease_seconds / 3

        def attempt(event: EventRecord) -> str | None:
            nonlocal dead_error
            keep_lease()
            try:
                error = state.channel.deliver(event, self.envelope.encode(event))
            except ChannelDown:
                metrics.failed(sub.channel)
                raise
            if error is None:
                dead_error = None  # the status follows the latest outcome
                metrics.delivered(sub.channel, event.created_at)
            else:
                metrics.failed(sub.channel)
            return error

        def failure(attempts: int, error: str) -> dict[str, Any]:
            nonlocal dead_error
            if max_attempts is not None and attempts >= max_attempts:
                dead_error = error
                log.warning(
                    "event delivery dead",
                    extra={"subscription": sub.name, "attempts": attempts, "error": error},
                )
                return {"status": "dead", "attempts": attempts, "next_attempt_at": None}
            return {
                "status": "failed",
                "attempts": attempts,
                "next_attempt_at": now + timedelta(seconds=self._backoff(attempts)),
            }

        # 1. retries and held deliveries, in event order (a page of them); the later events
        # of a study whose retry is not due yet wait behind it
        pending = []
        if owes:
            blocked.update(self.store.waiting_studies(sub.id, now))
            pending = self.store.pending_deliveries(sub.id, self.settings.batch_size, now)
        retries_left = len(pending) == self.settings.batch_size
        try:
            for row in pending:
                study = row.event.study_instance_uid
                if study is not None and study in blocked:
                    continue
                error = attempt(row.event)
                if error is None:
                    result.delivered += 1
                    changed.append(
                        {
                            "id": row.id,
                            "status": "delivered",
                            "attempts": row.attempts + 1,
                            "next_attempt_at": None,
                            "last_error": None,
                        }
                    )
                    continue
                result.failed += 1
                outcome = failure(row.attempts + 1, error)
                changed.append({"id": row.id, "last_error": error, **outcome})
                if outcome["status"] == "failed" and study is not None:
                    blocked.add(study)
        except ChannelDown as exc:
            down = str(exc)
        except _LeaseLost:
            return self._lost(sub, result)

        # 2. new events after the cursor (with more retries than a page, those of every study
        # that still owes a delivery wait behind them: the next round reads the next page)
        cursor = sub.cursor
        if retries_left and down is None:
            blocked.update(self.store.owing_studies(sub.id))
        if down is None:
            events = self.store.batch(sub.cursor, self.settings.batch_size)
            result.more = retries_left or len(events) == self.settings.batch_size
            events = self._contiguous(sub, state, events, result)
            try:
                if isinstance(state.channel, BatchChannel):
                    cursor, dead_error = self._deliver_batch(
                        sub,
                        state.channel,
                        events,
                        patterns,
                        blocked,
                        new_rows,
                        result,
                        failure,
                        keep_lease,
                        cursor,
                        dead_error,
                    )
                for event in events if not isinstance(state.channel, BatchChannel) else ():
                    if not types_match(patterns, event.type):
                        cursor = event.id
                        continue
                    study = event.study_instance_uid
                    if study is not None and study in blocked:
                        new_rows.append(_row(event, "held", 0, None, None))
                        cursor = event.id
                        continue
                    error = attempt(event)
                    cursor = event.id
                    if error is None:
                        result.delivered += 1
                        continue
                    result.failed += 1
                    outcome = failure(1, error)
                    new_rows.append(
                        _row(event, outcome["status"], 1, outcome["next_attempt_at"], error)
                    )
                    if outcome["status"] == "failed" and study is not None:
                        blocked.add(study)
                if down is None:
                    self._late(sub, state, patterns, blocked, new_rows, result, attempt, failure)
            except ChannelDown as exc:
                down = str(exc)
                if exc.cursor is not None:
                    cursor = exc.cursor
            except _LeaseLost:
                return self._lost(sub, result)

        # 3. one transaction: cursor, delivery rows, the subscription's state
        fields: dict[str, Any] = {}
        if down is not None:
            attempts = sub.attempts + 1
            delay = self._backoff(attempts)
            fields = {
                "attempts": attempts,
                "next_attempt_at": now + timedelta(seconds=delay),
                "status": "error",
                "error": down[:2000],
            }
            result.more = False
            log.warning(
                "event channel down",
                extra={
                    "subscription": sub.name,
                    "attempts": attempts,
                    "retry_in": round(delay, 1),
                    "error": down,
                },
            )
        elif dead_error is not None:
            # FHIR R4 Subscription.status: error when notifications fail (and back on success)
            fields = {
                "attempts": 0,
                "next_attempt_at": None,
                "status": "error",
                "error": dead_error[:2000],
            }
        elif sub.status == "error" and (result.delivered or sub.attempts):
            fields = {"attempts": 0, "next_attempt_at": None, "status": "active", "error": None}
        elif sub.attempts or sub.next_attempt_at is not None:
            fields = {"attempts": 0, "next_attempt_at": None}
        if cursor != sub.cursor or new_rows or changed or fields:
            kept = self.store.record(
                sub.id,
                self.name,
                cursor=cursor if cursor != sub.cursor else None,
                read_cursor=sub.cursor,
                new_rows=new_rows,
                changed_rows=changed,
                subscription=fields or None,
            )
            if not kept:
                return self._lost(sub, result)
        return result

    def _deliver_batch(
        self,
        sub: SubscriptionRecord,
        channel: BatchChannel,
        events: list[EventRecord],
        patterns: Sequence[str],
        blocked: set[str],
        new_rows: list[dict[str, Any]],
        result: RoundResult,
        failure: Callable[[int, str], dict[str, Any]],
        keep_lease: Callable[[], None],
        cursor: int,
        dead_error: str | None,
    ) -> tuple[int, str | None]:
        """The new events of a round through a channel that delivers a batch at once (AMQP's
        pipelined publisher confirms): the events of a study with a failing delivery held,
        the others sent together. (the cursor after them, the latest dead event's error).
        On :class:`ChannelDown` the delivery rows and the cursor stop before the first event
        not delivered (it is raised again with its ``cursor`` set)."""
        planned: list[EventRecord] = []
        for event in events:
            if not types_match(patterns, event.type):
                continue
            study = event.study_instance_uid
            if study is not None and study in blocked:
                new_rows.append(_row(event, "held", 0, None, None))
                continue
            planned.append(event)
        keep_lease()
        try:
            outcomes = channel.deliver_many([(e, self.envelope.encode(e)) for e in planned])
        except ChannelDown as exc:
            metrics.failed(sub.channel)
            for event in planned[: exc.done]:
                result.delivered += 1
                metrics.delivered(sub.channel, event.created_at)
            if exc.done < len(planned):
                stop = planned[exc.done].id - 1  # the first event not delivered is read again
                new_rows[:] = [row for row in new_rows if row["event_fk"] <= stop]
                exc.cursor = stop
            elif events:
                exc.cursor = events[-1].id
            raise
        for event, error in zip(planned, outcomes, strict=True):
            if error is None:
                result.delivered += 1
                metrics.delivered(sub.channel, event.created_at)
                dead_error = None  # the status follows the latest outcome
                continue
            result.failed += 1
            metrics.failed(sub.channel)
            outcome = failure(1, error)
            if outcome["status"] == "dead":
                dead_error = error
            new_rows.append(_row(event, outcome["status"], 1, outcome["next_attempt_at"], error))
            if outcome["status"] == "failed" and event.study_instance_uid is not None:
                blocked.add(event.study_instance_uid)
        return (events[-1].id if events else cursor), dead_error

    def _lost(self, sub: SubscriptionRecord, result: RoundResult) -> RoundResult:
        log.warning(
            "event subscription lease lost; the process that holds it delivers its events "
            "from its cursor (some again)",
            extra={"subscription": sub.name},
        )
        self._forget(sub.id)
        result.more = False
        return result

    def _contiguous(
        self,
        sub: SubscriptionRecord,
        state: _State,
        events: list[EventRecord],
        result: RoundResult,
    ) -> list[EventRecord]:
        """The events up to the first outbox id still missing that a running transaction may
        yet commit (PostgreSQL); all of them on SQLite."""
        if self.store.db.is_sqlite:
            return events
        expected = sub.cursor + 1
        for index, event in enumerate(events):
            if event.id == expected:
                expected += 1
                continue
            gap = state.gap
            if gap is not None and gap.at == expected and gap.resolved:
                if gap.timed_out:  # its transaction may still commit: look for it a while
                    for missing in range(expected, min(event.id, expected + 10000)):
                        state.late.setdefault(missing, time.monotonic() + LATE_WATCH)
                state.gap = None
                expected = event.id + 1
                continue
            result.more = False  # wait a poll interval for the transaction, unless resolved
            if gap is None or gap.at != expected:
                state.gap = _Gap(expected, time.monotonic(), None)
                return events[:index]
            age = time.monotonic() - gap.since
            if gap.token is None and age >= GAP_MIN_AGE:
                # Taken a moment after the gap was seen: the transaction that holds the id
                # has its transaction id by then (it takes one as it writes the row, just
                # after the id), so the snapshot counts it as running.
                gap.token = self.store.snapshot()
            elif age >= self.settings.gap_timeout or (
                gap.token is not None and self.store.snapshot_passed(gap.token)
            ):
                gap.resolved = True  # the next read sees the id if it was committed
                result.more = True
                if age >= self.settings.gap_timeout:
                    gap.timed_out = True
                    log.warning(
                        "outbox ids passed after waiting for them",
                        extra={"subscription": sub.name, "from": expected, "to": event.id - 1},
                    )
            return events[:index]
        return events

    def _late(
        self,
        sub: SubscriptionRecord,
        state: _State,
        patterns: Sequence[str],
        blocked: set[str],
        new_rows: list[dict[str, Any]],
        result: RoundResult,
        attempt: Callable[[EventRecord], str | None],
        failure: Callable[[int, str], dict[str, Any]],
    ) -> None:
        """Events whose ids were passed by the gap timeout and that appeared since: delivered
        now (out of order: their transaction outlasted ``gap_timeout``)."""
        if not state.late:
            return
        clock = time.monotonic()
        for missing in [i for i, until in state.late.items() if until < clock]:
            del state.late[missing]
        for event in self.store.events_by_id(list(state.late)):
            if not types_match(patterns, event.type):
                del state.late[event.id]
                continue
            if event.study_instance_uid is not None and event.study_instance_uid in blocked:
                del state.late[event.id]
                new_rows.append(_row(event, "held", 0, None, None))
                continue
            log.warning(
                "late outbox event delivered out of order",
                extra={"subscription": sub.name, "sequence": event.id},
            )
            error = attempt(event)  # ChannelDown: it stays watched, tried again
            del state.late[event.id]
            if error is None:
                result.delivered += 1
                continue
            result.failed += 1
            outcome = failure(1, error)
            new_rows.append(_row(event, outcome["status"], 1, outcome["next_attempt_at"], error))


def _row(
    event: EventRecord,
    status: str,
    attempts: int,
    next_attempt_at: datetime | None,
    error: str | None,
) -> dict[str, Any]:
    return {
        "event_fk": event.id,
        "study_instance_uid": event.study_instance_uid,
        "status": status,
        "attempts": attempts,
        "next_attempt_at": next_attempt_at,
        "last_error": error,
    }


__all__ = ["Dispatcher", "RestHookRender", "RoundResult"]
