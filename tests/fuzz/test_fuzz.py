"""Run each fuzz harness (atheris) for a bounded time on its committed seed corpus.

``PACSBRIDGE_FUZZ_SECONDS`` sets the time per harness (default 60, as in CI; a few seconds for a
quick local run). A crash fails the test and prints the input that caused it; keep that input
as a seed (``tests/fuzz/corpus/<harness>/``) and as a regression test. Longer runs by hand:
``docs/fuzzing.md``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import IN_CI

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SECONDS = int(os.environ.get("PACSBRIDGE_FUZZ_SECONDS", "60"))


def _require_atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        message = "atheris is not installed (./install.sh --dev installs it)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.mark.parametrize("harness", ["header", "multipart"])
def test_fuzz_harness_finds_no_crash(harness: str, tmp_path: Path):
    _require_atheris()
    seeds = HERE / "corpus" / harness
    assert any(seeds.iterdir()), f"no seeds in {seeds}"
    work = tmp_path / "corpus"
    work.mkdir()
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    command = [
        sys.executable,
        str(HERE / f"fuzz_{harness}.py"),
        str(work),  # new inputs go here; the committed seeds are only read
        str(seeds),
        f"-max_total_time={SECONDS}",
        "-timeout=30",  # an input that takes longer is a finding too
        "-rss_limit_mb=2048",
        f"-artifact_prefix={artifacts}/",
        "-print_final_stats=1",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        command,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=SECONDS + 300,
        check=False,
    )
    crashes = sorted(artifacts.iterdir())
    if proc.returncode != 0 or crashes:
        found = "\n".join(f"{path.name}: {path.read_bytes()!r}" for path in crashes)
        pytest.fail(
            f"fuzz_{harness} exited with {proc.returncode}\n"
            f"crashing inputs:\n{found or '(none written)'}\n"
            f"output:\n{proc.stderr[-6000:]}"
        )
    assert "Done" in proc.stderr, proc.stderr[-3000:]
