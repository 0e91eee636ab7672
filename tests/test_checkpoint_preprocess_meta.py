"""A pretraining checkpoint carries the preprocessing settings of its shards (meta["preprocess"])."""
import pytest

pytest.importorskip("torch")
shards = pytest.importorskip("fvlm.data.shards")
synthetic_ct = pytest.importorskip("fvlm.data.synthetic_ct")

from fvlm.eval.predict import preprocess_config_from_meta  # noqa: E402
from fvlm.train.pretrain import _shard_settings  # noqa: E402


def _shards(root):
    organs = ["lung", "liver"]
    src = synthetic_ct.SyntheticCTSource(n=4, anatomies=organs, shape=(32, 32, 16), crop_shape=(16, 16, 8), seed=1)
    layout = shards.ShardLayout(anatomies=organs, crop_shapes=dict(src.crop_shapes), whole_shape=(32, 32, 16),
                                spacing_mm=(2.0, 2.0, 4.0))
    recs = [src.get(c) for c in src.case_ids()]
    shards.write_shard(root / "shards" / "000-00000.h5", layout, recs, n=len(recs))
    shards.write_index(root / "index.jsonl", [
        {"case_id": r.case_id, "patient_id": r.patient_id or r.case_id, "split": r.split,
         "shard": "shards/000-00000.h5", "row": i, "anatomies": [a for a in organs if r.present.get(a)]}
        for i, r in enumerate(recs)])
    shards.write_dataset_info(root, layout, {"target_spacing_mm": [2.0, 2.0, 4.0]})
    (root / "config.yaml").write_text("target_spacing_mm: [2.0, 2.0, 4.0]\n")
    return shards.ShardDataset(root)


def test_shard_settings_reach_predict(tmp_path):
    ds = _shards(tmp_path / "out")
    meta = {"preprocess": _shard_settings(ds)}
    assert meta["preprocess"]["config"] == {"target_spacing_mm": [2.0, 2.0, 4.0]}
    assert meta["preprocess"]["dataset"]["layout"]["anatomies"] == ["lung", "liver"]
    pcfg = preprocess_config_from_meta(meta)
    assert list(pcfg.target_spacing_mm) == [2.0, 2.0, 4.0]


def test_no_shard_settings_for_synthetic_source():
    src = synthetic_ct.SyntheticCTSource(n=2, anatomies=["lung"], shape=(16, 16, 8), crop_shape=(8, 8, 4))
    assert _shard_settings(src) is None
