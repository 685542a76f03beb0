from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.broker import MOSQUITTO, Mosquitto
from tests.harness import AgentProcess


@pytest.fixture(scope="module")
def broker() -> Iterator[Mosquitto]:
    """A real Mosquitto for the module's tests (modules with their own needs define their
    own ``broker``, which takes precedence)."""
    if MOSQUITTO is None:
        pytest.skip("mosquitto is not installed (make deps installs it)")
    mosquitto = Mosquitto().start()
    yield mosquitto
    mosquitto.cleanup()


@pytest.fixture
def agent_factory() -> Iterator[Callable[..., AgentProcess]]:
    """Start real daemons; every one is stopped and cleaned up after the test."""
    started: list[AgentProcess] = []

    def make(**kwargs: object) -> AgentProcess:
        start = bool(kwargs.pop("start", True))
        agent = AgentProcess(**kwargs)  # type: ignore[arg-type]
        started.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in started:
        agent.cleanup()


@pytest.fixture
def agent(agent_factory: Callable[..., AgentProcess]) -> AgentProcess:
    return agent_factory()


def is_root() -> bool:
    return os.geteuid() == 0
