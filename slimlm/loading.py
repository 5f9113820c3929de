"""`slimlm.load`: one entry point for every kind of model source."""

from __future__ import annotations

from pathlib import Path

import torch

from slimlm.formats.store import is_compressed_dir, load_compressed
from slimlm.models.loaded import LoadedModel
from slimlm.models.sources import load_source


def load(source: str | Path, dtype=torch.float32) -> LoadedModel:
    """Load a builtin model name (`smollm2-135m`), an HF directory, a `.gguf` file or a
    slimlm compressed directory. Problems with the input raise `SlimlmError`."""
    source = str(source)
    if Path(source).is_dir() and is_compressed_dir(source):
        return load_compressed(source)
    return load_source(source, dtype=dtype)
