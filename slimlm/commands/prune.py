"""`slimlm prune`: structured pruning into a smaller dense model (an HF directory)."""

from __future__ import annotations

from slimlm.cli import SOURCE_HELP, add_calib_flags, print_json


def cmd_prune(a) -> int:
    from pathlib import Path

    import slimlm
    from slimlm.data import Split, calibration_windows, resolve_text
    from slimlm.prune import Shape, StructuredConfig, prune_structured, save_pruned

    cfg = StructuredConfig(ffn=a.ffn, heads=a.heads, kv_groups=a.kv_groups, blocks=a.blocks,
                           multiple=a.multiple, target=a.target)
    if Path(a.output).exists() and not a.force:
        raise slimlm.SlimlmError(f"output {a.output} already exists; choose another path or pass --force to replace it")
    lm = slimlm.load(a.source)
    text, _ = resolve_text(a.calib_text, Split.CALIBRATION)
    windows = calibration_windows(lm.tokenizer, text, max(1, a.calib_tokens // a.calib_seq_len), a.calib_seq_len, a.seed)
    pruned, info = prune_structured(lm, cfg, windows)
    save_pruned(pruned, a.output, info, overwrite=a.force)
    out = {"output": a.output, **info}
    if a.json:
        print_json(out)
        return 0
    b, p = info["block_linear_weights"]
    s = Shape.of(pruned.config)
    print(f"wrote {a.output}: {s.n_blocks} blocks, FFN width {s.inter}, {s.q_heads} query / {s.kv_heads} KV heads; "
          f"block-linear weights {b / 1e6:.1f} M -> {p / 1e6:.1f} M ({p / b:.1%})")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="structured pruning (FFN channels, heads, blocks) into a smaller dense model")
    p.add_argument("source", help=SOURCE_HELP.replace(", or a slimlm directory", ""))
    p.add_argument("--output", "-o", required=True, help="HF model directory to write (written atomically)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it exists")
    p.add_argument("--ffn", type=float, default=0.0, help="share of FFN channels to remove from every block (e.g. 0.25)")
    p.add_argument("--heads", type=int, default=0, help="query heads to remove from every KV group of every block")
    p.add_argument("--kv-groups", type=int, default=0, help="whole KV groups (a KV head and its query heads) to remove per block")
    p.add_argument("--blocks", type=int, default=0, help="whole decoder blocks to remove (lowest block influence first)")
    p.add_argument("--target", type=float, default=None,
                   help="keep this share of the block-linear weights; sets the FFN width (instead of --ffn)")
    p.add_argument("--multiple", type=int, default=32, help="round the kept FFN width to a multiple of this (default 32)")
    add_calib_flags(p)
    p.set_defaults(fn=cmd_prune)
