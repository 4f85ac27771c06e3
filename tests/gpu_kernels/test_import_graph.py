"""gpu_kernels' modules import each other without a cycle (each one's job stays its own: a kernel
module that needs a helper of another kernel's module gets it from a module both import)."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "gpu_kernels"


def imports_of(path: Path) -> set[str]:
    """The gpu_kernels modules that a module imports, at its top or inside a function: `from .x
    import ...`, `from . import x`, `from gpu_kernels.x import ...`, `import gpu_kernels.x`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
            elif node.module and node.module.startswith("gpu_kernels."):
                found.add(node.module.split(".")[1])
            elif node.module == "gpu_kernels":
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("gpu_kernels."))
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    return {name: imports_of(path) & modules.keys() for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of the graph as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_gpu_kernels_imports_have_no_cycle():
    graph = import_graph()
    assert graph["paged_attention"] >= {"attention_kernels", "attention_plan"}  # the parser sees imports
    assert find_cycle(graph) is None, f"import cycle in gpu_kernels: {' -> '.join(find_cycle(graph))}"


def test_kernel_modules_do_not_import_the_entry_points():
    graph = import_graph()
    for kernel_module in ("paged_attention_ws", "attention_kernels", "attention_common"):
        assert "paged_attention" not in graph[kernel_module], kernel_module
