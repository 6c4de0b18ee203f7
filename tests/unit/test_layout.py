"""The house rules a reader relies on: dependencies point one way, and modules stay small."""
from __future__ import annotations

import ast
import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
LOWER = ("rollout", "rewards", "checkpoint_engine")
SHARED = "rl.sample"  # the only module of rl that the lower packages may import


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """Every module `path` imports, anywhere in the file (function-level imports too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _python_files(*packages: str) -> list[pathlib.Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


@pytest.mark.parametrize("package", LOWER)
def test_lower_packages_import_only_rl_sample_from_rl(package):
    bad = [f"{path.relative_to(ROOT)}:{line}: {name}" for path in _python_files(package)
           for line, name in _imports(path)
           if (name == "rl" or name.startswith("rl.")) and name not in ("rl", SHARED) and not name.startswith(SHARED + ".")]
    # `from rl import sample` reads as ("rl", "rl.sample"): the bare package name alone is harmless
    assert not bad, "lower packages may import only rl.sample from rl:\n" + "\n".join(bad)


def test_the_import_check_catches_a_reach_into_rl(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from rl.sample import Sample\n\ndef f():\n    from rl.trainer.engine import TrainingEngine\n")
    names = [name for _, name in _imports(probe)]
    assert "rl.trainer.engine" in names and "rl.sample" in names


def test_no_module_over_500_lines():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in _python_files("rl", "rollout", "rewards", "checkpoint_engine",
                                                                  "benchmarks", "tests")
            if (n := len(p.read_text().splitlines())) > 500]
    assert not long, "files over 500 lines:\n" + "\n".join(long)


def test_no_class_over_250_lines():
    long = []
    for path in _python_files("rl", "rollout", "rewards", "checkpoint_engine"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > 250:
                long.append(f"{path.relative_to(ROOT)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, "classes over 250 lines:\n" + "\n".join(long)


def test_nothing_points_outside_the_clone():
    """Docs and code cite the project's own docs/ (docs/kimi-methods.md for the Kimi formulas), never
    the research folder beside the development checkout, which a user's clone does not have. The
    needles are assembled from parts, so this file does not name that folder itself."""
    needles = ("/".join(("..", "shared", "")), "-".join(("kimi", "rl", "spec")))
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [ROOT / name for name in tracked.split() if (ROOT / name).is_file()]
    bad = [f"{p.relative_to(ROOT)}" for p in files if any(n in p.read_text(errors="ignore") for n in needles)]
    assert not bad, "references to a folder outside the project:\n" + "\n".join(bad)
