"""The package's imports go one way: no module imports one that imports it back (counting
imports inside functions, which run later but still tie the two modules together)."""

import ast
from pathlib import Path

import kvformer

ROOT = Path(kvformer.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """kvformer module -> the kvformer modules it imports (imports for type checkers only,
    and a package's own ``__init__`` that every submodule runs, are left out)."""
    files = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    graph: dict[str, set[str]] = {}
    for mod, f in files.items():
        package = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
        tree = ast.parse(f.read_text())
        typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                       and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
        targets = set()
        for node in ast.walk(tree):
            if id(node) in typing_only or not isinstance(node, ast.ImportFrom) \
                    or not node.level:
                continue
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [target] if node.module else []
            targets |= {n for n in names + [f"{target}.{a.name}" for a in node.names]
                        if n in files}
        graph[mod] = {t for t in targets if t != mod and not mod.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    reachable = {m: reach(m) for m in graph}
    found = []
    for m in graph:
        comp = {n for n in reachable[m] if m in reachable[n]} | {m}
        if len(comp) > 1 and comp not in found:
            found.append(comp)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]


def test_the_server_the_cli_and_the_native_code_are_in_no_import_cycle():
    graph = import_graph()
    assert "kvformer.cli.arguments" in graph["kvformer.cli.serve"]  # the graph sees lazy imports
    assert "kvformer.runtime.native" in graph["kvformer.runtime.quant"]
    involved = set().union(*cycles(graph)) if cycles(graph) else set()
    ours = {m for m in graph if m.startswith(("kvformer.serve", "kvformer.cli.main",
                                              "kvformer.runtime.native", "kvformer.runtime.step",
                                              "kvformer.runtime.plan"))}
    assert not involved & ours, cycles(graph)
