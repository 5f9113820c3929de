"""`LoadedModel`: a transformers causal LM, its tokenizer, and where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimlm.models.adapter import Adapter, adapter_for


@dataclass
class LoadedModel:
    """A model ready to compress, evaluate or run.

    `source` is what the user named (a builtin name or a path); `kind` is one of
    "builtin", "gguf", "hf", "slimlm"; `manifest` is the parsed slimlm.json of a
    compressed directory (None otherwise).
    """

    model: nn.Module
    tokenizer: Any
    source: str
    kind: str
    manifest: dict | None = None
    adapter: Adapter = field(init=False)

    def __post_init__(self):
        self.adapter = adapter_for(self.model)
        self.model.eval()

    def cast(self, dtype: str | torch.dtype) -> "LoadedModel":
        """Cast every floating-point parameter to `dtype` (e.g. "bfloat16"), in place. Buffers
        (rotary frequencies) stay as they are, as they do when a saved model is rebuilt."""
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        with torch.no_grad():
            for p in self.model.parameters():
                if p.is_floating_point():
                    p.data = p.data.to(dtype)
        emb = self.model.get_input_embeddings()
        if not isinstance(emb, nn.Embedding):  # a compressed embedding returns rows in its `dtype`
            emb.dtype = dtype
        self.model.config.dtype = dtype
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The model's compute dtype: its input embedding's (a compressed one states it)."""
        emb = self.model.get_input_embeddings()
        return emb.weight.dtype if isinstance(emb, nn.Embedding) else emb.dtype

    @property
    def config(self):
        return self.model.config
