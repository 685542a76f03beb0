"""The local API on a real Unix socket of a real daemon."""

from __future__ import annotations

import http.client
import os
import socket
import stat

from agent.api.server import ROUTES
from tests.harness import AgentProcess


def test_health_node_devices(agent: AgentProcess) -> None:
    status, health, ctype = agent.api("GET", "/v1/health")
    assert status == 200 and ctype.startswith("application/json")
    assert health["status"] == "ok" and health["version"] and health["uptime_s"] >= 0
    status, node, _ = agent.api("GET", "/v1/node")
    assert status == 200
    assert node["node"] == "test-node"
    assert node["devices"] == 4 and node["devices_healthy"] == 4
    assert node["capacity"] == {"memory_mib": 4 * 81920, "compute_pct": 400, "slices": 40}
    assert node["allocated"]["slices"] == 0
    assert node["mqtt"]["state"] == "standalone"
    status, devices, _ = agent.api("GET", "/v1/devices")
    assert [d["id"] for d in devices] == ["mock-0", "mock-1", "mock-2", "mock-3"]
    assert all(d["model"] == "MockA100-80G" and d["memory_total_mib"] == 81920 for d in devices)
    status, one, _ = agent.api("GET", "/v1/devices/mock-2")
    assert status == 200 and one["index"] == 2 and one["health"] == "ok"


def test_unknown_device_is_a_404_problem(agent: AgentProcess) -> None:
    status, problem, ctype = agent.api("GET", "/v1/devices/nope")
    assert status == 404
    assert ctype == "application/problem+json"
    assert problem["status"] == 404 and "nope" in problem["detail"] and problem["title"]
    assert problem["type"].startswith("https://")


def test_unknown_route_and_method_are_problems(agent: AgentProcess) -> None:
    status, _, ctype = agent.api("GET", "/v1/nothing")
    assert status == 404 and ctype == "application/problem+json"
    status, _, ctype = agent.api("PUT", "/v1/node")
    assert status == 405 and ctype == "application/problem+json"
    conn = http.client.HTTPConnection("localhost")
    conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.sock.connect(str(agent.socket))
    conn.request("PUT", "/v1/slices")
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 405 and set(response.getheader("Allow", "").split(",")) >= {
        "GET",
        "POST",
    }


def test_malformed_bodies_get_400_never_500(agent: AgentProcess) -> None:
    for raw in [
        b"{",
        b"[]",
        b'{"memory_mib": "lots", "compute_pct": 10}',
        b'{"memory_mib": 10, "compute_pct": 10, "surprise": 1}',
        b'{"compute_pct": 10}',
        b"\xff\xfe",
    ]:
        status, problem, ctype = agent.api("POST", "/v1/slices", raw=raw)
        assert status == 400, (raw, problem)
        assert ctype == "application/problem+json"


def test_oversized_body_is_413(agent: AgentProcess) -> None:
    big = b'{"labels": {"x": "' + b"a" * (70 * 1024) + b'"}}'
    status, _, ctype = agent.api("POST", "/v1/slices", raw=big)
    assert status == 413 and ctype == "application/problem+json"


def test_openapi_describes_what_the_server_answers(agent: AgentProcess) -> None:
    status, doc, _ = agent.api("GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == {(r.method, r.path) for r in ROUTES}  # the router's own table
    # Every documented operation is served: probed on the live agent with an unknown id,
    # it answers one of the statuses the document lists for it (never 405, never an
    # undocumented one).
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path == "/v1/events":
                continue  # follow=1 streams; probed below with its parameters
            concrete = path.replace("{id}", "s-000000000000").replace("{pid}", "4242")
            body = {} if "requestBody" in op else None
            got, _, _ = agent.api(method.upper(), concrete, body)
            assert str(got) in op["responses"], (method, path, got, sorted(op["responses"]))
    events = doc["paths"]["/v1/events"]["get"]
    assert agent.api("GET", "/v1/events?after=0&limit=5")[0] == 200
    assert {p["name"] for p in events["parameters"]} == {"after", "limit", "follow"}
    alloc = doc["paths"]["/v1/slices"]["post"]
    assert {"200", "201", "400", "409", "500"} <= set(alloc["responses"])
    assert set(alloc["responses"]["201"]["links"]) == {"GetSlice", "ReleaseSlice", "BindProcess"}
    ref = alloc["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert {"memory_mib", "compute_pct"} <= set(body["required"])
    props = body["properties"]
    assert props["memory_mib"]["minimum"] == 1 and props["memory_mib"]["maximum"] == 2**30
    assert props["compute_pct"]["maximum"] == 100
    ttl = props["ttl_s"]["anyOf"][0]
    assert ttl["exclusiveMinimum"] == 0 and ttl["maximum"] <= 366 * 86400
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain; version=0.0.4; charset=utf-8"]
    unbind = doc["paths"]["/v1/slices/{id}/processes/{pid}"]["delete"]["parameters"]
    pid = next(p for p in unbind if p["name"] == "pid")
    assert pid["schema"] == {"type": "integer", "minimum": 1, "maximum": 2**22}


def test_socket_is_not_world_accessible(agent: AgentProcess) -> None:
    mode = stat.S_IMODE(os.stat(agent.socket).st_mode)
    assert mode & 0o007 == 0, oct(mode)
