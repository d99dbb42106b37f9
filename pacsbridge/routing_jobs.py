"""Routing as jobs: what the rules in ``[routes.*]`` turn into.

- ``route`` (enqueued by the stable-study scanner for every stable study): matches the study
  against the ``on = "stable"`` rules and enqueues one ``forward`` job per destination.
- ``forward``: sends a study (or the listed instances) to one destination; a destination that
  is down fails the job, which is retried with backoff until it is delivered or dead.
- ``on = "arrival"`` rules are matched inside the ingest transaction of every stored instance
  and enqueue a ``forward`` job for it there, so that the job exists if and only if the
  instance does.

Handlers run at least once; a repeated send is harmless (the receiver keeps one copy).
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection

from archive import Archive
from archive.dicom import ParsedInstance
from archive.jobs import JobHandler, JobRecord, PermanentJobError
from archive.retrieve import (
    RetrieveItem,
    RetrieveKeys,
    RetrieveLevel,
    RetrieveModel,
    find_instances,
)
from archive.summary import study_facts
from config import Settings
from dicom_node.forward import Forwarder, ForwardError
from dicom_node.routing import deliveries_for_study, route_instance
from pacsbridge.jobs import HandlerRegistry

log = logging.getLogger(__name__)

ROUTE = "route"
FORWARD = "forward"


def register(registry: HandlerRegistry, settings: Settings) -> None:
    """Add the routing job kinds (once per registry). Stable studies are routed only when
    there are ``on = "stable"`` rules: otherwise a ``route`` job per study would do nothing."""
    known = {spec.kind for spec in registry.specs}
    if ROUTE not in known:
        stable_rules = any(route.on == "stable" for route in settings.routes.values())
        registry.register(ROUTE, _build_route, on_stable_study=stable_rules)
    if FORWARD not in known:
        registry.register(FORWARD, _build_forward)


def _build_route(archive: Archive, settings: Settings) -> JobHandler:
    def handle(job: JobRecord) -> None:
        study = job.payload.get("study_instance_uid") or job.study_instance_uid
        if not study:
            raise PermanentJobError("payload has no study_instance_uid")
        facts = study_facts(archive.db, study)
        if facts is None:
            log.info("stable study is gone; nothing to route", extra={"study": study})
            return
        deliveries = deliveries_for_study(settings, facts)
        if deliveries:
            archive.jobs.enqueue_many(
                [
                    (
                        FORWARD,
                        {
                            "study_instance_uid": study,
                            "destination": d.destination,
                            "route": d.route,
                        },
                        study,
                    )
                    for d in deliveries
                ]
            )
        log.info(
            "routed stable study",
            extra={"study": study, "deliveries": ",".join(d.destination for d in deliveries)},
        )

    return handle


def forward_items(archive: Archive, payload: dict[str, Any]) -> list[RetrieveItem]:
    study = payload.get("study_instance_uid")
    if not study:
        raise PermanentJobError("payload has no study_instance_uid")
    sops = tuple(payload.get("sop_instance_uids") or ())
    series = payload.get("series_instance_uid")
    if sops and series:
        keys = RetrieveKeys(
            model=RetrieveModel.STUDY_ROOT,
            level=RetrieveLevel.IMAGE,
            study_uids=(study,),
            series_uids=(series,),
            sop_instance_uids=sops,
        )
    else:
        keys = RetrieveKeys(
            model=RetrieveModel.STUDY_ROOT, level=RetrieveLevel.STUDY, study_uids=(study,)
        )
    return find_instances(archive.db, keys)


def _build_forward(archive: Archive, settings: Settings) -> JobHandler:
    forwarder = Forwarder(archive, settings)

    def handle(job: JobRecord) -> None:
        destination = job.payload.get("destination")
        if not destination:
            raise PermanentJobError("payload has no destination")
        items = forward_items(archive, job.payload)
        if not items:
            log.info("nothing left to forward (deleted?)", extra={"job": job.id})
            return
        try:
            forwarder.send(str(destination), items).raise_for_failures()
        except ForwardError as exc:
            if str(exc).startswith("unknown destination"):
                raise PermanentJobError(str(exc)) from exc
            raise

    return handle


def install_arrival_routes(archive: Archive, settings: Settings) -> None:
    """Match ``on = "arrival"`` rules against every instance as it is indexed."""
    routes = {name: r for name, r in sorted(settings.routes.items()) if r.on == "arrival"}
    if not routes:
        return

    def on_indexed(conn: Connection, parsed: ParsedInstance, calling_ae_title: str) -> None:
        jobs = []
        for name, route in routes.items():
            if route_instance(
                route,
                calling_ae_title=calling_ae_title,
                modality=parsed.series.get("modality"),
                sop_class_uid=parsed.sop_class_uid,
                body_part_examined=parsed.series.get("body_part_examined"),
                study_description=parsed.study.get("study_description"),
            ):
                jobs += [
                    (
                        FORWARD,
                        {
                            "study_instance_uid": parsed.study_instance_uid,
                            "series_instance_uid": parsed.series_instance_uid,
                            "sop_instance_uids": [parsed.sop_instance_uid],
                            "destination": destination,
                            "route": name,
                        },
                        parsed.study_instance_uid,
                    )
                    for destination in route.destinations
                ]
        if jobs:
            archive.jobs.enqueue_many(jobs, conn=conn)

    archive.ingestor.listeners.append(on_indexed)
