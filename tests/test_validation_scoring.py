"""best.pt is chosen by the score `fvlm zeroshot` reports: validation's AUCs equal the suite's on the
same model and cases (the shipped MiniLM, so positive and negative prompts differ)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
models = pytest.importorskip("fvlm.models")
ct = pytest.importorskip("fvlm.data.ct")
synthetic_ct = pytest.importorskip("fvlm.data.synthetic_ct")

from fvlm.config import build  # noqa: E402
from fvlm.eval.config import ZeroShotConfig  # noqa: E402
from fvlm.eval.metrics import roc_auc  # noqa: E402
from fvlm.eval.prompts import build_prompt_sets, encode_prompt_sets, score  # noqa: E402
from fvlm.eval.zeroshot import run_suite  # noqa: E402
from fvlm.resources import default_text_model_dir  # noqa: E402
from fvlm.ct.validate import quick_validate  # noqa: E402

pytestmark = pytest.mark.skipif(default_text_model_dir() is None, reason="the shipped MiniLM is not installed")

ORGANS = ["lung", "liver"]


def _ensemble(diagnoses):
    """Two phrasings each way, so the pairwise rule and the old mean-difference rule can disagree."""
    out = []
    for d in diagnoses:
        d = dict(d)
        d["prompts_positive"] = d["prompts_positive"] + [f"There is evidence of {d['name']}."]
        d["prompts_negative"] = d["prompts_negative"] + [f"No {d['name']} is seen."]
        out.append(d)
    return out


@pytest.fixture(scope="module")
def setup():
    src = synthetic_ct.SyntheticCTSource(n=24, anatomies=ORGANS, shape=(32, 32, 16), crop_shape=(16, 16, 8),
                                         val_fraction=0.5, prevalence=0.4, seed=5)
    torch.manual_seed(0)
    model = models.create_model("fvlm", {"anatomies": ORGANS, "embed_dim": 32,
                                         "image": {"encoder": "vit3d_tiny", "img_size": [32, 32, 16],
                                                   "patch_size": [8, 8, 4]},
                                         "text": {"model_dir": None}}).eval()
    diags = _ensemble(src.diagnoses)
    opts = ct.SampleOptions(anatomies=ORGANS, volume_size=[32, 32, 16], crop_size=None,
                            diagnoses=[d["id"] for d in diags])
    return src, model, diags, opts


def test_validation_auc_equals_zeroshot_suite(setup):
    src, model, diags, opts = setup
    val_ids = src.case_ids("valid")
    val = quick_validate(model, src, val_ids, opts, diags, batch_size=5)
    cfg = build(ZeroShotConfig, {"splits": {"test": "val"}, "thresholds": {"source": "none"},
                                 "probe": {"enabled": False}, "retrieval": {"enabled": False},
                                 "bootstrap": {"n": 0}, "min_positives": 1, "min_negatives": 1})
    with torch.inference_mode():
        res = run_suite(model, src, {"name": "synthetic-ct", "diagnoses": diags}, cfg,
                        ct.make_batch_fn(opts)).results
    suite = {d: v["auc"]["value"] for d, v in res["zeroshot"]["diagnoses"].items()}
    mine = {k[len("val/auc_"):]: v for k, v in val.items() if k.startswith("val/auc_") and k != "val/auc_mean"}
    assert len(suite) >= 3 and set(mine) == set(suite)
    for d in suite:
        assert mine[d] == pytest.approx(suite[d], abs=1e-4), d
    assert val["val/auc_mean"] == pytest.approx(np.mean(list(suite.values())), abs=1e-4)


def test_prompts_are_distinguished_and_the_rule_matters(setup):
    """MiniLM gives positive and negative prompts different embeddings (scores are not all 0.5, as with the
    tiny random BERT), and the pairwise rule ranks cases differently from img @ (mean(pos) - mean(neg))."""
    src, model, diags, opts = setup
    ids = src.case_ids()
    with torch.no_grad():
        b = ct.make_batch_fn(opts)([src.get(c) for c in ids])
        img = model.encode_image(b)
        y = b["labels"].numpy()
        differs = 0
        sets = build_prompt_sets({"diagnoses": diags})
        pe = encode_prompt_sets(model, sets)
        for j, ps in enumerate(sets):
            e = img[ps.embedding].float().numpy()
            assert not np.allclose(pe.positives[ps.diagnosis], pe.negatives[ps.diagnosis], atol=1e-3)
            s = score(e, pe.positives[ps.diagnosis], pe.negatives[ps.diagnosis], "pairwise", 100.0)
            assert np.ptp(s) > 1e-6 and np.abs(s - 0.5).max() > 1e-6   # exactly 0.5 everywhere with [UNK]
            old = e @ (pe.positives[ps.diagnosis].mean(0) - pe.negatives[ps.diagnosis].mean(0))
            keep = y[:, j] >= 0
            if keep.sum() > 1 and len(set(y[keep, j])) == 2:
                differs += abs(roc_auc(y[keep, j] > 0, s[keep]) - roc_auc(y[keep, j] > 0, old[keep])) > 1e-6
    assert differs >= 1
