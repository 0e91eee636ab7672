"""Validation during pretraining is never silently off: split names resolve as in the zero-shot suite,
and a train.val_metric that cannot be computed is a ConfigError at start naming the key to set."""
from pathlib import Path

import pytest

pytest.importorskip("torch")
shards = pytest.importorskip("fvlm.data.shards")
synthetic_ct = pytest.importorskip("fvlm.data.synthetic_ct")

from fvlm.config import load_config  # noqa: E402
from fvlm.errors import ConfigError  # noqa: E402
from fvlm.eval.protocol import same_split as suite_same_split  # noqa: E402
from fvlm.splits import resolve_split_ids, same_split  # noqa: E402
from fvlm.ct.pretrain import PretrainConfig, build_source  # noqa: E402
from fvlm.ct.validate import check_val_config  # noqa: E402

TRAIN_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "train").glob("*.yaml"))


def _shards(root: Path, val_name: str = "val") -> Path:
    """Six synthetic cases written as shards the way `fvlm preprocess` names splits (train / val)."""
    organs = ["lung", "liver"]
    src = synthetic_ct.SyntheticCTSource(n=6, anatomies=organs, shape=(32, 32, 16), crop_shape=(16, 16, 8),
                                         seed=1, val_fraction=0.5)
    layout = shards.ShardLayout(anatomies=organs, crop_shapes=dict(src.crop_shapes), whole_shape=(32, 32, 16),
                                spacing_mm=(2.0, 2.0, 4.0))
    recs = [src.get(c) for c in src.case_ids()]
    shards.write_shard(root / "shards" / "000-00000.h5", layout, recs, n=len(recs))
    shards.write_index(root / "index.jsonl", [
        {"case_id": r.case_id, "patient_id": r.patient_id, "split": val_name if r.split == "valid" else r.split,
         "shard": "shards/000-00000.h5", "row": i, "anatomies": [a for a in organs if r.present.get(a)]}
        for i, r in enumerate(recs)])
    shards.write_dataset_info(root, layout, {"target_spacing_mm": [2.0, 2.0, 4.0]})
    return root


def _cfg(files=(), sets=(), shards_dir=None) -> PretrainConfig:
    extra = {"data": {"shards": str(shards_dir)}} if shards_dir else None
    return load_config(PretrainConfig, files=list(files), sets=list(sets), base="train/default.yaml", extra=extra)


def test_split_aliases_are_the_suites():
    for a, b in [("val", "valid"), ("valid", "validation"), ("VAL", "dev"), ("test", "testing"),
                 ("train", "training"), ("x", "x")]:
        assert same_split(a, b) and suite_same_split(a, b)
    for a, b in [("val", "test"), ("train", "valid"), ("x", "y")]:
        assert not same_split(a, b) and not suite_same_split(a, b)


def test_default_valid_finds_shards_written_as_val(tmp_path):
    root = _shards(tmp_path)
    ds = shards.ShardDataset(root)
    assert ds.case_ids("valid") == []                  # the exact name finds nothing ...
    name, ids = resolve_split_ids(ds, "valid")         # ... the alias does
    assert name == "val" and len(ids) == 3 and set(ids) == set(ds.case_ids("val"))
    cfg = _cfg(sets=["train.val_metric=val/recall@1_mean"], shards_dir=root)
    assert cfg.data.val_split == "valid"
    assert check_val_config(cfg, ds) == ds.case_ids("val")
    cfg.val.max_cases = 2
    assert check_val_config(cfg, ds) == ds.case_ids("val")[:2]


def test_auc_metric_without_taxonomy_names_the_key(tmp_path):
    ds = shards.ShardDataset(_shards(tmp_path))
    cfg = _cfg(sets=["train.val_metric=val/auc_mean"], shards_dir=ds.root)
    with pytest.raises(ConfigError, match=r"train.val_metric=val/auc_mean.*data\.taxonomy"):
        check_val_config(cfg, ds)
    cfg.data.taxonomy = "fvlm54"
    assert len(check_val_config(cfg, ds)) == 3
    cfg.train.val_metric = "val/auc_no_such_diagnosis"
    with pytest.raises(ConfigError, match="no diagnosis 'no_such_diagnosis'"):
        check_val_config(cfg, ds)


def test_metric_with_no_validation_split_or_disabled_is_an_error(tmp_path, caplog):
    ds = shards.ShardDataset(_shards(tmp_path, val_name="holdout"))
    cfg = _cfg(sets=["train.val_metric=val/recall@1_mean"], shards_dir=ds.root)
    with pytest.raises(ConfigError, match=r"no cases in validation split 'valid' \(data.val_split"):
        check_val_config(cfg, ds)
    cfg.train.val_metric = ""
    with caplog.at_level("WARNING", logger="fvlm.train"):
        assert check_val_config(cfg, ds) == []
    assert "validation off" in caplog.text              # off, but said so
    cfg.data.val_split, cfg.train.val_metric, cfg.val.enabled = "holdout", "val/recall@1_mean", False
    with pytest.raises(ConfigError, match="val.enabled=false"):
        check_val_config(cfg, ds)


def test_unknown_metric_and_untrained_anatomy(tmp_path):
    ds = shards.ShardDataset(_shards(tmp_path))
    cfg = _cfg(sets=["train.val_metric=val/accuracy"], shards_dir=ds.root)
    with pytest.raises(ConfigError, match="unknown metric"):
        check_val_config(cfg, ds)
    cfg.train.val_metric = "val/R@1_heart"
    with pytest.raises(ConfigError, match="anatomy 'heart' is not trained"):
        check_val_config(cfg, ds)
    cfg.train.val_metric = "val/R@1_lung"
    assert len(check_val_config(cfg, ds)) == 3


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_train_config_validates_on_its_own_data(path):
    cfg = _cfg(files=[str(path)])
    ids = check_val_config(cfg, build_source(cfg.data))
    assert ids, f"{path.name}: validation would be off"


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_train_config_validates_on_preprocessed_shards(path, tmp_path):
    cfg = _cfg(files=[str(path)], shards_dir=_shards(tmp_path))
    ids = check_val_config(cfg, build_source(cfg.data))
    assert len(ids) == min(3, cfg.val.max_cases)


def test_pretrain_refuses_a_val_metric_it_cannot_compute_and_writes_nothing(tmp_path, capsys):
    """`fvlm pretrain` calls check_val_config before anything is written: exit 2, one line, no run dir."""
    from fvlm.cli import main

    root = _shards(tmp_path / "data")
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", "configs/train/tiny.yaml", "--data", str(root), "--out", str(out),
               "--set", "train.val_metric=val/auc_mean", "--set", "data.taxonomy=null",
               "--set", "data.anatomies=[lung,liver]", "--set", "train.steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "data.taxonomy" in err[-1] and "Traceback" not in "\n".join(err)
    assert not out.exists()
