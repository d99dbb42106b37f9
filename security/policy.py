"""When HTTP needs a token (``auth`` setting), and refusing to listen on a network unprotected
(Orthanc's rule: safe on a laptop, refusing to be unsafe when exposed)."""

from __future__ import annotations

import ipaddress
import logging

from config import Settings

log = logging.getLogger(__name__)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def http_auth_enforced(settings: Settings) -> bool:
    return settings.auth == "required"


def exposure_error(settings: Settings) -> str | None:
    """Why ``serve`` must not start with these settings (None: it may), and the warning of an
    explicit ``auth = off``."""
    if settings.auth == "off":
        log.warning(
            "HTTP authentication is OFF (PACSBRIDGE_AUTH=off): anyone who reaches "
            f"{settings.http_host}:{settings.http_port} reads and writes every patient's data"
        )
        return None
    if settings.auth == "auto" and not is_loopback(settings.http_host):
        return (
            f"HTTP would listen on {settings.http_host} without authentication. Turn it on with "
            "PACSBRIDGE_AUTH=required (and add users: pacsbridge users add NAME --role ROLE), "
            "listen on 127.0.0.1 only, or, on a network trusted as a whole, set "
            "PACSBRIDGE_AUTH=off explicitly"
        )
    return None
