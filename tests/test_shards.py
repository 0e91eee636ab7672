"""Shard writer/reader round trip (fvlm.data.shards), on generated data with known answers."""
import json

import numpy as np
import pytest

from fvlm.data import CaseRecord, ShardDataset, ShardLayout, window
from fvlm.data.shards import (AIR_HU, read_dataset_info, write_dataset_info, write_index, write_shard)
from fvlm.errors import FormatError, FvlmError

LAYOUT = ShardLayout(anatomies=["lung", "liver"], whole_shape=(16, 12, 8),
                     crop_shapes={"lung": (8, 8, 4), "liver": (6, 6, 4)})


def _rec(i: int) -> CaseRecord:
    rng = np.random.default_rng(i)
    vol = rng.integers(-1000, 1000, size=(16, 12, 8)).astype(np.int16)
    lab = np.zeros((16, 12, 8), np.uint8)
    lab[2:6, 2:6, 1:3] = 1
    present = {"lung": True, "liver": i % 2 == 0}
    crops = {"lung": vol[:8, :8, :4].copy()}
    masks = {"lung": (lab[:8, :8, :4] == 1).astype(np.uint8)}
    if present["liver"]:
        crops["liver"] = np.full((6, 6, 4), 50 + i, np.int16)
        masks["liver"] = np.ones((6, 6, 4), np.uint8)
    return CaseRecord(case_id=f"c{i}", patient_id=f"p{i // 2}", split="train" if i < 3 else "valid",
                      spacing_mm=(1.0, 1.0, 3.0), volume=vol, label_map=lab, crops=crops, crop_masks=masks,
                      present=present, report={"findings": f"F{i} é", "impressions": "I"},
                      anatomy_text={"lung": {"status": "normal", "sentences": ["Lungs clear."]}},
                      labels={"emphysema": 0}, meta={"source_sha256": "ab"},
                      bbox={"lung": (2, 2, 1, 6, 6, 3), "liver": (0, 0, 0, 6, 6, 4) if present["liver"] else None})


def _write(root, n=4, per=3):
    rows = []
    for s in range(0, n, per):
        recs = [_rec(i) for i in range(s, min(n, s + per))]
        rel = f"shards/000-{s // per:05d}.h5"
        write_shard(root / rel, LAYOUT, iter(recs), n=len(recs))
        rows += [{"case_id": r.case_id, "patient_id": r.patient_id, "split": r.split, "shard": rel, "row": k,
                  "anatomies": [a for a in LAYOUT.anatomies if r.present[a]]} for k, r in enumerate(recs)]
    write_index(root / "index.jsonl", rows)
    write_dataset_info(root, LAYOUT, {"anatomy_set": "test"})
    return rows


def test_round_trip(tmp_path):
    _write(tmp_path)
    ds = ShardDataset(tmp_path)
    assert ds.anatomies == ["lung", "liver"] and len(ds) == 4
    assert ds.case_ids("valid") == ["c3"] and ShardDataset(tmp_path, split="train").case_ids() == ["c0", "c1", "c2"]
    for i in range(4):
        want = _rec(i)
        got = ds.get(f"c{i}")
        np.testing.assert_array_equal(got.volume, want.volume)
        np.testing.assert_array_equal(got.label_map, want.label_map)
        np.testing.assert_array_equal(got.crops["lung"], want.crops["lung"])
        assert got.present == want.present and got.report == want.report and got.labels == want.labels
        assert got.anatomy_text == want.anatomy_text and got.meta == want.meta
        assert got.bbox["lung"] == (2, 2, 1, 6, 6, 3) and got.patient_id == want.patient_id
        if not want.present["liver"]:  # absent: never written, reads back as the fill value
            assert got.bbox["liver"] is None
            assert (got.crops["liver"] == AIR_HU).all() and (got.crop_masks["liver"] == 0).all()
    rec = ds.get("c2", anatomies=["liver"], volume=False)
    assert rec.volume is None and list(rec.crops) == ["liver"] and (rec.crops["liver"] == 52).all()
    crop, mask, present = ds.crop("c1", "liver")
    assert not present and crop.shape == (6, 6, 4)
    assert ds[0].case_id == "c0"


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
    info["version"] = 1
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
    r.crops["lung"] = np.zeros((2, 2, 2), np.int16)
    with pytest.raises(ValueError, match="crop lung shape"):
        write_shard(tmp_path / "x.h5", LAYOUT, [r], n=1)
    assert not (tmp_path / "x.h5").exists()


def test_concat_copies_chunks(tmp_path):
    from fvlm.data.shards import concat_shards

    parts = []
    for i in range(3):
        parts.append(write_shard(tmp_path / f"p{i}.h5", LAYOUT, [_rec(i)], n=1))
    concat_shards(tmp_path / "root/shards/000-00000.h5", LAYOUT, parts)
    write_shard(tmp_path / "ref.h5", LAYOUT, [_rec(i) for i in range(3)], n=3)
    write_index(tmp_path / "root/index.jsonl", [{"case_id": f"c{i}", "shard": "shards/000-00000.h5", "row": i,
                                                 "anatomies": []} for i in range(3)])
    write_dataset_info(tmp_path / "root", LAYOUT)
    ds = ShardDataset(tmp_path / "root")
    import h5py
    with h5py.File(tmp_path / "ref.h5") as ref:
        for i in range(3):
            r = ds.get(f"c{i}")
            np.testing.assert_array_equal(r.volume, ref["volume"][i])
            np.testing.assert_array_equal(r.crops["liver"], ref["crops/liver"][i])
            assert r.meta == _rec(i).meta and r.present == _rec(i).present
        with h5py.File(tmp_path / "root/shards/000-00000.h5") as f:
            # the absent liver of case 1 stays an unwritten chunk
            assert f["crops/liver"].id.get_chunk_info_by_coord((1, 0, 0, 0)).byte_offset is None
            assert f["crops/liver"].id.get_chunk_info_by_coord((0, 0, 0, 0)).byte_offset is not None
