"""Runtime benchmark: slimlm's lean runtime against llama.cpp, same prompt, same threads, same run.

    .venv/bin/python benchmarks/runtime.py --threads 2 --prompt-tokens 128 --decode-tokens 64 --runs 3

Models (compressed once into benchmarks/out/, RTN of the block linears): fp32, w8 g64,
w4 g32, w4 g64, w4 g32 symmetric (w4g32s: llama.cpp Q4_0's layout, one fp16 scale per 32
weights, 4.5 bits), w2 g32, w2 g64, each with the output head kept fp32 and quantized to 8 bits
in the runtime (`--pytorch`: also with the blocks run in PyTorch instead of the fused C
step); llama.cpp Q8_0, Q4_0 and Q4_1 (the layout of w4g32: fp16 scale and minimum per 32)
requantized from the embedded GGUF with `llama_cpp.llama_model_quantize` (skipped when
llama-cpp-python is not installed).
Then self-speculative decoding for each `--spec` pair: a target (head 8-bit) and a draft
made by RTN of the target's own block linears, k drafted tokens per round; greedy output
compared with plain greedy. Note: w4 g32 reproduces the embedded model's weights exactly
(its GGUF is Q4_1, a 4-bit grid with blocks of 32), so a 4-bit g32 draft of the fp32 model
would be unrealistically good; the default pairs use group 64 for 4-bit drafts.
Prefill and decode figures are medians of `--runs` timed runs after one warm-up, runs of
the different engines interleaved so that load from other processes hits them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import slimlm
from slimlm.compress import compress_model
from slimlm.data import corpus_text
from slimlm.eval.speed import peak_rss_bytes
from slimlm.formats.store import save_compressed
from slimlm.models import builtin_path
from slimlm.runtime.generate import GenerationConfig
from slimlm.runtime.lean import LeanModel, RuntimeConfig, greedy
from slimlm.runtime.speculative import SpecStats, draft_model, speculative_ids

OUT = Path(__file__).parent / "out" / "runtime"
RECIPES = {"w8g64": "rtn:bits=8,group=64", "w4g32": "rtn:bits=4,group=32", "w4g64": "rtn:bits=4,group=64",
           "w4g32s": "rtn:bits=4,group=32,sym=true", "w2g32": "rtn:bits=2,group=32", "w2g64": "rtn:bits=2,group=64"}


def compressed(name: str):
    d = OUT / name
    if not d.exists():
        lm = slimlm.load("smollm2-135m")
        compress_model(lm, RECIPES[name], progress=False)
        save_compressed(lm, d)
    return slimlm.load(str(d))


def time_lean(lean: LeanModel, ids: list[int], n: int) -> tuple[float, float]:
    lean.reset()
    t0 = time.perf_counter()
    logits = lean.prefill(ids)
    t1 = time.perf_counter()
    tok = greedy(logits)
    for _ in range(n):
        tok = greedy(lean.step(tok))
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), n / (t2 - t1)


def llama_cpp_models(threads: int, keep=lambda name: True) -> dict:
    """llama.cpp Q8_0, Q4_0 and Q4_1, each loaded twice: plain CPU buffers (prefill and decode) and with
    its extra buffer types (AMX / repacked layouts), which on this machine crash on batches of
    more than one token (benchmarks/_llama.py), so that copy is timed on decode only. Only the
    names `keep` accepts are loaded."""
    try:
        import llama_cpp
    except ImportError:
        return {}
    from _llama import load

    out = {}
    for name, ftype in (("llama.cpp Q8_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0), ("llama.cpp Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
                        ("llama.cpp Q4_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1)):
        if not (keep(name) or keep(f"{name} repack")):
            continue
        path = OUT / f"{name.split()[-1]}.gguf"
        if not path.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = ftype
            params.allow_requantize = True
            params.nthread = threads
            rc = llama_cpp.llama_model_quantize(str(builtin_path("smollm2-135m")).encode(), str(path).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize failed ({rc}) for {name}")
        kw = dict(n_ctx=1024, n_threads=threads, n_threads_batch=threads, n_batch=512)
        if keep(name):
            out[name] = (load(path, extra_bufts=False, **kw), path.stat().st_size, True)
        if keep(f"{name} repack"):
            out[f"{name} repack"] = (load(path, extra_bufts=True, **kw), path.stat().st_size, False)
    return out


def time_llama(llm, ids: list[int], n: int, batched: bool = True) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    if batched:
        llm.eval(ids)
    else:  # one token at a time: the prompt's figure is then not a prefill figure
        for t in ids:
            llm.eval([t])
    t1 = time.perf_counter()
    for _ in range(n):
        tok = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([tok])
    t2 = time.perf_counter()
    return (len(ids) / (t1 - t0) if batched else float("nan")), n / (t2 - t1)


def speculative(base, pair: str, ids: list[int], a) -> dict:
    """Self-speculative decoding of one target/draft pair against the target alone, interleaved."""
    tname, draft_spec, *kk = pair.split(":")
    k = int(kk[0]) if kk else a.k
    target_lm = base if tname == "fp32" else compressed(tname)
    rt = RuntimeConfig(head_bits=8)
    target = LeanModel(target_lm.model, rt)
    dbits, dgroup, *dhead = (int(v) for v in draft_spec.split(","))
    dhead = dhead[0] if dhead else 8
    draft = LeanModel(draft_model(target_lm.model, bits=dbits, group=dgroup), RuntimeConfig(head_bits=dhead))
    cfg = GenerationConfig(max_new_tokens=a.spec_tokens)
    times = {"plain": [], "spec": [], "plain_e2e": [], "spec_e2e": []}
    for r in range(a.runs + 1):  # decode time from the end of the prompt (both models' prefill) to the last token
        target.reset()
        t0 = time.perf_counter()
        logits = target.prefill(ids)
        tp = time.perf_counter()
        plain = []
        for i in range(a.spec_tokens):
            plain.append(greedy(logits))
            if i + 1 < a.spec_tokens:
                logits = target.step(plain[-1])
        t1 = time.perf_counter()
        stats, mark = SpecStats(), {}
        out = list(speculative_ids(target, draft, ids, cfg, k=k, stats=stats,
                                   on_prefill=lambda: mark.setdefault("p", time.perf_counter())))
        t2 = time.perf_counter()
        if r:
            times["plain"].append(t1 - tp)
            times["spec"].append(t2 - mark["p"])
            times["plain_e2e"].append(t1 - t0)
            times["spec_e2e"].append(t2 - t1)
    row = dict(target=tname, draft=f"rtn {dbits}-bit g{dgroup}, head {dhead}-bit g64", k=k, tokens=a.spec_tokens, identical=out == plain,
               acceptance=stats.acceptance, mean_accepted_per_round=statistics.mean(stats.per_round),
               target_mb_per_token=target.bytes_per_token() / 1e6, draft_mb_per_token=draft.bytes_per_token() / 1e6,
               plain_decode_s=statistics.median(times["plain"]), spec_decode_s=statistics.median(times["spec"]),
               speedup=statistics.median(times["plain"]) / statistics.median(times["spec"]),
               speedup_with_prefill=statistics.median(times["plain_e2e"]) / statistics.median(times["spec_e2e"]),
               prompt_tokens=len(ids), fused=target.fused and draft.fused)
    print(json.dumps(row), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--k", type=int, default=4, help="tokens drafted per speculative round")
    ap.add_argument("--spec-tokens", type=int, default=64)
    ap.add_argument("--skip", nargs="*", default=[], help="engine names to leave out")
    ap.add_argument("--only", nargs="*", default=[], help="engine names to keep (all when not given)")
    ap.add_argument("--out", help="also write the JSON result here")
    ap.add_argument("--spec-only", action="store_true", help="only the speculative-decoding measurement")
    ap.add_argument("--spec", nargs="*", default=["fp32:4,64", "w8g64:4,64", "w4g32:2,32"],
                    help="speculative pairs TARGET:BITS,GROUP[,HEAD][:K] — target model (fp32 or a recipe name, 8-bit "
                         "head), draft = RTN bits,group of the target's own block linears with a HEAD-bit g64 head "
                         "(default 8)")
    ap.add_argument("--pytorch", action="store_true", help="also time each model with the blocks in PyTorch (fused=False)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    OUT.mkdir(parents=True, exist_ok=True)

    base = slimlm.load("smollm2-135m")
    tok = base.tokenizer
    ids = tok(corpus_text("evaluation")[:20000], add_special_tokens=False)["input_ids"][: a.prompt_tokens]
    # (model, runtime) of every engine by name; only the kept ones are loaded (compressed on first use)
    specs = {"fp32": ("fp32", RuntimeConfig()), "fp32 head8": ("fp32", RuntimeConfig(head_bits=8))}
    for name in RECIPES:
        specs[name] = (name, RuntimeConfig())
        specs[f"{name} head8"] = (name, RuntimeConfig(head_bits=8))
        if name == "w2g32":
            specs[f"{name} head4"] = (name, RuntimeConfig(head_bits=4, head_group=32))
        if a.pytorch:
            specs[f"{name} head8 pytorch"] = (name, RuntimeConfig(head_bits=8, fused=False))
    keep = lambda k: k not in a.skip and (not a.only or k in a.only) and not a.spec_only  # noqa: E731
    models = {"fp32": base}
    engines = {}
    for k, (model, rt) in specs.items():
        if keep(k):
            if model not in models:
                models[model] = compressed(model)
            engines[k] = LeanModel(models[model].model, rt)
    peers = llama_cpp_models(a.threads, keep)

    res = {k: ([], []) for k in [*engines, *peers]}
    for r in range(a.runs + 1):  # interleaved: every engine once per round
        for name, lean in engines.items():
            p, d = time_lean(lean, ids, a.decode_tokens)
            if r:
                res[name][0].append(p)
                res[name][1].append(d)
        for name, (llm, _, batched) in peers.items():
            p, d = time_llama(llm, ids, a.decode_tokens, batched)
            if r:
                res[name][0].append(p)
                res[name][1].append(d)
    rows = []
    for name, (p, d) in res.items():
        nbytes = engines[name].bytes_per_token() if name in engines else peers[name][1]
        rows.append(dict(engine=name, prefill_tps=statistics.median(p) if p[0] == p[0] else None, decode_tps=statistics.median(d),
                         weight_mb_per_token=nbytes / 1e6))

    result = dict(threads=a.threads, prompt_tokens=len(ids), decode_tokens=a.decode_tokens, runs=a.runs, rows=rows,
                  speculative=[speculative(base, pair, ids, a) for pair in a.spec],
                  peak_rss_mb=peak_rss_bytes() / 2**20, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print(json.dumps(result, indent=2))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
