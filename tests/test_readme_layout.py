"""The README's layout block lists exactly the service's and pipelines' modules."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _layout() -> list[tuple[int, str]]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    out = []
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if m and line.strip():
            out.append((len(m.group(1)), m.group(2)))
    return out


def _listed() -> set[str]:
    stack: list[tuple[int, str]] = []
    paths = set()
    for indent, name in _layout():
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "".join(p for _, p in stack) + name
        paths.add(path.rstrip("/"))
        if name.endswith("/"):
            stack.append((indent, name))
    return paths


def test_every_listed_path_exists() -> None:
    missing = sorted(p for p in _listed() if not (REPO / p).exists())
    assert not missing, f"README layout names what the tree lacks: {missing}"


def test_every_module_is_listed() -> None:
    listed = _listed()
    modules = [p for p in (REPO / "gateway").glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    modules += list((REPO / "gateway" / "index").glob("*.py")) + list((REPO / "pipelines").glob("_*.py"))
    modules += [p for p in (REPO / "gateway" / "apps").iterdir() if p.is_dir() and not p.name.startswith("_")]
    unlisted = sorted(
        str(p.relative_to(REPO)) for p in modules if p.name != "__init__.py" and str(p.relative_to(REPO)) not in listed
    )
    assert not unlisted, f"README layout misses: {unlisted}"
