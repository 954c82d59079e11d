"""`lens explain --html`: one self-contained page (inline CSS and JS, nothing fetched) showing a text with each token
coloured by how well the lens reconstructs its activation.

Everything is rendered here, server-side, into the DOM: the page reads without JavaScript, and the small script only
adds the hover tooltip (from each token's `data-tip`) and pins a token's detail card on click (or `#pos-N` in the URL).
Every piece of text goes through `html.escape`: tokens and explanations can hold `<`, `&` and quotes.
"""

from __future__ import annotations

from html import escape
from string import Template

from lens.explain import TextExplanation, TokenExplanation

_CSS = """
:root { --ink: #1d2330; --mute: #6b7280; --line: #e3e6ec; --bg: #f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink); font: 14px/1.45 system-ui, sans-serif; }
.page { max-width: 1160px; margin: 0 auto; padding: 18px 24px 28px; }
h1 { font-size: 18px; margin: 0 0 4px; }
.meta { color: var(--mute); margin: 0; }
.meta b { color: var(--ink); font-weight: 600; }
code { font: 12.5px ui-monospace, monospace; background: #eceef2; border-radius: 4px; padding: 1px 4px; }
.legend { display: flex; flex-wrap: wrap; align-items: center; gap: 6px 18px; margin: 12px 0; color: var(--mute);
  font-size: 12.5px; }
.scale { display: inline-block; width: 150px; height: 10px; border-radius: 5px; vertical-align: middle;
  margin: 0 6px; background: linear-gradient(90deg, hsl(0 70% 80%), hsl(60 70% 80%), hsl(120 70% 80%)); }
.sw { display: inline-block; padding: 0 5px; margin-right: 5px; border-radius: 3px; border: 1px solid var(--line);
  background: #fff; font: 12px/18px ui-monospace, monospace; }
.grid { display: grid; grid-template-columns: minmax(0, 3fr) minmax(280px, 2fr); gap: 16px; align-items: start; }
.box { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 14px 16px; }
.text { font: 15px/2.1 ui-monospace, monospace; white-space: pre-wrap; word-break: break-word; }
.tok { border-radius: 3px; padding: 2px 0; cursor: pointer; background: var(--c); box-shadow: inset -1px 0 #fff; }
.tok:hover, .tok:focus { outline: 2px solid #394150; }
.tok.pinned { outline: 2px solid #1d4ed8; }
.tok.beyond, .sw.beyond { text-decoration: underline dotted #394150; text-underline-offset: 5px; }
.skip { color: #a0a6b1; }
#detail { position: sticky; top: 12px; min-height: 120px; }
.hint { color: var(--mute); margin: 0; }
.card h2 { font-size: 15px; margin: 0 0 2px; font-weight: 600; }
.card h2 code { font-size: 14px; }
.sub { color: var(--mute); font-size: 12.5px; margin: 0 0 10px; }
.key { color: var(--mute); font-size: 11.5px; margin: 0 0 12px; }
.key i { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin: 0 3px 0 8px; }
.expl { display: flex; flex-wrap: wrap; gap: 4px; margin: 0 0 10px; }
.et { display: inline-flex; flex-direction: column; align-items: center; border-radius: 5px; padding: 3px 7px;
  border: 1px solid var(--line); }
.et .t { font: 14px ui-monospace, monospace; white-space: pre; }
.et .s { font-size: 10.5px; color: #4b5563; }
.scores { display: grid; grid-template-columns: repeat(4, auto); gap: 2px 14px; margin: 0; }
.scores dt { color: var(--mute); font-size: 11.5px; }
.scores dd { margin: 0; font-weight: 600; font-variant-numeric: tabular-nums; }
.note { color: var(--mute); font-size: 11.5px; margin: 10px 0 0; }
#tip { position: fixed; z-index: 9; max-width: 360px; pointer-events: none; background: #1d2330; color: #fff;
  font-size: 12.5px; padding: 6px 9px; border-radius: 6px; white-space: pre-wrap; box-shadow: 0 4px 14px #0003; }
details { margin-top: 16px; }
summary { cursor: pointer; color: var(--mute); }
table { border-collapse: collapse; margin-top: 8px; font-size: 12.5px; width: 100%; }
td, th { text-align: left; padding: 3px 8px; border-bottom: 1px solid var(--line); }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td code { white-space: pre-wrap; }
@media (max-width: 800px) { .grid { grid-template-columns: 1fr; } }
"""

