"""Limits that hold across gateway replicas: requests per key, tokens per tenant per minute,
concurrent generations per tenant.

With `limits_storage_url` (Redis) every replica counts in the same place: request and token
budgets are `limits`' sliding-window counters (two counters per key, O(1) whatever the cost),
and concurrency is a set of leases in a Redis sorted set, each expiring at its request's
deadline, so a replica that dies holding slots gives them back by itself. Without it the
same limits are counted in this process only, which is right for exactly one replica (the
chart refuses more than one without a URL).

Tokens are charged up front at what a request may cost: its prompt (estimated, the gateway
has no tokenizer) plus `max_tokens` for each of its `n` candidates. A tenant therefore cannot
start more work than its budget covers, however long the answers turn out.

If the shared store is unreachable the gateway serves without these limits (fail open) and
counts that in `tuneloop_gateway_limiter_errors_total`: losing fairness for a while beats
refusing every tenant.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from limits import RateLimitItemPerMinute
from limits.storage import storage_from_string
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from prometheus_client import Counter

log = logging.getLogger(__name__)

LIMITED = Counter("tuneloop_gateway_limited_total", "Requests refused by a limit.", ["limit", "tenant"])
LIMITER_ERRORS = Counter(
    "tuneloop_gateway_limiter_errors_total", "Calls to the shared limit store that failed (served unlimited)."
)

# Rough UTF-8 bytes per token of BPE vocabularies on English text; erring high on the count
# of prompt tokens only makes the up-front charge stricter.
_BYTES_PER_TOKEN = 3

# Takes a lease if fewer than ARGV[2] live ones exist. Time is the Redis server's, so the
# replicas' clocks never have to agree. KEYS[1]: the tenant's set; ARGV: lease id, limit, ttl ms.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


class Limited(Exception):
    """A limit refused the request; `retry_after_s` says when trying again may pass."""

    def __init__(self, limit: str, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.limit, self.retry_after_s = limit, retry_after_s


def prompt_cost(prompt_bytes: int, max_tokens: int, n: int) -> int:
    """Tokens charged for a generation request before it runs."""
    return math.ceil(prompt_bytes / _BYTES_PER_TOKEN) + max_tokens * max(n, 1)


@dataclass(frozen=True)
class QuotaLimits:
    requests_per_minute: int
    tenant_tokens_per_minute: int
    tenant_max_concurrent: int
    lease_ttl_s: float


class Quotas:
    def __init__(self, limits: QuotaLimits, storage_url: str | None) -> None:
        self.limits = limits
        self.shared = storage_url is not None
        uri = f"async+{storage_url}" if storage_url else "async+memory://"
        options = {"implementation": "redispy"} if storage_url else {}
        self._counters = SlidingWindowCounterRateLimiter(storage_from_string(uri, **options))
        self._requests = RateLimitItemPerMinute(limits.requests_per_minute, namespace="tuneloop-requests")
        self._tokens = RateLimitItemPerMinute(limits.tenant_tokens_per_minute, namespace="tuneloop-tokens")
        if storage_url:
            import redis.asyncio as redis

            self._redis = redis.Redis.from_url(storage_url)
            self._acquire_script = self._redis.register_script(_ACQUIRE)
        self._local_leases: dict[str, int] = defaultdict(int)

    async def close(self) -> None:
        if self.shared:
            await self._redis.aclose()

    async def admit_request(self, key_id: str, tenant: str) -> None:
        """One request of an API key; raises Limited over `requests_per_minute`."""
        await self._charge(self._requests, "requests", key_id, tenant, 1,
                           f"rate limit exceeded ({self.limits.requests_per_minute} requests per minute per key)")

    async def charge_tokens(self, tenant: str, tokens: int) -> None:
        """Charges `tokens` to the tenant's per-minute budget; raises Limited when it does not fit."""
        budget = self.limits.tenant_tokens_per_minute
        if tokens > budget:
            # Never fits, however long the caller waits: say so instead of a Retry-After.
            raise Limited("tokens", f"this request may use {tokens} tokens, over the tenant's budget of "
                          f"{budget} per minute; lower max_tokens or n", 60.0)
        await self._charge(self._tokens, "tokens", tenant, tenant, tokens,
                           f"token rate limit exceeded ({budget} tokens per minute for this tenant)")

    async def _charge(self, item, limit: str, identifier: str, tenant: str, cost: int, message: str) -> None:
        try:
            if await self._counters.hit(item, identifier, cost=cost):
                return
            stats = await self._counters.get_window_stats(item, identifier)
        except Exception:  # noqa: BLE001 - any failure of the store means serving unlimited
            self._store_failed()
            return
        LIMITED.labels(limit, tenant).inc()
        raise Limited(limit, message, max(1.0, stats.reset_time - time.time()))

    @asynccontextmanager
    async def generation_slot(self, tenant: str) -> AsyncIterator[None]:
        """Holds one of the tenant's concurrent-generation slots for the block's duration."""
        lease = uuid.uuid4().hex
        held = await self._acquire(tenant, lease)
        try:
            yield
        finally:
            if held:
                await self._release(tenant, lease)

    async def _acquire(self, tenant: str, lease: str) -> bool:
        limit = self.limits.tenant_max_concurrent
        if self.shared:
            try:
                ttl_ms = int(self.limits.lease_ttl_s * 1000)
                taken = await self._acquire_script(keys=[_lease_key(tenant)], args=[lease, limit, ttl_ms])
            except Exception:  # noqa: BLE001
                self._store_failed()
                return False
        else:
            taken = self._local_leases[tenant] < limit
            if taken:
                self._local_leases[tenant] += 1
        if not taken:
            LIMITED.labels("concurrency", tenant).inc()
            raise Limited("concurrency", f"too many concurrent generations ({limit} per tenant)", 1.0)
        return True

    async def _release(self, tenant: str, lease: str) -> None:
        if not self.shared:
            self._local_leases[tenant] -= 1
            return
        try:
            await self._redis.zrem(_lease_key(tenant), lease)
        except Exception:  # noqa: BLE001 - the lease expires at its deadline anyway
            self._store_failed()

    def _store_failed(self) -> None:
        LIMITER_ERRORS.inc()
        log.warning("limit store unreachable: serving without shared limits", exc_info=True)


def _lease_key(tenant: str) -> str:
    return f"tuneloop-leases/{tenant}"
