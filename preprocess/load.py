"""Read a CT volume: NIfTI through nibabel, a DICOM series through SimpleITK.

Both return a :class:`Volume` whose ``array`` is indexed in the file's own voxel order
with a voxel->RAS+ world ``affine`` (mm); reorientation happens later. Nothing from a
DICOM header other than geometry and rescale is kept (no names, ids, dates, sites).
"""
from __future__ import annotations

import hashlib
import io
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fvlm.hashing import file_sha256

from .errors import CaseError

__all__ = ["Volume", "load_volume", "load_nifti", "load_dicom_series", "file_sha256"]


@dataclass
class Volume:
    array: np.ndarray                 # 3D, file voxel order
    affine: np.ndarray                # voxel -> RAS+ mm
    source_format: str                # "nifti" | "dicom"
    sha256: str                       # of the file bytes (DICOM: of the sorted files' bytes)
    header_rescale: tuple | None = None   # (slope, intercept) the reader already applied
    blank_header: bool = False        # NIfTI without a usable spatial header
    info: dict = field(default_factory=dict)


def _gunzip(raw: bytes) -> bytes:
    """Decompress (multi-member) gzip; zlib checks each member's CRC. Raises EOFError when truncated."""
    parts = []
    data = raw
    while data:
        d = zlib.decompressobj(wbits=31)
        parts.append(d.decompress(data))
        if not d.eof:
            raise EOFError("compressed stream is truncated")
        data = d.unused_data
        if data and data[:2] != b"\x1f\x8b":
            break  # trailing garbage after the last member, as gzip tolerates
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _as_3d(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.ndim == 4 and arr.shape[3] == 1:
        arr = arr[..., 0]
    if arr.ndim == 5 and arr.shape[3] == 1 and arr.shape[4] == 1:
        arr = arr[..., 0, 0]
    if arr.ndim != 3:
        raise CaseError("load", f"{name}: expected a 3D volume, got a {arr.ndim}D array of shape {arr.shape}")
    if min(arr.shape) < 2:
        raise CaseError("load", f"{name}: a 3D volume needs at least 2 voxels per axis, got shape {arr.shape}")
    return arr


def load_nifti(path: str | Path, want_hash: bool = True) -> Volume:
    """Read a ``.nii``/``.nii.gz`` file. The whole file is read once: hashed and decoded from memory."""
    import nibabel as nib

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CaseError("load", f"cannot read {path.name}: {e.strerror or e}") from None
    sha_future = None
    if want_hash:  # hashlib and zlib release the GIL: hash while decompressing
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(1)
        sha_future = pool.submit(lambda b: hashlib.sha256(b).hexdigest(), raw)
        pool.shutdown(wait=False)
    try:
        if raw[:2] == b"\x1f\x8b":
            buf = _gunzip(raw)
        else:
            buf = raw
        del raw
        if len(buf) < 352:
            raise ValueError("file is shorter than a NIfTI header")
        if buf[344:347] in (b"n+1", b"ni1"):
            hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(buf), check=False)
            shape = tuple(int(s) for s in hdr.get_data_shape())
            dtype = hdr.get_data_dtype()
            off = int(hdr.get_data_offset()) if buf[344:347] == b"n+1" else 0
            if buf[344:347] == b"ni1":  # header + separate .img: let nibabel find the data file
                img = nib.load(str(path))
                arr = np.asanyarray(img.dataobj.get_unscaled())
            else:
                nbytes = int(np.prod(shape)) * dtype.itemsize
                if len(buf) < off + nbytes:
                    raise EOFError(f"truncated: {max(0, len(buf) - off)} of {nbytes} data bytes present")
                arr = np.ndarray(shape, dtype=dtype, buffer=buf, offset=off, order="F")
            affine = hdr.get_best_affine()
        else:  # NIfTI-2 and anything else nibabel reads
            img = nib.load(str(path))
            hdr = img.header
            arr = np.asanyarray(img.dataobj.get_unscaled())
            affine = img.affine
        slope, inter = hdr.get_slope_inter()
    except CaseError:
        raise
    except (OSError, EOFError, zlib.error, ValueError, TypeError, nib.filebasedimages.ImageFileError,
            nib.spatialimages.HeaderDataError) as e:
        raise CaseError("load", f"cannot read {path.name}: {type(e).__name__}: {e}") from None
    arr = _as_3d(arr, path.name)
    sha = sha_future.result() if sha_future is not None else ""
    rescale = None
    if slope is not None and (slope != 1.0 or (inter or 0.0) != 0.0):
        inter = float(inter or 0.0)
        rescale = (float(slope), inter)
        if float(slope).is_integer() and inter.is_integer() and arr.dtype.kind in "iu":
            arr = arr.astype(np.int32) * int(slope) + int(inter)
        else:
            arr = arr.astype(np.float32) * np.float32(slope) + np.float32(inter)
    qc, sc = int(hdr["qform_code"]), int(hdr["sform_code"])
    pix = np.asarray(hdr.get_zooms()[:3], dtype=float)
    blank = (qc == 0 and sc == 0) or (np.allclose(affine[:3, :3], np.eye(3)) and np.allclose(pix, 1.0))
    return Volume(array=arr, affine=np.asarray(affine, dtype=np.float64), source_format="nifti", sha256=sha,
                  header_rescale=rescale, blank_header=bool(blank),
                  info={"qform_code": qc, "sform_code": sc})


