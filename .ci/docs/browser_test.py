#!/usr/bin/env python3
"""Open every page of the built site (`_docs/`) in headless Chromium, as a reader would, and check it.

    python .ci/docs/browser_test.py                  # after `python .ci/docs/build.py`
    python .ci/docs/browser_test.py --site DIR --out DIR --modules none

The site is served over HTTP on 127.0.0.1 only, and Chromium resolves no other host (--host-resolver-rules), so a page
that needs the internet fails here as it would on an offline machine. It first checks its prerequisites (chromium,
chromedriver of the same major version, selenium, the built site) and says how to install what is missing. For every
page, at the width a reader's laptop shows (1280 px), it asserts:
  - no console errors, and no request to any host but 127.0.0.1 (data: URIs are fine);
  - equations rendered: no raw `$...$`, `$$`, `\\(`, `\\frac` or other TeX left in the visible text, no MathJax error
    boxes, and no displayed equation wider than its column (it would be clipped or need a scroll bar);
  - code as a reader sees it: no code cell that scrolls sideways or is clipped, no printed text table whose rows
    wrap (columns aligned with spaces: show a markdown or HTML table instead), no stderr output, no warning, no
    traceback, no absolute local path (/work, /tmp, /home, /root), no `__main__.Name`, no progress bar frozen short of
    100% (a tqdm widget whose state is not in the page);
  - figures legible: a matplotlib figure scaled into the column must keep its text at least MIN_TEXT_PX pixels high
    (the figure's dpi is read from the PNG; a 1x4 row of panels squeezed to the column fails, a 2x2 grid passes);
  - every h1/h2 heading is in the page's table of contents (one `# Title` per page, the rest `##` and below);
  - every internal link resolves (the page exists and so does its #anchor), every image loads;
  - the title and one-line description from the notebook's first cell (not cut off: nbdev reads one `> ` line), and
    the navigation listing every page in order.
Each failure names the page and the element (the equation's TeX, the code's longest line, the heading above a figure).
Site-wide: search finds a page by a word of its title; the API reference lists every public function and class of each
module (the names in its `__all__` defined by `def`/`class`) on the page of the notebook that exports it.
Screenshots go to OUT/screens/ (default .ci/docs/out/, git-ignored): the top of every page (NAME.png) and the whole page,
full height, in tiles of at most 8000 px (NAME_full.png, NAME_full_2.png, ...). `--pages a.html,b.html` checks some
pages only (quicker while fixing them).
Needs Debian chromium + chromium-driver (`sudo apt-get install chromium chromium-driver`) and selenium (the dev extra).
"""
import argparse, ast, functools, http.server, json, re, shutil, sys, tempfile, threading, time, urllib.error, urllib.request
from pathlib import Path
from urllib.parse import urldefrag, urlparse, unquote

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

TEX = (r"\$\$[\s\S]+?\$\$|\$[^$\s][^$]*?\$|\\\(|\\\[|\\(?:frac|dfrac|tfrac|sum|prod|int|nabla|partial|mathcal|mathbf|mathrm|"
       r"operatorname|begin|end|left|right|top|approx|varepsilon|epsilon|lambda|delta|theta|alpha|beta|sigma|cdot|"
       r"ldots|dots|leq|geq|arg|mathbb|hat|tilde|sqrt)\b")

