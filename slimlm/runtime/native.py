"""The torch-free runtime: a compressed model exported for the fused C step, run with numpy.

`export_native(lm_or_dir, out)` (a torch process) builds the lean runtime of a model whose
every block linear and head run the int8 path, and writes what the fused step reads into a
self-contained directory:

    native.safetensors   the plan arrays (numpy): per layer i `l{i}.ln1`, `l{i}.ln2`
                         (dim,) f32, `l{i}.q_norm`/`k_norm` (hd,) f32 (Qwen3), and per
                         product p in qkv, o, gate_up, down `l{i}.{p}.codes` (out, row_bytes)
                         u8 in the int8-path layout (csrc/intq_i8.c), `.scales`/`.mins`
                         (out, G) fp16 bit patterns as i16, `.bias` (out,) f32; `head.*` the
                         same; `norm` (dim,), `cos`/`sin` (max_seq, hd) f32; the input
                         embedding: `embed.cols` (row_codes,) i32, the column of each code
                         of a head row (-1: padding), when it is tied to the compressed
                         head (rows decoded from the head's codes), else `embed.weight`
                         (vocab, dim) f32
    native.json          the manifest: format version, dims, eps, max_seq, eos ids, each
                         layer's (nq, nkv, ffn, window, qk_norm) and per product (group,
                         bits, mins, bias); shapes follow from the dims
    tokenizer files      tokenizer.json, tokenizer_config.json, chat_template.jinja

The int8-path layout is the same on every CPU (the x86 and ARM kernels read it), so the
export is portable. `NativeModel(dir)` memory-maps the safetensors (tensors are views of
one read-only map: the weights occupy page cache, counted once), loads the kernels'
extension by file (no torch), checks every tensor against the manifest before C sees a
pointer, and prefills / decodes through `lean_step` with a float32 KV cache in numpy.
Nothing here, nor anything it imports, imports torch.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from slimlm.errors import SlimlmError

FORMAT = "slimlm-native"
FORMAT_VERSION = 1
WEIGHTS, MANIFEST = "native.safetensors", "native.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
PRODUCTS = ("qkv", "o", "gate_up", "down")
_MODULES = {"qkv": "self_attn.q_proj+k_proj+v_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj+up_proj",
            "down": "mlp.down_proj"}
_DTYPES = {"U8": np.uint8, "I16": np.int16, "I32": np.int32, "F32": np.float32}
BENCH_TEXT = ("The history of the printing press begins in the fifteenth century, when movable type made "
              "books cheap enough for many readers. ")


def extension():
    """The kernels' compiled module, without torch (slimlm.kernels imports none at import)."""
    from slimlm.kernels import native_extension

    return native_extension()


# ----- export (a torch process) ------------------------------------------------------------
def _not_int8(op, name: str) -> str | None:
    """Why a lean product does not run the fused int8 path, or None when it does."""
    from slimlm.formats.linear import CompressedLinear
    from slimlm.kernels.intq import Path as KPath

    if op.kernel is not None and op.kernel.path is KPath.INT8:
        return None
    fmts = sorted({getattr(m.packed, "format_name", type(m.packed).__name__) if isinstance(m, CompressedLinear)
                   else "dense" for m in op.mods})
    why = "integer layouts differ" if op.parts is not None else "/".join(fmts)
    return f"{name} ({why})"


