"""One evaluation of a model: text quality (and KL / top-1 against a reference), task
accuracy, size. `EvalConfig` is what `slimlm eval` flags map onto."""

from __future__ import annotations

from dataclasses import dataclass, field

from slimlm.data import Split, eval_windows, read_task_file, resolve_text
from slimlm.errors import SlimlmError
from slimlm.eval.quality import check_reference_tokenizer, evaluate_windows
from slimlm.eval.size import size_report
from slimlm.eval.tasks import evaluate_task

DEFAULT_MAX_TOKENS = 16384  # ~1 minute on 2 cores for the embedded model with a reference


@dataclass(frozen=True)
class EvalConfig:
    text_file: str | None = None  # None: the built-in evaluation split
    seq_len: int = 512
    max_tokens: int | None = DEFAULT_MAX_TOKENS  # None: the whole text
    tasks: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.seq_len < 2:
            raise SlimlmError(f"window length must be at least 2 tokens, got {self.seq_len}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise SlimlmError(f"--max-tokens must be at least 2, got {self.max_tokens}")


def evaluate(lm, cfg: EvalConfig = EvalConfig(), reference=None, path=None, progress: bool = True) -> dict:
    """Evaluate `lm` (and compare it to `reference`, a LoadedModel, when given)."""
    tasks = [read_task_file(t) for t in cfg.tasks]  # read first: a bad file fails before any compute
    if reference is not None:
        check_reference_tokenizer(lm.tokenizer, reference.tokenizer, reference.source)
    text, desc = resolve_text(cfg.text_file, Split.EVALUATION)
    windows = eval_windows(lm.tokenizer, text, cfg.seq_len, cfg.max_tokens)
    result = {"model": lm.source, "text": desc, "seq_len": cfg.seq_len}
    if reference is not None:
        result["reference"] = reference.source
    result.update(evaluate_windows(lm.model, windows, reference.model if reference is not None else None, progress))
    result.update(size_report(lm, path))
    result["tasks"] = {t.name: evaluate_task(lm.model, lm.tokenizer, t, progress) for t in tasks}
    return result
