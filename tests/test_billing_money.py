"""Property tests (hypothesis) of the billing money rules.

The rounding rule (``billing.prices``): every priced line (base, each surcharge, each discount,
each tax, the site tax) is rounded to the cent on its own with ``ROUND_HALF_EVEN`` (banker's
rounding); the net, the tax and the total are sums of those rounded lines and are never rounded
again. Surcharges are computed on the base, discounts on base + surcharges (their sum capped at
it: the net is never negative), taxes on the net. An invoice's net, tax and gross are the exact
``Decimal`` sums of its charges' (so of their lines).

(a) :func:`billing.prices.price` over generated definitions and condition sets: at most 2
decimals on every line, net + tax == total, the lines add up to the total exactly, the net is
never negative, and the result equals the rule above computed independently here.
(b) Invoices of 1 to 300 generated charges (written to the database as
``tests/test_billing_invoices.py`` does, on SQLite): the invoice's totals are the exact sums,
and :func:`billing.invoices.recompute_from_history` agrees, as drafted and as issued.
(c) Generated sequences of payments and refunds on an issued invoice: paid never exceeds gross,
the invoice is ``balanced`` exactly when paid == gross, an overpayment is refused with a
``BillingError`` naming it (and changes nothing).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from archive import Archive
from billing.invoices import (
    BillingError,
    create_invoice,
    invoice_json,
    issue_invoice,
    recompute_from_history,
    record_payment,
)
from billing.models import BillingAccount, ChargeItem, Invoice
from billing.prices import Component, Price, price
from config import Settings

CENT = Decimal("0.01")
ZERO = Decimal("0.00")
CONDITIONS = ("contrast", "after_hours", "weekend")
_accounts = itertools.count(1)
#: Rates and factors that often land on exactly half a cent, where half-even rounding shows.
TIE_PERCENTS = tuple(Decimal(p) for p in ("50", "25", "12.5", "5", "2.5", "0.5", "19", "7.5"))
TIE_FACTORS = {
    "surcharge": tuple(Decimal(f) for f in ("1.5", "1.25", "1.125")),
    "discount": tuple(Decimal(f) for f in ("0.5", "0.75", "0.875")),
}


def half_even(value: Decimal) -> Decimal:
    return value.quantize(CENT, rounding=ROUND_HALF_EVEN)


# --- strategies ----------------------------------------------------------------------------


def decimals(low: int, high: int, places: int) -> st.SearchStrategy[Decimal]:
    """Decimals from low to high (integers in units of 10**-places) with ``places`` decimals."""
    scale = 10**places
    return st.integers(low * scale, high * scale).map(lambda n: Decimal(n).scaleb(-places))


money = (st.integers(0, 9_999_999) | st.integers(0, 999)).map(
    lambda cents: Decimal(cents).scaleb(-2)
)  # 0 .. 99999.99, small amounts often (more ties)
conditions = st.sampled_from(CONDITIONS)
condition = st.none() | conditions


@st.composite
def components(draw: st.DrawFn) -> Component:
    """A component the price list loader accepts: a surcharge (amount, factor >= 1 or percent),
    a discount (amount, factor 0..1 or percent up to 100) or a tax (a percent)."""
    kind = draw(st.sampled_from(("surcharge", "discount", "tax")))
    code = draw(st.from_regex(r"[A-Z][A-Z0-9_-]{0,7}", fullmatch=True))
    value = "percent" if kind == "tax" else draw(st.sampled_from(("amount", "factor", "percent")))
    amount = factor = percent = None
    if value == "amount":
        amount = draw(money)
    elif value == "factor":
        ties = TIE_FACTORS[kind]  # x1.5 / x0.5 of an odd cent: a half cent
        factor = draw(
            st.sampled_from(ties)
            | (decimals(1, 10, 4) if kind == "surcharge" else decimals(0, 1, 4))
        )
    else:
        percent = draw(
            st.sampled_from(TIE_PERCENTS) | decimals(0, 300 if kind == "surcharge" else 100, 4)
        )
    return Component(
        type=kind,
        code=code,
        amount=amount,
        factor=factor,
        percent=percent,
        condition=draw(condition),
    )


@dataclass(frozen=True)
class Definition:
    base_amount: Decimal
    components: tuple[Component, ...]


definitions = st.builds(
    Definition, base_amount=money, components=st.lists(components(), max_size=5).map(tuple)
)
condition_sets = st.sets(conditions)
site_rates = st.none() | decimals(0, 100, 4)


# --- (a) pricing ---------------------------------------------------------------------------


def expected_price(
    definition: Definition, present: set[str], site_rate: Decimal | None
) -> tuple[Decimal, Decimal]:
    """(net, tax) by the documented rule, computed independently of ``price``."""

    def line(c: Component, on: Decimal) -> Decimal:
        if c.amount is not None:
            return half_even(c.amount)
        if c.factor is not None:
            return half_even(on * abs(c.factor - 1))
        assert c.percent is not None
        return half_even(on * c.percent / 100)

    applied = [c for c in definition.components if c.condition in (None, *present)]
    base = half_even(definition.base_amount)
    subtotal = base + sum((line(c, base) for c in applied if c.type == "surcharge"), ZERO)
    discounts = sum((line(c, subtotal) for c in applied if c.type == "discount"), ZERO)
    net = max(subtotal - discounts, ZERO)  # the discounts' sum is capped at the subtotal
    taxes = [
        half_even(net * c.percent / 100)
        for c in applied
        if c.type == "tax" and c.percent is not None
    ]
    tax = sum(taxes, ZERO)
    if site_rate is not None and not any(c.type == "tax" for c in definition.components):
        tax = half_even(net * site_rate / 100)
    return net, tax


def check_price(priced: Price) -> None:
    for line in priced.lines:
        exponent = line.amount.as_tuple().exponent
        assert isinstance(exponent, int) and exponent >= -2, line
        assert line.amount == half_even(line.amount)
        if line.type == "discount":
            assert line.amount <= 0
        elif line.type in ("base", "surcharge", "tax"):
            assert line.amount >= 0
    assert priced.net >= 0
    assert priced.net + priced.tax == priced.total
    assert sum((line.amount for line in priced.lines), ZERO) == priced.total
    assert sum((line.amount for line in priced.lines if line.type != "tax"), ZERO) == priced.net


@settings(max_examples=400, deadline=None, database=None)
@given(definition=definitions, present=condition_sets, site_rate=site_rates)
def test_price_lines_add_up_and_follow_the_rounding_rule(
    definition: Definition, present: set[str], site_rate: Decimal | None
) -> None:
    priced = price(definition, present, site_tax_percent=site_rate, site_tax_code="SITE")
    check_price(priced)
    assert (priced.net, priced.tax) == expected_price(definition, present, site_rate)
    site_lines = [line for line in priced.lines if line.code == "SITE" and line.type == "tax"]
    own_tax = any(c.type == "tax" for c in definition.components)
    assert len(site_lines) == (0 if own_tax or site_rate is None else 1)
    # the order of the components changes no total (the discounts' cap included)
    reversed_definition = Definition(definition.base_amount, definition.components[::-1])
    again = price(reversed_definition, present, site_tax_percent=site_rate, site_tax_code="SITE")
    assert (again.net, again.tax, again.total) == (priced.net, priced.tax, priced.total)


# --- the database (SQLite, one per module: every example uses accounts of its own) ----------


@pytest.fixture(scope="module")
def arc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archive]:
    data_dir: Path = tmp_path_factory.mktemp("money") / "data"
    archive = Archive(Settings(data_dir=data_dir))
    yield archive
    archive.close()


def charges_of_a_new_account(arc: Archive, priced: list[Price]) -> tuple[int, list[ChargeItem]]:
    """A new account with one billable charge per price (written as
    ``test_billing_invoices.test_decimal_exact_with_many_lines`` does)."""
    number = next(_accounts)
    now = datetime.now(UTC)
    with arc.db.write_session() as session:
        account = BillingAccount(patient_id=f"MONEY-{number}", status="active", created_at=now)
        session.add(account)
        session.flush()
        charges = [
            ChargeItem(
                account_fk=account.id,
                patient_id=account.patient_id,
                issuer_of_patient_id="",
                kind="technical",
                status="billable",
                idempotency_key=f"money|{number}|{position}",
                study_instance_uid=f"1.2.826.0.1.{number}",
                service_kind="study",
                service_uid=f"1.2.826.0.1.{number}",
                display=f"line {position}",
                occurred_on=date(2026, 3, 4),
                conditions=[],
                lines=[
                    {
                        "type": line.type,
                        "code": line.code,
                        "description": line.description,
                        "amount": str(line.amount),
                    }
                    for line in one.lines
                ],
                net=one.net,
                tax=one.tax,
                total=one.total,
                currency="EUR",
                version=1,
                created_at=now,
                updated_at=now,
            )
            for position, one in enumerate(priced)
        ]
        session.add_all(charges)
        session.flush()
        session.expunge_all()
        return int(account.id), charges


def stored_invoice(arc: Archive, invoice_id: int) -> Invoice:
    with arc.db.session() as session:
        found = session.get(Invoice, invoice_id)
        assert found is not None
        return found


def assert_history_agrees(arc: Archive, invoice_id: int, paid: Decimal) -> None:
    stored = stored_invoice(arc, invoice_id)
    again = recompute_from_history(arc, invoice_id)
    assert (again.net, again.tax, again.gross, again.paid) == (
        stored.net,
        stored.tax,
        stored.gross,
        paid,
    )
    assert (again.status, again.version) == (stored.status, stored.version)


# a charge: a base amount and a tax rate (or none), priced by ``price``
charge_prices = st.builds(
    lambda base, rate: price(Definition(base, ()), site_tax_percent=rate),
    base=st.integers(1, 9_999_999).map(lambda cents: Decimal(cents).scaleb(-2)),
    rate=st.none() | st.sampled_from([Decimal(r) for r in ("0", "7", "7.7", "19", "20")]),
)

_DB = settings(
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# --- (b) invoices --------------------------------------------------------------------------


@settings(_DB, max_examples=20)
@given(
    priced=st.one_of(st.integers(1, 12), st.integers(250, 300)).flatmap(
        lambda n: st.lists(charge_prices, min_size=n, max_size=n)
    )
)
def test_invoice_totals_are_the_exact_sums_of_its_charges(arc: Archive, priced: list[Price]):
    account, charges = charges_of_a_new_account(arc, priced)
    net = sum((c.net for c in charges if c.net is not None), ZERO)
    tax = sum((c.tax for c in charges if c.tax is not None), ZERO)
    gross = sum((c.total for c in charges if c.total is not None), ZERO)
    assert net + tax == gross
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    draft = stored_invoice(arc, invoice_id)
    assert (draft.net, draft.tax, draft.gross) == (net, tax, gross)
    assert all(isinstance(v, Decimal) for v in (draft.net, draft.tax, draft.gross))
    assert len(invoice_json(arc, invoice_id)["lines"]) == len(charges)
    assert_history_agrees(arc, invoice_id, ZERO)
    issue_invoice(arc, arc.settings, invoice_id, actor="clerk")
    issued = stored_invoice(arc, invoice_id)
    assert (issued.status, issued.net, issued.tax, issued.gross) == ("issued", net, tax, gross)
    assert_history_agrees(arc, invoice_id, ZERO)


# --- (c) payments --------------------------------------------------------------------------


@settings(_DB, max_examples=30)
@given(priced=st.lists(charge_prices, min_size=1, max_size=4), data=st.data())
def test_payments_never_exceed_gross_and_balance_exactly(
    arc: Archive, priced: list[Price], data: st.DataObject
):
    account, _ = charges_of_a_new_account(arc, priced)
    invoice_id = create_invoice(arc, arc.settings, account_id=account, actor="clerk")
    issue_invoice(arc, arc.settings, invoice_id, actor="clerk")
    gross = stored_invoice(arc, invoice_id).gross
    gross_cents = int(gross * 100)
    paid = ZERO
    steps = data.draw(st.integers(1, 8), label="steps")
    for _ in range(steps):
        outstanding = gross - paid
        # the rest exactly, a part of it, too much by a little or a lot, or a refund
        choice = data.draw(
            st.sampled_from(("rest", "part", "over", "any", "refund")), label="choice"
        )
        if choice == "rest":
            amount = outstanding
        elif choice == "part":
            amount = data.draw(decimals(0, 1, 2), label="part") * outstanding
            amount = half_even(amount)
        elif choice == "over":
            amount = outstanding + Decimal(data.draw(st.integers(1, 100), label="over")) / 100
        elif choice == "any":
            amount = Decimal(data.draw(st.integers(1, 2 * gross_cents + 1), label="any")) / 100
        else:
            amount = -Decimal(data.draw(st.integers(1, gross_cents + 1), label="refund")) / 100
        if amount == 0:
            continue
        before = stored_invoice(arc, invoice_id)
        if amount > outstanding:
            with pytest.raises(BillingError, match="overpayment"):
                record_payment(arc, invoice_id, amount, actor="cashier")
            after = stored_invoice(arc, invoice_id)
            assert (after.status, after.version) == (before.status, before.version)
        elif amount < 0 and -amount > paid:
            with pytest.raises(BillingError, match="refund beyond what was paid"):
                record_payment(arc, invoice_id, amount, actor="cashier", reason="refund")
        else:
            record_payment(arc, invoice_id, amount, actor="cashier", reason="refund")
            paid += amount
        shown = invoice_json(arc, invoice_id)
        assert Decimal(shown["paid"]) == paid <= gross
        assert Decimal(shown["outstanding"]) == gross - paid
        assert (shown["status"] == "balanced") == (paid == gross), (shown["status"], paid, gross)
        assert shown["status"] in ("issued", "balanced")
    assert_history_agrees(arc, invoice_id, paid)
