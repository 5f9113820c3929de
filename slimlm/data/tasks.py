"""Multiple-choice task files: JSON lines of {"context": str, "choices": [str, ...], "gold": int}.

Scored as lm-evaluation-harness scores multiple choice: each choice is the
continuation `" " + choice` of the context; `acc` picks the choice with the highest
summed log-probability, `acc_norm` the highest log-probability per character of the
choice.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from slimlm.errors import SlimlmError


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]
    gold: int


@dataclass(frozen=True)
class Task:
    name: str
    items: tuple[MCItem, ...]


def read_task_file(path: str | Path) -> Task:
    """A task file; every malformed line is refused with its line number."""
    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"task file {path}: no such file")
    items = []
    for lineno, line in enumerate(p.read_text(encoding="utf-8", errors="strict").splitlines(), 1):
        if not line.strip():
            continue
        where = f"task file {path}, line {lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise SlimlmError(f"{where} is not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise SlimlmError(f"{where} is not a JSON object")
        ctx, choices, gold = obj.get("context"), obj.get("choices"), obj.get("gold")
        if not isinstance(ctx, str):
            raise SlimlmError(f"{where} needs a string 'context'")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise SlimlmError(f"{where} needs 'choices': a list of at least two non-empty strings")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
            raise SlimlmError(f"{where} needs 'gold': an index into 'choices' (0..{len(choices) - 1})")
        items.append(MCItem(ctx, tuple(choices), gold))
    if not items:
        raise SlimlmError(f"task file {path} holds no items")
    return Task(name=p.stem, items=tuple(items))
