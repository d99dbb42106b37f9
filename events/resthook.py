"""The FHIR R4 Subscription rest-hook channel (FHIR R4 4.0.1 subscription.html, 2.46.7).

An event whose ``resource`` (``ServiceRequest/…``, ``ImagingStudy/…``) matches the
subscription's criteria (asked of ``render``, which the FHIR edge provides: the resource's
JSON when it matches, else None) is notified to the subscriber's endpoint:

- without ``Subscription.channel.payload``: a POST with an empty body to the endpoint;
- with a payload MIME type (``application/fhir+json``): the endpoint is the subscriber's
  service base and the resource is sent as an update, PUT ``[endpoint]/[type]/[id]``
  (R4 ValueSet subscription-channel-type, ``rest-hook``).

``Subscription.channel.header`` values (``options["headers"]``) go with each request.
A refused connection holds the batch; another failure fails the event (retried, then dead,
and the Subscription's status becomes ``error``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from archive.subscriptions import EventRecord
from events.webhook import extra_headers, post

RestHookRender = Callable[[str, str], dict[str, Any] | None]
"""(criteria, FHIR reference ``Type/id``) → the resource's JSON when it matches, else None."""


class RestHookChannel:
    def __init__(
        self,
        endpoint: str,
        criteria: str,
        render: RestHookRender | None,
        *,
        payload: str | None = None,
        headers: Sequence[str] = (),
        timeout: float = 10.0,
    ) -> None:
        self.endpoint = endpoint
        self.criteria = criteria
        self.render = render
        self.payload = payload
        self.headers = extra_headers(headers)
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False
        )

    def deliver(self, event: EventRecord, body: bytes) -> str | None:
        if not event.resource or "/" not in event.resource:
            return None  # nothing a FHIR criteria could select
        if self.criteria.partition("?")[0] != event.resource.partition("/")[0]:
            return None  # criteria select one resource type (R4 Subscription.criteria)
        if self.render is None:
            return "FHIR rest-hook subscriptions are not served by this process (FHIR is off)"
        # The version the event announces, where it names one: a resource changed again since
        # is notified by the later change's own event, in the state it then has.
        version = (event.data or {}).get("version")
        reference = event.resource if version is None else f"{event.resource}/_history/{version}"
        try:
            resource = self.render(self.criteria, reference)
        except Exception as exc:  # a criteria the search engine refuses, a read that failed
            return f"criteria {self.criteria!r}: {type(exc).__name__}: {exc}"[:500]
        if resource is None:
            return None  # it does not match: no notification
        headers = {**self.headers, "User-Agent": "pacsbridge-events"}
        if not self.payload:
            return post(self.client, "POST", self.endpoint, b"", headers)
        if "json" not in self.payload:
            return f"payload MIME type {self.payload!r} is not supported (only FHIR JSON)"
        type_, _, id_ = event.resource.partition("/")
        headers["Content-Type"] = self.payload
        url = f"{self.endpoint.rstrip('/')}/{type_}/{id_}"
        return post(self.client, "PUT", url, json.dumps(resource).encode("utf-8"), headers)

    def idle(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()
