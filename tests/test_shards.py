"""Shard writer/reader round trip (fvlm.data.shards, layout v2), on generated data with known answers.

v2 stores each case's resampled volume and label map once; crops and the volume-mode volume
are cut when read. The references below cut them from the full in-memory volume with the
plain numpy window (native crops) and the whole-array sampler (resized crops).
"""
import json

import numpy as np
import pytest

from fvlm.data import CaseRecord, ShardDataset, ShardLayout, window
from fvlm.data.crop import crop_positions
from fvlm.data.sampling import cut, sample_axes
from fvlm.data.shards import (AIR_HU, CODECS, concat_shards, open_h5, read_dataset_info, write_dataset_info,
                              write_index, write_shard)
from fvlm.errors import FormatError, FvlmError
from preprocess.crop import center_fit
from preprocess.crop import window as np_window

# lung fits its crop (native voxels); liver does not (one scale factor, resampled)
LAYOUT = ShardLayout(anatomies=["lung", "liver"], whole_shape=(16, 12, 8), spacing_mm=(1.0, 1.0, 2.0),
                     crop_shapes={"lung": (8, 8, 4), "liver": (6, 6, 4)}, margins_mm={"lung": 1.0, "liver": 0.0},
                     chunk_shape=(4, 4, 4))
SHAPES = [(18, 11, 9), (14, 13, 7), (16, 12, 8), (20, 9, 10)]


def _rec(i: int, layout=LAYOUT) -> CaseRecord:
    rng = np.random.default_rng(i)
    shape = SHAPES[i % len(SHAPES)]
    vol = rng.integers(-1000, 1000, size=shape).astype(np.int16)
    lab = np.zeros(shape, np.uint8)
    lab[2:6, 2 + i % 2:6, 1:3] = 1          # lung: small, near the border
    present = {"lung": True, "liver": i % 2 == 0}
    bbox = {"lung": (2, 2 + i % 2, 1, 6, 6, 3)}
    if present["liver"]:
        lab[7:shape[0] - 1, 1:shape[1] - 1, 2:shape[2]] = 2   # liver: larger than its crop
        bbox["liver"] = (7, 1, 2, shape[0] - 1, shape[1] - 1, shape[2])
    return CaseRecord(case_id=f"c{i}", patient_id=f"p{i // 2}", split="train" if i < 3 else "valid",
                      spacing_mm=layout.spacing_mm, volume=vol, label_map=lab, present=present,
                      report={"findings": f"F{i} é", "impressions": "I"},
                      anatomy_text={"lung": {"status": "normal", "sentences": ["Lungs clear."]}},
                      labels={"emphysema": 0}, meta={"source_sha256": "ab"}, bbox=bbox)


def _write(root, n=4, per=3, layout=LAYOUT):
    rows = []
    for s in range(0, n, per):
        recs = [_rec(i, layout) for i in range(s, min(n, s + per))]
        rel = f"shards/000-{s // per:05d}.h5"
        write_shard(root / rel, layout, iter(recs), n=len(recs))
        rows += [{"case_id": r.case_id, "patient_id": r.patient_id, "split": r.split, "shard": rel, "row": k,
                  "anatomies": [a for a in layout.anatomies if r.present[a]]} for k, r in enumerate(recs)]
    write_index(root / "index.jsonl", rows)
    write_dataset_info(root, layout, {"anatomy_set": "test"})
    return rows


def _reference_crop(rec: CaseRecord, a: str, layout=LAYOUT):
    """The crop cut from the full in-memory volume: a numpy window, or the whole-array sampler."""
    label = layout.anatomies.index(a) + 1
    pos, scale = crop_positions(rec.bbox[a], layout.spacing_mm, layout.crop_shapes[a], layout.margin(a),
                                layout.crop_oversize)
    if scale == 1.0:
        start = [int(p[0]) for p in pos]
        shape = layout.crop_shapes[a]
        return (np_window(rec.volume, start, shape, AIR_HU),
                (np_window(rec.label_map, start, shape, 0) == label).astype(np.uint8), scale)
    img = sample_axes(rec.volume, pos, linear=True, pad=AIR_HU, out_dtype=np.int16)
    return img, (sample_axes(rec.label_map, pos, linear=False, pad=0) == label).astype(np.uint8), scale


