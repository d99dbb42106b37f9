"""Invoice lines at scale: the lines of an invoice are copied from its charges by one
``INSERT … SELECT`` that applies every rule (billable, on no live invoice, priced, of the
invoice's account and currency), its totals summed in SQL to the cent; a request that breaks a
rule is refused naming the charges, with nothing of the invoice left. Read over FHIR, the
Invoice's ``lineItem`` is rendered once per distinct set of components and written as JSON text
(``fhir_bridge.rest.RenderedJSON``): the Invoice says exactly what decoding every component of
every line says, and validates with ``fhir.resources.R4B``."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import pytest
from fhir.resources.R4B.invoice import Invoice as FHIRInvoice
from sqlalchemy import func, select, update

from archive import Archive
from billing.invoices import BillingError, add_charges, create_invoice, invoice_json
from billing.manual import create_manual_charge
from billing.models import ChargeItem, Invoice, InvoiceLine
from billing.prices import load_price_list, store_price_list
from fhir_bridge.billing import CODE_SYSTEMS, InvoiceProvider
from fhir_bridge.context import Context
from fhir_bridge.rest import RenderedJSON, compact_json
from fhir_bridge.router import build_providers
from tests.conftest import Backend
from tests.test_billing_capture import SAMPLE
from tests.test_billing_manual import a_patient, fields

DAY = date(2026, 3, 4)


@pytest.fixture
def arc(index_backend: Backend) -> Iterator[Archive]:
    archive = Archive(index_backend.settings)
    parsed = load_price_list(SAMPLE)
    store_price_list(archive, parsed, "sample", parsed.sha256, loaded_by="test")
    yield archive
    archive.close()


def an_account(arc: Archive, patient_id: str) -> tuple[int, int]:
    """(account, its first charge): a manual charge opens the patient's account."""
    first, _ = create_manual_charge(
        arc, arc.settings, patient_fk=a_patient(arc, patient_id), fields_=fields(), actor="t"
    )
    with arc.db.session() as session:
        account = session.scalar(select(ChargeItem.account_fk).where(ChargeItem.id == first))
    assert account is not None
    return int(account), first


def add_charge_rows(
    arc: Archive, account: int, lines: list[list[dict[str, str]]], **columns: Any
) -> list[int]:
    """Billable charges of ``account``, one per list of priced lines (net: the non-tax lines)."""
    now = datetime.now(UTC)
    made = []
    with arc.db.write_session() as session:
        for number, priced in enumerate(lines):
            tax = sum((Decimal(x["amount"]) for x in priced if x["type"] == "tax"), Decimal("0"))
            total = sum((Decimal(x["amount"]) for x in priced), Decimal("0"))
            row = ChargeItem(
                account_fk=account,
                patient_id="PAT-L",
                issuer_of_patient_id="",
                kind="manual",
                status="billable",
                idempotency_key=f"lines|{account}|{number}|{now.isoformat()}",
                code_system="local",
                code=f"L{number % 7}",
                display=columns.get("display", f"line {number}"),
                occurred_on=DAY,
                conditions=[],
                lines=priced,
                net=total - tax,
                tax=tax,
                total=total,
                currency=columns.get("currency", "EUR"),
                version=1,
                created_at=now,
                updated_at=now,
            )
            session.add(row)
            session.flush()
            made.append(int(row.id))
    return made


def priced_lines(rng: random.Random, kinds: int) -> list[list[dict[str, str]]]:
    """Lists of priced lines: ``kinds`` distinct ones, repeated and shuffled, a few unique."""
    distinct = []
    for n in range(kinds):
        base = Decimal(rng.randint(1_000, 90_000)) / 100
        surcharge = Decimal(rng.randint(0, 5_000)) / 100
        discount = -Decimal(rng.randint(0, 1_000)) / 100
        tax = ((base + surcharge + discount) * Decimal("0.19")).quantize(Decimal("0.01"))
        lines = [
            {"type": "base", "code": "base", "description": "base amount", "amount": str(base)}
        ]
        if surcharge:
            lines.append(
                {
                    "type": "surcharge",
                    "code": "CONTRAST",
                    "description": "",
                    "amount": str(surcharge),
                }
            )
        if discount and n % 2:
            lines.append(
                {
                    "type": "discount",
                    "code": "SELF-PAY",
                    "description": 'Remise "comptant" — 5 %',
                    "amount": str(discount),
                }
            )
        lines.append({"type": "tax", "code": "VAT", "description": "VAT", "amount": str(tax)})
        distinct.append(lines)
    chosen = [distinct[rng.randrange(kinds)] for _ in range(120)]
    chosen += [
        [{"type": "base", "code": "base", "description": "", "amount": f"{n}.{n:02d}"}]
        for n in range(1, 11)
    ]
    chosen.append([])  # a charge whose price has no lines (a zero price)
    rng.shuffle(chosen)
    return chosen


