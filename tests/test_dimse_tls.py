"""DICOM over TLS (PS3.15 B.1 Basic TLS, B.9 BCP 195 non-downgrading): the TLS port of a
running ``pacsbridge serve`` driven by DCMTK (``echoscu``/``storescu``/``findscu``/``movescu``
with ``+tls``) and Python's ``ssl``, and peers flagged ``tls`` reached over TLS (a DCMTK
``storescp +tls`` as C-MOVE destination and forwarding target).

Every certificate is made here, at test time, with ``cryptography``: a test CA, the node's
certificate, a modality's client certificate, a peer's certificate, and a stranger's CA with
a client certificate of its own.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    Verification,
)

from archive.blobstore import instance_key
from archive.retrieve import RetrieveKeys, RetrieveModel, find_instances
from config import PeerSettings, Settings
from dicom_node.forward import Forwarder, ForwardError, SendReport
from dicom_node.tls import TLSConfigurationError, client_context, server_context
from tests.conftest import (
    VENV_BIN,
    RunningServer,
    _backend,
    free_port,
    require_tool,
    start_server,
    wait_for_port,
)
from tests.dicom_factory import write_series

pytestmark = pytest.mark.dcmtk

NOT_AUTHORIZED = 0x0124
#: Calling AE titles the configuration declares (C-FIND and C-MOVE only from declared peers).
WORKSTATION = "TLSWS"


# --- a test PKI -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    certificate: Path
    key: Path


@dataclass(frozen=True)
class PKI:
    ca: Path
    node: Identity
    modality: Identity
    peer: Identity
    stranger_ca: Path
    stranger: Identity
    impostor: Identity
    """A server certificate for 127.0.0.1 from the stranger's CA."""


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pacsbridge tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _authority(directory: Path, name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return certificate, key


def _issue(
    directory: Path,
    name: str,
    authority: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
) -> Identity:
    ca_certificate, ca_key = authority
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    certificate = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False).sign(
        ca_key, hashes.SHA256()
    )
    identity = Identity(directory / f"{name}.crt", directory / f"{name}.key")
    identity.certificate.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    _write_key(key, identity.key)
    return identity


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    authority = _authority(directory, "test-ca")
    stranger_authority = _authority(directory, "stranger-ca")
    return PKI(
        ca=directory / "test-ca.pem",
        # The node's certificate serves the TLS port and is its client certificate to peers.
        node=_issue(directory, "pacsbridge", authority, server=True),
        modality=_issue(directory, "modality", authority, server=False),
        peer=_issue(directory, "peer-scp", authority, server=True),
        stranger_ca=directory / "stranger-ca.pem",
        stranger=_issue(directory, "stranger", stranger_authority, server=False),
        impostor=_issue(directory, "impostor", stranger_authority, server=True),
    )


# --- the server -------------------------------------------------------------------------------


@dataclass
class TLSServer:
    running: RunningServer
    tls_port: int
    settings: Settings

    @property
    def ae_title(self) -> str:
        return self.running.ae_title


def _tls_settings(pki: PKI) -> dict[str, object]:
    return {
        "dimse_tls_certificate": str(pki.node.certificate),
        "dimse_tls_private_key": str(pki.node.key),
        "dimse_tls_ca_certificates": str(pki.ca),
    }


