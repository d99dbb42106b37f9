"""Shared pieces of the DICOMweb tests: a `pacsbridge serve` per module and backend, Part-10
bytes, multipart bodies."""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from config import Settings
from tests.conftest import Backend, RunningServer, S3Server, start_server
from tests.dicom_factory import ct_slice

BACKENDS = [("sqlite", "file"), ("postgresql", "s3")]
BACKEND_IDS = ["sqlite-file", "pg-s3"]


def module_server(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    **extra_env: str,
) -> Iterator[RunningServer]:
    """A `pacsbridge serve` on the backend pair of ``request.param``, for a whole module."""
    index, storage = request.param
    tmp = tmp_path_factory.mktemp(f"dicomweb-{index}-{storage}")
    values: dict[str, Any] = {"data_dir": str(tmp / "data")}
    dropper = None
    if index == "postgresql":
        admin_url = request.getfixturevalue("postgres_admin")
        name = f"pacsbridge_dw_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        values["database_url"] = (
            make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        )

        def dropper() -> None:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()

    if storage == "s3":
        s3: S3Server = request.getfixturevalue("s3_server")
        values |= {
            "storage_url": f"s3://pb-{uuid.uuid4().hex[:12]}",
            "s3_endpoint": s3.endpoint,
            "s3_access_key": s3.access_key,
            "s3_secret_key": s3.secret_key,
            "s3_secure": False,
        }
    env = {f"PACSBRIDGE_{k.upper()}": str(v) for k, v in values.items()}
    env["PACSBRIDGE_WORKER_IN_SERVE"] = "false"
    backend = Backend(index, storage, Settings(**values), env)
    server = start_server(backend, tmp, **extra_env)
    try:
        yield server
    finally:
        server.stop()
        if dropper is not None:
            dropper()


def part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def new_uid() -> str:
    # 2.25.<uuid>: short enough for the factory's derived UIDs (study + ".1").
    return str(generate_uid(prefix=None))


def ct_study(
    count: int = 3,
    *,
    size: int = 16,
    series: int = 1,
    study_uid: str | None = None,
    **kwargs: Any,
) -> list[Dataset]:
    """``count`` CT slices in each of ``series`` series of one new study."""
    study_uid = study_uid or new_uid()
    datasets = []
    for s in range(series):
        series_uid = new_uid()
        for i in range(count):
            ds = ct_slice(study_uid=study_uid, series_uid=series_uid, index=i, size=size, **kwargs)
            ds.SeriesNumber = s + 1
            datasets.append(ds)
    return datasets


def multipart_body(
    parts: Sequence[bytes], boundary: str | None = None, part_type: str = "application/dicom"
) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: {part_type}\r\n\r\n".encode()
    body = b"".join(head + p + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="{part_type}"; boundary={boundary}'


def parse_multipart(body: bytes, content_type: str) -> list[tuple[dict[str, str], bytes]]:
    """Parts of a multipart/related response: (headers, content), for assertions."""
    boundary = ""
    for item in content_type.split(";"):
        name, _, value = item.strip().partition("=")
        if name.lower() == "boundary":
            boundary = value.strip('"')
    assert boundary, content_type
    delimiter = f"--{boundary}".encode()
    chunks = body.split(delimiter)
    assert chunks[-1].strip() in (b"--", b""), "no closing delimiter"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n"), chunk[:80]
        head, _, content = chunk[2:-2].partition(b"\r\n\r\n")
        headers = {}
        for line in head.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts.append((headers, content))
    return parts


def study_dir(tmp: Path, datasets: Sequence[Dataset]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for n, ds in enumerate(datasets):
        ds.save_as(tmp / f"{n:04d}.dcm", enforce_file_format=True)
    return tmp
