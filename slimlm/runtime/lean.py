"""A lean forward for the Llama family (Llama, Mistral, Qwen2, Qwen3), in plain PyTorch.

It reads the weights of a loaded transformers model (nothing is copied except what a
kernel repacks) and runs decoder blocks with a preallocated KV cache, in the spirit of
gpt-fast: one function, a few tensor ops per block, no cache objects, masks or hooks.
Linear layers run through `slimlm.kernels` when they are compressed in a format a kernel
serves (q, k, v stacked into one call, gate and up into another), for prompts as for
single tokens, so a compressed layer never has a float32 copy; through the module's
reference path otherwise. The memory-mapped packed pages a kernel has repacked are handed
back to their file (`slimlm.formats.mapped.release`): the weights are held once.

    rope          the model's own rotary module, tabulated once (theta, scaling, ...)
    GQA           queries grouped by their KV head, no repeated keys
    qk-norm       Qwen3's per-head RMSNorm of q and k before rope
    sliding       Mistral / Qwen2 sliding-window layers mask keys older than the window
    head          the output head — as loaded (compressed by the recipe or dense), or
                  quantized here (`RuntimeConfig.head_bits`)
    embedding     rows gathered through the model's input-embedding module: an
                  nn.Embedding, or the `CompressedEmbedding` of a tied, compressed head

Runs of up to `fused_max_tokens` tokens (decoding, speculative verification) go through one
C call for all blocks (slimlm/kernels/csrc/lean.c, the same operations in the same order)
when every block linear is an int8-path IntQuant kernel or a dense float32 nn.Linear; that
removes the per-operation Python and dispatch cost that otherwise dominates a decode step of
a small model. A longer prompt runs as fused chunks of `fused_max_tokens` (64; ~17 % faster
prefill than the PyTorch blocks at 128 tokens, which spent ~50 of 172 ms outside the
linears); other formats, all-position logits of a long run and `RuntimeConfig(fused=False)`
run the PyTorch blocks below. One LeanModel serves one sequence at a time (it owns the KV
cache and the fused step's scratch buffers).

The cache holds `tokens`: a new prompt that starts with them reuses their keys and
values (multi-turn chat), and `truncate(n)` rolls back (speculative decoding).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.errors import SlimlmError
from slimlm.formats.linear import CompressedLinear, Kernel
from slimlm.formats.mapped import release

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the lean runtime runs a model: kernel choice, output-head compression, cache length.

    `head_bits` 0 keeps the head as loaded; 2–8 quantizes it (RTN, asymmetric, groups of
    `head_group`) for the runtime only — the tied input embedding stays as it is.
    `fused` runs short steps (decoding, verification) as one C call over all blocks
    (csrc/lean.c) when every block linear is an int8-path IntQuant kernel or dense float32;
    False keeps the PyTorch blocks.
    """

    kernel: Kernel = Kernel.AUTO
    head_bits: int = 0
    head_group: int = 64
    max_seq: int = 4096
    fused: bool = True
    threads: int | None = None  # None: chosen by measurement while decoding (runtime/threads.py)

    def __post_init__(self):
        object.__setattr__(self, "kernel", Kernel(self.kernel))
        if self.head_bits and not 2 <= self.head_bits <= 8:
            raise SlimlmError(f"head bits must be 0 (keep) or 2..8, got {self.head_bits}")
        if self.head_group < 1:
            raise SlimlmError(f"head group must be positive, got {self.head_group}")
        if self.max_seq < 2:
            raise SlimlmError(f"max sequence length must be at least 2, got {self.max_seq}")
        if self.threads is not None and self.threads < 1:
            raise SlimlmError(f"threads must be at least 1 (or None: chosen by measurement), got {self.threads}")


def supports(model: nn.Module) -> bool:
    """The lean runtime computes in float32 over float32 dense weights; other models (a BF16
    cast, say) run on transformers' own generation instead."""
    if getattr(getattr(model, "config", None), "model_type", None) not in SUPPORTED:
        return False
    return all(p.dtype == torch.float32 for p in model.parameters() if p.is_floating_point())


def _stacked_bias(mods: list[nn.Module]) -> torch.Tensor | None:
    """The biases of linears stacked along their outputs (zeros where one has none), or None."""
    if all(m.bias is None for m in mods):
        return None
    return torch.cat([m.bias if m.bias is not None else torch.zeros(m.out_features) for m in mods]).float().contiguous()


