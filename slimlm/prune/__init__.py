"""Structured pruning: smaller dense models (fewer FFN channels, heads, blocks) that plain transformers loads."""

from slimlm.prune.structured import (PrunePlan, Shape, StructuredConfig, apply_plan, make_plan, prune_structured,
                                    save_pruned)

__all__ = ["PrunePlan", "Shape", "StructuredConfig", "apply_plan", "make_plan", "prune_structured", "save_pruned"]
