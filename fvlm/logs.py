"""Logging: every long job logs to a file next to its outputs and to stderr."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

_FMT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(out_dir: str | Path | None = None, name: str = "fvlm", quiet: bool = False,
                  hold: bool = False) -> logging.Logger:
    """Configure the ``fvlm`` logger: stderr (WARNING if quiet, else INFO) and ``out_dir/<name>.log``.

    The file also keeps DEBUG records (e.g. one line per preprocessed case) that would
    only clutter the terminal next to a progress bar.

    ``hold``: also keep every record until the next call, which writes them to its log file (a
    command that must not touch its output directory before its inputs are checked calls
    ``setup_logging(None, hold=True)`` first and ``setup_logging(out_dir)`` once they are).
    """
    log = logging.getLogger("fvlm")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    held: list[logging.LogRecord] = []
    for h in list(log.handlers):
        if isinstance(h, HeldRecords):
            held += h.records
        log.removeHandler(h)
        h.close()
    sh = logging.StreamHandler(sys.stderr)
    sh.setLevel(logging.WARNING if quiet else logging.INFO)
    sh.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(sh)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(out_dir) / f"{name}.log")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter(_FMT))
        log.addHandler(fh)
        for r in held:
            fh.handle(r)
    if hold:
        log.addHandler(HeldRecords())
    return log


class HeldRecords(logging.Handler):
    """Keeps log records for the next :func:`setup_logging` call (see its ``hold``)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"fvlm.{name}" if not name.startswith("fvlm") else name)
