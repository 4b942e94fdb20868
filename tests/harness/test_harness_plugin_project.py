"""The pytest plugin in a user's project: no configuration, the documented examples, markers.

Each test writes a scratch project with ``pytester`` and runs pytest on it in a subprocess, as
a new user would: the plugin comes from the ``pytest11`` entry point, pytest-asyncio is in its
default (strict) mode, and no ``pytest.ini`` or ``pyproject.toml`` exists (this repository's
``pytest.ini``, with ``asyncio_mode = auto`` and ``filterwarnings = error``, is not seen).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

DOCS = Path(__file__).resolve().parents[2] / "docs" / "testing.md"

#: The README's "Testing your own agents" example (checked below to be the README's and
#: docs/testing.md's); ``MyStore`` is the in-memory store.
README_SNIPPET = """
import pytest_asyncio
from fleetmem.testing import connected_store
from fleetmem.testing.conformance import StoreConformance

@pytest_asyncio.fixture
async def store(fleetmem_namespace):
    async with connected_store(MyStore(namespace=fleetmem_namespace)) as s:
        yield s  # a fresh, empty store; emptied and closed afterwards

class TestMyStore(StoreConformance):
    pass
"""
MY_STORE = "from fleetmem import InMemoryStore as MyStore\n"

#: What every inner run is told: no cache directory in the scratch project, strict markers,
#: and an unknown marker or any pytest-asyncio deprecation would fail the run.
STRICT = (
    "-p",
    "no:cacheprovider",
    "--strict-markers",
    "-W",
    "error::pytest.PytestUnknownMarkWarning",
    "-W",
    "error::pytest.PytestDeprecationWarning",
    "-rA",
)


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A scratch project that knows nothing of the outer run (its worker id, its options)."""
    for name in ("PYTEST_XDIST_WORKER", "PYTEST_XDIST_TESTRUNUID", "PYTEST_ADDOPTS"):
        monkeypatch.delenv(name, raising=False)
    return pytester


def _run_fast(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, *args: str
) -> pytest.RunResult:
    """An inner run with only pytest-asyncio and this plugin loaded (several times faster than
    loading every installed plugin; the tests above load them by their entry points)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return project.runpytest_subprocess(
        "-p", "pytest_asyncio.plugin", "-p", "fleetmem.testing.plugin", *args, timeout=120
    )


def _run(project: pytest.Pytester, *args: str, timeout: float = 240) -> pytest.RunResult:
    result = project.runpytest_subprocess(*STRICT, *args, timeout=timeout)
    out = result.stdout.str()
    # The project has no configuration file, so nothing of the outer one applies.
    assert f"rootdir: {project.path}" in out, out
    assert "configfile:" not in out, out
    return result


def _assert_clean_pass(result: pytest.RunResult, passed: int) -> None:
    out = result.stdout.str() + result.stderr.str()
    outcomes = result.parseoutcomes()
    assert outcomes == {"passed": passed}, out  # no warnings, skips, errors
    assert result.ret == 0, out
    assert "Warning" not in out, out


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def _test_blocks() -> list[str]:
    """The blocks of docs/testing.md that are whole test modules (they define a test)."""
    blocks = _python_blocks(DOCS.read_text())
    return [b for b in blocks if re.search(r"^(async )?def test_|^class Test", b, re.MULTILINE)]


# -- the README example and docs/testing.md -----------------------------------------------------


def test_readme_example_passes_in_a_project_without_configuration(
    project: pytest.Pytester,
) -> None:
    project.makepyfile(test_my_store=MY_STORE + README_SNIPPET)
    result = _run(project)
    # pytest-asyncio keeps its default mode: the plugin changes no behaviour.
    result.stdout.re_match_lines([r"asyncio: mode=(Mode\.)?(strict|STRICT),"])
    collected = re.search(r"collected (\d+) items", result.stdout.str())
    assert collected is not None and int(collected.group(1)) > 40
    _assert_clean_pass(result, int(collected.group(1)))


def test_the_readme_and_docs_testing_md_show_this_example() -> None:
    readme = (DOCS.parents[1] / "README.md").read_text()
    section = readme[readme.index("## Testing your own agents") :]
    assert _python_blocks(section)[0].strip() == README_SNIPPET.strip()
    blocks = [b.strip() for b in _python_blocks(DOCS.read_text())]
    assert README_SNIPPET.strip() in blocks


def test_every_python_block_of_docs_testing_md_compiles() -> None:
    blocks = _python_blocks(DOCS.read_text())
    assert len(blocks) >= 4
    for block in blocks:
        # Fragments (the history checker's example) may await at top level.
        compile(block, str(DOCS), "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


def test_the_examples_of_docs_testing_md_pass_in_a_project_without_configuration(
    project: pytest.Pytester,
    fleetmem_postgres_server: object,
    fleetmem_redis_server: object,
) -> None:
    # The outer server fixtures make this test skip (or fail, when servers are required) where
    # the inner run could get no servers either; the inner run starts its own, as a user's does.
    blocks = _test_blocks()
    assert len(blocks) >= 4, "docs/testing.md lost its runnable examples"
    for number, block in enumerate(blocks):
        project.makepyfile(**{f"test_docs_{number}": MY_STORE + block})
    result = _run(project)
    collected = re.search(r"collected (\d+) items", result.stdout.str())
    assert collected is not None
    # Every example ran: the conformance suite's tests and each example's own.
    own = sum(len(re.findall(r"^(?:async )?def test_", b, re.MULTILINE)) for b in blocks)
    assert int(collected.group(1)) > own + 40
    _assert_clean_pass(result, int(collected.group(1)))


# -- async code pytest-asyncio does not run -----------------------------------------------------

PLAIN_FIXTURE = README_SNIPPET.replace("import pytest_asyncio", "import pytest").replace(
    "@pytest_asyncio.fixture", "@pytest.fixture"
)
UNMARKED_TEST = """
async def test_unmarked(fleetmem_namespace):
    pass
