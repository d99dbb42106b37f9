"""Event delivery wiring: the dispatcher of a process that runs job workers, the settings
file's subscriptions, the envelope's source and links, and the FHIR rest-hook renderer."""

from __future__ import annotations

import logging
from typing import Any

from archive import Archive
from archive.subscriptions import SubscriptionError, Subscriptions
from config import Settings
from config.settings import EventSubscriptionSettings
from events import Dispatcher, Envelope, RestHookRender

log = logging.getLogger(__name__)


def envelope_for(settings: Settings) -> Envelope:
    """Source and link bases of the events this server sends: ``events.source``, else
    ``public_url``, else ``urn:pacsbridge:<AE title>``; links only where a base URL is
    configured (``fhir.base_url`` / ``public_url`` + ``/fhir``, ``dicomweb_base_url`` /
    ``public_url`` + ``/dicom-web``)."""
    public = settings.public_url.rstrip("/") if settings.public_url else None
    fhir_base = settings.fhir.base_url or (f"{public}/fhir" if public else None)
    dicomweb_base = (settings.dicomweb_base_url or "").rstrip("/") or (
        f"{public}/dicom-web" if public else None
    )
    return Envelope(
        source=settings.events.source or public or f"urn:pacsbridge:{settings.ae_title}",
        fhir_base=fhir_base if settings.fhir.enabled else None,
        dicomweb_base=dicomweb_base,
        include_phi=settings.events.include_phi,
    )


def toml_entry(entry: EventSubscriptionSettings) -> dict[str, Any]:
    """A ``[events.subscriptions.<name>]`` table as the fields of a stored subscription."""
    options: dict[str, Any] = {}
    if entry.exchange:
        options["exchange"] = entry.exchange
    if entry.max_attempts is not None:
        options["max_attempts"] = entry.max_attempts
    if entry.headers:
        options["headers"] = list(entry.headers)
    if entry.timeout is not None:
        options["timeout"] = entry.timeout
    return {
        "channel": entry.channel,
        "endpoint": entry.url,
        "event_types": list(entry.types),
        "secret": entry.secret,
        "options": options,
        "status": "active" if entry.enabled else "off",
    }


def sync_toml_subscriptions(archive: Archive, settings: Settings) -> None:
    """Store the settings file's subscriptions (``source = "toml"``); turn off those no
    longer in it."""
    entries = {name: toml_entry(e) for name, e in settings.events.subscriptions.items()}
    Subscriptions(archive.db).sync_toml(entries)


def rest_hook_render(archive: Archive, settings: Settings) -> RestHookRender | None:
    """The FHIR edge's answer to "does this resource match the criteria, and what is it":
    None where FHIR is off (rest-hook subscriptions then fail with a reason)."""
    if not settings.fhir.enabled:
        return None
    from fhir_bridge.subscription import rest_hook_renderer  # the FHIR edge, only when served

    return rest_hook_renderer(archive, settings)


def store_toml_subscriptions(archive: Archive, settings: Settings) -> None:
    """:func:`sync_toml_subscriptions`, its refusal a ``ValueError`` naming the setting."""
    try:
        sync_toml_subscriptions(archive, settings)
    except SubscriptionError as exc:
        raise ValueError(f"events.subscriptions: {exc.reason}") from exc


def build_dispatcher(
    archive: Archive, settings: Settings, name: str, *, sync: bool = True
) -> Dispatcher | None:
    """The dispatcher of a process that delivers events (None with ``events.enabled`` off),
    after storing the settings file's subscriptions (unless ``sync`` is off: the process
    that started this one stored them)."""
    if not settings.events.enabled:
        return None
    if sync:
        store_toml_subscriptions(archive, settings)
    dispatcher = Dispatcher(
        Subscriptions(archive.db),
        settings.events,
        envelope_for(settings),
        name=f"{name}:events",
        rest_hook_render=rest_hook_render(archive, settings),
    )
    return dispatcher