def test_round_trip(tmp_path):
    _write(tmp_path)
    ds = ShardDataset(tmp_path)
    assert ds.anatomies == ["lung", "liver"] and len(ds) == 4
    assert ds.case_ids("valid") == ["c3"] and ShardDataset(tmp_path, split="train").case_ids() == ["c0", "c1", "c2"]
    scales = set()
    for i in range(4):
        want = _rec(i)
        got = ds.get(f"c{i}")
        vol, off = center_fit(want.volume, LAYOUT.whole_shape, AIR_HU)
        lab, _ = center_fit(want.label_map, LAYOUT.whole_shape, 0)
        np.testing.assert_array_equal(got.volume, vol)
        np.testing.assert_array_equal(got.label_map, lab)
        # bbox is on the returned volume grid
        assert got.bbox["lung"] == tuple(v + off[k % 3] for k, v in enumerate(want.bbox["lung"]))
        assert got.present == want.present and got.report == want.report and got.labels == want.labels
        assert got.anatomy_text == want.anatomy_text and got.meta == want.meta and got.patient_id == want.patient_id
        for a in LAYOUT.anatomies:
            if not want.present[a]:  # absent: padding, as if cut outside the scan
                assert got.bbox[a] is None
                assert (got.crops[a] == AIR_HU).all() and (got.crop_masks[a] == 0).all()
                continue
            img, msk, scale = _reference_crop(want, a)
            scales.add(scale == 1.0)
            np.testing.assert_array_equal(got.crops[a], img)       # voxel for voxel
            np.testing.assert_array_equal(got.crop_masks[a], msk)
            one, one_m, _ = ds.crop(f"c{i}", a)                    # the single-hyperslab path
            np.testing.assert_array_equal(one, img)
            np.testing.assert_array_equal(one_m, msk)
    assert scales == {True, False}  # both crop kinds were checked
    rec = ds.get("c2", anatomies=["liver"], volume=False)
    assert rec.volume is None and list(rec.crops) == ["liver"]
    assert rec.bbox["liver"] == _rec(2).bbox["liver"]  # no volume read: bbox on the stored grid
    crop, mask, present = ds.crop("c1", "liver")
    assert not present and crop.shape == (6, 6, 4)
    assert ds[0].case_id == "c0"


class _Recorder:
    """A sliceable source that records what is read."""

    def __init__(self, arr):
        self.arr, self.reads = arr, []
        self.shape, self.dtype = arr.shape, arr.dtype

    def __getitem__(self, key):
        self.reads.append(key)
        return self.arr[key]


def test_cut_reads_only_the_box_and_matches_the_full_array():
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 1000, size=(40, 30, 20)).astype(np.int16)
    pos = [np.linspace(10.2, 17.9, 6), np.linspace(-3.0, 8.4, 5), np.linspace(4.0, 25.0, 7)]  # leaves the volume
    src = _Recorder(vol)
    got = cut(src, pos, linear=True, pad=AIR_HU, out_dtype=np.int16)
    np.testing.assert_array_equal(got, sample_axes(vol, pos, linear=True, pad=AIR_HU, out_dtype=np.int16))
    (key,) = src.reads
    assert key == (slice(10, 19), slice(0, 10), slice(4, 20))  # the voxels the lerp touches
    src = _Recorder(vol)   # entirely outside: nothing is read
    out = cut(src, [np.arange(3.0) + 50, np.arange(2.0), np.arange(2.0)], linear=False, pad=0)
    assert not src.reads and (out == 0).all()


