"""The layout shows the architecture: imports point inward, never back or sideways.

Each top-level part of ``agent`` has a level; a part may import only parts of a lower
level (interfaces → core → ledger → backends → shared model), never its peers.
"""

from __future__ import annotations

import ast
from pathlib import Path

AGENT = Path(__file__).resolve().parent.parent / "agent"

LEVELS = {
    # the shared model
    "__init__": 0,
    "model": 0,
    "errors": 0,
    "units": 0,
    # the ground floor: pure placement, imports nothing of the agent
    "placement": 0,
    # configuration and process-level utilities
    "config": 1,
    "systemd": 1,
    "logs": 1,
    "supervise": 1,
    "instance": 1,
    "memory": 1,
    "processes": 1,
    "backends": 2,
    "ledger": 3,
    "core": 4,
    # interfaces over the same core; none imports another
    "api": 5,
    "bus": 5,
    "enforce": 5,
    "client": 5,
    # composition roots and entry points
    "daemon": 6,
    "cli": 7,
}


def _part(path: Path) -> str:
    rel = path.relative_to(AGENT)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name == "agent":
                found.add("__init__")
            elif name.startswith("agent."):
                found.add(name.split(".")[1])
    return found


def test_every_part_has_a_level() -> None:
    parts = {_part(p) for p in AGENT.rglob("*.py")}
    assert parts <= set(LEVELS), parts - set(LEVELS)


def test_imports_point_inward() -> None:
    violations = []
    for path in sorted(AGENT.rglob("*.py")):
        part = _part(path)
        for target in _imports(path) - {part}:
            if LEVELS[target] >= LEVELS[part]:
                violations.append(f"{path.relative_to(AGENT.parent)} imports agent.{target}")
    assert violations == []


def test_only_the_binding_imports_pynvml() -> None:
    importers = [
        str(p.relative_to(AGENT.parent))
        for p in AGENT.rglob("*.py")
        if any(name == "pynvml" or name.startswith("pynvml.") for name in _external_imports(p))
    ]
    assert importers == ["agent/backends/nvml/binding.py"]


def _external_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
    return names
