import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny():
    """A fresh tiny random Llama model with its tokenizer."""
    from slimlm.models.tiny import tiny_model

    return tiny_model("llama", seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny Llama saved as an HF directory (config.json, model.safetensors, tokenizer)."""
    from slimlm.models import save_hf_dir
    from slimlm.models.tiny import tiny_model

    lm = tiny_model("llama", seed=0)
    d = tmp_path_factory.mktemp("tiny_hf")
    save_hf_dir(lm.model, lm.tokenizer, d)
    return d


@pytest.fixture(scope="session")
def real():
    """The embedded SmolLM2-135M (slow: only for tests marked slow)."""
    import slimlm

    return slimlm.load("smollm2-135m")


def run_cli(*argv):
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    import contextlib
    import io

    from slimlm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            code = e.code
    return code, out.getvalue(), err.getvalue()
