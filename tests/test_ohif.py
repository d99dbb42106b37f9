"""The OHIF Viewer against pacsbridge's DICOMweb, in a real browser.

OHIF's prebuilt ``dist/`` (npm ``@ohif/app``, fetched by ``scripts/setup-ohif.sh``) is served by
a small static server on its own port with an ``app-config.js`` whose data source points at
``pacsbridge serve``'s ``/dicom-web`` (QIDO-RS, WADO-RS, no static WADO), cross-origin with CORS
as a real deployment would be. A synthetic CT series goes in over STOW-RS; Debian's Chromium,
driven headless by puppeteer-core (``tests/ohif/drive.mjs``), opens the study list, finds the
study, opens it in the basic viewer and waits for the image. The screenshots
(``test-artifacts/ohif-*.png``) and every DICOMweb request OHIF made
(``test-artifacts/ohif-requests.json``) are kept.
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset

from config import Settings
from tests.conftest import IN_CI, Backend, RunningServer, free_port, start_server
from tests.dicom_factory import ct_slice
from tests.dicomweb_fixtures import multipart_body, new_uid, part10

REPO = Path(__file__).resolve().parent.parent
DRIVER = REPO / "tests" / "ohif" / "drive.mjs"
SETUP = REPO / "scripts" / "setup-ohif.sh"
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = os.environ.get("PACSBRIDGE_CHROMIUM", "/usr/bin/chromium")
PATIENT_ID = "PB-OHIF-0001"
DESCRIPTION = "CT PHANTOM FOR OHIF"
BRAIN_DESCRIPTION = "BRAIN MRI FOR OHIF"
SLICES = 20
SIZE = 256

pytestmark = pytest.mark.timeout(900)


def _unavailable(message: str) -> None:
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def ohif_dist() -> Path:
    """OHIF's dist/ and the driver's node_modules, installed by the setup script if missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        _unavailable("node and npm are needed for the OHIF test (apt-get install nodejs npm)")
    if not Path(CHROMIUM).exists():
        _unavailable(
            f"Chromium is needed for the OHIF test: no {CHROMIUM} (apt-get install chromium)"
        )
    done = subprocess.run(
        ["bash", str(SETUP)], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        _unavailable(f"scripts/setup-ohif.sh failed:\n{done.stderr[-3000:]}")
    dist = Path(done.stdout.strip().splitlines()[-1])
    assert (dist / "index.html").exists(), dist
    return dist


# --- OHIF's static files ----------------------------------------------------------------------


DOCUMENTED_ROOT = "http://127.0.0.1:8000/dicom-web"


def app_config(dicomweb: str) -> str:
    """The app-config.js that docs/ohif.md documents, pointed at ``dicomweb``."""
    text = (REPO / "docs" / "ohif.md").read_text()
    blocks = re.findall(r"```js\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) == 1, "docs/ohif.md must hold exactly one ```js block: the app-config.js"
    assert blocks[0].count(DOCUMENTED_ROOT) == 3
    return blocks[0].replace(DOCUMENTED_ROOT, dicomweb)


_MEDIA_TYPES = {
    ".js": "application/javascript",
    ".mjs": "application/javascript",
    ".wasm": "application/wasm",
    ".json": "application/json",
}


class _OhifHandler(SimpleHTTPRequestHandler):
    """dist/ as it is, but our app-config.js, and index.html for the app's own routes."""

    config_js = b""

    def guess_type(self, path: str | os.PathLike[str]) -> str:
        return _MEDIA_TYPES.get(Path(path).suffix) or super().guess_type(path)

    def send_head(self):
        path = urlsplit(self.path).path
        if path == "/app-config.js":
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(self.config_js)))
            self.end_headers()
            return io.BytesIO(self.config_js)
        if not Path(self.translate_path(path)).exists() and "." not in path.rsplit("/", 1)[-1]:
            self.path = "/index.html"  # single-page app: /viewer, /?… are the app's routes
        return super().send_head()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def ohif_site(ohif_dist: Path) -> Iterator[tuple[str, type[_OhifHandler]]]:
    port = free_port()
    handler = type("Handler", (_OhifHandler,), {})
    httpd = ThreadingHTTPServer(
        ("127.0.0.1", port), functools.partial(handler, directory=str(ohif_dist))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


# --- a CT series ------------------------------------------------------------------------------


def ct_phantom(study_uid: str, series_uid: str, count: int = SLICES) -> list[Dataset]:
    """A head-sized water cylinder with a bone ring and a sphere that grows through the slices."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    r = np.hypot(x - SIZE / 2, y - SIZE / 2)
    slices = []
    for index in range(count):
        hu = np.full((SIZE, SIZE), -1000.0)
        hu[r < 100] = 30
        hu[(r >= 100) & (r < 110)] = 1200
        radius = 10 + 40 * math.sin(math.pi * (index + 0.5) / count)
        hu[np.hypot(x - 150, y - 110) < radius] = 80
        hu[np.hypot(x - 95, y - 150) < 12] = -500
        ds = ct_slice(
            study_uid=study_uid,
            series_uid=series_uid,
            index=index,
            size=SIZE,
            patient_id=PATIENT_ID,
            patient_name="OHIF^PHANTOM",
        )
        ds.StudyDescription = DESCRIPTION
        ds.SeriesDescription = "AXIAL 5mm"
        ds.ImagePositionPatient = [-64.0, -64.0, 5.0 * index]
        ds.SliceThickness = 5.0
        ds.SliceLocation = 5.0 * index
        ds.WindowCenter, ds.WindowWidth = 40, 400
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        slices.append(ds)
    return slices


@pytest.fixture(scope="module")
def pacs(
    ohif_site: tuple[str, type[_OhifHandler]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    """`pacsbridge serve` (SQLite, files) allowing OHIF's origin (CORS)."""
    origin, _handler = ohif_site
    tmp = tmp_path_factory.mktemp("ohif")
    env = {
        "PACSBRIDGE_DATA_DIR": str(tmp / "data"),
        "PACSBRIDGE_WORKER_IN_SERVE": "false",
        "PACSBRIDGE_CORS_ORIGINS": json.dumps([origin]),
    }
    server = start_server(Backend("sqlite", "file", Settings(data_dir=tmp / "data"), env), tmp)
    try:
        yield server
    finally:
        assert server.stop() == 0, server.log()[-3000:]


def stow(dicomweb: str, parts: list[bytes]) -> None:
    body, content_type = multipart_body(parts)
    sent = httpx.post(
        f"{dicomweb}/studies",
        content=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
        timeout=120,
    )
    assert sent.status_code == 200, sent.text


def drive(config: dict, tmp_path: Path, record: str) -> tuple[dict, str]:
    """Run tests/ohif/drive.mjs; its result (also kept as ``record`` in the artifacts) and a
    summary of it for assertion messages."""
    ARTIFACTS.mkdir(exist_ok=True)
    config = {
        "chromium": CHROMIUM,
        "userDataDir": str(tmp_path / "chromium-profile"),
        "artifacts": str(ARTIFACTS),
        "timeoutMs": 120_000,
        **config,
    }
    done = subprocess.run(
        ["node", str(DRIVER), json.dumps(config)],
        cwd=DRIVER.parent,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    (ARTIFACTS / record).write_text(json.dumps(result, indent=2))
    context = json.dumps({k: v for k, v in result.items() if k != "requests"}, indent=1)[:4000]
    return result, context


def test_ohif_viewer_shows_the_study(
    pacs: RunningServer,
    ohif_site: tuple[str, type[_OhifHandler]],
    tmp_path: Path,
) -> None:
    origin, handler = ohif_site
    dicomweb = f"{pacs.http}/dicom-web"
    handler.config_js = app_config(dicomweb).encode()

    study_uid, series_uid = new_uid(), new_uid()
    stow(dicomweb, [part10(ds) for ds in ct_phantom(study_uid, series_uid)])
    ARTIFACTS.mkdir(exist_ok=True)
    for old in ARTIFACTS.glob("ohif-*"):
        old.unlink()
    result, context = drive(
        {"viewer": origin, "studyUid": study_uid, "marker": DESCRIPTION},
        tmp_path,
        "ohif-requests.json",
    )
    requests = result["requests"]
    assert result["error"] is None, context
    assert result["studyListed"], context

    # Every DICOMweb request OHIF made succeeded.
    failed = [r for r in requests if r["status"] is None or not 200 <= r["status"] < 400]
    assert not failed, json.dumps(failed, indent=1)
    paths = [urlsplit(r["url"]).path.removeprefix("/dicom-web") for r in requests]
    assert "/studies" in paths  # the study list (QIDO-RS)
    assert any(p.endswith("/metadata") for p in paths)  # the viewer (WADO-RS metadata)
    assert any("/frames/" in p for p in paths)  # the pixels (WADO-RS frames)
    assert any(p.endswith("/thumbnail") for p in paths)  # the series' thumbnail

    # The viewport shows the image: the canvas has lit pixels, and so has the screenshot.
    canvas = result["canvas"]
    assert canvas and canvas["total"] and canvas["lit"] / canvas["total"] > 0.05, canvas
    shot = np.asarray(Image.open(ARTIFACTS / "ohif-viewer.png").convert("L"))
    box = result["viewport"] or canvas
    top, left = int(box["y"]), int(box["x"])
    region = shot[top : top + int(box["height"]), left : left + int(box["width"])]
    lit = float((region > 60).mean())
    assert lit > 0.05, f"only {lit:.1%} of the viewport is lit"


def test_ohif_shows_the_brain_seg_over_the_mri(
    pacs: RunningServer,
    ohif_site: tuple[str, type[_OhifHandler]],
    tmp_path: Path,
) -> None:
    """The brain-mr SEG of the ch2 MRI (the AI pipeline's own output) over the MRI in OHIF:
    the viewport holds the overlay's colour, and every DICOMweb request succeeds."""
    from ai.registry import ModelRegistry
    from ai.runs import execute_run, plan_study
    from archive import Archive
    from tests.ai_data import CH2, SeriesSpec, nifti_as_axial, series_datasets, stored

    if not CH2.exists():
        _unavailable(f"{CH2} is missing (apt-get install mricron-data)")
    settings = Settings(data_dir=tmp_path / "ai")
    archive = Archive(settings)
    try:
        volume, affine = nifti_as_axial(CH2, "axial-head-first")
        source = series_datasets(volume, affine, SeriesSpec(patient_id="PB-OHIF-0002"))
        for ds in source:
            ds.StudyDescription = BRAIN_DESCRIPTION
            archive.ingest(part10(ds))
        study_uid = source[0].StudyInstanceUID
        registry = ModelRegistry(settings.ai)
        [planned] = plan_study(archive, registry, study_uid, model="brain-mr")
        run = execute_run(archive, registry, planned.run_id)
        assert run.status == "done", run.error
        [seg_uid] = [
            p["sop_instance_uid"] for p in run.result["produced"] if p["modality"] == "SEG"
        ]
        seg = stored(archive, seg_uid)
    finally:
        archive.close()

    origin, handler = ohif_site
    dicomweb = f"{pacs.http}/dicom-web"
    handler.config_js = app_config(dicomweb).encode()
    stow(dicomweb, [*(part10(ds) for ds in source), seg])
    result, context = drive(
        {
            "viewer": origin,
            "studyUid": study_uid,
            "marker": BRAIN_DESCRIPTION,
            "overlay": "AI brain-mr segmentation",
            "scroll": 70,  # from the vertex to the middle of the brain
        },
        tmp_path,
        "ohif-seg-requests.json",
    )
    assert result["error"] is None, context
    failed = [r for r in result["requests"] if r["status"] is None or not 200 <= r["status"] < 400]
    assert not failed, json.dumps(failed, indent=1)
    paths = [urlsplit(r["url"]).path for r in result["requests"]]
    assert any(seg_uid in p for p in paths), "OHIF never asked for the SEG"
    # The overlay's colour is in the viewport (the image alone is grey).
    overlay = result["overlay"]
    assert overlay and overlay["coloured"] / overlay["total"] > 0.02, context
    assert (ARTIFACTS / "ohif-seg.png").is_file()
