"""Calibrated quantization on the embedded model: RTN vs GPTQ vs AWQ vs SpQR (and peers).

For each recipe: load the embedded model, compress it (default calibration: 32 windows of
512 tokens of the built-in calibration split), time it, sample the peak RSS while it
runs, save it (whole-directory size), and evaluate it on the built-in evaluation split
against the uncompressed model (ppl, KL, top-1; `slimlm.eval` protocol). The reference
logits are computed once per window and replayed for every recipe. One JSON line per
result goes to --out.

Peers, when installed (optional, never in tests): llama.cpp types requantized from the
embedded GGUF with `llama_model_quantize` and scored on the same token windows; HQQ's
calibration-free quantizer on every block linear (dequantized into the model).

    .venv/bin/python benchmarks/calibrated.py --eval-tokens 8192 --out /tmp/cal.jsonl \\
        rtn:bits=4,group=64 gptq:bits=4,group=64 awq:bits=4,group=64 spqr:bits=4

With --layers, a cheap per-layer proxy instead (see `layer_errors`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import slimlm
from slimlm.compress.engine import CalibrationConfig, compress_model
from slimlm.data import Split, eval_windows, resolve_text
from slimlm.eval.quality import evaluate_windows
from slimlm.eval.size import size_report
from slimlm.formats.store import save_compressed


class CachedReference:
    """Stands in for the reference model in `evaluate_windows`: logits computed once per window."""

    def __init__(self, model):
        self.model, self.cache = model, {}

    def __call__(self, ids, use_cache=False):
        key = ids.numpy().tobytes()
        if key not in self.cache:
            with torch.inference_mode():
                self.cache[key] = self.model(ids, use_cache=False).logits
        return type("Out", (), {"logits": self.cache[key]})


class PeakRSS:
    """Samples this process's resident set size every 0.1 s while in the `with` block."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _rss(self):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def run_recipe(recipe: str, windows, ref, calib: CalibrationConfig, tmp: Path) -> dict:
    lm = slimlm.load("smollm2-135m")
    with PeakRSS() as rss:
        t0 = time.perf_counter()
        compress_model(lm, recipe, calib, progress=False)
        seconds = time.perf_counter() - t0
    d = save_compressed(lm, tmp / recipe.replace(":", "_").replace(",", "_").replace("=", ""), overwrite=True)
    out = dict(recipe=recipe, compress_s=round(seconds, 1), peak_rss_gib=round(rss.peak / 2 ** 30, 2))
    out.update(size_report(lm, d))
    out.update(evaluate_windows(lm.model, windows, ref, progress=False))
    return out


def hqq_peer(bits: int, group: int, windows, ref) -> dict:
    """HQQ (calibration-free, half-quadratic zero/scale optimisation) on every block linear."""
    from hqq.core.quantize import Quantizer

    lm = slimlm.load("smollm2-135m")
    t0 = time.perf_counter()
    n = 0
    for name in lm.adapter.linear_names(lm.model):
        lin = lm.model.get_submodule(name)
        wq, meta = Quantizer.quantize(lin.weight.data, nbits=bits, group_size=group, optimize=True, axis=1,
                                      compute_dtype=torch.float32, device="cpu")
        lin.weight.data = Quantizer.dequantize(wq, meta).reshape(lin.weight.shape).float()
        n += lin.weight.numel()
    seconds = time.perf_counter() - t0
    out = dict(recipe=f"hqq w{bits} g{group}", compress_s=round(seconds, 1),
               bpw=bits + 32 / group)  # fp16 scale + fp16 zero per group, as HQQ stores by default
    out.update(evaluate_windows(lm.model, windows, ref, progress=False))
    return out


