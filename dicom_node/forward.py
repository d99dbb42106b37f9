"""Sending stored instances on: C-STORE to a DIMSE peer, STOW-RS to a DICOMweb service, or an
Orthanc server's REST API (``orthanc-api-client``). Used by routing and ``pacsbridge send``.

Every send is all-or-error: a destination that is down or refuses an instance raises
:class:`ForwardError`, the job fails and is retried later; instances already delivered are
simply sent again (receivers treat a known SOP Instance UID as a duplicate).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from pynetdicom import AE
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from archive import Archive
from archive.instance_io import inflate_limit
from archive.peers import PeerNotFound
from archive.retrieve import RetrieveItem
from config import DestinationSettings, Settings
from dicom_node.retrieve import (
    StoreSubOperation,
    SubOperationFailed,
    SubOperationSender,
    proposed_contexts,
)
from dicom_node.tls import PeerTLS, TLSConfigurationError

log = logging.getLogger(__name__)


class ForwardError(Exception):
    """The destination did not take every instance; the job is retried."""


@dataclass
class SendReport:
    destination: str
    sent: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    def raise_for_failures(self) -> None:
        if self.failed:
            first_sop, first_reason = self.failed[0]
            raise ForwardError(
                f"{len(self.failed)} of {self.sent + len(self.failed)} instances not delivered "
                f"to {self.destination}; first: {first_sop}: {first_reason}"
            )


class Forwarder:
    def __init__(self, archive: Archive, settings: Settings) -> None:
        self.archive = archive
        self.settings = settings
        # Peers flagged ``tls`` are sent to over TLS (PS3.15 B.1).
        self.peer_tls = PeerTLS(settings)

    def destination(self, name: str) -> DestinationSettings:
        """A ``[destinations.<name>]`` entry, or a peer of that name as a DIMSE destination."""
        if name in self.settings.destinations:
            return self.settings.destinations[name]
        try:
            self.archive.peers.get(name)
        except PeerNotFound:
            raise ForwardError(
                f"unknown destination {name!r}: not a destination nor a peer"
            ) from None
        return DestinationSettings(peer=name)

    def send(self, name: str, items: list[RetrieveItem]) -> SendReport:
        destination = self.destination(name)
        report = SendReport(name)
        if not items:
            return report
        if destination.peer:
            self._send_dimse(destination, items, report)
        elif destination.stow_url:
            self._send_stow(destination, items, report)
        else:
            self._send_orthanc(destination, items, report)
        log.info(
            "forwarded",
            extra={"destination": name, "sent": report.sent, "failed": len(report.failed)},
        )
        return report

    # --- DIMSE ---------------------------------------------------------------------------
    def _send_dimse(
        self, destination: DestinationSettings, items: list[RetrieveItem], report: SendReport
    ) -> None:
        assert destination.peer is not None
        try:
            peer = self.archive.peers.get(destination.peer)
        except PeerNotFound:
            raise ForwardError(f"unknown peer {destination.peer!r}") from None
        try:
            tls_args = self.peer_tls.tls_args(peer.tls, peer.host)
        except TLSConfigurationError as exc:
            raise ForwardError(f"peer {peer.name!r} needs TLS: {exc}") from exc
        for start in range(0, len(items), destination.batch_size * 20):
            batch = items[start : start + destination.batch_size * 20]
            ae = AE(ae_title=self.settings.ae_title)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = destination.timeout
            assoc = ae.associate(
                peer.host,
                peer.port,
                contexts=proposed_contexts(batch),
                ae_title=peer.ae_title,
                tls_args=tls_args,
            )
            if not assoc.is_established:
                over = " over TLS" if tls_args is not None else ""
                raise ForwardError(
                    f"{peer.ae_title}@{peer.host}:{peer.port} did not accept an association{over}"
                )
            try:
                sender = SubOperationSender(
                    assoc,
                    self.archive.blobs,
                    ae_title=self.settings.ae_title,
                    max_inflated=inflate_limit(self.settings),
                )
                for item in batch:
                    try:
                        status = sender.send_c_store(StoreSubOperation(item))
                    except SubOperationFailed as exc:
                        report.failed.append((item.sop_instance_uid, str(exc)))
                        continue
                    code = int(getattr(status, "Status", 0xC000)) if status else 0xC000
                    # Success or a warning: stored (PS3.4 B.2.3).
                    if code_to_category(code) in (STATUS_SUCCESS, STATUS_WARNING):
                        report.sent += 1
                    else:
                        comment = str(getattr(status, "ErrorComment", "")) if status else ""
                        report.failed.append(
                            (item.sop_instance_uid, f"status 0x{code:04X} {comment}".strip())
                        )
                    if not assoc.is_established:
                        raise ForwardError(f"{peer.ae_title} dropped the association")
            finally:
                if assoc.is_established:
                    assoc.release()

    # --- STOW-RS -------------------------------------------------------------------------
    def _http_client(self, destination: DestinationSettings) -> httpx.Client:
        auth = (destination.username, destination.password or "") if destination.username else None
        return httpx.Client(
            auth=auth,
            headers=destination.headers,
            timeout=destination.timeout,
            follow_redirects=True,
        )

    def _send_stow(
        self, destination: DestinationSettings, items: list[RetrieveItem], report: SendReport
    ) -> None:
        assert destination.stow_url is not None
        url = destination.stow_url.rstrip("/") + "/studies"
        with self._http_client(destination) as client:
            for start in range(0, len(items), destination.batch_size):
                batch = items[start : start + destination.batch_size]
                boundary = f"pacsbridge-{uuid.uuid4().hex}"
                try:
                    response = client.post(
                        url,
                        content=self._multipart(batch, boundary),
                        headers={
                            "Content-Type": (
                                f'multipart/related; type="application/dicom"; boundary={boundary}'
                            ),
                            "Accept": "application/dicom+json",
                        },
                    )
                except httpx.HTTPError as exc:
                    raise ForwardError(f"STOW-RS to {url} failed: {exc}") from exc
                self._stow_result(response, batch, report)

    def _multipart(self, batch: list[RetrieveItem], boundary: str) -> Iterator[bytes]:
        """The STOW-RS body (PS3.18 10.5.1.1), streamed from the blob store."""
        for item in batch:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield from self.archive.blobs.open(item.blob_key)
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    @staticmethod
    def _stow_result(
        response: httpx.Response, batch: list[RetrieveItem], report: SendReport
    ) -> None:
        if response.status_code == 200:
            report.sent += len(batch)
            return
        failed: dict[str, str] = {}
        if response.status_code in (202, 409):
            failed = _failed_sops(response)
        if response.status_code == 202:
            for item in batch:
                if item.sop_instance_uid in failed:
                    report.failed.append((item.sop_instance_uid, failed[item.sop_instance_uid]))
                else:
                    report.sent += 1
            return
        reason = f"HTTP {response.status_code}: {response.text[:200]}"
        for item in batch:
            report.failed.append((item.sop_instance_uid, failed.get(item.sop_instance_uid, reason)))

    # --- Orthanc -------------------------------------------------------------------------
    def _send_orthanc(
        self, destination: DestinationSettings, items: list[RetrieveItem], report: SendReport
    ) -> None:
        from orthanc_api_client import OrthancApiClient
        from orthanc_api_client.exceptions import HttpError

        assert destination.orthanc_url is not None
        client = OrthancApiClient(
            destination.orthanc_url,
            user=destination.username,
            pwd=destination.password,
            headers=destination.headers or None,
        )
        try:
            for item in items:
                try:
                    client.upload(self.archive.blobs.read(item.blob_key))
                except HttpError as exc:
                    report.failed.append((item.sop_instance_uid, f"Orthanc refused it: {exc}"))
                    continue
                except Exception as exc:  # connection refused, timeouts (requests errors)
                    raise ForwardError(f"Orthanc at {destination.orthanc_url}: {exc}") from exc
                report.sent += 1
        finally:
            client.close()


def _failed_sops(response: httpx.Response) -> dict[str, str]:
    """SOP Instance UID -> reason from a STOW-RS response's FailedSOPSequence (PS3.18 10.5.3)."""
    try:
        body: Any = response.json()
    except ValueError:
        return {}
    failed: dict[str, str] = {}
    for item in (body or {}).get("00081198", {}).get("Value", []):
        sop = (item.get("00081155", {}).get("Value") or [""])[0]
        reason = (item.get("00081197", {}).get("Value") or [None])[0]
        failed[sop] = f"FailureReason 0x{reason:04X}" if isinstance(reason, int) else "failed"
    return failed
