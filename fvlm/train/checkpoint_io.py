"""Moved to :mod:`fvlm.engine.checkpoint_io`;
the old name is kept for one release (``import fvlm.train.checkpoint_io`` gives that module)."""
import sys

from ..engine import checkpoint_io as _moved

sys.modules[__name__] = _moved
