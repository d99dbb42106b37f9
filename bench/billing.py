"""Billing benchmark: what charge capture takes of the work done when a study becomes stable, in
pacsbridge's default configuration (AI on), and how long a 500-line invoice takes to create and
read back over FHIR.

Run from the project root::

    .venv/bin/python -m bench.billing            # 10 + 20 studies per mode, 10 invoices, ~2 min
    .venv/bin/python -m bench.billing --quick    # smoke: 2 + 5 studies per mode, 3 invoices, ~1 min
    .venv/bin/python -m bench.billing --database-url postgresql+psycopg2://postgres@127.0.0.1:5432/postgres

**A. Charge capture on a stable study** (target: capture takes at most 5 % of the stable-study
work of a 200-instance study, in the default configuration). In-process, on a real archive in a
temporary directory (SQLite, or a fresh PostgreSQL database with ``--database-url``) with the
sample price list loaded.

*Stable-study work* of a study is everything pacsbridge does because the study became stable,
as the job runtime of ``pacsbridge serve`` / ``pacsbridge worker`` does it, minus the waits
between polls:

1. one pass of the stable-study scanner (``archive.stable.StableStudyScanner.scan``): finding
   the quiet study, marking it stable and enqueuing one job per ``on_stable_study`` kind, in one
   write transaction;
2. then the job worker (``archive.jobs.Worker.run_once``) until the queue has nothing runnable:
   for each job, claim, the handler, complete (and the lease heartbeat thread), and the final
   look that finds nothing left, jobs enqueued by jobs (``ai-run``) included;
3. when that work stored instances in the study (the AI results: it is then no longer stable),
   steps 1 and 2 again, as the scanner of the server does once the study is quiet again: the
   re-stabilisation of the study and its jobs (a checked, untimed look at ``stable_at`` decides).

The handlers are built as ``pacsbridge.jobs.JobRuntime`` builds them, from a registry filled by
the same ``register`` functions, in the same order, as ``build_registry`` (routing, AI,
billing); a registry of its own per mode, since the process-wide one of ``build_registry``
keeps the kinds of the first settings it saw. The scanner runs with a stable age of 0 instead
of waiting ``stable_age`` seconds; what it does is the same.

Scenarios, each with billing disabled and enabled taking turns on the same archive:

- **default (AI on)**, the verdict: pacsbridge's configuration as shipped. ``[ai]`` is left at
  its defaults (``config.settings.AISettings``: enabled, the builtin models with their default
  settings), so the builtin ``ct-body`` model selects the study's CT series (200 slices, at
  least 10) and the stable-study work holds the ``ai`` job (planning), its ``ai-run`` job (the
  model run on the series, the DICOM SEG and SR it stores) and the re-stabilisation those
  results cause (``ai`` again, which plans nothing, and with billing enabled
  ``charge-capture`` again, which finds the charge made). With billing enabled, each
  stabilisation also runs a ``charge-capture`` job (``capture_technical`` +
  ``capture_professional``; the study has no signed report yet, as when a study is first
  stored). ``--runs`` (10) timed runs per mode after ``--warmup`` (1): the model run takes
  about a second on a CPU (64² slices), the stable-study work one to two. **The verdict is p50
  of the charge-capture handler's own time (summed over the run's capture jobs) / p50 of the
  stable-study work with billing enabled <= 5 %.** The difference of the p50s, billing enabled
  minus disabled, is printed as information (a difference of two p50s of seconds, mostly the
  model run's noise).
- **AI off, no routes** (``[ai] enabled = false``), information: no job kind runs on a stable
  study while billing is disabled, the stable-study work is step 1 and the final look of step
  2, a few milliseconds; with billing enabled it is little more than capture itself.
  ``--ai-off-runs`` (20) runs per mode after ``--warmup``. It prints the capture handler's
  absolute p50 in ms, and its share of that tiny denominator, labelled as such.
- **stable route** with ``--route`` (needs DCMTK ``storescp``), information: AI off, and
  ``[routes]`` sending every stable study to a ``storescp`` on loopback (``route`` +
  ``forward`` jobs, the 200 instances sent by C-STORE): the stable-study work of a site that
  routes its studies, ``--route-runs`` (5) runs per mode after one warm-up.

Each run stores a fresh 200-instance CT study of a new patient through ``Archive.ingest``
(untimed): one axial series of 64² slices 1 mm apart, Procedure Code Sequence LOINC 24725-4
(CT Head), Contrast/Bolus Agent set, so the sample price list prices it with the contrast
surcharge and VAT. Every run checks what happened: the study stable, the stable-study kinds of
the configuration, each of their jobs run once per stabilisation and done, one billable
technical charge with a contrast surcharge (or none with billing disabled); with AI on, one
``ai-run`` job, one ``ct-body`` run of the study ``done`` that produced a SEG and an SR, both in
the archive's index.

**B. A 500-line invoice** (target: created and read back in under 10x the time of one
ImagingStudy read of a 5-instance study in the same run). One ``pacsbridge serve`` (free
loopback ports, its own temporary directory, billing enabled, the job worker off). It stores a
5-instance study by STOW-RS and times ``GET /fhir/ImagingStudy/<study uid>`` (``--reads`` reads
after 3 warm-up reads, p50); for information, it does the same for a 200-instance study (one
series of 200 small instances stored by STOW-RS). Then, in-process against the server's
database, it loads the sample price list and enters ``--lines`` (500) billable charges for the
5-instance study's patient with ``billing.manual.create_manual_charge`` (the coded technical
definitions of the sample price list in turn, with the contrast condition). Each invoice run
(``--invoices``, 10, after one warm-up) times ``POST /fhir/Invoice`` with ``Prefer:
return=minimal`` (a draft of all billable charges of the account; the answer is 201 with
``Location`` and ``ETag`` and no body, the id taken from ``Location``) plus
``GET /fhir/Invoice/<id>`` (the read-back), checks that the read-back has ``--lines``
``lineItem``, each with ``priceComponent``, and ``totalGross`` equal to the sum of the
charges, then cancels it, untimed (``PUT`` with ``status`` ``cancelled``, ``If-Match``), which
makes the charges billable again for the next run. The verdict is p50(POST + GET) /
p50(ImagingStudy read of the 5-instance study) < 10; the ratio against the 200-instance study's
read is printed as information. A failure of any of these requests, or of
``create_manual_charge``, fails the benchmark.

It prints a table and writes everything, raw runs included, to
``bench/results/billing-<timestamp>.json``. Exit status 1 when a target is missed or the
benchmark fails (the other benchmarks exit 1 only when they cannot produce a number). See
bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from bench.peers import (
    LOOPBACK,
    BenchError,
    PacsbridgeTarget,
    StorescpTarget,
    fresh_postgres_database,
    log,
    new_uid,
    pacsbridge_executable,
    run_benchmark,
)

FHIR_JSON = "application/fhir+json"
DICOM_JSON = "application/dicom+json"
SAMPLE_PRICES = Path(__file__).resolve().parents[1] / "billing" / "sample-prices.csv"
#: Charge capture takes at most this share of the stable-study work (from the issue).
CAPTURE_TARGET = 0.05
#: Invoice create + read back under this many ImagingStudy reads (from the issue).
INVOICE_TARGET = 10.0
#: A Wednesday at 10:15 (no weekend or after-hours surcharge), in force in the sample list.
STUDY_DATE = "20260304"
STUDY_TIME = "101500"
CONTRAST_AGENT = "IODINE"
PROCEDURE = ("24725-4", "LN", "CT Head")
INSTANCES = 200
ACTOR = "bench"
#: The builtin model that selects the bench's CT series in the default configuration.
AI_MODEL = "ct-body"
CAPTURE = "charge-capture"
PACSBRIDGE_ENV = {
    "PACSBRIDGE_WORKER_IN_SERVE": "false",
    "PACSBRIDGE_BILLING": json.dumps({"enabled": True}),
}
#: The scenario of the verdict, pacsbridge as shipped.
DEFAULT = "default (AI on)"
AI_OFF = "AI off, no routes"
ROUTED = "stable route"


# --- statistics --------------------------------------------------------------------------------


def p50(values: Sequence[float]) -> float:
    """Nearest-rank median, as bench.fhir (of an even count: the upper middle value)."""
    ordered = sorted(values)
    return ordered[max(0, (len(ordered) + 1) // 2 - 1)]


def ms(values: Sequence[float]) -> list[float]:
    return [round(v * 1000, 3) for v in values]


# --- data --------------------------------------------------------------------------------------


def ct_study(
    count: int, *, size: int, patient_id: str, study_uid: str | None = None
) -> tuple[str, list[bytes]]:
    """A one-series CT study as Part 10 bytes: CT Head (LOINC 24725-4) with contrast."""
    from pydicom.dataset import Dataset

    from bench.dicomweb import part10
    from tests.dicom_factory import ct_slice

    study_uid = study_uid or new_uid()
    series_uid = new_uid()
    procedure = Dataset()
    procedure.CodeValue, procedure.CodingSchemeDesignator, procedure.CodeMeaning = PROCEDURE
    out = []
    for index in range(count):
        ds = ct_slice(
            study_uid=study_uid,
            series_uid=series_uid,
            index=index,
            size=size,
            patient_id=patient_id,
            patient_name=f"BILLING^{patient_id}",
            study_date=STUDY_DATE,
            seed=index,
        )
        ds.StudyTime = STUDY_TIME
        ds.ProcedureCodeSequence = [procedure]
        ds.ContrastBolusAgent = CONTRAST_AGENT
        out.append(part10(ds))
    return study_uid, out


def archive_settings(data_dir: Path, database_url: str | None, **extra: Any) -> Any:
    """Settings of an in-process archive: the defaults, no .env file, no PACSBRIDGE_* from our
    environment (the values given win over it; a warning names any that is set)."""
    from config import Settings

    leaked = sorted(k for k in os.environ if k.startswith("PACSBRIDGE_"))
    if leaked:
        log(f"WARNING: {', '.join(leaked)} set in the environment: the in-process archive of "
            "part A may read them")  # fmt: skip
    values: dict[str, Any] = {"data_dir": data_dir, **extra}
    if database_url:
        values["database_url"] = database_url
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def load_prices(archive: Any) -> None:
    from billing.prices import load_price_list, store_price_list

    parsed = load_price_list(SAMPLE_PRICES)
    store_price_list(archive, parsed, "sample", parsed.sha256, loaded_by=ACTOR)


def study_charges(archive: Any, study_uid: str) -> list[Any]:
    from billing.capture import list_charges

    return list_charges(archive, study=study_uid)


# --- A: stable-study work ----------------------------------------------------------------------


@dataclass
class Stabilised:
    seconds: float
    scan_seconds: float
    jobs_seconds: float
    stabilisations: int
    jobs: dict[str, int]
    handler_seconds: dict[str, float]


class StableWork:
    """The scanner and one job worker of a process with these settings, as ``JobRuntime``
    builds them, each handler timed."""

    def __init__(self, archive: Any, settings: Any, name: str) -> None:
        from archive.jobs import JobHandler, JobRecord, Worker
        from archive.stable import StableStudyScanner
        from pacsbridge import ai_jobs, billing_jobs, routing_jobs
        from pacsbridge.jobs import HandlerRegistry

        # build_registry's register calls, in its order, into a registry of this mode's own
        # (the process-wide one keeps the kinds of the first settings it is given).
        registry = HandlerRegistry()
        routing_jobs.register(registry, settings)
        ai_jobs.register(registry, settings)
        billing_jobs.register(registry, settings)
        registry.load_extra(settings.extra_handlers)
        self.archive = archive
        self.kinds = registry.stable_study_kinds
        self.worker = Worker(archive.jobs, name=f"bench-{name}", poll_interval=0.1)
        self.ran: dict[str, int] = {}
        self.handler_seconds: dict[str, float] = {}

        def timed(kind: str, handler: JobHandler) -> JobHandler:
            def handle(job: JobRecord) -> None:
                started = time.perf_counter()
                try:
                    handler(job)
                finally:
                    self.handler_seconds[kind] = self.handler_seconds.get(kind, 0.0) + (
                        time.perf_counter() - started
                    )
                    self.ran[kind] = self.ran.get(kind, 0) + 1

            return handle

        for spec in registry.specs:
            self.worker.register(spec.kind, timed(spec.kind, spec.build(archive, settings)))
        self.scanner = StableStudyScanner(
            archive.db, archive.jobs, stable_age=0.0, kinds=self.kinds
        )

    def unstable(self, study_uid: str) -> bool:
        """Whether the study grew after it was declared stable (``stable_at`` cleared)."""
        from sqlalchemy import select

        from archive.models import Study

        with self.archive.db.session() as session:
            stable_at = session.scalar(
                select(Study.stable_at).where(Study.study_instance_uid == study_uid)
            )
        return stable_at is None

    def stabilise(self, study_uid: str) -> Stabilised:
        self.ran, self.handler_seconds = {}, {}
        scan_seconds = jobs_seconds = 0.0
        stabilisations = 0
        while True:
            started = time.perf_counter()
            declared = self.scanner.scan()
            scanned = time.perf_counter()
            while self.worker.run_once():
                pass
            done = time.perf_counter()
            scan_seconds += scanned - started
            jobs_seconds += done - scanned
            stabilisations += 1
            if [s.study_instance_uid for s in declared] != [study_uid]:
                raise BenchError(
                    f"scan {stabilisations} declared "
                    f"{[s.study_instance_uid for s in declared]} stable, expected only {study_uid}"
                )
            if not self.unstable(study_uid):  # untimed: the server's scanner just looks again
                break
            if stabilisations == 3:
                raise BenchError(f"{study_uid} is still not stable after 3 stabilisations")
        return Stabilised(
            scan_seconds + jobs_seconds,
            scan_seconds,
            jobs_seconds,
            stabilisations,
            self.ran,
            self.handler_seconds,
        )


@dataclass
class Mode:
    name: str
    billing: bool
    work: StableWork
    runs: list[Stabilised] = field(default_factory=list)


def check_ai_results(archive: Any, mode: Mode, study_uid: str) -> float:
    """One ct-body run of the study, done, its SEG and SR in the index; its model time (s)."""
    from sqlalchemy import func, select

    from ai.runs import RunStore
    from archive.models import Instance

    runs = RunStore(archive).list(study=study_uid)
    if [(r.model, r.status) for r in runs] != [(AI_MODEL, "done")]:
        raise BenchError(
            f"{mode.name}: AI runs of {study_uid}: "
            f"{[(r.model, r.status, r.error) for r in runs]}, expected one {AI_MODEL} run done"
        )
    (run,) = runs
    produced = run.result.get("produced") or []
    if sorted(p.get("modality") for p in produced) != ["SEG", "SR"]:
        raise BenchError(f"{mode.name}: the {AI_MODEL} run produced {produced}, not a SEG + SR")
    uids = [p["sop_instance_uid"] for p in produced]
    with archive.db.session() as session:
        stored = session.scalar(
            select(func.count()).select_from(Instance).where(Instance.sop_instance_uid.in_(uids))
        )
    if stored != len(uids):
        raise BenchError(f"{mode.name}: {stored} of the {AI_MODEL} run's SEG + SR are in the index")
    return float((run.result.get("timings") or {}).get("total") or 0.0)


def check_run(
    archive: Any, mode: Mode, study_uid: str, run: Stabilised, *, ai: bool, route: bool
) -> float | None:
    """What stabilising did: the expected jobs, the AI results, and the charge (or none).
    Returns the AI run's model time (with AI on)."""
    from archive.jobs import JobStatus

    kinds = {"ai"} if ai else set()
    kinds |= {CAPTURE} if mode.billing else set()
    kinds |= {"route"} if route else set()
    if set(mode.work.kinds) != kinds:
        raise BenchError(f"{mode.name}: stable-study kinds {mode.work.kinds}, expected {kinds}")
    expected = {kind: run.stabilisations for kind in kinds}
    if ai:
        expected["ai-run"] = 1
    if route:
        expected["forward"] = 1
    if run.jobs != expected:
        raise BenchError(f"{mode.name}: stabilising ran {run.jobs}, expected {expected}")
    jobs = [j for j in archive.jobs.list(limit=10_000) if j.study_instance_uid == study_uid]
    bad = [f"{j.kind}: {j.status} {j.last_error or ''}" for j in jobs if j.status != JobStatus.DONE]
    if bad:
        raise BenchError(f"{mode.name}: jobs of {study_uid} not done: {bad}")
    model_seconds = check_ai_results(archive, mode, study_uid) if ai else None
    charges = study_charges(archive, study_uid)
    if not mode.billing:
        if charges:
            raise BenchError(f"{mode.name}: billing disabled, yet {len(charges)} charges")
        return model_seconds
    if len(charges) != 1:
        raise BenchError(f"{mode.name}: {len(charges)} charges for the study, expected 1")
    (charge,) = charges
    codes = {line.get("code") for line in charge.lines}
    if (charge.kind, charge.status) != ("technical", "billable") or "CONTRAST" not in codes:
        raise BenchError(
            f"{mode.name}: charge {charge.id} is {charge.kind} {charge.status} with lines "
            f"{sorted(map(str, codes))}, expected a billable technical charge with CONTRAST"
        )
    return model_seconds


