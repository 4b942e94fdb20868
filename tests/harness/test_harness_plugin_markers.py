"""The plugin registers the markers fleetmem's docs use, so ``--strict-markers`` accepts them.

The inner run is a scratch project (``pytester``, a subprocess) with no configuration of its
own: the markers can only come from the plugin.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fleetmem.testing.plugin import MARKERS

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
#: Markers that come with pytest and pytest-asyncio.
OTHERS = {"asyncio", "parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def test_the_documented_markers_are_registered_for_strict_markers(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PYTEST_ADDOPTS", raising=False)
    # Only this plugin (and pytest-asyncio's asyncio marker): faster than every installed one.
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins = ("-p", "pytest_asyncio.plugin", "-p", "fleetmem.testing.plugin")
    assert set(MARKERS) >= {"postgres", "redis", "hybrid", "cluster", "slow", "docker"}
    tests = "\n".join(f"@pytest.mark.{name}\ndef test_{name}():\n    pass\n" for name in MARKERS)
    pytester.makepyfile(test_marked="import pytest\n\n" + tests)
    result = pytester.runpytest_subprocess(
        *plugins,
        "-p",
        "no:cacheprovider",
        "--strict-markers",
        "-W",
        "error::pytest.PytestUnknownMarkWarning",
        "-m",
        "not slow",
    )
    out = result.stdout.str()
    assert "configfile:" not in out, out  # nothing but the plugin registers them
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == len(MARKERS) - 1, out
    assert outcomes.get("deselected") == 1, out
    assert "errors" not in outcomes and "failed" not in outcomes, out
    listed = pytester.runpytest_subprocess(*plugins, "-p", "no:cacheprovider", "--markers")
    for name, description in MARKERS.items():
        listed.stdout.fnmatch_lines([f"@pytest.mark.{name}: {description}"])


def test_the_repository_registers_the_same_markers() -> None:
    ini = (ROOT / "pytest.ini").read_text()
    for name, description in MARKERS.items():
        assert f"    {name}: {description}\n" in ini


def test_every_marker_the_docs_use_is_registered() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    used = {name for page in pages for name in re.findall(r"pytest\.mark\.(\w+)", page.read_text())}
    assert used  # the docs do show marked tests
    assert used - OTHERS <= set(MARKERS)
