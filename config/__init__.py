"""Settings and logging for pacsbridge (env vars ``PACSBRIDGE_*``, ``.env``, a TOML file)."""

from config.logging import configure_logging
from config.settings import PeerSettings, Settings, get_settings

__all__ = ["PeerSettings", "Settings", "configure_logging", "get_settings"]
