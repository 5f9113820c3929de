"""Text sources: the built-in corpus and user text files.

The built-in corpus is the Python reference documentation that ships with every
CPython (`pydoc_data.topics`, 79 topics, ~465 kB, ~113 k SmolLM2 tokens). It is split
into a calibration part and an evaluation part by a hash of each document's *text*,
so the split is deterministic, identical texts always fall on the same side, and the
two parts never share a document. About a quarter of the documents are evaluation.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from slimlm.errors import SlimlmError

EVAL_PERCENT = 25  # share of documents (by hash bucket) held out for evaluation


class Split(str, Enum):
    CALIBRATION = "calibration"
    EVALUATION = "evaluation"
    ALL = "all"


@dataclass(frozen=True)
class Document:
    key: str
    text: str

    @property
    def bucket(self) -> int:
        return int.from_bytes(hashlib.sha256(self.text.encode()).digest()[:4], "little") % 100


def builtin_documents(split: Split | str = Split.ALL) -> list[Document]:
    """Documents of the built-in corpus, sorted by topic key, optionally one split only."""
    from pydoc_data.topics import topics

    split = Split(split)
    docs = [Document(k, topics[k]) for k in sorted(topics) if topics[k].strip()]
    if split is Split.EVALUATION:
        return [d for d in docs if d.bucket < EVAL_PERCENT]
    if split is Split.CALIBRATION:
        return [d for d in docs if d.bucket >= EVAL_PERCENT]
    return docs


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
