"""The package's shape: no import cycle between its modules (module-level imports), and method files
stay small enough to read (the redesign's limits)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("compress", "calibration")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, known: set[str]) -> set[str]:
    """Modules of the package imported at module level (imports inside functions are deliberate laziness)."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def test_no_import_cycle_inside_the_package():
    files = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    known = set(files)
    graph = {name: _top_level_imports(path, known) - {name} for name, path in files.items()}
    # a package's __init__ importing its own submodules is not a cycle for Python; drop parent -> child edges
    graph = {name: {dep for dep in deps if not dep.startswith(name + ".")} for name, deps in graph.items()}
    visiting, done, cycles = set(), set(), []

    def visit(name, trail):
        if name in done:
            return
        if name in visiting:
            cycles.append(trail[trail.index(name):] + [name])
            return
        visiting.add(name)
        for dep in sorted(graph[name]):
            visit(dep, trail + [name])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_method_files_stay_small():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (ROOT / "compress" / "methods").glob("*.py")}
    assert max(sizes.values()) <= 300, sizes


def test_the_guides_toy_method_is_one_file(tmp_path, tiny_recipe):
    """The guide's 'adding a method' example, saved as one file in compress/methods/, runs a recipe."""
    import re
    import subprocess
    import sys

    guide = (ROOT / "docs" / "guide.md").read_text()
    section = guide[guide.index("**Adding a method**"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    target = ROOT / "compress" / "methods" / "random.py"
    assert not target.exists()
    recipe = tmp_path / "random.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump({**tiny_recipe, "stages": [{"method": "random", "sparsity": 0.5}]}))
    script = ("import json, compress; r = compress.run(%r, progress=False, log=lambda _: None); "
              "print(json.dumps(r['sparsity']))" % str(recipe))
    try:
        target.write_text(code)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    finally:
        target.unlink()
    assert result.returncode == 0, result.stderr[-2000:]
    import json

    sparsity = json.loads(result.stdout.strip().splitlines()[-1])
    assert abs(sparsity["zero_fraction_decoder_linear"] - 0.5) < 0.01
