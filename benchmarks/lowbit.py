"""Below 3 bits: quality versus bits per weight on the embedded model.

Compresses SmolLM2-135M with each recipe, evaluates it against the reference on the
built-in evaluation split (perplexity, KL, top-1; DESIGN.md's protocol) and appends one
JSON line per recipe to `--out` as soon as it is done (a long run loses nothing when
interrupted). `--plot` draws every JSON-lines file given into one PNG: perplexity
ratio against bits per weight (2.0–4.5), one line per method, and prints the same rows as
a markdown table.

    .venv/bin/python benchmarks/lowbit.py --out benchmarks/out/lowbit.jsonl 'vq:bits=2' 'kmeans:bits=3'
    .venv/bin/python benchmarks/lowbit.py --plot benchmarks/lowbit.png benchmarks/out/cal.jsonl benchmarks/out/lowbit.jsonl

`--layer-blocks 3 28` instead compares recipes on single layers: each one-stage recipe
compresses the q, k, gate and down projections of those blocks (Hessians from the
calibration windows run through the uncompressed model), and the relative layer loss
tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) is printed with the layer's bits per weight and the seconds.
A codebook shared by role (`vq:...,share=role`) is trained on the first block given and
reused by the later ones; the bits per weight of those count no codebook bit.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path

import torch


def run(recipes: list[str], out: Path, windows: int, eval_tokens: int, save: str | None) -> None:
    from slimlm.compress import CalibrationConfig, Recipe, compress_model
    from slimlm.eval.run import EvalConfig, evaluate
    from slimlm.formats.store import load_compressed, save_compressed
    from slimlm.loading import load

    parsed = [Recipe.load(r) for r in recipes]  # every recipe checked before any work
    ref = load("smollm2-135m")
    ecfg = EvalConfig(max_tokens=eval_tokens)
    base = evaluate(ref, ecfg, progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        f.write(json.dumps(dict(recipe="reference", bpw=base["bpw"], ppl=base["ppl"], ratio=1.0, kl=0.0, top1=1.0,
                                tokens=base["tokens"], date=str(datetime.date.today()))) + "\n")
    for recipe in parsed:
        lm = copy.copy(ref)
        lm.model = copy.deepcopy(ref.model)
        t0 = time.perf_counter()
        compress_model(lm, recipe, CalibrationConfig(n_windows=windows), progress=False)
        secs = time.perf_counter() - t0
        if save:  # check the saved directory gives the same model, and size it
            path = Path(save) / recipe.to_string().replace(":", "_").replace(",", "_")
            save_compressed(lm, path, overwrite=True)
            lm = load_compressed(path)
        r = evaluate(lm, ecfg, reference=ref, path=path if save else None, progress=False)
        row = dict(recipe=recipe.to_string(), bpw=r["bpw"], ppl=r["ppl"], ratio=r["ppl"] / base["ppl"], kl=r["kl"],
                   top1=r["top1"], tokens=r["tokens"], size_bytes=r["size_bytes"], compress_s=round(secs, 1),
                   calib_windows=windows, threads=torch.get_num_threads(), date=str(datetime.date.today()))
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        del lm


def layer_losses(recipes: list[str], blocks: list[int], windows: int, out: Path) -> None:
    from slimlm.compress import Recipe
    from slimlm.compress.calibration import BlockInputs, StatsCollector
    from slimlm.data import Split, calibration_windows, resolve_text
    from slimlm.loading import load
    from slimlm.methods import LayerStats
    from slimlm.methods._kmeans import layer_loss

    stages = [Recipe.load(r).stages[0] for r in recipes]
    lm = load("smollm2-135m")
    text, _ = resolve_text(None, Split.CALIBRATION)
    model_blocks = lm.adapter.blocks(lm.model)
    inputs = BlockInputs(lm.model, model_blocks[0], calibration_windows(lm.tokenizer, text, windows, 512, 0))
    names = ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.down_proj")
    alive = []  # every packed layer stays referenced, so a codebook shared by role (vq share=role) is
    # trained on the first block given and reused by the later ones, as in a compression run
    for b in range(max(blocks) + 1):
        if b in blocks:
            col = StatsCollector(model_blocks[b], {n: n for n in names}, True, True)
            inputs.run(model_blocks[b])
            col.remove()
            for n in names:
                st = col.stats(n)
                w = model_blocks[b].get_submodule(n).weight.detach().float()
                base = layer_loss(w, torch.zeros_like(w), st["hessian"])
                for stage in stages:
                    t0 = time.perf_counter()
                    p = stage.spec.fn(w, LayerStats(name=f"model.layers.{b}.{n}", **st), stage.config)
                    alive.append(p)
                    row = dict(block=b, layer=n, recipe=stage.to_string(), bpw=p.nbits() / w.numel(),
                               rel_loss=layer_loss(w, p.dequantize(), st["hessian"]) / base,
                               seconds=round(time.perf_counter() - t0, 2), calib_windows=windows,
                               date=str(datetime.date.today()))
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(json.dumps(row), flush=True)
        if b < max(blocks):
            inputs.advance(model_blocks[b])


def curve_rows(files: list[str], lo: float = 1.9, hi: float = 4.6) -> list[dict]:
    """Rows of the JSON-lines result files with bits per weight in [lo, hi], each with its
    perplexity ratio to the reference row that precedes it in its file (rows of
    benchmarks/calibrated.py carry no ratio). Rows without bits per weight of the block
    linears (llama.cpp files) are left out."""
    rows = []
    for f in files:
        ref = None
        for line in Path(f).read_text().splitlines():
            if not line.strip():
                continue
            r = json.loads(line)
            if r["recipe"] == "reference":
                ref = r
                continue
            if "bpw" not in r or not lo <= r["bpw"] <= hi or ref is None or ref["tokens"] != r["tokens"]:
                continue
            rows.append(dict(r, ratio=r["ppl"] / ref["ppl"], file=Path(f).name, method=r["recipe"].split(":")[0].split()[0]))
    return sorted(rows, key=lambda r: (r["method"], r["bpw"], r["ratio"]))


def table(rows: list[dict]) -> str:
    """The rows as a markdown table, best ratio first within each method."""
    out = ["| method | recipe | bpw | ppl | ratio | KL | top-1 | tokens | compress s | file |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kl, top1 = (f"{r[k]:.3f}" if k in r else "—" for k in ("kl", "top1"))
        out.append(f"| {r['method']} | `{r['recipe']}` | {r['bpw']:.3f} | {r['ppl']:.2f} | {r['ratio']:.3f} | "
                   f"{kl} | {top1} | {r['tokens']} | {r.get('compress_s', '')} | {r['file']} |")
    return "\n".join(out)


def plot(png: Path, files: list[str]) -> None:
    """One PNG: perplexity ratio against bits per weight for every method in `files`; each
    method's points, joined along its Pareto front. Prints the same rows as a table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from slimlm.report.pareto import pareto_front

    rows = curve_rows(files)
    full = max(r["tokens"] for r in rows)
    by_method: dict[tuple, list] = {}
    for r in rows:
        by_method.setdefault((r["method"], r["tokens"]), []).append(r)
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for (method, tokens), pts in sorted(by_method.items(), key=lambda kv: (-kv[0][1], kv[0][0])):
        xs, ys = [p["bpw"] for p in pts], [p["ratio"] for p in pts]
        short = tokens != full  # evaluated on fewer tokens: hollow markers, dotted
        line = ax.plot(xs, ys, "o", alpha=0.45, mfc="none" if short else None)[0]
        front = pareto_front(xs, ys)
        ax.plot([xs[i] for i in front], [ys[i] for i in front], "o:" if short else "o-", color=line.get_color(),
                mfc="none" if short else None, label=method + (f" ({tokens:,} tokens)" if short else ""))
    ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(2.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("bits per weight (block linears, all overheads)")
    ax.set_ylabel("perplexity ÷ reference (log)")
    ax.set_title(f"SmolLM2-135M: quality versus bits ({full:,} evaluation tokens unless marked)")
    ax.set_ylim(top=min(ax.get_ylim()[1], 1e3))  # RTN 2-bit (×2·10⁵) and others beyond are in the table
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    print(table(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/lowbit.jsonl"))
    ap.add_argument("--windows", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--save", help="save each model under this directory and evaluate the reloaded copy")
    ap.add_argument("--layer-blocks", type=int, nargs="+", help="compare recipes on the layers of these blocks")
    ap.add_argument("--plot", type=Path, help="draw the JSON-lines files given as arguments into this PNG")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.plot:
        plot(a.plot, a.recipes)
    elif a.layer_blocks:
        layer_losses(a.recipes, a.layer_blocks, a.windows, a.out)
    else:
        run(a.recipes, a.out, a.windows, a.eval_tokens, a.save)


if __name__ == "__main__":
    main()
