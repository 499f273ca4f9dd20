"""The layers import only downward: the library never loads the runner, the command line or the lab
unless asked, registry lookups load no lab module, no module imports another's private names, and
the import graph has no cycle."""

import subprocess
import sys


# ---------------------------------------------------------------------- layers
def test_import_bvgls_loads_the_library_only():
    code = (
        "import sys, bvgls; mods = [m for m in sys.modules if m.startswith('bvgls')];"
        "bad = [m for m in mods if m.startswith(('bvgls.runner', 'bvgls.cli', 'bvgls.bench'))];"
        "assert not bad, bad; assert bvgls.finetune.__module__ == 'bvgls.runner.loop';"
        "assert bvgls.History.__module__ == 'bvgls.runner.rundir'; assert callable(bvgls.compare)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_runner_and_bench_do_not_import_the_cli():
    code = (
        "import sys, bvgls_lab.experiments.run, bvgls_lab.experiments.report, bvgls_lab.experiments.ablation, "
        "bvgls.runner.grid, "
        "bvgls.runner.plots;"
        "assert not [m for m in sys.modules if m.startswith('bvgls.cli')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_list_covers_every_registry(cli):
    res = cli("list")
    assert res.exit_code == 0
    for name in ("tiny-resnet", "timm:<name>", "digits", "<directory>", "bvgls", "lisa", "L<a>-<b>", "resnet"):
        assert name in res.output, name


def test_import_bvgls_and_registry_lookups_load_no_lab_module():
    # the lab registers its models through the bvgls.plugins entry point, which only the command line
    # loads: a lookup in the library's registries must not import it, whether the lab is installed or not
    code = (
        "import sys, bvgls; assert not [m for m in sys.modules if m.startswith('bvgls_lab')];"
        "import bvgls.runner; from bvgls.registry import MODELS, DATASETS;"
        "from bvgls.grouping import GROUPING_SCHEMES;"
        "names = [r.names() for r in (MODELS, DATASETS, bvgls.STRATEGIES, GROUPING_SCHEMES)];"
        "assert 'tiny-resnet' in MODELS and 'fmnist-resnet' not in MODELS and MODELS.rows();"
        "bvgls.runner.models.build_model('tiny-resnet', 2, None);"
        "bad = [m for m in sys.modules if m.startswith('bvgls_lab')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _modules(root):
    """(module name, package, parsed tree) of every module under ``root``."""
    import ast
    from pathlib import Path

    for path in sorted(Path(root).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        package = ".".join(parts[:-1]) if parts[-1] != "__init__" else ".".join(parts[:-1])
        name = package if parts[-1] == "__init__" else ".".join(parts)
        yield name, package, ast.parse(path.read_text())


def _imported(package, node):
    """The absolute module an ``ImportFrom`` node imports from."""
    if not node.level:
        return node.module or ""
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _import_graph():
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    graph = {}
    for root in (repo / "src", repo / "lab"):
        for name, package, tree in _modules(root):
            edges = graph.setdefault(name, set())
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and _imported(package, node).startswith("bvgls"):
                    base = _imported(package, node)
                    edges.update(
                        f"{base}.{a.name}"
                        if (root / f"{base}.{a.name}".replace(".", "/")).exists()
                        or (root / (f"{base}.{a.name}".replace(".", "/") + ".py")).exists()
                        else base
                        for a in node.names
                    )
                elif isinstance(node, ast.Import):
                    edges.update(a.name for a in node.names if a.name.startswith("bvgls"))
    return graph


def test_no_module_imports_another_modules_private_names():
    import ast
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    private = [
        (name, _imported(package, node), a.name)
        for root in (repo / "src", repo / "lab")
        for name, package, tree in _modules(root)
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        for a in node.names
        if a.name.startswith("_") and not a.name.startswith("__")
    ]
    assert not private, private


def test_the_library_never_imports_the_lab():
    graph = _import_graph()
    upward = {
        m: sorted(t for t in targets if t.startswith("bvgls_lab"))
        for m, targets in graph.items()
        if m.startswith("bvgls.") or m == "bvgls"
    }
    assert not any(upward.values()), upward


def test_the_import_graph_has_no_cycle():
    # a package importing its own submodules (to register them) is not an edge back: the submodules
    # import the package's names, which exist before the package's last lines import them
    graph = {m: {t for t in targets if t != m and not t.startswith(m + ".")} for m, targets in _import_graph().items()}
    state, cycles = {}, []

    def visit(module, path):
        state[module] = "open"
        for target in graph.get(module, ()):
            if state.get(target) == "open":
                cycles.append(path[path.index(target) :] + [target] if target in path else [module, target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles
