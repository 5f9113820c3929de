"""Per-layer sensitivity of every candidate format, measured on calibration data.

For layer ℓ with calibration inputs x (rows of X, H = XᵀX / n) and candidate c giving
weights Ŵ_c, the output error is

    e(ℓ, c) = mean_x ‖(Ŵ_c − W) x‖² = Σ ((ΔW H) ⊙ ΔW)                    (ΔW: (out, in))

Output errors of different layers do not hurt the model equally (a down_proj feeding
the residual stream of the last block is not a k_proj of the first), so each layer gets
a gain measured end to end: its weight is replaced by a probe candidate's, the rest of
the network runs from that block's cached inputs, and the KL divergence to the
reference's next-token distribution is divided by the probe's output error:

    g(ℓ) = KL(ℓ, probe) / e(ℓ, probe)          predicted KL(ℓ, c) = g(ℓ) · e(ℓ, c)

(second order: KL grows with the square of a small output perturbation, as e does).
Statistics come from the uncompressed model, one block at a time; the table is cached
on disk per candidate, so a second fit with other budgets measures nothing again.

The output head, when asked for, is one more layer: x is the final norm's output and its
gain is measured with the whole model run from the token ids, because with tied
embeddings the compressed head is also the input embedding (the probe's KL then holds
both effects; e only the head's, so the gain carries the embedding's share). Its
entries are cached apart from the blocks', so adding the head measures nothing else.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import slimlm
from slimlm.compress.calibration import BlockInputs, StatsCollector
from slimlm.compress.engine import MAX_INPUT_ROWS, compress_layer
from slimlm.compress.recipe import Recipe
from slimlm.data import Split, calibration_windows, resolve_text
from slimlm.errors import SlimlmError
from slimlm.fit.presets import HEAD_PROBE
from slimlm.methods import LayerStats


@dataclass(frozen=True)
class SensitivityConfig:
    """Calibration windows for the statistics; the first `kl_windows` of them measure gains."""

    text_file: str | None = None
    n_windows: int = 4
    seq_len: int = 512
    kl_windows: int = 1
    seed: int = 0
    probe: str = "rtn:bits=3,group=64"

    def __post_init__(self):
        if not 1 <= self.kl_windows <= self.n_windows:
            raise SlimlmError(f"kl_windows must be in 1..n_windows ({self.n_windows}), got {self.kl_windows}")
        if self.seq_len < 2:
            raise SlimlmError(f"sensitivity windows need at least 2 tokens, got {self.seq_len}")


@dataclass
class SensitivityTable:
    """layers in execution order; per layer and candidate: stored bits and output error;
    per layer: numel and gain. A candidate a layer refuses is absent from that layer's dicts."""

    layers: list[str]
    numel: dict[str, int]
    bits: dict[str, dict[str, int]] = field(default_factory=dict)  # layer -> candidate -> nbits
    err: dict[str, dict[str, float]] = field(default_factory=dict)  # layer -> candidate -> e(ℓ, c)
    gain: dict[str, float] = field(default_factory=dict)
    probe_kl: dict[str, float] = field(default_factory=dict)
    head: str | None = None  # the output head's name when it was measured (not in `layers`)

    def predicted_kl(self, layer: str, cand: str) -> float:
        return self.gain[layer] * self.err[layer][cand]


def _final_norm(lm):
    # The adapter names blocks and the head; the final norm of the Llama family sits at model.norm.
    return lm.model.get_submodule(getattr(lm.adapter, "norm_path", "model.norm"))


