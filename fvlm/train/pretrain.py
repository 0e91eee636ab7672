"""Moved to :mod:`fvlm.ct.pretrain`;
the old name is kept for one release (``import fvlm.train.pretrain`` gives that module)."""
import sys

from ..ct import pretrain as _moved

sys.modules[__name__] = _moved