_JS = """
(() => {
  const text = document.getElementById('text'), tip = document.getElementById('tip');
  const hint = document.getElementById('hint');
  let pinned = null;
  const tokOf = (e) => e.target.closest ? e.target.closest('[data-tip]') : null;
  function showTip(t) {
    if (!t) { tip.hidden = true; return; }
    tip.textContent = t.dataset.tip;
    tip.hidden = false;
    const r = t.getBoundingClientRect();
    tip.style.left = Math.min(r.left, window.innerWidth - tip.offsetWidth - 8) + 'px';
    tip.style.top = (r.bottom + 6) + 'px';
  }
  function pin(i) {
    pinned = pinned === i ? null : i;
    document.querySelectorAll('.card').forEach((c) => { c.hidden = c.dataset.i !== pinned; });
    document.querySelectorAll('.tok').forEach((t) => t.classList.toggle('pinned', t.dataset.i === pinned));
    hint.hidden = pinned !== null;
  }
  text.addEventListener('mouseover', (e) => showTip(tokOf(e)));
  text.addEventListener('mouseleave', () => showTip(null));
  text.addEventListener('focusin', (e) => showTip(tokOf(e)));
  text.addEventListener('focusout', () => showTip(null));
  text.addEventListener('click', (e) => { const t = tokOf(e); if (t && t.dataset.i) pin(t.dataset.i); });
  text.addEventListener('keydown', (e) => {
    const t = tokOf(e);
    if (t && t.dataset.i && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); pin(t.dataset.i); }
  });
  const m = location.hash.match(/^#pos-(\\d+)$/);
  if (m && document.getElementById('card-' + m[1])) pin(m[1]);
})();
"""

_PAGE = Template("""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title</title>
<style>$css</style>
</head>
<body>
<div class="page">
<h1>Consistency lens</h1>
<p class="meta">$meta</p>
<div class="legend">$legend</div>
<div class="grid">
<div class="box text" id="text">$tokens</div>
<div class="box" id="detail"><p class="hint" id="hint">Hover over a token for its explanation; click it to pin the
details here (click again to unpin).</p>
$cards</div>
</div>
<details><summary>All $n_explained explanations</summary>
<table><thead><tr><th class="n">pos</th><th>token</th><th>explanation</th><th class="n">nMSE</th>
<th class="n">recovered</th><th class="n">KL</th></tr></thead>
<tbody>$rows</tbody></table>
</details>
<p class="note">$definitions</p>
</div>
<div id="tip" hidden></div>
<script>$js</script>
</body>
</html>
""")

DEFINITIONS = (
    "nMSE = ‖A − Â‖² / ‖A‖², the per-sample error training minimises. recovered = 1 − nMSE: the share of ‖A‖² the "
    "reconstruction Â accounts for, measured from zero. It is not the held-out variance recovered of lens eval, "
    "which measures error against each dimension's mean over many activations (one vector has no such mean); "
    "residual streams share a large mean, so even the mean activation scores well here: compare tokens with each "
    "other. KL = KL(next-token distribution with A ‖ with Â patched in at the layer), in nats. Salience of an "
    "explanation token: how much nMSE rises when that token's embedding is set to zero and the explanation is "
    "re-encoded (orange: the encoder relied on it; blue: the explanation reads better without it).")


def recovered_colour(recovered: float) -> str:
    """Red (nothing or worse) through yellow to green (all of ||A||^2): hsl hue 0..120, light enough for text."""
    return f"hsl({120 * min(max(recovered, 0.0), 1.0):.0f} 70% 80%)"


def salience_colour(value: float, scale: float) -> str:
    """Orange for positive salience, blue for negative, opacity by |value| relative to the explanation's largest."""
    alpha = min(abs(value) / scale, 1.0) * 0.55 if scale > 0 else 0.0
    rgb = "234 140 20" if value > 0 else "59 110 220"
    return f"rgb({rgb} / {alpha:.2f})"


def _visible(token: str) -> str:
    """Escaped token text with line breaks marked, so a newline token still has something to hover."""
    return escape(token).replace("\n", "↵\n")


def _tip(r: TokenExplanation) -> str:
    return (f"{r.explanation}\nnMSE {r.nmse:.3f} · recovered {r.recovered:.3f} · KL {r.kl:.4f}"
            + ("\npast the training context length" if r.beyond_training_context else ""))


