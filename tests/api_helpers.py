"""Shared by test_api.py and test_export.py: real shards of the shipped sample CT and a tiny
checkpoint that carries those shards' preprocessing settings (as `fvlm pretrain` writes them)."""
import csv
import json
from pathlib import Path

import yaml

from fvlm.resources import samples_dir

CT = samples_dir() / "ct" / "example_ct_sm.nii.gz"
SEG = samples_dir() / "ct" / "example_seg.nii.gz"


def make_shards(root: Path) -> Path:
    """Two cases (the sample CT, stored twice) preprocessed with the demo's settings."""
    from fvlm.cli import main

    man = root / "manifest.csv"
    with open(man, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["case_id", "patient_id", "split", "image", "mask"])
        w.writeheader()
        w.writerow({"case_id": "c0", "patient_id": "p0", "split": "train", "image": str(CT), "mask": str(SEG)})
        w.writerow({"case_id": "c1", "patient_id": "p1", "split": "valid", "image": str(CT), "mask": str(SEG)})
    out = root / "shards"
    rc = main(["preprocess", "--manifest", str(man), "--out", str(out), "--config", "demo/preprocess",
               "--set", "reports.labeler=false", "-q"])
    assert rc == 0
    return out


def make_checkpoint(path: Path, shards: Path, with_preprocess: bool = True, embed_dim: int = 32, seed: int = 0):
    """A tiny untrained fvlm model on the shards' anatomies, saved like `fvlm pretrain` saves it."""
    import torch

    from fvlm.data import ShardDataset
    from fvlm.data.ct import SampleOptions
    from fvlm.models import create_model
    from fvlm.models.checkpoint import save_consolidated

    ds = ShardDataset(shards)
    an = ds.anatomies
    torch.manual_seed(seed)
    model = create_model("fvlm", {"anatomies": an, "embed_dim": embed_dim,
                                  "image": {"encoder": "vit3d_tiny", "img_size": [32, 32, 16],
                                            "patch_size": [8, 8, 4]},
                                  "text": {"model_dir": "tiny-random"}})
    opts = SampleOptions(anatomies=an, volume_size=[32, 32, 16], crop_size=None)
    meta = {"data": opts.to_dict(), "taxonomy": "fvlm54", "anatomy_set": ds.info.get("anatomy_set"), "step": 1}
    if with_preprocess:
        meta["preprocess"] = {"config": yaml.safe_load((shards / "config.yaml").read_text()),
                              "dataset": json.loads((shards / "dataset.json").read_text())}
    return save_consolidated(path, model, meta)
