"""CDS Hooks client JWT verification against real keys, a real loopback JWKS server and real SQLite."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from nudges.api.auth import Authenticator, Caller, check_startup_policy
from nudges.clock import FixedClock
from nudges.errors import ConfigError, Unauthorized
from nudges.settings import AuthSettings, ClientSettings, Settings
from nudges.store import Store

ISS = "https://ehr.example.org"
FILE_ISS = "https://other-ehr.example.org"
AUD = "https://nudges.example.org/cds-services/equity-screening"
# Far from the real "now": a verifier that used the system clock would reject every valid token.
NOW = datetime(2021, 3, 4, 5, 6, 7, tzinfo=UTC)


def _public_jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algorithm = ECAlgorithm if isinstance(key, ec.EllipticCurvePrivateKey) else RSAAlgorithm
    jwk = algorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, alg=alg, use="sig")
    return jwk


@dataclass
class JwksServer:
    """A loopback HTTP server serving JWK Sets by path and counting requests per path."""

    docs: dict[str, dict[str, Any]] = field(default_factory=dict)
    hits: dict[str, int] = field(default_factory=dict)
    base: str = ""

    def url(self, path: str) -> str:
        return self.base + path


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    state = JwksServer()
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                state.hits[self.path] = state.hits.get(self.path, 0) + 1
                doc = state.docs.get(self.path)
            body = json.dumps(doc).encode() if doc is not None else b"{}"
            self.send_response(200 if doc is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock(NOW)


@pytest.fixture
def store(tmp_path: Path, clock: FixedClock) -> Iterator[Store]:
    db = Store(f"sqlite:///{tmp_path}/t.db", clock)
    db.migrate()
    yield db
    db.dispose()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
def keys() -> dict[str, Any]:
    return {
        "ec": ec.generate_private_key(ec.SECP384R1()),
        "ec_other": ec.generate_private_key(ec.SECP384R1()),
        "ec_new": ec.generate_private_key(ec.SECP384R1()),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "file": ec.generate_private_key(ec.SECP384R1()),
    }


@pytest.fixture
def env(jwks_server: JwksServer, keys: dict[str, Any], tmp_path: Path, store: Store,
        clock: FixedClock, http: httpx.AsyncClient) -> Env:
    jwks_server.docs["/jwks"] = {"keys": [_public_jwk(keys["ec"], "ec-1", "ES384"),
                                          _public_jwk(keys["rsa"], "rsa-1", "RS384")]}
    jwks_server.docs["/jku-jwks"] = {"keys": [_public_jwk(keys["ec_other"], "jku-1", "ES384")]}
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps({"keys": [_public_jwk(keys["file"], "file-1", "ES384")]}))
    settings = AuthSettings(clients=[
        ClientSettings(iss=ISS, jwks_url=jwks_server.url("/jwks"),
                       jku_allowlist=[jwks_server.url("/jku-jwks")]),
        ClientSettings(iss=FILE_ISS, jwks_file=jwks_file, tenant="tenant-a"),
    ])
    return Env(Authenticator(settings, store, clock, http), jwks_server, keys)


@dataclass
class Env:
    auth: Authenticator
    server: JwksServer
    keys: dict[str, Any]

    def token(self, key: str = "ec", kid: str = "ec-1", alg: str = "ES384", **changes: Any) -> str:
        """A signed token; a claim or header given as None is left out, `h_*` names header fields."""
        now = int(NOW.timestamp())
        claims: dict[str, Any] = {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300,
                                  "jti": uuid.uuid4().hex}
        headers: dict[str, Any] = {"kid": kid, "typ": "JWT"}
        for name, value in changes.items():
            target, name = (headers, name[2:]) if name.startswith("h_") else (claims, name)
            target[name] = value
        claims = {k: v for k, v in claims.items() if v is not None}
        headers = {k: v for k, v in headers.items() if v is not None}
        return jwt.encode(claims, self.keys[key], algorithm=alg, headers=headers)

    async def check(self, token: str, *, scheme: str = "Bearer", audience: str = AUD) -> Caller:
        return await self.auth.authenticate(f"{scheme} {token}", audience)

    async def rejects(self, token: str, reason: str, **kwargs: Any) -> None:
        with pytest.raises(Unauthorized) as info:
            await self.check(token, **kwargs)
        assert reason in info.value.reason
        assert token not in info.value.reason


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"


def _claims() -> dict[str, Any]:
    now = int(NOW.timestamp())
    return {"iss": ISS, "aud": AUD, "iat": now, "exp": now + 300, "jti": uuid.uuid4().hex}


# -- accepted tokens ---------------------------------------------------------------------------------


async def test_valid_token_round_trips(env: Env) -> None:
    token = env.token(aud=["https://elsewhere.example.org", AUD], tenant="t-1",
                      nbf=int(NOW.timestamp()) - 300)
    caller = await env.auth.authenticate(f"bearer {token}", AUD)  # scheme is case-insensitive
    assert caller.authenticated and caller.iss == ISS and caller.tenant == "t-1"
    assert caller.jti and caller.client is not None and caller.client.iss == ISS
    assert env.server.hits == {"/jwks": 1}


async def test_leeway_accepts_small_clock_skew(env: Env) -> None:
    now = int(NOW.timestamp())
    assert (await env.check(env.token(iat=now + 30, exp=now + 330))).authenticated
    assert (await env.check(env.token(iat=now - 330, exp=now - 30))).authenticated


async def test_rs384_accepted(env: Env) -> None:
    assert (await env.check(env.token(key="rsa", kid="rsa-1", alg="RS384"))).iss == ISS


async def test_jwks_file_works(env: Env) -> None:
    caller = await env.check(env.token(key="file", kid="file-1", iss=FILE_ISS, tenant="tenant-a"))
    assert caller.iss == FILE_ISS and caller.tenant == "tenant-a"
    assert env.server.hits == {}


async def test_allow_listed_jku_fetches_keys_from_jku(env: Env) -> None:
    token = env.token(key="ec_other", kid="jku-1", h_jku=env.server.url("/jku-jwks"))
    assert (await env.check(token)).authenticated
    assert env.server.hits == {"/jwks": 1, "/jku-jwks": 1}  # the configured keys first, then the jku


async def test_a_jku_that_is_not_allow_listed_is_ignored_not_fatal(env: Env) -> None:
    """The HL7 sandbox and Epic always send `jku`; with their keys configured out of band (a file, or a
    JWKS URL other than the jku) the token verifies against those keys and the jku is never fetched."""
    env.server.docs["/sandbox-jwks"] = {"keys": [_public_jwk(env.keys["file"], "file-1", "ES384")]}
    by_file = env.token(key="file", kid="file-1", iss=FILE_ISS, tenant="tenant-a",
                        h_jku=env.server.url("/sandbox-jwks"))
    assert (await env.check(by_file)).iss == FILE_ISS
    by_url = env.token(h_jku="https://sandbox.cds-hooks.org/.well-known/jwks.json")
    assert (await env.check(by_url)).iss == ISS
    assert env.server.hits == {"/jwks": 1}  # never the jku
    forged = env.token(key="ec_other", kid="ec-1", h_jku=env.server.url("/sandbox-jwks"))
    await env.rejects(forged, "bad signature")  # the kid is known, the key is not: every other check holds


async def test_an_ignored_jku_is_logged_once_per_client_and_jku(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Sent on every call, an ignored jku would be a log line per call."""
    jku = "https://sandbox.cds-hooks.org/.well-known/jwks.json"
    with caplog.at_level(logging.INFO, logger="nudges.auth"):
        for _ in range(3):
            assert (await env.check(env.token(h_jku=jku))).iss == ISS
        assert (await env.check(env.token(h_jku=jku + "?v=2"))).iss == ISS
    said = [r.getMessage() for r in caplog.records if "ignored a jku" in r.getMessage()]
    assert len(said) == 2 and jku in said[0] and "v=2" in said[1]


