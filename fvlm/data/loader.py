"""Moved to :mod:`fvlm.engine.loader`;
the old name is kept for one release (``import fvlm.data.loader`` gives that module)."""
import sys

from ..engine import loader as _moved

sys.modules[__name__] = _moved
