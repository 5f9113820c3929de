"""Reports: the sweep table, Pareto frontiers and plot, a self-contained HTML page.

`write_report(dir)` renders what a sweep (and any fit) stored under `dir`: it reads
`sweep.json` and every `*/fit.json` below it, and writes `pareto.png` and
`report.html` next to them. It computes no metric; it only lays out stored ones.
"""

from __future__ import annotations

import json
from pathlib import Path

from slimlm.errors import SlimlmError

NOTES = (
    "On the embedded SmolLM2-135M, 4-bit asymmetric groups of 32 (or 16, 8) aligned to the source's "
    "Q4_1 blocks reproduce the reference almost exactly: that is an artifact of the source file, not a property "
    "of the method.",
    "Decode speed is measured with the runtime that computes from dequantized weights; other processes may have "
    "shared the CPU, so compare speeds only within one sweep.",
)


def load_results(directory: str | Path) -> tuple[dict, list[dict]]:
    """(the stored sweep, the stored fit results) of a sweep directory."""
    d = Path(directory)
    p = d / "sweep.json"
    if not p.is_file():
        raise SlimlmError(f"{d} holds no sweep.json; run `slimlm sweep MODEL --out {d}` first")
    try:
        sweep = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise SlimlmError(f"{p} is not valid JSON ({e}); re-run the sweep to rewrite it") from None
    fits = []
    for f in sorted(d.glob("*/fit.json")):
        try:
            fits.append(json.loads(f.read_text()))
        except json.JSONDecodeError:
            raise SlimlmError(f"{f} is not valid JSON; re-run the fit to rewrite it") from None
    return sweep, fits


def write_report(directory: str | Path, output: str | Path | None = None) -> Path:
    """Render `directory`'s stored sweep and fits to pareto.png and report.html; returns the HTML path."""
    from slimlm.report.html import render_html
    from slimlm.report.plot import pareto_png
    from slimlm.sweep import with_ratios

    d = Path(directory)
    sweep, fits = load_results(d)
    rows = with_ratios(sweep["rows"])
    ref = next((r for r in rows if r["recipe"] == "none" and "ppl" in r), None)
    for f in fits:  # a fit row's ratio against this sweep's reference, when the fit did not store one
        if ref and "row" in f and "ppl" in f["row"] and "ratio" not in f["row"]:
            f["row"]["ratio"] = f["row"]["ppl"] / ref["ppl"]
    png = pareto_png(rows, [f["row"] for f in fits if "row" in f], title=f"{sweep['model']}")
    (d / "pareto.png").write_bytes(png)
    notes = list(NOTES)
    if sweep.get("skipped"):
        notes.append(f"Not run within the time budget (re-run the same command to resume): {', '.join(sweep['skipped'])}.")
    page = render_html(rows, png, sweep["model"], fits, notes, sweep.get("eval"))
    out = Path(output) if output else d / "report.html"
    out.write_text(page)
    return out


__all__ = ["load_results", "write_report"]
