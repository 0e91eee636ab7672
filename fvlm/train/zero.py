"""Moved to :mod:`fvlm.engine.zero`;
the old name is kept for one release (``import fvlm.train.zero`` gives that module)."""
import sys

from ..engine import zero as _moved

sys.modules[__name__] = _moved
