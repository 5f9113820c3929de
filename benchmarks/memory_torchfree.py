"""How small a process the lean runtime could be without torch: a measurement prototype.

`dump DIR OUT`: in a torch process, build the lean runtime of compressed model DIR (every
block linear an int8-path IntQuant kernel, the head too) and write what the fused C step
reads — repacked codes, scales, minimums, norms, rope tables, the packed 8-bit head rows
the tied embedding decodes — as .npy files under OUT, plus the greedy tokens the torch
runtime produces for a fixed prompt (prefill in 16-token fused chunks, then steps).

`run OUT`: in a process that never imports torch (numpy, the kernels' extension loaded by
file, `tokenizers`), memory-map those arrays, rebuild the same plan, prefill and decode
64 greedy tokens through `lean_step` / `lean_linear`, check the tokens equal the torch
runtime's, and print peak RSS. Not a product path: it shows where the floor would be.

    python benchmarks/memory_torchfree.py dump /tmp/mem/w4s /tmp/mem/w4s.npy
    /usr/bin/time -v python benchmarks/memory_torchfree.py run /tmp/mem/w4s.npy
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPT = "The history of the printing press begins in the fifteenth century, when"
NEW = 64


def dump(src: str, out: str) -> None:
    import numpy as np
    import torch

    import slimlm
    from slimlm.runtime.lean import LeanModel

    lm = slimlm.load(src)
    lean = LeanModel(lm.model)
    assert lean.fused and lean._head_plan is not None, "every linear must be an int8-path kernel"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def save(name, t):
        np.save(out / f"{name}.npy", t.detach().contiguous().numpy())

    def op(name, o):
        k = o.kernel
        save(f"{name}.codes", k.codes)
        save(f"{name}.scales", k.scales)
        if k.mins is not None:
            save(f"{name}.mins", k.mins)
        if o.bias is not None:
            save(f"{name}.bias", o.bias)
        return dict(out=k.out_features, inp=k.in_features, group=k.group, bits=k.bits,
                    mins=k.mins is not None, bias=o.bias is not None)

    layers = []
    for i, (b, win) in enumerate(zip(lean.blocks, lean.windows)):
        save(f"l{i}.ln1", b.ln1)
        save(f"l{i}.ln2", b.ln2)
        layers.append(dict(nq=b.q_out // lean.hd, nkv=b.k_out // lean.hd, ffn=b.ffn, win=win or 0,
                           ops=[op(f"l{i}.{n}", getattr(b, n)) for n in ("qkv", "o", "gate_up", "down")]))
    head = op("head", lean.head)
    save("norm", lean.norm)
    save("cos", lean.cos)
    save("sin", lean.sin)
    hp = lm.model.get_output_embeddings().packed  # the tied embedding's rows: 8-bit codes, asymmetric
    assert hp.bits == 8 and not hp.symmetric, "this prototype decodes 8-bit asymmetric embedding rows only"
    save("emb.codes", hp.codes.view(hp.out_features, hp.in_features))
    save("emb.scales", hp.scales.float())
    save("emb.mins", hp.mins.float())
    ids = lm.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    logits = None
    for i in range(0, len(ids), 16):  # the fused step's chunks, as `run` does them
        logits = lean.extend(ids[i:i + 16])
    toks = []
    for _ in range(NEW):
        toks.append(int(logits.argmax()))
        logits = lean.step(toks[-1])
    meta = dict(dim=lean.dim, hd=lean.hd, eps=float(lean.eps), max_seq=lean.max_seq, group=hp.group,
                layers=layers, head=head, tokens=toks, tokenizer=str(Path(src) / "tokenizer.json"))
    (out / "plan.json").write_text(json.dumps(meta))
    print(f"dumped {len(layers)} layers to {out}; torch runtime tokens: {toks[:8]}...")


def run(src: str) -> None:
    import glob
    import importlib.machinery
    import importlib.util

    import numpy as np

    root = Path(__file__).resolve().parents[1]
    path = glob.glob(str(root / "slimlm" / "kernels" / "_C*.so"))[0]
    loader = importlib.machinery.ExtensionFileLoader("slimlm.kernels._C", path)
    ext = importlib.util.module_from_spec(importlib.util.spec_from_file_location("slimlm.kernels._C", path, loader=loader))
    loader.exec_module(ext)
    from tokenizers import Tokenizer

    src = Path(src)
    meta = json.loads((src / "plan.json").read_text())
    keep = {}

    def arr(name):
        keep[name] = a = np.load(src / f"{name}.npy", mmap_mode="r")
        return a

    def ptr(name):
        return arr(name).ctypes.data

    def op(name, m):
        return (0, ptr(f"{name}.codes"), ptr(f"{name}.scales"), ptr(f"{name}.mins") if m["mins"] else 0,
                m["out"], m["inp"], m["group"], m["bits"], ptr(f"{name}.bias") if m["bias"] else 0)

    layers = [(ptr(f"l{i}.ln1"), ptr(f"l{i}.ln2"), 0, 0, L["nq"], L["nkv"], L["ffn"], L["win"],
               *[op(f"l{i}.{n}", m) for n, m in zip(("qkv", "o", "gate_up", "down"), L["ops"])])
              for i, L in enumerate(meta["layers"])]
    dim, hd = meta["dim"], meta["hd"]
    plan = ext.lean_new(dim, hd, meta["eps"], meta["max_seq"], ptr("cos"), ptr("sin"), ptr("norm"), layers)
    head = ext.lean_linear_new(op("head", meta["head"]))
    codes, scales, mins, g = arr("emb.codes"), arr("emb.scales"), arr("emb.mins"), meta["group"]

    def embed(ids):  # (T, dim) float32 rows of the 8-bit head: q · scale + min per group
        q = codes[ids].astype(np.float32)
        return np.ascontiguousarray(q * np.repeat(scales[ids], g, 1)[:, :dim] + np.repeat(mins[ids], g, 1)[:, :dim])

    cap = 256
    kc = [np.zeros((L["nkv"], cap, hd), np.float32) for L in meta["layers"]]
    vc = [np.zeros((L["nkv"], cap, hd), np.float32) for L in meta["layers"]]
    kp = np.array([a.ctypes.data for a in kc], np.int64)
    vp = np.array([a.ctypes.data for a in vc], np.int64)
    logits = np.empty((1, meta["head"]["out"]), np.float32)
    pos = 0

    def extend(ids):
        nonlocal pos
        x = embed(ids)
        ext.lean_step(plan, x.ctypes.data, len(ids), pos, kp.ctypes.data, vp.ctypes.data, cap)
        pos += len(ids)
        ext.lean_linear(head, x[-1:].ctypes.data, 1, logits.ctypes.data)
        return logits[0]

    tok = Tokenizer.from_file(meta["tokenizer"])
    ids = tok.encode(PROMPT, add_special_tokens=False).ids
    lg = None
    for i in range(0, len(ids), ext.LEAN_MAX_T):
        lg = extend(ids[i:i + ext.LEAN_MAX_T])
    toks = []
    for _ in range(NEW):
        toks.append(int(lg.argmax()))
        lg = extend([toks[-1]])
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
    same = toks == meta["tokens"]
    print(json.dumps(dict(torch_imported="torch" in sys.modules, tokens_equal_torch_runtime=same,
                          peak_rss_mb=round(peak / 1024, 1), text=tok.decode(toks)[:80])))
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    {"dump": lambda: dump(sys.argv[2], sys.argv[3]), "run": lambda: run(sys.argv[2])}[sys.argv[1]]()
