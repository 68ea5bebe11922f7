#!/usr/bin/env python3
"""Re-run notebooks in place so that their committed outputs are current: `python .ci/refresh_outputs.py nbs/04_iris.ipynb ...`

Cells flagged with nbdev's test flags (`#| slow`, `#| notest`, `#| gpu`) and `#| eval: false` are not run: they keep the
outputs they have (say in the commit which preset those came from). Each notebook runs in a fresh kernel from `nbs/`, as
nbdev_test runs it; then `nbdev_clean` normalises it. The script fails, and writes nothing, if a cell raises, and it lists
every output that is stderr or shows a warning or a local path, which a committed notebook must not carry.
`--slow` runs the `#| slow` cells too (minutes to hours: the preset they use is named in the notebook).
"""
import os, re, subprocess, sys
from pathlib import Path

from execnb.nbio import read_nb, write_nb
from execnb.shell import CaptureShell

ROOT = Path(__file__).resolve().parent.parent
SKIP = re.compile(r"^\s*#\|\s*(slow|notest|gpu|eval:\s*false)\b", re.M)
BAD = re.compile(r"(Warning:|/work/|/home/|/tmp/|/root/)")


SKIP_FAST = re.compile(r"^\s*#\|\s*(notest|gpu|eval:\s*false)\b", re.M)


def refresh(path: Path, slow: bool = False) -> list:
    "Run `path`'s cells (skipping flagged ones) and write it back; return the (cell, line) pairs of bad outputs."
    nb = read_nb(path)
    os.chdir(path.parent)
    shell = CaptureShell(path)
    def skip(c):
        "Skip a flagged cell (its outputs stay); clear the outputs of every cell that runs, so that none go stale."
        if c.cell_type != "code" or (SKIP_FAST if slow else SKIP).search(c.source): return True
        c.outputs = []
        return False
    shell.run_all(nb, exc_stop=True, preproc=skip)
    bad = []
    for i, c in enumerate(nb.cells):
        for o in c.get("outputs", []):
            if o.get("name") == "stderr" or o.get("output_type") == "error":   # a reader should see neither
                bad.append((i, f"{o.get('name') or o.get('output_type')}: " + "".join(o.get("text", ""))[:100]))
                continue
            text = "".join(o.get("text", "")) + "".join(str(v) for k, v in o.get("data", {}).items() if k == "text/plain")
            bad += [(i, line) for line in text.splitlines() if BAD.search(line)]
    write_nb(nb, path)
    return bad


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    problems = 0
    slow = "--slow" in sys.argv[1:]
    for p in (a for a in sys.argv[1:] if a != "--slow"):
        path = (ROOT / p).resolve() if not Path(p).is_absolute() else Path(p)
        bad = refresh(path, slow)
        subprocess.run([Path(sys.executable).with_name("nbdev_clean"), "--fname", str(path)], cwd=ROOT, check=True)
        print(f"{path.name}: refreshed; {len(bad)} outputs on stderr or lines with a warning or a local path")
        for i, line in bad: print(f"   cell {i}: {line[:150]}")
        problems += len(bad)
    sys.exit(1 if problems else 0)
