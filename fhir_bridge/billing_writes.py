"""What EHRs and billing systems write: manual charges and adjustments (ChargeItem), invoices
and their status changes (Invoice), payments (PaymentReconciliation), accounts' guarantor and
coverage (Account), and ``ChargeItemDefinition/$apply``. The rules are ``billing``'s; a refusal
there (``BillingError``) is a 422 OperationOutcome saying why, a stale ``If-Match`` a 412."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import select

from archive.audit import AuditEvent
from archive.models import Patient, ReportDocument, Study
from billing.accounts import update_account
from billing.invoices import (
    CANCELLED,
    DRAFT,
    ENTERED_IN_ERROR,
    ISSUED,
    BillingError,
    add_charges,
    cancel_invoice,
    create_invoice,
    issue_invoice,
    void_invoice,
)
from billing.manual import (
    ChargeConflict,
    ChargeFields,
    charge_fields,
    create_manual_charge,
    update_charge,
)
from billing.models import BillingAccount, ChargeItem, ChargeItemDefinition, Invoice, InvoiceLine
from billing.prices import price
from billing.reconciliation import Detail, record_reconciliation
from fhir_bridge import search
from fhir_bridge.billing import (
    CHARGE_IDENTIFIER,
    CODE_SYSTEM_OF,
    ChargeItemProvider,
    amount_of,
)
from fhir_bridge.change_audit import change_event, committed
from fhir_bridge.context import Context
from fhir_bridge.errors import FHIRError
from fhir_bridge.imaging_study import study_uid_of


@contextmanager
def _billing_rules(resource_type: str) -> Iterator[None]:
    try:
        yield
    except ChargeConflict as exc:
        raise FHIRError(412, str(exc), expression=["If-Match"]) from exc
    except BillingError as exc:
        raise FHIRError(422, str(exc), code="business-rule", expression=[resource_type]) from exc


def _reference_id(ctx: Context, value: dict[str, Any] | None, kind: str, where: str) -> str:
    reference = (value or {}).get("reference") or ""
    found = search.reference_id(reference, kind, ctx.base) if reference else None
    if (
        not found
        or ("://" in reference and not reference.startswith(ctx.base + "/"))
        or not reference.rstrip("/").split("/")[-2:-1] == [kind]
    ):
        raise FHIRError(
            422,
            f"{where} must reference {kind}/<id> on this server",
            code="value",
            expression=[where],
        )
    return found


def _row_id(ctx: Context, value: dict[str, Any] | None, kind: str, where: str) -> int:
    found = search.row_id(_reference_id(ctx, value, kind, where))
    if found is None:
        raise FHIRError(
            422, f"{where}: {kind} ids here are numbers", code="value", expression=[where]
        )
    return found


def _day(body: dict[str, Any]) -> date:
    text = body.get("occurrenceDateTime") or (body.get("occurrencePeriod") or {}).get("start")
    if not text:
        return datetime.now(UTC).date()
    try:
        return date.fromisoformat(text[:10])
    except ValueError as exc:
        raise FHIRError(
            422,
            f"occurrenceDateTime {text!r}: give at least a full date",
            code="value",
            expression=["ChargeItem.occurrence"],
        ) from exc


def _code(body: dict[str, Any]) -> tuple[str | None, str | None, str]:
    concept = body.get("code") or {}
    for coding in concept.get("coding") or []:
        system, code = coding.get("system"), coding.get("code")
        if code and system in CODE_SYSTEM_OF:
            return CODE_SYSTEM_OF[system], code, coding.get("display") or concept.get("text") or ""
    for coding in concept.get("coding") or []:
        if coding.get("code"):
            raise FHIRError(
                422,
                f"ChargeItem.code: system {coding.get('system')!r} is not a price list code "
                f"system ({', '.join(sorted(CODE_SYSTEM_OF))}); give the charge as text",
                code="code-invalid",
                expression=["ChargeItem.code"],
            )
    text = concept.get("text") or ""
    if not text:
        raise FHIRError(
            422,
            "ChargeItem.code: a coding or a text",
            code="required",
            expression=["ChargeItem.code"],
        )
    return None, None, text


def _definition_id(ctx: Context, body: dict[str, Any]) -> int | None:
    urls = body.get("definitionCanonical") or []
    if not urls:
        return None
    if len(urls) > 1:
        raise FHIRError(
            422, "one definitionCanonical at most", expression=["ChargeItem.definitionCanonical"]
        )
    found = search.row_id(
        search.reference_id(urls[0].split("|")[0], "ChargeItemDefinition", ctx.base)
    )
    if found is None:
        raise FHIRError(
            422,
            f"definitionCanonical {urls[0]!r} is no ChargeItemDefinition of this server",
            code="value",
            expression=["ChargeItem.definitionCanonical"],
        )
    return found


def _fields(ctx: Context, body: dict[str, Any]) -> ChargeFields:
    code_system, code, display = _code(body)
    quantity = (body.get("quantity") or {}).get("value", 1)
    if quantity != int(quantity) or int(quantity) < 1:
        raise FHIRError(
            422,
            f"quantity {quantity}: a whole number from 1",
            code="value",
            expression=["ChargeItem.quantity"],
        )
    note = (
        body.get("overrideReason")
        or "; ".join(
            n.get("text", "")
            for n in body.get("note") or []
            if not n.get("text", "").startswith("for review: ")
        )
        or None
    )
    return ChargeFields(
        status=body.get("status", "billable"),
        code_system=code_system,
        code=code,
        display=display,
        occurred_on=_day(body),
        quantity=int(quantity),
        amount=amount_of(
            body.get("priceOverride"), ctx.settings.billing.currency, "ChargeItem.priceOverride"
        ),
        definition_id=_definition_id(ctx, body),
        note=note,
    )


def _service(
    ctx: Context, body: dict[str, Any], session: Any
) -> tuple[str | None, tuple[str, str] | None]:
    """(study uid, (service kind, uid)) of the charge's service, checked to exist."""
    services = body.get("service") or []
    if not services:
        return None, None
    if len(services) > 1:
        raise FHIRError(422, "one service at most", expression=["ChargeItem.service"])
    reference = services[0].get("reference") or ""
    study = search.reference_id(reference, "ImagingStudy", ctx.base)
    if study is not None:
        uid = study_uid_of(study)
        if session.scalar(select(Study.id).where(Study.study_instance_uid == uid)) is None:
            raise FHIRError(
                422,
                f"service {reference!r} is not in the archive",
                expression=["ChargeItem.service"],
            )
        return uid, ("study", uid)
    report = search.reference_id(reference, "DiagnosticReport", ctx.base)
    if report is not None:
        row = session.execute(
            select(Study.study_instance_uid)
            .join(ReportDocument, ReportDocument.study_fk == Study.id)
            .where(ReportDocument.root_uid == report)
            .limit(1)
        ).first()
        if row is None:
            raise FHIRError(
                422,
                f"service {reference!r} is not in the archive",
                expression=["ChargeItem.service"],
            )
        return row[0], ("report", report)
    raise FHIRError(
        422,
        "service must reference ImagingStudy/<uid> or DiagnosticReport/<id>",
        expression=["ChargeItem.service"],
    )


