"""FHIR search benchmark: ImagingStudy searches next to the QIDO-RS searches that return the
same studies, on one pacsbridge, as the archive grows from 1,000 to 10,000 studies.

Run from the project root::

    .venv/bin/python -m bench.fhir            # 1,000 then 10,000 studies, 50 runs per query
    .venv/bin/python -m bench.fhir --quick    # smoke run: 300 then 1,000 studies, 10 runs

One ``pacsbridge serve`` (free loopback ports, its own temporary directory, the job worker off)
stores bench.query's one-instance studies by STOW-RS, plus three 200-instance studies. With
``--small`` studies stored it times each pair of requests over one keep-alive HTTP client, FHIR
and QIDO-RS taking turns; then it stores the rest, up to ``--studies``, and times the same
pairs again:

- by patient: ``ImagingStudy?patient=Patient/<id>`` vs ``studies?PatientID=``;
- by identifier: ``ImagingStudy?identifier=urn:dicom:uid|urn:oid:<uid>`` vs
  ``studies?StudyInstanceUID=``;
- by date range: ``ImagingStudy?started=ge…&started=le…&_count=100`` vs
  ``studies?StudyDate=…-…&limit=100``;
- paging: a walk of ``_count=100`` pages following the ``next`` links vs ``limit=100&offset=``,
  and one page deep in the archive (``_offset`` vs ``offset``);
- a 200-instance study: ``ImagingStudy/<uid>`` vs ``studies/<uid>/instances`` (informational).

Each pair must return the same Study (or SOP) Instance UIDs, the ones the data holds. It prints
p50/p95 per request, the ratios FHIR/QIDO-RS and the FHIR p50 at the large size over the small
one, against the targets: each FHIR search at most 2x its QIDO-RS counterpart's p50, and flat
(at most 1.5x) from the small archive to the large. Results go to
``bench/results/fhir-<timestamp>.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bench.peers import (
    BenchError,
    PacsbridgeTarget,
    fresh_postgres_database,
    log,
    new_uid,
    pacsbridge_executable,
    run_benchmark,
    wait_idle,
)

FHIR_JSON = "application/fhir+json"
DICOM_JSON = "application/dicom+json"
PATIENT_SYSTEM = "urn:pacsbridge:patient-id"  # the default [fhir] patient_identifier_system
DICOM_UID_SYSTEM = "urn:dicom:uid"
#: FHIR p50 at most this many times its QIDO-RS counterpart's (from the issue).
RATIO_TARGET = 2.0
#: FHIR p50 on the large archive at most this many times the small archive's.
FLAT_TARGET = 1.5
#: The date range is widened a day at a time from this day until it holds this many studies.
RANGE_START = date(2021, 3, 1)
RANGE_STUDIES = 60
PAGE = 100
#: pacsbridge runs no jobs and no stable-study scanner here: only the searches are timed.
PACSBRIDGE_ENV = {"PACSBRIDGE_WORKER_IN_SERVE": "false"}
LARGE_STUDIES = 3
LARGE_SERIES = 2
LARGE_INSTANCES = 200


# --- data ------------------------------------------------------------------------------------


@dataclass
class Study:
    uid: str
    patient_id: str
    date: str  # YYYYMMDD
    part10: list[bytes]
    sop_uids: list[str] = field(default_factory=list)


def generate(total: int, seed: int) -> list[Study]:
    """bench.query's ``total`` one-instance studies (same generator and seed), ordered by
    patient: a prefix of the list holds every study of its patients, so that a search by
    patient finds the same studies in the small archive as in the large one."""
    from bench.dicomweb import part10
    from bench.query import study_datasets

    studies = [
        Study(str(ds.StudyInstanceUID), info.patient_id, info.date, [part10(ds)])
        for info, ds in study_datasets(total, seed)
    ]
    studies.sort(key=lambda s: s.patient_id)  # stable: generation order within a patient
    return studies


def large_studies() -> list[Study]:
    """Three studies of two 100-instance series (16x16 CT), dated 2024: outside the
    generator's 2021-2023, so no date range below holds them."""
    from bench.dicomweb import part10
    from tests.dicom_factory import ct_slice

    out = []
    per_series = LARGE_INSTANCES // LARGE_SERIES
    for n in range(LARGE_STUDIES):
        uid = new_uid()
        study = Study(uid, f"BPLARGE{n}", f"202401{n + 10:02d}", [])
        for series_number in range(1, LARGE_SERIES + 1):
            series_uid = new_uid()
            for index in range(per_series):
                ds = ct_slice(
                    study_uid=uid,
                    series_uid=series_uid,
                    index=index,
                    size=16,
                    patient_id=study.patient_id,
                    patient_name=f"LARGE^STUDY{n}",
                    study_date=study.date,
                    seed=index,
                )
                ds.SeriesNumber = series_number
                study.part10.append(part10(ds))
                study.sop_uids.append(str(ds.SOPInstanceUID))
        out.append(study)
    return out


