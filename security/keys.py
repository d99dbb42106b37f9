"""The built-in issuer's signing keys: ECDSA P-256 (JWS ``ES256``, RFC 7518 3.4), one PEM file
each in a folder of the data dir (created on first start, the folder 0700 and each file 0600).
The newest key signs; every key kept is published in the JWKS (RFC 7517) under its ``kid``, the
RFC 7638 thumbprint, so that tokens signed before a rotation stay valid until they expire.
:meth:`KeyStore.rotate` adds a key and keeps the one before it."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ALGORITHM = "ES256"
KEPT = 2
"""Keys kept by a rotation (the new one and the one before it)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey
    created: str

    @property
    def public_jwk(self) -> dict[str, str]:
        numbers = self.private.public_key().public_numbers()
        return {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
            "use": "sig",
            "alg": ALGORITHM,
            "kid": self.kid,
        }


def thumbprint(key: ec.EllipticCurvePrivateKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256) of the public key: its ``kid``."""
    numbers = key.public_key().public_numbers()
    members = {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64(hashlib.sha256(canonical).digest())


class KeyStore:
    """The signing keys in ``folder`` (``<created>-<kid>.pem``), loaded once."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()
        self._keys: list[SigningKey] | None = None

    def _load(self) -> list[SigningKey]:
        keys = []
        for path in sorted(self.folder.glob("*.pem")):
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(private, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{path}: not an EC private key")
            created = path.name.split("-", 1)[0]
            keys.append(SigningKey(thumbprint(private), private, created))
        return keys

    def keys(self) -> list[SigningKey]:
        """Oldest first; the first start creates one."""
        with self._lock:
            if self._keys is None:
                self._keys = self._load()
                if not self._keys:
                    self._write_new()
                    self._keys = self._load()
            return self._keys

    @property
    def signing(self) -> SigningKey:
        return self.keys()[-1]

    def find(self, kid: str) -> SigningKey | None:
        return next((key for key in self.keys() if key.kid == kid), None)

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk for key in self.keys()]}

    def rotate(self) -> SigningKey:
        """A new signing key; the keys older than the one it replaces are deleted."""
        with self._lock:
            self._write_new()
            paths = sorted(self.folder.glob("*.pem"))
            for old in paths[:-KEPT]:
                old.unlink()
            self._keys = self._load()
            return self._keys[-1]

    def _write_new(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        private = ec.generate_private_key(ec.SECP256R1())
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ")
        path = self.folder / f"{stamp}-{thumbprint(private)}.pem"
        # Created 0600 from the start (never readable by others, not even for a moment); O_EXCL:
        # two processes starting at once do not share a half-written file.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
