"""Lossless coding on the embedded model: sizes against the entropy bound, decode speed,
generation speed with block-level decompression, and bits saved on quantized codes.

    .venv/bin/python benchmarks/lossless.py sizes       # BF16 / FP16 / FP32, real and Gaussian weights
    .venv/bin/python benchmarks/lossless.py decode      # MB/s of decoded weights, C kernel vs numpy vs constriction
    .venv/bin/python benchmarks/lossless.py generate    # decode tokens/s: BF16 vs lossless decoded per forward, interleaved
    .venv/bin/python benchmarks/lossless.py intcodes [--gptq-windows N]   # RTN (and GPTQ) codes, Huffman-coded

Each part prints one JSON object. Timings are medians; other work may share the CPU, so
compare ratios measured in the same run (a memory copy of the same output is the peer).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

import slimlm
from slimlm.formats import _entropy
from slimlm.formats.lossless import FLOAT_FIELDS, LosslessFloat, LosslessInt
from slimlm.formats.store import compressed_layers
from slimlm.methods.affine import quantize_rtn


def block_weights(lm) -> dict[str, torch.Tensor]:
    return {n: lm.model.get_submodule(n).weight.detach() for n in lm.adapter.linear_names(lm.model)}


def entropy_bits(symbols: np.ndarray) -> float:
    """Order-0 empirical entropy of the sequence, in bits (n · H)."""
    counts = np.bincount(symbols.reshape(-1))
    p = counts[counts > 0] / symbols.size
    return float(-(p * np.log2(p)).sum() * symbols.size)


def _median_time(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


# ---- sizes --------------------------------------------------------------------------------------


def float_sizes(weights: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    e, m, int_dtype = FLOAT_FIELDS[str(dtype).removeprefix("torch.")]
    width = 1 + e + m
    n = coded = bound = 0
    for w in weights.values():
        native = w.to(dtype)
        p = LosslessFloat.encode(native)
        bits = native.view(int_dtype).numpy().reshape(-1).astype(np.int64) & ((1 << width) - 1)
        bound += entropy_bits((bits >> m) & ((1 << e) - 1)) + (1 + m) * w.numel()  # exponent at its entropy, rest raw
        n += w.numel()
        coded += p.nbits()
    return dict(weights=n, bits_per_weight=coded / n, ratio=coded / (n * width),
                bound_bits_per_weight=bound / n, bound_ratio=bound / (n * width))


def part_sizes(args) -> dict:
    lm = slimlm.load("smollm2-135m")
    real = block_weights(lm)
    gen = torch.Generator().manual_seed(0)
    gauss = {k: torch.randn(w.shape, generator=gen) * w.std() for k, w in real.items()}
    out = {}
    for label, ws in (("embedded", real), ("gaussian", gauss)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            out[f"{label}/{str(dtype).removeprefix('torch.')}"] = float_sizes(ws, dtype)
    return out


# ---- decode speed -------------------------------------------------------------------------------


def part_decode(args) -> dict:
    lm = slimlm.load("smollm2-135m")
    packed = [LosslessFloat.encode(w.to(torch.bfloat16)) for w in block_weights(lm).values()]
    n = sum(p.shape[0] * p.shape[1] for p in packed)
    res = dict(weights=n, kernel=_entropy.kernel_available())

    def rate(seconds, bytes_per_weight):
        return round(n * bytes_per_weight / seconds / 1e6, 1)

    for threads in (1, 2):
        torch.set_num_threads(threads)
        t_fp32 = _median_time(lambda: [p.dequantize() for p in packed], args.runs)
        t_bf16 = _median_time(lambda: [p.decode_native() for p in packed], args.runs)
        t_exp = _median_time(lambda: [p._exponents() for p in packed], args.runs)
        t_scalar = _median_time(lambda: [p._decoder().decode(simd=False) for p in packed], args.runs)
        res[f"threads={threads}"] = dict(bf16_MBps=rate(t_bf16, 2), fp32_MBps=rate(t_fp32, 4),
                                         exponents_Msym_per_s=round(n / t_exp / 1e6, 1),
                                         exponents_scalar_lookups_Msym_per_s=round(n / t_scalar / 1e6, 1),
                                         seconds_fp32=round(t_fp32, 3))
    # peer in the same run: copying the same fp32 output (memory bandwidth of this moment)
    src = [np.empty(p.shape, np.float32) for p in packed]
    t_copy = _median_time(lambda: [s.copy() for s in src], args.runs)
    res["memcpy_fp32_MBps"] = rate(t_copy, 4)
    # the numpy reference decoder, on the first block only (it is slow)
    first = packed[:7]
    n1 = sum(p.shape[0] * p.shape[1] for p in first)
    codeds = [(p, _entropy.Coded(p.shape[0] * p.shape[1], p.chunk, p.lengths.numpy(), p.stream.numpy(),
                                 p.chunk_bits.numpy().view(np.uint16))) for p in first]
    t_np = _median_time(lambda: [_entropy.decode(c, use_kernel=False) for _, c in codeds], 1)
    res["numpy_reference_Msym_per_s"] = round(n1 / t_np / 1e6, 1)
    res.update(constriction_peer(packed, args.runs))
    return res


def constriction_peer(packed: list[LosslessFloat], runs: int) -> dict:
    """The same exponents coded with constriction's ANS coder (Rust), one stream per tensor."""
    try:
        import constriction
    except ImportError:
        return {"constriction": "not installed"}
    streams, models, n, bits = [], [], 0, 0
    for p in packed:
        e = p._exponents().astype(np.int32)
        counts = np.bincount(e).astype(np.float64)
        model = constriction.stream.model.Categorical(counts, perfect=False)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(e, model)
        streams.append((coder.get_compressed(), e.size))
        models.append(model)
        n += e.size
        bits += streams[-1][0].size * 32 + counts.size * 32  # stream + a 32-bit count per symbol
    t = _median_time(lambda: [constriction.stream.stack.AnsCoder(c).decode(m, k)
                              for (c, k), m in zip(streams, models)], runs)
    huff = sum(p.lengths.numel() * 8 + p.stream.numel() * 8 + p.chunk_bits.numel() * 16 for p in packed)
    return {"constriction_ans_Msym_per_s": round(n / t / 1e6, 1), "constriction_exponent_bits": round(bits / n, 4),
            "huffman_exponent_bits": round(huff / n, 4)}