# --- HTTP --------------------------------------------------------------------------------------


class Client:
    """One keep-alive httpx client for both APIs. Bodies are uncompressed
    (``Accept-Encoding: identity``): pacsbridge gzips DICOM JSON on request and FHIR JSON
    never, and on loopback compression only costs the server time."""

    def __init__(self, root: str) -> None:
        import httpx

        self.root = root
        self.http = httpx.Client(timeout=300, headers={"Accept-Encoding": "identity"})

    def get(self, url: str, accept: str) -> tuple[float, Any]:
        """Seconds until the whole body was read, and the body as JSON. ``url``: a path on the
        server or an absolute URL (a FHIR ``next`` link)."""
        full = url if url.startswith("http") else self.root + url
        started = time.perf_counter()
        response = self.http.get(full, headers={"Accept": accept})
        content = response.content
        seconds = time.perf_counter() - started
        if response.status_code not in (200, 204):
            raise BenchError(f"GET {url} answered {response.status_code}: {content[:600]!r}")
        return seconds, json.loads(content) if content else []

    def stow(self, parts: Sequence[bytes]) -> None:
        from bench.dicomweb import multipart

        body, content_type = multipart(parts)
        response = self.http.post(
            f"{self.root}/dicom-web/studies",
            content=body,
            headers={"Content-Type": content_type, "Accept": DICOM_JSON},
        )
        if response.status_code != 200:
            raise BenchError(f"STOW-RS answered {response.status_code}: {response.text[:600]}")
        stored = response.json().get("00081199", {}).get("Value", [])
        if len(stored) != len(parts):
            raise BenchError(f"STOW-RS stored {len(stored)} of {len(parts)} instances")

    def close(self) -> None:
        self.http.close()


def fhir_study_uids(bundle: Any) -> list[str]:
    return [
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode", "match") == "match"
        and e["resource"]["resourceType"] == "ImagingStudy"
    ]


def fhir_sop_uids(resource: Any) -> list[str]:
    return [i["uid"] for s in resource.get("series", []) for i in s.get("instance", [])]


def dicom_values(body: Any, tag: str) -> list[str]:
    return [item[tag]["Value"][0] for item in body]


def qido_study_uids(body: Any) -> list[str]:
    return dicom_values(body, "0020000D")


def qido_sop_uids(body: Any) -> list[str]:
    return dicom_values(body, "00080018")


def next_link(bundle: Any) -> str | None:
    for link in bundle.get("link", []):
        if link.get("relation") == "next":
            return str(link["url"])
    return None


# --- measurement ---------------------------------------------------------------------------


@dataclass
class Pair:
    """A FHIR request and the QIDO-RS request that returns the same studies."""

    name: str
    fhir: str
    qido: str
    fhir_uids: Callable[[Any], list[str]]
    qido_uids: Callable[[Any], list[str]]
    expected: set[str]
    target: bool = True


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (p50 of an even count: the upper middle value)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(seconds: Sequence[float]) -> dict[str, Any]:
    return {
        "p50_ms": percentile(seconds, 50) * 1000,
        "p95_ms": percentile(seconds, 95) * 1000,
        "runs_ms": [round(s * 1000, 3) for s in seconds],
    }


