"""Webhooks: an HTTP POST of the event's envelope, signed.

Headers: ``Content-Type: application/json``, ``X-Pacsbridge-Event`` (the type),
``X-Pacsbridge-Delivery`` (the event id, the same on every retry: de-duplicate on it),
``X-Pacsbridge-Timestamp`` (Unix seconds) and, for a subscription with a secret,
``X-Pacsbridge-Signature: sha256=<hex HMAC-SHA256(secret, timestamp + "." + body)>``
(:func:`events.envelope.signature`). A 2xx answer delivers the event; any other answer or a
timeout fails it (retried with back-off, ``dead`` after the subscription's most attempts); a
refused connection or an unknown host fails the channel (the batch waits, nothing is lost).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx

from archive.subscriptions import EventRecord, mask_url
from events.channel import ChannelDown
from events.envelope import signature


def extra_headers(lines: Sequence[str]) -> dict[str, str]:
    """``"Name: value"`` lines as a header mapping."""
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip():
            headers[name.strip()] = value.strip()
    return headers


class WebhookChannel:
    def __init__(
        self,
        url: str,
        *,
        secret: str | None = None,
        timeout: float = 10.0,
        headers: Sequence[str] = (),
    ) -> None:
        self.url = url
        self.secret = secret
        self.headers = extra_headers(headers)
        self.client = httpx.Client(
            timeout=httpx.Timeout(timeout), follow_redirects=False, trust_env=False
        )

    def deliver(self, event: EventRecord, body: bytes) -> str | None:
        timestamp = str(int(time.time()))
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "User-Agent": "pacsbridge-events",
            "X-Pacsbridge-Event": event.type,
            "X-Pacsbridge-Delivery": event.event_id,
            "X-Pacsbridge-Timestamp": timestamp,
        }
        if self.secret:
            headers["X-Pacsbridge-Signature"] = signature(self.secret, timestamp, body)
        return post(self.client, "POST", self.url, body, headers)

    def idle(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()


def post(
    client: httpx.Client, method: str, url: str, body: bytes, headers: dict[str, str]
) -> str | None:
    """Send one request: None on 2xx, the reason on another answer or a timeout;
    :class:`ChannelDown` when the host cannot be reached at all."""
    # What a failure says is shown by the API, the CLI, FHIR Subscription.error and the logs:
    # the URL without its password and query (a token may ride there), the answer's status
    # without its body.
    shown = f"{method} {mask_url(url).split('?', 1)[0]}"
    try:
        answer = client.request(method, url, content=body, headers=headers)
    except (httpx.ConnectError, httpx.UnsupportedProtocol) as exc:
        raise ChannelDown(f"{shown}: {type(exc).__name__}"[:500]) from exc
    except httpx.HTTPError as exc:
        return f"{shown}: {type(exc).__name__}"[:500]
    if 200 <= answer.status_code < 300:
        return None
    return f"{shown}: HTTP {answer.status_code} {answer.reason_phrase}".strip()
