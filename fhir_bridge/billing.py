"""Billing as FHIR R4 resources: ChargeItemDefinition (the price list), ChargeItem (captured and
manual charges), Account (one per patient, with its balance), Invoice and PaymentReconciliation,
all views of ``billing``'s tables, read with SQL.

**Money** is FHIR ``Money`` (``value`` + ``currency``, the site's ISO 4217 currency); values are
exact to the cent. Priced lines keep their sign: a discount is a negative amount, so the lines
of a charge (and the price components of an invoice line) add up to its gross.

**Extensions** (documented in the CapabilityStatement):

- ``urn:pacsbridge:fhir:StructureDefinition:charge-price`` on ChargeItem: ``net``, ``tax``,
  ``total`` (``valueMoney``) and one ``component`` per priced line (``type`` ``valueCode``:
  base | surcharge | discount | tax, ``code`` ``valueCodeableConcept``, ``amount``
  ``valueMoney``), as Invoice.lineItem.priceComponent does for invoices;
- ``urn:pacsbridge:fhir:StructureDefinition:account-balance`` on Account: ``billed`` (the gross
  of its issued and balanced invoices), ``paid``, ``outstanding`` (billed - paid) and
  ``overdue`` (the outstanding amount of invoices past their due date), each ``valueMoney``;
- ``urn:pacsbridge:fhir:StructureDefinition:invoice-balance`` on Invoice: ``paid``,
  ``outstanding``, ``dueDate`` (``valueDate``) and ``overdue`` (``valueBoolean``);
- ``urn:pacsbridge:fhir:StructureDefinition:change`` on the versions in a ``_history``:
  ``who`` and ``why`` (``valueString``) of the change that made the version (the audit of
  money: ``charge_event`` / ``invoice_event``).
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from sqlalchemy import Select, Text, and_, cast, exists, false, func, literal, or_, select
from sqlalchemy.orm import Session

from billing.invoices import BALANCED, ISSUED
from billing.models import (
    BillingAccount,
    ChargeEvent,
    ChargeItem,
    ChargeItemDefinition,
    Invoice,
    InvoiceEvent,
    InvoiceLine,
    Payment,
    PaymentReconciliation,
    PriceList,
)
from fhir_bridge import identity, search
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError, not_found
from fhir_bridge.imaging_study import study_uid_of
from fhir_bridge.provider import Include, Provider, meta
from fhir_bridge.rest import RenderedJSON, compact_json, instant
from fhir_bridge.search import SearchParam

SEARCH_PARAMETER = "http://hl7.org/fhir/SearchParameter/"
EXTENSION = "urn:pacsbridge:fhir:StructureDefinition:"
CHARGE_PRICE = EXTENSION + "charge-price"
ACCOUNT_BALANCE = EXTENSION + "account-balance"
INVOICE_BALANCE = EXTENSION + "invoice-balance"
CHANGE = EXTENSION + "change"
CHARGE_IDENTIFIER = "urn:pacsbridge:charge"
INVOICE_IDENTIFIER = "urn:pacsbridge:invoice"

#: Code systems of the price list (``billing.prices.CODE_SYSTEMS``) as FHIR systems.
CODE_SYSTEMS = {
    "loinc": identity.LOINC,
    "radlex": "http://www.radlex.org",
    "local": "urn:pacsbridge:procedure-code",
    "cpt": "http://www.ama-assn.org/go/cpt",
}
CODE_SYSTEM_OF = {system: name for name, system in CODE_SYSTEMS.items()}
_ACT_CODE = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
_PAYMENT_TYPE = "http://terminology.hl7.org/CodeSystem/payment-type"
ZERO = Decimal("0.00")


def money(value: Decimal | None, currency: str) -> dict[str, Any]:
    """FHIR Money: the value exact to the cent (a JSON number of at most 2 decimals)."""
    amount = Decimal(value or 0).quantize(Decimal("0.01"))
    return {"value": float(amount), "currency": currency}


def amount_of(value: dict[str, Any] | None, currency: str, where: str) -> Decimal | None:
    """A Money of a request as Decimal in the site's currency (422 for another)."""
    if not value or value.get("value") is None:
        return None
    given = value.get("currency")
    if given not in (None, currency):
        raise FHIRError(
            422,
            f"{where}: currency {given!r}; this site bills in {currency}",
            code="business-rule",
            expression=[where],
        )
    amount = Decimal(str(value["value"]))
    if amount != amount.quantize(Decimal("0.01")):
        raise FHIRError(
            422, f"{where}: {amount} has more than 2 decimals", code="value", expression=[where]
        )
    return amount.quantize(Decimal("0.01"))


def code_concept(code_system: str | None, code: str | None, display: str) -> dict[str, Any]:
    if code is None:
        return {"text": display or "charge"}
    coding: dict[str, Any] = {
        "system": CODE_SYSTEMS.get(code_system or "local", CODE_SYSTEMS["local"]),
        "code": code,
    }
    if display:
        coding["display"] = display
    concept: dict[str, Any] = {"coding": [coding]}
    if display:
        concept["text"] = display
    return concept


def _component_concept(line: dict[str, Any]) -> dict[str, Any]:
    concept: dict[str, Any] = {"coding": [{"system": CODE_SYSTEMS["local"], "code": line["code"]}]}
    if line.get("description"):
        concept["coding"][0]["display"] = line["description"]
        concept["text"] = line["description"]
    return concept


def _change_extension(actor: str, reason: str | None) -> dict[str, Any]:
    parts = [{"url": "who", "valueString": actor}]
    if reason:
        parts.append({"url": "why", "valueString": reason})
    return {"url": CHANGE, "extension": parts}


def _token_code(value: str, code_system_col: Any, code_col: Any) -> Any:
    system, code = search.token(value)
    if code is None:
        name = CODE_SYSTEM_OF.get(system or "")
        return code_system_col == name if name else false()
    if system is None or system == "":
        return code_col == code
    name = CODE_SYSTEM_OF.get(system)
    if name is None:
        return false()
    return and_(code_col == code, code_system_col == name)


