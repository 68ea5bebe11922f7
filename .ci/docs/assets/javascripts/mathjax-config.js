// MathJax 3, served from this site (assets/mathjax/, copied from the npm package by .ci/docs/build.py).
// Notebook markdown keeps TeX between $...$ / $$...$$ (nbconvert protects it from the markdown parser).
window.MathJax = {
  tex: {
    inlineMath: [["$", "$"], ["\\(", "\\)"]],
    displayMath: [["$$", "$$"], ["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
    tags: "ams"
  },
  options: {
    // <pre>/<code> (code cells, text outputs) are skipped by default; so are the header and the search UI
    // (the navigation is typeset: headings with math appear in the table of contents)
    ignoreHtmlClass: "tex2jax_ignore|mathjax_ignore|md-header|md-search"
  },
  chtml: { displayAlign: "center" }
};