PAGE_JS = r"""
const done = arguments[arguments.length - 1];
const TEX = new RegExp(arguments[0]);
const LOCAL = /(^|[\s'"(=:,\[])\/(work|tmp|home|root)\/[^\s'")]*/;
const t0 = Date.now();
function collect() {
  const art = document.querySelector('article') || document.body;
  const heads_all = [...art.querySelectorAll('h1, h2, h3, h4')];
  // where an element is, for the failure messages: the heading above it
  function where(el) {
    let h = null;
    for (const x of heads_all) { if (x.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING) h = x; else break; }
    return h ? `under "${h.textContent.replace(/¶/g, '').trim().slice(0, 60)}"` : 'at the top';
  }
  const SKIP = 'pre, code, script, style, textarea, noscript, mjx-container, .highlight, .highlight-ipynb, .md-search';
  const groups = new Map();
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let n;
  while ((n = walker.nextNode())) {
    const el = n.parentElement;
    if (!el || el.closest(SKIP) || !el.getClientRects().length) continue;   // skip code and what is not displayed
    const block = el.closest('p, li, td, th, h1, h2, h3, h4, h5, h6, blockquote, dd, dt, figcaption, div') || document.body;
    groups.set(block, (groups.get(block) || '') + n.textContent);
  }
  const raw_tex = [];
  for (const [b, t] of groups) {
    const m = t.match(TEX);
    if (m) raw_tex.push(where(b) + ': ...' + t.slice(Math.max(0, m.index - 50), m.index + 70).replace(/\s+/g, ' ') + '...');
  }
  // displayed equations wider than their column
  const items = (MathJax.startup.document && MathJax.startup.document.math) ? [...MathJax.startup.document.math] : [];
  const wide_math = [];
  for (const c of art.querySelectorAll('mjx-container[display="true"]')) {
    const m = c.querySelector('mjx-math'); if (!m || !c.getClientRects().length) continue;
    const w = m.getBoundingClientRect().width, cw = c.getBoundingClientRect().width;
    if (w > cw + 1) {
      const it = items.find(i => i.typesetRoot === c);
      wide_math.push(`${where(c)}: ${Math.round(w)} px wide in a ${Math.round(cw)} px column: ` +
                     (it ? it.math : c.textContent).replace(/\s+/g, ' ').trim().slice(0, 110));
    }
  }
  // code and text outputs: scrolling, clipping, wrapped rows
  const right = art.getBoundingClientRect().right;
  const wide_code = [], wrapped = [];
  let code_lines = 0;
  const ctx = document.createElement('canvas').getContext('2d');
  for (const pre of art.querySelectorAll('pre')) {
    if (!pre.getClientRects().length) continue;
    const out = pre.closest('.jp-OutputArea-output');
    const lines = pre.textContent.replace(/\n+$/, '').split('\n');
    const longest = lines.reduce((a, b) => b.length > a.length ? b : a, '');
    if (!out) code_lines += lines.length;
    const r = pre.getBoundingClientRect();
    if (pre.scrollWidth > pre.clientWidth + 1 || r.right > right + 1) {
      const cs = getComputedStyle(pre);
      ctx.font = `${cs.fontSize} ${cs.fontFamily}`;
      const fit = Math.floor((pre.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight)) /
                             ctx.measureText('0123456789').width * 10);
      const over = lines.filter(l => l.length > fit).length;
      wide_code.push(`${where(pre)}: ${out ? 'output' : 'code'} ${pre.scrollWidth - pre.clientWidth} px too wide ` +
                     `(${over} of ${lines.length} lines longer than the ${fit} characters that fit), e.g. ` +
                     JSON.stringify(longest.trim().slice(0, 90)));
    } else if (out) {
      const rg = document.createRange(); rg.selectNodeContents(pre);
      const rows = new Set([...rg.getClientRects()].filter(x => x.width > 0).map(x => Math.round(x.top))).size;
      // a printed table (columns aligned by runs of spaces, or |-separated) whose rows wrap; wrapped prose is fine
      const table = lines.filter(l => /\S {2,}\S|\s\|\s/.test(l.trim()));
      if (rows > lines.length && table.length >= 2)
        wrapped.push(`${where(pre)}: a printed table of ${lines.length} lines shown as ${rows} rows (they wrap), e.g. ` +
                     JSON.stringify(longest.trim().slice(0, 90)));
    }
  }
  // what a reader should never see in an output
  const bad_out = [];
  for (const o of art.querySelectorAll('.jp-OutputArea-output')) {
    const t = o.innerText || '';
    const mime = o.getAttribute('data-mime-type') || '';
    const first = t.trim().split('\n')[0].slice(0, 110);
    if (mime.includes('stderr')) bad_out.push(`${where(o)}: stderr output: ${JSON.stringify(first)}`);
    else if (/Traceback \(most recent call last\)|\b\w*(Warning|Error):/.test(t))
      bad_out.push(`${where(o)}: warning or error in an output: ` +
                   JSON.stringify(t.match(/.*(Traceback|Warning|Error).*/)[0].trim().slice(0, 110)));
    const bar = t.match(/(^|\s)(\d{1,2})%\|.*/m);
    if (bar) bad_out.push(`${where(o)}: progress bar frozen at ${bar[2]}%: ${JSON.stringify(bar[0].trim().slice(0, 80))}`);
    if (o.querySelector('script[type*="widget-view"]') || mime.includes('widget'))
      bad_out.push(`${where(o)}: an interactive widget (a tqdm bar?) whose state is not in the page: it shows frozen`);
  }
  const local = [];
  const tw = document.createTreeWalker(art, NodeFilter.SHOW_TEXT);
  while ((n = tw.nextNode())) {
    const m = n.textContent.match(LOCAL);
    if (m && n.parentElement && n.parentElement.getClientRects().length && !n.parentElement.closest('script, style'))
      local.push(`${where(n.parentElement)}: ${JSON.stringify(m[0].trim().slice(0, 90))}`);
    const mm = n.textContent.match(/\b__main__\.\w+/);
    if (mm && !n.parentElement.closest('.highlight, script, style'))
      bad_out.push(`${where(n.parentElement)}: ${JSON.stringify(mm[0])} shown (a name as nbdev's kernel saw it)`);
  }
  // headings outside the table of contents (material shows the children of the first h1 only)
  const toc = document.querySelector('nav.md-nav--secondary');
  const off_toc = [];
  const h1s = [...art.querySelectorAll('h1')];
  const txt = h => JSON.stringify(h.textContent.replace(/¶/g, '').trim().slice(0, 80));
  h1s.slice(1).forEach(h => off_toc.push(`a second h1 ${txt(h)}: only the page title may be an h1 (use ##)`));
  for (const h of art.querySelectorAll('h2')) {
    if (!h.getClientRects().length) continue;
    const a = h.id && toc && toc.querySelector(`a[href="#${CSS.escape(h.id)}"]`);
    if (!a) off_toc.push(`h2 ${txt(h)} is not in the table of contents`);
  }
  const heads = heads_all.map(h => ({level: +h.tagName[1], id: h.id, text: h.textContent.replace(/¶/g, '').trim()}));
  const md = document.querySelector('meta[name="description"]');
  return {
    raw_tex, wide_math, wide_code, wrapped, bad_out, local, off_toc, code_lines,
    math: document.querySelectorAll('mjx-container').length,
    math_errors: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent).slice(0, 5),
    links: [...document.querySelectorAll('a[href]')].map(a => ({href: a.href, raw: a.getAttribute('href'),
                                                              text: a.textContent.trim().slice(0, 40)})),
    images: [...document.images].map((i, k) => ({k, src: (i.currentSrc || i.src).slice(0, 80), where: where(i),
                                                ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth,
                                                shown: i.getBoundingClientRect().width,
                                                in_output: !!i.closest('.jp-OutputArea-output')})),
    column: Math.round(art.getBoundingClientRect().width),
    heads,
    h1: (document.querySelector('article h1') || {textContent: ''}).textContent.replace(/¶/g, '').trim(),
    lead: (document.querySelector('article h1 + blockquote') || {textContent: ''}).textContent.trim(),
    meta_description: md ? md.content : null,
    nav: [...document.querySelectorAll('.md-nav--primary > .md-nav__list > .md-nav__item')].map(
      li => (li.querySelector(':scope > .md-nav__link') || {textContent: ''}).textContent.trim()),
    title: document.title,
  };
}
function ready() {
  const imgs = [...document.images].filter(i => !i.complete);
  return imgs.length === 0 ? Promise.resolve() : Promise.all(imgs.map(i => new Promise(r => { i.onload = i.onerror = r; })));
}
(function wait() {
  if (document.readyState === 'complete' && window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(ready).then(() => done(collect())).catch(e => done({fatal: 'MathJax: ' + e}));
  } else if (Date.now() - t0 > 30000) {
    done({fatal: 'timed out waiting for the page and MathJax (window.MathJax ' + (window.MathJax ? 'present' : 'missing') + ')'});
  } else setTimeout(wait, 50);
})();
"""

