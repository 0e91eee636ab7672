"""Corpus inputs -> a list of :class:`CaseSpec`: a manifest (CSV/JSONL), a folder, or CT-RATE.

Manifest columns (docs/DEVELOPING.md): ``case_id, patient_id, split, image`` (NIfTI file
or DICOM folder), optional ``mask`` / ``mask_dir``, ``series_uid``, report fields
``findings``, ``impressions``, ``report``, and optional ``rescale_slope``,
``rescale_intercept`` (applied only if the data are not HU yet) and ``spacing``
(``"sx,sy,sz"`` mm, used for blank headers). Relative paths are relative to the manifest.
"""
from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from fvlm.errors import FvlmError

__all__ = ["CaseSpec", "sanitize_case_id", "read_manifest", "scan_folder", "is_ctrate", "read_ctrate",
           "collect_cases"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class CaseSpec:
    case_id: str
    image: str
    patient_id: str = ""
    split: str = ""
    series_uid: str | None = None
    mask: str | None = None
    mask_dir: str | None = None
    findings: str = ""
    impressions: str = ""
    report: str = ""
    rescale: tuple | None = None        # (slope, intercept) from metadata
    spacing: tuple | None = None        # (sx, sy, sz) mm from metadata
    raw_id: str = ""                    # the id before sanitising (logged, never stored in shards)
    extra: dict = field(default_factory=dict)


def sanitize_case_id(raw: str) -> str:
    """A file-system-safe id: ``[A-Za-z0-9._-]``, no leading dots, no path parts.

    ``../../etc/passwd`` -> ``etc_passwd``; ids that sanitise to nothing are rejected.
    """
    s = str(raw).strip().replace("\\", "/")
    parts = [p for p in s.split("/") if p not in ("", ".", "..")]
    s = _SAFE.sub("_", "_".join(parts)).strip("._-")
    s = s[:160]
    if not s:
        raise ValueError(f"case id {raw!r} is empty after sanitising")
    return s


def _float_or_none(v) -> float | None:
    if v is None:
        return None
    s = str(v).strip()
    if s == "" or s.lower() in ("nan", "none", "null"):
        return None
    return float(s)


def _spacing(v) -> tuple | None:
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, (list, tuple)):
        vals = [float(x) for x in v]
    else:
        vals = [float(x) for x in re.split(r"[,\s\[\]]+", str(v)) if x]
    if len(vals) != 3 or min(vals) <= 0:
        raise ValueError(f"spacing must be three positive numbers, got {v!r}")
    return tuple(vals)


def _row_to_spec(row: dict, base: Path, where: str) -> CaseSpec:
    def path(key):
        v = row.get(key)
        if v is None or str(v).strip() == "":
            return None
        p = Path(str(v).strip()).expanduser()
        return str(p if p.is_absolute() else base / p)

    raw = row.get("case_id") or row.get("id")
    image = path("image")
    if not raw and image:
        raw = Path(image).name.split(".nii")[0]
    if not raw:
        raise FvlmError(f"{where}: no case_id")
    if not image:
        raise FvlmError(f"{where}: no image for case {raw!r}")
    try:
        cid = sanitize_case_id(raw)
        slope, inter = _float_or_none(row.get("rescale_slope")), _float_or_none(row.get("rescale_intercept"))
        rescale = None if slope is None and inter is None else (slope if slope is not None else 1.0,
                                                                 inter if inter is not None else 0.0)
        spacing = _spacing(row.get("spacing"))
    except ValueError as e:
        raise FvlmError(f"{where}: {e}") from None
    return CaseSpec(case_id=cid, raw_id=str(raw), image=image, patient_id=str(row.get("patient_id") or ""),
                    split=str(row.get("split") or ""), series_uid=(row.get("series_uid") or None),
                    mask=path("mask"), mask_dir=path("mask_dir"), findings=str(row.get("findings") or ""),
                    impressions=str(row.get("impressions") or ""), report=str(row.get("report") or ""),
                    rescale=rescale, spacing=spacing)


