"""What the built distributions hold: the sdist's tests run as shipped, the wheel carries the
migrations and the type marker, and the package index gets absolute project URLs."""

from __future__ import annotations

import email
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

hatchling_sdist = pytest.importorskip("hatchling.builders.sdist", reason="needs fleetmem[dev]")
hatchling_wheel = pytest.importorskip("hatchling.builders.wheel", reason="needs fleetmem[dev]")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    (sdist,) = hatchling_sdist.SdistBuilder(str(ROOT)).build(
        directory=str(out), versions=["standard"]
    )
    (wheel,) = hatchling_wheel.WheelBuilder(str(ROOT)).build(
        directory=str(out), versions=["standard"]
    )
    return {"sdist": Path(sdist), "wheel": Path(wheel)}


def test_the_sdist_tests_collect_as_shipped(dist: dict[str, Path], tmp_path: Path) -> None:
    with tarfile.open(dist["sdist"]) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        for needed in ("pytest.ini", "tests/conftest.py", "scripts/test.sh", "pyproject.toml"):
            assert needed in names, f"the sdist lacks {needed}"
        tar.extractall(tmp_path, filter="data")
    (root,) = tmp_path.iterdir()
    # The shipped pytest.ini (strict markers, strict config, asyncio mode) governs the run:
    # every test module must collect with it.
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " tests collected" in result.stdout, result.stdout[-3000:]


def test_the_wheel_holds_migrations_type_marker_and_project_urls(dist: dict[str, Path]) -> None:
    with zipfile.ZipFile(dist["wheel"]) as whl:
        names = set(whl.namelist())
        assert "fleetmem/py.typed" in names
        assert any(n.startswith("fleetmem/_migrations/versions/") for n in names)
        assert not any(n.startswith(("tests/", "bench/")) for n in names)
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.message_from_bytes(whl.read(metadata_name))
    urls = metadata.get_all("Project-URL") or []
    assert urls, "no [project.urls]"
    for entry in urls:
        label, url = (part.strip() for part in entry.split(",", 1))
        assert url.startswith("https://"), f"{label}: {url}"
    extras = metadata.get_all("Provides-Extra") or []
    assert "cli" in extras