# A figure's text must stay at least this many CSS pixels high (its 10 pt at 72 dpi, unscaled) once the figure is scaled
# into the column: matplotlib's default 10 pt at the PNG's dpi, times the scale. 1x4 panels 16 in wide come out near 6 px.
MIN_TEXT_PX = 10.0
FONT_PT = 10.0


def png_dpi(data: bytes):
    "The dpi a PNG records (its pHYs chunk, as matplotlib writes it), or None."
    import struct
    if not data.startswith(b"\x89PNG\r\n\x1a\n"): return None
    i = 8
    while i + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind == b"pHYs":
            x, _, unit = struct.unpack(">IIB", data[i + 8:i + 17])
            return x * 0.0254 if unit == 1 else None
        if kind in (b"IDAT", b"IEND"): return None
        i += 12 + n
    return None


class Handler(http.server.SimpleHTTPRequestHandler):
    missing = []
    def log_message(self, *a): pass
    def send_error(self, code, *a, **k):
        if code == 404: Handler.missing.append(self.path)
        return super().send_error(code, *a, **k)


def serve(site: Path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}/"


def browser(profile: Path, chromium: str, chromedriver: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    o = Options()
    o.binary_location = chromium
    for a in ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-default-apps", "--disable-extensions", "--no-default-browser-check", "--disable-dev-shm-usage",
              "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1280,900",
              "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # nothing but this machine is reachable
              f"--user-data-dir={profile}"]:
        o.add_argument(a)
    o.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    d = webdriver.Chrome(service=Service(executable_path=chromedriver), options=o)
    d.set_page_load_timeout(60); d.set_script_timeout(60)
    return d