def measure_pair(client: Client, pair: Pair, repeat: int, warmup: int) -> dict[str, Any]:
    """Check once that both return the expected UIDs, then ``warmup`` untimed and ``repeat``
    timed rounds, FHIR and QIDO-RS taking turns at going first."""
    _, fhir_body = client.get(pair.fhir, FHIR_JSON)
    _, qido_body = client.get(pair.qido, DICOM_JSON)
    fhir_uids, qido_uids = pair.fhir_uids(fhir_body), pair.qido_uids(qido_body)
    if len(set(fhir_uids)) != len(fhir_uids):
        raise BenchError(f"{pair.name}: FHIR returned a UID twice ({pair.fhir})")
    if set(fhir_uids) != pair.expected or set(qido_uids) != pair.expected:
        raise BenchError(
            f"{pair.name}: FHIR found {len(set(fhir_uids))}, QIDO-RS {len(set(qido_uids))}, the "
            f"data holds {len(pair.expected)}; FHIR-only "
            f"{sorted(set(fhir_uids) - pair.expected)[:3]}, missing from FHIR "
            f"{sorted(pair.expected - set(fhir_uids))[:3]}, missing from QIDO-RS "
            f"{sorted(pair.expected - set(qido_uids))[:3]}"
        )
    times: dict[str, list[float]] = {"fhir": [], "qido": []}
    requests = (("fhir", pair.fhir, FHIR_JSON), ("qido", pair.qido, DICOM_JSON))
    for round_ in range(warmup + repeat):
        for kind, url, accept in requests if round_ % 2 == 0 else requests[::-1]:
            seconds, _ = client.get(url, accept)
            if round_ >= warmup:
                times[kind].append(seconds)
    return {
        "fhir_request": pair.fhir,
        "qido_request": pair.qido,
        "matches": len(pair.expected),
        "fhir": summary(times["fhir"]),
        "qido": summary(times["qido"]),
    }


def walk_fhir(client: Client, pages: int) -> tuple[list[float], list[str]]:
    url: str | None = f"/fhir/ImagingStudy?_count={PAGE}"
    times: list[float] = []
    uids: list[str] = []
    for _ in range(pages):
        if url is None:
            raise BenchError(f"the FHIR walk ended after {len(times)} of {pages} pages")
        seconds, bundle = client.get(url, FHIR_JSON)
        times.append(seconds)
        uids += fhir_study_uids(bundle)
        url = next_link(bundle)
    return times, uids


def walk_qido(client: Client, pages: int) -> tuple[list[float], list[str]]:
    times: list[float] = []
    uids: list[str] = []
    for page in range(pages):
        seconds, body = client.get(
            f"/dicom-web/studies?limit={PAGE}&offset={page * PAGE}", DICOM_JSON
        )
        times.append(seconds)
        uids += qido_study_uids(body)
    return times, uids


def measure_walk(
    client: Client, pages: int, expected: set[str], walks: int, warmup: int
) -> dict[str, Any]:
    """``walks`` walks of ``pages`` pages of 100 studies per API, taking turns."""
    fhir_page_times: list[float] = []
    qido_page_times: list[float] = []
    fhir_rates: list[float] = []
    qido_rates: list[float] = []
    for walk in range(warmup + walks):
        order = ("fhir", "qido") if walk % 2 == 0 else ("qido", "fhir")
        for kind in order:
            times, uids = walk_fhir(client, pages) if kind == "fhir" else walk_qido(client, pages)
            if len(uids) != len(set(uids)) or set(uids) != expected:
                raise BenchError(
                    f"{kind} walk of {pages} pages: {len(set(uids))} studies "
                    f"({len(uids)} entries), expected the first {len(expected)} stored"
                )
            if walk < warmup:
                continue
            (fhir_page_times if kind == "fhir" else qido_page_times).extend(times)
            (fhir_rates if kind == "fhir" else qido_rates).append(pages / sum(times))
    return {
        "fhir_request": f"/fhir/ImagingStudy?_count={PAGE}, then the next links",
        "qido_request": f"/dicom-web/studies?limit={PAGE}&offset=k*{PAGE}",
        "matches": len(expected),
        "pages": pages,
        "walks": walks,
        "fhir": {**summary(fhir_page_times), "pages_per_s": statistics.median(fhir_rates)},
        "qido": {**summary(qido_page_times), "pages_per_s": statistics.median(qido_rates)},
    }


