"""Training shards written by ``fvlm preprocess``: HDF5 files + a JSONL index (FORMATS.md §2).

Reading::

    ds = ShardDataset("out/")                  # a directory written by `fvlm preprocess`
    ds.anatomies                               # anatomy ids, label-map order (label i + 1)
    rec = ds.get("case_0001", anatomies=["lung"], volume=False)
    x = window(rec.crops["lung"])              # int16 HU -> float32 in [0, 1]

Writing (used by preprocess; tests build small shards with it too)::

    layout = ShardLayout(anatomies=["lung", "liver"], whole_shape=(96, 96, 48),
                         crop_shapes={"lung": (48, 48, 32), "liver": (32, 32, 16)})
    write_shard(path, layout, records, n=len(records))   # atomic: <path>.tmp, then rename
    write_index(root, rows); write_dataset_info(root, layout, extra)

A shard stacks cases along axis 0, one HDF5 chunk per case and array, so reading
one crop decompresses exactly one chunk. Absent anatomies are never written (their
chunks stay unallocated and read back as the fill value).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import FormatError, FvlmError

__all__ = ["ShardDataset", "CaseRecord", "ShardLayout", "window", "write_shard", "concat_shards", "write_index",
           "read_index", "write_dataset_info", "read_dataset_info", "SHARD_FORMAT", "DATASET_FORMAT",
           "SCHEMA_VERSION", "INDEX_NAME", "DATASET_INFO_NAME", "AIR_HU"]

SHARD_FORMAT = "fvlm-shard"
DATASET_FORMAT = "fvlm-shards"
SCHEMA_VERSION = 1
INDEX_NAME = "index.jsonl"
DATASET_INFO_NAME = "dataset.json"
#: padding value of image crops and volumes outside the scanned field of view (HU)
AIR_HU = -1024


def window(hu, lo: float = -1150.0, hi: float = 350.0):
    """Map HU to ``[0, 1]``: ``clip((hu - lo) / (hi - lo), 0, 1)``.

    Works on numpy arrays (returns float32) and torch tensors (returns float32 tensor);
    shape is preserved. fVLM's CT-RATE window is the default ``[-1150, 350]``.
    """
    if hi <= lo:
        raise ValueError(f"window: hi ({hi}) must be above lo ({lo})")
    scale = 1.0 / (hi - lo)
    if hasattr(hu, "clamp") and hasattr(hu, "float"):  # torch tensor, without importing torch
        return ((hu.float() - lo) * scale).clamp_(0.0, 1.0)
    out = (np.asarray(hu, dtype=np.float32) - np.float32(lo)) * np.float32(scale)
    return np.clip(out, 0.0, 1.0, out=out)


@dataclass
class CaseRecord:
    """One case as read from (or written to) a shard.

    Arrays are RAS+ ``[x, y, z]``. ``volume`` int16 HU (``AIR_HU`` outside the field of
    view); ``label_map`` uint8 anatomy ids (0 background, ``i + 1`` = ``anatomies[i]``);
    ``crops[a]`` int16 HU and ``crop_masks[a]`` uint8 {0, 1} of the anatomy's fixed crop
    shape; ``bbox[a]`` = ``(x0, y0, z0, x1, y1, z1)`` (end exclusive) of the anatomy mask in
    the ``volume`` grid, or None when absent.
    """
    case_id: str
    patient_id: str = ""
    split: str = ""
    spacing_mm: tuple = (1.0, 1.0, 3.0)
    volume: np.ndarray | None = None
    label_map: np.ndarray | None = None
    crops: dict = field(default_factory=dict)
    crop_masks: dict = field(default_factory=dict)
    present: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    anatomy_text: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    bbox: dict = field(default_factory=dict)


@dataclass
class ShardLayout:
    """Fixed array shapes and storage options shared by all shards of one output directory."""
    anatomies: list
    crop_shapes: dict                     # anatomy -> (x, y, z)
    whole_shape: tuple | None = None      # (X, Y, Z) or None: no whole volume stored
    compression: str | None = "gzip"      # "gzip", "lzf" or None
    compression_level: int = 1
    shuffle: bool = True

    def filter_kwargs(self) -> dict:
        if not self.compression:
            return {}
        kw: dict = {"compression": self.compression, "shuffle": self.shuffle}
        if self.compression == "gzip":
            kw["compression_opts"] = int(self.compression_level)
        return kw

    def to_dict(self) -> dict:
        return {"anatomies": list(self.anatomies),
                "crop_shapes": {a: list(map(int, s)) for a, s in self.crop_shapes.items()},
                "whole_shape": list(map(int, self.whole_shape)) if self.whole_shape else None,
                "compression": self.compression, "compression_level": self.compression_level,
                "shuffle": self.shuffle}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardLayout":
        return cls(anatomies=list(d["anatomies"]),
                   crop_shapes={a: tuple(s) for a, s in d["crop_shapes"].items()},
                   whole_shape=tuple(d["whole_shape"]) if d.get("whole_shape") else None,
                   compression=d.get("compression"), compression_level=int(d.get("compression_level", 1)),
                   shuffle=bool(d.get("shuffle", True)))


def _json(x: Any) -> str:
    return json.dumps(x, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- writing


def _create(f, layout: ShardLayout, n: int, attrs: dict | None) -> dict:
    import h5py

    A = len(layout.anatomies)
    fk = layout.filter_kwargs()
    str_t = h5py.string_dtype("utf-8")
    f.attrs["format"] = SHARD_FORMAT
    f.attrs["version"] = SCHEMA_VERSION
    f.attrs["n_cases"] = n
    f.attrs["layout"] = _json(layout.to_dict())
    for k, v in (attrs or {}).items():
        f.attrs[k] = _json(v)
    d: dict = {}
    for name in _STR_FIELDS:
        d[name] = f.create_dataset(name, (n,), dtype=str_t, track_times=False)
    d["spacing_mm"] = f.create_dataset("spacing_mm", (n, 3), dtype="f8", track_times=False)
    d["present"] = f.create_dataset("present", (n, A), dtype="u1", track_times=False)
    d["bbox"] = f.create_dataset("bbox", (n, A, 6), dtype="i4", fillvalue=-1, track_times=False)
    if layout.whole_shape:
        ws = tuple(int(s) for s in layout.whole_shape)
        d["volume"] = f.create_dataset("volume", (n, *ws), dtype="i2", chunks=(1, *ws), maxshape=(None, *ws),
                                       fillvalue=AIR_HU, track_times=False, **fk)
        d["label_map"] = f.create_dataset("label_map", (n, *ws), dtype="u1", chunks=(1, *ws),
                                          maxshape=(None, *ws), fillvalue=0, track_times=False, **fk)
    gc = f.create_group("crops", track_order=False)
    gm = f.create_group("crop_masks", track_order=False)
    for a in layout.anatomies:
        cs = tuple(int(s) for s in layout.crop_shapes[a])
        d[f"crops/{a}"] = gc.create_dataset(a, (n, *cs), dtype="i2", chunks=(1, *cs), maxshape=(None, *cs),
                                            fillvalue=AIR_HU, track_times=False, **fk)
        d[f"crop_masks/{a}"] = gm.create_dataset(a, (n, *cs), dtype="u1", chunks=(1, *cs), maxshape=(None, *cs),
                                                 fillvalue=0, track_times=False, **fk)
    return d


_STR_FIELDS = ("case_id", "patient_id", "split", "meta", "report", "anatomy_text", "labels")
_SMALL_FIELDS = _STR_FIELDS + ("spacing_mm", "present", "bbox")


def _fresh_tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    return tmp


def write_shard(path: str | os.PathLike, layout: ShardLayout, records: Iterable[CaseRecord], n: int,
                attrs: dict | None = None) -> Path:
    """Write ``n`` records to an HDF5 shard atomically (``<path>.tmp``, then rename).

    ``records`` may be a generator (cases are written one at a time, so memory holds
    one case). The output is byte-identical for identical inputs (no timestamps).
    """
    import h5py

    path = Path(path)
    tmp = _fresh_tmp(path)
    A = len(layout.anatomies)
    with h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
        d = _create(f, layout, n, attrs)
        i = -1
        for i, rec in enumerate(records):
            if i >= n:
                raise ValueError(f"write_shard: more than n={n} records")
            d["case_id"][i] = rec.case_id
            d["patient_id"][i] = rec.patient_id
            d["split"][i] = rec.split
            d["meta"][i] = _json(rec.meta)
            d["report"][i] = _json(rec.report)
            d["anatomy_text"][i] = _json(rec.anatomy_text)
            d["labels"][i] = _json(rec.labels)
            d["spacing_mm"][i] = np.asarray(rec.spacing_mm, dtype=np.float64)
            d["present"][i] = [1 if rec.present.get(a) else 0 for a in layout.anatomies]
            bb = np.full((A, 6), -1, dtype=np.int32)
            for j, a in enumerate(layout.anatomies):
                if rec.bbox.get(a) is not None:
                    bb[j] = rec.bbox[a]
            d["bbox"][i] = bb
            if layout.whole_shape:
                if rec.volume is None or tuple(rec.volume.shape) != tuple(layout.whole_shape):
                    raise ValueError(f"{rec.case_id}: volume shape "
                                     f"{None if rec.volume is None else rec.volume.shape} != {layout.whole_shape}")
                d["volume"][i] = rec.volume.astype(np.int16, copy=False)
                if rec.label_map is not None:
                    d["label_map"][i] = rec.label_map.astype(np.uint8, copy=False)
            for a in layout.anatomies:
                if not rec.present.get(a) or a not in rec.crops:
                    continue
                c = rec.crops[a]
                if tuple(c.shape) != tuple(layout.crop_shapes[a]):
                    raise ValueError(f"{rec.case_id}: crop {a} shape {c.shape} != {layout.crop_shapes[a]}")
                d[f"crops/{a}"][i] = c.astype(np.int16, copy=False)
                if a in rec.crop_masks:
                    d[f"crop_masks/{a}"][i] = rec.crop_masks[a].astype(np.uint8, copy=False)
        if i + 1 != n:
            raise ValueError(f"write_shard: expected {n} records, got {i + 1}")
    os.replace(tmp, path)
    return path


def concat_shards(path: str | os.PathLike, layout: ShardLayout, parts: Sequence[str | os.PathLike],
                  attrs: dict | None = None) -> Path:
    """Concatenate shards of the same layout (e.g. one-case staging shards) into one, atomically.

    Image chunks are copied as stored (``read_direct_chunk``/``write_direct_chunk``): nothing
    is decompressed or recompressed, and unwritten chunks (absent anatomies) stay unwritten.
    """
    import h5py

    path = Path(path)
    tmp = _fresh_tmp(path)
    srcs = []
    try:
        for p in parts:
            srcs.append(h5py.File(p, "r"))
        n = sum(int(s.attrs["n_cases"]) for s in srcs)
        with h5py.File(tmp, "w", libver="earliest", track_order=False) as f:
            d = _create(f, layout, n, attrs)
            i = 0
            for s in srcs:
                if json.loads(s.attrs["layout"]) != json.loads(_json(layout.to_dict())):
                    raise ValueError(f"{s.filename}: layout differs from the target shard's")
                k = int(s.attrs["n_cases"])
                for name in _SMALL_FIELDS:
                    d[name][i:i + k] = s[name][:]
                for name, dst in d.items():
                    if name in _SMALL_FIELDS:
                        continue
                    src = s[name]
                    for j in range(k):
                        off = (j,) + (0,) * (src.ndim - 1)
                        info = src.id.get_chunk_info_by_coord(off)
                        if info.byte_offset is None:  # never written: keep it unallocated
                            continue
                        mask, data = src.id.read_direct_chunk(off)
                        dst.id.write_direct_chunk((i + j,) + off[1:], data, mask)
                i += k
    finally:
        for s in srcs:
            s.close()
    os.replace(tmp, path)
    return path


def _atomic_text(path: Path, text: str) -> None:
    # per-process temporary name: parallel array jobs write the same dataset.json
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_index(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write index rows (one JSON object per line) atomically. See FORMATS.md §2 for the keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
    return path


def read_index(path: str | os.PathLike) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for ln, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise FormatError(f"{path}:{ln}: not valid JSON") from None
    return rows


def write_dataset_info(root: str | os.PathLike, layout: ShardLayout, extra: dict | None = None) -> Path:
    """Write ``dataset.json`` (format name, version, layout, anatomy set, spacing, ...)."""
    info = {"format": DATASET_FORMAT, "version": SCHEMA_VERSION, "layout": layout.to_dict(),
            "label_map": "anatomy", "hu_dtype": "int16", "pad_hu": AIR_HU}
    info.update(extra or {})
    p = Path(root) / DATASET_INFO_NAME
    p.parent.mkdir(parents=True, exist_ok=True)
    _atomic_text(p, json.dumps(info, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
    return p


def read_dataset_info(root: str | os.PathLike) -> dict:
    p = Path(root) / DATASET_INFO_NAME
    if not p.is_file():
        raise FormatError(f"{root}: no {DATASET_INFO_NAME}; is this a directory written by `fvlm preprocess`?")
    info = json.loads(p.read_text(encoding="utf-8"))
    if info.get("format") != DATASET_FORMAT:
        raise FormatError(f"{p}: format {info.get('format')!r}, expected {DATASET_FORMAT!r}")
    if info.get("version") != SCHEMA_VERSION:
        raise FormatError(f"{p}: shard schema version {info.get('version')!r}; this fvlm reads "
                          f"version {SCHEMA_VERSION} (re-run `fvlm preprocess` or use a matching fvlm)")
    return info


# --------------------------------------------------------------------------- reading


class ShardDataset:
    """Random access to preprocessed cases by case id and anatomy.

    Args:
        root: a directory written by ``fvlm preprocess`` (holds ``dataset.json``,
            ``index.jsonl`` and ``shards/``).
        split: keep only cases of this split (``"train"``, ``"valid"``, ...), or None.

    File handles are opened lazily and per process, so an instance can be handed to
    DataLoader workers (fork or spawn). ``len(ds)`` and ``ds[i]`` make it a map-style
    dataset of :class:`CaseRecord`.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = None):
        self.root = Path(root)
        self.info = read_dataset_info(self.root)
        self.layout = ShardLayout.from_dict(self.info["layout"])
        idx = self.root / INDEX_NAME
        if not idx.is_file():
            parts = sorted(self.root.glob("index-*.jsonl"))
            hint = (f"; {len(parts)} partial index files found: run `fvlm preprocess merge {self.root}`"
                    if parts else "")
            raise FormatError(f"{self.root}: no {INDEX_NAME}{hint}")
        rows = read_index(idx)
        if split is not None:
            rows = [r for r in rows if r.get("split") == split]
        self._rows = rows
        self._by_id = {r["case_id"]: r for r in rows}
        self._files: dict = {}
        self._pid = None

    # -- metadata
    @property
    def anatomies(self) -> list[str]:
        return list(self.layout.anatomies)

    @property
    def whole_shape(self) -> tuple | None:
        return self.layout.whole_shape

    @property
    def crop_shapes(self) -> dict:
        return dict(self.layout.crop_shapes)

    def case_ids(self, split: str | None = None) -> list[str]:
        return [r["case_id"] for r in self._rows if split is None or r.get("split") == split]

    def index_row(self, case_id: str) -> dict:
        try:
            return self._by_id[case_id]
        except KeyError:
            raise FvlmError(f"case {case_id!r} is not in {self.root / INDEX_NAME}") from None

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> CaseRecord:
        return self.get(self._rows[i]["case_id"])

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._by_id

    # -- files
    def _file(self, rel: str):
        import h5py

        if self._pid != os.getpid():  # never share HDF5 handles across fork
            self._files = {}
            self._pid = os.getpid()
        f = self._files.get(rel)
        if f is None:
            p = self.root / rel
            try:
                f = h5py.File(p, "r", rdcc_nbytes=0)
            except OSError as e:
                raise FormatError(f"{p}: cannot open shard ({e})") from None
            if f.attrs.get("format") != SHARD_FORMAT or int(f.attrs.get("version", -1)) != SCHEMA_VERSION:
                raise FormatError(f"{p}: not a {SHARD_FORMAT} v{SCHEMA_VERSION} file")
            self._files[rel] = f
        return f

    def close(self) -> None:
        for f in getattr(self, "_files", {}).values():
            try:
                f.close()
            except Exception:  # noqa: BLE001 - closing a handle of a dead process
                pass
        self._files = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_files"] = {}
        d["_pid"] = None
        return d

    def __del__(self):
        self.close()

    # -- access
    def _check_anatomies(self, anatomies) -> list[str]:
        if anatomies is None:
            return self.anatomies
        bad = [a for a in anatomies if a not in self.layout.crop_shapes]
        if bad:
            raise FvlmError(f"unknown anatomy {bad[0]!r}; this dataset has {', '.join(self.anatomies)}")
        return list(anatomies)

    def crop(self, case_id: str, anatomy: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(crop int16 [x, y, z], mask uint8 [x, y, z], present)`` of one anatomy of one case."""
        self._check_anatomies([anatomy])
        r = self.index_row(case_id)
        f = self._file(r["shard"])
        i = int(r["row"])
        return f["crops"][anatomy][i], f["crop_masks"][anatomy][i], anatomy in r.get("anatomies", [])

    def get(self, case_id: str, anatomies: Sequence[str] | None = None, volume: bool = True,
            crops: bool = True) -> CaseRecord:
        """Read one case. ``anatomies`` limits the crops read (default all); ``volume`` reads
        the whole volume and label map; ``crops`` the per-anatomy crops and masks."""
        anats = self._check_anatomies(anatomies)
        r = self.index_row(case_id)
        f = self._file(r["shard"])
        i = int(r["row"])
        stored_id = f["case_id"][i]
        stored_id = stored_id.decode() if isinstance(stored_id, bytes) else stored_id
        if stored_id != case_id:
            raise FormatError(f"{self.root / r['shard']}: row {i} holds {stored_id!r}, index says {case_id!r} "
                              "(index and shards disagree; re-run `fvlm preprocess merge`)")

        def js(name):
            v = f[name][i]
            return json.loads(v.decode() if isinstance(v, bytes) else v)

        present_row = f["present"][i]
        all_anats = self.anatomies
        present = {a: bool(present_row[j]) for j, a in enumerate(all_anats)}
        bb = f["bbox"][i]
        bbox = {a: (tuple(int(v) for v in bb[j]) if present[a] else None) for j, a in enumerate(all_anats)}
        rec = CaseRecord(case_id=case_id, patient_id=r.get("patient_id", ""), split=r.get("split", ""),
                         spacing_mm=tuple(float(s) for s in f["spacing_mm"][i]), present=present,
                         report=js("report"), anatomy_text=js("anatomy_text"), labels=js("labels"),
                         meta=js("meta"), bbox=bbox)
        if volume and "volume" in f:
            rec.volume = f["volume"][i]
            rec.label_map = f["label_map"][i]
        if crops:
            for a in anats:
                rec.crops[a] = f["crops"][a][i]
                rec.crop_masks[a] = f["crop_masks"][a][i]
        return rec