def _date_on(name: str, column: Any) -> Any:
    return lambda v, m: search.date_condition(
        search.parse_date(v, name), column, column, lambda d: d.date()
    )


def _instant_on(name: str, column: Any) -> Any:
    return lambda v, m: search.date_condition(
        search.parse_date(v, name), column, column, search.utc_bound
    )


def _accounts_of_patient(value: str) -> Any:
    patient = search.row_id(search.reference_id(value, "Patient"))
    if patient is None:
        return None
    return select(BillingAccount.id).where(BillingAccount.patient_fk == patient)


def _patient_reference(account: BillingAccount | Any, ctx: Context) -> dict[str, Any]:
    """Patient/<id>, or (the patient deleted from the archive) its identifier."""
    if account.patient_fk is not None:
        return {"reference": f"Patient/{account.patient_fk}"}
    return {
        "identifier": {
            "system": identity.system_for_issuer(ctx.settings.fhir, account.issuer_of_patient_id),
            "value": account.patient_id,
        },
        "display": f"Patient ID {account.patient_id}",
    }


def _id_param(column: Any) -> SearchParam:
    return SearchParam(
        "_id",
        "token",
        "Logical id",
        lambda v, m: column == (search.row_id(v) or -1),
        definition=SEARCH_PARAMETER + "Resource-id",
    )


def _patient_params(params: dict[str, SearchParam], resource: str, condition: Any) -> None:
    """``patient`` and ``subject``: the patient (Patient/id)."""
    for name in ("patient", "subject"):
        params[name] = SearchParam(
            name,
            "reference",
            "The patient (Patient/id)",
            condition,
            targets=("Patient",),
            definition=SEARCH_PARAMETER + f"{resource}-{name}",
        )


def _status_param(column: Any, documentation: str, definition: str | None) -> SearchParam:
    return SearchParam(
        "status",
        "token",
        documentation,
        lambda v, m: column == (search.token(v)[1] or ""),
        definition=definition,
    )


def _last_updated_param(column: Any, documentation: str) -> SearchParam:
    return SearchParam(
        "_lastUpdated",
        "date",
        documentation,
        _instant_on("_lastUpdated", column),
        definition=SEARCH_PARAMETER + "Resource-lastUpdated",
    )


class _RowProvider(Provider):
    """A type whose ids are the row ids of one table (``model``)."""

    model: Any = None

    def id_column(self) -> Any:
        return self.model.id

    def base_select(self) -> Select[Any]:
        return select(self.model.id)

    def row_ids_for(self, session: Session, resource_ids: Sequence[str]) -> list[Any]:
        return [i for i in (search.row_id(r) for r in resource_ids) if i is not None]

    def read(self, ctx: Context, session: Session, resource_id: str) -> dict[str, Any]:
        row_id = search.row_id(resource_id)
        found = self.load(ctx, session, [row_id]) if row_id is not None else []
        if not found:
            raise not_found(self.type, resource_id)
        return found[0]

    def vread(
        self, ctx: Context, session: Session, resource_id: str, version: str
    ) -> dict[str, Any]:
        if "history-instance" not in self.interactions:
            return super().vread(ctx, session, resource_id, version)
        for resource in self.history(ctx, session, resource_id):
            if resource["meta"]["versionId"] == version:
                return resource
        raise FHIRError(404, f"{self.type}/{resource_id} has no version {version!r}")


# --- ChargeItemDefinition ------------------------------------------------------------------


