"""The import map of docs/architecture.md: stages top to bottom, every import arrow pointing down
(or within a stage), no cycle between modules, victims never import attacks, the eval-set loader
stands on the webdataset reader alone, and only data/wds.py opens tars."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "clip_poison"
# Top to bottom; a module may import its own stage or any stage below it.
LAYERS = ["cli", "experiments", "run", "defenses", "metrics", "victims", "attacks", "data", "io", "config"]


def _module(path: Path) -> str:
    return ".".join(("clip_poison",) + path.relative_to(PKG).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Package modules ``path`` imports, at module level or inside functions."""
    mod = _module(path)
    pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = ".".join(pkg[: len(pkg) - node.level + 1]) if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p)
            for a in node.names:  # `from . import text_attack` imports a module
                full = f"{name}.{a.name}"
                out.add(full if (PKG / Path(*full.split(".")[1:])).with_suffix(".py").is_file() else name)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "clip_poison" or m.startswith("clip_poison.")}


def graph() -> dict[str, set[str]]:
    return {_module(p): _imports(p) - {_module(p)} for p in PKG.rglob("*.py")}


def _stage(mod: str) -> int:
    return LAYERS.index(mod.split(".")[1])


def test_every_import_points_down_the_stages():
    up = [(m, d) for m, deps in graph().items() for d in deps if d != "clip_poison" and _stage(d) < _stage(m)]
    assert not up, f"imports pointing up the stages of docs/architecture.md: {up}"


def test_module_import_graph_has_no_cycle():
    g, state, cycles = graph(), {}, []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for d in sorted(g.get(m, ())):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import cycles: {cycles}"


def test_victims_never_import_attacks():
    bad = {m: sorted(d for d in deps if d.startswith("clip_poison.attacks"))
           for m, deps in graph().items() if m.startswith("clip_poison.victims")}
    assert not any(bad.values()), bad


def test_defenses_sit_above_metrics_and_victims():
    # Scans read embeddings (metrics) and repairs retrain (victims), so defenses stand on both;
    # the layer test above then keeps everything below from reaching up into them.
    assert LAYERS.index("defenses") < min(LAYERS.index("metrics"), LAYERS.index("victims"))
    assert any(m.startswith("clip_poison.defenses.") for m in graph())


def test_detectors_are_pure_functions_on_io_alone():
    assert graph()["clip_poison.defenses.detectors"] <= {"clip_poison.io"}


def test_eval_set_loader_stands_on_io_and_the_webdataset_reader():
    assert graph()["clip_poison.data.evalsets"] <= {"clip_poison.io", "clip_poison.data.wds"}


def test_only_the_webdataset_module_opens_tars():
    openers = sorted(_module(p) for p in PKG.rglob("*.py") if "tarfile.open(" in p.read_text())
    assert openers == ["clip_poison.data.wds"]


def test_all_lists_only_a_modules_own_names():
    for p in PKG.rglob("*.py"):
        tree = ast.parse(p.read_text())
        imported = {(a.asname or a.name).split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
                names = {e.value for e in node.value.elts}
                assert not names & imported, f"{_module(p)}.__all__ re-exports {sorted(names & imported)}"
