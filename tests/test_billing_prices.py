"""The price list: loading (CSV, TOML), validation, versions, matching and pricing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import date
from decimal import Decimal
from pathlib import Path

import pytest
from sqlalchemy import func, select

from archive import Archive
from billing.models import ChargeItemDefinition, PriceList
from billing.prices import (
    PricedLine,
    PriceListError,
    find_definition,
    load_price_list,
    parse_price_list,
    price,
    store_price_list,
)
from config import Settings
from tests.conftest import Backend

SAMPLE = Path(__file__).resolve().parent.parent / "billing" / "sample-prices.csv"
PACSBRIDGE = Path(sys.executable).parent / "pacsbridge"
HEADER = (
    "code_system,code,display,kind,modality,body_part,laterality,contrast,"
    "effective_from,effective_to,base_amount,components\n"
)


@pytest.fixture
def arc(index_backend: Backend) -> Iterator[Archive]:
    archive = Archive(index_backend.settings)
    yield archive
    archive.close()


def write(tmp_path: Path, rows: str, name: str = "prices.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + rows if name.endswith(".csv") else rows, encoding="utf-8")
    return path


def load(arc: Archive, path: Path) -> int:
    parsed = load_price_list(path)
    return store_price_list(arc, parsed, path.name, parsed.sha256, loaded_by="test")


def find(arc: Archive, **kwargs) -> ChargeItemDefinition | None:
    kwargs.setdefault("kind", "technical")
    kwargs.setdefault("on", date(2026, 3, 1))
    kwargs.setdefault("procedure_codes", [])
    with arc.db.session() as session:
        return find_definition(session, **kwargs)


def test_sample_loads(arc: Archive):
    parsed = load_price_list(SAMPLE)
    assert len(parsed.definitions) == 20
    assert {d.code_system for d in parsed.definitions} <= {"loinc", "local", None}
    price_list = store_price_list(arc, parsed, "sample", parsed.sha256)
    with arc.db.session() as session:
        stored = session.get(PriceList, price_list)
        assert stored is not None and stored.row_count == 20 and stored.sha256 == parsed.sha256
        count = session.scalar(select(func.count()).select_from(ChargeItemDefinition))
        assert count == 20
    ct_head = find(arc, procedure_codes=[("loinc", "24725-4")])
    assert ct_head is not None and ct_head.base_amount == Decimal("180.00")
    assert isinstance(ct_head.base_amount, Decimal) and ct_head.currency == "EUR"
    report = find(arc, kind="professional", procedure_codes=[("loinc", "24725-4")])
    assert report is not None and report.base_amount == Decimal("60.00")


def test_bad_rows_are_all_reported_and_nothing_is_stored(arc: Archive, tmp_path: Path):
    first = load(arc, SAMPLE)
    bad = write(
        tmp_path,
        "loinc,24725-4,CT Head,technical,CT,HEAD,,,2026-01-01,,180.00,\n"  # line 2: good
        "loinc,24725-5,CT Head,technical,CT,HEAD,,,2026-01-01,,180.00,\n"  # 3: check digit
        "local,X1,Thing,technical,,,,,2026-13-01,,10.00,\n"  # 4: date
        "local,X2,Thing,technical,,,,,2026-01-01,,10.001,\n"  # 5: 3 decimals
        "local,X3,Thing,technical,,,,,2026-01-01,,-1.00,\n"  # 6: negative
        "local,X4,Thing,technical,,,,,2026-01-01,,NaN,\n"  # 7: NaN
        "local,X5,Thing,both,,,,,2026-01-01,,1.00,\n"  # 8: kind
        ",,Head,technical,CT,,,,2026-01-01,,1.00,\n"  # 9: no body part
        "local,X6,Thing,technical,,,,,2026-01-01,,1.00,surcharge:AH:1.5x\n"  # 10
        "local,X7,Thing,technical,,,,,2026-01-01,,1.00,tax:VAT:19\n"  # 11: tax not a rate
        "loinc,24725-4,CT Head,technical,CT,HEAD,,,2026-06-01,,190.00,\n",  # 12: overlaps 2
    )
    with pytest.raises(PriceListError) as caught:
        load_price_list(bad)
    lines = [int(e.split()[1].rstrip(":")) for e in caught.value.errors]
    assert lines == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12], caught.value.errors
    assert "line 12: in force on the same days as line 2" in caught.value.errors[-1]
    with arc.db.session() as session:
        assert session.scalars(select(PriceList.id)).all() == [first]
        active = select(func.count()).where(ChargeItemDefinition.active.is_(True))
        assert session.scalar(active) == 20


def test_unknown_column_and_float_are_rejected(tmp_path: Path):
    path = tmp_path / "p.csv"
    path.write_text("kind,effective_from,base_amount,price_eur\ntechnical,2026-01-01,1.00,1\n")
    with pytest.raises(PriceListError, match="unknown column"):
        load_price_list(path)
    toml = write(
        tmp_path,
        '[[definition]]\ncode_system = "local"\ncode = "A"\nkind = "technical"\n'
        "effective_from = 2026-01-01\nbase_amount = 12.5\n",
        "p.toml",
    )
    with pytest.raises(PriceListError) as caught:
        load_price_list(toml)
    assert caught.value.errors == [
        "line 1: base_amount: write money as a string ('12.50'), not a float"
    ]


def test_effective_dates_pick_the_definition_in_force(arc: Archive, tmp_path: Path):
    load(
        arc,
        write(
            tmp_path,
            ",,CT head,technical,CT,HEAD,,,2026-01-01,2026-06-30,100.00,\n"
            ",,CT head,technical,CT,HEAD,,,2026-07-01,,120.00,\n",
        ),
    )
    at = {
        day: find(arc, on=date.fromisoformat(day), modality="CT", body_part="HEAD")
        for day in ("2025-12-31", "2026-01-01", "2026-06-30", "2026-07-01", "2030-01-01")
    }
    assert at["2025-12-31"] is None
    amounts = {day: d.base_amount for day, d in at.items() if d is not None}
    assert amounts == {
        "2026-01-01": Decimal("100.00"),
        "2026-06-30": Decimal("100.00"),
        "2026-07-01": Decimal("120.00"),
        "2030-01-01": Decimal("120.00"),
    }


def test_most_specific_match_wins_and_procedure_code_beats_it(arc: Archive, tmp_path: Path):
    load(
        arc,
        write(
            tmp_path,
            ",,any,technical,CT,HEAD,,,2026-01-01,,100.00,\n"
            ",,contrast,technical,CT,HEAD,,true,2026-01-01,,130.00,\n"
            ",,left,technical,CT,HEAD,L,,2026-01-01,,110.00,\n"
            ",,left contrast,technical,CT,HEAD,L,true,2026-01-01,,140.00,\n"
            "local,LOCAL-CT-HEAD,code,technical,CT,HEAD,,,2026-01-01,,90.00,\n",
        ),
    )

    def display(**kwargs) -> str | None:
        d = find(arc, modality="CT", body_part="head", **kwargs)
        return d.display if d else None

    assert display() == "any"
    assert display(contrast=False) == "any"
    assert display(contrast=True) == "contrast"
    assert display(laterality="L") == "left"
    assert display(laterality="R", contrast=True) == "contrast"
    assert display(laterality="l", contrast=True) == "left contrast"
    coded = [("loinc", "24627-2"), ("local", "LOCAL-CT-HEAD")]
    assert display(procedure_codes=coded, contrast=True) == "code"
    assert display(procedure_codes=[("loinc", "24627-2")]) == "any"  # unknown code: fallback
    assert find(arc, modality="MR", body_part="HEAD") is None


def test_conditional_surcharge_and_vat(arc: Archive):
    load(arc, SAMPLE)
    ct_chest = find(arc, procedure_codes=[("loinc", "24627-2")])
    assert ct_chest is not None
    plain = price(ct_chest, set())
    assert plain.net == Decimal("210.00")
    assert [(line.type, line.amount) for line in plain.lines] == [
        ("base", Decimal("210.00")),
        ("tax", Decimal("39.90")),
    ]
    assert plain.total == Decimal("249.90")
    contrast = price(ct_chest, {"contrast"})
    assert contrast.net == Decimal("255.00") and contrast.tax == Decimal("48.45")
    both = price(ct_chest, {"contrast", "after_hours"})
    # 210 + 45 + 210 * 0.25 = 307.50; VAT 19 % of it = 58.425 -> 58.42 (half even)
    assert both.net == Decimal("307.50") and both.tax == Decimal("58.42")
    assert both.total == Decimal("365.92")


def test_decimal_exactness_and_half_even_rounding():
    components = ";".join(f"surcharge:S{i}:3.333%" for i in range(30))
    parsed = parse_price_list(
        (
            HEADER
            + f"local,A,a,technical,,,,,2026-01-01,,10.00,{components};discount:D:x0.9\n"
            + "local,B,b,technical,,,,,2026-01-01,,0.10,"
            + ";".join(f"surcharge:C{i}:0.01" for i in range(100))
            + ";tax:T:12.5%\n"
        ).encode(),
        source="test.csv",
    )
    a, b = parsed.definitions
    priced = price(a)
    # each 3.333 % of 10.00 is 0.3333 -> 0.33; 30 of them: 9.90; subtotal 19.90
    assert priced.net == Decimal("17.91")  # 19.90 - 1.99 (a tenth off)
    assert sum((line.amount for line in priced.lines), Decimal(0)) == priced.net
    assert all(isinstance(line.amount, Decimal) for line in priced.lines)
    priced_b = price(b)
    assert priced_b.net == Decimal("1.10")  # float: 0.1 + 100 * 0.01 != 1.1
    assert priced_b.tax == Decimal("0.14")  # 0.1375 -> 0.14
    half_even = parse_price_list(
        (HEADER + "local,C,c,technical,,,,,2026-01-01,,0.50,tax:T:25%\n").encode(),
        source="c.csv",
    ).definitions[0]
    assert price(half_even).tax == Decimal("0.12")  # 0.125 -> 0.12, not 0.13


def test_site_tax_rate_taxes_a_definition_without_tax():
    parsed = parse_price_list(
        (
            HEADER
            + "local,A,a,technical,,,,,2026-01-01,,100.25,surcharge:S:10.00;discount:D:5%\n"
            + "local,B,b,technical,,,,,2026-01-01,,0.50,\n"
        ).encode(),
        source="site-tax.csv",
    )
    a, b = parsed.definitions
    untaxed = price(a)
    assert untaxed.tax == Decimal("0.00") and [line.type for line in untaxed.lines] == [
        "base",
        "surcharge",
        "discount",
    ]
    taxed = price(a, site_tax_percent=Decimal("7.7"), site_tax_code="MWST")
    # 100.25 + 10.00 - 5.51 (5.5125 -> 5.51) = 104.74; 7.7 % of it = 8.06498 -> 8.06
    assert taxed.net == untaxed.net == Decimal("104.74")
    assert taxed.lines[:-1] == untaxed.lines
    assert taxed.lines[-1] == PricedLine("tax", "MWST", "MWST 7.7%", Decimal("8.06"))
    assert (taxed.tax, taxed.total) == (Decimal("8.06"), Decimal("112.80"))
    assert sum((line.amount for line in taxed.lines), Decimal(0)) == taxed.total
    # rounded like every line: 25 % of 0.50 = 0.125 -> 0.12 (half even)
    half = price(b, site_tax_percent=Decimal("25"))
    assert half.lines[-1] == PricedLine("tax", "VAT", "VAT 25%", Decimal("0.12"))
    assert price(b, site_tax_percent=Decimal("0")).tax == Decimal("0.00")


def test_a_definition_with_its_own_tax_ignores_the_site_rate():
    parsed = parse_price_list(
        (
            HEADER
            + "local,A,a,technical,,,,,2026-01-01,,100.00,tax:OWN:10%\n"
            + "local,B,b,technical,,,,,2026-01-01,,100.00,tax:OWN:10%:contrast\n"
        ).encode(),
        source="own-tax.csv",
    )
    a, b = parsed.definitions
    own = price(a, site_tax_percent=Decimal("19"))
    assert [(line.code, line.amount) for line in own.lines if line.type == "tax"] == [
        ("OWN", Decimal("10.00"))
    ]
    # its tax applies only with contrast; without, it is untaxed: never the site rate
    assert price(b, {"contrast"}, site_tax_percent=Decimal("19")).tax == Decimal("10.00")
    assert price(b, set(), site_tax_percent=Decimal("19")).tax == Decimal("0.00")
    assert [line.type for line in price(b, set(), site_tax_percent=Decimal("19")).lines] == ["base"]


def test_site_tax_settings_are_validated():
    assert Settings().billing.tax_percent is None and Settings().billing.tax_code == "VAT"
    site = Settings(billing={"tax_percent": "7.7", "tax_code": "MWST"})  # type: ignore[arg-type]
    assert (site.billing.tax_percent, site.billing.tax_code) == (Decimal("7.7"), "MWST")
    assert Settings(billing={"tax_percent": 19}).billing.tax_percent == Decimal(19)  # type: ignore[arg-type]
    assert Settings(billing={"tax_percent": "0"}).billing.tax_percent == Decimal(0)  # type: ignore[arg-type]
    assert Settings(billing={"tax_percent": "100"}).billing.tax_percent == Decimal(100)  # type: ignore[arg-type]
    for bad, message in [
        ("-1", "between 0 and 100"),
        ("100.01", "between 0 and 100"),
        ("19.00001", "more than 4 decimals"),
        ("abc", "not a decimal number"),
        ("NaN", "not a decimal number"),
        (True, "must be a decimal number"),
    ]:
        with pytest.raises(ValueError, match=message):
            Settings(billing={"tax_percent": bad})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="tax_code"):
        Settings(billing={"tax_code": "V A T"})  # type: ignore[arg-type]


def test_reload_keeps_the_old_definitions_inactive(arc: Archive, tmp_path: Path):
    first = load(arc, SAMPLE)
    old = find(arc, procedure_codes=[("loinc", "24725-4")])
    assert old is not None
    old_id = old.id
    second = load(arc, write(tmp_path, "loinc,24725-4,CT Head,technical,,,,,2026-01-01,,199.00,\n"))
    assert second != first
    new = find(arc, procedure_codes=[("loinc", "24725-4")])
    assert new is not None and new.id != old_id and new.base_amount == Decimal("199.00")
    assert find(arc, modality="CT", body_part="CHEST") is None  # not in the new version
    with arc.db.session() as session:
        kept = session.get(ChargeItemDefinition, old_id)
        assert kept is not None and not kept.active and kept.price_list_fk == first
        assert kept.base_amount == Decimal("180.00")
        total = session.scalar(select(func.count()).select_from(ChargeItemDefinition))
        assert total == 21


def test_toml_loads_the_same_as_csv(tmp_path: Path):
    csv_path = write(
        tmp_path,
        "loinc,24627-2,CT Chest,technical,CT,CHEST,,,2026-01-01,,210.00,"
        "surcharge:CONTRAST:45.00:contrast;tax:VAT:19%\n"
        ",,MG breast,technical,MG,BREAST,B,false,2026-01-01,2026-12-31,150.00,"
        "discount:SCREENING:x0.9:screening\n",
    )
    toml_path = write(
        tmp_path,
        """