def _identifier(body: dict[str, Any]) -> str | None:
    """The key a manual charge is entered under: the sender's identifier (system|value), or
    this server's own identifier of a manual charge read back."""
    for item in body.get("identifier") or []:
        if item.get("value") and item.get("system") != CHARGE_IDENTIFIER:
            return f"{item.get('system') or ''}|{item['value']}"
    for item in body.get("identifier") or []:
        kind, _, given = (item.get("value") or "").partition("|")
        if item.get("system") == CHARGE_IDENTIFIER and kind == "manual" and "|" in given:
            return given
    return None


def _existing(session: Any, model: Any, resource_id: str, check: Callable[[str], None]) -> Any:
    """The row an update names, its version checked against ``If-Match`` (405 for an id
    that does not exist: this server assigns the ids)."""
    row_id = search.row_id(resource_id)
    row = session.get(model, row_id) if row_id is not None else None
    kind = {ChargeItem: "ChargeItem", Invoice: "Invoice", BillingAccount: "Account"}[model]
    if row is None:
        raise FHIRError(
            405,
            f"{kind}/{resource_id} does not exist, and ids are assigned here: POST a new one",
            code="not-supported",
        )
    check(str(row.version))
    return row


# --- ChargeItem ----------------------------------------------------------------------------


def create_charge_item(
    ctx: Context, provider: Any, body: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    """A manual charge (201); the same identifier again: the charge entered then (200)."""
    patient_fk = _row_id(ctx, body.get("subject"), "Patient", "ChargeItem.subject")
    fields = _fields(ctx, body)
    performer = None
    for item in body.get("performer") or []:
        performer = (item.get("actor") or {}).get("display") or performer
    with ctx.archive.db.session() as session:
        if session.get(Patient, patient_fk) is None:
            raise FHIRError(
                422, f"Patient/{patient_fk} is not known", expression=["ChargeItem.subject"]
            )
        study_uid, service = _service(ctx, body, session)
    with _billing_rules("ChargeItem"):
        charge_id, created = create_manual_charge(
            ctx.archive,
            ctx.settings,
            patient_fk=patient_fk,
            fields_=fields,
            actor=ctx.actor,
            identifier=_identifier(body),
            performer=performer,
            study_instance_uid=study_uid,
            service=service,
            audit=change_event(ctx.audit, "ChargeItem"),
        )
    if created:
        committed(ctx.audit)
    with ctx.archive.db.session() as session:
        return provider.read(ctx, session, str(charge_id)), 201 if created else 200


def update_charge_item(
    ctx: Context,
    provider: Any,
    resource_id: str,
    body: dict[str, Any],
    check: Callable[[str], None],
) -> dict[str, Any]:
    with ctx.archive.db.session() as session:
        charge = _existing(session, ChargeItem, resource_id, check)
        version = charge.version
        current = charge_fields(charge)
        captured = charge.kind != "manual"
        account = session.get(BillingAccount, charge.account_fk)
    subject = body.get("subject") or {}
    if (
        subject.get("reference")
        and account is not None
        and account.patient_fk is not None
        and _row_id(ctx, subject, "Patient", "ChargeItem.subject") != account.patient_fk
    ):
        raise FHIRError(
            422,
            "a charge's subject does not change",
            code="business-rule",
            expression=["ChargeItem.subject"],
        )
    wanted = _fields(ctx, body)
    if captured:
        # What a captured charge is for comes from its study (a change is refused), its
        # conditions too; its note is the reason of an override.
        wanted = replace(
            wanted,
            conditions=current.conditions,
            note=body.get("overrideReason") or current.note,
        )
    reason = body.get("overrideReason") or None
    with _billing_rules("ChargeItem"):
        changed = update_charge(
            ctx.archive,
            ctx.settings,
            int(resource_id),
            wanted,
            actor=ctx.actor,
            reason=reason,
            expected_version=version,
            audit=change_event(ctx.audit, "ChargeItem"),
        )
    if changed:
        committed(ctx.audit)
    with ctx.archive.db.session() as session:
        return provider.read(ctx, session, resource_id)


# --- Account -------------------------------------------------------------------------------


def update_account_resource(
    ctx: Context,
    provider: Any,
    resource_id: str,
    body: dict[str, Any],
    check: Callable[[str], None],
) -> dict[str, Any]:
    with ctx.archive.db.session() as session:
        account = _existing(session, BillingAccount, resource_id, check)
        version = account.version
    with _billing_rules("Account"):
        changed = update_account(
            ctx.archive,
            account.id,
            name=body.get("name"),
            status=body.get("status", "active"),
            guarantor=body.get("guarantor"),
            coverage=body.get("coverage"),
            expected_version=version,
            audit=change_event(ctx.audit, "Account"),
        )
    if changed:
        committed(ctx.audit)
    with ctx.archive.db.session() as session:
        return provider.read(ctx, session, resource_id)


# --- Invoice -------------------------------------------------------------------------------


def _line_charges(ctx: Context, body: dict[str, Any]) -> list[int]:
    out = []
    for position, item in enumerate(body.get("lineItem") or []):
        where = f"Invoice.lineItem[{position}].chargeItemReference"
        if "chargeItemReference" not in item:
            raise FHIRError(
                422,
                "a line names its charge (chargeItemReference); create charges first",
                expression=[where],
            )
        out.append(_row_id(ctx, item["chargeItemReference"], "ChargeItem", where))
    return out


def create_invoice_resource(
    ctx: Context, provider: Any, body: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    status = body.get("status")
    if status not in (DRAFT, ISSUED):
        raise FHIRError(
            422,
            f"status {status!r}: an invoice is created draft (or issued at once)",
            code="business-rule",
            expression=["Invoice.status"],
        )
    charges = _line_charges(ctx, body)
    account = (
        _row_id(ctx, body["account"], "Account", "Invoice.account") if body.get("account") else None
    )
    if account is None and not charges:
        raise FHIRError(
            422,
            "name the account (its billable charges are invoiced) or the charges (lineItem)",
            code="required",
            expression=["Invoice.account"],
        )
    with ctx.archive.db.session() as session:
        if account is not None and session.get(BillingAccount, account) is None:
            raise FHIRError(422, f"Account/{account} is not known", expression=["Invoice.account"])
        if charges and account is not None:
            other = session.scalars(
                select(ChargeItem.id).where(
                    ChargeItem.id.in_(charges), ChargeItem.account_fk != account
                )
            ).all()
            if other:
                raise FHIRError(
                    422,
                    f"charges {', '.join(map(str, other))} are not of Account/{account}",
                    code="business-rule",
                    expression=["Invoice.lineItem"],
                )
        holder = account
        if holder is None:
            holder = session.scalar(
                select(ChargeItem.account_fk).where(ChargeItem.id == charges[0])
            )
        subject = body.get("subject")
        if subject and subject.get("reference") and holder is not None:
            patient = _row_id(ctx, subject, "Patient", "Invoice.subject")
            if (
                session.scalar(select(BillingAccount.patient_fk).where(BillingAccount.id == holder))
                != patient
            ):
                raise FHIRError(
                    422,
                    f"Invoice.subject Patient/{patient} is not the account's patient",
                    code="business-rule",
                    expression=["Invoice.subject"],
                )
    with _billing_rules("Invoice"):
        invoice_id = create_invoice(
            ctx.archive,
            ctx.settings,
            account_id=account if not charges else None,
            charge_ids=charges or None,
            actor=ctx.actor,
            audit=change_event(ctx.audit, "Invoice"),
        )
        if status == ISSUED:
            # A second change in a transaction of its own: an event of its own (U).
            issue_invoice(
                ctx.archive,
                ctx.settings,
                invoice_id,
                actor=ctx.actor,
                audit=_issued_event(ctx),
            )
    committed(ctx.audit)
    with ctx.archive.db.session() as session:
        return _written_invoice(ctx, provider, session, str(invoice_id)), 201


def update_invoice_resource(
    ctx: Context,
    provider: Any,
    resource_id: str,
    body: dict[str, Any],
    check: Callable[[str], None],
) -> dict[str, Any]:
    with ctx.archive.db.session() as session:
        invoice = _existing(session, Invoice, resource_id, check)
        invoice_id = int(invoice.id)
        current_status = invoice.status
        on_it = set(
            session.scalars(
                select(InvoiceLine.charge_fk).where(InvoiceLine.invoice_fk == invoice.id)
            )
        )
    wanted = body.get("status")
    charges = _line_charges(ctx, body)
    added = [c for c in charges if c not in on_it]
    removed = on_it - set(charges) if "lineItem" in body else set()
    if removed:
        raise FHIRError(
            422,
            f"charges {', '.join(map(str, sorted(removed)))} cannot be taken off an invoice: "
            "cancel it and invoice again",
            code="business-rule",
            expression=["Invoice.lineItem"],
        )
    with _billing_rules("Invoice"):
        if added:
            if current_status != DRAFT:
                raise BillingError(f"invoice {invoice_id} is {current_status}: it is immutable")
            add_charges(
                ctx.archive,
                invoice_id,
                added,
                actor=ctx.actor,
                audit=change_event(ctx.audit, "Invoice"),
            )
        if wanted != current_status:
            reason = body.get("cancelledReason") or ""
            event = change_event(ctx.audit, "Invoice")
            if wanted == ISSUED and current_status == DRAFT:
                issue_invoice(ctx.archive, ctx.settings, invoice_id, actor=ctx.actor, audit=event)
            elif wanted == CANCELLED:
                cancel_invoice(ctx.archive, invoice_id, reason=reason, actor=ctx.actor, audit=event)
            elif wanted == ENTERED_IN_ERROR:
                void_invoice(ctx.archive, invoice_id, reason=reason, actor=ctx.actor, audit=event)
            else:
                raise BillingError(
                    f"invoice {invoice_id} is {current_status}: it does not become {wanted} by an "
                    "update (draft -> issued; draft or issued -> cancelled or entered-in-error; "
                    "balanced follows from payments)"
                )
    if added or wanted != current_status:
        committed(ctx.audit)
    with ctx.archive.db.session() as session:
        return _written_invoice(ctx, provider, session, resource_id)


def _issued_event(ctx: Context) -> AuditEvent | None:
    event = change_event(ctx.audit, "Invoice")
    if event is not None:
        event.action = "U"
    return event


def _written_invoice(ctx: Context, provider: Any, session: Any, resource_id: str) -> dict[str, Any]:
    """The invoice written, or (``Prefer: return=minimal``) its id and meta: an invoice may
    have hundreds of lines, not loaded for an answer without a body."""
    if ctx.minimal:
        return dict(provider.head(session, resource_id))
    return dict(provider.read(ctx, session, resource_id))


# --- PaymentReconciliation -------------------------------------------------------------------


def create_payment_reconciliation(
    ctx: Context, provider: Any, body: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    currency = ctx.settings.billing.currency
    if body.get("status") != "active":
        raise FHIRError(
            422,
            "a payment reconciliation is recorded active",
            expression=["PaymentReconciliation.status"],
        )
    details = []
    for position, item in enumerate(body.get("detail") or []):
        where = f"PaymentReconciliation.detail[{position}]"
        invoice = _row_id(ctx, item.get("request"), "Invoice", f"{where}.request")
        amount = amount_of(item.get("amount"), currency, f"{where}.amount")
        if amount is None:
            raise FHIRError(
                422, f"{where}.amount is required", code="required", expression=[f"{where}.amount"]
            )
        details.append(Detail(invoice, amount))
    if not details:
        raise FHIRError(
            422,
            "detail: the invoices paid (detail.request = Invoice/<id>, detail.amount)",
            code="required",
            expression=["PaymentReconciliation.detail"],
        )
    total = amount_of(body.get("paymentAmount"), currency, "PaymentReconciliation.paymentAmount")
    try:
        paid_on = date.fromisoformat(body["paymentDate"])
    except (KeyError, ValueError) as exc:
        raise FHIRError(
            422,
            "paymentDate: a date",
            code="required",
            expression=["PaymentReconciliation.paymentDate"],
        ) from exc
    with _billing_rules("PaymentReconciliation"):
        reconciliation_id = record_reconciliation(
            ctx.archive,
            details,
            payment_date=paid_on,
            actor=ctx.actor,
            reference=(body.get("paymentIdentifier") or {}).get("value"),
            disposition=body.get("disposition"),
            reason=body.get("disposition"),
            amount=total,
            audit=change_event(ctx.audit, "PaymentReconciliation"),
        )
    committed(ctx.audit)
    with ctx.archive.db.session() as session:
        return provider.read(ctx, session, str(reconciliation_id)), 201


# --- ChargeItemDefinition/$apply --------------------------------------------------------------


def apply_definition(ctx: Context, definition_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """``$apply`` (chargeitemdefinition-operation-apply): the charge named by the
    ``chargeItem`` parameter priced by this definition (its conditions, its quantity, the site
    tax rate), returned without being stored."""
    if body.get("resourceType") != "Parameters":
        raise FHIRError(400, "$apply takes a Parameters resource", expression=["Parameters"])
    params = {p.get("name"): p for p in body.get("parameter") or []}
    charge_ref = (params.get("chargeItem") or {}).get("valueReference")
    if not charge_ref:
        raise FHIRError(
            400,
            "$apply: the chargeItem parameter (valueReference) is required",
            expression=["chargeItem"],
        )
    charge_id = _row_id(ctx, charge_ref, "ChargeItem", "chargeItem")
    row = search.row_id(definition_id)
    with ctx.archive.db.session() as session:
        definition = session.get(ChargeItemDefinition, row) if row is not None else None
        if definition is None:
            raise FHIRError(404, f"ChargeItemDefinition/{definition_id} is not known")
        found = session.execute(
            select(ChargeItem, BillingAccount)
            .join(BillingAccount, BillingAccount.id == ChargeItem.account_fk)
            .where(ChargeItem.id == charge_id)
        ).first()
        if found is None:
            raise FHIRError(422, f"ChargeItem/{charge_id} is not known", expression=["chargeItem"])
        charge, account = found
        account_ref = (params.get("account") or {}).get("valueReference")
        if account_ref and _row_id(ctx, account_ref, "Account", "account") != account.id:
            raise FHIRError(
                422,
                f"ChargeItem/{charge_id} is not of that account",
                code="business-rule",
                expression=["account"],
            )
        if definition.kind != charge.kind and charge.kind != "manual":
            raise FHIRError(
                422,
                f"ChargeItemDefinition/{definition_id} prices {definition.kind} charges; "
                f"ChargeItem/{charge_id} is {charge.kind}",
                code="business-rule",
            )
        priced = price(
            definition,
            charge.conditions,
            site_tax_percent=ctx.settings.billing.tax_percent,
            site_tax_code=ctx.settings.billing.tax_code,
        )
        n = charge.quantity or 1
        session.expunge(charge)
    charge.definition_fk = definition.id
    charge.lines = [
        {
            "type": line.type,
            "code": line.code,
            "description": line.description,
            "amount": str(line.amount * n),
        }
        for line in priced.lines
    ]
    charge.net = priced.net * n
    charge.tax = priced.tax * n
    charge.total = priced.total * n
    charge.currency = definition.currency
    charge.note = None
    resource = ChargeItemProvider.resource(ctx, charge, account)
    resource["status"] = "billable" if charge.status == "planned" else charge.status
    return resource