@pytest.mark.parametrize("linear", [False, True])
def test_cut_fast_paths_equal_the_reference(tmp_path, monkeypatch, linear):
    """The whole-voxel window copy (numpy and h5py read_direct) and the separable nearest takes give
    the values of ``sample_axes`` on the full array, padded or not, and never mutate the source."""
    import h5py

    import fvlm.data.sampling as sampling

    copies = []
    real_copy = sampling._copy_window
    monkeypatch.setattr(sampling, "_copy_window", lambda *a: copies.append(1) or real_copy(*a))

    rng = np.random.default_rng(1)
    vol = rng.integers(-1000, 1000, size=(30, 24, 16)).astype(np.int16)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("v", data=vol, chunks=(8, 8, 4))
    keep = vol.copy()
    cases = [
        [np.arange(3.0, 19.0), np.arange(0.0, 24.0), np.arange(2.0, 9.0)],      # inside window
        [np.arange(-4.0, 12.0), np.arange(20.0, 30.0), np.arange(-2.0, 18.0)],   # window, padded
        [np.linspace(2.0, 21.0, 11), np.arange(5.0, 9.0), np.linspace(-3, 18, 9)],  # resized, padded
        [np.arange(3.0, 19.0) + 0.5, np.arange(4.0), np.arange(3.0)],             # half-voxel shift
    ]
    with h5py.File(tmp_path / "v.h5", "r") as f:
        for pos in cases:
            for pad in (AIR_HU, None):
                outside = any(((p < -0.5) | (p > n - 0.5)).any() for p, n in zip(pos, vol.shape))
                if pad is None and outside:
                    continue
                want = sample_axes(vol, pos, linear=linear, pad=pad, out_dtype=np.int16)
                for src in (vol, f["v"]):
                    got = cut(src, pos, linear=linear, pad=pad, out_dtype=np.int16)
                    assert got.dtype == want.dtype
                    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(vol, keep)
    assert len(copies) == 6   # the two whole-voxel windows took the copy path (3 pad/source pairs each)
    fvol = vol.astype(np.float32) + 0.6    # float -> int16 is rounded, never truncated by a plain copy
    for pos in cases:
        want = sample_axes(fvol, pos, linear=linear, pad=AIR_HU, out_dtype=np.int16)
        np.testing.assert_array_equal(cut(fvol, pos, linear=linear, pad=AIR_HU, out_dtype=np.int16), want)


def test_whole_spacing_resampled_at_read(tmp_path):
    from preprocess.geometry import resample

    layout = ShardLayout(anatomies=["lung", "liver"], whole_shape=(10, 8, 6), spacing_mm=(1.0, 1.0, 2.0),
                         whole_spacing_mm=(2.0, 1.5, 3.0), crop_shapes=LAYOUT.crop_shapes, chunk_shape=(4, 4, 4))
    _write(tmp_path, n=2, layout=layout)
    ds = ShardDataset(tmp_path)
    for i in range(2):
        want = _rec(i, layout)
        got = ds.get(f"c{i}", crops=False)
        v = resample(want.volume, layout.spacing_mm, layout.whole_spacing_mm, linear=True, out_dtype=np.int16)
        m = resample(want.label_map, layout.spacing_mm, layout.whole_spacing_mm, linear=False)
        np.testing.assert_array_equal(got.volume, center_fit(v, layout.whole_shape, AIR_HU)[0])
        np.testing.assert_array_equal(got.label_map, center_fit(m, layout.whole_shape, 0)[0])
        assert got.spacing_mm == layout.whole_spacing_mm
        ys = np.nonzero((got.label_map == 1).any(axis=(0, 2)))[0]
        assert got.bbox["lung"][1] == ys.min() and got.bbox["lung"][4] == ys.max() + 1


@pytest.mark.parametrize("codec", CODECS)
def test_codecs_round_trip(tmp_path, codec):
    layout = ShardLayout(anatomies=LAYOUT.anatomies, crop_shapes=LAYOUT.crop_shapes, whole_shape=None,
                         spacing_mm=LAYOUT.spacing_mm, compression=codec, chunk_shape=(8, 8, 4))
    _write(tmp_path, n=2, layout=layout)
    ds = ShardDataset(tmp_path)
    assert ds.get("c0").volume is None  # whole.enabled=false: no volume-mode input
    with open_h5(tmp_path / "shards/000-00000.h5") as f:
        np.testing.assert_array_equal(f["volume/1"][()], _rec(1, layout).volume)
        np.testing.assert_array_equal(f["label_map/0"][()], _rec(0, layout).label_map)
        assert f["volume/0"].chunks == (8, 8, 4)


