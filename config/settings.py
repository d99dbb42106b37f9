"""pacsbridge settings.

Sources, highest priority first: keyword arguments, environment variables ``PACSBRIDGE_*``,
a ``.env`` file in the working directory, the TOML file named by ``PACSBRIDGE_CONFIG``, defaults.
Every setting is documented in the README with its default.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, tzinfo
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DuplicatePolicy = Literal["keep", "overwrite"]


_PEER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HOST = re.compile(r"[A-Za-z0-9._:\[\]%-]{1,255}")
_PUBLIC_URL = re.compile(r"https?://[A-Za-z0-9._\[\]:%-]+(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?")


def validate_ae_title(value: str) -> str:
    """An AE title per PS3.5 6.2, without its non-significant leading/trailing spaces."""
    value = value.strip()
    if not value or len(value) > 16 or "\\" in value or not value.isascii():
        raise ValueError("an AE title is 1 to 16 ASCII characters without backslash")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError("an AE title may not contain control characters")
    return value


def validate_peer_name(value: str, what: str = "a peer name") -> str:
    """A peer's (or model's) name: it appears in URLs (``/api/peers/<name>``)."""
    if not _PEER_NAME.fullmatch(value):
        raise ValueError(
            f"{what} is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return value


def validate_host(value: str) -> str:
    """A host name or IP address (IPv6 literal with or without brackets)."""
    value = value.strip()
    if not _HOST.fullmatch(value):
        raise ValueError("a host is a host name or an IP address (at most 255 characters)")
    return value


class DestinationSettings(BaseModel):
    """Where a route sends (``[destinations.<name>]``): exactly one of a DIMSE peer, a DICOMweb
    STOW-RS service, or an Orthanc server's REST API."""

    peer: str | None = None
    """Name of a ``[peers.<name>]`` entry: sent with C-STORE."""
    stow_url: str | None = None
    """DICOMweb root (``https://host/dicom-web``): sent with STOW-RS (``POST {root}/studies``)."""
    orthanc_url: str | None = None
    """Orthanc REST root (``http://host:8042``): sent with ``POST /instances``."""
    username: str | None = None
    password: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra HTTP headers (e.g. ``Authorization``) for STOW-RS and Orthanc."""
    timeout: float = Field(default=120.0, gt=0)
    batch_size: int = Field(default=50, ge=1)
    """Instances per STOW-RS request / per association."""

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> DestinationSettings:
        kinds = [k for k in (self.peer, self.stow_url, self.orthanc_url) if k]
        if len(kinds) != 1:
            raise ValueError("a destination has exactly one of peer, stow_url, orthanc_url")
        for url in (self.stow_url, self.orthanc_url):
            if url and not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        return self


class RouteSettings(BaseModel):
    """A routing rule (``[routes.<name>]``). Every criterion given must match (wildcards ``*``
    and ``?``, case-insensitive); a study matches a criterion when any of its instances does."""

    on: Literal["stable", "arrival"] = "stable"
    """``stable``: send the whole study once it is stable; ``arrival``: each instance at once."""
    calling_ae_title: str | None = None
    modality: str | None = None
    sop_class_uid: str | None = None
    body_part_examined: str | None = None
    study_description: str | None = None
    destinations: list[str] = Field(min_length=1)


PeerPermission = Literal["echo", "store", "find", "move", "get"]
#: Every DIMSE service a peer may be granted, in this order (C-ECHO, C-STORE, C-FIND, C-MOVE,
#: C-GET): a peer's ``permissions`` default to all of them.
PEER_PERMISSIONS: tuple[PeerPermission, ...] = ("echo", "store", "find", "move", "get")


def canonical_permissions(values: Sequence[str]) -> list[PeerPermission]:
    """``values`` without repeats, in the order of :data:`PEER_PERMISSIONS`; raises
    ValueError naming an unknown one."""
    unknown = [v for v in values if v not in PEER_PERMISSIONS]
    if unknown:
        raise ValueError(
            f"unknown permission {unknown[0]!r}: permissions are {', '.join(PEER_PERMISSIONS)}"
        )
    return [p for p in PEER_PERMISSIONS if p in values]


class ExternalIssuerSettings(BaseModel):
    """An identity provider whose tokens pacsbridge accepts (``[[auth_external]]``): Keycloak or
    any OpenID Connect provider. Its keys come from its JWKS, found through its discovery
    document (``<issuer>/.well-known/openid-configuration``) unless ``jwks_uri`` is given."""

    issuer: str
    """The ``iss`` its tokens carry (and the base of its discovery document)."""
    audience: str = "pacsbridge"
    """The ``aud`` its tokens must name."""
    jwks_uri: str | None = None
    roles_claim: str = "roles"
    """Where the token holds the user's roles or groups: a claim, or a dotted path
    (``realm_access.roles`` for Keycloak)."""
    role_map: dict[str, str] = Field(default_factory=dict)
    """The provider's role or group -> a pacsbridge role (``{"pacs-admins": "admin"}``); a
    token none of whose roles is mapped is refused."""
    subject_claim: str = "sub"
    """The claim naming the user in the audit (``preferred_username`` for Keycloak)."""
    patient_claim: str = "patient"
    """The claim holding the SMART patient launch context (a FHIR Patient id of this server),
    to which the token's ``patient/`` scopes are held; without it they grant nothing."""
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "PS256"])

    @field_validator("issuer", "jwks_uri")
    @classmethod
    def _https_or_loopback(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(
            ("https://", "http://127.0.0.1", "http://localhost")
        ):
            raise ValueError("an identity provider is reached over https (or on this machine)")
        return value

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, value: list[str]) -> list[str]:
        bad = [a for a in value if not re.fullmatch(r"(RS|PS|ES)(256|384|512)", a)]
        if bad:
            raise ValueError(f"only asymmetric signatures (RS, PS, ES): not {', '.join(bad)}")
        return value


