"""The report: one self-contained HTML page (table, Pareto plot, recipes, machine).

Nothing is fetched when the page opens: styles are inline and the plot is embedded as
a `data:` URI, so the file can be mailed or opened offline. A two-line inline script
marks `<body data-images-ok>` once every image decoded — what the headless-browser
test reads back.
"""

from __future__ import annotations

import base64
import datetime
import html
import os
import platform
from pathlib import Path

from slimlm.report.pareto import frontier_flags

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12.5px}th,td{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f4f4f4;position:sticky;top:0}td:first-child,th:first-child{text-align:left;font-family:monospace}
tr.front td{background:#eef7ee}tr.fit td{background:#fdeaea;font-weight:600}tr.failed td{color:#999}
img{max-width:100%;border:1px solid #ddd}pre{background:#f7f7f7;padding:.6em;overflow-x:auto;font-size:12px}
.note{color:#555;font-size:12.5px}
"""

_SCRIPT = ("addEventListener('load',function(){var ok=Array.prototype.every.call(document.images,"
           "function(i){return i.complete&&i.naturalWidth>0});document.body.dataset.imagesOk=ok?'yes':'no'});")

_COLUMNS = [("bpw", "bpw", "{:.3f}"), ("size_bytes", "size MB", None), ("ppl", "ppl", "{:.3f}"),
            ("ratio", "ratio", "{:.3f}"), ("kl", "KL", "{:.4f}"), ("top1", "top-1", "{:.3f}"),
            ("decode_tps", "decode tok/s", "{:.1f}"), ("compress_s", "compress s", "{:.1f}")]


def machine_description() -> dict:
    """Where the numbers were measured: CPU, cores, OS, Python and torch versions."""
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
            "os": platform.platform(), "python": platform.python_version(), "torch": torch.__version__}


def _cell(row, key, fmt):
    if key not in row:
        return "-"
    if key == "size_bytes":
        return f"{row[key] / 1e6:.1f}"
    return fmt.format(row[key])


def _table(rows: list[dict], fit_rows: list[dict]) -> str:
    all_rows = rows + fit_rows
    front = frontier_flags(all_rows, "bpw", "ratio")
    out = ["<table><thead><tr><th>recipe</th>" + "".join(f"<th>{h}</th>" for _, h, _ in _COLUMNS) +
           "<th>frontier</th></tr></thead><tbody>"]
    for i, r in enumerate(all_rows):
        name = html.escape(r.get("label", r["recipe"]))
        if "error" in r:
            out.append(f'<tr class="failed"><td>{name}</td><td colspan="{len(_COLUMNS) + 1}" style="text-align:left">'
                       f"failed: {html.escape(r['error'])}</td></tr>")
            continue
        cls = "fit" if i >= len(rows) else ("front" if front[i] else "")
        cells = "".join(f"<td>{_cell(r, k, f)}</td>" for k, _, f in _COLUMNS)
        out.append(f'<tr class="{cls}"><td>{name}</td>{cells}<td>{"●" if front[i] else ""}</td></tr>')
    out.append("</tbody></table>")
    return "\n".join(out)


def render_html(rows: list[dict], png: bytes, model: str, fits: list[dict] = (), notes: list[str] = (),
                eval_desc: dict | None = None) -> str:
    """The whole page as a string. `rows` carry `ratio`; each of `fits` is a fit result
    (its `row`, `recipe_yaml`, `budget`, `verdict`)."""
    fit_rows = [f["row"] | {"label": f"fit: {f['row']['recipe'][:60]}"} for f in fits if "row" in f]
    esc = html.escape
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>slimlm report — {esc(model)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>slimlm report — {esc(model)}</h1>",
        f"<p class='note'>Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}. "
        "Perplexity ratio and KL divergence are measured against the uncompressed model on the same tokens; "
        "bits per weight count every stored bit of the block linears; size is the saved directory. "
        "Rows on the bits-per-weight / perplexity frontier are marked ●.</p>",
    ]
    if eval_desc:
        parts.append("<p class='note'>Evaluation: " + esc(", ".join(f"{k}={v}" for k, v in eval_desc.items())) + "</p>")
    parts += ["<h2>Results</h2>", _table(rows, fit_rows), "<h2>Trade-off</h2>",
              f"<img alt='Pareto plot' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"]
    for f in fits:
        parts.append("<h2>Fit to a budget</h2>")
        parts.append(f"<p>Budget: {esc(f.get('budget_desc', ''))}. {esc(f.get('verdict', ''))}</p>")
        parts.append(f"<pre>{esc(f.get('recipe_yaml', ''))}</pre>")
    parts.append("<h2>Recipes</h2><pre>" + esc("\n".join(r["recipe"] for r in rows)) + "</pre>")
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("<h2>Machine</h2><table>" + "".join(
        f"<tr><td>{esc(k)}</td><td style='text-align:left'>{esc(str(v))}</td></tr>"
        for k, v in machine_description().items()) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
