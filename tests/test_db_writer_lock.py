"""Writers on a SQLite index, across processes: one at a time, the next one woken as soon as
the lock is free (archive.db._WriterLock)."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from archive.db import Database


def _hold(url: str, ready: multiprocessing.synchronize.Event, seconds: float, out: Path) -> None:
    db = Database(url)
    with db.write_connection():
        ready.set()
        time.sleep(seconds)
        out.write_text(repr(time.time()))
    db.dispose()


def test_writers_in_two_processes_take_turns(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'index.sqlite'}"
    db = Database(url)
    db.upgrade()
    context = multiprocessing.get_context("spawn")
    ready = context.Event()
    released = tmp_path / "released"
    holder = context.Process(target=_hold, args=(url, ready, 0.5, released))
    holder.start()
    try:
        assert ready.wait(60)
        with db.write_connection():
            acquired = time.time()
        holder.join(60)
        assert holder.exitcode == 0
        # This writer got in after the other process let go, and promptly: SQLite's busy
        # handler alone would also wait, but in sleeps of up to 100 ms.
        assert acquired >= float(released.read_text())
        assert (tmp_path / "index.sqlite.write-lock").exists()
    finally:
        if holder.is_alive():
            holder.kill()
        db.dispose()