# --- the run ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fhir",
        description="FHIR ImagingStudy searches vs the QIDO-RS searches returning the same "
        "studies, on a growing archive",
    )
    parser.add_argument("--studies", type=int, default=10_000, help="studies at the large size")
    parser.add_argument("--small", type=int, default=1_000, help="studies at the small size")
    parser.add_argument("--repeat", type=int, default=50, help="timed runs per request")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs per request first")
    parser.add_argument(
        "--pages", type=int, default=20, help="pages of 100 in a walk (at most --small / 100)"
    )
    parser.add_argument("--seed", type=int, default=1729, help="seed of bench.query's data")
    parser.add_argument(
        "--database-url",
        help="run pacsbridge on PostgreSQL: a fresh database is created on this server "
        "(postgresql+psycopg2://postgres@127.0.0.1:5432/postgres)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 300 then 1,000 studies, 10 runs"
    )
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.small, args.studies, args.repeat, args.warmup = 300, 1000, 10, 2
    if min(args.small, args.repeat, args.pages) < 1 or args.warmup < 0:
        parser.error("--small, --repeat and --pages must be >= 1, --warmup >= 0")
    if args.studies <= args.small:
        parser.error("--studies must be larger than --small")
    if args.small < 2 * PAGE:
        parser.error(f"--small must be at least {2 * PAGE} (two pages)")
    return args


def date_range(studies: Sequence[Study]) -> tuple[str, str, set[str]]:
    """From RANGE_START, the shortest range of whole days holding RANGE_STUDIES studies (fewer
    if the data ends first): the same number of results at every archive size."""
    end = RANGE_START
    last = max(s.date for s in studies)
    while True:
        low, high = RANGE_START.strftime("%Y%m%d"), end.strftime("%Y%m%d")
        found = {s.uid for s in studies if low <= s.date <= high}
        if len(found) >= RANGE_STUDIES or high >= last:
            if len(found) > PAGE:
                raise BenchError(f"the date range {low}-{high} holds {len(found)} > {PAGE}")
            return low, high, found
        end += timedelta(days=1)


def fhir_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def store(client: Client, studies: Sequence[Study], label: str) -> float:
    """STOW-RS in order: 100 one-instance studies a request, a large study in a request of its
    own; seconds taken."""
    started = time.perf_counter()
    batch: list[bytes] = []
    for n, study in enumerate(studies, 1):
        if len(study.part10) > 1:
            if batch:
                client.stow(batch)
                batch = []
            client.stow(study.part10)
        else:
            batch += study.part10
        if len(batch) >= PAGE or (batch and n == len(studies)):
            client.stow(batch)
            batch = []
        if n % 2000 == 0:
            log(f"  {label}: {n} of {len(studies)} studies stored")
    return time.perf_counter() - started


