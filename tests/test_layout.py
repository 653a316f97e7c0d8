"""Issue 14: cloudchat.py reads top to bottom; every endpoint is in the routing table."""

from __future__ import annotations

import ast

import cloudchat
from tests.helpers import CLOUDCHAT

SECTIONS = [
    "Config",
    "Errors",
    "SQL store",
    "Key-value store",
    "Security",
    "Sessions",
    "Mail",
    "Chat",
    "App",
    "Server",
    "main() and the command line",
]


def _sections(lines: list[str]) -> list[tuple[int, str]]:
    """(first line, name) of each banner-separated section, in file order."""
    found = []
    for number, line in enumerate(lines, 1):
        if line.startswith("# ") and number > 1 and lines[number - 2].startswith("#####"):
            found.append((number, line[2:].split(":")[0]))
    return found


def test_sections_are_in_dependency_order() -> None:
    """The banners are the house style's, in its order; no top-level definition uses a name
    that a later section defines."""
    source = CLOUDCHAT.read_text(encoding="utf-8")
    sections = _sections(source.split("\n"))
    assert [name for _, name in sections] == SECTIONS

    def section_of(line: int) -> int:
        return sum(1 for start, _ in sections if line >= start) - 1

    tree = ast.parse(source)
    defined: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.setdefault(node.name, node.lineno)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    defined.setdefault(target.id, node.lineno)
    upward = sorted(
        {
            (getattr(node, "name", str(node.lineno)), used.id)
            for node in tree.body
            for used in ast.walk(node)
            if isinstance(used, ast.Name)
            and used.id in defined
            and section_of(defined[used.id]) > section_of(node.lineno)
        }
    )
    assert not upward, f"(user, name of a later section): {upward}"


def test_routing_table_lists_every_endpoint() -> None:
    """ROUTES is the one list of endpoints: the app serves exactly those."""
    app = cloudchat.create_app(cloudchat.Config(db_path=":memory:"))
    try:
        served = {(route.method, route.rule) for route in app.router.routes}
    finally:
        app.close()
    assert served == {(route.method, route.path) for route in cloudchat.ROUTES}
    assert len(cloudchat.ROUTES) == len(served)
