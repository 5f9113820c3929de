"""The `slimlm` command: maps flags onto the typed configs of the packages; no logic of its own.

Problems with the input end with one sentence on stderr and a non-zero exit
(`SlimlmError`); `--json` puts a machine-readable result on stdout, progress bars
and messages go to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

EPILOG_COMPRESS = """recipes (one-line form; see slimlm.compress.recipe):
  rtn:bits=4,group=64                          4-bit round-to-nearest, groups of 64 (4.5 bpw)
  rtn:bits=3,group=64+rtn:bits=8@*.down_proj   mixed precision: down_proj at 8 bits
  rtn:bits=3,group=64+rtn:bits=6@lm_head       the output head (and tied embedding) too, at 6 bits
  rtn:bits=4,group=channel,sym=true            per-channel, symmetric
  recipe.yaml / recipe.json                    the same as data
methods: {methods}"""


SOURCE_HELP = "smollm2-135m (the embedded model), an HF directory, a .gguf file, or a slimlm directory"


def _methods_line() -> str:
    from slimlm.methods import load_all

    return ", ".join(sorted(load_all()))


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def eval_config(a):
    from slimlm.eval.run import EvalConfig

    return EvalConfig(text_file=a.text, seq_len=a.seq_len, max_tokens=None if a.max_tokens == 0 else a.max_tokens,
                      tasks=tuple(a.tasks or ()))


def calib_config(a):
    from slimlm.compress import CalibrationConfig

    return CalibrationConfig.from_tokens(a.calib_tokens, seq_len=a.calib_seq_len, text_file=a.calib_text, seed=a.seed)


def cmd_compress(a) -> int:
    import slimlm
    from slimlm.compress import Recipe, compress_model
    from slimlm.eval.size import size_report
    from slimlm.formats.store import save_compressed

    recipe = Recipe.load(a.recipe)  # a bad recipe fails before the model loads
    calib = calib_config(a)
    from pathlib import Path

    if Path(a.output).exists() and not a.force:
        raise slimlm.SlimlmError(f"output {a.output} already exists; choose another path or pass --force to replace it")
    lm = slimlm.load(a.source)
    if a.dtype:
        lm.cast(a.dtype)
    compress_model(lm, recipe, calib, progress=not a.quiet, seed=a.seed)
    save_compressed(lm, a.output, overwrite=a.force)
    rep = size_report(lm, a.output)
    out = {"output": a.output, "recipe": recipe.to_string(), "compress_seconds": lm.manifest["compress_seconds"], **rep}
    if a.json:
        print_json(out)
    else:
        head = f" (head {rep['head_bpw']:.3f})" if rep["head_bpw"] is not None else ""
        print(f"wrote {a.output}: {rep['bpw']:.3f} bits per weight in the block linears{head}, "
              f"{rep['size_bytes'] / 1e6:.1f} MB, compressed in {out['compress_seconds']:.1f} s")
    return 0


def cmd_eval(a) -> int:
    import slimlm
    from slimlm.eval.run import evaluate

    cfg = eval_config(a)
    lm = slimlm.load(a.model)
    ref = slimlm.load(a.reference) if a.reference else None
    res = evaluate(lm, cfg, reference=ref, path=a.model, progress=not a.quiet)
    if a.json:
        print_json(res)
        return 0
    print(f"{res['model']} on {res['text']}: perplexity {res['ppl']:.3f} over {res['tokens']} tokens "
          f"({res['windows']} windows of {res['seq_len']})")
    if "kl" in res:
        print(f"against {res['reference']}: KL {res['kl']:.5f}, top-1 agreement {res['top1']:.4f}")
    print(f"size: {res['bpw']:.3f} bits per weight in the block linears, {res['size_bytes'] / 1e6:.1f} MB")
    for name, t in res["tasks"].items():
        print(f"task {name}: acc {t['acc']:.4f}, acc_norm {t['acc_norm']:.4f} (n={t['n']})")
    return 0


def runtime_config(a):
    from slimlm.runtime import RuntimeConfig

    return RuntimeConfig(kernel=a.kernel, head_bits=a.head_bits, threads=getattr(a, "threads", None))


def add_runtime_flags(p):
    p.add_argument("--kernel", choices=["auto", "cpu", "reference"], default="auto",
                   help="matrix kernels: the C kernels reading packed codes (cpu), the PyTorch reference, or auto")
    p.add_argument("--head-bits", type=int, default=0,
                   help="quantize the output head to this many bits in the runtime only (0: keep it as loaded)")


def cmd_bench(a) -> int:
    import slimlm
    from slimlm.eval.size import size_report
    from slimlm.eval.speed import bench_model

    lm = slimlm.load(a.model)
    res = bench_model(lm.model, lm.tokenizer, a.prompt_tokens, a.decode_tokens, a.runs, a.threads,
                      runtime=runtime_config(a))
    res.update(size_report(lm, a.model))
    if a.json:
        print_json(res)
    else:
        print(f"prefill {res['prefill_tps']:.1f} tokens/s ({res['prompt_tokens']} tokens), decode {res['decode_tps']:.1f} "
              f"tokens/s, {res['threads']} threads, peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB, "
              f"{res['bpw']:.3f} bpw, {res['size_bytes'] / 1e6:.1f} MB, kernels {res['kernels']['isa']}")
        if res["kernels"]["formats_without_kernel"]:
            print(f"no fast kernel for format(s) {', '.join(res['kernels']['formats_without_kernel'])}: those layers "
                  "ran the PyTorch reference", file=sys.stderr)
    return 0


def cmd_generate(a) -> int:
    import slimlm
    from slimlm.runtime import GenerationConfig, generate

    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_k=a.top_k,
                           top_p=a.top_p, seed=a.seed, stop=tuple(a.stop or ()))
    lm = slimlm.load(a.model)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    on_text = lambda s: print(s, end="", flush=True)  # noqa: E731
    if not (a.draft or a.draft_bits):
        generate(lm, a.prompt, cfg, chat=not a.no_chat, on_text=on_text, runtime=runtime_config(a))
        print()
        return 0
    from slimlm.runtime import LeanModel, SpecStats, draft_model, speculative_ids
    from slimlm.runtime.generate import chat_prompt, eos_ids, stream_text
    from slimlm.runtime.lean import supports

    if a.draft and a.draft_bits:
        raise slimlm.SlimlmError("give either --draft (a model) or --draft-bits (RTN of this model's weights), not both")
    draft = slimlm.load(a.draft).model if a.draft else draft_model(lm.model, a.draft_bits, a.draft_group)
    if not (supports(lm.model) and supports(draft)):
        raise slimlm.SlimlmError("speculative decoding needs the lean runtime for both models (float32 Llama-family models)")
    if draft.config.vocab_size != lm.model.config.vocab_size:
        raise slimlm.SlimlmError(f"the draft's vocabulary ({draft.config.vocab_size}) differs from the model's "
                          f"({lm.model.config.vocab_size}); the draft must share the tokenizer")
    rt = runtime_config(a)
    drt = dataclasses.replace(rt, head_bits=a.draft_head_bits) if a.draft_head_bits else rt
    stats = SpecStats()
    ids = speculative_ids(LeanModel(lm.model, rt), LeanModel(draft, drt), chat_prompt(lm.tokenizer, a.prompt, not a.no_chat),
                          cfg, k=a.draft_k, eos_ids=eos_ids(lm), stats=stats)
    stream_text(lm.tokenizer, ids, cfg.stop, on_text)
    print()
    print(f"speculative: {stats.accepted}/{stats.drafted} drafted tokens accepted ({stats.acceptance:.0%}), "
          f"{stats.emitted} tokens in {stats.rounds} rounds", file=sys.stderr)
    return 0


def cmd_info(a) -> int:
    import slimlm
    from slimlm.eval.size import size_report
    from slimlm.formats.store import layer_table

    from slimlm.formats.store import compressed_layers
    from slimlm.kernels import describe, kernel_name, kernel_summary

    lm = slimlm.load(a.model)
    rep = size_report(lm, a.model)
    man = lm.manifest or {}
    layers = layer_table(lm.model)
    for name, mod in compressed_layers(lm.model).items():
        layers[name]["kernel"] = kernel_name(mod.packed)
    out = {"model": a.model, "source": man.get("source", lm.source), "recipe": man.get("recipe", "none"),
           "model_type": lm.config.model_type, "blocks": lm.adapter.n_blocks(lm.model), **rep,
           "layers": layers, "kernels": {**describe(), **kernel_summary(lm.model)},
           "calibration": man.get("calibration"), "slimlm_version": man.get("slimlm_version")}
    if a.json:
        print_json(out)
        return 0
    print(f"{a.model}: {out['model_type']}, {out['blocks']} blocks, from {out['source']}")
    print(f"recipe: {out['recipe']}")
    head = f", head {rep['head_bpw']:.3f}" if rep["head_bpw"] is not None else ""
    print(f"{rep['bpw']:.3f} bits per weight over {rep['linear_weights']:,} block-linear weights{head}; "
          f"{rep['size_bytes'] / 1e6:.1f} MB")
    k = out["kernels"]
    print(f"kernels: {k['isa']} (this CPU runs {', '.join(k['isas']) or 'none: not built'})")
    if k["formats_without_kernel"]:
        print(f"no fast kernel for format(s) {', '.join(k['formats_without_kernel'])}: those layers run the PyTorch "
              "reference on dequantized float32 weights (slower, and float32-sized in memory)")
    if out["layers"]:
        w = max(len(n) for n in out["layers"])
        print(f"{'layer'.ljust(w)}  {'method':8} {'format':6} {'shape':>11} {'bpw':>7}  kernel")
        for n, e in out["layers"].items():
            print(f"{n.ljust(w)}  {e['method']:8} {e['format']:6} {'x'.join(map(str, e['shape'])):>11} {e['bpw']:7.3f}"
                  f"  {e['kernel']}")
    return 0


def cmd_export_native(a) -> int:
    from slimlm.runtime.native import export_native

    res = export_native(a.model, a.output, overwrite=a.force)
    if a.json:
        print_json(res)
    else:
        print(f"wrote {res['output']}: {res['layers']} blocks for `slimlm run`, {res['size_bytes'] / 1e6:.1f} MB")
    return 0


def cmd_run(a) -> int:
    from slimlm.runtime.native import NativeModel

    m = NativeModel(a.model, threads=a.threads)
    if a.bench:
        res = m.bench(a.prompt_tokens, a.decode_tokens, a.runs)
        if a.json:
            print_json(res)
        else:
            print(f"prefill {res['prefill_tps']:.1f} tokens/s ({res['prompt_tokens']} tokens), decode "
                  f"{res['decode_tps']:.1f} tokens/s, {res['threads']} threads, peak RSS "
                  f"{res['peak_rss_bytes'] / 2**20:.0f} MiB, {res['size_bytes'] / 1e6:.1f} MB, kernels {res['isa']}")
        return 0
    if a.prompt is None:
        from slimlm.errors import SlimlmError

        raise SlimlmError("give a prompt to run (or --bench)")
    on_text = None if a.json else (lambda s: print(s, end="", flush=True))
    text = m.generate(a.prompt, a.max_new_tokens, chat=not a.no_chat, on_text=on_text, stop=tuple(a.stop or ()),
                      temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    if a.json:
        print_json({"model": a.model, "text": text})
    else:
        print()
    return 0


def add_sampling_flags(p):
    """The text-generation flags `generate` and `run` share."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", help="stop before this string (repeatable)")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as raw text, without the chat template")