class ChargeItemDefinitionProvider(_RowProvider):
    model = ChargeItemDefinition
    type = "ChargeItemDefinition"
    compartment = None  # outside the Patient compartment; prices only
    profile = "http://hl7.org/fhir/StructureDefinition/ChargeItemDefinition"
    interactions = ("read", "search-type")
    operations = (("apply", "http://hl7.org/fhir/OperationDefinition/ChargeItemDefinition-apply"),)
    documentation = (
        "The price list (pacsbridge billing prices load): one definition per priced procedure "
        "(technical or professional), keyed by its code, else by modality + body part "
        "(applicability). status active: prices new charges; retired: an older price list "
        "version, kept for the charges it priced. propertyGroup: the base price, then one "
        "group per component (surcharge, discount, tax) with the condition it applies on "
        "(applicability.expression: contrast, after_hours, weekend). "
        "$apply (POST, Parameters chargeItem=Reference(ChargeItem)) prices a charge by the "
        "definition and returns the priced ChargeItem without storing it."
    )

    def __init__(self) -> None:
        super().__init__()
        p = self.params
        p["_id"] = _id_param(ChargeItemDefinition.id)
        p["code"] = SearchParam(
            "code",
            "token",
            "The procedure code (system|code: LOINC, RadLex, local or CPT)",
            lambda v, m: _token_code(
                v, ChargeItemDefinition.code_system, ChargeItemDefinition.code
            ),
            definition=SEARCH_PARAMETER + "ChargeItemDefinition-code",
        )
        p["status"] = SearchParam(
            "status",
            "token",
            "active (the price list in use) | retired (an older version)",
            lambda v, m: ChargeItemDefinition.active.is_(search.token(v)[1] == "active"),
            definition=SEARCH_PARAMETER + "ChargeItemDefinition-status",
        )
        p["effective"] = SearchParam(
            "effective",
            "date",
            "A day the definition is in force on (eq: in force on that day)",
            self._effective,
            definition=SEARCH_PARAMETER + "ChargeItemDefinition-effective",
        )
        p["title"] = SearchParam(
            "title",
            "string",
            "The procedure's name (starts with; :contains, :exact)",
            self._title,
            modifiers=frozenset({"contains", "exact"}),
            definition=SEARCH_PARAMETER + "ChargeItemDefinition-title",
        )
        p["version"] = SearchParam(
            "version",
            "token",
            "The price list version (its id)",
            lambda v, m: (
                ChargeItemDefinition.price_list_fk == (search.row_id(search.token(v)[1]) or -1)
            ),
            definition=SEARCH_PARAMETER + "ChargeItemDefinition-version",
        )
        self.sorts = {"_id": ChargeItemDefinition.id, "title": ChargeItemDefinition.display}

    @staticmethod
    def _effective(value: str, modifier: str | None) -> Any:
        rng = search.parse_date(value, "effective")
        low, high = rng.low.date(), rng.high.date()
        starts, ends = ChargeItemDefinition.effective_from, ChargeItemDefinition.effective_to
        if rng.prefix in ("eq", "ap"):
            return and_(starts <= low, or_(ends.is_(None), ends >= high))
        if rng.prefix in ("ge", "gt", "sa"):
            return or_(ends.is_(None), ends >= low if rng.prefix == "ge" else ends > high)
        if rng.prefix in ("le", "lt", "eb"):
            return starts <= high if rng.prefix == "le" else starts < low
        return ~and_(starts <= low, or_(ends.is_(None), ends >= high))  # ne

    @staticmethod
    def _title(value: str, modifier: str | None) -> Any:
        pattern, exact = search.string_pattern(value, modifier)
        column = ChargeItemDefinition.display
        if exact:
            return column == value
        return func.lower(column).like(pattern.lower(), escape="\\")

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        rows = {
            d.id: (d, loaded_at)
            for d, loaded_at in session.execute(
                select(ChargeItemDefinition, PriceList.loaded_at)
                .join(PriceList, PriceList.id == ChargeItemDefinition.price_list_fk)
                .where(ChargeItemDefinition.id.in_(list(row_ids)))
            )
        }
        return [self.resource(ctx, *rows[i]) for i in row_ids if i in rows]

    @staticmethod
    def resource(ctx: Context, d: ChargeItemDefinition, loaded_at: datetime) -> dict[str, Any]:
        url = ctx.url("ChargeItemDefinition", str(d.id))
        applicability = []
        key = []
        if d.modality:
            key.append(f"modality = '{d.modality}'")
        if d.body_part:
            key.append(f"body part = '{d.body_part}'")
        if d.laterality:
            key.append(f"laterality = '{d.laterality}'")
        if d.contrast is not None:
            key.append("with contrast" if d.contrast else "without contrast")
        if key:
            applicability.append(
                {
                    "description": ("Procedure code, else: " if d.code else "Studies with ")
                    + " and ".join(key),
                    "language": "text/plain",
                    "expression": " and ".join(key),
                }
            )
        groups: list[dict[str, Any]] = [
            {
                "priceComponent": [
                    {
                        "type": "base",
                        "code": {"text": "base amount"},
                        "amount": money(d.base_amount, d.currency),
                    }
                ]
            }
        ]
        for component in d.components:
            item: dict[str, Any] = {
                "type": component["type"],
                "code": _component_concept(component),
            }
            if component.get("amount") is not None:
                amount = Decimal(component["amount"])
                item["amount"] = money(
                    -amount if component["type"] == "discount" else amount, d.currency
                )
            elif component.get("factor") is not None:
                # x1.25: a quarter of the base more (a discount x0.9: a tenth less).
                item["factor"] = float(abs(Decimal(component["factor"]) - 1))
            elif component.get("percent") is not None:
                item["factor"] = float(Decimal(component["percent"]) / 100)
            group: dict[str, Any] = {"priceComponent": [item]}
            if component.get("condition"):
                group["applicability"] = [
                    {
                        "description": f"when the study has {component['condition']}",
                        "language": "text/plain",
                        "expression": component["condition"],
                    }
                ]
            groups.append(group)
        resource: dict[str, Any] = {
            "resourceType": "ChargeItemDefinition",
            "id": str(d.id),
            "meta": meta(1, loaded_at),
            "url": url,
            "identifier": [
                {"system": "urn:pacsbridge:price-list", "value": f"{d.price_list_fk}:{d.line}"}
            ],
            "version": str(d.price_list_fk),
            "title": d.display or (d.code or "charge"),
            "status": "active" if d.active else "retired",
            "date": instant(loaded_at),
            "description": f"{d.kind} charge",
            "code": code_concept(d.code_system, d.code, d.display),
            "effectivePeriod": {"start": d.effective_from.isoformat()},
            "propertyGroup": groups,
        }
        if d.effective_to is not None:
            resource["effectivePeriod"]["end"] = d.effective_to.isoformat()
        if applicability:
            resource["applicability"] = applicability
        return resource


# --- ChargeItem ----------------------------------------------------------------------------


def _service_condition(value: str) -> Any:
    study = search.reference_id(value, "ImagingStudy")
    if study is not None:
        return and_(
            ChargeItem.service_kind == "study", ChargeItem.service_uid == study_uid_of(study)
        )
    report = search.reference_id(value, "DiagnosticReport")
    if report is not None:
        return and_(ChargeItem.service_kind == "report", ChargeItem.service_uid == report)
    return false()


