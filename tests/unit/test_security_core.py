"""The pure parts of security: revocation facts and their effect on the token verifier, and the
per-token rate limit's bucket arithmetic (time passed in)."""
from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared import auth
from shared.ratelimit import Bucket, Rate, RateLimiter, retry_after, take
from shared.revocation import (
    Revocations,
    check_jti,
    jti_key,
    jti_value,
    subject_key,
    subject_of_key,
    subject_value,
)

KEY = b"0123456789abcdef0123456789abcdef"


# -- revocation -----------------------------------------------------------------------------------------------
@given(st.text(min_size=1, max_size=200))
def test_any_subject_survives_its_key_encoding(subject: str) -> None:
    key = subject_key(subject)
    assert subject_of_key(key) == subject
    # a NATS KV key: letters, digits and - _ = . / only
    assert all(c.isascii() and (c.isalnum() or c in "-_=./") for c in key), key


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "x" * 129, "jti>", "*"])
def test_a_jti_that_is_no_kv_key_token_is_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        check_jti(bad)


def test_a_revoked_jti_is_refused_by_a_verifier_that_had_it_cached() -> None:
    # given a verifier that already verified (and cached) a token
    revs = Revocations()
    v = auth.TokenVerifier(KEY, revocations=revs)
    token = auth.issue_token(KEY, role="handler", scope="dept:dinghai-roads")
    p = v.verify(token)
    sibling = auth.issue_token(KEY, role="handler", scope="dept:dinghai-roads")
    # when its jti is revoked
    revs.apply(jti_key(p.token_id), jti_value(at=time.time(), by="ops"), seq=1)
    # then the cached token is refused, and another token of the same subject is not
    with pytest.raises(auth.TokenError, match="token revoked"):
        v.verify(token)
    with pytest.raises(auth.TokenError, match="token revoked"):
        auth.TokenVerifier(KEY, revocations=revs).verify(token)
    assert v.verify(sibling).subject == p.subject
    # and a delete of the entry lifts it
    revs.apply(jti_key(p.token_id), None, seq=2)
    assert v.verify(token) == p and revs.seq == 2


def test_revoking_a_subject_refuses_its_tokens_issued_until_then_only() -> None:
    now = 1_800_000_000.0
    revs = Revocations()
    v = auth.TokenVerifier(KEY, revocations=revs)
    old = auth.issue_token(KEY, role="grid_worker", scope="area:g1", subject="张三", now=now - 3600)
    same_second = auth.issue_token(KEY, role="grid_worker", scope="area:g1", subject="张三", now=now + 0.9)
    later = auth.issue_token(KEY, role="grid_worker", scope="area:g1", subject="张三", now=now + 1)
    other = auth.issue_token(KEY, role="grid_worker", scope="area:g1", subject="李四", now=now - 3600)
    v.verify(old, now=now)  # cached before the revocation
    revs.apply(subject_key("张三"), subject_value(before=now + 0.5, by="ops"), seq=1)
    for token in (old, same_second):  # iat has whole seconds: the revocation's own second is refused too
        with pytest.raises(auth.TokenError, match="token revoked"):
            v.verify(token, now=now + 2)
    assert v.verify(later, now=now + 2).subject == "张三"
    assert v.verify(other, now=now + 2).subject == "李四"


def test_bucket_entries_not_written_by_needle_are_ignored() -> None:
    revs = Revocations()
    revs.apply("sub.!!!", b'{"before": 1}')
    revs.apply(subject_key("x"), b"not json")
    revs.apply(subject_key("y"), b'{"at": 1}')
    revs.apply("other.key", b"1")
    assert revs == Revocations()


# -- rate limit -----------------------------------------------------------------------------------------------
def test_a_new_bucket_grants_the_burst_then_refuses_with_the_wait() -> None:
    rate = Rate(per_s=2.0, burst=3)
    bucket: Bucket | None = None
    waits = []
    for _ in range(4):
        bucket, wait = take(bucket, rate, now=100.0)
        waits.append(wait)
    assert waits == [0.0, 0.0, 0.0, 0.5]  # the fourth waits half a second for the next token
    bucket, wait = take(bucket, rate, now=100.5)
    assert wait == 0.0
    assert retry_after(0.5) == 1 and retry_after(1.01) == 2 and retry_after(0.0001) == 1


def test_a_clock_going_backwards_adds_no_tokens() -> None:
    rate = Rate(per_s=10.0, burst=1)
    bucket, _ = take(None, rate, now=50.0)
    bucket, wait = take(bucket, rate, now=10.0)
    assert wait == pytest.approx(0.1) and bucket.tokens == 0.0


@settings(max_examples=200, deadline=None)
@given(per_s=st.floats(0.1, 1000), burst=st.integers(1, 500),
       gaps=st.lists(st.floats(0, 5, allow_nan=False), min_size=1, max_size=200))
def test_granted_requests_never_exceed_burst_plus_rate_times_elapsed(per_s: float, burst: int,
                                                                     gaps: list[float]) -> None:
    rate = Rate(per_s, burst)
    bucket: Bucket | None = None
    now, granted = 0.0, 0
    for gap in gaps:
        now += gap
        bucket, wait = take(bucket, rate, now)
        assert wait >= 0 and 0 <= bucket.tokens <= burst
        if wait == 0:
            granted += 1
        else:  # the wait is exactly what it takes to earn the missing fraction of a token
            assert take(bucket, rate, now + wait + 1e-9)[1] == 0.0
    assert granted <= burst + per_s * now + 1e-6


def test_the_limiter_keeps_reads_writes_and_subjects_apart() -> None:
    lim = RateLimiter(reads=Rate(1, 2), writes=Rate(1, 1))
    assert lim.check("a", write=True, now=0) == 0
    assert lim.check("a", write=True, now=0) > 0  # a's writes are spent
    assert lim.check("a", write=False, now=0) == 0  # a's reads are not
    assert lim.check("b", write=True, now=0) == 0  # nor b's writes
    assert lim.check("a", write=True, now=1) == 0  # one second later a may write again


def test_a_rate_of_zero_switches_the_limit_off_and_memory_stays_bounded() -> None:
    off = RateLimiter(reads=Rate(0, 1), writes=Rate(0, 1))
    assert all(off.check("a", write=True, now=0) == 0 for _ in range(10_000))
    lim = RateLimiter(reads=Rate(1, 1), writes=Rate(1, 1), max_keys=100)
    for i in range(1_000):
        lim.check(f"s{i}", write=False, now=0)
    assert len(lim._buckets) == 100
