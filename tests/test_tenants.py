"""Tenants, tiers and rate limits (llmserve/tenants.py) with hand-set clocks; no torch, no server.
The handler's 429 is in tests/test_handler.py, the real server's in tests/test_e2e.py."""

import pytest

from llmserve.request import TIERS, RequestError
from llmserve.tenants import RateLimited, Tenants

SECTION = {"default": {"tier": "batch"},
           "team-a": {"tier": "premium", "max_requests_per_s": 2},
           "team-b": {"max_tokens_per_min": 600}}


def test_headers_name_the_tenant_and_tier_in_any_case():
    t = Tenants(SECTION)
    assert t.identify({"X-Tenant": "team-a"}) == ("team-a", TIERS.index("premium"))
    assert t.identify({"x-tenant": "team-a", "X-PRIORITY": "batch"}) == ("team-a", TIERS.index("batch"))
    assert t.identify({"X-Tenant": "team-b"}) == ("team-b", TIERS.index("standard"))   # the policy's default
    assert t.identify({}) == ("anonymous", TIERS.index("batch"))                       # `default:` policy
    assert Tenants().identify({"url_path": ""}) == ("anonymous", TIERS.index("standard"))


@pytest.mark.parametrize("headers, field", [({"X-Priority": "gold"}, "X-Priority"),
                                            ({"X-Tenant": "a b"}, "X-Tenant"),
                                            ({"X-Tenant": "x" * 65}, "X-Tenant")])
def test_bad_headers_are_a_400_naming_the_header(headers, field):
    with pytest.raises(RequestError) as e:
        Tenants(SECTION).identify(headers)
    assert e.value.status == 400 and e.value.field == field


def test_requests_per_second_bucket_refuses_and_says_when_to_retry():
    t = Tenants(SECTION)
    t.admit("team-a", now=0)
    t.admit("team-a", now=0)                       # a burst of one second's worth: 2
    with pytest.raises(RateLimited) as e:
        t.admit("team-a", now=0.1)
    assert e.value.limit == "max_requests_per_s" and e.value.retry_after_s == pytest.approx(0.4)
    t.admit("team-a", now=0.5)                     # refilled at 2 a second
    for _ in range(100):
        t.admit("anonymous", now=0)                # no limit for the others


def test_tokens_per_minute_counts_generated_tokens_after_the_fact():
    t = Tenants(SECTION)
    t.admit("team-b", now=0)
    t.charge("team-b", 900, now=1)                 # a full bucket of 600 - 900: 300 in debt, refilled 10 a second
    with pytest.raises(RateLimited) as e:
        t.admit("team-b", now=2)
    assert e.value.limit == "max_tokens_per_min" and e.value.retry_after_s == pytest.approx(29.1)
    t.admit("team-b", now=32)


@pytest.mark.parametrize("section", [{"t": {"tier": "gold"}}, {"t": {"max_requests_per_s": -1}},
                                     {"t": {"rate": 1}}, {"bad name": {}}, {"t": 3}])
def test_bad_tenants_section_is_an_error(section):
    with pytest.raises(ValueError):
        Tenants(section)
