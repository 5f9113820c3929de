"""Loading llama.cpp (llama-cpp-python) peers for the benchmarks.

On this machine (Sapphire Rapids VM, AMX_INT8 reported) llama.cpp's extra CPU buffer
types (the AMX / repacked weight layouts) crash with a general-protection fault in
libggml-cpu as soon as a batch of more than one token is evaluated; single-token decode
works. `load(path, extra_bufts=False)` turns them off through the model parameters, so
prefill and perplexity runs work; decode-only timings can still be taken with them on.
"""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def _model_params(extra_bufts: bool):
    import llama_cpp
    import llama_cpp.llama as api

    default = llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = extra_bufts
        return p

    api.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        api.llama_cpp.llama_model_default_params = default


def load(path, extra_bufts: bool = False, **kw):
    import llama_cpp

    with _model_params(extra_bufts):
        return llama_cpp.Llama(model_path=str(path), verbose=False, **kw)