def add_run_parser(sub):
    """`slimlm run`: parsed without the rest of the CLI, whose parser imports torch (see `main`)."""
    r = sub.add_parser("run", help="generate (or --bench) from a `slimlm export-native` directory, without torch")
    r.add_argument("model", help="a directory written by `slimlm export-native`")
    r.add_argument("prompt", nargs="?")
    add_sampling_flags(r)
    r.add_argument("--threads", type=int, default=None, help="kernel threads (default: chosen while decoding by measurement)")
    r.add_argument("--bench", action="store_true", help="prefill and decode tokens/s and peak RSS instead of text")
    r.add_argument("--prompt-tokens", type=int, default=128, help="bench: prompt length")
    r.add_argument("--decode-tokens", type=int, default=64, help="bench: tokens decoded per run")
    r.add_argument("--runs", type=int, default=3, help="bench: timed runs after one warm-up; the median is reported")
    r.set_defaults(fn=cmd_run)
    return r


def add_eval_flags(p, default_max=True):
    from slimlm.eval.run import DEFAULT_MAX_TOKENS

    p.add_argument("--text", metavar="FILE", help="evaluate on this UTF-8 text file instead of the built-in evaluation split")
    p.add_argument("--tasks", metavar="FILE", nargs="+", help="multiple-choice task files (JSON lines: context, choices, gold)")
    p.add_argument("--seq-len", type=int, default=512, help="window length in tokens (default 512)")
    p.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS,
                   help=f"evaluate at most this many tokens, 0 for all (default {DEFAULT_MAX_TOKENS})")


