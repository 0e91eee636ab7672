"""The one sample path: a host stage that only reads, and a device stage that builds the model input.

Every CT model input (training, validation, ``fvlm zeroshot``, ``fvlm embed``, ``fvlm predict``,
``fvlm.load().embed``) is made by the same two functions:

1. :func:`read_regions` (in a DataLoader worker): the int16 HU and uint8 label voxels a sample
   needs, at the stored resolution, as they are stored (one hyperslab of the stored volume; no
   float conversion, no resampling), plus a *plan*: for every output (the fitted volume, its
   label map, each anatomy crop and mask) and every axis, which box voxels are mixed with which
   weights (:func:`fvlm.data.sampling.axis_taps`). Plans are a few kB of numpy arrays.
2. :func:`build_inputs` (on the model's device, batched inside the step): separable resampling of
   the boxes by those plans (``index_select`` + weighted sums, shrinking axis first), windowing,
   label remapping and crop masks; then augmentation. On a CPU run the same code runs on the CPU.

The output is the batch the model reads (keys ``volume``, ``label_map``, ``crops``,
``crop_masks``; table in :mod:`fvlm.data.ct`). Because train and eval call the same functions
with the same plan, a training batch with augmentation and text sampling off equals the
evaluation batch bitwise on one device (``tests/test_sample_path.py``).

Geometry, per output voxel, as a position on the stored grid (one resampling, not two):

- volume mode: the stored volume resampled to ``whole_spacing_mm`` and centred in
  ``whole_shape`` (:func:`fvlm.data.shards.whole_positions`), fitted into ``volume_size``
  with one zoom factor (:func:`fit_size`, ``align_corners=False`` positions) and air-padded;
- crop mode: the anatomy crop of the crop policy (:func:`fvlm.data.crop.crop_positions`)
  resized to ``crop_size`` (:func:`fvlm.data.shards.resized_positions`).

Images are linear (or area-averaged with ``antialias`` where an axis shrinks more than 1.5x),
label maps and masks nearest; positions outside the scan get air (``AIR_HU``) / background.
Sources without stored arrays (records already cut, the synthetic generator) take the record
path: their arrays are the boxes and only the fit/resize is planned.

The dense programs (``fvlm dense train|eval|ground``) read whole volumes on their own grid, not a
fitted model input: :func:`read_whole` (a shard case: its volume-mode grid, optionally at another
spacing) and :func:`grid_regions` (a volume in memory: a NIfTI image, a DICOM series) make the host
stage's output for that grid, and :func:`build_inputs` windows and relabels it as for every other
input (``volume_size`` = ``raw["shape"]``). Their crops and sliding windows are cuts of that one
volume, so the training crop of a case is the evaluation input's voxels, bitwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import FvlmError
from .crop import AIR_HU, crop_positions
from .sampling import axis_taps
from .shards import resized_positions, whole_positions, window

__all__ = ["read_regions", "regions_of", "sample_case", "build_inputs", "augment_batch", "fit_size", "fit_positions",
           "spacing_positions", "read_whole", "grid_regions", "sample_labels", "Plan", "RAW_KEY"]

#: batch key holding the host stage's output (removed by :func:`build_inputs`)
RAW_KEY = "raw"


def fit_size(shape: Sequence[int], size: Sequence[int]) -> tuple[list[int], list[int]]:
    """Aspect-keeping fit of a ``shape`` grid into ``size``: one zoom factor on every axis
    (the largest ``shape / size``), so voxels keep their proportions. Returns ``(resized,
    before)``: the resized shape and the padding before it per axis (the rest goes after)."""
    f = max(float(n) / float(m) for n, m in zip(shape, size))
    resized = [min(int(m), max(1, int(round(n / f)))) for n, m in zip(shape, size)]
    return resized, [(int(m) - r) // 2 for m, r in zip(size, resized)]


def fit_positions(shape: Sequence[int], size: Sequence[int]) -> tuple[list[np.ndarray], list[float]]:
    """Per axis, the positions on a ``shape`` grid of the ``size`` voxels of its aspect-keeping fit
    (``F.interpolate(align_corners=False)`` positions, clamped; padding voxels at ``-1``), and the step."""
    resized, before = fit_size(shape, size)
    pos, steps = [], []
    for n, m, r, b in zip(shape, size, resized, before):
        j = np.arange(int(m), dtype=np.float64) - b
        p = np.clip((j + 0.5) * n / r - 0.5, 0.0, n - 1.0)
        pos.append(np.where((j < 0) | (j >= r), -1.0, p))
        steps.append(float(n) / float(r))
    return pos, steps


def spacing_positions(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]
                      ) -> tuple[list[np.ndarray], list[float]]:
    """Per axis, the positions on a ``shape`` grid at ``spacing`` of the voxels of its resampling to
    ``target`` spacing (MONAI's ``Spacing`` grid, voxel 0 kept: :func:`whole_positions` without padding), and the step."""
    n_out = []
    for n, si, so in zip(shape, spacing, target):
        r = float(so) / float(si)
        n_out.append(int(n) if abs(r - 1.0) < 1e-9 else max(1, int(np.round((int(n) - 1) / r + 1.0))))
    pos, _ = whole_positions(shape, spacing, target, n_out)
    return pos, [float(so) / float(si) for si, so in zip(spacing, target)]


@dataclass
class Plan:
    """How one output is sampled from box ``box`` of its sample: per axis ``(idx, w, outside)``
    (:func:`fvlm.data.sampling.axis_taps`, indices relative to the box), the axis order (shrinking
    first), ``linear``, the padding value and (masks) the label to compare with."""
    box: int
    taps: list
    order: list
    linear: bool
    pad: float
    label: int | None = None
    sub: list | None = None       # (lo, hi) per axis of the box this output reads (None: all of it)


def _plan(positions, steps, shape, linear: bool, antialias: bool, pad: float, label=None) -> Plan:
    taps = [axis_taps(p, int(n), linear, s, antialias) for p, s, n in zip(positions, steps, shape)]
    order = sorted(range(3), key=lambda i: len(positions[i]) / max(1, shape[i]))
    return Plan(0, taps, order, linear, pad, label)


def _shift(plans: list[Plan], box: Sequence[slice]) -> None:
    """Indices relative to ``box`` (taps outside it, at padding positions or with zero weight, clamped
    into it), then to each plan's own sub-box, so the device stage converts only what it samples."""
    for pl in plans:
        taps = [(np.clip(idx - b.start, 0, b.stop - b.start - 1), w, out) for (idx, w, out), b in zip(pl.taps, box)]
        pl.sub = [(int(idx.min()), int(idx.max()) + 1) for idx, _, _ in taps]
        pl.taps = [(idx - lo, w, out) for (idx, w, out), (lo, _) in zip(taps, pl.sub)]


def _box_of(plans: list[Plan]) -> list[slice]:
    """The box of stored voxels every plan touches (outside positions read nothing)."""
    lo, hi = [None] * 3, [None] * 3
    for pl in plans:
        for ax, (idx, w, out) in enumerate(pl.taps):
            used = idx[~out][w[~out] > 0] if idx.shape[1] > 1 else idx[~out, 0]
            if used.size:
                a, b = int(used.min()), int(used.max()) + 1
                lo[ax] = a if lo[ax] is None else min(lo[ax], a)
                hi[ax] = b if hi[ax] is None else max(hi[ax], b)
    return [slice(a or 0, b if b is not None else 1) for a, b in zip(lo, hi)]


def _volume_positions(layout, shape, volume_size, spacing=None) -> tuple[list[np.ndarray], list[float]]:
    """Stored-grid positions of the ``volume_size`` voxels: whole grid, then its fit (composed).
    ``spacing`` instead of ``volume_size``: the whole grid resampled to that spacing (dense programs)."""
    wsp = layout.whole_spacing_mm or layout.spacing_mm
    W = [int(w) for w in layout.whole_shape]
    _, off = whole_positions(shape, layout.spacing_mm, wsp, W)
    fpos, fsteps = fit_positions(W, volume_size) if spacing is None else spacing_positions(W, wsp, spacing)
    pos, steps = [], []
    for ax in range(3):
        r = float(wsp[ax]) / float(layout.spacing_mm[ax])
        g = fpos[ax]
        # the stored volume resampled to the whole spacing spans whole-grid voxels off .. off + n_out - 1
        # (whole_positions' extent; larger than the whole grid where it is cropped, not padded)
        n = int(shape[ax])
        n_out = n if abs(r - 1.0) < 1e-9 else max(1, int(np.round((n - 1) / r + 1.0)))
        inside = (g >= 0) & (g >= off[ax] - 0.5) & (g <= off[ax] + n_out - 0.5)
        p = np.clip((g - off[ax]) * r, 0.0, shape[ax] - 1.0)
        pos.append(np.where(inside, p, -1.0))
        steps.append(r * fsteps[ax])
    return pos, steps


def _crop_positions(layout, bbox, anatomy, crop_size) -> tuple[list[np.ndarray], list[float]]:
    cs = [int(x) for x in layout.crop_shapes[anatomy]]
    pos, scale = crop_positions(bbox, layout.spacing_mm, cs, layout.margin(anatomy), layout.crop_oversize)
    return resized_positions(pos, crop_size), [scale * n / float(m) for n, m in zip(cs, crop_size)]


def read_regions(source, case_id: str, opts, anatomies: Sequence[str], source_anatomies: Sequence[str]):
    """Host stage of one case: ``(record, raw)`` (see :func:`regions_of`). A source with stored
    arrays (``ShardDataset``: ``stored(case_id)`` and a ``layout``) gives its metadata without
    arrays and one hyperslab of the stored grid; any other source (``get`` -> a cut record) is
    planned on the record's own arrays."""
    cached = getattr(source, "cached", None)
    if callable(cached):          # fvlm.data.cache: already on the model's grid, packed
        rec = source.get(case_id, volume=False, crops=False)
        raw = cached(case_id)
        raw["lut"] = _lut(anatomies, source_anatomies)
        return rec, raw
    stored = getattr(source, "stored", None)
    layout = getattr(source, "layout", None)
    if callable(stored) and layout is not None and (opts.volume_size is None or layout.whole_shape):
        rec = source.get(case_id, volume=False, crops=False)
        return rec, regions_of(rec, opts, anatomies, source_anatomies, (*stored(case_id), layout, rec.bbox))
    want_crops = opts.crop_size is not None
    rec = source.get(case_id, **({"anatomies": list(anatomies)} if want_crops else {}),
                     volume=opts.volume_size is not None, crops=want_crops)
    return rec, regions_of(rec, opts, anatomies, source_anatomies)


def _whole_raw(vol, lab, pos, steps, antialias: bool) -> dict:
    """The host stage's output for one whole-volume output at ``pos`` on ``vol``'s grid: one box read."""
    shape = tuple(int(s) for s in vol.shape)
    pv = _plan(pos, steps, shape, True, antialias, AIR_HU)
    pl = _plan(pos, steps, shape, False, False, 0)
    box = _box_of([pv, pl])
    _shift([pv, pl], box)
    if lab is None:
        lab = np.zeros([b.stop - b.start for b in box], np.uint8)
        lab_box = torch.from_numpy(lab)
    else:
        lab_box = _read_box(lab, box, np.uint8)
    return {"volume": pv, "label_map": pl, "crops": [], "masks": [], "box": box, "shape": [len(p) for p in pos],
            "boxes": [(_read_box(vol, box, np.int16), lab_box)]}


def read_whole(source, case_id: str, anatomies: Sequence[str], source_anatomies: Sequence[str],
               spacing: Sequence[float] | None = None, antialias: bool = False):
    """Host stage of a dense program's shard case: ``(record, raw)`` of its volume-mode grid
    (``whole_shape`` at ``whole_spacing_mm``; with ``spacing``, that grid resampled to it), one
    hyperslab of the stored volume. ``raw["shape"]`` is the output shape; without ``spacing`` the
    plan is :func:`read_regions`'s for ``volume_size = whole_shape`` (the fit is the identity)."""
    layout = source.layout
    if not layout.whole_shape:
        raise FvlmError(f"case {case_id}: the shards hold no whole volumes (preprocessed with whole.enabled=false)")
    rec = source.get(case_id, volume=False, crops=False)
    vol, lab = source.stored(case_id)
    shape = tuple(int(s) for s in vol.shape)
    W = [int(w) for w in layout.whole_shape]
    pos, steps = _volume_positions(layout, shape, W if spacing is None else None, spacing)
    raw = _whole_raw(vol, lab, pos, steps, antialias)
    raw["lut"] = _lut(anatomies, source_anatomies)
    return rec, raw


def grid_regions(volume, label_map, spacing: Sequence[float], target: Sequence[float] | None = None,
                 lut: np.ndarray | None = None, antialias: bool = False) -> dict:
    """Host stage of a volume in memory (int16 HU, ``label_map`` uint8 source ids or None) at
    ``spacing``: the whole volume, resampled to ``target`` spacing when given (:func:`spacing_positions`).
    ``lut`` (256,) maps its label ids to the model's (default: identity)."""
    shape = tuple(int(s) for s in volume.shape)
    if target is None or np.allclose(np.asarray(target, float), np.asarray(spacing, float), atol=1e-6):
        pos, steps = [np.arange(n, dtype=np.float64) for n in shape], [1.0, 1.0, 1.0]
    else:
        pos, steps = spacing_positions(shape, spacing, target)
    raw = _whole_raw(volume, label_map, pos, steps, antialias)
    raw["lut"] = np.arange(256, dtype=np.uint8) if lut is None else np.asarray(lut, np.uint8)
    return raw


def sample_labels(raw: dict, labels) -> np.ndarray:
    """Another label volume on the grid ``raw`` was planned on (e.g. lesion ids), sampled where its
    label map is (nearest; uint8 numpy, CPU)."""
    box = tuple(raw["box"])
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(labels[box]), dtype=np.uint8))
    return _resample(x, raw["label_map"], torch.device("cpu")).numpy()


