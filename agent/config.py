"""Versioned, validated configuration (TOML, ``version = 1``).

Unknown keys, unknown versions and bad values are refused with the key's dotted name and
the reason, so that ``xpu-agent`` can print one line and exit 2.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from agent.errors import ConfigError
from agent.units import parse_duration_s, parse_size_mib

CONFIG_VERSION = 1
DEFAULT_CONFIG_PATH = Path("/etc/xpu-agent/agent.toml")
DEV_DIR = Path(".run")


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NodeConfig(_Section):
    name: str = ""
    zone: str = "default"
    #: Where peers reach this node to run a job on it (``run --pool``): a host name or an
    #: address for the launcher's ``{address}``. Empty: the host's fully qualified name.
    address: str = ""


class PathsConfig(_Section):
    state_dir: str = "/var/lib/xpu-agent"
    socket: str = "/run/xpu-agent/agent.sock"
    #: Written even when the state directory's disk is full (processes held stopped).
    runtime_dir: str = "/run/xpu-agent"


class ApiConfig(_Section):
    socket_group: str = "xpu"
    admin_group: str = ""
    max_body_bytes: int = 64 * 1024
    #: Open connections at most, in total and per peer uid (kept below RLIMIT_NOFILE).
    max_connections: int = 512
    max_connections_per_uid: int = 64
    #: A connection must send a complete request (headers) within this, then keep-alive.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    #: listen(2) backlog: a burst of clients waits here instead of being refused.
    backlog: int = 1024


class MockDeviceConfig(_Section):
    model: str = "Ascend910B3"
    memory_mib: int | str = 65536
    count: int = 1


class MockConfig(_Section):
    devices: list[MockDeviceConfig] = msgspec.field(
        default_factory=lambda: [MockDeviceConfig(count=8)]
    )


class NpuSmiConfig(_Section):
    path: str = "npu-smi"
    timeout_s: float = 10.0


class NvmlConfig(_Section):
    event_timeout_ms: int = 1000


class BackendsConfig(_Section):
    enabled: list[Literal["auto", "nvml", "npu-smi", "mock"]] = msgspec.field(
        default_factory=lambda: ["auto"]
    )
    rediscover_s: float = 30.0
    mock: MockConfig = msgspec.field(default_factory=MockConfig)
    npu_smi: NpuSmiConfig = msgspec.field(default_factory=NpuSmiConfig)
    nvml: NvmlConfig = msgspec.field(default_factory=NvmlConfig)


class SlicingConfig(_Section):
    compute_step_pct: int = 10
    max_slices_per_device: int = 10
    placement: Literal["fragmentation", "best-fit", "spread"] = "fragmentation"
    history_s: float = 86400.0


class HostConfig(_Section):
    """Host CPU and memory that slices may hold (``cpu_milli``, ``host_memory_mib``): the
    node's (detected unless set) less a reserve for the system and the agent, as kubelet's
    ``system-reserved``."""

    #: CPUs of the node; 0: os.cpu_count().
    cpus: float = 0.0
    #: Memory of the node (``512GiB``); empty: what the kernel reports.
    memory: str | int = ""
    reserved_cpus: float = 1.0
    reserved_memory: str | int = "2GiB"


#: MPS's own default pipe directory: slice environments name another one only.
DEFAULT_MPS_PIPES = "/tmp/nvidia-mps"  # noqa: S108 - NVIDIA's default, not ours

EnforcementRung = Literal["nvml-limits", "mps", "hami-core", "sampling"]


class NvidiaEnforcementConfig(_Section):
    #: The rungs a card may get (agent.core.ladder), strongest first; sampling is always on.
    rungs: list[EnforcementRung] = msgspec.field(
        default_factory=lambda: ["nvml-limits", "mps", "hami-core", "sampling"]
    )
    #: ``external``: the operator runs MPS (``nvidia-cuda-mps-control -d``); ``managed``:
    #: the agent runs one control daemon per card (agent.enforce.mps). The slice
    #: environment carries the limits either way.
    mps: Literal["off", "external", "managed"] = "off"
    #: Managed MPS: quit a card's daemon (and put its compute mode back) when its last
    #: slice is released, and start it again with the next one.
    mps_quit_when_idle: bool = False
    #: MPS's own default pipe directory (``CUDA_MPS_PIPE_DIRECTORY``).
    mps_pipe_directory: str = DEFAULT_MPS_PIPES
    #: HAMi-core's ``libvgpu.so``: ``xpuctl run`` then puts it in ``LD_PRELOAD`` itself, and
    #: allocations beyond the slice fail inside the process (empty: not used).
    hami_core: str = ""


class EnforcementConfig(_Section):
    interval_ms: int = 500
    memory_action: Literal["report", "term", "kill"] = "term"
    grace_s: float = 5.0
    compute_policy: Literal["work-conserving", "hard", "off"] = "work-conserving"
    unsliced: Literal["report", "kill"] = "report"
    #: A cgroup v2 directory delegated to the agent; empty: stop processes with signals only.
    cgroup_root: str = ""
    nvidia: NvidiaEnforcementConfig = msgspec.field(default_factory=NvidiaEnforcementConfig)


class MqttConfig(_Section):
    url: str = ""
    topic_root: str = "xpu/v1"
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    keepalive_s: int = 30
    heartbeat_s: float = 30.0
    debounce_ms: int = 200
    max_payload_bytes: int = 256 * 1024


class PoolConfig(_Section):
    peer_ttl_s: float = 90.0
    idle_after_s: float = 300.0
    lend: bool = True
    lease_ttl_s: str | float = 600.0
    #: No lease is granted (or renewed) for longer than this, whatever the borrower asks.
    max_lease_ttl_s: str | float = "1d"
    #: A borrower that went offline keeps its leases this long at most (back, it renews
    #: them at once); then they lapse and their jobs are ended.
    borrower_grace_s: str | float = 60.0
    #: How ``xpuctl run --pool`` reaches a lender: an argv template (``{address}``,
    #: ``{node}``); the remote command follows it.
    launcher: list[str] = msgspec.field(
        default_factory=lambda: ["ssh", "-o", "BatchMode=yes", "{address}"]
    )
    #: ``xpuctl`` as the launcher's remote side finds it.
    remote_xpuctl: str = "xpuctl"
    #: The lease token travels in the launcher's environment (ssh: ``SendEnv
    #: LC_XPU_SLICE_TOKEN``, which Debian's sshd accepts), never on a command line that
    #: ``ps`` shows. ``true`` puts it in the remote command instead, for a lender whose
    #: sshd accepts no ``LC_*`` variables (then every local user there can read it).
    token_in_command: bool = False


class MetricsConfig(_Section):
    listen: str = ""
    textfile: str = ""
    textfile_interval_s: float = 15.0


class Config(_Section):
    version: int
    node: NodeConfig = msgspec.field(default_factory=NodeConfig)
    paths: PathsConfig = msgspec.field(default_factory=PathsConfig)
    api: ApiConfig = msgspec.field(default_factory=ApiConfig)
    backends: BackendsConfig = msgspec.field(default_factory=BackendsConfig)
    slicing: SlicingConfig = msgspec.field(default_factory=SlicingConfig)
    host: HostConfig = msgspec.field(default_factory=HostConfig)
    enforcement: EnforcementConfig = msgspec.field(default_factory=EnforcementConfig)
    mqtt: MqttConfig = msgspec.field(default_factory=MqttConfig)
    pool: PoolConfig = msgspec.field(default_factory=PoolConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)

    @property
    def node_name(self) -> str:
        return self.node.name or socket.gethostname()

    @property
    def node_address(self) -> str:
        return self.node.address or socket.getfqdn()

    @property
    def ledger_path(self) -> Path:
        return Path(self.paths.state_dir) / "ledger.sqlite"


@dataclasses.dataclass(frozen=True, slots=True)
class MockCard:
    """A mock card after validation (sizes parsed)."""

    model: str
    memory_mib: int


_AT_PATH = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_UNKNOWN_FIELD = re.compile(r"Object contains unknown field `(?P<field>[^`]+)`")


def _dotted(path: str) -> str:
    return re.sub(r"\[(\d+)\]", r"[\1]", path).lstrip(".")


def _translate(error: msgspec.ValidationError) -> ConfigError:
    match = _AT_PATH.match(str(error))
    message = match.group("msg") if match else str(error)
    path = _dotted(match.group("path") or "") if match else ""
    unknown = _UNKNOWN_FIELD.match(message)
    if unknown:
        key = f"{path}.{unknown.group('field')}" if path else unknown.group("field")
        return ConfigError(key, "unknown key")
    missing = re.match(r"Object missing required field `(?P<field>[^`]+)`", message)
    if missing:
        key = f"{path}.{missing.group('field')}" if path else missing.group("field")
        return ConfigError(key, "required key is missing")
    return ConfigError(path or "config", message.replace("`", "'"))


def _check(config: Config) -> None:
    """Semantic checks msgspec's types cannot express."""
    step = config.slicing.compute_step_pct
    if not 1 <= step <= 100 or 100 % step:
        raise ConfigError("slicing.compute_step_pct", f"{step} must be 1..100 and divide 100")
    if not 1 <= config.slicing.max_slices_per_device <= 1000:
        raise ConfigError("slicing.max_slices_per_device", "must be 1..1000")
    if not 10 <= config.enforcement.interval_ms <= 60_000:
        raise ConfigError("enforcement.interval_ms", "must be 10..60000")
    if config.enforcement.grace_s < 0:
        raise ConfigError("enforcement.grace_s", "must not be negative")
    if config.enforcement.cgroup_root and not config.enforcement.cgroup_root.startswith("/"):
        raise ConfigError("enforcement.cgroup_root", "must be an absolute path or empty")
    if not config.enforcement.nvidia.mps_pipe_directory.startswith("/"):
        raise ConfigError("enforcement.nvidia.mps_pipe_directory", "must be an absolute path")
    hami = config.enforcement.nvidia.hami_core
    if hami and (not hami.startswith("/") or ":" in hami or " " in hami):
        raise ConfigError(
            "enforcement.nvidia.hami_core", "must be an absolute path to libvgpu.so, or empty"
        )
    for key in ("cpus", "reserved_cpus"):
        if getattr(config.host, key) < 0:
            raise ConfigError(f"host.{key}", "must not be negative")
    for key in ("memory", "reserved_memory"):
        value = getattr(config.host, key)
        if value not in ("", 0, "0"):
            try:
                parse_size_mib(value)
            except ValueError as exc:
                raise ConfigError(f"host.{key}", str(exc)) from None
    if config.backends.npu_smi.timeout_s <= 0:
        raise ConfigError("backends.npu_smi.timeout_s", "must be positive")
    if not config.backends.enabled:
        raise ConfigError("backends.enabled", "must name at least one backend")
    for i, card in enumerate(config.backends.mock.devices):
        key = f"backends.mock.devices[{i}]"
        if card.count < 0:
            raise ConfigError(f"{key}.count", "must not be negative")
        try:
            parse_size_mib(card.memory_mib)
        except ValueError as exc:
            raise ConfigError(f"{key}.memory_mib", str(exc)) from None
    if config.mqtt.url and not re.match(r"^mqtts?://[^/:]+(:\d+)?/?$", config.mqtt.url):
        raise ConfigError("mqtt.url", f"{config.mqtt.url!r} is not mqtt://host[:port] or mqtts://")
    if config.mqtt.keepalive_s < 1:
        raise ConfigError("mqtt.keepalive_s", "must be at least 1")
    if not re.fullmatch(r"[^/+#\s]+(/[^/+#\s]+)*", config.mqtt.topic_root):
        raise ConfigError("mqtt.topic_root", "topic levels without '+', '#' or empty levels")
    if config.mqtt.heartbeat_s <= 0 or not 0 <= config.mqtt.debounce_ms <= 60_000:
        raise ConfigError("mqtt", "heartbeat_s must be positive and debounce_ms 0..60000")
    if config.mqtt.max_payload_bytes < 4096:
        raise ConfigError("mqtt.max_payload_bytes", "must be at least 4096")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", config.node.zone):
        raise ConfigError("node.zone", "letters, digits, '.', '_' and '-' only")
    if config.node.name and not re.fullmatch(r"[A-Za-z0-9_.-]+", config.node.name):
        raise ConfigError("node.name", "letters, digits, '.', '_' and '-' only")
    if config.pool.peer_ttl_s <= 0:
        raise ConfigError("pool.peer_ttl_s", "must be positive")
    ttls = {}
    for key in ("lease_ttl_s", "max_lease_ttl_s", "borrower_grace_s"):
        try:
            ttls[key] = parse_duration_s(getattr(config.pool, key))
        except ValueError as exc:
            raise ConfigError(f"pool.{key}", str(exc)) from None
    if not config.pool.launcher or not all(config.pool.launcher):
        raise ConfigError("pool.launcher", "must be a non-empty argv of non-empty words")
    for word in config.pool.launcher:
        try:
            word.format(address="", node="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ConfigError(
                "pool.launcher", f"{word!r}: only {{address}} and {{node}} ({exc})"
            ) from None
    if not config.pool.remote_xpuctl:
        raise ConfigError("pool.remote_xpuctl", "must not be empty")
    if config.node.address and not re.fullmatch(r"[A-Za-z0-9_.:@\[\]-]+", config.node.address):
        raise ConfigError("node.address", "a host name or address ([user@]host)")
    if ttls["lease_ttl_s"] > ttls["max_lease_ttl_s"]:
        raise ConfigError("pool.lease_ttl_s", "must not exceed pool.max_lease_ttl_s")
    _check_api(config.api)
    _check_metrics(config.metrics)


