"""Reading ``.pt`` files without unpickling code: ``torch.load(weights_only=True)`` with one-line errors.

The one reader of torch files (checkpoints, encoder weights, dense checkpoints); torch is imported
when a file is read, so importing this module stays cheap.
"""
from __future__ import annotations

import os
import re

from .errors import FormatError, FvlmError


def refused_pickle(what: str) -> str:
    """The one-line reason for a file that holds pickled objects ``what`` besides tensors."""
    return (f"it holds pickled code or objects ({what}), not only tensors; fvlm never runs pickled code "
            "(torch.load weights_only=True)")


def torch_load_error(e: BaseException) -> str:
    """One line saying why ``torch.load(weights_only=True)`` refused a file.

    torch's own message for a refused pickle spans many lines and advises ``weights_only=False``
    (running the file's code); this keeps only the object that was refused.
    """
    text = str(e).strip()
    m = re.search(r"Unsupported global: GLOBAL (\S+)", text) or re.search(r"Unsupported operand \S+", text)
    if "Weights only load failed" in text or m:
        return refused_pickle(m.group(1) if m and m.groups() else (m.group(0) if m else "a non-tensor object"))
    lines = text.splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else f"{type(e).__name__} (empty or truncated file?)"


def read_torch_file(path, what: str, map_location="cpu", safe_globals=()):
    """``torch.load(path, weights_only=True)`` (on CPU unless ``map_location``), with one-line errors
    naming ``what``: :class:`FvlmError` "<what> not found: <path>" or :class:`FormatError` "cannot
    read <what> <path>: ..." (pickle errors, truncated or empty files, non-tensor objects).
    ``safe_globals``: classes allowed besides tensors and plain containers."""
    if not os.path.isfile(path):
        raise FvlmError(f"{what} not found: {path}")
    if os.path.getsize(path) == 0:
        raise FormatError(f"cannot read {what} {path}: empty file (0 bytes)")
    import torch

    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling problem is a format problem here
        raise FormatError(f"cannot read {what} {path}: {torch_load_error(e)}") from None