class ChargeItemProvider(_RowProvider):
    model = ChargeItem
    type = "ChargeItem"
    compartment = ("subject",)  # R4 compartmentdefinition-patient
    profile = "http://hl7.org/fhir/StructureDefinition/ChargeItem"
    interactions = (
        "read",
        "vread",
        "search-type",
        "create",
        "update",
        "history-instance",
    )
    creatable = True
    updatable = True
    documentation = (
        "Charges: technical (captured when a study is stable: service = the ImagingStudy), "
        "professional (its report signed: service = the DiagnosticReport, performer = the "
        "verifying radiologist) and manual (created here: code, subject, occurrence and "
        "priceOverride (the unit price) or definitionCanonical, quantity). status: planned "
        "(no price yet: note says why), billable, billed (on an issued invoice: immutable, "
        "corrected by a credit charge), entered-in-error (voided). The price: extension "
        f"{CHARGE_PRICE} (net, tax, total and the priced lines). Update (PUT, If-Match) "
        "changes a manual charge that is not invoiced, prices a planned charge by hand "
        "(priceOverride) or voids one (entered-in-error, with a reason in overrideReason). "
        "_history: every version, with who and why."
    )

    def __init__(self) -> None:
        super().__init__()
        p = self.params
        p["_id"] = _id_param(ChargeItem.id)
        _patient_params(p, "ChargeItem", self._patient)
        p["status"] = _status_param(
            ChargeItem.status, "planned | billable | billed | entered-in-error", None
        )
        p["service"] = SearchParam(
            "service",
            "reference",
            "What was charged for: ImagingStudy/<uid> or DiagnosticReport/<id>",
            lambda v, m: _service_condition(v),
            targets=("ImagingStudy", "DiagnosticReport"),
            definition=SEARCH_PARAMETER + "ChargeItem-service",
        )
        p["code"] = SearchParam(
            "code",
            "token",
            "The procedure code (system|code)",
            lambda v, m: _token_code(v, ChargeItem.code_system, ChargeItem.code),
            definition=SEARCH_PARAMETER + "ChargeItem-code",
        )
        p["entered-date"] = SearchParam(
            "entered-date",
            "date",
            "When the charge was entered (captured or created)",
            _instant_on("entered-date", ChargeItem.created_at),
            definition=SEARCH_PARAMETER + "ChargeItem-entered-date",
        )
        p["occurrence"] = SearchParam(
            "occurrence",
            "date",
            "The day charged for (the study date, the report's signing day)",
            _date_on("occurrence", ChargeItem.occurred_on),
            definition=SEARCH_PARAMETER + "ChargeItem-occurrence",
        )
        p["account"] = SearchParam(
            "account",
            "reference",
            "The Account (Account/id)",
            lambda v, m: (
                ChargeItem.account_fk == (search.row_id(search.reference_id(v, "Account")) or -1)
            ),
            targets=("Account",),
            definition=SEARCH_PARAMETER + "ChargeItem-account",
        )
        p["identifier"] = SearchParam(
            "identifier",
            "token",
            f"{CHARGE_IDENTIFIER}|<key> (technical|<study uid>|…, professional|<report>, "
            "manual|<the sender's identifier>)",
            self._identifier,
            definition=SEARCH_PARAMETER + "ChargeItem-identifier",
        )
        p["_lastUpdated"] = _last_updated_param(
            ChargeItem.updated_at, "When the charge last changed"
        )
        self.sorts = {
            "_id": ChargeItem.id,
            "entered-date": ChargeItem.created_at,
            "occurrence": ChargeItem.occurred_on,
            "_lastUpdated": ChargeItem.updated_at,
        }
        self.includes = {
            "ChargeItem:account": Include("ChargeItem", "account", "Account"),
            "ChargeItem:patient": Include("ChargeItem", "patient", "Patient"),
            "ChargeItem:subject": Include("ChargeItem", "subject", "Patient"),
        }

    @staticmethod
    def _patient(value: str, modifier: str | None) -> Any:
        accounts = _accounts_of_patient(value)
        return false() if accounts is None else ChargeItem.account_fk.in_(accounts)

    @staticmethod
    def _identifier(value: str, modifier: str | None) -> Any:
        system, code = search.token(value)
        if code is None or system not in (None, CHARGE_IDENTIFIER):
            return false()
        return ChargeItem.idempotency_key == code

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        rows = {
            charge.id: (charge, account)
            for charge, account in session.execute(
                select(ChargeItem, BillingAccount)
                .join(BillingAccount, BillingAccount.id == ChargeItem.account_fk)
                .where(ChargeItem.id.in_(list(row_ids)))
            )
        }
        return [self.resource(ctx, *rows[i]) for i in row_ids if i in rows]

    def history(self, ctx: Context, session: Session, resource_id: str) -> list[dict[str, Any]]:
        current = self.read(ctx, session, resource_id)
        events = session.scalars(
            select(ChargeEvent)
            .where(ChargeEvent.charge_fk == int(resource_id))
            .order_by(ChargeEvent.version.desc(), ChargeEvent.id.desc())
        ).all()
        currency = ctx.settings.billing.currency
        return [_charge_version(current, e, currency) for e in events] or [current]

    @staticmethod
    def resource(ctx: Context, charge: ChargeItem, account: BillingAccount) -> dict[str, Any]:
        currency = charge.currency
        resource: dict[str, Any] = {
            "resourceType": "ChargeItem",
            "id": str(charge.id),
            "meta": meta(charge.version, charge.updated_at),
            "identifier": [{"system": CHARGE_IDENTIFIER, "value": charge.idempotency_key}],
        }
        kind, _, given = charge.idempotency_key.partition("|")
        system, bar, value = given.partition("|")
        if kind == "manual" and bar and value:
            # The sender's identifier of a manual charge, as it gave it.
            sender: dict[str, Any] = {"value": value}
            if system:
                sender["system"] = system
            resource["identifier"].append(sender)
        if charge.definition_fk is not None:
            resource["definitionCanonical"] = [
                ctx.url("ChargeItemDefinition", str(charge.definition_fk))
            ]
        resource["status"] = charge.status
        resource["code"] = code_concept(charge.code_system, charge.code, charge.display)
        resource["subject"] = _patient_reference(account, ctx)
        resource["occurrenceDateTime"] = charge.occurred_on.isoformat()
        if charge.performer:
            resource["performer"] = [
                {
                    "function": {"text": "reading radiologist"},
                    "actor": {
                        "display": identity.person_display(charge.performer) or charge.performer
                    },
                }
            ]
        if charge.quantity != 1:
            resource["quantity"] = {"value": charge.quantity}
        hand_priced = charge.definition_fk is None and charge.net is not None
        if hand_priced:
            base = next((line for line in charge.lines if line.get("type") == "base"), None)
            if base is not None:
                resource["priceOverride"] = money(
                    Decimal(base["amount"]) / max(charge.quantity, 1), currency
                )
                if charge.note:
                    resource["overrideReason"] = charge.note
        resource["enteredDate"] = instant(charge.created_at)
        if charge.service_kind == "study" and charge.service_uid:
            resource["service"] = [{"reference": f"ImagingStudy/{charge.service_uid}"}]
        elif charge.service_kind == "report" and charge.service_uid:
            resource["service"] = [{"reference": f"DiagnosticReport/{charge.service_uid}"}]
        resource["account"] = [{"reference": f"Account/{charge.account_fk}"}]
        notes = []
        if charge.review_reason:
            notes.append(
                {"text": f"for review: {charge.review_reason}"}
                if charge.status == "planned"
                else {"text": charge.review_reason}
            )
        if charge.note and not hand_priced:
            notes.append({"text": charge.note})
        if notes:
            resource["note"] = notes
        if charge.net is not None:
            parts: list[dict[str, Any]] = [
                {"url": "net", "valueMoney": money(charge.net, currency)},
                {"url": "tax", "valueMoney": money(charge.tax, currency)},
                {"url": "total", "valueMoney": money(charge.total, currency)},
            ]
            for line in charge.lines:
                parts.append(
                    {
                        "url": "component",
                        "extension": [
                            {"url": "type", "valueCode": line["type"]},
                            {"url": "code", "valueCodeableConcept": _component_concept(line)},
                            {
                                "url": "amount",
                                "valueMoney": money(Decimal(line["amount"]), currency),
                            },
                        ],
                    }
                )
            resource["extension"] = [{"url": CHARGE_PRICE, "extension": parts}]
        return resource


