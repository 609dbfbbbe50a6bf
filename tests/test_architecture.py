"""The house has no circles: no module of asclepius imports (at module level or inside a function) one that leads
back to it, and the low modules import nothing above them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "asclepius"


def import_graph() -> dict[str, set[str]]:
    modules = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p for p in PACKAGE.rglob("*.py")}
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if not node.level else ".".join(name.split(".")[: -node.level] + [node.module])
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[v] = min(low[v], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_low_modules_import_nothing_above_them():
    graph = import_graph()
    above = {"asclepius.pipeline", "asclepius.console", "asclepius.cli", "asclepius.status"}
    for low in ("asclepius.stages", "asclepius.progress", "asclepius.config", "asclepius.storage", "asclepius.run"):
        reach, todo = set(), [low]
        while todo:
            for nxt in graph[todo.pop()] - reach:
                reach.add(nxt)
                todo.append(nxt)
        assert not reach & above, (low, reach & above)
    # the teacher reports progress through asclepius.progress, not the console
    assert "asclepius.console" not in graph["asclepius.teacher.ray_data"]


def test_the_driver_starts_without_torch_or_nltk():
    """Every CLI command, and every Ray Data task that tokenizes or packs, imports the pipeline's stage modules:
    torch (via the training data module) and nltk with scipy (via rouge-score, for the question pool) cost 4.5 s of
    a 6.7 s import there on 2 CPUs. Only the processes that train, serve or filter questions import them."""
    import subprocess
    import sys

    code = "import sys, asclepius.cli, asclepius.pipeline, asclepius.train.ray_train; print(sorted({'torch', 'nltk', 'scipy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", out
