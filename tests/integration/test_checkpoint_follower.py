"""The read API of a process that does not run the projection worker (``needle up``'s intake) learns that
the checkpoint moved from the worker's commit (LISTEN/NOTIFY), not from its slow fallback poll."""
from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from services.projections import follower
from tests.support import NeedleHandle


async def test_needle_min_seq_wait_ends_on_the_commits_notification(needle_factory: Callable[..., Any],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(follower, "POLL_S", 3600.0)  # one poll at start, then only a notification can advance it
    db = f"needle_follow_{os.getpid()}"
    worker: NeedleHandle = await needle_factory(services=("projections",), database=db)
    api: NeedleHandle = await needle_factory(nats_url=worker.stack.urls.nats, services=("intake",), database=db,
                                       read_api=True)
    watching = api.stack.read_models.progress
    assert isinstance(watching, follower.CheckpointFollower)
    gw = api.auth("grid_worker", "area:wuxing-g1")
    for n in range(3):  # each report is visible to a read that waits for its sequence (503 after 5 s otherwise)
        r = await api.client.post("/v1/issues", headers=gw,
                                  json={"grid": "wuxing-g1", "category": "road_damage", "title": f"pothole {n}"})
        assert r.status_code == 201, r.text
        seq = int(r.headers["Needle-Seq"])
        got = await api.client.get("/v1/issues", params={"area": "wuxing-g1"},
                                   headers=gw | {"Needle-Min-Seq": str(seq)})
        assert got.status_code == 200, got.text
        assert r.json()["id"] in {i["id"] for i in got.json()["items"]}
        assert int(got.headers["Needle-Seq"]) >= seq and watching.seq >= seq