def measure_capture(
    archive: Any,
    settings_off: Any,
    settings_on: Any,
    args: argparse.Namespace,
    *,
    runs: int,
    warmup: int,
    ai: bool,
    route: bool,
    label: str,
) -> dict[str, Any]:
    """Billing disabled and enabled taking turns on fresh 200-instance studies."""
    modes = [
        Mode("billing disabled", False, StableWork(archive, settings_off, "off")),
        Mode("billing enabled", True, StableWork(archive, settings_on, "on")),
    ]
    log(f"A: {label}: {args.instances}-instance studies ({args.size}² CT), billing disabled and "
        f"enabled taking turns, {warmup} warm-up + {runs} runs each ...")  # fmt: skip
    ingest_seconds: list[float] = []
    model_seconds: list[float] = []
    for round_ in range(warmup + runs):
        for mode in modes if round_ % 2 == 0 else modes[::-1]:
            patient = f"BILL{new_uid()[-12:]}"
            study_uid, parts = ct_study(args.instances, size=args.size, patient_id=patient)
            started = time.perf_counter()
            for data in parts:
                archive.ingest(data)
            ingest_seconds.append(time.perf_counter() - started)
            run = mode.work.stabilise(study_uid)
            model = check_run(archive, mode, study_uid, run, ai=ai, route=route)
            if round_ >= warmup:
                mode.runs.append(run)
                if model is not None:
                    model_seconds.append(model)
        if round_ == warmup - 1:
            log(f"  {label}: warm-up done")
    off, on = modes
    off_p50 = p50([r.seconds for r in off.runs])
    on_p50 = p50([r.seconds for r in on.runs])
    capture = p50([r.handler_seconds.get(CAPTURE, 0.0) for r in on.runs])
    added = on_p50 - off_p50
    result: dict[str, Any] = {
        "scenario": label,
        "ai": "default [ai] settings (on)" if ai else "off ([ai] enabled = false)",
        "routes": "every stable study to a storescp on loopback" if route else "none",
        "stable_study_kinds": {"disabled": off.work.kinds, "enabled": on.work.kinds},
        "instances": args.instances,
        "runs": runs,
        "warmup": warmup,
        "ingest_p50_s": p50(ingest_seconds),
        "capture_handler_p50_ms": capture * 1000,
        "capture_share": capture / on_p50,
        "capture_over_disabled_p50": capture / off_p50,
        "added_ms": added * 1000,
        "added_share": added / off_p50,
        "met": capture / on_p50 <= CAPTURE_TARGET,
    }
    if ai:
        result["ai_model_run_p50_s"] = p50(model_seconds)
        result["ai_model_runs_s"] = [round(s, 4) for s in model_seconds]
    for mode in modes:
        result[mode.name] = {
            "p50_ms": p50([r.seconds for r in mode.runs]) * 1000,
            "scan_p50_ms": p50([r.scan_seconds for r in mode.runs]) * 1000,
            "jobs_p50_ms": p50([r.jobs_seconds for r in mode.runs]) * 1000,
            "handler_p50_ms": {
                kind: p50([r.handler_seconds.get(kind, 0.0) for r in mode.runs]) * 1000
                for kind in sorted({k for r in mode.runs for k in r.handler_seconds})
            },
            "stabilisations": [r.stabilisations for r in mode.runs],
            "jobs": [r.jobs for r in mode.runs],
            "runs_ms": ms([r.seconds for r in mode.runs]),
            "scan_runs_ms": ms([r.scan_seconds for r in mode.runs]),
            "jobs_runs_ms": ms([r.jobs_seconds for r in mode.runs]),
            "capture_runs_ms": ms([r.handler_seconds.get(CAPTURE, 0.0) for r in mode.runs]),
        }
    log(
        f"  {label}: stable-study work p50 {off_p50 * 1000:.2f} ms disabled, "
        f"{on_p50 * 1000:.2f} ms enabled; capture handler p50 {capture * 1000:.2f} ms "
        f"= {result['capture_share']:.1%} of the enabled p50"
    )
    return result


