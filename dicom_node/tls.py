"""DICOM over TLS: the TLS contexts of the TLS port and of associations to peers flagged ``tls``.

DICOM PS3.15 Annex B.1 (Basic TLS Secure Transport Connection Profile) runs the DICOM Upper
Layer unchanged over a TLS connection, each side authenticating the other with X.509
certificates; B.9 (BCP 195 Non-Downgrading Profile) asks for BCP 195 (RFC 9325): TLS 1.2 or
later, never an earlier version, with the cipher suites it recommends, no compression and no
renegotiation. Both contexts here follow B.9, which B.1 peers that are up to date also meet.

Settings (``config.Settings``):

- ``dimse_tls_certificate`` / ``dimse_tls_private_key`` (``_password``): this node's identity,
  required for the TLS port, presented to peers that ask for a client certificate;
- ``dimse_tls_ca_certificates``: the CAs trusted. On the TLS port a client must then present a
  certificate one of them signed (``CERT_REQUIRED``); peers are verified against them (else
  against the system's CAs) and, with ``dimse_tls_check_hostname``, must present a certificate
  for the host they are declared with.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from config import Settings

#: TLS 1.2 cipher suites of RFC 9325 4.2 (AEAD with ephemeral elliptic-curve Diffie-Hellman;
#: no static RSA key exchange, 4.1), in OpenSSL's names;
#: TLS 1.3 suites are all AEAD and are left as OpenSSL enables them.
BCP195_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)


class TLSConfigurationError(ValueError):
    """The TLS settings cannot make a context (a file missing, unreadable, not PEM, a key that
    does not match its certificate); the message names the setting and the file."""


def _readable(path: Path | None, setting: str) -> Path:
    if path is None:
        raise TLSConfigurationError(f"PACSBRIDGE_{setting.upper()} is not set")
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise TLSConfigurationError(
            f"PACSBRIDGE_{setting.upper()}: cannot read {path}: {exc.strerror or exc}"
        ) from exc
    return path


def _harden(context: ssl.SSLContext) -> None:
    """BCP 195 (RFC 9325 3.1.1, 3.3, 3.5, 4.1): TLS 1.2 at least, AEAD suites with forward
    secrecy, no compression, no renegotiation."""
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(BCP195_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load_identity(context: ssl.SSLContext, settings: Settings) -> None:
    certificate = _readable(settings.dimse_tls_certificate, "dimse_tls_certificate")
    key = _readable(settings.dimse_tls_private_key, "dimse_tls_private_key")
    secret = settings.dimse_tls_private_key_password
    # An empty password rather than None: for an encrypted key OpenSSL would otherwise prompt
    # on the terminal; for a plain key a password is ignored.
    password = secret.get_secret_value() if secret is not None else ""
    try:
        context.load_cert_chain(certificate, key, password=password)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise TLSConfigurationError(
            f"PACSBRIDGE_DIMSE_TLS_CERTIFICATE {certificate} with PACSBRIDGE_DIMSE_TLS_PRIVATE_KEY "
            f"{key}: not a PEM certificate and its private key (or the key's password is "
            f"wrong): {exc}"
        ) from exc


def _load_trust(context: ssl.SSLContext, settings: Settings) -> None:
    bundle = _readable(settings.dimse_tls_ca_certificates, "dimse_tls_ca_certificates")
    try:
        context.load_verify_locations(cafile=bundle)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise TLSConfigurationError(
            f"PACSBRIDGE_DIMSE_TLS_CA_CERTIFICATES {bundle}: no PEM certificates: {exc}"
        ) from exc


def server_context(settings: Settings) -> ssl.SSLContext:
    """The context of the TLS port; raises :class:`TLSConfigurationError`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(context)
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    _load_identity(context, settings)
    if settings.dimse_tls_ca_certificates is not None:
        _load_trust(context, settings)
        # PS3.15 B.1: the acceptor authenticates the requestor by its certificate.
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(settings: Settings) -> ssl.SSLContext:
    """The context of associations to peers flagged ``tls``: the peer's certificate verified,
    ours presented when a certificate and key are set; raises :class:`TLSConfigurationError`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _harden(context)
    context.check_hostname = settings.dimse_tls_check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if settings.dimse_tls_ca_certificates is not None:
        _load_trust(context, settings)
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if settings.dimse_tls_certificate is not None or settings.dimse_tls_private_key is not None:
        _load_identity(context, settings)
    return context


class PeerTLS:
    """``tls_args`` for ``AE.associate`` to a peer: None for a plain peer, else the client
    context (made once, on first use) and the peer's host for its certificate check."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._context: ssl.SSLContext | None = None

    def context(self) -> ssl.SSLContext:
        if self._context is None:
            self._context = client_context(self.settings)
        return self._context

    def tls_args(self, tls: bool, host: str) -> tuple[ssl.SSLContext, str] | None:
        if not tls:
            return None
        # server_hostname without the brackets of an IPv6 literal: an IP address is matched
        # against the certificate's IP address entries (RFC 6125 does not cover them; OpenSSL
        # does).
        return self.context(), host.strip("[]")
