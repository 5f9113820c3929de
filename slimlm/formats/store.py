"""Saving and loading a compressed model: a directory, never pickle.

    slimlm.json           manifest: source, recipe, per-layer format / bits / metadata, version
    config.json           the transformers model config
    dense.safetensors     every tensor left uncompressed (embeddings, norms, biases)
    packed.safetensors    the packed tensors of each compressed layer, keyed "<layer>/<field>"
    tokenizer files

A compressed output head with tied embeddings is stored once, in packed.safetensors; its
manifest entry names the embedding that reads it (`"embedding": "model.embed_tokens"`),
which dense.safetensors then does not hold, and loading rebuilds it as a
`CompressedEmbedding` of the head.

A directory is written to a temporary sibling and renamed into place, so an
interrupted save leaves nothing half-written; an existing output is replaced only
when `overwrite=True`, and then only after the new directory is complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from slimlm.atomic import atomic_directory
from slimlm.errors import SlimlmError
from slimlm.formats.base import format_class
from slimlm.formats.linear import CompressedEmbedding, CompressedLinear, replace_linear, tie_compressed_embedding
from slimlm.formats.mapped import map_safetensors
from slimlm.models.loaded import LoadedModel

MANIFEST = "slimlm.json"
FORMAT_VERSION = 1


def compressed_layers(model: torch.nn.Module) -> dict[str, CompressedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}


def is_compressed_dir(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def layer_table(model: torch.nn.Module) -> dict[str, dict]:
    """Per compressed layer: method, format, shape, exact bits and bits per weight, and the
    embedding that reads its rows (a tied, compressed head)."""
    readers = {id(m.head): n for n, m in model.named_modules() if isinstance(m, CompressedEmbedding)}
    table = {}
    for name, mod in compressed_layers(model).items():
        p = mod.packed
        numel = p.shape[0] * p.shape[1]
        meta, _ = p.to_state()
        table[name] = dict(method=mod.method, format=p.format_name, shape=list(p.shape), nbits=p.nbits(),
                           numel=numel, bpw=p.nbits() / numel, meta=meta)
        if id(mod) in readers:
            table[name]["embedding"] = readers[id(mod)]
    return table


def unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tensors that share storage (tied embeddings) kept once, under
    their first name; `tie_weights()` restores the others on load."""
    out, seen = {}, set()
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key not in seen:
            seen.add(key)
            out[name] = t.contiguous()
    return out


def save_compressed(lm: LoadedModel, dest: str | Path, overwrite: bool = False) -> Path:
    """Write `lm` (with its CompressedLinear layers) to directory `dest`, atomically."""
    from safetensors.torch import save_file

    dest = Path(dest)
    with atomic_directory(dest, overwrite) as tmp:
        layers = compressed_layers(lm.model)
        packed = {}
        for name, mod in layers.items():
            _, tensors = mod.packed.to_state()
            for field, t in tensors.items():
                packed[f"{name}/{field}"] = t.contiguous()
        save_file(packed, str(tmp / "packed.safetensors"))
        save_file(unique_state_dict(lm.model), str(tmp / "dense.safetensors"))
        config = lm.model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        lm.tokenizer.save_pretrained(str(tmp))
        manifest = dict(lm.manifest or {})
        manifest.update(format_version=FORMAT_VERSION, layers=layer_table(lm.model))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return dest


def load_compressed(path: str | Path, cache: bool | None = None) -> LoadedModel:
    """Rebuild a compressed model from its directory; logits equal the saved model's bit for bit.

    Both safetensors files are memory-mapped (`slimlm.formats.mapped`) and the model skeleton
    is built on the meta device, so no float32 weight of a compressed layer is ever made:
    packed and dense tensors are views of the files, read as they are first touched."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from slimlm.models.sources import _check_safetensors_size, _quiet_transformers

    _quiet_transformers()
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SlimlmError(f"{path / MANIFEST} is unreadable or not JSON ({e}); the directory is corrupt") from None
    if manifest.get("format_version", 0) > FORMAT_VERSION:
        raise SlimlmError(f"{path} was written by a newer slimlm (format {manifest['format_version']}); upgrade slimlm")
    for f in ("dense.safetensors", "packed.safetensors", "config.json"):
        if not (path / f).is_file():
            raise SlimlmError(f"{path} is missing {f}; the directory is incomplete")
    for f in ("dense.safetensors", "packed.safetensors"):
        _check_safetensors_size(path / f)
    try:
        config = AutoConfig.from_pretrained(str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        packed_tensors = map_safetensors(path / "packed.safetensors")  # memory maps: nothing read or copied yet
        dense = map_safetensors(path / "dense.safetensors")
    except SlimlmError:
        raise
    except Exception as e:
        raise SlimlmError(f"could not read the compressed model in {path}: {e}") from None
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    for name, entry in manifest.get("layers", {}).items():
        prefix = f"{name}/"
        tensors = {k[len(prefix):]: v for k, v in packed_tensors.items() if k.startswith(prefix)}
        packed = format_class(entry["format"]).from_state(entry["meta"], tensors)
        bias = dense.pop(f"{name}.bias", None)
        replace_linear(model, name, CompressedLinear(packed, bias=bias, method=entry.get("method", ""), cache=cache))
        if entry.get("embedding"):  # tied: the embedding gathers rows of this layer
            try:
                tie_compressed_embedding(model, entry["embedding"], name, dtype=dtype)
            except AttributeError:
                raise SlimlmError(f"{path / MANIFEST} ties layer {name} to an embedding {entry['embedding']!r} "
                                  "this model does not have; the directory is corrupt") from None
    missing, unexpected = model.load_state_dict(dense, strict=False, assign=True)
    if unexpected:
        raise SlimlmError(f"{path}/dense.safetensors holds tensors this model has no place for: {unexpected[:3]}")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise SlimlmError(f"{path} is missing weights for {still_meta[:3]}; the directory is corrupt")
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(path), kind="slimlm", manifest=manifest)