def export_native(lm_or_dir, out, overwrite: bool = False) -> dict:
    """Write `lm_or_dir` (a LoadedModel or a path slimlm.load reads) as a torch-free native
    directory `out` (atomically); returns a summary (output, size_bytes, layers). SlimlmError,
    naming the layers, when a block linear or the head does not run the fused int8 path."""
    import torch
    from torch import nn

    import slimlm
    from slimlm.atomic import atomic_directory
    from slimlm.formats.linear import CompressedEmbedding
    from slimlm.kernels.intq import i8_columns
    from slimlm.runtime.generate import eos_ids
    from slimlm.runtime.lean import LeanModel, RuntimeConfig

    src = str(lm_or_dir) if isinstance(lm_or_dir, (str, Path)) else getattr(lm_or_dir, "source", None)
    lm = slimlm.load(str(lm_or_dir)) if isinstance(lm_or_dir, (str, Path)) else lm_or_dir
    if Path(out).exists() and not overwrite:  # before the (slow) repacking
        raise SlimlmError(f"output {out} already exists; choose another path or pass --force to replace it")
    lean = LeanModel(lm.model, RuntimeConfig(threads=1))
    bad = []
    for i, b in enumerate(lean.blocks):
        for p in PRODUCTS:
            why = _not_int8(getattr(b, p), f"model.layers.{i}.{_MODULES[p]}")
            if why:
                bad.append(why)
    why = _not_int8(lean.head, "lm_head")
    if why:
        bad.append(why)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SlimlmError(f"export-native needs every block linear and the head in the integer format with the int8 "
                          f"kernel path; {', '.join(bad[:3])}{more} do not: compress with an rtn/gptq/awq integer recipe "
                          "that covers the head too, e.g. 'rtn:bits=4,group=32+rtn:bits=8,group=32@lm_head'")

    arrays: dict[str, np.ndarray] = {}

    def put(name, t):
        arrays[name] = t.detach().contiguous().numpy() if isinstance(t, torch.Tensor) else np.ascontiguousarray(t)

    def product(name, op):
        k = op.kernel
        put(f"{name}.codes", k.codes)
        put(f"{name}.scales", k.scales)
        if k.mins is not None:
            put(f"{name}.mins", k.mins)
        if op.bias is not None:
            put(f"{name}.bias", op.bias.float())
        return dict(group=k.group, bits=k.bits, mins=k.mins is not None, bias=op.bias is not None)

    layers = []
    for i, (b, win) in enumerate(zip(lean.blocks, lean.windows)):
        put(f"l{i}.ln1", b.ln1.float())
        put(f"l{i}.ln2", b.ln2.float())
        if b.q_norm is not None:
            put(f"l{i}.q_norm", b.q_norm.float())
            put(f"l{i}.k_norm", b.k_norm.float())
        layers.append(dict(nq=b.q_out // lean.hd, nkv=b.k_out // lean.hd, ffn=b.ffn, window=win or 0,
                           qk_norm=b.q_norm is not None, **{p: product(f"l{i}.{p}", getattr(b, p)) for p in PRODUCTS}))
    head = product("head", lean.head)
    put("norm", lean.norm.float())
    put("cos", lean.cos)
    put("sin", lean.sin)
    emb = lm.model.get_input_embeddings()
    if isinstance(emb, CompressedEmbedding) and emb.head is lm.model.get_output_embeddings():
        embed = "head"  # tied: rows decoded from the head's repacked codes
        put("embed.cols", i8_columns(lean.dim, head["group"]).to(torch.int32))
    elif type(emb) is nn.Embedding:
        embed = "table"
        put("embed.weight", emb.weight.float())
    else:
        raise SlimlmError(f"export-native reads a float nn.Embedding or the rows of a tied compressed head, "
                          f"not a {type(emb).__name__}")
    man = dict(format=FORMAT, format_version=FORMAT_VERSION, slimlm_version=slimlm.__version__, source=src,
               model_type=lm.config.model_type, dim=lean.dim, hd=lean.hd, eps=float(lean.eps), max_seq=lean.max_seq,
               vocab=lean.head.out_features, eos_ids=sorted(eos_ids(lm)), embed=embed, layers=layers, head=head)
    from safetensors.numpy import save_file

    with atomic_directory(out, overwrite) as tmp:
        save_file(arrays, str(tmp / WEIGHTS), metadata={"format": FORMAT})
        (tmp / MANIFEST).write_text(json.dumps(man, indent=1))
        srcdir = Path(str(lm_or_dir)) if isinstance(lm_or_dir, (str, Path)) and Path(str(lm_or_dir)).is_dir() else None
        if srcdir is not None and (srcdir / "tokenizer.json").exists():
            for f in TOKENIZER_FILES:
                if (srcdir / f).exists():
                    shutil.copyfile(srcdir / f, tmp / f)
        else:
            lm.tokenizer.save_pretrained(str(tmp))
        if not (tmp / "tokenizer.json").exists():
            raise SlimlmError(f"the tokenizer of {src} has no tokenizer.json (a fast tokenizer); export-native needs one")
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    return dict(output=str(out), size_bytes=size, layers=len(layers), embed=embed)


