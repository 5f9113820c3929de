"""Text sources: the built-in corpus and user text files.

The built-in corpus is the Python reference documentation that ships with every
CPython (`pydoc_data.topics`, 79 topics, ~465 kB, ~113 k SmolLM2 tokens). Topics
repeat each other's paragraphs (the "assignment" topic contains the whole
"augmented assignment" text, for one), so splitting topics alone would leak
evaluation text into calibration. Topics that share any paragraph of 80 characters or
more are joined into one group; groups are ordered by a hash of their topic keys and
taken into the evaluation part while it stays within a quarter of the corpus; the
rest is calibration. The split is deterministic and the parts share no paragraph.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from slimlm.errors import SlimlmError

EVAL_SHARE = 0.25  # at most this share of the corpus (in characters) is held out for evaluation
MIN_SHARED = 80  # paragraphs at least this long tie their topics to the same side of the split


class Split(str, Enum):
    CALIBRATION = "calibration"
    EVALUATION = "evaluation"
    ALL = "all"


@dataclass(frozen=True)
class Document:
    key: str
    text: str


def paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= MIN_SHARED]


@functools.lru_cache(maxsize=1)
def _evaluation_keys() -> frozenset:
    from pydoc_data.topics import topics

    keys = sorted(k for k in topics if topics[k].strip())
    parent = {k: k for k in keys}

    def root(k):
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    first_seen = {}
    for k in keys:  # union topics that share a paragraph
        for p in paragraphs(topics[k]):
            if p in first_seen:
                parent[root(k)] = root(first_seen[p])
            else:
                first_seen[p] = k
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(root(k), []).append(k)
    order = sorted(groups.values(), key=lambda g: hashlib.sha256("|".join(g).encode()).hexdigest())
    budget = EVAL_SHARE * sum(len(topics[k]) for k in keys)
    chosen, size = set(), 0
    for g in order:
        n = sum(len(topics[k]) for k in g)
        if size + n <= budget:
            chosen.update(g)
            size += n
    return frozenset(chosen)


def builtin_documents(split: Split | str = Split.ALL) -> list[Document]:
    """Documents of the built-in corpus, sorted by topic key, optionally one split only."""
    from pydoc_data.topics import topics

    split = Split(split)
    docs = [Document(k, topics[k]) for k in sorted(topics) if topics[k].strip()]
    if split is Split.ALL:
        return docs
    ev = _evaluation_keys()
    return [d for d in docs if (d.key in ev) == (split is Split.EVALUATION)]


def read_text_file(path: str | Path) -> str:
    """A user's text file, UTF-8; refused with one sentence if missing, undecodable or empty."""
    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"text file {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SlimlmError(f"text file {path} is not UTF-8 text (byte {e.start}); convert it first") from None
    if not text.strip():
        raise SlimlmError(f"text file {path} is empty")
    return text


def corpus_text(split: Split | str) -> str:
    """The built-in corpus split as one text, documents joined by blank lines."""
    return "\n\n".join(d.text for d in builtin_documents(split))


def resolve_text(text_file: str | Path | None, split: Split | str) -> tuple[str, str]:
    """(text, description): a user file when given, else the built-in corpus split."""
    if text_file is not None:
        return read_text_file(text_file), str(text_file)
    split = Split(split)
    return corpus_text(split), f"builtin:{split.value}"
