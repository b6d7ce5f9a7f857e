"""Who a request is for and what it may do, decided before it reaches the engine: its tenant and
priority tier (the gateway's X-Tenant and X-Priority headers, else the tenant's tier from the
`tenants:` section of model-config.yaml) and per-tenant rate limits, token buckets on requests per
second and generated tokens per minute. Pure Python: knows no torch, no TorchServe."""

import math
import re
from dataclasses import dataclass, fields

from .request import TIERS, RequestError

TENANT_HEADER, TIER_HEADER = "x-tenant", "x-priority"
ANONYMOUS = "anonymous"
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")   # a tenant name, also a metrics label value


@dataclass(frozen=True)
class TenantPolicy:
    tier: str = "standard"              # the tier of its requests that send no X-Priority
    max_requests_per_s: float = 0.0     # sustained request rate (bursts of up to one second's worth); 0 = no limit
    max_tokens_per_min: float = 0.0     # generated tokens a minute (a request is refused while the tenant
                                        # is over; its tokens count when it finishes); 0 = no limit

    def __post_init__(self) -> None:
        if self.tier not in TIERS:
            raise ValueError(f"tier must be one of {TIERS}, got {self.tier!r}")
        for name in ("max_requests_per_s", "max_tokens_per_min"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")


class RateLimited(Exception):
    """Over a tenant's limit: the server's 429, naming the limit and when to retry."""

    def __init__(self, tenant: str, limit: str, value: float, retry_after_s: float) -> None:
        super().__init__(f"tenant {tenant!r} is over its limit {limit}={value:g}; retry in {retry_after_s:.1f} s")
        self.limit = limit
        self.retry_after_s = retry_after_s


class TokenBucket:
    """Holds up to `capacity` tokens, refilled at `rate` a second; a take may leave it in debt
    (generated tokens are counted after the fact), and nothing is taken while it is in debt."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate, self.capacity, self.level, self.time = rate, capacity, capacity, now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` could be taken; 0 = now."""
        self.level = min(self.capacity, self.level + (now - self.time) * self.rate)
        self.time = now
        return max(amount - self.level, 0.0) / self.rate

    def take(self, amount: float, now: float) -> None:
        self.wait_s(0, now)
        self.level -= amount


class Tenants:
    """The tenants: section (tenant name -> TenantPolicy fields; `default` for every tenant not
    listed, anonymous included) and each tenant's buckets, made on its first request."""

    def __init__(self, section: dict | None = None) -> None:
        section = dict(section or {})
        if not all(isinstance(name, str) and NAME.fullmatch(name) and isinstance(p, dict) for name, p in section.items()):
            raise ValueError(f"tenants: must map tenant names ({NAME.pattern}) to settings, got {section!r}")
        known = {f.name for f in fields(TenantPolicy)}
        for name, settings in section.items():
            if set(settings) - known:
                raise ValueError(f"tenants.{name}: unknown keys {sorted(set(settings) - known)}; known keys are {sorted(known)}")
        self.policies = {name: TenantPolicy(**settings) for name, settings in section.items()}
        self.default = self.policies.pop("default", TenantPolicy())
        self.buckets: dict[str, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def policy(self, tenant: str) -> TenantPolicy:
        return self.policies.get(tenant, self.default)

    def identify(self, headers: dict) -> tuple[str, int]:
        """(tenant, tier index) from a request's headers (names in any case); RequestError 400
        naming the header when one is malformed."""
        headers = {str(k).lower(): v for k, v in (headers or {}).items()}
        tenant = headers.get(TENANT_HEADER) or ANONYMOUS
        if isinstance(tenant, bytes):
            tenant = tenant.decode("utf-8", "replace")
        if not NAME.fullmatch(tenant):
            raise RequestError("X-Tenant", f"X-Tenant must match {NAME.pattern}, got {tenant[:80]!r}")
        tier = headers.get(TIER_HEADER) or self.policy(tenant).tier
        if isinstance(tier, bytes):
            tier = tier.decode("utf-8", "replace")
        if tier not in TIERS:
            raise RequestError("X-Priority", f"X-Priority must be one of {list(TIERS)}, got {tier[:80]!r}")
        return tenant, TIERS.index(tier)

    def admit(self, tenant: str, now: float) -> None:
        """Count one request against the tenant's limits, or raise RateLimited (counting nothing)."""
        requests, tokens = self._buckets(tenant, now)
        policy = self.policy(tenant)
        if requests and (wait := requests.wait_s(1, now)):
            raise RateLimited(tenant, "max_requests_per_s", policy.max_requests_per_s, wait)
        if tokens and (wait := tokens.wait_s(1, now)):
            raise RateLimited(tenant, "max_tokens_per_min", policy.max_tokens_per_min, wait)
        if requests:
            requests.take(1, now)

    def charge(self, tenant: str, num_generated: int, now: float) -> None:
        """A finished request's generated tokens, against the tenant's tokens-per-minute limit."""
        _, tokens = self._buckets(tenant, now)
        if tokens:
            tokens.take(num_generated, now)

    def _buckets(self, tenant: str, now: float) -> tuple[TokenBucket | None, TokenBucket | None]:
        if tenant not in self.buckets:
            p = self.policy(tenant)
            self.buckets[tenant] = (
                TokenBucket(p.max_requests_per_s, max(p.max_requests_per_s, 1), now) if p.max_requests_per_s else None,
                TokenBucket(p.max_tokens_per_min / 60, p.max_tokens_per_min, now) if p.max_tokens_per_min else None)
        return self.buckets[tenant]
