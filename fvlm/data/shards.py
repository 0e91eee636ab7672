"""Training shards written by ``fvlm preprocess``: HDF5 files + a JSONL index (FORMATS.md §2, layout v2).

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

Each voxel is stored once: per case the volume resampled to ``spacing_mm`` (int16 HU, its
own shape) and its anatomy label map (uint8), chunked in ``chunk_shape`` blocks. Anatomy
crops (the crop policy of :mod:`fvlm.data.crop`, from the stored mask boxes) and the
volume-mode whole volume (centred in ``whole_shape`` at ``whole_spacing_mm``) are cut when
read: a crop decompresses only the chunks under it. Files need h5py with ``hdf5plugin``
imported (Blosc2 and the other plugin filters); this module imports it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from ..errors import FormatError, FvlmError, check_format
from ..jsonl import read_jsonl
from .crop import AIR_HU, crop_positions, cut_crop
from .sampling import cut

__all__ = ["ShardDataset", "CaseRecord", "ShardLayout", "window", "write_shard", "concat_shards", "write_index",
           "read_index", "InMemoryCase", "write_dataset_info", "read_dataset_info", "open_h5", "SHARD_FORMAT", "DATASET_FORMAT",
           "SCHEMA_VERSION", "INDEX_NAME", "DATASET_INFO_NAME", "AIR_HU", "CODECS"]

SHARD_FORMAT = "fvlm-shard"
DATASET_FORMAT = "fvlm-shards"
SCHEMA_VERSION = 2
INDEX_NAME = "index.jsonl"
DATASET_INFO_NAME = "dataset.json"
#: image filters a layout may name (FORMATS.md §2 has the measured table)
CODECS = ("gzip", "lzf", "none", "blosc2-lz4", "blosc2-zstd", "zstd", "lz4")
#: a v1 directory (crops stored next to the volume) cannot be read; one line says what to do
V1_HINT = ("shard layout version 1 (every crop stored next to the volume) is no longer read: re-run "
           "`fvlm preprocess` with this fvlm into a new --out directory (a v1 whole volume may be "
           "centre-cropped, so crops cannot be migrated from it)")


def open_h5(path, mode: str = "r", **kw):
    """``h5py.File`` with the ``hdf5plugin`` filters registered (every shard open goes here)."""
    import h5py
    import hdf5plugin  # noqa: F401 - registers the Blosc2 / Zstd / LZ4 filters with HDF5

    return h5py.File(path, mode, **kw)


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

    Arrays are RAS+ ``[x, y, z]``. As read: ``volume`` int16 HU (``AIR_HU`` outside the field
    of view) on the volume-mode grid (``whole_shape`` at ``whole_spacing_mm``; None when the
    layout has no ``whole_shape``); ``label_map`` uint8 anatomy ids on it (0
    background, ``i + 1`` = ``anatomies[i]``); ``crops[a]`` int16 HU and ``crop_masks[a]`` uint8
    {0, 1} of the anatomy's fixed crop shape; ``bbox[a]`` = ``(x0, y0, z0, x1, y1, z1)`` (end
    exclusive) of the anatomy mask on the ``volume`` grid, or None when absent.
    To write: ``volume`` / ``label_map`` on the resampled grid (``layout.spacing_mm``, any
    shape), ``bbox`` on that grid; ``crops`` are not stored (they are cut when read).
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
    #: ``(volume, label_map, layout, bbox)`` on the stored grid, set by one-case readers (``InMemoryCase``)
    #: so that inference samples a single scan exactly as training samples its shard
    stored: Any = None


@dataclass
class ShardLayout:
    """Storage options and read-time shapes shared by all shards of one output directory.

    ``spacing_mm``: grid of the stored volumes. Crops: ``crop_shapes`` {anatomy: (x, y, z)},
    ``margins_mm`` {anatomy: mm} (``margin_mm`` for the others), ``crop_oversize``.
    Volume mode: ``whole_shape`` (None: ``get`` returns no volume) at
    ``whole_spacing_mm`` (None: ``spacing_mm``). ``compression`` one of :data:`CODECS`,
    ``compression_level``, ``shuffle`` (``byte``, ``bit`` or ``none``), ``chunk_shape``.
    """
    anatomies: list
    crop_shapes: dict                     # anatomy -> (x, y, z)
    whole_shape: tuple | None = None      # (X, Y, Z) or None
    compression: str | None = "blosc2-zstd"
    compression_level: int = 1
    shuffle: str | bool = "bit"
    spacing_mm: tuple = (1.0, 1.0, 3.0)
    whole_spacing_mm: tuple | None = None
    margins_mm: dict = field(default_factory=dict)
    margin_mm: float = 5.0
    crop_oversize: str = "resize"
    chunk_shape: tuple = (64, 64, 32)

    def __post_init__(self):
        if self.compression is None:
            self.compression = "none"
        if self.shuffle is True:
            self.shuffle = "byte"
        elif self.shuffle is False:
            self.shuffle = "none"
        if self.compression not in CODECS:
            raise FvlmError(f"shards.compression {self.compression!r}: use one of {', '.join(CODECS)}")
        if self.shuffle not in ("byte", "bit", "none"):
            raise FvlmError(f"shards.shuffle {self.shuffle!r}: use byte, bit or none")
        self.spacing_mm = tuple(float(x) for x in self.spacing_mm)
        if self.whole_spacing_mm is not None:
            self.whole_spacing_mm = tuple(float(x) for x in self.whole_spacing_mm)
        self.chunk_shape = tuple(int(x) for x in self.chunk_shape)

    def filter_kwargs(self) -> dict:
        """h5py ``create_dataset`` keywords of the image filter."""
        c, lvl = self.compression, int(self.compression_level)
        if c == "none":
            return {}
        if c in ("gzip", "lzf"):
            kw: dict = {"compression": c, "shuffle": self.shuffle != "none"}  # HDF5 has byte shuffle only
            if c == "gzip":
                kw["compression_opts"] = lvl
            return kw
        import hdf5plugin

        if c.startswith("blosc2-"):
            shuf = {"byte": hdf5plugin.Blosc2.SHUFFLE, "bit": hdf5plugin.Blosc2.BITSHUFFLE,
                    "none": hdf5plugin.Blosc2.NOFILTER}[self.shuffle]
            return dict(hdf5plugin.Blosc2(cname=c.split("-", 1)[1], clevel=lvl, filters=shuf))
        if c == "zstd":
            return dict(hdf5plugin.Zstd(clevel=lvl))
        return dict(hdf5plugin.LZ4())

    def chunks_for(self, shape) -> tuple:
        return tuple(max(1, min(int(c), int(s))) for c, s in zip(self.chunk_shape, shape))

    def margin(self, anatomy: str) -> float:
        return float(self.margins_mm.get(anatomy, self.margin_mm))

    def to_dict(self) -> dict:
        return {"anatomies": list(self.anatomies),
                "crop_shapes": {a: list(map(int, s)) for a, s in self.crop_shapes.items()},
                "whole_shape": list(map(int, self.whole_shape)) if self.whole_shape else None,
                "compression": self.compression, "compression_level": int(self.compression_level),
                "shuffle": self.shuffle, "spacing_mm": list(self.spacing_mm),
                "whole_spacing_mm": list(self.whole_spacing_mm) if self.whole_spacing_mm else None,
                "margins_mm": {a: float(m) for a, m in self.margins_mm.items()}, "margin_mm": float(self.margin_mm),
                "crop_oversize": self.crop_oversize, "chunk_shape": list(self.chunk_shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardLayout":
        return cls(anatomies=list(d["anatomies"]),
                   crop_shapes={a: tuple(s) for a, s in d["crop_shapes"].items()},
                   whole_shape=tuple(d["whole_shape"]) if d.get("whole_shape") else None,
                   compression=d.get("compression") or "none", compression_level=int(d.get("compression_level", 1)),
                   shuffle=d.get("shuffle", "bit"), spacing_mm=tuple(d.get("spacing_mm", (1.0, 1.0, 3.0))),
                   whole_spacing_mm=tuple(d["whole_spacing_mm"]) if d.get("whole_spacing_mm") else None,
                   margins_mm=dict(d.get("margins_mm") or {}), margin_mm=float(d.get("margin_mm", 5.0)),
                   crop_oversize=d.get("crop_oversize", "resize"), chunk_shape=tuple(d.get("chunk_shape", (64, 64, 32))))


def _json(x: Any) -> str:
    return json.dumps(x, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


# --------------------------------------------------------------------------- writing

_STR_FIELDS = ("case_id", "patient_id", "split", "meta", "report", "anatomy_text", "labels")
_SMALL_FIELDS = _STR_FIELDS + ("spacing_mm", "present", "bbox", "shape")
_IMAGES = (("volume", "i2", AIR_HU), ("label_map", "u1", 0))


def _create(f, layout: ShardLayout, n: int, attrs: dict | None) -> dict:
    import h5py

    A = len(layout.anatomies)
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
    d["shape"] = f.create_dataset("shape", (n, 3), dtype="i4", track_times=False)
    for name, _, _ in _IMAGES:
        d[name] = f.create_group(name, track_order=False)
    return d


def _image(group, i: int, layout: ShardLayout, shape, dtype: str, fill: int):
    """The chunked, compressed dataset of case row ``i`` (``group/<i>``)."""
    shape = tuple(int(s) for s in shape)
    return group.create_dataset(str(i), shape, dtype=dtype, chunks=layout.chunks_for(shape), fillvalue=fill,
                                track_times=False, **layout.filter_kwargs())


def _fresh_tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    return tmp


def _write_small(d: dict, i: int, rec: CaseRecord, layout: ShardLayout) -> None:
    A = len(layout.anatomies)
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
        if rec.present.get(a) and rec.bbox.get(a) is not None:
            bb[j] = rec.bbox[a]
    d["bbox"][i] = bb
    d["shape"][i] = rec.volume.shape


def write_shard(path: str | os.PathLike, layout: ShardLayout, records: Iterable[CaseRecord], n: int,
                attrs: dict | None = None) -> Path:
    """Write ``n`` records to an HDF5 shard atomically (``<path>.tmp``, then rename).

    Each record holds its resampled ``volume`` and ``label_map`` (same shape) and ``bbox`` on
    that grid. ``records`` may be a generator (one case in memory at a time). The output is
    byte-identical for identical inputs (no timestamps).
    """
    path = Path(path)
    tmp = _fresh_tmp(path)
    with open_h5(tmp, "w", libver="earliest", track_order=False) as f:
        d = _create(f, layout, n, attrs)
        i = -1
        for i, rec in enumerate(records):
            if i >= n:
                raise ValueError(f"write_shard: more than n={n} records")
            if rec.volume is None or rec.volume.ndim != 3:
                raise ValueError(f"{rec.case_id}: a shard record needs its resampled volume [X, Y, Z]")
            lab = rec.label_map if rec.label_map is not None else np.zeros(rec.volume.shape, np.uint8)
            if lab.shape != rec.volume.shape:
                raise ValueError(f"{rec.case_id}: label map shape {lab.shape} != volume shape {rec.volume.shape}")
            _write_small(d, i, rec, layout)
            for (name, dt, fill), arr in zip(_IMAGES, (rec.volume, lab)):
                _image(d[name], i, layout, arr.shape, dt, fill)[...] = np.ascontiguousarray(arr, dtype=dt)
        if i + 1 != n:
            raise ValueError(f"write_shard: expected {n} records, got {i + 1}")
    os.replace(tmp, path)
    return path


def _check_version(f, p) -> None:
    if f.attrs.get("format") != SHARD_FORMAT:
        raise FormatError(f"{p}: not a {SHARD_FORMAT} file")
    v = f.attrs.get("version", -1)
    try:
        v = int(v) if np.ndim(v) == 0 and float(v) == int(v) else -1
    except (TypeError, ValueError):
        v = -1
    if v == 1:
        raise FormatError(f"{p}: {V1_HINT}")
    if v != SCHEMA_VERSION:
        raise FormatError(f"{p}: {SHARD_FORMAT} version {v}; this fvlm reads version {SCHEMA_VERSION}")


def concat_shards(path: str | os.PathLike, layout: ShardLayout, parts: Sequence[str | os.PathLike],
                  attrs: dict | None = None) -> Path:
    """Concatenate shards of the same layout (e.g. one-case staging shards) into one, atomically.

    Image chunks are copied as stored (``read_direct_chunk``/``write_direct_chunk``): nothing
    is decompressed or recompressed.
    """
    path = Path(path)
    tmp = _fresh_tmp(path)
    srcs = []
    try:
        for p in parts:
            srcs.append(open_h5(p, "r"))
            _check_version(srcs[-1], p)
        n = sum(int(s.attrs["n_cases"]) for s in srcs)
        with open_h5(tmp, "w", libver="earliest", track_order=False) as f:
            d = _create(f, layout, n, attrs)
            i = 0
            for s in srcs:
                if json.loads(s.attrs["layout"]) != json.loads(_json(layout.to_dict())):
                    raise ValueError(f"{s.filename}: layout differs from the target shard's")
                k = int(s.attrs["n_cases"])
                for name in _SMALL_FIELDS:
                    d[name][i:i + k] = s[name][:]
                for j in range(k):
                    for name, dt, fill in _IMAGES:
                        src = s[name][str(j)]
                        dst = _image(d[name], i + j, layout, src.shape, dt, fill)
                        for c in range(src.id.get_num_chunks()):
                            off = src.id.get_chunk_info(c).chunk_offset
                            mask, data = src.id.read_direct_chunk(off)
                            dst.id.write_direct_chunk(off, data, mask)
                i += k
    finally:
        for s in srcs:
            s.close()
    os.replace(tmp, path)
    return path


def _atomic_text(path: Path, text: str) -> None:
    # per-process temporary name: parallel array jobs write the same dataset.json
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C included: no half-written file left beside
        tmp.unlink(missing_ok=True)
        raise


def write_index(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """Write index rows (one JSON object per line) atomically. See FORMATS.md §2 for the keys."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_text(path, "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows))
    return path