def reference_line_items(arc: Archive, invoice_id: int, currency: str) -> list[dict[str, Any]]:
    """Invoice.lineItem as written before lines were rendered from their JSON text: every
    component of every line decoded and mapped on its own."""
    with arc.db.session() as session:
        lines = session.scalars(
            select(InvoiceLine)
            .where(InvoiceLine.invoice_fk == invoice_id)
            .order_by(InvoiceLine.position)
        ).all()
        items = []
        for line in lines:
            components = []
            for component in line.components:
                coding = {"system": CODE_SYSTEMS["local"], "code": component["code"]}
                concept: dict[str, Any] = {"coding": [coding]}
                if component.get("description"):
                    coding["display"] = component["description"]
                    concept["text"] = component["description"]
                components.append(
                    {
                        "type": component["type"],
                        "code": concept,
                        "amount": {"value": float(component["amount"]), "currency": currency},
                    }
                )
            item: dict[str, Any] = {
                "sequence": line.position,
                "chargeItemReference": {
                    "reference": f"ChargeItem/{line.charge_fk}",
                    "display": line.description or line.code or f"charge {line.charge_fk}",
                },
            }
            if components:
                item["priceComponent"] = components
            items.append(item)
    return items


def read_invoice(arc: Archive, invoice_id: int) -> dict[str, Any]:
    providers = build_providers(arc.settings)
    ctx = Context(arc, arc.settings, "http://test/fhir", "http://test/dicom-web", providers)
    provider = providers["Invoice"]
    assert isinstance(provider, InvoiceProvider)
    with arc.db.session() as session:
        return provider.read(ctx, session, str(invoice_id))


# --- compact_json ---------------------------------------------------------------------------


def test_compact_json_writes_rendered_text_as_is():
    items = [{"a": 1, "b": 'é "quoted" \x00 \\'}, {"c": [1.5, None, True]}]
    text = json.dumps(items, ensure_ascii=False, separators=(",", ":"))
    rendered = RenderedJSON(items, text)
    assert list(rendered) == items  # in-process readers see the items
    body: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "entry": [
            {"fullUrl": "x", "resource": {"resourceType": "Invoice", "lineItem": rendered}},
            {"resource": {"resourceType": "Patient", "name": [{"text": "\x00 marker-like"}]}},
        ],
        "meta": {"tag": rendered},
    }
    plain = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    assert compact_json(body) == plain
    # The text is what is written: not the items encoded again.
    other = RenderedJSON(items, '["as rendered"]')
    out = json.loads(compact_json({"resourceType": "Invoice", "lineItem": other}))
    assert out == {"resourceType": "Invoice", "lineItem": ["as rendered"]}
    # The body given is left as it was.
    assert body["entry"][0]["resource"]["lineItem"] is rendered
    with pytest.raises(TypeError, match="not JSON serializable"):
        compact_json({"resourceType": "Invoice", "lineItem": other, "when": object()})


# --- invoicing ------------------------------------------------------------------------------


