"""Imports run one way: ops -> models -> train -> eval/report/bench, with small neutral modules beside them.

Read from the source (every import, also those inside functions), so a lazy import that runs upward fails too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

from testpaths import REPO_ROOT

TOP = {"eval", "report", "bench", "export", "infer", "cli", "doctor"}  # commands: nothing below imports them
NEUTRAL = {"utils", "errors", "environment", "memory", "dashboards", "resolvers", "rundir"}  # used by any layer


def _imports() -> dict[str, set[str]]:
    root = REPO_ROOT / "bkexp"
    graph: dict[str, set[str]] = defaultdict(set)
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel == Path("__init__.py"):
            continue
        src = rel.parts[0].removesuffix(".py")
        package = ("bkexp", *rel.parts[:-1])  # what a relative import starts from
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[:len(package) - node.level + 1]) if node.level else ""
                module = ".".join(filter(None, [base, node.module]))
                # ``from bkexp import train`` imports the subpackage named after ``import``
                names = [f"{module}.{a.name}" for a in node.names] if module == "bkexp" else [module]
            for name in names:
                parts = name.split(".")
                if parts[0] == "bkexp" and len(parts) > 1 and parts[1] != src:
                    graph[src].add(parts[1])
    return graph


def test_imports_run_one_way() -> None:
    graph = _imports()
    assert graph["ops"] <= {"utils", "errors"}, graph["ops"]
    assert graph["models"] <= {"ops", "utils", "errors"}, graph["models"]  # nn.Modules only
    assert not graph["train"] & TOP, graph["train"]
    assert not graph["techniques"] & (TOP | {"train"}), graph["techniques"]
    assert not graph["report"] & {"train", "models", "ops", "quant"}, graph["report"]  # the report reads files
    for module in NEUTRAL:
        assert not graph[module] & (TOP | {"train"}), (module, graph[module])
