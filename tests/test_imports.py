"""The package's import graph, read from the source with `ast` (every import, the ones inside functions
included): no circle, and no module imports one of a higher tier than its own in the order that
docs/architecture.md documents. Every module of the package is placed in a tier, and its module -> test
map names every module and only test files that exist."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "opd_jax"


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (`from opd_jax.x import y` counts as opd_jax.x.y when
    that is a module, else opd_jax.x); the root package itself is left out (it only re-exports)."""
    def owner(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                if t.startswith("opd_jax"):
                    o = owner(t)
                    if o not in ("", "opd_jax", name):
                        graph[name].add(o)
    return graph


def documented_tiers() -> dict[str, int]:
    """docs/architecture.md's table rows `| N. title | `a`, `b.c`, ... |` -> {opd_jax.a: N, ...}."""
    tiers = {}
    for line in (ROOT / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\.[^|]*\|(.*)\|\s*$", line)
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                tiers[f"opd_jax.{name}"] = int(m.group(1))
    return tiers


def cycle(graph) -> list[str]:
    """One import circle as a path a -> ... -> a, or [] when there is none (depth-first search)."""
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        state[v] = 2
        stack.pop()
        return []

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return []


def test_the_reader_sees_imports_and_circles():
    """The checks' own parts on a made-up graph: a circle is found, a clean graph passes."""
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    graph = import_graph(modules())
    assert "opd_jax.rollout_programs" in graph["opd_jax.engine"]  # a top-level import
    assert "opd_jax.serving" in graph["opd_jax.teachers"]  # an import inside a function


def test_no_import_circle_and_no_import_up_the_documented_order():
    mods = modules()
    graph = import_graph(mods)
    assert cycle(graph) == [], f"import circle: {' -> '.join(cycle(graph))}"
    tiers = documented_tiers()
    unplaced = sorted(set(mods) - set(tiers) - {"opd_jax"})
    assert not unplaced, f"modules missing from docs/architecture.md's tiers: {unplaced}"
    stale = sorted(set(tiers) - set(mods))
    assert not stale, f"docs/architecture.md names modules that do not exist: {stale}"
    up = sorted(f"{a} (tier {tiers[a]}) imports {b} (tier {tiers[b]})" for a in graph if a != "opd_jax"
                for b in graph[a] if tiers[b] > tiers[a])
    assert not up, "imports up the documented order:\n" + "\n".join(up)


def test_every_module_has_its_tests_in_the_documented_map():
    """docs/architecture.md's "Module -> test" rows `| `a`, `b.c` | `test_x.py`, ... |`."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    mapped, named = set(), set()
    for line in text[text.index("## Module -> test"):].splitlines():
        cells = line.split("|")
        if len(cells) == 4 and "test_" in cells[2]:
            mapped |= {f"opd_jax.{m}" for m in re.findall(r"`([\w.]+)`", cells[1]) if not m.endswith(".py")}
            named |= set(re.findall(r"`(test_\w+\.py)`", cells[2]))
    packages = {m for m, p in modules().items() if p.name == "__init__.py"}  # they only re-export
    missing = sorted(set(modules()) - packages - mapped)
    assert not missing, f"modules without tests in docs/architecture.md's map: {missing}"
    assert not sorted(mapped - set(modules())), "the map names modules that do not exist"
    absent = sorted(t for t in named if not (ROOT / "tests" / t).exists())
    assert not absent, f"the map names test files that do not exist: {absent}"
