"""Choose backends from ``backends.enabled``; vendor modules are imported lazily."""

from __future__ import annotations

import structlog

from agent.backends.base import Backend, BackendAbsent
from agent.backends.mock import MockBackend
from agent.config import Config, mock_cards
from agent.errors import ConfigError

log = structlog.get_logger(__name__)

REAL = ("nvml", "npu-smi")


def _create_real(name: str, config: Config) -> Backend:
    """The vendor module is imported only when its backend is asked for (NVML's binding,
    npu-smi's parser): a node without the hardware never loads them."""
    match name:
        case "nvml":
            from agent.backends.nvml.backend import create as create_nvml  # noqa: PLC0415

            return create_nvml(config.backends.nvml)
        case "npu-smi":
            from agent.backends.ascend.backend import create as create_npu  # noqa: PLC0415

            return create_npu(config.backends.npu_smi)
        case _:
            raise ConfigError("backends.enabled", f"no backend {name!r}")


def create_backends(config: Config) -> list[Backend]:
    """``auto``: every real backend present, else the mock. Explicit names must work."""
    enabled = config.backends.enabled
    backends: list[Backend] = []
    explicit = [n for n in enabled if n != "auto"]
    for name in explicit:
        if name == "mock":
            cards = [(c.model, c.memory_mib) for c in mock_cards(config)]
            backends.append(MockBackend(cards, node=config.node_name))
            continue
        try:
            backends.append(_create_real(name, config))
        except BackendAbsent as exc:
            raise ConfigError("backends.enabled", f"{name} is not available here: {exc}") from None
    if "auto" in enabled:
        for real in REAL:
            if real in explicit:
                continue
            try:
                backends.append(_create_real(real, config))
            except BackendAbsent as exc:
                log.info("backend absent", backend=real, reason=str(exc))
            except ModuleNotFoundError as exc:
                log.info("backend not built in", backend=real, reason=str(exc))
        if not backends:
            log.info("no accelerator found; using mock cards")
            cards = [(c.model, c.memory_mib) for c in mock_cards(config)]
            backends.append(MockBackend(cards, node=config.node_name))
    return backends
