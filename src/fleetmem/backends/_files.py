"""The SQL and Lua files shipped with the backends: read once, SQL split into named blocks.

A ``.sql`` file holds blocks that each start with a ``-- name: <block>`` line; comment lines are
dropped and a trailing ``;`` removed, so a block is one statement ready for a driver.
"""

from __future__ import annotations

from importlib import resources

__all__ = ["read_bytes", "read_text", "sql_blocks"]

_NAME = "-- name: "


def read_bytes(package: str, *path: str) -> bytes:
    """The bytes of the file at ``path`` inside ``package``."""
    return resources.files(package).joinpath(*path).read_bytes()


def read_text(package: str, *path: str) -> str:
    """The UTF-8 text of the file at ``path`` inside ``package``."""
    return read_bytes(package, *path).decode("utf-8")


def sql_blocks(package: str, *path: str) -> dict[str, str]:
    """The named blocks of a ``.sql`` file (``-- name: x`` starts block ``x``)."""
    blocks: dict[str, str] = {}
    name: str | None = None
    lines: list[str] = []
    for line in [*read_text(package, *path).splitlines(), _NAME]:
        if line.startswith(_NAME):
            if name is not None:
                body = "\n".join(ln for ln in lines if not ln.lstrip().startswith("--"))
                blocks[name] = body.strip().rstrip(";").strip()
            name = line[len(_NAME) :].strip() or None
            lines = []
        elif name is not None:
            lines.append(line)
    return blocks
