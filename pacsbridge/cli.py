"""The ``pacsbridge`` command line."""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from config import Settings, configure_logging, dump_stacks_on_sigusr1

app = typer.Typer(
    name="pacsbridge",
    help="DICOM-native PACS integration server.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Index database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")
jobs_app = typer.Typer(help="The durable job queue.", no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")
ai_app = typer.Typer(help="AI models and their runs.", no_args_is_help=True)
app.add_typer(ai_app, name="ai")
billing_app = typer.Typer(
    help="Billing: the price list, captured charges, invoices and payments.", no_args_is_help=True
)
app.add_typer(billing_app, name="billing")
prices_app = typer.Typer(help="The price list (ChargeItemDefinitions).", no_args_is_help=True)
billing_app.add_typer(prices_app, name="prices")
users_app = typer.Typer(
    help="Users of the built-in token issuer (people: a name, a role, a password).",
    no_args_is_help=True,
)
app.add_typer(users_app, name="users")
clients_app = typer.Typer(
    help="Service clients of the built-in token issuer (a client id, a role, a secret).",
    no_args_is_help=True,
)
app.add_typer(clients_app, name="clients")
auth_app = typer.Typer(help="The built-in token issuer's signing keys.", no_args_is_help=True)
app.add_typer(auth_app, name="auth")
charge_app = typer.Typer(
    help="Manual charges: add, price, void (captured charges: billing charges).",
    no_args_is_help=True,
)
billing_app.add_typer(charge_app, name="charge")
invoice_app = typer.Typer(help="Invoices: create, issue, cancel, void, show.", no_args_is_help=True)
billing_app.add_typer(invoice_app, name="invoice")
events_app = typer.Typer(
    help="Events: the outbox, deliveries, redelivery, subscriptions.", no_args_is_help=True
)
app.add_typer(events_app, name="events")

console = Console(stderr=True)
log = logging.getLogger("pacsbridge")


def _settings(**overrides: Any) -> Settings:
    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:
        console.print(f"[red]configuration error:[/red] {exc}")
        raise typer.Exit(2) from exc
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _archive(settings: Settings, migrate: bool | None = None) -> Any:
    from archive import Archive

    try:
        return Archive(settings, migrate=migrate)
    except Exception as exc:
        console.print(f"[red]cannot open the archive:[/red] {type(exc).__name__}: {exc}")
        raise typer.Exit(3) from exc


DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Overrides PACSBRIDGE_DATA_DIR.", show_default=False),
]


