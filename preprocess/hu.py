"""HU sanity: is a volume in Hounsfield units, and if not, what went wrong?

Two robust landmarks are read from a subsampled histogram:

- the *air level*: 1st percentile after dropping a padding value (the minimum, when it
  fills > 0.5 % of voxels, as scanners pad outside the reconstruction circle);
- the *soft-tissue mode*: the histogram peak (10 HU bins, smoothed) between air + 600
  and air + 1400, i.e. fat / water / muscle.

In HU the air level lies near -1000 and the tissue mode in [-200, 200]. Values stored
raw (rescale intercept never applied) put air near 0 and tissue near +1024; a rescale
applied twice puts air near -2048; a wrong slope stretches both. The diagnosis names
the likely cause; :func:`apply_hu_policy` fixes or fails according to ``hu.policy``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CaseError

__all__ = ["HUStats", "hu_stats", "diagnose", "apply_hu_policy", "to_int16_hu"]


@dataclass
class HUStats:
    air: float
    tissue: float
    pad_value: float | None
    pad_fraction: float
    p99: float


def hu_stats(arr: np.ndarray, subsample: int = 4) -> HUStats:
    k = max(1, int(subsample))
    s = np.asarray(arr[::k, ::k, ::k], dtype=np.float32).ravel()
    if s.size == 0:
        raise CaseError("hu", "empty volume")
    vmin = float(s.min())
    frac = float((s == vmin).mean())
    pad = None
    if frac > 0.005 and (s > vmin).any():
        pad = vmin
        s = s[s > vmin]
    air = float(np.percentile(s, 1.0))
    lo, hi = air + 600.0, air + 1400.0
    sel = s[(s >= lo) & (s < hi)]
    if sel.size < 100:
        tissue = float(np.median(s))
    else:
        h, edges = np.histogram(sel, bins=int((hi - lo) / 10), range=(lo, hi))
        h = np.convolve(h, np.ones(5) / 5.0, mode="same")
        j = int(np.argmax(h))
        tissue = float(0.5 * (edges[j] + edges[j + 1]))
    return HUStats(air=air, tissue=tissue, pad_value=pad, pad_fraction=frac, p99=float(np.percentile(s, 99.0)))


def _in(v: float, r) -> bool:
    return r[0] <= v <= r[1]


def diagnose(st: HUStats, air_range, tissue_range) -> tuple[str, str]:
    """``(status, message)``; status is ``ok``, ``raw`` (+1024 stored), ``double`` (-1024 twice) or ``bad``."""
    if _in(st.air, air_range) and _in(st.tissue, tissue_range):
        return "ok", ""
    where = f"air at {st.air:.0f}, soft tissue at {st.tissue:.0f}"
    # an offset diagnosis needs both landmarks well inside the ranges once shifted (a doubled
    # slope can land air on -2048 too, but then tissue misses by hundreds of HU)
    t_in = (tissue_range[0] + 50.0, tissue_range[1] - 50.0)
    if _in(st.air - 1024, air_range) and _in(st.tissue - 1024, t_in):
        return "raw", f"values look stored raw, the -1024 rescale intercept never applied ({where}; in HU air is ~-1000)"
    if _in(st.air + 1024, air_range) and _in(st.tissue + 1024, t_in):
        return "double", f"the rescale intercept looks applied twice ({where})"
    slope = (st.tissue - st.air) / 1040.0
    return "bad", (f"intensities do not look like HU ({where}; expected air ~-1000 and tissue -200..200; "
                   f"apparent slope {slope:.2f}, a wrong RescaleSlope?)")


def apply_hu_policy(arr: np.ndarray, policy: str, air_range, tissue_range, subsample: int = 4,
                    metadata_rescale: tuple | None = None) -> tuple[np.ndarray, dict]:
    """Check (and per ``policy`` fix) the intensities of ``arr``; returns ``(array, info)``.

    ``metadata_rescale`` is ``(slope, intercept)`` from a manifest or metadata CSV. It is
    applied only when the data do not already look like HU (so a CSV that lists the
    intercept of an already converted volume cannot shift it twice).
    """
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            raise CaseError("hu", f"image holds {int(bad.sum())} NaN/inf voxels")
    if arr.dtype.kind not in "iuf":
        raise CaseError("hu", f"image dtype {arr.dtype} is not numeric")
    info: dict = {"action": "none", "policy": policy}
    if policy == "off":
        return arr, info
    st = hu_stats(arr, subsample)
    status, msg = diagnose(st, air_range, tissue_range)
    info.update(air_hu=round(st.air, 1), tissue_hu=round(st.tissue, 1), status=status)
    meta_ok = metadata_rescale is not None and tuple(metadata_rescale) != (1.0, 0.0)
    if status == "ok":
        if meta_ok:
            info["action"] = "metadata_rescale_ignored"
            info["note"] = (f"metadata lists slope {metadata_rescale[0]:g}, intercept {metadata_rescale[1]:g} "
                            "but the data are already HU; not applied")
        return arr, info
    if policy == "fail":
        raise CaseError("hu", msg)
    if meta_ok and status in ("raw", "bad"):
        slope, inter = float(metadata_rescale[0]), float(metadata_rescale[1])
        if float(slope).is_integer() and float(inter).is_integer() and arr.dtype.kind in "iu":
            out = arr.astype(np.int32) * int(slope) + int(inter)
        else:
            out = arr.astype(np.float32) * np.float32(slope) + np.float32(inter)
        st2 = hu_stats(out, subsample)
        s2, msg2 = diagnose(st2, air_range, tissue_range)
        if s2 != "ok":
            raise CaseError("hu", f"{msg}; applying the metadata rescale (slope {slope:g}, intercept {inter:g}) "
                                  f"does not fix it: {msg2}")
        info.update(action="applied_metadata_rescale", applied_slope=slope, applied_intercept=inter,
                    air_hu=round(st2.air, 1), tissue_hu=round(st2.tissue, 1))
        return out, info
    if policy == "correct" and status in ("raw", "double"):
        shift = -1024 if status == "raw" else 1024
        out = arr.astype(np.int32) + shift if arr.dtype.kind in "iu" else arr + np.float32(shift)
        info.update(action="corrected_offset", applied_slope=1.0, applied_intercept=float(shift))
        return out, info
    hint = ("; supply rescale_slope/rescale_intercept in the manifest, or set hu.policy=correct to undo "
            "a +-1024 offset" if status in ("raw", "double") else "")
    raise CaseError("hu", msg + hint)


def to_int16_hu(arr: np.ndarray, clip=(-1024, 3071)) -> np.ndarray:
    """Round and clip HU into int16 (linear-interpolated floats or wider ints)."""
    lo, hi = int(clip[0]), int(clip[1])
    if arr.dtype == np.int16 and lo <= -32768 and hi >= 32767:
        return arr
    if arr.dtype.kind == "f":
        out = np.rint(arr)
        np.clip(out, lo, hi, out=out)
        return out.astype(np.int16)
    return np.clip(arr, lo, hi).astype(np.int16)
