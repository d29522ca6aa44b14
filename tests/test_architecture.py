"""The one-way architecture (docs/architecture.md), checked by parsing every import of the library.

Layers, bottom to top; a module may import its own layer and the layers below, never above:

    core < data < policies < rewards < methods < train < pipelines < testing

No import cycles between files; imports of mmgrpo inside functions are not allowed (they hid cycles). The same check
runs from a shell: ``python -m pytest tests/test_architecture.py -q``.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["core", "data", "policies", "rewards", "methods", "train", "pipelines", "testing"]


def modules() -> dict[str, Path]:
    out = {}
    for p in sorted((ROOT / "mmgrpo").rglob("*.py")):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(mods: dict[str, Path]) -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported mmgrpo module, line, inside a function)]"""
    out: dict[str, list[tuple[str, int, bool]]] = defaultdict(list)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        inner = set()
        for f in ast.walk(tree):
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner.update(id(n) for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom)))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                if not t.startswith("mmgrpo"):
                    continue
                hit = _resolve(t, mods)
                if hit and hit != name:
                    out[name].append((hit, node.lineno, id(node) in inner))
    return out


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else 0


def test_imports_point_down_only():
    mods = modules()
    unknown = sorted({m.split(".")[1] for m in mods if "." in m and m.split(".")[1] not in LAYERS})
    assert not unknown, f"packages outside the layer list {LAYERS}: {unknown} (add them to docs/architecture.md too)"
    bad = [
        f"{src} (layer {LAYERS[layer(src)]}) imports {dst} (layer {LAYERS[layer(dst)]}) at line {line}"
        for src, deps in imports(mods).items()
        for dst, line, _ in deps
        if layer(dst) > layer(src)
    ]
    assert not bad, "imports that point up:\n" + "\n".join(bad)


def test_no_mmgrpo_imports_inside_functions():
    bad = [
        f"{src}:{line} imports {dst} inside a function"
        for src, deps in imports(modules()).items()
        for dst, line, inner in deps
        if inner
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles_between_files_or_packages():
    mods = modules()
    graph = {m: {d for d, _, _ in deps} for m, deps in imports(mods).items()}

    def cycles(g: dict[str, set[str]]) -> list[list[str]]:
        index, low, stack, on, found = {}, {}, [], set(), []

        def visit(v: str) -> None:
            index[v] = low[v] = len(index)
            stack.append(v)
            on.add(v)
            for w in g.get(v, ()):
                if w not in index:
                    visit(w)
                    low[v] = min(low[v], low[w])
                elif w in on:
                    low[v] = min(low[v], index[w])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))

        for v in list(g):
            if v not in index:
                visit(v)
        return found

    assert cycles(graph) == [], "file import cycles"
    pkg = defaultdict(set)
    for a, deps in graph.items():
        for b in deps:
            pa, pb = ".".join(a.split(".")[:2]), ".".join(b.split(".")[:2])
            if pa != pb:
                pkg[pa].add(pb)
    assert cycles(pkg) == [], "package import cycles"


def test_the_scripts_are_not_imported_by_the_library():
    bad = [
        f"{name} imports {node.module}"
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        and any(
            n.split(".")[0] == "scripts" for n in [getattr(node, "module", None) or ""] + [a.name for a in node.names]
        )
    ]
    assert bad == [], f"asset-making scripts are not part of the library: {bad}"


def test_the_wheel_installs_only_the_mmgrpo_namespace(tmp_path):
    """A user's own rewards/ or pipelines/ folder must never shadow ours: the wheel's only top-level name is mmgrpo."""
    src = tmp_path / "src"  # a copy, so the build leaves no build/ or egg-info in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("mmgrpo", "scripts"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    proc = subprocess.run([*cmd, str(src)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("mmgrpo-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"mmgrpo"}, top
    for pkg in ("mmgrpo/rewards/registry.py", "mmgrpo/pipelines/text_to_image.py", "mmgrpo/train/trainer.py"):
        assert pkg in names
    assert not any(n.startswith(("scripts/", "tests/")) for n in names)


def test_the_docs_name_only_files_that_exist():
    """docs/architecture.md's paper table is one hop from a paper to its code: every path it names must exist."""
    import re

    for doc in ("docs/architecture.md", "docs/extending.md", "docs/results.md", "README.md"):
        text = (ROOT / doc).read_text()
        paths = set(re.findall(r"`((?:mmgrpo|configs|bench|scripts|tests|docs|assets)/[\w./<>-]+)`", text))
        missing = [p for p in sorted(paths) if "<" not in p and not (ROOT / p).exists()]
        assert not missing, f"{doc} names missing paths: {missing}"
    table = (ROOT / "docs/architecture.md").read_text().split("<!-- paper-table -->")[1]
    for paper in (
        "PEARL",
        "TempSamp-R1",
        "ACRE",
        "MedLoc-R1",
        "MM-UPT",
        "DanceGRPO",
        "MixGRPO",
        "G²RPO",
        "DiffusionNFT",
    ):
        assert paper in table, paper
