"""What TCP_NODELAY buys on the bus: a lender's reply and a borrower's round trip.

A request arrives (QoS 1: the client writes a PUBACK), the lender publishes its reply at
once (a second small write). With Nagle's algorithm on, that second write waits for the
broker to ACK the first, and the broker delays its ACK (~40 ms on Linux). The same happens
in the broker when it forwards right after acknowledging. Measured through the agent's own
:class:`agent.bus.connection.Connection`, with its ``TCP_NODELAY`` option on and off, and
Mosquitto's ``set_tcp_nodelay`` on and off.

Run: ``python -m benchmarks.mqtt_latency [--rounds 30] [--json]`` (needs mosquitto).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import time
from typing import Any

import aiomqtt

from agent import logs
from agent.bus import connection as connection_mod
from agent.bus.connection import Connection, Outgoing
from agent.config import MqttConfig
from tests.broker import Mosquitto


def _connection(url: str, name: str, subscriptions: list[str], on_message: Any) -> Connection:
    return Connection(
        MqttConfig(url=url, keepalive_s=30),
        client_id=name,
        subscriptions=subscriptions,
        on_message=on_message,
        on_connect=lambda: None,
        will=lambda: Outgoing(f"bench/{name}/status", b"offline", retain=True),
        goodbye=lambda: Outgoing(f"bench/{name}/status", b"offline", retain=True),
    )


async def _round_trips(url: str, rounds: int) -> dict[str, float]:
    answered: list[float] = []
    reply_publish: list[float] = []
    server: Connection

    def on_request(message: aiomqtt.Message) -> None:
        server.publish(Outgoing("bench/rep", bytes(message.payload), qos=1))  # type: ignore[arg-type]

    server = _connection(url, "lender", ["bench/req"], on_request)
    client = _connection(
        url, "borrower", ["bench/rep"], lambda _m: answered.append(time.perf_counter())
    )
    tasks = [asyncio.create_task(c.run()) for c in (server, client)]
    try:
        while not (server.connected and client.connected):
            await asyncio.sleep(0.01)
        rtts = []
        for i in range(rounds):
            start = time.perf_counter()
            client.publish(Outgoing("bench/req", b"x" * 300, qos=1))
            while len(answered) <= i:
                await asyncio.sleep(0)
            rtts.append(answered[-1] - start)
        # A lone QoS 1 publish that follows a PUBACK, awaited like the sender does.
        async with (
            aiomqtt.Client(
                "127.0.0.1",
                int(url.rsplit(":", 1)[1]),
                identifier="replier",
                protocol=aiomqtt.ProtocolVersion.V5,
                socket_options=[connection_mod.NODELAY],
            ) as replier,
            aiomqtt.Client("127.0.0.1", int(url.rsplit(":", 1)[1]), identifier="asker") as asker,
        ):
            await replier.subscribe("bench/ask", qos=1)
            for _ in range(rounds):
                await asker.publish("bench/ask", b"?", qos=1)
                async for _message in replier.messages:
                    break
                start = time.perf_counter()
                await replier.publish("bench/answer", b"!", qos=1)
                reply_publish.append(time.perf_counter() - start)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "round_trip_ms": round(statistics.median(rtts) * 1000, 2),
        "reply_publish_ms": round(statistics.median(reply_publish) * 1000, 2),
    }


def measure(rounds: int) -> list[dict[str, Any]]:
    results = []
    for broker_nodelay in (False, True):
        broker = Mosquitto(tcp_nodelay=broker_nodelay).start()
        try:
            for agent_nodelay in (False, True):
                connection_mod.NODELAY = (
                    socket.IPPROTO_TCP,
                    socket.TCP_NODELAY,
                    1 if agent_nodelay else 0,
                )
                numbers = asyncio.run(_round_trips(broker.url, rounds))
                results.append(
                    {"agent_nodelay": agent_nodelay, "broker_nodelay": broker_nodelay, **numbers}
                )
        finally:
            broker.cleanup()
    connection_mod.NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    logs.configure("warning")
    results = measure(args.rounds)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print("agent TCP_NODELAY  broker set_tcp_nodelay  reply publish  round trip")
    for r in results:
        agent = "on" if r["agent_nodelay"] else "off"
        broker = "on" if r["broker_nodelay"] else "off"
        reply, rtt = r["reply_publish_ms"], r["round_trip_ms"]
        print(f"{agent:>17}  {broker:>22}  {reply:>10.2f} ms  {rtt:>7.2f} ms")


if __name__ == "__main__":
    main()
