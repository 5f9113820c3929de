"""Assemble benchmarks/RESULTS.md from the per-topic files.

    .venv/bin/python benchmarks/make_results.py

RESULTS.md = summary.md (the goals of every issue against what was measured) + the
foundation table (from benchmarks/out/foundation.json, written by foundation.py) + each
topic's markdown file with its headings demoted one level. Edit the topic files, never
RESULTS.md itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TOPICS = [("foundation", "Foundation (issue 2)"), ("calibrated", "Calibrated quantization (issue 8)"),
          ("lowbit", "Below 3 bits (issue 4)"), ("pruning", "Pruning and low rank (issue 5)"),
          ("lossless", "Lossless coding (issue 3)"), ("runtime", "CPU runtime (issue 6)"),
          ("sweep", "Sweep, fit, report (issue 7)"), ("deploy", "The runtime on every CPU (issue 15)"),
          ("memory", "Run-time memory (issue 15)")]


def foundation_table(path: Path) -> str:
    r = json.loads(path.read_text())
    ref = r["reference"]
    lines = [f"Command: `{r['command']}` ({r['date']}, {r['threads']} threads).", "",
             f"Reference (the dequantized Q4_1 model, FP32): perplexity **{ref['ppl']:.3f}** over {ref['tokens']} "
             f"scored tokens; {ref['size_bytes'] / 1e6:.1f} MB.", "",
             "| recipe | bpw (block linears) | dir size MB | ppl | ratio | KL | top-1 | compress s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rtn"]:
        lines.append(f"| `{row['recipe']}` | {row['bpw']:.3f} | {row['size_bytes'] / 1e6:.1f} | {row['ppl']:.3f} | "
                     f"{row['ratio']:.3f} | {row['kl']:.4f} | {row['top1']:.4f} | {row['compress_s']:.1f} |")
    return "\n".join(lines) + "\n"


def rendered(title: str, name: str) -> str | None:
    """The topic's section as the current RESULTS.md has it (for a table whose raw JSON, kept out of
    git under benchmarks/out/, is not on this machine), or None."""
    old = (ROOT / "RESULTS.md").read_text() if (ROOT / "RESULTS.md").exists() else ""
    head = f"## {title} — from benchmarks/{name}.md\n"
    if head not in old:
        return None
    body = old.split(head, 1)[1]
    nxt = re.search(r"^## ", body, flags=re.M)
    return head + (body[: nxt.start()] if nxt else body)


def main() -> None:
    parts = [(ROOT / "summary.md").read_text()]
    for name, title in TOPICS:
        p = ROOT / f"{name}.md"
        if not p.exists():
            continue
        text = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", p.read_text(), flags=re.M)
        text = re.sub(r"^## .*\n", f"## {title} — from benchmarks/{name}.md\n", text, count=1)
        keys = re.findall(r"<!-- table: (\S+) -->", text)
        if any(not (ROOT / k).exists() for k in keys) and rendered(title, name) is not None:
            text = rendered(title, name)  # its raw results are not here: keep the section as rendered
        else:
            for key in keys:
                text = text.replace(f"<!-- table: {key} -->", foundation_table(ROOT / key))
        parts.append(text)
    (ROOT / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {ROOT / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