class PeerSettings(BaseModel):
    """A remote DICOM application entity (``[peers.<name>]`` in the TOML file)."""

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    permissions: list[PeerPermission] = Field(default_factory=lambda: list(PEER_PERMISSIONS))
    """The DIMSE services it may use when it calls us with ``ae_title`` (C-ECHO, C-STORE,
    C-FIND, C-MOVE, C-GET); the others are refused (0x0124). ``[]``: a C-MOVE destination
    only."""
    check_host: bool = False
    """Its associations must come from an address ``host`` resolves to; from elsewhere its AE
    title counts as undeclared."""
    tls: bool = False
    """Associations to it (C-MOVE sub-operations, forwarding) go over TLS (DICOM PS3.15 B.1),
    with the ``dimse_tls_*`` settings."""

    @field_validator("permissions")
    @classmethod
    def _canonical_permissions(cls, value: list[PeerPermission]) -> list[PeerPermission]:
        return canonical_permissions(value)

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        return validate_ae_title(value)

    @field_validator("host")
    @classmethod
    def _valid_host(cls, value: str) -> str:
        return validate_host(value)


AIModelKind = Literal["segmentation", "classification"]
AIDevice = Literal["auto", "cpu", "cuda"]


class CodeSettings(BaseModel):
    """A coded concept (PS3.3 8.8): ``scheme`` is a Coding Scheme Designator (``SCT`` for
    SNOMED CT, ``DCM``, ``LN``…)."""

    value: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=16)
    meaning: str = Field(min_length=1, max_length=64)


class AILabelSettings(BaseModel):
    """One output of a model: a segment (its label value in the model's output) or a class."""

    name: str = Field(min_length=1, max_length=64)
    """Segment Label / finding name as viewers show it."""
    value: int | None = Field(default=None, ge=1, le=65535)
    """The label value in a segmentation model's output (default: its position, from 1)."""
    category: CodeSettings = Field(
        default_factory=lambda: CodeSettings(
            value="91723000", scheme="SCT", meaning="Anatomical Structure"
        )
    )
    """Segmented Property Category (CID 7150)."""
    type: CodeSettings
    """Segmented Property Type (CID 7151) or, for a classifier, the finding."""
    color: tuple[int, int, int] | None = None
    """Recommended display colour (sRGB 0-255)."""


class SeriesSelectorSettings(BaseModel):
    """Which series of a study a model runs on (every criterion given must match), in the
    spirit of MONAI Deploy's series selector rules. Text criteria match case-insensitively with
    ``*`` and ``?`` wildcards; a list matches when any element does."""

    modality: list[str] = Field(default_factory=list)
    body_part: list[str] = Field(default_factory=list)
    """Body Part Examined (0018,0015); a series without one matches."""
    image_type: list[str] = Field(default_factory=list)
    """Values every instance's Image Type (0008,0008) must hold, e.g. ``["ORIGINAL"]``."""
    orientation: Literal["axial", "sagittal", "coronal"] | None = None
    """The plane of the slices, from Image Orientation (Patient)."""
    min_slices: int = Field(default=1, ge=1)
    """The fewest slices (frames) the series must have."""
    sop_class_uid: list[str] = Field(default_factory=list)
    series_description: str | None = None
    """A regular expression searched in Series Description (case-insensitive)."""

    @field_validator("series_description")
    @classmethod
    def _valid_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"series_description is not a regular expression: {exc}") from exc
        return value


