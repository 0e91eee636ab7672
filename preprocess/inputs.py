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
import logging
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from fvlm.anatomy import CLASS_MAP_VERSIONS, load_class_map
from fvlm.errors import FvlmError
from fvlm.jsonl import read_jsonl

from .masks import NO_WEIGHTS_HINT, detect_class_map, ts_available

__all__ = ["CaseSpec", "sanitize_case_id", "read_manifest", "scan_folder", "is_ctrate", "read_ctrate",
           "collect_cases", "index_masks", "attach_masks", "check_masks", "VOLUME_CHOICES"]

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
log = logging.getLogger("fvlm.preprocess")


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
        rows = [(f"{p.name}:{ln}", obj) for ln, obj in read_jsonl(p, objects=True)]
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


def scan_folder(root: str | Path, exclude: str | None = None) -> list[CaseSpec]:
    """Every ``.nii``/``.nii.gz`` file and every folder holding DICOM files under ``root``
    (except under ``exclude``, a masks folder inside it)."""
    root = Path(root)
    if not root.is_dir():
        raise FvlmError(f"input folder not found: {root}")
    ex = Path(exclude).resolve() if exclude else None
    specs = []
    for p in sorted(root.rglob("*")):
        if ex is not None and (p.resolve() == ex or ex in p.resolve().parents):
            continue
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


#: columns that make a CSV a CT-RATE reports CSV; it must then also have VolumeName and Findings_EN
_REPORT_COLS = ("Findings_EN", "Impressions_EN", "ClinicalInformation_EN", "Technique_EN")


def _check_reports_header(p: Path, head: list[str]) -> None:
    """A CSV with CT-RATE report columns but without ``VolumeName`` or ``Findings_EN`` would give
    empty reports and one patient per scan; one line names the missing column instead."""
    have = [c for c in _REPORT_COLS if c in head]
    missing = [c for c in ("VolumeName", "Findings_EN") if c not in head]
    if have and missing:
        raise FvlmError(f"{p}: a CT-RATE reports CSV (columns {', '.join(have)}) without the "
                        f"{' and '.join(missing)} column; fix its header row (names are matched exactly)")


def is_ctrate(root: str | Path) -> bool:
    """A CT-RATE download: a reports CSV with ``VolumeName`` and ``Findings_EN``."""
    root = Path(root)
    found = False
    for p in sorted(root.rglob("*.csv")):
        try:
            head = _header(p)
        except (OSError, UnicodeDecodeError):
            continue
        _check_reports_header(p, head)
        found = found or ("VolumeName" in head and "Findings_EN" in head)
    return found


