"""Pruning and low-rank benchmarks on the embedded model (results in benchmarks/pruning.md).

    python benchmarks/pruning.py structured   structured pruning: perplexity, KL, size, and decode
                                              speed of pruned vs unpruned, interleaved in one run
    python benchmarks/pruning.py spectrum     WeLore: share of block-linear weights kept per threshold
    python benchmarks/pruning.py recipes R..  per recipe: compress, save (size), perplexity
    python benchmarks/pruning.py table FILE   a markdown table from `slimlm sweep --json` output

The unstructured / N:M and WeLore perplexity tables come from `slimlm sweep` (commands in
pruning.md). Every figure is printed as JSON lines too. Other work shared the 2 CPU cores
while these ran: speeds are only compared within one run, as ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import slimlm
from slimlm.data import Split, calibration_windows, eval_windows, resolve_text
from slimlm.eval.quality import evaluate_windows
from slimlm.eval.size import dir_bytes
from slimlm.eval.speed import bench_model
from slimlm.prune import Shape, StructuredConfig, prune_structured, save_pruned

STRUCTURED = {
    "ffn 25%": StructuredConfig(ffn=0.25),
    "ffn 50%": StructuredConfig(ffn=0.5),
    "1 of 3 query heads per group": StructuredConfig(heads=1),
    "ffn 25% + 1 head/group": StructuredConfig(ffn=0.25, heads=1),
    "3 blocks": StructuredConfig(blocks=3),
}


def structured(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    ref = slimlm.load("smollm2-135m")
    text, _ = resolve_text(None, Split.CALIBRATION)
    calib = calibration_windows(ref.tokenizer, text, args.calib_tokens // 512, 512, 0)
    ev_text, _ = resolve_text(None, Split.EVALUATION)
    windows = eval_windows(ref.tokenizer, ev_text, 512, args.max_tokens)
    base = evaluate_windows(ref.model, windows, None, progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        from slimlm.models.sources import save_hf_dir

        (Path(tmp) / "ref").mkdir()
        save_hf_dir(ref.model, ref.tokenizer, Path(tmp) / "ref")
        ref_bytes = dir_bytes(Path(tmp) / "ref")
        for name in args.configs or STRUCTURED:
            cfg = STRUCTURED[name]
            t0 = time.perf_counter()
            pruned, info = prune_structured(ref, cfg, calib)
            secs = time.perf_counter() - t0
            path = save_pruned(pruned, Path(tmp) / "p", info, overwrite=True)
            q = evaluate_windows(pruned.model, windows, ref.model, progress=False)
            # decode speed: pruned and unpruned alternate, so both see the same background load
            # (--head-bits: both run with the output head quantized by the runtime, as a deployment would)
            from slimlm.runtime.lean import RuntimeConfig

            # (--recipe: both with their block linears compressed by it, timed from copies)
            rt = RuntimeConfig(head_bits=args.head_bits, head_group=args.head_group) if args.head_bits else None
            r_model, p_model = ref.model, pruned.model
            if args.recipe:
                import copy

                from slimlm.compress import compress_model
                from slimlm.models.loaded import LoadedModel

                r_model, p_model = copy.deepcopy(ref.model), copy.deepcopy(pruned.model)
                for m in (r_model, p_model):
                    compress_model(LoadedModel(model=m, tokenizer=ref.tokenizer, source="bench", kind="hf"),
                                   args.recipe, progress=False)
            r_tps, p_tps = [], []
            for _ in range(args.rounds):
                r_tps.append(bench_model(r_model, ref.tokenizer, runs=args.runs, runtime=rt)["decode_tps"])
                p_tps.append(bench_model(p_model, pruned.tokenizer, runs=args.runs, runtime=rt)["decode_tps"])
            s = Shape.of(pruned.config)
            row = dict(config=name, ffn=cfg.ffn, heads=cfg.heads, blocks=cfg.blocks, inter=s.inter, q_heads=s.q_heads,
                       n_blocks=s.n_blocks, linear_weights=info["block_linear_weights"][1],
                       linear_share=info["block_linear_weights"][1] / info["block_linear_weights"][0],
                       bytes=dir_bytes(path), ref_bytes=ref_bytes, ppl=q["ppl"], ref_ppl=base["ppl"],
                       ppl_ratio=q["ppl"] / base["ppl"], kl=q["kl"], top1=q["top1"], tokens=q["tokens"],
                       ref_decode_tps=statistics.median(r_tps), decode_tps=statistics.median(p_tps),
                       speedup=statistics.median(p / r for p, r in zip(p_tps, r_tps)),
                       threads=torch.get_num_threads(), prune_s=round(secs, 1), head_bits=args.head_bits or 32,
                       head_group=args.head_group if args.head_bits else None, speed_recipe=args.recipe or "none")
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def spectrum(args) -> None:
    from slimlm.formats.lowrank import breakeven_rank
    from slimlm.methods.lowrank import rank_for

    lm = slimlm.load("smollm2-135m")
    sig = {}
    for name in lm.adapter.linear_names(lm.model):
        sig[name] = (lm.model.get_submodule(name).weight.shape, torch.linalg.svdvals(lm.model.get_submodule(name).weight.double()))
    total = sum(s[0] * s[1] for s, _ in sig.values())
    for tau in args.thresholds:
        kept, factored = 0, 0
        for (m, n), sv in sig.values():
            k = rank_for(sv, tau)
            factored += k < breakeven_rank(m, n)
            kept += k * (m + n) if k < breakeven_rank(m, n) else m * n
        print(json.dumps(dict(threshold=tau, weight_share=kept / total, factored=factored, layers=len(sig))), flush=True)


def recipes(args) -> None:
    """Each recipe: compress a fresh copy, save, perplexity on the evaluation split (no KL, to
    halve the cost on a shared machine); one JSON line per recipe as soon as it is done."""
    import copy

    from slimlm.compress import CalibrationConfig, Recipe, compress_model
    from slimlm.formats.store import save_compressed

    torch.set_num_threads(args.threads)
    ref = slimlm.load("smollm2-135m")
    ev_text, _ = resolve_text(None, Split.EVALUATION)
    windows = eval_windows(ref.tokenizer, ev_text, 512, args.max_tokens)
    base = evaluate_windows(ref.model, windows, None, progress=False)
    print(json.dumps(dict(recipe="reference", ppl=base["ppl"], tokens=base["tokens"])), flush=True)
    calib = CalibrationConfig.from_tokens(args.calib_tokens)
    for text in args.recipe:
        recipe = Recipe.parse(text)
        lm = copy.copy(ref)
        lm.model = copy.deepcopy(ref.model)
        t0 = time.perf_counter()
        compress_model(lm, recipe, calib, progress=False)
        secs = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            path = save_compressed(lm, Path(tmp) / "m")
            size = dir_bytes(path)
        from slimlm.eval.size import linear_bits

        bits, numel = linear_bits(lm)
        q = evaluate_windows(lm.model, windows, None, progress=False)
        print(json.dumps(dict(recipe=recipe.to_string(), bpw=bits / numel, size_bytes=size, ppl=q["ppl"],
                              ratio=q["ppl"] / base["ppl"], tokens=q["tokens"], compress_s=round(secs, 1),
                              threads=torch.get_num_threads())), flush=True)
        del lm


def table(args) -> None:
    rows = json.loads(Path(args.file).read_text())
    print("| recipe | bpw | size MB | ppl | ratio | KL | top-1 | compress s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| `{r['recipe']}` | {r['bpw']:.3f} | {r['size_bytes'] / 1e6:.1f} | {r['ppl']:.2f} | {r['ratio']:.3f} | "
              f"{r['kl']:.4f} | {r['top1']:.3f} | {r['compress_s']:.0f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("structured")
    s.add_argument("--configs", nargs="*", choices=list(STRUCTURED))
    s.add_argument("--max-tokens", type=int, default=8192)
    s.add_argument("--calib-tokens", type=int, default=8192)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--runs", type=int, default=3)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--head-bits", type=int, default=0, help="decode with the output head quantized to these bits (0: FP32)")
    s.add_argument("--head-group", type=int, default=64, help="group size of that head quantization")
    s.add_argument("--recipe", help="time both models with their block linears compressed by this recipe (quality "
                                    "figures stay those of the uncompressed pruned model)")
    s.set_defaults(fn=structured)
    w = sub.add_parser("spectrum")
    w.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05, 0.03])
    w.set_defaults(fn=spectrum)
    r = sub.add_parser("recipes")
    r.add_argument("recipe", nargs="+")
    r.add_argument("--max-tokens", type=int, default=4096)
    r.add_argument("--calib-tokens", type=int, default=4096)
    r.add_argument("--threads", type=int, default=1)
    r.set_defaults(fn=recipes)
    t = sub.add_parser("table")
    t.add_argument("file")
    t.set_defaults(fn=table)
    a = p.parse_args(argv)
    a.fn(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