@pytest.fixture(scope="module")
def tls_server(
    pki: PKI, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[TLSServer]:
    directory = tmp_path_factory.mktemp("tls-server")
    tls_port = free_port()
    config = directory / "pacsbridge.toml"
    config.write_text(
        f'[peers.workstation]\nae_title = "{WORKSTATION}"\nhost = "127.0.0.1"\nport = 104\n',
        encoding="utf-8",
    )
    backend = _backend(
        "sqlite",
        "file",
        directory,
        request,
        dimse_query_from_any_ae=False,
        worker_in_serve=False,
        dimse_tls_port=tls_port,
        **_tls_settings(pki),
    )
    running = start_server(
        backend,
        directory,
        PACSBRIDGE_CONFIG=str(config),
        # The plain port hands connections to a second process; the TLS port stays in the first.
        PACSBRIDGE_DIMSE_PROCESSES="2",
    )
    try:
        wait_for_port(tls_port, timeout=10, proc=running.proc)
        yield TLSServer(running, tls_port, backend.settings)
    finally:
        assert running.stop() == 0, running.log()[-3000:]


# --- DCMTK ------------------------------------------------------------------------------------


def dcmtk(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = require_tool(argv[0])
    return subprocess.run(
        [exe, *argv[1:]],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def output(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def tls_options(identity: Identity | None, ca: Path) -> list[str]:
    """DCMTK's TLS options: ``+tls KEY CERT`` (or ``+tla``, no certificate), the CA that
    signed the server's certificate (``+cf``); ``-pw``: the key has no password."""
    presented = ["+tls", str(identity.key), str(identity.certificate), "-pw"] if identity else []
    return [*(presented or ["+tla"]), "+cf", str(ca)]


def echoscu(
    server: TLSServer, options: list[str], port: int | None = None, calling: str = "MODALITY"
) -> subprocess.CompletedProcess[str]:
    return dcmtk(
        "echoscu",
        "-v",
        "-aet",
        calling,
        "-aec",
        server.ae_title,
        *options,
        "127.0.0.1",
        str(port or server.tls_port),
    )


def _tls_client(pki: PKI, identity: Identity | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if identity is not None:
        context.load_cert_chain(identity.certificate, identity.key)
    return context


def _stored(server: TLSServer, path: Path) -> Dataset:
    """The instance of ``path`` as the archive holds it (KeyError when it does not)."""
    sent = pydicom.dcmread(path, stop_before_pixels=True)
    archive = server.running.archive()
    try:
        key = instance_key(sent.StudyInstanceUID, sent.SeriesInstanceUID, sent.SOPInstanceUID)
        data = archive.blobs.read(key)
    finally:
        archive.close()
    return pydicom.dcmread(pydicom.filebase.DicomBytesIO(data))


# --- the TLS port -----------------------------------------------------------------------------


def test_echoscu_over_tls(tls_server: TLSServer, pki: PKI):
    result = echoscu(tls_server, tls_options(pki.modality, pki.ca))
    assert result.returncode == 0, output(result)
    assert "Received Echo Response (Success)" in output(result), output(result)


def test_storescu_over_tls_stores_the_instances(tls_server: TLSServer, pki: PKI, tmp_path: Path):
    files = write_series(tmp_path / "series", 3, size=16, patient_id="TLS-STORE")
    result = dcmtk(
        "storescu",
        "-v",
        "-aet",
        "MODALITY",
        "-aec",
        tls_server.ae_title,
        *tls_options(pki.modality, pki.ca),
        "127.0.0.1",
        str(tls_server.tls_port),
        *map(str, files),
    )
    assert result.returncode == 0, output(result)
    for path in files:
        sent = pydicom.dcmread(path)
        stored = _stored(tls_server, path)
        assert stored.SOPInstanceUID == sent.SOPInstanceUID
        assert stored.PatientID == "TLS-STORE"
        assert stored.PixelData == sent.PixelData
        # Who sent it, as for the plain port (PS3.10 7.1 Source Application Entity Title).
        assert stored.file_meta.SourceApplicationEntityTitle == "MODALITY"


def test_a_client_certificate_from_another_ca_is_refused(tls_server: TLSServer, pki: PKI):
    result = echoscu(tls_server, tls_options(pki.stranger, pki.ca))
    assert result.returncode != 0, output(result)
    assert "Received Echo Response" not in output(result)
    assert "Association Request Failed" in output(result), output(result)
    # Python's client sees the alert the server sends: unknown CA (RFC 8446 6.2).
    with (
        socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10) as raw,
        pytest.raises(ssl.SSLError) as refused,
        _tls_client(pki, pki.stranger).wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.recv(1)  # TLS 1.3: the client's certificate is judged after its Finished
    assert "UNKNOWN_CA" in str(refused.value).upper(), refused.value
    # ... and the server goes on serving.
    good = echoscu(tls_server, tls_options(pki.modality, pki.ca))
    assert good.returncode == 0, output(good)


def test_a_client_without_certificate_is_refused(tls_server: TLSServer, pki: PKI):
    """``dimse_tls_ca_certificates`` is set: a client certificate is required (CERT_REQUIRED)."""
    result = echoscu(tls_server, tls_options(None, pki.ca))
    assert result.returncode != 0, output(result)
    assert "Received Echo Response" not in output(result)


def test_the_client_refuses_a_server_it_does_not_trust(tls_server: TLSServer, pki: PKI):
    """DCMTK verifies our certificate (its default ``-rc``) against the CA it is given."""
    result = echoscu(tls_server, tls_options(pki.modality, pki.stranger_ca))
    assert result.returncode != 0, output(result)
    assert "Received Echo Response" not in output(result)


def test_a_plain_client_on_the_tls_port_fails_cleanly(tls_server: TLSServer, pki: PKI):
    plain = echoscu(tls_server, [])
    assert plain.returncode != 0, output(plain)
    assert "Received Echo Response" not in output(plain)
    # A connection that says nothing holds no one else up: the handshake runs on the
    # connection's own thread, not where the port accepts.
    with socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10):
        result = echoscu(tls_server, tls_options(pki.modality, pki.ca))
        assert result.returncode == 0, output(result)
    # The plain port is untouched.
    assert echoscu(tls_server, [], port=tls_server.running.dimse_port).returncode == 0


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_below_1_2_is_refused(tls_server: TLSServer, pki: PKI):
    """PS3.15 B.9 (BCP 195, RFC 8996): TLS 1.0 and 1.1 are never negotiated. (DCMTK has no
    option to offer only those: Python's client is made to.)"""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(pki.ca)
    old.load_cert_chain(pki.modality.certificate, pki.modality.key)
    # OpenSSL's security level 0 lets this client offer TLS 1.0/1.1 at all.
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    with (
        socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10) as raw,
        pytest.raises(ssl.SSLError) as refused,
    ):
        old.wrap_socket(raw, server_hostname="localhost")
    # The server's alert (RFC 8446 6.2 protocol_version), not a client that offered nothing.
    assert "ALERT_PROTOCOL_VERSION" in str(refused.value).upper(), refused.value

    # TLS 1.2 itself is accepted.
    twelve = _tls_client(pki, pki.modality)
    twelve.maximum_version = ssl.TLSVersion.TLSv1_2
    with (
        socket.create_connection(("127.0.0.1", tls_server.tls_port), timeout=10) as raw,
        twelve.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.2"
        cipher, _, _ = tls.cipher()  # type: ignore[misc]
        assert "GCM" in cipher or "CHACHA20" in cipher, cipher


def _pynetdicom_tls(pki: PKI) -> tuple[ssl.SSLContext, str]:
    return _tls_client(pki, pki.modality), "localhost"


def _find(server: TLSServer, pki: PKI, calling: str, study_uid: str) -> list[int]:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    ae.add_requested_context(Verification)
    assoc = ae.associate(
        "127.0.0.1",
        server.tls_port,
        ae_title=server.ae_title,
        tls_args=_pynetdicom_tls(pki),
    )
    assert assoc.is_established
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        query.PatientID = ""
        return [
            int(status.Status)
            for status, _ in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        ]
    finally:
        assoc.release()


def test_the_tls_port_applies_the_same_access_control(
    tls_server: TLSServer, pki: PKI, tmp_path: Path
):
    files = write_series(tmp_path / "series", 2, size=16, patient_id="TLS-FIND")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    stored = dcmtk(
        "storescu",
        "-aet",
        "MODALITY",
        "-aec",
        tls_server.ae_title,
        *tls_options(pki.modality, pki.ca),
        "127.0.0.1",
        str(tls_server.tls_port),
        *map(str, files),
    )
    assert stored.returncode == 0, output(stored)
    # An undeclared calling AE may store but not query (Refused: Not Authorized, PS3.7 C.5.4).
    assert _find(tls_server, pki, "STRANGER", study_uid) == [NOT_AUTHORIZED]
    # A declared peer finds the study: one pending match, then success.
    assert _find(tls_server, pki, WORKSTATION, study_uid) == [0xFF00, 0x0000]


# --- peers flagged tls --------------------------------------------------------------------------


@dataclass
class TLSStoreSCP:
    proc: subprocess.Popen[bytes]
    port: int
    directory: Path
    ae_title: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def received(self) -> dict[str, Path]:
        return {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
            for p in self.directory.iterdir()
        }


@contextlib.contextmanager
def _run_tls_storescp(
    identity: Identity, ca: Path, directory: Path, ae_title: str = "TLSSCP"
) -> Iterator[TLSStoreSCP]:
    """DCMTK's storescp over TLS only with ``identity``, requiring a client certificate
    signed by ``ca``."""
    exe = require_tool("storescp")
    port = free_port()
    received = directory / "received"
    received.mkdir(parents=True)
    log_path = directory / "storescp.log"
    proc = subprocess.Popen(
        [
            exe,
            "-v",
            "+B",
            "-od",
            str(received),
            "-aet",
            ae_title,
            "+tls",
            str(identity.key),
            str(identity.certificate),
            "-pw",
            "+cf",
            str(ca),
            str(port),
        ],
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, proc=proc)
        yield TLSStoreSCP(proc, port, received, ae_title, log_path)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def tls_storescp(pki: PKI, tmp_path: Path) -> Iterator[TLSStoreSCP]:
    """A peer that speaks TLS only, with a certificate of the test CA."""
    with _run_tls_storescp(pki.peer, pki.ca, tmp_path / "peer") as scp:
        yield scp


def _put_peer(server: TLSServer, name: str, scp: TLSStoreSCP, *, tls: Any) -> httpx.Response:
    return httpx.put(
        f"{server.running.http}/api/peers/{name}",
        json={
            "ae_title": scp.ae_title,
            "host": "127.0.0.1",
            "port": scp.port,
            "permissions": [],
            "tls": tls,
        },
        timeout=10,
    )


def _movescu(server: TLSServer, study_uid: str, destination: str) -> str:
    result = dcmtk(
        "movescu",
        "-v",
        "-S",
        "-aet",
        WORKSTATION,
        "-aec",
        server.ae_title,
        "-aem",
        destination,
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={study_uid}",
        "127.0.0.1",
        str(server.running.dimse_port),
    )
    return output(result)


def _ingest(server: TLSServer, files: list[Path]) -> None:
    archive = server.running.archive()
    try:
        for path in files:
            archive.ingest(path.read_bytes())
    finally:
        archive.close()


def test_api_peers_carry_the_tls_flag(tls_server: TLSServer, tls_storescp: TLSStoreSCP):
    created = _put_peer(tls_server, "flagged", tls_storescp, tls=True)
    assert created.status_code == 201, created.text
    assert created.json()["tls"] is True
    listed = {p["name"]: p for p in httpx.get(f"{tls_server.running.http}/api/peers").json()}
    assert listed["flagged"]["tls"] is True
    assert listed["workstation"]["tls"] is False
    wrong = _put_peer(tls_server, "flagged", tls_storescp, tls="yes")
    assert wrong.status_code == 422, wrong.text
    assert httpx.delete(f"{tls_server.running.http}/api/peers/flagged").status_code == 204


def test_c_move_to_a_tls_peer_goes_over_tls(
    tls_server: TLSServer, tls_storescp: TLSStoreSCP, tmp_path: Path
):
    files = write_series(tmp_path / "series", 3, size=16, patient_id="TLS-MOVE")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    _ingest(tls_server, files)

    # Declared without the flag, the peer cannot be reached: it speaks TLS only.
    assert _put_peer(tls_server, "tlsscp", tls_storescp, tls=False).status_code == 201
    try:
        plain = _movescu(tls_server, study_uid, tls_storescp.ae_title)
        assert "Received Final Move Response (Success)" not in plain, plain
        assert not tls_storescp.received()

        assert _put_peer(tls_server, "tlsscp", tls_storescp, tls=True).status_code == 200
        moved = _movescu(tls_server, study_uid, tls_storescp.ae_title)
        assert "Received Final Move Response (Success)" in moved, moved
    finally:
        httpx.delete(f"{tls_server.running.http}/api/peers/tlsscp")
    received = tls_storescp.received()
    expected = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in files}
    assert set(received) == set(expected)
    for sop, path in expected.items():
        assert pydicom.dcmread(received[sop]).PixelData == pydicom.dcmread(path).PixelData


def _forward_study(server: TLSServer, files: list[Path], peer: str) -> SendReport:
    """Forward the study of ``files`` (ingested first) to the peer as a routing job does."""
    _ingest(server, files)
    archive = server.running.archive()
    try:
        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = pydicom.dcmread(files[0]).StudyInstanceUID
        items = find_instances(
            archive.db, RetrieveKeys.from_identifier(identifier, RetrieveModel.STUDY_ROOT)
        )
        assert len(items) == len(files)
        return Forwarder(archive, server.settings).send(peer, items)
    finally:
        archive.close()


def test_forwarding_to_a_tls_peer(
    tls_server: TLSServer, tls_storescp: TLSStoreSCP, tmp_path: Path, pynetdicom_patched: None
):
    files = write_series(tmp_path / "series", 2, size=16, patient_id="TLS-FORWARD")
    assert _put_peer(tls_server, "forwarded", tls_storescp, tls=True).status_code == 201
    try:
        report = _forward_study(tls_server, files, "forwarded")
    finally:
        httpx.delete(f"{tls_server.running.http}/api/peers/forwarded")
    assert report.sent == 2 and not report.failed, (report, tls_storescp.log())
    assert set(tls_storescp.received()) == {str(pydicom.dcmread(p).SOPInstanceUID) for p in files}


def test_a_tls_peer_with_an_untrusted_certificate_gets_nothing(
    tls_server: TLSServer, pki: PKI, tmp_path: Path, pynetdicom_patched: None
):
    """The peer's certificate is verified (PS3.15 B.1): one the CAs of
    ``dimse_tls_ca_certificates`` did not sign fails the send, and nothing is sent."""
    files = write_series(tmp_path / "series", 1, size=16, patient_id="TLS-IMPOSTOR")
    with _run_tls_storescp(pki.impostor, pki.ca, tmp_path / "impostor", "IMPOSTOR") as impostor:
        assert _put_peer(tls_server, "impostor", impostor, tls=True).status_code == 201
        try:
            with pytest.raises(ForwardError, match="did not accept an association over TLS"):
                _forward_study(tls_server, files, "impostor")
        finally:
            httpx.delete(f"{tls_server.running.http}/api/peers/impostor")
        assert not impostor.received()


# --- settings that cannot work ------------------------------------------------------------------


def _serve(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [str(VENV_BIN / "pacsbridge"), "serve"],
        env={
            **os.environ,
            "PACSBRIDGE_DATA_DIR": str(tmp_path / "data"),
            "PACSBRIDGE_DIMSE_HOST": "127.0.0.1",
            "PACSBRIDGE_DIMSE_PORT": str(free_port()),
            "PACSBRIDGE_HTTP_PORT": str(free_port()),
            "PACSBRIDGE_WORKER_IN_SERVE": "false",
            "PACSBRIDGE_DIMSE_PROCESSES": "1",
            "PACSBRIDGE_DIMSE_TLS_PORT": str(free_port()),
            "COLUMNS": "250",  # the refusal on one line, its paths unbroken
            **env,
        },
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_serve_refuses_a_tls_port_without_a_certificate(tmp_path: Path):
    result = _serve(tmp_path)
    assert result.returncode == 2, output(result)
    assert "PACSBRIDGE_DIMSE_TLS_CERTIFICATE is not set" in " ".join(output(result).split())


def test_serve_refuses_an_unreadable_private_key(tmp_path: Path, pki: PKI):
    missing = tmp_path / "no-such.key"
    result = _serve(
        tmp_path,
        PACSBRIDGE_DIMSE_TLS_CERTIFICATE=str(pki.node.certificate),
        PACSBRIDGE_DIMSE_TLS_PRIVATE_KEY=str(missing),
    )
    assert result.returncode == 2, output(result)
    text = " ".join(output(result).split())
    assert "PACSBRIDGE_DIMSE_TLS_PRIVATE_KEY" in text and "no-such.key" in text, text


def test_contexts(pki: PKI, tmp_path: Path):
    settings = Settings(data_dir=tmp_path, **_tls_settings(pki))  # type: ignore[arg-type]
    server = server_context(settings)
    assert server.minimum_version == ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_REQUIRED
    assert server.options & ssl.OP_NO_COMPRESSION
    assert all(
        c["protocol"] == "TLSv1.3" or "GCM" in c["name"] or "CHACHA20" in c["name"]
        for c in server.get_ciphers()
    )
    # Without CAs no client certificate is asked.
    anyone = server_context(
        Settings(
            data_dir=tmp_path,
            dimse_tls_certificate=pki.node.certificate,
            dimse_tls_private_key=pki.node.key,
        )
    )
    assert anyone.verify_mode == ssl.CERT_NONE
    client = client_context(settings)
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname
    assert client.minimum_version == ssl.TLSVersion.TLSv1_2

    # A key that is not the certificate's, a CA file that holds no certificate.
    mismatched = Settings(
        data_dir=tmp_path,
        dimse_tls_certificate=pki.node.certificate,
        dimse_tls_private_key=pki.modality.key,
    )
    with pytest.raises(TLSConfigurationError, match="PACSBRIDGE_DIMSE_TLS_PRIVATE_KEY"):
        server_context(mismatched)
    not_pem = tmp_path / "ca.txt"
    not_pem.write_text(json.dumps({"not": "a certificate"}))
    with pytest.raises(TLSConfigurationError, match="PACSBRIDGE_DIMSE_TLS_CA_CERTIFICATES"):
        client_context(Settings(data_dir=tmp_path, dimse_tls_ca_certificates=not_pem))


def test_config_peers_carry_the_tls_flag(tmp_path: Path):
    from archive import Archive

    settings = Settings(
        data_dir=tmp_path,
        peers={
            "secure": PeerSettings(ae_title="SECURE", host="pacs.example", port=2762, tls=True),
            "plain": PeerSettings(ae_title="PLAIN", host="pacs.example", port=104),
        },
    )
    archive = Archive(settings)
    try:
        assert archive.peers.get("secure").tls is True
        assert archive.peers.by_ae_title("PLAIN").tls is False  # type: ignore[union-attr]
        stored, _ = archive.peers.put("stored", "STORED", "10.0.0.9", 2762, tls=True)
        assert stored.tls is True and archive.peers.get("stored").tls is True
    finally:
        archive.close()