"""


def test_an_async_fixture_or_test_that_is_not_run_says_what_it_needs(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makepyfile(test_plain=MY_STORE + PLAIN_FIXTURE, test_unmarked=UNMARKED_TEST)
    result = _run_fast(project, monkeypatch, "-p", "no:cacheprovider", "--strict-markers")
    out = result.stdout.str()
    assert result.ret == 1, out
    assert "the async fixture 'store' is a plain @pytest.fixture" in out
    assert "the test 'test_unmarked' is an async def without @pytest.mark.asyncio" in out
    assert "pytest-asyncio runs in 'strict' mode" in out
    assert "@pytest_asyncio.fixture" in out and "asyncio_mode = auto" in out
    # One summary paragraph at the end, besides the hint in each report.
    result.stdout.fnmatch_lines(["*= fleetmem =*", "* failed test(s) using fleetmem's fixtures*"])


def test_in_auto_mode_a_plain_async_fixture_runs_and_gets_no_hint(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makepyfile(test_plain=MY_STORE + PLAIN_FIXTURE)
    result = _run_fast(project, monkeypatch, "-p", "no:cacheprovider", "--asyncio-mode=auto")
    out = result.stdout.str()
    assert result.ret == 0, out
    assert "fleetmem" not in out.split("collected", 1)[1]


# -- pytest-asyncio's loop scope ----------------------------------------------------------------


def test_a_loop_scope_set_by_the_project_wins(
    project: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    project.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    project.makepyfile(test_my_store=MY_STORE + README_SNIPPET)
    result = _run_fast(project, monkeypatch, "-p", "no:cacheprovider", "-k", "test_edge_keys")
    result.stdout.fnmatch_lines(["asyncio: *asyncio_default_fixture_loop_scope=function*"])
    result = _run_fast(
        project,
        monkeypatch,
        "-p",
        "no:cacheprovider",
        "-k",
        "test_edge_keys",
        "-o",
        "asyncio_default_fixture_loop_scope=module",
    )
    result.stdout.fnmatch_lines(["asyncio: *asyncio_default_fixture_loop_scope=module*"])
