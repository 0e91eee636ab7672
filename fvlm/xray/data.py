"""Radiograph loading: PNG/JPEG/DICOM -> float [0, 1], upright, square, with a chest contour.

- :func:`read_radiograph` reads one file as (H, W) float32 in [0, 1] with bones bright.
  DICOM goes through pydicom (SimpleITK as a fallback): the modality LUT is applied, then
  the stored window (``WindowCenter``/``WindowWidth``) if present and asked for, else the
  full range of ``BitsStored``; MONOCHROME1 is inverted. PIL modes L, LA, RGB(A), P, I;16,
  I and F are handled; RGB is converted to luminance.
- :func:`normalize_intensity` stretches between percentiles, so a low-contrast film uses
  the whole range.
- :func:`resize_pad_square` keeps the aspect ratio and pads to a square (the valid area
  is returned as a mask).
- :func:`list_images` reads a folder or a manifest (CSV/JSONL/TXT); :class:`XrayDataset`
  serves training samples; :func:`build_cache` writes an h5 cache (``fvlm-xray-cache``,
  docs/FORMATS.md) that :class:`XrayDataset` reads instead of the files.

Bad files are logged once and skipped.
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import FormatError, FvlmError, check_format
from ..jsonl import read_jsonl
from ..progress import progress
from .contour import central_box, chest_contour

log = logging.getLogger("fvlm.xray.data")

__all__ = ["IMAGE_SUFFIXES", "XrayEntry", "read_radiograph", "normalize_intensity", "detect_rotation",
           "resize_pad_square", "list_images", "XrayDataset", "build_cache", "CACHE_FORMAT",
           "CACHE_VERSION", "load_sample"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
CACHE_FORMAT = "fvlm-xray-cache"
CACHE_VERSION = 1


# --------------------------------------------------------------------------- reading


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _read_dicom_pydicom(path: Path, use_window: bool) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(str(path))
    if "PixelData" not in ds:
        raise FormatError(f"{path}: DICOM file has no pixel data")
    raw = ds.pixel_array
    if raw.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 3:
        raw = raw.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    elif raw.ndim != 2:
        raise FormatError(f"{path}: expected a single 2D radiograph, got pixel array of shape {raw.shape}")
    arr = apply_modality_lut(raw, ds).astype(np.float64)
    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2")).upper()
    center, width = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if use_window and center is not None and width is not None:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        w = max(w, 1.0)
        out = (arr - (c - w / 2)) / w
    else:
        bits = int(getattr(ds, "BitsStored", 0) or 0)
        signed = int(getattr(ds, "PixelRepresentation", 0) or 0) == 1
        slope = float(getattr(ds, "RescaleSlope", 1) or 1)
        inter = float(getattr(ds, "RescaleIntercept", 0) or 0)
        if bits:
            lo_raw = -(2 ** (bits - 1)) if signed else 0
            hi_raw = 2 ** (bits - 1) - 1 if signed else 2 ** bits - 1
            lo, hi = sorted((lo_raw * slope + inter, hi_raw * slope + inter))
        else:
            lo, hi = float(arr.min()), float(arr.max())
        out = (arr - lo) / max(hi - lo, 1e-6)
    out = np.clip(out, 0.0, 1.0).astype(np.float32)
    if photometric == "MONOCHROME1":
        out = 1.0 - out
    return out


def _read_dicom_sitk(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    photometric = reader.GetMetaData("0028|0004").strip().upper() if reader.HasMetaDataKey("0028|0004") else ""
    arr = sitk.GetArrayFromImage(reader.Execute()).astype(np.float64)
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        arr = arr @ np.array([0.299, 0.587, 0.114])
    if arr.ndim != 2:
        raise FormatError(f"{path}: expected a single 2D radiograph, got array of shape {arr.shape}")
    lo, hi = float(arr.min()), float(arr.max())
    out = ((arr - lo) / max(hi - lo, 1e-6)).astype(np.float32)
    return 1.0 - out if photometric == "MONOCHROME1" else out


def _read_pil(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        mode = im.mode
        if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, np.float64)
            if mode.startswith("I;16"):
                return (arr / 65535.0).astype(np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            if mode == "I" and lo >= 0 and hi <= 65535:
                return (arr / (255.0 if hi <= 255 else 65535.0)).astype(np.float32)
            return ((arr - lo) / max(hi - lo, 1e-6)).astype(np.float32)
        if mode != "L":
            im = im.convert("RGBA").convert("RGB").convert("L") if mode in ("P", "LA", "RGBA", "PA") \
                else im.convert("L")
        return np.asarray(im, np.float32) / 255.0


def read_radiograph(path: str | os.PathLike, use_window: bool = True) -> np.ndarray:
    """Read a radiograph as (H, W) float32 in [0, 1], bones bright.

    ``use_window``: for DICOM, apply the stored VOI window when the file has one.
    Raises :class:`FormatError` for files that are not readable images.
    """
    path = Path(path)
    if not path.is_file():
        raise FvlmError(f"image not found: {path}")
    try:
        if _is_dicom(path):
            try:
                img = _read_dicom_pydicom(path, use_window)
            except FormatError:
                raise
            except Exception as e:  # e.g. a compressed transfer syntax without a pydicom handler
                try:
                    img = _read_dicom_sitk(path)
                except Exception:
                    raise FormatError(f"{path}: unreadable DICOM ({type(e).__name__}: {e})") from None
        else:
            img = _read_pil(path)
    except FormatError:
        raise
    except Exception as e:
        raise FormatError(f"{path}: not a readable image ({type(e).__name__}: {str(e)[:120]})") from None
    if img.ndim != 2 or min(img.shape) < 8:
        raise FormatError(f"{path}: expected a 2D image of at least 8x8 pixels, got shape {img.shape}")
    if not np.isfinite(img).all():
        raise FormatError(f"{path}: image has non-finite values")
    return img


def normalize_intensity(img: np.ndarray, mode: str = "percentile", lo: float = 0.5, hi: float = 99.5,
                        valid: np.ndarray | None = None) -> np.ndarray:
    """Contrast normalisation of a [0, 1] image.

    ``mode``: "percentile" maps the ``lo``/``hi`` percentiles (of the valid pixels) to 0/1;
    "minmax" maps min/max; "none" returns the image unchanged.
    """
    if mode == "none":
        return img.astype(np.float32)
    vals = img[valid] if valid is not None else img
    if mode == "percentile":
        a, b = np.percentile(vals, [lo, hi])
    elif mode == "minmax":
        a, b = float(vals.min()), float(vals.max())
    else:
        raise FvlmError(f"unknown intensity normalisation {mode!r} (use percentile, minmax or none)")
    if b - a < 1e-6:
        return np.zeros_like(img, np.float32)
    return np.clip((img - a) / (b - a), 0.0, 1.0).astype(np.float32)


def detect_rotation(img: np.ndarray) -> int:
    """Quarter turns ``k`` such that ``np.rot90(img, k)`` is upright (0, 1 or -1).

    A heuristic for frontal chest films stored on their side: upright, the spine and
    mediastinum make a bright vertical band between two dark lung fields, so the column
    profile varies more than the row profile; and the abdomen (bottom) is brighter than the
    neck and apices (top). 180 degree turns are not detected.
    """
    from scipy import ndimage as ndi

    x = np.asarray(img, np.float32)
    step = max(1, max(x.shape) // 128)
    x = ndi.uniform_filter(x, 3)[::step, ::step]
    x = normalize_intensity(x)
    h, w = x.shape
    core = x[h // 8: h - h // 8, w // 8: w - w // 8]

    def band_score(a):  # spine-and-lungs pattern along the columns of a
        prof = a.mean(axis=0)
        n = prof.size
        centre = prof[int(0.4 * n): int(0.6 * n)].mean()
        sides = 0.5 * (prof[int(0.15 * n): int(0.35 * n)].mean() + prof[int(0.65 * n): int(0.85 * n)].mean())
        return centre - sides

    upright, sideways = band_score(core), band_score(core.T)
    if upright >= sideways:
        return 0
    # on its side: the brighter end (abdomen) must go to the bottom
    left, right = x[:, : w // 3].mean(), x[:, w - w // 3:].mean()
    return -1 if right > left else 1  # head at the left (brighter right) -> turn clockwise


def resize_pad_square(img: np.ndarray, size: int, pad_value: float = 0.0
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Aspect-preserving resize of (H, W) so the longer side is ``size``, centred on a square.

    Returns (image (size, size) float32, valid (size, size) bool).
    """
    from PIL import Image

    h, w = img.shape
    s = size / max(h, w)
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    if (nh, nw) != (h, w):
        # PIL widens the filter when shrinking, which antialiases
        res = np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(
            (nw, nh), Image.BICUBIC if s > 1 else Image.BILINEAR, reducing_gap=None), np.float32)
        res = np.clip(res, 0.0, 1.0)
    else:
        res = img.astype(np.float32)
    out = np.full((size, size), pad_value, np.float32)
    valid = np.zeros((size, size), bool)
    r0, c0 = (size - nh) // 2, (size - nw) // 2
    out[r0:r0 + nh, c0:c0 + nw] = res
    valid[r0:r0 + nh, c0:c0 + nw] = True
    return out, valid