# ---- generation ---------------------------------------------------------------------------------


def _decode_each(layers) -> None:
    for m in layers:
        m.packed.dequantize_as(torch.bfloat16)


def part_generate(args) -> dict:
    """Decode tokens/s of the BF16 model and of its lossless copy (every linear decoded just before
    it runs, every forward), on the same runtime path (`generate_ids`), interleaved round by
    round so the VM's drifting speed hits both alike; the ratio is taken per round."""
    import copy

    from slimlm.compress import compress_model
    from slimlm.eval.speed import bench_model

    lm = slimlm.load("smollm2-135m").cast("bfloat16")
    bf16 = copy.deepcopy(lm.model)
    compress_model(lm, "lossless", progress=False)
    coded = lm.model
    layers = list(compressed_layers(coded).values())
    kw = dict(prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens, runs=1, threads=2)
    keep = ("prefill_tps", "decode_tps")
    rounds = []
    for _ in range(args.runs):
        row = {"bf16": bench_model(bf16, lm.tokenizer, **kw),
               "lossless_per_forward": bench_model(coded, lm.tokenizer, **kw)}
        runtime = row["bf16"]["runtime"]
        row = {name: {f: round(v[f], 2) for f in keep} for name, v in row.items()}
        # the decoding alone: every block linear once, as one token's forward decodes them (each
        # weight dropped before the next is decoded, as in the forward)
        row["decode_all_layers_ms"] = round(1e3 * _median_time(lambda: _decode_each(layers), 3), 1)
        row["decode_ratio"] = round(row["lossless_per_forward"]["decode_tps"] / row["bf16"]["decode_tps"], 4)
        rounds.append(row)
    return dict(rounds=rounds, threads=2, prompt_tokens=args.prompt_tokens, decode_tokens=args.decode_tokens,
                runtime=runtime, weights=sum(m.in_features * m.out_features for m in layers),
                decode_ratio_median=statistics.median(r["decode_ratio"] for r in rounds))


# ---- integer codes ------------------------------------------------------------------------------


def int_stats(pairs) -> dict:
    """pairs: (IntQuant, LosslessInt) per layer -> bits per weight before/after and the bound."""
    n = plain = coded = bound = params = 0
    for q, c in pairs:
        k = q.out_features * q.in_features
        side = q.nbits() - q.codes.numel() * 8  # scales and minimums, kept by both
        n += k
        plain += q.codes.numel() * 8
        coded += c.nbits() - side
        bound += entropy_bits(q.int_codes().numpy())
        params += side
    return dict(weights=n, code_bits=round(plain / n, 4), coded_code_bits=round(coded / n, 4),
                entropy_bound=round(bound / n, 4), saved_bits=round((plain - coded) / n, 4),
                bpw_plain=round((plain + params) / n, 4), bpw_coded=round((coded + params) / n, 4))


def part_intcodes(args) -> dict:
    lm = slimlm.load("smollm2-135m")
    weights = block_weights(lm)
    out = {}
    for bits, group in ((4, 64), (4, 32), (3, 64), (2, 64)):
        pairs = []
        for w in weights.values():
            q = quantize_rtn(w.float(), bits, group)
            pairs.append((q, LosslessInt.encode(q)))
        out[f"rtn:bits={bits},group={group}"] = int_stats(pairs)
    if args.gptq_windows:
        from slimlm.compress import CalibrationConfig, compress_model

        for bits in (4, 3, 2):
            m = slimlm.load("smollm2-135m")
            t = time.perf_counter()
            compress_model(m, f"gptq:bits={bits},group=64+lossless", CalibrationConfig(n_windows=args.gptq_windows),
                           progress=False)
            pairs = [(c.packed.to_intquant(), c.packed) for c in compressed_layers(m.model).values()]
            out[f"gptq:bits={bits},group=64"] = dict(int_stats(pairs), calib_windows=args.gptq_windows,
                                                     compress_seconds=round(time.perf_counter() - t, 1))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["sizes", "decode", "generate", "intcodes"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=8)
    ap.add_argument("--gptq-windows", type=int, default=0, help="also code GPTQ codes (calibration windows of 512)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    fn = {"sizes": part_sizes, "decode": part_decode, "generate": part_generate, "intcodes": part_intcodes}[args.part]
    t = time.perf_counter()
    res = fn(args)
    res["seconds"] = round(time.perf_counter() - t, 1)
    res["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