class AIModelSettings(BaseModel):
    """A model (``[ai.models.<name>]``). For a builtin model every field is optional: what is
    given overrides the builtin's default (``enabled = false`` switches it off)."""

    enabled: bool = True
    kind: AIModelKind | None = None
    source: str | None = None
    """``builtin:<name>``, a TorchScript file (``.pt``/``.ts``), or a MONAI bundle directory;
    always read from disk, never downloaded."""
    version: str | None = None
    """The algorithm version written into results (default: the weights' hash prefix)."""
    description: str | None = None
    selector: SeriesSelectorSettings | None = None
    labels: list[AILabelSettings] | None = None
    roi_size: list[int] | None = None
    """Input patch size: sliding-window size of a 3D TorchScript segmentation model, image size
    of a classifier."""
    overlap: float = Field(default=0.25, ge=0, lt=1)
    sw_batch_size: int = Field(default=1, ge=1)
    device: AIDevice = "auto"
    """``auto``: CUDA when a GPU is there, else CPU."""
    amp: bool = True
    """Automatic mixed precision on CUDA."""
    intensity_range: tuple[float, float] | None = None
    """TorchScript models: input values clipped to this range and scaled to 0..1."""
    spacing: tuple[float, float, float] | None = None
    """TorchScript segmentation: resample to this voxel size (mm) before inference."""
    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    """Segmentation Type of the DICOM SEG written (PS3.3 C.8.20.2; LABELMAP: one frame per
    slice holding every label)."""
    threshold: float = Field(default=0.5, gt=0, lt=1)
    """Classification: a class is reported present at this probability or more."""
    multi_label: bool = False
    """Classification: one sigmoid per class instead of a softmax over them."""


class AISettings(BaseModel):
    """AI on stable studies (``[ai]``)."""

    enabled: bool = True
    """Run the matching models on every stable study."""
    models: dict[str, AIModelSettings] = Field(default_factory=dict)
    spacing_tolerance: float = Field(default=0.1, ge=0)
    """The largest allowed deviation of a slice gap from the median gap, as a fraction."""
    max_voxels: int = Field(default=600 * 512 * 512, ge=1)
    """The largest volume (slices x rows x columns) a model is run on."""

    @field_validator("models")
    @classmethod
    def _valid_names(cls, value: dict[str, AIModelSettings]) -> dict[str, AIModelSettings]:
        for name in value:
            validate_peer_name(name, f"the model name {name!r}")
        return value


def dicom_zone(name: str | None) -> tzinfo:
    """The zone of ``dicom_timezone``: an IANA name, or the server's local zone with its
    daylight-saving rules (``TZ``, ``/etc/localtime``), else its current UTC offset."""
    return _zone(name or os.environ.get("TZ") or None)


@lru_cache(maxsize=8)
def _zone(name: str | None) -> tzinfo:
    if name:
        try:
            return ZoneInfo(name.lstrip(":"))
        except (ZoneInfoNotFoundError, ValueError):
            pass
    try:
        with open("/etc/localtime", "rb") as local:
            return ZoneInfo.from_file(local, key="localtime")
    except (OSError, ValueError):
        offset = datetime.now().astimezone().tzinfo
        return offset if offset is not None else UTC


class FHIRSettings(BaseModel):
    """The FHIR R4 bridge under ``/fhir`` (``[fhir]``)."""

    enabled: bool = True
    base_url: str | None = None
    """The FHIR base as clients reach it (``https://pacs.example/fhir``). Default:
    ``public_url`` + ``/fhir``, else from each request's Host header."""
    patient_identifier_system: str = "urn:pacsbridge:patient-id"
    """The identifier system of DICOM Patient IDs without an Issuer of Patient ID (and of the
    issuers ``issuer_systems`` does not name: ``<system>:<issuer>``, or ``urn:oid:<issuer>``
    for an issuer that is an OID)."""
    issuer_systems: dict[str, str] = Field(default_factory=dict)
    """Issuer of Patient ID (0010,0021) -> identifier system (``{"HOSP-A": "urn:oid:1.2.3"}``)."""
    default_count: int = Field(default=20, ge=1)
    """Entries in a search page when the request gives no ``_count``."""
    max_count: int = Field(default=500, ge=1)
    """The most entries one search page holds; a larger ``_count`` is reduced to it."""
    report_manufacturer: str = "pacsbridge"
    """Manufacturer (0008,0070) of the SR documents written for reports received over FHIR."""
    verifying_organization: str = "pacsbridge"
    """Verifying Organization (0040,A027) of reports finalised over FHIR when the request names
    none (the ``performer`` Organization's display)."""

    @field_validator("base_url")
    @classmethod
    def _valid_base_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("fhir.base_url must be an absolute http(s) URL")
        return value.rstrip("/") if value else value


