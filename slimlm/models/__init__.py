"""Models: loading sources, the architecture adapter, tiny random models for tests."""

from slimlm.models.adapter import SUPPORTED, Adapter, adapter_for
from slimlm.models.loaded import LoadedModel
from slimlm.models.sources import BUILTIN, builtin_path, load_source, save_hf_dir


__all__ = ["BUILTIN", "SUPPORTED", "Adapter", "LoadedModel", "adapter_for", "builtin_path", "load_source", "save_hf_dir"]
