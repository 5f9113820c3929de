"""Data: text sources, tokenized windows, multiple-choice task files. Never runs a model."""

from slimlm.data.corpus import Document, Split, builtin_documents, corpus_text, read_text_file, resolve_text
from slimlm.data.tasks import MCItem, Task, read_task_file
from slimlm.data.windows import calibration_windows, eval_windows, tokenize_stream

__all__ = [
    "Document",
    "MCItem",
    "Split",
    "Task",
    "builtin_documents",
    "calibration_windows",
    "corpus_text",
    "eval_windows",
    "read_task_file",
    "read_text_file",
    "resolve_text",
    "tokenize_stream",
]
