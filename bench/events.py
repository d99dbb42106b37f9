"""Event delivery benchmark: the 10k-study ingest of ``bench.query``, with and without an
AMQP subscription, and how long each event takes to reach a RabbitMQ consumer.

Run from the project root (RabbitMQ on 127.0.0.1:5672, guest/guest)::

    .venv/bin/python -m bench.events              # 10,000 studies, 2 rounds (~6 min)
    .venv/bin/python -m bench.events --quick      # 1,000 studies, 1 round

The same single-instance studies as ``bench.query`` (new UIDs per run) are sent with DCMTK
``storescu`` by concurrent senders to a fresh pacsbridge: once with no subscription (the
baseline) and once with an AMQP subscription on a topic exchange of its own, bound by a pika
consumer that records when each message arrives. Rounds alternate the order. Reported: the
ingest rate of each, the overhead of events (baseline rate / rate with events - 1; target at
most 5 %), and the latency from the event's creation (the outbox row's time, in the envelope)
to the consumer (p50, p95, max; target p95 under 1 s), with a check that every stored
instance's ``instance.stored`` event arrived exactly once (after de-duplication by message id).
Results go to ``bench/results/events-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.peers import (
    CALLING_AE,
    LOOPBACK,
    BenchError,
    ManagedProcess,
    PacsbridgeTarget,
    log,
    pacsbridge_executable,
    process_group_cpu_seconds,
    run_benchmark,
    send,
    tail,
    verify_count,
)
from bench.query import study_datasets

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
OVERHEAD_TARGET = 0.05
LATENCY_TARGET_P95 = 1.0


class Consumer:
    """A pika consumer on an exclusive queue bound to ``exchange`` with ``#``: the arrival
    time of every message. It does as little as it can while the ingest runs (bodies are
    decoded afterwards): it shares the machine's cores with the server and the broker."""

    def __init__(self, exchange: str) -> None:
        import pika

        self.exchange = exchange
        self.raw: list[tuple[str, str, float, bytes]] = []  # (id, type, arrival, body)
        self._stop = threading.Event()
        self._connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = self._connection.channel()
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, exchange, routing_key="#")
        self._channel = channel
        self._queue = queue
        self._thread = threading.Thread(target=self._run, name="bench-consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for method, properties, body in self._channel.consume(
            self._queue, auto_ack=True, inactivity_timeout=0.2
        ):
            if self._stop.is_set():
                break
            if method is not None:
                self.raw.append((properties.message_id, method.routing_key, time.time(), body))
        with contextlib.suppress(Exception):
            self._channel.cancel()

    @property
    def arrivals(self) -> list[tuple[str, str, float, str]]:
        """(id, type, arrival, the event's time) of every message so far."""
        return [(i, t, a, json.loads(body)["time"]) for i, t, a, body in list(self.raw)]

    def count(self, event_type: str) -> int:
        return len({m[0] for m in list(self.raw) if m[1] == event_type})

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self._connection.close()


