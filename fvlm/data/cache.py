"""The model-input cache: every case of a shards directory already sampled to one model's input grid.

A GPU consumes a ViT-B/3D sample in about 3 ms; decoding a stored v2 volume alone takes tens of
ms of a core (FORMATS.md §2). So, as fVLM does offline, ``fvlm cache`` samples each case once to
the model's grid (the same :func:`fvlm.data.inputs.sample_case` as training, in HU) and stores it
uncompressed, packed for the host-to-device copy:

- ``volume.npy`` int16 ``(N, *volume_size)`` HU and ``labels.npy`` uint8 ``(N, prod(volume_size) / 2)``,
  two 4-bit source label ids per byte (anatomy sets of at most 15 anatomies);
- ``crops.npy`` int16 ``(N, A, *crop_size)`` HU, ``masks.npy`` uint8 ``(N, A, prod(crop_size) / 8)``
  (bits, ``np.packbits`` order) and ``present.npy`` bool ``(N, A)``;
- ``meta.bin`` / ``meta.offsets``: each case's metadata (report, texts, labels, present) as JSON, so
  a worker reading the cache never opens a shard;
- ``cache.json``: format ``fvlm-input-cache`` version 1, the ``key`` options, ``case_ids`` (row order)
  and ``complete``.

A loader worker then copies one row of memory-mapped arrays into shared memory (no decode, no
float); unpacking, windowing and masks run in the device stage. The directory is
``<shards>/cache/<key>``, ``key`` a hash of what the sampled voxels depend on (sizes, anatomies,
anti-aliasing, the shard layout): training uses it only when it matches (``data.cache``).
Values are rounded to whole HU (at most 0.5 HU from the uncached input; the default window is
1,500 HU wide). Building is resumable: rows are flushed in blocks and ``progress`` records them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import FormatError, FvlmError, check_format
from ..progress import progress
from .inputs import _shared_tensor, regions_of, sample_case
from .shards import CaseRecord

__all__ = ["cache_key", "cache_dir", "build_cache", "CachedShards", "open_cache", "CACHE_FORMAT", "CACHE_VERSION"]

CACHE_FORMAT = "fvlm-input-cache"
CACHE_VERSION = 2   # 2: volume-mode voxels of scans larger than the whole grid (air at the far end in 1)
INFO = "cache.json"
_FLUSH_EVERY = 32


def key_options(opts, layout, source_anatomies: Sequence[str]) -> dict:
    """What the cached voxels depend on (windows, texts and diagnoses do not change them)."""
    return {"volume_size": list(opts.volume_size) if opts.volume_size is not None else None,
            "crop_size": list(opts.crop_size) if opts.crop_size is not None else None,
            "anatomies": list(opts.anatomies) if opts.crop_size is not None else [],
            "antialias": bool(getattr(opts, "antialias", False)),
            "layout": {k: v for k, v in layout.to_dict().items()
                       if k not in ("compression", "compression_level", "shuffle", "chunk_shape")},
            "source_anatomies": list(source_anatomies), "version": CACHE_VERSION}


def cache_key(opts, layout, source_anatomies: Sequence[str]) -> str:
    blob = json.dumps(key_options(opts, layout, source_anatomies), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cache_dir(shards_root, opts, layout, source_anatomies) -> Path:
    return Path(shards_root) / "cache" / cache_key(opts, layout, source_anatomies)


def _pack4(x: np.ndarray) -> np.ndarray:
    f = x.reshape(-1)
    return (f[0::2] | (f[1::2] << 4)).astype(np.uint8)


def _arrays(d: Path, n: int, opts, A: int, mode: str) -> dict:
    from numpy.lib.format import open_memmap

    spec = {}
    if opts.volume_size is not None:
        nv = int(np.prod(opts.volume_size))
        if nv % 2:
            raise FvlmError(f"cache: volume_size {opts.volume_size} has an odd voxel count (labels are packed 2 per byte)")
        spec.update(volume=(np.int16, (n, *opts.volume_size)), labels=(np.uint8, (n, nv // 2)))
    if opts.crop_size is not None:
        nc = int(np.prod(opts.crop_size))
        spec.update(crops=(np.int16, (n, A, *opts.crop_size)), masks=(np.uint8, (n, A, (nc + 7) // 8)),
                    present=(np.bool_, (n, A)))
    return {k: open_memmap(d / f"{k}.npy", mode=mode, dtype=dt, shape=shp) for k, (dt, shp) in spec.items()}


def build_cache(ds, opts, out: str | os.PathLike | None = None) -> Path:
    """Sample every case of ``ds`` (a ``ShardDataset``) to ``opts``' input grid into ``out``
    (default ``<shards>/cache/<key>``). Resumes a half-built cache with the same key."""
    src = list(ds.anatomies)
    if opts.volume_size is not None and len(src) > 15:
        raise FvlmError(f"cache: {len(src)} anatomies do not fit 4-bit label maps (at most 15)")
    key = key_options(opts, ds.layout, src)
    d = Path(out) if out is not None else cache_dir(ds.root, opts, ds.layout, src)
    ids = ds.case_ids()
    if not ids:
        raise FvlmError(f"cache: {ds.root} has no cases")
    info_p = d / INFO
    start = 0
    if info_p.is_file():
        info = _read_info(d)
        if info["key"] != json.loads(json.dumps(key)) or info["case_ids"] != ids:
            raise FvlmError(f"cache: {d} holds another model input or other cases; remove it or pick another --out")
        if info["complete"]:
            return d
        start = int(info.get("progress", 0))
    d.mkdir(parents=True, exist_ok=True)
    arrays = _arrays(d, len(ids), opts, len(opts.anatomies), "r+" if start else "w+")
    info = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key, "case_ids": ids,
            "complete": False, "progress": start}
    _write_info(d, info)
    bar = progress(total=len(ids), initial=start, desc="cache", unit="case")
    with torch.inference_mode():
        for i in range(start, len(ids)):
            rec = ds.get(ids[i], volume=False, crops=False)
            raw = regions_of(rec, opts, opts.anatomies, src, (*ds.stored(ids[i]), ds.layout, rec.bbox))
            s = sample_case(raw, opts, opts.anatomies)
            if "volume" in arrays:
                arrays["volume"][i] = _hu16(s["volume"])
                arrays["labels"][i] = _pack4(s["label_map"].numpy())
            if "crops" in arrays:
                arrays["crops"][i] = _hu16(s["crops"])
                arrays["masks"][i] = np.packbits(s["crop_masks"].numpy().reshape(len(opts.anatomies), -1), axis=1)
                arrays["present"][i] = s["crop_present"].numpy()
            if (i + 1) % _FLUSH_EVERY == 0 or i + 1 == len(ids):
                for a in arrays.values():
                    a.flush()
                info["progress"] = i + 1
                _write_info(d, info)
            bar.update(1)
    bar.close()
    _write_meta(ds, ids, d)
    info["complete"] = True
    _write_info(d, info)
    return d


#: the case metadata a batch's text fields need, so a worker reading the cache never opens a shard
META_FIELDS = ("case_id", "patient_id", "split", "present", "report", "anatomy_text", "labels")


def _write_meta(ds, ids, d: Path) -> None:
    """``meta.bin``: one UTF-8 JSON object per case (``META_FIELDS``), ``meta.offsets``: int64 (N + 1)."""
    offsets, parts, pos = [0], [], 0
    for cid in ids:
        rec = ds.get(cid, volume=False, crops=False)
        b = json.dumps({k: getattr(rec, k) for k in META_FIELDS}, ensure_ascii=False).encode("utf-8")
        parts.append(b)
        pos += len(b)
        offsets.append(pos)
    (d / "meta.bin").write_bytes(b"".join(parts))
    with open(d / "meta.offsets", "wb") as f:
        np.save(f, np.asarray(offsets, np.int64))


def _hu16(x) -> np.ndarray:
    return np.clip(np.rint(x.numpy()), -32768, 32767).astype(np.int16)


def _write_info(d: Path, info: dict) -> None:
    tmp = d / (INFO + ".tmp")
    tmp.write_text(json.dumps(info), encoding="utf-8")
    os.replace(tmp, d / INFO)


def _read_info(d: Path) -> dict:
    try:
        info = json.loads((d / INFO).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{d / INFO}: unreadable ({str(e).splitlines()[0]})") from None
    return check_format(info, CACHE_FORMAT, CACHE_VERSION, d / INFO, what=f"an {CACHE_FORMAT} file",
                        version_hint="; rebuild it with `fvlm cache`")


class CachedShards:
    """A ``ShardDataset`` whose image voxels come from a complete cache (metadata from the shards).

    ``cached(case_id)`` is the host stage: one row of each array copied into shared-memory tensors
    (the only copy a loader worker makes; the DataLoader then passes them by handle)."""

    def __init__(self, ds, d: str | os.PathLike, opts):
        self.ds, self.dir = ds, Path(d)
        info = _read_info(self.dir)
        if not info.get("complete"):
            raise FormatError(f"{self.dir}: the cache is incomplete; run `fvlm cache` again to finish it")
        want = json.loads(json.dumps(key_options(opts, ds.layout, list(ds.anatomies))))
        if info["key"] != want:
            raise FvlmError(f"{self.dir}: cached for another model input than this run's "
                            "(sizes, anatomies, antialias or shard layout differ)")
        self.row = {c: i for i, c in enumerate(info["case_ids"])}
        self._mm = self._meta = None
        self.anatomies, self.root = ds.anatomies, ds.root

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_mm"] = d["_meta"] = None
        return d

    def _arrays(self) -> dict:
        """name -> (file descriptor, header offset, row shape, dtype), opened once per process."""
        if self._mm is None or self._mm[0] != os.getpid():
            files = {}
            for p in sorted(self.dir.glob("*.npy")):
                a = np.load(p, mmap_mode="r")
                files[p.stem] = (os.open(p, os.O_RDONLY), int(a.offset), a.shape[1:], a.dtype)
                del a
            self._mm = (os.getpid(), files)
        return self._mm[1]

    def case_ids(self, split: str | None = None) -> list[str]:
        return self.ds.case_ids(split)

    def get(self, case_id: str, anatomies=None, volume: bool = True, crops: bool = True, **kw):
        """Metadata only (``volume=False, crops=False``, what the sample path asks for) comes from the
        cache's ``meta.bin``; anything else from the shards."""
        if volume or crops or case_id not in self.row:
            return self.ds.get(case_id, anatomies=anatomies, volume=volume, crops=crops, **kw)
        if self._meta is None or self._meta[0] != os.getpid():
            with open(self.dir / "meta.offsets", "rb") as f:
                self._meta = (os.getpid(), np.load(f), os.open(self.dir / "meta.bin", os.O_RDONLY))
        _, off, fd = self._meta
        i = self.row[case_id]
        d = json.loads(os.pread(fd, int(off[i + 1] - off[i]), int(off[i])).decode("utf-8"))
        return CaseRecord(**d)

    def cached(self, case_id: str) -> dict:
        """One case's rows, read (``pread``, one kernel copy from the page cache) straight into
        tensors in shared memory, which a DataLoader hands to the main process without copying."""
        if case_id not in self.row:
            raise FvlmError(f"case {case_id!r} is not in the cache {self.dir} (rebuild it with `fvlm cache`)")
        i = self.row[case_id]
        out = {"cached": True}
        for k, (fd, offset, shape, dtype) in self._arrays().items():
            nbytes = int(np.prod(shape)) * dtype.itemsize
            t = _shared_tensor(shape, dtype)
            buf = memoryview(t.numpy()).cast("B")
            got = os.preadv(fd, [buf], offset + i * nbytes)
            if got != nbytes:
                raise FormatError(f"{self.dir / (k + '.npy')}: truncated at case {case_id!r}; rebuild the cache")
            out[k] = t
        return out


def open_cache(ds, opts, setting: str):
    """``data.cache``: ``auto`` (use ``<shards>/cache/<key>`` when complete), ``off``, or a cache folder."""
    if setting == "off" or not hasattr(ds, "stored"):
        return ds
    if setting == "auto":
        d = cache_dir(ds.root, opts, ds.layout, list(ds.anatomies))
        if not (d / INFO).is_file():
            return ds
        try:
            return CachedShards(ds, d, opts)
        except (FormatError, FvlmError):
            return ds
    return CachedShards(ds, setting, opts)
