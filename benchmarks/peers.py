"""slimlm's runtime against llama.cpp, each engine in its own process (so each has its own peak RSS),
the engines interleaved round by round on the same prompt and threads.

    .venv/bin/python benchmarks/peers.py --threads 2 --rounds 3 --out benchmarks/out/peers_avx512.json
    .venv/bin/python benchmarks/peers.py --isa avx2 --llama-lib /path/to/avx2/llama/libs --out ...

Engines (models made once under benchmarks/out/peers/):
  slimlm w4s   rtn:bits=4,group=32,sym=true + 8-bit g32 head    llama.cpp Q4_0's layout (4.5 bpw)
  slimlm w4    rtn:bits=4,group=32 + 8-bit g32 head             Q4_1's layout (5.0 bpw)
  slimlm w8s   rtn:bits=8,group=32,sym=true + 8-bit g32 head    Q8_0's layout (8.5 bpw)
  slimlm w2    rtn:bits=2,group=32 + 8-bit g32 head
  slimlm native w4s, w2   the same models exported by `slimlm export-native`, run without torch
  llama.cpp Q4_0, Q4_1, Q8_0 requantized from the embedded GGUF (llama_model_quantize), run with
  llama.cpp's defaults (its repacked CPU buffers included).
Each worker process loads its model, runs one warm-up and `--runs` timed runs of a prefill of
`--prompt-tokens` tokens of the built-in evaluation text then `--decode-tokens` greedy decode
steps, and prints medians and its own peak RSS (VmHWM: Python, torch or llama.cpp, model,
cache). `--isa` sets SLIMLM_ISA for slimlm's workers; `--llama-lib` points llama-cpp-python at
another build of its libraries (LLAMA_CPP_LIB_PATH), e.g. one built for AVX2 only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "out" / "peers"
SLIMLM = {"slimlm w4s": "rtn:bits=4,group=32,sym=true+rtn:bits=8,group=32@lm_head",
          "slimlm w4": "rtn:bits=4,group=32+rtn:bits=8,group=32@lm_head",
          "slimlm w8s": "rtn:bits=8,group=32,sym=true+rtn:bits=8,group=32@lm_head",
          "slimlm w2": "rtn:bits=2,group=32+rtn:bits=8,group=32@lm_head"}
NATIVE = {"slimlm native w4s": "w4s", "slimlm native w2": "w2"}  # torch-free: `slimlm export-native` of those dirs
LLAMA = ("llama.cpp Q4_0", "llama.cpp Q4_1", "llama.cpp Q8_0")


def prompt_text() -> str:
    """The built-in evaluation text's start, written once by the parent: a llama.cpp worker must not
    import slimlm.data (which imports torch, 220 MB of RSS that is not llama.cpp's)."""
    path = OUT / "prompt.txt"
    if not path.exists():
        from slimlm.data import corpus_text

        path.write_text(corpus_text("evaluation")[:20000])
    return path.read_text()


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: not ru_maxrss, which Linux carries over an exec from the parent)."""
    from slimlm.procinfo import peak_rss_bytes

    return peak_rss_bytes() / 2**20


def prepare(names: list[str], threads: int) -> None:
    """Compress / requantize every model the engines need (once; kept under benchmarks/out/peers/)."""
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name in SLIMLM and not (OUT / name.split()[-1]).exists():
            subprocess.run([sys.executable, "-m", "slimlm.cli", "compress", "smollm2-135m", "--recipe", SLIMLM[name],
                            "--output", str(OUT / name.split()[-1]), "-q"], check=True)
        if name in NATIVE and not (OUT / f"{NATIVE[name]}.native").exists():
            prepare([f"slimlm {NATIVE[name]}"], threads)
            subprocess.run([sys.executable, "-m", "slimlm.cli", "export-native", str(OUT / NATIVE[name]), "-o",
                            str(OUT / f"{NATIVE[name]}.native")], check=True, stdout=subprocess.DEVNULL)
        if name in LLAMA and not (OUT / f"{name.split()[-1]}.gguf").exists():
            import llama_cpp

            from slimlm.models import builtin_path

            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name.split()[-1]}")
            params.allow_requantize = True
            params.nthread = threads
            path = OUT / f"{name.split()[-1]}.gguf"
            if llama_cpp.llama_model_quantize(str(builtin_path("smollm2-135m")).encode(), str(path).encode(), params):
                raise RuntimeError(f"llama_model_quantize failed for {name}")


def worker_slimlm(name: str, a) -> dict:
    import torch

    import slimlm
    from slimlm.kernels import isa
    from slimlm.runtime.lean import LeanModel, RuntimeConfig, greedy

    torch.set_num_threads(a.threads)
    lm = slimlm.load(str(OUT / name.split()[-1]))
    lean = LeanModel(lm.model, RuntimeConfig(threads=a.threads))
    ids = lm.tokenizer(prompt_text(), add_special_tokens=False)["input_ids"][: a.prompt_tokens]
    pre, dec = [], []
    for r in range(a.runs + 1):
        lean.reset()
        t0 = time.perf_counter()
        tok = greedy(lean.prefill(ids))
        t1 = time.perf_counter()
        for _ in range(a.decode_tokens):
            tok = greedy(lean.step(tok))
        t2 = time.perf_counter()
        if r:
            pre.append(len(ids) / (t1 - t0))
            dec.append(a.decode_tokens / (t2 - t1))
    return {"prefill_tps": pre, "decode_tps": dec, "isa": isa(), "fused": lean.fused,
            "size_mb": sum(f.stat().st_size for f in (OUT / name.split()[-1]).iterdir()) / 1e6}


def worker_native(name: str, a) -> dict:
    """The torch-free runtime (slimlm/runtime/native.py) on the export of the same compressed model."""
    from slimlm.runtime.native import NativeModel

    path = OUT / f"{NATIVE[name]}.native"
    nm = NativeModel(path, threads=a.threads)
    ids = nm.tokenizer.encode(prompt_text(), add_special_tokens=False).ids[: a.prompt_tokens]
    pre, dec = [], []
    for r in range(a.runs + 1):
        t0 = time.perf_counter()
        tok = int(nm.prefill(ids).argmax())
        t1 = time.perf_counter()
        for _ in range(a.decode_tokens):
            tok = int(nm.step(tok).argmax())
        t2 = time.perf_counter()
        if r:
            pre.append(len(ids) / (t1 - t0))
            dec.append(a.decode_tokens / (t2 - t1))
    return {"prefill_tps": pre, "decode_tps": dec, "isa": nm.ext.isa(), "torch_imported": "torch" in sys.modules,
            "size_mb": sum(f.stat().st_size for f in path.iterdir() if f.is_file()) / 1e6}


def worker_llama(name: str, a) -> dict:
    import llama_cpp

    path = OUT / f"{name.split()[-1]}.gguf"
    # llama-cpp-python keeps an (n_batch, vocab) float32 logits array indexed by position: n_batch covers the
    # prompt and the decoded tokens (its untouched rows are never resident, so they add no RSS)
    n = a.prompt_tokens + a.decode_tokens
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(512, n), n_threads=a.threads, n_threads_batch=a.threads,
                          n_batch=n, verbose=False)
    ids = llm.tokenize(prompt_text().encode(), add_bos=False)[: a.prompt_tokens]
    pre, dec = [], []
    for r in range(a.runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        t1 = time.perf_counter()
        for _ in range(a.decode_tokens):
            llm.eval([int(llm.scores[llm.n_tokens - 1].argmax())])
        t2 = time.perf_counter()
        if r:
            pre.append(len(ids) / (t1 - t0))
            dec.append(a.decode_tokens / (t2 - t1))
    return {"prefill_tps": pre, "decode_tps": dec, "size_mb": path.stat().st_size / 1e6,
            "system_info": llama_cpp.llama_print_system_info().decode()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of worker processes, engines interleaved")
    ap.add_argument("--runs", type=int, default=2, help="timed runs inside each worker, after one warm-up")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--only", nargs="*", default=[], help="engine names to run (default: all)")
    ap.add_argument("--isa", help="SLIMLM_ISA for slimlm's workers (default: the best this CPU has)")
    ap.add_argument("--llama-lib", help="LLAMA_CPP_LIB_PATH for llama.cpp's workers")
    ap.add_argument("--out", help="also write the JSON result here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        res = (worker_slimlm if a.worker in SLIMLM else worker_native if a.worker in NATIVE else worker_llama)(a.worker, a)
        res["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(res))
        return
    names = [n for n in (*SLIMLM, *NATIVE, *LLAMA) if not a.only or n in a.only]
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        names = [n for n in names if n not in LLAMA]
        print("llama-cpp-python is not installed: slimlm engines only", file=sys.stderr)
    prepare(names, a.threads)
    prompt_text()
    env = dict(os.environ)
    if a.isa:
        env["SLIMLM_ISA"] = a.isa
    if a.llama_lib:
        env["LLAMA_CPP_LIB_PATH"] = a.llama_lib
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(a.rounds):
        for n in names:
            cmd = [sys.executable, __file__, "--worker", n, "--threads", str(a.threads), "--runs", str(a.runs),
                   "--prompt-tokens", str(a.prompt_tokens), "--decode-tokens", str(a.decode_tokens)]
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if p.returncode:
                print(f"{n}: worker failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            runs[n].append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {n}: decode {statistics.median(runs[n][-1]['decode_tps']):.1f} tok/s, "
                  f"RSS {runs[n][-1]['peak_rss_mb']:.0f} MB", file=sys.stderr)
    rows = {}
    for n, rs in runs.items():
        if not rs:
            continue
        dec = [x for r in rs for x in r["decode_tps"]]
        pre = [x for r in rs for x in r["prefill_tps"]]
        rows[n] = {"decode_tps": round(statistics.median(dec), 1), "decode_min_max": [round(min(dec), 1), round(max(dec), 1)],
                   "prefill_tps": round(statistics.median(pre), 1), "prefill_min_max": [round(min(pre), 1), round(max(pre), 1)],
                   "peak_rss_mb": round(max(r["peak_rss_mb"] for r in rs)), "size_mb": round(rs[0]["size_mb"], 1),
                   **{k: rs[0][k] for k in ("isa", "fused", "system_info", "torch_imported") if k in rs[0]}}
    ratios = {}
    for ours, theirs in (("slimlm w4s", "llama.cpp Q4_0"), ("slimlm w4", "llama.cpp Q4_1"), ("slimlm w8s", "llama.cpp Q8_0"),
                         ("slimlm native w4s", "llama.cpp Q4_0")):
        if ours in rows and theirs in rows:
            ratios[f"{ours} / {theirs}"] = {k: round(rows[ours][k] / rows[theirs][k], 3)
                                            for k in ("decode_tps", "prefill_tps", "peak_rss_mb")}
    for two, four in (("slimlm w2", "slimlm w4s"), ("slimlm native w2", "slimlm native w4s")):
        if two in rows and four in rows:
            ratios[f"{two} / {four}"] = {"decode_tps": round(rows[two]["decode_tps"] / rows[four]["decode_tps"], 3)}
    cpu = subprocess.run("grep -m1 'model name' /proc/cpuinfo; grep -o -w 'avx512_vnni\\|avx2' /proc/cpuinfo | sort -u",
                         shell=True, capture_output=True, text=True).stdout.split("\n")
    out = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "cpu": [c for c in cpu if c],
           "threads": a.threads, "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens,
           "rounds": a.rounds, "runs_per_worker": a.runs, "isa_forced": a.isa, "llama_lib": a.llama_lib,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "engines": rows, "ratios": ratios}
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