def _charge_version(current: dict[str, Any], event: ChargeEvent, currency: str) -> dict[str, Any]:
    """The charge as of one of its events — its status and totals then (what changes a
    captured charge) — with who changed it and why."""
    change = _change_extension(event.actor, event.reason)
    if event.version == int(current["meta"]["versionId"]):
        version = dict(current)
        version["extension"] = [*current.get("extension", []), change]
    else:
        version = {k: v for k, v in current.items() if k not in ("extension", "priceOverride")}
        version["status"] = event.status
        extensions = []
        if event.net is not None:
            extensions.append(
                {
                    "url": CHARGE_PRICE,
                    "extension": [
                        {"url": "net", "valueMoney": money(event.net, currency)},
                        {"url": "total", "valueMoney": money(event.total, currency)},
                    ],
                }
            )
        version["extension"] = [*extensions, change]
    version["meta"] = meta(event.version, event.at)
    return version


# --- Account -------------------------------------------------------------------------------


def balances(
    session: Session, account_ids: Sequence[int], today: date
) -> dict[int, dict[str, Decimal]]:
    """billed / paid / outstanding / overdue of accounts, in two queries (see
    ``billing.invoices.balance``)."""
    out = {
        i: {"billed": ZERO, "paid": ZERO, "outstanding": ZERO, "overdue": ZERO} for i in account_ids
    }
    if not account_ids:
        return out
    paid_by_invoice = (
        select(Payment.invoice_fk, func.sum(Payment.amount).label("paid"))
        .group_by(Payment.invoice_fk)
        .subquery()
    )
    rows = session.execute(
        select(Invoice.account_fk, Invoice.gross, Invoice.due_on, paid_by_invoice.c.paid)
        .outerjoin(paid_by_invoice, paid_by_invoice.c.invoice_fk == Invoice.id)
        .where(Invoice.account_fk.in_(list(account_ids)), Invoice.status.in_((ISSUED, BALANCED)))
    )
    for account, gross, due_on, paid in rows:
        paid = Decimal(paid or 0).quantize(Decimal("0.01"))
        figures = out[account]
        figures["billed"] += gross
        figures["paid"] += paid
        figures["outstanding"] += gross - paid
        if due_on is not None and due_on < today:
            figures["overdue"] += gross - paid
    return out


class AccountProvider(_RowProvider):
    model = BillingAccount
    type = "Account"
    compartment = ("subject",)  # R4 compartmentdefinition-patient
    profile = "http://hl7.org/fhir/StructureDefinition/Account"
    interactions = ("read", "vread", "search-type", "update")
    updatable = True
    documentation = (
        "One account per patient, created with its first charge. Its balance, in the "
        f"extension {ACCOUNT_BALANCE}: billed (the gross of its issued and balanced invoices), "
        "paid, outstanding (billed - paid) and overdue (outstanding past the due date), each "
        "valueMoney; the patient's figures are those of Account?patient=Patient/<id>. "
        "Update (PUT, If-Match) sets name, status (active | inactive), guarantor and coverage."
    )

    def __init__(self) -> None:
        super().__init__()
        p = self.params
        p["_id"] = _id_param(BillingAccount.id)
        _patient_params(
            p,
            "Account",
            lambda v, m: (
                BillingAccount.patient_fk
                == (search.row_id(search.reference_id(v, "Patient")) or -1)
            ),
        )
        p["status"] = _status_param(
            BillingAccount.status, "active | inactive", SEARCH_PARAMETER + "Account-status"
        )
        self.sorts = {"_id": BillingAccount.id}
        self.includes = {
            "Account:patient": Include("Account", "patient", "Patient"),
            "Account:subject": Include("Account", "subject", "Patient"),
        }

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        accounts = {
            a.id: a
            for a in session.scalars(
                select(BillingAccount).where(BillingAccount.id.in_(list(row_ids)))
            )
        }
        figures = balances(session, list(accounts), datetime.now(UTC).date())
        return [self.resource(ctx, accounts[i], figures[i]) for i in row_ids if i in accounts]

    @staticmethod
    def resource(
        ctx: Context, account: BillingAccount, figures: dict[str, Decimal]
    ) -> dict[str, Any]:
        currency = ctx.settings.billing.currency
        resource: dict[str, Any] = {
            "resourceType": "Account",
            "id": str(account.id),
            "meta": meta(account.version, account.updated_at or account.created_at),
            "extension": [
                {
                    "url": ACCOUNT_BALANCE,
                    "extension": [
                        {"url": name, "valueMoney": money(figures[name], currency)}
                        for name in ("billed", "paid", "outstanding", "overdue")
                    ],
                }
            ],
            "identifier": [
                {
                    "system": identity.system_for_issuer(
                        ctx.settings.fhir, account.issuer_of_patient_id
                    ),
                    "value": account.patient_id,
                }
            ],
            "status": account.status,
            "type": {
                "coding": [
                    {"system": _ACT_CODE, "code": "PBILLACCT", "display": "patient billing account"}
                ]
            },
            "name": account.name or f"Patient ID {account.patient_id}",
            "subject": [_patient_reference(account, ctx)],
        }
        if account.coverage:
            resource["coverage"] = account.coverage
        if account.guarantor:
            resource["guarantor"] = account.guarantor
        return resource