def llama_cpp_peer(qtype: str, windows, ref, tmp: Path) -> dict:
    """A llama.cpp type requantized from the embedded GGUF, scored on the same token windows."""
    import llama_cpp

    src = str(slimlm.models.builtin_path("smollm2-135m"))
    dst = str(tmp / f"model-{qtype}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype}")
    params.allow_requantize = True
    t0 = time.perf_counter()
    if llama_cpp.llama_model_quantize(src.encode(), dst.encode(), params) != 0:
        raise RuntimeError(f"llama.cpp could not quantize to {qtype}")
    seconds = time.perf_counter() - t0
    from _llama import load

    llm = load(dst, n_ctx=windows[0].numel(), logits_all=True, n_threads=2)  # extra buffer types crash here
    nll, kl, agree, n = 0.0, 0.0, 0, 0
    for ids in windows:
        llm.reset()
        llm.eval(ids.tolist())
        logp = F.log_softmax(torch.from_numpy(llm.scores[: ids.numel()].copy()).float()[:-1], -1)
        target = ids[1:]
        nll += float(-logp.gather(1, target.unsqueeze(1)).sum())
        ref_logp = F.log_softmax(ref(ids.unsqueeze(0)).logits[0].float()[:-1], -1)
        kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
        n += target.numel()
    return dict(recipe=f"llama.cpp {qtype}", compress_s=round(seconds, 1), size_bytes=os.path.getsize(dst),
                ppl=math.exp(nll / n), nll=nll / n, kl=kl / n, top1=agree / n, tokens=n)


def layer_errors(layers: list[str], recipes: list[str], calib_tokens: int) -> list[dict]:
    """Per-layer proxy, no sequential engine: statistics of the uncompressed model's inputs to
    `layers`, then each recipe's single stage applied to each layer alone, scored by the
    relative output error tr(D H Dᵀ) / tr(W H Wᵀ) (D = W − Ŵ) and its exact bits per weight."""
    from slimlm.compress.calibration import StatsCollector
    from slimlm.compress.recipe import Recipe
    from slimlm.data import calibration_windows
    from slimlm.methods import LayerStats

    lm = slimlm.load("smollm2-135m")
    text, _ = resolve_text(None, Split.CALIBRATION)
    windows = calibration_windows(lm.tokenizer, text, max(1, calib_tokens // 512), 512, 0)
    col = StatsCollector(lm.model, {n: n for n in layers}, True, True)
    with torch.inference_mode():
        for w in windows:
            lm.model(w.unsqueeze(0), use_cache=False)
    col.remove()
    stats = {n: col.stats(n) for n in layers}
    rows = []
    for name in layers:
        w = lm.model.get_submodule(name).weight.detach().float()
        h = stats[name]["hessian"]
        base = float(((w.double() @ h) * w.double()).sum())
        for r in recipes:
            stage = Recipe.parse(r).stages[0]
            t0 = time.perf_counter()
            p = stage.spec.fn(w, LayerStats(name=name, **stats[name]), stage.config)
            d = (w - p.dequantize()).double()
            rows.append(dict(layer=name, recipe=r, rel_err=float(((d @ h) * d).sum()) / base,
                             bpw=p.nbits() / w.numel(), seconds=round(time.perf_counter() - t0, 2)))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("recipes", nargs="*")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--calib-tokens", type=int, default=16384)
    ap.add_argument("--llama", nargs="*", default=[], help="llama.cpp types, e.g. Q8_0 Q5_0 Q4_0 IQ4_NL")
    ap.add_argument("--hqq", nargs="*", default=[], help="bits,group pairs, e.g. 4,64 3,64")
    ap.add_argument("--layers", default="", help="per-layer proxy only: these layers (comma-separated), each recipe alone")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    if args.layers:
        rows = layer_errors(args.layers.split(","), args.recipes, args.calib_tokens)
        with open(args.out, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return
    reference = slimlm.load("smollm2-135m")
    text, desc = resolve_text(None, Split.EVALUATION)
    windows = eval_windows(reference.tokenizer, text, 512, args.eval_tokens)
    ref = CachedReference(reference.model)
    calib = CalibrationConfig.from_tokens(args.calib_tokens)

    def emit(row):
        row.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), text=desc, threads=2,
                   ru_maxrss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2))
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    emit(dict(recipe="reference", **evaluate_windows(reference.model, windows, ref, progress=False)))
    with tempfile.TemporaryDirectory(prefix="calibrated-") as tmp:
        for r in args.recipes:
            emit(run_recipe(r, windows, ref, calib, Path(tmp)))
        for q in args.llama:
            emit(llama_cpp_peer(q, windows, ref, Path(tmp)))
        for bg in args.hqq:
            bits, group = (int(v) for v in bg.split(","))
            emit(hqq_peer(bits, group, windows, ref))


if __name__ == "__main__":
    main()
