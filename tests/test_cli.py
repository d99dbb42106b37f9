"""The real ``pacsbridge`` console script: db upgrade, import, stats, delete, bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pydicom
import pytest
from alembic.script import ScriptDirectory
from pydicom.fileset import FileSet
from pydicom.uid import generate_uid
from sqlalchemy import inspect, select, text

from archive import Archive, ArchiveStats
from archive.blobstore import instance_key
from archive.db import alembic_config
from archive.models import Instance, Patient, Series, Study
from tests.conftest import Backend
from tests.dicom_factory import write_series

PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"
SUMMARY_KEYS = {"stored", "duplicate", "overwritten", "rejected", "skipped", "bytes"}


def _env(backend: Backend | None, data_dir: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PACSBRIDGE_")}
    if backend is not None:
        env |= backend.env
    if data_dir is not None:
        env["PACSBRIDGE_DATA_DIR"] = str(data_dir)
    # A wide console so that rich does not fold paths and reasons on stderr.
    env |= {"COLUMNS": "250", "NO_COLOR": "1", **extra}
    return env


def run(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PACSBRIDGE), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no stdout; stderr:\n{proc.stderr}"
    data = json.loads(lines[-1])
    assert set(data) == SUMMARY_KEYS
    return data


def stats_json(env: dict[str, str], cwd: Path) -> dict[str, int]:
    proc = run(env, cwd, "stats", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def no_traceback(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout


def expected_blobs(paths: list[Path]) -> dict[str, bytes]:
    """blob key -> file bytes, for the instances in ``paths``."""
    out = {}
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        key = instance_key(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        out[key] = path.read_bytes()
    return out


def assert_blobs_identical(backend: Backend, paths: list[Path]) -> None:
    expected = expected_blobs(paths)
    with closing(Archive(backend.settings, migrate=False)) as arc:
        assert sorted(arc.blobs.keys("studies/")) == sorted(expected)
        for key, data in expected.items():
            assert arc.blobs.read(key) == data, key
        with arc.db.session() as s:
            indexed = {
                row.blob_key: row.size_bytes
                for row in s.execute(select(Instance.blob_key, Instance.size_bytes))
            }
    assert indexed == {key: len(data) for key, data in expected.items()}


def make_tree(root: Path) -> list[Path]:
    """Two patients: a study with 3 slices and a study with 2, plus two files that are not DICOM."""
    a = write_series(root / "pat1" / "ct", 3, patient_id="PAT-1")
    b = write_series(root / "pat2" / "ct", 2, patient_id="PAT-2", patient_name="ROE^RICHARD")
    (root / "README.txt").write_text("Exported from the scanner. Not DICOM.\n" * 10)
    (root / "pat2" / "Thumbs.db").write_bytes(b"\x00" * 40)  # shorter than a Part-10 preamble
    return a + b


# --- db upgrade -------------------------------------------------------------------------------


def test_db_upgrade_twice(backend: Backend, tmp_path: Path):
    env = _env(backend)
    for _ in range(2):
        proc = run(env, tmp_path, "db", "upgrade")
        assert proc.returncode == 0, proc.stderr
        assert "index schema is up to date" in proc.stderr
        no_traceback(proc)

    with closing(Archive(backend.settings, migrate=False)) as arc:
        head = ScriptDirectory.from_config(alembic_config(arc.db.engine)).get_current_head()
        with arc.db.engine.connect() as conn:
            versions = conn.execute(text("SELECT version_num FROM alembic_version")).scalars()
            assert list(versions) == [head]
        tables = set(inspect(arc.db.engine).get_table_names())
        for model in (Patient, Study, Series, Instance):
            assert model.__tablename__ in tables
        assert arc.stats().instances == 0
    if backend.index == "sqlite":
        assert (backend.settings.data_dir / "index.sqlite").is_file()


# --- import -----------------------------------------------------------------------------------


def test_import_tree_then_again_all_duplicates(backend: Backend, tmp_path: Path):
    src = tmp_path / "src"
    files = make_tree(src)
    total = sum(p.stat().st_size for p in files)
    env = _env(backend)

    first = run(env, tmp_path, "import", str(src))

    assert first.returncode == 0, first.stderr
    no_traceback(first)
    assert summary(first) == {
        "stored": 5,
        "duplicate": 0,
        "overwritten": 0,
        "rejected": 0,
        "skipped": 2,
        "bytes": total,
    }
    assert "stored 5, duplicate 0, overwritten 0, rejected 0" in first.stderr
    assert_blobs_identical(backend, files)

    again = run(env, tmp_path, "import", str(src))

    assert again.returncode == 0, again.stderr
    assert summary(again) == {
        "stored": 0,
        "duplicate": 5,
        "overwritten": 0,
        "rejected": 0,
        "skipped": 2,
        "bytes": 0,
    }
    assert_blobs_identical(backend, files)  # the duplicates changed nothing
    with closing(Archive(backend.settings, migrate=False)) as arc:
        assert arc.stats() == ArchiveStats(
            patients=2, studies=2, series=2, instances=5, bytes=total
        )


def test_import_overwrite_policy_counts_overwritten(make_backend, tmp_path: Path):
    backend = make_backend("sqlite", "file", duplicate_policy="overwrite")
    files = write_series(tmp_path / "src", 2)
    env = _env(backend)
    assert summary(run(env, tmp_path, "import", str(tmp_path / "src")))["stored"] == 2

    again = run(env, tmp_path, "import", str(tmp_path / "src"))

    assert again.returncode == 0, again.stderr
    total = sum(p.stat().st_size for p in files)
    assert summary(again) == {
        "stored": 0,
        "duplicate": 0,
        "overwritten": 2,
        "rejected": 0,
        "skipped": 0,
        "bytes": total,
    }
    assert_blobs_identical(backend, files)


def test_import_truncated_file_named_explicitly_is_rejected(make_backend, tmp_path: Path):
    backend = make_backend()
    (good,) = write_series(tmp_path / "src", 1)
    truncated = tmp_path / "src" / "truncated.dcm"
    data = good.read_bytes()
    truncated.write_bytes(data[: len(data) - 4000])  # cut inside the Pixel Data
    good.unlink()  # only the truncated copy of this instance exists
    env = _env(backend)

    proc = run(env, tmp_path, "import", str(truncated))

    assert proc.returncode == 1, proc.stderr
    no_traceback(proc)
    assert summary(proc) == {
        "stored": 0,
        "duplicate": 0,
        "overwritten": 0,
        "rejected": 1,
        "skipped": 0,
        "bytes": 0,
    }
    assert "the stream ends inside the Pixel Data" in proc.stderr
    assert f"{truncated}: " in proc.stderr  # which file, then why
    with closing(Archive(backend.settings, migrate=False)) as arc:
        assert arc.stats().instances == 0
        assert list(arc.blobs.keys()) == []


def test_import_non_dicom_file_named_explicitly_is_rejected(make_backend, tmp_path: Path):
    backend = make_backend()
    (good,) = write_series(tmp_path / "src", 1)
    readme = tmp_path / "src" / "README.txt"
    readme.write_text("not DICOM at all " * 20)

    proc = run(_env(backend), tmp_path, "import", str(good), str(readme))

    assert proc.returncode == 1, proc.stderr
    assert summary(proc) == {
        "stored": 1,
        "duplicate": 0,
        "overwritten": 0,
        "rejected": 1,
        "skipped": 0,
        "bytes": good.stat().st_size,
    }
    assert "not a DICOM Part-10 file" in proc.stderr
    assert str(readme) in proc.stderr
    assert_blobs_identical(backend, [good])


def test_import_missing_path_exits_2(make_backend, tmp_path: Path):
    backend = make_backend()
    missing = tmp_path / "no-such-dir"

    proc = run(_env(backend), tmp_path, "import", str(missing))

    assert proc.returncode == 2
    no_traceback(proc)
    assert "no such file or directory" in proc.stderr
    assert str(missing) in proc.stderr
    assert proc.stdout.strip() == ""


def make_media(tmp_path: Path) -> tuple[Path, list[Path]]:
    """A PS3.10 file-set: two studies of one patient, five instances; (DICOMDIR, files)."""
    staging = tmp_path / "staging"
    fs = FileSet()
    for path in write_series(staging / "a", 3, patient_id="PAT-1") + write_series(
        staging / "b", 2, patient_id="PAT-1"
    ):
        fs.add(path)
    media = tmp_path / "media"
    fs.write(media)
    dicomdir = media / "DICOMDIR"
    referenced = sorted(p for p in media.rglob("*") if p.is_file() and p.name != "DICOMDIR")
    assert dicomdir.is_file() and len(referenced) == 5
    return dicomdir, referenced


def test_import_dicomdir(backend: Backend, tmp_path: Path):
    dicomdir, referenced = make_media(tmp_path)
    total = sum(p.stat().st_size for p in referenced)
    env = _env(backend)

    proc = run(env, tmp_path, "import", str(dicomdir))

    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert summary(proc) == {
        "stored": 5,
        "duplicate": 0,
        "overwritten": 0,
        "rejected": 0,
        "skipped": 1,  # the DICOMDIR itself
        "bytes": total,
    }
    assert_blobs_identical(backend, referenced)
    assert stats_json(env, tmp_path) == {
        "patients": 1,
        "studies": 2,
        "series": 2,
        "instances": 5,
        "bytes": total,
    }


def test_import_directory_holding_a_dicomdir_imports_each_file_once(make_backend, tmp_path: Path):
    backend = make_backend()
    dicomdir, referenced = make_media(tmp_path)

    proc = run(_env(backend), tmp_path, "import", str(dicomdir.parent))

    assert proc.returncode == 0, proc.stderr
    assert summary(proc) == {
        "stored": 5,
        "duplicate": 0,
        "overwritten": 0,
        "rejected": 0,
        "skipped": 1,
        "bytes": sum(p.stat().st_size for p in referenced),
    }
    assert_blobs_identical(backend, referenced)


# --- delete -----------------------------------------------------------------------------------


def _seed(backend: Backend, root: Path, studies: int = 2) -> list[list[Path]]:
    """Studies of 3 and 2 instances for patients PAT-A and PAT-B, ingested in process (the CLI
    under test is ``delete``)."""
    series = [write_series(root / "a", 3, patient_id="PAT-A")]
    if studies > 1:
        series.append(write_series(root / "b", 2, patient_id="PAT-B"))
    with closing(Archive(backend.settings)) as arc:
        for path in (p for files in series for p in files):
            arc.ingest(path.read_bytes())
    return series


def _uid(path: Path, keyword: str) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True)[keyword].value)


def test_delete_study_empties_the_archive(backend: Backend, tmp_path: Path):
    (only,) = _seed(backend, tmp_path / "src", studies=1)
    env = _env(backend)

    proc = run(env, tmp_path, "delete", "--study", _uid(only[0], "StudyInstanceUID"))

    assert proc.returncode == 0, proc.stderr
    no_traceback(proc)
    assert json.loads(proc.stdout) == {"deleted_instances": 3}
    assert stats_json(env, tmp_path) == {
        "patients": 0,
        "studies": 0,
        "series": 0,
        "instances": 0,
        "bytes": 0,
    }
    with closing(Archive(backend.settings, migrate=False)) as arc:
        assert list(arc.blobs.keys()) == []


def test_delete_study_leaves_the_other_study(backend: Backend, tmp_path: Path):
    a, b = _seed(backend, tmp_path / "src")

    proc = run(_env(backend), tmp_path, "delete", "--study", _uid(a[0], "StudyInstanceUID"))

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"deleted_instances": 3}
    assert_blobs_identical(backend, b)  # blobs and index rows of study b only
    with closing(Archive(backend.settings, migrate=False)) as arc:
        assert arc.stats() == ArchiveStats(
            patients=1, studies=1, series=1, instances=2, bytes=sum(p.stat().st_size for p in b)
        )


def test_delete_unknown_study_exits_1(make_backend, tmp_path: Path):
    backend = make_backend()
    a, b = _seed(backend, tmp_path / "src")

    proc = run(_env(backend), tmp_path, "delete", "--study", generate_uid())

    assert proc.returncode == 1
    no_traceback(proc)
    assert json.loads(proc.stdout) == {"deleted_instances": 0}
    assert_blobs_identical(backend, a + b)  # nothing else went


@pytest.mark.parametrize(
    ("option", "pick", "deleted", "left"),
    [
        ("--instance", lambda a, b: _uid(a[0], "SOPInstanceUID"), 1, 4),
        ("--series", lambda a, b: _uid(b[0], "SeriesInstanceUID"), 2, 3),
        ("--patient", lambda a, b: "PAT-A", 3, 2),
    ],
    ids=["instance", "series", "patient"],
)
def test_delete_other_levels(make_backend, tmp_path: Path, option, pick, deleted, left):
    backend = make_backend()
    a, b = _seed(backend, tmp_path / "src")

    proc = run(_env(backend), tmp_path, "delete", option, pick(a, b))

    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"deleted_instances": deleted}
    with closing(Archive(backend.settings, migrate=False)) as arc:
        assert arc.stats().instances == left
        assert len(list(arc.blobs.keys())) == left
        if option == "--patient":
            assert arc.stats().patients == 1


@pytest.mark.parametrize(
    "args",
    [[], ["--study", "1.2.3", "--series", "1.2.3.4"], ["--patient", ""]],
    ids=["none", "two", "empty"],
)
def test_delete_needs_exactly_one_selector(tmp_path: Path, args: list[str]):
    data_dir = tmp_path / "data"

    proc = run(_env(None, data_dir), tmp_path, "delete", *args)

    assert proc.returncode == 2
    no_traceback(proc)
    assert "give exactly one of --study, --series, --instance, --patient" in proc.stderr
    assert proc.stdout == ""
    assert not data_dir.exists()  # refused before touching the archive


# --- bad settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env_extra", "code", "message"),
    [
        ({"PACSBRIDGE_DUPLICATE_POLICY": "maybe"}, 2, "duplicate_policy"),
        ({"PACSBRIDGE_AE_TITLE": "SEVENTEEN_CHARS_X"}, 2, "AE title"),
        ({"PACSBRIDGE_DIMSE_PORT": "eleven"}, 2, "dimse_port"),
        ({"PACSBRIDGE_CONFIG": "/nonexistent/pacsbridge.toml"}, 2, "which is not a file"),
        ({"PACSBRIDGE_STORAGE_URL": "ftp://example/blobs"}, 3, "use file:///path or s3://bucket"),
        (
            {"PACSBRIDGE_DATABASE_URL": "postgresql+psycopg2://postgres@127.0.0.1:1/none"},
            3,
            "cannot open the archive",
        ),
    ],
    ids=["duplicate-policy", "ae-title", "port", "config-file", "storage-url", "database"],
)
@pytest.mark.parametrize("command", [["stats", "--json"], ["import", "."]])
def test_bad_setting_is_reported_without_traceback(
    tmp_path: Path, env_extra: dict[str, str], code: int, message: str, command: list[str]
):
    data_dir = tmp_path / "data"

    proc = run(_env(None, data_dir, **env_extra), tmp_path, *command)

    assert proc.returncode == code, proc.stderr
    no_traceback(proc)
    assert message in proc.stderr
    assert proc.stdout == ""
    if code == 2:
        assert "configuration error" in proc.stderr
        assert not data_dir.exists()


def test_bad_duplicate_policy_names_the_allowed_values(tmp_path: Path):
    proc = run(
        _env(None, tmp_path / "data", PACSBRIDGE_DUPLICATE_POLICY="maybe"), tmp_path, "stats"
    )
    assert proc.returncode == 2
    assert "'keep' or 'overwrite'" in proc.stderr
    no_traceback(proc)