async def test_key_rotation_refetches_once_per_interval(env: Env) -> None:
    assert (await env.check(env.token())).authenticated
    env.server.docs["/jwks"] = {"keys": [_public_jwk(env.keys["ec_new"], "ec-2", "ES384")]}
    assert (await env.check(env.token(key="ec_new", kid="ec-2"))).authenticated
    assert env.server.hits == {"/jwks": 2}
    await env.rejects(env.token(key="ec_new", kid="random-kid"), "kid not found")
    await env.rejects(env.token(key="ec_new", kid="another-kid"), "kid not found")
    assert env.server.hits == {"/jwks": 2}  # no refetch storm from unknown kids
    env.auth._monotonic = lambda: 1e12  # past the refresh interval: one more fetch is allowed
    await env.rejects(env.token(key="ec_new", kid="random-kid"), "kid not found")
    assert env.server.hits == {"/jwks": 3}


async def test_disabled_without_clients(store: Store, clock: FixedClock, http: httpx.AsyncClient) -> None:
    auth = Authenticator(AuthSettings(), store, clock, http)
    assert not auth.enabled
    assert await auth.authenticate(None, AUD) == Caller(authenticated=False)


# -- rejections --------------------------------------------------------------------------------------


async def test_missing_header(env: Env) -> None:
    with pytest.raises(Unauthorized, match="authentication required") as info:
        await env.auth.authenticate(None, AUD)
    assert "missing" in info.value.reason


