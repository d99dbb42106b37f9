"""Settings and logging for pacsbridge (env vars ``PACSBRIDGE_*``, ``.env``, a TOML file)."""

from config.logging import configure_logging
from config.settings import (
    DestinationSettings,
    PeerSettings,
    RouteSettings,
    Settings,
    get_settings,
)

__all__ = [
    "DestinationSettings",
    "PeerSettings",
    "RouteSettings",
    "Settings",
    "configure_logging",
    "get_settings",
]
