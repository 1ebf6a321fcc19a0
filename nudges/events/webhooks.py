"""Webhooks as the conventions say: a CloudEvents 1.0 event in structured JSON mode, signed as Standard
Webhooks 1.0 does (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256>` over
`{id}.{timestamp}.{body}` with the endpoint's `whsec_` secret).

The id is the same on every attempt (the receiver's idempotency key: a retry after a lost answer is
recognised, not shown twice); the timestamp is the attempt's, on the wall clock, because receivers
refuse signatures more than five minutes from their own clock (a pinned clinical clock would make every
signature stale). `verify` is the receiver's side, for integrators and the tests.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Any

import orjson

from ..errors import ConfigError

SPEC_VERSION = "1.0"
EVENT_TYPE = "org.nudges.card.fired.v1"
CONTENT_TYPE = "application/cloudevents+json; charset=utf-8"
TOLERANCE_SECONDS = 300  # Standard Webhooks: five minutes either way
SECRET_PREFIX = "whsec_"


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_` secret: the base64 after the prefix (24 to 64 bytes)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ConfigError("a webhook secret starts with whsec_ (Standard Webhooks)")
    text = secret[len(SECRET_PREFIX):]
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError("a webhook secret is whsec_ followed by base64") from None
    if not 24 <= len(key) <= 64:
        raise ConfigError(f"a webhook secret holds 24 to 64 random bytes (this one {len(key)})")
    return key


def sign(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret_key(secret), f"{message_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(secret: str, message_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if timestamp is None else timestamp
    return {"Content-Type": CONTENT_TYPE, "webhook-id": message_id, "webhook-timestamp": str(stamp),
            "webhook-signature": sign(secret, message_id, stamp, body)}


def verify(secret: str, received: dict[str, str], body: bytes, now: float | None = None) -> bool:
    """Standard Webhooks verification: all three headers, a timestamp within five minutes, and one `v1`
    signature that matches (compared in constant time; several allow a secret to be rotated)."""
    lower = {k.lower(): v for k, v in received.items()}
    message_id, stamp, signatures = (lower.get(k) for k in ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not (message_id and stamp and signatures) or not stamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE_SECONDS:
        return False
    expected = sign(secret, message_id, int(stamp), body).split(",", 1)[1]
    return any(version == "v1" and hmac.compare_digest(value, expected)
               for version, _, value in (s.partition(",") for s in signatures.split(" ")))


def cloudevent(*, event_id: str, source: str, time_: str, subject: str, data: dict[str, Any]) -> bytes:
    """The event as sent: every attribute in the body (structured mode), `data` as a JSON value."""
    event = {"specversion": SPEC_VERSION, "id": event_id, "source": source, "type": EVENT_TYPE, "time": time_,
             "subject": subject, "datacontenttype": "application/json", "data": data}
    return orjson.dumps(event)
