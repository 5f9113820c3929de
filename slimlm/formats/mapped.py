"""Safetensors files as memory maps, and handing their pages back.

`map_safetensors(path)` gives a file's tensors as views of one private (copy-on-write)
memory map of it: nothing is read or copied at load time; a page is read from the page
cache the first time something touches it and then counts in the process's RSS as a
file-backed page. A compressed model loaded this way occupies what its file holds.

`release(tensors)` drops the resident pages that lie wholly inside such tensors
(`madvise(MADV_DONTNEED)`): the tensors stay valid, and a later touch reads the page back
from the file. The lean runtime calls it on the packed codes its kernels have repacked
and no longer read, so they are not held twice; evaluation or saving afterwards simply
reads them again. A page written through a tensor (copy-on-write) would lose the write:
packed tensors are never written in place. Tensors outside such a map are left alone.
"""

from __future__ import annotations

import json
import mmap
import warnings
import weakref
from pathlib import Path

import torch

from slimlm.errors import SlimlmError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}

# start address -> (end address, the map): the maps `release` may advise; a map leaves when freed
_MAPS: dict[int, tuple[int, "weakref.ref[mmap.mmap]"]] = {}


def map_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """name -> tensor of a safetensors file, each a view of one private memory map of it."""
    path = Path(path)
    with open(path, "rb") as f:
        size = path.stat().st_size
        try:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise SlimlmError(f"{path} is not a valid safetensors file (its header does not parse: {e})") from None
        mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # copy-on-write: tensors stay writable
    base = 8 + n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = torch.frombuffer(mm, dtype=torch.uint8)  # the map's first byte: the registry's key
    start = whole.data_ptr()
    _MAPS[start] = (start + size, weakref.ref(mm, lambda _, k=start: _MAPS.pop(k, None)))
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = DTYPES[e["dtype"]], e["shape"], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SlimlmError(f"{path}: tensor {name!r} has an entry this reader does not know ({e}); "
                              "the file is corrupt or of a newer kind") from None
        if base + b > size or a > b:
            raise SlimlmError(f"{path} is truncated: tensor {name!r} ends past the file's end")
        numel, size_of = 1, torch.empty((), dtype=dtype).element_size()
        for d in shape:
            numel *= d
        if numel * size_of != b - a:
            raise SlimlmError(f"{path}: tensor {name!r} has {b - a} bytes for shape {shape}; the file is corrupt")
        raw = whole[base + a: base + b]  # a view: the tensors keep `whole`, hence the map, alive
        if (base + a) % size_of:
            raw = raw.clone()  # misaligned for its dtype (not written so by safetensors): a copy
        out[name] = raw.view(dtype).view(shape) if numel else torch.empty(shape, dtype=dtype)
    return out


def release(tensors) -> int:
    """Drop the resident pages wholly inside `tensors` that lie in a map of `map_safetensors`;
    returns the bytes advised (they stay readable, from the file)."""
    done = 0
    if not hasattr(mmap, "MADV_DONTNEED"):  # no madvise on this platform: the pages simply stay
        return done
    for t in tensors:
        lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        for start, (end, ref) in list(_MAPS.items()):
            mm = ref()
            if mm is None or not start <= lo < end:
                continue
            a = -(-(lo - start) // mmap.PAGESIZE) * mmap.PAGESIZE  # page-aligned interior, relative to the map
            b = (min(hi, end) - start) // mmap.PAGESIZE * mmap.PAGESIZE
            if b > a:
                mm.madvise(mmap.MADV_DONTNEED, a, b - a)
                done += b - a
            break
    return done
