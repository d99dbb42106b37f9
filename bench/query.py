"""Query and retrieve benchmark: C-FIND and C-GET on pacsbridge and Orthanc, side by side.

Run from the project root::

    .venv/bin/python -m bench.query            # 10,000 studies, ~10 min on 2 cores
    .venv/bin/python -m bench.query --quick    # 1,000 studies, 50-slice C-GET, ~1.5 min

Both servers index the same 10,000 single-instance studies (about 3 per patient, 10% of the
patients named SMITH^...), sent with DCMTK ``storescu`` by concurrent senders; the ingest rate
of each is recorded. Then, with one association per server (the socket-level SCU of
bench/dimse_client.py: pynetdicom's would time itself more than the servers), each C-FIND at STUDY
level runs several times and the median latency is kept (findscu runs each query once as a
check that the servers find the same number of studies). Last, DCMTK ``getscu`` retrieves a
200-slice 512x512 CT study by C-GET several times (median wall time, instances/s and MB/s).
Orthanc runs twice, as shipped (``orthanc``: TCP_NODELAY unset, so DCMTK keeps Nagle on for
its responses) and tuned (``orthanc-nd``: TCP_NODELAY=1); the ratios are pacsbridge/peer.
Results go to ``bench/results/query-<timestamp>.json``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.peers import (
    CALLING_AE,
    LOOPBACK,
    ORTHANC_BIN,
    BenchError,
    OrthancTarget,
    PacsbridgeTarget,
    Target,
    dcmtk_version,
    log,
    new_uid,
    pacsbridge_executable,
    run_benchmark,
    send,
    sender_env,
    tail,
    verify_count,
    wait_idle,
)

FIRST_DAY = date(2021, 1, 1)
DAYS = 3 * 365
SURNAMES = [
    "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "RODRIGUEZ",
    "MARTINEZ", "HERNANDEZ", "LOPEZ", "GONZALEZ", "WILSON", "ANDERSON", "THOMAS", "TAYLOR",
    "MOORE", "JACKSON", "MARTIN", "LEE", "PEREZ", "THOMPSON", "WHITE", "HARRIS", "SANCHEZ",
    "CLARK", "RAMIREZ", "LEWIS", "ROBINSON", "WALKER", "YOUNG", "ALLEN", "KING", "WRIGHT",
    "SCOTT", "TORRES", "NGUYEN", "HILL", "FLORES", "GREEN", "ADAMS", "NELSON", "BAKER",
    "HALL", "RIVERA", "CAMPBELL", "MITCHELL", "CARTER", "ROBERTS", "SMYTHE",
]  # fmt: skip
GIVEN = ["JAMES", "MARY", "ROBERT", "PATRICIA", "JOHN", "JENNIFER", "MICHAEL", "LINDA", "ANNA"]
MODALITIES = ["CT"] * 35 + ["MR"] * 20 + ["CR"] * 15 + ["DX"] * 10 + ["US"] * 10 + ["PT"] * 5
MODALITIES += ["MG"] * 5
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
    "PT": "1.2.840.10008.5.1.4.1.1.128",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
}
RETURN_KEYS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
]
# C-FIND latency targets, pacsbridge/Orthanc (from the issue).
FIND_TARGET = 1 / 3
FIND_TARGET_MANY = 1 / 2


# --- data ------------------------------------------------------------------------------------


@dataclass
class StudyInfo:
    patient_id: str
    name: str
    date: str
    modality: str


@dataclass
class Dataset10k:
    studies: list[StudyInfo]
    batches: list[list[Path]]
    get_study_uid: str
    get_files: list[Path]


def study_datasets(studies: int, seed: int) -> Iterator[tuple[StudyInfo, Any]]:
    """``studies`` single-instance studies (4x4 pixels) of about ``studies / 3`` patients, one
    in ten named ``SMITH^…``, dates over 2021-2023, seven modalities; the same for a seed."""
    from pydicom.uid import UID

    from tests.dicom_factory import ct_slice

    rng = random.Random(seed)
    patients = max(1, round(studies / 3))
    people = []
    for n in range(patients):
        surname = "SMITH" if n % 10 == 0 else rng.choice(SURNAMES)
        people.append(
            (
                f"BP{n:06d}",
                f"{surname}^{rng.choice(GIVEN)}",
                (date(1930, 1, 1) + timedelta(days=rng.randrange(30000))).strftime("%Y%m%d"),
                rng.choice("MF"),
            )
        )
    for n in range(studies):
        patient_id, name, birth, sex = people[n % patients]
        day = (FIRST_DAY + timedelta(days=rng.randrange(DAYS))).strftime("%Y%m%d")
        modality = rng.choice(MODALITIES)
        ds = ct_slice(
            study_uid=new_uid(),
            series_uid=new_uid(),
            index=0,
            size=4,
            patient_id=patient_id,
            patient_name=name,
            study_date=day,
            seed=n,
        )
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(SOP_CLASSES[modality])
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientBirthDate = birth
        ds.PatientSex = sex
        seconds = rng.randrange(7 * 3600, 20 * 3600)
        ds.StudyTime = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
        ds.AccessionNumber = f"BA{n:08d}"
        ds.StudyDescription = f"{modality} {rng.choice(['HEAD', 'CHEST', 'ABDOMEN', 'KNEE'])}"
        ds.Modality = modality
        yield StudyInfo(patient_id, name, day, modality), ds


def generate(
    workdir: Path, *, studies: int, senders: int, get_slices: int, seed: int
) -> Dataset10k:
    """:func:`study_datasets` as files split over ``senders`` folders, and one
    ``get_slices``-slice 512x512 CT study for the C-GET."""
    from tests.dicom_factory import write_series

    infos: list[StudyInfo] = []
    batches: list[list[Path]] = [[] for _ in range(senders)]
    folders = [workdir / "studies" / f"sender{i}" for i in range(senders)]
    for folder in folders:
        folder.mkdir(parents=True)
    for n, (info, ds) in enumerate(study_datasets(studies, seed)):
        path = folders[n % senders] / f"{n:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        batches[n % senders].append(path)
        infos.append(info)
    get_uid = new_uid()
    get_files = write_series(
        workdir / "get-study",
        get_slices,
        size=512,
        study_uid=get_uid,
        series_uid=new_uid(),
        patient_id="BPGET",
        patient_name="GET^STUDY",
        study_date="20240115",
    )
    return Dataset10k(infos, batches, get_uid, get_files)


@dataclass
class Query:
    name: str
    keys: dict[str, str]
    expected: int
    target: float


def queries(studies: Sequence[StudyInfo]) -> list[Query]:
    """The four C-FIND searches of the issue, with the number of studies each must find."""
    one = studies[len(studies) // 2].patient_id
    month = ("20220301", "20220331")
    half = ("20220101", "20220630")

    def count(pred: Any) -> int:
        return sum(1 for s in studies if pred(s))

    return [
        Query(
            "PatientID exact",
            {"PatientID": one},
            count(lambda s: s.patient_id == one),
            FIND_TARGET,
        ),
        Query(
            "PatientName SMITH*",
            {"PatientName": "SMITH*"},
            count(lambda s: s.name.startswith("SMITH")),
            FIND_TARGET_MANY,
        ),
        Query(
            "StudyDate one month",
            {"StudyDate": "-".join(month)},
            count(lambda s: month[0] <= s.date <= month[1]),
            FIND_TARGET,
        ),
        Query(
            "ModalitiesInStudy MR + 6 months",
            {"ModalitiesInStudy": "MR", "StudyDate": "-".join(half)},
            count(lambda s: s.modality == "MR" and half[0] <= s.date <= half[1]),
            FIND_TARGET,
        ),
    ]


# --- C-FIND ----------------------------------------------------------------------------------


STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Q/R Information Model - FIND


def identifier(query: Query) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = ""
    for keyword in RETURN_KEYS:
        setattr(ds, keyword, "")
    for keyword, value in query.keys.items():
        setattr(ds, keyword, value)
    return ds


class FindClient:
    """One association to one server, reused for every run of every query, through the
    socket-level SCU of bench/dimse_client.py (see there why not pynetdicom's)."""

    def __init__(self, target: Target) -> None:
        from bench.dimse_client import DimseClientError, FindSCU

        self.target = target
        try:
            self.scu = FindSCU(LOOPBACK, target.dimse_port, target.ae, CALLING_AE, STUDY_ROOT_FIND)
        except (OSError, DimseClientError) as exc:
            raise BenchError(
                f"{target.name} refused the C-FIND association: {exc}\n{target.log_tail()}"
            ) from exc

    def run(self, query: Query) -> tuple[float, int]:
        """Seconds from the request until the final response, and the number of matches."""
        from bench.dimse_client import DimseClientError

        encoded = self.scu.encode(identifier(query))
        started = time.perf_counter()
        try:
            final, matches = self.scu.find(encoded)
        except (OSError, DimseClientError) as exc:
            raise BenchError(f"{self.target.name}: C-FIND {query.name} failed: {exc}") from exc
        elapsed = time.perf_counter() - started
        if final != 0x0000:
            raise BenchError(f"{self.target.name}: C-FIND {query.name} ended with 0x{final:04X}")
        return elapsed, matches

    def close(self) -> None:
        self.scu.release()


def findscu_count(target: Target, query: Query, outdir: Path) -> int:
    """Run the query once with DCMTK findscu; the number of responses it wrote."""
    outdir.mkdir(parents=True)
    argv = ["findscu", "-S", "-X", "-od", str(outdir), "-aet", CALLING_AE, "-aec", target.ae]
    for keyword, value in {
        "QueryRetrieveLevel": "STUDY",
        "StudyInstanceUID": "",
        **query.keys,
    }.items():
        argv += ["-k", f"{keyword}={value}"]
    argv += [LOOPBACK, str(target.dimse_port)]
    result = subprocess.run(
        argv, env=sender_env(True), capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode != 0:
        raise BenchError(f"findscu {query.name} on {target.name} failed:\n{result.stderr[-2000:]}")
    count = sum(1 for _ in outdir.glob("rsp*.dcm"))
    shutil.rmtree(outdir, ignore_errors=True)
    return count


# --- C-GET -----------------------------------------------------------------------------------


def get_support(target: Target) -> str | None:
    """None when ``target`` accepts the Study Root C-GET presentation context, else why not."""
    from pynetdicom import AE
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        StudyRootQueryRetrieveInformationModelGet,
    )

    ae = AE(ae_title=CALLING_AE)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    assoc = ae.associate(LOOPBACK, target.dimse_port, ae_title=target.ae)
    if not assoc.is_established:
        return "association refused"
    try:
        accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
    finally:
        assoc.release()
    if str(StudyRootQueryRetrieveInformationModelGet) not in accepted:
        return "the Study Root C-GET presentation context is rejected (C-GET not supported)"
    return None


@dataclass
class GetRun:
    seconds: float
    instances: int
    bytes: int


def getscu(target: Target, study_uid: str, outdir: Path, logdir: Path, timeout: float) -> GetRun:
    outdir.mkdir(parents=True)
    argv = [
        "getscu",
        "-S",
        "-aet",
        CALLING_AE,
        "-aec",
        target.ae,
        "-od",
        str(outdir),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        LOOPBACK,
        str(target.dimse_port),
    ]
    log_path = logdir / f"getscu-{target.name}.log"
    with open(log_path, "wb") as out:
        started = time.perf_counter()
        try:
            result = subprocess.run(
                argv, env=sender_env(True), stdout=out, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired as exc:
            raise BenchError(f"getscu from {target.name} timed out after {timeout:.0f} s") from exc
        elapsed = time.perf_counter() - started
    files = [p for p in outdir.iterdir() if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    shutil.rmtree(outdir, ignore_errors=True)
    if result.returncode != 0:
        raise BenchError(f"getscu from {target.name} exited {result.returncode}:\n{tail(log_path)}")
    return GetRun(elapsed, len(files), size)


# --- the run ---------------------------------------------------------------------------------


@dataclass
class Results:
    ingest: dict[str, Any] = field(default_factory=dict)
    find: dict[str, Any] = field(default_factory=dict)
    get: dict[str, Any] = field(default_factory=dict)


QUICK_STABLE_AGE = 3600


def pacsbridge_stable_settings(env: dict[str, str]) -> tuple[float, float]:
    """stable_age and stable_scan_interval of the pacsbridge under test (defaults + ``env``)."""
    from config import Settings

    fields = Settings.model_fields
    age = float(env.get("PACSBRIDGE_STABLE_AGE", fields["stable_age"].default))
    interval = float(
        env.get("PACSBRIDGE_STABLE_SCAN_INTERVAL", fields["stable_scan_interval"].default)
    )
    return age, interval


def check_tools() -> None:
    missing = [t for t in ("storescu", "echoscu", "findscu", "getscu") if not shutil.which(t)]
    if not os.access(ORTHANC_BIN, os.X_OK):
        missing.append(ORTHANC_BIN)
    if missing:
        raise BenchError(f"missing programs: {', '.join(missing)} (apt-get install dcmtk orthanc)")


ORTHANC_QR_CONFIG: dict[str, Any] = {
    # An SCU that is not in DicomModalities may query and retrieve (C-GET) too.
    "DicomAlwaysAllowFind": True,
    "DicomAlwaysAllowGet": True,
    "DicomModalities": {"bench": [CALLING_AE, LOOPBACK, 104]},
}


def run(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    check_tools()
    started = time.perf_counter()
    load_start = os.getloadavg()
    if load_start[0] > 1.0:
        log(
            f"WARNING: load average {load_start[0]:.1f} before the run: other work on this "
            "machine competes with the servers and the timings are noisier"
        )
    log(
        f"generating {args.studies} single-instance studies and a {args.get_slices}-slice "
        "512x512 study ..."
    )
    t0 = time.perf_counter()
    data = generate(
        workdir / "data",
        studies=args.studies,
        senders=args.senders,
        get_slices=args.get_slices,
        seed=args.seed,
    )
    os.sync()
    log(f"  generated in {time.perf_counter() - t0:.1f} s")

    targets: list[Target] = []

    def stop_targets() -> None:
        for target in reversed(targets):
            log(f"stopping {target.name} ...")
            target.stop()

    stack.callback(stop_targets)
    planned: list[Target] = []
    variants = {"both": [False, True], "shipped": [False], "tuned": [True]}[args.orthanc]
    for nodelay in variants:
        name = "orthanc-nd" if nodelay else "orthanc"
        planned.append(
            OrthancTarget(workdir / name, nodelay=nodelay, name=name, config=ORTHANC_QR_CONFIG)
        )
    pacsbridge_env = {"PACSBRIDGE_STABLE_AGE": str(QUICK_STABLE_AGE)} if args.quick else {}
    # The SCU is a declared peer, as in Orthanc's DicomModalities: pacsbridge serves C-FIND and
    # C-GET only to declared peers by default, and looks each association's caller up.
    pacsbridge_env["PACSBRIDGE_PEERS"] = json.dumps(
        {"bench": {"ae_title": CALLING_AE, "host": LOOPBACK, "port": 104}}
    )
    pacsbridge = PacsbridgeTarget(
        workdir / "pacsbridge", pacsbridge_executable(), None, extra_env=pacsbridge_env
    )
    planned.append(pacsbridge)
    for target in planned:
        targets.append(target)
        log(f"starting {target.name} ...")
        target.start()
        assert target.process is not None
        log(f"  {target.name} {target.version}: pid {target.process.pid}, port {target.dimse_port}")

    results = Results()
    logdir = workdir / "logs"
    logdir.mkdir()

    # 1. Ingest: the same files, one target at a time (Orthanc first: pacsbridge's stable-study
    #    scanner runs a minute after its last instance and must not compete with Orthanc's run).
    total = len(data.studies)
    for target in targets:
        os.sync()
        log(f"ingest: {total} instances to {target.name}, {args.senders} storescu senders ...")
        seconds = send(target, data.batches, nodelay=True, timeout=args.timeout, logdir=logdir)
        settle = verify_count(target, total, settle=60)
        rate = total / seconds
        results.ingest[target.name] = {
            "instances": total,
            "seconds": seconds,
            "instances_per_s": rate,
            "settle_seconds": settle,
        }
        log(f"  {seconds:.1f} s = {rate:.1f} instances/s (counted {total})")
    for target in targets:
        seconds = send(target, [data.get_files], nodelay=True, timeout=args.timeout, logdir=logdir)
        verify_count(target, total + len(data.get_files), settle=60)
        log(f"stored the C-GET study in {target.name} ({seconds:.1f} s)")
    last_store = time.monotonic()

    # pacsbridge's stable-study scanner marks a study stable (and enqueues its jobs) stable_age
    # seconds after its last instance: that work must not land in the timed runs. Wait for it to
    # start, then until every server is idle.
    stable_age, scan_interval = pacsbridge_stable_settings(pacsbridge_env)
    idle_wait = 0.0
    if not args.quick:
        delay = last_store + stable_age + scan_interval + 2 - time.monotonic()
        if delay > 0:
            log(
                f"waiting {delay:.0f} s: pacsbridge marks studies stable {stable_age:.0f} s after "
                "their last instance ..."
            )
            time.sleep(delay)
        processes = [t.process for t in targets if t.process is not None]
        idle_wait = wait_idle(processes, timeout=args.timeout)
        log(f"  all servers idle after another {idle_wait:.0f} s")

    # 2. C-FIND: findscu once per query and server (counts), then timed runs, round-robin.
    table = queries(data.studies)
    clients = {t.name: FindClient(t) for t in targets}
    for client in clients.values():
        stack.callback(client.close)
    for query in table:
        counts = {
            t.name: findscu_count(t, query, workdir / f"findscu-{t.name}-{time.monotonic_ns()}")
            for t in targets
        }
        times: dict[str, list[float]] = {t.name: [] for t in targets}
        matches: dict[str, int] = {}
        for run_index in range(args.runs + 1):  # the first run warms caches and is dropped
            order = targets if run_index % 2 == 0 else list(reversed(targets))
            for target in order:
                seconds, n = clients[target.name].run(query)
                matches[target.name] = n
                if run_index:
                    times[target.name].append(seconds)
        agree = len(set(counts.values()) | set(matches.values()) | {query.expected}) == 1
        entry: dict[str, Any] = {
            "keys": query.keys,
            "expected_matches": query.expected,
            "findscu_matches": counts,
            "pynetdicom_matches": matches,
            "counts_agree": agree,
            "target_ratio": query.target,
            "runs_ms": {k: [round(v * 1000, 3) for v in vs] for k, vs in times.items()},
            "median_ms": {k: statistics.median(vs) * 1000 for k, vs in times.items()},
        }
        pb = entry["median_ms"]["pacsbridge"]
        entry["ratios"] = {
            f"pacsbridge/{name}": pb / ms
            for name, ms in entry["median_ms"].items()
            if name != "pacsbridge"
        }
        results.find[query.name] = entry
        note = "" if agree else f"  COUNTS DIFFER: expected {query.expected}, findscu {counts}"
        medians = ", ".join(f"{k} {v:.1f} ms" for k, v in entry["median_ms"].items())
        log(f"C-FIND {query.name} [{query.expected} matches]: {medians}{note}")

    # 3. C-GET of the 200-slice study, with getscu.
    for target in targets:
        why_not = get_support(target)
        if why_not is not None:
            results.get[target.name] = {"supported": False, "reason": why_not}
            log(f"C-GET {target.name}: not measured: {why_not}")
            continue
        runs: list[GetRun] = []
        error = None
        for index in range(args.get_runs):
            try:
                one = getscu(
                    target,
                    data.get_study_uid,
                    workdir / f"get-{target.name}-{index}",
                    logdir,
                    args.timeout,
                )
            except BenchError as exc:
                error = str(exc)
                break
            if one.instances != len(data.get_files):
                error = f"getscu received {one.instances} of {len(data.get_files)} instances"
                break
            runs.append(one)
        if error is not None:
            results.get[target.name] = {"supported": True, "error": error}
            log(f"C-GET {target.name}: FAILED: {error}")
            continue
        seconds = statistics.median(r.seconds for r in runs)
        megabytes = runs[0].bytes / 1e6
        results.get[target.name] = {
            "supported": True,
            "instances": runs[0].instances,
            "bytes": runs[0].bytes,
            "runs_s": [round(r.seconds, 4) for r in runs],
            "median_s": seconds,
            "instances_per_s": runs[0].instances / seconds,
            "mb_per_s": megabytes / seconds,
        }
        log(
            f"C-GET {target.name}: {runs[0].instances} instances, {megabytes:.0f} MB in "
            f"{seconds:.2f} s = {runs[0].instances / seconds:.0f} inst/s, "
            f"{megabytes / seconds:.0f} MB/s"
        )

    names = [t.name for t in targets]
    summary = summarize(results, names)
    print_summary(results, summary, names, args)
    return {
        "benchmark": "query",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [sys.executable, "-m", "bench.query", *sys.argv[1:]],
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
        },
        "parameters": {
            "studies": args.studies,
            "patients": round(args.studies / 3),
            "senders": args.senders,
            "find_runs": args.runs,
            "get_runs": args.get_runs,
            "get_slices": args.get_slices,
            "seed": args.seed,
            "quick": args.quick,
            "find_client": "bench/dimse_client.py, one association per server, TCP_NODELAY on",
            "pacsbridge_env": pacsbridge_env,
            "stable_age": stable_age,
            "idle_wait_seconds": idle_wait,
            "find_return_keys": RETURN_KEYS,
        },
        "targets": {
            t.name: {
                "version": t.version,
                "ae": t.ae,
                "durability": t.durability,
                **({"orthanc_config": t.config} if isinstance(t, OrthancTarget) else {}),
            }
            for t in targets
        },
        "dcmtk": dcmtk_version("getscu"),
        "ingest": results.ingest,
        "find": results.find,
        "get": results.get,
        "summary": summary,
        "wall_seconds": time.perf_counter() - started,
    }


def summarize(results: Results, names: list[str]) -> dict[str, Any]:
    peers = [n for n in names if n != "pacsbridge"]
    out: dict[str, Any] = {"ingest": {}, "find": {}, "get": {}}
    pb_ingest = results.ingest["pacsbridge"]["instances_per_s"]
    for peer in peers:
        ratio = pb_ingest / results.ingest[peer]["instances_per_s"]
        out["ingest"][f"pacsbridge/{peer}"] = {"rate_ratio": ratio, "target_met": ratio >= 1}
    for name, entry in results.find.items():
        out["find"][name] = {
            key: {"latency_ratio": r, "target_met": r <= entry["target_ratio"]}
            for key, r in entry["ratios"].items()
        }
    pb_get = results.get.get("pacsbridge", {})
    for peer in peers:
        peer_get = results.get.get(peer, {})
        if "instances_per_s" in pb_get and "instances_per_s" in peer_get:
            ratio = pb_get["instances_per_s"] / peer_get["instances_per_s"]
            out["get"][f"pacsbridge/{peer}"] = {"rate_ratio": ratio, "target_met": ratio >= 1}
        else:
            reason = pb_get.get("reason") or pb_get.get("error") or peer_get.get("error")
            out["get"][f"pacsbridge/{peer}"] = {"rate_ratio": None, "not_measured": reason}
    return out


def print_summary(
    results: Results, summary: dict[str, Any], names: list[str], args: argparse.Namespace
) -> None:
    peers = [n for n in names if n != "pacsbridge"]
    width = 44
    header = f"{'':<{width}}" + "".join(f"{n:>13}" for n in names)
    header += "".join(f"{'pb/' + p:>14}" for p in peers) + "  target"
    log("")
    log(header)
    log("-" * len(header))
    row = f"{f'ingest {args.studies} (inst/s)':<{width}}"
    row += "".join(f"{results.ingest[n]['instances_per_s']:>13.1f}" for n in names)
    for peer in peers:
        row += f"{summary['ingest'][f'pacsbridge/{peer}']['rate_ratio']:>14.2f}"
    log(row + "  >= 1")
    for name, entry in results.find.items():
        label = f"C-FIND {name} (ms)"
        row = f"{label:<{width}}" + "".join(f"{entry['median_ms'][n]:>13.1f}" for n in names)
        for peer in peers:
            row += f"{entry['ratios'][f'pacsbridge/{peer}']:>14.2f}"
        target = "<= 1/2" if entry["target_ratio"] == FIND_TARGET_MANY else "<= 1/3"
        log(row + f"  {target}  [{entry['expected_matches']} matches]")
        if not entry["counts_agree"]:
            log(f"{'':<{width}}  counts differ: findscu {entry['findscu_matches']}")
    for unit, key, fmt in (("inst/s", "instances_per_s", ".0f"), ("MB/s", "mb_per_s", ".0f")):
        label = f"C-GET {args.get_slices} slices ({unit})"
        row = f"{label:<{width}}"
        for n in names:
            cell = results.get.get(n, {})
            row += f"{cell[key]:>13{fmt}}" if key in cell else f"{'n/a':>13}"
        for peer in peers:
            ratio = summary["get"][f"pacsbridge/{peer}"]["rate_ratio"]
            row += f"{ratio:>14.2f}" if ratio is not None else f"{'n/a':>14}"
        log(row + "  >= 1")
    for n in names:
        cell = results.get.get(n, {})
        if "reason" in cell or "error" in cell:
            log(f"C-GET {n}: {cell.get('reason') or cell.get('error')}")
    log("")
    log("orthanc = as shipped (TCP_NODELAY unset: Nagle on for its responses); orthanc-nd = with")
    log("TCP_NODELAY=1. C-FIND: median of the runs, one association per server")
    log("(the socket-level SCU of bench/dimse_client.py).")
    if args.quick:
        log(f"--quick: pacsbridge runs with PACSBRIDGE_STABLE_AGE={QUICK_STABLE_AGE} (no")
        log("stable-study work during the run); the timed runs start without an idle wait.")


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.query",
        description="C-FIND and C-GET: pacsbridge vs Orthanc on 10,000 indexed studies.",
    )
    parser.add_argument("--studies", type=int, default=10_000, help="single-instance studies")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu at ingest")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per C-FIND (median)")
    parser.add_argument("--get-runs", type=int, default=5, help="timed C-GET runs (median)")
    parser.add_argument("--get-slices", type=int, default=200, help="slices of the C-GET study")
    parser.add_argument(
        "--orthanc",
        choices=["both", "tuned", "shipped"],
        default="both",
        help="Orthanc as shipped (TCP_NODELAY unset), tuned (TCP_NODELAY=1), or both (default)",
    )
    parser.add_argument("--seed", type=int, default=1729, help="seed of the generated data")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 1,000 studies, 3 C-FIND runs, a 50-slice C-GET study, 2 C-GET runs",
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds one send may take")
    parser.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.runs, args.get_slices, args.get_runs = 1000, 3, 50, 2
    if min(args.studies, args.senders, args.runs, args.get_runs, args.get_slices) < 1:
        parser.error("--studies, --senders, --runs, --get-runs and --get-slices must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    return run_benchmark("query", parse_args(argv), run)


if __name__ == "__main__":
    sys.exit(main())
