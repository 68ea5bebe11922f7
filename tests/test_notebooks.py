"""One pytest test per notebook, each run by nbdev's own runner (`nbdev_test --path NB`, default flags).

A failing cell fails the test named after its notebook, with nbdev's report of the cell in the message.
"""
import os, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "nbs").glob("*.ipynb"))


def test_there_are_notebooks():
    assert any(nb.name == "index.ipynb" for nb in NOTEBOOKS) and len(NOTEBOOKS) > 1


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook(nb):
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONWARNINGS="ignore")
    if os.environ.get("PYTEST_XDIST_WORKER"):      # notebooks run side by side: one thread each
        env.setdefault("OMP_NUM_THREADS", "1")
    nbdev_test = Path(sys.executable).with_name("nbdev_test")
    cmd = [str(nbdev_test) if nbdev_test.exists() else "nbdev_test", "--path", str(nb.relative_to(ROOT))]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"nbdev_test failed on {nb.name}:\n{(r.stdout + r.stderr)[-6000:]}"