def add_calib_flags(p):
    p.add_argument("--calib-text", metavar="FILE", help="calibration text (default: the built-in calibration split)")
    p.add_argument("--calib-tokens", type=int, default=16384, help="calibration tokens for methods that need them (default 16384)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="calibration window length (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling and stochastic methods")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slimlm", description="Fit a language model to a device budget: compress it, "
                                "measure what was lost, run it on a CPU.")
    from slimlm import __version__

    p.add_argument("--version", action="version", version=f"slimlm {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    src_help = SOURCE_HELP

    c = sub.add_parser("compress", help="compress a model with a recipe and save it",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG_COMPRESS.format(methods=_methods_line()))
    c.add_argument("source", help=src_help)
    c.add_argument("--recipe", required=True, help="one-line recipe or a .json/.yaml recipe file")
    c.add_argument("--output", "-o", required=True, help="directory to write (written atomically)")
    c.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="cast the source to this dtype first (the embedded model loads as float32)")
    add_calib_flags(c)
    c.set_defaults(fn=cmd_compress)

    e = sub.add_parser("eval", help="perplexity, KL and top-1 against a reference, task accuracy, size")
    e.add_argument("model", help=src_help)
    e.add_argument("--reference", help="the uncompressed model to compare against (KL, top-1)")
    add_eval_flags(e)
    e.set_defaults(fn=cmd_eval)

    b = sub.add_parser("bench", help="prefill and decode tokens/s, peak memory, size")
    b.add_argument("model", help=src_help)
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--decode-tokens", type=int, default=64)
    b.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up; the median is reported")
    b.add_argument("--threads", type=int, default=None,
                   help="threads of the kernels and torch (default: chosen while decoding, by timing 1..cores "
                        "threads on the cores actually free)")
    add_runtime_flags(b)
    b.set_defaults(fn=cmd_bench)

    g = sub.add_parser("generate", help="generate text, streamed as it is decoded")
    g.add_argument("model", help=src_help)
    g.add_argument("prompt")
    add_sampling_flags(g)
    g.add_argument("--threads", type=int, default=None,
                   help="threads of the kernels and torch (default: chosen while decoding by measurement)")
    g.add_argument("--draft", help="speculative decoding with this model as the draft (e.g. a more compressed copy); "
                                   "the output is distributed exactly as without it (greedy: identical)")
    g.add_argument("--draft-bits", type=int, default=0,
                   help="speculative decoding with a draft made here by RTN of this model's own block linears")
    g.add_argument("--draft-group", type=int, default=64, help="group size of that RTN draft")
    g.add_argument("--draft-k", type=int, default=4, help="tokens drafted per round")
    g.add_argument("--draft-head-bits", type=int, default=0,
                   help="the draft's output head quantized to this many bits in the runtime (0: as --head-bits); "
                        "the head is a large share of a small draft's bytes")
    add_runtime_flags(g)
    g.set_defaults(fn=cmd_generate)

    i = sub.add_parser("info", help="recipe, per-layer formats and bits, size")
    i.add_argument("model", help=src_help)
    i.set_defaults(fn=cmd_info)

    x = sub.add_parser("export-native", help="write a compressed model for `slimlm run` (the torch-free runtime)")
    x.add_argument("model", help="a slimlm directory whose block linears and head are integer (rtn, gptq, awq...)")
    x.add_argument("--output", "-o", required=True, help="directory to write (written atomically)")
    x.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    x.set_defaults(fn=cmd_export_native)
    add_run_parser(sub)

    from slimlm.commands import register_all

    register_all(sub)
    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        sp.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def main(argv=None) -> int:
    from slimlm.errors import SlimlmError

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["run"]:  # torch-free: the full parser imports the method registry, hence torch
        p = argparse.ArgumentParser(prog="slimlm")
        r = add_run_parser(p.add_subparsers(dest="cmd", required=True, metavar="COMMAND"))
        r.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
        r.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
        args = p.parse_args(argv)
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SlimlmError as e:
        print(f"slimlm: error: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. piped into `head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("slimlm: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
