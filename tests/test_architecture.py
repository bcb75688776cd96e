"""The package's imports run one way, down the layers that docs/architecture.md lists."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "maskrcnn"

# Room (top-level module or subpackage) -> layer; a higher number is a higher layer.
LAYERS = {
    "errors": -1,
    "cli": 0, "config": 0, "structures": 0, "rle": 0, "fileio": 0, "distributed": 0, "precision": 0,
    "modeling": 1, "data": 1,
    "inference": 2, "convert": 2, "reference": 2, "tiling": 2,
    "predictor": 3, "engine": 3, "evaluation": 3, "visualize": 3, "deploy": 3,
    "diagnostics": 4, "video": 4, "batch": 4, "active": 4,
}
# Same-layer imports that docs/architecture.md allows.
SIDEWAYS = {("engine", "evaluation"), ("reference", "convert"), ("structures", "rle")}


def room_imports():
    """Yield (file, line, importing room, imported room) for every import between rooms of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if len(parts) < 2:
            continue
        room = parts[1]
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = list(parts[: len(parts) - node.level + is_package])
                    target = base + (node.module.split(".") if node.module else [])
                    targets = [target + [alias.name] for alias in node.names] if not node.module else [target]
                else:
                    targets = [(node.module or "").split(".")]
            elif isinstance(node, ast.Import):
                targets = [alias.name.split(".") for alias in node.names]
            else:
                continue
            for target in targets:
                if target[0] == "maskrcnn" and len(target) > 1 and target[1] != room:
                    yield path.relative_to(PACKAGE.parent), node.lineno, room, target[1]


def test_every_room_has_a_layer():
    rooms = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" and p.stem != "__init__") or (p.is_dir() and (p / "__init__.py").exists())}
    assert rooms == set(LAYERS), "a new room needs a layer here and a line in docs/architecture.md"


def test_architecture_page_lists_every_room():
    """docs/architecture.md has a line for each room of the layer table: `name.py` or `name/`."""
    page = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)(?:\.py|/)` \|", page, flags=re.M))
    assert set(LAYERS) <= listed, f"rooms without a line in docs/architecture.md: {sorted(set(LAYERS) - listed)}"


def test_imports_run_down_the_layers():
    upward = [f"{path}:{line}: {room} imports {target}" for path, line, room, target in room_imports()
              if LAYERS[target] > LAYERS[room]
              or (LAYERS[target] == LAYERS[room] and (room, target) not in SIDEWAYS)]
    assert not upward, "imports that run up or sideways:\n" + "\n".join(upward)


def test_the_package_never_imports_the_tools_or_benchmarks():
    """``tools/`` and ``benchmarks/`` are not installed: an installed package that imported them would break."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            found += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name}" for name in names
                      if name.split(".")[0] in ("tools", "benchmarks")]
    assert not found, "the package imports what is not installed:\n" + "\n".join(found)


def test_every_tool_and_benchmark_script_runs_through_cli_run():
    """A script's errors a user can fix come out as one line (``maskrcnn.cli.run``), never a traceback."""
    scripts = [p for folder in ("tools", "benchmarks") for p in sorted((PACKAGE.parent / folder).glob("*.py"))
               if 'if __name__ == "__main__":' in p.read_text()]
    assert len(scripts) >= 10
    bypass = [str(p.relative_to(PACKAGE.parent)) for p in scripts
              if not p.read_text().rstrip().endswith('if __name__ == "__main__":\n    run(main)')]
    assert not bypass, f"scripts that bypass maskrcnn.cli.run: {bypass}"
