"""GenLLaVA in pure JAX."""

import importlib
from pathlib import Path


def converter(name: str):
    """The converter module `name` (e.g. "clip") for code that loads an original checkpoint: the checkout's
    top-level `convert/` beside this package (a source tree), else the installed `genllava_jax.convert`. A `convert`
    package from anywhere else on the path is never taken (the name is generic)."""
    try:
        module = importlib.import_module(f"convert.{name}")
        if Path(module.__file__).resolve().parents[1] == Path(__file__).resolve().parents[1]:
            return module
    except ImportError:
        pass
    return importlib.import_module(f"genllava_jax.convert.{name}")
