"""The CapabilityStatement (FHIR R4 capabilitystatement.html), built from what the providers
declare, so that it lists exactly the resources, interactions, search parameters and includes
that work."""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import metadata
from typing import Any

from fhir_bridge.context import Context
from fhir_bridge.rest import instant

FHIR_VERSION = "4.0.1"
_PUBLISHED = datetime.now(UTC)

# Search result parameters every type takes (search.html#all): listed once, at the rest level.
_COMMON = [
    ("_count", "number", "Entries per page (default and maximum in the settings)"),
    ("_sort", "special", "Sort by the type's sortable parameters; '-' for descending"),
    ("_elements", "special", "Only these top-level elements (the resources are SUBSETTED)"),
    ("_summary", "token", "true | false | count | data | text"),
    ("_total", "token", "none | accurate"),
    ("_format", "special", "json, application/json, application/fhir+json"),
    ("_pretty", "special", "true to indent the JSON"),
]


def capability_statement(ctx: Context) -> dict[str, Any]:
    try:
        software_version = metadata.version("pacsbridge")
    except metadata.PackageNotFoundError:
        software_version = "unknown"
    return _statement(ctx, software_version)


def _statement(ctx: Context, software_version: str) -> dict[str, Any]:
    resources = []
    for provider in ctx.providers.values():
        entry: dict[str, Any] = {
            "type": provider.type,
            "profile": provider.profile,
            "documentation": provider.documentation or provider.type,
            "interaction": [{"code": code} for code in provider.interactions],
            "versioning": "versioned" if "vread" in provider.interactions else "no-version",
            "readHistory": "history-instance" in provider.interactions,
            "updateCreate": False,
            "conditionalCreate": provider.conditional_create,
            "conditionalRead": "not-supported",
            "conditionalUpdate": False,
            "conditionalDelete": "not-supported",
        }
        if provider.operations:
            entry["operation"] = [
                {"name": name, "definition": definition} for name, definition in provider.operations
            ]
        if provider.includes:
            entry["searchInclude"] = sorted(provider.includes)
        if provider.revincludes:
            entry["searchRevInclude"] = sorted(provider.revincludes)
        if "search-type" in provider.interactions:
            params = []
            for param in provider.params.values():
                item: dict[str, Any] = {"name": param.name, "type": param.type}
                if param.definition:
                    item["definition"] = param.definition
                doc = param.documentation
                if param.modifiers:
                    doc += f" (modifiers: {', '.join(sorted(param.modifiers))})"
                if param.chain is not None:
                    doc += "; chains: " + param.name + ":Patient.<parameter>"
                item["documentation"] = doc
                params.append(item)
            entry["searchParam"] = params
        resources.append(entry)
    return {
        "resourceType": "CapabilityStatement",
        "id": "pacsbridge",
        "url": f"{ctx.base}/metadata",
        "name": "PacsbridgeFHIR",
        "title": "pacsbridge FHIR R4 bridge",
        "status": "active",
        "experimental": False,
        "date": instant(_PUBLISHED),
        "publisher": "pacsbridge",
        "kind": "instance",
        "software": {"name": "pacsbridge", "version": software_version},
        "implementation": {"description": "pacsbridge FHIR R4 bridge", "url": ctx.base},
        "fhirVersion": FHIR_VERSION,
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Views of the archive: patients, imaging studies, reports and AI findings, "
                    "imaging orders (ServiceRequest, the Modality Worklist's scheduled steps), "
                    "and billing: the price list, charges, accounts, invoices and payments; "
                    "administrators subscribe to their changes (Subscription, rest-hook). "
                    "Unknown search parameters are ignored and reported in an OperationOutcome "
                    "entry, or refused under 'Prefer: handling=strict'."
                ),
                "resource": resources,
                "searchParam": [
                    {"name": name, "type": kind, "documentation": doc}
                    for name, kind, doc in _COMMON
                ],
                **_security(ctx),
            }
        ],
    }


def _security(ctx: Context) -> dict[str, Any]:
    """``rest.security`` where requests need a token: SMART on FHIR with the ``oauth-uris``
    extension naming the token endpoint (SMART App Launch 2.0, "Conformance")."""
    if ctx.settings.auth != "required":
        return {}
    root = ctx.base.removesuffix("/fhir")
    return {
        "security": {
            "cors": bool(ctx.settings.cors_origins),
            "service": [
                {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                            "code": "SMART-on-FHIR",
                        }
                    ]
                }
            ],
            "extension": [
                {
                    "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                    "extension": [{"url": "token", "valueUri": f"{root}/auth/token"}],
                }
            ],
            "description": "OAuth2 bearer tokens of this server's issuer (POST /auth/token)",
        }
    }