async def test_wrong_scheme(env: Env) -> None:
    await env.rejects(env.token(), "not 'Bearer <jwt>'", scheme="Basic")


async def test_garbage_token(env: Env) -> None:
    await env.rejects("not-a-jwt", "malformed JWT")


async def test_alg_none(env: Env) -> None:
    await env.rejects(_unsigned({"alg": "none", "kid": "ec-1", "typ": "JWT"}, _claims()) + ".", "alg 'none'")


@pytest.mark.parametrize("algorithms", [["ES384", "RS384"], ["ES384", "HS256"]])
async def test_hs256_with_public_key_as_secret(env: Env, algorithms: list[str]) -> None:
    """The classic key-confusion attack; refused even if HS256 were (wrongly) configured."""
    env.auth.settings.algorithms = algorithms
    secret = env.keys["ec"].public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = _unsigned({"alg": "HS256", "kid": "ec-1", "typ": "JWT"}, _claims())
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    await env.rejects(f"{signing_input}.{_b64(signature)}", "alg 'HS256' is not allowed")


async def test_es256_not_allowed_by_default(env: Env) -> None:
    env.keys["p256"] = ec.generate_private_key(ec.SECP256R1())
    await env.rejects(env.token(key="p256", alg="ES256"), "alg 'ES256' is not allowed")


async def test_typ_must_be_jwt(env: Env) -> None:
    await env.rejects(env.token(h_typ="at+jwt"), "typ")


async def test_kid_required(env: Env) -> None:
    await env.rejects(env.token(h_kid=None), "kid header is missing")


async def test_unknown_iss(env: Env) -> None:
    await env.rejects(env.token(iss="https://attacker.example.org"), "iss is not a configured client")
    assert env.server.hits == {}  # no key fetch for strangers


async def test_unknown_kid(env: Env) -> None:
    await env.rejects(env.token(kid="no-such-kid"), "kid not found")


async def test_key_type_must_match_alg(env: Env) -> None:
    await env.rejects(env.token(key="rsa", kid="ec-1", alg="RS384"), "key type 'EC' does not fit alg RS384")


async def test_bad_signature(env: Env) -> None:
    await env.rejects(env.token(key="ec_other", kid="ec-1"), "bad signature")


async def test_wrong_aud(env: Env) -> None:
    await env.rejects(env.token(aud="https://nudges.example.org/cds-services/other"), "aud")
    await env.rejects(env.token(), "aud", audience=AUD + "/feedback")


async def test_expired(env: Env) -> None:
    now = int(NOW.timestamp())
    await env.rejects(env.token(iat=now - 400, exp=now - 61), "expired")


async def test_iat_in_future(env: Env) -> None:
    now = int(NOW.timestamp())
    await env.rejects(env.token(iat=now + 120, exp=now + 400), "iat is in the future")


async def test_nbf_in_future(env: Env) -> None:
    await env.rejects(env.token(nbf=int(NOW.timestamp()) + 120), "nbf")


async def test_missing_jti(env: Env) -> None:
    await env.rejects(env.token(jti=None), "'jti' is missing")


