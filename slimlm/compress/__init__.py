"""Recipes and the sequential block-by-block compression engine."""

from slimlm.compress.engine import CalibrationConfig, compress_model, plan_layers
from slimlm.compress.recipe import Recipe, Stage

__all__ = ["CalibrationConfig", "Recipe", "Stage", "compress_model", "plan_layers"]
