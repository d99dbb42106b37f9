"""The dispatcher on a real index (SQLite and PostgreSQL) with a real HTTP receiver: topic
patterns, one process per subscription (the lease: two dispatchers deliver each event once,
and another takes over when one stops answering), PostgreSQL's outbox ids that commit out of
order, the subscription status after dead events, the FHIR R4 rest-hook channel, pruning and
the settings file's subscriptions."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select, update

from archive import Archive
from archive.outbox import EventDelivery, OutboxEvent, emit
from archive.subscriptions import (
    InvalidSubscription,
    SubscriptionConflict,
    Subscriptions,
    parse_patterns,
    topic_matches,
)
from config import Settings
from config.settings import EventsSettings
from events import Dispatcher
from pacsbridge.event_delivery import build_dispatcher, envelope_for, sync_toml_subscriptions
from tests.conftest import Backend, _backend
from tests.events_support import (
    ENVELOPE,
    SECRET,
    Receiver,
    emit_one,
    fast,
    run_until,
    running_receiver,
)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with running_receiver() as hook:
        yield hook


@pytest.fixture
def arc(index_backend: Backend) -> Iterator[Archive]:
    archive = Archive(index_backend.settings)
    yield archive
    archive.close()


@pytest.mark.parametrize(
    ("pattern", "key", "matches"),
    [
        ("#", "study.stable", True),
        ("study.*", "study.stable", True),
        ("study.*", "study", False),
        ("study.*", "study.stable.x", False),
        ("study.#", "study", True),
        ("study.#", "study.stable.x", True),
        ("*.stable", "study.stable", True),
        ("*.stable", "stable", False),
        ("order.#", "order.in-progress", True),
        ("#.paid", "invoice.paid", True),
        ("invoice.paid", "invoice.issued", False),
        ("#.x.#", "a.x.b", True),
        ("#.x.#", "a.b", False),
    ],
)
def test_topic_patterns(pattern: str, key: str, matches: bool) -> None:
    assert topic_matches(pattern, key) is matches


def test_bad_patterns_are_refused() -> None:
    assert parse_patterns(" study.* , order.#") == ["study.*", "order.#"]
    for bad in ("", "study..x", "Study.*", "study.*x", "a b"):
        with pytest.raises(InvalidSubscription):
            parse_patterns(bad)


def test_two_dispatchers_deliver_each_event_once(arc: Archive, receiver: Receiver) -> None:
    store = Subscriptions(arc.db)
    store.create("hooks", channel="webhook", endpoint=receiver.url)
    one = Dispatcher(store, fast(), ENVELOPE, name="one")
    two = Dispatcher(Subscriptions(arc.db), fast(), ENVELOPE, name="two")
    one.start()
    two.start()
    studies = [f"1.2.20.{i}" for i in range(5)]
    sent = [emit_one(arc, "instance.stored", studies[n % 5], n=n) for n in range(150)]
    try:
        deadline = time.monotonic() + 60
        while len(receiver.received) < len(sent) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # anything more would be a duplicate
    finally:
        one.stop(10)
        two.stop(10)
    counts = Counter(r.event["id"] for r in receiver.received)
    assert set(counts) == set(sent) and set(counts.values()) == {1}
    for study in studies:
        ns = [r.event["data"]["n"] for r in receiver.received if r.event["study"] == study]
        assert ns == sorted(ns) and len(ns) == 30
    sub = store.get("hooks")
    assert sub is not None and sub.locked_by is None  # given back at stop


def test_another_dispatcher_takes_over_an_expired_lease(arc: Archive, receiver: Receiver) -> None:
    store = Subscriptions(arc.db)
    store.create("hooks", channel="webhook", endpoint=receiver.url)
    settings = fast(lease_seconds=1.0)
    first = emit_one(arc, "study.stable", "1.2.21.1")
    stalled = Dispatcher(store, settings, ENVELOPE, name="stalled")
    stalled.run_once()  # takes the lease, delivers, then stops answering (no close)
    second = emit_one(arc, "study.stable", "1.2.21.1")
    other = Dispatcher(store, settings, ENVELOPE, name="other")
    other.run_once()
    assert [r.event["id"] for r in receiver.received] == [first]  # the lease is held
    time.sleep(1.1)
    other.run_once()
    assert [r.event["id"] for r in receiver.received] == [first, second]
    sub = store.get("hooks")
    assert sub is not None and sub.locked_by == "other"
    stalled.run_once()  # it wakes up: the subscription is someone else's now
    assert len(receiver.received) == 2
    other.close()
    stalled.close()


def test_a_long_batch_keeps_its_lease(arc: Archive, receiver: Receiver) -> None:
    """A batch that takes longer than the lease renews it as it goes: a second dispatcher
    never takes the subscription over in the middle (which would send events twice and out of
    order)."""
    store = Subscriptions(arc.db)
    store.create("hooks", channel="webhook", endpoint=receiver.url)
    receiver.delay = 0.15
    sent = [emit_one(arc, "instance.stored", "1.2.28.1", n=n) for n in range(14)]
    settings = fast(lease_seconds=1.0)
    one = Dispatcher(store, settings, ENVELOPE, name="one")
    two = Dispatcher(Subscriptions(arc.db), settings, ENVELOPE, name="two")
    slow = threading.Thread(target=one.run_once)
    slow.start()
    time.sleep(0.3)
    while slow.is_alive():  # about 2 s: twice the lease
        two.run_once()
        time.sleep(0.1)
    slow.join()
    assert [r.event["id"] for r in receiver.received] == sent
    sub = store.get("hooks")
    assert sub is not None and sub.locked_by == "one" and sub.cursor == store.head()
    one.close()
    two.close()


def test_dead_event_puts_the_subscription_in_error_until_a_delivery(
    arc: Archive, receiver: Receiver
) -> None:
    store = Subscriptions(arc.db)
    store.create("hooks", channel="webhook", endpoint=receiver.url, options={"max_attempts": 1})
    receiver.answer = lambda event: 410 if event["data"].get("bad") else 200
    emit_one(arc, "study.stable", "1.2.22.1", bad=True)
    dispatcher = Dispatcher(store, fast(), ENVELOPE, name="d")
    dispatcher.run_once()
    sub = store.get("hooks")
    assert sub is not None and sub.status == "error" and "HTTP 410" in (sub.error or "")
    assert sub.counts == {"dead": 1}
    good = emit_one(arc, "study.stable", "1.2.22.1")  # a dead event does not hold its study
    dispatcher.run_once()
    sub = store.get("hooks")
    assert sub is not None and sub.status == "active" and sub.error is None
    assert receiver.received[-1].event["id"] == good
    # An administrator's change is not overwritten by the dispatcher.
    store.update("hooks", status="off")
    emit_one(arc, "study.stable", "1.2.22.1")
    dispatcher.run_once()
    assert len(receiver.received) == 2 and store.get("hooks").status == "off"  # type: ignore[union-attr]
    dispatcher.close()


def test_retries_wait_in_the_index_and_come_a_batch_at_a_time(
    arc: Archive, receiver: Receiver
) -> None:
    """A study whose retry is not due holds its later events without the dispatcher reading
    them each round (the subscription is not due); once due, the retries go in event order,
    a batch per round, and new events of the studies that owe none go beside them; a row a
    redelivery wrote meanwhile stands."""
    store = Subscriptions(arc.db)
    sub = store.create("hooks", channel="webhook", endpoint=receiver.url, secret=SECRET)
    failing = {"1.2.31.1", "1.2.31.2", "1.2.31.3"}
    receiver.answer = lambda event: 503 if event["study"] in failing else 200
    dispatcher = Dispatcher(
        store, fast(backoff_base=3600.0, backoff_max=3600.0, batch_size=2), ENVELOPE, name="r"
    )
    first = [emit_one(arc, "instance.stored", study) for study in sorted(failing)]
    run_until(dispatcher, lambda: store.head() == store.get("hooks").cursor)  # type: ignore[union-attr]
    later = emit_one(arc, "study.stable", "1.2.31.1")  # behind its study's failure: held
    other = emit_one(arc, "study.stable", "1.2.31.9")
    run_until(dispatcher, lambda: store.head() == store.get("hooks").cursor)  # type: ignore[union-attr]
    assert store.get("hooks").counts == {"failed": 3, "held": 1}  # type: ignore[union-attr]
    assert receiver.ids()[-1] == other
    # Nothing to do until a retry is due: no held row is free, nothing pending is read.
    now = datetime.now(UTC)
    when, held = store.due()[sub.id]
    assert when is not None and when > now + timedelta(minutes=50) and held == 0
    assert store.pending_deliveries(sub.id, 10, now) == []
    assert store.waiting_studies(sub.id, now) == failing
    seen = len(receiver.received)
    dispatcher.run_once()
    assert len(receiver.received) == seen
    # The retries come due and succeed: two per round, new events after them.
    failing.clear()
    with arc.db.write_connection() as conn:
        conn.execute(update(EventDelivery).values(next_attempt_at=now - timedelta(seconds=1)))
    newest = emit_one(arc, "study.stable", "1.2.31.8")
    held_back = emit_one(arc, "study.stable", "1.2.31.3")  # its study still owes a retry
    result = dispatcher.run_once()
    assert result.more and receiver.ids()[seen:] == [*first[:2], newest]
    run_until(dispatcher, lambda: held_back in receiver.ids())
    assert store.get("hooks").counts == {"delivered": 5}  # type: ignore[union-attr]
    assert receiver.ids()[seen:] == [*first[:2], newest, first[2], later, held_back]
    # A redelivery row for an event the dispatcher then writes a row for: the first stands.
    receiver.answer = lambda event: 503
    again = emit_one(arc, "study.stable", "1.2.31.7")
    event_fk = store.head()
    with arc.db.write_connection() as conn:
        conn.execute(
            insert(EventDelivery).values(
                subscription_fk=sub.id,
                event_fk=event_fk,
                study_instance_uid="1.2.31.7",
                status="failed",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
        )
    dispatcher.run_once()
    assert receiver.ids()[-1] == again and store.get("hooks").cursor == event_fk  # type: ignore[union-attr]
    dispatcher.close()


def test_postgresql_outbox_ids_committed_out_of_order(
    request: pytest.FixtureRequest, tmp_path: Path, receiver: Receiver
) -> None:
    """PostgreSQL only: on SQLite one writer at a time commits, so ids commit in order."""
    archive = Archive(_backend("postgresql", "file", tmp_path, request).settings)
    try:
        store = Subscriptions(archive.db)
        store.create("hooks", channel="webhook", endpoint=receiver.url)
        dispatcher = Dispatcher(store, fast(), ENVELOPE, name="gaps")
        # A transaction takes an outbox id and stays open; a later one commits first.
        with archive.db.engine.connect() as slow:
            transaction = slow.begin()
            early = emit(slow, "order.scheduled", study_uid="1.2.23.1", data={"n": 1})
            late = emit_one(archive, "order.updated", "1.2.23.1", n=2)
            for _ in range(10):
                dispatcher.run_once()
                time.sleep(0.03)
            assert receiver.received == []  # the later id waits for the earlier one
            transaction.commit()
        run_until(dispatcher, lambda: len(receiver.received) >= 2)
        assert [r.event["id"] for r in receiver.received] == [early, late]
        # A rolled-back transaction leaves a gap for good: it is passed once it has ended.
        with archive.db.engine.connect() as doomed:
            transaction = doomed.begin()
            emit(doomed, "order.cancelled", study_uid="1.2.23.2")
            after = emit_one(archive, "order.scheduled", "1.2.23.2")
            dispatcher.run_once()
            assert len(receiver.received) == 2
            transaction.rollback()
        run_until(dispatcher, lambda: len(receiver.received) >= 3)
        assert receiver.received[2].event["id"] == after
        dispatcher.close()
        # A transaction open longer than gap_timeout: the later events pass it, and its event
        # is still delivered (late, out of order) when it commits.
        patient = Dispatcher(store, fast(gap_timeout=0.5), ENVELOPE, name="gaps-2")
        with archive.db.engine.connect() as long:
            transaction = long.begin()
            slow_one = emit(long, "order.completed", study_uid="1.2.23.3")
            quick = emit_one(archive, "order.scheduled", "1.2.23.4")
            run_until(patient, lambda: len(receiver.received) >= 4)
            assert receiver.received[3].event["id"] == quick
            transaction.commit()
        run_until(patient, lambda: len(receiver.received) >= 5)
        assert receiver.received[4].event["id"] == slow_one
        patient.close()
    finally:
        archive.close()


def test_rest_hook_channel(arc: Archive, receiver: Receiver) -> None:
    """FHIR R4 rest-hook: an empty POST without a payload; with ``application/fhir+json`` the
    resource is PUT to ``[endpoint]/[type]/[id]``; resources the criteria do not select send
    nothing; a failing endpoint puts the Subscription in error."""
    resources = {
        "ServiceRequest/sr1": {"resourceType": "ServiceRequest", "id": "sr1", "status": "active"},
        "ServiceRequest/sr2": {"resourceType": "ServiceRequest", "id": "sr2", "status": "draft"},
    }
    asked: list[tuple[str, str]] = []

    def render(criteria: str, reference: str) -> dict[str, Any] | None:
        asked.append((criteria, reference))
        kind, _, query = criteria.partition("?")
        resource = resources.get(reference)
        if resource is None or resource["resourceType"] != kind:
            return None
        wanted = dict(part.split("=", 1) for part in query.split("&") if part)
        return resource if all(resource.get(k) == v for k, v in wanted.items()) else None

    store = Subscriptions(arc.db)
    store.create(
        "ehr-bare",
        channel="rest-hook",
        endpoint=receiver.url,
        criteria="ServiceRequest?status=active",
        source="fhir",
        options={"headers": ["Authorization: Bearer ehr"]},
    )
    store.create(
        "ehr-full",
        channel="rest-hook",
        endpoint=receiver.url + "/fhir",
        criteria="ServiceRequest?status=active",
        source="fhir",
        options={"payload": "application/fhir+json", "max_attempts": 1},
    )
    with arc.db.write_connection() as conn:
        emit(conn, "order.scheduled", resource="ServiceRequest/sr1")
        emit(conn, "order.scheduled", resource="ServiceRequest/sr2")  # draft: not selected
        emit(conn, "study.stable", study_uid="1.2.24.1")  # no resource: nothing to select
    dispatcher = Dispatcher(store, fast(), ENVELOPE, name="fhir", rest_hook_render=render)
    run_until(dispatcher, lambda: len(receiver.received) >= 2)
    dispatcher.run_once()
    by_method = {r.method: r for r in receiver.received}
    assert len(receiver.received) == 2 and set(by_method) == {"POST", "PUT"}
    bare = by_method["POST"]
    assert bare.path == "/hooks/pacs" and bare.body == b""
    assert bare.headers["authorization"] == "Bearer ehr"
    full = by_method["PUT"]
    assert full.path == "/hooks/pacs/fhir/ServiceRequest/sr1"
    assert full.headers["content-type"] == "application/fhir+json"
    assert full.event == resources["ServiceRequest/sr1"]
    assert ("ServiceRequest?status=active", "ServiceRequest/sr2") in asked
    # The endpoint fails: the event is dead (one attempt) and the Subscription in error.
    receiver.answer = lambda _resource: 503
    with arc.db.write_connection() as conn:
        emit(conn, "order.updated", resource="ServiceRequest/sr1")
    dispatcher.run_once()
    sub = store.get("ehr-full")
    assert sub is not None and sub.status == "error" and "HTTP 503" in (sub.error or "")
    dispatcher.close()


def test_pruning_keeps_what_is_owed(arc: Archive, receiver: Receiver) -> None:
    store = Subscriptions(arc.db)
    store.create("hooks", channel="webhook", endpoint=receiver.url, options={"max_attempts": 1})
    receiver.answer = lambda event: 500 if event["data"].get("bad") else 200
    delivered = emit_one(arc, "study.stable", "1.2.25.1")
    dead = emit_one(arc, "study.stable", "1.2.25.2", bad=True)
    dispatcher = Dispatcher(store, fast(), ENVELOPE, name="p")
    dispatcher.run_once()
    dispatcher.close()
    ahead = emit_one(arc, "study.stable", "1.2.25.3")  # not delivered yet
    with arc.db.write_connection() as conn:
        conn.execute(update(OutboxEvent).values(created_at=datetime.now(UTC) - timedelta(days=8)))
    assert store.prune(retention_days=7) == 1
    with arc.db.engine.connect() as conn:
        left = set(conn.execute(select(OutboxEvent.event_id)).scalars())
    assert delivered not in left and {dead, ahead} <= left
    assert store.prune(retention_days=30) == 0


def test_settings_file_subscriptions(index_backend: Backend, receiver: Receiver) -> None:
    def settings_with(subs: dict[str, Any]) -> Settings:
        return index_backend.settings.model_copy(
            update={"events": EventsSettings(subscriptions=subs)}
        )

    first = settings_with(
        {
            "mq": {
                "channel": "amqp",
                "url": "amqp://guest:guest@127.0.0.1:5672/%2F",
                "exchange": "pacs.x",
                "types": ["study.*"],
            },
            "hooks": {"channel": "webhook", "url": receiver.url, "secret": "k", "max_attempts": 3},
        }
    )
    archive = Archive(first)
    try:
        sync_toml_subscriptions(archive, first)
        store = Subscriptions(archive.db)
        mq = store.get("mq")
        assert mq is not None and mq.source == "toml" and mq.options == {"exchange": "pacs.x"}
        assert mq.event_types == ["study.*"]
        hooks = store.get("hooks")
        assert hooks is not None and hooks.secret == "k" and hooks.options == {"max_attempts": 3}
        sync_toml_subscriptions(archive, first)  # unchanged: untouched
        assert store.get("mq").version == 1  # type: ignore[union-attr]
        emit_one(archive, "study.stable", "1.2.26.1")
        with archive.db.write_connection() as conn:  # as if the subscription had moved on
            conn.execute(update(store_table()).values(cursor=store.head()))
        second = settings_with({"mq": {"channel": "amqp", "url": mq.endpoint, "types": ["#"]}})
        sync_toml_subscriptions(archive, second)
        changed = store.get("mq")
        assert changed is not None and changed.version == 2 and changed.event_types == ["#"]
        assert changed.cursor == store.head()  # its place in the outbox is kept
        off = store.get("hooks")
        assert off is not None and off.status == "off"  # removed from the file: turned off
        store.create("api-one", channel="webhook", endpoint=receiver.url)
        clash = settings_with({"api-one": {"channel": "webhook", "url": receiver.url}})
        with pytest.raises(SubscriptionConflict):
            sync_toml_subscriptions(archive, clash)
        # A process that runs workers builds its dispatcher from the settings.
        dispatcher = build_dispatcher(archive, second, "worker-1")
        assert dispatcher is not None and dispatcher.name == "worker-1:events"
        disabled = second.model_copy(update={"events": EventsSettings(enabled=False)})
        assert build_dispatcher(archive, disabled, "w") is None
    finally:
        archive.close()


def store_table() -> Any:
    from archive.outbox import EventSubscription

    return EventSubscription.__table__


def test_envelope_links_follow_the_settings(tmp_path: Any) -> None:
    plain = envelope_for(Settings(data_dir=tmp_path, ae_title="PACSB"))
    assert plain.source == "urn:pacsbridge:PACSB" and plain.fhir_base is None
    public = envelope_for(Settings(data_dir=tmp_path, public_url="https://pacs.example/"))
    assert public.source == "https://pacs.example"
    assert public.fhir_base == "https://pacs.example/fhir"
    assert public.dicomweb_base == "https://pacs.example/dicom-web"
    assert not public.include_phi


def test_dispatcher_thread_wakes_and_stops(arc: Archive, receiver: Receiver) -> None:
    store = Subscriptions(arc.db)
    store.create("hooks", channel="webhook", endpoint=receiver.url)
    dispatcher = Dispatcher(store, fast(poll_interval=30.0), ENVELOPE, name="w")
    dispatcher.start()
    try:
        time.sleep(0.2)  # its first round found nothing; now it sleeps up to 30 s
        event = emit_one(arc, "study.stable", "1.2.27.1")
        dispatcher.wake()
        deadline = time.monotonic() + 5
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert [r.event["id"] for r in receiver.received] == [event]
    finally:
        assert dispatcher.stop(10)
    assert not threading.Thread.is_alive(dispatcher._thread)  # type: ignore[arg-type]
