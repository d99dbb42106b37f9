"""The peer registry: remote DICOM AEs this node sends to (C-MOVE destinations), and the calling
AE titles it grants DIMSE services to (``permissions``; ``dicom_node.access`` applies them).

Two sources, one view:

- **config**: ``[peers.<name>]`` in the TOML file (``Settings.peers``). Each process reads its
  own configuration; these peers are never written to the index and are read-only over the API.
- **api**: peers created over ``/api/peers``, stored in the ``peer`` table, so that every process
  on the index sees them at once.

A name or an AE title belongs to one peer only. Config wins: an API peer cannot take a name or
an AE title that the configuration declares, and a stored peer whose name or AE title a later
configuration declares is hidden (the configuration is what the operator deployed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from archive.db import Database
from archive.models import Peer
from config import PeerSettings
from config.settings import (
    PEER_PERMISSIONS,
    PeerPermission,
    canonical_permissions,
    validate_ae_title,
    validate_host,
    validate_peer_name,
)

PeerSource = Literal["config", "api"]


class PeerError(Exception):
    """Base of the registry's errors; ``reason`` is meant for the API client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class PeerNotFound(PeerError, KeyError):
    pass


class PeerConflict(PeerError):
    """The change collides with a config peer or another peer's AE title (HTTP 409)."""


class InvalidPeer(PeerError, ValueError):
    """A field breaks its rule (HTTP 422)."""


@dataclass(frozen=True, slots=True)
class PeerRecord:
    name: str
    ae_title: str
    host: str
    port: int
    source: PeerSource
    created_at: datetime | None = None
    updated_at: datetime | None = None
    permissions: tuple[PeerPermission, ...] = PEER_PERMISSIONS
    """The DIMSE services it may use as a calling AE (``config.settings.PEER_PERMISSIONS``)."""
    check_host: bool = False
    """Its associations must come from an address of ``host``."""
    tls: bool = False
    """Associations to it (C-MOVE destination, forwarding) go over TLS (DICOM PS3.15 B.1)."""


def validate_permissions(permissions: object) -> tuple[PeerPermission, ...]:
    """Checked permissions (a list of names), in their canonical order; raises
    :class:`InvalidPeer`."""
    if not isinstance(permissions, (list, tuple)) or not all(
        isinstance(p, str) for p in permissions
    ):
        raise InvalidPeer(f"permissions are a list of {', '.join(PEER_PERMISSIONS)}")
    try:
        return tuple(canonical_permissions(permissions))
    except ValueError as exc:
        raise InvalidPeer(str(exc)) from exc


def _stored_permissions(value: str) -> tuple[PeerPermission, ...]:
    """The ``peer.permissions`` column (comma-separated) as a tuple; a name this version does
    not know is dropped rather than granted."""
    names = [p for p in value.split(",") if p]
    return tuple(p for p in PEER_PERMISSIONS if p in names)


def validate_peer(name: str, ae_title: str, host: str, port: int) -> tuple[str, str, int]:
    """Checked (AE title, host, port) for a peer called ``name``; raises :class:`InvalidPeer`."""
    try:
        validate_peer_name(name)
        ae_title = validate_ae_title(ae_title)
        host = validate_host(host)
    except ValueError as exc:
        raise InvalidPeer(str(exc)) from exc
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidPeer("a port is a number from 1 to 65535")
    return ae_title, host, port


