"""Start-up on a JetStream still settling: what is retried, how long, and what fails at once."""
from __future__ import annotations

import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError, BucketNotFoundError, ServiceUnavailableError

from shared.privacy.keystore import KeyStoreError
from shared.store.settling import backoff, retry_helps, settled
from shared.store.streams import StreamSetupError


def api_error(err_code: int, code: int = 500) -> APIError:
    e = APIError()
    e.err_code, e.code, e.description = err_code, code, "x"
    return e


@pytest.mark.parametrize("exc", [
    NatsTimeout(), TimeoutError(), NoRespondersError(), ServiceUnavailableError(), BucketNotFoundError(),
    api_error(10008, 503), api_error(10005),
    StreamSetupError("stream NEEDLE_EVENTS: JetStream system temporarily unavailable (err_code 10008)", 10008),
    KeyStoreError("bucket: no suitable peers for placement (err_code 10005)", 10005),
])
def test_a_cluster_still_settling_is_worth_waiting_for(exc: BaseException) -> None:
    assert retry_helps(exc)


@pytest.mark.parametrize("exc", [
    StreamSetupError("stream NEEDLE_EVENTS: replicas > 1 not supported in non-clustered mode (err_code 10074)",
                     10074),
    StreamSetupError("no code"), KeyStoreError("bucket: could not be created or updated"),
    api_error(10052), ValueError("bad config"), PermissionError("no"), ConnectionRefusedError(),
])
def test_a_refusal_that_stays_is_not(exc: BaseException) -> None:
    assert not retry_helps(exc)


def test_backoff_doubles_up_to_a_ceiling() -> None:
    assert [backoff(n) for n in range(1, 7)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def failing(errors: list[BaseException], result: str = "ok") -> tuple[list[int], object]:
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result
    return calls, attempt


async def test_retries_until_it_settles() -> None:
    clock = Clock()
    calls, attempt = failing([NatsTimeout(), BucketNotFoundError(), api_error(10008, 503)])
    assert await settled("streams", attempt, within_s=60, sleep=clock.sleep, clock=clock) == "ok"  # type: ignore[arg-type]
    assert len(calls) == 4 and clock.slept == [0.25, 0.5, 1.0]


async def test_a_refusal_that_stays_fails_at_once() -> None:
    clock = Clock()
    refusal = StreamSetupError("replicas > 1 not supported in non-clustered mode (err_code 10074)", 10074)
    calls, attempt = failing([refusal])
    with pytest.raises(StreamSetupError):
        await settled("streams", attempt, within_s=60, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]
    assert len(calls) == 1 and clock.slept == []


async def test_gives_up_with_the_last_error_when_the_time_is_up() -> None:
    clock = Clock()
    calls, attempt = failing([NatsTimeout()] * 100)
    with pytest.raises(NatsTimeout):
        await settled("streams", attempt, within_s=10, sleep=clock.sleep, clock=clock)  # type: ignore[arg-type]
    assert sum(clock.slept) <= 10 and clock.slept[-1] == 2.0  # never sleeps past the deadline
    assert len(calls) == len(clock.slept) + 1
