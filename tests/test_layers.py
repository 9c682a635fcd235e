"""The layers import one way only: a module may import its own package and the layers below it."""

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

# lowest first; packages on one rank may not import each other
LAYERS = [
    {"engine", "engine.errors", "engine.paths"},
    {"engine.model"},
    {"engine.generate"},
    {"backends", "engine.results"},
    {"engine.measure"},
    {"engine.sweep", "engine.analysis", "engine.serve"},
    {"engine.cli"},
    {"engine.__main__"},
]


def layer_of(module: str) -> tuple[int, str]:
    best = None
    for rank, packages in enumerate(LAYERS):
        for pkg in packages:
            if (module == pkg or module.startswith(pkg + ".")) and (best is None or len(pkg) > len(best[1])):
                best = (rank, pkg)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def imports(path: Path) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return [(m, line) for m, line in found if m.split(".")[0] in ("engine", "backends")]


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        out.append((".".join(parts[:-1] if parts[-1] == "__init__" else parts), path))
    return out


def back_edges() -> list[str]:
    bad = []
    for name, path in modules():
        rank, pkg = layer_of(name)
        for target, line in imports(path):
            t_rank, t_pkg = layer_of(target)
            if t_pkg != pkg and t_rank >= rank:
                bad.append(f"{path.relative_to(SRC)}:{line} {name} ({pkg}) imports {target} ({t_pkg})")
    return bad


def test_no_back_edges():
    assert back_edges() == []


def test_backends_see_only_model_and_generate():
    allowed = ("engine.model", "engine.generate", "engine.errors", "backends")
    bad = [f"{path.relative_to(SRC)}:{line} {target}" for name, path in modules() if name.startswith("backends")
           for target, line in imports(path) if not target.startswith(allowed)]
    assert bad == []


def test_the_check_sees_a_back_edge(tmp_path, monkeypatch):
    """A model module importing the CLI is reported, so the tests above can fail."""
    fake = tmp_path / "engine" / "model"
    fake.mkdir(parents=True)
    (fake / "bad.py").write_text("from engine.cli.main import main\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert any("engine.model.bad" in e and "engine.cli" in e for e in back_edges())


def test_every_module_is_small():
    assert [str(p) for _, p in modules() if len(p.read_text().splitlines()) > 400] == []