# --- Invoice -------------------------------------------------------------------------------


class PriceComponents:
    """Invoice.lineItem of the lines of one invoice, their priceComponent from their components
    as ``billing`` stores them (``invoice_line.components``: the charge's priced lines, JSON
    ``[{"type", "code", "description", "amount"}]``, amounts as decimal strings), read as
    their JSON text. An invoice's lines come from a price list: most repeat the components
    of others, so each distinct text is decoded and rendered once (items and their compact
    JSON), and each distinct component once; the totals per type are summed in ``Decimal``.
    """

    def __init__(self, currency: str) -> None:
        self.currency = currency
        # stored text -> (priceComponent items, the JSON that ends the line's item, sums)
        self._lines: dict[str, tuple[list[dict[str, Any]], str, dict[str, Decimal]]] = {}
        self._components: dict[tuple[str, str, str, str], tuple[dict[str, Any], str]] = {}
        self._concepts: dict[tuple[str, str], dict[str, Any]] = {}
        self._counts: Counter[str] = Counter()

    def line_items(self, lines: Sequence[Any]) -> RenderedJSON:
        """Invoice.lineItem of rows (``position``, ``charge_fk``, ``description``, ``code``,
        ``components`` as stored text), in order, with their compact JSON text."""
        items = []
        texts = []
        strings: dict[str, str] = {}
        rendered = self._lines
        for line in lines:
            position, charge, stored = line.position, line.charge_fk, line.components
            found = rendered.get(stored)
            if found is None:
                found = self._render(stored)
            self._counts[stored] += 1
            display = line.description or line.code or f"charge {charge}"
            quoted = strings.get(display)
            if quoted is None:
                quoted = strings[display] = json.dumps(display, ensure_ascii=False)
            item: dict[str, Any] = {
                "sequence": position,
                "chargeItemReference": {"reference": f"ChargeItem/{charge}", "display": display},
            }
            if found[0]:
                item["priceComponent"] = found[0]
            items.append(item)
            # The item's compact JSON, as compact_json writes the dict.
            texts.append(
                f'{{"sequence":{position},"chargeItemReference":{{"reference":'
                f'"ChargeItem/{charge}","display":{quoted}}}{found[1]}'
            )
        return RenderedJSON(items, "[" + ",".join(texts) + "]")

    def _render(self, stored: str) -> tuple[list[dict[str, Any]], str, dict[str, Decimal]]:
        items: list[dict[str, Any]] = []
        texts: list[str] = []
        sums: dict[str, Decimal] = {}
        for line in json.loads(stored):
            amount = line["amount"]  # a decimal string of 2 decimals
            sums[line["type"]] = sums.get(line["type"], ZERO) + Decimal(amount)
            item, text = self._component(line, amount)
            items.append(item)
            texts.append(text)
        end = f',"priceComponent":[{",".join(texts)}]}}' if items else "}"
        found = self._lines[stored] = (items, end, sums)
        return found

    def _component(self, line: dict[str, Any], amount: str) -> tuple[dict[str, Any], str]:
        description = line.get("description") or ""
        key = (line["type"], line["code"], description, amount)
        found = self._components.get(key)
        if found is None:
            concept = self._concepts.get(key[1:3])
            if concept is None:
                concept = self._concepts[key[1:3]] = _component_concept(line)
            item = {
                "type": line["type"],
                "code": concept,
                "amount": {"value": float(amount), "currency": self.currency},
            }
            found = self._components[key] = (item, compact_json(item))
        return found

    def totals(self) -> dict[str, Decimal]:
        """The sum of the components of each type over the lines rendered."""
        totals: dict[str, Decimal] = {}
        for stored, count in self._counts.items():
            for kind, amount in self._lines[stored][2].items():
                totals[kind] = totals.get(kind, ZERO) + amount * count
        return totals


