"""Generation: the lean Llama-family runtime (KV cache, C kernels), sampling, streaming,
multi-turn chat with cache reuse, and self-speculative decoding."""

from slimlm.runtime.generate import Chat, GenerationConfig, generate, generate_ids
from slimlm.runtime.lean import LeanModel, RuntimeConfig
from slimlm.runtime.speculative import SpecStats, draft_model, speculative_ids, speculative_pair

__all__ = ["Chat", "GenerationConfig", "LeanModel", "RuntimeConfig", "SpecStats", "draft_model", "generate",
           "generate_ids", "speculative_ids", "speculative_pair"]
