"""Moved to :mod:`fvlm.ct.validate`;
the old name is kept for one release (``import fvlm.train.validate`` gives that module)."""
import sys

from ..ct import validate as _moved

sys.modules[__name__] = _moved