class InvoiceProvider(_RowProvider):
    model = Invoice
    type = "Invoice"
    compartment = ("subject",)  # R4: subject, patient (the same here), recipient
    profile = "http://hl7.org/fhir/StructureDefinition/Invoice"
    interactions = ("read", "vread", "search-type", "create", "update", "history-instance")
    creatable = True
    updatable = True
    documentation = (
        "Invoices of an account. Create (POST, status draft) from the billable charges of an "
        "account (account) or from charges (lineItem.chargeItemReference). Update (PUT, "
        "If-Match) changes the status: draft -> issued (immutable from then on, its charges "
        "billed, due after the payment terms), draft or issued without payments -> cancelled "
        "(cancelledReason required) or entered-in-error; balanced follows from payments "
        "(PaymentReconciliation). A draft takes more charges (lineItem added). Lines carry "
        "their price components (a discount negative); totalNet and totalGross are their sums. "
        f"Paid, outstanding, due date and overdue: the extension {INVOICE_BALANCE}. "
        "Search overdue=true for issued invoices past their due date."
    )

    def __init__(self) -> None:
        super().__init__()
        p = self.params
        p["_id"] = _id_param(Invoice.id)
        _patient_params(p, "Invoice", self._patient)
        p["status"] = _status_param(
            Invoice.status,
            "draft | issued | balanced | cancelled | entered-in-error",
            SEARCH_PARAMETER + "Invoice-status",
        )
        p["date"] = SearchParam(
            "date",
            "date",
            "When issued (a draft: when created)",
            _instant_on("date", func.coalesce(Invoice.issued_at, Invoice.created_at)),
            definition=SEARCH_PARAMETER + "Invoice-date",
        )
        p["account"] = SearchParam(
            "account",
            "reference",
            "The Account (Account/id)",
            lambda v, m: (
                Invoice.account_fk == (search.row_id(search.reference_id(v, "Account")) or -1)
            ),
            targets=("Account",),
            definition=SEARCH_PARAMETER + "Invoice-account",
        )
        p["overdue"] = SearchParam(
            "overdue",
            "token",
            "true: issued, not paid in full and past its due date; false: the others",
            self._overdue,
        )
        p["totalgross"] = SearchParam(
            "totalgross",
            "quantity",
            "[prefix]amount (the gross)",
            lambda v, m: search.number_condition(
                *search.parse_number(v.split("|")[0], "totalgross"), Invoice.gross
            ),
            definition=SEARCH_PARAMETER + "Invoice-totalgross",
        )
        p["_lastUpdated"] = _last_updated_param(Invoice.updated_at, "When the invoice last changed")
        self.sorts = {
            "_id": Invoice.id,
            "date": func.coalesce(Invoice.issued_at, Invoice.created_at),
            "_lastUpdated": Invoice.updated_at,
        }
        self.includes = {
            "Invoice:account": Include("Invoice", "account", "Account"),
            "Invoice:patient": Include("Invoice", "patient", "Patient"),
            "Invoice:subject": Include("Invoice", "subject", "Patient"),
        }

    @staticmethod
    def _patient(value: str, modifier: str | None) -> Any:
        accounts = _accounts_of_patient(value)
        return false() if accounts is None else Invoice.account_fk.in_(accounts)

    @staticmethod
    def _overdue(value: str, modifier: str | None) -> Any:
        wanted = search.token(value)[1]
        if wanted not in ("true", "false"):
            raise FHIRError(400, f"overdue={value!r}: true or false", expression=["overdue"])
        paid = (
            select(func.coalesce(func.sum(Payment.amount), 0))
            .where(Payment.invoice_fk == Invoice.id)
            .scalar_subquery()
        )
        condition = and_(
            Invoice.status == ISSUED,
            Invoice.due_on.is_not(None),  # a NULL here would make "not overdue" NULL too
            Invoice.due_on < datetime.now(UTC).date(),
            Invoice.gross > paid,
        )
        return condition if wanted == "true" else ~condition

    def head(self, session: Session, resource_id: str) -> dict[str, Any]:
        """id and meta alone (the answer to a write under ``Prefer: return=minimal``)."""
        row = session.execute(
            select(Invoice.version, Invoice.updated_at).where(Invoice.id == int(resource_id))
        ).one()
        return {"resourceType": "Invoice", "id": resource_id, "meta": meta(row[0], row[1])}

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        ids = list(row_ids)
        invoices = {
            invoice.id: (invoice, account)
            for invoice, account in session.execute(
                select(Invoice, BillingAccount)
                .join(BillingAccount, BillingAccount.id == Invoice.account_fk)
                .where(Invoice.id.in_(ids))
            )
        }
        # Rows, not ORM objects: an invoice may have hundreds of lines; their components as
        # the JSON text stored (PriceComponents renders each distinct text once).
        lines: dict[int, list[Any]] = defaultdict(list)
        for line in session.execute(
            select(
                InvoiceLine.invoice_fk,
                InvoiceLine.position,
                InvoiceLine.charge_fk,
                InvoiceLine.description,
                InvoiceLine.code,
                cast(InvoiceLine.components, Text).label("components"),
            )
            .where(InvoiceLine.invoice_fk.in_(ids))
            .order_by(InvoiceLine.invoice_fk, InvoiceLine.position)
        ):
            lines[line.invoice_fk].append(line)
        paid = dict(
            session.execute(
                select(Payment.invoice_fk, func.sum(Payment.amount))
                .where(Payment.invoice_fk.in_(ids))
                .group_by(Payment.invoice_fk)
            ).all()
        )
        today = datetime.now(UTC).date()
        return [
            self.resource(
                ctx,
                *invoices[i],
                lines.get(i, []),
                Decimal(paid.get(i) or 0).quantize(Decimal("0.01")),
                today,
            )
            for i in ids
            if i in invoices
        ]

    def history(self, ctx: Context, session: Session, resource_id: str) -> list[dict[str, Any]]:
        current = self.read(ctx, session, resource_id)
        events = session.scalars(
            select(InvoiceEvent)
            .where(InvoiceEvent.invoice_fk == int(resource_id))
            .order_by(InvoiceEvent.version.desc(), InvoiceEvent.id.desc())
        ).all()
        out = []
        for event in events:
            version = dict(current)
            version["meta"] = meta(event.version, event.at)
            version["status"] = event.status
            currency = current["totalGross"]["currency"]
            others = [e for e in current.get("extension", []) if e["url"] != INVOICE_BALANCE]
            version["extension"] = [
                *others,
                {
                    "url": INVOICE_BALANCE,
                    "extension": [
                        {"url": "paid", "valueMoney": money(event.paid, currency)},
                        {
                            "url": "outstanding",
                            "valueMoney": money(
                                event.gross - event.paid
                                if event.status in (ISSUED, BALANCED)
                                else ZERO,
                                currency,
                            ),
                        },
                    ],
                },
                _change_extension(event.actor, event.reason),
            ]
            version["totalGross"] = money(event.gross, currency)
            out.append(version)
        return out or [current]

    @staticmethod
    def resource(
        ctx: Context,
        invoice: Invoice,
        account: BillingAccount,
        lines: list[Any],
        paid: Decimal,
        today: date,
    ) -> dict[str, Any]:
        currency = invoice.currency
        live = invoice.status in (ISSUED, BALANCED)
        outstanding = invoice.gross - paid if live else ZERO
        overdue = bool(
            live and outstanding > 0 and invoice.due_on is not None and invoice.due_on < today
        )
        balance: list[dict[str, Any]] = [
            {"url": "paid", "valueMoney": money(paid, currency)},
            {"url": "outstanding", "valueMoney": money(outstanding, currency)},
        ]
        if invoice.due_on is not None:
            balance.append({"url": "dueDate", "valueDate": invoice.due_on.isoformat()})
        balance.append({"url": "overdue", "valueBoolean": overdue})
        resource: dict[str, Any] = {
            "resourceType": "Invoice",
            "id": str(invoice.id),
            "meta": meta(invoice.version, invoice.updated_at),
            "extension": [{"url": INVOICE_BALANCE, "extension": balance}],
            "identifier": [{"system": INVOICE_IDENTIFIER, "value": str(invoice.id)}],
            "status": invoice.status,
        }
        if invoice.cancelled_reason:
            resource["cancelledReason"] = invoice.cancelled_reason
        resource["subject"] = _patient_reference(account, ctx)
        resource["date"] = instant(invoice.issued_at or invoice.created_at)
        resource["account"] = {"reference": f"Account/{account.id}"}
        rendered = PriceComponents(currency)
        items = rendered.line_items(lines)
        totals = rendered.totals()
        if items:
            resource["lineItem"] = items
            resource["totalPriceComponent"] = [
                {"type": kind, "amount": money(totals[kind], currency)}
                for kind in ("base", "surcharge", "discount", "tax")
                if kind in totals
            ]
        resource["totalNet"] = money(invoice.net, currency)
        resource["totalGross"] = money(invoice.gross, currency)
        if invoice.due_on is not None:
            resource["paymentTerms"] = f"Due on {invoice.due_on.isoformat()}."
        return resource


