"""``/api/peers``: the remote DICOM AEs this node sends to (C-MOVE destinations), and what each
may do when it calls this node (``permissions``: the DIMSE services it may use; ``check_host``:
its associations must come from an address of its host; ``tls``: associations to it go over
TLS).

Peers from the configuration file are listed with ``"source": "config"`` and are read-only
here; peers created with ``PUT`` are stored in the index (``"source": "api"``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator

from archive import Archive
from archive.peers import InvalidPeer, PeerConflict, PeerNotFound, PeerRecord, PeerSource
from config.settings import (
    PEER_PERMISSIONS,
    PeerPermission,
    canonical_permissions,
    validate_ae_title,
    validate_host,
)

router = APIRouter(prefix="/api/peers", tags=["peers"])

PeerName = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
        description="1 to 64 letters, digits, '.', '_' or '-'",
    ),
]


class PeerIn(BaseModel):
    """A peer as ``PUT`` takes it. Types are strict (a port is a JSON integer: not ``true``,
    ``104.0`` or ``"104"``; the AE title and host are strings) and no other field is allowed,
    so that a mistyped body is refused (422) rather than stored as something else."""

    model_config = ConfigDict(strict=True, extra="forbid")

    ae_title: str = Field(
        description="1 to 16 characters (PS3.5 AE)", max_length=64, examples=["STORESCP"]
    )
    host: str = Field(description="host name or IP address", max_length=255, examples=["10.0.0.7"])
    port: int = Field(ge=1, le=65535, examples=[104])
    permissions: list[PeerPermission] = Field(
        default_factory=lambda: list(PEER_PERMISSIONS),
        description="the DIMSE services it may use when it calls us (default: all five); "
        "[] for a C-MOVE destination only",
        examples=[["echo", "store", "find", "move", "get"]],
    )
    check_host: bool = Field(
        default=False,
        description="its associations must come from an address its host resolves to",
    )
    tls: bool = Field(
        default=False,
        description="associations to it (C-MOVE destination, forwarding) go over TLS "
        "(DICOM PS3.15 B.1), with the PACSBRIDGE_DIMSE_TLS_* settings",
    )

    @field_validator("permissions")
    @classmethod
    def _permissions(cls, value: list[PeerPermission]) -> list[PeerPermission]:
        return canonical_permissions(value)

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return validate_host(value)


class PeerOut(BaseModel):
    name: str
    ae_title: str
    host: str
    port: int
    permissions: list[PeerPermission]
    check_host: bool
    tls: bool
    source: PeerSource
    created_at: datetime | None = None
    updated_at: datetime | None = None

    @classmethod
    def of(cls, record: PeerRecord) -> PeerOut:
        return cls(
            name=record.name,
            ae_title=record.ae_title,
            host=record.host,
            port=record.port,
            permissions=list(record.permissions),
            check_host=record.check_host,
            tls=record.tls,
            source=record.source,
            created_at=record.created_at,
            updated_at=record.updated_at,
        )


def _archive(request: Request) -> Archive:
    archive: Archive = request.app.state.archive
    return archive


@router.get("")
def list_peers(request: Request) -> list[PeerOut]:
    """Every peer: the configuration file's first, then the stored ones, each by name."""
    return [PeerOut.of(p) for p in _archive(request).peers.list()]


@router.get("/{name}", responses={404: {"description": "no such peer"}})
def get_peer(request: Request, name: PeerName) -> PeerOut:
    try:
        return PeerOut.of(_archive(request).peers.get(name))
    except PeerNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, exc.reason) from exc


@router.put(
    "/{name}",
    responses={
        201: {"description": "created"},
        409: {"description": "a configuration peer, or an AE title another peer has"},
        422: {"description": "invalid AE title, host, port, permissions, check_host or tls"},
    },
)
def put_peer(request: Request, response: Response, name: PeerName, peer: PeerIn) -> PeerOut:
    """Create the peer, or replace it (fields left out take their defaults). A C-MOVE names its
    destination by AE title, and an association its caller, so AE titles are unique among
    peers."""
    try:
        record, created = _archive(request).peers.put(
            name,
            peer.ae_title,
            peer.host,
            peer.port,
            peer.permissions,
            peer.check_host,
            peer.tls,
        )
    except PeerConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, exc.reason) from exc
    except InvalidPeer as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, exc.reason) from exc
    if created:
        response.status_code = status.HTTP_201_CREATED
    return PeerOut.of(record)


@router.delete(
    "/{name}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={404: {"description": "no such peer"}, 409: {"description": "configuration peer"}},
)
def delete_peer(request: Request, name: PeerName) -> None:
    try:
        _archive(request).peers.delete(name)
    except PeerConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, exc.reason) from exc
    except PeerNotFound as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, exc.reason) from exc
