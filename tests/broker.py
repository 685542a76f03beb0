"""A real Mosquitto per test (or per module): own port, own config, own files.

Never the system broker: every instance listens on a free loopback port with a config
written here, and each test uses its own topic root on top.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness import REPO, short_tmpdir

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.access("/usr/sbin/mosquitto", os.X_OK) else None
)
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")
OPENSSL = shutil.which("openssl")
#: The ACL we ship; tests substitute their own topic root for ``xpu/v1``.
SHIPPED_ACL = REPO / "packaging" / "mosquitto" / "xpu-agent.acl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def topic_root() -> str:
    """A topic root of its own for one test."""
    return f"t{uuid.uuid4().hex[:10]}/v1"


@dataclass(frozen=True)
class Tls:
    ca: Path
    cert: Path
    key: Path


class Mosquitto:
    def __init__(
        self,
        *,
        tls: Tls | None = None,
        passwords: dict[str, str] | None = None,
        acl_root: str | None = None,
        require_certificate: bool = False,
        tcp_nodelay: bool = True,
        extra: Sequence[str] = (),
    ) -> None:
        assert MOSQUITTO is not None, "mosquitto is not installed"
        self.dir = short_tmpdir("mq")
        self.port = free_port()
        self.tls = tls
        self.log_path = self.dir / "mosquitto.log"
        lines = [
            "per_listener_settings false",
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"listener {self.port} 127.0.0.1",
            "persistence false",
            f"set_tcp_nodelay {'true' if tcp_nodelay else 'false'}",
            f"log_dest file {self.log_path}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if tls is not None:
            lines += [f"cafile {tls.ca}", f"certfile {tls.cert}", f"keyfile {tls.key}"]
            if require_certificate:
                lines += ["require_certificate true", "use_identity_as_username true"]
        if passwords is not None:
            assert MOSQUITTO_PASSWD is not None, "mosquitto_passwd is not installed"
            password_file = self.dir / "passwords"
            for i, (user, password) in enumerate(passwords.items()):
                flags = ["-b", "-c"] if i == 0 else ["-b"]
                subprocess.run(
                    [MOSQUITTO_PASSWD, *flags, str(password_file), user, password],
                    check=True,
                    capture_output=True,
                )
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        elif tls is None or not require_certificate:
            lines.append("allow_anonymous true")
        else:
            lines.append("allow_anonymous false")
        if acl_root is not None:
            acl = self.dir / "acl"
            acl.write_text(SHIPPED_ACL.read_text().replace("xpu/v1/", f"{acl_root}/"))
            lines.append(f"acl_file {acl}")
        # Extra lines last: a bridge's ``connection`` section must follow the listener's.
        lines += list(extra)
        self.config = self.dir / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts://localhost' if self.tls else 'mqtt://127.0.0.1'}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> Mosquitto:
        assert MOSQUITTO is not None
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: {err}\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"mosquitto did not listen on {self.port}:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def mqtt_config(
    broker: Mosquitto,
    root: str,
    node: str,
    *,
    keepalive_s: int = 2,
    extra_mqtt: str = "",
    pool: str = "",
    zone: str = "z",
    node_extra: str = "",
) -> str:
    """The config snippet of agent ``node`` on ``broker`` (AgentProcess ``config=``)."""
    return (
        f'[node]\nname = "{node}"\nzone = "{zone}"\n{node_extra}\n'
        "[mqtt]\n"
        f'url = "{broker.url}"\n'
        f'topic_root = "{root}"\n'
        f"keepalive_s = {keepalive_s}\n"
        "heartbeat_s = 5\n"
        "debounce_ms = 50\n"
        f"{extra_mqtt}\n"
        "[pool]\n"
        "peer_ttl_s = 10\n"
        f"{pool}\n"
    )


def make_certs(names: list[str]) -> tuple[Path, dict[str, Tls]]:
    """A CA, a server certificate for localhost/127.0.0.1, and a client certificate per
    name (CN = the name, which the broker can take as the username)."""
    assert OPENSSL is not None, "openssl is not installed"
    folder = short_tmpdir("pki")

    def run(*args: str) -> None:
        subprocess.run([OPENSSL, *args], cwd=folder, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=xpu-test-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    issued: dict[str, Tls] = {}
    for name, san in [("server", "DNS:localhost,IP:127.0.0.1"), *[(n, "") for n in names]]:
        cn = "localhost" if name == "server" else name
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}")
        ext = folder / f"{name}.ext"
        usage = "serverAuth" if name == "server" else "clientAuth"
        ext.write_text(
            "basicConstraints=CA:FALSE\n"
            f"extendedKeyUsage={usage}\n" + (f"subjectAltName={san}\n" if san else "")
        )
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", str(ext),
        )  # fmt: skip
        issued[name] = Tls(folder / "ca.crt", folder / f"{name}.crt", folder / f"{name}.key")
    return folder, issued


def _paho_client(
    broker: Mosquitto, client_id: str, username: str | None, password: str | None
) -> Any:
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    if username is not None:
        client.username_pw_set(username, password)
    if broker.tls is not None:
        client.tls_set(ca_certs=str(broker.tls.ca))
    client.connect("localhost" if broker.tls else "127.0.0.1", broker.port, keepalive=30)
    return client


def publish_raw(
    broker: Mosquitto,
    topic: str,
    payload: bytes,
    *,
    retain: bool = False,
    username: str | None = None,
    password: str | None = None,
    client_id: str | None = None,
) -> int:
    """Publish one message as a foreign client (QoS 1); the PUBACK's reason code."""
    client = _paho_client(broker, client_id or f"raw-{uuid.uuid4().hex[:8]}", username, password)
    codes: list[int] = []
    client.on_publish = lambda _c, _u, _mid, rc, _p: codes.append(rc.value)
    client.loop_start()
    try:
        info = client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5)
        deadline = time.monotonic() + 5
        while not codes and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        client.disconnect()
        client.loop_stop()
    return codes[0] if codes else -1


def read_retained(
    broker: Mosquitto,
    topic: str,
    timeout_s: float = 5.0,
    username: str | None = None,
    password: str | None = None,
) -> bytes | None:
    """The retained message of ``topic`` as the broker holds it (and lets us read)."""
    with Subscriber(broker, topic, username, password) as sub:
        deadline = time.monotonic() + timeout_s
        while not sub.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        return sub.messages[0][1] if sub.messages else None


class Subscriber:
    """A foreign client collecting what arrives on ``topic`` (in paho's thread)."""

    def __init__(
        self,
        broker: Mosquitto,
        topic: str,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._client = _paho_client(broker, f"sub-{uuid.uuid4().hex[:8]}", username, password)
        subscribed: list[bool] = []
        self._client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self._client.on_subscribe = lambda *_args: subscribed.append(True)
        self._client.on_connect = lambda c, _u, _f, _rc, _p: c.subscribe(topic, qos=1)
        self._client.loop_start()
        deadline = time.monotonic() + 5
        while not subscribed and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
