"""Per-case failures: recorded in ``errors.jsonl`` while the job goes on."""
from __future__ import annotations

__all__ = ["CaseError", "STAGES"]

#: the stages a case can fail in (FORMATS.md §2, errors.jsonl)
STAGES = ("input", "load", "hu", "geometry", "mask", "crop", "report", "write", "internal")


class CaseError(Exception):
    """One case cannot be processed; ``stage`` is one of :data:`STAGES`, ``reason`` says why."""

    def __init__(self, stage: str, reason: str):
        assert stage in STAGES, stage
        super().__init__(f"[{stage}] {reason}")
        self.stage = stage
        self.reason = reason
