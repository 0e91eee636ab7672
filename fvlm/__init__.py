"""fvlm: fine-grained vision-language pretraining on 3D CT.

The Python API for trained models (``import fvlm; model = fvlm.load("model.pt")``) is
:func:`fvlm.load` returning a :class:`fvlm.Model` (``embed``, ``predict``, ``similarity``,
``embed_text``); see the README section "Use a trained model from Python". ``import fvlm``
stays light: torch and the model code load on first use of these names.
"""
from .version import __version__

__all__ = ["__version__", "load", "Model", "Embedding", "Prediction"]

_API = {"load", "Model", "Embedding", "Prediction"}


def __getattr__(name):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'fvlm' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | _API)
