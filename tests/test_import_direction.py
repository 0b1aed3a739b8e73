"""Imports between pcjax's packages run one way: nn and data at the bottom, configs on them,
training on configs, accelerators and analysis on training; the command line (`pcjax.cli`) on
top."""

import ast
import pathlib

import pcjax

ROOT = pathlib.Path(pcjax.__file__).parent
# Package (or top-level module) -> what of pcjax its modules may import, besides themselves.
ALLOWED = {
    "nn": (),
    "data": (),
    "configs": ("nn", "data"),
    "training": ("configs", "nn", "data"),
    "accelerators": ("training", "configs", "nn", "data"),
    "analysis": ("nn", "training.checkpoint"),  # restored variables through the public reader
    "cli": ("training", "configs", "nn", "data", "accelerators"),
}


def _pcjax_imports(path: pathlib.Path) -> set[str]:
    """The dotted names below `pcjax.` that a source file imports, at any depth of the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "pcjax":
                names |= {a.name for a in node.names}
            elif node.module.startswith("pcjax."):
                names |= {f"{node.module[6:]}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name[6:] for a in node.names if a.name.startswith("pcjax.")}
    return names


def _allowed(name: str, own: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in (own, *ALLOWED[own]))


def test_every_package_has_a_rule():
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in ROOT.glob("*.py")} - {"__init__"}
    assert packages | modules == set(ALLOWED)


def test_imports_run_one_way():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        if own == "__init__":
            continue
        names = _pcjax_imports(path)
        bad += [f"pcjax/{rel} imports pcjax.{n}" for n in names if not _allowed(n, own)]
    assert not bad, "\n".join(bad)


def test_the_rule_sees_every_import_form(tmp_path):
    """The checker is not vacuous: each import form it must see is seen."""
    src = tmp_path / "m.py"
    src.write_text(
        "import pcjax.training.loop\n"
        "from pcjax import analysis\n"
        "def f():\n    from pcjax.accelerators import targets\n"
    )
    assert _pcjax_imports(src) == {"training.loop", "analysis", "accelerators.targets"}
    assert not _allowed("training.loop", "nn") and _allowed("training.checkpoint", "analysis")
    assert not _allowed("training.launch", "analysis")