def _trim_heap() -> None:
    """glibc's malloc_trim(0): return freed heap pages to the OS (a no-op elsewhere)."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def greedy(logits: torch.Tensor) -> int:
    """The index of the largest of (V,) float32 logits (the first on ties, NaN counting as
    largest, as torch.argmax) — through numpy, one thread: torch's reduction wakes the
    intra-op thread pool and costs ~0.2-0.3 ms per token on a 2-vCPU VM, a few % of a step."""
    if logits.dtype == torch.float32 and logits.device.type == "cpu" and not logits.requires_grad:
        return int(logits.numpy().argmax())
    return int(logits.argmax())


class _LinearOp:
    """x (T, in) -> (T, Σ out) for linears sharing their input: one C kernel call when they
    are all IntQuant with one layout (and the extension is built), one kernel call per linear
    when they are IntQuant of different layouts, the modules otherwise. A kernel runs every
    batch size (the int8 path tiles the rows; the float path decodes into a scratch matrix
    for more than 16), so no float32 copy of a compressed weight is ever kept; only
    formats no kernel serves run their module's reference path."""

    REPACK_ROWS = 2048  # rows repacked at a time: the repacking's int32 temporaries stay a few MB

    def __init__(self, mods: list[nn.Module], kernel: Kernel):
        from slimlm.kernels import extension
        from slimlm.kernels.intq import IntQKernel, stackable

        self.mods, self.kernel, self.parts = mods, None, None
        self.out_features = sum(m.out_features for m in mods)
        self.always = kernel is Kernel.CPU
        self.bias = None
        if kernel is Kernel.REFERENCE or extension() is None or not all(isinstance(m, CompressedLinear) for m in mods):
            return
        packs = [m.packed for m in mods]
        if not all(getattr(p, "format_name", None) == "int" for p in packs):
            return
        if stackable(packs):
            self.kernel = IntQKernel([c for p in packs for c in p.row_chunks(self.REPACK_ROWS)], extension())
            self.bias = _stacked_bias(mods)
            # the kernel holds its own repacked copy: the memory-mapped pages it read go back (see formats/mapped.py)
            release(t for p in packs for t in p.to_state()[1].values())
        else:  # mixed layouts (e.g. v_proj at more bits): one kernel each, outputs concatenated
            self.parts = [_LinearOp([m], kernel) for m in mods]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            y = self.kernel(x)
            return y if self.bias is None else y + self.bias
        if self.parts is not None:
            return torch.cat([op(x) for op in self.parts], -1)
        if len(self.mods) == 1:
            return self.mods[0](x)
        return torch.cat([m(x) for m in self.mods], -1)

    def plan(self) -> tuple | None:
        """This product as lean.c reads it (pointers as ints), or None when it cannot."""
        from slimlm.kernels.intq import Path

        if self.kernel is not None:
            if self.kernel.path is not Path.INT8:
                return None
            bias = 0 if self.bias is None else self.bias.data_ptr()
            return (0, *self.kernel._args, bias)
        if self.always or any(type(m) is not nn.Linear or m.weight.dtype != torch.float32
                              or not m.weight.is_contiguous() for m in self.mods):
            return None
        self._dense_bias = _stacked_bias(self.mods)  # kept alive: the plan points into it
        bias = 0 if self._dense_bias is None else self._dense_bias.data_ptr()
        return (1, self.mods[0].in_features, bias, tuple((m.weight.data_ptr(), m.out_features) for m in self.mods))

    def nbytes(self) -> int:
        """Weight bytes one product reads."""
        if self.kernel is not None:
            return self.kernel.nbytes()
        if self.parts is not None:
            return sum(op.nbytes() for op in self.parts)
        return sum(m.packed.nbits() // 8 if isinstance(m, CompressedLinear) else m.weight.numel() * m.weight.element_size()
                   for m in self.mods)


class _Block:
    def __init__(self, layer: nn.Module, kernel: Kernel):
        at, mlp = layer.self_attn, layer.mlp
        self.ln1, self.ln2 = layer.input_layernorm.weight, layer.post_attention_layernorm.weight
        self.qkv = _LinearOp([at.q_proj, at.k_proj, at.v_proj], kernel)
        self.o = _LinearOp([at.o_proj], kernel)
        self.gate_up = _LinearOp([mlp.gate_proj, mlp.up_proj], kernel)
        self.down = _LinearOp([mlp.down_proj], kernel)
        self.q_norm = at.q_norm.weight if hasattr(at, "q_norm") else None
        self.k_norm = at.k_norm.weight if hasattr(at, "k_norm") else None
        self.q_out, self.k_out = at.q_proj.out_features, at.k_proj.out_features
        self.ffn = mlp.gate_proj.out_features


