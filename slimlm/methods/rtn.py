"""RTN: round-to-nearest affine quantization, no calibration data.

Each group of `group` consecutive input weights of a row gets its own fp16 scale
(and, asymmetric by default, fp16 minimum); weights round to the nearest level.
Bits per weight = bits + 16·(2 if asymmetric else 1) / group.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.errors import SlimlmError
from slimlm.methods.affine import check_group, quantize_rtn, validate_group_option
from slimlm.methods.registry import register


@dataclass(frozen=True)
class RTNConfig:
    ALIASES = {"group": {"channel": 0}}  # group=channel is per-channel
    SHOWN = ("bits", "group")  # always written in the one-line form
    bits: int = 4
    group: int = 64  # 0 = per channel (one group per row)
    sym: bool = False

    def __post_init__(self):
        if not 2 <= self.bits <= 8:
            raise SlimlmError(f"bits must be in 2..8, got {self.bits}")
        validate_group_option(self.group)


def _check(config: RTNConfig, shape: tuple[int, int]) -> None:
    check_group(config.group, shape[1])


@register("rtn", RTNConfig, check=_check)
def rtn(weight, stats, config: RTNConfig):
    """Round to nearest, per group, fp16 scale and minimum."""
    return quantize_rtn(weight, config.bits, config.group, config.sym)