def _check_api(api: ApiConfig) -> None:
    for key in ("max_body_bytes", "max_connections", "max_connections_per_uid", "backlog"):
        if getattr(api, key) < 1:
            raise ConfigError(f"api.{key}", "must be at least 1")
    for key in ("header_timeout_s", "body_timeout_s"):
        if not 0 < getattr(api, key) <= 3600:
            raise ConfigError(f"api.{key}", "must be more than 0 and at most 3600")


def parse_listen(text: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` of the metrics listener; only loopback hosts, because
    the listener has no authentication (the socket's file mode is the API's only guard)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r} is not host:port (e.g. 127.0.0.1:9464 or [::1]:9464)")
    host = host.removeprefix("[").removesuffix("]")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address or 'localhost'") from None
        if not loopback:
            raise ValueError(
                f"{host} is not a loopback address; the listener has no authentication, "
                "so it binds to 127.0.0.1, ::1 or localhost only"
            )
    return host, int(port_text)


def _check_metrics(metrics: MetricsConfig) -> None:
    if metrics.listen:
        try:
            parse_listen(metrics.listen)
        except ValueError as exc:
            raise ConfigError("metrics.listen", str(exc)) from None
    if metrics.textfile and (
        not metrics.textfile.startswith("/") or not metrics.textfile.endswith(".prom")
    ):
        raise ConfigError(
            "metrics.textfile",
            "must be an absolute path ending in .prom (node_exporter reads *.prom)",
        )
    if not 0.1 <= metrics.textfile_interval_s <= 3600:
        raise ConfigError("metrics.textfile_interval_s", "must be 0.1..3600")


def from_mapping(data: dict[str, Any]) -> Config:
    """Validate a parsed TOML document."""
    version = data.get("version")
    if version is None:
        raise ConfigError("version", f"required; this agent reads version = {CONFIG_VERSION}")
    if version != CONFIG_VERSION:
        raise ConfigError("version", f"unknown version {version!r}; supported: {CONFIG_VERSION}")
    try:
        config = msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise _translate(exc) from None
    _check(config)
    return config


def load(path: Path | None) -> Config:
    """Read ``path``; a missing default file means all defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return from_mapping({"version": CONFIG_VERSION})
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{path}: not valid TOML: {exc}") from None
    return from_mapping(data)


def with_dev_paths(config: Config, base: Path = DEV_DIR) -> Config:
    """``--dev``: socket, state and logs under ``./.run/`` so no root is needed."""
    base = base.resolve()
    paths = PathsConfig(
        state_dir=str(base / "state"),
        socket=str(base / "agent.sock"),
        runtime_dir=str(base / "run"),
    )
    return msgspec.structs.replace(config, paths=paths)


def mock_cards(config: Config) -> list[MockCard]:
    cards: list[MockCard] = []
    for entry in config.backends.mock.devices:
        cards.extend(
            MockCard(entry.model, parse_size_mib(entry.memory_mib)) for _ in range(entry.count)
        )
    return cards