class LeanModel:
    """A Llama-family causal LM ready to decode: `prefill`, `step`, `extend`, `truncate`."""

    fused_max_tokens = 0  # tokens one fused call takes (the extension's LEAN_MAX_T); longer prompts go in chunks

    def __init__(self, model: nn.Module, runtime: RuntimeConfig = RuntimeConfig()):
        cfg = model.config
        if cfg.model_type not in SUPPORTED:
            raise SlimlmError(f"the lean runtime supports {', '.join(SUPPORTED)}, not {cfg.model_type!r}")
        self.model, self.runtime = model, runtime
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps = cfg.rms_norm_eps
        self.dim = cfg.hidden_size
        self.blocks = [_Block(layer, runtime.kernel) for layer in model.model.layers]
        self.n_kv = [b.k_out // self.hd for b in self.blocks]  # read from the weights: pruned heads stay right
        self.windows = self._windows(cfg)
        self.embed = model.get_input_embeddings()  # ids (T,) -> (T, d)
        self.norm = model.model.norm.weight
        self.head = self._head(model, runtime)
        self.max_seq = min(runtime.max_seq, getattr(cfg, "max_position_embeddings", runtime.max_seq) or runtime.max_seq)
        with torch.no_grad():  # (max_seq, hd) tables from the model's own rotary module
            pos = torch.arange(self.max_seq).unsqueeze(0)
            cos, sin = model.model.rotary_emb(torch.zeros(1, 1, self.dim), pos)  # x only gives dtype and device
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.tokens: list[int] = []
        self._head_plan = None
        w = self.embed.weight if type(self.embed) is nn.Embedding else None  # (a compressed one's would decode the table)
        plain = w is not None and w.dtype == torch.float32 and w.device.type == "cpu"
        self._embed_rows = w.detach().numpy() if plain else None  # the fused path's (V, d) rows, shared memory
        self._plan = self._fused_plan() if runtime.fused and runtime.kernel is not Kernel.REFERENCE else None
        self._cache_ptrs: tuple[torch.Tensor, torch.Tensor] | None = None
        _trim_heap()  # the repacking's freed temporaries go back to the OS (glibc keeps them otherwise)
        self._tuner = None  # ThreadTuner of decode steps, made on the first step when threads are not fixed
        if runtime.threads is not None:
            from slimlm.runtime.threads import set_threads

            set_threads(runtime.threads)

    def _fused_plan(self):
        """lean.c's plan of this model, or None when a block linear has no fused form."""
        from slimlm.kernels import extension, slow_path_warning

        ext = extension()
        if ext is None or not hasattr(ext, "lean_new"):
            return None
        slow_path_warning()  # once per process, on a CPU that gets the portable loop
        self.fused_max_tokens = ext.LEAN_MAX_T
        layers = []
        for b, win in zip(self.blocks, self.windows):
            ops = [op.plan() for op in (b.qkv, b.o, b.gate_up, b.down)]
            if any(op is None for op in ops):
                return None
            norms = [0 if w is None else w.data_ptr() for w in (b.q_norm, b.k_norm)]
            if any(w is not None and (w.dtype != torch.float32 or not w.is_contiguous())
                   for w in (b.ln1, b.ln2, b.q_norm, b.k_norm)):
                return None
            layers.append((b.ln1.data_ptr(), b.ln2.data_ptr(), *norms, b.q_out // self.hd, b.k_out // self.hd,
                           b.ffn, win or 0, *ops))
        if self.norm.dtype != torch.float32 or not self.norm.is_contiguous():
            return None
        head = self.head.plan()  # the head in C too when it has a fused form (else it stays a module)
        self._head_plan = ext.lean_linear_new(head) if head is not None else None
        return ext.lean_new(self.dim, self.hd, float(self.eps), self.max_seq, self.cos.data_ptr(), self.sin.data_ptr(),
                            self.norm.data_ptr(), layers)

    @property
    def fused(self) -> bool:
        """Whether short steps (up to `fused_max_tokens` tokens) run as one C call (csrc/lean.c)."""
        return self._plan is not None

    @staticmethod
    def _windows(cfg) -> list[int | None]:
        n = cfg.num_hidden_layers
        win = getattr(cfg, "sliding_window", None)
        types = getattr(cfg, "layer_types", None)
        if types:
            return [win if t == "sliding_attention" and win else None for t in types]
        if cfg.model_type == "mistral" and win:
            return [win] * n
        return [None] * n

    @staticmethod
    def _head(model, runtime: RuntimeConfig):
        head = model.get_output_embeddings()
        if not runtime.head_bits:
            return _LinearOp([head], runtime.kernel)
        from slimlm.methods.affine import quantize_rtn

        # RTN is row by row: quantized a chunk of rows at a time, stacked back into one kernel,
        # so neither a dense head's float temporaries nor a compressed head's decoded table is whole
        out, step = head.out_features, _LinearOp.REPACK_ROWS
        group = min(runtime.head_group, head.in_features)
        packed = head.packed if isinstance(head, CompressedLinear) else None
        rows_of = getattr(packed, "dequantize_rows", None)
        table = packed.dequantize() if packed is not None and rows_of is None else None  # no row decoder: once
        parts = []
        for r0 in range(0, out, step):
            r1 = min(r0 + step, out)
            if packed is None:
                w = head.weight[r0:r1]
            else:
                w = rows_of(torch.arange(r0, r1)) if rows_of is not None else table[r0:r1]
            bias = None if head.bias is None else head.bias[r0:r1]
            parts.append(CompressedLinear(quantize_rtn(w.detach().float(), runtime.head_bits, group), bias=bias,
                                          method="runtime-head"))
            _trim_heap()  # glibc would otherwise keep each chunk's freed temporaries (~230 MiB over the 49k rows)
        return _LinearOp(parts, runtime.kernel)

    # ----- cache -----------------------------------------------------------------------
    def _ensure(self, length: int) -> None:
        if length > self.max_seq:
            raise SlimlmError(f"the sequence reached {length} tokens, past this runtime's limit of {self.max_seq}; "
                              "start a new conversation or raise max_seq")
        have = self.k_cache[0].shape[1] if self.k_cache else 0
        if length <= have:
            return
        new = min(self.max_seq, max(length, 2 * have, 256))
        for i, nk in enumerate(self.n_kv):  # (KVH, L, hd) per layer, grown by doubling
            for cache in (self.k_cache, self.v_cache):
                t = torch.zeros(nk, new, self.hd)
                if have:
                    t[:, :have] = cache[i][:, :have]
                if i < len(cache):
                    cache[i] = t
                else:
                    cache.append(t)
        self._cache_ptrs = (torch.tensor([t.data_ptr() for t in self.k_cache], dtype=torch.int64),
                            torch.tensor([t.data_ptr() for t in self.v_cache], dtype=torch.int64))

    def truncate(self, n: int) -> None:
        """Forget every cached position from `n` on (the keys stay, to be overwritten)."""
        del self.tokens[n:]

    def reset(self) -> None:
        self.tokens.clear()

    # ----- forward ---------------------------------------------------------------------
    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x (T, heads, hd); cos/sin (T, 1, hd); rotate_half convention of transformers
        h = self.hd // 2
        return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin

    @torch.inference_mode()
    def extend(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Run `ids` after the cached tokens; logits (V,) of the last one, or (T, V) of all."""
        T, pos = len(ids), len(self.tokens)
        L = pos + T
        self._ensure(L)
        if self._plan is not None and T <= self.fused_max_tokens:
            return self._fused(ids, pos, all_logits)
        if self._plan is not None and not all_logits:  # a long prompt: fused chunks, the last one's logits
            m = self.fused_max_tokens
            for i in range(0, T, m):
                logits = self._fused(ids[i:i + m], pos + i, False)
            return logits
        x = self.embed(torch.tensor(ids)).float()  # (T, d)
        cos, sin = self.cos[pos:L].unsqueeze(1), self.sin[pos:L].unsqueeze(1)  # (T, 1, hd)
        hd, scale = self.hd, self.hd ** -0.5
        qpos = torch.arange(pos, L).unsqueeze(1)  # (T, 1)
        kpos = torch.arange(L).unsqueeze(0)  # (1, L)
        for i, b in enumerate(self.blocks):
            nkv = self.n_kv[i]
            nq = b.q_out // hd
            rep = nq // nkv
            h = F.rms_norm(x, (self.dim,), b.ln1, self.eps)
            qkv = b.qkv(h)  # (T, (nq + 2 nkv) hd)
            q = qkv[:, : b.q_out].view(T, nq, hd)
            k = qkv[:, b.q_out: b.q_out + b.k_out].view(T, nkv, hd)
            v = qkv[:, b.q_out + b.k_out:].view(T, nkv, hd)
            if b.q_norm is not None:  # Qwen3: RMSNorm per head before rope
                q = F.rms_norm(q, (hd,), b.q_norm, self.eps)
                k = F.rms_norm(k, (hd,), b.k_norm, self.eps)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            kc, vc = self.k_cache[i], self.v_cache[i]  # (KVH, maxL, hd)
            kc[:, pos:L] = k.transpose(0, 1)
            vc[:, pos:L] = v.transpose(0, 1)
            # queries grouped by KV head: (KVH, rep·T, hd) against (KVH, L, hd)
            qg = q.view(T, nkv, rep, hd).permute(1, 2, 0, 3).reshape(nkv, rep * T, hd)
            att = torch.bmm(qg * scale, kc[:, :L].transpose(1, 2))  # (KVH, rep·T, L)
            win = self.windows[i]
            if T > 1 or (win is not None and L > win):
                bad = kpos > qpos  # causal (T, L)
                if win is not None:
                    bad = bad | (kpos <= qpos - win)
                att = att.view(nkv, rep, T, L).masked_fill(bad, float("-inf")).view(nkv, rep * T, L)
            o = torch.bmm(torch.softmax(att, -1), vc[:, :L])  # (KVH, rep·T, hd)
            o = o.view(nkv, rep, T, hd).permute(2, 0, 1, 3).reshape(T, nq * hd)
            x = x + b.o(o)
            h = F.rms_norm(x, (self.dim,), b.ln2, self.eps)
            gu = b.gate_up(h)  # (T, 2 ffn)
            x = x + b.down(F.silu(gu[:, : b.ffn]) * gu[:, b.ffn:])
        self.tokens.extend(ids)
        x = x if all_logits else x[-1:]
        logits = self.head(F.rms_norm(x, (self.dim,), self.norm, self.eps)).float()
        return logits if all_logits else logits[0]

    def _fused(self, ids: list[int], pos: int, all_logits: bool) -> torch.Tensor:
        from slimlm.kernels import extension

        if self._embed_rows is not None:  # numpy gather: no intra-op thread-pool wake-up per token
            x = torch.from_numpy(self._embed_rows[ids])
        else:
            x = self.embed(torch.tensor(ids)).float().contiguous()  # (T, d), run and normed in place
        kp, vp = self._cache_ptrs
        extension().lean_step(self._plan, x.data_ptr(), len(ids), pos, kp.data_ptr(), vp.data_ptr(),
                              self.k_cache[0].shape[1])
        self.tokens.extend(ids)
        x = x if all_logits else x[-1:]
        if self._head_plan is None:
            logits = self.head(x).float()
        else:
            logits = torch.empty(x.shape[0], self.head.out_features)
            extension().lean_linear(self._head_plan, x.data_ptr(), x.shape[0], logits.data_ptr())
        return logits if all_logits else logits[0]

    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Logits (V,) after `ids`, reusing the cached prefix they share with the last call."""
        if not ids:
            raise SlimlmError("the prompt is empty; give at least one token")
        n = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            n += 1
        self.truncate(min(n, len(ids) - 1))  # recompute at least the last token, for its logits
        return self.extend(ids[len(self.tokens):])

    def step(self, token: int) -> torch.Tensor:
        """Logits (V,) after one more token, on the thread count in force (fixed, or the tuner's)."""
        if self._tuner is None:
            if self.runtime.threads is not None:
                return self.extend([token])
            from slimlm.runtime.threads import ThreadTuner

            self._tuner = ThreadTuner()
        self._tuner.next()
        t0 = time.perf_counter()
        logits = self.extend([token])
        self._tuner.record(time.perf_counter() - t0)
        return logits

    @property
    def threads(self) -> int:
        """The thread count decode steps run with now."""
        if self._tuner is not None:
            return self._tuner.chosen
        return self.runtime.threads or torch.get_num_threads()

    def bytes_per_token(self) -> int:
        """Weight bytes a decode step reads (block linears and head; one embedding row is negligible)."""
        return sum(op.nbytes() for b in self.blocks for op in (b.qkv, b.o, b.gate_up, b.down)) + self.head.nbytes()
