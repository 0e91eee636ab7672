"""Resume by case id: which cases of a part are final, which are (re)processed, which are stale.

A part's plan (``.state/plan[-III-of-NNN].json``) lists its shard slots and, per slot, the
case ids planned into it with a fingerprint of their inputs. It is written before any
case is processed, so an interrupted run resumes the same plan and writes the same
bytes. A re-run with another manifest keeps every slot it can:

- a case of a finished shard whose inputs are unchanged is reused, wherever its row now
  sits in the manifest (reordering changes nothing);
- a case whose inputs changed (paths, report text, rescale/spacing, or the size or
  mtime of its image/mask files) is processed again into a new shard; its old row is
  left in the old shard but no longer indexed;
- a case no longer in the manifest is *stale*: reported, and no longer indexed;
- a new case goes into a new shard after the highest slot number used so far.

Unfinished slots keep their planned cases minus removed ones; a changed case there is
simply processed again in place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from fvlm.errors import FvlmError

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "Slot", "Resume", "fingerprint", "plan_part", "write_plan"]

PLAN_FORMAT = "fvlm-preprocess-plan"
PLAN_VERSION = 1
_DIR_FILES_MAX = 5000  # a DICOM folder's fingerprint lists at most this many files


@dataclass
class Slot:
    """One shard of a part: ``rel`` (path under the output), the live cases ``[(case_id, fingerprint)]``,
    and ``dropped``: ids whose rows the shard still holds but that are no longer indexed."""

    rel: str
    cases: list = field(default_factory=list)
    dropped: list = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [c for c, _ in self.cases]


@dataclass
class Resume:
    slots: list            # [Slot] in shard order
    stale: list            # ids in finished shards that the manifest no longer lists
    changed: list          # ids in finished shards whose inputs changed (processed again)


def _stat(p: str | None):
    if not p:
        return None
    path = Path(p)
    try:
        if path.is_dir():
            files = sorted(x for x in path.rglob("*") if x.is_file())[:_DIR_FILES_MAX]
            return [[str(x.relative_to(path)), x.stat().st_size, x.stat().st_mtime_ns] for x in files]
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]
    except OSError:
        return "missing"


def fingerprint(spec) -> str:
    """A short hash of everything that determines a case's output: its manifest fields and input files' stats."""
    d = dataclasses.asdict(spec)
    d.pop("raw_id", None)
    files = {k: _stat(d.get(k)) for k in ("image", "mask", "mask_dir")}
    blob = json.dumps([d, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _slot_number(rel: str) -> int:
    return int(Path(rel).stem.rsplit("-", 1)[1])


def _read_plan(path: Path) -> list[Slot] | None:
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        if doc.get("format") != PLAN_FORMAT or doc.get("version") != PLAN_VERSION:
            raise ValueError(f"not a {PLAN_FORMAT} v{PLAN_VERSION} file")
        return [Slot(s["rel"], [tuple(c) for c in s["cases"]], list(s.get("dropped", []))) for s in doc["slots"]]
    except (ValueError, KeyError, TypeError) as e:
        raise FvlmError(f"{path}: unreadable resume plan ({e}); move it away to rebuild it from the shards") from None


def write_plan(path: Path, slots: Iterable[Slot]) -> None:
    head = json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION})[:-1]
    lines = [json.dumps({"rel": s.rel, "cases": [list(c) for c in s.cases], "dropped": s.dropped}, ensure_ascii=False)
             for s in slots]  # one slot a line: readable, and diffs between runs stay small
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(head + ', "slots": [\n' + ",\n".join(lines) + "\n]}\n", encoding="utf-8")
    os.replace(tmp, path)


def plan_part(out: Path, plan_path: Path, specs: list, prefix: str, per_shard: int,
              shard_ids: Callable[[Path], list[str]], discard: Callable[[str], None]) -> Resume:
    """The slots of this part for ``specs`` (this part's cases, in manifest order).

    ``prefix`` is the shard path prefix of the part (``shards/000-``); ``shard_ids(path)``
    reads the case ids a finished shard holds (used when no plan exists yet, e.g. an output
    written by an older fvlm); ``discard(case_id)`` removes a case's staged result.
    """
    want = {s.case_id: fingerprint(s) for s in specs}
    old = _read_plan(plan_path)
    if old is None:  # rebuild from finished shards; their inputs' fingerprints are unknown (None)
        old = [Slot(str(p.relative_to(out)), [(c, None) for c in shard_ids(p)])
               for p in sorted(out.glob(prefix + "*.h5"))]
    slots, placed, stale, changed = [], set(), [], []
    for sl in old:
        final = (out / sl.rel).exists()
        keep, dropped = [], list(sl.dropped)
        for cid, fp in sl.cases:
            if cid in placed:  # listed twice (should not happen): the first slot wins
                continue
            if cid not in want:
                if final:
                    stale.append(cid)
                    dropped.append(cid)
                else:
                    discard(cid)
                continue
            if fp is not None and fp != want[cid]:
                if final:
                    changed.append(cid)
                    dropped.append(cid)
                    continue
                discard(cid)  # processed again in place
            keep.append((cid, want[cid]))
            placed.add(cid)
        if final or keep:
            slots.append(Slot(sl.rel, keep, dropped))
    used = [_slot_number(s.rel) for s in slots] + [_slot_number(str(p)) for p in out.glob(prefix + "*.h5")]
    nxt = max(used) + 1 if used else 0
    rest = [(c, fp) for c, fp in want.items() if c not in placed]
    for k, s in enumerate(range(0, len(rest), per_shard)):
        slots.append(Slot(f"{prefix}{nxt + k:05d}.h5", rest[s:s + per_shard]))
    return Resume(slots=slots, stale=stale, changed=changed)
