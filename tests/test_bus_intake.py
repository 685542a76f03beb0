"""The bus's intake: one entry per retained state topic, the inbox first, read in batches,
and a signal when everything received has been handled (what the refetch waits for)."""

from __future__ import annotations

import asyncio

import aiomqtt

from agent.bus.intake import IntakeStats, intake_type


def message(topic: str, payload: bytes = b"x") -> aiomqtt.Message:
    return aiomqtt.Message(topic, payload, qos=0, retain=True, mid=0, properties=None)


STATE = "xpu/v1/z/nodes/{}/capacity"
INBOX = "xpu/v1/z/nodes/me/rpc/reply"


def test_newer_state_replaces_waiting_state_and_the_inbox_goes_first() -> None:
    async def main() -> None:
        stats = IntakeStats()
        queue = intake_type(stats)()
        assert stats.current is queue and stats.drained.is_set()
        queue.put_nowait(message(STATE.format("a"), b"old"))
        queue.put_nowait(message(STATE.format("b")))
        queue.put_nowait(message(INBOX, b"r1"))
        queue.put_nowait(message(STATE.format("a"), b"new"))  # replaces a's, keeps its place
        queue.put_nowait(message(INBOX, b"r2"))
        assert not stats.drained.is_set() and stats.last_put_at > 0
        assert queue.qsize() == 4 and stats.coalesced == 1
        batch = queue.take(3)
        assert [(str(m.topic), m.payload) for m in batch] == [
            (INBOX, b"r1"),
            (INBOX, b"r2"),
            (STATE.format("a"), b"new"),
        ]
        assert not stats.drained.is_set()
        assert [str(m.topic) for m in queue.take(10)] == [STATE.format("b")]
        assert queue.take(10) == [] and stats.drained.is_set()

    asyncio.run(main())


def test_a_new_sessions_queue_starts_drained() -> None:
    async def main() -> None:
        stats = IntakeStats()
        old = intake_type(stats)()
        old.put_nowait(message(STATE.format("a")))
        assert not stats.drained.is_set()
        new = intake_type(stats)()  # aiomqtt makes one per connection; the old one is gone
        assert stats.current is new and stats.drained.is_set()
        waiter = asyncio.create_task(stats.drained.wait())
        await asyncio.sleep(0)
        assert waiter.done()

    asyncio.run(main())


def test_the_receivers_get_wakes_on_put_after_a_batch() -> None:
    async def main() -> None:
        queue = intake_type(IntakeStats())()
        getter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.put_nowait(message(STATE.format("a")))
        got = await asyncio.wait_for(getter, 1)
        assert str(got.topic) == STATE.format("a") and queue.empty()

    asyncio.run(main())
