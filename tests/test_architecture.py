"""The module map of the README holds: every module of the package imports only modules before it in one order."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "influence_nb"
# data and engine -> curvature (core) -> solvers -> scoring -> studies -> CLI; retrain and metrics beside the engine
ORDER = ["core", "data", "models", "metrics", "retrain", "ggn", "solvers", "ihvp", "krylov", "scoring", "kfac", "choose",
         "distributed", "study", "iris", "small_mnist", "deep", "imagenet", "fragility", "cli"]


def package_imports(path: Path) -> set:
    "Modules of this package that `path` imports anywhere in its code (relative or absolute imports)."
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1: out.add(mod.split(".")[0] if mod else "")
            elif mod.startswith("influence_nb."): out.add(mod.split(".")[1])
            if node.level == 1 and not mod: out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("influence_nb."))
    return out - {""}


def test_every_module_is_placed_in_the_order():
    modules = {p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_")}
    assert modules <= set(ORDER), f"place new modules in ORDER (and the README's module map): {modules - set(ORDER)}"


def test_imports_flow_one_way():
    for i, name in enumerate(ORDER):
        if not (PKG / f"{name}.py").exists(): continue
        later = package_imports(PKG / f"{name}.py") & set(ORDER[i:])
        assert not later, f"influence_nb.{name} imports {sorted(later)}, which come after it (or itself) in {ORDER}"


def test_names_that_left_core_still_import_from_it_with_a_warning():
    import pytest
    import influence_nb.core as core
    from influence_nb import scoring, solvers
    with pytest.warns(DeprecationWarning, match="moved to influence_nb.scoring.Influence"):
        assert core.Influence is scoring.Influence
    with pytest.warns(DeprecationWarning, match="influence_nb.solvers"):
        from influence_nb.core import ExactSolver
    assert ExactSolver is solvers.ExactSolver
    with pytest.raises(AttributeError):
        getattr(core, "no_such_name")
