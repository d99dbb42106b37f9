"""Billing: the price list (ChargeItemDefinitions) so far.

Charge capture, accounts, invoices and payments are not built yet. Money is ``Decimal``
everywhere; this package knows no FHIR (``fhir_bridge`` maps its records).
"""