def test_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a)
    _write(b)
    for p in sorted((a / "shards").glob("*.h5")):
        assert p.read_bytes() == (b / "shards" / p.name).read_bytes()
    assert not list((a / "shards").glob("*.tmp"))


def test_window():
    hu = np.array([-2000, -1150, -400, 350, 3000], np.int16)
    np.testing.assert_allclose(window(hu), [0, 0, 0.5, 1, 1], atol=1e-6)
    assert window(hu).dtype == np.float32
    import torch
    t = window(torch.from_numpy(hu), -1000, 1000)
    assert t.dtype == torch.float32 and abs(float(t[2]) - 0.3) < 1e-6
    with pytest.raises(ValueError):
        window(hu, 10, 0)


def test_errors(tmp_path):
    with pytest.raises(FormatError, match="dataset.json"):
        ShardDataset(tmp_path)
    _write(tmp_path)
    ds = ShardDataset(tmp_path)
    with pytest.raises(FvlmError, match="not in"):
        ds.get("nope")
    with pytest.raises(FvlmError, match="unknown anatomy"):
        ds.get("c0", anatomies=["heart"])
    info = json.loads((tmp_path / "dataset.json").read_text())
    info["version"] = 99
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(FormatError, match="version 99"):
        read_dataset_info(tmp_path)
    (tmp_path / "index.jsonl").unlink()
    info["version"] = 2
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    (tmp_path / "index-000-of-002.jsonl").write_text("")
    with pytest.raises(FormatError, match="merge"):
        ShardDataset(tmp_path)


def test_pickle_and_fork(tmp_path):
    import pickle
    _write(tmp_path)
    ds = ShardDataset(tmp_path)
    ds.get("c0")
    ds2 = pickle.loads(pickle.dumps(ds))
    assert ds2.get("c1").case_id == "c1"


def test_shape_mismatch_rejected(tmp_path):
    r = _rec(0)
    r.label_map = r.label_map[:-1]
    with pytest.raises(ValueError, match="label map shape"):
        write_shard(tmp_path / "x.h5", LAYOUT, [r], n=1)
    assert not (tmp_path / "x.h5").exists()


def test_concat_copies_chunks(tmp_path):
    parts = [write_shard(tmp_path / f"p{i}.h5", LAYOUT, [_rec(i)], n=1) for i in range(3)]
    concat_shards(tmp_path / "root/shards/000-00000.h5", LAYOUT, parts)
    write_index(tmp_path / "root/index.jsonl", [{"case_id": f"c{i}", "shard": "shards/000-00000.h5", "row": i,
                                                 "anatomies": []} for i in range(3)])
    write_dataset_info(tmp_path / "root", LAYOUT)
    ds = ShardDataset(tmp_path / "root")
    with open_h5(tmp_path / "root/shards/000-00000.h5") as f:
        for i in range(3):
            r = ds.get(f"c{i}")
            assert r.meta == _rec(i).meta and r.present == _rec(i).present
            with open_h5(parts[i]) as p:
                src, dst = p["volume/0"], f[f"volume/{i}"]
                assert dst.shape == SHAPES[i] and dst.id.get_num_chunks() == src.id.get_num_chunks()
                for c in range(src.id.get_num_chunks()):  # the compressed bytes, copied as stored
                    off = src.id.get_chunk_info(c).chunk_offset
                    assert dst.id.read_direct_chunk(off) == src.id.read_direct_chunk(off)


def test_v1_directory_gets_a_one_line_rerun_error(tmp_path):
    _write(tmp_path)
    info = json.loads((tmp_path / "dataset.json").read_text())
    info["version"] = 1
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with pytest.raises(FormatError, match="re-run `fvlm preprocess`") as e:
        ShardDataset(tmp_path)
    assert "\n" not in str(e.value)
    info["version"] = 2
    (tmp_path / "dataset.json").write_text(json.dumps(info))
    with open_h5(tmp_path / "shards/000-00000.h5", "a") as f:   # a v1 shard file under a v2 index
        f.attrs["version"] = 1
    with pytest.raises(FormatError, match="version 1 .*re-run"):
        ShardDataset(tmp_path).get("c0")