[[definition]]
code_system = "loinc"
code = "24627-2"
display = "CT Chest"
kind = "technical"
modality = "CT"
body_part = "CHEST"
effective_from = 2026-01-01
base_amount = "210.00"
components = [
  { type = "surcharge", code = "CONTRAST", value = "45.00", condition = "contrast" },
  { type = "tax", code = "VAT", value = "19%" },
]

[[definition]]
display = "MG breast"
kind = "technical"
modality = "MG"
body_part = "BREAST"
laterality = "B"
contrast = false
effective_from = "2026-01-01"
effective_to = 2026-12-31
base_amount = "150.00"
components = [{ type = "discount", code = "SCREENING", value = "x0.9", condition = "screening" }]
""",
        "prices.toml",
    )
    from_csv = load_price_list(csv_path).definitions
    from_toml = load_price_list(toml_path).definitions
    assert [d.line for d in from_toml] == [2, 16]
    strip = [{**vars(d), "line": 0} for d in from_csv]
    assert strip == [{**vars(d), "line": 0} for d in from_toml]


def test_currency_setting_is_validated():
    assert Settings(billing={"currency": "CHF"}).billing.currency == "CHF"  # type: ignore[arg-type]
    assert Settings().billing.currency == "EUR"
    with pytest.raises(ValueError, match="ISO 4217"):
        Settings(billing={"currency": "eur"})  # type: ignore[arg-type]


def run(backend: Backend, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("PACSBRIDGE_")}
    env |= backend.env | {"COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run(
        [str(PACSBRIDGE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120
    )


def test_cli_load_and_list(index_backend: Backend, tmp_path: Path):
    loaded = run(index_backend, tmp_path, "billing", "prices", "load", str(SAMPLE))
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {
        "price_list": 1,
        "definitions": 20,
        "billable": 0,
    }
    bad = write(
        tmp_path,
        "loinc,24725-4,CT Head,technical,,,,,2026-01-01,,1.0.0,\n"
        "local,A,A,technical,,,,,yesterday,,1.00,\n",
    )
    failed = run(index_backend, tmp_path, "billing", "prices", "load", str(bad))
    assert failed.returncode == 1
    assert "Traceback" not in failed.stderr
    errors = [line for line in failed.stderr.splitlines() if line.startswith("line ")]
    assert [e.split(":")[0] for e in errors] == ["line 2", "line 3"], failed.stderr
    listed = run(index_backend, tmp_path, "billing", "prices", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    if date.today() >= date(2026, 1, 1):
        assert len(rows) == 20
    assert all(row["active"] and row["price_list"] == 1 for row in rows)
    reloaded = run(
        index_backend, tmp_path, "billing", "prices", "load", str(SAMPLE), "--name", "v2"
    )
    assert reloaded.returncode == 0, reloaded.stderr
    everything = run(index_backend, tmp_path, "billing", "prices", "list", "--all", "--json")
    rows = json.loads(everything.stdout)
    assert len(rows) == 40
    assert {(row["price_list"], row["active"]) for row in rows} == {(1, False), (2, True)}
    text = run(index_backend, tmp_path, "billing", "prices", "list", "--all")
    assert text.returncode == 0 and "(inactive)" in text.stdout and "24725-4" in text.stdout