def _read_mask(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("L")) > 127


# --------------------------------------------------------------------------- listing


@dataclass
class XrayEntry:
    path: Path
    rotate: int | None = None          #: quarter turns (np.rot90 k) to make it upright; None = not known
    mask: Path | None = None           #: optional chest mask (PNG, white inside)
    labels: dict[str, Any] = field(default_factory=dict)  #: other manifest columns


def _rotation_from_row(row: dict) -> int | None:
    if row.get("rotate") not in (None, ""):
        return int(row["rotate"])
    flag = str(row.get("rotated_90", "")).strip().lower()
    if flag in ("yes", "true", "1"):
        return -1  # the NIH convention: stored 90 degrees counter-clockwise
    if flag in ("no", "false", "0"):
        return 0
    return None


def list_images(source: str | os.PathLike) -> list[XrayEntry]:
    """The radiographs of a folder (recursive, by suffix) or a manifest.

    A manifest is CSV or JSONL with a column ``image`` (or ``file``/``path``), relative to
    the manifest's folder, optional ``rotate`` (quarter turns, ``np.rot90`` convention) or
    ``rotated_90`` (yes/no, stored 90 degrees counter-clockwise), optional ``mask`` (a chest
    mask image); other columns are kept as labels. A ``.txt`` manifest has one path a line.
    """
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FvlmError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {src}")
        return [XrayEntry(p) for p in files]
    if not src.is_file():
        raise FvlmError(f"data source not found: {src} (give a folder of images or a CSV/JSONL/TXT manifest)")
    base = src.parent
    suffix = src.suffix.lower()
    rows: list[dict]
    if suffix == ".csv":
        with open(src, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".json"):
        rows = [row for _, row in read_jsonl(src)]
    elif suffix == ".txt":
        with open(src, encoding="utf-8") as f:
            rows = [{"image": ln.strip()} for ln in f if ln.strip() and not ln.startswith("#")]
    else:
        raise FvlmError(f"{src}: unknown manifest type (use .csv, .jsonl or .txt)")
    out = []
    for i, row in enumerate(rows):
        key = next((k for k in ("image", "file", "path") if row.get(k)), None)
        if key is None:
            raise FvlmError(f"{src}: row {i + 1} has no 'image' (or 'file'/'path') column")
        p = Path(row[key])
        mask = row.get("mask") or None
        try:
            rot = _rotation_from_row(row)
        except ValueError:
            raise FvlmError(f"{src}: row {i + 1}: 'rotate' must be an integer, got {row.get('rotate')!r}") from None
        labels = {k: v for k, v in row.items() if k not in (key, "mask", "rotate")}
        out.append(XrayEntry(p if p.is_absolute() else base / p, rot,
                             (Path(mask) if Path(mask).is_absolute() else base / mask) if mask else None, labels))
    if not out:
        raise FvlmError(f"{src}: manifest has no rows")
    return out


