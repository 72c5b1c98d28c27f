"""shared/entropy.py: bulk kernel randomness for ids, sliced without repeats."""
from __future__ import annotations

import os

import pytest

from shared.entropy import EntropyPool


def test_bits_stay_below_the_bound_and_cover_it() -> None:
    pool = EntropyPool(size=64)
    values = [pool.randbits(3) for _ in range(2000)]
    assert set(values) == set(range(8))
    assert all(0 <= pool.randbits(80) < 2**80 for _ in range(500))


def test_slices_never_repeat_across_refills(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.urandom

    def counting(n: int) -> bytes:
        calls.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counting)
    pool = EntropyPool(size=100)
    taken = [pool.take(10) for _ in range(25)]  # 250 bytes: three fetches of 100
    assert calls == [100, 100, 100]
    assert len(set(taken)) == 25
    assert pool.take(300) and calls[-1] == 300  # more than a pool's worth at once: fetched whole


def test_a_forgotten_pool_fetches_afresh() -> None:
    pool = EntropyPool(size=100)
    first = pool.take(10)
    pool.forget()
    assert pool.take(10) != first


def test_zero_bits_is_refused() -> None:
    with pytest.raises(ValueError):
        EntropyPool().randbits(0)
