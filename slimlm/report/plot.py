"""The Pareto plot: bits per weight vs perplexity ratio, and decode speed vs perplexity ratio.

Each recipe is a point, the frontier a line through its points, a `fit` result a star.
Rendered with matplotlib's Agg backend (no display needed) to PNG bytes.
"""

from __future__ import annotations

import io

from slimlm.report.pareto import pareto_front

def _palette(rows) -> dict:
    """Method combination -> colour, the same in both panels."""
    import matplotlib

    colors = matplotlib.colormaps["tab10"].colors
    names = dict.fromkeys(_method(r) for r in rows)
    return {m: colors[i % len(colors)] for i, m in enumerate(names)}


def _method(row) -> str:
    return "+".join(row.get("methods") or []) or "reference"


def _panel(ax, rows, x, xlabel, maximize_x, fit_rows, colors):
    pts = [r for r in rows if x in r and "ratio" in r and (r["recipe"] != "none" or x == "decode_tps")]
    for r in pts:
        ax.scatter(r[x], r["ratio"], color=colors[_method(r)], s=28, zorder=3, label=_method(r))
    front = pareto_front([r[x] for r in pts], [r["ratio"] for r in pts], maximize_x)
    if front:
        ax.plot([pts[i][x] for i in front], [pts[i]["ratio"] for i in front], color="0.3", lw=1, zorder=2,
                label="Pareto frontier")
        for i in front:
            ax.annotate(pts[i]["recipe"][:28], (pts[i][x], pts[i]["ratio"]), fontsize=6, xytext=(3, 3),
                        textcoords="offset points", color="0.25")
    for r in fit_rows:
        if x in r and "ratio" in r:
            ax.scatter(r[x], r["ratio"], marker="*", s=180, color="crimson", edgecolor="k", zorder=4, label="fit")
    ax.axhline(1.0, color="0.6", lw=0.8, ls="--")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("perplexity ÷ reference (log)")
    ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))  # one legend entry per method
    ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")


def pareto_png(rows: list[dict], fit_rows: list[dict] = (), title: str = "") -> bytes:
    """PNG bytes of the two Pareto panels for sweep `rows` (with `ratio`) and `fit_rows`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    have_speed = any("decode_tps" in r for r in rows)
    fig, axes = plt.subplots(1, 2 if have_speed else 1, figsize=(12 if have_speed else 6.5, 4.8), squeeze=False)
    colors = _palette(rows)
    _panel(axes[0, 0], rows, "bpw", "bits per weight (block linears)", False, fit_rows, colors)
    if have_speed:
        _panel(axes[0, 1], rows, "decode_tps", "decode tokens/s (higher is better)", True, fit_rows, colors)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
