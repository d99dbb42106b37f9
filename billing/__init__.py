"""Billing: the price list (``prices``), charge capture from studies and signed reports
(``capture``), manual charges and adjustments (``manual``), accounts (``accounts``), invoices
and payments (``invoices``, ``reconciliation``).

Money is ``Decimal`` everywhere; this package knows no FHIR (``fhir_bridge`` maps its records).
"""
