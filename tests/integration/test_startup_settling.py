"""A service started before its JetStream cluster has formed waits for it instead of dying; one that asks
for what JetStream will never give fails at once; several started at once on a fresh cluster all start."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from services.entrypoints.stack import Stack, Urls
from shared.lifecycle import TASK_STOP_S
from shared.settings import Settings
from shared.store.streams import StreamSetupError
from tests.fault.cluster import NatsCluster

FIXTURES = Path(__file__).parent.parent / "fixtures"
pytestmark = pytest.mark.timeout(180)


def stack_on(url: str, data_dir: Path, **settings: Any) -> Stack:
    s = Settings(data_dir=data_dir, org=FIXTURES / "contract_org.yaml", rules=FIXTURES / "contract_rules.yaml",
                 **settings)
    return Stack.from_settings(s, Urls(nats=url, database=None))


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    c = NatsCluster(tmp_path / "cluster", size=3)
    yield c
    c.stop()


@pytest.mark.slow  # restart/fault or bench smoke: `pytest -m slow`
async def test_a_service_started_before_its_cluster_formed_waits_for_it(cluster: NatsCluster, tmp_path: Path,
                                                                         caplog: Any) -> None:
    await asyncio.to_thread(cluster.start_node, 0)  # one node of three: no JetStream quorum, no meta leader
    stack = stack_on(cluster.node_url(0), tmp_path / "d", stream_replicas=3)
    starting = asyncio.create_task(stack.connect())
    await asyncio.sleep(4)
    assert not starting.done(), starting  # waiting, not dead
    await asyncio.to_thread(cluster.start_node, 1)
    await asyncio.to_thread(cluster.start_node, 2)
    try:
        await asyncio.wait_for(starting, 90)
        assert stack.store is not None
        js = stack.nc.jetstream()  # type: ignore[union-attr]
        info = await js.stream_info("NEEDLE_EVENTS")
        assert info.config.num_replicas == 3
    finally:
        await stack.close()


async def test_a_refusal_no_wait_will_change_fails_at_once(nats_factory: Any, tmp_path: Path) -> None:
    single = nats_factory()  # not a cluster: three replicas can never be placed
    stack = stack_on(single.url, tmp_path / "d", stream_replicas=3, start_timeout_s=60)
    t0 = time.monotonic()
    try:
        with pytest.raises(StreamSetupError, match=r"10074|replicas"):
            await stack.connect()
        assert time.monotonic() - t0 < 10
    finally:
        await stack.close()


async def test_services_started_together_on_a_fresh_cluster_all_start_and_stop(cluster: NatsCluster,
                                                                                 tmp_path: Path) -> None:
    await asyncio.to_thread(cluster.start)
    stacks = [stack_on(cluster.node_url(i), tmp_path / f"d{i}", stream_replicas=3) for i in range(3)]
    try:
        results = await asyncio.gather(*(s.connect() for s in stacks), return_exceptions=True)
        assert [r for r in results if isinstance(r, BaseException)] == []
    finally:
        for s in stacks:
            t0 = time.monotonic()
            await s.close()
            assert time.monotonic() - t0 < TASK_STOP_S + 6  # close is bounded even when a task ignores cancel
