"""The package layout keeps its promises (docs/architecture.md): no module reaches into another
technology's underscores, the hybrid uses its tiers' public seams only, and the benchmarks are
not part of the installed package."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import fleetmem

SRC = Path(fleetmem.__file__).parent
BACKENDS = SRC / "backends"


def _owner(module: str) -> str:
    """The package that owns ``module``: ``fleetmem.backends.<tech>`` or ``fleetmem``."""
    parts = module.split(".")
    if parts[:2] == ["fleetmem", "backends"] and len(parts) > 2 and not parts[2].startswith("_"):
        return ".".join(parts[:3])
    return "fleetmem"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _private_imports() -> list[str]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        here = _module_name(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if not node.module.startswith("fleetmem.backends."):
                continue
            if _owner(node.module) == _owner(here):
                continue
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{here} imports {node.module}.{alias.name}")
    return found


def test_no_module_imports_another_backend_packages_private_names() -> None:
    assert _private_imports() == []


def test_the_check_above_can_fail() -> None:
    assert _owner("fleetmem.backends.redis.kv") != _owner("fleetmem.backends.hybrid.kv")
    assert _owner("fleetmem.backends.redis.kv") == _owner("fleetmem.backends.redis.connector")
    assert _owner("fleetmem.backends._files") == "fleetmem"


#: The attributes of HybridKV that hold its tiers (or views of them).
_TIERS = {"_durable", "_durable_root", "_cache", "_epochs"}


def _reach_ins(source: str) -> list[str]:
    """``self.<tier>.<_private>`` accesses in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        inner = node.value
        if (
            isinstance(inner, ast.Attribute)
            and inner.attr in _TIERS
            and isinstance(inner.value, ast.Name)
            and inner.value.id == "self"
        ):
            found.append(f"line {node.lineno}: self.{inner.attr}.{node.attr}")
    return found


def test_the_hybrid_uses_only_its_tiers_public_seams() -> None:
    for path in sorted((BACKENDS / "hybrid").glob("*.py")):
        assert _reach_ins(path.read_text(encoding="utf-8")) == [], path.name


def test_a_reach_in_is_found() -> None:
    assert _reach_ins("self._cache._cluster\nself._cache.cluster\n") == [
        "line 1: self._cache._cluster"
    ]


def test_the_benchmarks_are_not_in_the_package() -> None:
    assert importlib.util.find_spec("fleetmem.bench") is None
    assert not list(SRC.rglob("bench*.py"))
