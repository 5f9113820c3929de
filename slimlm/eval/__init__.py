"""Evaluation: quality (perplexity, KL, top-1, task accuracy) and efficiency (size, speed, memory)."""

from slimlm.eval.quality import check_reference_tokenizer, evaluate_windows, same_tokenizer
from slimlm.eval.size import dir_bytes, size_report
from slimlm.eval.speed import bench_model, peak_rss_bytes
from slimlm.eval.tasks import evaluate_task

__all__ = ["bench_model", "check_reference_tokenizer", "dir_bytes", "evaluate_task", "evaluate_windows",
           "peak_rss_bytes", "same_tokenizer", "size_report"]