def test_many_lines_read_as_decoding_every_component_says(arc: Archive):
    account, first = an_account(arc, "PAT-L")
    rng = random.Random(1207)
    charges = add_charge_rows(arc, account, priced_lines(rng, kinds=6))
    # One with a description that needs escaping, and none (the code is shown then).
    charges += add_charge_rows(arc, account, [priced_lines(rng, 1)[0]], display='CT "head" \\ ü')
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")

    with arc.db.session() as session:
        lines = session.execute(
            select(InvoiceLine.position, InvoiceLine.charge_fk)
            .where(InvoiceLine.invoice_fk == invoice_id)
            .order_by(InvoiceLine.position)
        ).all()
        priced = session.execute(
            select(ChargeItem.net, ChargeItem.tax, ChargeItem.total).where(
                ChargeItem.account_fk == account
            )
        ).all()
        stored = session.get(Invoice, invoice_id)
        assert stored is not None
    # One line per charge, numbered in charge id order.
    assert [(p, c) for p, c in lines] == list(enumerate(sorted([first, *charges]), start=1))
    # The totals: the charges' sums, exact to the cent.
    for column, total in enumerate((stored.net, stored.tax, stored.gross)):
        assert total == sum((row[column] or Decimal(0) for row in priced), Decimal("0.00"))
    as_json = invoice_json(arc, invoice_id)
    assert Decimal(as_json["gross"]) == stored.gross
    assert sum((Decimal(x["gross"]) for x in as_json["lines"]), Decimal("0")) == stored.gross
    assert sum((Decimal(x["net"]) for x in as_json["lines"]), Decimal("0")) == stored.net
    assert sum((Decimal(x["tax"]) for x in as_json["lines"]), Decimal("0")) == stored.tax

    resource = read_invoice(arc, invoice_id)
    items = resource["lineItem"]
    assert isinstance(items, RenderedJSON)
    reference = reference_line_items(arc, invoice_id, "EUR")
    assert list(items) == reference
    assert json.loads(items.text) == reference
    assert items.text == json.dumps(reference, ensure_ascii=False, separators=(",", ":"))
    written = compact_json(resource)
    body = json.loads(written)
    assert body["lineItem"] == reference
    assert written == json.dumps(
        {**resource, "lineItem": reference}, ensure_ascii=False, separators=(",", ":")
    )
    # The totals per type: the sums of the components of every line.
    totals: dict[str, Decimal] = {}
    for item in reference:
        for component in item.get("priceComponent", []):
            kind = component["type"]
            totals[kind] = totals.get(kind, Decimal("0")) + Decimal(
                str(component["amount"]["value"])
            )
    assert {
        c["type"]: Decimal(str(c["amount"]["value"])) for c in body["totalPriceComponent"]
    } == totals
    assert sum(totals.values(), Decimal("0")) == stored.gross
    assert Decimal(str(body["totalGross"]["value"])) == stored.gross
    # The whole body is valid FHIR R4.
    FHIRInvoice.model_validate(body)


def test_lines_added_to_a_draft_follow_its_last(arc: Archive):
    account, first = an_account(arc, "PAT-A")
    more = add_charge_rows(
        arc, account, [[{"type": "base", "code": "base", "description": "", "amount": "10.00"}]] * 3
    )
    invoice_id = create_invoice(arc, arc.settings, charge_ids=[first, more[0]], actor="clerk")
    add_charges(arc, invoice_id, [more[2], more[1]], actor="clerk")
    lines = invoice_json(arc, invoice_id)["lines"]
    assert [(x["position"], x["charge"]) for x in lines] == [
        (1, first),
        (2, more[0]),
        (3, more[1]),
        (4, more[2]),
    ]
    assert Decimal(invoice_json(arc, invoice_id)["gross"]) == Decimal("55.00")  # 25.00 + 3 x 10
    # A charge already on it, or on another live invoice, is refused, and nothing changes.
    with pytest.raises(BillingError, match=f"charge {first} is on invoice {invoice_id}"):
        add_charges(arc, invoice_id, [first], actor="clerk")
    assert len(invoice_json(arc, invoice_id)["lines"]) == 4


def test_refused_invoices_name_the_charges_and_leave_nothing(arc: Archive):
    account, first = an_account(arc, "PAT-R")
    other_account, foreign = an_account(arc, "PAT-S")
    (dollars,) = add_charge_rows(
        arc,
        account,
        [[{"type": "base", "code": "base", "description": "", "amount": "5.00"}]],
        currency="USD",
    )

    def invoices() -> int:
        with arc.db.session() as session:
            return int(session.scalar(select(func.count()).select_from(Invoice)) or 0)

    # The account's billable charges include one in another currency: all refused.
    with pytest.raises(BillingError, match="charges in another currency: USD"):
        create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    with pytest.raises(BillingError, match="charges in another currency: USD"):
        create_invoice(arc, arc.settings, charge_ids=[first, dollars], actor="clerk")
    # A billable charge without a price (a row written by hand): named.
    with arc.db.write_session() as session:
        session.execute(
            update(ChargeItem)
            .where(ChargeItem.id == dollars)
            .values(currency="EUR", net=None, tax=None, total=None)
        )
    with pytest.raises(BillingError, match=f"charge {dollars} has no price"):
        create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    with pytest.raises(BillingError, match="charges of more than one account"):
        create_invoice(arc, arc.settings, charge_ids=[first, foreign], actor="clerk")
    assert invoices() == 0
    with arc.db.write_session() as session:
        session.execute(update(ChargeItem).where(ChargeItem.id == dollars).values(status="planned"))
    # Now the account's one billable charge is invoiced; a draft takes no foreign charge.
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    with pytest.raises(
        BillingError, match=f"charge {foreign} is of account {other_account}, the invoice's is"
    ):
        add_charges(arc, invoice_id, [foreign], actor="clerk")
    with pytest.raises(BillingError, match=f"account {account} has no billable charge"):
        create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    assert invoices() == 1
    assert [x["charge"] for x in invoice_json(arc, invoice_id)["lines"]] == [first]
