"""Webhooks against a real HTTP receiver on 127.0.0.1 that checks each signature as a
subscriber would (HMAC-SHA256 of ``timestamp + "." + body``, computed here independently):
retries with back-off, the dead state after the most attempts, the later events of a study
held behind a failing one, redelivery with ``pacsbridge events redeliver`` and with the admin
API, the API's subscription CRUD, timeouts and a receiver that is down."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from archive import Archive
from archive.subscriptions import Subscriptions
from config.settings import EventsSettings
from events import Dispatcher
from pacsbridge.app import create_app
from tests.conftest import Backend
from tests.events_support import (
    ENVELOPE,
    PACSBRIDGE,
    SECRET,
    Receiver,
    emit_one,
    fast,
    run_until,
    running_receiver,
    verify,
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


def test_signed_posts_and_headers(arc: Archive, receiver: Receiver) -> None:
    store = Subscriptions(arc.db)
    store.create(
        "hooks",
        channel="webhook",
        endpoint=receiver.url,
        secret=SECRET,
        event_types="study.*,order.#",
        options={"headers": ["Authorization: Bearer abc"]},
    )
    ids = [
        emit_one(arc, "order.scheduled", "1.2.7.1", accession="A1"),
        emit_one(arc, "instance.stored", "1.2.7.1"),  # not among the types
        emit_one(arc, "study.stable", "1.2.7.1"),
    ]
    dispatcher = Dispatcher(store, fast(), ENVELOPE, name="hooks")
    run_until(dispatcher, lambda: len(receiver.received) >= 2)
    dispatcher.run_once()
    dispatcher.close()
    assert [r.event["id"] for r in receiver.received] == [ids[0], ids[2]]
    first = receiver.received[0]
    assert first.signed, first.headers
    assert first.path == "/hooks/pacs"
    assert first.headers["content-type"] == "application/json"
    assert first.headers["x-pacsbridge-event"] == "order.scheduled"
    assert first.headers["x-pacsbridge-delivery"] == ids[0]
    assert first.headers["authorization"] == "Bearer abc"
    assert first.event["data"] == {"accession": "A1"}
    assert first.event["links"]["fhir"] == "https://pacs.test/fhir/ImagingStudy/1.2.7.1"
    # A body altered in transit no longer verifies.
    assert not verify(first.headers, first.body.replace(b"A1", b"A2"))


def test_retries_dead_and_redelivery(
    arc: Archive, receiver: Receiver, index_backend: Backend, tmp_path: Path
) -> None:
    store = Subscriptions(arc.db)
    store.create(
        "hooks",
        channel="webhook",
        endpoint=receiver.url,
        secret=SECRET,
        options={"max_attempts": 3},
    )
    failing = {"study.stable"}
    receiver.answer = lambda event: 500 if event["type"] in failing else 204
    a, b = "1.2.8.1", "1.2.8.2"
    first = emit_one(arc, "instance.stored", a)
    bad = emit_one(arc, "study.stable", a)
    behind = emit_one(arc, "ai.result", a)
    other = emit_one(arc, "study.stable", b)
    dispatcher = Dispatcher(store, fast(), ENVELOPE, name="hooks")

    def statuses() -> dict[str, list[str]]:
        return {e["id"]: [d["status"] for d in e["deliveries"]] for e in store.events()}

    dispatcher.run_once()
    assert statuses()[bad] == ["failed"] and statuses()[behind] == ["held"]
    assert statuses()[other] == ["failed"]
    assert receiver.ids() == [first, bad, other]  # ``behind`` waits for ``bad``
    run_until(dispatcher, lambda: statuses()[bad] == ["dead"] and statuses()[other] == ["dead"])
    run_until(dispatcher, lambda: statuses()[behind] == ["delivered"])
    tries = [r.event["id"] for r in receiver.received]
    assert tries.count(bad) == 3 and tries.count(other) == 3 and tries.count(behind) == 1
    assert tries.index(behind) > max(i for i, t in enumerate(tries) if t == bad)
    assert all(r.signed for r in receiver.received)
    sub = store.get("hooks")
    assert sub is not None and sub.counts == {"dead": 2, "delivered": 1}
    dead = store.events(status="dead")
    assert {e["id"] for e in dead} == {bad, other}
    assert "HTTP 500" in dead[0]["deliveries"][0]["last_error"]

    # The receiver is fixed: redeliver one event with the CLI, the other with the API.
    failing.clear()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSBRIDGE_")}
    env |= index_backend.env | {"COLUMNS": "250", "NO_COLOR": "1"}
    listed = subprocess.run(
        [str(PACSBRIDGE), "events", "list", "--status", "dead", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    assert {e["id"] for e in json.loads(listed.stdout)} == {bad, other}
    cli = subprocess.run(
        [str(PACSBRIDGE), "events", "redeliver", bad, "--subscription", "hooks"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == {"event": bad, "subscriptions": ["hooks"]}
    audited = [e for _, e in arc.audit.since(0) if e.source == "cli"]
    assert [(e.type_code, e.action, e.entity) for e in audited] == [
        ("110100", "E", f"events redeliver {bad}")
    ]
    assert audited[0].study_uid == a and audited[0].query == "subscription=hooks"
    with (
        closing(Archive(index_backend.settings)) as api_archive,
        TestClient(create_app(api_archive, index_backend.settings)) as client,
    ):
        answer = client.post(f"/api/events/{other}/redeliver")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"event": other, "subscriptions": ["hooks"]}
        assert client.post("/api/events/nope/redeliver").status_code == 404
        unknown = client.post(f"/api/events/{other}/redeliver", params={"subscription": "x"})
        assert unknown.status_code == 404
    before = len(receiver.received)
    run_until(dispatcher, lambda: statuses()[bad] == ["delivered"] == statuses()[other])
    dispatcher.close()
    again = [r.event["id"] for r in receiver.received[before:]]
    assert sorted(again) == sorted([bad, other])
    sub = store.get("hooks")
    assert sub is not None and sub.counts == {"delivered": 3}
    assert sub.status == "active" and sub.error is None


def test_timeout_fails_the_event_and_refused_connection_holds_the_batch(
    arc: Archive, receiver: Receiver
) -> None:
    store = Subscriptions(arc.db)
    store.create(
        "slow",
        channel="webhook",
        endpoint=receiver.url,
        options={"timeout": 0.3, "max_attempts": 1},
    )
    receiver.delay = 1.0
    slow = emit_one(arc, "study.stable", "1.2.9.1")
    dispatcher = Dispatcher(store, fast(), ENVELOPE, name="slow")
    dispatcher.run_once()
    (event,) = [e for e in store.events() if e["id"] == slow]
    assert event["deliveries"][0]["status"] == "dead"  # one attempt allowed
    assert "Timeout" in event["deliveries"][0]["last_error"]
    sub = store.get("slow")
    assert sub is not None and sub.status == "error" and "Timeout" in (sub.error or "")
    # Nobody listens any more: the batch waits, no delivery row is written.
    port = receiver.server.server_address[1]
    receiver.server.shutdown()
    receiver.server.server_close()
    store.update("slow", endpoint=f"http://127.0.0.1:{port}/gone")
    cursor = store.get("slow").cursor  # type: ignore[union-attr]
    waiting = emit_one(arc, "study.stable", "1.2.9.2")
    dispatcher.run_once()
    sub = store.get("slow")
    assert sub is not None and sub.cursor == cursor and sub.attempts == 1
    assert sub.status == "error" and "ConnectError" in (sub.error or "")
    assert [e["pending"] for e in store.events() if e["id"] == waiting] == [["slow"]]
    dispatcher.close()


def test_subscription_api(index_backend: Backend, receiver: Receiver) -> None:
    settings = index_backend.settings.model_copy(
        update={
            "events": EventsSettings.model_validate(
                {"subscriptions": {"from-file": {"channel": "webhook", "url": receiver.url}}}
            )
        }
    )
    archive = Archive(settings)
    from pacsbridge.event_delivery import sync_toml_subscriptions

    sync_toml_subscriptions(archive, settings)
    with closing(archive), TestClient(create_app(archive, settings)) as client:
        body = {
            "name": "ris",
            "channel": "webhook",
            "url": receiver.url,
            "types": ["order.#"],
            "secret": SECRET,
            "max_attempts": 4,
            "headers": ["Authorization: Bearer t0ken"],
        }
        created = client.post("/api/events/subscriptions", json=body)
        assert created.status_code == 201, created.text
        assert created.headers["location"] == "/api/events/subscriptions/ris"
        shown = created.json()
        assert shown["has_secret"] is True and SECRET not in created.text
        assert shown["types"] == ["order.#"]
        assert shown["options"] == {"max_attempts": 4, "headers": ["Authorization: ***"]}
        assert "t0ken" not in created.text
        assert shown["source"] == "api" and shown["status"] == "active"
        assert client.post("/api/events/subscriptions", json=body).status_code == 409
        listed = client.get("/api/events/subscriptions").json()
        assert [(s["name"], s["source"]) for s in listed] == [("from-file", "toml"), ("ris", "api")]
        changed = client.put(
            "/api/events/subscriptions/ris",
            json={"channel": "webhook", "url": receiver.url + "/v2", "types": ["study.*"]},
        )
        assert changed.status_code == 200, changed.text
        assert changed.json()["has_secret"] is True  # a PUT without the secret keeps it
        assert changed.json()["version"] == 2 and changed.json()["types"] == ["study.*"]
        assert Subscriptions(archive.db).get("ris").secret == SECRET  # type: ignore[union-attr]
        refused = [
            {"name": "bad", "channel": "webhook", "url": "ftp://x"},
            {"name": "bad", "channel": "amqp", "url": "http://x"},
            {"name": "bad", "channel": "webhook", "url": "http://x", "types": ["study..x"]},
            {"name": "bad", "channel": "webhook", "url": "http://x", "headers": ["NoColon"]},
            {"name": "bad", "channel": "smtp", "url": "http://x"},
            {"name": "bad", "channel": "webhook", "url": "http://x", "extra": 1},
            {"name": "-bad", "channel": "webhook", "url": "http://x"},
        ]
        for bad in refused:
            answer = client.post("/api/events/subscriptions", json=bad)
            assert answer.status_code == 422, (bad, answer.text)
        toml_put = client.put(
            "/api/events/subscriptions/from-file", json={"channel": "webhook", "url": receiver.url}
        )
        assert toml_put.status_code == 409 and "toml" in toml_put.text
        assert client.delete("/api/events/subscriptions/from-file").status_code == 409
        assert client.get("/api/events/subscriptions/none").status_code == 404
        assert (
            client.put(
                "/api/events/subscriptions/none", json={"channel": "webhook", "url": receiver.url}
            ).status_code
            == 404
        )
        assert client.delete("/api/events/subscriptions/ris").status_code == 204
        assert client.get("/api/events/subscriptions/ris").status_code == 404
        emit_one(archive, "order.scheduled", "1.2.10.1")
        events = client.get("/api/events", params={"type": "order.scheduled"}).json()
        assert [e["type"] for e in events] == ["order.scheduled"]
        assert events[0]["pending"] == ["from-file"]  # no dispatcher runs here
