"""Access tokens for the service's own FHIR reads: SMART Backend Services (OAuth 2.0 client credentials
with a signed JWT assertion, RFC 7523). Hook calls bring the EHR's token; id-only notifications and
follow-up checks happen between visits, with nobody's token, so the service asks for its own.

Token lifetimes are security time, not clinical time: they use the wall clock even when NUDGES_NOW pins
the clinical clock (a pinned instant would make every assertion expired)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import orjson

from ..errors import ConfigError, FhirServerError
from ..settings import FhirBackendClient
from .guard import is_loopback

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ASSERTION_LIFETIME = 300  # seconds; SMART asks for no more than five minutes
REFRESH_MARGIN = 60  # seconds before expiry a cached token is replaced


@dataclass
class _Credentials:
    client: FhirBackendClient
    key: Any
    kid: str


@dataclass
class _Token:
    value: str
    expires: float


def load_credentials(client: FhirBackendClient) -> _Credentials:
    """Read the private key at start-up, so a missing or unreadable key stops the service there."""
    token_url = urlsplit(client.token_url)
    if token_url.scheme != "https" and not (token_url.scheme == "http" and is_loopback(token_url.hostname or "")):
        raise ConfigError(f"fhir_backend_clients: token_url of {client.base} must use https")
    try:
        text = client.private_key_file.read_text()
    except OSError as exc:
        raise ConfigError(f"fhir_backend_clients: cannot read {client.private_key_file}: {exc.strerror}") from None
    try:
        if text.lstrip().startswith("{"):
            data = orjson.loads(text)
            jwk: dict[str, Any] = data["keys"][0] if "keys" in data else data  # a JWK Set: its first key
            parsed = jwt.PyJWK(jwk, client.algorithm)
            key, kid = parsed.key, client.key_id or jwk.get("kid")
        else:
            key, kid = text, client.key_id
        jwt.encode({"probe": True}, key, algorithm=client.algorithm)  # a public or wrong-type key fails here
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, jwt.PyJWTError,
            orjson.JSONDecodeError) as exc:
        raise ConfigError(f"fhir_backend_clients: {client.private_key_file} is not a usable "
                          f"{client.algorithm} private key ({type(exc).__name__})") from None
    if not kid:
        raise ConfigError(f"fhir_backend_clients: set key_id for {client.base} (the registered key's kid)")
    return _Credentials(client, key, kid)


class BackendTokens:
    """One cached access token per configured FHIR server, shared by every FHIR client of the process.

    Everything that asks for a token runs on the app's event loop (hook calls, notifications, due
    follow-ups), so the cache needs no thread lock; an asyncio lock per server makes concurrent callers
    wait for one token request instead of each making its own."""

    def __init__(self, clients: list[FhirBackendClient]) -> None:
        credentials = [load_credentials(c) for c in clients]
        self._credentials = sorted(credentials, key=lambda c: len(c.client.base), reverse=True)
        self._cache: dict[str, _Token] = {}
        self._pending: dict[str, asyncio.Lock] = {}

    def _for(self, base: str) -> _Credentials | None:
        normalized = base.rstrip("/") + "/"
        return next((c for c in self._credentials if normalized.startswith(c.client.base.rstrip("/") + "/")),
                    None)

    def forget(self, base: str) -> None:
        """Drop a token the server refused (revoked, or its lifetime shorter than announced)."""
        found = self._for(base)
        if found is not None:
            self._cache.pop(found.client.base, None)

    def _cached(self, key: str) -> str | None:
        cached = self._cache.get(key)
        return cached.value if cached is not None and cached.expires - REFRESH_MARGIN > time.time() else None

    async def token(self, base: str, http: httpx.AsyncClient) -> str | None:
        """A bearer token for reads at `base`, or None when no credentials are configured for it."""
        found = self._for(base)
        if found is None:
            return None
        key = found.client.base
        value = self._cached(key)
        if value is not None:
            return value
        async with self._pending.setdefault(key, asyncio.Lock()):
            value = self._cached(key)  # another caller may have fetched it meanwhile
            if value is None:
                fresh = await self._request(found, http)
                self._cache[key] = fresh
                value = fresh.value
        return value

    async def _request(self, found: _Credentials, http: httpx.AsyncClient) -> _Token:
        client, now = found.client, int(time.time())
        assertion = jwt.encode(
            {"iss": client.client_id, "sub": client.client_id, "aud": client.token_url, "iat": now,
             "exp": now + ASSERTION_LIFETIME, "jti": str(uuid.uuid4())},
            found.key, algorithm=client.algorithm, headers={"kid": found.kid, "typ": "JWT"})
        try:
            response = await http.post(client.token_url, headers={"Accept": "application/json"}, data={
                "grant_type": "client_credentials", "scope": client.scope,
                "client_assertion_type": ASSERTION_TYPE, "client_assertion": assertion})
        except httpx.HTTPError as exc:
            raise FhirServerError(f"token endpoint unreachable ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise FhirServerError(f"token endpoint answered {response.status_code}")
        try:
            body = orjson.loads(response.content)
        except orjson.JSONDecodeError:
            raise FhirServerError("token endpoint answered with something other than JSON") from None
        value = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise FhirServerError("token endpoint gave no access_token")
        lifetime = body.get("expires_in")
        lifetime = lifetime if isinstance(lifetime, int) and lifetime > 0 else ASSERTION_LIFETIME
        return _Token(value, time.time() + lifetime)
