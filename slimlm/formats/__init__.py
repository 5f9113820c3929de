"""Packed weight formats, `CompressedLinear`, and save/load of compressed models."""

from slimlm.formats.base import FORMATS, Packed, bits_per_weight, format_class, register_format
from slimlm.formats.dense import Dense
from slimlm.formats.intq import IntQuant
from slimlm.formats.linear import CompressedLinear, replace_linear

__all__ = ["FORMATS", "CompressedLinear", "Dense", "IntQuant", "Packed", "bits_per_weight", "format_class",
           "register_format", "replace_linear"]
