"""When /healthz calls a consumer too far behind (services/intake/observability.py): no server."""
from __future__ import annotations

from typing import Any

import pytest

from services.intake.observability import LagMonitor
from shared.settings import Settings
from shared.store.lag import Lag, _ts


def monitor(lags: dict[str, Lag], **limits: Any) -> LagMonitor:
    m = LagMonitor(nc=None, progress=None, settings=Settings(**limits))  # type: ignore[arg-type]
    m.lags = lags
    return m


def test_behind_by_messages_or_by_seconds() -> None:
    m = monitor({"router": Lag(11, 0.5), "projections": Lag(3, 31.0), "router-timers": Lag(10, 30.0)},
                health_max_lag=10, health_max_lag_s=30)
    assert m.behind() == ["projections", "router"]


def test_a_missing_consumer_is_not_behind() -> None:
    assert monitor({"router": Lag(0, 0.0, present=False)}, health_max_lag=0).behind() == []


def test_jetstream_nanosecond_timestamps() -> None:
    assert _ts("2026-11-23T14:28:50.998461271Z") == pytest.approx(1795444130.998461, abs=1e-6)
    assert _ts("2026-11-23T14:28:50Z") == 1795444130.0