# ----- loading -----------------------------------------------------------------------------
def _map(path: Path) -> dict[str, np.ndarray]:
    """name -> read-only numpy view of one memory map of a safetensors file; SlimlmError if damaged."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                raise ValueError("header length past the file's end")
            header = json.loads(f.read(n))
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) if size else None
    except OSError as e:
        raise SlimlmError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, UnicodeDecodeError):
        raise SlimlmError(f"{path} is not a valid safetensors file (its header does not parse); export it again") from None
    whole = np.frombuffer(mm, np.uint8)
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (a, b) = np.dtype(_DTYPES[e["dtype"]]), [int(d) for d in e["shape"]], e["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SlimlmError(f"{path}: tensor {name!r} has an entry this runtime does not know; export it again") from None
        if 8 + n + b > size or a > b:
            raise SlimlmError(f"{path} is truncated: tensor {name!r} ends past the file's end; export it again")
        if int(np.prod(shape)) * dtype.itemsize != b - a:
            raise SlimlmError(f"{path}: tensor {name!r} has {b - a} bytes for shape {shape}; the file is corrupt")
        t = whole[8 + n + a: 8 + n + b].view(dtype).reshape(shape)
        out[name] = t if t.ctypes.data % dtype.itemsize == 0 else t.copy()  # misaligned for its dtype: a copy
    return out


class _Plan:
    """The manifest's expected tensors (name -> dtype, shape) and the plan tuples lean.c reads."""

    def __init__(self, man: dict, ext):
        self.man, self.ext = man, ext
        self.expect: dict[str, tuple[type, tuple]] = {}

    def want(self, name, dtype, *shape):
        self.expect[name] = (dtype, tuple(int(s) for s in shape))

    def product(self, name, p: dict, out: int, inp: int):
        bits, group = int(p["bits"]), int(p["group"])
        if not (2 <= bits <= 8 and 1 <= group <= inp):
            raise ValueError(f"{name}: {bits} bits, group {group}")
        row_codes = self.ext.layout_i8(inp, group)[1]
        g = -(-inp // group)
        self.want(f"{name}.codes", np.uint8, out, row_codes * bits // 8)
        self.want(f"{name}.scales", np.int16, out, g)
        if p["mins"]:
            self.want(f"{name}.mins", np.int16, out, g)
        if p["bias"]:
            self.want(f"{name}.bias", np.float32, out)
        return name, p, out, inp, group, bits

    def layout(self):
        m = self.man
        dim, hd, vocab, max_seq = int(m["dim"]), int(m["hd"]), int(m["vocab"]), int(m["max_seq"])
        self.layers = []
        for i, L in enumerate(m["layers"]):
            nq, nkv, ffn = int(L["nq"]), int(L["nkv"]), int(L["ffn"])
            self.want(f"l{i}.ln1", np.float32, dim)
            self.want(f"l{i}.ln2", np.float32, dim)
            if L["qk_norm"]:
                self.want(f"l{i}.q_norm", np.float32, hd)
                self.want(f"l{i}.k_norm", np.float32, hd)
            shapes = {"qkv": ((nq + 2 * nkv) * hd, dim), "o": (dim, nq * hd), "gate_up": (2 * ffn, dim), "down": (dim, ffn)}
            self.layers.append([self.product(f"l{i}.{p}", L[p], *shapes[p]) for p in PRODUCTS])
        self.head = self.product("head", m["head"], vocab, dim)
        self.want("norm", np.float32, dim)
        self.want("cos", np.float32, max_seq, hd)
        self.want("sin", np.float32, max_seq, hd)
        if m["embed"] == "head":
            self.want("embed.cols", np.int32, self.ext.layout_i8(dim, self.head[4])[1])
        else:
            self.want("embed.weight", np.float32, vocab, dim)


class NativeModel:
    """An exported model ready to decode, without torch: `prefill(ids)`, `step(tok)`, `generate`, `bench`."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            raise SlimlmError(f"{self.path} is not a native export (no {MANIFEST}); make one with `slimlm export-native`")
        try:
            man = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            raise SlimlmError(f"{self.path / MANIFEST} does not parse as JSON; export the model again") from None
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise SlimlmError(f"{self.path / MANIFEST} is not a slimlm native manifest; export the model again")
        if man.get("format_version") != FORMAT_VERSION:
            raise SlimlmError(f"{self.path} is native format version {man.get('format_version')}, this slimlm reads "
                              f"version {FORMAT_VERSION}; export the model again with this slimlm")
        self.ext = ext = extension()
        self._tuner = None  # None with fixed threads; else made on the first step (slimlm/runtime/threads.py)
        self._fixed = threads is not None
        if threads is not None:
            if threads < 1:
                raise SlimlmError(f"threads must be at least 1, got {threads}")
            ext.threads(threads)
        plan = _Plan(man, ext)
        try:
            plan.layout()
        except (KeyError, TypeError, ValueError) as e:
            raise SlimlmError(f"{self.path / MANIFEST} is damaged ({e}); export the model again") from None
        self.t = t = _map(self.path / WEIGHTS) if (self.path / WEIGHTS).exists() else None
        if t is None:
            raise SlimlmError(f"{self.path} has no {WEIGHTS}; export the model again")
        for name, (dtype, shape) in plan.expect.items():
            if name not in t:
                raise SlimlmError(f"{self.path / WEIGHTS} has no tensor {name!r}; the export is damaged: export it again")
            if t[name].dtype != dtype or t[name].shape != shape:
                raise SlimlmError(f"{self.path / WEIGHTS}: tensor {name!r} is {t[name].dtype}{list(t[name].shape)}, the "
                                  f"manifest needs {np.dtype(dtype)}{list(shape)}; export the model again")
        self.man = man
        self.dim, self.hd, self.vocab, self.max_seq = man["dim"], man["hd"], man["vocab"], man["max_seq"]
        self.eos_ids = set(man.get("eos_ids", []))
        self.n_kv = [int(L["nkv"]) for L in man["layers"]]
        ptr = lambda name: t[name].ctypes.data if name in t else 0  # noqa: E731

        def lin(name, p, out, inp, group, bits):
            return (0, ptr(f"{name}.codes"), ptr(f"{name}.scales"), ptr(f"{name}.mins"), out, inp, group, bits,
                    ptr(f"{name}.bias"))

        layers = [(ptr(f"l{i}.ln1"), ptr(f"l{i}.ln2"), ptr(f"l{i}.q_norm"), ptr(f"l{i}.k_norm"), int(L["nq"]),
                   int(L["nkv"]), int(L["ffn"]), int(L["window"]), *[lin(*op) for op in plan.layers[i]])
                  for i, L in enumerate(man["layers"])]
        try:
            self._plan = ext.lean_new(self.dim, self.hd, float(man["eps"]), self.max_seq, ptr("cos"), ptr("sin"),
                                      ptr("norm"), layers)
            self._head = ext.lean_linear_new(lin(*plan.head))
        except (ValueError, TypeError, OverflowError) as e:
            raise SlimlmError(f"{self.path}: the manifest does not fit the kernels ({e}); export the model again") from None
        self._head_w = plan.head  # (name, p, out, in, group, bits)
        if man["embed"] == "head":
            cols = t["embed.cols"]
            if cols.min() < -1 or cols.max() >= self.dim:
                raise SlimlmError(f"{self.path / WEIGHTS}: embed.cols points outside the rows; export the model again")
            self._keep = cols >= 0
            self._cols = cols[self._keep]
        self.max_t = ext.LEAN_MAX_T
        self.k_cache: list[np.ndarray] = []
        self.v_cache: list[np.ndarray] = []
        self.pos = 0
        self._logits = np.empty((1, self.vocab), np.float32)
        self._tok = None

    # ----- embedding ---------------------------------------------------------------------
    def embed(self, ids: list[int]) -> np.ndarray:
        """(T, dim) float32 rows of `ids`: the table's, or decoded from the tied head's int8-path codes
        exactly as IntQuant.dequantize_rows (q·s + m, or (q − 2^(b−1))·s, per group)."""
        idx = np.asarray(ids, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.vocab):
            raise SlimlmError(f"token id {int(idx.max())} is outside this model's vocabulary of {self.vocab}")
        if self.man["embed"] == "table":
            return np.ascontiguousarray(self.t["embed.weight"][idx])
        name, p, _, inp, group, bits = self._head_w
        raw = self.t[f"{name}.codes"][idx]  # (T, row_bytes)
        T = len(idx)
        steps = raw.reshape(T, -1, 8 * bits).astype(np.int32)  # (T, steps, 8·bits): a step's 64 codes, planes low bits first
        q = np.zeros((T, steps.shape[1], 64), np.int32)
        at, shift = 0, 0
        if bits == 8:
            q = steps
        else:
            for width, nbytes in ((4, 32), (2, 16), (1, 8)):
                if not bits & width:
                    continue
                pl = steps[:, :, at: at + nbytes]  # step byte nbytes·j + i <- byte i, bits width·j..
                parts = [(pl >> (width * j)) & ((1 << width) - 1) for j in range(8 // width)]
                q |= np.concatenate(parts, axis=2) << shift
                at, shift = at + nbytes, shift + width
        codes = np.empty((T, inp), np.float32)
        codes[:, self._cols] = q.reshape(T, -1)[:, self._keep]
        g = np.arange(inp) // group
        s = self.t[f"{name}.scales"][idx].view(np.float16).astype(np.float32)[:, g]
        if p["mins"]:
            return codes * s + self.t[f"{name}.mins"][idx].view(np.float16).astype(np.float32)[:, g]
        return (codes - np.float32(1 << (bits - 1))) * s

    # ----- cache and steps ---------------------------------------------------------------
    def _ensure(self, length: int) -> None:
        if length > self.max_seq:
            raise SlimlmError(f"the sequence reached {length} tokens, past this model's limit of {self.max_seq}; "
                              "use a shorter prompt or fewer new tokens")
        have = self.k_cache[0].shape[1] if self.k_cache else 0
        if length <= have:
            return
        new = min(self.max_seq, max(length, 2 * have, 256))
        for cache in (self.k_cache, self.v_cache):
            for i, nk in enumerate(self.n_kv):  # (KVH, L, hd) per layer, grown by doubling
                a = np.zeros((nk, new, self.hd), np.float32)
                if have:
                    a[:, :have] = cache[i][:, :have]
                cache[i:i + 1] = [a]
        self._kp = np.array([a.ctypes.data for a in self.k_cache], np.int64)
        self._vp = np.array([a.ctypes.data for a in self.v_cache], np.int64)

    def extend(self, ids: list[int]) -> np.ndarray:
        """Logits (V,) of the last of `ids` (at most LEAN_MAX_T) run after the cached tokens."""
        T = len(ids)
        if not 1 <= T <= self.max_t:
            raise SlimlmError(f"one step takes 1 to {self.max_t} tokens, got {T}")
        self._ensure(self.pos + T)
        x = self.embed(ids)  # (T, dim), run through the blocks and normed in place
        self.ext.lean_step(self._plan, x.ctypes.data, T, self.pos, self._kp.ctypes.data, self._vp.ctypes.data,
                           self.k_cache[0].shape[1])
        self.pos += T
        self.ext.lean_linear(self._head, x[-1:].ctypes.data, 1, self._logits.ctypes.data)
        return self._logits[0].copy()

    def prefill(self, ids: list[int]) -> np.ndarray:
        """Logits (V,) after `ids` on an empty cache, in chunks of LEAN_MAX_T tokens."""
        if not ids:
            raise SlimlmError("the prompt is empty; give at least one token")
        self._ensure(len(ids))
        self.pos = 0
        for i in range(0, len(ids), self.max_t):
            logits = self.extend(list(ids[i:i + self.max_t]))
        return logits

    def step(self, token: int) -> np.ndarray:
        """Logits after one more token, on the fixed thread count or the one measured fastest (as LeanModel)."""
        if self._fixed:
            return self.extend([int(token)])
        if self._tuner is None:
            from slimlm.runtime.threads import ThreadTuner

            self._tuner = ThreadTuner(setter=self.ext.threads)
        self._tuner.next()
        t0 = time.perf_counter()
        logits = self.extend([int(token)])
        self._tuner.record(time.perf_counter() - t0)
        return logits

    # ----- text --------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tok is None:
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(self.path / "tokenizer.json"))
        return self._tok

    def prompt_ids(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids of `prompt`, through the chat template (jinja2, as transformers renders it) when asked and present."""
        template = self._template() if chat else None
        if template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            cfg = self._tokenizer_config()
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            special = {k: v for k, v in cfg.items() if k.endswith("_token") and isinstance(v, str)}
            prompt = env.from_string(template).render(messages=[{"role": "user", "content": prompt}],
                                                      add_generation_prompt=True, **special)
        return self.tokenizer.encode(prompt, add_special_tokens=False).ids

    def _tokenizer_config(self) -> dict:
        f = self.path / "tokenizer_config.json"
        return json.loads(f.read_text()) if f.exists() else {}

    def _template(self) -> str | None:
        f = self.path / "chat_template.jinja"
        return f.read_text() if f.exists() else self._tokenizer_config().get("chat_template")

    def generate_ids(self, ids: list[int], max_new_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0):
        """Yield new token ids until `max_new_tokens` or an end-of-sequence id (no step after the last)."""
        if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
            raise SlimlmError(f"temperature ≥ 0, top-k ≥ 0 and top-p in (0, 1] are needed, got {temperature}, {top_k}, {top_p}")
        self._ensure(len(ids) + max_new_tokens - 1)  # past max_seq: one sentence before any work
        rng = np.random.default_rng(seed)
        logits = self.prefill(ids)
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, top_p, rng)
            if tok in self.eos_ids:
                return
            yield tok
            if i + 1 < max_new_tokens:
                logits = self.step(tok)

    def generate(self, prompt: str, max_new_tokens: int = 128, chat: bool = True, on_text=None, stop=(), **sampling) -> str:
        """The reply to `prompt`; `on_text` receives each new piece of text as it is decoded."""
        from slimlm.runtime.text import stream_text

        ids = self.generate_ids(self.prompt_ids(prompt, chat), max_new_tokens, **sampling)
        return stream_text(self.tokenizer, ids, tuple(stop), on_text)

    def bench(self, prompt_tokens: int = 128, decode_tokens: int = 64, runs: int = 3) -> dict:
        """Prefill and decode tokens/s (medians of `runs` after one warm-up, greedy) and peak RSS."""
        ids = self.tokenizer.encode(BENCH_TEXT * (prompt_tokens // 8 + 1), add_special_tokens=False).ids[:prompt_tokens]
        pre, dec = [], []
        for r in range(runs + 1):
            t0 = time.perf_counter()
            logits = self.prefill(ids)
            t1 = time.perf_counter()
            for _ in range(decode_tokens):
                logits = self.step(int(logits.argmax()))
            t2 = time.perf_counter()
            if r:
                pre.append(len(ids) / (t1 - t0))
                dec.append(decode_tokens / (t2 - t1))
        size = sum(f.stat().st_size for f in self.path.iterdir() if f.is_file())
        return dict(model=str(self.path), prompt_tokens=len(ids), decode_tokens=decode_tokens, runs=runs,
                    prefill_tps=float(np.median(pre)), decode_tps=float(np.median(dec)), peak_rss_bytes=peak_rss(),
                    size_bytes=size, isa=self.ext.isa(), torch_imported="torch" in sys.modules,
                    threads=self._tuner.chosen if self._tuner is not None else self.ext.threads(),
                    threads_chosen_by="fixed" if self._fixed else "measurement")


def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """One token id from (V,) float32 logits: argmax when temperature is 0 (the first on ties), else a draw
    from the softmax at `temperature` restricted to the top-k, then to the smallest prefix of mass top-p."""
    if temperature == 0:
        return int(logits.argmax())
    z = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.partition(z, -min(top_k, z.size))[-min(top_k, z.size)]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        sp = p[order]
        keep = np.cumsum(sp) - sp < top_p
        p = np.zeros_like(p)
        p[order[keep]] = sp[keep]
        p /= p.sum()
    return int(rng.choice(p.size, p=p))


def peak_rss() -> int:
    """This process's peak resident set size in bytes (slimlm/procinfo.py)."""
    from slimlm.procinfo import peak_rss_bytes

    return peak_rss_bytes()