def _lut(anatomies: Sequence[str], source_anatomies: Sequence[str]) -> np.ndarray:
    """Source label id -> model label id (``i + 1`` = ``anatomies[i]``; 0 for anatomies not modelled)."""
    lut = np.zeros(256, np.uint8)
    for j, a in enumerate(source_anatomies):
        if a in anatomies:
            lut[j + 1] = list(anatomies).index(a) + 1
    return lut


def regions_of(rec, opts, anatomies: Sequence[str], source_anatomies: Sequence[str], stored=None) -> dict:
    """The host stage's output for one case: ``{"boxes": [(int16 HU, uint8 labels) tensors],
    "volume"/"label_map": Plan | None, "crops"/"masks": [Plan | None] * A, "lut": uint8 (256,)}``.

    ``stored`` = ``(volume, label_map, layout, bbox)`` on the stored grid (sliceable: numpy or h5py;
    also ``rec.stored`` of a one-case reader's record): plans on that grid and one box read for
    all outputs. Otherwise the record's arrays are the boxes (the volume fitted, each crop resized).
    """
    stored = stored if stored is not None else getattr(rec, "stored", None)
    if stored is not None and (opts.volume_size is None or stored[2].whole_shape):
        raw = _plan_stored(rec, *stored, opts, anatomies, source_anatomies)
    else:
        raw = _plan_record(rec, opts, anatomies)
    raw["lut"] = _lut(anatomies, source_anatomies)
    raw["boxes"] = [tuple(a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a, dtype=dt))
                          for a, dt in zip(pair, (np.int16, np.uint8))) for pair in raw["boxes"]]
    return raw


