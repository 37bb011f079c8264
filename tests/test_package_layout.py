"""The package layout of docs/architecture.md holds: no import cycles, no stage imports a later one."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
# the packages in layer order (shared machinery, then the stages); each imports top-level modules and earlier ones only
STAGES = ("training", "nets", "data", "pretraining", "finetuning", "evaluation", "reporting")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Every sar3d module and the sar3d modules it imports (at the top or inside functions)."""
    modules = {module_name(p): p for p in (SRC / "sar3d").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sar3d"):
                for alias in node.names:  # `from sar3d.x import y` may import the module sar3d.x.y
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("sar3d"))
        graph[name] = {m for m in found if m in modules and m != name and not name.startswith(m + ".")}
    return graph


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in STAGES else None


def test_no_import_cycles() -> None:
    graph = imports()
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_no_stage_package_imports_a_later_one() -> None:
    for module, targets in imports().items():
        own = stage(module)
        if own is None:
            continue
        for target in targets:
            other = stage(target)
            assert other is None or STAGES.index(other) <= STAGES.index(own), f"{module} imports {target}"
