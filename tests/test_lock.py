"""The lock is what runs: it covers every dependency pyproject.toml names, its runtime part
agrees with it, and the environment running these tests holds exactly its versions."""

from __future__ import annotations

import importlib.metadata
import os
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.harness import REPO

LOCK = REPO / "requirements" / "all.lock"
RUNTIME_LOCK = REPO / "requirements" / "runtime.lock"
BUILD_IN = REPO / "requirements" / "build.in"
PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9._-]+)==(?P<version>[^\s;\\]+)\s*(?:;\s*(?P<marker>[^\\]+?))?\s*\\?$"
)


class Pinned:
    def __init__(self, version: str, marker: str | None, hashes: list[str]) -> None:
        self.version = version
        self.marker = Marker(marker) if marker else None
        self.hashes = hashes

    def applies(self) -> bool:
        return self.marker is None or self.marker.evaluate()


def read_lock(path: os.PathLike[str]) -> dict[str, Pinned]:
    pins: dict[str, Pinned] = {}
    current: Pinned | None = None
    for line in Path(path).read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = PIN.match(line)
        if match:
            current = Pinned(match["version"], match["marker"], [])
            pins[canonicalize_name(match["name"])] = current
        elif stripped.startswith("--hash=sha256:"):
            assert current is not None, f"{path}: a hash before any pin"
            current.hashes.append(stripped.removeprefix("--hash=").rstrip(" \\"))
        else:
            raise AssertionError(f"{path}: unexpected line {line!r}")
    return pins


def declared(extra: str | None) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(r) for r in names]


def build_requirements() -> list[Requirement]:
    return [
        Requirement(line)
        for line in BUILD_IN.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def test_lock_pins_every_declared_dependency_within_its_range() -> None:
    pins = read_lock(LOCK)
    for requirement in [*declared(None), *declared("test"), *build_requirements()]:
        pin = pins.get(canonicalize_name(requirement.name))
        assert pin is not None, f"{requirement.name} is not in {LOCK.name}: run `make lock`"
        assert requirement.specifier.contains(Version(pin.version), prereleases=True), (
            f"{requirement.name}=={pin.version} is outside pyproject's {requirement.specifier}"
        )
        assert pin.hashes, f"{requirement.name} has no hash"


def test_runtime_lock_is_the_runtime_part_of_the_same_resolution() -> None:
    pins, runtime = read_lock(LOCK), read_lock(RUNTIME_LOCK)
    for name, pin in runtime.items():
        assert name in pins, f"{name} is in {RUNTIME_LOCK.name} but not in {LOCK.name}"
        assert (pin.version, sorted(pin.hashes)) == (
            pins[name].version,
            sorted(pins[name].hashes),
        ), f"{name}: the two locks disagree; run `make lock`"
    for requirement in [*declared(None), Requirement("setuptools")]:
        assert canonicalize_name(requirement.name) in runtime, requirement.name
    test_only = {canonicalize_name(r.name) for r in declared("test")} - {
        canonicalize_name(r.name) for r in declared(None)
    }
    assert not test_only & set(runtime), "the .deb would ship test tools"


@pytest.mark.skipif(
    os.environ.get("XPU_TEST_LATEST") == "1",
    reason="make test-latest installs the newest releases on purpose, not the lock",
)
def test_this_environment_is_the_lock() -> None:
    wrong = {}
    for name, pin in read_lock(LOCK).items():
        if not pin.applies():
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != pin.version:
            wrong[name] = f"{installed} installed, {pin.version} locked"
    assert not wrong, f"not the locked versions (make test reinstalls them): {wrong}"


def test_every_installer_uses_the_lock() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes --no-deps -r $(LOCK)" in makefile
    assert "LOCK         := requirements/all.lock" in makefile
    rules = (REPO / "packaging" / "debian" / "rules").read_text()
    assert "--requirements requirements/runtime.lock" in rules
    assert "--extra-pip-arg --no-deps" in rules
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in ci
