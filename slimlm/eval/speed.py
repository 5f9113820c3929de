"""Speed and memory: prefill and decode tokens/s, peak resident memory.

Prefill: one forward over a `prompt_tokens` prompt with a fresh cache. Decode: greedy
tokens after that prompt, one forward each with the KV cache; the first of n tokens comes
from the prompt's logits, so decode tokens/s is (n - 1) steps over their time. Each figure is the
median of `runs` runs after one warm-up run; threads are set (torch and the C kernels
share one OpenMP pool) and reported. Llama-family models run on the lean runtime
(`slimlm.runtime.lean`, C kernels for packed layers); `weight_bytes_per_token` is what
one decode step reads, for the bandwidth bound (bytes ÷ measured bandwidth).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import torch

from slimlm.kernels import describe, kernel_summary
from slimlm.procinfo import peak_rss_bytes  # re-exported: benchmarks import it from here
from slimlm.runtime.generate import GenerationConfig, generate_ids, lean_model
from slimlm.runtime.lean import RuntimeConfig, supports


@torch.inference_mode()
def bench_model(model, tokenizer, prompt_tokens: int = 128, decode_tokens: int = 64, runs: int = 3,
                threads: int | None = None, runtime: RuntimeConfig | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
        runtime = dataclasses.replace(runtime or RuntimeConfig(), threads=threads)  # fixed: no tuning
    from slimlm.data import corpus_text

    ids = tokenizer(corpus_text("evaluation")[:20000], add_special_tokens=False)["input_ids"][:prompt_tokens]
    cfg = GenerationConfig(max_new_tokens=decode_tokens)
    prefill, decode = [], []
    for r in range(runs + 1):
        t0 = time.perf_counter()
        marks = {}
        n = 0
        for _ in generate_ids(model, ids, cfg, runtime=runtime, on_prefill=lambda: marks.setdefault("p", time.perf_counter())):
            n += 1
        t1 = time.perf_counter()
        if r == 0:
            continue  # warm-up
        prefill.append(len(ids) / (marks["p"] - t0))
        # the first token comes from the prompt's logits: n tokens take n - 1 decode steps after the prefill
        decode.append(max(n - 1, 1) / (t1 - marks["p"]))
    return {
        "prefill_tps": statistics.median(prefill),
        "decode_tps": statistics.median(decode),
        "prefill_tps_min_max": [min(prefill), max(prefill)],
        "decode_tps_min_max": [min(decode), max(decode)],
        "prompt_tokens": len(ids),
        "decode_tokens": decode_tokens,
        "runs": runs,
        "threads": lean_model(model, runtime).threads if supports(model) else torch.get_num_threads(),
        "threads_chosen_by": "fixed" if runtime is not None and runtime.threads else "measurement",
        "kernels": {**describe(), **kernel_summary(model)},
        "peak_rss_bytes": peak_rss_bytes(),
        "runtime": ("lean-fused" if lean_model(model, runtime).fused else "lean") if supports(model) else "transformers",
        "weight_bytes_per_token": lean_model(model, runtime).bytes_per_token() if supports(model) else None,
    }