def _plan_stored(rec, vol, lab, layout, bbox, opts, anatomies, source_anatomies) -> dict:
    """Plans on the stored grid, one box read for all of them."""
    shape = tuple(int(s) for s in vol.shape)
    aa = bool(getattr(opts, "antialias", False))
    raw: dict[str, Any] = {"volume": None, "label_map": None, "crops": [None] * len(anatomies),
                           "masks": [None] * len(anatomies)}
    plans = []
    if opts.volume_size is not None:
        pos, steps = _volume_positions(layout, shape, opts.volume_size)
        raw["volume"] = _plan(pos, steps, shape, True, aa, AIR_HU)
        raw["label_map"] = _plan(pos, steps, shape, False, False, 0)
        plans += [raw["volume"], raw["label_map"]]
    if opts.crop_size is not None:
        size = [int(x) for x in opts.crop_size]
        for k, a in enumerate(anatomies):
            if not rec.present.get(a, False) or bbox.get(a) is None:
                continue
            pos, steps = _crop_positions(layout, bbox[a], a, size)
            raw["crops"][k] = _plan(pos, steps, shape, True, aa, AIR_HU)
            raw["masks"][k] = _plan(pos, steps, shape, False, False, 0, label=list(source_anatomies).index(a) + 1)
            plans += [raw["crops"][k], raw["masks"][k]]
    box = _box_of(plans) if plans else [slice(0, 1)] * 3
    _shift(plans, box)
    raw["boxes"] = [(_read_box(vol, box, np.int16), _read_box(lab, box, np.uint8))]
    return raw


