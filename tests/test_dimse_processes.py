"""Several DICOM acceptor processes on one port (PACSBRIDGE_DIMSE_PROCESSES)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from tests.conftest import child_pids, start_server
from tests.dicom_factory import write_series

pytestmark = pytest.mark.dcmtk


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
        children = child_pids(server.proc.pid)
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
    children = child_pids(server.proc.pid)
    assert children
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    deadline = time.monotonic() + 15
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children)


def test_sigusr1_writes_every_threads_stack_to_the_log(make_backend, tmp_path: Path):
    """``kill -USR1`` on serve and on its child processes (the acceptor, the event delivery)
    writes each one's threads' stacks into the log, and each goes on serving."""
    from pacsbridge.event_process import PROCESS_NAME

    server = start_server(make_backend(dimse_processes=2), tmp_path)
    try:
        # Both children running their own code: the acceptor ready, the event delivery named.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            health = httpx.get(f"{server.http}/health", timeout=10).json()["dimse_processes"]
            children = child_pids(server.proc.pid, spawned=True)
            names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in children}
            if health["ready"] == health["configured"] and PROCESS_NAME in names:
                break
            time.sleep(0.1)
        pids = [server.proc.pid, *children]
        assert len(pids) == 3, pids
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 20
        while server.log().count("most recent call first") < len(pids):
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.1)
        assert 'File "' in server.log()
        assert server.proc.poll() is None
        assert all(_alive(pid) for pid in pids)
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def test_serve_stopped_as_soon_as_it_is_ready_stops_at_once(make_backend, tmp_path: Path):
    """A SIGTERM while the child processes may still start: they end at once (a child that
    has not started yet has nothing to let finish), and serve exits 0 before the harness
    would kill it (20 s)."""
    for attempt in range(3):
        workdir = tmp_path / str(attempt)
        workdir.mkdir()
        server = start_server(make_backend(dimse_processes=2), workdir)
        assert server.stop() == 0, server.log()[-3000:]
