"""What the lean runtime's C kernels cost in quality: perplexity of the runtime's own forward
(the products the decode step computes) on the first tokens of the evaluation split.

    .venv/bin/python benchmarks/runtime_head_ppl.py [--tokens 1024] [--out FILE]

For the fp32 model and the RTN w4g32 / w4g64 / w4g32s (symmetric) models of benchmarks/runtime.py
(w4g32 is the embedded model's own grid, so its weights equal the reference's), with the output head kept
or quantized to 8 bits, each on both kernel paths: `int8` (activations rounded to int8 per
32-column block, the default) and `float` (exact float activations). kernel=cpu puts every
IntQuant product, whatever its row count, on the C kernels, so a 512-token window computes
what 512 decode steps would (up to float summation order).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def measure(model: str, head_bits: int, tokens: int) -> float:
    import torch

    import slimlm
    from slimlm.data import corpus_text
    from slimlm.runtime.lean import LeanModel, RuntimeConfig

    torch.set_num_threads(2)
    lm = slimlm.load("smollm2-135m" if model == "fp32" else str(ROOT / "out" / "runtime" / model))
    ids = lm.tokenizer(corpus_text("evaluation"), add_special_tokens=False)["input_ids"][:tokens]
    lean = LeanModel(lm.model, RuntimeConfig(head_bits=head_bits, head_group=64, kernel="cpu"))
    nll, n = 0.0, 0
    with torch.inference_mode():
        for w in range(0, len(ids), 512):
            win = ids[w:w + 512]
            lean.reset()
            lp = torch.log_softmax(lean.extend(win, all_logits=True)[:-1], -1)
            nll -= lp.gather(1, torch.tensor(win[1:]).unsqueeze(1)).sum().item()
            n += len(win) - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--out")
    ap.add_argument("--one", nargs=3, metavar=("MODEL", "HEAD_BITS", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # one configuration in this process (the kernel path is fixed per process by its variable)
        print(json.dumps({"ppl": measure(a.one[0], int(a.one[1]), a.tokens)}))
        return
    rows = []
    for model in ("fp32", "w4g32", "w4g64", "w4g32s"):
        for head in (0, 8):
            for path in ("float", "int8"):
                if model == "fp32" and head == 0 and path == "int8":
                    continue  # nothing integer to run
                env = dict(os.environ, SLIMLM_INTQ_PATH=path)
                out = subprocess.run([sys.executable, __file__, "--tokens", str(a.tokens), "--one", model, str(head), path],
                                     env=env, check=True, capture_output=True, text=True).stdout
                rows.append(dict(model=model, head_bits=head, path=path, ppl=round(json.loads(out.splitlines()[-1])["ppl"], 4)))
                print(json.dumps(rows[-1]), flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(dict(tokens=a.tokens, rows=rows), indent=2))


if __name__ == "__main__":
    main()
