"""slimlm: fit a language model to a device budget.

    import slimlm
    lm = slimlm.load("smollm2-135m")          # or an HF directory, a .gguf file, a slimlm directory
    cm = slimlm.compress(lm, "rtn:bits=4,group=64")
    cm.save("out/w4")
"""

__version__ = "0.1.0"

from slimlm.errors import SlimlmError  # noqa: E402
from slimlm.loading import load  # noqa: E402
from slimlm.models import LoadedModel  # noqa: E402


def compress(model, recipe, **kwargs):
    """Compress a loaded model with a recipe (a `Recipe` or its one-line form); see `slimlm.compress.engine`."""
    from slimlm.compress.engine import compress_model

    return compress_model(model, recipe, **kwargs)


__all__ = ["LoadedModel", "SlimlmError", "compress", "load", "__version__"]