class PeerRegistry:
    def __init__(self, db: Database, configured: Mapping[str, PeerSettings]) -> None:
        self.db = db
        self.configured = {
            name: PeerRecord(
                name,
                peer.ae_title,
                peer.host,
                peer.port,
                "config",
                permissions=tuple(peer.permissions),
                check_host=peer.check_host,
                tls=peer.tls,
            )
            for name, peer in sorted(configured.items())
        }
        self._config_titles = {p.ae_title: p.name for p in self.configured.values()}

    def _visible(self, peer: Peer) -> bool:
        return peer.name not in self.configured and peer.ae_title not in self._config_titles

    @staticmethod
    def _record(peer: Peer) -> PeerRecord:
        return PeerRecord(
            peer.name,
            peer.ae_title,
            peer.host,
            peer.port,
            "api",
            _utc(peer.created_at),
            _utc(peer.updated_at),
            _stored_permissions(peer.permissions),
            bool(peer.check_host),
            bool(peer.tls),
        )

    def list(self) -> list[PeerRecord]:
        """Every peer, config ones first, each group by name."""
        with self.db.session() as s:
            stored = s.scalars(select(Peer).order_by(Peer.name)).all()
        return [*self.configured.values(), *(self._record(p) for p in stored if self._visible(p))]

    def get(self, name: str) -> PeerRecord:
        if name in self.configured:
            return self.configured[name]
        with self.db.session() as s:
            peer = s.scalar(select(Peer).where(Peer.name == name))
        if peer is None or not self._visible(peer):
            raise PeerNotFound(f"no peer named {name!r}")
        return self._record(peer)

    def by_ae_title(self, ae_title: str) -> PeerRecord | None:
        """The peer a C-MOVE names as its Move Destination, or the peer an association's Calling
        AE Title declares (AE titles compare exactly, without the non-significant
        leading/trailing spaces)."""
        ae_title = ae_title.strip()
        if ae_title in self._config_titles:
            return self.configured[self._config_titles[ae_title]]
        with self.db.session() as s:
            peer = s.scalar(select(Peer).where(Peer.ae_title == ae_title))
        if peer is None or not self._visible(peer):
            return None
        return self._record(peer)

    def put(
        self,
        name: str,
        ae_title: str,
        host: str,
        port: int,
        permissions: Sequence[str] = PEER_PERMISSIONS,
        check_host: bool = False,
        tls: bool = False,
    ) -> tuple[PeerRecord, bool]:
        """Create or replace the API peer ``name``; returns it and whether it was created."""
        ae_title, host, port = validate_peer(name, ae_title, host, port)
        granted = validate_permissions(permissions)
        if not isinstance(check_host, bool):
            raise InvalidPeer("check_host is true or false")
        if not isinstance(tls, bool):
            raise InvalidPeer("tls is true or false")
        if name in self.configured:
            raise PeerConflict(
                f"peer {name!r} is declared in the configuration file; edit it there"
            )
        if ae_title in self._config_titles:
            raise PeerConflict(
                f"AE title {ae_title!r} belongs to peer {self._config_titles[ae_title]!r} "
                "of the configuration file"
            )
        now = datetime.now(UTC)
        try:
            with self.db.write_session() as s:
                other = s.scalar(select(Peer).where(Peer.ae_title == ae_title, Peer.name != name))
                if other is not None:
                    raise PeerConflict(f"AE title {ae_title!r} belongs to peer {other.name!r}")
                peer = s.scalar(select(Peer).where(Peer.name == name))
                created = peer is None
                if peer is None:
                    peer = Peer(name=name, created_at=now)
                    s.add(peer)
                peer.ae_title, peer.host, peer.port, peer.updated_at = ae_title, host, port, now
                peer.permissions, peer.check_host = ",".join(granted), check_host
                peer.tls = tls
                s.flush()
                record = self._record(peer)
        except IntegrityError as exc:
            # Another process created the same name or AE title between our check and insert.
            raise PeerConflict(
                f"peer {name!r} or AE title {ae_title!r} was just taken; try again"
            ) from exc
        return record, created

    def delete(self, name: str) -> None:
        if name in self.configured:
            raise PeerConflict(
                f"peer {name!r} is declared in the configuration file; remove it there"
            )
        with self.db.write_session() as s:
            deleted = s.scalars(delete(Peer).where(Peer.name == name).returning(Peer.id)).all()
        if not deleted:
            raise PeerNotFound(f"no peer named {name!r}")


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; every timestamp here is written in UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
