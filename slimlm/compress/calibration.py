"""Calibration forward passes, one decoder block at a time.

`BlockInputs` captures what the model hands its first decoder block (hidden states
and the keyword arguments: attention mask, rotary embeddings, positions) by stopping
the forward at that block, then runs any block on every window independently:
`use_cache=False` and no cache object, so a window never attends to another (see
DESIGN.md). `StatsCollector` hooks a block's linears and accumulates the input
second moment `H = XᵀX / n` (float64) and per-channel `E[x²]` while a block runs.
"""

from __future__ import annotations

import torch
from torch import nn


class _Stop(Exception):
    pass


class BlockInputs:
    """The inputs of the current block for every calibration window: hidden (n, T, d)."""

    def __init__(self, model: nn.Module, first_block: nn.Module, windows: torch.Tensor):
        captured = {}

        def hook(module, args, kwargs):
            captured["args"], captured["kwargs"] = args, kwargs
            raise _Stop

        hidden = []
        handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                for w in windows:
                    try:
                        model(w.unsqueeze(0), use_cache=False)
                    except _Stop:
                        pass
                    args, kwargs = captured["args"], captured["kwargs"]
                    hidden.append(args[0] if args else kwargs["hidden_states"])
        finally:
            handle.remove()
        kwargs = {k: v for k, v in captured["kwargs"].items() if k != "hidden_states"}
        kwargs["use_cache"] = False
        for key in ("past_key_values", "past_key_value", "cache"):
            if key in kwargs:
                kwargs[key] = None
        self.kwargs = kwargs  # identical for every window: same length, batch 1
        self.hidden = torch.cat(hidden, 0)  # (n, T, d)

    def run(self, block: nn.Module) -> torch.Tensor:
        """Run `block` on every window separately; returns the outputs (n, T, d)."""
        outs = []
        with torch.inference_mode():
            for h in self.hidden:
                out = block(h.unsqueeze(0), **self.kwargs)
                outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs, 0)

    def advance(self, block: nn.Module) -> None:
        """Replace the held inputs by `block`'s outputs: the next block's inputs."""
        self.hidden = self.run(block)


class StatsCollector:
    """Accumulates input statistics of the named linears of one block while it runs."""

    def __init__(self, block: nn.Module, names: dict[str, str], hessian: bool, act_norm: bool,
                 inputs_stride: int = 0):
        # names: local module path inside the block -> full layer name
        # inputs_stride: keep every k-th input row (0: keep none)
        self.hessian = {}
        self.act_norm = {}
        self.inputs = {}
        self.stride = inputs_stride
        self.count = {}
        self._handles = []
        for local, full in names.items():
            mod = block.get_submodule(local)
            self.count[full] = 0
            if inputs_stride:
                self.inputs[full] = []
            if hessian:
                self.hessian[full] = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64)
            if act_norm:
                self.act_norm[full] = torch.zeros(mod.in_features, dtype=torch.float64)
            self._handles.append(mod.register_forward_pre_hook(self._hook(full)))

    def _hook(self, full: str):
        def hook(module, args):
            self.add(full, args[0])

        return hook

    def add(self, full: str, x: torch.Tensor) -> None:
        """Account the inputs `x` (..., in) of layer `full` (what the hook sees)."""
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.count[full] += x.shape[0]
        if full in self.hessian:
            self.hessian[full] += (x.T @ x).double()
        if full in self.act_norm:
            self.act_norm[full] += x.pow(2).sum(0).double()
        if full in self.inputs:
            start = (-self.count[full] + x.shape[0]) % self.stride  # keeps the stride across windows
            self.inputs[full].append(x[start :: self.stride].clone())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def stats(self, full: str) -> dict:
        n = max(self.count[full], 1)
        out = {"n_tokens": self.count[full]}
        if full in self.hessian:
            out["hessian"] = self.hessian.pop(full) / n
        if full in self.act_norm:
            out["act_norm"] = self.act_norm.pop(full) / n
        if full in self.inputs:
            out["inputs"] = torch.cat(self.inputs.pop(full), 0)
        return out