def _token_span(token: str, position: int, record: TokenExplanation | None, first: int) -> str:
    if record is None:
        tip = f"not explained: training explains positions from {first} on (after BOS and data.min_pos tokens)"
        return f'<span class="skip" data-tip="{escape(tip)}">{_visible(token)}</span>'
    beyond = " beyond" if record.beyond_training_context else ""
    return (f'<span class="tok{beyond}" tabindex="0" data-i="{position}" '
            f'style="--c: {recovered_colour(record.recovered)}" data-tip="{escape(_tip(record))}">'
            f"{_visible(token)}</span>")


def _card(r: TokenExplanation, report: TextExplanation) -> str:
    scale = max((abs(s) for s in r.salience), default=0.0)
    tokens = "".join(
        f'<span class="et" style="background: {salience_colour(s, scale)}"><span class="t">{escape(t)}</span>'
        f'<span class="s">{s:+.3f}</span></span>' for t, s in zip(r.explanation_tokens, r.salience))
    beyond = (f" · past the training context (data.seq_len = {report.train_seq_len})"
              if r.beyond_training_context else "")
    kept = f"candidate {r.member + 1} of {report.best_of}" if report.best_of > 1 else "single sample"
    return (f'<div class="card" id="card-{r.position}" data-i="{r.position}" hidden>'
            f'<h2>Token <code style="background: {recovered_colour(r.recovered)}">{_visible(r.token)}</code></h2>'
            f'<p class="sub">position {r.position}{beyond}</p>'
            f'<p class="sub">Explanation, with each token\'s salience (nMSE rise when it is blanked):</p>'
            f'<div class="expl">{tokens}</div>'
            '<p class="key">salience<i style="background: rgb(234 140 20 / .55)"></i>the encoder used it'
            '<i style="background: rgb(59 110 220 / .55)"></i>better without it</p>'
            f'<dl class="scores"><dt>nMSE</dt><dt>recovered</dt><dt>KL (nats)</dt><dt>kept</dt>'
            f"<dd>{r.nmse:.3f}</dd><dd>{r.recovered:.3f}</dd><dd>{r.kl:.4f}</dd><dd>{kept}</dd></dl></div>")


def _row(r: TokenExplanation) -> str:
    return (f'<tr><td class="n">{r.position}</td><td><code>{escape(r.token)}</code></td>'
            f"<td><code>{escape(r.explanation)}</code></td><td class=\"n\">{r.nmse:.3f}</td>"
            f'<td class="n" style="background: {recovered_colour(r.recovered)}">{r.recovered:.3f}</td>'
            f'<td class="n">{r.kl:.4f}</td></tr>')


def _meta(report: TextExplanation) -> str:
    n = len(report.records)
    mean = lambda values: sum(values) / n  # noqa: E731
    return (f"<code>{escape(report.checkpoint)}</code> · step <b>{report.step}</b> · model "
            f"<code>{escape(report.model)}</code> · layer <b>{report.layer}</b> · best of <b>{report.best_of}</b> · "
            f"<b>{n}</b> tokens explained, mean nMSE <b>{mean([r.nmse for r in report.records]):.3f}</b>, "
            f"mean KL <b>{mean([r.kl for r in report.records]):.4f}</b>")


def _legend(report: TextExplanation) -> str:
    items = ["<span>recovered = 1 − nMSE: ≤ 0<span class=\"scale\"></span>1</span>"]
    if report.first_explained > 0:
        items.append(f'<span><span class="sw skip">tok</span>not explained (before position {report.first_explained}: '
                     "BOS, data.min_pos)</span>")
    if any(r.beyond_training_context for r in report.records):
        items.append(f'<span><span class="sw beyond">tok</span>past data.seq_len = {report.train_seq_len}</span>')
    return "".join(items)


def render(report: TextExplanation) -> str:
    """The page for one `lens explain` result."""
    by_position = {r.position: r for r in report.records}
    tokens = "".join(_token_span(t, i, by_position.get(i), report.first_explained)
                     for i, t in enumerate(report.tokens))
    return _PAGE.substitute(
        title=escape(f"lens explain · {report.model} layer {report.layer}"), css=_CSS, js=_JS,
        meta=_meta(report), legend=_legend(report), tokens=tokens,
        cards="\n".join(_card(r, report) for r in report.records),
        n_explained=len(report.records), rows="\n".join(_row(r) for r in report.records),
        definitions=escape(DEFINITIONS))
