"""The one bearer-token check, for HTTP (``Authorization`` header) and gRPC
(``authorization`` metadata) alike: constant-time against every configured key."""

from __future__ import annotations

import hmac


def authorised(value: bytes | None, keys: list[bytes]) -> bool:
    """Whether an ``Authorization`` value (``Bearer <key>``) names one of ``keys``; always
    true without keys."""
    if not keys:
        return True
    if value is None:
        return False
    scheme, _, token = value.partition(b" ")
    if scheme.lower() != b"bearer":
        return False
    token = token.strip()
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token, key)
    return ok