@torch.inference_mode()
def tail_logprobs(lm, start: int, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Log-probabilities (n·T, V) from running blocks `start`.. on block inputs `hidden` (n, T, d)."""
    blocks = lm.adapter.blocks(lm.model)[start:]
    norm, head = _final_norm(lm), lm.model.get_submodule(lm.adapter.head_path)
    out = []
    for h in hidden:
        h = h.unsqueeze(0)
        for b in blocks:
            h = b(h, **kwargs)
            h = h[0] if isinstance(h, tuple) else h
        out.append(F.log_softmax(head(norm(h))[0].float(), dim=-1))
    return torch.cat(out, 0)


def _kl(ref_logp: torch.Tensor, logp: torch.Tensor) -> float:
    """Mean over positions of KL(P_ref ‖ P), both given as log-probabilities (N, V)."""
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())


def _cache_root(lm, cfg: SensitivityConfig, cache_dir: Path) -> Path:
    from slimlm.sweep import _file_digest, model_fingerprint

    data = dict(model=model_fingerprint(lm.source), cfg=asdict(cfg), text=_file_digest(cfg.text_file),
                version=slimlm.__version__)
    return cache_dir / hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _digest(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def measure(lm, candidates: list[str], cfg: SensitivityConfig = SensitivityConfig(),
            cache_dir: str | Path | None = None, progress: bool = True,
            head_candidates: list[str] = ()) -> SensitivityTable:
    """The sensitivity table of `lm` (left unchanged) for one-stage recipes `candidates`; with
    `head_candidates`, the output head's entries too (its gain measured with HEAD_PROBE)."""
    cands = [Recipe.parse(c) for c in candidates]
    for c in [*cands, *(Recipe.parse(c) for c in head_candidates)]:
        if len(c.stages) != 1 or c.stages[0].layers:
            raise SlimlmError(f"fit candidate {c.to_string()!r} must be one stage without layer patterns")
    probe = Recipe.parse(cfg.probe).to_string()
    names = [c.to_string() for c in cands]
    if probe not in names:
        names.append(probe)
    layers = lm.adapter.linear_names(lm.model)
    table = SensitivityTable(layers=layers, numel={n: lm.model.get_submodule(n).weight.numel() for n in layers})
    table.bits = {n: {} for n in layers}
    table.err = {n: {} for n in layers}
    root = _cache_root(lm, cfg, Path(cache_dir)) if cache_dir else None
    missing = []
    for name in names:
        cached = _read(root / f"cand-{_digest(name)}.json") if root else None
        if cached is None:
            missing.append(name)
            continue
        for layer, (bits, err) in cached.items():
            table.bits[layer][name], table.err[layer][name] = bits, err
    gains = _read(root / f"gain-{_digest(probe)}.json") if root else None
    if missing or gains is None:
        _measure(lm, [Recipe.parse(n) for n in missing], probe, gains is None, cfg, table, progress)
        if root:
            root.mkdir(parents=True, exist_ok=True)
            for name in missing:
                _write(root / f"cand-{_digest(name)}.json",
                       {ly: [table.bits[ly][name], table.err[ly][name]] for ly in layers if name in table.bits[ly]})
            if gains is None:
                _write(root / f"gain-{_digest(probe)}.json", {"gain": table.gain, "probe_kl": table.probe_kl})
    if gains is not None:
        table.gain, table.probe_kl = gains["gain"], gains["probe_kl"]
    if head_candidates:
        _head_entries(lm, list(head_candidates), HEAD_PROBE, cfg, table, root)
    return table


def _head_entries(lm, candidates: list[str], probe: str, cfg: SensitivityConfig, table: SensitivityTable,
                  root: Path | None) -> None:
    """Fill `table`'s entries for the output head, from the cache or measured."""
    head = lm.adapter.head_path
    names = list(dict.fromkeys(Recipe.parse(c).to_string() for c in [*candidates, probe]))
    path = root / f"head-{_digest(json.dumps(names))}.json" if root else None
    got = _read(path) if path else None
    if got is None:
        got = _measure_head(lm, names, Recipe.parse(probe).to_string(), cfg)
        if path:
            root.mkdir(parents=True, exist_ok=True)
            _write(path, got)
    table.head = head
    table.numel[head] = lm.model.get_submodule(head).weight.numel()
    table.bits[head] = {c: b for c, (b, _) in got["cands"].items()}
    table.err[head] = {c: e for c, (_, e) in got["cands"].items()}
    table.gain[head], table.probe_kl[head] = got["gain"], got["probe_kl"]


def _read(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write(p: Path, obj) -> None:
    from slimlm.sweep import write_json_atomic

    write_json_atomic(p, obj)


def _measure(lm, cands: list[Recipe], probe: str, want_gain: bool, cfg: SensitivityConfig,
             table: SensitivityTable, progress: bool) -> None:
    text, _ = resolve_text(cfg.text_file, Split.CALIBRATION)
    windows = calibration_windows(lm.tokenizer, text, cfg.n_windows, cfg.seq_len, cfg.seed)
    blocks = lm.adapter.blocks(lm.model)
    prefix = lm.adapter.blocks_path
    inputs = BlockInputs(lm.model, blocks[0], windows)
    needs = frozenset().union(*(c.needs() for c in cands)) | {"hessian"}
    probe_stage = Recipe.parse(probe).stages[0]
    stages = [(c.to_string(), c.stages[0]) for c in cands]
    ref_logp = tail_logprobs(lm, 0, inputs.hidden[: cfg.kl_windows], inputs.kwargs) if want_gain else None
    bar = tqdm(total=len(blocks), desc="sensitivity", unit="block", disable=not progress)
    for i, block in enumerate(blocks):
        bname = f"{prefix}.{i}"
        todo = {n[len(bname) + 1:]: n for n in table.layers if n.startswith(bname + ".")}
        n_rows = inputs.hidden.shape[0] * inputs.hidden.shape[1]
        stride = -(-n_rows // MAX_INPUT_ROWS) if "inputs" in needs else 0
        col = StatsCollector(block, todo, True, "act_norm" in needs, stride)
        try:
            inputs.run(block)
        finally:
            col.remove()
        for local, full in todo.items():
            lin = block.get_submodule(local)
            w = lin.weight.detach().float()  # (out, in)
            st = col.stats(full)
            h = st["hessian"].float()  # (in, in)
            for name, stage in stages + ([(probe, probe_stage)] if want_gain else []):
                if name in table.err[full]:
                    continue
                packed = _compress(w, stage, st, full, lm, lin)
                if packed is None:
                    continue
                dw = packed.dequantize().float() - w
                table.bits[full][name] = int(packed.nbits())
                table.err[full][name] = float(((dw @ h) * dw).sum())
            if want_gain:
                table.probe_kl[full] = _probe_kl(lm, i, lin, probe_stage, st, inputs, cfg, ref_logp)
                e = table.err[full].get(probe)
                table.gain[full] = table.probe_kl[full] / e if e and e > 0 else 0.0
        inputs.advance(block)
        bar.update(1)
    bar.close()


def _measure_head(lm, names: list[str], probe: str, cfg: SensitivityConfig) -> dict:
    """{"cands": {candidate: [bits, e]}, "gain", "probe_kl"} for the output head: e from the
    final norm's outputs on every window, the probe's KL from the whole model on the first
    `kl_windows` with the head's table replaced (the tied embedding with it)."""
    text, _ = resolve_text(cfg.text_file, Split.CALIBRATION)
    windows = calibration_windows(lm.tokenizer, text, cfg.n_windows, cfg.seq_len, cfg.seed)  # (n, T)
    blocks = lm.adapter.blocks(lm.model)
    head = lm.model.get_submodule(lm.adapter.head_path)
    inputs = BlockInputs(lm.model, blocks[0], windows)
    ref_logp = tail_logprobs(lm, 0, inputs.hidden[: cfg.kl_windows], inputs.kwargs)  # (k·T, V)
    for block in blocks:
        inputs.advance(block)
    name = lm.adapter.head_path
    col = StatsCollector(lm.model, {name: name}, True, True)
    col.remove()  # fed by hand below: the head's (T, V) products are not needed
    with torch.inference_mode():
        for h in inputs.hidden:  # (T, d) each: the last block's outputs
            col.add(name, _final_norm(lm)(h.unsqueeze(0)))
    st = col.stats(name)
    w = head.weight.detach().float()  # (V, d)
    h = st["hessian"].float()  # (d, d)
    out, probe_packed = {}, None
    for cand in names:
        packed = _compress(w, Recipe.parse(cand).stages[0], st, name, lm, head)
        if packed is None:
            continue
        dw = packed.dequantize().float() - w  # (V, d)
        out[cand] = [int(packed.nbits()), float(((dw @ h) * dw).sum())]
        if cand == probe:
            probe_packed = packed
    if probe_packed is None:
        return {"cands": out, "gain": 0.0, "probe_kl": 0.0}
    saved = head.weight.data.clone()
    try:  # a tied embedding shares this storage, so it reads the probe's table too
        head.weight.data.copy_(probe_packed.dequantize().to(saved.dtype))
        probed = BlockInputs(lm.model, blocks[0], windows[: cfg.kl_windows])
        logp = tail_logprobs(lm, 0, probed.hidden, probed.kwargs)
    finally:
        head.weight.data.copy_(saved)
    kl = max(_kl(ref_logp, logp), 0.0)
    e = out[probe][1]
    return {"cands": out, "gain": kl / e if e > 0 else 0.0, "probe_kl": kl}


def _compress(w, stage, st: dict, full: str, lm, lin):
    if stage.spec.check is not None:
        try:
            stage.spec.check(stage.config, tuple(w.shape))
        except SlimlmError:
            return None  # this candidate cannot store this layer
    # fresh copies: a method may damp or reorder its statistics in place
    stats = LayerStats(name=full, dtype=lin.weight.dtype,
                       **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in st.items()})
    return compress_layer(w, [stage], stats)


def _probe_kl(lm, i, lin, stage, st, inputs: BlockInputs, cfg, ref_logp) -> float:
    """KL to the reference with only this layer replaced by the probe's weights."""
    w = lin.weight.detach().float()
    packed = _compress(w, stage, st, "", lm, lin)
    if packed is None:
        return 0.0
    saved = lin.weight.data.clone()
    try:
        lin.weight.data.copy_(packed.dequantize().to(saved.dtype))
        # inputs.hidden are this block's inputs: the blocks before are unchanged
        logp = tail_logprobs(lm, i, inputs.hidden[: cfg.kl_windows], inputs.kwargs)
    finally:
        lin.weight.data.copy_(saved)
    return max(_kl(ref_logp, logp), 0.0)