@pytest.mark.parametrize("claim", ["exp", "iat"])
async def test_missing_exp_or_iat(env: Env, claim: str) -> None:
    missing: dict[str, Any] = {claim: None}
    await env.rejects(env.token(**missing), f"'{claim}' is missing")


async def test_replayed_jti(env: Env) -> None:
    token = env.token()
    assert (await env.check(token)).authenticated
    await env.rejects(token, "jti replayed")


async def test_jku_not_allow_listed(env: Env) -> None:
    """An attacker's own JWKS (served and signed correctly) must not be consulted."""
    env.server.docs["/evil"] = {"keys": [_public_jwk(env.keys["ec_other"], "evil-1", "ES384")]}
    token = env.token(key="ec_other", kid="evil-1", h_jku=env.server.url("/evil"))
    await env.rejects(token, "kid not found")
    assert "/evil" not in env.server.hits


async def test_tenant_mismatch(env: Env) -> None:
    await env.rejects(env.token(key="file", kid="file-1", iss=FILE_ISS, tenant="tenant-b"), "tenant")
    await env.rejects(env.token(key="file", kid="file-1", iss=FILE_ISS), "tenant")


async def test_lifetime_too_long(env: Env) -> None:
    now = int(NOW.timestamp())
    await env.rejects(env.token(iat=now, exp=now + 3601), "lifetime")


async def test_jwks_fetch_error_is_unauthorized(
        jwks_server: JwksServer, store: Store, clock: FixedClock, http: httpx.AsyncClient,
        keys: dict[str, Any], caplog: pytest.LogCaptureFixture) -> None:
    settings = AuthSettings(clients=[ClientSettings(iss=ISS, jwks_url=jwks_server.url("/gone"))])
    env = Env(Authenticator(settings, store, clock, http), jwks_server, keys)
    with caplog.at_level(logging.INFO, logger="nudges.auth"):
        await env.rejects(env.token(), "JWKS fetch")
        await env.rejects(env.token(), "failed recently")  # backoff: no second request
    assert jwks_server.hits == {"/gone": 1}
    assert "JWKS fetch from" in caplog.text


async def test_log_never_contains_token(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    token = env.token(aud="https://wrong.example.org")
    with caplog.at_level(logging.INFO, logger="nudges.auth"):
        await env.rejects(token, "aud")
    assert "aud does not contain" in caplog.text and "kid='ec-1'" in caplog.text
    assert token not in caplog.text
    assert token.split(".")[2] not in caplog.text


# -- startup policy ----------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"])
def test_startup_loopback_without_clients(host: str) -> None:
    messages = check_startup_policy(Settings(host=host))
    assert len(messages) == 1 and "loopback" in messages[0] and "WARNING" not in messages[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "nudges.example.org"])
def test_startup_refuses_open_host_without_clients(host: str) -> None:
    with pytest.raises(ConfigError):
        check_startup_policy(Settings(host=host))


def test_startup_allow_unauthenticated_warns_loudly() -> None:
    messages = check_startup_policy(Settings(host="0.0.0.0", auth=AuthSettings(allow_unauthenticated=True)))
    assert messages[0].startswith("WARNING")


def test_startup_with_clients_on_open_host() -> None:
    auth = AuthSettings(clients=[ClientSettings(iss=ISS, jwks_url="https://ehr.example.org/jwks")])
    assert ISS in check_startup_policy(Settings(host="0.0.0.0", auth=auth))[0]


@pytest.mark.parametrize("auth", [
    AuthSettings(algorithms=["ES384", "HS256"]),
    AuthSettings(clients=[ClientSettings(iss=ISS, jwks_url="http://ehr.example.org/jwks")]),
    AuthSettings(clients=[ClientSettings(iss=ISS)]),
    AuthSettings(clients=[ClientSettings(iss=ISS, jwks_url="https://a/jwks"),
                          ClientSettings(iss=ISS, jwks_url="https://b/jwks")]),
])
def test_startup_rejects_unsafe_auth_config(auth: AuthSettings) -> None:
    with pytest.raises(ConfigError):
        check_startup_policy(Settings(host="0.0.0.0", auth=auth))
