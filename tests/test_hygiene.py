"""The notebooks are the source: exporting them reproduces influence_nb/ exactly, they are clean, and README.md is
current."""
import shutil, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _copy(tmp_path):
    "A copy of the sources (not .git, .venv or outputs) to run nbdev's commands on without touching the checkout."
    dst = tmp_path / "repo"
    skip = (".git", ".venv", ".venv-*", "runs", "_docs", "_proc", "node_modules", "__pycache__", "*.egg-info", ".hypothesis",
            ".pytest_cache")
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(*skip))
    return dst


def _snapshot(root):
    return {p.relative_to(root): p.read_bytes() for d in ("nbs", "influence_nb") for p in sorted((root / d).rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.mark.parametrize("command", ["nbdev_clean", "nbdev_export"])
def test_nbdev_command_changes_nothing(tmp_path, command):
    repo = _copy(tmp_path)
    before = _snapshot(repo)
    exe = Path(sys.executable).with_name(command)
    subprocess.run([str(exe) if exe.exists() else command], cwd=repo, check=True, capture_output=True)
    after = _snapshot(repo)
    changed = sorted(str(k) for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, (f"`{command}` changed {changed}: " + ("a notebook is not clean, run nbdev_clean"
                         if command == "nbdev_clean" else "influence_nb/ differs from the notebooks: edit the notebook "
                         "and run nbdev_export, never the .py by hand"))


def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, str(ROOT / ".ci" / "make_readme.py"), "--check"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr + r.stdout
