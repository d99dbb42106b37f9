"""Several DICOM acceptor processes on one port (PACSBRIDGE_DIMSE_PROCESSES)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.conftest import start_server
from tests.dicom_factory import write_series

pytestmark = pytest.mark.dcmtk


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    return [int(x) for x in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def test_associations_spread_over_processes_and_all_are_stored(make_backend, tmp_path: Path):
    backend = make_backend(dimse_processes=3)
    server = start_server(backend, tmp_path)
    try:
        children = _children(server.proc.pid)
        assert len(children) >= 2, children  # the spawned acceptors (plus, maybe, a tracker)
        # /health reports the acceptors; all of them become ready.
        deadline = time.monotonic() + 60
        acceptors: dict = {}
        while time.monotonic() < deadline:
            acceptors = httpx.get(f"{server.http}/health", timeout=10).json()["dimse_processes"]
            if acceptors["ready"] == acceptors["configured"]:
                break
            time.sleep(0.2)
        assert acceptors == {"configured": 3, "ready": 3}
        files = write_series(tmp_path / "s", 24, size=32)

        def send(path: Path) -> int:
            ae = AE(ae_title=f"MOD{path.stem[-2:]}")
            ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
            assoc = ae.associate("127.0.0.1", server.dimse_port, ae_title=server.ae_title)
            assert assoc.is_established
            try:
                return int(assoc.send_c_store(path).Status)
            finally:
                assoc.release()

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(send, files)) == [0] * 24
        archive = server.archive()
        try:
            st = archive.stats()
            assert (st.studies, st.series, st.instances) == (1, 1, 24)
        finally:
            archive.close()
    finally:
        assert server.stop() == 0
    # A clean stop takes the acceptor processes with it.
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children)


def test_acceptors_exit_when_the_parent_is_killed(make_backend, tmp_path: Path):
    server = start_server(make_backend(dimse_processes=2), tmp_path)
    children = _children(server.proc.pid)
    assert children
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    deadline = time.monotonic() + 15
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children)
