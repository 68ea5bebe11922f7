"""mkdocs hooks for the influence_nb site (loaded by the mkdocs.yml that .ci/docs/build.py writes).

nbconvert's templates, which mkdocs-jupyter extends, put a MathJax 2 <script> from cdnjs and a mermaid loader that
imports from cdnjs into every notebook page. The site serves MathJax 3 itself (extra_javascript), so both are removed
here, and the build fails if any page still loads a script, stylesheet, image or font from another host.
"""
import html, re

_CDN_SCRIPT = re.compile(r'<script[^>]*\bsrc="https?://[^"]*"[^>]*>\s*</script>', re.I)
_MJ2_CONFIG = re.compile(r'<script type="text/x-mathjax-config">.*?</script>', re.S | re.I)
_MODULE_CDN = re.compile(r'<script type="module">(?:(?!</script>).)*?https?://(?:(?!</script>).)*</script>', re.S | re.I)
_REMOTE = re.compile(r'<(?:script|img|link|source|iframe|embed|video|audio)\b[^>]*\b(?:src|href)="((?:https?:)?//[^"]+)"', re.I)
_CSS_REMOTE = re.compile(r'(?:@import\s+(?:url\()?|url\()\s*["\']?((?:https?:)?//[^"\')\s]+)', re.I)


def on_page_context(context, page, config, nav):
    "Each notebook's one-line description (its `> ...` line) becomes the page's <meta name=description>."
    d = config.get("extra", {}).get("nb_descriptions", {}).get(page.file.src_uri)
    if d: page.meta["description"] = html.escape(d, quote=True)  # the theme puts it in an attribute unescaped
    return context


_HEAD = re.compile(r'<h([1-3]) id="([^"]+)"[^>]*>(.*?)</h\1>', re.S)
_TAGS = re.compile(r"<[^>]+>")


def on_page_content(content, page, config, files):
    """The page's table of contents from the rendered headings (h1-h3), so the API entries that show_doc outputs
    (which mkdocs-jupyter's markdown-only table of contents misses) are listed beside the page."""
    if not page.file.src_uri.endswith(".ipynb"): return content
    from mkdocs.structure.toc import get_toc
    root = {"level": 0, "children": []}; stack = [root]
    for lvl, hid, inner in _HEAD.findall(content):
        text = _TAGS.sub("", inner.split('<a class="anchor-link"')[0]).replace("¶", "").strip()
        tok = {"level": int(lvl), "id": hid, "name": text, "html": text, "data-toc-label": "", "children": []}
        while stack[-1]["level"] >= tok["level"]: stack.pop()
        stack[-1]["children"].append(tok); stack.append(tok)
    if root["children"]: page.toc = get_toc(root["children"])
    return content


def on_post_page(output, page, config):
    output = _CDN_SCRIPT.sub("", output)
    output = _MJ2_CONFIG.sub("", output)
    output = _MODULE_CDN.sub("", output)
    remote = _REMOTE.findall(output) + _CSS_REMOTE.findall(output)
    if remote:
        raise RuntimeError(f"{page.file.src_uri}: loads from another host (the site must work offline): {sorted(set(remote))}")
    return output