def screenshot(d, path: Path, full=False, tile=8000):
    "The viewport (full=False), or the whole page in tiles of `tile` px: NAME.png, NAME_2.png, ... Returns the files."
    if not full: d.save_screenshot(str(path)); return [path]
    import base64
    m = d.execute_cdp_cmd("Page.getLayoutMetrics", {})
    w, h = m["cssContentSize"]["width"], m["cssContentSize"]["height"]
    files = []
    for k, y in enumerate(range(0, int(h) + 1, tile)):
        f = path if k == 0 else path.with_name(f"{path.stem}_{k + 1}{path.suffix}")
        png = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                "clip": {"x": 0, "y": y, "width": w, "height": min(tile, h - y), "scale": 1}})
        f.write_bytes(base64.b64decode(png["data"])); files.append(f)
    return files


INSTALL = {
    "chromium": "Chromium: `sudo apt-get install chromium` (Debian; `chromium-browser` on Ubuntu), or pass --chromium PATH",
    "chromedriver": "chromedriver: `sudo apt-get install chromium-driver` (Debian), or pass --chromedriver PATH",
    "selenium": "selenium: `pip install selenium` (the dev extra has it: `pip install -e \".[dev]\"`)",
    "site": "it with `npm ci --prefix .ci/docs --no-audit --no-fund && python .ci/docs/build.py`",
}