def read_index(path: str | os.PathLike) -> list[dict]:
    return [row for _, row in read_jsonl(path, FormatError)]


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
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{p}: not valid JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(info, dict):
        raise FormatError(f"{p}: not a {DATASET_FORMAT} file (a JSON {type(info).__name__}, not an object)")
    if info.get("format") == DATASET_FORMAT and info.get("version") == 1:
        raise FormatError(f"{root}: {V1_HINT}")
    return check_format(info, DATASET_FORMAT, SCHEMA_VERSION, p,
                        version_hint="; re-run `fvlm preprocess` or use a matching fvlm")


# --------------------------------------------------------------------------- checks of what is read


def layout_of(info: dict, where) -> ShardLayout:
    """The :class:`ShardLayout` of a ``dataset.json``; a malformed one is a one-line :class:`FormatError`."""
    d = info.get("layout")
    try:
        if not isinstance(d, dict) or not isinstance(d.get("crop_shapes"), dict):
            raise TypeError("no layout mapping with crop_shapes")
        L = ShardLayout.from_dict(d)
        if not all(isinstance(a, str) for a in L.anatomies) or len(set(L.anatomies)) != len(L.anatomies):
            raise ValueError("anatomies must be distinct names")
        if len(L.anatomies) > 255:
            raise ValueError(f"{len(L.anatomies)} anatomies do not fit a uint8 label map")
        shapes = list(L.crop_shapes.values()) + ([L.whole_shape] if L.whole_shape else []) + [L.chunk_shape]
        for shp in shapes:
            if len(shp) != 3 or not all(isinstance(x, (int, np.integer)) and x > 0 for x in shp):
                raise ValueError(f"shape {list(shp)} is not three positive integers")
        for sp in (L.spacing_mm, L.whole_spacing_mm or L.spacing_mm):
            if len(sp) != 3 or not all(np.isfinite(x) and x > 0 for x in sp):
                raise ValueError(f"spacing {list(sp)} is not three finite positive numbers")
    except (KeyError, TypeError, ValueError, FvlmError) as e:
        raise FormatError(f"{where}: malformed layout ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return L


def check_index_rows(rows: list, root: Path, idx: Path) -> None:
    """Index rows name a case once, a shard inside ``root`` and a row number (FORMATS.md §2)."""
    seen: dict = {}
    inside: dict = {}  # shard name -> resolves inside root (a few hundred shards for many thousand rows)
    top = root.resolve()
    for ln, r in enumerate(rows, 1):
        if not isinstance(r, dict):
            raise FormatError(f"{idx}: row {ln} is not a JSON object")
        cid, shard, row = r.get("case_id"), r.get("shard"), r.get("row")
        if not isinstance(cid, str) or not cid:
            raise FormatError(f"{idx}: row {ln} has no case_id")
        if cid in seen:
            raise FormatError(f"{idx}: case {cid!r} is listed twice (rows {seen[cid]} and {ln}); "
                              "re-run `fvlm preprocess merge`")
        seen[cid] = ln
        if not isinstance(shard, str) or not shard:
            raise FormatError(f"{idx}: case {cid!r} names no shard file")
        if shard not in inside:
            inside[shard] = not os.path.isabs(shard) and (root / shard).resolve().is_relative_to(top)
        if not inside[shard]:
            raise FormatError(f"{idx}: case {cid!r}: shard {shard!r} lies outside {root}; refused")
        if isinstance(row, bool) or not isinstance(row, int) or row < 0:
            raise FormatError(f"{idx}: case {cid!r} has row {row!r}, not a row number")


def check_shard_structure(f, p, n_anatomies: int) -> int:
    """Datasets, shapes and dtypes of an open shard against layout v2 -> its ``n_cases``."""
    _check_version(f, p)
    try:
        n = int(f.attrs["n_cases"])
    except (KeyError, TypeError, ValueError):
        raise FormatError(f"{p}: no n_cases attribute (not written by `fvlm preprocess`?)") from None
    want = {name: ((n,), "string") for name in _STR_FIELDS}
    want.update({"spacing_mm": ((n, 3), "f"), "present": ((n, n_anatomies), "u"),
                 "bbox": ((n, n_anatomies, 6), "i"), "shape": ((n, 3), "i")})
    for name, (shape, kind) in want.items():
        d = f.get(name)
        if d is None or not hasattr(d, "shape"):
            raise FormatError(f"{p}: dataset '{name}' is missing")
        ok = (d.dtype.kind in "OSU") if kind == "string" else (d.dtype.kind == kind or (kind == "i" and d.dtype.kind == "u"))
        if tuple(d.shape) != shape or not ok:
            raise FormatError(f"{p}: dataset '{name}' is {d.dtype} {list(d.shape)}, the layout needs {list(shape)}")
    for name, _, _ in _IMAGES:
        if not hasattr(f.get(name), "keys"):
            raise FormatError(f"{p}: group '{name}' is missing")
    return n


def _case_image(f, name: str, i: int, p, case_id: str, dtype: str):
    d = f[name].get(str(i))
    if d is None or not hasattr(d, "shape"):
        raise FormatError(f"{p}: case {case_id!r}: {name}/{i} is missing")
    if d.dtype != np.dtype(dtype) or d.ndim != 3:
        raise FormatError(f"{p}: case {case_id!r}: {name}/{i} is {d.dtype} with {d.ndim} axes, the layout "
                          f"stores {np.dtype(dtype)} [X, Y, Z]")
    return d


def _check_case_values(p, case_id: str, vol, lab, spacing, bb, present_row) -> None:
    """Per-case values: shapes agree, spacing finite, boxes inside the volume (one error naming the case)."""
    if tuple(vol.shape) != tuple(lab.shape):
        raise FormatError(f"{p}: case {case_id!r}: label map shape {list(lab.shape)} != volume shape "
                          f"{list(vol.shape)}")
    if min(vol.shape) < 1:
        raise FormatError(f"{p}: case {case_id!r}: empty volume {list(vol.shape)}")
    sp = np.asarray(spacing, dtype=np.float64)
    if not (np.isfinite(sp).all() and (sp > 0).all()):
        raise FormatError(f"{p}: case {case_id!r}: spacing {sp.tolist()} is not finite and positive")
    shape = np.asarray(vol.shape)
    for j, on in enumerate(present_row):
        if on:
            b = np.asarray(bb[j])
            if not ((b[:3] >= 0).all() and (b[:3] < b[3:]).all() and (b[3:] <= shape).all()):
                raise FormatError(f"{p}: case {case_id!r}: box {b.tolist()} of anatomy {j + 1} lies outside "
                                  f"the volume {shape.tolist()}")


def _check_labels(where, case_id: str, lab: np.ndarray, n_anatomies: int) -> None:
    if lab is not None and lab.size and int(lab.max()) > n_anatomies:
        raise FormatError(f"{where}: case {case_id!r}: label id {int(lab.max())} is past the {n_anatomies} "
                          "anatomies of the layout")


class _CheckedLabels:
    """A stored label map that checks the ids of every hyperslab read from it (one error naming the
    case): the sample path reads a box, not the whole map, so the check rides on that read."""

    def __init__(self, ds, where, case_id: str, n_anatomies: int):
        self._ds, self._where, self._case, self._n = ds, where, case_id, n_anatomies
        self.shape, self.dtype, self.ndim = ds.shape, ds.dtype, ds.ndim

    def __getitem__(self, key):
        out = self._ds[key]
        _check_labels(self._where, self._case, np.asarray(out), self._n)
        return out

    def read_direct(self, dest, source_sel=None, dest_sel=None):
        self._ds.read_direct(dest, source_sel, dest_sel)
        _check_labels(self._where, self._case, dest if dest_sel is None else dest[dest_sel], self._n)

    def __array__(self, dtype=None, copy=None):
        out = self[()]
        return out if dtype is None else out.astype(dtype)


# --------------------------------------------------------------------------- reading


def whole_positions(shape, spacing, whole_spacing, whole_shape) -> tuple[list, list]:
    """Volume-mode grid: per axis, positions on the stored grid of the ``whole_shape`` voxels
    (the stored volume resampled to ``whole_spacing`` on MONAI's ``Spacing`` grid, then
    centre-padded / cropped) and the index of stored voxel 0 on it (``offset``)."""
    pos, offset = [], []
    for n, si, so, w in zip(shape, spacing, whole_spacing, whole_shape):
        r = float(so) / float(si)
        n_out = n if abs(r - 1.0) < 1e-9 else max(1, int(np.round((n - 1) / r + 1.0)))
        off = (int(w) - n_out) // 2
        g = np.arange(int(w), dtype=np.float64) - off
        p = g if abs(r - 1.0) < 1e-9 else np.minimum(g * r, n - 1.0)
        # outside the resampled grid: a position the cut pads (below -0.5)
        pos.append(np.where((g < 0) | (g >= n_out), -1.0, p))
        offset.append(off)
    return pos, offset


def resized_positions(positions, size) -> list:
    """Positions (on the volume grid) of a crop at ``positions`` resized to ``size``: where a
    trilinear ``align_corners=False`` resize of the crop samples it (clamped to the crop)."""
    out = []
    for p, m in zip(positions, size):
        n = len(p)
        step = (p[-1] - p[0]) / (n - 1) if n > 1 else 1.0
        c = np.clip((np.arange(int(m), dtype=np.float64) + 0.5) * n / int(m) - 0.5, 0.0, n - 1.0)
        out.append(p[0] + c * step)
    return out


def _scaled_boxes(lab: np.ndarray, n: int) -> dict:
    from scipy import ndimage

    return {k: (sl[0].start, sl[1].start, sl[2].start, sl[0].stop, sl[1].stop, sl[2].stop)
            for k, sl in enumerate(ndimage.find_objects(lab, max_label=n), start=1) if sl is not None}


class ShardDataset:
    """Random access to preprocessed cases by case id and anatomy.

    Args:
        root: a directory written by ``fvlm preprocess`` (holds ``dataset.json``,
            ``index.jsonl`` and ``shards/``).
        split: keep only cases of this split (``"train"``, ``"valid"``, ...), or None.

    File handles are opened lazily and per process (after a fork, a worker opens its own),
    so an instance can be handed to DataLoader workers (fork or spawn). ``len(ds)`` and
    ``ds[i]`` make it a map-style dataset of :class:`CaseRecord`.
    """

    #: cut many crops from one in-memory read when they cover more than this share of the volume
    WHOLE_READ_FRACTION = 0.4

    def __init__(self, root: str | os.PathLike, split: str | None = None):
        self.root = Path(root)
        self.info = read_dataset_info(self.root)
        self.layout = layout_of(self.info, self.root / DATASET_INFO_NAME)
        idx = self.root / INDEX_NAME
        if not idx.is_file():
            parts = sorted(self.root.glob("index-*.jsonl"))
            hint = (f"; {len(parts)} partial index files found: run `fvlm preprocess merge {self.root}`"
                    if parts else "")
            raise FormatError(f"{self.root}: no {INDEX_NAME}{hint}")
        rows = read_index(idx)
        check_index_rows(rows, self.root, idx)
        if split is not None:
            rows = [r for r in rows if r.get("split") == split]
        self._rows = rows
        self._by_id = {r["case_id"]: r for r in rows}
        self._files: dict = {}
        self._n: dict = {}
        self._checked: set = set()
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
        if self._pid != os.getpid():  # never share HDF5 handles across fork
            self._files = {}
            self._pid = os.getpid()
        f = self._files.get(rel)
        if f is None:
            p = self.root / rel
            try:
                # a small chunk cache: one crop's chunks are read once each, volumes are read whole
                f = open_h5(p, "r", rdcc_nbytes=0)
            except OSError as e:
                raise FormatError(f"{p}: cannot open shard ({e})") from None
            try:
                self._n[rel] = check_shard_structure(f, p, len(self.anatomies))
            except BaseException:
                f.close()
                raise
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

    def _open_row(self, case_id: str):
        r = self.index_row(case_id)
        f = self._file(r["shard"])
        i = int(r["row"])
        if i >= self._n[r["shard"]]:
            raise FormatError(f"{self.root / INDEX_NAME}: case {case_id!r} points at row {i} of {r['shard']}, "
                              f"which holds {self._n[r['shard']]} cases (index and shards disagree)")
        stored_id = f["case_id"][i]
        stored_id = stored_id.decode() if isinstance(stored_id, bytes) else stored_id
        if stored_id != case_id:
            raise FormatError(f"{self.root / r['shard']}: row {i} holds {stored_id!r}, index says {case_id!r} "
                              "(index and shards disagree; re-run `fvlm preprocess merge`)")
        return r, f, i

    def _crops(self, vol, lab, anats: Sequence[str], bb: np.ndarray, present: dict,
               size: Sequence[int] | None = None) -> tuple[dict, dict]:
        """Cut the crops of ``anats``: from one in-memory read when they cover much of the
        volume, else each from its own hyperslab; ``size``: resized while cut (see ``get``)."""
        L = self.layout
        shape = vol.shape
        all_anats = self.anatomies
        plans = {}
        for a in anats:
            j = all_anats.index(a)
            if present[a]:
                plans[a] = (j + 1, *crop_positions(bb[j], L.spacing_mm, L.crop_shapes[a], L.margin(a),
                                                   L.crop_oversize))
        if len(plans) > 1:
            touched = sum(float(np.prod([min(n, max(0.0, p.max() - p.min() + 2)) for p, n in zip(pos, shape)]))
                          for _, pos, _ in plans.values())
            if touched > self.WHOLE_READ_FRACTION * float(np.prod(shape)):
                vol, lab = np.asarray(vol[()]), np.asarray(lab[()])
        crops, masks = {}, {}
        for a in anats:
            cs = tuple(int(x) for x in L.crop_shapes[a])
            if a in plans and size is not None:
                label, pos, scale = plans[a]
                q = resized_positions(pos, size)
                crops[a] = cut(vol, q, linear=True, pad=AIR_HU, shape=shape)
                masks[a] = (cut(lab, q, linear=False, pad=0, shape=shape) == label).view(np.uint8)
            elif a in plans:
                label, pos, scale = plans[a]
                crops[a], masks[a] = cut_crop(vol, lab, label, pos, scale, shape=shape)
            elif size is not None:
                crops[a], masks[a] = np.full(tuple(size), AIR_HU, np.float32), np.zeros(tuple(size), np.uint8)
            else:  # absent anatomy: the padding value, as if cut outside the scan
                crops[a], masks[a] = np.full(cs, AIR_HU, np.int16), np.zeros(cs, np.uint8)
        return crops, masks

    def _whole(self, vol, lab, bb: np.ndarray, present: dict):
        """Volume-mode ``(volume, label_map, bbox)``, cut (and resampled when the whole spacing
        differs from the stored one) at read time."""
        L = self.layout
        boxes = {a: (tuple(int(v) for v in bb[j]) if present[a] else None) for j, a in enumerate(self.anatomies)}
        if not L.whole_shape:  # preprocessed with whole.enabled=false: no volume-mode input
            return None, None, boxes
        wsp = L.whole_spacing_mm or L.spacing_mm
        pos, off = whole_positions(vol.shape, L.spacing_mm, wsp, L.whole_shape)
        same = all(abs(a - b) < 1e-9 for a, b in zip(wsp, L.spacing_mm))
        v = cut(vol, pos, linear=not same, pad=AIR_HU, out_dtype=np.int16)
        m = cut(lab, pos, linear=False, pad=0)
        if same:
            boxes = {a: (None if b is None else tuple(int(x + off[k % 3]) for k, x in enumerate(b)))
                     for a, b in boxes.items()}
        else:
            found = _scaled_boxes(m, len(self.anatomies))
            boxes = {a: (found.get(j + 1) if present[a] else None) for j, a in enumerate(self.anatomies)}
        return v, m, boxes

    def crop(self, case_id: str, anatomy: str) -> tuple[np.ndarray, np.ndarray, bool]:
        """``(crop int16 [x, y, z], mask uint8 [x, y, z], present)`` of one anatomy of one case,
        cut from the hyperslab of the stored volume it covers."""
        self._check_anatomies([anatomy])
        r, f, i = self._open_row(case_id)
        j = self.anatomies.index(anatomy)
        present = {a: False for a in self.anatomies}
        present[anatomy] = bool(f["present"][i][j])
        vol, lab, bb = self._case_arrays(r, f, i, case_id)
        crops, masks = self._crops(vol, lab, [anatomy], bb, present)
        return crops[anatomy], masks[anatomy], present[anatomy]

    def _case_arrays(self, r: dict, f, i: int, case_id: str):
        """``(volume, label_map, bbox)`` of row ``i``: datasets present with the layout's dtypes,
        their shapes, spacing and boxes checked."""
        p = self.root / r["shard"]
        vol = _case_image(f, "volume", i, p, case_id, "i2")
        lab = _case_image(f, "label_map", i, p, case_id, "u1")
        bb = f["bbox"][i]
        key = (r["shard"], i)
        if key not in self._checked:  # the small per-case reads once per process, not at every epoch
            _check_case_values(p, case_id, vol, lab, f["spacing_mm"][i], bb, f["present"][i])
            self._checked.add(key)
        return vol, lab, bb

    def stored(self, case_id: str):
        """``(volume, label_map)`` of a case as stored (int16 HU, uint8 ids on the ``spacing_mm``
        grid), as sliceable ``h5py.Dataset`` s: the sample path reads one hyperslab of them.
        Checked like :meth:`get` (dtypes, shapes, spacing, boxes); the label ids of every
        hyperslab read are checked against the anatomy count."""
        r, f, i = self._open_row(case_id)
        vol, lab, _ = self._case_arrays(r, f, i, case_id)
        return vol, _CheckedLabels(lab, self.root / r["shard"], case_id, len(self.anatomies))

    #: ``get`` takes ``crop_size`` (readers check this before passing it)
    resizes_on_read = True

    def get(self, case_id: str, anatomies: Sequence[str] | None = None, volume: bool = True,
            crops: bool = True, crop_size: Sequence[int] | None = None) -> CaseRecord:
        """Read one case. ``anatomies`` limits the crops cut (default all); ``volume`` gives the
        volume-mode volume and label map; ``crops`` the per-anatomy crops and masks.

        ``crop_size`` (x, y, z): every crop comes resized to it in the same cut (float32 HU,
        sampled where ``F.interpolate(..., mode="trilinear", align_corners=False)`` of the
        full crop would sample, straight from the stored volume; masks nearest): the
        crop-mode model input without materialising the full-size crop."""
        anats = self._check_anatomies(anatomies)
        r, f, i = self._open_row(case_id)

        def js(name):
            v = f[name][i]
            try:
                d = json.loads(v.decode() if isinstance(v, bytes) else v)
            except (UnicodeDecodeError, ValueError):
                d = None
            if not isinstance(d, dict):
                raise FormatError(f"{self.root / r['shard']}: case {case_id!r}: '{name}' is not a JSON object")
            return d

        vol, lab, bb = self._case_arrays(r, f, i, case_id)
        present_row = f["present"][i]
        all_anats = self.anatomies
        present = {a: bool(present_row[j]) for j, a in enumerate(all_anats)}
        bbox = {a: (tuple(int(v) for v in bb[j]) if present[a] else None) for j, a in enumerate(all_anats)}
        L = self.layout
        spacing = tuple(float(s) for s in (L.whole_spacing_mm or f["spacing_mm"][i])) if L.whole_shape else \
            tuple(float(s) for s in f["spacing_mm"][i])
        rec = CaseRecord(case_id=case_id, patient_id=r.get("patient_id", ""), split=r.get("split", ""),
                         spacing_mm=spacing, present=present,
                         report=js("report"), anatomy_text=js("anatomy_text"), labels=js("labels"),
                         meta=js("meta"), bbox=bbox)
        return self._cut(rec, vol, lab, bb, anats, volume, crops, crop_size)

    def _cut(self, rec: CaseRecord, vol, lab, bb, anats, volume: bool, crops: bool, crop_size) -> CaseRecord:
        if volume:
            rec.volume, rec.label_map, rec.bbox = self._whole(vol, lab, bb, rec.present)
            _check_labels(self.root, rec.case_id, rec.label_map, len(self.anatomies))
        if crops:
            rec.crops, rec.crop_masks = self._crops(vol, lab, anats, bb, rec.present,
                                                    None if crop_size is None else tuple(int(x) for x in crop_size))
        return rec


class InMemoryCase(ShardDataset):
    """A one-case reader of a record as written (``preprocess.writer.case_record``): gives the
    record ``ShardDataset.get`` would give after writing and reading it, without a file (the
    single-scan path of ``fvlm predict`` and the Python API, so they see what training saw)."""

    def __init__(self, rec: CaseRecord, layout: ShardLayout):
        self.layout, self.info, self._rec = layout, {"layout": layout.to_dict()}, rec
        self._rows = [{"case_id": rec.case_id, "patient_id": rec.patient_id, "split": rec.split}]
        self._by_id = {rec.case_id: self._rows[0]}
        self._files, self._pid, self.root = {}, None, Path(".")

    def get(self, case_id: str | None = None, anatomies: Sequence[str] | None = None, volume: bool = True,
            crops: bool = True, crop_size: Sequence[int] | None = None) -> CaseRecord:
        w = self._rec
        A = self.anatomies
        bb = np.full((len(A), 6), -1, np.int64)
        for j, a in enumerate(A):
            if w.present.get(a) and w.bbox.get(a) is not None:
                bb[j] = w.bbox[a]
        present = {a: bool(w.present.get(a)) for a in A}
        L = self.layout
        spacing = tuple(L.whole_spacing_mm or L.spacing_mm) if L.whole_shape else tuple(L.spacing_mm)
        rec = CaseRecord(case_id=w.case_id, patient_id=w.patient_id, split=w.split, spacing_mm=spacing,
                         present=present, report=dict(w.report), anatomy_text=dict(w.anatomy_text),
                         labels=dict(w.labels), meta=dict(w.meta),
                         bbox={a: (tuple(int(v) for v in bb[j]) if present[a] else None) for j, a in enumerate(A)})
        rec = self._cut(rec, w.volume, w.label_map, bb, self._check_anatomies(anatomies), volume, crops, crop_size)
        rec.stored = (w.volume, w.label_map, L, {a: (tuple(int(v) for v in bb[j]) if present[a] else None)
                                                  for j, a in enumerate(A)})
        return rec

    def stored(self, case_id: str | None = None):
        return self._rec.volume, self._rec.label_map
