"""CDS Hooks "Trusting CDS Clients": verify the Bearer JWT a CDS client (EHR) sends on every call.

The token is the only thing standing between the network and patient data, so every check is
explicit and fails closed with `Unauthorized` (reason for the log, never the token): asymmetric
algorithms only, allow-listed `iss` and `jku`, keys only from that issuer's JWK Set, `aud` equal to
the endpoint URL, short-lived tokens judged against the injected clock, and `jti` replay protection.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt

from ..clock import Clock
from ..errors import ConfigError, Unauthorized
from ..fhirserver.guard import is_loopback
from ..settings import AuthSettings, ClientSettings, Settings
from ..store import Store

log = logging.getLogger("nudges.auth")

# The only algorithms ever accepted, whatever the configuration says (the spec forbids `none` and
# HMAC), with the JWK key type each one needs.
KEY_TYPES = {
    "ES256": "EC", "ES384": "EC", "ES512": "EC",
    "RS256": "RSA", "RS384": "RSA", "RS512": "RSA",
    "PS256": "RSA", "PS384": "RSA", "PS512": "RSA",
    "EdDSA": "OKP",
}
_REQUIRED_CLAIMS = ["iss", "aud", "exp", "iat", "jti"]
_MAX_TOKEN_CHARS = 16_384  # far above any real CDS Hooks JWT; bounds parsing work
_FAILURE_BACKOFF_SECONDS = 10.0  # after a failed JWKS fetch, fail fast instead of queueing on timeouts
_FETCH_ERRORS = (OSError, ValueError, httpx.HTTPError)

Source = tuple[str, str]  # ("url", location) or ("file", location)


@dataclass(frozen=True)
class Caller:
    authenticated: bool
    iss: str | None = None
    tenant: str | None = None
    jti: str | None = None
    client: ClientSettings | None = None


@dataclass
class _KeySet:
    """Cached JWK Set of one source; times are monotonic seconds."""

    keys: dict[str, dict[str, Any]]
    fetched_at: float = -math.inf  # last successful fetch: the cache expires after the interval
    refetched_at: float = -math.inf  # last fetch forced by an unknown kid: throttled per interval
    failed_at: float = -math.inf  # last failed fetch: short backoff


class Authenticator:
    """Verifies CDS Hooks client JWTs; one instance per process so the JWKS cache is shared."""

    def __init__(self, settings: AuthSettings, store: Store, clock: Clock, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.store = store
        self.clock = clock
        self._ignored_jku: set[tuple[str, str]] = set()  # (iss, jku) already logged as ignored
        self.http = http
        self._clients = {client.iss: client for client in settings.clients}
        self._cache: dict[Source, _KeySet] = {}
        self._locks: dict[Source, asyncio.Lock] = {}
        self._monotonic = time.monotonic  # cache timing is operational, not verification time

    @property
    def enabled(self) -> bool:
        return bool(self._clients)

    async def authenticate(self, authorization: str | None, audience: str) -> Caller:
        if not self.enabled:
            return Caller(authenticated=False)
        seen: dict[str, str] = {}
        try:
            return await self._verify(authorization, audience, seen)
        except Unauthorized as exc:
            log.warning("rejected CDS client token: %s (iss=%s kid=%s jti_hash=%s)", exc.reason,
                        seen.get("iss", "-"), seen.get("kid", "-"), seen.get("jti_hash", "-"))
            raise

    async def _verify(self, authorization: str | None, audience: str, seen: dict[str, str]) -> Caller:
        token = _bearer(authorization)
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"malformed JWT ({type(exc).__name__})") from None
        kid, iss = header.get("kid"), unverified.get("iss")
        seen.update(kid=_safe(kid), iss=_safe(iss))
        if isinstance(unverified.get("jti"), str):
            seen["jti_hash"] = hashlib.sha256(unverified["jti"].encode()).hexdigest()[:16]

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in KEY_TYPES or alg not in self.settings.algorithms:
            raise Unauthorized(f"alg {_safe(alg)} is not allowed")
        typ = header.get("typ")
        if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
            raise Unauthorized(f"typ {_safe(typ)} is not JWT")
        if not isinstance(kid, str) or not kid:
            raise Unauthorized("kid header is missing")
        # `iss` is read unverified only to pick the client whose keys must then verify the token.
        client = self._clients.get(iss) if isinstance(iss, str) else None
        if client is None:
            raise Unauthorized("iss is not a configured client")

        key = _load_key(await self._find_key(self._sources(client, header.get("jku")), kid), alg)
        try:
            claims = jwt.decode(token, key, algorithms=[alg], audience=audience, issuer=client.iss, options={
                "require": _REQUIRED_CLAIMS, "verify_exp": False, "verify_iat": False,
                "verify_nbf": False, "enforce_minimum_key_length": True})
        except jwt.InvalidSignatureError:
            raise Unauthorized("bad signature") from None
        except jwt.MissingRequiredClaimError as exc:
            raise Unauthorized(f"required claim {exc.claim!r} is missing") from None
        except jwt.InvalidAudienceError:
            raise Unauthorized("aud does not contain the endpoint URL") from None
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"invalid JWT ({type(exc).__name__}: {exc})") from None

        exp = self._check_times(claims)
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise Unauthorized("jti is not a non-empty string")
        tenant = claims.get("tenant")
        if client.tenant is not None and tenant != client.tenant:
            raise Unauthorized(f"tenant {_safe(tenant)} does not match the client's tenant")
        # Claimed last, so a rejected token never burns its jti. Kept until exp + leeway, the last
        # instant at which the token would still be accepted.
        expires_at = datetime.fromtimestamp(exp + self.settings.leeway_seconds, UTC)
        if not await self.store.run(self.store.claim_token, client.iss, jti, expires_at):
            raise Unauthorized("jti replayed")
        return Caller(authenticated=True, iss=client.iss, tenant=tenant if isinstance(tenant, str) else None,
                      jti=jti, client=client)

    def _check_times(self, claims: dict[str, Any]) -> float:
        """exp/iat/nbf against the injected clock (PyJWT would use the system clock); returns exp."""
        now = self.clock.now().timestamp()
        leeway = self.settings.leeway_seconds
        values = {}
        for name in ("exp", "iat", "nbf"):
            value = claims.get(name)
            if value is None and name == "nbf":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise Unauthorized(f"{name} is not a NumericDate")
            values[name] = float(value)
        exp, iat = values["exp"], values["iat"]
        if exp <= now - leeway:
            raise Unauthorized("token expired")
        if iat > now + leeway:
            raise Unauthorized("iat is in the future")
        if values.get("nbf", -math.inf) > now + leeway:
            raise Unauthorized("token not yet valid (nbf)")
        if not 0 < exp - iat <= self.settings.max_token_lifetime_seconds:
            raise Unauthorized(f"token lifetime {exp - iat:.0f}s is outside (0, "
                               f"{self.settings.max_token_lifetime_seconds}]")
        return exp

    def _first_ignored(self, iss: str, jku: Any) -> bool:
        key = (iss, jku if isinstance(jku, str) else repr(type(jku)))
        if key in self._ignored_jku:
            return False
        if len(self._ignored_jku) >= 1000:  # a bound: a client inventing a jku per call is logged anew
            self._ignored_jku.clear()
        self._ignored_jku.add(key)
        return True

    def _sources(self, client: ClientSettings, jku: Any) -> list[Source]:
        """Where this client's keys may come from, in order: its configured key set (jwks_url, jwks_file),
        then an allow-listed `jku`. A `jku` that is not allow-listed is never fetched (it would let anyone
        who can send a token make the service fetch a URL of their choosing); the token is still verified
        against the configured keys, because EHRs and the HL7 sandbox send `jku` even when their keys are
        registered out of band."""
        sources: list[Source] = []
        if client.jwks_url:
            sources.append(("url", client.jwks_url))
        if client.jwks_file:
            sources.append(("file", str(client.jwks_file)))
        if jku is not None:
            if isinstance(jku, str) and jku in client.jku_allowlist and jku != client.jwks_url:
                sources.append(("url", jku))
            elif not (isinstance(jku, str) and jku == client.jwks_url) and self._first_ignored(client.iss, jku):
                # once per client and jku: the HL7 sandbox and Epic send theirs on every call
                log.info("ignored a jku that is not allow-listed; verifying against the configured keys "
                         "(iss=%s jku=%s; said once per client and jku)", _safe(client.iss), _safe(jku))
        if not sources:
            raise Unauthorized(f"jku {_safe(jku)} is not allow-listed and the client has no configured keys"
                               if jku is not None else "client has no jwks_url/jwks_file and the token has no jku")
        return sources

    async def _find_key(self, sources: list[Source], kid: str) -> dict[str, Any]:
        for source in sources:
            jwk_data = await self._lookup(source, kid)
            if jwk_data is not None:
                return jwk_data
        raise Unauthorized("kid not found in the client's JWK Set")

    async def _lookup(self, source: Source, kid: str) -> dict[str, Any] | None:
        """Cached lookup: refetch when the cache is stale, or once per interval for an unknown kid
        (key rotation without restart, but random kids from an attacker cannot cause a fetch storm)."""
        async with self._locks.setdefault(source, asyncio.Lock()):
            entry = self._cache.setdefault(source, _KeySet(keys={}))
            now, interval = self._monotonic(), self.settings.jwks_refresh_seconds
            stale = now - entry.fetched_at >= interval
            if stale or (kid not in entry.keys and now - entry.refetched_at >= interval):
                if now - entry.failed_at < min(interval, _FAILURE_BACKOFF_SECONDS):
                    raise Unauthorized(f"JWKS {source[1]} failed recently; not retrying yet")
                if not stale:
                    entry.refetched_at = now
                try:
                    entry.keys = await self._fetch(source)
                except _FETCH_ERRORS as exc:
                    entry.failed_at = now
                    log.error("JWKS fetch from %s failed: %s: %s", source[1], type(exc).__name__, exc)
                    raise Unauthorized(f"JWKS fetch from {source[1]} failed") from None
                entry.fetched_at = now
            return entry.keys.get(kid)

    async def _fetch(self, source: Source) -> dict[str, dict[str, Any]]:
        kind, location = source
        if kind == "file":
            data = json.loads(Path(location).read_text(encoding="utf-8"))
        else:
            response = await self.http.get(location, headers={"Accept": "application/json"})
            response.raise_for_status()
            data = response.json()
        keys = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(keys, list):
            raise ValueError("not a JWK Set (no 'keys' array)")
        return {k["kid"]: k for k in keys if isinstance(k, dict) and isinstance(k.get("kid"), str)}


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthorized("Authorization header is missing")
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Authorization header is not 'Bearer <jwt>'")
    if len(token) > _MAX_TOKEN_CHARS:
        raise Unauthorized("token is too large")
    return token


def _load_key(jwk_data: dict[str, Any], alg: str) -> jwt.PyJWK:
    """The JWK must suit the header alg (kty, declared alg, use), so one key cannot verify another
    algorithm's signatures; PyJWT then also checks the EC curve and the RSA key length."""
    if jwk_data.get("kty") != KEY_TYPES[alg]:
        raise Unauthorized(f"key type {_safe(jwk_data.get('kty'))} does not fit alg {alg}")
    if jwk_data.get("alg") not in (None, alg):
        raise Unauthorized(f"key is for alg {_safe(jwk_data.get('alg'))}, token uses {alg}")
    if jwk_data.get("use") not in (None, "sig"):
        raise Unauthorized("key is not a signature key")
    try:
        return jwt.PyJWK(jwk_data, algorithm=alg)
    except jwt.PyJWTError as exc:
        raise Unauthorized(f"unusable JWK ({type(exc).__name__})") from None