def _dicom_files(folder: Path, series_uid: str | None):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = list(reader.GetGDCMSeriesIDs(str(folder)) or ())
    if not ids:
        raise CaseError("load", f"{folder.name}: no DICOM series found in the folder")
    if series_uid:
        if series_uid not in ids:
            raise CaseError("input", f"{folder.name}: series {series_uid} not found (the folder has {len(ids)}: "
                                     f"{', '.join(ids[:5])})")
        uid = series_uid
    elif len(ids) > 1:
        raise CaseError("input", f"{folder.name}: the folder holds {len(ids)} DICOM series ({', '.join(ids[:5])}"
                                 f"{', ...' if len(ids) > 5 else ''}); series are never merged: give one series "
                                 "per case (manifest column series_uid, or one folder per series)")
    else:
        uid = ids[0]
    files = list(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return files, uid


def load_dicom_series(folder: str | Path, series_uid: str | None = None, want_hash: bool = True) -> Volume:
    """Read one DICOM series (slices sorted by position along the slice normal)."""
    import SimpleITK as sitk

    folder = Path(folder)
    files, uid = _dicom_files(folder, series_uid)
    if len(files) < 2:
        raise CaseError("load", f"{folder.name}: series has {len(files)} slice(s); a 3D volume needs >= 2")
    try:
        # position of each slice, to catch missing slices (SimpleITK would only warn)
        pos, slope_inter = [], None
        fr = sitk.ImageFileReader()
        for i, fn in enumerate(files):
            fr.SetFileName(fn)
            fr.ReadImageInformation()
            if fr.HasMetaDataKey("0020|0032"):
                pos.append([float(v) for v in fr.GetMetaData("0020|0032").split("\\")])
            if i == 0 and fr.HasMetaDataKey("0028|1053"):
                slope_inter = (float(fr.GetMetaData("0028|1053")),
                               float(fr.GetMetaData("0028|1052")) if fr.HasMetaDataKey("0028|1052") else 0.0)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        img = reader.Execute()
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise CaseError("load", f"{folder.name}: cannot read DICOM series: {msg}") from None
    if len(pos) == len(files) and len(pos) > 2:
        d = np.asarray(pos)
        normal = np.cross(np.asarray(img.GetDirection()).reshape(3, 3)[:, 0],
                          np.asarray(img.GetDirection()).reshape(3, 3)[:, 1])
        z = np.sort(d @ normal)
        gaps = np.diff(z)
        if gaps.min() <= 1e-3:
            raise CaseError("load", f"{folder.name}: two slices share a position (duplicate or mixed series)")
        if gaps.max() > 1.5 * np.median(gaps):
            raise CaseError("load", f"{folder.name}: non-uniform slice spacing (gaps {gaps.min():.2f}.."
                                    f"{gaps.max():.2f} mm): missing slices?")
    arr = sitk.GetArrayFromImage(img).transpose(2, 1, 0)  # (z, y, x) -> [x, y, z]
    sp = np.asarray(img.GetSpacing(), dtype=np.float64)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    origin = np.asarray(img.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    lps[:3, :3] = direction * sp[None, :]
    lps[:3, 3] = origin
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS world -> RAS world
    sha = ""
    if want_hash:
        h = hashlib.sha256()
        for fn in files:
            h.update(Path(fn).read_bytes())
        sha = h.hexdigest()
    return Volume(array=_as_3d(arr, folder.name), affine=affine, source_format="dicom", sha256=sha,
                  header_rescale=slope_inter, info={"n_files": len(files)})


def load_volume(path: str | Path, series_uid: str | None = None, want_hash: bool = True) -> Volume:
    """A NIfTI file or a DICOM series folder."""
    p = Path(path)
    if p.is_dir():
        return load_dicom_series(p, series_uid, want_hash)
    if not p.exists():
        raise CaseError("input", f"image not found: {p.name}")
    name = p.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return load_nifti(p, want_hash)
    raise CaseError("input", f"{p.name}: unsupported image type (expected .nii, .nii.gz or a DICOM folder)")