def _header(p: Path) -> list[str]:
    with open(p, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


#: volume copies of CT-RATE: v1 (train/, valid/: blank headers, raw values) and the fixed v2
#: re-release (train_fixed/, valid_fixed/: proper headers, HU); config ctrate.volumes picks
VOLUME_CHOICES = ("prefer_fixed", "fixed", "original")
_MASK_DIR = re.compile(r"seg|mask|label", re.I)


def _version_of(rel_dirs: tuple[str, ...]) -> str:
    return "v2" if any(d.lower().endswith("_fixed") or d.lower() == "fixed" for d in rel_dirs) else "v1"


def _nifti_stem(name: str) -> str:
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name.rsplit(".nii", 1)[0]


def index_masks(folder: Path, under: Path | None = None) -> dict[str, dict[str, str]]:
    """TotalSegmentator label maps named by volume: ``{stem: {"v1"|"v2"|"any": path}}``.

    A label map is a multilabel ``<stem>.nii.gz`` or a folder ``<stem>/`` of per-class
    ``<class>.nii.gz`` masks. Its version is v2 when a folder on its path ends with
    ``_fixed`` (a mask made for the fixed copy), v1 when the path names ``train``/``valid``
    without it, else ``any``.
    """
    out: dict[str, dict[str, str]] = {}
    if not folder.is_dir():
        return out
    for p in sorted(folder.rglob("*.nii*")):
        if not p.name.lower().endswith((".nii", ".nii.gz")) or not p.is_file():
            continue
        rel = p.relative_to(folder).parts
        stem, target = _nifti_stem(p.name), str(p)
        # <stem>/<class>.nii.gz: a folder of binary masks named after the volume
        if len(rel) >= 2 and stem in _class_names():
            stem, target, rel = rel[-2], str(p.parent), rel[:-1]
        dirs = tuple(d for d in rel[:-1])
        ver = _version_of(dirs) if any(re.match(r"^(train|valid|test)", d, re.I) for d in dirs) else "any"
        out.setdefault(stem, {}).setdefault(ver, target)
    return out


@lru_cache(maxsize=1)
def _class_names() -> frozenset:
    return frozenset(n for v in CLASS_MAP_VERSIONS for n in load_class_map(v).values())


def _pick_mask(masks: dict, stem: str, version: str) -> tuple[str | None, str | None]:
    """(mask file, mask folder) for a volume: the same version's label map, else one of any version."""
    m = masks.get(stem) or {}
    path = m.get(version) or m.get("any") or next(iter(m.values()), None)
    if path is None:
        return None, None
    return (None, path) if Path(path).is_dir() else (path, None)


def read_ctrate(root: str | Path, masks_dir: str | None = None, volumes: str = "prefer_fixed") -> list[CaseSpec]:
    """CT-RATE layout: volumes ``{train,valid}[_fixed]/<patient>/<study>/<VolumeName>``, reports CSVs
    (``VolumeName, Findings_EN, Impressions_EN``) and metadata CSVs (``VolumeName, RescaleSlope,
    RescaleIntercept, XYSpacing, ZSpacing``). Patient id = the first two ``_`` fields of the name
    (``train_12``), split = the first (``train``/``valid``).

    The original (v1, ``train/``, ``valid/``) and fixed (v2, ``*_fixed/``) copies of a volume share
    its name; ``volumes`` picks: ``prefer_fixed`` (v2 where it exists, else v1), ``fixed`` or
    ``original`` (only that copy; volumes without it are left out, counted in the log). Anatomy
    label maps named by VolumeName come from ``masks_dir`` first, then from any folder of the
    download whose name says seg/mask/label (the dataset's own segmentation tree); the map made
    for the same copy (v1/v2) is preferred. ``CaseSpec.extra["ctrate_version"]`` records the copy.
    """
    root = Path(root)
    if volumes not in VOLUME_CHOICES:
        raise FvlmError(f"ctrate.volumes must be one of {', '.join(VOLUME_CHOICES)}, got {volumes!r}")
    is_ctrate(root)  # a reports CSV without VolumeName / Findings_EN is one line
    reports, meta = _ctrate_tables(root)
    mdir = Path(masks_dir).resolve() if masks_dir else None
    copies, tree_masks = _ctrate_volumes(root, mdir)
    given = index_masks(mdir) if mdir is not None else {}
    if mdir is not None and not mdir.is_dir():
        raise FvlmError(f"--masks folder not found: {masks_dir}")
    if not copies:
        raise FvlmError(f"{root}: CT-RATE layout detected but no .nii.gz volumes found")
    specs = []
    left_out = 0
    for name in sorted(copies):
        have = copies[name]
        ver = {"prefer_fixed": "v2" if "v2" in have else "v1", "fixed": "v2", "original": "v1"}[volumes]
        if ver not in have:
            left_out += 1
            continue
        stem = _nifti_stem(name)
        mask, mask_d = _pick_mask(given, stem, ver) if stem in given else _pick_mask(tree_masks, stem, ver)
        spec = _ctrate_spec(name, stem, have[ver], ver, meta, reports, mask, mask_d)
        if mask or mask_d:
            spec.extra["mask_found"] = True
        specs.append(spec)
    if left_out:
        log.info("ctrate.volumes=%s: %d volume(s) have no such copy and are left out", volumes, left_out)
    if not specs:
        raise FvlmError(f"{root}: no volume has a {'fixed (v2)' if volumes == 'fixed' else 'original (v1)'} copy "
                        f"(ctrate.volumes={volumes}); try --set ctrate.volumes=prefer_fixed")
    return _dedupe(specs, str(root))


def _ctrate_tables(root: Path) -> tuple[dict, dict]:
    """The report rows and the metadata rows of a CT-RATE download, by VolumeName (identical
    repeated rows are ignored, different ones are an error)."""
    reports: dict = {}
    meta: dict = {}
    seen: dict = {}
    same = 0
    for p in _csvs_with(root, "VolumeName"):
        head = _header(p)
        with open(p, newline="", encoding="utf-8-sig") as f:
            for ln, r in enumerate(csv.DictReader(f), 2):
                name = (r.get("VolumeName") or "").strip()
                if not name:
                    continue
                for kind, table, cols in (("report", reports, _REPORT_COLS),
                                          ("metadata", meta, ("RescaleIntercept", "XYSpacing"))):
                    if not any(c in head for c in cols):
                        continue
                    if name in table:
                        if table[name] != r:
                            raise FvlmError(f"{p}:{ln}: a second, different {kind} row for {name} (first at "
                                            f"{seen[kind, name]}); keep one")
                        same += 1
                        continue
                    table[name] = r
                    seen[kind, name] = f"{p.name}:{ln}"
    if same:
        log.warning("%s: %d repeated identical CT-RATE CSV row(s) ignored", root, same)
    return reports, meta


def _ctrate_volumes(root: Path, mdir: Path | None) -> tuple[dict[str, dict[str, Path]], dict[str, dict[str, str]]]:
    """The volumes of a CT-RATE download (name -> {"v1"/"v2": path}) and the label maps of its own
    segmentation tree (stem -> {version: path}); files under ``mdir`` (the --masks folder) are skipped."""
    copies: dict[str, dict[str, Path]] = {}
    tree_masks: dict[str, dict[str, str]] = {}
    mask_roots = set()
    for p in sorted(root.rglob("*.nii*")):
        if not p.is_file() or not p.name.lower().endswith((".nii", ".nii.gz")):
            continue
        if mdir is not None and mdir in p.resolve().parents:
            continue
        rel_dirs = p.relative_to(root).parts[:-1]
        seg = [i for i, d in enumerate(rel_dirs) if _MASK_DIR.search(d)]
        if seg:                                       # the dataset's own segmentation tree
            mask_roots.add(root.joinpath(*rel_dirs[: seg[0] + 1]))
            continue
        ver = _version_of(rel_dirs)
        have = copies.setdefault(p.name, {})
        if ver in have:
            raise FvlmError(f"{root}: two {ver} copies of {p.name} ({have[ver].relative_to(root)} and "
                            f"{p.relative_to(root)}); remove one")
        have[ver] = p
    for mr in sorted(mask_roots):
        for stem, m in index_masks(mr).items():
            for ver, path in m.items():
                tree_masks.setdefault(stem, {}).setdefault(ver, path)
    return copies, tree_masks


def _ctrate_spec(name: str, stem: str, path: Path, ver: str, meta: dict, reports: dict,
                 mask: str | None, mask_d: str | None) -> CaseSpec:
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
    split = parts[0] if parts and parts[0] in ("train", "valid", "test") else path.parent.parts[-3:][0]
    return CaseSpec(
        case_id=sanitize_case_id(stem), raw_id=name, image=str(path),
        patient_id="_".join(parts[:2]) if len(parts) >= 2 else stem, split=split,
        mask=mask, mask_dir=mask_d,
        findings=str(r.get("Findings_EN") or ""), impressions=str(r.get("Impressions_EN") or ""),
        rescale=rescale, spacing=spacing, extra={"ctrate": True, "ctrate_version": ver})


def attach_masks(specs: list[CaseSpec], masks_dir: str) -> int:
    """Give specs without a mask the label map of ``masks_dir`` named by their case id or file
    name (``<name>.nii.gz`` or ``<name>/<class>.nii.gz``); returns how many got one."""
    d = Path(masks_dir)
    if not d.is_dir():
        raise FvlmError(f"--masks folder not found: {masks_dir}")
    idx = index_masks(d)
    n = 0
    for s in specs:
        if s.mask or s.mask_dir:
            continue
        for key in (s.case_id, _nifti_stem(Path(s.image).name), s.raw_id and _nifti_stem(Path(s.raw_id).name)):
            if key and key in idx:
                s.mask, s.mask_dir = _pick_mask(idx, key, s.extra.get("ctrate_version", "any"))
                s.extra["mask_found"] = True
                n += 1
                break
    return n


def check_masks(specs: list[CaseSpec], cfg) -> None:
    """Before any volume is read: every case must get an anatomy label map (precomputed, or
    TotalSegmentator with local weights), else one line says what to pass; the class map of
    the first precomputed map is detected and must match ``masks.class_map``."""
    src = cfg.masks.source
    if src == "none":
        return
    missing = [s for s in specs if not (s.mask or s.mask_dir)]
    if missing and (src == "precomputed" or (src == "auto" and not ts_available())):
        how = ("pass --masks DIR (TotalSegmentator label maps named by VolumeName or case id: <name>.nii.gz, "
               "or <name>/<class>.nii.gz)")
        why = "masks.source=precomputed" if src == "precomputed" else NO_WEIGHTS_HINT
        if len(missing) == len(specs):
            raise FvlmError(f"no anatomy mask for any of the {len(specs)} cases and {why}: {how}, install "
                            f"TotalSegmentator with its weights, or --mask-source none (whole volumes only)")
        log.warning("%d of %d cases have no anatomy mask (e.g. %s) and %s; they will fail: %s",
                    len(missing), len(specs), missing[0].case_id, why, how)
    # label maps found by name (--masks, the dataset's tree) come as one set: one check for all;
    # a manifest's own masks are checked per case (check_labels)
    first = next((s for s in specs if s.extra.get("mask_found")), None)
    if first is None or src == "totalsegmentator":
        return
    found, why = detect_class_map(first.mask, first.mask_dir)
    if found and found != cfg.masks.class_map:
        raise FvlmError(f"{Path(first.mask or first.mask_dir).name}: the anatomy masks look like TotalSegmentator "
                        f"{found} label maps ({why}) but masks.class_map is {cfg.masks.class_map}: pass "
                        f"--set masks.class_map={found}")
    if found:
        log.info("anatomy masks: TotalSegmentator %s class map (%s)", found, why)


def collect_cases(manifest: str | None, input_dir: str | None, layout: str = "auto", cfg=None) -> list[CaseSpec]:
    """Cases of a manifest or an input folder. With the preprocess ``cfg``: label maps from
    ``masks.dir`` (``--masks``) are attached, CT-RATE copies picked by ``ctrate.volumes``, and
    :func:`check_masks` runs (all before any volume is read)."""
    if bool(manifest) == bool(input_dir):
        raise FvlmError("give exactly one of --manifest FILE or --input DIR")
    masks_dir = getattr(cfg.masks, "dir", None) if cfg is not None else None
    if manifest:
        specs = read_manifest(manifest)
    elif layout == "ctrate" or (layout == "auto" and is_ctrate(input_dir)):
        volumes = getattr(cfg.ctrate, "volumes", "prefer_fixed") if cfg is not None else "prefer_fixed"
        specs = read_ctrate(input_dir, masks_dir=masks_dir, volumes=volumes)
        masks_dir = None
    else:
        specs = scan_folder(input_dir, exclude=masks_dir)
    if masks_dir:
        attach_masks(specs, masks_dir)
    if cfg is not None:
        check_masks(specs, cfg)
    return specs


def hash_id(s: str) -> str:
    return hashlib.sha256(s.encode("utf-8")).hexdigest()[:16]
