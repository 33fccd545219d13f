"""API keys, tenants and per-key rate limits.

Keys are stored as sha256 hashes only (a leaked keys file does not leak keys). The file is
YAML or JSON: a list of {sha256, tenant, name, roles}; roles are `app` (completions and
end-user feedback), `annotator` (judgements as an annotator), `lead` (quality views, retrain
runs and model versions) and `operator` (the same views, plus promote and roll back). Moving
what is served is kept to its own role so that reviewing quality does not imply it.

Every route names the kind of call it is (`ACCESS`); `authorize` is the one key check.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tuneloop.gateway.errors import ApiError

ROLES = frozenset({"app", "annotator", "lead", "operator"})

# Which roles may make each kind of call. A lead does what app and annotator keys do and
# reads the quality views; an operator reads the workbench as a lead does (its landing page
# is the annotator's) and alone moves an alias. Operators stay off the public API: moving
# what is served does not make a key an app, and erasure is a lead's request, not a view.
ACCESS: dict[str, frozenset[str]] = {
    "complete": frozenset({"app", "lead"}),  # completions, comparisons, the model list
    "feedback": frozenset({"app", "annotator", "lead"}),  # feedback through the API
    "annotate": frozenset({"annotator", "lead", "operator"}),  # workbench queues and judgements
    "review": frozenset({"lead", "operator"}),  # calibration, exports, runs, model versions
    "erase": frozenset({"lead"}),
    "move": frozenset({"operator"}),  # promote and roll back
}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    name: str
    tenant: str
    roles: frozenset[str]
    sha256: str


def load_keys(path: Path) -> dict[str, ApiKey]:
    """Keys by hash. An invalid file fails loudly at start, naming the entry."""
    raw = yaml.safe_load(path.read_text()) if path.suffix in {".yaml", ".yml"} else json.loads(path.read_text())
    entries = raw.get("keys", raw) if isinstance(raw, dict) else raw
    keys: dict[str, ApiKey] = {}
    for i, e in enumerate(entries or []):
        digest = str(e.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}: keys[{i}].sha256 must be a sha256 hex digest")
        if not e.get("tenant"):
            raise ValueError(f"{path}: keys[{i}].tenant is required")
        roles = frozenset(e.get("roles", ["app"]))
        if not roles <= ROLES:
            raise ValueError(f"{path}: keys[{i}].roles has unknown roles {sorted(roles - ROLES)}")
        keys[digest] = ApiKey(name=e.get("name", f"key{i}"), tenant=e["tenant"], roles=roles, sha256=digest)
    return keys


class KeyStore:
    def __init__(self, keys: dict[str, ApiKey]) -> None:
        self._keys = keys

    def lookup(self, presented: str | None) -> ApiKey | None:
        if not presented:
            return None
        digest = hash_key(presented)
        key = self._keys.get(digest)
        # Compare digests in constant time even after the dict hit, so timing says nothing.
        if key is not None and hmac.compare_digest(key.sha256, digest):
            return key
        return None


def bearer_token(authorization: str | None) -> str | None:
    return authorization.split(" ", 1)[1].strip() if authorization and " " in authorization else None


def authorize(keys: KeyStore, authorization: str | None, call: str) -> ApiKey:
    """The key behind an Authorization header, if it may make this kind of call: else 401
    (no such key) or 403 (a key without a role for it)."""
    key = keys.lookup(bearer_token(authorization))
    if key is None:
        raise ApiError(401, "missing or invalid API key", "authentication_error")
    allowed = ACCESS[call]
    if not key.roles & allowed:
        raise ApiError(403, f"this key lacks the role for this call ({' or '.join(sorted(allowed))})",
                       "permission_error")
    return key


@dataclass
class _Bucket:
    tokens: float
    stamp: float


@dataclass
class RateLimiter:
    """A token bucket per key: `burst` at once, refilled at `per_minute`."""

    per_minute: float
    burst: int
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, key: str, now: float | None = None) -> float:
        """0 if allowed, else the seconds to wait before the next request may pass."""
        now = time.monotonic() if now is None else now
        rate = self.per_minute / 60.0
        with self._lock:
            b = self._buckets.setdefault(key, _Bucket(float(self.burst), now))
            b.tokens = min(float(self.burst), b.tokens + (now - b.stamp) * rate)
            b.stamp = now
            if b.tokens >= 1:
                b.tokens -= 1
                return 0.0
            return (1 - b.tokens) / rate


def retry_after_header(wait_s: float) -> str:
    return str(max(1, math.ceil(wait_s)))
