"""The package's layers point one way: the import graph, read from the source (every import
statement at any depth, a function's included, except under `if TYPE_CHECKING:`), has no circle."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "modelpress"


def modules() -> dict[str, Path]:
    out = {}
    for f in PACKAGE.rglob("*.py"):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports; `from pkg import sub` names the submodule."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    class Visit(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                for n in node.orelse:
                    self.visit(n)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            subs = [f"{target}.{a.name}" for a in node.names]
            found.update(subs)
            if any(s not in known for s in subs):
                found.add(target)

    Visit().visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    assert sum(map(len, graph.values())) > 100  # the graph was read (222 edges when written)
    assert circles(graph) == []


def test_the_checker_finds_a_circle():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# core <- kernels <- nn <- formats / model <- methods <- eval / serve <- cli (README, "How the code is laid out")
LAYERS = {"core": 0, "kernels": 1, "nn": 2, "formats": 3, "model": 3, "methods": 4, "finetune": 4, "eval": 5, "serve": 5}


def upward(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a lower layer into a higher one (modules outside the layered folders are free)."""
    def rank(m: str) -> int | None:
        parts = m.split(".")
        return LAYERS.get(parts[1]) if len(parts) > 1 else None

    return sorted((a, b) for a, deps in graph.items() for b in deps
                  if rank(a) is not None and rank(b) is not None and rank(b) > rank(a))


def test_layers_point_one_way():
    known = modules()
    graph = {m: imports(m, p, known) for m, p in known.items()}
    assert upward(graph) == []


def test_the_checker_finds_an_upward_import():
    graph = {"modelpress.core.a": {"modelpress.kernels.b"}, "modelpress.kernels.b": set(),
             "modelpress.nn.c": {"modelpress.core.a", "modelpress.errors"}, "modelpress.errors": set()}
    assert upward(graph) == [("modelpress.core.a", "modelpress.kernels.b")]
