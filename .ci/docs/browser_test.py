#!/usr/bin/env python3
"""Open every page of the built site (`_docs/`) in headless Chromium, as a reader would, and check it.

    python .ci/docs/browser_test.py                  # after `python .ci/docs/build.py`
    python .ci/docs/browser_test.py --site DIR --out DIR --modules none

The site is served over HTTP on 127.0.0.1 only, and Chromium resolves no other host (--host-resolver-rules), so a page
that needs the internet fails here as it would on an offline machine. For every page it asserts:
  - no console errors, and no request to any host but 127.0.0.1 (data: URIs are fine);
  - equations rendered: no raw `$...$`, `$$`, `\\frac` or other TeX left in the visible text, no MathJax error boxes;
  - every internal link resolves (the page exists and so does its #anchor), every image loads;
  - the title and one-line description from the notebook's first cell, and the navigation listing every page in order.
Site-wide: search finds a page by a word of its title; the API reference lists every public function and class of each
module (the names in its `__all__` defined by `def`/`class`) on the page of the notebook that exports it.
Screenshots go to OUT/screens/: the top of every page (NAME.png) and the whole page (NAME_full.png); the home page is
index*.png, the Iris study page (once nbs/*iris*.ipynb exists) iris*.png.
Needs Debian chromium + chromium-driver and the selenium package.
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
const t0 = Date.now();
function collect() {
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
  for (const t of groups.values()) {
    const m = t.match(TEX);
    if (m) raw_tex.push(t.slice(Math.max(0, m.index - 50), m.index + 70).replace(/\s+/g, ' '));
  }
  const heads = [...document.querySelectorAll('article h1, article h2, article h3, article h4')].map(h => ({
    level: +h.tagName[1], id: h.id, text: h.textContent.replace(/¶/g, '').trim()}));
  const md = document.querySelector('meta[name="description"]');
  return {
    raw_tex,
    math: document.querySelectorAll('mjx-container').length,
    math_errors: [...document.querySelectorAll('mjx-merror')].map(e => e.textContent).slice(0, 5),
    links: [...document.querySelectorAll('a[href]')].map(a => ({href: a.href, raw: a.getAttribute('href'),
                                                              text: a.textContent.trim().slice(0, 40)})),
    images: [...document.images].map(i => ({src: (i.currentSrc || i.src).slice(0, 80),
                                            ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth})),
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


def screenshot(d, path: Path, full=False, max_h=9000):
    if not full: return d.save_screenshot(str(path))
    import base64
    m = d.execute_cdp_cmd("Page.getLayoutMetrics", {})
    w = m["cssContentSize"]["width"]; h = min(m["cssContentSize"]["height"], max_h)
    png = d.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                      "clip": {"x": 0, "y": 0, "width": w, "height": h, "scale": 1}})
    path.write_bytes(base64.b64decode(png["data"]))


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
    a = ap.parse_args()
    t0 = time.time()
    site, out = Path(a.site).resolve(), Path(a.out).resolve()
    info = json.loads((site / "build_info.json").read_text())
    pages = info["pages"]
    shots = out / "screens"
    if shots.exists(): shutil.rmtree(shots)
    shots.mkdir(parents=True)
    fails, report = [], {"pages": {}}
    def fail(page, msg): fails.append(f"{page}: {msg}")

    srv, base = serve(site)
    profile = Path(tempfile.mkdtemp(prefix="influence_nb_chromium_"))
    d = browser(profile, a.chromium, a.chromedriver)
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
            if p["description"]:
                if not r["lead"]: fail(name, "the notebook's description is not shown under the title")
                if r["meta_description"] != p["description"]: fail(name, f"meta description {r['meta_description']!r}")
            if r["nav"] != titles: fail(name, f"navigation {r['nav']} != pages in order {titles}")
            seen_heads[name] = r["heads"]
            stem = Path(name).with_suffix("").as_posix().replace("/", "_")
            screenshot(d, shots / f"{stem}.png")
            screenshot(d, shots / f"{stem}_full.png", full=True)  # the whole page (capped at 9000 px)
            report["pages"][name] = {"title": r["h1"], "equations": r["math"], "images": len(r["images"]),
                                     "links": len(r["links"]), "external_links": sorted(external),
                                     "headings": len(r["heads"])}
            print(f"[browser] {name:24} {r['math']:4} equations {len(r['images']):3} images {len(r['links']):4} links"
                  f" ({len(external)} external)  {r['h1']!r}", flush=True)
        if iris is None: print("[browser] no Iris study notebook (nbs/*iris*.ipynb) yet: no Iris screenshot", flush=True)

        # search: the search box finds the last page by the longest word of its title
        if len(pages) > 1:
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
        mods = [] if a.modules == "none" else ["all"] if a.modules == "all" else a.modules.split(",")
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
        print(f"[browser] FAILED ({len(fails)}):\n  " + "\n  ".join(fails))
        sys.exit(1)
    print(f"[browser] all {len(pages)} pages passed in {report['seconds']} s")


if __name__ == "__main__":
    main()
