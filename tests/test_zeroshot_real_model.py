"""The suite on the real fVLM model class and input transform (tiny, untrained) over synthetic CT.

Checks the wiring, not accuracy: one ``encode_image`` call per case through the training
transform, prompts through the model's per-anatomy text heads, a strict-JSON document.
"""
import collections
import json

import pytest

torch = pytest.importorskip("torch")
models = pytest.importorskip("fvlm.models")
ct = pytest.importorskip("fvlm.data.ct")
synthetic_ct = pytest.importorskip("fvlm.data.synthetic_ct")

from fvlm.config import build  # noqa: E402
from fvlm.eval.config import ZeroShotConfig  # noqa: E402
from fvlm.eval.zeroshot import run_suite  # noqa: E402


def test_real_model_encodes_each_case_once():
    organs = ["lung", "heart"]
    src = synthetic_ct.SyntheticCTSource(n=16, anatomies=organs, shape=(32, 32, 16), crop_shape=(16, 16, 8),
                                         val_fraction=0.5, prevalence=0.4)
    torch.manual_seed(0)
    model = models.create_model("fvlm", {"anatomies": organs, "embed_dim": 32,
                                         "image": {"encoder": "vit3d_tiny", "img_size": [32, 32, 16],
                                                   "patch_size": [8, 8, 4]},
                                         "text": {"model_dir": "tiny-random"}}).eval()
    make_batch = ct.make_batch_fn(ct.SampleOptions(anatomies=organs, volume_size=[32, 32, 16], crop_size=None))
    calls = collections.Counter()
    orig = model.encode_image

    def counted(batch):
        calls.update(batch["case_id"])
        return orig(batch)

    model.encode_image = counted
    cfg = build(ZeroShotConfig, {"splits": {"test": "valid"},
                                 "thresholds": {"source": "train_subset", "train_fraction": 0.5},
                                 "bootstrap": {"n": 10}, "min_positives": 1, "min_negatives": 1})
    with torch.inference_mode():
        res = run_suite(model, src, {"name": "synthetic-ct", "diagnoses": src.diagnoses}, cfg, make_batch).results
    assert len(calls) == 16 and set(calls.values()) == {1}
    assert res["compute"]["image_forwards"] == 16
    assert res["scoring"]["logit_scale"] == pytest.approx(float(model.get_logit_scale()))
    assert res["zeroshot"]["macro"]["n_diagnoses"] + len(res["zeroshot"]["skipped"]) == len(src.diagnoses)
    json.dumps(res, allow_nan=False)