_CURRENCY = re.compile(r"[A-Z]{3}")
_TAX_CODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class BillingSettings(BaseModel):
    """Billing (``[billing]``): the price list and charge capture."""

    enabled: bool = False
    """Charge capture (opt-in): a ``charge-capture`` job on every stable study captures its
    technical charges and the professional charges of its signed reports. A site that bills
    turns it on and loads a price list (``pacsbridge billing prices load``)."""
    currency: str = "EUR"
    """The site's one currency (ISO 4217 alphabetic code): every price and charge is in it."""
    payment_terms_days: int = Field(default=30, ge=0, le=3650)
    """Days from an invoice's issue date to its due date (overdue after it)."""
    tax_percent: Decimal | None = None
    """The site's tax rate in percent (``19``, ``7.7``; 0 to 100, at most 4 decimals). A price
    definition with no tax component of its own is taxed at this rate (a ``tax`` line coded
    ``tax_code`` on the net); None: such a definition is priced without tax."""
    tax_code: str = "VAT"
    """The code of the tax line added at ``tax_percent``."""

    @field_validator("currency")
    @classmethod
    def _valid_currency(cls, value: str) -> str:
        if not _CURRENCY.fullmatch(value):
            raise ValueError("billing.currency must be an ISO 4217 code: 3 upper-case letters")
        return value

    @field_validator("tax_percent", mode="before")
    @classmethod
    def _valid_tax_percent(cls, value: Any) -> Decimal | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
            raise ValueError('billing.tax_percent must be a decimal number (19 or "7.7")')
        try:
            rate = Decimal(str(value).strip())
        except InvalidOperation:
            raise ValueError(f"billing.tax_percent: {value!r} is not a decimal number") from None
        if not rate.is_finite():
            raise ValueError(f"billing.tax_percent: {value!r} is not a decimal number")
        exponent = rate.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -4:
            raise ValueError(f"billing.tax_percent: {value} has more than 4 decimals")
        if not Decimal(0) <= rate <= Decimal(100):
            raise ValueError(f"billing.tax_percent: {value} is not between 0 and 100")
        # written plainly in the tax line's description: 19.00 and 1E+1 as 19 and 10, 7.70 as 7.7
        return rate.quantize(Decimal(1)) if rate == rate.to_integral_value() else rate.normalize()

    @field_validator("tax_code")
    @classmethod
    def _valid_tax_code(cls, value: str) -> str:
        if not _TAX_CODE.fullmatch(value):
            raise ValueError(
                f"billing.tax_code: {value!r} is not 1 to 64 letters, digits, '.', '_', '-'"
            )
        return value


class AuditSettings(BaseModel):
    """The audit trail (``[audit]``): every access to or change of PHI, kept in the index."""

    retention_days: int = Field(default=2190, ge=1)
    """Audit events older than this are pruned by the periodic maintenance (six years by
    default: HIPAA 45 CFR 164.316(b)(2) keeps documentation that long)."""
    syslog_url: str | None = None
    """Also send every event as IHE ATNA (RFC 5424 syslog, DICOM PS3.15 A.5 audit XML) to a
    collector: ``tcp://host:port`` (RFC 6587 octet counting) or ``tls://host:port``
    (RFC 5425). None: not sent."""
    syslog_ca_file: Path | None = None
    """CA certificates that verify a ``tls://`` collector (default: the system's)."""
    max_queued: int = Field(default=100_000, ge=1)
    """Events of reads waiting in memory for the index, at most: beyond, each new event is
    written by the thread that records it (a DICOM handler before its response, an HTTP
    request's after its answer, off the event loop), waiting for the index, so that memory
    stays bounded. One that cannot be written then is logged whole at ERROR."""

    @field_validator("syslog_url")
    @classmethod
    def _valid_syslog_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        found = re.fullmatch(r"(tcp|tls)://([^:/\s]+|\[[0-9A-Fa-f:]+\]):(\d{1,5})/?", value)
        if found is None or not 0 < int(found.group(3)) < 65536:
            raise ValueError("audit.syslog_url must be tcp://host:port or tls://host:port")
        return value


class EventSubscriptionSettings(BaseModel):
    """A subscription of the settings file (``[events.subscriptions.<name>]``): where events
    go. Stored in the index at start (``source = "toml"``); one removed from the file is turned
    off there, with its delivery state kept."""

    model_config = {"extra": "forbid"}

    channel: Literal["amqp", "webhook"]
    url: str
    """``amqp://user:password@host:5672/vhost`` (RabbitMQ), or the ``http(s)://`` URL a
    webhook POSTs to."""
    types: list[str] = Field(default_factory=lambda: ["#"])
    """Event types, AMQP topic patterns: ``study.*`` (one word), ``order.#`` (any words)."""
    exchange: str | None = None
    """AMQP: the durable topic exchange (default ``events.exchange``)."""
    secret: str | None = None
    """Webhook: the HMAC-SHA256 key of ``X-Pacsbridge-Signature``."""
    max_attempts: int | None = Field(default=None, ge=1, le=1000)
    """Attempts of one event before it is ``dead`` (webhook default
    ``events.webhook_max_attempts``; AMQP: unlimited unless set)."""
    headers: list[str] = Field(default_factory=list)
    """Webhook: extra request headers, ``"Name: value"``."""
    timeout: float | None = Field(default=None, gt=0, le=300)
    """Webhook: seconds to wait for the answer (default ``events.webhook_timeout``)."""
    enabled: bool = True

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        if not value.lower().startswith(("amqp://", "amqps://", "http://", "https://")):
            raise ValueError("an event subscription url is amqp(s):// or http(s)://")
        return value


