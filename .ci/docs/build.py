#!/usr/bin/env python3
"""Build the documentation site into `_docs/`, offline, from the notebooks in `nbs/`.

    python .ci/docs/build.py                 # nbs/ -> _docs/
    python .ci/docs/build.py --serve         # build, then serve _docs/ on http://127.0.0.1:8000/ (search needs http)
    python .ci/docs/build.py --serve --no-build   # serve what was built last
    python .ci/docs/build.py --nbs DIR --out DIR   # other notebooks / output (used to test the pipeline)

Needs, once: `npm ci --prefix .ci/docs` (MathJax 3, copied into the site so equations render with no internet).

The API pages (show_doc) document the checkout being built: its root goes first on sys.path and PYTHONPATH (so the
processes nbdev spawns import it too), and the build stops if `influence_nb` would still come from another copy.

Steps (Quarto cannot be installed here, so this stands in for `nbdev_docs`):
1. nbdev's own processing, the same processors `nbdev_proc_nbs` runs (`nbdev.processors.FilterDefaults`, one spawned
   process per notebook as in `nbdev.serve.proc_nbs`), written to a temporary folder instead of `_proc/`:
   `#| hide` and `#| export` cells dropped, show_doc cells added and executed (the API reference), front matter
   (title, description, output-file) taken from each notebook's first markdown cell.
2. The part Quarto would do with what nbdev leaves: front matter -> a `# Title` + `> description` heading,
   `#| echo: false` -> input removed, `#| output: false` -> outputs removed, `#| include: false` -> cell removed, remaining
   `#|` lines stripped, links to notebooks and to the doc host rewritten to the site's own pages; widget state dropped.
3. mkdocs (material theme, mkdocs-jupyter, search) renders one page per notebook, index first, the others in file order,
   with navigation and search; `hooks.py` strips the CDN scripts nbconvert's templates carry; MathJax is served from
   `assets/mathjax/`. `_docs/build_info.json` lists the pages for the browser test.
"""
import argparse, html, json, os, re, shutil, subprocess, sys, tempfile, time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
MATHJAX = HERE / "node_modules" / "mathjax" / "es5"
# the parts of MathJax 3's es5 bundle the site loads: the TeX->CommonHTML component, its fonts, the TeX extensions it
# autoloads (\require, \color, ...), and the menu/accessibility modules a reader can switch on from the context menu.
MATHJAX_PARTS = ["tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "a11y", "ui", "sre"]
SKIP_STATIC = {".ipynb", ".yml", ".yaml", ".qmd", ".md", ".py", ".pyc"}


def log(*a): print("[docs]", *a, flush=True)


def use_checkout():
    "Make `import influence_nb` (here and in every process nbdev spawns) load this checkout's package; return its path."
    import importlib
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    lib = settings().get("lib_name", "influence_nb")
    for m in [m for m in sys.modules if m == lib or m.startswith(lib + ".")]: del sys.modules[m]
    mod = importlib.import_module(lib)
    path = Path(mod.__file__).resolve()
    if not path.is_relative_to(ROOT / lib):
        sys.exit(f"[docs] `import {lib}` loads {path}, not this checkout's {ROOT / lib}: the API pages would document "
                 "another copy. Install this checkout (`pip install -e .`) or remove the other copy.")
    return path.parent


def serve(site: Path, port: int):
    "Serve the built site on 127.0.0.1 (search and MathJax need http://, not file://) until Ctrl-C."
    import functools, http.server
    if not (site / "index.html").exists(): sys.exit(f"no site in {site}: build it first (python .ci/docs/build.py)")
    h = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    with http.server.ThreadingHTTPServer(("127.0.0.1", port), h) as srv:
        log(f"serving {site} on http://127.0.0.1:{srv.server_address[1]}/ (Ctrl-C stops)")
        try: srv.serve_forever()
        except KeyboardInterrupt: log("stopped")


# ---------------------------------------------------------------- 1. nbdev processing
def nbdev_process(nbs: Path, dst: Path, n_workers: int):
    "Run nbdev's docs processors over every file in `nbs` into `dst` (what `nbdev_proc_nbs` does into `_proc/`)."
    os.chdir(ROOT)  # nbdev finds settings.ini from the working directory
    from fastcore.parallel import parallel
    from nbdev.doclinks import nbglob
    from nbdev.serve import _proc_file
    import nbdev.serve_drv
    files = nbglob(nbs, func=Path, file_glob="", file_re="")
    jobs = [j for j in (_proc_file(f, cache=dst, path=nbs) for f in sorted(files)) if j]
    # spawn, as nbdev does outside a notebook: each notebook's show_doc cells run in a fresh interpreter
    parallel(nbdev.serve_drv.main, jobs, n_workers=n_workers, pause=0.01, method="spawn")
    return [j[0] for j in jobs]


_EXEC_DIRS = {"export", "exports", "exporti", "exec_doc"}


def mixed_cells(nbs: Path) -> list:
    """Cells that nbdev's `exec_show_docs` runs *whole* although they are not export cells: those with an import and
    other code (its "Found cells containing imports and other code" warning). The docs build then trains, solves and
    retrains whatever the cell does, replaces the cell's saved outputs by that run's (a tqdm bar frozen at 0%, stderr), and
    may fail on names from cells it skips. The fix is in the notebook: the imports in a cell of their own."""
    import ast
    from nbdev.doclinks import nbglob
    found = []
    for f in sorted(nbglob(nbs, func=Path, file_glob="*.ipynb", file_re="")):
        try: cells = json.loads(f.read_text(encoding="utf-8"))["cells"]
        except (OSError, ValueError, KeyError): continue
        # nbdev runs cells only in notebooks with docs (a module or a show_doc): not in index or a tutorial
        if not any(re.search(r"^#\|\s*default_exp\b|^show_doc\(", _src(c), re.M) for c in cells if c["cell_type"] == "code"):
            continue
        for i, c in enumerate(cells):
            src = _src(c)
            if c["cell_type"] != "code" or not src.strip() or "nbdev_export" + "()" in src: continue
            d, body = _directives(src)
            if d.keys() & _EXEC_DIRS or d.get("eval") == "false": continue
            try: tree = ast.parse("\n".join(ln for ln in body.splitlines() if not ln.lstrip().startswith(("%", "!"))))
            except SyntaxError: continue
            nodes = list(ast.walk(tree))
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and any(isinstance(n, (ast.Expr, ast.Assign))
                                                                                     for n in nodes):
                first = next(ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith(("import ", "from ")))
                found.append((f.relative_to(nbs.parent).as_posix() if f.is_relative_to(nbs.parent) else str(f), i, first))
    return found


# ---------------------------------------------------------------- 2. what Quarto would do with nbdev's output
_re_fm = re.compile(r"^\s*---\s*\n(.*?)\n---\s*$", re.S)


def _src(c): return "".join(c.get("source", "")) if isinstance(c.get("source"), list) else c.get("source", "")


def _directives(src):
    "Leading `#| key: value` lines of a cell, as a dict, and the source without them."
    d, body, lines = {}, [], src.splitlines()
    for i, l in enumerate(lines):
        m = re.match(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$", l)
        if m: d[m.group(1).lower()] = m.group(2).strip().strip("'\"").lower()
        elif l.strip() or body: body.append(l)
    return d, "\n".join(body).strip("\n")


_re_attr_link = re.compile(r'\[([^\]]+)\]\(([^)\s]+)\)\{((?:\s*[\w-]+="[^"]*")+)\s*\}')
_re_callout = re.compile(r'^:::+\s*\{\s*\.callout-(\w+)[^}]*\}\s*$(.*?)^:::+\s*$', re.M | re.S)
_re_main = re.compile(r"\b__main__\.(?=[A-Za-z_])")
_re_sh = re.compile(r"^```(?:sh|bash|shell|console)\n(.*?)\n```[ \t]*$", re.M | re.S)  # shell commands: wrapped, not scrolled
_ADMONITION = {"note": "note", "tip": "tip", "warning": "warning", "caution": "warning", "important": "danger"}


def quarto_md(s: str) -> str:
    "Pandoc/Quarto markdown that nbdev emits or authors use, in plain HTML: `[a](u){k=\"v\"}` links and callouts."
    s = _re_attr_link.sub(lambda m: f'<a href="{m.group(2)}" {m.group(3).strip()}>{m.group(1)}</a>', s)
    def callout(m):
        kind = m.group(1).lower()
        return (f'<div class="admonition {_ADMONITION.get(kind, "note")}">\n<p class="admonition-title">{kind.title()}</p>\n\n'
                f'{m.group(2).strip()}\n\n</div>')
    return _re_callout.sub(callout, s)


def _nb_page(nb_path: Path, fm: dict, nbs: Path):
    if nb_path.relative_to(nbs).with_suffix("").as_posix() == "index": return "index.html"
    of = fm.get("output-file")
    rel = nb_path.relative_to(nbs).parent
    return (rel / of).as_posix() if of else nb_path.relative_to(nbs).with_suffix(".html").as_posix()


_re_md_head = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def doc_anchors(nb: dict) -> set:
    "Anchors a page will have for show_doc entries: the headings in its markdown outputs, lower-cased as nbconvert does."
    res = set()
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            v = o.get("data", {}).get("text/markdown")
            if v: res |= {h.strip("`").lower() for h in _re_md_head.findall("".join(v) if isinstance(v, list) else v)}
    return res


def quarto_like(nb: dict, page_of: dict, doc_prefixes, title_fallback: str, anchors: dict | None = None):
    "Apply the Quarto-side conventions to one nbdev-processed notebook (in place); return (title, description)."
    anchors = {} if anchors is None else anchors
    cells, out, fm = nb["cells"], [], {}
    for c in cells:
        if c["cell_type"] == "raw" and not fm:
            m = _re_fm.match(_src(c))
            if m:
                import yaml
                fm = yaml.safe_load(m.group(1)) or {}
                continue
        out.append(c)
    title = str(fm.get("title") or title_fallback)
    desc = str(fm.get("description") or "").strip()

    def autolink(m):
        # nbdev links every `name` it indexes, private ones too; a name with no show_doc entry has no anchor: unlink
        page, frag = m.group(3), m.group(4)
        return m.group(0) if frag.lower() in anchors.get(page, set()) else f"`{m.group(1)}`"

    def relink(s: str) -> str:
        s = quarto_md(s)
        s = _re_sh.sub(lambda m: f'<pre class="shell"><code>{html.escape(m.group(1))}</code></pre>', s)
        for p in doc_prefixes:
            s = re.sub(r"\[`([^`\]]+)`\]\((" + re.escape(p) + r")([^)#\s]+)#([^)\s]+)\)", autolink, s)
        for p in doc_prefixes: s = s.replace(p, "")  # nbdev doc links point at doc_host/doc_baseurl: keep them local
        def nblink(m):
            tgt = m.group(2)
            return m.group(1) + page_of.get(Path(tgt).name, tgt) + (m.group(3) or "")
        s = re.sub(r"(\]\(|href=[\"'])([^)\s\"'#]+\.ipynb)(#[^)\s\"']*)?", nblink, s)
        s = re.sub(r"\]\((?:\.\./)?bench/README\.md\)", "](benchmarks.html)", s)  # the benchmarks page (bench_page)
        return s

    cells = []
    head = f"# {title}" + (f"\n\n> {desc}" if desc else "")
    cells.append({"cell_type": "markdown", "id": "nbdev-title", "metadata": {}, "source": head})
    for c in out:
        src = _src(c)
        if c["cell_type"] == "markdown":
            if not src.strip(): continue
            c["source"] = relink(src)
            cells.append(c); continue
        if c["cell_type"] != "code": continue
        d, body = _directives(src)
        if d.get("include") == "false": continue
        tags = set(c.get("metadata", {}).get("tags", []))
        if d.get("echo") == "false" or not body.strip(): tags.add("remove_input")
        if d.get("output") == "false": c["outputs"] = []
        c["source"] = body
        for o in c.get("outputs", []):
            for k in ("text/markdown", "text/html"):
                v = o.get("data", {}).get(k)
                if v is None: continue
                # nbdev runs a notebook's cells in `__main__`: a class defined there shows as `__main__.Name` in show_doc
                # signatures (a `Name | None` annotation is printed with its module); the reader knows it as `Name`
                o["data"][k] = relink(_re_main.sub("", "".join(v) if isinstance(v, list) else v))
        if "remove_input" in tags and not c.get("outputs"): continue
        c.setdefault("metadata", {})["tags"] = sorted(tags)
        cells.append(c)
    nb["cells"] = cells
    nb.get("metadata", {}).pop("widgets", None)  # widget state would pull the widget manager from a CDN
    return title, desc


def description_cut(nb_path: Path):
    "The text nbdev drops from a notebook's description: it reads only the first `> ` line of the first markdown cell."
    try: cells = json.loads(nb_path.read_text(encoding="utf-8"))["cells"]
    except (OSError, ValueError, KeyError): return None
    md = next((c for c in cells if c["cell_type"] == "markdown"), None)
    quoted = [ln[1:].strip() for ln in _src(md).splitlines() if ln.startswith(">")] if md else []
    return " ".join(quoted[1:]) or None


BENCH_DESC = ("Speed, memory and quality against pyDVL, captum and kronfluence: the latest figure of each benchmark in "
              "bench/, what it compares, and how to run it.")


def bench_page(docs: Path, nbs: Path):
    "The benchmarks page: bench/README.md up to its dated log (the current summary, how to run), as a markdown page."
    src = ROOT / "bench" / "README.md"
    if not src.exists(): return None
    text = src.read_text(encoding="utf-8")
    cut = text.find("\n## History")
    body = re.sub(r"\A#\s+[^\n]*\n", "", text[:cut] if cut > 0 else text)
    note = ("\n\n---\n\nThis page is `bench/README.md` of the repository without its dated log of every measurement, "
            "which stays in that file. The tables are pasted there from each script's output.\n")
    (docs / "benchmarks.md").write_text(f"# Benchmarks\n\n> {BENCH_DESC}\n\n{body.strip()}{note}", encoding="utf-8")
    return {"notebook": "bench/README.md", "page": "benchmarks.html", "title": "Benchmarks", "description": BENCH_DESC,
            "description_cut": None, "source": "benchmarks.md"}


# ---------------------------------------------------------------- 3. mkdocs
def settings():
    import configparser
    cp = configparser.ConfigParser(); cp.read(ROOT / "settings.ini")
    return cp["DEFAULT"]


def copy_mathjax(dst: Path):
    if not (MATHJAX / "tex-chtml.js").exists():
        sys.exit(f"MathJax not found in {MATHJAX}: run `npm ci --prefix .ci/docs` once (it needs the npm registry).")
    for part in MATHJAX_PARTS:
        s, d = MATHJAX / part, dst / part
        d.parent.mkdir(parents=True, exist_ok=True)
        if s.is_dir(): shutil.copytree(s, d)
        elif s.exists(): shutil.copy2(s, d)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nbs", default=None, help="notebook folder (default: nbs_path from settings.ini)")
    ap.add_argument("--out", default=None, help="site folder (default: doc_path from settings.ini, i.e. _docs)")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (processed notebooks, mkdocs.yml)")
    ap.add_argument("--serve", action="store_true", help="after building, serve the site on http://127.0.0.1:PORT/")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--no-build", action="store_true", help="with --serve: serve the site as last built")
    ap.add_argument("--strict", action="store_true", help="fail on notebook cells that mix imports with other code")
    a = ap.parse_args()
    t0 = time.time()
    cfg = settings()
    nbs = Path(a.nbs or ROOT / cfg.get("nbs_path", "nbs")).resolve()
    out = Path(a.out or ROOT / cfg.get("doc_path", "_docs")).resolve()
    if not a.no_build: build(a, cfg, nbs, out, t0)
    if a.serve: serve(out, a.port)


def build(a, cfg, nbs: Path, out: Path, t0: float):
    lib = use_checkout()
    log(f"API pages from {lib}")
    mixed = mixed_cells(nbs)
    for nb, i, first in mixed:
        log(f"{nb} cell {i}: imports mixed with other code ({first.strip()[:60]!r}): nbdev runs the whole cell to render "
            "the API pages; put the imports in a cell of their own")
    if mixed and a.strict: sys.exit(f"[docs] {len(mixed)} cells mix imports with other code (--strict)")
    # reported above, one line each at their cause, in place of nbdev's own warning (the cell's whole source, per cell)
    if mixed: os.environ["PYTHONWARNINGS"] = "ignore:Found cells containing imports and other code:UserWarning"
    tmp = Path(tempfile.mkdtemp(prefix="influence_nb_docs_"))
    proc, docs = tmp / "proc", tmp / "docs"
    try:
        log(f"nbdev processing {nbs} ({a.workers} workers)")
        try: nbdev_process(nbs, proc, a.workers)
        except Exception as e:
            remote = str(e.__cause__ or "")
            causes = re.findall(r"^(\w+(?:Error|Exception): .*)$", remote, re.M)
            sys.exit(f"\n[docs] nbdev's docs processing failed (nbdev_proc_nbs/nbdev_docs would fail the same way):\n{e}\n"
                     f"[docs] cause: {causes[0] if causes else type(e).__name__}\n[docs] nbdev executes, to render show_doc, "
                     "every export cell, every show_doc cell and every cell with an import; a cell that imports *and* uses "
                     "names from unexecuted cells fails here: put the import in a cell of its own (nbdev FAQ).")
        t1 = time.time()
        nb_files = sorted(proc.rglob("*.ipynb"), key=lambda p: (p.relative_to(proc).as_posix() != "index.ipynb",
                                                                    p.relative_to(proc).as_posix()))
        if not nb_files: sys.exit(f"no notebooks found in {nbs}")
        # pass 1: page names (need every notebook's front matter before rewriting links)
        loaded, page_of = [], {}
        for p in nb_files:
            nb = json.loads(p.read_text(encoding="utf-8"))
            fm = {}
            for c in nb["cells"]:
                if c["cell_type"] == "raw":
                    m = _re_fm.match(_src(c))
                    if m:
                        import yaml; fm = yaml.safe_load(m.group(1)) or {}
                    break
            page = _nb_page(p, fm, proc)
            if page in page_of.values(): page = p.relative_to(proc).with_suffix(".html").as_posix()
            page_of[p.name] = page
            loaded.append((p, nb, page))
        host = cfg.get("doc_host", "").rstrip("/"); base = cfg.get("doc_baseurl", "").strip("/")
        prefixes = [f"{host}/{base}/" if base else f"{host}/"] if host else []
        anchors = {page: doc_anchors(nb) for p, nb, page in loaded}
        pages, nav = [], []
        for p, nb, page in loaded:
            title, desc = quarto_like(nb, page_of, prefixes, p.stem, anchors)
            target = docs / Path(page).with_suffix(".ipynb")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(nb, indent=1, ensure_ascii=False), encoding="utf-8")
            nb_path = nbs / p.relative_to(proc)
            src_nb = nb_path.relative_to(ROOT).as_posix() if nb_path.is_relative_to(ROOT) else str(nb_path)
            pages.append({"notebook": src_nb, "page": page, "title": title, "description": desc,
                          "description_cut": description_cut(nb_path)})
            nav.append({title: Path(page).with_suffix(".ipynb").as_posix()})
        from nbdev.doclinks import nbglob
        for f in nbglob(nbs, func=Path, file_glob="", file_re=""):  # figures and other files the notebooks link to
            if f.is_file() and f.suffix and f.suffix.lower() not in SKIP_STATIC:
                d = docs / f.relative_to(nbs); d.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, d)
        bench = bench_page(docs, nbs)
        if bench:
            pages.append(bench); nav.append({bench["title"]: bench["source"]})
        shutil.copytree(HERE / "assets", docs / "assets", dirs_exist_ok=True)
        copy_mathjax(docs / "assets" / "mathjax")

        import yaml
        mk = yaml.safe_load((HERE / "mkdocs.yml").read_text())
        mk.update(site_name=cfg.get("title", cfg.get("lib_name")), site_description=cfg.get("description", ""),
                  copyright=f"Copyright {cfg.get('copyright', '')}".strip(), docs_dir=str(docs), site_dir=str(out),
                  nav=nav, hooks=[str(HERE / "hooks.py")])
        mk.setdefault("extra", {})["nb_descriptions"] = {x.get("source") or Path(x["page"]).with_suffix(".ipynb").as_posix():
                                                         x["description"] for x in pages}
        for pl in mk["plugins"]:
            if isinstance(pl, dict) and "mkdocs-jupyter" in pl: pl["mkdocs-jupyter"]["cache_dir"] = str(tmp / "cache")
        (tmp / "mkdocs.yml").write_text(yaml.safe_dump(mk, sort_keys=False, allow_unicode=True))
        log(f"mkdocs build: {len(pages)} pages -> {out}")
        env = dict(os.environ, NO_MKDOCS_2_WARNING="1")   # mkdocs prints no warnings of its own here: none hidden
        r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--clean", "-q", "-f", str(tmp / "mkdocs.yml")],
                           cwd=tmp, env=env)
        if r.returncode: sys.exit(f"mkdocs build failed ({r.returncode})")
        t2 = time.time()
        info = {"pages": pages, "package": str(lib),
                "seconds": {"nbdev": round(t1 - t0, 1), "mkdocs": round(t2 - t1, 1), "total": round(t2 - t0, 1)}}
        (out / "build_info.json").write_text(json.dumps(info, indent=1))
        for x in pages: log(f"  {x['notebook']:32} -> {x['page']:24} {x['title']}")
        log(f"built {out} in {t2 - t0:.0f} s (nbdev {t1 - t0:.0f} s, mkdocs {t2 - t1:.0f} s)")
    finally:
        if a.keep: log(f"kept {tmp}")
        else: shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