@app.command()
def serve(
    data_dir: DataDir = None,
    dimse_port: Annotated[
        int | None, typer.Option(help="Overrides PACSBRIDGE_DIMSE_PORT.", show_default=False)
    ] = None,
    http_port: Annotated[
        int | None, typer.Option(help="Overrides PACSBRIDGE_HTTP_PORT.", show_default=False)
    ] = None,
) -> None:
    """Run the DICOM node and the HTTP API in one process until SIGTERM or SIGINT.

    The signal stops accepting (DICOM and HTTP); open associations, requests in progress and
    running jobs finish (within shutdown_timeout; the job within job_lease_seconds), then it
    exits 0. A second SIGINT cuts HTTP requests short."""
    from pacsbridge.metrics import prepare_multiprocess

    settings = _settings(data_dir=data_dir, dimse_port=dimse_port, http_port=http_port)
    # Before any metric is made (by the imports below): this process and the ones it starts
    # count into the data dir's metrics folder, which /metrics sums (pacsbridge/metrics.py).
    prepare_multiprocess(settings, clean=True)
    dump_stacks_on_sigusr1()  # kill -USR1: every thread's stack into the log
    from dicom_node import DimseServer, patches
    from dicom_node.tls import TLSConfigurationError
    from pacsbridge import http_server
    from pacsbridge.app import create_app
    from pacsbridge.atna import start_exporter
    from pacsbridge.dimse_pool import DimseProcessPool, available_cpus
    from pacsbridge.routing_jobs import install_arrival_routes
    from security.policy import exposure_error

    problem = exposure_error(settings)
    if problem is not None:
        console.print(f"[red]refusing to start:[/red] {problem}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    patches.install(settings.log_level)  # pynetdicom, for the DIMSE node and the forwarding jobs
    archive = _archive(settings)
    install_arrival_routes(archive, settings)
    if settings.reconcile_on_start:
        threading.Thread(
            target=_reconcile_in_background, args=(archive,), name="reconcile", daemon=True
        ).start()
    runtime = _job_runtime(archive, settings, events=False) if settings.worker_in_serve else None
    events = _event_process(archive, settings) if settings.worker_in_serve else None
    processes = settings.dimse_processes or min(available_cpus(), 4)
    pool = DimseProcessPool(settings, processes - 1) if processes > 1 else None
    dimse = DimseServer(
        archive, settings, on_connection_closed=pool.local_closed if pool is not None else None
    )
    try:
        host, port = dimse.start()
    except TLSConfigurationError as exc:  # the TLS port's certificate, key or CAs
        console.print(
            f"[red]refusing to start:[/red] DICOM TLS: {exc}", highlight=False, soft_wrap=True
        )
        raise typer.Exit(2) from exc
    except OSError as exc:
        # The plain port listens first: if it does, the TLS port is what failed.
        failed = settings.dimse_tls_port if dimse.server is not None else settings.dimse_port
        console.print(
            f"[red]cannot listen for DICOM on {settings.dimse_host}:{failed}:"
            f"[/red] {exc.strerror or exc}"
        )
        raise typer.Exit(4) from exc
    if pool is not None:
        pool.connection_ended = dimse.handed_over_ended
        pool.start()
        dimse.dispatch_with(pool.dispatch)
    if runtime is not None:
        runtime.start()
    if events is not None:
        events.start()
    audit_export = start_exporter(archive)  # audit.syslog_url: ATNA to a syslog collector
    log.info(
        "pacsbridge ready",
        extra={
            "ae_title": settings.ae_title,
            "dimse": f"{host}:{port}",
            "dimse_processes": processes,
            "http": f"{settings.http_host}:{settings.http_port}",
            "index": archive.db.url.render_as_string(hide_password=True),
            "storage": archive.blobs.url,
        },
    )
    # uvicorn shuts down on SIGTERM and then raises the signal again with the handler it found:
    # make that handler an exit through the ``finally`` below, not an abrupt termination.
    _exit_on_sigterm()
    app = create_app(archive, settings, pool.status if pool is not None else None)
    # What start-up built lives as long as the process: out of the collector's sight, a full
    # collection no longer walks it (tens of milliseconds, in the middle of a C-FIND say).
    gc.collect()
    gc.freeze()
    shutdown = _GracefulShutdown(dimse, pool, runtime, events, settings.shutdown_timeout)
    try:
        http_server.run(app, settings, on_exit=shutdown.begin)
    finally:
        shutdown.finish()
        if runtime is not None:
            _stop_job_runtime(runtime, settings)
        if events is not None and not events.stop(settings.shutdown_timeout):
            log.warning("event delivery was still running at exit; it was stopped")
        archive.audit.close()  # the queued events of reads, before the export's last round
        if audit_export is not None:
            audit_export.stop()
        archive.close()
        log.info("pacsbridge stopped")


class _GracefulShutdown:
    """What ``serve`` does on SIGTERM or SIGINT, besides HTTP (uvicorn stops accepting and
    lets requests in progress finish): :meth:`begin` (from the signal handler, so it blocks
    nothing) stops accepting DICOM connections here and in the acceptor processes, which let
    their open associations finish, and lets the job workers take no new job; :meth:`finish`
    waits for the associations, ``timeout`` seconds from the signal at most, then aborts those
    still open."""

    def __init__(self, dimse: Any, pool: Any, runtime: Any, events: Any, timeout: float) -> None:
        self.dimse = dimse
        self.pool = pool
        self.runtime = runtime
        self.events = events
        self.timeout = timeout
        self._deadline: float | None = None
        self._stopping: threading.Thread | None = None

    def begin(self) -> None:
        import time

        if self._deadline is not None:
            return
        self._deadline = time.monotonic() + self.timeout
        log.info("stopping: open associations, requests and jobs finish first")
        self._stopping = threading.Thread(target=self._stop_accepting, name="shutdown")
        self._stopping.start()

    def _stop_accepting(self) -> None:
        if self.pool is not None:
            self.pool.begin_stop()
        self.dimse.stop_accepting()
        if self.runtime is not None:
            self.runtime.request_stop()
        if self.events is not None:
            self.events.begin_stop()

    def finish(self) -> None:
        import time

        self.begin()  # HTTP may have ended otherwise (its port taken, say)
        assert self._deadline is not None and self._stopping is not None
        self._stopping.join()
        left = max(0.0, self._deadline - time.monotonic())
        self.dimse.drain(left)
        if self.pool is not None:
            # The children drain with the same timeout, counted from their own signal.
            self.pool.stop(timeout=left + 10.0)


def _reconcile_in_background(archive: Any) -> None:
    try:
        report = archive.reconcile()
    except Exception:
        log.exception("start-up reconciliation failed")
        return
    if report.reindexed or report.rejected or report.deleted_blobs or report.removed_partials:
        log.warning(
            "start-up reconciliation",
            extra={
                "reindexed": report.reindexed,
                "rejected": report.rejected,
                "deleted_blobs": report.deleted_blobs,
                "removed_partials": report.removed_partials,
            },
        )


@app.command("import")
def import_(
    paths: Annotated[list[Path], typer.Argument(help="Files and directories (recursive).")],
    data_dir: DataDir = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1, help="Parallel ingests.")] = 4,
    show_rejected: Annotated[
        int, typer.Option(help="How many rejected files to list.", min=0)
    ] = 20,
) -> None:
    """Import Part-10 files and DICOMDIR trees. Exits 1 if anything was rejected."""
    from archive.audit import MINOR_FAILURE, AuditEvent, StudyEvents, os_user
    from archive.importer import import_paths
    from pacsbridge.routing_jobs import install_arrival_routes

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    install_arrival_routes(archive, settings)
    missing = [p for p in paths if not p.exists()]
    if missing:
        console.print(f"[red]no such file or directory:[/red] {', '.join(map(str, missing))}")
        raise typer.Exit(2)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("[bold]importing"),
        BarColumn(),
        MofNCompleteColumn(),
        TransferSpeedColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )
    with progress:
        task = progress.add_task("import", total=None)

        def advance(_path: Path, size: int) -> None:
            progress.update(task, advance=1)
            progress.tasks[task].fields["bytes"] = size

        # PS3.15 A.5.3.7 Import: one event per study read in, by whom (the OS user), each
        # committed with the study's first file; the files refused, one event more.
        agent, entity = os_user(), ("import " + " ".join(str(p) for p in paths))[:255]

        def imported(study: str, patient: str | None) -> AuditEvent:
            return AuditEvent(
                action="C",
                type_code="110107",
                agent=agent,
                source="cli",
                study_uid=study,
                patient_id=patient,
                entity=entity,
            )

        studies = StudyEvents(imported)
        report = import_paths(archive.ingestor, paths, jobs=jobs, progress=advance, audit=studies)
    late = [imported(study, None) for study in studies.unrecorded(report.studies)]
    if report.rejected:
        refused = imported("", None)
        refused.study_uid, refused.outcome = None, MINOR_FAILURE
        refused.outcome_text = f"{len(report.rejected)} rejected"
        late.append(refused)
    archive.audit.write(late)
    archive.close()
    summary = {
        "stored": report.stored,
        "duplicate": report.duplicate,
        "overwritten": report.overwritten,
        "rejected": len(report.rejected),
        "skipped": report.skipped,
        "bytes": report.bytes,
    }
    console.print(
        f"stored {report.stored}, duplicate {report.duplicate}, overwritten {report.overwritten}, "
        f"rejected {len(report.rejected)}, skipped (not DICOM / DICOMDIR) {report.skipped}"
    )
    if report.rejected:
        console.print("[yellow]rejected:[/yellow]")
        for reason, count in report.reasons.most_common():
            console.print(f"  {count} x {reason}", markup=False)
        for path, reason in report.rejected[:show_rejected]:
            console.print(f"  {path}: {reason}", markup=False)
    if report.warnings:
        # Stored as sent (counted above), but the data set does not quite match its SOP Class.
        console.print(f"[yellow]stored with a warning:[/yellow] {len(report.warnings)}")
        for path, warning in report.warnings[:show_rejected]:
            console.print(f"  {path}: warning: {warning}", markup=False)
    print(json.dumps(summary))
    raise typer.Exit(1 if report.rejected else 0)


