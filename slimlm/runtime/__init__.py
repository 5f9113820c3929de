"""Generation: KV-cached decoding, sampling, streaming."""

from slimlm.runtime.generate import GenerationConfig, generate, generate_ids

__all__ = ["GenerationConfig", "generate", "generate_ids"]
