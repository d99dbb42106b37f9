"""The ``pacsbridge`` command line."""

from __future__ import annotations

import json
import logging
import sys
import threading
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

from config import Settings, configure_logging

app = typer.Typer(
    name="pacsbridge",
    help="DICOM-native PACS integration server.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Index database maintenance.", no_args_is_help=True)
app.add_typer(db_app, name="db")

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
    """Run the DICOM node and the HTTP API in one process until interrupted."""
    import uvicorn

    from dicom_node import DimseServer
    from pacsbridge.app import create_app

    settings = _settings(data_dir=data_dir, dimse_port=dimse_port, http_port=http_port)
    archive = _archive(settings)
    if settings.reconcile_on_start:
        threading.Thread(
            target=_reconcile_in_background, args=(archive,), name="reconcile", daemon=True
        ).start()
    dimse = DimseServer(archive, settings)
    try:
        host, port = dimse.start()
    except OSError as exc:
        console.print(
            f"[red]cannot listen for DICOM on {settings.dimse_host}:{settings.dimse_port}:"
            f"[/red] {exc.strerror or exc}"
        )
        raise typer.Exit(4) from exc
    log.info(
        "pacsbridge ready",
        extra={
            "ae_title": settings.ae_title,
            "dimse": f"{host}:{port}",
            "http": f"{settings.http_host}:{settings.http_port}",
            "index": archive.db.url.render_as_string(hide_password=True),
            "storage": archive.blobs.url,
        },
    )
    try:
        uvicorn.run(
            create_app(archive, settings),
            host=settings.http_host,
            port=settings.http_port,
            log_level=settings.log_level.lower(),
            access_log=False,
        )
    finally:
        dimse.stop()
        archive.close()


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
    from archive.importer import import_paths

    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
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

        report = import_paths(archive.ingestor, paths, jobs=jobs, progress=advance)
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
    settings = _settings(data_dir=data_dir)
    archive = _archive(settings)
    if study:
        count = archive.delete_study(study)
    elif series:
        count = archive.delete_series(series)
    elif instance:
        count = archive.delete_instance(instance)
    else:
        count = archive.delete_patient(patient, issuer)
    archive.close()
    print(json.dumps({"deleted_instances": count}))
    raise typer.Exit(0 if count else 1)


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
