"""The report: Pareto frontiers against their definition, a plot, a page that needs no
network — checked by parsing and in headless Chromium."""

import base64
import json
import re

import numpy as np
import pytest

from conftest import run_cli
from slimlm.report import write_report
from slimlm.report.html import render_html
from slimlm.report.pareto import frontier_flags, pareto_front
from slimlm.report.plot import pareto_png


def _dominated(i, x, y):
    return any(x[j] <= x[i] and y[j] <= y[i] and (x[j] < x[i] or y[j] < y[i]) for j in range(len(x)))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 7, 40])
def test_front_is_exactly_the_non_dominated_points(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 6, n).astype(float)  # few distinct values: ties happen
    y = rng.integers(0, 6, n).astype(float)
    front = pareto_front(x, y)
    assert sorted(front) == [i for i in range(n) if not _dominated(i, x, y)]
    assert [x[i] for i in front] == sorted(x[i] for i in front)
    flipped = pareto_front(-x, y, maximize_x=True)
    assert sorted(flipped) == sorted(front)


def test_front_examples():
    #            0    1    2    3    4    5 (nan)
    bpw = [8.5, 4.5, 3.5, 4.5, 2.5, float("nan")]
    ratio = [1.0, 1.4, 9.3, 1.2, 50.0, 1.0]
    assert pareto_front(bpw, ratio) == [4, 2, 3, 0]  # 1 is beaten by 3 at the same bits; nan is no point
    assert pareto_front([1, 1], [2, 2]) == [0, 1]  # identical points both stay
    assert pareto_front([10, 20, 30], [3, 2, 1], maximize_x=True) == [2]  # fastest and best
    rows = [{"bpw": 4, "ratio": 2}, {"bpw": 4, "ratio": 1}, {"recipe": "x", "error": "no"}, {"bpw": 3, "ratio": 3}]
    assert frontier_flags(rows, "bpw", "ratio") == [False, True, False, True]


ROWS = [
    {"recipe": "none", "methods": [], "bpw": 32.0, "size_bytes": 538e6, "ppl": 15.0, "ratio": 1.0, "kl": 0.0,
     "top1": 1.0, "decode_tps": 20.0, "compress_s": 0.0},
    {"recipe": "rtn:bits=4,group=64", "methods": ["rtn"], "bpw": 4.5, "size_bytes": 180e6, "ppl": 21.0, "ratio": 1.4,
     "kl": 0.3, "top1": 0.8, "decode_tps": 22.0, "compress_s": 2.0},
    {"recipe": "rtn:bits=3,group=64", "methods": ["rtn"], "bpw": 3.5, "size_bytes": 170e6, "ppl": 140.0, "ratio": 9.3,
     "kl": 2.0, "top1": 0.4, "decode_tps": 23.0, "compress_s": 2.0},
    {"recipe": "gptq:bits=3,group=64", "methods": ["gptq"], "bpw": 3.5, "size_bytes": 170e6, "ppl": 49.0,
     "ratio": 3.3, "kl": 1.1, "top1": 0.5, "decode_tps": 21.0, "compress_s": 60.0},
    {"recipe": "rtn:bits=4,group=999", "methods": ["rtn"], "error": "group <too> large & refused"},
]
FIT = {"row": ROWS[1] | {"recipe": "rtn:bits=3,group=64+rtn:bits=8,group=64@*.down_proj", "bpw": 3.5, "ratio": 2.1},
       "recipe_yaml": "stages: []\n", "budget_desc": "≤ 3.5 bits per weight", "verdict": "Budget met."}


def _page(tmp_path):
    png = pareto_png(ROWS, [FIT["row"]], title="test")
    page = tmp_path / "report.html"
    page.write_text(render_html(ROWS, png, "model <x>", [FIT], ["a note"], {"seq_len": 512}))
    return page, png


def test_plot_is_a_png(tmp_path):
    _, png = _page(tmp_path)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_page_needs_no_network(tmp_path):
    page, png = _page(tmp_path)
    html = page.read_text()
    assert not re.search(r"https?://", html)
    assert "url(" not in html and "@import" not in html
    refs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", html)
    assert refs and all(r.startswith("data:") for r in refs)
    embedded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html).group(1)
    assert base64.b64decode(embedded) == png
    assert "group &lt;too&gt; large &amp; refused" in html and "model &lt;x&gt;" in html  # escaped
    assert html.count("<tr") >= len(ROWS) + 1


@pytest.fixture(scope="module")
def chromium():
    from slimlm.report.browser import ensure_chromium

    path, why = ensure_chromium()
    if path is None:
        pytest.skip(f"headless Chromium unavailable: {why}")
    return path


def test_page_renders_offline_in_chromium(tmp_path, chromium):
    from slimlm.report.browser import dump_dom, screenshot

    page, _ = _page(tmp_path)
    dom = dump_dom(chromium, page)
    assert 'data-images-ok="yes"' in dom  # every image decoded with networking mapped away
    assert "gptq:bits=3,group=64" in dom
    shot = screenshot(chromium, page, tmp_path / "shot.png", height=1400)
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))[..., :3]  # (H, W, 3) in [0, 1]
    assert pixels.shape[:2] == (1400, 1280)
    assert (pixels.std(-1) > 0.1).sum() > 300  # coloured plot markers are on screen, not a blank page
    assert (pixels.mean(-1) < 0.5).sum() > 5000  # and text


def test_report_from_a_stored_sweep_and_fit(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"model": "m", "rows": [
        {k: v for k, v in r.items() if k != "ratio"} for r in ROWS], "skipped": ["vq:bits=2"], "eval": {}}))
    (tmp_path / "fit").mkdir()
    (tmp_path / "fit" / "fit.json").write_text(json.dumps(FIT))
    out = write_report(tmp_path)
    html = out.read_text()
    assert "fit: rtn:bits=3" in html and "Budget met." in html and "vq:bits=2" in html
    assert (tmp_path / "pareto.png").is_file()
    code, stdout, _ = run_cli("report", tmp_path)
    assert code == 0 and "9.333" in stdout and "report:" in stdout  # ratio recomputed from the stored ppl
    code, _, err = run_cli("report", tmp_path / "nowhere")
    assert code == 1 and "no sweep.json" in err