def prerequisites(chromium, chromedriver, site: Path):
    "Check what the test needs before starting anything; exit with how to install whatever is missing."
    import importlib.util, subprocess
    missing, versions = [], {}
    for name, exe in (("chromium", chromium), ("chromedriver", chromedriver)):
        path = shutil.which(exe) if exe else None
        if not path: missing.append(f"{name} not found ({exe or 'not on PATH'}). Install {INSTALL[name]}"); continue
        try:
            v = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
            versions[name] = (re.search(r"(\d+)\.\d+", v) or [None, None])[1]
        except Exception as e: missing.append(f"{name} at {path} does not run ({e}). Reinstall {INSTALL[name]}")
    if versions.get("chromium") and versions.get("chromedriver") and versions["chromium"] != versions["chromedriver"]:
        missing.append(f"chromium {versions['chromium']} and chromedriver {versions['chromedriver']} differ: install both "
                       "from the same source (`sudo apt-get install chromium chromium-driver`)")
    if importlib.util.find_spec("selenium") is None: missing.append(f"selenium is not installed. Install {INSTALL['selenium']}")
    if not (site / "build_info.json").exists(): missing.append(f"no built site in {site}. Build {INSTALL['site']}")
    if missing:
        sys.exit("[browser] cannot run, missing prerequisites:\n  - " + "\n  - ".join(missing))


