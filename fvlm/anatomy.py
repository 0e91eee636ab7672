"""Anatomy sets: named groups of TotalSegmentator classes (``configs/anatomy/*.yaml``).

An anatomy set is data, not code: each anatomy lists the TotalSegmentator class
*names* that make it up, per class-map version (``classes`` for v2 ``total``,
``classes_v1`` for the old 104-class v1 map), plus the crop geometry used by
``fvlm preprocess``::

    aset = load_anatomy_set("fvlm15")          # or "ctrate4" or a path to a YAML file
    aset.ids                                   # ['lung', 'heart', ...] (label-map order)
    aset["lung"].classes                       # v2 class names
    aset.lookup("v2")                          # uint8 array: TotalSegmentator id -> anatomy index + 1 (0 = none)

The file format is ``format: fvlm-anatomy``, ``version: 1`` (docs/FORMATS.md).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .config import safe_yaml  # size and alias-expansion caps of untrusted YAML
from .errors import FormatError, FvlmError, check_format
from .resources import config_path, samples_dir

__all__ = ["Anatomy", "AnatomySet", "load_anatomy_set", "load_class_map", "CLASS_MAP_VERSIONS",
           "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "fvlm-anatomy"
FORMAT_VERSION = 1
#: class-map version -> (number of classes, JSON file shipped with fvlm)
CLASS_MAP_VERSIONS = {"v2": (117, "class_map_total_v2.json"), "v1": (104, "class_map_total_v1.json")}


@lru_cache(maxsize=None)
def load_class_map(version: str = "v2") -> dict[int, str]:
    """TotalSegmentator ``total`` task class map: label id -> class name.

    ``version``: ``"v2"`` (117 classes, TotalSegmentator >= 2.0) or ``"v1"`` (104 classes).
    """
    if version not in CLASS_MAP_VERSIONS:
        raise FvlmError(f"unknown TotalSegmentator class-map version {version!r}; "
                        f"use one of {', '.join(CLASS_MAP_VERSIONS)}")
    n, fname = CLASS_MAP_VERSIONS[version]
    with open(samples_dir() / "ct" / fname, encoding="utf-8") as f:
        raw = json.load(f)
    out = {int(k): str(v) for k, v in raw.items()}
    assert len(out) == n, f"{fname}: expected {n} classes, found {len(out)}"
    return out


@dataclass(frozen=True)
class Anatomy:
    """One anatomy of a set.

    ``crop_shape`` is ``(x, y, z)`` voxels at the set's ``target_spacing_mm``;
    ``margin_mm`` is added to every side of the mask's bounding box before cropping.
    """
    id: str
    name: str
    classes: tuple[str, ...]
    classes_v1: tuple[str, ...] = ()
    crop_shape: tuple[int, int, int] = (96, 96, 32)
    margin_mm: float = 5.0
    region: str = ""
    note: str = ""

    def classes_for(self, map_version: str = "v2") -> tuple[str, ...]:
        """The class names of this anatomy in a class-map version (``"v2"`` or ``"v1"``)."""
        return self.classes if map_version == "v2" else self.classes_v1


@dataclass(frozen=True)
class AnatomySet:
    """An ordered set of anatomies; index ``i`` is label ``i + 1`` in anatomy label maps."""
    name: str
    anatomies: tuple[Anatomy, ...]
    task: str = "total"
    class_map: str = "v2"
    class_maps: tuple[str, ...] = ("v2",)
    target_spacing_mm: tuple[float, float, float] = (1.0, 1.0, 3.0)
    description: str = ""
    source: str = ""
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self._index.update({a.id: i for i, a in enumerate(self.anatomies)})

    @property
    def ids(self) -> list[str]:
        return [a.id for a in self.anatomies]

    def __len__(self) -> int:
        return len(self.anatomies)

    def __iter__(self):
        return iter(self.anatomies)

    def __contains__(self, anatomy_id: str) -> bool:
        return anatomy_id in self._index

    def __getitem__(self, anatomy_id: str) -> Anatomy:
        try:
            return self.anatomies[self._index[anatomy_id]]
        except KeyError:
            raise FvlmError(f"anatomy {anatomy_id!r} is not in anatomy set {self.name!r} "
                            f"({', '.join(self.ids)})") from None

    def label(self, anatomy_id: str) -> int:
        """The value of ``anatomy_id`` in an anatomy label map (1-based; 0 is background)."""
        self[anatomy_id]
        return self._index[anatomy_id] + 1

    def class_ids(self, map_version: str | None = None) -> dict[str, list[int]]:
        """anatomy id -> TotalSegmentator label ids in ``map_version`` (default: the set's map)."""
        mv = map_version or self.class_map
        if mv not in self.class_maps:
            raise FvlmError(f"anatomy set {self.name!r} has no class names for TotalSegmentator map {mv!r} "
                            f"(it supports {', '.join(self.class_maps)})")
        by_name = {v: k for k, v in load_class_map(mv).items()}
        return {a.id: sorted(by_name[c] for c in a.classes_for(mv)) for a in self.anatomies}

    def lookup(self, map_version: str | None = None) -> np.ndarray:
        """A ``uint8`` lookup table of length 256: TotalSegmentator id -> anatomy label (0 = none).

        ``lut[ts_labels]`` turns a TotalSegmentator label map into an anatomy label map.
        """
        lut = np.zeros(256, dtype=np.uint8)
        for i, (aid, ids) in enumerate(self.class_ids(map_version).items()):
            lut[ids] = i + 1
        return lut

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "name": self.name,
            "description": self.description,
            "segmenter": {"tool": "TotalSegmentator", "task": self.task, "class_map": self.class_map},
            "class_maps": list(self.class_maps), "target_spacing_mm": list(self.target_spacing_mm),
            "anatomies": [{"id": a.id, "name": a.name, "region": a.region, "classes": list(a.classes),
                           "classes_v1": list(a.classes_v1), "crop_shape": list(a.crop_shape),
                           "margin_mm": a.margin_mm} for a in self.anatomies],
        }


