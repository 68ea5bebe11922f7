#!/usr/bin/env python3
"""Regenerate README.md from nbs/index.ipynb offline (nbdev_readme needs Quarto, which is not installable here).

Usage:  python .ci/make_readme.py          # write README.md
        python .ci/make_readme.py --check  # exit 1 if README.md is stale
Markdown cells are copied, code cells become ```python blocks followed by their text outputs;
cells marked `#| hide` are skipped and `#|` directive lines are dropped.
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NB, README = ROOT / "nbs" / "index.ipynb", ROOT / "README.md"
HEADER = "<!-- Generated from nbs/index.ipynb by `python .ci/make_readme.py`; edit the notebook, not this file. -->\n\n"


def _src(cell):
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


def _directives(src):
    return [l[3:].strip() for l in src.splitlines() if l.startswith("#|")]


def _outputs(cell):
    out = []
    for o in cell.get("outputs", []):
        if o["output_type"] == "stream" and o.get("name") == "stdout":
            out.append("".join(o["text"]))
        elif o["output_type"] in ("execute_result", "display_data") and "text/plain" in o.get("data", {}):
            if "image/png" in o["data"]:
                continue
            out.append("".join(o["data"]["text/plain"]) + "\n")
    return "".join(out).rstrip("\n")


def render(nb_path=NB):
    """Return the README text rendered from the index notebook."""
    cells = json.loads(Path(nb_path).read_text(encoding="utf-8"))["cells"]
    parts = []
    for c in cells:
        src = _src(c)
        d = _directives(src)
        if any(x.startswith(("hide", "include: false", "echo: false")) for x in d):
            continue
        if c["cell_type"] == "markdown":
            parts.append(src.strip())
        elif c["cell_type"] == "code":
            code = "\n".join(l for l in src.splitlines() if not l.startswith("#|")).strip()
            if code:
                parts.append(f"```python\n{code}\n```")
            out = _outputs(c)
            if out:
                parts.append(f"```\n{out}\n```")
    return HEADER + "\n\n".join(parts) + "\n"


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv[1:]:
        if README.read_text(encoding="utf-8") != text:
            sys.exit("README.md is stale: it differs from nbs/index.ipynb. Run `python .ci/make_readme.py` and commit.")
        print("README.md is up to date with nbs/index.ipynb")
    else:
        README.write_text(text, encoding="utf-8")
        print(f"wrote {README.relative_to(ROOT)}")