# --------------------------------------------------------------------------- samples


def load_sample(entry: XrayEntry, size: int, orientation: str = "manifest", normalize: str = "percentile",
                contour: str = "auto", use_window: bool = True) -> dict[str, np.ndarray | str | int]:
    """Read, orient, normalise, square and contour one radiograph.

    ``orientation``: "manifest" uses the entry's rotation (auto-detect when unknown),
    "auto" always detects, "none" leaves the image as stored.
    ``contour``: "auto" (intensity thresholding, or the entry's mask when given), "box"
    (fixed central box), "mask" (the entry's mask is required), "none" (everything inside).
    Returns image (size, size) float32, valid and contour (size, size) bool, rotate, method.
    """
    img = read_radiograph(entry.path, use_window=use_window)
    if orientation == "none":
        k = 0
    elif orientation == "auto" or entry.rotate is None:
        k = detect_rotation(img)
    elif orientation == "manifest":
        k = entry.rotate
    else:
        raise FvlmError(f"unknown orientation mode {orientation!r} (use manifest, auto or none)")
    mask = None
    if entry.mask is not None and contour in ("auto", "mask"):
        mask = _read_mask(entry.mask)
        if mask.shape != img.shape:
            raise FormatError(f"{entry.mask}: mask is {mask.shape}, image {entry.path.name} is {img.shape}")
    elif contour == "mask":
        raise FvlmError(f"contour 'mask' needs a 'mask' column in the manifest; {entry.path} has none")
    if k:
        img = np.ascontiguousarray(np.rot90(img, k))
        mask = np.rot90(mask, k) if mask is not None else None
    img = normalize_intensity(img, normalize)
    sq, valid = resize_pad_square(img, size)
    if mask is not None:
        m, _ = resize_pad_square(mask.astype(np.float32), size)
        cmask, method = (m > 0.5) & valid, "mask"
    elif contour == "box":
        cmask, method = central_box((size, size)) & valid, "box"
    elif contour == "none":
        cmask, method = valid.copy(), "none"
    elif contour in ("auto", "mask"):
        res = chest_contour(sq, valid)
        cmask, method = res.mask, res.method
    else:
        raise FvlmError(f"unknown contour mode {contour!r} (use auto, box, mask or none)")
    return {"image": sq, "valid": valid, "contour": cmask, "rotate": int(k), "method": method,
            "path": str(entry.path)}