class EventsSettings(BaseModel):
    """Event delivery from the outbox (``[events]``): RabbitMQ, webhooks, FHIR rest-hooks. The
    job workers deliver (in ``serve`` and in ``pacsbridge worker`` processes)."""

    enabled: bool = True
    """Deliver events in this process's job workers."""
    include_phi: bool = False
    """Put the Patient ID in each event (``"patient": {"id": ...}``). Off: events carry study
    UIDs, FHIR references and links only, which need the server (and its access control) to be
    turned into a patient."""
    source: str | None = None
    """The ``source`` of every event (default: ``public_url``, else ``urn:pacsbridge:<AE>``)."""
    exchange: str = "pacsbridge.events"
    """The AMQP topic exchange of subscriptions that name none (declared durable)."""
    poll_interval: float = Field(default=0.2, gt=0, le=60)
    """Seconds between looks at the outbox when there is nothing to do."""
    batch_size: int = Field(default=500, ge=1, le=10000)
    lease_seconds: float = Field(default=30.0, ge=1)
    """One process delivers a subscription at a time; another takes over after this long
    without news from it."""
    backoff_base: float = Field(default=1.0, gt=0)
    """First retry delay in seconds, doubled on each failure up to ``backoff_max``."""
    backoff_max: float = Field(default=300.0, gt=0)
    webhook_max_attempts: int = Field(default=8, ge=1, le=1000)
    webhook_timeout: float = Field(default=10.0, gt=0, le=300)
    amqp_heartbeat: int = Field(default=30, ge=0, le=3600)
    """AMQP heartbeat seconds (0: none)."""
    gap_timeout: float = Field(default=60.0, gt=0)
    """PostgreSQL: how long an outbox id that a transaction still holds (an event not yet
    committed) is waited for before later events pass it."""
    retention_days: float = Field(default=7.0, gt=0)
    """Events older than this that every subscription has had are pruned."""
    subscriptions: dict[str, EventSubscriptionSettings] = Field(default_factory=dict)

    @field_validator("subscriptions")
    @classmethod
    def _valid_names(
        cls, value: dict[str, EventSubscriptionSettings]
    ) -> dict[str, EventSubscriptionSettings]:
        for name in value:
            validate_peer_name(name, "an event subscription name")
        return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PACSBRIDGE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
    )

    # --- where things live -------------------------------------------------------------
    config: Path | None = None
    """TOML file with structured settings (only read from the environment / .env)."""
    data_dir: Path = Path("./pacsbridge-data")
    database_url: str | None = None
    """SQLAlchemy URL of the index. Default: ``sqlite:///<data_dir>/index.sqlite``."""
    storage_url: str | None = None
    """``file:///path`` or ``s3://bucket[/prefix]``. Default: ``file://<data_dir>/blobs``."""
    s3_endpoint: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: str | None = None
    s3_secure: bool = True
    s3_region: str | None = None

    # --- index -------------------------------------------------------------------------
    sqlite_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    database_pool_size: int = Field(default=10, ge=1)
    migrate_on_start: bool = True

    # --- blob store --------------------------------------------------------------------
    storage_fsync: bool = True
    """Flush every blob to stable storage before the sender is told it is stored."""
    min_free_disk_mb: int = Field(default=500, ge=0)
    """Refuse new instances (0xA700 / 507) when the filesystem store has less free space."""
    reconcile_on_start: bool = True
    """At start, index blobs that have no index row (a crash between blob and index write)."""

    # --- ingest ------------------------------------------------------------------------
    duplicate_policy: DuplicatePolicy = "keep"
    refused_sop_classes: list[str] = Field(default_factory=list)
    """Storage SOP Class UIDs (or pydicom keywords) the node refuses."""
    max_inflated_size_mb: int = Field(default=128, ge=1)
    """The largest data set a deflated instance (PS3.5 A.5) may inflate to: ingest refuses a
    larger one (inflating it only up to this limit), and retrieval never inflates beyond it."""

    dicom_timezone: str | None = None
    """IANA zone (``Europe/Berlin``) of DICOM dates and times that carry no Timezone Offset
    From UTC (PS3.3 C.12.1.1.8): where they are read as instants (report dates, FHIR dateTime
    values). Default: the server's local zone (``TZ``, else ``/etc/localtime``)."""

    # --- query -------------------------------------------------------------------------
    query_case_insensitive_pn: bool = True
    """Person names match case-insensitively in C-FIND and QIDO-RS (like most PACS)."""
    query_lenient: bool = False
    """C-FIND at the SERIES or IMAGE level without the unique keys of the levels above
    (StudyInstanceUID, SeriesInstanceUID, and PatientID in the Patient Root model) is run as a
    relational query (PS3.4 C.4.1.2.2.2) instead of being refused (0xA900), as dcm4chee's
    lenient mode does. Off: only requestors that negotiated relational queries (SOP Class
    Extended Negotiation byte 1, PS3.4 C.5.1.1.1) may leave them out."""
    query_max_matches: int | None = Field(default=None, ge=1)
    """A DIMSE C-FIND (Query/Retrieve or Modality Worklist) that matches more than this many
    records is refused with 0xA700 (Refused: Out of Resources, PS3.4 C.4.1.1.4) before any
    response is sent, as dcm4chee's QueryMaxNumberOfResults does: the matches of a C-FIND are
    read into memory at once. None: no limit (a relational query at the IMAGE level without
    keys then reads every instance of the archive)."""

    # --- DICOMweb ----------------------------------------------------------------------
    public_url: str | None = None
    """The server's external base URL (``https://pacs.example``, behind a reverse proxy say):
    RetrieveURL and BulkDataURI values are ``<public_url>/dicom-web/...``. Default: built from
    each request's Host header, which must then be a valid ``host[:port]`` (else 400)."""
    dicomweb_base_url: str | None = None
    """The DICOMweb root as clients reach it (``https://pacs.example/dicom-web``): overrides
    ``public_url`` for DICOMweb URLs, for a root that is not ``<public_url>/dicom-web``."""
    qido_default_limit: int = Field(default=1000, ge=1)
    """Results of a QIDO-RS search that gives no ``limit``."""
    stow_max_parts: int = Field(default=10000, ge=1)
    """The most parts one STOW-RS request may hold: later parts are not read (each answer
    lists every part it read, so this also bounds the answer)."""
    qido_max_limit: int = Field(default=10000, ge=1)
    """The most results one QIDO-RS response holds; a larger ``limit`` is reduced (Warning 299)."""
    wado_mmap: bool = True
    """WADO-RS sends stored files from 128 KiB to 8 MiB from memory maps of the files (one
    copy less). Turn it off when the blob folder is on a network file system that other machines
    change, as with Apache httpd's ``EnableMMAP``."""

    # --- DIMSE -------------------------------------------------------------------------
    ae_title: str = "PACSBRIDGE"
    dimse_host: str = "0.0.0.0"
    dimse_port: int = Field(default=11112, ge=0, le=65535)
    max_associations: int = Field(default=64, ge=1)
    max_associations_per_address: int = Field(default=16, ge=0)
    """Open DICOM connections from one IP address, counted over all DIMSE processes; more are
    refused with A-ASSOCIATE-RJ rejected-transient, local-limit-exceeded (PS3.8 9.3.4). 0: no
    limit (behind a load balancer or NAT, where every peer has the same address)."""
    dimse_backlog: int = Field(default=512, ge=1)
    """Connections the kernel queues on the DICOM port before they are accepted (listen
    backlog; the kernel caps it at net.core.somaxconn)."""
    require_called_ae_title: bool = False
    """Reject associations whose Called AE Title is not ``ae_title``."""
    allowed_calling_ae_titles: list[str] = Field(default_factory=list)
    """When not empty, only these Calling AE Titles may associate."""
    dimse_processes: int = Field(default=0, ge=0)
    """Processes accepting DICOM associations on the port (0 = one per CPU, at most 4)."""
    maximum_pdu_size: int = Field(default=0, ge=0)
    """Maximum PDU size we receive (0 = unlimited)."""
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    acse_timeout: float = 30.0
    artim_timeout: float = Field(default=5.0, gt=0)
    """ARTIM timer (PS3.8 9.1.5): how long a new connection has to send its A-ASSOCIATE-RQ, and
    a peer to close the connection after a rejection, an abort or a release."""

    # --- DICOM over TLS (PS3.15 B.1 Basic TLS, B.9 BCP 195 non-downgrading) ---------------
    dimse_tls_port: int = Field(default=0, ge=0, le=65535)
    """A second DICOM port, on ``dimse_host``, that speaks TLS 1.2 or later only: the same
    services and access control as ``dimse_port``. 0: none."""
    dimse_tls_certificate: Path | None = None
    """PEM file of this node's certificate (then any intermediates): presented on the TLS port,
    and to peers flagged ``tls`` that ask for a client certificate."""
    dimse_tls_private_key: Path | None = None
    """PEM file of the private key of ``dimse_tls_certificate``."""
    dimse_tls_private_key_password: SecretStr | None = None
    """The password of an encrypted ``dimse_tls_private_key``."""
    dimse_tls_ca_certificates: Path | None = None
    """PEM bundle of the CAs trusted for DICOM TLS. When set, every client of the TLS port must
    present a certificate one of them signed (mutual TLS), and peers flagged ``tls`` are
    verified against them; unset, the TLS port asks no client certificate and peers are
    verified against the system's CAs."""
    dimse_tls_check_hostname: bool = True
    """A peer flagged ``tls`` must present a certificate for its ``host`` (RFC 6125)."""

    # --- access --------------------------------------------------------------------------
    auth: Literal["auto", "off", "required"] = "auto"
    """HTTP authentication (OAuth2 bearer tokens). ``auto``: none while HTTP listens on a
    loopback address only (a first run on a laptop just works); listening elsewhere without it
    refuses to start. ``required``: every request but the discovery and token endpoints needs a
    token, wherever HTTP listens; DICOM associations from calling AE titles that are no
    declared peer are rejected. ``off``: no authentication anywhere (logged as a warning at
    every start: for a network that is trusted as a whole)."""
    auth_issuer: str | None = None
    """``iss`` of the tokens the built-in issuer signs (default: ``public_url``, else
    ``urn:pacsbridge``)."""
    auth_audience: str = "pacsbridge"
    """``aud`` of those tokens, and the audience a token must name."""
    auth_token_seconds: int = Field(default=300, ge=30, le=86400)
    """Lifetime of an access token."""
    auth_refresh_seconds: int = Field(default=28800, ge=60, le=30 * 86400)
    """Lifetime of a refresh token (each is used once)."""
    auth_keys_dir: Path | None = None
    """Folder of the signing keys (default ``<data_dir>/auth/keys``; created 0700 with the first
    key on first use). Processes that share tokens (several ``serve`` behind a load balancer)
    share this folder."""
    auth_external: list[ExternalIssuerSettings] = Field(default_factory=list)
    """Identity providers whose tokens are accepted besides the built-in issuer's."""
    dimse_query_from_any_ae: bool = False
    """C-FIND, C-MOVE and C-GET (which read PHI out) from any calling AE title, not only from
    declared peers (ignored when ``auth`` is ``required``). C-ECHO and C-STORE are open to any
    calling AE either way, as on Orthanc."""

    # --- HTTP --------------------------------------------------------------------------
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    cors_origins: list[str] = Field(default_factory=list)
    """Origins allowed to call the HTTP API from a browser (CORS), e.g. a viewer served
    elsewhere; ``["*"]`` allows any. Empty (default): no CORS headers."""
    http_header_timeout: float = Field(default=10.0, gt=0)
    """Seconds a client has to send a request's line and headers, counted from the connection
    (or from the first byte after a finished request and response on it); then 408 and the
    connection closes."""
    http_max_header_bytes: int = Field(default=65536, ge=4096)
    """The most bytes of a request line and headers; a larger request gets 431 and is closed."""
    http_keep_alive_timeout: int = Field(default=5, ge=1)
    """Seconds an idle keep-alive connection stays open between requests."""
    http_max_connections: int = Field(default=1000, ge=1)
    """Open HTTP connections (and requests in progress) beyond which requests get 503."""
    http_backlog: int = Field(default=2048, ge=1)
    """Connections the kernel queues before the server accepts them (listen backlog)."""

    @field_validator("public_url", "dicomweb_base_url")
    @classmethod
    def _valid_public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip().rstrip("/")
        if not _PUBLIC_URL.fullmatch(value):
            raise ValueError(
                f"{value!r} is not an http(s) URL of a host, an optional port and an optional "
                "path, without query or fragment (https://pacs.example)"
            )
        return value

    # --- stable studies and jobs ---------------------------------------------------------
    stable_age: float = Field(default=60.0, ge=1.0)
    """Seconds without a new instance after which a study is stable (its jobs are enqueued)."""
    stable_scan_interval: float = Field(default=5.0, gt=0)
    """How often the stable-study scanner looks for quiet studies."""
    job_max_attempts: int = Field(default=8, ge=1)
    """Attempts before a job is dead (a crashed worker's attempt counts)."""
    job_lease_seconds: float = Field(default=60.0, ge=1.0)
    """A claimed job is another worker's to take if not renewed for this long."""
    job_backoff_base: float = Field(default=5.0, ge=0)
    """Retry delay after the first failure; doubles with every further failure (jittered)."""
    job_backoff_max: float = Field(default=3600.0, ge=0)
    """Longest retry delay."""
    worker_in_serve: bool = True
    """``pacsbridge serve`` runs a job worker and the stable-study scanner in-process."""
    worker_poll_interval: float = Field(default=1.0, gt=0)
    """How long an idle worker sleeps before looking for jobs again."""
    worker_threads: int = Field(default=1, ge=1)
    """Jobs one process (``serve`` or ``worker``) runs at the same time."""
    extra_handlers: list[str] = Field(default_factory=list)
    """``module:function`` callables that register more job kinds (plugins, tests)."""
    job_retention_days: float = Field(default=7.0, ge=0)
    """Done jobs are deleted this many days after they finished (0: kept for ever); the
    stable-study scanner prunes them."""
    dead_job_retention_days: float = Field(default=0.0, ge=0)
    """Dead jobs (given up on, waiting for an operator's requeue) are deleted this many days
    after they finished; 0 (default): kept until requeued or deleted by hand."""

    # --- operations --------------------------------------------------------------------
    shutdown_timeout: float = Field(default=30.0, ge=0)
    """On SIGTERM or SIGINT ``serve`` stops accepting, then waits up to this many seconds for
    open DICOM associations and HTTP requests to finish (those still open are then aborted),
    and for running jobs to finish."""
    metrics_dir: Path | None = None
    """Folder where every process of this data dir (``serve``, its DICOM acceptor processes,
    ``pacsbridge worker``) keeps its Prometheus metrics for ``/metrics`` to sum (default
    ``<data_dir>/metrics``)."""
    metrics_loopback_without_auth: bool = False
    """``/metrics`` answers a client on a loopback address without a token (a Prometheus on the
    same host) even when ``auth`` is ``required``; elsewhere it needs the ``admin`` role."""

    # --- logging -----------------------------------------------------------------------
    log_level: str = "INFO"
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per line (ts, level, logger, msg, request_id and the fields
    of the record), for a log collector."""

    # --- structured (TOML) -------------------------------------------------------------
    peers: dict[str, PeerSettings] = Field(default_factory=dict)
    destinations: dict[str, DestinationSettings] = Field(default_factory=dict)
    """Where routes send studies: ``[destinations.<name>]``. A route may also name a peer (from
    ``[peers.*]`` or the ``/api/peers`` API) directly; names are resolved when a job runs."""
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    """Routing rules: ``[routes.<name>]``."""
    ai: AISettings = Field(default_factory=AISettings)
    """Models and their series selectors: ``[ai]`` and ``[ai.models.<name>]``."""
    fhir: FHIRSettings = Field(default_factory=FHIRSettings)
    """The FHIR R4 bridge: ``[fhir]`` (``PACSBRIDGE_FHIR='{"default_count": 50}'``)."""
    billing: BillingSettings = Field(default_factory=BillingSettings)
    """Billing: ``[billing]`` (``PACSBRIDGE_BILLING='{"currency": "CHF"}'``)."""
    audit: AuditSettings = Field(default_factory=AuditSettings)
    """The audit trail: ``[audit]`` (``PACSBRIDGE_AUDIT='{"retention_days": 3650}'``)."""
    events: EventsSettings = Field(default_factory=EventsSettings)
    """Event delivery: ``[events]`` and ``[events.subscriptions.<name>]``."""

    @field_validator("dicom_timezone")
    @classmethod
    def _valid_zone(cls, value: str | None) -> str | None:
        if value:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(
                    f"unknown time zone {value!r} (an IANA name such as Europe/Berlin)"
                ) from exc
        return value

    @field_validator("ae_title")
    @classmethod
    def _valid_ae_title(cls, value: str) -> str:
        # PS3.5 6.2: AE is at most 16 characters of the Default Character Repertoire,
        # no backslash or control characters; leading/trailing spaces are not significant.
        return validate_ae_title(value)

    @field_validator("peers")
    @classmethod
    def _valid_peers(cls, value: dict[str, PeerSettings]) -> dict[str, PeerSettings]:
        # A C-MOVE names its destination by AE title: two peers with one title are ambiguous.
        seen: dict[str, str] = {}
        for name, peer in value.items():
            validate_peer_name(name)
            if peer.ae_title in seen:
                raise ValueError(
                    f"peers {seen[peer.ae_title]!r} and {name!r} share AE title {peer.ae_title!r}"
                )
            seen[peer.ae_title] = name
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("PACSBRIDGE_CONFIG") or dotenv_settings().get("config")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings, dotenv_settings]
        if toml_path:
            if not Path(toml_path).is_file():
                raise FileNotFoundError(f"PACSBRIDGE_CONFIG names {toml_path}, which is not a file")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        sources.append(file_secret_settings)
        return tuple(sources)

    # --- derived -----------------------------------------------------------------------
    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'index.sqlite').resolve()}"

    @property
    def resolved_storage_url(self) -> str:
        if self.storage_url:
            return self.storage_url
        return (self.data_dir / "blobs").resolve().as_uri()

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict with secrets masked, for logs and ``/health``."""
        data = self.model_dump(mode="json")
        for key in ("s3_secret_key", "s3_access_key"):
            if data.get(key):
                data[key] = "***"
        if data.get("database_url"):
            data["database_url"] = _redact_url(data["database_url"])
        return data


def _redact_url(url: str) -> str:
    """Mask the password of ``scheme://user:password@host/db?password=…``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    userinfo, at, hostpart = rest.rpartition("@")  # the last @: passwords may hold one
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    location, q, query = hostpart.partition("?")
    if q:
        params = []
        for param in query.split("&"):
            name, eq, _value = param.partition("=")
            params.append(f"{name}=***" if eq and "password" in name.lower() else param)
        query = "&".join(params)
    return f"{scheme}://{userinfo}{at}{location}{q}{query}"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
