"""Settings and logging for pacsbridge (env vars ``PACSBRIDGE_*``, ``.env``, a TOML file)."""

from config.logging import configure_logging, dump_stacks_on_sigusr1
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
    "dump_stacks_on_sigusr1",
    "get_settings",
]
