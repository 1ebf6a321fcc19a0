"""Which FHIR servers the service may talk to: the guard against server-side request forgery.

A hook call names its fhirServer; without these checks the service would fetch whatever a caller asks,
from wherever (cloud metadata addresses, internal hosts), with the caller's token.
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from ..errors import BadRequest
from ..settings import Settings

LOOPBACK_NAMES = {"localhost", "localhost.localdomain"}


def is_loopback(host: str) -> bool:
    host = host.strip().strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_server(base: str, settings: Settings, allowed: list[str] | None = None) -> str:
    """Refuse fhirServer values that would make the service an open proxy."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest("fhirServer must be an absolute http(s) URL", expression="fhirServer")
    if parts.username or parts.password:
        raise BadRequest("fhirServer must not carry credentials", expression="fhirServer")
    if parts.scheme == "http" and not (is_loopback(parts.hostname) or settings.fhir_allow_http):
        raise BadRequest("fhirServer must use https (http is accepted only for loopback)",
                         expression="fhirServer")
    try:
        address = ipaddress.ip_address(parts.hostname.strip("[]"))
        if address.is_link_local or address.is_multicast or address.is_unspecified:
            raise BadRequest("fhirServer address is not allowed", expression="fhirServer")
    except ValueError:
        pass
    allow = [*settings.fhir_server_allowlist, *(allowed or [])]
    normalized = base.rstrip("/") + "/"
    if allow and not any(normalized.startswith(a.rstrip("/") + "/") for a in allow):
        raise BadRequest("fhirServer is not on the allow-list", expression="fhirServer")
    return base.rstrip("/")
