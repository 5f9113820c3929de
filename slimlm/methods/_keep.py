"""Private helper of `vq` and `kmeans`: keep the input columns of highest activation energy in fp16.

With the kept set K fixed exactly and the rest R coded, the layer loss
tr(E H Eᵀ) over the error E = (E_R, E_K) is minimised over the (free, fp16) kept
columns by E_K = −E_R H_RK H_KK⁻¹; what is left is E_R S E_Rᵀ with S the Schur
complement H_RR − H_RK H_KK⁻¹ H_KR. So the inner method codes W_R against S (its
damping no longer dominated by the massive channels) and the kept columns absorb the
part of its error they can cancel — the closed form of GPTQ's feedback onto columns
quantized last, as SpQR does for its outliers.
"""

from __future__ import annotations

from typing import Callable

import torch

from slimlm.errors import SlimlmError
from slimlm.formats.keptcols import KeptColumns

MAX_KEEP = 256


def check_keep(keep: int) -> None:
    """A recipe's `keep` option, checked when the config is built."""
    if not 0 <= keep <= MAX_KEEP:
        raise SlimlmError(f"keep (input columns kept in fp16) must be in 0..{MAX_KEEP}, got {keep}")


def check_keep_fits(keep: int, shape: tuple[int, int]) -> None:
    """`keep` against one layer's (out, in) shape, checked before compressing."""
    if keep >= shape[1]:
        raise SlimlmError(f"cannot keep {keep} of the layer's {shape[1]} input columns apart; lower keep")


def top_columns(h: torch.Tensor, n: int) -> torch.Tensor:
    """The n input columns of largest Hessian diagonal E[x²], ascending (ties: lower index)."""
    return torch.argsort(torch.diag(h), descending=True, stable=True)[:n].sort().values


def with_kept_columns(w: torch.Tensor, h: torch.Tensor | None, n: int, code: Callable) -> object:
    """`code(w_rest (out, in − n), h_rest (in − n, in − n)) -> Packed` on all but the n columns of
    largest E[x²], which are kept in fp16 with the error compensation above. n = 0 or no
    Hessian: `code(w, h)` unchanged."""
    if n == 0 or h is None:
        return code(w, h)
    inp = w.shape[1]
    keep = top_columns(h, n)
    mask = torch.ones(inp, dtype=torch.bool)
    mask[keep] = False
    rest = mask.nonzero().flatten()
    hd = h.double()
    h_kk = hd[keep][:, keep]
    h_kk = h_kk + 1e-9 * torch.diag(h_kk).mean().clamp_min(1e-30) * torch.eye(n, dtype=hd.dtype)
    h_rk = hd[rest][:, keep]  # (in − n, n)
    gain = torch.linalg.solve(h_kk, h_rk.T).T  # H_RK H_KK⁻¹ (in − n, n)
    schur = hd[rest][:, rest] - gain @ h_rk.T
    schur = (schur + schur.T) / 2
    inner = code(w[:, rest], schur)
    err = (w[:, rest] - inner.dequantize()).double()  # (out, in − n)
    values = (w[:, keep].double() + err @ gain).clamp(-65504, 65504)
    return KeptColumns.from_parts(inner, keep, values.float())
