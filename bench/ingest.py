"""C-STORE ingest benchmark: pacsbridge against Orthanc and DCMTK storescp, side by side.

Run from the project root::

    .venv/bin/python -m bench.ingest            # 200 slices, 4 x 100 concurrent, 3 repeats
    .venv/bin/python -m bench.ingest --quick    # smoke run: 40 slices, 4 x 10, 1 repeat

Every target runs on free loopback ports with its own temporary directory; DCMTK ``storescu``
sends to each of them in three modes (one association with and without TCP_NODELAY on the
sender, and four concurrent senders). Medians of ``--repeat`` runs are printed as instances/s
with the ratios pacsbridge/Orthanc and pacsbridge/storescp, and written as JSON to
``bench/results/ingest-<timestamp>.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.peers import (
    LOOPBACK,
    ORTHANC_BIN,
    BenchError,
    OrthancTarget,
    PacsbridgeTarget,
    StorescpTarget,
    Target,
    dcmtk_version,
    echo,
    fresh_postgres_database,
    log,
    new_uid,
    pacsbridge_executable,
    run_benchmark,
    send,
    sender_env,
    verify_count,
)

# DCMTK (libdcmnet, dul.cc / dulfsm.cc) reads the environment variable TCP_NODELAY when it opens
# a connection: a non-zero integer disables Nagle's algorithm on that socket, 0 leaves it on.
# Without the variable the default is compiled in: Nagle stays ON unless DCMTK was built with
# DISABLE_NAGLE_ALGORITHM (Debian's 3.6.7 is not; startup_probe() checks what this build does).
MODES: dict[str, str] = {
    "nodelay": "1 association, TCP_NODELAY=1 (sender Nagle off)",
    "nagle": "1 association, TCP_NODELAY=0 (sender Nagle on)",
    "concurrent": "concurrent senders, TCP_NODELAY=1",
}


# --- data ------------------------------------------------------------------------------------


def generate_batches(
    directory: Path, *, senders: int, per_sender: int, size: int, layout: str, tag: str
) -> list[list[Path]]:
    """``senders`` lists of ``per_sender`` new CT slices each (new UIDs everywhere)."""
    from tests.dicom_factory import write_series

    batches: list[list[Path]] = []
    study_uid = new_uid()
    for index in range(senders):
        if layout == "studies":
            study_uid = new_uid()
        patient = f"BENCH-{tag}-{index}" if layout == "studies" else f"BENCH-{tag}"
        batches.append(
            write_series(
                directory / f"sender{index}",
                per_sender,
                size=size,
                study_uid=study_uid,
                series_uid=new_uid(),
                patient_id=patient,
                patient_name=f"BENCH^{tag.upper().replace('-', '^')}",
                seed=index,
            )
        )
    return batches


# --- sending ---------------------------------------------------------------------------------


def startup_probe(target: Target) -> dict[str, bool]:
    """Prove what TCP_NODELAY=1 / =0 does in this DCMTK build: libdcmnet logs (debug) right
    before it calls setsockopt(TCP_NODELAY). echoscu uses the same requestor code as storescu."""
    seen = {}
    for value in ("1", "0"):
        output = echo(target.ae, target.dimse_port, env=sender_env(value == "1"), debug=True)
        seen[value] = "disabling Nagle algorithm" in output
    if not seen["1"] or seen["0"]:
        raise BenchError(
            f"DCMTK did not behave as expected: TCP_NODELAY=1 disabled Nagle: {seen['1']}, "
            f"TCP_NODELAY=0 disabled Nagle: {seen['0']}"
        )
    return seen


# --- results ---------------------------------------------------------------------------------


@dataclass
class Run:
    target: str
    mode: str
    repeat: int
    senders: int
    instances: int
    seconds: float
    settle_seconds: float

    @property
    def rate(self) -> float:
        return self.instances / self.seconds


def summarize(runs: list[Run], targets: list[str], modes: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in modes:
        per_target: dict[str, Any] = {}
        for target in targets:
            mine = [r for r in runs if r.mode == mode and r.target == target]
            if not mine:
                continue
            rates = [r.rate for r in mine]
            per_target[target] = {
                "instances": mine[0].instances,
                "median_instances_per_s": statistics.median(rates),
                "median_seconds": statistics.median(r.seconds for r in mine),
                "min_instances_per_s": min(rates),
                "max_instances_per_s": max(rates),
                "repeats": len(mine),
            }
        ratios = {}
        pb = per_target.get("pacsbridge")
        for peer, cell in per_target.items():
            if pb and peer != "pacsbridge":
                ratios[f"pacsbridge/{peer}"] = (
                    pb["median_instances_per_s"] / cell["median_instances_per_s"]
                )
        summary[mode] = {"targets": per_target, "ratios": ratios}
    return summary


def print_table(summary: dict[str, Any], targets: list[str], mode_labels: dict[str, str]) -> None:
    width = max(len(label) for label in mode_labels.values()) + 2
    peers = [t for t in targets if t != "pacsbridge"]
    header = f"{'mode':<{width}}" + "".join(f"{t:>18}" for t in targets)
    log("")
    log("median instances/s (median seconds per run)")
    log(header)
    log("-" * len(header))
    for mode, label in mode_labels.items():
        row = f"{label:<{width}}"
        for target in targets:
            cell = summary[mode]["targets"].get(target)
            text = (
                f"{cell['median_instances_per_s']:.1f} ({cell['median_seconds']:.2f}s)"
                if cell
                else "-"
            )
            row += f"{text:>18}"
        log(row)
    if "pacsbridge" not in targets or not peers:
        log("")
        return
    log("")
    log("ratio pacsbridge / peer in instances/s (> 1: pacsbridge is faster)")
    header = f"{'mode':<{width}}" + "".join(f"{'pb/' + p:>18}" for p in peers)
    log(header)
    log("-" * len(header))
    for mode, label in mode_labels.items():
        row = f"{label:<{width}}"
        for peer in peers:
            ratio = summary[mode]["ratios"].get(f"pacsbridge/{peer}")
            row += f"{ratio:>18.2f}" if ratio is not None else f"{'-':>18}"
        log(row)
    log("")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest",
        description="C-STORE ingest: pacsbridge vs Orthanc vs storescp, driven by DCMTK storescu.",
    )
    parser.add_argument("--slices", type=int, default=200, help="slices per single-association run")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu processes")
    parser.add_argument("--per-sender", type=int, default=100, help="slices per concurrent sender")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each slice")
    parser.add_argument("--repeat", type=int, default=3, help="runs per target and mode (median)")
    parser.add_argument(
        "--layout",
        choices=["studies", "series"],
        default="studies",
        help="concurrent senders send one study each (default) or one series each of one study",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 40 slices, 4 x 10 concurrent, 1 repeat"
    )
    parser.add_argument(
        "--database-url",
        help="PostgreSQL server for pacsbridge's index, e.g. "
        "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres; a fresh database is created "
        "on it and dropped afterwards (the name in the URL is not used)",
    )
    parser.add_argument(
        "--targets",
        default="pacsbridge,orthanc,storescp",
        help="comma-separated subset of pacsbridge,orthanc,storescp",
    )
    parser.add_argument(
        "--peer-nodelay",
        choices=["both", "unset", "1"],
        default="both",
        help="TCP_NODELAY in the environment of Orthanc and storescp (their accept side): "
        "'unset' = as shipped (Nagle on), '1' = Nagle off, 'both' = run each peer both ways "
        "(default; names orthanc/storescp and orthanc-nd/storescp-nd)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="seconds one send may take before failing"
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.slices, args.per_sender, args.repeat = 40, 10, 1
    known = {"pacsbridge", "orthanc", "storescp"}
    args.target_names = [t.strip() for t in args.targets.split(",") if t.strip()]
    if not args.target_names or set(args.target_names) - known:
        parser.error(f"--targets must name some of {sorted(known)}")
    if min(args.slices, args.senders, args.per_sender, args.repeat, args.size) < 1:
        parser.error("--slices, --senders, --per-sender, --repeat and --size must be >= 1")
    return args


def check_tools(names: list[str]) -> None:
    needed = ["storescu", "echoscu"]
    if "storescp" in names:
        needed.append("storescp")
    missing = [tool for tool in needed if shutil.which(tool) is None]
    if "orthanc" in names and not os.access(ORTHANC_BIN, os.X_OK):
        missing.append(ORTHANC_BIN)
    if missing:
        raise BenchError(f"missing programs: {', '.join(missing)} (apt-get install dcmtk orthanc)")


def run(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    check_tools(args.target_names)
    database_url = None
    if args.database_url and "pacsbridge" in args.target_names:
        database_url = stack.enter_context(fresh_postgres_database(args.database_url))

    targets: list[Target] = []

    def stop_targets() -> None:
        for target in reversed(targets):
            log(f"stopping {target.name} ...")
            target.stop()

    stack.callback(stop_targets)
    peer_variants = {"both": [False, True], "unset": [False], "1": [True]}[args.peer_nodelay]
    planned: list[Target] = []
    for name in args.target_names:
        if name == "pacsbridge":
            executable = pacsbridge_executable()
            planned.append(PacsbridgeTarget(workdir / "pacsbridge", executable, database_url))
        for nodelay in peer_variants:
            suffix = "-nd" if nodelay else ""
            if name == "orthanc":
                planned.append(OrthancTarget(workdir / f"orthanc{suffix}", nodelay=nodelay))
            elif name == "storescp":
                planned.append(StorescpTarget(workdir / f"storescp{suffix}", nodelay=nodelay))
    for target in planned:
        targets.append(target)  # before start(): a half-started target is stopped as well
        log(f"starting {target.name} ...")
        target.start()
        assert target.process is not None
        log(
            f"  {target.name} {target.version}: pid {target.process.pid}, AE {target.ae}, "
            f"DIMSE {LOOPBACK}:{target.dimse_port}"
        )

    nagle = startup_probe(targets[0])
    log(
        "TCP_NODELAY probe (echoscu -d, same libdcmnet as storescu): "
        f"=1 disables Nagle: {nagle['1']}, =0 disables Nagle: {nagle['0']}"
    )

    modes = {
        "nodelay": (1, args.slices, True),
        "nagle": (1, args.slices, False),
        "concurrent": (args.senders, args.per_sender, True),
    }
    labels = {
        "nodelay": f"a) 1 assoc x {args.slices}, TCP_NODELAY=1",
        "nagle": f"b) 1 assoc x {args.slices}, TCP_NODELAY=0",
        "concurrent": f"c) {args.senders} x {args.per_sender} concurrent, TCP_NODELAY=1",
    }
    expected = {t.name: t.instance_count() for t in targets}
    runs: list[Run] = []
    data_root = workdir / "data"
    logdir = workdir / "senders"
    logdir.mkdir()
    for repeat in range(args.repeat):
        order = targets[repeat % len(targets) :] + targets[: repeat % len(targets)]
        for mode, (senders, per_sender, nodelay) in modes.items():
            count = senders * per_sender
            directory = data_root / f"r{repeat}-{mode}"
            t0 = time.perf_counter()
            batches = generate_batches(
                directory,
                senders=senders,
                per_sender=per_sender,
                size=args.size,
                layout=args.layout,
                tag=f"{repeat}-{mode}",
            )
            os.sync()
            log(
                f"[{repeat + 1}/{args.repeat}] {labels[mode]}: generated {count} slices "
                f"in {time.perf_counter() - t0:.1f} s"
            )
            for target in order:
                os.sync()  # do not let one target's write-back land in the next one's run
                target.ensure_alive()
                seconds = send(
                    target, batches, nodelay=nodelay, timeout=args.timeout, logdir=logdir
                )
                expected[target.name] += count
                settle = verify_count(target, expected[target.name])
                runs.append(
                    Run(target.name, mode, repeat + 1, senders, count, seconds, round(settle, 3))
                )
                note = f" (+{settle:.1f} s until counted)" if settle else ""
                log(
                    f"    {target.name:<10} {count} instances in {seconds:6.2f} s = "
                    f"{count / seconds:7.1f} inst/s, verified {expected[target.name]} held{note}"
                )
            shutil.rmtree(directory, ignore_errors=True)

    names = [t.name for t in targets]
    summary = summarize(runs, names, list(modes))
    print_table(summary, names, labels)
    log("durability and receive-side settings in effect:")
    for target in targets:
        log(f"  {target.name:<11} {target.durability}")
    return {
        "benchmark": "ingest",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.ingest", *sys.argv[1:]],
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "parameters": {
            "slices": args.slices,
            "senders": args.senders,
            "per_sender": args.per_sender,
            "size": args.size,
            "repeat": args.repeat,
            "layout": args.layout,
            "peer_nodelay": args.peer_nodelay,
            "transfer_syntax": "Explicit VR Little Endian",
            "database": "postgresql" if database_url else "sqlite",
            "quick": args.quick,
        },
        "modes": labels,
        "tcp_nodelay": {
            "semantics": "DCMTK reads env TCP_NODELAY: non-zero disables Nagle, 0 keeps it; "
            "unset = compiled default (Nagle on in this build)",
            "probe": nagle,
        },
        "targets": {
            t.name: {
                "version": t.version,
                "ae": t.ae,
                "durability": t.durability,
                **({"orthanc_config": t.config} if isinstance(t, OrthancTarget) else {}),
            }
            for t in targets
        },
        "storescu": dcmtk_version("storescu"),
        "runs": [asdict(r) | {"instances_per_s": r.rate} for r in runs],
        "summary": summary,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("ingest", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
