"""pacsbridge: composition root (CLI, HTTP application, wiring of the parts)."""

__version__ = "0.1.0"