def measure_size(
    client: Client,
    args: argparse.Namespace,
    stored: Sequence[Study],
    patient_study: Study,
    uid_study: Study,
    large: Sequence[Study],
) -> dict[str, Any]:
    """Every pair on the archive as it is now (``stored``: its generated studies)."""
    pages = min(args.pages, args.small // PAGE)
    _, found = client.get(
        f"/fhir/Patient?identifier={quote(PATIENT_SYSTEM + '|' + patient_study.patient_id)}",
        FHIR_JSON,
    )
    entries = found.get("entry", [])
    if len(entries) != 1:
        raise BenchError(f"Patient?identifier={patient_study.patient_id}: {len(entries)} found")
    patient = entries[0]["resource"]["id"]
    low, high, in_range = date_range(stored)
    # A page deep in the archive, on the last full STOW-RS request of one-instance studies:
    # rows follow the order of the requests, not of the parts within one (they are ingested
    # concurrently), so a page on a request's boundaries holds a known set of studies.
    rest = stored[args.small :]
    if len(rest) >= PAGE:
        last = len(rest) // PAGE - 1
        deep = args.small + LARGE_STUDIES + last * PAGE
        deep_uids = {s.uid for s in rest[last * PAGE : (last + 1) * PAGE]}
    else:
        last = args.small // PAGE - 1
        deep = last * PAGE
        deep_uids = {s.uid for s in stored[deep : deep + PAGE]}
    identifier = quote(f"{DICOM_UID_SYSTEM}|urn:oid:{uid_study.uid}")
    pairs = [
        Pair(
            "by patient",
            f"/fhir/ImagingStudy?patient=Patient/{patient}",
            f"/dicom-web/studies?PatientID={patient_study.patient_id}",
            fhir_study_uids,
            qido_study_uids,
            {s.uid for s in stored if s.patient_id == patient_study.patient_id},
        ),
        Pair(
            "by identifier",
            f"/fhir/ImagingStudy?identifier={identifier}",
            f"/dicom-web/studies?StudyInstanceUID={uid_study.uid}",
            fhir_study_uids,
            qido_study_uids,
            {uid_study.uid},
        ),
        Pair(
            "by date range",
            f"/fhir/ImagingStudy?started=ge{fhir_date(low)}&started=le{fhir_date(high)}"
            f"&_count={PAGE}",
            f"/dicom-web/studies?StudyDate={low}-{high}&limit={PAGE}",
            fhir_study_uids,
            qido_study_uids,
            in_range,
        ),
        Pair(
            "deep page (_offset)",
            f"/fhir/ImagingStudy?_count={PAGE}&_offset={deep}",
            f"/dicom-web/studies?limit={PAGE}&offset={deep}",
            fhir_study_uids,
            qido_study_uids,
            deep_uids,
        ),
        Pair(
            f"read {LARGE_INSTANCES}-instance study",
            f"/fhir/ImagingStudy/{large[0].uid}",
            f"/dicom-web/studies/{large[0].uid}/instances",
            fhir_sop_uids,
            qido_sop_uids,
            set(large[0].sop_uids),
            target=False,
        ),
    ]
    out: dict[str, Any] = {}
    for pair in pairs:
        result = measure_pair(client, pair, args.repeat, args.warmup)
        result["target"] = pair.target
        if pair.name.startswith("deep page"):
            result["offset"] = deep
        out[pair.name] = result
        log(
            f"  {pair.name:<28} [{result['matches']:>3}]  FHIR p50 "
            f"{result['fhir']['p50_ms']:7.2f} ms  QIDO-RS p50 {result['qido']['p50_ms']:7.2f} ms"
        )
    walks = max(3, args.repeat // 5)
    walk = measure_walk(client, pages, {s.uid for s in stored[: pages * PAGE]}, walks, 1)
    walk["target"] = True
    out[f"walk {pages} pages of {PAGE}"] = walk
    log(
        f"  walk of {pages} pages: FHIR {walk['fhir']['pages_per_s']:.1f} pages/s, "
        f"QIDO-RS {walk['qido']['pages_per_s']:.1f} pages/s"
    )
    out["_date_range"] = [low, high]
    out["_patient"] = {"fhir_id": patient, "patient_id": patient_study.patient_id}
    return out


def run(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    load_start = os.getloadavg()
    if load_start[0] > 1.0:
        log(
            f"WARNING: load average {load_start[0]:.1f} before the run: other work on this "
            "machine competes with the server and the timings are noisier"
        )
    log(f"generating bench.query's {args.studies} one-instance studies (seed {args.seed}) ...")
    t0 = time.perf_counter()
    studies = generate(args.studies, args.seed)
    large = large_studies()
    log(f"  generated in {time.perf_counter() - t0:.1f} s")
    small, rest = studies[: args.small], studies[args.small :]

    database_url = None
    if args.database_url:
        database_url = stack.enter_context(fresh_postgres_database(args.database_url))
    target = PacsbridgeTarget(
        workdir / "pacsbridge", pacsbridge_executable(), database_url, extra_env=PACSBRIDGE_ENV
    )
    stack.callback(target.stop)
    log("starting pacsbridge ...")
    target.start()
    assert target.process is not None
    log(f"  pacsbridge {target.version}: {target.http}, pid {target.process.pid}")
    client = Client(target.http)
    stack.callback(client.close)
    _, capability = client.get("/fhir/metadata", FHIR_JSON)
    if capability.get("fhirVersion") != "4.0.1":
        raise BenchError(f"/fhir/metadata: fhirVersion {capability.get('fhirVersion')!r}")

    # The same patient, study and large study at both sizes.
    patient_study = small[len(small) // 2]
    uid_study = small[len(small) // 3]
    ingest: dict[str, Any] = {}
    sizes: dict[str, Any] = {}
    stored: list[Study] = []
    for label, batch, extra in (("small", small, large), ("large", rest, [])):
        seconds = store(client, [*batch, *extra], label)
        stored += batch
        count = len(stored) + LARGE_STUDIES
        instances = len(stored) + LARGE_STUDIES * LARGE_INSTANCES
        stats = target.stats()
        if (stats["studies"], stats["instances"]) != (count, instances):
            raise BenchError(
                f"pacsbridge holds {stats['studies']} studies and {stats['instances']} "
                f"instances, expected {count} and {instances}"
            )
        rate = (len(batch) + len(extra) * LARGE_INSTANCES) / seconds
        ingest[label] = {"seconds": seconds, "instances_per_s": rate}
        log(f"stored {len(batch)} studies ({seconds:.1f} s, {rate:.0f} instances/s); waiting "
            "until pacsbridge is idle ...")  # fmt: skip
        wait_idle([target.process], timeout=600)
        log(f"{len(stored)} studies (+{LARGE_STUDIES} of {LARGE_INSTANCES} instances), "
            f"{args.repeat} runs per request:")  # fmt: skip
        sizes[str(len(stored))] = measure_size(
            client, args, stored, patient_study, uid_study, large
        )

    verdicts = print_table(sizes, args)
    return {
        "benchmark": "fhir",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.fhir", *sys.argv[1:]],
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        },
        "parameters": {
            "studies": args.studies,
            "small": args.small,
            "repeat": args.repeat,
            "warmup": args.warmup,
            "pages": min(args.pages, args.small // PAGE),
            "seed": args.seed,
            "quick": args.quick,
            "database": "postgresql" if args.database_url else "sqlite",
            "pacsbridge_env": PACSBRIDGE_ENV,
            "large_studies": f"{LARGE_STUDIES} x {LARGE_SERIES} series x "
            f"{LARGE_INSTANCES // LARGE_SERIES} instances",
            "accept_encoding": "identity",
        },
        "pacsbridge": {"version": target.version, "durability": target.durability},
        "ingest": ingest,
        "sizes": sizes,
        "verdicts": verdicts,
        "wall_seconds": time.perf_counter() - started,
    }


def print_table(sizes: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The table of the issue; returns the verdict of each line."""
    labels = list(sizes)
    first, last = labels[0], labels[-1]
    names = [n for n in sizes[first] if not n.startswith("_")]
    verdicts: dict[str, Any] = {}
    head = (
        f"{'query':<28}{'studies':>8}{'found':>6}{'FHIR p50':>10}{'p95':>8}{'QIDO p50':>10}"
        f"{'p95':>8}{'FHIR/QIDO':>10}{f'{last}/{first}':>12}{'QIDO':>6}  verdict"
    )
    log("")
    log(head)
    log("-" * len(head))
    for name in names:
        for label in labels:
            row = sizes[label][name]
            fhir, qido = row["fhir"], row["qido"]
            ratio = fhir["p50_ms"] / qido["p50_ms"]
            cells = (
                f"{name:<28}{label:>8}{row['matches']:>6}{fhir['p50_ms']:>10.2f}"
                f"{fhir['p95_ms']:>8.2f}{qido['p50_ms']:>10.2f}{qido['p95_ms']:>8.2f}"
                f"{ratio:>10.2f}"
            )
            verdict: dict[str, Any] = {"fhir_over_qido_p50": ratio}
            if label == last:
                base = sizes[first][name]
                flat = fhir["p50_ms"] / base["fhir"]["p50_ms"]
                qido_flat = qido["p50_ms"] / base["qido"]["p50_ms"]
                verdict |= {"fhir_growth_p50": flat, "qido_growth_p50": qido_flat}
                cells += f"{flat:>12.2f}{qido_flat:>6.2f}"
            else:
                cells += f"{'':>18}"
            if row["target"]:
                met = ratio <= RATIO_TARGET and verdict.get("fhir_growth_p50", 0) <= FLAT_TARGET
                verdict["met"] = met
                cells += "  target met" if met else "  target missed"
            else:
                cells += "  (informational)"
            verdicts[f"{name} @ {label}"] = verdict
            log(cells)
        if "pages" in sizes[first][name]:
            for label in labels:
                row = sizes[label][name]
                ratio = row["qido"]["pages_per_s"] / row["fhir"]["pages_per_s"]
                log(
                    f"{'  pages/s':<28}{label:>8}{'':>6}{row['fhir']['pages_per_s']:>10.1f}"
                    f"{'':>8}{row['qido']['pages_per_s']:>10.1f}{'':>8}{1 / ratio:>10.2f}"
                    "  (FHIR/QIDO pages/s)"
                )
    log("")
    log(
        f"p50/p95 in ms over {args.repeat} runs (a walk: per page); FHIR/QIDO: ratio of the p50s, "
        f"target <= {RATIO_TARGET:g}; {last}/{first}: FHIR p50 growth, target <= "
        f"{FLAT_TARGET:g} (QIDO: QIDO-RS growth, for reference). 'studies': generated "
        f"one-instance studies stored, plus {LARGE_STUDIES} of {LARGE_INSTANCES} instances."
    )
    if args.quick:
        log("--quick: small numbers, for a smoke run only")
    return verdicts


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("fhir", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