def part_a(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    from archive import Archive

    database_url = None
    if args.database_url:
        database_url = stack.enter_context(fresh_postgres_database(args.database_url))
    data_dir = workdir / "a" / "data"
    extra: dict[str, Any] = {}
    scp = None
    if args.route:
        # The peer and destination are known to every scenario (they alone make no job); only
        # the route scenario adds the route.
        scp = StorescpTarget(workdir / "storescp", nodelay=True)
        stack.callback(scp.stop)
        extra["peers"] = {"bench": {"ae_title": scp.ae, "host": LOOPBACK, "port": scp.dimse_port}}
        extra["destinations"] = {"bench": {"peer": "bench"}}
    # [ai] is not given: config.settings.AISettings' defaults, as a server without [ai] has.
    base = archive_settings(data_dir, database_url, **extra)
    if not base.ai.enabled or base.ai.models:
        raise BenchError(f"[ai] is not pacsbridge's default here: {base.ai}")
    archive = Archive(base)
    stack.callback(archive.close)
    load_prices(archive)
    ai_off = base.model_copy(update={"ai": base.ai.model_copy(update={"enabled": False})})

    def billing(settings: Any, enabled: bool) -> Any:
        update = {"billing": settings.billing.model_copy(update={"enabled": enabled})}
        return settings.model_copy(update=update)

    scenarios = {
        DEFAULT: measure_capture(
            archive,
            billing(base, False),
            billing(base, True),
            args,
            runs=args.runs,
            warmup=args.warmup,
            ai=True,
            route=False,
            label=DEFAULT,
        ),
        AI_OFF: measure_capture(
            archive,
            billing(ai_off, False),
            billing(ai_off, True),
            args,
            runs=args.ai_off_runs,
            warmup=args.warmup,
            ai=False,
            route=False,
            label=AI_OFF,
        ),
    }
    if scp is not None:
        from config.settings import RouteSettings

        scp.start()
        routed = ai_off.model_copy(
            update={"routes": {"bench": RouteSettings(on="stable", destinations=["bench"])}}
        )
        scenarios[ROUTED] = measure_capture(
            archive,
            billing(routed, False),
            billing(routed, True),
            args,
            runs=args.route_runs,
            warmup=1,
            ai=False,
            route=True,
            label=ROUTED,
        )
        received = scp.instance_count()
        expected = 2 * (1 + args.route_runs) * args.instances
        if received != expected:
            raise BenchError(f"storescp received {received} instances, expected {expected}")
    return {"database": "postgresql" if database_url else "sqlite", "scenarios": scenarios}


# --- B: invoices over FHIR ---------------------------------------------------------------------


class Http:
    """One keep-alive httpx client, uncompressed bodies (as bench.fhir)."""

    def __init__(self, root: str) -> None:
        import httpx

        self.root = root
        self.http = httpx.Client(timeout=300, headers={"Accept-Encoding": "identity"})

    def request(
        self, method: str, path: str, *, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[float, Any, Any]:
        """Seconds until the whole answer was read, the answer, its body as JSON (numbers as
        Decimal) or None."""
        content = None if body is None else json.dumps(body, default=str).encode()
        wanted = {"Accept": FHIR_JSON, **(headers or {})}
        if content is not None:
            wanted["Content-Type"] = FHIR_JSON
        started = time.perf_counter()
        response = self.http.request(method, self.root + path, content=content, headers=wanted)
        raw = response.content
        seconds = time.perf_counter() - started
        try:
            parsed = json.loads(raw, parse_float=Decimal) if raw else None
        except ValueError:
            parsed = None
        return seconds, response, parsed

    def stow(self, parts: Sequence[bytes]) -> None:
        from bench.dicomweb import multipart

        body, content_type = multipart(parts)
        response = self.http.post(
            f"{self.root}/dicom-web/studies",
            content=body,
            headers={"Content-Type": content_type, "Accept": DICOM_JSON},
        )
        if response.status_code != 200:
            raise BenchError(f"STOW-RS answered {response.status_code}: {response.text[:600]}")

    def close(self) -> None:
        self.http.close()


def manual_charges(archive: Any, settings: Any, patient_fk: int, lines: int) -> None:
    """``lines`` billable manual charges for the patient: the coded technical definitions of
    the sample list in turn, with the contrast condition."""
    from sqlalchemy import select

    from billing.manual import ChargeFields, create_manual_charge
    from billing.models import ChargeItemDefinition

    with archive.db.session() as session:
        definitions = session.scalars(
            select(ChargeItemDefinition)
            .where(
                ChargeItemDefinition.active.is_(True),
                ChargeItemDefinition.kind == "technical",
                ChargeItemDefinition.code.is_not(None),
            )
            .order_by(ChargeItemDefinition.id)
        ).all()
        chosen = [(d.id, d.code_system, d.code, d.display) for d in definitions]
    if not chosen:
        raise BenchError("the sample price list has no coded technical definition")
    on = date(int(STUDY_DATE[:4]), int(STUDY_DATE[4:6]), int(STUDY_DATE[6:]))
    for n in range(lines):
        definition_id, system, code, display = chosen[n % len(chosen)]
        fields_ = ChargeFields(
            status="billable",
            code_system=system,
            code=code,
            display=display,
            occurred_on=on,
            quantity=1,
            definition_id=definition_id,
            conditions=("contrast",),
        )
        try:
            create_manual_charge(
                archive, settings, patient_fk=patient_fk, fields_=fields_, actor=ACTOR
            )
        except Exception as exc:
            raise BenchError(
                f"create_manual_charge of charge {n + 1} ({system}|{code}) failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc


def account_charges(archive: Any, patient_fk: int) -> tuple[int, list[int], Decimal]:
    """The patient's account, its billable charges and their summed total."""
    from sqlalchemy import select

    from billing.models import BillingAccount, ChargeItem

    with archive.db.session() as session:
        account = session.scalar(
            select(BillingAccount.id).where(BillingAccount.patient_fk == patient_fk)
        )
        if account is None:
            raise BenchError(f"patient {patient_fk} has no billing account")
        rows = session.execute(
            select(ChargeItem.id, ChargeItem.total).where(
                ChargeItem.account_fk == account, ChargeItem.status == "billable"
            )
        ).all()
    return int(account), [int(r[0]) for r in rows], sum((r[1] for r in rows), Decimal("0"))


def check_invoice(resource: Any, lines: int, gross: Decimal) -> None:
    if not isinstance(resource, dict) or resource.get("resourceType") != "Invoice":
        raise BenchError(f"GET /fhir/Invoice: not an Invoice: {str(resource)[:300]}")
    items = resource.get("lineItem") or []
    if len(items) != lines:
        raise BenchError(f"the invoice read back has {len(items)} lineItem, expected {lines}")
    bare = sum(1 for item in items if not item.get("priceComponent"))
    if bare:
        raise BenchError(f"{bare} lineItem of the invoice have no priceComponent")
    total = (resource.get("totalGross") or {}).get("value")
    if total is None or Decimal(str(total)) != gross:
        raise BenchError(f"the invoice's totalGross is {total}, the charges sum to {gross}")


def invoice_id_of(response: Any) -> str:
    """The id in the Location of a create (``…/Invoice/<id>/_history/<version>``)."""
    location = response.headers.get("Location", "")
    parts = location.split("/_history/")[0].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "Invoice" and parts[-1]:
        return parts[-1]
    raise BenchError(f"POST /fhir/Invoice: no Invoice id in Location {location!r}")


def measure_invoices(
    client: Http, account: int, lines: int, gross: Decimal, args: argparse.Namespace
) -> dict[str, Any]:
    body = {
        "resourceType": "Invoice",
        "status": "draft",
        "account": {"reference": f"Account/{account}"},
    }
    create: list[float] = []
    read: list[float] = []
    for n in range(1 + args.invoices):
        posted, response, _ = client.request(
            "POST", "/fhir/Invoice", body=body, headers={"Prefer": "return=minimal"}
        )
        if response.status_code != 201:
            raise BenchError(
                f"POST /fhir/Invoice answered {response.status_code}: {response.text[:600]}"
            )
        if not response.headers.get("Location") or not response.headers.get("ETag"):
            raise BenchError(
                "POST /fhir/Invoice (Prefer: return=minimal) answered 201 without Location "
                f"or ETag: {dict(response.headers)}"
            )
        if response.content:
            raise BenchError(
                "POST /fhir/Invoice (Prefer: return=minimal) answered with a body of "
                f"{len(response.content)} bytes"
            )
        invoice = invoice_id_of(response)
        got, response, resource = client.request("GET", f"/fhir/Invoice/{invoice}")
        if response.status_code != 200:
            raise BenchError(
                f"GET /fhir/Invoice/{invoice} answered {response.status_code}: "
                f"{response.text[:600]}"
            )
        check_invoice(resource, lines, gross)
        if n > 0:
            create.append(posted)
            read.append(got)
        # Cancel it (untimed): its charges are billable again for the next run.
        version = (resource.get("meta") or {}).get("versionId") or response.headers.get(
            "ETag", ""
        ).removeprefix('W/"').rstrip('"')
        cancelled = {**resource, "status": "cancelled", "cancelledReason": "bench"}
        _, put, _ = client.request(
            "PUT",
            f"/fhir/Invoice/{invoice}",
            body=cancelled,
            headers={"If-Match": f'W/"{version}"', "Prefer": "return=minimal"},
        )
        if put.status_code != 200:
            raise BenchError(
                f"PUT /fhir/Invoice/{invoice} (cancel) answered {put.status_code}: {put.text[:600]}"
            )
    total = [c + r for c, r in zip(create, read, strict=True)]
    return {
        "prefer": "return=minimal",
        "create_p50_ms": p50(create) * 1000,
        "read_p50_ms": p50(read) * 1000,
        "create_read_p50_ms": p50(total) * 1000,
        "create_runs_ms": ms(create),
        "read_runs_ms": ms(read),
        "create_read_runs_ms": ms(total),
    }


def imaging_study_reads(client: Http, study_uid: str, instances: int, reads: int) -> dict[str, Any]:
    """``reads`` timed ``GET /fhir/ImagingStudy/<uid>`` after 3 warm-up reads."""
    for _ in range(3):
        client.request("GET", f"/fhir/ImagingStudy/{study_uid}")
    seconds: list[float] = []
    resource: Any = None
    for _ in range(reads):
        took, response, resource = client.request("GET", f"/fhir/ImagingStudy/{study_uid}")
        if response.status_code != 200 or (resource or {}).get("id") != study_uid:
            raise BenchError(f"GET /fhir/ImagingStudy answered {response.status_code}")
        seconds.append(took)
    listed = sum(len(s.get("instance", [])) for s in (resource or {}).get("series") or [])
    if listed != instances:
        raise BenchError(f"the ImagingStudy read back lists {listed} instances, not {instances}")
    log(f"  ImagingStudy read ({instances} instances) p50 {p50(seconds) * 1000:.2f} ms "
        f"({reads} reads)")  # fmt: skip
    return {
        "request": f"GET /fhir/ImagingStudy/<uid> ({instances} instances)",
        "instances": instances,
        "p50_ms": p50(seconds) * 1000,
        "runs_ms": ms(seconds),
    }


def part_b(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    from sqlalchemy import select

    from archive import Archive
    from archive.models import Patient

    database_url = None
    if args.database_url:
        database_url = stack.enter_context(fresh_postgres_database(args.database_url))
    target = PacsbridgeTarget(
        workdir / "b", pacsbridge_executable(), database_url, extra_env=PACSBRIDGE_ENV
    )
    stack.callback(target.stop)
    log("B: starting pacsbridge ...")
    target.start()
    assert target.process is not None
    log(f"  pacsbridge {target.version}: {target.http}, pid {target.process.pid}")
    client = Http(target.http)
    stack.callback(client.close)

    patient_id = "BILLINV1"
    study_uid, parts = ct_study(5, size=64, patient_id=patient_id)
    client.stow(parts)
    large_uid, large = ct_study(INSTANCES, size=8, patient_id="BILLINV2")
    client.stow(large)
    small_reads = imaging_study_reads(client, study_uid, len(parts), args.reads)
    large_reads = imaging_study_reads(client, large_uid, len(large), args.reads)

    # The charges, in-process against the server's database.
    settings = archive_settings(target.workdir / "data", database_url, billing={"enabled": True})
    archive = Archive(settings, migrate=False)
    stack.callback(archive.close)
    load_prices(archive)
    with archive.db.session() as session:
        patient_fk = session.scalar(select(Patient.id).where(Patient.patient_id == patient_id))
    if patient_fk is None:
        raise BenchError(f"patient {patient_id} not in the index after STOW-RS")
    started = time.perf_counter()
    manual_charges(archive, settings, int(patient_fk), args.lines)
    account, charge_ids, gross = account_charges(archive, int(patient_fk))
    if len(charge_ids) != args.lines:
        raise BenchError(f"account {account} has {len(charge_ids)} billable charges")
    log(f"  {args.lines} billable charges ({gross} in all) for account {account} in "
        f"{time.perf_counter() - started:.1f} s")  # fmt: skip

    invoices = measure_invoices(client, account, args.lines, gross, args)
    ratio = invoices["create_read_p50_ms"] / small_reads["p50_ms"]
    ratio_large = invoices["create_read_p50_ms"] / large_reads["p50_ms"]
    log(f"  invoice of {args.lines} lines: POST {invoices['create_p50_ms']:.1f} ms + GET "
        f"{invoices['read_p50_ms']:.1f} ms p50 = {ratio:.1f} reads of the 5-instance "
        f"ImagingStudy, {ratio_large:.1f} of the {INSTANCES}-instance one")  # fmt: skip
    return {
        "database": "postgresql" if database_url else "sqlite",
        "pacsbridge": {"version": target.version, "durability": target.durability},
        "pacsbridge_env": PACSBRIDGE_ENV,
        "lines": args.lines,
        "charges_made_by": "billing.manual.create_manual_charge",
        "gross": str(gross),
        "imaging_study": small_reads,
        "imaging_study_large": large_reads,
        "fhir": {**invoices, "ratio": ratio, "ratio_large_study": ratio_large},
        "met": ratio < INVOICE_TARGET,
    }


# --- the run -----------------------------------------------------------------------------------


def print_table(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, bool]:
    verdicts: dict[str, bool] = {}
    log("")
    if a is not None:
        head = (
            f"{'A: stable-study work':<20}{'disabled p50':>15}{'enabled p50':>15}"
            f"{'on - off':>12}{'capture p50':>14}{'capture %':>11}  verdict (capture % of "
            f"enabled p50 <= {CAPTURE_TARGET:.0%})"
        )
        log(head)
        log("-" * len(head))
        for name, row in a["scenarios"].items():
            off, on = row["billing disabled"], row["billing enabled"]
            if name == DEFAULT:
                verdict = "target met" if row["met"] else "target missed"
                verdicts["A: capture share of the stable-study work (AI on)"] = row["met"]
            elif name == AI_OFF:
                verdict = "information: share of a tiny denominator"
            else:
                verdict = "information"
            log(
                f"{name:<20}{off['p50_ms']:>12.2f} ms{on['p50_ms']:>12.2f} ms"
                f"{row['added_ms']:>9.2f} ms{row['capture_handler_p50_ms']:>11.2f} ms"
                f"{row['capture_share']:>11.1%}  {verdict}"
            )
        default = a["scenarios"][DEFAULT]
        ai_off = a["scenarios"][AI_OFF]
        stabilisations = sorted(set(default["billing enabled"]["stabilisations"]))
        log(
            f"{default['instances']}-instance CT studies on {a['database']}; p50 over "
            f"{default['runs']} runs per mode ({DEFAULT}), {ai_off['runs']} ({AI_OFF})"
            + (f", {a['scenarios'][ROUTED]['runs']} ({ROUTED})" if ROUTED in a["scenarios"] else "")
            + ".\n"
            "Stable-study work: stable-study scan pass (mark stable, enqueue the on_stable_study "
            "jobs) + the worker running the jobs until none is left, again for each "
            "re-stabilisation the results cause.\n"
            f"{DEFAULT}: [ai] as shipped; the {AI_MODEL} model ran on every study (model run p50 "
            f"{default['ai_model_run_p50_s']:.2f} s); storing its SEG + SR made the study "
            f"unstable again: {'/'.join(map(str, stabilisations))} stabilisations a study. "
            "The verdict is "
            "capture p50 / enabled p50; 'on - off' (enabled p50 - disabled p50, "
            f"{default['added_share']:.1%} of disabled) is information.\n"
            f"{AI_OFF}: no job runs with billing disabled; capture alone is "
            f"{ai_off['capture_handler_p50_ms']:.2f} ms p50, {ai_off['capture_share']:.0%} of a "
            "stable-study work that is little more than capture itself"
            + (
                "; 'stable route': AI off, route + forward to a storescp on loopback.\n"
                if ROUTED in a["scenarios"]
                else ".\n"
            )
            + "capture: the charge-capture handler alone (capture_technical + "
            "capture_professional), summed over the run's capture jobs."
        )
        log("")
    if b is not None:
        inv = b["fhir"]
        verdict = "target met" if b["met"] else "target missed"
        log(f"B: invoice of {b['lines']} lines: POST /fhir/Invoice (return=minimal) p50 "
            f"{inv['create_p50_ms']:.1f} ms + GET p50 {inv['read_p50_ms']:.1f} ms = "
            f"{inv['create_read_p50_ms']:.1f} ms")  # fmt: skip
        log(f"   vs GET ImagingStudy, 5 instances p50 {b['imaging_study']['p50_ms']:.2f} ms: "
            f"ratio {inv['ratio']:.1f} (target < {INVOICE_TARGET:g})  {verdict}")  # fmt: skip
        log(f"   vs GET ImagingStudy, {b['imaging_study_large']['instances']} instances p50 "
            f"{b['imaging_study_large']['p50_ms']:.2f} ms: ratio "
            f"{inv['ratio_large_study']:.1f}  information")  # fmt: skip
        verdicts["B: invoice create + read vs ImagingStudy read"] = bool(b["met"])
    return verdicts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.billing",
        description="charge capture's share of the stable-study work (AI on, as shipped), and "
        "a 500-line invoice created and read over FHIR against an ImagingStudy read",
    )
    parser.add_argument(
        "--runs", type=int, default=10, help="A: timed studies per mode, AI on (the verdict)"
    )
    parser.add_argument(
        "--ai-off-runs", type=int, default=20, help="A: timed studies per mode, AI off"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="A: untimed studies per mode first, each scenario"
    )
    parser.add_argument("--instances", type=int, default=INSTANCES, help="A: instances a study")
    parser.add_argument("--size", type=int, default=64, help="A: rows and columns of a slice")
    parser.add_argument(
        "--route",
        action="store_true",
        help="A: also compare with a stable route forwarding each study to a storescp (slow)",
    )
    parser.add_argument(
        "--route-runs", type=int, default=5, help="A: timed studies per mode with --route"
    )
    parser.add_argument("--lines", type=int, default=500, help="B: charges on the invoice")
    parser.add_argument("--invoices", type=int, default=10, help="B: timed invoices")
    parser.add_argument("--reads", type=int, default=50, help="B: timed reads of each ImagingStudy")
    parser.add_argument("--only", choices=("a", "b"), help="run only part A or part B")
    parser.add_argument(
        "--database-url",
        help="PostgreSQL instead of SQLite: fresh databases are created on this server "
        "(postgresql+psycopg2://postgres@127.0.0.1:5432/postgres)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 studies per mode AI on, 5 AI off, 3 invoices",
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.runs, args.ai_off_runs, args.warmup, args.invoices, args.reads = 2, 5, 1, 3, 20
    numbers = (args.runs, args.ai_off_runs, args.size, args.lines, args.invoices, args.reads)
    if min(numbers) < 1:
        parser.error("--runs, --ai-off-runs, --size, --lines, --invoices, --reads must be >= 1")
    if args.instances < 10:
        parser.error(f"--instances must be >= 10 (the {AI_MODEL} model's min_slices)")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.route and shutil.which("storescp") is None:
        parser.error("--route needs DCMTK's storescp")
    if args.route_runs < 1:
        parser.error("--route-runs must be >= 1")
    return args


@dataclass
class Outcome:
    verdicts: dict[str, bool] = field(default_factory=dict)


def runner(outcome: Outcome) -> Callable[..., dict[str, Any]]:
    def run(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
        started = time.perf_counter()
        load_start = os.getloadavg()
        if load_start[0] > 1.0:
            log(f"WARNING: load average {load_start[0]:.1f} before the run: other work on "
                "this machine makes the timings noisier")  # fmt: skip
        a = part_a(args, workdir, stack) if args.only in (None, "a") else None
        b = part_b(args, workdir, stack) if args.only in (None, "b") else None
        outcome.verdicts = print_table(a, b)
        if args.quick:
            log("--quick: few runs, for a smoke run only")
        return {
            "benchmark": "billing",
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": [sys.executable, "-m", "bench.billing", *sys.argv[1:]],
            "host": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "load_average_start": load_start,
                "load_average_end": os.getloadavg(),
            },
            "parameters": {
                k: v for k, v in vars(args).items() if k not in ("database_url", "keep_temp")
            }
            | {"database": "postgresql" if args.database_url else "sqlite"},
            "targets": {
                "capture_share_of_stable_study_work_max": CAPTURE_TARGET,
                "invoice_over_imaging_study_read_max": INVOICE_TARGET,
            },
            "capture": a,
            "invoice": b,
            "verdicts": outcome.verdicts,
            "wall_seconds": time.perf_counter() - started,
        }

    return run


def main(argv: Sequence[str] | None = None) -> int:
    outcome = Outcome()
    code = run_benchmark("billing", parse_args(argv), runner(outcome))
    if code == 0 and not all(outcome.verdicts.values()):
        missed = [name for name, met in outcome.verdicts.items() if not met]
        log(f"target missed or not verified: {'; '.join(missed)}")
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