def _shared_tensor(shape, dtype: np.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor, in shared memory when made in a DataLoader worker (the loader
    then hands it to the main process by handle instead of copying it there)."""
    tdt = torch.from_numpy(np.empty(0, dtype)).dtype
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=tdt)
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return torch.empty(0, dtype=tdt).set_(torch.UntypedStorage._new_shared(n), 0, tuple(shape))


def _read_box(src, box: Sequence[slice], dtype):
    """``src[box]`` as a tensor: decompressed straight into shared memory in a loader worker (the
    DataLoader then passes it by handle), so the hyperslab is copied once."""
    t = _shared_tensor([b.stop - b.start for b in box], np.dtype(dtype))
    out = t.numpy()
    if isinstance(src, np.ndarray) or np.dtype(src.dtype) != np.dtype(dtype):
        out[...] = src[tuple(box)]
    else:                                     # h5py: decompress into the tensor, no temporary
        src.read_direct(out, np.s_[tuple(box)])
    return t


def _plan_record(rec, opts, anatomies) -> dict:
    """Plans for a record whose arrays are already cut: the volume fitted, each crop resized."""
    aa = bool(getattr(opts, "antialias", False))
    raw: dict[str, Any] = {"volume": None, "label_map": None, "crops": [None] * len(anatomies),
                           "masks": [None] * len(anatomies), "boxes": []}
    if opts.volume_size is not None:
        if rec.volume is None:
            raise FvlmError(f"case {rec.case_id}: no whole volume in the data, but the model needs one "
                            "(preprocess with a whole_shape, or use crop mode without the global embedding)")
        shape = tuple(int(s) for s in rec.volume.shape)
        pos, steps = fit_positions(shape, opts.volume_size)
        raw["volume"] = _plan(pos, steps, shape, True, aa, AIR_HU)
        raw["label_map"] = _plan(pos, steps, shape, False, False, 0)
        raw["boxes"].append((rec.volume, rec.label_map))
    if opts.crop_size is not None:
        size = [int(x) for x in opts.crop_size]
        for k, a in enumerate(anatomies):
            if a not in rec.crops or not rec.present.get(a, False):
                continue
            c = np.asarray(rec.crops[a])
            shape = tuple(int(s) for s in c.shape)
            pos = resized_positions([np.arange(n, dtype=np.float64) for n in shape], size)
            steps = [n / float(m) for n, m in zip(shape, size)]
            b = len(raw["boxes"])
            raw["crops"][k] = _plan(pos, steps, shape, True, aa, AIR_HU)
            raw["masks"][k] = _plan(pos, steps, shape, False, False, 0, label=1)
            raw["crops"][k].box = raw["masks"][k].box = b
            if np.issubdtype(c.dtype, np.floating):   # a record cut in float HU: keep its values
                c = np.rint(c)
            raw["boxes"].append((np.clip(c, -32768, 32767).astype(np.int16, copy=False),
                                 (np.asarray(rec.crop_masks[a]) > 0).astype(np.uint8)))
    return raw


# --------------------------------------------------------------------------- device stage


def _resample(x, plan: Plan, device):
    """One output: ``x`` (a box, any dtype, on ``device``) sampled by ``plan``: float32 (linear) or uint8."""
    if plan.sub is not None:
        x = x[tuple(slice(lo, hi) for lo, hi in plan.sub)]
    taps = _device_taps(plan, x.shape, device)
    t = x
    for ax in plan.order:
        idx, w, _, ident = taps[ax]
        if ident:
            continue
        if idx.shape[1] == 1:
            t = _take(t, ax, idx, plan.taps[ax][0], 0)
            continue
        shape = [1, 1, 1]
        shape[ax] = -1
        acc = None
        for k in range(idx.shape[1]):   # gather in the stored dtype, then float (exact either way)
            g = _take(t, ax, idx, plan.taps[ax][0], k).float().mul_(w[:, k].view(shape))
            acc = g if acc is None else acc.add_(g)
        t = acc
    if plan.linear and t.dtype != torch.float32:
        t = t.float()
    if t.data_ptr() == x.data_ptr():      # no pass copied: never write into the box
        t = t.clone()
    for ax in range(3):
        out_idx = taps[ax][2]
        if out_idx is not None:
            t.index_fill_(ax, out_idx, plan.pad)
    return t if plan.linear else t.to(torch.uint8)


def _take(t, ax: int, idx, idx_np: np.ndarray, k: int):
    """``t.index_select(ax, idx[:, k])``; on the CPU numpy's ``take`` (measured 3-15x faster than
    ``index_select`` on the inner axes of a 364 x 301 x 112 int16 box, one thread). A gather moves
    values without arithmetic, so both give the same bits."""
    if t.device.type == "cpu":
            return torch.from_numpy(np.take(t.numpy(), idx_np[:, k], axis=ax))
    return t.index_select(ax, idx[:, k])


def _device_taps(plan: Plan, box_shape, device):
    """Per axis ``(idx, w, outside index or None, identity)`` as device tensors."""
    out = []
    for (idx, w, outside), n in zip(plan.taps, box_shape):
        ident = idx.shape[1] == 1 and len(idx) == n and not outside.any() and np.array_equal(idx[:, 0], np.arange(n))
        o = np.nonzero(outside)[0]
        out.append((torch.from_numpy(idx).to(device, non_blocking=True),
                    torch.from_numpy(w).to(device, non_blocking=True),
                    torch.from_numpy(o).to(device, non_blocking=True) if o.size else None, ident))
    return out


def sample_case(raw: dict, opts, anatomies: Sequence[str], device=None) -> dict:
    """The sampled voxels of one case before windowing, on ``device``: ``volume`` float32 HU
    ``(*volume_size)`` and ``label_map`` uint8 *source* label ids; ``crops`` float32 HU ``(A, *crop_size)``
    and ``crop_masks`` uint8 ``(A, *crop_size)`` (absent anatomies: air and 0). A cached case
    (:mod:`fvlm.data.cache`) is unpacked instead."""
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if raw.get("cached"):
        return unpack_case(raw, opts, anatomies, dev)
    boxes = [(v.to(dev, non_blocking=True), m.to(dev, non_blocking=True)) for v, m in raw["boxes"]]
    out = {}
    if opts.volume_size is not None:
        pv, pl = raw["volume"], raw["label_map"]
        v, m = boxes[pv.box]
        out["volume"] = _resample(v, pv, dev)
        out["label_map"] = _resample(m, pl, dev)
    if opts.crop_size is not None:
        size = [int(x) for x in opts.crop_size]
        A = len(anatomies)
        c_all = torch.full((A, *size), float(AIR_HU), device=dev)
        m_all = torch.zeros(A, *size, dtype=torch.uint8, device=dev)
        for k in range(A):
            pc, pm = raw["crops"][k], raw["masks"][k]
            if pc is None:
                continue
            v, m = boxes[pc.box]
            c_all[k] = _resample(v, pc, dev)
            m_all[k] = (_resample(m, pm, dev) == pm.label).to(torch.uint8)
        out["crops"], out["crop_masks"] = c_all, m_all
        out["crop_present"] = torch.tensor([p is not None for p in raw["crops"]], device=dev)
    return out


def _relabel(label_map, lut):
    """Source label ids -> model ids through ``lut`` (256,) (numpy, or a tensor after a DataLoader)."""
    if label_map.device.type == "cpu":
        return torch.from_numpy(np.asarray(lut)[label_map.numpy()])
    return torch.as_tensor(lut).to(label_map.device, non_blocking=True)[label_map.long()]


def build_inputs(raws: list[dict], opts, anatomies: Sequence[str], device=None, augment=None,
                 aug_seeds: Sequence[int] | None = None) -> dict:
    """Device stage: the image keys of a batch from the host stage's ``raws`` (one per sample).

    ``volume`` float32 ``(B, 1, *volume_size)`` windowed to [0, 1]; ``label_map`` uint8
    ``(B, *volume_size)`` (0 background, ``i + 1`` = ``anatomies[i]``); ``crops`` float32
    ``(B, A, 1, *crop_size)`` windowed per anatomy (0 for an absent anatomy); ``crop_masks`` uint8
    ``(B, A, *crop_size)``. ``augment`` (an :class:`~fvlm.data.ct.AugmentConfig`) with per-sample
    ``aug_seeds``: random affine + intensity transforms after sampling (training only).
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    lo, hi = opts.window
    vols, labs, crops, masks = [], [], [], []
    for raw in raws:
        s = sample_case(raw, opts, anatomies, dev)
        if "volume" in s:
            vols.append(window(s["volume"], lo, hi)[None])
            labs.append(_relabel(s["label_map"], raw["lut"]))
        if "crops" in s:
            c = torch.stack([window(s["crops"][k], *opts.anatomy_windows.get(a, (lo, hi)))
                             for k, a in enumerate(anatomies)])[:, None]
            crops.append(c * s["crop_present"].view(-1, 1, 1, 1, 1))
            masks.append(s["crop_masks"])
    out = {}
    if vols:
        out["volume"], out["label_map"] = torch.stack(vols), torch.stack(labs)
    if crops:
        out["crops"], out["crop_masks"] = torch.stack(crops), torch.stack(masks)
    if augment is not None and getattr(augment, "enabled", False) and aug_seeds is not None:
        augment_batch(out, augment, aug_seeds)
    return out


