"""Recipes: compression as data.

A recipe is an ordered list of stages; a stage is a registered method, its typed
config, and the layers it applies to (shell-style patterns over full layer names such
as `model.layers.3.mlp.down_proj`; none means every block linear).

The output head (`lm_head`) is compressed only by a stage whose patterns match its name
— `@lm_head`, or `@*`, which matches every layer, head included; a stage without
patterns never touches it. With tied embeddings the input embedding then reads its
rows from the compressed head (see `slimlm.formats.linear.CompressedEmbedding`).

One-line form — stages joined by `+`, options after `:`, layer patterns after `@`:

    rtn:bits=4,group=64
    rtn:bits=3,group=64+rtn:bits=8,group=64@*.down_proj      keep every down_proj at 8 bits
    wanda:sparsity=0.5+gptq:bits=4,group=128
    rtn:bits=3,group=64+rtn:bits=6,group=64@lm_head           the head (and tied embedding) at 6 bits
    none                                                      no compression (the baseline)

Per layer, among the matching stages of the same kind (quantize / prune / transform)
the last one wins, so mixed precision is a later stage with a narrower pattern; stages
of different kinds compose in recipe order. JSON/YAML form:

    {"stages": [{"method": "rtn", "options": {"bits": 3}, "layers": ["*.down_proj"]}]}

`Recipe.parse(r.to_string()) == r` and `Recipe.from_dict(r.to_dict()) == r` for every recipe.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimlm.errors import SlimlmError
from slimlm.methods import MethodSpec, get_method, make_config
from slimlm.methods.registry import config_options


@dataclass(frozen=True)
class Stage:
    method: str
    config: Any
    layers: tuple[str, ...] = ()

    @property
    def spec(self) -> MethodSpec:
        return get_method(self.method)

    def matches(self, name: str, explicit: bool = False) -> bool:
        """Whether this stage applies to layer `name`; a stage without patterns applies to
        every block linear, but not to a layer that only `explicit` patterns may name."""
        if not self.layers:
            return not explicit
        return any(fnmatch.fnmatchcase(name, p) for p in self.layers)

    def to_string(self) -> str:
        opts = ",".join(f"{k}={_fmt(v)}" for k, v in config_options(self.config, shown=True).items())
        s = self.method + (f":{opts}" if opts else "")
        return s + (f"@{'|'.join(self.layers)}" if self.layers else "")

    def to_dict(self) -> dict:
        d: dict = {"method": self.method, "options": config_options(self.config)}
        if self.layers:
            d["layers"] = list(self.layers)
        return d


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return repr(v) if isinstance(v, float) else str(v)


def make_stage(method: str, options: dict, layers=()) -> Stage:
    spec = get_method(method)
    if isinstance(layers, str):
        layers = (layers,)
    layers = tuple(layers)
    for p in layers:
        if not isinstance(p, str) or not p:
            raise SlimlmError(f"layer patterns of stage {method!r} must be non-empty strings, got {p!r}")
    return Stage(method=method, config=make_config(spec, options), layers=layers)


@dataclass(frozen=True)
class Recipe:
    stages: tuple[Stage, ...] = ()

    # ---- the one-line form -------------------------------------------------------------
    @classmethod
    def parse(cls, text: str) -> "Recipe":
        text = text.strip()
        if not text:
            raise SlimlmError("the recipe is empty; write e.g. 'rtn:bits=4,group=64' or 'none'")
        if text == "none":
            return cls(())
        stages = []
        for part in text.split("+"):
            part = part.strip()
            body, _, pats = part.partition("@")
            method, _, opts = body.partition(":")
            method = method.strip()
            if not method:
                raise SlimlmError(f"recipe stage {part!r} names no method")
            options = {}
            for kv in filter(None, (o.strip() for o in opts.split(","))):
                key, eq, value = kv.partition("=")
                if not eq or not key.strip():
                    raise SlimlmError(f"recipe option {kv!r} in stage {part!r} is not key=value")
                options[key.strip()] = value.strip()
            layers = tuple(p.strip() for p in pats.split("|")) if pats else ()
            stages.append(make_stage(method, options, layers))
        return cls(tuple(stages))

    def to_string(self) -> str:
        return "+".join(s.to_string() for s in self.stages) or "none"

    __str__ = to_string

    # ---- JSON / YAML ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data) -> "Recipe":
        stages = data.get("stages") if isinstance(data, dict) else data
        if not isinstance(stages, list):
            raise SlimlmError("a recipe file holds {'stages': [...]} or a list of stages")
        out = []
        for i, st in enumerate(stages):
            if not isinstance(st, dict) or "method" not in st:
                raise SlimlmError(f"recipe stage {i} must be an object with a 'method'")
            extra = set(st) - {"method", "options", "layers"}
            if extra:
                raise SlimlmError(f"recipe stage {i} has unknown keys {sorted(extra)} (allowed: method, options, layers)")
            options = st.get("options") or {}
            if not isinstance(options, dict):
                raise SlimlmError(f"recipe stage {i}: 'options' must be an object")
            out.append(make_stage(st["method"], options, st.get("layers") or ()))
        return cls(tuple(out))

    @classmethod
    def load(cls, spec: str) -> "Recipe":
        """A recipe from its one-line form or from a .json/.yaml/.yml file path."""
        p = Path(spec)
        if p.suffix.lower() in (".json", ".yaml", ".yml"):
            if not p.is_file():
                raise SlimlmError(f"recipe file {spec}: no such file")
            text = p.read_text()
            try:
                if p.suffix.lower() == ".json":
                    data = json.loads(text)
                else:
                    import yaml

                    data = yaml.safe_load(text)
            except Exception as e:
                raise SlimlmError(f"recipe file {spec} could not be parsed: {e}") from None
            return cls.from_dict(data)
        return cls.parse(spec)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ---- which stages apply to which layer -------------------------------------------------
    def stages_for(self, name: str, explicit: bool = False) -> list[Stage]:
        """The stages applied to layer `name`, in order: per kind, the last matching stage wins.
        `explicit`: only stages whose patterns match `name` count (the output head)."""
        chosen: dict = {}
        for i, st in enumerate(self.stages):
            if st.matches(name, explicit):
                chosen[st.spec.kind] = (i, st)
        return [st for _, st in sorted(chosen.values(), key=lambda t: t[0])]

    def needs(self) -> frozenset:
        out = frozenset()
        for st in self.stages:
            out |= st.spec.needs
        return out
