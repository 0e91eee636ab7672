"""benchmarks/preprocess_bench.py: the three per-case methods do the work they claim, on the shipped CT."""
import importlib
import sys
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parents[1]
CT = REPO / "fvlm" / "samples" / "ct"


def _bench():
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module("preprocess_bench")


def test_each_method_writes_a_compressed_file_of_the_resampled_grid(tmp_path, monkeypatch):
    bench = _bench()
    image, mask = str(CT / "example_ct_sm.nii.gz"), str(CT / "example_seg.nii.gz")
    kept = []
    real = bench._write_arrays

    def keep(path, arrays, layout):      # what MONAI and the floor write, for the checks below
        real(path, arrays, layout)
        with h5py.File(path, "r") as f:
            kept.append({k: (v.dtype, int(v.max()), bool(f[k]._filters)) for k, v in arrays.items()})

    monkeypatch.setattr(bench, "_write_arrays", keep)
    res = {m: bench.child(m, image, mask) for m in ("fvlm", "monai", "floor")}
    for m, r in res.items():
        assert r["seconds"] > r["write_s"] > 0 and r["file_mb"] > 0, m
    # MONAI wrote the volume and the anatomy label map on (about) the grid fvlm resamples to
    monai, floor = kept
    assert set(monai) == {"volume", "label_map"} and set(floor) == {"volume"}
    assert monai["volume"][0] == floor["volume"][0] == np.int16 and monai["label_map"][0] == np.uint8
    assert 5 <= monai["label_map"][1] <= 15                 # anatomy ids of fvlm15, not TotalSegmentator ids
    assert all(c for d in kept for _, _, c in d.values())   # every array compressed
    fv, mo = res["fvlm"]["shape"], res["monai"]["shape"]
    assert all(abs(a - b) <= 1 for a, b in zip(fv, mo)), (fv, mo)
    assert all(abs(a - b) <= 1 for a, b in zip(fv, res["floor"]["shape"]))
    assert res["monai"]["boxes"] >= 5                      # anatomies found in the label map
    # fvlm's file holds the volume and the label map: more than the floor's volume alone
    assert res["fvlm"]["file_mb"] > res["floor"]["file_mb"]