def unpack_case(raw: dict, opts, anatomies, dev) -> dict:
    """The device stage of a cached case: unpack labels and masks (HU stays int16 -> float32)."""
    out = {}
    if "volume" in raw:
        out["volume"] = raw["volume"].to(dev, non_blocking=True).float()
        b = raw["labels"].to(dev, non_blocking=True)
        out["label_map"] = torch.stack([b & 15, b >> 4], -1).reshape(*opts.volume_size)
    if "crops" in raw:
        out["crops"] = raw["crops"].to(dev, non_blocking=True).float()
        b = raw["masks"].to(dev, non_blocking=True)
        bits = (b[..., None] >> torch.arange(7, -1, -1, device=dev, dtype=torch.uint8)) & 1
        n = int(np.prod(opts.crop_size))
        out["crop_masks"] = bits.reshape(b.shape[0], -1)[:, :n].reshape(b.shape[0], *opts.crop_size)
        out["crop_present"] = raw["present"].to(dev, non_blocking=True)
    return out


def augment_batch(batch: dict, aug: AugmentConfig, seeds: Sequence[int]) -> None:
    """Random affine + intensity transforms of each sample's image keys, in place, on their device
    (MONAI dictionary transforms seeded by ``seeds[i]``; image and masks move together)."""
    for i, seed in enumerate(seeds):
        s = {k: batch[k][i] for k in ("volume", "label_map", "crops", "crop_masks") if k in batch}
        _augment(s, aug, int(seed))
        for k, v in s.items():
            batch[k][i] = v


