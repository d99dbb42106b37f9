"""A STOW-RS upload much larger than what the server may hold in memory: a body of several
hundred MB, generated while it is sent, is stored with bounded memory. The server's peak
resident set (VmHWM of the `pacsbridge serve` process) must stay far below the body size."""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.uid import UID

from tests.conftest import RunningServer
from tests.dicom_factory import ct_slice
from tests.dicomweb_fixtures import module_server, new_uid

SLICES = 840  # 512 x 512 x 16 bit: ~420 MiB of body
SIZE = 512


def vm_hwm(pid: int) -> int:
    """Peak resident set size of a process in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


@pytest.fixture(scope="module", params=[("sqlite", "file")], ids=["sqlite-file"])
def dw_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    if not Path("/proc/self/status").exists():
        pytest.skip("needs Linux /proc to read the server's peak memory")
    yield from module_server(request, tmp_path_factory, PACSBRIDGE_STORAGE_FSYNC="false")


def test_large_stow_body_with_bounded_memory(dw_server: RunningServer) -> None:
    study, series = new_uid(), new_uid()
    template = ct_slice(study_uid=study, series_uid=series, index=0, size=SIZE)
    boundary = uuid.uuid4().hex
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for index in range(SLICES):
            sop = UID(new_uid())
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = sop
            template.InstanceNumber = index + 1
            buffer = io.BytesIO()
            template.save_as(buffer, enforce_file_format=True)
            chunk = (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
                + buffer.getvalue()
                + b"\r\n"
            )
            sent += len(chunk)
            yield chunk
        closing = f"--{boundary}--\r\n".encode()
        sent += len(closing)
        yield closing

    # Warm the server up (imports, pools) so the baseline includes what any request needs.
    httpx.get(f"{dw_server.http}/dicom-web/studies?limit=1", timeout=30)
    baseline = vm_hwm(dw_server.proc.pid)
    started = time.monotonic()
    response = httpx.post(
        f"{dw_server.http}/dicom-web/studies",
        content=body(),
        headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}'
        },
        timeout=900,
    )
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text[:2000]
    assert len(response.json()["00081199"]["Value"]) == SLICES
    peak = vm_hwm(dw_server.proc.pid)
    print(
        f"\nSTOW-RS {sent / 2**20:.0f} MiB in {elapsed:.1f} s; server VmHWM {baseline / 2**20:.0f}"
        f" MiB before, {peak / 2**20:.0f} MiB after"
    )
    assert sent > 400 * 2**20
    assert peak - baseline < 100 * 2**20, f"peak grew by {(peak - baseline) / 2**20:.0f} MiB"
    assert peak < sent / 2

    found = httpx.get(
        f"{dw_server.http}/dicom-web/studies",
        params={"StudyInstanceUID": study, "includefield": "NumberOfStudyRelatedInstances"},
    ).json()
    assert found[0]["00201208"]["Value"] == [SLICES]


@pytest.mark.parametrize("size", [64, 512], ids=["read", "mapped"])
def test_a_blob_that_disagrees_with_the_index_ends_the_body_early(
    dw_server: RunningServer, size: int
) -> None:
    """A stored file changed behind the archive's back (cut short on disk) is not sent as if it
    were whole: the multipart body ends early, so the client sees a broken response, and the
    server goes on serving the rest. 512² slices are ones WADO-RS would memory-map."""
    from tests.dicomweb_fixtures import multipart_body, part10

    study, series = new_uid(), new_uid()
    slices = [
        part10(ct_slice(study_uid=study, series_uid=series, index=i, size=size)) for i in range(3)
    ]
    body, content_type = multipart_body(slices)
    root = f"{dw_server.http}/dicom-web"
    assert httpx.post(f"{root}/studies", content=body, headers={"Content-Type": content_type})
    archive = dw_server.archive()
    try:
        from archive.wado import find_stored

        victim, *_ = find_stored(archive.db, study)
        path = archive.blobs.local_path(victim.blob_key)
        assert path is not None
        path.write_bytes(path.read_bytes()[:-10])
    finally:
        archive.close()
    accept = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{root}/studies/{study}", headers=accept, timeout=30).raise_for_status()
    assert httpx.get(f"{dw_server.http}/health", timeout=10).json()["status"] == "ok"
    other = httpx.get(f"{root}/studies/{study}/series/{series}/instances", timeout=10).json()
    assert len(other) == 3
