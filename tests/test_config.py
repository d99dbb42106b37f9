"""Settings: defaults, environment, .env, the TOML file, validation and redaction."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from config import PeerSettings, Settings

TOML = """\
ae_title = "TOMLPACS"
duplicate_policy = "overwrite"
dimse_port = 4104

[peers.orthanc]
ae_title = "ORTHANC"
host = "orthanc.example"
port = 4242

[peers.modality]
ae_title = "CT01"
host = "10.0.0.7"
port = 104
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PACSBRIDGE_* variables from the outer environment, and no stray .env file."""
    for name in list(os.environ):
        if name.upper().startswith("PACSBRIDGE_"):
            monkeypatch.delenv(name)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


@pytest.fixture
def toml_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "pacsbridge.toml"
    path.write_text(TOML, encoding="utf-8")
    monkeypatch.setenv("PACSBRIDGE_CONFIG", str(path))
    return path


def test_defaults(clean_env: Path):
    s = Settings()

    assert s.data_dir == Path("./pacsbridge-data")
    data_dir = (clean_env / "pacsbridge-data").resolve()
    assert s.database_url is None
    assert s.resolved_database_url == f"sqlite:///{data_dir / 'index.sqlite'}"
    assert s.storage_url is None
    assert s.resolved_storage_url == f"file://{data_dir / 'blobs'}"
    assert s.ae_title == "PACSBRIDGE"
    assert s.dimse_port == 11112
    assert (s.http_host, s.http_port) == ("127.0.0.1", 8000)
    assert s.duplicate_policy == "keep"
    assert s.peers == {}
    assert s.config is None
    assert s.refused_sop_classes == []
    assert s.storage_fsync is True
    assert s.min_free_disk_mb == 500
    # Nothing is created just by reading settings.
    assert not data_dir.exists()


def test_environment_overrides_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    data = tmp_path / "elsewhere"
    monkeypatch.setenv("PACSBRIDGE_DATA_DIR", str(data))
    monkeypatch.setenv("PACSBRIDGE_AE_TITLE", "MYPACS")
    monkeypatch.setenv("PACSBRIDGE_DIMSE_PORT", "4242")
    monkeypatch.setenv("PACSBRIDGE_HTTP_HOST", "0.0.0.0")
    monkeypatch.setenv("PACSBRIDGE_DUPLICATE_POLICY", "overwrite")
    monkeypatch.setenv("PACSBRIDGE_STORAGE_FSYNC", "false")
    monkeypatch.setenv(
        "PACSBRIDGE_REFUSED_SOP_CLASSES", '["1.2.840.10008.5.1.4.1.1.2", "MRImageStorage"]'
    )
    monkeypatch.setenv("pacsbridge_http_port", "9090")  # names are case-insensitive

    s = Settings()

    assert s.data_dir == data
    assert s.resolved_database_url == f"sqlite:///{data.resolve() / 'index.sqlite'}"
    assert s.resolved_storage_url == (data / "blobs").resolve().as_uri()
    assert s.ae_title == "MYPACS"
    assert s.dimse_port == 4242
    assert s.http_host == "0.0.0.0"
    assert s.http_port == 9090
    assert s.duplicate_policy == "overwrite"
    assert s.storage_fsync is False
    assert s.refused_sop_classes == ["1.2.840.10008.5.1.4.1.1.2", "MRImageStorage"]


def test_explicit_urls_are_used_as_given(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PACSBRIDGE_DATABASE_URL", "postgresql+psycopg2://pb@db:5432/pacs")
    monkeypatch.setenv("PACSBRIDGE_STORAGE_URL", "s3://bucket/prefix")
    s = Settings()
    assert s.resolved_database_url == "postgresql+psycopg2://pb@db:5432/pacs"
    assert s.resolved_storage_url == "s3://bucket/prefix"


def test_keyword_arguments_beat_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PACSBRIDGE_AE_TITLE", "FROMENV")
    monkeypatch.setenv("PACSBRIDGE_DIMSE_PORT", "4242")
    s = Settings(ae_title="FROMKW")
    assert s.ae_title == "FROMKW"
    assert s.dimse_port == 4242


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("PACSBRIDGE_DIMSE_PORT", "70000", "dimse_port"),
        ("PACSBRIDGE_DIMSE_PORT", "eleven", "dimse_port"),
        ("PACSBRIDGE_DUPLICATE_POLICY", "maybe", "duplicate_policy"),
        ("PACSBRIDGE_LOG_FORMAT", "xml", "log_format"),
        ("PACSBRIDGE_MAX_ASSOCIATIONS", "0", "max_associations"),
    ],
)
def test_invalid_environment_values_raise(monkeypatch, name: str, value: str, field: str):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as info:
        Settings()
    assert [e["loc"] for e in info.value.errors()] == [(field,)]


def test_toml_file_is_read(toml_file: Path):
    s = Settings()

    assert s.config == toml_file
    assert s.ae_title == "TOMLPACS"
    assert s.duplicate_policy == "overwrite"
    assert s.dimse_port == 4104
    assert s.peers == {
        "orthanc": PeerSettings(ae_title="ORTHANC", host="orthanc.example", port=4242),
        "modality": PeerSettings(ae_title="CT01", host="10.0.0.7", port=104),
    }
    assert s.http_port == 8000  # not in the file: default


def test_environment_beats_toml(toml_file: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PACSBRIDGE_AE_TITLE", "ENVPACS")
    monkeypatch.setenv("PACSBRIDGE_DIMSE_PORT", "5104")

    s = Settings()

    assert s.ae_title == "ENVPACS"
    assert s.dimse_port == 5104
    assert s.duplicate_policy == "overwrite"  # only in the TOML file
    assert set(s.peers) == {"orthanc", "modality"}


def test_dotenv_sits_between_environment_and_toml(
    toml_file: Path, clean_env: Path, monkeypatch: pytest.MonkeyPatch
):
    (clean_env / ".env").write_text(
        "PACSBRIDGE_AE_TITLE=DOTENV\nPACSBRIDGE_HTTP_PORT=8123\nPACSBRIDGE_DIMSE_PORT=6104\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("PACSBRIDGE_DIMSE_PORT", "7104")

    s = Settings()

    assert s.ae_title == "DOTENV"  # .env beats TOML
    assert s.http_port == 8123  # .env beats the default
    assert s.dimse_port == 7104  # environment beats .env
    assert s.duplicate_policy == "overwrite"  # TOML still applies


def test_config_named_in_dotenv_is_read(toml_file: Path, clean_env: Path, monkeypatch):
    monkeypatch.delenv("PACSBRIDGE_CONFIG")
    (clean_env / ".env").write_text(f"PACSBRIDGE_CONFIG={toml_file}\n", encoding="utf-8")

    s = Settings()

    assert s.config == toml_file
    assert s.ae_title == "TOMLPACS"


def test_missing_toml_file_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    missing = tmp_path / "nope.toml"
    monkeypatch.setenv("PACSBRIDGE_CONFIG", str(missing))
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        Settings()


def test_invalid_toml_peer_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "bad.toml"
    path.write_text('[peers.orthanc]\nae_title = "ORTHANC"\nhost = "h"\nport = 0\n')
    monkeypatch.setenv("PACSBRIDGE_CONFIG", str(path))
    with pytest.raises(ValidationError) as info:
        Settings()
    assert info.value.errors()[0]["loc"] == ("peers", "orthanc", "port")


@pytest.mark.parametrize(
    "title",
    ["A" * 17, "BAD\\AE", "", "   ", "TAB\tAE", "ÄRZTE"],
    ids=["17-chars", "backslash", "empty", "spaces", "control", "non-ascii"],
)
def test_invalid_ae_title_raises(title: str, monkeypatch: pytest.MonkeyPatch):
    with pytest.raises(ValidationError, match="AE title"):
        Settings(ae_title=title)
    monkeypatch.setenv("PACSBRIDGE_AE_TITLE", title)
    with pytest.raises(ValidationError, match="AE title"):
        Settings()


def test_invalid_ae_title_in_toml_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "ae.toml"
    path.write_text('ae_title = "SEVENTEEN_CHARS_X"\n')
    monkeypatch.setenv("PACSBRIDGE_CONFIG", str(path))
    with pytest.raises(ValidationError, match="AE title"):
        Settings()


def test_valid_ae_titles_are_kept():
    assert Settings(ae_title="A" * 16).ae_title == "A" * 16
    assert Settings(ae_title="  PADDED  ").ae_title == "PADDED"
    assert Settings(ae_title="WITH SPACE").ae_title == "WITH SPACE"


def test_redacted_masks_secrets():
    s = Settings(
        s3_access_key="AKIAEXAMPLE",
        s3_secret_key="wJalrXUtnFEMI-very-secret",
        database_url="postgresql+psycopg2://pacs:Pa55-w0rd@db.example:5432/pacsbridge",
        storage_url="s3://bucket",
    )

    red = s.redacted()

    assert red["s3_secret_key"] == "***"
    assert red["s3_access_key"] == "***"
    assert red["database_url"] == "postgresql+psycopg2://pacs:***@db.example:5432/pacsbridge"
    dumped = json.dumps(red)
    assert "wJalrXUtnFEMI-very-secret" not in dumped
    assert "Pa55-w0rd" not in dumped
    # Everything else is reported as is; the settings object itself is unchanged.
    assert red["storage_url"] == "s3://bucket"
    assert red["ae_title"] == "PACSBRIDGE"
    assert s.s3_secret_key == "wJalrXUtnFEMI-very-secret"


def test_redacted_password_containing_at_and_colon():
    s = Settings(database_url="postgresql://pacs:p@ss:word@db.example/pacsbridge")
    red = s.redacted()
    assert red["database_url"] == "postgresql://pacs:***@db.example/pacsbridge"
    assert "ss:word" not in json.dumps(red)


def test_redacted_leaves_urls_without_password_alone():
    assert Settings().redacted()["database_url"] is None
    assert Settings().redacted()["s3_secret_key"] is None
    url = "postgresql+psycopg2://pacs@db.example/pacsbridge"
    assert Settings(database_url=url).redacted()["database_url"] == url


def test_redacted_masks_password_in_query_string():
    s = Settings(database_url="postgresql+psycopg2://pacs@db.example/pacsbridge?password=Pa55-w0rd")
    assert "Pa55-w0rd" not in json.dumps(s.redacted())
