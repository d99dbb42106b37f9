"""AI benchmark: each builtin model on real data, from job start to SR stored, by stage.

Run from the project root::

    .venv/bin/python -m bench.ai     # brain-mr on the ch2 MRI, ct-body on a 300-slice 512² CT
    .venv/bin/python -m bench.ai --ct-slices 600 --repeat 1   # the memory bound, a large CT

Data (Debian packages, wrapped as DICOM series here, never stored in the repository): the ch2
T1 MRI of ``mricron-data`` (181 axial slices of 217x181, 1 mm) and the head CT of
``invesalius-examples`` (108 x 256², 0.96 x 0.96 x 1.5 mm) resampled to ``--ct-slices`` slices
of 512² (linear interpolation). Both series are stored in a fresh archive (SQLite, files)
first. Then each model runs ``--repeat`` times, each run in a fresh process, as a worker's
first job does: ``ai.runs.execute_run``, the function the ``ai-run`` job handler calls, from
loading the weights to the SR stored. The stages are those the run records (weights, load,
preprocess, infer, postprocess, encode, store); peak RSS is the run process's maximum
resident set. The device is CUDA when PyTorch sees a GPU, else the CPU. Targets: ``brain-mr``
end to end under 20 s on 2 cores; encode + store at most 20 % of each model's total.
Results go to ``bench/results/ai-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STAGES = ("weights", "load", "preprocess", "infer", "postprocess", "encode", "store")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(data_dir: Path, ct_slices: int) -> dict[str, str]:
    """Store the MRI and the CT; returns {model: study UID}."""
    import numpy as np
    from scipy import ndimage

    from archive import Archive
    from config import Settings
    from tests.ai_data import (
        CH2,
        SeriesSpec,
        cranium_ct,
        grid_affine,
        nifti_as_axial,
        part10,
        series_datasets,
    )

    archive = Archive(Settings(data_dir=data_dir))
    try:
        volume, affine = nifti_as_axial(CH2, "axial-head-first")
        mri = series_datasets(volume, affine, SeriesSpec())
        hu, spacing = cranium_ct()
        zoom = (ct_slices / hu.shape[0], 512 / hu.shape[1], 512 / hu.shape[2])
        big = ndimage.zoom(hu, zoom, order=1).astype(np.float32)
        big_spacing = tuple(s * hu.shape[i] / big.shape[i] for i, s in enumerate(spacing))
        ct_affine = grid_affine((1, 0, 0, 0, 1, 0), (-122.0, -122.0, -80.0), big_spacing)
        ct = series_datasets(
            big,
            ct_affine,
            SeriesSpec(modality="CT", series_description="Head CT 512", patient_id="AI-2"),
            rescale=(1.0, -1024.0),
        )
        del big
        for ds in mri + ct:
            archive.ingest(part10(ds))
        log(f"stored {len(mri)} MR and {len(ct)} CT slices in {data_dir}")
        return {"brain-mr": mri[0].StudyInstanceUID, "ct-body": ct[0].StudyInstanceUID}
    finally:
        archive.close()


def run_one(data_dir: Path, model: str, study: str) -> dict[str, Any]:
    """One run in this (fresh) process, as a worker's first job: weights to SR stored."""
    from ai.registry import ModelRegistry
    from ai.runs import execute_run, plan_study
    from archive import Archive
    from config import Settings

    settings = Settings(data_dir=data_dir)
    archive = Archive(settings, migrate=False)
    registry = ModelRegistry(settings.ai)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    [planned] = plan_study(archive, registry, study, model=model, trigger="manual")
    start = time.perf_counter()
    run = execute_run(archive, registry, planned.run_id).to_json()
    wall = time.perf_counter() - start
    archive.close()
    if run["status"] != "done":
        raise SystemExit(f"{model} failed: {run['error']}")
    return {
        "model": model,
        "wall_s": wall,
        "timings": run["timings"],
        "device": run["input"]["device"],
        "input_shape": run["input"]["shape"],
        "findings": run["findings"],
        "rss_before_mb": rss_before,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ct-slices", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=3, help="runs per model (median)")
    parser.add_argument("--models", default="brain-mr,ct-body")
    parser.add_argument(
        "--run", nargs=3, metavar=("DATA_DIR", "MODEL", "STUDY"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(run_one(Path(args.run[0]), args.run[1], args.run[2])))
        return 0
    import torch

    results: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "machine": {
            "cpus": __import__("os").cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "ct_slices": args.ct_slices,
        "runs": {},
    }
    with tempfile.TemporaryDirectory(prefix="pb-bench-ai-") as tmp:
        data_dir = Path(tmp) / "data"
        studies = prepare(data_dir, args.ct_slices)
        for model in args.models.split(","):
            runs = []
            for i in range(args.repeat):
                done = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "bench.ai",
                        "--run",
                        str(data_dir),
                        model,
                        studies[model],
                    ],
                    capture_output=True,
                    text=True,
                    check=False,
                )
                if done.returncode != 0:
                    log(done.stderr[-3000:])
                    return 1
                runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                log(f"{model} run {i + 1}: {runs[-1]['wall_s']:.2f} s")
            results["runs"][model] = runs
    print(
        f"\n{'model':<10} {'device':<6} {'total s':>8} "
        + " ".join(f"{s:>11}" for s in STAGES)
        + f" {'enc+store':>9} {'peak RSS':>9}"
    )
    summary = {}
    for model, runs in results["runs"].items():
        best = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]  # the median run
        t = best["timings"]
        share = (t.get("encode", 0) + t.get("store", 0)) / best["wall_s"]
        summary[model] = {
            "median_wall_s": best["wall_s"],
            "timings": t,
            "encode_store_share": share,
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
        }
        print(
            f"{model:<10} {best['device']:<6} {statistics.median(r['wall_s'] for r in runs):>8.2f} "
            + " ".join(f"{t.get(s, 0):>11.2f}" for s in STAGES)
            + f" {share:>9.0%} {summary[model]['peak_rss_mb']:>7.0f} MB"
        )
    results["summary"] = summary
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ai-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(results, indent=1))
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
