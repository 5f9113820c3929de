"""Whole-model diagnosis for benchmarks/lowbit.md: compress SmolLM2-135M with one recipe and
log every layer's relative loss tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) as the sequential engine sees it
(H from calibration windows run through the already-compressed earlier blocks), then
print perplexity ratio, KL and top-1 against the reference on the first TOKENS of the
evaluation split.

    .venv/bin/python benchmarks/lowbit_diag.py RECIPE TOKENS LAYER_LOG.jsonl [WINDOWS (default 8)]

The layer losses come from wrapping the registered functions of vq, kmeans, gptq and
spqr (a benchmark-only wrapper: the library is not changed). One torch thread.
"""
import sys, json, time, copy, dataclasses, torch
torch.set_num_threads(1)
from slimlm.methods import load_all, METHODS
from slimlm.methods._kmeans import layer_loss
load_all()
recipe = sys.argv[1]; toks = int(sys.argv[2]); log = open(sys.argv[3], "a"); nwin = int(sys.argv[4]) if len(sys.argv) > 4 else 8
for name in ("vq", "kmeans", "gptq", "spqr"):
    spec = METHODS[name]
    def wrapped(w, stats, cfg, _fn=spec.fn):
        t = time.perf_counter(); p = _fn(w, stats, cfg)
        h = stats.hessian
        if h is not None:
            rl = layer_loss(w, p.dequantize(), h) / layer_loss(w, torch.zeros_like(w), h)
            r = dict(recipe=recipe, layer=stats.name, rel=rl, bpw=p.nbits()/w.numel(), s=round(time.perf_counter()-t,1))
            log.write(json.dumps(r)+"\n"); log.flush()
        return p
    METHODS[name] = dataclasses.replace(spec, fn=wrapped)
from slimlm.compress import CalibrationConfig, compress_model
from slimlm.eval.run import EvalConfig, evaluate
from slimlm.loading import load
ref = load("smollm2-135m")
lm = copy.copy(ref); lm.model = copy.deepcopy(ref.model)
t = time.perf_counter()
compress_model(lm, recipe, CalibrationConfig(n_windows=nwin), progress=False)
secs = time.perf_counter() - t
e = EvalConfig(max_tokens=toks)
b = evaluate(ref, e, progress=False)
r = evaluate(lm, e, reference=ref, progress=False)
print(json.dumps(dict(recipe=recipe, bpw=r["bpw"], ppl=r["ppl"], ratio=r["ppl"]/b["ppl"], kl=r["kl"], top1=r["top1"], tokens=r["tokens"], s=round(secs))), flush=True)