def _safe(value: Any) -> str:
    """Untrusted header/claim values in log lines: repr (no control characters), truncated."""
    return repr(value)[:80]


def check_startup_policy(settings: Settings) -> list[str]:
    """Refuse to serve patient data unauthenticated off loopback, and refuse key sources an attacker
    on the path could substitute (plain http off loopback)."""
    auth = settings.auth
    forbidden = [alg for alg in auth.algorithms if alg not in KEY_TYPES]
    if forbidden:
        raise ConfigError(f"auth.algorithms {forbidden} not allowed: CDS Hooks forbids 'none' and HMAC")
    if auth.clients:
        issuers = [client.iss for client in auth.clients]
        if len(set(issuers)) != len(issuers):
            raise ConfigError("auth.clients: each iss may be configured only once")
        for client in auth.clients:
            if not (client.jwks_url or client.jwks_file or client.jku_allowlist):
                raise ConfigError(f"auth client {client.iss!r}: set jwks_url, jwks_file or jku_allowlist")
            for url in [client.jwks_url, *client.jku_allowlist]:
                parts = urlsplit(url or "https://")
                local_http = parts.scheme == "http" and is_loopback(parts.hostname or "")
                if parts.scheme != "https" and not local_http:
                    raise ConfigError(f"auth client {client.iss!r}: JWKS URL {url!r} must be https")
        return [f"JWT authentication required; trusted issuers: {', '.join(issuers)}"]
    if is_loopback(settings.host):
        return [f"no auth.clients configured: accepting unauthenticated calls because the service is bound "
                f"to loopback ({settings.host})"]
    if auth.allow_unauthenticated:
        return [f"WARNING: NO AUTHENTICATION. auth.allow_unauthenticated is set and the service listens on "
                f"{settings.host}: ANYONE who can reach it can send patient data and read cards. "
                f"Configure auth.clients for any real deployment."]
    raise ConfigError(f"no auth.clients configured and host {settings.host!r} is not loopback: configure "
                      f"auth.clients (CDS Hooks JWT), bind to 127.0.0.1, or set auth.allow_unauthenticated")