# --------------------------------------------------------------------------- dataset


class XrayDataset:
    """Training samples: ``{"image": (1, S, S) float32 tensor, "valid", "contour": (S, S) bool, "index"}``.

    ``source``: a folder, a manifest, or a list of :class:`XrayEntry`. ``cache``: an h5 file
    written by :func:`build_cache` (read instead of the images when given). A file that
    fails to load is logged once, remembered, and replaced by the next good one.
    """

    def __init__(self, source: str | os.PathLike | Sequence[XrayEntry] | None = None, size: int = 224,
                 orientation: str = "manifest", normalize: str = "percentile", contour: str = "auto",
                 use_window: bool = True, cache: str | os.PathLike | None = None, flip: bool = False):
        self.size = int(size)
        self.orientation, self.normalize, self.contour, self.use_window = orientation, normalize, contour, use_window
        self.flip = flip
        self.bad: dict[int, str] = {}
        self._h5 = None
        self.cache = Path(cache) if cache else None
        if self.cache is not None:
            meta = check_cache(self.cache, self.size)
            self.entries = [XrayEntry(Path(p)) for p in meta["paths"]]
        elif source is None:
            raise FvlmError("XrayDataset needs a data source or a cache")
        else:
            self.entries = list(source) if isinstance(source, (list, tuple)) else list_images(source)

    def __len__(self) -> int:
        return len(self.entries)

    def _load(self, i: int) -> dict:
        if self.cache is not None:
            import h5py

            if self._h5 is None:  # opened lazily, once per worker process
                self._h5 = h5py.File(self.cache, "r")
            f = self._h5
            img = f["images"][i].astype(np.float32) / float(np.iinfo(f["images"].dtype).max)
            return {"image": img, "valid": f["valid"][i].astype(bool), "contour": f["contour"][i].astype(bool)}
        return load_sample(self.entries[i], self.size, self.orientation, self.normalize, self.contour,
                           self.use_window)

    def __getitem__(self, index: int) -> dict:
        return self.sample(index)

    def sample(self, index: int, rng: np.random.Generator | None = None) -> dict:
        """Sample ``index`` (or the next readable one); ``rng`` draws the flip (None: NumPy's global RNG)."""
        import torch

        n = len(self.entries)
        for step in range(n):
            i = (index + step) % n
            if i in self.bad:
                continue
            try:
                s = self._load(i)
            except (FvlmError, OSError, ValueError) as e:
                self.bad[i] = str(e)
                log.warning("skipping bad image %s: %s", self.entries[i].path, e)
                continue
            img, valid, cont = s["image"], s["valid"], s["contour"]
            if self.flip and (rng.random() if rng is not None else np.random.rand()) < 0.5:
                img, valid, cont = img[:, ::-1], valid[:, ::-1], cont[:, ::-1]
            return {"image": torch.from_numpy(np.ascontiguousarray(img))[None],
                    "valid": torch.from_numpy(np.ascontiguousarray(valid)),
                    "contour": torch.from_numpy(np.ascontiguousarray(cont)),
                    "index": torch.tensor(i)}
        raise FvlmError(f"none of the {n} images could be loaded (first error: {next(iter(self.bad.values()), '?')})")