@app.command()
def stats(
    data_dir: DataDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Counts of patients, studies, series, instances and bytes held."""
    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    st = archive.stats()
    archive.close()
    data = {
        "patients": st.patients,
        "studies": st.studies,
        "series": st.series,
        "instances": st.instances,
        "bytes": st.bytes,
    }
    if as_json:
        print(json.dumps(data))
    else:
        for key, value in data.items():
            print(f"{key:>10}  {value}")


@app.command()
def delete(
    study: Annotated[str | None, typer.Option(help="Study Instance UID.")] = None,
    series: Annotated[str | None, typer.Option(help="Series Instance UID.")] = None,
    instance: Annotated[str | None, typer.Option(help="SOP Instance UID.")] = None,
    patient: Annotated[str | None, typer.Option(help="Patient ID.")] = None,
    issuer: Annotated[str, typer.Option(help="Issuer of Patient ID (with --patient).")] = "",
    data_dir: DataDir = None,
) -> None:
    """Delete a patient, study, series or instance: index rows and blobs."""
    chosen = [x for x in (study, series, instance, patient) if x]
    if len(chosen) != 1:
        console.print("[red]give exactly one of --study, --series, --instance, --patient[/red]")
        raise typer.Exit(2)
    from archive.audit import AuditEvent
    from archive.audit import os_user as audit_os_user
    from billing.capture import void_study
    from billing.prices import os_user

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        # Whole studies deleted: their open charges become entered-in-error (a deleted series
        # or instance leaves the study's charges as they are until it is captured again).
        studies = [study] if study else []
        # PS3.15 A.5.3.5 DICOM Study Deleted; a series or instance: A.5.3.3, action D.
        audit = AuditEvent(
            action="D",
            type_code="110105" if study or patient else "110103",
            agent=audit_os_user(),
            source="cli",
            study_uid=study,
            patient_id=patient,
            entity=f"delete {chosen[0]}",
        )
        if study:
            count = archive.delete_study(study, audit=audit)
        elif series:
            count = archive.delete_series(series, audit=audit)
        elif instance:
            count = archive.delete_instance(instance, audit=audit)
        else:
            studies = _patient_studies(archive, patient or "", issuer)
            count = archive.delete_patient(patient, issuer, audit=audit)
        voided = 0
        if count:
            # Each charge voided is a change of the patient's record (PS3.15 A.5.3.9, action
            # U), recorded with the void.
            void_audit = AuditEvent(
                action="U", type_code="110110", agent=audit_os_user(), source="cli"
            )
            for uid in studies:
                voided += void_study(
                    archive, uid, actor=os_user(), reason="study deleted", audit=void_audit
                )
    finally:
        archive.close()
    result = {"deleted_instances": count}
    if voided:
        result["voided_charges"] = voided  # open charges of the deleted studies
    print(json.dumps(result))
    raise typer.Exit(0 if count else 1)


def _patient_studies(archive: Any, patient_id: str, issuer: str) -> list[str]:
    from sqlalchemy import select

    from archive.models import Patient, Study

    with archive.db.session() as session:
        return list(
            session.scalars(
                select(Study.study_instance_uid)
                .join(Patient, Study.patient_fk == Patient.id)
                .where(Patient.patient_id == patient_id, Patient.issuer_of_patient_id == issuer)
            ).all()
        )


@app.command()
def send(
    study: Annotated[str, typer.Argument(help="Study Instance UID.")],
    to: Annotated[str, typer.Option("--to", help="A [destinations.*] entry or a peer name.")],
    wait: Annotated[
        bool, typer.Option(help="Run the job here and wait for it (else leave it queued).")
    ] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for delivery.")] = 600.0,
    data_dir: DataDir = None,
) -> None:
    """Send a study to a destination. The send is a job: retried until delivered or dead."""
    import time

    from archive.jobs import JobStatus, Worker, worker_name
    from dicom_node import patches
    from pacsbridge.jobs import build_registry
    from pacsbridge.routing_jobs import FORWARD, forward_items

    settings = _settings(data_dir=data_dir)
    patches.install(settings.log_level)  # pynetdicom, for a send over DIMSE
    archive = _archive(settings)
    if not forward_items(archive, {"study_instance_uid": study}):
        console.print(f"[red]no study {study} in the archive[/red]")
        archive.close()
        raise typer.Exit(1)
    job_id = archive.jobs.enqueue(
        FORWARD, {"study_instance_uid": study, "destination": to}, study_instance_uid=study
    )
    console.print(f"queued job {job_id}: send {study} to {to}")
    if not wait:
        archive.close()
        print(json.dumps({"job": job_id, "status": "queued"}))
        return
    registry = build_registry(settings)
    worker = Worker(archive.jobs, name=worker_name("send"), poll_interval=0.2)
    for spec in registry.specs:
        if spec.kind == FORWARD:
            worker.register(spec.kind, spec.build(archive, settings))
    deadline = time.monotonic() + timeout
    job = archive.jobs.get(job_id)
    reported = 0
    while job is not None and job.status not in (JobStatus.DONE, JobStatus.DEAD):
        if time.monotonic() > deadline:
            break
        if not worker.run_once():
            time.sleep(0.2)
        job = archive.jobs.get(job_id)
        if job is not None and job.status is JobStatus.FAILED and job.attempts > reported:
            reported = job.attempts
            console.print(
                f"attempt {job.attempts} failed, retry at {job.next_run_at:%H:%M:%S}: "
                f"{job.last_error}",
                markup=False,
            )
    archive.close()
    status = job.status.value if job else "unknown"
    print(json.dumps({"job": job_id, "status": status, "error": job.last_error if job else None}))
    if status != JobStatus.DONE.value:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(data_dir: DataDir = None) -> None:
    """Apply the index schema migrations (also done at every start)."""
    settings = _settings(data_dir=data_dir)
    archive = _archive(settings, migrate=True)
    archive.close()
    console.print("index schema is up to date")


@db_app.command("reconcile")
def db_reconcile(data_dir: DataDir = None) -> None:
    """Make index and blob store agree: index orphan blobs, finish pending deletions."""
    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    with Progress(
        SpinnerColumn(), TextColumn("checked {task.completed} blobs"), console=console
    ) as p:
        task = p.add_task("reconcile", total=None)
        report = archive.reconcile(progress=lambda n: p.update(task, completed=n))
    archive.close()
    print(
        json.dumps(
            {
                "reindexed": report.reindexed,
                "rejected": report.rejected,
                "deleted_blobs": report.deleted_blobs,
                "removed_partials": report.removed_partials,
            }
        )
    )


@db_app.command("reindex-reports")
def db_reindex_reports(data_dir: DataDir = None) -> None:
    """Read every structured report again from its file: its DICOM JSON and the report index
    that FHIR DiagnosticReports and Observations are views of (after an upgrade)."""
    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    with Progress(
        SpinnerColumn(), TextColumn("indexed {task.completed} reports"), console=console
    ) as p:
        task = p.add_task("reindex", total=None)
        done = archive.reindex_reports(progress=lambda n: p.update(task, completed=n))
    archive.close()
    print(json.dumps({"reindexed": done}))


def _exit_on_sigterm() -> None:
    import signal

    def on_sigterm(_signum: int, _frame: Any) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    signal.signal(signal.SIGINT, on_sigterm)  # a requested stop, like SIGTERM: exit status 0


def _job_runtime(archive: Any, settings: Settings, *, events: bool = True) -> Any:
    """The worker + scanner of this process, with every registered job kind (and the event
    dispatcher, with ``events``)."""
    from dicom_node import patches
    from pacsbridge.jobs import JobRuntime, build_registry

    patches.install(settings.log_level)  # pynetdicom, for the jobs that forward over DIMSE
    try:
        return JobRuntime(archive, settings, build_registry(settings), events=events)
    except Exception as exc:
        console.print(f"[red]cannot load job handlers:[/red] {type(exc).__name__}: {exc}")
        archive.close()
        raise typer.Exit(2) from exc


def _event_process(archive: Any, settings: Settings) -> Any:
    """``serve``'s event delivery process (None with ``events.enabled`` off), after storing the
    settings file's subscriptions: they exist before the first study is accepted."""
    from archive.jobs import worker_name
    from pacsbridge.event_delivery import store_toml_subscriptions
    from pacsbridge.event_process import EventDeliveryProcess

    if not settings.events.enabled:
        return None
    try:
        store_toml_subscriptions(archive, settings)
    except ValueError as exc:
        console.print(f"[red]refusing to start:[/red] {exc}", highlight=False, soft_wrap=True)
        archive.close()
        raise typer.Exit(2) from exc
    return EventDeliveryProcess(settings, worker_name())


def _stop_job_runtime(runtime: Any, settings: Settings) -> None:
    if not runtime.stop(timeout=settings.job_lease_seconds):
        log.warning("a job is still running at exit; it runs again once its lease expires")


@app.command()
def worker(data_dir: DataDir = None) -> None:
    """Run a job worker and the stable-study scanner until SIGTERM or SIGINT.

    The first signal lets the running job finish; a second one exits at once (the job is
    claimed again when its lease expires)."""
    import signal

    from pacsbridge.metrics import prepare_multiprocess

    settings = _settings(data_dir=data_dir)
    # Its metrics (ingest of AI results, AI stages, charges) count into the data dir's metrics
    # folder: a `serve` on this data dir shows them (pacsbridge/metrics.py).
    prepare_multiprocess(settings)
    dump_stacks_on_sigusr1()  # kill -USR1: every thread's stack into the log
    from pacsbridge.routing_jobs import install_arrival_routes

    archive = _archive(settings)
    install_arrival_routes(archive, settings)  # AI results a worker stores are routed too
    runtime = _job_runtime(archive, settings)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():
            log.warning("second signal: exiting without waiting for the running job")
            raise SystemExit(128 + signum)
        log.info("stopping after the running job", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    runtime.start()
    log.info(
        "worker ready",
        extra={
            "worker": runtime.name,
            "index": archive.db.url.render_as_string(hide_password=True),
        },
    )
    while not stop.wait(0.5):
        pass
    runtime.stop()
    archive.close()
    log.info("worker exited")


def _job_status(value: str | None) -> Any:
    from archive.jobs import JobStatus

    if value is None:
        return None
    try:
        return JobStatus(value)
    except ValueError:
        allowed = ", ".join(s.value for s in JobStatus)
        console.print(f"[red]unknown job status {value!r}:[/red] one of {allowed}")
        raise typer.Exit(2) from None


#: Largest limit and offset of a listing: the index's 64-bit signed integers.
_MAX_ROWS = 2**63 - 1


@jobs_app.command("list")
def jobs_list(
    status: Annotated[
        str | None, typer.Option(help="queued, running, done, failed or dead.")
    ] = None,
    kind: Annotated[str | None, typer.Option(help="Job kind.")] = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID.")] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=_MAX_ROWS, help="At most this many (newest first).")
    ] = 50,
    offset: Annotated[int, typer.Option(min=0, max=_MAX_ROWS, help="Skip this many.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Jobs, newest first: what is queued, running, failed (will retry) or dead, and why."""
    job_status = _job_status(status)
    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    jobs = archive.jobs.list(
        status=job_status, kind=kind, study_instance_uid=study, limit=limit, offset=offset
    )
    archive.close()
    if as_json:
        print(json.dumps([job.to_json() for job in jobs]))
        return
    print(f"{'id':>8}  {'kind':<20} {'status':<8} {'tries':>5}  {'next run (UTC)':<19}  study")
    for job in jobs:
        print(
            f"{job.id:>8}  {job.kind:<20} {job.status.value:<8} "
            f"{job.attempts:>2}/{job.max_attempts:<2}  "
            f"{job.next_run_at.strftime('%Y-%m-%d %H:%M:%S')}  {job.study_instance_uid or '-'}"
        )
        if job.last_error and job.status.value in ("failed", "dead", "running"):
            print(f"{'':>10}last error: {job.last_error.splitlines()[0][:200]}")


@jobs_app.command("requeue")
def jobs_requeue(
    job_id: Annotated[int | None, typer.Argument(help="The job to run again.")] = None,
    dead: Annotated[bool, typer.Option("--dead", help="Requeue every dead job.")] = False,
    kind: Annotated[str | None, typer.Option(help="With --dead: only this kind.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Run a job (or every dead job) again from its first attempt."""
    from archive.jobs import JobStateError, JobStatus

    if (job_id is not None) == dead or (kind is not None and not dead):
        console.print("[red]give either a JOB_ID or --dead (optionally with --kind)[/red]")
        raise typer.Exit(2)
    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        if job_id is not None:
            try:
                job = archive.jobs.requeue(job_id)
            except JobStateError as exc:
                console.print(f"[red]{exc}[/red]")
                raise typer.Exit(1) from exc
            if job is None:
                console.print(f"[red]no job {job_id}[/red]")
                raise typer.Exit(1)
            count = 1
        else:
            count = archive.jobs.requeue_all(JobStatus.DEAD, kind=kind)
    finally:
        archive.close()
    print(json.dumps({"requeued": count}))


@events_app.command("list")
def events_list(
    type_: Annotated[str | None, typer.Option("--type", help="Event type.")] = None,
    study: Annotated[str | None, typer.Option(help="Study Instance UID.")] = None,
    subscription: Annotated[str | None, typer.Option(help="Subscription name.")] = None,
    status: Annotated[
        str | None, typer.Option(help="Only events with a delivery held, failed, dead, delivered.")
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=_MAX_ROWS, help="At most this many (newest first).")
    ] = 50,
    offset: Annotated[int, typer.Option(min=0, max=_MAX_ROWS, help="Skip this many.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Outbox events, newest first, with their failed, held, dead or redelivered deliveries
    and the subscriptions they have still to reach."""
    from archive.subscriptions import SubscriptionNotFound, Subscriptions

    if status is not None and status not in ("held", "failed", "dead", "delivered"):
        console.print(
            f"[red]unknown delivery status {status!r}:[/red] held, failed, dead, delivered"
        )
        raise typer.Exit(2)
    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        events = Subscriptions(archive.db).events(
            type=type_,
            study=study,
            subscription=subscription,
            status=status,
            limit=limit,
            offset=offset,
        )
    except SubscriptionNotFound as exc:
        console.print(f"[red]{exc.reason}[/red]")
        raise typer.Exit(1) from exc
    finally:
        archive.close()
    if as_json:
        print(json.dumps(events))
        return
    print(f"{'seq':>8}  {'id':<36}  {'type':<18} {'time (UTC)':<19}  study")
    for event in events:
        print(
            f"{event['sequence']:>8}  {event['id']:<36}  {event['type']:<18} "
            f"{event['time'][:19].replace('T', ' '):<19}  {event['study'] or '-'}"
        )
        for delivery in event["deliveries"]:
            line = f"{'':>10}{delivery['subscription']}: {delivery['status']}"
            line += f" after {delivery['attempts']} attempt(s)"
            if delivery["last_error"] and delivery["status"] != "delivered":
                line += f": {delivery['last_error'].splitlines()[0][:160]}"
            print(line)
        if event["pending"]:
            print(f"{'':>10}pending: {', '.join(event['pending'])}")


@events_app.command("redeliver")
def events_redeliver(
    event_id: Annotated[str, typer.Argument(help="The event's id (a UUID).")],
    subscription: Annotated[
        str | None, typer.Option(help="Only to this subscription (default: every one it passed).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Deliver an event again (a dead one, say), as soon as a dispatcher runs."""
    from archive.audit import AuditEvent
    from archive.audit import os_user as audit_os_user
    from archive.subscriptions import SubscriptionNotFound, Subscriptions

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    # PS3.15 A.5.3.1 Application Activity, as the admin API's requests are audited.
    audit = AuditEvent(
        action="E",
        type_code="110100",
        agent=audit_os_user(),
        source="cli",
        entity=f"events redeliver {event_id}"[:255],
        query=f"subscription={subscription}" if subscription else None,
    )
    try:
        names = Subscriptions(archive.db).redeliver(event_id, subscription, audit=audit)
    except SubscriptionNotFound as exc:
        console.print(f"[red]{exc.reason}[/red]")
        raise typer.Exit(1) from exc
    finally:
        archive.close()
    print(json.dumps({"event": event_id, "subscriptions": names}))
    if not names:
        raise typer.Exit(1)


@events_app.command("subscriptions")
def events_subscriptions(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Where events go: each subscription's channel, types, state and deliveries owed."""
    from archive.subscriptions import Subscriptions

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        subs = [sub.to_json() for sub in Subscriptions(archive.db).all(counts=True)]
    finally:
        archive.close()
    if as_json:
        print(json.dumps(subs))
        return
    print(f"{'name':<24} {'channel':<9} {'status':<7} {'source':<6} {'cursor':>8}  endpoint")
    for sub in subs:
        print(
            f"{sub['name']:<24} {sub['channel']:<9} {sub['status']:<7} {sub['source']:<6} "
            f"{sub['cursor']:>8}  {sub['endpoint']}"
        )
        owed = ", ".join(f"{n} {s}" for s, n in sorted(sub["deliveries"].items()))
        print(f"{'':>10}types: {','.join(sub['types'])}" + (f"; {owed}" if owed else ""))
        if sub["error"]:
            print(f"{'':>10}error: {sub['error'].splitlines()[0][:200]}")


@ai_app.command("models")
def ai_models(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Models: source, weights SHA-256, what each selects, whether it is on."""
    from ai.registry import ModelRegistry

    settings = _settings(data_dir=data_dir)
    specs = [spec.to_json() for spec in ModelRegistry(settings.ai).specs.values()]
    if as_json:
        print(json.dumps(specs))
        return
    for spec in specs:
        state = "on" if spec["enabled"] else "off"
        print(f"{spec['name']} ({spec['kind']}, {state}): {spec['description'] or spec['source']}")
        print(f"  source   {spec['source']}")
        print(f"  weights  {spec['weights_sha256'] or '-'}  {' '.join(spec['weights']) or ''}")
        print(f"  version  {spec['version']}")
        selects = ", ".join(f"{k}={v}" for k, v in spec["selector"].items()) or "every series"
        print(f"  selects  {selects}")
        print(f"  labels   {', '.join(spec['labels'])}")
        if spec["error"]:
            print(f"  [cannot run: {spec['error']}]")


@ai_app.command("run")
def ai_run(
    study: Annotated[str, typer.Argument(help="Study Instance UID.")],
    model: Annotated[str | None, typer.Option(help="Only this model.")] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Wait for the runs to end (a worker must run them).")
    ] = False,
    timeout: Annotated[float, typer.Option(min=1, help="With --wait: give up after.")] = 600,
    data_dir: DataDir = None,
) -> None:
    """Queue runs of the models (or one) on a study, even on series they have already seen;
    `serve` or `worker` runs them. Prints the runs as JSON; exit 1 if one failed."""
    import time

    from ai.runs import RunStore, plan_study
    from archive.audit import AuditEvent
    from archive.audit import os_user as audit_os_user
    from pacsbridge.ai_jobs import enqueue_runs, model_registry

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        models = model_registry(settings)
        if model is not None and models.get(model) is None:
            console.print(f"[red]no model {model!r}[/red] (pacsbridge ai models lists them)")
            raise typer.Exit(2)
        planned = plan_study(archive, models, study, model=model, trigger="manual")
        if not planned:
            console.print(f"[red]no series of study {study} is selected by a model[/red]")
            raise typer.Exit(1)
        enqueue_runs(archive, planned, study)
        # PS3.15 A.5.3.1 Application Activity, as POST /api/ai/runs is audited: who asked for
        # models to read the study (the patient is looked up from it). Each run's own event
        # (the model reading the study, 110103) is recorded by the job that runs it.
        archive.audit.write(
            [
                AuditEvent(
                    action="E",
                    type_code="110100",
                    agent=audit_os_user(),
                    source="cli",
                    study_uid=study,
                    entity=f"ai run {study}"[:255],
                    query=f"model={model}" if model else None,
                )
            ]
        )
        store = RunStore(archive)
        deadline = time.monotonic() + timeout
        while True:
            runs = [store.get(p.run_id) for p in planned]
            pending = [r for r in runs if r is None or r.status in ("queued", "running")]
            if not wait or not pending:
                break
            if time.monotonic() > deadline:
                console.print("[red]timed out waiting for the runs[/red] (is a worker running?)")
                raise typer.Exit(3)
            time.sleep(0.5)
    finally:
        archive.close()
    print(json.dumps([r.to_json() for r in runs if r is not None]))
    if wait and any(r is not None and r.status == "failed" for r in runs):
        raise typer.Exit(1)


@ai_app.command("runs")
def ai_runs(
    study: Annotated[str | None, typer.Option(help="Study Instance UID.")] = None,
    model: Annotated[str | None, typer.Option(help="Model name.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=_MAX_ROWS)] = 50,
    data_dir: DataDir = None,
) -> None:
    """AI runs, newest first, as JSON lines."""
    from ai.runs import RunStore

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        for run in RunStore(archive).list(study=study, model=model, limit=limit):
            print(json.dumps(run.to_json()))
    finally:
        archive.close()


@prices_app.command("load")
def prices_load(
    file: Annotated[Path, typer.Argument(help="The price list: CSV, or TOML (*.toml).")],
    name: Annotated[
        str | None, typer.Option(help="Name of this version (default: the file's name).")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Load a price list as a new version: every definition of the earlier versions becomes
    inactive (kept for the charges made with them). Planned charges are priced again: those it
    prices become billable. Prints {"price_list", "definitions", "billable"}; a bad file is
    reported line by line on stderr (exit 1) and nothing is stored."""
    from billing.capture import reprice_planned
    from billing.prices import PriceListError, load_price_list, os_user, store_price_list

    settings = _settings(data_dir=data_dir)
    try:
        parsed = load_price_list(file)
    except PriceListError as exc:
        console.print(f"[red]{exc.source}: the price list is not loaded[/red]", highlight=False)
        for error in exc.errors:
            print(error, file=sys.stderr)
        raise typer.Exit(1) from exc
    archive = _archive(settings)
    try:
        price_list = store_price_list(
            archive,
            parsed,
            name or file.name,
            parsed.sha256,
            currency=settings.billing.currency,
            loaded_by=os_user(),
        )
        billable = reprice_planned(archive, settings, actor=os_user(), audit=_cli_change())
    finally:
        archive.close()
    print(
        json.dumps(
            {
                "price_list": price_list,
                "definitions": len(parsed.definitions),
                "billable": billable,
            }
        )
    )


@prices_app.command("list")
def prices_list(
    all_versions: Annotated[
        bool, typer.Option("--all", help="Every definition of every loaded version.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    data_dir: DataDir = None,
) -> None:
    """The definitions in force today (or, with --all, of every version, inactive ones too)."""
    from billing.prices import definition_json, definitions

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        with archive.db.session() as session:
            rows = [definition_json(d) for d in definitions(session, all_versions=all_versions)]
    finally:
        archive.close()
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        code = f"{row['code_system']}:{row['code']}" if row["code"] else "-"
        key = "/".join(
            str(v)
            for v in (row["modality"], row["body_part"], row["laterality"], row["contrast"])
            if v is not None
        )
        until = row["effective_to"] or "open"
        state = "" if row["active"] else "  (inactive)"
        print(
            f"{row['id']:>6}  v{row['price_list']:<4} {row['kind']:<12} {code:<24} {key:<20} "
            f"{row['base_amount']:>10} {row['currency']}  {row['effective_from']}..{until}  "
            f"{row['display']}{state}"
        )


def _print_charges(rows: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps(rows))
        return
    for row in rows:
        code = f"{row['code_system']}:{row['code']}" if row["code"] else "-"
        total = f"{row['total']} {row['currency']}" if row["total"] is not None else "-"
        why = f"  ({row['review_reason']})" if row["review_reason"] else ""
        print(
            f"{row['id']:>6}  {row['status']:<16} {row['kind']:<12} {row['patient_id']:<16} "
            f"{code:<24} {total:>14}  {row['occurred_on']}  {row['display']}{why}"
        )


@billing_app.command("charges")
def billing_charges(
    study: Annotated[str | None, typer.Option(help="Study Instance UID.")] = None,
    patient: Annotated[str | None, typer.Option(help="Patient ID.")] = None,
    status: Annotated[
        str | None, typer.Option(help="planned, billable or entered-in-error.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    data_dir: DataDir = None,
) -> None:
    """The captured charges, oldest first."""
    from billing.capture import charge_json, list_charges

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        rows = [
            charge_json(c)
            for c in list_charges(archive, study=study, patient=patient, status=status)
        ]
    finally:
        archive.close()
    _print_charges(rows, as_json)


@billing_app.command("review")
def billing_review(
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    data_dir: DataDir = None,
) -> None:
    """The planned charges waiting for review, with the reason (no price: load a price list
    that prices them and they become billable)."""
    from billing.capture import PLANNED, charge_json, list_charges

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        rows = [charge_json(c) for c in list_charges(archive, status=PLANNED)]
    finally:
        archive.close()
    _print_charges(rows, as_json)


@billing_app.command("capture")
def billing_capture(
    study: Annotated[str, typer.Argument(help="Study Instance UID.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Capture a study's charges now (technical, and professional for its signed reports);
    prints them. Idempotent: charges captured before are printed, never made again."""
    from billing.capture import capture_professional, capture_technical, charge_json, list_charges
    from billing.prices import os_user

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    try:
        ids = capture_technical(archive, settings, study, actor=os_user(), audit=_cli_change("C"))
        ids += capture_professional(
            archive, settings, study, actor=os_user(), audit=_cli_change("C")
        )
        rows = [charge_json(c) for c in list_charges(archive, study=study) if c.id in set(ids)]
    finally:
        archive.close()
    _print_charges(rows, as_json)
    if not rows:
        console.print(f"[yellow]no charge: no such study or no procedure in {study}[/yellow]")
        raise typer.Exit(1)


def _refusing_call(settings: Settings, call: Any, refusal: type[Exception]) -> Any:
    """Run ``call(archive)``; a ``refusal`` prints its message and exits 1."""
    from rich.markup import escape

    archive = _archive(settings)
    try:
        return call(archive)
    except refusal as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from exc
    finally:
        archive.close()


def _billing_call(settings: Settings, call: Any) -> Any:
    """Run ``call(archive)``; a ``BillingError`` prints its message and exits 1."""
    from billing.invoices import BillingError

    return _refusing_call(settings, call, BillingError)


def _print_invoice(row: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(row, indent=2))
        return
    due = f"  due {row['due_on']}" if row["due_on"] else ""
    late = "  OVERDUE" if row["overdue"] else ""
    print(
        f"invoice {row['id']}  account {row['account']}  {row['status']}  "
        f"net {row['net']}  tax {row['tax']}  gross {row['gross']} {row['currency']}  "
        f"paid {row['paid']}  outstanding {row['outstanding']}{due}{late}"
    )
    for line in row["lines"]:
        print(
            f"  {line['position']:>3}  charge {line['charge']:<6} {line['code'] or '-':<12} "
            f"{line['gross']:>12}  {line['description']}"
        )
    for payment in row["payments"]:
        why = f"  ({payment['reason']})" if payment["reason"] else ""
        print(f"  payment {payment['id']}  {payment['amount']:>12}  {payment['received_at']}{why}")


@charge_app.command("add")
def billing_charge_add(
    patient: Annotated[str, typer.Option(help="Patient ID (the patient must be in the archive).")],
    text: Annotated[str, typer.Option(help="What is charged (the display).")],
    issuer: Annotated[str, typer.Option(help="Issuer of Patient ID.")] = "",
    code: Annotated[
        str | None, typer.Option(help="A price list code: SYSTEM:CODE (local:CD-COPY).")
    ] = None,
    amount: Annotated[str | None, typer.Option(help="Unit price (12.50).")] = None,
    definition: Annotated[
        int | None, typer.Option(help="Price it by this ChargeItemDefinition id.")
    ] = None,
    quantity: Annotated[int, typer.Option(min=1, help="How many.")] = 1,
    day: Annotated[str | None, typer.Option("--date", help="YYYY-MM-DD (default today).")] = None,
    identifier: Annotated[
        str | None, typer.Option(help="Your id of the charge: adding it again is a no-op.")
    ] = None,
    note: Annotated[str | None, typer.Option(help="Why it is charged.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the charge as JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Enter a manual charge (not everything is imaging); without --amount or --definition it
    is planned, waiting for a price."""
    from datetime import date as date_type

    from sqlalchemy import select

    from archive.models import Patient
    from billing.capture import charge_json, list_charges
    from billing.invoices import BillingError
    from billing.manual import ChargeFields, create_manual_charge
    from billing.prices import os_user

    code_system = code_value = None
    if code:
        code_system, _, code_value = code.partition(":")
        if not code_value:
            console.print("[red]error:[/red] --code: SYSTEM:CODE (loinc, radlex, local, cpt)")
            raise typer.Exit(1)
    try:
        on = date_type.fromisoformat(day) if day else date_type.today()
    except ValueError as exc:
        console.print(f"[red]error:[/red] --date {day!r}: YYYY-MM-DD")
        raise typer.Exit(1) from exc
    settings = _settings(data_dir=data_dir)

    def add(archive: Any) -> dict[str, Any]:
        with archive.db.session() as session:
            patient_fk = session.scalar(
                select(Patient.id).where(
                    Patient.patient_id == patient, Patient.issuer_of_patient_id == issuer
                )
            )
        if patient_fk is None:
            raise BillingError(f"no patient {patient!r} (issuer {issuer!r}) in the archive")
        charge_id, _ = create_manual_charge(
            archive,
            settings,
            patient_fk=patient_fk,
            fields_=ChargeFields(
                status="billable",
                code_system=code_system,
                code=code_value,
                display=text,
                occurred_on=on,
                quantity=quantity,
                amount=Decimal(amount) if amount is not None else None,
                definition_id=definition,
                note=note,
            ),
            actor=os_user(),
            identifier=f"cli|{identifier}" if identifier else None,
            audit=_cli_change("C"),
        )
        (charge,) = [c for c in list_charges(archive, patient=patient) if c.id == charge_id]
        return charge_json(charge)

    try:
        row = _billing_call(settings, add)
    except ArithmeticError as exc:
        console.print(f"[red]error:[/red] --amount {amount!r}: not a decimal amount")
        raise typer.Exit(1) from exc
    _print_charges([row], as_json)


def _adjust_charge(
    settings: Settings, charge_id: int, reason: str | None, change: dict[str, Any]
) -> None:
    from dataclasses import replace

    from billing.invoices import BillingError
    from billing.manual import charge_fields, update_charge
    from billing.models import ChargeItem
    from billing.prices import os_user

    def adjust(archive: Any) -> None:
        with archive.db.session() as session:
            charge = session.get(ChargeItem, charge_id)
            if charge is None:
                raise BillingError(f"no charge {charge_id}")
            wanted = replace(charge_fields(charge), **change)
        if not update_charge(
            archive,
            settings,
            charge_id,
            wanted,
            actor=os_user(),
            reason=reason,
            audit=_cli_change(),
        ):
            console.print(f"charge {charge_id} is so already: unchanged")

    _billing_call(settings, adjust)


@charge_app.command("price")
def billing_charge_price(
    charge_id: Annotated[int, typer.Argument(help="A planned charge, or a manual one.")],
    amount: Annotated[str, typer.Argument(help="The unit price (80.00).")],
    reason: Annotated[str | None, typer.Option(help="Why.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Price a charge by hand: a planned charge becomes billable."""
    try:
        value = Decimal(amount)
    except ArithmeticError as exc:
        console.print(f"[red]error:[/red] {amount!r}: not a decimal amount")
        raise typer.Exit(1) from exc
    settings = _settings(data_dir=data_dir)
    _adjust_charge(
        settings,
        charge_id,
        reason,
        {"amount": value, "status": "billable", "definition_id": None, "note": reason},
    )


@charge_app.command("void")
def billing_charge_void(
    charge_id: Annotated[int, typer.Argument(help="An open (planned or billable) charge.")],
    reason: Annotated[str, typer.Option(help="Why (required).")],
    data_dir: DataDir = None,
) -> None:
    """Void a charge (entered-in-error): it is never invoiced."""
    settings = _settings(data_dir=data_dir)
    _adjust_charge(settings, charge_id, reason, {"status": "entered-in-error"})


@invoice_app.command("create")
def billing_invoice_create(
    account: Annotated[
        int | None, typer.Option(help="Invoice the account's billable charges.")
    ] = None,
    charges: Annotated[
        str | None, typer.Option(help="Invoice these charges (ids: 1,2,3) of one account.")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Create a draft invoice; prints its id."""
    from billing.invoices import create_invoice
    from billing.prices import os_user

    if (account is None) == (charges is None):
        console.print("[red]error:[/red] give --account or --charges (one of them)")
        raise typer.Exit(1)
    charge_ids = None
    if charges is not None:
        try:
            charge_ids = [int(item) for item in charges.split(",") if item.strip()]
        except ValueError as exc:
            console.print(f"[red]error:[/red] --charges: not a list of ids: {charges}")
            raise typer.Exit(1) from exc
    settings = _settings(data_dir=data_dir)
    invoice_id = _billing_call(
        settings,
        lambda archive: create_invoice(
            archive,
            settings,
            account_id=account,
            charge_ids=charge_ids,
            actor=os_user(),
            audit=_cli_change("C"),
        ),
    )
    print(invoice_id)


@invoice_app.command("issue")
def billing_invoice_issue(
    invoice_id: Annotated[int, typer.Argument(help="The draft invoice.")],
    data_dir: DataDir = None,
) -> None:
    """Issue a draft invoice (immutable from then on; due after billing.payment_terms_days)."""
    from billing.invoices import issue_invoice
    from billing.prices import os_user

    settings = _settings(data_dir=data_dir)
    _billing_call(
        settings,
        lambda archive: issue_invoice(
            archive, settings, invoice_id, actor=os_user(), audit=_cli_change()
        ),
    )


@invoice_app.command("cancel")
def billing_invoice_cancel(
    invoice_id: Annotated[int, typer.Argument(help="A draft, or an issued invoice unpaid.")],
    reason: Annotated[str, typer.Option(help="Why (required).")],
    data_dir: DataDir = None,
) -> None:
    """Cancel an invoice: its charges become billable again."""
    from billing.invoices import cancel_invoice
    from billing.prices import os_user

    settings = _settings(data_dir=data_dir)
    _billing_call(
        settings,
        lambda archive: cancel_invoice(
            archive, invoice_id, reason=reason, actor=os_user(), audit=_cli_change()
        ),
    )


@invoice_app.command("void")
def billing_invoice_void(
    invoice_id: Annotated[int, typer.Argument(help="A draft, or an issued invoice unpaid.")],
    reason: Annotated[str, typer.Option(help="Why it was made by mistake (required).")],
    data_dir: DataDir = None,
) -> None:
    """Mark an invoice made by mistake entered-in-error: its charges become billable again."""
    from billing.invoices import void_invoice
    from billing.prices import os_user

    settings = _settings(data_dir=data_dir)
    _billing_call(
        settings,
        lambda archive: void_invoice(
            archive, invoice_id, reason=reason, actor=os_user(), audit=_cli_change()
        ),
    )


@invoice_app.command("show")
def billing_invoice_show(
    invoice_id: Annotated[int, typer.Argument(help="The invoice.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """An invoice with its lines, payments and history."""
    from billing.invoices import invoice_json

    settings = _settings(data_dir=data_dir)
    row = _billing_call(settings, lambda archive: invoice_json(archive, invoice_id))
    _print_invoice(row, as_json)


@billing_app.command("pay")
def billing_pay(
    invoice_id: Annotated[int, typer.Argument(help="The issued invoice.")],
    amount: Annotated[str, typer.Argument(help="120.00; negative: a refund (--reason).")],
    reason: Annotated[str | None, typer.Option(help="Why (required for a refund).")] = None,
    reference: Annotated[str | None, typer.Option(help="The payment's reference.")] = None,
    data_dir: DataDir = None,
) -> None:
    """Record a payment (or a refund) against an invoice; prints the payment's id."""
    from billing.invoices import record_payment
    from billing.prices import os_user

    settings = _settings(data_dir=data_dir)
    payment_id = _billing_call(
        settings,
        lambda archive: record_payment(
            archive,
            invoice_id,
            amount,
            actor=os_user(),
            reason=reason,
            reference=reference,
            audit=_cli_change("C"),
        ),
    )
    print(payment_id)


def _cli_change(action: str = "U") -> Any:
    """The audit event of a billing change made from the command line (PS3.15 A.5.3.9 Patient
    Record; the agent is the OS user), committed by the billing function it is given to in the
    change's own transaction."""
    from archive.audit import AuditEvent
    from archive.audit import os_user as audit_os_user

    return AuditEvent(action=action, type_code="110110", agent=audit_os_user(), source="cli")


@billing_app.command("balance")
def billing_balance(
    patient: Annotated[str | None, typer.Option(help="Patient ID.")] = None,
    issuer: Annotated[str, typer.Option(help="Issuer of Patient ID.")] = "",
    account: Annotated[int | None, typer.Option(help="Account id.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """Billed, paid, outstanding and overdue of a patient or an account."""
    from billing.invoices import balance

    settings = _settings(data_dir=data_dir)
    result = _billing_call(
        settings,
        lambda archive: balance(archive, account_id=account, patient_id=patient, issuer=issuer),
    )
    row = {name: str(value) for name, value in result._asdict().items()}
    if as_json:
        print(json.dumps(row, indent=2))
    else:
        print("  ".join(f"{name} {value}" for name, value in row.items()))


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


# --- access ------------------------------------------------------------------------------------


def _account_call(settings: Settings, call: Any) -> Any:
    """Run ``call(archive)``; an ``AccountError`` prints its message and exits 1."""
    from security.accounts import AccountError

    return _refusing_call(settings, call, AccountError)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = typer.prompt("Password", hide_input=True)
    if typer.prompt("Again", hide_input=True) != first:
        console.print("[red]error:[/red] the two passwords differ")
        raise typer.Exit(1)
    return str(first)


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The user's login name.")],
    role: Annotated[
        str, typer.Option(help="admin, radiologist, clinician, billing, modality or service.")
    ],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Add a user (the password is stored as an argon2id hash)."""
    from security.accounts import add_user

    password = _read_password(password_stdin)
    settings = _settings(data_dir=data_dir)
    _account_call(settings, lambda archive: add_user(archive, name, role, password))


@users_app.command("list")
def users_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """The users, their roles and whether they are disabled."""
    from security.accounts import list_users

    settings = _settings(data_dir=data_dir)
    rows = _account_call(settings, list_users)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        print(f"{row['name']:<24} {row['role']:<12} {'disabled' if row['disabled'] else ''}")


@users_app.command("disable")
def users_disable(
    name: Annotated[str, typer.Argument(help="The user.")], data_dir: DataDir = None
) -> None:
    """Disable a user: no new token; its refresh tokens stop working."""
    from security.accounts import disable_user

    settings = _settings(data_dir=data_dir)
    _account_call(settings, lambda archive: disable_user(archive, name))


@users_app.command("passwd")
def users_passwd(
    name: Annotated[str, typer.Argument(help="The user.")],
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    data_dir: DataDir = None,
) -> None:
    """Set a user's password (its refresh tokens stop working)."""
    from security.accounts import set_password

    password = _read_password(password_stdin)
    settings = _settings(data_dir=data_dir)
    _account_call(settings, lambda archive: set_password(archive, name, password))


@clients_app.command("add")
def clients_add(
    name: Annotated[str, typer.Argument(help="The client_id.")],
    role: Annotated[str, typer.Option(help="The role its tokens carry (e.g. service).")],
    scope: Annotated[str, typer.Option(help="Scopes it may be granted, space separated.")] = "",
    jwks: Annotated[
        Path | None,
        typer.Option(help="Its public JWK Set (JSON file): it authenticates with private_key_jwt."),
    ] = None,
    patient: Annotated[
        str | None,
        typer.Option(
            help="A FHIR Patient id: its tokens carry it as the SMART patient launch context "
            "and its patient/ scopes read that patient's compartment only."
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Register a service client; prints its secret once (only a hash is kept), or nothing for
    a client that authenticates with its keys (--jwks, SMART Backend Services)."""
    from security.accounts import AccountError, add_client

    keys = None
    if jwks is not None:
        try:
            keys = json.loads(jwks.read_text())
        except (OSError, ValueError) as exc:
            console.print(f"[red]error:[/red] --jwks {jwks}: {exc}")
            raise typer.Exit(1) from exc
    settings = _settings(data_dir=data_dir)

    def add(archive: Any) -> str:
        if keys is not None and not isinstance(keys, dict):
            raise AccountError("--jwks: not a JWK Set (a JSON object with keys)")
        return add_client(archive, name, role, scope, keys, patient)

    secret = _account_call(settings, add)
    if secret:
        print(secret)


@clients_app.command("list")
def clients_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    data_dir: DataDir = None,
) -> None:
    """The service clients."""
    from security.accounts import list_clients

    settings = _settings(data_dir=data_dir)
    rows = _account_call(settings, list_clients)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        state = "disabled" if row["disabled"] else ""
        bound = f"patient {row['patient']}" if row["patient"] else ""
        print(f"{row['name']:<24} {row['role']:<12} {row['scope']}  {bound}  {state}")


@clients_app.command("disable")
def clients_disable(
    name: Annotated[str, typer.Argument(help="The client_id.")], data_dir: DataDir = None
) -> None:
    """Disable a service client: no new token."""
    from security.accounts import disable_client

    settings = _settings(data_dir=data_dir)
    _account_call(settings, lambda archive: disable_client(archive, name))


@auth_app.command("rotate-key")
def auth_rotate_key(data_dir: DataDir = None) -> None:
    """Sign new tokens with a new key; the one before stays published (tokens it signed stay
    valid until they expire), older ones are deleted. Restart the serve processes."""
    from security.keys import KeyStore

    settings = _settings(data_dir=data_dir)
    key = KeyStore(settings.auth_keys_dir or settings.data_dir / "auth" / "keys").rotate()
    print(key.kid)