def broker_cpu_seconds() -> float | None:
    """User + system CPU seconds of the local RabbitMQ (its Erlang VM, ``beam.smp``), from
    /proc; None when it is not found (a broker elsewhere)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
            if b"beam.smp" not in command or b"rabbit" not in command:
                continue
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return None


def wait_subscribed(target: PacsbridgeTarget, worker: ManagedProcess) -> None:
    """Until the worker has stored the settings file's subscription (it then delivers every
    event from that point of the outbox on)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        worker.ensure_alive()
        listed = subprocess.run(
            [str(pacsbridge_executable()), "events", "subscriptions", "--json"],
            env=target.env,
            cwd=target.workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if listed.returncode == 0 and '"bench"' in listed.stdout:
            return
        time.sleep(0.5)
    raise BenchError(f"the worker stored no subscription in 60 s\n{tail(worker.log_path)}")


def write_studies(folder: Path, studies: int, senders: int, seed: int) -> list[list[Path]]:
    batches: list[list[Path]] = [[] for _ in range(senders)]
    for n, (_info, ds) in enumerate(study_datasets(studies, seed)):
        sub = folder / f"sender{n % senders}"
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"{n:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        batches[n % senders].append(path)
    return batches


def config_file(path: Path, exchange: str | None) -> Path:
    lines = ["[events]", "include_phi = false"]
    if exchange is not None:
        lines += [
            "",
            "[events.subscriptions.bench]",
            'channel = "amqp"',
            f'url = "{AMQP_URL}"',
            f'exchange = "{exchange}"',
            'types = ["#"]',
        ]
    path.write_text("\n".join(lines) + "\n")
    return path


def one_run(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack, *, events: bool, n: int
) -> dict[str, Any]:
    name = f"{'events' if events else 'baseline'}-{n}"
    folder = workdir / name
    folder.mkdir()
    log(f"{name}: generating {args.studies} studies ...")
    batches = write_studies(folder / "studies", args.studies, args.senders, seed=args.seed + n)
    os.sync()
    exchange = f"pacsbridge.bench.{uuid.uuid4().hex[:12]}" if events else None
    consumer = Consumer(exchange) if exchange else None
    env = {
        "PACSBRIDGE_CONFIG": str(config_file(folder / "pacsbridge.toml", exchange)),
        # The studies must not become stable (and run their jobs) inside the timed ingest.
        "PACSBRIDGE_STABLE_AGE": "3600",
        "PACSBRIDGE_PEERS": json.dumps(
            {"bench": {"ae_title": CALLING_AE, "host": LOOPBACK, "port": 104}}
        ),
    }
    if args.delivery == "worker":
        # The job workers (and the event delivery with them) in a `pacsbridge worker` of their
        # own, as docker-compose.yml runs them: `serve` only accepts and stores.
        env["PACSBRIDGE_WORKER_IN_SERVE"] = "false"
    target = PacsbridgeTarget(
        folder / "pacsbridge", pacsbridge_executable(), None, name=name, extra_env=env
    )
    worker: ManagedProcess | None = None
    logdir = folder / "logs"
    logdir.mkdir()
    try:
        log(f"{name}: starting pacsbridge ...")
        target.start()
        if args.delivery == "worker":
            worker = ManagedProcess(
                f"{name}-worker",
                [str(pacsbridge_executable()), "worker"],
                env=target.env,
                cwd=target.workdir,
                log_path=target.workdir / "worker.log",
            )
            if exchange is not None:
                wait_subscribed(target, worker)
        log(f"{name}: ingest of {args.studies} instances, {args.senders} senders ...")
        assert target.process is not None
        groups = [target.process.pid] + ([worker.pid] if worker is not None else [])
        server_cpu = sum(map(process_group_cpu_seconds, groups))
        broker_cpu = broker_cpu_seconds()
        own_cpu = time.process_time()
        seconds = send(target, batches, nodelay=True, timeout=args.timeout, logdir=logdir)
        server_cpu = sum(map(process_group_cpu_seconds, groups)) - server_cpu
        own_cpu = time.process_time() - own_cpu
        broker_after = broker_cpu_seconds()
        broker = None if broker_cpu is None or broker_after is None else broker_after - broker_cpu
        verify_count(target, args.studies, settle=60)
        rate = args.studies / seconds
        log(
            f"  {seconds:.1f} s = {rate:.1f} instances/s; CPU ms per instance: server "
            f"{1000 * server_cpu / args.studies:.2f}"
            + (f", broker {1000 * broker / args.studies:.2f}" if broker is not None else "")
            + f", consumer {1000 * own_cpu / args.studies:.2f}"
        )
        result: dict[str, Any] = {
            "seconds": seconds,
            "instances_per_s": rate,
            "server_cpu_ms_per_instance": 1000 * server_cpu / args.studies,
            "broker_cpu_ms_per_instance": None if broker is None else 1000 * broker / args.studies,
            "consumer_cpu_ms_per_instance": 1000 * own_cpu / args.studies,
        }
        if consumer is not None:
            deadline = time.monotonic() + 120
            while consumer.count("instance.stored") < args.studies:
                if time.monotonic() > deadline:
                    raise BenchError(
                        f"{consumer.count('instance.stored')} of {args.studies} instance.stored "
                        f"events reached the consumer in 120 s\n{target.log_tail()}"
                    )
                time.sleep(0.2)
            time.sleep(1.0)  # any duplicate still on its way
            stored = [a for a in consumer.arrivals if a[1] == "instance.stored"]
            unique = {a[0] for a in stored}
            latencies = sorted(
                arrived - datetime.fromisoformat(created).timestamp()
                for _id, _type, arrived, created in stored
            )
            result["events"] = {
                "received": len(stored),
                "unique": len(unique),
                "latency_p50": statistics.median(latencies),
                "latency_p95": latencies[int(0.95 * (len(latencies) - 1))],
                "latency_max": latencies[-1],
            }
            log(
                f"  events: {len(unique)} unique of {len(stored)} received; latency p50 "
                f"{result['events']['latency_p50'] * 1000:.0f} ms, p95 "
                f"{result['events']['latency_p95'] * 1000:.0f} ms"
            )
            if len(unique) != args.studies:
                raise BenchError(
                    f"{len(unique)} distinct instance.stored events, not {args.studies}"
                )
        return result
    finally:
        if consumer is not None:
            consumer.close()
        if worker is not None:
            worker.stop()
        target.stop()


def run(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    load = os.getloadavg()[0]
    if load > 1.0:
        log(f"WARNING: load average {load:.1f} before the run: timings are noisier")
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "events": []}
    for n in range(args.rounds):
        order = [False, True] if n % 2 == 0 else [True, False]
        for events in order:
            runs["events" if events else "baseline"].append(
                one_run(args, workdir, stack, events=events, n=n)
            )
    base = statistics.median(r["instances_per_s"] for r in runs["baseline"])
    with_events = statistics.median(r["instances_per_s"] for r in runs["events"])
    overhead = base / with_events - 1
    p95 = max(r["events"]["latency_p95"] for r in runs["events"])
    server_base = statistics.median(r["server_cpu_ms_per_instance"] for r in runs["baseline"])
    server_events = statistics.median(r["server_cpu_ms_per_instance"] for r in runs["events"])
    summary = {
        "baseline_instances_per_s": base,
        "events_instances_per_s": with_events,
        "overhead": overhead,
        "overhead_target_met": overhead <= OVERHEAD_TARGET,
        "server_cpu_ms_per_instance": {"baseline": server_base, "events": server_events},
        "latency_p95": p95,
        "latency_target_met": p95 < LATENCY_TARGET_P95,
    }
    print()
    print(
        f"ingest {args.studies} studies, {args.senders} senders, {args.rounds} round(s), "
        f"events delivered by {args.delivery}"
    )
    print(f"  baseline            {base:10.1f} instances/s")
    print(f"  AMQP subscription   {with_events:10.1f} instances/s")
    print(f"  overhead            {overhead * 100:9.1f} %   (target <= 5 %)")
    print(
        f"  server CPU          {server_base:9.2f} -> {server_events:.2f} ms per instance "
        f"({(server_events / server_base - 1) * 100:+.1f} %)"
    )
    print(f"  latency p95         {p95 * 1000:9.0f} ms  (target < 1000 ms)")
    return {
        "studies": args.studies,
        "delivery": args.delivery,
        "senders": args.senders,
        "rounds": args.rounds,
        "load_average_start": load,
        "runs": runs,
        "summary": summary,
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.events", description=__doc__)
    parser.add_argument("--studies", type=int, default=10_000, help="single-instance studies")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu at ingest")
    parser.add_argument("--rounds", type=int, default=2, help="baseline/events pairs (median)")
    parser.add_argument("--seed", type=int, default=4242, help="seed of the generated data")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one send may take")
    parser.add_argument(
        "--delivery",
        choices=["serve", "worker"],
        default="serve",
        help="who delivers events: the job workers inside `serve` (default), or a `pacsbridge "
        "worker` process beside it (serve with worker_in_serve=false)",
    )
    parser.add_argument("--quick", action="store_true", help="1,000 studies, one round")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.rounds = 1_000, 1
    return run_benchmark("events", args, run)


if __name__ == "__main__":
    raise SystemExit(main())