def api_names(modules):
    "{module: (notebook, [required names], [other names])} from each module's `__all__` and its AUTOGENERATED header."
    cfg_lib = ROOT / "influence_nb"
    res = {}
    files = sorted(cfg_lib.glob("*.py")) if modules == ["all"] else [cfg_lib / f"{m}.py" for m in modules]
    for f in files:
        if not f.exists(): raise SystemExit(f"no module {f}")
        src = f.read_text(encoding="utf-8")
        tree = ast.parse(src)
        alls = [n for n in tree.body if isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets)]
        if not alls: continue
        names = ast.literal_eval(alls[0].value)
        defs = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        m = re.search(r"File to edit: (\S+\.ipynb)", src)
        nb = (f.parent / m.group(1)).resolve().relative_to(ROOT).as_posix() if m else None
        res[f.stem] = (nb, [n for n in names if n in defs], [n for n in names if n not in defs])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", default=str(ROOT / "_docs"))
    ap.add_argument("--out", default=str(HERE / "out"), help="screenshots and report.json go here")
    ap.add_argument("--modules", default="all", help="influence_nb modules whose __all__ the API reference must list: "
                    "'all' (every module with __all__), a comma list (core,ihvp), or 'none'")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--chromedriver", default=shutil.which("chromedriver") or "/usr/bin/chromedriver")
    ap.add_argument("--pages", default="", help="comma list of pages to check (default: all)")
    a = ap.parse_args()
    t0 = time.time()
    site, out = Path(a.site).resolve(), Path(a.out).resolve()
    prerequisites(a.chromium, a.chromedriver, site)
    info = json.loads((site / "build_info.json").read_text())
    pages = info["pages"]
    only = set(filter(None, a.pages.split(",")))
    shots = out / "screens"
    if shots.exists(): shutil.rmtree(shots)
    shots.mkdir(parents=True)
    fails, report = [], {"pages": {}}
    def fail(page, msg): fails.append(f"{page}: {msg}")

    srv, base = serve(site)
    profile = Path(tempfile.mkdtemp(prefix="influence_nb_chromium_"))
    try: d = browser(profile, a.chromium, a.chromedriver)
    except Exception as e:
        srv.shutdown()
        sys.exit(f"[browser] chromedriver could not start Chromium ({type(e).__name__}: {str(e).strip()[:300]}).\n"
                 f"  chromium: {a.chromium}, chromedriver: {a.chromedriver}; install both from one source: "
                 "`sudo apt-get install chromium chromium-driver`")
    ids_cache = {}
    def page_ids(url):
        if url not in ids_cache:
            try:
                html = urllib.request.urlopen(url, timeout=10).read().decode("utf-8", "replace")
                ids_cache[url] = set(map(unquote, re.findall(r'\b(?:id|name)="([^"]+)"', html)))
            except urllib.error.HTTPError as e: ids_cache[url] = e.code
        return ids_cache[url]
    try:
        titles = [p["title"] for p in pages]
        seen_heads = {}
        iris = next((p for p in pages if "iris" in Path(p["notebook"]).stem.lower()), None)
        for p in pages:
            name, url = p["page"], base + p["page"]
            if only and name not in only: continue
            d.get(url)
            r = d.execute_async_script(PAGE_JS, TEX)
            if "fatal" in r: fail(name, r["fatal"]); continue
            logs = d.get_log("browser")
            for e in logs:
                if e["level"] == "SEVERE": fail(name, f"console error: {e['message'][:300]}")
            for e in d.get_log("performance"):
                msg = json.loads(e["message"])["message"]
                if msg["method"] == "Network.requestWillBeSent":
                    u = msg["params"]["request"]["url"]
                    if urlparse(u).scheme in ("http", "https", "ws", "wss") and not u.startswith(base):
                        fail(name, f"request to another host: {u[:200]}")
            for t in r["raw_tex"]: fail(name, f"unrendered TeX in the visible text: ...{t}...")
            for t in r["math_errors"]: fail(name, f"MathJax error: {t}")
            for t in r["wide_math"]: fail(name, f"equation wider than the column, {t}")
            for t in r["wide_code"]: fail(name, f"scrolls sideways or is clipped, {t}")
            for t in r["wrapped"]: fail(name, f"text output wraps (a printed table? show a DataFrame/markdown table), {t}")
            for t in r["bad_out"]: fail(name, t)
            for t in r["local"]: fail(name, f"absolute local path shown, {t}")
            for t in r["off_toc"]: fail(name, f"heading outside the table of contents: {t}")
            small = []
            for i in r["images"]:
                if not (i["ok"] and i["in_output"] and i["src"].startswith("data:image/png")): continue
                import base64
                src = d.execute_script("return document.images[arguments[0]].src", i["k"])
                dpi = png_dpi(base64.b64decode(src.split(",", 1)[1])) or 100.0
                px = FONT_PT * dpi / 72 * i["shown"] / max(i["w"], 1)
                if px < MIN_TEXT_PX:
                    small.append(px)
                    fail(name, f"figure {i['where']}: {i['w']} px at {dpi:.0f} dpi shown {i['shown']:.0f} px wide: its "
                               f"{FONT_PT:.0f} pt text renders {px:.1f} px high (< {MIN_TEXT_PX}); lay the panels out for the "
                               f"column (2x2, not 1x4) or make the figure narrower")
            for i in r["images"]:
                if not i["ok"]: fail(name, f"image did not load: {i['src']}")
            external = set()
            for l in r["links"]:
                u = urlparse(l["href"])
                if u.scheme not in ("http", "https"): continue
                if not l["href"].startswith(base): external.add(l["href"]); continue
                target, frag = urldefrag(l["href"])
                ids = page_ids(target)
                if isinstance(ids, int): fail(name, f"link {l['raw']!r} ({l['text']!r}) -> HTTP {ids}"); continue
                if frag and unquote(frag) not in ids and target.endswith(".html"):
                    fail(name, f"link {l['raw']!r} ({l['text']!r}) -> no #{frag} on {target[len(base):]}")
            if r["h1"] != p["title"]: fail(name, f"title {r['h1']!r} != notebook title {p['title']!r}")
            if p.get("description_cut"):
                fail(name, f"the description under the title is cut off: nbdev reads only the first `> ` line of the "
                           f"notebook's first cell, and drops {p['description_cut'][:80]!r}: make it one line")
            if p["description"]:
                if not r["lead"]: fail(name, "the notebook's description is not shown under the title")
                if r["meta_description"] != p["description"]: fail(name, f"meta description {r['meta_description']!r}")
            if r["nav"] != titles: fail(name, f"navigation {r['nav']} != pages in order {titles}")
            seen_heads[name] = r["heads"]
            stem = Path(name).with_suffix("").as_posix().replace("/", "_")
            screenshot(d, shots / f"{stem}.png")
            tiles = screenshot(d, shots / f"{stem}_full.png", full=True)  # the whole page, in tiles
            n_fail = sum(f.startswith(name + ":") for f in fails)
            report["pages"][name] = {"title": r["h1"], "equations": r["math"], "images": len(r["images"]),
                                     "links": len(r["links"]), "external_links": sorted(external),
                                     "headings": len(r["heads"]), "code_lines": r["code_lines"], "column_px": r["column"],
                                     "failures": n_fail, "screenshots": [f.name for f in tiles]}
            print(f"[browser] {name:18} {'ok  ' if not n_fail else f'{n_fail:3d}!'} {r['math']:4} equations "
                  f"{len(r['images']):3} images {len(r['links']):4} links ({len(external)} external) {r['code_lines']:4} "
                  f"code lines, {len(tiles)} screenshot tiles  {r['h1']!r}", flush=True)
        if iris is None: print("[browser] no Iris study notebook (nbs/*iris*.ipynb) yet: no Iris screenshot", flush=True)

        # search: the search box finds the last page by the longest word of its title
        if len(pages) > 1 and not only:
            target = pages[-1]
            word = max(re.findall(r"[A-Za-z]{4,}", target["title"]) or ["influence"], key=len)
            d.get(base + "index.html")
            from selenium.webdriver.common.by import By
            d.execute_script("const t = document.getElementById('__search'); if (t) t.checked = true;")  # open the search
            box = d.find_element(By.CSS_SELECTOR, "input.md-search__input")
            box.click()
            box.send_keys(word)
            hits = []
            # results re-render while the index loads: read them in one script call, until they hold the page
            for _ in range(100):
                hits = d.execute_script("return [...document.querySelectorAll('.md-search-result__link')].map(e => e.href)") or []
                if any(urlparse(h).path.endswith("/" + target["page"]) for h in hits): break
                time.sleep(0.1)
            if not any(urlparse(h).path.endswith("/" + target["page"]) for h in hits):
                fail("search", f"searching {word!r} did not find {target['page']} (results: {hits[:5]})")
            else: print(f"[browser] search {word!r}: {len(hits)} results, {target['page']} among them", flush=True)
            screenshot(d, shots / "search.png")
            report["search"] = {"query": word, "results": len(hits)}
            for e in d.get_log("browser"):
                if e["level"] == "SEVERE": fail("search", f"console error: {e['message'][:300]}")

        # the API reference: show_doc headings for every public def/class of each module, on its notebook's page
        mods = [] if a.modules == "none" or only else ["all"] if a.modules == "all" else a.modules.split(",")
        by_nb = {Path(p["notebook"]).name: p["page"] for p in pages}
        report["api"] = {}
        for mod, (nb, names, others) in (api_names(mods) if mods else {}).items():
            page = by_nb.get(Path(nb).name) if nb else None
            if page is None: fail("api", f"influence_nb/{mod}.py: its notebook {nb} has no page"); continue
            heads = {h["text"] for h in seen_heads.get(page, [])} | {h["id"] for h in seen_heads.get(page, [])}
            missing = [n for n in names if n not in heads]
            for n in missing: fail("api", f"influence_nb.{mod}.{n} (in __all__) is not documented on {page}")
            report["api"][mod] = {"page": page, "documented": [n for n in names if n not in missing],
                                  "missing": missing, "not_def_or_class": others}
            print(f"[browser] API influence_nb.{mod}: {len(names) - len(missing)}/{len(names)} public functions/classes"
                  f" documented on {page}" + (f" (not def/class, not required: {', '.join(others)})" if others else ""),
                  flush=True)
        if Handler.missing: fail("server", f"404s: {sorted(set(Handler.missing))[:10]}")
    finally:
        d.quit()
        srv.shutdown()
        shutil.rmtree(profile, ignore_errors=True)
    report.update(failures=fails, seconds=round(time.time() - t0, 1), screenshots=sorted(p.name for p in shots.glob("*.png")))
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"[browser] screenshots in {shots}: {', '.join(report['screenshots'])}")
    if fails:
        bad = [k for k, v in report["pages"].items() if v["failures"]]
        print(f"[browser] FAILED ({len(fails)} failures; {len(report['pages']) - len(bad)} pages passed, {len(bad)} failed: "
              f"{', '.join(bad)}; {report['seconds']} s):\n  " + "\n  ".join(fails))
        sys.exit(1)
    print(f"[browser] all {len(report['pages'])} pages passed in {report['seconds']} s")


if __name__ == "__main__":
    main()