# --- PaymentReconciliation -----------------------------------------------------------------


class PaymentReconciliationProvider(_RowProvider):
    model = PaymentReconciliation
    type = "PaymentReconciliation"
    profile = "http://hl7.org/fhir/StructureDefinition/PaymentReconciliation"
    interactions = ("read", "search-type", "create")
    creatable = True
    documentation = (
        "Payments: one remittance paying one or more invoices (detail.request = Invoice/<id>, "
        "detail.amount; paymentAmount their sum), recorded in one transaction: an invoice "
        "paid in full turns balanced with it; an overpayment refuses the whole remittance "
        "(422). A negative detail amount is a refund (disposition: the reason). Payments "
        "recorded with the CLI (pacsbridge billing pay) appear here as well."
    )

    def __init__(self) -> None:
        super().__init__()
        p = self.params
        p["_id"] = _id_param(PaymentReconciliation.id)
        p["invoice"] = SearchParam(
            "invoice",
            "reference",
            "An Invoice it pays (detail.request)",
            self._invoice,
            targets=("Invoice",),
        )
        p["created"] = SearchParam(
            "created",
            "date",
            "When it was recorded",
            _instant_on("created", PaymentReconciliation.created_at),
            definition=SEARCH_PARAMETER + "PaymentReconciliation-created",
        )
        p["status"] = SearchParam(
            "status",
            "token",
            "active (every reconciliation recorded here)",
            lambda v, m: literal(search.token(v)[1] == "active"),
            definition=SEARCH_PARAMETER + "PaymentReconciliation-status",
        )
        p["outcome"] = SearchParam(
            "outcome",
            "token",
            "complete (every reconciliation recorded here)",
            lambda v, m: literal(search.token(v)[1] == "complete"),
            definition=SEARCH_PARAMETER + "PaymentReconciliation-outcome",
        )
        self.sorts = {"_id": PaymentReconciliation.id, "created": PaymentReconciliation.created_at}

    @staticmethod
    def _invoice(value: str, modifier: str | None) -> Any:
        invoice = search.row_id(search.reference_id(value, "Invoice"))
        if invoice is None:
            return false()
        return exists(
            select(Payment.id).where(
                Payment.reconciliation_fk == PaymentReconciliation.id,
                Payment.invoice_fk == invoice,
            )
        )

    def load(self, ctx: Context, session: Session, row_ids: Sequence[Any]) -> list[dict[str, Any]]:
        ids = list(row_ids)
        rows = {
            r.id: r
            for r in session.scalars(
                select(PaymentReconciliation).where(PaymentReconciliation.id.in_(ids))
            )
        }
        payments: dict[int, list[Payment]] = defaultdict(list)
        for payment in session.scalars(
            select(Payment).where(Payment.reconciliation_fk.in_(ids)).order_by(Payment.id)
        ):
            assert payment.reconciliation_fk is not None
            payments[payment.reconciliation_fk].append(payment)
        currency = ctx.settings.billing.currency
        return [self.resource(rows[i], payments.get(i, []), currency) for i in ids if i in rows]

    @staticmethod
    def resource(
        reconciliation: PaymentReconciliation, payments: list[Payment], currency: str
    ) -> dict[str, Any]:
        resource: dict[str, Any] = {
            "resourceType": "PaymentReconciliation",
            "id": str(reconciliation.id),
            "meta": meta(1, reconciliation.created_at),
            "status": "active",
            "created": instant(reconciliation.created_at),
            "outcome": "complete",
        }
        if reconciliation.disposition:
            resource["disposition"] = reconciliation.disposition
        resource["paymentDate"] = reconciliation.payment_date.isoformat()
        resource["paymentAmount"] = money(reconciliation.amount, currency)
        if reconciliation.reference:
            resource["paymentIdentifier"] = {"value": reconciliation.reference}
        details = []
        for payment in payments:
            refund = payment.amount < 0
            detail: dict[str, Any] = {
                "identifier": {"system": "urn:pacsbridge:payment", "value": str(payment.id)},
                "type": {
                    "coding": [
                        {
                            "system": _PAYMENT_TYPE,
                            "code": "adjustment" if refund else "payment",
                            "display": "Adjustment" if refund else "Payment",
                        }
                    ],
                    "text": f"refund: {payment.reason}" if refund and payment.reason else None,
                },
                "request": {"reference": f"Invoice/{payment.invoice_fk}"},
                "date": payment.received_at.date().isoformat(),
                "amount": money(payment.amount, currency),
            }
            if detail["type"]["text"] is None:
                del detail["type"]["text"]
            details.append(detail)
        if details:
            resource["detail"] = details
        return resource