# --------------------------------------------------------------------------- h5 cache


def build_cache(source: str | os.PathLike | Sequence[XrayEntry], path: str | os.PathLike, size: int,
                orientation: str = "manifest", normalize: str = "percentile", contour: str = "auto",
                use_window: bool = True, dtype: str = "uint16") -> dict:
    """Preprocess every radiograph once into an h5 file (format ``fvlm-xray-cache`` v1).

    Returns a summary ``{"written": n, "skipped": [(path, reason), ...], "path": str}``.
    """
    import h5py

    entries = list(source) if isinstance(source, (list, tuple)) else list_images(source)
    if dtype not in ("uint8", "uint16"):
        raise FvlmError(f"cache dtype must be uint8 or uint16, got {dtype!r}")
    scale = float(np.iinfo(dtype).max)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    skipped, paths, methods = [], [], []
    with h5py.File(tmp, "w") as f:
        f.attrs.update({"format": CACHE_FORMAT, "version": CACHE_VERSION, "size": size,
                        "orientation": orientation, "normalize": normalize, "contour": contour})
        n = len(entries)
        chunk = (1, size, size)
        d_img = f.create_dataset("images", (n, size, size), dtype=dtype, chunks=chunk, maxshape=(None, size, size))
        d_val = f.create_dataset("valid", (n, size, size), dtype="u1", chunks=chunk, maxshape=(None, size, size),
                                 compression="gzip", compression_opts=1)
        d_con = f.create_dataset("contour", (n, size, size), dtype="u1", chunks=chunk,
                                 maxshape=(None, size, size), compression="gzip", compression_opts=1)
        j = 0
        for e in progress(entries, desc="xray cache", unit="img"):
            try:
                s = load_sample(e, size, orientation, normalize, contour, use_window)
            except (FvlmError, OSError, ValueError) as err:
                log.warning("skipping bad image %s: %s", e.path, err)
                skipped.append((str(e.path), str(err)))
                continue
            d_img[j] = np.round(s["image"] * scale).astype(dtype)
            d_val[j] = s["valid"]
            d_con[j] = s["contour"]
            paths.append(str(e.path))
            methods.append(s["method"])
            j += 1
        for d in (d_img, d_val, d_con):
            d.resize(j, axis=0)
        f.create_dataset("paths", data=np.array(paths, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("contour_method", data=np.array(methods, dtype=object), dtype=h5py.string_dtype())
    if j == 0:
        tmp.unlink()
        raise FvlmError(f"no image could be read for the cache ({len(skipped)} skipped)")
    os.replace(tmp, path)
    return {"written": j, "skipped": skipped, "path": str(path)}


def check_cache(path: str | os.PathLike, size: int | None = None) -> dict:
    """Validate an ``fvlm-xray-cache`` file; returns its attributes and ``paths``."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise FvlmError(f"x-ray cache not found: {path} (build it with `fvlm pretrain-xray --build-cache`)")
    with h5py.File(path, "r") as f:
        check_format({"format": f.attrs.get("format"), "version": f.attrs.get("version")}, CACHE_FORMAT,
                     CACHE_VERSION, path, what=f"an {CACHE_FORMAT} file")
        if size is not None and int(f.attrs["size"]) != int(size):
            raise FormatError(f"{path}: cache holds {f.attrs['size']} px images, the config asks for {size}; "
                              "rebuild the cache or change data.size")
        meta = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
        meta["paths"] = [p.decode() if isinstance(p, bytes) else p for p in f["paths"][()]]
    return meta
