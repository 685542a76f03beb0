"""The bus secured for real: TLS with client certificates made by openssl, and the shipped
per-node ACL on Mosquitto — a node cannot write under another node's topics, nor read
another node's inbox."""

from __future__ import annotations

import json
import shutil
import ssl
import time
from collections.abc import Callable

import aiomqtt
import pytest

from tests.broker import (
    MOSQUITTO,
    MOSQUITTO_PASSWD,
    OPENSSL,
    Mosquitto,
    Subscriber,
    make_certs,
    mqtt_config,
    publish_raw,
    read_retained,
    topic_root,
)
from tests.harness import AgentProcess, json_out, short_tmpdir, wait_for

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto is not installed")

NOT_AUTHORISED = 0x87


def pool_of(agent: AgentProcess) -> dict[str, dict[str, object]]:
    return {p["node"]: p for p in agent.api("GET", "/v1/pool")[1]}


def placeable(agent: AgentProcess) -> set[str]:
    return {n for n, p in pool_of(agent).items() if p["placeable"]}


@pytest.mark.skipif(OPENSSL is None, reason="openssl is not installed")
async def test_tls_with_client_certificates_as_node_identities(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    folder, certs = make_certs(["a", "b"])
    root = topic_root()
    broker = Mosquitto(tls=certs["server"], require_certificate=True, acl_root=root).start()
    try:
        agents = {}
        for name in ("a", "b"):
            files = certs[name]
            tls = f'ca_file = "{files.ca}"\ncert_file = "{files.cert}"\nkey_file = "{files.key}"'
            agents[name] = agent_factory(
                node=name, config=mqtt_config(broker, root, name, extra_mqtt=tls)
            )
        a, b = agents["a"], agents["b"]
        wait_for(lambda: placeable(a) == {"b"} and placeable(b) == {"a"}, 10)
        link = a.api("GET", "/v1/node")[1]["mqtt"]
        assert link["connected"] and link["url"].startswith("mqtts://localhost:")
        # Lending works through TLS and the ACL (inboxes writable, own inbox readable).
        lease = json_out(a.xpuctl("--json", "borrow", "--memory", "1GiB", "--compute", "10"))
        assert lease["lender"] == "b"

        # Without a client certificate the broker refuses the handshake.
        context = ssl.create_default_context(cafile=str(certs["server"].ca))
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client(
                "localhost", broker.port, tls_context=context, identifier="nocert", timeout=1
            ):
                pass
        # A broker certificate that the configured CA did not sign is refused by the agent.
        _, other = make_certs([])
        c = agent_factory(
            node="c",
            config=mqtt_config(broker, root, "c", extra_mqtt=f'ca_file = "{other["server"].ca}"'),
        )
        wait_for(lambda: "certificate verify failed" in c.log(), 10)
        assert c.api("GET", "/v1/node")[1]["mqtt"]["connected"] is False
        assert "c" not in pool_of(a)
    finally:
        broker.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(MOSQUITTO_PASSWD is None, reason="mosquitto_passwd is not installed")
def test_acl_keeps_each_node_to_its_own_topics(
    agent_factory: Callable[..., AgentProcess],
) -> None:
    root = topic_root()
    passwords = {name: f"secret-{name}" for name in ("a", "b", "c")}
    broker = Mosquitto(passwords=passwords, acl_root=root).start()
    secrets_dir = short_tmpdir("pw")
    try:
        agents = {}
        for name, password in passwords.items():
            path = secrets_dir / name
            path.write_text(password + "\n")
            path.chmod(0o600)
            creds = f'username = "{name}"\npassword_file = "{path}"'
            agents[name] = agent_factory(
                node=name, config=mqtt_config(broker, root, name, extra_mqtt=creds)
            )
        a, b, c = agents["a"], agents["b"], agents["c"]
        wait_for(lambda: all(len(placeable(x)) == 2 for x in agents.values()), 10)
        before = {viewer: pool_of(agents[viewer])["b"]["devices"] for viewer in ("a", "c")}

        def retained(kind: str) -> dict[str, object]:
            raw = read_retained(broker, f"{root}/z/nodes/b/{kind}", 5, "c", passwords["c"])
            assert raw is not None
            body: dict[str, object] = json.loads(raw)
            return body

        genuine = retained("capacity")
        seq = int(genuine["seq"])  # type: ignore[call-overload]
        forged = {**genuine, "seq": seq + 1000, "devices": []}
        offline = {**retained("status"), "state": "offline", "seq": seq + 1001}
        # Logged in as a (the real password of a), writing b's state: refused by the broker.
        for topic, body in (("capacity", forged), ("status", offline)):
            code = publish_raw(
                broker,
                f"{root}/z/nodes/b/{topic}",
                json.dumps(body).encode(),
                username="a",
                password=passwords["a"],
                client_id="a-rogue",
            )
            assert code == NOT_AUTHORISED, code
        time.sleep(1.0)
        for viewer in ("a", "c"):
            row = pool_of(agents[viewer])["b"]
            assert row["placeable"] and row["state"] == "online"
            assert row["devices"] == before[viewer]
            assert agents[viewer].api("GET", "/v1/node")[1]["mqtt"]["dropped"]["spoofed"] == 0

        # A node cannot read another node's inbox: replies there carry lease tokens.
        with Subscriber(broker, f"{root}/z/nodes/b/rpc/+", "a", passwords["a"]) as spy:
            lease = json_out(b.xpuctl("--json", "borrow", "--memory", "1GiB", "--compute", "10"))
            assert lease["lender"] in {"a", "c"}
            time.sleep(0.5)
            assert spy.messages == []

        # Control: the same forgery with b's own credentials is taken, so the check above
        # would have seen a change had the broker let it through.
        code = publish_raw(
            broker,
            f"{root}/z/nodes/b/capacity",
            json.dumps(forged).encode(),
            username="b",
            password=passwords["b"],
            client_id="b-rogue",
        )
        assert code in (0, 16)
        wait_for(lambda: pool_of(c)["b"]["devices"] == [], 5)
        assert a.api("GET", "/v1/health")[0] == 200
    finally:
        broker.cleanup()
        shutil.rmtree(secrets_dir, ignore_errors=True)
