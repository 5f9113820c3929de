"""A device budget: the limits `slimlm fit` must meet, parsed from the user's words.

    --max-size 60MB            saved directory size (B, KB, MB, GB; KiB, MiB, GiB)
    --max-bpw 3.5              bits per weight over the block linears (and the head, when fit
                               compresses it: row["bpw_with_head"])
    --min-decode-tps 20        measured decode tokens/s
    --max-ppl-increase 2%      perplexity ÷ reference − 1, measured on the evaluation text
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slimlm.errors import SlimlmError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """Bytes from '60MB', '1.5GiB', '123456'."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise SlimlmError(f"size {text!r} is not a size; write e.g. 60MB, 512MiB or 1.5GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_fraction(text: str) -> float:
    """0.02 from '2%' or '0.02'."""
    s = str(text).strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        raise SlimlmError(f"{text!r} is not a fraction; write e.g. 2% or 0.02") from None


@dataclass(frozen=True)
class Budget:
    max_size_bytes: int | None = None
    max_bpw: float | None = None
    min_decode_tps: float | None = None
    max_ppl_increase: float | None = None

    def __post_init__(self):
        if all(v is None for v in (self.max_size_bytes, self.max_bpw, self.min_decode_tps, self.max_ppl_increase)):
            raise SlimlmError("give fit a budget: --max-size, --max-bpw, --min-decode-tps or --max-ppl-increase")
        for name, v in (("--max-size", self.max_size_bytes), ("--max-bpw", self.max_bpw),
                        ("--min-decode-tps", self.min_decode_tps)):
            if v is not None and v <= 0:
                raise SlimlmError(f"{name} must be positive, got {v}")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise SlimlmError(f"--max-ppl-increase must be 0 or more, got {self.max_ppl_increase}")

    def describe(self) -> str:
        parts = []
        if self.max_size_bytes is not None:
            parts.append(f"size ≤ {self.max_size_bytes / 1e6:.2f} MB")
        if self.max_bpw is not None:
            parts.append(f"≤ {self.max_bpw:g} bits per weight")
        if self.min_decode_tps is not None:
            parts.append(f"decode ≥ {self.min_decode_tps:g} tokens/s")
        if self.max_ppl_increase is not None:
            parts.append(f"perplexity ≤ reference × {1 + self.max_ppl_increase:.4g}")
        return ", ".join(parts)

    def violations(self, row: dict, ref_ppl: float) -> list[str]:
        """One sentence per limit a measured result breaks."""
        out = []
        if self.max_size_bytes is not None and row["size_bytes"] > self.max_size_bytes:
            out.append(f"size {row['size_bytes'] / 1e6:.3f} MB > {self.max_size_bytes / 1e6:.3f} MB")
        bpw, over = (row["bpw_with_head"], " (block linears and head)") if "bpw_with_head" in row else (row["bpw"], "")
        if self.max_bpw is not None and bpw > self.max_bpw + 1e-12:
            out.append(f"{bpw:.4f} bits per weight{over} > {self.max_bpw:g}")
        if self.min_decode_tps is not None and row.get("decode_tps", 0.0) < self.min_decode_tps:
            out.append(f"decode {row.get('decode_tps', 0.0):.1f} tokens/s < {self.min_decode_tps:g}")
        if self.max_ppl_increase is not None and row["ppl"] > ref_ppl * (1 + self.max_ppl_increase):
            out.append(f"perplexity {row['ppl']:.3f} > {ref_ppl:.3f} × {1 + self.max_ppl_increase:.4g}")
        return out
