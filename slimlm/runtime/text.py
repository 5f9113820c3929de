"""Streaming decoded text, shared by the torch runtime (generate.py) and the torch-free one (native.py)."""

from __future__ import annotations

from typing import Callable, Iterator


def stream_text(tokenizer, ids: Iterator[int], stop: tuple[str, ...], on_text: Callable[[str], None] | None) -> str:
    """Decode `ids` as they come, hand each new piece of text to `on_text`, cut at the first stop string."""
    out_ids: list[int] = []
    text = ""
    for t in ids:
        out_ids.append(t)
        new_text = tokenizer.decode(out_ids, skip_special_tokens=True)
        piece, text = new_text[len(text):], new_text
        hit = next((s for s in stop if s in text), None)
        if hit is not None:
            cut = text.index(hit)
            if on_text and cut > len(text) - len(piece):
                on_text(text[len(text) - len(piece):cut])
            return text[:cut]
        if on_text and piece:
            on_text(piece)
    return text