def _augment(s: dict, aug: AugmentConfig, seed: int) -> None:
    """MONAI dictionary transforms seeded by ``seed``; image + masks move together."""
    from monai.transforms import (Compose, RandAffined, RandGaussianNoised, RandScaleIntensityd,
                                  RandShiftIntensityd)

    rot = math.radians(aug.rotate_deg)
    if "volume" in s:
        d = {"volume": s["volume"], "label_map": s["label_map"][None]}
        t = Compose([
            RandAffined(keys=["volume", "label_map"], prob=aug.prob, rotate_range=(rot, rot, rot),
                        scale_range=(aug.scale,) * 3, mode=("bilinear", "nearest"), padding_mode="border"),
            RandScaleIntensityd(keys=["volume"], factors=aug.intensity_scale, prob=aug.prob),
            RandShiftIntensityd(keys=["volume"], offsets=aug.intensity_shift, prob=aug.prob),
            RandGaussianNoised(keys=["volume"], std=aug.noise_std, prob=aug.prob),
        ])
        t.set_random_state(seed=seed)
        d = t(d)
        s["volume"] = torch.as_tensor(d["volume"]).float()
        s["label_map"] = torch.as_tensor(d["label_map"])[0].to(torch.uint8)
    if "crops" in s:
        A = s["crops"].shape[0]
        for k in range(A):
            d = {"c": s["crops"][k], "m": s["crop_masks"][k][None]}
            t = Compose([
                RandAffined(keys=["c", "m"], prob=aug.prob, rotate_range=(rot, rot, rot),
                            scale_range=(aug.scale,) * 3, mode=("bilinear", "nearest"), padding_mode="border"),
                RandScaleIntensityd(keys=["c"], factors=aug.intensity_scale, prob=aug.prob),
                RandShiftIntensityd(keys=["c"], offsets=aug.intensity_shift, prob=aug.prob),
            ])
            t.set_random_state(seed=seed + k + 1)
            d = t(d)
            s["crops"][k] = torch.as_tensor(d["c"]).float()
            s["crop_masks"][k] = torch.as_tensor(d["m"])[0].to(torch.uint8)
