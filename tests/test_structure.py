"""The package's layout is its architecture: imports go one way, down the layers, with no
circles (imports inside functions count: they run later but still tie two modules
together), and imports inside functions are kept for optional dependencies.

The layers, lowest first (docs/architecture.md draws them): ``errors`` and ``fileio``;
``kv`` (how K and V are kept); ``config``; ``model`` (the spec, plain torch); ``runtime``
(quantized layers, the plan, the executor, generation); ``formats`` (files in, files out);
``serve`` and ``train``; ``tools`` (benchmarks, pictures, experiments); ``cli``. A module
may import its own layer and the layers below it, never one above.
"""

import ast
from pathlib import Path

import kvformer

ROOT = Path(kvformer.__file__).parent

LAYERS = {
    "kvformer.errors": 0, "kvformer.fileio": 0,
    "kvformer.kv": 1,
    "kvformer.config": 2,
    "kvformer.model": 3,
    "kvformer.runtime": 4,
    "kvformer.formats": 5,
    "kvformer.serve": 6, "kvformer.train": 6,
    "kvformer.tools": 7,
    "kvformer.cli": 8,
}
# the package's front door and its ``python -m`` entry points sit above every layer
ENTRY = {"kvformer", "kvformer.__main__", "kvformer.train.__main__"}
# what may be imported inside a function: packages kvformer does not require (extras and
# test-only ones), whose absence must not stop the rest from importing
OPTIONAL = {"fastapi", "uvicorn", "llguidance", "llama_cpp", "transformers", "accelerate",
            "readline", "termios", "tty", "uvloop", "httptools",
            "ray",  # the cluster extra (kvformer serve --replicas)
            "resource"}  # POSIX only
# and modules that only a rarely taken path needs and that cost time to import: compiling
# the kernels (``kvformer build``, once per machine) needs torch's C++ extension helpers
COSTLY = {"torch.utils.cpp_extension",
          "kvformer.serve.replicas"}  # serve --replicas: imports Ray (seconds) when it is there
MAX_INNER_SHARE = 0.05


def modules() -> dict[str, Path]:
    files = {}
    for f in ROOT.rglob("*.py"):
        parts = f.relative_to(ROOT.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return files


def _imports(mod: str, f: Path, files: dict[str, Path]):
    """(target module, the ast node, inside a function?) for each kvformer module ``mod``
    imports; imports for type checkers only are left out."""
    package = mod if f.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(f.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    inner = {id(n) for fn in ast.walk(tree)
             if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) for n in ast.walk(fn)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] + [f"{target}.{a.name}" for a in node.names]
        for name in names:
            if name in files and name != mod:
                yield name, node, id(node) in inner


def import_graph() -> dict[str, set[str]]:
    """kvformer module -> the kvformer modules it imports, anywhere in its body."""
    files = modules()
    graph = {}
    for mod, f in files.items():
        graph[mod] = {t for t, _, _ in _imports(mod, f, files) if not mod.startswith(t + ".")}
    return graph


def layer(mod: str) -> int | None:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if mod == prefix or mod.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module."""
    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
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


def test_the_graph_sees_imports_inside_functions():
    files = modules()
    graph = import_graph()
    assert graph and all(layer(m) is not None for m in files if m not in ENTRY), \
        sorted(m for m in files if m not in ENTRY and layer(m) is None)
    # the cli loads its verbs' modules lazily, by name: the graph must still see them
    assert "kvformer.runtime.generation" in graph["kvformer.cli.generate"]


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_imports_go_down_the_layers():
    wrong = sorted(f"{mod} (layer {layer(mod)}) imports {t} (layer {layer(t)})"
                   for mod, targets in import_graph().items() if mod not in ENTRY
                   for t in targets if t not in ENTRY and layer(t) > layer(mod))
    assert not wrong, "\n".join(wrong)


def test_imports_inside_functions_are_for_optional_packages():
    total, inner, wrong = 0, 0, []
    for f in ROOT.rglob("*.py"):
        tree = ast.parse(f.read_text())
        in_fn = {id(n) for fn in ast.walk(tree)
                 if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(fn)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            total += 1
            if id(node) in in_fn:
                inner += 1
                name = node.names[0].name if isinstance(node, ast.Import) else node.module
                if getattr(node, "level", 0) or ((name or "").split(".")[0] not in OPTIONAL
                                                 and name not in COSTLY):
                    wrong.append(f"{f.relative_to(ROOT.parent)}:{node.lineno} "
                                 f"{ast.unparse(node)}")
    assert inner <= MAX_INNER_SHARE * total, f"{inner} of {total} imports inside functions"
    assert not wrong, "\n".join(wrong)


def test_kvformer_generate_is_the_function():
    import kvformer.runtime.generation

    assert callable(kvformer.generate) and kvformer.generate is \
        kvformer.runtime.generation.generate