def read_manifest(path: str | Path) -> list[CaseSpec]:
    """Read a CSV (header row) or JSONL manifest."""
    p = Path(path)
    if not p.is_file():
        raise FvlmError(f"manifest not found: {p}")
    rows: list[tuple[str, dict]] = []
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for ln, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FvlmError(f"{p}:{ln}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise FvlmError(f"{p}:{ln}: each line must be a JSON object")
                rows.append((f"{p.name}:{ln}", obj))
    else:
        with open(p, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise FvlmError(f"{p}: a CSV manifest needs a header row with at least 'case_id' and 'image' "
                                f"(found {reader.fieldnames})")
            for ln, r in enumerate(reader, 2):
                rows.append((f"{p.name}:{ln}", r))
    return _dedupe([_row_to_spec(r, p.parent, where) for where, r in rows], str(p))


def _dedupe(specs: list[CaseSpec], where: str) -> list[CaseSpec]:
    seen: dict = {}
    for s in specs:
        if s.case_id in seen:
            raise FvlmError(f"{where}: case id {s.case_id!r} occurs twice (raw ids {seen[s.case_id]!r} and "
                            f"{s.raw_id!r}); case ids must be unique after sanitising")
        seen[s.case_id] = s.raw_id
    return specs


def _is_dicom_dir(d: Path) -> bool:
    for f in list(d.iterdir())[:5]:
        if f.is_file():
            try:
                with open(f, "rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                pass
    return False


def scan_folder(root: str | Path) -> list[CaseSpec]:
    """Every ``.nii``/``.nii.gz`` file and every folder holding DICOM files under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise FvlmError(f"input folder not found: {root}")
    specs = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and p.name.lower().endswith((".nii", ".nii.gz")):
            cid = rel[: -len(".nii.gz")] if rel.lower().endswith(".nii.gz") else rel[: -len(".nii")]
            specs.append(CaseSpec(case_id=sanitize_case_id(cid), raw_id=rel, image=str(p)))
        elif p.is_dir() and _is_dicom_dir(p):
            specs.append(CaseSpec(case_id=sanitize_case_id(rel), raw_id=rel, image=str(p)))
    if not specs:
        raise FvlmError(f"{root}: no .nii/.nii.gz files or DICOM folders found")
    return _dedupe(specs, str(root))


# --------------------------------------------------------------------------- CT-RATE


def _csvs_with(root: Path, column: str) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*.csv")):
        try:
            with open(p, newline="", encoding="utf-8-sig") as f:
                head = next(csv.reader(f), [])
        except (OSError, UnicodeDecodeError):
            continue
        if column in head:
            out.append(p)
    return out


def is_ctrate(root: str | Path) -> bool:
    """A CT-RATE download: a reports CSV with ``VolumeName`` and ``Findings_EN``."""
    root = Path(root)
    return any("Findings_EN" in _header(p) for p in _csvs_with(root, "VolumeName"))


def _header(p: Path) -> list[str]:
    with open(p, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


def read_ctrate(root: str | Path) -> list[CaseSpec]:
    """CT-RATE layout: volumes ``{train,valid}/<patient>/<study>/<VolumeName>``, reports CSVs
    (``VolumeName, Findings_EN, Impressions_EN``) and metadata CSVs (``VolumeName, RescaleSlope,
    RescaleIntercept, XYSpacing, ZSpacing``). Patient id = the first two ``_`` fields of the name
    (``train_12``), split = the first (``train``/``valid``)."""
    root = Path(root)
    reports: dict = {}
    meta: dict = {}
    for p in _csvs_with(root, "VolumeName"):
        head = _header(p)
        with open(p, newline="", encoding="utf-8-sig") as f:
            for r in csv.DictReader(f):
                name = (r.get("VolumeName") or "").strip()
                if not name:
                    continue
                if "Findings_EN" in head or "Impressions_EN" in head:
                    reports[name] = r
                if "RescaleIntercept" in head or "XYSpacing" in head:
                    meta[name] = r
    vols = {p.name: p for p in root.rglob("*.nii.gz")}
    vols.update({p.name: p for p in root.rglob("*.nii") if p.name not in vols})
    if not vols:
        raise FvlmError(f"{root}: CT-RATE layout detected but no .nii.gz volumes found")
    specs = []
    for name in sorted(vols):
        stem = name.split(".nii")[0]
        parts = stem.split("_")
        m = meta.get(name) or meta.get(stem) or {}
        r = reports.get(name) or reports.get(stem) or {}
        rescale = None
        slope, inter = _float_or_none(m.get("RescaleSlope")), _float_or_none(m.get("RescaleIntercept"))
        if slope is not None or inter is not None:
            rescale = (slope if slope is not None else 1.0, inter if inter is not None else 0.0)
        spacing = None
        try:
            xy = m.get("XYSpacing")
            z = _float_or_none(m.get("ZSpacing"))
            if xy and z:
                vals = [float(v) for v in re.split(r"[,\s\[\]]+", xy) if v]
                spacing = (vals[0], vals[-1], z)
        except ValueError:
            spacing = None
        split = parts[0] if parts and parts[0] in ("train", "valid", "test") else vols[name].parent.parts[-3:][0]
        specs.append(CaseSpec(
            case_id=sanitize_case_id(stem), raw_id=name, image=str(vols[name]),
            patient_id="_".join(parts[:2]) if len(parts) >= 2 else stem, split=split,
            findings=str(r.get("Findings_EN") or ""), impressions=str(r.get("Impressions_EN") or ""),
            rescale=rescale, spacing=spacing, extra={"ctrate": True}))
    return _dedupe(specs, str(root))


def collect_cases(manifest: str | None, input_dir: str | None, layout: str = "auto") -> list[CaseSpec]:
    if bool(manifest) == bool(input_dir):
        raise FvlmError("give exactly one of --manifest FILE or --input DIR")
    if manifest:
        return read_manifest(manifest)
    if layout == "ctrate" or (layout == "auto" and is_ctrate(input_dir)):
        return read_ctrate(input_dir)
    return scan_folder(input_dir)


def hash_id(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()[:16]
