"""The method registry: a dict and a decorator.

A method is a frozen config dataclass plus one function registered by name:

    @register("rtn", RTNConfig)
    def rtn(weight, stats, config) -> Packed: ...

`weight` is the (out, in) float32 matrix to compress; `stats` carries the calibration
statistics the method declared in `needs` ("hessian", "act_norm", "inputs"), the
source dtype of the weight, and the packed result of an earlier stage on the same
layer (`stats.prev`), if any; the return value is a packed format.
`check(config, shape)` may refuse a layer before any work starts.

Composition (see `slimlm.compress.engine.compress_layer`): stages run in recipe order,
each on the weight the stage before left (its dequantized result). An ENCODE stage
wraps `stats.prev` itself (e.g. entropy coding of integer codes). For other stages,
when the previous result has a method `absorb(packed) -> Packed` (e.g. a sparse
format taking the quantized values of its kept weights), the engine keeps
`prev.absorb(new)`; otherwise the new result replaces the old.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

from slimlm.errors import SlimlmError

NEEDS = frozenset({"hessian", "act_norm", "inputs"})


class Kind(str, Enum):
    QUANTIZE = "quantize"  # produces the stored format of a layer
    PRUNE = "prune"  # removes weights; a later quantize stage packs what is kept
    TRANSFORM = "transform"  # changes the weights (e.g. scaling) before quantization
    ENCODE = "encode"  # codes the packed result of the stage before losslessly (stats.prev)


@dataclass
class LayerStats:
    """What the engine hands a method for one layer.

    hessian:  (in, in) float64, mean of x xᵀ over calibration tokens (H = XᵀX / n)
    act_norm: (in,) float64, mean of x² per input channel
    inputs:   (rows, in) float32, an evenly strided sample of at most 8192 input rows
    """

    name: str
    hessian: torch.Tensor | None = None
    act_norm: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    n_tokens: int = 0
    prev: typing.Any = None  # the Packed result of an earlier stage on this layer
    dtype: torch.dtype = torch.float32  # the layer's weight dtype in the source model
    seed: int = 0


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable
    config_cls: type
    needs: frozenset = frozenset()
    kind: Kind = Kind.QUANTIZE
    check: Callable | None = None
    doc: str = field(default="", compare=False)


METHODS: dict[str, MethodSpec] = {}


def register(name: str, config_cls: type, needs=(), kind: Kind = Kind.QUANTIZE, check: Callable | None = None):
    """Decorator registering `fn(weight, stats, config) -> Packed` under `name`."""
    needs = frozenset(needs)
    if needs - NEEDS:
        raise ValueError(f"method {name!r} needs unknown statistics {sorted(needs - NEEDS)}")
    if not (dataclasses.is_dataclass(config_cls) and config_cls.__dataclass_params__.frozen):
        raise TypeError(f"method {name!r}: config must be a frozen dataclass")

    def deco(fn):
        if name in METHODS:
            raise ValueError(f"method {name!r} registered twice")
        METHODS[name] = MethodSpec(name, fn, config_cls, needs, Kind(kind), check, (fn.__doc__ or "").strip())
        return fn

    return deco


def get_method(name: str) -> MethodSpec:
    from slimlm.methods import load_all

    load_all()
    if name not in METHODS:
        raise SlimlmError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


# ---- options: one-line `key=value` strings <-> typed config fields ----------------------------


def _convert(value, typ, method: str, key: str):
    origin = typing.get_origin(typ)
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        typ = args[0]
    try:
        if isinstance(typ, type) and issubclass(typ, Enum):
            return typ(value)
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return str(value)
    except ValueError:
        pass
    else:
        return value
    raise SlimlmError(f"option {key}={value!r} of method {method!r} is not a valid {getattr(typ, '__name__', typ)}")


def make_config(spec: MethodSpec, options: dict):
    """A validated config for `spec` from user options (strings or JSON values)."""
    hints = typing.get_type_hints(spec.config_cls)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise SlimlmError(
            f"unknown option {unknown[0]!r} for method {spec.name!r}; valid options: {', '.join(sorted(fields)) or 'none'}"
        )
    aliases = getattr(spec.config_cls, "ALIASES", {})  # e.g. {"group": {"channel": 0}}
    options = {k: aliases.get(k, {}).get(v, v) if isinstance(v, str) else v for k, v in options.items()}
    kwargs = {k: _convert(v, hints[k], spec.name, k) for k, v in options.items()}
    try:
        return spec.config_cls(**kwargs)
    except SlimlmError as e:
        raise SlimlmError(f"method {spec.name!r}: {e}") from None


def config_options(config, shown: bool = False) -> dict:
    """The options of a config that differ from their defaults, as JSON values, in field order;
    with `shown`, also the config's `SHOWN` options (e.g. bits), for a readable one-line form."""
    out = {}
    always = getattr(config, "SHOWN", ()) if shown else ()
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        if f.name in always:
            out[f.name] = v.value if isinstance(v, Enum) else v
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
        if v != default:
            out[f.name] = v.value if isinstance(v, Enum) else v
    return out
