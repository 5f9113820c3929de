"""Preset recipes derived from the method registry, so every method appears in a sweep.

A method module may list its own presets as a module-level `PRESETS` tuple of
one-line recipes; otherwise presets are derived from its config and kind:

    quantize   one recipe per bit width in BITS (when its config has `bits`), else its defaults
    prune      the method at its defaults, then RTN at 4 and 8 bits packing what is kept
    transform  the method, then RTN at 3 and 4 bits
    encode     RTN at 3, 4 and 8 bits, then the method coding the integer codes

Every preset is parsed (and so validated) before it is offered; one the method's config
refuses is dropped, never guessed at. Nothing here names a method except RTN, the
quantizer every other kind composes with — so methods added later appear unchanged.
"""

from __future__ import annotations

import dataclasses
import sys

from slimlm.compress.recipe import Recipe
from slimlm.errors import SlimlmError
from slimlm.methods import Kind, MethodSpec, load_all

BITS = (2, 3, 4, 8)  # the default sweep's bit widths for every quantizer
FIT_BITS = (2, 3, 4, 5, 6, 8)  # candidate widths per layer for `fit`
FIT_GROUPS = (32, 64)  # candidate group sizes for quantizers with a `group` option
BASE = "rtn"  # the calibration-free quantizer other kinds are paired with
HEAD_BITS = (4, 5, 6, 8)  # candidate widths for the output head (and a tied embedding that reads it)
HEAD_PROBE = f"{BASE}:bits=4,group=64"  # the head's coarsest candidate sets its gain
KEEP_DENSE = "dense"  # the head's one non-recipe option: left as it is


def _fields(spec: MethodSpec) -> set[str]:
    return {f.name for f in dataclasses.fields(spec.config_cls)}


def _valid(recipe: str) -> bool:
    try:
        Recipe.parse(recipe)
    except SlimlmError:
        return False
    return True


def _declared(spec: MethodSpec) -> tuple[str, ...] | None:
    """The module's own `PRESETS`, if it declares them."""
    presets = getattr(sys.modules.get(spec.fn.__module__), "PRESETS", None)
    return tuple(presets) if presets else None


def method_presets(spec: MethodSpec, bits=BITS) -> list[str]:
    """Preset one-line recipes for one registered method (valid ones only)."""
    declared = _declared(spec)
    if declared is not None:
        return [r for r in declared if _valid(r)]
    name = spec.name
    if spec.kind is Kind.QUANTIZE:
        out = [f"{name}:bits={b}" for b in bits] if "bits" in _fields(spec) else [name]
    elif spec.kind is Kind.PRUNE:
        out = [f"{name}+{BASE}:bits={b}" for b in (4, 8)]
    elif spec.kind is Kind.TRANSFORM:
        out = [f"{name}+{BASE}:bits={b}" for b in (3, 4)]
    else:  # ENCODE: codes the integer codes of the stage before
        out = [f"{BASE}:bits={b}+{name}" for b in (3, 4, 8)]
    return [Recipe.parse(r).to_string() for r in out if _valid(r)]


def default_presets(bits=BITS) -> list[str]:
    """Every registered method's presets, RTN first, then methods by name: the default sweep."""
    methods = load_all()
    order = sorted(methods, key=lambda n: (n != BASE, n))
    out: list[str] = []
    for name in order:
        for r in method_presets(methods[name], bits):
            if r not in out:
                out.append(r)
    return out


def demo_presets() -> list[str]:
    """A short list for `slimlm demo`: RTN at 8, 4, 3 and 2 bits, then one preset per other
    method (its 3-bit one when it has bit widths — the width where methods differ most)."""
    methods = load_all()
    out = [Recipe.parse(f"{BASE}:bits={b}").to_string() for b in (8, 4, 3, 2)]
    for name in sorted(n for n in methods if n != BASE):
        presets = method_presets(methods[name], bits=(3,))
        if presets and presets[0] not in out:
            out.append(presets[0])
    return out


def fit_candidates(methods: tuple[str, ...] | None = None) -> list[str]:
    """Single-stage quantize recipes `fit` may choose per layer: each quantizer (or those
    named in `methods`) at FIT_BITS, with FIT_GROUPS when it has a `group` option.
    Quantizers that need sampled layer inputs are left out unless named (they cost memory
    for every layer at once)."""
    registry = load_all()
    names = methods if methods else sorted(n for n, s in registry.items()
                                           if s.kind is Kind.QUANTIZE and "inputs" not in s.needs)
    out = []
    for name in names:
        if name not in registry:
            raise SlimlmError(f"unknown method {name!r} for fit candidates; known methods: {', '.join(sorted(registry))}")
        spec = registry[name]
        if spec.kind is not Kind.QUANTIZE:
            raise SlimlmError(f"method {name!r} is a {spec.kind.value} method; fit chooses among quantize methods")
        fields = _fields(spec)
        if "bits" not in fields:
            continue
        groups = [f",group={g}" for g in FIT_GROUPS] if "group" in fields else [""]
        for b in FIT_BITS:
            for g in groups:
                r = f"{name}:bits={b}{g}"
                if _valid(r):
                    out.append(Recipe.parse(r).to_string())
    if not out:
        raise SlimlmError("no fit candidates: none of the chosen methods has a 'bits' option")
    return out


def fit_head_candidates() -> list[str]:
    """One-stage recipes `fit` may give the output head: data-free RTN at HEAD_BITS with
    FIT_GROUPS (KEEP_DENSE, leaving it as it is, is always an option besides these)."""
    return [Recipe.parse(f"{BASE}:bits={b},group={g}").to_string() for b in HEAD_BITS for g in FIT_GROUPS]
