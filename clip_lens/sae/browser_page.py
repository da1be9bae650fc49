"""The latent browser's HTML (`clip_lens.sae.browser.write_browser`): one self-contained page, each
latent's section rendered here (anchor `#latent-<index>`), images filled in from the embedded data
by a few lines of inline JavaScript that also run the search box. Nothing is fetched."""

from __future__ import annotations

from html import escape

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;display:flex;color:#222}
nav{width:16rem;height:100vh;overflow-y:auto;position:sticky;top:0;border-right:1px solid #ddd;padding:.5rem;
 box-sizing:border-box;flex:none}
nav a{display:block;padding:.15rem .3rem;color:#124;text-decoration:none;font-size:.85rem}
nav a:hover{background:#eef}
nav a.dead{color:#aaa}
main{padding:1rem 2rem;flex:1;min-width:0}
#search{width:100%;box-sizing:border-box;padding:.3rem;margin-bottom:.5rem}
section.latent{border-top:1px solid #ddd;padding:.5rem 0 1rem}
.tops{display:flex;flex-wrap:wrap;gap:.6rem}
figure{margin:0;font-size:.75rem;width:120px}
.frame{position:relative;width:120px;height:120px;background:#eee}
.frame img,.frame svg{position:absolute;left:0;top:0;width:120px;height:120px;image-rendering:pixelated}
.text{font-family:monospace;margin:.2rem 0}
.text span{padding:0 1px;border-radius:2px}
table{border-collapse:collapse;font-size:.8rem;margin:.3rem 0}
td,th{border:1px solid #ddd;padding:.1rem .4rem;text-align:left}
.muted{color:#777;font-size:.85rem}
"""

SCRIPT = """
const data = JSON.parse(document.getElementById('latent-data').textContent);
for (const img of document.querySelectorAll('img[data-input]')) {
  const input = data.inputs[img.dataset.input];
  if (input && input.image) img.src = input.image;
}
const search = document.getElementById('search');
search.addEventListener('input', () => {
  const query = search.value.trim().toLowerCase();
  for (const item of document.querySelectorAll('[data-latent]')) {
    const hit = !query || item.dataset.latent === query || item.dataset.concepts.toLowerCase().includes(query);
    item.style.display = hit ? '' : 'none';
  }
});
"""


def _number(value: float) -> str:
    return f"{value:.3g}"


def _histogram_svg(histogram: dict) -> str:
    """The histogram of a latent's non-zero scores as an inline SVG bar chart."""
    counts, edges = histogram["counts"], histogram["edges"]
    if not counts:
        return '<p class="muted">never fires on these inputs</p>'
    width, height, top = 300, 80, max(counts)
    bar = width / len(counts)
    bars = "".join(f'<rect x="{i * bar:.1f}" y="{height - height * c / top:.1f}" width="{bar - 1:.1f}" '
                   f'height="{height * c / top:.1f}" fill="#4a7bd0"><title>{_number(edges[i])} to '
                   f'{_number(edges[i + 1])}: {c}</title></rect>' for i, c in enumerate(counts))
    labels = (f'<text x="0" y="{height + 12}" font-size="10">{_number(edges[0])}</text>'
              f'<text x="{width}" y="{height + 12}" font-size="10" text-anchor="end">{_number(edges[-1])}</text>')
    return (f'<svg class="histogram" width="{width}" height="{height + 14}" role="img" '
            f'aria-label="histogram of non-zero activations">{bars}{labels}</svg>')


def _heatmap_svg(grid: list, scale: float) -> str:
    """A latent's map over the patch grid, as translucent red cells over the image."""
    rows, cols = len(grid), len(grid[0]) if grid else 0
    cells = "".join(f'<rect x="{c}" y="{r}" width="1" height="1" fill="#e00000" fill-opacity="{0.75 * v / scale:.3f}"/>'
                    for r, row in enumerate(grid) for c, v in enumerate(row) if v > 0)
    return f'<svg viewBox="0 0 {cols} {rows}" preserveAspectRatio="none">{cells}</svg>'


def _image_entry(entry: dict, scale: float) -> str:
    name = escape(entry["name"])
    return (f'<figure><div class="frame"><img data-input="{entry["input"]}" alt="{name}">'
            f'{_heatmap_svg(entry["map"], scale)}</div><figcaption>{name}<br>{_number(entry["activation"])}'
            '</figcaption></figure>')


def _text_entry(entry: dict, tokens: list, scale: float) -> str:
    spans = "".join(f'<span style="background:rgba(230,0,0,{0.8 * max(a, 0) / scale:.3f})" title="{_number(a)}">'
                    f'{escape(t)}</span>' for t, a in zip(tokens, entry["token_activations"]))
    return f'<p class="text">{spans} <span class="muted">({_number(entry["activation"])})</span></p>'


def _tops(latent: dict, inputs: dict) -> str:
    """The latent's top inputs: images with its patch map over them, or texts with tokens highlighted."""
    if not latent["top"]:
        return ""
    values = [v for e in latent["top"] for v in (_flat(e["map"]) if "map" in e else e["token_activations"])]
    scale = max([v for v in values if v > 0], default=1.0)
    if "map" in latent["top"][0]:
        return '<div class="tops">' + "".join(_image_entry(e, scale) for e in latent["top"]) + "</div>"
    return "".join(_text_entry(e, inputs[str(e["input"])]["tokens"], scale) for e in latent["top"])


def _flat(grid: list) -> list:
    return [v for row in grid for v in row]


def _table(rows: list, columns: tuple[str, str], caption: str) -> str:
    if not rows:
        return ""
    body = "".join(f"<tr><td>{escape(str(r[columns[0]]))}</td><td>{_number(r[columns[1]])}</td></tr>" for r in rows)
    return (f"<table><caption>{caption}</caption><tr><th>{columns[0]}</th><th>{columns[1]}</th></tr>{body}</table>")


def _section(latent: dict, inputs: dict) -> str:
    j, concepts = latent["latent"], " ".join(c["concept"] for c in latent["concepts"])
    return (f'<section class="latent" id="latent-{j}" data-latent="{j}" data-concepts="{escape(concepts)}">'
            f'<h2>Latent {j}</h2><p class="muted">fires on {latent["fire_rate"]:.1%} of inputs; largest score '
            f'{_number(latent["max_activation"])}</p>{_tops(latent, inputs)}{_histogram_svg(latent["histogram"])}'
            f'{_table(latent["concepts"], ("concept", "cosine"), "best-aligned concepts")}'
            f'{_table(latent["attributions"], ("class", "attribution"), "mean attribution per class relied on")}'
            "</section>")


def _list_item(latent: dict) -> str:
    j = latent["latent"]
    best = latent["concepts"][0]["concept"] if latent["concepts"] else ""
    concepts = " ".join(c["concept"] for c in latent["concepts"])
    dead = ' class="dead"' if not latent["top"] else ""
    return (f'<a href="#latent-{j}"{dead} data-latent="{j}" data-concepts="{escape(concepts)}">{j} · '
            f'{latent["fire_rate"]:.1%} {escape(best)}</a>')


def render_page(data: dict, payload: str, title: str) -> str:
    """The whole page: `payload` is `data` as JSON, already safe inside a <script> element."""
    sections = "".join(_section(latent, data["inputs"]) for latent in data["latents"])
    items = "".join(_list_item(latent) for latent in data["latents"])
    setup = (f'{escape(data["hook"])}: {data["n_latents"]} latents over {data["n_inputs"]} {data["tower"]} inputs, '
             f'ranked by the {"pooled position" if data["rank_by"] == "pooled" else "largest activation"}')
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><nav><input id=\"search\" type=\"search\" "
            f'placeholder="latent index or concept">{items}</nav><main><h1>{escape(title)}</h1>'
            f'<p class="muted">{setup}</p>{sections}</main>'
            f'<script type="application/json" id="latent-data">{payload}</script><script>{SCRIPT}</script>'
            "</body></html>")
