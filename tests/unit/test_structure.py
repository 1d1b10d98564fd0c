"""The package's shape: imports run only downwards through the layers, there are no import circles,
and the code that runs inside the allocation loads none of the user-side libraries."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "raybridge"

# Lowest first; a module may import from its own layer or below, never above.
LAYERS = [
    {
        "raybridge.errors",
        "raybridge.layout",
        "raybridge.settings",
        "raybridge.envcheck",
        "raybridge.trust",
        "raybridge.preload",
    },
    {"raybridge.container"},
    {"raybridge.transport.transfer", "raybridge.transport.runner", "raybridge.jobdir"},
    {"raybridge.slurm", "raybridge.metrics"},
    {"raybridge.members"},
    {"raybridge.agent", "raybridge.autoscaler", "raybridge.train", "raybridge.slurmprovider"},
    {"raybridge.transport"},
    {"raybridge.client"},
    {"raybridge.cli", "raybridge.__main__"},
]
# Started by the batch script or Ray's monitor on the nodes: `python -m raybridge.agent ...`.
IN_ALLOCATION = [
    "raybridge.agent.__main__",
    "raybridge.agent.node",
    "raybridge.agent.driver",
    "raybridge.agent.doctor",
    "raybridge.autoscaler.provider",
    "raybridge.train",
    "raybridge.envcheck",
    "raybridge.preload",  # every Ray Train worker of make_trainer starts through it
]
USER_SIDE = ("yaml", "paramiko", "typer", "rich")


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    if name == "raybridge":  # the package's facade (lazy load_spec, ClusterSpec): the top
        return len(LAYERS)
    best = None
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (name == prefix or name.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best[0]


def imports(path: Path) -> set[str]:
    """The raybridge modules a file imports, anywhere in it (function-local imports too)."""
    name = module_name(path)
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*pkg, base] if base else pkg)
            out |= {f"{base}.{a.name}" for a in node.names} | {base}
    known = {module_name(p) for p in PKG.rglob("*.py")}
    return {m for m in out if m in known and m != name}


GRAPH = {module_name(p): imports(p) for p in PKG.rglob("*.py")}


def test_imports_run_downwards_only():
    up = [
        f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
        for a, targets in GRAPH.items()
        for b in targets
        if b != "raybridge" and layer(b) > layer(a)  # (`from raybridge import __version__` is fine)
    ]
    assert not up, "\n".join(up)


def test_no_import_circles():
    seen: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in sorted(GRAPH.get(node, ())):
            if nxt == "raybridge":
                continue
            if seen.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for start in sorted(GRAPH):
        if start not in seen:
            visit(start, [start])


def third_party(path: Path) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            tops.add(node.module.split(".")[0])
    return tops


def test_no_module_below_the_user_side_imports_its_libraries():
    """Layers up to the agents and the autoscaler run in the allocation, where a site's Python may lack
    them (function-local imports count too)."""
    below = len(LAYERS) - 3  # transport (ssh), client and cli are the user's side
    found = [
        f"{module_name(p)} imports {lib}"
        for p in PKG.rglob("*.py")
        if module_name(p) != "raybridge" and layer(module_name(p)) < below
        for lib in sorted(third_party(p) & set(USER_SIDE))
    ]
    assert not found, "\n".join(found)


GUARD = """
import builtins, importlib, sys
real, seen = builtins.__import__, []
def guard(name, globals=None, locals=None, fromlist=(), level=0):
    importer = (globals or {}).get("__name__") or ""
    wanted = [name] + [f"{name}.{f}" for f in fromlist or ()]
    if importer.startswith("raybridge") and level == 0:
        seen.extend(f"{importer} imports {w}" for w in wanted
                    if w.split(".")[0] in USER_SIDE or w.startswith(("raybridge.client", "raybridge.cli")))
    return real(name, globals, locals, fromlist, level)
builtins.__import__ = guard
importlib.import_module(MODULE)
print(seen)
"""


@pytest.mark.parametrize("module", IN_ALLOCATION)
def test_code_in_the_allocation_loads_no_user_side_library(module):
    """What actually runs when the module loads (a fresh interpreter; Ray's own imports aside)."""
    probe = f"USER_SIDE = {USER_SIDE!r}\nMODULE = {module!r}\n" + GUARD
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