def _resolve(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.is_file():
        return p
    try:
        return config_path(Path("anatomy") / p.name if p.suffix else Path("anatomy") / f"{p}.yaml")
    except FvlmError:
        shipped = sorted(x.stem for x in config_path("anatomy/fvlm15").parent.glob("*.yaml"))
        raise FvlmError(f"anatomy set not found: {name_or_path} (give a YAML path or one of "
                        f"{', '.join(shipped)})") from None


def _shape(v, where: str) -> tuple[int, int, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(isinstance(x, int) and x > 0 for x in v):
        raise FormatError(f"{where}: crop_shape must be three positive integers [x, y, z], got {v!r}")
    return tuple(int(x) for x in v)


@lru_cache(maxsize=32)
def _load(path: str) -> AnatomySet:
    p = Path(path)
    data = safe_yaml(p.read_text(encoding="utf-8"), p)
    check_format(data, FORMAT_NAME, FORMAT_VERSION, p, what="an anatomy set")
    seg = data.get("segmenter") or {}
    default_map = str(seg.get("class_map", "v2"))
    maps = tuple(str(m) for m in data.get("class_maps", [default_map]))
    for m in maps:
        if m not in CLASS_MAP_VERSIONS:
            raise FormatError(f"{p}: unknown class map {m!r} (known: {', '.join(CLASS_MAP_VERSIONS)})")
    if default_map not in maps:
        raise FormatError(f"{p}: segmenter.class_map {default_map!r} is not in class_maps {list(maps)}")
    rows = data.get("anatomies")
    if not isinstance(rows, list) or not rows:
        raise FormatError(f"{p}: 'anatomies' must be a non-empty list")
    if len(rows) > 254:
        raise FormatError(f"{p}: at most 254 anatomies fit a uint8 label map")
    anats = []
    seen_ids: set = set()
    for i, r in enumerate(rows):
        where = f"{p}: anatomies[{i}]"
        if not isinstance(r, dict) or "id" not in r:
            raise FormatError(f"{where}: each anatomy needs at least 'id' and 'classes'")
        aid = str(r["id"])
        if aid in seen_ids:
            raise FormatError(f"{where}: duplicate anatomy id {aid!r}")
        seen_ids.add(aid)
        anats.append(Anatomy(
            id=aid, name=str(r.get("name", aid)), classes=tuple(r.get("classes") or ()),
            classes_v1=tuple(r.get("classes_v1") or ()),
            crop_shape=_shape(r.get("crop_shape", [96, 96, 32]), f"{where} ({aid})"),
            margin_mm=float(r.get("margin_mm", 5.0)), region=str(r.get("region", "")),
            note=str(r.get("note", ""))))
    # every class name must exist in the declared map, and belong to one anatomy only
    for m in maps:
        names = set(load_class_map(m).values())
        owner: dict[str, str] = {}
        for a in anats:
            cls = a.classes_for(m)
            if not cls:
                raise FormatError(f"{p}: anatomy {a.id!r} lists no classes for class map {m}")
            for c in cls:
                if c not in names:
                    import difflib
                    close = difflib.get_close_matches(c, sorted(names), n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    raise FormatError(f"{p}: anatomy {a.id!r}: {c!r} is not a TotalSegmentator {m} class{hint}")
                if c in owner:
                    raise FormatError(f"{p}: class {c!r} is in both {owner[c]!r} and {a.id!r}")
                owner[c] = a.id
    ts = data.get("target_spacing_mm", [1.0, 1.0, 3.0])
    return AnatomySet(name=str(data.get("name", p.stem)), anatomies=tuple(anats),
                      task=str(seg.get("task", "total")), class_map=default_map, class_maps=maps,
                      target_spacing_mm=tuple(float(x) for x in ts),
                      description=str(data.get("description", "")), source=str(p))


def load_anatomy_set(name_or_path: str | Path) -> AnatomySet:
    """Load and validate an anatomy set by name (``"fvlm15"``, ``"ctrate4"``) or YAML path.

    Raises :class:`~fvlm.errors.FormatError` naming the file and entry on any problem
    (unknown class name, class in two anatomies, bad crop shape, wrong format/version).
    """
    return _load(str(_resolve(name_or_path).resolve()))
