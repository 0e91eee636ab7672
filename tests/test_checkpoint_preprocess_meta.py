"""A pretraining checkpoint carries the preprocessing settings of its shards (meta["preprocess"])."""
import pytest

pytest.importorskip("torch")
shards = pytest.importorskip("fvlm.data.shards")
synthetic_ct = pytest.importorskip("fvlm.data.synthetic_ct")

from fvlm.eval.predict import preprocess_config_from_meta  # noqa: E402
from fvlm.ct.pretrain import _shard_settings  # noqa: E402
from shard_helpers import write_synthetic_shards  # noqa: E402


def _shards(root):
    organs = ["lung", "liver"]
    src = synthetic_ct.SyntheticCTSource(n=4, anatomies=organs, shape=(32, 32, 16), crop_shape=(16, 16, 8), seed=1)
    write_synthetic_shards(root, src, organs, spacing_mm=(2.0, 2.0, 4.0), info={"target_spacing_mm": [2.0, 2.0, 4.0]})
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
