"""NEEDLE_NATS_URL names one server or every node of a cluster, comma-separated."""
from __future__ import annotations

import pytest

from services.entrypoints.nats_users import nats_servers


def test_a_cluster_url_lists_every_node_in_order() -> None:
    url = "nats://needle:pw@n1:4222, nats://needle:pw@n2:4222,nats://needle:pw@n3:4222"
    assert nats_servers(url) == ["nats://needle:pw@n1:4222", "nats://needle:pw@n2:4222", "nats://needle:pw@n3:4222"]


def test_a_single_url_is_one_server() -> None:
    assert nats_servers("nats://127.0.0.1:4222") == ["nats://127.0.0.1:4222"]


def test_an_empty_url_is_refused() -> None:
    with pytest.raises(ValueError):
        nats_servers(" , ")
