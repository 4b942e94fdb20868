"""The README is shown on the package index, where relative links break; the docs pages are
shipped together and link to each other relatively. Every link must lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REPO_URL = "https://github.com/fleetmem/fleetmem/"
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_REPO_PATH = re.compile(re.escape(REPO_URL) + r"(?:blob|tree)/main/([^#]*)")


def _links(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    # Code blocks hold examples, not links.
    text = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    return _LINK.findall(text)


def test_readme_links_are_absolute_and_lead_to_files_of_this_repository() -> None:
    links = _links(ROOT / "README.md")
    assert links, "the README links to its docs"
    for link in links:
        assert link.startswith(("https://", "http://", "#")), f"relative link in README: {link}"
        match = _REPO_PATH.match(link)
        if match:
            assert (ROOT / match.group(1)).exists(), f"README links to a missing file: {link}"


@pytest.mark.parametrize(
    "page", sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").rglob("*.md"))
)
def test_docs_relative_links_resolve(page: str) -> None:
    path = ROOT / page
    for link in _links(path):
        if link.startswith(("https://", "http://", "#", "mailto:")):
            continue
        target, _, anchor = link.partition("#")
        file = (path.parent / target) if target else path
        assert file.exists(), f"{page} links to a missing file: {link}"
        if anchor and file.suffix == ".md":
            assert anchor in _anchors(file), f"{page} links to a missing heading: {link}"


def _anchors(path: Path) -> set[str]:
    """The anchors a Markdown renderer gives the headings of ``path`` (GitHub's rule)."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
